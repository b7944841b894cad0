"""TLS links: identity from certificates, refusals, ``secure=True``, reconnection.

Real sockets on 127.0.0.1 port 0, certificates from ``trustme`` (see
``tls_certs``). Every refusal test checks three things: the dialer gets a
``HandshakeError`` (or the raw peer is dropped), nothing is delivered, and
the listener goes on serving a legitimate peer.
"""

from __future__ import annotations

import functools
import logging
import socket
import ssl
from pathlib import Path

import pytest
import trio

import fedstream
from engine_helpers import CHANNEL, TOPIC, AsyncRecordingProducer, Recorder
from fedstream import FedstreamError, HandshakeError, ReturnCode, TLSConfig, open_site
from fedstream._ratelimit import RateLimit
from site_helpers import send, serve, still_serves, tls
from tls_certs import deployment, foreign

TLS = "tls://127.0.0.1:0"
OK = ReturnCode.OK


# ------------------------------------------------------------------- config


def test_tls_config_checks_its_files(tmp_path: Path) -> None:
    cert, key = deployment().files("site-1")
    config = TLSConfig(str(cert), key, deployment().ca_path)
    assert config.cert == cert
    assert config.mutual
    assert not TLSConfig(cert, key).mutual
    with pytest.raises(FileNotFoundError, match=r"ca file .*nope\.crt.* does not exist"):
        TLSConfig(cert, key, tmp_path / "nope.crt")
    with pytest.raises(FileNotFoundError, match=r"key file .* is not a file"):
        TLSConfig(cert, tmp_path)
    with pytest.raises(TypeError, match="path"):
        TLSConfig(cert, 3)  # type: ignore[arg-type]


async def test_a_key_that_does_not_match_the_certificate_fails_at_open() -> None:
    cert, _ = deployment().files("site-1")
    _, other_key = deployment().files("site-2")
    bad = TLSConfig(cert, other_key, deployment().ca_path)
    with trio.fail_after(10), pytest.raises(ValueError, match="cannot use certificate"):
        async with open_site("site-1", listen=TLS, tls=bad):
            pass


async def test_tls_url_without_certificates_is_a_clear_error() -> None:
    with trio.fail_after(10), pytest.raises(ValueError, match="tls:// needs certificates"):
        async with open_site("a", listen=TLS):
            pass


# ---------------------------------------------------------------- the happy path


async def test_mutual_tls_end_to_end_with_secure_streams() -> None:
    recorder = Recorder()
    with trio.fail_after(15):
        async with open_site("server", listen=TLS, tls=tls("server")) as server:
            assert server.address is not None
            assert server.address.startswith("tls://127.0.0.1:")
            assert int(server.address.rsplit(":", 1)[1]) > 0
            serve(recorder, server)
            async with open_site("site-1", connect=[server.address], tls=tls("site-1")) as site1:
                await server.wait_for_peers(["site-1"])
                serve(recorder, site1)
                assert await send(site1, "up", ["server"], secure=True) == (OK, None)
                assert await send(server, "down", ["site-1"], secure=True) == (OK, None)
    assert recorder.all_problems() == []
    assert recorder.sessions[("server", "up")].seqs == [0, 1, 2]
    assert recorder.sessions[("site-1", "down")].seqs == [0, 1, 2]


# ------------------------------------------------------------------- refusals


