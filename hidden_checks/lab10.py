"""Hidden checks of Lab 10: the same API on other inputs and edge cases (see README.md)."""
from __future__ import annotations

from labkit.checks.lab10 import (compute_optimal, count_inputs, count_params, fit_inputs, fit_scaling_law,
                                 flops_inputs, flops_per_token, isoflop_inputs, isoflop_minima, optimal_inputs,
                                 step_inputs, train_step_cost)

# MoE with one expert per token and with every expert active; MHA untied with head_dim set; a tied Llama 3.2 1B;
# Mixtral 8x7B active
count_edge = count_params.variant("10.hidden.count_params_edge", lambda seed: count_inputs(seed, [
    ("a small Llama (MHA, untied, head_dim set)", False, False, False, True, False),
    ("a small Mixtral (GQA, tied)", True, True, True, False, False),
    ("a small Mixtral (MHA, untied, head_dim set)", True, False, False, True, True),
    ("a small Llama (GQA, untied; dense, so all of it is active)", False, False, True, False, True),
    "Llama 3.2 1B (tied)", "Mixtral 8x7B, active"]), ("count_params",))

# one token of context; a long context (32k) where the attention term is a large share; MoE inference
flops_edge = flops_per_token.variant("10.hidden.flops_per_token_edge", lambda seed: flops_inputs(seed, [
    ("a small Llama (GQA, head_dim set, tied)", False, True, True, True, 1, True),
    ("a small Mixtral (MHA, untied, head_dim set)", True, False, False, True, 1024, False),
    ("Llama 3 8B", 32768, False), ("Mixtral 8x7B", 1, False), ("Llama 3.2 1B (tied)", 131072, True)]),
    ("flops_per_token",))

# four random parameter sets besides the printed and Epoch's
optimal_edge = compute_optimal.variant("10.hidden.compute_optimal_edge", lambda seed: optimal_inputs(seed, 4),
                                       ("chinchilla_loss", "compute_optimal", "CHINCHILLA", "EPOCH"))

# 8 resamples; 15 noise-free runs (5 sizes x 3 token counts)
fit_edge = fit_scaling_law.variant("10.hidden.fit_scaling_law_edge", lambda seed: fit_inputs(seed, 8, (5, 3)),
                                   ("fit_scaling_law", "bootstrap_fit"))

# three runs per budget (the parabola through them exactly); budgets with many runs; one budget of 9 runs
isoflop_edge = isoflop_minima.variant("10.hidden.isoflop_minima_edge", lambda seed: isoflop_inputs(
    seed, ((3e14, 3), (3e15, 4), (3e16, 3)), (12, 3, 9), (1e19, 9)), ("isoflop_minima",))

# LayerNorm, GELU, learned positions, MHA, three layers, untied; a shorter batch
step_edge = train_step_cost.variant("10.hidden.train_step_cost_edge", lambda seed: step_inputs(
    seed, {"vocab_size": 40, "d_model": 24, "n_layers": 3, "n_heads": 3, "max_len": 16, "norm": "layer",
           "pos": "learned", "ffn": "gelu", "tie_embeddings": False, "init": "torch"}, batch=(3, 16)),
    ("train_step_cost",))
