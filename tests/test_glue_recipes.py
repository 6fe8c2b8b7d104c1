"""Every recipe under recipes/ (recursively) loads and validates against the runner's schema."""

import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from glue.config import build_config  # noqa: E402
from glue.errors import GlueError  # noqa: E402
from glue.train import default_output_dir  # noqa: E402
from glue.tasks import get_task  # noqa: E402

RECIPES = sorted(p for p in (REPO_ROOT / "recipes").rglob("*") if p.suffix in (".yaml", ".yml"))


def test_there_are_recipes():
    names = {p.relative_to(REPO_ROOT / "recipes").as_posix() for p in RECIPES}
    for task in ("sst2", "rte", "mrpc", "cola", "stsb"):
        assert f"minilm/lora-{task}.yaml" in names
    for size in ("base", "large"):
        for task in ("mnli", "sst2", "mrpc", "cola", "qnli", "qqp", "rte", "stsb"):
            assert f"roberta-{size}/lora-{task}.yaml" in names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.relative_to(REPO_ROOT).as_posix())
def test_recipe_is_valid_and_starts_with_its_command(path):
    rel = path.relative_to(REPO_ROOT).as_posix()
    first = path.read_text(encoding="utf-8").splitlines()[0]
    assert first.startswith("#") and f"glue.run {rel}" in first, f"{rel}: first line must be the command running it"
    if "quantize: plan" in path.read_text(encoding="utf-8"):
        pytest.importorskip("hqq", reason="a bit-budget recipe's configurations need hqq (the hqq extra)")
    cfg = build_config(str(path))  # raises GlueError on any unknown field or bad value
    assert cfg.task and cfg.method
    get_task(cfg.task)
    if cfg.init_adapter:
        # The adapter to start from is the one the MNLI recipe of the same variant writes (sltrain-nf4-rte.yaml
        # starts from what sltrain-nf4-mnli.yaml writes).
        mnli = build_config(str(path.with_name(path.name.replace(f"-{cfg.task}.yaml", "-mnli.yaml"))))
        mnli_out = Path(mnli.output_dir) if mnli.output_dir else default_output_dir(mnli, "mnli")
        assert Path(cfg.init_adapter) == mnli_out / "adapter"
    if path.parent.name.startswith("roberta-"):
        assert cfg.model == f"FacebookAI/{path.parent.name}"
        if cfg.method == "lora":  # the LoRA paper's adapter; other methods set their own fields
            assert cfg.peft.get("r") == 8 and cfg.peft.get("lora_alpha") == 16
            assert cfg.peft.get("target_modules") == ["query", "value"]
        assert cfg.warmup_ratio == 0.06 and cfg.weight_decay == 0.1 and cfg.lr_scheduler_type == "linear"
        assert (cfg.init_adapter is not None) == (cfg.task in ("mrpc", "rte", "stsb"))


def test_a_recipe_with_an_unknown_field_is_rejected(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("# python -m glue.run bad.yaml\ntask: rte\nbatch_size: 8\n")
    with pytest.raises(GlueError, match="Unknown recipe field 'batch_size'"):
        build_config(str(bad))
    bad.write_text("- task: rte\n")
    with pytest.raises(GlueError, match="must be a YAML mapping"):
        build_config(str(bad))
