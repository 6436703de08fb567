"""The `holepunch-mig` command: one module per command family."""
