"""Bit budgets: LQ-LoRA's mixed quantization configurations under a memory budget.

LQ-LoRA (Guo et al., ICLR 2024, Section 3.3) does not quantize every matrix the same way: it measures, for each
matrix and each candidate configuration ``c`` (bit width, group size), the error of the decomposition
``W ≈ Q_c + L`` at the adapter's rank, and picks one configuration per matrix with an integer linear program so that
the whole model meets an average bit budget::

    minimise  Σ_l Σ_c e[l, c] · x[l, c]
    s.t.      Σ_c x[l, c] = 1                          (one configuration per matrix)
              Σ_l Σ_c bits[l, c] · x[l, c] ≤ B · Σ_l numel_l     (B: the average bits per parameter)
              x ∈ {0, 1}

with ``e[l, c] = ‖W_l − Q_c − L‖²_F`` (optionally Fisher-weighted, ``delta.fisher.fisher_row_col_weights``) and
``bits[l, c]`` counted from the tensors the library stores for that matrix (codes, scales, zeros, their dtypes, the
constant tables it saves), not from a formula. The paper solves it with Gurobi; here ``scipy.optimize.milp``
(HiGHS). The errors are measured once (:func:`measure`) and any number of budgets solved from them (:func:`solve`).

The quantizers are real libraries: HQQ (``hqq``: 2, 3, 4, 8 bits, group sizes 32 / 64 / 128, fp32 scale and zero
per group) and bitsandbytes (NF4, with and without double quantization of the absmax). Nothing here packs bits.
"""

from __future__ import annotations

import contextlib
import functools
import math
import re
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence

import torch
from torch import nn

from .lq_checks import plan_key

__all__ = [
    "CANDIDATES", "QuantChoice", "PlanTable", "apply_plan", "measure", "measure_output", "output_change",
    "parse_choice", "plan_summary", "solve",
    "storage_bits", "uniform_points",
]


