"""server/engine/attention.py over server/engine/kv_cache.py: padded prefill rows."""

from __future__ import annotations

import torch

from server.engine.attention import PagedAttention
from server.engine.kv_cache import KVCacheConfig, KVCacheManager


def test_padded_prefill_writes_padding_only_to_the_trash_block() -> None:
    cache = KVCacheManager(KVCacheConfig(2, 1, 4, num_blocks=8, block_size=4))
    assert cache.allocate("a", 2, 6) and cache.allocate("b", 2, 2)  # a: 2 blocks a layer, b: 1
    kv = PagedAttention(cache, ["a", "b"], [2, 2], [0, 0], 6, lengths=[6, 2])
    k = torch.stack([torch.full((6, 1, 4), 1.0), torch.full((6, 1, 4), 2.0)])
    kv.attend(0, torch.zeros(2, 6, 1, 4), k, k.clone())
    b0 = cache.tables("b")[0][0]
    assert cache.k[b0, :2].eq(2).all() and cache.k[b0, 2:].eq(0).all()  # its 2 tokens only
    assert all(cache.k[blk].eq(1).all() for blk in cache.tables("a")[0][:1])
    held = {blk for seq in ("a", "b") for table in cache.tables(seq).values() for blk in table}
    assert all(cache.k[blk].eq(0).all() for blk in range(8) if blk not in held)
    assert cache.k[cache.trash].eq(2).any()  # b's padding went there
    assert cache.num_used == len(held) == 2 * 2 + 2
