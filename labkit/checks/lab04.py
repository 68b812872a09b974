"""Checks of Lab 4: the feed-forward sublayer, normalisation and the residual stream."""

import torch

from labkit.checks import (as_tensor, attention_weights, compare, define, doubled, mlp_weights, norm_weights,
                           references as ref, table, table_inputs)
from labkit.checks.kernel import run_cases

F_NORMS = ("F.layer_norm", "F.rms_norm")  # forbidden: the lab asks for the norms from tensor operations
SWIGLU_BUGS = {  # diagnosis -> the arguments of references.swiglu that build the bug
    "gate and up are swapped: the SiLU goes on gate_proj(x), which then multiplies up_proj(x)": {"swapped": True},
    "the gate uses a sigmoid: SwiGLU's gate is SiLU(gate_proj(x)) = gate * sigmoid(gate)": {"gate": torch.sigmoid},
    "the gate uses a GELU (that is GeGLU); SwiGLU uses SiLU": {"gate": ref.ACTIVATIONS["gelu"]}}
# (d_model, multiple_of, ffn_dim_multiplier, size, model) from Meta's params.json files; no multiple_of: the defaults
LLAMA_FFN_SIZES = [(4096, 256, None, 11008, "LLaMA 7B / Llama 2 7B"), (6656, 256, None, 17920, "LLaMA 33B"),
                   (5120, 256, None, 13824, "LLaMA 13B / Llama 2 13B"), (8192, 256, None, 22016, "LLaMA 65B"),
                   (8192, 4096, 1.3, 28672, "Llama 2 70B"), (4096, 1024, 1.3, 14336, "Llama 3 8B"),
                   (8192, 4096, 1.3, 28672, "Llama 3 70B"), (16384, 4096, 1.2, 53248, "Llama 3.1 405B"),
                   (4096, None, None, 11008, "LLaMA 7B, with the defaults (multiple_of=256, no multiplier)")]


# ---------------------------------------------------------------- the feed-forward sublayer and SwiGLU
def feedforward_cases(g: torch.Generator) -> list[dict]:
    eye, zero = torch.eye(12), torch.zeros(12)  # fc1 = fc2 = identity: the output is the activation itself
    grid = ("FeedForward(12, 12, activation={!r}) with fc1 = fc2 = identity, on a grid of [-5, 5]", {"init": [12, 12],
            "weights": {"fc1.weight": eye, "fc1.bias": zero, "fc2.weight": eye, "fc2.bias": zero},
            "args": [torch.linspace(-5, 5, 120).view(10, 12)]})
    big = ("FeedForward(16, 40, activation={!r}) (vs F.linear and the PyTorch activation)", {"init": [16, 40],
           "weights": mlp_weights("", 16, 40, g), "args": [2 * torch.randn(2, 5, 16, generator=g)]})
    exact = {"hint": "'gelu' is the exact GELU, x * Phi(x) with the erf (F.gelu's default)"}
    cases = [module | {"what": what.format(name), "activation": name, "init_kwargs": {"activation": name}}
             | (exact if name == "gelu" else {}) for name in ref.ACTIVATIONS for what, module in (grid, big)]
    default = {"what": "FeedForward(16, 40) with the default activation, which must be 'gelu'", "activation": "gelu"}
    return cases + [big[1] | default]


def swiglu_cases(g: torch.Generator) -> list[dict]:
    x = 2 * torch.randn(2, 5, 16, generator=g)
    module = {"init": [16, 40], "weights": mlp_weights("", 16, 40, g, gated=True),
              "hint": "down_proj(SiLU(gate_proj(x)) * up_proj(x))"}
    return [module | {"what": "SwiGLU (vs transformers' LlamaMLP with the same weights)", "args": [x]},
            module | {"what": "SwiGLU on a 2-D input (T, d_model)", "args": [x[0]]}]


def hidden_dim_cases(sizes: list[tuple]) -> list[dict]:
    return [{"what": f"swiglu_hidden_dim({d}" + (f", multiple_of={m}, ffn_dim_multiplier={f}" if m else "") + ")"
                     + (f", {model[0]}'s published size" if model else ""), "args": [d], "want": size,
             "kwargs": {"multiple_of": m, "ffn_dim_multiplier": f} if m else {}} for d, m, f, size, *model in sizes]


