"""A pickle interpreter that builds data and never runs code: the heart of reading .ckpt files.

``pickle.load`` resolves every global a file names by importing it and calls it with arguments
the file chooses; that is how a downloaded checkpoint runs code. This interpreter instead
understands only the opcodes ``torch.save`` emits (protocol 2, plus the protocol-3 bytes
opcodes), keeps a real stack and memo, and resolves globals through an allow-list of
*emulations* (``globals_allowlist``): plain Python functions that build records, never the
object the name points at. Anything else (an unknown global, an opcode torch never writes,
an integer spelt in text, a container used the wrong way) stops the parse with
``UnsafeFileError`` or ``FormatError``: the parse fails closed.

A scan (``findings`` given) is the same interpreter reading every opcode of every protocol
(0 to 5) as CPython's unpickler reads it, to name everything a file would do under
``torch.load`` or ``pickle.load``. It stops only where ``pickle.load`` stops too (a byte that is
no opcode, a truncated argument, a stack underflow, a name no import can find) or at one of
its own caps, which it records as a ``limit`` finding: what lies beyond was not verified.
Refused globals become findings; what loading would refuse on the way (an opcode torch.save
never writes is a ``structure`` finding; a container used the wrong way, an emulation given
bad arguments) is kept as ``deferred``, the parse going on with a stand-in value, so that no
refusal hides the globals after it. Loading never accepts what a scan reads on through.

Work and memory are bounded: lengths are checked against the bytes left before anything is
allocated; the opcodes run, the objects made, the stack, the memo, the mark depth and the
nesting of tuples have caps; dict keys and set items whose hashes a file can choose (numbers,
tuples) are refused when too many share one hash, so a file cannot make insertion quadratic.
"""

from __future__ import annotations

import codecs
import copyreg
import re
import reprlib
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from ..errors import CkptError, FormatError, UnsafeFileError

MAX_MEMO = 1 << 21
MAX_MARK_DEPTH = 1000
MAX_CONTAINER = 1 << 24
MAX_LONG_BYTES = 64  # integers in checkpoints are ids, sizes and counters, never bigger
MAX_NESTING = 100  # tuples inside tuples: hashing or printing deeper ones recurses in C
# A torch.save pickle runs about 30 opcodes and makes about 9 objects per tensor: these caps
# leave room for some 250,000 tensors, and keep a hostile pickle to a few hundred MB.
MAX_OPS = 1 << 23
MAX_OBJECTS = 1 << 21
MAX_STACK = 1 << 20
MAX_SAME_HASH = 16  # distinct keys of one dict or set with one hash: never in real files
MAX_KEY_WEIGHT = 1 << 12  # items of a tuple used as a key, counted through nested tuples
MAX_NAME_LINE = 1 << 16  # a GLOBAL name longer than this names nothing an import can find
MAX_TEXT = 1 << 20  # longer text lines (and, if asked, strings) are kept as their length
MAX_DIGITS = 5000  # longer integers in text: CPython refuses past 4300 digits by default

_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother = 3, 60, 60


def safe_repr(value: Any) -> str:
    """A short repr of anything a file built, whatever its depth or size."""
    return _REPR.repr(value)


class Emulated:
    """An allowed function a GLOBAL resolved to: ``call`` stands in for it under REDUCE.

    ``keys(args)``, when given, lists what the call will hash (the keys of an OrderedDict, the
    items of a set), so that the interpreter can vet them first as it vets its own dict keys."""

    def __init__(self, qualname: str, call: Callable[[tuple], Any],
                 keys: Callable[[tuple], Iterable[Any]] | None = None):
        self.qualname = qualname
        self.call = call
        self.keys = keys

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

    # "global", "call", "limit" (a cap stopped the scan: what follows is unverified) or
    # "structure" (a protocol or opcode that torch.save never writes)
    kind: str
    name: str  # the dotted name of the global, or what the structure or limit is
    where: str  # which pickle ("data.pkl")
    offset: int  # byte offset of the opcode in that pickle
    why: str

    def __str__(self) -> str:
        return f"{self.kind} {self.name} at {self.where} byte {self.offset}: {self.why}"


# The findings that mean pickle.load or torch.load could run code: a global it would import
# (and maybe call), or a cap past which the scan could not see.
REACHING = frozenset({"global", "call", "limit"})


class RefusedGlobals(UnsafeFileError):
    """A pickle parsed to the end with refused globals recorded as ``Finding``s."""


class Refused:
    """Stands on the stack for a refused global (and anything made by calling it) when the
    interpreter collects findings instead of stopping at the first, as ``ckpt scan`` does."""

    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return f"<refused {self.name}>"


