"""Worker processes of tests/test_distributed.py, launched with ``torchrun --nproc_per_node 2`` (gloo, CPU).

Sub-commands (``python tests/_ddp_worker.py COMMAND ...`` under torchrun):

``tuners OUT_DIR CASES_JSON``
    For every case (a tuner config on a tiny model of ``_builders.py``): fingerprint the random supports and bases
    before DDP could broadcast them, then train ``STEPS`` SGD steps under ``DistributedDataParallel(
    find_unused_parameters=False)`` on this rank's shard of a fixed global batch, with the custom-loop helpers
    (``dylora_sample_rank`` before each forward, ``sora_prox_step`` after each optimizer step). Rank 0 then trains
    the same model in one process on the whole global batch (the reference). Everything is saved to
    ``OUT_DIR/<case>.rank<r>.pt`` for the test to compare. Then the Trainer cases: ``transformers.Trainer`` under
    the same process group with ``training_callbacks(model)`` (SoRA's prox step, DyLoRA's rank sampling), and the
    FSDP cases: the same training as a DDP case under FSDP1 and FSDP2 (CPU, gloo).

``glue OUT_DIR STOP_STEP DELAY_RANK DELAY_S -- GLUE_ARGS...``
    ``glue.run.main(GLUE_ARGS)`` unchanged, with two test hooks: rank ``DELAY_RANK`` starts ``DELAY_S`` seconds late
    (ranks of a real cluster never start in lock step), and right after the checkpoint of step ``STOP_STEP`` is
    written every rank exits at once with ``os._exit(17)`` (a crash: no cleanup, no final save), after a barrier so
    no rank is killed mid-write. (Which process writes which file is logged by the test's sitecustomize.)
"""

from __future__ import annotations

import datetime
import importlib
import json
import os
import sys
import time
import traceback
import zlib
from pathlib import Path

STEPS = 4  # optimizer steps per case: B starts at 0, so A moves from step 2 on; 4 steps also see several DyLoRA ranks
GLOBAL_BATCH = 8  # examples per step in all; each of the 2 ranks sees 4
# SGD with momentum, not Adam, for the DDP-vs-one-process comparison: SGD carries a gradient's rounding difference
# into the weights linearly (lr x diff), whereas Adam's g / (sqrt(v) + eps) magnifies the absolute rounding noise of
# a near-zero gradient by up to lr / eps = 1e6. (The Trainer cases below use the Trainer's AdamW.)
LR = 0.05
MOMENTUM = 0.9
WEIGHT_DECAY = 0.01
SORA_LAMBDA = 0.2 / LR  # prox threshold λ·lr = 0.2 per step: a good share of the N(0, 1) gates reaches exactly 0


# ------------------------------------------------------------------------------------------------- tuners
def _crc(t) -> int:
    import torch

    t = t.detach().to("cpu").contiguous()
    if t.dtype == torch.bfloat16:
        t = t.float()
    return zlib.crc32(t.numpy().tobytes())


def fingerprints(peft_model) -> dict:
    """crc32 of every buffer (supports, basis records) and of every frozen random basis that lives outside the
    module state (NOLA's and sparse RandLoRA's shared bases: DDP never broadcasts those)."""
    import torch

    out = {f"buffer:{n}": (tuple(b.shape), str(b.dtype), _crc(b)) for n, b in peft_model.named_buffers()}
    for name, module in delta_layers(peft_model):
        for adapter in module.active_adapters:
            if not module.has_adapter(adapter):
                continue
            if hasattr(module, "get_bases"):  # NOLA
                A, B = module.get_bases(adapter, torch.device("cpu"), torch.float32)
                out[f"bases:{name}:{adapter}"] = (tuple(A.shape) + tuple(B.shape), "float32", _crc(A) ^ (_crc(B) << 1))
            if hasattr(module, "get_basis"):  # sparse RandLoRA
                basis = module.get_basis(adapter)
                A, B = basis.dense_bases(torch.device("cpu"), torch.float32)
                out[f"bases:{name}:{adapter}"] = (tuple(A.shape) + tuple(B.shape), "float32", _crc(A) ^ (_crc(B) << 1))
            if module.has_sparse(adapter):
                out[f"support:{name}:{adapter}"] = ((), "int32", _crc(module.get_support(adapter).indices))
    return out


