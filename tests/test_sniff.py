"""Format by content, never by name; each kind of not-a-checkpoint named in one sentence."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ckptkit.errors import FormatError, UnsafeFileError
from ckptkit.formats import detect_format, open_checkpoint


def refused(path: Path) -> FormatError:
    """Opens ``path`` expecting a FormatError whose message starts with the path."""
    with pytest.raises(FormatError) as info:
        open_checkpoint(path)
    message = str(info.value)
    assert message.startswith(str(path)), message
    assert info.value.path == str(path)
    return info.value


@pytest.fixture
def safetensors_file(tmp_path) -> Path:
    path = tmp_path / "good.safetensors"
    save_file({"a": torch.arange(6, dtype=torch.float32).reshape(2, 3),
               "b": torch.ones(4, dtype=torch.float16)}, path, metadata={"k": "v"})
    return path


@pytest.fixture(params=["zip", "legacy"])
def torch_file(request, tmp_path) -> Path:
    path = tmp_path / f"good-{request.param}.ckpt"
    torch.save({"state_dict": {"w": torch.arange(12.0).reshape(3, 4), "n": torch.tensor(3)}},
               path, _use_new_zipfile_serialization=(request.param == "zip"))
    return path


def test_empty_file(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"")
    assert "empty" in refused(path).reason


def test_directory(tmp_path):
    path = tmp_path / "model.ckpt"
    path.mkdir()
    assert "directory" in refused(path).reason


def test_missing_file(tmp_path):
    path = tmp_path / "absent.safetensors"
    assert "no such file" in refused(path).reason


@pytest.mark.parametrize("page", [
    b"<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head><body></body></html>",
    b"<html>\n<head><title>Sign in</title></head><body>Please log in</body></html>\n" * 20,
    b"\n\n  <!doctype html><html lang=\"en\"><body>Rate limit exceeded</body></html>",
])
def test_html_error_page(tmp_path, page):
    path = tmp_path / "model.safetensors"
    path.write_bytes(page)
    error = refused(path)
    assert "HTML" in error.reason
    assert not isinstance(error, UnsafeFileError)


def test_git_lfs_pointer(tmp_path):
    path = tmp_path / "v1-5-pruned-emaonly.safetensors"
    path.write_text("version https://git-lfs.github.com/spec/v1\n"
                    "oid sha256:6ce0161689b3853acaa03779ec93eafe75a02f4ced659bee03f50797806fa2fa\n"
                    "size 4265146304\n")
    assert "Git LFS" in refused(path).reason


@pytest.mark.parametrize("text", [
    json.dumps({"_class_name": "UNet2DConditionModel", "sample_size": 64}, indent=2),
    json.dumps([{"name": "unet"}, {"name": "vae"}]),
    json.dumps({"architectures": ["CLIPTextModel"], "hidden_size": 768}),
])
def test_json_file(tmp_path, text):
    path = tmp_path / "model.safetensors"
    path.write_text(text)
    assert "JSON" in refused(path).reason


def test_gguf_is_named(tmp_path):
    path = tmp_path / "flux.safetensors"
    path.write_bytes(b"GGUF" + struct.pack("<I", 3) + b"\x00" * 64)
    assert "GGUF" in refused(path).reason


def test_random_bytes(tmp_path):
    path = tmp_path / "noise.bin"
    path.write_bytes(bytes(range(256)) * 4)
    refused(path)


@pytest.mark.parametrize("size", [1, 2, 5, 7])
def test_few_bytes(tmp_path, size):
    path = tmp_path / "tiny.safetensors"
    path.write_bytes(b"\x07" * size)
    refused(path)


def test_plain_pickle_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "data.pkl.pt"
    path.write_bytes(b"\x80\x02}q\x00X\x01\x00\x00\x00aK\x01s.")
    error = refused(path)
    assert "pickle" in error.reason


def test_tar_legacy_checkpoint_is_refused(tmp_path):
    block = bytearray(1024)
    block[0:7] = b"storage"
    block[257:262] = b"ustar"
    path = tmp_path / "old.pt"
    path.write_bytes(bytes(block))
    assert isinstance(refused(path), UnsafeFileError)


def test_truncated_safetensors_in_the_length(tmp_path, safetensors_file):
    data = safetensors_file.read_bytes()
    for cut in range(1, 9):
        path = tmp_path / f"cut{cut}.safetensors"
        path.write_bytes(data[:cut])
        refused(path)


def test_truncated_safetensors_in_the_header(tmp_path, safetensors_file):
    data = safetensors_file.read_bytes()
    header_end = 8 + struct.unpack("<Q", data[:8])[0]
    for cut in range(9, header_end):
        path = tmp_path / "cut.safetensors"
        path.write_bytes(data[:cut])
        error = refused(path)
        assert "truncated" in error.reason, (cut, error.reason)


def test_truncated_safetensors_in_the_data(tmp_path, safetensors_file):
    data = safetensors_file.read_bytes()
    header_end = 8 + struct.unpack("<Q", data[:8])[0]
    assert len(data) - header_end == 6 * 4 + 4 * 2
    for cut in range(header_end, len(data)):
        path = tmp_path / "cut.safetensors"
        path.write_bytes(data[:cut])
        error = refused(path)
        assert "truncated" in error.reason, (cut, error.reason)


def test_truncated_torch_zip_anywhere(tmp_path):
    path = tmp_path / "full.pt"
    torch.save({"w": torch.randn(8, 8), "b": torch.arange(5), "h": torch.ones(3).half()}, path)
    data = path.read_bytes()
    cut_path = tmp_path / "cut.pt"
    for cut in range(1, len(data)):
        cut_path.write_bytes(data[:cut])
        error = refused(cut_path)
        if cut >= 4:  # from the first member header on, the sentence says what happened
            assert "truncated" in error.reason, (cut, error.reason)
            assert not isinstance(error, UnsafeFileError), (cut, error.reason)


def test_truncated_torch_legacy_anywhere(tmp_path):
    path = tmp_path / "full.pt"
    torch.save({"w": torch.randn(8, 8), "b": torch.arange(5), "h": torch.ones(3).half()}, path,
               _use_new_zipfile_serialization=False)
    data = path.read_bytes()
    cut_path = tmp_path / "cut.pt"
    unsafe = []
    for cut in range(1, len(data)):
        cut_path.write_bytes(data[:cut])
        error = refused(cut_path)
        if isinstance(error, UnsafeFileError):
            unsafe.append((cut, error.reason))
    # a download cut short is a broken file, not a hostile one: it must not be reported
    # as unsafe (exit code 4) just because the cut fell inside a GLOBAL opcode's name
    assert unsafe == [], f"{len(unsafe)} cuts reported as unsafe, e.g. {unsafe[:2]}"


def test_checkpoint_renamed_safetensors(tmp_path, torch_file):
    renamed = tmp_path / "model.safetensors"
    renamed.write_bytes(torch_file.read_bytes())
    with open_checkpoint(renamed) as ck, open_checkpoint(torch_file) as original:
        assert ck.format == original.format
        assert ck.format in ("torch-zip", "torch-legacy")
        assert set(ck) == {"w", "n"}
        assert torch.equal(ck["w"].read(), torch.arange(12.0).reshape(3, 4))
        assert any(".safetensors" in note for note in ck.notes), ck.notes
        assert not any(".ckpt" in note for note in original.notes)


def test_safetensors_renamed_ckpt(tmp_path, safetensors_file):
    for ext in (".ckpt", ".pt", ".pth", ".bin"):
        renamed = tmp_path / f"model{ext}"
        renamed.write_bytes(safetensors_file.read_bytes())
        with open_checkpoint(renamed) as ck:
            assert ck.format == "safetensors"
            assert ck.metadata == {"k": "v"}
            assert torch.equal(ck["a"].read(), torch.arange(6, dtype=torch.float32).reshape(2, 3))
            assert any(ext in note for note in ck.notes), ck.notes


@pytest.mark.parametrize("name", ["model", "model.weights", "model.SAFETENSORS", "model.sft"])
def test_unknown_or_matching_extension_has_no_note(tmp_path, safetensors_file, name):
    path = tmp_path / name
    path.write_bytes(safetensors_file.read_bytes())
    with open_checkpoint(path) as ck:
        assert ck.format == "safetensors"
        assert ck.notes == []


def test_detect_format_by_content(tmp_path, safetensors_file, torch_file):
    assert detect_format(str(safetensors_file)) == "safetensors"
    expected = "torch-zip" if "zip" in torch_file.name else "torch-legacy"
    assert detect_format(str(torch_file)) == expected
    swapped = tmp_path / "swapped.safetensors"
    swapped.write_bytes(torch_file.read_bytes())
    assert detect_format(str(swapped)) == expected


def test_zip_that_is_not_a_torch_checkpoint(tmp_path):
    import zipfile

    path = tmp_path / "model.ckpt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("readme.txt", "hello")
    refused(path)


def test_compressed_torch_zip_is_refused(tmp_path):
    import zipfile

    original = tmp_path / "orig.pt"
    torch.save({"w": torch.zeros(100)}, original)
    path = tmp_path / "rezipped.pt"
    with zipfile.ZipFile(original) as src, zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as out:
        for info in src.infolist():
            out.writestr(info.filename, src.read(info.filename))
    assert "compressed" in refused(path).reason
