"""labkit.nn, the fast path of later labs' experiments, against independent references: PyTorch's
nn.MultiheadAttention, Hugging Face's Llama attention and MLP, and causality and caching properties."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from labkit import nn as lnn
from labkit.checks import references as ref
from labkit.checks.kernel import ConcatCache
from labkit.data import get_batch
from labkit.train import train


def test_multi_head_attention_matches_nn_multiheadattention():
    torch.manual_seed(0)
    attention = lnn.MultiHeadAttention(16, 4).double().eval()
    x, context = torch.randn(2, 5, 16, dtype=torch.float64), torch.randn(2, 7, 16, dtype=torch.float64)
    weights = attention.state_dict()
    mask = lnn.causal_mask(5)
    with torch.no_grad():
        for kwargs in ({}, {"mask": mask}, {"context": context}):
            torch.testing.assert_close(attention(x, **kwargs), ref.mha(weights, "", x, 4, **kwargs))


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])
def test_rope_gqa_attention_matches_llama(n_kv_heads):
    torch.manual_seed(0)
    attention = lnn.MultiHeadAttention(32, 4, n_kv_heads, bias=False, rope_base=10000.0, causal=True).double()
    weights = {k.replace("out_proj", "o_proj"): v for k, v in attention.state_dict().items()}
    x = torch.randn(2, 6, 32, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(attention(x), ref.llama_attention(weights, x, 4, n_kv_heads))


def test_swiglu_matches_llama_mlp():
    torch.manual_seed(0)
    mlp = lnn.SwiGLU(16, 40).double()
    x = torch.randn(3, 16, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(mlp(x), ref.llama_mlp(mlp.state_dict(), x))



def test_moe_matches_mixtral_and_its_balancing_loss():
    torch.manual_seed(0)
    moe = lnn.MoE(16, 24, n_experts=4, k=2, balance=1.0).double()
    block = ref.hf("mixtral", "MixtralSparseMoeBlock")(ref.mixtral_config(16, 24, 4, 2)).double().eval()
    block.load_state_dict({"gate.weight": moe.router.weight, "experts.gate_up_proj": moe.gate_up_proj,
                           "experts.down_proj": moe.down_proj})
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(moe(x), block(x))
    balancing = ref.hf("mixtral", "load_balancing_loss_func")
    torch.testing.assert_close(moe.aux_loss.double(), balancing((moe.router_logits,), 4, 2).double())

CONFIGS = [dict(norm="rms", pos="rope", ffn="swiglu"), dict(norm="layer", pos="learned", ffn="gelu", bias=True),
           dict(norm="rms", pos="none", ffn="gelu", n_kv_heads=1), dict(pos="rope", n_kv_heads=2, scale_embeddings=True)]


@pytest.mark.parametrize("options", CONFIGS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_decoder_is_causal_and_caches_agree_with_full_passes(options):
    torch.manual_seed(0)
    model = lnn.Decoder(lnn.Config(vocab_size=30, d_model=32, n_layers=2, n_heads=4, max_len=16, **options)).eval()
    idx = torch.randint(30, (2, 12))
    with torch.no_grad():
        logits = model(idx)
        assert logits.shape == (2, 12, 30)
        changed = model(torch.cat([idx[:, :7], torch.randint(30, (2, 5))], dim=1))
        torch.testing.assert_close(changed[:, :7], logits[:, :7])  # position t sees no token after t
        caches = [CountingCache() for _ in model.blocks]
        steps = [model(idx[:, :5], caches)] + [model(idx[:, t:t + 1], caches) for t in range(5, 12)]
        torch.testing.assert_close(torch.cat(steps, dim=1), logits, atol=1e-5, rtol=0)


class CountingCache(ConcatCache):
    @property
    def length(self) -> int:
        return 0 if self.a is None else self.a.shape[-2]


class NoisyFFN(nn.Module):
    """A swapped-in FFN that reports an auxiliary loss, as a mixture of experts does."""

    def __init__(self, config: lnn.Config):
        super().__init__()
        self.inner = lnn.make_ffn(config)

    def forward(self, x):
        self.aux_loss = x.pow(2).mean()
        return self.inner(x)


def test_a_swapped_sublayer_and_its_aux_loss_reach_the_training_loss():
    torch.manual_seed(0)
    config = lnn.Config(vocab_size=20, d_model=16, n_layers=2, n_heads=2, max_len=8)
    model = lnn.Decoder(config, ffn=NoisyFFN)
    assert all(isinstance(block.ffn, NoisyFFN) for block in model.blocks)
    x, _ = get_batch(torch.randint(20, (500,)), 8, 4)
    model(x)
    assert torch.isclose(model.aux_loss(), sum(block.ffn.aux_loss for block in model.blocks))
    data = torch.randint(20, (2000,))
    history = train(model, data, data, steps=5, block_size=8, batch_size=4, eval_every=5, eval_batches=1,
                    optimizer=lnn.adamw(model, 1e-3), warmup=2, min_lr=1e-4, grad_clip=1.0)
    assert history.steps == [5] and history.tokens == 5 * 4 * 8


def test_time_budget_stops_training():
    torch.manual_seed(0)
    model = lnn.Decoder(lnn.Config(vocab_size=20, d_model=16, n_layers=1, n_heads=2, max_len=8))
    data = torch.randint(20, (2000,))
    history = train(model, data, data, steps=10_000, block_size=8, batch_size=4, eval_every=10_000, eval_batches=1,
                    max_seconds=0.5)
    assert history.steps[-1] < 10_000 and 0.5 <= history.seconds < 5


def test_minilm_matches_transformers_bert_and_its_tokenizer_matches_sentence_transformers():
    """load_minilm's BertEncoder equals transformers' BertModel on the real weights, padding included, and its
    tokenizer (padding and truncation off) gives sentence-transformers' ids for texts under 256 tokens."""
    from labkit.data import minilm_files

    encoder, tokenizer = lnn.load_minilm()
    texts = ["A man is playing a guitar.", "Shares dropped sharply as investors panicked about the news today."]
    ids = [e.ids for e in tokenizer.encode_batch(texts)]
    assert [len(i) for i in ids] != [128, 128], "the tokenizer pads to 128: padding should be off"
    st = ref.minilm_sentence_transformer()
    assert ids == [st.tokenizer(t)["input_ids"] for t in texts]
    T = max(map(len, ids))
    input_ids = torch.tensor([i + [0] * (T - len(i)) for i in ids])
    mask = (torch.arange(T)[None] < torch.tensor([len(i) for i in ids])[:, None]).long()
    bert = ref.hf("bert", "BertModel").from_pretrained(str(minilm_files()["dir"])).eval()
    with torch.no_grad():
        ours, theirs = encoder(input_ids, mask), bert(input_ids, attention_mask=mask).last_hidden_state
    real = mask.bool()
    torch.testing.assert_close(ours[real], theirs[real], atol=2e-5, rtol=1e-4)
    assert len(tokenizer.encode("word " * 600).ids) == 602, "no truncation: Lab 7 cuts at 256 itself"
