"""Which replica answers a request: pure logic, no I/O.

Every ready replica of a service subscribes to its request topics, so every replica
receives every request. The replicas agree, without talking, on one owner per request:
the ready replica with the highest rendezvous hash of (request key, node id), where the
ready set is the one in the last retained service status the broker delivered
([T-SERVE-1]). The broker delivers the status and the requests to all replicas in the same
order, so all replicas decide alike.

The replicas that do not own a request keep it as a witness until the owner's `done`
notice arrives. When a status no longer lists the owner (its node was lost), each witness
recomputes the owner among the remaining replicas, and exactly one of them serves it
([T-SERVE-2]).
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict, deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")


def request_key(
    topic: str, payload: bytes, correlation: bytes | None, response_topic: str | None
) -> str:
    """The same for every replica that received the message; 24 hex digits."""
    h = hashlib.blake2b(digest_size=12)
    h.update(topic.encode())
    h.update(b"\0")
    h.update(correlation or b"")
    h.update(b"\0")
    h.update((response_topic or "").encode())
    h.update(b"\0")
    h.update(payload)
    return h.hexdigest()


def _score(key: str, node: str) -> bytes:
    return hashlib.blake2b(f"{key}/{node}".encode(), digest_size=8).digest()


Weights = Mapping[str, float]


def owner(key: str, ready: Sequence[str], weights: Weights | None = None) -> str | None:
    """The replica that serves `key` among `ready` (None when none is ready).

    With `weights` (node -> relative capacity, 1.0 when absent) this is weighted rendezvous
    hashing: each node's share of the keys is its weight over the sum of the weights. With
    equal weights it picks the same node as the unweighted hash."""
    if not ready:
        return None
    if not weights:
        return max(ready, key=lambda node: (_score(key, node), node))

    def weighted(node: str) -> tuple[float, str]:
        u = (int.from_bytes(_score(key, node), "big") + 0.5) / 2.0**64  # in (0, 1)
        return (max(weights.get(node, 1.0), 1e-9) / -math.log(u), node)

    return max(ready, key=weighted)


@dataclass
class Witnessed(Generic[T]):
    key: str
    owner: str | None
    deadline: float  # monotonic
    item: T
    size: int


class Witness(Generic[T]):
    """Requests owned by other replicas, kept until they are done or their deadline passes.

    Bounded by count and bytes: the oldest entries go first when it is full (they are the
    ones closest to their deadline).
    """

    def __init__(self, max_items: int = 4096, max_bytes: int = 64 * 1024 * 1024) -> None:
        self.max_items = max_items
        self.max_bytes = max_bytes
        self._entries: OrderedDict[int, Witnessed[T]] = OrderedDict()  # oldest first
        self._by_key: dict[str, deque[int]] = {}  # key -> entry numbers, oldest first
        self._next = 0
        self._bytes = 0
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, entry: Witnessed[T]) -> None:
        n = self._next
        self._next += 1
        self._entries[n] = entry
        self._by_key.setdefault(entry.key, deque()).append(n)
        self._bytes += entry.size
        while len(self._entries) > self.max_items or self._bytes > self.max_bytes:
            self._remove(next(iter(self._entries)))
            self.evicted += 1

    def _remove(self, n: int) -> Witnessed[T]:
        entry = self._entries.pop(n)
        numbers = self._by_key[entry.key]
        numbers.remove(n)
        if not numbers:
            del self._by_key[entry.key]
        self._bytes -= entry.size
        return entry

    def done(self, keys: Iterable[str]) -> None:
        """The owner answered these (one entry per key listed, the oldest)."""
        for key in keys:
            numbers = self._by_key.get(key)
            if numbers:
                self._remove(numbers[0])

    def expire(self, now: float) -> list[Witnessed[T]]:
        """Drop and return entries past their deadline."""
        late = [n for n, e in self._entries.items() if e.deadline <= now]
        return [self._remove(n) for n in late]

    def rehome(
        self, ready: Sequence[str], listed: Sequence[str], weights: Weights | None = None
    ) -> None:
        """Keep every entry, but give those whose owner is no longer listed a new owner
        among the ready replicas (else the listed ones), or drop them when there is none."""
        alive = set(listed)
        for n, e in list(self._entries.items()):
            if e.owner is not None and e.owner not in alive:
                e.owner = owner(e.key, ready, weights) or owner(e.key, listed)
                if e.owner is None:
                    self._remove(n)

    def reassign(
        self,
        ready: Sequence[str],
        listed: Sequence[str],
        me: str,
        weights: Weights | None = None,
    ) -> list[Witnessed[T]]:
        """A new status: entries whose owner is no longer listed at all (its node was lost
        or given up on) get a new owner among the ready replicas, or, with none ready, among
        the listed ones (which answer 'unavailable'). Return (and drop) those now ours.

        An owner still listed but no longer ready (being redeployed or removed) keeps its
        requests: it answers what it has queued before it stops. Entries that came while
        no replica was ready (owner None) are dropped: the coordinator answered those."""
        mine: list[Witnessed[T]] = []
        alive = set(listed)
        for n, e in list(self._entries.items()):
            if e.owner is None:
                self._remove(n)
                continue
            if e.owner not in alive:
                e.owner = owner(e.key, ready, weights) or owner(e.key, listed)
            if e.owner == me:
                mine.append(self._remove(n))
            elif e.owner is None:
                self._remove(n)
        return mine
