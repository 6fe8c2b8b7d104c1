"""Benchmark of the shared sparse-delta layer against PEFT's densifying approach and against plain LoRA.

For each shape (tokens, in_features, out_features, density) and one ``nn.Linear`` (frozen, with bias) it times the
forward, the backward (with the input gradient, as inside a network) and forward + backward, and records the peak
memory of one forward + backward, for:

* ``base``              the frozen Linear alone (for scale)
* ``lora``              (d) PEFT's LoRA layer, rank r
* ``densify_sparse``    (a) PEFT's Super-Tuning layer, sparse only: scatters the values into a dense copy of W every
                        forward, then F.linear (autograd builds the dense weight gradient to read nnz entries back)
* ``densify_lora``      (a) PEFT's Super-Tuning "Supra" layer: the same sparse term + LoRA rank r
* ``sparse_reference``  (b) the Linear + our ``sparse_delta`` on the reference path (torch.sparse CSR)
* ``sparse_triton``     (c) the Linear + ``sparse_delta`` with the Triton kernels (CUDA only)
* ``sltrain``           (e) our SLTrain layer (sparse + LoRA rank r) through ``get_peft_model``, as the dispatcher
                        runs it (``SLPEFT_SPARSE_PATH=auto``: the fused-weight path at these token counts)
* ``sltrain_spmm``      (e) the same layer with the sparse term forced onto the SpMM path (``sparse_delta``;
                        reference on CPU, Triton on CUDA): the path before the fused one, side by side
* ``sltrain_reference`` (e) the SLTrain layer forced onto the reference path (CUDA only, for comparison)
* ``sltrain_add_to``    (e) the same SLTrain layer's tensors composed with the sparse term added *in place* into the
                        low-rank output (``sparse_delta(..., add_to=lowrank)``), composed by hand: what
                        ``DeltaLayer.adapter_forward`` does since commit cdc9a82 (so now the same as ``sltrain``; kept
                        as a check that the layer's composition adds nothing)

Timing: the variants run interleaved, one step each per round (so a change of machine load hits all of them), after
warm-up rounds; the figures are medians over the timed rounds. Ratios against LoRA are given both as ratios of
medians and as the median of the per-round ratios (more robust on a shared machine).

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` over one step, minus what was allocated before it. On CPU
(no allocator statistics) a child process with ``MALLOC_MMAP_THRESHOLD_=65536`` (every large buffer its own mmap, so
freed memory really leaves the process) resets the kernel's high-water mark (``/proc/self/clear_refs``) before a step
and reads ``VmHWM`` after it: the peak resident memory of the step above the resident memory before it.

Usage::

    python bench/sparse_delta.py            # default grid for the device (CPU: a few minutes)
    python bench/sparse_delta.py --quick    # tiny smoke run (CI)
    python bench/sparse_delta.py --shape 4096,1024,1024,0.01 --repeats 15

Writes ``bench/results/sparse_delta-<device>.json`` (``--out`` to change) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from collections import OrderedDict
from pathlib import Path

import torch

from torch import nn

if str(Path(__file__).resolve().parent) not in sys.path:  # bench/_env.py, also when loaded by file path
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from _env import (  # noqa: E402
    device_info, device_slug, git_commit, loadavg, print_saved, proc_status, reset_hwm, versions,
)

ROOT = Path(__file__).resolve().parents[1]
BACKEND_ENV = "SLPEFT_SPARSE_BACKEND"
PATH_ENV = "SLPEFT_SPARSE_PATH"

LABELS = OrderedDict(
    [
        ("base", "frozen Linear alone"),
        ("lora", "(d) PEFT LoRA"),
        ("densify_sparse", "(a) PEFT Super-Tuning sparse (densify)"),
        ("densify_lora", "(a) PEFT Super-Tuning sparse + LoRA (densify)"),
        ("sparse_reference", "(b) Linear + sparse_delta, reference"),
        ("sparse_triton", "(c) Linear + sparse_delta, Triton"),
        ("sltrain", "(e) SLTrain sparse + LoRA"),
        ("sltrain_spmm", "(e) SLTrain sparse + LoRA, SpMM path"),
        ("sltrain_reference", "(e) SLTrain sparse + LoRA, reference"),
        ("sltrain_add_to", "(e) SLTrain, sparse added in place by hand"),
    ]
)

# (tokens, in_features, out_features, density)
CPU_TARGET = (4096, 1024, 1024, 0.01)
CPU_TARGET_768 = (2048, 768, 768, 0.01)
GPU_TARGET = (8192, 4096, 4096, 0.01)
QUICK_SHAPES = [(256, 96, 80, 0.05)]
CPU_SHAPES = [
    CPU_TARGET,
    (4096, 1024, 1024, 0.001),
    (4096, 1024, 1024, 0.05),
    (2048, 768, 768, 0.01),
    (16384, 768, 768, 0.01),
    (2048, 1024, 4096, 0.01),
    (2048, 4096, 1024, 0.01),
]
GPU_SHAPES = [
    (t, d, d, p) for t in (2048, 8192, 16384) for d in (768, 1024, 4096) for p in (0.001, 0.01, 0.05)
] + [(8192, 1024, 4096, 0.01), (8192, 4096, 1024, 0.01)]


# ------------------------------------------------------------------------------------------------------ environment
# --------------------------------------------------------------------------------------------------------- variants
class SparseOnly(nn.Module):
    """A frozen Linear plus our sparse term (the (b)/(c) rows): ``base(x) + sparse_delta(x, S, v)``."""

    def __init__(self, base: nn.Linear, density: float, backend: str):
        super().__init__()
        from sparse_lowrank_peft.delta import SparseSupport

        self.base = base
        self.support = SparseSupport.random((base.out_features, base.in_features), density, seed=0)
        self.values = nn.Parameter(torch.zeros(self.support.nnz))
        self.backend = backend

    def forward(self, x):
        from sparse_lowrank_peft.delta import sparse_delta

        return self.base(x) + sparse_delta(x, self.support, self.values, backend=self.backend)


class SLTrainAddTo(nn.Module):
    """An SLTrain layer's own tensors, composed as ``base(x) + sparse_delta(x, S, v, add_to=lowrank(x))``.

    Mirrors ``DeltaLayer.forward`` / ``adapter_forward`` for one active adapter with the sparse term added in place
    into the low-rank output instead of ``lowrank + sparse`` (one activation-sized temporary less).
    """

    def __init__(self, peft_model):
        super().__init__()
        from sparse_lowrank_peft.tuners.sltrain import SLTrainLayer

        self.peft_model = peft_model  # keeps the parameters registered (requires_grad as trained)
        self.layer = next(m for m in peft_model.modules() if isinstance(m, SLTrainLayer))

    def forward(self, x):
        from sparse_lowrank_peft.delta import sparse_delta

        layer, name = self.layer, "default"
        result = layer.base_layer(x)
        xa = layer._cast_input_dtype(x, layer.adapter_dtype(name))
        values = layer.sltrain_values[name]
        out = sparse_delta(xa.to(values.dtype), layer.get_support(name), values, add_to=layer.lowrank_forward(xa, name))
        return result + out.to(result.dtype)


def one_linear(in_features: int, out_features: int) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("lin", nn.Linear(in_features, out_features))
    return model


def build(variant: str, shape, rank: int, device: torch.device, dtype: torch.dtype):
    """``(model, backend, path)``: the model of ``variant`` for ``shape`` and the SLPEFT_SPARSE_BACKEND and
    SLPEFT_SPARSE_PATH it runs under."""
    from peft import LoraConfig, SupertuningConfig, get_peft_model

    from sparse_lowrank_peft import SLTrainConfig

    _, in_features, out_features, density = shape
    model = one_linear(in_features, out_features)
    backend = "auto"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if variant == "base":
            model.requires_grad_(False)
        elif variant == "lora":
            model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["lin"]))
        elif variant in ("densify_sparse", "densify_lora"):
            # Super-Tuning's `sparsity` is the frozen fraction: density d trains round-down((1 - s) * numel) entries.
            cfg = SupertuningConfig(
                sparsity=1.0 - density, target_modules=["lin"], r=rank if variant == "densify_lora" else None
            )
            model = get_peft_model(model, cfg)
        elif variant in ("sparse_reference", "sparse_triton"):
            model.requires_grad_(False)
            backend = variant.split("_")[1]
            model = SparseOnly(model.lin, density, backend)
        elif variant in ("sltrain", "sltrain_spmm", "sltrain_reference", "sltrain_add_to"):
            backend = "reference" if variant == "sltrain_reference" else "auto"
            model = get_peft_model(
                model, SLTrainConfig(r=rank, lora_alpha=2 * rank, sparsity=density, target_modules=["lin"])
            )
            if variant == "sltrain_add_to":
                model = SLTrainAddTo(model)
        else:
            raise ValueError(f"unknown variant {variant!r}; choose from {', '.join(LABELS)}")
    path = "spmm" if variant in ("sltrain_spmm", "sltrain_reference", "sltrain_add_to") else "auto"
    return model.to(device=device, dtype=dtype), backend, path


def variants_for(device: torch.device, only: list[str] | None) -> list[str]:
    names = list(LABELS)
    if device.type != "cuda":
        names = [n for n in names if n not in ("sparse_triton", "sltrain_reference")]
    if only:
        unknown = sorted(set(only) - set(LABELS))
        if unknown:
            raise SystemExit(f"unknown variant(s) {unknown}; choose from {', '.join(LABELS)}")
        names = [n for n in names if n in only]
    return names


class Step:
    """One variant's model, input and output gradient, and a timed forward / backward."""

    clock = staticmethod(time.perf_counter)  # --clock cpu: time.process_time (CPU time of this process)

    def __init__(self, variant, shape, rank, device, dtype):
        self.variant = variant
        self.model, self.backend, self.path = build(variant, shape, rank, device, dtype)
        tokens, in_features, out_features, _ = shape
        gen = torch.Generator(device="cpu").manual_seed(1)
        self.x = torch.randn(tokens, in_features, generator=gen).to(device=device, dtype=dtype).requires_grad_(True)
        self.gy = torch.randn(tokens, out_features, generator=gen).to(device=device, dtype=dtype)
        self.device = device
        self.params = [p for p in self.model.parameters() if p.requires_grad]

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def zero_grad(self):
        self.x.grad = None
        for p in self.params:
            p.grad = None

    def run(self) -> tuple[float, float]:
        """One forward + backward; returns (forward seconds, backward seconds)."""
        os.environ[BACKEND_ENV] = self.backend
        os.environ[PATH_ENV] = self.path
        self.zero_grad()
        self._sync()
        t0 = self.clock()
        y = self.model(self.x)
        self._sync()
        t1 = self.clock()
        y.backward(self.gy)
        self._sync()
        t2 = self.clock()
        del y
        return t1 - t0, t2 - t1


