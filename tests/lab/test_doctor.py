"""``holepunch-mig doctor`` inside lab topologies of every NAT type: the classification
(NAT present, mapping, port preservation) and the plain-words verdict match the NAT."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from dataclasses import replace

import pytest
from testsupport.lab import cli_env

from holepunch_mig.lab import Lab, LabSpec, presets

Factory = Callable[[LabSpec | str], Lab]
DOCTOR = [sys.executable, "-m", "holepunch_mig.cli", "doctor"]

# preset -> (nat, mapping, port_preserving, direct_link_likely, exit code); the left host
# of each preset is probed.
CASES = {
    "fw-fw": ("none", "endpoint-independent", True, "yes", 0),
    "nat-nat": ("present", "endpoint-independent", True, "yes", 0),
    "double-nat": ("present", "endpoint-independent", True, "yes", 0),
    "rst-rst": ("present", "endpoint-independent", True, "yes", 0),
    "random-random": ("present", "endpoint-dependent", False, "no", 3),
    "symmetric-symmetric": ("present", "endpoint-dependent", False, "no", 3),
    # the same NAT, with a router that maps ports (miniupnpd): crossed after all
    "symmetric-pcp": ("present", "endpoint-dependent", False, "yes", 0),
    # a router that answers only UPnP-IGD
    "symmetric-upnp": ("present", "endpoint-dependent", False, "yes", 0),
}


def doctor(lab: Lab, *args: str) -> tuple[int, dict[str, object] | str]:
    stun = [a for h, p in lab.stun_endpoints() for a in ("--stun", f"{h}:{p}")]
    proc = lab.run("left", [*DOCTOR, *stun, *args], timeout=30, capture_output=True, env=cli_env())
    out = proc.stdout.decode()
    if "--json" in args:
        return proc.returncode, json.loads(out)
    return proc.returncode, out


@pytest.mark.netns
@pytest.mark.parametrize("preset", list(CASES))
def test_doctor_classifies(lab_factory: Factory, preset: str) -> None:
    nat, mapping, preserving, likely, code = CASES[preset]
    lab = lab_factory(replace(presets()[preset], stun=True))
    rc, result = doctor(lab, "--json", "--port", "40123")
    assert isinstance(result, dict)
    assert rc == code, result
    assert result["nat"] == nat
    assert result["mapping"] == mapping
    assert result["port_preserving"] is preserving
    assert result["direct_link_likely"] == likely
    assert result["filtering"] == "unknown"
    assert len(result["results"]) == 2  # type: ignore[arg-type]
    seen = {r["mapped"].rsplit(":", 1)[0] for r in result["results"]}  # type: ignore[attr-defined]
    assert seen == {lab.public_address("left")}
    if likely == "no":
        assert "Symmetric NAT" in str(result["summary"])
        assert any("endpoint-independently" in a for a in result["advice"])  # type: ignore[attr-defined]
    gateway = result["port_mapping"]
    assert isinstance(gateway, dict)
    if preset == "symmetric-pcp":
        assert gateway["protocol"] == "pcp" and gateway["external_address"] == "198.51.100.10"
        assert gateway["protocols"] == ["pcp", "nat-pmp", "upnp-igd"]
        assert "gateway offers port mapping (pcp)" in str(result["summary"])
    elif preset == "symmetric-upnp":
        assert gateway["protocol"] == "upnp-igd" and gateway["protocols"] == ["upnp-igd"]
        assert gateway["external_address"] == "198.51.100.10"
        assert "gateway offers port mapping (upnp-igd)" in str(result["summary"])
    else:
        assert gateway["protocol"] is None
    # the human rendering says the same in words
    rc2, text = doctor(lab, "--port", "40124")
    assert rc2 == code
    assert f"direct link likely: {likely}" in str(text)
    assert f"mapping:    {mapping}" in str(text)
    assert ("port mapping: pcp on 10.1.0.1:5351" in str(text)) is (preset == "symmetric-pcp")
    assert ("upnp-igd on http://10.1.0.1:" in str(text)) is preset.endswith(("-pcp", "-upnp"))


@pytest.mark.netns
def test_doctor_cannot_tell_with_one_or_no_server(lab_factory: Factory) -> None:
    lab = lab_factory("nat-nat")
    one = lab.run(
        "left",
        [*DOCTOR, "--stun", "198.51.100.3:3478", "--json"],
        timeout=30,
        capture_output=True,
        env=cli_env(),
    )
    res = json.loads(one.stdout)
    assert one.returncode == 1
    assert res["mapping"] == "unknown" and res["direct_link_likely"] == "unknown"
    assert any("two STUN servers" in a for a in res["advice"])
    none = lab.run(
        "left",
        [*DOCTOR, "--stun", "198.51.100.3:9", "--json", "--timeout", "2"],
        timeout=30,
        capture_output=True,
        env=cli_env(),
    )
    res = json.loads(none.stdout)
    assert none.returncode == 1 and res["nat"] == "unknown" and res["errors"]


def test_doctor_needs_a_server(capsys: pytest.CaptureFixture[str]) -> None:
    from holepunch_mig.cli import main as cli

    assert cli.main(["doctor"]) == 2
    assert "--stun" in capsys.readouterr().err


@pytest.mark.netns
def test_doctor_merges_a_repeated_server(lab_factory: Factory) -> None:
    """The same server twice is probed once and said so, not read as endpoint-dependent."""
    lab = lab_factory("nat-nat")
    run = lab.run(
        "left",
        [*DOCTOR, "--stun", "198.51.100.3:3478", "--stun", "198.51.100.3:3478", "--json"],
        timeout=30,
        capture_output=True,
        env=cli_env(),
    )
    res = json.loads(run.stdout)
    assert res["servers"] == ["198.51.100.3:3478"]
    assert len(res["results"]) == 1
    assert res["mapping"] != "endpoint-dependent"
    assert "given more than once (198.51.100.3:3478)" in res["advice"][0]


def test_doctor_names_an_unresolvable_server() -> None:
    """A name that does not resolve is reported as such, not as "no answer"."""
    run = subprocess.run(
        [*DOCTOR, "--stun", "stun.invalid:3478", "--timeout", "3"],
        capture_output=True,
        text=True,
        timeout=60,
        env=cli_env(),
    )
    assert run.returncode == 1
    assert "cannot resolve STUN server name 'stun.invalid'" in run.stdout, run.stdout
    assert "no answer within" not in run.stdout
    assert "Errno" not in run.stdout
