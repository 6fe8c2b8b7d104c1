"""Training-time hooks: ``transformers.TrainerCallback`` s and plain helpers for custom loops.

* SoRA: the gate's proximal step after every optimizer step (``SoraCallback`` / ``sora_prox_step``), with the
  optional sparsifying λ schedule of the paper's Algorithm 1 (``sora_lambda_at``).
* DyLoRA: one rank per step, the same in every layer and every process (``DyLoraCallback`` / ``dylora_sample_rank``).
* ``adapter_param_groups``: optimizer parameter groups with weight decay off for biases, norms and every tuner's
  ``no_decay_names`` (SoRA's gates: their only regulariser is the L1 proximal step).

The callbacks find the tuner through ``model.base_model`` and act on every adapter of the matching type; models
without such an adapter are left alone, so one callback list serves every method.
"""

from __future__ import annotations

import math
from typing import Iterable, Optional

import torch
from torch import nn

from .tuners.dylora import DyLoraModel
from .tuners.sora import SoraModel

try:  # transformers is a hard dependency, but keep the helpers importable without its Trainer stack
    from transformers import TrainerCallback
except ImportError:  # pragma: no cover
    TrainerCallback = object

__all__ = [
    "DyLoraCallback",
    "SoraCallback",
    "adapter_param_groups",
    "dylora_sample_rank",
    "no_decay_parameter_names",
    "sora_lambda_at",
    "sora_prox_step",
    "training_callbacks",
]


def _tuner(model, cls):
    """The ``cls`` tuner inside ``model`` (a PeftModel, a tuner, or a DDP/FSDP/accelerate wrapper of them)."""
    seen = 0
    while model is not None and seen < 8:
        if isinstance(model, cls):
            return model
        nxt = getattr(model, "base_model", None)
        if nxt is None or nxt is model:
            nxt = getattr(model, "module", None)
        model, seen = nxt, seen + 1
    return None


# ---------------------------------------------------------------------------------------------- SoRA
def sora_lambda_at(config, progress: float) -> float:
    """λ at training progress ``progress`` ∈ [0, 1] under the config's schedule (Algorithm 1's staircase).

    With ``lambda_schedule`` set, training is split into ``lambda_num`` equal stages and stage ``i`` uses the ``i``-th
    of ``lambda_num`` values spaced linearly (or log/exp-linearly) from ``sparse_lambda`` to ``max_lambda``.
    """
    if config.lambda_schedule is None:
        return float(config.sparse_lambda)
    n = int(config.lambda_num)
    stage = min(n - 1, max(0, int(progress * n)))
    t = stage / (n - 1) if n > 1 else 1.0
    lo, hi = float(config.sparse_lambda), float(config.max_lambda)
    if config.lambda_schedule == "linear":
        return lo + t * (hi - lo)
    if config.lambda_schedule == "exp_linear":  # geometric spacing
        return math.exp(math.log(lo) + t * (math.log(hi) - math.log(lo)))
    # "log_linear": the official code's log(linspace(exp(lo), exp(hi)))
    return math.log(math.exp(lo) + t * (math.exp(hi) - math.exp(lo)))


def sora_prox_step(
    model, lr: float, sparse_lambda: Optional[float] = None, progress: float = 0.0, count_zeros: bool = True
) -> Optional[int]:
    """Soft-threshold every SoRA gate by ``λ · lr`` after an optimizer step; returns the number of zero gates.

    Args:
        model: the PeftModel (or its tuner).
        lr: the learning rate of the step just taken (the gates' parameter group).
        sparse_lambda: λ; default: the adapter config's, following its schedule at ``progress``.
        progress: fraction of training done, for the λ schedule.
        count_zeros: count the zero gates (one device-to-host copy, which on a GPU waits for the step to finish).
            ``False`` returns ``None`` and leaves the GPU's queue running ahead; ``SoraCallback`` does so.
    """
    if lr < 0:
        raise ValueError(f"sora_prox_step: lr={lr} must be >= 0.")
    tuner = _tuner(model, SoraModel)
    if tuner is None:
        return 0 if count_zeros else None
    for name in tuner.active_adapters:
        config = tuner.peft_config[name]
        lam = sora_lambda_at(config, progress) if sparse_lambda is None else float(sparse_lambda)
        if lam < 0:
            raise ValueError(f"sora_prox_step: sparse_lambda={lam} must be >= 0.")
        tuner.prox_step(lam * lr, adapter_name=name)
    if not count_zeros:
        return None
    zeros = [(layer.sora_gate[name] == 0).sum() for name in tuner.active_adapters
             for _, layer in tuner._sora_layers() if layer.has_adapter(name)]
    if not zeros:
        return 0
    # one host sync for all layers, not one per layer (layers spread over devices are gathered on the first's)
    return int(torch.stack([z.to(zeros[0].device) for z in zeros]).sum())


