"""Measurements behind the sparse-term dispatcher (``delta.ops.resolve_sparse_path`` / ``resolve_sddmm``).

1. Paths: forward + backward (input gradient included, as inside a network) of one frozen ``nn.Linear`` plus its
   sparse term, over token counts, for
     * ``spmm``          ``F.linear`` + ``sparse_delta`` (reference on CPU, Triton on CUDA);
     * ``fused``         ``delta.fused`` with the sampled SDDMM;
     * ``fused_dense``   ``delta.fused`` with the dense ``gᵀx`` GEMM + gather for the values' gradient.
   Variants run interleaved, one step each per round; medians over rounds. The crossover of a shape is the
   smallest token count from which ``fused`` stays at or below ``spmm``; the dispatcher's constant is the largest
   ``tokens × density`` at a crossover.
2. SDDMM alone at one token count over densities: sampled vs dense; the dispatcher's density threshold is the
   smallest density from which dense stays faster.
3. Factored terms (sparse RandLoRA's ``scale · B·T``, r 32): one frozen ``nn.Linear`` wrapped by
   ``SparseRandLoraConfig``, forward + backward, the layer's own dispatch forced to ``spmm`` (two SpMMs) or
   ``fused`` (with each values-gradient route). The crossover is the smallest token count from which fused stays
   at or below spmm; the dispatcher's constant is the largest crossover over the layer's columns.

4. Few tokens (CPU, the reference forward as a layer calls it: ``spmm(..., add_to=...)``, decoding): the single
   product on a feature-major copy (``reference._spmm_few``) against the chunked path, at 1-64 tokens on the
   LLaMA shapes of ``bench/decode.py`` (density 0.01), 15 rounds of 100 calls each. ``reference.FEW_TOKENS`` is the
   largest token count up to which ``few`` stays at or below ``chunked`` on every shape. For one token it also
   times ``torch.mv`` against ``torch.mm`` with a one-column matrix, warm and after a 64 MB sweep of the caches.
5. Decoding probe (CPU): the reference forward as a layer calls it against the bare CSR product (with int64 and
   with int32 index arrays) and an ELLPACK gather (every row padded to the longest, three dense ops), all with
   operands built once, at 1-32 tokens, after a cache sweep and warm. What it showed is written at
   ``reference.FEW_TOKENS`` and ``SparseSupport.csr32``.
6. Index width of the fused path's scatter and gather (``SparseSupport.flat``): ``index_add_`` of the values into
   ``W0`` and ``index_select`` of the values' gradient from ``∂yᵀx``, with int64 and with int32 positions.

    python bench/dispatch.py --parts factored --clock cpu   # only part 3, merged into the existing file

    python bench/dispatch.py                  # CPU, 1 thread: writes bench/results/dispatch-cpu.json
    python bench/dispatch.py --device cuda    # writes bench/results/dispatch-<gpu>.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _env import ROOT, device_info, device_slug, git_commit, loadavg, versions  # noqa: E402

from sparse_lowrank_peft.delta import reference  # noqa: E402
from sparse_lowrank_peft.delta.fused import fused_sparse_linear  # noqa: E402
from sparse_lowrank_peft.delta.ops import get_ops, sparse_delta  # noqa: E402
from sparse_lowrank_peft.delta.support import SparseSupport  # noqa: E402

FEW_DEFAULT = reference.FEW_TOKENS
PARTS = ["paths", "sddmm", "factored", "few", "ell", "flat"]

TOKENS = [16, 32, 64, 128, 256, 512, 1024, 2048, 4096]
SHAPES = [(768, 0.01), (1024, 0.01), (768, 0.05), (1024, 0.05)]
SDDMM_DENSITIES = [0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2]


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _support(d: int, density: float, device) -> SparseSupport:
    return SparseSupport(SparseSupport.random((d, d), density, 1).indices.to(device), (d, d))


def _step_fns(tokens: int, d: int, density: float, device):
    g = torch.Generator().manual_seed(0)
    W = (torch.randn(d, d, generator=g) / d**0.5).to(device)
    b = torch.randn(d, generator=g).to(device)
    support = _support(d, density, device)
    values = (torch.randn(support.nnz, generator=g) * 0.01).to(device).requires_grad_(True)
    x = torch.randn(tokens, d, generator=g).to(device).requires_grad_(True)
    grad = torch.randn(tokens, d, generator=g).to(device)

    def fresh():
        return W.clone()

    def spmm():
        y = F.linear(x, W, b) + sparse_delta(x, support, values)
        y.backward(grad)

    def fused(path):
        def run():
            y = fused_sparse_linear(x, fresh, b, [support], [values], [path])
            y.backward(grad)
        return run

    return {"spmm": spmm, "fused": fused("sampled"), "fused_dense": fused("dense")}, support


CLOCK = {"wall": time.perf_counter, "cpu": time.process_time}
FACTORED_SHAPES = [(768, 0.1), (768, 0.01), (1024, 0.1), (1024, 0.01)]
FACTORED_TOKENS = [32, 128, 256, 512, 1024, 2048, 4096]


def time_interleaved(fns: dict, device, rounds: int, warmup: int = 2, clock: str = "wall") -> dict:
    samples = {k: [] for k in fns}
    now = CLOCK[clock]
    for r in range(warmup + rounds):
        for name, fn in fns.items():
            _sync(device)
            t = now()
            fn()
            _sync(device)
            if r >= warmup:
                samples[name].append(now() - t)
    return {k: round(statistics.median(v) * 1e3, 4) for k, v in samples.items()}


def paths_table(device, rounds: int) -> list[dict]:
    rows = []
    for d, density in SHAPES:
        for tokens in TOKENS:
            fns, support = _step_fns(tokens, d, density, device)
            ms = time_interleaved(fns, device, rounds if tokens >= 1024 else rounds * 3)
            rows.append({"d": d, "density": density, "nnz": support.nnz, "tokens": tokens, "ms": ms,
                         "fused_vs_spmm": round(ms["fused"] / ms["spmm"], 3)})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def crossovers(rows: list[dict]) -> list[dict]:
    out = []
    for d, density in SHAPES:
        shape_rows = [r for r in rows if r["d"] == d and r["density"] == density]
        crossover = None
        for i, r in enumerate(shape_rows):
            if all(s["fused_vs_spmm"] <= 1.0 for s in shape_rows[i:]):
                crossover = r["tokens"]
                break
        out.append({"d": d, "density": density, "crossover_tokens": crossover,
                    "tokens_x_density": None if crossover is None else round(crossover * density, 4)})
    return out


def sddmm_table(device, tokens: int, d: int, rounds: int) -> list[dict]:
    rows = []
    g = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, d, generator=g).to(device)
    grad = torch.randn(tokens, d, generator=g).to(device)
    for density in SDDMM_DENSITIES:
        support = _support(d, density, device)
        flat = support.flat(device)
        ops = get_ops(device)
        fns = {
            "sampled": lambda: ops.sddmm(grad, x, support, out_dtype=torch.float32),
            "dense": lambda: (grad.t() @ x).view(-1).index_select(0, flat),
        }
        ms = time_interleaved(fns, device, rounds)
        rows.append({"d": d, "tokens": tokens, "density": density, "ms": ms,
                     "dense_vs_sampled": round(ms["dense"] / ms["sampled"], 3)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def dense_threshold(rows: list[dict]) -> float | None:
    for i, r in enumerate(rows):
        if all(s["dense_vs_sampled"] <= 1.0 for s in rows[i:]):
            return r["density"]
    return None


def _factored_fns(tokens: int, d: int, density: float, device):
    import os

    from peft import get_peft_model

    from sparse_lowrank_peft import SparseRandLoraConfig

    model = torch.nn.Sequential(torch.nn.Linear(d, d)).to(device)
    config = SparseRandLoraConfig(r=32, basis_density=density, target_modules=["0"], init_weights=False)
    model = get_peft_model(model, config)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, d, generator=g).to(device).requires_grad_(True)
    grad = torch.randn(tokens, d, generator=g).to(device)

    def variant(path: str, sddmm: str):
        def run():
            os.environ["SLPEFT_SPARSE_PATH"], os.environ["SLPEFT_SDDMM"] = path, sddmm
            model(x).backward(grad)
        return run

    return {"spmm": variant("spmm", "auto"), "fused_sampled": variant("fused", "sampled"),
            "fused_dense": variant("fused", "dense")}


def factored_table(device, rounds: int, clock: str) -> list[dict]:
    import os

    rows = []
    saved = {k: os.environ.get(k) for k in ("SLPEFT_SPARSE_PATH", "SLPEFT_SDDMM")}
    try:
        for d, density in FACTORED_SHAPES:
            for tokens in FACTORED_TOKENS:
                ms = time_interleaved(_factored_fns(tokens, d, density, device), device, rounds, clock=clock)
                best = min(ms["fused_sampled"], ms["fused_dense"])
                rows.append({"d": d, "density": density, "tokens": tokens, "ms": ms,
                             "fused_vs_spmm": round(best / ms["spmm"], 3),
                             "dense_vs_sampled": round(ms["fused_dense"] / ms["fused_sampled"], 3)})
                print(json.dumps(rows[-1]), flush=True)
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    return rows


def factored_crossovers(rows: list[dict]) -> list[dict]:
    out = []
    for d, density in FACTORED_SHAPES:
        shape_rows = [r for r in rows if r["d"] == d and r["density"] == density]
        crossover = next((r["tokens"] for i, r in enumerate(shape_rows)
                          if all(s["fused_vs_spmm"] <= 1.0 for s in shape_rows[i:])), None)
        out.append({"d": d, "density": density, "crossover_tokens": crossover,
                    "tokens_per_column": None if crossover is None else round(crossover / d, 4)})
    return out


FEW_SHAPES = [(1024, 1024), (2816, 1024), (1024, 2816)]
FEW_TOKENS = [1, 2, 4, 8, 16, 32, 64]


def few_table(rounds: int, clock: str) -> list[dict]:
    """Part 4: the reference forward at a few tokens, single product (``few``) against the chunked path."""
    rows = []
    for out_f, in_f in FEW_SHAPES:
        support = SparseSupport.random((out_f, in_f), 0.01, 1)
        values = torch.randn(support.nnz)
        for tokens in FEW_TOKENS:
            x, base = torch.randn(tokens, in_f), torch.randn(tokens, out_f)

            def calls(limit):
                def run():
                    reference.FEW_TOKENS = limit
                    for _ in range(100):
                        reference.spmm(x, support, values, add_to=base)
                return run

            ms = time_interleaved({"chunked": calls(0), "few": calls(1 << 30)}, torch.device("cpu"), rounds, 1, clock)
            rows.append({"out": out_f, "in": in_f, "tokens": tokens,
                         "us_per_call": {k: round(v * 10, 1) for k, v in ms.items()},  # ms per 100 calls -> µs per call
                         "few_vs_chunked": round(ms["few"] / ms["chunked"], 3)})
            print(json.dumps(rows[-1]), flush=True)
    reference.FEW_TOKENS = FEW_DEFAULT
    return rows


def time_swept(fns: dict, sweep: torch.Tensor, calls: int) -> dict[str, float]:
    """Median µs per call of each function, ``{name}_flushed`` right after touching all of ``sweep`` (a 64 MB tensor:
    the caches hold other data, as between a model's layers) and ``{name}_warm`` when called again at once."""
    us = {f"{name}_{state}": [] for name in fns for state in ("flushed", "warm")}
    for _ in range(calls):
        for name, fn in fns.items():
            sweep.add_(1.0)
            for state in ("flushed", "warm"):
                t = time.perf_counter()
                fn()
                us[f"{name}_{state}"].append(1e6 * (time.perf_counter() - t))
    return {k: round(statistics.median(v), 1) for k, v in us.items()}


def one_token_table(rounds: int) -> list[dict]:
    """Part 4, one token: MKL's ``torch.mv`` against ``torch.mm`` with a one-column matrix (what ``_spmm_few`` takes
    for one token), with warm caches and with a 64 MB sweep before each call (as between the layers of a model)."""
    sweep = torch.zeros(1 << 24)
    rows = []
    for out_f, in_f in FEW_SHAPES:
        support = SparseSupport.random((out_f, in_f), 0.01, 1)
        csr, _ = support.layouts()
        S = reference._csr(csr.crow, csr.col, torch.randn(support.nnz), (out_f, in_f))
        x = torch.randn(1, in_f)
        fns = {"mm": lambda: torch.mm(S, x.t()), "mv": lambda: torch.mv(S, x[0])}
        rows.append({"out": out_f, "in": in_f, "us": time_swept(fns, sweep, rounds * 10)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


ELL_TOKENS = [1, 2, 4, 16, 32]


def ell_layout(support: SparseSupport) -> tuple[torch.Tensor, torch.Tensor, int]:
    """S in ELLPACK form: ``(col, source, width)``, every row padded to the longest row's ``width`` slots; slot
    ``r·width + j`` holds the column and the values index of row ``r``'s ``j``-th entry (index ``nnz``, an appended
    zero, for padding). A probe: measured here, not built into ``delta.reference``."""
    rows, cols = support.rows(), support.cols()
    counts = torch.bincount(rows, minlength=support.shape[0])
    width = int(counts.max())
    slot = rows * width + torch.arange(support.nnz) - (torch.cumsum(counts, 0) - counts)[rows]
    col = torch.zeros(support.shape[0] * width, dtype=torch.int64)
    source = torch.full_like(col, support.nnz)
    col[slot], source[slot] = cols, torch.arange(support.nnz)
    return col, source, width


def ell_table(rounds: int) -> list[dict]:
    """Part 5: the reference forward as a layer calls it (``few``: ``reference.spmm(..., add_to=...)``, the CSR single
    product at these counts) against bare products with their operands built once, as a decoder could keep them:
    ``csr_bare`` (MKL's product on the CSR tensor, ``torch.mv`` for one token), ``csr_bare32`` (the same with int32
    instead of int64 index arrays: what ``SparseSupport.csr32`` gives the few-token path) and ``ell`` (an ELLPACK
    gather: ``x`` at the padded columns, times the padded values, summed per row). Each call after a 64 MB sweep of the caches
    (``flushed``: as between a model's layers) and again at once (``warm``); medians of ``rounds * 10`` calls."""
    sweep = torch.zeros(1 << 24)
    rows = []
    for out_f, in_f in FEW_SHAPES:
        support = SparseSupport.random((out_f, in_f), 0.01, 1)
        values = torch.randn(support.nnz)
        col, source, width = ell_layout(support)
        padded = torch.cat([values, values.new_zeros(1)]).index_select(0, source)
        csr, _ = support.layouts()
        S = reference._csr(csr.crow, csr.col, values, (out_f, in_f))
        S32 = reference._csr(csr.crow.int(), csr.col.int(), values, (out_f, in_f))
        for tokens in ELL_TOKENS:
            x, base = torch.randn(tokens, in_f), torch.randn(tokens, out_f)
            want = base + reference.spmm(x, support, values)

            def ell():
                return base.add_(x.index_select(1, col).mul_(padded).view(tokens, out_f, width).sum(-1))

            def csr_bare(S=S):
                return base.add_(torch.mv(S, x[0]).unsqueeze(0) if tokens == 1 else torch.mm(S, x.t()).t())

            fns = {"few": lambda: reference.spmm(x, support, values, add_to=base), "csr_bare": csr_bare,
                   "csr_bare32": lambda: csr_bare(S32), "ell": ell}
            for fn in fns.values():
                base.copy_(want - reference.spmm(x, support, values))
                torch.testing.assert_close(fn(), want, rtol=1e-4, atol=1e-4)
            med = time_swept(fns, sweep, rounds * 10)
            rows.append({"out": out_f, "in": in_f, "tokens": tokens, "width": width, "us": med,
                         "ell_vs_csr_bare_flushed": round(med["ell_flushed"] / med["csr_bare_flushed"], 3),
                         "csr_bare_vs_few_flushed": round(med["csr_bare_flushed"] / med["few_flushed"], 3),
                         **{f"csr32_vs_csr64_{state}": round(med[f"csr_bare32_{state}"] / med[f"csr_bare_{state}"], 3)
                            for state in ("flushed", "warm")}})
            print(json.dumps(rows[-1]), flush=True)
    return rows


FLAT_SHAPES = [((1024, 1024), 0.01), ((1024, 1024), 0.05), ((2816, 1024), 0.03), ((4096, 4096), 0.03)]


def flat_table(device, rounds: int, clock: str) -> list[dict]:
    """Part 6: ``index_add_`` (the fused forward's ``W0 + S``) and ``index_select`` (the dense route's ``∂v``) with
    int64 and int32 positions, interleaved; medians of ``rounds * 3`` rounds of 10 calls."""
    rows = []
    for shape, density in FLAT_SHAPES:
        support = SparseSupport.random(shape, density, 1)
        flat64 = support.rows(device) * shape[1] + support.cols(device)
        flat32 = flat64.to(torch.int32)
        values, W, G = torch.randn(support.nnz, device=device), torch.randn(shape, device=device), torch.randn(shape, device=device)

        def calls(fn):
            def run():
                for _ in range(10):
                    fn()
            return run

        fns = {f"{op}{bits}": calls(fn) for bits, flat in (("64", flat64), ("32", flat32)) for op, fn in (
            ("add", lambda f=flat: W.view(-1).index_add_(0, f, values)),
            ("select", lambda f=flat: G.view(-1).index_select(0, f)))}
        ms = time_interleaved(fns, device, rounds * 3, clock=clock)
        rows.append({"shape": list(shape), "density": density, "nnz": support.nnz,
                     "us_per_call": {k: round(v * 100, 1) for k, v in ms.items()},  # ms per 10 calls -> µs per call
                     "add_32_vs_64": round(ms["add32"] / ms["add64"], 3),
                     "select_32_vs_64": round(ms["select32"] / ms["select64"], 3)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def few_limit(rows: list[dict]) -> int | None:
    """The largest token count up to which ``few`` is at or below ``chunked`` on every shape."""
    limit = None
    for tokens in FEW_TOKENS:
        if any(r["few_vs_chunked"] > 1.0 for r in rows if r["tokens"] <= tokens):
            break
        limit = tokens
    return limit


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (the speed issue's condition: 1)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", default=None)
    p.add_argument("--parts", nargs="+", default=PARTS, choices=PARTS,
                   help="what to measure; the others are kept from --out")
    p.add_argument("--clock", default="wall", choices=sorted(CLOCK), help="cpu: process time (1 thread, busy host)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    info = device_info(device)
    out = Path(args.out or ROOT / "bench" / "results" / f"dispatch-{device_slug(info)}.json")
    result = json.loads(out.read_text()) if out.exists() and len(args.parts) < len(PARTS) else {}
    commit, dirty = git_commit("bench/dispatch.py")
    run = {"command": "python bench/dispatch.py " + " ".join(argv or sys.argv[1:]), "commit": commit, "dirty": dirty,
           "loadavg": loadavg(), "date": time.strftime("%Y-%m-%d"), "clock": args.clock}
    result.update({"bench": "dispatch", "device": info, "versions": versions()})
    if "paths" in args.parts:
        rows = paths_table(device, args.rounds)
        cross = crossovers(rows)
        products = [c["tokens_x_density"] for c in cross]
        result.update({**run, "paths": rows, "crossovers": cross,
                       "fused_min_tokens_x_density": None if None in products else max(products)})
    if "sddmm" in args.parts:
        sddmm = sddmm_table(device, 4096, 1024, args.rounds)
        result.update({**run, "sddmm": sddmm, "dense_sddmm_min_density": dense_threshold(sddmm)})
    if "factored" in args.parts:
        rows = factored_table(device, args.rounds, args.clock)
        cross = factored_crossovers(rows)
        per_column = [c["tokens_per_column"] for c in cross]
        result["factored"] = {"run": run, "rows": rows, "crossovers": cross,
                              "min_tokens_per_column": None if None in per_column else max(per_column)}
    if "few" in args.parts and device.type == "cpu":
        rows = few_table(max(args.rounds, 15), args.clock)
        result["few"] = {"run": run, "rows": rows, "few_tokens": few_limit(rows),
                         "one_token": one_token_table(max(args.rounds, 15))}
    if "ell" in args.parts and device.type == "cpu":
        result["ell"] = {"run": run, "rows": ell_table(max(args.rounds, 15))}
    if "flat" in args.parts:
        result["flat"] = {"run": run, "rows": flat_table(device, args.rounds, args.clock)}
    out.write_text(json.dumps(result, indent=1) + "\n")
    keys = ("crossovers", "fused_min_tokens_x_density", "dense_sddmm_min_density")
    print(json.dumps({k: result.get(k) for k in keys} | {"factored": result.get("factored", {}).get("crossovers"),
                                                          "few_tokens": result.get("few", {}).get("few_tokens")},
                     indent=1))
    return result


if __name__ == "__main__":
    main()
