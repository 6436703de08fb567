"""One connection's life: negotiation, path decision, link, resume, diagnosis, public API."""
