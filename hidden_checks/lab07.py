"""Hidden checks of Lab 7: the same API on other inputs and edge cases (see README.md)."""
from __future__ import annotations

from labkit.checks import seeded_generator
from labkit.checks.lab07 import (ALIGNED, FAR, bm25, bm25_case, cca_inputs, chunked_cross_attention, dense_index,
                                 dense_inputs, embed, embed_inputs, in_batch_inputs, in_batch_negatives, knn_inputs,
                                 knn_lm, words)


def bm25_edge_inputs(seed: int) -> dict:
    """A single document (every idf negative, and so is epsilon * average_idf); a vocabulary of mostly common terms
    (a negative average_idf) with an empty document, at b = 0 and at b = 0.75 (its length 0 counts in avgdl); an
    empty query; b = 1 (without the empty document, whose k1 (1 - b + b 0 / avgdl) would be 0)."""
    common = [["to", "be", "or"], ["to", "be", "not"], ["to", "be", "to", "be", "question"], [], ["or", "be", "to"]]
    return {"forbidden": ["rank_bm25"], "cases": [
        bm25_case([["the", "king", "the"]], [["the", "king", "queen"], [], ["king", "king"]]),
        bm25_case(common, [["to", "be", "question"], ["or", "not", "not"], []], 1.2, 0.0, 0.5),
        bm25_case(common, [["to", "be", "question"], ["not", "or"]], 1.5, 0.75, 0.25),
        bm25_case(common[:3] + common[4:], [["be", "question", "or"]], 0.8, 1.0, 1.0)]}


bm25_edge = bm25.variant("07.hidden.bm25_edge", bm25_edge_inputs, ("BM25",))

# a single row; one query; every row its own chunk; a chunk of exactly N rows; k = N; N a multiple of the chunk; a
# single distinct vector repeated (every score tied); no memory case
dense_edge = dense_index.variant("07.hidden.dense_index_edge", lambda seed: dense_inputs(
    seed, cases=[(1, 8, 3, "ip", 1, (1,)), (64, 8, 1, "l2", 16, (64, 1)), (37, 8, 1, "ip", 1, (5,)),
                 (50, 3, 4, "l2", 50, (50, 7))],
    ties=[(12, 1, "l2", 2), (9, 9, "ip", 1), (16, 4, "ip", 2)], memory=False), ("DenseIndex",))


def embed_edge_inputs(seed: int) -> dict:
    """An empty text; texts of exactly 256 tokens (no cut) and 257 (one piece cut), one at a time and together."""
    g = seeded_generator(seed)
    exact, over = words(g, 253), words(g, 254)  # 253 + 3 = 256 tokens, and 257
    return embed_inputs(seed, calls=[{"texts": [""], "kwargs": {}},
                                     {"texts": [over, "", exact], "kwargs": {"batch_size": 1}},
                                     {"texts": [exact, over], "kwargs": {}}])


embed_edge = embed.variant("07.hidden.embed_edge", embed_edge_inputs, ("embed",))

# a single query and passage (the loss is 0); unit rows at t = 0.01 (scores q . p / t up to about 60), and with
# q[0] = p[0] (a score of 100, where exp overflows float32); a temperature above 1 with hard negatives
in_batch_edge = in_batch_negatives.variant("07.hidden.in_batch_negatives_edge", lambda seed: in_batch_inputs(
    seed, [(1, 1, 4, 1.0, ""), (8, 8, 16, 0.01, "unit rows"), (8, 8, 16, 0.01, ALIGNED), (2, 5, 3, 2.0, "")]),
    ("in_batch_negatives_loss",))

# heads of one dimension; chunks of one token (token i sees chunk i); T = 2 m - 1; T = m - 1 (nothing attends); B = 3
cca_edge = chunked_cross_attention.variant("07.hidden.chunked_cross_attention_edge", lambda seed: cca_inputs(
    seed, [(3, 3, 2, 2, 7, 4, 2, 2), (4, 2, 1, 1, 5, 5, 1, 3), (6, 2, 3, 3, 5, 2, 1, 1), (8, 4, 8, 1, 7, 1, 2, 2)]),
    ("ChunkedCrossAttention",))

# a single neighbour (p_kNN one-hot), at lambda = 1 and 0.5; distances near 1000, where exp(-d) underflows
knn_edge = knn_lm.variant("07.hidden.knn_lm_edge", lambda seed: {"cases": knn_inputs(
    seed, [(1.0, 1.0, ""), (0.5, 2.0, "")], V=7, k=1)["cases"] + knn_inputs(seed, [(0.3, 1.0, FAR)])["cases"]},
    ("knn_lm",))
