"""GLUE data loading: exact reading of glue_data files, the hub fallback, custom tasks, and clear errors."""

import json
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from glue.data import load_custom_task, load_glue, resolve_glue_dir, subsample  # noqa: E402
from glue.errors import GlueError  # noqa: E402

# CI provides the real GLUE files at ../shared/glue relative to the repository root.
SHARED_GLUE = (REPO_ROOT / ".." / "shared" / "glue").resolve()
needs_glue = pytest.mark.skipif(
    not (SHARED_GLUE / "RTE" / "train.tsv").is_file(),
    reason=f"real GLUE files not found at {SHARED_GLUE} (CI provides them at ../shared/glue)",
)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def fake_glue(tmp_path):
    """A glue_data folder with the real files' quirks: CoLA without header, MRPC's BOM, unbalanced quotes."""
    root = tmp_path / "glue_data"
    cola = "gj04\t1\t\tThe sailors rode the breeze clear of the rocks.\ngj04\t0\t*\tHe \"said it.\n"
    write(root / "CoLA" / "train.tsv", cola)
    write(root / "CoLA" / "dev.tsv", cola.rstrip("\n"))  # the real CoLA dev file has no trailing newline
    mrpc = "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n1\t1\t2\t\" The pie .\tThe pie \" .\n0\t3\t4\tA b .\tC d .\n"
    write(root / "MRPC" / "train.tsv", mrpc)
    write(root / "MRPC" / "dev.tsv", mrpc)
    rte = "index\tsentence1\tsentence2\tlabel\n0\tA \"quoted start.\tB.\tentailment\n1\tC.\tD.\tnot_entailment\n"
    write(root / "RTE" / "train.tsv", rte)
    write(root / "RTE" / "dev.tsv", rte)
    stsb = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
    stsb += "0\tg\tf\ty\t0\tn\tn\tA man.\tA man!\t5.000\n1\tg\tf\ty\t1\tn\tn\tX.\tY.\t0.250\n"
    write(root / "STS-B" / "train.tsv", stsb)
    write(root / "STS-B" / "dev.tsv", stsb)
    return root


def test_reads_glue_quirks_exactly(fake_glue):
    cola = load_glue("cola", fake_glue)
    assert cola.train["text_a"] == ["The sailors rode the breeze clear of the rocks.", 'He "said it.']
    assert cola.train["label"] == [1, 0]
    assert len(cola.evals["validation"]) == 2
    mrpc = load_glue("mrpc", fake_glue)  # the header's BOM must not hide the 'Quality' column
    assert mrpc.train["text_a"][0] == '" The pie .' and mrpc.train["text_b"][0] == 'The pie " .'
    assert mrpc.train["label"] == [1, 0]
    rte = load_glue("rte", fake_glue)
    assert rte.train["text_a"][0] == 'A "quoted start.'  # QUOTE_NONE keeps the quote and the row intact
    assert rte.train["label"] == [0, 1]
    stsb = load_glue("stsb", fake_glue)
    assert stsb.train["label"] == [5.0, 0.25]


