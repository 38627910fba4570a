"""A batch sampler over the packed stream that resumes exactly and shards across data-parallel ranks.

Epoch ``e`` is packs ``[e * P, (e + 1) * P)`` of the stream, ``P = batches * packs_per_batch * world``.
Global batch ``b`` takes ``packs_per_batch * world`` consecutive packs and rank ``r`` the ``r``-th run
of ``packs_per_batch`` of them, so one process with ``packs_per_batch = k * world`` sees exactly the
union of what ``world`` processes with ``k`` see: the basis of the DDP-equals-single-process test.
Its state is (epoch, batches consumed), restored before the epoch's iterator is built.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence

from keye_train.data.plan import Item, epoch_pack_count, mixed_items, packed


class PackedBatchSampler:
    """Yields, per step, the (source, record) items of this rank's packs."""

    def __init__(
        self,
        lengths: Sequence[Sequence[int]],
        valid: Sequence[Sequence[int]],
        ratios: Sequence[float],
        *,
        token_budget: int,
        samples_per_epoch: int,
        packs_per_batch: int = 1,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        follow_epochs: bool = True,
        drop_last: bool = True,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside a world of {world_size}")
        if packs_per_batch < 1:
            raise ValueError(f"packs_per_batch must be >= 1; got {packs_per_batch}")
        self.lengths, self.valid, self.ratios = lengths, valid, list(ratios)
        self.token_budget = token_budget
        self.packs_per_batch, self.rank, self.world_size, self.seed = packs_per_batch, rank, world_size, seed
        packs = epoch_pack_count(lengths, valid, ratios, token_budget, samples_per_epoch, seed)
        group = packs_per_batch * world_size
        # training drops the epoch's last partial global batch (the stream goes on); evaluation instead
        # wraps around to its first packs, as DistributedSampler pads, so every rank gets a batch
        self.epoch_packs = packs
        self.batches_per_epoch = packs // group if drop_last else -(-packs // group)
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"an epoch fills only {packs} packs of {token_budget} tokens, fewer than one global batch "
                f"({packs_per_batch} packs x {world_size} ranks): lower token_budget or add data"
            )
        self.follow_epochs = follow_epochs  # False: always epoch 0 (validation sees one fixed order)
        self.epoch = 0
        self._resume: tuple[int, int] | None = None  # (epoch, batches already consumed in it)

    def set_epoch(self, epoch: int) -> None:
        if self.follow_epochs:
            self.epoch = epoch

    def __len__(self) -> int:
        return self.batches_per_epoch

    def packs_of_epoch(self, epoch: int) -> Iterator[list[Item]]:
        per_epoch = self.batches_per_epoch * self.packs_per_batch * self.world_size
        stream = packed(mixed_items(self.valid, self.ratios, self.seed), self.lengths, self.token_budget)
        if per_epoch > self.epoch_packs:  # evaluation, padded by wrapping around
            first = list(itertools.islice(stream, self.epoch_packs))
            return itertools.islice(itertools.cycle(first), per_epoch)
        return itertools.islice(stream, epoch * per_epoch, (epoch + 1) * per_epoch)

    def __iter__(self) -> Iterator[list[Item]]:
        start = 0
        if self._resume is not None and self._resume[0] == self.epoch:
            start = self._resume[1]
        self._resume = None
        group = self.packs_per_batch * self.world_size
        first = self.rank * self.packs_per_batch
        packs = list(self.packs_of_epoch(self.epoch))
        for b in range(start, self.batches_per_epoch):
            mine = packs[b * group + first : b * group + first + self.packs_per_batch]
            yield [item for pack in mine for item in pack]

    def state_dict(self, consumed: int) -> dict[str, int]:
        return {"epoch": self.epoch, "consumed": consumed, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state.get("seed", self.seed) != self.seed:
            raise ValueError(f"checkpoint was sampled with seed {state['seed']}, this run uses {self.seed}")
        self._resume = (int(state["epoch"]), int(state["consumed"]))
