"""Class memories: which item each eviction policy drops, size limits, and the two memory losses."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import approx_f32

from gendd.blocks.memory import ClassMemory, cosine_matrix, diversity_loss, representativeness_loss
from gendd.errors import ConfigError

# x1 is the centre of a tight cluster {x1, x2, x3}; x4 is orthogonal to all of them. Row sums of the
# cosine matrix (self-similarity included): s1 = 2.976, s2 = 2.951, s3 = 2.937, s4 = 1.
CLUSTER = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.1, 0.0], [1.0, -0.2, 0.0], [0.0, 0.0, 1.0]])


def _reference_evict(items: list[torch.Tensor], size: int, strategy: str) -> list[torch.Tensor]:
    """The memory repo's update_memory loop (train_dit.py), written out independently."""
    items = list(items)
    while len(items) > size:
        m = torch.stack(items)
        s = ((m @ m.T) / (m.norm(dim=1)[:, None] * m.norm(dim=1)[None, :])).sum(1).tolist()
        value = max(s) if strategy == "max" else min(s)
        items.pop(s.index(value))
    return items


def test_fifo_drops_the_oldest():
    mem = ClassMemory(3, "fifo")
    for i in range(5):
        mem.add(torch.full((1, 2, 2), float(i)))  # flattened on the way in
        assert len(mem) <= 3
    assert mem.tensor()[:, 0].tolist() == [2.0, 3.0, 4.0]
    assert mem.tensor().shape == (3, 4)
    assert mem.add(torch.full((2, 4), 9.0)) == [0, 0]
    assert mem.tensor()[:, 0].tolist() == [4.0, 9.0, 9.0]


def test_max_similarity_drops_the_most_redundant_item():
    s = cosine_matrix(CLUSTER, CLUSTER).sum(1)
    assert s.argmax() == 0 and s.argmin() == 3
    mem = ClassMemory(3, "max-similarity")
    assert mem.add(CLUSTER) == [0]  # the cluster centre leaves
    assert torch.equal(mem.tensor(), CLUSTER[1:])


def test_min_similarity_drops_the_outlier():
    mem = ClassMemory(3, "min-similarity")
    assert mem.add(CLUSTER) == [3]
    assert torch.equal(mem.tensor(), CLUSTER[:3])


def test_ties_drop_the_first_item_as_the_reference():
    mem = ClassMemory(2, "max-similarity")
    same = torch.tensor([[0.0, 1.0], [1.0, 0.0], [1.0, 0.0]])  # s = [1, 2, 2]
    assert mem.add(same) == [1]


@pytest.mark.parametrize("policy,strategy", [("max-similarity", "max"), ("min-similarity", "min")])
def test_repeated_eviction_matches_the_reference_loop(policy, strategy):
    """Items arrive in batches (as per training step); the memory never exceeds its size and keeps
    exactly what the reference's pop-argmax loop keeps."""
    g = torch.Generator().manual_seed(0)
    mem, ref = ClassMemory(8, policy), []
    for _ in range(6):
        batch = torch.randn(5, 16, generator=g)
        mem.add(batch)
        ref = _reference_evict(ref + list(batch.unbind(0)), 8, strategy)
        assert len(mem) <= 8
        # exact: the kept rows are copies of the inputs (the similarity sums only pick which)
        torch.testing.assert_close(mem.tensor(), torch.stack(ref), rtol=0, atol=0)


def test_state_roundtrip_and_errors():
    mem = ClassMemory(4, "max-similarity")
    assert mem.state() is None
    mem.add(CLUSTER)
    other = ClassMemory(4, "max-similarity")
    other.load_state(mem.state())
    assert torch.equal(other.tensor(), mem.tensor())
    with pytest.raises(ConfigError, match="unknown memory eviction"):
        ClassMemory(4, "lru")
    with pytest.raises(ConfigError, match="memory_size"):
        ClassMemory(0)
    with pytest.raises(ConfigError, match="empty"):
        ClassMemory(2).tensor()


def _cos(value):
    """float32 cosines of 2-d vectors (length-2 dot products and norms); losses are O(1) like the cosines."""
    return approx_f32(value, n=2, scale=1.0)


def test_losses_on_constructed_vectors():
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    z = torch.stack([e1])
    mem = torch.stack([e1, e2])  # cos = [1, 0]
    assert representativeness_loss(z, mem).item() == _cos(1.0)  # 1 - min
    assert diversity_loss(z, mem).item() == _cos(1.0)  # max
    z2 = torch.stack([e1, e2])
    mem2 = torch.tensor([[1.0, 1.0]])  # cos = 1/sqrt(2) for both predictions
    assert representativeness_loss(z2, mem2).item() == _cos(1 - 1 / math.sqrt(2))
    assert diversity_loss(z2, mem2).item() == _cos(1 / math.sqrt(2))
    anti = torch.stack([-e1, 3 * e1])  # cos = [-1, 1]
    assert representativeness_loss(z, anti).item() == _cos(2.0)
    assert diversity_loss(z, anti).item() == _cos(1.0)
    # scale invariant in both arguments; min/max over the whole (b, n) matrix
    z3 = torch.tensor([[2.0, 0.0], [0.0, -5.0]])
    mem3 = torch.tensor([[0.0, 1.0], [1.0, 1.0]])  # cos = [[0, .707], [-1, -.707]]
    assert representativeness_loss(z3, mem3).item() == _cos(2.0)
    assert diversity_loss(z3, 7 * mem3).item() == _cos(1 / math.sqrt(2))


def test_losses_give_gradients_only_through_the_extreme_pair():
    z = torch.tensor([[1.0, 0.2], [0.3, 1.0]], requires_grad=True)
    mem = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    diversity_loss(z, mem).backward()
    # cos(z_1, M_1) = 0.981 is the maximum (cos(z_2, M_2) = 0.958): only z_1 receives a gradient
    assert z.grad[0].abs().sum() > 0 and torch.equal(z.grad[1], torch.zeros(2))
