"""``ckpt hash``: the file hashes against implementations we did not write, and the published
definitions re-derived here from their code's description; the component digests equal
across formats and layouts of the same weights, and changed by one value."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import zlib

import blake3
import pytest
from helpers import run_cli

from ckptkit.ops import hashing
from ckptkit.ops.model_hash import DIGEST_VERSION, hash_file
from ckptkit.ops.parts import split
from ckptkit.ops.sample import sample


def _autov1(data: bytes) -> str:
    """A1111 ``sd_models.model_hash``: seek to 0x100000, read 0x10000 bytes, SHA-256, the
    first 8 hex digits (a short file hashes what the read returns)."""
    return hashlib.sha256(data[0x100000:0x100000 + 0x10000]).hexdigest()[:8]


def _autov3(data: bytes) -> str:
    """Civitai ``HashTask.CalculateV3HashAndEnsureEmbeddedMetadataFixedAsync``: the first 8
    bytes as a little-endian u64 N; below 16 MiB the N bytes after them are skipped too;
    SHA-256 of the rest."""
    (n,) = struct.unpack("<Q", data[:8])
    return hashlib.sha256(data[8 + n:] if n < 16 * 1024 * 1024 else data[8:]).hexdigest()


def _expected(data: bytes) -> dict[str, str]:
    sha = hashlib.sha256(data).hexdigest()
    return {"sha256": sha, "autov1": _autov1(data), "autov2": sha[:10],
            "autov3": _autov3(data),
            # Civitai's CRC32: .NET Crc32.GetCurrentHash, the CRC's bytes little-endian
            "crc32": zlib.crc32(data).to_bytes(4, "little").hex(),
            "blake3": blake3.blake3(data).hexdigest()}


def test_civitai_published_values(tmp_path):
    """civitai/model-scanner's HashTaskTests: "hello world" (no newline)."""
    path = tmp_path / "dummy.txt"
    path.write_bytes(b"hello world")
    found = hash_file(str(path))
    assert found["sha256"].upper() == ("B94D27B9934D3E08A52E52D7DA7DABFA"
                                       "C484EFE37A5380EE9088F7ACE2EFCDE9")
    assert found["autov2"].upper() == "B94D27B993"
    assert found["crc32"].upper() == "85114A0D"
    assert found["blake3"].upper() == ("D74981EFA70A0C880B8D8C1985D075DB"
                                       "CBF679B99A5F9914E5AAF96B831A9E24")
    # Civitai gives no AutoV1 under 2 MiB; A1111 hashes the empty read
    assert found["autov1"] == hashlib.sha256(b"").hexdigest()[:8] == "e3b0c442"
    assert found["components"] == {} and found["notes"]


@pytest.mark.parametrize("chunk", [4099, 1 << 20])
@pytest.mark.parametrize("kind", ["safetensors", "zip", "big-header"])
def test_file_hashes_match_the_definitions(tmp_path, monkeypatch, chunk, kind):
    """Across chunk boundaries (the AutoV1 window and the header's end inside a chunk)."""
    monkeypatch.setattr(hashing, "CHUNK", chunk)
    rng = os.urandom(3 * 1024 * 1024 + 12345)
    if kind == "safetensors":
        header = b'{"__metadata__":{"a":"b"}}'.ljust(1000)
        data = struct.pack("<Q", len(header)) + header + rng
    elif kind == "zip":
        data = b"PK\x03\x04" + rng  # a .ckpt: the first 8 bytes read as a huge N
    else:  # N just at 16 MiB: Civitai hashes from byte 8
        data = struct.pack("<Q", 16 * 1024 * 1024) + rng
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    found = hash_file(str(path))
    assert {k: found[k] for k in _expected(data)} == _expected(data)


def test_hash_cli_json_and_errors(tmp_path, capsys):
    path = tmp_path / "m.safetensors"
    sample("sd1", str(path), tiny=True, components=["vae"])
    code, out, err = run_cli(capsys, "hash", "--json", path, tmp_path / "missing.ckpt")
    lines = [json.loads(line) for line in out.splitlines()]
    assert code == 3 and err.count("\n") == 1 and "missing.ckpt" in err
    assert "no such file or folder" in err  # the words every other command uses
    assert lines[0]["sha256"] == _expected(path.read_bytes())["sha256"]
    assert set(lines[0]["components"]) == {"vae"} and "error" in lines[1]


# --- component digests --------------------------------------------------------------------


def _digests(path) -> dict[str, str]:
    found = hash_file(str(path))
    assert not found["notes"], found["notes"]
    return found["components"]


