"""QEMU live migration over the link: mux and handoff modes, proxies, QMP."""
