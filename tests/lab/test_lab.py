"""The traversal lab itself behaves: firewalls really drop/reject, NATs really masquerade
(and preserve ports, or not), simultaneous open gets through where it should, STUN sees the
NAT's public address, and teardown / stale cleanup really remove everything."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from testsupport.lab import require_netns, run_python

from holepunch_mig.lab import (
    CONTROL_PORT,
    STATE_DIR,
    Lab,
    LabError,
    LabSpec,
    LabUnsupported,
    SideSpec,
    load_spec,
    presets,
    spec_from_dict,
    spec_to_dict,
)

Factory = Callable[[LabSpec | str], Lab]
NOT_ALLOWED = 7100  # a port nobody opened in any firewall


def netns_list() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return {line.split()[0] for line in out.stdout.splitlines() if line.strip()}


def listener(lab: Lab, host: str, port: int) -> socket.socket:
    s: socket.socket = lab.socket(host)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((lab.address(host), port))
    s.listen(8)
    s.settimeout(5.0)
    return s


def connect(
    lab: Lab, host: str, endpoint: tuple[str, int], timeout: float, bind_port: int = 0
) -> tuple[socket.socket | None, BaseException | None, float]:
    """Connect from `host` to `endpoint`: (socket, None, seconds) or (None, error, seconds)."""
    s = lab.socket(host)
    s.settimeout(timeout)
    if bind_port:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((lab.address(host), bind_port))
    start = time.monotonic()
    try:
        s.connect(endpoint)
    except OSError as exc:
        s.close()
        return None, exc, time.monotonic() - start
    return s, None, time.monotonic() - start


def free_port() -> int:
    return random.randint(20000, 60000)


# ------------------------------------------------------------------ no namespaces needed


def test_rtt_limits() -> None:
    Lab(LabSpec(left=SideSpec(), right=SideSpec(), rtt_ms=20))  # supported now
    with pytest.raises(LabUnsupported, match="at most"):
        Lab(LabSpec(left=SideSpec(), right=SideSpec(), rtt_ms=5000))
    with pytest.raises(LabError, match=">= 0"):
        Lab(LabSpec(left=SideSpec(), right=SideSpec(), rtt_ms=-1))
    assert issubclass(LabUnsupported, NotImplementedError)
    assert issubclass(LabUnsupported, LabError)


def test_spec_files_toml_and_json(tmp_path: Path) -> None:
    toml = tmp_path / "my lab.toml"
    toml.write_text(
        'rtt_ms = 20\nstun = true\n[left]\nnat = "double"\n'
        '[right]\nfirewall = "reject"\nallow_inbound_tcp = [7070]\n'
    )
    spec = load_spec(toml)
    assert spec == LabSpec(
        left=SideSpec(firewall="drop", nat="double"),
        right=SideSpec(firewall="reject", nat="none", allow_inbound_tcp=(7070,)),
        stun=True,
        rtt_ms=20,
        name="my-lab",
    )
    js = tmp_path / "x.json"
    js.write_text(json.dumps(spec_to_dict(spec)))
    assert load_spec(js) == spec
    for bad, match in [
        ({"left": {"nat": "cone"}}, "left.nat"),
        ({"right": {"firewal": "drop"}}, "unknown key"),
        ({"delay": 3}, "unknown spec key"),
        ({"rtt_ms": "20"}, "rtt_ms"),
        ({"left": {"allow_inbound_tcp": [70000]}}, "bad port"),
        ({"name": "a b"}, "name"),
    ]:
        with pytest.raises(LabError, match=match):
            spec_from_dict(bad)
    (tmp_path / "broken.toml").write_text("left = [")
    with pytest.raises(LabError, match="not valid toml"):
        load_spec(tmp_path / "broken.toml")
    with pytest.raises(LabError, match="cannot read"):
        load_spec(tmp_path / "missing.json")


def test_spec_validation() -> None:
    with pytest.raises(LabError, match="firewall"):
        Lab(LabSpec(left=SideSpec(firewall="bogus"), right=SideSpec()))  # type: ignore[arg-type,unused-ignore]
    with pytest.raises(LabError, match="bad port"):
        Lab(LabSpec(left=SideSpec(allow_inbound_tcp=(0,)), right=SideSpec()))


def test_needs_root_message(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(LabError, match="lab needs root"):
        Lab(presets()["fw-fw"]).build()


def test_addresses_are_known_before_build() -> None:
    lab_ = Lab(presets()["double-nat"])
    assert lab_.address("left") == "10.1.0.2"
    assert lab_.public_address("left") == "198.51.100.10"
    assert lab_.address("left-cgn") == "100.64.1.1"
    assert lab_.public_address("right") == "198.51.100.20"
    assert lab_.control_endpoint("right", CONTROL_PORT) == ("198.51.100.20", CONTROL_PORT)
    with pytest.raises(LabError, match="not in allow_inbound_tcp"):
        lab_.control_endpoint("left", CONTROL_PORT)
    assert lab_.stun_endpoint() == ("198.51.100.3", 3478)
    with pytest.raises(LabError, match="no host"):
        lab_.address("middle")


def test_require_netns_skips_locally_but_fails_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    from testsupport import lab as labfixtures

    monkeypatch.setattr(labfixtures, "_probed", True)
    monkeypatch.setattr(labfixtures, "_probe_result", "pretend: no namespaces here")
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="pretend"):
        require_netns()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true but the netns lab cannot run"):
        require_netns()


# ------------------------------------------------------------------ every preset builds


@pytest.mark.netns
@pytest.mark.parametrize("name", sorted(presets()))
def test_every_preset_builds_and_reaches_public(lab_factory: Factory, name: str) -> None:
    lab = lab_factory(name)
    expected = {"left", "right", "public"}
    for side in ("left", "right"):
        nat = getattr(lab.spec, side).nat
        if nat != "none":
            expected.add(f"{side}-router")
        if nat == "double":
            expected.add(f"{side}-cgn")
    if lab.spec.stun:
        expected.add("stun")
    assert set(lab.hosts) == expected
    assert all(ns in netns_list() for ns in lab.namespaces())
    # outbound always works, and the public host sees the side's public address
    srv = listener(lab, "public", 9000)
    for side in ("left", "right"):
        c, err, _ = connect(lab, side, (lab.address("public"), 9000), timeout=3.0)
        assert err is None, f"{name}: {side} -> public failed: {err}"
        conn, peer = srv.accept()
        assert peer[0] == lab.public_address(side)
        conn.close()
        assert c is not None
        c.close()
    srv.close()
    # the control port on the right is reachable from the left (firewall hole or DNAT)
    ctl = listener(lab, "right", CONTROL_PORT)
    c, err, _ = connect(lab, "left", lab.control_endpoint("right", CONTROL_PORT), timeout=3.0)
    assert err is None and c is not None, f"{name}: control port: {err}"
    conn, peer = ctl.accept()
    assert peer[0] == lab.public_address("left")
    for s in (conn, c, ctl):
        s.close()
    # loopback is up in every namespace
    for host in lab.hosts:
        lo = lab.socket(host)
        lo.bind(("127.0.0.1", 0))
        lo.listen(1)
        c, err, _ = connect(lab, host, lo.getsockname(), timeout=2.0)
        assert err is None and c is not None, f"{name}: loopback in {host}: {err}"
        c.close()
        lo.close()


# ------------------------------------------------------------------ (1) (2) firewalls


@pytest.mark.netns
@pytest.mark.parametrize("lab", ["fw-fw"], indirect=True)
def test_drop_firewall_drops_but_control_port_connects(lab: Lab) -> None:
    closed = listener(lab, "right", NOT_ALLOWED)
    ctl = listener(lab, "right", CONTROL_PORT)
    c, err, took = connect(lab, "left", (lab.public_address("right"), NOT_ALLOWED), timeout=1.5)
    assert isinstance(err, TimeoutError), f"expected a timeout (DROP), got {err!r}"
    assert took >= 1.4
    c, err, _ = connect(lab, "left", lab.control_endpoint("right", CONTROL_PORT), timeout=3.0)
    assert err is None and c is not None
    conn, peer = ctl.accept()
    assert peer[0] == lab.address("left")
    for s in (conn, c, ctl, closed):
        s.close()


@pytest.mark.netns
@pytest.mark.parametrize("lab", ["reject-reject"], indirect=True)
def test_reject_firewall_refuses_quickly(lab: Lab) -> None:
    closed = listener(lab, "right", NOT_ALLOWED)
    _, err, took = connect(lab, "left", (lab.public_address("right"), NOT_ALLOWED), timeout=3.0)
    assert isinstance(err, ConnectionRefusedError), repr(err)
    assert took < 1.0
    ctl = listener(lab, "right", CONTROL_PORT)
    c, err, _ = connect(lab, "left", lab.control_endpoint("right", CONTROL_PORT), timeout=3.0)
    assert err is None and c is not None
    for s in (c, ctl, closed):
        s.close()


@pytest.mark.netns
@pytest.mark.parametrize("lab", ["rst-rst"], indirect=True)
def test_rst_nat_answers_unsolicited_syn_with_reset(lab: Lab) -> None:
    srv = listener(lab, "right", NOT_ALLOWED)
    _, err, took = connect(lab, "left", (lab.public_address("right"), NOT_ALLOWED), timeout=3.0)
    assert isinstance(err, ConnectionRefusedError), repr(err)
    assert took < 1.0
    srv.close()


LISTENER = textwrap.dedent(
    """
    import socket, sys
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", int(sys.argv[1])))
    s.listen(1)
    conn, peer = s.accept()
    conn.sendall(("you are %s:%d" % peer).encode())
    conn.close()
    """
)


@pytest.mark.netns
@pytest.mark.parametrize("lab", ["double-double"], indirect=True)
def test_popen_listener_through_two_port_forwards(lab: Lab) -> None:
    """The pattern other tests use for `holepunch-mig recv`: start it with popen, wait
    until it listens (without connecting), connect through the control endpoint."""
    proc = lab.popen("right", [sys.executable, "-c", LISTENER, str(CONTROL_PORT)])
    lab.wait_listening("right", CONTROL_PORT, timeout=10.0, proc=proc)
    c, err, _ = connect(lab, "left", lab.control_endpoint("right", CONTROL_PORT), timeout=3.0)
    assert err is None and c is not None, repr(err)
    data = c.recv(100).decode()
    c.close()
    assert data.startswith(f"you are {lab.public_address('left')}:")
    assert proc.wait(timeout=5.0) == 0
    dead = lab.popen("right", [sys.executable, "-c", "raise SystemExit(3)"])
    with pytest.raises(LabError, match="exited with 3"):
        lab.wait_listening("right", 7999, timeout=10.0, proc=dead)


# ------------------------------------------------------------------ (3) (4) NAT


@pytest.mark.netns
@pytest.mark.parametrize("lab", ["nat-nat"], indirect=True)
def test_masquerade_preserves_port_and_forwards_control_port(lab: Lab) -> None:
    srv = listener(lab, "public", 9000)
    port = free_port()
    c, err, _ = connect(lab, "left", (lab.address("public"), 9000), timeout=3.0, bind_port=port)
    assert err is None and c is not None
    conn, peer = srv.accept()
    assert peer == (lab.public_address("left"), port) == ("198.51.100.10", port)
    assert c.getsockname() == (lab.address("left"), port) == ("10.1.0.2", port)
    conn.close()
    c.close()
    srv.close()
    # unsolicited inbound to the NAT's public address: dropped
    stray = listener(lab, "right", NOT_ALLOWED)
    _, err, _ = connect(lab, "left", (lab.public_address("right"), NOT_ALLOWED), timeout=1.0)
    assert isinstance(err, TimeoutError), repr(err)
    stray.close()
    # the control port is a DNAT port-forward on the right router
    ctl = listener(lab, "right", CONTROL_PORT)
    assert lab.control_endpoint("right", CONTROL_PORT) == ("198.51.100.20", CONTROL_PORT)
    c, err, _ = connect(lab, "left", lab.control_endpoint("right", CONTROL_PORT), timeout=3.0)
    assert err is None and c is not None
    conn, peer = ctl.accept()
    assert peer[0] == lab.public_address("left")
    for s in (conn, c, ctl):
        s.close()


@pytest.mark.netns
@pytest.mark.parametrize("lab", ["symmetric-symmetric", "random-random"], indirect=True)
def test_random_nat_does_not_preserve_ports(lab: Lab) -> None:
    srv = listener(lab, "public", 9000)
    changed = 0
    tries = 6
    for _ in range(tries):
        port = free_port()
        c, err, _ = connect(lab, "left", (lab.address("public"), 9000), timeout=3.0, bind_port=port)
        assert err is None and c is not None
        conn, peer = srv.accept()
        assert peer[0] == lab.public_address("left")
        changed += peer[1] != port
        conn.close()
        c.close()
    srv.close()
    # a random mapping keeps the port by chance with probability ~1/64512 per try
    assert changed >= tries - 1, f"only {changed}/{tries} ports changed"


# ------------------------------------------------------------------ (5) simultaneous open


def simultaneous_open(
    lab: Lab, timeout: float
) -> tuple[dict[str, socket.socket], dict[str, BaseException | None]]:
    ports = {"left": free_port(), "right": free_port()}
    socks: dict[str, socket.socket] = {}
    for side in ports:
        s = lab.socket(side)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind((lab.address(side), ports[side]))
        s.settimeout(timeout)
        socks[side] = s
    barrier = threading.Barrier(2, timeout=timeout)
    results: dict[str, BaseException | None] = {}

    def dial(side: str, other: str) -> None:
        barrier.wait()
        try:
            socks[side].connect((lab.public_address(other), ports[other]))
            results[side] = None
        except OSError as exc:
            results[side] = exc

    threads = [
        threading.Thread(target=dial, args=("left", "right")),
        threading.Thread(target=dial, args=("right", "left")),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout + 5.0)
        assert not t.is_alive()
    return socks, results


@pytest.mark.netns
@pytest.mark.parametrize("lab", ["fw-fw", "nat-nat", "double-double"], indirect=True)
def test_simultaneous_open_gets_through(lab: Lab) -> None:
    socks, results = simultaneous_open(lab, timeout=5.0)
    try:
        assert results == {"left": None, "right": None}, results
        socks["left"].sendall(b"hello from left")
        assert socks["right"].recv(100) == b"hello from left"
        socks["right"].sendall(b"hello from right")
        assert socks["left"].recv(100) == b"hello from right"
        assert socks["left"].getpeername()[0] == lab.public_address("right")
        assert socks["right"].getpeername()[0] == lab.public_address("left")
    finally:
        for s in socks.values():
            s.close()


@pytest.mark.netns
@pytest.mark.parametrize("lab", ["symmetric-symmetric"], indirect=True)
def test_simultaneous_open_fails_through_symmetric_nats(lab: Lab) -> None:
    socks, results = simultaneous_open(lab, timeout=2.0)
    for s in socks.values():
        s.close()
    assert all(isinstance(e, OSError) for e in results.values()), results


# ------------------------------------------------------------------ (6) teardown


@pytest.mark.netns
@pytest.mark.parametrize("exc_type", [RuntimeError, KeyboardInterrupt])
def test_teardown_removes_everything_even_when_body_raises(exc_type: type[BaseException]) -> None:
    require_netns(need=("turnserver",))
    spec = LabSpec(
        left=SideSpec(nat="double"), right=SideSpec(nat="masquerade"), stun=True, name="boom"
    )
    lab = Lab(spec)
    with pytest.raises(exc_type), lab:
        names = lab.namespaces()
        assert set(names) <= netns_list()
        assert (STATE_DIR / f"{lab.run_id}.json").exists()
        sleeper = lab.popen("left", ["sleep", "60"])
        turn = lab.stun_process
        assert turn is not None and turn.poll() is None
        raise exc_type("body failed")
    assert not set(names) & netns_list()
    assert not (STATE_DIR / f"{lab.run_id}.json").exists()
    assert sleeper.poll() is not None
    assert turn is not None and turn.poll() is not None
    assert not lab.built and lab.hosts == {}
    lab.teardown()  # idempotent


@pytest.mark.netns
def test_interrupted_build_leaves_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    require_netns()

    def interrupted(self: Lab) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(Lab, "_start_stun", interrupted)
    lab = Lab(presets()["double-double"])
    with pytest.raises(KeyboardInterrupt):
        lab.build()
    assert not [ns for ns in netns_list() if ns.startswith(lab.prefix)]
    assert not (STATE_DIR / f"{lab.run_id}.json").exists()
    assert not lab.built


@pytest.mark.netns
def test_cleanup_stale_removes_namespaces_of_dead_pid() -> None:
    require_netns(need=("turnserver",))
    code = textwrap.dedent(
        """
        import json, os, signal, subprocess, sys
        from holepunch_mig.lab import Lab, presets
        lab = Lab(presets()["nat-nat"]).build()
        pids = subprocess.run(["ip", "netns", "pids", lab.netns("stun")],
                              capture_output=True, text=True).stdout.split()
        print(json.dumps({"namespaces": lab.namespaces(), "run_id": lab.run_id,
                          "stun_pids": [int(p) for p in pids]}), flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    child = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, env=env
    )
    assert child.returncode == -signal.SIGKILL, child.stderr
    info = json.loads(child.stdout)
    names = set(info["namespaces"])
    assert names and names <= netns_list(), "the killed run should have left namespaces"
    assert info["stun_pids"], "coturn should have been running in the stun namespace"
    # a live lab of our own must survive the cleanup
    with Lab(presets()["fw-fw"]) as mine:
        removed = Lab.cleanup_stale()
        # (another process's cleanup_stale may have got to some of them first)
        assert not set(removed) & set(mine.namespaces())
        assert set(mine.namespaces()) <= netns_list()
    assert not names & netns_list()
    assert not (STATE_DIR / f"{info['run_id']}.json").exists()
    assert not list(Path(tempfile.gettempdir()).glob(f"hpm-{info['run_id']}-turn-*"))
    for pid in info["stun_pids"]:  # the orphaned coturn was killed
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline and os.path.exists(f"/proc/{pid}"):
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                    break
            time.sleep(0.05)
        else:
            assert not os.path.exists(f"/proc/{pid}"), f"coturn pid {pid} still alive"