@pytest.fixture(scope="module")
def sd1_files(module_tmp):
    """The same tiny SD 1.x weights as .safetensors, .ckpt, kohya's layout, diffusers' UNet
    alone and ComfyUI parts."""
    folder = module_tmp("sd1")
    files = {"ldm": folder / "m.safetensors", "ckpt": folder / "m.ckpt",
             "kohya": folder / "k.safetensors", "unet": folder / "unet.safetensors"}
    sample("sd1", str(files["ldm"]), tiny=True)
    sample("sd1", str(files["ckpt"]), tiny=True, fmt="ckpt")
    sample("sd1", str(files["kohya"]), tiny=True, layout="kohya")
    sample("sd1", str(files["unet"]), tiny=True, layout="diffusers",
           components=["diffusion_model"])
    parts = split(str(files["ldm"]), str(folder / "parts"))
    return files, list(parts)


def test_component_digests_equal_across_formats_and_layouts(sd1_files):
    files, parts = sd1_files
    ldm = _digests(files["ldm"])
    assert set(ldm) == {"diffusion_model", "clip_l", "vae"}
    assert _digests(files["ckpt"]) == ldm
    assert _digests(files["kohya"]) == ldm
    assert _digests(files["unet"]) == {"diffusion_model": ldm["diffusion_model"]}
    from_parts = {}
    for part in parts:
        from_parts.update(_digests(part))
    assert from_parts == ldm
    # the file hashes all differ: other bytes
    assert len({hash_file(str(p))["sha256"] for p in files.values()}) == len(files)


def test_digest_is_the_definition(sd1_files):
    """Re-derived with the safetensors package from a ComfyUI part (canonical names already):
    BLAKE3 over the sorted lines "name, dtype, shape, BLAKE3 of the bytes"."""
    from safetensors import safe_open

    vae = next(p for p in sd1_files[1] if os.sep + "vae" + os.sep in p)
    with open(vae, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    header.pop("__metadata__", None)
    lines = []
    with safe_open(vae, "pt") as st:
        assert set(st.keys()) == set(header)
    for name, info in header.items():
        start, stop = info["data_offsets"]
        lines.append(f"{name}\t{info['dtype']}\t{json.dumps(info['shape'])}\t"
                     f"{blake3.blake3(data[start:stop]).hexdigest()}\n")
    text = DIGEST_VERSION + "\n" + "".join(sorted(lines))
    assert _digests(vae)["vae"] == blake3.blake3(text.encode()).hexdigest()


def test_one_value_changes_one_digest(sd1_files, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    files, _ = sd1_files
    tensors = load_file(str(files["ldm"]))
    key = next(k for k in sorted(tensors) if k.startswith("first_stage_model.decoder."))
    changed = tensors[key].clone()
    changed.view(-1)[0] += 1
    tensors[key] = changed
    other = tmp_path / "changed.safetensors"
    save_file(tensors, str(other), metadata={"note": "other metadata"})
    before, after = _digests(files["ldm"]), _digests(other)
    assert after["vae"] != before["vae"]
    assert {k: v for k, v in after.items() if k != "vae"} == \
        {k: v for k, v in before.items() if k != "vae"}
    # metadata and key order alone change nothing
    same = tmp_path / "reordered.safetensors"
    save_file(dict(reversed(list(load_file(str(files["ldm"])).items()))), str(same),
              metadata={"modelspec.title": "x"})
    assert _digests(same) == before
    assert torch.equal(load_file(str(same))[key], load_file(str(files["ldm"]))[key])


def test_transposed_and_fused_layouts(tmp_path):
    """SDXL's CLIP-G (open_clip's stacked q/k/v and transposed projection in the checkpoint,
    transformers' names in the part) and FLUX's fused q/k/v (diffusers stores to_k before
    to_q): the digests read the canonical bytes whatever the file's order."""
    sdxl = tmp_path / "xl.safetensors"
    sample("sdxl", str(sdxl), tiny=True, components=["clip_g"])
    part = split(str(sdxl), str(tmp_path / "parts"))[0]
    assert _digests(sdxl) == _digests(part)
    flux, fluxd = tmp_path / "f.safetensors", tmp_path / "fd.safetensors"
    sample("flux1-dev", str(flux), tiny=True, components=["diffusion_model"])
    sample("flux1-dev", str(fluxd), tiny=True, layout="diffusers",
           components=["diffusion_model"])
    assert _digests(flux) == _digests(fluxd)


def test_hashes_remembered_together(tmp_path):
    """Inside ``remembered_together`` the SHA-256 cache is written once, at the end."""
    paths = [tmp_path / f"{i}.bin" for i in range(3)]
    for i, path in enumerate(paths):
        path.write_bytes(bytes([i]) * 100)
    with hashing.remembered_together():
        found = [hash_file(str(p))["sha256"] for p in paths]
        assert hashing.cached_sha256(str(paths[0])) is None
    assert [hashing.cached_sha256(str(p)) for p in paths] == found
