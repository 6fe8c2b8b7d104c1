"""Evaluate adapter folders on a GLUE dev set with plain PEFT: the LoRA-Squeeze quality check.

Usage::

    GLUE_DIR=/work/shared/glue python bench/eval_adapter.py --task sst2 --max-seq-len 64 \\
        r16=runs/glue/minilm/lora-r16-sst2/adapter squeezed-r4=runs/squeeze/sst2-r16-to-r4 \\
        r4=runs/glue/minilm/lora-r4-sst2/adapter --json bench/results/squeeze-quality-minilm.json

Each ``LABEL=FOLDER`` is loaded with ``PeftModel.from_pretrained`` (``load_lq_lora`` for a folder with
``lq_lora.json``, which rebuilds its quantized base) onto the same base model the GLUE runner trains
(``--model``, default the bundled MiniLM, with the task's label count), and scored on the task's evaluation splits
with the harness's own data reading (``glue.data``), tokenisation (``glue.data.tokenize``) and metrics
(``glue.tasks``), so the numbers are comparable with the runner's ``results.json``. ``--json`` merges the scores into
the file under ``[task][label]`` (with each folder's ``export_info.json`` ranks when it has one).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def evaluate(folder: str, task_name: str, model: str, max_seq_len: int, data_dir, batch_size: int = 64,
             data=None) -> dict:
    """``{split: metrics}`` of the adapter folder on ``task_name``'s evaluation splits."""
    import numpy as np
    import torch
    from peft import PeftModel
    from torch.utils.data import DataLoader
    from transformers import DataCollatorWithPadding

    from glue.config import RunConfig
    from glue.data import load_glue, tokenize
    from glue.model import load_model_and_tokenizer
    from glue.tasks import predictions_from_logits

    data = data or load_glue(task_name, data_dir)
    task = data.task
    cfg = RunConfig(task=task_name, model=model, max_seq_len=max_seq_len)
    base, tokenizer, _ = load_model_and_tokenizer(cfg, task)
    if (Path(folder) / "lq_lora.json").is_file():  # PEFT LoRA on an LQ base: rebuild that base first
        from sparse_lowrank_peft import load_lq_lora

        peft_model = load_lq_lora(base, folder).eval()
    else:
        peft_model = PeftModel.from_pretrained(base, folder).eval()
    collate = DataCollatorWithPadding(tokenizer)
    out = {}
    for split, dataset in data.evals.items():
        encoded = tokenize(dataset, tokenizer, max_seq_len, f"tokenize {split}")
        logits, labels = [], []
        with torch.no_grad():
            for batch in DataLoader(encoded, batch_size=batch_size, collate_fn=collate):
                labels.append(batch.pop("labels").numpy())
                logits.append(peft_model(**batch).logits.float().numpy())
        preds = predictions_from_logits(task, np.concatenate(logits))
        out[split] = task.compute_metrics(preds, np.concatenate(labels))
        out[split]["examples"] = int(len(encoded))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Score adapter folders on a GLUE dev set with plain PEFT.")
    parser.add_argument("adapters", nargs="+", metavar="LABEL=FOLDER")
    parser.add_argument("--task", required=True)
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--max-seq-len", type=int, default=128)
    parser.add_argument("--data-dir", default=None, help="GLUE folder (default $GLUE_DIR)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", help="merge the scores into this JSON file under [task][label]")
    args = parser.parse_args(argv)
    import torch

    from glue.data import load_glue
    from glue.tasks import get_task

    if args.threads:
        torch.set_num_threads(args.threads)
    data = load_glue(args.task, args.data_dir)
    main_metric = get_task(args.task).main_metric
    results = {}
    for item in args.adapters:
        label, sep, folder = item.partition("=")
        if not sep:
            parser.error(f"{item!r} is not LABEL=FOLDER")
        t0 = time.time()
        scores = evaluate(folder, args.task, args.model, args.max_seq_len, args.data_dir, data=data)
        entry = {"folder": folder, "scores": scores, "eval_s": time.time() - t0}
        info = Path(folder) / "export_info.json"
        if info.is_file():
            meta = json.loads(info.read_text())
            entry["ranks"] = sorted(set(meta.get("ranks", {}).values()))
        cfg = json.loads((Path(folder) / "adapter_config.json").read_text())
        entry["r"] = cfg.get("r")
        results[label] = entry
        first = next(iter(scores.values()))
        print(f"{args.task} {label}: {main_metric}={first[main_metric]:.4f} ({folder})", flush=True)
    if args.json:
        path = Path(args.json)
        merged = json.loads(path.read_text()) if path.is_file() else {}
        merged.setdefault(args.task, {}).update(results)
        merged.setdefault("_meta", {})[args.task] = {"model": args.model, "max_seq_len": args.max_seq_len,
                                                    "main_metric": main_metric}
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(merged, indent=2, sort_keys=True))
        print(f"scores merged into {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
