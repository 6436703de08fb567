"""A QEMU live migration between two hosts of a lab, through ``holepunch-mig
migrate-proxy`` processes: the manager that examples/migration_manager.py, the
migration tests and the QEMU benchmark cells share.

The lab's "left" host is the source, "right" the destination (whose control port the
presets open).  Mux mode:

1. destination: QEMU with ``-incoming defer``; QMP ``migrate-incoming unix:IN``;
   ``holepunch-mig migrate-proxy destination --connect-unix IN --control-listen :7070``
2. source: ``holepunch-mig migrate-proxy source --listen-unix OUT --control DST:7070``
   punches a TCP link, authenticates it (Noise KK) and prints ``ready unix:OUT``
3. source: QMP ``migrate unix:OUT``; poll ``query-migrate`` until it is over
4. check the destination VM is ``running`` and both proxies exited 0

Handoff mode gives each proxy a QMP monitor of its own (a second ``-qmp`` socket: QEMU
serves one client per monitor and looks ``getfd`` names up on the monitor that
received them); the source proxy issues ``migrate fd:NAME`` itself and prints
``ready fd:NAME``, and the manager watches ``query-migrate`` on its own monitor.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import trio

from holepunch_mig.errors import ProxyNotReady, QmpError
from holepunch_mig.lab.spec import CONTROL_PORT
from holepunch_mig.lab.topology import Lab
from holepunch_mig.migration.qemu import (
    MigrationResult,
    QemuVM,
    make_ram_image,
    migrate,
    query_status,
    set_migration_options,
    start_incoming,
    wait_migration,
    wait_status,
)
from holepunch_mig.net.keyfiles import pinned_pair

CLI = [sys.executable, "-m", "holepunch_mig.cli"]


@dataclass
class Outcome:
    """What the manager saw: QEMU's verdict, both VMs' states, both proxies' exits."""

    qemu: MigrationResult
    source_status: str  # "postmigrate" after success, "running" after a failure
    destination_status: str  # "running" after success; "exited"/"inmigrate"/... otherwise
    source_exit: int | None
    destination_exit: int | None
    source_report: dict[str, Any] | None
    destination_report: dict[str, Any] | None
    qemu_cpu: dict[str, float] = field(default_factory=dict)
    """CPU seconds each QEMU ("source", "destination") used from migrate to the end."""


async def _ready_line(
    proc: subprocess.Popen[bytes], timeout: float, report: Path | None = None
) -> str:
    """The source proxy prints ``ready unix:PATH`` once the whole path is up."""
    assert proc.stdout is not None
    with trio.fail_after(timeout):
        line = await trio.to_thread.run_sync(proc.stdout.readline, abandon_on_cancel=True)
    text = line.decode().strip()
    if not text.startswith(("ready unix:", "ready fd:")):
        with trio.move_on_after(5):
            await trio.to_thread.run_sync(proc.wait, abandon_on_cancel=True)
        verdict = (_read_json(report) or {}).get("verdict") if report is not None else None
        raise ProxyNotReady(
            f"source proxy did not get ready (exit {proc.poll()})"
            + (f": {verdict}" if verdict else f": {text!r}")
        )
    return text.removeprefix("ready ")


async def _exit_code(proc: subprocess.Popen[bytes], timeout: float) -> int | None:
    with trio.move_on_after(timeout):
        return await trio.to_thread.run_sync(proc.wait, abandon_on_cancel=True)
    proc.kill()
    return None


async def _status(vm: QemuVM) -> str:
    """The VM's run state, or "exited" if QEMU is gone (a destination whose incoming
    migration failed exits)."""
    try:
        return await query_status(vm.qmp)
    except QmpError:
        return "exited"


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data: dict[str, Any] = json.loads(path.read_text())
        return data
    except (OSError, ValueError):
        return None


