"""Drawing tokens from logits: temperature, top-k and nucleus (top-p) filtering."""

from __future__ import annotations

import torch


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
    if temperature < 1e-6:
        return logits.argmax(dim=-1)
    probs = torch.softmax(filter_logits(logits.float() / temperature, top_k, top_p), dim=-1)
    flat = probs.reshape(-1, probs.shape[-1])
    if generator is not None and generator.device != flat.device:  # a CPU generator with a GPU model: draw where
        # the generator lives (the same seed then draws the same tokens on either device)
        return torch.multinomial(flat.to(generator.device), 1, generator=generator).to(flat.device).reshape(
            probs.shape[:-1])
    return torch.multinomial(flat, 1, generator=generator).reshape(probs.shape[:-1])
