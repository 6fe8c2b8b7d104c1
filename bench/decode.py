"""Decoding latency with the adapter unmerged: what serving several adapters at once (``adapter_names``) costs.

``merge_and_unload()`` makes every method cost what the base model costs; a server that keeps adapters unmerged (one
base, many tenants) pays the adapter's own work on every generated token. This times one decoding step -- one new
token per sequence, with a key/value cache -- on the LLaMA decoder of ``bench/throughput.py --model llama`` (hidden
1024, MLP 2816, 4 layers, every linear adapted), in eval mode under ``torch.no_grad``, for:

* ``base``  the model without an adapter (what a merged adapter costs)
* ``lora``  PEFT LoRA r=8 (the reference of every ratio), and every method of ``bench/throughput.py``'s table that
  this library adds (SLTrain r=8 + 1% sparse, SoRA, DyLoRA, NOLA, sparse RandLoRA).

Timing: a prompt of ``--prompt`` tokens is prefilled (not timed), then ``--tokens`` decoding steps are timed one by
one; a round does this for every method in turn (interleaved, so a change of load hits all of them), and a method's
figure is the median step over all timed rounds after ``--warmup`` rounds. Ratios to LoRA are the median of the
per-round ratios of medians.

Usage::

    OMP_NUM_THREADS=1 python bench/decode.py --threads 1 --clock cpu           # CPU: batch 1 and 8
    OMP_NUM_THREADS=1 python bench/decode.py --threads 1 --clock cpu --size tiny   # the per-call overhead
    python bench/decode.py --methods lora sltrain --batches 1 --rounds 3
    python bench/decode.py --print bench/results/decode-cpu.json

Writes ``bench/results/decode-<device>.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import inspect
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _env import ROOT, device_info, device_slug, git_commit, loadavg, print_saved, save_result, versions  # noqa: E402
from throughput import METHODS, base_state, build_model, llama_config  # noqa: E402

DEFAULT_METHODS = ["base", "lora", "sltrain", "sora", "dylora", "nola", "sparse_randlora_0.1", "sparse_randlora_0.01"]


class Decoder:
    """One method's model in eval mode, with a prefilled cache per batch size."""

    def __init__(self, name: str, config, state: dict, device, dtype):
        self.name = name
        self.device = device
        self.model = build_model("full" if name == "base" else name, config, state, device, dtype).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    @property
    def cache_name(self) -> str:
        """The key/value cache's name, as argument and output field: transformers 5.25 renamed ``past_key_values`` to
        ``cache`` (the old name still works there, with a deprecation warning); 5.23 knows only the old one."""
        forward = getattr(self.model, "get_base_model", lambda: self.model)().forward
        return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"

    @torch.no_grad()
    def decode(self, ids: torch.Tensor, tokens: int, clock) -> list[float]:
        """Prefill ``ids`` (untimed), then ``tokens`` greedy steps; returns each step's seconds on ``clock``."""
        name = self.cache_name
        out = self.model(input_ids=ids, use_cache=True)
        past, nxt = getattr(out, name), out.logits[:, -1:].argmax(-1)
        times = []
        for _ in range(tokens):
            t0 = clock()
            out = self.model(input_ids=nxt, use_cache=True, **{name: past})
            nxt = out.logits[:, -1:].argmax(-1)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            times.append(clock() - t0)
            past = getattr(out, name)
        return times


