"""The GLUE task table and the GLUE metrics.

Each task names its columns twice: as they appear in the ``glue_data`` TSV files (what ``download_glue_data.py``
writes) and as they appear in the hub's ``nyu-mll/glue`` dataset. Class ids are the hub's ids, so a model trained from
local files and one trained from the hub agree on what class 0 means.

Metrics follow the GLUE benchmark (Wang et al., 2019): Matthews correlation for CoLA; accuracy and F1 (of the
positive class 1) for MRPC and QQP; Pearson and Spearman correlation for STS-B; accuracy for the rest. They are
computed with scikit-learn and scipy, so no metric script has to be downloaded.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from glue.errors import GlueError


# ----------------------------------------------------------------------------------------------------------------
# metrics


def accuracy(predictions: Sequence, references: Sequence) -> float:
    """Fraction of predictions equal to the reference class."""
    from sklearn.metrics import accuracy_score

    return float(accuracy_score(references, predictions))


def f1(predictions: Sequence, references: Sequence) -> float:
    """F1 score of the positive class (id 1), as GLUE reports it for MRPC and QQP."""
    from sklearn.metrics import f1_score

    return float(f1_score(references, predictions, pos_label=1, average="binary", zero_division=0))


def mcc(predictions: Sequence, references: Sequence) -> float:
    """Matthews correlation coefficient (CoLA). 0.0 when either side is constant."""
    from sklearn.metrics import matthews_corrcoef

    return float(matthews_corrcoef(references, predictions))


def _correlation(fn, predictions: Sequence, references: Sequence) -> float:
    x = np.asarray(predictions, dtype=np.float64)
    y = np.asarray(references, dtype=np.float64)
    if x.size < 2 or np.all(x == x[0]) or np.all(y == y[0]):
        # A correlation with a constant vector is undefined; scipy would warn and return nan. Say so plainly.
        return float("nan")
    return float(fn(x, y)[0])


def pearson(predictions: Sequence, references: Sequence) -> float:
    """Pearson correlation between predicted and gold scores (STS-B). NaN if either side is constant."""
    from scipy.stats import pearsonr

    return _correlation(pearsonr, predictions, references)


def spearman(predictions: Sequence, references: Sequence) -> float:
    """Spearman rank correlation between predicted and gold scores (STS-B). NaN if either side is constant."""
    from scipy.stats import spearmanr

    return _correlation(spearmanr, predictions, references)


METRICS: dict[str, Callable[[Sequence, Sequence], float]] = {
    "accuracy": accuracy,
    "f1": f1,
    "mcc": mcc,
    "pearson": pearson,
    "spearman": spearman,
}
"""Every metric the harness knows, by the name used in recipes and result files."""

CLASSIFICATION_METRICS = ("accuracy", "f1", "mcc")
REGRESSION_METRICS = ("pearson", "spearman")


# ----------------------------------------------------------------------------------------------------------------
# tasks


@dataclass(frozen=True)
class EvalSplit:
    """One evaluation split: its name in results, its file in a glue_data folder, its split name on the hub."""

    name: str
    local_file: str
    hub_split: str


@dataclass(frozen=True)
class TaskSpec:
    """Everything the harness needs to know about one task.

    Attributes:
        name: canonical key used in recipes and results (``"sst2"``).
        display: the name GLUE uses (``"SST-2"``); also the folder name inside a glue_data directory.
        text_columns: one or two text columns as named in the local files' header.
        label_column: the label column as named in the local files' header.
        labels: the label values exactly as they appear in the local files, in class-id order (the hub's ids);
            ``None`` for a regression task.
        label_names: human-readable class names in the same order (used for ``id2label``).
        metrics: metric names from :data:`METRICS`, computed at every evaluation.
        main_metric: the metric reported in tables and used to pick the best evaluation.
        eval_splits: the evaluation splits (MNLI has two).
        hub_config: the configuration name of ``nyu-mll/glue`` on the hub, or ``None`` (custom tasks).
        hub_text_columns: the text columns on the hub.
        header: column names for files without a header row (CoLA); ``None`` when the file has a header.
        label_range: inclusive range of a regression target (STS-B: 0..5); values outside are rejected.
        skip_malformed_rows: skip rows with too few fields instead of failing (QQP's train file has a few).
        train_file: the training file inside the task folder.
        delimiter / quoting: how the files are read (``"none"`` = ``csv.QUOTE_NONE``, as GLUE needs).
    """

    name: str
    display: str
    text_columns: tuple[str, ...]
    label_column: str
    labels: tuple[str, ...] | None
    label_names: tuple[str, ...] | None
    metrics: tuple[str, ...]
    main_metric: str
    eval_splits: tuple[EvalSplit, ...] = (EvalSplit("validation", "dev.tsv", "validation"),)
    hub_config: str | None = None
    hub_text_columns: tuple[str, ...] = ()
    header: tuple[str, ...] | None = None
    label_range: tuple[float, float] | None = None
    skip_malformed_rows: bool = False
    train_file: str = "train.tsv"
    delimiter: str = "\t"
    quoting: str = "none"

    @property
    def is_regression(self) -> bool:
        """True for a task with a real-valued target (STS-B, custom regression)."""
        return self.labels is None

    @property
    def num_labels(self) -> int:
        """Number of model outputs: the number of classes, or 1 for regression."""
        return 1 if self.labels is None else len(self.labels)

    def compute_metrics(self, predictions: Sequence, references: Sequence) -> dict[str, float]:
        """This task's metrics on class predictions (or scores, for regression) against references."""
        return compute_metrics(self.metrics, predictions, references)


def _pair(display, cols, label, labels, names, metrics, main, hub, hub_cols, **kw) -> TaskSpec:
    return TaskSpec(
        name=hub,
        display=display,
        text_columns=cols,
        label_column=label,
        labels=labels,
        label_names=names,
        metrics=metrics,
        main_metric=main,
        hub_config=hub,
        hub_text_columns=hub_cols,
        **kw,
    )


GLUE_TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in (
        _pair(
            "CoLA", ("sentence",), "label", ("0", "1"), ("unacceptable", "acceptable"),
            ("mcc",), "mcc", "cola", ("sentence",),
            # CoLA's TSVs have no header: source, label, original judgement mark, sentence.
            header=("source", "label", "original_label", "sentence"),
        ),
        _pair(
            "SST-2", ("sentence",), "label", ("0", "1"), ("negative", "positive"),
            ("accuracy",), "accuracy", "sst2", ("sentence",),
        ),
        _pair(
            "MRPC", ("#1 String", "#2 String"), "Quality", ("0", "1"), ("not_equivalent", "equivalent"),
            ("accuracy", "f1"), "accuracy", "mrpc", ("sentence1", "sentence2"),
        ),
        _pair(
            "STS-B", ("sentence1", "sentence2"), "score", None, None,
            ("pearson", "spearman"), "pearson", "stsb", ("sentence1", "sentence2"),
            label_range=(0.0, 5.0),
        ),
        _pair(
            "QQP", ("question1", "question2"), "is_duplicate", ("0", "1"), ("not_duplicate", "duplicate"),
            ("accuracy", "f1"), "accuracy", "qqp", ("question1", "question2"),
            skip_malformed_rows=True,
        ),
        _pair(
            "MNLI", ("sentence1", "sentence2"), "gold_label", ("entailment", "neutral", "contradiction"),
            ("entailment", "neutral", "contradiction"),
            ("accuracy",), "accuracy", "mnli", ("premise", "hypothesis"),
            eval_splits=(
                EvalSplit("matched", "dev_matched.tsv", "validation_matched"),
                EvalSplit("mismatched", "dev_mismatched.tsv", "validation_mismatched"),
            ),
        ),
        _pair(
            "QNLI", ("question", "sentence"), "label", ("entailment", "not_entailment"),
            ("entailment", "not_entailment"), ("accuracy",), "accuracy", "qnli", ("question", "sentence"),
        ),
        _pair(
            "RTE", ("sentence1", "sentence2"), "label", ("entailment", "not_entailment"),
            ("entailment", "not_entailment"), ("accuracy",), "accuracy", "rte", ("sentence1", "sentence2"),
        ),
        _pair(
            "WNLI", ("sentence1", "sentence2"), "label", ("0", "1"), ("not_entailment", "entailment"),
            ("accuracy",), "accuracy", "wnli", ("sentence1", "sentence2"),
        ),
    )
}
"""The nine GLUE tasks by canonical name."""


def _normalise(name: str) -> str:
    return "".join(ch for ch in str(name).lower() if ch.isalnum())


def get_task(name: str) -> TaskSpec:
    """The GLUE task called ``name`` (case, ``-`` and ``_`` ignored: ``SST-2``, ``sst_2``, ``sst2`` all work).

    Raises:
        GlueError: for an unknown name, listing the known ones and the closest match.
    """
    key = _normalise(name)
    if key in GLUE_TASKS:
        return GLUE_TASKS[key]
    known = sorted(GLUE_TASKS)
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    raise GlueError(
        f"Unknown task '{name}'.{hint} Known GLUE tasks: {', '.join(known)}; for your own data use "
        "'task: custom' with a 'custom:' mapping (train_file, eval_file, text_columns, label_column, problem)."
    )


def custom_task(
    *,
    name: str,
    text_columns: Sequence[str],
    label_column: str,
    problem: str,
    labels: Sequence | None,
    metrics: Sequence[str] | None,
    main_metric: str | None,
    label_range: Sequence[float] | None = None,
) -> TaskSpec:
    """A :class:`TaskSpec` for a user's own data (see :func:`glue.data.load_custom_task`).

    Raises:
        GlueError: on an unknown problem type or metric, a metric that does not fit the problem type, or a
            wrong number of text columns.
    """
    if problem not in ("classification", "regression"):
        raise GlueError(
            f"custom.problem is '{problem}'; it must be 'classification' or 'regression'. Set it in the recipe's "
            "'custom:' mapping."
        )
    text_columns = tuple(str(c) for c in (text_columns or ()))
    if len(text_columns) not in (1, 2):
        raise GlueError(
            f"custom.text_columns has {len(text_columns)} entries ({list(text_columns)}); give one column "
            "(single sentences) or two (sentence pairs)."
        )
    allowed = CLASSIFICATION_METRICS if problem == "classification" else REGRESSION_METRICS
    metrics = tuple(metrics) if metrics else (("accuracy",) if problem == "classification" else REGRESSION_METRICS)
    for m in metrics:
        if m not in allowed:
            raise GlueError(
                f"custom.metrics names '{m}', which does not apply to a {problem} task. Use some of: "
                f"{', '.join(allowed)}."
            )
    main_metric = main_metric or metrics[0]
    if main_metric not in metrics:
        raise GlueError(f"custom.main_metric '{main_metric}' is not among custom.metrics {list(metrics)}; add it.")
    if problem == "classification" and labels is not None:
        labels = tuple(str(v) for v in labels)
        if len(set(labels)) != len(labels) or len(labels) < 2:
            raise GlueError(
                f"custom.labels {list(labels)} must list at least two distinct label values, in class-id order."
            )
    return TaskSpec(
        name=name,
        display=name,
        text_columns=text_columns,
        label_column=str(label_column),
        labels=None if problem == "regression" else (tuple(labels) if labels is not None else ()),
        label_names=None if problem == "regression" else (tuple(labels) if labels is not None else ()),
        metrics=metrics,
        main_metric=main_metric,
        label_range=tuple(float(v) for v in label_range) if label_range is not None else None,
        quoting="csv",
    )


def compute_metrics(metric_names: Sequence[str], predictions: Sequence, references: Sequence) -> dict[str, float]:
    """Compute the named metrics of :data:`METRICS` on predictions against references.

    Args:
        metric_names: names from :data:`METRICS`.
        predictions: predicted class ids (classification) or scores (regression).
        references: gold class ids or scores, same length.

    Raises:
        GlueError: on an unknown metric name or mismatched lengths.
    """
    if len(predictions) != len(references):
        raise GlueError(
            f"Got {len(predictions)} predictions for {len(references)} references; they must pair up one to one."
        )
    out = {}
    for name in metric_names:
        if name not in METRICS:
            raise GlueError(f"Unknown metric '{name}'. Known metrics: {', '.join(METRICS)}.")
        out[name] = METRICS[name](predictions, references)
    return out


def predictions_from_logits(task: TaskSpec, logits) -> np.ndarray:
    """Turn model outputs into what the metrics take: argmax class ids, or the single regression output."""
    logits = np.asarray(logits[0] if isinstance(logits, tuple) else logits)
    if task.is_regression:
        return logits.reshape(-1).astype(np.float64)
    return logits.argmax(axis=-1)


def is_finite(value) -> bool:
    """True for a real, finite number (metrics may be NaN when a correlation is undefined)."""
    return isinstance(value, (int, float)) and math.isfinite(value)
