"""Hidden checks of Lab 11: the same API on other sizes and configs (see README.md)."""
from __future__ import annotations

from labkit.checks.references import OPEN_PUBLISHED
from labkit.checks.lab11 import (count_inputs, count_params, export_pretrained, generate, kv_bytes_per_token,
                                 kv_inputs, load_hf_state_dict, model_inputs, to_hf_state_dict)

MODEL_ARGS = ("build_model", "load_hf_state_dict")
# Other layouts of each family: Llama tied, with MHA and a head_dim apart from hidden / heads, theta from a legacy
# top-level rope_theta; Mixtral with one KV head and 3 of 6 experts; DeepSeek-V3 without the query bottleneck
# (q_proj), two dense layers and two shared experts, without norm_topk_prob; Mamba untied, with biases and a set
# time_step_rank; Jamba with attention at offset 0 of period 3 and MoE on odd layers. Then DeepSeek-V3 twice more:
# rotate-half rows (rope_interleave false: nothing to de-interleave) with its routing and shape fields left to
# transformers' defaults (q_lora_rank 1536, first_k_dense_replace 3, n_group 8, topk_group 4, routed_scaling_factor
# 2.5, one shared expert), and with attention biases (kv_a_proj_with_mqa's bias has rope rows too).
DEEPSEEK_DEFAULTS = ("q_lora_rank", "first_k_dense_replace", "n_group", "topk_group", "routed_scaling_factor",
                     "n_shared_experts")
EDGE = (("llama", (("num_attention_heads", 2), ("num_key_value_heads", 2), ("head_dim", 12),
                   ("tie_word_embeddings", True), ("legacy_rope", True),
                   ("rope_parameters", {"rope_type": "default", "rope_theta": 20000.0}))),
        ("mixtral", (("num_key_value_heads", 1), ("num_local_experts", 6), ("num_experts_per_tok", 3),
                     ("num_hidden_layers", 3), ("head_dim", 12))),
        ("deepseek_v3", (("q_lora_rank", None), ("num_hidden_layers", 3), ("first_k_dense_replace", 2),
                         ("n_shared_experts", 2), ("norm_topk_prob", False), ("qk_rope_head_dim", 4))),
        ("mamba", (("tie_word_embeddings", False), ("use_bias", True), ("time_step_rank", 4), ("conv_kernel", 3),
                   ("num_hidden_layers", 3))),
        ("jamba", (("num_hidden_layers", 3), ("attn_layer_period", 3), ("attn_layer_offset", 0),
                   ("expert_layer_offset", 1), ("num_key_value_heads", 1), ("mamba_d_conv", 3))),
        ("deepseek_v3", (("rope_interleave", False), ("omit", DEEPSEEK_DEFAULTS), ("num_hidden_layers", 4),
                         ("n_routed_experts", 16))),
        ("deepseek_v3", (("attention_bias", True),)))

load_edge = load_hf_state_dict.variant("11.hidden.load_hf_state_dict_edge", lambda seed: model_inputs(seed, EDGE),
                                       MODEL_ARGS)
generate_edge = generate.variant("11.hidden.generate_edge", lambda seed: model_inputs(seed, EDGE, "generate"),
                                 MODEL_ARGS + ("generate",))
to_hf_edge = to_hf_state_dict.variant("11.hidden.to_hf_state_dict_edge", lambda seed: model_inputs(seed, EDGE, "to_hf"),
                                      MODEL_ARGS + ("to_hf_state_dict",))
export_edge = export_pretrained.variant("11.hidden.export_pretrained_edge", lambda seed: model_inputs(seed, EDGE, "export"),
                                        MODEL_ARGS + ("export_pretrained",))

# other random small configs (float32's 4 bytes for some), and two other published models
# (their config.json in full, every field spelled out)
kv_edge = kv_bytes_per_token.variant("11.hidden.kv_bytes_per_token_edge", lambda seed: kv_inputs(
    seed + 7, published=("Mixtral 8x7B", "Jamba v0.1", "Mamba-2.8B"), table=OPEN_PUBLISHED),
    ("kv_bytes_per_token", "state_bytes"))

# the published totals and actives the visible check leaves out (their config.json in full), and other small configs:
# Jamba's "auto" rank of a width that is not a multiple of 16, DeepSeek-V3 leaving out its shape defaults
count_edge = count_params.variant("11.hidden.count_params_edge", lambda seed: count_inputs(seed + 7, (
    ("llama", False, {}), ("mamba", False, {}), ("deepseek_v3", True, {}), ("jamba", True, {}),
    ("jamba", False, {"hidden_size": 40, "mamba_dt_rank": None}),
    ("deepseek_v3", False, {"num_hidden_layers": 5, "q_lora_rank": None, "first_k_dense_replace": None,
                            "n_shared_experts": None, "n_group": None, "topk_group": None}),
    "Mixtral 8x7B", "Jamba v0.1, active", "Llama 3 8B, active", "Mamba-2.8B, active", "DeepSeek-V3"),
    table=OPEN_PUBLISHED), ("count_params",))
