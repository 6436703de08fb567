"""Tests for holepunch_mig.wire.noise: cacophony vectors, interop with the independent
`noiseprotocol` package, bad input, and a hypothesis fuzz of read_message."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from hypothesis import given, settings
from hypothesis import strategies as st
from noise.connection import Keypair, NoiseConnection

from holepunch_mig.errors import DecryptError, HandshakeError, HolepunchError, NonceExhausted
from holepunch_mig.wire.noise import (
    DHLEN,
    MAX_MESSAGE,
    MAX_NONCE,
    CipherState,
    HandshakeState,
    generate_keypair,
    hkdf,
    public_key,
    rekey_key,
)

# --- vectors ------------------------------------------------------------------------------

VECTOR_FILE = "noise-25519-aesgcm-sha256.json"
EXPECTED_PROTOCOLS = {
    f"Noise_{p}_25519_AESGCM_SHA256" for p in ("NN", "KK", "IK", "XX", "NNpsk0", "KKpsk0", "KKpsk2")
}


VECTOR_PATH = Path(__file__).resolve().parent / "vectors" / VECTOR_FILE
"""Public-domain cacophony vectors, committed beside this file so these tests always run."""


def _load_vectors() -> list[dict[str, Any]]:
    data = json.loads(VECTOR_PATH.read_text())
    vectors: list[dict[str, Any]] = data["vectors"]
    return vectors


VECTORS = _load_vectors()


def _hex(v: dict[str, Any], key: str) -> bytes | None:
    return bytes.fromhex(v[key]) if key in v else None


def _side(v: dict[str, Any], prefix: str, initiator: bool) -> HandshakeState:
    pattern = v["protocol_name"].split("_")[1]
    prologue = _hex(v, prefix + "prologue") or b""
    hs = HandshakeState(
        pattern,
        initiator,
        prologue,
        s=_hex(v, prefix + "static"),
        rs=_hex(v, prefix + "remote_static"),
        e=_hex(v, prefix + "ephemeral"),
        psks=[bytes.fromhex(p) for p in v.get(prefix + "psks", [])],
    )
    assert hs.protocol_name == v["protocol_name"]
    return hs


def test_vector_file_covers_the_patterns_we_use() -> None:
    assert {v["protocol_name"] for v in VECTORS} >= EXPECTED_PROTOCOLS


@pytest.mark.parametrize("vector", VECTORS, ids=[v["protocol_name"] for v in VECTORS])
def test_cacophony_vector(vector: dict[str, Any]) -> None:
    init = _side(vector, "init_", True)
    resp = _side(vector, "resp_", False)
    transport: tuple[CipherState, CipherState, CipherState, CipherState] | None = None
    handshake_msgs = transport_msgs = 0
    for i, m in enumerate(vector["messages"]):
        payload, ct = bytes.fromhex(m["payload"]), bytes.fromhex(m["ciphertext"])
        from_initiator = i % 2 == 0  # messages keep alternating after the handshake
        if not init.complete:
            assert not resp.complete
            sender, receiver = (init, resp) if from_initiator else (resp, init)
            assert sender.write_message(payload) == ct, f"handshake message {i}"
            assert receiver.read_message(ct) == payload, f"handshake message {i}"
            handshake_msgs += 1
            continue
        if transport is None:
            assert resp.complete
            assert init.handshake_hash == resp.handshake_hash
            assert init.handshake_hash.hex() == vector["handshake_hash"]
            assert init.split() == resp.split()
            transport = (*init.split_cipherstates(), *resp.split_cipherstates())
        i_send, i_recv, r_recv, r_send = transport
        send, recv = (i_send, r_recv) if from_initiator else (r_send, i_recv)
        assert send.encrypt_with_ad(b"", payload) == ct, f"transport message {i}"
        assert recv.decrypt_with_ad(b"", ct) == payload, f"transport message {i}"
        transport_msgs += 1
    assert init.complete and resp.complete
    assert init.handshake_hash.hex() == vector["handshake_hash"]
    assert handshake_msgs >= 2 and transport_msgs >= 1


# --- interop with noiseprotocol -------------------------------------------------------------


def _theirs(
    pattern: str,
    initiator: bool,
    prologue: bytes,
    s: bytes | None,
    rs: bytes | None,
    psks: list[bytes],
) -> Any:
    conn = NoiseConnection.from_name(f"Noise_{pattern}_25519_AESGCM_SHA256".encode())
    conn.set_as_initiator() if initiator else conn.set_as_responder()
    conn.set_prologue(prologue)
    if s is not None:
        conn.set_keypair_from_private_bytes(Keypair.STATIC, s)
    if rs is not None:
        conn.set_keypair_from_public_bytes(Keypair.REMOTE_STATIC, rs)
    if psks:
        conn.set_psks(psks=psks)
    conn.start_handshake()
    return conn


# pattern -> (initiator has s, responder has s, initiator knows rs, responder knows rs, #psk)
INTEROP = {
    "KK": (True, True, True, True, 0),
    "NN": (False, False, False, False, 0),
    "XX": (True, True, False, False, 0),
    "IK": (True, True, True, False, 0),
    "NNpsk0": (False, False, False, False, 1),
    "KKpsk0": (True, True, True, True, 1),
    "KKpsk2": (True, True, True, True, 1),
    "NNpsk2": (False, False, False, False, 1),  # psk mode: payload of message 1 is encrypted
    "XXpsk3": (True, True, False, False, 1),
    "NNpsk0+psk2": (False, False, False, False, 2),  # name over 32 bytes: hashed into h
}


@pytest.mark.parametrize("ours_initiator", [True, False], ids=["ours-init", "ours-resp"])
@pytest.mark.parametrize("pattern", list(INTEROP))
def test_interop_with_noiseprotocol(pattern: str, ours_initiator: bool) -> None:
    i_s, r_s, i_rs, r_rs, n_psk = INTEROP[pattern]
    i_priv, i_pub = generate_keypair()
    r_priv, r_pub = generate_keypair()
    psks = [os.urandom(32) for _ in range(n_psk)]
    prologue = b"session-id|offer|answer"
    init_args = (i_priv if i_s else None, r_pub if i_rs else None)
    resp_args = (r_priv if r_s else None, i_pub if r_rs else None)
    if ours_initiator:
        s, rs = init_args
        ours = HandshakeState(pattern, True, prologue, s=s, rs=rs, psks=psks)
        theirs = _theirs(pattern, False, prologue, *resp_args, psks)
    else:
        s, rs = resp_args
        ours = HandshakeState(pattern, False, prologue, s=s, rs=rs, psks=psks)
        theirs = _theirs(pattern, True, prologue, *init_args, psks)

    initiator_writes = True
    n = 0
    while not ours.complete:
        payload = f"handshake payload {n}".encode()
        if initiator_writes == ours_initiator:
            assert bytes(theirs.read_message(ours.write_message(payload))) == payload
        else:
            assert ours.read_message(bytes(theirs.write_message(payload))) == payload
        initiator_writes = not initiator_writes
        n += 1
    assert theirs.handshake_finished
    assert ours.handshake_hash == theirs.get_handshake_hash()
    if i_s and r_s:  # both sides know each other's static key by now
        assert ours.remote_static == (r_pub if ours_initiator else i_pub)

    # Split keys: raw bytes agree, and transport messages flow both ways.
    k1, k2 = ours.split()
    proto = theirs.noise_protocol
    assert proto.cipher_state_encrypt.k == (k2 if ours_initiator else k1)
    assert proto.cipher_state_decrypt.k == (k1 if ours_initiator else k2)
    c1, c2 = ours.split_cipherstates()
    send, recv = (c1, c2) if ours_initiator else (c2, c1)
    for round_ in range(3):
        msg = f"ours->theirs {round_}".encode() * (round_ + 1)
        assert theirs.decrypt(send.encrypt_with_ad(b"", msg)) == msg
        back = f"theirs->ours {round_}".encode()
        assert recv.decrypt_with_ad(b"", theirs.encrypt(back)) == back
    # Rekey() agrees with the independent implementation too.
    send.rekey()
    theirs.rekey_inbound_cipher()
    recv.rekey()
    theirs.rekey_outbound_cipher()
    assert theirs.decrypt(send.encrypt_with_ad(b"", b"after rekey")) == b"after rekey"
    assert recv.decrypt_with_ad(b"", theirs.encrypt(b"and back")) == b"and back"


# --- bad input ------------------------------------------------------------------------------


class KKPair:
    def __init__(self, prologue: bytes = b"prologue") -> None:
        self.i_priv, self.i_pub = generate_keypair()
        self.r_priv, self.r_pub = generate_keypair()
        self.prologue = prologue

    def initiator(self, rs: bytes | None = None, prologue: bytes | None = None) -> HandshakeState:
        return HandshakeState(
            "KK",
            True,
            self.prologue if prologue is None else prologue,
            s=self.i_priv,
            rs=self.r_pub if rs is None else rs,
        )

    def responder(self, rs: bytes | None = None, prologue: bytes | None = None) -> HandshakeState:
        return HandshakeState(
            "KK",
            False,
            self.prologue if prologue is None else prologue,
            s=self.r_priv,
            rs=self.i_pub if rs is None else rs,
        )


def _assert_no_key_material(exc: BaseException, *keys: bytes) -> None:
    text = str(exc)
    for key in keys:
        assert key.hex() not in text and repr(key) not in text


def test_kk_roundtrip_and_sizes() -> None:
    pair = KKPair()
    i, r = pair.initiator(), pair.responder()
    m1 = i.write_message(b"")
    assert len(m1) == DHLEN + 16
    assert r.read_message(m1) == b""
    m2 = r.write_message(b"hello")
    assert len(m2) == DHLEN + 5 + 16
    assert i.read_message(m2) == b"hello"
    assert i.complete and r.complete
    assert i.split() == r.split()
    assert i.remote_static == pair.r_pub and r.remote_static == pair.i_pub


def test_every_tampered_byte_of_message_1_is_rejected() -> None:
    pair = KKPair()
    m1 = pair.initiator().write_message(b"payload")
    for pos in range(len(m1)):
        bad = bytearray(m1)
        bad[pos] ^= 0x01
        r = pair.responder()
        with pytest.raises(HandshakeError):
            r.read_message(bytes(bad))


def test_tampered_message_2_is_rejected_and_kills_the_state() -> None:
    pair = KKPair()
    i, r = pair.initiator(), pair.responder()
    r.read_message(i.write_message())
    m2 = bytearray(r.write_message(b"x"))
    m2[-1] ^= 0x80
    with pytest.raises(HandshakeError, match="message 2 failed authentication") as info:
        i.read_message(bytes(m2))
    _assert_no_key_material(info.value, pair.i_priv, pair.r_priv)
    m2[-1] ^= 0x80  # even the genuine message is refused now
    with pytest.raises(HandshakeError, match="failed handshake"):
        i.read_message(bytes(m2))
    with pytest.raises(HandshakeError):
        i.split()


def test_wrong_responder_static_key() -> None:
    pair = KKPair()
    _, impostor_pub = generate_keypair()
    i = pair.initiator(rs=impostor_pub)
    r = pair.responder()
    with pytest.raises(HandshakeError, match="message 1 failed authentication") as info:
        r.read_message(i.write_message())
    _assert_no_key_material(info.value, pair.i_priv, pair.r_priv)


def test_impostor_responder_is_rejected_by_initiator() -> None:
    # Someone reaches the punched port first with their own key pair.
    pair = KKPair()
    impostor_priv, _ = generate_keypair()
    i = pair.initiator()
    fake = HandshakeState("KK", False, pair.prologue, s=impostor_priv, rs=pair.i_pub)
    with pytest.raises(HandshakeError, match="failed authentication"):
        fake.read_message(i.write_message())


def test_wrong_initiator_static_key() -> None:
    pair = KKPair()
    _, other_pub = generate_keypair()
    i, r = pair.initiator(), pair.responder(rs=other_pub)
    with pytest.raises(HandshakeError, match="failed authentication"):
        r.read_message(i.write_message())


def test_wrong_prologue() -> None:
    pair = KKPair()
    i = pair.initiator(prologue=b"session-1")
    r = pair.responder(prologue=b"session-2")
    with pytest.raises(HandshakeError, match="message 1 failed authentication"):
        r.read_message(i.write_message())


def test_truncated_messages() -> None:
    pair = KKPair()
    m1 = pair.initiator().write_message(b"abc")
    with pytest.raises(HandshakeError, match="too short: 31 bytes, need at least 48"):
        pair.responder().read_message(m1[:31])
    with pytest.raises(HandshakeError, match="too short: 0 bytes"):
        pair.responder().read_message(b"")
    with pytest.raises(HandshakeError, match="failed authentication"):
        pair.responder().read_message(m1[:-1])  # long enough, but the tag is wrong


def test_out_of_turn_and_after_completion() -> None:
    pair = KKPair()
    i, r = pair.initiator(), pair.responder()
    with pytest.raises(HandshakeError, match="write_message called out of turn"):
        r.write_message()
    with pytest.raises(HandshakeError, match="read_message called out of turn"):
        i.read_message(bytes(48))
    with pytest.raises(HandshakeError, match="before the handshake completed"):
        i.split()
    with pytest.raises(HandshakeError, match="not final"):
        _ = i.handshake_hash
    m1 = i.write_message()  # an out-of-turn call does not spoil the state
    with pytest.raises(HandshakeError, match="write_message called out of turn"):
        i.write_message()
    r.read_message(m1)
    i.read_message(r.write_message())
    for hs in (i, r):
        with pytest.raises(HandshakeError, match="after the handshake completed"):
            hs.write_message()
        with pytest.raises(HandshakeError, match="after the handshake completed"):
            hs.read_message(bytes(64))


def test_message_size_limit() -> None:
    pair = KKPair()
    overhead = DHLEN + 16
    i = pair.initiator()
    with pytest.raises(HandshakeError, match="over the 65535-byte"):
        i.write_message(bytes(MAX_MESSAGE - overhead + 1))
    m1 = i.write_message(bytes(MAX_MESSAGE - overhead))  # exactly at the limit is fine
    assert len(m1) == MAX_MESSAGE
    assert pair.responder().read_message(m1) == bytes(MAX_MESSAGE - overhead)
    with pytest.raises(HandshakeError, match="65536 bytes, over the 65535-byte"):
        pair.responder().read_message(m1 + b"\x00")


def test_low_order_ephemeral_is_rejected() -> None:
    pair = KKPair()
    # A valid-looking message 1 whose ephemeral is the all-zero (low-order) point.
    with pytest.raises(HandshakeError, match="low-order"):
        pair.responder().read_message(bytes(48))
    one = (1).to_bytes(32, "little")  # another small-order point
    with pytest.raises(HandshakeError, match="low-order"):
        pair.responder().read_message(one + bytes(16))


def test_low_order_remote_static_is_rejected() -> None:
    pair = KKPair()
    i = pair.initiator(rs=bytes(32))
    with pytest.raises(HandshakeError, match=r"DH 'es' in handshake message 1.*low-order"):
        i.write_message()


def test_key_validation() -> None:
    priv, pub = generate_keypair()
    with pytest.raises(ValueError, match="static key s must be 32 bytes, got 31"):
        HandshakeState("KK", True, b"", s=priv[:31], rs=pub)
    with pytest.raises(ValueError, match="remote static key rs must be 32 bytes, got 33"):
        HandshakeState("KK", True, b"", s=priv, rs=pub + b"\x00")
    with pytest.raises(ValueError, match="ephemeral key e must be 32 bytes"):
        HandshakeState("NN", True, b"", e=b"short")
    with pytest.raises(ValueError, match="needs the peer's static public key rs"):
        HandshakeState("KK", True, b"", s=priv)
    with pytest.raises(ValueError, match="needs a static key s"):
        HandshakeState("XX", False, b"")
    with pytest.raises(ValueError, match="rs given but the peer sends it"):
        HandshakeState("XX", True, b"", s=priv, rs=pub)
    with pytest.raises(ValueError, match="uses no static key"):
        HandshakeState("NN", True, b"", s=priv)
    with pytest.raises(ValueError, match="needs 1 psk"):
        HandshakeState("KKpsk2", True, b"", s=priv, rs=pub)
    with pytest.raises(ValueError, match="psk 0 must be 32 bytes, got 16"):
        HandshakeState("NNpsk0", True, b"", psks=[bytes(16)])
    with pytest.raises(ValueError, match="unsupported handshake pattern"):
        HandshakeState("NK1", True, b"")
    with pytest.raises(ValueError, match="psk9 is past"):
        HandshakeState("NNpsk9", True, b"", psks=[bytes(32)])
    with pytest.raises(ValueError, match="X25519 private key must be 32 bytes"):
        public_key(b"")
    assert public_key(priv) == pub


def test_psk_mismatch_is_rejected() -> None:
    pair = KKPair()
    i = HandshakeState("KKpsk0", True, b"", s=pair.i_priv, rs=pair.r_pub, psks=[bytes(32)])
    r = HandshakeState("KKpsk0", False, b"", s=pair.r_priv, rs=pair.i_pub, psks=[b"\x01" * 32])
    with pytest.raises(HandshakeError, match="failed authentication"):
        r.read_message(i.write_message())


def test_psk_mode_ephemeral_keys_the_first_payload() -> None:
    # In psk patterns "e" also calls MixKey, so NNpsk2's message 1 payload gets a tag.
    psk = os.urandom(32)
    i = HandshakeState("NNpsk2", True, b"", psks=[psk])
    m1 = i.write_message(b"secret")
    assert len(m1) == DHLEN + len(b"secret") + 16
    assert b"secret" not in m1
    with pytest.raises(HandshakeError, match="too short: 40 bytes, need at least 48"):
        HandshakeState("NNpsk2", False, b"", psks=[psk]).read_message(m1[:40])
    assert HandshakeState("NNpsk2", False, b"", psks=[psk]).read_message(m1) == b"secret"


def test_handshake_error_is_a_holepunch_error() -> None:
    assert issubclass(HandshakeError, HolepunchError)
    assert issubclass(DecryptError, HandshakeError)
    assert issubclass(NonceExhausted, HandshakeError)


# --- CipherState / HKDF -----------------------------------------------------------------------


def test_hkdf_matches_rfc5869_with_empty_info() -> None:
    # Noise's HKDF(ck, ikm, n) is RFC 5869 HKDF(salt=ck, info="", L=32*n).
    ck, ikm = os.urandom(32), os.urandom(40)
    for n in (2, 3):
        ref = HKDF(algorithm=hashes.SHA256(), length=32 * n, salt=ck, info=b"").derive(ikm)
        assert b"".join(hkdf(ck, ikm, n)) == ref
    with pytest.raises(ValueError):
        hkdf(ck, ikm, 4)


def test_cipherstate_reserved_nonce() -> None:
    key = os.urandom(32)
    tx, rx = CipherState(key, n=MAX_NONCE - 1), CipherState(key, n=MAX_NONCE - 1)
    ct = tx.encrypt_with_ad(b"ad", b"last message")
    assert rx.decrypt_with_ad(b"ad", ct) == b"last message"
    assert tx.n == rx.n == MAX_NONCE
    with pytest.raises(NonceExhausted):
        tx.encrypt_with_ad(b"ad", b"one too many")
    with pytest.raises(NonceExhausted):
        rx.decrypt_with_ad(b"ad", ct)
    with pytest.raises(ValueError):
        CipherState(key, n=2**64)


def test_cipherstate_failed_decrypt_keeps_nonce_and_ad_is_bound() -> None:
    key = os.urandom(32)
    tx, rx = CipherState(key), CipherState(key)
    ct = tx.encrypt_with_ad(b"header", b"record")
    with pytest.raises(DecryptError, match="nonce 0 failed authentication") as info:
        rx.decrypt_with_ad(b"other header", ct)
    _assert_no_key_material(info.value, key)
    assert rx.n == 0
    assert rx.decrypt_with_ad(b"header", ct) == b"record"
    assert rx.n == 1
    assert key.hex() not in repr(rx)


def test_cipherstate_nonce_layout() -> None:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    key = os.urandom(32)
    cs = CipherState(key, n=0x0102030405060708)
    ct = cs.encrypt_with_ad(b"", b"x")
    assert AESGCM(key).decrypt(bytes(4) + bytes(range(1, 9)), ct, b"") == b"x"


def test_rekey() -> None:
    key = os.urandom(32)
    new = rekey_key(key)
    assert len(new) == 32 and new != key
    assert rekey_key(key) == new  # deterministic
    cs = CipherState(key, n=7)
    cs.rekey()
    assert cs.k == new and cs.n == 7  # Rekey() keeps the nonce
    with pytest.raises(ValueError, match="rekey key must be 32 bytes"):
        rekey_key(key[:16])
    with pytest.raises(ValueError):
        CipherState().rekey()


def test_empty_cipherstate_passes_through() -> None:
    cs = CipherState()
    assert not cs.has_key()
    assert cs.encrypt_with_ad(b"ad", b"plain") == b"plain"
    assert cs.decrypt_with_ad(b"ad", b"plain") == b"plain"


# --- property tests -------------------------------------------------------------------------

_FIXED = KKPair()


def _fresh_responder(pattern: str) -> HandshakeState:
    p = _FIXED
    if pattern == "KK":
        return HandshakeState("KK", False, b"p", s=p.r_priv, rs=p.i_pub)
    if pattern in ("IK", "XX"):
        return HandshakeState(pattern, False, b"p", s=p.r_priv)
    if pattern == "KKpsk2":
        return HandshakeState("KKpsk2", False, b"p", s=p.r_priv, rs=p.i_pub, psks=[bytes(32)])
    return HandshakeState(pattern, False, b"p")


@settings(max_examples=300, deadline=None)
@given(
    pattern=st.sampled_from(["KK", "IK", "XX", "NN", "KKpsk2"]),
    data=st.binary(max_size=200),
)
def test_random_bytes_only_raise_handshake_error(pattern: str, data: bytes) -> None:
    r = _fresh_responder(pattern)
    try:
        payload = r.read_message(data)
    except HandshakeError:
        return
    # Only unauthenticated first messages can be accepted (NN, XX: e then a plaintext payload).
    assert pattern in ("NN", "XX")
    assert payload == data[DHLEN:]


@settings(max_examples=100, deadline=None)
@given(data=st.binary(max_size=200))
def test_random_bytes_as_message_2_only_raise_handshake_error(data: bytes) -> None:
    p = _FIXED
    i = HandshakeState("KK", True, b"p", s=p.i_priv, rs=p.r_pub)
    i.write_message()
    with pytest.raises(HandshakeError):
        i.read_message(data)


@settings(max_examples=50, deadline=None)
@given(payloads=st.lists(st.binary(max_size=300), min_size=2, max_size=2))
def test_kk_payload_roundtrip(payloads: list[bytes]) -> None:
    i, r = _FIXED.initiator(), _FIXED.responder()
    assert r.read_message(i.write_message(payloads[0])) == payloads[0]
    assert i.read_message(r.write_message(payloads[1])) == payloads[1]
    assert i.handshake_hash == r.handshake_hash
