"""The recipe schema (glue/config.py): OmegaConf merges the recipe and the command line's overrides over the
dataclass; unknown fields name the closest valid one; values, the task, the method and its fields are checked before
any data or model is loaded."""

import json
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from glue import config as gconfig  # noqa: E402
from glue import run as grun  # noqa: E402
from glue.errors import GlueError  # noqa: E402

RECIPE = REPO_ROOT / "recipes" / "minilm" / "lora-sst2.yaml"


def cfg(**values) -> gconfig.RunConfig:
    base = {"max_seq_len": 32, "train_batch_size": 8, "eval_batch_size": 16, "logging_steps": 2, "num_threads": 1}
    base.update(values)
    return gconfig.config_from_mapping(base)


class NoModel:
    """Stands in for glue.model.build_model: fails the test if a model is loaded."""

    def __call__(self, *args, **kwargs):
        raise AssertionError("the model was loaded although the configuration is invalid")


@pytest.mark.parametrize(
    "values, message",
    [
        ({"task": "sst3"}, "Unknown task 'sst3'"),
        ({"task": "rte", "learning_rat": 1e-3}, "Unknown recipe field 'learning_rat'.*Did you mean 'learning_rate'"),
        ({"task": "rte", "method": "sltrian"}, "Unknown method 'sltrian'"),
        ({"task": "rte", "peft": {"rank": 8}}, r"peft.rank is not a field of LoraConfig"),
        ({"task": "rte", "peft": {"r": 8, "task_type": "CAUSAL_LM"}}, r"task_type is set by the runner \(SEQ_CLS\)"),
        ({"task": "rte", "method": "full", "peft": {"r": 8}}, "full fine-tuning trains every weight"),
        ({"task": "rte", "max_seq_len": "long"}, "'max_seq_len' is 'long'"),
        ({"task": "rte", "eval_strategy": "sometimes"}, "must be one of"),
        ({"task": "rte", "warmup_ratio": 6}, "must be in \\[0, 1\\)"),
        ({"task": "rte", "lr_scheduler_type": True}, "YAML reads unquoted yes/no/on/off/true/false as booleans"),
        ({"task": "custom"}, "no 'custom:' mapping"),
        ({"task": "rte", "method": "full", "export_lora_rank": 8}, "export_lora_rank needs an adapter method"),
        ({"task": "rte", "export_lora_rank": 0}, "'export_lora_rank' is 0"),
        ({}, "sets no 'task'"),
        ({"task": "rte", "optim": "adamw_torhc"}, "'adamw_torhc', which is no transformers optimizer.*adamw_torch"),
        ({"task": "sst2", "method": "sltrain", "init": "lq", "quantize": "plan",
          "quantize_plan": {"budget_bits": float("nan")}}, "must be a positive number of bits"),
        ({"task": "sst2", "method": "sltrain", "init": "lq", "quantize": "plan",
          "quantize_plan": {"budget_bits": 1.5, "table": "bench/results/bitbudget-minilm.json"}},
         r"below the cheapest plan of bench/results/bitbudget-minilm.json \(2\.\d+ bits"),
    ],
)
def test_bad_recipes_fail_with_clear_messages(values, message):
    with pytest.raises(GlueError, match=message):
        gconfig.config_from_mapping(values)


def test_a_null_key_in_quantize_plan_drops_the_recipes_value():
    """Mappings merge key by key, so ``quantize_plan.table=null`` is how an override drops a recipe's table: it
    then measures in the run (it raised a TypeError)."""
    cfg = gconfig.config_from_mapping({"task": "sst2", "method": "sltrain", "init": "lq", "quantize": "plan",
                                       "quantize_plan": {"budget_bits": 3, "table": None}})
    assert cfg.quantize_plan == {"budget_bits": 3}


