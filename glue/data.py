"""Loading GLUE (local glue_data folder or the hub) and custom CSV/TSV/JSONL tasks.

Every loader returns a :class:`TaskData` whose datasets have the same columns, whatever the source:
``text_a``, optionally ``text_b``, and ``label`` (an int class id, or a float for regression).

Where the data comes from, in order:

1. ``data_dir`` (``--data-dir`` / the recipe's ``data_dir``): a folder in the standard ``glue_data`` layout
   (``<dir>/SST-2/train.tsv``, ``<dir>/SST-2/dev.tsv``, ...). It must exist.
2. the ``GLUE_DIR`` environment variable, the same layout. It must exist too when set.
3. the hub's ``nyu-mll/glue`` dataset through ``datasets.load_dataset`` (needs network access or a warm cache).

Local files are read exactly as ``download_glue_data.py`` writes them: tab separated, no quoting
(``csv.QUOTE_NONE``, because fields contain unbalanced ``"``), UTF-8 with the byte-order mark of MRPC's header
stripped, and CoLA without a header row.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from glue.errors import GlueError
from glue.tasks import TaskSpec, custom_task, get_task

if TYPE_CHECKING:
    from glue.config import RunConfig

HUB_DATASET = "nyu-mll/glue"

csv.field_size_limit(min(sys.maxsize, 2**31 - 1))


@dataclass
class TaskData:
    """A task's training set and evaluation sets in the harness's common columns.

    Attributes:
        task: the task (for a custom task with inferred labels, the labels found in the training file).
        train: ``datasets.Dataset`` with ``text_a`` [, ``text_b``], ``label``.
        evals: evaluation split name -> dataset, in the task's order.
        source: where the data came from, for the results file (a folder, files, or ``hub:nyu-mll/glue/<cfg>``).
        skipped_rows: rows skipped as malformed per file (only tasks that allow it, e.g. QQP).
    """

    task: TaskSpec
    train: Any
    evals: dict[str, Any]
    source: str
    skipped_rows: dict[str, int] = dataclasses.field(default_factory=dict)


# ----------------------------------------------------------------------------------------------------------------
# where the data lives


def resolve_glue_dir(data_dir: str | os.PathLike | None) -> Path | None:
    """The local GLUE folder to read, or ``None`` to use the hub.

    ``data_dir`` wins over the ``GLUE_DIR`` environment variable. A folder that is named but missing is an error,
    never a silent fall-back to the hub.

    Raises:
        GlueError: when the named folder does not exist.
    """
    if data_dir not in (None, ""):
        path = Path(data_dir).expanduser()
        if not path.is_dir():
            raise GlueError(
                f"The GLUE data folder '{data_dir}' (from data_dir / --data-dir) does not exist. Point it at a "
                "folder in the glue_data layout (<dir>/SST-2/train.tsv, <dir>/SST-2/dev.tsv, ...), or leave "
                "data_dir unset to use GLUE_DIR or the hub."
            )
        return path
    env = os.environ.get("GLUE_DIR")
    if env:
        path = Path(env).expanduser()
        if not path.is_dir():
            raise GlueError(
                f"GLUE_DIR is set to '{env}', which is not a folder. Fix the path (it must hold <TASK>/train.tsv "
                "and <TASK>/dev.tsv in the glue_data layout) or unset GLUE_DIR to load from the hub."
            )
        return path
    return None


# ----------------------------------------------------------------------------------------------------------------
# reading files


def _open_rows(path: Path, delimiter: str, quoting: str):
    quote = csv.QUOTE_NONE if quoting == "none" else csv.QUOTE_MINIMAL
    # utf-8-sig drops a leading byte-order mark (MRPC's header starts with one) and reads everything else as UTF-8.
    handle = open(path, encoding="utf-8-sig", newline="")
    return handle, csv.reader(handle, delimiter=delimiter, quoting=quote)


def read_table(
    path: Path,
    *,
    text_columns: Sequence[str],
    label_column: str,
    header: Sequence[str] | None = None,
    delimiter: str = "\t",
    quoting: str = "none",
    skip_malformed_rows: bool = False,
) -> tuple[list[tuple[str, ...]], list[tuple[int, str]], int]:
    """Read the text columns and the label column of a delimited file.

    Args:
        path: the file.
        text_columns / label_column: column names, looked up in the header row (or in ``header``).
        header: column names for a file without a header row; ``None`` when the first row is the header.
        delimiter / quoting: ``"none"`` reads with ``csv.QUOTE_NONE`` (GLUE), ``"csv"`` with standard quoting.
        skip_malformed_rows: skip rows with too few fields instead of raising.

    Returns:
        (texts per row, (line number, raw label) per row, number of skipped rows).

    Raises:
        GlueError: a missing column (listing the header), or a row with too few fields.
    """
    if not path.is_file():
        raise GlueError(f"Data file '{path}' does not exist. Check the data folder and the task's file names.")
    handle, rows = _open_rows(path, delimiter, quoting)
    with handle:
        if header is None:
            try:
                names = [c.strip() for c in next(rows)]
            except StopIteration:
                raise GlueError(f"Data file '{path}' is empty; expected a header row and examples.") from None
            first_line = 2
        else:
            names = list(header)
            first_line = 1
        wanted = list(text_columns) + [label_column]
        missing = [c for c in wanted if c not in names]
        if missing:
            raise GlueError(
                f"Column(s) {missing} not found in '{path}'. Its columns are {names}. Fix the column names in the "
                "task (custom.text_columns / custom.label_column), or check that this is the right file "
                "(a wrong delimiter also shows up as one long column name)."
            )
        index = [names.index(c) for c in wanted]
        need = max(index) + 1
        texts, labels, skipped = [], [], 0
        for line_no, row in enumerate(rows, start=first_line):
            if not row or (len(row) == 1 and row[0] == ""):
                continue  # blank line (e.g. a trailing newline)
            if len(row) < need:
                if skip_malformed_rows:
                    skipped += 1
                    continue
                raise GlueError(
                    f"{path}:{line_no}: the row has {len(row)} fields but column '{names[max(index)]}' is field "
                    f"{need}. The file is probably damaged or not in the expected format (tab separated, no "
                    "quoting); re-download it or fix that row."
                )
            texts.append(tuple(row[i] for i in index[:-1]))
            labels.append((line_no, row[index[-1]]))
    return texts, labels, skipped


def read_jsonl(path: Path, *, text_columns: Sequence[str], label_column: str):
    """Read text and label fields from a JSON Lines file (or a JSON file holding a list of objects).

    Returns the same triple as :func:`read_table`.

    Raises:
        GlueError: invalid JSON or a record without one of the fields.
    """
    if not path.is_file():
        raise GlueError(f"Data file '{path}' does not exist. Check custom.train_file / custom.eval_file.")
    text = path.read_text(encoding="utf-8-sig")
    records: list[tuple[int, Any]] = []
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
        try:
            records = list(enumerate(json.loads(text), start=1))
        except json.JSONDecodeError as e:
            raise GlueError(f"{path}: not valid JSON ({e}). Use one JSON object per line (JSONL) or a list.") from e
    else:
        for line_no, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append((line_no, json.loads(line)))
            except json.JSONDecodeError as e:
                raise GlueError(f"{path}:{line_no}: not valid JSON ({e}). Each line must be one JSON object.") from e
    texts, labels = [], []
    for line_no, rec in records:
        if not isinstance(rec, dict):
            raise GlueError(f"{path}:{line_no}: expected a JSON object with named fields, got {type(rec).__name__}.")
        missing = [c for c in list(text_columns) + [label_column] if c not in rec]
        if missing:
            raise GlueError(
                f"{path}:{line_no}: field(s) {missing} missing; the record has {sorted(rec)}. Fix "
                "custom.text_columns / custom.label_column or the file."
            )
        texts.append(tuple("" if rec[c] is None else str(rec[c]) for c in text_columns))
        labels.append((line_no, rec[label_column]))
    return texts, labels, 0


def _label_string(value) -> str:
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def convert_labels(task: TaskSpec, path: Path | str, raw: list[tuple[int, Any]]) -> list:
    """Map raw label values to class ids (classification) or floats (regression), checking every one.

    Raises:
        GlueError: a label outside the task's label set, or a score that is not a number or out of range,
            naming the file, the line, the value and the allowed values.
    """
    out = []
    if task.is_regression:
        lo, hi = task.label_range if task.label_range else (float("-inf"), float("inf"))
        for line_no, value in raw:
            try:
                score = float(value)
            except (TypeError, ValueError):
                raise GlueError(
                    f"{path}:{line_no}: the {task.display} target '{value}' is not a number. The label column "
                    f"'{task.label_column}' must hold real-valued scores; check that it is the right column."
                ) from None
            if not (lo <= score <= hi):
                raise GlueError(
                    f"{path}:{line_no}: the {task.display} score {score} is outside the task's range [{lo}, {hi}]. "
                    "The file is not this task's data, or the range (custom.label_range) is wrong."
                )
            out.append(score)
        return out
    ids = {v: i for i, v in enumerate(task.labels)}
    for line_no, value in raw:
        key = _label_string(value)
        if key not in ids:
            raise GlueError(
                f"{path}:{line_no}: label '{value}' is not in {task.display}'s label set {list(task.labels)}. "
                "The file probably belongs to another task, or the label column is wrong; for a custom task list "
                "every label value in custom.labels."
            )
        out.append(ids[key])
    return out


def _to_dataset(texts: list[tuple[str, ...]], labels: list, n_text: int):
    import datasets

    columns: dict[str, list] = {"text_a": [t[0] for t in texts]}
    if n_text == 2:
        columns["text_b"] = [t[1] for t in texts]
    columns["label"] = labels
    return datasets.Dataset.from_dict(columns)


# ----------------------------------------------------------------------------------------------------------------
# GLUE


def load_glue_local(task: TaskSpec, root: Path) -> TaskData:
    """Read a GLUE task from a folder in the glue_data layout (``root/<display>/train.tsv`` and the dev files).

    Raises:
        GlueError: a missing task folder or file (listing what is there), a bad column, a bad label.
    """
    folder = root / task.display
    if not folder.is_dir():
        present = sorted(p.name + ("" if p.is_dir() else " (a file)") for p in root.iterdir()) if root.is_dir() else []
        raise GlueError(
            f"No '{task.display}' folder in the GLUE data folder '{root}' (it has: {', '.join(present) or 'nothing'}). "
            f"Put the task's files at {folder}/{task.train_file} and "
            f"{', '.join(str(folder / s.local_file) for s in task.eval_splits)} (the glue_data layout), point "
            "data_dir/GLUE_DIR elsewhere, or unset both to load the task from the hub."
        )
    needed = [task.train_file] + [s.local_file for s in task.eval_splits]
    missing = [f for f in needed if not (folder / f).is_file()]
    if missing:
        raise GlueError(
            f"The {task.display} folder '{folder}' lacks {missing} (it has {sorted(p.name for p in folder.iterdir())}). "
            "Copy the missing split(s) from a complete glue_data download."
        )
    skipped: dict[str, int] = {}

    def split(file_name: str):
        path = folder / file_name
        texts, raw, n_skipped = read_table(
            path,
            text_columns=task.text_columns,
            label_column=task.label_column,
            header=task.header,
            delimiter=task.delimiter,
            quoting=task.quoting,
            skip_malformed_rows=task.skip_malformed_rows,
        )
        if n_skipped:
            skipped[file_name] = n_skipped
        if not texts:
            raise GlueError(f"'{path}' holds no examples. Re-copy the file from a glue_data download.")
        return _to_dataset(texts, convert_labels(task, path, raw), len(task.text_columns))

    train = split(task.train_file)
    evals = {s.name: split(s.local_file) for s in task.eval_splits}
    return TaskData(task=task, train=train, evals=evals, source=str(folder), skipped_rows=skipped)


def load_glue_hub(task: TaskSpec) -> TaskData:
    """Load a GLUE task from the hub's ``nyu-mll/glue`` dataset (its class ids are the harness's ids).

    Raises:
        GlueError: when the hub cannot be reached (saying how to use local files instead), or when the hub's data
            does not have the expected columns or labels.
    """
    try:
        import datasets

        ds = datasets.load_dataset(HUB_DATASET, task.hub_config)
    except Exception as e:  # network errors come in many types (ConnectionError, OfflineModeIsEnabled, HTTPError...)
        raise GlueError(
            f"No local GLUE folder was given (data_dir / --data-dir and GLUE_DIR are unset), and loading "
            f"'{HUB_DATASET}' config '{task.hub_config}' from the hub failed: {type(e).__name__}: {e}. "
            "Without network access, set GLUE_DIR (or --data-dir) to a folder in the glue_data layout, "
            "e.g. GLUE_DIR=../shared/glue."
        ) from e
    label_key = "label"

    def convert(split_name: str):
        if split_name not in ds:
            raise GlueError(
                f"The hub dataset {HUB_DATASET}/{task.hub_config} has no split '{split_name}' (it has {list(ds)})."
            )
        part = ds[split_name]
        missing = [c for c in list(task.hub_text_columns) + [label_key] if c not in part.column_names]
        if missing:
            raise GlueError(
                f"The hub dataset {HUB_DATASET}/{task.hub_config} lacks columns {missing} (it has "
                f"{part.column_names}); the hub's format changed, so use a local glue_data folder (GLUE_DIR)."
            )
        texts = list(zip(*(part[c] for c in task.hub_text_columns)))
        values = part[label_key]
        where = f"hub:{HUB_DATASET}/{task.hub_config}/{split_name}"
        if task.is_regression:
            labels = convert_labels(task, where, list(enumerate(values)))
        else:
            bad = [(i, v) for i, v in enumerate(values) if not (isinstance(v, int) and 0 <= v < task.num_labels)]
            if bad:
                i, v = bad[0]
                raise GlueError(
                    f"{where} row {i}: label {v} is outside {task.display}'s {task.num_labels} classes "
                    f"({list(task.label_names)}); {len(bad)} such rows. The hub's test splits carry -1 labels and "
                    "cannot be used for training or evaluation."
                )
            labels = list(values)
        return _to_dataset(texts, labels, len(task.hub_text_columns))

    train = convert("train")
    evals = {s.name: convert(s.hub_split) for s in task.eval_splits}
    return TaskData(task=task, train=train, evals=evals, source=f"hub:{HUB_DATASET}/{task.hub_config}")


def load_glue(task_name: str, data_dir: str | os.PathLike | None = None) -> TaskData:
    """Load GLUE task ``task_name`` from ``data_dir``, else ``GLUE_DIR``, else the hub."""
    task = get_task(task_name)
    root = resolve_glue_dir(data_dir)
    if root is not None:
        return load_glue_local(task, root)
    return load_glue_hub(task)


# ----------------------------------------------------------------------------------------------------------------
# custom tasks

CUSTOM_FIELDS = {
    "name": "a short name for results and tables (default: 'custom')",
    "train_file": "path of the training file (.csv, .tsv, .jsonl or .json)",
    "eval_file": "path of the evaluation file (same formats)",
    "text_columns": "one or two text column names",
    "label_column": "the label column name",
    "problem": "'classification' or 'regression'",
    "labels": "classification: the label values in class-id order (default: the sorted values of the train file)",
    "metrics": "metric names (classification: accuracy, f1, mcc; regression: pearson, spearman)",
    "main_metric": "the metric reported in tables (default: the first of metrics)",
    "label_range": "regression: [low, high]; scores outside are rejected",
    "quoting": "for .csv/.tsv: 'csv' (standard quoting; default for .csv) or 'none' (default for .tsv, as GLUE)",
}
"""The fields of a recipe's ``custom:`` mapping, with what each means."""


