"""The layout moves executed by the engine, each against the same operation done by torch."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from ckptkit.arch.layouts import Move
from ckptkit.engine.moves import plan_moves
from ckptkit.engine.writer import write_safetensors
from ckptkit.formats import open_checkpoint


@pytest.fixture
def source(tmp_path):
    path = tmp_path / "in.safetensors"
    save_file({"w": torch.arange(24, dtype=torch.float32).reshape(6, 4),
               "conv": torch.randn(8, 8, 1, 1), "b": torch.randn(6)}, str(path))
    return path


def _run(tmp_path, source, moves):
    out = tmp_path / "out.safetensors"
    with open_checkpoint(str(source)) as ck:
        write_safetensors(str(out), plan_moves(moves, ck), {})
    return load_file(str(out)), load_file(str(source))


def test_uneven_rows_reshape_and_swapped_halves(tmp_path, source):
    moves = [Move("q", ("w",), "rows", 0, sizes=(1, 2, 3)),
             Move("k", ("w",), "rows", 1, sizes=(1, 2, 3)),
             Move("mlp", ("w",), "rows", 2, sizes=(1, 2, 3)),
             Move("even", ("w",), "rows", 1, 3),
             Move("linear", ("conv",), "reshape", shape=(8, 8)),
             Move("swapped", ("b",), "swap_halves")]
    out, src = _run(tmp_path, source, moves)
    w = src["w"]
    assert torch.equal(out["q"], w[:1]) and torch.equal(out["k"], w[1:3])
    assert torch.equal(out["mlp"], w[3:]) and torch.equal(out["even"], w[2:4])
    assert torch.equal(out["linear"], src["conv"].squeeze(-1).squeeze(-1))
    assert torch.equal(out["swapped"], torch.cat(src["b"].chunk(2)[::-1]))


def test_sizes_that_do_not_add_up_are_refused(tmp_path, source):
    with pytest.raises(ValueError, match="has 6 rows, not 5"):
        _run(tmp_path, source, [Move("q", ("w",), "rows", 0, sizes=(2, 3))])


def test_row_blocks_and_stacks_of_contiguous_tensors_are_file_copies(tmp_path, source):
    """No tensor is read into memory for them: the plan's producers give byte ranges."""
    from ckptkit.engine.writer import CopyRange

    with open_checkpoint(str(source)) as ck:
        planned = plan_moves([Move("k", ("w",), "rows", 1, sizes=(1, 2, 3)),
                              Move("both", ("w", "w"), "concat")], ck)
        rows, stack = (p.produce() for p in planned)
        assert isinstance(rows, CopyRange) and rows.nbytes == 2 * 4 * 4
        assert isinstance(stack, tuple) and all(isinstance(r, CopyRange) for r in stack)
    out, src = _run(tmp_path, source, [Move("both", ("w", "w"), "concat")])
    assert torch.equal(out["both"], torch.cat([src["w"], src["w"]]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16,
                                   torch.float8_e4m3fn, torch.int64, torch.float64])
def test_transpose_and_swapped_halves_without_torch_equal_torch(tmp_path, dtype):
    """Both are byte reorderings done without torch; odd row counts swap uneven halves as
    torch's slicing does."""
    from ckptkit.engine.writer import CopyRange

    path = tmp_path / "in.safetensors"
    save_file({"m": torch.randn(5, 7).to(dtype), "odd": torch.randn(7, 3).to(dtype)},
              str(path))
    moves = [Move("t", ("m",), "transpose"), Move("s", ("odd",), "swap_halves")]
    with open_checkpoint(str(path)) as ck:
        made = [p.produce() for p in plan_moves(moves, ck)]
    assert isinstance(made[0], bytes) and all(isinstance(r, CopyRange) for r in made[1])
    out, src = _run(tmp_path, path, moves)
    assert out["t"].dtype == dtype and torch.equal(out["t"].view(torch.uint8),
                                                   src["m"].t().contiguous().view(torch.uint8))
    assert torch.equal(out["s"].view(torch.uint8),
                       torch.cat([src["odd"][3:], src["odd"][:3]]).view(torch.uint8))


def test_a_strided_pickled_tensor_is_transposed_through_torch(tmp_path):
    """A pickle may store a view with its own strides; its bytes in the file are not the
    matrix in row order, so the byte path must not be taken."""
    path = tmp_path / "in.pt"
    base = torch.randn(4, 6)
    torch.save({"m": base.t()}, str(path))  # stored as a transposed view of ``base``
    out = tmp_path / "out.safetensors"
    with open_checkpoint(str(path)) as ck:
        assert not ck["m"].is_contiguous
        write_safetensors(str(out), plan_moves([Move("t", ("m",), "transpose")], ck), {})
    assert torch.equal(load_file(str(out))["t"], base)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16,
                                   torch.float64, torch.float8_e5m2])
@pytest.mark.parametrize("value", [-0.0175018310546875, 4.6052, 1 / 3, 1e-8, 2.0 ** -133,
                                   65519.0, 1e39, -1e300, float("inf"), float("nan"),
                                   1.00390625, 1.01171875, 3.0000001])
def test_scalars_are_rounded_as_torch_rounds_them(tmp_path, dtype, value):
    """logit_scale recreated for a part that lacks it: the same bytes as torch.tensor()."""
    from ckptkit.formats.dtypes import from_torch_tensor

    scalar_dtype = from_torch_tensor(torch.zeros((), dtype=dtype))[0]
    with open_checkpoint(str(_empty(tmp_path))) as ck:
        (planned,) = plan_moves([Move("s", (), "scalar", value=value)], ck, {"s": scalar_dtype})
        made = planned.produce()
    expected = torch.tensor([value], dtype=dtype).view(torch.uint8).numpy().tobytes()
    got = made if isinstance(made, bytes) else made.reshape(1).view(torch.uint8).numpy().tobytes()
    assert got == expected


def _empty(tmp_path):
    path = tmp_path / "empty.safetensors"
    save_file({}, str(path))
    return path
