"""Checks of the model's attention mask against a pruned layer: which new tokens are real, whether
the mask hides the padding the slots hold, and whether it says more than causal order, padding and a
sliding window (then only the model's own attention can honour it)."""

from __future__ import annotations

import torch


def new_token_validity(mask: torch.Tensor | None, batch: int, q: int) -> torch.Tensor | None:
    """`[B, q]` bool: which of the `q` new tokens are real, read from the model's mask (the new tokens
    are its last `q` columns; a real key is visible from its own query row). None: all real."""
    if mask is None:
        return None
    if mask.dim() == 2:  # flash-attention: (B, kv) with 1 = real
        return mask[:, -q:].bool()
    columns = mask[..., -q:]  # a view; reduced over rows without building a [B, 1, q, q] bool copy
    if columns.dtype == torch.bool:
        seen_by_some_row = columns.any(dim=-2)
    else:
        seen_by_some_row = columns.amax(dim=-2) > torch.finfo(columns.dtype).min / 2
    return seen_by_some_row.any(dim=1).expand(batch, q)  # [B, q]


def padded_on_the_right(new_valid: torch.Tensor, real_seen: torch.Tensor) -> torch.Tensor:
    """`[B]` bool: rows that end in padding after real tokens (among the new tokens `new_valid [B, q]`,
    or the `real_seen [B]` the layer held before): a right-padded batch. Observation windows and recent
    tokens count from the end of a row, so such a row would not equal itself alone. Padding before a
    row's tokens (left padding, a chunk that is all padding so far) or a masked token inside a row
    (which the same row alone has too) is not."""
    return ~new_valid[:, -1] & (new_valid.any(dim=-1) | (real_seen > 0))


def visible(mask: torch.Tensor) -> torch.Tensor:
    """A 4-D mask as bool (True = may attend), whether it is bool or additive float."""
    return mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2


def mask_hides_padding(mask: torch.Tensor, slot_valid: torch.Tensor, q: int) -> bool:
    """Whether the model's mask hides every padding slot held before this forward (a forward fed
    without the batch's padding mask, e.g. a continuation called by hand, does not). A host sync:
    called for multi-token forwards over a padded cache only."""
    older = slot_valid[..., :-q].any(dim=1)  # [B, P]: some head holds a real token there
    if mask.dim() == 2:
        shown = mask[:, :-q].bool()
    else:
        columns = mask[..., :-q]
        shown = (columns.any(dim=-2) if columns.dtype == torch.bool
                 else columns.amax(dim=-2) > torch.finfo(columns.dtype).min / 2).any(dim=1)
    return not bool((shown & ~older).any())


def mask_has_structure(mask: torch.Tensor | None, new_valid: torch.Tensor | None, q: int,
                       window: int | None = None) -> bool:
    """Whether a 4-D model mask says more than causal order, padding and the layer's sliding window:
    among real query rows, the new tokens must see exactly the real new tokens at or before them (and
    within the window), and, without a window, every real row the same older columns. Custom 4-D masks
    and bidirectional blocks fail this; transformers' causal, sliding-window and padding masks pass."""
    if mask is None or mask.dim() != 4 or q == 1:
        return False
    allowed = visible(mask).any(dim=1)  # [B, q, kv]
    batch = allowed.shape[0]
    real = new_valid if new_valid is not None else torch.ones(batch, q, dtype=torch.bool, device=mask.device)
    causal = torch.ones(q, q, dtype=torch.bool, device=mask.device).tril()
    expected_new = causal & real[:, None, :]  # [B, q, q]
    if window is not None:
        position = torch.cumsum(real.long(), dim=-1)  # [B, q], real tokens only matter
        expected_new = expected_new & (position[:, :, None] - position[:, None, :] < window)
    rows = real[:, :, None]
    new_block_differs = ((allowed[..., -q:] != expected_new) & rows).any()
    if window is not None:
        return bool(new_block_differs)
    older = allowed[..., :-q]
    reference_row = older.gather(1, real.long().argmax(dim=1)[:, None, None].expand(-1, 1, older.shape[-1]))
    older_differs = ((older != reference_row) & rows).any()
    return bool(new_block_differs | older_differs)


def custom_mask_validity(mask: torch.Tensor, slot_valid: torch.Tensor, exact_prefix: bool, layer_idx: int,
                         q: int) -> torch.Tensor:
    """Slot validity `[B, Hkv, P]` narrowed by a 4-D mask the caller built (transformers passes such masks
    through untouched). Its columns are this layer's slots only while the slots are the exact prefix
    the caller's mask describes (nothing evicted, one column per slot); then the columns its last query
    row hides are hidden for this forward, and other structure across rows is checked by
    `mask_has_structure`. After an eviction the columns name tokens the cache may no longer hold, so
    the mask is refused rather than read against the wrong slots."""
    if mask.shape[1] != 1:
        raise ValueError(
            f"layer {layer_idx}: a custom 4-D attention mask with a mask per head (shape {tuple(mask.shape)}) is "
            "not supported by PrunedCache; pass one mask for all heads, shape [batch, 1, query, key].")
    if not exact_prefix or mask.shape[-1] != slot_valid.shape[-1] or mask.shape[-2] != q:
        raise ValueError(
            f"layer {layer_idx}: a custom 4-D attention mask (shape {tuple(mask.shape)}) reached a PrunedCache "
            f"that holds {slot_valid.shape[-1]} slots after evicting or reordering tokens; its columns no longer "
            "name the tokens the cache holds. A custom mask is honoured only before the first eviction, with one "
            "column per held token and one row per new token; otherwise pass a 2-D padding mask "
            "(attention_mask of shape [batch, tokens]).")
    return slot_valid & visible(mask)[:, :, -1, :]
