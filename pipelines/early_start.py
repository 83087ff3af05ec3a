"""Start an iteration early: fetch the first item of an iterable in a background thread now, take it (and the
rest) later. The worker loop uses it to let Ray Data start the next epoch's execution while the model is
evaluated, so the next epoch does not begin by waiting for its first batch."""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class EarlyStart(Generic[T]):
    """``items`` whose first element is being fetched in a daemon thread from construction on.

    Iterating waits for that element (re-raising, on the iterating thread, any error the fetch raised), yields
    it, then continues the same iterator. Iterate it once. The fetch holds no lock the caller could need: only
    this object touches the iterator until the caller iterates.
    """

    def __init__(self, items: Iterable[T], name: str = "early-start") -> None:
        self._iterator = iter(items)
        self._first: list[T] = []
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._fetch_first, name=name, daemon=True)
        self._thread.start()

    def _fetch_first(self) -> None:
        try:
            self._first.append(next(self._iterator))
        except StopIteration:
            pass
        except BaseException as error:
            self._error = error

    def __iter__(self) -> Iterator[T]:
        self._thread.join()
        if self._error is not None:
            raise self._error
        yield from self._first
        yield from self._iterator
