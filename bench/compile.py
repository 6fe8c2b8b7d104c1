"""``torch.compile`` on every tuner: graphs, graph breaks and their reasons, and the compiled model's agreement with eager.

For each model family (a tiny BERT with query/value adapted, a tiny LLaMA with every linear adapted) and each tuner
(PEFT's LoRA for comparison), one forward and backward in eager mode and one through ``torch.compile`` (inductor by
default): the maximum absolute difference of the outputs and of every trainable parameter's gradient, the graph and
graph-break counts and the distinct break reasons from ``torch._dynamo.explain``, the recompilations Dynamo logged,
the seconds of the first compiled step (tracing and code generation, inductor's graph cache off), and the steady
step time of each (the median of ``--steps`` forward + backward steps after the first, eager and compiled
interleaved).

    python bench/compile.py [--backend inductor] [--families bert llama] [--tuners ...] [--steps 15] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _env import ROOT, device_info, git_commit, versions  # noqa: E402

VOCAB = 100


def tiny(family: str):
    """``(model, inputs, task_type, targets)`` of a tiny model built from its config (seeded)."""
    from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    inputs = {"input_ids": torch.randint(3, VOCAB, (3, 7), generator=torch.Generator().manual_seed(1))}
    if family == "bert":
        cfg = BertConfig(vocab_size=VOCAB, hidden_size=36, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=37, max_position_embeddings=40, num_labels=3)
        return BertForSequenceClassification(cfg), inputs, "SEQ_CLS", ["query", "value"]
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=40, intermediate_size=37, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=40)
    return LlamaForCausalLM(cfg), inputs, "CAUSAL_LM", "all-linear"


def configs() -> dict:
    from peft import LoraConfig

    import sparse_lowrank_peft as slp

    return {
        "lora": (LoraConfig, {"r": 4, "init_lora_weights": False}),
        "sltrain": (slp.SLTrainConfig, {"r": 4, "sparsity": 0.05, "init_weights": False}),
        "sora": (slp.SoraConfig, {"r": 4, "init_weights": False}),
        "dylora": (slp.DyLoraConfig, {"r": 4, "init_weights": False}),
        "nola": (slp.NolaConfig, {"r": 4, "num_basis_A": 16, "num_basis_B": 8, "init_weights": False}),
        "sparse_randlora": (slp.SparseRandLoraConfig, {"r": 4, "basis_density": 0.3, "init_weights": False}),
    }


def step(pm, model, inputs) -> tuple[torch.Tensor, dict]:
    pm.zero_grad(set_to_none=True)
    out = model(**inputs).logits
    (out.float() ** 2).mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in pm.named_parameters() if p.requires_grad}


class _Recompiles(logging.Handler):
    def __init__(self):
        super().__init__()
        self.count = 0

    def emit(self, record):
        if "recompil" in record.getMessage():
            self.count += 1


def steady_steps(pm, compiled, inputs, steps: int) -> tuple[float, float]:
    """Median milliseconds of an eager and of a compiled step, ``steps`` of each, interleaved (so that a change of
    the machine's load falls on both)."""
    import statistics

    times: dict[str, list[float]] = {"eager": [], "compiled": []}
    for _ in range(steps):
        for kind, model in (("eager", pm), ("compiled", compiled)):
            start = time.perf_counter()
            step(pm, model, inputs)
            times[kind].append((time.perf_counter() - start) * 1e3)
    return statistics.median(times["eager"]), statistics.median(times["compiled"])


def measure(family: str, name: str, cls, fields: dict, backend: str, steps: int) -> dict:
    """One tuner on one family: eager step, Dynamo's explanation, compiled step, steady step times."""
    import torch._dynamo
    from peft import get_peft_model

    torch._dynamo.reset()
    model, inputs, task_type, targets = tiny(family)
    pm = get_peft_model(model, cls(task_type=task_type, target_modules=targets, **fields)).eval()
    expected, expected_grads = step(pm, pm, inputs)
    explanation = torch._dynamo.explain(pm)(**inputs)
    torch._dynamo.reset()
    handler = _Recompiles()
    logging.getLogger("torch._dynamo").addHandler(handler)
    try:
        compiled = torch.compile(pm, backend=backend)
        start = time.perf_counter()
        got, grads = step(pm, compiled, inputs)
        first = time.perf_counter() - start
    finally:
        logging.getLogger("torch._dynamo").removeHandler(handler)
    eager_ms, compiled_ms = steady_steps(pm, compiled, inputs, steps)
    return {
        "family": family, "tuner": name, "graphs": explanation.graph_count,
        "graph_breaks": explanation.graph_break_count,
        "break_reasons": sorted({b.reason.split("\n")[0] for b in explanation.break_reasons}),
        "recompile_warnings": handler.count, "first_compiled_step_s": round(first, 2),
        "max_abs_output_diff": float((got - expected).abs().max()),
        "max_abs_grad_diff": max(float((grads[k] - expected_grads[k]).abs().max()) for k in expected_grads),
        "max_abs_grad": max(float(g.abs().max()) for g in expected_grads.values()),
        "eager_step_ms": round(eager_ms, 2), "compiled_step_ms": round(compiled_ms, 2), "steps": steps,
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="inductor", help="torch.compile backend (inductor, aot_eager, eager)")
    parser.add_argument("--families", nargs="+", default=["bert", "llama"], choices=["bert", "llama"])
    parser.add_argument("--tuners", nargs="+", default=list(configs()), choices=list(configs()))
    parser.add_argument("--steps", type=int, default=15, help="steady steps timed per mode (median)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "compile-cpu.json"))
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT / "src"))
    # Every first step compiles from scratch. With inductor's on-disk graph cache (a run at d248e04, not kept), the
    # tuners whose graphs earlier runs had compiled took 2.9-5.0 s and SLTrain's new graphs 15.6 / 27.7 s; with the
    # cache off, SLTrain took 9.1 / 20.7 s against SoRA's 10.6 / 19.1 s (compile-cpu.json): the cache, not the tuner.
    import torch._inductor.config

    torch._inductor.config.fx_graph_cache = False
    rows = [measure(family, name, cls, fields, args.backend, args.steps)
            for family in args.families for name, (cls, fields) in configs().items() if name in args.tuners]
    for r in rows:
        print(f"{r['family']:6s} {r['tuner']:16s} graphs {r['graphs']:3d} breaks {r['graph_breaks']:3d} "
              f"recompile warnings {r['recompile_warnings']:2d} first step {r['first_compiled_step_s']:6.2f} s "
              f"out diff {r['max_abs_output_diff']:.1e} grad diff {r['max_abs_grad_diff']:.1e} "
              f"(max |grad| {r['max_abs_grad']:.1e}) step eager {r['eager_step_ms']:.1f} ms, compiled "
              f"{r['compiled_step_ms']:.1f} ms")
    commit, dirty = git_commit("bench/compile.py")
    result = {"bench": "compile", "backend": args.backend, "device": device_info(torch.device("cpu")),
              "versions": versions(), "git_commit": commit, "git_dirty": dirty, "threads": torch.get_num_threads(),
              "rows": rows}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
