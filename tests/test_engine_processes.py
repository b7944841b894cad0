"""Crash tests with real OS processes: a receiver killed with SIGKILL mid-stream.

The sender runs in this process on 127.0.0.1 port 0 (plain TCP, then mutual
TLS); each receiver is
``tests/proc_site.py`` in its own interpreter, journaling what it consumes to
a JSON-lines file. Killing a receiver closes its sockets in the kernel, so
the sender must notice from the connection's EOF (well before its
``peer_timeout``), report ``COMMUNICATION_ERROR`` for that target from then
on, and finish the stream with the survivors.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio

from fedstream import FLContext, ObjectProducer, ReturnCode, Shareable, open_site
from tls_certs import deployment

pytestmark = pytest.mark.slow

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
RUNNER = TESTS / "proc_site.py"
PEER_TIMEOUT = 2.0


def read_journal(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


class KillingProducer(ObjectProducer):
    """Paced objects of ``size`` bytes; before object ``kill_at`` it SIGKILLs the victim."""

    def __init__(self, count: int, size: int, kill_at: int, victim: trio.Process) -> None:
        self.count = count
        self.size = size
        self.kill_at = kill_at
        self.victim = victim
        self.sent = 0
        self.killed_at: float | None = None
        self.replies: list[tuple[float, dict[str, Shareable]]] = []

    async def produce(self, stream_ctx: dict[str, Any], fl_ctx: FLContext) -> Any:
        if self.sent == self.kill_at:
            self.victim.kill()
            await self.victim.wait()
            self.killed_at = trio.current_time()
        if self.sent >= self.count:
            return None, 10.0
        await trio.sleep(0.01)
        seq = self.sent
        self.sent += 1
        return Shareable({"seq": seq, "blob": bytes([seq % 251]) * self.size}), 10.0

    async def process_replies(
        self, replies: dict[str, Shareable], stream_ctx: dict[str, Any], fl_ctx: FLContext
    ) -> Any:
        self.replies.append((trio.current_time(), dict(replies)))
        return None

    def rcs(self, target: str) -> list[Any]:
        return [r[target].get_return_code() for _, r in self.replies]


@pytest.mark.parametrize("net", ["tcp", "tls", "ws", "wss"])
async def test_receiver_killed_mid_stream(net: str, tmp_path: Path) -> None:
    names = ["r0", "r1", "r2"]
    tls = deployment().config("sender") if net in ("tls", "wss") else None
    count, size, kill_at = 60, 64 * 1024, 20
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    procs: list[trio.Process] = []
    logs = []
    try:
        with trio.fail_after(25):
            async with open_site(
                "sender",
                listen=f"{net}://127.0.0.1:0",
                heartbeat_interval=0.25,
                peer_timeout=PEER_TIMEOUT,
                tls=tls,
            ) as sender:
                assert sender.address is not None
                assert sender.address.startswith(f"{net}://127.0.0.1:")
                for name in names:
                    certs = [*deployment().files(name), deployment().ca_path] if tls else []
                    log = (tmp_path / f"{name}.log").open("wb")
                    logs.append(log)
                    procs.append(
                        await trio.lowlevel.open_process(
                            [
                                sys.executable,
                                str(RUNNER),
                                name,
                                sender.address,
                                str(tmp_path / f"{name}.jsonl"),
                                *map(str, certs),
                            ],
                            cwd=ROOT,
                            env=env,
                            stdin=subprocess.DEVNULL,
                            stdout=log,
                            stderr=subprocess.STDOUT,
                        )
                    )
                with trio.fail_after(15):
                    await sender.wait_for_peers(names)

                producer = KillingProducer(count, size, kill_at, procs[0])
                rc, result = await sender.stream_objects(
                    "proc", "weights", {"run": 1}, names, producer, FLContext()
                )
                assert (rc, result) == (ReturnCode.OK, None)
                with trio.fail_after(5):
                    while "r0" in sender.peers:
                        await trio.sleep(0.01)
                assert sender.peers == ["r1", "r2"]
    finally:
        with trio.CancelScope(shield=True):
            for proc in procs:
                if proc.returncode is None:
                    proc.kill()
                with trio.move_on_after(5):
                    await proc.wait()
            for log in logs:
                log.close()

    # The sender saw the victim fail from the kill on, and only then.
    comm = ReturnCode.COMMUNICATION_ERROR
    assert producer.rcs("r0") == [ReturnCode.OK] * kill_at + [comm] * (count - kill_at)
    assert producer.rcs("r1") == [ReturnCode.OK] * count
    assert producer.rcs("r2") == [ReturnCode.OK] * count
    # Detected by the connection's EOF, not by the heartbeat timeout.
    assert producer.killed_at is not None
    first_failure = next(t for t, r in producer.replies if r["r0"].get_return_code() == comm)
    assert first_failure - producer.killed_at < PEER_TIMEOUT / 2

    # The survivors journaled every object, in order and intact, then finalized OK.
    for name in ("r1", "r2"):
        journal = read_journal(tmp_path / f"{name}.jsonl")
        objects = [line for line in journal if "seq" in line]
        assert [line["seq"] for line in objects] == list(range(count)), name
        assert all(line["len"] == size and line["intact"] for line in objects), name
        assert journal[-1] == {"finalize": ReturnCode.OK}, name
    victim = read_journal(tmp_path / "r0.jsonl")
    assert [line["seq"] for line in victim if "seq" in line] == list(range(kill_at))
    assert not any("finalize" in line for line in victim)
