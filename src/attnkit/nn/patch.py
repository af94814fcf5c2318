"""`PatchEmbedding`: an image as a sequence of patch tokens, so the same encoder serves vision.

Following the Vision Transformer (Dosovitskiy et al., 2021, arXiv:2010.11929): the image is
cut into non-overlapping ``patch x patch`` squares, each flattened and linearly projected
(a strided convolution computes exactly that), optionally preceded by a learned ``[CLS]``
token, with learned absolute positions.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["PatchEmbedding"]


class PatchEmbedding(nn.Module):
    """``images (B, C, H, W)`` -> tokens ``(B, N, dim)`` with ``N = (H / patch) * (W / patch)`` (+1 with CLS).

    Args:
        patch: side of a square patch.
        in_channels: ``C``.
        dim: token width.
        image_size: ``(H, W)`` or an int; with it, learned positions for the ``N`` tokens are added.
        cls_token: prepend a learned classification token.
    """

    def __init__(
        self,
        patch: int,
        in_channels: int,
        dim: int,
        *,
        image_size: int | tuple[int, int] | None = None,
        cls_token: bool = False,
    ) -> None:
        super().__init__()
        if patch < 1:
            raise ValueError(f"PatchEmbedding: patch must be >= 1, got {patch}")
        self.patch = patch
        self.in_channels = in_channels
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch, stride=patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim)) if cls_token else None
        self.image_size: tuple[int, int] | None = None
        self.positions = None
        if image_size is not None:
            self.image_size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
            self._check_size(*self.image_size)
            n = (self.image_size[0] // patch) * (self.image_size[1] // patch) + (1 if cls_token else 0)
            self.positions = nn.Parameter(torch.empty(1, n, dim))
            nn.init.normal_(self.positions, std=0.02)
        if self.cls is not None:
            nn.init.normal_(self.cls, std=0.02)

    def _check_size(self, H: int, W: int) -> None:
        if H % self.patch or W % self.patch:
            raise ValueError(f"PatchEmbedding: image size (H, W) = {(H, W)} must be divisible by patch={self.patch}")

    def forward(self, images: Tensor) -> Tensor:
        if images.dim() != 4 or images.shape[1] != self.in_channels:
            raise ValueError(
                f"PatchEmbedding: images must be (B, C={self.in_channels}, H, W), got {tuple(images.shape)}"
            )
        H, W = images.shape[-2:]
        self._check_size(H, W)
        if self.image_size is not None and self.image_size != (H, W):
            raise ValueError(f"PatchEmbedding: built for images of {self.image_size}, got {(H, W)}")
        x = self.proj(images)  # (B, dim, H / patch, W / patch)
        x = x.flatten(2).transpose(1, 2)  # (B, N, dim), patches in row-major order
        if self.cls is not None:
            x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1)  # (B, 1 + N, dim)
        if self.positions is not None:
            x = x + self.positions
        return x
