"""The references of Lab 10's checks (scaling laws): transformers' Llama and Mixtral models built on the meta device
for parameter counts, ``torch.utils.flop_counter`` for the 2N of the FLOP count, the closed form and a brute-force
minimisation of the Chinchilla law, Table 3 of Hoffmann et al. 2022, the Approach 3 fit by scipy's L-BFGS-B, its
bootstrap, numpy.polyfit for isoFLOP minima, and the saved-tensor count of a training step. Each is pinned against
numbers computed by hand or by a second route. The notes are in ``tests/lab10_reference_notes.md``."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from labkit.checks import lab10
from labkit.checks import references as ref

F64 = torch.float64
SMALL = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
         "head_dim": 24, "intermediate_size": 96, "vocab_size": 100, "tie_word_embeddings": False}


# ---------------------------------------------------------------- counting
@pytest.mark.parametrize("name", sorted(ref.PUBLISHED_COUNTS))
def test_published_counts(name):
    """Llama 3 8B = 8,030,261,248; Llama 2 7B = 6,738,415,616; Mixtral 8x7B = 46,702,792,704, of which 12,879,925,248
    active (two of eight experts, the router included); Llama 3.2 1B (tied) = 1,235,814,400."""
    config, active, want = ref.PUBLISHED_COUNTS[name]
    assert ref.meta_numel(config, active) == want


def test_meta_model_shapes_by_hand():
    """The meta model's matrices as the lab counts them: q and o are hidden x heads x head_dim, k and v hidden x
    kv_heads x head_dim (head_dim set apart from hidden / heads), three FFN matrices, two gains per layer and a final
    one; an untied head is a second table, a tied one the same tensor, counted once."""
    d, L, V, H, KV, hd, ff = 64, 2, 100, 4, 2, 24, 96
    layer = 2 * d * H * hd + 2 * d * KV * hd + 3 * d * ff + 2 * d
    assert ref.meta_numel(SMALL) == L * layer + d + 2 * V * d
    tied = SMALL | {"tie_word_embeddings": True}
    assert ref.meta_numel(tied) == L * layer + d + V * d
    model = ref.hf_causal_lm(tied)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    attention = model.model.layers[0].self_attn
    assert attention.q_proj.weight.shape == (H * hd, d) and attention.k_proj.weight.shape == (KV * hd, d)
    assert ref.meta_numel(SMALL, active=True) == ref.meta_numel(SMALL)  # dense: everything is active


def test_mixtral_active_by_hand():
    """Mixtral: each layer has a router (hidden x experts) and E experts of three matrices; a token uses k of them."""
    moe = SMALL | {"num_local_experts": 6, "num_experts_per_tok": 2}
    d, L, V, H, KV, hd, ff, E, k = 64, 2, 100, 4, 2, 24, 96, 6, 2
    attention, expert, router = 2 * d * H * hd + 2 * d * KV * hd, 3 * d * ff, d * E
    assert ref.meta_numel(moe) == L * (attention + E * expert + router + 2 * d) + d + 2 * V * d
    assert ref.meta_numel(moe, active=True) == L * (attention + k * expert + router + 2 * d) + d + 2 * V * d


# ---------------------------------------------------------------- FLOPs
@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("seq_len", [8, 32])
def test_flops_against_the_flop_counter(tied, seq_len):
    """torch.utils.flop_counter on a meta-device forward of transformers' Llama: the weights' matmuls (mm) are
    2 T N_matrices, N_matrices being the reference's N less the norms' gains (elementwise, no FLOPs to the counter);
    the attention's (bmm, eager attention over the full T x T square) are 4 n_layers T^2 d_attn, twice Kaplan's
    2 n_layers T d_attn per token, which counts the causal half. So the inference count is the counter's per token,
    less half its attention term, plus 2 x the gains."""
    config = SMALL | {"tie_word_embeddings": tied}
    counted = ref.flop_counter_forward(config, seq_len)
    L, d = config["num_hidden_layers"], config["hidden_size"]
    norms = (2 * L + 1) * d
    assert counted["mm"] == 2 * seq_len * (ref.flops_params(config) - norms)
    assert counted["bmm"] == 4 * L * seq_len ** 2 * ref.d_attn(config)
    assert counted["total"] == counted["mm"] + counted["bmm"]
    want = counted["total"] / seq_len - 2 * L * seq_len * ref.d_attn(config) + 2 * norms
    assert ref.flops_per_token_reference(config, seq_len, training=False) == want
    assert ref.flops_per_token_reference(config, seq_len) == 3 * want


def test_flops_published():
    """Llama 3 8B training at 8,192 tokens: 6 (8,030,261,248 - 128,256 x 4,096) + 6 x 32 x 8,192 x 4,096 per token;
    Mixtral 8x7B inference uses its active parameters (less the 32,000 x 4,096 input table)."""
    N = 8_030_261_248 - 128_256 * 4096
    assert ref.flops_params(ref.LLAMA3_8B) == N == 7_504_924_672
    assert ref.flops_per_token_reference(ref.LLAMA3_8B, 8192) == 6 * N + 6 * 32 * 8192 * 4096
    assert ref.flops_params(ref.MIXTRAL_8X7B) == 12_879_925_248 - 32_000 * 4096
    assert ref.flops_params(ref.LLAMA32_1B) == 1_235_814_400  # tied: the table is the head, a matmul


# ---------------------------------------------------------------- the Chinchilla law and its optimum
def test_constants_and_tokens_per_parameter():
    """The printed fit gives about 93 tokens per parameter at 5.76e23 FLOPs (N* about 32B), Epoch's refit about 18
    (N* about 72B); both by the closed form and by the brute force."""
    for params, ratio, size in ((ref.CHINCHILLA_PRINTED, 92.6, 32.2e9), (ref.EPOCH_REFIT, 18.4, 72.2e9)):
        N, D = ref.compute_optimal_closed_form(5.76e23, params)
        assert D / N == pytest.approx(ratio, abs=0.1) and N == pytest.approx(size, rel=0.01)
        assert 6 * N * D == pytest.approx(5.76e23, rel=1e-12)
        assert ref.compute_optimal_brute_force(5.76e23, params)[0] == pytest.approx(N, rel=1e-6)


def test_closed_form_by_hand():
    """alpha = beta and A = B: G = 1 and N* = D* = sqrt(C / 6); the law itself at a point by hand."""
    p = {"E": 1.5, "A": 300.0, "B": 300.0, "alpha": 0.3, "beta": 0.3}
    N, D = ref.compute_optimal_closed_form(6e20, p)
    assert N == pytest.approx(1e10, rel=1e-12) and D == pytest.approx(1e10, rel=1e-12)
    assert float(ref.chinchilla_loss_reference(1e10, 1e10, p)) == pytest.approx(1.5 + 600 / 1e3, rel=1e-12)


def test_table3_as_printed():
    """Hoffmann et al.'s Table 3 (Approach 1): C = 6 N D within 1% except where the tokens are rounded (67B: 1.5T
    tokens give 6.03e23, 4.7% above 5.76e23). Epoch's refit lands within 10% of the table's model sizes up to
    5.76e23 FLOPs (0.92-1.08x); the printed fit at 0.48-0.77x there (0.30x at 1e28)."""
    for n, C, tokens in ref.CHINCHILLA_TABLE3:
        assert 6 * n * tokens / C == pytest.approx(1, abs=0.048 if n == 67e9 else 0.01)
    assert 6 * 67e9 * 1.5e12 == pytest.approx(6.03e23)
    up_to = [(n, C) for n, C, _ in ref.CHINCHILLA_TABLE3 if C <= 5.76e23]
    assert len(up_to) == 4
    epoch = [ref.compute_optimal_closed_form(C, ref.EPOCH_REFIT)[0] / n for n, C in up_to]
    printed = [ref.compute_optimal_closed_form(C, ref.CHINCHILLA_PRINTED)[0] / n for n, C in up_to]
    assert all(abs(r - 1) < 0.1 for r in epoch) and min(epoch) == pytest.approx(0.916, abs=1e-3)
    assert all(0.3 < r < 0.8 for r in printed) and (min(printed), max(printed)) == pytest.approx((0.480, 0.765),
                                                                                                 abs=1e-3)


# ---------------------------------------------------------------- Approach 3
def law_runs(params, N, D):
    return ref.chinchilla_loss_reference(N, D, params)


def test_objective_value_and_gradient():
    """The Huber objective is 0 at the law that made noise-free runs; its analytic gradient matches central
    differences (log and linear space, Huber and MSE); the vectorised grid values equal the row-by-row ones."""
    p = {"E": 1.8, "A": 400.0, "B": 1500.0, "alpha": 0.33, "beta": 0.36}
    N, D = torch.logspace(4, 8, 7, dtype=F64).repeat(3), torch.logspace(6, 10, 21, dtype=F64)
    L = law_runs(p, N, D)
    logs = ref.scaling_logs(N, D, L)
    theta = ref.scaling_theta([p[n] for n in ref.SCALING_NAMES])
    assert ref.scaling_objective(theta, *logs)[0] == pytest.approx(0, abs=1e-25)
    shifted = theta + np.array([0.3, -0.2, 0.1, 0.01, -0.02])
    for space, loss in (("log", "huber"), ("log", "mse"), ("linear", "huber"), ("linear", "mse")):
        value, grad = ref.scaling_objective(shifted, *logs, 1e-3, space, loss)
        for i in range(5):
            step = np.zeros(5)
            step[i] = 1e-6
            numeric = (ref.scaling_objective(shifted + step, *logs, 1e-3, space, loss)[0]
                       - ref.scaling_objective(shifted - step, *logs, 1e-3, space, loss)[0]) / 2e-6
            assert numeric == pytest.approx(grad[i], rel=1e-5, abs=1e-9)
    grid = ref.scaling_grid()
    assert grid.shape == (4500, 5)
    rows = np.array([ref.scaling_objective(t, *logs)[0] for t in grid[::97]])
    assert np.allclose(ref.scaling_objective(grid[::97], *logs), rows, rtol=1e-12)


def test_fit_reference_recovers_known_laws():
    """Noise-free runs: the law that made them, to 1e-6. The check's noisy runs (0.2% noise, two outliers): within
    half the check's stated tolerances on these seeds (over 200 seeds the largest errors were E 3.9%, A 3.0%, B 9.4%,
    alpha 0.0031, beta 0.0060: tests/lab10_reference_notes.md)."""
    p = {"E": 2.1, "A": 350.0, "B": 900.0, "alpha": 0.31, "beta": 0.37}
    g = torch.Generator().manual_seed(3)
    N, D = 10 ** (4 + 4 * torch.rand(16, generator=g, dtype=F64)), 10 ** (6 + 4 * torch.rand(16, generator=g,
                                                                                           dtype=F64))
    found, value = ref.fit_scaling_law_reference(N, D, law_runs(p, N, D))
    assert value < 1e-20
    assert np.allclose(found, [p[n] for n in ref.SCALING_NAMES], rtol=1e-6)
    for seed in range(4):
        inputs = lab10.fit_inputs(seed)
        truth = [inputs["truth"][n] for n in ref.SCALING_NAMES]
        found, _ = ref.fit_scaling_law_reference(inputs["N"], inputs["D"], inputs["loss"], starts=[truth])
        for name, x, t in zip(ref.SCALING_NAMES, found, truth):
            error = abs(x - t) if name in ("alpha", "beta") else abs(x / t - 1)
            assert error < lab10.RECOVERY[name] / 2, (seed, name, x, t)


def test_default_lbfgs_stops_early():
    """Why the reference passes ftol = 1e-15: scipy's default (2.2e-9, relative to max(|f|, 1)) stops a refit of a
    resample a few steps from its start, since the Huber sums are of order 1e-4."""
    from scipy.optimize import minimize

    inputs = lab10.fit_inputs(0)
    logs = ref.scaling_logs(inputs["N"], inputs["D"], inputs["loss"])
    truth = [inputs["truth"][n] for n in ref.SCALING_NAMES]
    best, _ = ref.fit_scaling_law_reference(inputs["N"], inputs["D"], inputs["loss"], starts=[truth])
    index = np.asarray(ref.bootstrap_resamples(30, 1, 5)[0])
    resample = tuple(v[index] for v in logs)
    start = ref.scaling_theta(best)
    loose = minimize(ref.scaling_objective, start, args=resample, jac=True, method="L-BFGS-B")
    tight = minimize(ref.scaling_objective, start, args=resample, jac=True, method="L-BFGS-B",
                     options=ref.TIGHT_LBFGS)
    assert loose.fun < 1e-3 and loose.nit < tight.nit and tight.fun < loose.fun


def test_bootstrap_reference():
    """The lab's resampling rule is one seeded generator; the percentile intervals are torch.quantile's (linear
    interpolation) of the refits; without noise every refit is the law itself."""
    g = torch.Generator().manual_seed(11)
    assert all(torch.equal(a, torch.randint(20, (20,), generator=g)) for a in ref.bootstrap_resamples(20, 3, 11))
    fits = np.random.default_rng(0).normal(size=(10, 5))
    want = torch.tensor(fits).quantile(torch.tensor([0.025, 0.975], dtype=F64), dim=0)
    got = ref.percentile_intervals(fits)
    assert np.allclose([got[n] for n in ref.SCALING_NAMES], want.T.numpy(), rtol=1e-12)
    p = {"E": 2.1, "A": 350.0, "B": 900.0, "alpha": 0.31, "beta": 0.37}
    N, D = torch.logspace(4, 8, 6, dtype=F64).repeat_interleave(5), torch.logspace(6, 10, 5, dtype=F64).repeat(6)
    fits = ref.bootstrap_fits(N, D, law_runs(p, N, D), ref.bootstrap_resamples(30, 3, 0),
                              [p[n] for n in ref.SCALING_NAMES])
    assert np.allclose(fits, [[p[n] for n in ref.SCALING_NAMES]] * 3, rtol=1e-6)


# ---------------------------------------------------------------- Approach 2
def test_isoflop_reference():
    """An exact parabola in log N gives its vertex back; numpy.polyfit agrees with a least-squares solve."""
    runs = [{"N": math.exp(x), "D": 1.0, "C": 1e18, "loss": 2.0 + 0.1 * (x - 20.0) ** 2} for x in (17, 19, 20.5, 23)]
    runs += [{"N": math.exp(x), "D": 1.0, "C": 1e17, "loss": 3.0 + 0.3 * (x - 18.0) ** 2} for x in (16, 18.5, 19)]
    (C1, N1), (C2, N2) = ref.isoflop_reference(runs)
    assert (C1, C2) == (1e17, 1e18)
    assert math.log(N1) == pytest.approx(18.0, abs=1e-9) and math.log(N2) == pytest.approx(20.0, abs=1e-9)


# ---------------------------------------------------------------- a training step
def step_case(seed: int = 0):
    return lab10.step_inputs(seed)["cases"][0]


def test_saved_bytes_deterministic_and_ordered():
    """The count is the same twice; checkpointing and bfloat16 autocast save less; float16 saves what bfloat16 does;
    re-entrant checkpointing saves what the non-re-entrant one does; counting each tensor (not each storage) or the
    parameters, or leaving the loss outside, counts something else."""
    case = step_case()
    model, x, y = lab10.step_model(case), case["x"], case["y"]
    count = lambda *args, **kw: ref.train_step_reference(model, x, y, *args, **kw)["saved_bytes"]
    plain = count()
    assert plain == count() == 766_468
    assert count(None, True) == 100_868 < plain
    assert count(torch.bfloat16) == count(torch.float16) == 580_100 < plain
    assert len({plain, count(dedupe=False), count(parameters=True), count(loss_inside=False)}) == 4


def test_checkpointed_count_by_hand():
    """With each block checkpointed, what is saved inside a block is replaced by its input: the count drops by the
    blocks' own saved bytes and gains nothing else, since the input of block i is the output of block i - 1, a
    tensor the next checkpoint saves anyway (B x T x d_model float32, one per block)."""
    case = step_case()
    model, x, y = lab10.step_model(case), case["x"], case["y"]
    B, T = x.shape
    d = case["config"]["d_model"]
    inputs = len(model.blocks) * B * T * d * 4
    blocks_saved = []
    for block in model.blocks:
        seen = {}
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}

        def pack(t):
            if t.untyped_storage().data_ptr() not in params:
                seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t
        h = torch.randn(B, T, d, requires_grad=True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            block(h)
        blocks_saved.append(sum(seen.values()))
    plain = ref.train_step_reference(model, x, y)["saved_bytes"]
    checkpointed = ref.train_step_reference(model, x, y, None, True)["saved_bytes"]
    # the blocks' own saves include their input (the first norm saves it), which checkpointing keeps
    assert checkpointed == plain - sum(blocks_saved) + inputs


def test_step_gradients_against_plain_autograd():
    """The reference's gradients equal a plain forward and backward written here (no hooks), with checkpointing
    too; a float64 copy agrees to 1e-6 of the largest entry; bfloat16 autocast to 5e-2, float16 with its loss scale
    to 2e-2 (on the untied model with a small head, where float16 without the scale loses 100%)."""
    case = step_case()
    model, x, y = lab10.step_model(case), case["x"], case["y"]
    plain = copy.deepcopy(model)
    F.cross_entropy(plain(x).flatten(0, 1), y.flatten()).backward()
    want = {k: p.grad for k, p in plain.named_parameters()}
    for checkpointing in (False, True):
        got = ref.train_step_reference(model, x, y, None, checkpointing)["grads"]
        assert all(torch.allclose(got[k], want[k], rtol=0, atol=1e-7) for k in want)
    exact = ref.train_step_reference(lab10.step_model(case, F64), x, y)["grads"]
    assert all((exact[k] - want[k].double()).abs().max() <= 1e-6 * exact[k].abs().max() for k in want)
    bf16 = ref.train_step_reference(model, x, y, torch.bfloat16)["grads"]
    assert lab10.grads_problem(bf16, want, lab10.GRAD_RTOL["bfloat16"]) == ("", "")
    small = lab10.step_inputs(0)["cases"][1]
    tiny, x, y = lab10.step_model(small), small["x"], small["y"]
    want = ref.train_step_reference(tiny, x, y)["grads"]
    fp16 = ref.train_step_reference(tiny, x, y, torch.float16)["grads"]
    assert lab10.grads_problem(fp16, want, lab10.GRAD_RTOL["float16"]) == ("", "")
    unscaled = copy.deepcopy(tiny)
    with torch.autocast("cpu", dtype=torch.float16):
        loss = F.cross_entropy(unscaled(x).flatten(0, 1).float(), y.flatten())
    loss.backward()
    name, _ = lab10.grads_problem({k: p.grad for k, p in unscaled.named_parameters()}, want, 0.5)
    assert name  # without the scale, float16 gradients are far off


def test_fused_projection_views():
    """The fused-attention case saves views of one storage at different offsets (q, k and v of one projection):
    keying by the tensor's own data_ptr() counts that storage three times, the views' own bytes a third of it each;
    and the model has exactly the case's parameters."""
    case = lab10.step_inputs(0)["cases"][2]
    assert case["fused"]
    model, x, y = lab10.step_model(case), case["x"], case["y"]
    count = lambda **kw: ref.train_step_reference(model, x, y, **kw)["saved_bytes"]
    qkv = x.numel() * 3 * case["config"]["d_model"] * 4  # the fused projection's output, float32
    plain = count()
    assert count(key="tensor") == plain + 2 * qkv
    assert count(key="view") == plain - 2 * qkv // 3
    assert set(model.state_dict()) == set(case["weights"])


def test_bootstrap_slips_differ():
    """The interval kinds the check diagnoses all differ from the lab's, and from each other, on the check's runs."""
    inputs = lab10.fit_inputs(0)
    best, _ = ref.fit_scaling_law_reference(inputs["N"], inputs["D"], inputs["loss"])
    fits = ref.bootstrap_fits(inputs["N"], inputs["D"], inputs["loss"],
                              ref.bootstrap_resamples(30, inputs["n_boot"], inputs["seed"]), best)
    kinds = list(lab10.boot_kinds(fits).values())
    for i, a in enumerate(kinds):
        for b in kinds[i + 1:]:
            assert not lab10.intervals_match(a, b, 1e-2)
