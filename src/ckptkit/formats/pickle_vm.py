"""A pickle interpreter that builds data and never runs code: the heart of reading .ckpt files.

``pickle.load`` resolves every global a file names by importing it and calls it with arguments
the file chooses; that is how a downloaded checkpoint runs code. This interpreter instead
understands only the opcodes ``torch.save`` emits (protocol 2, plus the protocol-3 bytes
opcodes), keeps a real stack and memo, and resolves globals through an allow-list of
*emulations* (``globals_allowlist``): plain Python functions that build records, never the
object the name points at. Anything else (an unknown global, an opcode torch never writes,
an integer spelt in text, a container used the wrong way) stops the parse with
``UnsafeFileError`` or ``FormatError``: the parse fails closed.

A scan (``findings`` given) reads on past what loading refuses, to name everything a file
would do under ``torch.load``: refused globals become findings, and the opcodes of protocols
4 and 5 (what ``pickle.dumps`` writes by default) are understood, each such file or opcode
itself a finding. Loading never accepts them.

Sizes are bounded: lengths are checked against the bytes left before anything is allocated,
and the memo, the mark depth and container sizes have caps, so a hostile pickle cannot make
the reader allocate more than a small multiple of its own size.
"""

from __future__ import annotations

import reprlib
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import FormatError, UnsafeFileError

MAX_MEMO = 1 << 22
MAX_MARK_DEPTH = 1000
MAX_CONTAINER = 1 << 24
MAX_LONG_BYTES = 64  # integers in checkpoints are ids, sizes and counters, never bigger
MAX_NESTING = 100  # tuples inside tuples: hashing or printing deeper ones recurses in C

_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother = 3, 60, 60


def safe_repr(value: Any) -> str:
    """A short repr of anything a file built, whatever its depth or size."""
    return _REPR.repr(value)


class Emulated:
    """An allowed function a GLOBAL resolved to: ``call`` stands in for it under REDUCE."""

    def __init__(self, qualname: str, call: Callable[[tuple], Any]):
        self.qualname = qualname
        self.call = call

    def __repr__(self) -> str:
        return f"<global {self.qualname}>"


class EmulatedClass(Emulated):
    """An allowed class that NEWOBJ may create (``cls.__new__(cls, *args)``, as protocol 2
    writes any object without a reduce function of its own): ``call`` gets NEWOBJ's
    arguments and returns a ``Buildable`` record, which the BUILD that follows fills in."""


class Buildable:
    """Base of emulated objects that accept the BUILD opcode (state set after creation)."""

    def build(self, state: Any) -> None:  # pragma: no cover - interface
        raise NotImplementedError


class PickledDict(dict, Buildable):
    """An OrderedDict from the file; BUILD state (a state dict's ``_metadata``) is kept apart."""

    state: Any = None

    def build(self, state: Any) -> None:
        self.state = state


@dataclass(frozen=True)
class Finding:
    """Something a pickle asks for that a data-only reader refuses, and where it asked."""

    kind: str  # "global", "call" or (a scan only) "structure": a protocol or opcode
    name: str  # the dotted name of the global, or what the structure is
    where: str  # which pickle ("data.pkl")
    offset: int  # byte offset of the opcode in that pickle
    why: str

    def __str__(self) -> str:
        return f"{self.kind} {self.name} at {self.where} byte {self.offset}: {self.why}"


class RefusedGlobals(UnsafeFileError):
    """A pickle parsed to the end with refused globals recorded as ``Finding``s."""


class Refused:
    """Stands on the stack for a refused global (and anything made by calling it) when the
    interpreter collects findings instead of stopping at the first, as ``ckpt scan`` does."""

    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return f"<refused {self.name}>"


