"""A fedstream stream through a real HTTP reverse proxy: nginx forwarding one
path with the WebSocket upgrade headers, as a hospital's or a company's proxy
would.

The test writes its own nginx configuration into a temporary directory
(listening on 127.0.0.1, every file nginx writes kept inside that directory)
and runs nginx in the foreground as a subprocess. It skips only when nginx is
not installed outside CI; in CI (``CI`` set) a missing nginx is a failure,
since ``.ci/run`` installs it.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import signal
import socket
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from fedstream import (
    ConsumerFactory,
    FLContext,
    HandshakeError,
    ObjectConsumer,
    ObjectProducer,
    ReturnCode,
    Shareable,
    StreamContextKey,
    make_reply,
    open_site,
)

NGINX = shutil.which("nginx") or next(
    (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None
)

if NGINX is None:
    if os.environ.get("CI"):
        pytest.fail("nginx is not installed (.ci/run installs it)", pytrace=False)
    pytestmark = pytest.mark.skip(reason="nginx is not installed (apt-get install nginx)")

OBJECT_SIZE = 16 * 1024 * 1024
OBJECTS = 4  # 64 MiB in all

CONFIG = """\
worker_processes 1;
{user}
pid {prefix}/nginx.pid;
error_log {prefix}/error.log info;
events {{ worker_connections 64; }}
http {{
    access_log {prefix}/access.log;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    server {{
        listen 127.0.0.1:{port};
        location /fedstream {{
            proxy_pass http://127.0.0.1:{backend};
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection "upgrade";
            proxy_set_header Host $host;
            proxy_buffering off;
            proxy_read_timeout 3600s;
            proxy_send_timeout 3600s;
        }}
        location / {{
            return 404;
        }}
    }}
}}
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@asynccontextmanager
async def running_nginx(prefix: Path, backend: int) -> AsyncIterator[int]:
    """nginx forwarding ``/fedstream`` on a free loopback port to ``backend``; yields the port."""
    assert NGINX is not None
    port = free_port()
    # As root, nginx would run its worker as "nobody", which cannot enter the
    # test's private temporary directory.
    user = "user root;" if os.geteuid() == 0 else ""
    conf = prefix / "nginx.conf"
    conf.write_text(CONFIG.format(user=user, prefix=prefix, port=port, backend=backend))
    log = (prefix / "stderr.log").open("wb")
    proc = await trio.lowlevel.open_process(
        [NGINX, "-p", prefix, "-e", prefix / "error.log", "-c", conf, "-g", "daemon off;"],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        with trio.fail_after(10):
            while True:
                if proc.poll() is not None:
                    logs = [prefix / "stderr.log", prefix / "error.log"]
                    said = "".join(p.read_text() for p in logs if p.exists())
                    raise RuntimeError(f"nginx exited with {proc.returncode}: {said}")
                try:
                    probe = await trio.open_tcp_stream("127.0.0.1", port)
                except OSError:
                    await trio.sleep(0.05)
                    continue
                await probe.aclose()
                break
        yield port
    finally:
        with trio.CancelScope(shield=True):
            if proc.poll() is None:
                proc.send_signal(signal.SIGQUIT)  # graceful stop of master and worker
                with trio.move_on_after(5):
                    await proc.wait()
            if proc.poll() is None:
                proc.kill()
                await proc.wait()
        log.close()


class HashingProducer(ObjectProducer):
    """``OBJECTS`` objects of pseudo-random bytes; hashes what it hands over."""

    def __init__(self) -> None:
        self.sent = 0
        self.digest = hashlib.sha256()
        self.rcs: list[str] = []

    async def produce(
        self, stream_ctx: dict[str, Any], fl_ctx: FLContext
    ) -> tuple[Shareable, float] | None:
        if self.sent == OBJECTS:
            return None
        data = random.Random(self.sent).randbytes(OBJECT_SIZE)
        self.digest.update(data)
        self.sent += 1
        return Shareable({"seq": self.sent - 1, "data": data}), 60.0

    async def process_replies(
        self, replies: dict[str, Shareable], stream_ctx: dict[str, Any], fl_ctx: FLContext
    ) -> Any:
        self.rcs.extend(str(r.get_return_code(ReturnCode.OK)) for r in replies.values())
        return None


class HashingConsumer(ObjectConsumer, ConsumerFactory):
    """Hashes every object's bytes in arrival order (one consumer for the one stream)."""

    def __init__(self) -> None:
        self.digest = hashlib.sha256()
        self.seqs: list[int] = []
        self.received = 0
        self.finalized: list[str] = []

    async def consume(
        self, shareable: Shareable, stream_ctx: dict[str, Any], fl_ctx: FLContext
    ) -> tuple[bool, Shareable | None]:
        data = shareable["data"]
        self.seqs.append(shareable["seq"])
        self.received += len(data)
        self.digest.update(data)
        return True, make_reply(ReturnCode.OK)

    async def finalize(self, stream_ctx: dict[str, Any], fl_ctx: FLContext) -> None:
        self.finalized.append(str(stream_ctx.get(StreamContextKey.RC)))

    def get_consumer(self, stream_ctx: dict[str, Any], fl_ctx: FLContext) -> ObjectConsumer:
        return self

    def return_consumer(
        self, consumer: ObjectConsumer, stream_ctx: dict[str, Any], fl_ctx: FLContext
    ) -> None:
        pass


@pytest.mark.slow
async def test_64_mib_through_an_nginx_reverse_proxy_arrive_intact(tmp_path: Path) -> None:
    consumer = HashingConsumer()
    producer = HashingProducer()
    with trio.fail_after(120):
        async with open_site("server", listen="ws://127.0.0.1:0/fedstream") as server:
            server.register_stream_processing("proxy", "blob", consumer)
            backend = int((server.address or "").rsplit(":", 1)[1].split("/", 1)[0])
            async with running_nginx(tmp_path, backend) as port:
                url = f"ws://127.0.0.1:{port}/fedstream"
                async with open_site("site-1", connect=[url]) as site1:
                    await server.wait_for_peers(["site-1"])
                    rc, result = await site1.stream_objects(
                        "proxy", "blob", {}, ["server"], producer, None
                    )
                # nginx's 404 for any other path reaches the dialer as such.
                async with open_site("site-2") as site2:
                    with pytest.raises(HandshakeError, match="HTTP 404"):
                        await site2.connect(f"ws://127.0.0.1:{port}/elsewhere")
    assert (rc, result) == (ReturnCode.OK, None)
    assert producer.rcs == [ReturnCode.OK] * OBJECTS
    assert consumer.seqs == list(range(OBJECTS))
    assert consumer.received == OBJECTS * OBJECT_SIZE
    assert consumer.digest.hexdigest() == producer.digest.hexdigest()
    assert consumer.finalized == [ReturnCode.OK]
    access = (tmp_path / "access.log").read_text()
    # The stream went through nginx: its upgrade was switched (101) there.
    assert '"GET /fedstream HTTP/1.1" 101' in access
    assert '"GET /elsewhere HTTP/1.1" 404' in access
