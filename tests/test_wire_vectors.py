"""The test vectors and tables in ``docs/protocol.md`` match the code.

The document is the contract for other implementations, so it is parsed
here rather than copied: every ```` ```vector ```` block names a record (or
an object) as a Python literal and gives its bytes in hex. Encoding the
record must give exactly those bytes and decoding them must give the record.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from fedstream import RemoteProtocolError
from fedstream._shareable import Shareable
from fedstream._wire import (
    CLOSED,
    FRAME_TYPES,
    PROTOCOL_VERSION,
    Abort,
    Chunk,
    Credit,
    Data,
    Done,
    End,
    ErrorCode,
    Frame,
    FrameProtocol,
    FrameType,
    GoAway,
    Hello,
    Ping,
    Pong,
    Reply,
    _arrays,
    _payload,
    _protocol,
    decode_head,
    decode_object,
    encode_frame,
    encode_object,
)
from strategies import assert_same_payload, expected_payload, normalized

DOC = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"

NAMESPACE: dict[str, Any] = {
    "__builtins__": {},
    "bytes": bytes,
    "Shareable": Shareable,
    **{
        cls.__name__: cls
        for cls in (Hello, GoAway, Ping, Pong, Data, Chunk, Reply, End, Abort, Done, Credit)
    },
}

_BLOCK = re.compile(r"^```([\w-]+)\n(.*?)^```", re.MULTILINE | re.DOTALL)
_KEY = re.compile(r"^([a-z][a-z-]*):\s?(.*)$")


def _blocks(kind: str) -> list[dict[str, str]]:
    """Every fenced block of language ``kind`` as a ``key -> value`` dict.

    A line that starts with whitespace continues the previous key's value.
    """
    blocks = []
    for lang, text in _BLOCK.findall(DOC.read_text(encoding="utf-8")):
        if lang != kind:
            continue
        fields: dict[str, str] = {}
        key = None
        for line in text.splitlines():
            match = _KEY.match(line)
            if match:
                key = match.group(1)
                assert key not in fields, f"duplicate {key!r} in {text!r}"
                fields[key] = match.group(2).strip()
            elif line.strip():
                assert key is not None, f"continuation before any key: {line!r}"
                assert line[0].isspace(), f"stray line {line!r}"
                fields[key] += " " + line.strip()
        blocks.append(fields)
    return blocks


def _hex(text: str) -> bytes:
    return bytes.fromhex("".join(text.split()))


def _section(title_word: str) -> str:
    text = DOC.read_text(encoding="utf-8")
    sections = re.split(r"^## ", text, flags=re.MULTILINE)
    found = [s for s in sections if title_word.lower() in s.splitlines()[0].lower()]
    assert len(found) == 1, f"expected one section titled with {title_word!r}"
    return found[0]


VECTORS = _blocks("vector")
FRAME_VECTORS = [v for v in VECTORS if "frame" in v]
OBJECT_VECTORS = [v for v in VECTORS if "object" in v]
TENSOR_VECTORS = _blocks("tensor-vector")


def test_doc_has_vectors() -> None:
    assert len(VECTORS) == len(FRAME_VECTORS) + len(OBJECT_VECTORS)
    names = [v["name"] for v in VECTORS]
    assert len(set(names)) == len(names)
    covered = {type(eval(v["frame"], NAMESPACE)) for v in FRAME_VECTORS}
    assert covered == set(FRAME_TYPES.values())
    assert any("hex" in v for v in OBJECT_VECTORS)
    assert any("head-hex" in v for v in OBJECT_VECTORS)


@pytest.mark.parametrize("vector", FRAME_VECTORS, ids=[v["name"] for v in FRAME_VECTORS])
def test_frame_vector(vector: dict[str, str]) -> None:
    record = eval(vector["frame"], NAMESPACE)
    assert isinstance(record, Frame)
    expected = _hex(vector["hex"])
    head, body = encode_frame(record)
    assert (head + (bytes(body) if body is not None else b"")).hex() == expected.hex()
    assert int.from_bytes(expected[:4], "big") == len(expected) - 4
    assert normalized(decode_head(expected[4:])) == normalized(record)


@pytest.mark.parametrize("vector", OBJECT_VECTORS, ids=[v["name"] for v in OBJECT_VECTORS])
def test_object_vector(vector: dict[str, str]) -> None:
    obj = eval(vector["object"], NAMESPACE)
    encoded = encode_object(obj)
    if "hex" in vector:
        data = _hex(vector["hex"])
        assert encoded.to_bytes().hex() == data.hex()
    else:
        head = _hex(vector["head-hex"])
        assert bytes(encoded.parts[0]).hex() == head.hex()
        tail = bytes.fromhex(vector["tail-byte"]) * int(vector["tail-length"])
        assert b"".join(bytes(p) for p in encoded.parts[1:]) == tail
        data = head + tail
    assert_same_payload(decode_object(data), expected_payload(obj))


def test_doc_has_tensor_vectors() -> None:
    assert {v["name"] for v in TENSOR_VECTORS} >= {"tensor-float32", "tensor-bfloat16"}
    refused = [v["without-torch"] == "refused" for v in TENSOR_VECTORS]
    assert any(refused)  # a dtype NumPy lacks
    assert not all(refused)  # and one that decodes to NumPy


@pytest.mark.parametrize("vector", TENSOR_VECTORS, ids=[v["name"] for v in TENSOR_VECTORS])
def test_tensor_vector_with_torch(vector: dict[str, str]) -> None:
    """The object encodes to exactly the bytes, which decode to equal tensors."""
    torch = pytest.importorskip("torch")
    # torch imports its own modules lazily from C, through the caller's builtins.
    scope = {**NAMESPACE, "__builtins__": {"__import__": __import__}, "torch": torch}
    obj = eval(vector["object"], scope)
    data = _hex(vector["hex"])
    assert encode_object(obj).to_bytes().hex() == data.hex()
    got = decode_object(bytearray(data))
    assert list(got) == list(obj)
    for key, want in obj.items():
        if key == "__headers__":
            continue
        assert type(got[key]) is torch.Tensor
        assert (got[key].dtype, got[key].shape) == (want.dtype, want.shape)
        assert torch.equal(got[key], want)


@pytest.mark.parametrize("vector", TENSOR_VECTORS, ids=[v["name"] for v in TENSOR_VECTORS])
def test_tensor_vector_without_torch(vector: dict[str, str], monkeypatch: Any) -> None:
    """A site without torch decodes the bytes to NumPy arrays, or refuses them.

    Needs NumPy only: the decoder is made to see no torch whether or not it is installed.
    """
    np = pytest.importorskip("numpy")
    monkeypatch.setattr(_arrays, "_torch", lambda: None)
    data = _hex(vector["hex"])
    if vector["without-torch"] == "refused":
        with pytest.raises(RemoteProtocolError, match="install torch"):
            decode_object(bytearray(data))
        return
    want = eval(vector["without-torch"], {**NAMESPACE, "numpy": np})
    got = decode_object(bytearray(data))
    assert list(got) == list(want)
    for key, array in want.items():
        if key == "__headers__":
            continue
        assert type(got[key]) is np.ndarray
        assert (got[key].dtype.str, got[key].shape) == (array.dtype.str, array.shape)
        assert got[key].tobytes() == array.tobytes()


def test_frame_vectors_form_a_valid_connection() -> None:
    """HELLO first and GOAWAY last: the vectors in order are one valid byte stream."""
    names = [v["name"] for v in FRAME_VECTORS]
    records = [eval(v["frame"], NAMESPACE) for v in FRAME_VECTORS]
    assert isinstance(records[0], Hello), names
    assert isinstance(records[-1], GoAway), names
    p = FrameProtocol()
    p.receive_data(b"".join(_hex(v["hex"]) for v in FRAME_VECTORS))
    for record in records:
        assert normalized(p.next_event()) == normalized(record)
    assert p.next_event() is CLOSED


def test_data_and_chunk_vectors_carry_the_inline_object() -> None:
    """The DATA and CHUNK vectors split the in-band object vector in two."""
    objects = {v["name"]: v for v in OBJECT_VECTORS}
    frames = {v["name"]: eval(v["frame"], NAMESPACE) for v in FRAME_VECTORS}
    data, chunk = frames["data"], frames["chunk"]
    whole = _hex(objects["object-inline"]["hex"])
    assert data.size == len(whole)
    assert bytes(data.body) + bytes(chunk.body) == whole
    assert chunk.offset == len(data.body)
    reply = frames["reply"]
    assert decode_object(reply.body).get_return_code() == "OK"


def test_frame_type_table() -> None:
    rows = re.findall(
        r"^\| `(0x[0-9a-f]{2})` +\| ([A-Z]+) +\|", _section("frame types"), flags=re.MULTILINE
    )
    assert {name: int(num, 16) for num, name in rows} == {t.name: int(t) for t in FrameType}


def test_error_code_table() -> None:
    rows = re.findall(r"^\| (\d+) +\| ([A-Z_]+) +\|", _section("GOAWAY"), flags=re.MULTILINE)
    assert {name: int(num) for num, name in rows} == {c.name: int(c) for c in ErrorCode}


def test_constants_block() -> None:
    (block,) = _blocks("constants")
    code = {
        "PROTOCOL_VERSION": PROTOCOL_VERSION,
        "HANDSHAKE_FRAME_LIMIT": _protocol.HANDSHAKE_FRAME_LIMIT,
        "MIN_MAX_FRAME_SIZE": _protocol.MIN_MAX_FRAME_SIZE,
        "DEFAULT_MAX_FRAME_SIZE": _protocol.DEFAULT_MAX_FRAME_SIZE,
        "MAX_HEAD_DEPTH": _protocol.MAX_HEAD_DEPTH,
        "OUT_OF_BAND_MIN": _payload.OUT_OF_BAND_MIN,
        "TAG_BUFFER": _payload.TAG_BUFFER,
        "TAG_SHAREABLE": _payload.TAG_SHAREABLE,
        "MAX_OBJECT_DEPTH": _payload.MAX_OBJECT_DEPTH,
    }
    assert {k.replace("-", "_").upper(): int(v, 0) for k, v in block.items()} == code