def test_label_outside_the_task_set_is_reported_with_file_and_line(fake_glue):
    write(fake_glue / "RTE" / "train.tsv", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n1\tc\td\tmaybe\n")
    with pytest.raises(GlueError, match=r"train.tsv:3: label 'maybe' is not in RTE's label set"):
        load_glue("rte", fake_glue)


def test_regression_score_outside_range_or_not_a_number(fake_glue):
    head = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
    write(fake_glue / "STS-B" / "train.tsv", head + "0\tg\tf\ty\t0\tn\tn\tA.\tB.\t7.5\n")
    with pytest.raises(GlueError, match=r"score 7.5 is outside the task's range \[0.0, 5.0\]"):
        load_glue("stsb", fake_glue)
    write(fake_glue / "STS-B" / "train.tsv", head + "0\tg\tf\ty\t0\tn\tn\tA.\tB.\thigh\n")
    with pytest.raises(GlueError, match="target 'high' is not a number"):
        load_glue("stsb", fake_glue)


def test_missing_folders_and_files_are_clear_errors(fake_glue, tmp_path, monkeypatch):
    with pytest.raises(GlueError, match="does not exist"):
        resolve_glue_dir(tmp_path / "nope")
    monkeypatch.setenv("GLUE_DIR", str(tmp_path / "also-nope"))
    with pytest.raises(GlueError, match="GLUE_DIR is set to .* which is not a folder"):
        resolve_glue_dir(None)
    monkeypatch.setenv("GLUE_DIR", str(fake_glue))
    assert resolve_glue_dir(None) == fake_glue
    with pytest.raises(GlueError, match="No 'SST-2' folder in the GLUE data folder"):
        load_glue("sst2")  # GLUE_DIR is used when no data_dir is given
    (fake_glue / "RTE" / "dev.tsv").unlink()
    with pytest.raises(GlueError, match=r"lacks \['dev.tsv'\]"):
        load_glue("rte", fake_glue)


def test_missing_column_and_short_rows(fake_glue):
    write(fake_glue / "RTE" / "train.tsv", "index\tpremise\thypothesis\tlabel\n0\ta\tb\tentailment\n")
    with pytest.raises(GlueError, match=r"Column\(s\) \['sentence1', 'sentence2'\] not found"):
        load_glue("rte", fake_glue)
    write(fake_glue / "RTE" / "train.tsv", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\n")
    with pytest.raises(GlueError, match="train.tsv:2: the row has 3 fields"):
        load_glue("rte", fake_glue)


def test_qqp_skips_malformed_rows_and_counts_them(tmp_path):
    head = "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n"
    write(tmp_path / "QQP" / "train.tsv", head + "0\t1\t2\tq a?\tq b?\t1\n1\t3\t4\tbroken\n2\t5\t6\tq c?\tq d?\t0\n")
    write(tmp_path / "QQP" / "dev.tsv", head + "0\t1\t2\tq a?\tq b?\t0\n")
    d = load_glue("qqp", tmp_path)
    assert d.train["label"] == [1, 0] and d.skipped_rows == {"train.tsv": 1}


def test_hub_fallback_maps_columns_and_checks_labels(monkeypatch):
    import datasets

    monkeypatch.delenv("GLUE_DIR", raising=False)
    calls = []

    def fake_load(name, config):
        calls.append((name, config))
        split = datasets.Dataset.from_dict({"premise": ["p1", "p2"], "hypothesis": ["h1", "h2"], "label": [2, 0]})
        return datasets.DatasetDict(train=split, validation_matched=split, validation_mismatched=split)

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    d = load_glue("mnli")
    assert calls == [("nyu-mll/glue", "mnli")]  # the hub dataset and config the harness promises
    assert d.train["text_a"] == ["p1", "p2"] and d.train["text_b"] == ["h1", "h2"] and d.train["label"] == [2, 0]
    assert list(d.evals) == ["matched", "mismatched"]

    def test_split(name, config):
        split = datasets.Dataset.from_dict({"premise": ["p"], "hypothesis": ["h"], "label": [-1]})
        return datasets.DatasetDict(train=split, validation_matched=split, validation_mismatched=split)

    monkeypatch.setattr(datasets, "load_dataset", test_split)
    with pytest.raises(GlueError, match="label -1 is outside MNLI's 3 classes"):
        load_glue("mnli")


def test_hub_failure_says_how_to_use_local_files(monkeypatch):
    import datasets

    monkeypatch.delenv("GLUE_DIR", raising=False)

    def offline(*a, **k):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(GlueError, match="set GLUE_DIR"):
        load_glue("rte")


def test_custom_csv_tsv_jsonl(tmp_path):
    write(tmp_path / "train.csv", 'text,stars\n"Good, really",pos\nbad,neg\nok,pos\n')
    write(tmp_path / "dev.csv", "text,stars\nfine,pos\n")
    d = load_custom_task(
        {"train_file": "train.csv", "eval_file": "dev.csv", "text_columns": "text", "label_column": "stars",
         "problem": "classification"},
        base_dir=tmp_path,
    )
    assert d.task.labels == ("neg", "pos")  # inferred from the train file, sorted
    assert d.train["text_a"][0] == "Good, really" and d.train["label"] == [1, 0, 1]

    rows = [{"q": "a", "p": "b", "score": 0.5}, {"q": "c", "p": "d", "score": 2.0}]
    write(tmp_path / "t.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n")
    d = load_custom_task(
        {"name": "sim", "train_file": str(tmp_path / "t.jsonl"), "eval_file": str(tmp_path / "t.jsonl"),
         "text_columns": ["q", "p"], "label_column": "score", "problem": "regression"}
    )
    assert d.task.is_regression and d.task.name == "sim" and d.train["label"] == [0.5, 2.0]

    write(tmp_path / "t.tsv", 'sentence\tlabel\n"half quote\t1\nb\t0\n')
    d = load_custom_task(
        {"train_file": str(tmp_path / "t.tsv"), "eval_file": str(tmp_path / "t.tsv"), "text_columns": ["sentence"],
         "label_column": "label", "problem": "classification", "labels": [0, 1]}
    )
    assert d.train["text_a"] == ['"half quote', "b"] and d.train["label"] == [1, 0]


def test_custom_task_errors(tmp_path):
    write(tmp_path / "a.csv", "text,label\nx,yes\ny,no\n")
    base = {"train_file": str(tmp_path / "a.csv"), "eval_file": str(tmp_path / "a.csv"), "text_columns": ["text"],
            "label_column": "label", "problem": "classification"}
    with pytest.raises(GlueError, match=r"Column\(s\) \['sentence'\] not found"):
        load_custom_task({**base, "text_columns": ["sentence"]})
    with pytest.raises(GlueError, match="label 'no' is not in"):
        load_custom_task({**base, "labels": ["yes", "maybe"]})
    with pytest.raises(GlueError, match=r"Unknown field\(s\) \['label_col'\]"):
        load_custom_task({**base, "label_col": "x"})
    with pytest.raises(GlueError, match="needs 'eval_file'"):
        load_custom_task({k: v for k, v in base.items() if k != "eval_file"})
    with pytest.raises(GlueError, match="Cannot tell the format"):
        load_custom_task({**base, "train_file": str(write(tmp_path / "a.xlsx", "x"))})


def test_subsample_is_seeded_and_random():
    import datasets

    ds = datasets.Dataset.from_dict({"label": list(range(100))})
    a, b = subsample(ds, 10, seed=0), subsample(ds, 10, seed=0)
    assert a["label"] == b["label"] and a["label"] != list(range(10))
    assert subsample(ds, None, 0) is ds and subsample(ds, 1000, 0) is ds


@needs_glue
def test_real_glue_files_have_the_official_row_counts():
    # Row counts from /work/shared/glue/SOURCES.md (= the official GLUE split sizes).
    expected = {"cola": (8551, 1043), "sst2": (67349, 872), "mrpc": (3668, 408), "stsb": (5749, 1500),
                "rte": (2490, 277), "wnli": (635, 71)}
    for task, (n_train, n_dev) in expected.items():
        d = load_glue(task, SHARED_GLUE)
        assert (len(d.train), len(d.evals["validation"])) == (n_train, n_dev), task
    mrpc = load_glue("mrpc", SHARED_GLUE)
    assert sum(mrpc.train["label"]) == 2474  # train: 2474 x 1 / 1194 x 0
    rte = load_glue("rte", SHARED_GLUE)
    assert rte.evals["validation"]["label"].count(0) == 146  # dev: 146 entailment
