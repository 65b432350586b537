"""Round trips against real ``torch.save`` files, zip and legacy, checked against ``torch.load``.

Every file here is written by torch itself; our reader must give back, for every tensor, the
same dtype, shape and bytes as ``torch.load(path, weights_only=True)`` gives, through both
``read`` (private copy) and ``load`` (zero-copy view), and exactly the tensor keys of the
state dict it located inside whatever wrapper the file uses.
"""

from __future__ import annotations

import io
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from ckptkit.formats import open_checkpoint
from ckptkit.formats.dtypes import from_torch

FORMATS = {"zip": "torch-zip", "legacy": "torch-legacy"}


@pytest.fixture(params=sorted(FORMATS))
def container(request) -> str:
    return request.param


def save(obj, path: Path, container: str) -> Path:
    torch.save(obj, path, _use_new_zipfile_serialization=(container == "zip"))
    return path


def as_bytes(tensor: torch.Tensor) -> bytes:
    """Row-major bytes of ``tensor`` (a contiguous copy viewed as uint8)."""
    flat = tensor.detach().contiguous().reshape(-1)
    if flat.numel() == 0:
        return b""
    return flat.view(torch.uint8).numpy().tobytes()


def assert_same_tensor(ours: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    assert isinstance(ours, torch.Tensor), what
    assert ours.dtype == ref.dtype, f"{what}: dtype {ours.dtype} != {ref.dtype}"
    assert tuple(ours.shape) == tuple(ref.shape), f"{what}: shape {ours.shape} != {ref.shape}"
    assert as_bytes(ours) == as_bytes(ref), f"{what}: bytes differ"


def node_at(root, weights_at: str):
    node = root
    for part in filter(None, weights_at.split(".")):
        node = node[part]
    return node


def tensor_items(node) -> dict[str, torch.Tensor]:
    return {k: v for k, v in node.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}


def check_against(path: Path, expected: dict[str, torch.Tensor], *, fmt: str,
                  weights_at: str = "") -> None:
    """Our reader gives exactly ``expected`` (keys, dtypes, shapes, bytes), via read/load/raw."""
    with open_checkpoint(path) as ck:
        assert ck.format == fmt
        assert ck.weights_at == weights_at
        assert set(ck) == set(expected)
        assert len(ck) == len(expected)
        for key, ref in expected.items():
            lazy = ck[key]
            assert lazy.dtype == from_torch(ref.dtype), key
            assert lazy.shape == tuple(ref.shape), key
            assert_same_tensor(lazy.read(), ref, f"{key}.read()")
            assert_same_tensor(lazy.load(), ref, f"{key}.load()")
            assert bytes(lazy.raw()) == as_bytes(ref), f"{key}.raw()"


def check_file(path: Path, container: str, weights_at: str = "", **load_kwargs) -> dict:
    """Compares our reader with ``torch.load(weights_only=True)``; returns torch's object."""
    ref_root = torch.load(path, weights_only=True, **load_kwargs)
    expected = tensor_items(node_at(ref_root, weights_at))
    assert expected, "the test file must hold tensors"
    check_against(path, expected, fmt=FORMATS[container], weights_at=weights_at)
    return ref_root


def special_values(dtype: torch.dtype) -> torch.Tensor:
    """A 3x5 tensor of ``dtype`` with the values that break sloppy readers (nan, inf, -0.0,
    extremes), so that a bitwise comparison means something."""
    if dtype == torch.bool:
        return torch.tensor([[True, False, True, True, False]] * 3)
    if dtype.is_floating_point:
        if dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            base = torch.tensor([0.0, -0.0, 1.5, -2.0, 0.015625])
            rows = [base, base * 4, base / 2]
            out = torch.stack(rows).to(dtype)
            if dtype == torch.float8_e5m2:
                out[0, 0] = float("inf")
            out[2, 4] = float("nan")
            return out
        info = torch.finfo(dtype)
        vals = [0.0, -0.0, float("inf"), float("-inf"), float("nan"), info.max, info.min,
                info.tiny, info.eps, 1.0 / 3.0, -1.0e-3, 12345.678, 2.5, -7.0, 0.1]
        return torch.tensor(vals, dtype=torch.float64).to(dtype).reshape(3, 5)
    info = torch.iinfo(dtype)
    vals = [info.min, info.max, 0, 1, -1 if info.min < 0 else 2, 7, 100, info.max - 1,
            info.min + 1, 42, 3, 5, 9, 11, 13]
    return torch.tensor(vals, dtype=torch.int64).to(dtype).reshape(3, 5)


DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.uint8,
          torch.int16, torch.int32, torch.int64, torch.bool, torch.float8_e4m3fn,
          torch.float8_e5m2]