def test_overrides_that_change_the_run_do_not_overwrite_the_recipes_record(capsys, tmp_path):
    """A recipe's ``results_path`` is a committed file of record: a run with ``max_train_samples=64`` (or another
    seed) must not overwrite it, while an override of where the run writes or reads keeps it."""
    recipe = REPO_ROOT / "recipes" / "minilm" / "nola-sst2.yaml"
    assert gconfig.build_config(str(recipe)).results_path == "bench/results/glue/minilm-nola-sst2.json"
    assert gconfig.build_config(str(recipe), [f"output_dir={tmp_path}", "num_threads=2"]).results_path is not None
    assert gconfig.build_config(str(recipe), ["max_train_samples=64"]).results_path is None
    assert "not writing the recipe's results_path" in capsys.readouterr().err
    mine = str(tmp_path / "mine.json")
    assert gconfig.build_config(str(recipe), ["seed=1", f"results_path={mine}"]).results_path == mine


def test_unquoted_yaml_no_is_the_string_no():
    """`eval_strategy: no` in YAML (or eval_strategy=no on the command line) parses as False; it means "no"."""
    assert gconfig.config_from_mapping({"task": "rte", "eval_strategy": False}).eval_strategy == "no"



def test_quantize_plan_fields_are_checked_before_loading(tmp_path):
    for bad, match in [({"quantize": "plan"}, "quantize: plan and quantize_plan go together"),
                       ({"quantize": "plan", "quantize_plan": {"budget_bits": 3, "uniform": "bnb-nf4"}},
                        "exactly one of budget_bits"),
                       ({"quantize": "plan", "quantize_plan": {"uniform": "int3"}}, "quantization configuration"),
                       ({"quantize": "plan", "quantize_plan": {"budget_bits": 3, "table": str(tmp_path / "none")}},
                        "is not a file"),
                       ({"quantize": "plan", "quantize_plan": {"budget_bits": 3, "candidates": ["hqq-5bit-g64"]}},
                        "quantize_plan.candidates"),
                       ({"quantize": "plan", "quantize_plan": {"uniform": "bnb-nf4", "candidates": ["bnb-nf4"]}},
                        "goes with budget_bits and without table"),
                       ({"quantize": "plan", "quantize_plan": {"budget_bits": 3, "fisher_batches": 0}},
                        "positive whole number"),
                       ({"quantize": "plan", "quantize_plan": {"budget_bits": 3, "output_batches": 1.5}},
                        "output_batches=1.5 must be a positive whole number"),
                       ({"quantize": "plan", "quantize_plan": {"budget_bits": 3, "output_batches": 2,
                                                               "fisher_batches": 2}}, "two objectives"),
                       ({"quantize": "plan", "quantize_plan": {"budget_bits": 3, "output_batches": 2,
                                                               "table": "bench/results/bitbudget-minilm.json"}},
                        "output_batches shapes the errors the run measures itself")]:
        with pytest.raises(GlueError, match=match):
            gconfig.validate_config(cfg(task="sst2", method="sltrain", init="lq", **bad))


@pytest.mark.parametrize(
    "values, message",
    [
        ({"method": "sltrain", "init": "lq"}, "needs quantize: nf4"),
        ({"method": "sltrain", "init": "lq", "quantize": "int8"}, "needs quantize: nf4 .*quantize is int8"),
        ({"method": "full", "quantize": "nf4"}, "cannot be trained"),
        ({"method": "nola", "quantize": "nf4", "init": "lq"}, "init: lq is implemented for PEFT's LoRA .* not for 'nola'"),
        ({"method": "randlora", "quantize": "nf4", "init": "lq"}, "not for 'randlora'"),
        ({"quantize": "int3"}, "must be one of"),
        ({"method": "sltrain", "squeeze": {"mode": "in", "rank": 2}}, "In-Squeeze"),
        ({"squeeze": {"mode": "post"}}, "exactly one of rank"),
        ({"squeeze": {"mode": "post", "rank": 2, "rnak": 3}}, "unknown squeeze field"),
        ({"method": "full", "squeeze": {"rank": 2}}, "has none"),
    ],
)
def test_quantize_and_squeeze_errors(values, message):
    with pytest.raises(GlueError, match=message):
        gconfig.config_from_mapping({"task": "rte", **values})


# ---------------------------------------------------------------------------------------------------------------
# recipe + command line -> RunConfig (OmegaConf)


def test_the_schema_is_an_omegaconf_structured_config_of_the_dataclass():
    from omegaconf import OmegaConf

    schema = OmegaConf.structured(gconfig.RunConfig)
    assert list(schema) == list(gconfig.FIELDS)
    assert schema.learning_rate == 5e-4 and schema.peft == {} and schema.quantize_plan is None
    listing = gconfig.list_fields()  # the help strings stay with the fields
    assert "learning_rate" in listing and "peak learning rate (AdamW)" in listing


