"""WebSocket links (``ws://``, ``wss://``): addresses, the byte stream in
binary messages, refusals, hostile peers, and the certificate identity rule.

Real sockets on 127.0.0.1 port 0. Hostile peers are raw TCP clients or plain
``trio_websocket`` clients. Every refusal test checks that the refusal is
typed and logged, that nothing is delivered, and that the listener goes on
serving a legitimate peer. The end-to-end scenarios of the engine also run
over ``ws`` and ``wss`` (tests parametrized by ``net``/``scheme``), and
``test_ws_proxy`` goes through nginx.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import trio
import trio_websocket

import fedstream
from engine_helpers import Recorder
from fedstream import (
    ConnectionLostError,
    HandshakeError,
    RemoteProtocolError,
    ReturnCode,
    Site,
    TLSConfig,
    open_site,
)
from fedstream._transport import TcpTransport, TransportConfig, WebSocketStream, make_transport
from fedstream._transport._ws import MESSAGE_SIZE
from site_helpers import send, serve, still_serves, tls
from tls_certs import deployment, foreign

WS = "ws://127.0.0.1:0/fedstream"
WSS = "wss://127.0.0.1:0/fedstream"
OK = ReturnCode.OK


def port_of(site: Site) -> int:
    return int((site.address or "").rsplit(":", 1)[1].split("/", 1)[0])


# ------------------------------------------------------------ addresses


async def test_the_address_is_the_url_bound_with_its_path() -> None:
    with trio.fail_after(10):
        async with (
            open_site("a", listen=WS) as a,
            open_site("b", listen="ws://127.0.0.1:0") as b,
            open_site("c", listen=WSS, tls=tls("c")) as c,
        ):
            assert a.address is not None
            assert a.address.startswith("ws://127.0.0.1:")
            assert a.address.endswith("/fedstream")
            assert port_of(a) > 0
            assert b.address == f"ws://127.0.0.1:{port_of(b)}/"
            assert c.address == f"wss://127.0.0.1:{port_of(c)}/fedstream"
            async with open_site("d", connect=[a.address, b.address]) as d:
                assert d.peers == ["a", "b"]


async def test_wss_without_certificates_is_a_clear_error() -> None:
    with trio.fail_after(5), pytest.raises(ValueError, match=r"wss:// needs certificates"):
        async with open_site("a", listen=WSS):
            pass


# ----------------------------------------------------------- the stream


async def test_the_byte_stream_is_cut_into_binary_messages_of_at_most_message_size() -> None:
    """What a fedstream dialer sends, seen by a plain WebSocket server: binary
    messages, none larger than MESSAGE_SIZE, concatenating to the bytes sent."""
    data = bytes(range(256)) * (3 * MESSAGE_SIZE // 256 + 7)
    messages: list[bytes | str] = []
    got_all = trio.Event()

    async def handler(request: trio_websocket.WebSocketRequest) -> None:
        ws = await request.accept()
        while sum(map(len, messages)) < len(data):
            messages.append(await ws.get_message())
        got_all.set()
        await ws.send_message(b"abc")
        await ws.send_message(b"defgh")
        await trio.sleep_forever()

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            server = await nursery.start(
                trio_websocket.serve_websocket, handler, "127.0.0.1", 0, None
            )
            config = TransportConfig(nursery=nursery)
            transport = make_transport("ws", config)
            stream = await transport.connect(f"ws://127.0.0.1:{server.port}/any")
            assert isinstance(stream, WebSocketStream)
            assert stream.tls_stream is None
            await stream.send_all(memoryview(data))
            await got_all.wait()
            # receive_some hands out a message in pieces, never across two.
            assert await stream.receive_some(2) == b"ab"
            assert await stream.receive_some(100) == b"c"
            assert await stream.receive_some() == b"defgh"
            await stream.aclose()
            with pytest.raises(trio.ClosedResourceError):
                await stream.send_all(b"x")
            nursery.cancel_scope.cancel()
    assert all(isinstance(m, bytes) for m in messages)
    assert max(map(len, messages)) == MESSAGE_SIZE
    assert b"".join(messages) == data  # type: ignore[arg-type]


async def test_a_normal_close_is_the_end_of_the_stream() -> None:
    async def handler(request: trio_websocket.WebSocketRequest) -> None:
        ws = await request.accept()
        await ws.send_message(b"last")
        await ws.aclose()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            server = await nursery.start(
                trio_websocket.serve_websocket, handler, "127.0.0.1", 0, None
            )
            transport = make_transport("ws", TransportConfig(nursery=nursery))
            stream = await transport.connect(f"ws://127.0.0.1:{server.port}/")
            assert await stream.receive_some() == b"last"
            assert await stream.receive_some() == b""
            await stream.aclose()
            nursery.cancel_scope.cancel()


# ------------------------------------------------------------- refusals


async def test_a_wrong_path_is_refused_with_404(caplog: pytest.LogCaptureFixture) -> None:
    recorder = Recorder()
    with trio.fail_after(15):
        async with open_site("server", listen=WS) as server:
            serve(recorder, server)
            wrong = (server.address or "").replace("/fedstream", "/other")
            async with open_site("site-1") as site1:
                with pytest.raises(HandshakeError, match="HTTP 404"):
                    await site1.connect(wrong)
                assert site1.peers == []
            assert server.peers == []
            await still_serves(server, recorder, "after")
    assert "asked for path '/other', not '/fedstream' (HTTP 404)" in caplog.text
    assert [key for key in recorder.sessions if key[1] != "after"] == []


async def test_nothing_listening_is_a_lost_connection() -> None:
    with trio.fail_after(10):
        async with open_site("server", listen=WS) as server:
            url = server.address or ""
        async with open_site("site-1") as site1:
            with pytest.raises(ConnectionLostError, match="cannot connect"):
                await site1.connect(url)


async def test_ws_and_wss_do_not_mix(caplog: pytest.LogCaptureFixture) -> None:
    recorder = Recorder()
    with trio.fail_after(15):
        async with (
            open_site("server", listen=WSS, tls=tls("server")) as server,
            open_site("plain", listen=WS) as plain,
        ):
            serve(recorder, server)
            async with open_site("site-1", tls=tls("site-1")) as site1:
                closed = r"upgrade with .* failed: the listener closed the connection"
                with pytest.raises(HandshakeError, match=closed):
                    await site1.connect((server.address or "").replace("wss://", "ws://"))
                with pytest.raises(HandshakeError, match="does not speak TLS"):
                    await site1.connect((plain.address or "").replace("ws://", "wss://"))
                assert site1.peers == []
            assert server.peers == []
            assert plain.peers == []
            await still_serves(server, recorder, "after")
    assert "does not speak TLS" in caplog.text
    assert [key for key in recorder.sessions if key[1] != "after"] == []


async def test_tcp_and_ws_do_not_mix(caplog: pytest.LogCaptureFixture) -> None:
    recorder = Recorder()
    with trio.fail_after(15):
        async with (
            open_site("server", listen=WS) as server,
            open_site("plain", listen="tcp://127.0.0.1:0") as plain,
        ):
            serve(recorder, server)
            async with open_site("site-1") as site1:
                with pytest.raises(HandshakeError, match="not a WebSocket upgrade"):
                    await site1.connect((plain.address or "").replace("tcp://", "ws://"))
                with pytest.raises(HandshakeError, match="invalid handshake"):
                    await site1.connect(f"tcp://127.0.0.1:{port_of(server)}")
                assert site1.peers == []
            assert server.peers == []
            assert plain.peers == []
            await still_serves(server, recorder, "after")
    assert "malformed WebSocket upgrade request" in caplog.text
    assert [key for key in recorder.sessions if key[1] != "after"] == []


async def test_a_silent_client_does_not_hold_up_the_listener(
    caplog: pytest.LogCaptureFixture,
) -> None:
    recorder = Recorder()
    with trio.fail_after(15):
        async with open_site("server", listen=WS, handshake_timeout=1.5) as server:
            serve(recorder, server)
            silent = await trio.open_tcp_stream("127.0.0.1", port_of(server))
            await silent.send_all(b"GET /fedstream HTTP/1.1\r\nHost: x\r\n")  # never ends
            await still_serves(server, recorder, "meanwhile")
            with caplog.at_level(logging.WARNING), trio.fail_after(5):
                assert await silent.receive_some(1024) == b""  # dropped after the timeout
            await silent.aclose()
    assert "no WebSocket upgrade within handshake_timeout" in caplog.text


# --------------------------------------------------------- hostile peers


@pytest.mark.parametrize(
    "request_bytes",
    [
        # HTTP, but no upgrade
        b"GET /fedstream HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
        # an upgrade without a key
        b"GET /fedstream HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\r\n",
        # not HTTP at all
        b"\x16\x03\x01\x02\x00garbage\r\n\r\n",
    ],
    ids=["no-upgrade", "no-key", "not-http"],
)
async def test_a_malformed_upgrade_request_is_refused_and_logged(
    request_bytes: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    recorder = Recorder()
    with trio.fail_after(15):
        async with open_site("server", listen=WS) as server:
            serve(recorder, server)
            raw = await trio.open_tcp_stream("127.0.0.1", port_of(server))
            await raw.send_all(request_bytes)
            answer = b""
            while chunk := await raw.receive_some(4096):
                answer += chunk
            await raw.aclose()
            assert server.peers == []
            await still_serves(server, recorder, "after")
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert "refused a WebSocket connection from 127.0.0.1:" in caplog.text
    assert "malformed WebSocket upgrade request" in caplog.text
    assert [key for key in recorder.sessions if key[1] != "after"] == []


async def hostile_client(server: Site, message: bytes | str) -> trio_websocket.CloseReason | None:
    """Send ``message`` on a plain WebSocket to ``server``; the close reason it got back."""
    async with trio_websocket.open_websocket_url(
        server.address or "", max_message_size=4 * MESSAGE_SIZE
    ) as ws:
        try:
            await ws.send_message(message)
            with trio.fail_after(5):
                while True:
                    await ws.get_message()
        except trio_websocket.ConnectionClosed as exc:
            return exc.reason
    return None


@pytest.mark.parametrize(
    ("message", "code", "logged"),
    [
        ("hello", 1003, "sent a text message"),
        (b"\x00" * (MESSAGE_SIZE + 1), 1009, f"message larger than {MESSAGE_SIZE} bytes"),
    ],
    ids=["text", "oversized"],
)
async def test_a_text_or_oversized_message_is_refused_typed_and_logged(
    message: bytes | str, code: int, logged: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Refused during the HELLO exchange by the site, and after it by the
    stream itself (a typed RemoteProtocolError from receive_some)."""
    recorder = Recorder()
    with trio.fail_after(20):
        async with open_site("server", listen=WS) as server:
            serve(recorder, server)
            async with open_site("site-1", connect=[server.address or ""]) as site1:
                reason = await hostile_client(server, message)
                assert reason is not None
                assert reason.code == code
                assert server.peers == ["site-1"]  # undisturbed
                assert await send(site1, "meanwhile", ["server"]) == (OK, None)
            await still_serves(server, recorder, "after")
    assert logged in caplog.text
    assert "incoming handshake failed" in caplog.text
    assert recorder.sessions[("server", "meanwhile")].seqs == [0, 1, 2]

    # The same after the handshake: what the engine's reader gets is typed.
    errors: list[BaseException] = []

    async def reader(stream: trio.abc.Stream) -> None:
        stream = await transport.upgrade(stream)  # as the site does, counted as pending
        try:
            await stream.receive_some()
        except Exception as exc:
            errors.append(exc)
        await stream.aclose()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            transport = make_transport("ws", TransportConfig(nursery=nursery))
            url = await nursery.start(transport.serve, WS, reader)
            async with trio_websocket.open_websocket_url(url) as ws:
                await ws.send_message(message)
                with pytest.raises(trio_websocket.ConnectionClosed) as closed:
                    await ws.get_message()
            assert closed.value.reason.code == code
            nursery.cancel_scope.cancel()
    assert len(errors) == 1
    assert isinstance(errors[0], RemoteProtocolError)
    assert isinstance(errors[0], fedstream.FedstreamError)
    assert logged in str(errors[0])


