"""The data model that crosses the wire: :class:`Shareable` and its constants.

These mirror ``nvflare.apis.shareable`` and ``nvflare.apis.fl_constant`` so that
producer and consumer code written for NVIDIA FLARE runs unchanged: the same
class names, the same method names, and the same string values for return
codes and reserved header keys (those strings are what FLARE peers put on the
wire, so they must not change).

A :class:`Shareable` is a plain ``dict`` subclass on purpose: the engine
encodes it with CBOR like any other mapping, and user code may store whatever
the codec accepts in it. Headers are ordinary data too; they live in a nested
dict under the reserved key ``"__headers__"``.

This module has no trio import: it is shared by the sans-io wire layer, the
engine and the blocking facade.
"""

from __future__ import annotations

import copy
import reprlib
import sys
from collections.abc import Iterable, Mapping
from typing import Any, Final

__all__ = ["ReservedHeaderKey", "ReturnCode", "Shareable", "make_copy", "make_reply"]


class ReturnCode:
    """String return codes carried in the ``"__rc__"`` header of a reply.

    Each value equals its name, exactly as in FLARE, so codes compare equal
    across implementations and read well in logs.
    """

    OK: Final[str] = "OK"
    BAD_PEER_CONTEXT: Final[str] = "BAD_PEER_CONTEXT"
    BAD_PEER_READ_STATE: Final[str] = "BAD_PEER_READ_STATE"
    BAD_REQUEST_DATA: Final[str] = "BAD_REQUEST_DATA"
    BAD_TASK_DATA: Final[str] = "BAD_TASK_DATA"
    COMMUNICATION_ERROR: Final[str] = "COMMUNICATION_ERROR"
    ERROR: Final[str] = "ERROR"
    EXECUTION_EXCEPTION: Final[str] = "EXECUTION_EXCEPTION"
    EXECUTION_RESULT_ERROR: Final[str] = "EXECUTION_RESULT_ERROR"
    HANDLER_EXCEPTION: Final[str] = "HANDLER_EXCEPTION"
    MISSING_PEER_CONTEXT: Final[str] = "MISSING_PEER_CONTEXT"
    MODEL_UNRECOGNIZED: Final[str] = "MODEL_UNRECOGNIZED"
    RUN_MISMATCH: Final[str] = "RUN_MISMATCH"
    SERVER_NOT_READY: Final[str] = "SERVER_NOT_READY"
    SERVICE_UNAVAILABLE: Final[str] = "SERVICE_UNAVAILABLE"
    TASK_ABORTED: Final[str] = "TASK_ABORTED"
    TASK_DATA_FILTER_ERROR: Final[str] = "TASK_DATA_FILTER_ERROR"
    TASK_RESULT_FILTER_ERROR: Final[str] = "TASK_RESULT_FILTER_ERROR"
    TASK_UNKNOWN: Final[str] = "TASK_UNKNOWN"
    TASK_UNSUPPORTED: Final[str] = "TASK_UNSUPPORTED"
    TIMEOUT: Final[str] = "TIMEOUT"
    TOPIC_UNKNOWN: Final[str] = "TOPIC_UNKNOWN"
    UNAUTHENTICATED: Final[str] = "UNAUTHENTICATED"
    UNSAFE_JOB: Final[str] = "UNSAFE_JOB"
    VALIDATE_TYPE_UNKNOWN: Final[str] = "VALIDATE_TYPE_UNKNOWN"
    EMPTY_RESULT: Final[str] = "EMPTY_RESULT"
    EARLY_TERMINATION: Final[str] = "EARLY_TERMINATION"
    NOT_AUTHORIZED: Final[str] = "NOT_AUTHORIZED"


class ReservedHeaderKey:
    """Header names FLARE reserves for itself inside a :class:`Shareable`.

    ``HEADERS`` is the top-level dict key that holds all the others.
    """

    HEADERS: Final[str] = "__headers__"
    TOPIC: Final[str] = "__topic__"
    RC: Final[str] = "__rc__"
    COOKIE_JAR: Final[str] = "__cookie_jar__"
    PEER_PROPS: Final[str] = "__peer_props__"
    REPLY_IS_LATE: Final[str] = "__reply_is_late__"
    TASK_NAME: Final[str] = "__task_name__"
    TASK_ID: Final[str] = "__task_id__"
    WORKFLOW: Final[str] = "__workflow__"
    CONTENT_TYPE: Final[str] = "__content_type__"
    TASK_OPERATOR: Final[str] = "__task_operator__"
    ERROR: Final[str] = "__error__"
    PEER_CTX: Final[str] = "__peer_ctx__"
    AUDIT_EVENT_ID: Final[str] = "__audit_event_id__"
    MSG_ROOT_ID: Final[str] = "__msg_root_id__"
    MSG_ROOT_TTL: Final[str] = "__msg_root_ttl__"


