"""The library's in-process memos: named, bounded, listed in one place.

Exporting one model at several precisions (or a study exporting many cases) repeats deterministic work: tracing a
module of the same structure, optimising the same graph, running the PyTorch reference of the same weights. Each
such result is kept in a :class:`Memo` — a small least-recently-used map with a name and a limit — instead of a
hidden module-level dict. ``MEMOS`` lists every memo of the process; :func:`clear_all` forgets them all (tests, or a
long-lived process that wants its memory back); :func:`forgotten` forgets them for one block only.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

MEMOS: dict[str, Memo] = {}


class Memo:
    """A least-recently-used map of at most ``limit`` entries, registered by ``name`` in :data:`MEMOS`."""

    def __init__(self, name: str, limit: int):
        if limit < 1:
            raise ValueError("a memo keeps at least one entry")
        self.name, self.limit = name, limit
        self._data: OrderedDict[str, Any] = OrderedDict()
        MEMOS[name] = self

    def get(self, key: str) -> Any | None:
        hit = self._data.get(key)
        if hit is not None:
            self._data.move_to_end(key)
        return hit

    def put(self, key: str, value: Any) -> None:
        self._data[key] = value
        self._data.move_to_end(key)
        while len(self._data) > self.limit:
            self._data.popitem(last=False)

    def clear(self) -> None:
        self._data.clear()

    def __len__(self) -> int:
        return len(self._data)


def clear_all() -> None:
    """Forget every memo's entries (the next export traces, optimises and runs its reference from scratch)."""
    for memo in MEMOS.values():
        memo.clear()


@contextmanager
def forgotten() -> Iterator[None]:
    """Every memo empty inside the block (as in a fresh process) and its entries back after it, so that the rest of
    the process keeps what it had already traced and computed."""
    kept = {name: memo._data.copy() for name, memo in MEMOS.items()}
    clear_all()
    try:
        yield
    finally:
        for name, memo in MEMOS.items():
            memo.clear()
            memo._data.update(kept.get(name, {}))
