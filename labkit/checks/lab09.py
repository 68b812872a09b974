"""Checks of Lab 9: model merging.

References: mergekit 0.1.5's merge methods through its public ``merge_tensors`` (``references.mergekit_*``):
"linear" for averaging (and the closed form sum_i w_i theta_i / sum_i w_i), "task_arithmetic" (normalize False)
for task arithmetic, "ties" (its weighted election and its divisor, the sum of the agreeing weights) per tensor,
``sparsify.rescaled_masked_tensor`` for DARE's L1 rescale given the student's own mask, ``sparsify.bernoulli``
after ``torch.manual_seed(seed)`` for DARE itself on one tensor, and ``merge_methods.slerp.slerp`` on each whole
tensor; peft 0.21.2's ``random_pruning`` for DARE's 1/(1 - p) rescale, and its ``ties`` (an unweighted election,
a count divisor) to name that semantics when a student's output is peft's. Closed forms and properties: exact round
trips and negation of task vectors, averaging as task arithmetic at lambda = 1/2, idempotence; DARE's kept fraction
(within 5 standard deviations of 1 - p), its expectation, and its mask against the lab's documented rule (one
generator for the dict, float32 uniforms, tensor by tensor: ``references.dare_masks``, torch.bernoulli as mergekit
draws); SLERP's endpoints and unit norms. Weight matching (no library implements Git Re-Basin): the permuted
network computes b's function (a float64 forward of b's weights), b and a are left alone, a known permutation is
undone exactly, the distance to a does not grow, the optimum of one hidden layer equals the brute force over every
permutation (``references.weight_matching_brute_force``), and for deeper networks no hidden layer can be improved
alone (the brute force over each layer's permutations, the others fixed: a fixed point of the coordinate ascent).
The notes on both libraries are in ``tests/lab09_reference_notes.md``. Every merge must leave its inputs alone (the
state dicts, the task vectors, the lists of weights) and return tensors of its own: collect finds, by storage, the
entries of a result that are an input's tensors (a non-float entry not cloned, a shortcut that returns the input).
A float64 result off by about a float32 rounding is told so (float32 weights or Python-number torch.where).
"""
from __future__ import annotations

import functools
import itertools
import math

import torch
import torch.nn as nn

from labkit.checks import close, compare, define, first_match, raised, references as ref, seeded_generator
from labkit.checks.kernel import attempt, load_weights

F64 = torch.float64
THRESHOLD = 0.9995  # mergekit's SLERP falls back to lerp above this |cos|


# ---------------------------------------------------------------- shared: state dicts in, state dicts out
def randint(g: torch.Generator, low: int, high: int) -> int:
    """A Python int in [low, high]."""
    return int(torch.randint(low, high + 1, (1,), generator=g))


def model_state(g: torch.Generator, sizes=(5, 6, 4), dtype=F64, steps: int = 100) -> dict:
    """A two-layer model's state dict, ``fc1.weight``, ``fc1.bias``, ``fc2.weight``, ``fc2.bias``, in ``dtype``,
    and an integer buffer ``steps`` (a 0-d int64 tensor) that merging must copy, not average."""
    d_in, d_hidden, d_out = sizes
    state = {"fc1.weight": torch.randn(d_hidden, d_in, generator=g, dtype=F64) / math.sqrt(d_in),
             "fc1.bias": 0.5 * torch.randn(d_hidden, generator=g, dtype=F64),
             "fc2.weight": torch.randn(d_out, d_hidden, generator=g, dtype=F64) / math.sqrt(d_hidden),
             "fc2.bias": 0.5 * torch.randn(d_out, generator=g, dtype=F64)}
    return {k: v.to(dtype) for k, v in state.items()} | {"steps": torch.tensor(steps)}


DELTA_SCALES = {"fc1.weight": 1.0, "fc1.bias": 0.05, "fc2.weight": 0.4, "fc2.bias": 0.02}  # unlike: a global trim shows


def finetune(g: torch.Generator, base: dict, scale: float = 0.1, scales=DELTA_SCALES) -> dict:
    """A fine-tune of ``base``: each float entry plus a random delta (``scale`` times the entry's own scale), drawn
    again until the deltas as computed, finetuned - base in the entry's dtype, are nonzero and distinct in float32
    (mergekit ranks |delta| in float32: no tie at a trim threshold); the integer ``steps`` advanced."""
    out = {}
    for name, value in base.items():
        if not value.is_floating_point():
            out[name] = value + randint(g, 1, 50)
            continue
        while True:
            new = (value.double() + scale * scales.get(name, 1.0) * torch.randn(
                value.shape, generator=g, dtype=F64)).to(value.dtype)
            magnitude = (new - value).abs().float()
            if (magnitude > 0).all() and magnitude.unique().numel() == magnitude.numel():
                break
        out[name] = new
    return out


def clone_state(state: dict) -> dict:
    return {k: v.clone() for k, v in state.items()}


def floats(state: dict) -> list[str]:
    return [k for k, v in state.items() if v.is_floating_point()]


def tolerance(want: torch.Tensor, dtype: torch.dtype) -> float:
    """An absolute tolerance for an entry of ``dtype`` whose expected values are ``want``: relative to its largest
    value (at least 1), about a float32 rounding or a few bfloat16 ones."""
    scale = max(1.0, float(want.abs().max())) if want.numel() else 1.0
    return {torch.float64: 1e-9, torch.bfloat16: 3e-2, torch.float16: 3e-3}.get(dtype, 1e-5) * scale


def as_state(what: str, got, keys: list[str], missing: str = "", extra: str = "") -> dict:
    """``got`` as a dict with exactly ``keys``, each a tensor, or an ``AssertionError`` saying what came back
    instead; ``missing`` and ``extra`` explain a missing or an unexpected entry."""
    if raised(got):
        raise AssertionError(f"{what} raised {raised(got)}")
    if not isinstance(got, dict):
        raise AssertionError(f"{what}: returned a {type(got).__name__}, expected a dict of tensors (a state_dict)")
    lost = [k for k in keys if k not in got]
    if lost:
        raise AssertionError(f"{what}: the entries {lost} are missing" + (f": {missing}" if missing else ""))
    more = [k for k in got if k not in keys]
    if more:
        raise AssertionError(f"{what}: unexpected entries {more}" + (f": {extra}" if extra else ""))
    for k in keys:
        if not isinstance(got[k], torch.Tensor):
            raise AssertionError(f"{what}['{k}']: a {type(got[k]).__name__}, expected a tensor")
    return got


def same_dtype(what: str, got: torch.Tensor, like: torch.Tensor) -> None:
    if got.dtype != like.dtype:
        raise AssertionError(f"{what}: dtype {got.dtype}, expected {like.dtype}: keep each entry's dtype (Python "
                             "floats keep it; a float64 tensor in the arithmetic, of weights say, promotes a float32 "
                             "entry)")


def copied(what: str, got: torch.Tensor, want: torch.Tensor, source: str, suspects: dict | None = None) -> None:
    """A non-float entry must be ``want`` itself, in its dtype."""
    compare(what, got, want.double(), 0, f"copy the non-float entries from {source} unchanged", suspects)
    if got.dtype != want.dtype or got.shape != want.shape:
        raise AssertionError(f"{what}: dtype {got.dtype} and shape {tuple(got.shape)}, expected {want.dtype} and "
                             f"{tuple(want.shape)}: copy the non-float entries from {source} unchanged")


def untouched(what: str, changed: list, whose: str) -> None:
    if changed:
        raise AssertionError(f"{what} modified {whose} in place (the entries {sorted(set(changed))}): return new "
                             "tensors (x + y, not x += y or x.add_(y), which write into the caller's tensors) and "
                             "leave the inputs as they were")


def not_shared(what: str, shared: list, whose: str) -> None:
    """The result must hold its own tensors: ``shared`` names the entries (collect finds them by storage) that are
    the caller's tensors, or views of them."""
    if shared:
        raise AssertionError(f"{what}: the result shares tensors with {whose} (the entries {sorted(set(shared))} are "
                             "the caller's tensors themselves, or views of them): an in-place change of one later "
                             "(merged[k] += ..., or training a model loaded with them) changes the other. Return new "
                             "tensors: clone the entries you copy (value.clone()) and build a new dict")


def list_untouched(what: str, changed: bool, name: str, now) -> None:
    if changed:
        raise AssertionError(f"{what} modified the {name} list it was given in place (it became {now}): leave the "
                             f"caller's list as it is, and build a new one (w = [x / total for x in {name}])")


def float32_hint(got, want: torch.Tensor, dtype: torch.dtype, hint: str) -> str:
    """``hint``, or, where a float64 entry is off by about a float32 rounding only, what does that."""
    if (dtype == F64 and isinstance(got, torch.Tensor) and got.shape == want.shape and got.is_floating_point()
            and close(got, want, 2e-6 * max(1.0, float(want.abs().max()) if want.numel() else 1.0))):
        return ("this is off by about a float32 rounding: is part of the float64 computation done in float32? ("
                "torch.tensor(weights) without dtype=, torch.where(mask, w, 0.0) or torch.full with Python numbers, "
                "and .float() make float32 tensors). Do the arithmetic in the entry's dtype (torch.tensor(weights, "
                "dtype=value.dtype), or Python floats)" + (f"; {hint}" if hint else ""))
    return hint


def listed(values) -> str:
    return "[" + ", ".join(f"{v:g}" for v in values) + "]"


# ---------------------------------------------------------------- 1. averaging
AVERAGE_CASES = [  # (what, number of models, weights or None, dtype, copies of one model)
    ("2 models, weights None", 2, None, F64, False),
    ("3 models, weights [1.0, 2.0, 0.5]", 3, [1.0, 2.0, 0.5], F64, False),
    ("2 copies of one model, weights [2.0, 5.0] (the average is that model)", 2, [2.0, 5.0], F64, True),
    ("3 float32 models, weights [0.2, 0.7, 3.0]", 3, [0.2, 0.7, 3.0], torch.float32, False),
    ("a single model", 1, None, F64, False)]


def average_inputs(seed: int, cases=AVERAGE_CASES) -> dict:
    """Models with an integer ``steps`` that differs from model to model (the first's must be kept)."""
    g, out = seeded_generator(seed), []
    for what, n, weights, dtype, same in cases:
        first = model_state(g, dtype=dtype, steps=randint(g, 10, 99))
        states = [first] + [clone_state(first) | {"steps": torch.tensor(randint(g, 100, 999))} if same
                            else model_state(g, dtype=dtype, steps=randint(g, 100, 999)) for _ in range(n - 1)]
        out.append({"what": f"average({what})", "state_dicts": states, "weights": weights})
    return {"cases": out}


