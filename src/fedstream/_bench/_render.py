"""Presenting a :class:`Report`: the terminal table, the machine record, the chart."""

from __future__ import annotations

import datetime
import hashlib
import importlib.metadata
import math
import os
import platform
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ._common import MB
from ._results import CaseResult, Report, Series

__all__ = ["machine_info", "render_table", "source_info", "write_plot"]


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fp:
            for line in fp:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_total() -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as fp:
            for line in fp:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def source_info() -> dict[str, Any]:
    """Which engine code was measured: a digest of the package's modules (this
    benchmark excluded) and, in a git checkout, the commit and whether the
    package differs from it."""
    package = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        relative = path.relative_to(package)
        if relative.parts[0] == "_bench":
            continue
        digest.update(str(relative).encode())
        digest.update(path.read_bytes())
    info: dict[str, Any] = {"digest": digest.hexdigest()[:12], "commit": None, "dirty": None}
    repo = package.parents[1]
    if (repo / ".git").exists():
        try:
            head = subprocess.run(
                ["git", "-C", str(repo), "rev-parse", "--short", "HEAD"],
                capture_output=True,
                text=True,
                timeout=5,
                check=True,
            )
            status = subprocess.run(
                ["git", "-C", str(repo), "status", "--porcelain", "--", str(package)],
                capture_output=True,
                text=True,
                timeout=5,
                check=True,
            )
        except (OSError, subprocess.SubprocessError):
            return info
        info["commit"] = head.stdout.strip()
        info["dirty"] = any(
            "/_bench/" not in line for line in status.stdout.splitlines() if line.strip()
        )
    return info


def machine_info() -> dict[str, Any]:
    """Where the figures come from: CPU, OS, interpreter and library versions."""
    from .._version import __version__

    affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(affinity) if affinity is not None else os.cpu_count(),
        "cpu_model": _cpu_model(),
        "memory_total": _memory_total(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "executable": sys.executable,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "fedstream": __version__,
        "trio": _version("trio"),
        "cbor2": _version("cbor2"),
        "source": source_info(),
    }


# --------------------------------------------------------------------- table


def _num(value: float, unit: str = "") -> str:
    if not math.isfinite(value):
        return "-"
    if abs(value) >= 100:
        text = f"{value:,.0f}"
    elif abs(value) >= 10:
        text = f"{value:.1f}"
    else:
        text = f"{value:.2f}"
    return f"{text} {unit}".rstrip()


def _spread(series: Series) -> str:
    if len(series.values) < 2:
        return "-"
    return f"{_num(series.min)} - {_num(series.max)}"


def _result_text(case: CaseResult) -> tuple[str, str]:
    """The case's figures as (result, min-max spread) cells."""
    m = case.metrics
    if case.compare is not None:
        per_round = m[case.headline]
        return f"per round: {', '.join(f'{v:.2f}' for v in per_round.values)}", _spread(per_round)
    if "mb_per_s" in m and "objects_per_s" in m and case.scenario not in ("concurrency", "memory"):
        head = m[case.headline]
        other = m["objects_per_s" if case.headline == "mb_per_s" else "mb_per_s"]
        return f"{_num(head.median, head.unit)} ({_num(other.median, other.unit)})", _spread(head)
    if case.scenario == "concurrency":
        streams = case.params["streams"]
        ok = m["streams_ok"].min
        done = f"{ok:.0f}/{streams} ok" if math.isfinite(ok) else f"?/{streams}"
        return (
            f"{done}, {_num(m['mb_per_s'].median, 'MB/s')}, "
            f"{_num(m['objects_per_s'].median, 'obj/s')}",
            _spread(m["mb_per_s"]),
        )
    if case.scenario == "memory":
        text = (
            f"send +{_num(m['sender_rss_increase'].max)} / "
            f"recv +{_num(m['receiver_rss_increase'].max)} MiB"
        )
        if "receiver_rss_multiple" in m:
            text += (
                f" ({_num(m['sender_rss_multiple'].max)}x / "
                f"{_num(m['receiver_rss_multiple'].max)}x size)"
            )
        return (
            text,
            f"peak {_num(m['sender_rss_peak'].max)} / {_num(m['receiver_rss_peak'].max)} MiB",
        )
    if case.scenario == "hol":
        if "idle_p50" in m:
            p50, p99 = m["idle_p50"], m["idle_p99"]
            return f"p50 {_num(p50.median, 'us')}, p99 {_num(p99.median, 'us')}", _spread(p50)
        if "loaded_p50" in m:
            p50, p99 = m["loaded_p50"], m["loaded_p99"]
            return (
                f"p50 {_num(p50.median, 'us')} ({m['p50_chunks'].median:.1f} chunk times), "
                f"p99 {_num(p99.median, 'us')} ({m['p99_chunks'].median:.1f}), "
                f"{_num(m['p50_slowdown'].median)}x idle p50",
                _spread(p50),
            )
        during = m["during_big"]
        return (
            f"{during.median:,.0f} small done, {_num(m['big_mb_per_s'].median, 'MB/s')}",
            f"{during.min:,.0f} - {during.max:,.0f} small" if len(during.values) > 1 else "-",
        )
    if case.scenario == "latency":
        return (
            f"p50 {_num(m['p50'].median, 'us')}, p99 {_num(m['p99'].median, 'us')}",
            _spread(m["p50"]),
        )
    head = m[case.headline]
    return _num(head.median, head.unit), _spread(head)