_WHY = [
    (("os", "posix", "nt", "subprocess", "pty", "commands", "popen2", "platform"),
     "runs programs or shell commands"),
    (("builtins", "__builtin__"), "evaluates code or reaches any object (eval, exec, "
     "getattr, __import__, open)"),
    (("importlib", "pkgutil", "runpy", "imp", "zipimport", "code", "codeop"),
     "imports or runs arbitrary modules"),
    (("operator", "functools", "itertools", "copyreg", "copy_reg"),
     "calls a function or looks up an attribute chosen by the file (an indirection to "
     "anything)"),
    (("pickle", "_pickle", "cPickle", "marshal", "types", "dill", "cloudpickle", "joblib",
      "torch.serialization", "torch.storage", "numpy.lib.npyio", "numpy", "torch.jit",
      "torch._C"), "loads a nested pickle, a code object or a scripted module"),
    (("socket", "http", "urllib", "urllib2", "requests", "webbrowser", "ftplib", "smtplib",
      "ssl", "asyncio"), "opens network connections or runs an event loop"),
    (("shutil", "tempfile", "glob", "pathlib", "io", "sys"), "touches files or the interpreter"),
]


def why_refused(module: str) -> str:
    """Why naming ``module`` in a checkpoint is dangerous, in words for a scan report."""
    root = module.split(".")[0]
    for modules, why in _WHY:
        if module in modules or root in modules:
            return why
    return "not a data type a checkpoint needs; loading the file would import and call it"


class _Mark:
    __slots__ = ()


_MARK = _Mark()


