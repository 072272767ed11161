"""The text-to-image transformer prior (DALL-E stage 2): one decoder over [caption tokens ; image tokens].

Input positions (T = text_len + h * w):

    position   0        1 .. L              L+1 .. L+N-1
    holds      start    caption ids t_0..   image tokens i_0 .. i_{N-2}     (N = h * w, row-major)
    predicts   t_0      t_1 .. t_{L-1}, i_0 (at L)  ..  i_{N-1}

Captions shorter than ``text_len`` are filled with PAD (id ``text_vocab``), whose embedding is learned separately for
every text position (no padding mask: the pads are tokens the model reads and predicts). Text positions have learned
position embeddings; image positions have a row and a column embedding. Every layer uses its own attention mask
(``masks.layer_masks``). The loss is cross-entropy normalised per token kind (mean over the L text targets, mean over
the N image targets) and weighted ``text_loss_weight`` + ``image_loss_weight`` (1/8 + 7/8 in the paper).

Every parameter is used through a submodule call, so the model also works with DeepSpeed ZeRO-3 (which gathers a
module's parameters in its forward pre-hook) when sampling calls ``hidden``/``logits`` directly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from trainer.dalle.grad_scaling import BlockGradScaler
from trainer.dalle.masks import layer_kinds, layer_masks
from trainer.sampling import sample_logits
from trainer.transformer import KVCache, TransformerConfig, TransformerStack, init_weights

HEADS = ("separate", "joint")
GRAD_SCALING = ("none", "per_block")


@dataclass
class PriorConfig:
    """The model part of a ``dalle`` experiment; vocabularies and grid come from the token dataset's manifest."""

    text_len: int = 32
    conv_kernel: int = 11
    heads: str = "separate"
    text_loss_weight: float = 0.125
    image_loss_weight: float = 0.875
    grad_scaling: str = "none"
    block_scale_init_log2: int = 4
    block_scale_growth_interval: int = 200
    transformer: TransformerConfig = field(default_factory=TransformerConfig)

    def __post_init__(self) -> None:
        if self.text_len < 1:
            raise ValueError(f"model.text_len must be >= 1, got {self.text_len}")
        if self.conv_kernel < 1 or self.conv_kernel % 2 == 0:
            raise ValueError(f"model.conv_kernel must be odd and >= 1, got {self.conv_kernel}")
        if self.heads not in HEADS:
            raise ValueError(f"model.heads must be one of {HEADS}, got {self.heads!r}")
        if self.grad_scaling not in GRAD_SCALING:
            raise ValueError(f"model.grad_scaling must be one of {GRAD_SCALING}, got {self.grad_scaling!r}")
        if self.text_loss_weight < 0 or self.image_loss_weight < 0:
            raise ValueError("model.text_loss_weight and model.image_loss_weight must be >= 0")


