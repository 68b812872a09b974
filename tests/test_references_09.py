"""The references of Lab 9's checks (model merging): mergekit 0.1.5's merge methods called through its public
``merge_tensors`` and its tensor-level functions (``sparsify``, ``get_mask``, ``slerp``), and peft 0.21.2's
``peft/utils/merge_utils.py`` loaded by path. Each is pinned here against numbers computed by hand, so that an
upgrade that changes a semantics fails a test; the tests named ``test_difference_*`` show, with numbers, where the
two libraries (or the DARE paper) disagree. The notes are in ``tests/lab09_reference_notes.md``."""
from __future__ import annotations

import importlib.metadata
import inspect
import math

import pytest
import torch
import torch.nn as nn

from labkit.checks import references as ref

F64 = torch.float64
T1 = torch.tensor([1.0, -2.0, 3.0, 0.0], dtype=F64)  # two task vectors of the hand-computed examples
T2 = torch.tensor([-3.0, 1.0, 1.0, 2.0], dtype=F64)
ZERO = torch.zeros(4, dtype=F64)


def t64(*values) -> torch.Tensor:
    return torch.tensor(values, dtype=F64)


def randn(seed: int, *shape, dtype=F64) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def exact(got, want):
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)


# ---------------------------------------------------------------- versions and loading
def test_versions_and_loading():
    """The pinned versions the notes describe; peft's merge_utils comes from the installed package's file, loaded
    under its own name, and needs nothing but torch."""
    assert importlib.metadata.version("mergekit") == "0.1.5"
    assert importlib.metadata.version("peft") == "0.21.2"
    pmu = ref.peft_merge_utils()
    assert pmu.__file__.replace("\\", "/").endswith("peft/utils/merge_utils.py")
    assert pmu.__name__ == "labkit_peft_merge_utils"
    for name in ("ties", "dare_linear", "dare_ties", "prune", "magnitude_based_pruning", "random_pruning",
                 "calculate_majority_sign_mask", "disjoint_merge"):
        assert callable(getattr(pmu, name))


def test_mergekit_entry_points_and_defaults():
    """The tensor-level functions the references call, and each method's defaults (``registry.py`` l. 60-95):
    "weight" has no default; normalize is True for ties only; rescale (L1) True for the DARE methods."""
    sparsify = ref._mergekit("sparsify")
    gta = ref._mergekit("merge_methods.generalized_task_arithmetic")
    slerp = ref._mergekit("merge_methods.slerp")
    methods = ref._mergekit("merge_methods")
    assert list(inspect.signature(sparsify.magnitude).parameters) == ["tensor", "density", "rescale_norm"]
    assert list(inspect.signature(sparsify.bernoulli).parameters) == ["tensor", "density", "rescale_norm"]
    assert list(inspect.signature(sparsify.rescaled_masked_tensor).parameters) == ["tensor", "mask", "norm", "eps"]
    assert inspect.signature(sparsify.rescaled_masked_tensor).parameters["eps"].default == 1e-7
    assert list(inspect.signature(gta.get_mask).parameters) == ["delta", "method", "mask_dtype"]
    params = inspect.signature(slerp.slerp).parameters
    assert list(params) == ["t", "v0", "v1", "dot_threshold", "eps"]
    assert (params["dot_threshold"].default, params["eps"].default) == (0.9995, 1e-8)
    want = {"task_arithmetic": (False, False), "ties": (True, False), "dare_linear": (False, True),
            "dare_ties": (False, True)}
    for name, (normalize, rescale) in want.items():
        spec = {p.name: p for p in methods.get(name).spec.parameters}
        assert (spec["normalize"].default, spec["rescale"].default, spec["lambda"].default) == (normalize, rescale, 1.0)
        assert spec["weight"].required and spec["density"].default == 1.0
    with pytest.raises(TypeError, match="Missing required parameter weight"):
        ref.mergekit_merge([ZERO, T1], "ties", {"density": 1.0}, base_index=0)


# ---------------------------------------------------------------- mergekit: linear and task arithmetic
def test_mergekit_linear():
    """sum w_i theta_i / sum w_i by default, the plain weighted sum with normalize=False."""
    a, b = t64(1.0, 0.0), t64(0.0, 3.0)
    exact(ref.mergekit_linear([a, b], [1.0, 3.0]), t64(0.25, 2.25))
    exact(ref.mergekit_linear([a, b], [1.0, 3.0], normalize=False), t64(1.0, 9.0))
    exact(ref.mergekit_linear([a, b]), t64(0.5, 1.5))