class Unknown:
    """Stands on the stack, in a scan, for a value the interpreter does not compute: what an
    allowed function returns from arguments loading refuses, a string kept as its length."""

    def __init__(self, what: str):
        self.what = what

    def __repr__(self) -> str:
        return f"<{self.what}>"


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
_HASH_CHOSEN_BY_FILE = (str, bytes)  # their hashes are salted per process; others are not


class _Spread:
    """The distinct keys of one dict or set, grouped by hash: refuses the many keys with one
    hash (multiples of 2**61-1 all hash to 0) that would make every insertion walk all the
    others. The container is kept so that its id stays its own."""

    __slots__ = ("container", "groups")

    def __init__(self, container: Any):
        self.container = container
        self.groups: dict[int, list[Any]] = {}

    def admit(self, key: Any) -> bool:
        same = self.groups.setdefault(hash(key), [])
        if any(k is key or k == key for k in same):
            return True
        if len(same) >= MAX_SAME_HASH:
            return False
        same.append(key)
        return True


# Opcodes that make no new object (references, memo, marks, control, shared constants):
# everything else counts against MAX_OBJECTS.
_MAKES_NOTHING = frozenset(b"\x80.\x95(012hjgqrp\x94saeu\x90bN\x88\x89)K")
_STRTOL = re.compile(rb"[ \t\n\v\f\r]*[+-]?(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)")


