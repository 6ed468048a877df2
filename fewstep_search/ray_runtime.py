"""Ray, started once per run: the one place that calls `ray.init` / `ray.shutdown`, and keeps Ray quiet.

Phase-1's Ray Tune executor and Phase-2's Ray Train trainer both run inside `ray_session`; when the loop has
already opened one (the normal case: `fewstep-search run` starts Ray once for all its rounds), an inner
`ray_session` is a no-op, so Ray never starts and stops around every search.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
from collections.abc import Iterator

__all__ = ["ray_session", "quiet_ray", "LOOPBACK_ENV"]

_QUIET_ENV = {
    "RAY_AIR_NEW_OUTPUT": "0",  # the legacy reporter is silent at verbose=0; the new one prints a config box
    "TUNE_PRINT_ALL_TRIAL_ERRORS": "0",  # failures are reported once, in our table and the Optuna record
    "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1",  # no CSV/JSON/TensorBoard per trial: Optuna is the record
    "RAY_DEDUP_LOGS": "1",
}
_LOGGERS = ("ray.tune", "ray.train", "ray.air")

LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
"""Ray's switch for a single-machine node: off, Ray takes the loopback address as the node's IP, and then its
GCS, raylet, workers and agents listen on 127.0.0.1 only. By default Linux Ray takes the machine's routable
address and its gRPC servers listen on every interface: an unauthenticated GCS that anyone who reaches the
machine can use to run code as the user. tests/test_ray_loopback.py lists the sockets to keep this true."""


@contextlib.contextmanager
def _loopback_only() -> Iterator[None]:
    """Make the next `ray.init` start a node on 127.0.0.1: the environment switch (for the processes Ray spawns)
    and the constant Ray read from it when it was imported (for this process), both put back afterwards."""
    from ray._private import ray_constants

    had_env, had_const = os.environ.get(LOOPBACK_ENV), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[LOOPBACK_ENV] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = had_const
        if had_env is None:
            os.environ.pop(LOOPBACK_ENV, None)
        else:
            os.environ[LOOPBACK_ENV] = had_env


@contextlib.contextmanager
def quiet_ray() -> Iterator[None]:
    """Ray's environment switches (only those the user has not set) and its Tune/Train loggers, for the block.

    Why: Tune logs every trial failure and a final 'Trials did not complete' at ERROR and prints config boxes;
    our tables and the Optuna record report the same things once.
    """
    added = {k: v for k, v in _QUIET_ENV.items() if k not in os.environ}
    os.environ.update(added)
    loggers = [logging.getLogger(n) for n in _LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, lvl in zip(loggers, levels, strict=True):
            lg.setLevel(lvl)
        for k in added:
            os.environ.pop(k, None)


def _session_dir() -> str | None:
    try:
        import ray

        return str(ray._private.worker.global_worker.node.get_session_dir_path())
    except (AttributeError, RuntimeError):
        return None


def _start_watchdog() -> None:
    """Guard the local Ray we just started: if this process is SIGKILLed, `ray_watchdog` stops Ray's orphans."""
    session = _session_dir()
    if session is None or not sys.platform.startswith("linux"):
        return
    subprocess.Popen([sys.executable, "-m", "fewstep_search.ray_watchdog", str(os.getpid()), session],
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                     start_new_session=True)


@contextlib.contextmanager
def ray_session(*, workers: int | None = None, address: str | None = None, gpus: int | None = None) -> Iterator[bool]:
    """Use a running Ray, attach to `address`, or start a local one with `workers` CPUs; stop only our own.

    Yields whether this call started Ray. The local Ray listens on 127.0.0.1 only (`LOOPBACK_ENV`) and starts no
    dashboard; attaching to `address` (a cluster the user started) leaves its addresses as the user chose them.
    """
    import ray

    started = False
    with quiet_ray():
        if not ray.is_initialized():
            if address is not None:
                ray.init(address=address, logging_level=logging.ERROR, log_to_driver=False)
            else:
                with _loopback_only():
                    ray.init(num_cpus=workers, num_gpus=gpus, include_dashboard=False, logging_level=logging.ERROR,
                             log_to_driver=False, configure_logging=True)
                _start_watchdog()
            started = True
        try:
            yield started
        finally:
            if started:
                ray.shutdown()
