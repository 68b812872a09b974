"""The references of Lab 6's checks (sparse and long-context attention) follow the conventions of the code they
stand for: transformers' sliding-window masks, fast-transformers' linear attention, Performer's orthogonal random
features, StreamingLLM's StartRecentKVCache, the Sparse Transformer's released masks and transformers' BigBird."""
from __future__ import annotations

import math
import types

import numpy as np
import pytest
import torch

from labkit.checks import references as ref


# ---------------------------------------------------------------- sliding window
@pytest.mark.parametrize("T", [1, 5, 9])
def test_sliding_window_mask_holds_window_keys_counting_itself(T):
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    for W in range(1, T + 3):
        mask = ref.hf_sliding_window_mask(T, W)
        assert mask.dtype == torch.bool and mask.shape == (T, T)
        assert torch.equal(mask, (j <= i) & (j > i - W))
        assert mask.sum(-1).tolist() == [min(r + 1, W) for r in range(T)]
    assert torch.equal(ref.hf_sliding_window_mask(T, 1), torch.eye(T, dtype=torch.bool))
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    assert torch.equal(ref.hf_sliding_window_mask(T, T), causal)
    assert torch.equal(ref.hf_sliding_window_mask(T, T + 4), causal)


def test_sliding_window_mask_is_mistrals():
    """The mask transformers' Mistral builds from its config (sdpa: boolean; eager: additive) is the reference's."""
    from transformers.masking_utils import create_sliding_window_causal_mask

    T, W = 7, 3
    config = ref.mistral_config(16, 4, 2, 32, sliding_window=W)
    for implementation in ("sdpa", "eager"):
        config._attn_implementation = implementation
        mask = create_sliding_window_causal_mask(config, torch.zeros(1, T, 16, dtype=torch.float64), None, None,
                                                 position_ids=torch.arange(T)[None], allow_is_causal_skip=False)[0, 0]
        allowed = mask if mask.dtype == torch.bool else mask == 0
        assert torch.equal(allowed, ref.hf_sliding_window_mask(T, W)), implementation


def test_sliding_window_attention_is_mistrals_eager_attention():
    from transformers.masking_utils import create_sliding_window_causal_mask
    from transformers.models.mistral.modeling_mistral import eager_attention_forward

    g = torch.Generator().manual_seed(0)
    B, H, T, d, W = 2, 3, 8, 4, 3
    q, k, v = (torch.randn(B, H, T, d, generator=g, dtype=torch.float64) for _ in range(3))
    config = ref.mistral_config(16, 4, 2, 32, sliding_window=W)
    config._attn_implementation = "eager"
    mask = create_sliding_window_causal_mask(config, torch.zeros(B, T, 16, dtype=torch.float64), None, None,
                                             position_ids=torch.arange(T)[None], allow_is_causal_skip=False)
    module = types.SimpleNamespace(num_key_value_groups=1, training=False)
    want, _ = eager_attention_forward(module, q, k, v, mask, scaling=d ** -0.5)
    got = ref.sliding_window_attention(q, k, v, W)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want.transpose(1, 2), atol=1e-6, rtol=0)  # its softmax is float32
    # A loop over each query's window, in float64; the last queries alone see the same keys (decoding).
    for i in range(T):
        keys = slice(max(0, i - W + 1), i + 1)
        p = torch.softmax(q[:, :, i:i + 1] @ k[:, :, keys].transpose(-1, -2) / math.sqrt(d), dim=-1)
        torch.testing.assert_close(got[:, :, i:i + 1], p @ v[:, :, keys], atol=1e-12, rtol=0)
    torch.testing.assert_close(ref.sliding_window_attention(q[:, :, -2:], k, v, W), got[:, :, -2:], atol=1e-12, rtol=0)


# ---------------------------------------------------------------- linear attention
def test_quadratic_linear_attention_by_hand():
    """phi(x) = elu(x) + 1 is x + 1 for x >= 0: q = (1, 0), k = (1, 2) give phi(q) = (2, 1), phi(k) = (2, 3) and
    A = [[4, 6], [2, 3]]. Causal: out_0 = v_0, out_1 = (2 v_0 + 3 v_1) / 5; non-causal, both rows (v_0, v_1)
    weighted 4:6 = 2:3."""
    q = torch.tensor([1.0, 0.0]).view(1, 1, 2, 1)
    k = torch.tensor([1.0, 2.0]).view(1, 1, 2, 1)
    v = torch.tensor([[1.0, 10.0], [6.0, 0.0]]).view(1, 1, 2, 2)
    causal = ref.quadratic_linear_attention(q, k, v, causal=True)
    assert causal.dtype == torch.float64
    torch.testing.assert_close(causal[0, 0], torch.tensor([[1.0, 10.0], [4.0, 4.0]], dtype=torch.float64))
    full = ref.quadratic_linear_attention(q, k, v, causal=False)
    torch.testing.assert_close(full[0, 0], torch.tensor([[4.0, 4.0], [4.0, 4.0]], dtype=torch.float64))
    assert ref.elu_plus_one(torch.tensor(-1.0)).item() == pytest.approx(math.exp(-1))
    # Another feature map, and the queries as the last of the keys
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 5, 3, generator=g, dtype=torch.float64) for _ in range(3))
    out = ref.quadratic_linear_attention(q, k, v, feature_map=torch.exp)
    i = 3
    weights = torch.exp(q[:, :, i:i + 1]) @ torch.exp(k[:, :, :i + 1]).transpose(-1, -2)
    torch.testing.assert_close(out[:, :, i:i + 1], weights @ v[:, :, :i + 1] / weights.sum(-1, keepdim=True))
    torch.testing.assert_close(ref.quadratic_linear_attention(q[:, :, -2:], k, v), ref.quadratic_linear_attention(
        q, k, v)[:, :, -2:])


