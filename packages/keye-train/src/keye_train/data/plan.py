"""The deterministic sample stream: ratio mixing of sources, then greedy packing to a token budget.

The whole run is one endless stream computed from the seed and the per-record token counts alone
(no media is touched), so every rank and every resumed run derives the same packs. Each source is
walked through a fresh permutation per cycle; sources are interleaved by a smooth weighted
round-robin, so a 1:1 ratio alternates and no source runs dry while another waits. An epoch is a
fixed number of packs, so an epoch boundary never drops or repeats a sample of the stream.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from fractions import Fraction

import torch

Item = tuple[int, int]  # (source index, record index within the source)


def _permutation(n: int, seed: int, source: int, cycle: int) -> list[int]:
    key = ((seed * 1_000_003 + source) * 1_000_003 + cycle) % (1 << 63)
    generator = torch.Generator().manual_seed(key)
    return torch.randperm(n, generator=generator).tolist()


def mixed_items(valid: Sequence[Sequence[int]], ratios: Sequence[float], seed: int) -> Iterator[Item]:
    """Endless (source, record) stream: each source cycles through fresh permutations of its valid
    records, and sources are drawn in proportion to ``ratios``."""
    if len(valid) != len(ratios):
        raise ValueError(f"got {len(valid)} sources but {len(ratios)} ratios")
    if any(r <= 0 for r in ratios):
        raise ValueError(f"every source ratio must be positive; got {list(ratios)}")
    for s, records in enumerate(valid):
        if not records:
            raise ValueError(f"source {s} has no usable record")
    # exact fractions: over any whole number of rounds each source gets exactly its share
    weights = [Fraction(r).limit_denominator(1 << 20) for r in ratios]
    shares = [w / sum(weights) for w in weights]
    credit = [Fraction(0)] * len(valid)
    cursor = [0] * len(valid)
    cycle = [0] * len(valid)
    orders = [_permutation(len(records), seed, s, 0) for s, records in enumerate(valid)]
    while True:
        for s, share in enumerate(shares):
            credit[s] += share
        s = max(range(len(valid)), key=lambda j: (credit[j], -j))
        credit[s] -= 1
        if cursor[s] == len(orders[s]):
            cycle[s] += 1
            cursor[s] = 0
            orders[s] = _permutation(len(valid[s]), seed, s, cycle[s])
        yield s, valid[s][orders[s][cursor[s]]]
        cursor[s] += 1


def packed(items: Iterator[Item], lengths: Sequence[Sequence[int]], budget: int) -> Iterator[list[Item]]:
    """Greedy in-order packing: a pack closes when the next sample would exceed ``budget`` tokens.

    Order is kept (no look-ahead bin packing) so the stream, and hence resumption, stays simple;
    every sample must already fit in ``budget``.
    """
    pack: list[Item] = []
    used = 0
    for s, i in items:
        n = lengths[s][i]
        if n > budget:
            raise ValueError(f"sample {i} of source {s} has {n} tokens, more than the budget {budget}")
        if pack and used + n > budget:
            yield pack
            pack, used = [], 0
        pack.append((s, i))
        used += n
    if pack:
        yield pack


def epoch_pack_count(
    lengths: Sequence[Sequence[int]],
    valid: Sequence[Sequence[int]],
    ratios: Sequence[float],
    budget: int,
    samples_per_epoch: int,
    seed: int,
) -> int:
    """How many packs the first ``samples_per_epoch`` samples of the stream fill: the epoch size."""
    items = mixed_items(valid, ratios, seed)
    first = [next(items) for _ in range(samples_per_epoch)]
    return sum(1 for _ in packed(iter(first), lengths, budget))


def default_samples_per_epoch(valid: Sequence[Sequence[int]], ratios: Sequence[float]) -> int:
    """One pass over the source that the ratios exhaust first (every other source is partly seen;
    the next epoch continues its permutation, so nothing is skipped over the run)."""
    total = float(sum(ratios))
    return max(1, int(min(len(records) * total / r for records, r in zip(valid, ratios))))
