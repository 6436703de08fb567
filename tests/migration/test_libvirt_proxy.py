"""libvirt mode without libvirt: channel labels on the mux (each OPEN reaches the
endpoint its label names, and only a known one), the socket_dir check of migrate-ready,
and the two proxies agreeing (or refusing) over a real session on this host."""

from __future__ import annotations

import socket
import threading
from pathlib import Path
from typing import Any

import pytest
import trio
from test_mux import EchoServer, _finish_both, _recv_all, link_pair
from testsupport.lab import run_cli

from holepunch_mig.errors import MuxError, ProtocolError, ProxyError
from holepunch_mig.migration.common import MigrationError
from holepunch_mig.migration.libvirt import (
    LibvirtProxy,
    LibvirtReport,
    PostcopySwitch,
    _libvirt_job,
    libvirt_destination,
    libvirt_source,
    migrate_domain,
)
from holepunch_mig.migration.mux import OPEN, Mux
from holepunch_mig.migration.proxy import unix_connector
from holepunch_mig.testing import memory_channel_pair
from holepunch_mig.wire import messages


def _labelled(
    routes: dict[str, Path],
) -> tuple[Mux, Mux]:
    def connect(stream: int, label: str) -> socket.socket:
        if label not in routes:
            raise MuxError(f"unknown channel {label!r}")
        return unix_connector(routes[label])(stream)

    (a, wa, ra), (b, wb, rb) = link_pair()
    src = Mux(a, wa, ra, name="A")
    dst = Mux(b, wb, rb, connect_channel=connect, name="B")
    src.start()
    dst.start()
    return src, dst


def _client(src: Mux, label: str, tag: int, payload: bytes) -> socket.socket:
    ours, qemu = socket.socketpair()
    src.add_stream(ours, label)
    qemu.sendall(tag.to_bytes(8, "big") + payload)
    qemu.shutdown(socket.SHUT_WR)
    return qemu


def test_labels_route_each_stream_to_its_endpoint(tmp_path: Path) -> None:
    mig, nbd = EchoServer(tmp_path / "migration.sock"), EchoServer(tmp_path / "nbd.sock")
    src, dst = _labelled({"migration": mig.path, "nbd": nbd.path})
    try:
        clients = [
            _client(src, "nbd", 1, b"disk" * 1000),
            _client(src, "migration", 2, b"ram" * 5000),
            _client(src, "migration", 3, b"multifd"),
        ]
        echoed = [_recv_all(c) for c in clients]
        results = _finish_both(src, dst)
    finally:
        mig.close()
        nbd.close()
    assert not any(isinstance(r, Exception) for r in results), results
    assert echoed[0][8:] == b"disk" * 1000 and echoed[1][8:] == b"ram" * 5000
    assert nbd.order == [1] and mig.order == [2, 3]  # OPEN order within a channel
    assert [s.label for s in results[0].streams] == ["nbd", "migration", "migration"]
    assert [s.label for s in results[1].streams] == ["nbd", "migration", "migration"]


@pytest.mark.parametrize(
    ("payload", "why"),
    [
        (b"etc-passwd", "unknown channel"),
        (b"../nbd", "bad channel label"),
        (b"", "names no channel"),
    ],
)
def test_an_open_for_another_endpoint_fails_the_mux(
    tmp_path: Path, payload: bytes, why: str
) -> None:
    """A peer cannot make the destination connect anywhere but the named endpoints."""
    mig = EchoServer(tmp_path / "migration.sock")

    def connect(stream: int, label: str) -> socket.socket:
        if label != "migration":
            raise MuxError(f"unknown channel {label!r}")
        return unix_connector(mig.path)(stream)

    (a, wa, _ra), (b, wb, rb) = link_pair()
    dst = Mux(b, wb, rb, name="B", connect_channel=connect)
    dst.start()
    try:
        wa.write(OPEN, 1, payload)
        with pytest.raises(MuxError, match=why):
            dst.finish(10)
    finally:
        mig.close()
        dst.close()
        a.close()
    assert mig.order == []


def test_a_label_needs_a_labelled_endpoint(tmp_path: Path) -> None:
    echo = EchoServer(tmp_path / "echo.sock")
    (a, wa, _ra), (b, wb, rb) = link_pair()
    dst = Mux(b, wb, rb, connect=unix_connector(echo.path), name="B")
    dst.start()
    try:
        wa.write(OPEN, 1, b"nbd")
        with pytest.raises(MuxError, match="this side has one"):
            dst.finish(10)
    finally:
        echo.close()
        dst.close()
        a.close()


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        ("/run/holepunch-mig-libvirt/m-0a1b2c", True),
        ("/run/a/b.c/d_e", True),
        ("run/relative", False),
        ("/run/../etc", False),
        ("/run/./x", False),
        ("/run//x", False),
        ("/run/x/", False),
        ("/run/x y", False),
        ("/run/.hidden", False),
        ("/" + "a" * 250, False),
        (None, False),
    ],
)
def test_socket_dir_check(value: object, ok: bool) -> None:
    assert messages.check_socket_dir(value) is ok
    if not ok and isinstance(value, str):
        with pytest.raises(ProtocolError):
            messages.MigrateReady(digest=False, mode="libvirt", socket_dir=value)


