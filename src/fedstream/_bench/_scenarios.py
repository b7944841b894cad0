"""What each scenario runs, and the loop that runs them with their ceilings.

Every measurement is a fresh set of OS processes on loopback TCP: one sender
and one or more receivers (see ``worker.py``). Repetitions are interleaved:
each round measures the ceilings and then every case once, so slow drift of
the machine (thermal, noisy neighbours) affects both sides of a ratio alike.
A case that fails stops repeating and is reported as ``ERROR``; the rest of
the run carries on.
"""

from __future__ import annotations

import atexit
import functools
import logging
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

from .._engine._options import DEFAULT_CHUNK_SIZE
from ._common import GIB, KIB, MB, MIB, BenchError, format_size
from ._procs import run_exchange
from ._results import CaseResult, Ceiling, Report, Series, Target

__all__ = ["SCENARIOS", "Plan", "make_plan", "run_plan"]

logger = logging.getLogger(__name__)

SCENARIOS: Final = ("throughput", "fanout", "concurrency", "memory", "latency", "hol", "ws")

#: Size of the ping-pong message.
PING_SIZE: Final = 64
#: Ratio targets from the issue, by object size (throughput) or target count (fan-out).
THROUGHPUT_TARGETS: Final = {KIB: 0.6, MIB: 0.45, 16 * MIB: 0.6}
FANOUT_TARGETS: Final = {16: 0.5}
#: Ratio targets of ``ws`` against trio-websocket alone, by object size.
WS_TARGETS: Final = {MIB: 0.45, 16 * MIB: 0.6}
#: The ``ws`` receiver's URL (``wss`` over TLS).
WS_LISTEN: Final = "{scheme}://127.0.0.1:0/fedstream"
#: Allowed peak-RSS increase while streaming many 1 MiB objects.
MEMORY_LIMIT_MIB: Final = 100.0
#: Allowed peak-RSS increase of each side for one large object, in object sizes.
SINGLE_OBJECT_RSS_LIMIT: Final = 2.5
#: Small objects that must complete while the large one is in transfer (``hol``).
HOL_MIN_DURING: Final = 10

Values = dict[str, float]


@dataclass(frozen=True)
class Plan:
    """How much work each case does; ``make_plan`` fills in quick or full figures."""

    quick: bool
    repeat: int
    #: Memory cases are slow and nearly deterministic, so they repeat less.
    memory_repeat: int
    #: Each worker's own time limit, seconds.
    timeout: float
    #: Extra ``open_site`` options for every fedstream worker.
    site: dict[str, int] = field(default_factory=dict)
    #: Keep the sender and the receivers on different CPUs (see ``cpu_layout``).
    pin: bool = False
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
    #: ``ws``: (object size, objects) per case, over ``ws://`` and ``wss://``.
    ws: tuple[tuple[int, int], ...] = ((MIB, 1024), (16 * MIB, 64))
    #: Bytes the trio-websocket ceiling sends.
    ws_total: int = GIB

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def make_plan(
    *,
    quick: bool,
    repeat: int | None = None,
    site: dict[str, int] | None = None,
    pin: bool = False,
) -> Plan:
    """The full plan, or the scaled-down ``--quick`` one (under a minute on 2 cores)."""
    site = dict(site or {})
    if not quick:
        reps = repeat or 5
        return Plan(
            quick=False,
            repeat=reps,
            memory_repeat=min(reps, 3),
            timeout=300,
            site=site,
            pin=pin,
        )
    reps = repeat or 1
    return Plan(
        quick=True,
        repeat=reps,
        memory_repeat=min(reps, 1),
        timeout=60,
        site=site,
        pin=pin,
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
        ws=((MIB, 128), (16 * MIB, 8)),
        ws_total=128 * MIB,
    )


# ------------------------------------------------------------------ ceilings


def _raw(plan: Plan, receivers: int) -> Values:
    per_target = plan.raw_total if receivers == 1 else plan.fanout_bytes // receivers
    sent, _ = run_exchange(
        "raw-recv",
        [{"total": per_target}] * receivers,
        "raw-send",
        lambda addresses: {"addresses": addresses, "total": per_target},
        timeout=plan.timeout,
        pin=plan.pin,
    )
    return {"mb_per_s": sent["bytes"] / sent["elapsed"] / MB}


