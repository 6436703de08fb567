"""A small migration manager: live-migrate a QEMU guest between two firewalled hosts.

The two "hosts" are network namespaces of the lab's ``fw-fw`` preset: each drops every
inbound NEW connection, except the destination's control port.  There is no port QEMU
could migrate to directly, so the migration goes through ``holepunch-mig migrate-proxy``:

1. destination: QEMU with ``-incoming defer``; QMP ``migrate-incoming unix:IN``;
   ``holepunch-mig migrate-proxy destination --connect-unix IN --control-listen :7070``
2. source: ``holepunch-mig migrate-proxy source --listen-unix OUT --control DST:7070``
   punches a TCP link, authenticates it (Noise KK) and prints ``ready unix:OUT``
3. source: QMP ``migrate unix:OUT``; poll ``query-migrate`` until it is over
4. check the destination VM is ``running`` and both proxies exited 0

Handoff mode (``--mode handoff``; one channel, no multifd) instead gives each proxy a
QMP monitor of its own (a second ``-qmp`` socket: QEMU serves one client per monitor
and looks ``getfd`` names up on the monitor that received them):

1. destination: QEMU with ``-incoming defer``, nothing else;
   ``migrate-proxy destination --mode handoff --qmp DST-PROXY.qmp --control-listen :7070``
2. source: ``migrate-proxy source --mode handoff --qmp SRC-PROXY.qmp --control DST:7070``
   punches and authenticates the link, hands the socket to both QEMUs with a TLS-PSK
   derived from the session, issues ``migrate fd:NAME`` and prints ``ready fd:NAME``
3. the manager watches ``query-migrate`` on its own monitor until it is over
4. as above

Run as root (namespaces):  ``sudo PYTHONPATH=src python examples/migration_manager.py``
Options: ``--mem 512 --multifd 4 --mode handoff``.  The test suite runs the same
``migrate_in_lab``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import trio

from holepunch_mig.lab import CONTROL_PORT, Lab, presets
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
from holepunch_mig.migration.qmp import QmpError

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


async def _ready_line(proc: subprocess.Popen[bytes], timeout: float) -> str:
    """The source proxy prints ``ready unix:PATH`` once the whole path is up."""
    assert proc.stdout is not None
    with trio.fail_after(timeout):
        line = await trio.to_thread.run_sync(proc.stdout.readline, abandon_on_cancel=True)
    text = line.decode().strip()
    if not text.startswith(("ready unix:", "ready fd:")):
        raise RuntimeError(f"source proxy did not get ready (exit {proc.poll()}): {text!r}")
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
    (tests compare RAM with it).  ``mode="handoff"`` runs the proxies in handoff mode
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
                    "-q", *proxy_args,
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
                src_args = ["--listen-unix", str(outgoing)]
            procs["source"] = lab.popen(
                "left",
                [
                    *CLI, "migrate-proxy", "source", *src_args,
                    "--control", f"{host}:{port}",
                    "--report", str(reports["source"]),
                    "--expected-size", f"{mem_mib}M",
                    "-q", *proxy_args,
                ],
                stdout=subprocess.PIPE, stderr=out, env=env,
            )  # fmt: skip
            uri = await _ready_line(procs["source"], timeout=60)
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
            )
        finally:
            for proc in procs.values():
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mem", type=int, default=512, help="guest RAM, MiB")
    ap.add_argument("--multifd", type=int, default=0, help="multifd channels (0: off)")
    ap.add_argument("--mode", choices=("mux", "handoff"), default="mux", help="proxy mode")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="hpm-manager-") as tmp, Lab(presets()["fw-fw"]) as lab:
        outcome = await migrate_in_lab(
            lab,
            Path(tmp),
            mem_mib=args.mem,
            multifd=args.multifd,
            log=sys.stderr.buffer,
            mode=args.mode,
        )
    q = outcome.qemu
    print(
        f"QEMU: {q.status} in {q.wall_seconds:.3f} s, {q.transferred} bytes ({q.mb_per_s:.0f} MB/s)"
    )
    print(f"source VM {outcome.source_status}, destination VM {outcome.destination_status}")
    for side in ("source", "destination"):
        rep = getattr(outcome, f"{side}_report") or {}
        print(f"{side} proxy: exit {getattr(outcome, f'{side}_exit')}, {rep.get('verdict')}")
    ok = q.status == "completed" and outcome.destination_status == "running"
    return 0 if ok and outcome.source_exit == 0 and outcome.destination_exit == 0 else 1


if __name__ == "__main__":
    sys.exit(trio.run(main))
