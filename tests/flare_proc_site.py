"""A FLARE-style site in its own OS process, for ``test_flare.py``.

Usage::

    python tests/flare_proc_site.py SOURCE_DIR DEST_DIR

Runs a ``BlockingSite`` named ``server`` on a free loopback port with FLARE's
FileStreamer and ContainerStreamer registered on channel ``app`` and a
FileRetriever / ContainerRetriever serving SOURCE_DIR and one container.
Prints ``listening <url>`` once ready, then one JSON line per finished
receiving stream. Exits when its stdin is closed.
"""

from __future__ import annotations

import json
import sys
import threading
from typing import Any

from nvflare.apis.event_type import EventType
from nvflare.apis.streaming import StreamContextKey
from nvflare.app_common.streamers.container_retriever import ContainerRetriever
from nvflare.app_common.streamers.container_streamer import ContainerStreamer
from nvflare.app_common.streamers.file_retriever import FileRetriever
from nvflare.app_common.streamers.file_streamer import FileStreamer

from fedstream import BlockingSite

_lock = threading.Lock()


def report(record: dict[str, Any]) -> None:
    with _lock:
        print(json.dumps(record), flush=True)


def main() -> None:
    source_dir, dest_dir = sys.argv[1], sys.argv[2]
    with BlockingSite("server", listen="tcp://127.0.0.1:0", finalize_timeout=5.0) as site:
        FileStreamer.register_stream_processing(
            fl_ctx=site.new_context(),
            channel="app",
            topic="file",
            dest_dir=dest_dir,
            stream_done_cb=lambda ctx, fl_ctx: report(
                {
                    "file": FileStreamer.get_file_location(ctx),
                    "rc": ctx[StreamContextKey.RC],
                    "peer": fl_ctx.get_peer_context().get_identity_name(),
                }
            ),
        )
        ContainerStreamer.register_stream_processing(
            fl_ctx=site.new_context(),
            channel="app",
            topic="container",
            stream_done_cb=lambda ctx, fl_ctx: report(
                {"container": sorted(ContainerStreamer.get_result(ctx).items())}
            ),
        )
        files = FileRetriever(source_dir=source_dir)
        containers = ContainerRetriever()
        containers.add_container("params", {"lr": 0.5, "rounds": 3})
        files.handle_event(EventType.START_RUN, site.new_context())
        containers.handle_event(EventType.START_RUN, site.new_context())
        print(f"listening {site.address}", flush=True)
        sys.stdin.read()


if __name__ == "__main__":
    main()
