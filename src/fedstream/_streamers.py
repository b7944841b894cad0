"""Files, directories and containers as streams, on top of ``stream_objects``.

A file travels as one stream of small objects::

    {"fs": "open", "tid": ..., "name": "dir/file", "size": N}
    {"fs": "data", "off": offset, "data": bytes}          (one per chunk)
    {"fs": "end", "sha256": hex digest of the whole content}

The receiver answers ``open`` with how many bytes of this transfer it
already holds and their SHA-256 (``off``, ``prefix``). The sender checks that
prefix against its own file and starts at the smallest offset that every
target can continue from; the offset of the first ``data`` object is where a
receiver continues (it truncates anything beyond it). ``end`` is accepted
only when the receiver holds exactly ``size`` bytes whose SHA-256 matches.

Receiving, the bytes go to a hidden partial file next to the final one,
``.NAME.KEY.fedstream-part`` (KEY is derived from the sending site, the
transfer id and the name, so two streams never share a partial file), with a
small JSON record beside it. ``finalize`` runs on every ending and decides:
ended ``OK`` and verified, the partial file is renamed into place; ended by
an interruption (connection lost, abort, timeout, shutdown), the partial file
and its record stay, so the same transfer id resumes from them; ended by bad
data (hash mismatch, offset gap, size overrun), both are removed. Nothing
is ever written under the final name except by that one rename.

Containers (``dict``, ``list``, ``set``) travel one entry per object, so the
sender never encodes the whole container at once.
"""

from __future__ import annotations

import enum
import hashlib
import json
import logging
import os
import posixpath
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import trio

from ._api import ConsumerFactory, ObjectConsumer, ObjectProducer, StreamContextKey
from ._context import FLContext
from ._shareable import ReservedHeaderKey, ReturnCode, Shareable, make_reply
from ._wire import decode_object, encode_object

if TYPE_CHECKING:
    from ._engine import Site

__all__ = [
    "DEFAULT_FILE_CHUNK",
    "DEFAULT_OBJECT_TIMEOUT",
    "ContainerResult",
    "FileResult",
    "NamePolicy",
    "ReceivedContainer",
    "ReceivedFile",
    "check_relative_name",
    "register_container_receiver",
    "register_file_receiver",
    "stream_container",
    "stream_directory",
    "stream_file",
]

logger = logging.getLogger(__name__)

#: Bytes of file content per object.
DEFAULT_FILE_CHUNK: Final = 1024 * 1024
#: Seconds without progress before a target is timed out (per object).
DEFAULT_OBJECT_TIMEOUT: Final = 60.0
#: Longest relative name accepted from a peer.
MAX_NAME_LENGTH: Final = 4096
#: How long a new stream waits for an older stream of the same transfer to end.
SAME_TRANSFER_WAIT: Final = 10.0

_PART_SUFFIX: Final = ".fedstream-part"
_STATE_SUFFIX: Final = ".fedstream-state"

#: ``progress(offset)``: bytes of the file the receivers now hold.
ProgressCallback = Callable[[int], Any]
#: ``on_progress(peer, name, received, size)`` on a receiving site.
ReceiveProgress = Callable[[str, str, int, int], Any]


class NamePolicy(str, enum.Enum):
    """What a file receiver does when the final name already exists.

    Either way the final name only ever holds a complete, verified file: the
    partial file is renamed onto it in one atomic step.
    """

    #: Replace the existing file atomically (``os.replace``); of two
    #: concurrent transfers of one name, the one that ends last wins.
    OVERWRITE = "overwrite"
    #: Keep the existing file; store the new one as ``NAME (1).EXT``,
    #: ``NAME (2).EXT``, ... (claimed with ``os.link``, so never clobbered).
    SUFFIX = "suffix"


# ----------------------------------------------------------------- results


@dataclass(frozen=True)
class FileResult:
    """How one file stream ended on the sending side."""

    #: The stream's return code (``stream_objects``'s rc).
    rc: str
    #: The relative name the receivers were given.
    name: str
    size: int
    #: SHA-256 (hex) of the whole content, as sent.
    sha256: str
    #: Bytes the receivers already held and that were not sent again.
    resumed_from: int
    #: Bytes of content sent in this stream.
    sent: int
    #: Each target's return code (``OK`` once it verified the whole file).
    targets: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.rc == ReturnCode.OK and all(rc == ReturnCode.OK for rc in self.targets.values())


