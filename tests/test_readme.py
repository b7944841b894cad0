"""The README's example runs and prints what it says."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_example_runs() -> None:
    text = README.read_text(encoding="utf-8")
    match = re.search(r"## Using it from trio\n\n```python\n(.*?)```", text, re.S)
    assert match, "README lost its trio example"
    result = subprocess.run(
        [sys.executable, "-c", match.group(1)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "got 1000 bytes",
        "got 2000 bytes",
        "stream ended: OK",
        "OK None",
    ]


def test_readme_quick_start_has_exactly_two_commands() -> None:
    text = README.read_text(encoding="utf-8")
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"```bash\n(.*?)```", section, re.S)
    assert len(commands) == 2
    assert all(len(c.strip().splitlines()) == 1 for c in commands)
    assert "fedstream demo" in commands[0]
    assert "pytest" in commands[1]


def _python_blocks(section: str) -> list[str]:
    text = README.read_text(encoding="utf-8")
    body = text.split(section, 1)[1].split("\n#", 1)[0]
    return re.findall(r"```python\n(.*?)```", body, re.S)


def test_readme_examples_pass_mypy_strict(tmp_path: Path) -> None:
    """The trio example and the files example type-check under ``mypy --strict``."""
    [example] = _python_blocks("## Using it from trio\n")
    [files] = _python_blocks("### Files and containers\n")
    (tmp_path / "example.py").write_text(example, encoding="utf-8")
    (tmp_path / "files_example.py").write_text("import fedstream\n\n\n" + files, encoding="utf-8")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--strict",
            "--no-error-summary",
            "--cache-dir",
            str(tmp_path / "cache"),
            "example.py",
            "files_example.py",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_readme_files_example_runs(tmp_path: Path) -> None:
    [files] = _python_blocks("### Files and containers\n")
    (tmp_path / "model.bin").write_bytes(b"m" * 100_000)
    program = (
        "import trio\nimport fedstream\n\n"
        + files
        + """

async def main() -> None:
    async with fedstream.open_site("server", listen="tcp://127.0.0.1:0") as server:
        async with fedstream.open_site("site-1", connect=[server.address]) as site1:
            await server.wait_for_peers(["site-1"])
            await files(server, site1)


trio.run(main)
"""
    )
    result = subprocess.run(
        [sys.executable, "-c", program],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("ReceivedFile(peer='server', name='model.bin', rc='OK'")
    assert lines[1].startswith("True ")
    assert lines[1].endswith("0 {'site-1': 'OK'}")
    assert lines[2] == "{'lr': 0.1, 'layers': [1, 2]}"
    assert (tmp_path / "received" / "model.bin").read_bytes() == b"m" * 100_000


def test_coming_from_flare_names_are_all_exported() -> None:
    import fedstream

    text = README.read_text(encoding="utf-8")
    section = text.split("## Coming from FLARE", 1)[1].split("\n## ", 1)[0]
    imports = re.findall(r"`from nvflare\.[\w.]+ import ([\w, ]+)`", section)
    names = {n.strip() for line in imports for n in line.split(",")}
    assert len(names) >= 12
    assert sorted(n for n in names if not hasattr(fedstream, n)) == []
