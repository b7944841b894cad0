"""Shareable and make_reply behave like FLARE's, and stay plain dicts."""

from __future__ import annotations

import copy

import pytest

from fedstream._shareable import ReservedHeaderKey, ReturnCode, Shareable, make_copy, make_reply


def test_constants_equal_their_names() -> None:
    names = [n for n in vars(ReturnCode) if not n.startswith("_")]
    assert len(names) == 28
    for name in names:
        assert getattr(ReturnCode, name) == name
    assert ReservedHeaderKey.HEADERS == "__headers__"
    assert ReservedHeaderKey.RC == "__rc__"
    assert ReservedHeaderKey.COOKIE_JAR == "__cookie_jar__"
    assert ReservedHeaderKey.PEER_PROPS == "__peer_props__"
    assert ReservedHeaderKey.MSG_ROOT_TTL == "__msg_root_ttl__"


def test_is_a_dict_with_headers_key() -> None:
    s = Shareable()
    assert isinstance(s, dict)
    assert s == {"__headers__": {}}
    s2 = Shareable({"a": 1}, b=2)
    assert s2 == {"a": 1, "b": 2, "__headers__": {}}


def test_existing_headers_are_kept() -> None:
    s = Shareable({"__headers__": {"x": 1}, "data": 3})
    assert s.get_header("x") == 1
    assert s["data"] == 3


def test_headers_live_under_headers_key() -> None:
    s = Shareable()
    s.set_header("k", "v")
    assert s["__headers__"] == {"k": "v"}
    assert s.get_header("k") == "v"
    assert s.get_header("missing") is None
    assert s.get_header("missing", 7) == 7
    assert "k" not in s


def test_non_dict_headers_are_tolerated() -> None:
    s = Shareable()
    s["__headers__"] = 5
    assert s.get_header("k", "d") == "d"
    assert s.get_return_code() == ReturnCode.OK
    s.set_header("k", 1)
    assert s["__headers__"] == {"k": 1}


def test_return_code() -> None:
    s = Shareable()
    assert s.get_return_code() == "OK"
    assert s.get_return_code(default="X") == "X"
    s.set_return_code(ReturnCode.TIMEOUT)
    assert s.get_return_code() == "TIMEOUT"
    assert s["__headers__"]["__rc__"] == "TIMEOUT"


def test_make_reply() -> None:
    r = make_reply(ReturnCode.TASK_ABORTED)
    assert isinstance(r, Shareable)
    assert r.get_return_code() == "TASK_ABORTED"
    assert r == {"__headers__": {"__rc__": "TASK_ABORTED"}}


def test_make_reply_copies_headers_and_an_rc_header_wins_as_in_flare() -> None:
    headers = {"__topic__": "t", "custom": [1, 2], "__rc__": "ERROR"}
    r = make_reply(ReturnCode.OK, headers=headers)
    assert r.get_header("__topic__") == "t"
    assert r.get_header("custom") == [1, 2]
    assert r.get_return_code() == "ERROR"
    r.set_header("new", 1)
    assert "new" not in headers
    assert headers["__rc__"] == "ERROR"


def test_copy_is_independent() -> None:
    s = Shareable({"data": [1]})
    s.set_header("h", 1)
    s.add_cookie("c", 1)
    c = s.copy()
    assert type(c) is type(Shareable())
    assert c == s
    c.set_header("h", 2)
    c.add_cookie("c", 2)
    c["other"] = 3
    assert s.get_header("h") == 1
    assert s.get_cookie_jar() == {"c": 1}
    assert "other" not in s
    assert c["data"] is s["data"]


def test_cookies() -> None:
    s = Shareable()
    assert s.get_cookie_jar() is None
    s.add_cookie("a", 1)
    s.add_cookie("b", {"x": 2})
    assert s.get_cookie_jar() == {"a": 1, "b": {"x": 2}}
    assert s["__headers__"]["__cookie_jar__"] == {"a": 1, "b": {"x": 2}}

    reply = make_reply(ReturnCode.OK)
    reply.set_cookie_jar(s.get_cookie_jar())
    assert reply.get_cookie_jar() == {"a": 1, "b": {"x": 2}}

    s.reset_cookies()
    assert s.get_cookie_jar() == {}


def test_peer_props() -> None:
    s = Shareable()
    assert s.get_peer_props() is None
    assert s.get_peer_prop("k", "d") == "d"
    s.set_peer_props({"k": "v"})
    assert s.get_peer_props() == {"k": "v"}
    assert s.get_peer_prop("k", None) == "v"
    assert s.get_peer_prop("other", 0) == 0


def test_repr_is_informative() -> None:
    s = Shareable({"weights": b"x" * 10_000})
    s.set_return_code(ReturnCode.ERROR)
    text = repr(s)
    assert text.startswith("Shareable(")
    assert "ERROR" in text
    assert "weights" in text
    assert len(text) < 300


def test_make_reply_ignores_headers_that_are_not_a_dict() -> None:
    # FLARE's TensorConsumer passes a string as headers.
    r = make_reply(ReturnCode.ERROR, "not a dict")
    assert r == {"__headers__": {"__rc__": "ERROR"}}


def test_shareable_copies_a_mapping_in_like_flare() -> None:
    source = {"a": 1, "data": b"x"}
    s = Shareable(source)
    assert s["a"] == 1
    assert s["data"] == b"x"
    assert "__headers__" in s
    s["a"] = 2
    assert source["a"] == 1
    by_keyword = Shareable(data={"k": "v"})
    assert by_keyword["k"] == "v"
    assert "data" not in by_keyword
    # A data keyword that is not a mapping is an item, as in a dict.
    assert Shareable(data=b"x", n=1) == {"data": b"x", "n": 1, "__headers__": {}}
    with pytest.raises(TypeError, match="mapping"):
        Shareable(b"bytes")  # type: ignore[arg-type]


def test_shareable_from_a_mapping_keeps_a_copy_of_its_headers() -> None:
    src = make_reply(ReturnCode.TIMEOUT)
    s = Shareable(src)
    assert s.get_return_code() == "TIMEOUT"
    s.set_return_code("OK")
    assert src.get_return_code() == "TIMEOUT"


def test_cookie_and_peer_context_accessors() -> None:
    s = Shareable()
    assert s.get_cookie("c", "none") == "none"
    s.add_cookie("c", 5)
    assert s.get_cookie("c") == 5
    assert s.get_peer_context() is None
    s.set_peer_context({"site": "x"})
    assert s.get_peer_context() == {"site": "x"}
    assert s.get_header(ReservedHeaderKey.PEER_CTX) == {"site": "x"}


def test_make_copy_deep_copies_headers_and_shares_data() -> None:
    blob = bytearray(b"abc")
    src = Shareable({"blob": blob})
    src.add_cookie("c", {"n": [1]})
    src.set_header("drop", 1)
    c = make_copy(src, exclude_headers=["drop"])
    assert c["blob"] is blob
    assert c.get_header("drop") is None
    assert src.get_header("drop") == 1
    c.get_cookie("c")["n"].append(2)
    assert src.get_cookie("c") == {"n": [1]}
    assert copy.copy(c) == c
