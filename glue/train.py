"""Training for the GLUE runner: the output folder and its checkpoints (``--resume``), ``TrainingArguments`` from
the recipe, the Trainer and its callbacks, evaluation at the end, saving, and the method's extras after training
(DyLoRA's per-rank evaluations, SoRA's pruning, LoRA-Squeeze).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from glue.config import RESUME_MAY_DIFFER, RunConfig
from glue.errors import GlueError
from glue.model import count_parameters, model_short_name
from glue.results import (
    dir_bytes, evals_from_log_history, file_bytes, final_and_best, load_average, split_metrics, write_json,
)
from glue.tasks import TaskSpec, is_finite, predictions_from_logits

PROGRESS_FILE = "glue_progress.json"  # written into each checkpoint once it is complete
CONFIG_FILE = "run_config.json"


# ----------------------------------------------------------------------------------------------------------------
# output folder and checkpoints


def default_output_dir(cfg: RunConfig, task_name: str) -> Path:
    """``runs/glue/<model>/<method>-<task>``, relative to the current directory."""
    return Path("runs") / "glue" / model_short_name(cfg.model) / f"{cfg.method}-{task_name}"


def complete_checkpoints(output_dir: Path) -> list[Path]:
    """Checkpoints of a run that were written completely (Trainer state and the harness's progress file), by step."""
    if not output_dir.is_dir():
        return []
    found = []
    for p in output_dir.iterdir():
        m = re.fullmatch(r"checkpoint-(\d+)", p.name)
        if m and p.is_dir() and (p / "trainer_state.json").is_file() and (p / PROGRESS_FILE).is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def _refuse_finished(out: Path, checkpoint: Path) -> None:
    """``--resume`` of a run whose last checkpoint is its last step would train nothing and rewrite its results."""
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    if state.get("max_steps") and state["global_step"] >= state["max_steps"] and (out / "results.json").is_file():
        raise GlueError(f"--resume: the run in '{out}' already finished (step {state['global_step']} of "
                        f"{state['max_steps']}); its results are in {out / 'results.json'}. Nothing to resume. Fix: "
                        "a new output_dir (or overwrite_output_dir=true) to run it again.")


def prepare_output_dir(cfg: RunConfig, out: Path, resume: bool) -> Path | None:
    """Check the output folder for this run; return the checkpoint to resume from (or None).

    Raises:
        GlueError: an existing non-empty folder without ``overwrite_output_dir`` or ``--resume``; ``--resume``
            without a complete checkpoint, or with a recipe that differs from the interrupted run's.
    """
    exists = out.exists() and any(out.iterdir()) if out.is_dir() else out.exists()
    if resume:
        if cfg.save_steps == 0:
            raise GlueError("--resume needs checkpoints, but save_steps is 0 (no checkpoints are written).")
        ckpts = complete_checkpoints(out)
        if not ckpts:
            raise GlueError(
                f"--resume: no complete checkpoint in '{out}'. The run stopped before its first checkpoint "
                f"(every {cfg.save_steps} steps) or wrote elsewhere; start it again without --resume "
                "(with overwrite_output_dir=true if the folder exists)."
            )
        saved_path = out / CONFIG_FILE
        if saved_path.is_file():
            saved = json.loads(saved_path.read_text())
            now = cfg.to_dict()
            diff = sorted(k for k in now if k not in RESUME_MAY_DIFFER and saved.get(k) != now[k])
            if diff:
                details = "; ".join(f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in diff)
                raise GlueError(
                    f"--resume with a different recipe than the interrupted run in '{out}' ({details}). Resume with "
                    "the same recipe and overrides, or start a new run in another output_dir."
                )
        _refuse_finished(out, ckpts[-1])
        return ckpts[-1]
    if out.exists() and not out.is_dir():
        raise GlueError(f"output_dir '{out}' is a file, not a folder. Fix: another output_dir.")
    if exists:
        if not cfg.overwrite_output_dir:
            raise GlueError(
                f"Output folder '{out}' already exists and is not empty; a run never overwrites it unless asked. "
                "Continue it with --resume, set overwrite_output_dir=true to delete it and start again, or choose "
                "another output_dir."
            )
        if out.is_dir():
            shutil.rmtree(out)
        else:
            out.unlink()
    return None



def is_main_process() -> bool:
    """Rank 0 of a torchrun / accelerate launch (their RANK variable), or a single process."""
    return int(os.environ.get("RANK", "0")) == 0


def check_output_dir(cfg: RunConfig, out: Path, resume: bool) -> None:
    """Check (not yet change) the output folder before the slow steps. Main process only: under torchrun another
    rank may already have created it.

    Raises:
        GlueError: as :func:`prepare_output_dir` would, before any data or model is loaded.
    """
    if not is_main_process():
        return
    if resume:
        prepare_output_dir(cfg, out, resume=True)
    elif not cfg.overwrite_output_dir:
        prepare_output_dir(dataclasses.replace(cfg, overwrite_output_dir=False), out, resume=False)


def open_output_dir(cfg: RunConfig, out: Path, resume: bool, args) -> Path | None:
    """Prepare the output folder (clear it if asked, save the run's config) and return the checkpoint to resume from.

    Under torchrun / accelerate launch the main process checks, clears and creates the folder while the others wait
    (otherwise a slower rank finds the folder the main process just made and refuses to overwrite it).
    """
    with args.main_process_first(local=False, desc="prepare the output folder"):
        if args.process_index == 0:
            checkpoint = prepare_output_dir(cfg, out, resume)
            out.mkdir(parents=True, exist_ok=True)
            if not resume:
                write_json(out / CONFIG_FILE, cfg.to_dict())
        else:
            checkpoint = complete_checkpoints(out)[-1] if resume else None
    return checkpoint


@dataclass
class RunClock:
    """The run's times: when this invocation started, and the training time including what an interrupted run
    trained before the checkpoint it resumes from."""

    started: float = field(default_factory=time.time)
    load_at_start: float | None = field(default_factory=load_average)
    checkpoint: Path | None = None
    elapsed_before: float = 0.0
    segment_start: float | None = None

    def start_training(self, checkpoint: Path | None) -> None:
        """Training starts now, from ``checkpoint`` (its recorded training time counts) or from scratch."""
        self.checkpoint = checkpoint
        if checkpoint is not None:
            progress = json.loads((checkpoint / PROGRESS_FILE).read_text())
            self.elapsed_before = float(progress.get("train_wall_s", 0.0))
            print(f"[glue] resuming from {checkpoint} (after {self.elapsed_before:.1f} s of training)", flush=True)
        self.segment_start = time.time()

    def training_s(self) -> float:
        """Training seconds so far, over every segment."""
        return self.elapsed_before + time.time() - self.segment_start


# ----------------------------------------------------------------------------------------------------------------
# the Trainer


def training_arguments(cfg: RunConfig, out: Path):
    """``transformers.TrainingArguments`` of the recipe."""
    import torch
    from transformers import TrainingArguments

    use_cuda = torch.cuda.is_available()
    return TrainingArguments(
        output_dir=str(out),
        learning_rate=cfg.learning_rate,
        num_train_epochs=cfg.num_train_epochs,
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.train_batch_size,
        per_device_eval_batch_size=cfg.eval_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        warmup_steps=cfg.warmup_ratio,  # a value below 1 is a ratio of the total steps
        weight_decay=cfg.weight_decay,
        lr_scheduler_type=cfg.lr_scheduler_type,
        max_grad_norm=cfg.max_grad_norm,
        optim=cfg.optim,
        seed=cfg.seed,
        bf16=cfg.precision == "bf16",
        fp16=cfg.precision == "fp16",
        eval_strategy=cfg.eval_strategy,
        eval_steps=cfg.eval_steps if cfg.eval_strategy == "steps" else None,
        save_strategy="steps" if cfg.save_steps else "no",
        save_steps=cfg.save_steps or 500,
        save_total_limit=cfg.save_total_limit,
        logging_strategy="steps",
        logging_steps=cfg.logging_steps,
        report_to="none",
        disable_tqdm=False,
        use_cpu=not use_cuda,
        dataloader_num_workers=cfg.dataloader_num_workers,
        dataloader_pin_memory=use_cuda,
        label_names=["labels"],
        # every trainable parameter of every method takes part in every step (tests/test_distributed.py), so DDP
        # need not search the graph for unused ones
        ddp_find_unused_parameters=False,
    )


def training_callbacks(model) -> list:
    """The Trainer callbacks the model's adapters need (``sparse_lowrank_peft.callbacks.training_callbacks``); none
    when the library cannot be imported (then only ``full`` and PEFT's own methods are available anyway)."""
    try:
        from sparse_lowrank_peft.callbacks import training_callbacks as callbacks_for
    except ImportError:
        return []
    return callbacks_for(model)


def trainer_class():
    """``transformers.Trainer`` that also keeps the tuners' no-decay parameters (SoRA's gates, whose only
    regulariser is the L1 proximal step) out of weight decay."""
    from transformers import Trainer

    try:
        from sparse_lowrank_peft.callbacks import no_decay_parameter_names
    except ImportError:
        return Trainer

    class GlueTrainer(Trainer):
        def get_decay_parameter_names(self, model) -> list[str]:
            skip = no_decay_parameter_names(model)
            return [n for n in super().get_decay_parameter_names(model) if n not in skip]

    return GlueTrainer


def run_callbacks(cfg, model, extra: Sequence | None = None):
    """``(squeeze spec or None, callbacks)``: what the adapter's method needs while training (SoRA's proximal gate
    step, DyLoRA's per-step rank), then ``extra``, then In-Squeeze's rank annealing when the recipe asks for it
    (its rank checked against the adapter now, not after training). Both runners' ``cfg`` have these fields."""
    spec, callbacks = None, [*(training_callbacks(model) if cfg.method != "full" else []), *(extra or [])]
    if cfg.squeeze is not None:
        from sparse_lowrank_peft.squeeze import InSqueezeCallback, SqueezeSpec

        spec = SqueezeSpec.from_mapping(cfg.squeeze)
        check_target_rank(model, spec.rank, "squeeze.rank", relative_to="trained")
        if spec.mode == "in":
            callbacks.append(InSqueezeCallback(spec.rank, spec.in_start, spec.in_end, spec.in_stages))
    return spec, callbacks


def check_target_rank(model, rank: int | None, field: str, relative_to: str) -> None:
    """A squeeze or export ``rank`` the adapter can take (a factored adapter cannot be squeezed above its rank),
    checked on the untrained adapter's shapes so that the run does not fail after training."""
    if rank is None:
        return
    from sparse_lowrank_peft.squeeze import SqueezeError, check_squeeze_rank

    try:
        check_squeeze_rank(model, rank, relative_to=relative_to)
    except SqueezeError as e:
        raise GlueError(f"{field}={rank}: {e}") from e


def progress_callback(clock: RunClock):
    """A callback that marks each checkpoint complete and records the training wall time up to it (for --resume)."""
    from transformers import TrainerCallback

    class ProgressFile(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if not state.is_world_process_zero:  # the checkpoint is the main process's (and one writer per file)
                return
            ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if ckpt.is_dir():
                write_json(ckpt / PROGRESS_FILE, {"global_step": state.global_step, "train_wall_s": clock.training_s()})

    return ProgressFile()


def make_trainer(built, args, train_ds, eval_ds: dict, task: TaskSpec, callbacks: Sequence, clock: RunClock):
    """The Trainer of the run: the built model, padding batches, the task's metrics, the progress file first."""
    from transformers import DataCollatorWithPadding

    def compute(eval_pred):
        preds = predictions_from_logits(task, eval_pred.predictions)
        return task.compute_metrics(preds, eval_pred.label_ids)

    return trainer_class()(
        model=built.model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
        data_collator=DataCollatorWithPadding(built.tokenizer), processing_class=built.tokenizer,
        compute_metrics=compute, callbacks=[progress_callback(clock), *callbacks],
    )


def train(trainer, clock: RunClock) -> dict[str, Any]:
    """Train (from ``clock.checkpoint`` if resuming); return the training record of the results."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    output = trainer.train(resume_from_checkpoint=str(clock.checkpoint) if clock.checkpoint else None)
    first = checkpoint_step(clock.checkpoint) + 1 if clock.checkpoint else 1
    # transformers averages the loss over the steps this invocation trained: a resumed run's covers its last part
    return {"examples": len(trainer.train_dataset), "global_step": trainer.state.global_step,
            "epochs": trainer.state.epoch, "train_loss": output.training_loss,
            "train_loss_steps": [first, trainer.state.global_step], "wall_s": clock.training_s()}


def checkpoint_step(checkpoint: Path) -> int:
    """The optimizer step a Trainer checkpoint was saved at."""
    return int(json.loads((Path(checkpoint) / "trainer_state.json").read_text())["global_step"])


def evaluate_at_end(trainer, task: TaskSpec) -> list[dict]:
    """Every evaluation of the run, with one at the last step (run now unless the schedule already did)."""
    splits = list(trainer.eval_dataset)
    evals = evals_from_log_history(trainer.state.log_history, task, splits)
    if not evals or evals[-1]["step"] != trainer.state.global_step:
        trainer.evaluate()
        evals = evals_from_log_history(trainer.state.log_history, task, splits)
    return evals


def save_trained(cfg: RunConfig, trainer, model, out: Path) -> dict[str, Any]:
    """Save the adapter (``<out>/adapter``; the whole model in ``<out>/model`` for ``full``); return its path and
    sizes. Every process waits for the save (they read its sizes)."""
    if cfg.method == "full":
        save_dir = out / "model"
        trainer.save_model(str(save_dir))  # writes on the main process only
        names = ["model.safetensors", "pytorch_model.bin"]
    else:
        save_dir = out / "adapter"
        if trainer.is_world_process_zero() and hasattr(model, "lq_lora_settings"):  # PEFT LoRA on an LQ base
            from sparse_lowrank_peft import save_lq_lora

            save_lq_lora(model, str(save_dir))
        elif trainer.is_world_process_zero():
            model.save_pretrained(str(save_dir))
        names = ["adapter_model.safetensors", "adapter_model.bin"]
    trainer.accelerator.wait_for_everyone()
    return {"path": str(save_dir), "weights_bytes": file_bytes(save_dir, names), "dir_bytes": dir_bytes(save_dir)}


# ----------------------------------------------------------------------------------------------------------------
# after training: the method's extras


def finish_training(cfg: RunConfig, trainer, built, out: Path, task: TaskSpec, evals: list[dict], squeeze_spec):
    """The method's extras (:func:`method_results`, the 4-bit base's summary), the saved adapter, its plain LoRA
    export and reload check when the recipe asks, then LoRA-Squeeze of it (which consumes the model). Returns
    ``(adapter record, method results)``."""
    extras = method_results(cfg.method, trainer, built.model, out)
    if built.quant_info is not None:
        extras = {**(extras or {}), "quantization": built.quant_info}
    adapter = save_trained(cfg, trainer, built.model, out)
    final, _ = final_and_best(evals, task, trainer.state.global_step)
    splits = list(trainer.eval_dataset)
    summarize = lambda metrics: split_metrics(metrics, task, splits)  # noqa: E731
    if cfg.export_lora_rank:
        if trainer.is_world_process_zero():
            extras = {**(extras or {}), "lora_export": export_lora(built.model, out, cfg.export_lora_rank)}
        trainer.accelerator.wait_for_everyone()
    if cfg.verify_reload:
        reload = verify_reload(cfg, trainer, built, task, Path(adapter["path"]), final, summarize)
        extras = {**(extras or {}), "reload": reload}
    if squeeze_spec is not None:
        info = squeeze_after_training(cfg, squeeze_spec, trainer, built.model, out, final, summarize)
        shown = info.get("after_cont", info["after"])
        print(f"[glue] squeeze ({squeeze_spec.mode}, {squeeze_spec.target}): " + "; ".join(
            f"{split} {task.main_metric}={m[task.main_metric]:.4f}" for split, m in shown.items()
            if task.main_metric in m), flush=True)
        extras = {**(extras or {}), "squeeze": info}
    return adapter, extras


def export_lora(model, out: Path, rank: int) -> dict:
    """``<out>/lora``: the trained adapter as a plain PEFT LoRA of one rank for the original weights (what LoRA
    servers read alike; ``export_to_lora(..., uniform_rank=True)``); its record. Both runners' ``export_lora_rank``."""
    from sparse_lowrank_peft import export_to_lora

    folder = Path(export_to_lora(model, out / "lora", rank=rank, uniform_rank=True))
    return {"path": str(folder), "rank": rank, "dir_bytes": dir_bytes(folder)}


def verify_reload(cfg: RunConfig, trainer, built, task: TaskSpec, folder: Path, final: dict,
                  summarize: Callable[[dict], dict]) -> dict:
    """The saved adapter on a freshly loaded base (``glue.model.reload_trained``), evaluated by the run's own Trainer
    (same batches, precision and metrics) in place of the trained model: its metrics per split (``summarize`` of
    the evaluation) and the largest difference from the trained model's ``final`` ones. Every process takes part,
    as in any evaluation."""
    from glue.model import load_model_and_tokenizer, quantizable_linears, reload_trained

    base, _, _ = load_model_and_tokenizer(cfg, task)
    reloaded = reload_trained(cfg, base, quantizable_linears(base, built.head), built.quant_info, folder)
    model, wrapped = trainer.model, trainer.model_wrapped
    trainer.model = trainer.model_wrapped = reloaded.to(trainer.args.device).eval()
    try:
        metrics = summarize(trainer.evaluate())
    finally:
        trainer.model, trainer.model_wrapped = model, wrapped
    differences = [abs(v - final[split][k]) for split, m in metrics.items() for k, v in m.items()
                   if k in final.get(split, {})]
    return {"metrics": metrics, "trained_metrics": final, "max_abs_difference": max(differences, default=None)}


def method_results(method: str, trainer, model, out: Path) -> dict | None:
    """Per-method extras after training: DyLoRA evaluated at ranks 1, 2, 4, ..., r from the one adapter; SoRA's kept
    ranks (plot in ``kept_ranks.png``) and the adapter pruned to them before it is saved."""
    if method == "dylora":
        tuner = model.base_model
        name = tuner.active_adapters[0]
        r = tuner.peft_config[name].r
        ranks = sorted({1 << i for i in range(r.bit_length()) if (1 << i) <= r} | {r})
        evals = {}
        for b in ranks:
            tuner.set_rank(b)
            metrics = trainer.evaluate(metric_key_prefix=f"rank{b}")
            evals[str(b)] = {k.removeprefix(f"rank{b}_"): v for k, v in metrics.items() if is_finite(v)}
            print(f"[glue] DyLoRA rank {b}: " + ", ".join(f"{k}={v:.4f}" for k, v in evals[str(b)].items()
                                                           if not k.endswith(("runtime", "per_second", "loss"))), flush=True)
        tuner.set_rank(r)
        return {"rank_evals": evals}
    if method == "sora":
        tuner = model.base_model
        name = tuner.active_adapters[0]
        r = tuner.peft_config[name].r
        if trainer.is_world_process_zero():
            tuner.plot_kept_ranks(out / "kept_ranks.png", adapter_name=name)
        kept = tuner.prune(name)
        return {"kept_ranks": kept, "kept_total": sum(kept.values()), "max_total": r * len(kept),
                "kept_ranks_plot": str(out / "kept_ranks.png")}
    return None


def squeeze_after_training(cfg, spec, trainer, model, out: Path, before: dict,
                           summarize: Callable[[dict], dict]) -> dict:
    """LoRA-Squeeze after training (both runners): squeeze the trained adapter to plain LoRA (``spec.rank`` or
    ``spec.energy``), evaluate it, and for ``cont`` train it ``cont_steps`` more steps; the squeezed adapter is saved
    in ``<out>/adapter-squeezed`` (with ``export_info.json``), the continued one in ``<out>/adapter-cont``.

    ``before`` is the trained model's evaluation and ``summarize`` turns a ``trainer.evaluate()`` into the same form
    (GLUE: metrics per split; causal LM: loss and perplexity). Returns them before and after, the per-layer ranks
    and sizes.
    """
    from sparse_lowrank_peft.squeeze import post_squeeze

    name = model.active_adapters[0] if hasattr(model, "active_adapters") else "default"
    alpha = spec.output_alpha(cfg.peft)
    before_params, _ = count_parameters(model)
    folder = out / "adapter-squeezed"
    if trainer.is_world_process_zero() and folder.exists():
        shutil.rmtree(folder)
    started = time.time()
    squeezed, _ = post_squeeze(model, spec.target, folder, adapter_name=name, lora_alpha=alpha)
    squeeze_s = time.time() - started
    trainer.model = trainer.model_wrapped = squeezed
    info: dict[str, Any] = {
        "mode": spec.mode, "target": spec.target, "lora_alpha": alpha, "squeeze_s": squeeze_s,
        "before": before, "after": summarize(trainer.evaluate()),
        "trainable_after": count_parameters(squeezed)[0], "trainable_before": before_params,
    }
    cuts = [c.done for c in trainer.callback_handler.callbacks if hasattr(c, "final_rank") and hasattr(c, "done")]
    if cuts:
        info["in_squeeze_cuts"] = [{"step": step, "rank": rank} for step, rank in cuts[0]]
    export_info = folder / "export_info.json"
    if export_info.is_file():
        layers = json.loads(export_info.read_text()).get("layers", {})
        info["ranks"] = {k: v.get("rank") for k, v in layers.items()} if isinstance(layers, dict) else None
    if spec.mode == "cont":
        folder = out / "adapter-cont"
        info.update(continue_squeezed(spec, trainer, squeezed, out, summarize))
        if trainer.is_world_process_zero():
            if folder.exists():
                shutil.rmtree(folder)
            squeezed.save_pretrained(str(folder))
    info["adapter"] = {"path": str(folder),
                       "weights_bytes": file_bytes(folder, ["adapter_model.safetensors", "adapter_model.bin"])}
    return info


def continue_squeezed(spec, trainer, squeezed, out: Path, summarize: Callable[[dict], dict]) -> dict:
    """Cont-Squeeze: ``spec.cont_steps`` more steps of the squeezed LoRA with the run's own training arguments
    (precision, batch size, accumulation, schedule) at ``spec.cont_learning_rate`` (default the run's), without
    evaluations or checkpoints in between; its training time and evaluation."""
    args = dataclasses.replace(
        trainer.args, output_dir=str(out / "cont"), max_steps=spec.cont_steps,
        learning_rate=spec.cont_learning_rate or trainer.args.learning_rate, save_strategy="no", eval_strategy="no",
        eval_on_start=False, load_best_model_at_end=False,
    )
    cont = type(trainer)(
        model=squeezed, args=args, train_dataset=trainer.train_dataset, eval_dataset=trainer.eval_dataset,
        data_collator=trainer.data_collator, processing_class=trainer.processing_class,
        compute_metrics=trainer.compute_metrics,
    )
    started = time.time()
    cont.train()
    return {"cont_train_s": time.time() - started, "after_cont": summarize(cont.evaluate())}
