"""Helpers shared by the benchmark driver and its worker processes.

Nothing here imports the engine, so the driver can format results without
loading it. POSIX only (``resource.getrusage``).
"""

from __future__ import annotations

import math
import os
import resource
import sys
from collections.abc import Sequence
from typing import Final

__all__ = [
    "GIB",
    "KIB",
    "MB",
    "MIB",
    "BenchError",
    "current_rss",
    "format_size",
    "peak_rss",
    "percentile",
]

KIB: Final = 1024
MIB: Final = 1024 * KIB
GIB: Final = 1024 * MIB
#: Throughput is reported in decimal megabytes per second.
MB: Final = 1_000_000


class BenchError(RuntimeError):
    """A benchmark step failed (a worker crashed, timed out or reported an error)."""


def peak_rss() -> int:
    """Peak resident set size of this process so far, in bytes (``ru_maxrss``)."""
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return int(maxrss) if sys.platform == "darwin" else int(maxrss) * KIB


def current_rss() -> int:
    """Resident set size right now, in bytes; falls back to the peak off Linux."""
    try:
        with open("/proc/self/statm", encoding="ascii") as fp:
            resident_pages = int(fp.read().split()[1])
    except (OSError, ValueError, IndexError):
        return peak_rss()
    return resident_pages * os.sysconf("SC_PAGE_SIZE")


def percentile(values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile of ``values`` (need not be sorted); NaN if empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def format_size(nbytes: int) -> str:
    """``1024`` -> ``"1 KiB"``; exact binary multiples only get a unit."""
    for unit, factor in (("GiB", GIB), ("MiB", MIB), ("KiB", KIB)):
        if nbytes >= factor and nbytes % factor == 0:
            return f"{nbytes // factor} {unit}"
    return f"{nbytes} B"
