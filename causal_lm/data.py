"""Text files (plain, or JSON Lines of documents) -> blocks of token ids for causal-LM fine-tuning (the model shifts
the labels itself)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import torch

from glue.errors import GlueError


class LMData(NamedTuple):
    train: list[dict]
    eval: list[dict]
    train_tokens: int
    source: str


def read_documents(path: str, text_field: str) -> list[str]:
    """The documents of a JSON Lines file: each line's ``text_field`` (a clear error naming the line otherwise)."""
    docs = []
    for number, line in enumerate(read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise GlueError(f"'{path}' line {number} is not JSON ({e.msg}). A .jsonl file holds one JSON object per "
                            "line.") from e
        if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
            keys = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise GlueError(f"'{path}' line {number} has no string field '{text_field}' (it has {keys}). Fix: "
                            f"text_field=<the field holding the text>.")
        docs.append(record[text_field])
    return docs


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


def file_ids(path: str, tokenizer, text_field: str) -> torch.Tensor:
    """A text file as one stream of ids; a ``.jsonl`` file's documents each followed by the tokenizer's end-of-text
    token (for the byte-level tiny model, or a tokenizer without one, by a blank line), so that a block spanning
    two documents shows where one ends."""
    if not path.endswith(".jsonl"):
        return token_ids(read_text(path), tokenizer)
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        return token_ids("\n\n".join(read_documents(path, text_field)) + "\n\n", tokenizer)
    return torch.cat([torch.cat([token_ids(d, tokenizer), torch.tensor([eos])]) for d in read_documents(path, text_field)])


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
    train_ids = file_ids(cfg.train_file, tokenizer, cfg.text_field)
    if cfg.eval_file:
        eval_ids, source = file_ids(cfg.eval_file, tokenizer, cfg.text_field), f"{cfg.train_file} + {cfg.eval_file}"
    else:
        split = int(len(train_ids) * (1.0 - cfg.eval_fraction))
        train_ids, eval_ids = train_ids[:split], train_ids[split:]
        source = f"{cfg.train_file} (last {cfg.eval_fraction:.0%} held out)"
    train = blocks(train_ids, cfg.block_size, cfg.max_train_blocks, f"train_file '{cfg.train_file}'")
    evals = blocks(eval_ids, cfg.block_size, cfg.max_eval_blocks, "the validation text")
    return LMData(train, evals, len(train) * cfg.block_size, source)