# ------------------------------------------------------------------------------------------------------------ timing
def time_shape(shape, names, rank, device, dtype, warmup, repeats) -> dict:
    steps = [Step(n, shape, rank, device, dtype) for n in names]
    samples = {n: [] for n in names}
    for rnd in range(warmup + repeats):
        for step in steps:
            fwd, bwd = step.run()
            if rnd >= warmup:
                samples[step.variant].append((fwd, bwd))
    out = {}
    for name, runs in samples.items():
        fwd = [f for f, _ in runs]
        bwd = [b for _, b in runs]
        both = [f + b for f, b in runs]
        out[name] = {
            "fwd_ms": statistics.median(fwd) * 1e3,
            "bwd_ms": statistics.median(bwd) * 1e3,
            "fwd_bwd_ms": statistics.median(both) * 1e3,
            "fwd_bwd_ms_min": min(both) * 1e3,
            "fwd_bwd_samples_ms": [round(v * 1e3, 2) for v in both],
        }
    if "lora" in samples:
        lora = [f + b for f, b in samples["lora"]]
        for name, runs in samples.items():
            paired = [(f + b) / ref for (f, b), ref in zip(runs, lora)]
            out[name]["vs_lora_paired"] = statistics.median(paired)
            out[name]["vs_lora"] = out[name]["fwd_bwd_ms"] / out["lora"]["fwd_bwd_ms"]
    del steps
    return out