def make_peft(case):
    from _builders import BUILDERS, TARGETS
    from peft import get_peft_model

    cfg_cls = getattr(importlib.import_module(case["cfg_module"]), case["cfg_name"])
    model, _, task_type = BUILDERS[case["family"]]()
    fields = {**case["kwargs"], **TARGETS[case["family"]]}
    if task_type is not None:
        fields["task_type"] = task_type
    return get_peft_model(model, cfg_cls(**fields))


def global_inputs(family: str, step: int) -> dict:
    import torch
    from _builders import _ids

    if family == "mlp":
        g = torch.Generator().manual_seed(500 + step)
        return {"X": torch.randn(GLOBAL_BATCH, 11, generator=g)}
    return _ids(500 + step, batch=GLOBAL_BATCH, length=7)


def shard(inputs: dict, lo: int, hi: int) -> dict:
    return {k: v[lo:hi] for k, v in inputs.items()}


def delta_layers(peft_model):
    from sparse_lowrank_peft.delta.layer import DeltaLayer

    return [(n, m) for n, m in peft_model.named_modules() if isinstance(m, DeltaLayer)]


def train(forward_model, peft_model, family: str, lo: int, hi: int, record: dict) -> None:
    """``STEPS`` optimizer steps on examples ``lo:hi`` of each global batch, loss = mean squared error to a fixed
    random target (a mean over this process's examples: DDP's gradient average is then the global mean's)."""
    import torch
    from _builders import output_of

    from sparse_lowrank_peft import adapter_param_groups, dylora_sample_rank, sora_prox_step
    from sparse_lowrank_peft.callbacks import _tuner
    from sparse_lowrank_peft.tuners.dylora import DyLoraModel
    from sparse_lowrank_peft.tuners.sora import SoraModel

    opt = torch.optim.SGD(adapter_param_groups(peft_model, WEIGHT_DECAY), lr=LR, momentum=MOMENTUM)
    forward_model.train()
    dylora, sora = _tuner(peft_model, DyLoraModel), _tuner(peft_model, SoraModel)
    trainable = [(n, p) for n, p in peft_model.named_parameters() if p.requires_grad]
    layers = delta_layers(peft_model)
    record.update(ranks=[], gates=[], losses=[], no_grad=[], support_ids=[])
    for step in range(STEPS):
        if dylora is not None:
            dylora_sample_rank(peft_model, step)
            record["ranks"].append({n: dict(m.dylora_rank) for n, m in layers})
        out = output_of(forward_model, shard(global_inputs(family, step), lo, hi))
        g = torch.Generator().manual_seed(900 + step)
        target = torch.randn((GLOBAL_BATCH,) + tuple(out.shape[1:]), generator=g)[lo:hi]
        loss = ((out.float() - target) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        record["no_grad"].append(sorted(n for n, p in trainable if p.grad is None))
        opt.step()
        if sora is not None:
            sora_prox_step(peft_model, LR, sparse_lambda=SORA_LAMBDA)
            record["gates"].append({n: m.sora_gate["default"].detach().clone() for n, m in layers})
        record["losses"].append(float(loss.detach()))
        # identity of the cached SparseSupport objects: a new object means the support layouts were rebuilt
        record["support_ids"].append(
            {n: id(m.get_support("default")) for n, m in layers if m.has_sparse("default")}
        )
    forward_model.eval()


def state(peft_model) -> dict:
    return {
        "params": {n: p.detach().clone() for n, p in peft_model.named_parameters() if p.requires_grad},
        "buffers": {n: b.detach().clone() for n, b in peft_model.named_buffers()},
    }


def run_tuner_case(case: dict, rank: int, world: int, out_dir: Path) -> None:
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    result: dict = {"case": case, "rank": rank, "world": world}
    try:
        pm = make_peft(case)
        result["fingerprints"] = fingerprints(pm)  # before DDP: its constructor broadcasts rank 0's buffers
        result["init"] = state(pm)
        ddp = DDP(pm, find_unused_parameters=False)  # an unused trainable parameter raises in the next step
        per = GLOBAL_BATCH // world
        t0 = time.perf_counter()
        record: dict = {}
        train(ddp, pm, case["family"], rank * per, (rank + 1) * per, record)
        result["ddp_s"] = time.perf_counter() - t0
        result["ddp"] = {**state(pm), **record}
        result["fingerprints_after"] = fingerprints(pm)
    except Exception:  # recorded for the test to show; the other rank fails the same way (or times out)
        result["error"] = traceback.format_exc()
    dist.barrier()
    if rank == 0 and case.get("compare_single", True) and "error" not in result:
        try:
            ref = make_peft(case)
            ref_record: dict = {}
            result["single_init"] = state(ref)
            train(ref, ref, case["family"], 0, GLOBAL_BATCH, ref_record)
            result["single"] = {**state(ref), **ref_record}
        except Exception:
            result["error"] = traceback.format_exc()
    torch.save(result, out_dir / f"{case['id']}.rank{rank}.pt")
    dist.barrier()


def run_trainer_case(case: dict, rank: int, world: int, out_dir: Path) -> None:
    """``transformers.Trainer`` under the launched process group, with ``training_callbacks(model)``."""
    import torch
    import torch.distributed as dist
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from sparse_lowrank_peft import training_callbacks

    result: dict = {"case": case, "rank": rank, "world": world, "ranks": [], "gates": [], "steps": []}
    try:
        pm = make_peft(case)
        layers = delta_layers(pm)
        data = []
        for step in range(3):
            batch = global_inputs(case["family"], step)
            for i in range(GLOBAL_BATCH):
                data.append({"input_ids": batch["input_ids"][i], "attention_mask": batch["attention_mask"][i],
                             "labels": torch.tensor(i % 3)})

        class Recorder(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):  # runs after DyLoraCallback's
                result["ranks"].append((state.global_step, {n: dict(getattr(m, "dylora_rank", {})) for n, m in layers}))

            def on_optimizer_step(self, args, state, control, **kwargs):  # runs after SoraCallback's
                if hasattr(layers[0][1], "sora_gate"):
                    result["gates"].append({n: m.sora_gate["default"].detach().clone() for n, m in layers})

        args = TrainingArguments(
            output_dir=str(out_dir / f"trainer-{case['id']}"), per_device_train_batch_size=GLOBAL_BATCH // world,
            max_steps=3, learning_rate=LR, warmup_steps=0, use_cpu=True, report_to="none", save_strategy="no",
            logging_strategy="no", seed=0, disable_tqdm=True, ddp_find_unused_parameters=False,
            dataloader_num_workers=0,
        )
        callbacks = training_callbacks(pm)
        result["callbacks"] = [type(c).__name__ for c in callbacks]
        trainer = Trainer(model=pm, args=args, train_dataset=data, callbacks=[*callbacks, Recorder()])
        result["parallel_mode"] = str(args.parallel_mode)
        result["world_size"] = args.world_size
        result["ddp_wrapped"] = None
        trainer.train()
        result["ddp_wrapped"] = type(trainer.model_wrapped).__name__
        result["final"] = state(pm)
    except Exception:
        result["error"] = traceback.format_exc()
    torch.save(result, out_dir / f"trainer-{case['id']}.rank{rank}.pt")
    dist.barrier()


def run_fsdp_case(case: dict, version: int, rank: int, world: int, out_dir: Path) -> None:
    """The DDP case's training under FSDP instead: ``version`` 1 is ``FullyShardedDataParallel(use_orig_params=True)``
    (one unit; ``sync_module_states`` needs a GPU), 2 is ``fully_shard`` on every transformer block and the root.
    Saves the gathered full weights; with FSDP2, rank 0 also saves the adapter from the gathered full state dict and
    reloads it (``save_pretrained`` straight from the sharded model fails)."""
    import torch
    import torch.distributed as dist
    from peft import PeftModel

    result: dict = {"case": case, "rank": rank, "version": version}
    try:
        pm = make_peft(case)
        per = GLOBAL_BATCH // world
        record: dict = {}
        if version == 1:
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

            wrapped = FSDP(pm, use_orig_params=True, device_id=torch.device("cpu"))
            train(wrapped, pm, case["family"], rank * per, (rank + 1) * per, record)
            with FSDP.summon_full_params(wrapped):
                result["params"] = {n: p.detach().clone() for n, p in pm.named_parameters() if p.requires_grad}
        else:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh("cpu", (world,))
            for module in pm.modules():
                if type(module).__name__.endswith(("Layer", "Block")) and not hasattr(module, "base_layer"):
                    fully_shard(module, mesh=mesh)
            fully_shard(pm, mesh=mesh)
            train(pm, pm, case["family"], rank * per, (rank + 1) * per, record)
            result["params"] = {
                n: p.full_tensor().detach().clone() for n, p in pm.named_parameters() if p.requires_grad
            }
            full = get_model_state_dict(pm, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            if rank == 0:
                folder = out_dir / f"fsdp2-{case['id']}-adapter"
                pm.save_pretrained(str(folder), state_dict=full)
                from _builders import BUILDERS

                base, _, _ = BUILDERS[case["family"]]()
                loaded = PeftModel.from_pretrained(base, str(folder), is_trainable=True)
                result["reloaded"] = {n: p.detach().clone() for n, p in loaded.named_parameters() if p.requires_grad}
        result["losses"] = record["losses"]
        result["ranks"] = record["ranks"]
    except Exception:
        result["error"] = traceback.format_exc()
    torch.save(result, out_dir / f"fsdp{version}-{case['id']}.rank{rank}.pt")
    dist.barrier()


def main_tuners(out_dir: str, cases_json: str) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    rank, world = dist.get_rank(), dist.get_world_size()
    out = Path(out_dir)
    spec = json.loads(Path(cases_json).read_text())
    for module in spec.get("imports", []):
        importlib.import_module(module)
    timings = {}
    for case in spec["cases"]:
        t0 = time.perf_counter()
        run_tuner_case(case, rank, world, out)
        timings[case["id"]] = time.perf_counter() - t0
    for case in spec.get("fsdp_cases", []):
        for version in (1, 2):
            t0 = time.perf_counter()
            run_fsdp_case(case, version, rank, world, out)
            timings[f"fsdp{version}-" + case["id"]] = time.perf_counter() - t0
    for case in spec.get("trainer_cases", []):
        t0 = time.perf_counter()
        run_trainer_case(case, rank, world, out)
        timings["trainer-" + case["id"]] = time.perf_counter() - t0
    (out / f"timings.rank{rank}.json").write_text(json.dumps(timings, indent=1))
    # every rank is done before any tears its process group down: without this barrier one rank was once aborted
    # at exit ("terminate called without an active exception", SIGABRT) after writing all its results
    dist.barrier()
    dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------- glue
def main_glue(out_dir: str, stop_step: str, delay_rank: str, delay_s: str, glue_args: list[str]) -> int:
    rank = int(os.environ.get("RANK", "0"))
    if rank == int(delay_rank):
        time.sleep(float(delay_s))
    events = Path(out_dir) / f"events.rank{rank}.jsonl"
    events.parent.mkdir(parents=True, exist_ok=True)
    repo = Path(__file__).resolve().parent.parent
    if str(repo) not in sys.path:
        sys.path.insert(0, str(repo))
    from transformers import Trainer, TrainerCallback

    from glue import run as grun

    stop = int(stop_step)

    class CrashAfterCheckpoint(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if stop and state.global_step == stop:
                import torch.distributed as dist

                dist.barrier()  # every rank has finished writing its part of the checkpoint (and its progress file)
                with events.open("a") as f:
                    f.write(json.dumps({"what": "crash", "step": state.global_step}) + "\n")
                os._exit(17)

    original_init = Trainer.__init__

    def init(self, *args, **kwargs):  # appended last: runs after the runner's own on_save callbacks
        kwargs["callbacks"] = [*(kwargs.get("callbacks") or []), CrashAfterCheckpoint()]
        original_init(self, *args, **kwargs)

    Trainer.__init__ = init
    return grun.main(glue_args)


if __name__ == "__main__":
    command = sys.argv[1]
    if command == "tuners":
        main_tuners(sys.argv[2], sys.argv[3])
    elif command == "glue":
        sep = sys.argv.index("--")
        sys.exit(main_glue(*sys.argv[2:6], sys.argv[sep + 1:]))
    else:
        raise SystemExit(f"unknown command {command!r}")
