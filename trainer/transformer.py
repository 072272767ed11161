"""A decoder-only transformer with key/value caches, shared by the autoregressive families.

Readable top to bottom (nanoGPT style): attention, MLP, block, stack. ``attn_mask`` lets a family replace the
causal mask, with one tensor for every layer or one per layer (the text-to-image transformer's row / column /
convolutional masks); with a ``cache`` the caller passes the rows of the new positions (``mask[start:stop, :stop]``).
``cache`` turns a forward into one sampling step. ``boundaries`` (optional) wraps the activations entering and leaving
each block, e.g. to scale gradients per block.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class TransformerConfig:
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 128
    dropout: float = 0.0
    mlp_ratio: int = 4

    def __post_init__(self) -> None:
        for name in ("n_layer", "n_head", "d_model", "mlp_ratio"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.d_model % self.n_head:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_head ({self.n_head})")


class KVCache:
    """Keys and values of every layer for the positions processed so far."""

    def __init__(self, n_layer: int) -> None:
        self.keys: list[torch.Tensor | None] = [None] * n_layer
        self.values: list[torch.Tensor | None] = [None] * n_layer

    @property
    def length(self) -> int:
        return 0 if self.keys[0] is None else self.keys[0].shape[2]

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.keys[layer] is not None:
            k = torch.cat([self.keys[layer], k], dim=2)
            v = torch.cat([self.values[layer], v], dim=2)
        self.keys[layer], self.values[layer] = k, v
        return k, v


class SelfAttention(nn.Module):
    def __init__(self, cfg: TransformerConfig, layer: int) -> None:
        super().__init__()
        self.layer, self.n_head = layer, cfg.n_head
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None, cache: KVCache | None) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=2)
        q, k, v = (z.view(b, t, self.n_head, d // self.n_head).transpose(1, 2) for z in (q, k, v))
        if cache is not None:
            k, v = cache.append(self.layer, k, v)
        drop = self.dropout if self.training else 0.0
        if attn_mask is None:
            # Causal over new positions; with a cache the new queries see every cached key.
            causal = t > 1
            if causal and k.shape[2] != t:
                offset = k.shape[2] - t
                attn_mask = torch.ones(t, k.shape[2], dtype=torch.bool, device=x.device).tril(offset)
                causal = False
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=drop, is_causal=causal)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=drop)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    def __init__(self, cfg: TransformerConfig, layer: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = SelfAttention(cfg, layer)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.d_model, cfg.mlp_ratio * cfg.d_model),
            nn.GELU(),
            nn.Linear(cfg.mlp_ratio * cfg.d_model, cfg.d_model),
            nn.Dropout(cfg.dropout),
        )

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None, cache: KVCache | None) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), attn_mask, cache)
        return x + self.mlp(self.ln2(x))


class BlockBoundaries(Protocol):
    """Called on the activations entering (``enter``) and leaving (``leave``) block ``layer``."""

    def enter(self, layer: int, x: torch.Tensor) -> torch.Tensor: ...

    def leave(self, layer: int, x: torch.Tensor) -> torch.Tensor: ...


class TransformerStack(nn.Module):
    """Blocks plus the final layer norm; embeddings and heads belong to the family that uses it."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)

    def new_cache(self) -> KVCache:
        return KVCache(self.cfg.n_layer)

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: torch.Tensor | Sequence[torch.Tensor] | None = None,
        cache: KVCache | None = None,
        boundaries: BlockBoundaries | None = None,
    ) -> torch.Tensor:
        """``attn_mask``: None (causal), one boolean mask for every layer, or a sequence of one mask per layer."""
        per_layer = attn_mask if isinstance(attn_mask, Sequence) else [attn_mask] * len(self.blocks)
        if len(per_layer) != len(self.blocks):
            raise ValueError(f"got {len(per_layer)} attention masks for {len(self.blocks)} layers")
        for i, (block, mask) in enumerate(zip(self.blocks, per_layer, strict=True)):
            if boundaries is not None:
                x = boundaries.enter(i, x)
            x = block(x, mask, cache)
            if boundaries is not None:
                x = boundaries.leave(i, x)
        return self.ln_f(x)


def init_weights(module: nn.Module) -> None:
    """GPT-2 style initialisation: small normal weights, zero biases."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)
