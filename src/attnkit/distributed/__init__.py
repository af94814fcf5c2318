"""Context parallelism: exact attention over a sequence split across processes (`torch.distributed`).

* `ring_attention`: key/value shards travel around a ring, overlapped with the block
  compute; works for any head count; ``layout="zigzag"`` balances causal work.
* `ulysses_attention`: all-to-all from a sequence split to a head split and back
  (DeepSpeed-Ulysses); needs the world size to divide the query heads.
* `shard_sequence` / `unshard_sequence` / `shard` / `merge_shards`: cut and reassemble a
  sequence in either layout, padding lengths that do not divide.
* `context_parallel`: make every attnkit attention module of a model context-parallel.

Both attention functions run on gloo (CPU) and NCCL (GPU). See ``docs/distributed.md``.
"""

from attnkit.distributed.parallel import ContextParallel, context_parallel
from attnkit.distributed.ring import PeerError, overlap_block_length, ring_attention
from attnkit.distributed.sharding import (
    LAYOUTS,
    Layout,
    merge_shards,
    padded_length,
    segments,
    shard,
    shard_sequence,
    unshard_sequence,
)
from attnkit.distributed.ulysses import ulysses_attention

__all__ = [
    "LAYOUTS",
    "ContextParallel",
    "Layout",
    "PeerError",
    "context_parallel",
    "merge_shards",
    "overlap_block_length",
    "padded_length",
    "ring_attention",
    "segments",
    "shard",
    "shard_sequence",
    "ulysses_attention",
    "unshard_sequence",
]
