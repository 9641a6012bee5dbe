"""GlobalOrderSampler: torch's DistributedSampler order, resumable under another rank count."""

from __future__ import annotations

import pytest
from torch.utils.data import DistributedSampler

from dream_trainer.trainer import GlobalOrderSampler

DATA = list(range(23))


@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("drop_last", [True, False])
def test_same_shares_as_torchs_distributed_sampler(shuffle, drop_last):
    for replicas in (1, 2, 4):
        for rank in range(replicas):
            ours = GlobalOrderSampler(DATA, replicas, rank, shuffle, seed=5, drop_last=drop_last)
            theirs = DistributedSampler(
                DATA, replicas, rank, shuffle=shuffle, seed=5, drop_last=drop_last
            )
            for epoch in (0, 3):
                ours.set_epoch(epoch)
                theirs.set_epoch(epoch)
                assert list(ours) == list(theirs) and len(ours) == len(theirs)


def test_a_resumed_epoch_continues_the_global_order_under_another_rank_count():
    before = [GlobalOrderSampler(DATA, 4, r, seed=1) for r in range(4)]
    for s in before:
        s.set_epoch(2)
    consumed = [i for s in before for i in list(s)[:2]]  # 2 samples per rank: position 8
    after = [GlobalOrderSampler(DATA, 3, r, seed=1) for r in range(3)]
    for s in after:
        s.resume_at(2, 8)
    rest = [i for s in after for i in s]
    assert len(set(consumed) | set(rest)) == len(consumed) + len(rest)  # nothing twice
    order = GlobalOrderSampler(DATA, 1, 0, seed=1)
    order.set_epoch(2)
    assert sorted(consumed + rest) == sorted(order.order()[: len(consumed) + len(rest)])
    assert len(rest) == (len(DATA) - 8) // 3 * 3  # only the tail that does not split is left


def test_state_dict_records_the_global_position_and_restores_it():
    sampler = GlobalOrderSampler(DATA, 2, 1, seed=2)
    iterator = iter(sampler)
    taken = [next(iterator) for _ in range(3)]
    state = sampler.state_dict()
    assert state == {"epoch": 0, "position": 6}
    fresh = GlobalOrderSampler(DATA, 2, 1, seed=2)
    fresh.load_state_dict(state)
    assert taken + list(fresh) == list(GlobalOrderSampler(DATA, 2, 1, seed=2))


def test_a_full_pass_starts_the_next_epoch_and_set_epoch_keeps_a_resume_point():
    sampler = GlobalOrderSampler(DATA, 2, 0, seed=2)
    first, second = list(sampler), list(sampler)
    assert first != second and sampler.epoch == 2
    sampler.resume_at(5, 4)
    sampler.set_epoch(5)  # the trainer announces the epoch it resumes: the position stays
    assert sampler.start == 4
    sampler.set_epoch(6)
    assert sampler.start == 0
