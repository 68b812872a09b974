"""The references of Lab 11's checks (open models): transformers' five causal LMs built from small configs with
drawn weights, their greedy generation, the wrong versions that diagnoses compare with, the RoPE layouts, the
cache's bytes and the meta-device counts of published models. Each is pinned against a second route. The notes are
in ``tests/lab11_reference_notes.md``."""
from __future__ import annotations

import io
import json

import pytest
import torch

from labkit.checks import lab11
from labkit.checks import references as ref

FAMILIES = ref.OPEN_FAMILIES


# ---------------------------------------------------------------- the models and their greedy tokens
@pytest.mark.parametrize("family", FAMILIES)
def test_generate_equals_a_no_cache_argmax_loop(family):
    """transformers' generate(do_sample=False, eos_token_id=None) gives all 20 tokens, equal to the full forward,
    argmax, append loop, and (attention families) to our decoding loop with positions T, T + 1, ...; every step's
    top-1 / top-2 gap is at least OPEN_MARGIN."""
    case = ref.open_case(family, 0)
    model = ref.open_model(case["config"], case["state"])
    assert case["tokens"].shape == (2, 25)
    assert torch.equal(ref.open_argmax_loop(model, case["prompt"], 20), case["tokens"])
    if family != "mamba":
        assert torch.equal(ref.open_decode(model, case["prompt"], 20), case["tokens"])
    assert float(ref.greedy_margins(model, case["tokens"], 5).min()) == case["margin"] >= ref.OPEN_MARGIN
    with torch.no_grad():
        assert torch.equal(model(case["idx"], use_cache=False).logits, case["logits"])


@pytest.mark.parametrize("family", FAMILIES)
def test_the_minimal_config_is_the_same_model(family):
    """The config dict without the fields at their class default (and DeepSeek's theta as a legacy top-level
    rope_theta) builds the same configuration as the full one."""
    sizes = ref.OPEN_SIZES[family]
    full = ref.hf(family, ref.OPEN_CLASSES[family][0])(**{k: v for k, v in sizes.items() if k != "legacy_rope"},
                                                       **ref.NO_SPECIAL_TOKENS).to_dict()
    minimal = ref.open_config(ref.open_config_dict(family, sizes)).to_dict()
    for noise in ("transformers_version", "architectures", "dtype"):
        full.pop(noise, None), minimal.pop(noise, None)
    assert minimal == full
    if family == "deepseek_v3":
        assert "rope_theta" in ref.open_config_dict(family, sizes)
    if family == "mixtral":  # theta left to Mixtral's default, 1e6
        assert "rope_parameters" not in ref.open_config_dict(family, sizes)
        assert minimal["rope_parameters"]["rope_theta"] == 1e6


def test_the_weights_are_drawn_from_the_seed():
    """open_weights draws every tensor from the generator (transformers' own init, on the global generator, is
    overwritten), so that make_inputs and verify rebuild the same case in any process."""
    config = ref.open_config_dict("deepseek_v3", ref.OPEN_SIZES["deepseek_v3"])
    torch.manual_seed(1)
    a = ref.open_weights(ref.open_model(config), torch.Generator().manual_seed(5))
    torch.manual_seed(2)
    b = ref.open_weights(ref.open_model(config), torch.Generator().manual_seed(5))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    bias = [v for k, v in a.items() if k.endswith("e_score_correction_bias")]
    assert bias and all(v.abs().sum() > 0 for v in bias)
    assert all((v != 1).any() for k, v in a.items() if k.endswith("norm.weight"))


# ---------------------------------------------------------------- RoPE layouts
def test_deepseek_interleave_is_halves_after_the_permutation():
    """transformers' apply_rotary_pos_emb_interleave(q, k) equals rotate-half on q[..., P] and k[..., P], P = [0, 2,
    ..., 1, 3, ...] (so de-interleaving the rope rows of the weights by P makes the halves rotation exact)."""
    interleave, halves = ref.hf("deepseek_v3", "apply_rotary_pos_emb_interleave", "apply_rotary_pos_emb")
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 2, 5, 8, generator=g, dtype=torch.float64), torch.randn(1, 1, 5, 8, generator=g,
                                                                                   dtype=torch.float64)
    cos, sin = ref.llama_cos_sin(8, 10000.0, torch.arange(5))
    cos, sin = cos[None].double(), sin[None].double()
    P = ref.rope_halves_order(8)
    a_q, a_k = interleave(q, k, cos, sin)
    b_q, b_k = halves(q[..., P], k[..., P], cos, sin)
    torch.testing.assert_close(a_q, b_q, rtol=0, atol=1e-12)
    torch.testing.assert_close(a_k, b_k, rtol=0, atol=1e-12)


