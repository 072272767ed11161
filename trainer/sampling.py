"""Drawing tokens from logits: temperature, top-k and nucleus (top-p) filtering."""

from __future__ import annotations

import math

import torch


def check_draw(temperature: float, top_k: int, top_p: float, prefix: str = "") -> None:
    """Refuse settings the draw cannot honour, by name: top_p 0 kept no token and a NaN or infinite temperature
    made every probability NaN (torch's "probability tensor contains either inf, nan or element < 0"), and a
    negative temperature drew greedily without a word."""
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"{prefix}temperature must be a finite number >= 0 (0 draws greedily), got {temperature}")
    if not 0 < top_p <= 1:  # also refuses NaN
        raise ValueError(f"{prefix}top_p must be in (0, 1], got {top_p}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be an integer >= 0 (0 keeps every token), got {top_k!r}")


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set to -inf every logit outside the top-k and outside the smallest set holding top_p of the mass."""
    if top_k > 0 and top_k < logits.shape[-1]:
        # exactly k by index: a threshold on the k-th value would keep every logit tied with it (common in bf16)
        keep = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, torch.topk(logits, top_k, dim=-1).indices, True)
        logits = logits.masked_fill(~keep, float("-inf"))
    if top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, descending=True, dim=-1)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        drop = cum - torch.softmax(sorted_logits, dim=-1) >= top_p  # the mass before it already reaches top_p
        logits = logits.masked_fill(drop.scatter(-1, idx, drop), float("-inf"))
    return logits


def sample_logits(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One token per row of ``logits`` ([..., vocab]); temperature 0 means greedy, and so does one below 1e-6 (dividing
    by it would overflow the logits to inf)."""
    check_draw(temperature, top_k, top_p)
    if (torch.isnan(logits) | torch.isposinf(logits)).any():  # -inf is a masked token; these are not (one sync)
        raise ValueError("the model gives non-finite outputs (NaN or +inf logits): its weights are broken, e.g. "
                         "exported from a run whose training diverged")
    if temperature < 1e-6:
        return logits.argmax(dim=-1)
    probs = torch.softmax(filter_logits(logits.float() / temperature, top_k, top_p), dim=-1)
    flat = probs.reshape(-1, probs.shape[-1])
    if generator is not None and generator.device != flat.device:  # a CPU generator with a GPU model: draw where
        # the generator lives (the same seed then draws the same tokens on either device)
        return torch.multinomial(flat.to(generator.device), 1, generator=generator).to(flat.device).reshape(
            probs.shape[:-1])
    return torch.multinomial(flat, 1, generator=generator).reshape(probs.shape[:-1])
