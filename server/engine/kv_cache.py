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

`allocate` answers False when there is no room (the scheduler then queues or preempts);
it never evicts anything by itself and never touches another sequence's blocks.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass

import torch


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
        elem = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.block_size * self.num_kv_heads * self.head_dim * elem

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
    """Owns the block pool and every sequence's per-layer block tables."""

    def __init__(self, cfg: KVCacheConfig) -> None:
        self.cfg = cfg
        # one block more than the pool: block `num_blocks` is never handed out; padding
        # tokens of a batched prefill write there, so they touch no sequence's blocks
        shape = (cfg.num_blocks + 1, cfg.block_size, cfg.num_kv_heads, cfg.head_dim)
        self.trash = cfg.num_blocks
        self.k = torch.zeros(shape, dtype=cfg.dtype, device=cfg.device)  # (N+1, bs, Hkv, D)
        self.v = torch.zeros(shape, dtype=cfg.dtype, device=cfg.device)
        self._free: list[int] = list(range(cfg.num_blocks - 1, -1, -1))  # pop() -> low ids first
        # seq -> cache layer -> [block ids]; every table of a sequence has the same length
        self._tables: dict[Hashable, dict[int, list[int]]] = {}
        self._layer_blocks = [0] * cfg.num_kv_layers  # blocks held in each cache layer

    # -- allocation ------------------------------------------------------------------------
    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.cfg.block_size)

    def layers(self, depth: int) -> tuple[int, ...]:
        return self.cfg.layers(depth)

    def _missing(self, layers: set[int], tables: dict[int, list[int]], num_tokens: int) -> int:
        need = self.blocks_for(num_tokens)
        return sum(max(0, need - len(tables.get(layer, ()))) for layer in layers)

    def _grow(self, table: list[int], layer: int, blocks: int) -> None:
        for _ in range(blocks - len(table)):
            table.append(self._free.pop())
            self._layer_blocks[layer] += 1

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
        if self._missing(layers, tables, num_tokens) > len(self._free):
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
        if blocks > len(self._free):
            return False
        self._grow(tables.setdefault(layer, []), layer, blocks)
        return True

    def drop_layer(self, seq: Hashable, layer: int) -> None:
        """Free `seq`'s blocks at cache `layer`, if it holds any."""
        table = self._tables.get(seq, {}).pop(layer, None)
        if table is not None:
            self._layer_blocks[layer] -= len(table)
            self._free.extend(reversed(table))

    def free(self, seq: Hashable) -> None:
        """Return every block of `seq` (finished, cancelled or preempted). Idempotent."""
        for layer in list(self._tables.get(seq, ())):
            self.drop_layer(seq, layer)
        self._tables.pop(seq, None)

    def shrink(self, seq: Hashable, num_tokens: int) -> None:
        """Free blocks beyond what `num_tokens` tokens need (speculative rollback)."""
        keep = self.blocks_for(num_tokens)
        for layer, table in self._tables.get(seq, {}).items():
            extra = table[keep:]
            if extra:
                del table[keep:]
                self._layer_blocks[layer] -= len(extra)
                self._free.extend(reversed(extra))

    def lower_depth(self, seq: Hashable, depth: int) -> None:
        """Keep only the layers a row at `depth` runs (a draft exit's layer goes too,
        unless it is `depth`'s own), freeing the others' blocks now."""
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
        return self.cfg.num_blocks - len(self._free)

    def bytes_per_layer(self) -> tuple[int, ...]:
        """Bytes held in each cache layer: the decoder's, then the exit layers'."""
        block = self.cfg.block_bytes  # once: it builds a tensor to read the element size
        return tuple(n * block for n in self._layer_blocks)

    def seq_bytes(self, seq: Hashable) -> int:
        tables = self._tables.get(seq) or {}
        return sum(len(t) for t in tables.values()) * self.cfg.block_bytes

    def bytes_per_token(self, depth: int) -> int:
        """KV bytes one token of a row at `depth` holds (its exit layer's included)."""
        return len(self.layers(depth)) * self.cfg.block_bytes // self.cfg.block_size
