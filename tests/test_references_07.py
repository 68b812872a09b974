"""The references of Lab 7's checks (retrieval-augmented models) follow the code they stand for: rank_bm25's
BM25Okapi, faiss's flat indexes, sentence-transformers' all-MiniLM-L6-v2, DPR's BiEncoderNllLoss and kNN-LM's
interpolation. Each is checked here against a hand computation or a second, independent computation; the notes
are in ``tests/lab07_reference_notes.md``."""
from __future__ import annotations

import math

import pytest
import torch

from labkit.checks import references as ref

faiss = pytest.importorskip("faiss")


# ---------------------------------------------------------------- BM25
def saturation(f: float, dl: float, avgdl: float, k1: float = 1.5, b: float = 0.75) -> float:
    return f * (k1 + 1) / (f + k1 * (1 - b + b * dl / avgdl))


CORPUS = [["a", "b", "a"], ["b", "c"], ["b", "d", "e", "f", "b"]]  # "b" in all 3 documents; the rest in one


def test_bm25_by_hand():
    """N = 3, avgdl = 10/3. idf(n = 1) = ln(2.5 / 1.5) = ln(5/3) for a, c, d, e, f; "b" (n = 3) has raw idf
    ln(0.5 / 3.5) = -ln 7 < 0, so it gets 0.25 * average_idf, the mean of the 6 raw values, -ln 7 included.
    The query repeats "a" (counted twice) and holds "zzz", absent from the corpus (adds 0)."""
    N, avgdl = 3, 10 / 3
    raw_b, rare = math.log(0.5 / 3.5), math.log(2.5 / 1.5)
    average = (5 * rare + raw_b) / 6
    model = ref.bm25_okapi(CORPUS)
    assert model.average_idf == pytest.approx(average, abs=1e-15)
    assert model.idf["b"] == pytest.approx(0.25 * average, abs=1e-15) and model.idf["a"] == pytest.approx(rare)
    query = ["a", "b", "a", "zzz"]
    want = [2 * rare * saturation(f_a, dl, avgdl) + 0.25 * average * saturation(f_b, dl, avgdl)
            for f_a, f_b, dl in ((2, 1, 3), (0, 1, 2), (0, 2, 5))]
    got = ref.bm25_okapi_scores(CORPUS, query)
    assert got.dtype == torch.float64 and got.shape == (N,)
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), atol=1e-14, rtol=0)
    # The absent term adds nothing; a repeated term adds its share again; an empty query scores 0.
    torch.testing.assert_close(ref.bm25_okapi_scores(CORPUS, ["a", "b", "a"]), got, atol=0, rtol=0)
    once = ref.bm25_okapi_scores(CORPUS, ["a", "b"])
    torch.testing.assert_close(got - once, ref.bm25_okapi_scores(CORPUS, ["a"]), atol=1e-14, rtol=0)
    assert torch.equal(ref.bm25_okapi_scores(CORPUS, []), torch.zeros(N, dtype=torch.float64))


def test_bm25_parameters():
    """b = 0: no length normalisation (the planted bug), k1 and epsilon passed through."""
    k1, b, eps = 1.2, 0.0, 0.5
    raw_b, rare = math.log(0.5 / 3.5), math.log(2.5 / 1.5)
    floor = eps * (5 * rare + raw_b) / 6
    want = [rare * saturation(f_a, dl, 10 / 3, k1, b) + floor * saturation(f_b, dl, 10 / 3, k1, b)
            for f_a, f_b, dl in ((2, 1, 3), (0, 1, 2), (0, 2, 5))]
    got = ref.bm25_okapi_scores(CORPUS, ["a", "b"], k1=k1, b=b, epsilon=eps)
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), atol=1e-14, rtol=0)
    assert got[1] == pytest.approx(floor * saturation(1, 123, 1, k1, 0.0))  # b = 0: the length does not matter


