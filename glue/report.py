"""Results JSONs of ``glue.run`` -> a markdown table and PNG plots.

Usage::

    python -m glue.report bench/results/glue/ [more files or folders] [--markdown OUT.md] [--plots DIR]

Folders are searched recursively for ``*.json`` files written by ``glue.run`` (other JSON files are skipped).
The table has one row per run: task, model, method, the task's main metric at the end of training and at its best
evaluation, every metric at the end, trainable parameters, adapter bytes on disk, training budget, wall time (with the
process's CPU time and the machine's 1-minute load average at start/end, since a shared machine stretches the wall
time) and peak memory. The plots are ``<task>_metric_over_steps.png`` (dev metric at every evaluation, one line per
model/method) and ``metric_vs_params.png`` (final main metric against trainable parameters, one panel per task).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable, Sequence

from glue.errors import GlueError
from glue.tasks import GLUE_TASKS

SCHEMA_PREFIX = "slpeft-glue-results/"
TASK_ORDER = list(GLUE_TASKS)


def load_results(paths: Iterable[str | Path]) -> list[dict[str, Any]]:
    """Read every results JSON named or found (recursively) under the given paths, sorted for the table.

    Raises:
        GlueError: a named path that does not exist, a named file that is not a results JSON, or no results at all.
    """
    found: list[tuple[Path, dict]] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            for f in sorted(p.rglob("*.json")):
                data = _read(f)
                if data is not None:
                    found.append((f, data))
        elif p.is_file():
            data = _read(p)
            if data is None:
                raise GlueError(f"'{p}' is not a results file of glue.run (no '{SCHEMA_PREFIX}*' schema field).")
            found.append((p, data))
        else:
            raise GlueError(f"'{p}' does not exist. Give results JSON files or folders holding them.")
    if not found:
        raise GlueError(
            f"No glue.run results found under {list(map(str, paths))}. Run `python -m glue.run RECIPE` first (its "
            "results.json is in the run's output_dir, or where results_path says)."
        )
    for f, data in found:
        data.setdefault("_file", str(f))
    return sorted((d for _, d in found), key=_sort_key)


def _read(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    if isinstance(data, dict) and str(data.get("schema", "")).startswith(SCHEMA_PREFIX):
        return data
    return None


def _sort_key(r: dict) -> tuple:
    task = r.get("task", "")
    order = TASK_ORDER.index(task) if task in TASK_ORDER else len(TASK_ORDER)
    return (order, task, r.get("model", ""), r.get("method", ""), r.get("finished_at", ""))


def main_value(r: dict) -> float | None:
    """The main metric at the end of training (averaged over splits for MNLI's matched/mismatched)."""
    values = [m.get(r["main_metric"]) for m in r.get("final", {}).values()]
    values = [v for v in values if isinstance(v, (int, float))]
    return sum(values) / len(values) if values else None


def _fmt_num(v: float | None, digits: int = 4) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "n/a"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _fmt_params(n: int | None) -> str:
    if n is None:
        return "n/a"
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"


def _budget(r: dict) -> str:
    t = r.get("train", {})
    epochs = t.get("epochs")
    ep = f"{epochs:g}" if isinstance(epochs, (int, float)) else "?"
    return f"{t.get('examples', '?')} × {ep} ep ({t.get('global_step', '?')} steps)"


def markdown_table(results: Sequence[dict]) -> str:
    """One markdown row per run (see the module docstring for the columns)."""
    head = (
        "| task | model | method | main metric | final | best (step) | all final metrics | trainable params | "
        "adapter on disk | train budget | wall time | peak RSS |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    rows = []
    for r in results:
        best = r.get("best") or {}
        finals = "; ".join(
            (f"{split}: " if len(r.get("final", {})) > 1 else "")
            + ", ".join(f"{k} {_fmt_num(v)}" for k, v in m.items() if k != "loss")
            for split, m in r.get("final", {}).items()
        )
        wall = r.get("wall_time_s")
        load = r.get("load_average") or {}
        load_note = ""
        if isinstance(load.get("start"), (int, float)) and isinstance(load.get("end"), (int, float)):
            load_note = f" (load {load['start']:.1f}/{load['end']:.1f} on {load.get('cpu_count', '?')} CPUs)"
        cpu = r.get("cpu_time_this_run_s")
        if isinstance(cpu, (int, float)):
            load_note = f", CPU {cpu:.0f} s" + load_note
        rss = (r.get("peak_memory") or {}).get("rss_bytes")
        rows.append(
            f"| {r.get('task_display', r.get('task'))} | {r.get('model')} | {r.get('method')} | {r.get('main_metric')} "
            f"| {_fmt_num(main_value(r))} | {_fmt_num(best.get('value'))} ({best.get('step', '?')}) | {finals} "
            f"| {_fmt_params((r.get('params') or {}).get('trainable'))} "
            f"| {_fmt_bytes((r.get('adapter') or {}).get('weights_bytes'))} | {_budget(r)} "
            f"| {'n/a' if wall is None else f'{wall:.0f} s'}{load_note} | {_fmt_bytes(rss)} |"
        )
    return head + "\n".join(rows) + "\n"


def _label(r: dict) -> str:
    return f"{r.get('model')} {r.get('method')}"


def plot_metric_over_steps(results: Sequence[dict], out_dir: Path) -> list[Path]:
    """One PNG per task: the main dev metric at every evaluation, one line per model/method (and split)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_task: dict[str, list[dict]] = defaultdict(list)
    for r in results:
        by_task[r["task"]].append(r)
    written = []
    for task, runs in by_task.items():
        fig, ax = plt.subplots(figsize=(6.4, 4.0))
        for r in runs:
            metric = r["main_metric"]
            splits = sorted({e["split"] for e in r.get("evals", [])})
            for split in splits:
                pts = [(e["step"], e["metrics"].get(metric)) for e in r["evals"] if e["split"] == split]
                pts = [(s, v) for s, v in pts if isinstance(v, (int, float))]
                if pts:
                    label = _label(r) + (f" ({split})" if len(splits) > 1 else "")
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(f"dev {runs[0]['main_metric']}")
        ax.set_title(f"{runs[0].get('task_display', task)}: dev {runs[0]['main_metric']} during training")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / f"{task}_metric_over_steps.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


def plot_metric_vs_params(results: Sequence[dict], out_dir: Path) -> Path:
    """One PNG: final main metric against trainable parameters (log scale), a panel per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r["task"] for r in results))
    cols = min(3, len(tasks))
    rows = (len(tasks) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    methods = sorted({_label(r) for r in results})
    markers = dict(zip(methods, "osD^v<>ph*"))
    for ax, task in zip(axes.flat, tasks):
        runs = [r for r in results if r["task"] == task]
        for r in runs:
            y = main_value(r)
            x = (r.get("params") or {}).get("trainable")
            if y is None or not x:
                continue
            ax.scatter([x], [y], marker=markers.get(_label(r), "o"), s=50, label=_label(r))
            ax.annotate(r.get("method"), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set_xscale("log")
        ax.set_title(runs[0].get("task_display", task))
        ax.set_xlabel("trainable parameters")
        ax.set_ylabel(f"dev {runs[0]['main_metric']}")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(tasks):]:
        ax.axis("off")
    handles, labels = [], []
    for ax in axes.flat:
        for h, l in zip(*ax.get_legend_handles_labels()):
            if l not in labels:
                handles.append(h)
                labels.append(l)
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=8)
    fig.tight_layout(rect=(0, 0.08 if handles else 0, 1, 1))
    path = out_dir / "metric_vs_params.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(paths: Sequence[str | Path], markdown: str | Path | None, plots: str | Path | None) -> str:
    """Load results, write the markdown table (if asked) and the plots (if asked); return the table."""
    results = load_results(paths)
    table = markdown_table(results)
    if markdown:
        Path(markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(markdown).write_text(table, encoding="utf-8")
    if plots:
        out = Path(plots)
        out.mkdir(parents=True, exist_ok=True)
        plot_metric_over_steps(results, out)
        plot_metric_vs_params(results, out)
    return table


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: ``python -m glue.report PATHS... [--markdown FILE] [--plots DIR]``."""
    parser = argparse.ArgumentParser(prog="python -m glue.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", help="results JSON files or folders holding them")
    parser.add_argument("--markdown", help="write the table to this file (it is always printed)")
    parser.add_argument("--plots", help="write the PNG plots into this folder")
    args = parser.parse_args(argv)
    try:
        table = write_report(args.paths, args.markdown, args.plots)
    except GlueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(table, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
