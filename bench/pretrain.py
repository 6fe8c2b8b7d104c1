"""SLTrain pretraining from scratch on tinyshakespeare: full rank vs low rank vs SLTrain (issue #23, arXiv 2406.02214).

The claim under test is the shape of the paper's Table 2 at a size our CPUs reach: SLTrain (``W = (α/r)·B·A + S``,
δ = 0.03) reaches the validation perplexity of full rank with far fewer linear-layer parameters, and low rank alone
(``B·A``, the same r) is clearly worse; with per-layer updates SLTrain's peak training memory is below full rank's.

Setup (every method the same except its linear layers and learning rate):

* data: ``../shared/text/tinyshakespeare.txt``, first 90% train, last 10% validation, character-level (the
  text's 65 distinct characters are the vocabulary; no hub). A batch is 16 random windows of 128 characters drawn from
  the train split by a generator seeded with the run's seed, so every method sees the same tokens for one seed;
* model: ``LlamaForCausalLM`` from ``LlamaConfig`` (hidden 128, MLP 352, 4 layers, 4 heads, untied embeddings; rank 40);
  every attention and MLP projection is the linear under test (the paper's target set); embeddings, norms and the
  head stay dense in all methods;
* methods: ``full`` (dense, ordinary AdamW loop), ``lowrank`` (SLTrainLinear with density 0: ``B·A`` only, both
  factors drawn at init -- with ``B = 0`` and no S every block is 0 and stays 0, see ``SLTrainLinear``) and
  ``sltrain`` (rank r, density 0.03), both trained with per-layer updates (``PerLayerOptimizer``, one AdamW per
  parameter stepped in backward); same steps, warm-up (10%) + cosine to 10% of the peak LR, no weight decay, no
  clipping (global clipping is impossible with per-layer updates, so none of the methods clips);
* learning rate: per method, chosen by a short sweep (``--sweep-steps`` steps, seed 0) among ``--lrs`` scored on
  a *dev* slice (the last 5% of the train split, which the sweep runs do not train on) -- never on validation;
* measured per run: validation loss/perplexity every ``--eval-every`` steps on a fixed 16k-character subset and at
  the end on the whole validation split (non-overlapping windows), linear-layer parameters, optimizer-state bytes
  (the AdamW moments), median step time (1 thread; each run is its own process) and the run's ``ru_maxrss``;
* peak memory of a training step, in probes of their own: a fresh process per variant started with
  ``MALLOC_MMAP_THRESHOLD_=65536`` (every large buffer its own mapping, so freed memory leaves the process and the
  resident size follows what is allocated; this doubles the step time, hence not in the timed runs) builds the model
  and optimizer, takes two warm-up steps, resets the kernel's peak-RSS mark (``/proc/self/clear_refs``) and reads
  ``VmHWM`` after a third step: the process's peak during a step (runtime, model, optimizer state, gradients,
  activations). Once at the training shape (batch 16 x 128) and once on a wider model of the same family
  (``--memory-hidden``, default 768, 4 layers, batch 2 x 128, rank scaled with the width), where weights,
  gradients and optimizer state -- what the paper's memory saving is about -- are a larger share of the total:
  full rank with and without per-layer updates, low rank and SLTrain with them, SLTrain without.

Usage::

    python bench/pretrain.py                        # the committed run (~25 min on one core)
    python bench/pretrain.py --quick                # tiny smoke run (seconds), writes pretrain-cpu-quick.json
    python bench/pretrain.py --print bench/results/pretrain-cpu.json

Writes ``bench/results/pretrain-cpu.json`` and ``bench/results/pretrain-cpu.png`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _env import device_info, git_commit, loadavg, proc_status, reset_hwm, versions  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TEXT = ROOT.parent / "shared" / "text" / "tinyshakespeare.txt"
RESULTS = ROOT / "bench" / "results"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
METHODS = ("full", "lowrank", "sltrain")
DENSITY = 0.03
ALPHA = 32.0
MiB = 2**20


# ------------------------------------------------------------------------------------------------------------ data
def load_splits(path: Path = TEXT):
    """``(train, val, vocab)``: int64 tensors of character ids (first 90% / last 10%) and the sorted characters."""
    import torch

    text = path.read_text()
    vocab = sorted(set(text))
    index = {c: i for i, c in enumerate(vocab)}
    ids = torch.tensor([index[c] for c in text], dtype=torch.int64)
    cut = int(len(ids) * 0.9)
    return ids[:cut], ids[cut:], vocab


def random_batch(data, batch: int, seq: int, gen):
    """``batch`` random windows of ``seq`` ids (inputs = labels; the model shifts them)."""
    import torch

    starts = torch.randint(0, len(data) - seq, (batch,), generator=gen)
    return torch.stack([data[s:s + seq] for s in starts.tolist()])


def windows(data, seq: int, limit: int | None = None):
    """Non-overlapping windows of ``seq`` ids (the first ``limit`` of them)."""
    n = len(data) // seq
    n = n if limit is None else min(n, limit)
    return data[: n * seq].view(n, seq)


# ------------------------------------------------------------------------------------------------------------ model
def model_config(hidden: int, intermediate: int, layers: int, seq: int, vocab: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=seq, tie_word_embeddings=False,
        attention_dropout=0.0,
    )


def build(method: str, cfg, rank: int, seed: int, lr: float, per_layer: bool):
    """``(model, optimizer)`` for one method; the optimizer is a ``PerLayerOptimizer`` when ``per_layer``."""
    import torch
    from transformers import LlamaForCausalLM

    from sparse_lowrank_peft.pretrain import PerLayerOptimizer, to_sltrain

    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    if method != "full":
        to_sltrain(model, TARGETS, rank=rank, density=DENSITY if method == "sltrain" else 0.0, alpha=ALPHA, seed=seed)
    factory = lambda ps: torch.optim.AdamW(ps, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)  # noqa: E731
    opt = PerLayerOptimizer(model.parameters(), factory) if per_layer else factory(list(model.parameters()))
    return model, opt


def lr_lambda(steps: int):
    warm = max(1, steps // 10)

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(1, steps - warm)
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return f


def evaluate(model, data, batch: int) -> float:
    """Mean next-token loss (nats) over the rows of ``data`` ``(n, seq)``."""
    import torch

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(data), batch):
            chunk = data[i:i + batch]
            loss = model(input_ids=chunk, labels=chunk).loss
            n = chunk.numel() - chunk.shape[0]
            total, count = total + float(loss) * n, count + n
    model.train()
    return total / count


def optimizer_state_bytes(opt) -> int:
    import torch

    if hasattr(opt, "state_bytes"):
        return opt.state_bytes()
    return sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
               if isinstance(t, torch.Tensor) and t.dim() > 0)


# ------------------------------------------------------------------------------------------------------------ one run
def train_run(spec: dict) -> dict:
    """One training run in this process (a worker): returns the curve and the measurements."""
    import torch

    torch.set_num_threads(1)
    train, val, vocab = load_splits()
    if spec["dev"]:  # the LR sweep: train on the first 95% of the train split, score on the last 5%
        cut = int(len(train) * 0.95)
        train, heldout = train[:cut], train[cut:]
    else:
        heldout = val
    cfg = model_config(spec["hidden"], spec["intermediate"], spec["layers"], spec["seq"], len(vocab))
    model, opt = build(spec["method"], cfg, spec["rank"], spec["seed"], spec["lr"], spec["per_layer"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(spec["steps"]))
    gen = torch.Generator().manual_seed(1000 + spec["seed"])
    probe = windows(heldout, spec["seq"], spec["eval_windows"])
    curve, times = [], []
    for step in range(spec["steps"]):
        ids = random_batch(train, spec["batch"], spec["seq"], gen)
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        times.append(time.perf_counter() - t0)
        if (step + 1) % spec["eval_every"] == 0 or step + 1 == spec["steps"]:
            curve.append({"step": step + 1, "train_loss": float(loss), "val_loss": evaluate(model, probe, 16)})
    final = evaluate(model, windows(heldout, spec["seq"]), 16)
    from sparse_lowrank_peft.pretrain import linear_parameter_count

    return {
        **spec, "curve": curve, "final_loss": final, "final_ppl": math.exp(final),
        "linear_params": linear_parameter_count(model, TARGETS),
        "total_params": sum(p.numel() for p in model.parameters()),
        "optimizer_state_bytes": optimizer_state_bytes(opt),
        "step_s_median": statistics.median(times[3:]) if len(times) > 3 else statistics.median(times),
        "maxrss_kib": _maxrss(),
    }


def memory_probe(spec: dict) -> dict:
    """Peak memory of one training step (after two warm-up steps), random tokens (a worker)."""
    import torch

    torch.set_num_threads(1)
    cfg = model_config(spec["hidden"], spec["intermediate"], spec["layers"], spec["seq"], 65)
    model, opt = build(spec["method"], cfg, spec["rank"], 0, 1e-3, spec["per_layer"])
    gen = torch.Generator().manual_seed(0)
    data = torch.randint(0, 65, (100_000,), generator=gen)
    for step in range(3):
        ids = random_batch(data, spec["batch"], spec["seq"], gen)
        if step == 2:
            reset_hwm()
            _, before = proc_status()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    hwm, _ = proc_status()
    from sparse_lowrank_peft.pretrain import linear_parameter_count

    return {**spec, "peak_bytes": hwm, "before_bytes": before, "step_bytes": hwm - before,
            "linear_params": linear_parameter_count(model, TARGETS),
            "optimizer_state_bytes": optimizer_state_bytes(opt)}


def _maxrss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def run_child(kind: str, spec: dict) -> dict:
    """Run ``train_run`` / ``memory_probe`` in a fresh process (own peak memory, own allocator state)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    if kind == "memory":
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, json.dumps(spec)]
    t0 = time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT-JSON ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"{kind} {spec} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    out = json.loads(line[len("RESULT-JSON "):])
    out["wall_s"] = round(time.time() - t0, 1)
    return out