async def test_a_text_message_on_an_established_link_drops_only_that_link(
    caplog: pytest.LogCaptureFixture,
) -> None:
    recorder = Recorder()
    with trio.fail_after(20):
        async with (
            open_site("server", listen=WS) as server,
            open_site("site-1", connect=[server.address or ""], reconnect=False) as site1,
            open_site("site-2", connect=[server.address or ""]) as site2,
        ):
            serve(recorder, server)
            await server.wait_for_peers(["site-1", "site-2"])
            stream = site1._connections["server"].stream
            assert isinstance(stream, WebSocketStream)
            await stream._ws.send_message("not a frame")
            while "site-1" in server.peers or site1.peers:
                await trio.sleep(0.01)
            assert server.peers == ["site-2"]
            assert await send(site2, "meanwhile", ["server"]) == (OK, None)
    assert "protocol error from site-1" in caplog.text
    assert "sent a text message" in caplog.text
    assert recorder.sessions[("server", "meanwhile")].seqs == [0, 1, 2]


async def test_a_message_of_exactly_message_size_is_accepted() -> None:
    received: list[bytes] = []

    async def reader(stream: trio.abc.Stream) -> None:
        stream = await transport.upgrade(stream)  # as the site does, counted as pending
        while sum(map(len, received)) < MESSAGE_SIZE:
            received.append(await stream.receive_some())
        await stream.aclose()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            transport = make_transport("ws", TransportConfig(nursery=nursery))
            url = await nursery.start(transport.serve, WS, reader)
            async with trio_websocket.open_websocket_url(url) as ws:
                await ws.send_message(b"\x07" * MESSAGE_SIZE)
                with pytest.raises(trio_websocket.ConnectionClosed) as closed:
                    await ws.get_message()
            assert closed.value.reason.code == 1000
            nursery.cancel_scope.cancel()
    assert b"".join(received) == b"\x07" * MESSAGE_SIZE


