"""A receiving site in its own OS process, for ``test_engine_processes.py``.

Usage::

    python tests/proc_site.py NAME CONNECT_URL OUT_FILE [CERT KEY CA]

Registers a consumer for every topic on channel ``proc``, then dials
``CONNECT_URL`` as ``NAME`` (registering first, so no stream can arrive
before the consumer exists). Each consumed object and each session's
finalize rc is appended to ``OUT_FILE`` as one JSON line and flushed at
once, so the lines written before a SIGKILL survive it. Runs until killed.
With CERT KEY CA, the site uses them for a ``tls://`` CONNECT_URL.
"""

from __future__ import annotations

import json
import sys
import threading
from typing import IO, Any

import trio

from fedstream import (
    ConsumerFactory,
    FLContext,
    ObjectConsumer,
    Shareable,
    StreamContextKey,
    TLSConfig,
    open_site,
)

CHANNEL = "proc"


class Journal:
    """Thread-safe JSON-lines writer (sync callbacks run in worker threads)."""

    def __init__(self, out: IO[str]) -> None:
        self._out = out
        self._lock = threading.Lock()

    def write(self, record: dict[str, Any]) -> None:
        with self._lock:
            self._out.write(json.dumps(record) + "\n")
            self._out.flush()


class JournalConsumer(ObjectConsumer):
    def __init__(self, journal: Journal) -> None:
        self.journal = journal

    def consume(
        self, shareable: Shareable, stream_ctx: dict[str, Any], fl_ctx: FLContext
    ) -> tuple[bool, Shareable | None]:
        seq = shareable["seq"]
        blob = shareable.get("blob", b"")
        intact = blob == bytes([seq % 251]) * len(blob)
        self.journal.write({"seq": seq, "len": len(blob), "intact": intact})
        return True, None

    def finalize(self, stream_ctx: dict[str, Any], fl_ctx: FLContext) -> None:
        self.journal.write({"finalize": stream_ctx[StreamContextKey.RC]})


class JournalFactory(ConsumerFactory):
    def __init__(self, journal: Journal) -> None:
        self.journal = journal

    def get_consumer(self, stream_ctx: dict[str, Any], fl_ctx: FLContext) -> JournalConsumer:
        return JournalConsumer(self.journal)


async def main(name: str, url: str, out_path: str, *tls_files: str) -> None:
    tls = TLSConfig(*tls_files) if tls_files else None
    with open(out_path, "a", encoding="utf-8") as out:
        journal = Journal(out)
        async with open_site(name, heartbeat_interval=0.25, peer_timeout=2.0, tls=tls) as site:
            site.register_stream_processing(CHANNEL, "*", JournalFactory(journal))
            await site.connect(url)
            await trio.sleep_forever()


if __name__ == "__main__":
    if len(sys.argv) not in (4, 7):
        sys.exit(__doc__)
    trio.run(main, *sys.argv[1:])
