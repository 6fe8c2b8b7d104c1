"""The causal-LM runner: a YAML recipe (plus ``key=value`` overrides) -> a fine-tuned adapter and a results JSON.

Usage::

    python -m causal_lm.run RECIPE.yaml [key=value ...] [--resume] [--dry-run] [--FIELD VALUE ...]
    slpeft-lm recipes/llm/sltrain-qlora.yaml model=meta-llama/Llama-3.2-1B train_file=corpus.txt
    python -m causal_lm.run --list-fields | --list-methods

What a run does, in this order, so that a mistake in the recipe or the data is reported before training:

1. check the recipe's fields, files, the method and its config fields, and the output folder;
2. load the tokenizer and cut the text into blocks (validation: ``eval_file`` or the held-out tail);
3. load the base, quantize it (``quantize``; ``init: lq`` splits each linear into ``Q + L``), add the adapter;
4. measure the validation loss, train with ``transformers.Trainer`` (the method's callbacks: SoRA's gate step,
   DyLoRA's rank sampling, In-Squeeze's rank annealing), measure it again (DyLoRA: at ranks 1, 2, 4, ..., r; SoRA:
   prune the closed ranks);
5. save the adapter (``<output_dir>/adapter``), optionally a plain LoRA export and a reload check, then
   LoRA-Squeeze (``squeeze``: post, cont or in), and write ``<output_dir>/results.json``.
"""

from __future__ import annotations

import math
import shutil
import sys
import time
from pathlib import Path
from typing import Sequence

from glue import results as glue_results
from glue.errors import GlueError
from glue.model import model_short_name
from glue.run import list_methods, recipe_main
from glue.train import (
    check_target_rank, checkpoint_step, export_lora, is_main_process, method_results, run_callbacks,
    squeeze_after_training, trainer_class,
)

from causal_lm.config import LMRunConfig, build_config, validate_config
from causal_lm.data import load_data
from causal_lm.model import build_model, check_block_size, check_vocabulary, load_tokenizer, model_path

USAGE = """usage: python -m causal_lm.run RECIPE.yaml [field=value ...] [--resume] [--dry-run] [--FIELD VALUE ...]
       python -m causal_lm.run --list-fields | --list-methods

Fine-tunes a causal LM with an adapter on a text file from a YAML recipe (recipes/llm/).

  field=value       override a recipe field (YAML value), e.g. model=meta-llama/Llama-3.2-1B peft.r=16 max_steps=500
  --FIELD VALUE     the same with a flag, e.g. --train-file corpus.txt --block-size 512
  --resume          continue from the last checkpoint in output_dir (needs save_steps > 0)
  --dry-run         check recipe, data, model and method, print the plan, and stop before training
  --list-fields     print every recipe field with its default and meaning
  --list-methods    print the available methods
"""


