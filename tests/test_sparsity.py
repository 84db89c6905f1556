"""mla.sparsity builders: BlockMask round trips, causal / sliding-window / top-k blocks, top-k tokens."""

import math

import pytest
import torch
from oracle import causal_keep

from mla.sparsity import (
    BlockMask,
    causal_block_mask,
    causal_clip_topk,
    sliding_window_block_mask,
    topk_block_mask,
    topk_indices_from_scores,
    topk_to_dense_mask,
)


def test_from_dense_round_trip_and_transpose():
    g = torch.Generator().manual_seed(0)
    grid = torch.rand(2, 3, 5, 4, generator=g) > 0.5
    bm = BlockMask.from_dense(grid, (8, 16), (37, 60))
    assert bm.kv_num_blocks.dtype == torch.int32 and bm.kv_indices.dtype == torch.int32
    assert torch.equal(bm.kv_num_blocks, grid.sum(-1).int())
    fresh = BlockMask(bm.kv_num_blocks, bm.kv_indices, (8, 16), (37, 60))
    assert torch.equal(fresh.to_dense(), grid)
    # transposed lists: query blocks per key block, ascending
    for b in range(2):
        for h in range(3):
            for kb in range(4):
                n = int(bm.q_num_blocks[b, h, kb])
                assert bm.q_indices[b, h, kb, :n].tolist() == grid[b, h, :, kb].nonzero().flatten().tolist()
    for b in range(2):
        for h in range(3):
            for qb in range(5):
                n = int(bm.kv_num_blocks[b, h, qb])
                assert bm.kv_indices[b, h, qb, :n].tolist() == grid[b, h, qb].nonzero().flatten().tolist()


@pytest.mark.parametrize("T,S,bs", [(64, 64, 16), (50, 70, (16, 32)), (70, 20, 8), (1, 33, 16)])
def test_causal_block_mask_covers_causal_exactly(T, S, bs):
    bm = causal_block_mask(T, S, bs)
    elem = bm.to_element_mask(causal=True)[0, 0]
    assert torch.equal(elem, causal_keep(T, S))
    # minimal: every listed block contains a visible pair
    bm_, bn_ = bm.BLOCK_SIZE
    grid = bm.to_dense()[0, 0]
    ck = causal_keep(T, S)
    for qb, kb in grid.nonzero().tolist():
        assert ck[qb * bm_:(qb + 1) * bm_, kb * bn_:(kb + 1) * bn_].any()


def test_sliding_window_superset_of_token_window():
    T = S = 100
    w = 20
    bm = sliding_window_block_mask(T, S, w, 16)
    elem = bm.to_element_mask(causal=True)[0, 0]
    i = torch.arange(T)[:, None]
    j = torch.arange(S)[None, :]
    window = (j <= i) & (j > i - w)
    assert (elem | ~window).all()  # every window pair kept
    assert not (elem & (j <= i - w - 32)).any()  # at most BLOCK_M + BLOCK_N beyond the window
    assert bm.density(causal=True) < 0.5


def test_topk_block_mask_forced_and_topk():
    T = S = 128
    bs = 16
    nq = nk = 8
    scores = torch.zeros(1, 1, nq, nk)
    scores[..., 3] = 10.0  # block 3 is the favourite everywhere
    bm = topk_block_mask(scores, 1, bs, (T, S), num_sink_blocks=1, num_local_blocks=2, causal=True)
    grid = bm.to_dense()[0, 0]
    for qb in range(nq):
        row = set(grid[qb].nonzero().flatten().tolist())
        expect = {0} | {qb, qb - 1} - {-1}
        if qb > 3 and 3 not in expect:
            expect.add(3)
        elif qb >= 2:
            # block 3 is already local/sink or not visible: the best other visible block is taken
            cands = set(range(qb + 1)) - expect
            if cands:
                assert len(row - expect) == 1
                continue
        assert row == expect, (qb, row, expect)
    # causal: never a block above the diagonal
    assert not (grid & ~torch.ones(nq, nk, dtype=torch.bool).tril()).any()