def _read_any(path: Path, task: TaskSpec, quoting: str | None):
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        return read_jsonl(path, text_columns=task.text_columns, label_column=task.label_column)
    if suffix in (".csv", ".tsv", ".txt"):
        delimiter = "," if suffix == ".csv" else "\t"
        q = quoting or ("csv" if suffix == ".csv" else "none")
        return read_table(
            path, text_columns=task.text_columns, label_column=task.label_column, delimiter=delimiter, quoting=q
        )
    raise GlueError(
        f"Cannot tell the format of '{path}' from its suffix '{path.suffix}'. Use .csv, .tsv, .jsonl or .json."
    )


def load_custom_task(spec: Mapping[str, Any], base_dir: str | os.PathLike | None = None) -> TaskData:
    """Load a custom task described by a recipe's ``custom:`` mapping (fields: :data:`CUSTOM_FIELDS`).

    Relative file paths are taken relative to ``base_dir`` (the current directory by default).

    Raises:
        GlueError: unknown or missing fields, missing files or columns, labels outside ``labels``.
    """
    spec = dict(spec or {})
    unknown = sorted(set(spec) - set(CUSTOM_FIELDS))
    if unknown:
        raise GlueError(
            f"Unknown field(s) {unknown} in the recipe's 'custom:' mapping. Known fields: "
            + "; ".join(f"{k} ({v})" for k, v in CUSTOM_FIELDS.items())
        )
    for required in ("train_file", "eval_file", "text_columns", "label_column", "problem"):
        if spec.get(required) in (None, "", []):
            raise GlueError(f"The recipe's 'custom:' mapping needs '{required}': {CUSTOM_FIELDS[required]}.")
    text_columns = spec["text_columns"]
    if isinstance(text_columns, str):
        text_columns = [text_columns]
    task = custom_task(
        name=str(spec.get("name") or "custom"),
        text_columns=text_columns,
        label_column=spec["label_column"],
        problem=spec["problem"],
        labels=spec.get("labels"),
        metrics=spec.get("metrics"),
        main_metric=spec.get("main_metric"),
        label_range=spec.get("label_range"),
    )
    quoting = spec.get("quoting")
    if quoting not in (None, "csv", "none"):
        raise GlueError(f"custom.quoting is '{quoting}'; use 'csv' or 'none'.")
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    paths = {}
    for key in ("train_file", "eval_file"):
        p = Path(str(spec[key])).expanduser()
        paths[key] = p if p.is_absolute() else base / p
    train_texts, train_raw, _ = _read_any(paths["train_file"], task, quoting)
    eval_texts, eval_raw, _ = _read_any(paths["eval_file"], task, quoting)
    if not train_texts or not eval_texts:
        empty = paths["train_file"] if not train_texts else paths["eval_file"]
        raise GlueError(f"'{empty}' holds no examples.")
    if not task.is_regression and not task.labels:
        found = sorted({_label_string(v) for _, v in train_raw})
        if len(found) < 2:
            raise GlueError(
                f"The training file '{paths['train_file']}' has only the label value(s) {found}; a classifier needs "
                "at least two. Check custom.label_column, or use problem: regression for real-valued targets."
            )
        task = dataclasses.replace(task, labels=tuple(found), label_names=tuple(found))
    train = _to_dataset(train_texts, convert_labels(task, paths["train_file"], train_raw), len(task.text_columns))
    evals = {
        "validation": _to_dataset(
            eval_texts, convert_labels(task, paths["eval_file"], eval_raw), len(task.text_columns)
        )
    }
    return TaskData(task=task, train=train, evals=evals, source=f"{paths['train_file']} | {paths['eval_file']}")