class PickleVM:
    """Runs one pickle from ``data[start:]``; ``run`` returns the object and the end offset.

    ``find_global(module, name)`` returns an ``Emulated`` or raises ``UnsafeFileError``;
    ``persistent_load(pid)`` turns a BINPERSID record into a storage handle.
    ``where`` names the pickle in error messages (``"data.pkl"``). With a ``findings``
    list, refused globals are recorded there and parsing goes on with a ``Refused`` stand-in,
    so that a scan reports every one; the caller then refuses the file as a whole.
    """

    def __init__(self, data: bytes | memoryview, start: int, *,
                 find_global: Callable[[str, str], Any],
                 persistent_load: Callable[[Any], Any] | None,
                 where: str, findings: list[Finding] | None = None):
        self.data = memoryview(data)
        self.pos = start
        self.find_global = find_global
        self.persistent_load = persistent_load
        self.where = where
        self.stack: list[Any] = []
        self.marks: list[list[Any]] = []
        self.memo: dict[int, Any] = {}
        self.op_pos = start
        self.findings = findings
        self._beyond_torch = False  # a scan has noted protocol 4 or 5 (see op_proto)
        # Nesting depth of every tuple and frozenset built (they are immutable, so the depth
        # at creation is final); the objects are kept so that their ids stay theirs.
        self._depth: dict[int, tuple[Any, int]] = {}

    # -- byte access -------------------------------------------------------------------

    def _fail(self, message: str, unsafe: bool = False) -> None:
        cls = UnsafeFileError if unsafe else FormatError
        raise cls(f"{self.where}: {message} (at byte {self.op_pos})")

    def _take(self, n: int) -> memoryview:
        end = self.pos + n
        if n < 0 or end > len(self.data):
            self._fail("pickle ends in the middle of an opcode (file truncated or corrupt)")
        chunk = self.data[self.pos:end]
        self.pos = end
        return chunk

    def _u8(self) -> int:
        return self._take(1)[0]

    def _unpack(self, fmt: str, size: int) -> Any:
        return struct.unpack(fmt, self._take(size))[0]

    def _line(self) -> str:
        window = bytes(self.data[self.pos:self.pos + 256])
        end = window.find(b"\n")
        if end < 0 and len(window) < 256:
            self._fail("pickle ends inside a GLOBAL name (file truncated)")
        if end < 0:
            self._fail("GLOBAL name is not terminated within 256 bytes", unsafe=True)
        raw = bytes(self._take(end + 1)[:-1])
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            self._fail("GLOBAL name is not valid UTF-8", unsafe=True)
            raise  # unreachable: _fail raises

    # -- stack helpers -----------------------------------------------------------------

    def _pop(self) -> Any:
        if not self.stack:
            self._fail("pickle pops from an empty stack")
        return self.stack.pop()

    def _pop_mark(self) -> list[Any]:
        if not self.marks:
            self._fail("pickle closes a MARK that was never opened")
        items = self.stack
        self.stack = self.marks.pop()
        if len(items) > MAX_CONTAINER:
            self._fail(f"a container holds more than {MAX_CONTAINER} items")
        return items

    def _top(self, expected: type, opname: str) -> Any:
        if not self.stack:
            self._fail(f"{opname} with an empty stack")
        target = self.stack[-1]
        if not isinstance(target, expected):
            self._fail(f"{opname} applied to a {type(target).__name__}, not a "
                       f"{expected.__name__} (a known scanner bypass)", unsafe=True)
        return target

    def _memo_put(self, index: int) -> None:
        if not self.stack:
            self._fail("memo store with an empty stack")
        if index not in self.memo and len(self.memo) >= MAX_MEMO:
            self._fail(f"pickle memo grows beyond {MAX_MEMO} entries")
        self.memo[index] = self.stack[-1]

    def _memo_get(self, index: int) -> None:
        if index not in self.memo:
            self._fail(f"pickle reads memo slot {index} that was never written")
        self.stack.append(self.memo[index])

    def _string(self, n: int) -> str:
        try:
            return str(self._take(n), "utf-8")
        except UnicodeDecodeError:
            self._fail("a string in the pickle is not valid UTF-8")
            raise  # unreachable

    def _hashable(self, key: Any) -> Any:
        try:
            hash(key)
        except TypeError:
            self._fail(f"a dict or set key is an unhashable {type(key).__name__}")
        return key

    # -- the interpreter ---------------------------------------------------------------

    def run(self) -> tuple[Any, int]:
        ops = _OPS
        while True:
            self.op_pos = self.pos
            if self.pos >= len(self.data):
                self._fail("pickle ends without a STOP opcode (file truncated)")
            code = self.data[self.pos]
            self.pos += 1
            handler = ops.get(code)
            if handler is None and self.findings is not None:
                handler = _SCAN_OPS.get(code)
                if handler is not None and not self._beyond_torch:
                    self._beyond_torch = True  # said once, with the first such opcode
                    self.findings.append(Finding(
                        "structure", f"opcode {_REFUSED[code]}", self.where, self.op_pos,
                        "torch.save never writes it; torch.load would read it"))
            if handler is None:
                name = _REFUSED.get(code)
                if name:
                    self._fail(f"opcode {name} is refused: torch.save never writes it",
                               unsafe=True)
                self._fail(f"byte 0x{code:02x} is not a pickle opcode torch.save writes",
                           unsafe=True)
            if handler(self):
                break
        if self.marks:
            self._fail("pickle stops with an open MARK")
        if len(self.stack) != 1:
            self._fail(f"pickle stops with {len(self.stack)} objects on the stack, not 1")
        return self.stack[0], self.pos

    # Each handler returns True only for STOP.

    def op_proto(self) -> None:
        version = self._u8()
        if version > 3:
            if self.findings is None or version > 5:
                self._fail(f"pickle protocol {version}: torch.save writes protocol 2",
                           unsafe=True)
            self._beyond_torch = True
            self.findings.append(Finding(
                "structure", f"pickle protocol {version}", self.where, self.op_pos,
                "torch.save writes protocol 2; ckptkit does not load this pickle, but "
                "torch.load would, running every global it names"))

    # -- protocols 4 and 5, read only while collecting findings (``ckpt scan``), so that a
    # scan names the globals of a pickle.dumps file; loading still refuses them (above).

    def op_frame(self) -> None:
        self._unpack("<Q", 8)  # a frame's length: the opcodes inside are read as they come

    def op_short_binunicode(self) -> None:
        self.stack.append(self._string(self._u8()))

    def op_binunicode8(self) -> None:
        self.stack.append(self._string(self._length8()))

    def op_binbytes8(self) -> None:  # and BYTEARRAY8: to a scan, bytes either way
        self.stack.append(bytes(self._take(self._length8())))

    def _length8(self) -> int:
        n = self._unpack("<Q", 8)
        if n > len(self.data) - self.pos:
            self._fail("a length runs past the end of the pickle")
        return n

    def op_memoize(self) -> None:
        self._memo_put(len(self.memo))

    def op_empty_set(self) -> None:
        self.stack.append([])  # a set's items matter to a scan only as what they hold

    def op_additems(self) -> None:
        self._extend("ADDITEMS", "set")  # onto a set's stand-in, a list

    def op_frozenset(self) -> None:
        items = tuple(self._pop_mark())  # before the append: the stack is the outer one now
        self.stack.append(self._nested(items))

    def op_stack_global(self) -> None:
        name = self._pop()
        module = self._pop()
        if not (isinstance(module, str) and isinstance(name, str)):
            self._fail("STACK_GLOBAL names a global with values that are not strings",
                       unsafe=True)
        self._resolve(module, name)

    def op_newobj_ex(self) -> None:
        self._pop()  # keyword arguments
        self.op_newobj()

    def op_stop(self) -> bool:
        return True

    def op_mark(self) -> None:
        if len(self.marks) >= MAX_MARK_DEPTH:
            self._fail(f"pickle nests deeper than {MAX_MARK_DEPTH} levels", unsafe=True)
        self.marks.append(self.stack)
        self.stack = []

    def op_empty_dict(self) -> None:
        self.stack.append({})

    def op_empty_list(self) -> None:
        self.stack.append([])

    def op_empty_tuple(self) -> None:
        self.stack.append(())

    def _nested(self, value: Any) -> Any:
        """Records the depth of a new tuple or frozenset; refuses one nested too deeply."""
        if isinstance(value, (tuple, frozenset)) and value:
            depth = 1 + max(self._depth.get(id(v), (None, 0))[1] for v in value)
            if depth > MAX_NESTING:
                self._fail(f"tuples nest deeper than {MAX_NESTING} levels", unsafe=True)
            self._depth[id(value)] = (value, depth)
        return value

    def op_tuple(self) -> None:
        items = tuple(self._pop_mark())  # before touching self.stack: popping replaces it
        self.stack.append(self._nested(items))

    def _tuple_n(self, n: int) -> None:
        if len(self.stack) < n:
            self._fail(f"TUPLE{n} with fewer than {n} objects on the stack")
        items = tuple(self.stack[-n:])
        del self.stack[-n:]
        self.stack.append(self._nested(items))

    def op_tuple1(self) -> None:
        self._tuple_n(1)

    def op_tuple2(self) -> None:
        self._tuple_n(2)

    def op_tuple3(self) -> None:
        self._tuple_n(3)

    def op_binput(self) -> None:
        self._memo_put(self._u8())

    def op_long_binput(self) -> None:
        self._memo_put(self._unpack("<I", 4))

    def op_binget(self) -> None:
        self._memo_get(self._u8())

    def op_long_binget(self) -> None:
        self._memo_get(self._unpack("<I", 4))

    def op_binint(self) -> None:
        self.stack.append(self._unpack("<i", 4))

    def op_binint1(self) -> None:
        self.stack.append(self._u8())

    def op_binint2(self) -> None:
        self.stack.append(self._unpack("<H", 2))

    def _long(self, n: int) -> None:
        if n > MAX_LONG_BYTES:
            self._fail(f"an integer of {n} bytes is larger than any checkpoint uses")
        self.stack.append(int.from_bytes(self._take(n), "little", signed=True))

    def op_long1(self) -> None:
        self._long(self._u8())

    def op_long4(self) -> None:
        n = self._unpack("<i", 4)
        if n < 0:
            self._fail("LONG4 with a negative length")
        self._long(n)

    def op_binunicode(self) -> None:
        self.stack.append(self._string(self._unpack("<I", 4)))

    def op_binbytes(self) -> None:
        self.stack.append(bytes(self._take(self._unpack("<I", 4))))

    def op_short_binbytes(self) -> None:
        self.stack.append(bytes(self._take(self._u8())))

    def op_none(self) -> None:
        self.stack.append(None)

    def op_newtrue(self) -> None:
        self.stack.append(True)

    def op_newfalse(self) -> None:
        self.stack.append(False)

    def op_binfloat(self) -> None:
        self.stack.append(self._unpack(">d", 8))

    def op_global(self) -> None:
        self._resolve(self._line(), self._line())

    def _resolve(self, module: str, name: str) -> None:
        try:
            self.stack.append(self.find_global(module, name))
        except UnsafeFileError as exc:
            if self.findings is None:
                self._fail(exc.reason, unsafe=True)
            self.findings.append(Finding("global", f"{module}.{name}", self.where, self.op_pos,
                                         why_refused(module)))
            self.stack.append(Refused(f"{module}.{name}"))

    def op_reduce(self) -> None:
        args = self._pop()
        func = self._pop()
        if isinstance(func, Refused):
            self.stack.append(self._refused_call(func))
            return
        if not isinstance(func, Emulated):
            self._fail(f"REDUCE calls {safe_repr(func)}, which is not an allowed function",
                       unsafe=True)
        if not isinstance(args, tuple):
            self._fail(f"REDUCE arguments for {func.qualname} are not a tuple")
        self.stack.append(self._nested(self._emulate(func.qualname, func.call, args)))

    def op_newobj(self) -> None:
        # Only an ``EmulatedClass`` (a few data classes: argparse.Namespace, ParameterDict)
        # is created this way, as a record; any other class is refused, or named by a scan.
        args = self._pop()
        cls = self._pop()
        if isinstance(cls, Refused):
            self.stack.append(self._refused_call(cls))
            return
        if isinstance(cls, EmulatedClass) and isinstance(args, tuple):
            self.stack.append(self._emulate(cls.qualname, cls.call, args))
            return
        self._fail(f"NEWOBJ creates {safe_repr(cls)}, which is not an allowed class",
                   unsafe=True)

    def _refused_call(self, func: Refused) -> Refused:
        assert self.findings is not None  # a Refused exists only when collecting
        self.findings.append(Finding("call", func.name, self.where, self.op_pos,
                                     "the file calls it when loaded"))
        return Refused(f"{func.name}()")

    def _emulate(self, qualname: str, func: Callable[[tuple], Any], args: tuple) -> Any:
        try:
            return func(args)
        except (FormatError, UnsafeFileError) as exc:
            self._fail(f"{qualname}: {exc.reason}", unsafe=isinstance(exc, UnsafeFileError))
        except (TypeError, ValueError, KeyError, IndexError, OverflowError,
                struct.error) as exc:
            self._fail(f"{qualname} called with arguments it cannot take ({exc})")
        raise AssertionError("unreachable")

    def op_build(self) -> None:
        state = self._pop()
        target = self._top(object, "BUILD")
        if isinstance(target, Refused):
            return
        if not isinstance(target, Buildable):
            self._fail(f"BUILD sets the state of {type(target).__name__}, which only code "
                       "could do", unsafe=True)
        target.build(state)

    def op_binpersid(self) -> None:
        pid = self._pop()
        if self.persistent_load is None:
            self._fail("persistent id in a pickle that may not reference storages",
                       unsafe=True)
        try:
            self.stack.append(self.persistent_load(pid))
        except (FormatError, UnsafeFileError) as exc:
            self._fail(exc.reason, unsafe=isinstance(exc, UnsafeFileError))

    def op_setitem(self) -> None:
        value = self._pop()
        key = self._pop()
        target = self._top(dict, "SETITEM")
        target[self._hashable(key)] = value

    def op_setitems(self) -> None:
        items = self._pop_mark()
        target = self._top(dict, "SETITEMS")
        if len(items) % 2:
            self._fail("SETITEMS with an odd number of items")
        for i in range(0, len(items), 2):
            target[self._hashable(items[i])] = items[i + 1]
        if len(target) > MAX_CONTAINER:
            self._fail(f"a dict holds more than {MAX_CONTAINER} items")

    def op_append(self) -> None:
        value = self._pop()
        self._top(list, "APPEND").append(value)

    def op_appends(self) -> None:
        self._extend("APPENDS", "list")

    def _extend(self, opcode: str, kind: str) -> None:
        items = self._pop_mark()
        target = self._top(list, opcode)
        target.extend(items)
        if len(target) > MAX_CONTAINER:
            self._fail(f"a {kind} holds more than {MAX_CONTAINER} items")


