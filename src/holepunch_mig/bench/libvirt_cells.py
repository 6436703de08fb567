"""libvirt migration rows: the same domain migrated left -> right by libvirt itself in
the lab (two real libvirt daemons, fw-fw), interleaved, median of ``runs``, ratio to the
first row:

* ``direct`` — libvirt's native transport over plain TCP, into a migration port the
  destination's firewall opens (``tcp://RIGHT:49160``), unencrypted;
* ``tunnelled`` — ``VIR_MIGRATE_PEER2PEER | VIR_MIGRATE_TUNNELLED``: the migration
  inside the libvirt RPC connection (TCP 16509 here, unencrypted in the lab);
* ``tls`` — the native transport with ``VIR_MIGRATE_TLS``: QEMU's own TLS, with a CA
  and a host certificate made at run time (:mod:`~holepunch_mig.bench.tls_certs`);
* ``holepunch_mig`` — ``holepunch-mig migrate`` with ``migrate-proxy destination
  --libvirt``: UNIX sockets on both hosts joined by the punched, authenticated
  AES-GCM link; the destination opens no migration port.

Every row migrates memory only (``VIR_MIGRATE_UNSAFE``: the firmware-only guest never
touches its disk) of a guest whose RAM is random (a file mapped privately, see
:data:`~holepunch_mig.lab.libvirt_hosts.RAM_DIR`): zero pages would cost nothing.  The
wall time is libvirt's migrate call (for holepunch_mig without the punching before
it, which the report shows as time to link).  Each run checks the destination domain
runs and 1 MiB of its RAM equals the source file's.

    sudo holepunch-mig bench --libvirt --libvirt-mem 256 --libvirt-runs 3
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from holepunch_mig.bench.tls_certs import make_tls_dir
from holepunch_mig.errors import BenchError
from holepunch_mig.lab import CONTROL_PORT, Lab, LabSpec, presets
from holepunch_mig.lab.libvirt_hosts import (
    IMAGE_DIR,
    LIBVIRT_TCP_PORT,
    RAM_DIR,
    LibvirtHost,
    domain_xml,
    libvirt_hosts,
)
from holepunch_mig.net.keyfiles import pinned_pair

ROWS = ("direct", "tunnelled", "tls", "holepunch_mig")
#: QEMU's x509 directory for the native TLS row (inside the private /etc/libvirt).
TLS_DIR = "/etc/libvirt/qemu-tls"
#: The native transport's port (not the first of libvirt's range: NBD takes that one).
MIGRATION_PORT = 49160
_CHECK_OFFSET, _CHECK_SIZE = 16 << 20, 1 << 20


@dataclass
class LibvirtCell:
    row: str
    parallel: int
    mem_mib: int
    walls: list[float] = field(default_factory=list)
    median_wall: float = 0.0
    mb_per_s: float = 0.0
    ratio: float | None = None
    time_to_link: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def libvirt_possible() -> str | None:
    """None when the libvirt rows can run here (root, the daemons, QEMU, the binding),
    else why not (the performance page says it)."""
    if os.geteuid() != 0:
        return "not root (the libvirt lab needs network and mount namespaces)"
    tools = ("libvirtd", "virtlogd", "virsh", "nsenter", "unshare", "qemu-system-x86_64")
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        return f"{', '.join(missing)} not installed"
    try:
        import libvirt  # noqa: F401
    except ModuleNotFoundError:
        return "no libvirt Python binding (pip install 'holepunch_mig[libvirt]')"
    return None


def cell_from(data: LibvirtCell | dict[str, Any]) -> LibvirtCell:
    """A cell, from itself or from a ``--json`` result's dict."""
    return data if isinstance(data, LibvirtCell) else LibvirtCell(**data)


#: holepunch_mig's goal per parallel group: at most this times libvirt direct (plain TCP).
DIRECT_GOAL = 1.10


def libvirt_targets(cells: Sequence[LibvirtCell]) -> list[tuple[str, str, str]]:
    """(target, measured, verdict) per parallel group: holepunch_mig <= 1.10x direct
    (wall), and faster than tunnelled and native TLS when those rows ran."""
    out: list[tuple[str, str, str]] = []
    for par in sorted({c.parallel for c in cells}):
        group = {c.row: c for c in cells if c.parallel == par}
        hp = group.get("holepunch_mig")
        if hp is None or not hp.median_wall:
            continue
        label = f"parallel {par}" if par else "one stream"
        direct = group.get("direct")
        if direct is not None and direct.median_wall:
            q = hp.median_wall / direct.median_wall
            out.append(
                (
                    f"libvirt: holepunch_mig <= {DIRECT_GOAL:.2f}x libvirt direct (plain TCP), "
                    f"{label}",
                    f"{q:.2f}x ({hp.median_wall:.2f} vs {direct.median_wall:.2f} s)",
                    "met" if q <= DIRECT_GOAL else "**missed**",
                )
            )
        for row, title in (("tunnelled", "tunnelled (libvirt RPC)"), ("tls", "native TLS")):
            other = group.get(row)
            if other is None or not other.median_wall:
                continue
            out.append(
                (
                    f"libvirt: holepunch_mig faster than {title}, {label}",
                    f"{hp.median_wall:.2f} vs {other.median_wall:.2f} s",
                    "met" if hp.median_wall < other.median_wall else "**missed**",
                )
            )
    return out