# ---------------------------------------------------------------- Performer
def test_orthogonal_gaussian_blocks():
    g = torch.Generator().manual_seed(0)
    W = ref.orthogonal_gaussian(10, 4, g, scaling="none")
    assert W.shape == (10, 4) and W.dtype == torch.float64
    for block in (W[0:4], W[4:8]):  # full blocks: orthonormal rows
        torch.testing.assert_close(block @ block.T, torch.eye(4, dtype=torch.float64))
    torch.testing.assert_close(W[8:] @ W[8:].T, torch.eye(2, dtype=torch.float64))  # the last block, cut to 2 rows
    torch.testing.assert_close(ref.orthogonal_gaussian(5, 4, g, scaling="sqrt_d").norm(dim=-1),
                               torch.full((5,), 2.0, dtype=torch.float64))
    # chi: the row norms are those of a second (m, d) Gaussian drawn after the blocks
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    chi = ref.orthogonal_gaussian(6, 4, g1)
    torch.randn(2, 4, 4, generator=g2, dtype=torch.float64)
    torch.testing.assert_close(chi.norm(dim=-1), torch.randn(6, 4, generator=g2, dtype=torch.float64).norm(dim=-1))
    batch = ref.orthogonal_gaussian(6, 4, torch.Generator().manual_seed(0), n_draws=3)
    assert batch.shape == (3, 6, 4)


def test_sign_correction_makes_the_rows_uniform():
    """LAPACK's Householder QR fixes the sign of Q[0, 0] (Q[0, 0] < 0 always), so without the correction the first
    row of each block lies on a half-sphere; with it, on the whole sphere (Mezzadri 2007)."""
    draws = 4000
    raw = ref.orthogonal_gaussian(4, 4, torch.Generator().manual_seed(0), "none", sign_correction=False,
                                  n_draws=draws)
    fixed = ref.orthogonal_gaussian(4, 4, torch.Generator().manual_seed(0), "none", n_draws=draws)
    assert (raw[:, 0, 0] < 0).double().mean() > 0.99
    assert abs((fixed[:, 0, 0] < 0).double().mean().item() - 0.5) < 4 * 0.5 / math.sqrt(draws)
    assert fixed.mean(0).abs().max() < 4 / math.sqrt(draws)  # each entry has mean 0 and variance 1/d <= 1


def test_favor_estimates_are_unbiased_with_chi_norms_and_sign_correction():
    """The mean of 20000 independent draws lies within 4 standard errors of exp(q^T k) (a fixed seed, so the test
    is deterministic; |q + k| <= 1 keeps the estimates' spread small). Without the sign correction, or with rows of
    length sqrt(d) (Performer's scaling=1, which estimates another kernel), the mean is off by many standard errors
    (by 13% to 20% here without the correction, where d = 4)."""
    g = torch.Generator().manual_seed(1)
    generic = (0.35 * torch.randn(4, generator=g, dtype=torch.float64),
               0.35 * torch.randn(4, generator=g, dtype=torch.float64))
    axis = 0.5 * torch.eye(4, dtype=torch.float64)[0]
    draws = 20000
    for q, k in (generic, (axis, axis)):
        assert (q + k).norm() <= 1
        for m in (4, 6):
            estimates, exact = ref.favor_kernel_estimates(q, k, m, draws, seed=0)
            se = estimates.std().item() / math.sqrt(draws)
            assert abs(estimates.mean().item() - exact) < 4 * se, (m, estimates.mean().item(), exact, se)
    for (q, k), options in ((generic, {"sign_correction": False}), ((axis, axis), {"sign_correction": False}),
                            ((axis, axis), {"scaling": "sqrt_d"})):
        estimates, exact = ref.favor_kernel_estimates(q, k, 4, draws, seed=0, **options)
        se = estimates.std().item() / math.sqrt(draws)
        assert abs(estimates.mean().item() - exact) > 6 * se, options