def hidden_dim_suspects(case: dict) -> dict:
    d, m, f = case["args"][0], case["kwargs"].get("multiple_of", 256), case["kwargs"].get("ffn_dim_multiplier") or 1
    up, hidden = lambda h: m * -(-h // m), int(8 * d / 3)
    return {"multiply by ffn_dim_multiplier when it is given": up(hidden),
            "round up, not down, to a multiple of multiple_of": m * (int(f * hidden) // m),
            "round up to a multiple of multiple_of": int(f * hidden),
            "start from int(2 * 4 * d_model / 3): two thirds of the usual 4 * d_model": up(int(f * 4 * d))}


ffn_of = lambda case, activation: ref.ffn(case["weights"], "", case["args"][0], activation)
feedforward = table("04.feedforward", feedforward_cases, lambda c: ffn_of(c, ref.ACTIVATIONS[c["activation"]]),
                    "Linear, activation, Linear; ReLU, GELU (erf and tanh) and SiLU match PyTorch's",
                    suspects=lambda c: {f"your FeedForward computes {name!r}": lambda act=act: ffn_of(c, act)
                                        for name, act in (ref.ACTIVATIONS | {"sigmoid": torch.sigmoid}).items()},
                    forbid=("F.gelu", "F.silu", "F.relu"))
swiglu = table("04.swiglu", swiglu_cases, lambda c: ref.llama_mlp(c["weights"], c["args"][0]),
               "matches Hugging Face's LlamaMLP, weight for weight", forbid=("F.silu",),
               suspects=lambda c: {why: lambda bug=bug: ref.swiglu(c["weights"], "", c["args"][0], **bug)
                                   for why, bug in SWIGLU_BUGS.items()})
swiglu_hidden_dim = table(
    "04.swiglu_hidden_dim", lambda g: hidden_dim_cases(LLAMA_FFN_SIZES), lambda c: c["want"],
    "reproduces the intermediate sizes of LLaMA, Llama 2 and Llama 3 (Llama 3 8B: 14336)", suspects=hidden_dim_suspects,
    hint="int(2 * 4d / 3), times ffn_dim_multiplier (int again), rounded up to a multiple of multiple_of")

# ---------------------------------------------------------------- LayerNorm and RMSNorm
NORMS = {  # name -> default eps, a large eps, the output of float32 weights on a bfloat16 input, the bfloat16 hint
    "LayerNorm": ("1e-5", 0.5, "bfloat16, as in nn.LayerNorm", "compute in float32 (x.float()), weight and bias "
                  "included, and cast the result back with .to(x.dtype), as nn.LayerNorm does"),
    "RMSNorm": ("1e-6", 0.1, "float32, as in LlamaRMSNorm", "Llama's order: normalise in float32, cast back to the "
                "input dtype with .to(x.dtype), and only then multiply by the weight")}


def norm_cases(g: torch.Generator, name: str) -> list[dict]:
    (eps, big_eps, output, order), layer = NORMS[name], name == "LayerNorm"
    base = {"init": [48], "weights": norm_weights("", 48, g, bias=layer), "eps": float(eps)}
    x = 2 * torch.randn(3, 5, 48, generator=g) + 0.5  # a nonzero mean, as in a real residual stream; rms about 2
    bf16 = base | {"args": [(3 * torch.randn(8, 16, 48, generator=g) + 1).bfloat16()], "max_share": 0.01, "hint": order}
    cases = [base | {"what": f"{name}(48) on (3, 5, 48)", "args": [x]},
             base | {"what": f"{name}(48) on a 2-D input (4, 48)", "args": [torch.randn(4, 48, generator=g) - 1]},
             base | {"what": f"{name}(48, eps={big_eps})", "init_kwargs": {"eps": big_eps}, "eps": big_eps, "args": [x],
                     "hint": "use the eps given to the constructor"},
             base | {"what": f"{name}(48) on inputs of rms 1e-3 (eps = {eps} by default)", "args": [x / 2000],
                     "atol": 1e-4, "hint": f"eps goes under the square root, and the default eps is {eps}"},
             bf16 | {"what": f"{name}(48) in bfloat16 on a bfloat16 input", "dtype": torch.bfloat16},
             bf16 | {"what": f"{name}(48) with float32 parameters on a bfloat16 input (the output is {output})"}]
    nn_rms = {"what": "RMSNorm(48) in bfloat16 (vs nn.RMSNorm in bfloat16, which rounds once, after the weight)",
              "llama": False, "max_share": 1.0}  # Llama rounds, then multiplies: one ulp away on a quarter of them
    return cases if layer else cases + [cases[4] | nn_rms]


def norm_reference(case: dict) -> torch.Tensor:
    x, w, eps = case["args"][0], case["weights"], case["eps"]
    dtype = case.get("dtype", torch.float64 if x.dtype == torch.float32 else torch.float32)  # the student's module's
    return (ref.layer_norm(w, x, eps, dtype) if "bias" in w
            else ref.rms_norm(w["weight"], x, eps, dtype, case.get("llama", True)))


def norm_suspects(case: dict) -> dict:
    x, w, eps = case["args"][0].double(), doubled(case["weights"]), case["eps"]
    centred, ms = x - x.mean(-1, keepdim=True), x.pow(2).mean(-1, keepdim=True)
    if "bias" in w:
        return {"the variance is the biased one, mean((x - mu)^2), as in nn.LayerNorm (x.var(-1, unbiased=False))":
                lambda: centred / (x.var(-1, keepdim=True) + eps).sqrt() * w["weight"] + w["bias"],
                "eps goes under the square root: (x - mu) / sqrt(var + eps)":
                lambda: centred / (centred.pow(2).mean(-1, keepdim=True).sqrt() + eps) * w["weight"] + w["bias"]}
    return {"RMSNorm does not subtract the mean (LayerNorm does): x / sqrt(mean(x^2) + eps)":
            lambda: centred * torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + eps) * w["weight"],
            "eps goes under the square root: x * rsqrt(mean(x^2) + eps), not x / (sqrt(mean(x^2)) + eps)":
            lambda: x / (ms.sqrt() + eps) * w["weight"],
            "divide by the root of the mean of squares, mean(x^2) over the last axis, not the sum":
            lambda: x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + eps) * w["weight"]}


