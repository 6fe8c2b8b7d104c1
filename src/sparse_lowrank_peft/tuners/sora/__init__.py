from ..._peft_compat import register_method
from .config import SoraConfig
from .layer import SoraLayer
from .model import SoraModel

register_method("sora", SoraConfig, SoraModel)

__all__ = ["SoraConfig", "SoraLayer", "SoraModel"]
