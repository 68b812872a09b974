"""The references of Lab 2's checks agree with Hugging Face's Llama and DeepSeek-V3 attention,
and its published figures are the ones the chapter quotes. (Solution and planted bugs: test_checks.py.)"""
from __future__ import annotations

import torch

from labkit.checks import additive, causal, lab02
from labkit.checks import references as ref


def test_repeat_interleave_is_llamas_grouping():
    from transformers.models.llama.modeling_llama import repeat_kv

    x = torch.randn(2, 3, 5, 4)
    for n_rep in (1, 2, 4):
        assert torch.equal(repeat_kv(x, n_rep), torch.repeat_interleave(x, n_rep, dim=1))


def test_gqa_reference_matches_hf_llama_attention():
    """The check's GQA reference (SDPA with enable_gqa), and references.llama_attention with RoPE
    disabled (the hidden check's), equal LlamaAttention with RoPE disabled."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaAttention

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, num_attention_heads=8, num_key_value_heads=2, attention_bias=True)
    config._attn_implementation = "eager"
    hf = LlamaAttention(config, layer_idx=0).double().eval()
    x = torch.randn(2, 6, 32, dtype=torch.float64)
    identity = (torch.ones(2, 6, 4, dtype=torch.float64), torch.zeros(2, 6, 4, dtype=torch.float64))  # cos, sin
    with torch.no_grad():
        want, _ = hf(x, identity, additive(causal(6)))
        weights = hf.state_dict()
        got = ref.gqa(weights, x, 8, 2, causal(6))
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    torch.testing.assert_close(ref.llama_attention(weights, x, 8, 2, rope=False, bias=True), want, atol=1e-6, rtol=0)


def test_mla_reference_matches_hf_deepseek_v3_attention():
    """The check's MLA reference, and references.deepseek_v3_attention (the hidden check's), equal
    DeepseekV3Attention with RoPE disabled."""
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention

    inputs = lab02.mla_inputs(0)
    c, x = inputs["config"], inputs["x"].double()
    config = DeepseekV3Config(hidden_size=c["d_model"], num_attention_heads=c["n_heads"],
                              num_key_value_heads=c["n_heads"], q_lora_rank=c["q_lora_rank"],
                              kv_lora_rank=c["kv_lora_rank"], qk_nope_head_dim=c["qk_nope_head_dim"],
                              qk_rope_head_dim=c["qk_rope_head_dim"], v_head_dim=c["v_head_dim"], rope_interleave=False)
    config._attn_implementation = "eager"
    hf = DeepseekV3Attention(config, layer_idx=0).double().eval()
    hf.load_state_dict({k: v.double() for k, v in inputs["weights"].items()})
    B, T = x.shape[:2]
    r = c["qk_rope_head_dim"]
    identity = (torch.ones(B, T, r, dtype=torch.float64), torch.zeros(B, T, r, dtype=torch.float64))
    with torch.no_grad():
        want, _ = hf(x, identity, additive(causal(T)))
    torch.testing.assert_close(ref.mla(c, inputs["weights"], x, causal(T)), want, atol=1e-6, rtol=0)
    torch.testing.assert_close(ref.deepseek_v3_attention(c, inputs["weights"], x), want, atol=1e-6, rtol=0)


def test_published_figures():
    """The hand-computed figures of the kv_bytes check, in the units the chapter quotes."""
    by_name = {model: want for _, model, _, _, want in lab02.KV_BYTES}
    assert by_name["Llama 3 70B, 8192 tokens, bf16"] == 2.5 * 2**30
    assert by_name["Llama 3 70B as if it had MHA (64 KV heads), 8192 tokens, bf16"] == 20 * 2**30
    assert by_name["Llama 3 8B, 131072 tokens, bf16"] == 16 * 2**30
    assert by_name["DeepSeek-V2, 131072 tokens, bf16"] == 8.4375 * 2**30
    # The check's cases carry these figures, and its collect calls the function each case names.
    cases = lab02.kv_bytes.make_inputs(0)["cases"]
    assert [(c["fn"], c["args"], c["bytes"]) for c in cases] == [(f, a, w) for f, _, a, _, w in lab02.KV_BYTES]
