"""Where a fedstream worker's time goes, from a py-spy profile: ``python
benchmarks/pyspy_shares.py send.txt recv.txt ...``.

Each file is ``py-spy record -f raw --threads --idle`` output of one worker
(see "Reproducing a profile" in README.md). The main thread (the one that
runs trio) is split into idle (``epoll_wait``) and busy samples, and each
busy sample is classified by its innermost telling frame: the engine's
frame sends (kernel send), its ``readv`` into an object (kernel copy in),
the site's worker pool for plain callbacks (``_engine/_workers.py``, since
``4be5157``; its lock wait for a quick callback included) and trio's thread
cache and ``to_thread`` (thread hops, with the calls into trio they make),
``fedstream._wire`` (frame codec), the rest of the engine, trio's
scheduler. Start-up (imports) is left out; so are the pool's threads
sleeping between jobs. Shares only: on a loaded machine a thread waiting for a CPU
counts where it stood.
"""

from __future__ import annotations

import collections
import sys
from collections.abc import Iterator

#: Frames of the worker-thread machinery: the site's pool (since 4be5157), trio's.
HOP_FRAMES = (
    "fedstream/_engine/_workers.py",
    "trio/_threads.py",
    "_thread_cache.py",
    "_entry_queue.py",
    "CapacityLimiter",
)
#: A pool thread sleeping until handed a job (``WorkerPool._work``).
POOL_SLEEP_CALL = "worker.wake.acquire("
POOL_SLEEP_LEAF = "WorkerPool._work (fedstream/_engine/_workers.py"
#: The engine's own system calls: the frame writer's writev, the reader's readv.
SEND_LEAF = "Writer.write_now (fedstream/_engine/_writer.py"
READ_CALL = "os.readv"
READ_LEAF = "(fedstream/_engine/_reader.py"


def _stacks(path: str) -> Iterator[tuple[list[str], int]]:
    with open(path, encoding="utf-8") as fp:
        for line in fp:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if stack:
                yield stack.split(";"), int(count)


def _is_hop(frame: str) -> bool:
    return any(mark in frame for mark in HOP_FRAMES)


def _classify(frames: list[str], read_lines: set[str]) -> str:
    leaf = frames[-1]
    text = ";".join(frames)
    if "_find_and_load" in text or len(frames) <= 2:
        return "start-up"
    if "get_events (trio/_core/_io_epoll.py" in leaf:
        return "idle (epoll_wait)"
    if leaf.startswith(SEND_LEAF):
        return "kernel send"
    if any(leaf.endswith(f":{line})") and READ_LEAF in leaf for line in read_lines):
        return "kernel copy in (readv)"
    if "_nonblocking_helper (trio/_socket.py" in leaf:
        return "kernel send" if "send_all" in text else "kernel copy in (readv)"
    for depth in range(len(frames) - 1, -1, -1):
        frame = frames[depth]
        if "fedstream/_wire" in frame:
            return "frame codec (_wire)"
        if _is_hop(frame):
            return "thread hops"
        if "fedstream/_engine" in frame or "fedstream/_blocking" in frame:
            return "rest of the engine"
        if "fedstream/_bench" in frame:
            return "benchmark callbacks"
        if "trio/" in frame:
            # trio called by the hop machinery (the pool's current_statistics
            # and reschedule, the entry queue's drain) is the hop's.
            caller = next(
                (f for f in reversed(frames[:depth]) if "trio/" not in f or _is_hop(f)), ""
            )
            return "thread hops" if _is_hop(caller) else "trio scheduler"
    return "other"


def _lines(path: str, call: str) -> set[str]:
    """Line numbers of ``call`` in the installed engine's ``path``."""
    with open(path, encoding="utf-8") as fp:
        return {str(n) for n, line in enumerate(fp, 1) if call in line}


def _read_lines() -> set[str]:
    """Line numbers of the reader's ``os.readv`` calls, from the installed engine."""
    from fedstream._engine import _reader

    return _lines(_reader.__file__, READ_CALL)


def _pool_sleep_leaves() -> tuple[str, ...]:
    """Leaf frames of a pool thread waiting for a job, from the installed engine."""
    from fedstream._engine import _workers

    return tuple(f"{POOL_SLEEP_LEAF}:{n})" for n in _lines(_workers.__file__, POOL_SLEEP_CALL))


def _thread_id(frames: list[str]) -> str:
    """``thread (1234)`` of ``thread (1234): name``."""
    return frames[0].partition(")")[0]


def shares(path: str, read_lines: set[str]) -> tuple[collections.Counter[str], int]:
    """Main-thread samples by category, and the worker threads' busy samples."""
    main: collections.Counter[str] = collections.Counter()
    threads_busy = 0
    pool_sleep = _pool_sleep_leaves()
    stacks = list(_stacks(path))
    # py-spy does not always name a thread: the main thread is the one ever named so.
    main_ids = {_thread_id(frames) for frames, _ in stacks if "MainThread" in frames[0]}
    for frames, count in stacks:
        if _thread_id(frames) in main_ids:
            main[_classify(frames, read_lines)] += count
        elif not (
            frames[-1].startswith("WorkerThread._work (trio/_core/_thread_cache.py")
            or frames[-1].startswith("to_thread_run_sync.<locals>.worker_fn")
            or frames[-1] in pool_sleep
            or "_find_and_load" in ";".join(frames)
        ):
            threads_busy += count
    return main, threads_busy


def main(paths: list[str]) -> int:
    read_lines = _read_lines()
    for path in paths:
        counts, threads_busy = shares(path, read_lines)
        wall = sum(v for k, v in counts.items() if k != "start-up")
        busy = wall - counts["idle (epoll_wait)"]
        print(f"{path}: main thread {wall} samples after start-up, {busy} busy")
        for key, value in counts.most_common():
            if key == "start-up" or not wall:
                continue
            of_busy = (
                ""
                if key.startswith("idle") or not busy
                else f"  {100 * value / busy:5.1f}% of busy"
            )
            print(f"  {key:28s} {100 * value / wall:5.1f}% of wall{of_busy}")
        if wall:
            print(
                f"  worker threads busy: {100 * threads_busy / wall:.1f}% of the main thread's wall"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
