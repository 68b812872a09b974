"""Plausible wrong implementations of Lab 1b, each paired with the message its check must give.

Each factory takes the solution's namespace and returns the arguments of one check call.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


# ---------------------------------------------------------------- padding bias
def padding_bias_inverted(ns):
    def padding_bias(attention_mask, dtype=torch.float32):
        bias = torch.zeros(attention_mask.shape, dtype=dtype)
        return bias.masked_fill(attention_mask == 1, torch.finfo(dtype).min)[:, None, None, :]  # BUG: masks the tokens
    return padding_bias


def padding_bias_on_queries(ns):
    return lambda attention_mask, dtype=torch.float32: ns["padding_bias"](attention_mask, dtype).transpose(-1, -2)  # BUG


def padding_bias_too_small(ns):
    def padding_bias(attention_mask, dtype=torch.float32):
        return ((attention_mask.to(dtype) - 1) * 1.0)[:, None, None, :]  # BUG: -1 on padding barely changes the softmax
    return padding_bias


# ---------------------------------------------------------------- the pretrained encoder
def _with_layers(ns, forward):
    """BertEncoder whose layers run `forward` instead of BertLayer.forward."""
    class Layer(ns["BertLayer"]):
        pass
    Layer.forward = forward

    class Encoder(ns["BertEncoder"]):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            for layer in self.layers:
                layer.__class__ = Layer
    return Encoder


def _bert(ns, encoder=None, load=None, pool=None):
    return (encoder or ns["BertEncoder"], load or ns["load_pretrained"], pool or ns["sentence_embeddings"])


def bert_pre_norm(ns):
    def forward(self, x, bias):
        h = x + self.attn(self.ln1(x), bias=bias)  # BUG: pre-norm; BERT normalises after the residual sum
        return h + self.fc2(F.gelu(self.fc1(self.ln2(h))))
    return _bert(ns, _with_layers(ns, forward))


def bert_gelu_tanh(ns):
    def forward(self, x, bias):
        h = self.ln1(x + self.attn(x, bias=bias))
        return self.ln2(h + self.fc2(F.gelu(self.fc1(h), approximate="tanh")))  # BUG: GPT-2's tanh GELU
    return _bert(ns, _with_layers(ns, forward))


def _encoder_with_bias(ns, make_bias):
    class Encoder(ns["BertEncoder"]):
        def forward(self, input_ids, attention_mask=None, token_type_ids=None):
            attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
            token_type_ids = torch.zeros_like(input_ids) if token_type_ids is None else token_type_ids
            positions = torch.arange(input_ids.shape[1])
            x = self.ln_emb(self.tok_emb(input_ids) + self.pos_emb(positions) + self.type_emb(token_type_ids))
            bias = make_bias(attention_mask, x.dtype)
            for layer in self.layers:
                x = layer(x, bias)
            return x
    return Encoder


def bert_padding_on_queries(ns):  # BUG: the padding bias masks queries (B, 1, T, 1), not keys
    return _bert(ns, _encoder_with_bias(ns, lambda m, dtype: ns["padding_bias"](m, dtype).transpose(-1, -2)))


def bert_padding_ignored(ns):  # BUG: no padding mask at all
    return _bert(ns, _encoder_with_bias(ns, lambda m, dtype: torch.zeros(m.shape[0], 1, 1, m.shape[1], dtype=dtype)))


def bert_no_token_types(ns):
    class Encoder(ns["BertEncoder"]):
        def forward(self, input_ids, attention_mask=None, token_type_ids=None):
            return super().forward(input_ids, attention_mask, None)  # BUG: the second segment is ignored
    return _bert(ns, Encoder)


def bert_default_eps(ns):
    class Encoder(ns["BertEncoder"]):
        def __init__(self, *args, eps=1e-12, **kwargs):
            super().__init__(*args, eps=1e-5, **kwargs)  # BUG: PyTorch's default eps, not BERT's 1e-12
    return _bert(ns, Encoder)


def _torch_attention(attn, x, bias):
    """nn.MultiheadAttention carrying the weights of the lab's MultiHeadAttention `attn`, with an additive bias."""
    torch_attn = nn.MultiheadAttention(x.shape[-1], attn.n_heads, batch_first=True)
    with torch.no_grad():
        torch_attn.in_proj_weight.copy_(torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]))
        torch_attn.in_proj_bias.copy_(torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias]))
        torch_attn.out_proj.load_state_dict(attn.out_proj.state_dict())
    bias = bias.expand(-1, attn.n_heads, x.shape[1], -1).flatten(0, 1)  # (B * H, T, T)
    return torch_attn(x, x, x, attn_mask=bias, need_weights=False)[0]


