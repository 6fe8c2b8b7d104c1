"""Results of a GLUE run: provenance (git commit, package versions, device, memory, CPU time, load), the
evaluations read from the Trainer's log, and the results JSON (``<output_dir>/results.json``, schema
:data:`RESULTS_SCHEMA`; ``glue.report`` and ``bench/`` read it).
"""

from __future__ import annotations

import json
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from glue.tasks import TaskSpec, is_finite

if TYPE_CHECKING:
    from glue.config import RunConfig

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_SCHEMA = "slpeft-glue-results/1"
RESULTS_FILE = "results.json"


# ----------------------------------------------------------------------------------------------------------------
# provenance


def git_info(root: Path = REPO_ROOT) -> dict[str, Any]:
    """The commit of the code that ran and whether the working tree had uncommitted changes."""
    def git(*args):
        return subprocess.run(
            ["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
        return {"commit": commit, "dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def peak_memory() -> dict[str, int | None]:
    """Peak resident memory of this process and, on CUDA, the peak memory allocated by torch (bytes)."""
    import torch

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss_bytes = rss if sys.platform == "darwin" else rss * 1024
    cuda = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    return {"rss_bytes": int(rss_bytes), "cuda_max_allocated_bytes": cuda}


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return None


def versions() -> dict[str, str | None]:
    """Versions of the packages that decide the numbers."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in ("torch", "transformers", "peft", "datasets", "sparse_lowrank_peft"):
        try:
            mod = __import__(name)
            out[name] = getattr(mod, "__version__", None)
        except Exception:
            out[name] = None
    return out


def device_description() -> str:
    """The device the run used, in words (GPU name, or CPU and its thread count)."""
    import torch

    if torch.cuda.is_available():
        return f"cuda: {torch.cuda.get_device_name(0)}"
    return f"cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads"


# ----------------------------------------------------------------------------------------------------------------
# JSON


def clean(value):
    """JSON-safe: NaN/inf become null, numpy scalars become Python numbers."""
    if isinstance(value, dict):
        return {str(k): clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        try:
            value = value.item()
        except (TypeError, ValueError):
            return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def write_json(path: Path, data: Any, indent: int = 2) -> None:
    """Write JSON atomically (a temporary file, then a rename); NaN and infinities are written as null."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(clean(data), indent=indent) + "\n", encoding="utf-8")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------------------------
# metrics


def evals_from_log_history(log_history: Sequence[Mapping[str, Any]], task: TaskSpec, splits: Sequence[str]):
    """The evaluations in a Trainer's log history, as ``[{step, epoch, split, metrics}]``."""
    out = []
    names = set(task.metrics) | {"loss"}
    for entry in log_history:
        for split in splits:
            prefix = f"eval_{split}_"
            metrics = {k[len(prefix):]: v for k, v in entry.items() if k.startswith(prefix) and k[len(prefix):] in names}
            if metrics:
                out.append({"step": entry.get("step"), "epoch": entry.get("epoch"), "split": split, "metrics": metrics})
    return out


def split_metrics(metrics: Mapping[str, Any], task: TaskSpec, splits: Sequence[str]) -> dict[str, dict[str, float]]:
    """``trainer.evaluate()``'s ``{"eval_validation_accuracy": x, ...}`` -> ``{"validation": {"accuracy": x}}``."""
    return {e["split"]: e["metrics"] for e in evals_from_log_history([metrics], task, splits)}


def final_and_best(evals: list[dict], task: TaskSpec, final_step: int) -> tuple[dict, dict | None]:
    """The metrics of each split at ``final_step``, and the best evaluation of the main metric during training."""
    final = {e["split"]: e["metrics"] for e in evals if e["step"] == final_step}
    scored = [e for e in evals if is_finite(e["metrics"].get(task.main_metric))]
    best = max(scored, key=lambda e: e["metrics"][task.main_metric]) if scored else None
    if best is not None:
        best = {"step": best["step"], "epoch": best["epoch"], "split": best["split"],
                "value": best["metrics"][task.main_metric]}
    return final, best


def file_bytes(folder: Path, names: Sequence[str]) -> int | None:
    """The size of the first of ``names`` that exists in ``folder`` (the weights file of a saved model)."""
    for name in names:
        if (folder / name).is_file():
            return (folder / name).stat().st_size
    return None


def dir_bytes(folder: Path) -> int:
    """Bytes of every file under ``folder``."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())



# ----------------------------------------------------------------------------------------------------------------
# the results JSON


def results_record(cfg: RunConfig, data, built, training: dict, evals: list[dict], adapter: dict,
                   method_results: dict | None, clock) -> dict[str, Any]:
    """The results of a finished run (schema :data:`RESULTS_SCHEMA`).

    Args:
        cfg: the run's config.
        data: the loaded data (:class:`glue.data.TaskData`: the task, the splits' sizes, source, skipped rows).
        built: the :class:`glue.model.BuiltModel` that was trained.
        training: ``{"examples", "global_step", "epochs", "train_loss", "train_loss_steps", "wall_s"}`` of the
            training (``train_loss`` averages the steps ``train_loss_steps`` names: a resumed run's, those after its
            checkpoint).
        evals: every evaluation (:func:`evals_from_log_history`), the final step's included.
        adapter: ``{"path", "weights_bytes", "dir_bytes"}`` of the saved adapter (the model for ``full``).
        method_results: the method's extras (DyLoRA's rank evaluations, SoRA's kept ranks, quantization, squeeze).
        clock: the run's :class:`glue.train.RunClock`.
    """
    task = data.task
    final, best = final_and_best(evals, task, training["global_step"])
    trainable, total = built.params
    now = time.time()
    return {
        "schema": RESULTS_SCHEMA, "task": task.name, "task_display": task.display, "method": cfg.method,
        "model": cfg.model, "model_path": built.model_path, "main_metric": task.main_metric, "metrics": task.metrics,
        "final": final, "final_step": training["global_step"], "best": best, "evals": evals, "train": training,
        "eval_examples": {k: len(v) for k, v in data.evals.items()},
        "params": {"trainable": trainable, "total": total, "trainable_pct": 100.0 * trainable / total},
        "head_modules": built.head, "adapter": adapter,
        # Whole run: this invocation, plus the training time before an interruption (read from the checkpoint; the
        # interrupted invocation's setup time is not recorded anywhere and is not included).
        "wall_time_s": clock.elapsed_before + now - clock.started,
        "wall_time_this_run_s": now - clock.started,
        # CPU seconds this process used (user + system, all threads): on a shared machine the wall time depends on
        # the load, the CPU time much less. Not summed over an interrupted segment.
        "cpu_time_this_run_s": cpu_seconds(),
        "resumed_from": str(clock.checkpoint) if clock.checkpoint else None,
        "peak_memory": peak_memory(),
        "device": device_description(),
        # 1-minute load averages at start and end: on a shared machine, wall time depends on what else ran.
        "load_average": {"start": clock.load_at_start, "end": load_average(), "cpu_count": os.cpu_count()},
        "config": cfg.to_dict(),
        "peft_config": built.peft_config.to_dict() if built.peft_config is not None else None,
        "init_adapter": built.init_info, "method_results": method_results,
        "data_source": data.source, "skipped_rows": data.skipped_rows,
        "git": git_info(), "versions": versions(),
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def write_results(cfg: RunConfig, out: Path, results: dict) -> dict:
    """Write ``<out>/results.json`` and, if the recipe asks, ``results_path`` (SoRA's kept-rank plot is copied
    beside it). Returns the results as written to ``results_path``."""
    write_json(out / RESULTS_FILE, results)
    if cfg.results_path:
        dest = Path(cfg.results_path)
        method_results = results.get("method_results") or {}
        plot = method_results.get("kept_ranks_plot")
        if plot and Path(plot).is_file():  # SoRA's kept-rank plot goes beside the results file it belongs to
            copy = dest.with_name(dest.stem + "-kept_ranks.png")
            copy.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(plot, copy)
            results = {**results, "method_results": {**method_results, "kept_ranks_plot_copy": str(copy)}}
        write_json(dest, results)
    return results


def print_summary(results: dict, out: Path) -> None:
    """One line: the run's time and final metrics, and where the results are."""
    summary = ", ".join(
        f"{split} " + " ".join(f"{k}={v:.4f}" for k, v in m.items() if k != "loss" and is_finite(v))
        for split, m in results["final"].items()
    )
    print(
        f"[glue] done in {results['wall_time_this_run_s']:.1f} s: {results['task_display']} {results['method']} "
        f"step {results['final_step']}: {summary}; results in {out / RESULTS_FILE}",
        flush=True,
    )