async def migrate_in_lab(
    lab: Lab,
    work: Path,
    *,
    mem_mib: int = 512,
    multifd: int = 0,
    ram_image: Path | None = None,
    max_bandwidth: int = 10**10,
    proxy_args: tuple[str, ...] = (),
    links: int | None = None,
    during: Callable[[QemuVM, QemuVM, dict[str, subprocess.Popen[bytes]]], Awaitable[None]]
    | None = None,
    after: Callable[[QemuVM, QemuVM], Awaitable[None]] | None = None,
    log: IO[bytes] | None = None,
    timeout: float = 120.0,
    mode: str = "mux",
) -> Outcome:
    """Migrate a fresh ``mem_mib`` guest from lab host "left" to "right" through
    migrate-proxy processes.  ``during`` runs beside the migration (tests inject
    failures with it); ``after`` runs once it is over, before the VMs are stopped
    (tests compare RAM with it).  ``links``: the source proxy's ``--links`` (default one
    per QEMU connection).  ``mode="handoff"`` runs the proxies in handoff mode
    (see the module docstring).  Every QEMU and proxy started here is gone on return."""
    handoff = mode == "handoff"
    if ram_image is None:
        ram_image = await trio.to_thread.run_sync(make_ram_image, work / "ram.img", mem_mib)
    incoming, outgoing = work / "incoming.sock", work / "outgoing.sock"
    reports = {side: work / f"{side}-proxy.json" for side in ("source", "destination")}
    for path in (incoming, outgoing, *reports.values()):
        path.unlink(missing_ok=True)
    out = log if log is not None else subprocess.DEVNULL
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    procs: dict[str, subprocess.Popen[bytes]] = {}
    keys = pinned_pair(work)  # the proxies pin each other's key
    async with (
        QemuVM(
            work,
            name="src",
            mem_mib=mem_mib,
            ram_image=ram_image,
            netns=lab.netns("left"),
            proxy_monitor=handoff,
        ) as src,
        QemuVM(
            work,
            name="dst",
            mem_mib=mem_mib,
            ram_image=ram_image,
            incoming="defer",
            netns=lab.netns("right"),
            proxy_monitor=handoff,
        ) as dst,
    ):
        try:
            # 1. destination QEMU listens on a UNIX socket; its proxy feeds it.  Handoff:
            #    the proxy gives QEMU the link itself (migrate-incoming fd:NAME).
            if handoff:
                await set_migration_options(dst.qmp, multifd_channels=multifd)
                dst_args = ["--mode", "handoff", "--qmp", str(dst.proxy_qmp_path)]
            else:
                await start_incoming(dst.qmp, f"unix:{incoming}", multifd_channels=multifd)
                dst_args = ["--connect-unix", str(incoming)]
            procs["destination"] = lab.popen(
                "right",
                [
                    *CLI, "migrate-proxy", "destination", *dst_args,
                    "--control-listen", f"0.0.0.0:{CONTROL_PORT}",
                    "--report", str(reports["destination"]),
                    "-q", *keys.destination, *proxy_args,
                ],
                stdout=out, stderr=out, env=env,
            )  # fmt: skip
            # 2. source proxy: punch, authenticate, then say where QEMU should migrate to
            host, port = lab.control_endpoint("right", CONTROL_PORT)
            if handoff:
                await set_migration_options(
                    src.qmp, multifd_channels=multifd, max_bandwidth=max_bandwidth
                )
                src_args = ["--mode", "handoff", "--qmp", str(src.proxy_qmp_path)]
            else:
                src_args = ["--listen-unix", str(outgoing), "--multifd-channels", str(multifd)]
                if links is not None:
                    src_args += ["--links", str(links)]
            procs["source"] = lab.popen(
                "left",
                [
                    *CLI, "migrate-proxy", "source", *src_args,
                    "--control", f"{host}:{port}",
                    "--report", str(reports["source"]),
                    "--expected-size", f"{mem_mib}M",
                    "-q", *keys.source, *proxy_args,
                ],
                stdout=subprocess.PIPE, stderr=out, env=env,
            )  # fmt: skip
            uri = await _ready_line(procs["source"], timeout=60, report=reports["source"])
            cpu0 = {"source": src.cpu_seconds(), "destination": dst.cpu_seconds()}
            # 3. migrate through it (handoff: the source proxy already issued migrate)
            async with trio.open_nursery() as nursery:
                if during is not None:
                    nursery.start_soon(during, src, dst, procs)
                if handoff:
                    result = await wait_migration(src.qmp, timeout=timeout, what=uri)
                else:
                    result = await migrate(
                        src.qmp,
                        uri,
                        multifd_channels=multifd,
                        max_bandwidth=max_bandwidth,
                        timeout=timeout,
                        check=False,
                    )
            # 4. verdicts: QEMU's, the VMs' states, the proxies'
            if result.status == "completed":
                await wait_status(dst.qmp, "running", timeout=20)
            qemu_cpu = {
                "source": src.cpu_seconds() - cpu0["source"],
                "destination": dst.cpu_seconds() - cpu0["destination"],
            }
            codes = {side: await _exit_code(p, timeout=60) for side, p in procs.items()}
            if after is not None:
                await after(src, dst)
            return Outcome(
                qemu=result,
                source_status=await _status(src),
                destination_status=await _status(dst),
                source_exit=codes["source"],
                destination_exit=codes["destination"],
                source_report=_read_json(reports["source"]),
                destination_report=_read_json(reports["destination"]),
                qemu_cpu=qemu_cpu,
            )
        finally:
            for proc in procs.values():
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