# ---------------------------------------------------------------- StreamingLLM
def start_recent_kv_cache(k: torch.Tensor, start_size: int, recent_size: int) -> torch.Tensor:
    """StartRecentKVCache.__call__ of mit-han-lab/streaming-llm (streaming_llm/kv_cache.py), on one tensor whose
    sequence dimension is 2."""
    seq_len = k.size(2)
    if seq_len <= start_size + recent_size:
        return k
    return torch.cat([k[:, :, 0:start_size], k[:, :, seq_len - recent_size:seq_len]], dim=2)


@pytest.mark.parametrize("n_sink, window", [(2, 3), (0, 4), (4, 0), (1, 1)])
def test_streaming_cache_follows_start_recent_kv_cache(n_sink, window):
    g = torch.Generator().manual_seed(0)
    cache, past, seen = ref.streaming_cache_reference(n_sink, window), None, 0
    for t in [1, 1, 3, 1, 1, 7, 1, 2, 1, 1]:
        k = torch.arange(seen, seen + t, dtype=torch.float64).view(1, 1, t, 1).expand(2, 3, t, 1)
        v = torch.randn(2, 3, t, 5, generator=g, dtype=torch.float64)
        cache.append(k, v)
        both = torch.cat([k.expand(2, 3, t, 5), v], dim=-1)
        past = both if past is None else torch.cat([past, both], dim=2)
        past = start_recent_kv_cache(past, n_sink, window)
        seen += t
        keys, values = cache.keys_values()
        assert torch.equal(torch.cat([keys.expand(-1, -1, -1, 5), values], dim=-1), past)
        assert cache.token_positions() == keys[0, 0, :, 0].long().tolist()
        assert cache.cache_positions() == list(range(len(cache))) and len(cache) <= n_sink + window
    assert cache.token_positions() == list(range(n_sink)) + list(range(seen - window, seen))


# ---------------------------------------------------------------- Sparse Transformer and BigBird
def test_strided_and_fixed_masks_by_hand():
    local, strided = ref.strided_masks(7, 3)
    rows = lambda mask: ["".join("x" if a else "." for a in row) for row in mask.tolist()]
    assert rows(local) == ["x......", "xx.....", "xxx....", ".xxx...", "..xxx..", "...xxx.", "....xxx"]
    assert rows(strided) == ["x......", ".x.....", "..x....", "x..x...", ".x..x..", "..x..x.", "x..x..x"]
    assert rows(ref.fixed_mask(8, 4, 1)) == ["x.......", "xx......", "xxx.....", "xxxx....",
                                             "...xx...", "...xxx..", "...xxxx.", "...xxxxx"]
    assert rows(ref.fixed_mask(8, 4, 2)) == ["x.......", "xx......", "xxx.....", "xxxx....",
                                             "..xxx...", "..xxxx..", "..xxxxx.", "..xxxxxx"]


@pytest.mark.parametrize("training", [False, True])
def test_bigbird_layout_is_hfs_block_sparse_attention(training):
    """The blocks transformers' BigBirdBlockSparseAttention attends (its attention probabilities, reassembled, are
    non-zero exactly there) are the reference layout's with its random blocks: seeded with the layer's seed in
    training, none (all 0) in eval."""
    BigBirdConfig, BlockSparse, BigBirdModel = ref.hf("big_bird", "BigBirdConfig", "BigBirdBlockSparseAttention",
                                                      "BigBirdModel")
    b, n, r, heads, seed = 2, 10, 1, 2, 5
    T = b * n
    config = BigBirdConfig(hidden_size=8, num_attention_heads=heads, block_size=b, num_random_blocks=r,
                           max_position_embeddings=64, attention_type="block_sparse")
    attention = BlockSparse(config, seed=seed).double().train(training)
    blocked, band, from_mask, to_mask = BigBirdModel.create_masks_for_block_sparse_attn(torch.ones(1, T), b)
    with torch.no_grad():
        _, probs = attention(torch.randn(1, T, 8, dtype=torch.float64), band, from_mask, to_mask, blocked, blocked)
    seen = (probs[0] != 0).view(heads, n, b, n, b).any(dim=-1).any(dim=2)
    np.random.seed(seed)
    plan, plan_r = BlockSparse._get_rand_attn_plan(T, b, r)
    rand = attention._bigbird_block_rand_mask_with_head(T, T, b, b, heads, plan, plan_r)
    for h in range(heads):
        random_blocks = torch.as_tensor(np.asarray(rand[h]))
        assert random_blocks.shape == (n - 2, r)
        assert torch.equal(seen[h], ref.bigbird_block_layout(random_blocks))
        if not training:
            assert not random_blocks.any()
