"""GLUE task table and metric definitions, checked against values computed by hand."""

import math
import sys
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from glue.errors import GlueError  # noqa: E402
from glue.tasks import GLUE_TASKS, compute_metrics, custom_task, get_task, predictions_from_logits  # noqa: E402

# A fixed binary case. Confusion matrix (positive class 1):
#   TP = 4 (idx 0, 4, 6, 7), FN = 1 (idx 1), FP = 1 (idx 3), TN = 2 (idx 2, 5)
REFS = [1, 1, 0, 0, 1, 0, 1, 1]
PREDS = [1, 0, 0, 1, 1, 0, 1, 1]


def test_accuracy_f1_mcc_match_hand_computed_values():
    got = compute_metrics(("accuracy", "f1", "mcc"), PREDS, REFS)
    assert got["accuracy"] == pytest.approx(6 / 8)
    # precision = recall = 4/5, so F1 = 4/5
    assert got["f1"] == pytest.approx(0.8)
    # MCC = (TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = (8 - 1) / sqrt(5*5*3*3) = 7/15
    assert got["mcc"] == pytest.approx(7 / 15)


def test_f1_is_of_the_positive_class_not_an_average():
    # All-negative predictions: F1 of class 1 is 0 (a macro average would not be).
    got = compute_metrics(("f1", "accuracy"), [0, 0, 0, 0], [1, 0, 0, 0])
    assert got["f1"] == 0.0
    assert got["accuracy"] == pytest.approx(0.75)


def test_pearson_and_spearman_match_hand_computed_values():
    preds = [1.0, 2.0, 3.0, 4.0]
    refs = [2.0, 4.0, 5.0, 4.0]
    got = compute_metrics(("pearson", "spearman"), preds, refs)
    # deviations: dx = (-1.5, -.5, .5, 1.5), dy = (-1.75, .25, 1.25, .25); sum dx*dy = 3.5,
    # sum dx^2 = 5, sum dy^2 = 4.75  ->  r = 3.5 / sqrt(23.75)
    assert got["pearson"] == pytest.approx(3.5 / math.sqrt(23.75))
    # ranks of refs with ties averaged: (1, 2.5, 4, 2.5); rank deviations (-1.5, 0, 1.5, 0);
    # sum = 3, sum sq = 4.5  ->  rho = 3 / sqrt(5 * 4.5)
    assert got["spearman"] == pytest.approx(3 / math.sqrt(22.5))


def test_mcc_of_constant_predictions_is_zero_and_correlations_of_constants_are_nan():
    assert compute_metrics(("mcc",), [1, 1, 1, 1], [1, 0, 1, 0])["mcc"] == 0.0
    got = compute_metrics(("pearson", "spearman"), [2.0, 2.0, 2.0], [1.0, 2.0, 3.0])
    assert math.isnan(got["pearson"]) and math.isnan(got["spearman"])


def test_metric_errors_are_clear():
    with pytest.raises(GlueError, match="Unknown metric 'bleu'"):
        compute_metrics(("bleu",), [1], [1])
    with pytest.raises(GlueError, match="3 predictions for 2 references"):
        compute_metrics(("accuracy",), [1, 0, 1], [1, 0])


def test_glue_metric_choice_follows_the_benchmark():
    expected = {
        "cola": ("mcc",),
        "sst2": ("accuracy",),
        "mrpc": ("accuracy", "f1"),
        "stsb": ("pearson", "spearman"),
        "qqp": ("accuracy", "f1"),
        "mnli": ("accuracy",),
        "qnli": ("accuracy",),
        "rte": ("accuracy",),
        "wnli": ("accuracy",),
    }
    assert {k: v.metrics for k, v in GLUE_TASKS.items()} == expected
    assert get_task("STS-B").is_regression and get_task("stsb").num_labels == 1
    assert get_task("mnli").num_labels == 3
    assert [s.name for s in get_task("mnli").eval_splits] == ["matched", "mismatched"]


def test_class_ids_follow_the_hub():
    # nyu-mll/glue: rte/qnli 0 = entailment; mnli 0 entailment, 1 neutral, 2 contradiction; wnli 1 = entailment.
    assert get_task("rte").labels == ("entailment", "not_entailment")
    assert get_task("mnli").labels == ("entailment", "neutral", "contradiction")
    assert get_task("wnli").label_names[1] == "entailment"
    assert get_task("cola").label_names == ("unacceptable", "acceptable")


def test_task_names_are_normalised_and_unknown_ones_rejected():
    assert get_task("SST-2") is get_task("sst2") is get_task("sst_2")
    with pytest.raises(GlueError, match="Unknown task 'sst3'.*Did you mean 'sst2'"):
        get_task("sst3")


def test_predictions_from_logits():
    cls = get_task("rte")
    assert predictions_from_logits(cls, np.array([[0.1, 0.9], [2.0, -1.0]])).tolist() == [1, 0]
    reg = get_task("stsb")
    assert predictions_from_logits(reg, np.array([[3.5], [1.25]])).tolist() == [3.5, 1.25]


def test_custom_task_checks_metrics_against_problem():
    t = custom_task(name="x", text_columns=["a"], label_column="y", problem="regression", labels=None,
                    metrics=None, main_metric=None)
    assert t.metrics == ("pearson", "spearman") and t.is_regression
    with pytest.raises(GlueError, match="does not apply to a regression task"):
        custom_task(name="x", text_columns=["a"], label_column="y", problem="regression", labels=None,
                    metrics=["accuracy"], main_metric=None)
    with pytest.raises(GlueError, match="'classification' or 'regression'"):
        custom_task(name="x", text_columns=["a"], label_column="y", problem="ranking", labels=None,
                    metrics=None, main_metric=None)
