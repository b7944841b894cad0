"""`Signal` and `FLContext`: FLARE's abort flag and property bag, made trio-aware.

FLARE code checks ``fl_ctx.get_run_abort_signal().triggered`` in loops; that
keeps working here. fedstream's engine must not poll, though: every session
runs in a cancel scope, and an abort has to become a cancellation of that
scope at once. So a :class:`Signal` also keeps a list of listeners that
:meth:`Signal.trigger` calls, and :meth:`Signal.wait` turns one of those
listeners into a trio wakeup.

Thread model
------------
``trigger`` may be called from any thread: a trio task, a worker thread
running a sync callback, or a thread that has never seen trio. All state is
guarded by a :class:`threading.Lock` per signal, and listeners are called
*after* that lock is released, so a listener may itself trigger, reset or
inspect signals. A waiter wakes its trio run through the run's
:class:`trio.lowlevel.TrioToken`, which is the one thread-safe way into a run.

Parents
-------
A signal is triggered when it or any ancestor is triggered. A listener added
to a child is therefore registered on every ancestor as well (each level is
checked and registered under that level's lock, so a trigger racing with the
registration is never missed) and fires at most once, whichever level fires
first. Once fired or unregistered it removes itself from every level, so
finished waiters do not accumulate on long-lived parent signals.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, Final

import trio

__all__ = ["FLContext", "Signal"]

logger = logging.getLogger(__name__)


class _Listener:
    """One ``add_listener`` registration, possibly attached to several signals."""

    __slots__ = ("_attached", "_done", "_fn", "_lock", "_signal")

    def __init__(self, signal: Signal, fn: Callable[[Signal], None]) -> None:
        self._signal = signal
        self._fn = fn
        # Lock order is always listener lock -> signal lock, never the reverse:
        # Signal.trigger releases its own lock before calling fire().
        self._lock = threading.Lock()
        self._done = False
        self._attached: list[Signal] = []

    def attach(self) -> bool:
        """Register on the signal and its ancestors; return True if one is already triggered."""
        with self._lock:
            level: Signal | None = self._signal
            while level is not None:
                with level._lock:
                    if level._triggered:
                        return True
                    level._listeners[self] = None
                    self._attached.append(level)
                level = level._parent
            return False

    def fire(self) -> None:
        with self._lock:
            if self._done:
                return
            self._done = True
        self._detach()
        try:
            self._fn(self._signal)
        except Exception:
            logger.exception("signal listener %r raised", self._fn)

    def cancel(self) -> None:
        with self._lock:
            self._done = True
        self._detach()

    def _detach(self) -> None:
        with self._lock:
            attached, self._attached = self._attached, []
        for level in attached:
            with level._lock:
                level._listeners.pop(self, None)


class Signal:
    """A thread-safe, one-shot-until-reset flag with an optional parent.

    Compatible with ``nvflare.apis.signal.Signal``: ``trigger(value)``,
    ``reset()``, and the ``triggered``, ``value`` and ``trigger_time``
    properties. ``triggered`` is true when this signal or any ancestor has
    been triggered; ``value`` and ``trigger_time`` describe this signal only.

    On top of that, :meth:`add_listener` and :meth:`wait` let code react to a
    trigger without polling.
    """

    def __init__(self, parent: Signal | None = None) -> None:
        self._parent = parent
        self._lock = threading.Lock()
        self._value: Any = None
        self._trigger_time: float | None = None
        self._triggered = False
        # A dict rather than a set: listeners fire in registration order.
        self._listeners: dict[_Listener, None] = {}

    @property
    def parent(self) -> Signal | None:
        """The parent signal, or ``None``."""
        return self._parent

    @property
    def value(self) -> Any:
        """The value passed to the last :meth:`trigger` (or :meth:`reset`)."""
        with self._lock:
            return self._value

    @property
    def trigger_time(self) -> float | None:
        """``time.time()`` of the last :meth:`trigger`, or ``None`` if not triggered."""
        with self._lock:
            return self._trigger_time

    @property
    def triggered(self) -> bool:
        """True if this signal or any of its ancestors is triggered."""
        level: Signal | None = self
        while level is not None:
            with level._lock:
                if level._triggered:
                    return True
            level = level._parent
        return False

    def trigger(self, value: Any = True) -> None:
        """Trigger the signal and call every pending listener, here and in descendants.

        Safe from any thread. Triggering an already-triggered signal updates
        ``value`` and ``trigger_time``; listeners have already fired by then.
        """
        with self._lock:
            self._value = value
            self._trigger_time = time.time()
            self._triggered = True
            pending = list(self._listeners)
        for listener in pending:
            listener.fire()

    def reset(self, value: Any = None) -> None:
        """Clear this signal (not its ancestors) so it can be triggered again.

        Listeners that already fired stay fired; waiters that already woke
        stay woken.
        """
        with self._lock:
            self._value = value
            self._trigger_time = None
            self._triggered = False

    def add_listener(self, fn: Callable[[Signal], None]) -> Callable[[], None]:
        """Call ``fn(self)`` once, when this signal or an ancestor is triggered.

        If that has already happened, ``fn`` is called right away in the
        calling thread. Otherwise it is called in whichever thread calls
        :meth:`trigger`, so it must be quick and thread-safe; exceptions it
        raises are logged and swallowed, because the triggering thread cannot
        do anything useful with them.

        Returns a function that unregisters ``fn``; calling it after ``fn`` has
        run, or more than once, does nothing.
        """
        listener = _Listener(self, fn)
        if listener.attach():
            listener.fire()
        return listener.cancel

    async def wait(self) -> None:
        """Return once this signal or an ancestor is triggered.

        The trigger may come from any thread. The wakeup is delivered through
        this trio run's token, so no task polls. If the run has already
        finished when the trigger arrives, the wakeup is dropped. Cancelling
        the wait unregisters it.
        """
        if self.triggered:
            await trio.lowlevel.checkpoint()
            return
        event = trio.Event()
        token = trio.lowlevel.current_trio_token()

        def wake(_signal: Signal) -> None:
            try:
                token.run_sync_soon(event.set)
            except trio.RunFinishedError:
                pass

        unregister = self.add_listener(wake)
        try:
            await event.wait()
        finally:
            unregister()

    def _listener_count(self) -> int:
        """Number of listeners registered on this very signal (for tests)."""
        with self._lock:
            return len(self._listeners)

    def __repr__(self) -> str:
        with self._lock:
            own = self._triggered
            value = self._value
        return f"<Signal triggered={self.triggered} own={own} value={value!r}>"


_JOB_ID: Final = "__run_num__"
_ENGINE: Final = "__engine__"
_IDENTITY_NAME: Final = "__identity_name__"
_PEER_CONTEXT: Final = "__peer_ctx__"
_CUSTOM_PROPS: Final = "__custom_props__"
_PROCESS_TYPE: Final = "__process_type__"
_JOB_IS_UNSAFE: Final = "__job_is_unsafe__"


class _Prop:
    __slots__ = ("private", "sticky", "value")

    def __init__(self, value: Any, private: bool, sticky: bool) -> None:
        self.value = value
        self.private = private
        self.sticky = sticky


class FLContext:
    """A thread-safe property bag handed to every streaming callback.

    Compatible in method names with ``nvflare.apis.fl_context.FLContext``.
    Each property also records FLARE's ``private`` and ``sticky`` flags;
    fedstream stores them (``get_all_public_props`` honours ``private``) but
    has no context manager that would act on ``sticky``.

    A context always has a run abort signal, so callbacks can call
    ``fl_ctx.get_run_abort_signal().triggered`` without a ``None`` check.

    It offers FLARE's ``FLContext`` surface (``get_engine``,
    ``get_identity_name``, ``get_peer_context``, ``get/set_custom_prop``,
    ``put``, ``clone``, ``get_prop_keys``, ``get_prop_detail``, use as a
    context manager), and once ``nvflare`` is imported a new context is also
    an instance of ``nvflare.apis.fl_context.FLContext``, so FLARE code's
    ``isinstance`` checks pass.
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> FLContext:
        if cls is FLContext and "nvflare.apis.fl_context" in sys.modules:
            from ._flare import flare_context_class

            flare_cls = flare_context_class()
            if flare_cls is not None:
                cls = flare_cls
        return super().__new__(cls)

    def __init__(
        self,
        abort_signal: Signal | None = None,
        *,
        identity_name: str = "",
        props: Mapping[str, Any] | None = None,
        engine: Any = None,
    ) -> None:
        #: FLARE's ``FLContext.model`` attribute, kept for code that reads it.
        self.model: Any = None
        self.logger = logger
        self._lock = threading.Lock()
        self._props: dict[str, _Prop] = {}
        self._abort_signal = abort_signal if abort_signal is not None else Signal()
        if props:
            for key, value in props.items():
                self._props[key] = _Prop(value, private=True, sticky=True)
        if identity_name:
            self._props[_IDENTITY_NAME] = _Prop(identity_name, private=False, sticky=True)
        if engine is not None:
            self._props[_ENGINE] = _Prop(engine, private=True, sticky=False)

    def get_prop(self, key: str, default: Any = None) -> Any:
        """Return property ``key``, or ``default`` if it is not set."""
        with self._lock:
            prop = self._props.get(key)
        return default if prop is None else prop.value

    def set_prop(self, key: str, value: Any, private: bool = True, sticky: bool = True) -> bool:
        """Set property ``key``, replacing any previous value and flags.

        Always returns True; the return value exists for FLARE compatibility,
        where a conflicting ``private``/``sticky`` setting could be refused.
        """
        with self._lock:
            self._props[key] = _Prop(value, private=private, sticky=sticky)
        return True

    def remove_prop(self, key: str, force_removal: bool = False) -> None:
        """Remove property ``key`` if present.

        Unlike FLARE, reserved (``"__"``) keys are removed too; ``force_removal``
        is accepted for FLARE compatibility and changes nothing.
        """
        with self._lock:
            self._props.pop(key, None)

    def put(self, key: str, value: Any, private: bool = True, sticky: bool = True) -> None:
        """Set property ``key`` (FLARE's unchecked ``put``; here the same as :meth:`set_prop`)."""
        self.set_prop(key, value, private=private, sticky=sticky)

    def get_prop_keys(self) -> list[str]:
        """Return the names of all properties."""
        with self._lock:
            return list(self._props)

    def get_prop_detail(self, key: str) -> dict[str, Any] | None:
        """Return ``{"value", "private", "sticky"}`` for ``key``, or ``None``."""
        with self._lock:
            prop = self._props.get(key)
        if prop is None:
            return None
        return {"value": prop.value, "private": prop.private, "sticky": prop.sticky}

    def public_key_exists(self, key: str) -> bool:
        """Whether ``key`` is set as a public property."""
        with self._lock:
            prop = self._props.get(key)
        return prop is not None and not prop.private

    def set_public_props(self, metadata: Mapping[str, Any]) -> None:
        """Replace the public non-sticky properties with ``metadata``."""
        with self._lock:
            self._props = {k: p for k, p in self._props.items() if p.private or p.sticky}
            for key, value in metadata.items():
                self._props[key] = _Prop(value, private=False, sticky=False)

    def get_custom_prop(self, key: str, default: Any = None) -> Any:
        """Return ``key`` from the custom-properties dict, or ``default``."""
        props = self.get_prop(_CUSTOM_PROPS)
        if not isinstance(props, dict):
            return default
        return props.get(key, default)

    def set_custom_prop(self, key: str, value: Any) -> None:
        """Set ``key`` in the custom-properties dict (created when missing)."""
        with self._lock:
            prop = self._props.get(_CUSTOM_PROPS)
            if prop is None or not isinstance(prop.value, dict):
                prop = self._props[_CUSTOM_PROPS] = _Prop({}, private=True, sticky=False)
            prop.value[key] = value

    def get_process_type(self, default: Any = None) -> Any:
        """Return the ``"__process_type__"`` property."""
        return self.get_prop(_PROCESS_TYPE, default)

    def set_job_is_unsafe(self, value: bool = True) -> None:
        """Mark the job unsafe (a plain property here)."""
        self.set_prop(_JOB_IS_UNSAFE, value, private=True, sticky=True)

    def is_job_unsafe(self) -> Any:
        """Return the ``"__job_is_unsafe__"`` property (``False`` when unset)."""
        return self.get_prop(_JOB_IS_UNSAFE, False)

    def get_workspace(self) -> Any:
        """Return the engine's workspace (FLARE engines have one)."""
        engine = self.get_engine()
        if engine is None:
            raise RuntimeError("missing engine from context")
        return engine.get_workspace()

    def sync_sticky(self) -> None:
        """Nothing to do: kept for FLARE compatibility."""

    def clone(self) -> FLContext:
        """Return a new context with the same properties (values shared) and abort signal."""
        with self._lock:
            props = dict(self._props)
            signal = self._abort_signal
        new = type(self)(signal)
        new.model = self.model
        with new._lock:
            new._props = {k: _Prop(p.value, p.private, p.sticky) for k, p in props.items()}
        return new

    def __enter__(self) -> FLContext:
        return self

    def __exit__(self, *exc_info: object) -> None:
        return None

    def get_all_public_props(self) -> dict[str, Any]:
        """Return a snapshot of the properties set with ``private=False``."""
        with self._lock:
            return {k: p.value for k, p in self._props.items() if not p.private}

    def get_run_abort_signal(self) -> Signal:
        """Return the signal that is triggered when the run (or session) is aborted."""
        with self._lock:
            return self._abort_signal

    def set_run_abort_signal(self, signal: Signal) -> None:
        """Replace the run abort signal."""
        with self._lock:
            self._abort_signal = signal

    def get_identity_name(self, default: str = "") -> str:
        """Return the name of the site this context belongs to."""
        name = self.get_prop(_IDENTITY_NAME)
        return name if isinstance(name, str) and name else default

    def set_identity_name(self, name: str) -> None:
        """Set the name of the site this context belongs to."""
        self.set_prop(_IDENTITY_NAME, name, private=False, sticky=True)

    def get_peer_context(self) -> Any:
        """Return the context of the peer this message came from, if any."""
        return self.get_prop(_PEER_CONTEXT)

    def set_peer_context(self, ctx: Any) -> None:
        """Set (or with ``None`` clear) the peer's context."""
        if ctx is None:
            self.remove_prop(_PEER_CONTEXT)
        else:
            self.set_prop(_PEER_CONTEXT, ctx, private=True, sticky=False)

    def get_job_id(self, default: Any = None) -> Any:
        """Return the ``"__job_id__"`` property."""
        return self.get_prop(_JOB_ID, default)

    def get_engine(self, default: Any = None) -> Any:
        """Return the ``"__engine__"`` property: the engine that owns this context."""
        return self.get_prop(_ENGINE, default)

    def __str__(self) -> str:
        return repr(self)

    def __repr__(self) -> str:
        with self._lock:
            keys = sorted(self._props)
        return f"<FLContext identity={self.get_identity_name()!r} props={keys!r}>"
