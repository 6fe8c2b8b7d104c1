"""``fresh_python(args)``: what ``subprocess.run([sys.executable, *args])`` does, without paying the imports each time.

A new Python process imports torch, transformers and peft before any check can start: 6-8 s on 2 cores (peft's
import alone is 6.2 s there), against well under a second for what most fresh-process checks then do. So one server
process per test session imports those three libraries, and nothing else, once; for each request it forks a child
that runs the script exactly as ``python -c CODE ...``, ``python -m MODULE ...`` or ``python PATH ...`` would
(``__main__``, ``sys.argv``, the script's folder on ``sys.path``, the caller's working folder and environment) and
reports its exit status. The server never runs a torch operation, so a child inherits no thread pool, and it never
imports ``sparse_lowrank_peft``: each child imports the package (or, for plain-PEFT checks, does not) as a fresh
process would. What the three libraries read from the environment at import is fixed in the server: a check that
sets such a variable (``TRITON_INTERPRET=1``: triton is imported by transformers) runs in a real subprocess.
"""

from __future__ import annotations

import atexit
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

SERVER = textwrap.dedent(
    r"""
    import json, os, runpy, sys, traceback
    import torch, transformers, peft  # the expensive imports, once

    def run(request):
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
            os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
        args = request["args"]
        if args[0] == "-c":
            sys.argv = ["-c", *args[2:]]
            sys.path.insert(0, "")
            exec(compile(args[1], "<string>", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
        elif args[0] == "-m":
            sys.argv = [args[1], *args[2:]]
            sys.path.insert(0, os.getcwd())
            runpy.run_module(args[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = list(args)
            sys.path.insert(0, os.path.dirname(os.path.abspath(args[0])))
            runpy.run_path(args[0], run_name="__main__")

    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                run(request)
            except SystemExit as e:
                if isinstance(e.code, int) or e.code is None:
                    code = e.code or 0
                else:
                    print(e.code, file=sys.stderr)
                    code = 1
            except BaseException:
                traceback.print_exc()
                code = 1
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}), flush=True)
    """
)

_server: subprocess.Popen | None = None


def _start() -> subprocess.Popen:
    global _server
    if _server is None or _server.poll() is not None:
        _server = subprocess.Popen([sys.executable, "-c", SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                   text=True, bufsize=1, start_new_session=True)  # its own group: see the timeout
    return _server


def _stop() -> None:
    global _server
    if _server is not None and _server.poll() is None:
        _server.stdin.close()
        try:
            _server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            _server.kill()
    _server = None


atexit.register(_stop)


def fresh_python(args: list[str], cwd: str | Path | None = None, env: dict | None = None,
                 timeout: float = 300) -> subprocess.CompletedProcess:
    """``subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)``
    in a forked child of the session's server (``args`` starts with ``-c CODE``, ``-m MODULE`` or a script path)."""
    server = _start()
    with tempfile.TemporaryDirectory() as tmp:
        out, err = Path(tmp) / "stdout", Path(tmp) / "stderr"
        request = {"args": [str(a) for a in args], "cwd": str(cwd or os.getcwd()),
                   "env": dict(os.environ if env is None else env), "stdout": str(out), "stderr": str(err)}
        server.stdin.write(json.dumps(request) + "\n")
        server.stdin.flush()
        ready, _, _ = select.select([server.stdout], [], [], timeout)
        if not ready:
            os.killpg(server.pid, signal.SIGKILL)  # the server and the child running the request
            server.wait()
            _stop()
            raise subprocess.TimeoutExpired([sys.executable, *args], timeout)
        reply = server.stdout.readline()
        if not reply:
            _stop()
            raise RuntimeError("the fork server exited: " + (err.read_text() if err.exists() else ""))
        return subprocess.CompletedProcess([sys.executable, *args], json.loads(reply)["returncode"],
                                           out.read_text() if out.exists() else "",
                                           err.read_text() if err.exists() else "")
