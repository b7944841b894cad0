"""Certificates for a deployment: ``fedstream provision OUTDIR NAME... [--host H]``.

fedstream's counterpart of FLARE's provisioning step, reduced to what a
fedstream link needs: one CA, and for each site a key and a certificate
whose subject common name and DNS subject-alternative name are the site's
name (the name the site must claim, see :mod:`fedstream._tls`). A site that
listens also needs the host names or IP addresses its peers dial in its
certificate: ``--host``.

Running it again with the same OUTDIR reuses the CA found there, so sites
can be added later. Private keys are written with mode 0600. Needs the
``cryptography`` package (``pip install 'fedstream[provision]'``).

This module also holds the ``--cert/--key/--ca`` options that every CLI
subcommand opening a site shares.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._tls import TLSConfig

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePrivateKey
    from cryptography.x509 import Certificate

__all__ = ["add_tls_arguments", "main", "provision", "tls_from_args"]

#: Validity of the CA certificate.
CA_DAYS = 3650
#: Default validity of a site certificate.
DEFAULT_DAYS = 825


def add_tls_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--cert/--key/--ca`` to a subcommand that opens a site."""
    group = parser.add_argument_group("TLS (for tls:// URLs)")
    group.add_argument("--cert", help="this site's certificate (PEM)")
    group.add_argument("--key", help="this site's private key (PEM)")
    group.add_argument("--ca", help="CA certificate peers must chain to (mutual TLS)")


def tls_from_args(args: argparse.Namespace) -> TLSConfig | None:
    """The :class:`TLSConfig` the options name, or ``None`` without ``--cert``.

    Raises:
        ValueError: ``--key`` or ``--ca`` without ``--cert``, or the reverse.
        FileNotFoundError: a named file does not exist.
    """
    if args.cert is None and args.key is None:
        if args.ca is not None:
            raise ValueError("--ca needs --cert and --key")
        return None
    if args.cert is None or args.key is None:
        raise ValueError("--cert and --key go together")
    return TLSConfig(args.cert, args.key, args.ca)


def _write(path: Path, data: bytes, *, private: bool) -> None:
    if private:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as out:
            os.fchmod(out.fileno(), 0o600)  # also when the file already existed
            out.write(data)
    else:
        path.write_bytes(data)


def _check_name(name: str) -> None:
    if not name or not name.isascii() or not name.isprintable() or " " in name or len(name) > 253:
        raise ValueError(
            f"site name {name!r} cannot be a certificate's DNS name: "
            "use printable ASCII without spaces"
        )
    if "*" in name:
        # In a DNS subject-alternative name "*" is a wildcard: the certificate
        # would pass hostname checks for other names too.
        raise ValueError(f"site name {name!r} cannot contain '*'")


def _new_key() -> EllipticCurvePrivateKey:
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: EllipticCurvePrivateKey) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _load_or_make_ca(outdir: Path, now: datetime.datetime) -> tuple[Certificate, Any, bool]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import NameOID

    cert_path, key_path = outdir / "ca.crt", outdir / "ca.key"
    if cert_path.exists() and key_path.exists():
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        return cert, key, False
    if cert_path.exists() or key_path.exists():
        raise FileExistsError(f"{outdir} holds only one of ca.crt and ca.key")
    key = _new_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedstream deployment CA")])
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write(key_path, _key_pem(key), private=True)
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), private=False)
    return cert, key, True


def _site_cert(
    name: str,
    hosts: Sequence[str],
    ca_cert: Certificate,
    ca_key: Any,
    now: datetime.datetime,
    days: int,
) -> tuple[Certificate, EllipticCurvePrivateKey]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = _new_key()
    alt: list[x509.GeneralName] = [x509.DNSName(name)]
    for host in hosts:
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            alt.append(x509.DNSName(host))
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return cert, key


def _hosts_for(name: str, hosts: Sequence[str]) -> list[str]:
    """``--host H`` (a run with one name) or ``--host NAME=H`` (NAME only)."""
    found = []
    for entry in hosts:
        target, sep, host = entry.partition("=")
        if not sep:
            found.append(entry)
        elif target == name:
            found.append(host)
    return found


