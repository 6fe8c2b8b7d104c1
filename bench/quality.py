"""Quality of every method on GLUE with the bundled MiniLM, one fixed budget per task, several seeds, side by side.

What is measured: the dev-set main metric at the end of training (SST-2, RTE, MRPC accuracy; CoLA Matthews
correlation; STS-B Pearson) of each method, trained by the GLUE harness (``glue/``) on the bundled MiniLM
(6 layers, 384 wide) with the same per-task budget for every method, over several seeds (mean ± sample std), next to
what each method costs: trainable parameters, adapter bytes on disk, training time. The final evaluation is reported,
not the best of the evaluations during training (picking the best on the dev set would flatter every method).

The budget of a task is the one of ``recipes/minilm/lora-<task>.yaml`` (training examples -- SST-2: a fixed random
4,000-example subset, ``subset_seed`` 0 for every seed -- maximum length, epochs, batch size, schedule, evaluation
steps). A method's own fields (``method``, ``peft``, ``learning_rate``, ``quantize``, ``init``, ``squeeze``) come from
``recipes/minilm/<recipe>-<task>.yaml`` where that recipe exists, so a cell computes what the recipe computes, and
for a task without one from the method's first recipe (its method fields at this task's budget; SoRA's
``sparse_lambda`` scaled by the steps so that its total shrinkage stays the recipe's), and from the :data:`METHODS`
table for methods without recipes (full fine-tuning, AdaLoRA, SHiRA). Where a method recipe's budget differs from
the task's, the task's budget is used and the difference is recorded in the cell and shown in the notes. Only
``seed`` changes between a method's seeds.

Methods: full fine-tuning; PEFT LoRA r=8, AdaLoRA, RandLoRA, SHiRA; SLTrain, SoRA, DyLoRA r=8 and the same adapter
evaluated at rank 4 (``method_results.rank_evals``, no extra training), DyLoRA with the geometric rank draw, NOLA,
sparse RandLoRA, Post-Squeeze (LoRA r=16 squeezed to r=4 after training, ``squeeze: {mode: post, rank: 4}``), SLTrain
and SoRA on an NF4 base (``quantize: nf4``). The harness has no AdaLoRA (it needs ``update_and_allocate`` after
every optimizer step) and no SHiRA among its PEFT baselines; this script adds both to its method table in this
process and passes AdaLoRA's per-step hook as a Trainer callback.

Cells: ``<runs-dir>/<method>/<task>/seed<k>/`` (default ``runs/quality``): the harness's output folder with its
``results.json``. A cell with a ``results.json`` is finished and never rerun; an interrupted cell resumes from its
last checkpoint (checkpoints are deleted once a cell finishes, ``--keep-checkpoints`` keeps them). ``--adopt DIR``
takes a results file in DIR (e.g. ``bench/results/glue/minilm-lora-sst2.json``, or ``...-seed1.json`` made with
``seed=1``) whose config equals a cell's, seed included (apart from output paths and thread counts), as that cell,
copying it into the cell folder with ``adopted_from``.

Outputs (from finished cells only; a cell that has not run is shown as missing, never filled in):
``bench/results/quality-minilm.json`` (every cell, mean ± std per method × task, the average over tasks, parameters,
bytes, times, budgets, versions and commits), ``quality-minilm.md`` (the table) and ``quality-minilm.png`` (average
metric vs trainable parameters without the classification head, which every method trains in full).

Usage::

    GLUE_DIR=../shared/glue python bench/quality.py                        # every method x task x 3 seeds
    GLUE_DIR=../shared/glue python bench/quality.py --methods lora sltrain --tasks rte --seeds 1
    GLUE_DIR=../shared/glue python bench/quality.py --jobs 8              # 8 cells at a time (a GPU machine)
    GLUE_DIR=../shared/glue python bench/quality.py --report-only          # json/md/png from finished cells
    python bench/quality.py --plan                                         # the cell configs, nothing run
    GLUE_DIR=../shared/glue python bench/quality.py --smoke --methods lora --tasks rte   # CI: tiny budget

A grid on a GPU keeps its own cells and files (``--name quality-minilm-h100``: ``runs/quality-h100``,
``bench/results/quality-minilm-h100.*``). On a leased machine with a time limit, ``--stop-after S`` starts no cell
more than S seconds after the first one started, and the next invocation resumes. The H100 grid's cell files are
committed in ``bench/results/quality-h100-cells`` so that its report rebuilds anywhere and a later GPU session runs
only the missing cells::

    GLUE_DIR=../shared/glue python bench/quality.py --name quality-minilm-h100 --device-kind cuda --fill-kind cpu \
        --adopt bench/results/quality-h100-cells --report-only              # rebuild its report (any machine)
    GLUE_DIR=../shared/glue python bench/quality.py --name quality-minilm-h100 \
        --adopt bench/results/quality-h100-cells --jobs 13 --stop-after 300  # on a GPU: run what is missing

When the GPU is gone before the last cells ran, ``--fill-kind cpu`` runs them on the CPU (or adopts such runs) as
fills: each is marked ``†`` in the table and listed in the notes, its metric counts in the mean, and its training
time is left out of the time column (another machine's). The H100 grid's third STS-B seed of 14 methods is such a
fill::

    GLUE_DIR=../shared/glue python bench/quality.py --name quality-minilm-h100 --device-kind cuda --fill-kind cpu \
        --adopt bench/results/quality-h100-cells --jobs 2                           # run the missing cells here

Planning a cell reads the task's training-set size where its config depends on it (SoRA's scaled ``sparse_lambda``,
AdaLoRA's schedule), so even ``--report-only`` wants the GLUE data: without ``GLUE_DIR`` it tries the hub once per
task, and offline such cells are shown missing with the reason.

``--smoke`` trains 2 steps on 32 examples and evaluates 32, in ``runs/quality-smoke`` with its outputs there too.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import copy
import datetime as _dt
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
import traceback
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from glue.config import RESUME_MAY_DIFFER  # noqa: E402

RECIPES = ROOT / "recipes" / "minilm"
TASKS = ["sst2", "rte", "mrpc", "cola", "stsb"]
MODEL = "minilm"
QV = ["query", "value"]

#: recipe fields that make up a task's budget (taken from recipes/minilm/lora-<task>.yaml for every method)
BUDGET_FIELDS = (
    "max_train_samples", "max_seq_len", "num_train_epochs", "max_steps", "train_batch_size",
    "gradient_accumulation_steps", "warmup_ratio", "weight_decay", "lr_scheduler_type", "max_grad_norm", "optim",
    "eval_strategy", "eval_steps", "subset_seed", "precision", "max_eval_samples",
)
#: fields that say where and how a run executes, not what it computes (set by this script, ignored when comparing):
#: those a --resume may change, and how often a run checkpoints and logs
RUNTIME_FIELDS = (*sorted(RESUME_MAY_DIFFER), "save_steps", "save_total_limit", "logging_steps")

# The smoke budget (CI): what every cell trains with under --smoke.
SMOKE_BUDGET = {
    "max_train_samples": 32, "max_eval_samples": 32, "max_seq_len": 32, "max_steps": 2, "train_batch_size": 8,
    "eval_strategy": "no", "eval_steps": None, "save_steps": 0,
}

#: name -> label, group, and either the recipe stem (its fields come from recipes/minilm/<recipe>-<task>.yaml; for a
#: task without one, the method fields of the method's first recipe in TASKS order, with ``scale_by_steps`` peft
#: fields scaled by that recipe's steps / the task's steps) or the method fields (methods without recipes); what the
#: metric is read from, and a note (how the hyperparameters were chosen).
METHODS: "OrderedDict[str, dict[str, Any]]" = OrderedDict(
    [
        ("full", {
            "label": "Full fine-tuning", "group": "full", "recipe": None,
            "fields": {"method": "full", "learning_rate": 5e-5},
            "note": "lr 5e-5 (the usual BERT-family fine-tuning range; LoRA's 1e-3 is far too large for full "
                    "weights); not tuned here.",
        }),
        ("lora", {
            "label": "PEFT LoRA r=8", "group": "peft", "recipe": "lora",
            "note": "recipes/minilm/lora-<task>.yaml (its lr chosen on held-out SST-2 train).",
        }),
        ("adalora", {
            "label": "PEFT AdaLoRA r=12→8", "group": "peft", "recipe": None,
            "fields": {"method": "adalora", "learning_rate": 1e-3,
                       "peft": {"init_r": 12, "target_r": 8, "lora_alpha": 16, "lora_dropout": 0.1,
                                "target_modules": QV}},
            "schedule": "adalora",
            "note": "init_r 12 -> target_r 8 (LoRA r=8's budget), LoRA's lr 1e-3; total_step from the task's budget, "
                    "tinit 10% and tfinal 20% of it, deltaT 10; update_and_allocate after every optimizer step. "
                    "Not tuned.",
        }),
        ("randlora", {
            "label": "PEFT RandLoRA r=32", "group": "peft", "recipe": "randlora",
            "note": "recipes/minilm/randlora-*.yaml; not tuned.",
        }),
        ("shira", {
            "label": "PEFT SHiRA r=8", "group": "peft", "recipe": None,
            "fields": {"method": "shira", "learning_rate": 1e-3,
                       "peft": {"r": 8, "mask_type": "random", "random_seed": 0, "target_modules": QV}},
            "note": "random mask with r*(in+out) entries per layer (LoRA r=8's count), LoRA's lr 1e-3; not tuned.",
        }),
        ("sltrain", {
            "label": "SLTrain r=8 + 1% sparse", "group": "ours", "recipe": "sltrain",
            "note": "recipes/minilm/sltrain-<task>.yaml: LoRA's recipe plus a 1% random sparse term.",
        }),
        ("sora", {
            "label": "SoRA r=8", "group": "ours", "recipe": "sora", "scale_by_steps": ["sparse_lambda"],
            "note": "recipes/minilm/sora-<task>.yaml; trainable parameters are r_max's, the saved adapter is pruned "
                    "to the kept ranks.",
        }),
        ("dylora", {
            "label": "DyLoRA r=8", "group": "ours", "recipe": "dylora",
            "note": "recipes/minilm/dylora-<task>.yaml.",
        }),
        ("dylora_geo", {
            "label": "DyLoRA r=8, geometric draw", "group": "ours", "recipe": "dylora-geo",
            "note": "recipes/minilm/dylora-geo-<task>.yaml: rank_distribution geometric (b = r on about half the steps) "
                    "instead of the paper's uniform draw, under which rank r trains on 1/r of the steps.",
        }),
        ("dylora_r4", {
            "label": "DyLoRA at rank 4", "group": "ours", "derived_from": "dylora", "rank": 4,
            "note": "the DyLoRA r=8 adapter of the same seed evaluated at rank 4 (no extra training); parameters: the "
                    "rank-4 slice (half the factors) + head; bytes and time: the r=8 adapter's.",
        }),
        ("nola", {
            "label": "NOLA r=8", "group": "ours", "recipe": "nola",
            "note": "recipes/minilm/nola-*.yaml; not tuned.",
        }),
        ("sparse_randlora", {
            "label": "sparse RandLoRA r=32", "group": "ours", "recipe": "sparse_randlora",
            "note": "recipes/minilm/sparse_randlora-*.yaml (RandLoRA's hyperparameters, sparse bases).",
        }),
        ("post_squeeze", {
            "label": "Post-Squeeze LoRA 16→4", "group": "ours", "recipe": "lora-r16-post-squeeze",
            "metric_from": "squeeze",
            "note": "LoRA r=16 (recipes/minilm/lora-r16-post-squeeze-*.yaml) squeezed to r=4 after training; the "
                    "metric, parameters and bytes are the squeezed r=4 adapter's.",
        }),
        ("sltrain_nf4", {
            "label": "SLTrain on NF4 base", "group": "ours", "recipe": "sltrain-nf4",
            "note": "recipes/minilm/sltrain-nf4-*.yaml: SLTrain on a 4-bit NF4 encoder (bitsandbytes, head in full "
                    "precision).",
        }),
        ("sora_nf4", {
            "label": "SoRA on NF4 base", "group": "ours", "recipe": "sora-nf4", "scale_by_steps": ["sparse_lambda"],
            "note": "recipes/minilm/sora-nf4-*.yaml: SoRA on a 4-bit NF4 encoder.",
        }),
    ]
)


# ---------------------------------------------------------------------------------------------------- PEFT methods
def register_peft_methods() -> None:
    """Add PEFT's AdaLoRA and SHiRA (and RandLoRA) to the GLUE harness's methods, in this process only."""
    from peft import PeftType
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    from glue.model import register_method

    for name in ("adalora", "shira", "randlora"):
        member = getattr(PeftType, name.upper(), None)
        if member is not None and member in PEFT_TYPE_TO_CONFIG_MAPPING:
            register_method(name, PEFT_TYPE_TO_CONFIG_MAPPING[member])


def adalora_callback():
    """Trainer callback: AdaLoRA's ``update_and_allocate`` after every optimizer step, before ``zero_grad``."""
    from transformers import TrainerCallback

    class AdaLoraCallback(TrainerCallback):
        def on_optimizer_step(self, args, state, control, model=None, **kwargs):
            tuner = getattr(model, "base_model", None)
            if tuner is not None and hasattr(tuner, "update_and_allocate"):
                tuner.update_and_allocate(state.global_step)
            return control

    return AdaLoraCallback()


