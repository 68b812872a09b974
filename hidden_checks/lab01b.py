"""Hidden checks of Lab 1b: edge cases of the same API (see README.md)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from labkit.checks import Check, assert_close, seeded_generator
from labkit.checks.lab01b import (ENCDEC_CONFIG, ReferenceSeq2Seq, _padded_batch, encdec_weights, hf,
                                  hf_bert_config, reference_tokenizer, t5_bucket, verify_mlm_run)
from labkit.data import minilm_files
from labkit.grade import HiddenCheck


# ---------------------------------------------------------------- a BERT of another shape
BERT_SMALL = {"vocab_size": 120, "d_model": 48, "n_heads": 3, "n_layers": 3, "d_ff": 80, "max_len": 24,
              "n_types": 3, "eps": 1e-12}


def bert_small_inputs(seed: int) -> dict:
    """A random Hugging Face BertModel of another shape (3 heads, 3 layers, 3 token types), as a state dict."""
    g = seeded_generator(seed)
    torch.manual_seed(seed)
    model = hf().BertModel(hf_bert_config(BERT_SMALL))
    state = {}
    for name, tensor in model.state_dict().items():  # larger weights than BERT's init, so that every bug shows
        if "LayerNorm.weight" in name:
            state[name] = 1 + 0.2 * torch.randn(tensor.shape, generator=g)
        elif name.endswith("bias") or "LayerNorm" in name:
            state[name] = 0.2 * torch.randn(tensor.shape, generator=g)
        else:
            state[name] = torch.randn(tensor.shape, generator=g) / tensor.shape[-1] ** 0.5
    state["embeddings.position_ids"] = torch.arange(BERT_SMALL["max_len"])[None]  # as in real checkpoints
    ids, mask = _padded_batch(g, [10, 3, 7, 1], BERT_SMALL["vocab_size"], cls_id=1, sep_id=2, low=3)
    types = torch.randint(0, 3, ids.shape, generator=g) * mask
    return {"config": dict(BERT_SMALL), "state": state, "ids": ids, "mask": mask, "types": types}


def bert_small_collect(inputs, BertEncoder, load_pretrained, sentence_embeddings):
    model = BertEncoder(**inputs["config"])
    load_pretrained(model, inputs["state"])
    model.eval()
    with torch.no_grad():
        hidden = model(inputs["ids"], inputs["mask"], inputs["types"])
        return {"hidden": hidden, "embeddings": sentence_embeddings(hidden, inputs["mask"])}


def bert_small_verify(inputs: dict, out: dict) -> str:
    reference = hf().BertModel(hf_bert_config(inputs["config"])).double().eval()
    reference.load_state_dict({k: v for k, v in inputs["state"].items() if k != "embeddings.position_ids"},
                              strict=False)
    ids, mask = inputs["ids"], inputs["mask"]
    with torch.no_grad():
        want = reference(input_ids=ids, attention_mask=mask, token_type_ids=inputs["types"]).last_hidden_state
        features = {"token_embeddings": want, "attention_mask": mask}
        pooled = hf().Pooling(inputs["config"]["d_model"], "mean")(features)
        embeddings = hf().Normalize()(pooled)["sentence_embedding"]
    real = mask.bool().unsqueeze(-1)
    got = out["hidden"]
    if isinstance(got, torch.Tensor) and got.shape == want.shape:
        got = got * real
    assert_close("a random 3-layer BERT with 3 heads, 3 token types and a 1-token sentence vs BertModel, "
                 "at real tokens", got, want * real,
                 hint="nothing may depend on the sizes of all-MiniLM-L6-v2 (6 layers, 12 heads, 2 token types)")
    assert_close("its sentence embeddings vs sentence-transformers' Pooling and Normalize", out["embeddings"], embeddings)
    return "✔ 01b.hidden.bert_small"


# ---------------------------------------------------------------- WordPiece edge cases
EDGE_TEXTS = ["", "!!!", "a", "x" * 100, "y" * 101, "abc🙂def", "Ünïcödé ÀÉÎÕÜ façade", "中文字符和English混合",
              "rock'n'roll--and...more", "tab\tseparated\r\nlines", "ALLCAPS Sentence With MiXeD case",
              "numbers 3.14159 and 1,000,000", "##hash ##pieces [brackets]"]


def wordpiece_edge_inputs(seed: int) -> dict:
    return {"texts": EDGE_TEXTS, "vocab_file": str(minilm_files()["vocab"])}


def wordpiece_edge_collect(inputs, WordPieceTokenizer):
    tokenizer = WordPieceTokenizer(inputs["vocab_file"])
    return {"ids": [list(map(int, tokenizer.encode(text))) for text in inputs["texts"]]}


def wordpiece_edge_verify(inputs: dict, out: dict) -> str:
    reference = reference_tokenizer()
    for text, got in zip(inputs["texts"], out["ids"]):
        want = reference.encode(text).ids
        if list(got) != want:
            raise AssertionError(f"encode({text[:50]!r}) gives {len(got)} ids {list(got)[:12]}, the package's "
                                 f"tokenizer {len(want)} ids {want[:12]}")
    return "✔ 01b.hidden.wordpiece_edge"


# ---------------------------------------------------------------- masking: another rate, many special tokens
def mlm_edge_inputs(seed: int) -> dict:
    g = seeded_generator(seed)
    tokens = torch.randint(10, 60, (64, 200), generator=g)
    tokens[torch.rand(tokens.shape, generator=g) < 0.4] = 7  # many special tokens
    return {"tokens": tokens, "vocab_size": 60, "mask_id": 8, "special_ids": [7, 9], "seed": 10_000 + seed}


def mlm_edge_collect(inputs, mlm_mask):
    x, labels = mlm_mask(inputs["tokens"], inputs["vocab_size"], inputs["mask_id"], inputs["special_ids"], p=0.5,
                         generator=torch.Generator().manual_seed(inputs["seed"]))
    return {"inputs": x, "labels": labels}


def mlm_edge_verify(inputs: dict, out: dict) -> str:
    verify_mlm_run(inputs["tokens"], inputs["vocab_size"], inputs["mask_id"], inputs["special_ids"], 0.5,
                   out["inputs"], out["labels"])
    return "✔ 01b.hidden.mlm_edge"


# ---------------------------------------------------------------- teacher forcing with another padding id
def tf_pad_inputs(seed: int) -> dict:
    g = seeded_generator(seed)
    config = dict(ENCDEC_CONFIG)
    src = torch.randint(4, config["vocab_size"], (2, 5), generator=g)
    tgt = torch.randint(4, config["vocab_size"], (2, 7), generator=g)
    tgt[1, 4:] = 3  # padding with id 3
    return {"config": config, "weights": encdec_weights(config, g), "src": src,
            "src_mask": torch.ones(2, 5, dtype=torch.bool), "tgt": tgt, "pad_id": 3}


def tf_pad_collect(inputs, EncoderDecoder, teacher_forcing_loss):
    model = EncoderDecoder(**inputs["config"])
    model.load_state_dict(inputs["weights"])
    loss = teacher_forcing_loss(model.eval(), inputs["src"], inputs["src_mask"], inputs["tgt"], inputs["pad_id"])
    return {"loss": loss.detach()}


def tf_pad_verify(inputs: dict, out: dict) -> str:
    ref = ReferenceSeq2Seq(inputs["config"], inputs["weights"])
    tgt = inputs["tgt"]
    with torch.no_grad():
        logits = ref(inputs["src"], tgt[:, :-1], inputs["src_mask"])
        want = F.cross_entropy(logits.flatten(0, 1), tgt[:, 1:].flatten(), ignore_index=inputs["pad_id"])
    assert_close("teacher_forcing_loss with pad_id = 3", out["loss"].reshape(()), want,
                 hint="ignore the targets equal to pad_id, whatever its value")
    return "✔ 01b.hidden.teacher_forcing_pad"


# ---------------------------------------------------------------- greedy decoding: one layer, one head, 0 and 1 steps
GREEDY_SMALL = {"vocab_size": 11, "d_model": 8, "n_heads": 1, "n_layers": 1, "max_len": 6}


def greedy_small_inputs(seed: int) -> dict:
    g = seeded_generator(seed)
    src = torch.randint(3, 11, (3, 4), generator=g)
    src_mask = torch.ones(3, 4, dtype=torch.bool)
    src_mask[2, 1:] = False  # a source of a single token
    return {"config": dict(GREEDY_SMALL), "weights": encdec_weights(GREEDY_SMALL, g), "src": src,
            "src_mask": src_mask, "bos_id": 2}


def greedy_small_collect(inputs, EncoderDecoder, greedy_decode):
    model = EncoderDecoder(**inputs["config"])
    model.load_state_dict(inputs["weights"])
    model.eval()
    src, mask, bos = inputs["src"], inputs["src_mask"], inputs["bos_id"]
    with torch.no_grad():
        return {"none": greedy_decode(model, src, mask, 0, bos), "one": greedy_decode(model, src[:1], mask[:1], 1, bos),
                "five": greedy_decode(model, src, mask, 5, bos)}


def greedy_small_verify(inputs: dict, out: dict) -> str:
    src, mask, bos = inputs["src"], inputs["src_mask"], inputs["bos_id"]
    if tuple(getattr(out["none"], "shape", ())) != (3, 1) or not (out["none"] == bos).all():
        raise AssertionError("greedy_decode with n_steps = 0 must return the (B, 1) column of bos_id")
    ref = ReferenceSeq2Seq(inputs["config"], inputs["weights"])
    for name, n, B in (("one", 1, 1), ("five", 5, 3)):
        tokens = out[name]
        if tuple(getattr(tokens, "shape", ())) != (B, n + 1):
            raise AssertionError(f"greedy_decode with n_steps = {n}: shape {tuple(getattr(tokens, 'shape', ()))}, "
                                 f"expected {(B, n + 1)}")
        with torch.no_grad():
            for t in range(n):
                logits = ref(src[:B], tokens[:, :t + 1], mask[:B])[:, -1]
                chosen = logits.gather(1, tokens[:, t + 1:t + 2]).squeeze(1)
                if (logits.max(-1).values - chosen > 1e-6).any():
                    raise AssertionError(f"greedy_decode of a 1-layer, 1-head model: token {t + 1} is not the argmax")
    return "✔ 01b.hidden.greedy_small"


# ---------------------------------------------------------------- relative position buckets: other settings
def relpos_edge_inputs(seed: int) -> dict:
    g = seeded_generator(seed)
    return {"far": torch.randint(-5000, 5001, (40,), generator=g, dtype=torch.int32),
            "cases": [(True, 10, 20), (False, 16, 50), (True, 64, 256), (False, 2, 8)]}


def relpos_edge_collect(inputs, relative_position_bucket):
    return {f"case{i}": relative_position_bucket(inputs["far"].reshape(5, 8), *case)
            for i, case in enumerate(inputs["cases"])}


def relpos_edge_verify(inputs: dict, out: dict) -> str:
    far = inputs["far"].long().reshape(5, 8)
    for i, case in enumerate(inputs["cases"]):
        got, want = out[f"case{i}"], t5_bucket(far, *case)
        if not isinstance(got, torch.Tensor) or got.shape != want.shape or not torch.equal(got.long(), want):
            raise AssertionError(f"relative_position_bucket(int32 (5, 8) distances up to ±5000, {case}) differs "
                                 "from T5's")
    return "✔ 01b.hidden.relpos_edge"


HIDDEN = [
    HiddenCheck(Check("01b.hidden.bert_small", bert_small_inputs, bert_small_collect, bert_small_verify),
                ("BertEncoder", "load_pretrained", "sentence_embeddings"), 1),
    HiddenCheck(Check("01b.hidden.wordpiece_edge", wordpiece_edge_inputs, wordpiece_edge_collect, wordpiece_edge_verify),
                ("WordPieceTokenizer",), 1),
    HiddenCheck(Check("01b.hidden.mlm_edge", mlm_edge_inputs, mlm_edge_collect, mlm_edge_verify), ("mlm_mask",), 1),
    HiddenCheck(Check("01b.hidden.teacher_forcing_pad", tf_pad_inputs, tf_pad_collect, tf_pad_verify),
                ("EncoderDecoder", "teacher_forcing_loss"), 1),
    HiddenCheck(Check("01b.hidden.greedy_small", greedy_small_inputs, greedy_small_collect, greedy_small_verify),
                ("EncoderDecoder", "greedy_decode"), 1),
    HiddenCheck(Check("01b.hidden.relpos_edge", relpos_edge_inputs, relpos_edge_collect, relpos_edge_verify),
                ("relative_position_bucket",), 1),
]
