"""``Accept-Encoding`` as RFC 9110 12.5.3 reads it (red-team finding: ``*, gzip;q=0`` got
gzip, because the first of ``*`` and ``gzip`` decided)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from libertem_jupyter_proxy.compression import accepts_gzip


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("gzip", True),
        ("gzip, deflate, br", True),
        ("br;q=1.0, gzip;q=0.5", True),
        ("*", True),
        ("identity", False),
        ("", False),
        ("gzip;q=0", False),
        ("*, gzip;q=0", False),
        ("gzip;q=0, *", False),
        ("*;q=0, gzip", True),
        ("*;q=0", False),
        ("GZIP;Q=0.1", True),
        ("gzip;q=bogus", False),
    ],
)
def test_known_headers(header, expected):
    assert accepts_gzip(header) is expected


_entries = st.lists(
    st.tuples(
        st.sampled_from(["gzip", "*", "br", "deflate", "identity"]),
        st.sampled_from([None, "0", "0.5", "1"]),
    ),
    max_size=6,
)


def _header(entries) -> str:
    return ", ".join(c if q is None else f"{c};q={q}" for c, q in entries)


@settings(max_examples=300, deadline=None)
@given(_entries, st.randoms())
def test_order_does_not_matter(entries, rnd):
    shuffled = list(entries)
    rnd.shuffle(shuffled)
    assert accepts_gzip(_header(entries)) == accepts_gzip(_header(shuffled))


@settings(max_examples=300, deadline=None)
@given(_entries)
def test_an_explicit_gzip_entry_decides_alone(entries):
    others = [(c, q) for c, q in entries if c != "gzip"]
    assert accepts_gzip(_header([*others, ("gzip", "0")])) is False
    assert accepts_gzip(_header([("gzip", "0.5"), *others])) is True
