"""Benchmarks: one module per question, `python -m bench.<name>`; each prints ratios measured side by side."""
