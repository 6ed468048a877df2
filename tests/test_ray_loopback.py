"""The run's private Ray listens on loopback only: an open GCS lets anyone who reaches the machine run code.

Lists the listening sockets of every process the local Ray started (the driver's own core worker, the GCS,
the raylet, its workers and agents: all descendants of this process) while a task has run, and fails on any
address that is not loopback (a wildcard `0.0.0.0` / `::` included).
"""

from __future__ import annotations

import ipaddress
import os

import pytest

psutil = pytest.importorskip("psutil")
ray = pytest.importorskip("ray")


def _listening(proc: psutil.Process) -> list[tuple[str, str, int]]:
    try:
        conns = proc.net_connections(kind="inet")
        name = proc.name()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return []
    return [(name, c.laddr.ip, c.laddr.port) for c in conns if c.status == psutil.CONN_LISTEN]


def _is_loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip.split("%")[0])
    mapped = getattr(addr, "ipv4_mapped", None)
    return (mapped or addr).is_loopback


def test_the_local_ray_listens_on_loopback_only() -> None:
    from fewstep_search.ray_runtime import LOOPBACK_ENV, ray_session

    if ray.is_initialized():
        pytest.skip("another test left Ray running in this process")
    before = os.environ.get(LOOPBACK_ENV)

    @ray.remote
    def ping() -> int:
        return os.getpid()

    with ray_session(workers=1) as started:
        assert started
        worker_pid = ray.get(ping.remote())
        me = psutil.Process()
        procs = [me, *me.children(recursive=True)]
        assert worker_pid in {p.pid for p in procs}, "the task's worker is not among the processes examined"
        sockets = [s for p in procs for s in _listening(p)]
        names = {name for name, _, _ in sockets}
        assert {"gcs_server", "raylet"} <= names, f"expected the GCS and raylet to listen, saw {sorted(names)}"
        exposed = [s for s in sockets if not _is_loopback(s[1])]
        assert not exposed, f"Ray processes listen beyond loopback: {exposed}"
        assert ray.util.get_node_ip_address() == "127.0.0.1"
    assert os.environ.get(LOOPBACK_ENV) == before, "the switch leaked into the caller's environment"


def test_the_loopback_check_sees_wildcards() -> None:
    assert _is_loopback("127.0.0.1") and _is_loopback("::1") and _is_loopback("::ffff:127.0.0.1")
    assert not _is_loopback("0.0.0.0") and not _is_loopback("::") and not _is_loopback("192.0.2.2")
