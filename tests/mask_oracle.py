"""The dense reference mask of a token layout, an oracle for the kernels' per-token-id masks."""

from __future__ import annotations

import numpy as np

from wamjax.models.token_layout import TokenLayout, layout_attention_mask


def attention_mask(layout: TokenLayout) -> np.ndarray | None:
    """The reference [S, S] boolean mask (query, key) of the layout, or None when every token sees every token.

    A query sees a key iff the key is valid (not padding) and the layout's rule allows it: chunk-causal, a key's
    chunk is <= the query's; teacher-forced, see `wamjax/models/attention_mask.py`. Padding queries carry the
    largest chunk id, so they see every valid (clean) key (their rows are dropped). Kernels never receive this
    array: they evaluate the same rule from `layout_attention_mask(layout)` block by block.
    """
    mask = layout_attention_mask(layout)
    return None if mask is None else mask.dense_numpy()
