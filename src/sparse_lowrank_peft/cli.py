"""``slpeft``: squeeze, export, inspect and merge adapters from the command line.

::

    slpeft squeeze IN OUT --rank 4            # any adapter folder -> plain LoRA of rank 4 (optimal truncation)
    slpeft squeeze IN OUT --energy 0.9        # per-layer ranks keeping 90% of each ‖ΔW‖_F² (rank_pattern)
    slpeft export IN OUT [--rank K]           # exact plain LoRA where the delta is low-rank; K needed where not
    ... --uniform-rank                        # (export, squeeze) one rank for every layer: what LoRA servers read
    ... --relative-to trained                 # (export, squeeze) an LQ adapter's ΔW for its quantized base Q
    slpeft inspect IN [--plot spectra.png]    # per-layer ranks, singular values, energy ranks, sparsity, bytes
    slpeft merge IN OUT                       # the base with the adapter merged in: a plain transformers folder

A LoRA folder needs no base model. Other adapters (SLTrain, SoRA, DyLoRA, NOLA, sparse RandLoRA) are loaded onto
their base model: ``--base PATH``, else the config's ``base_model_name_or_path`` (also a LoRA folder saved by
``save_lq_lora``, whose base ``Q`` and offset ``L`` are rebuilt from it: the output is for the original weights,
``ΔW − L``, unless ``--relative-to trained``). Errors (a missing or non-adapter
folder, a rank above what the adapter has, an energy outside (0, 1], an existing output folder) print one message
naming the path and the fix and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Optional, Sequence

EXIT_USAGE = 2


class CliError(Exception):
    """A user error: printed as ``slpeft: error: ...`` with exit status 2."""


def _positive_int(text: str) -> int:
    """A whole number >= 1 (argparse names the option in its message: ``argument --top: ...``)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a whole number. Fix: e.g. 4 (a fraction of the energy is --energy 0.9, not --rank)."
        ) from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1. Fix: e.g. 4.")
    return value


def _budget(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of bits per parameter. Fix: e.g. 2.75.")
    return value


def _make_output_folders(args: argparse.Namespace) -> None:
    """The folders of ``--json`` / ``--plot`` files are created before the work, so it never fails at the end."""
    for path in (getattr(args, "json", None), getattr(args, "plot", None)):
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)


def _energy(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"energy {text!r} is not a number. Fix: e.g. --energy 0.9.") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(
            f"energy {value} is outside (0, 1]: it is the fraction of each layer's ‖ΔW‖_F² to keep. "
            "Fix: e.g. --energy 0.9."
        )
    return value


def _add_randomized(p: argparse.ArgumentParser) -> None:
    from .squeeze import DEFAULT_OVERSAMPLING, DEFAULT_POWER_ITERS, DEFAULT_SEED

    g = p.add_argument_group("randomized SVD (sparse / full-rank deltas only)")
    g.add_argument("--oversampling", type=int, default=DEFAULT_OVERSAMPLING, help="extra sketch columns p")
    g.add_argument("--power-iters", type=int, default=DEFAULT_POWER_ITERS, help="power iterations q")
    g.add_argument("--seed", type=int, default=DEFAULT_SEED, help="seed of the Gaussian probes")


