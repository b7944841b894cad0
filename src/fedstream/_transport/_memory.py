"""In-process transport for tests: ``memory://name``.

Streams are ``trio.testing`` memory stream pairs, so whole sites run without
sockets and under ``MockClock``. Names live in one process-wide table (every
site's memory transport is the same object) and are released when the
listener stops.
"""

from __future__ import annotations

import itertools

import trio

from ._base import ConnectionHandler, Transport, TransportConfig, register_transport, split_url

__all__ = ["MemoryTransport"]


class MemoryTransport(Transport):
    """Listeners keyed by name; ``connect`` hands one end of a fresh pair to the listener."""

    scheme = "memory"

    def __init__(self) -> None:
        self._listeners: dict[str, trio.MemorySendChannel[trio.abc.Stream]] = {}
        self._counter = itertools.count(1)

    async def connect(self, url: str) -> trio.abc.Stream:
        name = split_url(url)[1]
        channel = self._listeners.get(name)
        if channel is None:
            raise ConnectionRefusedError(f"nothing listens on {url}")
        # Imported here: trio.testing pulls in pytest when it is installed,
        # which every ``import fedstream`` would pay for a test-only transport.
        import trio.testing

        ours, theirs = trio.testing.memory_stream_pair()
        try:
            await channel.send(theirs)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise ConnectionRefusedError(f"nothing listens on {url}") from exc
        return ours

    async def serve(
        self,
        url: str,
        handler: ConnectionHandler,
        *,
        task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        name = split_url(url)[1]
        if name in ("", "0"):
            name = f"site{next(self._counter)}"
        if name in self._listeners:
            raise OSError(f"memory://{name} is already in use")
        send, receive = trio.open_memory_channel[trio.abc.Stream](0)
        self._listeners[name] = send
        try:
            async with trio.open_nursery() as nursery:
                task_status.started(f"memory://{name}")
                async with receive:
                    async for stream in receive:
                        nursery.start_soon(handler, stream)
        finally:
            del self._listeners[name]
            send.close()


_MEMORY = MemoryTransport()


def _memory(config: TransportConfig) -> Transport:
    return _MEMORY


register_transport("memory", _memory)
