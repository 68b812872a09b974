"""Hidden checks of Lab 9: the same API on other inputs and edge cases (see README.md)."""
from __future__ import annotations

import torch

from labkit.checks.lab09 import (F64, average, average_inputs, dare, dare_inputs, slerp, slerp_inputs, task_arithmetic,
                                 task_inputs, ties_inputs, ties_merge, weight_matching, wm_inputs)

# 4 bfloat16 models; integer weights; 4 float32 copies of one model with weights summing to 1
average_edge = average.variant("09.hidden.average_edge", lambda seed: average_inputs(seed, [
    ("4 bfloat16 models, weights [1.0, 1.0, 2.0, 4.0]", 4, [1.0, 1.0, 2.0, 4.0], torch.bfloat16, False),
    ("3 models, integer weights [1, 2, 3]", 3, [1, 2, 3], F64, False),
    ("4 float32 copies of one model, weights [0.1, 0.2, 0.3, 0.4]", 4, [0.1, 0.2, 0.3, 0.4], torch.float32, True)]),
    ("average",))

# 4 fine-tunes with a zero and a negative scale; float32 with both scales 0 (base itself)
task_edge = task_arithmetic.variant("09.hidden.task_arithmetic_edge", lambda seed: task_inputs(seed, [
    (F64, 4, [1.0, -1.0, 0.0, 2.5]), (torch.float32, 2, [0.0, 0.0])]), ("task_vector", "apply_task_vectors"))

# 4 models at density 1 (no trim) with unequal weights; 1-element biases and a single output (k = max(1, 0) = 1 keeps
# the one entry); density 0.9 with lam 2 in float32; a single fine-tune (the merge is base + lam * trimmed tau), with
# an empty float entry (trim returns an empty tensor as it is: topk(1) of nothing raises)
ties_edge = ties_merge.variant("09.hidden.ties_merge_edge", lambda seed: ties_inputs(seed, [
    (4, 1.0, [1.0, 2.0, 0.5, 1.5], 1.0, F64, (5, 6, 4)), (3, 0.3, [0.5, 1.0, 1.0], 0.8, F64, (4, 3, 1)),
    (3, 0.9, None, 2.0, torch.float32, (5, 6, 4)), (1, 0.4, [3.0], 1.0, F64, (5, 6, 4), "empty")]), ("ties_merge",))

# drop_rate 0.99 on 50,000 entries; one-entry tensors; an empty tensor between two others (it draws nothing); a
# float32 dict with the L1 rescale at drop_rate 0.5; drop_rate 0.95 on three entries (all may be dropped)
dare_edge = dare.variant("09.hidden.dare_edge", lambda seed: dare_inputs(seed, [
    ("one float32 tensor of 50,000 entries", {"w": (250, 200)}, torch.float32, 0.99, "l1", "randn"),
    ("one-entry tensors", {"a": (1,), "b": (1, 1), "c": (1,)}, F64, 0.5, "inverse", "randn"),
    ("an empty tensor between two others", {"a": (30, 40), "empty": (0,), "b": (50,)}, F64, 0.4, "inverse", "randn"),
    ("a float32 task vector of 3 tensors", {"fc1.weight": (40, 30), "fc1.bias": (40,), "fc2.weight": (10, 40)},
     torch.float32, 0.5, "l1", "randn"),
    ("three entries", {"w": (3,)}, F64, 0.95, "l1", "randn")]), ("dare",))

# t outside [0, 1] (mergekit extrapolates); t = 0 and 1 in float32; two zero tensors, equal tensors, a norm below eps
slerp_edge = slerp.variant("09.hidden.slerp_edge", lambda seed: slerp_inputs(
    seed, [(F64, [1.5, -0.25]), (torch.float32, [0.0, 1.0])], edge=True), ("slerp",))

# one hidden layer of 8 (the brute force over 40,320 permutations); three hidden layers, permuted and independent
wm_edge = weight_matching.variant("09.hidden.weight_matching_edge", lambda seed: wm_inputs(seed, [
    ([6, 8, 4], "random"), ([12, 6, 5, 4, 12], "permuted"), ([4, 5, 6, 4, 3], "random"), ([3, 3, 2], "permuted")]),
    ("weight_matching",))