# ------------------------------------------------------------------------------------------------------------ memory
def peak_memory_in_process(step: Step) -> float | None:
    """Peak bytes of one forward + backward above what was allocated before it."""
    if step.device.type == "cuda":
        step.zero_grad()
        torch.cuda.synchronize(step.device)
        torch.cuda.reset_peak_memory_stats(step.device)
        before = torch.cuda.memory_allocated(step.device)
        step.run()
        torch.cuda.synchronize(step.device)
        return float(torch.cuda.max_memory_allocated(step.device) - before)
    peaks = []
    for _ in range(2):
        step.zero_grad()
        reset_hwm()
        _, before = proc_status()
        step.run()
        hwm, _ = proc_status()
        peaks.append(hwm - before)
    return float(min(peaks))


def memory_worker(args) -> None:
    """Child process (CPU): peak memory of each variant at one shape, printed as JSON."""
    shape = parse_shape(args.memory_worker)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    out = {}
    for name in variants_for(device, args.variants):
        step = Step(name, shape, args.rank, device, dtype)
        step.run()  # warm-up: caches, lazily built layouts, allocator state
        out[name] = peak_memory_in_process(step)
        del step
    print("MEMORY-JSON " + json.dumps(out))


def memory_shape(shape, names, args, device, dtype) -> dict:
    if device.type == "cuda":
        out = {}
        for name in names:
            step = Step(name, shape, args.rank, device, dtype)
            step.run()
            out[name] = peak_memory_in_process(step)
            del step
            torch.cuda.empty_cache()
        return out
    if not (Path("/proc/self/clear_refs").exists() and Path("/proc/self/status").exists()):
        return {name: None for name in names}
    cmd = [
        sys.executable, str(Path(__file__).resolve()), "--memory-worker", ",".join(map(str, shape)),
        "--device", "cpu", "--dtype", args.dtype, "--rank", str(args.rank), "--variants", *names,
    ]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("MEMORY-JSON "):
            return json.loads(line[len("MEMORY-JSON "):])
    print(f"memory worker failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}", file=sys.stderr)
    return {name: None for name in names}


