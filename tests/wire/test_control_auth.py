"""The control handshake and sealed frames, sans-IO: every mode completes with matching
keys and handshake hashes; wrong keys, secrets and codes fail on the side that can tell,
with errors that name what was wrong; the pairing budget and expiry hold."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from holepunch_mig.errors import (
    ControlAuthError,
    ControlRejected,
    CredentialError,
    PairingFailed,
    ProtocolError,
    UnknownPeer,
)
from holepunch_mig.wire.control_auth import (
    ControlAuth,
    ControlHandshake,
    PairingCode,
    derive_psk,
    normalize_code,
    reject_frame,
    safe_text,
)
from holepunch_mig.wire.identity import (
    Identity,
    PeerKey,
    PeerSet,
    b64,
    format_private_key,
    parse_peer_line,
    parse_peers,
    parse_private_key,
)
from holepunch_mig.wire.messages import decode


def _pinned(a: Identity, b: Identity, name: str = "peer") -> ControlAuth:
    return ControlAuth(identity=a, peers=PeerSet([PeerKey(b.public, name)]))


def _run(
    init: ControlHandshake, resp: ControlHandshake
) -> tuple[ControlHandshake, ControlHandshake]:
    m2 = resp.receive(init.start())
    assert m2 is not None
    m3 = init.receive(m2)
    assert m3 is not None
    assert resp.receive(m3) is None
    return init, resp


def _check_sealed(init: ControlHandshake, resp: ControlHandshake) -> None:
    assert init.session is not None and resp.session is not None
    assert init.session.handshake_hash == resp.session.handshake_hash
    assert init.sealer is not None and resp.unsealer is not None
    assert resp.sealer is not None and init.unsealer is not None
    for i in range(3):
        msg = b"\x01" + os.urandom(50 + i)
        assert resp.unsealer.open(init.sealer.seal(msg)) == msg
        assert init.unsealer.open(resp.sealer.seal(msg)) == msg


def test_pinned_keys_complete_and_name_the_peer() -> None:
    src, dst = Identity.generate(), Identity.generate()
    init, resp = _run(
        ControlHandshake(_pinned(src, dst, "dst-host"), True),
        ControlHandshake(_pinned(dst, src, "src-host"), False),
    )
    _check_sealed(init, resp)
    assert init.session is not None and resp.session is not None
    assert init.session.peer_name == "dst-host" and resp.session.peer_name == "src-host"
    assert "pinned key 'src-host'" in resp.session.peer


def test_unknown_responder_key_stops_the_initiator_before_it_reveals_itself() -> None:
    src, dst, squatter = Identity.generate(), Identity.generate(), Identity.generate()
    init = ControlHandshake(_pinned(src, dst), True)
    resp = ControlHandshake(_pinned(squatter, src), False)
    m2 = resp.receive(init.start())
    assert m2 is not None
    with pytest.raises(UnknownPeer, match=r"receiver proved key .*--peer or to the --peers"):
        init.receive(m2)
    assert init.session is None and init.reject is not None


def test_unknown_initiator_key_is_refused_with_a_reason() -> None:
    src, dst, stranger = Identity.generate(), Identity.generate(), Identity.generate()
    init = ControlHandshake(
        ControlAuth(identity=stranger, peers=PeerSet([PeerKey(dst.public, "d")])), True
    )
    resp = ControlHandshake(_pinned(dst, src), False)
    m2 = resp.receive(init.start())
    assert m2 is not None
    m3 = init.receive(m2)
    assert m3 is not None
    with pytest.raises(UnknownPeer, match="sender proved key"):
        resp.receive(m3)
    assert resp.session is None
    # the stranger learns only that it was refused
    assert resp.reject is not None
    with pytest.raises(ControlRejected, match="not pinned here"):
        assert init.unsealer is not None
        init.unsealer.open(resp.reject)


def test_psk_completes_and_a_wrong_psk_fails_at_message_3() -> None:
    secret = os.urandom(32)
    init, resp = _run(
        ControlHandshake(ControlAuth.from_secret(secret), True),
        ControlHandshake(ControlAuth.from_secret(secret), False),
    )
    _check_sealed(init, resp)
    assert resp.session is not None and resp.session.peer == "holder of the pre-shared secret"
    init = ControlHandshake(ControlAuth.from_secret(os.urandom(32)), True)
    resp = ControlHandshake(ControlAuth.from_secret(secret), False)
    m2 = resp.receive(init.start())
    assert m2 is not None
    m3 = init.receive(m2)
    assert m3 is not None
    with pytest.raises(ControlAuthError, match="another pre-shared secret"):
        resp.receive(m3)


def test_psk_needs_32_bytes() -> None:
    with pytest.raises(CredentialError, match="at least 32 random bytes, got 31"):
        derive_psk(b"x" * 31)
    assert derive_psk(b"x" * 32) != derive_psk(b"x" * 33)


def test_pairing_code_completes_once() -> None:
    code = PairingCode.generate(now=0.0)
    assert len(code.text) == 11 and code.text[5] == "-"
    init, resp = _run(
        ControlHandshake(ControlAuth(code=code.text.upper()), True),
        ControlHandshake(ControlAuth(code=code), False, now=1.0),
    )
    _check_sealed(init, resp)
    assert code.used
    again = ControlHandshake(ControlAuth(code=code), False, now=2.0)
    with pytest.raises(PairingFailed, match="already used"):
        again.receive(ControlHandshake(ControlAuth(code=code.text), True).start())


def _guess(code: PairingCode, guess: str, now: float = 1.0) -> None:
    init = ControlHandshake(ControlAuth(code=guess), True)
    resp = ControlHandshake(ControlAuth(code=code), False, now=now)
    m2 = resp.receive(init.start())
    assert m2 is not None
    m3 = init.receive(m2)  # the guesser cannot tell yet: no offline check
    assert m3 is not None
    resp.receive(m3)


def test_wrong_codes_spend_the_budget_one_guess_each() -> None:
    code = PairingCode.generate(now=0.0, attempts=3)
    wrong = "zzzzz-zzzzz" if code.secret != "zzzzzzzzzz" else "00000-00000"
    for left in (2, 1, 0):
        with pytest.raises(PairingFailed, match=f"wrong pairing code \\({left} attempt"):
            _guess(code, wrong)
    # the budget is spent: even the right code is refused now
    with pytest.raises(PairingFailed, match="after 3 wrong attempts"):
        _guess(code, code.text)
    assert not code.used


def test_expired_code_is_refused() -> None:
    code = PairingCode.generate(now=0.0, lifetime=10.0)
    with pytest.raises(PairingFailed, match="expired"):
        _guess(code, code.text, now=11.0)


def test_code_text_forms() -> None:
    assert normalize_code(" 7K2QD-M9X4A ") == "7k2qdm9x4a"
    assert normalize_code("o1l0i-aaaaa") == "01101aaaaa"  # o/i/l read as 0/1/1
    with pytest.raises(CredentialError, match="not of the form xxxxx-xxxxx"):
        normalize_code("7k2qd-m9x4")
    with pytest.raises(CredentialError, match="not of the form"):
        normalize_code("uuuuu-uuuuu")


def test_mode_mismatch_names_both_sides() -> None:
    src, dst = Identity.generate(), Identity.generate()
    init = ControlHandshake(ControlAuth.from_secret(os.urandom(32)), True)
    resp = ControlHandshake(_pinned(dst, src), False)
    with pytest.raises(ControlAuthError, match="peer authenticates with a pre-shared secret"):
        resp.receive(init.start())
    assert resp.reject is not None


def test_plaintext_peer_gets_a_pointed_error_both_ways() -> None:
    src, dst = Identity.generate(), Identity.generate()
    resp = ControlHandshake(_pinned(dst, src), False)
    with pytest.raises(ProtocolError, match="runs without control authentication"):
        resp.receive(b'\x01{"v":2,"type":"ping","seq":0}')
    init = ControlHandshake(_pinned(src, dst), True)
    with pytest.raises(ProtocolError, match="authenticated control frame"):
        decode(init.start())


def test_sealed_frames_refuse_tampering_replay_and_plaintext() -> None:
    secret = os.urandom(32)
    init, resp = _run(
        ControlHandshake(ControlAuth.from_secret(secret), True),
        ControlHandshake(ControlAuth.from_secret(secret), False),
    )
    assert init.sealer is not None and resp.unsealer is not None
    one = init.sealer.seal(b"\x01one")
    two = init.sealer.seal(b"\x01two")
    with pytest.raises(ControlAuthError, match="message 0 failed authentication"):
        resp.unsealer.open(two)  # out of order (a replay or a drop)
    with pytest.raises(ProtocolError, match="already failed"):
        resp.unsealer.open(one)  # dead after one failure
    _, resp2 = _run(
        ControlHandshake(ControlAuth.from_secret(secret), True),
        ControlHandshake(ControlAuth.from_secret(secret), False),
    )
    assert resp2.unsealer is not None
    with pytest.raises(ProtocolError, match="kind 0x01 on an authenticated control channel"):
        resp2.unsealer.open(b'\x01{"v":2,"type":"ping","seq":0}')


def test_each_session_has_its_own_handshake_hash() -> None:
    secret = os.urandom(32)
    hashes = set()
    for _ in range(2):
        init, _resp = _run(
            ControlHandshake(ControlAuth.from_secret(secret), True),
            ControlHandshake(ControlAuth.from_secret(secret), False),
        )
        assert init.session is not None
        hashes.add(init.session.handshake_hash)
    assert len(hashes) == 2


def test_safe_text_escapes_terminal_controls() -> None:
    assert safe_text("ok\x1b]0;owned\x07\n") == "ok\\x1b]0;owned\\x07\\n"


# ------------------------------------------------------------------ key text forms


def test_key_lines_round_trip() -> None:
    ident = Identity.generate()
    line = ident.public_line("host-a")
    peer = parse_peer_line(line)
    assert peer.key == ident.public and peer.name == "host-a"
    assert parse_private_key(format_private_key(ident), "f").private == ident.private
    assert b64(ident.private) not in repr(ident) and ident.private.hex() not in repr(ident)


@pytest.mark.parametrize(
    ("line", "needle"),
    [
        ("ssh-ed25519 AAAA", "expected 'hpm-x25519 KEY"),
        ("hpm-x25519", "without a key"),
        ("hpm-x25519 abc", "43 base64url characters"),
        ("hpm-x25519 " + "A" * 43 + " two words", "a name has no spaces"),
        ("hpm-x25519 " + "A" * 43 + " bad\x1bname", "a peer name is"),
    ],
)
def test_bad_key_lines_say_what_is_wrong(line: str, needle: str) -> None:
    with pytest.raises(CredentialError, match=needle):
        parse_peer_line(line)


def test_peers_file_names_the_bad_line() -> None:
    a, b = Identity.generate(), Identity.generate()
    text = f"# hosts\n\n{a.public_line('a')}\n{b.public_line('b')}\n"
    peers = parse_peers(text, "peers")
    assert sorted(peers.names()) == ["a", "b"]
    with pytest.raises(CredentialError, match=r"peers line 5: key .* is pinned twice"):
        parse_peers(text + a.public_line("again") + "\n", "peers")
    with pytest.raises(CredentialError, match="peers line 2: expected"):
        parse_peers(a.public_line() + "\nnonsense\n", "peers")


def test_private_key_file_errors() -> None:
    ident = Identity.generate()
    with pytest.raises(CredentialError, match="this is a public key line"):
        parse_private_key(ident.public_line() + "\n", "k")
    with pytest.raises(CredentialError, match="expected 2 lines"):
        parse_private_key(format_private_key(ident) + "extra\n", "k")


# ------------------------------------------------------------------ hostile input


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=600), step=st.integers(0, 1))
def test_arbitrary_handshake_frames_fail_by_name(data: bytes, step: int) -> None:
    """Whatever a stranger sends, the listener fails with a named error, never a crash."""
    src, dst = Identity.generate(), Identity.generate()
    for auth in (_pinned(dst, src), ControlAuth.from_secret(b"k" * 32)):
        resp = ControlHandshake(auth, False)
        try:
            if step == 1:
                init = ControlHandshake(_pinned(src, dst) if auth.mode == "keys" else auth, True)
                resp.receive(init.start())
            resp.receive(data)
        except (ControlAuthError, ProtocolError):
            pass


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=300))
def test_arbitrary_sealed_frames_fail_by_name(data: bytes) -> None:
    secret = b"s" * 32
    _, resp = _run(
        ControlHandshake(ControlAuth.from_secret(secret), True),
        ControlHandshake(ControlAuth.from_secret(secret), False),
    )
    assert resp.unsealer is not None
    with pytest.raises((ControlAuthError, ProtocolError)):
        resp.unsealer.open(data)


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=300))
def test_arbitrary_peers_files_fail_by_name(text: str) -> None:
    try:
        parse_peers(text, "peers")
    except CredentialError as exc:
        assert "peers line " in str(exc)


def test_a_host_that_pins_its_own_key_does_not_handshake_with_itself() -> None:
    me = Identity.generate()
    own = ControlAuth(identity=me, peers=PeerSet([PeerKey(me.public, "me")]))
    init, resp = ControlHandshake(own, True), ControlHandshake(own, False)
    m2 = resp.receive(init.start())
    assert m2 is not None
    with pytest.raises(UnknownPeer, match="this host's own key"):
        init.receive(m2)


def test_secrets_stay_out_of_repr() -> None:
    psk = os.urandom(32)
    auth = ControlAuth(psk=psk)
    assert psk.hex() not in repr(auth) and repr(psk) not in repr(auth)
    code = ControlAuth(code="abcde-fghij")
    assert "abcde" not in repr(code)
    assert "abcde" not in repr(ControlHandshake(code, True))


def test_a_reject_frame_after_the_handshake_is_marked_unauthenticated() -> None:
    src, dst = Identity.generate(), Identity.generate()
    init, _ = _run(
        ControlHandshake(_pinned(src, dst), True), ControlHandshake(_pinned(dst, src), False)
    )
    assert init.unsealer is not None
    forged = reject_frame("key rotated: re-run with --peer 'hpm-x25519 EVIL'")
    with pytest.raises(ControlRejected, match=r"^the peer refused \(unauthenticated reject"):
        init.unsealer.open(forged)
