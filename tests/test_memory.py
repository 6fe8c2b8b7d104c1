"""Peak memory of an SLTrain training step on a 4096x4096 layer: at most one transient out×in above the unavoidable.

The package's memory rule: no code path *keeps* a dense out×in matrix per layer (saved for backward, cached, or a dense
gradient of the weight's size); a transient ``W0 + S`` in the compute dtype, built and freed inside one layer's op,
is allowed (the fused-weight path, ``delta/fused.py``). So the bound on a training step is one out×in buffer above
the unavoidable tensors, on both paths of the dispatcher.

Measured as the process's peak resident set (Linux ``VmHWM``, reset through ``/proc/self/clear_refs``) in a fresh
process per measurement, so nothing else pollutes it: one process (a child of the test session's fork server, which
imported torch and peft once: ``_forkserver``) forks a child for each measurement before it runs any torch op. A
densifying implementation (PEFT's approach: scatter the values into a dense copy of W, then F.linear, which saves
that copy for backward; autograd then builds a dense weight gradient too) runs through the same measurement as the
positive control: it keeps one out×in from forward to backward and adds the gradient's, so the probe must see it
above the bound.
"""

from __future__ import annotations
from _forkserver import fresh_python

import json
import textwrap
from pathlib import Path

import pytest

MiB = 2**20
D = 4096
TOKENS = 64  # small, so the O(tokens·(in+out)) temporaries (1 MiB each) do not blur the signal
DENSE_BUFFER = D * D * 4  # one out×in fp32 buffer: 64 MiB

PROBE = textwrap.dedent(
    r"""
    import json, os, sys, torch, traceback
    from peft import get_peft_model
    from sparse_lowrank_peft import SLTrainConfig, SparseRandLoraConfig

    D, T = int(sys.argv[1]), int(sys.argv[2])

    def status(field):
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
        raise RuntimeError(field)

    class One(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(D, D, bias=False)
        def forward(self, x):
            return self.lin(x)

    def measure(mode, tuner):
        torch.set_num_threads(2)
        os.environ["SLPEFT_SPARSE_PATH"] = mode if mode in ("fused", "spmm") else "auto"
        torch.manual_seed(0)
        if tuner == "sltrain":
            config = SLTrainConfig(r=8, sparsity=0.01, target_modules=["lin"], init_weights=False)
        else:  # r 256: 16 bases of 4096 x 256 at density 0.01
            config = SparseRandLoraConfig(r=256, basis_density=0.01, target_modules=["lin"], init_weights=False)
        model = get_peft_model(One(), config)
        layer = model.base_model.model.lin
        if mode == "densify":
            support = layer.get_support("default")
            values = layer.sltrain_values["default"]
            W = layer.base_layer.weight
            rows, cols = support.rows(), support.cols()
            def step(x):
                dense = W.index_put((rows, cols), values, accumulate=True)  # PEFT-style: densify, then one matmul
                return torch.nn.functional.linear(x, dense) + layer.lowrank_forward(x, "default")
        else:
            step = model
        x = torch.randn(T, D, requires_grad=True)
        # warm-up step: allocator pools, lazily built layouts, autograd graph code paths
        step(x).square().mean().backward()
        for p in model.parameters():
            p.grad = None
        x.grad = None
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak-RSS counter to the current RSS
        base_rss = status("VmRSS")
        y = step(x)
        y.square().mean().backward()
        peak = status("VmHWM")
        unavoidable = 4 * (x.numel() * 3 + y.numel() * 2)  # x, grad_x, saved x in autograd; y and grad_y
        unavoidable += sum(4 * p.numel() for p in model.parameters() if p.requires_grad)  # gradients
        return {"peak_above_base": peak - base_rss, "unavoidable": unavoidable}

    # one child per measurement, forked before this process ran any torch op (no thread pool to inherit), so each
    # starts from the same imported state, as a fresh process would, without importing again
    for job in json.loads(sys.argv[3]):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                print(json.dumps({"job": job, **measure(*job)}), flush=True)
                code = 0
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stderr.flush()
                os._exit(code)
        _, status_code = os.waitpid(pid, 0)
        if status_code:
            sys.exit(f"measurement {job} failed (wait status {status_code})")
    """
)

JOBS = [("densify", "sltrain"), ("spmm", "sltrain"), ("fused", "sltrain"), ("spmm", "sparse_randlora"),
        ("fused", "sparse_randlora")]


@pytest.fixture(scope="module")
def measured() -> dict:
    """``{(mode, tuner): {"peak_above_base", "unavoidable"}}`` of every measurement, all from one subprocess."""
    out = fresh_python(["-c", PROBE, str(D), str(TOKENS), json.dumps(JOBS)], timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    return {tuple(row.pop("job")): row for row in rows}


@pytest.fixture(scope="module")
def densify_extra(measured):
    densify = measured[("densify", "sltrain")]
    extra = densify["peak_above_base"] - densify["unavoidable"]
    # Positive control: the densifying step keeps one out×in (saved for backward) and adds a dense weight gradient.
    assert extra > DENSE_BUFFER * 1.5, densify
    return extra


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc peak-RSS accounting")
@pytest.mark.parametrize("path,bound", [("spmm", 0.25), ("fused", 1.25)])
def test_sltrain_step_keeps_no_dense_matrix(measured, densify_extra, path, bound):
    """SpMM path: no out×in at all (a quarter buffer of allocator slack). Fused path: one transient W0 + S at a time
    (a quarter buffer of slack above it), never the kept one plus a gradient that densifying holds. Measured here:
    spmm -0.7 MiB, fused 58.0 MiB, densify 127.8 MiB above the unavoidable tensors (one buffer: 64 MiB)."""
    ours = measured[(path, "sltrain")]
    extra = ours["peak_above_base"] - ours["unavoidable"]
    assert extra < DENSE_BUFFER * bound, (
        f"{path}: {extra / MiB:.1f} MiB above unavoidable, bound {DENSE_BUFFER * bound / MiB:.0f} MiB "
        f"(densify: {densify_extra / MiB:.1f} MiB)"
    )


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc peak-RSS accounting")
@pytest.mark.parametrize("path,bound", [("spmm", 0.25), ("fused", 1.25)])
def test_sparse_randlora_step_keeps_no_dense_matrix(measured, densify_extra, path, bound):
    """Sparse RandLoRA's ``B·T`` on either path: the same bound (its fused build adds ``L·S`` into the transient
    ``W0 + ΔW`` a block of columns at a time, so no second out×in exists beside it)."""
    ours = measured[(path, "sparse_randlora")]
    extra = ours["peak_above_base"] - ours["unavoidable"]
    assert extra < DENSE_BUFFER * bound, (
        f"{path}: {extra / MiB:.1f} MiB above unavoidable, bound {DENSE_BUFFER * bound / MiB:.0f} MiB "
        f"(densify: {densify_extra / MiB:.1f} MiB)"
    )
