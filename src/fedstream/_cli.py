"""The ``fedstream`` command line: ``demo``, ``serve``, ``send`` and ``bench``."""

from __future__ import annotations

import argparse
import hashlib
import logging
import math
import os
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from ._api import ConsumerFactory, ObjectConsumer, ObjectProducer, StreamContextKey
from ._context import FLContext
from ._engine import Site, open_site
from ._errors import FedstreamError
from ._shareable import ReturnCode, Shareable, make_reply
from ._version import __version__

__all__ = ["main", "parse_size"]

logger = logging.getLogger(__name__)

_UNITS = {
    "": 1,
    "B": 1,
    "K": 1000,
    "KB": 1000,
    "KIB": 1024,
    "M": 1000**2,
    "MB": 1000**2,
    "MIB": 1024**2,
    "G": 1000**3,
    "GB": 1000**3,
    "GIB": 1024**3,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str) -> int:
    """Parse ``"256KiB"``, ``"4MiB"``, ``"1.5GB"`` or ``"1000"`` into bytes."""
    match = _SIZE.match(text)
    unit = match.group(2).upper() if match else ""
    if match is None or unit not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 64KiB, 4MiB, 1GiB)")
    return int(float(match.group(1)) * _UNITS[unit])


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


# --------------------------------------------------------------------- demo


@dataclass
class _Received:
    seqs: list[int] = field(default_factory=list)
    nbytes: int = 0
    digest: Any = field(default_factory=hashlib.sha256)
    rc: str | None = None


class _DemoConsumer(ObjectConsumer):
    def __init__(self, record: _Received) -> None:
        self.record = record

    async def consume(
        self, shareable: Shareable, stream_ctx: dict[str, Any], fl_ctx: FLContext
    ) -> tuple[bool, Shareable | None]:
        data: bytes = shareable["data"]
        self.record.seqs.append(shareable["seq"])
        self.record.nbytes += len(data)
        self.record.digest.update(data)
        return True, make_reply(ReturnCode.OK)

    async def finalize(self, stream_ctx: dict[str, Any], fl_ctx: FLContext) -> None:
        self.record.rc = stream_ctx[StreamContextKey.RC]


class _DemoFactory(ConsumerFactory):
    def __init__(self) -> None:
        self.records: list[_Received] = []

    def get_consumer(self, stream_ctx: dict[str, Any], fl_ctx: FLContext) -> ObjectConsumer:
        record = _Received()
        self.records.append(record)
        return _DemoConsumer(record)


class _DemoProducer(ObjectProducer):
    def __init__(self, count: int, size: int) -> None:
        self.count = count
        self.sent = 0
        self.payload = os.urandom(size)
        self.digest = hashlib.sha256()
        self.replies: list[dict[str, str]] = []

    async def produce(
        self, stream_ctx: dict[str, Any], fl_ctx: FLContext
    ) -> tuple[Shareable | None, float]:
        if self.sent == self.count:
            return None, 0
        obj = Shareable({"seq": self.sent, "data": self.payload})
        self.digest.update(self.payload)
        self.sent += 1
        return obj, 30.0

    async def process_replies(
        self, replies: dict[str, Shareable], stream_ctx: dict[str, Any], fl_ctx: FLContext
    ) -> Any:
        self.replies.append({site: str(r.get_return_code()) for site, r in replies.items()})
        return None


