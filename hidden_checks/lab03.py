"""Hidden checks of Lab 3: the visible checks rerun on edge cases (see README.md)."""

import torch

from labkit.checks import define_hidden, references as ref, seeded_generator, table_inputs
from labkit.checks.kernel import run_cases
from labkit.checks.lab03 import (alibi_bias, alibi_slopes, attention_cases, plain_tables, rope, rope_attention,
                                 sinusoidal)

sinusoidal_edge = sinusoidal.variant("03.hidden.sinusoidal_edge", table_inputs(lambda g: [
    {"args": args, "shift": 3} for args in ([1, 2, 1e4], [7, 10, 10.0], [300, 4, 1e4])]), ("sinusoidal_encoding",))


def rope_edge_inputs(seed: int) -> dict:
    g, p = seeded_generator(seed), torch.tensor([0, 5, 255, 257, 2049, 8191])
    # head_dim 2 and 64; x without batch and head axes, and with five; float32 angles at 8191 are off by ~1e-3 rad
    return {"atol": 3e-3, "cases": plain_tables(6, 2, 10000.0, [p]) + plain_tables(6, 64, 500000.0, [p]),
            "apply": [(torch.randn(6, 64, generator=g), *(t.float() for t in ref.llama_cos_sin(64, 500000.0, p))),
                      (torch.randn(2, 1, 3, 6, 2, generator=g), *(t.float() for t in ref.llama_cos_sin(2, 1e4, p)))]}


rope_edge = rope.variant("03.hidden.rope_edge", rope_edge_inputs, ("rotate_half", "rope_cos_sin", "apply_rope"))


@define_hidden("03.hidden.alibi_edge", ("alibi_slopes", "alibi_bias"), table_inputs(lambda g: [
    {"what": f"alibi_slopes({n})", "args": [n]} for n in (3, 5, 24, 32)] + [
    {"what": f"alibi_bias({H}, {T_q}, {T_k})", "args": [H, T_q, T_k], "student": 1}
    for H, T_q, T_k in ((1, 1, 1), (6, 2, 5), (3, 4, 4))]), run_cases)
def alibi_edge(inputs: dict, out: dict) -> None:
    for case, got in zip(inputs["cases"], out["outputs"], strict=True):
        (alibi_bias if case.get("student") else alibi_slopes).verify({"cases": [case]}, {"outputs": [got]})


# RoPE on one token, with one head and base 500000, with linear scaling of factor 4; ALiBi with 6 heads
attention_edge = rope_attention.variant("03.hidden.attention_edge", table_inputs(lambda g: (
    attention_cases(g, 16, 1, [(2, {"pos": "rope"})])
    + attention_cases(g, 16, 9, [(1, {"pos": "rope", "rope_base": 500000.0}),
                                 (2, {"pos": "rope", "rope_scaling": {"type": "linear", "factor": 4.0}})])
    + attention_cases(g, 24, 5, [(6, {"pos": "alibi"})]))), ("CausalSelfAttention",))
