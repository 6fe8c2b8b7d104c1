"""Bytes of index arrays a sparse term keeps beside its values, per entry, after what a user runs.

A support saves only its ``(2, nnz)`` int32 indices; the paths derive and cache other layouts from them (CSR of S and
of Sᵀ, positions in the dense weight, the Triton kernels' arrays). This counts what stays cached on the supports of an
SLTrain model (every linear of the LLaMA decoder of ``bench/decode.py``, r 8, density 0.01; CPU) after each of:

* ``train_auto``  one training step as the dispatcher runs it (16 x 64 tokens: the fused path);
* ``train_spmm``  one training step with the SpMM path forced (``SLPEFT_SPARSE_PATH=spmm``);
* ``generate``    in eval mode under ``torch.no_grad``: a 64-token prefill, then 8 one-token steps.

Each starts from freshly made supports. Bytes are summed over the distinct storages the supports reference (the
saved indices excluded), divided by the entries. ``--code DIR`` counts another checkout's ``src`` (e.g. a worktree of
an older commit) for a before/after pair.

    python bench/index_memory.py                       # writes bench/results/index-memory-cpu.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _env import ROOT, provenance  # noqa: E402

CASES = ["train_auto", "train_spmm", "generate"]


def tensors_in(obj, seen: set) -> list[torch.Tensor]:
    """Every tensor reachable through ``obj``'s attributes, dicts, lists, tuples and dataclass fields."""
    if id(obj) in seen:
        return []
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):  # a CSR tensor's own arrays (torch.sparse keeps them as plain tensors)
        return [obj.crow_indices(), obj.col_indices(), obj.values()] if obj.layout == torch.sparse_csr else [obj]
    if isinstance(obj, dict):
        children = list(obj.values())
    elif isinstance(obj, (list, tuple)):
        children = list(obj)
    elif dataclasses.is_dataclass(obj):
        children = [getattr(obj, f.name) for f in dataclasses.fields(obj)]
    elif hasattr(obj, "__slots__"):
        children = [getattr(obj, name, None) for name in obj.__slots__]
    else:
        children = list(getattr(obj, "__dict__", {}).values())
    return [t for child in children for t in tensors_in(child, seen)]


def index_bytes(supports) -> tuple[int, int]:
    """(bytes of the distinct integer storages the supports cache, entries): the saved indices and values excluded."""
    storages, entries = {}, 0
    for support in supports:
        entries += support.nnz
        own = {support.indices.untyped_storage().data_ptr()}
        for t in tensors_in(support, set()):
            ptr = t.untyped_storage().data_ptr()
            if t.dtype in (torch.int32, torch.int64) and ptr not in own:
                storages[ptr] = t.untyped_storage().nbytes()
    return sum(storages.values()), entries


def model_and_supports():
    from throughput import build_model, llama_config, base_state

    config = llama_config(False, 64)
    model = build_model("sltrain", config, base_state(config), torch.device("cpu"), torch.float32)
    layers = [m for m in model.modules() if hasattr(m, "get_support") and hasattr(m, "sltrain_values")]
    return model, config, layers


def run_case(case: str) -> dict:
    model, config, layers = model_and_supports()
    gen = torch.Generator().manual_seed(0)
    if case.startswith("train"):
        model.train()
        ids = torch.randint(3, config.vocab_size, (16, 64), generator=gen)
        model(input_ids=ids, labels=ids).loss.backward()
    else:
        model.eval()
        ids = torch.randint(3, config.vocab_size, (1, 64), generator=gen)
        with torch.no_grad():
            model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    supports = [layer.get_support(name) for layer in layers for name in layer.sltrain_values]
    nbytes, entries = index_bytes(supports)
    values = next(iter(layers[0].sltrain_values.values()))
    return {"case": case, "index_bytes": nbytes, "entries": entries, "bytes_per_entry": round(nbytes / entries, 2),
            "values_bytes_per_entry": values.element_size()}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--code", default=None, help="a checkout whose src to count (default: this one)")
    p.add_argument("--case", choices=CASES, default=None, help=argparse.SUPPRESS)  # one case per process
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "index-memory-cpu.json"))
    args = p.parse_args(argv)
    if args.case:  # child: the package was imported from --code's src by PYTHONPATH
        print(json.dumps(run_case(args.case)))
        return {}
    import subprocess

    env = dict(os.environ, OMP_NUM_THREADS="1")
    if args.code:
        env["PYTHONPATH"] = str(Path(args.code).resolve() / "src")
    rows = []
    for case in CASES:
        env["SLPEFT_SPARSE_PATH"] = "spmm" if case == "train_spmm" else "auto"
        out = subprocess.run([sys.executable, __file__, "--case", case], env=env, capture_output=True, text=True,
                             check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    code_commit = None
    if args.code:
        code_commit = subprocess.run(["git", "-C", args.code, "rev-parse", "HEAD"], capture_output=True,
                                     text=True).stdout.strip()
    result = {**provenance("bench/index_memory.py", argv), "code": code_commit or "this checkout", "rows": rows}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
