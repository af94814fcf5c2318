"""One case of docs/results/ab/run.sh: the tiled kernel's forward and forward+backward CPU time at N tokens."""

import sys
import time

import torch

import attnkit

variant, n = sys.argv[1], int(sys.argv[2])
torch.manual_seed(0)
q, k, v = (torch.randn(1, 8, n, 64) for _ in range(3))
opts = {"plain": {}, "causal": {"causal": True}, "awsc": {"alibi": True, "window": (512, 512), "softcap": 30.0}}[
    variant
]
qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))


def fwd():
    return attnkit.attention(q, k, v, backend="tiled", **opts)


def fwdbwd():
    attnkit.attention(qg, kg, vg, backend="tiled", **opts).sum().backward()


for f in (fwd, fwdbwd):
    f()  # warm-up
medians = []
for f in (fwd, fwdbwd):
    times = []
    for _ in range(3):
        t0 = time.process_time()
        f()
        times.append(time.process_time() - t0)
    medians.append(sorted(times)[1])
print(f"{medians[0]:.4f} {medians[1]:.4f}")