layernorm = table("04.layernorm", lambda g: norm_cases(g, "LayerNorm"), norm_reference, suspects=norm_suspects,
                  ok="matches nn.LayerNorm in float32 and bfloat16, with eps under the square root", forbid=F_NORMS)
rmsnorm = table("04.rmsnorm", lambda g: norm_cases(g, "RMSNorm"), norm_reference, suspects=norm_suspects,
                ok="matches LlamaRMSNorm and nn.RMSNorm in float32 and bfloat16; no mean subtracted, eps under "
                "the root", forbid=F_NORMS)


def invariance_cases(g: torch.Generator) -> list[dict]:  # LayerNorm(32), then RMSNorm(32), on x, a x and x + b
    x = torch.randn(4, 6, 32, generator=g) + torch.randn(4, 6, 1, generator=g)
    scale, shift = 0.5 + 3.5 * torch.rand(4, 6, 1, generator=g), 6 * torch.rand(4, 6, 1, generator=g) - 3  # per token
    return [{"student": i, "init": [32], "args": [t]} for i in (0, 1) for t in (x, scale * x, x + shift)]


@define("04.norm_invariance", table_inputs(invariance_cases), run_cases, forbid=F_NORMS)
def norm_invariance(inputs: dict, out: dict) -> str:
    ln, ln_scaled, ln_shifted, rms, rms_scaled, rms_shifted = out["outputs"]
    ln, rms = as_tensor("LayerNorm(x)", ln), as_tensor("RMSNorm(x)", rms)
    compare("LayerNorm(a x) vs LayerNorm(x), for a > 0 per token: LayerNorm is scale-invariant", ln_scaled, ln, 1e-4)
    compare("LayerNorm(x + b) vs LayerNorm(x), for a constant b per token: LayerNorm is shift-invariant",
            ln_shifted, ln, 1e-4, hint="subtract the mean of the features, x - x.mean(-1)")
    compare("RMSNorm(a x) vs RMSNorm(x), for a > 0 per token: RMSNorm is scale-invariant", rms_scaled, rms, 1e-4)
    compare("RMSNorm(x + b), for a constant b per token (vs LlamaRMSNorm with a unit weight)", rms_shifted,
            ref.rms_norm(torch.ones(32), inputs["cases"][5]["args"][0]), 1e-4,
            suspects={"RMSNorm(x + b) equals RMSNorm(x): your RMSNorm is shift-invariant, so it subtracts the mean. "
                      "RMSNorm divides x itself by sqrt(mean(x^2) + eps) and does not centre it": rms})
    ones = torch.ones(ln.shape[:-1], dtype=torch.float64)  # unit weights: mean 0 and variance 1, or mean square 1
    compare("mean over the features of LayerNorm(x) (unit weight, zero bias)", ln.mean(-1), 0 * ones, 1e-4)
    compare("variance over the features of LayerNorm(x) (unit weight, zero bias)", ln.var(-1, correction=0), ones, 1e-3)
    compare("mean square over the features of RMSNorm(x) (unit weight)", rms.pow(2).mean(-1), ones, 1e-3)
    return "LayerNorm ignores shift and scale, RMSNorm ignores scale but not shift; unit variance and unit mean square"


# ---------------------------------------------------------------- the block
BLOCK_CASES = [("pre", "layer", "gelu"), ("post", "layer", "gelu"), ("pre", "rms", "swiglu"), ("post", "rms", "swiglu"),
               ("pre", "rms", "gelu", 40), ("post", "layer", "swiglu", 24), ("pre", "layer", "swiglu", 24),
               ("post", "rms", "gelu", 40)]  # (norm, norm_type, ffn[, d_ff])
