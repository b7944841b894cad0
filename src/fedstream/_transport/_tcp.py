"""Plain TCP: ``tcp://host:port``."""

from __future__ import annotations

import trio

from ._base import ConnectionHandler, Transport, TransportConfig, register_transport, split_url

__all__ = ["TcpTransport"]


class TcpTransport(Transport):
    """TCP with ``TCP_NODELAY`` (trio sets it on every ``SocketStream``).

    The engine reads and writes a plain ``trio.SocketStream`` through its
    file descriptor (``readv``/``writev``); every other stream, including
    TLS over TCP, goes through the generic ``trio.abc.Stream`` methods.
    """

    scheme = "tcp"

    async def connect(self, url: str) -> trio.abc.Stream:
        _, host, port = split_url(url)
        if port is None:
            raise ValueError(f"{url!r} has no port")
        return await trio.open_tcp_stream(host, port)

    def _accepting(self, handler: ConnectionHandler) -> ConnectionHandler:
        """The handler each accepted TCP stream is given to (a subclass may wrap it)."""
        return handler

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
            # serve_listeners runs each accepted stream's handler in its own task.
            await nursery.start(trio.serve_listeners, self._accepting(handler), listeners)
            task_status.started(f"{self.scheme}://{bound_host}:{sockname[1]}")


def _tcp(config: TransportConfig) -> Transport:
    return TcpTransport()


register_transport("tcp", _tcp)
