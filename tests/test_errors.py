"""Bad input gets a clear error naming the argument, what was expected and what arrived."""

from __future__ import annotations

import pytest
import torch

import attnkit
from tests.conftest import make_qkv

SMALL = dict(B=2, Hq=4, Lq=5, Lk=6, D=8, dtype=torch.float32)


def check(match, exc=ValueError, **kwargs):
    q, k, v = kwargs.pop("inputs", None) or make_qkv(**SMALL)
    with pytest.raises(exc, match=match):
        attnkit.attention(q, k, v, **kwargs)


def test_wrong_rank_names_argument_and_shape():
    q, k, v = make_qkv(**SMALL)
    with pytest.raises(ValueError, match=r"q must be 4-D \(B, Hq, Lq, D\), got shape \(4, 5, 8\)"):
        attnkit.attention(q[0], k, v)
    with pytest.raises(ValueError, match=r"v must be 4-D"):
        attnkit.attention(q, k, v[0])


def test_mismatched_batch_heads_and_dims():
    q, k, v = make_qkv(**SMALL)
    with pytest.raises(ValueError, match=r"batch sizes differ: q \(2, 4, 5, 8\), k \(1, 2, 6, 8\)"):
        attnkit.attention(q, k[:1], v)
    # k's own head dim in the message, not another of its axes (k is (2, 2, 6, 4) here)
    with pytest.raises(ValueError, match=r"head dims differ: q \(2, 4, 5, 8\) \(D=8\), k \(2, 2, 6, 4\) \(D=4\)$"):
        attnkit.attention(q, k[..., :4], v)
    with pytest.raises(ValueError, match=r"k and v must have the same heads and length"):
        attnkit.attention(q, k, v[:, :, :3])
    with pytest.raises(ValueError, match=r"Hq=4 must be a multiple of key/value heads Hk=3"):
        attnkit.attention(q, *make_qkv(**SMALL, Hk=3)[1:])


def test_dtype_and_device_mismatch():
    q, k, v = make_qkv(**SMALL)
    with pytest.raises(TypeError, match=r"share a dtype; q is torch.float32, k is torch.float64"):
        attnkit.attention(q, k.double(), v)
    with pytest.raises(TypeError, match=r"floating-point"):
        attnkit.attention(q.long(), k, v)
    meta = torch.randn(2, 2, 6, 8, device="meta")
    with pytest.raises(ValueError, match=r"one device; q is on cpu, k on meta"):
        attnkit.attention(q, meta, v)


def test_masks():
    check(
        r"mask of shape \(2, 4, 5, 7\) does not broadcast to \(B, Hq, Lq, Lk\) = \(2, 4, 5, 6\)",
        mask=torch.ones(2, 4, 5, 7, dtype=torch.bool),
    )
    check(r"its Hq axis is 2, expected 1 or 4", mask=torch.ones(2, 2, 5, 6, dtype=torch.bool))
    check(r"mask must be bool .* got torch.int64", TypeError, mask=torch.ones(5, 6, dtype=torch.long))
    check(r"at most 4 dims", mask=torch.ones(1, 2, 4, 5, 6, dtype=torch.bool))


def test_options():
    check(r"window sides must be non-negative ints or None, got \(-1, 2\)", window=(-1, 2))
    check(r"window sides must be non-negative", window=-3)
    check(r"window must be an int, a \(left, right\) pair or None", TypeError, window=(1, 2, 3))
    check(r"softcap must be a finite number > 0 \(None turns it off\), got 0", softcap=0)
    check(r"softcap must be a finite number > 0", softcap=-1.0)
    check(r"scale must be a finite number", scale=float("nan"))
    check(r"dropout_p must lie in \[0, 1\), got 1.0", dropout_p=1.0)
    check(r"dropout_p must lie in \[0, 1\), got -0.1", dropout_p=-0.1)
    check(r"dropout_p must lie in \[0, 1\), got False", dropout_p=False)  # a bool is not a rate
    check(r"dropout_p must lie in \[0, 1\), got '0.1'", dropout_p="0.1")
    check(r"alibi must be True or float slopes of shape \(Hq,\) = \(4,\)", alibi=torch.ones(3))
    # Python ints are not promoted to float slopes, as an int tensor is not
    check(r"alibi must be True or float slopes .* got torch.int64 of shape \(4,\)", alibi=[1, 2, 3, 4])
    check(r"causal must be a bool", TypeError, causal=1)
    check(r"backend must be 'auto' or one of", backend="flash9")


def test_backend_that_cannot_run_the_request_says_what_to_change():
    q, k, v = make_qkv(**SMALL)
    with pytest.raises(
        ValueError,
        match=r"backend='sdpa' cannot compute this request: SDPA has no softcap. Use backend='auto', or 'tiled'",
    ):
        attnkit.attention(q, k, v, softcap=5.0, backend="sdpa")


def test_attention_weights_refuses_huge_matrices():
    q = torch.empty(1, 64, 16384, 8, device="meta")
    k = torch.empty(1, 64, 16384, 8, device="meta")
    with pytest.raises(ValueError, match=r"needs 64.0 GiB .* use attnkit.attention_stats"):
        attnkit.attention_weights(q, k)
