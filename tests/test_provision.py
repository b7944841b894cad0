"""``fedstream provision`` and the CLI's ``--cert/--key/--ca``.

Certificates made by :func:`fedstream._provision.provision` must work for
sites as they are: the name is the CN and a DNS SAN, a listener's ``--host``
is checked by dialers, keys are private. The last test runs the real
command line (``python -m fedstream``) in subprocesses: provision, serve,
send a file over mutual TLS.
"""

from __future__ import annotations

import os
import re
import select
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio
from cryptography import x509
from cryptography.x509.oid import NameOID

from engine_helpers import CHANNEL, TOPIC, AsyncRecordingProducer, Recorder, make_factory
from fedstream import HandshakeError, ReturnCode, TLSConfig, open_site
from fedstream._provision import main, provision

ROOT = Path(__file__).resolve().parent.parent


def config(out: Path, name: str) -> TLSConfig:
    return TLSConfig(out / f"{name}.crt", out / f"{name}.key", out / "ca.crt")


def test_provision_writes_a_ca_and_one_private_key_and_certificate_per_site(
    tmp_path: Path,
) -> None:
    out = tmp_path / "certs"
    written = provision(out, ["server", "site-1"], hosts=["server=127.0.0.1", "server=srv.lan"])
    assert sorted(p.name for p in written) == sorted(
        ["ca.crt", "ca.key", "server.crt", "server.key", "site-1.crt", "site-1.key"]
    )
    for key in ("ca.key", "server.key", "site-1.key"):
        assert stat.S_IMODE((out / key).stat().st_mode) == 0o600, key
    server = x509.load_pem_x509_certificate((out / "server.crt").read_bytes())
    site1 = x509.load_pem_x509_certificate((out / "site-1.crt").read_bytes())
    ca = x509.load_pem_x509_certificate((out / "ca.crt").read_bytes())
    assert server.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "server"
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["server", "srv.lan"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    # --host NAME=HOST went to that site only.
    san1 = site1.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san1.get_values_for_type(x509.DNSName) == ["site-1"]
    assert san1.get_values_for_type(x509.IPAddress) == []
    assert server.issuer == ca.subject

    # A later run adds a site under the same CA, and will not overwrite one.
    assert [p.name for p in provision(out, ["site-2"])] == ["site-2.crt", "site-2.key"]
    site2 = x509.load_pem_x509_certificate((out / "site-2.crt").read_bytes())
    assert site2.issuer == ca.subject
    with pytest.raises(FileExistsError, match="--force"):
        provision(out, ["site-1"])
    provision(out, ["site-1"], force=True)
    assert stat.S_IMODE((out / "site-1.key").stat().st_mode) == 0o600


@pytest.mark.parametrize(
    ("names", "hosts", "message"),
    [
        (["a b"], [], "DNS name"),
        (["a", "a"], [], "repeated"),
        (["a"], ["b=1.2.3.4"], "names no site"),
        (["a"], ["a="], "no host"),
        (["a", "b"], ["1.2.3.4"], "NAME=1.2.3.4"),
        (["*"], [], "cannot contain"),
        (["*.example.org"], [], "cannot contain"),
    ],
)
def test_provision_refuses_bad_requests(
    tmp_path: Path,
    names: list[str],
    hosts: list[str],
    message: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(ValueError, match=message):
        provision(tmp_path, names, hosts=hosts)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        main([str(tmp_path), *names, *(f"--host={h}" for h in hosts)])
    assert exited.value.code == 2
    stderr = capsys.readouterr().err
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert message in stderr
    assert not list(tmp_path.iterdir())  # nothing written


async def test_provisioned_certificates_authenticate_sites(tmp_path: Path) -> None:
    provision(tmp_path, ["server"], hosts=["127.0.0.1"])
    provision(tmp_path, ["site-1", "site-2"])
    recorder = Recorder()
    with trio.fail_after(15):
        async with open_site(
            "server", listen="tls://127.0.0.1:0", tls=config(tmp_path, "server")
        ) as server:
            server.register_stream_processing(
                CHANNEL, TOPIC, make_factory(recorder, "server", is_async=True)
            )
            async with open_site(
                "site-1", connect=[server.address or ""], tls=config(tmp_path, "site-1")
            ) as site1:
                producer = AsyncRecordingProducer("s", [1000, 2000])
                rc = await site1.stream_objects(
                    CHANNEL, TOPIC, {"stream": "s"}, ["server"], producer, None, secure=True
                )
                assert rc == (ReturnCode.OK, None)
            async with open_site("site-1", tls=config(tmp_path, "site-2")) as impostor:
                with pytest.raises(HandshakeError, match="certificate proves 'site-2'"):
                    await impostor.connect(server.address or "")
    assert recorder.sessions[("server", "s")].sizes == [1000, 2000]


def _read_line(proc: subprocess.Popen[str], pattern: str, limit: float) -> re.Match[str]:
    assert proc.stdout is not None
    deadline = time.monotonic() + limit
    seen = []
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], deadline - time.monotonic())
        if not ready:
            break
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        found = re.search(pattern, line)
        if found:
            return found
    pytest.fail(f"no line matching {pattern!r} within {limit} s: {seen}")


