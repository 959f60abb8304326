"""KV-cache manager: fixed-size blocks, held only in the layers a sequence runs.

One pool of blocks serves every cache layer: a block is `block_size` token slots of keys
and values for one layer. Cache layers are the model's decoder layers [0, L), then, for a
checkpoint with exit layers of its own (balcony), one per such exit (`exit_kv_layer`). A
sequence at depth d holds, for each layer it runs (`layers(d)`: [0, d), plus d's exit
layer if any), a block table with ceil(tokens / block_size) blocks — so its bytes are
(d + 1)/L (balcony) or d/L of a full-depth sequence, and the same memory admits more
shallow sequences. A speculating sequence may also hold its draft exit's layer
(`add_layer`). Lowering a sequence's depth frees the dropped layers' blocks at once; depth
never goes up. Attention over these blocks is server/engine/attention.py.

Prefix caching (on unless `prefix_cache=False`): a sequence's full blocks, once their KV
is final, are published by content (prefix_cache.py); `admit` gives a new sequence the
longest cached run of full blocks that hold every layer its depth runs, shared by
reference count, so its prefill starts past them. A request at depth d therefore reuses
what any request at depth >= d computed for the same leading tokens (for balcony
checkpoints: one that ran d's own exit layer too). The other way round — layers [0, d')
of a prefix computed at d' < d, for a request at d — is not reused: the layers from d'
up need the residual stream at d' of every prefix token, and the KV does not hold it, so
the prefix's layers [0, d') would have to run again anyway (all but their K/V
projections): no saving worth a partial block table.

`allocate`/`admit` answer False/None when there is no room (the scheduler then queues or
preempts); room is free blocks plus cached blocks nobody holds (the least recently used
of those is reused first). A sequence never writes a block it shares, nor touches
another sequence's.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch

from server.engine.prefix_cache import PrefixCache


@dataclass(frozen=True)
class KVCacheConfig:
    num_layers: int  # the model's decoder layers (L)
    num_kv_heads: int
    head_dim: int
    num_blocks: int
    block_size: int = (
        16  # tokens per block: small enough to waste little, big enough to gather fast
    )
    dtype: torch.dtype = torch.float32
    device: str | torch.device = "cpu"
    # exits with a decoder layer of their own (balcony), ascending: exit_layers[j] keeps its
    # KV at cache layer L + j (models.llama.SortedModel.kv_layer)
    exit_layers: tuple[int, ...] = ()

    @property
    def block_bytes(self) -> int:
        """Bytes of one block (keys + values) in one layer."""
        return 2 * self.block_size * self.num_kv_heads * self.head_dim * self.dtype.itemsize

    @property
    def num_kv_layers(self) -> int:
        """Cache layers: the decoder's, then one per exit layer."""
        return self.num_layers + len(self.exit_layers)

    def exit_kv_layer(self, depth: int) -> int | None:
        """The cache layer of exit `depth`'s own layer; None where it has none."""
        if depth not in self.exit_layers:
            return None
        return self.num_layers + self.exit_layers.index(depth)

    def layers(self, depth: int) -> tuple[int, ...]:
        """The cache layers a row at `depth` runs: [0, depth), then its exit layer if any."""
        own = self.exit_kv_layer(depth)
        return (*range(depth), *(() if own is None else (own,)))

    @classmethod
    def for_memory(
        cls,
        memory_bytes: int,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        block_size: int = 16,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        exit_layers: tuple[int, ...] = (),
    ) -> KVCacheConfig:
        probe = cls(num_layers, num_kv_heads, head_dim, 1, block_size, dtype, device)
        num_blocks = max(1, memory_bytes // probe.block_bytes)
        return cls(num_layers, num_kv_heads, head_dim, num_blocks, block_size, dtype, device,
                   tuple(sorted(exit_layers)))  # fmt: skip


class KVCacheManager:
    """Owns the block pool, every sequence's per-layer block tables and the prefix cache.

    A block is held by the sequences whose tables name it (its reference count); with the
    prefix cache on, a full block that a sequence has computed is also published under
    its content key (server/engine/prefix_cache.py), so that a later sequence with the
    same leading tokens shares it instead of computing it. Shared blocks are never written
    (a sequence writes only past its cached prefix). A published block nobody holds stays
    cached until the pool needs it (least recently used first); `num_used` counts only
    blocks that sequences hold.
    """

    def __init__(self, cfg: KVCacheConfig, prefix_cache: bool = True) -> None:
        self.cfg = cfg
        # one block more than the pool: block `num_blocks` is never handed out; padding
        # tokens of a batched prefill write there, so they touch no sequence's blocks
        shape = (cfg.num_blocks + 1, cfg.block_size, cfg.num_kv_heads, cfg.head_dim)
        self.trash = cfg.num_blocks
        self.k = torch.zeros(shape, dtype=cfg.dtype, device=cfg.device)  # (N+1, bs, Hkv, D)
        self.v = torch.zeros(shape, dtype=cfg.dtype, device=cfg.device)
        self._free: list[int] = list(range(cfg.num_blocks - 1, -1, -1))  # pop() -> low ids first
        self._refs = [0] * cfg.num_blocks  # sequences holding each block
        self._layer_of = [0] * cfg.num_blocks  # the cache layer a block is in while in use
        # seq -> cache layer -> [block ids]; every table of a sequence has the same length
        self._tables: dict[Hashable, dict[int, list[int]]] = {}
        self._layer_blocks = [0] * cfg.num_kv_layers  # blocks held in each cache layer
        self.prefix: PrefixCache | None = PrefixCache(cfg.block_size) if prefix_cache else None
        self._chains: dict[Hashable, list[bytes]] = {}  # seq -> keys of its published blocks

    # -- blocks ----------------------------------------------------------------------------
    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.cfg.block_size)

    def layers(self, depth: int) -> tuple[int, ...]:
        return self.cfg.layers(depth)

    @property
    def num_available(self) -> int:
        """Blocks a sequence can get now: free ones, and cached ones nobody holds."""
        return len(self._free) + (len(self.prefix.idle) if self.prefix is not None else 0)

    def _take(self, layer: int) -> int:
        """A block for `layer`: a free one, else the least recently used idle cached one."""
        if self._free:
            block = self._free.pop()
        else:
            assert self.prefix is not None, "no block left: allocation checks room first"
            block = self.prefix.evict()
        self._refs[block] = 1
        self._layer_of[block] = layer
        self._layer_blocks[layer] += 1
        return block

    def _hold(self, block: int, layer: int) -> None:
        """One more sequence holds cached `block` (of cache `layer`)."""
        if self._refs[block] == 0:
            assert self.prefix is not None
            self.prefix.held(block)
            self._layer_of[block] = layer
            self._layer_blocks[layer] += 1
        self._refs[block] += 1

    def _release(self, block: int) -> None:
        """One sequence fewer holds `block`; the last one returns it to the pool (a
        published block stays cached, idle, until the pool needs it)."""
        self._refs[block] -= 1
        assert self._refs[block] >= 0, "a block released more often than held"
        if self._refs[block] == 0:
            self._layer_blocks[self._layer_of[block]] -= 1
            if self.prefix is not None and self.prefix.idles(block):
                return
            self._free.append(block)

    def _missing(self, layers: set[int], tables: dict[int, list[int]], num_tokens: int) -> int:
        need = self.blocks_for(num_tokens)
        return sum(max(0, need - len(tables.get(layer, ()))) for layer in layers)

    def _grow(self, table: list[int], layer: int, blocks: int) -> None:
        for _ in range(blocks - len(table)):
            table.append(self._take(layer))

    # -- sequences -------------------------------------------------------------------------
    def admit(
        self, seq: Hashable, depth: int, tokens: Sequence[int], reuse: bool = True
    ) -> int | None:
        """Blocks for a sequence about to be prefilled: its longest cached prefix (full
        blocks that hold every layer a row at `depth` runs, leaving at least its last
        token to compute), shared, and new blocks for the rest.

        Returns:
            The tokens whose KV is cached already (the prefill starts there), or None
            (nothing changed) when the pool is short.
        """
        assert seq not in self._tables, "admit a sequence that holds no blocks"
        layers = self.layers(depth)
        keys, hit = self._lookup(tokens, layers) if reuse else ([], [])
        need = self.blocks_for(len(tokens))
        idle_hits = sum(1 for entry in hit for x in layers if self._refs[entry[x]] == 0)
        if len(layers) * (need - len(hit)) > self.num_available - idle_hits:
            return None
        tables: dict[int, list[int]] = {x: [] for x in layers}
        for entry in hit:
            for x in layers:
                self._hold(entry[x], x)
                tables[x].append(entry[x])
        for x in layers:
            self._grow(tables[x], x, need)
        self._tables[seq] = tables
        if self.prefix is not None:
            self._chains[seq] = keys[: len(hit)]
            if reuse:
                self.prefix.count(depth, len(tokens), len(hit) * self.cfg.block_size)
        return len(hit) * self.cfg.block_size

    def cached_tokens(self, tokens: Sequence[int], depth: int) -> int:
        """How many of `tokens` a sequence at `depth` admitted now would find cached."""
        return self.cached_by_depth(tokens, (depth,))[depth]

    def cached_by_depth(self, tokens: Sequence[int], depths: Sequence[int]) -> dict[int, int]:
        """`cached_tokens` at each of `depths`, the keys hashed once (a read-only look:
        the policy prices only the rest of each depth's prefill)."""
        if self.prefix is None or len(tokens) <= self.cfg.block_size:
            return dict.fromkeys(depths, 0)
        keys = self.prefix.keys(tokens, (len(tokens) - 1) // self.cfg.block_size)
        bs = self.cfg.block_size
        return {d: len(self.prefix.match(keys, self.layers(d))) * bs for d in depths}

    def _lookup(
        self, tokens: Sequence[int], layers: tuple[int, ...]
    ) -> tuple[list[bytes], list[dict[int, int]]]:
        if self.prefix is None or len(tokens) <= self.cfg.block_size:
            return [], []
        keys = self.prefix.keys(tokens, (len(tokens) - 1) // self.cfg.block_size)
        return keys, self.prefix.match(keys, layers)

    def publish(self, seq: Hashable, depth: int, tokens: Sequence[int], num_computed: int) -> None:
        """Offer `seq`'s newly completed full blocks to the prefix cache: those wholly
        below `num_computed` (their KV is final) in the layers a row at `depth` runs. A
        block whose content is cached already under another id stays the sequence's own."""
        if self.prefix is None or seq not in self._tables:
            return
        chain = self._chains.setdefault(seq, [])
        full = num_computed // self.cfg.block_size
        if full <= len(chain):
            return
        tables = self._tables[seq]
        layers = [x for x in self.layers(depth) if x in tables]
        for i, key in enumerate(self.prefix.extend(chain, tokens, full), start=len(chain)):
            for x in layers:
                self.prefix.insert(key, x, tables[x][i])
            chain.append(key)

    def allocate(self, seq: Hashable, depth: int, num_tokens: int) -> bool:
        """Make room for `num_tokens` tokens of `seq` in the layers a row at `depth` runs
        (and in any other layer it holds: a draft exit's).

        Args:
            seq: the sequence's key.
            depth: the sequence's depth; it must not hold layers of a deeper one.
            num_tokens: total tokens (cached + about to be written) it must hold.
        Returns:
            True when the blocks are there; False (nothing changed) when the pool is short.
        """
        tables = self._tables.get(seq, {})
        layers = set(self.layers(depth)) | set(tables)
        assert all(x < depth or x >= self.cfg.num_layers for x in tables), (
            "allocate at the sequence's own depth"
        )
        if self._missing(layers, tables, num_tokens) > self.num_available:
            return False
        tables = self._tables.setdefault(seq, tables)
        blocks = max(self.blocks_for(num_tokens), max(map(len, tables.values()), default=0))
        for layer in sorted(layers):
            self._grow(tables.setdefault(layer, []), layer, blocks)
        return True

    def add_layer(self, seq: Hashable, layer: int) -> bool:
        """Give `seq` a table at cache `layer` as long as its others (a draft exit's layer,
        whose KV the speculator then computes). False (nothing changed) when short."""
        tables = self._tables.get(seq)
        assert tables, "add a layer to a sequence that holds blocks"
        if layer in tables:
            return True
        blocks = len(next(iter(tables.values())))
        if blocks > self.num_available:
            return False
        self._grow(tables.setdefault(layer, []), layer, blocks)
        return True

    def drop_layer(self, seq: Hashable, layer: int) -> None:
        """Release `seq`'s blocks at cache `layer`, if it holds any (last first)."""
        table = self._tables.get(seq, {}).pop(layer, None)
        for block in reversed(table or ()):
            self._release(block)

    def free(self, seq: Hashable) -> None:
        """Release every block of `seq` (finished, cancelled or preempted). Idempotent.
        Its published blocks stay cached: the last of the prompt and the deepest layer
        become the first to go when the pool needs room."""
        tables = self._tables.pop(seq, {})
        self._chains.pop(seq, None)
        for i in range(max(map(len, tables.values()), default=0) - 1, -1, -1):
            for layer in sorted(tables, reverse=True):
                if i < len(tables[layer]):
                    self._release(tables[layer][i])

    def shrink(self, seq: Hashable, num_tokens: int) -> None:
        """Release blocks beyond what `num_tokens` tokens need (speculative rollback)."""
        keep = self.blocks_for(num_tokens)
        for table in self._tables.get(seq, {}).values():
            for block in reversed(table[keep:]):
                self._release(block)
            del table[keep:]

    def lower_depth(self, seq: Hashable, depth: int) -> None:
        """Keep only the layers a row at `depth` runs (a draft exit's layer goes too,
        unless it is `depth`'s own), releasing the others' blocks now; the prefix blocks
        it keeps stay shared."""
        assert depth >= 1, "a sequence keeps at least one layer"
        keep = set(self.layers(depth))
        for layer in [x for x in self._tables.get(seq, ()) if x not in keep]:
            self.drop_layer(seq, layer)

    def tables(self, seq: Hashable) -> dict[int, list[int]]:
        """`seq`'s block tables by cache layer."""
        return self._tables[seq]

    def holds(self, seq: Hashable, layer: int) -> bool:
        return layer in self._tables.get(seq, {})

    # -- accounting --------------------------------------------------------------------------
    @property
    def num_used(self) -> int:
        """Blocks that sequences hold (idle cached blocks are not used: any can go)."""
        return self.cfg.num_blocks - self.num_available

    @property
    def num_cached(self) -> int:
        """Blocks the prefix cache indexes, held or idle."""
        return len(self.prefix.owner) if self.prefix is not None else 0

    def refcount(self, block: int) -> int:
        return self._refs[block]

    def bytes_per_layer(self) -> tuple[int, ...]:
        """Bytes held in each cache layer: the decoder's, then the exit layers'."""
        block = self.cfg.block_bytes
        return tuple(n * block for n in self._layer_blocks)

    def seq_bytes(self, seq: Hashable) -> int:
        tables = self._tables.get(seq) or {}
        return sum(len(t) for t in tables.values()) * self.cfg.block_bytes

    def bytes_per_token(self, depth: int) -> int:
        """KV bytes one token of a row at `depth` holds (its exit layer's included)."""
        return len(self.layers(depth)) * self.cfg.block_bytes // self.cfg.block_size