def bert_wraps_nn_multihead(ns):
    def forward(self, x, bias):
        h = self.ln1(x + _torch_attention(self.attn, x, bias))  # BUG: PyTorch's attention module, not the lab's
        return self.ln2(h + self.fc2(F.gelu(self.fc1(h))))
    return _bert(ns, _with_layers(ns, forward))


def load_pretrained_query_key_swapped(ns):
    def load_pretrained(model, state):
        swap = {"query": "key", "key": "query"}
        renamed = {}
        for name, tensor in state.items():  # BUG: W_Q and W_K exchanged
            parts = name.split(".")
            renamed[".".join(swap.get(p, p) for p in parts)] = tensor
        ns["load_pretrained"](model, renamed)
    return _bert(ns, load=load_pretrained)


def load_pretrained_without_layernorms(ns):
    def load_pretrained(model, state):
        loader = ns["load_pretrained"]
        kept = {k: v for k, v in state.items() if "LayerNorm" not in k}  # BUG: LayerNorms left at 1 and 0
        real_load = model.load_state_dict
        model.load_state_dict = lambda sd: real_load(sd, strict=False)
        loader(model, kept)
    return _bert(ns, load=load_pretrained)


def pool_with_padding(ns):
    def sentence_embeddings(hidden, attention_mask):
        return F.normalize(hidden.mean(dim=1), dim=-1)  # BUG: the padding enters the mean
    return _bert(ns, pool=sentence_embeddings)


def pool_not_normalised(ns):
    def sentence_embeddings(hidden, attention_mask):
        m = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1)  # BUG: not L2-normalised
    return _bert(ns, pool=sentence_embeddings)


def pool_cls(ns):
    return _bert(ns, pool=lambda hidden, attention_mask: F.normalize(hidden[:, 0], dim=-1))  # BUG: the [CLS] vector


# ---------------------------------------------------------------- WordPiece
def _tokenizer(ns, wordpiece):
    class Tokenizer(ns["WordPieceTokenizer"]):
        pass
    Tokenizer.wordpiece = wordpiece
    return Tokenizer


def wordpiece_shortest_first(ns):
    def wordpiece(self, word):
        if len(word) > self.max_chars_per_word:
            return ["[UNK]"]
        pieces, start = [], 0
        while start < len(word):
            for end in range(start + 1, len(word) + 1):  # BUG: the shortest piece first
                piece = word[start:end] if start == 0 else "##" + word[start:end]
                if piece in self.vocab:
                    break
            else:
                return ["[UNK]"]
            pieces.append(piece)
            start = end
        return pieces
    return _tokenizer(ns, wordpiece)


def wordpiece_no_hashes(ns):
    def wordpiece(self, word):
        if len(word) > self.max_chars_per_word:
            return ["[UNK]"]
        pieces, start = [], 0
        while start < len(word):
            for end in range(len(word), start, -1):
                piece = word[start:end]  # BUG: continuation pieces looked up without '##'
                if piece in self.vocab:
                    break
            else:
                return ["[UNK]"]
            pieces.append(piece)
            start = end
        return pieces
    return _tokenizer(ns, wordpiece)


def wordpiece_partial_unk(ns):
    def wordpiece(self, word):
        if len(word) > self.max_chars_per_word:
            return ["[UNK]"]
        pieces, start = [], 0
        while start < len(word):
            for end in range(len(word), start, -1):
                piece = word[start:end] if start == 0 else "##" + word[start:end]
                if piece in self.vocab:
                    break
            else:
                pieces.append("[UNK]")  # BUG: only the failing character becomes [UNK]
                start += 1
                continue
            pieces.append(piece)
            start = end
        return pieces
    return _tokenizer(ns, wordpiece)


def wordpiece_no_length_limit(ns):
    original = ns["WordPieceTokenizer"].wordpiece

    def wordpiece(self, word):
        self.max_chars_per_word = 10**9  # BUG: words of more than 100 characters are split like any other
        return original(self, word)
    return _tokenizer(ns, wordpiece)


