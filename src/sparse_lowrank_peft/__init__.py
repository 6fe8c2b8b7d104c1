"""sparse_lowrank_peft: new parameter-efficient fine-tuning methods for Hugging Face PEFT.

Importing the package registers every tuner with PEFT, so ``peft.get_peft_model(model, SLTrainConfig(...))``,
``save_pretrained``, ``PeftModel.from_pretrained`` and ``merge_and_unload`` work as for PEFT's own methods.
"""

from . import _peft_compat  # noqa: F401  (checks the PEFT version first)
from .delta import SparseSupport, sparse_delta
from .tuners.sltrain import SLTrainConfig, SLTrainLayer, SLTrainModel

__version__ = "0.1.0"

#: method name -> config class of every tuner of this package (used by the GLUE harness and the CLI). Each tuner
#: package registers itself with PEFT when imported, as PEFT's own tuners do.
TUNERS = _peft_compat.REGISTERED

__all__ = [
    "TUNERS",
    "SLTrainConfig",
    "SLTrainLayer",
    "SLTrainModel",
    "SparseSupport",
    "sparse_delta",
    "__version__",
]
