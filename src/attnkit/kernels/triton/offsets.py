"""32-bit addressing: the Triton kernels compute every element offset in int32.

Importing this module does not import Triton (the backend's refusal uses it).
"""

from __future__ import annotations

from torch import Tensor

__all__ = ["OFFSET_LIMIT", "addressable", "furthest_element"]

# The kernels address every tensor with 32-bit offsets: the furthest element each one reads or
# writes must lie below 2**31 (a dense (4, 16, 8192, 8192) mask is 2**32 elements).
OFFSET_LIMIT = 2**31


def furthest_element(shape: tuple[int, ...], strides: tuple[int, ...]) -> int:
    """The largest offset ``sum((size - 1) * stride)`` a kernel computes for a tensor (0 on broadcast axes)."""
    return sum((n - 1) * abs(s) for n, s in zip(shape, strides, strict=True))


def addressable(x: Tensor) -> Tensor:
    """``x`` as the kernels read it: head dim contiguous and every element within 32-bit reach (else a copy)."""
    if x.stride(-1) == 1 and furthest_element(tuple(x.shape), x.stride()) < OFFSET_LIMIT:
        return x
    return x.contiguous()