def test_overrides_peft_r_learning_rate_and_max_train_samples():
    recipe = gconfig.build_config(str(RECIPE))
    assert recipe.peft["r"] == 8 and recipe.learning_rate == 1e-3 and recipe.max_train_samples == 4000
    path, overrides, flags = gconfig.parse_cli([str(RECIPE), "peft.r=16", "learning_rate=1e-4",
                                                "--max-train-samples", "500", "--dry-run"])
    assert overrides == ["peft.r=16", "learning_rate=1e-4", "max_train_samples=500"] and flags["dry_run"]
    cfg_ = gconfig.build_config(path, overrides)
    # peft.r replaces one field of the recipe's peft mapping and keeps the others
    assert cfg_.peft == {**recipe.peft, "r": 16}
    assert cfg_.learning_rate == 1e-4 and isinstance(cfg_.learning_rate, float)
    assert cfg_.max_train_samples == 500 and isinstance(cfg_.max_train_samples, int)
    assert {k: v for k, v in cfg_.to_dict().items() if k not in ("peft", "learning_rate", "max_train_samples")} == \
        {k: v for k, v in recipe.to_dict().items() if k not in ("peft", "learning_rate", "max_train_samples")}


def test_override_values_are_yaml():
    cfg_ = gconfig.build_config(str(RECIPE), ["peft.target_modules=[query,key,value]", "max_eval_samples=null",
                                              "eval_strategy=no", "seed=3",
                                              "squeeze={mode: post, rank: 4}"])
    assert cfg_.peft["target_modules"] == ["query", "key", "value"] and cfg_.max_eval_samples is None
    assert cfg_.eval_strategy == "no" and cfg_.seed == 3 and cfg_.squeeze == {"mode": "post", "rank": 4}
    assert gconfig.build_config(None, ["task=rte", "overwrite_output_dir=true"]).overwrite_output_dir is True


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["learning_rate=fast"], r"'learning_rate' is 'fast' \(override 'learning_rate=fast'\) but must be a float"),
        (["max_steps=2.5"], "'max_steps' is 2.5 .* but must be an int"),
        (["peft=8"], "'peft' is 8"),
        (["=3"], "not of the form field=value"),
        (["peft.r=[1"], "not valid YAML"),
        (["lr_scheduler_type=yes"], "YAML reads unquoted yes/no"),
        (["peft.r=16", "learnig_rate=1e-4"], "Unknown recipe field 'learnig_rate' \\(override 'learnig_rate=1e-4'\\)."
                                             " Did you mean 'learning_rate'"),
    ],
)
def test_bad_overrides_name_the_field(overrides, message):
    with pytest.raises(GlueError, match=message):
        gconfig.build_config(str(RECIPE), overrides)


