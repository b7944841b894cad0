"""What each scenario runs, and the loop that runs them with their ceilings.

Every measurement is a fresh set of OS processes on loopback: one sender and
one or more receivers (see ``worker.py``), and for ``wan`` a relay between
them. Repetitions are interleaved: each round measures the ceilings and then
every case once, so slow drift of the machine (thermal, noisy neighbours)
affects both sides of a ratio alike. A case that fails stops repeating and
is reported as ``ERROR``; the rest of the run carries on.

Each scenario is one entry of :data:`SCENARIO_BUILDERS`: a function that
returns the ceilings it needs and its cases. Ceilings are shared by key, so
two scenarios that need the raw TCP figure get one measurement per round.
Adding a scenario means writing one such function and adding it to the
table (``ws`` is a small example).

Headline rows measure the **default path**: plain (non-async) methods on
producer, consumer and factory and default site options, so plain callbacks
run in worker threads. Where the issue compares paths, a second row runs the
same case with ``async def`` callbacks and ``sync_callbacks="inline"``, and a
third row holds the ratio of the two.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

from .._engine._options import DEFAULT_CHUNK_SIZE
from .._transport._ws import MESSAGE_SIZE as WS_MESSAGE_SIZE
from ._common import GIB, KIB, MB, MIB, BenchError, format_size
from ._procs import run_exchange
from ._results import CaseResult, Ceiling, Report, Series, Target
from .worker import ASYNC_PATH, DEFAULT_PATH

__all__ = ["SCENARIOS", "SCENARIO_BUILDERS", "Plan", "make_plan", "run_plan"]

logger = logging.getLogger(__name__)

#: Largest warm-up object: the throughput cases warm up at their own size,
#: the single-object ``wan`` case (1 GiB) does not send 4 GiB first.
WARMUP_LARGEST: Final = 16 * MIB
#: Size of the ping-pong message.
PING_SIZE: Final = 64
#: Throughput targets from issue #14 (default path): object size -> (ceiling, ratio).
THROUGHPUT_TARGETS: Final = {
    KIB: ("pingpong", 0.6),
    64 * KIB: ("stop_and_wait_64k", 0.6),
    MIB: ("raw", 0.6),
    16 * MIB: ("raw", 0.8),
}
#: Sizes whose default path must reach this fraction of the async path (issue #14).
PATH_RATIO_SIZES: Final = (KIB, 64 * KIB, MIB)
PATH_RATIO_TARGET: Final = 0.9
#: Fan-out target (issue #14): targets -> ratio to the raw fan-out ceiling.
FANOUT_TARGETS: Final = {16: 0.6}
#: TLS targets (issue #11): object size -> ratio to raw ``trio.SSLStream``.
TLS_TARGETS: Final = {MIB: 0.45, 16 * MIB: 0.6}
#: WebSocket targets: object size -> ratio to trio-websocket alone, same scheme.
WS_TARGETS: Final = {MIB: 0.45, 16 * MIB: 0.6}
#: The ``ws`` receiver's URL (``wss`` over mutual TLS).
WS_LISTEN: Final = "{scheme}://127.0.0.1:0/fedstream"
#: ``ws`` ceiling keys by scheme.
WS_CEILINGS: Final = {"ws": "websocket", "wss": "websocket_tls"}
#: Loaded small-object p99 beside a large transfer, in chunk times (issue #14).
HOL_P99_CHUNKS: Final = 3.0
#: Allowed peak-RSS increase while streaming many 1 MiB objects.
MEMORY_LIMIT_MIB: Final = 100.0
#: Allowed peak-RSS increase of each side for one large object, in object sizes.
SINGLE_OBJECT_RSS_LIMIT: Final = 2.5
#: Small objects that must complete while the large one is in transfer (``hol``).
HOL_MIN_DURING: Final = 10
#: The ``wan`` relay: one-way delay (s) and bandwidth cap (bytes/s) by default.
#: The cap is chosen so that both of issue #14's pipelined-stream targets
#: below can be met (see benchmarks/README.md, "The wan relay"): stop-and-wait
#: with 1 MiB objects is bounded at 0.044x of it, a window of 16 at 0.71x.
WAN_DELAY: Final = 0.025
WAN_RATE: Final = 450 * MB
#: ``max_in_flight`` of the pipelined ``wan`` row, and its target (issue #14):
#: at least this fraction of the relay ceiling, 1 MiB objects.
WAN_WINDOW: Final = 16
WAN_WINDOW_TARGET: Final = 0.6
#: The stop-and-wait ``wan`` row's target: at most this fraction (issue #14).
WAN_STOP_AND_WAIT_TARGET: Final = 0.05
#: Bytes the relay queues per direction: twice the bandwidth-delay
#: product, at least this many.
WAN_MIN_QUEUE_BYTES: Final = 4 * MIB
#: The relay's one-way delay in a ``--smoke`` run, unless one is given.
SMOKE_WAN_DELAY: Final = 0.002
#: Measurements a ``--smoke`` run makes at once (``Plan.parallel``).
SMOKE_PARALLEL: Final = 3

Values = dict[str, float]


@dataclass(frozen=True)
class Plan:
    """How much work each case does; ``make_plan`` fills in full, quick or smoke figures."""

    quick: bool
    repeat: int
    #: Memory cases are slow and nearly deterministic, so they repeat less.
    memory_repeat: int
    #: The ``wan`` cases take about a minute each in a full run.
    wan_repeat: int
    #: Each worker's own time limit, seconds.
    timeout: float
    #: ``--smoke``: tiny totals that exercise every row; figures mean nothing.
    smoke: bool = False
    #: Extra ``open_site`` options for every fedstream worker.
    site: dict[str, int] = field(default_factory=dict)
    #: Keep the sender and the receivers on different CPUs (see ``cpu_layout``).
    pin: bool = False
    #: Measurements run at once. Only ``--smoke``, whose figures mean nothing,
    #: runs more than one: its time is mostly worker start-up.
    parallel: int = 1
    raw_total: int = GIB
    ping_count: int = 20_000
    throughput: tuple[tuple[int, int], ...] = (
        (KIB, 10_000),
        (64 * KIB, 4096),
        (MIB, 1024),
        (16 * MIB, 64),
    )
    fanout_targets: tuple[int, ...] = (1, 4, 16)
    #: Bytes delivered in total (all targets together) per fan-out run.
    fanout_bytes: int = GIB
    concurrency: tuple[int, ...] = (1, 10, 100, 1000)
    concurrency_object: int = 64 * KIB
    #: Objects per concurrency level, split over its streams (at least one each).
    concurrency_objects: int = 4096
    memory_total: int = 2 * GIB
    memory_single: int = 256 * MIB
    latency_objects: int = 10_000
    hol_small: int = KIB
    #: Small objects timed on the idle connection before the large one starts.
    hol_idle_objects: int = 2000
    hol_big: int = 256 * MIB
    wan_delay: float = WAN_DELAY
    wan_rate: float = WAN_RATE
    #: Bytes delivered by each ``wan`` case and by its relay ceiling.
    wan_total: int = GIB
    wan_raw_total: int = GIB
    tls_raw_total: int = GIB
    tls: tuple[tuple[int, int], ...] = ((MIB, 1024), (16 * MIB, 64))
    #: Bytes the trio-websocket ceilings send.
    ws_total: int = GIB
    #: ``ws``: (object size, objects) per case, over ``ws://`` and ``wss://``.
    ws: tuple[tuple[int, int], ...] = ((MIB, 1024), (16 * MIB, 64))

    @property
    def mode(self) -> Literal["smoke", "quick", "full"]:
        return "smoke" if self.smoke else "quick" if self.quick else "full"

    @property
    def scaled(self) -> str:
        """The option that scaled this plan down (for notes)."""
        return "--smoke" if self.smoke else "--quick"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def make_plan(
    *,
    quick: bool,
    smoke: bool = False,
    repeat: int | None = None,
    site: dict[str, int] | None = None,
    pin: bool = False,
    wan_delay: float | None = None,
    wan_rate: float = WAN_RATE,
) -> Plan:
    """The full plan, the scaled-down ``--quick`` one, or the tiny ``--smoke`` one.

    ``--smoke`` exists for CI: every scenario, ceiling and row runs end to end
    (fresh processes, real sockets, the relay, certificates) on a few MiB
    each, so the run checks the harness in well under a minute; its figures
    are too small to mean anything. ``wan_delay`` defaults to
    :data:`WAN_DELAY` (:data:`SMOKE_WAN_DELAY` for ``smoke``).
    """
    site = dict(site or {})
    if wan_delay is None:
        wan_delay = SMOKE_WAN_DELAY if smoke else WAN_DELAY
    common: dict[str, Any] = {
        "site": site,
        "pin": pin,
        "wan_delay": wan_delay,
        "wan_rate": wan_rate,
    }
    if not quick:
        reps = repeat or 5
        return Plan(
            quick=False,
            repeat=reps,
            memory_repeat=min(reps, 3),
            wan_repeat=min(reps, 2),
            timeout=300,
            **common,
        )
    if smoke:
        reps = repeat or 1
        return Plan(
            quick=True,
            smoke=True,
            parallel=SMOKE_PARALLEL,
            repeat=reps,
            memory_repeat=min(reps, 1),
            wan_repeat=min(reps, 1),
            timeout=60,
            raw_total=8 * MIB,
            ping_count=200,
            throughput=((KIB, 200), (64 * KIB, 32), (MIB, 4), (16 * MIB, 1)),
            fanout_targets=(1, 2),
            fanout_bytes=8 * MIB,
            concurrency=(1, 10, 100),
            concurrency_objects=100,
            concurrency_object=4 * KIB,
            memory_total=8 * MIB,
            memory_single=8 * MIB,
            latency_objects=100,
            hol_idle_objects=50,
            hol_big=16 * MIB,
            wan_total=4 * MIB,
            wan_raw_total=4 * MIB,
            tls_raw_total=8 * MIB,
            tls=((MIB, 4), (16 * MIB, 1)),
            ws_total=8 * MIB,
            ws=((MIB, 4), (16 * MIB, 1)),
            **common,
        )
    reps = repeat or 1
    return Plan(
        quick=True,
        repeat=reps,
        memory_repeat=min(reps, 1),
        wan_repeat=min(reps, 1),
        timeout=60,
        # Large enough that the kernel's socket buffers (several MiB per
        # connection on loopback) do not flatter a ceiling: with 256 MiB over
        # 16 receivers, the raw fan-out ceiling read 1.5x its full-run figure.
        raw_total=512 * MIB,
        ping_count=5000,
        throughput=((KIB, 2000), (64 * KIB, 512), (MIB, 256), (16 * MIB, 16)),
        fanout_bytes=GIB,
        concurrency_objects=256,
        memory_total=256 * MIB,
        memory_single=64 * MIB,
        latency_objects=2000,
        hol_idle_objects=500,
        hol_big=64 * MIB,
        wan_total=128 * MIB,
        # The relay ceiling's clock includes one round trip (the data's way
        # out, the acknowledgement's way back): 256 MiB read 8% under the cap
        # for that alone, 512 MiB reads 4% under.
        wan_raw_total=512 * MIB,
        tls_raw_total=256 * MIB,
        tls=((MIB, 128), (16 * MIB, 8)),
        ws_total=128 * MIB,
        ws=((MIB, 128), (16 * MIB, 8)),
        **common,
    )


# ----------------------------------------------------------------- the setup


class _Env:
    """What cases share beyond the plan: certificates for ``tls``, made on
    first use in a temporary directory that :func:`run_plan` removes."""

    def __init__(self, stack: contextlib.ExitStack) -> None:
        self._stack = stack
        self._certs: Path | None = None
        # Cases may run in parallel threads (``Plan.parallel``).
        self._lock = threading.Lock()

    def tls_files(self, name: str) -> dict[str, str]:
        """Certificate, key and CA paths for site ``name`` (``sender`` or ``site-N``).

        Raises:
            BenchError: the ``cryptography`` package is missing.
        """
        with self._lock:
            return self._tls_files(name)

    def _tls_files(self, name: str) -> dict[str, str]:
        if self._certs is None:
            from .._provision import provision

            directory = Path(self._stack.enter_context(tempfile.TemporaryDirectory()))
            receivers = [f"site-{i}" for i in range(16)]
            try:
                # Only the receivers listen, so only their certificates name
                # the address that is dialed.
                provision(
                    directory,
                    ["sender", *receivers],
                    hosts=[f"{name}=127.0.0.1" for name in receivers],
                )
            except ImportError as exc:
                raise BenchError(
                    "the tls scenario needs certificates: pip install 'fedstream[provision]'"
                ) from exc
            self._certs = directory
        return {
            "cert": str(self._certs / f"{name}.crt"),
            "key": str(self._certs / f"{name}.key"),
            "ca": str(self._certs / "ca.crt"),
        }


# ------------------------------------------------------------------ ceilings


def _raw(
    plan: Plan,
    env: _Env,
    receivers: int,
    total: int,
    *,
    tls: bool = False,
    relay: bool = False,
) -> Values:
    per_target = total if receivers == 1 else total // receivers

    def security(name: str) -> dict[str, Any]:
        return {"tls": env.tls_files(name)} if tls else {}

    sent, _ = run_exchange(
        "raw-recv",
        [{"total": per_target, **security(f"site-{i}")} for i in range(receivers)],
        "raw-send",
        lambda addresses: {"addresses": addresses, "total": per_target, **security("sender")},
        timeout=plan.timeout,
        pin=plan.pin,
        relay=_relay_config(plan) if relay else None,
    )
    return {"mb_per_s": sent["bytes"] / sent["elapsed"] / MB}


def _pingpong(plan: Plan, env: _Env) -> Values:
    sent, _ = run_exchange(
        "ping-server",
        [{"size": PING_SIZE}],
        "ping-client",
        lambda addresses: {"address": addresses[0], "size": PING_SIZE, "count": plan.ping_count},
        timeout=plan.timeout,
        pin=plan.pin,
    )
    return {
        "rate": sent["round_trips"] / sent["elapsed"],
        "rtt_p50": sent["rtt_p50"] * 1e6,
    }


def _websocket(plan: Plan, env: _Env, scheme: str) -> Values:
    """trio-websocket alone: ``plan.ws_total`` bytes as binary messages of the
    WebSocket transport's message size, mutual TLS for ``wss``."""

    def security(name: str) -> dict[str, Any]:
        return {"tls": env.tls_files(name)} if scheme == "wss" else {}

    sent, _ = run_exchange(
        "tws-recv",
        [{"total": plan.ws_total, **security("site-0")}],
        "tws-send",
        lambda addresses: {"addresses": addresses, "total": plan.ws_total, **security("sender")},
        timeout=plan.timeout,
        pin=plan.pin,
    )
    return {"mb_per_s": sent["bytes"] / sent["elapsed"] / MB}