# ------------------------------------------------------ wss and identity


async def test_mutual_tls_over_wss_with_secure_streams() -> None:
    recorder = Recorder()
    with trio.fail_after(15):
        async with open_site("server", listen=WSS, tls=tls("server")) as server:
            serve(recorder, server)
            async with open_site("site-1", connect=[server.address or ""], tls=tls("site-1")) as s1:
                await server.wait_for_peers(["site-1"])
                serve(recorder, s1)
                assert await send(s1, "up", ["server"], secure=True) == (OK, None)
                assert await send(server, "down", ["site-1"], secure=True) == (OK, None)
    assert recorder.all_problems() == []
    assert recorder.sessions[("server", "up")].seqs == [0, 1, 2]
    assert recorder.sessions[("site-1", "down")].seqs == [0, 1, 2]


async def test_secure_is_refused_over_plain_ws() -> None:
    with trio.fail_after(15):
        async with (
            open_site("server", listen=WS, tls=tls("server")) as server,
            open_site("site-1", connect=[server.address or ""], tls=tls("site-1")) as site1,
        ):
            with pytest.raises(fedstream.FedstreamError, match="secure=True needs"):
                await send(site1, "x", ["server"], secure=True)


async def test_a_certificate_for_another_name_is_refused_over_wss(
    caplog: pytest.LogCaptureFixture,
) -> None:
    recorder = Recorder()
    with trio.fail_after(15):
        async with open_site("server", listen=WSS, tls=tls("server")) as server:
            serve(recorder, server)
            async with open_site("site-1", tls=tls("site-2")) as impostor:
                with pytest.raises(HandshakeError, match="certificate proves 'site-2'"):
                    await impostor.connect(server.address or "")
                assert impostor.peers == []
            assert server.peers == []
            await still_serves(server, recorder, "after")
    assert "certificate proves 'site-2'" in caplog.text
    assert [key for key in recorder.sessions if key[1] != "after"] == []