@pytest.mark.slow
def test_cli_provision_then_serve_and_send_over_mutual_tls(tmp_path: Path) -> None:
    certs, out = tmp_path / "certs", tmp_path / "received"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    fedstream = [sys.executable, "-m", "fedstream"]

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*fedstream, *args], env=env, capture_output=True, text=True, timeout=60, check=False
        )

    done = run("provision", str(certs), "server", "--host", "127.0.0.1")
    assert done.returncode == 0, done.stderr
    done = run("provision", str(certs), "site-1")
    assert done.returncode == 0, done.stderr
    assert stat.S_IMODE((certs / "site-1.key").stat().st_mode) == 0o600

    def tls_args(name: str) -> list[str]:
        cert, key, ca = certs / f"{name}.crt", certs / f"{name}.key", certs / "ca.crt"
        return ["--cert", str(cert), "--key", str(key), "--ca", str(ca)]

    payload = tmp_path / "weights.bin"
    payload.write_bytes(os.urandom(300_000))
    serve = ["serve", "server", "--listen", "tls://127.0.0.1:0", "--out", str(out)]
    server = subprocess.Popen(
        [*fedstream, *serve, *tls_args("server")],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        url = _read_line(server, r"listening on (tls://127\.0\.0\.1:\d+)", 30).group(1)
        sent = run(
            "send",
            "site-1",
            str(payload),
            "--connect",
            url,
            "--to",
            "server",
            "--wait",
            "20",
            *tls_args("site-1"),
        )
        assert sent.returncode == 0, sent.stdout + sent.stderr
        assert "OK" in sent.stdout
        _read_line(server, r"weights.bin from site-1: OK", 20)
        assert (out / "weights.bin").read_bytes() == payload.read_bytes()
        # Without certificates, the same send is a usage error, before dialing.
        plain = run("send", "site-1", str(payload), "--connect", url, "--to", "server")
        assert plain.returncode == 2
        assert "needs --cert and --key" in plain.stderr
    finally:
        server.kill()
        server.wait(timeout=10)


def test_a_listener_host_is_not_put_in_every_site_certificate(tmp_path: Path) -> None:
    """``provision certs server site-1 --host hub.example.org`` would give site-1 a
    certificate that passes hostname verification for hub.example.org (any site could
    stand in for the hub's endpoint). A bare ``--host`` needs exactly one NAME."""
    with pytest.raises(ValueError, match=r"NAME=hub\.example\.org"):
        provision(tmp_path, ["server", "site-1"], hosts=["hub.example.org"])
    assert not list(tmp_path.iterdir())
    provision(tmp_path, ["server", "site-1"], hosts=["server=hub.example.org"])
    cert = x509.load_pem_x509_certificate((tmp_path / "site-1.crt").read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["site-1"]
