"""Attention masks of the text-to-image transformer over [text positions ; image positions].

The input sequence holds ``n_text`` text-kind positions (the start token and the caption tokens) followed by image
positions; image position ``j`` holds the image token at grid index ``j`` (row-major, ``row = j // w``). A mask is
boolean [T, T] with True where query ``q`` may attend to key ``k``:

- text -> text: causal (k <= q); text -> image: never (image positions come later);
- image -> text: full;
- image -> image, by layer kind, always with k <= q in raster order (so every layer, and the whole model, is causal):
  ``row`` same row, ``column`` same column, ``conv`` inside the ``kernel x kernel`` window centred on the query,
  ``dense`` every earlier image position (a plain causal layer, for comparisons).

Layer schedule (the paper's): column attention in layer i when (i - 2) % 4 == 0, causal convolutional attention in the
last layer, row attention in the others. ``dense_reference`` spells the same definition out with explicit loops over
query and key positions; the tests hold the vectorised builder to it.
"""

from __future__ import annotations

import torch

KINDS = ("row", "column", "conv", "dense")


def layer_kinds(n_layer: int) -> list[str]:
    """The attention kind of every layer: the last ``conv``, ``column`` where (i - 2) % 4 == 0, else ``row``.

    ``i`` counts layers from 0 here (columns at layers 2, 6, 10, ...). The paper numbers layers from 1, which would
    put them one layer earlier; the spec does not fix the base, and changing it would change the masks of every
    model already trained, so the 0-based reading stays."""
    return ["conv" if i == n_layer - 1 else "column" if (i - 2) % 4 == 0 else "row" for i in range(n_layer)]


def _check(kind: str, n_text: int, grid: tuple[int, int], kernel: int) -> None:
    if kind not in KINDS:
        raise ValueError(f"attention kind {kind!r}: known kinds are {KINDS}")
    if n_text < 0 or grid[0] < 1 or grid[1] < 1:
        raise ValueError(f"mask needs n_text >= 0 and a grid of at least 1x1, got n_text={n_text}, grid={grid}")
    if kernel < 1 or kernel % 2 == 0:
        raise ValueError(f"convolutional attention kernel must be odd and >= 1, got {kernel}")


def attention_mask(kind: str, n_text: int, grid: tuple[int, int], kernel: int = 11) -> torch.Tensor:
    """Boolean [T, T] mask, T = n_text + h * w, True = may attend (vectorised over all query/key pairs)."""
    _check(kind, n_text, grid, kernel)
    h, w = grid
    t = n_text + h * w
    pos = torch.arange(t)
    q, k = pos[:, None], pos[None, :]
    causal = k <= q
    is_text_q, is_text_k = q < n_text, k < n_text
    img = (pos - n_text).clamp(min=0)
    row, col = img // w, img % w
    rq, rk, cq, ck = row[:, None], row[None, :], col[:, None], col[None, :]
    if kind == "row":
        image_rule = rq == rk
    elif kind == "column":
        image_rule = cq == ck
    elif kind == "conv":
        half = kernel // 2
        image_rule = ((rq - rk).abs() <= half) & ((cq - ck).abs() <= half)
    else:
        image_rule = torch.ones(t, t, dtype=torch.bool)
    text_part = is_text_q & is_text_k & causal
    image_to_text = ~is_text_q & is_text_k
    image_to_image = ~is_text_q & ~is_text_k & causal & image_rule
    return text_part | image_to_text | image_to_image


def dense_reference(kind: str, n_text: int, grid: tuple[int, int], kernel: int = 11) -> torch.Tensor:
    """The same mask from its definition, one (query, key) pair at a time: slow and obviously right."""
    _check(kind, n_text, grid, kernel)
    h, w = grid
    t = n_text + h * w
    mask = torch.zeros(t, t, dtype=torch.bool)
    for q in range(t):
        for k in range(t):
            if q < n_text:
                mask[q, k] = k < n_text and k <= q
            elif k < n_text:
                mask[q, k] = True
            elif k <= q:
                (qr, qc), (kr, kc) = divmod(q - n_text, w), divmod(k - n_text, w)
                mask[q, k] = {
                    "row": qr == kr,
                    "column": qc == kc,
                    "conv": abs(qr - kr) <= kernel // 2 and abs(qc - kc) <= kernel // 2,
                    "dense": True,
                }[kind]
    return mask


def layer_masks(n_layer: int, n_text: int, grid: tuple[int, int], kernel: int = 11) -> list[torch.Tensor]:
    """One mask per layer following ``layer_kinds``; layers of the same kind share one tensor."""
    built = {kind: attention_mask(kind, n_text, grid, kernel) for kind in set(layer_kinds(n_layer))}
    return [built[kind] for kind in layer_kinds(n_layer)]
