"""File, directory and container streams between two sites in one process."""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

import fedstream
from fedstream import FileResult, ReceivedContainer, ReceivedFile, ReturnCode, Shareable
from fedstream._streamers import check_relative_name

LOOP = "tcp://127.0.0.1:0"


@asynccontextmanager
async def pair(
    out: Path, *, name_policy: str = "overwrite", **opts: Any
) -> AsyncIterator[tuple[fedstream.Site, fedstream.Site, list[ReceivedFile]]]:
    got: list[ReceivedFile] = []
    async with fedstream.open_site("rx", listen=LOOP, **opts) as rx:
        rx.register_file_receiver("files", "*", out, on_file=got.append, name_policy=name_policy)
        async with fedstream.open_site("tx", connect=[rx.address], **opts) as tx:
            yield tx, rx, got


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.rglob("*") if ".fedstream-" in p.name)


async def test_file_arrives_whole_and_verified(tmp_path: Path) -> None:
    src = tmp_path / "model.bin"
    src.write_bytes(os.urandom(3 * 65536 + 123))
    out = tmp_path / "out"
    progress: list[int] = []
    with trio.fail_after(20):
        async with pair(out) as (tx, _rx, got):
            result = await tx.stream_file(
                "files", "up", ["rx"], src, chunk_size=65536, progress=progress.append
            )
    assert result.ok, result
    assert result.targets == {"rx": "OK"}
    assert result.sha256 == sha(src)
    assert (result.size, result.sent, result.resumed_from) == (src.stat().st_size,) * 2 + (0,)
    assert sha(out / "model.bin") == sha(src)
    assert progress[-1] == src.stat().st_size
    assert [(g.rc, g.path, g.sha256) for g in got] == [("OK", out / "model.bin", sha(src))]
    assert leftovers(out) == []


async def test_empty_file_and_directory_tree(tmp_path: Path) -> None:
    tree = tmp_path / "data"
    (tree / "a" / "b").mkdir(parents=True)
    (tree / "empty").write_bytes(b"")
    (tree / "a" / "one.txt").write_bytes(b"one" * 1000)
    (tree / "a" / "b" / "two.txt").write_bytes(os.urandom(100_000))
    out = tmp_path / "out"
    with trio.fail_after(20):
        async with pair(out) as (tx, _rx, _got):
            results = await tx.stream_directory("files", "up", ["rx"], tree, chunk_size=30_000)
    assert [r.name for r in results] == ["data/a/one.txt", "data/a/b/two.txt", "data/empty"] or [
        r.name for r in results
    ] == ["data/empty", "data/a/one.txt", "data/a/b/two.txt"]
    assert all(r.ok for r in results)
    for rel in ("empty", "a/one.txt", "a/b/two.txt"):
        assert sha(out / "data" / rel) == sha(tree / rel)
    assert leftovers(out) == []


@pytest.mark.parametrize(
    "name", ["../evil", "/etc/passwd", "a/../../evil", "a//b", ".", "a/./b", "x\\..\\y", ""]
)
def test_unsafe_names_are_refused(name: str) -> None:
    with pytest.raises(ValueError):
        check_relative_name(name)


class _RawProducer(fedstream.ObjectProducer):
    """Sends scripted objects, as a hostile or buggy peer could."""

    def __init__(self, objects: list[Shareable]) -> None:
        self.objects = list(objects)
        self.replies: list[dict[str, str]] = []

    async def produce(self, stream_ctx: dict[str, Any], fl_ctx: fedstream.FLContext) -> Any:
        if not self.objects:
            return None, 0
        return self.objects.pop(0), 10.0

    async def process_replies(
        self, replies: dict[str, Shareable], stream_ctx: dict[str, Any], fl_ctx: Any
    ) -> Any:
        self.replies.append({k: str(v.get_return_code()) for k, v in replies.items()})
        return None


@pytest.mark.parametrize("name", ["../evil", "/tmp/evil", "link/evil", "a/../../evil"])
async def test_path_traversal_refused_on_the_receiver(tmp_path: Path, name: str) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "link").symlink_to(tmp_path)  # a symlink that leaves the directory
    producer = _RawProducer(
        [
            Shareable(fs="open", tid="t", name=name, size=4),
            Shareable(fs="data", off=0, data=b"evil"),
        ]
    )
    with trio.fail_after(20):
        async with pair(out) as (tx, _rx, _got):
            rc, _ = await tx.stream_objects("files", "up", {}, ["rx"], producer, None)
    assert rc == ReturnCode.BAD_REQUEST_DATA
    assert producer.replies == [{"rx": ReturnCode.BAD_REQUEST_DATA}]
    assert not (tmp_path / "evil").exists()
    assert sorted(p.name for p in tmp_path.rglob("*evil*")) == []


