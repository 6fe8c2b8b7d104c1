"""Would another maintained quantizer give a bit budget more for its bits than HQQ and bitsandbytes?

Issue #21 asks for the next maintained library if HQQ turns out wrong for bit budgets. This quantizes one MiniLM
encoder matrix of each shape with every sub-8-bit weight format that each installed library offers on a CPU, and
records, as ``delta/bitbudget.py`` does for its own candidates, the bits it stores per parameter (counted from the
tensors it keeps: codes, scales, zeros or shifts) and the relative error ``‖W − Q‖ / ‖W‖``:

- our candidates: HQQ 2/3/4-bit at groups 64 and 128 (fp16 scale and zero), bitsandbytes NF4 with double quant;
- optimum-quanto: ``qint2`` / ``qint4`` through its ``QLinear`` (group 128, chosen by quanto), on an fp16 layer, so
  scales and shifts are fp16 as HQQ's are;
- torchao: ``IntxWeightOnlyConfig`` int2 / int3 / int4 at group 64, in the one packing format it has for a CPU.

A library that is not installed is left out of the file (``pip install optimum-quanto torchao`` for all rows).

    python bench/other_quantizers.py     # writes bench/results/other-quantizers-minilm.json
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _env import ROOT, provenance  # noqa: E402

from sparse_lowrank_peft.delta import bitbudget as bb  # noqa: E402
from sparse_lowrank_peft.delta.quant import dequantize_weight  # noqa: E402

OURS = ["hqq-2bit-g64", "hqq-2bit-g128", "hqq-3bit-g64", "hqq-3bit-g128", "hqq-4bit-g64", "hqq-4bit-g128",
        "bnb-nf4-dq"]


def leaf_bits(t: torch.Tensor) -> int:
    """Bits of the plain tensors a tensor subclass keeps (recursing through ``__tensor_flatten__``)."""
    if hasattr(t, "__tensor_flatten__"):
        return sum(leaf_bits(getattr(t, name)) for name in t.__tensor_flatten__()[0])
    return t.numel() * t.element_size() * 8


def linear_of(weight: torch.Tensor, dtype: torch.dtype) -> torch.nn.Linear:
    linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False).to(dtype)
    with torch.no_grad():
        linear.weight.copy_(weight)
    return linear


def ours(weight: torch.Tensor, name: str) -> tuple[float, torch.Tensor]:
    layer = bb.parse_choice(name).quantize(weight)
    return bb.storage_bits(layer), dequantize_weight(layer)


def quanto(weight: torch.Tensor, qtype: str) -> tuple[float, torch.Tensor]:
    from optimum import quanto as oq

    model = torch.nn.Sequential(linear_of(weight, torch.float16))
    oq.quantize(model, weights=getattr(oq, qtype))
    oq.freeze(model)
    return leaf_bits(model[0].weight), model[0].weight.dequantize()


def torchao(weight: torch.Tensor, bits: int) -> tuple[float, torch.Tensor]:
    from torchao.quantization import IntxWeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerGroup

    linear = linear_of(weight, torch.float32)
    quantize_(linear, IntxWeightOnlyConfig(weight_dtype=getattr(torch, f"int{bits}"), granularity=PerGroup(64)))
    return leaf_bits(linear.weight), linear.weight.dequantize()


def formats() -> list[tuple[str, str, callable]]:
    """(library, format, quantizer) for every installed library."""
    rows = [("ours", name, lambda w, n=name: ours(w, n)) for name in OURS]
    installed = {dist: _installed(dist) for dist in ("optimum-quanto", "torchao")}
    if installed["optimum-quanto"]:
        rows += [("optimum-quanto", q, lambda w, q=q: quanto(w, q)) for q in ("qint2", "qint4")]
    if installed["torchao"]:
        rows += [("torchao", f"int{b}-g64", lambda w, b=b: torchao(w, b)) for b in (2, 3, 4)]
    return rows


def _installed(dist: str) -> bool:
    try:
        importlib.metadata.version(dist)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "other-quantizers-minilm.json"))
    args = p.parse_args(argv)
    from bitbudget import minilm, minilm_linears, one_per_shape

    by_shape = one_per_shape(minilm_linears(minilm()))
    rows = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchao's notices about its CUDA-only extensions
        for library, fmt, quantize in formats():
            for shape, (layer, w) in by_shape.items():
                bits, deq = quantize(w)
                rows.append({"library": library, "format": fmt, "layer": layer, "shape": list(shape),
                             "bits_per_param": bits / w.numel(),
                             "relative_error": float((deq.float() - w).norm() / w.norm())})
    libs = {d: importlib.metadata.version(d) for d in ("hqq", "bitsandbytes", "optimum-quanto", "torchao")
            if _installed(d)}
    result = {**provenance("bench/other_quantizers.py", argv, **libs), "rows": rows}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    for r in rows:
        print(f"{r['library']:15s} {r['format']:14s} {str(r['shape']):12s} {r['bits_per_param']:.3f} bits  "
              f"rel. error {r['relative_error']:.4f}")
    return result


if __name__ == "__main__":
    main()
