"""The causal-LM runner's model: the base (optionally 4-bit, or LQ-split), the method's adapter on every linear."""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from glue import model as glue_model
from glue.errors import GlueError

from causal_lm.config import TINY_MODEL, LMRunConfig

HEAD = ["lm_head"]  # never quantized, never adapted (all-linear leaves it out too)


@dataclass
class BuiltLM:
    model: Any
    path: str
    quant_info: dict | None
    params: tuple[int, int]


def tiny_llama() -> str:
    """A 2-layer LLaMA over bytes (vocabulary 256), random from seed 0, built once into the cache folder
    (``$SLPEFT_CACHE``, default ``~/.cache/sparse_lowrank_peft``; written to a temporary folder and renamed, so a
    reader never sees half of it). Widths are multiples of 64 as in real LLMs: bitsandbytes' AVX-512-BF16 eval
    kernel asserts on others (docs/quantized.md)."""
    cache = Path(os.environ.get("SLPEFT_CACHE") or Path.home() / ".cache" / "sparse_lowrank_peft")
    folder = cache / f"{TINY_MODEL}-v1"
    if not (folder / "config.json").is_file():
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
        cache.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{TINY_MODEL}-", dir=cache))
        LlamaForCausalLM(config).save_pretrained(staging)
        try:
            staging.rename(folder)
        except OSError:  # built meanwhile by another process: keep that one
            shutil.rmtree(staging, ignore_errors=True)
    return str(folder)


def model_path(cfg: LMRunConfig) -> str:
    """What ``from_pretrained`` takes: the recipe's model, or the tiny model's cached folder."""
    return tiny_llama() if cfg.model == TINY_MODEL else cfg.model


def load_tokenizer(cfg: LMRunConfig, path: str):
    """The tokenizer (None for the byte-level tiny model unless the recipe names one)."""
    if cfg.model == TINY_MODEL and not cfg.tokenizer:
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(cfg.tokenizer or path)
    except (OSError, ValueError) as e:
        raise GlueError(f"Could not load the tokenizer of '{cfg.tokenizer or cfg.model}': {e}. Give a folder with "
                        "tokenizer files or a hub id (which needs network access or a warm cache).") from e


def run_device(device=None):
    """This process's device (from ``TrainingArguments``), default the GPU when there is one."""
    import torch

    return torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")


def build_device(cfg: LMRunConfig, device=None):
    """Where the base is quantized: on the run's device, except a bit-budget plan, whose HQQ layers are quantized
    on the CPU (``delta.bitbudget``: one thread, so every machine derives the same codes) and moved afterwards."""
    import torch

    return torch.device("cpu") if cfg.quantize == "plan" else run_device(device)


def load_base(cfg: LMRunConfig, path: str, device=None):
    """The causal LM in ``precision``, on ``device`` (:func:`run_device` when None)."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.precision]
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except (OSError, ValueError, KeyError) as e:
        raise GlueError(f"Could not load causal LM '{cfg.model}' ({path}): {type(e).__name__}: {e}. Give a folder "
                        "with config.json and weights; a hub id needs network access or a warm cache.") from e
    return model.to(run_device(device))


def check_vocabulary(cfg: LMRunConfig, tokenizer, path: str) -> None:
    """Every id the tokenizer can produce has a row in the model's embedding (a larger tokenizer fails deep in the
    first forward: an IndexError on a CPU, a device-side assert on a GPU)."""
    if tokenizer is None:
        return
    from transformers import AutoConfig

    size = getattr(AutoConfig.from_pretrained(path), "vocab_size", None)
    if size is not None and len(tokenizer) > size:
        raise GlueError(f"The tokenizer of '{cfg.tokenizer or cfg.model}' has {len(tokenizer)} tokens, the model "
                        f"'{cfg.model}' embeds {size}: they do not belong together. Fix: the model's own tokenizer "
                        "(tokenizer=null), or a model whose vocabulary covers it.")


def check_block_size(cfg: LMRunConfig, path: str) -> None:
    """A block must fit the model's positions (read from its config, before any data or weights are loaded)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise GlueError(f"Could not read the config of causal LM '{cfg.model}' ({path}): {e}. Give a folder with "
                        "config.json and weights; a hub id needs network access or a warm cache.") from e
    limit = getattr(config, "max_position_embeddings", None)
    if limit is not None and cfg.block_size > limit:
        raise GlueError(f"block_size={cfg.block_size} exceeds the model's max_position_embeddings={limit}. "
                        f"Fix: block_size={limit} or less.")


def build_model(cfg: LMRunConfig, path: str, data, device=None) -> BuiltLM:
    """Base, quantized base (``quantize``: 4-bit, or a bit-budget plan measured here; with ``init: lq`` the adapter
    quantizes its targets to ``Q`` itself), adapter: the GLUE runner's steps (``glue.model.prepare_base``) on a
    causal LM. The first training batches of ``data`` (``causal_lm.data.LMData``) calibrate a Fisher-weighted or
    output-change plan.
    Everything random comes from the seed."""
    from transformers import set_seed

    set_seed(cfg.seed)
    model = load_base(cfg, path, build_device(cfg, device))
    names = glue_model.quantizable_linears(model, HEAD) if cfg.quantize else []
    plan, fisher, quant_info = glue_model.prepare_base(
        cfg, model, names, lambda n: calibration(cfg, data, n, model.device))
    if cfg.gradient_checkpointing:  # non-reentrant: no input-grad hook needed, no torch warning
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    config = glue_model.make_peft_config(cfg.method, glue_model.adapter_fields(cfg, plan, names), head_modules=[],
                                         task_type="CAUSAL_LM")
    peft_model = glue_model.with_fisher(fisher, glue_model.wrap_model, cfg, model, config, plan)
    quant_info = glue_model.adapter_base_info(cfg, peft_model, names, plan, quant_info)
    peft_model.to(run_device(device))
    return BuiltLM(peft_model, path, quant_info, glue_model.count_parameters(peft_model))


def calibration(cfg: LMRunConfig, data, n_batches: int, device) -> list[dict]:
    """The first ``n_batches`` training batches of ``train_batch_size`` examples, collated as in training, on
    ``device``."""
    size, train = cfg.train_batch_size, data.train
    batches = [data.collate(train[i:i + size]) for i in range(0, min(n_batches * size, len(train)), size)]
    return [{k: v.to(device) for k, v in b.items()} for b in batches]
