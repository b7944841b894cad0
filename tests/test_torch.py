"""CPU torch tensors as values: typed arrays beside the CBOR head, arriving as tensors."""

from __future__ import annotations

import struct
import subprocess
import sys
from typing import Any

import cbor2
import pytest
import trio

torch = pytest.importorskip("torch")
np = pytest.importorskip("numpy")

from engine_helpers import AcceptingFactory  # noqa: E402
from fedstream import (  # noqa: E402
    LocalProtocolError,
    ObjectConsumer,
    ObjectProducer,
    RemoteProtocolError,
    Shareable,
    open_site,
)
from fedstream._wire._payload import (  # noqa: E402
    TAG_TENSOR,
    TENSOR_DTYPES,
    decode_object,
    encode_object,
)


def _sample(name: str, shape: tuple[int, ...]) -> Any:
    dtype = getattr(torch, name)
    values = torch.randn(shape) * 50
    if name == "bool":
        return values > 0
    if name.startswith("complex"):
        return torch.complex(values, -values).to(dtype)
    return values.to(dtype)


def _same(a: Any, b: Any) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):  # no equality kernels for these
        return bool(torch.equal(a.view(torch.uint8), b.view(torch.uint8)))
    return bool(torch.equal(a, b))


def round_trip(value: Any) -> Any:
    return decode_object(bytearray(encode_object(Shareable({"v": value})).to_bytes()))["v"]


@pytest.mark.parametrize("name", sorted(TENSOR_DTYPES))
@pytest.mark.parametrize("shape", [(), (0,), (7,), (3, 5), (64, 1024)], ids=str)
def test_every_dtype_round_trips_as_a_tensor(name: str, shape: tuple[int, ...]) -> None:
    tensor = _sample(name, shape)
    got = round_trip(tensor)
    assert isinstance(got, torch.Tensor)
    assert _same(got, tensor)


def test_non_contiguous_gradient_and_parameter_tensors() -> None:
    base = torch.randn(40, 30, requires_grad=True)
    got = round_trip([base.t(), base[::3], torch.nn.Parameter(torch.ones(4)), base.conj()])
    assert _same(got[0], base.detach().t().contiguous())
    assert _same(got[1], base.detach()[::3].contiguous())
    assert _same(got[2], torch.ones(4))
    assert not any(t.requires_grad for t in got)


def test_large_tensors_are_neither_copied_to_send_nor_to_receive() -> None:
    tensor = torch.zeros(100_000, dtype=torch.bfloat16)
    encoded = encode_object(Shareable({"t": tensor}))
    assert len(encoded.parts) == 2  # the head, and the elements beside it
    tensor[-1] = 1.0  # the part is a view of the tensor's own memory
    buffer = bytearray(encoded.to_bytes())
    assert buffer[-2:] != bytes(2)
    got = decode_object(buffer)["t"]
    assert got[-1].item() == 1.0
    buffer[-2:] = bytes(2)  # and the received tensor is a view of the received buffer
    assert got[-1].item() == 0.0


@pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")
def test_tensors_that_cannot_travel_are_refused_locally() -> None:
    with pytest.raises(LocalProtocolError, match="dense"):
        encode_object(Shareable({"t": torch.eye(3).to_sparse()}))
    with pytest.raises(LocalProtocolError, match="no wire form"):
        encode_object(Shareable({"t": torch.zeros(2, dtype=torch.complex32)}))


@pytest.mark.parametrize(
    "content",
    [
        ["no_such_dtype", np.zeros(2, "<f4")],
        ["float32", np.zeros(2, "<i4")],
        ["bfloat16", b"\x00\x00"],
        ["float32"],
        "float32",
    ],
    ids=["dtype", "mismatch", "not-an-array", "short", "not-a-list"],
)
def test_malformed_tensor_tags_are_remote_protocol_errors(content: Any) -> None:
    # The encoder refuses what receivers refuse, so the malformed tag is
    # spliced into a valid encoding of {"t": content} by hand.
    raw = encode_object(Shareable({"t": content})).to_bytes()
    (length,) = struct.unpack(">I", raw[:4])
    head, rest = raw[4 : 4 + length], raw[4 + length :]
    key = head.index(b"\xa2\x61t") + 3  # the map's first key, "t"
    tag = cbor2.dumps(cbor2.CBORTag(TAG_TENSOR, None))[:-1]  # the tag's head alone
    head = head[:key] + tag + head[key:]
    with pytest.raises(RemoteProtocolError):
        decode_object(bytearray(struct.pack(">I", len(head)) + head + rest))
    with pytest.raises(LocalProtocolError):
        encode_object(Shareable({"t": cbor2.CBORTag(TAG_TENSOR, content)}))


def test_without_torch_tensors_arrive_as_numpy_arrays() -> None:
    data = encode_object(
        Shareable({"f": torch.arange(6, dtype=torch.float32).reshape(2, 3)})
    ).to_bytes()
    bf16 = encode_object(Shareable({"b": torch.zeros(3, dtype=torch.bfloat16)})).to_bytes()
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from fedstream._wire import decode_object\n"
        "from fedstream import RemoteProtocolError\n"
        f"v = decode_object(bytearray({data!r}))['f']\n"
        "print(type(v).__module__, v.dtype, v.tolist())\n"
        "try:\n"
        f"    decode_object(bytearray({bf16!r}))\n"
        "except RemoteProtocolError as exc:\n"
        "    print('refused', 'install torch' in str(exc))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "numpy float32 [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]",
        "refused True",
    ]


async def test_tensors_stream_between_sites() -> None:
    tensors = {"w": torch.randn(512, 256), "b": torch.zeros(256, dtype=torch.bfloat16)}
    got: list[Any] = []

    class Keep(ObjectConsumer):
        async def consume(self, shareable: Any, stream_ctx: Any, fl_ctx: Any) -> Any:
            got.append(shareable)
            return True, None

    class Factory(AcceptingFactory):
        async def get_consumer(self, stream_ctx: Any, fl_ctx: Any) -> Any:  # type: ignore[override]
            return Keep()

    class Send(ObjectProducer):
        sent = False

        async def produce(self, stream_ctx: Any, fl_ctx: Any) -> Any:
            if self.sent:
                return None, 1.0
            self.sent = True
            return Shareable(tensors), 10.0

        async def process_replies(self, replies: Any, stream_ctx: Any, fl_ctx: Any) -> Any:
            return None

    with trio.fail_after(30):
        async with (
            open_site("rx", listen="tcp://127.0.0.1:0") as rx,
            open_site("tx", connect=[rx.address]) as tx,  # type: ignore[list-item]
        ):
            rx.register_stream_processing("c", "t", Factory())
            rc, _ = await tx.stream_objects("c", "t", {}, ["rx"], Send(), None)
    assert rc == "OK"
    (obj,) = got
    assert _same(obj["w"], tensors["w"])
    assert _same(obj["b"], tensors["b"])


def test_the_protocol_documents_the_tensor_tag_and_every_dtype() -> None:
    from pathlib import Path

    text = (Path(__file__).parent.parent / "docs" / "protocol.md").read_text(encoding="utf-8")
    section = text.split("### Torch tensors", 1)[1].split("\n## ", 1)[0]
    assert f"`{TAG_TENSOR:#X}`".replace("0X", "0x") in section
    for name in TENSOR_DTYPES:
        assert f"`{name}`" in section, name
