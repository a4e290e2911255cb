"""KV caches for generation (`rollout.hf`).

`ReservedCache` writes each step into room reserved up front instead of concatenating: a growing cache copies
itself every step, O(T²) over a completion (a fifth of `generate`'s time on the tiny model). `prefilled_cache` runs
each distinct prompt once and repeats its cache for the prompt's n samples. Both rely on DynamicLayer's
update / keys / values protocol and on `generate` continuing from a caller's filled cache (`align.model.fastpaths`
checks that: the `prefill_cache` path).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from .compat import CACHE_KW


class ReservedLayer(DynamicLayer):
    """A DynamicLayer that writes new tokens into room reserved for `room` more of them instead of concatenating
    (a concatenating cache copies itself at every step). `keys` / `values` stay views of the first T positions, so
    everything else DynamicLayer does (repeat, select, crop) works unchanged; a layer whose tensors were replaced
    (repeat / select) gets new room at its next update."""

    def __init__(self, room: int):
        super().__init__()
        self.room = room
        self._buffers: tuple[torch.Tensor, torch.Tensor] | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        T, t = self.get_seq_length(), key_states.shape[-2]
        buf = self._buffers
        if (buf is None or buf[0].shape[-2] < T + t or buf[0].shape[:-2] != key_states.shape[:-2]
                or (T and self.keys.data_ptr() != buf[0].data_ptr())):
            new = []
            for old, x in ((self.keys, key_states), (self.values, value_states)):
                b = x.new_empty((*x.shape[:-2], T + t + self.room, x.shape[-1]))       # [B, H, T + room, D]
                if T:
                    b[..., :T, :] = old
                new.append(b)
            buf = self._buffers = tuple(new)
        buf[0][..., T:T + t, :] = key_states
        buf[1][..., T:T + t, :] = value_states
        self.keys, self.values = buf[0][..., :T + t, :], buf[1][..., :T + t, :]
        return self.keys, self.values


class ReservedCache(DynamicCache):
    """A DynamicCache of `ReservedLayer`s, each with room for `room` tokens beyond what it first holds."""

    def __init__(self, room: int):
        Cache.__init__(self, layer_class_to_replicate=lambda: ReservedLayer(room))


def prefilled_cache(model, ids: torch.Tensor, mask: torch.Tensor, n: int, room: int) -> ReservedCache | None:
    """The KV cache of each distinct prompt of `ids` [b*n, P] (rows in groups of n) but its last token, computed
    once and repeated for its n samples (generate then starts from the last prompt token); None where that does not
    apply. No version check here: the engine asks `fastpaths.active("prefill_cache")` first."""
    p_ids, p_mask = ids[::n, :-1], mask[::n, :-1]                                       # [b, P-1]
    if n < 2 or ids.shape[0] % n or ids.shape[1] < 2 or (p_mask.sum(1) == 0).any():
        return None
    positions = (p_mask.long().cumsum(-1) - 1).masked_fill(p_mask == 0, 1)              # as generate numbers them
    cache = ReservedCache(room)
    model(input_ids=p_ids, attention_mask=p_mask, position_ids=positions, use_cache=True, logits_to_keep=1,
          **{CACHE_KW: cache})
    cache.batch_repeat_interleave(n)                                                     # [b*n, ...] per layer
    return cache
