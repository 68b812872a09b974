"""Hidden checks of Lab 8: the same API on other inputs and edge cases (see README.md)."""
from __future__ import annotations

import torch

from labkit.checks.lab08 import (block_inputs, discretize_zoh, mamba_block, modes_inputs, parallel_inputs,
                                 parallel_scan, s4d_inputs, s4d_kernel, scan_inputs, selective_scan, ssd_chunked,
                                 ssd_inputs, ssm_modes, zoh_inputs)

# a single state; every entry of A zero (B_bar = dt B); a large dt; a tiny dt in float64 (compared as B_bar / dt), so
# tiny that exp(dt A) - 1 keeps only about 4 digits there
zoh_edge = discretize_zoh.variant("08.hidden.discretize_zoh_edge", lambda seed: zoh_inputs(seed, [
    ("a single real state", 1, 0.5, torch.float64, "real"), ("A = 0 everywhere", 1, 0.7, torch.float64, "zeros"),
    ("a large dt", 4, 20.0, torch.complex128, "complex"), ("float64, dt = 1e-12", 5, 1e-12, torch.float64, "real")]),
    ("discretize_zoh",))

# one state; L = 2; a long sequence (L = 300) of slowly decaying complex modes
modes_edge = ssm_modes.variant("08.hidden.ssm_modes_edge", lambda seed: modes_inputs(seed, [
    ("one state", 1, 5, "real"), ("L = 2", 3, 2, "s4d"), ("L = 300", 6, 300, "s4d")]),
    ("ssm_recurrent", "ssm_convolution"))

# one mode; a tiny and a large dt; a long kernel
s4d_edge = s4d_kernel.variant("08.hidden.s4d_kernel_edge", lambda seed: s4d_inputs(seed, [
    ("one mode", 1, 0.1, 8, "s4d"), ("dt = 1e-3", 4, 1e-3, 20, "s4d"), ("dt = 1", 4, 1.0, 12, "s4d"),
    ("a long kernel", 16, 0.01, 500, "s4d"), ("one real state, L = 1", 1, 0.3, 1, "real")]),
    ("s4d_kernel",))

# d_state 1; a single channel and step; a longer sequence with everything; delta_bias without softplus, D = L
scan_edge = selective_scan.variant("08.hidden.selective_scan_edge", lambda seed: scan_inputs(seed, [
    ("d_state 1", 2, 3, 1, 5, "D z"), ("one channel, L = 1", 1, 1, 3, 1, ""),
    ("L = 40", 2, 3, 4, 40, "D z bias softplus"), ("batch 3, softplus only", 3, 2, 2, 4, "softplus"),
    ("delta_bias, no softplus, D = L", 2, 4, 3, 4, "D bias")]),
    ("selective_scan",))

# 1-d inputs, L = 1 and 3; a power of two; L = 1000 and 33 behind three leading dimensions; no timing
parallel_edge = parallel_scan.variant("08.hidden.parallel_scan_edge", lambda seed: parallel_inputs(
    seed, [(1,), (3,), (4, 16), (1, 1, 1000), (3, 2, 5, 33)], speed=None), ("parallel_scan",))

# d_conv 2, d_state 1, expand 1, dt_rank 1, L = 1; L < d_conv; batch 3; dt_rank 'auto' of d_model 40 (3)
block_edge = mamba_block.variant("08.hidden.mamba_block_edge", lambda seed: block_inputs(seed, [
    (8, 1, 2, 1, 1, "parallel", 1, 1), (12, 3, 4, 2, 2, "sequential", 1, 3), (16, 2, 2, 1, "auto", "parallel", 3, 6),
    (40, 2, 3, 2, "auto", "sequential", 1, 4)]),
    ("MambaBlock",))

# L = 1; G = H (every head its own group); chunk_size = L; P = N = 1; 3 groups of 2 heads
ssd_edge = ssd_chunked.variant("08.hidden.ssd_chunked_edge", lambda seed: ssd_inputs(seed, [
    (1, 1, 2, 1, 1, 2, 4, "sequential"), (2, 9, 4, 2, 4, 3, 3, "transformers"), (1, 16, 2, 1, 1, 1, 16, "selective"),
    (1, 7, 2, 3, 2, 2, 7, "sequential"),
    (1, 10, 6, 2, 3, 2, 4, "sequential")]), ("ssd_chunked",))