_OPS: dict[int, Callable[[PickleVM], Any]] = {
    0x80: PickleVM.op_proto,
    ord("."): PickleVM.op_stop,
    ord("("): PickleVM.op_mark,
    ord("}"): PickleVM.op_empty_dict,
    ord("]"): PickleVM.op_empty_list,
    ord(")"): PickleVM.op_empty_tuple,
    ord("t"): PickleVM.op_tuple,
    0x85: PickleVM.op_tuple1,
    0x86: PickleVM.op_tuple2,
    0x87: PickleVM.op_tuple3,
    ord("q"): PickleVM.op_binput,
    ord("r"): PickleVM.op_long_binput,
    ord("h"): PickleVM.op_binget,
    ord("j"): PickleVM.op_long_binget,
    ord("J"): PickleVM.op_binint,
    ord("K"): PickleVM.op_binint1,
    ord("M"): PickleVM.op_binint2,
    0x8A: PickleVM.op_long1,
    0x8B: PickleVM.op_long4,
    ord("X"): PickleVM.op_binunicode,
    ord("B"): PickleVM.op_binbytes,
    ord("C"): PickleVM.op_short_binbytes,
    ord("N"): PickleVM.op_none,
    0x88: PickleVM.op_newtrue,
    0x89: PickleVM.op_newfalse,
    ord("G"): PickleVM.op_binfloat,
    ord("c"): PickleVM.op_global,
    ord("R"): PickleVM.op_reduce,
    0x81: PickleVM.op_newobj,
    ord("b"): PickleVM.op_build,
    ord("Q"): PickleVM.op_binpersid,
    ord("s"): PickleVM.op_setitem,
    ord("u"): PickleVM.op_setitems,
    ord("a"): PickleVM.op_append,
    ord("e"): PickleVM.op_appends,
}

