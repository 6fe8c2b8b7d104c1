"""Multi-process data-parallel training: every tuner under DDP (2 CPU processes, gloo), and the GLUE runner under
torchrun (by default one launch; with ``-m slow`` a crash right after a checkpoint and ``--resume`` as well).

One ``torchrun --nproc_per_node 2`` launch of ``_ddp_worker.py tuners`` runs every case (module fixture): each row of
the contract table (``test_contract.TUNER_CASES``, so every tuner's ``tests/_cases_*.py`` rows are included as soon
as they exist) on its model families, ``STEPS`` SGD steps under ``DistributedDataParallel(find_unused_parameters=
False)`` with the custom-loop hooks (``dylora_sample_rank`` before each forward, ``sora_prox_step`` after each step),
then the same training in one process on the whole global batch (rank 0); the same training under FSDP1
(``FullyShardedDataParallel(use_orig_params=True)``) and FSDP2 (``fully_shard``) for one case of every tuner; then
``transformers.Trainer`` with ``training_callbacks(model)`` for SoRA and DyLoRA. The tests here compare what the two
ranks saved. The GLUE test launches the runner once more and checks that only the main process writes the run.

Tolerances:

* rank 0 vs rank 1: **exact** (``torch.equal``). Both ranks apply the same all-reduced gradient (gloo's all-reduce
  returns the same bits to every rank) with the same deterministic optimizer and prox step to the same weights.
* DDP (and FSDP) vs one process on the same global batch: ``SINGLE_ATOL`` = 1e-6 absolute, on weights of size
  ~0.1-1 after 4 SGD steps of lr 0.05. The only difference is fp32 summation order (each rank sums the gradient over
  its 4 examples and the all-reduce averages the two partial sums; one process sums all 8 in another order): a few
  ulp (~1e-7 relative) per gradient, carried linearly into the weights by SGD (hence SGD here: Adam would magnify the
  rounding noise of near-zero gradients by up to lr / eps). Measured: at most 1.5e-8 (docs/distributed.md), so 1e-6
  leaves a factor ~70 for other BLAS builds and thread counts. Rows with dropout are compared across ranks only
  (each rank draws its own dropout masks, so one process cannot reproduce them).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import string
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import test_contract as contract  # the contract table: every tuner's rows (module import: its tests are not collected)
from _ddp_worker import STEPS

from sparse_lowrank_peft import TUNERS

TESTS = Path(__file__).resolve().parent
REPO_ROOT = TESTS.parent
SHARED_GLUE = (REPO_ROOT / ".." / "shared" / "glue").resolve()
WORLD = 2
SINGLE_ATOL = 1e-6  # DDP vs one process: fp32 summation order only (module docstring); measured <= 1.5e-8
LAUNCH_TIMEOUT_S = 420

pytestmark = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available in this torch build",
)


def torchrun_cmd() -> list[str]:
    """``torchrun`` of this interpreter's environment, on a free localhost port (``--standalone``)."""
    exe = Path(sys.executable).parent / "torchrun"
    base = [str(exe)] if exe.is_file() else [sys.executable, "-m", "torch.distributed.run"]
    return base + ["--standalone", "--nproc_per_node", str(WORLD)]