# ----------------------------------------------------------------------------------------------------------------
# subsetting


def subsample(dataset, n: int | None, seed: int):
    """A seeded random subset of ``n`` examples (all of them when ``n`` is None or not smaller).

    Random rather than the first ``n``: several GLUE files are ordered (CoLA's by source, its dev set in-domain
    first), so a prefix would be a biased sample. The same seed always gives the same subset.
    """
    if n is None or n >= len(dataset):
        return dataset
    if n <= 0:
        raise GlueError(f"A sample limit of {n} leaves no examples; use a positive number or leave it unset.")
    return dataset.shuffle(seed=seed).select(range(n))


def load_run_data(cfg: RunConfig) -> TaskData:
    """The data a run trains and evaluates on: its task's files, the training subset (``max_train_samples``) or the
    held-out split (``holdout_samples``), and the evaluation subsets (``max_eval_samples``).

    Raises:
        GlueError: missing files, bad columns or labels, or too few examples to hold out.
    """
    if str(cfg.task).lower() == "custom":
        data = load_custom_task(cfg.custom)
    else:
        data = load_glue(cfg.task, cfg.data_dir)
    if cfg.holdout_samples:
        data.train, data.evals = hold_out(data.train, cfg)
    else:
        data.train = subsample(data.train, cfg.max_train_samples, cfg.subset_seed)
    data.evals = {k: subsample(v, cfg.max_eval_samples, cfg.subset_seed) for k, v in data.evals.items()}
    return data


