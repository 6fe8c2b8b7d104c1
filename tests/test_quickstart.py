"""The README's quickstart (examples/quickstart.py) runs as written."""

import re
from pathlib import Path

from _forkserver import fresh_python

ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_runs(tmp_path):
    script = ROOT / "examples" / "quickstart.py"
    out = fresh_python([script], cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "reloaded == merged: True" in out.stdout, out.stdout
    losses = [float(v) for v in re.findall(r"loss ([0-9.]+)", out.stdout)]
    assert len(losses) == 5 and losses[-1] < losses[0], losses
    assert (tmp_path / "quickstart-adapter" / "adapter_model.safetensors").exists()


def test_readme_quickstart_is_the_example():
    readme = (ROOT / "README.md").read_text()
    example = (ROOT / "examples" / "quickstart.py").read_text()
    body = example.split('"""', 2)[2].strip()
    assert body in readme, "README's quickstart block differs from examples/quickstart.py"


def test_causal_lm_example_runs(tmp_path):
    """examples/finetune_causal_lm.py (the README's LLM section): SLTrain on an all-NF4 LLaMA trains, reloads to the
    same loss, and its one-rank plain LoRA export keeps the trained perplexity."""
    script = ROOT / "examples" / "finetune_causal_lm.py"
    out = fresh_python([script, "--out", tmp_path / "run"], cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "reloaded loss equal: True" in out.stdout, out.stdout
    before, after = map(float, re.search(r"validation perplexity ([0-9.]+) -> ([0-9.]+)", out.stdout).groups())
    served = float(re.search(r"plain LoRA r=16 .*: perplexity ([0-9.]+)", out.stdout).group(1))
    assert after < 0.9 * before and abs(served - after) < 0.02 * after, (before, after, served)
    cfg = (tmp_path / "run" / "lora" / "adapter_config.json").read_text()
    assert '"rank_pattern": {}' in cfg and '"peft_type": "LORA"' in cfg
