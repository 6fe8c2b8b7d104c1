"""Does HQQ's second-level quantization of scales and zeros (``quant_scale`` / ``quant_zero``) save bits?

LQ-LoRA's budgets (2.5 / 2.75 / 3.25 bits) rest on 8-bit scales: its NF-k codes at group 64 cost ``k + 8/64`` bits
plus a little, where HQQ's fp16 scale and zero cost ``k + 32/64``. HQQ 0.2.x still accepts ``quant_scale`` and
``quant_zero`` in ``BaseQuantizeConfig`` (with a deprecation warning). This measures, on MiniLM's encoder linears
of each shape, the stored bits per parameter (counted from the layer's tensors, as ``delta/bitbudget.py`` does) and
the relative error ``‖W − Q‖ / ‖W‖`` of each configuration with and without them.

    python bench/hqq_meta.py     # writes bench/results/hqq-meta-minilm.json
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _env import ROOT, provenance  # noqa: E402

CONFIGS = [(2, 32), (2, 64), (3, 64), (3, 128), (4, 64)]


def quantized(weight: torch.Tensor, bits: int, group: int, meta: bool):
    """An ``HQQLinear`` of ``weight`` (fp16 metadata, as bitbudget stores it), HQQ's deprecation print silenced."""
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    with torch.no_grad():
        linear.weight.copy_(weight)
    with contextlib.redirect_stdout(io.StringIO()):
        config = BaseQuantizeConfig(nbits=bits, group_size=group, quant_scale=meta, quant_zero=meta)
        return HQQLinear(linear, quant_config=config, compute_dtype=torch.float16, device="cpu", del_orig=True)


def measure(weight: torch.Tensor, bits: int, group: int, meta: bool) -> dict:
    from sparse_lowrank_peft.delta.bitbudget import storage_bits

    layer = quantized(weight, bits, group, meta)
    error = (layer.dequantize().float() - weight).norm() / weight.norm()
    return {"bits": bits, "group_size": group, "quant_scale_zero": meta,
            "bits_per_param": storage_bits(layer) / weight.numel(), "relative_error": float(error)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "hqq-meta-minilm.json"))
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT / "bench"))
    from bitbudget import minilm, minilm_linears, one_per_shape

    by_shape = one_per_shape(minilm_linears(minilm()))
    rows = [{"layer": name, "shape": list(shape), **measure(w, b, g, meta)}
            for shape, (name, w) in by_shape.items() for b, g in CONFIGS for meta in (False, True)]
    import hqq

    result = {**provenance("bench/hqq_meta.py", argv, hqq=getattr(hqq, "__version__", "unknown")), "rows": rows}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    for r in rows:
        print(f"{r['layer']:45s} {r['bits']}-bit g{r['group_size']:<4d} meta-quant={r['quant_scale_zero']!s:5s} "
              f"{r['bits_per_param']:.3f} bits  rel. error {r['relative_error']:.4f}")
    return result


if __name__ == "__main__":
    main()
