"""Inspection of an adapter folder: per-layer spectra, energy ranks and bytes, and their plot."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Union

import torch

from .folders import _lora_folder_targets, _lora_variant_fields, _read_adapter_folder, load_adapter_model
from .svd import (
    DEFAULT_OVERSAMPLING,
    DEFAULT_POWER_ITERS,
    DEFAULT_SEED,
    SqueezeError,
    _adapter_param,
    _operator_mode,
    delta_operator,
    frobenius_norm,
    randomized_svd,
    rank_for_energy,
    svd_of_product,
)
from .targets import _targets


def _energy_ranks(S: torch.Tensor, total: Optional[float], levels=(0.5, 0.9, 0.99)) -> dict:
    """``{"0.9": k, ...}``: the energy rank per level; ``None`` where the computed σ's do not reach it."""
    out = {}
    for level in levels:
        if total is None:
            out[str(level)] = None
            continue
        k = rank_for_energy(S, level, total)
        out[str(level)] = None if k > S.numel() else k
    return out


def _layer_bytes(state: dict, name: str) -> int:
    prefix = f"base_model.model.{name}."
    return sum(v.numel() * v.element_size() for k, v in state.items() if k.startswith(prefix))


def inspect_adapter(in_dir: Union[str, Path], base: Optional[Union[str, Path]] = None, top: int = 32,
                    oversampling: int = DEFAULT_OVERSAMPLING, power_iters: int = DEFAULT_POWER_ITERS,
                    seed: int = DEFAULT_SEED) -> dict:
    """Per-layer report of an adapter folder: shape, kind, rank, leading singular values, energy ranks, sparsity,
    bytes.

    Factored deltas (LoRA, SoRA, DyLoRA, NOLA) get their exact spectrum (all ``k`` values); a LoRA folder is read
    without a base model. Operator deltas (SLTrain, RandLoRA) get the leading ``top`` singular values by randomized
    SVD and ``‖ΔW‖_F`` from identity probes (see :func:`frobenius_norm`), so energy ranks up to ``top`` are exact
    and larger ones show as ``None``. ``energy_ranks[τ]`` is the smallest ``k`` with ``Σ_{i≤k} σᵢ² ≥ τ·‖ΔW‖_F²``.
    The delta is the one ``slpeft export`` writes: for an LQ-initialised adapter its change since its start
    (``lq_offset_subtracted``, factor rank ``k + r``; see :func:`squeeze_state`).
    """
    from safetensors.torch import load_file

    folder, cfg = _read_adapter_folder(in_dir)
    weights = folder / "adapter_model.safetensors"
    report = {"folder": str(folder), "peft_type": str(cfg["peft_type"]), "file_bytes": weights.stat().st_size,
              "base_model_name_or_path": cfg.get("base_model_name_or_path"), "layers": {}}
    if str(cfg["peft_type"]).upper() == "LORA":
        variants = _lora_variant_fields(cfg)
        if variants:
            raise SqueezeError(f"'{folder}' is a LoRA variant ({', '.join(variants)}); its ΔW is not scale·B·A.")
        state = load_file(str(weights))
        targets = _lora_folder_targets(cfg, state)
    else:
        from peft.utils import get_peft_model_state_dict

        model = load_adapter_model(folder, base)
        state = get_peft_model_state_dict(model)
        targets = _targets(model, "default", None)
    for t in targets:
        entry = {"shape": list(t.shape), "bytes": _layer_bytes(state, t.name), "sparse_nnz": None,
                 "sparse_density": None, "lq_offset_subtracted": t.minus_offset}
        if t.layer is None:
            U, S, Vh = svd_of_product(t.B, t.A, t.scale)
            total = float((S ** 2).sum())
            entry.update(kind="factored", rank=int(t.B.shape[1]), numerical_rank=int((S > S[0] * 1e-6).sum())
                         if S.numel() and S[0] > 0 else 0)
        else:
            layer = t.layer
            k = min(top, t.shape[0], t.shape[1])
            with _operator_mode(layer):
                matvec, rmatvec = delta_operator(layer, "default", t.offset)
                ref = _adapter_param(layer, "default")
                U, S, Vh = randomized_svd(matvec, rmatvec, (layer.out_features, layer.in_features), k,
                                          oversampling=oversampling, power_iters=power_iters, seed=seed,
                                          dtype=ref.dtype, device=ref.device)
            S = S[:k]
            total = frobenius_norm(layer, "default", offset=t.offset) ** 2
            entry.update(kind="operator", rank=None, numerical_rank=None)
            if layer.has_sparse("default"):
                nnz = int(getattr(layer, layer.sparse_values_attr)["default"].numel())
                entry.update(sparse_nnz=nnz, sparse_density=nnz / (t.shape[0] * t.shape[1]))
        entry["fro_norm"] = math.sqrt(total)
        entry["singular_values"] = [float(f"{v:.6g}") for v in S[:top].tolist()]
        entry["energy_ranks"] = _energy_ranks(S, total)
        report["layers"][t.name] = entry
    return report


def plot_spectra(report: dict, path: Union[str, Path]) -> Path:
    """Save a log-scale plot of every layer's singular values (from :func:`inspect_adapter`) to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, entry in report["layers"].items():
        sv = [v for v in entry["singular_values"] if v > 0]
        if sv:
            ax.semilogy(range(1, len(sv) + 1), sv, marker=".", linewidth=1, label=name)
    ax.set_xlabel("index i")
    ax.set_ylabel("singular value σᵢ of ΔW")
    ax.set_title(f"{report['peft_type']} adapter: {Path(report['folder']).name}")
    if len(report["layers"]) <= 12:
        ax.legend(fontsize=6)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