def test_bm25_floor_replaces_only_negative_idf():
    """N = 4: a term in 2 documents (n = N/2) keeps idf 0, a term in 3 gets 0.25 * average_idf > 0: the "floor"
    makes a commoner term weigh more. A vocabulary of common terms makes the average, hence the floor, negative."""
    corpus = [["x", "y", "r1"], ["x", "y", "r2"], ["x", "r3"], ["r4"]]
    model = ref.bm25_okapi(corpus)
    raw = {"x": math.log(1.5 / 3.5), "y": 0.0, "r": math.log(3.5 / 1.5)}
    average = (raw["x"] + raw["y"] + 4 * raw["r"]) / 6
    assert model.average_idf == pytest.approx(average)
    assert model.idf["y"] == 0.0 and model.idf["x"] == pytest.approx(0.25 * average) and model.idf["x"] > 0
    scores = ref.bm25_okapi_scores(corpus, ["y"])
    assert torch.equal(scores, torch.zeros(4, dtype=torch.float64))
    assert (ref.bm25_okapi_scores(corpus, ["x"])[:3] > 0).all()
    # One document: every idf is ln(0.5 / 1.5) < 0, the average too, and so is the replacement and the score.
    single = ref.bm25_okapi([["p", "q"]])
    assert single.idf["p"] == pytest.approx(0.25 * math.log(0.5 / 1.5))
    assert ref.bm25_okapi_scores([["p", "q"]], ["p"]).item() < 0


def test_bm25_variant_idf_and_the_notes_table():
    N, ns = 1000, [1, 10, 100, 500, 600, 900, 1000]
    robertson, lucene = ref.bm25_variant_idf(N, ns, "robertson"), ref.bm25_variant_idf(N, ns, "lucene")
    for n, r, l in zip(ns, robertson.tolist(), lucene.tolist()):
        assert r == pytest.approx(math.log((N - n + 0.5) / (n + 0.5)), abs=1e-14)
        assert l == pytest.approx(math.log(1 + (N - n + 0.5) / (n + 0.5)), abs=1e-14) and l > 0
    torch.testing.assert_close(lucene, torch.nn.functional.softplus(robertson))  # ln(1 + e^r)
    assert robertson[3] == 0 and ref.bm25_variant_idf(N, 10, "robertson") == -ref.bm25_variant_idf(N, 990, "robertson")
    table = {"robertson": [6.5018, 4.5468, 2.1928, 0.0, -0.4050, -2.1928, -7.6014],
             "lucene": [6.5033, 4.5574, 2.2986, 0.6931, 0.5110, 0.1058, 0.0005]}
    torch.testing.assert_close(robertson, torch.tensor(table["robertson"], dtype=torch.float64), atol=5e-5, rtol=0)
    torch.testing.assert_close(lucene, torch.tensor(table["lucene"], dtype=torch.float64), atol=5e-5, rtol=0)
    with pytest.raises(ValueError):
        ref.bm25_variant_idf(N, 1, "atire")
    # rank_bm25 on the notes' synthetic corpora: term t<n> in the first n of 1000 documents, with no other word
    # (7 terms) or with one more word of its own in each document (1007 terms).
    for hapax, floor in ((0, 0.1086), (1000, 1.6149)):
        docs = [[f"t{n}" for n in ns if d < n] + ([f"h{d}"] if d < hapax else []) for d in range(N)]
        idf = ref.bm25_okapi(docs).idf
        got = [idf[f"t{n}"] for n in ns]
        assert got[:4] == pytest.approx(table["robertson"][:3] + [0.0], abs=5e-5)
        assert got[4:] == pytest.approx([floor] * 3, abs=5e-5)


