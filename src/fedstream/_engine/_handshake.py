"""The HELLO exchange that opens a connection, and refusing one with GOAWAY.

Both halves are bounded by a time limit and read the peer a few KiB at a
time, so that a connection whose HELLO is not in yet holds little.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable

import trio

from .._errors import HandshakeError, RemoteProtocolError
from .._wire import CLOSED, ErrorCode, Frame, FrameProtocol, GoAway, Hello

__all__ = ["accept_handshake", "code_name", "dial_handshake"]

logger = logging.getLogger(__name__)

#: Bytes read at a time until the peer's HELLO is in: a pending handshake
#: holds a few KiB, not a whole receive buffer.
_HANDSHAKE_RECEIVE_SIZE = 4 * 1024


def code_name(code: int) -> str:
    try:
        return ErrorCode(code).name
    except ValueError:
        return str(code)


async def _read_frame(stream: trio.abc.Stream, protocol: FrameProtocol) -> Frame | None:
    """Read until one frame arrives; ``None`` if the peer closed first."""
    while True:
        event = protocol.next_event()
        if event is CLOSED:
            return None
        if isinstance(event, Frame):
            return event
        protocol.receive_data(await stream.receive_some(_HANDSHAKE_RECEIVE_SIZE))


def _dialer_gone(stream: trio.abc.Stream) -> bool:
    """Whether the peer of a TCP stream has already closed or reset it.

    A dial that waited in the listen backlog (say while file descriptors ran
    out) may be accepted after its dialer gave up: its HELLO is still in the
    kernel, followed by EOF. Registering its name would refuse the dialer's
    retry as a duplicate. Peeks without consuming or blocking; streams that
    are not plain sockets are taken as alive.
    """
    if not isinstance(stream, trio.SocketStream):
        return False
    sock = socket.socket(fileno=stream.socket.fileno())
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True
    finally:
        sock.detach()


async def dial_handshake(
    stream: trio.abc.Stream, protocol: FrameProtocol, hello: Hello, *, limit: float
) -> Hello:
    """The dialer's half: send our HELLO, then expect HELLO (accepted) or GOAWAY (refused)."""
    with trio.move_on_after(limit) as scope:
        try:
            await stream.send_all(protocol.send(hello))
            frame = await _read_frame(stream, protocol)
        except RemoteProtocolError as exc:
            raise HandshakeError(f"invalid handshake from peer: {exc}") from exc
        except (trio.BrokenResourceError, OSError) as exc:
            raise HandshakeError(f"connection broke during handshake: {exc}") from exc
    if scope.cancelled_caught:
        raise HandshakeError(f"no HELLO from peer within {limit} s")
    if isinstance(frame, GoAway):
        raise HandshakeError(
            f"peer refused the connection: {code_name(frame.code)}: {frame.message}",
            code=frame.code,
        )
    if not isinstance(frame, Hello):
        raise HandshakeError("peer closed the connection during the handshake")
    return frame


async def accept_handshake(
    stream: trio.abc.Stream,
    protocol: FrameProtocol,
    make_hello: Callable[[Hello], Hello | GoAway],
    *,
    limit: float,
) -> Hello:
    """The acceptor's half: read the dialer's HELLO, then answer HELLO or GOAWAY.

    ``make_hello`` decides: it returns our HELLO to accept or a GOAWAY to refuse.
    """
    with trio.move_on_after(limit):
        try:
            frame = await _read_frame(stream, protocol)
        except RemoteProtocolError as exc:
            await _refuse(stream, protocol, GoAway(exc.error_code, str(exc)))
            raise HandshakeError(f"invalid handshake from peer: {exc}") from exc
        except (trio.BrokenResourceError, OSError) as exc:
            raise HandshakeError(f"connection broke during handshake: {exc}") from exc
        if not isinstance(frame, Hello):
            raise HandshakeError("peer closed the connection during the handshake")
        if _dialer_gone(stream):
            raise HandshakeError(f"{frame.site!r} closed the connection before it was accepted")
        answer = make_hello(frame)
        if isinstance(answer, GoAway):
            await _refuse(stream, protocol, answer)
            raise HandshakeError(f"refused {frame.site!r}: {answer.message}")
        try:
            await stream.send_all(protocol.send(answer))
        except (trio.BrokenResourceError, OSError) as exc:
            raise HandshakeError(f"connection broke during handshake: {exc}") from exc
        return frame
    await _refuse(
        stream, protocol, GoAway(ErrorCode.HANDSHAKE_TIMEOUT, f"no HELLO within {limit} s")
    )
    raise HandshakeError(f"no HELLO from peer within {limit} s") from None


async def _refuse(stream: trio.abc.Stream, protocol: FrameProtocol, goaway: GoAway) -> None:
    with trio.move_on_after(1):
        try:
            await stream.send_all(protocol.send(goaway))
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        except Exception:  # the refusal itself is best effort
            logger.debug("could not send GOAWAY", exc_info=True)
