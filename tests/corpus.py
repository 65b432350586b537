"""A corpus of hostile and benign checkpoint files, one hostile file per published technique.

Every hostile payload only creates a marker file (named after the technique) in the folder it
is given, so a test can show both that ``torch.load(weights_only=False)`` would run it and that
ckptkit never does. Pickles are built from bytes or with ``pickle.dumps`` of objects whose
``__reduce__`` names the payload: building them runs nothing.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
import tarfile
import warnings
import zipfile

import torch

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


def _u(text: str) -> bytes:
    raw = text.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw


def _call(module: str, name: str, *args: bytes) -> bytes:
    """Protocol-2 opcodes that call ``module.name(*args)``; args are opcode bytes."""
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n(" + b"".join(args) + b"tR"


def _touch(marker: str) -> str:
    return f"open({marker!r}, 'w').close()"


class _Reduce:
    def __init__(self, func, args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def payloads(marker_dir: str) -> dict[str, tuple[bytes, bool]]:
    """Technique name -> (pickle bytes, whether torch.load would create the marker)."""
    def m(name: str) -> str:
        return os.path.join(marker_dir, f"marker_{name}")

    p = b"\x80\x02"
    out: dict[str, tuple[bytes, bool]] = {
        "os_system": (p + _call("posix", "system", _u(f"touch {m('os_system')}")) + b".", True),
        "builtins_exec": (p + _call("builtins", "exec", _u(_touch(m("builtins_exec")))) + b".",
                          True),
        "builtins_eval": (p + _call("builtins", "eval", _u(_touch(m("builtins_eval")))) + b".",
                          True),
        "subprocess": (p + _call("subprocess", "call", b"](" + _u("touch") + _u(m("subprocess"))
                                 + b"e") + b".", True),
        "runpy": (p + _call("runpy", "_run_code", _u(_touch(m("runpy"))), b"}") + b".", True),
        "pkgutil_resolve_name": (
            p + _call("pkgutil", "resolve_name", _u("os:system"))
            + b"(" + _u(f"touch {m('pkgutil_resolve_name')}") + b"tR.", True),
        "importlib": (p + b"cbuiltins\ngetattr\n(" + _call("importlib", "import_module", _u("os"))
                      + _u("system") + b"tR(" + _u(f"touch {m('importlib')}") + b"tR.", True),
        "operator_attrgetter": (
            p + _call("operator", "attrgetter", _u("system")) + b"("
            + _call("importlib", "import_module", _u("os")) + b"tR("
            + _u(f"touch {m('operator_attrgetter')}") + b"tR.", True),
        "functools_partial": (
            p + _call("functools", "partial", b"cposix\nsystem\n",
                      _u(f"touch {m('functools_partial')}")) + b")R.", True),
        "nested_pickle": (
            p + _call("pickle", "loads", b"C" + bytes([len(inner := (
                p + _call("posix", "system", _u(f"touch {m('nested_pickle')}")) + b"."))])
                + inner) + b".", True),
        "torch_load_nested": (p + _call("torch", "load", _u("/nonexistent")) + b".", False),
        "torch_serialization": (p + _call("torch.serialization", "_get_restore_location",
                                          _u("cpu")) + b".", False),
        "numpy_load": (p + _call("numpy", "load", _u("/nonexistent"), b"\x88") + b".", False),
        "marshal_code": (p + _call("marshal", "loads", b"C\x00") + b".", False),
        "profile_denylist_gap": (p + _call("profile", "run", _u(_touch(m("profile_denylist_gap"))))
                                 + b".", True),
        "torch_collect_env": (p + _call("torch.utils.collect_env", "run",
                                        _u(f"touch {m('torch_collect_env')}")) + b".", True),
        "asyncio_submodule": (p + _call("asyncio.unix_events", "_UnixSelectorEventLoop")
                              + b".", False),
        "stack_global_p4": (pickle.dumps(_Reduce(os.system, (f"touch {m('stack_global_p4')}",)),
                                         protocol=4), True),
        "memo_pop_trick": (p + b"cposix\nsystem\nq\x010h\x01(" + _u(f"touch {m('memo_pop_trick')}")
                           + b"tR.", True),
        "inst_opcode": (b"(" + _u(f"touch {m('inst_opcode')}") + b"iposix\nsystem\n.", True),
        "text_int_desync": (b"I0x1\n.", False),
        "payload_then_garbage": (
            p + _call("posix", "system", _u(f"touch {m('payload_then_garbage')}")) + b"\xff\xff",
            True),
        "setitem_on_list": (p + b"]" + b"K\x00K\x01s" + b".", False),
        "build_on_global": (p + b"cposix\nsystem\n}b.", False),
        "newobj_unlisted": (p + b"csubprocess\nPopen\n(" + _u(f"touch {m('newobj_unlisted')}")
                            + b"t\x81.", False),
    }
    return out


def torch_zip(path: str, data_pkl: bytes, storages: dict[str, bytes] | None = None,
              prefix: str = "archive", extra: dict[str, bytes] | None = None) -> None:
    """A ZIP laid out like torch.save's (stored members in one folder), written by zipfile."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr(f"{prefix}/data.pkl", data_pkl)
        z.writestr(f"{prefix}/version", b"3\n")
        for key, raw in (storages or {}).items():
            z.writestr(f"{prefix}/data/{key}", raw)
        for name, raw in (extra or {}).items():
            z.writestr(name, raw)


