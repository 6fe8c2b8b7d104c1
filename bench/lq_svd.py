"""How long LQ-LoRA's decomposition takes with the exact and the randomized SVD, and what error each reaches.

``lq_decompose`` alternates ``L ← SVD_r(W − Q)``, ``Q ← quantize(W − L)`` (NF4 here, 20 alternations, the best
iterate kept). The exact SVD costs ``O(out·in·min(out, in))`` per alternation, the randomized subspace iteration
(``delta.quant.SubspaceSVD``) ``O(out·in·(r + 16))``. Measured per matrix: wall time of the whole decomposition and
its relative error ``‖W − Q − L‖ / ‖W‖``; the MiniLM rows use the bundled model's real weights, the larger ones a
Gaussian weight (a flat spectrum: the randomized solver's hardest case). This chooses ``svd="auto"``'s bound
(``LQ_EXACT_SVD_MAX_DIM``).

    python bench/lq_svd.py           # writes bench/results/lq-svd-cpu.json (about 7 minutes on 2 cores)
    python bench/lq_svd.py --quick   # two small matrices (the tests run this)
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

#: (label, shape, ranks, modes): the exact SVD of 4096x4096 takes 12 s per alternation, so it runs at one rank only
FULL = [
    ("minilm query", (384, 384), (16, 64), ("exact", "randomized")),
    ("minilm intermediate", (1536, 384), (16, 64), ("exact", "randomized")),
    ("gaussian", (1024, 1024), (16, 64), ("exact", "randomized")),
    ("gaussian", (2048, 2048), (16, 64), ("exact", "randomized")),
    ("gaussian", (4096, 4096), (16,), ("exact", "randomized")),
    ("gaussian", (4096, 4096), (64,), ("randomized",)),
    ("gaussian", (11008, 4096), (16, 64), ("randomized",)),
]
QUICK = [("gaussian", (96, 80), (4,), ("exact", "randomized")), ("gaussian", (128, 256), (8,), ("exact", "randomized"))]


def weight(label: str, shape: tuple[int, int]) -> torch.Tensor:
    """The MiniLM encoder's first weight of that shape, or a seeded Gaussian one at a trained layer's scale."""
    if label.startswith("minilm"):
        from bitbudget import minilm, minilm_linears

        return next(w.float() for w in minilm_linears(minilm()).values() if tuple(w.shape) == shape)
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0)) * 0.02


def measure(W: torch.Tensor, rank: int, svd: str, max_iter: int) -> dict:
    from sparse_lowrank_peft.delta.quant import lq_decompose

    start = time.perf_counter()
    result = lq_decompose(W, rank, max_iter=max_iter, svd=svd)
    return {"svd": svd, "rank": rank, "seconds": time.perf_counter() - start, "error": result.error,
            "loftq_error": result.errors[0], "alternations": len(result.errors)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="two small matrices (a smoke run)")
    p.add_argument("--max-iter", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "lq-svd-cpu.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for label, shape, ranks, modes in QUICK if args.quick else FULL:
        W = weight(label, shape)
        for rank in ranks:
            for svd in modes:
                row = {"matrix": label, "shape": list(shape), **measure(W, rank, svd, args.max_iter)}
                rows.append(row)
                print(f"{label:20s} {shape[0]:>5d}x{shape[1]:<5d} r={rank:<3d} {svd:10s} {row['seconds']:8.2f} s  "
                      f"error {row['error']:.5f} ({row['alternations']} alternations)", flush=True)
    result = {**provenance("bench/lq_svd.py", argv), "threads": args.threads, "max_iter": args.max_iter,
              "quant_type": "nf4", "rows": rows, "pairs": pairs(rows)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return result


def pairs(rows: list[dict]) -> list[dict]:
    """Each (matrix, rank) measured both ways: the speed-up and the randomized error over the exact one."""
    out = []
    for exact in (r for r in rows if r["svd"] == "exact"):
        fast = next((r for r in rows if r["svd"] == "randomized" and r["shape"] == exact["shape"]
                     and r["rank"] == exact["rank"] and r["matrix"] == exact["matrix"]), None)
        if fast:
            out.append({"matrix": exact["matrix"], "shape": exact["shape"], "rank": exact["rank"],
                        "speedup": exact["seconds"] / fast["seconds"], "error_ratio": fast["error"] / exact["error"]})
    return out


if __name__ == "__main__":
    main()
