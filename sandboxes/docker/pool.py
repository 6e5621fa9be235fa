"""The warm pool of the `docker` backend: ready containers per (stateless, container limits).

Two containers are interchangeable when their sessions are both stateless or both not, and the
limits fixed when a container starts are equal (`Key`); `timeout_s` and `cpu_s` travel with each
call instead. Taking a container tops the pool up again in the background.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

from ..base import SandboxLimits
from .channel import Box

#: Limits fixed when a container starts; `timeout_s` and `cpu_s` travel with each call instead.
CONTAINER_LIMITS = ("memory_mb", "max_processes", "max_open_files", "max_file_size_mb", "max_output_bytes", "disk_mb")


@dataclass(frozen=True)
class Key:
    """What makes two containers interchangeable in the warm pool."""

    stateless: bool
    limits: tuple[tuple[str, Any], ...]

    @staticmethod
    def of(stateless: bool, limits: SandboxLimits) -> Key:
        fields = asdict(limits)
        return Key(stateless, tuple((k, fields[k]) for k in CONTAINER_LIMITS if k in fields))

    def limits_obj(self) -> SandboxLimits:
        return SandboxLimits(**dict(self.limits))


class Pool:
    """Ready containers per `Key`, kept at `size` each by `start` calls on an executor.

    `discard` removes a container the pool will not hand out (it died while waiting, or it became
    ready after `close`). The pool refills only while open (`open(executor)` until `close()`).
    """

    def __init__(self, size: int, start: Callable[[Key], Box], discard: Callable[[Box], None]) -> None:
        self.size = int(size)
        self._start, self._discard = start, discard
        self._lock = threading.Lock()
        self._boxes: dict[Key, deque[Box]] = {}
        self._starting: dict[Key, int] = {}
        self._executor: ThreadPoolExecutor | None = None

    def open(self, executor: ThreadPoolExecutor) -> None:
        with self._lock:
            self._executor = executor

    def close(self) -> list[Box]:
        """Stop refilling; the containers that were waiting (the caller removes them)."""
        with self._lock:
            self._executor = None
            boxes = [b for queue in self._boxes.values() for b in queue]
            self._boxes.clear()
        return boxes

    def waiting(self, key: Key | None = None) -> list[Box]:
        """The containers ready now (for `key`, or all)."""
        with self._lock:
            queues = [self._boxes.get(key, deque())] if key is not None else list(self._boxes.values())
            return [b for queue in queues for b in queue]

    def pop(self, key: Key) -> Box | None:
        """A ready container whose stream is still open (one that died while waiting is dropped)."""
        while True:
            with self._lock:
                queue = self._boxes.get(key)
                box = queue.popleft() if queue else None
            if box is None or box.alive():
                return box
            self._discard(box)

    def refill(self, key: Key) -> None:
        """Start containers in the background until `key` has `size` ready or starting."""
        with self._lock:
            executor = self._executor
            if executor is None:
                return
            need = self.size - len(self._boxes.get(key, ())) - self._starting.get(key, 0)
            if need <= 0:
                return
            self._starting[key] = self._starting.get(key, 0) + need
        for i in range(need):
            try:
                executor.submit(self._fill_one, key)
            except RuntimeError:  # the executor shut down (backend closed, interpreter exiting)
                with self._lock:
                    self._starting[key] -= need - i
                return

    def fill(self, key: Key, want: int, executor: ThreadPoolExecutor) -> int:
        """Start what `key` lacks of `want` ready containers and wait for them; how many wait now."""
        with self._lock:
            missing = want - len(self._boxes.get(key, ()))
        if missing > 0:
            boxes = list(executor.map(lambda _: self._start(key), range(missing)))
            with self._lock:
                self._boxes.setdefault(key, deque()).extend(boxes)
        with self._lock:
            return len(self._boxes.get(key, ()))

    def _fill_one(self, key: Key) -> None:
        try:
            box = self._start(key)
        except Exception:  # noqa: BLE001 - the next acquire starts a container itself and reports
            return
        finally:
            with self._lock:
                self._starting[key] -= 1
        with self._lock:
            if self._executor is not None:
                self._boxes.setdefault(key, deque()).append(box)
                return
        self._discard(box)
