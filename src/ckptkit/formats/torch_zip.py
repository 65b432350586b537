"""A strict reader for the ZIP container of ``torch.save`` files (torch >= 1.6).

Scanners have been bypassed by ZIP files that different readers see differently: a local
header whose name differs from its central entry, two central directories, members hidden
behind trailing data, flags that some readers honour and others ignore. This reader accepts
only what torch writes: stored (uncompressed) members whose local headers match their central
entries, laid end to end from byte 0 to the central directory, followed by the optional ZIP64
records and an end record that is the last 22 bytes of the file; no duplicate names; one
top-level folder holding only the member names torch writes. Small members are CRC-checked
when opened; storage members on request (their bytes are only read when a tensor is).
"""

from __future__ import annotations

import re
import struct
import zlib
from dataclasses import dataclass

from ..errors import FormatError, UnsafeFileError
from .source import Source

_EOCD = struct.Struct("<IHHHHIIH")
_ZIP64_LOCATOR = struct.Struct("<IIQI")
_ZIP64_EOCD = struct.Struct("<IQHHIIQQQQ")
_CENTRAL = struct.Struct("<IHHHHHHIIIHHHHHII")
_LOCAL = struct.Struct("<IHHHHHIIIHH")
# bit 3: sizes and CRC in a data descriptor after the data (what torch >= 2.1 writes);
# bit 11: names are UTF-8. Every other flag (encryption, patches...) is refused.
_DESCRIPTOR_FLAG = 0x0008
_ALLOWED_FLAGS = _DESCRIPTOR_FLAG | 0x0800
_FIXED_MEMBERS = {"data.pkl", "version", ".data/version", "byteorder",
                  ".data/serialization_id", ".format_version", ".storage_alignment"}
_STORAGE_MEMBER = re.compile(r"data/([0-9]+)")
TORCHSCRIPT_HINTS = ("constants.pkl", "code/", ".data/ts_code")


@dataclass(frozen=True)
class Member:
    name: str  # without the archive's top-level folder
    data_offset: int
    size: int
    crc: int


@dataclass
class TorchZip:
    prefix: str
    members: dict[str, Member]

    def storage(self, key: str) -> Member | None:
        return self.members.get(f"data/{key}")


def _zip64_values(extra: bytes, wanted: list[str], path: str) -> dict[str, int]:
    """Reads the ZIP64 extended-information field for the header fields marked 0xFFFFFFFF."""
    pos = 0
    while pos + 4 <= len(extra):
        tag, size = struct.unpack_from("<HH", extra, pos)
        body = extra[pos + 4:pos + 4 + size]
        if len(body) != size:
            raise UnsafeFileError("a ZIP extra field runs past its header", path)
        if tag == 0x0001:
            if len(body) < 8 * len(wanted):
                raise UnsafeFileError("a ZIP64 extra field is shorter than the fields it "
                                      "stands for", path)
            return {name: struct.unpack_from("<Q", body, 8 * i)[0]
                    for i, name in enumerate(wanted)}
        pos += 4 + size
    if pos != len(extra):
        raise UnsafeFileError("a ZIP extra field area does not end on a field boundary", path)
    if wanted:
        raise UnsafeFileError("a ZIP entry marks sizes as ZIP64 but has no ZIP64 field", path)
    return {}


