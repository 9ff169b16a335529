"""The reference ops against brute force and hand computations (CPU)."""

import pytest
import torch

from pkmem.ops import reference as ref


def _inputs(T, H, n, half, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(T, H, 2 * half, generator=g).to(dtype)
    keys = torch.randn(H, 2, n, half, generator=g).to(dtype)
    return q, keys


def _slot_scores(q, keys, idx):
    """Recompute the score of slot idx = i * n + j from the query halves and sub-keys."""
    n, half = keys.shape[2], keys.shape[3]
    q = q.double().view(*q.shape[:2], 2, half)
    h = torch.arange(q.shape[1])[None, :, None]
    c1 = keys.double()[h, 0, idx // n]  # (T, H, k, half)
    c2 = keys.double()[h, 1, idx % n]
    return (q[:, :, None, 0] * c1).sum(-1) + (q[:, :, None, 1] * c2).sum(-1)


SIZES = [  # (T, H, n, half, k)
    (7, 1, 5, 3, 1),
    (7, 1, 5, 3, 5),
    (13, 3, 16, 4, 4),
    (9, 2, 37, 7, 11),
    (5, 4, 64, 8, 32),
    (3, 2, 33, 5, 33),
]


@pytest.mark.parametrize("T,H,n,half,k", SIZES)
@pytest.mark.parametrize("seed", range(4))
def test_product_topk_is_exact(T, H, n, half, k, seed):
    q, keys = _inputs(T, H, n, half, seed)
    scores, idx = ref.product_topk(q, keys, k)
    assert scores.shape == idx.shape == (T, H, k) and idx.dtype == torch.int64
    assert scores.dtype == torch.float32
    assert int(idx.min()) >= 0 and int(idx.max()) < n * n
    # k distinct slots per (token, head), and the returned scores are those slots' scores
    assert (idx.sort(-1).values.diff(dim=-1) > 0).all()
    torch.testing.assert_close(scores.double(), _slot_scores(q, keys, idx), rtol=1e-5, atol=1e-5)
    # the same scores as the top-k over all n*n slots
    bf_scores, _ = ref.brute_force_product_topk(q, keys, k)
    torch.testing.assert_close(scores, bf_scores, rtol=0, atol=0)


def test_product_topk_bf16_inputs_scores_in_fp32():
    q, keys = _inputs(11, 2, 24, 16, seed=5, dtype=torch.bfloat16)
    scores, idx = ref.product_topk(q, keys, 8)
    assert scores.dtype == torch.float32
    bf_scores, _ = ref.brute_force_product_topk(q.float(), keys.float(), 8)
    torch.testing.assert_close(scores, bf_scores, rtol=0, atol=0)


def test_product_topk_ties():
    """Duplicate sub-keys give many equal scores: the selected scores still match brute force."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(1, 2, 4, 3, generator=g)
    keys = base.repeat(1, 1, 5, 1)  # each sub-key appears 5 times -> n = 20, heavy ties
    q = torch.randn(6, 1, 6, generator=g)
    scores, idx = ref.product_topk(q, keys, 7)
    bf_scores, _ = ref.brute_force_product_topk(q, keys, 7)
    torch.testing.assert_close(scores, bf_scores, rtol=0, atol=0)
    torch.testing.assert_close(scores.double(), _slot_scores(q, keys, idx), rtol=1e-6, atol=1e-6)
    assert (idx.sort(-1).values.diff(dim=-1) > 0).all()


def test_candidate_pairs_cover_the_topk():
    ci, cj = ref._candidate_pairs(32, torch.device("cpu"))
    assert len(ci) == 119  # sum_{i=1..32} floor(32 / i)
    assert bool(((ci + 1) * (cj + 1) <= 32).all())
    # on random sorted lists, the top-k of all k*k sums equals the top-k over the pairs
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        a = torch.randn(32, generator=g).sort(descending=True).values
        b = torch.randn(32, generator=g).sort(descending=True).values
        full = (a[:, None] + b[None, :]).flatten().topk(32).values
        torch.testing.assert_close((a[ci] + b[cj]).topk(32).values, full, rtol=0, atol=0)


def test_flat_topk_matches_exhaustive_search_across_chunks():
    g = torch.Generator().manual_seed(1)
    q, keys = torch.randn(10, 2, 6, generator=g), torch.randn(2, 50, 6, generator=g)
    scores, idx = ref.flat_topk(q, keys, 9, chunk_elements=2 * 50 * 3)  # 3 tokens per chunk
    full = torch.einsum("thd,hnd->thn", q, keys)
    torch.testing.assert_close(scores, full.topk(9, dim=-1).values)
    torch.testing.assert_close(scores, full.gather(-1, idx))


def _dense_flat_topk(q, keys, topk):
    """The exhaustive scores with autograd through all of them (the keys rounded to a 16-bit
    query's dtype in value only: the gradient of the rounding is the identity, as the kernels')."""
    dt = torch.float64 if torch.float64 in (q.dtype, keys.dtype) else torch.float32
    if q.dtype in (torch.bfloat16, torch.float16):
        keys = keys + (keys.to(q.dtype).to(keys.dtype) - keys).detach()
    return torch.einsum("thd,hnd->thn", q.to(dt), keys.to(dt)).topk(topk, dim=-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_flat_topk_gradients_reach_only_the_selected_keys_and_equal_the_dense_ones(dtype):
    """The backward reads the topk selected keys per token and head; the gradients equal those of
    autograd through every exhaustive score (odd sizes, several chunks each way), in each input's
    dtype."""
    g = torch.Generator().manual_seed(4)
    kdt = torch.float64 if dtype == torch.float64 else torch.float32
    q = torch.randn(13, 3, 7, generator=g).to(dtype).requires_grad_(True)
    keys = torch.randn(3, 37, 7, generator=g, dtype=kdt).requires_grad_(True)
    scores, idx = ref.flat_topk(q, keys, 5, chunk_elements=3 * 37 * 4)  # 4 tokens per chunk
    want, want_idx = _dense_flat_topk(q, keys, 5)
    assert torch.equal(idx, want_idx) and scores.dtype == want.dtype
    torch.testing.assert_close(scores, want)
    w = torch.randn(scores.shape, generator=g, dtype=scores.dtype)
    got = torch.autograd.grad((scores * w).sum(), (q, keys))
    ref_grads = torch.autograd.grad((want * w).sum(), (q, keys))
    for a, b in zip(got, ref_grads):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b)
    unread = torch.ones(3, 37, dtype=torch.bool)
    unread[torch.arange(3)[None, :, None].expand_as(idx), idx] = False
    assert unread.any() and (got[1][unread] == 0).all()  # keys never selected get no gradient
    # one input only: the other's gradient is not computed
    (gq,) = torch.autograd.grad((ref.flat_topk(q, keys.detach(), 5)[0] * w).sum(), (q,))
    torch.testing.assert_close(gq, got[0])


def test_flat_topk_gradcheck():
    g = torch.Generator().manual_seed(5)
    q = torch.randn(6, 2, 5, generator=g, dtype=torch.float64, requires_grad=True)
    keys = torch.randn(2, 11, 5, generator=g, dtype=torch.float64, requires_grad=True)
    fn = lambda a, b: ref.flat_topk(a, b, 3, chunk_elements=2 * 11 * 2)[0]  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, keys))


def test_product_topk_gradcheck():
    q, keys = _inputs(4, 2, 9, 3, seed=3, dtype=torch.float64)
    q.requires_grad_(True)
    keys.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: ref.product_topk(a, b, 4)[0], (q, keys))


def test_product_topk_gradient_reaches_only_selected_subkeys():
    q, keys = _inputs(1, 1, 12, 3, seed=4)
    keys.requires_grad_(True)
    _, idx = ref.product_topk(q, keys, 2)
    ref.product_topk(q, keys, 2)[0].sum().backward()
    touched = keys.grad.abs().sum(-1)[0]  # (2, n)
    expected = torch.zeros(2, 12, dtype=torch.bool)
    expected[0, idx[0, 0] // 12] = True
    expected[1, idx[0, 0] % 12] = True
    assert torch.equal(touched > 0, expected)


# ---- weighted gather -------------------------------------------------------------------------------
def _naive_gather(values, indices, weights):
    out = torch.zeros(indices.shape[0], values.shape[1], dtype=torch.float64)
    for t in range(indices.shape[0]):
        for j in range(indices.shape[1]):
            if indices[t, j] >= 0:
                out[t] += float(weights[t, j]) * values[indices[t, j]].double()
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_weighted_gather_matches_naive(dtype):
    g = torch.Generator().manual_seed(0)
    values = torch.randn(23, 7, generator=g).to(dtype)
    indices = torch.randint(0, 23, (9, 12), generator=g)
    indices[0, :] = 5  # duplicates within a bag
    indices[2, 3:7] = -1  # skipped entries
    weights = torch.rand(9, 12, generator=g)
    out = ref.weighted_gather(values, indices, weights)
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(out.double(), _naive_gather(values, indices, weights), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weighted_gather_sparse_gradient(dtype):
    g = torch.Generator().manual_seed(1)
    indices = torch.randint(0, 40, (6, 5), generator=g)
    indices[1] = -1  # a masked token: none of its entries may appear in the sparse gradient
    indices[3, 2] = -1
    weights = torch.rand(6, 5, generator=g)
    grad_out = torch.randn(6, 3, generator=g)
    dense = torch.randn(40, 3, generator=g).to(dtype).requires_grad_(True)
    sparse = dense.detach().clone().requires_grad_(True)
    w1, w2 = weights.clone().requires_grad_(True), weights.clone().requires_grad_(True)
    ref.weighted_gather(dense, indices, w1).backward(grad_out)
    ref.weighted_gather(sparse, indices, w2, sparse=True).backward(grad_out)
    assert sparse.grad.is_sparse and not dense.grad.is_sparse
    torch.testing.assert_close(sparse.grad.to_dense().float(), dense.grad.float())
    torch.testing.assert_close(w1.grad, w2.grad)
    touched = set(sparse.grad.coalesce().indices()[0].tolist())
    assert touched == set(indices[indices >= 0].tolist())
    assert (w1.grad[indices < 0] == 0).all()


def test_weighted_gather_gradcheck():
    g = torch.Generator().manual_seed(2)
    values = torch.randn(11, 4, generator=g, dtype=torch.float64, requires_grad=True)
    indices = torch.randint(0, 11, (5, 6), generator=g)
    indices[2, 1] = -1
    weights = torch.rand(5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v, w: ref.weighted_gather(v, indices, w), (values, weights))
