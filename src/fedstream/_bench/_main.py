"""Command line of the benchmark: parse options, run the plan, report."""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import sys
import time
from pathlib import Path

from ._common import MB
from ._render import machine_info, render_table, source_info, write_plot
from ._results import Report
from ._scenarios import SCENARIOS, SMOKE_WAN_DELAY, WAN_DELAY, WAN_RATE, make_plan, run_plan

__all__ = ["main"]

logger = logging.getLogger(__name__)


def _scenario_list(text: str) -> list[str]:
    wanted = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in wanted if name not in SCENARIOS]
    if unknown or not wanted:
        raise argparse.ArgumentTypeError(
            f"unknown scenario(s) {', '.join(unknown) or '(none given)'}; "
            f"choose from {','.join(SCENARIOS)}"
        )
    return [name for name in SCENARIOS if name in wanted]


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not positive")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{value} is not a positive number")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedstream bench",
        description=(
            "Measure fedstream streaming between separate processes over loopback, "
            "against raw trio ceilings measured in the same run. Headline rows use plain "
            "(non-async) callbacks and default site options; 'async' rows use async "
            "callbacks with sync_callbacks='inline'."
        ),
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="scaled-down run: figures worth a glance, a few minutes on 2 busy cores",
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help=(
            "tiny run that checks every scenario and row end to end (the CI smoke "
            "test); its figures mean nothing"
        ),
    )
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write results as JSON")
    parser.add_argument(
        "--plot",
        type=Path,
        metavar="PATH",
        help="also draw every scenario as a PNG, one panel each (needs fedstream[plot])",
    )
    parser.add_argument(
        "--scenarios",
        type=_scenario_list,
        default=list(SCENARIOS),
        metavar="LIST",
        help=f"comma-separated subset of {','.join(SCENARIOS)} (default: all)",
    )
    parser.add_argument(
        "--repeat",
        type=_positive_int,
        metavar="N",
        help="repetitions per case; the median is reported (default 5, --quick and --smoke 1)",
    )
    parser.add_argument(
        "--chunk-size", type=_positive_int, metavar="BYTES", help="open_site chunk_size"
    )
    parser.add_argument("--window", type=_positive_int, metavar="BYTES", help="open_site window")
    parser.add_argument(
        "--wan-delay-ms",
        type=_positive_float,
        metavar="MS",
        help=(
            f"one-way delay the wan scenario's relay adds (default {WAN_DELAY * 1000:g}, "
            f"--smoke {SMOKE_WAN_DELAY * 1000:g})"
        ),
    )
    parser.add_argument(
        "--wan-rate",
        type=_positive_float,
        default=WAN_RATE / MB,
        metavar="MB_PER_S",
        help=f"the wan relay's bandwidth cap per direction (default {WAN_RATE / MB:g} MB/s)",
    )
    parser.add_argument(
        "--pin",
        action="store_true",
        help="pin the sender and the receivers to different CPUs (default: the OS places them)",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; return 0 if every case completed, 1 otherwise.

    Missed performance targets are reported (``FAIL``) but do not change the
    exit status: only a case that could not run does.
    """
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error already printed
        return exc.code if isinstance(exc.code, int) else 2
    site: dict[str, int] = {}
    if args.chunk_size is not None:
        site["chunk_size"] = args.chunk_size
    if args.window is not None:
        site["window"] = args.window
    if site:
        from .._engine import SiteOptions

        try:
            SiteOptions(**site)  # type: ignore[arg-type]
        except ValueError as exc:
            parser.print_usage(sys.stderr)
            sys.stderr.write(f"fedstream bench: error: {exc}\n")
            return 2

    plan = make_plan(
        quick=args.quick or args.smoke,
        smoke=args.smoke,
        repeat=args.repeat,
        site=site,
        pin=args.pin,
        wan_delay=None if args.wan_delay_ms is None else args.wan_delay_ms / 1000,
        wan_rate=args.wan_rate * MB,
    )
    started = time.monotonic()

    def progress(text: str) -> None:
        if not args.quiet:
            sys.stderr.write(f"[{time.monotonic() - started:6.1f}s] {text}\n")
            sys.stderr.flush()

    report = Report(
        mode=plan.mode,
        repeat=plan.repeat,
        scenarios=list(args.scenarios),
        plan=plan.to_json(),
        machine=machine_info(),
        started=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )
    progress(
        f"{report.mode} run: {', '.join(report.scenarios)}; "
        f"{plan.repeat} repetition(s); worker timeout {plan.timeout:.0f} s"
    )
    run_plan(plan, report.scenarios, report, progress)
    report.duration = time.monotonic() - started
    if hasattr(os, "getloadavg"):
        report.machine["load_average_end"] = list(os.getloadavg())
    # Workers import the engine afresh, so an edit during the run mixes versions.
    report.machine["source_end"] = source_info()
    print(render_table(report))

    status = 0 if report.completed else 1
    if args.json is not None:
        try:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(report.to_json(), indent=2) + "\n", encoding="utf-8")
        except OSError as exc:
            sys.stderr.write(f"fedstream bench: cannot write {args.json}: {exc}\n")
            status = 1
    if args.plot is not None:
        try:
            write_plot(report, args.plot)
        except ImportError:
            sys.stderr.write(
                "fedstream bench: --plot needs matplotlib: pip install 'fedstream[plot]'\n"
            )
            status = 1
        except (OSError, ValueError) as exc:
            sys.stderr.write(f"fedstream bench: cannot draw {args.plot}: {exc}\n")
            status = 1
    return status