def _add_relative_to(p: argparse.ArgumentParser) -> None:
    p.add_argument("--relative-to", choices=("original", "trained"), default="original",
                   help="original (default): a LoRA for the model file's weights, what servers load (an adapter "
                        "with LQ-LoRA's init is written as its change since its start L); trained: for the "
                        "quantized base it was trained on")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="slpeft", description="Squeeze, export and inspect PEFT adapters (sparse_lowrank_peft).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{squeeze,export,inspect,merge,plan}")

    sq = sub.add_parser("squeeze", help="compress an adapter folder to a plain LoRA of a lower rank",
                        description="Compress an adapter folder to a plain PEFT LoRA folder (LoRA-Squeeze).")
    sq.add_argument("input", metavar="IN", help="adapter folder (adapter_config.json + adapter_model.safetensors)")
    sq.add_argument("output", metavar="OUT", help="folder to write the LoRA adapter to")
    target = sq.add_mutually_exclusive_group(required=True)
    target.add_argument("--rank", type=_positive_int, help="target rank (layers of lower rank keep theirs)")
    target.add_argument("--energy", type=_energy, help="keep this fraction of each layer's ‖ΔW‖_F², in (0, 1]")
    sq.add_argument("--base", help="base model folder (non-LoRA adapters only; default: base_model_name_or_path)")
    sq.add_argument("--lora-alpha", type=float, help="lora_alpha of the output (default: r per layer, scale 1)")
    sq.add_argument("--max-energy-rank", type=_positive_int,
                    help="with --energy: the largest per-layer rank accepted for a sparse / full-rank delta "
                         "(default min(out, in) // 2)")
    sq.add_argument("--uniform-rank", action="store_true",
                    help="store every layer at the largest kept rank (zero-padded, no rank_pattern), so that vLLM, "
                         "llama.cpp and PEFT compute the same outputs")
    sq.add_argument("--overwrite", action="store_true", help="write into an existing, non-empty OUT")
    _add_relative_to(sq)
    _add_randomized(sq)

    ex = sub.add_parser("export", help="write any adapter as a plain LoRA folder (exact where low-rank)",
                        description="Write an adapter folder as a plain PEFT LoRA folder: exact for low-rank deltas "
                                    "(SoRA, DyLoRA, NOLA, LoRA); sparse / full-rank ones (SLTrain, RandLoRA) need "
                                    "--rank and are truncated by randomized SVD.")
    ex.add_argument("input", metavar="IN", help="adapter folder")
    ex.add_argument("output", metavar="OUT", help="folder to write the LoRA adapter to")
    ex.add_argument("--rank", type=_positive_int, help="LoRA rank (required for sparse / full-rank deltas; "
                                                       "DyLoRA: its nested rank b)")
    ex.add_argument("--base", help="base model folder (default: the config's base_model_name_or_path)")
    ex.add_argument("--uniform-rank", action="store_true",
                    help="store every layer at the largest rank (zero-padded, no rank_pattern), so that vLLM, "
                         "llama.cpp and PEFT compute the same outputs")
    ex.add_argument("--overwrite", action="store_true", help="write into an existing, non-empty OUT")
    _add_relative_to(ex)
    _add_randomized(ex)

    ins = sub.add_parser("inspect", help="per-layer ranks, singular values, sparsity and bytes of an adapter",
                         description="Per-layer report of an adapter folder.")
    ins.add_argument("input", metavar="IN", help="adapter folder")
    ins.add_argument("--base", help="base model folder (non-LoRA adapters only)")
    ins.add_argument("--top", type=_positive_int, default=32, help="singular values per layer (default 32)")
    ins.add_argument("--plot", metavar="PNG", help="save a plot of the singular value spectra")
    ins.add_argument("--json", metavar="FILE", help="also write the report as JSON")
    _add_randomized(ins)

    mg = sub.add_parser("merge", help="merge an adapter into its base: a plain transformers model folder",
                        description="Merge an adapter folder into its base model and save the result as a plain "
                                    "transformers model folder (full precision: an adapter trained on a quantized "
                                    "base is merged into the dequantized base), with the base's tokenizer if any.")
    mg.add_argument("input", metavar="IN", help="adapter folder")
    mg.add_argument("output", metavar="OUT", help="folder to write the merged model to")
    mg.add_argument("--base", help="base model folder (default: the config's base_model_name_or_path)")
    mg.add_argument("--overwrite", action="store_true", help="write into an existing, non-empty OUT")

    pl = sub.add_parser("plan", help="solve and show an LQ-LoRA bit-budget plan from a measurement file",
                        description="Per layer: the configuration the integer program picks under --budget, its "
                                    "stored bits and LQ error; with --plot, the budget-vs-error curve beside every "
                                    "uniform configuration. TABLE is a bench/bitbudget.py result file.")
    pl.add_argument("table", metavar="TABLE", help="measurement file (e.g. bench/results/bitbudget-minilm.json)")
    pl.add_argument("--budget", type=_budget, required=True, help="average stored bits per parameter, e.g. 2.75")
    pl.add_argument("--plot", metavar="PNG", help="save the budget-vs-error curve")
    pl.add_argument("--json", metavar="FILE", help="write the plan (module -> configuration) as JSON")
    return parser