@dataclass(frozen=True)
class ContainerResult:
    rc: str
    entries: int
    targets: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.rc == ReturnCode.OK and all(rc == ReturnCode.OK for rc in self.targets.values())


@dataclass(frozen=True)
class ReceivedFile:
    """How one file stream ended on the receiving side (given to ``on_file``)."""

    peer: str
    name: str
    rc: str
    #: Where the file now is; ``None`` unless it was verified and placed.
    path: Path | None
    size: int
    sha256: str | None
    resumed_from: int
    #: ``True`` when the partial file was kept for a later resume.
    kept_partial: bool


@dataclass(frozen=True)
class ReceivedContainer:
    peer: str
    rc: str
    #: The rebuilt container; ``None`` unless the stream ended ``OK``.
    container: dict[Any, Any] | list[Any] | set[Any] | None
    entries: int


# ------------------------------------------------------------ name checks


def check_relative_name(name: object) -> str:
    """Return ``name`` if it is a safe relative POSIX path, else raise ``ValueError``.

    Refused: non-strings, empty names, absolute paths, ``.`` and ``..``
    components, empty components, backslashes and control characters.
    """
    if not isinstance(name, str) or not name or len(name) > MAX_NAME_LENGTH:
        raise ValueError(f"file name must be a non-empty string, not {name!r:.100}")
    if name.startswith("/") or "\\" in name or not name.isprintable():
        raise ValueError(f"file name must be a relative path: {name!r:.100}")
    parts = name.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"file name has an empty, '.' or '..' component: {name!r:.100}")
    return name


