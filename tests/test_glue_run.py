"""The GLUE runner end to end on a tiny BERT built from a config: real RTE files, resume, output folder rules,
errors before training, the command line."""

import dataclasses
import importlib.util
import importlib.metadata
import json
import string
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from glue import config as gconfig  # noqa: E402
from glue import data as gdata  # noqa: E402
from glue import model as gmodel  # noqa: E402
from glue import run as grun  # noqa: E402
from glue.results import RESULTS_SCHEMA  # noqa: E402
from glue.errors import GlueError  # noqa: E402

SHARED_GLUE = (REPO_ROOT / ".." / "shared" / "glue").resolve()
needs_rte = pytest.mark.skipif(
    not (SHARED_GLUE / "RTE" / "train.tsv").is_file(),
    reason=f"real GLUE files not found at {SHARED_GLUE} (CI provides them at ../shared/glue)",
)

WORDS = (
    "the a an of to in is was and that it for on with as by at from not are be this which or have has had were "
    "he she they we you his her their its who said will would can could one two new more most also after than "
    "been into no there people about out year years but all up other some time only first over when what"
).split()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    """A 2-layer, 32-wide BERT with a WordPiece vocabulary written here (no hub), saved as a folder."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-bert")
    pieces = list(string.ascii_lowercase + string.digits + string.punctuation)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + pieces + ["##" + p for p in pieces] + WORDS
    (folder / "vocab.txt").write_text("\n".join(dict.fromkeys(vocab)) + "\n", encoding="utf-8")
    tokenizer = BertTokenizerFast(vocab_file=str(folder / "vocab.txt"), do_lower_case=True)
    tokenizer.save_pretrained(str(folder))
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=128,
    )
    torch.manual_seed(0)
    BertModel(config).save_pretrained(str(folder))
    return str(folder)


@pytest.fixture
def toy_task(tmp_path) -> dict:
    """A small custom sentence-pair task whose label is learnable (does text_b repeat text_a's first word?)."""
    import random

    rng = random.Random(0)
    rows = []
    for _ in range(64):
        a = " ".join(rng.choice(WORDS) for _ in range(6))
        same = rng.random() < 0.5
        b = (a.split()[0] if same else rng.choice(WORDS)) + " " + " ".join(rng.choice(WORDS) for _ in range(4))
        rows.append(f"{a}\t{b}\t{'yes' if same else 'no'}")
    (tmp_path / "train.tsv").write_text("a\tb\tlabel\n" + "\n".join(rows[:48]) + "\n")
    (tmp_path / "dev.tsv").write_text("a\tb\tlabel\n" + "\n".join(rows[48:]) + "\n")
    return {"name": "toy", "train_file": str(tmp_path / "train.tsv"), "eval_file": str(tmp_path / "dev.tsv"),
            "text_columns": ["a", "b"], "label_column": "label", "problem": "classification",
            "labels": ["no", "yes"], "metrics": ["accuracy", "f1"]}


def cfg(**values) -> gconfig.RunConfig:
    base = {"max_seq_len": 32, "train_batch_size": 8, "eval_batch_size": 16, "logging_steps": 2, "num_threads": 1}
    base.update(values)
    return gconfig.config_from_mapping(base)


class NoTraining:
    """Fails the test if training starts: errors must come before it."""

    def __getattr__(self, name):
        if name == "on_train_begin":
            def fail(*a, **k):
                raise AssertionError("training started although the configuration is invalid")
            return fail
        if name.startswith("on_"):
            return lambda *a, **k: None
        raise AttributeError(name)


class Interrupt(Exception):
    pass


class StopAfterSave:
    """Simulates a crash right after the checkpoint of ``step`` is written."""

    def __init__(self, step):
        self.step = step

    def __getattr__(self, name):
        if name.startswith("on_"):
            return lambda *a, **k: None
        raise AttributeError(name)

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise Interrupt(f"killed after checkpoint-{self.step}")


@needs_rte
def test_tiny_end_to_end_on_real_rte(tiny_model, tmp_path):
    out = tmp_path / "run"
    res = grun.run(cfg(
        task="rte", data_dir=str(SHARED_GLUE), model=tiny_model, method="lora",
        peft={"r": 4, "lora_alpha": 8, "target_modules": ["query", "value"]},
        max_train_samples=64, max_eval_samples=32, max_steps=6, eval_strategy="steps", eval_steps=3,
        save_steps=3, output_dir=str(out), results_path=str(tmp_path / "copy.json"),
    ))
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk == json.loads((tmp_path / "copy.json").read_text())
    assert on_disk["task"] == "rte" and on_disk["method"] == "lora" and on_disk["schema"] == RESULTS_SCHEMA
    assert [e["step"] for e in on_disk["evals"]] == [3, 6]
    acc = on_disk["final"]["validation"]["accuracy"]
    assert 0.0 <= acc <= 1.0 and res["final"]["validation"]["accuracy"] == acc
    assert on_disk["eval_examples"] == {"validation": 32} and on_disk["train"]["examples"] == 64
    # BERT's head is pooler + classifier: both train for a PEFT method, next to the LoRA factors.
    assert on_disk["head_modules"] == ["pooler", "classifier"]
    lora = 2 * 2 * 4 * (32 + 32)  # 2 layers x (query, value) x r x (in + out)
    pooler, classifier = 32 * 32 + 32, 32 * 2 + 2
    assert on_disk["params"]["trainable"] == lora + pooler + classifier
    assert (out / "adapter" / "adapter_model.safetensors").stat().st_size == on_disk["adapter"]["weights_bytes"]
    assert on_disk["wall_time_s"] > 0 and on_disk["cpu_time_this_run_s"] > 0 and on_disk["peak_memory"]["rss_bytes"] > 0
    assert on_disk["config"]["task"] == "rte" and on_disk["git"]["commit"]
    assert on_disk["data_source"].endswith("RTE")
    # The report reads what the runner writes.
    from glue import report

    table = report.write_report([out / "results.json"], None, tmp_path / "plots")
    assert "| RTE | " in table and f"{acc:.4f}" in table
    assert (tmp_path / "plots" / "rte_metric_over_steps.png").is_file()


def test_resume_after_a_kill_ends_with_the_same_metrics(tiny_model, toy_task, tmp_path):
    import safetensors.torch

    # 48 examples / batch 8 = 6 steps per epoch; 12 steps = 2 epochs; killed mid-way through epoch 2, with dropout on.
    common = dict(task="custom", custom=toy_task, model=tiny_model, method="lora",
                  peft={"r": 4, "lora_alpha": 8, "lora_dropout": 0.1}, max_steps=12, eval_strategy="steps",
                  eval_steps=4, save_steps=4, learning_rate=1e-3)
    straight = grun.run(cfg(**common, output_dir=str(tmp_path / "a")))

    interrupted = cfg(**common, output_dir=str(tmp_path / "b"))
    with pytest.raises(Interrupt):
        grun.run(interrupted, callbacks=[StopAfterSave(8)])
    assert not (tmp_path / "b" / "results.json").exists()
    resumed = grun.run(interrupted, resume=True)

    assert resumed["resumed_from"].endswith("checkpoint-8")
    assert resumed["evals"] == straight["evals"]  # every evaluation, bit for bit, including those before the kill
    assert resumed["train"]["global_step"] == straight["train"]["global_step"] == 12
    assert (straight["train"]["train_loss_steps"], resumed["train"]["train_loss_steps"]) == ([1, 12], [9, 12])
    a = safetensors.torch.load_file(str(tmp_path / "a" / "adapter" / "adapter_model.safetensors"))
    b = safetensors.torch.load_file(str(tmp_path / "b" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def test_resume_refuses_a_changed_recipe_or_a_run_without_checkpoints(tiny_model, toy_task, tmp_path):
    common = dict(task="custom", custom=toy_task, model=tiny_model, max_steps=2, save_steps=2,
                  output_dir=str(tmp_path / "r"))
    with pytest.raises(GlueError, match="no complete checkpoint"):
        grun.run(cfg(**common), resume=True)
    grun.run(cfg(**common))
    with pytest.raises(GlueError, match=r"different recipe .*learning_rate"):
        grun.run(cfg(**common, learning_rate=1e-2), resume=True)


def test_never_overwrites_an_output_dir_unless_asked(tiny_model, toy_task, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    common = dict(task="custom", custom=toy_task, model=tiny_model, max_steps=1, save_steps=0, output_dir=str(out))
    with pytest.raises(GlueError, match="already exists and is not empty"):
        grun.run(cfg(**common), callbacks=[NoTraining()])
    assert (out / "precious.txt").read_text() == "keep me"
    res = grun.run(cfg(**common, overwrite_output_dir=True))
    assert not (out / "precious.txt").exists() and (out / "results.json").is_file()
    assert res["train"]["global_step"] == 1


def test_full_fine_tuning_trains_everything_and_saves_the_model(tiny_model, toy_task, tmp_path):
    res = grun.run(cfg(task="custom", custom=toy_task, model=tiny_model, method="full", max_steps=2, save_steps=0,
                       output_dir=str(tmp_path / "f")))
    assert res["params"]["trainable"] == res["params"]["total"]
    assert (tmp_path / "f" / "model" / "model.safetensors").is_file()


def test_library_tuner_by_name(tiny_model, toy_task, tmp_path):
    slpeft = pytest.importorskip("sparse_lowrank_peft", reason="the library's tuners are not importable")
    name = sorted(slpeft.TUNERS)[0]
    res = grun.run(cfg(task="custom", custom=toy_task, model=tiny_model, method=name,
                       peft={"target_modules": ["query", "value"]}, max_steps=2, save_steps=0,
                       output_dir=str(tmp_path / "t")))
    assert res["method"] == name and res["peft_config"]["task_type"] == "SEQ_CLS"
    assert {"pooler", "classifier"} <= set(res["peft_config"]["modules_to_save"])  # PEFT may add "score"
    assert (tmp_path / "t" / "adapter" / "adapter_model.safetensors").is_file()


def test_sora_reports_kept_ranks_and_puts_the_plot_beside_the_results_file(tiny_model, toy_task, tmp_path):
    pytest.importorskip("sparse_lowrank_peft", reason="the library's tuners are not importable")
    dest = tmp_path / "results" / "minilm-sora-toy.json"
    res = grun.run(cfg(task="custom", custom=toy_task, model=tiny_model, method="sora",
                       peft={"r": 4, "target_modules": ["query", "value"], "sparse_lambda": 1.0}, max_steps=2,
                       save_steps=0, output_dir=str(tmp_path / "s"), results_path=str(dest)))
    extra = res["method_results"]
    assert extra["max_total"] == 4 * len(extra["kept_ranks"]) and 0 <= extra["kept_total"] <= extra["max_total"]
    copy = dest.with_name("minilm-sora-toy-kept_ranks.png")
    assert copy.is_file() and copy.read_bytes() == (tmp_path / "s" / "kept_ranks.png").read_bytes()
    assert json.loads(dest.read_text())["method_results"]["kept_ranks_plot_copy"] == str(copy)


def test_init_adapter_loads_the_body_but_not_the_head(tiny_model, toy_task, tmp_path):
    import safetensors.torch

    first = grun.run(cfg(task="custom", custom=toy_task, model=tiny_model, peft={"r": 4}, max_steps=3,
                         save_steps=0, output_dir=str(tmp_path / "src"), learning_rate=1e-2))
    three_class = dict(toy_task, labels=["no", "yes", "maybe"])  # another head shape, as MNLI -> RTE
    second = grun.run(cfg(task="custom", custom=three_class, model=tiny_model, peft={"r": 4}, max_steps=1,
                          learning_rate=1e-9, warmup_ratio=0.0, save_steps=0, output_dir=str(tmp_path / "dst"),
                          init_adapter=first["adapter"]["path"]))
    assert second["init_adapter"]["loaded_tensors"] == 8 and second["init_adapter"]["skipped_head_tensors"] > 0
    src = safetensors.torch.load_file(str(tmp_path / "src" / "adapter" / "adapter_model.safetensors"))
    dst = safetensors.torch.load_file(str(tmp_path / "dst" / "adapter" / "adapter_model.safetensors"))
    lora_keys = [k for k in src if "lora_B" in k]
    assert lora_keys and all(float(src[k].abs().max()) > 0 for k in lora_keys)  # trained, so not the zero init
    assert all(float((src[k] - dst[k]).abs().max()) < 1e-6 for k in lora_keys)
    with pytest.raises(GlueError, match="does not fit"):
        grun.run(cfg(task="custom", custom=toy_task, model=tiny_model, peft={"r": 2}, max_steps=1, save_steps=0,
                     output_dir=str(tmp_path / "bad"), init_adapter=first["adapter"]["path"]),
                 callbacks=[NoTraining()])



def test_data_errors_come_before_training(tiny_model, toy_task, tmp_path):
    bad_label = dict(toy_task, labels=["no", "maybe"])
    with pytest.raises(GlueError, match="label 'yes' is not in"):
        grun.run(cfg(task="custom", custom=bad_label, model=tiny_model, output_dir=str(tmp_path / "x")),
                 callbacks=[NoTraining()])
    bad_col = dict(toy_task, text_columns=["a", "sentence2"])
    with pytest.raises(GlueError, match=r"Column\(s\) \['sentence2'\] not found"):
        grun.run(cfg(task="custom", custom=bad_col, model=tiny_model, output_dir=str(tmp_path / "x")),
                 callbacks=[NoTraining()])
    with pytest.raises(GlueError, match="does not exist"):
        grun.run(cfg(task="rte", data_dir=str(tmp_path / "no-glue"), model=tiny_model,
                     output_dir=str(tmp_path / "x")), callbacks=[NoTraining()])
    assert not (tmp_path / "x").exists()


def test_holdout_trains_the_same_subset_and_evaluates_on_disjoint_training_examples(tiny_model, toy_task, tmp_path):
    """holdout_samples: the dev set is replaced by training examples that are never trained on, and the training
    subset is exactly the one max_train_samples alone draws (so held-out and dev runs train the same examples)."""
    def rows(ds):
        return [(r["text_a"], r["text_b"], r["label"]) for r in ds]

    plain = gdata.load_run_data(cfg(task="custom", custom=toy_task, max_train_samples=30))
    held = gdata.load_run_data(cfg(task="custom", custom=toy_task, max_train_samples=30, holdout_samples=10))
    assert rows(held.train) == rows(plain.train)
    assert list(held.evals) == ["holdout"] and len(held.evals["holdout"]) == 10
    assert not set(rows(held.evals["holdout"])) & set(rows(held.train))
    rest = gdata.load_run_data(cfg(task="custom", custom=toy_task, holdout_samples=8))  # no max_train_samples: the rest
    assert len(rest.train) == 40 and not set(rows(rest.evals["holdout"])) & set(rows(rest.train))
    with pytest.raises(GlueError, match="needs 50 training examples, but the training file has 48"):
        gdata.load_run_data(cfg(task="custom", custom=toy_task, max_train_samples=30, holdout_samples=20))
    with pytest.raises(GlueError, match="'holdout_samples' is 0"):
        cfg(task="custom", custom=toy_task, holdout_samples=0)
    res = grun.run(cfg(task="custom", custom=toy_task, model=tiny_model, holdout_samples=8, max_steps=2,
                       eval_strategy="no", output_dir=str(tmp_path / "h")))
    assert list(res["final"]) == ["holdout"] and res["eval_examples"] == {"holdout": 8}


def test_command_line(tiny_model, toy_task, tmp_path, capsys):
    import yaml

    recipe = tmp_path / "r.yaml"
    recipe.write_text("# python -m glue.run r.yaml\n" + yaml.safe_dump(
        {"task": "custom", "custom": toy_task, "model": tiny_model, "max_steps": 1, "max_seq_len": 16}))
    assert grun.main([str(recipe), "--dry-run", "peft.r=2", "--max-train-samples", "10"]) == 0
    out = capsys.readouterr().out
    plan = json.loads(out[out.index("\n{") + 1:])
    assert plan["dry_run"] and plan["train_examples"] == 10 and plan["head_modules"] == ["pooler", "classifier"]
    assert not Path(plan["output_dir"]).exists()  # a dry run writes nothing
    cfg_ = gconfig.build_config(str(recipe), ["peft.r=2", "learning_rate=1e-3", "max_train_samples=10"])
    assert cfg_.peft == {"r": 2} and cfg_.learning_rate == 1e-3 and cfg_.max_train_samples == 10
    assert grun.main([str(recipe), "lerning_rate=1"]) == 2
    assert "Unknown recipe field 'lerning_rate'" in capsys.readouterr().err
    assert grun.main([str(recipe), "--no-such-flag", "1"]) == 2
    assert grun.main([str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert grun.main(["--list-fields"]) == 0 and "learning_rate" in capsys.readouterr().out
    recipe_, overrides, flags = gconfig.parse_cli(["x.yaml", "--data-dir", "/d", "--overwrite-output-dir", "--resume"])
    assert overrides == ["data_dir=/d", "overwrite_output_dir=true"] and flags["resume"] and recipe_ == "x.yaml"


def test_console_script_points_at_main():
    """The installed ``slpeft-glue`` entry point (what pip put on the user's PATH) runs ``glue.run.main``."""
    (script,) = importlib.metadata.entry_points(group="console_scripts", name="slpeft-glue")
    assert (script.module, script.attr) == ("glue.run", "main") and script.load() is grun.main


def test_head_modules_are_derived_from_the_model_structure(tiny_model):
    from transformers import AutoModelForSequenceClassification, RobertaConfig, RobertaForSequenceClassification

    bert = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=2)
    assert gmodel.head_module_names(bert) == ["pooler", "classifier"]
    roberta = RobertaForSequenceClassification(RobertaConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32))
    assert gmodel.head_module_names(roberta) == ["classifier"]


# ---------------------------------------------------------------------------------------------------------------
# slow: real processes, real budgets (pytest -m slow)


@pytest.fixture
def slow_selected(request):
    """Skip unless the run selected slow tests (``-m slow``): the default suite must stay fast."""
    if "slow" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("slow test: run it with `python -m pytest -m slow`")


def _cli(*args, env=None, **kw):
    import os
    import subprocess

    full_env = dict(os.environ, **(env or {}))
    full_env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + full_env.get("PYTHONPATH", "")
    return subprocess.Popen([sys.executable, "-m", "glue.run", *args], cwd=REPO_ROOT, env=full_env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


@pytest.mark.slow
def test_sigkill_then_resume_from_the_command_line(slow_selected, tiny_model, toy_task, tmp_path):
    """A run killed with SIGKILL (no clean-up at all) right after a checkpoint resumes to the same metrics."""
    import signal
    import time

    import yaml

    recipe = tmp_path / "toy.yaml"
    recipe.write_text("# python -m glue.run toy.yaml\n" + yaml.safe_dump({
        "task": "custom", "custom": toy_task, "model": tiny_model, "method": "lora",
        "peft": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.1}, "max_steps": 300, "save_steps": 50,
        "eval_strategy": "steps", "eval_steps": 100, "max_seq_len": 32, "train_batch_size": 8, "num_threads": 1,
        "learning_rate": 1e-3, "logging_steps": 50,
    }))
    straight = _cli(str(recipe), f"output_dir={tmp_path / 'a'}")
    assert straight.wait(timeout=600) == 0, straight.stdout.read()

    victim = _cli(str(recipe), f"output_dir={tmp_path / 'b'}")
    marker = tmp_path / "b" / "checkpoint-100" / "glue_progress.json"
    deadline = time.time() + 600
    while not marker.exists() and victim.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert victim.poll() is None, "the run ended before it could be killed; raise max_steps"
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert not (tmp_path / "b" / "results.json").exists()

    resumed = _cli(str(recipe), f"output_dir={tmp_path / 'b'}", "--resume")
    log = resumed.communicate(timeout=600)[0]
    assert resumed.returncode == 0, log
    assert "resuming from" in log
    a = json.loads((tmp_path / "a" / "results.json").read_text())
    b = json.loads((tmp_path / "b" / "results.json").read_text())
    assert b["resumed_from"] is not None and int(b["resumed_from"].rsplit("-", 1)[1]) >= 100
    assert a["evals"] == b["evals"] and a["final"] == b["final"]


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED_GLUE / "SST-2" / "train.tsv").is_file(), reason=f"SST-2 not found at {SHARED_GLUE}")
def test_minilm_lora_sst2_recipe_reaches_080(slow_selected, tmp_path):
    """The issue's bar: PEFT LoRA on MiniLM with recipes/minilm/lora-sst2.yaml scores >= 0.80 on SST-2 dev."""
    proc = _cli("recipes/minilm/lora-sst2.yaml", f"output_dir={tmp_path / 'sst2'}",
                env={"GLUE_DIR": str(SHARED_GLUE)})
    log = proc.communicate(timeout=3600)[0]
    assert proc.returncode == 0, log[-3000:]
    res = json.loads((tmp_path / "sst2" / "results.json").read_text())
    assert res["final"]["validation"]["accuracy"] >= 0.80, res["final"]
    print(f"SST-2 dev accuracy {res['final']['validation']['accuracy']:.4f} in {res['wall_time_s']:.0f} s "
          f"(load average {res['load_average']})")


# ---------------------------------------------------------------------------------------------------------------
# 4-bit bases (quantize / init: lq) and LoRA-Squeeze from a recipe


def test_nf4_base_with_lq_init_quantizes_the_encoder_but_not_the_head(tiny_model, toy_task, tmp_path):
    pytest.importorskip("bitsandbytes")
    res = grun.run(cfg(task="custom", custom=toy_task, model=tiny_model, method="sltrain", quantize="nf4", init="lq",
                       peft={"r": 4, "target_modules": ["query", "value"]}, max_steps=2, save_steps=0,
                       output_dir=str(tmp_path / "q")))
    q = res["method_results"]["quantization"]
    # 2 layers x (query, value) by LQ-LoRA; key, attention output, intermediate, output dense by plain NF4
    assert q["lq_layers"] == 4 and q["plain_4bit_layers"] == 8, q
    err = q["lq_relative_error_mean"]
    assert err["lq"] <= err["loftq"] <= err["quant_only"] + 1e-6, err
    assert res["peft_config"]["init_weights"] == "lq" and res["peft_config"]["lq_quant_type"] == "nf4"
    assert is_finite_metric(res)
    # the adapter records the whole 4-bit base, so a reload quantizes all 12 encoder linears again, not only LQ's 4
    assert set(res["peft_config"]["lq_plan"].values()) == {"bnb-nf4-dq"} and len(res["peft_config"]["lq_plan"]) == 12
    assert reloaded_4bit_layers(tiny_model, toy_task, tmp_path / "q" / "adapter") == 12


def reloaded_4bit_layers(tiny_model, toy_task, folder) -> int:
    """How many quantized linears the adapter ``folder`` has after ``PeftModel.from_pretrained`` on a fresh model."""
    from peft import PeftModel

    from glue import model as gmodel

    c = cfg(task="custom", custom=toy_task, model=tiny_model, method="sltrain")
    fresh, _, _ = gmodel.load_model_and_tokenizer(c, gdata.load_run_data(c).task)
    kinds = [type(m).__name__ for m in PeftModel.from_pretrained(fresh, str(folder)).modules()]
    return kinds.count("HQQLinear") + kinds.count("Linear4bit")


def test_nf4_base_for_peft_lora(tiny_model, toy_task, tmp_path):
    pytest.importorskip("bitsandbytes")
    res = grun.run(cfg(task="custom", custom=toy_task, model=tiny_model, quantize="nf4", peft={"r": 2}, max_steps=2,
                       save_steps=0, output_dir=str(tmp_path / "q")))
    # 2 layers x 6 encoder linears (query and value are wrapped by LoRA around their 4-bit base)
    assert res["method_results"]["quantization"]["plain_4bit_layers"] == 12
    assert is_finite_metric(res)


@pytest.mark.parametrize("plan", [{"uniform": "hqq-4bit-g32"}, {"budget_bits": 6.0},
                                  {"budget_bits": 6.0, "fisher_batches": 2},
                                  {"budget_bits": 4.4, "output_batches": 2,
                                   "candidates": ["hqq-2bit-g32", "hqq-4bit-g32"]}],
                         ids=["uniform", "budget", "fisher", "output"])
def test_quantize_plan_from_a_recipe(tiny_model, toy_task, tmp_path, plan):
    """quantize: plan -- every encoder linear with its configuration (LQ on the targets), trained, adapter saved."""
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("hqq")
    res = grun.run(cfg(task="custom", custom=toy_task, model=tiny_model, method="sltrain", quantize="plan",
                       quantize_plan=plan, init="lq", peft={"r": 2, "sparsity": 0.1, "lq_max_iter": 2}, max_steps=2,
                       save_steps=0, output_dir=str(tmp_path / "p")))
    info = res["method_results"]["quantization"]
    assert info["quantized_layers"] == 8  # 2 layers x 6 encoder linears, minus the 4 LQ targets (query, value)
    assert sum(info["choices"].values()) == 12
    if "budget_bits" in plan:
        assert info["bits_per_param"] <= 6.0
    if "fisher_batches" in plan:  # the errors solved over are Fisher-weighted: another scale than ‖W − Q − L‖²
        assert info["fisher_batches"] == 2
    if "output_batches" in plan:  # the errors are relative changes of the output: the budget mixes 2 and 4 bits
        assert info["objective"] == "output" and info["output_batches"] == 2
        assert set(info["choices"]) == {"hqq-2bit-g32", "hqq-4bit-g32"}, info
    saved = json.loads((tmp_path / "p" / "adapter" / "adapter_config.json").read_text())
    assert saved["init_weights"] == "lq" and len(saved["lq_plan"]) == 12
    assert is_finite_metric(res)
    # the adapter reloads onto the whole planned base: every encoder linear quantized again, not only the targets
    assert reloaded_4bit_layers(tiny_model, toy_task, tmp_path / "p" / "adapter") == 12



@pytest.mark.parametrize("targets, rest", [(["query", "value"], 8), (r".*layer\.\d+\..*(query|key|value|dense)", 0),
                                           ("all-linear", 0)], ids=["suffixes", "regex", "all-linear"])
def test_plan_lq_targets_follow_target_modules(tiny_model, toy_task, tmp_path, targets, rest):
    """LQ on a plan measures and reports L on exactly the adapter's targets, however ``target_modules`` names them:
    suffixes, a regex, or PEFT's ``all-linear`` (every encoder linear; the head is trained, not adapted)."""
    pytest.importorskip("hqq")
    res = grun.run(cfg(task="custom", custom=toy_task, model=tiny_model, method="sltrain", quantize="plan",
                       quantize_plan={"uniform": "hqq-4bit-g32"}, init="lq",
                       peft={"r": 2, "sparsity": 0.1, "lq_max_iter": 2, "target_modules": targets}, max_steps=1,
                       save_steps=0, output_dir=str(tmp_path / "p")))
    assert res["method_results"]["quantization"]["quantized_layers"] == rest  # quantized without L
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "p" / "adapter" / "adapter_model.safetensors"))
    assert len([k for k in saved if "sltrain_A" in k]) == 12 - rest


