"""sparse_lowrank_peft: new parameter-efficient fine-tuning methods for Hugging Face PEFT.

Importing the package registers every tuner with PEFT, so ``peft.get_peft_model(model, SLTrainConfig(...))``,
``save_pretrained``, ``PeftModel.from_pretrained`` and ``merge_and_unload`` work as for PEFT's own methods.
"""

from . import _peft_compat  # noqa: F401  (checks the PEFT version first)
from .delta import SparseSupport, sparse_delta
from .tuners.sltrain import SLTrainConfig, SLTrainLayer, SLTrainModel

__version__ = "0.1.0"

#: method name -> config class, for every tuner of this package (used by the GLUE harness and the CLI)
TUNERS = {
    "sltrain": SLTrainConfig,
}

_REGISTRY = [
    ("sltrain", SLTrainConfig, SLTrainModel),
]
for _name, _config_cls, _model_cls in _REGISTRY:
    _peft_compat.register_method(_name, _config_cls, _model_cls, prefix=_model_cls.prefix)

__all__ = [
    "TUNERS",
    "SLTrainConfig",
    "SLTrainLayer",
    "SLTrainModel",
    "SparseSupport",
    "sparse_delta",
    "__version__",
]
