"""Coalesced messages have a byte cap: calls are cut in order, a call larger than the cap goes alone."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from app.submit import Call, chunks
from tasks.contract import Tensor


def call(n: int, size: int) -> Call:
    return Call(str(n), "k", "m", "1", [Tensor("x", "UINT8", (1, size), bytes(size))], 0.0, 32)


@given(st.lists(st.integers(0, 3000), max_size=40), st.integers(1, 2000))
def test_chunks_keep_order_and_respect_the_cap(sizes: list[int], cap: int) -> None:
    calls = [call(i, s) for i, s in enumerate(sizes)]
    cut = chunks(calls, cap)
    assert [c for chunk in cut for c in chunk] == calls
    for chunk in cut:
        assert chunk
        assert sum(c.nbytes for c in chunk) <= cap or len(chunk) == 1
    for first, second in zip(cut, cut[1:], strict=False):  # a cut only where the next call would not fit
        assert sum(c.nbytes for c in first) + second[0].nbytes > cap


def test_small_calls_share_one_message() -> None:
    assert [len(c) for c in chunks([call(i, 100) for i in range(10)], 4 * 1024 * 1024)] == [10]
    assert [len(c) for c in chunks([call(i, 100) for i in range(10)], 250)] == [2, 2, 2, 2, 2]