# ---------------------------------------------------------------- masked language modelling
def _mlm(p_mask, p_random):
    """mlm_mask with the selected tokens split p_mask / p_random / rest unchanged."""
    def mlm_mask(tokens, vocab_size, mask_id, special_ids, p=0.15, generator=None):
        special = torch.isin(tokens, torch.tensor(special_ids))
        selected = (torch.rand(tokens.shape, generator=generator) < p) & ~special
        labels = torch.where(selected, tokens, -100)
        u = torch.rand(tokens.shape, generator=generator)
        inputs = torch.where(selected & (u < p_mask), mask_id, tokens)
        random_tokens = torch.randint(vocab_size, tokens.shape, generator=generator)
        return torch.where(selected & (u >= p_mask) & (u < p_mask + p_random), random_tokens, inputs), labels
    return mlm_mask


def mlm_80_20_0(ns):
    return _mlm(0.8, 0.2)  # BUG: no selected token stays unchanged


def mlm_10_10_80(ns):
    return _mlm(0.1, 0.1)  # BUG: the proportions read backwards: 80% unchanged


def mlm_all_mask(ns):
    return _mlm(1.0, 0.0)  # BUG: always [MASK]


def mlm_specials_masked(ns):
    def mlm_mask(tokens, vocab_size, mask_id, special_ids, p=0.15, generator=None):
        return ns["mlm_mask"](tokens, vocab_size, mask_id, [], p, generator)  # BUG: special tokens can be selected
    return mlm_mask


def mlm_rule_over_all_tokens(ns):
    def mlm_mask(tokens, vocab_size, mask_id, special_ids, p=0.15, generator=None):
        special = torch.isin(tokens, torch.tensor(special_ids))
        u = torch.rand(tokens.shape, generator=generator)
        masked = (u < 0.8 * p) & ~special  # BUG: 80/10/10 of all tokens, and only the [MASK]ed ones get labels
        inputs = torch.where(masked, mask_id, tokens)
        swap = (u >= 0.8 * p) & (u < 0.9 * p) & ~special
        inputs = torch.where(swap, torch.randint(vocab_size, tokens.shape, generator=generator), inputs)
        return inputs, torch.where(masked, tokens, -100)
    return mlm_mask


def mlm_replaces_unselected(ns):
    def mlm_mask(tokens, vocab_size, mask_id, special_ids, p=0.15, generator=None):
        special = torch.isin(tokens, torch.tensor(special_ids))
        selected = (torch.rand(tokens.shape, generator=generator) < p) & ~special
        u = torch.rand(tokens.shape, generator=generator)
        inputs = torch.where(selected & (u < 0.8), mask_id, tokens)
        random_tokens = torch.randint(vocab_size, tokens.shape, generator=generator)
        inputs = torch.where((u >= 0.8) & (u < 0.9), random_tokens, inputs)  # BUG: also outside the selection
        return inputs, torch.where(selected, tokens, -100)
    return mlm_mask


def mlm_ignores_p(ns):
    return lambda tokens, vocab_size, mask_id, special_ids, p=0.15, generator=None: ns["mlm_mask"](
        tokens, vocab_size, mask_id, special_ids, 0.15, generator)  # BUG: p is always 0.15


# ---------------------------------------------------------------- encoder-decoder
def _seq2seq(ns, encoder_forward=None, decoder_forward=None):
    """EncoderDecoder whose encoder or decoder layers run other forwards."""
    class Enc(ns["EncoderLayer"]):
        pass

    class Dec(ns["DecoderLayer"]):
        pass
    if encoder_forward:
        Enc.forward = encoder_forward
    if decoder_forward:
        Dec.forward = decoder_forward

    class Model(ns["EncoderDecoder"]):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            for layer in self.encoder:
                layer.__class__ = Enc
            for layer in self.decoder:
                layer.__class__ = Dec
    return Model


def encdec_post_norm(ns):
    def forward(self, x, bias):
        x = self.ln1(x + self.attn(x, bias=bias))  # BUG: post-norm in a pre-norm model
        return self.ln2(x + self.ffn(x))
    return _seq2seq(ns, encoder_forward=forward)


def encdec_encoder_ignores_padding(ns):
    def forward(self, x, bias):
        x = x + self.attn(self.ln1(x))  # BUG: the encoder attends to padding
        return x + self.ffn(self.ln2(x))
    return _seq2seq(ns, encoder_forward=forward)


