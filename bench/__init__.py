"""TPB's benchmark harness: `make bench` (python -m bench, as root)."""
