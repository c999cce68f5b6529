"""Run a command as a child subreaper and report what it left running.

    python tests/reaped_run.py REPORT.json -- safedpo-ray train ...

This process marks itself a child subreaper (Linux prctl PR_SET_CHILD_SUBREAPER), so every
process the command starts, however deep and even after its parent died (a Ray worker whose
raylet is gone), is re-parented to it instead of to init: the command's descendants stay
findable as this process's descendants. SIGTERM/SIGINT received here are passed on to the
command (a test signals this wrapper, not the command's own pid, which it does not know).

After the command exits, REPORT.json gets {"returncode", "left_at_exit": [...], "left_after_s":
[...]} (descendants still alive right after the exit, and after a short grace period), then every
descendant still alive is killed, so a failing check never leaves processes behind either.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import time

import psutil

PR_SET_CHILD_SUBREAPER = 36
GRACE_S = float(os.environ.get("REAPED_RUN_GRACE_S", "3"))


def alive_descendants() -> list[dict]:
    me = psutil.Process()
    # reap zombies re-parented to us (they are gone, only their exit status is left)
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            break
    out = []
    for p in me.children(recursive=True):
        try:
            if p.status() == psutil.STATUS_ZOMBIE:
                continue
            out.append({"pid": p.pid, "ppid": p.ppid(), "name": p.name(),
                        "cmdline": " ".join(p.cmdline())[:300], "rss_mb": p.memory_info().rss >> 20})
        except psutil.NoSuchProcess:
            continue
    return out


def main() -> int:
    report, sep, *cmd = sys.argv[1:]
    assert sep == "--" and cmd, __doc__
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")
    child = subprocess.Popen(cmd)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, _frame: child.send_signal(signum))
    rc = child.wait()
    exited = time.time()
    left_at_exit = alive_descendants()
    left_after = left_at_exit
    while left_after and time.time() - exited < GRACE_S:
        time.sleep(0.2)
        left_after = alive_descendants()
    with open(report, "w") as f:
        json.dump({"returncode": rc, "left_at_exit": left_at_exit, "left_after_s": left_after,
                   "grace_s": GRACE_S}, f, indent=2)
    for _ in range(3):
        for p in alive_descendants():
            try:
                os.kill(p["pid"], signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.3)
    alive_descendants()  # reap
    return rc


if __name__ == "__main__":
    sys.exit(main())