def test_mergekit_task_arithmetic():
    """base + lam sum w_i tau_i; normalize=True (not the default) divides by sum w_i."""
    base = t64(10.0, 20.0, 30.0, 40.0)
    exact(ref.mergekit_task_arithmetic(ZERO, [T1, T2], [1.0, 0.25]), t64(0.25, -1.75, 3.25, 0.5))
    exact(ref.mergekit_task_arithmetic(base, [base + T1, base + T2], [1.0, 0.25], lam=2.0),
          base + t64(0.5, -3.5, 6.5, 1.0))
    exact(ref.mergekit_task_arithmetic(ZERO, [T1, T2], [1.0, 0.25], normalize=True), t64(0.2, -1.4, 2.6, 0.4))


# ---------------------------------------------------------------- mergekit: trimming and sign election
def test_mergekit_trim_k():
    """k = max(1, int(density * numel)) of the largest |x|, per tensor; density <= 0 zeros, >= 1 the tensor."""
    x = t64(5.0, -4.0, 3.0, -2.0, 1.0)
    for density, want in ((0.1, t64(5, 0, 0, 0, 0)), (0.39, t64(5, 0, 0, 0, 0)), (0.4, t64(5, -4, 0, 0, 0)),
                          (0.8, t64(5, -4, 3, -2, 0)), (0.0, t64(0, 0, 0, 0, 0)), (1.0, x)):
        exact(ref.mergekit_trim(x, density), want)
    v = torch.arange(1, 101, dtype=F64).reshape(10, 10)  # distinct magnitudes; per tensor, over all 100 entries
    assert 0.29 * 100 < 29 and int(0.29 * 100) == 28  # int truncates a float product
    assert int((ref.mergekit_trim(v, 0.29) != 0).sum()) == 28
    assert ref.mergekit_trim(v, 0.29)[v > 72].eq(v[v > 72]).all()
    kept = ref.mergekit_trim(t64(1.0, 2.0, 3.0, 4.0), 0.5, rescale=True)  # L1 rescale: 10 / 7
    exact(kept, t64(0.0, 0.0, 3.0, 4.0) * (10 / 7))


def test_mergekit_trim_ranks_in_float32():
    """mergekit ranks |x| cast to float32 on the CPU: float64 values that are equal in float32 are ties, and one of
    them is kept whichever is largest in float64; peft's topk ranks in float64 and keeps the largest."""
    z = t64(1.0, 1.0 + 1e-12, 1.0 + 2e-12, 0.5)
    kept = ref.mergekit_trim(z, 0.25) != 0
    assert int(kept.sum()) == 1 and not kept[3]
    assert (ref.peft_merge_utils().magnitude_based_pruning(z, 0.25) != 0).tolist() == [False, False, True, False]


def test_mergekit_sign_mask():
    """True where sign(delta) = the elected sign; a sum of 0 elects +; zeros never agree."""
    deltas = torch.tensor([[1.0, -2.0, 0.0, 1.0, 2.0],
                           [-3.0, 1.0, 0.0, -1.0, 2.0]], dtype=F64)
    want = torch.tensor([[False, True, False, True, True],  # sums -2, -1, 0, 0, 4: elected -, -, +, +, +
                         [True, False, False, False, True]])
    assert torch.equal(ref.mergekit_sign_mask(deltas), want)
    count = ref.mergekit_sign_mask(torch.tensor([[3.0], [-1.0], [-1.0]]), method="count")
    assert count[:, 0].tolist() == [False, True, True]  # "count": two minus signs beat one plus
    assert ref.mergekit_sign_mask(torch.tensor([[3.0], [-1.0], [-1.0]]))[:, 0].tolist() == [True, False, False]


