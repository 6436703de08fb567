"""Pytest helpers for tests that need the traversal lab (network namespaces, as root).

Use from a test module (tests/ is on sys.path under pytest's default import mode)::

    import pytest
    from testsupport.lab import require_netns, run_python  # plain helpers

    # the `lab` and `lab_factory` fixtures come from tests/conftest.py

    @pytest.mark.netns
    @pytest.mark.parametrize("lab", ["fw-fw", "nat-nat"], indirect=True)
    def test_send_recv(lab):
        recv = lab.popen("right", ["holepunch-mig", "recv", ...])
        ...

    @pytest.mark.netns
    def test_custom(lab_factory):
        lab = lab_factory(LabSpec(left=SideSpec(nat="double"), right=SideSpec(), stun=True))

`require_netns()` skips the test when the lab cannot run here (not root, no `ip netns`,
no nft), but FAILS it when the environment variable CI is "true": a CI job that silently
skipped every traversal test would prove nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from holepunch_mig.lab import CONTROL_PORT, NS_PREFIX, Lab, LabError, LabSpec, presets
from holepunch_mig.net.keyfiles import pinned_pair

__all__ = [
    "CLI",
    "cli_env",
    "lab",
    "lab_factory",
    "netns_unavailable",
    "require_netns",
    "run_cli",
    "run_python",
]

#: The real CLI, this interpreter (``python -m holepunch_mig.cli``).
CLI = [sys.executable, "-m", "holepunch_mig.cli"]

_probe_result: str | None = None
_probed = False
_stale_cleaned = False


def netns_unavailable() -> str | None:
    """Why the lab cannot run on this machine, or None if it can (probed once)."""
    global _probe_result, _probed
    if _probed:
        return _probe_result
    _probed = True
    _probe_result = _probe()
    return _probe_result


def _probe() -> str | None:
    if sys.platform != "linux":
        return "lab needs Linux network namespaces"
    if os.geteuid() != 0:
        return "lab needs root (network namespaces); run as root"
    for tool in ("ip", "nft", "sysctl"):
        if shutil.which(tool) is None:
            return f"lab needs {tool!r} on PATH"
    # Name matches the lab's pattern, so Lab.cleanup_stale() removes it if we die here.
    name = f"{NS_PREFIX}{os.getpid()}-{secrets.token_hex(3)}-probe"
    try:
        add = subprocess.run(
            ["ip", "netns", "add", name], capture_output=True, text=True, timeout=10
        )
        if add.returncode != 0:
            return f"`ip netns add` does not work here: {add.stderr.strip()}"
        nft = subprocess.run(
            ["ip", "netns", "exec", name, "nft", "list", "ruleset"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        if nft.returncode != 0:
            return f"nft does not work in a namespace: {nft.stderr.strip()}"
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"`ip netns` unusable: {exc}"
    finally:
        subprocess.run(["ip", "netns", "delete", name], capture_output=True, timeout=10)
    return None


def require_netns(need: Sequence[str] = ()) -> None:
    """Skip (or, under CI=true, fail) unless the lab can run; `need` lists extra tools
    (e.g. "turnserver") that must be on PATH.  Also removes leftovers of killed runs
    once per process."""
    global _stale_cleaned
    reason = netns_unavailable()
    if reason is None:
        missing = [tool for tool in need if shutil.which(tool) is None]
        if missing:
            reason = f"lab needs {', '.join(missing)} on PATH"
    if reason is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but the netns lab cannot run: {reason}", pytrace=False)
        pytest.skip(reason)
    if not _stale_cleaned:
        _stale_cleaned = True
        Lab.cleanup_stale()


def _as_spec(spec: LabSpec | str) -> LabSpec:
    if isinstance(spec, LabSpec):
        return spec
    cells = presets()
    if spec not in cells:
        raise LabError(f"no preset {spec!r}; presets: {', '.join(sorted(cells))}")
    return cells[spec]


@pytest.fixture
def lab_factory() -> Iterator[Callable[[LabSpec | str], Lab]]:
    """A function building labs (from a LabSpec or a preset name) that are all torn down
    when the test ends, whatever happens."""
    built: list[Lab] = []

    def make(spec: LabSpec | str) -> Lab:
        resolved = _as_spec(spec)
        need = ["turnserver"] if resolved.stun else []
        if resolved.left.port_mapping or resolved.right.port_mapping:
            need.append("miniupnpd")
        require_netns(need=need)
        lab = Lab(resolved)
        built.append(lab)
        return lab.build()

    try:
        yield make
    finally:
        errors = []
        for lab in reversed(built):
            try:
                lab.teardown()
            except LabError as exc:
                errors.append(str(exc))
        if errors:
            raise LabError("; ".join(errors))


@pytest.fixture
def lab(request: pytest.FixtureRequest, lab_factory: Callable[[LabSpec | str], Lab]) -> Lab:
    """A built lab; parametrize indirectly with a preset name or a LabSpec (default:
    "fw-fw")."""
    param: Any = getattr(request, "param", "fw-fw")
    return lab_factory(param)


def run_python(
    lab: Lab, host: str, code: str, *args: str, timeout: float = 10.0, **kw: Any
) -> subprocess.CompletedProcess[bytes]:
    """Run `python -c code args...` (this interpreter, this sys.path) inside `host`'s
    namespace and capture its output; raise AssertionError with the output if it fails."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    proc: subprocess.CompletedProcess[bytes] = lab.run(
        host,
        [sys.executable, "-c", code, *args],
        timeout=timeout,
        capture_output=True,
        env=env,
        **kw,
    )
    if proc.returncode != 0:
        raise AssertionError(
            f"python in {host} exited {proc.returncode}:\n"
            f"{proc.stdout.decode(errors='replace')}{proc.stderr.decode(errors='replace')}"
        )
    return proc


