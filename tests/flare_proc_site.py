"""A FLARE-style site in its own OS process, for ``test_flare.py``.

Usage::

    python tests/flare_proc_site.py SOURCE_DIR DEST_DIR [--tensors]

Runs a ``BlockingSite`` named ``server`` on a free loopback port with, on
channel ``app``, FLARE's FileStreamer (topic ``file``), ContainerStreamer
(``container``) and LogStreamer (``log``, idle timeout 5 s; ``idle``, idle
timeout 0.5 s) registered, and a FileRetriever / ContainerRetriever serving
SOURCE_DIR and one container. With ``--tensors`` (needs torch) it also runs
FLARE's TensorConsumerFactory on the tensor streamer's channel and topic and
saves each received set of tensors with ``torch.save`` to DEST_DIR/<task id>.pt.

Prints ``listening <url>`` once ready, then one JSON line per finished
receiving stream, and one per log chunk received (``{"log": text}``) as it
arrives. Exits when its stdin is closed.
"""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path
from typing import Any

from nvflare.apis.event_type import EventType
from nvflare.apis.streaming import StreamContextKey
from nvflare.app_common.streamers.container_retriever import ContainerRetriever
from nvflare.app_common.streamers.container_streamer import ContainerStreamer
from nvflare.app_common.streamers.file_retriever import FileRetriever
from nvflare.app_common.streamers.file_streamer import FileStreamer
from nvflare.app_common.streamers.log_streamer import LogStreamer

from fedstream import BlockingSite

_lock = threading.Lock()


def report(record: dict[str, Any]) -> None:
    with _lock:
        print(json.dumps(record), flush=True)


def register_tensor_consumer(site: BlockingSite, dest_dir: str) -> None:
    import torch
    from nvflare.app_opt.tensor_stream.consumer import TensorConsumerFactory
    from nvflare.app_opt.tensor_stream.types import TENSORS_CHANNEL, TensorCustomKeys, TensorTopics

    def done(ctx: Any, fl_ctx: Any) -> None:
        task_id = fl_ctx.get_custom_prop(TensorCustomKeys.TASK_ID)
        path = Path(dest_dir) / f"{task_id}.pt"
        torch.save(fl_ctx.get_custom_prop(TensorCustomKeys.SAFE_TENSORS_PROP_KEY), path)
        report({"tensors": str(path), "rc": ctx[StreamContextKey.RC], "task_id": task_id})

    site.register_stream_processing(
        TENSORS_CHANNEL, TensorTopics.TASK_RESULT, TensorConsumerFactory(), stream_done_cb=done
    )


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
        LogStreamer.register_stream_processing(
            fl_ctx=site.new_context(),
            channel="app",
            topic="log",
            chunk_received_cb=lambda data, ctx, fl_ctx: report({"log": data.decode()}),
            stream_done_cb=lambda ctx, fl_ctx: report({"log-done": ctx[StreamContextKey.RC]}),
            idle_timeout=5.0,
        )
        LogStreamer.register_stream_processing(
            fl_ctx=site.new_context(),
            channel="app",
            topic="idle",
            stream_done_cb=lambda ctx, fl_ctx: report({"idle-done": ctx[StreamContextKey.RC]}),
            idle_timeout=0.5,
        )
        if "--tensors" in sys.argv[3:]:
            register_tensor_consumer(site, dest_dir)
        files = FileRetriever(source_dir=source_dir)
        containers = ContainerRetriever()
        containers.add_container("params", {"lr": 0.5, "rounds": 3})
        files.handle_event(EventType.START_RUN, site.new_context())
        containers.handle_event(EventType.START_RUN, site.new_context())
        print(f"listening {site.address}", flush=True)
        sys.stdin.read()


if __name__ == "__main__":
    main()