# ---------------------------------------------------------------- mergekit: TIES
def test_mergekit_ties_by_hand():
    """Weights 1 and 0.25: weighted deltas (1, -2, 3, 0) and (-0.75, 0.25, 0.25, 0.5), weighted sum (0.25, -1.75,
    3.25, 0.5), so the signs +, -, +, +; entry 0 keeps 1 / 1, entry 1 -2 / 1, entry 2 (3 + 0.25) / (1 + 0.25),
    entry 3 0.5 / 0.25 (the zero of T1 does not count)."""
    exact(ref.mergekit_ties(ZERO, [T1, T2], 1.0, [1.0, 0.25]), t64(1.0, -2.0, 2.6, 2.0))
    exact(ref.mergekit_ties(ZERO, [T1, T2], 1.0, [1.0, 0.25], lam=2.0), t64(2.0, -4.0, 5.2, 4.0))
    exact(ref.mergekit_ties(ZERO, [T1, T2], 1.0, [1.0, 0.25], normalize=False), t64(1.0, -2.0, 3.25, 0.5))
    base = t64(1.0, 1.0, 1.0, 1.0)
    exact(ref.mergekit_ties(base, [base + T1, base + T2], 1.0, [1.0, 0.25]), base + t64(1.0, -2.0, 2.6, 2.0))
    # A common weight cancels: the disjoint mean of the agreeing entries, the TIES paper's.
    for w in (1.0, 2.0, 0.1):
        exact(ref.mergekit_ties(ZERO, [T1, T2], 1.0, [w, w]), t64(-3.0, -2.0, 2.0, 2.0))
    # Trim at density 0.5 (k = 2 of 4): (4, -3, 0, 0) and (0, 2, -3, 0); sum (4, -1, -3, 0): +, -, -, +.
    a, b = t64(4.0, -3.0, 2.0, -1.0), t64(-1.0, 2.0, -3.0, 0.5)
    exact(ref.mergekit_ties(ZERO, [a, b], 0.5), t64(4.0, -3.0, -3.0, 0.0))
    exact(ref.mergekit_ties(ZERO, [a, b], [0.5, 1.0]), t64(4.0, -3.0, -3.0, 0.5))  # density per model
    # Opposite weights: the agreeing weights sum to 0, replaced by 1.
    exact(ref.mergekit_ties(ZERO, [T1, T2], 1.0, [1.0, -1.0]), t64(4.0, -3.0, 3.0, 2.0))


def ties_loop(base, tensors, density, weights, lam=1.0):
    """TIES as the lab states it, entry by entry in Python floats: trim each task vector to its
    max(1, int(density n)) largest |entries|, elect sign(sum_i w_i trimmed_i) (0 -> +), average the agreeing
    entries weighted by w_i."""
    n = base.numel()
    k = max(1, int(density * n))
    trimmed = []
    for t in tensors:
        tau = (t - base).reshape(-1).tolist()
        keep = set(sorted(range(n), key=lambda j: -abs(tau[j]))[:k])
        trimmed.append([tau[j] if j in keep else 0.0 for j in range(n)])
    out = []
    for j in range(n):
        total = sum(w * tr[j] for w, tr in zip(weights, trimmed))
        sign = 1.0 if total >= 0 else -1.0
        agree = [(w, tr[j]) for w, tr in zip(weights, trimmed) if tr[j] != 0 and math.copysign(1.0, tr[j]) == sign]
        divisor = sum(w for w, _ in agree) or 1.0
        out.append(lam * sum(w * v for w, v in agree) / divisor)
    return base + torch.tensor(out, dtype=F64).reshape(base.shape)


def test_mergekit_ties_random():
    """Three models of a (5, 7) tensor, density 0.3 (k = 10 of 35), weights 0.5, 1, 2, lam 0.7."""
    base = randn(0, 5, 7)
    tensors = [base + randn(s, 5, 7) for s in (1, 2, 3)]
    weights = [0.5, 1.0, 2.0]
    exact(ref.mergekit_ties(base, tensors, 0.3, weights, lam=0.7), ties_loop(base, tensors, 0.3, weights, lam=0.7))


# ---------------------------------------------------------------- mergekit: SLERP
def test_mergekit_slerp_by_hand():
    """Orthogonal a (norm 1) and b (norm 3), t = 0.5: theta = pi/2, both coefficients sin(pi/4) = 0.7071, applied
    to the raw tensors: (0.7071, 2.1213), norm sqrt(5) = 2.2361, not the interpolated norm 2."""
    a, b = t64(1.0, 0.0), t64(0.0, 3.0)
    r = ref.mergekit_slerp(a, b, 0.5)
    exact(r, t64(math.sqrt(0.5), 3 * math.sqrt(0.5)))
    assert abs(r.norm().item() - math.sqrt(5)) < 1e-12
    exact(ref.mergekit_slerp(a, b, 0.0), a)
    exact(ref.mergekit_slerp(a, b, 1.0), b)
    exact(ref.mergekit_slerp(a, b, 0.25), t64(math.cos(math.pi / 8), 3 * math.sin(math.pi / 8)))
    exact(ref.mergekit_slerp(a, b, 1.5), t64(-math.sqrt(0.5), 3 * math.sqrt(0.5)))  # t is not clamped


