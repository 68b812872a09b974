"""Hidden checks of Lab 2: the visible checks on edge cases, and against Hugging Face's Llama and DeepSeek-V3."""

import torch

from labkit.checks import lab02 as visible, table_inputs

repeat_kv_hf = visible.repeat_kv.variant("02.hidden.repeat_kv_hf", table_inputs(lambda g: [
    {"what": f"repeat_kv on a non-contiguous (2, 4, 3, 5) input, n_rep={n} (vs torch.repeat_interleave on dim 1, "
             "which is transformers' Llama repeat_kv)", "args": [x, n]}
    for x in [torch.randn(2, 3, 4, 5, generator=g).transpose(1, 2)] for n in (1, 3, 8)]), ("repeat_kv",))
# Causal passes, with and without a cache, also against transformers' LlamaAttention with RoPE disabled.
gqa_llama = visible.gqa.variant("02.hidden.gqa_llama", lambda seed: visible.gqa_inputs(
    seed, d_model=48, T=5, variants=(("h6kv3", 6, 3, True), ("h6kv1", 6, 1, True))) | {"llama": True},
    ("GroupedQueryAttention",))
# Both paths, causal and decoding one token at a time from an empty cache, against DeepseekV3Attention.
mla_deepseek = visible.mla_cache.variant("02.hidden.mla_deepseek", lambda seed: visible.mla_inputs(
    seed, B=1, T=6, prefill=1, d_model=24, n_heads=3, q_lora_rank=16, kv_lora_rank=12, qk_nope_head_dim=4,
    qk_rope_head_dim=2, v_head_dim=5) | {"deepseek": True}, ("MultiHeadLatentAttention",))
FLASH_EDGE = [  # what, shape of q, shape of k (v is as wide as 5), arguments
    ("a single causal query", (2, 1, 8), (2, 1, 8), {"causal": True, "block_size": 4}),
    ("37 queries, 100 keys, values of width 5 (cross-attention)", (1, 2, 37, 8), (1, 2, 100, 8), {"block_size": 16}),
    ("(T, d) inputs with block_size > T, causal", (20, 8), (20, 8), {"causal": True, "block_size": 64}),
    ("causal, block_size=1", (2, 9, 4), (2, 9, 4), {"causal": True, "block_size": 1})]
flash_edge = visible.flash.variant("02.hidden.flash_edge", table_inputs(lambda g: [
    {"what": what, "kwargs": kwargs, "args": [torch.randn(shape, generator=g) for shape in (q, k, (*k[:-1], 5))]}
    for what, q, k, kwargs in FLASH_EDGE]), ("flash_attention",))
# Filled to max_len in one update; after reset, 3 + 3 tokens up to max_len again; float16 buffers.
kv_cache_edge = visible.kv_cache.variant("02.hidden.kv_cache_edge", lambda seed: visible.kv_cache_inputs(
    seed, shape=(1, 2, 3, 6), chunks=(6,), refill=(3, 3), other=("float16", 2)), ("KVCache",))
# A batch of 3 decoded up to exactly max_len, and no new token at all (idx comes back unchanged).
generate_edge = visible.generate.variant("02.hidden.generate_edge", lambda seed: visible.generate_inputs(
    seed, prompt=(3, 4), new=(12, 0), vocab_size=30, d_model=24, n_heads=6, n_kv_heads=3, n_layers=2, max_len=16),
    ("Decoder", "generate"))