def test_dtype_names_match_safetensors_spelling():
    expected = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                torch.float64: "F64", torch.int8: "I8", torch.uint8: "U8", torch.int16: "I16",
                torch.int32: "I32", torch.int64: "I64", torch.bool: "BOOL",
                torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}
    assert {d: from_torch(d).name for d in DTYPES} == expected


def test_every_dtype_round_trips(tmp_path, container):
    obj = {f"t.{str(d).removeprefix('torch.')}": special_values(d) for d in DTYPES}
    # the same values again in one tensor of each dtype with a non-trivial shape
    obj.update({f"big.{str(d).removeprefix('torch.')}": special_values(d).repeat(7, 3)
                for d in DTYPES})
    path = save(obj, tmp_path / "dtypes.pt", container)
    has_fp8 = {torch.float8_e4m3fn, torch.float8_e5m2}
    if container == "legacy":
        # torch 2.13's own legacy loader cannot read the float8 storages it writes
        # (UntypedStorage has no dtype), so the float8 tensors are checked against the
        # objects that were saved, everything else against torch.load.
        ref = torch.load(save({k: v for k, v in obj.items() if v.dtype not in has_fp8},
                              tmp_path / "no_fp8.pt", container), weights_only=True)
        ref.update({k: v for k, v in obj.items() if v.dtype in has_fp8})
        check_against(path, ref, fmt="torch-legacy")
    else:
        ref = check_file(path, container)
        assert {v.dtype for v in ref.values()} == set(DTYPES)
    for key, value in obj.items():  # and torch.load agreed with what was saved
        assert_same_tensor(ref[key], value, key)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_one_dtype_alone(tmp_path, container, dtype):
    tensor = special_values(dtype)
    path = save({"w": tensor}, tmp_path / "one.ckpt", container)
    if container == "legacy" and dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        check_against(path, {"w": tensor}, fmt="torch-legacy")
    else:
        check_file(path, container)


def test_views_and_shared_storages(tmp_path, container):
    base = torch.arange(48, dtype=torch.float32).reshape(6, 8) * 0.5 - 3
    other = torch.arange(30, dtype=torch.int64).reshape(5, 6)
    obj = {
        "base": base,
        "alias": base,  # two keys, one tensor, one storage
        "slice": base[1:3, ::2],
        "transposed": base.t(),
        "column": base[:, 3],
        "offset": base.view(-1)[5:13],
        "offset_2d": base[2:5, 1:7],
        "step": base.view(-1)[3::5],
        "expanded": base[0:1, :].expand(4, 8),
        "other_t": other.t()[1:, ::3],
        "other": other,
        "scalar_view": base[2, 3],
    }
    path = save(obj, tmp_path / "views.pt", container)
    check_file(path, container)
    with open_checkpoint(path) as ck:
        views = ["base", "alias", "slice", "transposed", "column", "offset", "offset_2d",
                 "step", "expanded", "scalar_view"]
        assert len({ck[k].storage_id for k in views}) == 1
        assert ck["other"].storage_id == ck["other_t"].storage_id != ck["base"].storage_id
        # load() is zero-copy: views of one storage point into the same mapped bytes
        base_ptr = ck["base"].load().data_ptr()
        assert ck["alias"].load().data_ptr() == base_ptr
        assert ck["offset"].load().data_ptr() == base_ptr + 5 * 4
        assert ck["slice"].load().data_ptr() == base_ptr + 8 * 4
        # read() gives a contiguous private copy even of non-contiguous views
        assert ck["transposed"].read().is_contiguous()


def test_storage_offset_alone(tmp_path, container):
    """A tensor that is the tail of a bigger storage whose other part is not saved."""
    big = torch.randn(100, dtype=torch.float64)
    obj = {"tail": big[90:], "middle": big[40:50].view(2, 5)}
    path = save(obj, tmp_path / "tail.pt", container)
    check_file(path, container)
    with open_checkpoint(path) as ck:
        assert ck["tail"].storage_offset == 90
        assert ck["middle"].storage_offset == 40


