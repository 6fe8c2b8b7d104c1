"""Evaluate adapter folders on a GLUE dev set with plain PEFT: the LoRA-Squeeze quality check.

Usage::

    GLUE_DIR=/work/shared/glue python bench/eval_adapter.py --task sst2 --max-seq-len 64 \\
        r16=runs/glue/minilm/lora-r16-sst2/adapter squeezed-r4=runs/squeeze/sst2-r16-to-r4 \\
        r4=runs/glue/minilm/lora-r4-sst2/adapter --json bench/results/squeeze-quality-minilm.json

Each ``LABEL=FOLDER`` is loaded with ``PeftModel.from_pretrained`` (``load_lq_lora`` for a folder with
``lq_lora.json``, which rebuilds its quantized base) onto the same base model the GLUE runner trains
(``--model``, default the bundled MiniLM, with the task's label count). A GLUE run's adapter whose 4-bit base it does
not record (``quantize`` without LQ init, as in QLoRA; or an LQ run saved before adapters recorded the whole base)
gets that base rebuilt from the run's ``run_config.json`` beside the folder (:func:`run_base`). It is scored on the
task's evaluation splits
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
             data=None, logits_out: dict | None = None) -> dict:
    """``{split: metrics}`` of the adapter folder on ``task_name``'s evaluation splits (``logits_out[split]``: the
    logits, if a dict is given)."""
    import numpy as np
    import torch
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
    peft_model = load_adapter(base, folder).eval()
    collate = DataCollatorWithPadding(tokenizer)
    out = {}
    for split, dataset in data.evals.items():
        encoded = tokenize(dataset, tokenizer, max_seq_len, f"tokenize {split}")
        logits, labels = [], []
        with torch.no_grad():
            for batch in DataLoader(encoded, batch_size=batch_size, collate_fn=collate):
                labels.append(batch.pop("labels").numpy())
                logits.append(peft_model(**batch).logits.float().numpy())
        logits = np.concatenate(logits)
        if logits_out is not None:
            logits_out[split] = logits
        preds = predictions_from_logits(task, logits)
        out[split] = task.compute_metrics(preds, np.concatenate(labels))
        out[split]["examples"] = int(len(encoded))
    return out


def load_adapter(base, folder: str):
    """The adapter ``folder`` (PEFT's or one of this package's methods) on ``base``, with the 4-bit base it was
    trained on (:func:`run_base`)."""
    from peft import PeftModel

    import sparse_lowrank_peft  # noqa: F401  (registers this package's methods with PEFT)

    before, after = run_base(folder)
    before(base)
    if (Path(folder) / "lq_lora.json").is_file():  # PEFT LoRA on an LQ base: rebuild that base first
        from sparse_lowrank_peft import load_lq_lora

        model = load_lq_lora(base, folder)
    else:
        model = PeftModel.from_pretrained(base, folder)
    after(model)
    return model


def run_base(folder: str):
    """``(before, after)``: what to do to the base model before loading the adapter ``folder`` and to the loaded model
    after, so that the base is the 4-bit one its GLUE run trained on, read from the run's ``run_config.json`` (the
    folder's parent). Both do nothing for a folder outside a GLUE run, a full-precision run, or an adapter that
    records its base itself (``lq_plan`` / ``lq_lora.json`` plan).

    * ``quantize: nf4|fp4|int8`` without LQ init (QLoRA: the base is the user's): its linears, head excepted, before;
    * ``quantize: plan`` without LQ init: the plan the run recorded in its ``results.json``, before;
    * ``quantize: nf4|fp4`` with LQ init saved before the adapter recorded the whole base: the linears LQ left in
      full precision, after (LQ init needs them full precision while it runs).
    """
    run_config = Path(folder).parent / "run_config.json"
    run = json.loads(run_config.read_text()) if run_config.is_file() else {}
    quantize, lq = run.get("quantize"), run.get("init") == "lq"
    if not quantize or (lq and _records_its_base(folder)):
        return _nothing, _nothing
    if quantize == "plan" and lq:
        raise SystemExit(f"{folder}: an LQ plan run's adapter without lq_plan in adapter_config.json; it cannot be "
                         "rebuilt. Fix: run the recipe again.")
    if quantize == "plan":
        plan = _run_plan(Path(folder).parent, run_config)
        from sparse_lowrank_peft.delta.bitbudget import apply_plan

        return (lambda model: print(f"[eval_adapter] base: {apply_plan(model, plan)} linears by the run's plan"),
                _nothing)
    from glue.model import head_module_names, quantizable_linears, quantize_base

    names: list[str] = []  # the base's linears, head excepted, named on the plain model (no adapter layers yet)

    def before(model):
        names.extend(quantizable_linears(model, run.get("head_modules") or head_module_names(model)))
        if not lq:
            quantize_base(model, names, quantize)

    def after(model):  # LQ's wrapped targets are no nn.Linear any more, so only the rest is quantized
        if lq:
            quantize_base(model, names, quantize)

    return before, after


def _nothing(model) -> None:
    return None


def _run_plan(run_dir: Path, run_config: Path) -> dict[str, str]:
    """The plan a non-LQ ``quantize: plan`` run recorded in its ``results.json``."""
    results = run_dir / "results.json"
    plan = (json.loads(results.read_text()).get("method_results", {}).get("quantization", {}).get("plan")
            if results.is_file() else None)
    if not plan:
        raise SystemExit(f"{run_dir}: its run quantized the base by a plan ({run_config}), but {results} does not "
                         "hold the plan (method_results.quantization.plan). Fix: run the recipe again, or load "
                         "the adapter in code onto the base quantized with that plan (bitbudget.apply_plan).")
    return plan


def _records_its_base(folder: str) -> bool:
    """Whether an LQ adapter folder names its whole quantized base (``lq_plan``, or the plan in ``lq_lora.json``)."""
    lq_lora = Path(folder) / "lq_lora.json"
    if lq_lora.is_file():
        return bool(json.loads(lq_lora.read_text()).get("plan"))
    return bool(json.loads((Path(folder) / "adapter_config.json").read_text()).get("lq_plan"))


def agreement(z, z_ref) -> dict:
    """How close logits ``z`` are to ``z_ref`` (same examples): equal argmax share, relative Frobenius error."""
    import numpy as np

    return {"same_prediction": float((z.argmax(-1) == z_ref.argmax(-1)).mean()),
            "logit_rel_error": float(np.linalg.norm(z - z_ref) / np.linalg.norm(z_ref))}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Score adapter folders on a GLUE dev set with plain PEFT.")
    parser.add_argument("adapters", nargs="+", metavar="LABEL=FOLDER")
    parser.add_argument("--task", required=True)
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--max-seq-len", type=int, default=128)
    parser.add_argument("--data-dir", default=None, help="GLUE folder (default $GLUE_DIR)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", help="merge the scores into this JSON file under [task][label]")
    parser.add_argument("--reference", metavar="LABEL",
                        help="also compare every other adapter's logits with this one's: the share of equal "
                             "predictions and the relative logit error ‖z − z_ref‖ / ‖z_ref‖")
    args = parser.parse_args(argv)
    import torch

    from glue.data import load_glue
    from glue.tasks import get_task

    if args.threads:
        torch.set_num_threads(args.threads)
    items = [item.partition("=") for item in args.adapters]  # checked before any data or model is loaded
    for label, sep, folder in items:
        if not sep:
            parser.error(f"{label!r} is not LABEL=FOLDER")
    if args.reference and args.reference not in [label for label, _, _ in items]:
        parser.error(f"--reference {args.reference!r} names none of the adapters' labels")
    items.sort(key=lambda item: item[0] != args.reference)  # the reference first
    data = load_glue(args.task, args.data_dir)
    main_metric = get_task(args.task).main_metric
    results, logits = {}, {}
    for label, _, folder in items:
        t0 = time.time()
        logits[label] = {}
        scores = evaluate(folder, args.task, args.model, args.max_seq_len, args.data_dir, data=data,
                          logits_out=logits[label])
        entry = {"folder": folder, "scores": scores, "eval_s": time.time() - t0}
        if args.reference and label != args.reference:
            entry["vs_reference"] = {split: agreement(z, logits[args.reference][split]) for split, z in
                                     logits[label].items()}
        info = Path(folder) / "export_info.json"
        if info.is_file():
            meta = json.loads(info.read_text())
            entry["ranks"] = sorted(set(meta.get("ranks", {}).values()))
        cfg = json.loads((Path(folder) / "adapter_config.json").read_text())
        entry["r"] = cfg.get("r")
        results[label] = entry
        first = next(iter(scores.values()))
        against = next(iter(entry.get("vs_reference", {}).values()), None)
        print(f"{args.task} {label}: {main_metric}={first[main_metric]:.4f} ({folder})" + (
            f"; vs {args.reference}: {against['same_prediction']:.4f} same predictions, relative logit error "
            f"{against['logit_rel_error']:.4f}" if against else ""), flush=True)
    if args.json:
        path = Path(args.json)
        merged = json.loads(path.read_text()) if path.is_file() else {}
        merged.setdefault(args.task, {}).update(results)
        meta = merged.setdefault("_meta", {}).setdefault(args.task, {})
        command = "python bench/eval_adapter.py " + " ".join(sys.argv[1:] if argv is None else argv)
        meta.update(model=args.model, max_seq_len=args.max_seq_len, main_metric=main_metric,
                    commands=sorted({*meta.get("commands", []), command}))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(merged, indent=2, sort_keys=True))
        print(f"scores merged into {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