# ---------------------------------------------------------------- exact search and faiss
def integer_data(N: int, Q: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer coordinates in [-100, 100]: every score is an integer below 2^24, exact in float32 in every faiss
    code path, so faiss and the float64 reference must agree exactly where there is no tie."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(-100, 101, (N, d), generator=g).float(), torch.randint(-100, 101, (Q, d), generator=g).float())


def tie_free(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The queries whose k + 1 best exact scores are all distinct (no tie inside the top k nor at its boundary)."""
    best = scores[:, :k + 1]
    return (best[:, 1:] != best[:, :-1]).all(-1)


@pytest.mark.parametrize("metric", ["ip", "l2"])
@pytest.mark.parametrize("N, Q", [(160, 6), (160, 8000), (12000, 1)],
                         ids=["sequential", "blas (Q d >= 128000)", "database-parallel (1 query, N >= 10000)"])
def test_faiss_flat_equals_exact_search_without_ties(metric, N, Q):
    d = 16
    x, q = integer_data(N, Q, d, seed=N + Q)
    for k in (1, 5, 120 if N < 1000 else 5):  # k = 1: Top1 handler; k < 100: heap; k >= 100: reservoir
        scores, ids = ref.faiss_flat_search(x, q, k, metric)  # all Q queries: Q decides faiss's code path
        assert scores.dtype == torch.float32 and ids.dtype == torch.int64 and ids.shape == (Q, k)
        scores, ids = scores[:400], ids[:400]
        want_scores, want_ids = ref.exact_search(x, q[:400], k + 1, metric)
        keep = tie_free(want_scores, k)
        assert keep.float().mean() > 0.3 or Q == 1
        torch.testing.assert_close(scores[keep].double(), want_scores[keep, :k], atol=0, rtol=0)
        assert torch.equal(ids[keep], want_ids[keep, :k])


def test_exact_search_conventions():
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 0.0], [3.0, 3.0]])
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    s, i = ref.exact_search(x, q, 4, "ip")
    assert s.dtype == torch.float64 and i.dtype == torch.int64
    assert i.tolist() == [[3, 0, 2, 1], [3, 1, 0, 2]] and s.tolist() == [[3, 1, 1, 0], [3, 2, 0, 0]]
    s, i = ref.exact_search(x, q, 3, "l2")  # squared distances, ties in increasing id
    assert i.tolist() == [[0, 2, 1], [1, 0, 2]] and s.tolist() == [[0, 0, 5], [1, 2, 2]]
    d2 = ((q[:, None] - x[None]) ** 2).sum(-1).double()
    torch.testing.assert_close(s, torch.sort(d2, stable=True).values[:, :3], atol=0, rtol=0)
    # Chunking does not change anything.
    x, q = integer_data(50, 9, 4, seed=0)
    for metric in ("ip", "l2"):
        full = ref.exact_search(x, q, 7, metric)
        small = ref.exact_search(x, q, 7, metric, chunk=1)
        assert torch.equal(full[0], small[0]) and torch.equal(full[1], small[1])


def duplicated(N: int, d: int, group: list[int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random integer vectors, and at the ids of ``group`` copies of one vector of all 5s; query: all 1s. The group
    is the top of "ip" (5 d, above any other vector's sum of at most 3 d) and of "l2" once the query is moved
    onto the group's vector."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-3, 4, (N, d), generator=g).float()
    x[group] = 5.0
    return x, torch.ones(1, d)


@pytest.mark.parametrize("Q", [1, 16000], ids=["sequential", "blas"])
def test_faiss_tie_orders(Q):
    """Duplicated vectors: IndexFlatL2 returns the tied ids lowest first, and keeps the lowest ones when k cuts
    the group (as exact_search); IndexFlatIP returns the same ids when k covers the group, but highest first."""
    N, d, group = 64, 8, [3, 17, 40, 41, 58]
    x, q = duplicated(N, d, group, seed=1)
    q = q.expand(Q, d)
    for k in (3, 5, 8):
        covered = min(k, len(group))
        l2, l2_ids = ref.faiss_flat_search(x, 5 * q, k, "l2")
        _, want_ids = ref.exact_search(x, 5 * q[:1], k, "l2")
        assert (l2[:, :covered] == 0).all() and (l2_ids == want_ids).all()
        assert want_ids[0, :covered].tolist() == group[:covered]
        ip, ip_ids = ref.faiss_flat_search(x, q, k, "ip")
        assert (ip[:, :covered] == 5 * d).all()
        # highest id first; when k cuts the group (nothing better follows it), its k lowest ids
        assert (ip_ids[:, :covered] == torch.tensor(group[:covered][::-1])).all()
        assert (ip[:, covered:] < 5 * d).all()


def test_faiss_inner_product_keeps_other_ids_at_a_cut_tie():
    """When k cuts a tie group that a better vector follows, IndexFlatIP's min-heap evicts the tied entry with
    the LOWEST id (its top by ``CMin::cmp2``): x = 1, 1, 1, 2 and k = 2 give ids [3, 1], where the lower-id rule
    gives [3, 0]. IndexFlatL2's max-heap evicts the highest id, which is the lower-id rule."""
    x = torch.tensor([[1.0], [1.0], [1.0], [2.0]])
    assert ref.faiss_flat_search(x, torch.ones(1, 1), 2, "ip")[1].tolist() == [[3, 1]]
    assert ref.exact_search(x, torch.ones(1, 1), 2, "ip")[1].tolist() == [[3, 0]]
    y = torch.tensor([[1.0], [1.0], [1.0], [0.0]])  # the same with distances 1, 1, 1, 0 from the query 0
    assert ref.faiss_flat_search(y, torch.zeros(1, 1), 2, "l2")[1].tolist() == [[3, 0]]
    assert ref.exact_search(y, torch.zeros(1, 1), 2, "l2")[1].tolist() == [[3, 0]]


def test_faiss_database_parallel_path_breaks_the_lower_id_rule():
    """One query, N >= 10000 and at least 2 OpenMP threads: faiss splits the database among the threads and merges
    their heaps in heap order. A tie group at distance 0 with id 5 in the first half and 10000-10002 in the second
    gives [5, 10001] for k = 2 with IndexFlatL2; one thread (the sequential path) gives [5, 10000]."""
    N = 20000
    x = torch.arange(1, N + 1, dtype=torch.float32)[:, None] * 10
    x[[5, 10000, 10001, 10002]] = 0.0
    before = faiss.omp_get_max_threads()
    try:
        faiss.omp_set_num_threads(1)
        assert ref.faiss_flat_search(x, torch.zeros(1, 1), 2, "l2")[1].tolist() == [[5, 10000]]
        faiss.omp_set_num_threads(2)
        assert ref.faiss_flat_search(x, torch.zeros(1, 1), 2, "l2")[1].tolist() == [[5, 10001]]
    finally:
        faiss.omp_set_num_threads(before)
    assert ref.exact_search(x, torch.zeros(1, 1), 2, "l2")[1].tolist() == [[5, 10000]]


# ---------------------------------------------------------------- all-MiniLM-L6-v2
LONG = " ".join(f"retrieval{i % 7} augmented models number {i}" for i in range(80))  # far more than 256 pieces


def direct_minilm(texts: list[str]) -> torch.Tensor:
    """transformers' BertModel in float64 with the package's weights, on Lab 1b's tokenizer (the package's
    tokenizer.json without truncation or padding) cut to [CLS] + 254 pieces + [SEP]; mean over the tokens; L2
    normalised. One text at a time, so no padding at all."""
    from safetensors.torch import load_file

    from labkit.data import minilm_files

    model = ref.hf("bert", "BertModel")(ref.bert_config(ref.minilm_config())).double().eval()
    model.load_state_dict(load_file(minilm_files()["weights"]), strict=False)
    out = []
    for text in texts:
        ids = ref.wordpiece().encode(text).ids
        ids = ids[:255] + ids[-1:] if len(ids) > 256 else ids
        with torch.no_grad():
            h = model(torch.tensor([ids])).last_hidden_state[0]
        out.append(torch.nn.functional.normalize(h.mean(0), dim=0))
    return torch.stack(out)


def test_minilm_embeddings_equal_a_direct_computation_and_truncate_at_256():
    from tokenizers import Tokenizer

    from labkit.data import minilm_files

    texts = ["The capital of Veloria is Quintar.", "Dense retrieval with dual encoders.", LONG, "a"]
    got = ref.minilm_embeddings(texts)  # one batch: the short texts are padded to 256
    assert got.dtype == torch.float32 and got.shape == (4, 384)
    torch.testing.assert_close(got.norm(dim=-1), torch.ones(4), atol=1e-6, rtol=0)
    torch.testing.assert_close(got.double(), direct_minilm(texts), atol=1e-5, rtol=0)
    torch.testing.assert_close(ref.minilm_embeddings(texts[:1]), got[:1], atol=1e-6, rtol=0)  # alone = batched
    # Token counts: Lab 1b's tokenizer does not truncate, sentence-transformers cuts at 256, the package's
    # tokenizer.json alone cuts at 128 and pads everything to 128.
    n_pieces = len(ref.wordpiece().encode(LONG).ids)
    model = ref.minilm_sentence_transformer()
    assert n_pieces > 300 and model.max_seq_length == 256
    assert len(model.tokenizer([LONG], truncation=True)["input_ids"][0]) == 256
    raw = Tokenizer.from_file(str(minilm_files()["tokenizer"]))
    assert len(raw.encode(LONG).ids) == 128 and len(raw.encode("a").ids) == 128
    # The cut matters: 128 or 300 pieces give other embeddings.
    ids = ref.wordpiece().encode(LONG).ids
    at_128 = ref.wordpiece().decode(ids[1:127])
    assert (ref.minilm_embeddings([at_128])[0] - got[2]).abs().max() > 1e-3


# ---------------------------------------------------------------- in-batch negatives
def test_in_batch_negatives_by_hand():
    g = torch.Generator().manual_seed(0)
    B, P, d, t = 4, 6, 5, 0.07
    q, p = torch.randn(B, d, generator=g), torch.randn(P, d, generator=g)  # rows 4, 5 of p: hard negatives
    got = ref.in_batch_negatives_reference(q, p, t)
    assert got.dtype == torch.float64 and got.shape == ()
    s = q.double() @ p.double().T / t
    want = sum(torch.logsumexp(s[i], 0) - s[i, i] for i in range(B)) / B
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    assert ref.in_batch_negatives_reference(q, p) != pytest.approx(got.item())  # the temperature matters
    # The gradient pushes each query towards its positive: one small step raises the diagonal scores.
    q64 = q.double().requires_grad_()
    ref.in_batch_negatives_reference(q64, p, t).backward()
    stepped = (q.double() - 1e-3 * q64.grad) @ p.double().T
    assert (stepped.diagonal() > (q.double() @ p.double().T).diagonal()).all()
    # Two queries, orthonormal passages, t = 1: -log(e / (e + 1)).
    eye = torch.eye(2)
    assert ref.in_batch_negatives_reference(eye, eye, 1.0).item() == pytest.approx(math.log(1 + math.exp(-1)))


# ---------------------------------------------------------------- kNN-LM
def test_knn_lm_by_hand():
    V = 6
    lm = torch.log_softmax(torch.tensor([0.5, -1.0, 2.0, 0.0, 1.0, -0.5], dtype=torch.float64), 0)
    distances, tokens = torch.tensor([1.0, 2.0, 1.0]), torch.tensor([3, 5, 3])
    w = torch.tensor([2 * math.exp(-1), math.exp(-2)], dtype=torch.float64)
    p_knn = torch.zeros(V, dtype=torch.float64)
    p_knn[[3, 5]] = w / w.sum()
    for lam in (0.0, 0.25, 1.0):
        got = ref.knn_lm_reference(lm, distances, tokens, lam)
        assert got.dtype == torch.float64 and got.shape == (V,)
        assert got.exp().sum().item() == pytest.approx(1.0, abs=1e-12)
        torch.testing.assert_close(got, torch.log((1 - lam) * lm.double().exp() + lam * p_knn), atol=1e-12, rtol=0)
    torch.testing.assert_close(ref.knn_lm_reference(lm, distances, tokens, 0.0), lm, atol=1e-15, rtol=0)
    assert ref.knn_lm_reference(lm.float(), distances, tokens, 0.3).dtype == torch.float64
    at_one = ref.knn_lm_reference(lm, distances, tokens, 1.0)
    assert torch.isinf(at_one[[0, 1, 2, 4]]).all() and torch.isfinite(at_one[[3, 5]]).all()
    # The paper's log-space mixture gives the same where finite.
    lam = 0.25
    log_space = torch.logsumexp(torch.stack([lm.double() + math.log(1 - lam), p_knn.log() + math.log(lam)]), 0)
    torch.testing.assert_close(ref.knn_lm_reference(lm, distances, tokens, lam), log_space, atol=1e-12, rtol=0)
    # The temperature divides the distances.
    hot = ref.knn_lm_reference(lm, distances, tokens, 1.0, temperature=2.0).exp()
    assert hot[3].item() == pytest.approx(2 * math.exp(-0.5) / (2 * math.exp(-0.5) + math.exp(-1)))