def test_mergekit_slerp_general_and_merge_path():
    """sin((1-t) theta)/sin theta a + sin(t theta)/sin theta b with cos theta of the normalised, flattened
    tensors; the same as the "slerp" merge method with a as its base, whose t runs from the base."""
    a, b = randn(4, 3, 5), randn(5, 3, 5) * 2.5
    cos = (a.flatten() @ b.flatten() / (a.norm() * b.norm())).item()
    theta = math.acos(cos)
    for t in (0.0, 0.3, 0.8):
        want = math.sin((1 - t) * theta) / math.sin(theta) * a + math.sin(t * theta) / math.sin(theta) * b
        exact(ref.mergekit_slerp(a, b, t), want)
        exact(ref.mergekit_merge([a, b], "slerp", {"t": t}, base_index=0), want)
        exact(ref.mergekit_merge([a, b], "slerp", {"t": 1 - t}, base_index=1), want)
    assert ref.mergekit_slerp(a.float(), b.float(), 0.3).dtype == torch.float32


def test_mergekit_slerp_whole_tensor_not_rows():
    """The whole matrix is one vector: (1, 0, 0, 1) and (0, 1, 0, 1) at 60 degrees, coefficients 1/sqrt(3).
    mergekit's ``slerp`` called directly on the 2-D tensors treats each row as its own vector instead."""
    A, B = t64(1.0, 0.0, 0.0, 1.0).reshape(2, 2), t64(0.0, 1.0, 0.0, 1.0).reshape(2, 2)
    exact(ref.mergekit_slerp(A, B, 0.5), (A + B) / math.sqrt(3))
    slerp = ref._mergekit("merge_methods.slerp").slerp
    rows = slerp(torch.tensor(0.5, dtype=F64), A, B)
    exact(rows, t64(math.sqrt(0.5), math.sqrt(0.5), 0.0, 1.0).reshape(2, 2))


def test_mergekit_slerp_edge_cases():
    """A zero (or norm <= eps) tensor is not normalised: cos = 0, theta = pi/2, so sin(t pi/2) b, not t b;
    antipodal and nearly parallel tensors (|cos| > 0.9995, strict) are linearly interpolated."""
    b = t64(0.0, 3.0)
    exact(ref.mergekit_slerp(torch.zeros(2, dtype=F64), b, 0.5), math.sin(math.pi / 4) * b)
    exact(ref.mergekit_slerp(torch.zeros(2, dtype=F64), b, 0.2), math.sin(0.1 * math.pi) * b)
    exact(ref.mergekit_slerp(t64(1e-9, 0.0), b, 0.5), math.sqrt(0.5) * t64(1e-9, 3.0))
    a = t64(1.0, 0.0)
    exact(ref.mergekit_slerp(a, -2 * a, 0.5), t64(-0.5, 0.0))
    for angle, linear in ((0.0315, True), (0.0317, False)):  # cos 0.999504 and 0.999498
        c = 2 * t64(math.cos(angle), math.sin(angle))
        lerp = 0.5 * a + 0.5 * c
        arc = math.sin(angle / 2) / math.sin(angle) * (a + c)
        exact(ref.mergekit_slerp(a, c, 0.5), lerp if linear else arc)
        assert linear or (arc - lerp).norm() > 1e-4  # the two branches differ visibly here


# ---------------------------------------------------------------- DARE: masks and rescaling
def test_dare_mask_is_bernoulli_and_rand():
    """One mask for everyone: bernoulli(full(1 - p)) from a seeded generator = rand < 1 - p from it; the draws
    depend on the dtype (float32 and float64 give different masks) but not on the shape."""
    for shape, p in (((300, 301), 0.9), ((7,), 0.5), ((3, 4, 5), 0.1)):
        for dtype in (torch.float32, F64):
            m = ref.dare_mask(shape, p, 11, dtype)
            r = torch.rand(shape, generator=torch.Generator().manual_seed(11), dtype=dtype) < 1 - p
            assert m.dtype == torch.bool and torch.equal(m, r)
    assert torch.equal(ref.dare_mask((6, 5), 0.3, 2).flatten(), ref.dare_mask((30,), 0.3, 2))
    assert not torch.equal(ref.dare_mask((1000,), 0.5, 3), ref.dare_mask((1000,), 0.5, 3, F64))