# ------------------------------------------------------------------------------------------------------------ driver
def base_spec(args) -> dict:
    return {
        "hidden": args.hidden, "intermediate": args.intermediate, "layers": args.layers, "seq": args.seq,
        "batch": args.batch, "rank": args.rank, "eval_every": args.eval_every, "eval_windows": args.eval_windows,
    }


def sweep(args, methods) -> dict:
    """Per method: the LR of ``args.lrs`` with the lowest dev loss after ``args.sweep_steps`` steps (seed 0)."""
    rows, best = [], {}
    for method in methods:
        for lr in args.lrs:
            spec = {**base_spec(args), "method": method, "lr": lr, "seed": 0, "steps": args.sweep_steps,
                    "dev": True, "per_layer": method != "full", "eval_every": args.sweep_steps}
            r = run_child("train", spec)
            rows.append({"method": method, "lr": lr, "dev_loss": r["final_loss"], "wall_s": r["wall_s"]})
            print(f"  sweep {method} lr {lr:g}: dev loss {r['final_loss']:.4f} ({r['wall_s']} s)", flush=True)
        mine = [row for row in rows if row["method"] == method]
        best[method] = min(mine, key=lambda row: row["dev_loss"])["lr"]
    return {"rows": rows, "chosen": best}


def summarize(runs: list[dict]) -> dict:
    out = {}
    for method in METHODS:
        rs = [r for r in runs if r["method"] == method]
        if not rs:
            continue
        ppl = [r["final_ppl"] for r in rs]
        out[method] = {
            "lr": rs[0]["lr"], "seeds": [r["seed"] for r in rs], "val_ppl": ppl,
            "val_ppl_mean": statistics.mean(ppl), "val_ppl_std": statistics.stdev(ppl) if len(ppl) > 1 else 0.0,
            "linear_params": rs[0]["linear_params"], "total_params": rs[0]["total_params"],
            "optimizer_state_bytes": rs[0]["optimizer_state_bytes"],
            "step_s_median": statistics.median(r["step_s_median"] for r in rs),
            "maxrss_mib": statistics.median(r["maxrss_kib"] / 1024 for r in rs),
            "per_layer_updates": rs[0]["per_layer"],
        }
    return out


