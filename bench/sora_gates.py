"""Which SoRA gates close, and did they start small? Initial vs final gates of finished GLUE recipe runs.

SoRA's proximal step shrinks every gate toward zero by ``sparse_lambda × lr`` per optimizer step, so over a run the
total shrinkage is ``S = sparse_lambda × Σ_t lr_t``. A gate closes when its magnitude does not outgrow ``S``. If the
gates that close are exactly those that started below ``S`` (gates start ``N(0, 1)``, as in the official code), the
kept ranks were decided by the initialisation, not by training: this script measures that for each run.

For a run it rebuilds the model with ``glue.run.build_model`` (the function the run itself used, same recipe and
seed), so the initial gates are the run's own, reads the final gates from the run's last checkpoint (saved before
pruning), and computes ``S`` from the recipe's learning-rate schedule.

    python bench/sora_gates.py recipes/minilm/sora-sst2.yaml:runs/glue/minilm/sora-sst2 \\
        recipes/minilm/sora-sst2.yaml:runs/glue/minilm/sora-sst2-seed1:1 \\
        recipes/minilm/sora-sst2.yaml:runs/glue/minilm/sora-sst2-seed2:2 \\
        recipes/minilm/sora-rte.yaml:runs/glue/minilm/sora-rte \\
        recipes/minilm/sora-stsb.yaml:runs/glue/minilm/sora-stsb \\
        recipes/minilm/sora-nf4-lq-sst2.yaml:runs/glue/minilm/sora-nf4-lq-sst2   # -> bench/results/sora-gates-minilm.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def gate_fates(initial: torch.Tensor, final: torch.Tensor, shrinkage: float) -> dict:
    """Counts of closed/open gates against ``|initial| < shrinkage`` (1-D tensors of the same length), and how far
    the gradient moved the gates that stayed open.

    ``push`` of an open gate is ``|final| - (|initial| - shrinkage)``: how much further out it ended than the
    shrinkage alone would have left it (positive: the gradient held it open; negative: the gradient closed it
    further). ``grew`` counts gates that ended larger than they started, i.e. whose push beat the shrinkage.
    """
    if initial.shape != final.shape or initial.dim() != 1:
        raise ValueError(f"initial {tuple(initial.shape)} and final {tuple(final.shape)} gates must be equal 1-D shapes")
    closed = final == 0
    small = initial.abs() < shrinkage
    push = final.abs() - (initial.abs() - shrinkage)
    return {
        "grew": int((final.abs() > initial.abs()).sum()),
        "mean_push_open": float(push[~closed].mean()) if (~closed).any() else None,
        "max_push_open": float(push[~closed].max()) if (~closed).any() else None,
        "gates": initial.numel(),
        "closed": int(closed.sum()),
        "started_below_shrinkage": int(small.sum()),
        "closed_and_started_below": int((closed & small).sum()),
        "closed_but_started_above": int((closed & ~small).sum()),
        "open_but_started_below": int((~closed & small).sum()),
        "mean_abs_initial_closed": float(initial.abs()[closed].mean()) if closed.any() else None,
        "mean_abs_initial_open": float(initial.abs()[~closed].mean()) if (~closed).any() else None,
    }


def sparse_lambda_of(cfg) -> float:
    """The recipe's ``sparse_lambda``, or ``SoraConfig``'s default when the recipe leaves it out."""
    lam = (cfg.peft or {}).get("sparse_lambda")
    if lam is None:
        from sparse_lowrank_peft import SoraConfig

        lam = SoraConfig().sparse_lambda
    return float(lam)


def lr_sum(cfg, steps: int) -> float:
    """``Σ lr_t`` over ``steps`` optimizer steps of the recipe's schedule (the lr each step used): about the farthest
    Adam can move a parameter over the run, since its step is at most about ``lr``."""
    from transformers import get_scheduler

    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=cfg.learning_rate)
    warmup = math.ceil(cfg.warmup_ratio * steps) if cfg.warmup_ratio else 0  # as TrainingArguments counts it
    sched = get_scheduler(cfg.lr_scheduler_type, opt, num_warmup_steps=warmup, num_training_steps=steps)
    total = 0.0
    for _ in range(steps):
        total += opt.param_groups[0]["lr"]
        opt.step()
        sched.step()
    return total


def total_shrinkage(cfg, steps: int) -> float:
    """``sparse_lambda × Σ lr_t``: how far the proximal step moves every gate toward zero over the run."""
    return sparse_lambda_of(cfg) * lr_sum(cfg, steps)


def run_report(recipe: Path, run_dir: Path, seed: int | None = None) -> dict:
    import yaml
    from safetensors.torch import load_file

    import sparse_lowrank_peft  # noqa: F401  (registers the tuners with PEFT)
    from glue.config import config_from_mapping
    from glue.model import build_model
    from glue.tasks import get_task

    fields = yaml.safe_load(recipe.read_text())
    if seed is not None:
        fields["seed"] = seed
    cfg = config_from_mapping(fields, where=str(recipe))
    if cfg.method != "sora" or (cfg.peft or {}).get("lambda_schedule"):
        raise SystemExit(f"{recipe}: a SoRA recipe with a constant sparse_lambda is needed")
    checkpoints = sorted(run_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    if not checkpoints:
        raise SystemExit(f"{run_dir}: no checkpoint-* folder (run the recipe first; its last checkpoint holds the "
                         "unpruned gates)")
    last = checkpoints[-1]
    steps = int(last.name.split("-")[1])
    peft_model = build_model(cfg, get_task(cfg.task)).model  # the run's own initial weights (same seed)
    initial = {n.replace(".default", ""): p.detach() for n, p in peft_model.named_parameters() if "sora_gate" in n}
    final = {k: v for k, v in load_file(last / "adapter_model.safetensors").items() if "sora_gate" in k}
    if sorted(initial) != sorted(final):
        raise SystemExit(f"{last}: its gates {sorted(final)[:2]}... do not match the rebuilt adapter's "
                         f"{sorted(initial)[:2]}...")
    g0 = torch.cat([initial[k] for k in sorted(initial)])
    g1 = torch.cat([final[k].to(g0.dtype) for k in sorted(final)])
    lam, lrs = sparse_lambda_of(cfg), lr_sum(cfg, steps)
    return {"recipe": str(recipe), "checkpoint": str(last), "seed": cfg.seed, "steps": steps,
            "sparse_lambda": lam, "total_shrinkage": lam * lrs, "lr_sum": lrs, **gate_fates(g0, g1, lam * lrs)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="RECIPE:RUN_DIR[:SEED] (the run's output_dir, with its checkpoints; SEED "
                   "when the run overrode the recipe's seed)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "sora-gates-minilm.json"))
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for item in args.runs:
        parts = item.split(":")
        if len(parts) not in (2, 3) or (len(parts) == 3 and not parts[2].isdigit()):
            raise SystemExit(f"{item!r}: expected RECIPE:RUN_DIR or RECIPE:RUN_DIR:SEED")
        recipe = parts[0]
        rows.append(run_report(Path(recipe), Path(parts[1]), int(parts[2]) if len(parts) == 3 else None))
        r = rows[-1]
        print(f"{recipe}: {r['closed']}/{r['gates']} gates closed, total shrinkage {r['total_shrinkage']:.3f}; "
              f"{r['started_below_shrinkage']} started below it; closed and started below: "
              f"{r['closed_and_started_below']}; closed though started above: {r['closed_but_started_above']}; "
              f"grew: {r['grew']}; mean push of open gates {r['mean_push_open']}",
              flush=True)
    out = {"bench": "sora_gates", "command": " ".join(["python bench/sora_gates.py", *(argv or sys.argv[1:])]),
           "runs": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    return out


if __name__ == "__main__":
    main()