def run(cfg: LMRunConfig, resume: bool = False, dry_run: bool = False) -> dict:
    """Fine-tune as ``cfg`` says; return the results (also written to ``<output_dir>/results.json``).

    Raises:
        GlueError: any problem with the recipe, the data, the model or the output folder -- before training.
    """
    validate_config(cfg)
    start = time.time()
    out = output_dir(cfg)
    if not dry_run:
        check_output_dir(cfg, out, resume)
    if cfg.num_threads:
        import torch

        torch.set_num_threads(cfg.num_threads)
    args = training_arguments(cfg, out)
    with args.main_process_first(local=False, desc="the tiny model and the output folder"):
        path = model_path(cfg)  # the main process builds the tiny model once; the others then read it
        if args.process_index == 0 and not dry_run:
            open_output_dir(cfg, out, resume)
    check_block_size(cfg, path)
    tokenizer = load_tokenizer(cfg, path)
    check_vocabulary(cfg, tokenizer, path)
    data = load_data(cfg, tokenizer)
    built = build_model(cfg, path, data, args.device)
    check_target_rank(built.model, cfg.export_lora_rank, "export_lora_rank", relative_to="original")
    squeeze_spec, callbacks = run_callbacks(cfg, built.model)
    print(f"[lm] {cfg.model}, method {cfg.method}: {built.params[0]:,} trainable of {built.params[1]:,} parameters; "
          f"{len(data.train)} training and {len(data.eval)} validation sequences of up to {cfg.block_size} tokens "
          f"from {data.source}", flush=True)
    if dry_run:
        return {"dry_run": True, "method": cfg.method, "output_dir": str(out), "train_blocks": len(data.train),
                "eval_blocks": len(data.eval), "params": {"trainable": built.params[0], "total": built.params[1]}}

    trainer = make_trainer(args, built.model, data, callbacks)
    train_start = time.time()
    first_step = _resumed_step(out) + 1 if resume else 1
    output = trainer.train(resume_from_checkpoint=True if resume else None)
    train_s = time.time() - train_start
    before = initial_loss(trainer)
    after = trainer.evaluate()["eval_loss"]
    adapter, extras = finish_training(cfg, trainer, built, data, out, after, squeeze_spec)
    if not trainer.is_world_process_zero():  # the main process exports, checks and writes the results
        return {"process_index": args.process_index, "eval": {"loss_before": before, "loss_after": after}}
    results = results_record(cfg, data, built, trainer, output, (before, after), adapter, extras,
                             (train_s, time.time() - start), first_step)
    glue_results.write_json(out / "results.json", results)
    print(f"[lm] validation perplexity {math.exp(before):.3f} -> {math.exp(after):.3f}; "
          f"adapter in {adapter['path']}; results in {out / 'results.json'}", flush=True)
    return results


def finish_training(cfg: LMRunConfig, trainer, built, data, out: Path, loss: float, squeeze_spec):
    """After training, in this order: the method's extras (DyLoRA's per-rank losses; SoRA prunes), the saved
    adapter, the plain LoRA export and the reload check (main process), then LoRA-Squeeze, which consumes the
    trained model, and the squeezed adapter's reload check. Returns ``(adapter record, extras of the results)``."""
    method = method_results(cfg.method, trainer, built.model, out)
    adapter = save_adapter(trainer, built.model, out)
    extras = after_training(cfg, built, data, out, loss) if trainer.is_world_process_zero() else {}
    if squeeze_spec is not None:
        trainer.accelerator.wait_for_everyone()
        method = {**(method or {}), "squeeze": squeeze(cfg, squeeze_spec, trainer, built.model, out, loss)}
        if cfg.verify_reload and trainer.is_world_process_zero():
            extras["squeeze_reload"] = squeezed_reload_check(cfg, built, data, method["squeeze"])
    return adapter, {"method_results": method, **extras}


def output_dir(cfg: LMRunConfig) -> Path:
    """``output_dir``, else ``runs/lm/<model>/<method>``."""
    return Path(cfg.output_dir) if cfg.output_dir else Path("runs") / "lm" / model_short_name(cfg.model) / cfg.method


def initial_loss(trainer) -> float:
    """The validation loss before the first step: the Trainer's own evaluation at step 0 (``eval_on_start``; kept in
    a resumed run's history). Not a ``trainer.evaluate()`` before ``train()``: under torchrun that left the model
    without DistributedDataParallel's gradient averaging, and the two processes trained apart (measured: different
    weights on the two ranks after 4 steps)."""
    return next(e["eval_loss"] for e in trainer.state.log_history if "eval_loss" in e and e.get("step") == 0)


def check_output_dir(cfg: LMRunConfig, out: Path, resume: bool) -> None:
    """Before the slow steps, on the main process (another rank may already see its folder): a new run needs an
    empty folder or ``overwrite_output_dir``; ``--resume`` needs a checkpoint. Changes nothing."""
    if not is_main_process():
        return
    if resume:
        if not list(out.glob("checkpoint-*")):
            raise GlueError(f"--resume: {out} has no checkpoint-* folder. A run writes them when save_steps > 0.")
    elif out.is_dir() and any(out.iterdir()) and not cfg.overwrite_output_dir:
        raise GlueError(f"output_dir {out} is not empty. Fix: another output_dir, overwrite_output_dir=true, or "
                        "--resume to continue its run.")


