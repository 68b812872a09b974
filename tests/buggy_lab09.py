"""Plausible wrong implementations of Lab 9, each paired with the message its check must give.

Each factory takes the solution's namespace and returns the arguments of one check call.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn
from scipy.optimize import linear_sum_assignment


# ---------------------------------------------------------------- averaging
def average_with(ns, bug: str):
    def average(state_dicts, weights=None):
        if bug == "single_shortcut" and len(state_dicts) == 1:
            return dict(state_dicts[0])  # BUG: one model returned as it is, its tensors shared with the caller
        w = [1.0] * len(state_dicts) if weights is None else weights
        if bug == "weights_in_place" and weights is not None:  # BUG: normalises the caller's list in place
            total = sum(weights)
            for i in range(len(weights)):
                weights[i] /= total
        if bug == "float32_weights":  # BUG: torch.tensor(w) is float32: the normalised weights are rounded
            w = (lambda t: (t / t.sum()).tolist())(torch.tensor(w))
        merged = {}
        for name, value in state_dicts[0].items():
            if not value.is_floating_point():
                merged[name] = {"int_averaged": lambda: sum(sd[name] for sd in state_dicts) / len(state_dicts),
                                "int_from_last": lambda: state_dicts[-1][name].clone(),
                                "int_aliased": lambda: value}.get(  # BUG (int_aliased): not cloned
                                    bug, lambda: value.clone())()  # BUG (int_*): averaged, or the last model's
                continue
            if bug == "in_place":  # BUG: accumulates into the first model's tensors
                total = value.mul_(w[0])
                for wi, sd in zip(w[1:], state_dicts[1:]):
                    total += wi * sd[name]
                merged[name] = total.div_(sum(w))
                continue
            if bug == "float64_weights":  # BUG: a float64 tensor of weights promotes float32 entries
                wt = torch.tensor(w, dtype=torch.float64).view(-1, *[1] * value.dim())
                merged[name] = (wt * torch.stack([sd[name] for sd in state_dicts])).sum(0) / wt.sum()
                continue
            total = sum(wi * sd[name] for wi, sd in zip(w, state_dicts))
            merged[name] = {"not_normalised": lambda: total,  # BUG: no division
                            "float32_weights": lambda: total,  # (already normalised, in float32)
                            "divides_by_n": lambda: total / len(state_dicts),  # BUG: by n
                            "ignores_weights": lambda: sum(sd[name] for sd in state_dicts) / len(state_dicts),
                            }.get(bug, lambda: total / sum(w))()
        return merged

    return average


# ---------------------------------------------------------------- task arithmetic
def task_with(ns, bug: str):
    def task_vector(base, finetuned):
        if bug == "reversed":  # BUG: base - finetuned
            return {name: value - finetuned[name] for name, value in base.items() if value.is_floating_point()}
        if bug == "with_ints":  # BUG: the integer entries too
            return {name: finetuned[name] - value for name, value in base.items()}
        if bug == "vector_in_place":  # BUG: subtracts in place from the fine-tune
            return {name: finetuned[name].sub_(value) for name, value in base.items() if value.is_floating_point()}
        if bug == "vector_float64":  # BUG: computed in float64, so a float32 model's task vector is float64
            return {name: finetuned[name].double() - value.double() for name, value in base.items()
                    if value.is_floating_point()}
        return ns["task_vector"](base, finetuned)

    def apply_task_vectors(base, vectors, scales):
        if bug == "drops_others":  # BUG: only the entries of the task vectors
            merged = {name: base[name].clone() for name in vectors[0]}
        elif bug in ("in_place", "shallow_copy"):  # BUG: the base's tensors themselves
            merged = dict(base)
        else:
            merged = {name: value.clone() for name, value in base.items()}
        for vector, scale in zip(vectors, scales):
            for name, delta in vector.items():
                if bug == "in_place":
                    merged[name] += scale * delta  # BUG: writes into base
                elif bug == "vectors_in_place":
                    merged[name] = merged[name] + delta.mul_(scale)  # BUG: scales the caller's task vector
                elif bug == "ignores_scales":
                    merged[name] = merged[name] + delta  # BUG: the scales ignored
                elif bug == "normalised":
                    merged[name] = merged[name] + scale * delta / sum(scales)  # BUG: divided by sum of scales
                elif bug == "mean":
                    merged[name] = merged[name] + scale * delta / len(vectors)  # BUG: divided by n
                else:
                    merged[name] = merged[name] + scale * delta
        return merged

    return task_vector, apply_task_vectors


# ---------------------------------------------------------------- TIES
def ties_with(ns, bug: str):
    def trim(delta, density):
        if density >= 1 or bug == "no_trim":  # BUG (no_trim): density ignored
            return delta
        if bug == "kthvalue_k_plus_one":  # BUG: the threshold kthvalue(n - k) is the (k+1)-th largest: k + 1 kept
            n, k = delta.numel(), max(1, int(density * delta.numel()))
            return delta * (delta.abs() >= delta.abs().flatten().kthvalue(max(1, n - k)).values)
        if bug == "per_row" and delta.dim() == 2:  # BUG: the k largest of each row
            k = max(1, int(density * delta.shape[1]))
            return delta * torch.zeros_like(delta, dtype=torch.bool).scatter(1, delta.abs().topk(k, dim=1).indices,
                                                                              True)
        k = int(density * delta.numel()) if bug in ("no_max_1", "peft") else max(1, int(density * delta.numel()))
        keep = torch.zeros(delta.numel(), dtype=torch.bool)
        if k > 0:  # BUG (no_max_1, peft): k = int(density n) may be 0
            keep[delta.abs().flatten().topk(k, largest=bug != "smallest").indices] = True  # BUG (smallest)
        return delta * keep.view_as(delta)

    def global_trim(deltas: dict, density):  # BUG: one threshold over all the entries of a task vector
        flat = torch.cat([d.flatten() for d in deltas.values()])
        kept = ns["trim"](flat, density)
        return {name: part.view_as(d) for (name, d), part in zip(deltas.items(), kept.split(
            [d.numel() for d in deltas.values()]))}

    def ties_merge(base, finetuned_list, density, weights=None, lam=1.0):
        if bug == "weights_in_place" and weights is not None:  # BUG: normalises the caller's list in place
            total = sum(weights)
            for i in range(len(weights)):
                weights[i] /= total
        weights = [1.0] * len(finetuned_list) if weights is None else weights
        names = [name for name, value in base.items() if value.is_floating_point()]
        taus = [{name: ft[name] - base[name] for name in names} for ft in finetuned_list]
        trimmed = ([global_trim(tau, density) for tau in taus] if bug == "global_trim"
                   else [{name: trim(tau[name], density) for name in names} for tau in taus])
        merged = dict(base) if bug == "int_aliased" else {name: value.clone() for name, value in base.items()}
        for name in names:  # BUG (int_aliased): the integer entry is base's own tensor
            value = base[name]
            w = torch.tensor(weights, dtype=torch.float64 if bug == "float64_weights" else value.dtype)
            if bug == "lam_in_weights":
                w = w * lam  # BUG: lam multiplies the weights, and cancels in the division
            w = w.view(-1, *[1] * value.dim())
            raw = torch.stack([t[name] for t in trimmed])
            deltas = w * raw
            vote = raw if bug in ("peft", "unweighted_election") else deltas  # BUG: the unweighted sum elects
            if bug == "elect_untrimmed":  # BUG: the sign of the weighted, untrimmed task vectors
                vote = w * torch.stack([tau[name] for tau in taus])
            total = vote.sign().sum(0) if bug == "count_election" else vote.sum(0)  # BUG (count_election)
            elected = (torch.where(total > 0, 1.0, -1.0) if bug == "zero_elects_minus"  # BUG: 0 elects -
                       else total.sign() if bug == "torch_sign"  # BUG: a sum of 0 elects nothing
                       else torch.where(total >= 0, 1.0, -1.0)).to(deltas.dtype)
            agree = deltas.sign() == elected
            if bug == "zeros_agree":
                agree = agree | (deltas == 0)  # BUG: zeros counted as agreeing
            divisor = {"peft": lambda: agree.to(deltas.dtype).sum(0), "count_divisor": lambda: agree.to(
                deltas.dtype).sum(0), "all_weights": lambda: w.sum() * torch.ones_like(elected),
                "by_n": lambda: len(weights) * torch.ones_like(elected)}.get(bug, lambda: (w * agree).sum(0))()
            if bug == "float32_divisor":  # BUG: torch.where with Python numbers makes a float32 tensor
                divisor = sum(torch.where(a, wi, 0.0) for a, wi in zip(agree, weights))
            if bug == "clamp_one":  # BUG: peft's clamp(min=1), on a sum of weights
                divisor = divisor.clamp(min=1)
            elif bug != "nan":  # BUG (nan): a divisor of 0 left as it is
                divisor = torch.where(divisor == 0, torch.ones_like(divisor), divisor)
            tau = (deltas * agree).sum(0) / divisor
            merged[name] = (lam * (value + tau) if bug == "lam_times_model"  # BUG: lam times base too
                            else value + (1.0 if bug == "lam_in_weights" else lam) * tau)
        return merged

    return ties_merge


# ---------------------------------------------------------------- DARE
def dare_with(ns, bug: str):
    def dare(vector, drop_rate, seed, rescale="inverse"):
        if bug == "p0_returns_vector" and drop_rate == 0:
            return vector  # BUG: nothing to drop, so the caller's dict (and tensors) come back
        generator = torch.Generator().manual_seed(seed)
        dropped = {}
        for index, (name, delta) in enumerate(vector.items()):
            if bug == "new_generator":  # BUG: a new generator per tensor
                generator = torch.Generator().manual_seed(seed)
            if bug == "seed_plus_index":  # BUG: a generator per tensor, seeded with seed + its index
                generator = torch.Generator().manual_seed(seed + index)
            if bug == "unseeded":  # BUG: the global generator, never seeded
                uniform = torch.rand(delta.shape)
            elif bug == "float64_uniforms":  # BUG: uniforms in the vector's dtype (peft's mask)
                uniform = torch.rand(delta.shape, generator=generator, dtype=delta.dtype)
            else:
                uniform = torch.rand(delta.shape, generator=generator)
            keep = {"keeps_p": lambda: uniform < drop_rate,  # BUG: keeps with probability drop_rate
                    "at_least_p": lambda: uniform >= drop_rate}.get(bug, lambda: uniform < 1 - drop_rate)()
            kept = delta.mul_(keep) if bug == "in_place" else delta * keep  # BUG (in_place): the caller's tensor
            if bug == "nan":  # BUG: no guard when everything is dropped
                kept = kept / (1 - drop_rate) if rescale == "inverse" else kept * (delta.abs().sum() / kept.abs().sum())
            elif bug == "no_rescale" or (bug == "l1_global" and rescale == "l1"):
                pass  # BUG (no_rescale): not rescaled; (l1_global): rescaled below
            elif bug == "times_keep" and drop_rate < 1:
                kept = kept * (1 - drop_rate)  # BUG: times 1 - p
            elif (rescale == "inverse" or bug == "l1_as_inverse") and drop_rate < 1:
                kept = kept / (1 - drop_rate)  # BUG (l1_as_inverse): 'l1' divides by 1 - p
            elif rescale == "l1" and kept.abs().sum() > 0:
                kept = kept * (delta.abs().sum() / kept.abs().sum())
            dropped[name] = kept
        if bug == "l1_global" and rescale == "l1":  # BUG: one L1 factor for the whole dict
            before = sum(d.abs().sum() for d in vector.values())
            after = sum(d.abs().sum() for d in dropped.values())
            dropped = {name: d * (before / after) if after > 0 else d for name, d in dropped.items()}
        return dropped

    return dare


# ---------------------------------------------------------------- SLERP
def slerp_with(ns, bug: str):
    def slerp(a, b, t, eps=1e-8):
        if bug == "t0_returns_a" and t == 0:
            return a  # BUG: t = 0 gives a: the caller's dict (and tensors) come back
        if bug == "float32":  # BUG: computed in float32, cast back
            out = ns["slerp"]({k: v.float() if v.is_floating_point() else v for k, v in a.items()},
                              {k: v.float() if v.is_floating_point() else v for k, v in b.items()}, t, eps)
            return {k: v.to(a[k].dtype) for k, v in out.items()}
        merged = {}
        for name, x in a.items():
            y = b[name]
            if not x.is_floating_point():
                merged[name] = (y.clone() if bug == "int_from_b" else x if bug == "int_aliased"  # BUG (int_*)
                                else x.clone())
                continue
            if bug == "lerp":
                merged[name] = (1 - t) * x + t * y  # BUG: lerp everywhere
                continue
            if bug == "per_row" and x.dim() == 2:  # BUG: an angle per row
                merged[name] = torch.stack([ns["slerp"]({"r": xr}, {"r": yr}, t)["r"] for xr, yr in zip(x, y)])
                continue
            s = 1 - t if bug == "t_reversed" else t  # BUG (t_reversed)
            nx, ny = x.norm(), y.norm()
            if bug == "zero_lerps" and (nx <= eps or ny <= eps):
                merged[name] = (1 - s) * x + s * y  # BUG: a zero tensor lerps
                continue
            nx = nx if nx > eps else torch.ones_like(nx)
            ny = ny if ny > eps else torch.ones_like(ny)
            if bug == "eps_added":  # BUG: x / (|x| + eps)
                nx, ny = x.norm() + eps, y.norm() + eps
            if bug == "raw_dot":  # BUG: the cosine from the raw dot product <a, b>
                nx, ny = torch.ones_like(nx), torch.ones_like(ny)
            cos = ((x / nx) * (y / ny)).sum().clamp(-1, 1)
            fallback = {"no_fallback": False, "cos_threshold": bool(cos > 0.9995),
                        "threshold_0_9999": bool(cos.abs() > 0.9999)}.get(bug, bool(cos.abs() > 0.9995))
            if fallback:  # BUG (no_fallback): never; (cos_threshold): not for opposite tensors
                merged[name] = (1 - s) * x + s * y
                continue
            omega = torch.acos(cos)
            if bug == "degrees":
                omega = torch.rad2deg(omega)  # BUG: the angle in degrees
            if bug == "renormalised":  # BUG: the unit-sphere slerp of the directions, rescaled
                unit = (torch.sin((1 - s) * omega) * x / nx + torch.sin(s * omega) * y / ny) / torch.sin(omega)
                merged[name] = unit * ((1 - s) * x.norm() + s * y.norm())
                continue
            merged[name] = (torch.sin((1 - s) * omega) * x + torch.sin(s * omega) * y) / torch.sin(omega)
        return merged

    return slerp


# ---------------------------------------------------------------- weight matching
def matching_with(ns, bug: str):
    def weight_matching(a, b, max_sweeps=20, seed=0):
        if bug == "one_sweep":
            max_sweeps = 1  # BUG: a single sweep
        lin_a = [m for m in a if isinstance(m, nn.Linear)]
        lin_b = [m for m in b if isinstance(m, nn.Linear)]
        perms = [torch.arange(m.out_features) for m in lin_b[:-1]]
        generator = torch.Generator().manual_seed(seed)
        for _ in range(max_sweeps):
            changed = False
            for i in torch.randperm(len(perms), generator=generator).tolist():
                w_in = lin_b[i].weight.detach()
                w_in = w_in[:, perms[i - 1]] if i > 0 else w_in
                w_out = lin_b[i + 1].weight.detach()
                w_out = w_out[perms[i + 1]] if i + 1 < len(perms) else w_out
                S = lin_a[i].weight.detach() @ w_in.T
                if bug != "incoming_only":  # BUG (incoming_only): no next-layer term
                    S = S + lin_a[i + 1].weight.detach().T @ w_out
                if bug != "no_bias_term":  # BUG (no_bias_term): the biases left out of S
                    S = S + torch.outer(lin_a[i].bias.detach(), lin_b[i].bias.detach())
                if bug == "transposed":
                    S = S.T  # BUG: rows are b's units: the assignment comes out inverted
                _, cols = linear_sum_assignment(S.double().numpy(), maximize=bug != "minimize")  # BUG (minimize)
                cols = torch.as_tensor(cols)
                if bug == "argmax":
                    cols = S.argmax(1)  # BUG: the best b unit for each a unit, not a permutation
                changed |= not torch.equal(cols, perms[i])
                perms[i] = cols
            if not changed:
                break
        if bug == "identity":
            return copy.deepcopy(b)  # BUG: nothing permuted
        if bug == "returns_a":
            return copy.deepcopy(a)  # BUG: a copy of a
        matched = b if bug == "in_place" else copy.deepcopy(a if bug == "permutes_a" else b)  # BUG (permutes_a)
        lin_m = [m for m in matched if isinstance(m, nn.Linear)]
        with torch.no_grad():
            for i, perm in enumerate(perms):
                lin_m[i].weight.copy_(lin_m[i].weight[perm])
                if bug != "bias_not_permuted":  # BUG (bias_not_permuted)
                    lin_m[i].bias.copy_(lin_m[i].bias[perm])
                if bug == "inverse_columns":  # BUG: the inverse permutation on the columns
                    lin_m[i + 1].weight.copy_(lin_m[i + 1].weight[:, torch.argsort(perm)])
                elif bug != "rows_only":  # BUG (rows_only): the next layer's columns left alone
                    lin_m[i + 1].weight.copy_(lin_m[i + 1].weight[:, perm])
        return matched

    return weight_matching


def bug(factory, name: str):
    """A factory of one planted bug, named after it (the test ids show the name)."""
    made = lambda ns: factory(ns, name)
    made.__name__ = f"{factory.__name__.removesuffix('_with')}_{name}"
    return made


A, T, TI, D, S, W = average_with, task_with, ties_with, dare_with, slerp_with, matching_with

# check id -> [(factory, a regular expression the failure message must match)]
BUGS = {
    "09.average": [
        (bug(A, "not_normalised"), r"average\(2 models, weights None\)\['fc1.weight'\].*the weighted sum is not "
                                   r"divided by the sum of the weights"),
        (bug(A, "divides_by_n"), r"average\(3 models, .*this divides by the number of models"),
        (bug(A, "ignores_weights"), r"average\(3 models, .*the weights are ignored: this is the plain mean"),
        (bug(A, "int_averaged"), r"\['steps'\].*the integer entry is averaged"),
        (bug(A, "int_from_last"), r"\['steps'\].*copied from the last model"),
        (bug(A, "in_place"), r"average\(2 models, weights None\) modified the input state dicts in place"),
        (bug(A, "float64_weights"), r"average\(3 float32 models.*dtype torch.float64, expected torch.float32: keep "
                                    r"each entry's dtype"),
        (bug(A, "int_aliased"), r"average\(2 models, weights None\): the result shares tensors with the input state "
                                r"dicts \(the entries \['steps'\].*clone the entries you copy"),
        (bug(A, "single_shortcut"), r"average\(a single model\): the result shares tensors with the input state dicts"),
        (bug(A, "weights_in_place"), r"average\(3 models, weights \[1.0, 2.0, 0.5\]\) modified the weights list it "
                                     r"was given in place"),
        (bug(A, "float32_weights"), r"average\(3 models, .*\['fc1.weight'\].*this is off by about a float32 "
                                    r"rounding.*torch.tensor\(weights\) without dtype="),
    ],
    "09.task_arithmetic": [
        (bug(T, "reversed"), r"task_vector\(base, finetuned\[0\]\).*this is base - finetuned"),
        (bug(T, "with_ints"), r"unexpected entries \['steps'\]: a task vector holds the float entries only"),
        (bug(T, "vector_in_place"), r"task_vector, on a base and 2 float64 fine-tunes, modified base or a fine-tune "
                                    r"in place"),
        (bug(T, "drops_others"), r"the entries \['steps'\] are missing: the entries that no task vector has are "
                                 r"copied from base"),
        (bug(T, "in_place"), r"apply_task_vectors, on .* modified base in place"),
        (bug(T, "ignores_scales"), r"scales=\[0.8, 0.35\].*the scales are ignored"),
        (bug(T, "normalised"), r"the scaled sum is divided by the sum of the scales"),
        (bug(T, "mean"), r"the scaled sum is divided by the number of task vectors"),
        (bug(T, "vector_float64"), r"task_vector\(base, finetuned\[0\]\)\['fc1.weight'\], on a base and 3 float32 "
                                   r"fine-tunes: dtype torch.float64, expected torch.float32"),
        (bug(T, "shallow_copy"), r"apply_task_vectors, on a base and 2 float64 fine-tunes: the result shares tensors "
                                 r"with base or the task vectors \(the entries \['steps'\]"),
        (bug(T, "vectors_in_place"), r"apply_task_vectors, on a base and 2 float64 fine-tunes, modified the task "
                                     r"vectors in place"),
    ],
    "09.ties_merge": [
        (bug(TI, "count_election"), r"the sign is elected by count.*TIES elects the sign with more mass"),
        (bug(TI, "global_trim"), r"the trim is global"),
        (bug(TI, "no_max_1"), r"density=0.1, so int\(density \* numel\) = 0 for the biases and k = 1.*the trim "
                              r"keeps k = int\(density \* numel\) entries, none when that is 0"),
        (bug(TI, "smallest"), r"the trim keeps the smallest entries"),
        (bug(TI, "no_trim"), r"the task vectors are not trimmed"),
        (bug(TI, "zero_elects_minus"), r"hand-made.*a weighted sum of exactly 0 elects -"),
        (bug(TI, "zeros_agree"), r"zero entries are counted as agreeing"),
        (bug(TI, "peft"), r"this is peft's TIES: it elects the sign from the unweighted trimmed vectors and divides "
                          r"by the number of agreeing entries"),
        (bug(TI, "unweighted_election"), r"the sign is elected from the unweighted sum \(peft's way\)"),
        (bug(TI, "count_divisor"), r"the divisor is the number of agreeing entries \(peft's way\)"),
        (bug(TI, "all_weights"), r"this divides by the weights of all the models"),
        (bug(TI, "by_n"), r"this divides by the number of models: the disjoint mean"),
        (bug(TI, "lam_in_weights"), r"lam=0.7.*lam has no effect"),
        (bug(TI, "lam_times_model"), r"lam multiplies base too"),
        (bug(TI, "nan"), r"non-finite values, where no entry agrees with the elected sign"),
        (bug(TI, "float64_weights"), r"float32 fine-tunes.*dtype torch.float64, expected torch.float32"),
        (bug(TI, "kthvalue_k_plus_one"), r"density=0.5.*the trim keeps one entry too many \(k \+ 1\).*kthvalue\(numel "
                                         r"- k \+ 1\)"),
        (bug(TI, "per_row"), r"\['fc1.weight'\].*the trim keeps the largest entries of each row"),
        (bug(TI, "torch_sign"), r"hand-made.*no sign is elected \(torch.sign gives 0 there\)"),
        (bug(TI, "clamp_one"), r"weights=\[1.0, 0.3, 2.0\].*the divisor is clamped to at least 1"),
        (bug(TI, "elect_untrimmed"), r"the sign is elected from the untrimmed task vectors"),
        (bug(TI, "weights_in_place"), r"ties_merge\(3 float64 fine-tunes.* modified the weights list it was given in "
                                      r"place"),
        (bug(TI, "int_aliased"), r"ties_merge\(3 float64 fine-tunes.*: the result shares tensors with base or a "
                                 r"fine-tune \(the entries \['steps'\]"),
        (bug(TI, "float32_divisor"), r"ties_merge\(3 float64 fine-tunes.*this is off by about a float32 rounding"),
    ],
    "09.dare": [
        (bug(D, "no_rescale"), r"rescale='inverse'\)\['fc1.weight'\], given the entries it kept.*the kept entries "
                               r"are not rescaled"),
        (bug(D, "times_keep"), r"the kept entries are multiplied by 1 - drop_rate: divide them by it"),
        (bug(D, "l1_as_inverse"), r"rescale='l1'\).*rescale='l1' divides by 1 - drop_rate"),
        (bug(D, "keeps_p"), r"kept 0\.\d+ of the 1200 entries, expected 1 - drop_rate = 0.7.*this keeps each entry "
                            r"with probability drop_rate"),
        (bug(D, "at_least_p"), r"unlike the lab's rule.*this keeps an entry where the uniform is at least "
                               r"drop_rate"),
        (bug(D, "new_generator"), r"\['fc1.bias'\]: \d+ of its 40 entries are kept or dropped unlike the lab's "
                                  r"rule.*a new generator seeded with seed"),
        (bug(D, "unseeded"), r"two calls with the same seed kept different entries"),
        (bug(D, "float64_uniforms"), r"unlike the lab's rule.*the uniforms are drawn in float64"),
        (bug(D, "nan"), r"drop_rate=1.0.*non-finite values: with drop_rate = 1 everything is dropped"),
        (bug(D, "l1_global"), r"the L1 rescale is taken over the whole dict"),
        (bug(D, "in_place"), r"dare\(a task vector of 3 tensors, .* modified the task vector in place"),
        (bug(D, "p0_returns_vector"), r"dare\(drop_rate 0: nothing dropped, .*\): the result shares tensors with the "
                                      r"task vector"),
        (bug(D, "seed_plus_index"), r"\['fc1.bias'\]: \d+ of its 40 entries are kept or dropped unlike the lab's "
                                    r"rule.*a generator seeded with seed \+ its index"),
    ],
    "09.slerp": [
        (bug(S, "lerp"), r"\['fc1.weight'\] \(unequal norms\).*this is linear interpolation, \(1 - t\) a \+ t b"),
        (bug(S, "no_fallback"), r"\['gain'\] \(one entry each: parallel\): non-finite values. a and b are parallel "
                                r"or opposite here.*fall back to \(1 - t\) a \+ t b"),
        (bug(S, "renormalised"), r"the result is renormalised to \(1 - t\) \|a\| \+ t \|b\|"),
        (bug(S, "cos_threshold"), r"\['near_opposite'\].*the lerp fallback is taken only for cos > 0.9995"),
        (bug(S, "t_reversed"), r"t runs the wrong way"),
        (bug(S, "degrees"), r"the angle is in degrees"),
        (bug(S, "per_row"), r"\['fc1.weight'\].*this slerps row by row"),
        (bug(S, "zero_lerps"), r"\['zero'\] \(a = 0\).*with a = 0 this lerps to t b"),
        (bug(S, "int_from_b"), r"\['steps'\].*the integer entry is b's: copy it from a"),
        (bug(S, "int_aliased"), r"slerp\(a, b, t=0.3\) on float64 state dicts: the result shares tensors with a or b "
                                r"\(the entries \['steps'\]"),
        (bug(S, "t0_returns_a"), r"slerp\(a, b, t=0.0\) on float64 state dicts: the result shares tensors with a or b"),
        (bug(S, "float32"), r"\['fc1.weight'\] \(unequal norms\).*this is off by about a float32 rounding"),
        (bug(S, "eps_added"), r"the tensors are normalised by \|a\| \+ eps"),
        (bug(S, "raw_dot"), r"\['fc1.weight'\].*this is linear interpolation.*if your cos Omega is the raw dot "
                            r"product <a, b>"),
        (bug(S, "threshold_0_9999"), r"\['near'\] \(nearly parallel\).*this follows the arc where \|cos Omega\| > "
                                     r"0.9995"),
    ],
    "09.weight_matching": [
        (bug(W, "rows_only"), r"hidden 6; b = a with its hidden units permuted\).*layer 2's weight has its columns "
                              r"in b's order.*permute the columns of the next layer's weight the same way"),
        (bug(W, "in_place"), r"b was modified in place \(and returned\)"),
        (bug(W, "incoming_only"), r"a and b independent\): the squared distance to a.*this is the best match of the "
                                  r"incoming weights \(and biases\) only"),
        (bug(W, "inverse_columns"), r"columns are permuted by the inverse of the permutation"),
        (bug(W, "one_sweep"), r"\(hidden 6, 5; .*\): hidden layer \d .*is not matched as well as it can be.*Sweep "
                              r"over the layers until no permutation changes"),
        (bug(W, "bias_not_permuted"), r"layer 0's bias does not follow its rows \(it is b's, unpermuted\)"),
        (bug(W, "no_bias_term"), r"this is the best match without the biases"),
        (bug(W, "minimize"), r"b is a with its hidden units permuted, so the matching must give a back.*this "
                             r"permutation minimises the similarity: linear_sum_assignment\(S, maximize=True\)"),
        (bug(W, "identity"), r"the hidden units were not permuted at all"),
        (bug(W, "transposed"), r"hidden 6; b = a with its hidden units permuted\).*this is the inverse of the best "
                               r"permutation \(S transposed"),
        (bug(W, "argmax"), r"layer 0's rows are b's, but some unit appears twice.*linear_sum_assignment"),
        (bug(W, "returns_a"), r"the result is a \(a copy of it\), not b"),
        (bug(W, "permutes_a"), r"this permutes a, not b"),
    ],
}
