"""The command line's argument checks: each usage error is one line and exit status 2.

Every case runs ``python -m fedstream`` as a real process (so a traceback or
an exception group would show), and none of them may connect anywhere: the
``--connect`` URLs point at a port nothing listens on, and the checks must
fire before any dialing (the whole run stays well under the dial retry time).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedstream._cli import DEFAULT_SERVE_MAX_OBJECT_SIZE, MAX_CHUNK, _parser, parse_size
from tls_certs import deployment

NOWHERE = "tcp://127.0.0.1:9"


def run(
    *args: str, cwd: Path | None = None, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fedstream", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=cwd,
    )


@pytest.fixture
def afile(tmp_path: Path) -> str:
    path = tmp_path / "a.bin"
    path.write_bytes(b"x" * 10)
    return str(path)


BAD = {
    "url without scheme": ["send", "tx", "{file}", "--connect", "127.0.0.1:8700", "--to", "rx"],
    "url without port": ["send", "tx", "{file}", "--connect", "tcp://127.0.0.1", "--to", "rx"],
    "unknown scheme": ["send", "tx", "{file}", "--connect", "http://127.0.0.1:1", "--to", "rx"],
    "timeout 0": ["send", "tx", "{file}", "--connect", NOWHERE, "--to", "rx", "--timeout", "0"],
    "timeout nan": ["send", "tx", "{file}", "--connect", NOWHERE, "--to", "rx", "--timeout", "nan"],
    "chunk 0": ["send", "tx", "{file}", "--connect", NOWHERE, "--to", "rx", "--chunk", "0"],
    "chunk junk": ["send", "tx", "{file}", "--connect", NOWHERE, "--to", "rx", "--chunk", "lots"],
    # above every receiver's default max object size, and held in memory whole
    "chunk 64GiB": ["send", "tx", "{file}", "--connect", NOWHERE, "--to", "rx", "--chunk", "64GiB"],
    "chunk 65MiB": ["send", "tx", "{file}", "--connect", NOWHERE, "--to", "rx", "--chunk", "65MiB"],
    "serve max-object-size 0": ["serve", "rx", "--listen", "tcp://:0", "--max-object-size", "0"],
    "wait 0": ["send", "tx", "{file}", "--connect", NOWHERE, "--to", "rx", "--wait", "0"],
    "missing file": ["send", "tx", "{file}", "nope.bin", "--connect", NOWHERE, "--to", "rx"],
    "no --to": ["send", "tx", "{file}", "--connect", NOWHERE],
    "duplicate --to": ["send", "tx", "{file}", "--connect", NOWHERE, "--to", "rx", "--to", "rx"],
    "demo clients 0": ["demo", "--clients", "0"],
    "demo objects -1": ["demo", "--objects", "-1"],
    "demo size 0": ["demo", "--size", "0"],
    "serve without urls": ["serve", "rx"],
    "serve url without scheme": ["serve", "rx", "--listen", "0.0.0.0:8700"],
    "serve bad policy": ["serve", "rx", "--listen", "tcp://127.0.0.1:0", "--name-policy", "x"],
    "bad log level": ["--log-level", "loud", "demo"],
    "unknown command": ["fly"],
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_usage_errors_are_one_line_and_exit_2(case: str, afile: str, tmp_path: Path) -> None:
    args = [a.replace("{file}", afile) for a in BAD[case]]
    started = time.monotonic()
    result = run(*args, cwd=tmp_path)
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "error:" in lines[0]
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    assert time.monotonic() - started < 10  # nothing waited for a connection


def test_every_missing_file_is_named_before_connecting(tmp_path: Path, afile: str) -> None:
    result = run(
        "send", "tx", "gone1", afile, "gone2", "--connect", NOWHERE, "--to", "rx", cwd=tmp_path
    )
    assert result.returncode == 2
    assert "gone1" in result.stderr
    assert "gone2" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_unreachable_connect_url_fails_within_wait(afile: str) -> None:
    started = time.monotonic()
    result = run("send", "tx", afile, "--connect", NOWHERE, "--to", "rx", "--wait", "1")
    assert result.returncode == 1
    assert time.monotonic() - started < 15
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert NOWHERE in lines[0]
    assert "within 1 s" in lines[0]


def test_top_level_help_has_no_restructured_text() -> None:
    result = run("--help")
    assert result.returncode == 0
    for command in ("serve", "send", "demo", "bench"):
        assert command in result.stdout
    assert "``" not in result.stdout
    assert ":func:" not in result.stdout


@pytest.mark.parametrize(
    "args",
    [
        ["-v", "demo", "--clients", "1", "--objects", "1", "--size", "1KiB"],
        ["demo", "--clients", "1", "-v", "--objects", "1", "--size", "1KiB"],
        ["demo", "--clients", "1", "--objects", "1", "--size", "1KiB", "--log-level", "info"],
    ],
)
def test_log_options_anywhere(args: list[str]) -> None:
    result = run(*args, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "INFO fedstream" in result.stderr
    assert "demo OK" in result.stdout


def test_quiet_by_default() -> None:
    result = run("demo", "--clients", "1", "--objects", "1", "--size", "1KiB", timeout=60)
    assert result.returncode == 0
    assert "INFO" not in result.stderr


def test_parse_size() -> None:
    assert parse_size("4MiB") == 4 * 1024 * 1024
    assert parse_size("1.5GB") == 1_500_000_000
    assert parse_size("1000") == 1000


@pytest.mark.parametrize(
    "args", [["-v", "bench", "--help"], ["--log-level", "info", "bench", "--help"]]
)
def test_bench_after_log_options(args: list[str]) -> None:
    result = run(*args)
    assert result.returncode == 0, result.stderr
    assert "--quick" in result.stdout


def _tls_cases() -> dict[str, list[str]]:
    d = deployment()
    hub_crt, _ = d.files("hub")
    _, a_key = d.files("a")
    return {
        "serve tls:// without --cert": ["serve", "hub", "--listen", "tls://127.0.0.1:0"],
        "send tls:// without --cert": [
            "send", "a", "{file}", "--connect", "tls://127.0.0.1:9", "--to", "hub",
        ],
        "serve with a key that does not match --cert": [
            "serve", "hub", "--listen", "tls://127.0.0.1:0",
            "--cert", str(hub_crt), "--key", str(a_key), "--ca", str(d.ca_path),
        ],
        "send with a key that does not match --cert": [
            "send", "a", "{file}", "--connect", "tls://127.0.0.1:9", "--to", "hub",
            "--cert", str(hub_crt), "--key", str(a_key), "--ca", str(d.ca_path),
        ],
        "serve with a CA file that is no certificate": [
            "serve", "hub", "--listen", "tls://127.0.0.1:0",
            "--cert", str(hub_crt), "--key", str(d.files("hub")[1]), "--ca", str(a_key),
        ],
    }  # fmt: skip


@pytest.mark.parametrize("case", sorted(_tls_cases()))
def test_tls_misconfiguration_is_a_usage_error(case: str, afile: str, tmp_path: Path) -> None:
    """Checked before anything listens or dials (a serve that got past it would not exit)."""
    args = [a.replace("{file}", afile) for a in _tls_cases()[case]]
    result = run(*args, cwd=tmp_path)
    assert "Traceback" not in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "error:" in result.stderr
    assert result.returncode == 2


def test_chunk_and_serve_object_size_bounds_agree() -> None:
    """The largest --chunk fits serve's default --max-object-size, which stays far
    below the library's 16 GiB default (a file stream needs one chunk per object)."""
    parser = _parser()
    serve = parser.parse_args(["serve", "rx", "--listen", "tcp://127.0.0.1:0"])
    assert serve.max_object_size == DEFAULT_SERVE_MAX_OBJECT_SIZE
    assert MAX_CHUNK < DEFAULT_SERVE_MAX_OBJECT_SIZE <= 2 * MAX_CHUNK
    send = parser.parse_args(["send", "tx", "f", "--connect", NOWHERE, "--to", "rx",
                              "--chunk", "64MiB"])  # fmt: skip
    assert send.chunk == MAX_CHUNK
