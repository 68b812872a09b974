"""Checks of Lab 1b against transformers' BERT, sentence-transformers, tokenizers, nn.Transformer and T5's buckets."""

import math

import torch
import torch.nn.functional as F

from labkit.checks import (ATTENTION_BUILTINS, as_tensor, attention_weights, causal, compare, define, mlp_weights,
                           norm_weights, raised, references as ref, seeded_generator, table_inputs)
from labkit.checks.kernel import attempt, build, load_state, run_cases
from labkit.data import minilm_files

ENCDEC_CONFIG = {"vocab_size": 20, "d_model": 16, "n_heads": 4, "n_layers": 2, "max_len": 12}


def padding_bias_collect(inputs: dict, padding_bias) -> dict:
    return {"float32": attempt(padding_bias, inputs["mask"]),
            "float64": attempt(padding_bias, inputs["mask"].bool(), torch.float64)}


@define("01b.padding_bias", lambda seed: {"mask": (torch.arange(6) < torch.tensor([[6], [4], [2]])).long()},
        padding_bias_collect)
def padding_bias(inputs: dict, out: dict) -> str:
    keys = (inputs["mask"][:, None, None, :] - 1) * 1e4  # 0 or -1e4: to softmax, any value <= -1e4 is as good as -inf
    for dtype, bias in out.items():  # padding_bias(mask) is float32, padding_bias(mask, torch.float64) float64
        call = f"padding_bias(attention_mask of shape {tuple(inputs['mask'].shape)}"
        call += ", torch.float64)" if dtype == "float64" else ")"
        compare(f"{call}, values below -1e4 as -1e4", bias.clamp_min(-1e4) if isinstance(bias, torch.Tensor) else bias,
                keys, hint="0 on real tokens (attention_mask 1), a large negative number such as torch.finfo(dtype).min"
                " on padding (0), so that softmax gives padding the weight 0", suspects={
                    "the bias is inverted: it must be 0 on real tokens and very negative on padding": -1e4 - keys,
                    "that is (B, 1, T, 1), which masks queries, not keys: one additive term per key, (B, 1, 1, T)":
                        keys.transpose(-1, -2)})
        compare(f"{call}: its dtype", bias.dtype, getattr(torch, dtype), hint="the bias must have the dtype asked for")
    return "an additive (B, 1, 1, T) bias, 0 on tokens and a large negative number on padding"


def padded_batch(g: torch.Generator, lengths: list[int], ids: tuple[int, int] = (1000, 30000),
                 cls_sep: tuple[int, int] = (101, 102)) -> tuple[torch.Tensor, torch.Tensor]:
    """Random token ids in range(*ids) framed by [CLS] ... [SEP], right-padded with 0, and their attention mask."""
    mask = (torch.arange(max(lengths)) < torch.tensor(lengths)[:, None]).long()
    batch = torch.randint(*ids, mask.shape, generator=g) * mask  # by default, ordinary words of MiniLM's vocabulary
    batch[:, 0], batch[torch.arange(len(lengths)), torch.tensor(lengths) - 1] = cls_sep
    return batch, mask


def bert_inputs(seed: int) -> dict:
    ids, mask = padded_batch(seeded_generator(seed), [14, 9, 5])
    types = (torch.arange(14) >= 7) * torch.tensor([[1], [0], [0]])  # a second segment, as in sentence-pair tasks
    return {"model": "all-MiniLM-L6-v2", "config": ref.minilm_config(), "state": "all-MiniLM-L6-v2",
            "batches": [(ids, mask, types)]}  # (input_ids, attention_mask[, token_type_ids]) to encode


def encoder_collect(inputs: dict, BertEncoder, load_pretrained, sentence_embeddings) -> dict:
    model = BertEncoder(**inputs["config"])
    load_pretrained(model, load_state(inputs["state"]))
    model.eval()
    with torch.no_grad():
        hidden = [model(*batch) for batch in inputs["batches"]]
        return {"hidden": hidden, "embeddings": [attempt(sentence_embeddings, states, batch[1])
                                                 for states, batch in zip(hidden, inputs["batches"])]}


def bert_reference(inputs: dict, hidden_act: str = "gelu") -> torch.Tensor:
    model = ref.hf("bert", "BertModel")(ref.bert_config(inputs["config"], hidden_act)).double().eval()
    model.load_state_dict(load_state(inputs["state"]), strict=False)  # checkpoints keep position_ids, of no use here
    with torch.no_grad():  # the batch is (input_ids, attention_mask, token_type_ids), BertModel's first arguments
        return model(*inputs["batches"][0]).last_hidden_state


