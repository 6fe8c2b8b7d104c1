"""glue.report: results JSONs -> markdown table and PNG plots."""

import json
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from glue import report  # noqa: E402
from glue.errors import GlueError  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def fake_result(task, method, main_metric, values, trainable, final_extra=None, split="validation"):
    evals = [{"step": 10 * (i + 1), "epoch": i + 1.0, "split": split, "metrics": {main_metric: v, "loss": 0.5}}
             for i, v in enumerate(values)]
    final = {split: {main_metric: values[-1], **(final_extra or {}), "loss": 0.5}}
    return {
        "schema": "slpeft-glue-results/1", "task": task, "task_display": task.upper(), "method": method,
        "model": "minilm", "main_metric": main_metric, "final": final, "evals": evals,
        "best": {"step": 10 * (values.index(max(values)) + 1), "value": max(values), "split": split},
        "train": {"examples": 100, "epochs": 2.0, "global_step": 20}, "params": {"trainable": trainable},
        "adapter": {"weights_bytes": 4 * trainable}, "wall_time_s": 12.3, "cpu_time_this_run_s": 7.0,
        "load_average": {"start": 1.5, "end": 2.25, "cpu_count": 2}, "peak_memory": {"rss_bytes": 2**30},
    }


@pytest.fixture
def results_dir(tmp_path):
    d = tmp_path / "results"
    d.mkdir()
    (d / "a.json").write_text(json.dumps(fake_result("rte", "lora", "accuracy", [0.5, 0.625], 222338)))
    (d / "b.json").write_text(json.dumps(fake_result("rte", "full", "accuracy", [0.6, 0.55], 22_700_000)))
    (d / "c.json").write_text(json.dumps(fake_result("mrpc", "lora", "accuracy", [0.7], 222338, {"f1": 0.8125})))
    (d / "unrelated.json").write_text(json.dumps({"something": "else"}))
    return d


def test_markdown_table_has_one_row_per_run_in_glue_order(results_dir):
    results = report.load_results([results_dir])
    assert [(r["task"], r["method"]) for r in results] == [("mrpc", "lora"), ("rte", "full"), ("rte", "lora")]
    table = report.markdown_table(results)
    lines = table.strip().splitlines()
    assert len(lines) == 2 + 3
    assert "| MRPC | minilm | lora | accuracy | 0.7000 | 0.7000 (10) | accuracy 0.7000, f1 0.8125 | 222.3K |" in table
    # final and best differ when the last evaluation is not the best one
    assert "| RTE | minilm | full | accuracy | 0.5500 | 0.6000 (10) |" in table
    assert "22.70M" in table and "868.5 KB" in table and "1.0 GB" in table
    assert "| 12 s, CPU 7 s (load 1.5/2.2 on 2 CPUs) |" in table


def test_plots_are_written_as_png(results_dir, tmp_path):
    out = tmp_path / "plots"
    table = report.write_report([results_dir], tmp_path / "table.md", out)
    assert (tmp_path / "table.md").read_text() == table
    for name in ("rte_metric_over_steps.png", "mrpc_metric_over_steps.png", "metric_vs_params.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC


def test_mnli_main_value_averages_matched_and_mismatched():
    r = fake_result("mnli", "lora", "accuracy", [0.8], 1, split="matched")
    r["final"]["mismatched"] = {"accuracy": 0.7}
    assert report.main_value(r) == pytest.approx(0.75)


def test_errors(tmp_path, capsys):
    with pytest.raises(GlueError, match="does not exist"):
        report.load_results([tmp_path / "nope"])
    with pytest.raises(GlueError, match="No glue.run results found"):
        report.load_results([tmp_path])
    (tmp_path / "x.json").write_text("{}")
    assert report.main([str(tmp_path / "x.json")]) == 2
    assert "not a results file" in capsys.readouterr().err