_repr = reprlib.Repr()
_repr.maxdict = 6
_repr.maxstring = 40
_repr.maxother = 40


class Shareable(dict[str, Any]):
    """A dict of user data plus a nested dict of headers.

    ``Shareable(data)`` copies a mapping in, like FLARE's. The header dict is stored under
    ``ReservedHeaderKey.HEADERS`` and created when missing, so the accessors
    below never have to special-case a Shareable without headers.

    Headers are read leniently: if ``"__headers__"`` holds something that is
    not a dict (which only a misbehaving peer would send), ``get_header``
    returns the default and ``set_header`` replaces it with a fresh dict.
    Validating what a peer sent is the engine's job, not the data model's.
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> Shareable:
        # With nvflare loaded, a plain Shareable is also an nvflare Shareable,
        # so FLARE code's isinstance checks pass on what fedstream hands it.
        if cls is Shareable and "nvflare.apis.shareable" in sys.modules:
            from ._flare import flare_shareable_class

            flare_cls = flare_shareable_class()
            if flare_cls is not None:
                cls = flare_cls
        return super().__new__(cls)

    def __init__(self, *args: Mapping[str, Any], **kwargs: Any) -> None:
        """Copy the items of a mapping (and any keyword items) into a new Shareable.

        As in FLARE, ``Shareable(d)`` and ``Shareable(data=d)`` copy the
        mapping ``d`` in (a shallow copy). A ``data`` keyword that is not a
        mapping is an item like any other keyword, so ``Shareable(data=b"...")``
        holds ``{"data": b"..."}``; to store a *mapping* under the key
        ``"data"``, write ``Shareable({"data": d})``. Unlike FLARE, a header
        dict in ``d`` is kept (as a copy of the dict) rather than replaced by
        an empty one, so a decoded or converted object keeps its return code
        and cookies.
        """
        if len(args) > 1:
            raise TypeError(f"Shareable takes at most one mapping, not {len(args)} arguments")
        data: Any = args[0] if args else None
        if data is not None and not isinstance(data, Mapping):
            raise TypeError(f"Shareable data must be a mapping, not {type(data).__name__}")
        if data is None and isinstance(kwargs.get("data"), Mapping):
            data = kwargs.pop("data")
        # dict's own __init__, not the next class in the MRO: with nvflare's
        # Shareable mixed in, that one would put the headers first.
        dict.__init__(self)
        if data:
            self.update(data)
        if kwargs:
            self.update(kwargs)
        headers = self.get(ReservedHeaderKey.HEADERS)
        self[ReservedHeaderKey.HEADERS] = dict(headers) if isinstance(headers, dict) else {}

    def _headers(self) -> dict[str, Any]:
        headers = self.get(ReservedHeaderKey.HEADERS)
        if not isinstance(headers, dict):
            headers = {}
            self[ReservedHeaderKey.HEADERS] = headers
        return headers

    def set_header(self, key: str, value: Any) -> None:
        """Set header ``key`` to ``value``."""
        self._headers()[key] = value

    def get_header(self, key: str, default: Any = None) -> Any:
        """Return header ``key``, or ``default`` if it is not set."""
        headers = self.get(ReservedHeaderKey.HEADERS)
        if not isinstance(headers, dict):
            return default
        return headers.get(key, default)

    def get_return_code(self, default: str = ReturnCode.OK) -> Any:
        """Return the ``"__rc__"`` header; a Shareable without one counts as ``OK``."""
        return self.get_header(ReservedHeaderKey.RC, default)

    def set_return_code(self, rc: str) -> None:
        """Set the ``"__rc__"`` header."""
        self.set_header(ReservedHeaderKey.RC, rc)

    def add_cookie(self, name: str, data: Any) -> None:
        """Put ``data`` in the cookie jar under ``name``, creating the jar if needed.

        Cookies are how FLARE lets a sender get state echoed back in a reply.
        """
        jar = self.get_cookie_jar()
        if not isinstance(jar, dict):
            jar = {}
            self.set_cookie_jar(jar)
        jar[name] = data

    def get_cookie_jar(self) -> Any:
        """Return the cookie jar dict, or ``None`` if there is none."""
        return self.get_header(ReservedHeaderKey.COOKIE_JAR, None)

    def get_cookie(self, name: str, default: Any = None) -> Any:
        """Return cookie ``name`` from the cookie jar, or ``default``."""
        jar = self.get_cookie_jar()
        if not isinstance(jar, dict):
            return default
        return jar.get(name, default)

    def set_peer_context(self, peer_ctx: Any) -> None:
        """Attach the sender's context (FLARE's ``__peer_ctx__`` header)."""
        self.set_header(ReservedHeaderKey.PEER_CTX, peer_ctx)

    def get_peer_context(self) -> Any:
        """Return the context set by :meth:`set_peer_context`, or ``None``."""
        return self.get_header(ReservedHeaderKey.PEER_CTX)

    def set_cookie_jar(self, cookie_jar: Any) -> None:
        """Replace the cookie jar (normally with one taken from a request)."""
        self.set_header(ReservedHeaderKey.COOKIE_JAR, cookie_jar)

    def reset_cookies(self) -> None:
        """Empty the cookie jar."""
        self.set_cookie_jar({})

    def set_peer_props(self, props: Any) -> None:
        """Attach the sending site's public properties."""
        self.set_header(ReservedHeaderKey.PEER_PROPS, props)

    def get_peer_props(self) -> Any:
        """Return the peer properties dict, or ``None`` if there is none."""
        return self.get_header(ReservedHeaderKey.PEER_PROPS, None)

    def get_peer_prop(self, key: str, default: Any) -> Any:
        """Return one peer property, or ``default`` if it (or the whole dict) is missing."""
        props = self.get_peer_props()
        if not isinstance(props, dict):
            return default
        return props.get(key, default)

    def copy(self) -> Shareable:
        """Return a copy whose headers can be changed without touching this one.

        Data items are shared, as with ``dict.copy``. The header dict, and any
        dict directly inside it (the cookie jar, the peer properties), are
        copied, because a reply is commonly built by copying a request and then
        editing its headers.
        """
        new = Shareable(self)
        headers = self.get(ReservedHeaderKey.HEADERS)
        if isinstance(headers, dict):
            new[ReservedHeaderKey.HEADERS] = {
                k: dict(v) if isinstance(v, dict) else v for k, v in headers.items()
            }
        return new

    def __repr__(self) -> str:
        data = {k: v for k, v in self.items() if k != ReservedHeaderKey.HEADERS}
        return (
            f"Shareable(rc={self.get_return_code()!r}, data={_repr.repr(data)}, "
            f"headers={_repr.repr(self.get(ReservedHeaderKey.HEADERS))})"
        )


