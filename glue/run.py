"""The GLUE runner: a YAML recipe (plus ``key=value`` overrides) -> a trained adapter, checkpoints and a results JSON.

Usage::

    python -m glue.run RECIPE.yaml [key=value ...] [--resume] [--dry-run] [--FIELD VALUE ...]
    slpeft-glue RECIPE.yaml ...            # the same, as a console script
    python -m glue.run --list-fields       # every recipe field with its default and meaning
    python -m glue.run --list-methods      # full, lora, and this library's tuners

Every recipe field (see :class:`glue.config.RunConfig`) can be overridden on the command line as ``field=value`` (a YAML
value: ``learning_rate=1e-3``, ``peft.r=16``, ``peft.target_modules=[query,value]``) or as ``--field value``
(``--data-dir``, ``--model``, ``--max-train-samples``, ``--output-dir``, ...; dashes become underscores).

What a run does, in this order, so that every mistake in the recipe or the data is reported before training:

1. check the recipe's fields and values, the method and its config fields, and the output folder;
2. read and check the data (columns, labels), subsample it;
3. load the model and tokenizer, wrap the model for the method (the classification head -- BERT's pooler and
   classifier, RoBERTa's classifier -- is trained in full for every method), load an initial adapter if asked;
4. train with ``transformers.Trainer`` (progress bars; a checkpoint every ``save_steps`` steps; ``--resume`` continues
   from the last complete checkpoint and ends with the same metrics as an uninterrupted run);
5. evaluate, save the final adapter (``<output_dir>/adapter``; the whole model for ``full``), and write
   ``<output_dir>/results.json``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Sequence

from glue.config import USAGE, RunConfig, build_config, list_fields, parse_cli, validate_config
from glue.data import load_run_data, tokenize_splits
from glue.errors import GlueError
from glue.model import available_methods, build_model, library_tuners, peft_baselines
from glue.results import clean, print_summary, results_record, write_results
from glue.tasks import get_task
from glue.train import (
    RunClock, check_output_dir, check_target_rank, default_output_dir, evaluate_at_end, finish_training,
    make_trainer, open_output_dir, run_callbacks, train, training_arguments,
)


def run(cfg: RunConfig, resume: bool = False, dry_run: bool = False, callbacks: Sequence | None = None) -> dict:
    """Train and evaluate as ``cfg`` says; return the results (also written to ``<output_dir>/results.json``).

    Args:
        cfg: a validated config (see :func:`glue.config.build_config`).
        resume: continue from the last complete checkpoint in the output folder.
        dry_run: stop after checking everything and building the model (returns the plan, writes nothing).
        callbacks: extra ``transformers.TrainerCallback`` objects (tests use one to interrupt a run).

    Raises:
        GlueError: any problem with the recipe, the data, the model or the output folder -- before training.
    """
    validate_config(cfg)
    clock = RunClock()
    out = output_dir(cfg)
    if not dry_run:
        check_output_dir(cfg, out, resume)
    data = load_run_data(cfg)
    _print_data(data)
    if cfg.num_threads:
        import torch

        torch.set_num_threads(cfg.num_threads)
    built = build_model(cfg, data.task, data.train)
    check_target_rank(built.model, cfg.export_lora_rank, "export_lora_rank", relative_to="original")
    squeeze_spec, all_callbacks = run_callbacks(cfg, built.model, callbacks)
    _print_model(cfg, built)
    if dry_run:
        return dry_run_plan(cfg, data, built, out)

    args = training_arguments(cfg, out)
    checkpoint = open_output_dir(cfg, out, resume, args)
    train_ds, eval_ds = tokenize_splits(data, built.tokenizer, cfg.max_seq_len)
    clock.start_training(checkpoint)
    trainer = make_trainer(built, args, train_ds, eval_ds, data.task, all_callbacks, clock)
    training = train(trainer, clock)
    evals = evaluate_at_end(trainer, data.task)
    adapter, extras = finish_training(cfg, trainer, built, out, data.task, evals, squeeze_spec)

    results = results_record(cfg, data, built, training, evals, adapter, extras, clock)
    if not trainer.is_world_process_zero():
        return results  # the main process writes the results and prints the summary
    results = write_results(cfg, out, results)
    print_summary(results, out)
    return results


def output_dir(cfg: RunConfig) -> Path:
    """The run's folder: ``output_dir``, else ``runs/glue/<model>/<method>-<task>``."""
    if cfg.output_dir:
        return Path(cfg.output_dir)
    custom = str(cfg.task).lower() == "custom"
    return default_output_dir(cfg, (cfg.custom or {}).get("name", "custom") if custom else get_task(cfg.task).name)


def dry_run_plan(cfg: RunConfig, data, built, out: Path) -> dict:
    """What ``--dry-run`` prints: the checked plan of the run (nothing is written)."""
    trainable, total = built.params
    return {
        "dry_run": True, "task": data.task.name, "method": cfg.method, "output_dir": str(out),
        "head_modules": built.head, "params": {"trainable": trainable, "total": total},
        "train_examples": len(data.train), "eval_examples": {k: len(v) for k, v in data.evals.items()},
        "data_source": data.source,
    }


def _print_data(data) -> None:
    sizes = ", ".join(f"{k} {len(v)}" for k, v in data.evals.items())
    print(f"[glue] task {data.task.display}: {len(data.train)} train examples, {sizes} eval examples, "
          f"from {data.source}", flush=True)


def _print_model(cfg: RunConfig, built) -> None:
    trainable, total = built.params
    print(f"[glue] model {cfg.model} ({type(built.model).__name__}), method {cfg.method}, head {built.head}: "
          f"{trainable:,} trainable of {total:,} parameters ({100.0 * trainable / total:.3f}%)", flush=True)


# ----------------------------------------------------------------------------------------------------------------
# entry point


def list_methods() -> str:
    """Every method a recipe may name, and where it comes from (``--list-methods``)."""
    tuners, why = library_tuners()
    baselines = peft_baselines()
    lines = ["full                  every weight trains"]
    lines += [f"{name:21s} peft {cls.__name__}" for name, cls in baselines.items()]
    lines += [f"{name:21s} sparse_lowrank_peft {cls.__name__}" for name, cls in tuners.items()]
    lines += [f"{name:21s} added by this tool: {cls.__name__}" for name, cls in available_methods().items()
              if cls is not None and name not in baselines and name not in tuners]
    if why:
        lines.append(f"(this library's tuners are unavailable: {why})")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point (``python -m glue.run`` and the ``slpeft-glue`` console script)."""
    return recipe_main(argv, RunConfig, USAGE, build_config, run, list_methods())


def recipe_main(argv: Sequence[str] | None, schema: type, usage: str, build, run_fn, methods: str) -> int:
    """A recipe runner's command line: ``--help``, ``--list-fields`` (of ``schema``), ``--list-methods``
    (``methods``), or ``run_fn(build(recipe, overrides), resume, dry_run)``; a :class:`GlueError` is printed without
    a traceback and exits with status 2. Shared by the GLUE and the causal-LM runners."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        recipe, overrides, flags = parse_cli(argv, schema)
        if flags["help"] or not argv:
            print(usage)
        elif flags["list_fields"]:
            print(list_fields(schema))
        elif flags["list_methods"]:
            print(methods)
        else:
            result = run_fn(build(recipe, overrides), resume=flags["resume"], dry_run=flags["dry_run"])
            if flags["dry_run"]:
                print(json.dumps(clean(result), indent=2))
    except GlueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
