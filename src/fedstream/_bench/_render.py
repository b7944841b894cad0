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


def _ratio_text(case: CaseResult) -> str:
    """The ratio, with a third decimal for an upper bound (``<=0.05x``), so
    that a row at the line does not read as equal to it."""
    if case.ratio is None:
        return "-"
    digits = 3 if case.target is not None and case.target.kind == "ratio_max" else 2
    return f"{case.ratio:.{digits}f}x"


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
                _ratio_text(case),
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
#
# Every ratio printed on the chart is drawn against the line it was computed
# from: each point or bar that has a ceiling gets a short black tick at that
# ceiling's value (in the point's own unit), and the ratio is written beside
# it. Lines across a panel are context only.


def _ceiling_in(case: CaseResult, report: Report, unit: str) -> float | None:
    """The value ``case``'s ratio was computed against, in ``unit``; None if it
    cannot be drawn there (no ceiling, or a ceiling in another unit)."""
    ceiling = report.ceilings.get(case.ceiling) if case.ceiling else None
    if ceiling is None or not ceiling.series.values:
        return None
    if ceiling.series.unit == unit:
        return ceiling.series.median
    if ceiling.series.unit == "rt/s" and unit == "MB/s":
        # One round trip per object: the ping-pong rate times the object size.
        return ceiling.series.median * int(case.params["object_size"]) / MB
    return None


def _label(case: CaseResult, *, of: bool = False) -> str:
    """A ratio as the chart writes it: the table's figure, what it is against
    (``of``), and the target and status when the row has a ratio target."""
    text = _ratio_text(case)
    if of and case.ceiling:
        text += f" of {case.ceiling}"
    if case.target is not None and case.target.kind in ("ratio_min", "ratio_max"):
        text += f"\n{case.target.text} {case.status}"
    return text


def _tick(ax: Any, x: float, value: float, case: CaseResult, width: float) -> None:
    ax.hlines(value, x - width, x + width, colors="black", linewidths=2, zorder=3)
    if case.ratio is not None:
        ax.annotate(
            _label(case),
            (x, value),
            textcoords="offset points",
            xytext=(0, 3),
            ha="center",
            fontsize=6,
        )