def _legacy_head() -> bytes:
    return (pickle.dumps(LEGACY_MAGIC, protocol=2) + pickle.dumps(1001, protocol=2)
            + pickle.dumps({"protocol_version": 1001, "little_endian": True,
                            "type_sizes": {"short": 2, "int": 4, "long": 4}}, protocol=2))


def _real_zip_bytes() -> bytes:
    buf = io.BytesIO()
    torch.save({"w": torch.arange(6, dtype=torch.float32)}, buf)
    return buf.getvalue()


def _patch(data: bytes, old: bytes, new: bytes, count: int = 1) -> bytes:
    assert data.count(old) >= count, old
    return data.replace(old, new, count)


def build_hostile(folder: str, marker_dir: str) -> dict[str, bool]:
    """Writes one hostile file per technique into ``folder``; returns file name -> whether
    ``torch.load(weights_only=False)`` runs its payload (then it creates a marker)."""
    runs: dict[str, bool] = {}
    for name, (pkl, real) in payloads(marker_dir).items():
        torch_zip(os.path.join(folder, f"zip_{name}.ckpt"), pkl)
        runs[f"zip_{name}.ckpt"] = real
    def system(name: str) -> bytes:
        marker = os.path.join(marker_dir, f"marker_{name}")
        return b"\x80\x02" + _call("posix", "system", _u(f"touch {marker}")) + b"."

    # Legacy files: torch.load unpickles the magic-number pickle first.
    with open(os.path.join(folder, "legacy_hostile_magic.pt"), "wb") as f:
        f.write(system("legacy_magic"))
    runs["legacy_hostile_magic.pt"] = True
    with open(os.path.join(folder, "legacy_hostile_data.pt"), "wb") as f:
        f.write(_legacy_head() + system("legacy_data") + pickle.dumps([], protocol=2))
    runs["legacy_hostile_data.pt"] = True
    benign_legacy = io.BytesIO()
    torch.save({"w": torch.ones(2)}, benign_legacy, _use_new_zipfile_serialization=False)
    with open(os.path.join(folder, "legacy_trailing_data.pt"), "wb") as f:
        f.write(benign_legacy.getvalue() + system("legacy_trailing"))
    runs["legacy_trailing_data.pt"] = False
    # A pickle hidden behind an innocent extension: torch.load unpickles any file.
    with open(os.path.join(folder, "preview.png"), "wb") as f:
        f.write(system("preview_png"))
    runs["preview.png"] = True
    _polyglots(folder, marker_dir, runs, system)
    _zip_tricks(folder, runs)
    return runs


def _polyglots(folder: str, marker_dir: str, runs: dict[str, bool], system) -> None:
    """Files that ckptkit's own reading of one format once passed, read otherwise by
    torch.load: each runs its payload there."""
    def touch(name: str) -> bytes:
        return f"touch {os.path.join(marker_dir, f'marker_{name}')}".encode()

    def write(name: str, data: bytes) -> None:
        with open(os.path.join(folder, name), "wb") as f:
            f.write(data)
        runs[name] = True

    write("polyglot_safetensors.ckpt", safetensors_pickle_polyglot(touch("polyglot_st")))
    write("polyglot_legacy_tar.pt", legacy_tar_polyglot(touch("polyglot_tar")))
    # The legacy magic number spelt with one byte more: torch.load compares values.
    magic = b"\x80\x02\x8a\x0b" + LEGACY_MAGIC.to_bytes(11, "little", signed=True) + b"."
    write("legacy_magic_long1.pt", magic + _legacy_head()[len(pickle.dumps(LEGACY_MAGIC, 2)):]
          + system("legacy_long1") + pickle.dumps([], protocol=2))
    # Saved big-endian by its sys info, which torch.load never looks at.
    big = _legacy_head().replace(b"little_endianq", b"little_endiaNq").replace(b"\x88", b"\x89")
    write("legacy_big_endian.pt", big + system("legacy_big_endian") + pickle.dumps([], 2))
    # Re-zipped: ckptkit reads only stored members, torch's ZIP reader inflates them.
    rezipped = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(_real_zip_bytes())) as src, zipfile.ZipFile(
            rezipped, "w", zipfile.ZIP_DEFLATED) as out:
        for name in src.namelist():
            out.writestr(name, system("zip_deflated") if name.endswith("data.pkl")
                         else src.read(name))
    write("zip_deflated.ckpt", rezipped.getvalue())