async def test_bad_data_is_refused_and_leaves_nothing(tmp_path: Path) -> None:
    out = tmp_path / "out"
    cases = [
        # a gap
        [Shareable(fs="open", tid="a", name="f", size=8), Shareable(fs="data", off=4, data=b"x")],
        # more than announced
        [Shareable(fs="open", tid="b", name="f", size=2), Shareable(fs="data", off=0, data=b"xyz")],
        # wrong hash
        [
            Shareable(fs="open", tid="c", name="f", size=1),
            Shareable(fs="data", off=0, data=b"x"),
            Shareable(fs="end", sha256="0" * 64),
        ],
        # no open
        [Shareable(fs="data", off=0, data=b"x")],
    ]
    with trio.fail_after(20):
        async with pair(out) as (tx, _rx, got):
            for objects in cases:
                rc, _ = await tx.stream_objects(
                    "files", "up", {}, ["rx"], _RawProducer(objects), None
                )
                assert rc == ReturnCode.BAD_REQUEST_DATA
    assert [g.rc for g in got] == [ReturnCode.BAD_REQUEST_DATA] * 4
    assert not (out / "f").exists()
    assert leftovers(out) == []


async def test_abort_keeps_partial_and_same_transfer_resumes(tmp_path: Path) -> None:
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(40 * 16384))
    out = tmp_path / "out"
    seen: list[int] = []
    with trio.fail_after(30):
        async with pair(out) as (tx, _rx, got):
            fl_ctx = fedstream.FLContext()

            def stop_half_way(offset: int) -> None:
                seen.append(offset)
                if offset >= 10 * 16384:
                    fl_ctx.get_run_abort_signal().trigger(True)

            first = await tx.stream_file(
                "files",
                "up",
                ["rx"],
                src,
                transfer_id="T1",
                chunk_size=16384,
                progress=stop_half_way,
                fl_ctx=fl_ctx,
            )
            assert first.rc == ReturnCode.TASK_ABORTED
            assert not (out / "big.bin").exists()
            assert len(leftovers(out)) == 2  # the partial file and its record
            assert got[-1].kept_partial
            second = await tx.stream_file(
                "files", "up", ["rx"], src, transfer_id="T1", chunk_size=16384
            )
    assert second.ok, second
    assert 10 * 16384 <= second.resumed_from < src.stat().st_size
    assert second.sent == src.stat().st_size - second.resumed_from
    assert sha(out / "big.bin") == sha(src)
    assert leftovers(out) == []


async def test_changed_source_restarts_from_zero(tmp_path: Path) -> None:
    src = tmp_path / "f.bin"
    src.write_bytes(os.urandom(20 * 4096))
    out = tmp_path / "out"
    with trio.fail_after(30):
        async with pair(out) as (tx, _rx, _got):
            fl_ctx = fedstream.FLContext()

            def stop(offset: int) -> None:
                if offset >= 5 * 4096:
                    fl_ctx.get_run_abort_signal().trigger(True)

            await tx.stream_file(
                "files",
                "up",
                ["rx"],
                src,
                transfer_id="T",
                chunk_size=4096,
                progress=stop,
                fl_ctx=fl_ctx,
            )
            src.write_bytes(os.urandom(20 * 4096))  # same size, other content
            again = await tx.stream_file(
                "files", "up", ["rx"], src, transfer_id="T", chunk_size=4096
            )
    assert again.ok
    assert again.resumed_from == 0
    assert sha(out / "f.bin") == sha(src)


async def test_concurrent_same_name_streams_never_mix(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "same.bin").write_bytes(os.urandom(300_000))
    (b / "same.bin").write_bytes(os.urandom(300_000))
    for policy in ("overwrite", "suffix"):
        out = tmp_path / f"out-{policy}"
        results: list[FileResult] = []
        with trio.fail_after(30):
            async with pair(out, name_policy=policy) as (tx, _rx, _got):

                async def send(src: Path, results: list[FileResult] = results) -> None:
                    results.append(
                        await tx.stream_file("files", "up", ["rx"], src, chunk_size=10_000)
                    )

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(send, a / "same.bin")
                    nursery.start_soon(send, b / "same.bin")
        assert [r.ok for r in results] == [True, True]
        sources = {sha(a / "same.bin"), sha(b / "same.bin")}
        received = {sha(p) for p in out.iterdir()}
        assert leftovers(out) == []
        if policy == "overwrite":
            assert [p.name for p in out.iterdir()] == ["same.bin"]
            assert received <= sources
        else:
            assert sorted(p.name for p in out.iterdir()) == ["same (1).bin", "same.bin"]
            assert received == sources