def test_a_misspelled_field_fails_before_the_model_is_loaded(tmp_path, monkeypatch, capsys):
    """``learnig_rate`` in a recipe or on the command line: exit 2 naming it and ``learning_rate``; no data, no
    model."""
    from glue import data as gdata
    from glue import model as gmodel

    monkeypatch.setattr(gmodel, "load_model_and_tokenizer", NoModel())
    monkeypatch.setattr(grun, "build_model", NoModel())
    monkeypatch.setattr(grun, "load_run_data", NoModel())
    monkeypatch.setattr(gdata, "load_glue", NoModel())
    recipe = tmp_path / "typo.yaml"
    recipe.write_text(RECIPE.read_text().replace("learning_rate:", "learnig_rate:"))
    assert grun.main([str(recipe), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert f"Unknown recipe field 'learnig_rate' (recipe {recipe}). Did you mean 'learning_rate'?" in err
    assert grun.main([str(RECIPE), "learnig_rate=1e-4"]) == 2
    assert "Did you mean 'learning_rate'?" in capsys.readouterr().err
    assert grun.main([str(RECIPE), "--learnig-rate", "1e-4"]) == 2
    assert "Did you mean '--learning-rate'?" in capsys.readouterr().err


SHARED_GLUE = (REPO_ROOT / ".." / "shared" / "glue").resolve()


@pytest.mark.skipif(not (SHARED_GLUE / "SST-2" / "train.tsv").is_file(), reason=f"SST-2 not found at {SHARED_GLUE}")
def test_command_line_overrides_reach_the_run(capsys):
    """``python -m glue.run recipes/minilm/lora-sst2.yaml peft.r=16 learning_rate=1e-4 --max-train-samples 500
    --dry-run`` on the real SST-2: 500 training examples, and LoRA r=16's trainable parameters."""
    argv = [str(RECIPE), f"data_dir={SHARED_GLUE}", "--dry-run"]
    assert grun.main(argv) == 0
    out = capsys.readouterr().out
    r8 = json.loads(out[out.index("\n{") + 1:])
    assert grun.main([*argv, "peft.r=16", "learning_rate=1e-4", "--max-train-samples", "500"]) == 0
    out = capsys.readouterr().out
    r16 = json.loads(out[out.index("\n{") + 1:])
    assert r8["train_examples"] == 4000 and r16["train_examples"] == 500
    # query and value of 6 layers, 384 x 384: r (384 + 384) more parameters per matrix for each rank step
    assert r16["params"]["trainable"] - r8["params"]["trainable"] == 12 * 8 * (384 + 384)


def test_output_folder_checks(tmp_path):
    """An output_dir that is a file is named as such (and never deleted); ``--resume`` of a run that already finished
    is refused (it trained nothing and rewrote results.json with a train_loss of 0.0)."""
    from glue import train as gtrain

    a_file = tmp_path / "afile"
    a_file.write_text("keep me")
    for overwrite in (False, True):
        with pytest.raises(GlueError, match="is a file, not a folder"):
            gtrain.prepare_output_dir(cfg(task="rte", overwrite_output_dir=overwrite), a_file, resume=False)
    assert a_file.read_text() == "keep me"
    out = tmp_path / "run"
    ckpt = out / "checkpoint-8"
    ckpt.mkdir(parents=True)
    (ckpt / gtrain.PROGRESS_FILE).write_text("{}")
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": 8, "max_steps": 16}))
    assert gtrain.prepare_output_dir(cfg(task="rte", save_steps=4), out, resume=True) == ckpt  # interrupted: resumes
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": 16, "max_steps": 16}))
    (out / "results.json").write_text("{}")
    with pytest.raises(GlueError, match="already finished \\(step 16 of 16\\).*Nothing to resume"):
        gtrain.prepare_output_dir(cfg(task="rte", save_steps=4), out, resume=True)


def test_head_modules_must_name_modules_of_the_model():
    """PEFT ignores a modules_to_save name that matches nothing: the head stayed frozen at its random start."""
    from _builders import BUILDERS
    from glue.model import check_head_modules

    model = BUILDERS["bert"]()[0]
    assert check_head_modules(model, ["pooler", "classifier"]) == ["pooler", "classifier"]
    with pytest.raises(GlueError, match=r"head_modules \['nothere'\] name no module of BertForSequenceClassification.*"
                                        r"e.g. \['pooler', 'classifier'\]"):
        check_head_modules(model, ["classifier", "nothere"])


def test_model_dependent_recipe_errors_are_recipe_errors():
    """What only the loaded model can tell is still reported as a recipe error, before training: target_modules
    matching nothing (PEFT's traceback before), a max_seq_len beyond the model's positions (accepted before)."""
    from _builders import BUILDERS
    from glue.model import _check_seq_len, make_peft_config, wrap_model
    from transformers import BertConfig, RobertaConfig

    config = cfg(task="rte", method="sltrain")
    peft_config = make_peft_config("sltrain", {"r": 2, "target_modules": ["nothere"]}, ["classifier"])
    with pytest.raises(GlueError, match="peft.target_modules"):
        wrap_model(config, BUILDERS["bert"]()[0], peft_config, None)
    _check_seq_len(512, BertConfig())
    with pytest.raises(GlueError, match="max_seq_len=513 is longer than the model's 512 positions"):
        _check_seq_len(513, BertConfig())
    with pytest.raises(GlueError, match="max_seq_len=513 is longer than the model's 512 positions \\(roberta\\)"):
        _check_seq_len(513, RobertaConfig(max_position_embeddings=514))
