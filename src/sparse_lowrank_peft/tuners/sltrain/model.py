"""SLTrainModel: injects :class:`SLTrainLayer` into the targeted linear layers."""

from __future__ import annotations

from ...delta.tuner import DeltaModel
from .layer import SLTrainLayer


class SLTrainModel(DeltaModel):
    """Sparse + low-rank (SLTrain) adapters for a transformers or plain PyTorch model.

    Use through PEFT::

        from peft import get_peft_model
        from sparse_lowrank_peft import SLTrainConfig
        model = get_peft_model(base, SLTrainConfig(r=8, sparsity=0.01, target_modules=["query", "value"]))
    """

    prefix: str = "sltrain_"
    tuner_layer_cls = SLTrainLayer