async def test_containers_one_entry_per_object(tmp_path: Path) -> None:
    got: list[ReceivedContainer] = []
    data: list[Any] = [
        {"a": 1, "b": b"x" * 100_000, "c": [1, 2, 3]},
        list(range(50)),
        {"x", "y", 3},
        {},
        {1: "int", b"key": "bytes", 2.5: "float", None: "none"},  # hashable after the wire
        {b"m", 7, -1.5},
    ]
    with trio.fail_after(20):
        async with fedstream.open_site("rx", listen=LOOP) as rx:
            rx.register_container_receiver("c", "*", got.append)
            async with fedstream.open_site("tx", connect=[rx.address]) as tx:
                results = [await tx.stream_container("c", "t", ["rx"], d) for d in data]
                with pytest.raises(TypeError):
                    await tx.stream_container("c", "t", ["rx"], "not a container")  # type: ignore[arg-type]
    assert [r.ok for r in results] == [True] * 6
    assert [r.entries for r in results] == [3, 50, 3, 0, 4, 3]
    assert [g.container for g in got] == data
    assert [g.peer for g in got] == ["tx"] * 6


async def test_refused_names_on_the_receiver(tmp_path: Path) -> None:
    out = tmp_path / "out"
    (out / "adir").mkdir(parents=True)
    names = ["adir", ".x.0123.fedstream-part", "y.fedstream-state"]
    with trio.fail_after(20):
        async with pair(out) as (tx, _rx, _got):
            for name in names:
                producer = _RawProducer([Shareable(fs="open", tid="t", name=name, size=1)])
                rc, _ = await tx.stream_objects("files", "up", {}, ["rx"], producer, None)
                assert rc == ReturnCode.BAD_REQUEST_DATA, name
    assert sorted(p.name for p in out.iterdir()) == ["adir"]


async def test_two_targets_resume_from_what_both_hold(tmp_path: Path) -> None:
    """One target holds half the file, the other nothing: both end with the whole file."""
    src = tmp_path / "f.bin"
    src.write_bytes(os.urandom(32 * 8192))
    outs = {name: tmp_path / name for name in ("r1", "r2")}
    got: list[ReceivedFile] = []
    with trio.fail_after(30):
        async with (
            fedstream.open_site("r1", listen=LOOP) as r1,
            fedstream.open_site("r2", listen=LOOP) as r2,
        ):
            for site in (r1, r2):
                site.register_file_receiver("files", "*", outs[site.name], on_file=got.append)
            async with fedstream.open_site("tx", connect=[r1.address, r2.address]) as tx:
                fl_ctx = fedstream.FLContext()

                def stop(offset: int) -> None:
                    if offset >= 16 * 8192:
                        fl_ctx.get_run_abort_signal().trigger(True)

                first = await tx.stream_file(
                    "files",
                    "up",
                    ["r1"],
                    src,
                    transfer_id="T",
                    chunk_size=8192,
                    progress=stop,
                    fl_ctx=fl_ctx,
                )
                assert first.rc == ReturnCode.TASK_ABORTED
                both = await tx.stream_file(
                    "files", "up", ["r1", "r2"], src, transfer_id="T", chunk_size=8192
                )
    assert both.ok, both
    assert both.targets == {"r1": "OK", "r2": "OK"}
    assert both.resumed_from == 0  # r2 had nothing
    for out in outs.values():
        assert sha(out / "f.bin") == sha(src)
        assert leftovers(out) == []
    r1_final = [
        g for g in got if g.peer == "tx" and g.rc == "OK" and g.path == outs["r1"] / "f.bin"
    ]
    assert len(r1_final) == 1


async def test_same_transfer_twice_at_once_waits_for_the_first(tmp_path: Path) -> None:
    src = tmp_path / "f.bin"
    src.write_bytes(os.urandom(64 * 8192))
    out = tmp_path / "out"
    results: list[FileResult] = []
    with trio.fail_after(30):
        async with pair(out) as (tx, _rx, got):

            async def one() -> None:
                results.append(
                    await tx.stream_file(
                        "files", "up", ["rx"], src, transfer_id="T", chunk_size=8192
                    )
                )

            async with trio.open_nursery() as nursery:
                nursery.start_soon(one)
                nursery.start_soon(one)
    assert [r.ok for r in results] == [True, True]
    # The second started only after the first had placed the file.
    assert [g.rc for g in got] == ["OK", "OK"]
    assert sha(out / "f.bin") == sha(src)
    assert leftovers(out) == []


