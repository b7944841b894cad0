"""Smoke test of the benchmark harness (``fedstream bench --smoke``).

Runs every scenario end to end in a subprocess (including ``wan`` through
the relay, ``tls`` and ``wss`` with certificates made for the run) on tiny
totals, and checks the shape of the JSON report and that every case
completed. There are no timing assertions: the figures belong to the
machine, not to the test; only the structure (which rows, which ceilings,
which targets) is checked. The ``--quick`` and full plans' rows and targets
are checked without running them.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import statistics
import subprocess
import sys
import typing
from pathlib import Path
from typing import Any

import pytest

from fedstream._bench._results import TargetKind

SRC = Path(__file__).resolve().parents[1] / "src"

#: Rows of a ``--smoke`` run.
EXPECTED_CASES = {
    "throughput": [
        "1 KiB",
        "1 KiB async",
        "1 KiB default/async",
        "64 KiB",
        "64 KiB async",
        "64 KiB default/async",
        "1 MiB",
        "1 MiB async",
        "1 MiB default/async",
        "16 MiB",
        "16 MiB async",
    ],
    "fanout": [
        "1 target",
        "1 target async",
        "2 targets",
        "2 targets async",
    ],
    "concurrency": ["1 stream", "10 streams", "100 streams"],
    "memory": ["8 MiB as 1 MiB", "1 x 8 MiB"],
    "latency": ["1 KiB", "1 KiB async"],
    "hol": ["1 KiB idle", "1 KiB + 16 MiB", "16 MiB beside"],
    "wan": ["4 MiB as 1 MiB, window 16", "4 MiB as 1 MiB, stop-and-wait", "1 x 4 MiB"],
    "tls": ["1 MiB", "1 MiB async", "16 MiB", "16 MiB async"],
    "ws": ["ws 1 MiB", "ws 16 MiB", "wss 1 MiB", "wss 16 MiB"],
}
#: Rows of a ``--quick`` run where they differ from ``--smoke``.
QUICK_CASES = {
    **EXPECTED_CASES,
    "fanout": [
        "1 target",
        "1 target async",
        "4 targets",
        "4 targets async",
        "16 targets",
        "16 targets async",
    ],
    "concurrency": ["1 stream", "10 streams", "100 streams", "1000 streams"],
    "memory": ["256 MiB as 1 MiB", "1 x 64 MiB"],
    "hol": ["1 KiB idle", "1 KiB + 64 MiB", "64 MiB beside"],
    "wan": ["128 MiB as 1 MiB, window 16", "128 MiB as 1 MiB, stop-and-wait", "1 x 128 MiB"],
}
EXPECTED_CEILINGS = {
    "raw",
    "pingpong",
    "pingpong_rtt",
    "stop_and_wait_64k",
    "raw_fanout_2",
    "relay",
    "tls_raw",
    "websocket",
    "websocket_tls",
}
QUICK_CEILINGS = EXPECTED_CEILINGS - {"raw_fanout_2"} | {"raw_fanout_4", "raw_fanout_16"}
#: The issue's targets, as the harness encodes them: row -> (ceiling, ratio).
EXPECTED_RATIO_TARGETS = {
    "throughput/1 KiB": ("pingpong", 0.6),
    "throughput/64 KiB": ("stop_and_wait_64k", 0.6),
    "throughput/1 MiB": ("raw", 0.6),
    "throughput/16 MiB": ("raw", 0.8),
    "fanout/16 targets": ("raw_fanout_16", 0.6),
    "tls/1 MiB": ("tls_raw", 0.45),
    "tls/16 MiB": ("tls_raw", 0.6),
    "ws/ws 1 MiB": ("websocket", 0.45),
    "ws/ws 16 MiB": ("websocket", 0.6),
    "ws/wss 1 MiB": ("websocket_tls", 0.45),
    "ws/wss 16 MiB": ("websocket_tls", 0.6),
}
#: The pipelined-stream targets (issue #14): ``wan`` row -> (kind, ratio, max_in_flight).
WAN_TARGETS = {
    "as 1 MiB, window 16": ("ratio_min", 0.6, 16),
    "as 1 MiB, stop-and-wait": ("ratio_max", 0.05, 1),
}
#: The fan-out target's row, which a ``--smoke`` run (2 targets at most) lacks.
QUICK_RATIO_TARGETS = {**EXPECTED_RATIO_TARGETS, "fanout/16 targets": ("raw_fanout_16", 0.6)}
del EXPECTED_RATIO_TARGETS["fanout/16 targets"]


def _check_wan_targets(rows: dict[str, Any], target: Any) -> None:
    """The ``wan`` rows (by case name, from a report or a plan) carry the
    pipelined-stream targets, each on its own ``max_in_flight``."""
    for suffix, (kind, value, in_flight) in WAN_TARGETS.items():
        (name,) = [name for name in rows if name.endswith(suffix)]
        row = rows[name]
        params = row["params"] if isinstance(row, dict) else row.params
        found = target(row)
        found = found if isinstance(found, dict) else found.to_json()
        assert (found["kind"], found["value"]) == (kind, value), name
        assert params["max_in_flight"] == in_flight, name
        assert params["object_size"] == 1024 * 1024, name


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _run_smoke(tmp_path: Path) -> tuple[dict[str, Any], str]:
    out = tmp_path / "bench.json"
    pythonpath = [str(SRC), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(pythonpath)}
    code = (
        "import sys\n"
        "from fedstream._bench import main\n"
        f"sys.exit(main(['--smoke', '--quiet', '--json', {str(out)!r}]))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return json.loads(out.read_text(encoding="utf-8")), proc.stdout


@pytest.mark.slow
def test_smoke_benchmark_reports_every_scenario(tmp_path: Path) -> None:
    report, table = _run_smoke(tmp_path)

    assert report["schema"] == 2
    assert report["mode"] == "smoke"
    assert report["completed"] is True
    assert report["repeat"] >= 1
    for key in ("cpu_count", "cpu_model", "python", "trio", "fedstream", "date"):
        assert key in report["machine"]
    assert report["plan"]["quick"] is True
    assert report["plan"]["smoke"] is True
    assert report["plan"]["wan_delay"] == 0.002

    assert set(report["ceilings"]) == EXPECTED_CEILINGS
    for ceiling in report["ceilings"].values():
        assert ceiling["error"] is None
        assert len(ceiling["values"]) == report["repeat"]
        assert _is_number(ceiling["median"])
        assert ceiling["median"] > 0
        assert ceiling["min"] <= ceiling["median"] <= ceiling["max"]

    assert list(report["scenarios"]) == list(EXPECTED_CASES)
    for name, scenario in report["scenarios"].items():
        assert scenario["completed"] is True, name
        assert [case["case"] for case in scenario["cases"]] == EXPECTED_CASES[name]
        for case in scenario["cases"]:
            label = f"{name} {case['case']}"
            assert case["completed"] is True, label
            assert case["error"] is None, label
            assert case["repetitions"] >= 1, label
            assert case["status"] in {"PASS", "FAIL", "INFO"}, label
            headline = case["metrics"][case["headline"]]
            assert _is_number(headline["median"]), label
            assert len(headline["values"]) == case["repetitions"], label
            if case["ceiling"] is not None:
                assert case["ceiling"] in report["ceilings"], label
                assert _is_number(case["ratio"]), label
                assert case["ratio"] > 0, label
            if case["compare"] is not None:
                assert case["ceiling"] is None, label
                assert _is_number(case["ratio"]), label
                assert case["ratio"] > 0, label
            if case["target"] is not None:
                assert case["target"]["kind"] in typing.get_args(TargetKind), label
            if case["case"].endswith(" async"):
                assert case["params"]["path"] == "async", label
                assert case["target"] is None, label
                assert case["status"] == "INFO", label
            elif case["compare"] is None:
                assert case["params"].get("path", "default") == "default", label
            assert name in table, label
            assert case["case"] in table, label

    rows = {
        f"{name}/{c['case']}": c for name, sc in report["scenarios"].items() for c in sc["cases"]
    }
    for row, (ceiling, ratio) in EXPECTED_RATIO_TARGETS.items():
        assert rows[row]["ceiling"] == ceiling, row
        assert rows[row]["target"]["kind"] == "ratio_min", row
        assert rows[row]["target"]["value"] == ratio, row
        assert rows[row]["status"] in {"PASS", "FAIL"}, row
    for size in ("1 KiB", "64 KiB", "1 MiB"):
        compare = rows[f"throughput/{size} default/async"]
        assert compare["compare"] == [f"throughput/{size}", f"throughput/{size} async"]
        assert compare["target"]["value"] == 0.9
        assert compare["status"] in {"PASS", "FAIL"}
        default, other = rows[f"throughput/{size}"], rows[f"throughput/{size} async"]
        headline = default["headline"]
        per_round = [
            mine / theirs
            for mine, theirs in zip(
                default["metrics"][headline]["values"],
                other["metrics"][headline]["values"],
                strict=True,
            )
        ]
        assert compare["metrics"]["per_round"]["values"] == pytest.approx(per_round)
        assert compare["ratio"] == pytest.approx(statistics.median(per_round))
    raw = report["ceilings"]["raw"]["median"]
    rtt = 1 / report["ceilings"]["pingpong"]["median"]
    assert report["ceilings"]["stop_and_wait_64k"]["median"] == pytest.approx(
        65536 / (rtt + 65536 / (raw * 1e6)) / 1e6
    )
    for case in report["scenarios"]["wan"]["cases"]:
        assert case["ceiling"] == "relay"
        assert case["params"]["delay"] == 0.002
        assert case["params"]["path"] == "default"
        assert any("scaled down from 1 GiB by --smoke" in note for note in case["notes"])
    _check_wan_targets(
        {c["case"]: c for c in report["scenarios"]["wan"]["cases"]}, lambda c: c["target"]
    )
    for case in report["scenarios"]["wan"]["cases"]:
        if case["target"]["kind"] != "report":
            assert case["status"] in {"PASS", "FAIL"}, case["case"]
    for case in report["scenarios"]["tls"]["cases"]:
        assert case["ceiling"] == "tls_raw"
    for case in report["scenarios"]["ws"]["cases"]:
        wss = case["params"]["scheme"] == "wss"
        assert case["ceiling"] == ("websocket_tls" if wss else "websocket")
        assert case["params"]["path"] == "default"

    for case in report["scenarios"]["concurrency"]["cases"]:
        assert case["status"] == "PASS"
        assert case["metrics"]["streams_ok"]["min"] == case["params"]["streams"]
    for case in report["scenarios"]["memory"]["cases"]:
        assert any("scaled down" in note for note in case["notes"])
        for key in ("sender_rss_increase", "receiver_rss_increase"):
            assert _is_number(case["metrics"][key]["max"])
    single = report["scenarios"]["memory"]["cases"][1]
    assert single["target"]["kind"] == "at_most"
    assert single["status"] in {"PASS", "FAIL"}
    for key in ("sender_rss_multiple", "receiver_rss_multiple"):
        assert _is_number(single["metrics"][key]["max"])
        assert single["metrics"][key]["max"] >= 0
    latency = report["scenarios"]["latency"]["cases"][0]["metrics"]
    assert latency["p50"]["median"] <= latency["p99"]["median"]

    idle, loaded, big = report["scenarios"]["hol"]["cases"]
    assert any("scaled down" in note for note in idle["notes"])
    for case in (idle, loaded, big):
        assert case["params"] == {
            "small_size": 1024,
            "idle_objects": report["plan"]["hol_idle_objects"],
            "big_size": 16 * 1024 * 1024,
            "path": "default",
        }
        assert case["repetitions"] == report["repeat"]
    assert idle["target"]["kind"] == "report"
    assert idle["status"] == "INFO"
    assert loaded["target"]["kind"] == "median_at_most"
    assert loaded["target"]["metrics"] == ["p99_chunks"]
    assert loaded["target"]["value"] == 3
    assert loaded["status"] in {"PASS", "FAIL"}
    for case, prefix in ((idle, "idle_"), (loaded, "loaded_")):
        p50, p99 = case["metrics"][f"{prefix}p50"], case["metrics"][f"{prefix}p99"]
        assert _is_number(p50["median"])
        assert _is_number(p99["median"])
        assert 0 < p50["median"] <= p99["median"]
    assert _is_number(loaded["metrics"]["p50_slowdown"]["median"])
    assert loaded["metrics"]["p50_slowdown"]["median"] > 0
    for name in ("p50_chunks", "p99_chunks"):
        assert _is_number(loaded["metrics"][name]["median"])
        assert loaded["metrics"][name]["median"] > 0
    assert loaded["metrics"]["p99_chunks"]["median"] >= loaded["metrics"]["p50_chunks"]["median"]
    assert loaded["metrics"]["loaded_count"]["min"] >= 1
    assert big["target"]["kind"] == "at_least"
    assert big["target"]["metrics"] == ["during_big"]
    assert big["status"] in {"PASS", "FAIL"}
    during = big["metrics"]["during_big"]
    assert during["min"] >= 0
    assert during["min"] == int(during["min"])
    assert _is_number(big["metrics"]["big_mb_per_s"]["median"])
    assert big["metrics"]["big_mb_per_s"]["median"] > 0


async def test_relay_delays_each_piece_and_caps_the_rate(autojump_clock: Any) -> None:
    """The ``wan`` relay's link model, on a mock clock: the last byte of
    100 kB at 1 MB/s arrives after 0.1 s on the link plus the 25 ms delay,
    and EOF follows the data, also delayed; pieces are at most ``read_size``
    and the queue holds at most ``max_bytes`` plus one piece."""
    import trio
    import trio.testing

    from fedstream._bench.worker import _Direction

    payload = bytes(range(256)) * 400  # 102,400 bytes
    source_send, source_recv = trio.testing.memory_stream_one_way_pair()
    sink_send, sink_recv = trio.testing.memory_stream_pair()
    # The bound is twice the bandwidth-delay product (25 kB), as in the harness.
    direction = _Direction(delay=0.025, rate=1e6, max_bytes=50_000, read_size=4096)
    received = bytearray()
    arrivals: list[float] = []
    most_queued = 0
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(direction.read, source_recv)
            nursery.start_soon(direction.write, sink_send)
            start = trio.current_time()
            await source_send.send_all(payload)
            await source_send.aclose()
            while True:
                most_queued = max(most_queued, direction.queued)
                data = await sink_recv.receive_some()
                arrivals.append(trio.current_time() - start)
                if not data:
                    break
                assert len(data) <= 4096
                received += data
    assert bytes(received) == payload
    # The queue is bounded in bytes: the bound plus the piece read last.
    assert 0 < most_queued <= 50_000 + 4096
    assert direction.bytes == len(payload)
    # Nothing arrives before the delay plus the first piece's time on the link.
    assert arrivals[0] >= 0.025 + 1024 / 1e6
    assert arrivals[-2] == pytest.approx(0.025 + len(payload) / 1e6, abs=1e-6)
    assert arrivals[-1] >= arrivals[-2]  # EOF comes last


def test_comparison_row_is_the_median_of_its_per_round_ratios() -> None:
    from fedstream._bench._results import CaseResult, Report, Series, Target

    def row(case: str, values: list[float]) -> CaseResult:
        return CaseResult(
            scenario="throughput",
            case=case,
            params={},
            metrics={"mb_per_s": Series("MB/s", values)},
            headline="mb_per_s",
            repetitions=len(values),
        )

    report = Report("quick", 3, ["throughput"], {}, {}, "now")
    # Per round: 0.8, 0.9, 0.96. The rows' medians (90 / 100) would also
    # give 0.9; the row must use the per-round figures, so change one.
    compare = CaseResult(
        scenario="throughput",
        case="1 MiB default/async",
        params={},
        metrics={"per_round": Series("x", [0.8, 0.9, 0.96])},
        headline="per_round",
        repetitions=3,
        target=Target("ratio_min", 0.9, ">=0.90x"),
        compare=("throughput/1 MiB", "throughput/1 MiB async"),
    )
    report.cases = [row("1 MiB", [80, 90, 240]), row("1 MiB async", [100, 100, 250]), compare]
    report.judge()
    assert compare.ratio == pytest.approx(0.9)
    assert compare.status == "PASS"
    compare.metrics["per_round"].values[1] = 0.89
    report.judge()
    assert compare.ratio == pytest.approx(0.89)
    assert compare.status == "FAIL"
    report.cases[1].error = "worker crashed"
    report.judge()
    assert compare.status == "ERROR"


@pytest.mark.parametrize(
    ("mode", "cases", "ceilings", "targets"),
    [
        ("smoke", EXPECTED_CASES, EXPECTED_CEILINGS, EXPECTED_RATIO_TARGETS),
        ("quick", QUICK_CASES, QUICK_CEILINGS, QUICK_RATIO_TARGETS),
        ("full", QUICK_CASES, QUICK_CEILINGS, QUICK_RATIO_TARGETS),
    ],
)
def test_plans_build_every_row_and_target(
    mode: str,
    cases: dict[str, list[str]],
    ceilings: set[str],
    targets: dict[str, tuple[str, float]],
) -> None:
    """The rows, ceilings and targets each plan builds, without running them:
    the smoke run above covers the code that measures them, this covers the
    rows that only the larger plans have (16-target fan-out, 1000 streams)."""
    from fedstream._bench._scenarios import SCENARIOS, _build, _Env, make_plan

    plan = make_plan(quick=mode != "full", smoke=mode == "smoke")
    assert plan.mode == mode
    with contextlib.ExitStack() as stack:
        ceiling_specs, case_specs = _build(plan, _Env(stack), SCENARIOS)
    assert {c.key for spec in ceiling_specs for c in spec.feeds.values()} == ceilings
    rows = {f"{r.scenario}/{r.case}": r for spec in case_specs for r in spec.results}
    expected = [f"{name}/{case}" for name, names in cases.items() for case in names]
    if mode == "full":  # sizes differ; the scenarios and row counts do not
        assert [row.split("/")[0] for row in rows] == [row.split("/")[0] for row in expected]
    else:
        assert list(rows) == expected
    for row, (ceiling, ratio) in targets.items():
        assert rows[row].ceiling == ceiling, row
        assert rows[row].target is not None, row
        assert (rows[row].target.kind, rows[row].target.value) == ("ratio_min", ratio), row
    wan = {r.case: r for r in rows.values() if r.scenario == "wan"}
    assert all(r.ceiling == "relay" for r in wan.values())
    _check_wan_targets(wan, lambda r: r.target)


def test_chart_writes_each_ratio_at_the_ceiling_it_is_against() -> None:
    """Every ratio on the chart sits at the tick of its own ceiling, reads as
    in the table (three decimals against an upper bound), and names its
    target and status; rows in a second unit are drawn too."""
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fedstream._bench._render import _bar_panel
    from fedstream._bench._results import CaseResult, Ceiling, Report, Series, Target

    report = Report("quick", 1, ["wan"], {}, {}, "now")
    report.ceilings["relay"] = Ceiling("relay", "relay", Series("MB/s", [400.0]))

    def row(case: str, value: float, target: Target | None, unit: str = "MB/s") -> CaseResult:
        return CaseResult(
            scenario="wan",
            case=case,
            params={"object_size": 1 << 20},
            metrics={"mb_per_s": Series(unit, [value])},
            headline="mb_per_s",
            ceiling="relay" if unit == "MB/s" else None,
            repetitions=1,
            target=target,
        )

    window = row("window 16", 260.0, Target("ratio_min", 0.6, ">=0.60x"))
    saw = row("stop-and-wait", 19.0, Target("ratio_max", 0.05, "<=0.050x"))
    count = row("objects", 7.0, None, unit="obj")
    report.cases = [window, saw, count]
    report.judge()
    fig, ax = plt.subplots()
    try:
        _bar_panel(ax, report, report.cases)
        labels = {text.get_text(): text.xy for text in ax.texts}
        right_bars = [patch for other in fig.axes if other is not ax for patch in other.patches]
    finally:
        plt.close(fig)
    assert labels == {"0.65x\n>=0.60x PASS": (0, 400.0), "0.048x\n<=0.050x PASS": (1, 400.0)}
    assert [bar.get_height() for bar in right_bars] == [7.0]


@pytest.mark.parametrize(("value", "status"), [(19.0, "PASS"), (20.0, "PASS"), (21.0, "FAIL")])
def test_an_upper_bound_target_fails_above_it(value: float, status: str) -> None:
    """``ratio_max`` (stop-and-wait over the relay: <= 0.05x) passes at or
    below its bound and fails above it."""
    from fedstream._bench._results import CaseResult, Ceiling, Report, Series, Target

    report = Report("quick", 1, ["wan"], {}, {}, "now")
    report.ceilings["relay"] = Ceiling("relay", "relay", Series("MB/s", [400.0]))
    row = CaseResult(
        scenario="wan",
        case="stop-and-wait",
        params={},
        metrics={"mb_per_s": Series("MB/s", [value])},
        headline="mb_per_s",
        ceiling="relay",
        repetitions=1,
        target=Target("ratio_max", 0.05, "<=0.050x"),
    )
    report.cases = [row]
    report.judge()
    assert row.ratio == pytest.approx(value / 400)
    assert row.status == status
