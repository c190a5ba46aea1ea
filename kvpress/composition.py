"""Which (wrapper, inner) pairs compose, decided in one place from the capabilities each policy
declares (class attributes of `EvictionPolicy`), never from concrete classes.

The rules, first match wins (`inner` is every policy of the wrapped chain in turn):

1. an inner policy that runs the decoder layers itself (LazyLLM) evicts nothing from the cache, so
   nothing can rescore or reallocate it: use it alone;
2. a wrapper that sets counts or storage appears twice: use one;
3. a wrapper that needs each slot's attention weight (CAOTE) around a policy that computes none:
   wrap an attention-scoring policy;
4. a wrapper that sets per-head counts from the inner scores (AdaKV) must stand outside any wrapper
   that changes scores or per-layer counts: put it outside;
5. a wrapper that sets per-layer or per-head counts around a policy that sets its own counts
   (SpAtten, KVCompose), keeps the same tokens in every head, or evicts whole blocks: use the inner
   policy alone;
6. a wrapper that changes per-slot scores around a block-wise policy (PagedEviction) would split
   its blocks: use the block-wise policy alone;
7. a wrapper that couples neighbouring slots' scores (Span's pooling) around a cross-layer
   allocator (KVzip, KVCompose), whose counts come from its own unpooled scores: the pooled ranking
   would disagree with the counts; use the allocator alone.
"""

from __future__ import annotations


class CompositionError(ValueError):
    """A wrapper and an inner policy that cannot work together; the message says which order works."""


def _name(policy) -> str:
    return type(policy).spec_name


def _sets_counts(policy) -> bool:
    return policy.sets_layer_counts or policy.sets_head_counts


def refusal(wrapper, inner) -> str | None:
    """Why `wrapper` cannot wrap `inner` (one policy of its inner chain), or None when they compose."""
    w, i = _name(wrapper), _name(inner)
    inner_is_wrapper = len(inner.chain()) > 1
    if inner.runs_decoder_layers:
        return (f"{type(inner).__name__} prunes what the model computes and never evicts from the cache, so "
                f"there is nothing to rescore or reallocate; use {i} alone")
    if type(inner) is type(wrapper) and (_sets_counts(wrapper) or wrapper.sets_storage):
        return f"{type(wrapper).__name__} appears twice; use one {w}(...)"
    if wrapper.needs_attention and not inner_is_wrapper and not inner.requests_attention():
        return (f"{type(inner).__name__} computes no attention, and {type(wrapper).__name__} needs the attention "
                "weight of each slot; wrap an attention-scoring policy such as h2o, snapkv, tova or a2sf")
    if inner_is_wrapper and inner.sets_head_counts and (wrapper.changes_scores or wrapper.sets_layer_counts):
        return (f"{type(inner).__name__} sets per-head counts from the scores it wraps; put it outside: "
                f"{i}({w}(...))")
    if _sets_counts(wrapper) and not inner_is_wrapper:
        if inner.block_wise:
            return f"{type(inner).__name__} evicts the same whole blocks in every KV head; use {i} alone"
        if inner.same_tokens_in_every_head and wrapper.sets_head_counts:
            return (f"{type(inner).__name__} keeps the same tokens in every head of a layer, so per-head counts "
                    f"do not apply; use {i} alone")
        if _sets_counts(inner):
            kinds = " and ".join(kind for kind, sets in (("per-layer", inner.sets_layer_counts),
                                                          ("per-head", inner.sets_head_counts)) if sets)
            return f"{type(inner).__name__} sets its own {kinds} counts; use {i} alone"
    if wrapper.changes_scores and inner.block_wise:
        return (f"{type(inner).__name__} ranks whole blocks with the same scores in every KV head; a per-slot "
                f"score would split its blocks; use {i} alone")
    if wrapper.couples_neighbouring_slots and inner.allocates_across_layers:
        return (f"{type(inner).__name__} chooses every layer's counts from its own unpooled scores, so "
                f"{type(wrapper).__name__}'s pooled ranking would disagree with them; use {i} alone")
    return None


def check(wrapper) -> None:
    """Raise `CompositionError` naming the pair and the order that works, if `wrapper` cannot wrap
    some policy of its inner chain."""
    for inner in wrapper.inner.chain():
        problem = refusal(wrapper, inner)
        if problem:
            raise CompositionError(f"{type(wrapper).__name__}({type(wrapper.inner).__name__}(...)): {problem}")