class PickleVM:
    """Runs one pickle from ``data[start:]``; ``run`` returns the object and the end offset.

    ``find_global(module, name)`` returns an ``Emulated`` or raises ``UnsafeFileError``;
    ``persistent_load(pid)`` turns a BINPERSID record into a storage handle.
    ``where`` names the pickle in error messages (``"data.pkl"``). With a ``findings``
    list, the interpreter scans (see the module's docstring): after ``run``, ``deferred`` holds
    the first error loading would have raised, for the caller to raise once findings are in.
    ``max_text``: strings and bytes longer than this are kept as their length only (an
    ``Unknown``), for reading a file of any size as a pickle without copying it whole.
    """

    def __init__(self, data: bytes | bytearray | memoryview, start: int, *,
                 find_global: Callable[[str, str], Any],
                 persistent_load: Callable[[Any], Any] | None,
                 where: str, findings: list[Finding] | None = None,
                 max_text: int | None = None):
        self.data = memoryview(data)
        self.max_text = max_text
        base = self.data.obj if self.data.nbytes == len(self.data.obj) else bytes(self.data)
        self._find = base.find  # bytes, bytearray and mmap search in C
        self.pos = start
        self.find_global = find_global
        self.persistent_load = persistent_load
        self.where = where
        self.stack: list[Any] = []
        self.marks: list[list[Any]] = []
        self.below = 0  # items on the stack under the marks
        self.memo: dict[int, Any] = {}
        self.op_pos = start
        self.findings = findings
        self.scan = findings is not None
        self.deferred: CkptError | None = None
        self.ops = 0
        self.objects = 0
        # The end of the last FRAME: a file object read without ``peek`` (or a frame larger
        # than its buffer) is left there by pickle.load, not after STOP, when STOP is inside.
        self.frame_end = 0
        self.exhausted = False  # the parse wanted bytes past the end of ``data``
        self._beyond_torch = False  # a scan has noted an opcode torch.save never writes
        # Nesting depth and weight (items, through nested tuples) of every tuple and frozenset
        # built: immutable, so both are final at creation; the objects are kept so that their
        # ids stay theirs.
        self._depth: dict[int, tuple[Any, int, int]] = {}
        self._spreads: dict[int, _Spread] = {}

    # -- failing -----------------------------------------------------------------------

    def _fail(self, message: str, unsafe: bool = False) -> None:
        """Stops the parse (in a scan: only where pickle.load stops too)."""
        cls = UnsafeFileError if unsafe else FormatError
        raise cls(f"{self.where}: {message} (at byte {self.op_pos})")

    def _refuse(self, message: str, unsafe: bool = True) -> None:
        """What loading refuses but pickle.load reads on through: raised when loading; in a
        scan the first is kept as ``deferred`` and the caller goes on with a stand-in."""
        if not self.scan:
            self._fail(message, unsafe)
        if self.deferred is None:
            cls = UnsafeFileError if unsafe else FormatError
            self.deferred = cls(f"{self.where}: {message} (at byte {self.op_pos})")

    def _limit(self, message: str) -> None:
        """A cap of this reader, where pickle.load would go on: the parse stops, and in a scan
        the rest of the pickle is unverified, which is itself a finding."""
        if self.scan:
            assert self.findings is not None
            self.findings.append(Finding(
                "limit", message, self.where, self.op_pos,
                "ckptkit reads no further; torch.load and pickle.load would, so what "
                "follows is not verified"))
        self._fail(f"{message}: refused, as a pickle this reader cannot verify", unsafe=True)

    # -- byte access -------------------------------------------------------------------

    def _take(self, n: int) -> memoryview:
        end = self.pos + n
        if n < 0 or end > len(self.data):
            self.exhausted = n >= 0
            self._fail("pickle ends in the middle of an opcode (file truncated or corrupt)")
        chunk = self.data[self.pos:end]
        self.pos = end
        return chunk

    def _u8(self) -> int:
        return self._take(1)[0]

    def _unpack(self, fmt: str, size: int) -> Any:
        return struct.unpack(fmt, self._take(size))[0]

    def _line(self) -> bytes:
        """A GLOBAL name of loading: the bytes up to the next newline, within 256 bytes."""
        window = bytes(self.data[self.pos:self.pos + 256])
        end = window.find(b"\n")
        if end < 0 and len(window) < 256:
            self._fail("pickle ends inside a GLOBAL name (file truncated)")
        if end < 0:
            self._fail("GLOBAL name is not terminated within 256 bytes", unsafe=True)
        return bytes(self._take(end + 1)[:-1])

    def _text_line(self, cap: int = MAX_TEXT) -> bytes | None:
        """A scan's line of text: the bytes up to the next newline, which is consumed, of any
        length, as pickle reads them; None for one longer than ``cap``, skipped unread."""
        start = self.pos
        end = self._find(b"\n", start)
        if end < 0:
            self.exhausted = True
            self._fail("pickle ends inside a line of text (file truncated)")
        self.pos = end + 1
        return bytes(self.data[start:end]) if end - start <= cap else None

    def _name_line(self, opname: str, encoding: str) -> str:
        if not self.scan:
            raw = self._line()
        else:
            raw = self._text_line(MAX_NAME_LINE)
            if raw is None:
                self._fail(f"a name longer than {MAX_NAME_LINE} bytes, which no import can "
                           "find (pickle.load stops here too)")
            if not raw:
                self._fail(f"{opname} with an empty name")
        try:
            return raw.decode(encoding)
        except UnicodeDecodeError:
            self._fail(f"{opname} name is not valid {encoding.upper()}", unsafe=not self.scan)
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
        self.below -= len(self.stack)
        if len(items) > MAX_CONTAINER:
            self._limit(f"a container holds more than {MAX_CONTAINER} items")
        return items

    def _top(self, expected: type, opname: str) -> Any:
        """The object under the operands, or None (a scan goes on) if it is not ``expected``."""
        if not self.stack:
            self._fail(f"{opname} with an empty stack")
        target = self.stack[-1]
        if isinstance(target, (Refused, Unknown)):
            return None  # what a refused call made: already a finding or a deferred error
        if not isinstance(target, expected):
            self._refuse(f"{opname} applied to a {type(target).__name__}, not a "
                         f"{expected.__name__} (a known scanner bypass)")
            return None
        return target

    def _memo_put(self, index: int) -> None:
        if not self.stack:
            self._fail("memo store with an empty stack")
        if index not in self.memo and len(self.memo) >= MAX_MEMO:
            self._limit(f"pickle memo grows beyond {MAX_MEMO} entries")
        self.memo[index] = self.stack[-1]

    def _memo_get(self, index: int) -> None:
        if index not in self.memo:
            self._fail(f"pickle reads memo slot {index} that was never written")
        self.stack.append(self.memo[index])

    def _string(self, n: int) -> str | Unknown:
        if self.max_text is not None and n > self.max_text:
            self._take(n)  # pickle decodes it; its text cannot name anything that matters
            return Unknown(f"string of {n} bytes")
        raw = self._take(n)
        try:
            return str(raw, "utf-8")
        except UnicodeDecodeError:
            pass
        if not self.scan:
            self._fail("a string in the pickle is not valid UTF-8")
        try:
            text = str(raw, "utf-8", "surrogatepass")  # what pickle accepts
        except UnicodeDecodeError:
            self._fail("a string in the pickle is not valid UTF-8")
            raise  # unreachable
        self._refuse("a string in the pickle is not valid UTF-8", unsafe=False)
        return text

    def _bytes(self, n: int) -> bytes | Unknown:
        if self.max_text is not None and n > self.max_text:
            self._take(n)
            return Unknown(f"bytes of {n}")
        return bytes(self._take(n))

    def _nested(self, value: Any) -> Any:
        """Records the depth and weight of a new tuple or frozenset; refuses one nested too
        deeply (hashing or printing it would recurse in C)."""
        if isinstance(value, (tuple, frozenset)) and value:
            depth = weight = 1
            known = self._depth.get
            for item in value:
                inner = known(id(item))
                if inner is None:
                    weight += 1
                else:
                    depth = max(depth, inner[1] + 1)
                    weight += inner[2]
            weight = min(weight, MAX_KEY_WEIGHT + 1)
            if depth > MAX_NESTING:
                self._limit(f"tuples nest deeper than {MAX_NESTING} levels")
            self._depth[id(value)] = (value, depth, weight)
        return value

    def _admit(self, container: Any, key: Any) -> bool:
        """Whether ``key`` may go into ``container`` (a dict or set): refused (False) when
        hashing it, again and again, or finding its place would cost more than a key should."""
        if type(key) in _HASH_CHOSEN_BY_FILE:
            return True
        if self._depth.get(id(key), (None, 0, 1))[2] > MAX_KEY_WEIGHT:
            self._refuse(f"a dict key or set item holds more than {MAX_KEY_WEIGHT} items "
                         "(hashing it for each use would take quadratic time)")
            return False
        try:
            hash(key)
        except TypeError:
            self._fail(f"a dict or set key is an unhashable {type(key).__name__}")
        spread = self._spreads.get(id(container))
        if spread is None:
            spread = self._spreads[id(container)] = _Spread(container)
        if not spread.admit(key):
            self._refuse(f"more than {MAX_SAME_HASH} dict keys or set items share one hash "
                         "(hash flooding: building it would take quadratic time)")
            return False
        return True

    # -- the interpreter ---------------------------------------------------------------

    def run(self) -> tuple[Any, int]:
        try:
            return self._run()
        except CkptError:
            if self.deferred is not None:
                raise self.deferred from None  # the first thing loading would refuse
            raise

    def _run(self) -> tuple[Any, int]:
        ops = _OPS
        size = len(self.data)
        while True:
            self.op_pos = self.pos
            if self.pos >= size:
                self.exhausted = True
                self._fail("pickle ends without a STOP opcode (file truncated)")
            code = self.data[self.pos]
            self.pos += 1
            if code not in _MAKES_NOTHING:
                self.objects += 1
            self.ops += 1
            if not self.ops & 1023:  # each opcode adds one object or stack entry at most
                self._check_caps()
            handler = ops.get(code)
            if handler is None and self.scan:
                handler = _SCAN_OPS.get(code)
                if handler is not None and not self._beyond_torch:
                    assert self.findings is not None
                    self._beyond_torch = True  # said once, with the first such opcode
                    self.findings.append(Finding(
                        "structure", f"opcode {_REFUSED[code]}", self.where, self.op_pos,
                        "torch.save never writes it; torch.load would read it"))
            if handler is None:
                name = _REFUSED.get(code)
                if name and not self.scan:
                    self._fail(f"opcode {name} is refused: torch.save never writes it",
                               unsafe=True)
                self._fail(f"byte 0x{code:02x} is not a pickle opcode" + (
                    "" if self.scan else " torch.save writes"), unsafe=not self.scan)
            if handler(self):
                break
        if self.marks or len(self.stack) != 1:
            state = ("an open MARK" if self.marks
                     else f"{len(self.stack)} objects on the stack, not 1")
            self._refuse(f"pickle stops with {state}", unsafe=False)
        return self.stack[-1], self.pos

    def _check_caps(self) -> None:
        if self.ops > MAX_OPS:
            self._limit(f"a pickle of more than {MAX_OPS} opcodes")
        if self.objects > MAX_OBJECTS:
            self._limit(f"a pickle that makes more than {MAX_OBJECTS} objects")
        if len(self.stack) + self.below > MAX_STACK:
            self._limit(f"the pickle stack grows beyond {MAX_STACK} objects")

    # Each handler returns True only for STOP.

    def op_stop(self) -> bool:
        if not self.stack:
            self._fail("STOP with an empty stack")
        return True

    def op_proto(self) -> None:
        version = self._u8()
        if version > 5:
            self._fail(f"pickle protocol {version} does not exist", unsafe=not self.scan)
        if version > 3:
            if not self.scan:
                self._fail(f"pickle protocol {version}: torch.save writes protocol 2",
                           unsafe=True)
            assert self.findings is not None
            self._beyond_torch = True
            self.findings.append(Finding(
                "structure", f"pickle protocol {version}", self.where, self.op_pos,
                "torch.save writes protocol 2; ckptkit does not load this pickle, but "
                "torch.load would, running every global it names"))

    def op_mark(self) -> None:
        if len(self.marks) >= MAX_MARK_DEPTH:
            self._limit(f"pickle nests deeper than {MAX_MARK_DEPTH} levels")
        self.marks.append(self.stack)
        self.below += len(self.stack)
        self.stack = []

    def op_empty_dict(self) -> None:
        self.stack.append({})

    def op_empty_list(self) -> None:
        self.stack.append([])

    def op_empty_tuple(self) -> None:
        self.stack.append(())

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
            self._refuse(f"an integer of {n} bytes is larger than any checkpoint uses",
                         unsafe=False)
        value = int.from_bytes(self._take(n), "little", signed=True)
        # Kept only while small: the same number may be spelt with any number of bytes.
        self.stack.append(value if value.bit_length() <= 8 * MAX_LONG_BYTES
                          else Unknown(f"integer of {n} bytes"))

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
        self.stack.append(self._bytes(self._unpack("<I", 4)))

    def op_short_binbytes(self) -> None:
        self.stack.append(self._bytes(self._u8()))

    def op_none(self) -> None:
        self.stack.append(None)

    def op_newtrue(self) -> None:
        self.stack.append(True)

    def op_newfalse(self) -> None:
        self.stack.append(False)

    def op_binfloat(self) -> None:
        self.stack.append(self._unpack(">d", 8))

    def op_global(self) -> None:
        module = self._name_line("GLOBAL", "utf-8")
        self._resolve(module, self._name_line("GLOBAL", "utf-8"))

    def _resolve(self, module: str, name: str) -> Any:
        try:
            found = self.find_global(module, name)
        except UnsafeFileError as exc:
            if not self.scan:
                self._fail(exc.reason, unsafe=True)
            assert self.findings is not None
            self.findings.append(Finding("global", f"{module}.{name}", self.where, self.op_pos,
                                         why_refused(module)))
            found = Refused(f"{module}.{name}")
        except FormatError as exc:  # a global the caller knows pickle.load cannot find
            self._fail(exc.reason)
        self.stack.append(found)
        return found

    def op_reduce(self) -> None:
        args = self._pop()
        func = self._pop()
        self.stack.append(self._call(func, args, "REDUCE"))

    def _call(self, func: Any, args: Any, opname: str) -> Any:
        """What calling ``func(*args)`` makes: an emulation's record, or in a scan a stand-in
        for a refused or unknown call."""
        if isinstance(func, Refused):
            return self._refused_call(func)
        if isinstance(func, Unknown):
            return Unknown(f"result of {func.what}")
        if not isinstance(func, Emulated):
            if self.scan and (func is None or isinstance(
                    func, (bool, int, float, str, bytes, tuple, list, dict, set, frozenset))):
                self._fail(f"{opname} calls a {type(func).__name__} (pickle.load stops too)")
            self._refuse(f"{opname} calls {safe_repr(func)}, which is not an allowed function")
            return Unknown(f"call of {safe_repr(func)}")
        if not isinstance(args, tuple):
            self._fail(f"{opname} arguments for {func.qualname} are not a tuple")
        if func.keys is not None:
            try:
                keys = list(func.keys(args))
            except (TypeError, ValueError, IndexError):
                keys = []  # the call itself says what is wrong with its arguments
            scratch: list[Any] = []  # stands for the container the call builds
            admitted = all(self._admit(scratch, key) for key in keys)
            self._spreads.pop(id(scratch), None)
            if not admitted:
                return Unknown(f"result of {func.qualname}")
        return self._nested(self._emulate(func.qualname, func.call, args))

    def _refused_call(self, func: Refused) -> Refused:
        assert self.findings is not None  # a Refused exists only when collecting
        self.findings.append(Finding("call", func.name, self.where, self.op_pos,
                                     "the file calls it when loaded"))
        return Refused(f"{func.name}()")

    def _emulate(self, qualname: str, func: Callable[[tuple], Any], args: tuple) -> Any:
        try:
            return func(args)
        except (FormatError, UnsafeFileError) as exc:
            self._refuse(f"{qualname}: {exc.reason}", unsafe=isinstance(exc, UnsafeFileError))
        except (TypeError, ValueError, KeyError, IndexError, OverflowError,
                struct.error) as exc:
            self._refuse(f"{qualname} called with arguments it cannot take ({exc})",
                         unsafe=False)
        return Unknown(f"result of {qualname}")

    def op_newobj(self) -> None:
        # Only an ``EmulatedClass`` (a few data classes: argparse.Namespace, ParameterDict)
        # is created this way, as a record; any other class is refused, or named by a scan.
        args = self._pop()
        cls = self._pop()
        if self.scan and not isinstance(args, tuple):
            self._fail("NEWOBJ arguments are not a tuple (pickle.load stops too)")
        if isinstance(cls, Refused):
            self.stack.append(self._refused_call(cls))
            return
        if isinstance(cls, EmulatedClass) and isinstance(args, tuple):
            self.stack.append(self._emulate(cls.qualname, cls.call, args))
            return
        self._refuse(f"NEWOBJ creates {safe_repr(cls)}, which is not an allowed class")
        self.stack.append(Unknown(f"instance of {safe_repr(cls)}"))

    def op_build(self) -> None:
        state = self._pop()
        target = self._top(object, "BUILD")
        if target is None:
            return
        if not isinstance(target, Buildable):
            self._refuse(f"BUILD sets the state of {type(target).__name__}, which only code "
                         "could do")
            return
        try:
            target.build(state)
        except (FormatError, UnsafeFileError) as exc:
            self._refuse(exc.reason, unsafe=isinstance(exc, UnsafeFileError))

    def op_binpersid(self) -> None:
        self._persistent(self._pop())

    def _persistent(self, pid: Any) -> None:
        if self.persistent_load is None:
            self._fail("persistent id in a pickle that may not reference storages",
                       unsafe=not self.scan)
        try:
            self.stack.append(self.persistent_load(pid))
        except (FormatError, UnsafeFileError) as exc:
            self._refuse(exc.reason, unsafe=isinstance(exc, UnsafeFileError))
            self.stack.append(Unknown("storage"))

    def op_setitem(self) -> None:
        value = self._pop()
        key = self._pop()
        target = self._top(dict, "SETITEM")
        if target is not None and self._admit(target, key):
            target[key] = value

    def op_setitems(self) -> None:
        items = self._pop_mark()
        if len(items) % 2:
            self._fail("SETITEMS with an odd number of items")
        if not items and self.scan:
            self._top(object, "SETITEMS")  # pickle checks nothing more for none
            return
        target = self._top(dict, "SETITEMS")
        if target is None:
            return
        for i in range(0, len(items), 2):
            if self._admit(target, items[i]):
                target[items[i]] = items[i + 1]
        if len(target) > MAX_CONTAINER:
            self._limit(f"a dict holds more than {MAX_CONTAINER} items")

    def op_append(self) -> None:
        value = self._pop()
        target = self._top(list, "APPEND")
        if target is not None:
            target.append(value)

    def op_appends(self) -> None:
        items = self._pop_mark()
        if not items and self.scan:
            self._top(object, "APPENDS")
            return
        target = self._top(list, "APPENDS")
        if target is not None:
            target.extend(items)
            if len(target) > MAX_CONTAINER:
                self._limit(f"a list holds more than {MAX_CONTAINER} items")

    # -- protocols 4 and 5, and 0 and 1, read only while scanning (``ckpt scan``): torch.save
    # writes none of them, pickle.dumps and old tools do, and torch.load reads them all.

    def op_frame(self) -> None:
        # The opcodes inside are read as they come (CPython's unpickler does not hold them to
        # the frame either); where the frame ends matters after STOP: see ``frame_end``.
        length = self._unpack("<Q", 8)
        self.frame_end = self.pos + length

    def op_short_binunicode(self) -> None:
        self.stack.append(self._string(self._u8()))

    def op_binunicode8(self) -> None:
        self.stack.append(self._string(self._length8()))

    def op_binbytes8(self) -> None:  # and BYTEARRAY8: to a scan, bytes either way
        self.stack.append(self._bytes(self._length8()))

    def _length8(self) -> int:
        n = self._unpack("<Q", 8)
        if n > len(self.data) - self.pos:
            self.exhausted = True
            self._fail("a length runs past the end of the pickle")
        return n

    def op_memoize(self) -> None:
        self._memo_put(len(self.memo))

    def op_empty_set(self) -> None:
        self.stack.append(set())

    def op_additems(self) -> None:
        items = self._pop_mark()
        if not items:
            self._top(object, "ADDITEMS")
            return
        target = self._top(set, "ADDITEMS")
        if target is not None:
            target.update(item for item in items if self._admit(target, item))
            if len(target) > MAX_CONTAINER:
                self._limit(f"a set holds more than {MAX_CONTAINER} items")

    def op_frozenset(self) -> None:
        items = self._pop_mark()  # before the append: the stack is the outer one now
        kept: set[Any] = set()
        kept.update(item for item in items if self._admit(kept, item))
        self._spreads.pop(id(kept), None)
        self.stack.append(self._nested(frozenset(kept)))

    def op_stack_global(self) -> None:
        name = self._pop()
        module = self._pop()
        if not (isinstance(module, str) and isinstance(name, str)):
            self._fail("STACK_GLOBAL names a global with values that are not strings",
                       unsafe=not self.scan)
        self._resolve(module, name)

    def op_newobj_ex(self) -> None:
        kwargs = self._pop()
        if not isinstance(kwargs, dict):
            self._fail("NEWOBJ_EX keyword arguments are not a dict (pickle.load stops too)")
        self.op_newobj()

    def op_next_buffer(self) -> None:
        self._fail("NEXT_BUFFER: out-of-band data, which torch.load never passes, so "
                   "pickle.load stops here")

    def op_readonly_buffer(self) -> None:
        if not self.stack:
            self._fail("READONLY_BUFFER with an empty stack")

    def op_int(self) -> None:
        line = self._text_line()
        if line is None:
            self.stack.append(Unknown("integer in long text"))
            return
        if not line:
            self._fail("INT with an empty line")
        value = _strtol(line)
        if value is None:
            value = _text_int(line, 0)
        elif len(line) == 2 and value in (0, 1):
            value = bool(value)
        self._push_int(value, "INT")

    def op_long(self) -> None:
        line = self._text_line()
        if line is None:
            self.stack.append(Unknown("integer in long text"))
            return
        if not line:
            self._fail("LONG with an empty line")
        self._push_int(_text_int(line[:-1] if line.endswith(b"L") else line, 0), "LONG")

    def _push_int(self, value: int | Unknown | None, opname: str) -> None:
        if value is None:
            self._fail(f"{opname} is not a number (pickle.load stops too)")
        self.stack.append(value)

    def op_float(self) -> None:
        line = self._text_line()
        if line is None:
            self.stack.append(Unknown("float in long text"))
            return
        try:
            self.stack.append(float(line.split(b"\0", 1)[0]))
        except ValueError:
            self._fail("FLOAT is not a number (pickle.load stops too)")

    def op_string(self) -> None:
        line = self._text_line()
        if line is None:
            self.stack.append(Unknown("long string"))
            return
        if not (len(line) >= 2 and line[0] == line[-1] and line[:1] in (b"'", b'"')):
            self._fail("STRING argument is not quoted (pickle.load stops too)")
        try:
            raw = codecs.escape_decode(line[1:-1])[0]
        except ValueError:
            self._fail("STRING has a broken escape (pickle.load stops too)")
        self.stack.append(self._text(raw))

    def _text(self, raw: bytes) -> str:
        """A protocol-0/1 string as torch.load decodes it (UTF-8; pickle.load's ASCII fails
        on less)."""
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            self._fail("a string is not valid UTF-8 (torch.load stops too)")
            raise  # unreachable

    def op_binstring(self) -> None:
        n = self._unpack("<i", 4)
        if n < 0:
            self._fail("BINSTRING with a negative length")
        self._short_text(n)

    def op_short_binstring(self) -> None:
        self._short_text(self._u8())

    def _short_text(self, n: int) -> None:
        raw = self._bytes(n)
        self.stack.append(raw if isinstance(raw, Unknown) else self._text(raw))

    def op_unicode(self) -> None:
        line = self._text_line()
        if line is None:
            self.stack.append(Unknown("long string"))
            return
        try:
            self.stack.append(codecs.raw_unicode_escape_decode(line)[0])
        except UnicodeDecodeError:
            self._fail("UNICODE has a broken escape (pickle.load stops too)")

    def op_put(self) -> None:
        index = self._memo_index("PUT")
        if index is not None:
            self._memo_put(index)
        elif not self.stack:
            self._fail("memo store with an empty stack")

    def op_get(self) -> None:
        index = self._memo_index("GET")
        if index is not None:
            self._memo_get(index)
        else:
            self.stack.append(Unknown("memo value"))

    def _memo_index(self, opname: str) -> int | None:
        """A text memo index; None for one spelt too long to read (where it goes, unknown)."""
        line = self._text_line()
        index = None if line is None else _text_int(line, 10)
        if line is None or isinstance(index, Unknown):
            return None
        if index is None or not 0 <= index < 1 << 63:
            self._fail(f"{opname} index is not a memo slot (pickle.load stops too)")
        return index

    def op_persid(self) -> None:
        line = self._text_line()
        try:
            pid: Any = Unknown("long id") if line is None else line.decode("ascii")
        except UnicodeDecodeError:
            self._fail("PERSID is not ASCII (pickle.load stops too)")
        self._persistent(pid)

    def op_inst(self) -> None:
        if not self.marks:
            self._fail("INST without a MARK")
        module = self._name_line("INST", "ascii")
        func = self._resolve(module, self._name_line("INST", "ascii"))
        self.stack.pop()  # the class: INST takes it from its lines, not the stack
        args = tuple(self._pop_mark())
        self.stack.append(self._call(func, self._nested(args), "INST"))

    def op_obj(self) -> None:
        items = self._pop_mark()
        if not items:
            self._fail("OBJ without a class")
        self.stack.append(self._call(items[0], self._nested(tuple(items[1:])), "OBJ"))

    def op_pop(self) -> None:
        if self.stack:
            self.stack.pop()
        elif self.marks:
            self._pop_mark()  # an empty frame: pickle pops the MARK itself
        else:
            self._fail("POP from an empty stack")

    def op_pop_mark(self) -> None:
        self._pop_mark()

    def op_dup(self) -> None:
        if not self.stack:
            self._fail("DUP with an empty stack")
        self.stack.append(self.stack[-1])

    def op_list(self) -> None:
        items = self._pop_mark()  # before the append: the stack is the outer one now
        self.stack.append(items)

    def op_dict(self) -> None:
        items = self._pop_mark()
        if len(items) % 2:
            self._fail("DICT with an odd number of items")
        result: dict[Any, Any] = {}
        for i in range(0, len(items), 2):
            if self._admit(result, items[i]):
                result[items[i]] = items[i + 1]
        self.stack.append(result)

    def _ext(self, size: int) -> None:
        """A global named by its code in copyreg's extension registry, which holds nothing
        unless a program registers codes: one that this process knows is read as the GLOBAL
        it stands for; pickle.load stops on any other, as it finds none."""
        code = int.from_bytes(self._take(size), "little", signed=size == 4)
        registered = copyreg._inverted_registry.get(code) if code > 0 else None
        if registered is None:
            self._fail(f"extension code {code}, which nothing registers (pickle.load stops "
                       "here too)")
        self._resolve(*registered)

    def op_ext1(self) -> None:
        self._ext(1)

    def op_ext2(self) -> None:
        self._ext(2)

    def op_ext4(self) -> None:
        self._ext(4)