@define("01b.bert", bert_inputs, encoder_collect, forbid=ATTENTION_BUILTINS)
def bert(inputs: dict, out: dict) -> str:
    mask, want = inputs["batches"][0][1], bert_reference(inputs)
    hidden = as_tensor(f"BertEncoder(input_ids of shape {tuple(mask.shape)})", out["hidden"][0], want.shape)
    full, real = mask.bool().all(1), mask.bool()[..., None]  # the sequences without padding; the real tokens
    name = f"last_hidden_state vs transformers.BertModel ({inputs['model']})"
    compare(f"{name}, on the sequences without padding", hidden[full], want[full],
            hint="BERT is post-norm, x = LayerNorm(x + sublayer(x)), with LayerNorm eps 1e-12; the embeddings are "
                 "word + position + token type, then a LayerNorm; the FFN uses the exact GELU (erf)",
            suspects={"this is BERT with the tanh approximation of GELU: use the exact GELU, F.gelu(x) (erf)":
                      lambda: bert_reference(inputs, "gelu_pytorch_tanh")[full]})
    compare(f"{name}, at the real tokens of the padded sequences", hidden * real, want * real,
            hint="the sequences without padding match but the padded ones do not: the padding bias must stop every "
                 "query from attending to padding keys, shape (B, 1, 1, T), a large negative number on padding")
    Pooling, Normalize = ref.sentence_transformers()
    pooled = Pooling(want.shape[-1], "mean")({"token_embeddings": want, "attention_mask": mask})
    compare("sentence embeddings vs sentence-transformers' mean Pooling and Normalize", out["embeddings"][0],
            Normalize()(pooled)["sentence_embedding"],
            hint="mean-pool the hidden states over the non-padding tokens only, then divide by the L2 norm")
    return ("last_hidden_state matches transformers.BertModel and the embeddings match sentence-transformers, "
            "within 1e-5")


def padding_inputs(seed: int) -> dict:
    ids, mask = padded_batch(seeded_generator(seed), [7, 16])
    # A 7-token sentence alone, batched with a sentence of 16 tokens, and followed by 5 padding tokens.
    return bert_inputs(seed) | {"batches": [(ids[:1, :7], mask[:1, :7]), (ids, mask), (ids[:1, :12], mask[:1, :12])]}


@define("01b.padding", padding_inputs, encoder_collect, forbid=ATTENTION_BUILTINS)
def padding(inputs: dict, out: dict) -> str:
    n, T, T_padded = (ids.shape[1] for ids, _ in inputs["batches"])
    for i, how in ((1, f"batched with a sentence of {T} tokens"), (2, f"followed by {T_padded - n} padding tokens")):
        compare(f"hidden states of a {n}-token sentence {how} vs alone", out["hidden"][i][0, :n], out["hidden"][0][0],
                hint="padding changes the real tokens' states: mask the padding keys in every layer")
        compare(f"embedding of a {n}-token sentence {how} vs alone", out["embeddings"][i][0], out["embeddings"][0][0],
                hint="the hidden states agree, so the pooling is wrong: average over the real tokens only")
    return "a sentence gets the same states and embedding alone, batched, or followed by padding"


def wordpiece_inputs(seed: int) -> dict:
    texts = ["Hello, world!", "The café's crème brûlée costs €5.50 — délicieux.",
             "Unaffable transformers' self-attention", "Naïve résumé: Ångström, Øresund and STRASSE.",
             "GPT-2 (2019) vs. BERT-base?", "東京 is in 日本, said ΣΟΦΙΑ.", "  multiple   spaces\tand\nnewlines ",
             "x" * 120, "pneumonoultramicroscopicsilicovolcanoconiosis", "🙂 emoji🙂inside and ™ symbols ½",
             "can't won't it's", "email@example.com http://x.y/z?a=1&b=2"]
    vocab, g = minilm_files()["vocab"], seeded_generator(seed)
    words = [w for w in vocab.read_text(encoding="utf-8").splitlines() if w.isalpha() and w.isascii() and len(w) > 2]
    # Words glued from two or three vocabulary words force splits into several pieces.
    glued = ["".join(words[i] for i in torch.randint(len(words), (int(n),), generator=g).tolist())
             for n in torch.randint(2, 4, (6,), generator=g)]
    return {"vocab_file": str(vocab),
            "texts": texts + [" ".join(glued[:3]).capitalize() + ".", " ".join(glued[3:]).upper()]}