async def test_a_certificate_for_another_name_is_refused_on_the_listener(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A valid certificate for "site-2" claiming "site-1": refused, never registered."""
    recorder = Recorder()
    with trio.fail_after(15):
        async with open_site("server", listen=TLS, tls=tls("server")) as server:
            serve(recorder, server)
            async with open_site("site-1", tls=tls("site-2")) as impostor:
                with pytest.raises(HandshakeError, match="certificate proves 'site-2'"):
                    await impostor.connect(server.address or "")
                assert impostor.peers == []
            assert server.peers == []
            assert "certificate proves 'site-2'" in caplog.text
            await still_serves(server, recorder, "after")
    assert [key for key in recorder.sessions if key[1] != "after"] == []


async def test_a_listener_whose_certificate_proves_another_name_is_refused_by_the_dialer() -> None:
    recorder = Recorder()
    with trio.fail_after(15):
        async with (
            open_site("server", listen=TLS, tls=tls("other")) as server,
            open_site("site-1", tls=tls("site-1")) as site1,
        ):
            serve(recorder, site1)
            with pytest.raises(HandshakeError, match="certificate proves 'other'"):
                await site1.connect(server.address or "")
            assert site1.peers == []
            with trio.fail_after(5):
                while server.peers:
                    await trio.sleep(0.01)
            with pytest.raises(fedstream.UnknownTargetError):
                await send(server, "x", ["site-1"])
    assert recorder.sessions == {}


@pytest.mark.parametrize(
    ("who", "dialer_error", "listener_log"),
    [
        pytest.param(
            "foreign", "may not trust our certificate", "unable to get local issuer", id="foreign"
        ),
        pytest.param(
            "expired", "may not trust our certificate", "certificate has expired", id="expired"
        ),
    ],
)
async def test_a_certificate_the_listener_cannot_trust_is_refused(
    who: str, dialer_error: str, listener_log: str, caplog: pytest.LogCaptureFixture
) -> None:
    if who == "foreign":
        cert, key = foreign().files("site-1")
        # It trusts our CA, so only the listener's check can refuse it.
        config = TLSConfig(cert, key, deployment().ca_path)
    else:
        config = deployment().config("site-1", expired=True)
    recorder = Recorder()
    with trio.fail_after(15):
        async with open_site(
            "server", listen=TLS, tls=tls("server"), handshake_timeout=5
        ) as server:
            serve(recorder, server)
            start = trio.current_time()
            async with open_site("site-1", tls=config) as site1:
                with pytest.raises(HandshakeError, match=dialer_error):
                    await site1.connect(server.address or "")
                assert site1.peers == []
            assert trio.current_time() - start < 5
            assert server.peers == []
            await still_serves(server, recorder, "after")
    assert listener_log in caplog.text
    assert [key for key in recorder.sessions if key[1] != "after"] == []


@pytest.mark.parametrize(
    ("who", "message"),
    [("foreign", "self-signed|unable to get local issuer"), ("expired", "certificate has expired")],
)
async def test_a_listener_the_dialer_cannot_trust_is_refused(who: str, message: str) -> None:
    config = (
        foreign().config("server")
        if who == "foreign"
        else deployment().config("server", expired=True)
    )
    with trio.fail_after(15):
        async with open_site("server", listen=TLS, tls=config) as server:
            async with open_site("site-1", tls=tls("site-1")) as site1:
                with pytest.raises(HandshakeError, match=f"failed verification: ({message})"):
                    await site1.connect(server.address or "")
                assert site1.peers == []
            assert server.peers == []


async def test_a_dialer_without_a_certificate_is_refused(
    caplog: pytest.LogCaptureFixture,
) -> None:
    recorder = Recorder()
    context = ssl.create_default_context(cafile=str(deployment().ca_path))
    with trio.fail_after(15):
        async with open_site("server", listen=TLS, tls=tls("server")) as server:
            serve(recorder, server)
            port = int((server.address or "").rsplit(":", 1)[1])
            stream = await trio.open_ssl_over_tcp_stream("127.0.0.1", port, ssl_context=context)
            # TLS 1.3: the client's handshake ends before the server has
            # checked it; the refusal arrives on the first read.
            await stream.do_handshake()
            with pytest.raises(trio.BrokenResourceError):
                await stream.receive_some(1024)
            await stream.aclose()
            assert server.peers == []
            await still_serves(server, recorder, "after")
    assert "certificate" in caplog.text
    assert [key for key in recorder.sessions if key[1] != "after"] == []


async def test_plain_tcp_and_tls_do_not_mix(caplog: pytest.LogCaptureFixture) -> None:
    recorder = Recorder()
    with trio.fail_after(15):
        async with (
            open_site("server", listen=TLS, tls=tls("server")) as server,
            open_site("plain", listen="tcp://127.0.0.1:0") as plain,
        ):
            serve(recorder, server)
            tls_port = (server.address or "").rsplit(":", 1)[1]
            async with open_site("site-1", tls=tls("site-1")) as site1:
                with pytest.raises(HandshakeError, match="dial it as tls://"):
                    await site1.connect(f"tcp://127.0.0.1:{tls_port}")
                with pytest.raises(HandshakeError, match="does not speak TLS"):
                    await site1.connect((plain.address or "").replace("tcp://", "tls://"))
                assert site1.peers == []
            assert server.peers == []
            assert plain.peers == []
            await still_serves(server, recorder, "after")
    assert "does not speak TLS" in caplog.text
    # The plain listener names the likely cause (a ClientHello is no HELLO).
    assert "a TLS client dialing a plain listener?" in caplog.text
    assert [key for key in recorder.sessions if key[1] != "after"] == []


async def test_a_silent_tcp_client_does_not_hold_up_the_tls_listener(
    caplog: pytest.LogCaptureFixture,
) -> None:
    recorder = Recorder()
    with trio.fail_after(15):
        async with open_site(
            "server", listen=TLS, tls=tls("server"), handshake_timeout=2.0
        ) as server:
            serve(recorder, server)
            port = int((server.address or "").rsplit(":", 1)[1])
            silent = await trio.open_tcp_stream("127.0.0.1", port)
            # Served while the silent client's TLS handshake is pending.
            await still_serves(server, recorder, "meanwhile")
            with caplog.at_level(logging.WARNING), trio.fail_after(5):
                assert await silent.receive_some(1024) == b""  # dropped after the timeout
            await silent.aclose()
    assert "no TLS handshake within 2.0 s" in caplog.text


# -------------------------------------------------------------------- secure


async def test_secure_is_refused_over_tcp_naming_the_targets_and_producing_nothing() -> None:
    with trio.fail_after(15):
        async with (
            open_site("server", listen=TLS, tls=tls("server")) as server,
            open_site("plain", listen="tcp://127.0.0.1:0") as plain,
            open_site(
                "site-1", connect=[server.address or "", plain.address or ""], tls=tls("site-1")
            ) as site1,
        ):
            producer = AsyncRecordingProducer("s", [100])
            with pytest.raises(FedstreamError, match=r"'plain' is not on one") as info:
                await site1.stream_objects(
                    CHANNEL, TOPIC, {"stream": "s"}, ["server", "plain"], producer, None, True, True
                )
            assert "'server'" not in str(info.value)
            assert producer.next_seq == 0


async def test_secure_is_refused_when_the_listener_does_not_authenticate_dialers() -> None:
    cert, key = deployment().files("server")
    ca = deployment().ca_path
    server_only = TLSConfig(cert, key)  # no CA: does not ask dialers for a certificate
    with trio.fail_after(15):
        async with open_site("server", listen=TLS, tls=server_only) as server:
            assert server.address is not None
            async with open_site("site-1", tls=tls("site-1")) as site1:
                assert tls("site-1").ca == ca
                await site1.connect(server.address)
                await server.wait_for_peers(["site-1"])
                with pytest.raises(FedstreamError, match="'site-1' is not on one"):
                    await send(server, "s", ["site-1"], secure=True)
                # site-1 checked the server's certificate, but the server
                # never checked site-1's: not mutual from this side either.
                with pytest.raises(FedstreamError, match="'server' is not on one"):
                    await send(site1, "s", ["server"], secure=True)


async def test_sites_dialing_each_other_over_mutual_tls_are_refused_not_swapped() -> None:
    """Replacing a certified duplicate applies to links the peer dialed only."""
    with trio.fail_after(15):
        async with (
            open_site("a", listen=TLS, tls=tls("a")) as a,
            open_site("b", listen=TLS, tls=tls("b")) as b,
        ):
            assert await a.connect(b.address or "") == "b"
            await b.wait_for_peers(["a"])
            link = a._connections["b"]
            with pytest.raises(HandshakeError, match="already connected"):
                await b.connect(a.address or "")
            await trio.sleep(0.3)
            assert a._connections["b"] is link
            assert a.peers == ["b"]
            assert b.peers == ["a"]


async def test_a_listener_that_never_answers_the_tls_handshake_times_out() -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:

            async def mute(stream: trio.SocketStream) -> None:
                async with stream:
                    await trio.sleep_forever()

            await nursery.start(trio.serve_listeners, mute, listeners)
            async with open_site("site-1", tls=tls("site-1"), handshake_timeout=0.5) as site1:
                start = trio.current_time()
                with pytest.raises(fedstream.ConnectionLostError, match="within handshake_timeout"):
                    await site1.connect(f"tls://127.0.0.1:{port}")
                assert trio.current_time() - start < 2
            nursery.cancel_scope.cancel()


async def test_a_tls_dial_that_times_out_closes_its_socket() -> None:
    """``_dial`` wraps ``transport.connect`` in ``fail_after(handshake_timeout)``; that
    deadline falls before ``TlsTransport._handshake``'s own ``move_on_after`` (started
    later), so the cancellation escapes ``_handshake`` without ``aclose_forcefully``.
    The socket then stays open until the garbage collector finds it (a re-dial loop
    against a silent listener piles up descriptors; ``ResourceWarning: unclosed socket``)."""
    accepted: list[trio.SocketStream] = []

    async def silent(stream: trio.SocketStream) -> None:
        accepted.append(stream)
        await trio.sleep_forever()

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(
                functools.partial(trio.serve_tcp, silent, 0, host="127.0.0.1")
            )
            port = listeners[0].socket.getsockname()[1]
            tls = deployment().config("a")
            async with fedstream.open_site("a", tls=tls, handshake_timeout=0.3) as a:
                try:
                    await a.connect(f"tls://127.0.0.1:{port}")
                except fedstream.ConnectionLostError:
                    pass
                else:
                    raise AssertionError("a silent listener cannot complete a TLS handshake")
                assert len(accepted) == 1
                closed = False
                with trio.move_on_after(1):
                    while await accepted[0].receive_some():  # the ClientHello, then EOF
                        pass
                    closed = True
                assert closed, "the dialer's socket is still open after its dial failed"
            nursery.cancel_scope.cancel()


async def test_an_uncertified_claim_does_not_lock_out_the_certified_site() -> None:
    """Issue 11's attack, on a site that has mutual TLS but also listens on tcp://
    (nothing warns against that): an impostor claims "site-1" over plain TCP first; the
    real site-1, proving its name with a certificate, is then refused DUPLICATE_SITE and
    non-secure streams to "site-1" go to the impostor."""
    d = deployment()
    with trio.fail_after(15):
        async with (
            fedstream.open_site(
                "server", listen=["tls://127.0.0.1:0", "tcp://127.0.0.1:0"], tls=d.config("server")
            ) as server,
            fedstream.open_site("site-1", connect=[server.addresses[1]], reconnect=False),
            fedstream.open_site("site-1", tls=d.config("site-1"), reconnect=False) as real,
        ):
            await server.wait_for_peers(["site-1"])
            assert await real.connect(server.addresses[0]) == "server"
            assert server.peers == ["site-1"]
            assert server._connections["site-1"] in server._mutual


async def test_the_dialer_checks_the_listener_certificate_names_the_host_it_dialed(
    tmp_path: Path,
) -> None:
    """Coverage the TLS tests lack: every test certificate carries 127.0.0.1, so none
    shows that a listener whose valid certificate (same CA, right site name) does not
    name the dialed host is refused. This one passes today; it guards check_hostname."""
    d = deployment()
    leaf = d.ca.issue_cert("server", "10.9.9.9", common_name="server")
    cert, key = tmp_path / "server.crt", tmp_path / "server.key"
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    tls = fedstream.TLSConfig(cert, key, d.ca_path)
    with trio.fail_after(15):
        async with (
            fedstream.open_site("server", listen="tls://127.0.0.1:0", tls=tls) as server,
            fedstream.open_site("site-1", tls=d.config("site-1"), reconnect=False) as site1,
        ):
            with pytest.raises(fedstream.HandshakeError, match=r"127\.0\.0\.1"):
                await site1.connect(server.address)
            assert server.peers == []
            assert site1.peers == []


def test_rate_limit_allows_one_event_per_interval_and_counts_the_rest() -> None:
    now = [100.0]
    limit = RateLimit(10.0, clock=lambda: now[0])
    assert limit.allow() == 0
    assert [limit.allow() for _ in range(5)] == [None] * 5
    now[0] += 9.9
    assert limit.allow() is None
    now[0] += 0.1
    assert limit.allow() == 6
    assert limit.allow() is None


async def test_refused_tls_handshakes_warn_once_per_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Any client can make a listener refuse a handshake: a flood must not flood the log."""
    caplog.set_level(logging.DEBUG, logger="fedstream._engine._site")
    recorder = Recorder()
    with trio.fail_after(15):
        async with open_site("server", listen=TLS, tls=tls("server")) as server:
            serve(recorder, server)
            port = int((server.address or "").rsplit(":", 1)[1])
            for _ in range(5):
                garbage = await trio.open_tcp_stream("127.0.0.1", port)
                await garbage.send_all(b"GET / HTTP/1.0\r\n\r\n")
                while await garbage.receive_some(1024):  # refused (an alert, maybe), closed
                    pass
                await garbage.aclose()
            await still_serves(server, recorder, "after")
    refusals = [r for r in caplog.records if "refused a connection" in r.getMessage()]
    assert [r.levelno for r in refusals] == [logging.WARNING] + [logging.DEBUG] * 4
    assert "0 more refused since the last such warning" in refusals[0].getMessage()


# -------------------------------------------------------------------- writes


@pytest.mark.skipif(not hasattr(socket, "TCP_NOTSENT_LOWAT"), reason="no TCP_NOTSENT_LOWAT")
async def test_the_socket_under_a_tls_link_takes_a_whole_frame_at_once() -> None:
    """Both ends raise trio's 16 KiB unsent limit under the TLS stream, as on plain TCP.

    With trio's limit, each encrypted 1 MiB chunk went out in 16 KiB pieces,
    the writer waking for each: about three times the sends and waits.
    """
    with trio.fail_after(15):
        async with (
            open_site("server", listen=TLS, tls=tls("server")) as server,
            open_site("site-1", connect=[server.address or ""], tls=tls("site-1")) as site1,
        ):
            await server.wait_for_peers(["site-1"])
            for site, peer in ((site1, "server"), (server, "site-1")):
                conn = site._connections[peer]
                assert isinstance(conn.stream, trio.SSLStream)
                raw = conn.stream.transport_stream
                assert isinstance(raw, trio.SocketStream)
                unsent = raw.getsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT)
                assert unsent > conn.max_body, (site.name, unsent)
