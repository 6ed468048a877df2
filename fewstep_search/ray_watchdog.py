"""A tiny watchdog that stops a local Ray's processes when the process that started Ray dies.

Why: when `fewstep-search` is killed with SIGKILL, Ray's own fate sharing stops its GCS and raylet, but agent
processes (dashboard agent, runtime-env agent) live on as orphans. `ray_runtime.ray_session` starts this module
in a session of its own (`python -m fewstep_search.ray_watchdog DRIVER_PID SESSION_DIR`) whenever it starts a
local Ray; the watchdog polls the driver, and once the driver is gone it stops every process whose command line
or open files point into the Ray session's folder (SIGTERM, then SIGKILL). It also exits on its own when the
session has no process left (the driver shut Ray down normally). Standard library only: it starts in
milliseconds.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

__all__ = ["session_processes", "stop_session", "main"]

_POLL_S = 0.5
_SCAN_EVERY = 20
"""Polls between scans of /proc for the session's processes (the driver's liveness is checked every poll)."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return Path(f"/proc/{pid}").exists() and "Z" not in _state(pid)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "Z"


def session_processes(session_dir: str, *, exclude: tuple[int, ...] = ()) -> list[int]:
    """PIDs (Linux /proc) whose command line or open files refer to `session_dir`, zombies excluded."""
    mine = {os.getpid(), *exclude}
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in mine:
            continue
        pid = int(entry.name)
        try:
            if session_dir in (entry / "cmdline").read_bytes().decode(errors="replace"):
                found.append(pid)
                continue
            for fd in (entry / "fd").iterdir():
                if os.readlink(fd).startswith(session_dir):
                    found.append(pid)
                    break
        except OSError:
            continue
    return [p for p in found if _state(p) != "Z"]


def stop_session(session_dir: str, *, grace_s: float = 3.0) -> list[int]:
    """SIGTERM every process of the session, then SIGKILL what is left after `grace_s`; returns the PIDs hit."""
    hit = session_processes(session_dir)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in session_processes(session_dir):
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and session_processes(session_dir):
            time.sleep(0.2)
    return hit


def main(argv: list[str]) -> int:
    if len(argv) != 2 or not argv[0].isdigit():
        print("usage: python -m fewstep_search.ray_watchdog DRIVER_PID SESSION_DIR", file=sys.stderr)
        return 2
    driver, session = int(argv[0]), argv[1]
    polls, idle = 0, 0
    while _alive(driver):
        time.sleep(_POLL_S)
        polls += 1
        if polls % _SCAN_EVERY == 0:  # scanning /proc is the costly part: rarely
            idle = idle + 1 if not session_processes(session, exclude=(driver,)) else 0
            if idle >= 3:  # Ray was shut down normally: nothing left to guard
                return 0
    time.sleep(2.0)  # let Ray's own fate sharing go first
    stop_session(session)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
