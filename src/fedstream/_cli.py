"""The ``fedstream`` command line: ``serve``, ``send``, ``demo``, ``bench`` and ``provision``.

Every argument is checked before anything connects: a usage error prints one
line and exits with status 2. Ctrl-C and SIGTERM shut the site down
gracefully (streams in flight end with ``SERVICE_UNAVAILABLE`` on both sides,
partial files stay for a resume) and print one line, never a traceback.
"""

from __future__ import annotations

import argparse
import enum
import hashlib
import json
import logging
import math
import os
import re
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import trio
from tqdm import tqdm

from ._api import ConsumerFactory, ObjectConsumer, ObjectProducer, StreamContextKey
from ._context import FLContext
from ._engine import Site, open_site
from ._errors import ConnectionLostError, FedstreamError, HandshakeError, SiteClosedError
from ._provision import add_tls_arguments, tls_from_args
from ._shareable import ReturnCode, Shareable, make_reply
from ._streamers import FileResult, NamePolicy, ReceivedFile, iter_directory
from ._transport import transport_schemes
from ._transport._base import split_url
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

#: Exit statuses.
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_SIGINT = 130
EXIT_SIGTERM = 143


class CliError(Exception):
    """Ends the command with one line on stderr and ``status``."""

    def __init__(self, message: str, status: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.status = status


# ------------------------------------------------------ argument checking


def parse_size(text: str) -> int:
    """Parse ``"256KiB"``, ``"4MiB"``, ``"1.5GB"`` or ``"1000"`` into bytes."""
    match = _SIZE.match(text)
    unit = match.group(2).upper() if match else ""
    if match is None or unit not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 64KiB, 4MiB, 1GiB)")
    return int(float(match.group(1)) * _UNITS[unit])


def _positive_size(text: str) -> int:
    size = parse_size(text)
    if size <= 0:
        raise argparse.ArgumentTypeError(f"must be at least 1 byte, not {text!r}")
    return size


#: Largest ``send --chunk``: the sender holds one chunk of a file in memory
#: per object, and the receiver must accept it as one object.
MAX_CHUNK = 64 * 1024**2
#: ``serve``'s default ``--max-object-size``: the largest ``--chunk`` plus room
#: for the object's other fields. (The library default, 16 GiB, suits objects
#: held whole; a file stream never needs more than one chunk per object.)
DEFAULT_SERVE_MAX_OBJECT_SIZE = MAX_CHUNK + 1024**2


def _chunk(text: str) -> int:
    size = _positive_size(text)
    if size > MAX_CHUNK:
        raise argparse.ArgumentTypeError(f"at most {_human(MAX_CHUNK)}, not {text!r}")
    return size


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, not {text!r}")
    return value