# ----------------------------------------------------------------------------------------------------------- report
def parse_shape(text: str):
    parts = text.split(",")
    if len(parts) != 4:
        raise argparse.ArgumentTypeError(f"--shape wants tokens,in,out,density; got {text!r}")
    return int(parts[0]), int(parts[1]), int(parts[2]), float(parts[3])


def shape_key(row) -> tuple:
    return row["tokens"], row["in_features"], row["out_features"], row["density"]


def evaluate_targets(rows: list[dict], device_type: str, dtype: str) -> list[dict]:
    """The issue's targets at their shapes, for the SLTrain layer and for the in-place composition by hand."""
    by = {}
    for r in rows:
        by.setdefault(shape_key(r), {})[r["variant"]] = r
    targets = []
    ours_variants = [("sltrain", "SLTrain"), ("sltrain_spmm", "SLTrain, SpMM path")]
    cpu_targets = [CPU_TARGET, CPU_TARGET_768]
    for shape in cpu_targets if device_type == "cpu" and dtype == "float32" else []:
        v = by.get(shape)
        if not v or "lora" not in v:
            continue
        where = f"d={shape[1]}, tokens={shape[0]}, density {shape[3]}, r=8"
        for ours, name in ours_variants:
            if ours not in v:
                continue
            ratio = v[ours]["fwd_bwd_ms"] / v["lora"]["fwd_bwd_ms"]
            targets.append({
                "name": f"CPU: {name} fwd+bwd <= 1.06x LoRA ({where})",
                "variant": ours, "value": round(ratio, 3), "paired": round(v[ours]["vs_lora_paired"], 3),
                "bound": "<= 1.06", "met": ratio <= 1.06,
            })
            if "densify_lora" in v:
                ours_over = v[ours]["vs_lora_paired"] - 1.0
                dens_over = v["densify_lora"]["vs_lora_paired"] - 1.0
                targets.append({
                    "name": f"CPU: {name} overhead over LoRA <= half the densify layer's ({where}; paired ratios)",
                    "variant": ours, "value": round(ours_over, 3),
                    "bound": f"<= {dens_over / 2:.3f} (densify: {dens_over:.3f})", "met": ours_over <= dens_over / 2,
                })
            mem = [v.get(n, {}).get("peak_mb") for n in (ours, "lora")]
            if all(m is not None for m in mem):
                # one transient out x in fp32 (the fused W0 + S) plus the sparse values' own gradient (nnz fp32),
                # which any implementation with trainable sparse values holds
                bound = (shape[1] * shape[2] + v[ours]["nnz"]) * 4 / 1e6
                targets.append({
                    "name": f"CPU: {name} peak memory above LoRA, MB ({where}; bound: one transient out x in fp32 "
                            "+ the values' gradient)",
                    "variant": ours, "value": round(mem[0] - mem[1], 2), "bound": f"<= {bound:.2f}",
                    "met": mem[0] - mem[1] <= bound,
                })
    if device_type == "cuda" and GPU_TARGET in by and dtype == "bfloat16":
        v = by[GPU_TARGET]
        for ours, name in ours_variants:
            if ours in v and "lora" in v:
                ratio = v[ours]["fwd_bwd_ms"] / v["lora"]["fwd_bwd_ms"]
                targets.append({
                    "name": f"GPU: Triton {name} fwd+bwd <= 1.10x LoRA (d=4096, tokens=8192, density 0.01, r=8, bf16)",
                    "variant": ours, "value": round(ratio, 3), "paired": round(v[ours]["vs_lora_paired"], 3),
                    "bound": "<= 1.10", "met": ratio <= 1.10,
                })
    return targets


