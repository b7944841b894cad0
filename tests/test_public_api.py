"""The public surface: exactly these names are importable from ``fedstream``."""

from __future__ import annotations

import fedstream

EXPECTED = {
    # the seed contract
    "ConsumerFactory",
    "ObjectConsumer",
    "ObjectProducer",
    "StreamContext",
    "StreamContextKey",
    "StreamableEngine",
    "stream_done_cb_signature",
    # the data model
    "FLContext",
    "ReservedHeaderKey",
    "ReturnCode",
    "Shareable",
    "Signal",
    "make_copy",
    "make_reply",
    # the trio engine
    "BlockingSite",
    "END_RESULT",
    "END_RESULTS",
    "Site",
    "ContainerResult",
    "FileResult",
    "NamePolicy",
    "ReceivedContainer",
    "ReceivedFile",
    "SiteOptions",
    "ConnectionStats",
    "StreamStats",
    "SyncMode",
    "open_site",
    "serve_site",
    "TLSConfig",
    # errors
    "ConnectionLostError",
    "FedstreamError",
    "HandshakeError",
    "LocalProtocolError",
    "ObjectTooLargeError",
    "ProtocolError",
    "RemoteProtocolError",
    "SiteClosedError",
    "UnknownTargetError",
    "__version__",
}


def test_export_list_is_pinned() -> None:
    assert set(fedstream.__all__) == EXPECTED
    assert len(fedstream.__all__) == len(EXPECTED), "duplicates in __all__"


def test_every_export_exists_and_public_modules_are_private() -> None:
    for name in fedstream.__all__:
        assert hasattr(fedstream, name), name
    public_attrs = {
        n
        for n in vars(fedstream)
        if not n.startswith("_") and not isinstance(getattr(fedstream, n), type(fedstream))
    }
    assert public_attrs <= EXPECTED | {"annotations"}


def test_errors_share_one_root_and_split_local_remote() -> None:
    errors = [getattr(fedstream, n) for n in EXPECTED if n.endswith("Error")]
    assert all(issubclass(e, fedstream.FedstreamError) for e in errors)
    assert issubclass(fedstream.LocalProtocolError, fedstream.ProtocolError)
    assert issubclass(fedstream.RemoteProtocolError, fedstream.ProtocolError)
    assert not issubclass(fedstream.RemoteProtocolError, fedstream.LocalProtocolError)
    assert issubclass(fedstream.UnknownTargetError, ValueError)
    assert issubclass(fedstream.ConnectionLostError, ConnectionError)


def test_py_typed_marker_ships() -> None:
    from importlib.resources import files

    assert files("fedstream").joinpath("py.typed").is_file()


def test_site_options_are_the_same_everywhere() -> None:
    """open_site's keywords, serve_site's typed **options and SiteOptions agree."""
    import dataclasses
    import inspect
    import typing

    from fedstream._engine._site import SiteKeywords

    keywords = {
        name
        for name, param in inspect.signature(fedstream.open_site).parameters.items()
        if param.kind is param.KEYWORD_ONLY and name not in ("listen", "connect")
    }
    fields = {f.name for f in dataclasses.fields(fedstream.SiteOptions)}
    assert keywords == fields
    assert set(typing.get_type_hints(SiteKeywords)) == fields
    serve = inspect.signature(fedstream.serve_site).parameters
    assert serve["options"].kind is inspect.Parameter.VAR_KEYWORD


def test_import_loads_no_test_tooling_or_websocket_stack() -> None:
    """``import fedstream`` (every CLI start) pays for neither pytest, pulled in
    by ``trio.testing``, nor trio-websocket until a ``ws://`` URL is used."""
    import subprocess
    import sys

    code = (
        "import sys, fedstream\n"
        "loaded = [m for m in ('trio.testing', 'pytest', 'trio_websocket', 'wsproto')"
        " if m in sys.modules]\n"
        "assert not loaded, loaded\n"
        "from fedstream._transport import WebSocketStream, make_transport, TransportConfig\n"
        "assert 'trio_websocket' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