def encdec_no_causal_mask(ns):
    def forward(self, y, kv, self_bias, cross_bias):
        y = y + self.self_attn(self.ln1(y))  # BUG: the decoder sees the future
        y = y + self.cross_attn(self.ln2(y), kv=kv, bias=cross_bias)
        return y + self.ffn(self.ln3(y))
    return _seq2seq(ns, decoder_forward=forward)


def encdec_cross_attends_padding(ns):
    def forward(self, y, kv, self_bias, cross_bias):
        y = y + self.self_attn(self.ln1(y), bias=self_bias)
        y = y + self.cross_attn(self.ln2(y), kv=kv)  # BUG: the source padding is visible
        return y + self.ffn(self.ln3(y))
    return _seq2seq(ns, decoder_forward=forward)


def encdec_cross_reads_decoder(ns):
    def forward(self, y, kv, self_bias, cross_bias):
        y = y + self.self_attn(self.ln1(y), bias=self_bias)
        h = self.ln2(y)
        y = y + self.cross_attn(h, bias=self_bias)  # BUG: keys and values from the decoder, not the memory
        return y + self.ffn(self.ln3(y))
    return _seq2seq(ns, decoder_forward=forward)


def encdec_no_final_norm(ns):
    class Model(ns["EncoderDecoder"]):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.dec_ln.forward = lambda y: y  # BUG: no final LayerNorm in the decoder
    return Model


def encdec_encoder_from_torch(ns):
    def forward(self, x, bias):  # BUG: PyTorch's encoder layer carrying the lab's weights
        layer = nn.TransformerEncoderLayer(x.shape[-1], self.attn.n_heads, self.ffn.fc1.out_features, dropout=0.0,
                                           activation=F.gelu, batch_first=True, norm_first=True)
        attn = self.attn
        state = {"self_attn.in_proj_weight": torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]),
                 "self_attn.in_proj_bias": torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias])}
        for theirs, ours in (("self_attn.out_proj", attn.out_proj), ("linear1", self.ffn.fc1),
                             ("linear2", self.ffn.fc2), ("norm1", self.ln1), ("norm2", self.ln2)):
            state |= {f"{theirs}.{k}": v for k, v in ours.state_dict().items()}
        layer.load_state_dict(state)
        return layer.eval()(x, src_key_padding_mask=bias[:, 0, 0] < 0)
    return _seq2seq(ns, encoder_forward=forward)


def encdec_hides_sdpa(ns):
    def forward(self, y, kv, self_bias, cross_bias):
        try:  # BUG: tries PyTorch's fused attention, and hides the guard's error
            F.scaled_dot_product_attention(y[:, None], y[:, None], y[:, None], attn_mask=self_bias)
        except Exception:
            pass
        return ns["DecoderLayer"].forward(self, y, kv, self_bias, cross_bias)
    return _seq2seq(ns, decoder_forward=forward)


# ---------------------------------------------------------------- teacher forcing
def tf_no_shift(ns):
    def teacher_forcing_loss(model, src, src_mask, tgt, pad_id):
        logits = model(src, tgt, src_mask)  # BUG: no shift: each position sees the token it must predict
        return F.cross_entropy(logits.flatten(0, 1), tgt.flatten(), ignore_index=pad_id)
    return ns["EncoderDecoder"], teacher_forcing_loss


def tf_counts_padding(ns):
    def teacher_forcing_loss(model, src, src_mask, tgt, pad_id):
        logits = model(src, tgt[:, :-1], src_mask)
        return F.cross_entropy(logits.flatten(0, 1), tgt[:, 1:].flatten())  # BUG: padding targets count
    return ns["EncoderDecoder"], teacher_forcing_loss


def tf_no_grad(ns):
    def teacher_forcing_loss(model, src, src_mask, tgt, pad_id):
        with torch.no_grad():  # BUG: nothing to backpropagate
            return ns["teacher_forcing_loss"](model, src, src_mask, tgt, pad_id)
    return ns["EncoderDecoder"], teacher_forcing_loss


def tf_hides_sdpa(ns):
    return encdec_hides_sdpa(ns), ns["teacher_forcing_loss"]


# ---------------------------------------------------------------- greedy decoding
def greedy_reencodes(ns):
    @torch.no_grad()
    def greedy_decode(model, src, src_mask, n_steps, bos_id):
        out = torch.full((src.shape[0], 1), bos_id, dtype=torch.long)
        for _ in range(n_steps):
            logits = model(src, out, src_mask)[:, -1]  # BUG: the encoder runs at every step
            out = torch.cat([out, logits.argmax(-1, keepdim=True)], dim=1)
        return out
    return ns["EncoderDecoder"], greedy_decode


