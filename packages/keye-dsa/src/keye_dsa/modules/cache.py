"""Decode cache for ``DSAttention``: per layer, the K and V the decoder attends to and the indexer's keys."""

from __future__ import annotations

import torch


def append_rows(state: dict, name: str, x: torch.Tensor, capacity: int = 0) -> torch.Tensor:
    """``state[name]`` followed by ``x`` along dim 1 (rows), written into ``state[name + "_buffer"]``.

    The buffer holds ``capacity`` rows, and past them grows by an eighth, so a decode step copies only
    its own rows: a concatenation copies the whole cache every token (at 128K, more bytes than DSA's
    decode step reads). ``state[name]`` becomes a view of the filled rows, and that view is returned
    when grad mode is off (decoding); with it on, the concatenation is returned instead, so that the
    gradient reaches ``x`` and tensors saved for backward are never modified by a later append.
    """
    prev = state.get(name)
    n = 0 if prev is None else prev.shape[1]
    if prev is not None and (prev.shape[0] != x.shape[0] or prev.shape[2:] != x.shape[2:]):
        raise ValueError(
            f"cannot append {name} of shape {tuple(x.shape)} to the cached {tuple(prev.shape)}: batch and "
            "trailing dims must match (start a new cache for a new batch)"
        )
    end = n + x.shape[1]
    buf = state.get(name + "_buffer")
    stale = prev is None or buf is None or prev.data_ptr() != buf.data_ptr()  # set elsewhere: not our buffer
    if stale or buf.shape[1] < end or buf.dtype != x.dtype:
        rows = capacity if end <= capacity else n + max(x.shape[1], 256, n // 8)
        buf = x.new_empty(x.shape[0], rows, *x.shape[2:])
        if n:
            buf[:, :n] = prev
        state[name + "_buffer"] = buf
    buf[:, n:end] = x.detach()
    state[name] = buf[:, :end]
    if torch.is_grad_enabled():  # autograd may save what we return: never a buffer later writes bump
        return x if prev is None else torch.cat([prev, x], 1)
    return state[name]


class DSACache:
    """Grows by appending each forward's keys; chunked prefill is a sequence of forwards on one cache.

    ``index_dtype=torch.float8_e4m3fn`` keeps the indexer's keys in FP8 with one fp32 scale per key: a
    decode step then streams half the bytes through the indexer. An inference option: the indexer scores
    the quantized keys (the index sets can differ from bf16 keys' near the threshold), and its KL loss,
    if computed with this cache, gets no gradient into the index keys.
    """

    def __init__(self, index_dtype: torch.dtype | None = None, capacity: int = 0) -> None:
        if index_dtype not in (None, torch.float8_e4m3fn):
            raise ValueError(f"index_dtype must be None or torch.float8_e4m3fn; got {index_dtype}")
        if capacity < 0:
            raise ValueError(f"capacity must be >= 0 tokens; got {capacity}")
        self.index_dtype = index_dtype
        self.capacity = capacity  # tokens to reserve up front (prompt + new tokens: no regrowth)
        self.layers: dict[int, dict] = {}

    def layer(self, layer_idx: int) -> dict:
        """The mutable state of one layer: ``"k"``, ``"v"`` ``[B,S,Hkv,D]``, ``"k_index"`` ``[B,S,DI]``
        (with FP8, ``"k_index_scale"`` ``[B,S]`` too), views of their growing buffers, the
        ``"index_dtype"`` it keeps them in and the ``"capacity"`` it reserves."""
        return self.layers.setdefault(layer_idx, {"index_dtype": self.index_dtype, "capacity": self.capacity})

    def append_kv(
        self, layer_idx: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        state = self.layer(layer_idx)
        return append_rows(state, "k", k, self.capacity), append_rows(state, "v", v, self.capacity)

    def seq_len(self, layer_idx: int = 0) -> int:
        state = self.layers.get(layer_idx, {})
        return state["k"].shape[1] if "k" in state else 0

    def next_positions(self, layer_idx: int, batch: int, t: int, device: torch.device) -> torch.Tensor:
        """Positions ``[B,T]`` of the next ``t`` tokens: continuing the cache."""
        past = self.seq_len(layer_idx)
        return torch.arange(past, past + t, device=device).expand(batch, t)


class StaticDSACache:
    """A decode cache of fixed shapes whose filled length lives on the device, for CUDA graphs.

    ``DSACache`` returns views that grow by a row each token, and reads lengths on the host: a captured
    step could not replay the next. Here every layer's K, V and index keys sit in buffers of ``capacity``
    rows from the first forward on, a decode step writes its rows at the device-side length and attends
    over the whole buffers (the selection reads the lengths on the device and never picks a row past
    them), so one decode step, or a whole decoder's, is captured once and replayed for every token.
    All rows share one length; left padding is ``key_start [batch]``, each row's first real key.

    Inference only (run under ``torch.no_grad()``). A forward of more than ``DECODE_ROWS`` tokens (a
    prefill chunk) reads the length on the host and runs as with ``DSACache``; it cannot be captured.
    Writing past ``capacity`` fails on the device (``torch._assert_async``: a device-side assert on
    CUDA), since a replayed graph has no host to check it.
    """

    static = True

    def __init__(
        self,
        batch: int,
        capacity: int,
        *,
        index_dtype: torch.dtype | None = None,
        key_start: torch.Tensor | None = None,
    ) -> None:
        if batch < 1 or capacity < 1:
            raise ValueError(f"batch and capacity must be >= 1; got batch={batch}, capacity={capacity}")
        if index_dtype not in (None, torch.float8_e4m3fn):
            raise ValueError(f"index_dtype must be None or torch.float8_e4m3fn; got {index_dtype}")
        if key_start is not None and tuple(key_start.shape) != (batch,):
            raise ValueError(f"key_start must have shape ({batch},); got {tuple(key_start.shape)}")
        self.batch, self.capacity, self.index_dtype = batch, capacity, index_dtype
        self.key_start = None if key_start is None else key_start.to(torch.int32)
        self.layers: dict[int, dict] = {}

    def layer(self, layer_idx: int) -> dict:
        """The state of one layer: the full ``"k"``, ``"v"`` ``[B,capacity,Hkv,D]``, ``"k_index"``
        ``[B,capacity,DI]`` (FP8: and ``"k_index_scale"``), ``"length"`` (int64 ``[1]``, on the device),
        ``"lengths"`` (int32 ``[B]``, the same), ``"positions"`` (the rows the last forward wrote),
        ``"key_start"`` (on the device, or None)."""
        return self.layers.setdefault(
            layer_idx, {"index_dtype": self.index_dtype, "capacity": self.capacity, "static": True}
        )

    def next_positions(self, layer_idx: int, batch: int, t: int, device: torch.device) -> torch.Tensor:
        """Positions ``[B,T]`` of the next ``t`` tokens, computed on the device."""
        return (self._length(layer_idx, device) + torch.arange(t, device=device)).expand(batch, t)

    def append_kv(
        self, layer_idx: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Writes this forward's K and V at the layer's length, advances it; returns the full buffers."""
        if torch.is_grad_enabled() and (k.requires_grad or v.requires_grad):
            raise RuntimeError(
                "StaticDSACache is an inference cache (its buffers keep no autograd graph): run the "
                "forward under torch.no_grad() or torch.inference_mode(), or use DSACache to train"
            )
        if k.shape[0] != self.batch:
            raise ValueError(f"k has batch {k.shape[0]} but the StaticDSACache was made for {self.batch}")
        state = self.layer(layer_idx)
        length = self._length(layer_idx, k.device)
        t = k.shape[1]
        torch._assert_async(
            length[0] + t <= self.capacity,
            f"StaticDSACache: writing {t} token(s) past its capacity of {self.capacity}",
        )
        state["positions"] = length + torch.arange(t, device=k.device)
        length += t
        state["lengths"].copy_(length.expand(self.batch))
        return write_rows(state, "k", k, self.capacity), write_rows(state, "v", v, self.capacity)

    def seq_len(self, layer_idx: int = 0) -> int:
        """Tokens the layer holds (a host read of the device length: not while capturing)."""
        state = self.layers.get(layer_idx, {})
        return int(state["length"]) if "length" in state else 0

    def reset(self) -> None:
        """Empties every layer in place (same buffers and length tensors: captured graphs stay valid)."""
        for state in self.layers.values():
            state["length"].zero_()
            state["lengths"].zero_()

    def _length(self, layer_idx: int, device: torch.device) -> torch.Tensor:
        state = self.layer(layer_idx)
        if "length" not in state:
            state["length"] = torch.zeros(1, dtype=torch.int64, device=device)
            state["lengths"] = torch.zeros(self.batch, dtype=torch.int32, device=device)
            # on the cache's device from the first write: a captured step copies nothing
            state["key_start"] = None if self.key_start is None else self.key_start.to(device)
        return state["length"]


def write_rows(state: dict, name: str, x: torch.Tensor, capacity: int) -> torch.Tensor:
    """Writes ``x [B,T,...]`` into ``state[name]`` (allocated with ``capacity`` rows on first use) at the
    rows ``state["positions"]``; returns the whole buffer. The static twin of ``append_rows``."""
    buf = state.get(name)
    if buf is None:
        buf = state[name] = x.new_zeros(x.shape[0], capacity, *x.shape[2:])
    elif buf.shape[0] != x.shape[0] or buf.shape[2:] != x.shape[2:] or buf.dtype != x.dtype:
        raise ValueError(
            f"cannot write {name} of shape {tuple(x.shape)} and dtype {x.dtype} into the cached "
            f"{tuple(buf.shape)} {buf.dtype}: batch, trailing dims and dtype must match"
        )
    if x.dtype == torch.float8_e4m3fn:  # index_copy_ has no FP8 kernels: copy the bytes
        buf.view(torch.uint8).index_copy_(1, state["positions"], x.view(torch.uint8))
    else:
        buf.index_copy_(1, state["positions"], x)
    return buf