def _run_plan(args) -> None:
    from .delta import bitbudget as bb

    path = Path(args.table)
    if not path.is_file():
        raise CliError(f"{path} does not exist. Fix: a bench/bitbudget.py result file.")
    try:
        table = bb.PlanTable.from_dict(json.loads(path.read_text())["table"])
    except (KeyError, TypeError, json.JSONDecodeError) as e:
        raise CliError(f"{path} is not a bench/bitbudget.py result file ({e!r}).") from None
    plan = bb.solve(table, args.budget)
    width = max(len(n) for n in plan)
    objective = _OBJECTIVE_LABEL.get(table.objective, table.objective)
    print(f"{'layer':<{width}}  {'configuration':<14} {'bits/param':>10} {'rel. weight error':>17} {objective:>22}")
    for name, choice in plan.items():
        print(f"{name:<{width}}  {choice:<14} {table.bits[name][choice] / table.numel[name]:>10.3f} "
              f"{table.relative[name][choice]:>17.4f} {table.error[name][choice]:>22.4g}")
    summary = bb.plan_summary(table, plan)
    print(f"plan: {summary['bits_per_param']:.3f} bits per parameter (budget {args.budget}), summed {objective} "
          f"{summary['error']:.4g}")
    if args.json:
        Path(args.json).write_text(json.dumps(plan, indent=1))
        print(f"plan written to {args.json}")
    if args.plot:
        print(f"curve plotted to {_plot_plan_curve(table, args.plot)}")


def _run_merge(args) -> None:
    from .merge import merge_adapter_folder

    out = _check_output(args.output, args.overwrite)
    info = merge_adapter_folder(args.input, out, base=args.base)
    quantized = f", {info['dequantized']} of them on quantized bases (dequantized)" if info["dequantized"] else ""
    print(f"wrote {info['folder']}: {info['adapter']} merged into {info['layers']} layers{quantized}; "
          f"{'with' if info['tokenizer'] else 'no'} tokenizer (the base has {'one' if info['tokenizer'] else 'none'}); "
          "it loads with transformers alone")


#: what a measurement table's ``error`` is, by its objective (delta/bitbudget.py)
_OBJECTIVE_LABEL = {"weight": "‖W − Q − L‖²", "output": "‖ΔH‖² / ‖H‖²"}