BLOCK_DIAGNOSES = {  # a wrong arrangement (see references.block) -> what it means
    "norm before add": "post-norm normalises the residual sum, norm(x + sublayer(x)); you normalised the sublayer's "
                       "output before adding it",
    "post": "this is post-norm, norm(x + sublayer(x)); pre-norm is x + sublayer(norm(x))",
    "pre": "this is pre-norm, x + sublayer(norm(x)); post-norm is norm(x + sublayer(x))",
    "not causal": "the block's self-attention must be causal (a causal mask on x's device)"}


def block_case(g: torch.Generator, shape: tuple, n_heads: int, *config) -> dict:
    """Block(shape[-1], n_heads, norm, norm_type, ffn[, d_ff]) on an input of that shape (default d_ff: the lab's)."""
    d_model, kwargs = shape[-1], dict(zip(("norm", "norm_type", "ffn", "d_ff"), config))
    layer, gated = kwargs["norm_type"] == "layer", kwargs["ffn"] == "swiglu"
    width = kwargs.get("d_ff") or (256 * -(-int(8 * d_model / 3) // 256) if gated else 4 * d_model)
    weights = (norm_weights("norm1", d_model, g, layer) | norm_weights("norm2", d_model, g, layer)
               | attention_weights("attn", d_model, g, bias=False) | mlp_weights("ffn", d_model, width, g, gated))
    call = f"Block({d_model}, {n_heads}, " + ", ".join(f"{k}={v!r}" for k, v in kwargs.items()) + ")"
    return kwargs | {"what": f"{call} on {shape}", "init": [d_model, n_heads], "init_kwargs": kwargs,
                     "weights": weights, "args": [2 * torch.randn(shape, generator=g) + 0.5], "atol": 1e-4}


block_of = lambda case, variant="": ref.block(case, case["args"][0], case["init"][1], variant)
block = table("04.block", lambda g: [block_case(g, (2, 6, 16), 4, *config) for config in BLOCK_CASES], block_of,
              "pre- and post-norm, LayerNorm and RMSNorm, GELU and SwiGLU blocks match a PyTorch reference",
              suspects=lambda c: {why: lambda v=v: block_of(c, v) for v, why in BLOCK_DIAGNOSES.items()},
              forbid=F_NORMS)

# ---------------------------------------------------------------- parameters and FLOPs of a Llama layer
LAYER_CONFIGS = [("Llama 3 8B", 4096, 32, 8, 14336, 8192), ("Llama 2 7B", 4096, 32, 32, 11008, 4096),
                 ("a small layer", 64, 4, 2, 176, 16)]  # (name, d_model, n_heads, n_kv_heads, d_ff, seq_len)
COUNT_HINTS = {"ffn": "three matrices: gate_proj, up_proj (d_model x d_ff) and down_proj",
               "norms": "two RMSNorms of d_model weights each",
               "flops": "forward FLOPs per token: 2 per weight (a multiply and an add), plus, for attention, "
                        "2 * seq_len * d_model for the scores q k^T and as much for the weighted sum of the values "
                        "(all keys, no causal saving)"}


@define("04.layer_counts", table_inputs(lambda g: [{"student": i, "args": list(c[1:5 + i])}
                                                   for c in LAYER_CONFIGS for i in (0, 1)]), run_cases)
def layer_counts(inputs: dict, out: dict) -> str:
    outputs = out["outputs"]  # layer_params(d_model, n_heads, n_kv_heads, d_ff), then layer_flops(..., seq_len)
    for (name, d, h, kv, d_ff, T), params, flops in zip(LAYER_CONFIGS, outputs[::2], outputs[1::2], strict=True):
        want_params, want_flops = ref.measure_llama_layer(d, h, kv, d_ff, T)
        gqa = {"attention": {f"with {kv} key-value heads, k_proj and v_proj are {d} x {kv * d // h}": 4 * d * d}}
        for key, want in want_params.items():  # .get(key, params): compare reports an attempt that raised
            compare(f"layer_params({d}, {h}, {kv}, {d_ff}) for {name}: {key!r} vs transformers' LlamaDecoderLayer",
                    params.get(key, params), want, hint=COUNT_HINTS.get(key, ""), suspects=gqa.get(key))
        for key, want in want_flops.items():
            compare(f"layer_flops({d}, {h}, {kv}, {d_ff}, seq_len={T}) for {name}: {key!r} per token vs "
                    "torch.utils.flop_counter on transformers' LlamaDecoderLayer", flops.get(key, flops), want,
                    hint=COUNT_HINTS["flops"])
    return ("parameters and forward FLOPs per token equal those measured on transformers' LlamaDecoderLayer "
            "(Llama 3 8B, Llama 2 7B, a small GQA layer)")
