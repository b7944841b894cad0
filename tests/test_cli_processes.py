"""``fedstream serve`` and ``fedstream send`` as separate OS processes on 127.0.0.1.

Interrupted transfers (SIGINT or SIGKILL of the sender, SIGKILL of the
receiver, SIGTERM of the receiver) must leave nothing under the final name,
keep the partial file, and the same send command run again must resume from
it and produce a file whose SHA-256 matches the source.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import pty
import select
import signal
import socket
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow

CMD = [sys.executable, "-m", "fedstream"]
MiB = 1024 * 1024


def sha(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(MiB):
            digest.update(block)
    return digest.hexdigest()


def make_file(path: Path, size: int) -> Path:
    with path.open("wb") as f:
        left = size
        while left:
            n = min(left, 4 * MiB)
            f.write(os.urandom(n))
            left -= n
    return path


def partials(out: Path) -> list[Path]:
    return sorted(out.rglob("*.fedstream-part"))


def read_line(proc: subprocess.Popen[str], timeout: float) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, "no output in time"
    return proc.stdout.readline()


def wait_until(predicate: Callable[[], bool], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.communicate(timeout=10)


@contextmanager
def serving(
    out: Path, *extra: str, name: str = "rx", listen: str = "tcp://127.0.0.1:0"
) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """``fedstream serve --json``; yields the process and the URL it listens on."""
    proc = subprocess.Popen(
        [*CMD, "serve", name, "--listen", listen, "--out", str(out), "--json", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        ready = json.loads(read_line(proc, 20))
        assert ready["event"] == "ready"
        yield proc, ready["addresses"][0]
    finally:
        stop(proc)


def send(url: str, *files: Path | str, name: str = "tx", extra: tuple[str, ...] = ()) -> list[str]:
    return [*CMD, "send", name, *map(str, files), "--connect", url, "--to", "rx", *extra]


def run_send(url: str, *files: Path | str, **kw: Any) -> tuple[int, dict[str, Any], str]:
    result = subprocess.run(
        [*send(url, *files, **kw), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    summary = json.loads(result.stdout) if result.stdout.strip() else {}
    return result.returncode, summary, result.stderr


def test_hundred_mib_file_between_processes(tmp_path: Path) -> None:
    src = make_file(tmp_path / "model.bin", 100 * MiB)
    out = tmp_path / "out"
    with serving(out) as (server, url):
        status, summary, stderr = run_send(url, src)
        assert status == 0, stderr
        server.send_signal(signal.SIGTERM)
        stdout, serve_err = server.communicate(timeout=30)
        assert server.returncode == 0, serve_err
    assert summary["ok"] is True
    [record] = summary["files"]
    assert record["sha256"] == sha(src)
    assert (record["rc"], record["size"], record["sent"]) == ("OK", 100 * MiB, 100 * MiB)
    assert record["targets"] == {"rx": "OK"}
    assert sha(out / "model.bin") == sha(src)
    assert partials(out) == []
    events = [json.loads(line) for line in stdout.splitlines()]
    assert [(e["name"], e["rc"], e["sha256"]) for e in events] == [("model.bin", "OK", sha(src))]
    assert "Traceback" not in serve_err


def interrupt_sender(tmp_path: Path, how: signal.Signals) -> None:
    src = make_file(tmp_path / "data.bin", 48 * MiB)
    out = tmp_path / "out"
    with serving(out) as (server, url):
        # Small chunks slow the first run down enough to interrupt it.
        sender = subprocess.Popen(
            send(url, src, extra=("--chunk", "16KiB")),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            wait_until(lambda: bool(partials(out)) and partials(out)[0].stat().st_size > 2 * MiB)
            sender.send_signal(how)
            _, stderr = sender.communicate(timeout=30)
        finally:
            stop(sender)
        if how == signal.SIGINT:
            assert sender.returncode == 130
            assert stderr.strip().splitlines() == ["fedstream send: interrupted, shutting down"]
        elif how == signal.SIGTERM:
            assert sender.returncode == 143
            assert stderr.strip().splitlines() == ["fedstream send: terminated, shutting down"]
        else:
            assert sender.returncode == -signal.SIGKILL
        # The receiver ends that session and keeps the partial file.
        assert json.loads(read_line(server, 20))["kept_partial"] is True
        assert not (out / "data.bin").exists()
        [part] = partials(out)
        held = part.stat().st_size
        assert 0 < held < src.stat().st_size
        status, summary, stderr = run_send(url, src)
        assert status == 0, stderr
    [record] = summary["files"]
    assert record["resumed_from"] > 0
    assert record["resumed_from"] + record["sent"] == src.stat().st_size
    assert sha(out / "data.bin") == sha(src)
    assert partials(out) == []


def test_sigint_of_sender_keeps_partial_and_resumes(tmp_path: Path) -> None:
    interrupt_sender(tmp_path, signal.SIGINT)


def test_sigkill_of_sender_keeps_partial_and_resumes(tmp_path: Path) -> None:
    interrupt_sender(tmp_path, signal.SIGKILL)


def test_sigterm_of_sender_keeps_partial_and_resumes(tmp_path: Path) -> None:
    interrupt_sender(tmp_path, signal.SIGTERM)


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM])
def test_receiver_killed_or_stopped_then_resumed(tmp_path: Path, how: signal.Signals) -> None:
    src = make_file(tmp_path / "data.bin", 48 * MiB)
    out = tmp_path / "out"
    with serving(out) as (server, url):
        sender = subprocess.Popen(
            [*send(url, src, extra=("--chunk", "16KiB")), "--json"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            wait_until(lambda: bool(partials(out)) and partials(out)[0].stat().st_size > 2 * MiB)
            server.send_signal(how)
            stdout, _ = sender.communicate(timeout=60)
        finally:
            stop(sender)
        server.wait(timeout=30)
    assert sender.returncode == 1
    [record] = json.loads(stdout)["files"]
    expected = "SERVICE_UNAVAILABLE" if how == signal.SIGTERM else "COMMUNICATION_ERROR"
    assert record["targets"] == {"rx": expected}
    if how == signal.SIGTERM:
        assert server.returncode == 0
    assert not (out / "data.bin").exists()
    assert len(partials(out)) == 1
    with serving(out) as (_server, url):
        status, summary, stderr = run_send(url, src)
    assert status == 0, stderr
    assert summary["files"][0]["resumed_from"] > 0
    assert sha(out / "data.bin") == sha(src)
    assert partials(out) == []


def test_concurrent_same_name_sends_from_two_processes(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    one = make_file(tmp_path / "a" / "same.bin", 8 * MiB)
    two = make_file(tmp_path / "b" / "same.bin", 8 * MiB)
    for policy in ("overwrite", "suffix"):
        out = tmp_path / f"out-{policy}"
        with serving(out, "--name-policy", policy) as (_server, url):
            senders = [
                subprocess.Popen(
                    [*send(url, path, name=name, extra=("--chunk", "64KiB")), "--json"],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
                for name, path in (("tx1", one), ("tx2", two))
            ]
            results = [p.communicate(timeout=60) for p in senders]
        assert [p.returncode for p in senders] == [0, 0], results
        assert all(json.loads(stdout)["ok"] for stdout, _ in results)
        got = {sha(p) for p in out.iterdir()}
        assert partials(out) == []
        if policy == "overwrite":
            assert [p.name for p in out.iterdir()] == ["same.bin"]
            assert got <= {sha(one), sha(two)}
        else:
            assert sorted(p.name for p in out.iterdir()) == ["same (1).bin", "same.bin"]
            assert got == {sha(one), sha(two)}


def test_to_a_site_not_directly_connected_is_named_at_once(tmp_path: Path) -> None:
    src = make_file(tmp_path / "f.bin", 1000)
    with serving(tmp_path / "out") as (_server, url):
        started = time.monotonic()
        result = subprocess.run(
            [*send(url, src), "--to", "elsewhere"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert result.returncode == 2
    assert time.monotonic() - started < 10
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "'elsewhere'" in lines[0]
    assert "no relay" in lines[0]


def test_serve_reconnects_after_the_hub_restarts(tmp_path: Path) -> None:
    hub_url = f"tcp://127.0.0.1:{free_port()}"
    client = None
    try:
        with serving(tmp_path / "hub", name="hub", listen=hub_url):
            client = subprocess.Popen(
                [*CMD, "serve", "c1", "--connect", hub_url, "--out", str(tmp_path / "c1")],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            assert "site 'c1'" in read_line(client, 20)
            assert read_line(client, 20).startswith("connected to 'hub'")
        assert read_line(client, 20).startswith("lost 'hub'")
        with serving(tmp_path / "hub", name="hub", listen=hub_url):
            assert read_line(client, 30).startswith("connected to 'hub'")
        client.send_signal(signal.SIGINT)
        _, stderr = client.communicate(timeout=30)
        assert client.returncode == 130
        assert "Traceback" not in stderr
    finally:
        if client is not None:
            stop(client)


def test_directory_tree_and_progress_free_output(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    make_file(tree / "one.bin", 100_000)
    make_file(tree / "sub" / "two.bin", 3 * MiB)
    out = tmp_path / "out"
    with serving(out) as (_server, url):
        result = subprocess.run(send(url, tree), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    # stderr is not a terminal: no progress bar at all.
    assert result.stderr == ""
    assert [line.split(":")[0] for line in result.stdout.splitlines()] == [
        "tree/one.bin",
        "tree/sub/two.bin",
    ]
    for rel in ("one.bin", "sub/two.bin"):
        assert sha(out / "tree" / rel) == sha(tree / rel)


TO_BOTH = ("--to", "r1", "--to", "r2", "--json")


def test_one_send_to_two_directly_connected_sites(tmp_path: Path) -> None:
    src = make_file(tmp_path / "f.bin", 5 * MiB)
    with (
        serving(tmp_path / "o1", name="r1") as (_s1, url1),
        serving(tmp_path / "o2", name="r2") as (_s2, url2),
    ):
        result = subprocess.run(
            [*CMD, "send", "tx", str(src), "--connect", url1, "--connect", url2, *TO_BOTH],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert result.returncode == 0, result.stderr
    [record] = json.loads(result.stdout)["files"]
    assert record["targets"] == {"r1": "OK", "r2": "OK"}
    assert sha(tmp_path / "o1" / "f.bin") == sha(tmp_path / "o2" / "f.bin") == sha(src)


def test_progress_bar_on_a_terminal(tmp_path: Path) -> None:
    """With stderr on a terminal, send draws bytes, rate and ETA there; stdout stays clean."""
    src = make_file(tmp_path / "f.bin", 24 * MiB)
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 120, 0, 0))
    try:
        with serving(tmp_path / "out") as (_server, url):
            sender = subprocess.Popen(
                [*send(url, src, extra=("--chunk", "64KiB")), "--json"],
                stdout=subprocess.PIPE,
                stderr=terminal,
                text=True,
            )
            stdout, _ = sender.communicate(timeout=60)
        os.close(terminal)
        terminal = -1
        drawn = b""
        while select.select([controller], [], [], 0.5)[0]:
            try:
                block = os.read(controller, 65536)
            except OSError:
                break
            if not block:
                break
            drawn += block
    finally:
        if terminal >= 0:
            os.close(terminal)
        os.close(controller)
    assert sender.returncode == 0
    assert json.loads(stdout)["ok"] is True
    text = drawn.decode(errors="replace")
    assert "sending:" in text
    assert "/24.0M" in text  # bytes done of the total
    assert "B/s" in text  # rate
    assert "<" in text  # elapsed<remaining (ETA)


def test_send_of_an_empty_directory_says_so_and_succeeds(tmp_path: Path) -> None:
    """Nothing to send is not a failure: exit 0, and the directory is named."""
    empty = tmp_path / "empty"
    empty.mkdir()
    with serving(tmp_path / "out") as (_server, url):
        status, summary, stderr = run_send(url, empty)
        human = subprocess.run(send(url, empty), capture_output=True, text=True, timeout=60)
    assert status == 0, stderr
    assert summary["ok"] is True
    assert summary["files"] == [
        {"path": str(empty), "rc": "OK", "ok": True, "sent": 0,
         "note": "empty directory, nothing to send"}
    ]  # fmt: skip
    assert human.returncode == 0, human.stderr
    assert f"{empty}: empty directory, nothing to send" in human.stdout
