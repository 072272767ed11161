"""The DCTransformer network: a spatial encoder over the dense DCT image and three stacked decoders.

The encoder sees one token per macroblock (the 384 quantised coefficients known before the chunk, squashed and
projected), optionally preceded by a class token; its self-attention is bidirectional over the grid. A "hint"
(super-resolution: the DCT image of the upsampled low-resolution input, on the same grid and quantisation as the
target) is added to the macroblock tokens and, at (c, p), to the value decoder's input, so the model can copy a
given coefficient. The decoders run over the chunk's triples, each with causal self-attention (cached while
sampling) and cross-attention to the encoder output: channel (from the previous triple), position (from h^c and the
channel just chosen), value (from h^p, the position just chosen and the encoder output gathered at that position).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from trainer.transformer import KVCache, SelfAttention, TransformerConfig, TransformerStack, init_weights

NUM_CHANNELS = 384


@dataclass
class DecoderSizes:
    """Depths of the three decoders (they share width and heads with the encoder)."""

    channel_layers: int = 2
    position_layers: int = 2
    value_layers: int = 2

    def __post_init__(self) -> None:
        for name in ("channel_layers", "position_layers", "value_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.decoders.{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class NetworkShape:
    """What the network must know about the data: vocabulary sizes, grid sizes, chunk length, conditioning."""

    num_positions: int
    value_range: int
    chunk_size: int
    num_classes: int = 0
    hint: bool = False
    encoder: TransformerConfig = field(default_factory=TransformerConfig)
    decoders: DecoderSizes = field(default_factory=DecoderSizes)

    @property
    def channel_vocab(self) -> int:
        return NUM_CHANNELS + 2  # + EOS, PAD

    @property
    def position_vocab(self) -> int:
        return self.num_positions + 2

    @property
    def value_vocab(self) -> int:
        return 2 * self.value_range + 2


def squash(dense: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Quantised coefficients -> sign(v) log(1 + |v|): keeps DC (tens) and AC (ones) on one scale."""
    d = dense.to(dtype)
    return torch.sign(d) * torch.log1p(d.abs())