# ------------------------------------------------------------------ (7) STUN

STUN_CLIENT = textwrap.dedent(
    """
    import json, socket, struct, sys
    from aioice import stun
    server, port = sys.argv[1], int(sys.argv[2])
    bind_addr, bind_port = sys.argv[3], int(sys.argv[4])
    s = socket.socket()
    s.settimeout(5)
    s.bind((bind_addr, bind_port))
    s.connect((server, port))
    req = stun.Message(message_method=stun.Method.BINDING, message_class=stun.Class.REQUEST)
    s.sendall(bytes(req))
    def read(n):
        buf = b""
        while len(buf) < n:
            chunk = s.recv(n - len(buf))
            if not chunk:
                raise SystemExit("STUN server closed the connection")
            buf += chunk
        return buf
    header = read(20)
    (length,) = struct.unpack("!H", header[2:4])
    msg = stun.parse_message(header + read(length))
    assert msg.transaction_id == req.transaction_id
    assert msg.message_class == stun.Class.RESPONSE, msg
    print(json.dumps(list(msg.attributes["XOR-MAPPED-ADDRESS"])))
    """
)


@pytest.mark.netns
@pytest.mark.parametrize("lab", ["nat-nat", "double-nat", "nat-open"], indirect=True)
def test_stun_over_tcp_sees_the_nat_public_address(lab: Lab) -> None:
    stun = lab.stun_endpoint()
    assert stun is not None
    for side in ("left", "right"):
        port = free_port()
        proc = run_python(
            lab, side, STUN_CLIENT, stun[0], str(stun[1]), lab.address(side), str(port)
        )
        mapped = json.loads(proc.stdout)
        # port-preserving NATs (and no NAT) keep the bound port
        assert mapped == [lab.public_address(side), port]


