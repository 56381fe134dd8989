"""api.byte_ranges.parse: a Range header as RFC 9110 reads it, on hand-worked lengths."""
from __future__ import annotations

import pytest

from api.byte_ranges import Unsatisfiable, parse


@pytest.mark.parametrize(("header", "size", "wanted"), [
    ("bytes=0-9", 100, (0, 9)),
    ("bytes=10-", 100, (10, 99)),
    ("bytes=-10", 100, (90, 99)),
    ("bytes=-1000", 100, (0, 99)),  # a suffix longer than the body: all of it
    ("bytes=90-1000", 100, (90, 99)),  # a last byte past the end: up to the end
    ("bytes=99-99", 100, (99, 99)),
    ("bytes=0-0", 1, (0, 0)),
    (" bytes = 5 - 6 ", 100, (5, 6)),
])
def test_a_single_range_is_its_first_and_last_byte(header, size, wanted):
    assert parse(header, size) == wanted


@pytest.mark.parametrize("header", [
    None, "", "bytes=0-1,5-6",  # several ranges: the whole body
    "items=0-9", "bytes=", "bytes=-", "bytes=a-b", "bytes=9-5", "0-9", "bytes=1-2-3",
])
def test_a_header_not_taken_asks_for_the_whole_body(header):
    assert parse(header, 100) is None


@pytest.mark.parametrize(("header", "size"), [
    ("bytes=100-", 100), ("bytes=100-200", 100), ("bytes=-0", 100), ("bytes=0-", 0), ("bytes=-5", 0),
])
def test_a_range_past_the_end_is_unsatisfiable(header, size):
    with pytest.raises(Unsatisfiable) as err:
        parse(header, size)
    assert err.value.size == size
