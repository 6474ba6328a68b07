"""How much of the operator storage reading may hold: read slots and bounded caches.

A storage read holds one of the operator's storage threads until its request
ends (connect 5 s, read 10 s: a store that never answers keeps the thread that
long, whoever stopped waiting). `ReadSlots` admits a read only while its
namespace, its store and the operator as a whole each have a slot free; a read
that is not admitted is not started (the next poll tries again), so no read
ever waits for a thread and no reconcile ever waits for a read. A namespace
that names many endpoints, each never answering, holds at most
`per_namespace` threads, whatever it names.

`LruCache` keeps the storage reader's filesystems (one per store and
credentials) and committed checkpoint manifests: at most `max_entries`, the
least recently used dropped first, and an entry unused for `max_idle_seconds`
dropped too (the filesystems of deleted jobs and namespaces go that way).

Pure: no I/O; the clock is passed in.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping
from typing import Generic, Optional, TypeVar

PER_NAMESPACE_ENV = "KUBETUNE_STORAGE_READS_PER_NAMESPACE"
PER_NAMESPACE = 4  # reads one namespace may have in flight, all its stores together
PER_STORE = 4  # reads one store (endpoint) may have in flight, all namespaces together
THREADS = 32  # the operator's storage threads: reads in flight, all together

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class Ticket:
    """One admitted read's slots; `release` gives them back (once, from any caller)."""

    def __init__(self, slots: ReadSlots, namespace: str, store: str):
        self._slots, self.namespace, self.store = slots, namespace, store
        self._held = True
        self.handed_over = False  # a thread runs the read and releases the ticket when done

    def release(self) -> None:
        with self._slots._lock:
            if not self._held:
                return
            self._held = False
            self._slots._drop(self.namespace, self.store)


class ReadSlots:
    """Admission of storage reads: per namespace, per store and in all."""

    def __init__(
        self, per_namespace: int = PER_NAMESPACE, per_store: int = PER_STORE, total: int = THREADS
    ):
        self.per_namespace, self.per_store, self.total = per_namespace, per_store, total
        self._lock = threading.Lock()
        self._namespaces: dict[str, int] = {}  # only keys with reads in flight: no growth
        self._stores: dict[str, int] = {}
        self._in_flight = 0

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> ReadSlots:
        raw = env.get(PER_NAMESPACE_ENV, "").strip()
        if not raw:
            return cls()
        try:
            n = int(raw)
        except ValueError:
            n = 0
        if not 1 <= n <= THREADS:
            raise ValueError(
                f"{PER_NAMESPACE_ENV}={raw!r}: must be a whole number from 1 to {THREADS} "
                f"(the operator's storage threads); the chart's storage.readsPerNamespace"
            )
        return cls(per_namespace=n)

    def take(self, namespace: str, store: str) -> tuple[Optional[Ticket], str]:
        """A ticket for one read, or (None, why not: which limit is full)."""
        with self._lock:
            if self._namespaces.get(namespace, 0) >= self.per_namespace:
                return None, (
                    f"namespace {namespace} already has {self.per_namespace} storage reads in "
                    f"flight ({PER_NAMESPACE_ENV})"
                )
            if self._stores.get(store, 0) >= self.per_store:
                return None, f"its store already has {self.per_store} reads in flight"
            if self._in_flight >= self.total:
                return None, f"all {self.total} of the operator's storage threads are busy"
            self._namespaces[namespace] = self._namespaces.get(namespace, 0) + 1
            self._stores[store] = self._stores.get(store, 0) + 1
            self._in_flight += 1
            return Ticket(self, namespace, store), ""

    def _drop(self, namespace: str, store: str) -> None:  # under the lock
        for counts, key in ((self._namespaces, namespace), (self._stores, store)):
            counts[key] -= 1
            if not counts[key]:
                del counts[key]
        self._in_flight -= 1

    def in_flight(self, namespace: Optional[str] = None) -> int:
        with self._lock:
            if namespace is None:
                return self._in_flight
            return self._namespaces.get(namespace, 0)

    def __len__(self) -> int:
        """How many namespaces and stores are tracked (only those with reads in flight)."""
        with self._lock:
            return len(self._namespaces) + len(self._stores)


class LruCache(Generic[K, V]):
    """A thread-safe mapping of at most `max_entries`, least recently used out first;
    an entry unused for `max_idle_seconds` is dropped on the next access."""

    def __init__(
        self,
        max_entries: int,
        max_idle_seconds: Optional[float] = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.max_entries, self.max_idle_seconds, self._clock = max_entries, max_idle_seconds, clock
        self._data: OrderedDict[K, tuple[float, V]] = OrderedDict()  # oldest use first
        self._lock = threading.Lock()

    def _expire(self, now: float) -> None:  # under the lock
        if self.max_idle_seconds is None:
            return
        while self._data:
            key, (used, _) = next(iter(self._data.items()))
            if now - used <= self.max_idle_seconds:
                return
            del self._data[key]

    def get(self, key: K) -> Optional[V]:
        with self._lock:
            now = self._clock()
            self._expire(now)
            item = self._data.get(key)
            if item is None:
                return None
            self._data[key] = (now, item[1])
            self._data.move_to_end(key)
            return item[1]

    def put(self, key: K, value: V) -> None:
        with self._lock:
            now = self._clock()
            self._expire(now)
            self._data[key] = (now, value)
            self._data.move_to_end(key)
            while len(self._data) > self.max_entries:
                self._data.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._data

    def __len__(self) -> int:
        with self._lock:
            return len(self._data)
