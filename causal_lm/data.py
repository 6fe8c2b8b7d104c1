"""Text files (plain, or JSON Lines of documents) -> blocks of token ids for causal-LM fine-tuning (the model shifts
the labels itself); JSON Lines of prompt/completion records -> padded examples with the loss on the completions."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import torch
from transformers import default_data_collator

from glue.errors import GlueError


class LMData(NamedTuple):
    train: list[dict]
    eval: list[dict]
    train_tokens: int  # tokens the loss is taken on, per epoch
    source: str
    collate: Callable[[list[dict]], dict]  # examples -> a batch (blocks stack; prompt/completion pairs are padded)


IGNORE = -100  # the label transformers' causal-LM loss skips


def read_records(path: str, fields: Sequence[str]) -> list[tuple[str, ...]]:
    """Each line of a JSON Lines file as the tuple of its ``fields`` (strings); a clear error naming the line
    otherwise."""
    records = []
    for number, line in enumerate(read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise GlueError(f"'{path}' line {number} is not JSON ({e.msg}). A .jsonl file holds one JSON object per "
                            "line.") from e
        missing = [f for f in fields if not isinstance(record, dict) or not isinstance(record.get(f), str)]
        if missing:
            keys = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise GlueError(f"'{path}' line {number} has no string field '{missing[0]}' (it has {keys}). Fix: set "
                            "the recipe's text_field (or prompt_field / completion_field) to the field holding it.")
        records.append(tuple(record[f] for f in fields))
    return records


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
    docs = [text for (text,) in read_records(path, [text_field])]
    if eos is None:
        return token_ids("\n\n".join(docs) + "\n\n", tokenizer)
    return torch.cat([torch.cat([token_ids(d, tokenizer), torch.tensor([eos])]) for d in docs])


def blocks(ids: torch.Tensor, size: int, limit: int | None, what: str) -> list[dict]:
    """Consecutive, non-overlapping blocks of ``size`` ids (the tail shorter than a block is dropped)."""
    count = len(ids) // size
    if count == 0:
        raise GlueError(f"{what} has {len(ids)} tokens, fewer than block_size={size}: there is not one block. "
                        f"Give more text or a smaller block_size (e.g. block_size={max(1, len(ids) // 2)}).")
    chunks = ids[: count * size].view(count, size)[:limit]
    return [{"input_ids": c, "labels": c} for c in chunks]


def pairs(path: str, tokenizer, prompt_field: str, completion_field: str, size: int, limit: int | None) -> list[dict]:
    """Prompt/completion records of a ``.jsonl`` file as examples: [begin-of-text] + prompt ids + completion ids +
    end-of-text (the special tokens where the tokenizer has them, as its own encoding of one sequence adds them),
    the loss on the completion and its end only (prompt labels ``IGNORE``), cut to ``size`` tokens."""
    eos = getattr(tokenizer, "eos_token_id", None)
    bos = torch.tensor([tokenizer.bos_token_id] if getattr(tokenizer, "bos_token_id", None) is not None else [],
                       dtype=torch.long)
    examples = []
    for prompt, completion in read_records(path, [prompt_field, completion_field]):
        head = torch.cat([bos, token_ids(prompt, tokenizer)])
        tail = torch.cat([token_ids(completion, tokenizer), torch.tensor([eos] if eos is not None else [], dtype=torch.long)])
        ids = torch.cat([head, tail])[:size]
        labels = torch.cat([torch.full_like(head, IGNORE), tail])[:size]
        if (labels != IGNORE).any():  # a prompt longer than the block leaves nothing to learn from
            examples.append({"input_ids": ids, "labels": labels})
    if not examples:
        raise GlueError(f"'{path}' gives no example with a completion token within block_size={size}. Fix: a larger "
                        "block_size, or shorter prompts.")
    return examples[:limit]


def pad_collate(pad_id: int) -> Callable[[list[dict]], dict]:
    """Right-pad a batch of examples: ids with ``pad_id``, labels with ``IGNORE``, and the attention mask."""
    def collate(batch: list[dict]) -> dict:
        width = max(len(b["input_ids"]) for b in batch)
        out = {"input_ids": torch.full((len(batch), width), pad_id, dtype=torch.long),
               "labels": torch.full((len(batch), width), IGNORE, dtype=torch.long),
               "attention_mask": torch.zeros((len(batch), width), dtype=torch.long)}
        for i, b in enumerate(batch):
            n = len(b["input_ids"])
            out["input_ids"][i, :n], out["labels"][i, :n], out["attention_mask"][i, :n] = b["input_ids"], b["labels"], 1
        return out
    return collate


def load_pairs(cfg, tokenizer) -> LMData:
    """Prompt/completion examples (``prompt_field`` set): ``eval_file``, else the last ``eval_fraction`` of the
    records."""
    def read(path, limit=None):
        return pairs(path, tokenizer, cfg.prompt_field, cfg.completion_field, cfg.block_size, limit)

    examples = read(cfg.train_file)
    if cfg.eval_file:
        train, evals, source = examples, read(cfg.eval_file), f"{cfg.train_file} + {cfg.eval_file}"
    else:
        split = max(1, int(len(examples) * (1.0 - cfg.eval_fraction)))
        train, evals = examples[:split], examples[split:]
        source = f"{cfg.train_file} (last {cfg.eval_fraction:.0%} of the records held out)"
        if not evals:
            raise GlueError(f"'{cfg.train_file}' has {len(examples)} usable records: none is left for validation. "
                            "Give more records or an eval_file.")
    train, evals = train[:cfg.max_train_blocks], evals[:cfg.max_eval_blocks]
    pad = getattr(tokenizer, "pad_token_id", None)
    pad = pad if pad is not None else getattr(tokenizer, "eos_token_id", None) or 0
    return LMData(train, evals, sum(int((e["labels"] != IGNORE).sum()) for e in train), source, pad_collate(pad))


def load_data(cfg, tokenizer) -> LMData:
    """Training and validation data of the recipe: prompt/completion examples if ``prompt_field`` is set, else
    blocks of the text: ``eval_file``, else the last ``eval_fraction`` of ``train_file`` (split on token ids, so no
    block straddles the two)."""
    if cfg.prompt_field:
        return load_pairs(cfg, tokenizer)
    train_ids = file_ids(cfg.train_file, tokenizer, cfg.text_field)
    if cfg.eval_file:
        eval_ids, source = file_ids(cfg.eval_file, tokenizer, cfg.text_field), f"{cfg.train_file} + {cfg.eval_file}"
    else:
        split = int(len(train_ids) * (1.0 - cfg.eval_fraction))
        train_ids, eval_ids = train_ids[:split], train_ids[split:]
        source = f"{cfg.train_file} (last {cfg.eval_fraction:.0%} held out)"
    train = blocks(train_ids, cfg.block_size, cfg.max_train_blocks, f"train_file '{cfg.train_file}'")
    evals = blocks(eval_ids, cfg.block_size, cfg.max_eval_blocks, "the validation text")
    return LMData(train, evals, len(train) * cfg.block_size, source, default_data_collator)
