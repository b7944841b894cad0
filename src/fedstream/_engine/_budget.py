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

The budget is sans-io and synchronous: it never awaits and never sends;
sessions pass a callback that re-runs their credit grant.
"""

from __future__ import annotations

import collections
from collections.abc import Callable

__all__ = ["ObjectHolds", "ReceiveBudget", "Ticket"]


class Ticket:
    """One object's claim on a :class:`ReceiveBudget`."""

    __slots__ = ("admitted", "holds", "size")

    def __init__(self, size: int, holds: ObjectHolds) -> None:
        self.size = size
        self.holds = holds
        #: True once the object counts against the budget (its session may grant credit).
        self.admitted = False


class ReceiveBudget:
    """Bytes of received objects held for one connection, against ``limit``.

    Attributes:
        limit: the budget in bytes (``max_receive_buffer_per_peer``).
        held: announced bytes of the admitted objects not yet taken or dropped.
        peak: the largest ``held`` so far.
        waits: objects that had to wait for admission so far.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0
        self.peak = 0
        self.waits = 0
        # Insertion-ordered, with O(1) removal of a ticket from the middle.
        self._waiting: collections.OrderedDict[Ticket, None] = collections.OrderedDict()

    @property
    def waiting(self) -> int:
        """Objects waiting for admission."""
        return len(self._waiting)

    def open(self, size: int, holds: ObjectHolds) -> Ticket:
        """A new object of ``size`` bytes: admitted now if it fits, else queued."""
        ticket = Ticket(size, holds)
        held = self.held
        if not self._waiting and (held == 0 or held + size <= self.limit):
            ticket.admitted = True
            self.held = held = held + size
            if held > self.peak:
                self.peak = held
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
        else:
            del self._waiting[ticket]
        if admit and self._waiting:
            self.admit_waiting()

    def admit_waiting(self) -> None:
        """Admit waiting objects, oldest first, while the oldest fits."""
        waiting = self._waiting
        while waiting:
            ticket = next(iter(waiting))
            if self.held and self.held + ticket.size > self.limit:
                return
            del waiting[ticket]
            ticket.admitted = True
            self.held += ticket.size
            self.peak = max(self.peak, self.held)
            ticket.holds.admitted(ticket)


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
