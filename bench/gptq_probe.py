"""Would data-aware rounding rescue a 2.75-bit MiniLM base? A probe for issue #21, not a feature.

HQQ (``delta/bitbudget.py``'s low-bit quantizer) picks each group's scale and zero and then rounds every weight to its
nearest code, minimising the *weight* error. GPTQ (Frantar et al., ICLR 2023, arXiv 2210.17323) keeps a grid and
instead rounds one input column at a time, pushing each column's rounding error onto the columns not yet rounded
through the inverse of the layer's input Gram matrix ``H = Σ x xᵀ``, so that the *output* error ``‖(W − Q) X‖`` is
small. This probe keeps HQQ's grid (its optimised scale and zero, stored in fp16 as a plan stores them) and replaces
only the rounding by GPTQ's, then measures what each base does to MiniLM's last hidden state::

    python bench/gptq_probe.py          # ~3 min on 1 thread; writes bench/results/gptq-probe-minilm.json

Calibration: the first 256 SST-2 training sentences (``$GLUE_DIR``, default ../shared/glue; padding excluded), the
change is measured on the next 128. As a GLUE run uses them, query/value start from LQ's ``Q + L`` (rank 8, 2
alternations; with GPTQ, ``L`` is the H-weighted best rank-8 fit of ``W − Q``) and the other linears are quantized
alone. No maintained library does this on our pins: llmcompressor 0.14 pins transformers <= 5.17 and GPTQModel 7.7
pulls a CUDA build of torch (``pip install --dry-run``, 2026-12-07).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _env import ROOT, provenance  # noqa: E402
from bitbudget import calibration_batches, minilm  # noqa: E402

from sparse_lowrank_peft.delta import bitbudget as bb  # noqa: E402
from sparse_lowrank_peft.delta.quant import lq_decompose  # noqa: E402

RANK, LQ_ITER, DAMP = 8, 2, 0.01  # DAMP: GPTQ's default dampening, 1% of the mean diagonal of H
LQ_TARGETS = ("query", "value")


def input_grams(model, names, batches) -> dict[str, torch.Tensor]:
    """``H = mean x xᵀ`` of each linear's input over the real tokens of ``batches`` (float64)."""
    grams, counts, hooks = {}, {}, []
    masks: list[torch.Tensor] = []

    def hook(name):
        def record(_module, inputs, _output):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1])[masks[-1]].double()
            grams[name] = grams.get(name, 0) + x.T @ x
            counts[name] = counts.get(name, 0) + x.shape[0]
        return record

    hooks = [model.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    try:
        with torch.no_grad():
            for batch in batches:
                masks.append(batch["attention_mask"].reshape(-1).bool())
                model(**batch)
    finally:
        for h in hooks:
            h.remove()
    return {n: grams[n] / counts[n] for n in names}


def gptq_on_hqq_grid(W: torch.Tensor, H: torch.Tensor, choice: bb.QuantChoice) -> torch.Tensor:
    """``dequantize(Q)`` with HQQ's scale/zero for ``choice`` and GPTQ's error-feedback rounding (act-order)."""
    from hqq.core.quantize import Quantizer

    out, inn, g = W.shape[0], W.shape[1], choice.group_size
    _, meta = Quantizer.quantize(W.float(), nbits=choice.bits, group_size=g, axis=1, bitpack=False, optimize=True,
                                 device="cpu")
    scale, zero = (meta[k].half().double().reshape(out, inn // g) for k in ("scale", "zero"))
    Hd = H.clone()
    dead = torch.diag(Hd) == 0
    Hd[dead, dead] = 1.0
    Hd += DAMP * torch.diag(Hd).mean() * torch.eye(inn, dtype=Hd.dtype)
    order = torch.argsort(torch.diag(Hd), descending=True)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(Hd[order][:, order])), upper=True)
    work = W.double()[:, order].clone()
    Q = torch.empty_like(work)
    for j, col in enumerate(order.tolist()):
        s, z = scale[:, col // g], zero[:, col // g]
        Q[:, j] = (torch.clamp(torch.round(work[:, j] / s + z), 0, 2 ** choice.bits - 1) - z) * s
        err = (work[:, j] - Q[:, j]) / U[j, j]
        work[:, j + 1:] -= err[:, None] * U[j, j + 1:][None, :]
    return Q[:, torch.argsort(order)].float()


def gptq_lq(W: torch.Tensor, H: torch.Tensor, choice: bb.QuantChoice) -> torch.Tensor:
    """``Q + L``: GPTQ's ``Q`` of ``W − L`` alternated with the H-weighted rank-``RANK`` fit ``L`` of ``W − Q``."""
    evals, evecs = torch.linalg.eigh(H + DAMP * torch.diag(H).mean() * torch.eye(H.shape[0], dtype=H.dtype))
    root = evecs @ torch.diag(evals.clamp_min(1e-12).sqrt()) @ evecs.T
    root_inv = evecs @ torch.diag(evals.clamp_min(1e-12).rsqrt()) @ evecs.T
    L = torch.zeros_like(W, dtype=torch.float64)
    for _ in range(LQ_ITER):
        Q = gptq_on_hqq_grid((W.double() - L).float(), H, choice).double()
        u, s, v = torch.linalg.svd((W.double() - Q) @ root, full_matrices=False)
        L = (u[:, :RANK] * s[:RANK]) @ v[:RANK] @ root_inv
    return (Q + L).float()


def base_weights(model, names, plan: dict[str, str], grams, rounding: str) -> dict[str, torch.Tensor]:
    """Each planned linear's weight as the base (plus LQ's L on the targets) reproduces it."""
    weights = {}
    for name in names:
        W = model.get_submodule(name).weight.detach().float()
        choice = bb.parse_choice(plan[name])
        lq = name.endswith(tuple("." + t for t in LQ_TARGETS))
        if rounding == "gptq" and choice.library == "hqq":
            weights[name] = gptq_lq(W, grams[name], choice) if lq else gptq_on_hqq_grid(W, grams[name], choice)
        elif lq:
            r = lq_decompose(W, RANK, max_iter=LQ_ITER, quantizer=choice.quantize_dequantize)
            weights[name] = r.Q + r.B @ r.A
        else:
            weights[name] = choice.quantize_dequantize(W)
    return weights


def output_change(model, weights: dict[str, torch.Tensor], batches, reference) -> float:
    """``‖H_base − H‖ / ‖H‖`` of the last hidden state over the real tokens of ``batches``; weights restored."""
    originals = {n: model.get_submodule(n).weight.detach().clone() for n in weights}
    try:
        with torch.no_grad():
            for n, w in weights.items():
                model.get_submodule(n).weight.copy_(w)
        changed = bb._last_hidden_states(model, batches)
    finally:
        with torch.no_grad():
            for n, w in originals.items():
                model.get_submodule(n).weight.copy_(w)
    num = sum(float((a - b).square().sum()) for a, b in zip(changed, reference))
    return (num / sum(float(b.square().sum()) for b in reference)) ** 0.5


def bases(names) -> dict[str, dict[str, str]]:
    """The bases probed: uniform configurations and the committed 2.75-bit plans (weight and output objective)."""
    out = {c: {n: c for n in names} for c in ("bnb-nf4-dq", "hqq-4bit-g64", "hqq-3bit-g128", "hqq-2bit-g64")}
    for label, file in (("plan2.75-weight", "bitbudget-minilm-qv.json"),
                        ("plan2.75-output", "bitbudget-minilm-qv-output.json")):
        data = json.loads((ROOT / "bench" / "results" / file).read_text())
        plan = next(p for p in data["curve"]["plans"] if p["budget"] == 2.75)["plan"]
        out[label] = {n: next(c for k, c in plan.items() if n.endswith(k) or k.endswith(n)) for n in names}
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "gptq-probe-minilm.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    start = time.time()
    model = minilm()
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".encoder." in f".{n}"]
    batches = calibration_batches(384, required=True)
    calibration, held_out = batches[:16], batches[16:]
    grams = input_grams(model, names, calibration)
    reference = bb._last_hidden_states(model, held_out)
    rows = []
    for label, plan in bases(names).items():
        row = {"base": label, "choices": {c: list(plan.values()).count(c) for c in sorted(set(plan.values()))}}
        has_hqq = any(bb.parse_choice(c).library == "hqq" for c in row["choices"])
        for rounding in ("hqq", "gptq") if has_hqq else ("hqq",):  # NF4 layers are bitsandbytes': not re-rounded
            row[f"output_change_{rounding}"] = output_change(
                model, base_weights(model, names, plan, grams, rounding), held_out, reference)
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {**provenance("bench/gptq_probe.py", argv), "seconds": round(time.time() - start, 1),
              "calibration_sentences": 256, "held_out_sentences": 128, "rank": RANK, "lq_targets": list(LQ_TARGETS),
              "rows": rows}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
