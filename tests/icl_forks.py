"""`icl` command lines run as real processes without paying Python's and torch's start-up for each.

A long-lived helper process imports the console script's code and the model libraries once (what
`icl` would import before its first model load), then forks one child per command line. The child
is a process of its own, as the console script is: it gets the command's working folder,
environment, argv, and files as its stdin/stdout/stderr (file descriptors, so whatever a library
writes to fd 2 is caught as well), runs `icl_engine.apps.console.main` and exits through the
steps of the interpreter's exit that concern the command (its threads, atexit handlers, stream
flushes, finalizers of its objects; not the teardown of the preloaded modules), so a traceback
printed on the way out still reaches its stderr. The exit status is the child's.

What differs from a fresh `icl` process: the preloaded modules were imported before the command's
environment was set (the helper sets what the CLI itself sets before importing them), a command
line does not pay the import time, the preloaded heap is frozen (gc.freeze) and is not torn down
at exit. Tests that are about start-up or exit themselves (import cost, signals, the heap freeze,
module teardown) run the installed script instead, and the suites
that use this helper keep a few cases through the installed script too.
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

ICL = Path(sys.executable).with_name("icl")

# Imported once by the helper: the CLI and what its model-loading commands import on the way.
PRELOAD = ("icl_engine.apps.console", "icl_engine.apps.cli", "icl_engine.core.engines", "icl_engine.apps.indexes",
           "icl_engine.apps.training", "icl_engine.core.lm", "icl_engine.core.embed", "torch", "transformers",
           "transformers.models.llama.modeling_llama", "safetensors.torch")

_SERVER = r'''
import importlib, json, os, sys
# What `icl` sets before it imports the model libraries (cli._setup), set before they are preloaded.
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
for name in json.loads(sys.argv[1]):
    importlib.import_module(name)
import gc, threading
assert threading.active_count() == 1, "a Python thread before fork: the children would not be sound"
gc.collect()
gc.freeze()  # the preloaded heap: the children's collections leave it alone (as icl does once a model is loaded)
proto = os.fdopen(os.dup(1), "w", buffering=1)

def serve():
    while True:
        line = sys.stdin.readline()
        if not line:
            return None
        req = json.loads(line)
        sys.stdout.flush(); sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            proto.close()
            return req
        proto.write(json.dumps({"pid": pid}) + "\n")
        _, status = os.waitpid(pid, 0)
        proto.write(json.dumps({"code": os.waitstatus_to_exitcode(status)}) + "\n")

req = serve()
if req is not None:  # the child: the command line, as the console script runs it
    for fd, (path, mode) in enumerate(((os.devnull, os.O_RDONLY), (req["stdout"], os.O_WRONLY),
                                       (req["stderr"], os.O_WRONLY))):
        f = os.open(path, mode)
        os.dup2(f, fd)
        os.close(f)
    sys.stdin = open(0, closefd=False)
    os.chdir(req["cwd"])
    os.environ.clear()
    os.environ.update(req["env"])
    sys.argv = [req["argv0"], *req["args"]]
    from icl_engine.apps.console import main
    try:
        main()
        code = 0
    except SystemExit as e:  # as the interpreter turns it into an exit status
        if e.code is None or isinstance(e.code, int):
            code = e.code or 0
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except BaseException:
        sys.excepthook(*sys.exc_info())
        code = 1
    # The visible steps of the interpreter's exit, in its order: wait for the command's non-daemon
    # threads, run its atexit handlers, flush the streams (a failing flush is reported, as at exit),
    # and collect the command's garbage so that its finalizers run. Tearing down the preloaded
    # modules (a second per child, and nothing of the command's) is left out.
    import atexit, gc, threading
    threading._shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception as e:
            print(f"Exception ignored in: {stream!r}\n{type(e).__name__}: {e}", file=sys.__stderr__)
            code = code or 120
    gc.collect()
    sys.stderr.flush()
    os._exit(code)
'''


@dataclass
class Completed:
    """What subprocess.run would give for the command line (text mode)."""

    args: list
    returncode: int
    stdout: str
    stderr: str


class IclForks:
    """`run(args, cwd=..., env=...)`: one `icl` command line in a forked child; a lock makes the
    calls of several threads take turns (the children are short, the helper serves one at a time)."""

    def __init__(self, env: dict | None = None):
        self._lock = threading.Lock()
        self._log = tempfile.TemporaryFile()
        self._proc = subprocess.Popen([sys.executable, "-c", _SERVER, json.dumps(PRELOAD)], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=self._log, text=True,
                                      env=env if env is not None else dict(os.environ))
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._proc.stdout, selectors.EVENT_READ)

    def _reply(self, timeout: float | None) -> dict | None:
        if timeout is not None and not self._sel.select(timeout):
            return None
        line = self._proc.stdout.readline()
        if not line:
            self._log.seek(0)
            raise RuntimeError(f"the icl fork helper died: {self._log.read().decode(errors='replace')[-2000:]}")
        return json.loads(line)

    def run(self, args, *, cwd, env: dict, timeout: float = 300) -> Completed:
        args = [str(a) for a in args]
        with self._lock, tempfile.TemporaryDirectory() as tmp:
            out, err = Path(tmp) / "stdout", Path(tmp) / "stderr"
            out.touch(), err.touch()
            req = {"args": args, "cwd": str(cwd), "env": {k: str(v) for k, v in env.items()}, "argv0": str(ICL),
                   "stdout": str(out), "stderr": str(err)}
            self._proc.stdin.write(json.dumps(req) + "\n")
            self._proc.stdin.flush()
            pid = self._reply(600)["pid"]  # the first request waits for the preloading
            reply = self._reply(timeout)
            if reply is None:
                os.kill(pid, signal.SIGKILL)
                self._reply(None)
                raise subprocess.TimeoutExpired([str(ICL), *args], timeout)
            return Completed([str(ICL), *args], reply["code"], out.read_text(errors="replace"),
                             err.read_text(errors="replace"))

    def close(self) -> None:
        self._proc.stdin.close()
        try:
            self._proc.wait(30)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._sel.close()
        self._proc.stdout.close()
        self._log.close()
