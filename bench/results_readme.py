"""The README's "Results" section, generated from the result files (never hand-edited numbers).

What it gathers, each with the command that regenerates it, the machine, the versions and the commit recorded in the
file itself:

* quality: ``bench/results/quality-minilm*.json`` (``bench/quality.py``): the GLUE tables on MiniLM and their PNGs;
* speed and memory: every ``bench/results/throughput-<device>.json`` (``bench/throughput.py``; ``-quick`` files are
  smoke runs and are left out), with the issue's targets and whether they are met;
* the sparse-delta layer: every ``bench/results/sparse_delta-*.json`` (the table ``bench/sparse_delta.py --print``
  prints);
* single GLUE runs: the headline figure of every ``bench/results/glue/*.json`` (``glue.run`` results files).

A file that is missing is named with the command that makes it; nothing is filled in.

Usage::

    python bench/results_readme.py                          # writes bench/results/RESULTS.md
    python bench/results_readme.py --update-readme README.md

``--update-readme`` puts the one summary table (per method: GLUE average, trainable parameters, step time x LoRA on
CPU and GPU, adapter bytes; one plot) between the lines ``<!-- results:begin -->`` and ``<!-- results:end -->`` of
the file (links relative to it), and everything else into ``docs/results.md`` beside it (``--docs``); it is an error
if the markers are missing, repeated or out of order.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
BEGIN = "<!-- results:begin -->"
END = "<!-- results:end -->"


class MarkerError(Exception):
    """The README lacks the results markers (or has them repeated or out of order)."""


def _bench_module(name: str):
    """``bench/<name>.py`` as a module (the bench scripts are not a package)."""
    path = ROOT / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _load(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _link(target: Path, relative_to: Path) -> str:
    return Path(os.path.relpath(target.resolve(), relative_to.resolve())).as_posix()


def _commit(sha: str | None, dirty: bool | None) -> str:
    return f"`{(sha or '?')[:10]}`" + (" (uncommitted changes)" if dirty else "")


# ---------------------------------------------------------------------------------------------------------- sections
def quality_section(results: Path, base: Path) -> list[str]:
    """One table per quality grid: ``quality-minilm.json`` (this machine's kind) and ``quality-minilm-<gpu>.json``
    (a grid run on a GPU, kept apart because its times and numerics are another machine's); GPU grids first."""
    lines = ["### Quality: GLUE on MiniLM", ""]
    paths = sorted(results.glob("quality-minilm*.json"), key=lambda p: (p.stem == "quality-minilm", p.stem))
    found = [(p, r) for p in paths if (r := _load(p)) and r.get("bench") == "quality"]
    if not found:
        path = results / "quality-minilm.json"
        return lines + [f"Not run yet: `GLUE_DIR=... python bench/quality.py` writes `{_link(path, base)}`.", ""]
    quality = _bench_module("quality")
    for path, report in found:
        counts = report.get("counts", {})
        devices = ", ".join((report.get("environment") or {}).get("devices") or []) or "no finished cell"
        lines += [
            f"#### {devices} (`{path.stem}`)",
            "",
            f"Command: `{report.get('command')}` (resumable; with `--report-only` it rebuilds the table and plot from "
            f"the finished cells). Cells: {counts.get('done', 0)} run, {counts.get('adopted', 0)} adopted from "
            f"earlier identical runs, {counts.get('missing', 0)} not run, {counts.get('failed', 0)} failed"
            + (f"; {counts['fill']} of them fills that ran on {', '.join(report['environment']['fill_devices'])} (marked "
               f"{quality.FILL_MARK})" if counts.get("fill") else "") + "; report "
            f"built at {_commit(report.get('report_commit'), None)} on {report.get('date')}.",
            "",
            quality.markdown(report),
            "",
        ]
        png = path.with_suffix(".png")
        if png.is_file():
            lines += [f"![average GLUE metric vs trainable parameters, {path.stem}]({_link(png, base)})", ""]
    return lines


def throughput_section(results: Path, base: Path) -> list[str]:
    lines = ["### Training speed and memory: roberta-base shape", ""]
    files = sorted(p for p in results.glob("throughput-*.json") if not p.stem.endswith("-quick"))
    found = [(p, d) for p in files if (d := _load(p)) and d.get("bench") == "throughput"]
    if not found:
        return lines + ["Not run yet: `OMP_NUM_THREADS=1 python bench/throughput.py --threads 1 --clock cpu` (CPU) or "
                        "`python bench/throughput.py` (GPU) writes `bench/results/throughput-<device>.json`.", ""]
    throughput = _bench_module("throughput")

    def nf4(data: dict) -> bool:
        return _run_base(data) == "nf4"

    def llama(data: dict) -> bool:
        return _run_model(data) == "llama"

    def subset(data: dict) -> list[str] | None:
        """The methods of a run that timed only some of those it could (a re-run), else None."""
        methods = (data.get("settings") or {}).get("methods") or []
        possible = set(throughput.NF4_METHODS) if nf4(data) else set(throughput.METHODS)
        return None if possible <= set(methods) else methods

    # per device, the full runs (roberta-base dense, its NF4 base, LLaMA), then re-runs of some methods
    found.sort(key=lambda f: (f[1]["device"]["type"] != "cpu", f[1]["device"]["name"], subset(f[1]) is not None,
                              llama(f[1]), nf4(f[1]), f[0].name))
    for path, data in found:
        dev, v = data["device"], data["versions"]
        machine = (f"{dev['name']}, {dev.get('cores')} cores, {dev.get('torch_threads')} torch threads"
                   if dev["type"] == "cpu" else f"{dev['name']} ({dev.get('memory_gib')} GiB), CUDA {dev.get('cuda')}")
        only = subset(data)
        lines += [
            f"#### {dev['type'].upper()}: {dev['name']}"
            + (" — LLaMA decoder, every linear adapted" if llama(data) else "")
            + (" — NF4 base (every encoder linear in bitsandbytes NF4; PEFT LoRA on it is QLoRA)" if nf4(data) else "")
            + (f" — methods {', '.join(only)} only" if only else ""),
            "",
            f"Command: `{data.get('command')}`; machine: {machine}; python {v.get('python')}, torch {v.get('torch')}, "
            f"transformers {v.get('transformers')}, peft {v.get('peft')}, triton {v.get('triton')}; commit "
            f"{_commit(data.get('commit'), data.get('dirty'))}; {data.get('date')}; file `{_link(path, base)}`"
            + ("" if data.get("complete") else " (INCOMPLETE: the run did not finish)") + ".",
            "",
            throughput.markdown(data),
            "",
        ]
    return lines


def sparse_delta_section(results: Path, base: Path) -> list[str]:
    lines = ["### The sparse-delta layer (one Linear)", ""]
    files = sorted(p for p in results.glob("sparse_delta-*.json") if not p.stem.endswith("-quick"))
    found = [(p, d) for p in files if (d := _load(p)) and d.get("bench") == "sparse_delta"]
    if not found:
        return lines + ["Not run yet: `python bench/sparse_delta.py` writes `bench/results/sparse_delta-<device>.json`.",
                        ""]
    sparse_delta = _bench_module("sparse_delta")
    for path, data in found:
        dev, v = data.get("device", {}), data.get("versions", {})
        command = str(data.get("command"))
        command = command if command.startswith("python") else f"python bench/{command}"  # the script's own name
        machine = (f"{dev.get('name')}, {dev.get('cores', '?')} cores, {dev.get('torch_threads', '?')} torch threads"
                   if dev.get("type") == "cpu" else f"{dev.get('name')} ({dev.get('type')})")
        lines += [
            f"Command: `{command}`; machine: {machine}; torch {v.get('torch')}, triton {v.get('triton')}, "
            f"peft {v.get('peft')}; commit {_commit(data.get('commit'), data.get('dirty'))}; {data.get('date')}; "
            f"file `{_link(path, base)}` (printed by "
            f"`python bench/sparse_delta.py --print {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}`)"
            + ("" if data.get("complete", True) else " (INCOMPLETE)") + ".",
            "",
        ]
        text = sparse_delta.markdown(data)
        table, sep, targets = text.partition("\n\n| target |")
        if sep:  # the targets in view, every shape's row folded
            lines += ["| target |" + targets, ""]
        lines += ["<details><summary>every shape and variant</summary>", "", table, "", "</details>", ""]
    return lines


def glue_section(results: Path, base: Path) -> list[str]:
    """The headline figure of each single GLUE run (final dev main metric, parameters, bytes, time)."""
    from glue.report import load_results, main_value

    folder = results / "glue"
    lines = ["### Single GLUE runs", ""]
    try:
        runs = load_results([folder]) if folder.is_dir() else []
    except Exception:  # no results files there
        runs = []
    if not runs:
        return lines + [f"None yet: `python -m glue.run RECIPE results_path={_link(folder, ROOT)}/NAME.json`.", ""]
    lines += [
        "Each a `python -m glue.run` of the recipe named in its config (`python -m glue.report "
        f"{_link(folder, ROOT)}` for every metric); the final dev main metric, not the best evaluation.",
        "",
        "| task | model | method | final main metric | trainable params | adapter bytes | train s | device | commit | "
        "file |",
        "|:---|:---|:---|---:|---:|---:|---:|:---|:---|:---|",
    ]
    for r in runs:
        value = main_value(r)
        params = (r.get("params") or {}).get("trainable")
        nbytes = (r.get("adapter") or {}).get("weights_bytes")
        wall = (r.get("train") or {}).get("wall_s")
        git = r.get("git") or {}
        lines.append(
            f"| {r.get('task_display', r.get('task'))} | {r.get('model')} | {r.get('method')} | "
            f"{r.get('main_metric')} {'–' if value is None else f'{value:.4f}'} | "
            f"{'–' if params is None else f'{params:,}'} | {'–' if nbytes is None else f'{nbytes:,}'} | "
            f"{'–' if wall is None else f'{wall:.0f}'} | {r.get('device', '?')} | "
            f"{_commit(git.get('commit'), git.get('dirty'))} | `{_link(Path(r['_file']), base)}` |"
        )
    return lines + [""]


TASK_ORDER = ("sst2", "rte", "mrpc", "cola", "stsb")
#: SoRA recipe variants whose seed-0 kept-rank plots the README shows: the grid's recipe and the official ratio.
KEPT_RANK_PLOT_VARIANTS = ("sora", "sora-lambda0.375")
METHOD_ORDER = ("lora", "sltrain", "sora", "dylora", "nola", "sparse_randlora", "randlora")
_SEED = re.compile(r"-seed(\d+)$")
#: Recipe variants that adapt every encoder linear (LQ-LoRA's setting) end so: ``sltrain-plan2.75-lq-all``.
ALL_LINEAR_SUFFIX = "-all"


def _parse_stem(path: Path, record: dict) -> tuple[str, str, int]:
    """``minilm-<variant>-<task>[-<budget>][-seed<k>][-h100].json`` -> (variant, column, seed).

    The column is the task, or ``<task>-<budget>`` for a recipe at another budget (``rte-6ep``); the seed is the
    config's (``-seed<k>`` names the runs made with ``seed=k``). Older names (``<method>-minilm-<task>``) give the
    method as the variant."""
    stem = path.stem.removesuffix("-h100")
    seed = int((record.get("config") or {}).get("seed", 0) or 0)
    stem = _SEED.sub("", stem)
    task = str(record.get("task"))
    if stem.startswith("minilm-"):
        body = stem[len("minilm-"):]
        if body.endswith("-" + task):
            return body[:-len(task) - 1], task, seed
        head, sep, budget = body.rpartition("-" + task + "-")
        if sep and head and budget:
            return head, f"{task}-{budget}", seed
    return str(record.get("method")), task, seed


def _column_order(column: str) -> tuple[int, str]:
    task = column.split("-")[0]
    return (TASK_ORDER.index(task) if task in TASK_ORDER else 99, column)


def _cell(record: dict) -> str:
    from glue.report import main_value

    value = main_value(record)
    text = "–" if value is None else f"{value:.4f}"
    extra = record.get("method_results") or {}
    if "kept_total" in extra:
        text += f" ({extra['kept_total']}/{extra['max_total']} ranks kept)"
    squeeze = extra.get("squeeze") or {}
    after = (squeeze.get("after_cont") or squeeze.get("after") or {}).get("validation", {})
    if after.get(record.get("main_metric")) is not None:
        text += f" → {squeeze.get('mode')}-squeezed to r={squeeze.get('target')}: {after[record.get('main_metric')]:.4f}"
    if "rank_evals" in extra:
        ranks = [f"{b}: {v:.4f}" for b, v in _rank_values(record).items()]
        text += " (b " + ", ".join(ranks) + ")"
    return text


def _rank_values(record: dict) -> dict[int, float]:
    """DyLoRA's ``rank_evals``: rank b -> main metric at b."""
    metric = record.get("main_metric")
    evals = (record.get("method_results") or {}).get("rank_evals") or {}
    return {int(b): m.get(metric, m.get("validation_" + str(metric), float("nan")))
            for b, m in sorted(evals.items(), key=lambda kv: int(kv[0]))}


def _mean_std(values: list[float]) -> str:
    import statistics

    return f"{statistics.fmean(values):.4f} ± {statistics.stdev(values):.4f}"


def _seeds_cell(by_seed: dict[int, dict]) -> str:
    """One seed: :func:`_cell`. Several: mean ± sample std of the final metric, then each seed's (SoRA's kept ranks,
    DyLoRA's mean per rank b)."""
    from glue.report import main_value

    if len(by_seed) == 1:
        return _cell(next(iter(by_seed.values())))
    seeds = sorted(by_seed)
    values = [main_value(by_seed[s]) for s in seeds]
    if any(v is None for v in values):
        return "; ".join(f"seed {s}: {_cell(by_seed[s])}" for s in seeds)
    text = f"{_mean_std(values)} ({len(seeds)} seeds: " + " / ".join(f"{v:.4f}" for v in values) + ")"
    kept = [(by_seed[s].get("method_results") or {}) for s in seeds]
    if all("kept_total" in k for k in kept):
        text += f"; ranks kept {' / '.join(str(k['kept_total']) for k in kept)} of {kept[0]['max_total']}"
    ranks = [_rank_values(by_seed[s]) for s in seeds]
    if all(ranks) and all(r.keys() == ranks[0].keys() for r in ranks):
        text += "; mean at b " + ", ".join(f"{b}: {sum(r[b] for r in ranks) / len(ranks):.4f}" for b in ranks[0])
    return text


def minilm_section(results: Path, base: Path) -> list[str]:
    """Method x task tables of the MiniLM recipe runs (``bench/results/glue/minilm-*.json``), one per device; the
    runs of a recipe with several seeds (``...-seed<k>.json``) share a cell as mean ± std."""
    folder = results / "glue"
    lines = ["### GLUE on MiniLM: each tuner against PEFT LoRA r=8 at the same recipe budget", ""]
    records: dict[str, dict[tuple[str, str], dict[int, dict]]] = {}
    for path in sorted(folder.glob("minilm-*.json")):
        record = _load(path)
        if not record or record.get("model") != "minilm":
            continue
        device = "H100" if path.stem.endswith("-h100") else "CPU"
        variant, column, seed = _parse_stem(path, record)
        records.setdefault(device, {}).setdefault((variant, column), {})[seed] = record
    if not records:
        return lines + ["None yet: run `recipes/minilm/<method>-<task>.yaml` with "
                        "`results_path=bench/results/glue/minilm-<method>-<task>.json`.", ""]
    lines += [
        "Dev-set figure at the end of training (accuracy; MCC for CoLA; Pearson for STS-B) of `python -m glue.run "
        "recipes/minilm/<variant>-<task>.yaml` (results_path `bench/results/glue/minilm-<variant>-<task>.json`; "
        "with `seed=k`, `...-seed<k>.json`; several seeds are shown as mean ± sample std, then each seed's figure). "
        "Budgets are those of `recipes/minilm/lora-<task>.yaml` (2 epochs; SST-2: 4,000 training sentences). At this "
        "budget RTE stays near chance level (majority class 0.527) for every method, so its column says little: "
        "the same LoRA recipe and seed scored 3 points apart on the CPU and on the H100. Three times the epochs at "
        "lr 1e-3 did not help: `recipes/minilm/lora-rte-6ep.yaml`, stopped at 2.5 epochs, fits the training pairs "
        "(train loss 0.695 -> 0.647) while dev loss rises (0.698 -> 0.739) and dev accuracy stays at 0.51-0.57. Ten "
        "times the epochs at lr 5e-4 lift every method above the majority class, full fine-tuning most (the "
        "`rte-20ep` column, one seed on the H100; each recipe's header has its dev accuracy after every epoch)."
        + ("".join(f" The `{c}` column is `recipes/minilm/<variant>-{c}.yaml`: the {c.split('-')[0].upper()} recipe "
                   f"at {c.split('-', 1)[1].replace('ep', ' epochs')}."
                   for c in sorted({c for cells in records.values() for _, c in cells if "-" in c}))),
        "",
    ]
    for device, cells in records.items():
        variants = sorted({v for v, _ in cells}, key=lambda v: (METHOD_ORDER.index(v.split("-")[0])
                                                                 if v.split("-")[0] in METHOD_ORDER else 99, v))
        columns = sorted({c for _, c in cells}, key=_column_order)
        sample = next(iter(next(iter(cells.values())).values()))
        lines += [f"**{device}** ({sample.get('device')}; torch {sample.get('versions', {}).get('torch')}, peft "
                  f"{sample.get('versions', {}).get('peft')}):", ""]
        lines += ["| recipe variant | " + " | ".join(columns) + " |", "|:---|" + "---:|" * len(columns)]
        for v in variants:
            row = [_seeds_cell(cells[(v, c)]) if (v, c) in cells else "not run" for c in columns]
            lines.append(f"| {v} | " + " | ".join(row) + " |")
        lines.append("")
        timed = [(v, by_seed[min(by_seed)]) for (v, c), by_seed in sorted(cells.items()) if c == "sst2"]
        if timed:
            lines += ["Wall time of the SST-2 commands (seed 0; training and evaluations, from `wall_time_s`; CPU "
                      "runs list their torch threads and the 1-minute load average at the start, since runs shared "
                      "the machine): " + "; ".join(
                          f"{v} {rec.get('wall_time_s', float('nan')):.0f} s"
                          + (f" ({rec.get('config', {}).get('num_threads')} threads, load "
                             f"{(rec.get('load_average') or {}).get('start', float('nan')):.1f})"
                             if device == "CPU" else "")
                          for v, rec in timed) + ".", ""]
    # seed-0 plots of the SoRA recipes the rank-adaptive issue rests on (the NF4 variants', the lambda sweep's and other
    # seeds' plots lie beside their results files too)
    for png in sorted(folder.glob("minilm-sora-*-kept_ranks.png")):
        name = png.stem.removesuffix("-kept_ranks").removesuffix("-h100")
        parts = name.split("-")[1:]  # minilm-<variant>-<task>[-20ep][-seedK]
        at = next((i for i, part in enumerate(parts) if part in TASK_ORDER), None)
        if at is not None and "-".join(parts[:at]) in KEPT_RANK_PLOT_VARIANTS and not _SEED.search(name):
            lines += [f"SoRA's kept ranks per layer, `{png.stem.removesuffix('-kept_ranks')}`:", "",
                      f"![SoRA kept ranks]({_link(png, base)})", ""]
    return lines


def sora_gates_section(results: Path, base: Path) -> list[str]:
    """Initial vs final SoRA gates of the recipe runs (``bench/sora_gates.py``)."""
    path = results / "sora-gates-minilm.json"
    data = _load(path)
    if not data:
        return []
    lines = [
        "### SoRA: which gates close",
        "",
        f"`{data.get('command')}` (file `{_link(path, base)}`): the run's initial gates (rebuilt from its recipe and "
        "seed) against its final, unpruned ones. The total shrinkage is `sparse_lambda × Σ lr` over the run; a gate "
        "closes when its magnitude does not outgrow it.",
        "",
        "The push of an open gate is how much further out it ended than the shrinkage alone would have left it "
        "(`|final| − (|initial| − shrinkage)`): what the gradient did. Adam moves a parameter by at most about its lr "
        "per step, so the push cannot much exceed `Σ lr`; when the shrinkage is larger than the pushes, the gates that "
        "close are the ones that started small.",
        "",
        "| recipe | seed | steps | Σ lr | total shrinkage | closed | started below the shrinkage | closed, started "
        "below | closed, started above | grew | push of open gates: mean / max |",
        "|:---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def num(value, fmt=".3f"):
        return "–" if value is None else format(value, fmt)

    for r in data.get("runs") or []:
        lines.append(f"| `{r['recipe']}` | {r['seed']} | {r['steps']} | {num(r.get('lr_sum'))} | "
                     f"{r['total_shrinkage']:.3f} | {r['closed']}/{r['gates']} | {r['started_below_shrinkage']} | "
                     f"{r['closed_and_started_below']} | {r['closed_but_started_above']} | {num(r.get('grew'), 'd')} | "
                     f"{num(r.get('mean_push_open'))} / {num(r.get('max_push_open'))} |")
    return lines + [""]


def _one_file_section(results: Path, name: str, title: str, script: str) -> tuple[dict | None, Path, list[str]]:
    """A section made from the one result file ``name``: its data (None if missing), its path, and the section's
    first lines (saying which command writes the file when it is missing)."""
    path = results / name
    data = _load(path)
    lines = [f"### {title}", ""]
    if not data:
        lines += [f"Not run yet: `python bench/{script}` writes `bench/results/{name}`.", ""]
    return data, path, lines


def quant_section(results: Path, base: Path) -> list[str]:
    """LQ-LoRA reconstruction error per layer type and model bytes (``bench/quant.py``)."""
    data, path, lines = _one_file_section(results, "quant-minilm.json",
                                          "4-bit bases: LQ-LoRA reconstruction on MiniLM", "quant.py")
    if not data:
        return lines
    lines += [
        f"`python bench/quant.py` (rank {data.get('rank')}, {str(data.get('quant_type')).upper()}, at most "
        f"{data.get('max_iter')} alternations; commit {_commit(data.get('commit'), None)}, torch {data.get('torch')}, "
        f"bitsandbytes {data.get('bitsandbytes')}; file `{_link(path, base)}`): relative error "
        "‖W − (Q + L)‖_F / ‖W‖_F, mean over the layers of each type.",
        "",
        "| layer type | layers | 4-bit alone | LoftQ (1 pass) | LQ-LoRA |",
        "|:---|---:|---:|---:|---:|",
    ]
    for kind, row in (data.get("by_type") or {}).items():
        lines.append(f"| {kind} | {row.get('layers')} | {row.get('quant_only'):.4f} | {row.get('loftq'):.4f} | "
                     f"{row.get('lq'):.4f} |")
    sizes = data.get("model_bytes") or {}
    if sizes:
        lines += ["", "Model bytes (base + adapter, r=16 on query/value): " + ", ".join(
            f"{k} {v / 2**20:.1f} MiB" for k, v in sizes.items()) + "."]
    return lines + [""]


def lq_svd_section(results: Path, base: Path) -> list[str]:
    """LQ decomposition time and error with the exact and the randomized SVD (``bench/lq_svd.py``)."""
    data, path, lines = _one_file_section(results, "lq-svd-cpu.json", "LQ-LoRA decomposition: exact vs randomized SVD",
                                          "lq_svd.py")
    if not data:
        return lines
    dev = data.get("device") or {}
    lines += [
        f"`{data.get('command')}` ({str(data.get('quant_type')).upper()}, {data.get('max_iter')} alternations, "
        f"{dev.get('name')} with {data.get('threads')} threads; commit {_commit(data.get('commit'), data.get('dirty'))};"
        f" file `{_link(path, base)}`): seconds for one matrix's whole decomposition and its relative error "
        "‖W − Q − L‖_F / ‖W‖_F. `lq_svd=\"auto\"` takes the exact SVD up to 512 on the smaller side.",
        "",
        "| matrix | shape | rank | exact: s | randomized: s | speed-up | exact: error | randomized: error |",
        "|:---|:---|---:|---:|---:|---:|---:|---:|",
    ]
    rows = data.get("rows") or []
    keys = list(dict.fromkeys((r["matrix"], tuple(r["shape"]), r["rank"]) for r in rows))
    for matrix, shape, rank in keys:
        by = {r["svd"]: r for r in rows if (r["matrix"], tuple(r["shape"]), r["rank"]) == (matrix, shape, rank)}
        exact, fast = by.get("exact"), by.get("randomized")
        speedup = f"{exact['seconds'] / fast['seconds']:.1f}×" if exact and fast else "–"
        cells = [f"{r[key]:{spec}}" if r else "–" for key, spec in (("seconds", ".2f"), ("error", ".5f"))
                 for r in (exact, fast)]
        lines.append(f"| {matrix} | {shape[0]}×{shape[1]} | {rank} | {cells[0]} | {cells[1]} | {speedup} | "
                     f"{cells[2]} | {cells[3]} |")
    return lines + [""]


def index_memory_section(results: Path, base: Path) -> list[str]:
    """Index bytes a sparse term keeps per entry, now and before (``bench/index_memory.py``)."""
    data, path, lines = _one_file_section(results, "index-memory-cpu.json",
                                          "Index arrays a sparse term keeps, per entry", "index_memory.py")
    if not data:
        return lines
    befores = sorted(results.glob("index-memory-cpu-before-*.json"))
    before = _load(befores[-1]) if befores else None
    lines += [
        f"`{data.get('command')}` (SLTrain r 8, density 0.01, every linear of the LLaMA decoder of "
        f"`bench/decode.py`, CPU; commit {_commit(data.get('commit'), data.get('dirty'))}; file `{_link(path, base)}`):"
        " bytes of the integer arrays the supports keep cached after each case, over the sparse entries (the saved "
        f"int32 indices, 8 bytes per entry, and the values, {(data.get('rows') or [{}])[0].get('values_bytes_per_entry')}"
        ", not counted)"
        + (f"; before: the same script on the code of commit {_commit(before.get('code'), None)}." if before else "."),
        "",
        "| after | bytes per entry | " + ("before | " if before else "") + "cached |",
        "|:---|---:|" + ("---:|" if before else "") + "---:|",
    ]
    old = {r["case"]: r for r in (before or {}).get("rows", [])}
    for r in data.get("rows") or []:
        prior = f"{old[r['case']]['bytes_per_entry']:.1f} | " if r["case"] in old else ("– | " if before else "")
        lines.append(f"| {r['case']} | {r['bytes_per_entry']:.1f} | {prior}{r['index_bytes'] / 2**20:.1f} MiB |")
    return lines + [""]


def compile_section(results: Path, base: Path) -> list[str]:
    """``torch.compile`` per tuner: graphs, breaks, agreement with eager (``bench/compile.py``), and the same
    measurement of an earlier commit where a ``compile-cpu-before-<sha>.json`` file is kept."""
    data, path, lines = _one_file_section(results, "compile-cpu.json", "torch.compile: graphs and agreement with eager",
                                          "compile.py")
    if not data:
        return lines
    before = {}
    for old in sorted(results.glob("compile-cpu-before-*.json")):
        for r in (_load(old) or {}).get("rows", []):
            before[(r["family"], r["tuner"])] = (r, old)
    dev = data.get("device") or {}
    timed = all("compiled_step_ms" in r for r in data.get("rows") or [])
    lines += [
        f"`python bench/compile.py` (backend {data.get('backend')}, {dev.get('name')} with {data.get('threads')} "
        f"threads; commit {_commit(data.get('git_commit'), data.get('git_dirty'))}; file `{_link(path, base)}`): one "
        "forward and backward of a tiny model (BERT: query/value adapted; LLaMA: every linear), compiled against "
        "eager. SLTrain's sparse term is traced as custom ops (`delta.custom_ops`); a layer that cannot be traced "
        "(sparse RandLoRA's factored term, a sparse term on a 4-bit base) runs eagerly between the compiled parts "
        "(`DeltaLayer._eager_forward`)."
        + (" Steady steps: the median of the file's `steps` forward + backward steps after the first, eager and "
           "compiled interleaved." if timed else "")
        + (" *Before*: the script on the commit named in its file (the source before that change; a file marked "
           "dirty ran today's script on that source)." if before else ""),
        "",
        "| model | tuner | graphs | graph breaks | break reasons | first compiled step | max output diff | "
        "max gradient diff (max gradient) |" + (" step eager / compiled |" if timed else "")
        + " before: graphs, first step, compiled step |",
        "|:---|:---|---:|---:|:---|---:|---:|---:|" + ("---:|" if timed else "") + ":---|",
    ]
    for r in data.get("rows") or []:
        old = before.get((r["family"], r["tuner"]))
        then = "–"
        if old:
            then_step = f", {old[0]['compiled_step_ms']:.1f} ms" if "compiled_step_ms" in old[0] else ""
            then = f"{old[0]['graphs']}, {old[0]['first_compiled_step_s']:.1f} s{then_step} (`{old[1].name}`)"
        reasons = "; ".join(r["break_reasons"]) or "–"
        steps = f" {r['eager_step_ms']:.1f} / {r['compiled_step_ms']:.1f} ms |" if timed else ""
        lines.append(f"| {r['family']} | {r['tuner']} | {r['graphs']} | {r['graph_breaks']} | {reasons} | "
                     f"{r['first_compiled_step_s']:.1f} s | {r['max_abs_output_diff']:.1e} | "
                     f"{r['max_abs_grad_diff']:.1e} ({r['max_abs_grad']:.1e}) |{steps} {then} |")
    return lines + [""]


def decode_section(results: Path, base: Path) -> list[str]:
    """Decoding with the adapter unmerged, per method (``bench/decode.py``), and the same measurement of an earlier
    commit where a ``decode-<device>-before-<sha>.json`` file is kept; the LLM-sized decoder first, then ``--size
    tiny`` (the per-call overhead)."""
    lines = ["### Decoding with the adapter unmerged: LLaMA decoder", ""]
    files = [p for p in sorted(results.glob("decode-*.json")) if not p.stem.endswith("-quick")]
    found = [(p, d) for p in files if (d := _load(p)) and d.get("bench") == "decode"]
    if not found:
        return lines + ["Not run yet: `OMP_NUM_THREADS=1 python bench/decode.py --threads 1 --clock cpu` writes "
                        "`bench/results/decode-<device>.json`.", ""]
    decode = _bench_module("decode")
    for path, data in sorted(found, key=lambda f: ("-tiny" in f[0].stem, "-before-" in f[0].stem, f[0].name)):
        before = "-before-" in path.stem
        lines += [
            (f"Before (`{path.name}`, the same script on the code of commit {_commit(data.get('commit'), None)}):"
             if before else f"`{data.get('command')}`; {data.get('date')}; file `{_link(path, base)}`."),
            "",
            decode.markdown(data),
            "",
        ]
    return lines


def _bitbudget_table(data: dict, path: Path, base: Path) -> list[str]:
    """One bench/bitbudget.py result: per budget the plan against the best uniform configuration within its bits,
    by the objective and by the measured change of the output."""
    output = data.get("objective") == "output"
    lq = data.get("lq_targets")
    what = ("relative change of the output, one layer at a time, summed (the objective)" if output
            else "relative weight error ‖W − Q − L‖_F / ‖W‖_F over all layers (the objective)")
    lines = [
        f"`{data.get('command')}` ({data.get('objective', 'weight')} objective, LQ at rank {data.get('rank')} on "
        f"{'every linear' if not lq else f'{len(lq)} of the linears (query, value)'}, "
        f"{len(data['table']['numel'])} encoder linears, commit {_commit(data.get('commit'), data.get('dirty'))}; "
        f"file `{_link(path, base)}`, plot `{_link(path.with_suffix('.png'), base)}`). Error: {what}; output "
        f"change: ‖H_plan − H‖ / ‖H‖ of the last hidden state with every layer quantized at once, measured on "
        f"{data.get('calibration_sentences', '?')} SST-2 training sentences"
        + (f" (added by `{data['resolved_by']}`)" if data.get("resolved_by") else "") + ".",
        "",
        "| budget | plan bits | plan error | plan output change | best uniform within those bits | its error | "
        "its output change | configurations picked |",
        "|---:|---:|---:|---:|:---|---:|---:|:---|",
    ]
    uniform = {u["choice"]: u for u in data["curve"]["uniform"]}
    for row in data["curve"]["plans"]:
        if "error" not in row:
            lines.append(f"| {row['budget']} | infeasible | | | | | | |")
            continue
        best = row.get("best_uniform_within_bits") or {}
        best_change = uniform.get(best.get("choice"), {}).get("output_change")
        picked = ", ".join(f"{k} ×{v}" for k, v in sorted(row["choices"].items(), key=lambda kv: -kv[1]))
        lines.append(f"| {row['budget']} | {row['bits_per_param']:.3f} | {row['relative_error']:.4f} | "
                     f"{_num(row.get('output_change'))} | {best.get('choice', '–')} "
                     f"({best.get('bits_per_param', 0):.2f} bits) | {best.get('relative_error', float('nan')):.4f} | "
                     f"{_num(best_change)} | {picked} |")
    if any("output_change" in u for u in uniform.values()):
        lines += ["", "Uniform configurations, measured output change: " + ", ".join(
            f"{c} ({u['bits_per_param']:.2f} bits) {_num(u.get('output_change'))}" for c, u in
            sorted(uniform.items(), key=lambda kv: kv[1]["bits_per_param"])) + "."]
    sizes = data.get("model_bytes") or {}
    if sizes:
        lines += ["", "MiniLM base bytes as stored (encoder linears quantized; embeddings stay fp32): " + ", ".join(
            f"{k} {v / 2**20:.1f} MiB" for k, v in sizes.items()) + "."]
    return lines + [""]


def _num(value) -> str:
    return "–" if value is None else f"{value:.4f}"


def _base_plan(record: dict, layers) -> dict[str, str] | None:
    """The quantization configuration of each encoder linear a GLUE run's base held: its LQ-LoRA plan, NF4 with
    double quantization (``quantize: nf4``, how glue/model.py quantizes) on every one, or ``{}`` in full precision;
    None for a base this table cannot name."""
    quantization = (record.get("method_results") or {}).get("quantization") or {}
    plan = quantization.get("plan") or (record.get("peft_config") or {}).get("lq_plan")
    if isinstance(plan, dict) and plan:
        return plan
    config = record.get("config") or {}
    quantize, spec = config.get("quantize"), config.get("quantize_plan") or {}
    if quantize == "nf4":
        return {layer: "bnb-nf4-dq" for layer in layers}
    if quantize == "plan" and "uniform" in spec:
        return {layer: spec["uniform"] for layer in layers}
    if quantize == "plan" and spec.get("table") and spec.get("budget_bits") and (ROOT / spec["table"]).is_file():
        # runs before the harness recorded its plan: the same deterministic solve of the committed table
        bb = _bench_module("bitbudget").bb
        return bb.solve(bb.PlanTable.from_dict(_load(ROOT / spec["table"])["table"]), float(spec["budget_bits"]))
    return {} if quantize in (None, "none") else None


def quantized_sst2_table(results: Path, base: Path) -> list[str]:
    """SST-2 (MiniLM, the recipe budget) by base, for each method with an NF4-LQ run: its full-precision recipe and
    every quantized-base variant, with the adapted linears (query/value, or every encoder linear for the ``-all``
    recipes), the base's stored bits per encoder-linear parameter and bytes (``bench/bitbudget.py: base_bytes``
    from the committed measurement ``bitbudget-minilm-qv.json``), the adapter file's bytes, the dev accuracy over
    seeds and its distance to the same method on the NF4-LQ base with the same adapted linears."""
    from glue.report import main_value

    measured = _load(results / "bitbudget-minilm-qv.json")
    if not measured:
        return []
    bitbudget = _bench_module("bitbudget")
    table = bitbudget.bb.PlanTable.from_dict(measured["table"])
    full, numel = measured["model_bytes"]["fp32"], sum(table.numel.values())
    rows = []
    for variant, by_seed in _sst2_runs(results).items():
        record = next(iter(by_seed.values()))
        method, plan = record.get("method"), _base_plan(record, table.numel)
        if plan is None or (not plan and variant != method):  # one full-precision row per method: its own recipe
            continue
        bits = sum(table.bits[bitbudget.table_layer(table, n)][c] for n, c in plan.items()) / numel if plan else 32.0
        values = [main_value(r) for r in by_seed.values()]
        targets = "all" if variant.endswith(ALL_LINEAR_SUFFIX) else "query, value"
        rows.append((method, targets, bits, variant, bitbudget.base_bytes(table, full, plan),
                     (record.get("adapter") or {}).get("weights_bytes"), sum(values) / len(values),
                     _seeds_cell(by_seed)))
    reference = {(m, t): mean for m, t, _, variant, _, _, mean, _ in rows
                 if variant == f"{m}-nf4-lq" + (ALL_LINEAR_SUFFIX if t == "all" else "")}
    lines = [
        "SST-2 by base (MiniLM, `recipes/minilm/<variant>-sst2.yaml`; adapted linears: query/value, or every encoder "
        "linear for the `-all` recipes, as LQ-LoRA adapts every matrix it quantizes; bits per encoder-linear "
        "parameter and base bytes as the libraries store them, from `bitbudget-minilm-qv.json`; embeddings, norms "
        "and biases stay fp32 in every base; adapter: the saved adapter file with the trained pooler and classifier "
        "(0.6 MiB of it); the last column against the same method on its NF4-LQ base with the same adapted "
        "linears):", "",
        "| base (recipe variant) | adapted linears | bits / linear param | base MiB | adapter MiB | SST-2 accuracy "
        "| vs NF4-LQ (points) |",
        "|:---|:---|---:|---:|---:|:---|---:|"]
    for method, targets, bits, variant, nbytes, adapter, mean, cell in sorted(
            rows, key=lambda r: (r[0] != "sltrain", r[0], r[1] == "all", -r[2], r[3])):
        if (method, targets) in reference:
            adapter_mib = "–" if adapter is None else f"{adapter / 2**20:.1f}"
            lines.append(f"| {variant} | {targets} | {bits:.2f} | {nbytes / 2**20:.1f} | {adapter_mib} | {cell} | "
                         f"{100 * (mean - reference[method, targets]):+.2f} |")
    return lines + [""]


def _sst2_runs(results: Path) -> dict[str, dict[int, dict]]:
    """The CPU MiniLM SST-2 results files by recipe variant, then seed."""
    by_variant: dict[str, dict[int, dict]] = {}
    for path in sorted((results / "glue").glob("minilm-*-sst2*.json")):
        record = _load(path)
        if record and not path.stem.endswith("-h100"):
            variant, column, seed = _parse_stem(path, record)
            if column == "sst2":
                by_variant.setdefault(variant, {})[seed] = record
    return by_variant


def bitbudget_section(results: Path, base: Path) -> list[str]:
    """LQ-LoRA bit budgets on MiniLM (``bench/bitbudget.py``: the weight objective with L on every linear or on
    query/value, the output objective) and NOLA's quantized coefficients (``bench/nola_quant.py``)."""
    lines = ["### Bit budgets: mixed quantization plans and quantized NOLA coefficients", ""]
    for name in ("bitbudget-minilm.json", "bitbudget-minilm-qv.json", "bitbudget-minilm-qv-output.json"):
        data = _load(results / name)
        if data:
            lines += _bitbudget_table(data, results / name, base)
    lines += quantized_sst2_table(results, base)
    nola = _load(results / "nola-quant-minilm.json")
    if nola:
        scores = nola["scores"]
        sizes = nola["default_sizes_no_head"]
        lines += [
            f"NOLA coefficients stored in 8 / 4 bits (`{nola.get('command')}`): SST-2 dev accuracy of one trained "
            "adapter (recipe nola-sst2) " + ", ".join(
                f"{k} {v['metrics']['validation']['accuracy']:.4f}" for k, v in scores.items())
            + "; adapter file at the defaults (256 + 256 bases, query/value, no head): " + ", ".join(
                f"{k} {v:,} B" for k, v in sizes.items()) + ".", ""]
    lines += lq_export_table(results, base)
    return lines if len(lines) > 2 else lines + ["Not run yet: `python bench/bitbudget.py`.", ""]


def lq_export_table(results: Path, base: Path) -> list[str]:
    """LQ adapters exported to plain LoRA and loaded onto the full-precision model, against the trained model on its
    quantized base (``bench/eval_adapter.py --reference``; docs/quantized.md has the export commands)."""
    path = results / "lq-export-minilm.json"
    data = _load(path)
    if not data:
        return []
    lines = [f"LQ adapters exported as plain LoRA and loaded onto the full-precision model, against the trained model "
             f"on its quantized base (file `{_link(path, base)}`; docs/quantized.md has the commands):", "",
             "| task | adapter | same predictions | relative logit error | dev metric |", "|:---|:---|---:|---:|---:|"]
    for task, label, entry, score in _adapter_scores(data):
        against = next(iter((entry.get("vs_reference") or {}).values()), None)
        same, error = (("reference", "–") if against is None else
                       (f"{against['same_prediction']:.4f}", f"{against['logit_rel_error']:.3f}"))
        lines.append(f"| {task} | {label} | {same} | {error} | {score} |")
    return lines + [""]


def _adapter_scores(data: dict):
    """``(task, label, entry, dev score as text)`` of every adapter in a ``bench/eval_adapter.py --json`` file."""
    for task, entries in data.items():
        if task.startswith("_") or not isinstance(entries, dict):
            continue
        metric = (data.get("_meta", {}).get(task) or {}).get("main_metric", "accuracy")
        for label, entry in entries.items():
            score = ((entry.get("scores") or {}).get("validation") or {}).get(metric)
            yield task, label, entry, "–" if score is None else f"{score:.4f}"


def squeeze_section(results: Path, base: Path) -> list[str]:
    """LoRA-Squeeze speed/memory (``bench/squeeze.py``) and the Post-Squeeze quality check (``bench/eval_adapter.py``)."""
    lines = ["### LoRA-Squeeze", ""]
    table = results / "squeeze-cpu.md"
    if table.is_file():
        lines += [f"`python bench/squeeze.py --layers 4 --threads 1` (file `{_link(results / 'squeeze-cpu.json', base)}`):",
                  "", table.read_text(encoding="utf-8").strip(), ""]
    quality = _load(results / "squeeze-quality-minilm.json")
    if quality:
        lines += ["Post-Squeeze quality (`bench/eval_adapter.py`, see docs/squeeze.md for the commands):", "",
                  "| task | adapter | rank | dev metric | folder |", "|:---|:---|---:|---:|:---|"]
        for task, label, entry, score in _adapter_scores(quality):
            lines.append(f"| {task} | {label} | {entry.get('r')} | {score} | `{entry.get('folder')}` |")
        lines.append("")
    return lines if len(lines) > 2 else lines + ["Not run yet: `python bench/squeeze.py`.", ""]


#: the summary's rows: (label, quality-grid method, throughput method, throughput base); the NF4 row's step time
#: comes from ``bench/throughput.py --base nf4``, a ratio to PEFT's LoRA on the same 4-bit base (QLoRA)
SUMMARY_ROWS = [
    ("full fine-tuning", "full", "full", "dense"), ("PEFT LoRA r=8", "lora", "lora", "dense"),
    ("PEFT RandLoRA", "randlora", "randlora", "dense"), ("PEFT AdaLoRA", "adalora", "adalora", "dense"),
    ("SLTrain", "sltrain", "sltrain", "dense"), ("SoRA", "sora", "sora", "dense"), ("DyLoRA", "dylora", "dylora", "dense"),
    ("NOLA", "nola", "nola", "dense"), ("sparse RandLoRA", "sparse_randlora", "sparse_randlora_0.1", "dense"),
    ("SLTrain, NF4 base", "sltrain_nf4", "sltrain", "nf4"),
]


def _run_base(data: dict) -> str:
    """A throughput run's frozen base: ``dense`` (files before ``--base`` existed too) or ``nf4``."""
    return (data.get("settings") or {}).get("base", "dense")


def _run_model(data: dict) -> str:
    """A throughput run's model: ``roberta-base`` (files before ``--model`` existed too) or ``llama``."""
    return (data.get("settings") or {}).get("model_name", "roberta-base")


def _throughput_runs(results: Path):
    """The full throughput runs (no quick or recheck files), in file-name order."""
    for path in sorted(results.glob("throughput-*.json")):
        data = _load(path)
        if data and data.get("bench") == "throughput" and not path.stem.endswith(("-quick", "-recheck")):
            yield path, data


def _summary_runs(results: Path):
    """The throughput runs the summary reads: roberta-base (query/value adapters), on either base."""
    for path, data in _throughput_runs(results):
        if _run_model(data) == "roberta-base":
            yield path, data


def _throughput_ratio(results: Path, kind: str, method: str | None, base: str = "dense") -> str:
    """Step time x PEFT LoRA (paired) of ``method`` in the full throughput run on ``kind`` (cpu / cuda) and ``base``
    (dense frozen weights, or ``nf4``: QLoRA's base)."""
    if method is None:
        return "–"
    for _, data in _summary_runs(results):
        if data["device"]["type"] != kind or _run_base(data) != base:
            continue
        row = (data.get("results") or {}).get(method)
        if row and row.get("vs_lora_paired") is not None:
            return f"{row['vs_lora_paired']:.2f}"
    return "–"


def _decode_ratio(results: Path, method: str | None) -> str:
    """One unmerged decoding step x PEFT LoRA at batch 1 in ``decode-cpu.json`` (``bench/decode.py``); full
    fine-tuning decodes as the base model does."""
    data = _load(results / "decode-cpu.json") or {}
    row = ((data.get("batches") or {}).get("1") or {}).get("base" if method == "full" else method)
    return "–" if not row or row.get("vs_lora") is None else f"{row['vs_lora']:.2f}"


def summary_section(results: Path, base: Path) -> list[str]:
    """The README's one table: per method, the GLUE average and trainable parameters of the quality grid (the GPU
    grid if there is one), the training step time x LoRA on CPU and on a GPU, and the adapter bytes; one plot."""
    grids = sorted(results.glob("quality-minilm*.json"), key=lambda p: p.stem == "quality-minilm")
    grid_path = next((p for p in grids if (_load(p) or {}).get("summary")), None)
    if grid_path is None:
        return ["Not run yet: `python bench/quality.py` writes the quality grid the summary is made from.", ""]
    grid = _load(grid_path)
    summary = grid["summary"]
    lines = [
        f"| method | GLUE avg, 5 tasks × 3 seeds (`{grid_path.name}`) | trainable params | step ×LoRA, CPU | "
        "step ×LoRA, H100 | decode ×LoRA, CPU | adapter bytes |",
        "|:---|---:|---:|---:|---:|---:|---:|",
    ]
    for label, quality, throughput, base_kind in SUMMARY_ROWS:
        row = summary.get(quality) or {}
        avg = row.get("average")
        lines.append(
            f"| {label} | {'–' if avg is None else f'{100 * avg:.1f}'} | "
            f"{row.get('params_trainable', 0):,} | {_throughput_ratio(results, 'cpu', throughput, base_kind)} | "
            f"{_throughput_ratio(results, 'cuda', throughput, base_kind)} | "
            f"{_decode_ratio(results, throughput if base_kind == 'dense' else None)} | {row.get('adapter_bytes', 0):,} |"
        )
    runs = []
    for _, data in _summary_runs(results):
        nf4 = " (NF4 base)" if _run_base(data) == "nf4" else ""
        runs.append(f"{data['device']['name']}{nf4} at commit {_commit(data.get('commit'), data.get('dirty'))} "
                    f"({str(data.get('date'))[:10]})")
    if runs:
        lines += ["", "Step times measured on " + "; ".join(runs) + "."]
    plot = grid_path.with_suffix(".png")
    lines += ["", "GLUE: MiniLM (6×384), each method at the recipe budget; step: roberta-base shape (CPU: 16×128 tokens "
              "fp32, 1 thread; H100: 32×512 bf16), paired ratio to PEFT LoRA r=8 in the same run (NF4 base: every encoder "
              "linear in NF4, against PEFT's LoRA on it, i.e. QLoRA); decode: one step of unmerged generation on a LLaMA decoder "
              "with every linear adapted (`bench/decode.py`, batch 1, CPU, 1 thread), ratio to PEFT LoRA (runs of unchanged "
              "code differ by up to 0.15 on this shared machine); adapter bytes "
              "include the trained head."]
    if plot.is_file():
        lines += ["", f"![quality vs trainable parameters]({_link(plot, base)})"]
    return lines + [""]


def generate(results: Path, base: Path) -> str:
    """The whole section; links relative to ``base`` (the folder of the file it goes into)."""
    lines = [
        "<!-- generated by `python bench/results_readme.py` from the files in bench/results; do not edit by hand -->",
        "",
    ]
    for section in (minilm_section, sora_gates_section, quality_section, throughput_section, sparse_delta_section,
                    decode_section, index_memory_section, quant_section, lq_svd_section, bitbudget_section, squeeze_section, compile_section,
                    glue_section):
        lines += section(results, base)
    return "\n".join(lines).rstrip() + "\n"


def replace_between_markers(text: str, body: str, where: str = "README") -> str:
    """``text`` with the lines between ``BEGIN`` and ``END`` replaced by ``body`` (markers kept)."""
    lines = text.splitlines(keepends=True)
    begins = [i for i, line in enumerate(lines) if line.strip() == BEGIN]
    ends = [i for i, line in enumerate(lines) if line.strip() == END]
    if len(begins) != 1 or len(ends) != 1 or begins[0] > ends[0]:
        raise MarkerError(
            f"{where} must contain the line '{BEGIN}' once, followed later by the line '{END}' once (found "
            f"{len(begins)} begin and {len(ends)} end marker(s){', out of order' if begins and ends and begins[0] > ends[0] else ''}"
            "). Add them where the Results section belongs; the text between them is replaced."
        )
    b, e = begins[0], ends[0]
    body = body if body.endswith("\n") else body + "\n"
    return "".join(lines[: b + 1]) + body + "".join(lines[e:])


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results-dir", default=str(ROOT / "bench" / "results"), help="where the result files are")
    parser.add_argument("--out", default=None, help="the generated markdown (default <results-dir>/RESULTS.md)")
    parser.add_argument("--update-readme", default=None, metavar="README",
                        help="also put the summary table between the results markers of this file, and the full "
                             "results into --docs")
    parser.add_argument("--docs", default=None, help="the full results page written with --update-readme "
                                                     "(default: docs/results.md beside the README)")
    args = parser.parse_args(argv)
    results = Path(args.results_dir)
    out = Path(args.out) if args.out else results / "RESULTS.md"
    readme_text = None
    if args.update_readme:  # check the markers before writing anything
        readme = Path(args.update_readme)
        if not readme.is_file():
            raise SystemExit(f"error: {readme} does not exist")
        readme_text = readme.read_text(encoding="utf-8")
        try:
            replace_between_markers(readme_text, "", str(readme))
        except MarkerError as e:
            raise SystemExit(f"error: {e}") from None
    text = generate(results, out.parent)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    print(f"wrote {out}", file=sys.stderr)
    if args.update_readme:
        readme = Path(args.update_readme)
        docs = Path(args.docs) if args.docs else readme.parent / "docs" / "results.md"
        docs.parent.mkdir(parents=True, exist_ok=True)
        docs.write_text("# Results\n\n" + generate(results, docs.parent), encoding="utf-8")
        print(f"wrote {docs}", file=sys.stderr)
        summary = "\n".join(["<!-- generated by `python bench/results_readme.py` from the files in bench/results; do "
                             "not edit by hand -->", "", *summary_section(results, readme.parent)]).rstrip() + "\n"
        new = replace_between_markers(readme_text, summary, str(readme))
        tmp = readme.with_name(readme.name + ".tmp")
        tmp.write_text(new, encoding="utf-8")
        os.replace(tmp, readme)
        print(f"updated {readme} between {BEGIN} and {END}", file=sys.stderr)
    return text


if __name__ == "__main__":
    main()
