"""Differential tests of the restricted pickle interpreter against CPython's own unpickler
and pickletools: on random valid pickles, the same objects; on mutated ones, the same objects
or our refusal, never a different reading (the parser desync that scanners were bypassed by)."""

from __future__ import annotations

import io
import pickle
import pickletools

from helpers import DataOnlyUnpickler, comparable
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ckptkit.errors import CkptError, UnsafeFileError
from ckptkit.formats.pickle_vm import PickleVM
from ckptkit.formats.torch_globals import find_global

_scalars = (st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
            | st.floats(allow_nan=True) | st.text(max_size=20) | st.binary(max_size=20))
_hashable = st.none() | st.booleans() | st.integers() | st.text(max_size=10)
_values = st.recursive(
    _scalars,
    lambda inner: (st.lists(inner, max_size=6) | st.tuples(inner, inner)
                   | st.lists(inner, max_size=5).map(tuple)
                   | st.dictionaries(_hashable, inner, max_size=6)
                   | st.frozensets(_hashable, max_size=4).map(set)),
    max_leaves=30)


def _ours(data: bytes):
    return PickleVM(data, 0, find_global=find_global, persistent_load=None, where="t").run()


def _stop_offset(data: bytes) -> int:
    end = 0
    for op, _arg, pos in pickletools.genops(io.BytesIO(data)):
        end = pos + 1
        if op.name == "STOP":
            break
    return end


@settings(max_examples=300, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(_values)
def test_valid_pickles_read_as_cpython_reads_them(value):
    data = pickle.dumps(value, protocol=2)
    ours, end = _ours(data)
    reference = DataOnlyUnpickler(io.BytesIO(data)).load()
    assert comparable(ours) == comparable(reference)
    assert end == len(data) == _stop_offset(data)


@settings(max_examples=400, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(_values, st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1,
                         max_size=4))
def test_mutated_pickles_read_the_same_or_are_refused(value, edits):
    data = bytearray(pickle.dumps(value, protocol=2))
    for where, byte in edits:
        data[where % len(data)] = byte
    data = bytes(data)
    try:
        ours, end = _ours(data)
    except CkptError:
        return  # refusing is always allowed
    reference_stream = io.BytesIO(data)
    reference = DataOnlyUnpickler(reference_stream).load()  # must not fail where we succeeded
    assert comparable(ours) == comparable(reference)
    assert end == reference_stream.tell()


def test_integer_opcodes_in_text_are_refused_not_reinterpreted():
    # "I0x1\n" is read differently by pickletools and the C unpickler: a desync source.
    for data in (b"I0x1\n.", b"I01\n.", b"L10L\n.", b"I00\n."):
        try:
            _ours(data)
        except UnsafeFileError as exc:
            assert "INT" in str(exc) or "LONG" in str(exc)
        else:
            raise AssertionError(f"{data!r} was accepted")


def test_memo_is_real_not_a_look_back():
    # The global is stored in the memo, the stack is changed, then it is fetched back: an
    # interpreter that looks at the previous opcode instead of the memo misses it.
    data = (b"\x80\x02cposix\nsystem\nq\x000h\x00X\x04\x00\x00\x00trueq\x01\x85R.")
    try:
        _ours(data)
    except UnsafeFileError as exc:
        assert "posix.system" in str(exc) or "POP" in str(exc)
    else:
        raise AssertionError("accepted")


def test_caps_bound_allocation():
    # A BINUNICODE claiming 4 GB in a 20-byte pickle is refused before allocating anything.
    data = b"\x80\x02X\xff\xff\xff\xffabc."
    try:
        _ours(data)
    except CkptError as exc:
        assert "truncated" in str(exc)
    else:
        raise AssertionError("accepted")
    deep = b"\x80\x02" + b"(" * 5000 + b"."
    try:
        _ours(deep)
    except CkptError as exc:
        assert "nests deeper" in str(exc)
    else:
        raise AssertionError("accepted")
