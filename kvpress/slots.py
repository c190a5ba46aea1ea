"""Slot storage of one pruned layer: keys, values and what each slot holds.

`SlotStore` owns, per layer, keys and values `[B, Hkv, P, D]` (RoPE applied, slots in temporal
order) and, aligned with them, `valid [B, Hkv, P]` (False for padding, for slots dropped while
decoding and for surplus slots of rows or heads that keep fewer tokens) and `positions [B, Hkv, P]`
(index of the token among the row's real tokens, -1 for padding); `real_seen [B]` counts each row's
real tokens and `heads_off [B, Hkv]` marks KV heads that store nothing any more (SpAtten's head
pruning).

Validity and positions live in `SlotMetadata`; keys and values in one storage backend
(kvpress/storage.py), which `SlotStore` chooses and switches, never the policy or the layer:

* dense (`DenseStorage`, kvpress/dense.py) from the first token: buffers with capacity, new tokens
  written in place, dropped slots left as holes until a squeeze;
* per head (`PerHeadStorage`, kvpress/ragged.py) from the first compaction given a `HeadRoom` plan
  (the policy's `per_head_storage`: the KV heads keep different numbers of slots), laid out again at
  every compaction after; one without a plan goes back to dense storage;
* quantized (`QuantizedStorage`, kvpress/quantized.py) from the end of the first forward given a
  `KVQuant` (`end_forward`), for good.

The methods a forward calls (`keys`, `values`, `append`, `drop`, `end_forward`) delegate to the
backend without asking which one it is.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvpress.dense import DenseStorage
from kvpress.quant_config import KVQuant
from kvpress.quantized import QuantizedStorage
from kvpress.ragged import HeadRoom, PerHeadStorage, RaggedStore
from kvpress.storage import KVStorage, SlotMetadata, grow


@dataclass(frozen=True)
class TokenLayout:
    """What the `q` tokens of the next write are, when a policy feeds a layer something other than the
    forward's tokens in order (LazyLLM: a subset of them, and older tokens revived from hidden states):
    `positions [B, q]` each token's index among its row's real tokens (-1 for padding), `valid [B, q]`,
    `real_new [B]` how many of them the row has never seen (its real-token count grows by that),
    `seen_new` the tokens the forward gave (the layer's logical length grows by that), and `ordered`
    (host-side) whether they are all real and in position order, so that a layer that held nothing
    before attends them with plain causal attention."""

    positions: torch.Tensor
    valid: torch.Tensor
    real_new: torch.Tensor
    seen_new: int
    ordered: bool = False


class SlotStore:
    """Slot metadata and the key/value storage backend of one pruned layer (see the module docstring)."""

    def __init__(self, key_states: torch.Tensor, value_states: torch.Tensor):
        batch, heads = key_states.shape[:2]
        device = key_states.device
        self.storage: KVStorage = DenseStorage.empty(key_states, value_states)
        self.meta = SlotMetadata(torch.ones(batch, heads, 0, dtype=torch.bool, device=device),
                                 torch.zeros(batch, heads, 0, dtype=torch.long, device=device))
        self.used = 0  # slots in use, a host-side count
        self.real_seen = torch.zeros(batch, dtype=torch.long, device=device)
        self.heads_off: torch.Tensor | None = None
        self.live_heads = heads  # host-side: KV heads not switched off in some row
        # host-side: the model's own mask describes the slots (no eviction yet, no hole)
        self.exact_prefix = True
        self.has_padding = False
        self._real_before = self.real_seen
        self._new_tokens = 0

    # ---- views ----
    keys = property(lambda self: self.storage.read_keys(self.used))
    values = property(lambda self: self.storage.read_values(self.used))
    valid = property(lambda self: self._used_view("valid"))
    positions = property(lambda self: self._used_view("positions"))
    capacity = property(lambda self: self.meta.capacity)
    num_slots = property(lambda self: self.used)
    head_dim = property(lambda self: self.storage.head_dim)
    itemsize = property(lambda self: self.storage.itemsize, doc="Bytes per element of the model's keys and values.")
    num_heads = property(lambda self: self.meta.valid.shape[1])
    batch = property(lambda self: self.meta.valid.shape[0])
    ragged = property(lambda self: self.storage.per_head, doc="The per-head layout (`RaggedStore`), or None.")
    quantized = property(lambda self: self.storage.quantized, doc="The KIVI store (`QuantizedStore`), or None.")

    def _used_view(self, name: str) -> torch.Tensor:
        """The first `used` slots of metadata buffer `name`, one view per buffer and width: a forward
        reads validity and positions several times, one slicing op serves them all. The layer releases
        them at the end of each forward (`release_views`): no replaced buffer outlives it."""
        buffer, views = getattr(self.meta, name), self.__dict__.setdefault("_views", {})
        cached = views.get(name)
        if cached is None or cached[0] is not buffer or cached[1] != self.used:
            cached = views[name] = (buffer, self.used, buffer[:, :, :self.used])
        return cached[2]

    @property
    def invalid(self) -> torch.Tensor:
        """`[B, Hkv, P]` bool, `~valid`: computed once while validity stays as it is (attention masks
        with it, eviction ranks with it); every in-place change of validity here drops it."""
        views = self.__dict__.setdefault("_views", {})
        valid = self.valid
        cached = views.get("invalid")
        if cached is None or cached[0] is not valid:
            cached = views["invalid"] = (valid, valid.logical_not())
        return cached[1]

    def _validity_changed(self) -> None:
        self.__dict__.get("_views", {}).pop("invalid", None)

    def release_views(self) -> None:
        self.__dict__.pop("_views", None)

    def __getstate__(self):  # copies (deepcopy, pickle) slice their own views again
        return {key: value for key, value in self.__dict__.items() if key != "_views"}

    # ---- writing ----
    def reserve(self, capacity: int) -> None:
        """Make room for `capacity` slots (keys, values and metadata)."""
        self.storage.reserve(self.meta, self.used, capacity)

    def append(self, key_states: torch.Tensor, value_states: torch.Tensor,
               layout: TokenLayout | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Write `q` new tokens after the used slots, provisionally all real (`mark_new_tokens` corrects
        padding), or as `layout` describes them; return the keys and values attention reads this forward."""
        q = key_states.shape[2]
        start = self.used
        self._validity_changed()
        self._new_tokens = q
        self._real_before = self.real_seen
        self.real_seen = self.real_seen + q
        attended = self.storage.write(self.meta, start, key_states, value_states)
        self.used = start + q
        if q == 1 and layout is None:  # a decoding step: the prepared tail holds the slot's metadata
            if not self.meta.tail_ready:
                self._prepare_tail(start)
            if self.heads_off is not None:
                self.meta.valid[:, :, start:start + 1] &= ~self.heads_off[..., None]
            return attended
        self.meta.tail_ready = False
        new_valid = self.meta.valid[:, :, start:start + q]
        new_valid.fill_(True)
        if self.heads_off is not None:
            new_valid &= ~self.heads_off[..., None]
        if layout is not None:
            new_valid &= layout.valid[:, None, :]
            self.meta.positions[:, :, start:start + q] = layout.positions[:, None, :]
            self.real_seen = self._real_before + layout.real_new
            self.exact_prefix = False  # slots no longer follow the model's mask columns
        else:
            offsets = torch.arange(q, device=self.real_seen.device) if q > 1 else 0
            self.meta.positions[:, :, start:start + q] = (self._real_before[:, None] + offsets)[:, None, :]
        return attended

    def _prepare_tail(self, start: int) -> None:
        """Slots `start..capacity` as one-token writes will leave them: valid, and each row's next
        positions (every decoding step adds one real token to every row), so the steps until the
        metadata changes otherwise (`SlotMetadata.tail_ready`) write none."""
        meta = self.meta
        width = meta.capacity - start
        meta.valid[:, :, start:].fill_(True)
        before = self._real_before.view(-1, 1, 1)  # [B, 1, 1]
        if width > 1:
            before = before + torch.arange(width, device=before.device)
        meta.positions[:, :, start:].copy_(before)
        meta.tail_ready = True

    def readable(self):
        """A context in which a policy may read `keys` and `values` outside a forward (quantized
        storage dequantizes on read, as during a forward)."""
        return self.storage.readable()

    @property
    def real_seen_before(self) -> torch.Tensor:
        """`[B]` real tokens each row held before the forward in progress."""
        return self._real_before

    def mark_new_tokens(self, new_valid: torch.Tensor) -> None:
        """Validity and real-token positions of the newest `q` slots from `new_valid [B, q]` (False for
        padding, read from the model's mask). A host sync: called at prefill only."""
        q = self._new_tokens
        self._validity_changed()
        self.meta.tail_ready = False
        offsets = torch.cumsum(new_valid.long(), dim=-1) - 1  # [B, q]
        positions = torch.where(new_valid, self._real_before[:, None] + offsets, -1)
        self.valid[..., -q:] = new_valid[:, None, :]
        if self.heads_off is not None:
            self.valid[..., -q:] &= ~self.heads_off[..., None]
        self.positions[..., -q:] = positions[:, None, :]
        self.real_seen = self._real_before + new_valid.sum(-1)
        if not bool(new_valid.all()):
            self.has_padding = True

    def switch_off_heads(self, heads: torch.Tensor) -> None:
        """Stop storing and attending the KV heads where `heads [B, Hkv]` is True: their slots become
        invalid, later tokens are not stored in them, and their query heads output zeros."""
        self.heads_off = heads if self.heads_off is None else self.heads_off | heads
        self._validity_changed()
        self.valid.logical_and_(~self.heads_off[..., None])
        self.exact_prefix = False
        self.live_heads = int((~self.heads_off).sum(-1).max())  # a host sync, once per layer (prefill)
        self.storage.switch_off(heads)

    def drop(self, keep: torch.Tensor) -> None:
        """Keep only the slots where `keep [B, Hkv, P]`; the others become holes. No data moves and no
        host sync: this is the decoding step's eviction."""
        self.valid.logical_and_(keep)
        self._validity_changed()
        self.exact_prefix = False

    def drop_one(self, victim: torch.Tensor, stays: torch.Tensor) -> None:
        """Drop the slot `victim [B, Hkv, 1]` of every (row, head) where `stays [B, Hkv, 1]` is False;
        `victim` must be a valid slot (a head that is not over writes True where True was). One
        `scatter_`, no host sync: the decoding step's eviction when one slot per head is over."""
        self.valid.scatter_(-1, victim, stays)
        self._validity_changed()
        self.exact_prefix = False

    def gather(self, index: torch.Tensor, valid: torch.Tensor, scores: torch.Tensor | None = None,
               capacity: int | None = None, per_head: HeadRoom | None = None,
               quantized: int | None = None) -> torch.Tensor | None:
        """Keep the slots `index [B, Hkv, K]` (sorted ascending), with validity `valid [B, Hkv, K]`, at the
        front of the buffers; with `capacity`, in new buffers of that many slots (a prefill that kept a
        small part of a long prompt releases the rest). With `per_head`, lay keys and values out per
        head instead (`RaggedStore`; `index` then has each head's valid slots first). With quantized
        storage the first `quantized` entries of every head are quantized slots and the rest residual
        ones (`QuantizedStore.keep`). `scores [B, Hkv, P]`, the policy's running score, is gathered in
        the same launch and returned."""
        positions = self.positions
        self._validity_changed()
        if self.storage.quantized is None and (per_head is not None or self.storage.per_head is not None):
            kept_scores = self._lay_out(index, valid, positions, scores, capacity, per_head)
        else:  # dense or quantized storage keeps its own layout
            kept_scores = self.storage.compact(self.meta, positions, index, valid, scores, capacity, quantized)
        self.used = index.shape[-1]
        self.exact_prefix = False
        return kept_scores

    def _lay_out(self, index, valid, positions, scores, capacity, per_head) -> torch.Tensor | None:
        """A re-layout: per head with a `per_head` plan (the first such compaction switches dense storage
        to per-head storage), else back to one dense layout for every head."""
        width = index.shape[-1]
        keys, values = self.storage.take(index, self.used)
        positions = positions.gather(-1, index)
        kept_scores = scores.gather(-1, index) if scores is not None else None
        if per_head is not None:
            live = ~self.heads_off if self.heads_off is not None else torch.ones_like(valid[..., 0])
            self.storage = PerHeadStorage(RaggedStore.build(keys, values, valid, live, per_head))
            capacity = self.storage.ragged.capacity
        else:
            capacity = max(capacity or width, width)
            self.storage = DenseStorage(*(grow(kept, width, capacity) if width else kept for kept in (keys, values)))
        capacity = max(capacity, width)
        positions, valid = (grow(kept, width, capacity) if width else kept for kept in (positions, valid))
        self.meta = SlotMetadata(valid, positions)
        return kept_scores

    def map_tensors(self, fn) -> None:
        """A batch operation or device move on every per-row tensor."""
        self.__dict__.pop("_views", None)
        self.storage.map_tensors(fn)
        self.meta.map_tensors(fn)
        self.real_seen = fn(self.real_seen)
        self._real_before = self.real_seen
        if self.heads_off is not None:
            self.heads_off = fn(self.heads_off)

    # ---- end of a forward ----
    def end_forward(self, quant: KVQuant | None) -> None:
        """After a forward's eviction: the first time `quant` is given, move the kept slots into quantized
        storage (scored first, then quantized); otherwise the backend ends its forward (quantized
        storage quantizes residual slots whose group filled and releases the dequantized tensors
        attention read, per-head storage its view)."""
        self._real_before = self.real_seen
        if quant is not None and self.storage.quantized is None:
            self.storage = QuantizedStorage(quant, self.keys.contiguous(), self.values.contiguous(), self.valid)
            self.meta = SlotMetadata(self.valid.clone(), self.positions.clone())
        else:
            self.storage.end_forward(self.meta, self.used)

    @property
    def kv_nbytes(self) -> int:
        """Bytes allocated for keys and values: whole buffers (capacity included), per-head storage (with its
        room and layout), or the quantized store."""
        return self.storage.nbytes

    @property
    def nbytes(self) -> int:
        """Bytes allocated: keys and values (`kv_nbytes`) plus slot metadata."""
        held = self.meta.nbytes + self.real_seen.nbytes
        if self.heads_off is not None:
            held += self.heads_off.nbytes
        return held + self.kv_nbytes
