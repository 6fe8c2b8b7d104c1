"""Validation helpers shared by the configs of every tuner (data checks only; no PEFT internals)."""

from __future__ import annotations

__all__ = ["check_positive_int", "check_target_options"]


def check_positive_int(config, field_name: str, hint: str = "") -> None:
    """Raise ``ValueError`` unless ``config.<field_name>`` is an int > 0."""
    value = getattr(config, field_name)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(
            f"{type(config).__name__}.{field_name}={value!r} must be a positive integer"
            + (f" ({hint})." if hint else ".")
            + f" Fix: pass {field_name}=<int > 0>."
        )


def check_target_options(config) -> None:
    """Normalise list-valued targeting fields to sets (as PEFT does) and check their combination."""
    for name in ("target_modules", "exclude_modules"):
        value = getattr(config, name, None)
        if isinstance(value, list):
            setattr(config, name, set(value))
    if getattr(config, "layers_pattern", None) and not getattr(config, "layers_to_transform", None):
        raise ValueError(
            f"{type(config).__name__}: layers_pattern={config.layers_pattern!r} is only used together with "
            "layers_to_transform. Fix: also pass layers_to_transform=[...], or drop layers_pattern."
        )
    if isinstance(getattr(config, "target_modules", None), str) and getattr(config, "layers_to_transform", None):
        raise ValueError(
            f"{type(config).__name__}: layers_to_transform cannot be combined with a regex target_modules string. "
            "Fix: pass target_modules as a list of names, or put the layer indices into the regex."
        )
