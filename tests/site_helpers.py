"""Helpers for tests that run whole sites over one transport or another:
register a recording consumer, stream a few tagged objects, check that a
legitimate peer still gets through."""

from __future__ import annotations

from typing import Any

from engine_helpers import CHANNEL, TOPIC, AsyncRecordingProducer, Recorder, make_factory
from fedstream import ReturnCode, Site, TLSConfig, open_site
from tls_certs import deployment

OK = ReturnCode.OK


def tls(name: str) -> TLSConfig:
    """A certificate for site ``name`` from the shared test deployment."""
    return deployment().config(name)


def serve(recorder: Recorder, site: Site) -> None:
    """Record every stream ``site`` receives on the test channel."""
    site.register_stream_processing(
        CHANNEL, TOPIC, make_factory(recorder, site.name, is_async=True)
    )


async def send(
    site: Site, tag: str, targets: list[str], n: int = 3, size: int = 10_000, **kw: Any
) -> Any:
    """Stream ``n`` objects tagged ``tag`` to ``targets``; ``stream_objects``' result."""
    producer = AsyncRecordingProducer(tag, [size] * n)
    return await site.stream_objects(CHANNEL, TOPIC, {"stream": tag}, targets, producer, None, **kw)


async def still_serves(server: Site, recorder: Recorder, tag: str) -> None:
    """A legitimate ``site-ok`` can connect to ``server`` and stream to it
    (with a certificate where the server's address needs one)."""
    address = server.address
    options = {"tls": tls("site-ok")} if address.startswith(("tls:", "wss:")) else {}
    async with open_site("site-ok", connect=[address], **options) as ok:
        assert await send(ok, tag, [server.name]) == (OK, None)
    assert recorder.sessions[(server.name, tag)].seqs == [0, 1, 2]