def _plot_plan_curve(table, png: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .delta import bitbudget as bb

    uniform = bb.uniform_points(table)
    lo = max(min(u["bits_per_param"] for u in uniform), 0.0)
    hi = max(u["bits_per_param"] for u in uniform)
    budgets = [lo + (hi - lo) * i / 24 for i in range(25)]
    points = [bb.plan_summary(table, bb.solve(table, b)) for b in budgets]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter([u["bits_per_param"] for u in uniform], [u["error"] for u in uniform], c="grey", s=16, label="uniform")
    ax.plot([q["bits_per_param"] for q in points], [q["error"] for q in points], "o-", ms=3, label="ILP plan")
    ax.set_xlabel("stored bits per parameter")
    ax.set_ylabel("summed " + _OBJECTIVE_LABEL.get(table.objective, table.objective))
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    return png


def _check_output(out: str, overwrite: bool) -> Path:
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise CliError(f"output '{path}' is a file. Fix: give a folder path.")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise CliError(f"output folder '{path}' exists and is not empty. Fix: choose a new folder or pass --overwrite.")
    return path


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _print_summary(folder: Path) -> None:
    info_path = folder / "export_info.json"
    if not info_path.is_file():
        return
    info = json.loads(info_path.read_text())
    ranks = info.get("ranks", {})
    methods = sorted({layer["method"] for layer in info.get("layers", {}).values()})
    distinct = sorted(set(ranks.values()))
    print(f"wrote {folder}: plain LoRA from {info.get('exported_from')}, {len(ranks)} layers, "
          f"ranks {distinct}, method {', '.join(methods)}")
    started = [name for name, layer in info.get("layers", {}).items() if layer.get("lq_offset_subtracted")]
    if started:
        print(f"  {len(started)} layers were LQ-initialised: written as their change since the start L, for the "
              "original weights (--relative-to trained keeps ΔW for the quantized base)")


def _format_report(report: dict, top: int) -> str:
    lines = [
        f"{report['folder']}: {report['peft_type']} adapter, {len(report['layers'])} layers, "
        f"adapter_model.safetensors {_fmt_bytes(report['file_bytes'])}",
        "",
        f"{'layer':<52} {'shape':>11} {'kind':>8} {'rank':>5} {'r@0.9':>6} {'r@0.99':>6} {'density':>8} "
        f"{'bytes':>10}  leading singular values",
    ]
    for name, e in report["layers"].items():
        shape = "x".join(str(d) for d in e["shape"])
        rank = "-" if e["rank"] is None else str(e["rank"])
        r90 = e["energy_ranks"].get("0.9")
        r99 = e["energy_ranks"].get("0.99")
        r90 = f">{top}" if r90 is None else str(r90)
        r99 = f">{top}" if r99 is None else str(r99)
        dens = "-" if e["sparse_density"] is None else f"{e['sparse_density']:.4f}"
        sv = " ".join(f"{v:.3g}" for v in e["singular_values"][:6])
        short = name if len(name) <= 52 else "…" + name[-51:]
        lines.append(f"{short:<52} {shape:>11} {e['kind']:>8} {rank:>5} {r90:>6} {r99:>6} {dens:>8} "
                     f"{_fmt_bytes(e['bytes']):>10}  {sv}")
    lines.append("")
    lines.append("rank: factor rank (operator deltas: -); r@τ: smallest k keeping τ of ‖ΔW‖_F²; density: sparse term")
    return "\n".join(lines)


def run(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    _make_output_folders(args)
    if args.command == "plan":
        _run_plan(args)
        return 0
    if args.command == "merge":
        _run_merge(args)
        return 0
    from .squeeze import adapter_folder_to_lora, inspect_adapter, plot_spectra

    randomized = {"oversampling": args.oversampling, "power_iters": args.power_iters, "seed": args.seed}
    if args.command == "squeeze":
        out = _check_output(args.output, args.overwrite)
        rank = args.rank if args.rank is not None else args.energy
        folder = adapter_folder_to_lora(args.input, out, rank, base=args.base, lora_alpha=args.lora_alpha,
                                        uniform_rank=args.uniform_rank, relative_to=args.relative_to,
                                        max_energy_rank=args.max_energy_rank, **randomized)
        _print_summary(folder)
    elif args.command == "export":
        out = _check_output(args.output, args.overwrite)
        folder = adapter_folder_to_lora(args.input, out, args.rank, base=args.base, uniform_rank=args.uniform_rank,
                                        relative_to=args.relative_to, **randomized)
        _print_summary(folder)
    else:
        report = inspect_adapter(args.input, base=args.base, top=args.top, **randomized)
        print(_format_report(report, args.top))
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=2))
            print(f"report written to {args.json}")
        if args.plot:
            print(f"spectra plotted to {plot_spectra(report, args.plot)}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Console entry point: returns the exit status (0 ok, 2 user error)."""
    from .squeeze import SqueezeError

    try:
        return run(argv)
    except (CliError, SqueezeError) as e:
        print(f"slpeft: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except ValueError as e:  # a tuner's own validation (e.g. a DyLoRA rank outside 1..r)
        print(f"slpeft: error: {e}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
