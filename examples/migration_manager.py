"""A small migration manager: live-migrate a QEMU guest between two firewalled hosts.

The two "hosts" are network namespaces of the lab's ``fw-fw`` preset: each drops every
inbound NEW connection, except the destination's control port.  There is no port QEMU
could migrate to directly, so the migration goes through ``holepunch-mig migrate-proxy``.
Each host has a key (``holepunch-mig keygen --out HOST.key`` prints its public line) and
pins the other's, so the control channel authenticates both proxies (``KEYS`` below is
``--identity HOST.key --peers PEER.pub``; a manager could hand out ``--psk-file`` instead):

1. destination: QEMU with ``-incoming defer``; QMP ``migrate-incoming unix:IN``;
   ``holepunch-mig migrate-proxy destination --connect-unix IN --control-listen 0.0.0.0:7070 KEYS``
2. source: ``holepunch-mig migrate-proxy source --listen-unix OUT --control DST:7070 KEYS``
   authenticates the control channel, punches a TCP link, authenticates it (Noise KK,
   bound to the control session) and prints ``ready unix:OUT``
3. source: QMP ``migrate unix:OUT``; poll ``query-migrate`` until it is over
4. check the destination VM is ``running`` and both proxies exited 0

Handoff mode (``--mode handoff``; one channel, no multifd) instead gives each proxy a
QMP monitor of its own (a second ``-qmp`` socket: QEMU serves one client per monitor
and looks ``getfd`` names up on the monitor that received them):

1. destination: QEMU with ``-incoming defer``, nothing else;
   ``migrate-proxy destination --mode handoff --qmp DST-PROXY.qmp --control-listen :7070 KEYS``
2. source: ``migrate-proxy source --mode handoff --qmp SRC-PROXY.qmp --control DST:7070 KEYS``
   punches and authenticates the link, hands the socket to both QEMUs with a TLS-PSK
   derived from the session, issues ``migrate fd:NAME`` and prints ``ready fd:NAME``
3. the manager watches ``query-migrate`` on its own monitor until it is over
4. as above

Run as root (namespaces), after ``make demo`` (which creates ``.venv``), from the
checkout: ``sudo .venv/bin/python examples/migration_manager.py`` (the venv's python has
the package and its dependencies; the system python has neither).
Options: ``--mem 512 --multifd 4 --mode handoff``.  The manager itself is
:func:`holepunch_mig.lab.qemu_lab.migrate_in_lab`, which the test suite runs too.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import trio

from holepunch_mig.lab import Lab, LabError, presets
from holepunch_mig.lab.qemu_lab import migrate_in_lab


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mem", type=int, default=512, help="guest RAM, MiB")
    ap.add_argument("--multifd", type=int, default=0, help="multifd channels (0: off)")
    ap.add_argument("--mode", choices=("mux", "handoff"), default="mux", help="proxy mode")
    args = ap.parse_args()
    try:
        with (
            tempfile.TemporaryDirectory(prefix="hpm-manager-") as tmp,
            Lab(presets()["fw-fw"]) as lab,
        ):
            outcome = await migrate_in_lab(
                lab,
                Path(tmp),
                mem_mib=args.mem,
                multifd=args.multifd,
                log=sys.stderr.buffer,
                mode=args.mode,
            )
    except LabError as exc:  # the proxies refused or the lab could not be built: one line
        print(f"migration_manager: {exc}", file=sys.stderr)
        return 1
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
