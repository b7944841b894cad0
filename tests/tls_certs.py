"""Certificates for the TLS tests, made with ``trustme`` once per test process.

:func:`deployment` is one CA with a certificate per site name (CN and DNS SAN
= the name, plus ``127.0.0.1`` so that it can also listen on loopback);
:func:`foreign` is a second, unrelated CA. Files live in one temporary
directory removed at exit.
"""

from __future__ import annotations

import atexit
import datetime
import functools
import tempfile
from pathlib import Path

import trustme

import fedstream

__all__ = ["Deployment", "deployment", "foreign"]

_DIR = tempfile.TemporaryDirectory(prefix="fedstream-tls-")
atexit.register(_DIR.cleanup)


class Deployment:
    """One CA and the certificates it issued, written to files on demand."""

    def __init__(self, tag: str) -> None:
        self.tag = tag
        self.ca = trustme.CA()
        self.dir = Path(_DIR.name) / tag
        self.dir.mkdir()
        self.ca_path = self.dir / "ca.crt"
        self.ca.cert_pem.write_to_path(str(self.ca_path))
        self._configs: dict[tuple[str, bool], fedstream.TLSConfig] = {}

    def files(self, name: str, *, expired: bool = False) -> tuple[Path, Path]:
        """Certificate and key files for site ``name``."""
        stem = f"{name}-expired" if expired else name
        cert, key = self.dir / f"{stem}.crt", self.dir / f"{stem}.key"
        if not cert.exists():
            dates = {}
            if expired:
                now = datetime.datetime.now(datetime.timezone.utc)
                dates = {
                    "not_before": now - datetime.timedelta(days=30),
                    "not_after": now - datetime.timedelta(days=1),
                }
            leaf = self.ca.issue_cert(name, "127.0.0.1", common_name=name, **dates)
            leaf.cert_chain_pems[0].write_to_path(str(cert))
            leaf.private_key_pem.write_to_path(str(key))
        return cert, key

    def config(self, name: str, *, expired: bool = False) -> fedstream.TLSConfig:
        """A mutual-TLS config for site ``name`` trusting this deployment's CA."""
        cached = self._configs.get((name, expired))
        if cached is None:
            cert, key = self.files(name, expired=expired)
            cached = self._configs[(name, expired)] = fedstream.TLSConfig(cert, key, self.ca_path)
        return cached


@functools.cache
def deployment() -> Deployment:
    return Deployment("deployment")


@functools.cache
def foreign() -> Deployment:
    return Deployment("foreign")
