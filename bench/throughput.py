"""Training-step time and peak memory of every method on a roberta-base-shaped model, side by side with PEFT's.

What is measured: one full training step of ``RobertaForSequenceClassification`` built from ``RobertaConfig()``
(roberta-base shape, random weights: speed and memory do not depend on the values), two labels, on a fixed random
batch -- forward with the labels, backward, the method's own per-step work (AdaLoRA's importance update and budget,
SoRA's proximal gate step, DyLoRA's rank draw), ``AdamW.step`` and ``zero_grad`` -- for:

* ``full``                  full fine-tuning (every weight trains)
* ``lora``                  PEFT LoRA r=8 on query/value (the reference of every ratio)
* ``randlora``              PEFT RandLoRA r=32 on query/value
* ``adalora``               PEFT AdaLoRA (init_r 12 -> target_r 8) on query/value, ``update_and_allocate`` every step
* ``shira``                 PEFT SHiRA r=8 (random mask: r*(in+out) trainable entries per layer), if PEFT has it
* ``supertuning``           PEFT Super-Tuning sparse + LoRA ("Supra": 1% of the entries + LoRA r=8), if PEFT has it
* ``sltrain``               ours: SLTrain r=8 + 1% random sparse term
* ``sora``                  ours: SoRA r=8 (gated rank, proximal step)
* ``dylora``                ours: DyLoRA r=8 (a rank b ~ U{1..8} drawn per step)
* ``nola``                  ours: NOLA r=8 (the library's default 256 + 256 random bases)
* ``sparse_randlora_0.1``   ours: sparse RandLoRA r=32, basis density 0.1
* ``sparse_randlora_0.01``  ours: sparse RandLoRA r=32, basis density 0.01

Every adapter is on ``query``/``value`` with the head (``classifier``) trained in full (``modules_to_save``); the
adapter dropout is 0 for all (PEFT's default) so every method does the same work apart from its adapter.
Batch: 16 x 128 tokens fp32 on CPU; 32 x 512 bf16 (weights and compute) on CUDA.

``--model llama`` times a LLaMA decoder at a small LLM's layer widths (hidden 1024, MLP 2816, grouped-query attention;
4 layers, 8000-token vocabulary) with every linear adapted (``all-linear``) and the next-token loss: what LLM
fine-tuning does, where every method's extra work is on seven matrices per layer. Written to
``throughput-<device>-llama.json``.

``--base nf4`` measures the same on QLoRA's base: every encoder linear a bitsandbytes NF4 ``Linear4bit`` (double
quantization, compute in the run's dtype; embeddings and head stay in full precision), so ``lora`` is QLoRA and each
ratio says what a method costs over QLoRA on the same 4-bit base. Full fine-tuning and the PEFT methods without a
bitsandbytes layer are skipped there. Written to ``throughput-<device>-nf4.json``.

Timing: the methods run interleaved, one training step each per round (so a change of load on the shared machine hits
all of them), after warm-up rounds; figures are medians over the timed rounds. Ratios to PEFT LoRA from the same run
are given as the ratio of medians and as the median of the per-round (paired) ratios, the more robust of the two
under changing load. ``--clock cpu`` times the process's CPU time instead of elapsed time (with ``--threads 1`` it is
the work done, and barely moves when other jobs share the machine). The frozen base weights of the adapter methods
share one copy in memory (the timing process holds every method at once); full fine-tuning has its own.

Peak memory: each method in a child process of its own that builds the model and optimizer and takes one warm-up
step (so Adam's state exists; on CPU on one sequence of the batch, which creates the same state at a fraction of the
cost), then measures one step. On CUDA ``torch.cuda.max_memory_allocated`` (peak allocated
during the step; ``step`` is that minus what was allocated before it). On CPU (no allocator statistics) the child
runs with ``MALLOC_MMAP_THRESHOLD_=65536`` (every large buffer its own mmap, so freed memory leaves the process),
resets the kernel's high-water mark (``/proc/self/clear_refs``) before the step and reads ``VmHWM`` after it: the
peak resident memory of the process during the step (model, optimizer state, gradients, activations and the Python
runtime), and ``step`` = that minus the resident memory before the step.

Targets (issue #10), checked in the output: every tuner of this library at equal rank <= 1.10x PEFT LoRA's step time
(SLTrain <= 1.05x); sparse RandLoRA faster than PEFT RandLoRA; peak memory <= LoRA's + 5% for every tuner, except
sparse RandLoRA, whose issue (#6) asks for less than PEFT RandLoRA's.

Usage::

    OMP_NUM_THREADS=1 python bench/throughput.py --threads 1 --clock cpu     # CPU, 1 warm-up + 5 rounds
    python bench/throughput.py                                              # CUDA when present: 3 + 20 rounds
    python bench/throughput.py --quick                                      # tiny RobertaConfig, 2 rounds (CI)
    python bench/throughput.py --methods lora sltrain --repeats 3
    python bench/throughput.py --print bench/results/throughput-cpu.json

Writes ``bench/results/throughput-<device>.json`` (``-quick`` for ``--quick``; ``--out`` to change) and prints a
markdown table.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from collections import OrderedDict
from pathlib import Path

import torch

if str(Path(__file__).resolve().parent) not in sys.path:  # bench/_env.py, also when loaded by file path
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from _env import (  # noqa: E402
    device_info, device_slug, git_commit, loadavg, print_saved, proc_status, reset_hwm, save_result, versions,
)

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ["query", "value"]
HEAD = ["classifier"]
#: per model (``--model``): the transformers class, the adapted layers, the head trained in full, PEFT's task type
MODELS = {
    "roberta-base": ("RobertaForSequenceClassification", TARGETS, HEAD, "SEQ_CLS"),
    "llama": ("LlamaForCausalLM", "all-linear", [], "CAUSAL_LM"),
}
LR = 1e-4  # irrelevant to the timing; SoRA's proximal step uses it

# name -> (label, group, needs): group "full" / "peft" / "ours"; needs: the PeftType member PEFT must have
METHODS = OrderedDict(
    [
        ("full", ("full fine-tuning", "full", None)),
        ("lora", ("PEFT LoRA r=8", "peft", "LORA")),
        ("randlora", ("PEFT RandLoRA r=32", "peft", "RANDLORA")),
        ("adalora", ("PEFT AdaLoRA r=12->8", "peft", "ADALORA")),
        ("shira", ("PEFT SHiRA r=8", "peft", "SHIRA")),
        ("supertuning", ("PEFT Super-Tuning sparse 1% + LoRA r=8", "peft", "SUPERTUNING")),
        ("sltrain", ("SLTrain r=8 + 1% sparse", "ours", None)),
        ("sora", ("SoRA r=8", "ours", None)),
        ("dylora", ("DyLoRA r=8", "ours", None)),
        ("nola", ("NOLA r=8 (256+256 bases)", "ours", None)),
        ("sparse_randlora_0.1", ("sparse RandLoRA r=32, density 0.1", "ours", None)),
        ("sparse_randlora_0.01", ("sparse RandLoRA r=32, density 0.01", "ours", None)),
    ]
)

# step-time bound vs PEFT LoRA for the tuners compared at equal rank (issue #10)
SPEED_BOUNDS = {"sltrain": 1.05, "sora": 1.10, "dylora": 1.10, "nola": 1.10}
#: the methods that can train on a bitsandbytes 4-bit base (PEFT's SHiRA and Super-Tuning have no bitsandbytes layer)
NF4_METHODS = {"lora", "randlora", "adalora", "sltrain", "sora", "dylora", "nola", "sparse_randlora_0.1",
               "sparse_randlora_0.01"}
MEMORY_SLACK = 1.05  # peak <= LoRA's + 5%


# ------------------------------------------------------------------------------------------------------ environment
# ---------------------------------------------------------------------------------------------------------- models
def model_config(model: str, quick: bool, seq: int):
    """The ``transformers`` config of ``--model``."""
    return llama_config(quick, seq) if model == "llama" else roberta_config(quick, seq)


def llama_config(quick: bool, seq: int):
    """A LLaMA decoder at a small LLM's layer proportions (hidden 1024, MLP 2816, grouped-query attention with 4 key/value
    heads of 16, as in TinyLlama / Llama-3.2-1B), 4 layers and an 8000-token vocabulary so that a CPU step stays a few
    seconds; ``quick``: a tiny one for CI smoke runs."""
    from transformers import LlamaConfig

    if quick:
        return LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max(64, seq))
    return LlamaConfig(vocab_size=8000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
                       num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=max(2048, seq))


def model_kind(config) -> str:
    return "llama" if config.model_type == "llama" else "roberta-base"


def new_model(config):
    """A freshly initialised model of ``config`` (seed 0)."""
    import transformers

    torch.manual_seed(0)
    return getattr(transformers, MODELS[model_kind(config)][0])(config)


def roberta_config(quick: bool, seq: int):
    """``RobertaConfig()`` (roberta-base) with two labels; ``quick``: a tiny RoBERTa for CI smoke runs.

    ``max_position_embeddings`` is roberta-base's 514 (``RobertaConfig()``'s default is 512, but RoBERTa's positions
    start after the padding index, so 512 tokens need 514 rows); it changes no compute.
    """
    from transformers import RobertaConfig

    positions = max(514, seq + 2)
    if quick:
        return RobertaConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                             intermediate_size=128, max_position_embeddings=positions, num_labels=2)
    return RobertaConfig(num_labels=2, max_position_embeddings=positions)


def available(name: str, base: str = "dense") -> tuple[bool, str | None]:
    """Whether ``name`` can run here: the installed PEFT has the PeftType it needs (PEFT's SHiRA and Super-Tuning are
    recent), and on ``base="nf4"`` it can train on a 4-bit base."""
    from peft import PeftType

    if base == "nf4" and name not in NF4_METHODS:
        return False, "does not train on a bitsandbytes 4-bit base"
    needs = METHODS[name][2]
    if needs is None or hasattr(PeftType, needs):
        return True, None
    return False, f"peft {__import__('peft').__version__} has no PeftType.{needs}"


def peft_config(name: str, model: str = "roberta-base"):
    """The PeftConfig of method ``name`` on ``model`` (``None`` for full fine-tuning)."""
    import peft

    import sparse_lowrank_peft as slp

    _, targets, head, task_type = MODELS[model]
    common = {"target_modules": targets if isinstance(targets, str) else list(targets),
              "modules_to_save": list(head) or None, "task_type": task_type}
    if name == "full":
        return None
    if name == "lora":
        return peft.LoraConfig(r=8, lora_alpha=16, **common)
    if name == "randlora":
        return peft.RandLoraConfig(r=32, projection_prng_key=0, **common)
    if name == "adalora":
        # The budget schedule needs the run's length; 1000 steps with 100 warm-up steps: the bench's steps all fall
        # in the phase where the importance scores are updated every step (the per-step cost AdaLoRA adds).
        return peft.AdaLoraConfig(init_r=12, target_r=8, lora_alpha=16, total_step=1000, tinit=100, tfinal=200,
                                  deltaT=10, **common)
    if name == "shira":
        return peft.ShiraConfig(r=8, random_seed=0, **common)
    if name == "supertuning":
        # Super-Tuning's `sparsity` is the frozen fraction: 0.99 trains 1% of the entries, plus LoRA r=8 ("Supra")
        return peft.SupertuningConfig(sparsity=0.99, r=8, lora_alpha=16, **common)
    if name == "sltrain":
        return slp.SLTrainConfig(r=8, lora_alpha=16, sparsity=0.01, **common)
    if name == "sora":
        return slp.SoraConfig(r=8, lora_alpha=16, **common)
    if name == "dylora":
        return slp.DyLoraConfig(r=8, lora_alpha=16, **common)
    if name == "nola":
        return slp.NolaConfig(r=8, **common)
    if name.startswith("sparse_randlora_"):
        density = float(name.rsplit("_", 1)[1])
        return slp.SparseRandLoraConfig(r=32, basis_density=density, **common)
    raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")


def base_state(config) -> dict:
    """Random weights (seed 0), as plain tensors the adapter methods' models share."""
    return {k: v.detach() for k, v in new_model(config).state_dict().items()}