def test_all_linear_builds_what_the_recipes_regex_built(tiny_model, toy_task):
    """The ``-all`` recipes name ``all-linear``; their committed runs named this regex. Both build the same model
    (every tensor equal) with a budget plan and LQ init."""
    pytest.importorskip("hqq")
    import torch

    def built(targets):
        c = cfg(task="custom", custom=toy_task, model=tiny_model, method="sltrain", quantize="plan",
                quantize_plan={"budget_bits": 5.0}, init="lq",
                peft={"r": 2, "sparsity": 0.1, "lq_max_iter": 2, "target_modules": targets})
        return gmodel.build_model(c, gdata.load_run_data(c).task).model.state_dict()

    regex, shorthand = built(r".*encoder\.layer\.\d+\..*(query|key|value|dense)"), built("all-linear")
    assert regex.keys() == shorthand.keys()
    assert all(torch.equal(regex[k], shorthand[k]) for k in regex if isinstance(regex[k], torch.Tensor))


def test_fisher_weights_reach_the_plan_and_lq_init(tiny_model, toy_task, monkeypatch):
    """fisher_batches: the table is measured with the Fisher weights of that many training batches, and LQ init
    reads the same weights for its targets (delta.fisher.use_fisher)."""
    pytest.importorskip("hqq")
    from glue import model as gmodel
    from sparse_lowrank_peft.delta import bitbudget, quant

    seen = {}
    measure, lq_decompose = bitbudget.measure, quant.lq_decompose

    def spy_measure(weights, rank, *args, **kw):
        seen["measure"] = (set(kw["fisher"]), set(kw["lq_layers"]))
        return measure(weights, rank, *args, **kw)

    def spy_lq(W, rank, fisher=None, **kw):
        seen.setdefault("lq_fisher", []).append(fisher is not None)
        return lq_decompose(W, rank, fisher=fisher, **kw)

    monkeypatch.setattr(bitbudget, "measure", spy_measure)
    monkeypatch.setattr(quant, "lq_decompose", spy_lq)
    c = cfg(task="custom", custom=toy_task, model=tiny_model, method="sltrain", quantize="plan", init="lq",
            quantize_plan={"budget_bits": 6.0, "fisher_batches": 2}, peft={"r": 2, "sparsity": 0.1, "lq_max_iter": 1})
    data = gdata.load_run_data(c)
    built = gmodel.build_model(c, data.task, data.train)
    fisher_layers, lq_layers = seen["measure"]
    assert len(fisher_layers) == 12 and len(lq_layers) == 4  # every encoder linear weighed; L on query/value only
    assert seen["lq_fisher"] and all(seen["lq_fisher"])
    # the weights LQ used are recorded for the adapter folder, so a saved run reloads onto the same base
    assert sorted(built.model.peft_config["default"].lq_fisher) == sorted(lq_layers)
    with pytest.raises(GlueError, match="goes with budget_bits and without table"):
        gconfig.validate_config(cfg(task="sst2", method="sltrain", init="lq", quantize="plan",
                                    quantize_plan={"uniform": "bnb-nf4", "fisher_batches": 2}))