def _throughput_panel(ax: Any, report: Report, cases: list[CaseResult]) -> None:
    raw = report.ceilings.get("raw")
    ping = report.ceilings.get("pingpong")
    by_id = {case.id: case for case in report.cases}
    for path, style, label in (("default", "-o", "default path"), ("async", "--s", "async path")):
        rows = [c for c in cases if c.params.get("path") == path]
        if not rows:
            continue
        sizes = [int(c.params["object_size"]) for c in rows]
        series = [c.metrics["mb_per_s"] for c in rows]
        ax.errorbar(
            sizes,
            [v.median for v in series],
            yerr=[[v.median - v.min for v in series], [v.max - v.median for v in series]],
            fmt=style,
            capsize=3,
            label=label,
        )
        for size, case, value in zip(sizes, rows, series, strict=True):
            if path == "default":
                # The ratio is written at the tick it is against.
                bound = _ceiling_in(case, report, "MB/s")
                if bound is not None:
                    ax.hlines(bound, size / 1.5, size * 1.5, colors="black", linewidths=2, zorder=3)
                    if case.ratio is not None:
                        ax.annotate(
                            _label(case, of=True),
                            (size, bound),
                            textcoords="offset points",
                            xytext=(0, 3),
                            ha="center",
                            fontsize=6,
                        )
                continue
            # The default/async comparison row, written at the async point it divides by.
            compare = by_id.get(f"{case.scenario}/{case.case.removesuffix(' async')} default/async")
            if compare is not None and compare.ratio is not None:
                ax.annotate(
                    f"default/async {_label(compare)}",
                    (size, value.median),
                    textcoords="offset points",
                    xytext=(6, -12),
                    fontsize=6,
                    color="tab:orange",
                )
    if raw is not None and raw.series.values:
        ax.axhline(raw.series.median, color="tab:red", linestyle=":", label="raw trio TCP")
        if ping is not None and ping.series.values:
            xs = [2.0**k for k in range(10, 25)]
            rtt = 1 / ping.series.median
            curve = [x / (rtt + x / (raw.series.median * MB)) / MB for x in xs]
            ax.plot(xs, curve, color="tab:gray", linestyle=":", label="1 / (RTT + size / raw)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    sizes = sorted({int(c.params["object_size"]) for c in cases})
    ax.set_xticks(sizes, [c.case for c in cases if c.params.get("path") == "default"][: len(sizes)])
    ax.set_xlabel("object size")
    ax.set_ylabel("MB/s")
    ax.legend(fontsize=7)


def _bars(ax: Any, report: Report, rows: list[CaseResult], xs: list[int], hatch: str) -> None:
    top = 0.0
    for x, case in zip(xs, rows, strict=True):
        series = case.metrics[case.headline]
        color = "tab:orange" if case.params.get("path") == "async" else "tab:blue"
        ax.bar(
            x,
            series.median,
            yerr=[[series.median - series.min], [series.max - series.median]],
            color=color,
            hatch=hatch,
            edgecolor="white" if hatch else None,
            capsize=3,
        )
        top = max(top, series.max)
        bound = _ceiling_in(case, report, series.unit)
        if bound is not None:
            _tick(ax, x, bound, case, 0.4)
            top = max(top, bound)
    if math.isfinite(top) and top > 0:
        ax.set_ylim(0, top * 1.3)  # room for the labels above the ticks


def _bar_panel(ax: Any, report: Report, cases: list[CaseResult]) -> None:
    """Each row's headline as a bar; rows in a second unit (``hol``'s object
    count, the memory multiple) go on a right-hand axis, hatched."""
    units = [c.metrics[c.headline].unit for c in cases]
    unit = max(units, key=units.count)  # ties: the first row's unit
    main = [x for x, c in enumerate(cases) if c.metrics[c.headline].unit == unit]
    other = [x for x, c in enumerate(cases) if c.metrics[c.headline].unit != unit]
    _bars(ax, report, [cases[x] for x in main], main, "")
    ax.set_ylabel(unit)
    if other:
        right = ax.twinx()
        _bars(right, report, [cases[x] for x in other], other, "//")
        right.set_ylabel(
            " / ".join(dict.fromkeys(cases[x].metrics[cases[x].headline].unit for x in other))
            + " (hatched)"
        )
    ax.set_xticks(range(len(cases)), [c.case for c in cases], rotation=30, ha="right", fontsize=7)


def write_plot(report: Report, path: Path) -> None:
    """One panel per scenario that completed a case; see the comment above.

    Raises:
        ImportError: matplotlib is not installed (``pip install fedstream[plot]``).
        ValueError: the run has no completed case to draw.
    """
    import matplotlib  # type: ignore[import-not-found,unused-ignore]

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # type: ignore[import-not-found,unused-ignore]

    panels: dict[str, list[CaseResult]] = {}
    for case in report.cases:
        if case.completed and case.compare is None:
            panels.setdefault(case.scenario, []).append(case)
    if not panels:
        raise ValueError("no completed case to plot")
    columns = min(3, len(panels))
    rows = math.ceil(len(panels) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(5.2 * columns, 4.0 * rows), dpi=110)
    flat = list(axes.flat) if hasattr(axes, "flat") else [axes]
    for ax, (scenario, cases) in zip(flat, panels.items(), strict=False):
        if scenario == "throughput":
            _throughput_panel(ax, report, cases)
        else:
            _bar_panel(ax, report, cases)
        ax.set_title(scenario, fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
    for ax in flat[len(panels) :]:
        ax.set_visible(False)
    info = report.machine
    load = info.get("load_average") or [math.nan]
    source = info.get("source") or {}
    fig.suptitle(
        f"fedstream bench ({report.mode}), {source.get('commit') or 'no git checkout'}\n"
        "blue/solid = default path, orange/dashed = async path;\n"
        "black tick = the ceiling each ratio is against, written at the tick\n"
        f"{info['cpus_usable']} CPUs, Python {info['python']}, trio {info['trio']}, "
        f"load {load[0]:.1f} at start",
        fontsize=8 if columns == 1 else 9,
    )
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
