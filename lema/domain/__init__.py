"""The functional core: pure values and arithmetic, no I/O (see docs/architecture.md)."""