def test_package_logger_has_a_null_handler() -> None:
    import logging

    handlers = logging.getLogger("fedstream").handlers
    assert any(isinstance(h, logging.NullHandler) for h in handlers)


async def test_stream_start_and_end_are_logged_on_both_sides(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    src = tmp_path / "f.bin"
    src.write_bytes(b"x" * 1000)
    caplog.set_level("INFO", logger="fedstream._engine._site")
    with trio.fail_after(20):
        async with pair(tmp_path / "out") as (tx, _rx, _got):
            await tx.stream_file("files", "up", ["rx"], src)
            await trio.sleep(0.05)  # the receiver's end is logged once it finished
    lines = [r.getMessage() for r in caplog.records if r.name == "fedstream._engine._site"]
    assert "stream files/up to rx started" in lines
    assert "stream files/up to rx ended: OK" in lines
    assert "stream files/up from tx started" in lines
    assert "stream files/up from tx ended: OK" in lines


async def test_directory_with_a_deep_relative_path_is_sent(tmp_path: Path) -> None:
    """A 260-character relative path is ordinary (each component < 255, no PATH_MAX issue),
    but ``stream_directory`` makes the per-file transfer id ``f"{tid}/{rel}"``, and the
    receiver refuses transfer ids longer than 256 characters."""
    tree = tmp_path / "data"
    deep = tree / ("d" * 120) / ("e" * 120)
    deep.mkdir(parents=True)
    (deep / "f.bin").write_bytes(b"payload")
    out = tmp_path / "out"
    with trio.fail_after(20):
        async with fedstream.open_site("rx", listen="tcp://127.0.0.1:0") as rx:
            rx.register_file_receiver("files", "*", out)
            async with fedstream.open_site("tx", connect=[rx.address]) as tx:
                results = await tx.stream_directory("files", "up", ["rx"], tree)
    assert [r.targets for r in results] == [{"rx": "OK"}]
    assert (out / "data" / ("d" * 120) / ("e" * 120) / "f.bin").read_bytes() == b"payload"


async def test_a_container_the_receiver_cannot_rebuild_is_refused_by_the_sender() -> None:
    """``{(1, 2): "a"}`` and ``{(1, 2)}`` encode fine entry by entry, but tuples decode as
    lists, which cannot be dict keys or set members: the receiver ends the stream with
    BAD_REQUEST_DATA after the earlier entries were sent. The object encoder's rule
    ("refuses exactly what receivers refuse", before anything is sent) should hold for
    containers too: refuse with a ValueError naming the entry before streaming."""
    got: list[fedstream.ReceivedContainer] = []
    with trio.fail_after(15):
        async with fedstream.open_site("rx", listen="tcp://127.0.0.1:0") as rx:
            rx.register_container_receiver("c", "*", got.append)
            async with fedstream.open_site("tx", connect=[rx.address]) as tx:
                for container in ({"ok": 1, (1, 2): "a"}, {"ok", (1, 2)}):
                    with pytest.raises(ValueError, match=r"\(1, 2\)|tuple"):
                        await tx.stream_container("c", "t", ["rx"], container)
    assert got == []


@pytest.mark.parametrize(
    ("container", "ok"),
    [
        ([b"x" * 400, "y" * 400], True),  # 800 bytes of 1000
        ([b"x" * 400, "y" * 400, b"z" * 400], False),  # 1200 bytes
        ({"k" * 500: "v" * 600}, False),  # a dict counts its keys too
        ([[[] for _ in range(200)]], False),  # empty containers are not free
    ],
)
async def test_container_receiver_bounds_the_bytes_it_holds(container: Any, ok: bool) -> None:
    got: list[ReceivedContainer] = []
    with trio.fail_after(15):
        async with fedstream.open_site("rx", listen=LOOP) as rx:
            rx.register_container_receiver("c", "*", got.append, max_bytes=1000)
            async with fedstream.open_site("tx", connect=[rx.address]) as tx:
                result = await tx.stream_container("c", "t", ["rx"], container)
    assert result.ok is ok
    [record] = got
    if ok:
        assert record.container == container
    else:
        assert result.targets == {"rx": ReturnCode.BAD_REQUEST_DATA}
        assert (record.rc, record.container) == (ReturnCode.BAD_REQUEST_DATA, None)


@pytest.mark.parametrize("bad", [{"max_bytes": 0}, {"max_entries": 0}, {"max_bytes": 1.5}])
async def test_container_receiver_bounds_must_be_positive(bad: dict[str, Any]) -> None:
    async with fedstream.open_site("rx") as rx:
        with pytest.raises(ValueError, match="must be a positive integer"):
            rx.register_container_receiver("c", "*", print, **bad)
