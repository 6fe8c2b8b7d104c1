"""Every recipe under recipes/ (recursively) loads and validates against the runner's schema, and every one
dry-runs (``python -m glue.run RECIPE --dry-run``: data read, model built and wrapped, initial adapter loaded)."""

import json
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from glue.config import build_config  # noqa: E402
from glue.errors import GlueError  # noqa: E402
from glue.train import default_output_dir  # noqa: E402
from glue.run import main  # noqa: E402
from glue.tasks import GLUE_TASKS, get_task  # noqa: E402

# recipes/llm holds the causal-LM runner's recipes (tests/test_causal_lm.py)
RECIPES = sorted(p for p in (REPO_ROOT / "recipes").rglob("*")
                 if p.suffix in (".yaml", ".yml") and p.relative_to(REPO_ROOT / "recipes").parts[0] != "llm")


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


# ---------------------------------------------------------------------------------------------------------------
# --dry-run of every recipe, offline


@pytest.fixture(scope="module")
def stand_in_glue(tmp_path_factory) -> Path:
    """A glue_data folder with every task's files (their header, columns and labels) but 48 training and 8 dev
    rows each: the dry runs read data as a run does, offline and in seconds (../shared/glue has no MNLI or QQP, and
    reading QNLI's 105k rows 16 times would take minutes; the real files' reading is tested in test_glue_data.py)."""
    root = tmp_path_factory.mktemp("glue_data")
    words = "the film was a long quiet walk through an old town at night".split()
    for task in GLUE_TASKS.values():
        folder = root / task.display
        folder.mkdir()
        columns = list(task.header or (*task.text_columns, task.label_column))
        for name, rows in [(task.train_file, 48)] + [(s.local_file, 8) for s in task.eval_splits]:
            lines = [] if task.header else ["\t".join(columns)]
            for i in range(rows):
                label = str(i % 6 * 0.8) if task.labels is None else task.labels[i % len(task.labels)]
                row = {c: " ".join(words[(i + j) % len(words)] for j in range(5)) for c in columns}
                row.update({task.label_column: label, "original_label": "*"})
                lines.append("\t".join(row[c] for c in columns))
            (folder / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


@pytest.fixture(scope="module", autouse=True)
def shared_lq_splits():
    """Each LQ split of a MiniLM weight is computed once in this module: the dry runs build the same splits again
    and again (the LQ recipes of every task, the plans' measurements), and a split is a deterministic function of
    its inputs (tests/test_quantized.py), so the wiring under test is the same. Every call gets its own copy."""
    import dataclasses
    import hashlib

    from sparse_lowrank_peft.delta import quant

    original, cache = quant.lq_decompose, {}

    def digest(value) -> str:
        if value is None:
            return "-"
        if isinstance(value, (tuple, list)):
            return ",".join(digest(v) for v in value)
        return hashlib.sha1(value.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()

    def shared(W, rank, *args, **kwargs):
        quantizer = kwargs.get("quantizer")
        owner = repr(getattr(quantizer, "__self__", quantizer)) if quantizer is not None else None
        key = (digest(W), tuple(W.shape), rank, args, digest(kwargs.get("fisher")), owner,
               tuple(sorted((k, v) for k, v in kwargs.items() if k not in ("fisher", "quantizer"))))
        if key not in cache:
            cache[key] = original(W, rank, *args, **kwargs)
        result = cache[key]
        return dataclasses.replace(result, **{f: getattr(result, f).clone() for f in ("Q", "B", "A", "source")})

    quant.lq_decompose = shared
    yield
    quant.lq_decompose = original


@pytest.fixture(scope="module")
def mnli_adapters(tmp_path_factory):
    """``adapter(mnli recipe)``: the untrained adapter of an MNLI recipe on MiniLM, saved once (what the MRPC, RTE and
    STS-B recipes of the same variant start from, in place of the trained one they name)."""
    from glue.config import build_config
    from glue.model import build_model

    saved: dict[Path, Path] = {}

    def adapter(recipe: Path) -> Path:
        if recipe not in saved:
            cfg = build_config(str(recipe), ["model=minilm"])
            if cfg.init == "lq" and "lq_max_iter" not in cfg.peft:  # as in the dry runs: 1 of LQ's 20 alternations
                cfg = build_config(str(recipe), ["model=minilm", "peft.lq_max_iter=1"])
            folder = tmp_path_factory.mktemp("mnli-adapter") / "adapter"
            build_model(cfg, get_task("mnli")).model.save_pretrained(str(folder))
            saved[recipe] = folder
        return saved[recipe]

    return adapter


# Dry runs that repeat, on every encoder linear or with another objective, what a faster dry run of the same kind
# already builds in the default run (the LQ split on a plan: sltrain-plan2.75-lq / -qv; LQ on all linears:
# lora-nf4-lq-all; a measured plan: sltrain-plan2.75-lq): 4 to 24 s each on 2 cores, 70 s together. They run with
# -m slow; the default run still validates their configs (test_recipe_is_valid_and_starts_with_its_command).
SLOW_DRY_RUNS = {
    "recipes/minilm/sltrain-plan2.75fisher-lq-sst2.yaml", "recipes/minilm/lora-plan2.75-lq-all-sst2.yaml",
    "recipes/minilm/sltrain-hqq2g64-lq-all-sst2.yaml", "recipes/minilm/sltrain-plan2.75-lq-all-sst2.yaml",
    "recipes/minilm/sltrain-plan2.75output-lq-sst2.yaml", "recipes/minilm/sltrain-plan3.5qv-lq-sst2.yaml",
    "recipes/minilm/sltrain-hqq3g128-lq-sst2.yaml",
}


def _repeated_builds(recipes: list[Path]) -> set[str]:
    """The recipes whose dry run builds what an earlier one of the same variant already built: a variant is a model
    folder and the name before the task (``roberta-base/sltrain-nf4`` for ``sltrain-nf4-{cola,...,stsb}.yaml``,
    one method, base and initialisation). Every variant and every task keeps one dry run in the default run (47 of
    the 140 recipes, with SLOW_DRY_RUNS out; the 86 repeats took 45 s together in a ``--durations`` run of the whole
    suite on 2 cores); the others run with -m slow, and every config is still validated by default."""
    variants, tasks, repeated = set(), set(), set()
    for path in recipes:
        variant, task = path.stem.rsplit("-", 1)
        key = (path.parent.name, variant)
        if key in variants and task in tasks:
            repeated.add(path.relative_to(REPO_ROOT).as_posix())
        variants.add(key)
        tasks.add(task)
    return repeated


SLOW = SLOW_DRY_RUNS | _repeated_builds(RECIPES)
DRY_RUNS = [pytest.param(p, marks=[pytest.mark.slow] if p.relative_to(REPO_ROOT).as_posix() in SLOW else [],
                         id=p.relative_to(REPO_ROOT).as_posix()) for p in RECIPES]


def test_the_slow_dry_runs_are_recipes():
    assert SLOW_DRY_RUNS <= {p.relative_to(REPO_ROOT).as_posix() for p in RECIPES}


@pytest.mark.parametrize("path", DRY_RUNS)
def test_every_recipe_dry_runs(path, request, capsys):
    """``python -m glue.run RECIPE model=minilm --dry-run`` (the RoBERTa recipes on the bundled MiniLM, offline): the
    config, the data, the model with its method, 4-bit base and initial adapter are built; nothing is written.
    ``init_adapter`` points at an MNLI adapter made here, LQ-LoRA's split makes one of its 20 alternations (an
    all-linear MiniLM recipe: 10.6 s with two, 8.2 s with one), and a Fisher-weighted plan reads 2 batches."""
    if request.node.get_closest_marker("slow") and "slow" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("slow dry run (SLOW_DRY_RUNS, or a variant's other task): run it with `python -m pytest -m slow`")
    stand_in_glue, mnli_adapters = request.getfixturevalue("stand_in_glue"), request.getfixturevalue("mnli_adapters")
    text = path.read_text(encoding="utf-8")
    if "quantize: plan" in text:
        pytest.importorskip("hqq", reason="a bit-budget recipe's configurations need hqq (the hqq extra)")
    if "quantize:" in text:
        pytest.importorskip("bitsandbytes", reason="a 4-bit base needs bitsandbytes (the bnb extra)")
    cfg = build_config(str(path))
    overrides = ["model=minilm", f"data_dir={stand_in_glue}"]
    if cfg.init == "lq" and "lq_max_iter" not in cfg.peft:
        overrides.append("peft.lq_max_iter=1")  # the LQ split is built as in the run, with 1 of its 20 alternations
    if cfg.quantize_plan and "budget_bits" in cfg.quantize_plan and "table" not in cfg.quantize_plan:
        # a plan measured in the run: 2 of the 17 configurations (measuring all takes ~70 s CPU for MiniLM)
        overrides.append("quantize_plan.candidates=[hqq-2bit-g64,bnb-nf4]")
    if cfg.quantize_plan and cfg.quantize_plan.get("fisher_batches"):
        overrides.append("quantize_plan.fisher_batches=2")  # the Fisher of 2 training batches, not of 32
    if cfg.init_adapter:
        mnli = path.with_name(path.name.replace(f"-{cfg.task}.yaml", "-mnli.yaml"))
        overrides.append(f"init_adapter={mnli_adapters(mnli)}")
    capsys.readouterr()
    assert main([str(path), *overrides, "--dry-run"]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    plan = json.loads(out[out.index("\n{") + 1:])
    assert plan["dry_run"] and plan["task"] == cfg.task and plan["method"] == cfg.method
    assert plan["train_examples"] == min(48, cfg.max_train_samples or 48)
    assert plan["head_modules"] == ["pooler", "classifier"]  # MiniLM's (BERT's) head, whatever the recipe's model
    trainable, total = plan["params"]["trainable"], plan["params"]["total"]
    assert (trainable == total) if cfg.method == "full" else (0 < trainable < total)
    assert not Path(plan["output_dir"]).exists() or Path(plan["output_dir"]).resolve() in _existing_run_folders()


def _existing_run_folders() -> set[Path]:
    """Run folders already in this checkout (a dry run must not create one; it cannot have made these)."""
    runs = REPO_ROOT / "runs"
    return {p.resolve() for p in runs.rglob("*") if p.is_dir()} if runs.is_dir() else set()
