"""Load an exported adapter with plain peft in a fresh process that never imports sparse_lowrank_peft."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import torch

SCRIPT = textwrap.dedent(
    r"""
    import sys, torch
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForSequenceClassification, AutoModelForCausalLM
    base_dir, adapter_dir, inputs_path, out_path = sys.argv[1:5]
    cfg = PeftConfig.from_pretrained(adapter_dir)
    assert cfg.peft_type == "LORA", cfg.peft_type
    auto = AutoModelForSequenceClassification if cfg.task_type == "SEQ_CLS" else AutoModelForCausalLM
    model = PeftModel.from_pretrained(auto.from_pretrained(base_dir), adapter_dir).eval()
    inputs = torch.load(inputs_path)
    with torch.no_grad():
        out = model(**inputs).logits
    assert not any(m.startswith("sparse_lowrank_peft") for m in sys.modules), "plain peft run imported our package"
    torch.save(out, out_path)
    """
)


def plain_peft_outputs(base_dir: Path, adapter_dir: Path, inputs: dict, tmp_path: Path) -> torch.Tensor:
    """Outputs of ``base_dir`` + LoRA adapter ``adapter_dir`` computed by plain peft in a subprocess."""
    inputs_path, out_path = tmp_path / "inputs.pt", tmp_path / "plain_out.pt"
    torch.save(inputs, inputs_path)
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(base_dir), str(adapter_dir), str(inputs_path), str(out_path)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out_path)