def test_parameters(tmp_path, container):
    obj = {"p": torch.nn.Parameter(torch.randn(3, 4)),
           "frozen": torch.nn.Parameter(torch.randn(2), requires_grad=False),
           "plain": torch.randn(5, requires_grad=True)}
    path = save(obj, tmp_path / "params.pth", container)
    ref = check_file(path, container)
    assert isinstance(ref["p"], torch.nn.Parameter)


def test_parameter_with_extra_attribute(tmp_path, container):
    """torch writes _rebuild_parameter_with_state when a parameter carries attributes."""
    param = torch.nn.Parameter(torch.arange(6.0))
    param.tag = "kept"
    path = save({"p": param}, tmp_path / "pstate.pt", container)
    ref = check_file(path, container)
    assert ref["p"].tag == "kept"


class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.norm = torch.nn.BatchNorm2d(4)
        self.emb = torch.nn.Embedding(10, 4)
        self.head = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(),
                                        torch.nn.Linear(8, 2, bias=False))
        self.register_buffer("scale", torch.tensor(0.125))
        self.register_buffer("ids", torch.arange(7))


def _tiny_state_dict(dtype=None) -> dict:
    torch.manual_seed(0)
    model = _Tiny()
    if dtype is not None:
        model = model.to(dtype)
    return model.state_dict()


def test_module_state_dict(tmp_path, container):
    state = _tiny_state_dict()
    assert hasattr(state, "_metadata")  # what makes torch write a BUILD with _metadata
    path = save(state, tmp_path / "model.pt", container)
    check_file(path, container)
    with open_checkpoint(path) as ck:
        assert "_metadata" not in ck
        assert set(ck) == set(state)
        assert ck["norm.num_batches_tracked"].dtype.name == "I64"
        assert ck["norm.num_batches_tracked"].shape == ()


def test_half_module_state_dict(tmp_path, container):
    path = save(_tiny_state_dict(torch.float16), tmp_path / "half.pt", container)
    check_file(path, container)


@pytest.mark.parametrize(("wrap", "weights_at"), [
    (lambda sd: {"state_dict": sd}, "state_dict"),
    (lambda sd: {"model": sd}, "model"),
    (lambda sd: {"model": {"model": sd}}, "model.model"),
    (lambda sd: {"module": sd, "step": 3}, "module"),
    (lambda sd: {"model_state_dict": sd, "optimizer_state_dict": {"state": {}},
                 "epoch": 4}, "model_state_dict"),
    (lambda sd: {"ema": sd}, "ema"),
    (lambda sd: {"state_dict": sd, "model": {"a": 1}}, "state_dict"),
], ids=["state_dict", "model", "model.model", "module", "model_state_dict", "single-key",
        "state_dict-first"])
def test_nested_wrappers(tmp_path, container, wrap, weights_at):
    path = save(wrap(_tiny_state_dict()), tmp_path / "wrapped.ckpt", container)
    check_file(path, container, weights_at=weights_at)


def _numpy_safe_globals():
    multiarray = getattr(np, "_core", None) or np.core
    return [multiarray.multiarray.scalar, np.dtype, np.dtypes.Float64DType,
            np.dtypes.Float32DType, np.dtypes.Float16DType, np.dtypes.Int64DType,
            np.dtypes.Int32DType, np.dtypes.BoolDType, np.dtypes.UInt8DType]


def _lightning_checkpoint():
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3),
                                torch.nn.Linear(3, 2))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    model(torch.randn(5, 4)).square().sum().backward()
    optimizer.step()
    scheduler.step()
    hyper = {"lr": 1e-3, "name": "tiny", "layers": [4, 3, 2], "betas": (0.9, 0.999),
             "use_ema": False, "nothing": None,
             "np_f64": np.float64(0.5), "np_f32": np.float32(1.5), "np_f16": np.float16(-2.0),
             "np_i64": np.int64(-3), "np_i32": np.int32(7), "np_bool": np.bool_(True),
             "np_u8": np.uint8(200)}
    return {
        "epoch": 3,
        "global_step": 120,
        "pytorch-lightning_version": "2.1.0",
        "state_dict": model.state_dict(),
        "loops": {"fit_loop": {"epoch_progress": {"total": {"ready": 4}}}},
        "callbacks": {"ModelCheckpoint{'monitor': 'val/loss', 'mode': 'min'}": {
            "best_model_score": None, "best_model_path": "/x/epoch=2.ckpt",
            "kth_value": np.float64(0.25)}},
        "optimizer_states": [optimizer.state_dict()],
        "lr_schedulers": [scheduler.state_dict()],
        "hyper_parameters": hyper,
    }, optimizer.state_dict()