def average_collect(inputs: dict, average) -> dict:
    """Each case's merge, on copies of the state dicts and of the weights; the entries the call changed in those
    copies, whether it changed the weights list, and the entries of the result that share storage with an input."""
    out = []
    for case in inputs["cases"]:
        states = [{k: v.clone() for k, v in sd.items()} for sd in case["state_dicts"]]
        weights = None if case["weights"] is None else list(case["weights"])
        merged = attempt(average, states, weights)
        changed = [k for sd, original in zip(states, case["state_dicts"]) for k, v in original.items()
                   if not (isinstance(sd.get(k), torch.Tensor) and torch.equal(sd[k], v))]
        storages = {v.untyped_storage().data_ptr() for sd in states for v in sd.values()
                    if isinstance(v, torch.Tensor) and v.numel()}
        shared = [k for k, v in merged.items() if isinstance(v, torch.Tensor) and v.numel()
                  and v.untyped_storage().data_ptr() in storages] if isinstance(merged, dict) else []
        out.append({"merged": merged, "changed": changed, "shared": shared,
                    "weights_changed": weights != case["weights"], "weights_after": weights})
    return {"cases": out}


def average_suspects(tensors: list, weights) -> dict:
    w = [1.0] * len(tensors) if weights is None else weights
    x = [t.double() for t in tensors]
    weighted = sum(wi * xi for wi, xi in zip(w, x))
    suspects = {
        "the weighted sum is not divided by the sum of the weights: theta = sum_i w_i theta_i / sum_i w_i":
        lambda: weighted}
    if sum(w) != len(w):
        suspects["this divides by the number of models: divide the weighted sum by the sum of the weights"] = (
            lambda: weighted / len(w))
    if len(set(w)) > 1:
        suspects["the weights are ignored: this is the plain mean"] = lambda: sum(x) / len(x)
    if all(isinstance(wi, int) for wi in w):
        suspects["integer weights are divided with // (or cast to an integer tensor): w_i / sum_i w_i must be a float "
                 "division"] = lambda: sum((wi // sum(w)) * xi for wi, xi in zip(w, x))
    return suspects


AVERAGE_HINT = "theta = sum_i w_i theta_i / sum_i w_i for every float entry, with w_i = 1 when weights is None"


@define("09.average", average_inputs, average_collect)
def average(inputs: dict, out: dict) -> str:
    for case, got in zip(inputs["cases"], out["cases"], strict=True):
        what, states, weights = case["what"], case["state_dicts"], case["weights"]
        untouched(what, got["changed"], "the input state dicts")
        list_untouched(what, got["weights_changed"], "weights", got["weights_after"])
        merged = as_state(what, got["merged"], list(states[0]),
                          "every entry of the models is in the average; non-float ones are copied from the first")
        not_shared(what, got["shared"], "the input state dicts")
        for k, first in states[0].items():
            entry = f"{what}['{k}']"
            tensors = [sd[k] for sd in states]
            if not first.is_floating_point():
                copied(entry, merged[k], first, "state_dicts[0]", {
                    "the integer entry is averaged: copy it from state_dicts[0] unchanged":
                    lambda: sum(t.double() for t in tensors) / len(tensors),
                    "the integer entry is copied from the last model: copy it from the first": tensors[-1].double()})
                continue
            want = ref.mergekit_linear([t.double() for t in tensors], weights)
            compare(f"{entry} (vs mergekit's linear merge)", merged[k], want, tolerance(want, first.dtype),
                    float32_hint(merged[k], want, first.dtype, AVERAGE_HINT), average_suspects(tensors, weights))
            same_dtype(entry, merged[k], first)
    return ("equals mergekit's linear merge (sum_i w_i theta_i / sum_i w_i) with and without weights, in float64 and "
            "float32; copies of one model average to it; integer entries come from the first model; the inputs are "
            "left unchanged")


# ---------------------------------------------------------------- 2. task vectors and task arithmetic
TASK_CASES = [  # (dtype, number of fine-tunes, scales)
    (F64, 2, [0.8, 0.35]), (torch.float32, 3, [1.0, 0.5, -0.25])]


def task_inputs(seed: int, cases=TASK_CASES) -> dict:
    """A base with an integer ``steps``, its fine-tunes (whose ``steps`` differ), and their task vectors computed
    here (apply_task_vectors is judged on these, not on the student's own)."""
    g, out = seeded_generator(seed), []
    for dtype, n, scales in cases:
        base = model_state(g, dtype=dtype, steps=randint(g, 100, 999))
        fts = [finetune(g, base, scale=0.3) for _ in range(n)]
        vectors = [{k: ft[k] - base[k] for k in floats(base)} for ft in fts]
        out.append({"what": f"a base and {n} {str(dtype).removeprefix('torch.')} fine-tunes", "base": base,
                    "finetuned": fts, "vectors": vectors, "scales": scales})
    return {"cases": out}


def task_collect(inputs: dict, task_vector, apply_task_vectors) -> dict:
    """The student's task vectors; apply_task_vectors on the case's own vectors and scales, on one vector at -1
    (negation), on two at 1/2 each; the round trip apply(base, [task_vector(base, ft)], [1]); and the entries of
    base and the fine-tunes that either function changed in place."""
    out = []
    for case in inputs["cases"]:
        base = {k: v.clone() for k, v in case["base"].items()}
        fts = [{k: v.clone() for k, v in ft.items()} for ft in case["finetuned"]]
        vectors = [attempt(task_vector, base, ft) for ft in fts]
        by_vector = [k for sd, original in zip([base] + fts, [case["base"]] + case["finetuned"])
                     for k, v in original.items()
                     if not (isinstance(sd.get(k), torch.Tensor) and torch.equal(sd[k], v))]
        base = {k: v.clone() for k, v in case["base"].items()}
        vectors_changed, shared = [], []

        def apply(given: list, scales: list):
            """apply_task_vectors on copies of ``given``; notes the vectors' entries it changed and the entries of
            its result that share storage with base or a vector."""
            own = [{k: v.clone() for k, v in vector.items()} for vector in given]
            merged = attempt(apply_task_vectors, base, own, scales)
            vectors_changed.extend(k for new, old in zip(own, given) for k, v in old.items()
                                   if not (isinstance(new.get(k), torch.Tensor) and torch.equal(new[k], v)))
            storages = {v.untyped_storage().data_ptr() for sd in [base, *own] for v in sd.values()
                        if isinstance(v, torch.Tensor) and v.numel()}
            if isinstance(merged, dict):
                shared.extend(k for k, v in merged.items() if isinstance(v, torch.Tensor) and v.numel()
                              and v.untyped_storage().data_ptr() in storages)
            return merged

        applied = apply(case["vectors"], list(case["scales"]))
        negated = apply(case["vectors"][:1], [-1.0])
        halves = apply(case["vectors"][:2], [0.5, 0.5])
        round_trip = [attempt(apply_task_vectors, base, [v], [1.0]) if isinstance(v, dict) and "raised" not in v
                      else v for v in vectors]
        by_apply = [k for k, v in case["base"].items() if not (isinstance(base.get(k), torch.Tensor)
                                                               and torch.equal(base[k], v))]
        out.append({"vectors": vectors, "applied": applied, "negated": negated, "halves": halves,
                    "round_trip": round_trip, "changed_by_task_vector": by_vector, "changed_by_apply": by_apply,
                    "vectors_changed_by_apply": vectors_changed, "shared_by_apply": shared})
    return {"cases": out}


TASK_HINT = "theta = theta_base + sum_i scales[i] tau_i, entry by entry; the entries no task vector has come from base"


@define("09.task_arithmetic", task_inputs, task_collect)
def task_arithmetic(inputs: dict, out: dict) -> str:
    for case, got in zip(inputs["cases"], out["cases"], strict=True):
        base, fts, scales, what = case["base"], case["finetuned"], case["scales"], case["what"]
        keys, names = floats(base), list(base)
        untouched(f"task_vector, on {what},", got["changed_by_task_vector"], "base or a fine-tune")
        untouched(f"apply_task_vectors, on {what},", got["changed_by_apply"], "base")
        untouched(f"apply_task_vectors, on {what},", got["vectors_changed_by_apply"], "the task vectors")
        not_shared(f"apply_task_vectors, on {what}", got["shared_by_apply"], "base or the task vectors")
        on = f", on {what}"
        for i, (ft, vector) in enumerate(zip(fts, got["vectors"], strict=True)):
            call = f"task_vector(base, finetuned[{i}])"
            vector = as_state(call + on, vector, keys, extra="a task vector holds the float entries only: leave the "
                                                             "others (an integer buffer) out")
            for k in keys:
                want = ft[k].double() - base[k].double()
                compare(f"{call}['{k}']{on} (vs finetuned - base)", vector[k], want, tolerance(want, base[k].dtype),
                        float32_hint(vector[k], want, base[k].dtype, "tau = theta_finetuned - theta_base"),
                        {"this is base - finetuned: tau = theta_finetuned - theta_base": -want})
                same_dtype(f"{call}['{k}']{on}", vector[k], base[k])
        calls = [
            (f"apply_task_vectors(base, {len(fts)} task vectors, scales={listed(scales)})", got["applied"], fts, scales,
             "mergekit's task_arithmetic"),
            ("apply_task_vectors(base, [tau_0], [-1.0])", got["negated"], fts[:1], [-1.0],
             "mergekit's task_arithmetic: forgetting by negation gives 2 base - finetuned"),
            ("apply_task_vectors(base, [tau_0, tau_1], [0.5, 0.5])", got["halves"], fts[:2], [0.5, 0.5],
             "mergekit's linear average of the two fine-tunes: task arithmetic at 1/2 each is averaging")]
        calls += [(f"apply_task_vectors(base, [task_vector(base, finetuned[{i}])], [1.0])", trip, [ft], [1.0],
                   f"finetuned[{i}]: the round trip gives the fine-tune back")
                  for i, (ft, trip) in enumerate(zip(fts, got["round_trip"], strict=True))]
        for call, merged, models, weights, by in calls:
            merged = as_state(call + on, merged, names, "the entries that no task vector has are copied from base")
            for k in names:
                if k not in keys:
                    copied(f"{call}['{k}']{on}", merged[k], base[k], "base", {
                        "the integer entry is the fine-tune's: copy it from base": models[0][k].double()})
                    continue
                want = ref.mergekit_task_arithmetic(base[k].double(), [m[k].double() for m in models], weights)
                if "linear" in by:
                    assert close(want, ref.mergekit_linear([m[k].double() for m in models]), 1e-12)
                taus = [m[k].double() - base[k].double() for m in models]
                compare(f"{call}['{k}']{on} (vs {by})", merged[k], want, tolerance(want, base[k].dtype),
                        float32_hint(merged[k], want, base[k].dtype, TASK_HINT), {
                    "the scales are ignored: theta = theta_base + sum_i scales[i] tau_i":
                    lambda: base[k].double() + sum(taus),
                    "the scaled sum is divided by the sum of the scales: task arithmetic adds sum_i scales[i] tau_i "
                    "to base, with no normalisation": lambda: ref.mergekit_task_arithmetic(
                        base[k].double(), [m[k].double() for m in models], weights, normalize=True),
                    "the scaled sum is divided by the number of task vectors: add sum_i scales[i] tau_i to base":
                    lambda: base[k].double() + sum(s * t for s, t in zip(weights, taus)) / len(taus)})
                same_dtype(f"{call}['{k}']{on}", merged[k], base[k])
    return ("task vectors equal finetuned - base (float entries only); apply_task_vectors equals mergekit's "
            "task_arithmetic, gives each fine-tune back from its task vector, forgets by negation, and averages at "
            "1/2 each; integer entries come from base; the inputs are left unchanged")


# ---------------------------------------------------------------- 3. TIES-merging
HAND_T = [[1.0, 0.125, 0.0, 0.0, -1.0, 0.5, 0.75, -0.25],  # the task vectors of the hand-made case (3 models)
          [-2.0, 0.25, 2.0, 0.0, 3.0, 0.5, -0.5, 0.5],
          [0.0, -1.0, 0.0, 0.0, -1.0, -0.25, 0.25, -0.25]]
HAND_BASE = [0.5, -0.25, 1.0, 0.0, 2.0, -1.5, 0.75, 0.25]  # dyadic: base + tau and theta - base are exact
HAND_WEIGHTS = [1.0, 0.5, 1.0]
# entry 0: the weighted sum is exactly 0 (elects +); 1: two small + against one large - (the mass elects -, a count
# +); 2: zeros beside one nonzero entry; 3: nothing agrees (the divisor is 0, taken as 1); 4: the weighted sum is -,
# the unweighted one +


def hand_ties_case() -> dict:
    base = {"w": torch.tensor(HAND_BASE, dtype=F64), "b": torch.tensor([0.5], dtype=F64), "steps": torch.tensor(7)}
    fts = [{"w": base["w"] + torch.tensor(t, dtype=F64), "b": base["b"] + torch.tensor([bt], dtype=F64),
            "steps": torch.tensor(7 + i)} for i, (t, bt) in enumerate(zip(HAND_T, (0.5, -1.0, 0.25)))]
    return {"what": "ties_merge(hand-made: a weighted sum of exactly 0, two small + against a large -, zeros, no "
                    "agreeing entry; 3 models, density=1.0, weights=[1.0, 0.5, 1.0])", "base": base,
            "finetuned": fts, "density": 1.0, "weights": HAND_WEIGHTS, "lam": 1.0}


TIES_CASES = [  # (number of fine-tunes, density, weights, lam, dtype, the model's sizes[, "empty": an empty entry too]),
    # or the hand-made case
    (3, 0.5, [1.0, 0.3, 2.0], 0.7, F64, (5, 6, 4)), (2, 0.3, None, 1.0, F64, (5, 6, 4)), "hand",
    (2, 0.1, [2.0, 1.0], 1.3, torch.float32, (5, 6, 4))]


def ties_inputs(seed: int, cases=TIES_CASES) -> dict:
    """Random fine-tunes whose deltas are distinct in float32 (no tie at the trim threshold) and of unlike sizes from
    tensor to tensor, and the hand-made case."""
    g, out = seeded_generator(seed), []
    for spec in cases:
        if spec == "hand":
            out.append(hand_ties_case())
            continue
        n, density, weights, lam, dtype, sizes, *empty = spec
        base = model_state(g, sizes, dtype=dtype, steps=randint(g, 100, 999))
        if empty:  # an empty float entry (a zero-size parameter): trim returns it as it is
            base = {k: v for k, v in base.items() if k != "steps"} | {"empty": torch.zeros(0, dtype=dtype),
                                                                       "steps": base["steps"]}
        small = ", so int(density * numel) = 0 for the biases and k = 1" if density * min(sizes[1:]) < 1 else ""
        shape = ("" if sizes == (5, 6, 4) else f" of a {' -> '.join(map(str, sizes))} model") + (
            " with an empty entry" if empty else "")
        out.append({"what": f"ties_merge({n} {str(dtype).removeprefix('torch.')} fine-tunes{shape}, density={density}"
                            f"{small}, weights={weights}, lam={lam})", "base": base,
                    "finetuned": [finetune(g, base) for _ in range(n)], "density": density, "weights": weights,
                    "lam": lam})
    return {"cases": out}


def ties_collect(inputs: dict, ties_merge) -> dict:
    out = []
    for case in inputs["cases"]:
        base = {k: v.clone() for k, v in case["base"].items()}
        fts = [{k: v.clone() for k, v in ft.items()} for ft in case["finetuned"]]
        weights = None if case["weights"] is None else list(case["weights"])
        merged = attempt(ties_merge, base, fts, case["density"], weights=weights, lam=case["lam"])
        changed = [k for sd, original in zip([base] + fts, [case["base"]] + case["finetuned"])
                   for k, v in original.items() if not (isinstance(sd.get(k), torch.Tensor) and torch.equal(sd[k], v))]
        storages = {v.untyped_storage().data_ptr() for sd in [base, *fts] for v in sd.values()
                    if isinstance(v, torch.Tensor) and v.numel()}
        shared = [k for k, v in merged.items() if isinstance(v, torch.Tensor) and v.numel()
                  and v.untyped_storage().data_ptr() in storages] if isinstance(merged, dict) else []
        out.append({"merged": merged, "changed": changed, "shared": shared,
                    "weights_changed": weights != case["weights"], "weights_after": weights})
    return {"cases": out}


def trim_variant(tau: torch.Tensor, density: float, k_min: int = 1, largest: bool = True, k_shift: int = 0,
                 kept_share: str = "density", per_row: bool = False) -> torch.Tensor:
    """mergekit's per-tensor trim, and wrong ones: ``k_shift`` (one entry more or fewer), ``kept_share`` "drop"
    (k from 1 - density), ``per_row`` (the k largest of each row of a 2-D tensor)."""
    if density >= 1 or tau.numel() == 0:
        return tau
    if per_row and tau.dim() == 2:
        return torch.stack([trim_variant(row, density, k_min, largest, k_shift, kept_share) for row in tau])
    share = 1 - density if kept_share == "drop" else density
    k = min(tau.numel(), max(0, max(k_min, int(share * tau.numel())) + k_shift))
    keep = torch.zeros(tau.numel(), dtype=torch.bool)
    keep[tau.abs().flatten().topk(k, largest=largest).indices] = True
    return tau * keep.view_as(tau)


def ties_variant(case: dict, trim: str = "tensor", k_min: int = 1, largest: bool = True, election: str = "mass",
                 zero_elects: float = 1.0, zeros_agree: bool = False, weighted_election: bool = True,
                 divisor: str = "agreeing weights", lam: str = "after", k_shift: int = 0, kept_share: str = "density",
                 per_row: bool = False, elect_untrimmed: bool = False, clamp_one: bool = False,
                 weighted: bool = True) -> dict:
    """TIES on the case's float entries, in float64, mergekit's way by default and in wrong ones for diagnoses:
    ``trim`` "tensor", "global" (one threshold over all the entries of a task vector) or "none"; ``k_min`` 0 (no
    max(1, .)); ``largest=False`` (the smallest kept); ``k_shift``, ``kept_share`` and ``per_row`` (see
    :func:`trim_variant`); ``election`` "mass" or "count"; ``zero_elects`` -1 (a sum of 0 elects -) or 0
    (torch.sign: nothing elected); ``zeros_agree``; ``weighted_election=False`` (the sign of the unweighted sum);
    ``elect_untrimmed`` (the sign of the weighted untrimmed vectors); ``divisor`` "agreeing weights", "count"
    (agreeing entries), "all weights", "n"; ``clamp_one`` (the divisor clamped to at least 1); ``weighted=False``
    (every weight 1); ``lam`` "after", "ignored" or "model" (lam times base + tau)."""
    base, fts, density = case["base"], case["finetuned"], case["density"]
    keys = floats(base)
    n = len(fts)
    w = torch.tensor([1.0] * n if case["weights"] is None or not weighted else case["weights"], dtype=F64)
    taus = [{k: ft[k].double() - base[k].double() for k in keys} for ft in fts]
    if trim == "global" and density < 1:
        trimmed = []
        for tau in taus:
            flat = torch.cat([tau[k].flatten() for k in keys])
            kept = trim_variant(flat, density, k_min, largest)
            sizes = [tau[k].numel() for k in keys]
            trimmed.append({k: part.view_as(tau[k]) for k, part in zip(keys, kept.split(sizes))})
    else:
        trimmed = [{k: trim_variant(tau[k], 1.0 if trim == "none" else density, k_min, largest, k_shift, kept_share,
                                    per_row) for k in keys} for tau in taus]
    out = {}
    for k in keys:
        view = w.view(-1, *[1] * base[k].dim())
        raw = torch.stack([t[k] for t in trimmed])
        deltas = view * raw
        vote = view * torch.stack([t[k] for t in taus]) if elect_untrimmed else (deltas if weighted_election else raw)
        total = vote.sign().sum(0) if election == "count" else vote.sum(0)
        elected = torch.where(total > 0, 1.0, torch.where(total < 0, -1.0, zero_elects)).to(F64)
        agree = (deltas.sign() == elected) | ((deltas == 0) if zeros_agree else False)
        denominator = {"agreeing weights": (view * agree).sum(0), "count": agree.to(F64).sum(0),
                       "all weights": w.sum() * torch.ones_like(elected), "n": n * torch.ones_like(elected)}[divisor]
        denominator = (denominator.clamp(min=1) if clamp_one else
                       torch.where(denominator == 0, torch.ones_like(denominator), denominator))
        tau = (deltas * agree).sum(0) / denominator
        scale = 1.0 if lam == "ignored" else case["lam"]
        out[k] = scale * (base[k].double() + tau) if lam == "model" else base[k].double() + scale * tau
    return out


def peft_ties_state(case: dict) -> dict:
    """peft's TIES (``references.peft_ties``: unweighted election, count divisor, k = int(density n)) on each float
    entry, with the lab's lam on the merged task vector."""
    base = case["base"]
    out = {}
    for k in floats(base):
        b = base[k].double()
        out[k] = b + case["lam"] * (ref.peft_ties(b, [ft[k].double() for ft in case["finetuned"]], case["density"],
                                                  case["weights"]) - b)
    return out


def ties_suspects(case: dict) -> dict[str, callable]:
    """Diagnosis -> a function giving that wrong version's state dict (float entries)."""
    v = functools.partial(ties_variant, case)
    unequal = case["weights"] is not None and len(set(case["weights"])) > 1
    suspects = {
        "the task vectors are not trimmed: keep only the k = max(1, int(density * numel)) largest |tau| of each "
        "tensor": lambda: v(trim="none"),
        "the trim keeps the smallest entries: keep the k largest |tau| (torch.topk of tau.abs())":
        lambda: v(largest=False),
        "the trim keeps k = int(density * numel) entries, none when that is 0: k = max(1, int(density * numel))":
        lambda: v(k_min=0),
        "the trim is global (one threshold over all the entries of a task vector): trim each tensor on its own, "
        "k = max(1, int(density * numel)) per tensor, as mergekit does": lambda: v(trim="global"),
        "the sign is elected by count (the sign of sum_i sign(tau_i)): TIES elects the sign with more mass, "
        "sign(sum_i w_i tau_i)": lambda: v(election="count"),
        "a weighted sum of exactly 0 elects -: it elects + (sum >= 0)": lambda: v(zero_elects=-1.0),
        "zero entries are counted as agreeing: a trimmed (or unchanged) entry has sign 0 and agrees with no sign, "
        "so its weight is not in the divisor": lambda: v(zeros_agree=True)}
    if unequal:
        suspects |= {
            "this is peft's TIES: it elects the sign from the unweighted trimmed vectors and divides by the number of "
            "agreeing entries; mergekit (the lab's semantics) weights each trimmed vector before the election and "
            "divides by the sum of the agreeing weights": lambda: peft_ties_state(case),
            "the sign is elected from the unweighted sum (peft's way): mergekit multiplies each trimmed vector by "
            "its weight first and elects sign(sum_i w_i tau_i)": lambda: v(weighted_election=False),
            "the divisor is the number of agreeing entries (peft's way): mergekit divides by the sum of their "
            "weights": lambda: v(divisor="count")}
    suspects |= {
        "this divides by the weights of all the models (or their number): the disjoint mean divides by the sum of "
        "the weights of the agreeing entries only": lambda: v(divisor="all weights")}
    if unequal:
        suspects["this divides by the number of models: the disjoint mean divides by the sum of the weights of the "
                 "agreeing entries only"] = lambda: v(divisor="n")
    if case["lam"] != 1:
        suspects |= {
            "lam has no effect (multiplying the weights by it cancels in the division): theta = base + lam * "
            "(disjoint mean)": lambda: v(lam="ignored"),
            "lam multiplies base too: theta = base + lam * (disjoint mean)": lambda: v(lam="model")}
    suspects |= {
        "the trim keeps one entry too many (k + 1): keep exactly k = max(1, int(density * numel)) entries; int "
        "truncates (0.3 * 30 is 8.999..., so k = 8: not round or ceil), and kthvalue counts from the smallest (the "
        "k-th largest |tau| is kthvalue(numel - k + 1))": lambda: v(k_shift=1),
        "the trim keeps one entry too few (k - 1): keep the k = max(1, int(density * numel)) largest |tau|; with a "
        "threshold t, the k-th largest itself, keep |tau| >= t": lambda: v(k_shift=-1),
        "the trim keeps a share 1 - density of the entries: density is the share kept, k = max(1, int(density * "
        "numel))": lambda: v(kept_share="drop"),
        "the trim keeps the largest entries of each row: trim each tensor as a whole, flattened, k = max(1, "
        "int(density * numel)) per tensor": lambda: v(per_row=True),
        "where the weighted sum is exactly 0 no sign is elected (torch.sign gives 0 there): a sum of 0 elects +, "
        "torch.where(total >= 0, 1.0, -1.0)": lambda: v(zero_elects=0.0),
        "the sign is elected from the untrimmed task vectors: trim first, then elect from the sum of the trimmed, "
        "weighted ones": lambda: v(elect_untrimmed=True)}
    if any(wi < 1 for wi in (case["weights"] or [])):
        suspects["the divisor is clamped to at least 1 (peft's clamp(min=1), meant for a count): the sum of the "
                 "agreeing weights may be below 1; replace only a divisor of 0 by 1"] = lambda: v(clamp_one=True)
    if unequal:
        suspects["the weights are ignored: delta_i = w_i * trimmed tau_i before the election, and the divisor is the "
                 "sum of the agreeing weights"] = lambda: v(weighted=False)
    return suspects


TIES_HINT = ("per tensor: trim each tau_i = theta_i - base to its k = max(1, int(density * numel)) largest |tau|; "
             "delta_i = w_i * trimmed tau_i; elect + where sum_i delta_i >= 0, else -; sum the delta_i of the elected "
             "sign and divide by the sum of their weights (a zero never agrees; a divisor of 0 is 1); base + lam * "
             "that")


@define("09.ties_merge", ties_inputs, ties_collect)
def ties_merge(inputs: dict, out: dict) -> str:
    for case, got in zip(inputs["cases"], out["cases"], strict=True):
        what, base = case["what"], case["base"]
        untouched(what, got["changed"], "base or a fine-tune")
        list_untouched(what, got["weights_changed"], "weights", got["weights_after"])
        if raised(got["merged"]) and any(v.numel() == 0 for v in base.values()):
            raise AssertionError(f"{what} raised {raised(got['merged'])}: the model has an empty float entry, and "
                                 "trim must return an empty delta as it is (topk of k = max(1, 0) = 1 entries of an "
                                 "empty tensor raises)")
        merged = as_state(what, got["merged"], list(base), "non-float entries are copied from base")
        not_shared(what, got["shared"], "base or a fine-tune")
        baseline = ties_variant(case)
        suspects = {name: functools.cache(bug) for name, bug in ties_suspects(case).items()}
        for k, value in base.items():
            entry = f"{what}['{k}']"
            if not value.is_floating_point():
                copied(entry, merged[k], value, "base")
                continue
            want = ref.mergekit_ties(value.double(), [ft[k].double() for ft in case["finetuned"]], case["density"],
                                     case["weights"], case["lam"])
            assert close(baseline[k], want, 1e-9), "the suspects' baseline departs from mergekit"
            got_k = merged[k]
            if got_k.shape == want.shape and not torch.isfinite(got_k.double()).all():
                raise AssertionError(f"{entry}: non-finite values, where no entry agrees with the elected sign (all "
                                     "trimmed to 0, or all unchanged): the sum of the agreeing weights is 0 there; "
                                     "divide by 1 instead (the sum of the agreeing entries is 0 too)")
            compare(f"{entry} (vs mergekit's ties)", got_k, want, tolerance(want, value.dtype),
                    float32_hint(got_k, want, value.dtype, TIES_HINT),
                    {name: (lambda bug=bug, k=k: bug()[k]) for name, bug in suspects.items()})
            same_dtype(entry, got_k, value)
            if case["weights"] is None and (case["density"] >= 1 or int(case["density"] * value.numel()) >= 1):
                # with every weight 1 and k >= 1, peft's unweighted election and count divisor are mergekit's too
                compare(f"{entry} (vs peft's ties, every weight 1)", got_k, peft_ties_state(case)[k],
                        tolerance(want, value.dtype), TIES_HINT)
    return ("equals mergekit's ties (per-tensor trim with k = max(1, int(density n)), the election by weighted mass "
            "with 0 as +, the disjoint mean over the agreeing weights, lam) with 2 and 3 models, unequal weights, "
            "density 0.1 to 1, float64 and float32, and peft's ties where the two agree (every weight 1); peft's "
            "unweighted election and count divisor are told apart")


# ---------------------------------------------------------------- 4. DARE
DARE_CASES = [  # (what, shapes, dtype, drop_rate, rescale, kind)
    ("a task vector of 3 tensors", {"fc1.weight": (40, 30), "fc1.bias": (40,), "fc2.weight": (10, 40)}, F64, 0.3,
     "inverse", "randn"),
    ("a task vector of 3 tensors", {"fc1.weight": (40, 30), "fc1.bias": (40,), "fc2.weight": (10, 40)}, F64, 0.6,
     "l1", "randn"),
    ("one float32 tensor of 50,000 entries", {"w": (250, 200)}, torch.float32, 0.9, "l1", "randn"),
    ("one float32 tensor of 50,000 entries", {"w": (250, 200)}, torch.float32, 0.3, "inverse", "randn"),
    ("40,000 equal entries 0.5", {"w": (200, 200)}, F64, 0.7, "inverse", "equal"),
    ("drop_rate 0: nothing dropped", {"a": (6, 5), "b": (5,)}, F64, 0.0, "inverse", "randn"),
    ("drop_rate 0: nothing dropped", {"a": (6, 5), "b": (5,)}, F64, 0.0, "l1", "randn"),
    ("drop_rate 1: everything dropped", {"a": (6, 5), "b": (5,)}, F64, 1.0, "inverse", "randn"),
    ("drop_rate 1: everything dropped", {"a": (6, 5), "b": (5,)}, F64, 1.0, "l1", "randn")]


def dare_inputs(seed: int, cases=DARE_CASES) -> dict:
    """Task vectors of normal entries (none is 0: the kept entries are where the output is nonzero), or of equal
    entries; a seed per case."""
    g, out = seeded_generator(seed), []
    for what, shapes, dtype, p, rescale, kind in cases:
        vector = {k: (torch.full(shape, 0.5, dtype=F64) if kind == "equal" else
                      torch.randn(shape, generator=g, dtype=F64)).to(dtype) for k, shape in shapes.items()}
        for v in vector.values():
            v[v == 0] = 1.0
        s = randint(g, 0, 10**6)
        out.append({"what": f"dare({what}, drop_rate={p}, seed={s}, rescale={rescale!r})", "vector": vector,
                    "drop_rate": p, "seed": s, "rescale": rescale})
    return {"cases": out}


def dare_collect(inputs: dict, dare) -> dict:
    """Each case's output, on a copy of the vector, and the entries the call changed in that copy; then the first
    case again with its seed and with the next seed."""
    out = []
    for case in inputs["cases"]:
        vector = {k: v.clone() for k, v in case["vector"].items()}
        dropped = attempt(dare, vector, case["drop_rate"], case["seed"], rescale=case["rescale"])
        changed = [k for k, v in case["vector"].items()
                   if not (isinstance(vector.get(k), torch.Tensor) and torch.equal(vector[k], v))]
        storages = {v.untyped_storage().data_ptr() for v in vector.values() if isinstance(v, torch.Tensor) and v.numel()}
        shared = [k for k, v in dropped.items() if isinstance(v, torch.Tensor) and v.numel()
                  and v.untyped_storage().data_ptr() in storages] if isinstance(dropped, dict) else []
        out.append({"dropped": dropped, "changed": changed, "shared": shared})
    first = inputs["cases"][0]
    again = [attempt(dare, {k: v.clone() for k, v in first["vector"].items()}, first["drop_rate"], s,
                     rescale=first["rescale"]) for s in (first["seed"], first["seed"] + 1)]
    return {"cases": out, "same_seed": again[0], "next_seed": again[1]}


def dare_expected(v: torch.Tensor, mask: torch.Tensor, p: float, rescale: str) -> torch.Tensor:
    """DARE given the kept entries ``mask``: v mask / (1 - p) ("inverse"), or mergekit's L1 rescale ("l1")."""
    if rescale == "l1":
        return ref.mergekit_rescale(v, mask)
    return torch.where(mask, v.double() / (1 - p), 0.0) if p < 1 else torch.zeros_like(v, dtype=F64)


def dare_suspects(v: torch.Tensor, mask: torch.Tensor, p: float, rescale: str, vector: dict, masks: dict) -> dict:
    """Wrong rescales of the kept entries ``mask`` (and ``masks`` of the whole vector, for a dict-wide L1)."""
    kept = torch.where(mask, v.double(), 0.0)
    suspects = {}
    if p > 0:
        suspects["the vector is returned as it is: drop each entry with probability drop_rate"] = v.double()
    if p < 1:
        suspects |= {
            "the kept entries are not rescaled: multiply them by " + (
                "1 / (1 - drop_rate)" if rescale == "inverse" else "||tau||_1 / ||kept||_1, per tensor"): kept,
            "the kept entries are multiplied by 1 - drop_rate: divide them by it": kept * (1 - p)}
        if p > 0:
            suspects["the kept entries are divided by drop_rate: divide them by 1 - drop_rate, the keep "
                     "probability"] = kept / p
    if rescale == "l1" and p < 1:
        suspects["rescale='l1' divides by 1 - drop_rate: it multiplies the kept entries by ||tau||_1 / "
                 "||kept||_1 of the tensor, so that its L1 norm is kept exactly"] = kept / (1 - p)
        suspects["the L1 rescale is taken over the whole dict: it is per tensor, ||tau||_1 / ||kept||_1 of "
                 "each"] = lambda: kept * (sum(x.double().abs().sum() for x in vector.values())
                                           / sum(torch.where(m, x.double(), 0.0).abs().sum()
                                                 for x, m in zip(vector.values(), masks.values())))
        suspects["this rescales by the L2 norm: rescale='l1' keeps the L1 norm, ||tau||_1 / ||kept||_1"] = (
            lambda: ref.mergekit_rescale(v.double(), mask, "l2"))
    if rescale == "inverse" and 0 < p < 1:
        suspects["rescale='inverse' keeps the L1 norm (that is 'l1'): it multiplies the kept entries by "
                 "1 / (1 - drop_rate)"] = lambda: ref.mergekit_rescale(v.double(), mask)
    return suspects


DARE_RULE = ("g = torch.Generator().manual_seed(seed) once for the whole dict; for each tensor in the dict's order, "
             "keep entry j where torch.rand(shape, generator=g)[j] < 1 - drop_rate (float32 uniforms)")


def dare_mask_suspects(case: dict, index: int) -> dict:
    """Masks of wrong rules, for the tensor at ``index`` of the case's vector (float64, 1 = kept)."""
    shapes = [tuple(v.shape) for v in case["vector"].values()]
    p, s = case["drop_rate"], case["seed"]
    uniforms = lambda dtype: [torch.rand(shape, generator=gen, dtype=dtype)
                              for gen in [torch.Generator().manual_seed(s)] for shape in shapes]
    return {
        "each tensor's mask comes from a new generator seeded with seed: draw from one generator for the whole "
        "dict, tensor after tensor": lambda: ref.dare_masks([shapes[index]], p, s)[0].double(),
        "this keeps an entry with probability drop_rate: keep it where the uniform is below 1 - drop_rate":
        lambda: (uniforms(torch.float32)[index] < p).double(),
        "this keeps an entry where the uniform is at least drop_rate: the rule keeps it where it is below "
        "1 - drop_rate": lambda: (uniforms(torch.float32)[index] >= p).double(),
        "the uniforms are drawn in float64, the tensor's dtype (as peft, and torch.bernoulli(torch.full_like(tau, "
        "1 - p)), draw them): the rule draws float32 uniforms, torch.rand(shape, generator=g) with the default dtype":
        lambda: ref.dare_masks(shapes, p, s, torch.float64)[index].double(),
        "each tensor's mask comes from a generator seeded with seed + its index: seed one generator once, with seed, "
        "and draw every tensor's uniforms from it in turn": lambda: ref.dare_masks([shapes[index]], p, s + index)[0]
        .double(),
        "the masks are drawn in sorted order of the names: draw them in the dict's own order": lambda: dict(zip(
            sorted(case["vector"]), ref.dare_masks([shapes[list(case["vector"]).index(k)] for k in sorted(
                case["vector"])], p, s)))[list(case["vector"])[index]].double()}


def check_dropped(case: dict, got, masks: dict | None = None) -> dict:
    """The case's output as a state dict of finite tensors of the vector's shapes and dtypes; its kept entries."""
    what, vector = case["what"], case["vector"]
    dropped = as_state(what, got, list(vector), "return every entry of the task vector, dropped and rescaled")
    kept = {}
    for k, v in vector.items():
        x = dropped[k]
        if x.shape != v.shape:
            raise AssertionError(f"{what}['{k}']: shape {tuple(x.shape)}, expected {tuple(v.shape)}")
        if not torch.isfinite(x.double()).all():
            raise AssertionError(
                f"{what}['{k}']: non-finite values" + (
                    ": with drop_rate = 1 everything is dropped, and 1 / (1 - drop_rate) divides by 0; return zeros"
                    if case["drop_rate"] == 1 else
                    ": where every entry of a tensor is dropped, ||kept||_1 = 0 and the L1 rescale divides by 0; "
                    "return the zeros unscaled"))
        same_dtype(f"{what}['{k}']", x, v)
        kept[k] = (x != 0) & (v != 0)
    return kept


@define("09.dare", dare_inputs, dare_collect)
def dare(inputs: dict, out: dict) -> str:
    cases = inputs["cases"]
    for case, got in zip(cases, out["cases"], strict=True):
        untouched(case["what"], got["changed"], "the task vector")
        not_shared(case["what"], got["shared"], "the task vector")
    first = cases[0]
    kept = check_dropped(first, out["cases"][0]["dropped"])
    for name, seed, again in (("the same seed", first["seed"], out["same_seed"]),
                              ("the next seed", first["seed"] + 1, out["next_seed"])):
        call = first["what"].replace(f"seed={first['seed']}", f"seed={seed}")
        other = check_dropped(first | {"what": call + f", called again with {name}"}, again)
        same = all(torch.equal(kept[k], other[k]) for k in kept)
        if name == "the same seed" and not same:
            raise AssertionError(f"{call}: two calls with the same seed kept different entries: draw the masks from "
                                 "a generator seeded with `seed`, torch.Generator().manual_seed(seed), not from the "
                                 "global one")
        if name == "the next seed" and same:
            raise AssertionError(f"{call}: seeds {first['seed']} and {seed} kept the same entries: the seed must "
                                 "seed the generator the masks are drawn from")
    for case, got in zip(cases, out["cases"], strict=True):
        what, vector, p, rescale = case["what"], case["vector"], case["drop_rate"], case["rescale"]
        kept = check_dropped(case, got["dropped"])
        rules = ref.dare_masks([v.shape for v in vector.values()], p, case["seed"])
        for index, ((k, v), rule) in enumerate(zip(vector.items(), rules)):
            entry, x = f"{what}['{k}']", got["dropped"][k]
            want = dare_expected(v, kept[k], p, rescale)
            how = "v * kept / (1 - drop_rate)" if rescale == "inverse" else "mergekit's L1 rescale"
            compare(f"{entry}, given the entries it kept (vs {how})", x, want, tolerance(want, v.dtype),
                    float32_hint(x, want, v.dtype, "keep each entry with probability 1 - drop_rate, then multiply the "
                                 "kept entries by " + ("1 / (1 - drop_rate)" if rescale == "inverse" else
                                                       "||tau||_1 / ||kept||_1 of the tensor")),
                    dare_suspects(v, kept[k], p, rescale, vector, kept))
            n = v.numel()
            if n >= 1000 and 0 < p < 1:
                share, sigma = kept[k].double().mean().item(), math.sqrt(p * (1 - p) / n)
                if abs(share - (1 - p)) > 5 * sigma:
                    flipped = abs(share - p) <= 5 * sigma
                    raise AssertionError(
                        f"{entry}: kept {share:.4f} of the {n} entries, expected 1 - drop_rate = {1 - p:g} (within "
                        f"5 standard deviations, {5 * sigma:.4f})" + (
                            ": this keeps each entry with probability drop_rate; drop_rate is the probability of "
                            "dropping it" if flipped else ""))
                if rescale == "inverse" and bool((v == v.flatten()[0]).all()):
                    mean = x.double().mean().item()
                    if abs(mean - v.flatten()[0].item()) > 5 * sigma * abs(v.flatten()[0].item()) / (1 - p):
                        raise AssertionError(f"{entry}: the mean of the output is {mean:.5f}, not the entries' "
                                             f"{v.flatten()[0].item():g}: the inverse rescale keeps every entry's "
                                             "expectation, E[tau m / (1 - p)] = tau")
            if not torch.equal(kept[k], rule):
                wrong = int((kept[k] != rule).sum())
                advice = first_match(kept[k].double(), dare_mask_suspects(case, index), 0)
                raise AssertionError(
                    f"{entry}: {wrong} of its {n} entries are kept or dropped unlike the lab's rule ({DARE_RULE})"
                    + (f". {advice}" if advice else ""))
        if len(vector) == 1 and 0 < p < 1 and next(iter(vector.values())).dtype == torch.float32:
            (k, v), = vector.items()
            library = (ref.mergekit_dare(v, p, case["seed"]) if rescale == "l1" else ref.peft_dare(v, p, case["seed"]))
            compare(f"{what}['{k}'] (vs " + ("mergekit's DARE: sparsify.bernoulli after torch.manual_seed(seed), L1 "
                                             "rescale)" if rescale == "l1" else
                                             "peft's random_pruning after torch.manual_seed(seed), 1 / (1 - p))"),
                    got["dropped"][k], library, tolerance(library, v.dtype))
    return ("keeps the entries of the lab's rule (one seeded generator, float32 uniforms, tensor by tensor; the same "
            "seed gives the same masks, the next seed others); about 1 - drop_rate of a large tensor; 1 / (1 - p) "
            "keeps the expectation and equals peft's random_pruning, 'l1' equals mergekit's rescale and its DARE; "
            "drop_rate 0 returns the vector, drop_rate 1 zeros")


# ---------------------------------------------------------------- 5. SLERP
def pair_with_cos(g: torch.Generator, shape: tuple, cos: float, norm_a: float, norm_b: float) -> tuple:
    """float64 tensors a, b of ``shape`` with norms ``norm_a``, ``norm_b`` and cosine ``cos`` between them."""
    n = math.prod(shape)
    a = torch.randn(n, generator=g, dtype=F64)
    a = a / a.norm()
    u = torch.randn(n, generator=g, dtype=F64)
    u = u - (u @ a) * a
    u = u / u.norm()
    b = cos * a + math.sqrt(max(0.0, 1 - cos * cos)) * u
    return (norm_a * a).view(shape), (norm_b * b).view(shape)


def slerp_pair(g: torch.Generator, dtype=F64, edge: bool = False) -> tuple[dict, dict, dict]:
    """Two state dicts whose entries cover mergekit's cases, in this order: unequal norms at an angle; the two rows
    of the notes' example (a whole-tensor angle unlike the rows'); one-entry tensors (exactly parallel: lerp);
    nearly parallel (|cos| = 0.9997: lerp); nearly opposite (cos = -0.9997: lerp); exactly opposite; a zero tensor
    (not normalised: sin(t pi/2) b); unit vectors; an integer buffer (copied from a); and, ``edge``, two zero
    tensors, two equal tensors and a tensor of norm 1e-9 (at most eps: not normalised). And what each entry is."""
    entries = {"fc1.weight": ((6, 5), 0.35, 1.5, 4.0), "fc1.bias": ((6,), -0.6, 0.8, 0.3),
               "near": ((4,), 0.9997, 4.0, 10.0), "near_opposite": ((4,), -0.9997, 3.0, 5.0),
               "unit": ((10,), 0.2, 1.0, 1.0)}
    made = {k: pair_with_cos(g, *spec) for k, spec in entries.items()}
    opposite = torch.randn(5, generator=g, dtype=F64)
    made["rows"] = (torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=F64), torch.tensor([[0.0, 1.0], [0.0, 1.0]],
                                                                                      dtype=F64))
    made["gain"] = (torch.tensor([2.0], dtype=F64), torch.tensor([3.0], dtype=F64))
    made["opposite"] = (opposite, -0.5 * opposite)
    made["zero"] = (torch.zeros(4, dtype=F64), torch.randn(4, generator=g, dtype=F64))
    order = ["fc1.weight", "fc1.bias", "rows", "gain", "near", "near_opposite", "opposite", "zero", "unit"]
    if edge:
        same = torch.randn(3, 2, generator=g, dtype=F64)
        made |= {"both_zero": (torch.zeros(3, dtype=F64), torch.zeros(3, dtype=F64)), "same": (same, same.clone()),
                 "tiny": (1e-9 * pair_with_cos(g, (5,), 0.6, 1.0, 1.0)[0], torch.randn(5, generator=g, dtype=F64))}
        order += ["both_zero", "same", "tiny"]
    a = {k: made[k][0].to(dtype) for k in order} | {"steps": torch.tensor(randint(g, 1, 99))}
    b = {k: made[k][1].to(dtype) for k in order} | {"steps": torch.tensor(randint(g, 100, 999))}
    kinds = {"fc1.weight": "unequal norms", "fc1.bias": "an obtuse angle", "rows": "a whole-tensor angle",
             "gain": "one entry each: parallel", "near": "nearly parallel", "near_opposite": "nearly opposite",
             "opposite": "opposite", "zero": "a = 0", "unit": "unit vectors", "both_zero": "a = b = 0",
             "same": "a = b: parallel", "tiny": "|a| = 1e-9, at most eps"}
    return a, b, kinds


SLERP_CASES = [(F64, [0.3, 0.0, 1.0]), (torch.float32, [0.5, 0.8])]  # (dtype, the ts of the calls)


def slerp_inputs(seed: int, cases=SLERP_CASES, edge: bool = False) -> dict:
    g, out = seeded_generator(seed), []
    for dtype, ts in cases:
        a, b, kinds = slerp_pair(g, dtype, edge)
        out.append({"what": f"slerp(a, b, t) on {str(dtype).removeprefix('torch.')} state dicts", "a": a, "b": b,
                    "ts": ts, "kinds": kinds})
    return {"cases": out}


def slerp_collect(inputs: dict, slerp) -> dict:
    """Each case's merge at each of its ts, on copies of a and b, and the entries of each merge that share storage
    with a or b."""
    cases, shared = [], []
    for case in inputs["cases"]:
        merges, sharing = [], []
        for t in case["ts"]:
            a, b = ({k: v.clone() for k, v in case[x].items()} for x in ("a", "b"))
            merged = attempt(slerp, a, b, t)
            storages = {v.untyped_storage().data_ptr() for sd in (a, b) for v in sd.values()
                        if isinstance(v, torch.Tensor) and v.numel()}
            merges.append(merged)
            sharing.append([k for k, v in merged.items() if isinstance(v, torch.Tensor) and v.numel()
                            and v.untyped_storage().data_ptr() in storages] if isinstance(merged, dict) else [])
        cases.append(merges)
        shared.append(sharing)
    return {"cases": cases, "shared": shared}


def slerp_variant(a: torch.Tensor, b: torch.Tensor, t: float, how: str = "", eps: float = 1e-8) -> torch.Tensor:
    """SLERP of whole tensors in float64, mergekit's way by default, and wrong ways for diagnoses: ``how`` "lerp",
    "no_fallback", "cos_threshold" (lerp only for cos > 0.9995), "degrees" (the angle in degrees), "unit" (the
    coefficients multiply the normalised tensors), "renormalised" (that, times (1 - t)|a| + t|b|), "eps_clamp" (a
    norm below eps taken as eps), "eps_added" (a / (|a| + eps)) or "raw_cos" (the cosine from the raw dot
    product)."""
    x, y = a.double().flatten(), b.double().flatten()
    na, nb = x.norm().item(), y.norm().item()
    na1, nb1 = (na if na > eps else 1.0), (nb if nb > eps else 1.0)
    if how == "eps_clamp":  # F.normalize and F.cosine_similarity divide by max(norm, eps)
        na1, nb1, how = max(na, eps), max(nb, eps), ""
    if how == "raw_cos":  # the cosine from <a, b>, not normalised
        na1, nb1, how = 1.0, 1.0, ""
    if how == "eps_added":  # a / (|a| + eps)
        na1, nb1, how = na + eps, nb + eps, ""
    cos = max(-1.0, min(1.0, ((x / na1) @ (y / nb1)).item()))
    lerp = ((1 - t) * x + t * y).view(a.shape)
    if how == "lerp" or (how not in ("no_fallback", "cos_threshold") and abs(cos) > THRESHOLD) or (
            how == "cos_threshold" and cos > THRESHOLD):
        return lerp
    theta = math.acos(cos) * (180 / math.pi if how == "degrees" else 1.0)
    s = math.sin(theta)
    if how in ("unit", "renormalised"):
        out = (math.sin((1 - t) * theta) * x / na1 + math.sin(t * theta) * y / nb1) / s
        return (out * ((1 - t) * na + t * nb) if how == "renormalised" else out).view(a.shape)
    return ((math.sin((1 - t) * theta) * x + math.sin(t * theta) * y) / s).view(a.shape)


def slerp_suspects(a: torch.Tensor, b: torch.Tensor, t: float, kind: str) -> dict:
    v = functools.partial(slerp_variant, a, b, t)
    lerp_name = ("with a = 0 this lerps to t b: mergekit takes a norm <= eps as 1 (the zero tensor is not "
                 "normalised), so cos = 0, the angle is pi/2, and the result is sin(t pi/2) b" if kind == "a = 0" else
                 "this is linear interpolation, (1 - t) a + t b, where mergekit's SLERP follows the arc: "
                 "sin((1 - t) Omega) / sin(Omega) a + sin(t Omega) / sin(Omega) b, lerp only when |cos Omega| > "
                 "0.9995 (if your cos Omega is the raw dot product <a, b>, it is clamped to 1 here and the fallback "
                 "lerps: normalise first, <a/|a|, b/|b|>)")
    suspects = {
        lerp_name: lambda: v("lerp"),
        "t runs the wrong way: t = 0 gives a, t = 1 gives b": lambda: slerp_variant(a, b, 1 - t),
        "the lerp fallback is taken only for cos > 0.9995: nearly opposite tensors (cos < -0.9995) lerp too, "
        "|cos Omega| > 0.9995": lambda: v("cos_threshold"),
        "the coefficients multiply the normalised tensors: mergekit's multiply the raw a and b (the result is "
        "not renormalised)": lambda: v("unit"),
        "the result is renormalised to (1 - t) |a| + t |b|: mergekit's coefficients multiply the raw a and b, and "
        "the result is not rescaled": lambda: v("renormalised"),
        "the angle is in degrees: sin and cos take radians, Omega = acos(cos) as torch.acos returns it":
        lambda: v("degrees"),
        "cos Omega is the raw dot product <a, b>: normalise first, cos Omega = <a/|a|, b/|b|>": lambda: v("raw_cos"),
        "this follows the arc where |cos Omega| > 0.9995: fall back to (1 - t) a + t b above 0.9995 (strictly), as "
        "mergekit does": lambda: v("no_fallback"),
        "the tensors are normalised by |a| + eps: mergekit divides by the norm itself, and takes a norm <= eps as 1":
        lambda: v("eps_added")}
    if kind.startswith("|a| = 1e-9"):
        suspects["a tensor of norm at most eps is divided by eps (F.normalize and F.cosine_similarity clamp the norm "
                 "at eps): mergekit takes its norm as 1, so it is not normalised at all"] = lambda: v("eps_clamp")
    if not 0 <= t <= 1:
        suspects["t is clamped to [0, 1]: mergekit extrapolates beyond the endpoints, with the same formula"] = (
            lambda: slerp_variant(a, b, min(1.0, max(0.0, t))))
    if a.dim() == 2:
        suspects["this slerps row by row (mergekit's slerp function called on a 2-D tensor treats dim 0 as a batch): "
                 "the merge slerps each tensor as a whole, flattened"] = lambda: ref.mergekit_slerp_rows(
                     a.double(), b.double(), t)
    return suspects


SLERP_HINT = ("each float tensor flattened as a whole: cos Omega = <a/|a|, b/|b|> clamped to [-1, 1] (a norm <= eps "
              "taken as 1); (1 - t) a + t b if |cos Omega| > 0.9995, else sin((1 - t) Omega) / sin(Omega) a + "
              "sin(t Omega) / sin(Omega) b, on the raw a and b")


@define("09.slerp", slerp_inputs, slerp_collect)
def slerp(inputs: dict, out: dict) -> str:
    for case, outputs, sharing in zip(inputs["cases"], out["cases"], out["shared"], strict=True):
        a, b = case["a"], case["b"]
        for t, got, shared in zip(case["ts"], outputs, sharing, strict=True):
            what = case["what"].replace("t)", f"t={t})")
            merged = as_state(what, got, list(a), "non-float entries are copied from a")
            not_shared(what, shared, "a or b")
            for k, x in a.items():
                entry = f"{what}['{k}']"
                if not x.is_floating_point():
                    copied(entry, merged[k], x, "a", {"the integer entry is b's: copy it from a": b[k].double()})
                    continue
                kind = case["kinds"][k]
                entry += f" ({kind})"
                want = ref.mergekit_slerp(x, b[k], t).double()
                assert close(slerp_variant(x, b[k], t), want, 1e-5), "the suspects' baseline departs from mergekit"
                y = merged[k]
                if y.shape == x.shape and not torch.isfinite(y.double()).all():
                    raise AssertionError(f"{entry}: non-finite values. " + (
                        "a is the zero tensor here: a norm <= eps is taken as 1 (the tensor is not normalised), so "
                        "cos Omega = 0" if kind in ("a = 0", "a = b = 0") else
                        "a and b are parallel or opposite here: sin(Omega) = 0; fall back to (1 - t) a + t b when "
                        "|cos Omega| > 0.9995" if "parallel" in kind or "opposite" in kind else SLERP_HINT))
                compare(f"{entry} (vs mergekit's slerp)", y, want, tolerance(want, x.dtype),
                        float32_hint(y, want, x.dtype, SLERP_HINT), slerp_suspects(x, b[k], t, kind))
                same_dtype(entry, y, x)
                if kind == "unit vectors" and 0 <= t <= 1 and abs(y.double().norm().item() - 1) > 1e-5:
                    raise AssertionError(f"{entry}: norm {y.double().norm().item():.6f}: SLERP of two unit vectors "
                                         "stays on the unit sphere")
                if t in (0.0, 1.0):
                    end = x if t == 0 else b[k]
                    compare(f"{entry}: t = {t:g} gives {'a' if t == 0 else 'b'}", y, end.double(),
                            tolerance(end.double(), x.dtype))
    return ("equals mergekit's slerp on each whole tensor (unequal norms, an obtuse angle, parallel, nearly parallel "
            "and (nearly) opposite tensors by lerp, a zero tensor), in float64 and float32; a at t = 0, b at t = 1; "
            "unit vectors stay unit; integer entries come from a")


# ---------------------------------------------------------------- 6. weight matching (Git Re-Basin)
def mlp_weights(g: torch.Generator, sizes: list[int], bias_scale: float = 0.5) -> dict:
    """The state dict of ``nn.Sequential(Linear, ReLU, ..., Linear)`` of ``sizes`` in float64: "0.weight",
    "0.bias", "2.weight", ... (biases large enough to matter in the matching)."""
    out = {}
    for i, (d_in, d_out) in enumerate(zip(sizes, sizes[1:])):
        out[f"{2 * i}.weight"] = torch.randn(d_out, d_in, generator=g, dtype=F64) / math.sqrt(d_in)
        out[f"{2 * i}.bias"] = bias_scale * torch.randn(d_out, generator=g, dtype=F64)
    return out


def permute_units(weights: dict, perms: list) -> dict:
    """The MLP with hidden layer l's unit j the old unit perms[l][j]: rows of layer l's weight and bias, columns of
    layer l + 1's weight. It computes the same function."""
    out = {k: v.clone() for k, v in weights.items()}
    for layer, perm in enumerate(perms):
        perm = torch.as_tensor(perm)
        out[f"{2 * layer}.weight"] = out[f"{2 * layer}.weight"][perm]
        out[f"{2 * layer}.bias"] = out[f"{2 * layer}.bias"][perm]
        out[f"{2 * layer + 2}.weight"] = out[f"{2 * layer + 2}.weight"][:, perm]
    return out


def similarity(a: dict, b: dict, layer: int, n_layers: int, bias: bool = True, outgoing: bool = True) -> torch.Tensor:
    """S[j, k] between a's unit j and b's unit k of hidden layer ``layer``, b's other layers as they are:
    <W_l^a[j], W_l^b[k]> + beta_l^a[j] beta_l^b[k] + <W_{l+1}^a[:, j], W_{l+1}^b[:, k]> (wrong versions leave out
    the ``bias`` or the ``outgoing`` term)."""
    S = a[f"{2 * layer}.weight"] @ b[f"{2 * layer}.weight"].T
    if bias:
        S = S + torch.outer(a[f"{2 * layer}.bias"], b[f"{2 * layer}.bias"])
    if outgoing and layer + 1 < n_layers:
        S = S + a[f"{2 * layer + 2}.weight"].T @ b[f"{2 * layer + 2}.weight"]
    return S


def distance2(x: dict, y: dict) -> float:
    return float(sum(((x[k].double() - y[k].double()) ** 2).sum() for k in x))


def one_layer_perms(a: dict, b: dict) -> dict:
    """For one hidden layer: the best permutation of b's units (the brute force over all of them) and those of wrong
    versions (the worst, the incoming weights only, no bias term), each with its b permuted."""
    found = {"best": ref.assignment_brute_force(similarity(a, b, 0, 2))[0],
             "worst": ref.assignment_brute_force(similarity(a, b, 0, 2), maximize=False)[0],
             "incoming": ref.assignment_brute_force(similarity(a, b, 0, 2, outgoing=False))[0],
             "no_bias": ref.assignment_brute_force(similarity(a, b, 0, 2, bias=False))[0]}
    return {name: (perm, permute_units(b, [perm])) for name, perm in found.items()}


def ascent_recovers(a: dict, b: dict, n_layers: int) -> bool:
    """Whether the coordinate ascent of weight matching, from b's own order and sweeping the hidden layers in any
    fixed order (each layer's assignment solved exactly, by brute force, the others fixed), ends at a: a known
    permutation that every such ascent undoes (deep networks may hold local optima that it does not)."""
    n_hidden = n_layers - 1
    for order in itertools.permutations(range(n_hidden)):
        perms = [list(range(a[f"{2 * layer}.bias"].numel())) for layer in range(n_hidden)]
        for _ in range(20):
            changed = False
            for layer in order:
                q, _ = ref.assignment_brute_force(similarity(a, permute_units(b, perms), layer, n_layers))
                if list(q) != list(range(len(q))):
                    changed, perms[layer] = True, [perms[layer][j] for j in q]
            if not changed:
                break
        if distance2(a, permute_units(b, perms)) > 1e-18:
            return False
    return True


WM_CASES = [  # (sizes, kind): "permuted" (b is a with its hidden units permuted) or "random" (a and b independent)
    ([5, 6, 3], "permuted"), ([4, 7, 3], "random"), ([12, 6, 5, 12], "permuted"), ([4, 6, 6, 2], "random")]


def wm_inputs(seed: int, cases=WM_CASES) -> dict:
    """MLPs with biases, and 16 inputs x. A permuted b has no hidden permutation that is its own inverse, and with
    two hidden layers or more, a is drawn again until every coordinate ascent from b's order undoes it
    (:func:`ascent_recovers`); a random one-hidden-layer pair is drawn again until its best permutation is unique
    (by 1e-6) and differs from the worst, the incoming-only and the bias-free ones and from the identity, so that
    each of those bugs shows."""
    g, out = seeded_generator(seed), []
    for sizes, kind in cases:
        n_layers = len(sizes) - 1
        if kind == "permuted":
            while True:
                a = mlp_weights(g, sizes)
                perms = []
                for width in sizes[1:-1]:
                    while True:
                        perm = torch.randperm(width, generator=g)
                        if width < 3 or not torch.equal(perm[perm], torch.arange(width)):  # its inverse differs
                            break
                    perms.append(perm.tolist())
                b = permute_units(a, perms)
                if n_layers == 2 or ascent_recovers(a, b, n_layers):
                    break
        else:
            a = mlp_weights(g, sizes)
            while True:
                b = mlp_weights(g, sizes)
                if n_layers > 2:
                    break
                found = {name: perm for name, (perm, _) in one_layer_perms(a, b).items()}
                S = similarity(a, b, 0, 2)
                totals = S[torch.arange(S.shape[0]), ref.all_permutations(S.shape[0])].sum(-1).sort(descending=True)[0]
                if (len(set(found.values()) | {tuple(range(sizes[1]))}) == 5 and totals[0] - totals[1] > 1e-6):
                    break
        hidden = ", ".join(map(str, sizes[1:-1]))
        how = "b = a with its hidden units permuted" if kind == "permuted" else "a and b independent"
        out.append({"what": f"weight_matching(a, b) on MLPs {' -> '.join(map(str, sizes))} (hidden {hidden}; {how})",
                    "sizes": sizes, "kind": kind, "a": a, "b": b,
                    "x": torch.randn(16, sizes[0], generator=g, dtype=F64)})
    return {"cases": out}


def wm_collect(inputs: dict, weight_matching) -> dict:
    """For each case: a and b built as float64 ``nn.Sequential(Linear, ReLU, ..., Linear)`` in eval mode, the
    result's type, its state dict and its outputs on x, whether it is b itself, and a's and b's state dicts after
    the call."""
    out = []
    for case in inputs["cases"]:
        sizes = case["sizes"]
        models = []
        for weights in (case["a"], case["b"]):
            layers = []
            for d_in, d_out in zip(sizes, sizes[1:]):
                layers += [nn.Linear(d_in, d_out, dtype=torch.float64), nn.ReLU()]
            model = nn.Sequential(*layers[:-1])
            load_weights(model, {k: v.clone() for k, v in weights.items()}, case["what"])
            models.append(model.eval())
        a, b = models
        matched = attempt(weight_matching, a, b)
        record = {"type": type(matched).__name__, "sequential": isinstance(matched, nn.Sequential),
                  "same_object": matched is b, "state": None, "y": None,
                  "a_after": {k: v.detach().clone() for k, v in a.state_dict().items()},
                  "b_after": {k: v.detach().clone() for k, v in b.state_dict().items()}}
        if isinstance(matched, dict):
            record["state"] = matched
        elif isinstance(matched, nn.Module):
            matched.eval()
            record["state"] = attempt(lambda: {k: v.detach().clone() for k, v in matched.state_dict().items()})
            with torch.no_grad():
                record["y"] = attempt(matched, case["x"].clone())
        out.append(record)
    return {"cases": out}


def rows_as(found: torch.Tensor, rows: torch.Tensor) -> list[int] | None:
    """The permutation p with found = rows[p] (row by row, exactly), or None."""
    index = {tuple(r.tolist()): i for i, r in enumerate(rows)}
    p = [index.get(tuple(r.tolist())) for r in found]
    return p if None not in p and len(set(p)) == len(p) else None


def wm_diagnosis(b: dict, got: dict, n_layers: int) -> str:
    """Why the result computes another function than b: follow its permutations layer by layer (the rows of each
    hidden layer's weight, b's with its columns as the layer before was permuted) and name the first part that
    does not follow them."""
    previous = None
    for layer in range(n_layers):
        W, B = got[f"{2 * layer}.weight"].double(), got[f"{2 * layer}.bias"].double()
        Wb, Bb = b[f"{2 * layer}.weight"].double(), b[f"{2 * layer}.bias"].double()
        expected = Wb if previous is None else Wb[:, previous]
        if layer == n_layers - 1:
            perm = list(range(W.shape[0])) if torch.equal(W, expected) else None
        else:
            perm = rows_as(W, expected)
        if perm is None:
            index = {tuple(r.tolist()): i for i, r in enumerate(expected)}
            found = [index.get(tuple(r.tolist())) for r in W]
            if layer < n_layers - 1 and None not in found and len(set(found)) < len(found):
                return (f"layer {2 * layer}'s rows are b's, but some unit appears twice and another not at all: the "
                        "matching must be a permutation, one b unit for each of a's (the argmax of each row of S "
                        "can pick a unit twice); linear_sum_assignment(S, maximize=True) gives a permutation")
            if previous is not None and rows_as(W, Wb) is not None:
                return (f"layer {2 * layer}'s weight has its columns in b's order while the units of the layer "
                        "before are permuted: when you permute hidden units (the rows of a layer's weight and bias), "
                        "permute the columns of the next layer's weight the same way")
            if previous is not None and rows_as(W, Wb[:, torch.argsort(torch.tensor(previous))]) is not None:
                return (f"layer {2 * layer}'s columns are permuted by the inverse of the permutation of the rows "
                        "before them: index the next layer's columns with the same permutation as the rows, "
                        "W[:, perm]")
            return ""
        if not torch.equal(B, Bb[perm]):
            return (f"layer {2 * layer}'s bias does not follow its rows"
                    + (" (it is b's, unpermuted)" if torch.equal(B, Bb) else "")
                    + ": permute a layer's bias with the rows of its weight")
        previous = perm
    return ""


def inverse(perm) -> list[int]:
    return torch.argsort(torch.as_tensor(perm)).tolist()


INVERSE = ("this is the inverse of the best permutation (S transposed, or the rows indexed with argsort(col)): "
           "_, col = linear_sum_assignment(S, maximize=True) with S[j, k] between a's unit j and b's unit k matches "
           "a's unit j with b's unit col[j], so the permuted b has W_b[col] as its rows (and W_next[:, col])")


def wm_state_suspects(a: dict, b: dict) -> dict:
    """For one hidden layer: diagnosis -> the state dict of that wrong version (b unpermuted, the inverse
    permutation, a permuted instead of b, the worst permutation)."""
    perms = one_layer_perms(a, b)
    best = perms["best"][0]
    return {"the hidden units were not permuted at all": b,
            INVERSE: permute_units(b, [inverse(best)]),
            "this permutes a, not b: apply the permutation to a copy of b": permute_units(a, [best]),
            "this permutation minimises the similarity: linear_sum_assignment(S, maximize=True)": perms["worst"][1]}


def wm_state_match(state: dict, suspects: dict) -> str:
    """The first diagnosis whose state dict ``state`` equals (within 1e-9), else ""."""
    for name, candidate in suspects.items():
        if all(close(state[k].double(), candidate[k].double(), 1e-9) for k in candidate):
            return name
    return ""


WM_RULE = ("permute each hidden layer's units, the rows of its weight and bias and the columns of the next layer's "
           "weight, by one permutation; choose it by linear_sum_assignment(S, maximize=True) on S = W_l^a (W_l^b)^T "
           "+ beta^a (beta^b)^T + (W_{l+1}^a)^T W_{l+1}^b (b's other layers as permuted so far), and sweep over the "
           "layers until no permutation changes")


@define("09.weight_matching", wm_inputs, wm_collect)
def weight_matching(inputs: dict, out: dict) -> str:
    for case, got in zip(inputs["cases"], out["cases"], strict=True):
        what, a, b, sizes = case["what"], case["a"], case["b"], case["sizes"]
        n_layers = len(sizes) - 1
        if raised(got["state"]) and not got["sequential"]:
            raise AssertionError(f"{what} raised {raised(got['state'])}")
        if not all(torch.equal(got["b_after"][k], b[k]) for k in b):
            raise AssertionError(f"{what}: b was modified in place" + (
                " (and returned)" if got["same_object"] else "") + ": permute a copy, copy.deepcopy(b), and leave b "
                "as it is")
        if not all(torch.equal(got["a_after"][k], a[k]) for k in a):
            raise AssertionError(f"{what}: a was modified in place: leave a as it is")
        if got["same_object"]:
            raise AssertionError(f"{what}: returned b itself: return a permuted copy")
        if not got["sequential"]:
            raise AssertionError(f"{what}: returned a {got['type']}, expected an nn.Sequential (a permuted copy of b)")
        state = as_state(f"{what}: the result's state_dict()", got["state"], list(b),
                         "the result is b's nn.Sequential with its hidden units permuted")
        for k in b:
            if state[k].shape != b[k].shape:
                raise AssertionError(f"{what}: the result's '{k}' has shape {tuple(state[k].shape)}, expected "
                                     f"{tuple(b[k].shape)}")
        want = ref.mlp_forward(b, case["x"])
        y = got["y"]
        if raised(y):
            raise AssertionError(f"{what}: the result raised on x: {raised(y)}")
        if not close(y, want, 1e-9):
            first = state["0.weight"].double()
            if rows_as(first, a["0.weight"].double()) is not None and rows_as(first, b["0.weight"].double()) is None:
                raise AssertionError(f"{what}: the result is a" + (
                    " (a copy of it)" if all(torch.equal(state[k].double(), a[k]) for k in a) else
                    ", with its hidden units permuted") + ", not b: return a copy of b with b's hidden units permuted "
                    "to line up with a's")
            why = wm_diagnosis(b, state, n_layers)
            compare(f"{what}: the result's outputs on 16 inputs (vs b's)", y, want, 1e-9,
                    why or "permuting hidden units must leave the function unchanged: " + WM_RULE)
            raise AssertionError(f"{what}: the result's outputs differ from b's: {why or WM_RULE}")
        before, after = distance2(a, b), distance2(a, state)
        if n_layers > 2:
            for layer in range(n_layers - 1):
                S = similarity({k: v.double() for k, v in a.items()}, {k: v.double() for k, v in state.items()},
                               layer, n_layers)
                _, best = ref.assignment_brute_force(S)
                gain = best - S.trace().item()
                if gain > 1e-9:
                    raise AssertionError(
                        f"{what}: hidden layer {layer} (the rows of '{2 * layer}.weight') is not matched as well as "
                        f"it can be with the other layers as they are: permuting its units alone raises the "
                        f"similarity by {gain:.4g}. Sweep over the layers until no permutation changes; {WM_RULE}")
        if case["kind"] == "permuted":
            if after > 1e-18:
                suspects = {}
                if n_layers == 2:
                    perms = one_layer_perms(a, b)
                    suspects = {"this permutation minimises the similarity: linear_sum_assignment(S, maximize=True)":
                                distance2(a, perms["worst"][1]),
                                "the hidden units were not permuted at all": before}
                advice = wm_state_match(state, wm_state_suspects(a, b)) if n_layers == 2 else ""
                advice = advice or first_match(after, suspects, 1e-9)
                raise AssertionError(
                    f"{what}: b is a with its hidden units permuted, so the matching must give a back (squared "
                    f"distance 0), got a squared distance {after:.6g} (b's is {before:.6g})"
                    + (f". {advice}" if advice else f". {WM_RULE}"))
        if after > before + 1e-9:
            raise AssertionError(f"{what}: the squared distance to a grew from {before:.6g} (b) to {after:.6g}: each "
                                 "assignment maximises the similarity, so it can only bring b closer to a. " + WM_RULE)
        if n_layers == 2 and case["kind"] == "random":
            models = []
            for weights in (a, b):
                model = nn.Sequential(nn.Linear(sizes[0], sizes[1], dtype=F64), nn.ReLU(),
                                      nn.Linear(sizes[1], sizes[2], dtype=F64))
                model.load_state_dict(weights)
                models.append(model)
            _, best = ref.weight_matching_brute_force(*models)
            perms = one_layer_perms(a, b)
            compare(f"{what}: the squared distance to a (vs the best permutation, by brute force over all "
                    f"{math.factorial(sizes[1])})", after, distance2(a, best.state_dict()), 1e-9, WM_RULE, {
                        "this permutation minimises the similarity: linear_sum_assignment(S, maximize=True)":
                        distance2(a, perms["worst"][1]),
                        "this is the best match of the incoming weights (and biases) only: the similarity also has "
                        "the next layer's columns, (W_{l+1}^a)^T W_{l+1}^b": distance2(a, perms["incoming"][1]),
                        "this is the best match without the biases: the similarity has the bias term beta^a "
                        "(beta^b)^T too": distance2(a, perms["no_bias"][1]),
                        "the hidden units were not permuted at all": before,
                        INVERSE: distance2(a, permute_units(b, [inverse(perms["best"][0])]))})
    return ("a permuted copy of b: b's function on 16 inputs, a and b left alone; undoes a known permutation exactly "
            "(one and two hidden layers); never moves b away from a; the best permutation of one hidden layer (brute "
            "force), and with two, no layer that can be improved alone")