def _end_records(source: Source) -> tuple[int, int, int, int]:
    """(entry count, central directory offset, its size, where the end records start)."""
    path, size = source.path, source.size
    if size < _EOCD.size:
        raise FormatError("the ZIP archive is truncated (no end record)", path)
    eocd_at = size - _EOCD.size
    (sig, disk, cd_disk, n_disk, n_total, cd_size, cd_offset,
     comment_len) = _EOCD.unpack(source.read(eocd_at, _EOCD.size))
    if sig != 0x06054B50 or comment_len != 0:
        raise FormatError("the ZIP end record is not the last 22 bytes of the file (the "
                          "download is truncated, or data was appended)", path)
    if disk or cd_disk or n_disk != n_total:
        raise UnsafeFileError("the ZIP archive claims to span several disks", path)
    records_at = eocd_at
    locator_at = eocd_at - _ZIP64_LOCATOR.size
    has_locator = locator_at >= 0 and source.read(locator_at, 4) == b"PK\x06\x07"
    needs_zip64 = n_total == 0xFFFF or cd_size == 0xFFFFFFFF or cd_offset == 0xFFFFFFFF
    if needs_zip64 and not has_locator:
        raise FormatError("the ZIP archive needs ZIP64 records but has none (truncated?)", path)
    if has_locator:
        _sig, z_disk, record_at, disks = _ZIP64_LOCATOR.unpack(
            source.read(locator_at, _ZIP64_LOCATOR.size))
        if z_disk != 0 or disks != 1 or record_at + _ZIP64_EOCD.size > locator_at:
            raise UnsafeFileError("the ZIP64 locator points outside the archive", path)
        (sig64, rec_size, _made, _need, disk64, cd_disk64, n_disk64, n_total64, cd_size64,
         cd_offset64) = _ZIP64_EOCD.unpack(source.read(record_at, _ZIP64_EOCD.size))
        if sig64 != 0x06064B50 or record_at + 12 + rec_size != locator_at:
            raise UnsafeFileError("the ZIP64 end record is not where its locator says (a "
                                  "second central directory?)", path)
        if disk64 or cd_disk64 or n_disk64 != n_total64:
            raise UnsafeFileError("the ZIP64 end record claims several disks", path)
        for small, big, what in ((n_total, n_total64, "entry count"),
                                 (cd_size, cd_size64, "directory size"),
                                 (cd_offset, cd_offset64, "directory offset")):
            if small not in (0xFFFF, 0xFFFFFFFF, big):
                raise UnsafeFileError(f"the ZIP and ZIP64 end records disagree on the {what}",
                                      path)
        n_total, cd_size, cd_offset, records_at = n_total64, cd_size64, cd_offset64, record_at
    if cd_offset + cd_size != records_at:
        raise UnsafeFileError("the ZIP central directory does not end where the end records "
                              "begin (hidden data or a second directory)", path)
    return n_total, cd_offset, cd_size, records_at


def read_torch_zip(source: Source) -> TorchZip:
    """Parses and checks the archive; refuses anything torch would not have written."""
    path = source.path
    n_total, cd_offset, cd_size, _ = _end_records(source)
    directory = bytes(source.read(cd_offset, cd_size))
    entries = []
    pos = 0
    for _ in range(n_total):
        if pos + _CENTRAL.size > len(directory):
            raise FormatError("the ZIP central directory is shorter than its entry count", path)
        (sig, _made, _need, flags, method, _time, _date, crc, csize, usize, name_len, extra_len,
         comment_len, disk, _iattr, _eattr, local_at) = _CENTRAL.unpack_from(directory, pos)
        if sig != 0x02014B50:
            raise FormatError("a ZIP central directory entry has a bad signature", path)
        name_at = pos + _CENTRAL.size
        raw_name = directory[name_at:name_at + name_len]
        extra = directory[name_at + name_len:name_at + name_len + extra_len]
        pos = name_at + name_len + extra_len + comment_len
        if pos > len(directory):
            raise FormatError("a ZIP central directory entry runs past the directory", path)
        wanted = [n for n, v in (("usize", usize), ("csize", csize), ("local_at", local_at),
                                 ("disk", disk)) if v == (0xFFFF if n == "disk" else 0xFFFFFFFF)]
        big = _zip64_values(extra, wanted, path)
        usize, csize = big.get("usize", usize), big.get("csize", csize)
        local_at, disk = big.get("local_at", local_at), big.get("disk", disk)
        try:
            name = raw_name.decode("utf-8")
        except UnicodeDecodeError:
            raise UnsafeFileError("a ZIP member name is not valid UTF-8", path) from None
        if flags & ~_ALLOWED_FLAGS:
            raise UnsafeFileError(f"ZIP member {name!r} has flags 0x{flags:04x} (encryption or "
                                  "data descriptors), which torch never writes", path)
        if method != 0 or csize != usize:
            raise FormatError(f"ZIP member {name!r} is compressed; torch checkpoints store "
                              "members uncompressed (was the file re-zipped?)", path)
        if disk != 0:
            raise UnsafeFileError("a ZIP member lives on another disk", path)
        entries.append((local_at, name, flags, crc, usize))
    if pos != len(directory):
        raise UnsafeFileError("the ZIP central directory holds more bytes than its entries",
                              path)
    names = [entry[1] for entry in entries]
    if len(set(names)) != len(names):
        duplicate = next(n for n in names if names.count(n) > 1)
        raise UnsafeFileError(f"the ZIP archive holds two members named {duplicate!r}", path)
    members = _check_locals(source, entries, cd_offset)
    return _torch_members(source, members)