def open_output_dir(cfg: LMRunConfig, out: Path, resume: bool) -> None:
    """Empty the folder of a new run (checked by :func:`check_output_dir`) and create it; main process only."""
    if not resume and out.is_dir() and any(out.iterdir()) and cfg.overwrite_output_dir:
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def training_arguments(cfg: LMRunConfig, out: Path):
    """The recipe's optimisation as ``TrainingArguments`` (made first: under torchrun they start the process group
    and name this process's device). Validation loss only: no logits are kept."""
    import torch
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(out), learning_rate=cfg.learning_rate, num_train_epochs=cfg.num_train_epochs,
        max_steps=cfg.max_steps, per_device_train_batch_size=cfg.train_batch_size,
        per_device_eval_batch_size=cfg.eval_batch_size, gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        warmup_steps=cfg.warmup_ratio, weight_decay=cfg.weight_decay, lr_scheduler_type=cfg.lr_scheduler_type,
        max_grad_norm=cfg.max_grad_norm, seed=cfg.seed, bf16=cfg.precision == "bf16", fp16=cfg.precision == "fp16",
        eval_strategy="steps" if cfg.eval_steps else "no", eval_steps=cfg.eval_steps,
        save_strategy="steps" if cfg.save_steps else "no", save_steps=cfg.save_steps or 500,
        logging_steps=cfg.logging_steps, report_to="none", use_cpu=not torch.cuda.is_available(),
        prediction_loss_only=True, label_names=["labels"], ddp_find_unused_parameters=False, eval_on_start=True,
    )


def make_trainer(args, model, data, callbacks):
    """The Trainer of the run, with the method's callbacks (:func:`glue.train.run_callbacks`)."""
    return trainer_class()(model=model, args=args, train_dataset=data.train, eval_dataset=data.eval,
                           data_collator=data.collate, callbacks=callbacks)


def losses(loss: float) -> dict:
    """A validation loss as the results record it, with its perplexity."""
    return {"loss": loss, "perplexity": math.exp(loss)}


def squeeze(cfg: LMRunConfig, spec, trainer, model, out: Path, loss: float) -> dict:
    """LoRA-Squeeze of the trained adapter (``glue.train.squeeze_after_training``, shared with the GLUE runner)."""
    info = squeeze_after_training(cfg, spec, trainer, model, out, losses(loss),
                                  lambda metrics: losses(metrics["eval_loss"]))
    shown = info.get("after_cont", info["after"])
    print(f"[lm] squeeze ({spec.mode}, {spec.target}): validation perplexity {math.exp(loss):.3f} -> "
          f"{shown['perplexity']:.3f}; LoRA in {info['adapter']['path']}", flush=True)
    return info


def save_adapter(trainer, model, out: Path) -> dict:
    """``<out>/adapter`` (PEFT's LoRA on an LQ base also writes lq_lora.json), written by the main process while
    the others wait; its path and bytes."""
    folder = out / "adapter"
    if trainer.is_world_process_zero() and hasattr(model, "lq_lora_settings"):
        from sparse_lowrank_peft import save_lq_lora

        save_lq_lora(model, str(folder))
    elif trainer.is_world_process_zero():
        model.save_pretrained(str(folder))
    trainer.accelerator.wait_for_everyone()
    return {"path": str(folder), "weights_bytes": glue_results.file_bytes(folder, ["adapter_model.safetensors"]),
            "dir_bytes": glue_results.dir_bytes(folder)}


def after_training(cfg: LMRunConfig, built, data, out: Path, loss: float) -> dict:
    """The optional plain LoRA export and reload check."""
    extras: dict = {}
    if cfg.export_lora_rank:
        extras["lora_export"] = export_lora(built.model, out, cfg.export_lora_rank)
    if cfg.verify_reload:
        extras["reload"] = reload_check(cfg, built, data, out / "adapter", loss)
    return extras