def _inside(root: Path, path: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
    except ValueError:
        return False
    return True


# ------------------------------------------------------------ file sending


class _FileProducer(ObjectProducer):
    def __init__(
        self,
        path: Path,
        name: str,
        tid: str,
        chunk: int,
        timeout: float,
        progress: ProgressCallback | None,
    ) -> None:
        self.path = path
        self.name = name
        self.tid = tid
        self.chunk = chunk
        self.timeout = timeout
        self.progress = progress
        self.file = path.open("rb")
        self.size = os.fstat(self.file.fileno()).st_size
        self.digest: Any = hashlib.sha256()
        self.state = "open"
        self.offset = 0
        self.start = 0
        self.sent = 0
        self.targets: dict[str, str] = {}
        self.sha256 = ""

    def close(self) -> None:
        self.file.close()

    async def produce(
        self, stream_ctx: dict[str, Any], fl_ctx: FLContext
    ) -> tuple[Shareable | None, float]:
        if self.state == "open":
            return Shareable(fs="open", tid=self.tid, name=self.name, size=self.size), self.timeout
        if self.state == "data" and self.offset < self.size:
            data = await trio.to_thread.run_sync(self._read)
            if not data:  # the file shrank while being sent
                raise OSError(f"{self.path} shrank to {self.offset} bytes while being sent")
            obj = Shareable(fs="data", off=self.offset, data=data)
            self.offset += len(data)
            self.sent += len(data)
            return obj, self.timeout
        if self.state == "data":
            self.state = "end"
            self.sha256 = self.digest.hexdigest()
            return Shareable(fs="end", sha256=self.sha256), self.timeout
        return None, 0

    def _read(self) -> bytes:
        data = self.file.read(min(self.chunk, self.size - self.offset))
        self.digest.update(data)
        return data

    async def process_replies(
        self, replies: dict[str, Shareable], stream_ctx: dict[str, Any], fl_ctx: FLContext
    ) -> Any:
        for target, reply in replies.items():
            self.targets[target] = str(reply.get_return_code(ReturnCode.OK))
        if self.state == "open":
            await trio.to_thread.run_sync(self._choose_start, replies)
            self.state = "data"
        elif self.state == "data" and self.progress is not None:
            self.progress(self.offset)
        if all(rc != ReturnCode.OK for rc in self.targets.values()):
            return False  # every target failed: nothing left to send to
        return None

    def _choose_start(self, replies: dict[str, Shareable]) -> None:
        """Find the largest offset every OK target can continue from, checking prefixes."""
        offers: dict[str, tuple[int, str]] = {}
        for target, reply in replies.items():
            if reply.get_return_code(ReturnCode.OK) != ReturnCode.OK:
                continue
            off, prefix = reply.get("off", 0), reply.get("prefix", "")
            if isinstance(off, int) and 0 < off <= self.size and isinstance(prefix, str):
                offers[target] = (off, prefix)
            else:
                offers[target] = (0, "")
        wanted = sorted({off for off, _ in offers.values() if off > 0})
        snapshots: dict[int, Any] = {0: hashlib.sha256()}
        digest = hashlib.sha256()
        position = 0
        for off in wanted:
            while position < off:
                data = self.file.read(min(self.chunk, off - position))
                if not data:
                    break
                digest.update(data)
                position += len(data)
            if position == off:
                snapshots[off] = digest.copy()
        good = [
            off
            for off, prefix in offers.values()
            if off in snapshots and (off == 0 or snapshots[off].hexdigest() == prefix)
        ]
        start = min(good, default=0) if len(good) == len(offers) else 0
        self.start = self.offset = start
        self.digest = snapshots[start].copy()
        self.file.seek(start)
        if self.progress is not None:
            self.progress(start)


def _default_tid() -> str:
    return uuid.uuid4().hex


async def stream_file(
    site: Site,
    channel: str,
    topic: str,
    targets: Sequence[str],
    path: str | os.PathLike[str],
    *,
    name: str | None = None,
    transfer_id: str | None = None,
    chunk_size: int = DEFAULT_FILE_CHUNK,
    object_timeout: float = DEFAULT_OBJECT_TIMEOUT,
    progress: ProgressCallback | None = None,
    fl_ctx: FLContext | None = None,
) -> FileResult:
    """Stream one file to ``targets``; see :meth:`fedstream.Site.stream_file`."""
    source = Path(path)
    name = check_relative_name(source.name if name is None else name)
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, not {chunk_size}")
    if not object_timeout > 0:
        raise ValueError(f"object_timeout must be positive, not {object_timeout}")
    tid = transfer_id or _default_tid()
    producer = await trio.to_thread.run_sync(
        _FileProducer, source, name, tid, chunk_size, object_timeout, progress
    )
    try:
        rc, _ = await site.stream_objects(
            channel, topic, {"fs": "file", "name": name}, list(targets), producer, fl_ctx
        )
    finally:
        producer.close()
    if rc != ReturnCode.OK:
        for target, target_rc in producer.targets.items():
            if target_rc == ReturnCode.OK:
                producer.targets[target] = rc
    return FileResult(
        rc=rc,
        name=name,
        size=producer.size,
        sha256=producer.sha256,
        resumed_from=producer.start,
        sent=producer.sent,
        targets=dict(producer.targets),
    )


def iter_directory(root: Path) -> Iterator[tuple[Path, str]]:
    """Yield ``(file, relative name)`` for every regular file under ``root``, sorted.

    Relative names start with ``root``'s own name. Symbolic links to
    directories are not followed.
    """
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        for entry in sorted(files):
            full = Path(folder) / entry
            if full.is_file():
                rel = full.relative_to(root).as_posix()
                yield full, posixpath.join(root.name, rel)


def _file_tid(tid: str, rel: str) -> str:
    """A file's transfer id within a directory transfer: derived from both, so the
    same transfer resumes, and of bounded length however deep the path (the
    receiver takes at most 256 characters)."""
    return hashlib.sha256(f"{tid}\0{rel}".encode()).hexdigest()


async def stream_directory(
    site: Site,
    channel: str,
    topic: str,
    targets: Sequence[str],
    path: str | os.PathLike[str],
    *,
    transfer_id: str | None = None,
    chunk_size: int = DEFAULT_FILE_CHUNK,
    object_timeout: float = DEFAULT_OBJECT_TIMEOUT,
    progress: ProgressCallback | None = None,
    fl_ctx: FLContext | None = None,
) -> list[FileResult]:
    """Stream every file under a directory, one stream each; see ``Site.stream_directory``."""
    root = Path(path)
    if not await trio.to_thread.run_sync(root.is_dir):
        raise NotADirectoryError(f"not a directory: {root}")
    tid = transfer_id or _default_tid()
    files = await trio.to_thread.run_sync(lambda: list(iter_directory(root)))
    results = []
    done = 0
    for file, rel in files:

        def step(n: int, base: int = done) -> None:
            if progress is not None:
                progress(base + n)

        result = await stream_file(
            site,
            channel,
            topic,
            targets,
            file,
            name=rel,
            transfer_id=_file_tid(tid, rel),
            chunk_size=chunk_size,
            object_timeout=object_timeout,
            progress=step,
            fl_ctx=fl_ctx,
        )
        results.append(result)
        done += result.size
    return results


# ---------------------------------------------------------- file receiving


def _bad(message: str) -> tuple[bool, Shareable]:
    return False, make_reply(ReturnCode.BAD_REQUEST_DATA, {ReservedHeaderKey.ERROR: message})


def _sha256_of(path: Path, length: int) -> Any:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        left = length
        while left > 0:
            data = f.read(min(left, DEFAULT_FILE_CHUNK))
            if not data:
                break
            digest.update(data)
            left -= len(data)
    return digest


class _FileReceiver(ObjectConsumer):
    """One incoming file stream; see the module docstring for the rules."""

    def __init__(self, factory: _FileReceiverFactory, peer: str) -> None:
        self.factory = factory
        self.peer = peer
        self.name = ""
        self.key = ""
        self.size = 0
        self.have = 0
        self.resumed_from = 0
        self.first_data = True
        self.digest: Any = None
        self.file: Any = None
        self.final: Path | None = None
        self.part: Path | None = None
        self.state: Path | None = None
        self.verified = False
        self.corrupt = False
        self.sha256: str | None = None

    async def consume(
        self, shareable: Shareable, stream_ctx: dict[str, Any], fl_ctx: FLContext
    ) -> tuple[bool, Shareable | None]:
        kind = shareable.get("fs")
        if kind == "open" and self.part is None:
            return await self._open(shareable)
        if self.part is None:
            return _bad("a file stream must start with an 'open' object")
        if kind == "data":
            return await self._data(shareable)
        if kind == "end":
            return await self._end(shareable)
        self.corrupt = True
        return _bad(f"unexpected object in a file stream: {kind!r:.40}")

    async def _open(self, obj: Shareable) -> tuple[bool, Shareable | None]:
        tid, size = obj.get("tid"), obj.get("size")
        try:
            self.name = check_relative_name(obj.get("name"))
        except ValueError as exc:
            logger.warning("file stream from %s refused: %s", self.peer, exc)
            return _bad(str(exc))
        if not isinstance(tid, str) or not 0 < len(tid) <= 256:
            return _bad("transfer id must be a string of 1 to 256 characters")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            return _bad(f"size must be a non-negative integer, not {size!r:.40}")
        root = self.factory.directory
        final = root / self.name
        if not _inside(root, final.parent) or (final.is_symlink() and not _inside(root, final)):
            logger.warning("file stream from %s refused: %r leaves %s", self.peer, self.name, root)
            return _bad(f"{self.name!r} leads outside the receiving directory")
        if final.name.endswith((_PART_SUFFIX, _STATE_SUFFIX)):
            return _bad(f"{self.name!r} ends like fedstream's own partial files")
        if final.is_dir():
            return _bad(f"{self.name!r} is a directory on the receiving site")
        key = hashlib.sha256(f"{self.peer}\0{tid}\0{self.name}".encode()).hexdigest()[:24]
        if not await self.factory.claim(key):
            message = f"transfer {tid!r} of {self.name!r} from {self.peer} is already running"
            error = {ReservedHeaderKey.ERROR: message}
            return False, make_reply(ReturnCode.SERVICE_UNAVAILABLE, error)
        self.key = key
        self.final = final
        self.part = final.parent / f".{final.name}.{self.key}{_PART_SUFFIX}"
        self.state = final.parent / f".{final.name}.{self.key}{_STATE_SUFFIX}"
        self.size = size
        try:
            prefix = await trio.to_thread.run_sync(self._open_partial, root, tid)
        except OSError as exc:
            logger.warning("file stream from %s: cannot open %s: %s", self.peer, self.part, exc)
            self.part = None
            self.factory.release(self.key)
            error = {ReservedHeaderKey.ERROR: str(exc)}
            return False, make_reply(ReturnCode.EXECUTION_EXCEPTION, error)
        self.resumed_from = self.have
        reply = make_reply(ReturnCode.OK)
        reply["off"] = self.have
        reply["prefix"] = prefix
        if self.have:
            logger.info("resuming %s from %s at byte %d", self.name, self.peer, self.have)
        self.factory.report(self.peer, self.name, self.have, self.size)
        return True, reply

    def _open_partial(self, root: Path, tid: str) -> str:
        assert self.part is not None
        assert self.state is not None
        assert self.final is not None
        self.final.parent.mkdir(parents=True, exist_ok=True)
        if not _inside(root, self.final.parent):  # a symlink raced in
            raise OSError(f"{self.final.parent} leads outside {root}")
        record = {"peer": self.peer, "tid": tid, "name": self.name, "size": self.size}
        try:
            previous = json.loads(self.state.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            previous = None
        flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
        fd = os.open(self.part, flags, 0o666)
        self.file = os.fdopen(fd, "r+b")
        have = os.fstat(fd).st_size
        if previous != record or have > self.size:
            have = 0
            self.file.truncate(0)
            tmp = self.state.with_name(self.state.name + ".tmp")
            tmp.write_text(json.dumps(record), encoding="utf-8")
            os.replace(tmp, self.state)
        self.have = have
        self.digest = _sha256_of(self.part, have)
        self.file.seek(have)
        return str(self.digest.hexdigest())

    async def _data(self, obj: Shareable) -> tuple[bool, Shareable | None]:
        off, data = obj.get("off"), obj.get("data")
        if not isinstance(off, int) or not isinstance(data, bytes):
            self.corrupt = True
            return _bad("a data object needs an integer 'off' and bytes 'data'")
        if self.first_data and 0 <= off < self.have:
            # The sender continues from an earlier point than we offered.
            await trio.to_thread.run_sync(self._rewind, off)
        self.first_data = False
        if off != self.have:
            self.corrupt = True
            return _bad(f"data at offset {off}, expected {self.have}")
        if self.have + len(data) > self.size:
            self.corrupt = True
            return _bad(f"data beyond the announced size of {self.size} bytes")
        await trio.to_thread.run_sync(self._write, data)
        self.factory.report(self.peer, self.name, self.have, self.size)
        return True, None

    def _rewind(self, off: int) -> None:
        assert self.part is not None
        self.file.truncate(off)
        self.file.seek(off)
        self.have = self.resumed_from = off
        self.digest = _sha256_of(self.part, off)

    def _write(self, data: bytes) -> None:
        self.file.write(data)
        self.digest.update(data)
        self.have += len(data)

    async def _end(self, obj: Shareable) -> tuple[bool, Shareable | None]:
        expected = obj.get("sha256")
        await trio.to_thread.run_sync(self.file.flush)
        actual = self.digest.hexdigest()
        if self.have != self.size:
            self.corrupt = True
            return _bad(f"stream ended at byte {self.have} of {self.size}")
        if actual != expected:
            self.corrupt = True
            logger.warning("%s from %s: SHA-256 mismatch", self.name, self.peer)
            return _bad(f"SHA-256 mismatch: received {actual}, sender has {expected!r:.80}")
        self.verified = True
        self.sha256 = actual
        return True, None

    async def finalize(self, stream_ctx: dict[str, Any], fl_ctx: FLContext) -> None:
        rc = str(stream_ctx.get(StreamContextKey.RC))
        placed: Path | None = None
        keep = False
        if self.part is not None:
            keep = rc not in (ReturnCode.OK, ReturnCode.BAD_REQUEST_DATA) and not self.corrupt
            try:
                placed = await trio.to_thread.run_sync(self._settle, rc == ReturnCode.OK, keep)
            except OSError:
                logger.exception("cannot settle %s from %s", self.name, self.peer)
            finally:
                self.factory.release(self.key)
        logger.info(
            "file %s from %s ended: %s%s",
            self.name or "?",
            self.peer,
            rc,
            f" -> {placed}" if placed else " (partial kept for resume)" if keep else "",
        )
        record = ReceivedFile(
            peer=self.peer,
            name=self.name,
            rc=rc,
            path=placed,
            size=self.have,
            sha256=self.sha256 if placed else None,
            resumed_from=self.resumed_from,
            kept_partial=keep and placed is None,
        )
        if self.factory.on_file is not None:
            try:
                result = self.factory.on_file(record)
                if hasattr(result, "__await__"):
                    await result
            except Exception:
                logger.exception("on_file callback failed for %s", self.name)

    def _settle(self, ok: bool, keep: bool) -> Path | None:
        """Place a verified file, or keep or drop the partial one; runs exactly once."""
        assert self.part is not None
        assert self.state is not None
        assert self.final is not None
        if self.file is not None:
            self.file.close()
        placed = None
        if ok and self.verified:
            placed = self._place()
        elif keep:
            return None
        self.part.unlink(missing_ok=True)
        self.state.unlink(missing_ok=True)
        return placed

    def _place(self) -> Path:
        assert self.part is not None
        assert self.final is not None
        if self.factory.name_policy is NamePolicy.OVERWRITE:
            os.replace(self.part, self.final)
            return self.final
        stem, suffix = self.final.stem, self.final.suffix
        candidate = self.final
        for n in range(1, 10_000):
            try:
                os.link(self.part, candidate)
            except FileExistsError:
                candidate = self.final.with_name(f"{stem} ({n}){suffix}")
                continue
            return candidate
        raise OSError(f"no free name for {self.final}")


class _FileReceiverFactory(ConsumerFactory):
    def __init__(
        self,
        directory: Path,
        on_file: Callable[[ReceivedFile], Any] | None,
        name_policy: NamePolicy,
        on_progress: ReceiveProgress | None,
    ) -> None:
        self.directory = directory
        self.on_file = on_file
        self.name_policy = name_policy
        self.on_progress = on_progress
        self._active: dict[str, trio.Event] = {}

    def report(self, peer: str, name: str, received: int, size: int) -> None:
        if self.on_progress is not None:
            try:
                self.on_progress(peer, name, received, size)
            except Exception:
                logger.exception("on_progress callback failed for %s", name)

    def get_consumer(self, stream_ctx: dict[str, Any], fl_ctx: FLContext) -> ObjectConsumer:
        peer = fl_ctx.get_peer_context()
        return _FileReceiver(self, peer.get_identity_name() if peer else "?")

    async def claim(self, key: str) -> bool:
        """Wait (bounded) until no other stream of this transfer is running, then take it.

        A sender that restarts after losing its connection may reach us before
        the old session has finalized; it waits for it rather than sharing
        the partial file. ``False`` if the other stream is still running.
        """
        with trio.move_on_after(SAME_TRANSFER_WAIT):
            while key in self._active:
                await self._active[key].wait()
        if key in self._active:
            return False
        self._active[key] = trio.Event()
        return True

    def release(self, key: str) -> None:
        event = self._active.pop(key, None)
        if event is not None:
            event.set()


def register_file_receiver(
    site: Site,
    channel: str,
    topic: str,
    directory: str | os.PathLike[str],
    *,
    on_file: Callable[[ReceivedFile], Any] | None = None,
    name_policy: NamePolicy | str = NamePolicy.OVERWRITE,
    on_progress: ReceiveProgress | None = None,
) -> None:
    """Receive file streams into ``directory``; see ``Site.register_file_receiver``."""
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    factory = _FileReceiverFactory(root.resolve(), on_file, NamePolicy(name_policy), on_progress)
    site.register_stream_processing(channel, topic, factory)


# -------------------------------------------------------------- containers

_KINDS: Final = {dict: "dict", list: "list", set: "set"}
#: Entries a container receiver rebuilds at most, by default.
DEFAULT_CONTAINER_MAX_ENTRIES: Final = 10_000_000
#: Bytes of entries (as counted by ``_entry_bytes``) a container receiver
#: holds at most, by default (1 GiB).
DEFAULT_CONTAINER_MAX_BYTES: Final = 1024**3
#: What ``_entry_bytes`` counts for a value that is not text, bytes or an array.
_SCALAR_BYTES: Final = 8
_END: Final[Any] = object()


class _ContainerProducer(ObjectProducer):
    """Object 0 names the kind of container (so an empty one arrives too), then one per entry."""

    def __init__(self, container: Any, kind: str, timeout: float) -> None:
        self.items: Iterator[Any] = iter(
            container.items() if isinstance(container, dict) else container
        )
        self.kind = kind
        self.timeout = timeout
        self.started = False
        self.sent = 0
        self.targets: dict[str, str] = {}

    async def produce(
        self, stream_ctx: dict[str, Any], fl_ctx: FLContext
    ) -> tuple[Shareable | None, float]:
        if not self.started:
            self.started = True
            return Shareable(fs="container", kind=self.kind), self.timeout
        item = next(self.items, _END)
        if item is _END:
            return None, 0
        self.sent += 1
        if self.kind == "dict":
            key, value = item
            return Shareable(k=key, v=value), self.timeout
        return Shareable(v=item), self.timeout

    async def process_replies(
        self, replies: dict[str, Shareable], stream_ctx: dict[str, Any], fl_ctx: FLContext
    ) -> Any:
        for target, reply in replies.items():
            self.targets[target] = str(reply.get_return_code(ReturnCode.OK))
        if all(rc != ReturnCode.OK for rc in self.targets.values()):
            return False
        return None


def _check_rebuildable(container: Iterable[Any], kind: str) -> None:
    """Refuse, before anything is sent, a key or set member that the receiver could
    not use as one: it must survive the wire's round trip as a hashable value
    (a tuple comes back as a list, for example).

    Raises:
        ValueError: the first such entry, named (a ``LocalProtocolError`` if
            it cannot be encoded at all).
    """
    what = "key" if kind == "dict" else "member"
    for entry in container:
        back = decode_object(encode_object(Shareable(k=entry)).to_bytes())["k"]
        try:
            hash(back)
        except TypeError:
            raise ValueError(
                f"{kind} {what} {entry!r:.200} arrives as a {type(back).__name__}, which "
                f"cannot be a {what} on the receiver; use str, int, bytes, float or bool {what}s"
            ) from None


async def stream_container(
    site: Site,
    channel: str,
    topic: str,
    targets: Sequence[str],
    container: dict[Any, Any] | list[Any] | set[Any],
    *,
    object_timeout: float = DEFAULT_OBJECT_TIMEOUT,
    fl_ctx: FLContext | None = None,
) -> ContainerResult:
    """Stream a container one entry per object; see ``Site.stream_container``."""
    kind = next((k for t, k in _KINDS.items() if isinstance(container, t)), None)
    if kind is None:
        raise TypeError(f"container must be a dict, list or set, not {type(container).__name__}")
    if not object_timeout > 0:
        raise ValueError(f"object_timeout must be positive, not {object_timeout}")
    if kind != "list":
        await trio.to_thread.run_sync(_check_rebuildable, container, kind)
    producer = _ContainerProducer(container, kind, object_timeout)
    rc, _ = await site.stream_objects(channel, topic, {}, list(targets), producer, fl_ctx)
    if rc != ReturnCode.OK:
        for target, target_rc in producer.targets.items():
            if target_rc == ReturnCode.OK:
                producer.targets[target] = rc
    return ContainerResult(rc=rc, entries=producer.sent, targets=dict(producer.targets))


class _ContainerReceiver(ObjectConsumer):
    def __init__(self, peer: str, factory: _ContainerReceiverFactory) -> None:
        self.peer = peer
        self.factory = factory
        self.kind = ""
        self.container: Any = None
        self.entries = 0
        #: Bytes of the entries held, as ``_entry_bytes`` counts them.
        self.bytes = 0

    async def consume(
        self, shareable: Shareable, stream_ctx: dict[str, Any], fl_ctx: FLContext
    ) -> tuple[bool, Shareable | None]:
        if not self.kind:
            kind = shareable.get("kind")
            if shareable.get("fs") != "container" or kind not in ("dict", "list", "set"):
                return _bad("a container stream starts with its kind: dict, list or set")
            self.kind = str(kind)
            self.container = {"dict": dict, "list": list, "set": set}[self.kind]()
            return True, None
        if "v" not in shareable or (self.kind == "dict" and "k" not in shareable):
            return _bad("a container entry needs 'v' (and 'k' for a dict)")
        if self.entries >= self.factory.max_entries:
            return _bad(f"more than {self.factory.max_entries} entries")
        size = _entry_bytes(shareable["v"])
        if self.kind == "dict":
            size += _entry_bytes(shareable["k"])
        if self.bytes + size > self.factory.max_bytes:
            return _bad(f"more than {self.factory.max_bytes} bytes of entries")
        try:
            if self.kind == "dict":
                self.container[shareable["k"]] = shareable["v"]
            elif self.kind == "set":
                self.container.add(shareable["v"])
            else:
                self.container.append(shareable["v"])
        except TypeError as exc:  # an unhashable key or set member
            return _bad(f"bad container entry: {exc}")
        self.entries += 1
        self.bytes += size
        return True, None

    async def finalize(self, stream_ctx: dict[str, Any], fl_ctx: FLContext) -> None:
        rc = str(stream_ctx.get(StreamContextKey.RC))
        record = ReceivedContainer(
            peer=self.peer,
            rc=rc,
            container=self.container if rc == ReturnCode.OK and self.kind else None,
            entries=self.entries,
        )
        self.container = None
        try:
            result = self.factory.on_container(record)
            if hasattr(result, "__await__"):
                await result
        except Exception:
            logger.exception("on_container callback failed")


def _entry_bytes(value: Any) -> int:
    """The bytes a received entry holds, counted as the wire carried it: the
    length of text and bytes, ``nbytes`` of arrays, and ``_SCALAR_BYTES`` for
    every other value, container or not (so ``[[]] * n`` is not free).

    The entry was decoded within ``max_object_size``, so the walk is bounded.
    """
    total = 0
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            total += len(item)
        elif isinstance(item, (bytes, bytearray, memoryview)):
            total += memoryview(item).nbytes
        elif isinstance(item, dict):
            total += _SCALAR_BYTES
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple, set, frozenset)):
            total += _SCALAR_BYTES
            stack.extend(item)
        else:
            nbytes = getattr(item, "nbytes", None)  # numpy arrays
            total += nbytes if isinstance(nbytes, int) else _SCALAR_BYTES
    return total