def test_mergekit_rescale_by_hand():
    """(1, 2, 3, 4) keeping entries 0 and 2: L1 rescale 10 / 4 gives (2.5, 0, 7.5, 0); below 1e-7 no rescale."""
    v, m = t64(1.0, 2.0, 3.0, 4.0), torch.tensor([True, False, True, False])
    exact(ref.mergekit_rescale(v, m), t64(2.5, 0.0, 7.5, 0.0))
    exact(ref.mergekit_rescale(v, m, "l2"), t64(1.0, 0.0, 3.0, 0.0) * math.sqrt(30 / 10))
    exact(ref.mergekit_rescale(v, torch.zeros(4, dtype=torch.bool)), ZERO)
    exact(ref.mergekit_rescale(t64(1e-8, 2e-8), torch.tensor([True, False])), t64(1e-8, 0.0))


def test_mergekit_dare_given_the_mask():
    """mergekit's DARE after manual_seed(seed) = the L1 rescale of :func:`dare_mask` (float32): exactly for a
    float32 vector; to float32 precision for a float64 one (mergekit computes in float32)."""
    v32 = randn(7, 40, 50, dtype=torch.float32)
    exact(ref.mergekit_dare(v32, 0.7, 5), ref.mergekit_rescale(v32, ref.dare_mask(v32.shape, 0.7, 5)))
    v = randn(7, 40, 50)
    got, want = ref.mergekit_dare(v, 0.7, 5), ref.mergekit_rescale(v, ref.dare_mask(v.shape, 0.7, 5))
    assert got.dtype == F64 and torch.equal(got != 0, want != 0)
    error = ((got - want).abs().max() / want.abs().max()).item()
    assert 0 < error < 1e-6
    exact(ref.mergekit_dare(v, 0.7, 5, rescale=False), v.float().double() * ref.dare_mask(v.shape, 0.7, 5))
    exact(ref.mergekit_dare(v, 0.0, 5), v)  # density 1: untouched
    exact(ref.mergekit_dare(v, 1.0, 5), torch.zeros_like(v))  # everything dropped: zeros, no rescale


def test_peft_dare_given_the_mask():
    """peft: the mask drawn in the vector's dtype, kept entries / (1 - p); p = 1 gives NaN (0 / 0)."""
    v = randn(8, 40, 50)
    exact(ref.peft_dare(v, 0.7, 5), v * ref.dare_mask(v.shape, 0.7, 5, F64) / 0.3)
    v32 = v.float()
    exact(ref.peft_dare(v32, 0.7, 5), v32 * ref.dare_mask(v.shape, 0.7, 5) / torch.tensor(0.3, dtype=torch.float32))
    assert ref.peft_dare(t64(1.0, 2.0), 1.0, 0).isnan().all()


def test_seeded_references_leave_the_global_generator_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    ref.mergekit_dare(randn(1, 10), 0.5, 9)
    ref.peft_dare(randn(1, 10), 0.5, 9)
    assert torch.equal(torch.rand(3), expected)


def test_dare_merges():
    """dare_linear / dare_ties of both libraries: the task vectors' masks come one after the other from one
    stream seeded once (first model first); mergekit's dare_ties does not normalise by default."""
    base = randn(0, 6, 5, dtype=torch.float32)
    tensors = [base + randn(s, 6, 5, dtype=torch.float32) for s in (1, 2)]
    taus = [t - base for t in tensors]
    g = torch.Generator().manual_seed(4)
    masks = [torch.rand(6, 5, generator=g) < 0.4 for _ in taus]  # p = 0.6
    w = [0.5, 1.5]
    l1 = [ref.mergekit_rescale(tau, m) for tau, m in zip(taus, masks)]
    torch.testing.assert_close(ref.mergekit_dare_merge(base, tensors, 0.6, 4, w),
                               base + w[0] * l1[0] + w[1] * l1[1], atol=1e-6, rtol=0)
    weighted = torch.stack([w[0] * l1[0], w[1] * l1[1]])
    agree = ref.mergekit_sign_mask(weighted)
    torch.testing.assert_close(ref.mergekit_dare_merge(base, tensors, 0.6, 4, w, ties=True),
                               base + (weighted * agree).sum(0), atol=1e-6, rtol=0)
    inverse = [tau * m / torch.tensor(0.4) for tau, m in zip(taus, masks)]
    torch.testing.assert_close(ref.peft_dare_merge(base, tensors, 0.6, 4, w),
                               base + w[0] * inverse[0] + w[1] * inverse[1], atol=1e-6, rtol=0)
    stacked = torch.stack(inverse)
    agree = ref.peft_merge_utils().calculate_majority_sign_mask(stacked)  # unweighted election
    want = (torch.stack([w[0] * inverse[0], w[1] * inverse[1]]) * agree).sum(0) / agree.sum(0).clamp(min=1)
    torch.testing.assert_close(ref.peft_dare_merge(base, tensors, 0.6, 4, w, ties=True), base + want,
                               atol=1e-6, rtol=0)


