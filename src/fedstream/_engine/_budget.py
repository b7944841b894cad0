"""The receive budget: bytes of objects one peer can make this site hold.

Every object a peer starts on one of its streams counts against its
connection's budget by its announced size, from its first DATA frame until
its consumer takes it (``consume`` is called) or its session drops it.
An object is *admitted* when it fits in what is left of the budget, or when
nothing at all is held: so one object larger than the whole budget still goes
through, alone, and an object that is the only one holding budget always
completes. Admission is first come, first served: while one object waits,
later ones wait behind it even if they would fit, so a large object is never
starved by a flow of small ones.

A session whose newest object is not admitted grants no credit; its sender
stalls once its window is used up. That is the backpressure: what a waiting
stream can still send is bounded by the credit it already had (one window at
most). The grants it withheld go out as soon as its object is admitted, or
as soon as nothing of that session waits any more (a small object that
arrived whole within the window and was consumed while waiting).

Credit was granted before the object was announced, so it cannot be taken
back: a peer with many streams could make a site hold one window of bytes
per waiting stream (4,096 x 32 MiB at the defaults). Those *early* bytes
(what arrived for objects not admitted yet and not taken by their consumer)
are bounded on their own, by as much again as the budget: per connection
(:attr:`ReceiveBudget.early_limit`) and site-wide. A session whose early
bytes would pass either bound is refused (``SERVICE_UNAVAILABLE``) and its
bytes dropped. A fedstream sender sends at most a credit step and a frame
of an object before a grant shows it was admitted (``TargetLink._room``),
so stop-and-wait streams hold at most that much each and reach these
bounds only by the hundreds; a pipelined stream also sends the objects
behind a waiting one that each fit in that much, up to its window
(docs/semantics.md gives the numbers). A peer that spends whole windows
on purpose reaches the bounds first.

The budget is sans-io and synchronous: it never awaits and never sends;
sessions pass a callback that re-runs their credit grant.
"""

from __future__ import annotations

import collections
from collections.abc import Callable

from .._ratelimit import RateLimit

__all__ = ["ObjectHolds", "ReceiveBudget", "SiteBudget", "Ticket"]


class Ticket:
    """One object's claim on a :class:`ReceiveBudget`."""

    __slots__ = ("admitted", "early", "holds", "size")

    def __init__(self, size: int, holds: ObjectHolds) -> None:
        self.size = size
        self.holds = holds
        #: True once the object counts against the budget (its session may grant credit).
        self.admitted = False
        #: Bytes of the object that arrived before it was admitted.
        self.early = 0


