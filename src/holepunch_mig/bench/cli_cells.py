"""Row 6: the real command, ``holepunch-mig send --input FILE`` -> ``recv --output FILE``.

Rows 5a-5c drive the session library in-process with a generated payload; this row runs
what a user runs, two processes in the lab's two hosts with their defaults (BLAKE3 both
ends, resume on, the output fsynced and renamed into place before ``ok``), a file on
tmpfs in, a file on tmpfs out, so the page cache and not a disk is what the files cost.
Rate and CPU come from the sender's report: ``seconds`` from its first record to the
destination's verdict (commit included; the punch before it is ``time_to_link``), and
``cpu_seconds`` on each side over its transfer.  Checked after every run, untimed: both
processes exited 0, both reports ``ok`` on the direct path, both reports' digest is the
payload's, and the output file's chunk stamps and size are right.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from holepunch_mig.bench.model import GIB, BenchConfig, Sample
from holepunch_mig.bench.payload import CHUNK, CheckingSink, PatternSource
from holepunch_mig.errors import BenchError
from holepunch_mig.lab.spec import CONTROL_PORT
from holepunch_mig.lab.topology import Lab
from holepunch_mig.net.keyfiles import pinned_pair

CLI = [sys.executable, "-m", "holepunch_mig.cli"]
#: Where the payload files go: tmpfs, so a disk's speed is not part of the row.
TMPFS = Path("/dev/shm")


@contextlib.contextmanager
def warm_pages(nbytes: int) -> Iterator[None]:
    """Touch ``nbytes`` of fresh memory, hold it, and free it on exit, just before a file
    row's transfer, so the page cache its output fills takes pages the hypervisor backs.
    This VM reports freed pages to its host (virtio-balloon free page reporting, 2 MiB
    blocks), and the first touch of a reported page is a host fault: writing a new 1 GiB
    tmpfs file took 2.8 s of system time cold and 0.4 s warm, so whichever file row ran
    after a pause paid for the hypervisor, not for its own work.  Reporting is quick:
    rewriting a 2 GiB tmpfs file cost 0.27 CPU s/GiB right after the last one was deleted
    and 0.8-1.1 s/GiB when 0.5-5 s had passed, so a transfer that outlasts half a second
    still writes part of its output into cold pages (row 6 more than its faster plain twin,
    1f; freeing the held memory block by block as the output grew did not change row 6's
    figures).  On a hypervisor host itself (bare metal) none of this costs anything."""
    page = 4096
    buf = bytearray(nbytes)  # calloc'd by mmap: nothing touched yet
    buf[::page] = b"\x01" * len(range(0, nbytes, page))
    try:
        yield
    finally:
        del buf


def page_write_cost(nbytes: int, rate_mbps: float | None, folder: Path = TMPFS) -> float:
    """CPU seconds per GiB of writing a new ``nbytes`` file in ``folder`` in 1 MiB writes
    right after :func:`warm_pages` (as the file rows write their output), at full speed
    (None) or paced at ``rate_mbps``: on this VM the cost of a page-cache page depends on
    how long ago it was freed, so a slower writer pays more per byte (see warm_pages)."""
    chunk = memoryview(os.urandom(CHUNK))
    fd, name = tempfile.mkstemp(prefix="page-cost-", dir=folder)
    try:
        with warm_pages(nbytes):
            pass
        done, t0, c0 = 0, time.monotonic(), time.thread_time()
        while done < nbytes:
            done += os.write(fd, chunk[: min(CHUNK, nbytes - done)])
            if rate_mbps:
                ahead = done / (rate_mbps * 1e6) - (time.monotonic() - t0)
                if ahead > 0:
                    time.sleep(ahead)  # a benchmark probe's pacing, not a wait on the network
        return (time.thread_time() - c0) / (nbytes / GIB)
    finally:
        os.close(fd)
        os.unlink(name)


def page_write_costs(rate_mbps: float, nbytes: int = GIB, runs: int = 2) -> dict[str, float]:
    """:func:`page_write_cost` at full speed and at ``rate_mbps`` (row 6's measured rate),
    alternated ``runs`` times; medians.  Keys: ``full_s_per_gib``, ``paced_s_per_gib``,
    ``paced_MBps``."""
    full, paced = [], []
    for _ in range(runs):
        full.append(page_write_cost(nbytes, None))
        paced.append(page_write_cost(nbytes, rate_mbps))
    return {
        "full_s_per_gib": statistics.median(full),
        "paced_s_per_gib": statistics.median(paced),
        "paced_MBps": rate_mbps,
    }


def write_payload_file(cfg: BenchConfig, *, prefix: str, folder: Path = TMPFS) -> Path:
    """The run's payload (PatternSource) as a new file in ``folder`` (tmpfs by default);
    the caller removes it."""
    if not folder.is_dir():
        raise BenchError(f"{folder} (tmpfs) is missing: the file rows need it")
    fd, name = tempfile.mkstemp(prefix=prefix, dir=folder)
    src = PatternSource(cfg.total, cfg.seed)
    buf = memoryview(bytearray(CHUNK))
    with os.fdopen(fd, "wb") as fh:
        while n := src.readinto(buf):
            fh.write(buf[:n])
    return Path(name)


def _check_output(path: Path, cfg: BenchConfig) -> None:
    size = path.stat().st_size if path.exists() else -1
    if size != cfg.total:
        raise BenchError(f"cli: output holds {size} bytes, want {cfg.total}")
    sink = CheckingSink(cfg.seed)
    buf = memoryview(bytearray(CHUNK))
    with open(path, "rb") as fh:
        while n := fh.readinto(buf):
            sink.write(buf[:n])
    if sink.bad:
        raise BenchError(f"cli: output file: {sink.bad}")


def _report(path: Path, role: str, proc: subprocess.Popen[bytes], log: Path) -> dict[str, Any]:
    code = proc.returncode
    tail = log.read_text(errors="replace")[-600:] if log.exists() else ""
    if code != 0:
        raise BenchError(f"cli: {role} exited {code}: {tail}")
    try:
        rep: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise BenchError(f"cli: {role} report unreadable ({exc}): {tail}") from None
    if rep.get("ok") is not True or rep.get("path") != "direct":
        raise BenchError(f"cli: {role} report: ok={rep.get('ok')} path={rep.get('path')}")
    return rep


def run_cli_lab(lab: Lab, cfg: BenchConfig, expected: str | None) -> Sample:
    """One ``send`` -> ``recv`` of ``cfg.total`` bytes, left host to right host."""
    if expected is None:
        raise BenchError("cli: the payload's BLAKE3 is needed to check the reports")
    if not TMPFS.is_dir():
        raise BenchError(f"cli: {TMPFS} (tmpfs) is missing")
    work = Path(tempfile.mkdtemp(prefix="hpm-bench-cli-", dir=TMPFS))
    try:
        return _run(lab, work, cfg, expected)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run(lab: Lab, work: Path, cfg: BenchConfig, expected: str) -> Sample:
    src, out = write_payload_file(cfg, prefix="in-", folder=work), work / "out.bin"
    reports = {"send": work / "send.json", "recv": work / "recv.json"}
    logs = {"send": work / "send.log", "recv": work / "recv.log"}
    keys = pinned_pair(work)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    recv_cmd = [
        *CLI, "recv", "--control-listen", f"0.0.0.0:{CONTROL_PORT}", "--output", str(out),
        "--report", str(reports["recv"]), "-q", *keys.destination,
    ]  # fmt: skip
    host, port = lab.control_endpoint("right", CONTROL_PORT)
    send_cmd = [
        *CLI, "send", "--control", f"{host}:{port}", "--input", str(src),
        "--report", str(reports["send"]), "-q", *keys.source,
    ]  # fmt: skip
    procs: dict[str, subprocess.Popen[bytes]] = {}
    with open(logs["recv"], "wb") as rlog, open(logs["send"], "wb") as slog:
        try:
            # the output file's pages, freed as the sender starts (see warm_pages)
            with warm_pages(cfg.total):
                procs["recv"] = lab.popen(
                    "right", recv_cmd, stdout=subprocess.DEVNULL, stderr=rlog, env=env
                )
                lab.wait_listening("right", CONTROL_PORT, timeout=30.0, proc=procs["recv"])
                procs["send"] = lab.popen(
                    "left", send_cmd, stdout=subprocess.DEVNULL, stderr=slog, env=env
                )
            deadline = time.monotonic() + cfg.timeout
            for proc in (procs["send"], procs["recv"]):
                proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            raise BenchError(f"cli: no result within {cfg.timeout:.0f} s") from None
        finally:
            for proc in procs.values():
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(timeout=10.0)
    send = _report(reports["send"], "send", procs["send"], logs["send"])
    recv = _report(reports["recv"], "recv", procs["recv"], logs["recv"])
    for role, rep in (("send", send), ("recv", recv)):
        if rep.get("bytes") != cfg.total or rep.get("sha256") != expected:
            raise BenchError(
                f"cli: {role} report says {rep.get('bytes')} bytes, {rep.get('digest')} "
                f"{rep.get('sha256')}; want {cfg.total} bytes, blake3 {expected}"
            )
    _check_output(out, cfg)
    wall = float(send["seconds"])
    if wall <= 0:
        raise BenchError(f"cli: non-positive transfer time {wall}")
    g = cfg.total / GIB
    scpu, rcpu = float(send["cpu_seconds"]), float(recv["cpu_seconds"])
    return Sample(
        mbps=cfg.total / wall / 1e6,
        wall=wall,
        send_cpu_per_gib=scpu / g,
        recv_cpu_per_gib=rcpu / g,
        send_calls_per_gib=0.0,
        recv_calls_per_gib=0.0,
        send_vcsw_per_gib=0.0,
        recv_vcsw_per_gib=0.0,
        send_ivcsw_per_gib=0.0,
        recv_ivcsw_per_gib=0.0,
        send_cpu=scpu,
        recv_cpu=rcpu,
        verified=(
            f"{cfg.total} bytes, blake3 both reports, output file chunk stamps, "
            f"path direct, resume {'on' if send.get('resume') else 'off'}"
        ),
        total=cfg.total,
        time_to_link=send.get("time_to_link"),
        extra={"cli": True},
    )