def is_finite_metric(res) -> bool:
    import math

    return all(math.isfinite(v) for m in res["final"].values() for v in m.values())


@pytest.mark.parametrize("mode", ["post", "cont", "in"])
def test_squeeze_from_a_recipe(tiny_model, toy_task, tmp_path, mode):
    extra = {"cont_steps": 2} if mode == "cont" else {}
    res = grun.run(cfg(task="custom", custom=toy_task, model=tiny_model, peft={"r": 4, "lora_alpha": 8},
                       max_steps=4, save_steps=0, learning_rate=1e-2, output_dir=str(tmp_path / mode),
                       squeeze={"mode": mode, "rank": 2, **extra}, verify_reload=True))
    assert res["method_results"]["reload"]["max_abs_difference"] < 1e-6  # checked before squeezing consumes it
    sq = res["method_results"]["squeeze"]
    assert sq["mode"] == mode and set(sq["ranks"].values()) == {2}
    assert sq["trainable_after"] < sq["trainable_before"]
    folder = Path(sq["adapter"]["path"])
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 2
    assert (tmp_path / mode / "adapter" / "adapter_model.safetensors").is_file()  # the trained r=4 adapter too
    if mode == "cont":
        assert "after_cont" in sq and folder.name == "adapter-cont"
    if mode == "in":
        # annealed 4 -> 2 during training, so squeezing at the end is exact: same metrics before and after
        assert [c["rank"] for c in sq["in_squeeze_cuts"]][-1] == 2
        for split, metrics in sq["before"].items():
            for k, v in metrics.items():
                if k != "loss":
                    assert abs(sq["after"][split][k] - v) < 1e-6, (k, v, sq["after"])
    if mode == "post":
        assert config["lora_alpha"] == 2  # scale 1 unless the recipe sets lora_alpha


