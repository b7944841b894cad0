"""fedstream never needs nvflare, and imports it only for BlockingSite when installed."""

from __future__ import annotations

import subprocess
import sys

_STREAM = """
import sys
from fedstream import BlockingSite, ConsumerFactory, ObjectConsumer, ObjectProducer, Shareable

class C(ObjectConsumer):
    def consume(self, s, ctx, fl):
        return True, None

class F(ConsumerFactory):
    def get_consumer(self, ctx, fl):
        return C()

class P(ObjectProducer):
    n = 2
    def produce(self, ctx, fl):
        self.n -= 1
        return (Shareable({"i": self.n}), 5.0) if self.n >= 0 else (None, 1.0)
    def process_replies(self, replies, ctx, fl):
        return None

a = BlockingSite("a", listen="tcp://127.0.0.1:0")
with a, BlockingSite("b", connect=[a.address]) as b:
    a.register_stream_processing("c", "t", F())
    a.wait_for_peers(["b"], timeout=10)
    print(b.stream_objects("c", "t", {}, ["a"], P(), b.new_context())[0])
    print(type(Shareable()).__mro__[1].__module__, type(b.new_context()).__mro__[1].__name__)
print(sorted(m for m, v in sys.modules.items() if m.startswith("nvflare") and v is not None))
"""


def _run(prelude: str) -> list[str]:
    result = subprocess.run(
        [sys.executable, "-c", prelude + _STREAM],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def test_blocking_site_works_without_nvflare() -> None:
    # None in sys.modules makes every import of nvflare fail, as if not installed.
    lines = _run("import sys; sys.modules['nvflare'] = None\n")
    assert lines[0] == "OK"
    assert lines[1] == "builtins object"  # plain dict / object bases: no FLARE classes mixed in
    assert lines[2] == "[]"


def test_the_async_site_never_imports_nvflare() -> None:
    code = (
        "import sys, trio, fedstream\n"
        "async def main():\n"
        "    async with fedstream.open_site('x', listen='tcp://127.0.0.1:0'):\n"
        "        pass\n"
        "trio.run(main)\n"
        "print(sorted(m for m in sys.modules if m.startswith('nvflare')))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