# Protocol 4 and 5 opcodes, understood only while collecting findings (a scan).
_SCAN_OPS: dict[int, Callable[[PickleVM], Any]] = {
    0x8C: PickleVM.op_short_binunicode,
    0x8D: PickleVM.op_binunicode8,
    0x8E: PickleVM.op_binbytes8,
    0x8F: PickleVM.op_empty_set,
    0x90: PickleVM.op_additems,
    0x91: PickleVM.op_frozenset,
    0x92: PickleVM.op_newobj_ex,
    0x93: PickleVM.op_stack_global,
    0x94: PickleVM.op_memoize,
    0x95: PickleVM.op_frame,
    0x96: PickleVM.op_binbytes8,
}

# Real opcodes that torch.save never writes, named so that the refusal says which one it was.
_REFUSED: dict[int, str] = {
    ord("I"): "INT (integers in text, parsed differently by different readers)",
    ord("L"): "LONG (integers in text, parsed differently by different readers)",
    ord("F"): "FLOAT (text)",
    ord("S"): "STRING (text)",
    ord("V"): "UNICODE (text)",
    ord("T"): "BINSTRING",
    ord("U"): "SHORT_BINSTRING",
    ord("p"): "PUT (text memo index)",
    ord("g"): "GET (text memo index)",
    ord("P"): "PERSID (text persistent id)",
    ord("i"): "INST (creates an instance of any class)",
    ord("o"): "OBJ (creates an instance of any class)",
    ord("0"): "POP",
    ord("1"): "POP_MARK",
    ord("2"): "DUP",
    ord("l"): "LIST",
    ord("d"): "DICT",
    0x82: "EXT1 (extension registry)",
    0x83: "EXT2 (extension registry)",
    0x84: "EXT4 (extension registry)",
    0x8C: "SHORT_BINUNICODE (protocol 4)",
    0x8D: "BINUNICODE8 (protocol 4)",
    0x8E: "BINBYTES8 (protocol 4)",
    0x8F: "EMPTY_SET (protocol 4)",
    0x90: "ADDITEMS (protocol 4)",
    0x91: "FROZENSET (protocol 4)",
    0x92: "NEWOBJ_EX (protocol 4)",
    0x93: "STACK_GLOBAL (protocol 4: a global named by strings computed on the stack)",
    0x94: "MEMOIZE (protocol 4)",
    0x95: "FRAME (protocol 4)",
    0x96: "BYTEARRAY8 (protocol 5)",
    0x97: "NEXT_BUFFER (protocol 5: out-of-band data)",
    0x98: "READONLY_BUFFER (protocol 5)",
}