def _pingpong(plan: Plan) -> Values:
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


@functools.cache
def _certificates() -> dict[str, dict[str, str]]:
    """A CA and mutual-TLS files for the ``wss`` workers, made once per run.

    Raises:
        ImportError: ``cryptography`` is missing (``pip install 'fedstream[provision]'``).
    """
    from .._provision import provision

    folder = Path(tempfile.mkdtemp(prefix="fedstream-bench-tls-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    names = ["sender", "site-0"]
    provision(folder, names, hosts=["127.0.0.1"])
    return {
        name: {
            "cert": str(folder / f"{name}.crt"),
            "key": str(folder / f"{name}.key"),
            "ca": str(folder / "ca.crt"),
        }
        for name in names
    }


def _tls_for(scheme: str, name: str) -> dict[str, Any]:
    return {"tls": _certificates()[name]} if scheme == "wss" else {}


def _websocket(plan: Plan, scheme: str) -> Values:
    sent, _ = run_exchange(
        "tws-recv",
        [{"total": plan.ws_total, **_tls_for(scheme, "site-0")}],
        "tws-send",
        lambda addresses: {
            "addresses": addresses,
            "total": plan.ws_total,
            **_tls_for(scheme, "sender"),
        },
        timeout=plan.timeout,
        pin=plan.pin,
    )
    return {"mb_per_s": sent["bytes"] / sent["elapsed"] / MB}


@dataclass
class _CeilingSpec:
    run: Callable[[], Values]
    #: result key -> ceiling it feeds
    feeds: dict[str, Ceiling]


def _ceiling_specs(plan: Plan, scenarios: Sequence[str]) -> list[_CeilingSpec]:
    specs: list[_CeilingSpec] = []
    if {"throughput", "fanout", "concurrency"} & set(scenarios):
        label = f"raw trio TCP, 1 MiB send_all, {format_size(plan.raw_total)}"
        raw = Ceiling("raw", label, Series("MB/s"))
        specs.append(_CeilingSpec(functools.partial(_raw, plan, 1), {"mb_per_s": raw}))
    if {"throughput", "latency"} & set(scenarios):
        rate = Ceiling("pingpong", f"trio {PING_SIZE}-byte ping-pong", Series("rt/s"))
        rtt = Ceiling("pingpong_rtt", f"trio {PING_SIZE}-byte ping-pong p50 RTT", Series("us"))
        specs.append(
            _CeilingSpec(functools.partial(_pingpong, plan), {"rate": rate, "rtt_p50": rtt})
        )
    if "fanout" in scenarios:
        for n in plan.fanout_targets:
            if n > 1:
                label = f"raw trio TCP fan-out to {n} receiver processes (aggregate)"
                ceiling = Ceiling(f"raw_fanout_{n}", label, Series("MB/s"))
                specs.append(_CeilingSpec(functools.partial(_raw, plan, n), {"mb_per_s": ceiling}))
    if "ws" in scenarios:
        for scheme in ("ws", "wss"):
            over = " over mutual TLS" if scheme == "wss" else ""
            label = f"trio-websocket alone{over}, 1 MiB messages, {format_size(plan.ws_total)}"
            ceiling = Ceiling(_WS_CEILINGS[scheme], label, Series("MB/s"))
            specs.append(
                _CeilingSpec(functools.partial(_websocket, plan, scheme), {"mb_per_s": ceiling})
            )
    return specs


_WS_CEILINGS: Final = {"ws": "websocket", "wss": "websocket_tls"}


# --------------------------------------------------------------------- cases


def _fs_exchange(
    plan: Plan, receivers: int, sender: dict[str, Any], receiver: dict[str, Any] | None = None
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    sent, received = run_exchange(
        "fs-recv",
        [{"name": f"site-{i}", "site": plan.site, **(receiver or {})} for i in range(receivers)],
        "fs-send",
        lambda addresses: {**sender, "addresses": addresses, "site": plan.site},
        timeout=plan.timeout,
        pin=plan.pin,
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


def _throughput(plan: Plan, size: int, objects: int) -> Values:
    config = {"object_size": size, "objects": objects, "warmup_size": size}
    sent, _ = _fs_exchange(plan, 1, config)
    elapsed = sent["elapsed"]
    return {"mb_per_s": objects * size / elapsed / MB, "objects_per_s": objects / elapsed}


def _ws_throughput(plan: Plan, scheme: str, size: int, objects: int) -> Values:
    config = {"object_size": size, "objects": objects, "warmup_size": size}
    receiver = {"listen": WS_LISTEN.format(scheme=scheme), **_tls_for(scheme, "site-0")}
    sent, _ = _fs_exchange(plan, 1, {**config, **_tls_for(scheme, "sender")}, receiver)
    elapsed = sent["elapsed"]
    return {"mb_per_s": objects * size / elapsed / MB, "objects_per_s": objects / elapsed}


def _fanout(plan: Plan, targets: int, objects: int) -> Values:
    config = {"object_size": MIB, "objects": objects, "warmup_size": MIB}
    sent, _ = _fs_exchange(plan, targets, config)
    elapsed = sent["elapsed"]
    return {
        "mb_per_s": objects * MIB * targets / elapsed / MB,
        "objects_per_s": objects / elapsed,
    }


def _concurrency(plan: Plan, streams: int, per_stream: int) -> Values:
    size = plan.concurrency_object
    sent, _ = _fs_exchange(
        plan, 1, {"object_size": size, "objects": per_stream, "streams": streams}
    )
    elapsed = sent["elapsed"]
    objects = streams * per_stream
    return {
        "mb_per_s": objects * size / elapsed / MB,
        "objects_per_s": objects / elapsed,
        "elapsed": elapsed,
        "streams_ok": float(sent["streams_ok"]),
    }


def _memory(plan: Plan, size: int, objects: int) -> Values:
    sent, (received,) = _fs_exchange(plan, 1, {"object_size": size, "objects": objects})
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


def _latency(plan: Plan, objects: int) -> Values:
    sent, _ = _fs_exchange(plan, 1, {"object_size": KIB, "objects": objects, "latency": True})
    return {
        "p50": sent["latency_p50"] * 1e6,
        "p99": sent["latency_p99"] * 1e6,
        "objects_per_s": objects / sent["elapsed"],
    }


def _hol(plan: Plan) -> Values:
    sent, (received,) = run_exchange(
        "fs-recv",
        [{"name": "site-0", "site": plan.site}],
        "fs-hol",
        lambda addresses: {
            "addresses": addresses,
            "site": plan.site,
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
    every repetition's values, those named by its own metrics."""

    results: list[CaseResult]
    run: Callable[[], Values]
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
    )


def _case(
    scenario: str,
    case: str,
    params: dict[str, Any],
    units: dict[str, str],
    headline: str,
    run: Callable[[], Values],
    repetitions: int,
    *,
    ceiling: str | None = None,
    inverse: bool = False,
    target: Target | None = None,
    notes: Sequence[str] = (),
) -> _CaseSpec:
    result = _result(
        scenario,
        case,
        params,
        units,
        headline,
        ceiling=ceiling,
        inverse=inverse,
        target=target,
        notes=notes,
    )
    return _CaseSpec([result], run, repetitions)


_RATE_UNITS: Final = {"mb_per_s": "MB/s", "objects_per_s": "obj/s"}
_MEMORY_UNITS: Final = {
    "sender_rss_increase": "MiB",
    "receiver_rss_increase": "MiB",
    "sender_rss_peak": "MiB",
    "receiver_rss_peak": "MiB",
    "mb_per_s": "MB/s",
}


def _ratio_target(value: float | None) -> Target | None:
    return None if value is None else Target("ratio_min", value, f">={value:.2f}x")


def _case_specs(plan: Plan, scenarios: Sequence[str]) -> list[_CaseSpec]:
    specs: list[_CaseSpec] = []
    reps = plan.repeat
    if "throughput" in scenarios:
        for size, objects in plan.throughput:
            small = size < 64 * KIB
            specs.append(
                _case(
                    "throughput",
                    format_size(size),
                    {"object_size": size, "objects": objects, "streams": 1, "targets": 1},
                    _RATE_UNITS,
                    "objects_per_s" if small else "mb_per_s",
                    functools.partial(_throughput, plan, size, objects),
                    reps,
                    ceiling="pingpong" if small else "raw",
                    target=_ratio_target(THROUGHPUT_TARGETS.get(size)),
                )
            )
    if "fanout" in scenarios:
        for n in plan.fanout_targets:
            objects = max(8, plan.fanout_bytes // (MIB * n))
            specs.append(
                _case(
                    "fanout",
                    f"{n} target{'s' if n > 1 else ''}",
                    {"object_size": MIB, "objects": objects, "targets": n},
                    _RATE_UNITS,
                    "mb_per_s",
                    functools.partial(_fanout, plan, n, objects),
                    reps,
                    ceiling="raw" if n == 1 else f"raw_fanout_{n}",
                    target=_ratio_target(FANOUT_TARGETS.get(n)),
                    notes=["MB/s is the aggregate over all targets"],
                )
            )
    if "concurrency" in scenarios:
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
                    },
                    {**_RATE_UNITS, "elapsed": "s", "streams_ok": "streams"},
                    "mb_per_s",
                    functools.partial(_concurrency, plan, streams, per_stream),
                    reps,
                    ceiling="raw",
                    target=Target("complete", streams, "all complete"),
                )
            )
    if "memory" in scenarios:
        objects = plan.memory_total // MIB
        scaled = " (scaled down from 2 GiB by --quick)" if plan.quick else ""
        specs.append(
            _case(
                "memory",
                f"{format_size(plan.memory_total)} as 1 MiB",
                {"object_size": MIB, "objects": objects},
                _MEMORY_UNITS,
                "receiver_rss_increase",
                functools.partial(_memory, plan, MIB, objects),
                plan.memory_repeat,
                target=Target("rss_max", MEMORY_LIMIT_MIB, f"<{MEMORY_LIMIT_MIB:.0f} MiB"),
                notes=[f"streams {format_size(plan.memory_total)}{scaled}"],
            )
        )
        scaled = " (scaled down from 256 MiB by --quick)" if plan.quick else ""
        specs.append(
            _case(
                "memory",
                f"1 x {format_size(plan.memory_single)}",
                {"object_size": plan.memory_single, "objects": 1},
                {**_MEMORY_UNITS, "sender_rss_multiple": "x", "receiver_rss_multiple": "x"},
                "receiver_rss_multiple",
                functools.partial(_memory, plan, plan.memory_single, 1),
                plan.memory_repeat,
                target=Target(
                    "at_most",
                    SINGLE_OBJECT_RSS_LIMIT,
                    f"<={SINGLE_OBJECT_RSS_LIMIT:g}x size",
                    ("sender_rss_multiple", "receiver_rss_multiple"),
                ),
                notes=[
                    f"one object of {format_size(plan.memory_single)}{scaled}; "
                    "x size = peak RSS increase / object size, each side"
                ],
            )
        )
    if "latency" in scenarios:
        specs.append(
            _case(
                "latency",
                "1 KiB",
                {"object_size": KIB, "objects": plan.latency_objects},
                {"p50": "us", "p99": "us", "objects_per_s": "obj/s"},
                "p50",
                functools.partial(_latency, plan, plan.latency_objects),
                reps,
                ceiling="pingpong_rtt",
                inverse=True,
                notes=["produce returning -> process_replies called; ratio = ping-pong RTT / p50"],
            )
        )
    if "hol" in scenarios:
        small_name, big_name = format_size(plan.hol_small), format_size(plan.hol_big)
        params = {
            "small_size": plan.hol_small,
            "idle_objects": plan.hol_idle_objects,
            "big_size": plan.hol_big,
        }
        reported = Target("report", 0, "reported")
        scaled = " (scaled down from 256 MiB by --quick)" if plan.quick else ""
        notes = [
            f"one connection; {plan.hol_idle_objects:,} x {small_name} alone (idle), then "
            f"{small_name} objects beside one {big_name} object on a second stream{scaled}; "
            "loaded = in flight during its transfer; latency = produce returning -> "
            "process_replies; x idle p50 = median over repetitions of loaded p50 / idle p50; "
            "chunk times = latency / (chunk_size / the large transfer's own rate), median over "
            "repetitions"
        ]
        specs.append(
            _CaseSpec(
                [
                    _result(
                        "hol",
                        f"{small_name} idle",
                        params,
                        {"idle_p50": "us", "idle_p99": "us"},
                        "idle_p50",
                        target=reported,
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
                        target=reported,
                    ),
                    _result(
                        "hol",
                        f"{big_name} beside",
                        params,
                        {"during_big": "obj", "big_mb_per_s": "MB/s", "big_elapsed": "s"},
                        "during_big",
                        target=Target(
                            "at_least",
                            HOL_MIN_DURING,
                            f">={HOL_MIN_DURING} small done",
                            ("during_big",),
                        ),
                    ),
                ],
                functools.partial(_hol, plan),
                reps,
            )
        )
    if "ws" in scenarios:
        for scheme in ("ws", "wss"):
            for size, objects in plan.ws:
                specs.append(
                    _case(
                        "ws",
                        f"{scheme} {format_size(size)}",
                        {"scheme": scheme, "object_size": size, "objects": objects},
                        _RATE_UNITS,
                        "mb_per_s",
                        functools.partial(_ws_throughput, plan, scheme, size, objects),
                        reps,
                        ceiling=_WS_CEILINGS[scheme],
                        target=_ratio_target(WS_TARGETS.get(size)),
                    )
                )
    return specs


# ---------------------------------------------------------------------- loop


def _describe(exc: Exception) -> str:
    return str(exc) if isinstance(exc, BenchError) else f"{type(exc).__name__}: {exc}"


def run_plan(
    plan: Plan,
    scenarios: Sequence[str],
    report: Report,
    progress: Callable[[str], None],
) -> None:
    """Measure the ceilings and cases ``scenarios`` need, filling in ``report``."""
    ceiling_specs = _ceiling_specs(plan, scenarios)
    case_specs = _case_specs(plan, scenarios)
    for spec in ceiling_specs:
        for ceiling in spec.feeds.values():
            report.ceilings[ceiling.key] = ceiling
    report.cases = [result for spec in case_specs for result in spec.results]
    for rep in range(plan.repeat):
        tag = f"[{rep + 1}/{plan.repeat}]"
        for cspec in ceiling_specs:
            ceilings = list(cspec.feeds.values())
            if any(c.error for c in ceilings):
                continue
            started = time.monotonic()
            try:
                values = cspec.run()
            except Exception as exc:
                logger.debug("ceiling %s failed", ceilings[0].key, exc_info=True)
                for ceiling in ceilings:
                    ceiling.error = _describe(exc)
                progress(f"{tag} ceiling {ceilings[0].label}: FAILED: {_describe(exc)}")
                continue
            shown = []
            for key, ceiling in cspec.feeds.items():
                ceiling.series.values.append(values[key])
                shown.append(f"{values[key]:,.1f} {ceiling.series.unit}")
            elapsed = time.monotonic() - started
            progress(f"{tag} ceiling {ceilings[0].label}: {', '.join(shown)} ({elapsed:.1f} s)")
        for case_spec in case_specs:
            first = case_spec.results[0]
            if first.error is not None or rep >= case_spec.repetitions:
                continue
            started = time.monotonic()
            try:
                values = case_spec.run()
            except Exception as exc:
                logger.debug("%s %s failed", first.scenario, first.case, exc_info=True)
                for result in case_spec.results:
                    result.error = _describe(exc)
                progress(f"{tag} {first.scenario} {first.case}: FAILED: {first.error}")
                continue
            elapsed = time.monotonic() - started
            shown = []
            for result in case_spec.results:
                for key, series in result.metrics.items():
                    series.values.append(values[key])
                result.repetitions += 1
                unit = result.metrics[result.headline].unit
                shown.append(f"{result.case}: {values[result.headline]:,.1f} {unit}")
            progress(f"{tag} {first.scenario} {'; '.join(shown)} ({elapsed:.1f} s)")
    report.judge()