# ------------------------------------------------------------------------------------------------------------ cells
@dataclass
class Cell:
    method: str
    task: str
    seed: int
    dir: Path
    config: dict | None = None  # the mapping given to glue.config.config_from_mapping (None: derived cell)
    source: str = ""
    deviations: dict = field(default_factory=dict)
    derived_from: str | None = None
    plan_error: str | None = None

    @property
    def results_path(self) -> Path:
        return self.dir / "results.json"

    def key(self) -> str:
        return f"{self.method}/{self.task}/seed{self.seed}"


def load_yaml(path: Path) -> dict:
    """A recipe as a plain mapping (``glue.config.load_recipe``)."""
    from glue.config import load_recipe

    return load_recipe(path)


def task_budget(task: str) -> dict:
    """The budget fields of ``recipes/minilm/lora-<task>.yaml``."""
    path = RECIPES / f"lora-{task}.yaml"
    if not path.is_file():
        raise SystemExit(f"no budget recipe {path}: every task needs recipes/minilm/lora-<task>.yaml")
    recipe = load_yaml(path)
    return {k: recipe[k] for k in BUDGET_FIELDS if k in recipe}


def train_steps(budget: dict, n_train: int) -> int:
    """Optimizer steps of a run (as ``transformers.Trainer`` counts them)."""
    if budget.get("max_steps", -1) and budget.get("max_steps", -1) > 0:
        return int(budget["max_steps"])
    per_epoch = math.ceil(n_train / budget.get("train_batch_size", 32))
    acc = budget.get("gradient_accumulation_steps", 1)
    per_epoch = max(per_epoch // acc + int(per_epoch % acc > 0), 1)
    return math.ceil(budget.get("num_train_epochs", 3.0) * per_epoch)


_TRAIN_SIZES: dict[tuple, int | Exception] = {}


def train_size(task: str, data_dir: str | None, max_train: int | None) -> int:
    """The task's training-set size (at most ``max_train``), read once per task; a failure is kept too, so that
    without local data (no ``GLUE_DIR``) and without the hub, each task's hub attempt and its retries happen once,
    not once per cell."""
    from glue.data import load_glue

    key = (task, data_dir)
    if key not in _TRAIN_SIZES:
        try:
            _TRAIN_SIZES[key] = len(load_glue(task, data_dir).train)
        except Exception as e:
            _TRAIN_SIZES[key] = e
    n = _TRAIN_SIZES[key]
    if isinstance(n, Exception):
        raise n
    return n if max_train is None else min(n, max_train)


def method_recipe(spec: dict, task: str) -> tuple[Path | None, bool]:
    """The method's recipe for ``task`` (``True``), else its first recipe in :data:`TASKS` order (``False``)."""
    if not spec.get("recipe"):
        return None, False
    own = RECIPES / f"{spec['recipe']}-{task}.yaml"
    if own.is_file():
        return own, True
    for t in TASKS:
        other = RECIPES / f"{spec['recipe']}-{t}.yaml"
        if other.is_file():
            return other, False
    raise SystemExit(f"method recipe {spec['recipe']}-<task>.yaml: none in {RECIPES}")


def _steps(task: str, values: dict, args) -> int:
    return train_steps(values, train_size(task, args.data_dir, values.get("max_train_samples")))


def plan_cell(method: str, task: str, seed: int, args) -> Cell:
    """The cell's run config: the task's budget + the method's fields (its recipe, or the table) + seed and folder."""
    spec = METHODS[method]
    cell_dir = Path(args.runs_dir) / method / task / f"seed{seed}"
    if spec.get("derived_from"):
        return Cell(method, task, seed, Path(args.runs_dir) / spec["derived_from"] / task / f"seed{seed}",
                    source=f"{spec['derived_from']} seed {seed}, rank {spec['rank']}", derived_from=spec["derived_from"])
    budget_recipe = load_yaml(RECIPES / f"lora-{task}.yaml")
    budget = task_budget(task)
    recipe_path, own = method_recipe(spec, task)
    deviations, scaled = {}, {}
    plan_error = None
    if recipe_path is not None and own:
        values = load_yaml(recipe_path)
        source = str(recipe_path.relative_to(ROOT))
        for k in BUDGET_FIELDS:
            if values.get(k) != budget.get(k):
                deviations[k] = {"recipe": values.get(k), "budget": budget.get(k)}
                if k in budget:
                    values[k] = budget[k]
                else:
                    values.pop(k, None)
    else:
        values = {k: v for k, v in budget_recipe.items() if k in BUDGET_FIELDS}
        if recipe_path is not None:  # the method's fields from its recipe for another task
            other = load_yaml(recipe_path)
            values.update({k: copy.deepcopy(v) for k, v in other.items()
                           if k not in BUDGET_FIELDS and k not in RUNTIME_FIELDS and k not in ("task", "model", "seed")})
            source = f"{recipe_path.relative_to(ROOT)} (method fields) at the {task} budget"
            for name in spec.get("scale_by_steps", ()):
                try:
                    ref, mine = _steps(other["task"], other, args), _steps(task, values, args)
                except Exception as e:
                    if not args.report_only:
                        raise
                    plan_error = f"scaling {name} needs the tasks' training sizes: {e}"
                    continue
                peft = dict(values["peft"])
                peft[name] = round(peft[name] * ref / mine, 2)
                values["peft"] = peft
                scaled[name] = f"{other['peft'][name]} x {ref}/{mine} steps"
        else:
            values.update(copy.deepcopy(spec["fields"]))
            source = "METHODS table"
    for k in RUNTIME_FIELDS:
        values.pop(k, None)
    values.update({"task": task, "model": MODEL, "seed": seed, "output_dir": str(cell_dir),
                   "num_threads": args.threads, "save_steps": budget_recipe.get("save_steps", 500)})
    if args.data_dir:
        values["data_dir"] = args.data_dir
    if args.smoke:
        values.update(SMOKE_BUDGET)
        values["eval_batch_size"] = 32
        values["logging_steps"] = 1
    if spec.get("schedule") == "adalora":
        try:
            steps = _steps(task, values, args)
        except Exception as e:  # no data here (--report-only elsewhere): the config cannot be completed
            if not args.report_only:
                raise
            plan_error = f"AdaLoRA's schedule needs the task's training size: {e}"
        else:
            peft = dict(values.get("peft") or {})
            peft.update({"total_step": steps, "tinit": int(0.1 * steps), "tfinal": int(0.2 * steps),
                         "deltaT": 10 if steps >= 100 else 1})
            values["peft"] = peft
    if scaled:
        source += "; " + ", ".join(f"{k} = {v}" for k, v in scaled.items())
    return Cell(method, task, seed, cell_dir, config=values, source=source, deviations=deviations,
                plan_error=plan_error)


def validate(cell: Cell):
    """The harness's own validation of the cell's config (unknown field, bad value, unknown method...)."""
    from glue.config import config_from_mapping

    return config_from_mapping(cell.config, where=f"quality cell {cell.key()}")


def _comparable(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in RUNTIME_FIELDS}


def _run_config_defaults() -> dict:
    """The harness's field defaults (a results file older than a field lacks it: it ran with the default)."""
    from glue.config import RunConfig

    return RunConfig().to_dict()


def _device_kind() -> str:
    """``cuda`` or ``cpu``: the kind of device this grid's cells run on (the first word of a results file's ``device``)."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _kind_of(result: dict) -> str:
    """``cpu`` or ``cuda``: the kind of device a glue.run results file ran on (the first word of its ``device``)."""
    return str(result.get("device", "")).split(":")[0]


def adopt(cell: Cell, adopt_dir: Path, kind: str | None = None, fill_kind: str | None = None) -> Path | None:
    """A glue.run results file in ``adopt_dir`` whose config equals ``cell``'s (apart from runtime fields) and that ran
    on the grid's kind of device (``kind``, default this machine's: a grid's times compare runs of one machine), or
    failing that on ``fill_kind`` (``--fill-kind``): copied into the cell folder with ``adopted_from``; returns its
    path, or None."""
    if cell.config is None or not adopt_dir.is_dir():
        return None
    want = _comparable(validate(cell).to_dict())
    found: dict[str, tuple[Path, dict]] = {}
    for path in sorted(adopt_dir.glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if not isinstance(data, dict) or not str(data.get("schema", "")).startswith("slpeft-glue-results/"):
            continue
        if _comparable({**_run_config_defaults(), **(data.get("config") or {})}) == want:
            found.setdefault(_kind_of(data), (path, data))
    for k in (kind or _device_kind(), fill_kind):
        if k in found:
            path, data = found[k]
            cell.dir.mkdir(parents=True, exist_ok=True)
            data = {**data, "adopted_from": str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)}
            from glue.results import write_json

            write_json(cell.results_path, data)
            return path
    return None


def run_cell(cell: Cell, keep_checkpoints: bool, in_process: bool = False) -> None:
    """Train one cell with the GLUE harness (resuming from its last checkpoint if it was interrupted).

    By default in a child process of its own (``--run-cell``), so that the harness's per-process figures (CPU time,
    peak resident memory) are the cell's alone and a crash ends only that cell; its output goes to
    ``<cell folder>.log``. ``in_process`` runs it here (tests)."""
    from glue.train import complete_checkpoints

    validate(cell)
    resume = bool(complete_checkpoints(cell.dir))
    overwrite = not resume and cell.dir.exists() and any(cell.dir.iterdir())  # an attempt that left no checkpoint
    job = {"config": {**cell.config, "overwrite_output_dir": overwrite}, "resume": resume}
    if in_process:
        run_job(job)
    else:
        log = cell.dir.with_name(cell.dir.name + ".log")
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as f:
            proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--run-cell", json.dumps(job)],
                                  stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
        if proc.returncode != 0:
            tail = log.read_text(errors="replace").strip().splitlines()[-15:]
            raise RuntimeError(f"cell {cell.key()} failed (rc {proc.returncode}); {log}:\n" + "\n".join(tail))
    if not cell.results_path.is_file():
        raise RuntimeError(f"cell {cell.key()} ended without {cell.results_path}")
    if not keep_checkpoints:
        for ckpt in cell.dir.glob("checkpoint-*"):
            shutil.rmtree(ckpt, ignore_errors=True)


def run_job(job: dict) -> None:
    """What a cell's process does: the harness's run of ``job['config']`` (with AdaLoRA's callback if needed)."""
    import sparse_lowrank_peft  # noqa: F401  (registers the tuners with PEFT)
    from glue.config import config_from_mapping
    from glue.run import run

    register_peft_methods()
    cfg = config_from_mapping(job["config"], where="quality cell")
    callbacks = [adalora_callback()] if cfg.method == "adalora" else None
    run(cfg, resume=job["resume"], callbacks=callbacks)


# ----------------------------------------------------------------------------------------------------------- report
def _main_metric_value(final: dict, metric: str) -> float | None:
    values = [m.get(metric) for m in (final or {}).values() if isinstance(m, dict)]
    values = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    return sum(values) / len(values) if values else None


def cell_record(cell: Cell, kind: str | None = None, fill_kind: str | None = None) -> dict:
    """What the report needs from a finished cell (status ``missing`` if it has no results). A cell that ran on a
    kind of device other than the grid's (``kind``, default this machine's) counts only as a fill (``fill_kind``):
    marked ``fill``, its metric counted and its time not; on any other kind it is ``missing``."""
    spec = METHODS[cell.method]
    rec: dict[str, Any] = {"method": cell.method, "task": cell.task, "seed": cell.seed, "dir": str(cell.dir),
                           "source": cell.source}
    if cell.deviations:
        rec["recipe_deviations"] = cell.deviations
    failed = cell.dir / "quality_error.txt"
    if not cell.results_path.is_file():
        rec["status"] = "failed" if failed.is_file() and not cell.derived_from else "missing"
        if rec["status"] == "failed":
            rec["error"] = failed.read_text().strip().splitlines()[-1][:300]
        elif cell.plan_error:  # e.g. no data here to plan it: it could be neither run nor adopted
            rec["error"] = cell.plan_error
        return rec
    r = json.loads(cell.results_path.read_text())
    ran_on, kind = _kind_of(r), kind or _device_kind()
    if ran_on not in (kind, fill_kind):
        rec["status"] = "missing"
        rec["error"] = (f"{cell.results_path} ran on {ran_on or 'an unrecorded device'}, not on this grid's {kind}"
                        + ("" if fill_kind else f" (--fill-kind {ran_on} would count it as a fill)"))
        return rec
    metric = r.get("main_metric")
    value = _main_metric_value(r.get("final"), metric)
    params = (r.get("params") or {}).get("trainable")
    nbytes = (r.get("adapter") or {}).get("weights_bytes")
    extra: dict[str, Any] = {}
    mr = r.get("method_results") or {}
    if spec.get("derived_from"):
        rank = str(spec["rank"])
        evals = (mr.get("rank_evals") or {}).get(rank)
        if evals is None:
            rec["status"] = "missing"
            rec["error"] = f"{cell.results_path} has no method_results.rank_evals[{rank}]"
            return rec
        splits = {k[: -len(metric) - 1] for k in evals if k.endswith("_" + metric)}
        value = _main_metric_value({s: {metric: evals[f"{s}_{metric}"]} for s in splits}, metric)
        extra["rank"] = spec["rank"]
    elif spec.get("metric_from") == "squeeze":
        sq = mr.get("squeeze") or {}
        extra["before_squeeze"] = value
        value = _main_metric_value(sq.get("after"), metric)
        params = sq.get("trainable_after", params)
        nbytes = (sq.get("adapter") or {}).get("weights_bytes", nbytes)
        extra["trained_params"] = (r.get("params") or {}).get("trainable")
    if "kept_total" in mr:
        extra["sora_kept_ranks"] = f"{mr['kept_total']}/{mr.get('max_total')}"
    rec.update({
        "status": "adopted" if r.get("adopted_from") else "done",
        "main_metric": metric, "value": value,
        "final": r.get("final"), "params_trainable": params, "params_total": (r.get("params") or {}).get("total"),
        "head_modules": r.get("head_modules"), "model_path": r.get("model_path"),
        "adapter_bytes": nbytes, "train_wall_s": (r.get("train") or {}).get("wall_s"),
        "train_steps": (r.get("train") or {}).get("global_step"), "train_examples": (r.get("train") or {}).get("examples"),
        "run_cpu_s": r.get("cpu_time_this_run_s"), "load_average": r.get("load_average"), "device": r.get("device"),
        "fill": ran_on != kind,
        "commit": (r.get("git") or {}).get("commit"), "dirty": (r.get("git") or {}).get("dirty"),
        "versions": r.get("versions"), "finished_at": r.get("finished_at"),
        **({"adopted_from": r["adopted_from"]} if r.get("adopted_from") else {}), **extra,
    })
    from glue.tasks import get_task

    labels = get_task(cell.task).labels
    head = head_params(_local_model_path(r), r.get("head_modules"), 1 if labels is None else len(labels))
    rec["params_head"] = head
    rec["params_without_head"] = None if head is None or params is None else params - head
    if spec.get("derived_from") and rec["params_without_head"] is not None:
        r_max = (r.get("peft_config") or {}).get("r")
        if r_max:  # the rank-b slice of the factors: b/r of them (A is r x in, B is out x r)
            rec["params_without_head"] = rec["params_without_head"] * spec["rank"] // r_max
            rec["params_trainable"] = rec["params_without_head"] + head
    if cell.derived_from is None and cell.config is not None and cell.plan_error is None:
        rec["config_matches_plan"] = (_comparable({**_run_config_defaults(), **(r.get("config") or {})})
                                      == _comparable(validate(cell).to_dict()))
    return rec


_HEAD_PARAMS: dict[tuple, int | None] = {}


def _local_model_path(result: dict) -> str | None:
    """The run's model folder if it exists here, else the run's model name resolved here (a grid run on another
    machine records that machine's folder, e.g. the bundled MiniLM's site-packages path there)."""
    path = result.get("model_path")
    if path and Path(path).exists():
        return path
    model = (result.get("config") or {}).get("model")
    if not model:
        return path
    from glue.errors import GlueError
    from glue.model import resolve_model_path

    try:
        return resolve_model_path(model)
    except GlueError:  # the bundled model is not installed here: head_params then reports None
        return path


def head_params(model_path: str | None, head: list | None, num_labels: int) -> int | None:
    """Parameters of the classification head (trained in full by every method), from the model's config."""
    if not model_path or not head:
        return None
    key = (model_path, tuple(head), num_labels)
    if key not in _HEAD_PARAMS:
        try:
            from transformers import AutoConfig, AutoModelForSequenceClassification
            from transformers.utils import logging

            logging.set_verbosity_error()
            config = AutoConfig.from_pretrained(model_path, num_labels=num_labels)
            model = AutoModelForSequenceClassification.from_config(config)
            _HEAD_PARAMS[key] = sum(p.numel() for n, p in model.named_parameters()
                                    if set(n.split(".")) & set(head))
        except Exception:  # no model files here: the plot then uses the trainable count
            _HEAD_PARAMS[key] = None
    return _HEAD_PARAMS[key]


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def summarize(records: list[dict], methods: list[str], tasks: list[str]) -> dict:
    """Mean ± std per method × task, the average over tasks (per seed, then mean ± std), costs per method."""
    done = [r for r in records if r["status"] in ("done", "adopted") and r.get("value") is not None]
    out = OrderedDict()
    for m in methods:
        rows = [r for r in done if r["method"] == m]
        per_task = {}
        for t in tasks:
            vals = [r["value"] for r in rows if r["task"] == t]
            mean, std = _mean_std(vals)
            per_task[t] = {"mean": mean, "std": std, "n": len(vals),
                           "n_fill": sum(1 for r in rows if r["task"] == t and r.get("fill"))}
        seeds = sorted({r["seed"] for r in rows})
        seed_avgs = []
        for s in seeds:
            vals = {r["task"]: r["value"] for r in rows if r["seed"] == s}
            if all(t in vals for t in tasks):
                seed_avgs.append(statistics.fmean(vals[t] for t in tasks))
        complete = all(per_task[t]["n"] > 0 for t in tasks)
        avg = statistics.fmean(per_task[t]["mean"] for t in tasks) if complete else None
        _, avg_std = _mean_std(seed_avgs)
        params = [r["params_trainable"] for r in rows if r.get("params_trainable") is not None]
        adapter_only = [r["params_without_head"] for r in rows if r.get("params_without_head") is not None]
        nbytes = [r["adapter_bytes"] for r in rows if r.get("adapter_bytes") is not None]
        walls = {}  # the grid's own device only: a fill's time is another machine's
        for r in rows:
            if r.get("train_wall_s") is not None and not r.get("fill"):
                walls.setdefault(r["task"], []).append(r["train_wall_s"])
        timed = all(t in walls for t in tasks if per_task[t]["n"])
        out[m] = {
            "tasks": per_task, "average": avg, "average_std_over_seeds": avg_std,
            "seeds_with_all_tasks": len(seed_avgs), "complete": complete,
            "params_trainable": statistics.median(params) if params else None,
            "params_without_head": statistics.median(adapter_only) if adapter_only else None,
            "adapter_bytes": statistics.median(nbytes) if nbytes else None,
            "train_wall_s_per_task": {t: statistics.fmean(v) for t, v in walls.items()},
            "train_wall_s_sum": sum(statistics.fmean(v) for v in walls.values()) if walls and timed else None,
        }
    return out


def _pct(v):
    return "–" if v is None else f"{100 * v:.1f}"


FILL_MARK = "†"  # a mean that counts a seed run on the fill device (--fill-kind)


def _fmt_cell(s: dict) -> str:
    if not s["n"]:
        return "missing"
    txt = _pct(s["mean"])
    if s["std"] is not None:
        txt += f" ± {100 * s['std']:.1f}"
    return txt + f" ({s['n']}{FILL_MARK if s.get('n_fill') else ''})"


def _fmt_bytes(n) -> str:
    """The harness report's byte format (``glue.report``), with ``–`` for a cell that has none."""
    from glue.report import _fmt_bytes as report_bytes

    return "–" if n is None else report_bytes(n)


def _fmt_params(n) -> str:
    if n is None:
        return "–"
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"


def markdown(report: dict) -> str:
    """The quality table: per task mean ± std (seeds), the average, parameters, bytes, training time; then notes."""
    from glue.tasks import get_task

    tasks = report["tasks"]
    heads = [f"{get_task(t).display} ({get_task(t).main_metric})" for t in tasks]
    lines = [
        f"MiniLM (bundled, 6 layers x 384) on GLUE dev, one budget per task, {report['seeds']} seed(s) per cell: "
        "final dev metric x 100, mean ± std over seeds (number of finished seeds); average over the tasks; "
        "trainable parameters include the classification head (pooler + classifier, trained in full by every "
        "method); adapter bytes: the saved adapter file (full: the model); train time: training wall seconds summed "
        "over the tasks (mean over seeds), on the machine of the runs."
        + (" SMOKE RUN (tiny budget): the numbers mean nothing." if report.get("smoke") else ""),
        "",
        "| method | " + " | ".join(heads) + " | average | trainable params | adapter bytes | train s |",
        "|:---|" + "---:|" * len(tasks) + "---:|---:|---:|---:|",
    ]
    for m, s in report["summary"].items():
        avg = "–"
        if s["average"] is not None:
            avg = _pct(s["average"])
            if s["average_std_over_seeds"] is not None:
                avg += f" ± {100 * s['average_std_over_seeds']:.1f}"
        else:
            n_done = sum(1 for t in tasks if s["tasks"][t]["n"])
            avg = f"incomplete ({n_done}/{len(tasks)})"
        wall = "–" if s["train_wall_s_sum"] is None else f"{s['train_wall_s_sum']:.0f}"
        lines.append(
            f"| {METHODS[m]['label']} | " + " | ".join(_fmt_cell(s["tasks"][t]) for t in tasks)
            + f" | {avg} | {_fmt_params(s['params_trainable'])} | {_fmt_bytes(s['adapter_bytes'])} | {wall} |"
        )
    lines += ["", "Budgets (recipes/minilm/lora-<task>.yaml): " + "; ".join(
        f"{get_task(t).display}: {b.get('max_train_samples') or 'all'} examples x "
        + (f"{b['max_steps']} steps" if (b.get("max_steps") or -1) > 0 else f"{b.get('num_train_epochs')} epochs")
        + ", "
        f"batch {b.get('train_batch_size')}, length {b.get('max_seq_len')}"
        for t, b in report["budgets"].items())]
    notes = [f"- {METHODS[m]['label']}: {METHODS[m]['note']}" for m in report["summary"]]
    devs = {}
    for r in report["cells"]:
        for k, d in (r.get("recipe_deviations") or {}).items():
            devs.setdefault((r["method"], r["task"]), {})[k] = d
    for (m, t), d in sorted(devs.items()):
        notes.append(f"- {METHODS[m]['label']} on {get_task(t).display}: the recipe's "
                     + ", ".join(f"{k} {v['recipe']}" for k, v in d.items())
                     + " replaced by the task budget's " + ", ".join(f"{k} {v['budget']}" for k, v in d.items()) + ".")
    fills: dict[tuple, list[str]] = {}
    for r in report["cells"]:
        if r.get("fill"):
            fills.setdefault((r["task"], r["seed"]), []).append(METHODS[r["method"]]["label"])
    if fills:
        kind = report.get("device_kind")
        notes.append(f"- {FILL_MARK} The seeds counted include a run on {report.get('fill_kind')} instead of this "
                     f"grid's {kind} (--fill-kind; same config and seed, another machine's numerics; its training "
                     f"time is left out of the train s column): "
                     + "; ".join(f"{get_task(t).display} seed {s}: " + ", ".join(labels)
                                 for (t, s), labels in sorted(fills.items())) + ".")
    unplanned: dict[str, list[str]] = {}  # missing for a reason (no data to plan it, another device's run)
    for r in report["cells"]:
        if r["status"] == "missing" and r.get("error"):
            unplanned.setdefault(r["error"], []).append(f"{r['method']}/{r['task']}/seed{r['seed']}")
    for err, keys in unplanned.items():
        notes.append(f"- MISSING {', '.join(keys)}: {err}")
    failed = [r for r in report["cells"] if r["status"] == "failed"]
    for r in failed:
        notes.append(f"- FAILED {r['method']}/{r['task']}/seed{r['seed']}: {r.get('error', '?')}")
    lines += ["", "Notes:", *notes]
    env = report.get("environment") or {}
    if env:
        fill = f" and fills on {env['fill_devices']}" if env.get("fill_devices") else ""
        lines += ["", f"Runs: {env.get('devices')}{fill}, commits {env.get('commits')}, versions {env.get('versions')}."]
    return "\n".join(lines)


def plot(report: dict, path: Path) -> Path:
    """Average metric vs trainable parameters without the head (log x), one point per complete method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 5.5))
    colors = {"full": "black", "peft": "tab:blue", "ours": "tab:red"}
    shown = 0
    for m, s in report["summary"].items():
        x = s["params_without_head"] if s["params_without_head"] is not None else s["params_trainable"]
        if s["average"] is None or not x:
            continue
        y = 100 * s["average"]
        err = None if s["average_std_over_seeds"] is None else 100 * s["average_std_over_seeds"]
        shown += 1
        # many methods share a parameter count: a number at each point, the names in the legend beside the axes
        ax.errorbar([x], [y], yerr=None if err is None else [err], fmt="o", color=colors[METHODS[m]["group"]],
                    capsize=3, label=f"{shown}. {METHODS[m]['label']} ({y:.1f})")
        ax.annotate(str(shown), (x, y), textcoords="offset points", xytext=(6 if shown % 2 else -12, -3), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters without the classification head (log)")
    ax.set_ylabel("average dev metric x 100 over " + ", ".join(report["tasks"]))
    title = f"MiniLM on GLUE: average vs parameters ({report['seeds']} seed(s); blue PEFT, red ours, black full)"
    if report.get("smoke"):
        title += " -- SMOKE"
    if not shown:
        ax.text(0.5, 0.5, "no method has finished every task yet", transform=ax.transAxes, ha="center")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    if shown:
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=7, title="method (average)",
                  title_fontsize=7, frameon=False)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def build_report(cells: list[Cell], methods, tasks, args, command: str) -> dict:
    """The grid's report: every cell's record, the summary per method, budgets, and where and how the cells ran."""
    from glue.results import git_info

    kind = args.device_kind or _device_kind()
    records = [cell_record(c, kind, args.fill_kind) for c in cells]
    budgets = {t: task_budget(t) for t in tasks}
    if args.smoke:
        budgets = {t: {**b, **SMOKE_BUDGET} for t, b in budgets.items()}
    done = [r for r in records if r["status"] in ("done", "adopted")]
    report = {
        "bench": "quality", "schema": 1, "model": MODEL,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command, "report_commit": git_info(ROOT)["commit"], "smoke": bool(args.smoke),
        "tasks": tasks, "methods": methods, "seeds": args.seeds, "budgets": budgets,
        "device_kind": kind, "fill_kind": args.fill_kind,
        "method_notes": {m: METHODS[m]["note"] for m in methods},
        "counts": {**{s: sum(1 for r in records if r["status"] == s) for s in ("done", "adopted", "missing", "failed")},
                   "fill": sum(1 for r in records if r.get("fill"))},
        "cells": records,
        "summary": summarize(records, methods, tasks),
        "environment": {
            "devices": sorted({r["device"] for r in done if r.get("device") and not r.get("fill")}),
            "fill_devices": sorted({r["device"] for r in done if r.get("device") and r.get("fill")}),
            "commits": sorted({(r.get("commit") or "?")[:10] + ("-dirty" if r.get("dirty") else "") for r in done}),
            "versions": sorted({json.dumps(r.get("versions"), sort_keys=True) for r in done if r.get("versions")}),
        },
    }
    report["environment"]["versions"] = [json.loads(v) for v in report["environment"]["versions"]]
    return report


# ------------------------------------------------------------------------------------------------------------- main
def _run_reported(cell: Cell, args) -> None:
    """Run one cell, printing its start, end and time; a failure is written to ``quality_error.txt`` in the cell
    folder (and shown in the report) instead of stopping the grid. Past ``args.start_deadline`` (``--stop-after``)
    the cell is not started: it stays missing for the next invocation."""
    if args.start_deadline is not None and time.monotonic() >= args.start_deadline:
        print(f"[quality] {cell.key()}: not started (--stop-after {args.stop_after:g} s reached)", file=sys.stderr,
              flush=True)
        return
    print(f"[quality] {cell.key()}: running ({cell.source})", file=sys.stderr, flush=True)
    t0 = time.time()
    err = cell.dir / "quality_error.txt"
    try:
        run_cell(cell, args.keep_checkpoints, args.in_process)
        err.unlink(missing_ok=True)
    except KeyboardInterrupt:
        raise
    except Exception:
        cell.dir.mkdir(parents=True, exist_ok=True)
        err.write_text(traceback.format_exc())
        print(f"[quality] {cell.key()}: FAILED, see {err}", file=sys.stderr, flush=True)
    print(f"[quality] {cell.key()}: {time.time() - t0:.0f} s", file=sys.stderr, flush=True)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", nargs="+", default=None, help=f"subset of: {', '.join(METHODS)}")
    p.add_argument("--tasks", nargs="+", default=None, help=f"subset of: {', '.join(TASKS)}")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per method x task (default 3)")
    p.add_argument("--smoke", action="store_true", help="tiny budget (2 steps, 32 examples) in runs/quality-smoke (CI)")
    p.add_argument("--report-only", action="store_true", help="build json/md/png from finished cells, run nothing")
    p.add_argument("--plan", action="store_true", help="print every cell's config as JSON (validated), run nothing")
    p.add_argument("--adopt", default=None,
                   help="folder of glue.run results to adopt as cells (equal configs, seed included)")
    p.add_argument("--runs-dir", default=None, help="cell folders (default runs/<--name with quality-minilm "
                                                     "shortened to quality>: runs/quality, runs/quality-h100; smoke "
                                                     "runs/quality-smoke)")
    p.add_argument("--out-dir", default=None, help="json/md/png folder (default bench/results; smoke: the runs dir)")
    p.add_argument("--name", default="quality-minilm",
                   help="stem of the json/md/png files (default quality-minilm; e.g. quality-minilm-h100 for a "
                        "grid run on a GPU, whose times and seeds are not the CPU grid's)")
    p.add_argument("--data-dir", default=None, help="GLUE folder (default: $GLUE_DIR)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run (default 1: a shared machine)")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep a finished cell's checkpoints")
    p.add_argument("--max-cells", type=int, default=None, help="run at most this many cells, then report")
    p.add_argument("--device-kind", choices=("cpu", "cuda"), default=None,
                   help="the kind of device the grid's cells ran on, for --adopt (default: this machine's). With "
                        "--report-only, rebuilds a GPU grid's report on a CPU machine from its committed cell files")
    p.add_argument("--fill-kind", choices=("cpu", "cuda"), default=None,
                   help="count cells that ran on this other kind of device where the grid's own (--device-kind) has "
                        "none: marked in the table, their metric counted and their time not; cells run here with it "
                        "are such fills (a GPU grid's last cells finished on a CPU machine)")
    p.add_argument("--stop-after", type=float, default=None,
                   help="start no cell later than this many seconds after the first one started; running cells "
                        "finish, the rest stay missing for the next invocation (a leased machine with a time limit)")
    p.add_argument("--jobs", type=int, default=1, help="cells run at once, each in its own process (default 1; a "
                   "cell's time then includes the others' load)")
    p.add_argument("--in-process", action="store_true", help="run the cells in this process (tests; the harness's "
                   "CPU time and peak memory then accumulate over cells)")
    p.add_argument("--run-cell", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def check_args(args) -> tuple[list[str], list[str]]:
    """The methods and tasks of the grid, after checking the options (and filling in the default folders).

    Raises:
        SystemExit: an unknown method or task, or options that contradict each other.
    """
    for name, known, given in (("method", METHODS, args.methods), ("task", TASKS, args.tasks)):
        unknown = sorted(set(given or []) - set(known))
        if unknown:
            raise SystemExit(f"unknown {name}(s) {unknown}; choose from {', '.join(known)}")
    if args.seeds < 1:
        raise SystemExit("--seeds must be >= 1")
    if args.jobs < 1 or (args.jobs > 1 and args.in_process):
        raise SystemExit(f"--jobs {args.jobs}: needs a count >= 1, and 1 with --in-process (cells in one process "
                         "run one at a time)")
    kind = args.device_kind or _device_kind()
    if args.fill_kind is not None and args.fill_kind == kind:
        raise SystemExit(f"--fill-kind {args.fill_kind}: that is the grid's own kind of device; a fill is a run on "
                         "another kind (e.g. --device-kind cuda --fill-kind cpu)")
    if kind != _device_kind() and args.fill_kind != _device_kind() and not (args.report_only or args.plan):
        raise SystemExit(f"--device-kind {args.device_kind}: this machine's device is {_device_kind()}, and cells run "
                         "here would not be that grid's; use it with --report-only (or --plan), or drop it, or add "
                         f"--fill-kind {_device_kind()} to run the missing cells here as marked fills")
    if args.stop_after is not None and not args.stop_after > 0:
        raise SystemExit(f"--stop-after {args.stop_after}: give a number of seconds > 0")
    args.start_deadline = None
    if not args.name or "/" in args.name or args.name.startswith("."):
        raise SystemExit(f"--name {args.name!r}: give a plain file stem such as quality-minilm-h100")
    if args.runs_dir is None:
        args.runs_dir = str(ROOT / "runs" / ("quality-smoke" if args.smoke else
                                             args.name.replace("quality-minilm", "quality", 1)))
    if args.data_dir is None:
        args.data_dir = os.environ.get("GLUE_DIR")
    return ([m for m in METHODS if not args.methods or m in args.methods],
            [t for t in TASKS if not args.tasks or t in args.tasks])


def adopt_cells(cells: list[Cell], args) -> None:
    """``--adopt``: take equal-config results from the folder as the cells that have none."""
    if not Path(args.adopt).is_dir():
        raise SystemExit(f"--adopt {args.adopt}: no such folder")
    for c in cells:
        if c.config is not None and c.plan_error is None and not c.results_path.is_file():
            found = adopt(c, Path(args.adopt), args.device_kind, args.fill_kind)
            if found:
                print(f"[quality] {c.key()}: adopted {found}", file=sys.stderr, flush=True)


def run_missing(cells: list[Cell], args) -> None:
    """Run the cells without results (at most ``--max-cells``), ``--jobs`` at a time; every config is checked first."""
    pending = [c for c in cells if c.config is not None and not c.results_path.is_file()]
    if args.max_cells is not None:
        pending = pending[: args.max_cells]
    for c in pending:
        validate(c)  # every planned cell's config is checked before the first one starts
    if args.stop_after is not None:  # counted from here: planning (imports, dataset sizes) takes seconds
        args.start_deadline = time.monotonic() + args.stop_after
    if args.jobs == 1:
        for c in pending:
            _run_reported(c, args)
    else:  # each cell is a child process of its own; these threads only wait on them
        with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
            list(pool.map(lambda c: _run_reported(c, args), pending))


def write_outputs(report: dict, out_dir: Path, name: str) -> None:
    """``<name>.json``, ``<name>.md`` (printed too) and ``<name>.png`` in ``out_dir``."""
    from glue.results import write_json

    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"{name}.json"
    write_json(json_path, report, indent=1)
    md = markdown(report)
    (out_dir / f"{name}.md").write_text(md + "\n")
    plot(report, out_dir / f"{name}.png")
    print(md)
    print(f"\nwrote {json_path}, {name}.md, {name}.png ({report['counts']})", file=sys.stderr)


def main(argv=None) -> dict:
    """Plan the grid, adopt and run the missing cells (unless ``--report-only`` / ``--plan``), write the report."""
    args = parse_args(argv)
    if args.run_cell:
        run_job(json.loads(args.run_cell))
        return {}
    command = " ".join(["python bench/quality.py", *(argv if argv is not None else sys.argv[1:])])
    methods, tasks = check_args(args)
    out_dir = Path(args.out_dir or (args.runs_dir if args.smoke else ROOT / "bench" / "results"))

    import sparse_lowrank_peft  # noqa: F401  (registers the tuners with PEFT)

    register_peft_methods()
    # seed-major order: seed 0 of every method and task first, so the table fills in one full pass at a time
    cells = [plan_cell(m, t, s, args) for s in range(args.seeds) for t in tasks for m in methods]
    if args.plan:
        plan = [{"cell": c.key(), "source": c.source, "derived_from": c.derived_from, "deviations": c.deviations,
                 "config": None if c.config is None else validate(c).to_dict()} for c in cells]
        print(json.dumps(plan, indent=1))
        return {"plan": plan}
    if args.adopt:
        adopt_cells(cells, args)
    if not args.report_only:
        run_missing(cells, args)
    report = build_report(cells, methods, tasks, args, command)
    write_outputs(report, out_dir, args.name)
    return report


if __name__ == "__main__":
    main()