def _table(rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for index, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip())
        if index == 0:
            lines.append("  ".join("-" * w for w in widths))
    return lines


def render_table(report: Report) -> str:
    """The human-readable summary printed at the end of a run."""
    info = report.machine
    lines = [
        f"fedstream bench ({report.mode}, {report.repeat} repetition(s), median shown)",
        f"machine: {info['cpus_usable']} CPUs ({info['cpu_model']}), Python {info['python']}, "
        f"trio {info['trio']}, fedstream {info['fedstream']}, {info['date']}",
        "every figure: sender and receiver(s) in separate processes over loopback "
        "(wan: a relay process between them)",
        "rows without a suffix: plain methods, default site options (the default path); "
        '"async": async def callbacks, sync_callbacks="inline"',
    ]
    source = info.get("source") or {}
    if source:
        where = f"commit {source['commit']}" if source.get("commit") else "no git checkout"
        if source.get("dirty"):
            where += " + uncommitted changes"
        lines.append(f"engine source: digest {source['digest']} ({where})")
        end = info.get("source_end") or {}
        if end and end.get("digest") != source.get("digest"):
            lines.append(
                f"WARNING: the engine source changed during the run (digest {end['digest']} "
                "at the end): the figures mix two versions of the code"
            )
    load = info.get("load_average")
    if load:
        end = info.get("load_average_end") or [math.nan]
        lines.append(f"load average (1 min): {load[0]:.2f} at start, {end[0]:.2f} at end")
    lines.append("")
    if report.ceilings:
        rows = [["ceiling (same run, same process layout)", "median", "min - max"]]
        for entry in report.ceilings.values():
            series = entry.series
            if entry.error:
                rows.append([entry.label, "FAILED", entry.error[:60]])
            else:
                rows.append([entry.label, _num(series.median, series.unit), _spread(series)])
        lines += [*_table(rows), ""]
    rows = [["scenario", "case", "result", "min - max", "ceiling", "ratio", "target", "status"]]
    errors: list[str] = []
    for case in report.cases:
        ceiling = report.ceilings.get(case.ceiling) if case.ceiling else None
        bound = _num(ceiling.series.median, ceiling.series.unit) if ceiling else "-"
        if case.compare is not None:
            bound = f"{case.compare[1].split('/', 1)[1]} row"
        if case.completed:
            result, spread = _result_text(case)
        else:
            result, spread = "did not complete", "-"
            errors.append(f"{case.scenario} {case.case}: {case.error or 'not run'}")
        rows.append(
            [
                case.scenario,
                case.case,
                result,
                spread,
                bound,
                f"{case.ratio:.2f}x" if case.ratio is not None else "-",
                case.target.text if case.target else "-",
                case.status,
            ]
        )
    lines += _table(rows)
    notes = sorted({f"{c.scenario}: {note}" for c in report.cases for note in c.notes})
    if notes:
        lines += ["", *(f"note: {note}" for note in notes)]
    if errors:
        lines += ["", *(f"error: {error}" for error in errors)]
    lines += ["", f"finished in {report.duration:.1f} s"]
    return "\n".join(lines)


# ---------------------------------------------------------------------- plot


def write_plot(report: Report, path: Path) -> None:
    """Throughput against object size, with the raw and round-trip ceilings drawn.

    Raises:
        ImportError: matplotlib is not installed (``pip install fedstream[plot]``).
        ValueError: the run has no completed throughput case to draw.
    """
    import matplotlib  # type: ignore[import-not-found,unused-ignore]

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # type: ignore[import-not-found,unused-ignore]

    cases = [c for c in report.cases if c.scenario == "throughput" and c.completed]
    if not cases:
        raise ValueError("no completed throughput case to plot")
    sizes = [int(c.params["object_size"]) for c in cases]
    series = [c.metrics["mb_per_s"] for c in cases]
    medians = [s.median for s in series]
    below = [s.median - s.min for s in series]
    above = [s.max - s.median for s in series]

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    ax.errorbar(sizes, medians, yerr=[below, above], marker="o", capsize=4, label="fedstream")
    raw = report.ceilings.get("raw")
    ping = report.ceilings.get("pingpong")
    if raw is not None and raw.series.values:
        ax.axhline(raw.series.median, color="tab:red", linestyle="--", label="raw trio TCP")
        if ping is not None and ping.series.values:
            # One round trip per object bounds small objects: rate x size.
            xs = [2.0**k for k in range(10, 25)]
            bound = [min(raw.series.median, ping.series.median * x / MB) for x in xs]
            ax.plot(xs, bound, color="tab:gray", linestyle=":", label="min(raw, ping-pong x size)")
    for size, value, case in zip(sizes, medians, cases, strict=True):
        if case.ratio is not None:
            ax.annotate(
                f"{case.ratio:.2f}x",
                (size, value),
                textcoords="offset points",
                xytext=(4, 6),
                fontsize=8,
            )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(sizes, [c.case for c in cases])
    ax.set_xlabel("object size")
    ax.set_ylabel("MB/s (10^6 bytes/s)")
    info = report.machine
    ax.set_title(
        f"fedstream throughput, one stream, two processes ({report.mode})\n"
        f"{info['cpus_usable']} CPUs, Python {info['python']}, trio {info['trio']}",
        fontsize=9,
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
