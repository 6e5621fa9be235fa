"""A registry of live things to stop at interpreter exit (servers, sandbox workers, containers).

`LiveRegistry(stop)` holds what is running; `add` registers one `atexit` hook the first time
anything is added (never at import), `discard` forgets a thing that was stopped cleanly, and
`stop_all` (the hook) calls `stop` on everything still held, newest first. A failing `stop` is
logged and the others still run. Thread safe.

1. `weak=True` holds weak references, so a thing dropped without being stopped is forgotten (its
   own finaliser cleans up); `weak=False` keeps it alive until it is stopped or the process exits.
"""

from __future__ import annotations

import atexit
import logging
import threading
import weakref
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

T = TypeVar("T")

logger = logging.getLogger(__name__)


class LiveRegistry(Generic[T]):
    """The live things of one kind and how to stop one; stops them all at interpreter exit."""

    def __init__(self, name: str, stop: Callable[[T], Any], *, weak: bool = True) -> None:
        self.name = name
        self._stop = stop
        self._weak = weak
        self._items: dict[int, Any] = {}  # id -> the thing (or a weak reference to it), in order added
        self._lock = threading.Lock()
        self._hooked = False

    def add(self, item: T) -> None:
        """Hold `item` until `discard` or exit; the first `add` registers the exit hook."""
        key = id(item)
        ref: Any = weakref.ref(item) if self._weak else item
        with self._lock:
            self._items.pop(key, None)
            self._items[key] = ref
            if not self._hooked:
                atexit.register(self.stop_all)
                self._hooked = True

    def discard(self, item: T) -> None:
        """Forget `item` (stopped, or never started); no error when it is not held."""
        with self._lock:
            held = self._items.get(id(item))
            if held is not None and self._deref(held) is item:
                del self._items[id(item)]

    def items(self) -> list[T]:
        """What is held now, oldest first (weak references that died are dropped here)."""
        with self._lock:
            pairs = [(k, self._deref(v)) for k, v in list(self._items.items())]
            for k, x in pairs:
                if x is None:
                    del self._items[k]
        return [x for _, x in pairs if x is not None]

    def __iter__(self) -> Iterator[T]:
        return iter(self.items())

    def __len__(self) -> int:
        return len(self.items())

    def __bool__(self) -> bool:
        return len(self) > 0

    def __contains__(self, item: object) -> bool:
        return any(x is item for x in self.items())

    @property
    def hooked(self) -> bool:
        """Whether the exit hook is registered (it is from the first `add` on)."""
        return self._hooked

    def stop_all(self) -> None:
        """Stop everything held, newest first; a thing whose `stop` fails is logged and dropped."""
        for item in reversed(self.items()):
            try:
                self._stop(item)
            except Exception:  # noqa: BLE001 - one failure must not keep the others running
                logger.warning("could not stop %s %r at exit", self.name, item, exc_info=True)
            self.discard(item)

    def _deref(self, held: Any) -> T | None:
        return held() if self._weak else held


__all__ = ["LiveRegistry"]
