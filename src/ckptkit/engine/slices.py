"""Element-wise work on big tensors a slice of rows at a time.

Casting a 250 MB fp32 embedding to fp16, or merging it with two others, needs only one slice
of each input at a time: each slice is read from the file on its own (``read_rows``), worked
on in fp32, and written into the output tensor. Memory is the output plus a few slices, not
every input whole plus their fp32 copies.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import contextmanager
from typing import Any

from ..formats import LazyTensor
from ..formats.dtypes import DType, torch_dtype

SLICE_ELEMENTS = 1 << 22  # elements per slice: 16 MiB in fp32


def _reader(tensor: LazyTensor, mapped: bool) -> Callable[[int, int], Any]:
    """Rows ``start:stop``: views of the memory-mapped file (``mapped``: no copy, the pages
    count as file cache, not private memory), or private copies of just those rows; a
    tensor that cannot be read by rows is read once."""
    if mapped:
        whole = tensor.load()
    elif tensor.byte_rows:
        return tensor.read_rows
    else:
        whole = tensor.read()
    return lambda start, stop: whole[start:stop]


def by_rows(sources: Sequence[LazyTensor], out_dtype: DType,
            compute: Callable[[list[Any]], Any], mapped: bool = False, out: Any = None) -> Any:
    """``compute`` (inputs' slices -> output slice, any float dtype) over all rows of
    ``sources``, which share one shape; the result in ``out_dtype``, written into ``out``
    when given (the output file's pages)."""
    import torch

    shape = sources[0].shape
    target = torch_dtype(out_dtype)
    if not shape or sources[0].numel == 0:
        result = compute([s.read() for s in sources]).to(target)
        return result if out is None else out.copy_(result)
    if out is None:
        out = torch.empty(shape, dtype=target)
    step = max(1, SLICE_ELEMENTS // max(1, sources[0].numel // shape[0]))
    readers = [_reader(s, mapped) for s in sources]
    for start in range(0, shape[0], step):
        out[start:start + step].copy_(compute([read(start, start + step) for read in readers]))
    return out


def may_exceed(data, limit: float) -> bool:
    """Whether a slice may hold values beyond ``limit``: one pass for its extremes, so the
    counting pass runs only for the rare slice that needs it (or one with NaN, whose
    extremes say nothing)."""
    import torch

    if data.numel() == 0:
        return False
    if data.element_size() == 1:  # no min/max kernels for fp8
        return True
    low, high = torch.aminmax(data)
    return bool(high > limit or low < -limit or torch.isnan(high))


# glibc's mallopt parameters, and its defaults (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_DEFAULT_THRESHOLD = 128 * 1024


@contextmanager
def heap_for_temporaries():
    """glibc gives each allocation over 128 KB (at first) its own mapping, returned to the
    system when freed, so every 1 MB temporary of every slice costs 256 page faults: the
    Q8_0 kernel ran at 29 ns a value, its dequantization at 19, against 6.6 and 0.45 with
    the temporaries kept on the heap (2^18 values, one thread). Allocations up to 64 MB are
    taken from the heap, and up to 256 MB of freed heap is kept, inside the block; glibc's
    defaults are set back after. Slice-by-slice work elsewhere (a dequantizing convert, a cast
    at load) may gain the same. No-op where the C library is not glibc."""
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        yield
        return
    mallopt(_M_MMAP_THRESHOLD, 64 << 20)
    mallopt(_M_TRIM_THRESHOLD, 256 << 20)
    try:
        yield
    finally:
        mallopt(_M_MMAP_THRESHOLD, _DEFAULT_THRESHOLD)
        mallopt(_M_TRIM_THRESHOLD, _DEFAULT_THRESHOLD)
        getattr(libc, "malloc_trim", lambda pad: None)(0)