def hold_out(train, cfg: RunConfig):
    """``(training set, {"holdout": held-out set})`` from one seeded shuffle of the training file.

    The training subset is the first ``max_train_samples`` of the shuffle, exactly the examples ``max_train_samples``
    alone trains on (so a held-out run trains what the dev run trains); the held-out examples are the last
    ``holdout_samples``, disjoint from it. Without ``max_train_samples`` the run trains on the rest of the file."""
    n, held = len(train), int(cfg.holdout_samples)
    n_train = cfg.max_train_samples if cfg.max_train_samples is not None else n - held
    if n_train <= 0 or n_train + held > n:
        raise GlueError(
            f"holdout_samples={held} with max_train_samples={cfg.max_train_samples} needs {max(n_train, 1) + held} "
            f"training examples, but the training file has {n}. Hold out fewer examples or train on fewer "
            "(max_train_samples)."
        )
    shuffled = train.shuffle(seed=cfg.subset_seed)
    return shuffled.select(range(n_train)), {"holdout": shuffled.select(range(n - held, n))}


def tokenize(dataset, tokenizer, max_len: int, desc: str):
    """``text_a`` [, ``text_b``], ``label`` -> the tokenizer's input ids (truncated to ``max_len``) and ``labels``."""
    def encode(batch):
        texts = (batch["text_a"], batch["text_b"]) if "text_b" in batch else (batch["text_a"],)
        enc = tokenizer(*texts, truncation=True, max_length=max_len)
        enc["labels"] = batch["label"]
        return enc

    return dataset.map(encode, batched=True, remove_columns=dataset.column_names, desc=desc)


def longest_first(dataset):
    """The same examples ordered longest first: evaluation batches then pad little (metrics do not depend on order)."""
    lengths = [len(ids) for ids in dataset["input_ids"]]
    return dataset.select(sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)))


def tokenize_splits(data: TaskData, tokenizer, max_len: int):
    """The tokenized training set and evaluation sets (the latter longest first)."""
    train = tokenize(data.train, tokenizer, max_len, "tokenize train")
    evals = {k: longest_first(tokenize(v, tokenizer, max_len, f"tokenize {k}")) for k, v in data.evals.items()}
    return train, evals
