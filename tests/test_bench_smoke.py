"""Smoke test of the benchmark harness (``fedstream bench --quick``).

Runs every scenario end to end in a subprocess, exactly as CI would, and
checks the shape of the JSON report and that every case completed. There are
no timing assertions: the figures belong to the machine, not to the test.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

EXPECTED_CASES = {
    "throughput": ["1 KiB", "64 KiB", "1 MiB", "16 MiB"],
    "fanout": ["1 target", "4 targets", "16 targets"],
    "concurrency": ["1 stream", "10 streams", "100 streams", "1000 streams"],
    "memory": ["256 MiB as 1 MiB", "1 x 64 MiB"],
    "latency": ["1 KiB"],
    "hol": ["1 KiB idle", "1 KiB + 64 MiB", "64 MiB beside"],
    "ws": ["ws 1 MiB", "ws 16 MiB", "wss 1 MiB", "wss 16 MiB"],
}
EXPECTED_CEILINGS = {
    "raw",
    "pingpong",
    "pingpong_rtt",
    "raw_fanout_4",
    "raw_fanout_16",
    "websocket",
    "websocket_tls",
}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _run_quick(tmp_path: Path) -> tuple[dict[str, Any], str]:
    out = tmp_path / "bench.json"
    pythonpath = [str(SRC), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(pythonpath)}
    code = (
        "import sys\n"
        "from fedstream._bench import main\n"
        f"sys.exit(main(['--quick', '--quiet', '--json', {str(out)!r}]))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return json.loads(out.read_text(encoding="utf-8")), proc.stdout


@pytest.mark.slow
def test_quick_benchmark_reports_every_scenario(tmp_path: Path) -> None:
    report, table = _run_quick(tmp_path)

    assert report["schema"] == 1
    assert report["mode"] == "quick"
    assert report["completed"] is True
    assert report["repeat"] >= 1
    for key in ("cpu_count", "cpu_model", "python", "trio", "fedstream", "date"):
        assert key in report["machine"]
    assert report["plan"]["quick"] is True

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
            if case["target"] is not None:
                assert case["target"]["kind"] in {
                    "ratio_min",
                    "complete",
                    "rss_max",
                    "at_most",
                    "at_least",
                    "report",
                }, label
            assert name in table, label
            assert case["case"] in table, label

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
            "big_size": 64 * 1024 * 1024,
        }
        assert case["repetitions"] == report["repeat"]
    for case, prefix in ((idle, "idle_"), (loaded, "loaded_")):
        assert case["target"]["kind"] == "report"
        assert case["status"] == "INFO"
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

    for case in report["scenarios"]["ws"]["cases"]:
        wss = case["params"]["scheme"] == "wss"
        assert case["ceiling"] == ("websocket_tls" if wss else "websocket")
        assert case["target"]["kind"] == "ratio_min"
        assert case["status"] in {"PASS", "FAIL"}
