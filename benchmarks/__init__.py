"""Ratio benchmarks R1-R7 of headstart (see ../shared/reference/performance-anchors.md).

    python -m benchmarks [--quick] [--json OUT]

Each ratio is dimensionless and measured side by side in one run, on one machine, on the same
synthetic photo-like JPEGs, so it transfers across machines; the absolute figures behind every
ratio are recorded next to it. See benchmarks/README.md for the latest table.
"""
from __future__ import annotations
