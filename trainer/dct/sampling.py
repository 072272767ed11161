"""Chunk-by-chunk sampling of the DCTransformer: encode what exists, then draw c, p | c, v | c, p triple by triple.

Inside a chunk each decoder keeps a key/value cache, so a step costs one new position per decoder; the reference
path (``use_cache=False``) recomputes the chunk's whole prefix every step and must draw the same tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trainer.dct.chunks import TokenSpace, channel_mask, dense_before, masked, position_mask, value_mask
from trainer.dct.model import DCTransformer
from trainer.sampling import check_draw, sample_logits


@dataclass
class Conditioning:
    """What every chunk's encoder gets besides the triples drawn so far."""

    dense: torch.Tensor | None = None
    """[B, 384, P] coefficients that are given (colourisation: all luma)."""
    labels: torch.Tensor | None = None
    hint: torch.Tensor | None = None
    """[B, 384, P] super-resolution hint: the upsampled low-resolution image's DCT image."""
    allowed: torch.Tensor | None = None
    """[384] bool: the channels the model may emit (colourisation: chroma only)."""
    use_context: bool = True


@dataclass
class DrawSettings:
    """How tokens are drawn; ``value_*`` (None: as the others) lets the value decoder be drawn differently from
    where the coefficients go (channel, position): a nucleus cut on positions drops stray coefficients without
    narrowing the values that carry an object's colour."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    value_temperature: float | None = None
    value_top_p: float | None = None

    def __post_init__(self) -> None:
        check_draw(self.temperature, self.top_k, self.top_p)
        check_draw(self.temperature if self.value_temperature is None else self.value_temperature, self.top_k,
                   self.top_p if self.value_top_p is None else self.value_top_p, prefix="value_")

    def for_values(self) -> DrawSettings:
        t = self.temperature if self.value_temperature is None else self.value_temperature
        p = self.top_p if self.value_top_p is None else self.value_top_p
        return DrawSettings(t, self.top_k, p)


def encoder_input(seq: torch.Tensor, space: TokenSpace, cond: Conditioning) -> torch.Tensor:
    """Dense image of every triple in ``seq`` (zeros when context is switched off) plus the given coefficients."""
    starts = torch.full((seq.shape[0],), seq.shape[1], dtype=torch.long, device=seq.device)
    dense = dense_before(seq, starts, space)
    if not cond.use_context:
        dense = torch.zeros_like(dense)
    return dense + cond.dense if cond.dense is not None else dense


@torch.no_grad()
def generate(model: DCTransformer, n: int, space: TokenSpace, chunk_size: int, max_triples: int,
             cond: Conditioning, draw: DrawSettings, generator: torch.Generator | None = None,
             use_cache: bool = True, teacher: torch.Tensor | None = None,
             teacher_rows: int | None = None) -> torch.Tensor:
    """Token sequences [n, L, 3] (PAD after EOS; L <= max_triples, the last row forced to EOS if reached).

    ``teacher`` [n, >= max_triples, 3] replays given triples instead of the drawn ones (every logit and draw is
    still computed): fixed-length timing of the sampler, and scoring a known sequence through the cached path.
    ``teacher_rows`` replays only rows < teacher_rows and draws the rest: completing a given start of a sequence
    (in the channel-major order, a coarse version of the image), which shows which part of a sequence a model
    gets wrong.
    """
    device = next(model.parameters()).device
    seq = torch.zeros(n, 0, 3, dtype=torch.long, device=device)
    last = torch.tensor(space.start, device=device).repeat(n, 1)
    done = torch.zeros(n, dtype=torch.bool, device=device)
    pad = torch.tensor(space.pad, device=device)

    value_draw = draw.for_values()

    def draw_one(logits: torch.Tensor, ok: torch.Tensor, how: DrawSettings = draw) -> torch.Tensor:
        return sample_logits(masked(logits, ok), how.temperature, how.top_k, how.top_p, generator)

    while seq.shape[1] < max_triples and not bool(done.all()):
        memory = model.encode(encoder_input(seq, space, cond), cond.labels, cond.hint)
        caches = [model.channel_dec.new_cache(), model.position_dec.new_cache(), model.value_dec.new_cache()]
        prevs, hcs, cs, hps, ps = [], [], [], [], []
        for j in range(min(chunk_size, max_triples - seq.shape[1])):
            prevs.append(last)
            if use_cache:
                h_c = model.channel_hidden(memory, last[:, None], j, caches[0])[:, -1]
            else:
                h_c = model.channel_hidden(memory, torch.stack(prevs, 1), 0)[:, -1]
            ok = channel_mask(last[:, None], space, cond.allowed)[:, 0]
            if seq.shape[1] == max_triples - 1:
                ok = ok & (torch.arange(ok.shape[-1], device=device) == space.c_eos)
            t = seq.shape[1]
            replay = teacher is not None and (teacher_rows is None or t < teacher_rows)
            c = draw_one(model.channel_head(h_c), ok)
            c = teacher[:, t, 0] if replay else c
            hcs.append(h_c)
            cs.append(c)
            if use_cache:
                h_p = model.position_hidden(memory, h_c[:, None], c[:, None], caches[1])[:, -1]
            else:
                h_p = model.position_hidden(memory, torch.stack(hcs, 1), torch.stack(cs, 1))[:, -1]
            p = draw_one(model.position_head(h_p), position_mask(last[:, None], c[:, None], space)[:, 0])
            p = teacher[:, t, 1] if replay else p
            hps.append(h_p)
            ps.append(p)
            if use_cache:
                h_v = model.value_hidden(memory, h_p[:, None], c[:, None], p[:, None], caches[2], cond.hint)[:, -1]
            else:
                h_v = model.value_hidden(memory, torch.stack(hps, 1), torch.stack(cs, 1), torch.stack(ps, 1),
                                         hint=cond.hint)[:, -1]
            v = draw_one(model.value_head(h_v), value_mask(c[:, None], space)[:, 0], value_draw)
            v = teacher[:, t, 2] if replay else v
            triple = torch.where(done[:, None], pad, torch.stack([c, p, v], dim=1))
            seq = torch.cat([seq, triple[:, None]], dim=1)
            done = done | (triple[:, 0] == space.c_eos)
            last = triple
            if bool(done.all()):
                break
    return seq
