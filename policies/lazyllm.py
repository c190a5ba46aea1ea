"""LazyLLM: progressive token pruning in the forward pass, an auxiliary cache of hidden states, and
dynamic revival."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import ClassVar

import torch
from transformers.modeling_layers import GradientCheckpointingLayer

from kvpress import masks
from kvpress.policy import AttentionRequest, EvictionPolicy, Signals
from kvpress.selection import rank_from_order, valid_first_order
from kvpress.slots import TokenLayout
from kvpress.spec_values import parse_value
from kvpress.state import State

# a schedule layer that stops and revives nothing leaves the forward to the model; tests turn this off to
# run the working-set path (TokenLayout, attention by position) on a schedule that prunes nothing
SKIP_UNCHANGED_WORK = True
ABSENT = -1  # an auxiliary entry that holds no token
IN_FLIGHT = -2  # an auxiliary entry whose token is being computed upward in this forward


@dataclass
class Work:
    """The tokens one forward computes at the next layer, when they are not simply the forward's own:
    `[B, W]` each, padded with invalid entries at the front (so the newest token is the last row).
    `origin` is the index among the forward's tokens (-1 for a revived one), `aux` the auxiliary entry a
    revived token came from (-1 for the forward's own), `hidden [B, W, D]` the input of the next layer."""

    hidden: torch.Tensor
    positions: torch.Tensor
    rope: torch.Tensor
    valid: torch.Tensor
    origin: torch.Tensor
    aux: torch.Tensor


class LazyState(State):
    """What LazyLLM keeps in the cache: the auxiliary cache of tokens whose computation stopped at some
    layer, per row (`[B, M]`, entries with `aux_layer == ABSENT` are free): the hidden state they left
    that layer with (`aux_hidden [B, M, D]`), their position among the row's real tokens, their RoPE
    position and that layer. `real_seen [B]` counts each row's real tokens. The rest is scratch of the
    forward in progress (not batch state)."""

    row_fields: ClassVar[tuple[str, ...]] = ("aux_hidden", "aux_position", "aux_rope", "aux_layer", "real_seen")

    def __init__(self, batch: int, hidden: int, device, dtype):
        self.aux_hidden = torch.zeros(batch, 0, hidden, device=device, dtype=dtype)
        self.aux_position = torch.zeros(batch, 0, dtype=torch.long, device=device)
        self.aux_rope = torch.zeros(batch, 0, dtype=torch.long, device=device)
        self.aux_layer = torch.zeros(batch, 0, dtype=torch.long, device=device)
        self.real_seen = torch.zeros(batch, dtype=torch.long, device=device)
        self.rotary = None
        self.ordered = False  # the working set is the forward's own real tokens in order (TokenLayout)
        self.forward: tuple | None = None  # (tokens, valid [B, T], positions [B, T], rope [B, T]) of this forward
        self.importance: tuple | None = None  # (mass [B, S], positions [B, S], valid [B, S]) at a pruning layer
        self.work: Work | None = None
        # host-side counts of token-layer computations (real tokens only), for reports and benchmarks
        self.computed = 0
        self.dense = 0
        self.revived = 0
        self.forward_tokens = 0


@dataclass
class LazyLLM(EvictionPolicy):
    """Prune tokens from the computation itself: at the layers of `schedule`, tokens that the last token
    attends to least stop being computed; later layers run on the kept tokens only (at their true
    positions), which is what makes the time to first token shorter.

    Fu et al., "LazyLLM: Dynamic Token Pruning for Efficient Long Context LLM Inference", arXiv
    2407.14057. After the forward's layer `l` of the schedule, each token present at `l` is scored by
    the attention the forward's last token gives it, summed over the query heads; the row keeps its top
    `round(keep_l * tokens seen)` (the last token always), so `keep` is a fraction of the whole sequence.
    A token of this forward that is not kept stops: its hidden state leaving layer `l` goes to the
    auxiliary cache (counted in `PrunedCache.report()`), and it has no KV at the layers above. At later
    forwards (decoding steps, later chunks of a prompt) the same selection runs with the newest token; a
    token it keeps at `l` that stopped at `l` is revived: its stored hidden state runs through layers
    `l+1, ...` (attending to the slots each layer holds at or before its position), adding its KV there,
    until a pruning layer does not keep it (its entry moves there) or it reaches the top (the entry is
    freed). KV already computed is never recomputed, so a token is computed at most once per layer.

    schedule: `((layer, keep), ...)`, layers as indices or fractions of the model's depth (0.25 of 32
        layers is layer 8), increasing, with keep fractions in (0, 1], non-increasing; in a spec string
        `lazyllm:schedule=8:0.7/16:0.5/24:0.3`. Default: after the first, second and third quarters of
        the layers keep 70%, 50% and 30% (policies.md, our choice).

    Runs every decoder layer itself (`install_decoder_layer_hook`, done when the first LazyLLM is built)
    and never evicts, so it composes with no other
    policy; quantized storage (`PrunedCache(..., quantization=KVQuant(...))`) works. Left-padded batches
    work. In models that mix sliding-window and full-attention layers (Gemma 2/3) every layer is a
    pruned layer (the window applied by position), and a schedule layer that slides moves up to the next
    full-attention layer: a sliding layer holds only its window, so it could rank nothing older.
    """

    spec_name = "lazyllm"

    schedule: tuple = ((0.25, 0.7), (0.5, 0.5), (0.75, 0.3))
    runs_decoder_layers: ClassVar[bool] = True
    budget: ClassVar[float] = 1.0  # never evicts
    sinks: ClassVar[int] = 0
    window: ClassVar[int] = 0

    def __post_init__(self) -> None:
        install_decoder_layer_hook()
        schedule = self.schedule
        if isinstance(schedule, str):  # spec strings: "8:0.7/16:0.5/24:0.3" or "0.25:0.7/0.5:0.5"
            schedule = tuple(tuple(parse_value(x) for x in entry.split(":")) for entry in schedule.split("/"))
        if not isinstance(schedule, (tuple, list)) or not schedule:
            raise ValueError(f"LazyLLM: schedule must be a non-empty sequence of (layer, keep) pairs, got {schedule!r}")
        last_keep = 1.0
        for entry in schedule:
            if not isinstance(entry, (tuple, list)) or len(entry) != 2:
                raise ValueError(f"LazyLLM: schedule entries must be (layer, keep) pairs, got {entry!r}")
            layer, keep = entry
            if isinstance(layer, bool) or not isinstance(layer, (int, float)) or layer < 0 or (
                    isinstance(layer, float) and layer >= 1):
                raise ValueError(f"LazyLLM: schedule layer must be an int >= 0 or a float fraction in [0, 1), got {layer!r}")
            if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0 < keep <= 1:
                raise ValueError(f"LazyLLM: schedule keep must be a fraction in (0, 1], got {keep!r}")
            if keep > last_keep:
                raise ValueError(f"LazyLLM: schedule keep fractions must not increase with depth, got {schedule!r}")
            last_keep = keep
        self.schedule = tuple((layer, float(keep)) for layer, keep in schedule)

    def pruning_layers(self, num_layers: int, layer_types: tuple | None = None) -> dict[int, float]:
        """`{layer index: keep}` for a model of `num_layers` decoder layers. With `layer_types`, a schedule
        layer that is a sliding-window layer moves up to the next full-attention layer: a sliding layer
        holds only its window, so it could rank nothing older."""
        resolved = {}
        previous = -1
        for layer, keep in self.schedule:
            index = int(layer * num_layers) if isinstance(layer, float) else layer
            while layer_types and index < num_layers - 1 and layer_types[index] != "full_attention":
                index += 1
            if index >= num_layers - 1:
                raise ValueError(f"LazyLLM: schedule layer {layer!r} is layer {index}, but tokens pruned there would "
                                 f"skip nothing: the model has {num_layers} layers (indices 0-{num_layers - 2} prune)")
            if index <= previous:
                raise ValueError(f"LazyLLM: schedule layers must increase, got {self.schedule!r} "
                                 f"(layers {sorted(resolved)} and {index} for {num_layers} layers)")
            resolved[index] = keep
            previous = index
        return resolved

    # ---- the cache's hooks ----
    def request(self, phase):
        return AttentionRequest(rows=1, accumulate=False)

    def evicts_during(self, phase) -> bool:
        return False

    def update(self, layer, signals: Signals) -> None:
        state = layer.context.shared.states.get(layer.context.depth_of(self))
        if state is not None and layer.layer_idx in self.pruning_layers(*_depth(signals.module)):
            # as the layer held them when its newest token attended (a sliding window may drop some next);
            # LazyLLM keeps the same tokens in every KV head
            state.importance = (signals.mass.sum(dim=1), layer.positions[:, 0].clone(),
                                layer.valid[:, 0].clone())  # mass summed over every query head

    # ---- decoder layers ----
    def run_decoder_layer(self, cache, module, call, args, kwargs):
        """One decoder layer of a forward (called through `_decoder_layer_call`)."""
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        attention_module = module.self_attn
        index = attention_module.layer_idx
        num_layers, layer_types = _depth(attention_module)
        state = self._state(cache, hidden)
        if index == 0:
            self._start_forward(state, cache, attention_module, hidden, kwargs)
        work = state.work
        if work is None:
            output = call(module, hidden, *args[1:], **kwargs)
            state.computed += state.forward_tokens
        else:
            output = self._run_work(state, cache, module, call, hidden, kwargs, index, layer_types)
        keep = self.pruning_layers(num_layers, layer_types).get(index)
        if keep is not None:
            self._select(state, cache.layer_at(index), output, keep, index)
        if index == num_layers - 1:
            self._end_forward(state)
        return output

    def _state(self, cache, hidden) -> LazyState:
        return cache.shared_state(
            self, create=lambda: LazyState(hidden.shape[0], hidden.shape[-1], hidden.device, hidden.dtype))

    def _start_forward(self, state: LazyState, cache, attention_module, hidden, kwargs) -> None:
        kinds = set(_depth(attention_module)[1] or ())
        if not kinds <= {"full_attention", "sliding_attention"}:
            raise NotImplementedError(
                f"LazyLLM: layer types {sorted(kinds)}; supported: full and sliding-window attention layers")
        if state.rotary is None:
            state.rotary = _rotary_for(attention_module)
        state.rotary.to(hidden.device)  # in place; the cache may have moved
        batch, tokens = hidden.shape[:2]
        valid = masks.new_token_validity(kwargs.get("attention_mask"), batch, tokens)
        if valid is None:
            valid = torch.ones(batch, tokens, dtype=torch.bool, device=hidden.device)
        if not bool(valid[:, -1].all()):
            if bool((~valid.any(dim=-1) & (state.real_seen == 0)).any()):
                raise NotImplementedError(
                    "LazyLLM: a row of this forward is all padding (a chunked prefill of a left-padded batch); "
                    "the newest token of every row selects what later layers compute, so prefill the prompt in "
                    "one forward (no prefill_chunk_size)")
            raise ValueError("LazyLLM: the last token of every row must be real (pad on the left)")
        positions = torch.where(valid, state.real_seen[:, None] + valid.long().cumsum(-1) - 1, -1)
        rope = kwargs.get("position_ids")
        if rope is None:
            rope = torch.arange(tokens, device=hidden.device)[None] + cache.get_seq_length()
        state.forward = (tokens, valid, positions, rope.expand(batch, tokens))
        state.real_seen = state.real_seen + valid.sum(-1)
        state.forward_tokens = int(valid.sum())
        state.dense += state.forward_tokens * _depth(attention_module)[0]
        state.work = None
        state.importance = None

    def _run_work(self, state: LazyState, cache, module, call, hidden, kwargs, index, layer_types):
        """The decoder layer on the working set; returns the forward's hidden states with the working
        set's own tokens updated (the others keep the state they stopped with)."""
        work = state.work
        tokens, forward_valid = state.forward[0], state.forward[1]
        layer = cache.layer_at(index)
        layer.layout = TokenLayout(work.positions, work.valid, forward_valid.sum(-1), tokens, state.ordered)
        kwargs["attention_mask"] = None  # the layout carries validity and causal order
        kwargs["position_ids"] = work.rope
        if hasattr(state.rotary, "layer_types"):  # one rotary per layer type (Gemma 3: local and global bases)
            kwargs["position_embeddings"] = state.rotary(work.hidden, work.rope, layer_types[index])
        else:
            kwargs["position_embeddings"] = state.rotary(work.hidden, work.rope)
        work.hidden = call(module, work.hidden, **kwargs)
        state.computed += int(work.valid.sum())
        own = work.valid & (work.origin >= 0)
        target = torch.where(own, work.origin, tokens)  # column `tokens` collects everything else
        output = torch.cat([hidden, hidden[:, :1]], dim=1)
        output.scatter_(1, target[..., None].expand_as(work.hidden), work.hidden)
        return output[:, :tokens]

    def _select(self, state: LazyState, layer, output, keep: float, index: int) -> None:
        """After pruning layer `index`: choose the tokens kept for the layers above, stop the others,
        revive the stopped ones the newest token now selects."""
        batch = output.shape[0]
        importance, slot_positions, slot_valid = state.importance
        newest = state.forward[2][:, -1:]  # [B, 1]
        big = torch.finfo(torch.float32).max
        ranked = torch.where(slot_valid, importance.clamp(-big / 2, big / 2), -big)
        ranked = torch.where(slot_positions == newest, big, ranked)
        order = torch.argsort(ranked, dim=-1, descending=True, stable=True)
        rank = rank_from_order(order)
        counts = torch.clamp(torch.round(state.real_seen.float() * keep).long(), min=1)
        chosen = slot_valid & (rank < counts[:, None])
        longest = int(state.real_seen.max())
        chosen_positions = torch.zeros(batch, longest + 1, dtype=torch.bool, device=output.device)
        chosen_positions.scatter_(1, torch.where(chosen, slot_positions, longest), True)
        chosen_positions[:, longest] = False

        work = state.work
        if work is None:  # every token of the forward was computed at this layer
            tokens, valid, positions, rope = state.forward
            origin = torch.arange(tokens, device=output.device).expand(batch, tokens)
            work = Work(output, positions, rope, valid, origin, torch.full_like(origin, -1))
        member_kept = work.valid & chosen_positions.gather(1, work.positions.clamp(min=0))
        stopped = work.valid & ~member_kept
        waiting = state.aux_layer == index
        revived = waiting & chosen_positions.gather(1, state.aux_position.clamp(min=0))
        if SKIP_UNCHANGED_WORK and state.work is None and not bool(stopped.any()) and not bool(revived.any()):
            return  # nothing changes: the forward goes on as the model runs it
        self._stop(state, work, stopped, index)
        revived = torch.cat([revived, revived.new_zeros(batch, state.aux_layer.shape[1] - revived.shape[1])], dim=1)
        state.aux_layer = torch.where(revived, IN_FLIGHT, state.aux_layer)
        state.revived += int(revived.sum())
        slots = torch.arange(state.aux_layer.shape[1], device=output.device).expand(batch, -1)
        candidates = Work(
            hidden=torch.cat([work.hidden, state.aux_hidden], dim=1),
            positions=torch.cat([work.positions, state.aux_position], dim=1),
            rope=torch.cat([work.rope, state.aux_rope], dim=1),
            valid=torch.cat([member_kept, revived], dim=1),
            origin=torch.cat([work.origin, torch.full_like(slots, -1)], dim=1),
            aux=torch.cat([work.aux, slots], dim=1))
        per_row = candidates.valid.sum(-1)
        width = int(per_row.max())
        # the forward's own real tokens only, in order: plain causal attention where a layer held nothing
        state.ordered = not bool(revived.any()) and int(per_row.min()) == width
        # invalid entries first, then by position: the newest token is the last row
        key = torch.where(candidates.valid, candidates.positions, -1)
        order = torch.argsort(key, dim=-1, stable=True)[:, -width:]
        state.work = Work(
            hidden=candidates.hidden.gather(1, order[..., None].expand(-1, -1, output.shape[-1])),
            positions=candidates.positions.gather(1, order), rope=candidates.rope.gather(1, order),
            valid=candidates.valid.gather(1, order), origin=candidates.origin.gather(1, order),
            aux=candidates.aux.gather(1, order))

    @staticmethod
    def _stop(state: LazyState, work: Work, stopped: torch.Tensor, index: int) -> None:
        """Tokens of the working set that stop after layer `index`: revived ones update their auxiliary
        entry, the forward's own get new entries."""
        again = stopped & (work.aux >= 0)
        if bool(again.any()):
            rows, columns = again.nonzero(as_tuple=True)
            entries = work.aux[rows, columns]
            state.aux_hidden[rows, entries] = work.hidden[rows, columns]
            state.aux_layer[rows, entries] = index
        fresh = stopped & (work.aux < 0)
        counts = fresh.sum(-1)
        added = int(counts.max())
        if added == 0:
            return
        order = valid_first_order(fresh)[:, :added]  # the stopped ones first, in order
        used = torch.arange(added, device=fresh.device) < counts[:, None]
        hidden = work.hidden.gather(1, order[..., None].expand(-1, -1, work.hidden.shape[-1]))
        state.aux_hidden = torch.cat([state.aux_hidden, hidden], dim=1)
        state.aux_position = torch.cat([state.aux_position, torch.where(used, work.positions.gather(1, order), -1)], 1)
        state.aux_rope = torch.cat([state.aux_rope, work.rope.gather(1, order)], dim=1)
        state.aux_layer = torch.cat([state.aux_layer, torch.where(used, index, ABSENT)], dim=1)

    @staticmethod
    def _end_forward(state: LazyState) -> None:
        """Revived tokens that went through the top layer now have KV everywhere: free their entries, and
        drop entries free in every row."""
        done = state.aux_layer == IN_FLIGHT
        if bool(done.any()):
            state.aux_layer = torch.where(done, ABSENT, state.aux_layer)
            state.aux_position = torch.where(done, -1, state.aux_position)
        held = state.aux_layer != ABSENT
        width = int(held.sum(-1).max()) if held.numel() else 0
        if width < held.shape[1]:
            order = valid_first_order(held)[:, :width]
            state.aux_hidden = state.aux_hidden.gather(1, order[..., None].expand(-1, -1, state.aux_hidden.shape[-1]))
            for name in ("aux_position", "aux_rope", "aux_layer"):
                setattr(state, name, getattr(state, name).gather(1, order))
        state.work = None
        state.importance = None

    def skipped_share(self, cache) -> float:
        """Share of token-layer computations the forwards so far skipped against dense (revivals count as
        computations)."""
        state = cache.shared_state(self)
        return 0.0 if state is None or not state.dense else 1.0 - state.computed / state.dense


def _depth(module) -> tuple[int, tuple | None]:
    """The model's number of decoder layers and their types (None when the config does not list them)."""
    types = getattr(module.config, "layer_types", None)
    return module.config.num_hidden_layers, tuple(types) if types else None


def _rotary_for(attention_module):
    """The model's rotary embedding class, built from the attention module's config: revived tokens need
    the cos/sin of positions that are not in the forward."""
    namespace = vars(sys.modules[type(attention_module).__module__])
    classes = [value for name, value in namespace.items() if name.endswith("RotaryEmbedding") and isinstance(value, type)]
    if len(classes) != 1:
        raise NotImplementedError(f"LazyLLM: cannot find the rotary embedding of {type(attention_module).__name__}")
    return classes[0](config=attention_module.config)


_original_layer_call = None


def _decoder_layer_call(module, *args, **kwargs):
    """Every decoder layer of transformers' models (`GradientCheckpointingLayer`) is called through here
    once a LazyLLM exists: a cache whose policy runs decoder layers itself (`runs_decoder_layers`) gets
    the call, anything else goes to the module as usual. Decoder layers receive the cache as the
    `cache` keyword."""
    cache = kwargs.get("cache")
    policy = getattr(cache, "policy", None)  # any cache may come here, not only a PrunedCache
    if policy is not None and policy.runs_decoder_layers:
        return policy.run_decoder_layer(cache, module, _original_layer_call, args, kwargs)
    return _original_layer_call(module, *args, **kwargs)


def install_decoder_layer_hook() -> None:
    """Route decoder-layer calls through `_decoder_layer_call`. Idempotent; no model class is patched,
    only transformers' common base of decoder layers."""
    global _original_layer_call
    if _original_layer_call is None:
        _original_layer_call = GradientCheckpointingLayer.__call__
        GradientCheckpointingLayer.__call__ = _decoder_layer_call
