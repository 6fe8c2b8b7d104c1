"""Reload saved tiny-RoBERTa adapters in ONE fresh Python process per test module.

A process start imports torch, transformers and peft: 6-8 s on 2 cores, more than the checks themselves, so each
module that checks fresh-process reloads gathers its folders in a module fixture and reloads them all at once.
"""

from __future__ import annotations
from _forkserver import fresh_python

import json
import textwrap
from pathlib import Path

import torch

SCRIPT = textwrap.dedent(
    r"""
    import json, sys, torch
    sys.path.insert(0, sys.argv[1])
    from _builders import _ids, output_of, tiny_roberta
    from peft import PeftModel
    import sparse_lowrank_peft  # registers the methods
    from sparse_lowrank_peft.lq_lora import load_lq_lora
    for loader, folder in json.loads(sys.argv[2]):
        load = load_lq_lora if loader == "lq_lora" else PeftModel.from_pretrained
        model = load(tiny_roberta(), folder).eval()
        with torch.no_grad():
            print("OUT " + json.dumps([folder, output_of(model, _ids(9)).tolist()]))
    """
)


def reload_outputs(jobs: list[tuple[str, Path]]) -> dict[str, torch.Tensor]:
    """``{folder: outputs on _ids(9)}`` of each ``(loader, folder)`` loaded onto a fresh ``tiny_roberta()`` in one
    new process; ``loader`` is ``"peft"`` (``PeftModel.from_pretrained``) or ``"lq_lora"`` (``load_lq_lora``)."""
    arg = json.dumps([[loader, str(folder)] for loader, folder in jobs])
    proc = fresh_python(["-c", SCRIPT, Path(__file__).parent, arg], timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line[4:]) for line in proc.stdout.splitlines() if line.startswith("OUT ")]
    return {folder: torch.tensor(out) for folder, out in rows}
