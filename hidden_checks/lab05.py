"""Hidden checks of Lab 5: edge cases of the same API (see README.md)."""

from labkit.checks import table_inputs
from labkit.checks.lab05 import (capacity, capacity_inputs, deepseek_inputs, deepseek_router, expert_parallel,
                                 expert_parallel_inputs, mor, mor_inputs, router, router_cases, sparse_moe,
                                 sparse_moe_inputs)

# k = E (every expert, weighted by the full softmax), a single token, and a wider bfloat16 router
router_edge = router.variant("05.hidden.router_edge", table_inputs(lambda g: router_cases(
    g, configs=((8, 3, 3, 5), (8, 2, 1, 1), (24, 16, 4, 12)), bf16=((24, 16, 4, 12),))), ("TopKRouter",))

# one token; more experts than tokens (most get none); every expert for every token
sparse_moe_edge = sparse_moe.variant("05.hidden.sparse_moe_edge", lambda seed: sparse_moe_inputs(
    seed, count=False, configs=[(8, 12, 4, 2, (1, 1), None, " (a single token)"),
                                (8, 12, 16, 2, (1, 3), None, " (16 experts, 3 tokens)"),
                                (8, 6, 4, 4, (2, 3), None, " (k = E = 4)")]), ("SparseMoE",))

# capacity 0.25 of the fair share (most assignments dropped), and 3.0 (none)
capacity_edge = capacity.variant("05.hidden.capacity_edge", lambda seed: capacity_inputs(
    seed, factors=(0.25, 3.0), k1=False, none=False), ("SparseMoE",))

# groups of two experts (n_group = E / 2: a group's score is the sum of both), k = 1 among 8 groups, and 8 groups
# of two with a strongly negative bias on one expert of each (the third choice is negative: a mask with 0 would win)
deepseek_edge = deepseek_router.variant("05.hidden.deepseek_edge", lambda seed: deepseek_inputs(
    seed, configs=((16, 8, 3, 4, 2, 2.5, 20), (16, 16, 1, 8, 3, 1.0, 20), (16, 16, 3, 8, 2, 2.5, 20, True)),
    updates=False), ("DeepSeekRouter",))

# capacity 1.0 (every token recursed at every step), and a single recursion
mor_edge = mor.variant("05.hidden.mor_edge", lambda seed: mor_inputs(seed, configs=((2, 6, 8, 3, 1.0),
                                                                                     (2, 9, 8, 1, 0.5))),
                       ("MixtureOfRecursions",))

# 4 processes, 2 experts each, 5 tokens (shares of 2, 1, 1, 1)
expert_parallel_edge = expert_parallel.variant("05.hidden.expert_parallel_edge", lambda seed: expert_parallel_inputs(
    seed, configs=((8, 4, (1, 5)),)), ("run_expert_parallel", "SparseMoE"))
