"""``tether bench``: how fast Tether is, on every deployment mode (see docs/benchmarks.md)."""