def _check_locals(source: Source, entries: list, cd_offset: int) -> dict[str, Member]:
    path = source.path
    members: dict[str, Member] = {}
    position = 0
    for local_at, name, flags, crc, size in sorted(entries):
        if local_at != position:
            raise UnsafeFileError(f"ZIP member {name!r} starts at byte {local_at}, not right "
                                  f"after the previous member (byte {position}): hidden data",
                                  path)
        (sig, _need, lflags, lmethod, _time, _date, lcrc, lcsize, lusize, name_len,
         extra_len) = _LOCAL.unpack(source.read(local_at, _LOCAL.size))
        raw = bytes(source.read(local_at + _LOCAL.size, name_len + extra_len))
        wanted = [n for n, v in (("usize", lusize), ("csize", lcsize)) if v == 0xFFFFFFFF]
        big = _zip64_values(raw[name_len:], wanted, path)
        local = (lcrc, big.get("csize", lcsize), big.get("usize", lusize))
        deferred = bool(flags & _DESCRIPTOR_FLAG) and local == (0, 0, 0)
        if (sig != 0x04034B50 or raw[:name_len] != name.encode("utf-8") or lflags != flags
                or lmethod != 0 or (local != (crc, size, size) and not deferred)):
            raise UnsafeFileError(f"the local header of ZIP member {name!r} differs from its "
                                  "central directory entry", path)
        data_at = local_at + _LOCAL.size + name_len + extra_len
        members[name] = Member(name, data_at, size, crc)
        position = data_at + size
        if flags & _DESCRIPTOR_FLAG:
            position += _descriptor_length(source, position, crc, size, name)
    if position != cd_offset:
        raise UnsafeFileError(f"{cd_offset - position} bytes sit between the last ZIP member "
                              "and the central directory", path)
    return members


def _descriptor_length(source: Source, at: int, crc: int, size: int, name: str) -> int:
    """Checks the data descriptor after a member against its central entry; returns its size."""
    raw = bytes(source.read(at, min(24, max(0, source.size - at))))
    if raw[:4] == b"PK\x07\x08":
        if raw[4:16] == struct.pack("<III", crc, size & 0xFFFFFFFF, size & 0xFFFFFFFF) and (
                size < 0xFFFFFFFF):
            return 16
        if raw[4:24] == struct.pack("<IQQ", crc, size, size):
            return 24
    raise UnsafeFileError(f"the data descriptor of ZIP member {name!r} is missing or differs "
                          "from its central directory entry", source.path)


def _torch_members(source: Source, members: dict[str, Member]) -> TorchZip:
    path = source.path
    names = list(members)
    if any(hint in name for name in names for hint in TORCHSCRIPT_HINTS):
        raise UnsafeFileError("this is a TorchScript archive (torch.jit.save), which carries "
                              "code, not a checkpoint of weights", path)
    prefixes = {name.split("/", 1)[0] for name in names}
    if len(prefixes) != 1 or not all("/" in name for name in names):
        raise FormatError("a ZIP archive, but not a torch checkpoint (members are not all in "
                          "one top-level folder)", path)
    prefix = prefixes.pop()
    inner: dict[str, Member] = {}
    for name, member in members.items():
        rest = name[len(prefix) + 1:]
        if rest not in _FIXED_MEMBERS and not _STORAGE_MEMBER.fullmatch(rest):
            raise UnsafeFileError(f"ZIP member {name!r} is not one torch.save writes", path)
        inner[rest] = Member(rest, member.data_offset, member.size, member.crc)
    if "data.pkl" not in inner:
        raise FormatError("a ZIP archive without data.pkl: not a torch checkpoint", path)
    for name, member in inner.items():
        if not name.startswith("data/"):
            verify_crc(source, member)
    if "byteorder" in inner:
        order = bytes(source.read(inner["byteorder"].data_offset, inner["byteorder"].size))
        if order != b"little":
            raise FormatError(f"the checkpoint was saved with byte order {order!r}; only "
                              "little-endian files are supported", path)
    return TorchZip(prefix, inner)


def verify_crc(source: Source, member: Member, chunk: int = 1 << 24) -> None:
    """Checks a member's CRC-32, reading it in chunks."""
    crc = 0
    for start in range(0, member.size, chunk):
        crc = zlib.crc32(source.read(member.data_offset + start,
                                     min(chunk, member.size - start)), crc)
    if crc != member.crc:
        raise UnsafeFileError(f"ZIP member {member.name!r} fails its CRC check (corrupt or "
                              "tampered)", source.path)
