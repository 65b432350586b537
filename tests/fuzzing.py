"""Byte mutations for the readers' property tests (test_fuzz_readers, test_quant_read_fuzz):
one strategy and one way of applying it, so that every format is corrupted the same ways."""

from __future__ import annotations

from hypothesis import strategies as st

MUTATION = st.one_of(
    st.tuples(st.just("flip"), st.integers(min_value=0), st.integers(0, 7)),
    st.tuples(st.just("set"), st.integers(min_value=0), st.integers(0, 255)),
    st.tuples(st.just("insert"), st.integers(min_value=0), st.binary(min_size=1, max_size=8)),
    st.tuples(st.just("delete"), st.integers(min_value=0), st.integers(1, 8)),
    st.tuples(st.just("truncate"), st.integers(min_value=0), st.just(0)),
)


def mutate(data: bytes, mutations, within: int | None = None) -> bytes:
    """``data`` with each mutation applied in turn (bit flips, overwrites, insertions,
    deletions, truncation); ``within``: kept in the first that many bytes (a header, where a
    reader's rules are)."""
    buf = bytearray(data)
    for kind, pos, value in mutations:
        if not buf:
            break
        at = pos % (min(len(buf), within) if within else len(buf))
        if kind == "flip":
            buf[at] ^= 1 << value
        elif kind == "set":
            buf[at] = value
        elif kind == "insert":
            buf[at:at] = value
        elif kind == "delete":
            del buf[at:at + value]
        else:
            del buf[at:]
    return bytes(buf)
