"""TLS for site links: the configuration, SSL contexts, and identity from certificates.

A site with a :class:`TLSConfig` speaks TLS 1.2 or later on ``tls://`` URLs.
With a ``ca``, both ends present a certificate and both verify the other's
against that CA (mutual TLS); the dialer also checks the listener's
certificate for the host it dialed, as any TLS client does.

The names a verified certificate proves are its subject common name and its
DNS subject-alternative names (:func:`proven_names`). The site compares them
with the name the peer claims in its HELLO: the certificate, not the HELLO,
says who the peer is.
"""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

__all__ = ["TLSConfig", "describe_tls_error", "proven_names"]


def _existing_file(value: object, what: str) -> Path:
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"TLSConfig {what} must be a path (str or os.PathLike), not {value!r}")
    path = Path(value)
    if not path.is_file():
        reason = "is not a file" if path.exists() else "does not exist"
        raise FileNotFoundError(f"TLSConfig {what} file {str(path)!r} {reason}")
    return path


@dataclass(frozen=True)
class TLSConfig:
    """Where a site finds its certificate, its private key and the CA it trusts.

    Args:
        cert: this site's certificate (PEM), optionally followed by its chain.
            Its subject common name or a DNS subject-alternative name must be
            the site's name; a listener's certificate also names the host or
            IP address peers dial.
        key: the certificate's private key (PEM, unencrypted).
        ca: the CA certificate(s) (PEM) that peers' certificates must chain
            to. With it, links are mutually authenticated: a listener asks
            every dialer for a certificate and refuses one without. Without
            it, a dialer verifies listeners against the system's trusted CAs
            and a listener does not ask dialers for certificates.

    Every file must exist when the config is made (``FileNotFoundError``
    otherwise); whether they hold a matching certificate and key is checked
    when a site that uses the config opens.
    """

    cert: Path
    key: Path
    ca: Path | None = None

    def __init__(
        self,
        cert: str | os.PathLike[str],
        key: str | os.PathLike[str],
        ca: str | os.PathLike[str] | None = None,
    ) -> None:
        object.__setattr__(self, "cert", _existing_file(cert, "cert"))
        object.__setattr__(self, "key", _existing_file(key, "key"))
        object.__setattr__(self, "ca", None if ca is None else _existing_file(ca, "ca"))

    @property
    def mutual(self) -> bool:
        """Whether links made with this config authenticate both ends."""
        return self.ca is not None

    def _context(self, purpose: ssl.Purpose) -> ssl.SSLContext:
        context = ssl.create_default_context(
            purpose, cafile=None if self.ca is None else str(self.ca)
        )
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            context.load_cert_chain(str(self.cert), str(self.key))
        except ssl.SSLError as exc:
            raise ValueError(
                f"cannot use certificate {str(self.cert)!r} with key {str(self.key)!r}: "
                f"{exc.reason or exc}"
            ) from exc
        return context

    def server_context(self) -> ssl.SSLContext:
        """The context a listener wraps accepted streams in."""
        context = self._context(ssl.Purpose.CLIENT_AUTH)
        if self.ca is not None:
            context.verify_mode = ssl.CERT_REQUIRED
        return context

    def client_context(self) -> ssl.SSLContext:
        """The context a dialer wraps its stream in (checks the listener's host name)."""
        context = self._context(ssl.Purpose.SERVER_AUTH)
        context.check_hostname = True
        context.verify_mode = ssl.CERT_REQUIRED
        return context


def proven_names(stream: trio.abc.Stream) -> frozenset[str] | None:
    """The names the peer's verified certificate proves, or ``None`` if it proved none.

    ``None`` for a stream that is not TLS, and for a TLS stream whose peer
    presented no certificate (a listener without a ``ca`` does not ask for
    one). Call it after the TLS handshake. A stream that runs over TLS
    without being a ``trio.SSLStream`` itself (``wss://``) names its TLS
    layer as its ``tls_stream`` attribute.
    """
    if not isinstance(stream, trio.SSLStream):
        layer = getattr(stream, "tls_stream", None)
        if not isinstance(layer, trio.SSLStream):
            return None
        stream = layer
    try:
        cert: dict[str, Any] | None = stream.getpeercert()
    except (ValueError, trio.NeedHandshakeError):  # no handshake (yet)
        return None
    if not cert:
        return None
    names: set[str] = set()
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                names.add(value)
    for kind, value in cert.get("subjectAltName", ()):
        if kind == "DNS":
            names.add(value)
    return frozenset(names)


#: What the peer's TLS alerts mean for us, by OpenSSL reason.
_ALERTS = {
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": "the peer requires a client certificate and we sent none",
    "TLSV1_ALERT_UNKNOWN_CA": "the peer does not trust the CA that signed our certificate",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "the peer says our certificate has expired",
    "SSLV3_ALERT_BAD_CERTIFICATE": "the peer refused our certificate",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": "the peer refused our certificate",
    "SSLV3_ALERT_HANDSHAKE_FAILURE": "the peer refused the TLS handshake",
    "WRONG_VERSION_NUMBER": "the peer does not speak TLS (a plain tcp:// site?)",
    "RECORD_LAYER_FAILURE": "the peer does not speak TLS (a plain tcp:// site?)",
    "HTTP_REQUEST": "the peer does not speak TLS",
    "PACKET_LENGTH_TOO_LONG": "the peer does not speak TLS (a plain tcp:// site?)",
    "UNSUPPORTED_PROTOCOL": "the peer offers only TLS versions older than 1.2",
    "UNEXPECTED_EOF_WHILE_READING": "the peer broke off the TLS handshake "
    "(it may not trust our certificate)",
}


def describe_tls_error(exc: BaseException) -> str:
    """A sentence about why a TLS handshake failed, from the exception trio raised."""
    cause: BaseException | None = exc
    while cause is not None and not isinstance(cause, ssl.SSLError):
        cause = cause.__cause__ or cause.__context__
    if isinstance(cause, ssl.SSLCertVerificationError):
        return f"the peer's certificate failed verification: {cause.verify_message}"
    if isinstance(cause, ssl.SSLError):
        reason = cause.reason or ""
        known = _ALERTS.get(reason)
        detail = reason.lower().replace("_", " ") or str(cause)
        return f"{known} ({detail})" if known else f"TLS error: {detail}"
    if isinstance(exc, trio.BrokenResourceError):
        return "the peer closed the connection during the TLS handshake"
    return f"TLS handshake failed: {exc!r}"
