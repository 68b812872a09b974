"""The references that later labs will compare with build offline from labkit.checks.references' configurations,
and behave as documented (Lab 2's are tested in test_references_02.py)."""
from __future__ import annotations

import torch

from labkit.checks import references as ref


def test_mixtral_block_with_one_expert_is_that_expert():
    """With one expert and top-1 routing, the sparse MoE block is its expert's SwiGLU (eager experts)."""
    torch.manual_seed(0)
    block = ref.hf("mixtral", "MixtralSparseMoeBlock")(ref.mixtral_config(16, 32, 1, 1)).double().eval()
    with torch.no_grad():  # a module built alone is not initialised: draw its weights
        for p in block.parameters():
            p.normal_(0, 0.2)
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    gate_up, down = block.experts.gate_up_proj[0], block.experts.down_proj[0]  # (2 d_ff, d) and (d, d_ff)
    gate, up = (x @ gate_up.T).chunk(2, dim=-1)
    with torch.no_grad():
        torch.testing.assert_close(block(x), (torch.nn.functional.silu(gate) * up) @ down.T)


def test_qwen2_moe_block_adds_a_sigmoid_gated_shared_expert():
    """With one routed expert (top-1, renormalised to weight 1), Qwen2-MoE's block is that expert plus the shared
    expert scaled by sigmoid(shared_expert_gate(x))."""
    torch.manual_seed(0)
    block = ref.hf("qwen2_moe", "Qwen2MoeSparseMoeBlock")(ref.qwen2_moe_config(16, 32, 1, 1, 24)).double().eval()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.2)
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    gate, up = (x @ block.experts.gate_up_proj[0].T).chunk(2, dim=-1)
    routed = (torch.nn.functional.silu(gate) * up) @ block.experts.down_proj[0].T
    shared = block.shared_expert(x) * torch.sigmoid(block.shared_expert_gate(x))
    with torch.no_grad():
        torch.testing.assert_close(block(x), routed + shared)


def test_deepseek_v3_router_selects_with_the_bias_and_weighs_without_it():
    """DeepSeek-V3's router: the bias moves the choice of experts, and the weights are the unbiased sigmoid scores
    of the chosen ones, renormalised and scaled (one group: no group limit)."""
    torch.manual_seed(0)
    router = ref.hf("deepseek_v3", "DeepseekV3TopkRouter")(ref.deepseek_v3_router_config(16, 8, 2, 1, 1, 2.5))
    with torch.no_grad():
        router.weight.normal_(0, 0.5)
    x = torch.randn(6, 16)
    scores = torch.sigmoid(x @ router.weight.T)
    router.e_score_correction_bias[:] = torch.arange(8.0)  # a large bias: expert 7 and 6 always win
    _, weights, indices = router(x)
    assert set(indices.flatten().tolist()) == {6, 7}
    chosen = scores.gather(1, indices)
    torch.testing.assert_close(weights, 2.5 * chosen / chosen.sum(-1, keepdim=True))


def test_mamba_mixer_runs_on_the_pure_pytorch_scan():
    torch.manual_seed(0)
    mixer = ref.hf("mamba", "MambaMixer")(ref.mamba_config(16, 4), layer_idx=0).eval()
    with torch.no_grad():
        out = mixer(torch.randn(2, 5, 16))
    assert out.shape == (2, 5, 16) and torch.isfinite(out).all()
    assert callable(ref.hf("mamba", "mamba_selective_scan").__wrapped__)


def test_mistral_attention_is_causal_within_its_window():
    torch.manual_seed(0)
    config = ref.mistral_config(16, 4, 2, 32, sliding_window=3)
    attention = ref.hf("mistral", "MistralAttention")(config, layer_idx=0).double().eval()
    x = torch.randn(1, 6, 16, dtype=torch.float64)
    cos, sin = (t.double() for t in ref.hf("mistral", "MistralRotaryEmbedding")(config)(x, torch.arange(6)[None]))
    mask = torch.zeros(6, 6, dtype=torch.float64).masked_fill(~torch.ones(6, 6, dtype=torch.bool).tril(), float("-inf"))
    with torch.no_grad():
        out = attention(x, (cos, sin), mask[None, None])[0]
        changed = attention(torch.cat([x[:, :3], torch.randn(1, 3, 16, dtype=torch.float64)], 1), (cos, sin),
                            mask[None, None])[0]
    torch.testing.assert_close(out[:, :3], changed[:, :3])  # no position sees a later token


def test_gpt2_of_lab_1a_ties_its_embeddings():
    model = ref.hf("gpt2", "GPT2LMHeadModel")(ref.gpt2_config(50, 32, 4, 2, 16)).eval()
    assert model.lm_head.weight is model.transformer.wte.weight
    assert model(torch.randint(50, (2, 16))).logits.shape == (2, 16, 50)
