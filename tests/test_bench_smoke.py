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
}
EXPECTED_CEILINGS = {"raw", "pingpong", "pingpong_rtt", "raw_fanout_4", "raw_fanout_16"}


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
                assert case["target"]["kind"] in {"ratio_min", "complete", "rss_max"}, label
            assert name in table, label
            assert case["case"] in table, label

    for case in report["scenarios"]["concurrency"]["cases"]:
        assert case["status"] == "PASS"
        assert case["metrics"]["streams_ok"]["min"] == case["params"]["streams"]
    for case in report["scenarios"]["memory"]["cases"]:
        assert any("scaled down" in note for note in case["notes"])
        for key in ("sender_rss_increase", "receiver_rss_increase"):
            assert _is_number(case["metrics"][key]["max"])
    latency = report["scenarios"]["latency"]["cases"][0]["metrics"]
    assert latency["p50"]["median"] <= latency["p99"]["median"]