async def _demo(args: argparse.Namespace) -> int:
    names = [f"site-{i}" for i in range(1, args.clients + 1)]
    total = args.objects * args.size
    print(
        f"fedstream {__version__} demo: server + {len(names)} clients on {args.listen}, "
        f"{args.objects} objects x {_human(args.size)} to each"
    )
    async with open_site("server", listen=args.listen) as server:
        factories = {name: _DemoFactory() for name in names}
        async with trio.open_nursery() as nursery:
            clients: list[Site] = []
            for name in names:
                client: Site = await nursery.start(
                    _run_client, name, server.address, factories[name]
                )
                clients.append(client)
            with trio.fail_after(30):
                await server.wait_for_peers(names)
            producer = _DemoProducer(args.objects, args.size)
            started = time.perf_counter()
            rc, result = await server.stream_objects(
                "demo", "weights", {"round": 1}, names, producer, FLContext(identity_name="server")
            )
            elapsed = time.perf_counter() - started
            nursery.cancel_scope.cancel()
    expected = list(range(args.objects))
    ok = rc == ReturnCode.OK
    print(f"\nstream ended: rc={rc} result={result!r} in {elapsed:.3f} s")
    print(
        f"{'site':<10} {'objects':>8} {'bytes':>12} {'in order':>9} {'sha256 ok':>10} "
        f"{'finalize rc':>12}"
    )
    for name in names:
        record = factories[name].records[0] if factories[name].records else _Received()
        in_order = record.seqs == expected
        same = record.digest.hexdigest() == producer.digest.hexdigest()
        ok = ok and in_order and same and record.rc == ReturnCode.OK
        print(
            f"{name:<10} {len(record.seqs):>8} {record.nbytes:>12} {in_order!s:>9} "
            f"{same!s:>10} {record.rc!s:>12}"
        )
    rate = total * len(names) / elapsed if elapsed > 0 else math.inf
    print(
        f"\nthroughput: {_human(rate)}/s delivered in total "
        f"({args.objects * len(names) / elapsed:.0f} objects/s)"
    )
    print("demo", "OK" if ok else "FAILED")
    return 0 if ok else 1


async def _run_client(
    name: str,
    server: str,
    factory: ConsumerFactory,
    *,
    task_status: trio.TaskStatus[Site] = trio.TASK_STATUS_IGNORED,
) -> None:
    async with open_site(name, connect=[server]) as site:
        site.register_stream_processing("demo", "*", factory)
        task_status.started(site)
        await trio.sleep_forever()


# ------------------------------------------------------------ serve and send


class _FileConsumer(ObjectConsumer):
    """Writes the chunks of one file stream under ``out``."""

    def __init__(self, out: Path | None) -> None:
        self.out = out
        self.file: Any = None
        self.path: Path | None = None
        self.nbytes = 0

    def consume(
        self, shareable: Shareable, stream_ctx: dict[str, Any], fl_ctx: FLContext
    ) -> tuple[bool, Shareable | None]:
        if "file" not in shareable:
            print(
                f"object from {stream_ctx.get(StreamContextKey.CHANNEL)}/"
                f"{stream_ctx.get(StreamContextKey.TOPIC)}: keys {sorted(shareable)}"
            )
            return True, None
        if self.file is None and self.out is not None:
            name = Path(str(shareable["file"])).name
            self.path = self.out / name
            self.file = self.path.open("wb")
        data: bytes = shareable["data"]
        if self.file is not None:
            self.file.write(data)
        self.nbytes += len(data)
        return True, None

    def finalize(self, stream_ctx: dict[str, Any], fl_ctx: FLContext) -> None:
        if self.file is not None:
            self.file.close()
        peer = fl_ctx.get_peer_context()
        who = peer.get_identity_name() if peer else "?"
        where = f" -> {self.path}" if self.path else ""
        print(
            f"stream from {who} ended: {stream_ctx[StreamContextKey.RC]}, "
            f"{_human(self.nbytes)}{where}",
            flush=True,
        )


class _FileFactory(ConsumerFactory):
    def __init__(self, out: Path | None) -> None:
        self.out = out

    def get_consumer(self, stream_ctx: dict[str, Any], fl_ctx: FLContext) -> ObjectConsumer:
        return _FileConsumer(self.out)


async def _serve(args: argparse.Namespace) -> int:
    out = Path(args.out) if args.out else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    async with open_site(args.name, listen=args.listen, connect=args.connect) as site:
        site.register_stream_processing("*", "*", _FileFactory(out))
        print(
            f"site {site.name!r} listening on {', '.join(site.addresses) or '(nothing)'}",
            flush=True,
        )
        await trio.sleep_forever()


