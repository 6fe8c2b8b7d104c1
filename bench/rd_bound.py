"""How low can any quantizer bring MiniLM's weight error at a given number of bits? (issue #21's 3-bit bar)

The bit-budget bar asks a 3.0-bit plan for a relative error within 10% of NF4's at ~4.1 bits. The Gaussian
rate-distortion function is an *upper* bound on what an ideal quantizer can reach (the Gaussian is the hardest source
of its variance), so it alone does not show the bar is out of reach for weights that are not Gaussian. A lower bound
is Shannon's: for an i.i.d. source of differential entropy ``h``, every code of ``R`` bits per sample leaves a mean
squared error of at least ``N · 2^(-2R)``, with ``N = exp(2h) / (2πe)`` the entropy power (``N ≤ σ²``, with equality for
a Gaussian). This measures ``N`` for every MiniLM encoder linear, from the empirical distribution of its entries
(Vasicek's m-spacing estimate of ``h``), under two models, and keeps the lower one:

- ``pooled``: the matrix's entries as one i.i.d. source;
- ``grouped``: entries in groups of 64 along a row, each group with its own scale given to the decoder for free
  (as HQQ's and NF4's per-group scales are, but here costing no bits): ``N = N(z) · geomean(s_g²)`` with ``z`` the
  entries divided by their group's RMS ``s_g``.

Each model is measured on ``W`` and on ``W − W_r`` (its best rank-``r`` part removed: what LQ's ``L`` can absorb at
the adapter's rank; this is an estimate, not a bound, since ``L`` is chosen jointly with ``Q``). Across matrices the
bits are spread optimally (reverse water-filling: equal distortion per entry), so the whole model's bound at an
average of ``R`` bits is ``relative error ≥ sqrt(n · geomean_n(N_l) · 2^(-2R) / Σ‖W_l‖²)``. Scale and zero bits are
free in this bound, and it holds for vector quantizers of unbounded length; a scalar quantizer (NF4, HQQ) needs
``πe/6`` more squared error at high rate. The file also records the estimator on Gaussian and Laplace samples of the
same size, whose ``N / σ²`` are known (1 and ``e/π``).

    python bench/rd_bound.py     # writes bench/results/rd-bound-minilm.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _env import ROOT, provenance  # noqa: E402

GROUP = 64
BUDGETS = [2.5, 2.75, 3.0, 3.5]


def entropy_vasicek(x: torch.Tensor) -> float:
    """Vasicek's m-spacing estimate (nats) of the differential entropy of the sample ``x``, ``m = √n / 2``."""
    v = torch.sort(x.double().flatten()).values
    n = v.numel()
    m = max(1, int(round(math.sqrt(n) / 2)))
    idx = torch.arange(n)
    spacing = v[torch.clamp(idx + m, max=n - 1)] - v[torch.clamp(idx - m, min=0)]
    spacing = torch.clamp(spacing, min=torch.finfo(torch.float64).tiny)
    return float(torch.log(n / (2 * m) * spacing).mean())


def entropy_power(x: torch.Tensor) -> float:
    return math.exp(2 * entropy_vasicek(x)) / (2 * math.pi * math.e)


def grouped_entropy_power(x: torch.Tensor, group: int = GROUP) -> float:
    """Entropy power of entries whose group of ``group`` along a row has its RMS known for free."""
    g = x.double().reshape(-1, group)
    rms = g.square().mean(dim=1, keepdim=True).sqrt().clamp_min(1e-30)
    return entropy_power(g / rms) * float(torch.exp(torch.log(rms.square()).mean()))


def remove_rank(W: torch.Tensor, rank: int) -> torch.Tensor:
    U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
    return W.double() - (U[:, :rank] * S[:rank]) @ Vh[:rank]


def per_matrix(name: str, W: torch.Tensor, rank: int) -> dict:
    row = {"layer": name, "numel": W.numel(), "sum_sq": float(W.double().square().sum()),
           "variance": float(W.double().square().mean())}
    for source, x in (("W", W.double()), (f"W-W{rank}", remove_rank(W, rank))):
        row[source] = {"pooled": entropy_power(x), "grouped": grouped_entropy_power(x)}
    return row


def model_bound(rows: list[dict], source: str, model: str, bits: float) -> float:
    """Least relative error over all matrices at ``bits`` average bits (equal distortion per entry); ``model`` is
    ``pooled``, ``grouped`` or ``best`` (the lower of the two per matrix)."""
    def power(r):
        return min(r[source].values()) if model == "best" else r[source][model]

    n = sum(r["numel"] for r in rows)
    log_geomean = sum(r["numel"] * math.log(power(r)) for r in rows) / n
    return math.sqrt(n * math.exp(log_geomean) * 2 ** (-2 * bits) / sum(r["sum_sq"] for r in rows))


def calibration(numel: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    gauss = torch.randn(numel, generator=g, dtype=torch.float64)
    laplace = torch.distributions.Laplace(0.0, 1.0).sample((numel,)).double()
    return {"gaussian_N_over_var": entropy_power(gauss) / float(gauss.var()),
            "laplace_N_over_var": entropy_power(laplace) / float(laplace.var()),
            "laplace_exact": math.e / math.pi}


def measured(path: Path) -> dict:
    """The measured plans and NF4 from the bit-budget run, for comparison."""
    curve = json.loads(path.read_text())["curve"]
    nf4 = next(u for u in curve["uniform"] if u["choice"] == "bnb-nf4-dq")
    return {"nf4_dq": {"bits": nf4["bits_per_param"], "relative_error": nf4["relative_error"]},
            "plans": [{"budget": p["budget"], "relative_error": p["relative_error"]} for p in curve["plans"]]}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "rd-bound-minilm.json"))
    args = p.parse_args(argv)
    from bitbudget import minilm, minilm_linears

    torch.manual_seed(0)
    rows = [per_matrix(n, w, args.rank) for n, w in minilm_linears(minilm()).items()]
    reference = measured(ROOT / "bench" / "results" / "bitbudget-minilm.json")
    budgets = BUDGETS + [round(reference["nf4_dq"]["bits"], 3)]
    bounds = {source: {model: {str(b): model_bound(rows, source, model, b) for b in budgets}
                       for model in ("pooled", "grouped", "best")} for source in ("W", f"W-W{args.rank}")}
    target = 1.1 * reference["nf4_dq"]["relative_error"]
    result = {**provenance("bench/rd_bound.py", argv), "rank": args.rank, "group": GROUP,
              "estimator_check": calibration(rows[0]["numel"]), "bounds": bounds, "measured": reference,
              "bar_3bit": {"target": target, "lowest_bound_at_3": min(b["best"]["3.0"] for b in bounds.values())},
              "matrices": rows}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("estimator_check", "bounds", "measured", "bar_3bit")}, indent=1))
    return result


if __name__ == "__main__":
    main()
