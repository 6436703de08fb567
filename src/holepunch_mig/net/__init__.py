"""I/O drivers for the wire codecs: control channels, STUN, punching, record I/O, the tunnel."""
