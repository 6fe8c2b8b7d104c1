"""sparse_lowrank_peft: new parameter-efficient fine-tuning methods for Hugging Face PEFT.

Importing the package registers every tuner with PEFT, so ``peft.get_peft_model(model, SLTrainConfig(...))``,
``save_pretrained``, ``PeftModel.from_pretrained`` and ``merge_and_unload`` work as for PEFT's own methods.
"""

from . import _peft_compat  # noqa: F401  (checks the PEFT version first)
from .delta import SparseSupport, sparse_delta
from .tuners.dylora import DyLoraConfig, DyLoraLayer, DyLoraModel
from .tuners.nola import NolaConfig, NolaLayer, NolaModel
from .tuners.sltrain import SLTrainConfig, SLTrainLayer, SLTrainModel
from .tuners.sora import SoraConfig, SoraLayer, SoraModel
from .tuners.sparse_randlora import SparseRandLoraConfig, SparseRandLoraLayer, SparseRandLoraModel
from .callbacks import (  # noqa: E402  (after the tuners it hooks into)
    DyLoraCallback,
    SoraCallback,
    adapter_param_groups,
    dylora_sample_rank,
    sora_prox_step,
    training_callbacks,
)
from .export import export_to_lora
from .lq_lora import get_lq_lora_model, load_lq_lora, save_lq_lora
from .pretrain import PerLayerOptimizer, SLTrainLinear, load_sltrain, save_sltrain, to_dense, to_sltrain  # noqa: F401

__version__ = "0.1.0"

#: method name -> config class of every tuner of this package (used by the GLUE harness and the CLI). Each tuner
#: package registers itself with PEFT when imported, as PEFT's own tuners do.
TUNERS = _peft_compat.REGISTERED

__all__ = [
    "TUNERS",
    "DyLoraCallback",
    "DyLoraConfig",
    "DyLoraLayer",
    "DyLoraModel",
    "NolaConfig",
    "NolaLayer",
    "NolaModel",
    "SoraCallback",
    "SoraConfig",
    "SoraLayer",
    "SoraModel",
    "adapter_param_groups",
    "dylora_sample_rank",
    "export_to_lora",
    "get_lq_lora_model",
    "load_lq_lora",
    "save_lq_lora",
    "sora_prox_step",
    "training_callbacks",
    "SLTrainConfig",
    "SLTrainLayer",
    "SLTrainModel",
    "SparseRandLoraConfig",
    "SparseRandLoraLayer",
    "SparseRandLoraModel",
    "SparseSupport",
    "sparse_delta",
    "__version__",
]