def _stop_and_wait(size: int, sources: dict[str, float]) -> Values:
    """``1 / (RTT + size / raw)`` as MB/s, RTT being the mean ping-pong round trip."""
    seconds = 1 / sources["pingpong"] + size / (sources["raw"] * MB)
    return {"mb_per_s": size / seconds / MB}


@dataclass
class _CeilingSpec:
    """One ceiling measurement per round, feeding one or more :class:`Ceiling`\\ s.

    A *derived* ceiling has ``derive`` instead of ``run``: it is computed each
    round from that round's values of the ceilings named in ``needs``.
    """

    #: result key -> ceiling it feeds
    feeds: dict[str, Ceiling]
    run: Callable[[], Values] | None = None
    derive: Callable[[dict[str, float]], Values] | None = None
    needs: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        return next(iter(self.feeds.values())).key


def _raw_ceiling(plan: Plan, env: _Env) -> _CeilingSpec:
    label = f"raw trio TCP, 1 MiB send_all, {format_size(plan.raw_total)}"
    raw = Ceiling("raw", label, Series("MB/s"))
    return _CeilingSpec(
        {"mb_per_s": raw}, run=functools.partial(_raw, plan, env, 1, plan.raw_total)
    )


def _pingpong_ceiling(plan: Plan, env: _Env) -> _CeilingSpec:
    rate = Ceiling("pingpong", f"trio {PING_SIZE}-byte ping-pong", Series("rt/s"))
    rtt = Ceiling("pingpong_rtt", f"trio {PING_SIZE}-byte ping-pong p50 RTT", Series("us"))
    return _CeilingSpec({"rate": rate, "rtt_p50": rtt}, run=functools.partial(_pingpong, plan, env))


