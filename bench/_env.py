"""What every benchmark records about where it ran: commit, machine, versions, load; and the Linux peak-RSS probe.

Shared by ``bench/sparse_delta.py`` and ``bench/throughput.py`` (both are run as scripts, so this module is imported
from the ``bench/`` folder on ``sys.path``).
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def git_commit(script: str) -> tuple[str | None, bool | None]:
    """HEAD and whether the code that decides the numbers (``src/`` and the bench ``script``) has uncommitted changes.

    ``BENCH_GIT_COMMIT`` (``<sha>`` or ``<sha>-dirty``) overrides it, for a copy of the tree whose ``.git`` is not
    the checkout's (a remote GPU machine that receives the working tree)."""
    given = os.environ.get("BENCH_GIT_COMMIT")
    if given:
        return given.removesuffix("-dirty"), given.endswith("-dirty")
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "src", script],
            cwd=ROOT, capture_output=True, text=True, check=True,
        )
        return sha.stdout.strip(), bool(dirty.stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        return None, None


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_info(device: torch.device) -> dict:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return {
            "type": "cuda", "name": torch.cuda.get_device_name(device),
            "memory_gib": round(props.total_memory / 2**30, 1), "capability": f"{props.major}.{props.minor}",
            "cuda": torch.version.cuda,
        }
    return {"type": "cpu", "name": cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads()}


def device_slug(info: dict) -> str:
    """``cpu`` or the GPU's name as a file-name part (``nvidia-h100-80gb-hbm3``)."""
    if info["type"] == "cpu":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", info["name"].lower()).strip("-")


def versions() -> dict:
    import peft
    import transformers

    import sparse_lowrank_peft

    out = {
        "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
        "peft": peft.__version__, "sparse_lowrank_peft": sparse_lowrank_peft.__version__, "triton": None,
    }
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        pass
    return out


def provenance(script: str, argv, **extra_versions) -> dict:
    """The head of a CPU result file: ``command`` (``script`` and its arguments: ``argv``, else the process's),
    ``commit``, ``dirty``, ``device`` and ``versions`` (:func:`versions` plus ``extra_versions``)."""
    commit, dirty = git_commit(script)
    args = list(argv) if argv is not None else sys.argv[1:]
    return {"command": " ".join(["python", script, *map(str, args)]), "commit": commit, "dirty": dirty,
            "device": device_info(torch.device("cpu")), "versions": {**versions(), **extra_versions}}


def loadavg() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def proc_status() -> tuple[int, int]:
    """``(VmHWM, VmRSS)`` of this process in bytes (Linux)."""
    text = Path("/proc/self/status").read_text()
    hwm = int(re.search(r"VmHWM:\s+(\d+)", text).group(1)) * 1024
    rss = int(re.search(r"VmRSS:\s+(\d+)", text).group(1)) * 1024
    return hwm, rss


def reset_hwm() -> None:
    """Reset the kernel's peak-RSS mark (``VmHWM``) of this process to its current RSS."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def print_saved(path: str, markdown) -> dict:
    """``--print FILE``: the saved result, printed as its markdown table and returned."""
    import json

    saved = json.loads(Path(path).read_text())
    print(markdown(saved))
    return saved


def save_result(path, result: dict, markdown) -> dict:
    """Write ``result`` as JSON to ``path`` (folders made), print its markdown table and where it went; returns it."""
    import json

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(markdown(result))
    print(f"wrote {path}", file=sys.stderr)
    return result

