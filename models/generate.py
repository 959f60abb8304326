"""Simple generation on one model, outside the server: a dense per-layer KV cache and a
greedy decoder. Used by `soft-eval` and as the reference the engine is tested against."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from models.llama import SortedModel


class DenseKVCache:
    """Contiguous keys/values per layer for a fixed batch: (B, Hkv, S, D) tensors that grow
    by concatenation. Rows may run at different depths; layer i only ever sees the rows
    that reach it, which are a prefix of the batch (deepest rows first)."""

    def __init__(self, num_layers: int, scale: float) -> None:
        self.k: list[Tensor | None] = [None] * num_layers  # (n_i, Hkv, S, D)
        self.v: list[Tensor | None] = [None] * num_layers
        self.scale = scale

    def length(self, layer: int = 0) -> int:
        k = self.k[layer]
        return 0 if k is None else k.shape[2]

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        k, v = k.transpose(1, 2), v.transpose(1, 2)  # (n, Hkv, T, D)
        old_k, old_v = self.k[layer], self.v[layer]
        if old_k is not None and old_v is not None:
            k, v = torch.cat([old_k[: k.shape[0]], k], 2), torch.cat([old_v[: v.shape[0]], v], 2)
        self.k[layer], self.v[layer] = k, v
        n_rep = q.shape[2] // k.shape[1]
        if n_rep > 1:
            k = k.repeat_interleave(n_rep, dim=1)
            v = v.repeat_interleave(n_rep, dim=1)
        t, s = q.shape[1], k.shape[2]
        # new queries sit at the end of the cached sequence: causal over the last t keys
        mask = None
        if t > 1:
            mask = torch.ones(t, s, dtype=torch.bool, device=q.device).tril(s - t)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k, v, attn_mask=mask, scale=self.scale
        )
        return out.transpose(1, 2)  # (n, T, Hq, D)


@torch.inference_mode()
def greedy_generate(
    model: SortedModel,
    input_ids: Tensor,
    depth: int,
    max_new_tokens: int,
    eos_token_ids: tuple[int, ...] = (),
) -> list[int]:
    """Greedy continuation of one prompt (1-D ids) at `depth`; stops at an EOS token
    (included) or after max_new_tokens."""
    ids = input_ids.to(model.device).view(1, -1)
    cache = DenseKVCache(model.num_kv_layers, model.scale)
    out: list[int] = []
    pos = torch.arange(ids.shape[1], device=model.device).view(1, -1)
    for _ in range(max_new_tokens):
        h = model.hidden(ids, pos, [depth], cache)
        token = int(model.head(h[:, -1:], [depth])[0, -1].argmax())
        out.append(token)
        if token in eos_token_ids:
            break
        pos = pos[:, -1:] + 1
        ids = torch.tensor([[token]], device=model.device)
    return out