def squeezed_reload_check(cfg: LMRunConfig, built, data, info: dict) -> dict:
    """The squeezed (or continued) LoRA folder on a freshly built base, against the squeezed model's loss. Not for
    an LQ-initialised run: its squeezed LoRA is for the LQ base ``Q``, which only the unsqueezed adapter rebuilds
    (``export_lora_rank`` writes one for the original weights)."""
    if cfg.init == "lq":
        return {"checked": False, "reason": "the squeezed LoRA is for the LQ base Q (see export_lora_rank)"}
    loss = info.get("after_cont", info["after"])["loss"]
    return {"checked": True, **reload_check(cfg, built, data, Path(info["adapter"]["path"]), loss)}


def reload_check(cfg: LMRunConfig, built, data, folder: Path, loss: float) -> dict:
    """The adapter ``folder`` on a freshly built base (quantized the same way, or re-derived from the LQ plan): its
    validation loss against the trained model's ``loss``."""
    import torch

    from causal_lm.model import HEAD, build_device, load_base, run_device
    from glue.model import quantizable_linears, reload_trained

    base = load_base(cfg, built.path, build_device(cfg))
    reloaded = reload_trained(cfg, base, quantizable_linears(base, HEAD), built.quant_info, folder)
    device = run_device()
    reloaded.to(device).eval()
    size, total = cfg.eval_batch_size, 0.0
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)  # the Trainer's mixed precision
    with torch.no_grad(), autocast:  # batched and weighted as the Trainer's evaluation: mean loss per example
        for i in range(0, len(data.eval), size):
            batch = {k: v.to(device) for k, v in data.collate(data.eval[i:i + size]).items()}
            total += reloaded(**batch).loss.item() * len(batch["input_ids"])
    reload_loss = total / len(data.eval)
    return {"eval_loss": reload_loss, "trained_eval_loss": loss, "abs_difference": abs(reload_loss - loss)}


def _resumed_step(out: Path) -> int:
    """The step of the checkpoint ``--resume`` continues from (transformers' choice: the last one)."""
    from transformers.trainer_utils import get_last_checkpoint

    return checkpoint_step(get_last_checkpoint(str(out)))


def results_record(cfg, data, built, trainer, output, losses, adapter, extras, seconds, first_step: int = 1) -> dict:
    """What the run did and measured, with its provenance."""
    import dataclasses

    before, after = losses
    return glue_results.clean({
        "schema": "slpeft-lm-results/1", "model": cfg.model, "model_path": built.path, "method": cfg.method,
        "eval": {"loss_before": before, "loss_after": after, "perplexity_before": math.exp(before),
                 "perplexity_after": math.exp(after)},
        "train": {"steps": trainer.state.global_step, "train_loss": output.training_loss,
                  "train_loss_steps": [first_step, trainer.state.global_step],  # what train_loss averages
                  "train_tokens_per_epoch": data.train_tokens, "train_s": seconds[0]},
        "log_history": trainer.state.log_history, "data": {"source": data.source, "train_blocks": len(data.train),
                                                          "eval_blocks": len(data.eval)},
        "params": {"trainable": built.params[0], "total": built.params[1]}, "quantization": built.quant_info,
        "adapter": adapter, **extras, "wall_time_s": seconds[1], "peak_memory": glue_results.peak_memory(),
        "device": glue_results.device_description(), "config": dataclasses.asdict(cfg),
        "git": glue_results.git_info(), "versions": glue_results.versions(),
    })


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point (``python -m causal_lm.run`` and the ``slpeft-lm`` console script)."""
    methods = "\n".join(line for line in list_methods().splitlines() if not line.startswith("full "))
    return recipe_main(argv, LMRunConfig, USAGE, build_config, run, methods)


if __name__ == "__main__":
    sys.exit(main())
