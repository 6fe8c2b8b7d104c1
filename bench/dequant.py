"""bitsandbytes' CPU code paths for 4-bit weights, measured on this machine: which dequantization is exact, how fast
each is, and what the AVX-512-BF16 repack gains and costs.

* dequantize: per shape, relative error against ``delta.quant.dequantize_4bit_reference`` and time of bitsandbytes'
  native kernel on the 2-D weight (what its own ``Linear4bit`` and ``F.dequantize_4bit`` run), the same kernel on the
  weight as one flat row (``CPU_DEQUANTIZE="bnb"``, the default) and the PyTorch reference (``"torch"``);
* repack (only where ``has_avx512bf16()``): eval-mode ``Linear4bit`` forward, standard vs repacked, and how far one
  ``state_dict()`` + eval forward moves a non-nested layer's output.

    python bench/dequant.py               # writes bench/results/dequant-cpu.json
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _env import ROOT, cpu_name, device_info, git_commit, loadavg, versions  # noqa: E402

SHAPES = [(64, 48), (96, 80), (37, 23), (384, 384), (1536, 384), (768, 768), (3072, 768), (4096, 4096)]
FORWARD_SHAPES = [(384, 384), (1536, 384), (768, 768)]


def best_ms(fn, repeats: int = 7) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return round(min(times) * 1e3, 4)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def dequantize_row(shape) -> dict:
    from bitsandbytes import functional as F

    from sparse_lowrank_peft.delta import quant

    W = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    q, state = F.quantize_4bit(W, quant_type="nf4", blocksize=64, compress_statistics=True)
    absmax = F.dequantize_blockwise(state.absmax, state.state2) + state.offset
    ref = quant.dequantize_4bit_reference(q, absmax, "nf4", 64, shape)
    row = {"shape": list(shape), "round_trip_error": round(rel(ref, W), 4)}
    paths = {"bnb_2d": lambda: F.dequantize_4bit(q, state)}
    for name in ("bnb", "torch"):
        paths[f"flat_{name}" if name == "bnb" else name] = (lambda n=name: _with_path(quant, n, q, state))
    for name, fn in paths.items():
        row[name] = {"error_vs_reference": rel(fn(), ref), "ms": best_ms(fn)}
    return row


def _with_path(quant, name, q, state):
    saved = quant.CPU_DEQUANTIZE
    quant.CPU_DEQUANTIZE = name
    try:
        return quant.dequantize_4bit(q, state)
    finally:
        quant.CPU_DEQUANTIZE = saved


def repack_row(shape, tokens: int) -> dict:
    from sparse_lowrank_peft.delta.quant import to_linear4bit

    out_f, in_f = shape
    torch.manual_seed(0)
    lin = torch.nn.Linear(in_f, out_f)
    x = torch.randn(tokens, in_f)
    row = {"shape": list(shape), "tokens": tokens}
    outputs = {}
    for packed in (False, True):
        layer = to_linear4bit(lin).eval()
        layer.support_avx512bf16_for_cpu = packed
        with torch.no_grad():
            outputs[packed] = layer(x)
            row["repacked_ms" if packed else "standard_ms"] = best_ms(lambda: layer(x))
    row["speedup"] = round(row["standard_ms"] / row["repacked_ms"], 3)
    row["output_difference"] = rel(outputs[True], outputs[False])
    return row


def save_then_eval_drift(nested: bool) -> float:
    """Relative change of a repacked 384x384 layer's eval output after one ``state_dict()`` and another eval."""
    from sparse_lowrank_peft.delta.quant import to_linear4bit

    torch.manual_seed(0)
    layer = to_linear4bit(torch.nn.Linear(384, 384), compress_statistics=nested).eval()
    layer.support_avx512bf16_for_cpu = True
    x = torch.randn(4, 384)
    with torch.no_grad():
        before = layer(x)
        layer.state_dict()
        after = layer(x)
    return rel(after, before)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "dequant-cpu.json"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tokens", type=int, default=4096)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from bitsandbytes import __version__ as bnb_version
    from bitsandbytes.functional import has_avx512bf16

    commit, dirty = git_commit("bench/dequant.py")
    result = {
        "command": "python bench/dequant.py " + " ".join(argv or sys.argv[1:]),
        "commit": commit, "dirty": dirty, "device": device_info(torch.device("cpu")), "cpu": cpu_name(),
        "versions": {**versions(), "bitsandbytes": bnb_version}, "loadavg": loadavg(),
        "avx512_bf16": bool(has_avx512bf16()), "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "dequantize": [dequantize_row(s) for s in SHAPES],
    }
    if result["avx512_bf16"]:
        result["repack_forward"] = [repack_row(s, args.tokens) for s in FORWARD_SHAPES]
        result["save_then_eval_drift"] = {"flat_absmax": save_then_eval_drift(False),
                                          "nested_absmax": save_then_eval_drift(True)}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