async def test_source_refuses_a_directory_outside_its_socket_parent(tmp_path: Path) -> None:
    """A destination cannot make the source create sockets elsewhere: its socket_dir
    must sit in the source's own socket parent (the same --socket-dir on both hosts)."""
    a, b = memory_channel_pair()
    outcome: dict[str, BaseException | None] = {}

    async def destination() -> None:
        try:
            async with libvirt_destination(b, socket_parent=tmp_path / "dst") as proxy:
                await proxy.wait(10)
            outcome["destination"] = None
        except BaseException as exc:
            outcome["destination"] = exc

    async def source() -> None:
        try:
            async with libvirt_source(a, socket_parent=tmp_path / "src"):
                pass
            outcome["source"] = None
        except BaseException as exc:
            outcome["source"] = exc

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(destination)
            nursery.start_soon(source)
    assert isinstance(outcome["source"], ProtocolError), outcome
    assert "not in ours" in str(outcome["source"])
    assert outcome["destination"] is not None  # it did not succeed either
    assert not (tmp_path / "src").exists() or list((tmp_path / "src").iterdir()) == []
    assert list((tmp_path / "dst").iterdir()) == []  # its directory is removed


# -- socket group ------------------------------------------------------------------------

QEMU_GROUP = "libvirt-qemu"  # Debian's, made by libvirt-daemon-system


def _gid() -> int:
    import grp

    try:
        return grp.getgrnam(QEMU_GROUP).gr_gid
    except KeyError:
        pytest.skip(f"no group {QEMU_GROUP}")


async def test_socket_group_opens_the_directories_to_that_group_only(tmp_path: Path) -> None:
    """With socket_group the parent is 0710 and the destination's directory 0770, both
    of QEMU's group (it creates its sockets there), never anything for others; the
    source's directory is 0710 of that group."""
    gid = _gid()
    parent = tmp_path / "run"
    a, b = memory_channel_pair()
    seen: dict[str, tuple[int, int]] = {}

    def mode(path: Path) -> tuple[int, int]:
        st = path.stat()
        return st.st_mode & 0o777, st.st_gid

    async def destination() -> None:
        with pytest.raises(MigrationError):
            async with libvirt_destination(b, socket_parent=parent, socket_group=QEMU_GROUP) as px:
                seen["parent"], seen["dst"] = mode(parent), mode(px.socket_dir)
                await px.wait(10)

    async def source() -> None:
        with pytest.raises(ProtocolError):  # the other parent: refused, as tested above
            async with libvirt_source(a, socket_parent=tmp_path / "src"):
                pass

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(destination)
            nursery.start_soon(source)
    assert seen == {"parent": (0o710, gid), "dst": (0o770, gid)}
    # the source side's directory, made as the source proxy makes it
    proxy = LibvirtProxy(
        "source", _NoLink(), socket_parent=parent, socket_group=QEMU_GROUP,  # type: ignore[arg-type]
        ready_timeout=1, timeout=1, link_timeout=1,
    )  # fmt: skip
    made = proxy._make_source_dir(parent / "m-0123456789ab")
    assert mode(made) == (0o710, gid)
    without = LibvirtProxy(
        "source", _NoLink(), socket_parent=tmp_path / "plain", socket_group=None,  # type: ignore[arg-type]
        ready_timeout=1, timeout=1, link_timeout=1,
    )  # fmt: skip
    assert mode(without._make_source_dir(tmp_path / "plain" / "m-x"))[0] == 0o700
    assert mode(tmp_path / "plain")[0] == 0o700


def test_socket_group_refuses_a_parent_the_group_cannot_enter(tmp_path: Path) -> None:
    _gid()
    parent = tmp_path / "closed"
    parent.mkdir(mode=0o700)
    proxy = LibvirtProxy(
        "destination", _NoLink(), socket_parent=parent, socket_group=QEMU_GROUP,  # type: ignore[arg-type]
        ready_timeout=1, timeout=1, link_timeout=1,
    )  # fmt: skip
    with pytest.raises(ProxyError, match="chmod g\\+x"):
        proxy._make_destination_dir()
    assert (parent.stat().st_mode & 0o777) == 0o700  # not widened
    assert list(parent.iterdir()) == []


