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
