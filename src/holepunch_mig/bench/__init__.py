"""The benchmark suite behind `holepunch-mig bench`."""
