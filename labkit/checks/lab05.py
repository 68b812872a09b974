"""Checks of Lab 5: mixture of experts, against transformers' Mixtral, Qwen2-MoE and DeepSeek-V3 modules.

References: transformers' ``MixtralTopKRouter``, ``MixtralSparseMoeBlock`` and ``MixtralExperts`` (eager experts),
``load_balancing_loss_func`` (its value and, by autograd, its gradient), ``Qwen2MoeSparseMoeBlock`` and
``DeepseekV3TopkRouter``, with the check's weights copied in; capacity as a plain loop over the assignments
(``references.capacity_kept``); the closed forms of the balancing loss (k for a uniform router, E for a collapsed
one) and the stated rule of DeepSeek-V3's bias update; Mixture of Recursions as a plain, differentiable loop in
float64 (``references.mixture_of_recursions``: outputs and the routers' gradients), with a stand-in block that
records which tokens it is given. Expert parallelism is also checked for its traffic: all_to_all_single is
wrapped to count the token rows each rank sends and receives, and to zero them on arrival in a second run.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from labkit.checks import (as_tensor, assert_bf16_close, close, compare, define, doubled, linear_weights, mlp_weights,
                           raised, references as ref, seeded_generator, table_inputs)
from labkit.checks.kernel import attempt, build, run_cases

MOE_HINT = ("y_n = sum over the token's k experts of g * SwiGLU_e(x_n), with SwiGLU_e(x) = (silu(x W_gate^T) * "
            "(x W_up^T)) down_proj[e]^T, the gate's rows first in gate_up_proj[e]")
SORTED_ROWS = ("the results are added in the sorted order: the p-th assignment of the list sorted by expert went "
               "to token p // k. Add each result at its own token's row (index_add_ at the tokens of the group)")
NOT_RENORMALISED = ("the weights are not renormalised: divide the k probabilities by their sum, so that a token's "
                    "weights sum to 1 (Mixtral)")
GATE_UP_SWAPPED = ("gate and up are swapped: gate_up_proj[e] holds the gate's I rows first, then the up "
                   "projection's, and the SiLU goes on the gate")
SOFTMAX_BF16 = ("the softmax is computed in bfloat16: compute it in float32 (logits.float().softmax(-1)), as "
                "transformers does, and return float32 weights")


# ---------------------------------------------------------------- shared helpers (verify side)
def moe_weights(g: torch.Generator, E: int, D: int, I: int) -> dict:
    """A SparseMoE's weights: ``router.weight`` (E, D), ``gate_up_proj`` (E, 2I, D), ``down_proj`` (E, D, I)."""
    return {"router.weight": torch.randn(E, D, generator=g) / math.sqrt(D),
            "gate_up_proj": torch.randn(E, 2 * I, D, generator=g) / math.sqrt(D),
            "down_proj": torch.randn(E, D, I, generator=g) / math.sqrt(I)}


def routable(draw, n: int, weight: torch.Tensor, k: int, margin: float = 1e-3) -> torch.Tensor:
    """n rows drawn by ``draw(n)``, those whose k-th and (k+1)-th router logits are within ``margin`` redrawn, so
    that float32 and float64 choose the same experts. A bfloat16 draw is judged on its bfloat16 logits, where
    ``margin=0`` rejects exact ties."""
    x = draw(n)
    for _ in range(100):
        z = F.linear(x, weight.to(x.dtype)) if x.dtype == torch.bfloat16 else x.double() @ weight.double().T
        if k >= z.shape[-1]:
            return x
        top = z.double().topk(k + 1, dim=-1).values
        bad = top[:, k - 1] - top[:, k] <= margin
        if not bad.any():
            return x
        x[bad] = draw(int(bad.sum()))
    raise RuntimeError("could not draw inputs with clear top-k choices")


def unpack(what: str, got, names: tuple[str, ...]) -> tuple:
    """The tuple a forward returned, or an ``AssertionError`` saying what came back instead."""
    if raised(got):
        raise AssertionError(f"{what} raised {raised(got)}")
    if not isinstance(got, (tuple, list)) or len(got) != len(names):
        found = f"a {type(got).__name__}" + (f" of {len(got)}" if isinstance(got, (tuple, list)) else "")
        raise AssertionError(f"{what}: returned {found}; it must return ({', '.join(names)})")
    return tuple(got)