def _gate_lr(optimizer, model) -> float:
    tuner = _tuner(model, SoraModel)
    gates = set()
    for _, layer in tuner._sora_layers():
        gates.update(id(p) for p in layer.sora_gate.values())
    for group in optimizer.param_groups:
        if any(id(p) in gates for p in group["params"]):
            return float(group["lr"])
    return float(optimizer.param_groups[0]["lr"])


class SoraCallback(TrainerCallback):
    """``transformers`` callback: SoRA's proximal gate step after every optimizer step.

    Uses the learning rate the step was taken with (``on_optimizer_step`` runs before the scheduler steps) and the
    adapter config's λ and schedule. Logs the number of open ranks as ``sora_open_ranks``.
    """

    def __init__(self, sparse_lambda: Optional[float] = None):
        self.sparse_lambda = sparse_lambda
        #: (global step, open ranks) at every logging step
        self.history: list[tuple[int, int]] = []

    def on_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        if model is None or optimizer is None or _tuner(model, SoraModel) is None:
            return control
        progress = state.global_step / state.max_steps if state.max_steps else 0.0
        sora_prox_step(model, _gate_lr(optimizer, model), self.sparse_lambda, progress, count_zeros=False)
        return control

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        tuner = _tuner(model, SoraModel) if model is not None else None
        if tuner is None or logs is None:
            return control
        open_ranks = sum(sum(tuner.kept_ranks(a).values()) for a in tuner.active_adapters)
        self.history.append((state.global_step, open_ranks))
        logs["sora_open_ranks"] = open_ranks  # seen by reporting callbacks that run after this one
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1]["sora_open_ranks"] = open_ranks  # Trainer appends to the history before on_log
        return control


# ---------------------------------------------------------------------------------------------- DyLoRA
def dylora_sample_rank(model, step: int) -> Optional[int]:
    """Set this step's DyLoRA rank (a pure function of the config's seed and ``step``) and return it."""
    tuner = _tuner(model, DyLoraModel)
    if tuner is None:
        return None
    b = None
    for name in tuner.active_adapters:
        b = tuner.sample_rank(step, adapter_name=name)
    return b


class DyLoraCallback(TrainerCallback):
    """``transformers`` callback: draw DyLoRA's rank at the start of every step; back to full rank ``r`` (or
    ``eval_rank``) for evaluation and at the end of training."""

    def __init__(self, eval_rank: Optional[int] = None):
        self.eval_rank = eval_rank

    def _set_eval(self, model):
        tuner = _tuner(model, DyLoraModel)
        if tuner is not None:
            for name in tuner.active_adapters:
                tuner.set_rank(self.eval_rank or tuner.peft_config[name].r, adapter_name=name)

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if model is not None:
            dylora_sample_rank(model, state.global_step)
        return control

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if model is not None:
            self._set_eval(model)  # evaluation and saving that follow a step see the full rank
        return control

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if model is not None:
            self._set_eval(model)
        return control


# ---------------------------------------------------------------------------------------------- optimizer groups
_NO_DECAY_SUFFIXES = ("bias", "LayerNorm.weight", "layer_norm.weight", "norm.weight")


def adapter_param_groups(model: nn.Module, weight_decay: float, extra_no_decay: Iterable[str] = ()) -> list[dict]:
    """Two optimizer groups of the trainable parameters: with ``weight_decay`` and without.

    No decay for biases, normalisation weights, every tuner layer's ``no_decay_names`` (SoRA's gates) and names
    containing any of ``extra_no_decay``.
    """
    no_decay_ids = set()
    for module in model.modules():
        for attr in getattr(module, "no_decay_names", ()):
            container = getattr(module, attr, None)
            if container is not None:
                no_decay_ids.update(id(p) for p in container.parameters())
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if id(p) in no_decay_ids or name.endswith(_NO_DECAY_SUFFIXES) or any(s in name for s in extra_no_decay):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]

def training_callbacks(model) -> list:
    """The ``transformers`` callbacks that ``model``'s adapters need while training (SoRA's proximal step, DyLoRA's
    rank sampling); an empty list for methods that need none. A Trainer-based runner adds these for every method."""
    found = []
    if _tuner(model, SoraModel) is not None:
        found.append(SoraCallback())
    if _tuner(model, DyLoraModel) is not None:
        found.append(DyLoraCallback())
    return found


def no_decay_parameter_names(model: nn.Module) -> set[str]:
    """Full names of the parameters that tuner layers declare ``no_decay_names`` (SoRA's gates), for a Trainer's
    ``get_decay_parameter_names`` to leave out."""
    names = set()
    for module_name, module in model.named_modules():
        for attr in getattr(module, "no_decay_names", ()):
            container = getattr(module, attr, None)
            if container is None:
                continue
            for pname, _ in container.named_parameters():
                names.add(f"{module_name}.{attr}.{pname}" if module_name else f"{attr}.{pname}")
    return names