def wordpiece_collect(inputs: dict, WordPieceTokenizer) -> dict:
    tokenizer = WordPieceTokenizer(inputs["vocab_file"])
    return {"ids": [attempt(tokenizer.encode, text) for text in inputs["texts"]]}


@define("01b.wordpiece", wordpiece_inputs, wordpiece_collect)
def wordpiece(inputs: dict, out: dict) -> str:
    tokenizer = ref.wordpiece()
    pieces = lambda ids: ids if raised(ids) else [tokenizer.id_to_token(int(i)) for i in ids]
    for text, got in zip(inputs["texts"], out["ids"], strict=True):
        compare(f"encode({text[:60]!r}), as pieces", pieces(got), pieces(tokenizer.encode(text).ids),
                hint="WordPiece takes the longest vocabulary piece at each step, marks every later piece with '##', "
                     "and makes the whole word [UNK] when a part has no piece or the word has over 100 characters")
    return f"your tokenizer gives the package's token ids on {len(inputs['texts'])} texts"


def mlm_inputs(seed: int) -> dict:
    g = seeded_generator(seed)
    lengths = torch.randint(128, 257, (96,), generator=g).tolist()
    tokens, _ = padded_batch(g, lengths, ids=(5, 1000), cls_sep=(1, 2))  # [CLS] 1 ... [SEP] 2 then [PAD] 0
    tokens[torch.rand(tokens.shape, generator=g) < 0.01] = 3  # [UNK]; [MASK] is 4
    # (p, seed of the generator): not the tokens' seed, whose stream would correlate with the tokens
    return {"tokens": tokens, "vocab_size": 1000, "mask_id": 4, "special_ids": [0, 1, 2, 3],
            "runs": [(0.15, 10_000 + seed), (0.15, 20_000 + seed), (0.4, 30_000 + seed)]}


def mlm_collect(inputs: dict, mlm_mask) -> dict:
    args = (inputs["tokens"], inputs["vocab_size"], inputs["mask_id"], inputs["special_ids"])
    return {"runs": [mlm_mask(*args, p=p, generator=torch.Generator().manual_seed(s)) for p, s in inputs["runs"]]}