def provision(
    outdir: str | os.PathLike[str],
    names: Sequence[str],
    *,
    hosts: Sequence[str] = (),
    days: int = DEFAULT_DAYS,
    force: bool = False,
) -> list[Path]:
    """Make (or reuse) the CA in ``outdir`` and a certificate and key per site name.

    Returns the paths written. ``hosts`` entries are host names or IP
    addresses that peers dial; ``"NAME=HOST"`` limits one to site NAME.

    Raises:
        ImportError: the ``cryptography`` package is missing.
        ValueError: a name cannot be a DNS name (or holds ``*``), a name is
            repeated, a ``NAME=HOST`` entry names no site of this run, or a
            bare host is given for more than one name (it would go into every
            certificate, letting any of those sites pass as that host).
        FileExistsError: a site's files exist already and ``force`` is false.
    """
    try:
        import cryptography  # noqa: F401
    except ImportError as exc:
        raise ImportError(
            "fedstream provision needs the cryptography package: pip install 'fedstream[provision]'"
        ) from exc
    if not names:
        raise ValueError("name at least one site")
    if len(set(names)) != len(names):
        raise ValueError(f"repeated site names in {list(names)!r}")
    for name in names:
        _check_name(name)
    for entry in hosts:
        target, sep, host = entry.partition("=")
        if sep and target not in names:
            raise ValueError(f"--host {entry!r} names no site of this run")
        if not (host if sep else entry):
            raise ValueError(f"--host {entry!r} has no host")
        if not sep and len(names) > 1:
            raise ValueError(
                f"--host {entry!r} with several site names: write --host NAME={entry} "
                "for the site that listens there"
            )
    if days < 1:
        raise ValueError("days must be positive")
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    if not force:
        for name in names:
            for suffix in (".crt", ".key"):
                if (out / f"{name}{suffix}").exists():
                    raise FileExistsError(
                        f"{out / (name + suffix)} exists (pass --force to replace it)"
                    )
    from cryptography.hazmat.primitives import serialization

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_cert, ca_key, made = _load_or_make_ca(out, now)
    written = [out / "ca.crt", out / "ca.key"] if made else []
    for name in names:
        cert, key = _site_cert(name, _hosts_for(name, hosts), ca_cert, ca_key, now, days)
        _write(out / f"{name}.key", _key_pem(key), private=True)
        _write(out / f"{name}.crt", cert.public_bytes(serialization.Encoding.PEM), private=False)
        written += [out / f"{name}.crt", out / f"{name}.key"]
    return written


def _parser() -> argparse.ArgumentParser:
    from ._cli import _Parser  # usage errors in one line, status 2

    parser = _Parser(
        prog="fedstream provision",
        description="Make a CA and a certificate and key per site for mutual TLS links.",
        epilog="A listener's certificate must also name the host peers dial: "
        "--host server.example.org --host 10.0.0.5 with one NAME, or --host server=10.0.0.5 "
        "when the run has several. Re-running with the same OUTDIR reuses its CA. "
        "Exit status: 0 done, 1 files or the cryptography package missing, 2 usage error.",
    )
    parser.add_argument("outdir", help="directory for ca.crt, ca.key and NAME.crt/NAME.key")
    parser.add_argument("names", nargs="+", metavar="NAME", help="site names")
    parser.add_argument(
        "--host",
        action="append",
        default=[],
        help="host name or IP address peers dial (repeatable; NAME=HOST for one site, "
        "required when there are several NAMEs)",
    )
    parser.add_argument(
        "--days", type=int, default=DEFAULT_DAYS, help=f"validity (default {DEFAULT_DAYS})"
    )
    parser.add_argument("--force", action="store_true", help="replace existing site files")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``fedstream provision``: returns the exit status (2 for a usage error)."""
    parser = _parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        written = provision(
            args.outdir, args.names, hosts=args.host, days=args.days, force=args.force
        )
    except ValueError as exc:
        parser.error(str(exc))
    except (ImportError, OSError) as exc:
        print(f"fedstream provision: {exc}", file=sys.stderr)
        return 1
    for path in written:
        print(path)
    return 0