# ------------------------------------------------------------------ delay and detached labs


def _connect_ms(lab: Lab, srv: socket.socket, endpoint: tuple[str, int]) -> float:
    c = lab.socket("left")
    with c:
        c.settimeout(5.0)
        start = time.monotonic()
        c.connect(endpoint)
        took = (time.monotonic() - start) * 1000
        a, _ = srv.accept()
        a.close()
    return took


@pytest.mark.netns
@pytest.mark.parametrize("preset", ["fw-fw", "double-nat"])
def test_rtt_delays_left_to_right(lab_factory: Factory, preset: str) -> None:
    from dataclasses import replace

    lab = lab_factory(replace(presets()[preset], rtt_ms=60))
    srv = listener(lab, "right", CONTROL_PORT)
    with srv:
        endpoint = lab.control_endpoint("right", CONTROL_PORT)
        samples = sorted(_connect_ms(lab, srv, endpoint) for _ in range(5))
    # a TCP connect takes one RTT: SYN (delayed entering right), SYN-ACK (entering left)
    assert samples[0] >= 58, samples
    assert samples[2] < 150, samples
    # the data path works too, and the delay stages counted the packets
    out = run_python(lab, "left", "import socket; print('ok')")
    assert out.stdout.strip() == b"ok"
    lab.teardown()
    counters = lab.delay_counters()
    assert set(counters) == {"left", "right"}
    assert counters["right"]["packets"] >= 10 and counters["right"]["delay_ms"] == 30