class _ContainerReceiverFactory(ConsumerFactory):
    def __init__(
        self, on_container: Callable[[ReceivedContainer], Any], max_entries: int, max_bytes: int
    ) -> None:
        self.on_container = on_container
        self.max_entries = max_entries
        self.max_bytes = max_bytes

    def get_consumer(self, stream_ctx: dict[str, Any], fl_ctx: FLContext) -> ObjectConsumer:
        peer = fl_ctx.get_peer_context()
        return _ContainerReceiver(peer.get_identity_name() if peer else "?", self)


def register_container_receiver(
    site: Site,
    channel: str,
    topic: str,
    on_container: Callable[[ReceivedContainer], Any],
    *,
    max_entries: int = DEFAULT_CONTAINER_MAX_ENTRIES,
    max_bytes: int = DEFAULT_CONTAINER_MAX_BYTES,
) -> None:
    """Rebuild streamed containers; see ``Site.register_container_receiver``."""
    for name, value in (("max_entries", max_entries), ("max_bytes", max_bytes)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, not {value!r}")
    site.register_stream_processing(
        channel, topic, _ContainerReceiverFactory(on_container, max_entries, max_bytes)
    )


def total_size(paths: Iterable[Path]) -> int:
    """Bytes in the given files and in every file under the given directories."""
    total = 0
    for path in paths:
        if path.is_dir():
            total += sum(f.stat().st_size for f, _ in iter_directory(path))
        else:
            total += path.stat().st_size
    return total
