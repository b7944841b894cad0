"""Run the fedstream benchmark from a source checkout: ``python benchmarks/run.py --help``.

A thin wrapper around :func:`fedstream._bench.main`, the same code that
``fedstream bench`` runs from an installed package. See ``README.md`` here.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

try:
    from fedstream._bench import main
except ImportError:  # not installed: use the checkout's src/
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from fedstream._bench import main

if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(main(sys.argv[1:]))
