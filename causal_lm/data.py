"""Text files -> blocks of token ids for causal-LM fine-tuning (the model shifts the labels itself)."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch

from glue.errors import GlueError


class LMData(NamedTuple):
    train: list[dict]
    eval: list[dict]
    train_tokens: int
    source: str


def read_text(path: str) -> str:
    """The file's text; a clear error if it is not UTF-8 or empty."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise GlueError(f"'{path}' is not UTF-8 text ({e}). Convert it, e.g. iconv -t UTF-8.") from e
    if not text.strip():
        raise GlueError(f"'{path}' is empty: give a text file to train on.")
    return text


def token_ids(text: str, tokenizer) -> torch.Tensor:
    """The text as one stream of ids: the tokenizer's (no special tokens between chunks), or its UTF-8 bytes."""
    if tokenizer is None:
        return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


def blocks(ids: torch.Tensor, size: int, limit: int | None, what: str) -> list[dict]:
    """Consecutive, non-overlapping blocks of ``size`` ids (the tail shorter than a block is dropped)."""
    count = len(ids) // size
    if count == 0:
        raise GlueError(f"{what} has {len(ids)} tokens, fewer than block_size={size}: there is not one block. "
                        f"Give more text or a smaller block_size (e.g. block_size={max(1, len(ids) // 2)}).")
    chunks = ids[: count * size].view(count, size)[:limit]
    return [{"input_ids": c, "labels": c} for c in chunks]


def load_data(cfg, tokenizer) -> LMData:
    """Training and validation blocks of the recipe: ``eval_file``, else the last ``eval_fraction`` of
    ``train_file`` (split on token ids, so no block straddles the two)."""
    train_ids = token_ids(read_text(cfg.train_file), tokenizer)
    if cfg.eval_file:
        eval_ids, source = token_ids(read_text(cfg.eval_file), tokenizer), f"{cfg.train_file} + {cfg.eval_file}"
    else:
        split = int(len(train_ids) * (1.0 - cfg.eval_fraction))
        train_ids, eval_ids = train_ids[:split], train_ids[split:]
        source = f"{cfg.train_file} (last {cfg.eval_fraction:.0%} held out)"
    train = blocks(train_ids, cfg.block_size, cfg.max_train_blocks, f"train_file '{cfg.train_file}'")
    evals = blocks(eval_ids, cfg.block_size, cfg.max_eval_blocks, "the validation text")
    return LMData(train, evals, len(train) * cfg.block_size, source)
