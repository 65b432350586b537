"""Row reads and slice-at-a-time casting: the same values as whole-tensor torch operations."""


import pytest
import torch
from failing_writes import fill_the_disk, refuse_direct_io
from safetensors.torch import load_file, save_file

from ckptkit.engine import slices
from ckptkit.errors import OutputError
from ckptkit.formats import open_checkpoint
from ckptkit.ops.merge import merge
from ckptkit.ops.prune import prune
from ckptkit.ops.sample import sample


@pytest.fixture
def weights(tmp_path):
    gen = torch.Generator().manual_seed(0)
    state = {"big": torch.randn(37, 11, 3, generator=gen) * 3e4,
             "vec": torch.randn(5, generator=gen), "scalar": torch.tensor(2.5),
             "matrix": torch.randn(6, 8, generator=gen)}
    path = tmp_path / "w.safetensors"
    save_file(state, str(path))
    return path, state


def test_read_rows_reads_only_those_rows(weights):
    path, state = weights
    with open_checkpoint(str(path)) as ck:
        assert torch.equal(ck["big"].read_rows(4, 9), state["big"][4:9])
        assert torch.equal(ck["big"].read_rows(30, 99), state["big"][30:])
        assert ck["big"].read_rows(37, 40).shape == (0, 11, 3)


def test_a_cast_in_many_slices_equals_the_whole_cast(weights, tmp_path, monkeypatch):
    path, state = weights
    monkeypatch.setattr(slices, "SLICE_ELEMENTS", 40)  # about one row of "big" per slice
    out = tmp_path / "fp16.safetensors"
    report = prune(str(path), str(out), dtype="fp16")
    got = load_file(str(out))
    for key, value in state.items():
        assert torch.equal(got[key], value.clamp(-65504, 65504).half()), key
    assert report.clamped["big"] == int((state["big"].abs() > 65504).sum()) > 0


@pytest.fixture
def models(tmp_path):
    paths = [tmp_path / f"m{seed}.safetensors" for seed in (0, 1)]
    for seed, path in enumerate(paths):
        sample("sd1", str(path), tiny=True, dtype="fp32", seed=seed)
    return paths


def _merge(tmp_path, models, name):
    out = tmp_path / name
    merge("weighted-sum", [str(p) for p in models], str(out), params={"alpha": 0.25},
          dtype="fp16")
    return out


def test_direct_and_page_cache_writes_give_the_same_merge(models, tmp_path, monkeypatch):
    """Merged tensors are computed into the writer's buffers and written bypassing the page
    cache; where the file system refuses that, the same bytes go through it."""
    direct = _merge(tmp_path, models, "direct.safetensors")
    refuse_direct_io(monkeypatch)
    buffered = _merge(tmp_path, models, "buffered.safetensors")
    assert direct.read_bytes() == buffered.read_bytes()
    got, a, b = (load_file(str(p)) for p in (direct, *models))
    floats = [key for key, value in a.items() if value.is_floating_point()]
    assert len(floats) > 100
    for key in floats:
        assert torch.equal(got[key], torch.lerp(a[key], b[key], 0.25).half()), key


def test_a_full_disk_is_the_outputs_error_and_leaves_only_the_inputs(models, tmp_path,
                                                                     monkeypatch):
    fill_the_disk(monkeypatch)
    with pytest.raises(OutputError, match="no room for"):
        _merge(tmp_path, models, "out.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m0.safetensors", "m1.safetensors"]
