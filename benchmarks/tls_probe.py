"""fedstream over ``tls://`` against raw ``trio.SSLStream``, two processes, same run.

    python benchmarks/tls_probe.py [--reps N] [--baseline SRC_DIR]

For each object size, a receiving process and a sending process (a fresh
pair per measurement) move the same bytes twice: as raw ``SSLStream``
``send_all`` calls of 1 MiB and ``receive_some`` loops (the ceiling), then as
fedstream objects over a mutually authenticated ``tls://`` link. Each
measurement is preceded by a warm-up of 4 objects. Reported: median MiB/s
and the median of the per-repetition ratios fedstream / raw, plus the CPU
seconds per GiB each side used (less sensitive to a loaded machine than
wall time). With ``--baseline``, a second fedstream (another checkout's
``src``) is measured in the same repetitions, for before/after ratios.

A development probe, not part of ``fedstream bench``; certificates come from
``trustme`` (the test extra).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

MIB = 1 << 20
WARM = 4
CASES = ((16, 16), (1, 256))  # (MiB per object, objects)


def _configs(certs: Path) -> tuple[Any, Any]:
    import fedstream

    def config(name: str) -> fedstream.TLSConfig:
        return fedstream.TLSConfig(certs / f"{name}.crt", certs / f"{name}.key", certs / "ca.crt")

    return config("rx"), config("tx")


def _make_certs(certs: Path) -> None:
    import trustme

    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(certs / "ca.crt"))
    for name in ("rx", "tx"):
        leaf = ca.issue_cert(name, "127.0.0.1", common_name=name)
        leaf.cert_chain_pems[0].write_to_path(str(certs / f"{name}.crt"))
        leaf.private_key_pem.write_to_path(str(certs / f"{name}.key"))


def _emit(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


async def _stdin_eof() -> None:
    await trio.to_thread.run_sync(sys.stdin.read)


# ------------------------------------------------------------------ raw SSLStream


async def raw_recv(certs: Path) -> None:
    rx, _ = _configs(certs)
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    _emit(port=listeners[0].socket.getsockname()[1])
    stream = trio.SSLStream(await listeners[0].accept(), rx.server_context(), server_side=True)
    marks: list[float] = []

    async def serve() -> None:
        try:
            while head := await stream.receive_some(16):
                marks.append(time.process_time())
                total, got = int(head), 0
                while got < total:
                    got += len(await stream.receive_some())
                marks.append(time.process_time())
                await stream.send_all(b"k")
        except trio.BrokenResourceError:
            pass

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve)
        await _stdin_eof()
        nursery.cancel_scope.cancel()
    _emit(cpu=marks[3] - marks[2])  # the measured burst, after the warm-up


async def raw_send(certs: Path, port: int, size: int, count: int) -> None:
    _, tx = _configs(certs)
    tcp = await trio.open_tcp_stream("127.0.0.1", port)
    stream = trio.SSLStream(tcp, tx.client_context(), server_hostname="rx")
    payload = memoryview(b"\xa5" * size)

    async def burst(objects: int) -> None:
        await stream.send_all(b"%016d" % (objects * size))
        for _ in range(objects):
            for offset in range(0, size, MIB):
                await stream.send_all(payload[offset : offset + MIB])
        assert await stream.receive_some(1) == b"k"

    await burst(WARM)
    start, cpu = time.perf_counter(), time.process_time()
    await burst(count)
    _emit(elapsed=time.perf_counter() - start, cpu=time.process_time() - cpu)


# ---------------------------------------------------------------------- fedstream


async def fs_recv(certs: Path) -> None:
    from fedstream import ConsumerFactory, ObjectConsumer, open_site

    rx, _ = _configs(certs)
    marks: list[list[float]] = []  # per stream: CPU time at its first and last object

    class Consumer(ObjectConsumer):
        async def consume(self, shareable: Any, stream_ctx: Any, fl_ctx: Any) -> Any:
            marks[-1][1] = time.process_time()
            return True, None

    class Factory(ConsumerFactory):
        async def get_consumer(self, stream_ctx: Any, fl_ctx: Any) -> ObjectConsumer:
            marks.append([time.process_time(), 0.0])
            return Consumer()

    async with open_site("rx", listen="tls://127.0.0.1:0", tls=rx, sync_callbacks="inline") as site:
        site.register_stream_processing("probe", "t", Factory())
        _emit(port=int(site.address.rsplit(":", 1)[1]))
        await _stdin_eof()
    _emit(cpu=marks[1][1] - marks[1][0])


async def fs_send(certs: Path, port: int, size: int, count: int) -> None:
    from fedstream import ObjectProducer, ReturnCode, Shareable, open_site

    _, tx = _configs(certs)
    payload = b"\xa5" * size

    class Producer(ObjectProducer):
        def __init__(self, objects: int) -> None:
            self.left = objects

        async def produce(self, stream_ctx: Any, fl_ctx: Any) -> Any:
            if not self.left:
                return None, 60.0
            self.left -= 1
            return Shareable(data=payload), 60.0

        async def process_replies(self, replies: Any, stream_ctx: Any, fl_ctx: Any) -> Any:
            return None

    async with open_site("tx", tls=tx, sync_callbacks="inline") as site:
        target = await site.connect(f"tls://127.0.0.1:{port}")
        for objects in (WARM, count):  # the warm-up, then the measured stream
            start, cpu = time.perf_counter(), time.process_time()
            rc, _ = await site.stream_objects("probe", "t", {}, [target], Producer(objects), None)
            assert rc == ReturnCode.OK, rc
        _emit(elapsed=time.perf_counter() - start, cpu=time.process_time() - cpu)


# ------------------------------------------------------------------------ driver


def _json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def measure(
    certs: Path, kind: str, size: int, count: int, src: str | None
) -> tuple[float, float, float]:
    """Seconds, sender CPU seconds and receiver CPU seconds of one measurement."""
    env = dict(os.environ)
    if src:
        env["PYTHONPATH"] = src
    me = [sys.executable, __file__]
    receiver = subprocess.Popen(
        [*me, "--role", f"{kind}-recv", "--certs", str(certs)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert receiver.stdin is not None
    assert receiver.stdout is not None
    port = _json_lines(receiver.stdout.readline())[0]["port"]
    args = ["--certs", str(certs), "--port", str(port), "--size", str(size), "--count", str(count)]
    sender = subprocess.run(
        [*me, "--role", f"{kind}-send", *args], capture_output=True, text=True, env=env
    )
    receiver.stdin.close()
    received = _json_lines(receiver.stdout.read())
    receiver.wait(30)
    sent = _json_lines(sender.stdout)
    if not sent or not received:
        raise RuntimeError(sender.stderr[-2000:])
    return sent[-1]["elapsed"], sent[-1]["cpu"], received[-1]["cpu"]


def run(reps: int, baseline: str | None) -> None:
    certs = Path(tempfile.mkdtemp(prefix="fedstream-tls-probe-"))
    _make_certs(certs)
    variants: list[tuple[str, str, str | None]] = [("raw", "raw", None)]
    if baseline:
        variants.append(("baseline", "fs", baseline))
    variants.append(("fedstream", "fs", None))
    for size_mib, count in CASES:
        size = size_mib * MIB
        total = size * count / MIB
        rates: dict[str, list[float]] = {label: [] for label, _, _ in variants}
        ratios: dict[str, list[float]] = {label: [] for label, _, _ in variants[1:]}
        cpu: dict[str, list[tuple[float, float]]] = {label: [] for label, _, _ in variants}
        for _ in range(reps):
            raw_seconds = 0.0
            for label, kind, src in variants:
                seconds, tx_cpu, rx_cpu = measure(certs, kind, size, count, src)
                rates[label].append(total / seconds)
                cpu[label].append((tx_cpu, rx_cpu))
                if label == "raw":
                    raw_seconds = seconds
                else:
                    ratios[label].append(raw_seconds / seconds)
        print(f"{size_mib} MiB objects x {count}, {reps} repetitions (medians):")
        gib = total / 1024
        for label, _, _ in variants:
            line = f"  {label:>9}: {statistics.median(rates[label]):6.1f} MiB/s"
            if label in ratios:
                each = " ".join(f"{r:.2f}" for r in ratios[label])
                line += f"  ratio {statistics.median(ratios[label]):.2f} ({each})"
            tx = statistics.median(c[0] for c in cpu[label]) / gib
            rx = statistics.median(c[1] for c in cpu[label]) / gib
            print(f"{line}  CPU s/GiB sender {tx:.2f} receiver {rx:.2f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--baseline", help="another checkout's src/ to measure alongside")
    parser.add_argument("--role", help=argparse.SUPPRESS)
    parser.add_argument("--certs", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role in ("raw-recv", "fs-recv"):
        trio.run(raw_recv if args.role == "raw-recv" else fs_recv, args.certs)
    elif args.role in ("raw-send", "fs-send"):
        send = raw_send if args.role == "raw-send" else fs_send
        trio.run(send, args.certs, args.port, args.size, args.count)
    else:
        run(args.reps, args.baseline)


if __name__ == "__main__":
    main()