@pytest.mark.netns
def test_detached_lab_survives_cleanup_stale_and_attach_tears_down() -> None:
    require_netns(need=("turnserver",))
    code = textwrap.dedent(
        """
        import json
        from dataclasses import replace
        from holepunch_mig.lab import Lab, presets
        spec = replace(presets()["nat-fw"], name="detach-test", rtt_ms=10)
        lab = Lab(spec, detached=True).build()
        print(json.dumps({"run_id": lab.run_id, "namespaces": lab.namespaces()}))
        """
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    child = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env
    )
    assert child.returncode == 0, child.stderr
    info = json.loads(child.stdout)
    try:
        # the building process is gone, yet the lab is not stale
        assert set(info["namespaces"]) <= netns_list()
        assert not set(Lab.cleanup_stale()) & set(info["namespaces"])
        state = json.loads((STATE_DIR / f"{info['run_id']}.json").read_text())
        assert state["detached"] is True and state["name"] == "detach-test"
        listed = {st["run_id"]: st for st in Lab.list_labs()}
        assert listed[info["run_id"]]["status"] == "detached"
        lab = Lab.attach("detach-test")
        assert lab.run_id == info["run_id"]
        assert lab.spec.rtt_ms == 10 and lab.public_address("left") == "198.51.100.10"
        # its services (coturn, delay stages) still run inside its namespaces
        pids = subprocess.run(
            ["ip", "netns", "pids", lab.netns("stun")], capture_output=True, text=True
        ).stdout.split()
        assert pids
    finally:
        Lab.attach(info["run_id"]).teardown()
    assert not set(info["namespaces"]) & netns_list()
    assert not (STATE_DIR / f"{info['run_id']}.json").exists()
    with pytest.raises(LabError, match="no detached lab"):
        Lab.attach(info["run_id"])