def quantize_base(model, dtype) -> None:
    """QLoRA's base: every linear of the encoder / decoder layers (not the head, not ``lm_head``) becomes a
    bitsandbytes NF4 ``Linear4bit`` computing in ``dtype``, and the model is flagged as ``from_pretrained(..., quantization_config=...)`` flags it (``quantize_linears``):
    PEFT's own tuners pick their bitsandbytes layers only on that flag (without it PEFT's AdaLoRA wraps a
    ``Linear4bit`` as a plain linear and fails in backward)."""
    from sparse_lowrank_peft.delta.quant import quantize_linears

    names = [n for n, m in model.named_modules()
             if n.startswith(("roberta.encoder.", "model.layers.")) and type(m) is torch.nn.Linear]
    quantize_linears(model, names, compute_dtype=dtype)


def build_model(name: str, config, state: dict | None, device, dtype, base: str = "dense"):
    """The model of method ``name`` in train mode; adapter methods' frozen weights are ``state``'s tensors (shared),
    full fine-tuning owns a copy. ``base="nf4"``: the layers' linears in NF4 (each model its own 4-bit copy)."""
    from peft import get_peft_model

    model = new_model(config)
    if state is not None:
        model.load_state_dict(state, assign=name != "full")
    if base == "nf4":
        quantize_base(model, dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = peft_config(name, model_kind(config))
        if cfg is not None:
            model = get_peft_model(model, cfg)
    model = model.to(device=device, dtype=dtype)
    model.train()
    return model


def make_batch(config, batch: int, seq: int, device) -> dict:
    """Random token ids; labels: a class per sequence, or the ids themselves for a causal LM (next-token loss)."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, config.vocab_size, (batch, seq), generator=gen)
    labels = ids if model_kind(config) == "llama" else torch.randint(0, config.num_labels, (batch,), generator=gen)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones(batch, seq, dtype=torch.long).to(device),
            "labels": labels.to(device)}


class Step:
    """One method's model, optimizer and a timed training step."""

    clock = staticmethod(time.perf_counter)  # --clock cpu: time.process_time (CPU time of this process)

    def __init__(self, name, config, state, batch, device, dtype, base="dense"):
        self.name = name
        self.device = device
        self.model = build_model(name, config, state, device, dtype, base)
        self.batch = batch
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.trainable = sum(p.numel() for p in self.params)
        self.total = sum(p.numel() for p in self.model.parameters())
        self.optimizer = torch.optim.AdamW(self.params, lr=LR)
        self.step_index = 0

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _step(self):
        from sparse_lowrank_peft import dylora_sample_rank, sora_prox_step

        name = self.name
        if name == "dylora":
            dylora_sample_rank(self.model, self.step_index)
        loss = self.model(**self.batch).loss
        loss.backward()
        self.optimizer.step()
        if name == "adalora":  # after the optimizer step, before zero_grad (PEFT's docstring)
            self.model.base_model.update_and_allocate(self.step_index)
        if name == "sora":
            sora_prox_step(self.model, LR, count_zeros=False)  # as SoraCallback: no host sync per step
        self.optimizer.zero_grad(set_to_none=True)
        self.step_index += 1

    def run(self) -> float:
        """One training step; returns its seconds on the chosen clock."""
        self._sync()
        t0 = self.clock()
        self._step()
        self._sync()
        return self.clock() - t0


# ------------------------------------------------------------------------------------------------------------ timing
def time_methods(names, config, batch, device, dtype, warmup, repeats, base="dense") -> dict:
    """Interleaved rounds; per method the median step time and, against ``lora``, the paired ratios."""
    state = base_state(config)
    steps = []
    for name in names:
        t0 = time.time()
        steps.append(Step(name, config, state, batch, device, dtype, base))
        print(f"  built {name} in {time.time() - t0:.1f} s", file=sys.stderr, flush=True)
    samples = {s.name: [] for s in steps}
    for rnd in range(warmup + repeats):
        t0 = time.time()
        for step in steps:
            dt = step.run()
            if rnd >= warmup:
                samples[step.name].append(dt)
        kind = "warm-up" if rnd < warmup else "timed"
        print(f"  round {rnd + 1}/{warmup + repeats} ({kind}) {time.time() - t0:.1f} s, load {loadavg()}",
              file=sys.stderr, flush=True)
    out = {}
    for step in steps:
        runs = samples[step.name]
        out[step.name] = {
            "step_s": statistics.median(runs), "step_s_min": min(runs), "step_samples_s": [round(v, 4) for v in runs],
            "trainable": step.trainable, "total": step.total,
        }
    for ref, key in (("lora", "vs_lora"), ("randlora", "vs_randlora")):
        if ref not in samples:
            continue
        for name, runs in samples.items():
            out[name][key] = out[name]["step_s"] / out[ref]["step_s"]
            out[name][f"{key}_paired"] = statistics.median(v / r for v, r in zip(runs, samples[ref]))
    return out


# ------------------------------------------------------------------------------------------------------------ memory
def measure_peak(step: Step) -> dict:
    """Peak bytes of one training step (after a warm-up step): total, and above what was held before it."""
    if step.device.type == "cuda":
        step.run()  # warm-up: optimizer state, lazily built supports and bases, Triton autotuning
    else:  # warm-up on one sequence: creates the same optimizer state and lazy buffers at 1/batch of the cost
        full = step.batch
        step.batch = {k: v[:1] for k, v in full.items()}
        step.run()
        step.batch = full
    if step.device.type == "cuda":
        torch.cuda.synchronize(step.device)
        torch.cuda.reset_peak_memory_stats(step.device)
        before = torch.cuda.memory_allocated(step.device)
        step.run()
        peak = torch.cuda.max_memory_allocated(step.device)
        return {"peak_bytes": peak, "before_bytes": before, "step_bytes": peak - before}
    reset_hwm()
    _, before = proc_status()
    step.run()
    hwm, _ = proc_status()
    return {"peak_bytes": hwm, "before_bytes": before, "step_bytes": hwm - before}


def memory_worker(args) -> None:
    """Child process: peak memory of the methods in ``--methods`` (one each, in turn), printed as JSON."""
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    config = model_config(args.model, args.quick, args.seq)
    batch = make_batch(config, args.batch, args.seq, device)
    out = {}
    for name in args.methods:
        step = Step(name, config, None, batch, device, dtype, args.base)
        out[name] = measure_peak(step)
        del step
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print("MEMORY-JSON " + json.dumps(out), flush=True)


def memory_methods(names, args) -> dict:
    """Peak memory per method, each in a child process of its own (``--quick``: one child for all, CI smoke)."""
    if args.device == "cpu" and not (Path("/proc/self/clear_refs").exists() and Path("/proc/self/status").exists()):
        return {n: None for n in names}
    groups = [names] if args.quick else [[n] for n in names]
    out = {}
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    for group in groups:
        cmd = [
            sys.executable, str(Path(__file__).resolve()), "--memory-worker", "--device", args.device,
            "--dtype", args.dtype, "--batch", str(args.batch), "--seq", str(args.seq), "--base", args.base,
            "--model", args.model, "--methods", *group,
        ]
        if args.quick:
            cmd.append("--quick")
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        t0 = time.time()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        found = None
        for line in proc.stdout.splitlines():
            if line.startswith("MEMORY-JSON "):
                found = json.loads(line[len("MEMORY-JSON "):])
        if found is None:
            print(f"memory worker for {group} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}", file=sys.stderr)
            found = {n: None for n in group}
        out.update(found)
        print(f"  memory {','.join(group)} in {time.time() - t0:.1f} s", file=sys.stderr, flush=True)
    return out


# ----------------------------------------------------------------------------------------------------------- targets
def evaluate_targets(rows: dict) -> list[dict]:
    """Issue #10's targets from this run's rows: step time against PEFT LoRA (equal rank) or PEFT RandLoRA (sparse
    RandLoRA), peak memory against LoRA's + 5% (sparse RandLoRA: below PEFT RandLoRA's, issue #6)."""
    targets = []
    lora, randlora = rows.get("lora"), rows.get("randlora")
    for name, bound in SPEED_BOUNDS.items():
        r = rows.get(name)
        if r and lora and r.get("vs_lora") is not None:
            targets.append({
                "name": f"{name}: step time <= {bound:.2f}x PEFT LoRA r=8", "method": name,
                "measured": round(r["vs_lora"], 3), "paired": round(r["vs_lora_paired"], 3),
                "bound": f"<= {bound:.2f}", "met": r["vs_lora"] <= bound,
            })
    for name, r in rows.items():
        if name.startswith("sparse_randlora") and randlora and r.get("vs_randlora") is not None:
            targets.append({
                "name": f"{name}: step time < PEFT RandLoRA r=32", "method": name,
                "measured": round(r["vs_randlora"], 3), "paired": round(r["vs_randlora_paired"], 3),
                "bound": "< 1.00 (x RandLoRA)", "met": r["vs_randlora"] < 1.0,
            })
    for name, r in rows.items():
        if METHODS[name][1] != "ours" or r.get("peak_mib") is None:
            continue
        if name.startswith("sparse_randlora"):
            if randlora and randlora.get("peak_mib") is not None:
                targets.append({
                    "name": f"{name}: peak memory < PEFT RandLoRA's (MiB)", "method": name,
                    "measured": r["peak_mib"], "paired": None, "bound": f"< {randlora['peak_mib']:.1f}",
                    "met": r["peak_mib"] < randlora["peak_mib"],
                })
        elif lora and lora.get("peak_mib") is not None:
            bound = lora["peak_mib"] * MEMORY_SLACK
            targets.append({
                "name": f"{name}: peak memory <= PEFT LoRA's + 5% (MiB)", "method": name,
                "measured": r["peak_mib"], "paired": None, "bound": f"<= {bound:.1f}", "met": r["peak_mib"] <= bound,
            })
    return targets


# ------------------------------------------------------------------------------------------------------------ report
def _fmt(v, spec):
    return "–" if v is None else format(v, spec)


def _shape(settings: dict) -> str:
    m = settings.get("model") or {}
    if settings.get("model_name") == "llama":
        return (f"LLaMA decoder {m.get('num_hidden_layers')} x {m.get('hidden_size')} (MLP {m.get('intermediate_size')}, "
                f"vocabulary {m.get('vocab_size')}), every linear adapted")
    return "roberta-base shape"


def markdown(result: dict) -> str:
    """The results as a markdown table (and the targets), with the conditions of the run."""
    s, dev, v = result["settings"], result["device"], result["versions"]
    lines = [
        f"Device: {dev['name']} ({dev['type']}), {_shape(s)}{' (quick: tiny config)' if s['quick'] else ''}"
        f"{', layer linears in NF4 (LoRA: QLoRA)' if s.get('base') == 'nf4' else ''}, "
        f"batch {s['batch']} x {s['seq']} tokens, {s['dtype']}, torch {v['torch']}, transformers {v['transformers']}, "
        f"peft {v['peft']}, commit {(result.get('commit') or '?')[:10]}{' (dirty)' if result.get('dirty') else ''}, "
        f"load average {result['conditions']['loadavg_start']} -> {result['conditions'].get('loadavg_end', '(running)')}"
        f", median of {s['repeats']} steps after {s['warmup']} warm-up (methods interleaved), {s['clock']} clock, "
        f"{result['conditions']['torch_threads']} torch threads.",
        "",
        "| method | trainable params | step s | ×LoRA (paired) | ×RandLoRA (paired) | peak MiB | step MiB |",
        "|:---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in result["results"].items():
        if r.get("skipped"):
            lines.append(f"| {r['label']} | – | skipped: {r['skipped']} | – | – | – | – |")
            continue
        vs_l = f"{r['vs_lora']:.2f} ({r['vs_lora_paired']:.2f})" if r.get("vs_lora") is not None else "–"
        vs_r = (f"{r['vs_randlora']:.2f} ({r['vs_randlora_paired']:.2f})"
                if r.get("vs_randlora") is not None and name.startswith(("randlora", "sparse_randlora")) else "–")
        lines.append(
            f"| {r['label']} | {r['trainable']:,} | {r['step_s']:.3f} | {vs_l} | {vs_r} | "
            f"{_fmt(r.get('peak_mib'), '.1f')} | {_fmt(r.get('step_mib'), '.1f')} |"
        )
    if result.get("targets"):
        lines += ["", "| target | measured | paired | bound | met |", "|:---|---:|---:|:---|:---:|"]
        for t in result["targets"]:
            paired = "–" if t.get("paired") is None else t["paired"]
            lines.append(f"| {t['name']} | {t['measured']} | {paired} | {t['bound']} | {'yes' if t['met'] else 'NO'} |")
        if s["quick"]:
            lines.append("\n(quick run on a tiny config: the targets are the issue's for roberta-base, shown for the "
                         "schema only)")
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------------------------- main
def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny RobertaConfig, batch 2 x 16, 2 rounds (CI smoke)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--dtype", default=None, help="float32 / bfloat16 (default: fp32 on CPU, bf16 on CUDA)")
    parser.add_argument("--batch", type=int, default=None, help="sequences per step (CPU 16, CUDA 32, quick 2)")
    parser.add_argument("--seq", type=int, default=None, help="tokens per sequence (CPU 128, CUDA 512, quick 16)")
    parser.add_argument("--methods", nargs="+", default=None, help=f"subset of: {', '.join(METHODS)}")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up rounds (default 1; CUDA 3)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default 5; CUDA 20; quick 2)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory children")
    parser.add_argument("--model", choices=tuple(MODELS), default="roberta-base",
                        help="roberta-base: query/value adapters and a classifier (default); llama: a LLaMA decoder "
                        "at a small LLM's layer widths with every linear adapted (all-linear), next-token loss")
    parser.add_argument("--base", choices=("dense", "nf4"), default="dense",
                        help="dense: the frozen weights in the run's dtype (default); nf4: every linear of the "
                        "encoder / decoder layers in bitsandbytes NF4, QLoRA's base")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument(
        "--clock", choices=("wall", "cpu"), default="wall",
        help="wall: elapsed time (default); cpu: this process's CPU time (CPU only; with --threads 1 the work done, "
        "much less sensitive to other jobs on a shared machine)",
    )
    parser.add_argument("--out", default=None, help="results JSON (default bench/results/throughput-<device>.json)")
    parser.add_argument("--print", dest="print_json", default=None, help="print the markdown of a results file, exit")
    parser.add_argument("--memory-worker", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def resolve_defaults(args) -> torch.device:
    """Fill the device-dependent defaults (dtype, batch, sequence, warm-up) and set threads and clock."""
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if args.dtype is None:
        args.dtype = "bfloat16" if cuda else "float32"
    if args.batch is None:
        args.batch = 2 if args.quick else 32 if cuda else 16
    if args.seq is None:
        args.seq = 16 if args.quick else 512 if cuda else 128
    if args.repeats is None:
        args.repeats = 2 if args.quick else 20 if cuda else 5
    if args.warmup is None:
        args.warmup = 3 if cuda and not args.quick else 1
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "cpu":
        if cuda:
            raise SystemExit("--clock cpu measures CPU time; on CUDA use the default wall clock")
        Step.clock = staticmethod(time.process_time)
    return device


def select_methods(args) -> tuple[list[str], list[str], dict[str, str]]:
    """The methods asked for (all by default), those of them that can run here, and why the others cannot."""
    if args.methods:
        unknown = sorted(set(args.methods) - set(METHODS))
        if unknown:
            raise SystemExit(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    wanted = [n for n in METHODS if not args.methods or n in args.methods]
    names, skipped = [], {}
    for n in wanted:
        ok, why = available(n, args.base)
        (names.append(n) if ok else skipped.__setitem__(n, why))
    return wanted, names, skipped


def result_header(args, argv, config, info: dict, names: list[str]) -> dict:
    """Everything the result file records before the first timing: command, machine, versions, settings."""
    commit, dirty = git_commit("bench/throughput.py")
    cuda = args.device.startswith("cuda")
    return {
        "bench": "throughput", "schema": 1,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python bench/throughput.py", *(argv if argv is not None else sys.argv[1:])]),
        "device": info, "versions": versions(), "commit": commit, "dirty": dirty,
        "settings": {
            "quick": args.quick, "batch": args.batch, "seq": args.seq, "dtype": args.dtype, "warmup": args.warmup,
            "repeats": args.repeats, "clock": args.clock, "methods": names, "model_name": args.model,
            "targets": MODELS[args.model][1], "head": MODELS[args.model][2],
            "base": args.base,
            "adapter_dropout": 0.0, "optimizer": f"AdamW lr {LR}",
            "model": {k: getattr(config, k) for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                                      "intermediate_size", "vocab_size", "max_position_embeddings")},
            "memory": None if args.no_memory else ("cuda max_memory_allocated" if cuda else "VmHWM (child process)"),
        },
        "conditions": {"loadavg_start": loadavg(), "torch_threads": torch.get_num_threads(),
                       "omp_num_threads": os.environ.get("OMP_NUM_THREADS")},
        "results": {},
        "complete": False,
    }


def add_memory(result: dict, names: list[str], args) -> None:
    """Each method's peak and step memory, measured in child processes (CPU) or on the device (CUDA)."""
    memory = memory_methods(names, args)
    for n in names:
        m = memory.get(n)
        row = result["results"][n]
        for key in ("peak", "step", "before"):
            row[f"{key}_mib"] = None if m is None else round(m[f"{key}_bytes"] / 2**20, 1)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.print_json:
        return print_saved(args.print_json, markdown)
    device = resolve_defaults(args)

    import sparse_lowrank_peft  # noqa: F401  (registers the tuners with PEFT)

    if args.memory_worker:
        memory_worker(args)
        return {}
    wanted, names, skipped = select_methods(args)
    config = model_config(args.model, args.quick, args.seq)
    info = device_info(device)
    result = result_header(args, argv, config, info, names)
    suffix = ("-llama" if args.model == "llama" else "") + ("-nf4" if args.base == "nf4" else "") + (
        "-quick" if args.quick else "")
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / f"throughput-{device_slug(info)}{suffix}.json"
    out.parent.mkdir(parents=True, exist_ok=True)

    t0 = time.time()
    batch = make_batch(config, args.batch, args.seq, device)
    dtype = getattr(torch, args.dtype)
    timing = time_methods(names, config, batch, device, dtype, args.warmup, args.repeats, args.base) if names else {}
    for n in wanted:
        row = {"label": METHODS[n][0], "group": METHODS[n][1]}
        if n in skipped:
            row["skipped"] = skipped[n]
        else:
            row.update({k: (round(v, 5) if isinstance(v, float) else v) for k, v in timing[n].items()})
        result["results"][n] = row
    result["conditions"]["timing_s"] = round(time.time() - t0, 1)
    out.write_text(json.dumps(result, indent=1) + "\n")  # partial: timings without memory

    if not args.no_memory and names:
        add_memory(result, names, args)
    result["conditions"]["loadavg_end"] = loadavg()
    result["conditions"]["total_s"] = round(time.time() - t0, 1)
    result["targets"] = evaluate_targets({n: r for n, r in result["results"].items() if not r.get("skipped")})
    result["complete"] = True
    return save_result(out, result, markdown)


if __name__ == "__main__":
    main()