class _FileProducer(ObjectProducer):
    def __init__(self, path: Path, chunk: int, timeout: float) -> None:
        self.path = path
        self.chunk = chunk
        self.timeout = timeout
        self.file = path.open("rb")
        self.offset = 0
        self.done = False
        self.failed: dict[str, str] = {}

    def produce(
        self, stream_ctx: dict[str, Any], fl_ctx: FLContext
    ) -> tuple[Shareable | None, float]:
        if self.done:
            return None, 0
        data = self.file.read(self.chunk)
        # An empty file still travels as one empty object, so it gets created.
        if not data and self.offset:
            return None, 0
        self.done = len(data) < self.chunk
        obj = Shareable({"file": self.path.name, "offset": self.offset, "data": data})
        self.offset += len(data)
        return obj, self.timeout

    def process_replies(
        self, replies: dict[str, Shareable], stream_ctx: dict[str, Any], fl_ctx: FLContext
    ) -> Any:
        bad = {
            s: str(r.get_return_code())
            for s, r in replies.items()
            if r.get_return_code() != ReturnCode.OK
        }
        if bad:
            self.failed.update(bad)
            return False
        return None


async def _send(args: argparse.Namespace) -> int:
    status = 0
    async with open_site(args.name, connect=[args.connect]) as site:
        with trio.fail_after(args.wait):
            await site.wait_for_peers(args.to)
        for path in map(Path, args.files):
            producer = _FileProducer(path, args.chunk, args.timeout)
            started = time.perf_counter()
            try:
                rc, _ = await site.stream_objects(
                    args.channel, args.topic, {"file": path.name}, args.to, producer, FLContext()
                )
            finally:
                producer.file.close()
            elapsed = time.perf_counter() - started
            print(
                f"{path}: {rc} {_human(producer.offset)} in {elapsed:.2f} s"
                + (f" failed: {producer.failed}" if producer.failed else "")
            )
            if rc != ReturnCode.OK:
                status = 1
    return status


# --------------------------------------------------------------------- main


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedstream", description=__doc__)
    parser.add_argument("--version", action="version", version=f"fedstream {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="log more (-v info, -vv debug)"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="run a server and clients locally and stream to them")
    demo.add_argument("--clients", type=int, default=4, help="client sites (default 4)")
    demo.add_argument("--objects", type=int, default=16, help="objects per client (default 16)")
    demo.add_argument(
        "--size",
        type=parse_size,
        default=parse_size("1MiB"),
        help="bytes per object, e.g. 256KiB (default 1MiB)",
    )
    demo.add_argument(
        "--listen", default="tcp://127.0.0.1:0", help="server URL (default tcp://127.0.0.1:0)"
    )

    serve = sub.add_parser("serve", help="run a site that receives streams until interrupted")
    serve.add_argument("name", help="this site's name")
    serve.add_argument("--listen", action="append", default=[], help="URL to listen on")
    serve.add_argument("--connect", action="append", default=[], help="URL to dial")
    serve.add_argument("--out", help="directory for received files")

    send = sub.add_parser("send", help="stream files to connected sites")
    send.add_argument("name", help="this site's name")
    send.add_argument("files", nargs="+", help="files to send")
    send.add_argument("--connect", required=True, help="URL of the site to dial")
    send.add_argument("--to", action="append", required=True, help="target site (repeatable)")
    send.add_argument("--channel", default="files")
    send.add_argument("--topic", default="upload")
    send.add_argument(
        "--chunk",
        type=parse_size,
        default=parse_size("1MiB"),
        help="bytes per object (default 1MiB)",
    )
    send.add_argument("--timeout", type=float, default=60.0, help="per-object timeout")
    send.add_argument(
        "--wait", type=float, default=30.0, help="seconds to wait for the targets to connect"
    )

    sub.add_parser("bench", help="run the benchmark harness (see fedstream bench --help)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fedstream`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        # The harness has its own options (see ``fedstream bench --help``).
        from ._bench import main as bench_main

        return bench_main(argv[1:])
    args = _parser().parse_args(argv)
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    runners = {"demo": _demo, "serve": _serve, "send": _send}
    try:
        return trio.run(runners[args.command], args)
    except KeyboardInterrupt:
        return 130
    except (FedstreamError, OSError, TimeoutError) as exc:
        print(f"fedstream {args.command}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