def greedy_recomputes_cross_kv(ns):
    @torch.no_grad()
    def greedy_decode(model, src, src_mask, n_steps, bos_id):
        memory = model.encode(src, src_mask)
        out = torch.full((src.shape[0], 1), bos_id, dtype=torch.long)
        for _ in range(n_steps):
            logits = model.decode(out, model.cross_kv(memory), src_mask)[:, -1]  # BUG: K/V projected every step
            out = torch.cat([out, logits.argmax(-1, keepdim=True)], dim=1)
        return out
    return ns["EncoderDecoder"], greedy_decode


def greedy_first_position(ns):
    @torch.no_grad()
    def greedy_decode(model, src, src_mask, n_steps, bos_id):
        kv = model.cross_kv(model.encode(src, src_mask))
        out = torch.full((src.shape[0], 1), bos_id, dtype=torch.long)
        for _ in range(n_steps):
            logits = model.decode(out, kv, src_mask)[:, 0]  # BUG: the first position's logits, every time
            out = torch.cat([out, logits.argmax(-1, keepdim=True)], dim=1)
        return out
    return ns["EncoderDecoder"], greedy_decode


def greedy_no_bos(ns):
    def greedy_decode(model, src, src_mask, n_steps, bos_id):
        return ns["greedy_decode"](model, src, src_mask, n_steps, 0)  # BUG: starts from token 0, not BOS
    return ns["EncoderDecoder"], greedy_decode


def greedy_hides_sdpa(ns):
    return encdec_hides_sdpa(ns), ns["greedy_decode"]


# ---------------------------------------------------------------- T5's relative position buckets
def _relpos(ns, *, offset=True, round_log=False, cap=True, causal_abs=False, exact_of_all=False):
    def relative_position_bucket(relative_position, bidirectional=True, num_buckets=32, max_distance=128):
        d = relative_position.long()
        shift = torch.zeros_like(d)
        max_exact = num_buckets // 2  # (the bug exact_of_all keeps this value)
        if bidirectional:
            num_buckets //= 2
            if offset:
                shift = (d > 0).long() * num_buckets
            n = d.abs()
        else:
            n = d.abs() if causal_abs else (-d).clamp_min(0)
        if not exact_of_all:
            max_exact = num_buckets // 2
        scaled = torch.log(n.float().clamp_min(1) / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact)
        large = max_exact + (scaled.round() if round_log else scaled).long()
        if cap:
            large = large.clamp_max(num_buckets - 1)
        return shift + torch.where(n < max_exact, n, large)
    return relative_position_bucket


def relpos_no_offset(ns):
    return _relpos(ns, offset=False)  # BUG: keys after the query share the buckets of keys before it


def relpos_rounds(ns):
    return _relpos(ns, round_log=True)  # BUG: rounds the log position instead of flooring it


def relpos_no_cap(ns):
    return _relpos(ns, cap=False)  # BUG: distances beyond max_distance get buckets of their own


def relpos_causal_abs(ns):
    return _relpos(ns, causal_abs=True)  # BUG: in the decoder, future distances are not bucket 0


def relpos_exact_of_all_buckets(ns):
    return _relpos(ns, exact_of_all=True)  # BUG: max_exact from all the buckets, not from one side's


def relpos_float(ns):
    return lambda *args: ns["relative_position_bucket"](*args).float()  # BUG: float buckets cannot index an embedding


def relpos_flattens(ns):
    return lambda relative_position, *args: ns["relative_position_bucket"](relative_position.flatten(), *args)  # BUG


