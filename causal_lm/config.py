"""The recipe schema of the causal-LM runner: :class:`LMRunConfig`, read like a GLUE recipe.

Defaults, then the YAML recipe, then ``field=value`` overrides (OmegaConf; ``glue.config.read_recipe``), then
:func:`validate_config`, which checks values, files, the method and its PEFT fields before any model is loaded.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

from glue import model as glue_model
from glue.config import _f, _fm, check_choices, read_recipe, validate_quantize, validate_squeeze
from glue.errors import GlueError

TINY_MODEL = "tiny-llama"


@dataclass
class LMRunConfig:
    """Every field a causal-LM recipe may set; ``python -m causal_lm.run --list-fields`` prints them."""

    TOOL = "causal_lm.run"  # not a field: the module named in error messages

    # what to train
    model: str = _f(TINY_MODEL, "causal-LM checkpoint: a folder or hub id, or 'tiny-llama' (a random 2-layer LLaMA "
                                "over bytes, built offline: for smoke runs and tests)")
    tokenizer: Optional[str] = _f(None, "tokenizer folder or hub id (default: the model's; tiny-llama reads bytes)")
    method: str = _f("sltrain", "'lora' (PEFT LoraConfig), another PEFT baseline, or a tuner of sparse_lowrank_peft "
                                "(sltrain, sora, dylora, nola, sparse_randlora)")
    peft: Dict[str, Any] = _fm(lambda: {"target_modules": "all-linear"},
                               "config fields of the method's PeftConfig (r, lora_alpha, ...); target_modules "
                               "defaults to all-linear (lm_head excluded), task_type is CAUSAL_LM")
    quantize: Optional[str] = _f(None, "quantized base (QLoRA): nf4 or fp4 quantizes every linear but lm_head to "
                                       "4-bit with bitsandbytes (double quantization) after loading, int8 to LLM.int8 "
                                       "(load_in_8bit's layers); plan: one configuration per matrix from "
                                       "quantize_plan (LQ-LoRA's bit budget); null: the base as loaded",
                                 choices=(None, "nf4", "fp4", "int8", "plan"))
    quantize_plan: Optional[Dict[str, Any]] = _f(None, "for quantize: plan -- budget_bits (average stored bits per "
                                                       "parameter; an integer program picks each matrix's "
                                                       "configuration) or uniform (e.g. hqq-3bit-g64), and "
                                                       "[fisher_batches] (weigh the errors by the Fisher of that many "
                                                       "training batches), [output_batches], [candidates], [table] "
                                                       "(as in the GLUE runner: python -m glue.run --list-fields)")
    init: str = _f("default", "adapter initialisation: default (the method's own) or lq (LQ-LoRA: W = Q + L, the "
                              "adapter starts from L; needs quantize)", choices=("default", "lq"))
    # data
    train_file: Optional[str] = _f(None, "UTF-8 text file to fine-tune on (one stream, cut into blocks), or a .jsonl "
                                         "file of documents (their text_field, each ended by the end-of-text token)")
    eval_file: Optional[str] = _f(None, "text or .jsonl file for validation perplexity (default: the last "
                                        "eval_fraction of train_file, kept out of training)")
    text_field: str = _f("text", "the field holding each document's text in a .jsonl file")
    prompt_field: Optional[str] = _f(None, "instruction data: the .jsonl field holding each record's prompt; the "
                                           "model learns the completion only (prompt tokens carry no loss), one "
                                           "padded example per record, cut to block_size (null: text blocks)")
    completion_field: str = _f("completion", "with prompt_field: the field holding each record's completion")
    eval_fraction: float = _f(0.1, "share of train_file held out for validation when eval_file is not given")
    block_size: int = _f(256, "tokens per training and validation sequence")
    max_train_blocks: Optional[int] = _f(None, "train on at most this many blocks (the first ones)")
    max_eval_blocks: Optional[int] = _f(64, "validate on at most this many blocks (null: all)")
    # optimisation
    learning_rate: float = _f(2e-4, "peak learning rate (AdamW)")
    max_steps: int = _f(-1, "total optimizer steps; overrides num_train_epochs when > 0")
    num_train_epochs: float = _f(1.0, "epochs over the training blocks (when max_steps <= 0)")
    train_batch_size: int = _f(8, "blocks per device per step")
    eval_batch_size: int = _f(8, "blocks per device per validation step")
    gradient_accumulation_steps: int = _f(1, "micro-batches per optimizer step")
    warmup_ratio: float = _f(0.05, "fraction of the steps with linear warm-up, in [0, 1)")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    lr_scheduler_type: str = _f("cosine", "transformers scheduler name: cosine, linear, constant_with_warmup, ...")
    max_grad_norm: float = _f(1.0, "gradient clipping norm (0 disables)")
    seed: int = _f(0, "seed of initialisation, dropout and data order")
    precision: str = _f("fp32", "fp32, bf16 or fp16: the base's dtype and mixed precision (fp16 needs a GPU)",
                        choices=("fp32", "bf16", "fp16"))
    gradient_checkpointing: bool = _f(False, "recompute activations in backward (non-reentrant) to save memory")
    # evaluation, checkpoints, output
    eval_steps: Optional[int] = _f(None, "also validate every this many steps (null: before and after training)")
    logging_steps: int = _f(10, "log the training loss every this many steps")
    save_steps: int = _f(0, "write a checkpoint every this many steps (0: none; --resume needs them)")
    num_threads: Optional[int] = _f(None, "torch CPU threads (default: torch's choice)")
    export_lora_rank: Optional[int] = _f(None, "also write a plain PEFT LoRA of this one rank to <output_dir>/lora "
                                               "(sparse_lowrank_peft.export_to_lora, uniform_rank: what vLLM and "
                                               "llama.cpp load)")
    squeeze: Optional[Dict[str, Any]] = _f(None, "LoRA-Squeeze after (post, cont) or during (in, method lora) "
                                                 "training: mapping with mode, rank or energy, [lora_alpha], "
                                                 "[cont_steps, cont_learning_rate], [in_start, in_end, in_stages]; "
                                                 "the squeezed LoRA in <output_dir>/adapter-squeezed (or "
                                                 "adapter-cont), for the trained base "
                                                 "(sparse_lowrank_peft.squeeze.SqueezeSpec)")
    verify_reload: bool = _f(False, "after saving, load the adapter onto a freshly built base and record its "
                                    "validation loss (it must equal the trained model's)")
    output_dir: Optional[str] = _f(None, "run folder (default: runs/lm/<model>/<method>)")
    overwrite_output_dir: bool = _f(False, "delete an existing, non-empty output_dir first (otherwise an error)")
    notes: Optional[str] = _f(None, "free text kept in the results")


def build_config(recipe: str | None, overrides: Sequence[str] = ()) -> LMRunConfig:
    """Recipe file + ``field=value`` overrides -> a validated :class:`LMRunConfig` (raises :class:`GlueError`)."""
    cfg = read_recipe(LMRunConfig, recipe, overrides)
    validate_config(cfg)
    return cfg


def validate_config(cfg: LMRunConfig) -> None:
    """Check what types alone do not: choices, ranges, files, the method and its fields -- before loading."""
    check_choices(cfg)
    _validate_numbers(cfg)
    _validate_files(cfg)
    _validate_method(cfg)


def _validate_numbers(cfg: LMRunConfig) -> None:
    positive = ("block_size", "train_batch_size", "eval_batch_size", "gradient_accumulation_steps", "logging_steps",
                "max_train_blocks", "max_eval_blocks", "eval_steps", "export_lora_rank", "num_threads")
    for name in positive:
        value = getattr(cfg, name)
        if value is not None and value <= 0:
            raise GlueError(f"Recipe field '{name}' is {value}; it must be a positive integer (or null if optional).")
    if not (0.0 < cfg.eval_fraction < 1.0):
        raise GlueError(f"eval_fraction is {cfg.eval_fraction}; it must be in (0, 1), e.g. 0.1.")
    if not (0.0 <= cfg.warmup_ratio < 1.0):
        raise GlueError(f"warmup_ratio is {cfg.warmup_ratio}; it must be in [0, 1).")
    if not (cfg.learning_rate > 0 and math.isfinite(cfg.learning_rate)):
        raise GlueError(f"learning_rate is {cfg.learning_rate}; it must be a positive number.")
    if cfg.max_steps <= 0 and cfg.num_train_epochs <= 0:
        raise GlueError("Neither max_steps nor num_train_epochs is positive: set one (e.g. max_steps=200).")
    if cfg.save_steps < 0:
        raise GlueError(f"save_steps is {cfg.save_steps}; it must be 0 (no checkpoints) or positive.")


def _validate_files(cfg: LMRunConfig) -> None:
    if not cfg.train_file:
        raise GlueError("The recipe sets no 'train_file'. Add a UTF-8 text file, e.g. train_file=corpus.txt.")
    for name in ("train_file", "eval_file"):
        path = getattr(cfg, name)
        if path and not Path(path).is_file():
            raise GlueError(f"{name} '{path}' does not exist (relative paths are from {Path.cwd()}). "
                            "Give the path of a UTF-8 text file.")
        if path and cfg.prompt_field and not path.endswith(".jsonl"):
            raise GlueError(f"prompt_field '{cfg.prompt_field}' reads prompt/completion records from JSON Lines, but "
                            f"{name} '{path}' is no .jsonl file. Fix: a .jsonl file, or prompt_field=null for text.")


def _validate_method(cfg: LMRunConfig) -> None:
    if cfg.method == "full":
        raise GlueError("method 'full' is not offered by the causal-LM runner (it trains adapters). Use 'lora' or a "
                        "tuner of sparse_lowrank_peft.")
    if cfg.quantize and importlib.util.find_spec("bitsandbytes") is None and cfg.quantize != "plan":
        raise GlueError(f"quantize: {cfg.quantize} needs bitsandbytes, which is not installed. Fix: "
                        "pip install 'sparse-lowrank-peft[bnb]', or quantize=null.")
    validate_quantize(cfg)
    validate_squeeze(cfg)
    glue_model.make_peft_config(cfg.method, glue_model.effective_peft_fields(cfg), head_modules=[],
                                task_type="CAUSAL_LM")