def time_decoding(names, config, batch, args, device, dtype, clock) -> dict:
    """Interleaved rounds of ``args.tokens`` decoding steps per method; per method the median step."""
    state = base_state(config)
    decoders = [Decoder(n, config, state, device, dtype) for n in names]
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, config.vocab_size, (batch, args.prompt), generator=gen).to(device)
    rounds = {n: [] for n in names}  # per round: the median step of that round
    steps = {n: [] for n in names}
    for rnd in range(args.warmup + args.rounds):
        for dec in decoders:
            times = dec.decode(ids, args.tokens, clock)
            if rnd >= args.warmup:
                rounds[dec.name].append(statistics.median(times))
                steps[dec.name].extend(times)
        print(f"  batch {batch} round {rnd + 1}/{args.warmup + args.rounds}, load {loadavg()}", file=sys.stderr,
              flush=True)
    out = {}
    for name in names:
        out[name] = {"step_ms": 1e3 * statistics.median(steps[name]), "step_ms_min": 1e3 * min(steps[name]),
                     "round_medians_ms": [round(1e3 * v, 3) for v in rounds[name]]}
        if "lora" in rounds:
            out[name]["vs_lora"] = statistics.median(v / r for v, r in zip(rounds[name], rounds["lora"]))
        if "base" in rounds:
            out[name]["vs_base"] = statistics.median(v / r for v, r in zip(rounds[name], rounds["base"]))
    return out


def markdown(result: dict) -> str:
    s = result["settings"]
    lines = [
        f"Decoding step, adapter unmerged: LLaMA decoder {s['layers']} x {s['hidden']} (MLP {s['intermediate']}), "
        f"every linear adapted, prompt {s['prompt']} tokens, median of {s['tokens']} steps x {s['rounds']} rounds "
        f"({s['clock']} clock, {s['threads']} threads, {s['dtype']}); device {result['device']['name']}, "
        f"commit {result.get('commit')}.", "",
    ]
    batches = list(result["batches"])
    head = "| method | " + " | ".join(f"batch {b}: ms/step | vs LoRA | vs base" for b in batches) + " |"
    lines += [head, "|:---|" + "---:|---:|---:|" * len(batches)]
    for name in result["batches"][batches[0]]:
        label = "base model (no adapter; = merged)" if name == "base" else METHODS[name][0]
        cells = []
        for b in batches:
            row = result["batches"][b][name]
            cells.append(f"{row['step_ms']:.2f} | {row.get('vs_lora', float('nan')):.2f}x | "
                         f"{row.get('vs_base', float('nan')):.2f}x")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=["base", *METHODS])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--tokens", type=int, default=16, help="timed decoding steps per round")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--size", choices=["llm", "tiny"], default="llm",
                   help="llm: the LLaMA above; tiny: hidden 64, 2 layers, where a step is mostly the layers' per-call "
                        "Python work (as on a GPU at batch 1), so it measures the adapters' overhead per call")
    p.add_argument("--quick", action="store_true", help="tiny LLaMA, 2 steps x 1 round (smoke test)")
    p.add_argument("--out", default=None)
    p.add_argument("--print", dest="print_path", default=None)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.print_path:
        return print_saved(args.print_path, markdown)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.tokens, args.rounds, args.warmup, args.prompt = 2, 1, 0, 4
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    config = llama_config(args.quick or args.size == "tiny", args.prompt + args.tokens + 1)
    info = device_info(device)
    commit, dirty = git_commit(__file__)
    result = {
        "bench": "decode", "date": _dt.datetime.now().isoformat(timespec="seconds"), "commit": commit,
        "dirty": dirty, "command": "python bench/decode.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "device": info, "versions": versions(), "load_before": loadavg(),
        "settings": {"layers": config.num_hidden_layers, "hidden": config.hidden_size,
                     "intermediate": config.intermediate_size, "prompt": args.prompt, "tokens": args.tokens,
                     "rounds": args.rounds, "warmup": args.warmup, "clock": args.clock,
                     "threads": torch.get_num_threads(), "dtype": args.dtype},
        "batches": {},
    }
    for batch in args.batches:
        result["batches"][str(batch)] = time_decoding(args.methods, config, batch, args, device, dtype, clock)
    result["load_after"] = loadavg()
    slug = device_slug(info) + ("-quick" if args.quick else "-tiny" if args.size == "tiny" else "")
    return save_result(args.out or ROOT / "bench" / "results" / f"decode-{slug}.json", result, markdown)


if __name__ == "__main__":
    main()
