"""One log record per interval for events a peer (or the OS) can make happen in floods.

A peer decides how often a site refuses its connections, and ``accept()``
failing for lack of descriptors repeats every 0.1 s: logging each one would
let anybody fill the operator's logs. Such warnings go through a
:class:`RateLimit`, which lets one through per interval and counts the rest,
so the next one that goes through can say how many there were.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

__all__ = ["RateLimit"]


class RateLimit:
    """Allows one event per ``interval`` seconds and counts the ones in between.

    ``clock`` is ``time.monotonic`` by default: log records are about wall
    time, and a filter on a logger may run outside any trio run.
    """

    def __init__(self, interval: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self._clock = clock
        self._last = -math.inf
        self._suppressed = 0

    def allow(self) -> int | None:
        """Record one event: ``None`` if it is to be suppressed (it is counted),
        else the number suppressed since the last one allowed."""
        now = self._clock()
        if now - self._last < self.interval:
            self._suppressed += 1
            return None
        suppressed, self._suppressed, self._last = self._suppressed, 0, now
        return suppressed
