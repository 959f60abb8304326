"""The prefix cache's index: full KV blocks by content, per cache layer.

A full block of `block_size` tokens at position i of a prompt is keyed by a hash of the
key of the block before it and its own token ids (vLLM's automatic prefix caching), so a
key names the block's tokens and every token before them. Unlike a server whose blocks
always hold every layer, a key here maps to one physical block per cache layer that
someone computed: a request at depth d computes layers [0, d) (and d's own exit layer for
balcony checkpoints), so its blocks serve any later request whose layers are among those
— a prompt computed at depth 30 serves depth 12 with the same tokens for free.

The hash is BLAKE2b (128 bits) over the parent key and the ids: a client cannot craft two
prompts that share a key, so no request ever reads another's KV for different tokens.
The block pool and reference counts are the KV manager's (kv_cache.py); this index knows
which blocks are cached, which of them nobody holds (idle, least recently used first:
the first to be reused for something else), and what admissions found.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence


class PrefixCache:
    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self.blocks: dict[bytes, dict[int, int]] = {}  # key -> cache layer -> block id
        self.owner: dict[int, tuple[bytes, int]] = {}  # block id -> (key, cache layer)
        self.idle: OrderedDict[int, None] = OrderedDict()  # cached, held by nobody; LRU first
        self.queries: dict[int, int] = {}  # depth -> prompt tokens of admissions that looked
        self.hits: dict[int, int] = {}  # depth -> of those, tokens found cached
        self.evictions = 0

    # -- keys ------------------------------------------------------------------------------
    def keys(self, tokens: Sequence[int], num_blocks: int) -> list[bytes]:
        """The keys of the first `num_blocks` full blocks of `tokens`."""
        return self.extend([], tokens, num_blocks)

    def extend(self, chain: list[bytes], tokens: Sequence[int], num_blocks: int) -> list[bytes]:
        """The keys of blocks len(chain) .. num_blocks - 1, `chain` being the keys before."""
        bs = self.block_size
        parent = chain[-1] if chain else b""
        out = []
        for i in range(len(chain), num_blocks):
            h = hashlib.blake2b(parent, digest_size=16)
            h.update(array("I", tokens[i * bs : (i + 1) * bs]).tobytes())
            parent = h.digest()
            out.append(parent)
        return out

    # -- the index -------------------------------------------------------------------------
    def match(self, keys: Sequence[bytes], layers: Sequence[int]) -> list[dict[int, int]]:
        """The longest run of `keys`, from the first, whose blocks hold every one of
        `layers`: their layer -> block maps."""
        out = []
        for key in keys:
            entry = self.blocks.get(key)
            if entry is None or not all(x in entry for x in layers):
                break
            out.append(entry)
        return out

    def insert(self, key: bytes, layer: int, block: int) -> bool:
        """Cache `block` as `key`'s KV at cache `layer`, unless that is cached already (by
        another block: the first stays) or `block` is cached under another key."""
        if block in self.owner or layer in self.blocks.get(key, ()):
            return False
        self.blocks.setdefault(key, {})[layer] = block
        self.owner[block] = (key, layer)
        return True

    def held(self, block: int) -> None:
        """A sequence took cached `block`: it is no longer idle."""
        self.idle.pop(block, None)

    def idles(self, block: int) -> bool:
        """The last holder released `block`: True when it is cached (it now waits, most
        recently used, for a reuse or an eviction); False when the pool takes it back."""
        if block not in self.owner:
            return False
        self.idle[block] = None
        return True

    def evict(self) -> int:
        """Forget the least recently used idle block and hand it over for new content."""
        block, _ = self.idle.popitem(last=False)
        key, layer = self.owner.pop(block)
        entry = self.blocks[key]
        del entry[layer]
        if not entry:
            del self.blocks[key]
        self.evictions += 1
        return block

    def count(self, depth: int, queried: int, hit: int) -> None:
        """An admission at `depth` looked up `queried` prompt tokens and found `hit`."""
        self.queries[depth] = self.queries.get(depth, 0) + queried
        self.hits[depth] = self.hits.get(depth, 0) + hit
