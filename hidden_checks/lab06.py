"""Hidden checks of Lab 6: the same API on other inputs and edge cases (see README.md)."""
from __future__ import annotations

from labkit.checks.lab06 import (bigbird_inputs, bigbird_mask, linear_attention, linear_attention_recurrent,
                                 linear_inputs, longformer_inputs, longformer_mask, mask_inputs, orthogonal_projection,
                                 projection_inputs, sliding_mask_inputs, sliding_window_attention, sliding_window_mask,
                                 streaming_cache, streaming_inputs, strided_mask, swa_inputs)

# a single position; a window of T - 1, of T + 1
sliding_mask_edge = sliding_window_mask.variant("06.hidden.sliding_window_mask_edge", lambda seed: sliding_mask_inputs(
    seed, [(1, 1), (1, 4), (10, 9), (10, 11), (2, 1)]), ("sliding_window_mask",))

# a single position (global or not), every token global, a window of 0 or 1 (a band of 0 on each side)
longformer_edge = longformer_mask.variant("06.hidden.longformer_mask_edge", lambda seed: longformer_inputs(
    seed, [(1, 2, [0]), (1, 2, []), (6, 4, [0, 1, 2, 3, 4, 5]), (7, 1, [3]), (9, 0, [0, 8])]), ("longformer_mask",))

# one block; two blocks, both global; n_random beyond the candidates (every non-global block then sees everything);
# blocks of one token
bigbird_edge = bigbird_mask.variant("06.hidden.bigbird_mask_edge", lambda seed: bigbird_inputs(
    seed, exact=((4, 4, 0, 0), (8, 4, 3, 2), (24, 4, 10, 1), (6, 1, 0, 1)),
    random=((24, 4, 10, 1), (30, 1, 4, 1), (36, 3, 5, 0))), ("bigbird_mask",))

# a single position; a stride of 1 (the causal mask), of T - 1 and beyond T
strided_edge = strided_mask.variant("06.hidden.strided_mask_edge", lambda seed: mask_inputs(
    seed, [(1, 1), (1, 3), (9, 1), (9, 8), (4, 6)]), ("strided_mask",))

# B = 2 and H = 3 with d = 8, T prime, window T - 1, T, 1 and a few between; no memory case
sliding_attention_edge = sliding_window_attention.variant(
    "06.hidden.sliding_window_attention_edge", lambda seed: swa_inputs(seed, (2, 3, 31, 8), (30, 31, 1, 2, 7, 16),
                                                                       memory=False), ("sliding_window_attention",))

# a single position; values of width 1
linear_edge = linear_attention.variant("06.hidden.linear_attention_edge", lambda seed: linear_inputs(
    seed, B=1, H=3, T=9, d=4, edge=True), ("linear_attention",))
recurrent_edge = linear_attention_recurrent.variant(
    "06.hidden.linear_attention_recurrent_edge",
    lambda seed: linear_inputs(seed, recurrent=True, B=1, H=3, T=9, d=4, edge=True), ("linear_attention_recurrent",))

# d = 2 and d = 16, a single row, exactly one block, three blocks; no statistics
projection_edge = orthogonal_projection.variant("06.hidden.orthogonal_projection_edge", lambda seed: projection_inputs(
    seed, shapes=((5, 2), (1, 16), (16, 16), (33, 16), (48, 16)), draws=None), ("orthogonal_projection",))

# no sinks; appends longer than the window (and than the whole cache); a cache of sinks and one recent token
streaming_edge = streaming_cache.variant("06.hidden.streaming_cache_edge", lambda seed: streaming_inputs(
    seed, runs=[(0, 3, [5, 1, 7, 2, 1]), (2, 3, [8, 1, 6, 1]), (3, 1, [1, 10, 1, 2]), (0, 1, [1, 1, 3])],
    memory=None), ("StreamingKVCache",))