def kind_losses(text_logits: torch.Tensor, text_targets: torch.Tensor, image_logits: torch.Tensor,
                image_targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample cross-entropy, normalised per kind: (mean over text targets [B], mean over image targets [B])."""
    text = F.cross_entropy(text_logits.float().transpose(1, 2), text_targets, reduction="none").mean(dim=1)
    image = F.cross_entropy(image_logits.float().transpose(1, 2), image_targets, reduction="none").mean(dim=1)
    return text, image


class DallePrior(nn.Module):
    def __init__(self, cfg: PriorConfig, text_vocab: int, image_vocab: int, grid: tuple[int, int]) -> None:
        super().__init__()
        self.cfg, self.text_vocab, self.image_vocab = cfg, text_vocab, image_vocab
        self.grid = (int(grid[0]), int(grid[1]))
        self.text_len, self.n_image = cfg.text_len, self.grid[0] * self.grid[1]
        self.pad_id = text_vocab
        self.seq_len = self.text_len + self.n_image
        d = cfg.transformer.d_model
        self.start_emb = nn.Embedding(1, d)
        self.text_emb = nn.Embedding(text_vocab, d)
        self.pad_emb = nn.Embedding(cfg.text_len, d)  # one learned padding token per text position
        self.text_pos = nn.Embedding(cfg.text_len + 1, d)
        self.image_emb = nn.Embedding(image_vocab, d)
        self.row_emb = nn.Embedding(self.grid[0], d)
        self.col_emb = nn.Embedding(self.grid[1], d)
        self.stack = TransformerStack(cfg.transformer)
        if cfg.heads == "separate":
            self.text_head = nn.Linear(d, text_vocab + 1, bias=False)  # + PAD
            self.image_head = nn.Linear(d, image_vocab, bias=False)
        else:
            self.head = nn.Linear(d, text_vocab + 1 + image_vocab, bias=False)
        self.layer_kinds = layer_kinds(cfg.transformer.n_layer)
        masks = layer_masks(cfg.transformer.n_layer, self.text_len + 1, self.grid, cfg.conv_kernel)
        by_kind = dict(zip(self.layer_kinds, masks, strict=True))
        for kind, mask in by_kind.items():
            self.register_buffer(f"mask_{kind}", mask[: self.seq_len, : self.seq_len].clone(), persistent=False)
        self.grad_scaler: BlockGradScaler | None = None
        if cfg.grad_scaling == "per_block":
            self.grad_scaler = BlockGradScaler(cfg.transformer.n_layer, cfg.block_scale_init_log2,
                                               cfg.block_scale_growth_interval)
            self.grad_scaler.attach(self.stack.blocks)
        init_weights(self)

    def masks(self, start: int, stop: int) -> list[torch.Tensor]:
        """Each layer's mask rows for query positions start..stop-1 over keys 0..stop-1."""
        return [getattr(self, f"mask_{kind}")[start:stop, :stop] for kind in self.layer_kinds]

    def embed(self, held: torch.Tensor, start: int) -> torch.Tensor:
        """Input embeddings of positions start..start+n-1; ``held[:, i]`` is the token at position start+i (the
        start token's id is ignored; caption ids may be PAD; image ids are codes)."""
        b, n = held.shape
        stop, device = start + n, held.device
        parts = []
        if start == 0:
            parts.append(self.start_emb(torch.zeros(b, 1, dtype=torch.long, device=device))
                         + self.text_pos(torch.zeros(1, dtype=torch.long, device=device)))
        lo, hi = max(start, 1), min(stop, self.text_len + 1)
        if lo < hi:
            ids = held[:, lo - start: hi - start]
            is_pad = (ids == self.pad_id)[..., None]
            token = self.text_emb(ids.clamp(max=self.text_vocab - 1))
            pad = self.pad_emb(torch.arange(lo - 1, hi - 1, device=device))
            parts.append(torch.where(is_pad, pad, token) + self.text_pos(torch.arange(lo, hi, device=device)))
        lo = max(start, self.text_len + 1)
        if lo < stop:
            cells = torch.arange(lo, stop, device=device) - self.text_len - 1
            parts.append(self.image_emb(held[:, lo - start:]) + self.row_emb(cells // self.grid[1])
                         + self.col_emb(cells % self.grid[1]))
        return torch.cat(parts, dim=1)

    def hidden(self, held: torch.Tensor, start: int = 0, cache: KVCache | None = None) -> torch.Tensor:
        """Final hidden states of positions start..start+n-1 (with ``cache``: after positions 0..start-1)."""
        stop = start + held.shape[1]
        if stop > self.seq_len:
            raise ValueError(f"positions up to {stop} exceed the sequence length {self.seq_len}")
        return self.stack(self.embed(held, start), self.masks(start, stop), cache, self.grad_scaler)

    def logits(self, h: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Text logits [B, n_text, V+1] of the positions < text_len and image logits [B, n_image, K] of the rest.

        With the joint head the impossible kind's logits are masked to -inf before the kinds are split, so each
        part is a distribution over its own vocabulary only."""
        split = min(max(self.text_len - start, 0), h.shape[1])
        if self.cfg.heads == "separate":
            return self.text_head(h[:, :split]), self.image_head(h[:, split:])
        joint = self.head(h).float()
        is_text = torch.arange(start, start + h.shape[1], device=h.device) < self.text_len
        text_vocab = torch.arange(joint.shape[-1], device=h.device) <= self.text_vocab
        impossible = is_text[:, None] != text_vocab[None, :]
        joint = joint.masked_fill(impossible, float("-inf"))
        return joint[:, :split, : self.text_vocab + 1], joint[:, split:, self.text_vocab + 1:]

    def forward(self, text: torch.Tensor, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced logits: text [B, L] (PAD-filled) and image [B, N] -> ([B, L, V+1], [B, N, K])."""
        start = torch.zeros_like(text[:, :1])
        held = torch.cat([start, text, image[:, :-1]], dim=1)
        return self.logits(self.hidden(held), 0)

    def losses(self, text: torch.Tensor, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(weighted loss, text loss, image loss), each per sample [B], in nats per token."""
        text_logits, image_logits = self(text, image)
        text_ce, image_ce = kind_losses(text_logits, text, image_logits, image)
        return self.cfg.text_loss_weight * text_ce + self.cfg.image_loss_weight * image_ce, text_ce, image_ce

    @torch.no_grad()
    def generate(self, text: torch.Tensor, generator: torch.Generator | None = None, temperature: float = 1.0,
                 top_k: int = 0, top_p: float = 1.0, use_cache: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Complete ``text`` [B, n <= L] (a caption prefix, often all L ids) to L caption ids, then draw the N image
        tokens one at a time. Returns (text [B, L], image [B, N]). ``use_cache=False`` recomputes every prefix (the
        reference). Drawn captions stay PAD once they drew a PAD."""
        if text.dim() != 2 or text.shape[1] > self.text_len:
            raise ValueError(f"generate: text must be [B, n <= text_len={self.text_len}] caption ids, got "
                             f"{tuple(text.shape)} (the family's pad_ids truncates a caption to text_len)")
        b, device = text.shape[0], text.device
        held = torch.cat([torch.zeros(b, 1, dtype=torch.long, device=device), text], dim=1)
        cache = self.stack.new_cache() if use_cache else None
        h = self.hidden(held, 0, cache)
        image = torch.zeros(b, 0, dtype=torch.long, device=device)
        while image.shape[1] < self.n_image:
            pos = held.shape[1] - 1  # the newest position; its logits predict the next token
            text_logits, image_logits = self.logits(h[:, -1:], pos)
            if pos < self.text_len:
                nxt = sample_logits(text_logits[:, 0], temperature, top_k, top_p, generator)
                if pos > 0:
                    nxt = torch.where(held[:, -1] == self.pad_id, self.pad_id, nxt)
            else:
                nxt = sample_logits(image_logits[:, 0], temperature, top_k, top_p, generator)
                image = torch.cat([image, nxt[:, None]], dim=1)
                if image.shape[1] == self.n_image:
                    break
            held = torch.cat([held, nxt[:, None]], dim=1)
            h = self.hidden(held[:, -1:], pos + 1, cache) if use_cache else self.hidden(held)
        return held[:, 1: self.text_len + 1], image
