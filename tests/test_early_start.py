"""`pipelines.early_start.EarlyStart`: the first item is fetched before anyone iterates, errors reach the caller."""

from __future__ import annotations

import threading

import pytest

from pipelines.early_start import EarlyStart


def test_the_first_item_is_fetched_before_iterating_and_the_rest_follows() -> None:
    fetched, threads = threading.Event(), []

    def items():
        threads.append(threading.current_thread().name)
        fetched.set()
        yield from range(4)

    started = EarlyStart(items(), name="fetcher")
    assert fetched.wait(timeout=30)  # nobody iterates yet: the background thread asked for the first item
    assert list(started) == [0, 1, 2, 3] and threads == ["fetcher"]


def test_an_error_of_the_fetch_is_raised_where_it_is_iterated_and_empty_is_empty() -> None:
    def broken():
        raise OSError("shard unreadable")
        yield  # pragma: no cover

    with pytest.raises(OSError, match="shard unreadable"):
        list(EarlyStart(broken()))
    assert list(EarlyStart([])) == []