# ---------------------------------------------------------------- peft by hand
def test_peft_ties_by_hand():
    """peft, weights 1 and 0.25: the unweighted trimmed sum (-2, -1, 4, 2) elects -, -, +, +; entry 0 keeps
    0.25 * -3 = -0.75 over 1 entry, entry 2 (3 + 0.25) / 2 entries, entry 3 0.25 * 2 / 1."""
    exact(ref.peft_ties(ZERO, [T1, T2], 1.0, [1.0, 0.25]), t64(-0.75, -2.0, 1.625, 0.5))
    exact(ref.peft_ties(ZERO, [T1, T2], 1.0, [2.0, 2.0]), t64(-6.0, -4.0, 4.0, 4.0))
    a, b = t64(4.0, -3.0, 2.0, -1.0), t64(-1.0, 2.0, -3.0, 0.5)
    exact(ref.peft_ties(ZERO, [a, b], 0.5), t64(4.0, -3.0, -3.0, 0.0))
    pmu = ref.peft_merge_utils()
    stacked = torch.stack([T1, T2])
    assert pmu.calculate_majority_sign_mask(stacked).tolist() == [[False, True, True, False], [True, False, True, True]]
    assert pmu.calculate_majority_sign_mask(torch.stack([t64(3.0), t64(-1.0), t64(-1.0)]), "frequency")[:, 0].tolist() \
        == [False, True, True]
    exact(pmu.disjoint_merge(stacked, stacked != 0), t64(-1.0, -0.5, 2.0, 2.0))  # a count: 0 is not counted


# ---------------------------------------------------------------- the differences, with numbers
def test_difference_ties_weighted_election_and_divisor():
    """Same inputs, weights (1, 0.25): mergekit (1, -2, 2.6, 2), peft (-0.75, -2, 1.625, 0.5). Entry 0: mergekit
    elects + (0.25 = 1 - 0.75 weighted), peft - (1 - 3 unweighted). Entry 2: weight-sum divisor 3.25 / 1.25 vs
    count divisor 3.25 / 2. Entry 3: 0.5 / 0.25 = 2 vs 0.5 / 1."""
    mk = ref.mergekit_ties(ZERO, [T1, T2], 1.0, [1.0, 0.25])
    pf = ref.peft_ties(ZERO, [T1, T2], 1.0, [1.0, 0.25])
    assert mk.tolist() == [1.0, -2.0, 2.6, 2.0] and pf.tolist() == [-0.75, -2.0, 1.625, 0.5]


def test_difference_ties_common_weight():
    """With one weight w for all: mergekit's result does not depend on w (the disjoint mean), peft's is w times
    it; at w = 1 they agree, here on random (5, 7) tensors at density 0.3."""
    base = randn(10, 5, 7)
    tensors = [base + randn(s, 5, 7) for s in (11, 12, 13)]
    one = ref.mergekit_ties(base, tensors, 0.3)
    exact(ref.peft_ties(base, tensors, 0.3), one)
    exact(ref.mergekit_ties(base, tensors, 0.3, [3.0] * 3), one)
    exact(ref.peft_ties(base, tensors, 0.3, [3.0] * 3) - base, 3 * (one - base))


def test_difference_trim_k():
    """density 0.1 of 5 entries: int(0.5) = 0; mergekit keeps max(1, 0) = 1 entry, peft none. At a tie on the
    threshold each keeps one of the tied entries, by argsort (mergekit) or topk (peft)."""
    x = t64(5.0, -4.0, 3.0, -2.0, 1.0)
    exact(ref.mergekit_trim(x, 0.1), t64(5.0, 0.0, 0.0, 0.0, 0.0))
    exact(ref.peft_merge_utils().prune(x, 0.1, "magnitude"), torch.zeros(5, dtype=F64))
    y = t64(1.0, 2.0, 2.0, 2.0, 3.0)
    for kept in (ref.mergekit_trim(y, 0.4), ref.peft_merge_utils().prune(y, 0.4, "magnitude")):
        assert kept[4] == 3.0 and int((kept[1:4] != 0).sum()) == 1 and kept[0] == 0


