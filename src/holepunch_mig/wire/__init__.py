"""Sans-IO codecs: bytes in, typed events out; no sockets, threads or trio here."""
