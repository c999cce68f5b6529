import pytest

from safedpo_ray.train.sampler import PairSampler, rank_batches


def all_indices(n, world, micro, global_bs, step):
    out = []
    for rank in range(world):
        s = PairSampler(n, global_batch_size=global_bs, micro_batch_size=micro,
                        world_size=world, rank=rank, seed=3)
        for m in range(s.accumulation_steps):
            out += s.indices(step, m)
    return out


def test_every_pair_once_per_epoch_across_ranks_and_accumulation():
    n, world, micro, global_bs = 50, 2, 3, 12
    s = PairSampler(n, global_batch_size=global_bs, micro_batch_size=micro, world_size=world, rank=0, seed=3)
    assert s.steps_per_epoch == 4 and s.accumulation_steps == 2
    for epoch in range(2):
        seen = []
        for step in range(epoch * 4, epoch * 4 + 4):
            seen += all_indices(n, world, micro, global_bs, step)
        assert len(seen) == 48 and len(set(seen)) == 48  # 2 of 50 dropped as the incomplete batch


def test_global_batch_is_independent_of_how_it_is_split():
    a = sorted(all_indices(40, 1, 8, 8, step=3))
    b = sorted(all_indices(40, 2, 1, 8, step=3))
    c = sorted(all_indices(40, 4, 2, 8, step=3))
    assert a == b == c


def test_position_is_a_pure_function_of_step():
    s1 = PairSampler(30, global_batch_size=4, micro_batch_size=2, world_size=2, rank=1, seed=0)
    s2 = PairSampler(30, global_batch_size=4, micro_batch_size=2, world_size=2, rank=1, seed=0)
    assert [s1.indices(k, 0) for k in range(20)] == [s2.indices(k, 0) for k in reversed(range(20))][::-1]
    assert s1.indices(0, 0) != s1.indices(7, 0)  # epoch 1 starts on a new permutation


def test_too_little_data_is_a_clear_error():
    with pytest.raises(ValueError, match="fewer than one global batch"):
        PairSampler(3, global_batch_size=4, micro_batch_size=2, world_size=2, rank=0, seed=0)


@pytest.mark.parametrize("n", [0, 1, 2, 3, 5, 7, 8, 13])
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("micro_batch_size", [1, 2, 3])
def test_held_out_batches_equal_per_rank_and_every_row_once(n, world_size, micro_batch_size):
    """Held-out evaluation under ZeRO-3: every rank runs the same number of forwards (a rank with
    fewer hangs the others), and every real row is counted exactly once."""
    per_rank = [list(rank_batches(n, rank=r, world_size=world_size, micro_batch_size=micro_batch_size))
                for r in range(world_size)]
    assert len({len(b) for b in per_rank}) == 1, [len(b) for b in per_rank]
    real = sorted(i for batches in per_rank for idx, is_real in batches if is_real for i in idx)
    assert real == list(range(n))
    for batches in per_rank:
        assert all(idx and len(idx) <= micro_batch_size for idx, _ in batches)  # padding: row 0, a valid index