def safetensors_pickle_polyglot(command: bytes) -> bytes:
    """A valid safetensors file (the reference library reads it) that is also a pickle: its
    header length's low byte is 0x56, the UNICODE opcode, which reads a line through the JSON
    header to the newline that ends it; the one tensor's bytes are the payload's opcodes."""
    payload = b"cposix\nsystem\n(V" + command + b"\ntR."
    header = json.dumps({"__metadata__": {"format": "pt"},
                         "w": {"dtype": "U8", "shape": [len(payload)],
                               "data_offsets": [0, len(payload)]}}, separators=(",", ":"))
    header += " " * ((0x56 - len(header) - 1) % 256) + "\n"
    size = struct.pack("<Q", len(header))
    assert size[0] == ord("V") and b"\n" not in size
    return size + header.encode() + payload


def legacy_tar_polyglot(command: bytes) -> bytes:
    """A legacy torch file that ckptkit reads as one, whose first 512 bytes are also an old
    tar header (no ustar marker; the fields are the text of a string in the sys-info pickle)
    whose member ends where a storage's bytes hold a real tar stream: torch.load tries tar
    first and unpickles its 'storages' member."""
    legacy = io.BytesIO()
    torch.save({"w": torch.zeros(4096, dtype=torch.uint8)}, legacy,
               _use_new_zipfile_serialization=False)
    stream = io.BytesIO(legacy.getvalue())
    for _ in range(3):
        pickle.load(stream)
    rest = legacy.getvalue()[stream.tell():]
    sys_info = {"pad": "X" * 460, "protocol_version": 1001, "little_endian": True,
                "type_sizes": {"short": 2, "int": 4, "long": 4}}
    head = (pickle.dumps(LEGACY_MAGIC, protocol=2) + pickle.dumps(1001, protocol=2)
            + pickle.dumps(sys_info, protocol=2))
    pad = head.index(b"X" * 460)
    assert pad <= 100 and pad + 460 >= 500
    data = bytearray(head + rest)
    raw_at = len(data) - 4096  # the storage's bytes end the file
    member_at = -(-raw_at // 512) * 512
    fields = {100: b"0000644\0", 108: b"0000000\0", 116: b"0000000\0",
              124: b"%011o\0" % (member_at - 512), 136: b"00000000000\0", 148: b" " * 8,
              156: b"0", 329: b"0000000\0", 337: b"0000000\0"}
    data[100:500] = bytes(400)
    for at, value in fields.items():
        data[at:at + len(value)] = value
    checksum = 256 + sum(data[:148]) + sum(data[156:512])
    data[148:156] = b"%06o\0 " % checksum
    body = b"cposix\nsystem\n(V" + command + b"\ntR."
    info = tarfile.TarInfo("storages")
    info.size = len(body)
    members = (info.tobuf(tarfile.USTAR_FORMAT) + body + bytes(-len(body) % 512)
               + bytes(1024))  # the member, then the two zero blocks that end an archive
    assert member_at + len(members) <= len(data)
    data[member_at:member_at + len(members)] = members
    return bytes(data)


def _zip_tricks(folder: str, runs: dict[str, bool]) -> None:
    real = _real_zip_bytes()

    def write(name: str, data: bytes) -> None:
        with open(os.path.join(folder, name), "wb") as f:
            f.write(data)
        runs[name] = False

    # The local header names another member than the central directory does.
    write("zip_name_mismatch.ckpt", _patch(real, b"archive/data.pkl", b"archive/data.pk_"))
    write("zip_trailing_data.ckpt", real + b"PK\x05\x06" + b"\x00" * 18)
    write("zip_prepended_data.ckpt", b"\x00" * 16 + real)
    # Encryption flag on every member (local and central).
    write("zip_encrypted_flag.ckpt", real.replace(b"PK\x03\x04\x00\x00\x08\x08",
                                                  b"PK\x03\x04\x00\x00\x09\x08")
          .replace(b"\x08\x08\x00\x00\x00\x00", b"\x09\x08\x00\x00\x00\x00"))
    # data.pkl changed after the CRC was computed.
    good = io.BytesIO()
    torch_zip_obj = zipfile.ZipFile(good, "w", zipfile.ZIP_STORED)
    torch_zip_obj.writestr("archive/data.pkl", pickle.dumps({"a": 1}, protocol=2))
    torch_zip_obj.writestr("archive/version", b"3\n")
    torch_zip_obj.close()
    write("zip_bad_crc.ckpt", _patch(good.getvalue(), b"K\x01", b"K\x02"))
    dup = io.BytesIO()
    with zipfile.ZipFile(dup, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", pickle.dumps({"a": 1}, protocol=2))
        z.writestr("archive/version", b"3\n")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            z.writestr("archive/data.pkl", payloads("/tmp")["os_system"][0])
    write("zip_duplicate_names.ckpt", dup.getvalue())
    extra = os.path.join(folder, "zip_extra_member.ckpt")
    torch_zip(extra, pickle.dumps({"a": 1}, protocol=2),
              extra={"archive/extra.pkl": payloads("/tmp")["os_system"][0]})
    runs["zip_extra_member.ckpt"] = False
    script = os.path.join(folder, "torchscript.pt")
    torch_zip(script, pickle.dumps({"a": 1}, protocol=2),
              extra={"archive/constants.pkl": b"\x80\x02).", "archive/code/m.py": b"x = 1\n"})
    runs["torchscript.pt"] = False
    # A second central directory reached through a forged ZIP64 locator.
    cd_end = real.rindex(b"PK\x05\x06")
    locator = b"PK\x06\x07" + struct.pack("<IQI", 0, 0, 1)
    write("zip_forged_zip64_locator.ckpt", real[:cd_end] + locator + real[cd_end:])
    # Storage sizes that disagree with their records, and a tensor past its storage.
    pkl = io.BytesIO()
    torch.save({"w": torch.arange(6, dtype=torch.float32)}, pkl)
    with zipfile.ZipFile(io.BytesIO(pkl.getvalue())) as z:
        data_pkl = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    torch_zip(os.path.join(folder, "zip_storage_too_short.ckpt"), data_pkl, {"0": b"\x00" * 8})
    runs["zip_storage_too_short.ckpt"] = False
    torch_zip(os.path.join(folder, "zip_tensor_out_of_bounds.ckpt"),
              _patch(data_pkl, b"K\x06\x85", b"K\x07\x85"), {"0": b"\x00" * 24})
    runs["zip_tensor_out_of_bounds.ckpt"] = False
    tar = io.BytesIO()
    with tarfile.open(fileobj=tar, mode="w") as t:
        info = tarfile.TarInfo("pickle")
        body = payloads("/tmp")["os_system"][0]
        info.size = len(body)
        t.addfile(info, io.BytesIO(body))
    write("legacy_tar.ckpt", tar.getvalue())


def build_benign(folder: str) -> list[str]:
    """Real torch.save and safetensors files of the shapes users have; all must scan safe."""
    import numpy as np
    from safetensors.torch import save_file

    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    weights = {"a": torch.randn(4, 6), "h": torch.randn(3).half(), "b": torch.zeros(2).bfloat16(),
               "i": torch.arange(5), "flag": torch.tensor([True, False])}
    weights["view"] = weights["a"][1:3, ::2]
    files = {
        "plain.pt": weights,
        "module_state_dict.pth": model.state_dict(),
        "lightning.ckpt": {"state_dict": weights, "global_step": 10, "epoch": 1,
                           "optimizer_states": [torch.optim.SGD(model.parameters(), 0.1)
                                                .state_dict()],
                           "callbacks": {"ModelCheckpoint": {"best_model_score": np.float64(0.5),
                                                             "dtype_seen": np.dtype("float32")}},
                           "pytorch-lightning_version": "2.4.0"},
    }
    written = []
    for name, obj in files.items():
        torch.save(obj, os.path.join(folder, name))
        written.append(name)
    torch.save(weights, os.path.join(folder, "legacy.ckpt"), _use_new_zipfile_serialization=False)
    written.append("legacy.ckpt")
    save_file({k: v.contiguous() for k, v in weights.items()},
              os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    written.append("model.safetensors")
    return written