def make_reply(rc: str, headers: Any = None) -> Shareable:
    """Build a reply Shareable with return code ``rc`` and the given headers.

    As in FLARE, the return code is set first and ``headers`` copied in after
    it, so an ``"__rc__"`` entry in ``headers`` wins over ``rc``; ``headers``
    that are not a dict (FLARE's own code passes strings) are ignored.
    """
    reply = Shareable()
    reply.set_return_code(rc)
    if headers and isinstance(headers, dict):
        for key, value in headers.items():
            reply.set_header(key, value)
    return reply


def make_copy(source: Shareable, exclude_headers: Iterable[str] | None = None) -> Shareable:
    """Copy ``source``: data items shared, headers deep-copied (as FLARE's ``make_copy``).

    Headers named in ``exclude_headers`` are left out of the copy.
    """
    if not isinstance(source, dict):
        raise TypeError(f"make_copy needs a Shareable, not {type(source).__name__}")
    new = Shareable({k: v for k, v in source.items() if k != ReservedHeaderKey.HEADERS})
    headers = source.get(ReservedHeaderKey.HEADERS)
    new_headers = copy.deepcopy(headers) if isinstance(headers, dict) else {}
    for key in exclude_headers or ():
        new_headers.pop(key, None)
    new[ReservedHeaderKey.HEADERS] = new_headers
    return new
