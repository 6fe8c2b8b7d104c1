"""LoRA-Squeeze benchmark: speed against PEFT's ``convert_to_lora``, memory of the randomized path, and the choice of
the randomized SVD's defaults.

Usage::

    python bench/squeeze.py                 # full run: writes bench/results/squeeze-<device>.json and .md
    python bench/squeeze.py --quick         # CI smoke test: tiny sizes, prints the table, writes nothing
    python bench/squeeze.py --tune          # also the (p, q) grid of the randomized SVD (squeeze-tune-<device>.json)

Parts (all in one run, on the same adapters):

1. **LoRA r=16 → 4**: a model of ``--layers`` (24) linear layers of ``--dim`` (4096) with a rank-16 PEFT LoRA
   (random factors, seeded). PEFT 0.21's ``convert_to_lora(model, 4)`` forms every dense ΔW and runs a full SVD;
   ours (``squeeze_state(model, 4)``, the same output: LoRA config + state dict) uses QR of the factors and a
   16×16 SVD. Reported: wall time of each (ours: best of 5), speed-up, and the largest relative difference between
   the two results' ΔW (both are the optimal truncation, so it should be ~1e-6).
2. **SLTrain 4096×4096, density 0.01, r 16 → 4** (randomized path), in fresh subprocesses: wall time, peak RSS
   above the state before the squeeze (Linux ``VmHWM`` reset through ``/proc/self/clear_refs``), the largest tensor
   any ATen op produced (a ``TorchDispatchMode`` probe), and the error against the optimal truncation. The dense
   route (``get_delta_weight`` + ``torch.linalg.svd``, what a densifying converter does) is measured the same way
   for comparison.
3. ``--tune``: Frobenius error / optimal error of the randomized SVD for oversampling ``p`` ∈ {5, 10, 20} and power
   iterations ``q`` ∈ {1, 2, 3, 4} on SLTrain and RandLoRA deltas and on synthetic spectra, ranks 4-64: how the
   defaults ``p = 10, q = 3`` were chosen.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
MiB = 2 ** 20


def device_slug() -> str:
    if torch.cuda.is_available():
        return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(0).lower()).strip("-")
    return "cpu"


class Stack(torch.nn.Module):
    """``layers`` bias-free ``dim × dim`` linear layers (weights left uninitialised: only the adapters matter)."""

    def __init__(self, layers: int, dim: int):
        super().__init__()
        self.layers = torch.nn.ModuleList(
            [torch.nn.utils.skip_init(torch.nn.Linear, dim, dim, bias=False) for _ in range(layers)]
        )

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


# ----------------------------------------------------------------------------------------------------------------
# part 1: LoRA r=16 -> 4 against convert_to_lora


def bench_lora(layers: int, dim: int, r: int, rank: int, repeats: int) -> dict:
    from peft import LoraConfig, convert_to_lora, get_peft_model

    from sparse_lowrank_peft.squeeze import squeeze_state

    torch.manual_seed(0)
    model = get_peft_model(Stack(layers, dim), LoraConfig(r=r, lora_alpha=2 * r, target_modules=["layers." + str(i) for i in range(layers)], init_lora_weights=False))
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Converting a PEFT adapter to LoRA that is already a LoRA adapter"
        t0 = time.perf_counter()
        peft_config, peft_state = convert_to_lora(model, rank)
        t_peft = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        ours = squeeze_state(model, rank)
        times.append(time.perf_counter() - t0)
    t_ours = min(times)
    # both are the optimal rank-`rank` truncation: compare the products layer by layer
    worst = 0.0
    for i in range(layers):
        name = f"base_model.model.layers.{i}"
        pB, pA = peft_state[f"{name}.lora_B.weight"].double(), peft_state[f"{name}.lora_A.weight"].double()
        oB, oA = ours.state[f"{name}.lora_B.weight"].double(), ours.state[f"{name}.lora_A.weight"].double()
        # ‖pB pA − oB oA‖_F / ‖pB pA‖_F through r×r Gram matrices (no dim×dim product)
        def inner(B1, A1, B2, A2):
            return float(((B1.T @ B2) * (A1 @ A2.T)).sum())
        pp, oo, po = inner(pB, pA, pB, pA), inner(oB, oA, oB, oA), inner(pB, pA, oB, oA)
        worst = max(worst, math.sqrt(max(pp + oo - 2 * po, 0.0) / pp))
    return {
        "layers": layers, "dim": dim, "r": r, "rank": rank,
        "convert_to_lora_s": t_peft, "ours_s": t_ours, "ours_all_s": times, "speedup": t_peft / t_ours,
        "max_rel_diff_vs_convert_to_lora": worst,
    }


# ----------------------------------------------------------------------------------------------------------------
# part 2: SLTrain, randomized path, memory (children run in fresh processes)


CHILD = "--child"


def _status(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def child(mode: str, dim: int, density: float, r: int, rank: int) -> dict:
    """One measurement in this (fresh) process; printed as JSON by ``main``."""
    import ctypes

    from peft import get_peft_model

    from sparse_lowrank_peft import SLTrainConfig
    from sparse_lowrank_peft.squeeze import squeeze_state

    sys.path.insert(0, str(ROOT / "tests"))
    from test_squeeze import LargestTensor, One

    torch.manual_seed(0)
    pm = get_peft_model(One(dim, dim), SLTrainConfig(r=r, sparsity=density, target_modules=["lin"],
                                                     init_weights=False))
    layer = pm.base_model.model.lin
    squeeze_state(pm, rank)  # warm-up: lazily built sparse layouts, allocator pools
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak-RSS counter to the current RSS
    base_rss = _status("VmRSS")
    probe = LargestTensor()
    t0 = time.perf_counter()
    if mode == "ours":
        with probe:
            result = squeeze_state(pm, rank)
        B = result.state["base_model.model.lin.lora_B.weight"].double()
        A = result.state["base_model.model.lin.lora_A.weight"].double()
    else:  # dense: what a densifying converter does
        with probe:
            W = layer.get_delta_weight("default").float()
            U, S, Vh = torch.linalg.svd(W, full_matrices=False)
            B, A = (U[:, :rank] * S[:rank]).double(), Vh[:rank].double()
    wall = time.perf_counter() - t0
    peak = _status("VmHWM") - base_rss
    out = {"mode": mode, "wall_s": wall, "peak_rss_above_base_bytes": peak, "largest_tensor_elems": probe.largest,
           "largest_tensor_op": probe.op, "nnz": int(layer.sltrain_values["default"].numel()),
           "dense_delta_bytes": dim * dim * 4}
    if mode == "dense":
        # the oracle's error (optimal) for the parent's ratio; the dense ΔW exists here anyway
        out["optimal_err"] = float(S[rank:].double().square().sum().sqrt())
        out["fro"] = float(S.double().square().sum().sqrt())
    else:
        W = layer.get_delta_weight("default").double()  # after the measurement: only to score the result
        out["err"] = float(torch.linalg.norm(W - B @ A))
    return out


def run_child(mode: str, dim: int, density: float, r: int, rank: int, threads: int) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), CHILD, mode, str(dim), str(density), str(r), str(rank),
           str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"child {mode} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_sltrain(dim: int, density: float, r: int, rank: int, threads: int) -> dict:
    ours = run_child("ours", dim, density, r, rank, threads)
    dense = run_child("dense", dim, density, r, rank, threads)
    return {"dim": dim, "density": density, "r": r, "rank": rank, "ours": ours, "dense": dense,
            "err_over_optimal": ours["err"] / dense["optimal_err"]}


# ----------------------------------------------------------------------------------------------------------------
# part 3: (p, q) grid


def _spectrum_matrix(out_f, in_f, sigma, seed=1):
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(out_f, len(sigma), generator=g, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(in_f, len(sigma), generator=g, dtype=torch.float64))[0]
    return (U * torch.tensor(sigma, dtype=torch.float64)) @ V.T


def bench_tune(out_f: int, in_f: int, ranks, ps, qs) -> dict:
    from peft import get_peft_model

    from sparse_lowrank_peft import SLTrainConfig
    from sparse_lowrank_peft.squeeze import delta_operator, randomized_svd
    from sparse_lowrank_peft.squeeze.svd import _operator_mode
    from sparse_lowrank_peft.tuners.sparse_randlora import SparseRandLoraConfig

    sys.path.insert(0, str(ROOT / "tests"))
    from test_squeeze import One

    n = min(out_f, in_f)
    cases = {}

    def layer_case(config, randomize_gamma=False):
        torch.manual_seed(0)
        pm = get_peft_model(One(out_f, in_f), config)
        layer = pm.base_model.model.lin
        if randomize_gamma:
            with torch.no_grad():
                g = layer.sparse_randlora_gamma["default"]
                g.copy_(torch.randn(g.shape, generator=torch.Generator().manual_seed(5)))
        return pm, layer

    for name, cfg, rg in [
        ("sltrain d=0.01 r=16", SLTrainConfig(r=16, sparsity=0.01, target_modules=["lin"], init_weights=False), False),
        ("sltrain d=0.05 r=16", SLTrainConfig(r=16, sparsity=0.05, target_modules=["lin"], init_weights=False), False),
        ("randlora sparse d=0.1 (random γ)", SparseRandLoraConfig(r=8, basis_density=0.1, target_modules=["lin"],
                                                                  init_weights=False), True),
        ("randlora dense (random γ)", SparseRandLoraConfig(r=8, basis_density=1.0, target_modules=["lin"],
                                                            init_weights=False), True),
    ]:
        cases[name] = ("layer", layer_case(cfg, rg))
    for name, sigma in [
        ("σ ∝ i^-0.5", [(i + 1) ** -0.5 for i in range(n)]),
        ("σ ∝ i^-1", [(i + 1) ** -1.0 for i in range(n)]),
        ("σ ∝ e^(-i/20)", [math.exp(-i / 20) for i in range(n)]),
        ("rank-16 + flat 0.05", [1.0] * 16 + [0.05] * (n - 16)),
    ]:
        cases[name] = ("dense", _spectrum_matrix(out_f, in_f, sigma))
    rows = []
    for name, (kind, obj) in cases.items():
        if kind == "layer":
            pm, layer = obj
            W = layer.get_delta_weight("default").double()
            ctx = _operator_mode(layer)
            ctx.__enter__()
            matvec, rmatvec = delta_operator(layer, "default")
        else:
            W = obj
            W32 = W.float()
            matvec, rmatvec = (lambda X, W32=W32: W32 @ X.float()), (lambda Y, W32=W32: W32.T @ Y.float())
            ctx = None
        S_true = torch.linalg.svdvals(W)
        for k in ranks:
            opt = float(S_true[k:].square().sum().sqrt())
            for p, q in itertools.product(ps, qs):
                U, S, Vh = randomized_svd(matvec, rmatvec, tuple(W.shape), k, oversampling=p, power_iters=q)
                err = float(torch.linalg.norm(W - (U[:, :k] * S[:k]) @ Vh[:k]))
                rows.append({"case": name, "rank": k, "p": p, "q": q, "ratio": err / opt})
        if ctx is not None:
            ctx.__exit__(None, None, None)
    worst = {f"p={p} q={q}": max(r["ratio"] for r in rows if r["p"] == p and r["q"] == q)
             for p, q in itertools.product(ps, qs)}
    return {"shape": [out_f, in_f], "ranks": list(ranks), "rows": rows, "worst_ratio": worst}


# ----------------------------------------------------------------------------------------------------------------


def table(results: dict) -> str:
    lo, sl = results["lora"], results["sltrain"]
    o, d = sl["ours"], sl["dense"]
    lines = [
        f"LoRA-Squeeze on {results['device']} ({results['threads']} threads), torch {results['versions']['torch']}, "
        f"peft {results['versions']['peft']}",
        "",
        "| task | method | wall time | peak memory above start | largest tensor | error |",
        "|---|---|---|---|---|---|",
        f"| LoRA r={lo['r']} → {lo['rank']}, {lo['layers']} × {lo['dim']}×{lo['dim']} | PEFT `convert_to_lora` "
        f"(dense ΔW + full SVD) | {lo['convert_to_lora_s']:.2f} s | — | — | optimal |",
        f"| | LoRA-Squeeze exact (QR + {lo['r']}×{lo['r']} SVD) | {lo['ours_s'] * 1e3:.1f} ms "
        f"(**{lo['speedup']:.0f}× faster**) | — | — | optimal (ΔW rel. diff vs PEFT "
        f"{lo['max_rel_diff_vs_convert_to_lora']:.1e}) |",
        f"| SLTrain {sl['dim']}×{sl['dim']}, density {sl['density']}, r={sl['r']} → {sl['rank']} | dense ΔW + "
        f"full SVD | {d['wall_s']:.2f} s | {d['peak_rss_above_base_bytes'] / MiB:.1f} MiB | "
        f"{d['largest_tensor_elems']:,} | optimal |",
        f"| | LoRA-Squeeze randomized (p=10, q=3) | {o['wall_s']:.3f} s | "
        f"{o['peak_rss_above_base_bytes'] / MiB:.1f} MiB | {o['largest_tensor_elems']:,} | "
        f"{sl['err_over_optimal']:.4f} × optimal |",
        "",
        f"A dense {sl['dim']}×{sl['dim']} fp32 ΔW is {d['dense_delta_bytes'] / MiB:.0f} MiB; the sparse term has "
        f"{o['nnz']:,} values.",
    ]
    if "tune" in results:
        lines += ["", "Randomized SVD, worst error / optimal over the test spectra (ranks "
                  f"{results['tune']['ranks']}):", "", "| setting | worst ratio |", "|---|---|"]
        lines += [f"| {k} | {v:.4f} |" for k, v in results["tune"]["worst_ratio"].items()]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="CI smoke: tiny sizes, writes nothing unless --out")
    parser.add_argument("--tune", action="store_true", help="also run the (p, q) grid of the randomized SVD")
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--out", help="JSON path (default bench/results/squeeze-<device>.json; --quick: none)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    layers, dim, sl_dim = (2, 256, 512) if args.quick else (args.layers, args.dim, 4096)
    import peft
    import transformers

    results = {
        "schema": "slpeft-bench-squeeze/1",
        "command": "python bench/squeeze.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
        "threads": torch.get_num_threads(),
        "versions": {"torch": torch.__version__, "peft": peft.__version__, "transformers": transformers.__version__},
        "quick": args.quick,
    }
    print(f"[squeeze bench] LoRA r=16 -> 4 on {layers} x {dim}x{dim} ...", flush=True)
    results["lora"] = bench_lora(layers, dim, 16, 4, repeats=5)
    print(json.dumps(results["lora"]), flush=True)
    print(f"[squeeze bench] SLTrain {sl_dim}x{sl_dim} density 0.01 r 16 -> 4 ...", flush=True)
    results["sltrain"] = bench_sltrain(sl_dim, 0.01, 16, 4, torch.get_num_threads())
    print(json.dumps(results["sltrain"]), flush=True)
    if args.tune:
        print("[squeeze bench] (p, q) grid ...", flush=True)
        shape = (192, 128) if args.quick else (512, 384)
        ranks = (4, 16) if args.quick else (4, 16, 32, 64)
        results["tune"] = bench_tune(*shape, ranks, (5, 10, 20), (1, 2, 3, 4))
    md = table(results)
    results["table_md"] = md
    print(md)
    out = Path(args.out) if args.out else (None if args.quick else RESULTS / f"squeeze-{device_slug()}.json")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2))
        out.with_suffix(".md").write_text(md + "\n")
        print(f"[squeeze bench] wrote {out} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == CHILD:
        mode, dim, density, r, rank, threads = sys.argv[2:8]
        torch.set_num_threads(int(threads))
        print(json.dumps(child(mode, int(dim), float(density), int(r), int(rank))))
    else:
        sys.exit(main())