def test_topk_block_mask_k_larger_than_available():
    scores = torch.randn(2, 3, 4, 4)
    bm = topk_block_mask(scores, 100, 8, (32, 32), num_sink_blocks=0, num_local_blocks=0)
    assert torch.equal(bm.to_dense()[0, 0], torch.ones(4, 4, dtype=torch.bool).tril())


def test_topk_indices_from_scores_pads_and_clips():
    B, T, H, S = 1, 4, 1, 6
    scores = torch.randn(B, T, H, S)
    idx = topk_indices_from_scores(scores, 5, causal=True)
    assert idx.dtype == torch.int32 and idx.shape == (1, 4, 1, 5)
    # row i may only pick keys <= i + 2; row 0 has 3 candidates -> 2 lanes of -1
    assert idx[0, 0, 0].tolist() == [0, 1, 2, -1, -1]
    assert (idx[0, 3, 0] >= 0).all() and idx[0, 3, 0].max() <= 5
    big = topk_indices_from_scores(scores, 9)
    assert big.shape[-1] == 9 and (big[..., 6:] == -1).all()
    # the best keys are chosen
    s = scores.clone()
    s[..., 4] = 100
    assert (topk_indices_from_scores(s, 1) == 4).all()


def test_causal_clip_and_dense_mask():
    idx = torch.tensor([[[[0, 5, 3, -1]], [[5, 2, 1, 4]]]], dtype=torch.int32)  # B=1, T=2, H=1
    clipped = causal_clip_topk(idx, 6)  # row 0 sees <= 4, row 1 sees <= 5
    assert clipped[0, 0, 0].tolist() == [0, -1, 3, -1]
    assert clipped[0, 1, 0].tolist() == [5, 2, 1, 4]
    m = topk_to_dense_mask(clipped, 6)
    assert m.shape == (1, 1, 2, 6)
    assert m[0, 0, 0].tolist() == [True, False, False, True, False, False]


def test_density_and_repr():
    bm = causal_block_mask(64, 64, 16)
    assert math.isclose(bm.density(causal=True), (64 * 65 / 2) / 64**2)
    assert math.isclose(bm.density(), 10 * 256 / 64**2)
    assert "BlockMask" in repr(bm)


def test_block_mask_checks_empty_masks_and_given_transposes():
    from mla import latent_attention
    from mla.sparsity import BlockMask, check_block_mask

    q, k = torch.randn(1, 0, 2, 16), torch.randn(1, 16, 1, 16)
    empty = BlockMask.from_dense(torch.ones(1, 1, 0, 2, dtype=torch.bool), (8, 8), (0, 16))
    assert latent_attention(q, k, k, block_mask=empty).shape == (1, 0, 2, 16)
    m = BlockMask.from_dense(torch.tensor([[1, 0], [1, 1]], dtype=torch.bool), (8, 8), (16, 16))
    good = BlockMask(m.kv_num_blocks, m.kv_indices, (8, 8), (16, 16), q_num_blocks=m.q_num_blocks,
                     q_indices=m.q_indices)
    check_block_mask(good, 1, 1, 16, 16)
    bad = BlockMask(m.kv_num_blocks, m.kv_indices, (8, 8), (16, 16),
                    q_num_blocks=torch.tensor([[[0, 1]]], dtype=torch.int32),
                    q_indices=torch.tensor([[[[0, 0], [1, 0]]]], dtype=torch.int32))
    with pytest.raises(ValueError, match="transpose"):
        check_block_mask(bad, 1, 1, 16, 16)
    for seq in ((16, 16, 1), (-3, 16), (16.0, 16)):
        with pytest.raises(ValueError, match="seq_lengths"):
            BlockMask(m.kv_num_blocks, m.kv_indices, (8, 8), seq)
    with pytest.raises(ValueError, match="BLOCK_SIZE"):
        BlockMask(m.kv_num_blocks, m.kv_indices, (8.5, 8), (16, 16))
    with pytest.raises(ValueError, match="both"):
        BlockMask(m.kv_num_blocks, m.kv_indices, (8, 8), (16, 16), q_indices=m.q_indices)
    with pytest.raises(TypeError, match="q_num_blocks"):
        BlockMask(m.kv_num_blocks, m.kv_indices, (8, 8), (16, 16), q_num_blocks=m.q_num_blocks.float(),
                  q_indices=m.q_indices.float())
