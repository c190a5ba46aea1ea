"""PagedEviction: attention-free eviction of whole blocks (pages) of the cache."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvpress.budgets import check_int
from kvpress.policy import DECODE, PREFILL, Policy, slots_for_budget
from kvpress.state import State

TOKEN_SCORES = ("v_over_k", "inverse_key", "value", "key_plus_value")
KEEP_ENDS = ("reference", "high", "low")
REFERENCE_SCORES = ("inverse_key", "value", "key_plus_value")  # the scores the reference code has
EPSILON = 1e-6


class PhaseState(State):
    """The phase of the layer's last forward: a prompt (tokenwise selection) or a decoding step
    (whole blocks). No tensor, so batch operations and device moves leave it as it is."""

    def __init__(self) -> None:
        self.phase = PREFILL


@dataclass
class PagedEviction(Policy):
    """Block-wise eviction aligned with a paged KV cache, from key and value norms only.

    Chitty-Venkata et al., "PagedEviction: Structured Block-wise KV Cache Pruning for Efficient Large
    Language Model Inference", arXiv 2509.04377; reference code `krishnateja95/PagedEviction`
    `modeling_llama.py`. Each layer's slots, in temporal order, form blocks of `block_size`; every
    block but the newest is full.

    Token score (`token_score`, fp32 norms, epsilon 1e-6) from the token's key and value norms
    averaged over the KV heads first (`k = mean_h ||k_h||_2`, `v = mean_h ||v_h||_2`, as the reference's
    `get_token_score`), so every head keeps the same tokens: `"v_over_k"` `v / (k + eps)` (the paper's
    ratio as its reviews state it; the reference code has no such score), or the reference code's
    `"inverse_key"` `1 / (k + eps)`, `"value"` `v` and `"key_plus_value"` `k + v`. Block score, as the
    reference's variants: the global variant applies the same formula to the block's mean norms
    (`get_page_score`: `1 / (mean k + eps)` for `inverse_key`); the local variant takes the mean of its
    tokens' scores (the reference sums them over full pages, which ranks the same).
    Which end is kept (`keep_end`): `"reference"` keeps what the reference keeps for its scores, the
    LOW end in the global variant (`topk(largest=False)` at prefill, the highest-scoring page evicted:
    for `inverse_key` the tokens with large key norms) and the high end in the local variant; for
    `v_over_k`, which the code lacks, the high end in both (the paper evicts the least important
    tokens). `"high"` / `"low"` keep that end in both variants (`"high"` was this library's rule
    before it followed the reference).
    Prompt (a forward of several tokens): the first block and the newest (partial) block of the
    prompt are kept, the other tokens ranked one by one, the best (at the kept end) up to the budget; the kept
    tokens then form the blocks. Decoding: whenever the cache evicts (every step at slack 0, every
    `slack + 1` steps otherwise) and the layer holds more than its budget, it evicts the fewest whole
    blocks that bring it back within the budget, the worst-scoring first, never the first block nor
    the newest, so at slack 0 the size stays in `[budget - block_size, budget]` between steps and no
    block is left partly filled. With a budget that is a multiple of `block_size`, that is one block
    each time the newest block fills and the next token arrives. `oldest_blocks` is the reference's "local" variant:
    only the `oldest_blocks` blocks after the first may be evicted (None: any block, "global").
    Sinks and window, if given, protect the whole blocks that hold those tokens.

    Attention-free: `request()` is None, so no attention signal is ever computed. State: only the
    phase of the last forward; block scores are recomputed from the stored keys and values when the
    layer evicts (they never change, so this equals the reference's per-block score list).
    A budget of fewer than four blocks would leave no block to evict besides the first and the newest,
    or swing the size by more than a quarter of the budget: such a layer uses blocks of `budget // 4`
    slots (at least 1), so the budget still holds [our choice]. Defaults: block size 16
    (vLLM's page size), budget 0.2 [our choice; the paper's budgets are unverified].
    """

    spec_name = "pagedeviction"
    block_wise = True
    same_tokens_in_every_head = True

    budget: int | float = 0.2
    block_size: int = 16
    token_score: str = "v_over_k"
    oldest_blocks: int | None = None
    keep_end: str = "reference"

    def __post_init__(self) -> None:
        super().__post_init__()
        size = self.block_size
        check_int("PagedEviction", "block_size", size, 1, "slots per block")
        if self.token_score not in TOKEN_SCORES:
            raise ValueError(f"PagedEviction: token_score must be one of {TOKEN_SCORES}, got {self.token_score!r}")
        if self.keep_end not in KEEP_ENDS:
            raise ValueError(f"PagedEviction: keep_end must be one of {KEEP_ENDS}, got {self.keep_end!r}")
        oldest = self.oldest_blocks
        if oldest is not None and (isinstance(oldest, bool) or not isinstance(oldest, int) or oldest < 1):
            raise ValueError(f"PagedEviction: oldest_blocks must be None (any block) or an int >= 1, got {oldest!r}")

    # ---- state: the phase of the last forward ----
    def new_layer_state(self, layer) -> PhaseState:
        return PhaseState()

    def raw_scores(self, layer) -> None:
        return None  # attention-free

    def update(self, layer, signals) -> None:
        layer.state(self).phase = signals.phase

    def decoding(self, layer) -> bool:
        return layer.state(self).phase == DECODE

    # ---- blocks ----
    def blocks_of(self, layer) -> torch.Tensor:
        """`[B]` slots per block in `layer`: `block_size`, or a quarter of the budget (at least 1) when
        the budget holds fewer than four blocks."""
        budget = layer.budget
        if isinstance(budget, int):
            return torch.full_like(layer.real_seen, min(self.block_size, max(1, budget // 4)))
        return (slots_for_budget(budget, layer.real_seen) // 4).clamp(min=1, max=self.block_size)

    def block_size_of(self, layer) -> int:
        """The block size `layer` uses (the largest over the batch rows), for `PrunedCache.report()`."""
        return int(self.blocks_of(layer).max())

    def block_index(self, layer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`(block [B, P], held [B], size [B])`: each slot's block (rank among the row's valid slots,
        in temporal order, divided by the block size; `P` for an invalid slot), the valid slots of
        each row and the block size. Every head holds the same tokens, so head 0 describes the row."""
        valid = layer.valid[:, 0]  # [B, P]
        size = self.blocks_of(layer)
        rank = valid.long().cumsum(-1) - 1
        block = torch.where(valid, rank // size[:, None], valid.shape[-1])
        return block, valid.sum(-1), size

    def combine(self, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """The token score from (mean) key and value norms, fp32."""
        if self.token_score == "v_over_k":
            return values / (keys + EPSILON)
        if self.token_score == "inverse_key":
            return 1.0 / (keys + EPSILON)
        if self.token_score == "value":
            return values
        return keys + values

    def head_mean_norms(self, layer) -> tuple[torch.Tensor, torch.Tensor]:
        """`([B, P], [B, P])` fp32: each slot's key and value norms averaged over the KV heads that hold
        it (0 on invalid slots)."""
        valid = layer.valid  # [B, Hkv, P]
        heads = valid.sum(1).clamp(min=1)  # [B, P]
        keys = layer.keys.float().norm(dim=-1).masked_fill(~valid, 0.0).sum(1) / heads
        values = layer.values.float().norm(dim=-1).masked_fill(~valid, 0.0).sum(1) / heads
        return keys, values

    def token_scores(self, layer) -> torch.Tensor:
        """`[B, P]` fp32: the token score of each slot from its head-averaged norms."""
        return self.combine(*self.head_mean_norms(layer))

    def block_scores(self, layer) -> torch.Tensor:
        """`[B, P]` fp32: each slot carries its block's score; global variant: the token formula on the
        block's mean norms, local variant (`oldest_blocks`): the mean of its tokens' scores."""
        block, _, _ = self.block_index(layer)

        def block_mean(per_slot):  # [B, P] -> [B, P], the mean over each slot's block
            slots = block.shape[-1]
            total = per_slot.new_zeros(block.shape[0], slots + 1).scatter_add_(1, block, per_slot)
            count = per_slot.new_zeros(block.shape[0], slots + 1).scatter_add_(1, block, torch.ones_like(per_slot))
            return (total / count.clamp(min=1)).gather(1, block)

        if self.oldest_blocks is not None:
            return block_mean(self.token_scores(layer))
        keys, values = self.head_mean_norms(layer)
        return self.combine(block_mean(keys), block_mean(values))

    def keeps_low_end(self) -> bool:
        if self.keep_end == "reference":
            return self.oldest_blocks is None and self.token_score in REFERENCE_SCORES
        return self.keep_end == "low"

    # ---- the selection hooks ----
    def score(self, layer) -> torch.Tensor:
        per_slot = self.block_scores(layer) if self.decoding(layer) else self.token_scores(layer)
        if self.keeps_low_end():
            per_slot = -per_slot  # the selection keeps the highest scores
        return per_slot[:, None].expand_as(layer.valid)

    def protected(self, layer) -> torch.Tensor:
        """Prompt: the first block and the prompt's newest (partial) block, by real position. Decoding:
        the first and the newest block of the layer, every block outside the `oldest_blocks` after the
        first, and any block holding a sink or window token."""
        tokens = super().protected(layer)  # [B, Hkv, P] sinks and window
        size = self.blocks_of(layer)[:, None, None]  # [B, 1, 1]
        if not self.decoding(layer):
            seen = layer.real_seen[:, None, None]
            newest_start = (seen - 1) // size * size
            pos = layer.positions
            return tokens | (layer.valid & ((pos < size) | (pos >= newest_start)))
        block, held, _ = self.block_index(layer)  # [B, P], [B]
        newest = (held - 1) // size[:, 0, 0]  # [B]
        keep = (block == 0) | (block >= newest[:, None])
        if self.oldest_blocks is not None:
            keep |= block > self.oldest_blocks
        holds_protected = torch.zeros(block.shape[0], block.shape[1] + 1, device=block.device)
        holds_protected.scatter_add_(1, block, tokens.any(1).float())
        keep |= holds_protected.gather(1, block) > 0
        return layer.valid & keep[:, None]

    def keep_counts(self, layer) -> torch.Tensor:
        """Prompt: the budget. Decoding: what remains after evicting the fewest whole blocks that bring
        the layer within its budget."""
        budget = super().keep_counts(layer)  # [B, Hkv]
        if not self.decoding(layer):
            return budget
        held = layer.valid.sum(-1)  # [B, Hkv]
        size = self.blocks_of(layer)[:, None]
        excess = (held - budget).clamp(min=0)
        blocks = (excess + size - 1) // size
        return held - blocks * size

    def over_budget(self, layer, counts, slack) -> bool:
        budget = super().keep_counts(layer)
        return bool((layer.valid.sum(-1) > budget + slack).any())
