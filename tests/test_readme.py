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


def test_coming_from_flare_names_are_all_exported() -> None:
    import fedstream

    text = README.read_text(encoding="utf-8")
    section = text.split("## Coming from FLARE", 1)[1].split("\n## ", 1)[0]
    imports = re.findall(r"`from nvflare\.[\w.]+ import ([\w, ]+)`", section)
    names = {n.strip() for line in imports for n in line.split(",")}
    assert len(names) >= 12
    assert sorted(n for n in names if not hasattr(fedstream, n)) == []