def _relay_config(plan: Plan) -> Callable[[list[str]], dict[str, Any]]:
    bdp = plan.wan_rate * plan.wan_delay
    queue_bytes = max(WAN_MIN_QUEUE_BYTES, math.ceil(2 * bdp))

    def config(addresses: list[str]) -> dict[str, Any]:
        return {"delay": plan.wan_delay, "rate": plan.wan_rate, "queue_bytes": queue_bytes}

    return config


# --------------------------------------------------------------------- cases


def _fs_exchange(
    plan: Plan,
    env: _Env,
    receivers: int,
    sender: dict[str, Any],
    *,
    path: str = DEFAULT_PATH,
    tls: bool = False,
    relay: bool = False,
    listen: str | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """``listen``: the receivers' URL, when not ``tcp://`` (``tls://`` with ``tls``)."""

    def worker(name: str) -> dict[str, Any]:
        config: dict[str, Any] = {"name": name, "site": plan.site, "path": path}
        if tls:
            config["tls"] = env.tls_files(name)
        return config

    def receiver(name: str) -> dict[str, Any]:
        return worker(name) if listen is None else {**worker(name), "listen": listen}

    sent, received = run_exchange(
        "fs-recv",
        [receiver(f"site-{i}") for i in range(receivers)],
        "fs-send",
        lambda addresses: {**sender, **worker("sender"), "addresses": addresses},
        timeout=plan.timeout,
        pin=plan.pin,
        relay=_relay_config(plan) if relay else None,
    )
    streams = int(sender.get("streams", 1))
    expected = streams * int(sender["objects"])
    if sent["failures"] or sent["streams_ok"] != streams or sent["objects"] != expected:
        raise BenchError(
            f"sender finished {sent['streams_ok']}/{streams} streams, "
            f"{sent['objects']}/{expected} objects: {'; '.join(sent['failures'])}"
        )
    for index, result in enumerate(received):
        if result["objects"] != expected or result["streams_ok"] != streams:
            raise BenchError(
                f"receiver {index} got {result['objects']}/{expected} objects, "
                f"{result['streams_ok']}/{streams} streams OK, failed: {result['streams_failed']}"
            )
    return sent, received


def _objects(
    plan: Plan,
    env: _Env,
    size: int,
    objects: int,
    *,
    targets: int = 1,
    path: str = DEFAULT_PATH,
    tls: bool = False,
    relay: bool = False,
    listen: str | None = None,
    max_in_flight: int = 1,
) -> Values:
    """``objects`` objects of ``size`` bytes to each of ``targets`` receivers,
    ``max_in_flight`` at a time (1: stop-and-wait)."""
    config = {
        "object_size": size,
        "objects": objects,
        "warmup_size": min(size, WARMUP_LARGEST),
        "max_in_flight": max_in_flight,
    }
    sent, _ = _fs_exchange(
        plan, env, targets, config, path=path, tls=tls, relay=relay, listen=listen
    )
    elapsed = sent["elapsed"]
    return {
        "mb_per_s": objects * size * targets / elapsed / MB,
        "objects_per_s": objects / elapsed,
        "elapsed": elapsed,
    }


def _concurrency(plan: Plan, env: _Env, streams: int, per_stream: int) -> Values:
    size = plan.concurrency_object
    sent, _ = _fs_exchange(
        plan, env, 1, {"object_size": size, "objects": per_stream, "streams": streams}
    )
    elapsed = sent["elapsed"]
    objects = streams * per_stream
    return {
        "mb_per_s": objects * size / elapsed / MB,
        "objects_per_s": objects / elapsed,
        "elapsed": elapsed,
        "streams_ok": float(sent["streams_ok"]),
    }


def _memory(plan: Plan, env: _Env, size: int, objects: int) -> Values:
    sent, (received,) = _fs_exchange(plan, env, 1, {"object_size": size, "objects": objects})
    values = {
        "sender_rss_increase": sent["rss_increase"] / MIB,
        "receiver_rss_increase": received["rss_increase"] / MIB,
        "sender_rss_peak": sent["rss_peak"] / MIB,
        "receiver_rss_peak": received["rss_peak"] / MIB,
        "mb_per_s": objects * size / sent["elapsed"] / MB,
    }
    if objects == 1:
        values["sender_rss_multiple"] = sent["rss_increase"] / size
        values["receiver_rss_multiple"] = received["rss_increase"] / size
    return values


def _latency(plan: Plan, env: _Env, objects: int, path: str) -> Values:
    sent, _ = _fs_exchange(
        plan, env, 1, {"object_size": KIB, "objects": objects, "latency": True}, path=path
    )
    return {
        "p50": sent["latency_p50"] * 1e6,
        "p99": sent["latency_p99"] * 1e6,
        "objects_per_s": objects / sent["elapsed"],
    }


def _hol(plan: Plan, env: _Env) -> Values:
    sent, (received,) = run_exchange(
        "fs-recv",
        [{"name": "site-0", "site": plan.site, "path": DEFAULT_PATH}],
        "fs-hol",
        lambda addresses: {
            "addresses": addresses,
            "site": plan.site,
            "path": DEFAULT_PATH,
            "small_size": plan.hol_small,
            "idle_objects": plan.hol_idle_objects,
            "big_size": plan.hol_big,
        },
        timeout=plan.timeout,
        pin=plan.pin,
    )
    if sent["failures"]:
        raise BenchError("; ".join(sent["failures"]))
    small, bulk = sent["small_objects"], received["bulk"]
    if received["objects"] != small or received["streams_ok"] != 1:
        raise BenchError(
            f"receiver got {received['objects']}/{small} small objects, "
            f"{received['streams_ok']}/1 streams OK, failed: {received['streams_failed']}"
        )
    if bulk["objects"] != 1 or bulk["bytes"] != plan.hol_big or bulk["streams_ok"] != 1:
        raise BenchError(f"receiver got the large object wrong: {bulk}")
    if sent["idle_count"] < plan.hol_idle_objects or sent["loaded_count"] < 1:
        raise BenchError(
            f"{sent['idle_count']} idle and {sent['loaded_count']} loaded latencies recorded"
        )
    # A chunk time: how long the large transfer took per chunk, at its own rate.
    chunk_time = (
        plan.site.get("chunk_size", DEFAULT_CHUNK_SIZE) * sent["big_elapsed"] / plan.hol_big
    )
    return {
        "idle_p50": sent["idle_p50"] * 1e6,
        "idle_p99": sent["idle_p99"] * 1e6,
        "loaded_p50": sent["loaded_p50"] * 1e6,
        "loaded_p99": sent["loaded_p99"] * 1e6,
        "p50_chunks": sent["loaded_p50"] / chunk_time,
        "p99_chunks": sent["loaded_p99"] / chunk_time,
        "p50_slowdown": sent["loaded_p50"] / sent["idle_p50"],
        "loaded_count": float(sent["loaded_count"]),
        "during_big": float(sent["during_big"]),
        "big_mb_per_s": sent["big_mb_per_s"],
        "big_elapsed": sent["big_elapsed"],
    }


@dataclass
class _CaseSpec:
    """One measurement and the table row(s) it feeds: each row takes, from
    every repetition's values, those named by its own metrics. A spec with
    ``run=None`` is a comparison row, filled from other rows each round."""

    results: list[CaseResult]
    run: Callable[[], Values] | None
    repetitions: int


def _result(
    scenario: str,
    case: str,
    params: dict[str, Any],
    units: dict[str, str],
    headline: str,
    *,
    ceiling: str | None = None,
    inverse: bool = False,
    target: Target | None = None,
    notes: Sequence[str] = (),
    compare: tuple[str, str] | None = None,
) -> CaseResult:
    return CaseResult(
        scenario=scenario,
        case=case,
        params=params,
        metrics={key: Series(unit) for key, unit in units.items()},
        headline=headline,
        ceiling=ceiling,
        inverse=inverse,
        target=target,
        notes=list(notes),
        compare=compare,
    )


def _case(
    scenario: str,
    case: str,
    params: dict[str, Any],
    units: dict[str, str],
    headline: str,
    run: Callable[[], Values],
    repetitions: int,
    **options: Any,
) -> _CaseSpec:
    result = _result(scenario, case, params, units, headline, **options)
    return _CaseSpec([result], run, repetitions)


def _path_comparison(scenario: str, case: str, params: dict[str, Any], reps: int) -> _CaseSpec:
    """The row ``CASE default/async``: the default row's headline over the async row's."""
    return _CaseSpec(
        [
            _result(
                scenario,
                f"{case} default/async",
                {**params, "path": "default/async"},
                {"per_round": "x"},
                "per_round",
                target=_ratio_target(PATH_RATIO_TARGET),
                compare=(f"{scenario}/{case}", f"{scenario}/{case} async"),
            )
        ],
        None,
        reps,
    )


_RATE_UNITS: Final = {"mb_per_s": "MB/s", "objects_per_s": "obj/s", "elapsed": "s"}
_MEMORY_UNITS: Final = {
    "sender_rss_increase": "MiB",
    "receiver_rss_increase": "MiB",
    "sender_rss_peak": "MiB",
    "receiver_rss_peak": "MiB",
    "mb_per_s": "MB/s",
}


def _ratio_target(value: float | None) -> Target | None:
    return None if value is None else Target("ratio_min", value, f">={value:.2f}x")


def _both_paths(
    scenario: str,
    case: str,
    params: dict[str, Any],
    units: dict[str, str],
    headline: str,
    run: Callable[..., Values],
    reps: int,
    *,
    ceiling: str | None,
    target: Target | None,
    compare: bool,
    notes: Sequence[str] = (),
) -> list[_CaseSpec]:
    """The default-path row (with the target), the async-path row, and with
    ``compare`` the ratio row. ``run`` takes ``path=``."""
    specs = [
        _case(
            scenario,
            case,
            {**params, "path": DEFAULT_PATH},
            units,
            headline,
            functools.partial(run, path=DEFAULT_PATH),
            reps,
            ceiling=ceiling,
            target=target,
            notes=notes,
        ),
        _case(
            scenario,
            f"{case} async",
            {**params, "path": ASYNC_PATH},
            units,
            headline,
            functools.partial(run, path=ASYNC_PATH),
            reps,
            ceiling=ceiling,
        ),
    ]
    if compare:
        specs.append(_path_comparison(scenario, case, params, reps))
    return specs


# ----------------------------------------------------------------- scenarios

#: A scenario: the ceilings it needs and its cases (see the module docstring).
Builder = Callable[[Plan, _Env], tuple[list[_CeilingSpec], list[_CaseSpec]]]


def _throughput_scenario(plan: Plan, env: _Env) -> tuple[list[_CeilingSpec], list[_CaseSpec]]:
    raw, ping = _raw_ceiling(plan, env), _pingpong_ceiling(plan, env)
    ceilings = [raw, ping]
    specs: list[_CaseSpec] = []
    for size, objects in plan.throughput:
        ceiling, ratio = THROUGHPUT_TARGETS.get(size, ("raw", None))
        if ceiling == "stop_and_wait_64k":
            label = "stop-and-wait 64 KiB: 1 / (ping-pong RTT + 64 KiB / raw)"
            ceilings.append(
                _CeilingSpec(
                    {"mb_per_s": Ceiling(ceiling, label, Series("MB/s"))},
                    derive=functools.partial(_stop_and_wait, size),
                    needs=("raw", "pingpong"),
                )
            )
        specs += _both_paths(
            "throughput",
            format_size(size),
            {"object_size": size, "objects": objects, "streams": 1, "targets": 1},
            _RATE_UNITS,
            "objects_per_s" if ceiling == "pingpong" else "mb_per_s",
            functools.partial(_objects, plan, env, size, objects),
            plan.repeat,
            ceiling=ceiling,
            target=_ratio_target(ratio),
            compare=size in PATH_RATIO_SIZES,
        )
    return ceilings, specs


def _fanout_scenario(plan: Plan, env: _Env) -> tuple[list[_CeilingSpec], list[_CaseSpec]]:
    ceilings = [_raw_ceiling(plan, env)]
    specs: list[_CaseSpec] = []
    for n in plan.fanout_targets:
        if n > 1:
            label = f"raw trio TCP fan-out to {n} receiver processes (aggregate)"
            ceiling = Ceiling(f"raw_fanout_{n}", label, Series("MB/s"))
            ceilings.append(
                _CeilingSpec(
                    {"mb_per_s": ceiling},
                    run=functools.partial(_raw, plan, env, n, plan.fanout_bytes),
                )
            )
        objects = max(8, plan.fanout_bytes // (MIB * n))
        specs += _both_paths(
            "fanout",
            f"{n} target{'s' if n > 1 else ''}",
            {"object_size": MIB, "objects": objects, "targets": n},
            _RATE_UNITS,
            "mb_per_s",
            functools.partial(_objects, plan, env, MIB, objects, targets=n),
            plan.repeat,
            ceiling="raw" if n == 1 else f"raw_fanout_{n}",
            target=_ratio_target(FANOUT_TARGETS.get(n)),
            compare=False,
            notes=["MB/s is the aggregate over all targets"],
        )
    return ceilings, specs


def _concurrency_scenario(plan: Plan, env: _Env) -> tuple[list[_CeilingSpec], list[_CaseSpec]]:
    specs = []
    for streams in plan.concurrency:
        per_stream = max(1, plan.concurrency_objects // streams)
        specs.append(
            _case(
                "concurrency",
                f"{streams} stream{'s' if streams > 1 else ''}",
                {
                    "object_size": plan.concurrency_object,
                    "objects_per_stream": per_stream,
                    "streams": streams,
                    "path": DEFAULT_PATH,
                },
                {**_RATE_UNITS, "streams_ok": "streams"},
                "mb_per_s",
                functools.partial(_concurrency, plan, env, streams, per_stream),
                plan.repeat,
                ceiling="raw",
                target=Target("complete", streams, "all complete"),
            )
        )
    return [_raw_ceiling(plan, env)], specs


def _memory_scenario(plan: Plan, env: _Env) -> tuple[list[_CeilingSpec], list[_CaseSpec]]:
    objects = plan.memory_total // MIB
    scaled_total = f" (scaled down from 2 GiB by {plan.scaled})" if plan.quick else ""
    scaled_single = f" (scaled down from 256 MiB by {plan.scaled})" if plan.quick else ""
    specs = [
        _case(
            "memory",
            f"{format_size(plan.memory_total)} as 1 MiB",
            {"object_size": MIB, "objects": objects, "path": DEFAULT_PATH},
            _MEMORY_UNITS,
            "receiver_rss_increase",
            functools.partial(_memory, plan, env, MIB, objects),
            plan.memory_repeat,
            target=Target("rss_max", MEMORY_LIMIT_MIB, f"<{MEMORY_LIMIT_MIB:.0f} MiB"),
            notes=[f"streams {format_size(plan.memory_total)}{scaled_total}"],
        ),
        _case(
            "memory",
            f"1 x {format_size(plan.memory_single)}",
            {"object_size": plan.memory_single, "objects": 1, "path": DEFAULT_PATH},
            {**_MEMORY_UNITS, "sender_rss_multiple": "x", "receiver_rss_multiple": "x"},
            "receiver_rss_multiple",
            functools.partial(_memory, plan, env, plan.memory_single, 1),
            plan.memory_repeat,
            target=Target(
                "at_most",
                SINGLE_OBJECT_RSS_LIMIT,
                f"<={SINGLE_OBJECT_RSS_LIMIT:g}x size",
                ("sender_rss_multiple", "receiver_rss_multiple"),
            ),
            notes=[
                f"one object of {format_size(plan.memory_single)}{scaled_single}; "
                "x size = peak RSS increase / object size, each side"
            ],
        ),
    ]
    return [], specs


def _latency_scenario(plan: Plan, env: _Env) -> tuple[list[_CeilingSpec], list[_CaseSpec]]:
    specs = _both_paths(
        "latency",
        "1 KiB",
        {"object_size": KIB, "objects": plan.latency_objects},
        {"p50": "us", "p99": "us", "objects_per_s": "obj/s"},
        "p50",
        functools.partial(_latency, plan, env, plan.latency_objects),
        plan.repeat,
        ceiling="pingpong_rtt",
        target=None,
        compare=False,
        notes=["produce returning -> process_replies called; ratio = ping-pong RTT / p50"],
    )
    for spec in specs:
        for result in spec.results:
            result.inverse = True
    return [_pingpong_ceiling(plan, env)], specs


def _hol_scenario(plan: Plan, env: _Env) -> tuple[list[_CeilingSpec], list[_CaseSpec]]:
    small_name, big_name = format_size(plan.hol_small), format_size(plan.hol_big)
    params = {
        "small_size": plan.hol_small,
        "idle_objects": plan.hol_idle_objects,
        "big_size": plan.hol_big,
        "path": DEFAULT_PATH,
    }
    scaled = f" (scaled down from 256 MiB by {plan.scaled})" if plan.quick else ""
    notes = [
        f"one connection; {plan.hol_idle_objects:,} x {small_name} alone (idle), then "
        f"{small_name} objects beside one {big_name} object on a second stream{scaled}; "
        "loaded = in flight during its transfer; latency = produce returning -> "
        "process_replies; x idle p50 = median over repetitions of loaded p50 / idle p50; "
        "chunk times = latency / (chunk_size / the large transfer's own rate), median over "
        "repetitions"
    ]
    spec = _CaseSpec(
        [
            _result(
                "hol",
                f"{small_name} idle",
                params,
                {"idle_p50": "us", "idle_p99": "us"},
                "idle_p50",
                target=Target("report", 0, "reported"),
                notes=notes,
            ),
            _result(
                "hol",
                f"{small_name} + {big_name}",
                params,
                {
                    "loaded_p50": "us",
                    "loaded_p99": "us",
                    "p50_chunks": "chunks",
                    "p99_chunks": "chunks",
                    "p50_slowdown": "x",
                    "loaded_count": "obj",
                },
                "loaded_p50",
                target=Target(
                    "median_at_most",
                    HOL_P99_CHUNKS,
                    f"p99 <={HOL_P99_CHUNKS:g} chunk times",
                    ("p99_chunks",),
                ),
            ),
            _result(
                "hol",
                f"{big_name} beside",
                params,
                {"during_big": "obj", "big_mb_per_s": "MB/s", "big_elapsed": "s"},
                "during_big",
                target=Target(
                    "at_least", HOL_MIN_DURING, f">={HOL_MIN_DURING} small done", ("during_big",)
                ),
            ),
        ],
        functools.partial(_hol, plan, env),
        plan.repeat,
    )
    return [], [spec]


def _wan_scenario(plan: Plan, env: _Env) -> tuple[list[_CeilingSpec], list[_CaseSpec]]:
    rate_mb = plan.wan_rate / MB
    delay_ms = plan.wan_delay * 1000
    label = (
        f"raw trio TCP through the relay ({delay_ms:g} ms each way, "
        f"{rate_mb:g} MB/s cap), {format_size(plan.wan_raw_total)}"
    )
    relay = Ceiling("relay", label, Series("MB/s"))
    ceiling = _CeilingSpec(
        {"mb_per_s": relay},
        run=functools.partial(_raw, plan, env, 1, plan.wan_raw_total, relay=True),
    )
    scaled = f" (scaled down from 1 GiB by {plan.scaled})" if plan.quick else ""
    total = format_size(plan.wan_total)
    round_trip = 2 * plan.wan_delay
    stop_and_wait = MIB / (round_trip + MIB / plan.wan_rate) / MB
    window = WAN_WINDOW * MIB / (round_trip + MIB / plan.wan_rate) / MB
    notes = [
        f"sender -> relay -> receiver, three processes; the relay adds {delay_ms:g} ms each "
        f"way and caps each direction at {rate_mb:g} MB/s; {total} delivered{scaled}",
        f"1 MiB objects through this link: stop-and-wait cannot beat 1 MiB / (RTT + 1 MiB / "
        f"cap) = {stop_and_wait:.1f} MB/s ({stop_and_wait / rate_mb:.3f}x of the cap), a "
        f"window of {WAN_WINDOW} objects {WAN_WINDOW} MiB / (RTT + 1 MiB / cap) = "
        f"{min(window, rate_mb):.0f} MB/s ({min(window, rate_mb) / rate_mb:.2f}x)",
    ]
    rows: list[tuple[str, int, int, Target]] = [
        (
            f"{total} as 1 MiB, window {WAN_WINDOW}",
            MIB,
            WAN_WINDOW,
            Target("ratio_min", WAN_WINDOW_TARGET, f">={WAN_WINDOW_TARGET:.2f}x"),
        ),
        (
            f"{total} as 1 MiB, stop-and-wait",
            MIB,
            1,
            Target("ratio_max", WAN_STOP_AND_WAIT_TARGET, f"<={WAN_STOP_AND_WAIT_TARGET:.3f}x"),
        ),
        (f"1 x {total}", plan.wan_total, 1, Target("report", 0, "reported")),
    ]
    specs = []
    for case, size, in_flight, target in rows:
        objects = plan.wan_total // size
        specs.append(
            _case(
                "wan",
                case,
                {
                    "object_size": size,
                    "objects": objects,
                    "max_in_flight": in_flight,
                    "delay": plan.wan_delay,
                    "rate": plan.wan_rate,
                    "path": DEFAULT_PATH,
                },
                _RATE_UNITS,
                "mb_per_s",
                functools.partial(
                    _objects, plan, env, size, objects, relay=True, max_in_flight=in_flight
                ),
                plan.wan_repeat,
                ceiling="relay",
                target=target,
                notes=notes,
            )
        )
    return [ceiling], specs


def _tls_scenario(plan: Plan, env: _Env) -> tuple[list[_CeilingSpec], list[_CaseSpec]]:
    label = f"raw trio.SSLStream, mutual TLS, 1 MiB send_all, {format_size(plan.tls_raw_total)}"
    ceiling = _CeilingSpec(
        {"mb_per_s": Ceiling("tls_raw", label, Series("MB/s"))},
        run=functools.partial(_raw, plan, env, 1, plan.tls_raw_total, tls=True),
    )
    specs: list[_CaseSpec] = []
    for size, objects in plan.tls:
        specs += _both_paths(
            "tls",
            format_size(size),
            {"object_size": size, "objects": objects, "streams": 1, "targets": 1},
            _RATE_UNITS,
            "mb_per_s",
            functools.partial(_objects, plan, env, size, objects, tls=True),
            plan.repeat,
            ceiling="tls_raw",
            target=_ratio_target(TLS_TARGETS.get(size)),
            compare=False,
            notes=["tls:// with mutual TLS; certificates made for the run in a temp dir"],
        )
    return [ceiling], specs


def _ws_scenario(plan: Plan, env: _Env) -> tuple[list[_CeilingSpec], list[_CaseSpec]]:
    ceilings: list[_CeilingSpec] = []
    specs: list[_CaseSpec] = []
    for scheme in ("ws", "wss"):
        over = " over mutual TLS" if scheme == "wss" else ""
        label = (
            f"trio-websocket alone{over}, {format_size(WS_MESSAGE_SIZE)} messages, "
            f"{format_size(plan.ws_total)}"
        )
        ceilings.append(
            _CeilingSpec(
                {"mb_per_s": Ceiling(WS_CEILINGS[scheme], label, Series("MB/s"))},
                run=functools.partial(_websocket, plan, env, scheme),
            )
        )
        listen = WS_LISTEN.format(scheme=scheme)
        for size, objects in plan.ws:
            specs.append(
                _case(
                    "ws",
                    f"{scheme} {format_size(size)}",
                    {
                        "scheme": scheme,
                        "object_size": size,
                        "objects": objects,
                        "path": DEFAULT_PATH,
                    },
                    _RATE_UNITS,
                    "mb_per_s",
                    functools.partial(
                        _objects, plan, env, size, objects, tls=scheme == "wss", listen=listen
                    ),
                    plan.repeat,
                    ceiling=WS_CEILINGS[scheme],
                    target=_ratio_target(WS_TARGETS.get(size)),
                    notes=[f"receiver on {WS_LISTEN.format(scheme='ws(s)')}; wss with mutual TLS"],
                )
            )
    return ceilings, specs


#: Every scenario, in the order they run and are reported.
SCENARIO_BUILDERS: Final[dict[str, Builder]] = {
    "throughput": _throughput_scenario,
    "fanout": _fanout_scenario,
    "concurrency": _concurrency_scenario,
    "memory": _memory_scenario,
    "latency": _latency_scenario,
    "hol": _hol_scenario,
    "wan": _wan_scenario,
    "tls": _tls_scenario,
    "ws": _ws_scenario,
}
SCENARIOS: Final = tuple(SCENARIO_BUILDERS)


# ---------------------------------------------------------------------- loop


def _describe(exc: Exception) -> str:
    return str(exc) if isinstance(exc, BenchError) else f"{type(exc).__name__}: {exc}"


def _build(
    plan: Plan, env: _Env, scenarios: Sequence[str]
) -> tuple[list[_CeilingSpec], list[_CaseSpec]]:
    """All the scenarios' ceilings (each key once, measured ones before derived
    ones) and cases."""
    ceilings: dict[str, _CeilingSpec] = {}
    cases: list[_CaseSpec] = []
    for name in scenarios:
        their_ceilings, their_cases = SCENARIO_BUILDERS[name](plan, env)
        for spec in their_ceilings:
            ceilings.setdefault(spec.key, spec)
        cases += their_cases
    ordered = sorted(ceilings.values(), key=lambda spec: spec.derive is not None)
    return ordered, cases


def _ceiling_rounds(ceilings: Sequence[_CeilingSpec], cases: Sequence[_CaseSpec]) -> list[int]:
    """How many rounds each ceiling is measured in: as many as the most
    repeated case compared with it (or with a ceiling derived from it)."""
    needed: dict[str, int] = {}
    for case_spec in cases:
        for result in case_spec.results:
            if result.ceiling is not None:
                needed[result.ceiling] = max(needed.get(result.ceiling, 0), case_spec.repetitions)

    def rounds(spec: _CeilingSpec) -> int:
        return max(needed.get(ceiling.key, 0) for ceiling in spec.feeds.values())

    for spec in ceilings:
        if spec.derive is not None:
            for key in spec.needs:
                needed[key] = max(needed.get(key, 0), rounds(spec))
    return [rounds(spec) for spec in ceilings]


def _measure_ceiling(
    spec: _CeilingSpec, this_round: dict[str, float], tag: str, progress: Callable[[str], None]
) -> None:
    ceilings = list(spec.feeds.values())
    if any(c.error for c in ceilings):
        return
    started = time.monotonic()
    try:
        if spec.derive is not None:
            if any(key not in this_round for key in spec.needs):
                return  # a ceiling it derives from failed: that one is reported
            values = spec.derive({key: this_round[key] for key in spec.needs})
        else:
            assert spec.run is not None
            values = spec.run()
    except Exception as exc:
        logger.debug("ceiling %s failed", spec.key, exc_info=True)
        for ceiling in ceilings:
            ceiling.error = _describe(exc)
        progress(f"{tag} ceiling {ceilings[0].label}: FAILED: {_describe(exc)}")
        return
    shown = []
    for key, ceiling in spec.feeds.items():
        ceiling.series.values.append(values[key])
        this_round[ceiling.key] = values[key]
        shown.append(f"{values[key]:,.1f} {ceiling.series.unit}")
    elapsed = time.monotonic() - started
    progress(f"{tag} ceiling {ceilings[0].label}: {', '.join(shown)} ({elapsed:.1f} s)")


def _measure_case(
    spec: _CaseSpec,
    this_round: dict[str, float],
    tag: str,
    progress: Callable[[str], None],
) -> None:
    first = spec.results[0]
    if spec.run is None:  # a comparison row
        assert first.compare is not None
        top, bottom = (this_round.get(key) for key in first.compare)
        if top is not None and bottom is not None and bottom > 0:
            first.metrics[first.headline].values.append(top / bottom)
            first.repetitions += 1
        return
    started = time.monotonic()
    try:
        values = spec.run()
    except Exception as exc:
        logger.debug("%s %s failed", first.scenario, first.case, exc_info=True)
        for result in spec.results:
            result.error = _describe(exc)
        progress(f"{tag} {first.scenario} {first.case}: FAILED: {first.error}")
        return
    elapsed = time.monotonic() - started
    shown = []
    for result in spec.results:
        for key, series in result.metrics.items():
            series.values.append(values[key])
        result.repetitions += 1
        this_round[result.id] = values[result.headline]
        unit = result.metrics[result.headline].unit
        shown.append(f"{result.case}: {values[result.headline]:,.1f} {unit}")
    progress(f"{tag} {first.scenario} {'; '.join(shown)} ({elapsed:.1f} s)")


def run_plan(
    plan: Plan,
    scenarios: Sequence[str],
    report: Report,
    progress: Callable[[str], None],
) -> None:
    """Measure the ceilings and cases ``scenarios`` need, filling in ``report``."""
    with contextlib.ExitStack() as stack:
        env = _Env(stack)
        ceiling_specs, case_specs = _build(plan, env, scenarios)
        for spec in ceiling_specs:
            for ceiling in spec.feeds.values():
                report.ceilings[ceiling.key] = ceiling
        report.cases = [result for spec in case_specs for result in spec.results]
        ceiling_rounds = _ceiling_rounds(ceiling_specs, case_specs)
        pool = stack.enter_context(ThreadPoolExecutor(plan.parallel)) if plan.parallel > 1 else None

        def each(steps: Sequence[Callable[[], None]]) -> None:
            """Run ``steps`` in order, or ``plan.parallel`` at a time."""
            if pool is None:
                for step in steps:
                    step()
            else:
                for future in [pool.submit(step) for step in steps]:
                    future.result()

        for rep in range(plan.repeat):
            tag = f"[{rep + 1}/{plan.repeat}]"
            this_round: dict[str, float] = {}
            ceilings_now = [
                cspec
                for cspec, rounds in zip(ceiling_specs, ceiling_rounds, strict=True)
                if rep < rounds
            ]
            # Derived ceilings and comparison rows read this round's values
            # of the others, so they follow them.
            for derived in (False, True):
                each(
                    [
                        functools.partial(_measure_ceiling, cspec, this_round, tag, progress)
                        for cspec in ceilings_now
                        if (cspec.derive is not None) == derived
                    ]
                )
            cases_now = [
                case_spec
                for case_spec in case_specs
                if case_spec.results[0].error is None and rep < case_spec.repetitions
            ]
            for comparison in (False, True):
                each(
                    [
                        functools.partial(_measure_case, case_spec, this_round, tag, progress)
                        for case_spec in cases_now
                        if (case_spec.run is None) == comparison
                    ]
                )
    for result in report.cases:
        if result.compare is not None and result.repetitions == 0 and result.error is None:
            result.error = "a case it compares did not complete"
    report.judge()
