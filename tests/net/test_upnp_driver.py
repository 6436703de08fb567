"""The UPnP-IGD driver on loopback: it gives up within its deadline when nothing answers,
and it refuses what a fake SSDP responder points it at (a loopback LOCATION is not a LAN
gateway).  The whole exchange with a real gateway is tests/lab/test_portmap_lab.py."""

from __future__ import annotations

import socket

import pytest
import trio

from holepunch_mig.net.portmap import request_mapping
from holepunch_mig.wire.portmap import PortMapError


async def test_no_answer_ends_at_the_deadline() -> None:
    began = trio.current_time()
    with trio.fail_after(3):
        with pytest.raises(PortMapError, match="no UPnP-IGD answer to SSDP from the gateway"):
            await request_mapping(45123, 60, gateway="127.0.0.1", timeout=0.6,
                                  protocols=("upnp-igd",))  # fmt: skip
    assert trio.current_time() - began < 2.0


async def test_each_protocol_says_why_it_failed() -> None:
    with trio.fail_after(3):
        with pytest.raises(PortMapError) as info:
            await request_mapping(45123, 60, gateway="127.0.0.1", timeout=0.6)
    text = str(info.value)
    assert "PCP/NAT-PMP" in text and "UPnP-IGD:" in text


async def test_a_location_off_the_lan_is_refused() -> None:
    """A responder on the gateway's address whose LOCATION is loopback: never fetched."""
    responder = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        await responder.bind(("127.0.0.1", 1900))
    except OSError:
        responder.close()
        pytest.skip("127.0.0.1:1900 is taken on this host")
    answer = (
        b"HTTP/1.1 200 OK\r\nST: urn:schemas-upnp-org:device:InternetGatewayDevice:1\r\n"
        b"USN: uuid:x\r\nLOCATION: http://127.0.0.1:1/rootDesc.xml\r\n\r\n"
    )

    async def serve() -> None:
        while True:
            data, peer = await responder.recvfrom(2048)
            if data.startswith(b"M-SEARCH"):
                await responder.sendto(answer, peer)

    with responder:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve)
            with trio.fail_after(3):
                with pytest.raises(PortMapError, match="not a private or link-local"):
                    await request_mapping(45123, 60, gateway="127.0.0.1", timeout=0.6,
                                          protocols=("upnp-igd",))  # fmt: skip
            nursery.cancel_scope.cancel()