def bench_spec() -> LabSpec:
    """fw-fw with the destination's libvirt RPC and native migration ports open."""
    spec = presets()["fw-fw"]
    ports = (CONTROL_PORT, LIBVIRT_TCP_PORT, 49152, MIGRATION_PORT)
    right = dataclasses.replace(spec.right, allow_inbound_tcp=ports)
    return dataclasses.replace(spec, right=right, name="libvirt-bench")


class _Bench:
    def __init__(self, lab: Lab, hosts: dict[str, LibvirtHost], work: Path, mem: int) -> None:
        import libvirt

        self.libvirt = libvirt
        self.lab = lab
        self.left, self.right = hosts["left"], hosts["right"]
        self.work = work
        self.mem = mem
        self.next_id = 1
        self.src = libvirt.open(self.left.local_uri)
        self.dst = libvirt.open(self.right.local_uri)
        libvirt.registerErrorHandler(lambda _ctx, _err: None, None)

    def start_domain(self, name: str) -> tuple[Any, bytes]:
        """A transient domain with random RAM; returns it and the bytes QEMU must show at
        the check offset."""
        disk = IMAGE_DIR / f"{name}.img"
        for host in (self.left, self.right):
            with open(host.path(disk), "wb") as fh:
                fh.truncate(1 << 20)
        expected_id = self.next_id
        ram_dir = self.left.path(RAM_DIR / f"{expected_id}-{name}")
        ram_dir.mkdir(parents=True)
        check = b""
        with open(ram_dir / "pc.ram", "wb") as fh:
            for i in range(self.mem):
                chunk = os.urandom(1 << 20)
                if i << 20 == _CHECK_OFFSET:
                    check = chunk[:_CHECK_SIZE]
                fh.write(chunk)
        dom = self.src.createXML(domain_xml(name, self.mem, disk, file_ram=True), 0)
        self.next_id += 1
        if dom.ID() != expected_id:
            dom.destroy()
            raise BenchError(f"domain {name} got id {dom.ID()}, its RAM file was for {expected_id}")
        return dom, check

    def verify(self, name: str, check: bytes) -> None:
        dom = self.dst.lookupByName(name)
        state, _ = dom.state()
        if state != self.libvirt.VIR_DOMAIN_RUNNING:
            raise BenchError(f"{name}: destination domain not running (state {state})")
        out = self.work / f"{name}.mem"
        cmd = json.dumps(
            {
                "execute": "pmemsave",
                "arguments": {"val": _CHECK_OFFSET, "size": _CHECK_SIZE, "filename": str(out)},
            }
        )
        res = self.right.run(["virsh", "-c", "qemu:///system", "qemu-monitor-command", name, cmd])
        if res.returncode != 0:
            raise BenchError(f"{name}: pmemsave failed: {res.stderr.strip()}")
        got = out.read_bytes()
        if got != check:
            same = sum(1 for a, b in zip(got, check, strict=False) if a == b)
            raise BenchError(
                f"{name}: destination RAM differs from the source's "
                f"({len(got)} bytes read, {same} equal)"
            )
        out.unlink()

    def cleanup(self, name: str) -> None:
        for host in (self.left, self.right):
            host.run(["virsh", "-c", "qemu:///system", "destroy", name], timeout=30)
            host.path(IMAGE_DIR / f"{name}.img").unlink(missing_ok=True)
        for path in self.left.path(RAM_DIR).glob(f"*-{name}"):
            for f in path.iterdir():
                f.unlink()
            path.rmdir()

    def run_libvirt(self, dom: Any, row: str, parallel: int) -> float:
        lv = self.libvirt
        flags = lv.VIR_MIGRATE_LIVE | lv.VIR_MIGRATE_UNSAFE
        params: dict[str, Any] = {}
        if parallel:
            flags |= lv.VIR_MIGRATE_PARALLEL
            params[lv.VIR_MIGRATE_PARAM_PARALLEL_CONNECTIONS] = parallel
        start = time.perf_counter()
        if row in ("direct", "tls"):
            params[lv.VIR_MIGRATE_PARAM_URI] = f"tcp://{self.right.address}:{MIGRATION_PORT}"
            if row == "tls":
                flags |= lv.VIR_MIGRATE_TLS
            dom.migrate3(self.dst, params, flags)
        else:
            flags |= lv.VIR_MIGRATE_PEER2PEER | lv.VIR_MIGRATE_TUNNELLED
            dom.migrateToURI3(self.right.tcp_uri(), params, flags)
        return time.perf_counter() - start

    def run_holepunch(self, name: str, parallel: int) -> tuple[float, float | None]:
        keys = pinned_pair(self.work)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        cli = [sys.executable, "-m", "holepunch_mig.cli"]
        report = self.work / "src.json"
        with open(self.work / "dst.log", "wb") as log:
            dst = self.right.popen(
                [*cli, "migrate-proxy", "destination", "--libvirt", "-q",
                 "--control-listen", f"0.0.0.0:{CONTROL_PORT}", *keys.destination],
                env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log,
            )  # fmt: skip
        try:
            self.lab.wait_listening("right", CONTROL_PORT, timeout=30, proc=dst)
            host, port = self.lab.control_endpoint("right", CONTROL_PORT)
            argv = [
                *cli, "migrate", name, self.right.tcp_uri(), "--control", f"{host}:{port}",
                "-q", "--unsafe", "--report", str(report), *keys.source,
                *(["--parallel", str(parallel)] if parallel else []),
            ]  # fmt: skip
            src = subprocess.run(
                self.left.argv(argv), env=env, capture_output=True, timeout=600,
                stdin=subprocess.DEVNULL,
            )  # fmt: skip
            if src.returncode != 0:
                raise BenchError(f"holepunch-mig migrate failed: {src.stderr.decode()[-2000:]}")
            dst.wait(timeout=60)
        finally:
            if dst.poll() is None:
                dst.kill()
                dst.wait()
        data = json.loads(report.read_text())
        link = (data.get("proxy") or {}).get("link") or {}
        return float(data["seconds"]), link.get("time_to_link")


