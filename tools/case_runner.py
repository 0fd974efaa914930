"""Run one function in a forked child: its outcome, wall time and memory, a hang killed at a deadline.

A fork of an interpreter that already imported torch and residency costs ~10 ms where a fresh
`python -m residency` costs 2–4 s on these machines, so a few hundred hostile cases fit in minutes.
Memory is the child's peak RSS from wait4 less its RSS just after the fork (what the case itself added;
a hung child is killed before it reports, so its added figure reads 0).
"""

from __future__ import annotations

import io
import json
import os
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass

import psutil

POLL_S = 0.005


@dataclass(frozen=True)
class CaseResult:
    outcome: str  # what the case function returned, "hang", "crash" (signal/abnormal exit) or "traceback"
    wall_s: float  # fork to exit, as the parent saw it
    peak_rss_bytes: int  # the child's peak resident set
    added_rss_bytes: int  # peak less the RSS at the fork: what the case itself took
    stderr: str  # the case's stderr, cut to 2,000 characters
    detail: str = ""  # the uncaught exception's last line, when there was one

    @property
    def traceback(self) -> bool:
        return self.outcome == "traceback" or "Traceback (most recent call last)" in self.stderr


def run_forked(case: Callable[[], str], timeout_s: float) -> CaseResult:
    """Call `case()` in a forked child; it returns a short outcome string ("ok", "error", "exit 1" …)."""
    sys.stdout.flush()
    sys.stderr.flush()
    with tempfile.TemporaryFile() as err_file, tempfile.TemporaryFile() as out_file:
        read_fd, write_fd = os.pipe()
        t0 = time.perf_counter()
        pid = os.fork()
        if pid == 0:  # the child: never returns
            os.close(read_fd)
            _child(case, write_fd, err_file.fileno(), out_file.fileno())
        os.close(write_fd)
        status, usage, hung = _wait(pid, timeout_s)
        wall_s = time.perf_counter() - t0
        with os.fdopen(read_fd, "rb") as pipe:
            report = pipe.read()
        err_file.seek(0)
        stderr = err_file.read().decode(errors="replace")[:2000]
    peak = int(usage.ru_maxrss) * 1024 if usage is not None else 0
    try:
        doc = json.loads(report.decode() or "{}")
    except ValueError:
        doc = {}
    added = max(0, peak - int(doc.get("start_rss_bytes", peak)))
    if hung:
        return CaseResult("hang", wall_s, peak, added, stderr)
    outcome = doc.get("outcome") or f"crash (status {status})"
    return CaseResult(outcome, wall_s, peak, added, stderr, doc.get("detail", ""))


def _child(case: Callable[[], str], write_fd: int, err_fd: int, out_fd: int) -> None:
    code = 0
    try:
        os.dup2(err_fd, 2)
        os.dup2(out_fd, 1)
        sys.stderr = io.TextIOWrapper(os.fdopen(2, "wb", closefd=False), write_through=True)
        sys.stdout = io.TextIOWrapper(os.fdopen(1, "wb", closefd=False), write_through=True)
        start_rss = psutil.Process().memory_info().rss  # anonymous pages shared with the parent count here
        try:
            doc = {"outcome": str(case())}
        except BaseException as e:  # the finding itself: an exception the case did not expect
            traceback.print_exc()
            doc = {"outcome": "traceback", "detail": f"{type(e).__name__}: {e}"[:300]}
        doc["start_rss_bytes"] = start_rss
        sys.stdout.flush()
        sys.stderr.flush()
        os.write(write_fd, json.dumps(doc).encode())
    except BaseException:
        code = 3
    finally:
        os._exit(code)


def _wait(pid: int, timeout_s: float):
    deadline = time.monotonic() + timeout_s
    while True:
        done, status, usage = os.wait4(pid, os.WNOHANG)
        if done:
            return status, usage, False
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            _, status, usage = os.wait4(pid, 0)
            return status, usage, True
        time.sleep(POLL_S)
