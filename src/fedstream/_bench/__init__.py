"""``fedstream bench``: the streaming benchmark, shipped inside the library.

Each scenario runs a sender and its receiver(s) as separate OS processes over
loopback TCP, and the same run measures the ceiling for that process layout
(raw trio ``send_all``/``receive_some`` throughput and a 64-byte trio
ping-pong), so every figure is reported both absolutely and as a ratio to
what trio itself manages on the same machine at the same moment.

Entry points: :func:`main` (what ``fedstream bench`` and
``benchmarks/run.py`` call) and ``python -m fedstream._bench.worker`` (the
worker processes it starts). See ``benchmarks/README.md``.
"""

from __future__ import annotations

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark command line (``--help`` lists the options).

    Returns 0 if every case completed, 1 if one could not run, 2 for a usage
    error. Missed performance targets are reported, not turned into a status.
    """
    # Imported here so that worker processes, which import this package on
    # their way to ``worker``, do not load the driver.
    from ._main import main as run

    return run(argv)