def _strtol(line: bytes) -> int | None:
    """C's ``strtol(line, &end, 0)`` as CPython's INT opcode uses it: the value if the number
    ends the line (or at a NUL byte) and fits in 64 bits, else None."""
    match = _STRTOL.match(line)
    if not match:  # no digits: the end is where it began, fine if that is a NUL
        return 0 if line[:1] == b"\0" else None
    if match.end() < len(line) and line[match.end()] != 0:
        return None
    text = match.group(0).strip()
    digits = match.group(1)
    base = 16 if digits[:2] in (b"0x", b"0X") else 8 if digits[:1] == b"0" else 10
    if len(digits) > 64:  # past 64 bits in any base, as strtol finds (ERANGE): not parsed
        return None
    value = int(text, base)
    return value if -(1 << 63) <= value < (1 << 63) else None


def _text_int(line: bytes, base: int) -> int | Unknown | None:
    """``PyLong_FromString(line, NULL, base)`` as CPython's unpickler calls it: the text up to
    a NUL byte, spaces around allowed; None where it fails. Very long numbers are an
    ``Unknown`` (CPython's digit limit can be raised, so they might be read)."""
    text = line.split(b"\0", 1)[0].strip()
    if len(text) > MAX_DIGITS:
        return Unknown(f"integer of {len(text)} digits")
    try:
        return int(text, base)
    except ValueError:
        return None


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

# The opcodes torch.save never writes, understood only while scanning.
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
    0x97: PickleVM.op_next_buffer,
    0x98: PickleVM.op_readonly_buffer,
    ord("I"): PickleVM.op_int,
    ord("L"): PickleVM.op_long,
    ord("F"): PickleVM.op_float,
    ord("S"): PickleVM.op_string,
    ord("V"): PickleVM.op_unicode,
    ord("T"): PickleVM.op_binstring,
    ord("U"): PickleVM.op_short_binstring,
    ord("p"): PickleVM.op_put,
    ord("g"): PickleVM.op_get,
    ord("P"): PickleVM.op_persid,
    ord("i"): PickleVM.op_inst,
    ord("o"): PickleVM.op_obj,
    ord("0"): PickleVM.op_pop,
    ord("1"): PickleVM.op_pop_mark,
    ord("2"): PickleVM.op_dup,
    ord("l"): PickleVM.op_list,
    ord("d"): PickleVM.op_dict,
    0x82: PickleVM.op_ext1,
    0x83: PickleVM.op_ext2,
    0x84: PickleVM.op_ext4,
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
