"""Hidden checks of Lab 1b: the visible checks rerun on edge cases of the same API (see README.md)."""

import torch

from labkit.checks import references as ref, seeded_generator, table_inputs
from labkit.checks.lab01b import (bert, encdec_inputs, greedy, mlm_mask, padded_batch, relpos, teacher_forcing,
                                  wordpiece, wordpiece_inputs)


def bert_small_inputs(seed: int) -> dict:
    """A random BertModel of another shape, as a Hugging Face state dict, and a batch with a 1-token sentence."""
    g, config = seeded_generator(seed), {"vocab_size": 120, "d_model": 48, "n_heads": 3, "n_layers": 3, "d_ff": 80,
                                         "max_len": 24, "n_types": 3, "eps": 1e-12}
    shapes = {k: v.shape for k, v in ref.hf("bert", "BertModel")(ref.bert_config(config)).state_dict().items()}
    # Larger weights than BERT's initialisation, so that every bug shows; LayerNorm gains near 1.
    state = {k: ("LayerNorm.weight" in k) + torch.randn(shape, generator=g) * (
        0.2 if k.endswith("bias") or "LayerNorm" in k else shape[-1] ** -0.5) for k, shape in shapes.items()}
    ids, mask = padded_batch(g, [10, 3, 7, 1], ids=(3, 120), cls_sep=(1, 2))
    return {"model": "a random BERT with 3 layers, 3 heads, 3 token types: nothing may depend on all-MiniLM-L6-v2's "
            "sizes", "config": config, "batches": [(ids, mask, torch.randint(0, 3, ids.shape, generator=g) * mask)],
            "state": state | {"embeddings.position_ids": torch.arange(24)[None]}}  # as in real checkpoints


bert_small = bert.variant("01b.hidden.bert_small", bert_small_inputs,
                          ("BertEncoder", "load_pretrained", "sentence_embeddings"))
wordpiece_edge = wordpiece.variant("01b.hidden.wordpiece_edge", lambda seed: wordpiece_inputs(seed) | {"texts": [
    "", "!!!", "a", "x" * 100, "y" * 101, "abc🙂def", "Ünïcödé ÀÉÎÕÜ façade", "中文字符和English混合",
    "rock'n'roll--and...more", "tab\tseparated\r\nlines", "ALLCAPS Sentence With MiXeD case",
    "numbers 3.14159 and 1,000,000", "##hash ##pieces [brackets]"]}, ("WordPieceTokenizer",))


def mlm_edge_inputs(seed: int) -> dict:  # another rate, another vocabulary, and many special tokens
    g = seeded_generator(seed)
    tokens = torch.randint(10, 60, (64, 200), generator=g).masked_fill(torch.rand(64, 200, generator=g) < 0.4, 7)
    return {"tokens": tokens, "vocab_size": 60, "mask_id": 8, "special_ids": [7, 9],
            "runs": [(0.5, 10_000 + seed), (0.5, 20_000 + seed)]}


mlm_edge = mlm_mask.variant("01b.hidden.mlm_edge", mlm_edge_inputs, ("mlm_mask",))
teacher_forcing_pad = teacher_forcing.variant("01b.hidden.teacher_forcing_pad", lambda seed: encdec_inputs(
    seed, pad_id=3), ("EncoderDecoder", "teacher_forcing_loss"))
GREEDY_SMALL = {"vocab_size": 11, "d_model": 8, "n_heads": 1, "n_layers": 1, "max_len": 6}
greedy_small = greedy.variant(  # one layer, one head, a source of a single token, and 0, 1 and 5 steps
    "01b.hidden.greedy_small", lambda seed: encdec_inputs(seed, GREEDY_SMALL, (4, 4, 1)) | {
        "bos_id": 2, "calls": [(0, 3), (1, 1), (5, 3)]}, ("EncoderDecoder", "greedy_decode"))


relpos_edge = relpos.variant("01b.hidden.relpos_edge", table_inputs(lambda g: [
    {"what": f"relative_position_bucket(int32 (5, 8) distances up to ±5000, {b}, {n}, {m})", "args": [far, b, n, m]}
    for far in [torch.randint(-5000, 5001, (5, 8), generator=g, dtype=torch.int32)]
    for b, n, m in [(True, 10, 20), (False, 16, 50), (True, 64, 256), (False, 2, 8)]]), ("relative_position_bucket",))