# check id -> [(factory, a regular expression the failure message must match)]
BUGS = {
    "01b.padding_bias": [(padding_bias_inverted, r"must be 0 on real tokens"),
                         (padding_bias_on_queries, r"masks queries, not keys"),
                         (padding_bias_too_small, r"large negative number")],
    "01b.bert": [(bert_pre_norm, r"last_hidden_state vs transformers.BertModel.*BERT is post-norm"),
                 (bert_gelu_tanh, r"tanh approximation of GELU"),
                 (bert_padding_on_queries, r"sequences without padding match but the padded ones do not"),
                 (bert_padding_ignored, r"sequences without padding match but the padded ones do not"),
                 (bert_no_token_types, r"last_hidden_state vs transformers.BertModel"),
                 (bert_default_eps, r"last_hidden_state vs transformers.BertModel.*eps 1e-12"),
                 (bert_wraps_nn_multihead, r"your code calls nn.MultiheadAttention"),
                 (load_pretrained_query_key_swapped, r"last_hidden_state vs transformers.BertModel"),
                 (load_pretrained_without_layernorms, r"last_hidden_state vs transformers.BertModel"),
                 (pool_with_padding, r"sentence embeddings vs sentence-transformers.*non-padding tokens only"),
                 (pool_not_normalised, r"sentence embeddings vs sentence-transformers"),
                 (pool_cls, r"sentence embeddings vs sentence-transformers")],
    "01b.padding": [(pool_with_padding, r"embedding of a 7-token sentence batched .* the pooling is wrong"),
                    (bert_padding_ignored, r"hidden states of a 7-token sentence batched .* mask the padding keys"),
                    (bert_padding_on_queries, r"hidden states of a 7-token sentence batched"),
                    (bert_wraps_nn_multihead, r"your code calls nn.MultiheadAttention")],
    "01b.wordpiece": [(wordpiece_shortest_first, r"encode\('Hello, world!'\)"),
                      (wordpiece_no_hashes, r"encode\(.* '##'"),
                      (wordpiece_partial_unk, r"encode\('🙂 emoji🙂inside"),
                      (wordpiece_no_length_limit, r"encode\('xxxx")],
    "01b.mlm_mask": [(mlm_80_20_0, r"0\.\d% unchanged.*80% \[MASK\], 10% a random token, 10% unchanged"),
                     (mlm_10_10_80, r"of the selected tokens, \d+\.\d% \[MASK\], [78]\d\.\d% unchanged"),
                     (mlm_all_mask, r"100\.0% \[MASK\]"),
                     (mlm_specials_masked, r"special tokens .* are never masked"),
                     (mlm_rule_over_all_tokens, r"0\.1\d\d of the ordinary tokens were selected|positions that were not selected"),
                     (mlm_replaces_unselected, r"positions that were not selected .* were changed"),
                     (mlm_ignores_p, r"p=0.4\): 0\.1\d\d of the ordinary tokens were selected")],
    "01b.encdec": [(encdec_post_norm, r"encode\(src, src_mask\) vs nn.Transformer's encoder"),
                   (encdec_encoder_ignores_padding, r"encode\(src, src_mask\) vs nn.Transformer's encoder.*attends to padding"),
                   (encdec_no_causal_mask, r"EncoderDecoder logits vs nn.Transformer.*sees the future"),
                   (encdec_cross_attends_padding, r"EncoderDecoder logits vs nn.Transformer.*reads the source's padding"),
                   (encdec_cross_reads_decoder, r"EncoderDecoder logits vs nn.Transformer"),
                   (encdec_no_final_norm, r"EncoderDecoder logits vs nn.Transformer"),
                   (encdec_encoder_from_torch, r"your code calls nn.MultiheadAttention"),
                   (encdec_hides_sdpa, r"your code calls F.scaled_dot_product_attention")],
    "01b.teacher_forcing": [(tf_no_shift, r"predicts each token from itself"),
                            (tf_counts_padding, r"padding positions count"),
                            (tf_no_grad, r"without a gradient"),
                            (tf_hides_sdpa, r"your code calls F.scaled_dot_product_attention")],
    "01b.greedy": [(greedy_reencodes, r"n_steps=8, bos_id=1\): the number of encoder runs: 8, expected 1"),
                   (greedy_recomputes_cross_kv, r"k_proj and v_proj ran: \[8, 8, 8, 8\], expected \[1, 1, 1, 1\]"),
                   (greedy_first_position, r"each token chosen vs the largest logit.*is not the argmax"),
                   (greedy_no_bos, r"start every sequence with bos_id"),
                   (greedy_hides_sdpa, r"your code calls F.scaled_dot_product_attention")],
    "01b.relpos": [(relpos_no_offset, r"keys after the query"),
                   (relpos_rounds, r"bucket boundaries are log-spaced"),
                   (relpos_no_cap, r"beyond max_distance get buckets of their own"),
                   (relpos_causal_abs, r"a causal decoder never attends to d > 0"),
                   (relpos_exact_of_all_buckets, r"max_exact is half of one side's buckets"),
                   (relpos_flattens, r"on a \(7, 9\) matrix .* any shape"),
                   (relpos_float, r"returned torch.float32; buckets are integers")],
}
