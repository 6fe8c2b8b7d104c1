"""Pretraining from scratch with SLTrain's ``W = (α/r)·B·A + S`` (arXiv 2406.02214): layer, conversion, per-layer updates."""

from .convert import SLTrainSettings, linear_parameter_count, load_sltrain, save_sltrain, to_dense, to_sltrain
from .layer import SLTrainLinear
from .layerwise import PerLayerOptimizer, check_trainer_args

__all__ = [
    "PerLayerOptimizer",
    "SLTrainLinear",
    "SLTrainSettings",
    "check_trainer_args",
    "linear_parameter_count",
    "load_sltrain",
    "save_sltrain",
    "to_dense",
    "to_sltrain",
]