@pytest.mark.parametrize(
    ("who", "listener_log"),
    [("foreign", "unable to get local issuer"), ("expired", "certificate has expired")],
)
async def test_a_certificate_the_wss_listener_cannot_trust_is_refused(
    who: str, listener_log: str, caplog: pytest.LogCaptureFixture
) -> None:
    """TLS 1.3: the refusal reaches the dialer during the upgrade; it says why."""
    if who == "foreign":
        cert, key = foreign().files("site-1")
        config = TLSConfig(cert, key, deployment().ca_path)
    else:
        config = deployment().config("site-1", expired=True)
    recorder = Recorder()
    with trio.fail_after(15):
        async with open_site("server", listen=WSS, tls=tls("server")) as server:
            serve(recorder, server)
            async with open_site("site-1", tls=config) as site1:
                with pytest.raises(HandshakeError, match="may not trust our certificate"):
                    await site1.connect(server.address or "")
                assert site1.peers == []
            assert server.peers == []
            await still_serves(server, recorder, "after")
    assert listener_log in caplog.text
    assert [key for key in recorder.sessions if key[1] != "after"] == []


def test_the_protocol_document_states_the_message_bound() -> None:
    doc = (Path(__file__).resolve().parent.parent / "docs" / "protocol.md").read_text()
    section = doc.split("### WebSocket", 1)[1].split("\n## ", 1)[0]
    assert f"at most **{MESSAGE_SIZE} bytes**" in section
    assert "1003" in section
    assert "1009" in section


async def test_a_url_without_a_port_dials_the_http_default() -> None:
    dialed: list[str] = []

    class Recording(TcpTransport):
        async def connect(self, url: str) -> trio.abc.Stream:
            dialed.append(url)
            raise ConnectionRefusedError("test: not dialing out")

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            for scheme in ("ws", "wss"):
                config = TransportConfig(nursery=nursery, tls=tls("site-1"))
                transport = make_transport(scheme, config)
                transport._inner = Recording()  # type: ignore[attr-defined]
                with pytest.raises(ConnectionRefusedError):
                    await transport.connect(f"{scheme}://fedstream.invalid/path")
    assert dialed == ["ws://fedstream.invalid:80", "wss://fedstream.invalid:443"]