def launch_env() -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", PYTHONUNBUFFERED="1")
    if sys.platform.startswith("linux"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback: the container's hostname may not resolve
    paths = [str(TESTS), str(REPO_ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


def launch(args: list[str], log: Path, extra_env: dict | None = None,
           timeout: int = LAUNCH_TIMEOUT_S) -> subprocess.CompletedProcess:
    env = launch_env()
    for key, value in (extra_env or {}).items():
        env[key] = value + os.pathsep + env[key] if key == "PYTHONPATH" else value
    t0 = time.perf_counter()
    proc = subprocess.run(torchrun_cmd() + args, cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    log.write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    proc.wall_s = time.perf_counter() - t0
    return proc


def tail(proc, n=4000) -> str:
    return (proc.stdout + proc.stderr)[-n:]


# ------------------------------------------------------------------------------------------------- the cases
METHOD_OF = {cls: name for name, cls in TUNERS.items()}
FAMILIES = ("mlp", "bert", "gpt2")  # rows that name no families: plain Linear, a transformers encoder, Conv1D


def _has_dropout(kwargs: dict) -> bool:
    return any(k.endswith("dropout") and v for k, v in kwargs.items())


def build_cases() -> list[dict]:
    cases = []
    for row in contract.TUNER_CASES:
        row_id, cfg_cls, kwargs = row[:3]
        for family in row[3] if len(row) > 3 else FAMILIES:
            cases.append({
                "id": f"{row_id}-{family}", "method": METHOD_OF.get(cfg_cls, cfg_cls.__name__),
                "cfg_module": cfg_cls.__module__, "cfg_name": cfg_cls.__name__, "kwargs": kwargs, "family": family,
                "compare_single": not _has_dropout(kwargs),
            })
    return cases


CASES = build_cases()
TRAINER_CASES = [
    {"id": "sora-bert", "method": "sora", "cfg_module": "sparse_lowrank_peft", "cfg_name": "SoraConfig",
     "kwargs": {"r": 4, "lora_alpha": 8, "sparse_lambda": 20.0}, "family": "bert"},
    {"id": "dylora-bert", "method": "dylora", "cfg_module": "sparse_lowrank_peft", "cfg_name": "DyLoraConfig",
     "kwargs": {"r": 4, "lora_alpha": 8}, "family": "bert"},
]
CASE_IDS = [c["id"] for c in CASES]
SINGLE_IDS = [c["id"] for c in CASES if c["compare_single"]]


def _fsdp_cases() -> list[dict]:
    """One case per tuner (no dropout, a transformers model) for FSDP1 and FSDP2; compared with the one-process
    reference of the DDP case of the same id."""
    picked = {}
    for case in CASES:
        if case["compare_single"] and case["family"] != "mlp":
            picked.setdefault(case["method"], case)
    return list(picked.values())


FSDP_CASES = _fsdp_cases()
FSDP_IDS = [f"fsdp{v}-{c['id']}" for c in FSDP_CASES for v in (1, 2)]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> dict:
    """Launch the tuner worker once on 2 processes; ``{case id: (rank 0 result, rank 1 result)}``."""
    out = tmp_path_factory.mktemp("ddp-tuners")
    spec = {"imports": sorted({c["cfg_module"] for c in CASES}), "cases": CASES, "trainer_cases": TRAINER_CASES,
            "fsdp_cases": FSDP_CASES}
    (out / "cases.json").write_text(json.dumps(spec))
    proc = launch([str(TESTS / "_ddp_worker.py"), "tuners", str(out), str(out / "cases.json")], out / "launch.log")
    assert proc.returncode == 0, f"torchrun failed (rc {proc.returncode}):\n{tail(proc)}"
    results = {}
    extra = [dict(c, id="trainer-" + c["id"]) for c in TRAINER_CASES]
    extra += [dict(c, id=f"fsdp{v}-{c['id']}") for c in FSDP_CASES for v in (1, 2)]
    for case in CASES + extra:
        ranks = []
        for rank in range(WORLD):
            path = out / f"{case['id']}.rank{rank}.pt"
            assert path.is_file(), f"rank {rank} wrote no result for {case['id']}:\n{tail(proc)}"
            ranks.append(torch.load(path, weights_only=False))
        results[case["id"]] = tuple(ranks)
    timings = json.loads((out / "timings.rank0.json").read_text())
    print(f"\n[ddp] launch {proc.wall_s:.1f} s wall; per case (both phases, rank 0): "
          + ", ".join(f"{k} {v:.2f}s" for k, v in timings.items()))
    return results


def ok(ddp_run, case_id):
    r0, r1 = ddp_run[case_id]
    errors = [r["error"] for r in (r0, r1) if "error" in r]
    assert not errors, f"{case_id} failed under DDP:\n" + "\n".join(errors)
    return r0, r1


def max_diff(a: dict, b: dict) -> tuple[float, str]:
    assert a.keys() == b.keys()
    if not a:
        return 0.0, ""
    worst = max(a, key=lambda n: float((a[n].float() - b[n].float()).abs().max()) if a[n].numel() else 0.0)
    return float((a[worst].float() - b[worst].float()).abs().max()), worst


# ------------------------------------------------------------------------------------------------- tuners
def test_every_tuner_has_ddp_cases():
    covered = {c["method"] for c in CASES}
    assert set(TUNERS) <= covered, f"tuners without a DDP case: {sorted(set(TUNERS) - covered)}"
    assert {"sltrain", "sora", "dylora"} <= covered


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_supports_and_bases_identical_across_ranks(ddp_run, case_id):
    r0, r1 = ok(ddp_run, case_id)
    # drawn independently by each process (before DDP's constructor broadcasts rank 0's buffers), from the seed
    assert r0["fingerprints"] == r1["fingerprints"]
    # and unchanged by training (a support or basis is never redrawn or moved by a step)
    assert r0["fingerprints_after"] == r0["fingerprints"] and r1["fingerprints_after"] == r1["fingerprints"]


def test_random_tuners_really_have_supports_and_bases(ddp_run):
    """The fingerprint check above is not vacuous: SLTrain has supports, NOLA / sparse RandLoRA have bases."""
    kinds = {}
    for case in CASES:
        r0, _ = ddp_run[case["id"]]
        for key in r0.get("fingerprints", {}):
            kinds.setdefault(case["method"], set()).add(key.split(":")[0])
    assert "support" in kinds.get("sltrain", set())
    for method in ("nola", "sparse_randlora"):
        if method in TUNERS:
            assert "bases" in kinds.get(method, set()), method


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_ddp_steps_give_identical_weights_on_both_ranks(ddp_run, case_id):
    r0, r1 = ok(ddp_run, case_id)
    for part in ("params", "buffers"):
        a, b = r0["ddp"][part], r1["ddp"][part]
        assert a.keys() == b.keys()
        differ = [n for n in a if not torch.equal(a[n], b[n])]
        assert not differ, f"{part} differ between ranks: {differ[:5]}"
    moved, _ = max_diff(r0["ddp"]["params"], r0["init"]["params"])
    assert moved > 5e-4, "training did not move the weights: the comparison would be vacuous"  # least: 2e-3
    # every trainable parameter received a gradient in every step (DDP ran with find_unused_parameters=False)
    assert all(not missing for missing in r0["ddp"]["no_grad"]), r0["ddp"]["no_grad"]
    assert len(r0["ddp"]["losses"]) == STEPS


@pytest.mark.parametrize("case_id", SINGLE_IDS)
def test_ddp_equals_one_process_on_the_global_batch(ddp_run, case_id):
    r0, _ = ok(ddp_run, case_id)
    init_diff, name = max_diff(r0["init"]["params"], r0["single_init"]["params"])
    assert init_diff == 0.0, f"the two runs started from different weights ({name})"
    diff, name = max_diff(r0["ddp"]["params"], r0["single"]["params"])
    assert diff <= SINGLE_ATOL, f"DDP and one process differ by {diff:.3g} in {name}"
    buf_diff, name = max_diff(r0["ddp"]["buffers"], r0["single"]["buffers"])
    assert buf_diff == 0.0, name
    # the per-process losses average to the global batch's loss (mean over equal shards)
    r1 = ddp_run[case_id][1]
    for step, single_loss in enumerate(r0["single"]["losses"]):
        mean = (r0["ddp"]["losses"][step] + r1["ddp"]["losses"][step]) / 2
        assert abs(mean - single_loss) <= 1e-5 * max(1.0, abs(single_loss)), (step, mean, single_loss)


SORA_IDS = [c["id"] for c in CASES if c["method"] == "sora"]
DYLORA_IDS = [c["id"] for c in CASES if c["method"] == "dylora"]


@pytest.mark.parametrize("case_id", SORA_IDS)
def test_sora_gates_identical_after_every_prox_step(ddp_run, case_id):
    r0, r1 = ok(ddp_run, case_id)
    assert len(r0["ddp"]["gates"]) == STEPS
    for step, (g0, g1) in enumerate(zip(r0["ddp"]["gates"], r1["ddp"]["gates"])):
        assert all(torch.equal(g0[n], g1[n]) for n in g0), f"gates differ between ranks after step {step}"
        if "single" in r0:  # the same gates are exactly zero as in one process
            gs = r0["single"]["gates"][step]
            assert all(torch.equal(g0[n] == 0, gs[n] == 0) for n in g0), f"zero pattern differs at step {step}"


def test_sora_prox_step_zeroed_gates(ddp_run):
    """The prox step acted (so the gate checks above saw zeros appear), and left some ranks open."""
    zeros = total = 0
    for case_id in SORA_IDS:
        gates = ok(ddp_run, case_id)[0]["ddp"]["gates"][-1]
        zeros += sum(int((g == 0).sum()) for g in gates.values())
        total += sum(g.numel() for g in gates.values())
    assert 0 < zeros < total, (zeros, total)


@pytest.mark.parametrize("case_id", DYLORA_IDS)
def test_dylora_rank_identical_per_step(ddp_run, case_id):
    from sparse_lowrank_peft.tuners.dylora.model import sample_rank

    r0, r1 = ok(ddp_run, case_id)
    case = r0["case"]
    defaults = TUNERS["dylora"]()
    expected = [
        sample_rank(case["kwargs"]["r"], step, case["kwargs"].get("rank_seed", defaults.rank_seed),
                    case["kwargs"].get("rank_distribution", defaults.rank_distribution))
        for step in range(STEPS)
    ]
    for step in range(STEPS):
        seen = {b for rec in (r0["ddp"]["ranks"][step], r1["ddp"]["ranks"][step]) for layer in rec.values()
                for b in layer.values()}
        assert seen == {expected[step]}, f"step {step}: ranks {seen} in the layers of the two processes"
    if "single" in r0:
        assert r0["single"]["ranks"] == r0["ddp"]["ranks"]


def test_dylora_samples_several_ranks(ddp_run):
    seen = set()
    for case_id in DYLORA_IDS:
        for rec in ok(ddp_run, case_id)[0]["ddp"]["ranks"]:
            seen |= {b for layer in rec.values() for b in layer.values()}
    assert len(seen) >= 2, f"only rank(s) {seen} were drawn: the per-step sampling was not exercised"


@pytest.mark.parametrize("case_id", [c["id"] for c in CASES if c["method"] == "sltrain"])
def test_support_cache_survives_ddp_buffer_broadcast(ddp_run, case_id):
    """DDP broadcasts rank 0's buffers before every forward (the supports are buffers); the derived support layouts
    must stay cached (built once, never per step) on every rank."""
    for r in ok(ddp_run, case_id):
        ids = r["ddp"]["support_ids"]
        assert ids and ids[0], "no sparse layer recorded"
        for layer in ids[0]:
            assert len({step[layer] for step in ids}) == 1, f"rank {r['rank']}: {layer}'s support was rebuilt"


# ------------------------------------------------------------------------------------------------- Trainer
@pytest.mark.parametrize("case_id", [c["id"] for c in TRAINER_CASES])
def test_trainer_with_training_callbacks_under_ddp(ddp_run, case_id):
    r0, r1 = ok(ddp_run, "trainer-" + case_id)
    assert r0["parallel_mode"] == "ParallelMode.DISTRIBUTED" and r0["world_size"] == WORLD
    assert r0["ddp_wrapped"] == "DistributedDataParallel"
    a, b = r0["final"]["params"], r1["final"]["params"]
    assert all(torch.equal(a[n], b[n]) for n in a), "weights differ between ranks after Trainer steps"
    if r0["case"]["method"] == "sora":
        assert r0["callbacks"] == ["SoraCallback"]
        assert len(r0["gates"]) == 3
        for g0, g1 in zip(r0["gates"], r1["gates"]):
            assert all(torch.equal(g0[n], g1[n]) for n in g0)
        assert any(int((g == 0).sum()) for g in r0["gates"][-1].values()), "SoraCallback's prox step zeroed nothing"
    else:
        from sparse_lowrank_peft.tuners.dylora.model import sample_rank

        assert r0["callbacks"] == ["DyLoraCallback"]
        assert r0["ranks"] == r1["ranks"]
        for step, layers in r0["ranks"]:
            assert {b for layer in layers.values() for b in layer.values()} == {sample_rank(4, step, 0)}


# ------------------------------------------------------------------------------------------------- FSDP
def test_every_tuner_has_fsdp_cases():
    assert set(TUNERS) <= {c["method"] for c in FSDP_CASES}


@pytest.mark.parametrize("fsdp_id", FSDP_IDS)
def test_fsdp_equals_one_process_on_the_global_batch(ddp_run, fsdp_id):
    """FSDP1 (``FullyShardedDataParallel(use_orig_params=True)``) and FSDP2 (``fully_shard``) on CPU with gloo: the
    gathered weights equal the one-process reference (same tolerance as DDP: the sharded reduce-scatter sums in yet
    another order), and both ranks gather the same weights."""
    r0, r1 = ok(ddp_run, fsdp_id)
    reference = ok(ddp_run, r0["case"]["id"])[0]["single"]
    diff, name = max_diff(r0["params"], reference["params"])
    assert diff <= SINGLE_ATOL, f"{fsdp_id}: FSDP and one process differ by {diff:.3g} in {name}"
    assert all(torch.equal(r0["params"][n], r1["params"][n]) for n in r0["params"])
    assert r0["ranks"] == reference["ranks"]  # DyLoRA: the same rank per step (empty for the other tuners)
    if r0["version"] == 2:  # saved from the gathered full state dict on rank 0, reloaded into a fresh base model
        diff, name = max_diff(r0["reloaded"], reference["params"])
        assert diff <= SINGLE_ATOL, f"{fsdp_id}: the reloaded adapter differs by {diff:.3g} in {name}"


# ------------------------------------------------------------------------------------------------- GLUE runner
WORDS = (
    "the a an of to in is was and that it for on with as by at from not are be this which or have has had were "
    "he she they we you his her their its who said will would can could one two new more most also after than"
).split()
needs_rte = pytest.mark.skipif(
    not (SHARED_GLUE / "RTE" / "train.tsv").is_file(),
    reason=f"real GLUE files not found at {SHARED_GLUE} (CI provides them at ../shared/glue)",
)

#: Installed into the launched processes through PYTHONPATH: logs every file a training process (one with RANK
#: set) opens for writing under $SLPEFT_TEST_WRITE_ROOT, to $SLPEFT_TEST_WRITE_LOG.rank<r>. It sees Python-level
#: opens (JSON, PNG, PEFT's adapter_config.json and README, the Trainer's trainer_state.json), not the native writers
#: of torch.save and safetensors; a process that saves an adapter or a checkpoint also writes JSON there.
SITECUSTOMIZE = """\
import os, sys
_rank = os.environ.get("RANK")
_root, _log = os.environ.get("SLPEFT_TEST_WRITE_ROOT"), os.environ.get("SLPEFT_TEST_WRITE_LOG")
if _rank is not None and _root and _log:
    _root = os.path.realpath(_root) + os.sep
    _log = f"{_log}.rank{_rank}"

    def _hook(event, args, _busy=[]):
        if event != "open" or _busy or not isinstance(args[0], (str, bytes, os.PathLike)):
            return
        mode, flags = args[1], args[2]
        writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
            isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
        if not writing:
            return
        _busy.append(1)
        try:
            path = os.path.realpath(os.fsdecode(args[0]))
            if path.startswith(_root):
                with open(_log, "a") as f:
                    f.write(path[len(_root):] + "\\n")
        finally:
            _busy.pop()

    sys.addaudithook(_hook)
    open(_log, "a").close()  # logged by the hook itself: the proof that it runs in this process
"""
@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> str:
    """A 2-layer, 32-wide BERT and a WordPiece vocabulary written here (no hub), as in test_glue_run.py."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-bert-ddp")
    pieces = list(string.ascii_lowercase + string.digits + string.punctuation)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + pieces + ["##" + p for p in pieces] + WORDS
    (folder / "vocab.txt").write_text("\n".join(dict.fromkeys(vocab)) + "\n", encoding="utf-8")
    tokenizer = BertTokenizerFast(vocab_file=str(folder / "vocab.txt"), do_lower_case=True)
    tokenizer.save_pretrained(str(folder))
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)
    torch.manual_seed(0)
    BertModel(config).save_pretrained(str(folder))
    return str(folder)


GLUE_RECIPE = """\
task: rte
method: sora
peft: {{r: 4, lora_alpha: 8, sparse_lambda: 2.0, target_modules: [query, value]}}
model: {model}
data_dir: {data_dir}
max_seq_len: 64
max_train_samples: 64
max_eval_samples: 16
train_batch_size: 4        # per process: 8 examples per optimizer step on 2 processes
eval_batch_size: 8
learning_rate: 0.01
max_steps: 6
save_steps: 2
eval_strategy: steps
eval_steps: 3
logging_steps: 1
num_threads: 1
"""
CRASH_STEP = 4


def glue_recipe(tmp_path: Path, model: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(GLUE_RECIPE.format(model=model, data_dir=SHARED_GLUE))
    return path


def write_logger(tmp_path: Path) -> tuple[Path, dict]:
    """The logs folder and the environment that make every process log the files it opens for writing."""
    logs, site = tmp_path / "logs", tmp_path / "site"
    logs.mkdir()
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    return logs, {"PYTHONPATH": str(site), "SLPEFT_TEST_WRITE_ROOT": str(tmp_path),
                  "SLPEFT_TEST_WRITE_LOG": str(logs / "w")}


def files_written(logs: Path) -> dict:
    """``{rank: [path relative to the test folder, ...]}`` from the write logger."""
    return {rank: sorted({f.removesuffix(".tmp") for f in (logs / f"w.rank{rank}").read_text().split()})
            if (logs / f"w.rank{rank}").is_file() else [] for rank in range(WORLD)}


#: what a launch adds to the recipe: the shipping checks (they do not change what is trained)
SHIPPING = ["verify_reload=true", "export_lora_rank=2"]


def crash_then_resume(tmp_path: Path, model: str) -> dict:
    """Launch 1: ``glue.run.main`` on 2 processes (rank 1 starts 3 s late), every rank crashes right after
    checkpoint-4. Launch 2: ``torchrun --nproc_per_node 2 -m glue.run RECIPE output_dir=... --resume``. Both with the
    write logger. Returns the output folder, the results and the files each rank wrote."""
    recipe, out = glue_recipe(tmp_path, model), tmp_path / "run"
    logs, env = write_logger(tmp_path)
    first = launch([str(TESTS / "_ddp_worker.py"), "glue", str(logs), str(CRASH_STEP), "1", "3", "--", str(recipe),
                    f"output_dir={out}"], tmp_path / "launch1.log", env)
    crashes = [line for rank in range(WORLD) if (logs / f"events.rank{rank}.jsonl").is_file()
               for line in (logs / f"events.rank{rank}.jsonl").read_text().splitlines() if '"crash"' in line]
    assert len(crashes) == WORLD, f"launch 1 did not reach the crash after checkpoint-{CRASH_STEP}:\n{tail(first)}"
    assert first.returncode != 0
    ckpt = out / f"checkpoint-{CRASH_STEP}"
    assert (ckpt / "trainer_state.json").is_file() and (ckpt / "glue_progress.json").is_file()
    assert not (out / "results.json").exists() and not (out / "adapter").exists()
    # the shipping checks may be switched on at resume
    second = launch(["-m", "glue.run", str(recipe), f"output_dir={out}", "--resume", *SHIPPING],
                    tmp_path / "launch2.log", env)
    assert second.returncode == 0, f"resume failed (rc {second.returncode}):\n{tail(second)}"
    print(f"\n[ddp-glue] crash run {first.wall_s:.1f} s, resumed run {second.wall_s:.1f} s")
    return {"out": out, "writes": files_written(logs), "results": json.loads((out / "results.json").read_text())}


def check_finished_run(out: Path, res: dict, writes: dict) -> None:
    """What every finished 2-process run of GLUE_RECIPE must show, whether it ran straight or was resumed."""
    assert res["final_step"] == res["train"]["global_step"] == 6
    assert [e["step"] for e in res["evals"]] == [3, 6]
    assert res["train"]["examples"] == 64 and res["eval_examples"] == {"validation": 16}
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert not list(out.rglob("*.tmp")), "a half-written file was left behind"
    # the saved adapter, reloaded on both processes and evaluated by the run's Trainer, gives the trained metrics
    assert res["method_results"]["reload"]["max_abs_difference"] < 1e-6, res["method_results"]["reload"]
    assert "run/lora/adapter_config.json" in writes[0]  # the plain LoRA export: main process only
    # every file of the run is written by the main process, except each process's own RNG state in a checkpoint
    assert {"run/results.json", "run/run_config.json", "run/adapter/adapter_config.json",
            f"run/checkpoint-{CRASH_STEP}/trainer_state.json"} <= set(writes[0])
    assert "logs/w.rank1" in writes[1]  # the logger runs in rank 1 (it logs the opening of its own file)
    others = [f for f in writes[1] if f.startswith("run/") and not re.fullmatch(r"run/checkpoint-\d+/rng_state_1\.pth", f)]
    assert not others, f"rank 1 wrote {others}"
    # the runner adds the method's callbacks: SoRA's proximal step logs the open ranks at every logging step
    state = json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())
    logged = [e for e in state["log_history"] if "loss" in e]
    assert logged and all("sora_open_ranks" in e for e in logged), logged[:2]


@needs_rte
def test_glue_runner_under_torchrun_writes_only_on_the_main_process(tiny_bert, tmp_path):
    """One ``torchrun --nproc_per_node 2 -m glue.run`` launch (about 25 s): the run finishes, its checkpoints, adapter,
    reload check and plain-LoRA export are written by the main process alone. Crashing and resuming under torchrun
    takes two more launches and runs with ``-m slow`` (the next test)."""
    recipe, out = glue_recipe(tmp_path, tiny_bert), tmp_path / "run"
    logs, env = write_logger(tmp_path)
    proc = launch(["-m", "glue.run", str(recipe), f"output_dir={out}", *SHIPPING], tmp_path / "launch.log", env)
    assert proc.returncode == 0, tail(proc)
    check_finished_run(out, json.loads((out / "results.json").read_text()), files_written(logs))


@pytest.mark.slow
@needs_rte
def test_glue_runner_under_torchrun_resume_equals_uninterrupted(tiny_bert, tmp_path, request):
    """Three more launches (about a minute): every rank crashes after a checkpoint, ``--resume`` finishes the run
    with what a straight run shows, and it ends bit for bit where an uninterrupted one does. Runs only when asked for
    with ``-m slow``."""
    import safetensors.torch

    if "slow" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("slow: three torchrun launches; run with -m slow")
    (tmp_path / "a").mkdir()
    run = crash_then_resume(tmp_path / "a", tiny_bert)
    assert run["results"]["resumed_from"].endswith(f"checkpoint-{CRASH_STEP}")
    check_finished_run(run["out"], run["results"], run["writes"])  # the eval at step 3 is kept from the checkpoint
    assert "logs/events.rank1.jsonl" in run["writes"][1]  # the crash hook's own file, written in rank 1
    recipe, out = glue_recipe(tmp_path, tiny_bert), tmp_path / "straight"
    proc = launch(["-m", "glue.run", str(recipe), f"output_dir={out}"], tmp_path / "straight.log")
    assert proc.returncode == 0, tail(proc)
    straight = json.loads((out / "results.json").read_text())
    assert run["results"]["evals"] == straight["evals"]
    a = safetensors.torch.load_file(str(out / "adapter" / "adapter_model.safetensors"))
    b = safetensors.torch.load_file(str(run["out"] / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


LM_RECIPE = """\
model: tiny-llama
method: sora
peft: {{r: 4, lora_alpha: 8, sparse_lambda: 20.0}}
quantize: nf4
train_file: {text}
block_size: 64
max_train_blocks: 32
max_eval_blocks: 4
train_batch_size: 2
eval_batch_size: 2
learning_rate: 0.01
max_steps: 4
save_steps: 2
logging_steps: 1
num_threads: 1
export_lora_rank: 4
verify_reload: true
"""


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="the recipe's NF4 base needs bitsandbytes")
def test_causal_lm_runner_under_torchrun(tmp_path, request):
    """``torchrun --nproc_per_node 2 -m causal_lm.run``: SoRA on an NF4 tiny LLaMA trains on both processes (the
    tiny model is built once, by the main process), the main process alone writes the run folder (the other only its
    RNG state in a checkpoint), and the saved adapter reloads to the trained model's validation loss. With -m slow
    (22 s on 2 cores): the Trainer pieces it shares with the GLUE runner are checked under torchrun by default
    (test_glue_runner_under_torchrun_writes_only_on_the_main_process)."""
    if "slow" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("slow: a torchrun launch of the LLM runner; run it with -m slow")
    text = tmp_path / "corpus.txt"
    text.write_text(" ".join(WORDS * 40) + "\n", encoding="utf-8")
    recipe, out = tmp_path / "lm.yaml", tmp_path / "run"
    recipe.write_text(LM_RECIPE.format(text=text))
    logs, env = write_logger(tmp_path)
    env["SLPEFT_CACHE"] = str(tmp_path / "cache")
    proc = launch(["-m", "causal_lm.run", str(recipe), f"output_dir={out}"], tmp_path / "launch.log", env)
    assert proc.returncode == 0, tail(proc)
    res = json.loads((out / "results.json").read_text())
    assert res["train"]["steps"] == 4 and res["reload"]["abs_difference"] < 1e-5
    assert (out / "lora" / "adapter_model.safetensors").is_file() and (out / "checkpoint-4").is_dir()
    writes = files_written(logs)
    assert {"run/results.json", "run/adapter/adapter_config.json"} <= set(writes[0])
    assert any(f.startswith("cache/") for f in writes[0]) and not any(f.startswith("cache/") for f in writes[1])
    others = [f for f in writes[1] if f.startswith("run/") and not re.fullmatch(r"run/checkpoint-\d+/rng_state_1\.pth", f)]
    assert not others, f"rank 1 wrote {others}"