def run_libvirt_cells(
    *,
    mem: int = 256,
    runs: int = 3,
    rows: Sequence[str] = ROWS,
    parallel: Sequence[int] = (0,),
    log: Callable[[str], None] = print,
) -> list[LibvirtCell]:
    """Build the lab, start both daemons, run every row ``runs`` times interleaved for
    each ``parallel`` setting (tunnelled only without: libvirt refuses it with parallel
    connections); return the cells with medians and ratios to the first row."""
    for row in rows:
        if row not in ROWS:
            raise BenchError(f"unknown libvirt row {row!r} ({', '.join(ROWS)})")
    cells: list[LibvirtCell] = []
    with (
        tempfile.TemporaryDirectory(prefix="hpm-libvirt-bench-") as tmp,
        Lab(bench_spec()) as lab,
        libvirt_hosts(lab, prepare=_tls_prepare(lab) if "tls" in rows else None) as hosts,
    ):
        bench = _Bench(lab, hosts, Path(tmp), mem)
        # one unmeasured migration first: the daemons' first domain start is slower
        dom, check = bench.start_domain("warmup")
        try:
            bench.run_libvirt(dom, "direct", 0)
            bench.verify("warmup", check)
        finally:
            bench.cleanup("warmup")
        for par in parallel:
            group = [LibvirtCell(r, par, mem) for r in rows if not (r == "tunnelled" and par)]
            for i in range(runs):
                for cell in group:
                    name = f"b{par}-{cell.row[:4]}-{i}"
                    dom, check = bench.start_domain(name)
                    try:
                        if cell.row == "holepunch_mig":
                            wall, ttl = bench.run_holepunch(name, par)
                            if ttl is not None:
                                cell.time_to_link.append(ttl)
                        else:
                            wall = bench.run_libvirt(dom, cell.row, par)
                        bench.verify(name, check)
                    finally:
                        bench.cleanup(name)
                    cell.walls.append(wall)
                    log(f"libvirt {cell.row} parallel={par} run {i + 1}/{runs}: {wall:.3f} s")
            for cell in group:
                cell.median_wall = statistics.median(cell.walls)
                cell.mb_per_s = mem * 2**20 / cell.median_wall / 1e6
            for cell in group:
                cell.ratio = cell.median_wall / group[0].median_wall
            cells += group
    return cells


def _tls_prepare(lab: Lab) -> Callable[[LibvirtHost], str]:
    """Certificates for both hosts (one CA, made now) and the qemu.conf line for them."""
    with tempfile.TemporaryDirectory() as tmp:
        make_tls_dir(Path(tmp), [lab.address("left"), lab.address("right")])
        files = {p.name: p.read_bytes() for p in Path(tmp).iterdir()}

    def prepare(host: LibvirtHost) -> str:
        d = host.path(TLS_DIR)
        d.mkdir(parents=True)
        for name, data in files.items():
            (d / name).write_bytes(data)
            if name.endswith("-key.pem"):
                os.chmod(d / name, 0o600)
        return f'migrate_tls_x509_cert_dir = "{TLS_DIR}"\n'

    return prepare


def render_libvirt_table(cells: Sequence[LibvirtCell]) -> str:
    """A Markdown table of the cells (ratio to the first row of each parallel group)."""
    lines = [
        "| row | parallel | guest RAM | median s | MB/s | ratio |",
        "|---|---|---|---|---|---|",
    ]
    for c in cells:
        ratio = f"{c.ratio:.2f}x" if c.ratio is not None else "-"
        lines.append(
            f"| {c.row} | {c.parallel} | {c.mem_mib} MiB | {c.median_wall:.3f} | "
            f"{c.mb_per_s:.0f} | {ratio} |"
        )
    return "\n".join(lines)
