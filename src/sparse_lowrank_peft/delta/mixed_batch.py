"""Mixed-adapter batches: ``model(**inputs, adapter_names=["a", "__base__", "b", ...])`` runs each row of a batch
with its own adapter (or none), as PEFT's LoRA does for multi-tenant inference.

PEFT's ``PeftModel.forward`` / ``generate`` hand ``adapter_names`` to the tuner's ``_enable_peft_forward_hooks``
context and drop it from the base model's arguments; a tuner without that context silently applied the active
adapter to every row. :func:`adapter_names_hooks` is that context for this package's tuners (forward pre-hooks that
pass the names to every adapter layer and every ``modules_to_save`` head), and :func:`mixed_batch_forward` the
layer's computation::

    y = base(x);   y[rows of a] += term_a(x[rows of a])   for every adapter a named in the batch

The base GEMM runs once for the whole batch; each adapter's term runs on its rows only, through the unfused path
(low-rank factors and ``x·Sᵀ``), as folding ``S`` into ``W0`` would need one transient weight per adapter.
"""

from __future__ import annotations

from contextlib import contextmanager
from functools import partial
from typing import Any, Iterator, Optional, Sequence

import torch
from torch import nn

from .._peft_compat import AuxiliaryTrainingWrapper, ModulesToSaveWrapper, head_for_adapter

__all__ = ["BASE_ROWS", "adapter_names_hooks", "mixed_batch_forward"]

#: the name PEFT uses for rows that run on the base model alone
BASE_ROWS = "__base__"


def _inject_names(module, args, kwargs, adapter_names):
    kwargs["adapter_names"] = adapter_names
    return args, kwargs


def _encoder_of(model: nn.Module) -> Optional[nn.Module]:
    """The encoder of an encoder-decoder model (its inputs are not repeated by beam search), else None."""
    get_encoder = getattr(model, "get_encoder", None)
    encoder = get_encoder() if callable(get_encoder) else None
    return None if encoder is model else encoder  # transformers 5 returns the model itself when it has no encoder


def _check_names(model: nn.Module, layer_cls: type, adapter_names: Sequence[str]) -> None:
    """Refuse names that no adapter layer has (a typo would otherwise run those rows on the base model)."""
    if isinstance(adapter_names, str) or not isinstance(adapter_names, (list, tuple)):
        raise TypeError(
            f"adapter_names must be a list with one adapter name per row of the batch (or '{BASE_ROWS}' for the base "
            f"model), got {type(adapter_names).__name__}: {adapter_names!r}."
        )
    known: set[str] = set()
    for module in model.modules():
        if isinstance(module, layer_cls):
            known |= set(module._main_container.keys())
    unknown = sorted({n for n in adapter_names if n != BASE_ROWS} - known)
    if unknown:
        raise ValueError(
            f"adapter_names names adapter(s) this model does not have: {', '.join(map(repr, unknown))}. Loaded "
            f"adapters: {', '.join(map(repr, sorted(known)))}; '{BASE_ROWS}' runs a row on the base model. Fix: load "
            "the adapter first (load_adapter / add_adapter) or correct the name."
        )


@contextmanager
def adapter_names_hooks(model: nn.Module, layer_cls: type, adapter_names: Optional[Sequence[str]], training: bool,
                        num_beams: Any = None) -> Iterator[None]:
    """While active, every ``layer_cls`` layer and ``modules_to_save`` head of ``model`` runs each row with its
    adapter in ``adapter_names``.

    Args:
        model: the tuner's model (``DeltaModel.model``).
        layer_cls: the tuner's layer class.
        adapter_names: one name per row of the batch; None does nothing.
        training: whether the model is in training mode (refused: each row's gradient would reach only its adapter,
            which PEFT does not support either).
        num_beams: ``generate``'s beam count; beam search repeats every row ``num_beams`` times, so the names are
            repeated alike (not for an encoder's inputs, which are not repeated).
    """
    if adapter_names is None:
        yield
        return
    if training:
        raise ValueError(
            "adapter_names (one adapter per row) is for inference, but the model is in training mode. Fix: call "
            "model.eval() first, or train each adapter on its own batches with set_adapter."
        )
    _check_names(model, layer_cls, adapter_names)
    names = list(adapter_names)
    repeated = [n for n in names for _ in range(num_beams)] if isinstance(num_beams, int) and num_beams > 1 else names
    encoder = _encoder_of(model) if repeated is not names else None
    in_encoder = set(encoder.modules()) if encoder is not None else set()
    handles, heads = [], []
    try:
        for module in model.modules():
            rows = names if module in in_encoder else repeated
            if isinstance(module, ModulesToSaveWrapper):
                module.forward = partial(_mixed_head_forward, module, rows)  # an instance attribute, deleted below
                heads.append(module)
            elif isinstance(module, (layer_cls, AuxiliaryTrainingWrapper)):
                hook = partial(_inject_names, adapter_names=rows)
                handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()
        for head in heads:
            del head.forward