class SiteBudget:
    """Bytes of received objects held for all the connections of a site.

    Site names cost nothing, so a per-peer budget alone does not bound a
    site. An object is admitted only when it fits both its connection's
    budget and this one (or when nothing at all is held site-wide: one larger
    object still goes through, alone). Connections whose oldest waiting
    object does not fit here queue up, first come first served, and are
    woken in that order as room frees.

    Attributes:
        limit: the budget in bytes (``max_receive_buffer``).
        held: announced bytes of admitted objects, all connections together.
        peak: the largest ``held`` so far.
        early: bytes that arrived for objects not admitted yet, all connections.
        early_limit: the bound on ``early`` (``limit``).
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0
        self.peak = 0
        self.early = 0
        self.early_limit = limit
        self._blocked: collections.OrderedDict[ReceiveBudget, None] = collections.OrderedDict()

    def fits(self, size: int, budget: ReceiveBudget) -> bool:
        if self._blocked and next(iter(self._blocked)) is not budget:
            return False  # others were waiting first
        return self.held == 0 or self.held + size <= self.limit

    def add(self, size: int) -> None:
        self.held += size
        if self.held > self.peak:
            self.peak = self.held

    def block(self, budget: ReceiveBudget) -> None:
        self._blocked[budget] = None

    def unblock(self, budget: ReceiveBudget) -> None:
        self._blocked.pop(budget, None)

    def wake(self) -> None:
        """Room freed: let blocked connections admit, oldest first."""
        while self._blocked:
            budget = next(iter(self._blocked))
            budget.admit_waiting(wake_site=False)
            if budget in self._blocked:
                return  # its object still does not fit: the others wait behind it


class ReceiveBudget:
    """Bytes of received objects held for one connection, against ``limit``.

    Attributes:
        limit: the budget in bytes (``max_receive_buffer_per_peer``).
        site: the site-wide budget every admission must fit too, if any.
        held: announced bytes of the admitted objects not yet taken or dropped.
        peak: the largest ``held`` so far.
        waits: objects that had to wait for admission so far.
        early: bytes that arrived for objects not admitted yet.
        early_limit: the bound on ``early`` (``limit``).
        refused: sessions refused for passing ``early_limit`` (or the site's).
    """

    def __init__(self, limit: int, site: SiteBudget | None = None) -> None:
        self.limit = limit
        self.site = site
        self.held = 0
        self.peak = 0
        self.waits = 0
        self.early = 0
        self.early_limit = limit
        self.refused = 0
        #: One warning a minute about refused sessions (a peer decides how many).
        self.refusal_log = RateLimit(60.0)
        # Insertion-ordered, with O(1) removal of a ticket from the middle.
        self._waiting: collections.OrderedDict[Ticket, None] = collections.OrderedDict()

    def _fits(self, size: int) -> bool:
        held = self.held
        site = self.site
        if held and held + size > self.limit:
            if site is not None:
                site.unblock(self)  # waiting on its own budget, not the site's
            return False
        if site is not None and not site.fits(size, self):
            site.block(self)
            return False
        return True

    def _admit(self, ticket: Ticket) -> None:
        ticket.admitted = True
        self.held += ticket.size
        if self.held > self.peak:
            self.peak = self.held
        if self.site is not None:
            self.site.add(ticket.size)
        self._forget_early(ticket)

    def _forget_early(self, ticket: Ticket) -> None:
        """The ticket's early bytes are now counted by its size, or dropped."""
        if ticket.early:
            self.early -= ticket.early
            if self.site is not None:
                self.site.early -= ticket.early
            ticket.early = 0

    def hold_early(self, ticket: Ticket, nbytes: int) -> bool:
        """``nbytes`` more arrived for the waiting object of ``ticket``.

        Returns False, counting nothing, if they would pass this
        connection's or the site's bound on early bytes: the caller refuses
        the session.
        """
        site = self.site
        if self.early + nbytes > self.early_limit or (
            site is not None and site.early + nbytes > site.early_limit
        ):
            self.refused += 1
            return False
        ticket.early += nbytes
        self.early += nbytes
        if site is not None:
            site.early += nbytes
        return True

    @property
    def waiting(self) -> int:
        """Objects waiting for admission."""
        return len(self._waiting)

    def open(self, size: int, holds: ObjectHolds) -> Ticket:
        """A new object of ``size`` bytes: admitted now if it fits, else queued."""
        ticket = Ticket(size, holds)
        if not self._waiting and self._fits(size):
            self._admit(ticket)
        else:
            self._waiting[ticket] = None
            self.waits += 1
        return ticket

    def close(self, ticket: Ticket, *, admit: bool = True) -> None:
        """The object was taken or dropped: free its bytes (or its place in the queue).

        With ``admit=False`` no waiting object is admitted yet: the caller
        closes several tickets and then calls :meth:`admit_waiting` once.
        """
        if ticket.admitted:
            self.held -= ticket.size
            if self.site is not None:
                self.site.held -= ticket.size
        else:
            del self._waiting[ticket]
            self._forget_early(ticket)
        if admit:
            self.admit_waiting()

    def admit_waiting(self, *, wake_site: bool = True) -> None:
        """Admit waiting objects, oldest first, while the oldest fits (then
        let other connections use whatever room is left site-wide)."""
        waiting = self._waiting
        while waiting:
            ticket = next(iter(waiting))
            if not self._fits(ticket.size):
                break
            del waiting[ticket]
            self._admit(ticket)
            ticket.holds.admitted(ticket)
        site = self.site
        if site is not None:
            if not waiting:
                site.unblock(self)
            if wake_site:
                site.wake()


class ObjectHolds:
    """One receiving session's objects in its connection's budget, oldest first.

    ``resume`` is called (synchronously) whenever the session stops having an
    object that waits for admission, so it can send the credit it withheld.
    Objects larger than ``max_size`` are refused by the session and never
    counted.
    """

    __slots__ = ("_budget", "_max_size", "_resume", "_tickets")

    def __init__(self, budget: ReceiveBudget, max_size: int, resume: Callable[[], object]) -> None:
        self._budget = budget
        self._max_size = max_size
        self._resume = resume
        self._tickets: collections.deque[Ticket] = collections.deque()

    @property
    def withholding(self) -> bool:
        """True while the session's newest object waits: it must not grant credit."""
        tickets = self._tickets
        return bool(tickets) and not tickets[-1].admitted

    def add(self, size: int) -> bool:
        """The first DATA frame of a new object of ``size`` bytes arrived.

        Returns whether the object is admitted (an object over ``max_size``,
        which the session refuses, counts as admitted: it is never held).
        """
        if size > self._max_size:
            return True
        ticket = self._budget.open(size, self)
        self._tickets.append(ticket)
        return ticket.admitted

    def hold_early(self, nbytes: int) -> bool:
        """``nbytes`` arrived for the newest object; if it waits for admission,
        count them as early bytes. False: they pass the bound, refuse the session."""
        tickets = self._tickets
        if not tickets or tickets[-1].admitted:
            return True
        return self._budget.hold_early(tickets[-1], nbytes)

    def take(self) -> None:
        """The oldest object went to the consumer."""
        if not self._tickets:
            return
        ticket = self._tickets.popleft()
        self._budget.close(ticket)
        if not ticket.admitted and not self._tickets:
            # It arrived whole while waiting and was consumed: nothing of
            # this session waits any more.
            self._resume()

    def release(self) -> None:
        """The session ended: drop every object it still holds."""
        tickets = self._tickets
        self._tickets = collections.deque()
        budget = self._budget
        for ticket in tickets:
            budget.close(ticket, admit=False)
        budget.admit_waiting()

    def admitted(self, ticket: Ticket) -> None:
        """Called by the budget when one of our waiting objects got in."""
        if self._tickets and ticket is self._tickets[-1]:
            self._resume()