def by_expert(what: str, weights, indices, shape: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """A token's chosen experts as a set: the indices sorted per row, and the weights that go with them."""
    i = as_tensor(f"{what}: indices", indices, shape).long()
    w = as_tensor(f"{what}: weights", weights, shape)
    order = i.argsort(dim=-1)
    return i.gather(-1, order), w.gather(-1, order)


def moe_loop(weights: dict, x: torch.Tensor, indices: torch.Tensor, gates: torch.Tensor, sorted_rows: bool = False,
             swapped: bool = False) -> torch.Tensor:
    """(N, D) float64: each assignment's gate times its expert's SwiGLU, one assignment at a time, for diagnoses:
    ``sorted_rows`` adds the p-th assignment of the list sorted by expert at row p // k (results never put back in
    token order); ``swapped`` exchanges the gate's and the up projection's rows."""
    w, x, k = doubled(weights), x.double(), indices.shape[1]
    y, flat, g = torch.zeros_like(x), indices.flatten(), gates.double().flatten()
    for p, a in enumerate(flat.argsort(stable=True).tolist()):
        e = int(flat[a])
        gate, up = (x[a // k] @ w["gate_up_proj"][e].T).chunk(2)
        if swapped:
            gate, up = up, gate
        y[p // k if sorted_rows else a // k] += g[a] * ((F.silu(gate) * up) @ w["down_proj"][e].T)
    return y


# ---------------------------------------------------------------- 1. the router
def router_cases(g: torch.Generator, configs=((16, 8, 2, 40), (16, 8, 1, 40), (12, 4, 4, 10)),
                 bf16=((32, 8, 2, 64),)) -> list[dict]:
    cases = []  # (d_model, n_experts, k, tokens)
    for (D, E, k, N), half in [(c, False) for c in configs] + [(c, True) for c in bf16]:
        weight = torch.randn(E, D, generator=g) / math.sqrt(D)
        dtype = torch.bfloat16 if half else torch.float32
        x = routable(lambda n: torch.randn(n, D, generator=g).to(dtype), N, weight.to(dtype), k, 0 if half else 1e-3)
        what = f"TopKRouter({D}, {E}, {k})" + (" in bfloat16 on a bfloat16" if half else " on") + f" ({N}, {D})"
        cases.append({"what": what + (" (k = E)" if k == E else ""), "init": [D, E, k], "weights": {"weight": weight},
                      "args": [x]} | ({"dtype": torch.bfloat16} if half else {}))
    return cases


@define("05.router", table_inputs(router_cases), run_cases)
def router(inputs: dict, out: dict) -> str:
    for case, got in zip(inputs["cases"], out["outputs"], strict=True):
        what, x, k = case["what"], case["args"][0], case["init"][2]
        logits, weights, indices = unpack(f"{what}: forward", got, ("router_logits", "weights", "indices"))
        z, w, i = ref.mixtral_router(case["weights"]["weight"], x, k)
        by = "transformers' MixtralTopKRouter" + (" in bfloat16" if x.dtype == torch.bfloat16 else "")
        if x.dtype == torch.bfloat16:
            assert_bf16_close(f"{what}: router_logits (vs {by})", logits, z, "x @ weight.T, in x's dtype (bfloat16)")
            if not torch.equal(logits, z):  # a rounding apart: Mixtral's rule on the student's own logits
                w, i = ref.router_weights(logits, k)
            if isinstance(weights, torch.Tensor) and weights.dtype != torch.float32:
                right = weights.dtype == torch.bfloat16 and close_sets(weights, indices, w.bfloat16(), i)
                raise AssertionError(f"{what}: weights are {weights.dtype}, expected torch.float32. " + (
                    "Return them in float32, as the softmax gives them (do not cast them to x's dtype)" if right
                    else SOFTMAX_BF16))
        else:
            compare(f"{what}: router_logits (vs {by})", logits, z, 1e-5, hint="x @ weight.T, shape (N, E)")
        got_i, got_w = by_expert(what, weights, indices, (x.shape[0], k))
        want_i, want_w = by_expert(what, w, i, (x.shape[0], k))
        compare(f"{what}: the k experts chosen for each token (indices, compared as sets; vs {by})", got_i, want_i, 0,
                hint="the k largest probabilities of the softmax over the E experts (topk along the last axis)",
                suspects={"the softmax runs over the tokens (dim=0); it runs over the experts (dim=-1)":
                          z.float().softmax(dim=0).topk(k, dim=-1).indices.sort(dim=-1).values})
        compare(f"{what}: weights of the chosen experts (vs {by})", got_w, want_w,
                1e-6 if x.dtype == torch.bfloat16 else 1e-5,
                hint="softmax over the E experts in float32, keep the k largest, divide them by their sum",
                suspects=router_suspects(what, z, k, want_i.shape))
    return ("logits, chosen experts and renormalised weights match transformers' MixtralTopKRouter, for k = 1, 2 and "
            "E; the softmax is float32 in a bfloat16 model")


def close_sets(weights: torch.Tensor, indices, want_w: torch.Tensor, want_i: torch.Tensor) -> bool:
    """Whether (weights, indices) equal (want_w, want_i) as sets of experts with their weights."""
    try:
        got, want = by_expert("", weights, indices, want_w.shape), by_expert("", want_w, want_i, want_w.shape)
    except AssertionError:
        return False
    return torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def router_suspects(what: str, z: torch.Tensor, k: int, shape) -> dict:
    top = z.float().softmax(dim=-1).topk(k, dim=-1)
    suspects = {NOT_RENORMALISED: lambda: by_expert(what, top.values, top.indices, shape)[1]}
    if z.dtype == torch.bfloat16:
        half = z.softmax(dim=-1).topk(k, dim=-1)
        suspects[SOFTMAX_BF16] = lambda: by_expert(what, (half.values / half.values.sum(-1, keepdim=True)).float(),
                                                   half.indices, shape)[1]
        suspects[SOFTMAX_BF16 + " (renormalising in float32 afterwards does not undo its rounding)"] = (
            lambda: by_expert(what, half.values.float() / half.values.float().sum(-1, keepdim=True), half.indices,
                              shape)[1])
    return suspects


# ---------------------------------------------------------------- 2. the sparse MoE layer, and capacity
def moe_case(g: torch.Generator, D: int, I: int, E: int, k: int, shape: tuple, offsets=None, what: str = "",
             **extra) -> dict:
    """SparseMoE(D, I, E, k) on x of shape + (D,). ``offsets`` (E,) skews the routing: x[..., 0] is then 1 (a
    constant feature) and expert e's router weight on it ``offsets[e]``."""
    weights = moe_weights(g, E, D, I)

    def draw(n: int) -> torch.Tensor:
        x = torch.randn(n, D, generator=g)
        if offsets is not None:
            x[:, 0] = 1.0
        return x

    if offsets is not None:
        weights["router.weight"][:, 0] = torch.tensor(offsets, dtype=torch.float32)
    x = routable(draw, math.prod(shape), weights["router.weight"], k).view(*shape, D)
    return {"what": f"SparseMoE({D}, {I}, {E}, {k}) on {tuple(x.shape)}{what}", "init": [D, I, E, k],
            "weights": weights, "args": [x], "k": k} | extra


def sparse_moe_inputs(seed: int, count: bool = True, configs=None) -> dict:
    g = seeded_generator(seed)  # (d_model, d_ff, n_experts, k, shape, offsets, what)
    configs = configs or [(16, 24, 8, 2, (2, 5), None, ""), (16, 24, 4, 1, (3, 4), None, " (k = 1)"),
                          (8, 12, 16, 4, (2, 8), None, " (16 experts, k = 4)"),
                          (8, 12, 6, 2, (1, 5), [0.0] * 5 + [-8.0], " (expert 5 receives no token)")]
    inputs = {"cases": [moe_case(g, *c[:5], offsets=c[5], what=c[6]) for c in configs]}
    if count:  # a forward whose matrix products collect counts
        inputs["count"] = moe_case(g, 8, 8, 4, 2, (2, 48), what=", counting its matrix products")
    return inputs


def sparse_moe_collect(inputs: dict, SparseMoE) -> dict:
    """The cases' outputs, and the number of matrix products one forward makes (a loop over tokens makes many)."""
    out = run_cases(inputs, SparseMoE)
    if "count" not in inputs:
        return out

    class Products(torch.overrides.TorchFunctionMode):
        NAMES = {"matmul", "__matmul__", "__rmatmul__", "mm", "bmm", "linear", "einsum", "addmm", "baddbmm", "addbmm",
                 "mv", "addmv", "dot", "vdot", "inner", "tensordot", "chain_matmul", "multi_dot", "bilinear"}

        def __init__(self):
            super().__init__()
            self.count = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            self.count += getattr(func, "__name__", "") in self.NAMES
            return func(*args, **(kwargs or {}))

    case = inputs["count"]
    moe = attempt(build, SparseMoE, case["weights"], case["what"], *case["init"])
    if isinstance(moe, dict):
        out["count"] = {"out": moe, "products": -1}
        return out
    with torch.no_grad(), Products() as products:
        y = attempt(moe, *case["args"])
    out["count"] = {"out": y, "products": products.count}
    return out


def check_moe(case: dict, got) -> None:
    """The case's (y, router_logits) against MixtralSparseMoeBlock and its MixtralTopKRouter."""
    what, w, x, k = case["what"], case["weights"], case["args"][0], case["k"]
    y, logits = unpack(f"{case['what']}: forward", got, ("y", "router_logits"))
    want_y, want_logits = ref.mixtral_moe(w, x, k)
    compare(f"{what}: router_logits (vs transformers' MixtralTopKRouter)", logits, want_logits, 1e-5,
            hint="the router's logits for the B T tokens flattened, shape (B T, E)")
    flat = x.reshape(-1, x.shape[-1])
    _, gates, indices = ref.mixtral_router(w["router.weight"], flat, k)
    top = want_logits.float().softmax(dim=-1).topk(k, dim=-1)
    compare(f"{what}: y (vs transformers' MixtralSparseMoeBlock)", y, want_y, 1e-5, MOE_HINT, {
        SORTED_ROWS: lambda: moe_loop(w, flat, indices, gates, sorted_rows=True).view(x.shape),
        NOT_RENORMALISED: lambda: moe_loop(w, flat, top.indices, top.values).view(x.shape),
        GATE_UP_SWAPPED: lambda: moe_loop(w, flat, indices, gates, swapped=True).view(x.shape)})


@define("05.sparse_moe", sparse_moe_inputs, sparse_moe_collect)
def sparse_moe(inputs: dict, out: dict) -> str:
    for case, got in zip(inputs["cases"], out["outputs"], strict=True):
        check_moe(case, got)
    if "count" in inputs:
        case, got = inputs["count"], out["count"]
        check_moe(case, got["out"])
        (B, T, _), E = case["args"][0].shape, case["init"][2]
        limit = 4 * E + 4
        if got["products"] > limit:
            raise AssertionError(
                f"{case['what']}: one forward on {B * T} tokens made {got['products']} matrix products (@, "
                "torch.matmul, F.linear, torch.mm, torch.bmm, torch.einsum...); grouped by expert it takes about 2 "
                f"per expert and 1 for the router ({2 * E + 1} here, at most {limit} pass). This is a loop over "
                "tokens (or assignments): sort the assignments by expert and run each expert once, on all its tokens")
    return ("matches transformers' MixtralSparseMoeBlock and its router's logits (k = 1, 2, 4; an idle expert), with "
            "one matrix product per expert, not per token")


def capacity_inputs(seed: int, factors=(0.5, 1.0, 1.25, 2.0), k1: bool = True, none: bool = True) -> dict:
    g = seeded_generator(seed)  # skewed: experts 0 and 1 get most tokens; N k / E = 11, so ceil and floor differ
    base = moe_case(g, 8, 12, 4, 2, (2, 11), offsets=[2.0, 1.0, 0.0, 0.0])
    cases = [base | {"init_kwargs": {"capacity_factor": cf}} for cf in factors]
    if k1:
        cases.append(moe_case(g, 8, 12, 4, 1, (1, 13), offsets=[1.5, 0.0, 0.0, 0.0]) | {
            "init_kwargs": {"capacity_factor": 1.0}})
    if none:
        cases.append(base | {"init_kwargs": {"capacity_factor": None}})
    for case in cases:
        x, (D, I, E, k), cf = case["args"][0], case["init"], case["init_kwargs"]["capacity_factor"]
        N = x.shape[:2].numel()
        case["capacity"] = None if cf is None else math.ceil(cf * N * k / E)
        case["what"] = f"SparseMoE({D}, {I}, {E}, {k}, capacity_factor={cf}) on {tuple(x.shape)}" + (
            " (nothing dropped)" if cf is None else
            f" (capacity ceil({cf} · {N} · {k} / {E}) = {case['capacity']} assignments per expert)")
    return {"cases": cases}


def capacity_collect(inputs: dict, SparseMoE) -> dict:
    """Each case's output and the module's last_drop_rate after it (a float, or a 0-d tensor made a float); with a
    capacity, the same module's last_drop_rate after two more calls where nothing is dropped: with capacity_factor
    set to None, then with it back, on the case's first token alone."""
    outputs = []
    for case in inputs["cases"]:
        moe = attempt(build, SparseMoE, case["weights"], case["what"], *case["init"], **case["init_kwargs"])
        if isinstance(moe, dict):
            outputs.append({"out": moe, "drop_rate": moe, "again": []})
            continue
        rate = lambda: float(moe.last_drop_rate)
        with torch.no_grad():
            y = attempt(moe, *case["args"])
            got = {"out": y, "drop_rate": attempt(rate), "again": []}
            if case["init_kwargs"]["capacity_factor"] is not None:
                done = attempt(setattr, moe, "capacity_factor", None)
                done = done if isinstance(done, dict) else attempt(moe, *case["args"])
                got["again"].append(done if isinstance(done, dict) else attempt(rate))
                done = attempt(setattr, moe, "capacity_factor", case["init_kwargs"]["capacity_factor"])
                done = done if isinstance(done, dict) else attempt(moe, case["args"][0][:1, :1])
                got["again"].append(done if isinstance(done, dict) else attempt(rate))
        outputs.append(got)
    return {"outputs": outputs}


@define("05.capacity", capacity_inputs, capacity_collect)
def capacity(inputs: dict, out: dict) -> str:
    for case, got in zip(inputs["cases"], out["outputs"], strict=True):
        what, w, x, k, C = case["what"], case["weights"], case["args"][0], case["k"], case["capacity"]
        flat, N, E = x.reshape(-1, x.shape[-1]), x.shape[:2].numel(), case["init"][2]
        cf = case["init_kwargs"]["capacity_factor"]
        _, gates, indices = ref.mixtral_router(w["router.weight"], flat, k)

        def variant(kept: torch.Tensor, renormalise: bool = False) -> tuple[torch.Tensor, float]:
            g = gates.double() * kept
            if renormalise:
                total = g.sum(dim=-1, keepdim=True)
                g = torch.where(total > 0, g / total.clamp_min(1e-300), g)
            return ref.mixtral_experts(w, flat, indices, g).view(x.shape), 1 - kept.sum().item() / (N * k)

        kept = ref.capacity_kept(indices, E, C)
        want, rate = variant(kept)
        wrong = {}
        if C is not None:
            wrong = {f"it keeps each expert's LAST {C} assignments: keep the first ones, in token order (a stable sort "
                     "keeps the tokens in order within each expert's group)": (ref.capacity_kept(indices, E, C, True),),
                     f"the capacity is computed without k: it counts assignments, ceil(capacity_factor · N · k / E) = "
                     f"{C}": (ref.capacity_kept(indices, E, math.ceil(cf * N / E)),),
                     f"the capacity is rounded down: it is ceil(capacity_factor · N · k / E) = {C}":
                     (ref.capacity_kept(indices, E, math.floor(cf * N * k / E)),),
                     f"the capacity is counted for N k tokens: capacity(n_tokens) takes the N tokens (it multiplies by "
                     f"k itself), ceil(capacity_factor · N · k / E) = {C}":
                     (ref.capacity_kept(indices, E, math.ceil(cf * N * k * k / E)),),
                     "the weights of a token's kept experts are renormalised after a drop: leave them as the router "
                     "gave them (a dropped assignment only contributes nothing)": (kept, True),
                     "nothing is dropped: each expert keeps only its first capacity(N) assignments":
                     (torch.ones_like(kept),)}
        y = unpack(f"{what}: forward", got["out"], ("y", "router_logits"))[0]
        rate_right = not raised(got["drop_rate"]) and close(got["drop_rate"], rate, 1e-6)
        compare(f"{what}: y (vs transformers' MixtralExperts on the assignments that a token-by-token count keeps)",
                y, want, 1e-5, (
                    "last_drop_rate is right, so each expert dropped as many assignments as it should, but not the "
                    "right ones: an expert keeps its first assignments in token order. Sort with "
                    "argsort(stable=True), so that each expert's tokens stay in token order (a plain argsort may mix "
                    "them)" if rate_right and C is not None else
                    "count each expert's assignments in token order (token-major, n k + slot; argsort(stable=True) "
                    "keeps each expert's tokens in that order) and drop those beyond its capacity; a dropped "
                    "assignment contributes nothing, the others keep their weights"),
                {why: lambda bug=bug: variant(*bug)[0] for why, bug in wrong.items()})
        compare(f"{what}: last_drop_rate (of {N * k} assignments, {round(rate * N * k)} dropped)", got["drop_rate"],
                rate, 1e-6, "the fraction of the N k assignments dropped in the last call, a float (or a 0-d tensor)",
                {why: lambda bug=bug: variant(*bug)[1] for why, bug in wrong.items()})
        for then, again in zip(("then called again with capacity_factor set to None (nothing dropped)",
                                f"then, capacity_factor back to {cf}, called on its first token alone (one token: "
                                "nothing can be dropped)"), got["again"]):
            compare(f"{what}, {then}: last_drop_rate", again, 0.0, 1e-6,
                    "last_drop_rate is stale: set it at every call, to the fraction dropped in that call (0.0 when "
                    "nothing is dropped, or when capacity_factor is None)")
    return ("each expert keeps its first ceil(c · N k / E) assignments in token order, as a plain count does; the "
            "rest are dropped (Mixtral's experts on what is kept), and last_drop_rate counts them at every call")


# ---------------------------------------------------------------- 3. the load-balancing loss
def balancing_cases(g: torch.Generator) -> list[dict]:
    def layer(N: int, E: int, k: int, scale: float = 1.5, lean: float = 0.0, favourite: int = 0) -> torch.Tensor:
        """(N, E) logits, ``lean`` added to the favourite expert's, with clear top-k choices."""
        return routable(lambda n: scale * torch.randn(n, E, generator=g) + lean * torch.eye(E)[favourite], N,
                        torch.eye(E), k)

    def bf16(N: int, E: int, k: int, lean: float = 0.0) -> torch.Tensor:
        """(N, E) bfloat16 logits, ``lean`` added to expert 0's, their top-k choices clear (by 1e-3) in float32."""
        return routable(lambda n: (1.5 * torch.randn(n, E, generator=g) + lean * torch.eye(E)[0]).bfloat16(), N,
                        torch.eye(E), k)

    cases = [("1 layer of 32 tokens, E = 8, k = 2", (layer(32, 8, 2),), 8, 2),
             ("3 layers of 20 tokens, E = 8, k = 2 (one leaning to expert 0)",
              (layer(20, 8, 2), layer(20, 8, 2, lean=3.0), layer(20, 8, 2, 0.5)), 8, 2),
             ("3 layers of 16 tokens, E = 4, k = 1", (layer(16, 4, 1), layer(16, 4, 1, lean=2.0), layer(16, 4, 1)),
              4, 1),
             ("1 layer of 24 tokens, E = 6, k = 3", (layer(24, 6, 3),), 6, 3),
             # in bfloat16, computed in float32: a bfloat16 softmax is off by 1e-3 or so, two cases make it certain
             ("2 layers of 32 tokens in bfloat16, E = 8, k = 2", (bf16(32, 8, 2), bf16(32, 8, 2)), 8, 2),
             ("1 layer of 24 tokens in bfloat16, E = 6, k = 1 (leaning to expert 0)", (bf16(24, 6, 1, 2.0),), 6, 1)]
    uniform = [("a uniform router (all logits 0), 1 layer of 16 tokens, E = 8, k = 2", (torch.zeros(16, 8),), 8, 2),
               ("a uniform router, 2 layers of 10 tokens, E = 4, k = 1", (torch.zeros(10, 4),) * 2, 4, 1)]
    collapsed = [(f"a collapsed router (expert 3's logit 30 above the others), E = 8, k = {k}",
                  (layer(16, 8, k, lean=30.0, favourite=3),), 8, k) for k in (1, 2)]
    return ([{"what": f"load_balancing_loss on {what} (vs transformers' load_balancing_loss_func)",
              "args": [layers, E, k]} for what, layers, E, k in cases]
            + [{"what": f"load_balancing_loss on {what}: exactly k", "args": [layers, E, k], "want": float(k),
                "ties": True} for what, layers, E, k in uniform]
            + [{"what": f"load_balancing_loss on {what}: E (f = 1 and P = 1 on expert 3; the other slots' experts "
                        "have P = 0)", "args": [layers, E, k], "want": float(E)} for what, layers, E, k in collapsed])


BALANCING_BF16 = ("the softmax ran in bfloat16: cast the logits to float32 first (torch.cat of layer.float()), so that "
                  "P and the loss are computed in float32")


def balancing_suspects(case: dict) -> dict:
    layers, E, k = case["args"]
    want = ref.load_balancing_loss(layers, E, k)
    p = torch.cat(layers).double().softmax(dim=-1)  # (L N, E)
    top = p.topk(k, dim=-1)
    f = F.one_hot(top.indices, E).double().sum(dim=1).mean(dim=0)  # (E,): sums to k
    P_topk = torch.zeros_like(p).scatter(1, top.indices, top.values / top.values.sum(-1, keepdim=True)).mean(0)
    return {"the factor E is missing: the loss is E · sum_i f_i P_i (a uniform router scores k)": want / E,
            "this is the mean of the per-layer losses: pool all layers' tokens (torch.cat of the logits) and compute "
            "f and P once, as transformers does": lambda: torch.stack(
                [ref.load_balancing_loss((t,), E, k) for t in layers]).mean(),
            "f is divided by N k, so that it sums to 1: f_i is the fraction of the N tokens that chose expert i, and "
            "with k choices per token f sums to k": want / k,
            "P is the mean of the renormalised top-k weights: it is the mean of the full softmax over all E experts "
            "(the softmax before top-k)": E * (f * P_topk).sum(),
            "f counts only each token's first choice: count all k choices": E * (F.one_hot(top.indices[:, 0], E)
                                                                                 .double().mean(0) * p.mean(0)).sum()
            } | ({BALANCING_BF16: lambda: E * (f * torch.cat(layers).softmax(dim=-1).mean(dim=0).double()).sum()}
                 if layers[0].dtype == torch.bfloat16 else {})


def balancing_reference(case: dict) -> torch.Tensor:
    want = case.get("want")
    return ref.load_balancing_loss(*case["args"]) if want is None else torch.tensor(want, dtype=torch.float64)


def balancing_collect(inputs: dict, load_balancing_loss) -> dict:
    """Each case's loss (detached), and its gradient with respect to each layer's logits: the logits are given as
    leaves that require grad and the loss is backpropagated (None where it has no gradient: no grad_fn)."""
    outputs, grads = [], []
    for case in inputs["cases"]:
        layers, E, k = case["args"]
        leaves = tuple(layer.clone().requires_grad_() for layer in layers)
        loss = attempt(load_balancing_loss, leaves, E, k)
        outputs.append(loss.detach() if isinstance(loss, torch.Tensor) else loss)

        def backward(loss=loss, leaves=leaves):
            if not isinstance(loss, torch.Tensor) or loss.grad_fn is None:
                return None
            loss.backward()
            return [torch.zeros_like(t) if t.grad is None else t.grad.clone() for t in leaves]

        grads.append(None if isinstance(loss, dict) else attempt(backward))
    return {"outputs": outputs, "grads": grads}


NO_GRADIENT = ("the loss has no gradient with respect to the router logits: it trains the router through P, so compute "
               "P from the softmax of the logits with autograd on (no .detach(), no torch.no_grad(), no .item())")


@define("05.load_balancing", table_inputs(balancing_cases), balancing_collect)
def load_balancing(inputs: dict, out: dict) -> str:
    for case, got, grads in zip(inputs["cases"], out["outputs"], out["grads"], strict=True):
        what, (layers, E, k) = case["what"], case["args"]
        half = layers[0].dtype == torch.bfloat16
        if half and isinstance(got, torch.Tensor) and got.dtype == torch.bfloat16:
            raise AssertionError(f"{what}: the loss is torch.bfloat16, expected torch.float32: {BALANCING_BF16}")
        compare(what, got, balancing_reference(case), 1e-5,
                "E · sum over experts of f_i P_i, with f_i the fraction of tokens that chose expert i (any of their k "
                "slots) and P_i the mean softmax probability of expert i, over all layers' tokens together",
                balancing_suspects(case))
        if raised(grads):
            raise AssertionError(f"{what}: loss.backward() raised {raised(grads)}")
        if grads is None:
            raise AssertionError(f"{what}: loss.grad_fn is None: {NO_GRADIENT}")
        if case.get("ties"):  # all logits equal: which experts top-k picks, hence the gradient, is arbitrary
            continue
        want = ref.load_balancing_gradients(layers, E, k)
        if not any(bool(g.any()) for g in grads):
            raise AssertionError(f"{what}: the gradient is 0: {NO_GRADIENT}")
        for n, (grad, w) in enumerate(zip(grads, want, strict=True)):
            atol = 2 ** -8 * w.abs().max().item() if half else 1e-6  # a bfloat16 gradient: an ulp of its largest
            compare(f"{what}: the gradient with respect to layer {n}'s logits (autograd)", grad, w, atol,
                    "the gradient flows through P only (f counts choices, a constant): P_i is the mean of the full "
                    "softmax, computed with autograd on")
    return ("equals transformers' load_balancing_loss_func (layers pooled), k for a uniform router and E for a "
            "collapsed one; its gradient matches (through P), and bfloat16 logits are computed in float32")


# ---------------------------------------------------------------- 4. shared experts
def shared_cases(g: torch.Generator) -> list[dict]:
    cases = []
    for D, I, E, k, Is, shape in ((16, 24, 8, 2, 32, (2, 5)), (16, 12, 4, 1, 20, (1, 6))):
        case = moe_case(g, D, I, E, k, shape)
        case["weights"] |= (mlp_weights("shared_expert", D, Is, g, gated=True)  # the gate spread over (-4, 4) and more
                            | {"shared_expert_gate.weight": 3 * linear_weights("", D, 1, g, False)[".weight"]})
        cases.append(case | {"what": f"SharedExpertMoE({D}, {I}, {E}, {k}, {Is}) on {tuple(case['args'][0].shape)}",
                             "init": [D, I, E, k, Is]})
    return cases


@define("05.shared_expert", table_inputs(shared_cases), run_cases)
def shared_expert(inputs: dict, out: dict) -> str:
    for case, got in zip(inputs["cases"], out["outputs"], strict=True):
        what, w, x, k = case["what"], case["weights"], case["args"][0], case["k"]
        y, logits = unpack(f"{what}: forward", got, ("y", "router_logits"))
        want, want_logits = ref.qwen2_moe(w, x, k)
        by = "transformers' Qwen2MoeSparseMoeBlock with norm_topk_prob=True"
        compare(f"{what}: router_logits (vs its Qwen2MoeTopKRouter)", logits, want_logits, 1e-5,
                hint="SparseMoE's forward returns the router logits, (B T, E)")
        compare(f"{what}: y (vs {by})", y, want, 1e-5, "routed + sigmoid(shared_expert_gate(x)) * shared_expert(x), "
                "the routed part as in SparseMoE", {
                    "the shared expert's gate has no sigmoid: it is sigmoid(shared_expert_gate(x)), between 0 and 1":
                    lambda: ref.qwen2_moe(w, x, k, "no sigmoid")[0],
                    "the shared expert is added without its gate: multiply it by sigmoid(shared_expert_gate(x))":
                    lambda: ref.qwen2_moe(w, x, k, "ungated")[0],
                    "the gate scales the routed experts: it scales the shared expert only":
                    lambda: ref.qwen2_moe(w, x, k, "gate on routed")[0],
                    "the gate scales the sum of routed and shared: it scales the shared expert only":
                    lambda: ref.qwen2_moe(w, x, k, "gate on both")[0]})
    return ("matches transformers' Qwen2MoeSparseMoeBlock: renormalised routed experts plus a sigmoid-gated shared "
            "expert")


# ---------------------------------------------------------------- 5. DeepSeek-V3's router
def deepseek_select(scores: torch.Tensor, bias: torch.Tensor, k: int, G: int, topk_group: int, group: str = "top2",
                    limit: bool = True, use_bias: bool = True, fill: float = -math.inf,
                    scores_only: bool = False) -> torch.Tensor:
    """(N, k) experts chosen from float64 ``scores`` (N, E) as DeepSeek-V3 does, or as the usual wrong versions do:
    groups scored by their ``group`` ("top2" sum, "max"), no group ``limit``, the bias left out of the choice, or
    the other groups masked with ``fill`` 0. ``scores_only``: the (N, E) scores the top-k chooses from instead."""
    N, E = scores.shape
    biased = scores + bias.double() if use_bias else scores
    if limit:
        grouped = biased.view(N, G, E // G)
        group_scores = grouped.max(-1).values if group == "max" else grouped.topk(2, dim=-1).values.sum(-1)
        allowed = torch.zeros(N, G, dtype=torch.bool).scatter(1, group_scores.topk(topk_group, -1).indices, True)
        biased = biased.masked_fill(~allowed.repeat_interleave(E // G, dim=1), fill)
    return biased if scores_only else biased.topk(k, dim=-1).indices


def top_k_of(chosen: torch.Tensor, scores: torch.Tensor, k: int) -> torch.Tensor:
    """``chosen`` (N, k) if each row is a top-k of ``scores`` (N, E) (ties broken any way: k distinct experts, none
    below the k-th largest score), else -1s: the suspect of a bug whose top-k has ties."""
    distinct = (chosen.sort(-1).values.diff(dim=-1) != 0).all() if k > 1 else True
    ok = bool(distinct) and bool((scores.gather(1, chosen) >= scores.topk(k, dim=-1).values[:, -1:]).all())
    return chosen if ok else torch.full_like(chosen, -1)


def deepseek_clear(x: torch.Tensor, c: dict, margin: float = 1e-4) -> torch.Tensor:
    """(N,) bool: the rows whose choice of groups and of experts is ``margin`` clear of a tie (so that float32 and
    float64 agree), with the k-th chosen biased score positive (so that masking with 0 or with -inf agree), or, for
    a case marked ``negative``, negative (so that they disagree)."""
    (N, _), (E, _), (_, _, k, G, topk_group, _) = x.shape, c["weights"]["weight"].shape, c["init"]
    biased = torch.sigmoid(x.double() @ c["weights"]["weight"].double().T) + c["weights"]["bias"].double()
    group_scores = biased.view(N, G, E // G).topk(2, dim=-1).values.sum(-1)
    ranked_groups, clear = group_scores.sort(-1, descending=True).values, torch.ones(N, dtype=torch.bool)
    if topk_group < G:
        clear &= ranked_groups[:, topk_group - 1] - ranked_groups[:, topk_group] > margin
    allowed = torch.zeros(N, G, dtype=torch.bool).scatter(1, group_scores.topk(topk_group, -1).indices, True)
    ranked = biased.masked_fill(~allowed.repeat_interleave(E // G, dim=1), -math.inf).sort(-1, descending=True).values
    clear &= ranked[:, k - 1] < 0 if c.get("negative") else ranked[:, k - 1] > 0
    if k < E:
        clear &= ranked[:, k - 1] - ranked[:, k] > margin
    return clear


def deepseek_case(g: torch.Generator, D: int, E: int, k: int, G: int, topk_group: int, rsf: float, N: int,
                  negative: bool = False) -> dict:
    """A DeepSeekRouter case. ``negative``: the odd experts' biases lowered by 2, so that every biased score there is
    negative, and every group's second best too; with k above the number of groups kept, the k-th choice is one of
    them, which an expert masked with 0 instead of -inf would beat."""
    weights = {"weight": 1.5 * torch.randn(E, D, generator=g) / math.sqrt(D),
               "bias": 0.15 * (2 * torch.rand(E, generator=g) - 1)}  # moves some choices, keeps the chosen positive
    if negative:
        weights["bias"][1::2] -= 2.0
    case = {"what": f"DeepSeekRouter({D}, {E}, {k}, n_group={G}, topk_group={topk_group}, routed_scaling_factor="
                    f"{rsf}) on ({N}, {D}) with a nonzero bias" + (
                        " (about -2 on the odd experts: the k-th choice has a negative biased score)"
                        if negative else ""),
            "init": [D, E, k, G, topk_group, rsf], "weights": weights, "negative": negative}
    x = torch.randn(N, D, generator=g)
    for _ in range(100):
        bad = ~deepseek_clear(x, case)
        if not bad.any():
            return case | {"args": [x]}
        x[bad] = torch.randn(int(bad.sum()), D, generator=g)
    raise RuntimeError("could not draw inputs with clear DeepSeek choices")


def deepseek_inputs(seed: int, configs=((16, 16, 4, 4, 2, 2.5, 24), (16, 8, 2, 1, 1, 1.0, 16),
                                        (12, 16, 4, 4, 2, 1.0, 24), (16, 8, 3, 4, 2, 1.0, 16, True)),
                    updates: bool = True) -> dict:
    g = seeded_generator(seed)  # (d_model, n_experts, k, n_group, topk_group, rsf, tokens[, negative])
    inputs = {"cases": [deepseek_case(g, *c) for c in configs], "updates": []}
    if updates:  # hand-made counts (long and float; some at exactly the mean; a mean of 2.75 that an integer division
        # rounds to 2), then bincount's counts of random tokens
        bias = torch.tensor([0.1, -0.2, 0.0, 0.05])
        calls = [[torch.tensor([5, 1, 3, 3]), 0.01], [torch.tensor([0.0, 10.0, 4.0, 6.0]), 0.001],
                 [torch.tensor([2, 2, 2, 2]), 0.5], [torch.tensor([5, 1, 3, 2]), 0.01]]
        random = torch.bincount(torch.randint(8, (40,), generator=g), minlength=8)
        inputs["updates"] = [
            {"what": "DeepSeekRouter(8, 4, 2, n_group=1, topk_group=1)", "init": [8, 4, 2, 1, 1],
             "weights": {"weight": torch.randn(4, 8, generator=g), "bias": bias}, "calls": calls},
            {"what": "DeepSeekRouter(8, 8, 2, n_group=2, topk_group=1)", "init": [8, 8, 2, 2, 1],
             "weights": {"weight": torch.randn(8, 8, generator=g), "bias": torch.zeros(8)},
             "calls": [[random, 0.001], [random.flip(0), 0.001]]}]
    return inputs


def deepseek_collect(inputs: dict, DeepSeekRouter) -> dict:
    """The forward of each case, and the bias after each call of update_bias."""
    out, updates = run_cases(inputs, DeepSeekRouter), []
    for case in inputs["updates"]:
        router = attempt(build, DeepSeekRouter, case["weights"], case["what"], *case["init"])
        if isinstance(router, dict):
            updates.append([router])
            continue
        biases = []
        for counts, gamma in case["calls"]:
            done = attempt(router.update_bias, counts.clone(), gamma)
            failed = isinstance(done, dict) and "raised" in done
            biases.append(done if failed else attempt(lambda: router.bias.detach().clone()))
        updates.append(biases)
    out["updates"] = updates
    return out


@define("05.deepseek_router", deepseek_inputs, deepseek_collect)
def deepseek_router(inputs: dict, out: dict) -> str:
    by = "transformers' DeepseekV3TopkRouter"
    for case, got in zip(inputs["cases"], out["outputs"], strict=True):
        what, x, (_, _, k, G, topk_group, rsf) = case["what"], case["args"][0], case["init"]
        weights, indices, scores = unpack(f"{what}: forward", got, ("weights", "indices", "scores"))
        w, i, s = ref.deepseek_v3_router(case["weights"], x, k, G, topk_group, rsf)
        bias, shape = case["weights"]["bias"], (x.shape[0], k)
        compare(f"{what}: scores (vs {by}'s sigmoid of its logits)", scores, s, 1e-5,
                "sigmoid(x @ weight.T) in float32, without the bias", {
                    "the scores include the bias: return sigmoid(x @ weight.T) without it": s + bias,
                    "the scores are a softmax: DeepSeek-V3 scores each expert on its own, with a sigmoid":
                    lambda: (x.double() @ case["weights"]["weight"].double().T).softmax(-1)})
        s64 = s.double()
        choose = lambda **bug: by_expert(what, torch.zeros(shape), deepseek_select(s64, bias, k, G, topk_group, **bug),
                                         shape)[0]
        got_i, got_w = by_expert(what, weights, indices, shape)
        want_i, want_w = by_expert(what, w, i, shape)
        compare(f"{what}: the k experts chosen for each token (indices, compared as sets; vs {by})", got_i, want_i, 0,
                "top-k of the biased scores s + bias, among the experts of the topk_group groups whose two best biased "
                "scores sum highest (the others masked with -inf)", {
                    "the experts of the other groups are masked with 0, which beats a negative biased score (a bias "
                    "can make s + bias negative): mask them with float('-inf'), e.g. masked_fill(~allowed, "
                    "float('-inf'))": lambda: top_k_of(got_i, deepseek_select(s64, bias, k, G, topk_group, fill=0.0,
                                                                               scores_only=True), k),
                    "the bias is left out of the choice: choose with s + bias (and weight with s)":
                    lambda: choose(use_bias=False),
                    "there is no group limit: only the experts of the topk_group best groups may be chosen":
                    lambda: choose(limit=False),
                    "groups are scored by their best score (max); DeepSeek-V3 sums each group's two best biased "
                    "scores (topk(2).sum)": lambda: choose(group="max")})
        chosen = s64.gather(1, got_i)
        compare(f"{what}: weights of the chosen experts (vs {by})", got_w, want_w, 1e-5,
                "s of the chosen experts (without the bias), divided by their sum, times routed_scaling_factor", {
                    "the weights use the biased scores: the bias only chooses; weight with s alone":
                    lambda: (chosen + bias.double()[got_i]) / (chosen + bias.double()[got_i]).sum(-1, keepdim=True)
                    * rsf,
                    "the weights are not scaled: multiply them by routed_scaling_factor": chosen / chosen.sum(-1, True),
                    "the weights are not normalised: divide them by their sum, then scale": chosen * rsf})
    for case, got in zip(inputs["updates"], out["updates"], strict=True):
        b = case["weights"]["bias"].double()
        for n, ((counts, gamma), bias) in enumerate(zip(case["calls"], got)):
            c = counts.double()
            step = gamma * torch.sign(c.mean() - c)
            compare(f"{case['what']} with bias {[round(v, 4) for v in b.tolist()]}: the bias after update_bias(counts="
                    f"{counts.tolist()}, gamma={gamma}) (call {n + 1}; vs b + gamma · sign(mean(counts) - counts))",
                    bias, b + step, 1e-6, "bias += gamma * sign(mean(counts) - counts), with the counts as floats", {
                        "the sign is reversed: an overloaded expert (count above the mean) must become less "
                        "attractive, so its bias goes down": b - step,
                        "experts at exactly the mean count moved: sign(0) = 0 leaves them where they are":
                        b + gamma * torch.where(c > c.mean(), -1.0, 1.0),
                        "the step is gamma · (mean - counts): it is gamma times the sign of that":
                        b + gamma * (c.mean() - c),
                        "the mean is rounded down (an integer division of the counts): take the mean of the counts as "
                        "floats, counts.float().mean()": b + gamma * torch.sign(c.mean().floor() - c)})
            b = b + step
    return ("chosen experts and weights match transformers' DeepseekV3TopkRouter (bias for choice only, group-limited, "
            "scaled); update_bias follows b += gamma · sign(mean - counts)")


# ---------------------------------------------------------------- 6. Mixture of Recursions
def mor_case(g: torch.Generator, B: int, T: int, D: int, R: int, capacity: float) -> dict:
    """MixtureOfRecursions(block, D, R, capacity) on (B, T, D): channel 0 of x holds each token's position and
    channel 1 its sequence (the routers ignore both); the router weights are redrawn until every choice is clear."""
    M = 1.5 * torch.randn(D - 2, D - 2, generator=g) / math.sqrt(D - 2)
    for _ in range(100):
        weights = {}
        for r in range(R):
            weights[f"routers.{r}.weight"] = torch.cat([torch.zeros(1, 2), torch.randn(1, D - 2, generator=g)], 1)
            weights[f"routers.{r}.bias"] = 0.1 * torch.randn(1, generator=g)
        x = torch.randn(B, T, D, generator=g)
        x[..., 0], x[..., 1] = torch.arange(T, dtype=torch.float32), torch.arange(B, dtype=torch.float32)[:, None]
        routers = [(weights[f"routers.{r}.weight"], weights[f"routers.{r}.bias"]) for r in range(R)]
        if ref.mixture_of_recursions(x, routers, capacity, M)[2] > 1e-3:
            return {"what": f"MixtureOfRecursions(block, {D}, max_recursions={R}, capacity={capacity}) on {(B, T, D)}",
                    "init": [D, R, capacity], "weights": weights, "x": x, "M": M,
                    "projection": torch.randn(B, T, D, generator=g)}  # the gradient check backpropagates sum(P · y)
    raise RuntimeError("could not draw a Mixture of Recursions with clear choices")


def mor_inputs(seed: int, configs=((2, 10, 8, 3, 0.5), (1, 7, 8, 2, 0.6), (3, 9, 8, 3, 0.4), (1, 32, 8, 3, 0.7))
               ) -> dict:
    g = seeded_generator(seed)  # (B, T, d_model, max_recursions, capacity); the last: 23, 17, 12 tokens, nested ceil
    return {"cases": [mor_case(g, *c) for c in configs]}


def mor_collect(inputs: dict, MixtureOfRecursions) -> dict:
    """Each case's output, what the stand-in block was given at each call (the (position, sequence) of its rows),
    and, from a second module with grad on, the gradients of sum(projection · output) for the routers' parameters
    (None for one that gets none)."""

    class RecordingBlock(nn.Module):
        """The check's block: it records channels 0 and 1 of what it is given (each token's position and sequence),
        returns 0 there, and the causal running mean of tanh(h[..., 2:] @ M) on the other channels."""

        def __init__(self, M):
            super().__init__()
            self.M, self.seen = M, []

        def forward(self, h):
            assert h.dim() == 3, f"the block was given a tensor of shape {tuple(h.shape)}; it takes (B, m, d_model)"
            self.seen.append(h[..., :2].detach().round().long().cpu())
            z = torch.tanh(h[..., 2:] @ self.M.to(h.dtype))
            steps = torch.arange(1, h.shape[1] + 1, dtype=h.dtype, device=h.device)[:, None]
            return torch.cat([torch.zeros_like(h[..., :2]), z.cumsum(dim=1) / steps], dim=-1)

    outputs = []
    for case in inputs["cases"]:
        block = RecordingBlock(case["M"])
        mor = attempt(build, MixtureOfRecursions, case["weights"], case["what"], block, *case["init"])
        if isinstance(mor, dict):
            outputs.append({"y": mor, "seen": []})
            continue
        with torch.no_grad():
            y = attempt(mor, case["x"])

        def gradients():
            again = build(MixtureOfRecursions, case["weights"], case["what"], RecordingBlock(case["M"]),
                          *case["init"])
            loss = (again(case["x"]) * case["projection"]).sum()
            if loss.grad_fn is not None:  # else no parameter reaches the output
                loss.backward()
            found = dict(again.named_parameters())
            return {name: None if name not in found or found[name].grad is None else found[name].grad.clone()
                    for name in case["weights"]}

        outputs.append({"y": y, "seen": block.seen, "grads": attempt(gradients)})
    return {"outputs": outputs}


@define("05.mor", mor_inputs, mor_collect)
def mor(inputs: dict, out: dict) -> str:
    for case, got in zip(inputs["cases"], out["outputs"], strict=True):
        what, x, (_, R, capacity) = case["what"], case["x"], case["init"]
        B, T, _ = x.shape
        routers = [(case["weights"][f"routers.{r}.weight"], case["weights"][f"routers.{r}.bias"]) for r in range(R)]
        want, steps, _ = ref.mixture_of_recursions(x, routers, capacity, case["M"])
        y = as_tensor(f"{what}: forward", got["y"], tuple(x.shape))
        seen, sizes = got["seen"], [s.shape[1] for s in steps]
        if len(seen) != R:
            raise AssertionError(f"{what}: the block was called {len(seen)} times, expected {R}: once per step, on the "
                                 f"selected tokens of all B sequences at once, (B, m, d_model) with m = {sizes}")
        compounded = [math.ceil(capacity ** r * T) for r in range(1, R + 1)]
        if [c.shape[1] for c in seen] == compounded != sizes:
            raise AssertionError(f"{what}: the block was given {compounded} tokens per sequence at its {R} steps, "
                                 f"expected {sizes}: the capacity applies to the tokens left at each step, rounded up "
                                 "there, m_r = ceil(capacity · m_(r-1)) with m_0 = T, not ceil(capacity^r · T)")
        if any(bool(((c[..., 0] < 0) | (c[..., 0] >= T) | (c[..., 1] < 0) | (c[..., 1] >= B)).any()) for c in seen):
            raise AssertionError(f"{what}: the block was given rows that are not tokens of x (the check's x carries "
                                 "each token's position in channel 0): give it the selected rows of h, gathered")
        applied, depth = torch.zeros(B, T, dtype=torch.long), torch.zeros(B, T, dtype=torch.long)
        for call, chosen in zip(seen, steps):
            applied.index_put_((call[..., 1].flatten(), call[..., 0].flatten()),
                               torch.ones(call[..., 0].numel(), dtype=torch.long), accumulate=True)
            depth.scatter_add_(1, chosen, torch.ones_like(chosen))
        if [tuple(c.shape[:2]) for c in seen] != [tuple(c.shape) for c in steps] and not torch.equal(applied, depth):
            b, t = torch.nonzero(applied != depth)[0].tolist()
            untouched = torch.equal(y[depth == 0], x.double()[depth == 0])
            advice = (f"The block ran on all {T} tokens at every step, and only the selected were updated: run it on "
                      "the selected tokens only, gathered into a (B, m, d_model) subsequence" if untouched else
                      "Every token went through the block at every step: at step r only the ceil(capacity · n) tokens "
                      "with the highest router weight among the n selected at step r - 1 go on; the others leave"
                      ) if bool((applied == R).all()) else (
                "At each step keep the ceil(capacity · n) tokens with the highest sigmoid(router_r(h)) among the n "
                f"selected at the previous step ({sizes} tokens per sequence here)")
            raise AssertionError(f"{what}: token {t} of sequence {b} got {applied[b, t].item()} block applications, "
                                 f"expected {depth[b, t].item()} (the number of steps that select it). {advice}")
        for r, (call, chosen) in enumerate(zip(seen, steps), 1):  # in order: a step's error spoils the later steps
            where = f"{what}: step {r}, the block's input"
            compare(f"{where}: its shape (B, m)", tuple(call.shape[:2]), tuple(chosen.shape),
                    hint=f"m = ceil(capacity · n) = {chosen.shape[1]}, n the tokens selected at the previous step")
            compare(f"{where}: the sequence of each row", call[..., 1], torch.arange(B)[:, None].expand(chosen.shape),
                    0, "row b of the block's input must hold tokens of sequence b")
            positions = call[..., 0]
            compare(f"{where}: the positions of each row, as sets", positions.sort(-1).values, chosen, 0,
                    f"the ceil(capacity · n) = {chosen.shape[1]} tokens with the highest sigmoid(routers[{r - 1}](h)) "
                    "among those selected at the previous step")
            if not torch.equal(positions, chosen):
                b = torch.nonzero((positions != chosen).any(-1))[0].item()
                raise AssertionError(f"{where}: positions {positions[b].tolist()} in sequence {b}, expected "
                                     f"{chosen[b].tolist()}: the block must see the selected tokens in causal order. "
                                     "Sort the selected positions (topk returns them by weight) before gathering them")
        compare(f"{what}: block applications per token (B, T), vs the number of steps that select it", applied, depth,
                0)
        compare(f"{what}: tokens that no step selects (output must equal input)", y[depth == 0], x.double()[depth == 0],
                0, "write back only the selected tokens' updates (scatter); the others pass through unchanged")
        compare(f"{what}: output (vs a float64 loop over sequences and steps)", y, want, 1e-5,
                "h_t += w_t * block(h of the selected tokens)_t, w_t = sigmoid(router_r(h_t)) computed before the "
                "update, for each selected t", {
                    "the update is h + block(h): multiply the block's output by the router weight w = sigmoid(...)":
                    lambda: ref.mixture_of_recursions(x, routers, capacity, case["M"], weighted=False)[0]})
        check_mor_gradients(case, got["grads"], routers)
    return ("each step's block sees exactly the selected tokens, in causal order; depth, outputs and the routers' "
            "gradients match a float64 loop; the other tokens pass unchanged")


def check_mor_gradients(case: dict, grads, routers: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """The routers' gradients of sum(projection · output) against autograd through the float64 loop."""
    what, x, (_, _, capacity) = case["what"], case["x"], case["init"]
    if raised(grads):
        raise AssertionError(f"{what}: the forward and backward with grad on (of sum(P · output) for a fixed random "
                             f"P) raised {raised(grads)}")
    leaves = [(w.double().requires_grad_(), b.double().requires_grad_()) for w, b in routers]
    y = ref.mixture_of_recursions(x, leaves, capacity, case["M"])[0]
    want = torch.autograd.grad((y * case["projection"].double()).sum(), [t for pair in leaves for t in pair])
    names = [f"routers.{r}.{kind}" for r in range(len(routers)) for kind in ("weight", "bias")]
    missing = [name for name in names if not isinstance(grads.get(name), torch.Tensor) or not bool(grads[name].any())]
    if missing:
        raise AssertionError(
            f"{what}: the router gets no gradient (none for "
            f"{'any router' if len(missing) == len(names) else ', '.join(missing)}, after backward of sum(P · output) "
            "for a fixed random P): multiply the block's output by w = sigmoid(router(h)) as it is (not detached, "
            "not under torch.no_grad()): that product is the routers' only path to the loss, how they learn")
    for name, w in zip(names, want, strict=True):
        compare(f"{what}: the gradient of sum(P · output) for {name} (P a fixed random tensor; vs autograd through a "
                "float64 loop)", grads[name], w, 1e-4 * max(1.0, w.abs().max().item()),
                "the routers learn through h_t + w_t · block(h)_t, with w = sigmoid(router(h)) computed on h before "
                "the step's update")


# ---------------------------------------------------------------- 7. expert parallelism
def expert_parallel_inputs(seed: int, configs=((8, 2, (1, 7)), (8, 4, (2, 5)))) -> dict:
    g = seeded_generator(seed)  # (n_experts, world_size, (B, T))
    cases = []
    for E, W, shape in configs:
        case = moe_case(g, 16, 24, E, 2, shape)
        N = math.prod(shape)
        cases.append(case | {"world_size": W, "what": f"run_expert_parallel(SparseMoE(16, 24, {E}, 2), x of shape "
                             f"{tuple(case['args'][0].shape)}, world_size={W}) ({N} tokens: ranks get "
                             f"{[len(t) for t in torch.arange(N).tensor_split(W)]})"})
    return {"cases": cases}


def expert_parallel_collect(inputs: dict, run_expert_parallel, SparseMoE) -> dict:
    """run_expert_parallel on the student's SparseMoE built with each case's weights, with torch.distributed's
    all_to_all_single counting, per rank, its calls that carry token rows (2-D float tensors of width D) and the rows
    sent and received (into a tensor in shared memory, which the forked ranks write); then the first case again with
    every such row zeroed on arrival (the output must then be 0: it comes from the exchanged rows). A rank's error is
    reported by its first and last lines (and the student's last frame), not its whole traceback."""
    dist = torch.distributed
    original = dist.all_to_all_single
    outputs, traffic, zeroed = [], [], None

    def run(case: dict, counts: torch.Tensor, zero: bool):
        D = case["args"][0].shape[-1]

        def counting(output, input, *args, **kwargs):
            done = original(output, input, *args, **kwargs)
            if all(t.dim() == 2 and t.is_floating_point() and t.shape[-1] == D for t in (output, input)):
                rank = dist.get_rank()
                counts[rank] += torch.tensor([1, input.shape[0], output.shape[0]])
                if zero:
                    output.zero_()
            return done

        moe = attempt(build, SparseMoE, case["weights"], case["what"], *case["init"])
        if isinstance(moe, dict):
            return moe
        dist.all_to_all_single = counting
        try:
            return run_expert_parallel(moe, *case["args"], case["world_size"])
        except Exception as error:
            lines = [line.strip() for line in str(error).splitlines() if line.strip()]
            if len(lines) < 2:
                raise
            frames = [line for line in lines if line.startswith('File "') and "site-packages" not in line
                      and "labkit" not in line]  # the student's last frame
            where = f" (at {frames[-1][5:]})" if frames else ""
            return {"raised": f"{type(error).__name__}: {lines[0]}"[:150] + f"{where[:150]} … {lines[-1]}"[:400]}
        finally:
            dist.all_to_all_single = original

    for n, case in enumerate(inputs["cases"]):
        counts = torch.zeros(case["world_size"], 3, dtype=torch.long).share_memory_()
        outputs.append(attempt(run, case, counts, False))
        traffic.append(counts)
        if n == 0:
            zeroed = attempt(run, case, torch.zeros_like(counts).share_memory_(), True)
    return {"outputs": outputs, "traffic": traffic, "zeroed": zeroed}


@define("05.expert_parallel", expert_parallel_inputs, expert_parallel_collect)
def expert_parallel(inputs: dict, out: dict) -> str:
    for case, got, counts in zip(inputs["cases"], out["outputs"], out["traffic"], strict=True):
        w, x, k, W, E = case["weights"], case["args"][0], case["k"], case["world_size"], case["init"][2]
        want = ref.mixtral_moe(w, x, k)[0]
        flat = x.reshape(-1, x.shape[-1])
        _, gates, indices = ref.mixtral_router(w["router.weight"], flat, k)
        suspects = {}
        for r, rows in enumerate(torch.arange(flat.shape[0]).tensor_split(W)):
            if len(rows):
                zeroed = want.reshape(flat.shape).clone()
                zeroed[rows] = 0
                suspects[f"rank {r}'s tokens (rows {rows[0]} to {rows[-1]} of the B T flattened tokens) came back as "
                         "zeros: every rank must write its own tokens' outputs into y"] = zeroed.view(x.shape)
        home = indices // (E // W) == indices % W  # where expert % world_size happens to be the expert's rank
        suspects["the assignments reach the wrong rank: rank r holds the contiguous experts r·E/W … (r+1)·E/W - 1, "
                 "so expert e's rank is e // (E / world_size), not e % world_size"] = (
            lambda: moe_loop(w, flat, indices, gates * home).view(x.shape))
        compare(f"{case['what']} (vs transformers' MixtralSparseMoeBlock)", got, want, 1e-5,
                "each rank routes its own share of the tokens (tensor_split), sends each assignment to the rank that "
                "holds its expert, runs its own experts on what it receives, gets the results back and adds them, "
                "weighted, at its tokens' rows of y", suspects)
        check_traffic(case, counts)
    case, zeroed = inputs["cases"][0], out["zeroed"]
    if raised(zeroed):
        raise AssertionError(f"{case['what']}, with every exchanged token row zeroed on arrival: raised "
                             f"{raised(zeroed)}")
    compare(f"{case['what']}, with every token row that dist.all_to_all_single delivers zeroed on arrival (y must then "
            "be 0, since SwiGLU(0) = 0)", zeroed, torch.zeros(case["args"][0].shape), 0,
            f"y does not come from the exchanged rows: {TRAVEL}, run there by their experts, and the results must "
            "come back the same way to make y; compute nothing from the other ranks' experts locally")
    return ("with 2 and 4 processes and uneven shares of tokens, the all-to-all dispatch matches transformers' "
            "MixtralSparseMoeBlock; each assignment travels with all_to_all_single, out and back")


TRAVEL = "the tokens must travel with dist.all_to_all_single to the ranks holding their experts"


def check_traffic(case: dict, counts: torch.Tensor) -> None:
    """Every rank exchanged token rows with all_to_all_single, and the ranks received between N k rows in all (each
    assignment sent once) and 2 N k (each sent out and its result back, as the solution does)."""
    x, k, W = case["args"][0], case["k"], case["world_size"]
    N, D = x.shape[:2].numel(), x.shape[-1]
    counts = as_tensor(f"{case['what']}: the count of all_to_all_single calls", counts, (W, 3)).long()
    idle = [r for r in range(W) if counts[r, 0] == 0]
    if idle:
        raise AssertionError(
            f"{case['what']}: rank{'s' * (len(idle) > 1)} {', '.join(map(str, idle))} exchanged no token rows (2-D "
            f"float tensors of width {D}) with dist.all_to_all_single: {TRAVEL} (a rank's part going to itself too), "
            "and the results come back the same way. Computing them locally, or with other collectives, is not "
            "expert parallelism. (Call it as dist.all_to_all_single, through the module: the check counts the "
            "calls made that way, and not those of a name imported with from torch.distributed import ...)")
    received = int(counts[:, 2].sum())
    if not N * k <= received <= 2 * N * k:
        raise AssertionError(
            f"{case['what']}: the ranks received {received} token rows with dist.all_to_all_single in all, per rank "
            f"{counts[:, 2].tolist()}; the {N} tokens' {N * k} assignments, each sent once to its expert's rank and "
            f"its result sent back once, make {2 * N * k}. " + (
                "Each rank must route only its own share of the tokens (torch.tensor_split(..., world_size)[rank])"
                if received > 2 * N * k else f"{TRAVEL}, each assignment once"))