def _mixed_head_forward(wrapper: nn.Module, adapter_names: Sequence[str], x: torch.Tensor, *args: Any,
                        **kwargs: Any) -> torch.Tensor:
    """A ``modules_to_save`` head on a mixed batch: each adapter's rows through its own copy of the head, the other
    rows through the original. PEFT's own wrapper does this only for plain ``Linear`` / ``Embedding`` / ``Conv``
    heads, so RoBERTa's classification head and BERT's pooler raised; any head whose first input and output are
    batch-first works here."""
    if wrapper.disable_adapters or not isinstance(x, torch.Tensor):
        return type(wrapper).forward(wrapper, x, *args, **kwargs)
    _check_rows(x, adapter_names)
    out = None
    for name in dict.fromkeys(adapter_names):
        rows = _rows_of(adapter_names, name, x.device)
        y = head_for_adapter(wrapper, name)(x.index_select(0, rows), *args, **kwargs)
        if not isinstance(y, torch.Tensor) or y.shape[:1] != rows.shape:
            raise TypeError(
                f"{type(wrapper.original_module).__name__} in modules_to_save does not return one output row per "
                "input row, so adapter_names cannot mix adapters in its batch. Fix: run one adapter per batch "
                "(set_adapter)."
            )
        out = y.new_zeros((len(x),) + y.shape[1:]) if out is None else out
        out = out.index_copy(0, rows, y)
    return out


def _check_rows(x: torch.Tensor, adapter_names: Sequence[str]) -> None:
    if len(x) != len(adapter_names):
        raise ValueError(
            f"adapter_names has {len(adapter_names)} names but the batch has {len(x)} rows: pass one adapter name "
            f"per row ('{BASE_ROWS}' for the base model)."
        )


def _rows_of(adapter_names: Sequence[str], name: str, device: torch.device) -> torch.Tensor:
    return torch.tensor([i for i, n in enumerate(adapter_names) if n == name], device=device)


def mixed_batch_forward(layer, x: torch.Tensor, adapter_names: Sequence[str], *args: Any, **kwargs: Any) -> torch.Tensor:
    """``layer``'s output for a batch whose row ``i`` uses adapter ``adapter_names[i]`` (``'__base__'``: none).

    ``x``: ``(batch, ..., in_features)`` -> ``(batch, ..., out_features)``. An adapter this layer does not have adds
    nothing to its rows (the adapter may target other modules).
    """
    _check_rows(x, adapter_names)
    if layer.merged:
        raise ValueError(
            f"adapter_names cannot be used while adapters are merged into the base weights (merged: "
            f"{layer.merged_adapters}): every row would get them. Fix: model.unmerge_adapter() first."
        )
    result = layer.base_forward(x, *args, **kwargs)
    for name in dict.fromkeys(adapter_names):  # unique, in order of first appearance
        if name == BASE_ROWS or not layer.has_adapter(name):
            continue
        rows = _rows_of(adapter_names, name, x.device)
        delta = layer.adapter_forward(x.index_select(0, rows), name)
        if delta is not None:
            result = result.index_add(0, rows, delta.to(result.dtype))
    return result