def test_difference_dare_inverse_vs_l1():
    """The same mask on (1, 2, 3, 4), p = 0.5, entries 0 and 2 kept: 1 / (1 - p) gives (2, 0, 6, 0), L1 norm 8;
    mergekit's L1 rescale (2.5, 0, 7.5, 0), L1 norm 10 as before the drop. On a large vector the two scales
    agree to about a percent: the L1 one is exact per sample, the inverse one unbiased per entry."""
    v, m = t64(1.0, 2.0, 3.0, 4.0), torch.tensor([True, False, True, False])
    exact(v * m / 0.5, t64(2.0, 0.0, 6.0, 0.0))
    exact(ref.mergekit_rescale(v, m), t64(2.5, 0.0, 7.5, 0.0))
    big = randn(3, 100_000)
    mask = ref.dare_mask(big.shape, 0.9, 0)
    l1 = ref.mergekit_rescale(big, mask)
    assert abs(l1.abs().sum() / big.abs().sum() - 1) < 1e-12
    factors = l1[mask] / big[mask]  # one factor ||v||_1 / ||kept||_1 for every kept entry
    assert (factors - factors[0]).abs().max() < 1e-12
    assert 0 < abs(factors[0].item() - 10.0) < 0.3


def test_difference_dare_mask_dtype():
    """On a float64 vector with the same seed the libraries drop different entries: mergekit draws float32,
    peft float64. On a float32 vector they drop the same ones."""
    v = randn(9, 2000)
    mk, pf = ref.mergekit_dare(v, 0.5, 1) != 0, ref.peft_dare(v, 0.5, 1) != 0
    assert not torch.equal(mk, pf)
    v32 = v.float()
    assert torch.equal(ref.mergekit_dare(v32, 0.5, 1) != 0, ref.peft_dare(v32, 0.5, 1) != 0)


# ---------------------------------------------------------------- state dicts and weight matching
def test_mergekit_state_dicts():
    """Float entries merged by mergekit, integer buffers from the base; mergekit's own merge_state_dicts refuses
    integer buffers that differ."""
    sd = lambda w, n: {"w": t64(w, 2 * w), "n": torch.tensor(n)}
    merged = ref.mergekit_state_dicts([sd(1.0, 3), sd(3.0, 4)], "linear", {"weight": [1.0, 1.0]})
    exact(merged["w"], t64(2.0, 4.0))
    assert merged["n"].item() == 3 and list(merged) == ["w", "n"]
    with pytest.raises(ValueError, match="differs between inputs"):
        ref._mergekit("merge_methods").merge_state_dicts([sd(1.0, 3), sd(3.0, 4)], "linear",
                                                         parameters={"weight": [1.0, 1.0]})


def test_weight_matching_brute_force():
    """b = a with its hidden units permuted by p (b's unit j is a's unit p[j]): the matching is p's inverse and
    undoes it; on an unrelated pair, scipy's linear_sum_assignment of the same similarity finds the optimum."""
    from scipy.optimize import linear_sum_assignment

    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(3, 6), nn.ReLU(), nn.Linear(6, 2)).double()
    p = [2, 0, 5, 1, 3, 4]
    b = ref.permute_hidden(a, p)
    x = randn(1, 4, 3)
    exact(b(x), a(x))
    perm, matched = ref.weight_matching_brute_force(a, b)
    assert list(perm) == torch.argsort(torch.tensor(p)).tolist()
    for (_, ta), (_, tb) in zip(a.state_dict().items(), matched.state_dict().items()):
        exact(tb, ta)
    c = nn.Sequential(nn.Linear(3, 6), nn.ReLU(), nn.Linear(6, 2)).double()
    perm, matched = ref.weight_matching_brute_force(a, c)
    score = (a[0].weight @ c[0].weight.T + a[0].bias[:, None] * c[0].bias[None] + a[2].weight.T @ c[2].weight)
    _, cols = linear_sum_assignment(score.detach().numpy(), maximize=True)
    assert list(perm) == cols.tolist()
    exact(matched(x), c(x))