@define("01b.mlm_mask", mlm_inputs, mlm_collect)
def mlm_mask(inputs: dict, out: dict) -> str:
    tokens, V, mask_id = inputs["tokens"], inputs["vocab_size"], inputs["mask_id"]
    special = torch.isin(tokens, torch.tensor(inputs["special_ids"]))
    z = lambda count, n, q: abs(count - n * q) / math.sqrt(n * q * (1 - q))  # the standard score of a binomial count
    for (p, _), (x, labels) in zip(inputs["runs"], out["runs"], strict=True):
        what = f"mlm_mask(tokens of shape {tuple(tokens.shape)}, p={p})"
        as_tensor(f"{what}: inputs", x, tokens.shape), as_tensor(f"{what}: labels", labels, tokens.shape)
        compare(f"{what}: the dtypes of inputs and labels", [x.dtype, labels.dtype], [torch.long, torch.long])
        selected = labels != -100
        compare(f"{what}: labels", labels, torch.where(selected & ~special, tokens, -100), 0,
                hint="labels hold the original token where it was selected, -100 elsewhere",
                suspects={"special tokens ([PAD], [CLS], [SEP], [UNK]...) are never masked":
                          torch.where(selected, tokens, -100)})
        compare(f"{what}: inputs where labels are -100", x[~selected], tokens[~selected], 0, hint="positions that "
                "were not selected (label -100) were changed; only selected positions may be replaced")
        n, k = int((~special).sum()), int(selected.sum())
        if z(k, n, p) > 5:
            raise AssertionError(f"{what}: {k / n:.3f} of the ordinary tokens were selected, expected {p} "
                                 "(and labels must be -100 where a token was not selected)")
        masked, same = int((x[selected] == mask_id).sum()), int((x[selected] == tokens[selected]).sum())
        shares = {"[MASK]": (masked, 0.8 + 0.1 / V), "unchanged": (same, 0.1 + 0.1 / V),  # a random token may be either
                  "a random token": (k - masked - same, 0.1 - 0.2 / V)}
        if any(z(count, k, q) > 5 for count, q in shares.values()):
            split = ", ".join(f"{count / k:.1%} {role}" for role, (count, _) in shares.items())
            raise AssertionError(f"{what}: of the selected tokens, {split}; BERT's rule is 80% [MASK], 10% a random "
                                 "token, 10% unchanged")
        randoms = x[selected & (x != mask_id) & (x != tokens)].unique().numel()
        if randoms < min(V // 2, 50, (k - masked - same) // 3):
            raise AssertionError(f"{what}: the random replacements take only {randoms} distinct values; draw them "
                                 f"uniformly from the whole vocabulary (vocab_size={V})")
    if torch.equal(out["runs"][0][1], out["runs"][1][1]):
        raise AssertionError("mlm_mask selected the same positions with two different generators: draw the "
                             "selection at random, with the generator passed in")
    return "15% of the ordinary tokens selected, 80/10/10 as in BERT, special tokens never masked"


def encdec_weights(config: dict, g: torch.Generator) -> dict:
    V, d, L = config["vocab_size"], config["d_model"], config["max_len"]
    # Position embeddings larger than token embeddings, so that greedy decoding does not just repeat its last token.
    w = {f"{name}.weight": scale * torch.randn(n, d, generator=g) for name, n, scale in
         (("tok_emb", V, 0.5), ("enc_pos", L, 3.0), ("dec_pos", L, 3.0))}
    for i in range(config["n_layers"]):
        w |= (norm_weights(f"encoder.{i}.ln1", d, g) | attention_weights(f"encoder.{i}.attn", d, g)
              | norm_weights(f"encoder.{i}.ln2", d, g) | mlp_weights(f"encoder.{i}.ffn", d, 4 * d, g)
              | norm_weights(f"decoder.{i}.ln1", d, g) | attention_weights(f"decoder.{i}.self_attn", d, g)
              | norm_weights(f"decoder.{i}.ln2", d, g) | attention_weights(f"decoder.{i}.cross_attn", d, g)
              | norm_weights(f"decoder.{i}.ln3", d, g) | mlp_weights(f"decoder.{i}.ffn", d, 4 * d, g))
    return w | norm_weights("enc_ln", d, g) | norm_weights("dec_ln", d, g) | {"lm_head.weight": w["tok_emb.weight"]}


def encdec_inputs(seed: int, config: dict = ENCDEC_CONFIG, lengths: tuple = (7, 5, 3), pad_id: int = 0) -> dict:
    g, V = seeded_generator(seed), config["vocab_size"]
    tgt, tgt_mask = padded_batch(g, [n + 1 for n in lengths], ids=(3, V), cls_sep=(1, 2))  # BOS 1 ... EOS 2
    src_mask = torch.arange(max(lengths)) < torch.tensor(lengths)[:, None]
    return {"config": dict(config), "weights": encdec_weights(config, g), "src_mask": src_mask, "pad_id": pad_id,
            "src": torch.randint(3, V, src_mask.shape, generator=g) * src_mask, "bos_id": 1, "calls": [(8, 3)],
            "tgt": tgt.masked_fill(tgt_mask == 0, pad_id)}  # calls: greedy_decode's (n_steps, batch size)


def encdec_collect(inputs: dict, EncoderDecoder, teacher_forcing_loss=None) -> dict:
    """The encoder's states, the logits and, given teacher_forcing_loss, its loss as returned (with requires_grad)."""
    model = build(EncoderDecoder, inputs["weights"], "EncoderDecoder", **inputs["config"])
    src, src_mask, tgt = inputs["src"], inputs["src_mask"], inputs["tgt"]
    loss = attempt(teacher_forcing_loss, model, src, src_mask, tgt, inputs["pad_id"]) if teacher_forcing_loss else None
    with torch.no_grad():
        return {"memory": attempt(model.encode, src, src_mask), "logits": attempt(model, src, tgt, src_mask),
                "loss": loss}


@define("01b.encdec", encdec_inputs, encdec_collect, forbid=ATTENTION_BUILTINS)
def encdec(inputs: dict, out: dict) -> str:
    reference = ref.Seq2Seq(inputs["config"], inputs["weights"])
    src, src_mask, tgt, real = inputs["src"], inputs["src_mask"], inputs["tgt"], inputs["src_mask"][..., None]
    memory = reference.encode(src, src_mask)
    compare("encode(src, src_mask) vs nn.Transformer's encoder (pre-norm, final LayerNorm), at real tokens",
            as_tensor("encode(src, src_mask)", out["memory"], memory.shape) * real, memory * real,
            hint="each encoder layer: x + attn(ln1(x)) with the padding bias, then x + ffn(ln2(x)); then enc_ln",
            suspects={"the encoder attends to padding: pass the padding bias to every encoder layer":
                      lambda: reference.encode(src, torch.ones_like(src_mask)) * real})
    y = reference.tok_emb[tgt] + reference.dec_pos[:tgt.shape[1]]
    without = lambda causal_mask, padding_mask: reference.core.decoder(  # the decoder without one of its masks
        y, memory, tgt_mask=causal_mask, memory_key_padding_mask=padding_mask) @ reference.tok_emb.T
    compare("EncoderDecoder logits vs nn.Transformer (pre-norm) with the same weights", out["logits"],
            reference(src, tgt, src_mask), suspects={
                "the decoder's self-attention sees the future: pass it the causal bias":
                    lambda: without(None, ~src_mask),
                "the cross-attention reads the source's padding: pass it the source padding bias":
                    lambda: without(~causal(tgt.shape[1]), None)},
            hint="each decoder layer: y + self_attn(ln1(y)) with the causal bias, then y + cross_attn(ln2(y)) with the "
                 "encoder's keys and values and the source padding bias, then y + ffn(ln3(y)); then dec_ln, lm_head")
    return "encoder states and logits match torch.nn.Transformer (pre-norm) with the same weights"


@define("01b.teacher_forcing", encdec_inputs, encdec_collect, forbid=ATTENTION_BUILTINS)
def teacher_forcing(inputs: dict, out: dict) -> str:
    reference = ref.Seq2Seq(inputs["config"], inputs["weights"])
    src, src_mask, tgt, pad = inputs["src"], inputs["src_mask"], inputs["tgt"], inputs["pad_id"]
    loss = lambda logits, targets, **ignore: F.cross_entropy(logits.flatten(0, 1), targets.flatten(), **ignore)
    logits = reference(src, tgt[:, :-1], src_mask)
    compare(f"teacher_forcing_loss (pad_id = {pad}) vs the cross-entropy of nn.Transformer's logits on tgt[:, :-1] "
            "against tgt[:, 1:]", out["loss"], loss(logits, tgt[:, 1:], ignore_index=pad),
            hint="ignore the targets equal to pad_id, whatever its value", suspects={
                "the loss predicts each token from itself: feed tgt[:, :-1] to the decoder and score tgt[:, 1:]":
                    lambda: loss(reference(src, tgt, src_mask), tgt, ignore_index=pad),
                "the padding positions count in the loss: pass ignore_index=pad_id": loss(logits, tgt[:, 1:])})
    if not out["loss"].requires_grad:
        raise AssertionError("teacher_forcing_loss returned a loss without a gradient: do not compute it under "
                             "torch.no_grad() or detach it; training calls loss.backward()")
    return "the shifted cross-entropy, padding ignored, matches the reference"


def greedy_collect(inputs: dict, EncoderDecoder, greedy_decode) -> dict:
    model = build(EncoderDecoder, inputs["weights"], "EncoderDecoder", **inputs["config"])
    # enc_ln ends every pass of the encoder; then each decoder layer's cross-attention k_proj and v_proj
    watched = [model.enc_ln, *(getattr(layer.cross_attn, p) for layer in model.decoder for p in ("k_proj", "v_proj"))]
    ran, runs = [], []
    for module in watched:
        module.register_forward_hook(lambda module, *_: ran.append(module))
    for n, B in inputs["calls"]:
        ran.clear()
        with torch.no_grad():
            tokens = attempt(greedy_decode, model, inputs["src"][:B], inputs["src_mask"][:B], n, inputs["bos_id"])
        runs.append({"tokens": tokens, "counts": [ran.count(module) for module in watched]})
    return {"runs": runs}


@define("01b.greedy", encdec_inputs, greedy_collect, forbid=ATTENTION_BUILTINS)
def greedy(inputs: dict, out: dict) -> str:
    reference, bos = ref.Seq2Seq(inputs["config"], inputs["weights"]), inputs["bos_id"]
    for (n, B), run in zip(inputs["calls"], out["runs"], strict=True):
        src, src_mask = inputs["src"][:B], inputs["src_mask"][:B]
        call = f"greedy_decode(model, src of shape {tuple(src.shape)}, src_mask, n_steps={n}, bos_id={bos})"
        tokens = as_tensor(f"{call}, the BOS column then n_steps tokens", run["tokens"], (B, n + 1)).long()
        compare(f"{call}: column 0", tokens[:, 0], torch.full((B,), bos), hint="start every sequence with bos_id")
        if n == 0:
            continue
        logits = reference(src, tokens[:, :-1], src_mask)  # (B, n, V): the logits after each prefix
        compare(f"{call}: the reference's logit of each token chosen vs the largest logit after its prefix",
                logits.gather(-1, tokens[:, 1:, None])[..., 0], logits.amax(-1),
                hint="a token chosen is not the argmax: take the argmax of the last position's logits")
        encodes, *projections = run["counts"]
        compare(f"{call}: the number of encoder runs", encodes, 1, hint="encode the source once, before the loop")
        compare(f"{call}: how often each cross-attention k_proj and v_proj ran", projections, [1] * len(projections),
                hint="compute them once with model.cross_kv(memory) and reuse them at every step")
    return "argmax decoding, the encoder run once, cross-attention keys and values computed once"


def relpos_cases(g: torch.Generator) -> list[dict]:
    query, key = torch.randint(0, 400, (7,), generator=g), torch.randint(0, 400, (9,), generator=g)
    call = "relative_position_bucket(d, bidirectional={}, num_buckets={}, max_distance={})".format
    distances = {" for d = -300..300 (index i is d = i - 300)": torch.arange(-300, 301),
                 " on a (7, 9) matrix of key - query positions": key - query[:, None]}
    return [{"what": call(*setting) + where, "args": [d, *setting]} for setting in
            [(True, 32, 128), (False, 32, 128), (True, 16, 64), (False, 8, 20)] for where, d in distances.items()]


def relpos_suspects(case: dict) -> dict:
    d, bidirectional, num_buckets, max_distance = case["args"]

    def bug(offset=True, floor=True, cap=True, causal_abs=False, exact_of_all=False):
        half = num_buckets // 2 if bidirectional else num_buckets  # the buckets of one side
        max_exact = num_buckets // 2 if exact_of_all else half // 2
        n = d.long().abs() if bidirectional or causal_abs else (-d.long()).clamp_min(0)
        log = torch.log(n.clamp_min(1) / max_exact) / math.log(max_distance / max_exact) * (half - max_exact)
        large = max_exact + (log.floor() if floor else log.round()).long()
        side = half * (d > 0) if bidirectional and offset else 0
        return side + torch.where(n < max_exact, n, large.clamp_max(half - 1) if cap else large)
    return {"keys after the query (d > 0) take the upper half of the buckets: add num_buckets // 2": bug(offset=False),
            "the log position is rounded; floor it (.long()) so bucket boundaries are log-spaced": bug(floor=False),
            "distances beyond max_distance get buckets of their own: cap at the side's last bucket": bug(cap=False),
            "a causal decoder never attends to d > 0; T5 puts all of them in bucket 0": bug(causal_abs=True),
            "max_exact is half of one side's buckets (num_buckets // 4 when bidirectional)": bug(exact_of_all=True),
            "the result was flattened: work elementwise on any shape":
                lambda: ref.t5_bucket(d.flatten(), *case["args"][1:])}


@define("01b.relpos", table_inputs(relpos_cases), run_cases)
def relpos(inputs: dict, out: dict) -> str:
    for case, got in zip(inputs["cases"], out["outputs"], strict=True):
        if isinstance(got, torch.Tensor) and got.is_floating_point():
            raise AssertionError(f"{case['what']}: returned {got.dtype}; buckets are integers, they index an embedding")
        compare(case["what"], got, ref.t5_bucket(*case["args"]), 0, hint="n < max_exact (half a side's buckets) is "
                "its own bucket; beyond, max_exact + floor(log(n / max_exact) / log(max_distance / max_exact) * "
                "(side's buckets - max_exact)), capped at the side's last", suspects=relpos_suspects(case))
    return "T5's buckets: exact for small distances, log-spaced up to max_distance, monotonic"
