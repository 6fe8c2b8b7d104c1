"""Fisher weighting of LQ-LoRA's decomposition (Guo et al., ICLR 2024, Section 3.2): row and column weights of the
empirical Fisher of each linear weight, the block that hands them to LQ initialisation, and their file.

The decomposition ``W ≈ Q + L`` (``delta.quant.lq_decompose``) can minimise ``‖D_r (W − Q − L) D_c‖_F`` instead of
the plain error, with ``F ≈ d_r d_cᵀ`` a rank-1 approximation of the squared gradients. :func:`fisher_row_col_weights`
measures ``d_r, d_c`` on calibration batches; within :func:`use_fisher` an adapter's LQ initialisation is weighted by
them; the adapter records them (``lq_fisher``) and saves them as :data:`LQ_FISHER_FILE`, so loading re-derives the
same base.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterable, Optional

import torch
from torch import nn

from .lq_checks import names_each_other

__all__ = ["LQ_FISHER_FILE", "active_fisher", "fisher_for", "fisher_for_modules", "fisher_row_col_weights",
           "load_fisher", "recorded_fisher", "save_fisher", "use_fisher"]


_FISHER: contextvars.ContextVar[Optional[dict]] = contextvars.ContextVar("slpeft_lq_fisher", default=None)


@contextlib.contextmanager
def use_fisher(weights: dict[str, tuple[torch.Tensor, torch.Tensor]]):
    """Within this block, LQ initialisation (``init_weights="lq"``) weights each layer's decomposition by its Fisher
    row/column weights from ``weights`` (``fisher_row_col_weights``; keys are module names of the base model)::

        fisher = fisher_row_col_weights(base, calibration_batches)
        with use_fisher(fisher):
            model = get_peft_model(base, SLTrainConfig(init_weights="lq", ...))

    The weights of the targeted layers are recorded in the adapter's config (``lq_fisher``) and saved beside it
    (``lq_fisher.safetensors``), so ``PeftModel.from_pretrained`` re-derives the same quantized base without them.
    """
    token = _FISHER.set(dict(weights))
    try:
        yield
    finally:
        _FISHER.reset(token)


#: the file beside ``adapter_config.json`` that holds the Fisher weights an LQ initialisation used (``lq_fisher``)
LQ_FISHER_FILE = "lq_fisher.safetensors"


def active_fisher() -> Optional[dict]:
    """The weights of the enclosing :func:`use_fisher` block, or None outside one."""
    return _FISHER.get()


def recorded_fisher(config, key: str) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """The Fisher row/column weights ``config.lq_fisher`` holds for module ``key`` (exact name or dotted suffix
    either way), else None: what LQ initialisation of that layer is weighted by."""
    return _fisher_of(getattr(config, "lq_fisher", None), key)


def save_fisher(weights: dict[str, tuple[torch.Tensor, torch.Tensor]], path: str) -> None:
    """Write ``{module: (row, col)}`` Fisher weights to a safetensors file (tensors ``<module>.row`` / ``.col``)."""
    from safetensors.torch import save_file

    save_file({f"{name}.{part}": t.detach().to("cpu", torch.float32).contiguous()
               for name, pair in weights.items() for part, t in zip(("row", "col"), pair)}, path)


def load_fisher(path: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Read the file :func:`save_fisher` wrote; raises ``ValueError`` naming the file if a module lacks a half."""
    from safetensors.torch import load_file

    tensors = load_file(path)
    names = {key.rsplit(".", 1)[0] for key in tensors}
    missing = [n for n in names if f"{n}.row" not in tensors or f"{n}.col" not in tensors]
    if missing or any(not k.endswith((".row", ".col")) for k in tensors):
        raise ValueError(f"{path} is not a Fisher weights file of this package (module {missing[:1]} lacks its row or "
                         "column weights). Fix: save the adapter again with save_pretrained.")
    return {n: (tensors[f"{n}.row"], tensors[f"{n}.col"]) for n in sorted(names)}


def fisher_for(key: str) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """The Fisher weights ``use_fisher`` set for module ``key`` (exact name or a dotted suffix), else None."""
    return _fisher_of(_FISHER.get(), key)


def fisher_for_modules(keys: Iterable[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{key: (row, col)}`` of the enclosing :func:`use_fisher` block for each of ``keys`` it has weights for, as
    fp32 CPU copies (what an adapter records and saves); empty outside such a block."""
    pairs = {key: fisher_for(key) for key in keys}
    return {key: tuple(t.detach().to("cpu", torch.float32).clone() for t in pair)
            for key, pair in pairs.items() if pair is not None}


def _fisher_of(weights: Optional[dict], key: str) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """``weights``' entry for module ``key``: its exact name, else a name one is a dotted suffix of the other."""
    if not isinstance(weights, dict):
        return None
    if key in weights:
        return weights[key]
    return next((value for name, value in weights.items() if names_each_other(key, name)), None)


@torch.no_grad()
def _accumulate(store: dict, name: str, grad: torch.Tensor) -> None:
    sq = grad.detach().to(torch.float32) ** 2
    row, col = sq.sum(1), sq.sum(0)
    if name in store:
        store[name][0].add_(row)
        store[name][1].add_(col)
    else:
        store[name] = [row, col]


def fisher_row_col_weights(
    model: nn.Module, batches: Iterable[dict], module_names: Optional[Iterable[str]] = None
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Row and column weights of the empirical Fisher of every ``nn.Linear`` weight (or those named), from the
    squared gradients of the loss on ``batches`` (dicts of model inputs with labels): ``d_row = Σ_j F_ij``,
    ``d_col = Σ_i F_ij`` with ``F = Σ_batches (∂loss/∂W)²``. Weights' ``requires_grad`` flags are restored."""
    wanted = set(module_names) if module_names is not None else None
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and (wanted is None or n in wanted)}
    flags = {n: m.weight.requires_grad for n, m in linears.items()}
    store: dict = {}
    try:
        for m in linears.values():
            m.weight.requires_grad_(True)
        was_training = model.training
        model.eval()
        for batch in batches:
            model.zero_grad(set_to_none=True)
            out = model(**batch)
            out.loss.backward()
            for n, m in linears.items():
                if m.weight.grad is not None:
                    _accumulate(store, n, m.weight.grad)
        model.train(was_training)
    finally:
        model.zero_grad(set_to_none=True)  # leave no calibration gradient behind, on any parameter
        for n, m in linears.items():
            m.weight.requires_grad_(flags[n])
    return {n: (v[0], v[1]) for n, v in store.items()}
