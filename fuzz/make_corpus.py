"""Regenerate the seed corpora under fuzz/corpus/<target>/ (deterministic, small files).

    python fuzz/make_corpus.py

Seeds are valid inputs (and a few near misses) for each target, so mutation starts from
the interesting parts of the format rather than from random bytes.
"""

from __future__ import annotations

import hashlib
import socket
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))

import fuzz_noise  # noqa: E402
import fuzz_records  # noqa: E402

from holepunch_mig.net.record_io import RecordWriter  # noqa: E402
from holepunch_mig.wire import messages  # noqa: E402
from holepunch_mig.wire.records import HEADER  # noqa: E402

CORPUS = HERE / "corpus"


def _write(target: str, seeds: list[bytes]) -> None:
    folder = CORPUS / target
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.iterdir():
        old.unlink()
    for seed in seeds:
        (folder / seed_name(seed)).write_bytes(seed)


def message_seeds() -> list[bytes]:
    key, session = "ab" * 32, "cd" * 16
    line = "candidate:1 1 tcp 2130706431 192.0.2.1 40000 typ host tcptype so"
    msgs = [
        messages.Offer(
            session=session,
            key=key,
            port=40000,
            candidates=[line],
            policy="direct",
            limits={"max_record": 1 << 20},
        ),
        messages.Answer(session=session, key=key, port=40001, candidates=[], limits={}),
        messages.Ping(seq=0),
        messages.Pong(seq=2),
        messages.Sync(round=1),
        messages.Nominate(round=1, link=1, handshake="ef" * 32),
        messages.RoundFailed(round=1, retry=True, reason="2 refused"),
        messages.Path(path="direct", reason="ok"),
        messages.Credit(bytes=4 << 20),
        messages.Result(ok=True, bytes=10, sha256=key, error=None),
        messages.Result(ok=False, bytes=0, sha256=None, error="boom"),
        messages.Abort(reason="stop"),
    ]
    encoded = [messages.encode(m) for m in msgs] + [b"\x02tunnel bytes"]
    seeds = [b"\x00" + e for e in encoded]  # decode path
    stream = b"".join(messages.frame(e) for e in encoded[2:6])
    seeds += [bytes([1 + 4 * c]) + stream for c in (0, 3, 15)]  # FrameDecoder, chunk sizes
    seeds.append(b"\x03" + messages.frame(b"\x01" + b"x" * 70))  # over the small limit
    seeds.append(b"\x01\x00\x00\x00\x00")  # zero-length frame
    return seeds


def candidate_seeds() -> list[bytes]:
    lines = [
        "candidate:1 1 tcp 2130706431 192.0.2.1 40000 typ host tcptype so",
        "1 1 TCP 1694498815 203.0.113.5 40000 typ srflx raddr 10.0.0.2 rport 40000 "
        "tcptype so generation 0",
        "candidate:g0123456789abcdef0123456789abcde 1 tcp 2130706431 2001:db8::1 9 "
        "typ host tcptype so",
        "candidate:p 1 tcp 1862270975 198.51.100.7 1 typ prflx tcptype so",
        "candidate:1 1 udp 2130706431 192.0.2.1 40000 typ host",
    ]
    endpoints = ["192.0.2.1:3478", "[2001:db8::1]:3478", "stun.example.net:3478"]
    return [b"\x00" + x.encode() for x in lines] + [b"\x06" + x.encode() for x in endpoints]


def record_seeds() -> list[bytes]:
    seeds = []
    for payload, max_record in (
        (b"hello records", 1024),
        (bytes(range(256)) + b"tail" * 11, 128),
        (b"", 1024),
    ):
        a, b = socket.socketpair()
        try:
            w = RecordWriter(a, fuzz_records.KEY, max_record=max_record)
            w.write_data(0, payload)
            w.end(0, len(payload), hashlib.sha256(payload).digest())
            w.close()
            a.shutdown(socket.SHUT_WR)
            wire = b""
            while chunk := b.recv(65536):
                wire += chunk
        finally:
            a.close()
            b.close()
        seeds += [bytes([mode]) + wire for mode in (0, 1, 3, 9)]
    seeds.append(b"\x04" + HEADER.pack(1, 0, 0, 1 << 20))  # maximal length, no body
    seeds.append(b"\x00" + HEADER.pack(3, 0, 0, 5000))  # ABORT over 4096
    return seeds


def noise_seeds() -> list[bytes]:
    payload = b"\x00\x00\x00\x01\x00\x00\x00\x01"
    i = fuzz_noise.initiator()
    m1 = i.write_message(payload)
    r = fuzz_noise.responder()
    r.read_message(m1)
    m2 = r.write_message(b"")
    # responder: read m1, write, split, hash; initiator: write, read m2, split, out of turn
    resp = bytes([2, 0, 0, len(m1)]) + m1 + bytes([1, 0, 2, 0, 3, 0])
    init = bytes([2, 1, 1, 8]) + payload + bytes([0, len(m2)]) + m2 + bytes([2, 0, 0, 0])
    return [b"\x00" + m1, b"\x01" + m2, resp, init, b"\x02\x01\x00\x05abcde"]


def upnp_seeds() -> list[bytes]:
    ssdp = (
        b"HTTP/1.1 200 OK\r\nST: urn:schemas-upnp-org:device:InternetGatewayDevice:1\r\n"
        b"USN: uuid:1::urn:schemas-upnp-org:device:InternetGatewayDevice:1\r\n"
        b"LOCATION: http://10.1.0.1:40000/rootDesc.xml\r\n\r\n"
    )
    desc = (
        b'<?xml version="1.0"?><root xmlns="urn:schemas-upnp-org:device-1-0">'
        b"<URLBase>http://10.1.0.1:40000/</URLBase><device><serviceList><service>"
        b"<serviceType>urn:schemas-upnp-org:service:WANIPConnection:1</serviceType>"
        b"<controlURL>/ctl/IPConn</controlURL></service></serviceList></device></root>"
    )
    envelope = b'<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/"><s:Body>'
    fault = envelope + (
        b"<s:Fault><detail><UPnPError><errorCode>718</errorCode><errorDescription>"
        b"ConflictInMappingEntry</errorDescription></UPnPError></detail></s:Fault>"
        b"</s:Body></s:Envelope>"
    )
    address = envelope + (
        b"<u:GetExternalIPAddressResponse><NewExternalIPAddress>198.51.100.10"
        b"</NewExternalIPAddress></u:GetExternalIPAddressResponse></s:Body></s:Envelope>"
    )
    http = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
    dtd = b'<!DOCTYPE r [<!ENTITY a "aaaa">]><root>&a;</root>'
    return [
        b"\x00" + ssdp,
        b"\x01" + http,
        b"\x02" + desc,
        b"\x02" + dtd,
        b"\x03" + fault,
        b"\x04" + address,
    ]


SEEDS = {
    "messages": message_seeds,
    "candidates": candidate_seeds,
    "records": record_seeds,
    "noise": noise_seeds,
    "upnp": upnp_seeds,
}


def seed_name(seed: bytes) -> str:
    return hashlib.sha1(seed).hexdigest()[:16]


def main() -> None:
    for target, seeds in SEEDS.items():
        _write(target, seeds())
    for target in sorted(p.name for p in CORPUS.iterdir()):
        files = list((CORPUS / target).iterdir())
        print(f"{target}: {len(files)} seeds, {sum(f.stat().st_size for f in files)} bytes")


if __name__ == "__main__":
    main()
