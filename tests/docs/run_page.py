"""Run one page's example blocks in order, in the current folder: ``python run_page.py BLOCKS.json``.

Python blocks share one namespace and run in this process, compiled under the page's own file name and
line numbers (so a traceback shows the Markdown line); bash blocks run with ``bash -e -o pipefail`` in
their own process group, which is killed when the block ends (a server left in the background goes too).
On the first failure it prints ``FAILED file:line`` and exits 1.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import traceback

_running: subprocess.Popen | None = None  # the bash block in progress, killed with us on SIGTERM (a timeout)


def run_python(block: dict, namespace: dict) -> bool:
    code = compile("\n" * (block["line"] - 1) + block["source"], block["path"], "exec")
    try:
        exec(code, namespace)
    except BaseException as e:  # noqa: BLE001 - SystemExit from an example is a failure too
        traceback.print_exception(type(e), e, e.__traceback__.tb_next)  # from the example's frame on
        return False
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    return True


def run_bash(block: dict) -> bool:
    where = block["where"].rsplit(":", 1)[0]
    trap = f"trap 'echo \"bash: {where}:$LINENO: exit $?: $BASH_COMMAND\" >&2' ERR"
    script = trap + "\n" * (block["line"] - 1) + block["source"]
    global _running
    _running = subprocess.Popen(["bash", "-e", "-o", "pipefail", "-c", script], start_new_session=True)
    try:
        return _running.wait() == 0
    finally:
        _kill_running()


def _kill_running() -> None:
    global _running
    if _running is not None:
        try:
            os.killpg(_running.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        _running = None


def _on_sigterm(signum, frame):
    _kill_running()
    print("KILLED: the page ran past its time limit", flush=True)
    os._exit(124)


def main(plan: str) -> int:
    with open(plan, encoding="utf-8") as f:
        blocks = json.load(f)
    signal.signal(signal.SIGTERM, _on_sigterm)
    namespace = {"__name__": "__main__"}
    sys.argv = ["example"]
    sys.path[0] = os.getcwd()  # as for a script run in the example's folder
    for block in blocks:
        print(f"--- {block['where']} ({block['language']})", flush=True)
        start = time.perf_counter()
        ok = run_python(block, namespace) if block["language"] == "python" else run_bash(block)
        print(f"--- {'ok' if ok else 'failed'} in {time.perf_counter() - start:.1f} s", flush=True)
        if not ok:
            print(f"FAILED {block['where']}: the {block['language']} block starting on that line", flush=True)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
