"""The basis record of a random-basis adapter: the integers each layer saves so a checkpoint is checked before loading.

NOLA and sparse RandLoRA train coefficients of frozen random bases that are regenerated from the config's seed, not
saved; coefficients mixed with other bases give wrong outputs without any error. So each layer saves a record (int64:
seed, sizes, the layer's shape, a checksum of the bases), and loading compares it with what the config regenerates.
:func:`read_record` checks the record is there and well formed, :func:`check_record` that the config and the layer
shape match it, :func:`bases_differ` words a checksum mismatch; each method decides what a checksum mismatch means
(NOLA may carry its bases in the checkpoint).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

__all__ = ["bases_differ", "check_record", "read_record"]


def read_record(state_dict: Mapping[str, torch.Tensor], key: str, record: str, fields: Sequence[str], layer: str,
                contents: str) -> dict[str, int]:
    """``{field: value}`` of the record saved under ``key`` (the tensor ``record`` of ``layer``); ``ValueError`` when
    it is missing or not ``len(fields)`` integers. ``contents`` says what it holds, for the message."""
    saved = state_dict.get(key)
    if saved is None:
        raise ValueError(
            f"layer '{layer}': the checkpoint has no basis record '{record}' ({contents}), so it cannot be checked "
            "against the bases this config regenerates. It was not written by this version of sparse_lowrank_peft "
            "or was edited. Fix: re-save it from the trained model."
        )
    if tuple(saved.shape) != (len(fields),) or saved.dtype.is_floating_point:
        raise ValueError(
            f"layer '{layer}': the checkpoint's {record} has shape {tuple(saved.shape)} and dtype {saved.dtype}; "
            f"expected {len(fields)} integers {tuple(fields)}. The checkpoint is corrupted: re-save it from the "
            "trained model."
        )
    return dict(zip(fields, (int(v) for v in saved)))


def check_record(layer: str, got: Mapping[str, int], want: Mapping[str, int], config_fields: Mapping[str, tuple],
                 config_class: str, trained: str) -> None:
    """``ValueError`` unless the saved record ``got`` matches the regenerated ``want`` in every config field and in
    the layer's shape (``out_features`` / ``in_features``).

    Args:
        config_fields: record field -> ``(config field, scale)``; the message shows ``value / scale`` (a density
            saved in parts per million is shown as a fraction).
        config_class: the config's class name, for the message.
        trained: what was trained on the bases (``"coefficients"``, ``"scalings"``), for the message.
    """
    for field_name, (config_name, scale) in config_fields.items():
        if got[field_name] != want[field_name]:
            saved, configured = _shown(got[field_name], scale), _shown(want[field_name], scale)
            raise ValueError(
                f"layer '{layer}': the checkpoint was trained on the random bases of {config_name}={saved}, but its "
                f"config says {config_class}.{config_name}={configured}: its {trained} would be applied to other "
                f"bases and give wrong outputs. Fix: set {config_name}={saved} in adapter_config.json (or load it "
                "with the config it was saved with)."
            )
    if (got["out_features"], got["in_features"]) != (want["out_features"], want["in_features"]):
        raise ValueError(
            f"layer '{layer}': the checkpoint was trained on a {got['out_features']}x{got['in_features']} layer, but "
            f"this model's layer is {want['out_features']}x{want['in_features']}: its {trained} only mean something "
            "with the bases of the shape they were trained on. Fix: load the adapter on the base model it was "
            "trained on."
        )


def bases_differ(layer: str, got: Mapping[str, int], want: Mapping[str, int], fix: str) -> ValueError:
    """The error for a checksum mismatch: the same seed regenerated other bases (another torch, or an edit)."""
    return ValueError(
        f"layer '{layer}': the random bases regenerated from basis_seed={want['basis_seed']} differ from the ones the "
        f"adapter was trained with (checksum {want['checksum']} vs {got['checksum']}): this torch draws other numbers "
        f"from the same seed, or the checkpoint was edited. Fix: {fix}"
    )


def _shown(value: int, scale) -> float | int:
    return value if scale == 1 else value / scale
