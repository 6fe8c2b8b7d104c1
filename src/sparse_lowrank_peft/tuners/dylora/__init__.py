from ..._peft_compat import register_method
from .config import DyLoraConfig
from .layer import DyLoraLayer
from .model import DyLoraModel, sample_rank

register_method("dylora", DyLoraConfig, DyLoraModel)

__all__ = ["DyLoraConfig", "DyLoraLayer", "DyLoraModel", "sample_rank"]
