"""Slot storage of one pruned layer: keys, values and what each slot holds.

`SlotStore` owns, per layer, keys and values `[B, Hkv, P, D]` (RoPE applied, slots in temporal
order) and, aligned with them, `valid [B, Hkv, P]` (False for padding and for surplus slots of rows
or heads that keep fewer tokens) and `positions [B, Hkv, P]` (index of the token among the row's
real tokens, -1 for padding); `real_seen [B]` counts each row's real tokens and `heads_off [B, Hkv]`
marks KV heads that store nothing any more (SpAtten's head pruning). With quantized storage the keys
and values live in a `QuantizedStore` (kvpress/quant.py) and, between forwards, `keys`/`values` are
shape-only `meta` placeholders.
"""

from __future__ import annotations

import torch

from kvpress.quant import KVQuant, QuantizedStore
from kvpress.triton_kernels.compaction import compact_slots


class SlotStore:
    """Keys, values and slot metadata of one pruned layer (see the module docstring)."""

    METADATA = ("valid", "positions", "real_seen")

    def __init__(self, key_states: torch.Tensor, value_states: torch.Tensor):
        batch, heads = key_states.shape[:2]
        device = key_states.device
        self.keys = key_states.new_empty(batch, heads, 0, key_states.shape[-1])
        self.values = value_states.new_empty(batch, heads, 0, value_states.shape[-1])
        self.valid = torch.ones(batch, heads, 0, dtype=torch.bool, device=device)
        self.positions = torch.zeros(batch, heads, 0, dtype=torch.long, device=device)
        self.real_seen = torch.zeros(batch, dtype=torch.long, device=device)
        self.heads_off: torch.Tensor | None = None
        self.quantized: QuantizedStore | None = None
        # host-side: some slot may be padding or a masked surplus slot, so the model's own mask
        # (which knows neither) cannot be used
        self.may_hold_invalid = False
        self._real_before = self.real_seen
        self._new_tokens = 0

    # ---- sizes ----
    @property
    def num_slots(self) -> int:
        return self.keys.shape[-2]

    @property
    def num_heads(self) -> int:
        return self.keys.shape[1]

    @property
    def batch(self) -> int:
        return self.keys.shape[0]

    # ---- writing ----
    def append(self, key_states: torch.Tensor, value_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add `q` new tokens, provisionally all real (`mark_new_tokens` corrects padding); return the
        keys and values attention reads this forward."""
        batch, heads, q = key_states.shape[:3]
        if self.quantized is not None:
            self.keys, self.values = self.quantized.append(key_states, value_states)
        else:
            self.keys = torch.cat([self.keys, key_states], dim=-2)
            self.values = torch.cat([self.values, value_states], dim=-2)
        new_valid = self.valid.new_ones(batch, heads, q)
        if self.heads_off is not None:
            new_valid &= ~self.heads_off[..., None]
        offsets = torch.arange(q, device=self.real_seen.device) if q > 1 else 0
        new_positions = (self.real_seen[:, None] + offsets)[:, None, :].expand(batch, heads, q)
        self.valid = torch.cat([self.valid, new_valid], dim=-1)
        self.positions = torch.cat([self.positions, new_positions], dim=-1)
        self._new_tokens = q
        self._real_before = self.real_seen
        self.real_seen = self.real_seen + q
        return self.keys, self.values

    def mark_new_tokens(self, new_valid: torch.Tensor) -> None:
        """Validity and real-token positions of the newest `q` slots from `new_valid [B, q]` (False for
        padding, read from the model's mask)."""
        q = self._new_tokens
        offsets = torch.cumsum(new_valid.long(), dim=-1) - 1  # [B, q]
        positions = torch.where(new_valid, self._real_before[:, None] + offsets, -1)
        self.valid[..., -q:] = new_valid[:, None, :]
        if self.heads_off is not None:
            self.valid[..., -q:] &= ~self.heads_off[..., None]
        self.positions[..., -q:] = positions[:, None, :]
        self.real_seen = self._real_before + new_valid.sum(-1)
        if not bool(new_valid.all()):
            self.may_hold_invalid = True

    def switch_off_heads(self, heads: torch.Tensor) -> None:
        """Stop storing and attending the KV heads where `heads [B, Hkv]` is True: their slots become
        invalid, later tokens are not stored in them, and their query heads output zeros."""
        self.heads_off = heads if self.heads_off is None else self.heads_off | heads
        self.valid = self.valid & ~self.heads_off[..., None]
        self.may_hold_invalid = True

    def gather(self, index: torch.Tensor, valid: torch.Tensor,
               scores: torch.Tensor | None = None) -> torch.Tensor | None:
        """Keep the slots `index [B, Hkv, K]` (sorted ascending), with validity `valid [B, Hkv, K]`.
        `scores [B, Hkv, P]`, the policy's running score, is gathered in the same launch and returned."""
        if self.quantized is not None:
            self.quantized.compact(index)
            self.keys, self.values = self.quantized.placeholders()
            self.positions = self.positions.gather(-1, index)
            kept_scores = scores.gather(-1, index) if scores is not None else None
        elif scores is not None:  # one Triton launch on CUDA, torch gathers elsewhere
            self.keys, self.values, self.positions, kept_scores, _ = compact_slots(
                self.keys, self.values, self.positions, scores, index)
        else:
            rows = index[..., None]
            self.keys = self.keys.gather(2, rows.expand(-1, -1, -1, self.keys.shape[-1]))
            self.values = self.values.gather(2, rows.expand(-1, -1, -1, self.values.shape[-1]))
            self.positions = self.positions.gather(-1, index)
            kept_scores = None
        self.valid = valid
        if not self.may_hold_invalid:
            self.may_hold_invalid = not bool(valid.all())
        return kept_scores

    def map_tensors(self, fn) -> None:
        """A batch operation or device move on every per-row tensor."""
        if self.quantized is not None:
            self.quantized.apply_batch(fn)
            self.keys, self.values = self.quantized.placeholders()
        else:
            self.keys, self.values = fn(self.keys), fn(self.values)
        for name in self.METADATA:
            setattr(self, name, fn(getattr(self, name)))
        self._real_before = self.real_seen
        if self.heads_off is not None:
            self.heads_off = fn(self.heads_off)

    # ---- quantized storage lifecycle ----
    def end_forward(self, quant: KVQuant | None) -> None:
        """After a forward's eviction: the first time `quant` is given, move the kept slots into quantized
        storage (scored first, then quantized); afterwards quantize residual slots whose group filled.
        Then release the dequantized tensors attention read (meta placeholders keep the shape)."""
        if self.quantized is None:
            if quant is None:
                return
            self.quantized = QuantizedStore(quant, self.keys, self.values)
        else:
            self.quantized.flush()
        self.keys, self.values = self.quantized.placeholders()

    @property
    def nbytes(self) -> int:
        held = sum(getattr(self, name).nbytes for name in self.METADATA)
        if self.heads_off is not None:
            held += self.heads_off.nbytes
        if self.quantized is not None:
            return held + self.quantized.nbytes
        return held + self.keys.nbytes + self.values.nbytes
