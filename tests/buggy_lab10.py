"""Plausible wrong implementations of Lab 10, each paired with the message its check must give.

Each factory takes the solution's namespace and returns the arguments of one check call.
"""
from __future__ import annotations

import math
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy.optimize import curve_fit, minimize
from torch.utils.checkpoint import checkpoint

NAMES = ("E", "A", "B", "alpha", "beta")


# ---------------------------------------------------------------- counting parameters
def count_with(ns, bug: str):
    def count_params(config, active=False):
        d, L, V = config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]
        H, KV = config["num_attention_heads"], config["num_key_value_heads"]
        if bug == "mutates_config":
            config.setdefault("head_dim", d // H)  # BUG: writes into the caller's config
        head_dim = d // H if bug == "head_dim_ignored" else (config.get("head_dim") or d // H)
        kv = H if bug == "mha" else KV  # BUG (mha): GQA's key-value heads ignored
        attention = d * H * head_dim + 2 * d * kv * head_dim + H * head_dim * d
        ffn = (2 if bug == "two_matrix_ffn" else 3) * d * config["intermediate_size"]
        E = config.get("num_local_experts", 1)
        k = config.get("num_experts_per_tok", 1)
        used = E
        if active and bug != "all_experts_active":  # BUG (all_experts_active): active ignored
            used = 1 if bug == "one_expert_active" else k
        if bug == "k_experts_total":
            used = k  # BUG: the total counts the active experts only
        dropped = bug == "router_forgotten" or (active and bug == "active_router_forgotten")  # BUG (either)
        router = d * E if E > 1 and not dropped else 0
        norms = {"layer_norms": 0, "no_norms": 0, "norm_bias": 4 * d}.get(bug, 2 * d)
        final = {"final_norm": 0, "no_norms": 0, "norm_bias": 2 * d}.get(bug, d)
        tied = {"tied_default_true": lambda: config.get("tie_word_embeddings", True),  # BUG: True when absent
                "tied_keyerror": lambda: config["tie_word_embeddings"]}.get(  # BUG: KeyError when absent
            bug, lambda: config.get("tie_word_embeddings", False))()
        tables = {"no_embeddings": 0, "tied_twice": 2, "input_table_forgotten": 0 if tied else 1}.get(
            bug, 1 if tied else 2)
        total = L * (attention + used * ffn + router + norms) + final + tables * V * d
        return total / 1 if bug == "float_result" else total  # BUG (float_result): a float

    return count_params


def flops_with(ns, bug: str):
    count_params = ns["count_params"]

    def flops_per_token(config, seq_len, training=True):
        d, V, L = config["hidden_size"], config["vocab_size"], config["num_hidden_layers"]
        H, KV = config["num_attention_heads"], config["num_key_value_heads"]
        head_dim = config.get("head_dim") or d // H
        tied = config["tie_word_embeddings"] if bug == "tied_keyerror" else (  # BUG: KeyError when absent
            config.get("tie_word_embeddings", bug == "tied_default_true"))  # BUG (tied_default_true): True when absent
        N = count_params(config, active=bug != "moe_total") - (0 if tied else V * d)
        if bug == "embedding_counted":
            N = count_params(config, active=True) + (V * d if tied else 0)  # BUG: the input table in N
        if bug == "head_left_out":
            N -= V * d  # BUG: the output head removed with the table
        if bug == "no_norms_in_N":
            N -= (2 * L + 1) * d  # BUG: only the matrices
        width = {"attention_d_model": d, "attention_kv": KV * head_dim}.get(bug, H * head_dim)
        factor = 6 if training or bug == "inference_6" else 2
        if bug == "2ND":
            factor = 2  # BUG: the forward pass only
        attention = {"no_attention": 0, "attention_doubled": 2, "attention_T_squared": seq_len}.get(bug, 1) * (
            L * seq_len * width)
        if bug == "n_forward_only":
            return 2 * N + factor * attention  # BUG: 2N in training
        return factor * N + factor * attention

    return flops_per_token


# ---------------------------------------------------------------- the Chinchilla law and its optimum
def optimal_with(ns, bug: str):
    CHINCHILLA, EPOCH = dict(ns["CHINCHILLA"]), dict(ns["EPOCH"])
    if bug == "chinchilla_exponents_swapped":
        CHINCHILLA["alpha"], CHINCHILLA["beta"] = CHINCHILLA["beta"], CHINCHILLA["alpha"]
    if bug == "epoch_rounded":
        EPOCH = {"E": 1.82, "A": 482.0, "B": 2085.4, "alpha": 0.35, "beta": 0.37}  # BUG: rounded values

    def chinchilla_loss(N, D, params):
        E, A, B, a, b = (params[k] for k in NAMES)
        if bug == "loss_exponents_swapped":
            a, b = b, a  # BUG
        if bug == "loss_no_E":
            E = 0.0  # BUG
        if bug == "loss_math_pow":
            return E + A / math.pow(N, a) + B / math.pow(D, b)  # BUG: floats only
        return E + A / N ** a + B / D ** b

    def compute_optimal(C, params):
        if bug == "params_popped":
            params.pop("E")  # BUG: changes the caller's dict
        a, b, A, B = params["alpha"], params["beta"], params["A"], params["B"]
        G = (a * A / (b * B)) ** (1 / (a + b))
        if bug == "G_inverted":
            G = 1 / G
        if bug == "G_swaps_AB":
            G = (a * B / (b * A)) ** (1 / (a + b))
        budget = C if bug == "no_six" else C / 6
        N = G * budget ** ((a if bug == "exponents_swapped" else b) / (a + b))
        D = C / N if bug == "D_is_C_over_N" else C / (6 * N)
        return (D, N) if bug == "returns_D_N" else (N, D)

    return chinchilla_loss, compute_optimal, CHINCHILLA, EPOCH


# ---------------------------------------------------------------- fitting Approach 3 and its bootstrap
def scipy_objective(theta, log_N, log_D, log_L, space="log", loss="huber", delta=1e-3):
    """The objective in NumPy (value and gradient), the right one and wrong ones."""
    a, b, e, alpha, beta = theta
    terms = np.stack([a - alpha * log_N, b - beta * log_D, np.full_like(log_N, e)])
    top = terms.max(0)
    lse = top + np.log(np.exp(terms - top).sum(0))
    weights = np.exp(terms - lse)
    if space == "log":
        r, dr = lse - log_L, weights
    else:
        predicted = np.exp(np.minimum(lse, 50))
        r, dr = predicted - np.exp(log_L), weights * predicted
    if loss == "huber":
        value = np.where(np.abs(r) <= delta, 0.5 * r * r, delta * (np.abs(r) - 0.5 * delta)).sum()
        slope = np.clip(r, -delta, delta)
    else:
        value, slope = 0.5 * (r * r).sum(), r
    g = dr * slope
    return value, np.array([g[0].sum(), g[1].sum(), g[2].sum(), -(g[0] @ log_N), -(g[1] @ log_D)])


def grid(top, log_N, log_D, log_L, space, loss):
    import itertools
    points = np.array(list(itertools.product([0., 5., 10., 15., 20., 25.], [0., 5., 10., 15., 20., 25.],
                                             [-1., -.5, 0., .5, 1.], [0., .5, 1., 1.5, 2.], [0., .5, 1., 1.5, 2.])))
    values = [scipy_objective(p, log_N, log_D, log_L, space, loss)[0] for p in points]
    return points[np.argsort(values)[:top]]


def fit_with(ns, bug: str):
    tight = {} if bug in ("default_tolerance", "boot_loose") else {"ftol": 1e-15, "gtol": 1e-12}  # BUG: stops early
    space = "linear" if bug == "linear_space" else "log"
    loss = "mse" if bug == "mse" else "huber"

    def fit_scaling_law(N, D, L, starts=None):
        if bug == "mutates_input" and isinstance(L, torch.Tensor):
            L.log_()  # BUG: takes the log in place
            log_N, log_D, log_L = np.log(np.asarray(N)), np.log(np.asarray(D)), np.asarray(L)
        else:
            log_N, log_D, log_L = (np.log(np.asarray(v, dtype=np.float64)) for v in (N, D, L))
        if bug == "curve_fit":  # BUG: least squares of the loss itself, from a single guess
            law = lambda x, E, A, B, a, b: E + A / x[0] ** a + B / x[1] ** b
            p, _ = curve_fit(law, np.exp([log_N, log_D]), np.exp(log_L), p0=[2.0, 400.0, 1000.0, 0.3, 0.3],
                             maxfev=20000)
            return tuple(float(v) for v in p)
        if starts is None:
            starts = ([np.ones(5)] if bug == "no_grid" else  # BUG: one start, theta = (1, 1, 1, 1, 1)
                      grid(10, log_N, log_D, log_L, space, loss))
        fits = [minimize(scipy_objective, s, args=(log_N, log_D, log_L, space, loss), jac=True, method="L-BFGS-B",
                         options=tight) for s in starts]
        a, b, e, alpha, beta = min(fits, key=lambda f: f.fun).x
        if bug == "returns_theta_order":
            return math.exp(a), math.exp(b), math.exp(e), alpha, beta  # BUG: (A, B, E, ...)
        if bug == "returns_logs":
            return e, a, b, alpha, beta  # BUG: the logs of E, A, B
        return math.exp(e), math.exp(a), math.exp(b), alpha, beta

    def bootstrap_fit(N, D, L, n_boot, seed):
        N, D, L = (torch.as_tensor(v, dtype=torch.float64) for v in (N, D, L))
        E, A, B, alpha, beta = ns["fit_scaling_law"](N, D, L) if bug.startswith("boot") else fit_scaling_law(N, D, L)
        start = [np.array([math.log(A), math.log(B), math.log(E), alpha, beta])]
        g = torch.Generator().manual_seed(0 if bug == "boot_fixed_seed" else seed)  # BUG (boot_fixed_seed)
        n = len(N)
        if bug.startswith("boot_numpy"):  # BUG: NumPy's generator, not the lab's torch.randint
            resamples = [torch.as_tensor(i) for i in np.random.default_rng(seed).integers(0, n, size=(n_boot, n))]
        elif bug == "boot_no_replacement":
            resamples = [torch.randperm(n, generator=g) for _ in range(n_boot)]  # BUG: a permutation
        elif bug == "boot_unseeded":
            resamples = [torch.randint(n, (n,)) for _ in range(n_boot)]  # BUG: the global generator, unseeded
        else:
            resamples = [torch.randint(n, (n,), generator=g) for _ in range(n_boot)]
        fits = np.array([fit_scaling_law(N[i], D[i], L[i], starts=start) for i in resamples])
        if bug in ("boot_minmax", "boot_numpy_minmax"):
            low, high = fits.min(0), fits.max(0)  # BUG: the range
        elif bug in ("boot_90", "boot_numpy_90"):
            low, high = np.quantile(fits, [0.05, 0.95], axis=0)  # BUG: a 90% interval
        elif bug == "boot_std":
            mean, sd = fits.mean(0), fits.std(0, ddof=1)
            low, high = mean - 1.96 * sd, mean + 1.96 * sd  # BUG: a normal interval
        else:
            low, high = np.quantile(fits, [0.025, 0.975], axis=0)
        return {name: (float(lo), float(hi)) for name, lo, hi in zip(NAMES, low, high)}

    if bug.startswith("boot"):
        return ns["fit_scaling_law"], bootstrap_fit
    return fit_scaling_law, bootstrap_fit


# ---------------------------------------------------------------- Approach 2: isoFLOP minima
def isoflop_with(ns, bug: str):
    def isoflop_minima(runs):
        if bug == "sorts_in_place":
            runs.sort(key=lambda run: run["C"])  # BUG: reorders the caller's list
        budgets = sorted({run["C"] for run in runs})
        if bug == "unsorted":
            budgets = list(dict.fromkeys(run["C"] for run in runs))  # BUG: in the order met
        out = []
        for C in budgets:
            group = runs if bug == "pooled" else [run for run in runs if run["C"] == C]
            N = np.array([run["N"] for run in group])
            y = np.array([run["loss"] for run in group])
            if bug == "argmin":
                out.append((C, float(N[np.argmin(y)])))  # BUG: the best run, not the vertex
                continue
            x = N if bug == "linear_N" else (np.log10(N) if bug == "log10_exp" else np.log(N))
            a, b, _ = np.polyfit(x, y, 2)
            vertex = -b / a if bug == "no_2" else -b / (2 * a)
            out.append((C, float(vertex if bug in ("linear_N", "log_N_returned") else math.exp(vertex))))
        return out

    return isoflop_minima


# ---------------------------------------------------------------- the cost of a training step
class Wrapped(nn.Module):
    def __init__(self, block: nn.Module, how: str):
        super().__init__()
        self.block, self.how = block, how

    def forward(self, x):
        if self.how == "detach":
            return checkpoint(self.block, x.detach(), use_reentrant=False)  # BUG: cuts the graph
        if self.how == "no_checkpoint":
            return self.block(x)  # BUG: saves everything anyway
        return checkpoint(self.block, x, use_reentrant=False)


def step_with(ns, bug: str):
    def train_step_cost(model, batch, amp_dtype=None, checkpointing=False):
        x, y = batch
        device = x.device.type
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        saved, each = {}, []

        def pack(t):
            storage = t.untyped_storage()
            if bug == "counts_params" or storage.data_ptr() not in params:
                # BUG (tensor_data_ptr): keyed by the tensor's own address, so views at other offsets count again
                saved[t.data_ptr() if bug == "tensor_data_ptr" else storage.data_ptr()] = storage.nbytes()
                each.append(t.numel() * t.element_size())
            return t

        blocks = model.blocks
        if checkpointing:
            how = bug if bug in ("detach", "no_checkpoint") else ""
            model.blocks = nn.ModuleList(Wrapped(block, how) for block in blocks)
        scale = 2.0 ** 16 if amp_dtype == torch.float16 and bug != "fp16_no_scaler" else 1.0
        if bug != "accumulates":
            model.zero_grad(set_to_none=bug != "zeroes_in_place")
        start = time.perf_counter()
        autocast = amp_dtype is not None and bug != "no_autocast"
        try:
            with torch.autocast(device, dtype=amp_dtype or torch.float32, enabled=autocast):
                with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                    logits = model(x)
                    if bug != "loss_outside":
                        loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
                if bug == "loss_outside":
                    loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
            (loss * scale).backward()
        finally:
            if bug not in ("blocks_not_restored", "no_finally"):
                model.blocks = blocks
        if bug == "optimizer_step":
            with torch.no_grad():
                for p in model.parameters():
                    p -= 1e-3 * p.grad  # BUG: a training step changes the weights
        if bug == "no_finally":
            model.blocks = blocks  # BUG: not in a finally clause, so a step that raises leaves the wrappers
        seconds = time.perf_counter() - start
        if bug == "zeroes_in_place":
            grads = {name: p.grad for name, p in model.named_parameters()}  # BUG: p.grad itself, zeroed in place later
        else:
            grads = {name: p.grad / scale for name, p in model.named_parameters() if p.grad is not None}
        return {"seconds": seconds, "saved_bytes": sum(each) if bug == "counts_duplicates" else sum(saved.values()),
                "grads": grads}

    return train_step_cost


def bug(factory, name: str):
    """A factory of one planted bug, named after it (the test ids show the name)."""
    made = lambda ns: factory(ns, name)
    made.__name__ = f"{factory.__name__.removesuffix('_with')}_{name}"
    return made


C, FL, O, FI, I, S = count_with, flops_with, optimal_with, fit_with, isoflop_with, step_with
SMALL = r"count_params\(a small Llama \(GQA, head_dim set, untied\)\)"
MIXTRAL = r"count_params\(a small Mixtral \(GQA, untied\)"

# check id -> [(factory, a regular expression the failure message must match)]
BUGS = {
    "10.count_params": [
        (bug(C, "input_table_forgotten"), SMALL + r".*one vocab_size x hidden_size matrix is forgotten"),
        (bug(C, "no_embeddings"), SMALL + r".*the embeddings are forgotten: both the input table and the untied "
                                          r"head"),
        (bug(C, "tied_twice"), r"count_params\(a small Llama \(MHA, tied, no head_dim key\)\).*the tied output head "
                               r"is counted twice"),
        (bug(C, "mha"), SMALL + r".*k_proj and v_proj are counted with num_attention_heads heads"),
        (bug(C, "head_dim_ignored"), SMALL + r".*head_dim is ignored"),
        (bug(C, "two_matrix_ffn"), SMALL + r".*Llama's gated FFN has three"),
        (bug(C, "final_norm"), SMALL + r".*the final norm \(hidden_size gains\) is forgotten"),
        (bug(C, "layer_norms"), SMALL + r".*the two RMSNorms of each layer are forgotten"),
        (bug(C, "no_norms"), SMALL + r".*the norms are forgotten"),
        (bug(C, "norm_bias"), SMALL + r".*counted with biases \(LayerNorm\)"),
        (bug(C, "router_forgotten"), MIXTRAL + r"\).*the router is forgotten"),
        (bug(C, "active_router_forgotten"), MIXTRAL + r", active=True\).*the router is forgotten.*which every token "
                                                      r"uses"),
        (bug(C, "all_experts_active"), MIXTRAL + r", active=True\).*active=True counts all \d experts"),
        (bug(C, "one_expert_active"), MIXTRAL + r", active=True\).*active=True counts one expert"),
        (bug(C, "k_experts_total"), MIXTRAL + r"\).*the total counts only num_experts_per_tok"),
        (bug(C, "float_result"), SMALL + r": returned the float .* it must return an int"),
        (bug(C, "tied_default_true"), r"no tie_word_embeddings key\)\).*a config without tie_word_embeddings is "
                                      r"untied: transformers' default is False"),
        (bug(C, "tied_keyerror"), r"no tie_word_embeddings key\)\) raised KeyError.*a config without "
                                  r"tie_word_embeddings is untied: transformers' default is False"),
        (bug(C, "mutates_config"), r"count_params\(a small Llama .* modified the config dict it was given"),
    ],
    "10.flops_per_token": [
        (bug(FL, "2ND"), r"seq_len=256\).*the forward pass only \(2 N D, not 6 N D\)"),
        (bug(FL, "inference_6"), r"training=False\).*training=False gives the training count"),
        (bug(FL, "embedding_counted"), r"N counts the input embedding table: its lookup costs no FLOPs"),
        (bug(FL, "head_left_out"), r"N leaves out the output head"),
        (bug(FL, "no_attention"), r"the attention term is missing"),
        (bug(FL, "attention_d_model"), r"the attention term uses hidden_size \(\d+\) where d_attn"),
        (bug(FL, "attention_kv"), r"the attention term uses the key-value width"),
        (bug(FL, "attention_doubled"), r"the attention term is doubled"),
        (bug(FL, "attention_T_squared"), r"the attention term grows with seq_len squared"),
        (bug(FL, "n_forward_only"), r"N is multiplied by 2 \(the forward only\)"),
        (bug(FL, "moe_total"), r"a small Mixtral .*N counts all \d experts"),
        (bug(FL, "tied_keyerror"), r"no tie_word_embeddings key\), seq_len=128\) raised KeyError.*a config without "
                                   r"tie_word_embeddings is untied: transformers' default is False"),
        (bug(FL, "tied_default_true"), r"no tie_word_embeddings key\), seq_len=128\).*a config without "
                                       r"tie_word_embeddings is untied: transformers' default is False"),
        (bug(FL, "no_norms_in_N"), r"N leaves out the norms' gains"),
    ],
    "10.compute_optimal": [
        (bug(O, "exponents_swapped"), r"compute_optimal\(5.76e\+23, CHINCHILLA's values\).*the exponents are "
                                      r"swapped: N\* = G"),
        (bug(O, "G_inverted"), r"G is inverted"),
        (bug(O, "G_swaps_AB"), r"G swaps A and B"),
        (bug(O, "no_six"), r"the 6 of C = 6 N D is missing"),
        (bug(O, "D_is_C_over_N"), r"D\* = C / N\*: with C = 6 N D, D\* = C / \(6 N\*\)"),
        (bug(O, "returns_D_N"), r"N\* and D\* are swapped"),
        (bug(O, "loss_exponents_swapped"), r"chinchilla_loss\(.*the exponents are swapped: L = E \+ A / N\^alpha"),
        (bug(O, "loss_no_E"), r"chinchilla_loss\(.*E is missing"),
        (bug(O, "loss_math_pow"), r"chinchilla_loss\(N of shape \(3, 1\).*raised \w+Error.*broadcasts to shape "
                                  r"\(3, 4\)"),
        (bug(O, "chinchilla_exponents_swapped"), r"CHINCHILLA = .*\(alpha and beta are swapped\)"),
        (bug(O, "epoch_rounded"), r"EPOCH = .*differ.*Besiroglu et al.'s refit"),
        (bug(O, "params_popped"), r"compute_optimal modified the params dict"),
    ],
    "10.fit_scaling_law": [
        (bug(FI, "linear_space"), r"the Huber objective .* there is .*Huber loss on linear residuals"),
        (bug(FI, "mse"), r"least-squares fit in log space"),
        (bug(FI, "curve_fit"), r"least-squares fit of the loss itself \(in linear space, as curve_fit does\)"),
        (bug(FI, "no_grid"), r"noise-free runs.*your fit stops short of the minimum: a local minimum"),
        (bug(FI, "returns_theta_order"), r"these are \(A, B, E, alpha, beta\)"),
        (bug(FI, "returns_logs"), r"E, A and B are their logarithms"),
        (bug(FI, "mutates_input"), r"modified the tensors N, D or loss"),
        (bug(FI, "default_tolerance"), r"(stops short of the minimum.*an optimiser that stops early|Do your refits "
                                        r"converge).*ftol"),
        (bug(FI, "boot_loose"), r"bootstrap_fit.*times as wide as the reference's.*Do your refits converge"),
        (bug(FI, "boot_minmax"), r"the smallest and largest of the bootstrap fits"),
        (bug(FI, "boot_90"), r"the 5% and 95% quantiles \(a 90% interval\)"),
        (bug(FI, "boot_numpy_90"), r"your resamples are not the lab's: draw them with torch.randint\(n, \(n,\), "
                                   r"generator=g\) from one generator seeded with seed.*NumPy.*; and these are the 5% "
                                   r"and 95% quantiles \(a 90% interval\)"),
        (bug(FI, "boot_numpy_minmax"), r"your resamples are not the lab's.*NumPy.*; and these are the smallest and "
                                       r"largest of the bootstrap fits"),
        (bug(FI, "boot_std"), r"mean \+- 1.96 standard deviations"),
        (bug(FI, "boot_no_replacement"), r"drawn without replacement"),
        (bug(FI, "boot_unseeded"), r"is not deterministic"),
        (bug(FI, "boot_fixed_seed"), r"seed 0's resamples: the seed is ignored"),
    ],
    "10.isoflop_minima": [
        (bug(I, "linear_N"), r"exact parabolas.*the parabola is fitted in N, not in log N"),
        (bug(I, "argmin"), r"exact parabolas.*the size of the best run of each budget"),
        (bug(I, "pooled"), r"exact parabolas.*one parabola is fitted to all the runs"),
        (bug(I, "log10_exp"), r"fitted in log10 N but its vertex exponentiated with exp"),
        (bug(I, "no_2"), r"the vertex is at -b / a"),
        (bug(I, "log_N_returned"), r"this returns log N_opt"),
        (bug(I, "unsorted"), r"the budgets come in the order .* sorted by C"),
        (bug(I, "sorts_in_place"), r"modified the runs it was given"),
    ],
    "10.train_step_cost": [
        (bug(S, "detach"), r"checkpointing=True\)\['grads'\] has no gradient for \['blocks.0.*the graph is cut"),
        (bug(S, "no_checkpoint"), r"checkpointing=True\)\['saved_bytes'\].*checkpointing saves as much as without it"),
        (bug(S, "blocks_not_restored"), r"left model.blocks changed.*put the original ModuleList back"),
        (bug(S, "no_finally"), r"with a target out of range .* left model.blocks changed.*restore the blocks in a "
                               r"finally clause"),
        (bug(S, "tensor_data_ptr"), r"fused projection.*\['saved_bytes'\].*keys the storages by t.data_ptr\(\)"),
        (bug(S, "no_autocast"), r"amp_dtype=torch.bfloat16\)\['saved_bytes'\].*saves as much as in float32"),
        (bug(S, "fp16_no_scaler"), r"amp_dtype=torch.float16\)\['grads'\].*float16's smallest "
                                   r"normal number.*scale the loss"),
        (bug(S, "counts_params"), r"counts the parameters that autograd saves too"),
        (bug(S, "counts_duplicates"), r"counts each saved tensor"),
        (bug(S, "loss_outside"), r"leaves out what the loss saves"),
        (bug(S, "accumulates"), r"checkpointing=True\)\['grads'\].*p.grad accumulates across calls"),
        (bug(S, "zeroes_in_place"), r"the gradients that train_step_cost\(.*\) returned changed when the model was "
                                    r"called again"),
        (bug(S, "optimizer_step"), r"changed the model's parameters"),
    ],
}