class CrossAttention(nn.Module):
    """Queries from the decoder, keys/values from the encoder output (no mask: every chunk sees the whole grid)."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.q = nn.Linear(cfg.d_model, cfg.d_model)
        self.kv = nn.Linear(cfg.d_model, 2 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.n_head
        q = self.q(x).view(b, t, h, d // h).transpose(1, 2)
        k, v = (z.view(b, memory.shape[1], h, d // h).transpose(1, 2) for z in self.kv(memory).split(d, dim=2))
        y = F.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class DecoderBlock(nn.Module):
    def __init__(self, cfg: TransformerConfig, layer: int) -> None:
        super().__init__()
        self.ln1, self.ln2, self.ln3 = nn.LayerNorm(cfg.d_model), nn.LayerNorm(cfg.d_model), nn.LayerNorm(cfg.d_model)
        self.attn = SelfAttention(cfg, layer)
        self.cross = CrossAttention(cfg)
        self.mlp = nn.Sequential(nn.Linear(cfg.d_model, cfg.mlp_ratio * cfg.d_model), nn.GELU(),
                                 nn.Linear(cfg.mlp_ratio * cfg.d_model, cfg.d_model))

    def forward(self, x: torch.Tensor, memory: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), None, cache)
        x = x + self.cross(self.ln2(x), memory)
        return x + self.mlp(self.ln3(x))


class Decoder(nn.Module):
    """Causal self-attention + cross-attention blocks; ``cache`` makes a call one (or more) sampling steps."""

    def __init__(self, cfg: TransformerConfig, n_layer: int) -> None:
        super().__init__()
        self.n_layer = n_layer
        self.blocks = nn.ModuleList(DecoderBlock(cfg, i) for i in range(n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)

    def new_cache(self) -> KVCache:
        return KVCache(self.n_layer)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, memory, cache)
        return self.ln_f(x)


class DCTransformer(nn.Module):
    """Encoder + channel/position/value decoders. Inputs and outputs are token ids of the codec's vocabularies."""

    def __init__(self, shape: NetworkShape) -> None:
        super().__init__()
        self.shape = shape
        cfg = shape.encoder
        d = cfg.d_model
        self.enc_in = nn.Linear(NUM_CHANNELS, d)
        self.enc_pos = nn.Embedding(shape.num_positions, d)
        self.encoder = TransformerStack(cfg)
        if shape.num_classes:
            self.class_emb = nn.Embedding(shape.num_classes, d)
        if shape.hint:
            self.hint_in = nn.Linear(NUM_CHANNELS, d)
            self.hint_value = nn.Embedding(2 * shape.value_range + 1, d)  # regular value ids + "zero"
        # Previous-triple embeddings carry one extra id each: START (no previous triple in the sequence).
        self.prev_c = nn.Embedding(shape.channel_vocab + 1, d)
        self.prev_p = nn.Embedding(shape.position_vocab + 1, d)
        self.prev_v = nn.Embedding(shape.value_vocab + 1, d)
        self.chunk_pos = nn.Embedding(shape.chunk_size, d)
        self.cur_c = nn.Embedding(shape.channel_vocab, d)
        self.cur_p = nn.Embedding(shape.position_vocab, d)
        self.channel_dec = Decoder(cfg, shape.decoders.channel_layers)
        self.position_dec = Decoder(cfg, shape.decoders.position_layers)
        self.value_dec = Decoder(cfg, shape.decoders.value_layers)
        self.channel_head = nn.Linear(d, shape.channel_vocab, bias=False)
        self.position_head = nn.Linear(d, shape.position_vocab, bias=False)
        self.value_head = nn.Linear(d, shape.value_vocab, bias=False)
        init_weights(self)

    def encode(self, dense: torch.Tensor, labels: torch.Tensor | None = None,
               hint: torch.Tensor | None = None) -> torch.Tensor:
        """Dense DCT image [B, 384, P] (+ class [B], hint DCT image [B, 384, P]) -> memory [B, extra + P, d].

        The grid tokens are always the last P rows, so the value decoder can gather them by position. Every token
        attends to every other (the grid is no sequence: no causal mask).
        """
        # Embeddings are called as modules (not .weight) so ZeRO-3 gathers their partitioned parameters.
        x = self.enc_in(squash(dense, self.enc_in.weight.dtype).transpose(1, 2))
        x = x + self.enc_pos(torch.arange(dense.shape[2], device=dense.device))
        if self.shape.hint:
            x = x + self.hint_in(squash(self.need_hint(hint), self.hint_in.weight.dtype).transpose(1, 2))
        parts = []
        if self.shape.num_classes:
            if labels is None:
                raise ValueError("this model is class-conditional: pass labels")
            parts.append(self.class_emb(labels)[:, None])
        tokens = torch.cat([*parts, x], dim=1)
        everything = torch.ones(tokens.shape[1], tokens.shape[1], dtype=torch.bool, device=tokens.device)
        return self.encoder(tokens, everything)

    def need_hint(self, hint: torch.Tensor | None) -> torch.Tensor:
        if hint is None:
            raise ValueError("this model is a super-resolution model: pass the hint (upsampled low-res DCT image)")
        return hint

    def hint_tokens(self, hint: torch.Tensor, c: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """The hint's quantised value at (c, p) of every row [B, T] as an id: 0..2R-1 a value, 2R zero/none."""
        r = self.shape.value_range
        n_pos = self.shape.num_positions
        regular = (c < NUM_CHANNELS) & (p < n_pos)
        flat = torch.where(regular, c * n_pos + p, 0)
        v = torch.gather(hint.reshape(hint.shape[0], -1), 1, flat).round().long().clamp(-r, r)
        ids = v + r - (v > 0).long()
        return torch.where(regular & (v != 0), ids, torch.full_like(ids, 2 * r))

    def grid(self, memory: torch.Tensor) -> torch.Tensor:
        return memory[:, memory.shape[1] - self.shape.num_positions:]

    def channel_hidden(self, memory: torch.Tensor, prev: torch.Tensor, offset: int,
                       cache: KVCache | None = None) -> torch.Tensor:
        """prev [B, t, 3] (previous triples, START ids allowed) at chunk slots offset.. -> h^c [B, t, d]."""
        t = prev.shape[1]
        x = self.prev_c(prev[..., 0]) + self.prev_p(prev[..., 1]) + self.prev_v(prev[..., 2])
        x = x + self.chunk_pos(torch.arange(offset, offset + t, device=prev.device))
        return self.channel_dec(x, memory, cache)

    def position_hidden(self, memory: torch.Tensor, h_c: torch.Tensor, c: torch.Tensor,
                        cache: KVCache | None = None) -> torch.Tensor:
        return self.position_dec(h_c + self.cur_c(c), memory, cache)

    def value_hidden(self, memory: torch.Tensor, h_p: torch.Tensor, c: torch.Tensor, p: torch.Tensor,
                     cache: KVCache | None = None, hint: torch.Tensor | None = None) -> torch.Tensor:
        grid = self.grid(memory)
        regular = p < self.shape.num_positions
        idx = torch.where(regular, p, 0)[..., None].expand(-1, -1, grid.shape[-1])
        x = h_p + self.cur_p(p) + torch.gather(grid, 1, idx) * regular[..., None].to(grid.dtype)
        if self.shape.hint:
            x = x + self.hint_value(self.hint_tokens(self.need_hint(hint), c, p))
        return self.value_dec(x, memory, cache)

    def forward(self, dense: torch.Tensor, prev: torch.Tensor, target: torch.Tensor,
                labels: torch.Tensor | None = None, hint: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Teacher-forced logits of one chunk: (channel, position, value) logits, each [B, T, vocab]."""
        memory = self.encode(dense, labels, hint)
        c = target[..., 0].clamp(max=self.shape.channel_vocab - 1)
        p = target[..., 1].clamp(max=self.shape.position_vocab - 1)
        h_c = self.channel_hidden(memory, prev, 0)
        h_p = self.position_hidden(memory, h_c, c)
        h_v = self.value_hidden(memory, h_p, c, p, hint=hint)
        return self.channel_head(h_c), self.position_head(h_p), self.value_head(h_v)