class _NoLink:
    """What LibvirtProxy's constructor reads from a link (its report)."""

    report = None


# -- post-copy ---------------------------------------------------------------------------


def test_postcopy_switch_rules() -> None:
    """Default: only once a second pass over memory is needed; with ``after``: that long
    into the call, but never before memory is being sent (the NBD copy comes first)."""
    first_pass = {"memory_iteration": 1}
    second = {"memory_iteration": 2}
    default = PostcopySwitch()
    assert not default.due(first_pass, 100.0)
    assert not default.due({}, 100.0)
    assert default.due(second, 0.1)
    timed = PostcopySwitch(after=2.0)
    assert not timed.due({"memory_iteration": 0}, 5.0)  # storage copy: QEMU would refuse
    assert not timed.due(first_pass, 1.9)
    assert timed.due(first_pass, 2.0)
    timed.requested = 2.0
    assert not timed.due(second, 3.0)  # asked once
    with pytest.raises(ValueError):
        PostcopySwitch(after=-1)


class _FakeDomain:
    """A libvirt domain whose migration runs until post-copy is started, then ends;
    the first switch request is refused, as libvirt does before QEMU's migration runs."""

    def __init__(self, libvirt: Any) -> None:
        self.lv = libvirt
        self.switched = threading.Event()
        self.observed = threading.Event()
        self.requests = 0
        self.iteration = 1

    def name(self) -> str:
        return "fake"

    def jobStats(self, flags: int = 0) -> dict[str, int]:
        return {"type": self.lv.VIR_DOMAIN_JOB_UNBOUNDED, "memory_iteration": self.iteration}

    def migrateStartPostCopy(self, flags: int = 0) -> None:
        self.requests += 1
        if self.requests == 1:
            raise self.lv.libvirtError("post-copy can only be started while ...")
        self.switched.set()

    def state(self) -> tuple[int, int]:
        if self.switched.is_set():
            self.observed.set()
            return self.lv.VIR_DOMAIN_PAUSED, self.lv.VIR_DOMAIN_PAUSED_POSTCOPY
        return self.lv.VIR_DOMAIN_RUNNING, 0

    def abortJob(self) -> None:
        raise AssertionError("no abort expected")

    def call(self) -> None:
        assert self.switched.wait(10), "post-copy never started"
        assert self.observed.wait(10), "the post-copy state was never looked at"


async def test_libvirt_job_switches_to_postcopy_and_sees_it() -> None:
    libvirt = pytest.importorskip("libvirt")
    dom = _FakeDomain(libvirt)
    switch = PostcopySwitch(after=0.0)
    with trio.fail_after(20):
        error = await _libvirt_job(dom, dom.call, None, {}, lambda: None, lambda: None, switch)
    assert error is None
    assert dom.requests == 2  # refused once, retried at the next sample
    assert switch.requested is not None and switch.seen is not None
    assert switch.seen >= switch.requested


def test_summary_says_when_postcopy_was_allowed_but_not_used() -> None:
    rep = LibvirtReport(domain="vm", flags=["LIVE", "POSTCOPY"], libvirt_ok=True, seconds=3.0)
    assert "not switched (precopy completed before the switch was due)" in rep.summary()
    rep.postcopy_request_seconds = 0.01  # asked, but precopy ended first
    assert "before the switch took effect" in rep.summary()
    rep.postcopy, rep.postcopy_seconds = True, 2.5
    assert "not switched" not in rep.summary()
    assert "post-copy: switched after 2.50 s" in rep.summary()
    plain = LibvirtReport(domain="vm", flags=["LIVE"], libvirt_ok=True, seconds=3.0)
    assert "post-copy" not in plain.summary()


async def test_postcopy_with_parallel_is_refused() -> None:
    with pytest.raises(ValueError, match="multifd"):
        await migrate_domain(object(), "qemu+tcp://x/system", None, postcopy=True, parallel=2)  # type: ignore[arg-type]


def test_cli_postcopy_with_parallel_is_a_usage_error() -> None:
    res = run_cli("migrate", "vm", "qemu+tcp://h/system", "--control", "h:1",
                  "--postcopy", "--parallel", "2")  # fmt: skip
    assert res.returncode == 2
    assert "multifd" in res.stderr and "drop --parallel" in res.stderr
    res = run_cli("migrate", "vm", "qemu+tcp://h/system", "--control", "h:1",
                  "--postcopy-after", "3")  # fmt: skip
    assert res.returncode == 2 and "needs --postcopy" in res.stderr