@pytest.mark.parametrize("method, extra", [
    ("lora", {}),
    ("sltrain", {"quantize": "nf4"}),
    ("sora", {"quantize": "plan", "quantize_plan": {"uniform": "hqq-4bit-g64"}}),
    ("lora", {"quantize": "nf4", "init": "lq"}),
    ("dylora", {"quantize": "int8"}),
], ids=["lora", "sltrain-nf4", "sora-plan", "lora-lq", "dylora-int8"])
def test_verify_reload_and_plain_lora_export(tiny_model, toy_task, tmp_path, method, extra):
    """verify_reload: the saved adapter on a freshly built base (quantized as in the run, or rebuilt by LQ),
    evaluated by the run's Trainer, gives the trained model's metrics; export_lora_rank writes a plain LoRA of one
    rank with the head."""
    if extra.get("quantize") == "plan":
        pytest.importorskip("hqq")
    if extra.get("quantize"):
        pytest.importorskip("bitsandbytes")
    peft = {"r": 4, "lora_alpha": 8, "target_modules": ["query", "value"],
            **({"sparsity": 0.05} if method == "sltrain" else {})}
    res = grun.run(cfg(task="custom", custom=toy_task, model=tiny_model, method=method, peft=peft, max_steps=3,
                       save_steps=0, learning_rate=1e-2, output_dir=str(tmp_path / "run"), verify_reload=True,
                       export_lora_rank=2, **extra))
    reload = res["method_results"]["reload"]
    assert reload["max_abs_difference"] is not None and reload["max_abs_difference"] < 1e-6, reload
    export = res["method_results"]["lora_export"]
    config = json.loads((Path(export["path"]) / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 2 and "classifier" in config["modules_to_save"]


@pytest.mark.parametrize("mode", ["post", "in"])
def test_squeeze_rank_above_the_adapter_fails_before_training(tiny_model, toy_task, tmp_path, mode):
    """A LoRA of r=4 cannot be squeezed to rank 8: said when the adapter is built (a dry run too), not after
    training."""
    recipe = cfg(task="custom", custom=toy_task, model=tiny_model, peft={"r": 4, "lora_alpha": 8}, max_steps=2,
                 save_steps=0, output_dir=str(tmp_path / "run"), squeeze={"mode": mode, "rank": 8})
    with pytest.raises(GlueError, match="squeeze.rank=8: rank 8 is above what the adapter has"):
        grun.run(recipe, dry_run=True)
    with pytest.raises(GlueError, match="squeeze.rank=8"):
        grun.run(recipe)
    assert not (tmp_path / "run" / "adapter").exists()
    with pytest.raises(GlueError, match="export_lora_rank=8: rank 8 is above"):
        grun.run(dataclasses.replace(recipe, squeeze=None, export_lora_rank=8), dry_run=True)


@pytest.mark.parametrize("quantize,plan", [("nf4", None), ("plan", {"budget_bits": 6.0, "fisher_batches": 2})],
                         ids=["nf4", "plan-fisher"])
def test_peft_lora_with_lq_init_from_a_recipe(tiny_model, toy_task, tmp_path, quantize, plan):
    """method: lora with init: lq runs LQ-LoRA with PEFT's LoRA (sparse_lowrank_peft.get_lq_lora_model): the targets
    hold Q, the other encoder linears are quantized plainly, and the saved adapter reloads onto the same base."""
    pytest.importorskip("bitsandbytes")
    if plan:
        pytest.importorskip("hqq")
    import torch

    from glue import model as gmodel
    from sparse_lowrank_peft import load_lq_lora
    from sparse_lowrank_peft.delta.quant import dequantize_weight

    extra = {"quantize_plan": plan} if plan else {}
    c = cfg(task="custom", custom=toy_task, model=tiny_model, method="lora", quantize=quantize, init="lq",
            peft={"r": 2, "target_modules": ["query", "value"], "lq_svd": "randomized"}, max_steps=2, save_steps=0,
            output_dir=str(tmp_path / "l"), **extra)
    res = grun.run(c)
    info = res["method_results"]["quantization"]
    assert info.get("lq_layers") == 4 or len(info.get("plan", {})) == 12, info  # nf4: LQ errors; plan: every linear
    folder = tmp_path / "l" / "adapter"
    saved = json.loads((folder / "lq_lora.json").read_text())
    assert len(saved["targets"]) == 4 and len(saved["plan"]) == 12  # nf4: the uniform plan of the whole 4-bit base
    assert saved["svd"] == "randomized"  # the recipe's peft.lq_svd reaches get_lq_lora_model
    assert (saved.get("fisher_file") is not None) == bool(plan)
    assert is_finite_metric(res)
    data = gdata.load_run_data(c)
    trained = gmodel.build_model(c, data.task, data.train)  # the run's model before training (same seed)
    fresh, _, _ = gmodel.load_model_and_tokenizer(c, data.task)
    reloaded = load_lq_lora(fresh, str(folder))
    for key in saved["plan"]:  # every quantized linear, LQ's targets (under LoRA) and the rest
        a, b = (getattr(m, "base_layer", m) for m in (trained.model.base_model.model.get_submodule(key),
                                                      reloaded.base_model.model.get_submodule(key)))
        assert type(b).__name__ in ("Linear4bit", "HQQLinear"), (key, type(b))
        assert torch.equal(dequantize_weight(a), dequantize_weight(b)), key


@pytest.mark.parametrize("method,init,legacy,plan", [("sltrain", "default", False, None),
                                                     ("sltrain", "lq", True, None), ("lora", "default", False, None),
                                                     ("lora", "lq", True, None),
                                                     ("sltrain", "default", False, {"uniform": "hqq-4bit-g32"})],
                         ids=["sltrain-qlora", "sltrain-lq-old-folder", "lora-qlora", "lora-lq-old-folder",
                              "sltrain-hqq-plan"])
def test_eval_adapter_rebuilds_the_run_base(tiny_model, toy_task, tmp_path, method, init, legacy, plan):
    """bench/eval_adapter.py loads a run's adapter onto the 4-bit base the run trained on, also where the adapter does
    not record it (QLoRA style; LQ folders saved before adapters recorded the whole base): all 12 encoder linears are
    4-bit, and the reloaded model's dev loss is the run's final dev loss."""
    pytest.importorskip("bitsandbytes")
    if plan:
        pytest.importorskip("hqq")
    import torch
    from torch.utils.data import DataLoader
    from transformers import DataCollatorWithPadding

    base = {"quantize": "plan", "quantize_plan": plan} if plan else {"quantize": "nf4"}
    c = cfg(task="custom", custom=toy_task, model=tiny_model, method=method, init=init, **base,
            peft={"r": 2, "target_modules": ["query", "value"], **({"lq_max_iter": 2} if method != "lora" else {})},
            max_steps=2, save_steps=0, learning_rate=1e-2, output_dir=str(tmp_path / "run"))
    res = grun.run(c)
    folder = tmp_path / "run" / "adapter"
    if legacy:  # an LQ folder as saved before this change: it names only LQ's targets
        name = "lq_lora.json" if method == "lora" else "adapter_config.json"
        saved = json.loads((folder / name).read_text())
        saved["plan" if method == "lora" else "lq_plan"] = None
        (folder / name).write_text(json.dumps(saved))
    data = gdata.load_run_data(c)
    base, tokenizer, _ = gmodel.load_model_and_tokenizer(c, data.task)
    from test_bench_tools import _bench

    model = _bench("eval_adapter").load_adapter(base, str(folder)).eval()
    import bitsandbytes as bnb

    kinds = [bnb.nn.Linear4bit]
    if importlib.util.find_spec("hqq") is not None:
        from hqq.core.quantize import HQQLinear

        kinds.append(HQQLinear)
    quantized = [n for n, m in model.named_modules() if isinstance(m, tuple(kinds))]
    assert len(quantized) == 12, quantized  # (PEFT's LoRA wrapper of a 4-bit layer is no bnb Linear4bit)
    encoded = gdata.tokenize(data.evals["validation"], tokenizer, c.max_seq_len, "dev")
    losses = []
    with torch.no_grad():
        for batch in DataLoader(encoded, batch_size=16, collate_fn=DataCollatorWithPadding(tokenizer)):
            losses.append(torch.nn.functional.cross_entropy(model(**{k: v for k, v in batch.items() if k != "labels"})
                                                            .logits, batch["labels"], reduction="sum"))
    loss = float(sum(losses)) / len(encoded)
    assert loss == pytest.approx(res["final"]["validation"]["loss"], abs=1e-5), (loss, res["final"])