def test_interleaved_rotation_is_halves_on_permuted_rows():
    """Rotating interleaved pairs of q and k gives the scores of rotate-half on q[P] and k[P]: the wrong model
    "rope_interleaved" is transformers' Llama with q_proj and k_proj rows permuted by P per head."""
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(6, 8, generator=g, dtype=torch.float64), torch.randn(6, 8, generator=g, dtype=torch.float64)
    angles = ref.rope_angles(torch.arange(6), 8, 10000.0)
    scores = ref.rotate_interleaved(q, angles) @ ref.rotate_interleaved(k, angles).T
    table = torch.cat([angles, angles], dim=-1)  # rotate-half's (T, d) angles, in float64
    P = ref.rope_halves_order(8)
    rotated = lambda x: ref.llama_apply_rope(x[:, P][None, None], table.cos(), table.sin())[0, 0]
    halves = rotated(q) @ rotated(k).T
    torch.testing.assert_close(scores, halves, rtol=0, atol=1e-10)


def test_rope_halves_order_and_head_rows():
    P = ref.rope_halves_order(6)
    assert P.tolist() == [0, 2, 4, 1, 3, 5]
    w = torch.arange(2 * 10).view(20, 1).float()
    out = ref.permute_head_rows(w, 2, 10, P, start=4, width=6)
    assert out.view(-1).tolist() == [0, 1, 2, 3, 4, 6, 8, 5, 7, 9, 10, 11, 12, 13, 14, 16, 18, 15, 17, 19]


# ---------------------------------------------------------------- wrong versions
@pytest.mark.parametrize("family", FAMILIES)
def test_every_variant_that_applies_changes_the_logits(family):
    """Each wrong version that applies to the family is far from the reference (so a diagnosis never names a bug
    that changes nothing), and those that do not apply return None."""
    case = ref.open_case(family, 0)
    applied = []
    for name in lab11.VARIANTS:
        logits = ref.open_variant_logits(case["config"], case["state"], case["idx"], name)
        if logits is not None:
            applied.append(name)
            assert float((logits - case["logits"]).abs().max()) > 100 * lab11.ATOL, (family, name)
    expected = {"llama": "rope_interleaved", "mixtral": "no_renormalisation", "deepseek_v3": "deepseek_halves",
                "mamba": "xz_swapped", "jamba": "renormalised"}[family]
    assert expected in applied


# ---------------------------------------------------------------- counting
@pytest.mark.parametrize("name,active", sorted(ref.OPEN_PUBLISHED_COUNTS))
def test_published_counts(name, active):
    """Llama 3 8B 8,030,261,248; Mixtral 8x7B 46,702,792,704 (active 12,879,925,248); DeepSeek-V3 671,026,404,352
    (active 37,552,282,624); Mamba-2.8B 2,768,345,600; Jamba v0.1 51,570,323,328 (active 12,110,311,296)."""
    assert ref.open_meta_numel(ref.OPEN_PUBLISHED[name], active) == ref.OPEN_PUBLISHED_COUNTS[(name, active)]


def test_mamba_counts_by_hand():
    """Mamba-2.8B: a tied table (V x d) and 64 layers of in_proj, conv1d (+ bias), x_proj, dt_proj (+ bias), A_log, D,
    out_proj and a norm, plus the final norm."""
    c = ref.OPEN_MAMBA_2_8B
    d, V, L, N, K, R = c["hidden_size"], c["vocab_size"], c["num_hidden_layers"], 16, 4, 160
    d_in = 2 * d
    layer = 2 * d_in * d + d_in * K + d_in + (R + 2 * N) * d_in + d_in * R + d_in + d_in * N + d_in + d * d_in + d
    assert ref.open_meta_numel(c) == V * d + L * layer + d