def cli_env() -> dict[str, str]:
    """os.environ with PYTHONPATH = this sys.path (so children import this checkout)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    return env


def run_cli(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run ``holepunch-mig ARGS`` (in the root namespace) and capture its text output."""
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, timeout=timeout, env=cli_env()
    )


def cli_transfer(
    lab: Lab,
    tmp: Path,
    *,
    send_extra: Sequence[str] = (),
    recv_extra: Sequence[str] = (),
) -> tuple[int, int, dict[str, Any], dict[str, Any], Path, str]:
    """One 1 MiB transfer left -> right with the real CLI (pinned keys, both STUN
    addresses, one round): (send exit, recv exit, send report, recv report, output path,
    "sha256 of the input\\nstderr of both")."""
    data = os.urandom(1 << 20)
    payload = tmp / "in.bin"
    payload.write_bytes(data)
    out, rrep, srep = tmp / "out.bin", tmp / "recv.json", tmp / "send.json"
    stun = [a for h, p in lab.stun_endpoints() for a in ("--stun", f"{h}:{p}")]
    keys = pinned_pair(tmp)
    common = ["-q", "--rounds", "1", *stun]
    recv = lab.popen(
        "right",
        [*CLI, "recv", "--control-listen", f"0.0.0.0:{CONTROL_PORT}", "--output", str(out),
         "--report", str(rrep), *common, *keys.destination, *recv_extra],
        stderr=subprocess.PIPE,
    )  # fmt: skip
    lab.wait_listening("right", CONTROL_PORT, timeout=15.0)
    host, port = lab.control_endpoint("right", CONTROL_PORT)
    send = lab.popen(
        "left",
        [*CLI, "send", "--control", f"{host}:{port}", "--input", str(payload),
         "--report", str(srep), *common, *keys.source, *send_extra],
        stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        _, send_err = send.communicate(timeout=60)
        _, recv_err = recv.communicate(timeout=30)
    finally:
        for proc in (send, recv):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    reports = json.loads(srep.read_text()), json.loads(rrep.read_text())
    errs = (send_err + recv_err).decode(errors="replace")
    return (
        send.returncode,
        recv.returncode,
        reports[0],
        reports[1],
        out,
        (hashlib.sha256(data).hexdigest() + "\n" + errs),
    )