def test_lightning_checkpoint(tmp_path, container):
    obj, opt_state = _lightning_checkpoint()
    path = save(obj, tmp_path / "last.ckpt", container)
    with torch.serialization.safe_globals(_numpy_safe_globals()):
        ref = check_file(path, container, weights_at="state_dict")
    assert ref["hyper_parameters"]["np_f64"] == 0.5
    with open_checkpoint(path) as ck:
        extras = ck.extras
        assert extras["global_step"] == 120
        assert extras["epoch"] == 3
        assert extras["pytorch-lightning_version"] == "2.1.0"
        hyper = extras["hyper_parameters"]
        # numpy scalars are read as plain data, with their exact values
        assert hyper["np_f64"] == 0.5 and isinstance(hyper["np_f64"], float)
        assert hyper["np_f32"] == 1.5
        assert hyper["np_f16"] == -2.0
        assert hyper["np_i64"] == -3 and isinstance(hyper["np_i64"], int)
        assert hyper["np_i32"] == 7
        assert hyper["np_bool"] is True
        assert hyper["np_u8"] == 200
        assert hyper["lr"] == 1e-3 and hyper["name"] == "tiny" and hyper["use_ema"] is False
        assert hyper["nothing"] is None
        # the optimizer state is summarised, never loaded: it names its tensor count
        adam_tensors = [v for s in opt_state["state"].values() for v in s.values()
                        if isinstance(v, torch.Tensor)]
        assert len(adam_tensors) == 18
        summary = str(extras["optimizer_states"])
        assert f"{len(adam_tensors)} tensors" in summary
        assert "lr_schedulers" in extras and "callbacks" in extras and "loops" in extras
        assert not any(key.startswith("state_dict") for key in extras)
        # nothing from the optimizer leaked into the weights
        assert set(ck) == set(obj["state_dict"])


def test_numpy_scalar_at_top_level_is_data(tmp_path, container):
    obj = {"w": torch.ones(2), "ratio": np.float64(0.5), "count": np.int64(9)}
    path = save(obj, tmp_path / "np.pt", container)
    with torch.serialization.safe_globals(_numpy_safe_globals()):
        check_file(path, container)
    with open_checkpoint(path) as ck:
        assert ck.extras["ratio"] == 0.5
        assert ck.extras["count"] == 9


def test_empty_and_scalar_tensors(tmp_path, container):
    obj = {
        "empty": torch.empty(0),
        "empty_2d": torch.empty(0, 3),
        "empty_mid": torch.empty(2, 0, 5, dtype=torch.float16),
        "empty_bool": torch.empty(0, dtype=torch.bool),
        "scalar_f32": torch.tensor(3.5),
        "scalar_i64": torch.tensor(-7),
        "scalar_bool": torch.tensor(True),
        "scalar_bf16": torch.tensor(0.1, dtype=torch.bfloat16),
        "one": torch.ones(1, 1, 1),
    }
    path = save(obj, tmp_path / "tiny.pt", container)
    check_file(path, container)
    with open_checkpoint(path) as ck:
        assert ck["scalar_f32"].shape == ()
        assert ck["empty_mid"].shape == (2, 0, 5)
        assert ck["empty"].read().numel() == 0


def test_saved_to_bytesio(tmp_path):
    buf = io.BytesIO()
    state = _tiny_state_dict()
    torch.save({"state_dict": state}, buf)
    path = tmp_path / "from_memory.ckpt"
    path.write_bytes(buf.getvalue())
    assert all(n.startswith("archive/") for n in zipfile.ZipFile(path).namelist())
    check_file(path, "zip", weights_at="state_dict")


def test_saved_to_bytesio_legacy(tmp_path):
    buf = io.BytesIO()
    torch.save(_tiny_state_dict(), buf, _use_new_zipfile_serialization=False)
    path = tmp_path / "from_memory_legacy.pt"
    path.write_bytes(buf.getvalue())
    check_file(path, "legacy")


