"""Starting, talking to and reliably killing the worker processes.

The driver is plain synchronous code: each worker's stdout is read by a
daemon thread into a queue, so every wait has a deadline and a worker that
hangs or dies is reported as a :class:`BenchError` instead of blocking the
run. Whatever happens, :func:`run_exchange` kills every process it started
before it returns or raises.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import IO, Any, Final

from ._common import BenchError

__all__ = ["WorkerProcess", "cpu_layout", "run_exchange"]

logger = logging.getLogger(__name__)

#: Extra time the driver allows a worker beyond its own timeout before killing it.
GRACE: Final = 15.0
#: The directory that holds the ``fedstream`` package, so workers import the
#: same copy as the driver (a source checkout or an installed wheel alike).
_PACKAGE_ROOT: Final = str(Path(__file__).resolve().parents[2])


#: What each worker process runs: ``fedstream._bench.worker.main`` with the
#: role and config as arguments. ``trio.testing`` (imported by the memory
#: transport) imports pytest when it is installed, only for a type used in
#: test helpers; a worker needs none of it, and skipping it saves about a
#: tenth of a second of CPU per worker start (a smoke run starts 120).
_WORKER_MAIN: Final = (
    "import sys; sys.modules['pytest'] = None; "
    "from fedstream._bench.worker import main; sys.exit(main(sys.argv[1:]))"
)


def cpu_layout() -> tuple[list[int], list[int]] | None:
    """CPUs for (the sender, the receivers), or ``None`` if they cannot be kept apart.

    Left to itself, the scheduler sometimes puts a sender and its receiver on
    the same CPU, which roughly halves raw loopback throughput for that run
    (and speeds up small round trips). Pinning gives every run the same
    layout, but on a machine shared with other work it also stops the
    scheduler from moving a worker off a busy CPU, so it is opt-in
    (``--pin``).
    """
    if not hasattr(os, "sched_getaffinity"):
        return None
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None
    return cpus[:1], cpus[1:]


def _child_env() -> dict[str, str]:
    """The driver's environment, plus the package root on ``PYTHONPATH`` when the
    driver found ``fedstream`` somewhere a fresh interpreter would not look (a
    checkout's ``src/`` put on ``sys.path`` by ``benchmarks/run.py``)."""
    env = dict(os.environ)
    if Path(_PACKAGE_ROOT).name not in ("site-packages", "dist-packages"):
        paths = [_PACKAGE_ROOT, *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
        env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    return env


class WorkerProcess:
    """One worker child process: ``fedstream._bench.worker.main([ROLE, CONFIG])``,
    as ``python -m fedstream._bench.worker ROLE CONFIG`` runs it (see
    :data:`_WORKER_MAIN`).

    With ``config=None`` the worker starts at once and waits for its config
    on stdin (see :meth:`configure`): a sender or relay that needs the
    receivers' addresses then imports fedstream while they start, instead
    of after.

    Resource handling:
        :meth:`kill` must be called (``run_exchange`` does so in a
        ``finally``); it is idempotent.
    """

    def __init__(
        self, role: str, config: dict[str, Any] | None, *, timeout: float, label: str
    ) -> None:
        self.role = role
        self.label = label
        self.timeout = timeout
        self.deadline = time.monotonic() + timeout + GRACE
        self._stderr: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115 - closed by kill()
        self._lines: queue.Queue[bytes | None] = queue.Queue()
        command = [
            sys.executable,
            "-c",
            _WORKER_MAIN,
            role,
            "-" if config is None else json.dumps({**config, "timeout": timeout}),
        ]
        try:
            self.proc = subprocess.Popen(
                command,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=self._stderr,
                env=_child_env(),
            )
        except OSError as exc:
            self._stderr.close()
            raise BenchError(f"cannot start {label}: {exc}") from exc
        threading.Thread(target=self._pump, name=f"bench-{label}", daemon=True).start()

    def _pump(self) -> None:
        stdout = self.proc.stdout
        assert stdout is not None
        try:
            for line in stdout:
                self._lines.put(line)
        except (OSError, ValueError):  # closed under us by kill()
            pass
        finally:
            self._lines.put(None)

    def stderr_tail(self, limit: int = 1200) -> str:
        try:
            self._stderr.seek(0)
            text = self._stderr.read().decode("utf-8", "replace").strip()
        except (OSError, ValueError):
            return ""
        return text[-limit:]

    def message(self) -> dict[str, Any]:
        """The worker's next JSON message.

        Raises:
            BenchError: the worker reported an error, exited without a
                message, wrote something that is not JSON, or missed its
                deadline.
        """
        try:
            line = self._lines.get(timeout=max(0.0, self.deadline - time.monotonic()))
        except queue.Empty:
            raise BenchError(f"{self.label} timed out") from None
        if line is None:
            try:
                status = self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                status = None
            tail = self.stderr_tail()
            raise BenchError(
                f"{self.label} exited (status {status}) without reporting"
                + (f": {tail}" if tail else "")
            )
        try:
            message = json.loads(line)
        except ValueError:
            raise BenchError(f"{self.label} wrote {line[:200]!r}") from None
        if not isinstance(message, dict):
            raise BenchError(f"{self.label} wrote {line[:200]!r}")
        if message.get("event") == "error":
            logger.debug("%s traceback:\n%s", self.label, message.get("traceback", ""))
            raise BenchError(f"{self.label} failed: {message.get('message')}")
        return message

    def expect(self, event: str) -> dict[str, Any]:
        message = self.message()
        if message.get("event") != event:
            raise BenchError(f"{self.label} sent {message.get('event')!r}, expected {event!r}")
        return message

    def configure(self, config: dict[str, Any]) -> None:
        """Send the config of a worker started with ``config=None``.

        Raises:
            BenchError: the worker has already gone.
        """
        stdin = self.proc.stdin
        assert stdin is not None
        line = json.dumps({**config, "timeout": self.timeout}).encode() + b"\n"
        self.deadline = time.monotonic() + self.timeout + GRACE
        try:
            stdin.write(line)
            stdin.flush()
        except (OSError, ValueError) as exc:
            tail = self.stderr_tail()
            raise BenchError(
                f"{self.label} exited before its config" + (f": {tail}" if tail else "")
            ) from exc

    def close_stdin(self) -> None:
        """Tell a receiving worker that the exchange is over."""
        stdin = self.proc.stdin
        if stdin is not None and not stdin.closed:
            try:
                stdin.close()
            except OSError:
                pass

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            logger.warning("%s (pid %d) did not die after SIGKILL", self.label, self.proc.pid)
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                try:
                    pipe.close()
                except OSError:
                    pass
        self._stderr.close()


def run_exchange(
    receiver_role: str,
    receiver_configs: Sequence[dict[str, Any]],
    sender_role: str,
    sender_config: Callable[[list[str]], dict[str, Any]],
    *,
    timeout: float,
    pin: bool = False,
    relay: Callable[[list[str]], dict[str, Any]] | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Run receivers, then a sender that connects to them; return all their results.

    Each receiver prints its address when it listens; ``sender_config`` gets
    those addresses and returns the sender's config. Once the sender has
    reported, the receivers' stdin is closed and their results collected.
    With ``pin``, the sender and the receivers run on different CPUs (see
    :func:`cpu_layout`).

    With ``relay``, a ``relay`` worker (config ``relay(addresses)``) starts
    between them, and ``sender_config`` gets the relay's addresses instead
    (one per receiver, in the same order); the relay shares the receivers'
    CPUs when pinned.

    Raises:
        BenchError: any worker failed. Every process is killed either way.
    """
    layout = cpu_layout() if pin else None
    sender_cpus, receiver_cpus = layout if layout is not None else (None, None)
    with ExitStack() as stack:
        # The sender (and relay) start first and wait for their configs.
        sender = WorkerProcess(sender_role, None, timeout=timeout, label=sender_role)
        stack.callback(sender.kill)
        relay_worker: WorkerProcess | None = None
        if relay is not None:
            relay_worker = WorkerProcess("relay", None, timeout=timeout, label="relay")
            stack.callback(relay_worker.kill)
        receivers: list[WorkerProcess] = []
        for index, config in enumerate(receiver_configs):
            worker = WorkerProcess(
                receiver_role,
                {**config, "cpus": receiver_cpus},
                timeout=timeout,
                label=f"{receiver_role}#{index}",
            )
            stack.callback(worker.kill)
            receivers.append(worker)
        addresses = [str(worker.expect("ready")["address"]) for worker in receivers]
        if relay is not None:
            assert relay_worker is not None
            relay_worker.configure(
                {**relay(addresses), "upstreams": addresses, "cpus": receiver_cpus}
            )
            addresses = [str(a) for a in relay_worker.expect("ready")["addresses"]]
        sender.configure({**sender_config(addresses), "cpus": sender_cpus})
        sent = sender.expect("result")
        for worker in receivers:
            worker.close_stdin()
        received = [worker.expect("result") for worker in receivers]
        if relay_worker is not None:
            relay_worker.close_stdin()
            relay_worker.expect("result")
        return sent, received
