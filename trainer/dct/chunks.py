"""Token bookkeeping of the chunked DCTransformer, in torch: chunk slicing, the encoder's dense input, masks, NLL.

A batch of sequences is a long tensor [B, L, 3] of codec token ids, PAD rows after each EOS. A chunk starting at
``start`` predicts rows start..start+T-1; its decoder input row j is the triple *before* row start+j (START ids
when there is none), and the encoder sees only rows < start (``dense_before``), never a row of the chunk.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

NUM_CHANNELS = 384


@dataclass(frozen=True)
class TokenSpace:
    """Vocabulary facts needed to slice, mask and score sequences (mirrors the codec's ``Vocab``)."""

    num_positions: int
    value_range: int

    @property
    def c_eos(self) -> int:
        return NUM_CHANNELS

    @property
    def c_pad(self) -> int:
        return NUM_CHANNELS + 1

    @property
    def p_eos(self) -> int:
        return self.num_positions

    @property
    def p_pad(self) -> int:
        return self.num_positions + 1

    @property
    def v_eos(self) -> int:
        return 2 * self.value_range

    @property
    def v_pad(self) -> int:
        return 2 * self.value_range + 1

    @property
    def pad(self) -> tuple[int, int, int]:
        return self.c_pad, self.p_pad, self.v_pad

    @property
    def start(self) -> tuple[int, int, int]:
        """The START ids: one past each vocabulary (only ever a decoder input)."""
        return self.c_pad + 1, self.p_pad + 1, self.v_pad + 1

    def values(self, tokens: torch.Tensor) -> torch.Tensor:
        """Regular value token ids -> signed quantised values (the codec's ``token_to_value``)."""
        r = self.value_range
        return tokens - r + (tokens >= r).long()


def pad_batch(sequences: list[torch.Tensor], space: TokenSpace) -> torch.Tensor:
    """Sequences [n_i, 3] -> [B, max n_i, 3] filled with PAD rows."""
    longest = max(len(s) for s in sequences)
    out = torch.tensor(space.pad, dtype=torch.long).repeat(len(sequences), longest, 1)
    for i, s in enumerate(sequences):
        out[i, : len(s)] = s
    return out


def dense_before(tokens: torch.Tensor, starts: torch.Tensor, space: TokenSpace) -> torch.Tensor:
    """The dense DCT image [B, 384, P] holding every regular triple at row index < starts[b], zeros elsewhere."""
    b, length, _ = tokens.shape
    p = space.num_positions
    rows = torch.arange(length, device=tokens.device)[None, :]
    c, pos, v = tokens.unbind(-1)
    keep = (rows < starts[:, None]) & (c < NUM_CHANNELS)
    dump = NUM_CHANNELS * p
    flat = torch.where(keep, c * p + pos, torch.full_like(c, dump))
    vals = torch.where(keep, space.values(v), torch.zeros_like(v)).float()
    out = torch.zeros(b, dump + 1, device=tokens.device)
    out.scatter_(1, flat, vals)
    return out[:, :dump].reshape(b, NUM_CHANNELS, p)


def dense_to_sequence(dense: torch.Tensor, space: TokenSpace) -> torch.Tensor:
    """A dense DCT image [384, P] -> its triples [n + 1, 3] in the codec's order (channel-major, positions
    increasing) ending in EOS: the inverse of ``dense_before``. Values are clipped to the vocabulary's range."""
    r = space.value_range
    v = dense.round().long().clamp(-r, r)
    c, p = v.nonzero(as_tuple=True)  # row-major: channel first, then position
    vals = v[c, p]
    rows = torch.stack([c, p, vals + r - (vals > 0).long()], dim=1)
    eos = torch.tensor([[space.c_eos, space.p_eos, space.v_eos]], dtype=torch.long, device=dense.device)
    return torch.cat([rows, eos])


def chunk_rows(tokens: torch.Tensor, starts: torch.Tensor, size: int, space: TokenSpace
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(prev, target) [B, size, 3] of the chunks at ``starts``: target rows start.., prev rows start-1.."""
    b, length, _ = tokens.shape
    padded = torch.cat([torch.tensor(space.start, device=tokens.device).repeat(b, 1, 1), tokens,
                        torch.tensor(space.pad, device=tokens.device).repeat(b, size, 1)], dim=1)
    idx = (starts[:, None] + torch.arange(size + 1, device=tokens.device)[None, :])[..., None].expand(-1, -1, 3)
    rows = torch.gather(padded, 1, idx)
    return rows[:, :-1], rows[:, 1:]


def channel_mask(prev: torch.Tensor, space: TokenSpace, allowed: torch.Tensor | None = None) -> torch.Tensor:
    """Allowed next channels [B, T, 386] after the triples ``prev``: never lower, never the previous channel
    when its last position is taken, EOS always; only EOS after EOS/PAD. ``allowed`` [384] restricts channels."""
    c = torch.arange(NUM_CHANNELS + 2, device=prev.device)
    pc, pp = prev[..., 0:1], prev[..., 1:2]
    is_start = pc == space.start[0]
    ended = (pc == space.c_eos) | (pc == space.c_pad)
    low = torch.where(is_start, torch.full_like(pc, -1), pc)
    full = (pp == space.num_positions - 1) & ~is_start
    ok = (c >= low) & (c < NUM_CHANNELS) & ~((c == low) & full) & ~ended
    if allowed is not None:
        ok = ok & torch.cat([allowed, allowed.new_zeros(2)])
    return ok | (c == space.c_eos)


def position_mask(prev: torch.Tensor, channel: torch.Tensor, space: TokenSpace) -> torch.Tensor:
    """Allowed positions [B, T, P+2] given the previous triple and this triple's channel."""
    p = torch.arange(space.num_positions + 2, device=prev.device)
    c = channel[..., None]
    same = c == prev[..., 0:1]
    regular = c < NUM_CHANNELS
    ok = regular & (p < space.num_positions) & (~same | (p > prev[..., 1:2]))
    return ok | (~regular & (p == space.p_eos))


def value_mask(channel: torch.Tensor, space: TokenSpace) -> torch.Tensor:
    """Allowed values [B, T, 2R+2]: regular values for a regular channel, EOS otherwise."""
    v = torch.arange(2 * space.value_range + 2, device=channel.device)
    regular = channel[..., None] < NUM_CHANNELS
    return (regular & (v < space.v_eos)) | (~regular & (v == space.v_eos))


def masked(logits: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
    return logits.float().masked_fill(~ok, float("-inf"))


def triple_nll(logits: tuple[torch.Tensor, torch.Tensor, torch.Tensor], prev: torch.Tensor, target: torch.Tensor,
               space: TokenSpace, allowed: torch.Tensor | None = None) -> torch.Tensor:
    """-log p(c) - log p(p | c) - log p(v | c, p) of every target row, in nats [B, T]; 0 for PAD rows."""
    lc, lp, lv = logits
    real = target[..., 0] != space.c_pad
    c = torch.where(real, target[..., 0], space.c_eos)
    p = torch.where(real, target[..., 1], space.p_eos)
    v = torch.where(real, target[..., 2], space.v_eos)
    nll = F.cross_entropy(masked(lc, channel_mask(prev, space, allowed)).transpose(1, 2), c, reduction="none")
    nll = nll + F.cross_entropy(masked(lp, position_mask(prev, c, space)).transpose(1, 2), p, reduction="none")
    nll = nll + F.cross_entropy(masked(lv, value_mask(c, space)).transpose(1, 2), v, reduction="none")
    return nll * real
