"""Plausible wrong implementations of Lab 1a, each paired with the message its check must give.

Each factory takes the solution's namespace and returns the arguments of one check call.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def sdpa_no_scaling(ns):
    def sdpa(q, k, v, mask=None):
        scores = q @ k.transpose(-2, -1)  # BUG: no 1/sqrt(d)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        weights = scores.softmax(-1)
        return weights @ v, weights
    return sdpa


def sdpa_softmax_wrong_axis(ns):
    def sdpa(q, k, v, mask=None):
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        weights = scores.softmax(-2)  # BUG: normalises over the queries
        return weights @ v, weights
    return sdpa


def sdpa_mask_inverted(ns):
    def sdpa(q, k, v, mask=None):
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
        if mask is not None:
            scores = scores.masked_fill(mask, float("-inf"))  # BUG: True taken as "blocked"
        weights = scores.softmax(-1)
        return weights @ v, weights
    return sdpa


def sdpa_naive_exp(ns):
    def sdpa(q, k, v, mask=None):
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        e = scores.exp()  # BUG: no max subtraction, overflows at large logits
        weights = e / e.sum(-1, keepdim=True)
        return weights @ v, weights
    return sdpa


def sdpa_calls_the_builtin(ns):
    def sdpa(q, k, v, mask=None):  # BUG: PyTorch's fused attention instead of your own
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask), scores.softmax(-1)
    return sdpa


def sdpa_hides_the_builtin(ns):
    def sdpa(q, k, v, mask=None):  # BUG: catches the guard's error and falls back to its own code
        try:
            F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        except Exception:
            pass
        return ns["scaled_dot_product_attention"](q, k, v, mask)
    return sdpa


def mha_wraps_nn_multihead(ns):
    class MHA(ns["MultiHeadAttention"]):
        def forward(self, x, context=None, mask=None):  # BUG: PyTorch's module with copied weights
            context = x if context is None else context
            m = nn.MultiheadAttention(x.shape[-1], self.n_heads, batch_first=True)
            with torch.no_grad():
                m.in_proj_weight.copy_(torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight]))
                m.in_proj_bias.copy_(torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias]))
                m.out_proj.weight.copy_(self.out_proj.weight)
                m.out_proj.bias.copy_(self.out_proj.bias)
            return m(x, context, context, attn_mask=None if mask is None else ~mask, need_weights=False)[0]
    return MHA


def mha_from_labkit_nn(ns):
    from labkit.nn import MultiHeadAttention  # BUG: the course's own version, meant for later labs
    return MultiHeadAttention


def causal_mask_future_leak(ns):
    return lambda T: torch.ones(T, T, dtype=torch.bool).tril(diagonal=1)  # BUG: sees one step ahead


def causal_mask_inverted(ns):
    return lambda T: torch.ones(T, T, dtype=torch.bool).triu()  # BUG: upper triangle


def causal_mask_strict(ns):
    return lambda T: torch.ones(T, T, dtype=torch.bool).tril(diagonal=-1)  # BUG: a token cannot see itself


def mha_heads_mixed(ns):
    class MHA(ns["MultiHeadAttention"]):
        def split_heads(self, x):
            B, T, _ = x.shape
            return x.view(B, self.n_heads, T, self.d_head)  # BUG: reshapes without the transpose
    return MHA


def mha_cross_keys_from_x(ns):
    class MHA(ns["MultiHeadAttention"]):
        def forward(self, x, context=None, mask=None):
            return super().forward(x, None, mask)  # BUG: ignores the context
    return MHA


def ffn_relu(ns):
    class FFN(ns["FeedForward"]):
        def forward(self, x):
            return self.fc2(F.relu(self.fc1(x)))  # BUG: ReLU instead of GELU
    return FFN, ns["DecoderBlock"]


def block_post_norm(ns):
    class Block(ns["DecoderBlock"]):
        def forward(self, x):
            mask = ns["causal_mask"](x.shape[1])
            x = self.ln1(x + self.attn(x, mask=mask))  # BUG: post-norm
            return self.ln2(x + self.ffn(x))
    return ns["FeedForward"], Block


def gpt_future_leak(ns):
    class LeakyBlock(ns["DecoderBlock"]):
        def forward(self, x):
            x = x + self.attn(self.ln1(x))  # BUG: no causal mask
            return x + self.ffn(self.ln2(x))

    class GPT(ns["GPT"]):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            for block in self.blocks:
                block.__class__ = LeakyBlock
    return GPT


def _gpt_forward(ns, forward):
    class GPT(ns["GPT"]):
        pass
    GPT.forward = forward
    return GPT


def gpt_no_position_embedding(ns):
    def forward(self, idx):
        x = self.tok_emb(idx)  # BUG: no position embedding
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))
    return _gpt_forward(ns, forward)


def gpt_positions_from_tokens(ns):
    def forward(self, idx):
        x = self.tok_emb(idx) + self.pos_emb(idx % self.max_len)  # BUG: the token ids as positions
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))
    return _gpt_forward(ns, forward)


def gpt_skips_blocks(ns):
    def forward(self, idx):
        x = self.tok_emb(idx) + self.pos_emb(torch.arange(idx.shape[1]))  # BUG: the blocks are never run
        return self.lm_head(self.ln_f(x))
    return _gpt_forward(ns, forward)


def gpt_no_final_norm(ns):
    def forward(self, idx):
        x = self.tok_emb(idx) + self.pos_emb(torch.arange(idx.shape[1]))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(x)  # BUG: no ln_f
    return _gpt_forward(ns, forward)


def gpt_constant_logits(ns):
    def forward(self, idx):  # BUG: all-zero logits score exactly ln V at initialisation
        return torch.zeros(*idx.shape, self.lm_head.out_features)
    return _gpt_forward(ns, forward)


def gpt_untied(ns):
    class GPT(ns["GPT"]):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.lm_head.weight = nn.Parameter(self.lm_head.weight.detach().clone())  # BUG: untied
    return GPT, ns["gpt_param_count"]


def gpt_one_dummy_parameter(ns):
    class GPT(nn.Module):  # BUG: a stub whose one parameter has the right number of elements
        def __init__(self, vocab_size, d_model, n_heads, n_layers, max_len):
            super().__init__()
            self.dummy = nn.Parameter(torch.zeros(ns["gpt_param_count"](vocab_size, d_model, n_layers, max_len)))
    return GPT, ns["gpt_param_count"]


def gpt_default_init(ns):
    class GPT(ns["GPT"]):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            for module in self.modules():  # BUG: PyTorch's default init, N(0, 1) embeddings
                if isinstance(module, (nn.Linear, nn.Embedding)):
                    module.reset_parameters()
    return GPT


def generate_no_crop(ns):
    @torch.no_grad()
    def generate(model, idx, max_new_tokens, temperature=1.0, top_k=None):
        for _ in range(max_new_tokens):
            logits = model(idx)[:, -1, :] / temperature  # BUG: no cropping to max_len
            if top_k is not None:
                kth = torch.topk(logits, top_k).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            idx = torch.cat([idx, torch.multinomial(logits.softmax(-1), 1)], dim=1)
        return idx
    return ns["GPT"], generate


def generate_temperature_after_softmax(ns):
    @torch.no_grad()
    def generate(model, idx, max_new_tokens, temperature=1.0, top_k=None):
        for _ in range(max_new_tokens):
            logits = model(idx[:, -model.max_len:])[:, -1, :]
            if top_k is not None:
                kth = torch.topk(logits, top_k).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            probs = logits.softmax(-1) / temperature  # BUG: temperature after the softmax has no effect
            idx = torch.cat([idx, torch.multinomial(probs, 1)], dim=1)
        return idx
    return ns["GPT"], generate


def generate_top_k_off_by_one(ns):
    @torch.no_grad()
    def generate(model, idx, max_new_tokens, temperature=1.0, top_k=None):
        for _ in range(max_new_tokens):
            logits = model(idx[:, -model.max_len:])[:, -1, :] / temperature
            if top_k is not None:
                kth = torch.topk(logits, top_k + 1).values[:, -1:]  # BUG: keeps k + 1 tokens
                logits = logits.masked_fill(logits < kth, float("-inf"))
            idx = torch.cat([idx, torch.multinomial(logits.softmax(-1), 1)], dim=1)
        return idx
    return ns["GPT"], generate


# check id -> [(factory, a regular expression the failure message must match)]
BUGS = {
    "01a.sdpa": [(sdpa_no_scaling, r"NO 1/sqrt\(d\) scaling"),
                 (sdpa_softmax_wrong_axis, r"sum of each row.*softmax over the last axis"),
                 (sdpa_mask_inverted, r"boolean mask .*True in the mask means 'may attend'"),
                 (sdpa_naive_exp, r"logits around 1e4.*non-finite"),
                 (sdpa_calls_the_builtin, r"your code calls F.scaled_dot_product_attention"),
                 (sdpa_hides_the_builtin, r"your code calls F.scaled_dot_product_attention")],
    "01a.causal_mask": [(causal_mask_future_leak, r"lets position 0 see position 1"),
                        (causal_mask_inverted, r"lets position 0 see position 1"),
                        (causal_mask_strict, r"hides position 0 from position 0")],
    "01a.mha": [(mha_wraps_nn_multihead, r"your code calls nn.MultiheadAttention"),
                (mha_from_labkit_nn, r"your code calls (F.scaled_dot_product_attention|labkit.nn)"),
                (mha_heads_mixed, r"self-attention .*max \|difference\|"),
                (mha_cross_keys_from_x, r"cross-attention")],
    "01a.block": [(ffn_relu, r"FeedForward .*GELU"),
                  (block_post_norm, r"DecoderBlock \(pre-norm")],
    "01a.gpt": [(gpt_future_leak, r"GPT is not causal: the logits at position 0 change"),
                (gpt_no_position_embedding, r"GPT2LMHeadModel.*GPT-2 with no positions"),
                (gpt_positions_from_tokens, r"GPT2LMHeadModel.*GPT-2 with positions from tokens"),
                (gpt_skips_blocks, r"GPT2LMHeadModel.*GPT-2 with no blocks"),
                (gpt_no_final_norm, r"GPT2LMHeadModel.*GPT-2 with no final norm"),
                (gpt_constant_logits, r"GPT2LMHeadModel")],
    "01a.param_count": [(gpt_untied, r"tie lm_head.weight"),
                        (gpt_one_dummy_parameter, r"1 parameter tensors, the largest of")],
    "01a.init_loss": [(gpt_default_init, r"loss at initialisation is .* initialise the weights"),
                      (gpt_constant_logits, r"the logits are the same for every token")],
    "01a.generate": [(generate_no_crop, r"max_len"),
                     (generate_temperature_after_softmax, r"temperature=0.5"),
                     (generate_top_k_off_by_one, r"top_k=1, new token 0 is not the argmax")],
}
