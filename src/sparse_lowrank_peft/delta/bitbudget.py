"""Bit budgets: LQ-LoRA's mixed quantization configurations under a memory budget.

LQ-LoRA (Guo et al., ICLR 2024, Section 3.3) does not quantize every matrix the same way: it measures, for each
matrix and each candidate configuration ``c`` (bit width, group size), the error of the decomposition
``W ≈ Q_c + L`` at the adapter's rank, and picks one configuration per matrix with an integer linear program so that
the whole model meets an average bit budget::

    minimise  Σ_l Σ_c e[l, c] · x[l, c]
    s.t.      Σ_c x[l, c] = 1                          (one configuration per matrix)
              Σ_l Σ_c bits[l, c] · x[l, c] ≤ B · Σ_l numel_l     (B: the average bits per parameter)
              x ∈ {0, 1}

with ``e[l, c] = ‖W_l − Q_c − L‖²_F`` (optionally Fisher-weighted, ``delta.quant.fisher_row_col_weights``) and
``bits[l, c]`` counted from the tensors the library stores for that matrix (codes, scales, zeros, their dtypes, the
constant tables it saves), not from a formula. The paper solves it with Gurobi; here ``scipy.optimize.milp``
(HiGHS). The errors are measured once (:func:`measure`) and any number of budgets solved from them (:func:`solve`).

The quantizers are real libraries: HQQ (``hqq``: 2, 3, 4, 8 bits, group sizes 32 / 64 / 128, fp32 scale and zero
per group) and bitsandbytes (NF4, with and without double quantization of the absmax). Nothing here packs bits.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence

import torch
from torch import nn

__all__ = [
    "CANDIDATES", "QuantChoice", "PlanTable", "apply_plan", "measure", "parse_choice", "plan_summary", "solve",
    "storage_bits", "uniform_points",
]


@dataclass(frozen=True)
class QuantChoice:
    """One quantization configuration of a matrix: ``library`` ``"hqq"`` (``bits`` 2/3/4/8, ``group_size``) or
    ``"bnb"`` (NF4 in blocks of 64; ``double_quant`` quantizes the absmax too). ``name`` is its plan spelling."""

    library: str
    bits: int
    group_size: int = 64
    double_quant: bool = False

    @property
    def name(self) -> str:
        if self.library == "bnb":
            return "bnb-nf4-dq" if self.double_quant else "bnb-nf4"
        return f"hqq-{self.bits}bit-g{self.group_size}"

    def unsupported(self, shape: tuple[int, int]) -> Optional[str]:
        """Why the library cannot quantize an ``(out, in)`` weight this way, or None if it can."""
        numel = int(shape[0]) * int(shape[1])
        if self.library == "hqq" and numel % self.group_size:
            return f"HQQ needs the weight's size ({shape[0]}x{shape[1]} = {numel}) divisible by the group size {self.group_size}"
        return None

    def quantize(self, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> nn.Module:
        """A quantized linear layer holding ``weight`` (``(out, in)``) and ``bias``, on the CPU in fp32 compute."""
        out_features, in_features = weight.shape
        linear = nn.Linear(in_features, out_features, bias=bias is not None)
        with torch.no_grad():
            linear.weight.copy_(weight.detach().to("cpu", torch.float32))
            if bias is not None:
                linear.bias.copy_(bias.detach().to("cpu", torch.float32))
        if self.library == "bnb":
            from .quant import to_linear4bit

            return to_linear4bit(linear, quant_type="nf4", compress_statistics=self.double_quant)
        from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

        # HQQ stores each group's scale and zero in its compute dtype: quantized with fp16 (the format counted by
        # storage_bits: 2 x 16 bits a group, against 2 x 32 in fp32, i.e. 2.5 instead of 3.0 bits at 2-bit g64), then
        # computed in fp32 with those same values (upcast exactly), like an fp32 model's other layers.
        config = BaseQuantizeConfig(nbits=self.bits, group_size=self.group_size)
        layer = HQQLinear(linear, quant_config=config, compute_dtype=torch.float16, device="cpu", del_orig=True)
        layer._slpeft_storage_bits = storage_bits(layer)
        for key in ("scale", "zero"):
            layer.meta[key] = layer.meta[key].to(torch.float32)
        layer.meta["compute_dtype"] = torch.float32
        layer.compute_dtype = torch.float32
        if layer.bias is not None:
            layer.bias = nn.Parameter(layer.bias.detach().to(torch.float32), requires_grad=False)
        return layer

    def quantize_dequantize(self, weight: torch.Tensor) -> torch.Tensor:
        from .quant import dequantize_weight

        return dequantize_weight(self.quantize(weight))


_CHOICE_RE = re.compile(r"^(?:hqq-(\d+)bit-g(\d+)|bnb-nf4(-dq)?)$")
HQQ_BITS = (2, 3, 4, 8)
HQQ_GROUPS = (32, 64, 128)
#: the default candidates: HQQ at 2/3/4/8 bits x groups 32/64/128, and bitsandbytes NF4 with and without double quant
CANDIDATES: tuple[QuantChoice, ...] = tuple(
    [QuantChoice("hqq", b, g) for b in HQQ_BITS for g in HQQ_GROUPS]
    + [QuantChoice("bnb", 4, 64, False), QuantChoice("bnb", 4, 64, True)]
)


def parse_choice(name: str) -> QuantChoice:
    """The :class:`QuantChoice` a plan spells ``name`` (``"hqq-3bit-g64"``, ``"bnb-nf4"``, ``"bnb-nf4-dq"``); raises
    ``ValueError`` naming the valid spellings, or ``ImportError`` if the library for it is not installed."""
    match = _CHOICE_RE.match(str(name))
    if not match:
        raise ValueError(
            f"quantization configuration {name!r} is not one this package knows. Valid: 'hqq-<bits>bit-g<group>' with "
            f"bits in {HQQ_BITS} (e.g. 'hqq-3bit-g64'), 'bnb-nf4', 'bnb-nf4-dq'."
        )
    if match.group(1):
        bits, group = int(match.group(1)), int(match.group(2))
        if bits not in HQQ_BITS or group <= 0 or group & (group - 1):
            raise ValueError(
                f"quantization configuration {name!r}: HQQ takes bits in {HQQ_BITS} and a power-of-two group size "
                "(e.g. 32, 64, 128). Fix: e.g. 'hqq-3bit-g64'."
            )
        _require("hqq", "pip install hqq")
        return QuantChoice("hqq", bits, group)
    _require("bitsandbytes", "pip install 'sparse-lowrank-peft[bnb]'")
    return QuantChoice("bnb", 4, 64, bool(match.group(3)))


def _require(module: str, fix: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise ImportError(f"this quantization configuration needs the '{module}' package, which is not installed. "
                          f"Fix: {fix}.")


def storage_bits(module: nn.Module) -> int:
    """Bits the library stores for ``module``'s weight: every tensor of its state dict but the bias (codes, scales,
    zeros, absmax, code tables, metadata), at its dtype's size (for an HQQ layer of :class:`QuantChoice`: as
    quantized, with fp16 scales and zeros)."""
    recorded = getattr(module, "_slpeft_storage_bits", None)
    if recorded is not None:
        return int(recorded)
    total = 0
    for key, value in module.state_dict().items():
        if key == "bias" or key.endswith(".bias") or not isinstance(value, torch.Tensor):
            continue
        total += value.numel() * value.element_size() * 8
    return total


@dataclass
class PlanTable:
    """The measurement pass: per layer (module name) its parameter count and, per choice name, the LQ error
    ``‖W − Q − L‖²_F`` (Fisher-weighted if measured so), the relative error ``‖W − Q − L‖_F / ‖W‖_F`` and the
    stored bits."""

    numel: dict[str, int]
    error: dict[str, dict[str, float]]
    relative: dict[str, dict[str, float]]
    bits: dict[str, dict[str, int]]
    rank: int

    def choices(self) -> list[str]:
        return sorted({c for per in self.error.values() for c in per})

    def to_dict(self) -> dict:
        return {"rank": self.rank, "numel": self.numel, "error": self.error, "relative": self.relative,
                "bits": self.bits}

    @classmethod
    def from_dict(cls, data: dict) -> "PlanTable":
        return cls(numel=data["numel"], error=data["error"], relative=data["relative"], bits=data["bits"],
                   rank=data["rank"])


def measure(
    weights: dict[str, torch.Tensor],
    rank: int,
    choices: Sequence[QuantChoice] = CANDIDATES,
    fisher: Optional[dict[str, tuple[torch.Tensor, torch.Tensor]]] = None,
    max_iter: int = 3,
    progress: Optional[Callable[[str], None]] = None,
    lq_layers: Optional[Iterable[str]] = None,
) -> PlanTable:
    """Run the LQ decomposition of every weight under every choice (``max_iter`` alternations; the first is
    LoftQ's pass) and record its error and the choice's stored bits (see :class:`PlanTable`).

    ``lq_layers``: the weights an adapter will start from ``L`` (its targets); the others are measured as they will
    be used, quantized alone (``‖W − Q‖²``). Default: every weight gets ``L``.
    """
    from .quant import lq_decompose

    lq = None if lq_layers is None else set(lq_layers)

    table = PlanTable(numel={}, error={}, relative={}, bits={}, rank=rank)
    for name, W in weights.items():
        W = W.detach().to("cpu", torch.float32)
        table.numel[name] = W.numel()
        table.error[name], table.relative[name], table.bits[name] = {}, {}, {}
        for choice in choices:
            if choice.unsupported(tuple(W.shape)):
                continue  # not a candidate for this matrix (the program never picks it)
            if lq is None or name in lq:
                result = lq_decompose(W, rank, max_iter=max_iter, fisher=None if fisher is None else fisher.get(name),
                                      quantizer=choice.quantize_dequantize)
                residual, relative = W - result.Q - result.B @ result.A, result.error
            else:
                residual = W - choice.quantize_dequantize(W)
                relative = float(residual.norm() / W.norm().clamp_min(1e-30))
            if fisher is not None and name in fisher:
                d_row, d_col = (t.to(torch.float32).clamp_min(1e-8).sqrt() for t in fisher[name])
                residual = d_row[:, None] * residual * d_col[None, :]
            table.error[name][choice.name] = float(residual.square().sum())
            table.relative[name][choice.name] = relative
            table.bits[name][choice.name] = storage_bits(choice.quantize(W))
        if progress is not None:
            progress(name)
    return table


def solve(table: PlanTable, budget_bits: float, choices: Optional[Iterable[str]] = None) -> dict[str, str]:
    """The plan ``{layer: choice name}`` of least summed error whose average stored bits per parameter is at most
    ``budget_bits`` (``scipy.optimize.milp``). Raises ``ValueError`` if no plan fits the budget."""
    import numpy as np
    from scipy.optimize import Bounds, LinearConstraint, milp

    layers = list(table.numel)
    names = list(choices) if choices is not None else table.choices()
    if not layers or not names:
        raise ValueError("solve: the measurement table is empty. Fix: run bitbudget.measure on the model's linears.")
    total = sum(table.numel.values())
    missing = [l for l in layers if not any(c in table.bits[l] for c in names)]
    if missing:
        raise ValueError(f"solve: no candidate configuration can quantize {missing[:3]}. Fix: add one that can.")
    smallest = sum(min(table.bits[l][c] for c in names if c in table.bits[l]) for l in layers) / total
    if budget_bits < smallest - 1e-9:
        raise ValueError(
            f"budget_bits={budget_bits} is below the smallest plan these configurations allow ({smallest:.3f} bits per "
            f"parameter, every matrix at its cheapest of {names}). Fix: a budget of at least {smallest:.3f}, or "
            "cheaper candidates."
        )
    pairs = [(l, c) for l in layers for c in names if c in table.bits[l]]
    scale = max(max(table.error[l][c] for l, c in pairs), 1e-30)  # HiGHS prefers O(1) objective coefficients
    cost = np.array([table.error[l][c] / scale for l, c in pairs])
    one_each = np.zeros((len(layers), len(pairs)))
    for j, (l, _) in enumerate(pairs):
        one_each[layers.index(l), j] = 1.0
    bits_row = np.array([[table.bits[l][c] for l, c in pairs]], dtype=float)
    result = milp(
        cost, integrality=np.ones(len(pairs)), bounds=Bounds(0, 1),
        constraints=[LinearConstraint(one_each, 1, 1), LinearConstraint(bits_row, -np.inf, budget_bits * total)],
    )
    if not result.success:
        raise ValueError(f"solve: the integer program found no plan for budget_bits={budget_bits}: {result.message}")
    chosen = [pairs[j] for j in np.flatnonzero(result.x > 0.5)]
    return {l: c for l, c in chosen}


def plan_summary(table: PlanTable, plan: dict[str, str]) -> dict:
    """Average stored bits per parameter and summed error of ``plan``."""
    total = sum(table.numel.values())
    return {
        "bits_per_param": sum(table.bits[l][c] for l, c in plan.items()) / total,
        "error": sum(table.error[l][c] for l, c in plan.items()),
    }


def apply_plan(model: nn.Module, plan: dict[str, str]) -> int:
    """Quantize, in place, every plain ``nn.Linear`` of ``model`` that ``plan`` names (exact name or dotted suffix)
    with its configuration, keeping its bias and train/eval mode (an LQ adapter's bases are no longer plain linears
    and are left alone); returns how many."""
    count = 0
    for name, module in list(model.named_modules()):
        key = next((k for k in plan if name == k or name.endswith("." + k)), None)
        if key is None or type(module) is not nn.Linear:
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, parse_choice(plan[key]).quantize(module.weight, module.bias).train(module.training))
        count += 1
    return count


def uniform_points(table: PlanTable) -> list[dict]:
    """Every candidate used for all matrices: its average bits and summed error."""
    return [{"choice": c, **plan_summary(table, {l: c for l in table.numel})} for c in table.choices()
            if all(c in table.bits[l] for l in table.numel)]