@dataclass(frozen=True)
class QuantChoice:
    """One quantization configuration of a matrix: ``library`` ``"hqq"`` (``bits`` 2/3/4/8, ``group_size``) or
    ``"bnb"`` (``quant_type`` NF4 or FP4 in blocks of 64; ``double_quant`` quantizes the absmax too). ``name`` is its
    plan spelling."""

    library: str
    bits: int
    group_size: int = 64
    double_quant: bool = False
    quant_type: str = "nf4"

    @property
    def name(self) -> str:
        if self.library == "bnb":
            return f"bnb-{self.quant_type}" + ("-dq" if self.double_quant else "")
        return f"hqq-{self.bits}bit-g{self.group_size}"

    def unsupported(self, shape: tuple[int, int]) -> Optional[str]:
        """Why the library cannot quantize an ``(out, in)`` weight this way, or None if it can."""
        numel = int(shape[0]) * int(shape[1])
        if self.library != "hqq":
            return None
        if numel % self.group_size:
            return f"HQQ needs the weight's size ({shape[0]}x{shape[1]} = {numel}) divisible by the group size {self.group_size}"
        per_byte = _HQQ_VALUES_PER_PACKED_ROW.get(self.bits, 1)
        if (numel // self.group_size) % per_byte:
            return (f"HQQ packs {per_byte} groups' {self.bits}-bit codes together, so the weight's number of groups "
                    f"({shape[0]}x{shape[1]} / {self.group_size} = {numel // self.group_size}) must be divisible by "
                    f"{per_byte}")
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

            return to_linear4bit(linear, quant_type=self.quant_type, compress_statistics=self.double_quant)
        from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

        # HQQ stores each group's scale and zero in its compute dtype: quantized with fp16 (the format counted by
        # storage_bits: 2 x 16 bits a group, against 2 x 32 in fp32, i.e. 2.5 instead of 3.0 bits at 2-bit g64), then
        # computed in fp32 with those same values (upcast exactly), like an fp32 model's other layers.
        config = BaseQuantizeConfig(nbits=self.bits, group_size=self.group_size)
        with _one_thread():
            layer = _movable(HQQLinear)(linear, quant_config=config, compute_dtype=torch.float16, device="cpu",
                                        del_orig=True)
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


@functools.lru_cache(maxsize=None)
def _movable(hqq_linear: type) -> type:
    """``HQQLinear`` whose scales and zeros follow ``model.to(device)``. hqq 0.2.8 keeps them in the layer's ``meta``
    dict, which ``nn.Module._apply`` does not see, and its own ``to()`` / ``cpu()`` return the layer unchanged: a
    model moved to a GPU had its codes there and its scales on the CPU. Here every move applies to them too, on the
    device only (they stay fp32, the compute dtype :meth:`QuantChoice.quantize` sets)."""

    class HQQLinear(hqq_linear):  # HQQ's own class name: reports and tools tell base layers apart by it
        def _apply(self, fn, *args, **kwargs):
            super()._apply(fn, *args, **kwargs)
            for key in ("scale", "zero"):
                value = self.meta.get(key)
                if isinstance(value, torch.Tensor):
                    self.meta[key] = value.to(fn(value.reshape(-1)[:1]).device)
            return self

        def to(self, *args, **kwargs):
            return nn.Module.to(self, *args, **kwargs)

        def cpu(self):
            return nn.Module.cpu(self)

    return HQQLinear


@contextlib.contextmanager
def _one_thread():
    """Run HQQ's quantizer on one thread, so the codes it picks do not depend on the machine. Its optimizer's sums
    follow the thread count: a 384x1536 Gaussian weight (seed 5) got different 4-bit g64 codes in one group of 64
    at 1 and at 2 threads, and a plan's base is re-derived when its adapter loads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


#: HQQ's bit packing (hqq.core.bitpack) stacks this many rows of codes (one row per group) into one stored row and
#: does not pad them: 2-bit into a uint8 (4 rows), 4-bit into a uint8 (2 rows). 3-bit (10 rows in an int32) pads.
_HQQ_VALUES_PER_PACKED_ROW = {2: 4, 4: 2}

_CHOICE_RE = re.compile(r"^(?:hqq-(\d+)bit-g(\d+)|bnb-(nf4|fp4)(-dq)?)$")
HQQ_BITS = (2, 3, 4, 8)
HQQ_GROUPS = (32, 64, 128)
#: the default candidates: HQQ at 2/3/4/8 bits x groups 32/64/128, and bitsandbytes NF4 with and without double
#: quant. FP4 ('bnb-fp4', 'bnb-fp4-dq') is accepted in a plan (a GLUE run's ``quantize: fp4`` is one) but not a default
#: candidate: it stores the same bits as NF4 with a larger error (QLoRA, arXiv 2305.14314, Table 2).
CANDIDATES: tuple[QuantChoice, ...] = tuple(
    [QuantChoice("hqq", b, g) for b in HQQ_BITS for g in HQQ_GROUPS]
    + [QuantChoice("bnb", 4, 64, False), QuantChoice("bnb", 4, 64, True)]
)


def parse_choice(name: str) -> QuantChoice:
    """The :class:`QuantChoice` a plan spells ``name`` (``"hqq-3bit-g64"``, ``"bnb-nf4"``, ``"bnb-nf4-dq"``,
    ``"bnb-fp4"``, ``"bnb-fp4-dq"``); raises
    ``ValueError`` naming the valid spellings, or ``ImportError`` if the library for it is not installed."""
    match = _CHOICE_RE.match(str(name))
    if not match:
        raise ValueError(
            f"quantization configuration {name!r} is not one this package knows. Valid: 'hqq-<bits>bit-g<group>' with "
            f"bits in {HQQ_BITS} (e.g. 'hqq-3bit-g64'), 'bnb-nf4', 'bnb-nf4-dq', 'bnb-fp4', 'bnb-fp4-dq'."
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
    return QuantChoice("bnb", 4, 64, bool(match.group(4)), match.group(3))


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
    """The measurement pass: per layer (module name) its parameter count and, per choice name, the error the program
    minimises, the relative weight error ``‖W − Q − L‖_F / ‖W‖_F`` and the stored bits. ``objective`` says what the
    error is: ``"weight"``, the LQ error ``‖W − Q − L‖²_F`` (Fisher-weighted if measured so; :func:`measure`), or
    ``"output"``, the relative change of the model's output (:func:`measure_output`)."""

    numel: dict[str, int]
    error: dict[str, dict[str, float]]
    relative: dict[str, dict[str, float]]
    bits: dict[str, dict[str, int]]
    rank: int
    objective: str = "weight"

    def add_layer(self, name: str, numel: int) -> None:
        self.numel[name] = numel
        for field in (self.error, self.relative, self.bits):
            field[name] = {}

    def record(self, name: str, choice: QuantChoice, error: float, relative: float, W: torch.Tensor) -> None:
        """Store one (layer, choice) measurement: its error, relative weight error and stored bits."""
        for field, value in ((self.error, error), (self.relative, relative),
                             (self.bits, storage_bits(choice.quantize(W)))):
            field[name][choice.name] = value

    def choices(self) -> list[str]:
        return sorted({c for per in self.error.values() for c in per})

    def to_dict(self) -> dict:
        return {"rank": self.rank, "numel": self.numel, "error": self.error, "relative": self.relative,
                "bits": self.bits, "objective": self.objective}

    @classmethod
    def from_dict(cls, data: dict) -> "PlanTable":
        return cls(numel=data["numel"], error=data["error"], relative=data["relative"], bits=data["bits"],
                   rank=data["rank"], objective=data.get("objective", "weight"))


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
    lq = None if lq_layers is None else set(lq_layers)
    table = PlanTable(numel={}, error={}, relative={}, bits={}, rank=rank)
    for name, W in weights.items():
        W = W.detach().to("cpu", torch.float32)
        row_col = None if fisher is None else fisher.get(name)  # this layer's Fisher row / column weights
        table.add_layer(name, W.numel())
        for choice in _supported(choices, W):
            W_hat, relative = _reconstruct(W, choice, rank, max_iter, lq is None or name in lq, row_col)
            residual = W - W_hat
            if row_col is not None:
                d_row, d_col = (t.to(torch.float32).clamp_min(1e-8).sqrt() for t in row_col)
                residual = d_row[:, None] * residual * d_col[None, :]
            table.record(name, choice, float(residual.square().sum()), relative, W)
        if progress is not None:
            progress(name)
    return table


def measure_output(
    model: nn.Module,
    batches: Sequence[dict],
    names: Sequence[str],
    rank: int,
    choices: Sequence[QuantChoice] = CANDIDATES,
    max_iter: int = 3,
    progress: Optional[Callable[[str], None]] = None,
    lq_layers: Optional[Iterable[str]] = None,
) -> PlanTable:
    """Like :func:`measure`, but a (layer, choice)'s error is what it does to the model's output: the squared
    change of the last hidden state over the real tokens of ``batches`` when that layer alone holds ``Q + L``
    (every other layer in full precision), relative to the squared norm of the full-precision output::

        e[l, c] = Σ_batches ‖H(W_l → Q_c + L) − H‖²_F / Σ_batches ‖H‖²_F

    The program then minimises the summed output change, a first-order (additive) model of the whole plan's. On
    MiniLM the weight error ``‖W − Q − L‖²`` treats a 2-bit query matrix and a 2-bit FFN input matrix of one layer
    about alike (relative 0.41 vs 0.44); their effect on the output differs 10-44x
    (bench/results/bitbudget-minilm-qv-output.json). ``model`` is any
    Hugging Face model returning ``hidden_states``; ``names`` its ``nn.Linear`` modules to plan. Weights are
    restored after each measurement (also on error)."""
    lq = None if lq_layers is None else set(lq_layers)
    reference = _last_hidden_states(model, batches)
    norm2 = sum(float(h.square().sum()) for h in reference)
    table = PlanTable(numel={}, error={}, relative={}, bits={}, rank=rank, objective="output")
    for name in names:
        weight = model.get_submodule(name).weight
        W = weight.detach().to("cpu", torch.float32).clone()
        table.add_layer(name, W.numel())
        for choice in _supported(choices, W):
            W_hat, relative = _reconstruct(W, choice, rank, max_iter, lq is None or name in lq, None)
            try:
                with torch.no_grad():
                    weight.copy_(W_hat)
                changed = _last_hidden_states(model, batches)
            finally:
                with torch.no_grad():
                    weight.copy_(W)
            error = sum(float((h - h0).square().sum()) for h, h0 in zip(changed, reference)) / norm2
            table.record(name, choice, error, relative, W)
        if progress is not None:
            progress(name)
    return table


def output_change(model: nn.Module, batches: Sequence[dict], plan: dict[str, str], rank: int, max_iter: int = 3,
                  lq_layers: Optional[Iterable[str]] = None) -> float:
    """Relative change ``‖H_plan − H‖_F / ‖H‖_F`` of the model's last hidden state (real tokens of ``batches``) when
    every layer of ``plan`` holds its configuration's ``Q`` (+ the LQ ``L`` on ``lq_layers``; default all) at once:
    what a whole plan does to the model, measured rather than summed. Weights are restored (also on error)."""
    lq = None if lq_layers is None else set(lq_layers)
    reference = _last_hidden_states(model, batches)
    weights = {n: model.get_submodule(n).weight for n in plan}
    originals = {n: w.detach().clone() for n, w in weights.items()}
    try:
        with torch.no_grad():
            for n, choice in plan.items():
                W = originals[n].to("cpu", torch.float32)
                weights[n].copy_(_reconstruct(W, parse_choice(choice), rank, max_iter, lq is None or n in lq, None)[0])
        changed = _last_hidden_states(model, batches)
    finally:
        with torch.no_grad():
            for n, W in originals.items():
                weights[n].copy_(W)
    num = sum(float((h - r).square().sum()) for h, r in zip(changed, reference))
    return (num / max(sum(float(r.square().sum()) for r in reference), 1e-30)) ** 0.5


def _supported(choices: Sequence[QuantChoice], W: torch.Tensor) -> list[QuantChoice]:
    """The choices the library can apply to ``W`` (the program never picks the others)."""
    return [c for c in choices if not c.unsupported(tuple(W.shape))]


def _reconstruct(W: torch.Tensor, choice: QuantChoice, rank: int, max_iter: int, with_lq: bool,
                 fisher: Optional[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, float]:
    """What the base (and, ``with_lq``, the adapter's initial ``L``) reproduce of ``W`` under ``choice``, and the
    relative error ``‖W − Ŵ‖ / ‖W‖``."""
    if with_lq:
        from .quant import lq_decompose

        result = lq_decompose(W, rank, max_iter=max_iter, fisher=fisher, quantizer=choice.quantize_dequantize)
        return result.Q + result.B @ result.A, result.error
    W_hat = choice.quantize_dequantize(W)
    return W_hat, float((W - W_hat).norm() / W.norm().clamp_min(1e-30))


def _last_hidden_states(model: nn.Module, batches: Sequence[dict]) -> list[torch.Tensor]:
    """The model's last hidden state at each batch's real tokens (``attention_mask``), in eval mode, without
    gradients; the model's mode is restored."""
    was_training = model.training
    model.eval()
    out = []
    try:
        with torch.no_grad():
            for batch in batches:
                inputs = {k: v for k, v in batch.items() if k != "labels"}
                hidden = model(**inputs, output_hidden_states=True).hidden_states[-1]
                mask = inputs.get("attention_mask")
                out.append(hidden[mask.bool()] if mask is not None else hidden.reshape(-1, hidden.shape[-1]))
    finally:
        model.train(was_training)
    return out


def smallest_budget(table: PlanTable, choices: Optional[Iterable[str]] = None) -> float:
    """The average stored bits per parameter of the cheapest plan: every matrix at its cheapest of ``choices``
    (default: every measured configuration). A budget below it has no plan."""
    names = list(choices) if choices is not None else table.choices()
    total = sum(table.numel.values())
    return sum(min(table.bits[l][c] for c in names if c in table.bits[l]) for l in table.numel) / total


def solve(table: PlanTable, budget_bits: float, choices: Optional[Iterable[str]] = None) -> dict[str, str]:
    """The plan ``{layer: choice name}`` of least summed error whose average stored bits per parameter is at most
    ``budget_bits`` (``scipy.optimize.milp``). Raises ``ValueError`` if no plan fits the budget."""
    import numpy as np
    from scipy.optimize import Bounds, LinearConstraint, milp

    layers = list(table.numel)
    names = list(choices) if choices is not None else table.choices()
    if not layers or not names:
        raise ValueError("solve: the measurement table is empty. Fix: run bitbudget.measure on the model's linears.")
    if isinstance(budget_bits, bool) or not isinstance(budget_bits, (int, float)) or not 0 < budget_bits < math.inf:
        raise ValueError(f"solve: budget_bits={budget_bits!r} must be a positive number of bits per parameter.")
    unmeasured = [c for c in names if c not in table.choices()]
    if unmeasured:
        raise ValueError(f"solve: choices {unmeasured} were not measured in this table (it has {table.choices()}). "
                         "Fix: choose among those, or measure the others too.")
    total = sum(table.numel.values())
    missing = [l for l in layers if not any(c in table.bits[l] for c in names)]
    if missing:
        raise ValueError(f"solve: no candidate configuration can quantize {missing[:3]}. Fix: add one that can.")
    smallest = smallest_budget(table, names)
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
    """Average stored bits per parameter and summed error of ``plan``, over the matrices it covers (which must be
    the table's with measured configurations)."""
    missing = [f"{l}: {c}" for l, c in plan.items() if c not in table.bits.get(l, {})]
    if missing:
        raise ValueError(f"plan_summary: the table has no measurement for {missing[:3]}. Fix: a plan of this table's "
                         "matrices and configurations (bitbudget.solve).")
    total = sum(table.numel[l] for l in plan)
    return {
        "bits_per_param": sum(table.bits[l][c] for l, c in plan.items()) / total,
        "error": sum(table.error[l][c] for l, c in plan.items()),
    }


def apply_plan(model: nn.Module, plan: dict[str, str]) -> int:
    """Quantize, in place, every plain ``nn.Linear`` of ``model`` that ``plan`` names (exact name or dotted suffix)
    with its configuration, keeping its bias and train/eval mode (an LQ adapter's bases are no longer plain linears
    and are left alone); returns how many. Its bitsandbytes layers keep the standard layout
    (``quant.keep_standard_layout``, not given back on unload: the plan's base computes the same on every CPU).
    A plan that names modules the model lacks, or a configuration the library cannot apply to a weight's shape, is
    refused before anything is quantized (``lq_checks.check_plan``)."""
    from .lq_checks import check_plan
    from .quant import keep_standard_layout

    check_plan(model, plan, (), "plan")
    count = 0
    for name, module in list(model.named_modules()):
        key = plan_key(plan, name)
        if key is None or type(module) is not nn.Linear:
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = parse_choice(plan[key]).quantize(module.weight, module.bias).train(module.training)
        if hasattr(layer, "support_avx512bf16_for_cpu"):  # a bitsandbytes layer
            keep_standard_layout(layer, give_back=False)
        setattr(parent, child, layer)
        count += 1
    return count


def uniform_points(table: PlanTable) -> list[dict]:
    """Every candidate used for all matrices: its average bits and summed error."""
    return [{"choice": c, **plan_summary(table, {l: c for l in table.numel})} for c in table.choices()
            if all(c in table.bits[l] for l in table.numel)]
