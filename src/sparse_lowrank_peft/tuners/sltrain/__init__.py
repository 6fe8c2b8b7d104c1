from ..._peft_compat import register_method
from .config import SLTrainConfig
from .layer import SLTrainLayer
from .model import SLTrainModel

register_method("sltrain", SLTrainConfig, SLTrainModel)

__all__ = ["SLTrainConfig", "SLTrainLayer", "SLTrainModel"]
