"""Array helpers shared by metrics and retrieval: one 2-D float32 view, block bounds."""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import numpy as np
import torch

from helpers.core.errors import InputError

ArrayLike = np.ndarray | torch.Tensor


def as_float32_tensor(x: ArrayLike, name: str = "array") -> torch.Tensor:
    """Return ``x`` as a contiguous 2-D float32 CPU tensor, sharing memory when it can.

    A float32, C-contiguous NumPy array or CPU tensor is used as is (no copy); anything
    else is converted once. Raises :class:`InputError` for a non-2-D input or one holding
    NaN / inf.
    """
    if isinstance(x, torch.Tensor):
        t = x.detach().to(device="cpu", dtype=torch.float32)
    else:
        # from_numpy shares memory; ascontiguousarray is a no-op for a float32 C array. A
        # read-only array (a memory-mapped gallery) is shared too: nothing here writes to it,
        # so torch's warning about non-writable arrays does not apply.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    if t.ndim != 2:
        raise InputError(f"{name} must be 2-D [n, dim], got shape {tuple(t.shape)}")
    # NaN compares false with everything and would silently corrupt rankings. aminmax is
    # one reduction without input-sized temporaries (isfinite would allocate a few) and
    # propagates NaN.
    if t.numel() and not bool(torch.isfinite(torch.stack(torch.aminmax(t))).all()):
        raise InputError(f"{name} contains NaN or infinite values")
    return t.contiguous()


def chunks(n: int, size: int) -> Iterator[tuple[int, int]]:
    """Yield ``(start, stop)`` bounds covering ``range(n)`` in blocks of at most ``size``.

    >>> list(chunks(5, 2))
    [(0, 2), (2, 4), (4, 5)]
    >>> list(chunks(0, 3))
    []
    """
    if size < 1:
        raise ValueError(f"chunk size must be >= 1, got {size}")
    for start in range(0, n, size):
        yield start, min(start + size, n)
