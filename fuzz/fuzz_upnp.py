"""Fuzz target: the UPnP-IGD codec (SSDP answers, HTTP responses, device descriptions,
SOAP responses).

Every parser must return a value or raise ``UpnpError``; whatever URL gets through must
still point at the gateway that answered (the SSRF guard), and no XML may expand.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

if __name__ == "__main__":
    import atheris

    with atheris.instrument_imports(include=["holepunch_mig"]):
        from holepunch_mig.wire import upnp
else:
    from holepunch_mig.wire import upnp

GATEWAY = "10.1.0.1"
LOCATION = upnp.HttpUrl(GATEWAY, 40000, "/rootDesc.xml")


def test_one_input(data: bytes) -> None:
    if not data:
        return
    mode, body = data[0] % 5, data[1:]
    try:
        if mode == 0:
            got = upnp.parse_ssdp_response(body, GATEWAY)
            assert got.location.host == GATEWAY, got
        elif mode == 1:
            code, out = upnp.parse_http_response(body, 1000)
            assert code >= 0 and len(out) <= 1000
        elif mode == 2:
            svc = upnp.parse_description(body, LOCATION)
            assert svc.control.host == GATEWAY and svc.service_type in upnp.SERVICE_TYPES
        elif mode == 3:
            upnp.parse_soap_response(500, body, "AddPortMapping")
        else:
            upnp.parse_external_ip(200, body)
    except upnp.UpnpError:
        return


if __name__ == "__main__":
    from _harness import main

    main(test_one_input)
