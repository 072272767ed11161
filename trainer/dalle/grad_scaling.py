"""Per-resblock gradient scaling (DALL-E, section 2.4): one gradient scale per transformer block.

A single loss scale cannot keep every block's fp16 gradients in range when their magnitudes differ by orders of
magnitude across depth. Here each block ``i`` has its own power-of-two scale ``s_i``:

- the activations leaving block i pass an identity whose backward multiplies the incoming gradient by ``s_i``, so
  everything computed inside the block's backward (activation and parameter gradients) is ``s_i`` times larger;
- the activations entering block i pass an identity whose backward divides by ``s_i`` again and sets inf/NaN entries
  to zero (the paper's filter: an overflow inside one block must not poison the blocks below it);
- a hook on every parameter of block i divides its gradient by ``s_i`` (and zeroes inf/NaN) before it is accumulated,
  so the optimizer (and DeepSpeed's own loss scaling and ZeRO partitioning) see ordinary gradients.

Any inf/NaN seen in block i sets its overflow flag. ``update`` (after the optimizer step, with the flags agreed across
ranks) halves the scale of every block that overflowed and doubles that of a block after ``growth_interval`` clean
steps, within [2^min_log2, 2^max_log2]. With power-of-two scales the scaling is exact: in fp32 the gradients equal
those of the unscaled model.
"""

from __future__ import annotations

import torch
from torch import nn


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by ``scale``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        ctx.save_for_backward(scale)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # noqa: ANN001
        (scale,) = ctx.saved_tensors  # multiplied in fp32: in fp16 a scale of 2^16 is inf, and 0 * inf NaN
        return (grad.float() * scale).to(grad.dtype), None


class _UnscaleGrad(torch.autograd.Function):
    """Identity forward; backward divides by ``scale``, zeroes inf/NaN and records them in ``overflow[layer]``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: torch.Tensor, overflow: torch.Tensor, layer: int) -> torch.Tensor:  # noqa: ANN001
        ctx.save_for_backward(scale)
        ctx.overflow, ctx.layer = overflow, layer
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:  # noqa: ANN001
        (scale,) = ctx.saved_tensors
        return filtered_unscale(grad, scale, ctx.overflow, ctx.layer), None, None, None


def filtered_unscale(grad: torch.Tensor, scale: torch.Tensor, overflow: torch.Tensor, layer: int) -> torch.Tensor:
    """grad / scale with inf/NaN set to 0; flags ``overflow[layer]`` without a host sync."""
    out = grad.float() / scale
    bad = ~torch.isfinite(out)
    overflow[layer] |= bad.any()
    return torch.where(bad, torch.zeros_like(out), out).to(grad.dtype)


class BlockGradScaler(nn.Module):
    """The scales (as log2 exponents, so half-precision casts of the model leave them alone) and overflow flags."""

    def __init__(self, n_layer: int, init_log2: int = 4, growth_interval: int = 200,
                 min_log2: int = -24, max_log2: int = 24) -> None:
        super().__init__()
        if not min_log2 <= init_log2 <= max_log2:
            raise ValueError(f"block gradient scale: need min_log2 <= init_log2 <= max_log2, got "
                             f"{min_log2}, {init_log2}, {max_log2}")
        if growth_interval < 1:
            raise ValueError(f"block gradient scale growth_interval must be >= 1, got {growth_interval}")
        self.growth_interval, self.min_log2, self.max_log2 = growth_interval, min_log2, max_log2
        self.register_buffer("log2_scales", torch.full((n_layer,), init_log2, dtype=torch.int64))
        self.register_buffer("clean_steps", torch.zeros(n_layer, dtype=torch.int64))
        self.register_buffer("overflow", torch.zeros(n_layer, dtype=torch.bool), persistent=False)

    def scale(self, layer: int) -> torch.Tensor:
        return torch.exp2(self.log2_scales[layer].float())

    def enter(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return x
        return _UnscaleGrad.apply(x, self.scale(layer), self.overflow, layer)

    def leave(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return x
        return _ScaleGrad.apply(x, self.scale(layer))

    def attach(self, blocks: nn.ModuleList) -> None:
        """Unscale (and filter) every parameter gradient of block i by s_i before it is accumulated."""
        for layer, block in enumerate(blocks):
            for p in block.parameters():
                p.register_hook(self._param_hook(layer))

    def _param_hook(self, layer: int):  # noqa: ANN202
        def hook(grad: torch.Tensor) -> torch.Tensor:
            return filtered_unscale(grad, self.scale(layer), self.overflow, layer)

        return hook

    @torch.no_grad()
    def update(self) -> list[int]:
        """After a step: halve overflowed blocks' scales, grow clean ones every ``growth_interval`` steps.

        Returns the layers that overflowed (their filtered gradients were zeroed where non-finite)."""
        hit = self.overflow.clone()
        self.clean_steps.add_(1).masked_fill_(hit, 0)
        grow = self.clean_steps >= self.growth_interval
        self.log2_scales.sub_(hit.long()).add_(grow.long()).clamp_(self.min_log2, self.max_log2)
        self.clean_steps.masked_fill_(grow, 0)
        self.overflow.zero_()
        return hit.nonzero().flatten().tolist()