def _url(text: str, *, need_port: bool) -> str:
    if "://" not in text:
        raise argparse.ArgumentTypeError(
            f"{text!r} has no scheme: write it as tcp://{text.lstrip('/')}"
        )
    try:
        scheme, host, port = split_url(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if scheme not in transport_schemes():
        known = ", ".join(transport_schemes())
        raise argparse.ArgumentTypeError(f"no transport for scheme {scheme!r} (known: {known})")
    if scheme in ("tcp", "tls") and need_port and not port:
        raise argparse.ArgumentTypeError(f"{text!r} needs a port, e.g. tcp://{host}:8700")
    return text


def _listen_url(text: str) -> str:
    return _url(text, need_port=False)


def _connect_url(text: str) -> str:
    return _url(text, need_port=True)


def _site_name(text: str) -> str:
    if not text or len(text) > 255 or not text.isprintable():
        raise argparse.ArgumentTypeError(f"not a valid site name: {text!r}")
    return text


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


async def _demo(args: argparse.Namespace, stopper: _Stopper) -> int:
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


# ------------------------------------------------------------------ signals


@dataclass
class _Stopper:
    """What the signal watcher stops: the command's site once open, else its scope."""

    scope: trio.CancelScope
    site: Site | None = None
    signum: int | None = None
    stopped: trio.Event = field(default_factory=trio.Event)


async def _watch_signals(
    stopper: _Stopper, command: str, *, task_status: trio.TaskStatus[None]
) -> None:
    """First SIGINT/SIGTERM: graceful shutdown. A second one: exit at once."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        task_status.started()
        async with trio.open_nursery() as nursery:
            async for signum in signals:
                status = EXIT_SIGINT if signum == signal.SIGINT else EXIT_SIGTERM
                if stopper.signum is not None:
                    print(f"fedstream {command}: stopped", file=sys.stderr, flush=True)
                    sys.stdout.flush()
                    os._exit(status)
                stopper.signum = signum
                name = "interrupted" if signum == signal.SIGINT else "terminated"
                print(f"fedstream {command}: {name}, shutting down", file=sys.stderr, flush=True)
                stopper.stopped.set()
                if stopper.site is None:
                    stopper.scope.cancel()
                else:
                    # Ends every stream in flight with SERVICE_UNAVAILABLE,
                    # bounded by finalize_timeout; the command then returns.
                    nursery.start_soon(stopper.site.shutdown_streamer)


async def _run_command(
    fn: Callable[[argparse.Namespace, _Stopper], Awaitable[int]], args: argparse.Namespace
) -> int:
    async with trio.open_nursery() as nursery:
        stopper = _Stopper(scope=trio.CancelScope())
        await nursery.start(_watch_signals, stopper, args.command)
        status = EXIT_FAILED
        with stopper.scope:
            try:
                status = await fn(args, stopper)
            except Exception:
                # After a signal, errors are the shutdown's consequences
                # (a dial cut short, a closed site): the signal is the outcome.
                if stopper.signum is None:
                    raise
        nursery.cancel_scope.cancel()
    if stopper.signum == signal.SIGINT:
        return EXIT_SIGINT
    if stopper.signum == signal.SIGTERM:
        return EXIT_OK if args.command == "serve" else EXIT_SIGTERM
    return status


def _leaves(exc: BaseException) -> list[BaseException]:
    inner = getattr(exc, "exceptions", None)
    if inner is None:
        return [exc]
    return [leaf for e in inner for leaf in _leaves(e)]


# -------------------------------------------------------------- progress


def _bar(total: int, desc: str, *, quiet: bool, initial: int = 0) -> tqdm[Any]:
    """A byte progress bar on stderr, off when stderr is not a terminal or with --quiet."""
    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        file=sys.stderr,
        disable=quiet or not sys.stderr.isatty(),
        dynamic_ncols=True,
        leave=False,
    )


def _say(args: argparse.Namespace, line: str) -> None:
    """A human line on stdout, unless --json or --quiet asked for none."""
    if not args.json and not args.quiet:
        tqdm.write(line, file=sys.stdout)
        sys.stdout.flush()


def _emit_json(record: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(record) + "\n")
    sys.stdout.flush()


# ------------------------------------------------------------------ serve


async def _keep_connected(
    site: Site, url: str, args: argparse.Namespace, *, task_status: trio.TaskStatus[None]
) -> None:
    """Dial ``url`` until it answers once, then report losses and returns.

    The site itself re-dials a link it dialed (``open_site``'s ``reconnect``
    option, on by default), with backoff, after the hub restarts.
    """
    delay = 0.25
    complained = False
    task_status.started()
    while True:
        try:
            peer = await site.connect(url)
        except SiteClosedError:
            return
        except (ConnectionLostError, HandshakeError) as exc:
            if not complained:
                print(f"fedstream serve: {exc}; retrying", file=sys.stderr, flush=True)
                complained = True
            await trio.sleep(delay)
            delay = min(delay * 2, 5.0)
            continue
        _say(args, f"connected to {peer!r} at {url}")
        break
    while True:
        # Site has no event for a peer leaving; a bounded poll is enough here.
        while peer in site.peers and not site.closed:  # noqa: ASYNC110
            await trio.sleep(0.2)
        if site.closed:
            return
        _say(args, f"lost {peer!r}; reconnecting to {url}")
        try:
            await site.wait_for_peers([peer])
        except SiteClosedError:
            return
        _say(args, f"connected to {peer!r} at {url}")


class _ServeReport:
    """Progress bars and one line (or JSON object) per received file."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.bars: dict[tuple[str, str], tqdm[Any]] = {}

    def progress(self, peer: str, name: str, received: int, size: int) -> None:
        bar = self.bars.get((peer, name))
        if bar is None:
            bar = _bar(size, f"{name} <- {peer}", quiet=self.args.quiet, initial=received)
            self.bars[(peer, name)] = bar
        bar.update(received - bar.n)

    def done(self, got: ReceivedFile) -> None:
        bar = self.bars.pop((got.peer, got.name), None)
        if bar is not None:
            bar.close()
        if self.args.json:
            _emit_json(
                {
                    "event": "received",
                    "peer": got.peer,
                    "name": got.name,
                    "rc": got.rc,
                    "path": str(got.path) if got.path else None,
                    "size": got.size,
                    "sha256": got.sha256,
                    "resumed_from": got.resumed_from,
                    "kept_partial": got.kept_partial,
                }
            )
            return
        if got.path is not None:
            where = f"-> {got.path} (sha256 {got.sha256})"
        elif got.kept_partial:
            where = f"partial {_human(got.size)} kept for a resume"
        else:
            where = "nothing kept"
        _say(self.args, f"{got.name} from {got.peer}: {got.rc} {_human(got.size)} {where}")


async def _serve(args: argparse.Namespace, stopper: _Stopper) -> int:
    report = _ServeReport(args)
    async with open_site(
        args.name, listen=args.listen, tls=args.tls, max_object_size=args.max_object_size
    ) as site:
        stopper.site = site
        site.register_file_receiver(
            args.channel,
            "*",
            args.out,
            on_file=report.done,
            name_policy=args.name_policy,
            on_progress=report.progress,
        )
        where = ", ".join(site.addresses) or "(not listening)"
        if args.json:
            _emit_json({"event": "ready", "site": site.name, "addresses": site.addresses})
        _say(args, f"site {site.name!r} listening on {where}, saving files to {args.out}")
        async with trio.open_nursery() as nursery:
            for url in args.connect:
                await nursery.start(_keep_connected, site, url, args)
            await stopper.stopped.wait()
            nursery.cancel_scope.cancel()
    return EXIT_OK


# ------------------------------------------------------------------- send


def _transfer_id(args: argparse.Namespace, path: Path) -> str:
    """The same command on the same unchanged file gets the same id, so it resumes."""
    if args.transfer_id:
        base = f"{args.transfer_id}\0{path}"
    else:
        st = path.stat()
        base = f"{args.name}\0{path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}"
    return hashlib.sha256(base.encode()).hexdigest()[:32]


async def _connect_all(site: Site, args: argparse.Namespace) -> list[str]:
    """Dial every --connect URL, retrying (bounded by --wait) while it is not reachable."""
    names = []
    deadline = trio.current_time() + args.wait
    for url in args.connect:
        delay = 0.1
        while True:
            try:
                names.append(await site.connect(url))
                break
            except (ConnectionLostError, HandshakeError) as exc:
                if trio.current_time() + delay > deadline:
                    raise CliError(
                        f"cannot connect to {url} within {args.wait:g} s: {exc}"
                    ) from None
                await trio.sleep(delay)
                delay = min(delay * 2, 2.0)
    return names


def _file_record(path: Path, result: FileResult, seconds: float) -> dict[str, Any]:
    return {
        "path": str(path),
        "name": result.name,
        "rc": result.rc,
        "ok": result.ok,
        "size": result.size,
        "sent": result.sent,
        "resumed_from": result.resumed_from,
        "sha256": result.sha256,
        "targets": result.targets,
        "seconds": round(seconds, 3),
    }


async def _send(args: argparse.Namespace, stopper: _Stopper) -> int:
    paths = [Path(p) for p in args.files]
    sizes = {p: _size_of(p) for p in paths}
    dirs = {p for p in paths if _is_dir(p)}
    total = sum(sizes.values())
    records: list[dict[str, Any]] = []
    started = time.perf_counter()
    async with open_site(args.name, tls=args.tls) as site:
        stopper.site = site
        connected = await _connect_all(site, args)
        missing = [t for t in args.to if t not in connected]
        if missing:
            raise CliError(
                f"--to {', '.join(map(repr, missing))}: not a site this command connects to "
                f"(--connect reached {', '.join(map(repr, connected))}); fedstream has no "
                f"relay, so --connect the receiving site itself",
                EXIT_USAGE,
            )
        bar = _bar(total, "sending", quiet=args.quiet)
        done = 0
        try:
            for path in paths:
                if stopper.signum is not None:
                    break

                def progress(offset: int, base: int = done) -> None:
                    bar.update(base + offset - bar.n)

                t0 = time.perf_counter()
                try:
                    results = await _send_path(site, args, path, path in dirs, progress)
                except (OSError, ValueError) as exc:
                    records.append(
                        {"path": str(path), "rc": "ERROR", "ok": False, "error": str(exc)}
                    )
                    _say(args, f"{path}: failed: {exc}")
                    continue
                except SiteClosedError:
                    break
                elapsed = time.perf_counter() - t0
                if not results:  # an empty directory: nothing to send, and not a failure
                    note = "empty directory, nothing to send"
                    records.append(
                        {"path": str(path), "rc": ReturnCode.OK, "ok": True, "sent": 0,
                         "note": note}
                    )  # fmt: skip
                    _say(args, f"{path}: {note}")
                for result in results:
                    records.append(_file_record(path, result, elapsed / len(results)))
                    _say(args, _describe(path, result, elapsed / len(results)))
                done += sizes[path]
        finally:
            bar.close()
    elapsed = time.perf_counter() - started
    ok = bool(records) and all(r["ok"] for r in records) and len(records) >= len(paths)
    if args.json:
        sent = sum(r.get("sent", 0) for r in records)
        _emit_json(
            {
                "site": args.name,
                "targets": args.to,
                "ok": ok,
                "files": records,
                "bytes": total,
                "sent": sent,
                "seconds": round(elapsed, 3),
                "rate": round(sent / elapsed) if elapsed > 0 else None,
            }
        )
    return EXIT_OK if ok else EXIT_FAILED


async def _send_path(
    site: Site,
    args: argparse.Namespace,
    path: Path,
    is_dir: bool,
    progress: Callable[[int], None],
) -> list[FileResult]:
    options: dict[str, Any] = {
        "transfer_id": _transfer_id(args, path),
        "chunk_size": args.chunk,
        "object_timeout": args.timeout,
        "progress": progress,
    }
    if is_dir:
        return await site.stream_directory(args.channel, args.topic, args.to, path, **options)
    return [await site.stream_file(args.channel, args.topic, args.to, path, **options)]


def _describe(path: Path, result: FileResult, seconds: float) -> str:
    rate = result.sent / seconds if seconds > 0 else math.inf
    resumed = f", resumed at {_human(result.resumed_from)}" if result.resumed_from else ""
    failed = {t: rc for t, rc in result.targets.items() if rc != ReturnCode.OK}
    status = "OK" if result.ok else f"{result.rc} {failed}" if failed else result.rc
    amount = (
        _human(result.size)
        if result.ok
        else f"{_human(result.resumed_from + result.sent)} of {_human(result.size)}"
    )
    digest = f" sha256 {result.sha256}" if result.ok else ""
    return (
        f"{result.name}: {status} {amount} in {seconds:.2f} s ({_human(rate)}/s{resumed}){digest}"
    )


def _is_dir(path: Path) -> bool:
    return path.is_dir()


def _size_of(path: Path) -> int:
    if path.is_dir():
        return sum(f.stat().st_size for f, _ in iter_directory(path))
    return path.stat().st_size


def _check_files(parser: argparse.ArgumentParser, files: list[str]) -> None:
    problems = []
    for name in files:
        path = Path(name)
        if not path.exists():
            problems.append(f"no such file: {name}")
        elif not (path.is_file() or path.is_dir()):
            problems.append(f"not a regular file or directory: {name}")
        elif not os.access(path, os.R_OK):
            problems.append(f"cannot read: {name}")
    if problems:
        parser.error("; ".join(problems))


def _check_tls(args: argparse.Namespace) -> None:
    """A ``tls://`` URL needs ``--cert``/``--key``, and the certificate must load
    with its key: checked here, so a misconfiguration is a usage error before
    anything listens or dials.

    Raises:
        ValueError: a tls:// URL without ``--cert``, or a certificate that
            does not go with its key.
        OSError: a file cannot be read (``ssl.SSLError`` for a bad CA file).
    """
    urls = [*getattr(args, "listen", []), *args.connect]
    tls_urls = [url for url in urls if split_url(url)[0] == "tls"]
    if tls_urls and args.tls is None:
        raise ValueError(f"{tls_urls[0]} needs --cert and --key (and --ca for mutual TLS)")
    if args.tls is not None:
        args.tls.server_context()
        args.tls.client_context()


# ------------------------------------------------------------------- main

_DESCRIPTION = """\
Stream files and objects between sites (NVIDIA FLARE's streaming API on trio).
Run 'fedstream COMMAND --help' for a command's options.
"""

_EPILOG = """\
-v/--verbose and --log-level may go anywhere on the command line.
exit status: 0 done, 1 a transfer failed or a site could not be reached,
2 usage error, 130 interrupted (Ctrl-C), 143 send stopped by SIGTERM
(serve exits 0 on SIGTERM after a graceful shutdown).
"""


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line, with status 2."""

    commands: dict[str, argparse.ArgumentParser]

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _LogLevel(str, enum.Enum):
    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


def _common() -> _Parser:
    common = _Parser(add_help=False)
    common.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=argparse.SUPPRESS,
        help="log more (-v info, -vv debug)",
    )
    common.add_argument(
        "--log-level",
        choices=[level.value for level in _LogLevel],
        default=argparse.SUPPRESS,
        help="log level (default warning)",
    )
    return common


def _parser() -> _Parser:
    common = _common()
    parser = _Parser(
        prog="fedstream",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        parents=[common],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"fedstream {__version__}")
    sub = parser.add_subparsers(title="commands", dest="command", required=True, metavar="COMMAND")
    parser.commands = {}

    def command(name: str, help: str, description: str) -> argparse.ArgumentParser:
        parser.commands[name] = sub.add_parser(
            name,
            help=help,
            description=description,
            parents=[common],
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        return parser.commands[name]

    demo = command(
        "demo",
        "run a server and clients locally and stream to them",
        "Run a server and client sites on loopback and stream objects to them.",
    )
    demo.add_argument("--clients", type=_positive_int, default=4, help="client sites (default 4)")
    demo.add_argument(
        "--objects", type=_positive_int, default=16, help="objects per client (default 16)"
    )
    demo.add_argument(
        "--size",
        type=_positive_size,
        default=parse_size("1MiB"),
        help="bytes per object, e.g. 256KiB (default 1MiB)",
    )
    demo.add_argument(
        "--listen",
        type=_listen_url,
        default="tcp://127.0.0.1:0",
        help="server URL (default tcp://127.0.0.1:0)",
    )

    serve = command(
        "serve",
        "run a site that receives files until interrupted",
        "Run a site that receives files into --out until Ctrl-C or SIGTERM.\\n\\n"
        "A file is written to a hidden partial file next to its final name and renamed\\n"
        "into place only once its SHA-256 matches; an interrupted transfer keeps its\\n"
        "partial file, and the same send command run again resumes from it.",
    )
    serve.add_argument("name", type=_site_name, help="this site's name")
    serve.add_argument(
        "--listen",
        action="append",
        type=_listen_url,
        default=[],
        metavar="URL",
        help="URL to listen on, e.g. tcp://0.0.0.0:8700 (repeatable)",
    )
    serve.add_argument(
        "--connect",
        action="append",
        type=_connect_url,
        default=[],
        metavar="URL",
        help="URL of a site to dial and keep dialing after it restarts (repeatable)",
    )
    serve.add_argument(
        "--out", type=Path, default=Path("."), help="directory for received files (default .)"
    )
    serve.add_argument(
        "--name-policy",
        choices=[p.value for p in NamePolicy],
        default=NamePolicy.OVERWRITE.value,
        help="when a received file's name exists: overwrite it atomically (default) "
        "or store the new one as 'NAME (1).EXT'",
    )
    serve.add_argument("--channel", default="files", help="channel to receive on (default files)")
    serve.add_argument(
        "--max-object-size",
        type=_positive_size,
        default=DEFAULT_SERVE_MAX_OBJECT_SIZE,
        metavar="SIZE",
        help=f"largest object accepted, i.e. the largest sender --chunk plus a little "
        f"(default {_human(DEFAULT_SERVE_MAX_OBJECT_SIZE)})",
    )
    serve.add_argument("--json", action="store_true", help="one JSON object per event on stdout")
    serve.add_argument("-q", "--quiet", action="store_true", help="no progress bars, no lines")

    send = command(
        "send",
        "send files and directories to sites this command connects to directly",
        "Send files and directories (recursively) to the sites named by --to.\\n\\n"
        "Every --to site must be one that this command dials with --connect: there is\\n"
        "no relay through a hub. Run again after an interruption, the same command\\n"
        "resumes each file from what the receiver already holds.",
    )
    send.add_argument("name", type=_site_name, help="this site's name")
    send.add_argument("files", nargs="+", metavar="FILE", help="files or directories to send")
    send.add_argument(
        "--connect",
        action="append",
        type=_connect_url,
        required=True,
        metavar="URL",
        help="URL of a receiving site to dial (repeatable)",
    )
    send.add_argument(
        "--to",
        action="append",
        type=_site_name,
        required=True,
        metavar="SITE",
        help="name of a site reached by --connect to send to (repeatable)",
    )
    send.add_argument("--channel", default="files", help="channel (default files)")
    send.add_argument("--topic", default="upload", help="topic (default upload)")
    send.add_argument(
        "--chunk",
        type=_chunk,
        default=parse_size("1MiB"),
        help=f"file bytes per object (default 1MiB, at most {_human(MAX_CHUNK)}; held in "
        "memory once per object, and receivers refuse objects above their max object size)",
    )
    send.add_argument(
        "--timeout",
        type=_seconds,
        default=60.0,
        help="seconds without progress before a receiver is given up on (default 60)",
    )
    send.add_argument(
        "--wait",
        type=_seconds,
        default=10.0,
        help="seconds to keep trying to reach each --connect URL (default 10)",
    )
    send.add_argument(
        "--transfer-id",
        help="name this transfer (default: derived from the site name, path, size and "
        "modification time, so the same command resumes)",
    )
    send.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    send.add_argument(
        "-q", "--quiet", action="store_true", help="no progress bar and no per-file lines"
    )

    add_tls_arguments(serve)
    add_tls_arguments(send)
    command("bench", "run the benchmark harness", "See fedstream bench --help.")
    command(
        "provision",
        "make a CA and a certificate and key per site",
        "See fedstream provision --help.",
    )
    return parser


def _log_level(args: argparse.Namespace) -> int:
    if getattr(args, "log_level", None):
        return int(getattr(logging, args.log_level.upper()))
    verbose = getattr(args, "verbose", 0) or 0
    return [logging.WARNING, logging.INFO, logging.DEBUG][min(verbose, 2)]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fedstream`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    bench = _bench_index(argv)
    if bench is not None:
        # The harness has its own options (see ``fedstream bench --help``).
        from ._bench import main as bench_main

        args = _common().parse_args(argv[:bench])
        logging.basicConfig(level=_log_level(args))
        return bench_main(argv[bench + 1 :])
    if argv[:1] == ["provision"]:
        from ._provision import main as provision_main

        return provision_main(argv[1:])
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=_log_level(args), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if args.command in ("serve", "send"):
        try:
            args.tls = tls_from_args(args)
            _check_tls(args)
        except (ValueError, OSError) as exc:
            parser.commands[args.command].error(str(exc))
    if args.command == "send":
        _check_files(parser.commands["send"], args.files)
        repeated = sorted({t for t in args.to if args.to.count(t) > 1})
        if repeated:
            parser.commands["send"].error(
                f"--to {', '.join(map(repr, repeated))} given more than once"
            )
    if args.command == "serve" and not (args.listen or args.connect):
        parser.commands["serve"].error("serve needs --listen URL, --connect URL, or both")
    runners: dict[str, Callable[[argparse.Namespace, _Stopper], Awaitable[int]]] = {
        "demo": _demo,
        "serve": _serve,
        "send": _send,
    }
    try:
        return trio.run(_run_command, runners[args.command], args)
    except BaseException as exc:  # turned into one line and a status, or re-raised
        return _report(args.command, exc)


def _bench_index(argv: list[str]) -> int | None:
    """Where ``bench`` is the command, after the global logging options only."""
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--log-level":
            i += 2
        elif re.fullmatch(r"-v+|--verbose|--log-level=.*", arg):
            i += 1
        else:
            return i if arg == "bench" else None
    return None


def _report(command: str, exc: BaseException) -> int:
    leaves = _leaves(exc)
    if any(isinstance(e, KeyboardInterrupt) for e in leaves):
        print(f"fedstream {command}: interrupted", file=sys.stderr)
        return EXIT_SIGINT
    if any(isinstance(e, SystemExit) for e in leaves):
        raise exc
    first = leaves[0]
    if isinstance(first, CliError):
        print(f"fedstream {command}: {first}", file=sys.stderr)
        return first.status
    if isinstance(first, (FedstreamError, OSError)):
        print(f"fedstream {command}: {type(first).__name__}: {first}", file=sys.stderr)
        return EXIT_FAILED
    raise exc


if __name__ == "__main__":
    sys.exit(main())
