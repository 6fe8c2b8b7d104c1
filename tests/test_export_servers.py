"""Exported LoRA folders as LoRA servers read them.

Servers do not agree on per-layer ranks: vLLM ignores ``rank_pattern`` / ``alpha_pattern`` and scales every layer by
``lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA); llama.cpp's converter keeps only ``lora_alpha`` and scales each layer
by ``lora_alpha / its tensor's rank``; PEFT applies the patterns. Each reading is emulated here from the folder's
files alone (base weights + scale·B·A). With ``uniform_rank=True`` all three give the source model's outputs; without
it, a folder with per-layer ranks is exact in PEFT, one of the servers is wrong, and the export warns.
"""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
from _builders import BUILDERS, output_of
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

from sparse_lowrank_peft import SoraConfig, export_to_lora
from sparse_lowrank_peft.cli import main as cli_main
from sparse_lowrank_peft.squeeze import adapter_folder_to_lora

TARGETS = ["lin0", "lin1"]


def sora_pruned(tmp_path):
    """SoRA with some gates closed and pruned: its layers keep 4 and 6 of 6 ranks."""
    pm = get_peft_model(BUILDERS["mlp"]()[0], SoraConfig(r=6, target_modules=TARGETS, init_weights=False)).eval()
    with torch.no_grad():
        pm.base_model.model.lin0.sora_gate["default"][:2] = 0
    assert pm.base_model.prune() == {"lin0": 4, "lin1": 6}
    return pm, lambda out, **kw: export_to_lora(pm, out, **kw)


def lora_patterns(tmp_path):
    """PEFT's LoRA with rank and alpha patterns and rsLoRA, exported with its own lora_alpha."""
    config = LoraConfig(r=5, lora_alpha=4, rank_pattern={"lin1": 2}, alpha_pattern={"lin1": 7}, use_rslora=True,
                        target_modules=TARGETS, init_lora_weights=False)
    pm = get_peft_model(BUILDERS["mlp"]()[0], config).eval()
    return pm, lambda out, **kw: export_to_lora(pm, out, lora_alpha=3.0, **kw)


def lora_folder(tmp_path):
    """The same LoRA saved, exported from its folder alone."""
    pm, _ = lora_patterns(tmp_path)
    pm.save_pretrained(tmp_path / "src")
    return pm, lambda out, **kw: adapter_folder_to_lora(tmp_path / "src", out, None, **kw)


SOURCES = {"sora-pruned": sora_pruned, "lora-patterns": lora_patterns, "lora-folder": lora_folder}


def served_output(folder, inputs, server: str) -> torch.Tensor:
    """The output of the base model with the folder's LoRA merged as ``server`` ("vllm", "llama.cpp") scales it."""
    cfg = json.loads((folder / "adapter_config.json").read_text())
    tensors = load_file(folder / "adapter_model.safetensors")
    model = BUILDERS["mlp"]()[0].eval()
    for key, A in tensors.items():
        if not key.endswith(".lora_A.weight"):
            continue
        B = tensors[key.replace(".lora_A.", ".lora_B.")]
        name = key[len("base_model.model."):-len(".lora_A.weight")]
        if server == "vllm":
            scale = cfg["lora_alpha"] / (math.sqrt(cfg["r"]) if cfg.get("use_rslora") else cfg["r"])
        else:
            scale = cfg["lora_alpha"] / A.shape[0]
        with torch.no_grad():
            model.get_submodule(name).weight += scale * (B.double() @ A.double()).float()
    with torch.no_grad():
        return output_of(model, inputs)


def export(source: str, tmp_path, uniform_rank: bool):
    pm, do_export = SOURCES[source](tmp_path)
    inputs = BUILDERS["mlp"]()[1](3)
    with torch.no_grad():
        expected = output_of(pm, inputs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        folder = do_export(tmp_path / "out", uniform_rank=uniform_rank)
    said = [str(w.message) for w in caught if "per-layer ranks" in str(w.message)]
    return folder, inputs, expected, said


@pytest.mark.parametrize("source", sorted(SOURCES))
def test_uniform_rank_reads_the_same_in_peft_vllm_and_llamacpp(source, tmp_path):
    folder, inputs, expected, said = export(source, tmp_path, uniform_rank=True)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    assert cfg["rank_pattern"] == {} and cfg["alpha_pattern"] == {} and not said
    tensors = load_file(folder / "adapter_model.safetensors")
    assert {t.shape[0] for k, t in tensors.items() if ".lora_A." in k} == {cfg["r"]}
    info = json.loads((folder / "export_info.json").read_text())
    assert info["stored_rank"] == cfg["r"] and len(set(info["ranks"].values())) == 2  # the real ranks, reported
    peft_out = output_of(PeftModel.from_pretrained(BUILDERS["mlp"]()[0], folder).eval(), inputs)
    for got in (peft_out, served_output(folder, inputs, "vllm"), served_output(folder, inputs, "llama.cpp")):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("source", sorted(SOURCES))
def test_per_layer_ranks_are_exact_in_peft_wrong_in_a_server_and_warned(source, tmp_path):
    folder, inputs, expected, said = export(source, tmp_path, uniform_rank=False)
    assert json.loads((folder / "adapter_config.json").read_text())["rank_pattern"]
    assert len(said) == 1 and "1 of 2 layers below" in said[0] and "uniform_rank=True" in said[0]
    peft_out = output_of(PeftModel.from_pretrained(BUILDERS["mlp"]()[0], folder).eval(), inputs)
    torch.testing.assert_close(peft_out, expected, atol=1e-5, rtol=0)
    errors = [(served_output(folder, inputs, s) - expected).abs().max().item() for s in ("vllm", "llama.cpp")]
    assert max(errors) > 1e-3, errors


def test_one_rank_already_needs_no_padding_and_no_warning(tmp_path):
    pm = get_peft_model(BUILDERS["mlp"]()[0], LoraConfig(r=4, target_modules=TARGETS, init_lora_weights=False))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plain = export_to_lora(pm, tmp_path / "plain")
        uniform = export_to_lora(pm, tmp_path / "uniform", uniform_rank=True)
    assert load_file(plain / "adapter_model.safetensors").keys() == load_file(uniform / "adapter_model.safetensors").keys()
    for name, t in load_file(plain / "adapter_model.safetensors").items():
        torch.testing.assert_close(load_file(uniform / "adapter_model.safetensors")[name], t, atol=0, rtol=0)


def test_cli_export_and_squeeze_take_uniform_rank(tmp_path, capsys):
    pm, _ = lora_patterns(tmp_path)
    pm.save_pretrained(tmp_path / "src")
    for command, extra in (("export", []), ("squeeze", ["--energy", "0.999"])):
        out = tmp_path / command
        assert cli_main([command, str(tmp_path / "src"), str(out), *extra, "--uniform-rank"]) == 0
        cfg = json.loads((out / "adapter_config.json").read_text())
        assert cfg["rank_pattern"] == {} and cfg["alpha_pattern"] == {}
        shapes = {t.shape[0] for k, t in load_file(out / "adapter_model.safetensors").items() if ".lora_A." in k}
        assert shapes == {cfg["r"]}
    capsys.readouterr()