def checks(summary: dict, memory: dict[str, list[dict]]) -> list[dict]:
    """The issue's Done-when bars, as measured (none unless all three methods ran)."""
    if not all(m in summary for m in METHODS):
        return []
    full, low, sl = summary["full"], summary["lowrank"], summary["sltrain"]
    out = [
        {"name": "SLTrain val ppl within 5% of full rank's", "measured": sl["val_ppl_mean"] / full["val_ppl_mean"],
         "bound": "<= 1.05", "met": sl["val_ppl_mean"] <= 1.05 * full["val_ppl_mean"]},
        {"name": "SLTrain linear params <= 60% of full rank's", "measured": sl["linear_params"] / full["linear_params"],
         "bound": "<= 0.60", "met": sl["linear_params"] <= 0.6 * full["linear_params"]},
        {"name": "low rank measurably worse than SLTrain (mean ppl gap > 1% and > 2x the larger seed std)",
         "measured": low["val_ppl_mean"] / sl["val_ppl_mean"], "bound": "> 1.01 and gap > 2 std",
         "met": low["val_ppl_mean"] > 1.01 * sl["val_ppl_mean"]
         and low["val_ppl_mean"] - sl["val_ppl_mean"] > 2 * max(low["val_ppl_std"], sl["val_ppl_std"])},
    ]
    for where, rows in memory.items():
        probe = {m["label"]: m for m in rows}
        if "full" in probe and "sltrain+per-layer" in probe:
            a, b = probe["sltrain+per-layer"]["peak_bytes"] / MiB, probe["full"]["peak_bytes"] / MiB
            out.append({"name": f"SLTrain (per-layer) peak step memory below full rank's, {where} (MiB)",
                        "measured": a, "bound": f"< {b:.1f}", "met": a < b})
    return out


