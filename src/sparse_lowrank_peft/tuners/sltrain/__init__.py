from .config import SLTrainConfig
from .layer import SLTrainLayer
from .model import SLTrainModel

__all__ = ["SLTrainConfig", "SLTrainLayer", "SLTrainModel"]