@pytest.mark.parametrize("name", ["model", "weights.v2.final", "modèle v2.pt", "a-b_c"])
def test_unusual_file_names(tmp_path, container, name):
    path = save(_tiny_state_dict(), tmp_path / name, container)
    check_file(path, container)
    with open_checkpoint(path) as ck:
        assert not any("named" in note for note in ck.notes), ck.notes


def test_read_copies_and_load_never_writes_the_file(tmp_path, container):
    obj = {"w": torch.arange(12, dtype=torch.float32).reshape(3, 4)}
    path = save(obj, tmp_path / "sacred.pt", container)
    before = path.read_bytes()
    with open_checkpoint(path) as ck:
        copied = ck["w"].read()
        viewed = ck["w"].load()
        copied.fill_(-1.0)
        assert torch.equal(ck["w"].read(), obj["w"])  # read() is a private copy
        viewed.fill_(99.0)  # copy-on-write map: the file must not change
        assert viewed.data_ptr() != copied.data_ptr()
    del viewed
    assert path.read_bytes() == before
    assert torch.equal(torch.load(path, weights_only=True)["w"], obj["w"])


def test_many_tensors(tmp_path, container):
    obj = {f"blocks.{i}.w": torch.full((i % 5 + 1, 3), float(i)) for i in range(300)}
    path = save(obj, tmp_path / "many.pt", container)
    check_file(path, container)


def test_non_weight_entries_in_state_dict_are_extras(tmp_path, container):
    obj = {"w": torch.ones(3), "b": torch.zeros(2), "version": 2, "name": "x", 5: torch.ones(1)}
    path = save(obj, tmp_path / "mixed.pt", container)
    ref = torch.load(path, weights_only=True)
    check_against(path, {"w": ref["w"], "b": ref["b"]}, fmt=FORMATS[container])
    with open_checkpoint(path) as ck:
        assert ck.extras["version"] == 2
        assert ck.extras["name"] == "x"
        assert "5" in ck.extras


EXTRA_DTYPES = [torch.uint16, torch.uint32, torch.uint64, torch.complex64,
                torch.float8_e4m3fnuz, torch.float8_e5m2fnuz, torch.float8_e8m0fnu]


@pytest.mark.parametrize("dtype", EXTRA_DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_more_dtypes_torch_writes(tmp_path, container, dtype):
    """Types beyond the common ones, in both containers (torch 2.13 cannot read most of them
    back from a legacy file, so there the saved tensor is the reference)."""
    raw = torch.arange(48, dtype=torch.int64).mul(29).remainder(256).to(torch.uint8)
    tensor = raw[: 48 - 48 % dtype.itemsize].view(dtype).reshape(2, -1)
    obj = {"t": tensor, "t_view": tensor[:, 1:]}
    path = save(obj, tmp_path / "extra.pt", container)
    if container == "zip":
        check_file(path, container)
    check_against(path, obj, fmt=FORMATS[container])


_USE_AFTER_CLOSE = textwrap.dedent("""
    import sys
    import torch
    from ckptkit.formats import open_checkpoint
    with open_checkpoint(sys.argv[1]) as ck:
        viewed = ck["w"].load()
        copied = ck["w"].read()
    # the checkpoint is closed; the tensors it handed out are still the caller's
    print(float(copied.sum()), float(viewed.sum()), flush=True)
""")


def run_use_after_close(path: Path) -> subprocess.CompletedProcess:
    """Runs the use-after-close script in a child, so that a crash fails only the test."""
    return subprocess.run([sys.executable, "-c", _USE_AFTER_CLOSE, str(path)],
                          capture_output=True, text=True, timeout=120)


def test_load_view_outlives_close(tmp_path, container):
    """``with open_checkpoint(p) as ck: t = ck[k].load()`` then using ``t``: the view must stay
    valid (Source.close says the map goes with the last view), never crash the process."""
    path = save({"w": torch.arange(1000, dtype=torch.float32)}, tmp_path / "w.pt", container)
    done = run_use_after_close(path)
    assert done.returncode == 0, (done.returncode, done.stderr[-400:])
    assert done.stdout.split() == ["499500.0", "499500.0"]