# ---------------------------------------------------------------- the cache
@pytest.mark.parametrize("family", lab11.KV_FAMILIES)
@pytest.mark.parametrize("seed", [0, 1])
def test_measured_cache_equals_the_closed_form(family, seed):
    """The growth of transformers' cache per token equals the closed form (K and V of the KV heads per attention
    layer; DeepSeek-V3's latent and rotated key; Jamba's attention layers only; none for Mamba), at 2 and 4 bytes;
    the Mamba layers' states hold d_inner x d_conv conv inputs (of which d_conv - 1 are read) and d_inner x d_state."""
    family, overrides = (family, {}) if isinstance(family, str) else family
    config = lab11.kv_config(family, torch.Generator().manual_seed(seed), **overrides)
    for dtype, b in ((torch.bfloat16, 2), (torch.float32, 4)):
        found = ref.open_cache_bytes(config, dtype)
        assert found["per_token"] == ref.open_kv_bytes_closed_form(config, b)
        columns = found["conv_columns"]
        state = (found["conv"] // columns * (columns - 1) if columns else 0) + found["recurrent"]
        assert state * b == ref.open_state_bytes_closed_form(config, b)
    if family in ("mamba", "jamba"):
        assert found["recurrent_dtype"] == torch.float32


def test_published_cache_bytes():
    """Llama 3 8B: 2 x 32 x 8 x 128 x 2 = 131,072 bytes per token; DeepSeek-V3: 61 x (512 + 64) x 2 = 70,272;
    Jamba v0.1: 4 attention layers x 2 x 8 x 128 x 2 = 16,384, and 28 Mamba layers x 8192 x (3 + 16) x 2 = 8,716,288
    bytes of state; Mamba-2.8B: 64 x 5120 x 19 x 2 = 12,451,840."""
    P = ref.OPEN_PUBLISHED
    assert ref.open_kv_bytes_closed_form(P["Llama 3 8B"]) == 131_072
    assert ref.open_kv_bytes_closed_form(P["DeepSeek-V3"]) == 70_272
    assert ref.open_kv_bytes_closed_form(P["Jamba v0.1"]) == 16_384
    assert ref.open_state_bytes_closed_form(P["Jamba v0.1"]) == 8_716_288
    assert ref.open_state_bytes_closed_form(P["Mamba-2.8B"]) == 12_451_840
    assert ref.open_kv_bytes_closed_form(P["Mamba-2.8B"]) == 0


# ---------------------------------------------------------------- export
@pytest.mark.parametrize("family", FAMILIES)
def test_an_in_memory_export_loads_back(family):
    """config.json (the case's dict) and the in-memory state dict in safetensors (a tied head dropped) load with
    from_pretrained: nothing missing or unexpected, the same logits."""
    from safetensors.torch import save

    case = ref.open_case(family, 0)
    state = {k: v.contiguous() for k, v in case["state"].items()}
    if ref.open_config(case["config"]).tie_word_embeddings:
        del state["lm_head.weight"]
    model, info = ref.open_exported(json.loads(json.dumps(case["config"])), save(state))
    assert not any(info.values()), info
    with torch.no_grad():
        torch.testing.assert_close(model(case["idx"]).logits, case["logits"], rtol=0, atol=1e-6)
    assert lab11.safetensors_keys(save(state)) == sorted(state)


# ---------------------------------------------------------------- the hidden checks' own planted bugs
def test_minimal_published_configs():
    """OPEN_PUBLISHED_MINIMAL is open_minimal of each published config.json (the optional fields at transformers'
    defaults left out), and builds the same model: the same counts."""
    for name, config in ref.OPEN_PUBLISHED.items():
        assert ref.open_minimal(config) == ref.OPEN_PUBLISHED_MINIMAL[name]
        for active in (False, True):
            assert ref.open_meta_numel(ref.OPEN_PUBLISHED_MINIMAL[name], active) == \
                ref.OPEN_PUBLISHED_COUNTS[(name, active)]
    assert "q_lora_rank" not in ref.OPEN_PUBLISHED_MINIMAL["DeepSeek-V3"]
    assert "num_experts" not in ref.OPEN_PUBLISHED_MINIMAL["Jamba v0.1"]


def _hidden_bug_cases():
    import buggy_lab11

    return [(check_id, factory, message) for check_id, planted in buggy_lab11.HIDDEN_BUGS.items()
            for factory, message in planted]


@pytest.mark.parametrize("check_id,factory,message", _hidden_bug_cases(),
                         ids=[f.__name__ for _, f, _ in _hidden_bug_cases()])
def test_hidden_check_catches_planted_bug(check_id, factory, message):
    """Bugs that only the hidden checks' configs reach (DeepSeek-V3 with rope_interleave false and its routing
    defaults, with attention biases) fail there with the right message."""
    import re

    from labkit.checks import hidden_checks
    from notebook_code import solution_namespace

    hidden = {h.id: h for h in hidden_checks("11")}[check_id]
    student = factory(solution_namespace("11-open-models"))
    inputs = hidden.make_inputs(0)
    with pytest.raises(AssertionError) as failure:
        hidden.verdict(inputs, hidden.run_collect(inputs, *student))
    assert re.search(message, str(failure.value)), str(failure.value)[:600]