MEMORY_VARIANTS = [("full", "full", False), ("full+per-layer", "full", True), ("lowrank+per-layer", "lowrank", True),
                   ("sltrain", "sltrain", False), ("sltrain+per-layer", "sltrain", True)]


def memory_runs(args, wide: bool) -> list[dict]:
    """Peak step memory of every variant of ``MEMORY_VARIANTS`` (training shape, or ``--memory-hidden`` if wide)."""
    if wide:
        hidden = args.memory_hidden
        spec = {"hidden": hidden, "intermediate": hidden * args.intermediate // args.hidden, "layers": args.layers,
                "seq": args.seq, "batch": 2, "rank": hidden * args.rank // args.hidden}
        variants = MEMORY_VARIANTS
    else:
        spec = {k: v for k, v in base_spec(args).items() if k not in ("eval_every", "eval_windows")}
        variants = [v for v in MEMORY_VARIANTS if v[0] in ("full", "lowrank+per-layer", "sltrain+per-layer")]
    out = []
    for label, method, per_layer in variants:
        r = run_child("memory", {**spec, "method": method, "per_layer": per_layer})
        r["label"] = label
        print(f"  memory {label}: peak {r['peak_bytes'] / MiB:.1f} MiB (step +{r['step_bytes'] / MiB:.1f})", flush=True)
        out.append(r)
    return out


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    colors = {"full": "tab:blue", "lowrank": "tab:red", "sltrain": "tab:green"}
    for method in METHODS:
        for i, r in enumerate(rr for rr in runs if rr["method"] == method):
            steps = [c["step"] for c in r["curve"]]
            ppl = [math.exp(c["val_loss"]) for c in r["curve"]]
            ax.plot(steps, ppl, color=colors[method], alpha=0.85, lw=1.2,
                    label=f"{method} (lr {r['lr']:g})" if i == 0 else None)
    ax.set_xlabel("step (16 x 128 characters)")
    ax.set_ylabel("validation perplexity (16k-char subset)")
    ax.set_yscale("log")
    ax.set_title("LLaMA on tinyshakespeare (char level), one line per seed")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table(result: dict) -> str:
    s, full = result["summary"], result["summary"].get("full")
    lines = [
        "| method | lr | val ppl (mean ± std) | linear params | × full | optimizer state MiB | step s | run maxrss MiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m, r in s.items():
        ratio = f"{r['linear_params'] / full['linear_params']:.3f}" if full else "-"
        lines.append(
            f"| {m}{' (per-layer)' if r['per_layer_updates'] else ''} | {r['lr']:g} | {r['val_ppl_mean']:.3f} ± "
            f"{r['val_ppl_std']:.3f} | {r['linear_params']:,} | {ratio} | {r['optimizer_state_bytes'] / MiB:.2f} | "
            f"{r['step_s_median']:.3f} | {r['maxrss_mib']:.1f} |"
        )
    for where, mem in (result.get("memory_probe") or {}).items():
        lines += ["", f"Peak memory of one training step, {where} (hidden {mem[0]['hidden']}, batch {mem[0]['batch']} "
                  f"x {mem[0]['seq']}, rank {mem[0]['rank']}):", "",
                  "| variant | linear params | optimizer state MiB | peak MiB | step MiB |", "|---|---|---|---|---|"]
        for m in mem:
            lines.append(f"| {m['label']} | {m['linear_params']:,} | {m['optimizer_state_bytes'] / MiB:.1f} | "
                         f"{m['peak_bytes'] / MiB:.1f} | {m['step_bytes'] / MiB:.1f} |")
    lines += ["", "| check | measured | bound | met |", "|---|---|---|---|"]
    for c in result["checks"]:
        lines.append(f"| {c['name']} | {c['measured']:.3f} | {c['bound']} | {'yes' if c['met'] else 'no'} |")
    return "\n".join(lines)


def write_docs(result: dict, source: Path, doc: Path) -> None:
    """Replace the text between the ``pretrain-results`` markers of ``doc`` by the table of ``result``."""
    start, end = "<!-- pretrain-results:start -->", "<!-- pretrain-results:end -->"
    text = doc.read_text()
    if start not in text or end not in text:
        raise ValueError(f"{doc} has no {start} ... {end} block to rewrite.")
    source, doc = source.resolve(), doc.resolve()
    setup, cond = result["setup"], result["conditions"]
    head = (
        f"Generated by `python bench/pretrain.py --print {source.relative_to(ROOT)} --docs {doc.relative_to(ROOT)}` "
        f"from a run of `{result['command']}` at commit {str(result['commit'])[:7]} on {result['date'][:10]} "
        f"({result['device']['name']}, 1 thread, load {cond['loadavg_start'][0]} -> {cond['loadavg_end'][0]}, "
        f"{cond['wall_s'] / 60:.0f} min). LLaMA hidden {setup['hidden']}, MLP {setup['intermediate']}, "
        f"{setup['layers']} layers, rank {setup['rank']}, density {setup['density']}, α {setup['alpha']:g}; "
        f"{setup['steps']} steps of {setup['batch']} x {setup['seq']} characters, seeds {setup['seeds']}; "
        f"LR per method from the sweep {setup['lrs']} ({setup['sweep_steps']} steps, dev slice of the train split)."
    )
    body = f"{start}\n{head}\n\n{table(result)}\n\n![validation curves]({os.path.relpath(source.with_suffix('.png'), doc.parent)})\n{end}"
    doc.write_text(text[: text.index(start)] + body + text[text.index(end) + len(end):])


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--worker", nargs=2, metavar=("KIND", "SPEC"), help=argparse.SUPPRESS)
    p.add_argument("--print", metavar="JSON", help="print the table of a results file and exit")
    p.add_argument("--docs", type=Path, default=None, help="with --print: rewrite the results block of this file")
    p.add_argument("--quick", action="store_true", help="tiny smoke run")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--intermediate", type=int, default=352)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--rank", type=int, default=40)
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2])
    p.add_argument("--sweep-steps", type=int, default=80)
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--fixed-lr", nargs="*", default=None, metavar="METHOD=LR", help="skip the sweep for these")
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--eval-windows", type=int, default=128)
    p.add_argument("--memory-hidden", type=int, default=768)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.hidden, args.intermediate, args.layers, args.seq, args.batch, args.rank = 32, 64, 2, 32, 4, 8
        args.steps, args.seeds, args.lrs, args.sweep_steps, args.eval_every = 6, [0, 1], [3e-3], 3, 3
        args.eval_windows, args.memory_hidden = 8, 64
    return args


