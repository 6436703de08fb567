"""``holepunch-mig lab ...`` and ``holepunch-mig doctor``.

lab up      build a lab from a spec file or a preset and leave it running (detached)
lab exec    run a program inside one of its hosts (exit code passed through)
lab down    remove it (by name; without one only when a single lab is up; --all)
lab list    the labs this machine has
lab matrix  every preset x RTT with the real CLI, against expected outcomes
doctor      this host's NAT mapping and whether a direct link is likely
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from holepunch_mig.cli.common import (
    EXIT_FAILED,
    EXIT_NOT_FOUND,
    EXIT_OK,
    EXIT_USAGE,
    named_endpoint,
    write_chart,
)
from holepunch_mig.lab import (
    CONTROL_PORT,
    Lab,
    LabError,
    LabSpec,
    load_spec,
    presets,
    spec_to_dict,
)
from holepunch_mig.lab.libvirt_hosts import (
    LIBVIRT_TCP_PORT,
    LibvirtHost,
    attached_hosts,
    start_detached,
    stop_detached,
)
from holepunch_mig.report import write_file_atomically


def _err(text: str) -> None:
    sys.stderr.write(f"holepunch-mig lab: {text}\n")
    sys.stderr.flush()


def _linux_only(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """For the commands that only read (``lab list``): no root needed."""

    def wrapper(args: argparse.Namespace) -> int:
        if sys.platform != "linux":
            _err("the lab needs Linux network namespaces")
            return EXIT_FAILED
        try:
            return fn(args)
        except LabError as exc:
            _err(str(exc))
            return EXIT_FAILED

    return wrapper


def _root_only(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    def wrapper(args: argparse.Namespace) -> int:
        if sys.platform != "linux":
            _err("the lab needs Linux network namespaces")
            return EXIT_FAILED
        if os.geteuid() != 0:
            _err("needs root (it creates network namespaces and nftables rules); run it as root")
            return EXIT_FAILED
        try:
            return fn(args)
        except LabError as exc:
            _err(str(exc))
            return EXIT_FAILED

    return wrapper


# --------------------------------------------------------------------------- lab up


def _lab_info(lab: Lab) -> dict[str, Any]:
    hosts = [
        {
            "name": h.name,
            "role": h.role,
            "side": h.side,
            "netns": h.netns,
            "address": h.address,
            "public_address": h.public_address,
            "wan_address": h.wan_address,
        }
        for h in lab.hosts.values()
    ]
    control = None
    if CONTROL_PORT in lab.spec.right.allow_inbound_tcp or (
        lab.spec.right.nat == "none" and lab.spec.right.firewall == "open"
    ):
        control = "{}:{}".format(*lab.control_endpoint("right", CONTROL_PORT))
    # every port a spec opens, on either side, and where it is reachable from outside
    reachable = [
        {"side": side, "port": port, "at": "{}:{}".format(*lab.control_endpoint(side, port))}
        for side, spec in (("left", lab.spec.left), ("right", lab.spec.right))
        for port in spec.allow_inbound_tcp
    ]
    return {
        "name": lab.spec.name,
        "run_id": lab.run_id,
        "spec": spec_to_dict(lab.spec),
        "hosts": hosts,
        "stun": [f"{h}:{p}" for h, p in lab.stun_endpoints()],
        "right_control": control,
        "reachable": reachable,
        "namespaces": lab.namespaces(),
    }


def _print_info(info: dict[str, Any]) -> None:
    spec = info["spec"]
    out = [
        f"lab {info['name']} is up (run {info['run_id']}): "
        f"left {spec['left']['firewall']}/{spec['left']['nat']}, "
        f"right {spec['right']['firewall']}/{spec['right']['nat']}, rtt {spec['rtt_ms']} ms",
        f"  {'host':13} {'role':7} {'address':13} {'public':15} namespace",
    ]
    for h in info["hosts"]:
        out.append(
            f"  {h['name']:13} {h['role']:7} {h['address']:13} {h['public_address']:15} "
            f"{h['netns']}"
        )
    if info["stun"]:
        out.append(f"  stun (TCP+UDP): {', '.join(info['stun'])}")
    for r in info["reachable"]:
        out.append(f"  {r['side']}'s port {r['port']} is reachable at {r['at']}")
    if info.get("libvirt"):
        out.append(
            f"  libvirt on left and right; left reaches right's at {info['libvirt']['right']}"
        )
    out += [
        f"run a program:  holepunch-mig lab exec --lab {info['name']} left -- CMD ...",
        f"tear it down:   holepunch-mig lab down {info['name']}",
    ]
    sys.stdout.write("\n".join(out) + "\n")


@_root_only
def cmd_up(args: argparse.Namespace) -> int:
    spec: LabSpec
    if args.spec:
        spec = load_spec(args.spec)
    else:
        cells = presets()
        if args.preset not in cells:
            _err(f"no preset {args.preset!r}; presets: {', '.join(cells)}")
            return EXIT_USAGE
        spec = cells[args.preset]
    from dataclasses import replace

    if args.name:
        spec = replace(spec, name=args.name)
    if args.rtt is not None:
        spec = replace(spec, rtt_ms=args.rtt)
    if args.stun:
        spec = replace(spec, stun=True)
    if args.libvirt and LIBVIRT_TCP_PORT not in spec.right.allow_inbound_tcp:
        ports = (*spec.right.allow_inbound_tcp, LIBVIRT_TCP_PORT)
        spec = replace(spec, right=replace(spec.right, allow_inbound_tcp=ports))
    Lab.cleanup_stale()
    if any(st.get("detached") and st.get("name") == spec.name for st in Lab.list_labs()):
        _err(f"a lab named {spec.name!r} is already up: `holepunch-mig lab down {spec.name}` first")
        return EXIT_FAILED
    lab = Lab(spec, detached=True).build()
    if args.libvirt:
        try:
            start_detached(lab)
        except BaseException:
            lab.teardown()
            raise
    info = _lab_info(lab)
    if args.libvirt:
        info["libvirt"] = {
            "left": "qemu:///system (inside: holepunch-mig lab exec left -- virsh ...)",
            "right": LibvirtHost(lab, "right").tcp_uri(),
        }
    if args.json:
        sys.stdout.write(json.dumps(info, indent=2) + "\n")
    else:
        _print_info(info)
    return EXIT_OK


# --------------------------------------------------------------------------- exec/down/list


@_root_only
def cmd_exec(args: argparse.Namespace) -> int:
    argv = list(args.cmd)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        _err("nothing to run: holepunch-mig lab exec HOST -- CMD ...")
        return EXIT_USAGE
    if args.lab is None and (several := _several_labs()):
        _err(f"several labs are up ({several}): name one with --lab NAME")
        return EXIT_USAGE
    lab = Lab.attach(args.lab)
    netns = lab.netns(args.host)
    # the namespace shares this filesystem: a program missing here is missing there, and
    # is "command not found" (127, as a shell says), not ip's own exit 1
    if shutil.which(argv[0]) is None:
        _err(f"{argv[0]}: command not found")
        return EXIT_NOT_FOUND
    libvirt = attached_hosts(lab).get(args.host)
    sys.stdout.flush()
    sys.stderr.flush()
    if libvirt is not None:  # its network and its private mount namespace
        os.execvp("nsenter", libvirt.argv(argv))
    os.execvp("ip", ["ip", "netns", "exec", netns, *argv])
    return EXIT_FAILED  # not reached


def _several_labs() -> str | None:
    """The names of the detached labs when more than one is up, else None: without a name
    a command never guesses between them (the newest may be another user's or test's)."""
    up = [st for st in Lab.list_labs() if st.get("detached")]
    return ", ".join(str(st.get("name")) for st in up) if len(up) > 1 else None


@_root_only
def cmd_down(args: argparse.Namespace) -> int:
    if args.all:
        labs = [st for st in Lab.list_labs() if st.get("detached")]
        names = [str(st["run_id"]) for st in labs]
        if not names:
            sys.stdout.write("no detached labs\n")
        failed = 0
        for run_id, st in zip(names, labs, strict=True):
            try:
                attached = Lab.attach(run_id)
                stop_detached(attached)
                attached.teardown()
                sys.stdout.write(f"lab {st.get('name')} ({run_id}) removed\n")
            except LabError as exc:
                _err(str(exc))
                failed += 1
        removed = Lab.cleanup_stale()
        if removed:
            sys.stdout.write(f"also removed {len(removed)} stale namespace(s)\n")
        return EXIT_FAILED if failed else EXIT_OK
    if args.name is None and (several := _several_labs()):
        _err(f"several labs are up ({several}): name the one to remove, or --all")
        return EXIT_USAGE
    lab = Lab.attach(args.name)
    stop_detached(lab)
    lab.teardown()
    sys.stdout.write(f"lab {lab.spec.name} ({lab.run_id}) removed\n")
    return EXIT_OK


@_linux_only
def cmd_list(args: argparse.Namespace) -> int:
    labs = Lab.list_labs()
    if args.json:
        sys.stdout.write(json.dumps(labs, indent=2) + "\n")
        return EXIT_OK
    if not labs:
        sys.stdout.write("no labs\n")
        return EXIT_OK
    now = time.time()
    sys.stdout.write(f"{'name':20} {'status':9} {'run':14} {'age':>8}  sides\n")
    for st in labs:
        spec = st.get("spec") or {}
        left, right = spec.get("left") or {}, spec.get("right") or {}
        sides = (
            f"left {left.get('firewall')}/{left.get('nat')}, "
            f"right {right.get('firewall')}/{right.get('nat')}, rtt {spec.get('rtt_ms', 0)} ms"
        )
        age = now - float(st.get("created") or now)
        sys.stdout.write(
            f"{st.get('name')!s:20} {st['status']:9} {st['run_id']!s:14} {age:7.0f}s  {sides}\n"
        )
    return EXIT_OK


# --------------------------------------------------------------------------- matrix


@_root_only
def cmd_matrix(args: argparse.Namespace) -> int:
    from holepunch_mig.lab import heatmap, matrix

    rtts = [int(r) for part in (args.rtt or ["0"]) for r in part.split(",") if r.strip()]
    losses = [float(x) for part in (args.loss or ["0"]) for x in part.split(",") if x.strip()]
    runs = 1 if args.quick and args.runs is None else (args.runs or 5)
    rounds = args.rounds if args.rounds is not None else (1 if args.quick else 3)
    names = [n.strip() for n in args.presets.split(",")] if args.presets else None
    Lab.cleanup_stale()

    def progress(cell: matrix.Cell) -> None:
        if not args.quiet:
            sys.stderr.write(matrix.cell_line(cell) + "\n")
            sys.stderr.flush()

    # each cell once: on stderr as it finishes, or (--quiet) on stdout at the end

    result = matrix.run_matrix(
        names,
        rtts=rtts,
        runs=runs,
        rounds=rounds,
        birthday_floor=args.rounds is None,
        payload_bytes=int(args.payload_mib * (1 << 20)),
        jobs=args.jobs,
        progress=progress,
        losses=losses,
    )
    if args.json:
        write_file_atomically(args.json, json.dumps(result.to_dict(), indent=2) + "\n")
    if args.markdown:
        write_file_atomically(args.markdown, matrix.to_markdown(result) + "\n")
    if args.png:
        write_chart(Path(args.png), lambda: heatmap.render(result), "holepunch-mig lab matrix")
    if args.quiet:
        sys.stdout.write("\n".join(matrix.cell_line(c) for c in result.cells) + "\n")
    bad = [c for c in result.cells if not c.matches]
    known = [c.preset for c in bad if c.known_issue]
    sys.stdout.write(
        f"{len(result.cells) - len(bad)}/{len(result.cells)} cells as expected "
        f"in {result.seconds:.0f} s"
        + (f" (known issues: {', '.join(known)})" if known else "")
        + "\n"
    )
    return EXIT_OK if not bad else EXIT_FAILED


# --------------------------------------------------------------------------- doctor


def cmd_doctor(args: argparse.Namespace) -> int:
    from holepunch_mig.lab import doctor

    return doctor.run(args)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    lab = sub.add_parser(
        "lab",
        help="firewall/NAT traversal labs in network namespaces (root)",
        description="Build, use and remove traversal labs; run the traversal matrix.",
    )
    lsub = lab.add_subparsers(dest="lab_command", required=True)

    up = lsub.add_parser("up", help="build a lab and leave it running")
    src = up.add_mutually_exclusive_group(required=True)
    src.add_argument("--spec", metavar="FILE", help="lab spec file (.toml or .json)")
    src.add_argument("--preset", metavar="NAME", help=f"preset: {', '.join(presets())}")
    up.add_argument("--name", help="lab name (default: the spec's name or the preset's)")
    up.add_argument("--rtt", type=int, metavar="MS", help="override the spec's rtt_ms")
    up.add_argument("--stun", action="store_true", help="run STUN even if the spec does not")
    up.add_argument("--json", action="store_true", help="print the addresses as JSON")
    up.add_argument(
        "--libvirt",
        action="store_true",
        help="run virtlogd + libvirtd on left and right, each in a private mount namespace "
        f"(lab exec enters it); right's libvirtd (TCP {LIBVIRT_TCP_PORT}, no auth: a lab) "
        "is let in",
    )
    up.set_defaults(run=cmd_up)

    ex = lsub.add_parser("exec", help="run CMD inside a lab host: lab exec HOST -- CMD ...")
    ex.add_argument("--lab", metavar="NAME", help="which lab (default: the only one up)")
    ex.add_argument("host", help="left, right, public, stun, left-router, right-cgn, ...")
    ex.add_argument("cmd", nargs=argparse.REMAINDER, help="-- program and arguments")
    ex.set_defaults(run=cmd_exec)

    down = lsub.add_parser("down", help="remove a lab (by name; no name: the only one up)")
    down.add_argument("name", nargs="?", help="lab name or run id")
    down.add_argument("--all", action="store_true", help="every detached lab, and stale ones")
    down.set_defaults(run=cmd_down)

    ls = lsub.add_parser("list", help="list labs")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(run=cmd_list)

    mx = lsub.add_parser("matrix", help="run every preset with the real CLI")
    mx.add_argument("--quick", action="store_true", help="every cell once (CI)")
    mx.add_argument("--rtt", action="append", metavar="MS[,MS...]", help="RTT(s) in ms (default 0)")
    mx.add_argument(
        "--loss",
        action="append",
        metavar="PCT[,PCT...]",
        help="random inbound loss on both sides, in percent: one column per value (default 0)",
    )
    mx.add_argument("--runs", type=int, default=None, help="runs per cell (default 5; quick 1)")
    mx.add_argument("--presets", metavar="A,B,...", help="only these presets")
    mx.add_argument(
        "--rounds",
        type=int,
        default=None,
        help=(
            "send/recv --rounds (default 3, the CLI's default; --quick: 1, and 2 for a cell "
            "that only birthday punching can cross, so it keeps both birthday rounds)"
        ),
    )
    mx.add_argument("--payload-mib", type=float, default=4.0, help="payload size (default 4)")
    mx.add_argument("--jobs", type=int, default=1, help="cells at a time (default 1)")
    mx.add_argument("--json", metavar="PATH")
    mx.add_argument("--markdown", metavar="PATH")
    mx.add_argument("--png", metavar="PATH", help="heat map")
    mx.add_argument("-q", "--quiet", action="store_true", help="no per-cell lines on stderr")
    mx.set_defaults(run=cmd_matrix)

    doc = sub.add_parser(
        "doctor",
        help="classify this host's NAT with STUN and say if a direct link is likely",
        description="Exit code: 0 direct link likely, 3 unlikely, 1 cannot tell, 2 usage.",
    )
    doc.add_argument(
        "--stun",
        type=named_endpoint,
        action="append",
        default=[],
        metavar="HOST:PORT",
        help="STUN server (TCP); give two, on different addresses",
    )
    doc.add_argument("--port", type=int, default=0, help="local port to probe from (default: any)")
    doc.add_argument("--timeout", type=float, default=3.0, help="per-server timeout (s)")
    doc.add_argument("--json", action="store_true")
    doc.set_defaults(run=cmd_doctor)
