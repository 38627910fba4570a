"""JSONL records, ratio mixing, packing and the resumable, rank-sharded batch sampler."""

from __future__ import annotations

import itertools
import json
from collections import Counter

import pytest

from keye_train.data import JsonlFile, PackedBatchSampler, RecordError, mixed_items, packed, parse_record


def test_records_are_validated_with_their_location(tmp_path):
    good = {"messages": [{"role": "user", "content": [{"type": "video", "video": "clips/a.mp4"}]},
                         {"role": "assistant", "content": "yes"}], "id": 7}  # fmt: skip
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(good) + "\n\n{not json\n" + json.dumps({"messages": []}) + "\n")
    f = JsonlFile(path)
    assert len(f) == 3  # blank lines are not records
    record = f.read(0)
    assert record.media_paths() == [str(tmp_path / "clips/a.mp4")]
    assert record.extra == {"id": 7}
    with pytest.raises(RecordError, match=r"d\.jsonl:3: not valid JSON"):
        f.read(1)
    with pytest.raises(RecordError, match=r"d\.jsonl:4: .*non-empty \"messages\""):
        f.read(2)
    bad_part = '{"messages": [{"role": "user", "content": [{"type": "audio"}]}]}'
    with pytest.raises(RecordError, match="type in"):
        parse_record(bad_part, "x:1", tmp_path)
    no_answer = '{"messages": [{"role": "user", "content": "hi"}]}'
    with pytest.raises(RecordError, match="no assistant message"):
        parse_record(no_answer, "x:1", tmp_path)


def test_one_to_one_mixing_alternates_and_cycles_fresh_permutations():
    valid = [list(range(3)), list(range(100, 110))]
    stream = list(itertools.islice(mixed_items(valid, [1, 1], seed=0), 40))
    assert [s for s, _ in stream] == [0, 1] * 20
    short = [i for s, i in stream if s == 0]
    for cycle in range(0, 18, 3):  # each cycle of the small source is a permutation of it
        assert sorted(short[cycle : cycle + 3]) == [0, 1, 2]
    long = [i for s, i in stream if s == 1]
    assert sorted(long[:10]) == list(range(100, 110)) and sorted(long[10:20]) == list(range(100, 110))
    assert long[:10] != long[10:20]  # a new cycle is a new permutation


def test_ratios_are_exact_over_whole_rounds_and_depend_on_the_seed():
    valid = [list(range(50)), list(range(50)), list(range(50))]
    stream = list(itertools.islice(mixed_items(valid, [0.5, 0.25, 0.25], seed=3), 400))
    assert Counter(s for s, _ in stream) == {0: 200, 1: 100, 2: 100}
    again = list(itertools.islice(mixed_items(valid, [0.5, 0.25, 0.25], seed=3), 400))
    other = list(itertools.islice(mixed_items(valid, [0.5, 0.25, 0.25], seed=4), 400))
    assert stream == again and stream != other
    with pytest.raises(ValueError, match="positive"):
        next(mixed_items(valid, [1, 0, 1], seed=0))


def test_packing_keeps_order_and_budget():
    lengths = [[5, 9, 3, 7, 1, 10]]
    items = [(0, i) for i in range(6)]
    packs = list(packed(iter(items), lengths, budget=10))
    assert [i for p in packs for i in p] == items
    assert all(sum(lengths[0][i] for _, i in p) <= 10 for p in packs)
    assert packs == [[(0, 0)], [(0, 1)], [(0, 2), (0, 3)], [(0, 4)], [(0, 5)]]
    with pytest.raises(ValueError, match="more than the budget"):
        list(packed(iter([(0, 5)]), lengths, budget=9))


def _sampler(**kw):
    lengths = [[(i * 7) % 13 + 2 for i in range(40)], [(i * 5) % 11 + 20 for i in range(15)]]
    valid = [list(range(40)), [i for i in range(15) if i != 4]]
    options = dict(token_budget=48, samples_per_epoch=60, seed=1)
    options.update(kw)
    return PackedBatchSampler(lengths, valid, [2, 1], **options)


def test_ranks_together_see_what_one_process_sees():
    single = _sampler(packs_per_batch=4)
    ranks = [_sampler(packs_per_batch=2, rank=r, world_size=2) for r in range(2)]
    for epoch in (0, 1):
        for s in (single, *ranks):
            s.set_epoch(epoch)
        assert len(single) == len(ranks[0]) == len(ranks[1]) > 0
        for whole, a, b in zip(single, *ranks):
            assert whole == a + b
        assert all(4 not in [i for s, i in batch if s == 1] for batch in single)  # excluded record


def test_epochs_continue_the_stream_and_resume_exactly():
    s = _sampler()
    epochs = []
    for epoch in range(3):
        s.set_epoch(epoch)
        epochs.append(list(s))
    stream = [b for e in epochs for b in e]
    assert len(stream) == 3 * len(s) and len({tuple(b) for b in stream}) > len(s)
    # a "killed" run: consumed 3 batches of epoch 1, then a new process restores the state
    state = s.state_dict(consumed=3) | {"epoch": 1}
    fresh = _sampler()
    fresh.load_state_dict(state)
    fresh.set_epoch(1)
    assert list(fresh) == epochs[1][3:]
    fresh.set_epoch(2)  # the resume offset applies to its own epoch only
    assert list(fresh) == epochs[2]
    with pytest.raises(ValueError, match="seed"):
        _sampler(seed=2).load_state_dict(state)


def test_too_little_data_for_a_global_batch_is_a_clear_error():
    with pytest.raises(ValueError, match="fewer than one global batch"):
        _sampler(samples_per_epoch=2, packs_per_batch=8, world_size=4)


def test_evaluation_pads_by_wrapping_so_every_rank_gets_a_batch():
    ranks = [_sampler(samples_per_epoch=4, world_size=4, rank=r, drop_last=False) for r in range(4)]
    assert ranks[0].epoch_packs == 2 and all(len(r) == 1 for r in ranks)
    seen = [list(r) for r in ranks]
    assert seen[0] == seen[2] and seen[1] == seen[3] and seen[0] != seen[1]  # wrapped around
