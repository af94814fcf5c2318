"""Whether fp32 inputs may use TF32 in the kernels' matmuls: torch's own setting decides.

Importing this module does not import Triton (the backend's dispatch uses it).
"""

from __future__ import annotations

import torch

__all__ = ["tf32_allowed"]


def tf32_allowed() -> bool:
    """Whether the user lets fp32 matmuls round their inputs to TF32.

    ``torch.set_float32_matmul_precision("high")`` (or ``"medium"``), equivalently
    ``torch.backends.cuda.matmul.allow_tf32 = True``; the default (``"highest"``) does not.
    """
    return torch.get_float32_matmul_precision() != "highest"
