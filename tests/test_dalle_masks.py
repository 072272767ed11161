"""Text-to-image attention masks: the vectorised builder equals the loop-by-loop definition, and every mask is causal."""

from __future__ import annotations

import pytest
import torch

from trainer.dalle.masks import KINDS, attention_mask, dense_reference, layer_kinds, layer_masks


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n_text, grid, kernel", [(0, (4, 4), 3), (5, (4, 4), 3), (3, (5, 3), 5), (4, (6, 6), 11),
                                                  (2, (8, 8), 5), (1, (1, 6), 1)])
def test_every_mask_equals_its_dense_definition(kind, n_text, grid, kernel):
    fast = attention_mask(kind, n_text, grid, kernel)
    assert fast.dtype == torch.bool and fast.shape == (n_text + grid[0] * grid[1],) * 2
    assert torch.equal(fast, dense_reference(kind, n_text, grid, kernel))


@pytest.mark.parametrize("kind", KINDS)
def test_masks_are_causal_and_every_query_sees_itself(kind):
    mask = attention_mask(kind, 6, (5, 5), 3)
    assert not (mask & ~torch.ones_like(mask).tril()).any()
    assert mask.diagonal().all()


def test_mask_shapes_by_hand():
    """Two text positions, a 3x3 grid: spot checks of each rule."""
    n_text, w = 2, 3
    cell = {(r, c): n_text + r * w + c for r in range(3) for c in range(3)}
    row, col = attention_mask("row", n_text, (3, 3)), attention_mask("column", n_text, (3, 3))
    conv = attention_mask("conv", n_text, (3, 3), kernel=3)
    q = cell[(1, 1)]
    assert row[q, :n_text].all() and col[q, :n_text].all()  # image -> text: full
    assert not row[0, 1] and row[1, 0]  # text -> text: causal
    assert not row[1, cell[(0, 0)]]  # text never sees the image
    assert row[q, cell[(1, 0)]] and not row[q, cell[(0, 1)]] and not row[q, cell[(1, 2)]]
    assert col[q, cell[(0, 1)]] and not col[q, cell[(1, 0)]] and not col[q, cell[(2, 1)]]
    assert conv[q, cell[(0, 0)]] and conv[q, cell[(0, 2)]] and conv[q, cell[(1, 0)]] and not conv[q, cell[(1, 2)]]
    far = attention_mask("conv", n_text, (3, 3), kernel=1)
    assert far[q].sum() == n_text + 1  # a 1x1 window: the text and the query itself


def test_layer_schedule():
    assert layer_kinds(1) == ["conv"]
    assert layer_kinds(4) == ["row", "row", "column", "conv"]
    assert layer_kinds(8) == ["row", "row", "column", "row", "row", "row", "column", "conv"]
    masks = layer_masks(8, 3, (4, 4), 3)
    assert masks[0] is masks[1] and torch.equal(masks[2], attention_mask("column", 3, (4, 4), 3))
    assert torch.equal(masks[-1], attention_mask("conv", 3, (4, 4), 3))


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="attention kind 'diag'"):
        attention_mask("diag", 2, (2, 2))
    with pytest.raises(ValueError, match="kernel must be odd"):
        attention_mask("conv", 2, (2, 2), kernel=4)