def markdown(result: dict) -> str:
    lines = []
    dev = result["device"]
    lines.append(
        f"Device: {dev['name']} ({dev['type']}), dtype {result['settings']['dtype']}, LoRA rank "
        f"{result['settings']['rank']}, torch {result['versions']['torch']}, triton {result['versions']['triton']}, "
        f"peft {result['versions']['peft']}, commit {(result['commit'] or '?')[:10]}"
        f"{' (dirty)' if result['dirty'] else ''}, load average {result['conditions']['loadavg_start']} -> "
        f"{result['conditions'].get('loadavg_end', '(running)')}, {result['settings']['repeats']} timed rounds after "
        f"{result['settings']['warmup']} warm-up, {result['settings']['clock']} clock, "
        f"{result['conditions']['torch_threads']} torch threads."
    )
    lines.append("")
    lines.append(
        "| tokens | in×out | density | variant | fwd ms | bwd ms | fwd+bwd ms | ×LoRA (paired) | peak MB | peak−LoRA MB |"
    )
    lines.append("|---:|:---:|---:|:---|---:|---:|---:|---:|---:|---:|")
    by = OrderedDict()
    for r in result["results"]:
        by.setdefault(shape_key(r), []).append(r)
    for key, rows in by.items():
        lora_peak = next((r["peak_mb"] for r in rows if r["variant"] == "lora"), None)
        for r in rows:
            ratio = f"{r['vs_lora']:.2f} ({r['vs_lora_paired']:.2f})" if "vs_lora" in r else "–"
            peak = "–" if r["peak_mb"] is None else f"{r['peak_mb']:.1f}"
            over = "–" if r["peak_mb"] is None or lora_peak is None else f"{r['peak_mb'] - lora_peak:+.1f}"
            lines.append(
                f"| {key[0]} | {key[1]}×{key[2]} | {key[3]:g} | {LABELS[r['variant']]} | {r['fwd_ms']:.1f} | "
                f"{r['bwd_ms']:.1f} | {r['fwd_bwd_ms']:.1f} | {ratio} | {peak} | {over} |"
            )
    if result.get("targets"):
        lines.append("")
        lines.append("| target | measured | paired | bound | met |")
        lines.append("|:---|---:|---:|:---|:---:|")
        for t in result["targets"]:
            lines.append(
                f"| {t['name']} | {t['value']} | {t.get('paired') if t.get('paired') is not None else '–'} | "
                f"{t['bound']} | {'yes' if t['met'] else 'NO'} |"
            )
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------------------------- main
def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one tiny shape, 1 warm-up + 2 rounds (CI smoke)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--dtype", default=None, help="float32 / bfloat16 / float16 (default: fp32 CPU, bf16 CUDA)")
    parser.add_argument("--shape", action="append", type=parse_shape, help="tokens,in,out,density (repeatable)")
    parser.add_argument("--variants", nargs="+", default=None, help=f"subset of: {', '.join(LABELS)}")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=None, help="warm-up rounds (default 1)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default 5; quick 2)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument(
        "--clock", choices=("wall", "cpu"), default="wall",
        help="wall: elapsed time (default); cpu: this process's CPU time (CPU only; with --threads 1 it is the work "
        "done, much less sensitive to other jobs on a shared machine than elapsed time)",
    )
    parser.add_argument("--out", default=None, help="results JSON path (default bench/results/sparse_delta-<device>.json)")
    parser.add_argument("--print", dest="print_json", default=None, help="print the markdown of a results file, exit")
    parser.add_argument("--memory-worker", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.print_json:
        return print_saved(args.print_json, markdown)

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    if args.dtype is None:
        args.dtype = "bfloat16" if device.type == "cuda" else "float32"
    dtype = getattr(torch, args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "cpu":
        if device.type == "cuda":
            raise SystemExit("--clock cpu measures CPU time; on CUDA use the default wall clock")
        Step.clock = staticmethod(time.process_time)
    if args.memory_worker:
        memory_worker(args)
        return {}

    import sparse_lowrank_peft  # noqa: F401  (registers the tuners with PEFT)

    shapes = args.shape or (QUICK_SHAPES if args.quick else GPU_SHAPES if device.type == "cuda" else CPU_SHAPES)
    warmup = args.warmup if args.warmup is not None else 1
    repeats = args.repeats if args.repeats is not None else (2 if args.quick else 5)
    names = variants_for(device, args.variants)
    info = device_info(device)
    commit, dirty = git_commit("bench/sparse_delta.py")
    result = {
        "bench": "sparse_delta",
        "schema": 1,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "device": info,
        "versions": versions(),
        "commit": commit,
        "dirty": dirty,
        "settings": {"dtype": args.dtype, "rank": args.rank, "warmup": warmup, "repeats": repeats,
                     "variants": names, "quick": args.quick, "clock": args.clock},
        "conditions": {"loadavg_start": loadavg(), "torch_threads": torch.get_num_threads()},
        "results": [],
    }
    suffix = "" if args.clock == "wall" else "-cputime"
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / f"sparse_delta-{device_slug(info)}{suffix}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    saved = {k: os.environ.get(k) for k in (BACKEND_ENV, PATH_ENV)}
    try:
        run_shapes(shapes, names, args, device, dtype, warmup, repeats, result, out)
    finally:  # Step.run sets the backend / path variables per variant; leave the caller's environment as it was
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    result["conditions"]["loadavg_end"] = loadavg()
    result["targets"] = evaluate_targets(result["results"], info["type"], args.dtype)
    result["complete"] = True
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(markdown(result))
    print(f"\nwrote {out}", file=sys.stderr)
    return result


def run_shapes(shapes, names, args, device, dtype, warmup, repeats, result, out: Path) -> None:
    """Time (and measure) every shape; the results file is rewritten after each one (``complete: false``)."""
    from sparse_lowrank_peft.delta.support import support_nnz

    for shape in shapes:
        t0 = time.time()
        timing = time_shape(shape, names, args.rank, device, dtype, warmup, repeats)
        memory = {n: None for n in names} if args.no_memory else memory_shape(shape, names, args, device, dtype)
        tokens, in_features, out_features, density = shape
        for name in names:
            peak = memory.get(name)
            result["results"].append({
                "tokens": tokens, "in_features": in_features, "out_features": out_features, "density": density,
                "nnz": support_nnz((out_features, in_features), density), "variant": name, "label": LABELS[name],
                **{k: (round(v, 3) if isinstance(v, float) else v) for k, v in timing[name].items()},
                "peak_mb": None if peak is None else round(peak / 1e6, 2),
            })
        print(f"[{time.time() - t0:6.1f}s] {shape} load {loadavg()}", file=sys.stderr, flush=True)
        out.write_text(json.dumps({**result, "complete": False}, indent=1) + "\n")


if __name__ == "__main__":
    main()
