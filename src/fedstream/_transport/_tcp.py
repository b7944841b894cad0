"""Plain TCP: ``tcp://host:port``."""

from __future__ import annotations

import trio

from ._base import ConnectionHandler, Transport, register_transport, split_url

__all__ = ["TcpTransport"]


class TcpTransport(Transport):
    """TCP with ``TCP_NODELAY`` (trio sets it on every ``SocketStream``)."""

    scheme = "tcp"

    async def connect(self, url: str) -> trio.abc.Stream:
        _, host, port = split_url(url)
        if port is None:
            raise ValueError(f"{url!r} has no port")
        return await trio.open_tcp_stream(host, port)

    async def serve(
        self,
        url: str,
        handler: ConnectionHandler,
        *,
        task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        _, host, port = split_url(url)
        listeners = await trio.open_tcp_listeners(port or 0, host=host or None)
        sockname = listeners[0].socket.getsockname()
        bound_host = host or sockname[0]
        if ":" in bound_host:
            bound_host = f"[{bound_host}]"
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, handler, listeners)
            task_status.started(f"tcp://{bound_host}:{sockname[1]}")


register_transport(TcpTransport())