def main(argv=None) -> None:
    args = parse(argv)
    if args.worker:
        kind, spec = args.worker
        fn = train_run if kind == "train" else memory_probe
        print("RESULT-JSON " + json.dumps(fn(json.loads(spec))), flush=True)
        return
    if args.print:
        result = json.loads(Path(args.print).read_text())
        if args.docs:
            write_docs(result, Path(args.print), args.docs)
        print(table(result))
        return
    import torch

    torch.set_num_threads(1)
    t_start = time.time()
    commit, dirty = git_commit("bench/pretrain.py")
    result = {
        "benchmark": "pretrain", "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": "python bench/pretrain.py " + " ".join(sys.argv[1:]), "commit": commit, "dirty": dirty,
        "device": device_info(torch.device("cpu")), "versions": versions(),
        "conditions": {"loadavg_start": loadavg(), "torch_threads": 1},
        "setup": {**base_spec(args), "steps": args.steps, "seeds": args.seeds, "density": DENSITY, "alpha": ALPHA,
                  "targets": TARGETS, "lrs": args.lrs, "sweep_steps": args.sweep_steps,
                  "optimizer": "AdamW(betas=(0.9, 0.95), weight_decay=0), warm-up 10% + cosine to 10%",
                  "data": "tinyshakespeare, char level, first 90% train / last 10% val"},
    }
    fixed = dict(kv.split("=") for kv in (args.fixed_lr or []))
    methods = [m for m in METHODS if m in args.methods]
    to_sweep = [m for m in methods if m not in fixed]
    result["sweep"] = sweep(args, to_sweep) if to_sweep else {"rows": [], "chosen": {}}
    chosen = {m: float(fixed.get(m, result["sweep"]["chosen"].get(m, 0))) for m in methods}
    result["lr"] = chosen
    runs = []
    for seed in args.seeds:
        for method in methods:
            spec = {**base_spec(args), "method": method, "lr": chosen[method], "seed": seed, "steps": args.steps,
                    "dev": False, "per_layer": method != "full"}
            r = run_child("train", spec)
            print(f"  {method} seed {seed} lr {chosen[method]:g}: val ppl {r['final_ppl']:.3f}, "
                  f"step {r['step_s_median']:.3f} s ({r['wall_s']} s)", flush=True)
            runs.append(r)
    result["runs"] = runs
    result["summary"] = summarize(runs)
    result["memory_probe"] = {"training model": memory_runs(args, wide=False)} if args.memory_hidden else {}
    if args.memory_hidden:
        result["memory_probe"][f"hidden {args.memory_hidden}"] = memory_runs(args, wide=True)
    result["checks"] = checks(result["summary"], result["memory_probe"])
    result["conditions"].update(loadavg_end=loadavg(), wall_s=round(time.time() - t_start, 1))
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = args.out or RESULTS / f"pretrain-cpu{'-quick' if args.quick else ''}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    plot(runs, out.with_suffix(".png"))
    print(table(result))
    print(f"wrote {out} and {out.with_suffix('.png')} in {time.time() - t_start:.0f} s")


if __name__ == "__main__":
    main()
