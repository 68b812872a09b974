"""Checks of Lab 7: retrieval-augmented models.

References: rank_bm25's ``BM25Okapi`` itself (0.2.2), on the same tokens; faiss' ``IndexFlatIP`` and ``IndexFlatL2``
on integer-valued vectors whose rankings have no ties (every score is then exact in float32) and, for the tie rule
(equal scores to the lower id, a tie group cut by k keeping its lowest ids), an elementwise float64 search with a
stable sort (``references.exact_search``), faiss' own order of ties depending on the index and the code path
(``tests/lab07_reference_notes.md``); sentence-transformers' all-MiniLM-L6-v2 (``SentenceTransformer.encode``);
DPR's loss as ``F.cross_entropy(q @ p.T / t, arange(B))`` in float64, its value and, by autograd, its gradient;
RETRO's chunked cross-attention as a loop over positions with F.scaled_dot_product_attention in float64 on the
check's weights, and by its properties (causality chunk by chunk, the first m - 1 positions untouched); kNN-LM's
mixture in probability space in float64 (``references.knn_lm_reference``), and the closed form log(1 - lambda) +
log p_LM where that underflows. The memory of a search is judged by the bytes of the tensors it creates
(``PeakTensorMemory``), against one (Q, N) float32 matrix.

Where the lab asks students to write what a package does (rank_bm25, faiss, sentence-transformers), the collect
watches, with a profile hook, for any call into that package's Python code while the student's code runs; the
verify fails on it before any comparison.
"""
from __future__ import annotations

import functools
import math
from collections import Counter

import torch
import torch.nn.functional as F

from labkit.checks import (ATTENTION_BUILTINS, as_tensor, attention_weights, close, compare, define, first_match,
                           forbidden_calls, raised, references as ref, seeded_generator)
from labkit.checks.kernel import PackageCalls, PeakTensorMemory, attempt, build, load_state, run_cases
from labkit.data import minilm_files


def randint(g: torch.Generator, low: int, high: int) -> int:
    """A Python int in [low, high]."""
    return int(torch.randint(low, high + 1, (1,), generator=g))


# ---------------------------------------------------------------- 1. BM25, as rank_bm25's BM25Okapi scores it
FILLER = ("king queen crown sword castle ghost storm night blood honour letter ring grave poison ship forest wedding "
          "battle prayer dream witch heath dagger banquet tomb island tempest moor handkerchief skull fool daughter "
          "throne army garden bell mask cloak lamp river").split()


def bm25_corpus(g: torch.Generator, N: int = 12) -> list[list[str]]:
    """N documents of 1 to 17 tokens, with a term in more than half of them ("the", 9 of 12: a negative idf), one in
    exactly half ("and": idf 0), one in a few ("cat", 5: an idf below epsilon * average_idf), repeats within
    documents, and rare words from a pool of 40."""
    docs = [[FILLER[int(i)] for i in torch.randint(len(FILLER), (randint(g, 1, 8),), generator=g)] for _ in range(N)]
    for word, n, most in (("the", 3 * N // 4, 3), ("and", N // 2, 2), ("cat", N // 2 - 1, 3), ("dog", 2, 1)):
        for d in torch.randperm(N, generator=g)[:n].tolist():
            docs[d] += [word] * randint(g, 1, most)
    return [[doc[int(i)] for i in torch.randperm(len(doc), generator=g)] for doc in docs]


def bm25_case(corpus: list[list[str]], queries: list[list[str]], k1: float = 1.5, b: float = 0.75,
              epsilon: float = 0.25) -> dict:
    return {"corpus": corpus, "params": {"k1": k1, "b": b, "epsilon": epsilon}, "queries": queries,
            "vocab": sorted({t for doc in corpus for t in doc})}


def bm25_inputs(seed: int, params=((1.5, 0.75, 0.25), (1.2, 0.3, 0.6), (2.0, 1.0, 0.1)), N: int = 12) -> dict:
    """A fixed corpus with the default parameters, then the seed's corpora with others, the first with an empty
    document (its length 0 counts in avgdl). The queries hold a term in more than half the documents, one in exactly
    half, a repeated term and a term absent from the corpus."""
    g = seeded_generator(seed)
    cases = []
    for i, (k1, b, epsilon) in enumerate(params):
        corpus = bm25_corpus(seeded_generator(7) if i == 0 else g, N)
        if i == 1:
            corpus.insert(N // 2, [])  # b = 0.3 < 1: its length normalisation k1 (1 - b) is not 0
        rare = next(w for w in FILLER if sum(w in doc for doc in corpus) == 1) if i == 0 else (
            FILLER[randint(g, 0, len(FILLER) - 1)])
        queries = [["the", "cat", "cat", "unicorn"], ["and", "cat", rare], ["dog", "the", "dog", "and", "and"]]
        cases.append(bm25_case(corpus, queries, k1, b, epsilon))
    return {"cases": cases, "forbidden": ["rank_bm25"]}


def bm25_collect(inputs: dict, BM25) -> dict:
    """Each corpus's scores for its queries, the idf of its vocabulary and average_idf; and the packages of
    ``inputs["forbidden"]`` that the student's code called into (a profile hook sees every call of Python code)."""
    with PackageCalls(inputs["forbidden"]) as calls:
        out = []
        for case in inputs["cases"]:
            bm25 = attempt(BM25, [list(doc) for doc in case["corpus"]], **case["params"])
            if isinstance(bm25, dict):
                out.append({"scores": bm25, "idf": bm25, "average_idf": bm25})
                continue
            out.append({"scores": [attempt(bm25.scores, list(query)) for query in case["queries"]],
                        "idf": attempt(lambda: [float(bm25.idf[t]) for t in case["vocab"]]),
                        "average_idf": attempt(lambda: float(bm25.average_idf))})
    return {"cases": out, "called": calls.called}


def bm25_variant(corpus: list[list[str]], query: list[str], k1: float, b: float, epsilon: float,
                 idf: str = "robertson", floor: str = "negative", average: str = "raw", length: str = "tokens",
                 repeats: bool = True, saturation: bool = True, avgdl: str = "all") -> torch.Tensor:
    """BM25 scores, float64, in rank_bm25's way by default and in wrong ones for diagnoses: ``idf`` "lucene"
    (ln(1 + ...), never floored); ``floor`` "negative" (rank_bm25: idf < 0 replaced by epsilon * average_idf),
    "nonpositive" (idf <= 0 replaced), "max" (max(idf, epsilon * average_idf)), "zero" (negative idf set to 0) or
    "none"; ``average`` of the raw idf, "clamped" at 0 or over the "positive" ones; ``length`` "distinct" (|D| the
    number of distinct terms); ``repeats=False`` (a repeated query token counted once); ``saturation=False`` (no
    k1 + 1 in the numerator); ``avgdl`` "nonempty" (the mean length of the non-empty documents only)."""
    N, counts = len(corpus), [Counter(doc) for doc in corpus]
    df = Counter(t for c in counts for t in c)
    raw = {t: float(ref.bm25_variant_idf(N, n, "lucene" if idf == "lucene" else "robertson")) for t, n in df.items()}
    pool = {"raw": list(raw.values()), "clamped": [max(v, 0.0) for v in raw.values()],
            "positive": [v for v in raw.values() if v > 0] or [0.0]}[average]
    low = epsilon * sum(pool) / len(pool)
    weight = {"negative": lambda v: low if v < 0 else v, "nonpositive": lambda v: low if v <= 0 else v,
              "max": lambda v: max(v, low), "zero": lambda v: max(v, 0.0), "none": lambda v: v}[floor]
    lengths = torch.tensor([len(doc) if length == "tokens" else len(set(doc)) for doc in corpus], dtype=torch.float64)
    mean = lengths[lengths > 0].mean() if avgdl == "nonempty" else lengths.mean()
    scores = torch.zeros(N, dtype=torch.float64)
    for t in query if repeats else list(dict.fromkeys(query)):
        if t in raw:
            f = torch.tensor([c[t] for c in counts], dtype=torch.float64)
            scores += weight(raw[t]) * f * (k1 + 1 if saturation else 1) / (f + k1 * (1 - b + b * lengths / mean))
    return scores


def bm25_suspects(corpus: list[list[str]], query: list[str], k1: float, b: float, epsilon: float) -> dict:
    v = functools.partial(bm25_variant, corpus, query)
    suspects = {
        "the length normalisation is missing (as if b = 0): the denominator is f + k1 (1 - b + b |D| / avgdl)":
        lambda: v(k1, 0.0, epsilon),
        "the b argument is ignored: use the b passed to __init__": lambda: v(k1, 0.75, epsilon),
        "the k1 argument is ignored: use the k1 passed to __init__": lambda: v(1.5, b, epsilon),
        "the epsilon argument is ignored: use the epsilon passed to __init__": lambda: v(k1, b, 0.25),
        "|D| counts distinct terms: it is the document's number of tokens, repeats included, and avgdl their mean":
        lambda: v(k1, b, epsilon, length="distinct"),
        "a repeated query token counts once: rank_bm25 sums over the query's tokens, each occurrence again":
        lambda: v(k1, b, epsilon, repeats=False),
        "the numerator lacks its factor (k1 + 1): idf * f (k1 + 1) / (f + k1 (1 - b + b |D| / avgdl))":
        lambda: v(k1, b, epsilon, saturation=False),
        "this is Lucene's idf, ln(1 + (N - n + 0.5) / (n + 0.5)): rank_bm25's has no 1 +, ln((N - n + 0.5) / "
        "(n + 0.5)), and replaces the negative values": lambda: v(k1, b, epsilon, idf="lucene", floor="none"),
        "the negative idf are kept: rank_bm25 replaces every idf < 0 (a term in more than half the documents) by "
        "epsilon * average_idf": lambda: v(k1, b, epsilon, floor="none"),
        "the negative idf are set to 0: rank_bm25 replaces them by epsilon * average_idf":
        lambda: v(k1, b, epsilon, floor="zero"),
        "the floor is applied as max(idf, epsilon * average_idf): rank_bm25 replaces only the negative idf, and a "
        "small positive idf (or 0) stays as it is": lambda: v(k1, b, epsilon, floor="max"),
        "an idf of exactly 0 (a term in exactly half the documents) is replaced too: only idf < 0 are":
        lambda: v(k1, b, epsilon, floor="nonpositive"),
        "average_idf is taken over the idf clamped at 0: it is the mean of the raw idf of the whole vocabulary, the "
        "negative ones included, before any replacement": lambda: v(k1, b, epsilon, average="clamped"),
        "average_idf is the mean of the positive idf only: it is the mean of the raw idf of the whole vocabulary, "
        "the negative ones included": lambda: v(k1, b, epsilon, average="positive")}
    if b == 0.75:
        del suspects["the b argument is ignored: use the b passed to __init__"]
    if [] in corpus and b > 0:
        suspects["avgdl is the mean length of the non-empty documents only: it is the mean over every document, an "
                 "empty one (length 0) included"] = lambda: v(k1, b, epsilon, avgdl="nonempty")
    return suspects


BM25_HINT = ("score(D) = sum over the query's tokens (repeats included) of idf * f (k1 + 1) / (f + k1 (1 - b + b |D| "
             "/ avgdl)); idf = ln((N - n + 0.5) / (n + 0.5)), each negative one replaced by epsilon * average_idf, "
             "the mean of the raw idf over the vocabulary")


@define("07.bm25", bm25_inputs, bm25_collect)
def bm25(inputs: dict, out: dict) -> str:
    forbidden_calls("BM25", out)
    for case, got in zip(inputs["cases"], out["cases"], strict=True):
        corpus, (k1, b, epsilon) = case["corpus"], (case["params"][name] for name in ("k1", "b", "epsilon"))
        okapi = ref.bm25_okapi(corpus, k1, b, epsilon)
        assert close(bm25_variant(corpus, case["queries"][0], k1, b, epsilon),  # the suspects' baseline
                     ref.bm25_okapi_scores(corpus, case["queries"][0], k1, b, epsilon), 1e-12)
        name = f"BM25(a corpus of {len(corpus)} documents, k1={k1}, b={b}, epsilon={epsilon})"
        scores = got["scores"] if isinstance(got["scores"], list) else [got["scores"]] * len(case["queries"])
        for query, found in zip(case["queries"], scores, strict=True):
            compare(f"{name}.scores({query}) (vs rank_bm25's BM25Okapi.get_scores)", found,
                    ref.bm25_okapi_scores(corpus, query, k1, b, epsilon), 1e-5, BM25_HINT,
                    bm25_suspects(corpus, query, k1, b, epsilon))
        idf = got["idf"] if raised(got["idf"]) else torch.tensor(got["idf"], dtype=torch.float64)
        compare(f"{name}: idf[t] for the terms {case['vocab']} (vs BM25Okapi.idf)", idf,
                torch.tensor([okapi.idf[t] for t in case["vocab"]], dtype=torch.float64), 1e-5,
                "self.idf is a dict from each term of the corpus to its idf, the negative ones replaced")
        compare(f"{name}: average_idf (vs BM25Okapi.average_idf)", got["average_idf"], float(okapi.average_idf), 1e-5,
                "self.average_idf is the mean of the raw idf over the corpus' vocabulary, negative ones included")
    return ("equals rank_bm25's BM25Okapi (scores, idf and average_idf) with terms in more than half and in exactly "
            "half the documents, repeated and absent query terms, and other k1, b and epsilon")


# ---------------------------------------------------------------- 2. exact search, in chunks
def integer_vectors(g: torch.Generator, n: int, d: int, high: int) -> torch.Tensor:
    """(n, d) float32 with integer coordinates in [-high, high]: every inner product and squared distance is an
    integer below 2^24, exact in float32 whatever the order of the sums."""
    return torch.randint(-high, high + 1, (n, d), generator=g).float()


def tie_free_queries(g: torch.Generator, x: torch.Tensor, n: int, k: int, high: int) -> torch.Tensor:
    """n queries whose k + 1 best scores are all different, for both metrics: faiss and the tie rule agree there."""
    kept = []
    while len(kept) < n:
        q = integer_vectors(g, 4 * n, x.shape[1], high)
        ok = torch.ones(len(q), dtype=torch.bool)
        for metric in ("ip", "l2"):
            s = ref.exact_search(x, q, min(k + 1, len(x)), metric)[0]
            ok &= (s[:, 1:] != s[:, :-1]).all(1)
        kept += list(q[ok])
    return torch.stack(kept[:n])


DENSE_CASES = [  # (N, d, Q, metric, chunk or None for the default 4096, ks)
    (203, 8, 9, "ip", 32, (1, 5, 40)), (203, 8, 9, "l2", 32, (1, 5, 40)),
    (100, 8, 6, "ip", 7, (10, 1)), (100, 8, 6, "l2", 7, (10,)), (150, 8, 5, "l2", None, (3,))]
TIE_CASES = [(23, 5, "ip", 3), (23, 5, "l2", 3), (40, 6, "l2", 11), (40, 6, "ip", 1)]  # (N, chunk, metric, n_distinct)


def dense_inputs(seed: int, cases=DENSE_CASES, ties=TIE_CASES, memory=True) -> dict:
    """Integer-valued vectors without ties, for faiss; vectors with many exact duplicates and ties spread over the
    chunks, for the tie rule; and a search of 64 queries over 16384 rows in chunks of 512, for each metric, whose memory
    is measured."""
    g, out = seeded_generator(seed), {"cases": [], "forbidden": ["faiss"]}
    for N, d, Q, metric, chunk, ks in cases:
        x = integer_vectors(g, N, d, 50)
        out["cases"].append({"x": x, "q": tie_free_queries(g, x, Q, max(ks), 50), "ks": list(ks),
                             "init": {"metric": metric} | ({"chunk": chunk} if chunk else {}), "ties": False})
    for N, chunk, metric, distinct in ties:
        base = integer_vectors(g, distinct, 4, 2)
        x = base[torch.randint(distinct, (N,), generator=g)]  # each row a copy of one of a few vectors
        out["cases"].append({"x": x, "q": integer_vectors(g, 6, 4, 2), "ks": [4, 1, chunk + 2, N],
                             "init": {"metric": metric, "chunk": chunk}, "ties": True})
    if memory:
        x, q = integer_vectors(g, 16384, 4, 50), integer_vectors(g, 64, 4, 50)
        out["memory"] = [{"x": x, "q": q, "k": 10, "init": {"metric": metric, "chunk": 512}} for metric in ("l2", "ip")]
    return out


def dense_collect(inputs: dict, DenseIndex) -> dict:
    """Each index's search for each k; on each memory case (one per metric), its result and the peak and largest
    bytes of the tensors the search creates; and the packages of ``inputs["forbidden"]`` that the student's code
    called into."""
    with PackageCalls(inputs["forbidden"]) as calls:
        out = {"results": []}
        for case in inputs["cases"]:
            index = attempt(DenseIndex, case["x"].clone(), **case["init"])
            out["results"].append([index if isinstance(index, dict) else attempt(index.search, case["q"].clone(), k)
                                   for k in case["ks"]])
        if "memory" in inputs:
            out["memory"] = []
            for case in inputs["memory"]:
                index = attempt(DenseIndex, case["x"].clone(), **case["init"])
                with torch.no_grad(), PeakTensorMemory() as memory:
                    found = index if isinstance(index, dict) else attempt(index.search, case["q"], case["k"])
                out["memory"].append({"found": found, "peak": memory.peak, "largest": memory.largest})
    return out | {"called": calls.called}


def chunked_search(x: torch.Tensor, q: torch.Tensor, k: int, metric: str, chunk: int,
                   merge: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Wrong merges of a chunked search, for diagnoses, scored as exact_search does: ``merge`` "new_first" (each
    chunk's candidates before the best so far, then a stable sort: ties to the later chunk), "last" (only the last
    chunk's best are kept), "first" (only the first chunk is searched) or "local" (ids counted within the chunk)."""
    starts = list(range(0, len(x), chunk))
    best_s, best_i = torch.empty(len(q), 0, dtype=torch.float64), torch.empty(len(q), 0, dtype=torch.long)
    for start in starts[:1] if merge == "first" else starts:
        s, i = ref.exact_search(x[start:start + chunk], q, min(k, len(x[start:start + chunk])), metric)
        i = i if merge == "local" else i + start
        if merge == "last":
            best_s, best_i = s, i
            continue
        s, i = (torch.cat([s, best_s], 1), torch.cat([i, best_i], 1)) if merge == "new_first" else (
            torch.cat([best_s, s], 1), torch.cat([best_i, i], 1))
        order = torch.sort(s if metric == "l2" else -s, dim=1, stable=True).indices[:, :k]
        best_s, best_i = s.gather(1, order), i.gather(1, order)
    return best_s, best_i


def higher_id_ties(x: torch.Tensor, q: torch.Tensor, k: int, metric: str) -> torch.Tensor:
    """The ids of an exact search whose ties go to the higher id."""
    return len(x) - 1 - ref.exact_search(x.flip(0), q, k, metric)[1]


def dense_call(case: dict) -> str:
    init = case["init"]
    chunk = f", chunk={init['chunk']}" if "chunk" in init else ""
    return f"DenseIndex(embeddings {tuple(case['x'].shape)}, metric={init['metric']!r}{chunk})"


TIE_RULE = ("equal scores go to the lower id, and a tie group cut by k keeps its lowest ids: keep the best so far "
            "(lower ids) in front of each new chunk's candidates and sort them with a stable sort (torch.sort(..., "
            "stable=True)); torch.topk promises no order among equal values")


def check_search(what: str, got, x: torch.Tensor, q: torch.Tensor, k: int, metric: str, chunk: int,
                 want: tuple[torch.Tensor, torch.Tensor], by: str, atol: float) -> None:
    """The scores, then the ids, of one search against ``want``, with the wrong versions as suspects."""
    if raised(got):
        raise AssertionError(f"{what} raised {raised(got)}")
    if not isinstance(got, (tuple, list)) or len(got) != 2:
        raise AssertionError(f"{what}: returned a {type(got).__name__}; it must return (scores, ids)")
    if not all(isinstance(t, torch.Tensor) for t in got):
        raise AssertionError(f"{what}: returned ({type(got[0]).__name__}, {type(got[1]).__name__}); the scores and "
                             "ids must be torch tensors (torch.from_numpy converts a NumPy array)")
    other = "l2" if metric == "ip" else "ip"
    compare(f"{what}: the scores (vs {by})", got[0], want[0], atol,
            "'ip': the k largest inner products q . x; 'l2': the k smallest squared L2 distances |q - x|^2; best "
            "first", {
                "these are the ids: search returns (scores, ids), the scores first": want[1],
                "the scores are square roots: 'l2' returns squared L2 distances, as faiss' IndexFlatL2 does":
                lambda: want[0].clamp_min(0).sqrt() if metric == "l2" else None,
                f"the metric is ignored: these are {other!r} scores": lambda: ref.exact_search(x, q, k, other)[0],
                "the ranking is reversed: 'ip' ranks the largest inner products first, 'l2' the smallest distances":
                lambda: ref.exact_search(x, q, len(x), metric)[0].flip(1)[:, :k],
                "|q|^2 is missing from the squared distances: |q - x|^2 = |q|^2 - 2 q . x + |x|^2":
                lambda: want[0] - q.double().square().sum(1, keepdim=True) if metric == "l2" else None,
                "only the last chunk's best are kept: merge each chunk's candidates with the best so far":
                lambda: chunked_search(x, q, k, metric, chunk, "last")[0],
                "only the first chunk is searched: walk every chunk of the embeddings":
                lambda: chunked_search(x, q, k, metric, chunk, "first")[0]})
    if got[1].dtype != torch.long:
        raise AssertionError(f"{what}: the ids are {got[1].dtype}: ids must be int64 (torch.long), as faiss returns "
                             "them; they index the passages (values[ids]), which float ids cannot")
    compare(f"{what}: the ids (vs {by})", got[1], want[1], 0, TIE_RULE, {
        "the ids are counted within each chunk: add the chunk's first row, start, to them":
        lambda: chunked_search(x, q, k, metric, chunk, "local")[1],
        "equal scores go to the higher id: they go to the lower id": lambda: higher_id_ties(x, q, k, metric),
        "each chunk's candidates come before the best so far, so ties go to the later chunk: put the best so far "
        "(lower ids) first, then the chunk's candidates, and sort them with a stable sort":
        lambda: chunked_search(x, q, k, metric, chunk, "new_first")[1]})


@define("07.dense_index", dense_inputs, dense_collect)
def dense_index(inputs: dict, out: dict) -> str:
    forbidden_calls("DenseIndex", out)
    for case, results in zip(inputs["cases"], out["results"], strict=True):
        x, q, metric = case["x"], case["q"], case["init"]["metric"]
        chunk = case["init"].get("chunk", 4096)
        for k, got in zip(case["ks"], results, strict=True):
            what = f"{dense_call(case)}.search(queries {tuple(q.shape)}, k={k})"
            if case["ties"]:
                what += " on vectors with exact duplicates (ties)"
                want, by = ref.exact_search(x, q, k, metric), "the tie rule: an exact search and a stable sort"
            else:
                want, by = ref.faiss_flat_search(x, q, k, metric), f"faiss' IndexFlat{metric.upper()}"
            atol = 4 * torch.finfo(torch.float32).eps * float(want[0].abs().max())  # exact here: a float32 margin
            check_search(what, got, x, q, k, metric, chunk, want, by, atol)
    if "memory" in inputs:
        for case, got in zip(inputs["memory"], out["memory"], strict=True):
            x, q, k, metric = case["x"], case["q"], case["k"], case["init"]["metric"]
            what = f"{dense_call(case)}.search(queries {tuple(q.shape)}, k={k})"
            check_search(what, got["found"], x, q, k, metric, case["init"]["chunk"], ref.exact_search(x, q, k, metric),
                         "the tie rule: an exact search and a stable sort", 0.5)
            full = 4 * len(q) * len(x)  # one (Q, N) float32 matrix of scores
            if got["largest"] >= full / 2 or got["peak"] >= full:
                raise AssertionError(
                    f"{what}: the tensors it creates take {got['peak'] / 2**20:.1f} MiB at their peak, the largest "
                    f"{got['largest'] / 2**20:.1f} MiB, where one (Q, N) = {(len(q), len(x))} float32 matrix of "
                    f"scores takes {full / 2**20:.1f} MiB: score one chunk of chunk = {case['init']['chunk']} rows "
                    "at a time, keep the best k so far, and never hold the scores against every row, for either "
                    "metric")
        return ("equals faiss' IndexFlatIP and IndexFlatL2 (squared distances) without ties, with several chunks, "
                "k = 1 and k > chunk; ties go to the lower id, a cut tie group keeps its lowest ids; ids are int64; a "
                "search over 16384 rows never holds a (Q, N) matrix, 'ip' or 'l2'")
    return ("equals faiss' IndexFlatIP and IndexFlatL2 (squared distances) without ties, with several chunks, k = 1 "
            "and k > chunk; ties go to the lower id, a cut tie group keeps its lowest ids; ids are int64")


# ---------------------------------------------------------------- 3. sentence embeddings with Lab 1b's BERT
SHORT_TEXTS = ["a", "To be, or not to be, that is the question.", "Café crème: naïve résumé?"]


@functools.lru_cache(maxsize=1)
def whole_words() -> list[str]:
    """Words of MiniLM's vocabulary that are each one word piece."""
    return [w for w in minilm_files()["vocab"].read_text(encoding="utf-8").splitlines()[2000:12000]
            if w.isalpha() and w.isascii() and len(w) > 2]


def words(g: torch.Generator, n: int) -> str:
    """A text of n words of MiniLM's vocabulary, each a single word piece: n + 3 tokens with [CLS], "." and [SEP]."""
    vocab = whole_words()
    return " ".join(vocab[int(i)] for i in torch.randint(len(vocab), (n,), generator=g)).capitalize() + "."


def embed_inputs(seed: int, calls=None) -> dict:
    """Two calls: a medium text, one of 300 tokens (cut at 256) and short ones (padding) in one batch; then a text of
    600 tokens (beyond BERT's 512 positions) with the others, in batches of 2."""
    g = seeded_generator(seed)
    medium, long, longer = words(g, randint(g, 20, 40)), words(g, 300), words(g, 600)
    calls = calls or [{"texts": [medium, long, SHORT_TEXTS[0], SHORT_TEXTS[1]], "kwargs": {}},
                      {"texts": [SHORT_TEXTS[2], longer, medium, SHORT_TEXTS[0], long], "kwargs": {"batch_size": 2}}]
    return {"calls": calls, "forbidden": ["sentence_transformers"]}


def embed_collect(inputs: dict, embed) -> dict:
    """What embed returns for each call; and the packages of ``inputs["forbidden"]`` that it called into."""
    with PackageCalls(inputs["forbidden"]) as calls:
        out = [attempt(embed, list(call["texts"]), **call["kwargs"]) for call in inputs["calls"]]
    return {"outputs": out, "called": calls.called}


@functools.lru_cache(maxsize=1)
def minilm_bert():
    """transformers' BertModel with all-MiniLM-L6-v2's weights, in float32: the wrong versions are computed with it."""
    model = ref.hf("bert", "BertModel")(ref.bert_config(ref.minilm_config())).eval()
    model.load_state_dict(load_state("all-MiniLM-L6-v2"), strict=False)
    return model


@functools.lru_cache(maxsize=64)  # the same texts come back for each planted bug
def minilm_variant(texts: tuple[str, ...], cut: int | None = 256, keep_sep: bool = True, pooling: str = "mean",
                   mask: bool = True, normalise: bool = True) -> torch.Tensor:
    """Wrong versions of the embeddings, for diagnoses, all texts in one batch padded to the longest: ``cut`` at that
    many tokens (None: no cut), keeping [SEP] or not; ``pooling`` "mean" over the real tokens, "padded" (over every
    position), "cls" or "words" (without [CLS] and [SEP]); ``mask=False``: padding attended to."""
    ids = [ref.wordpiece().encode(text).ids for text in texts]
    ids = [i if cut is None or len(i) <= cut else i[:cut - 1] + i[-1:] if keep_sep else i[:cut] for i in ids]
    T = max(map(len, ids))
    real = (torch.arange(T) < torch.tensor([len(i) for i in ids])[:, None]).long()
    input_ids = torch.tensor([i + [0] * (T - len(i)) for i in ids])
    with torch.no_grad():
        hidden = minilm_bert()(input_ids, attention_mask=real if mask else torch.ones_like(real)).last_hidden_state
    w = {"mean": real, "padded": torch.ones_like(real), "cls": F.one_hot(torch.zeros(len(ids), dtype=torch.long), T),
         "words": real - F.one_hot(torch.zeros(len(ids), dtype=torch.long), T)
         - F.one_hot(torch.tensor([len(i) - 1 for i in ids]), T)}[pooling].double()
    v = (hidden.double() * w[..., None]).sum(1) / w.sum(1, keepdim=True).clamp_min(1)
    return F.normalize(v, dim=-1) if normalise else v


def length_order(texts: list[str]) -> list[int]:
    """The texts' indices by length once cut (stable), as the hint batches them: the rows never put back."""
    ids = [ref.wordpiece().encode(text).ids for text in texts]
    return sorted(range(len(texts)), key=lambda n: min(len(ids[n]), 256))


def embed_suspects(texts: list[str], want: torch.Tensor, batch_size: int) -> dict:
    one_batch, texts = batch_size >= len(texts), tuple(texts)  # the variants pad all texts together, as one batch
    return {
        "the texts are not cut: cut every text at MAX_TOKENS = 256 tokens, [CLS] and [SEP] included":
        lambda: minilm_variant(texts, cut=None) if one_batch else None,
        "the texts are cut at 128 tokens (tokenizer.json's truncation): all-MiniLM-L6-v2 cuts at max_seq_length = 256":
        lambda: minilm_variant(texts, cut=128),
        "the cut drops [SEP]: keep the first MAX_TOKENS - 1 ids and the last one, [SEP]":
        lambda: minilm_variant(texts, keep_sep=False),
        "this is the [CLS] vector: all-MiniLM-L6-v2 averages the token vectors (mean pooling)":
        lambda: minilm_variant(texts, pooling="cls"),
        "the mean includes the padding: average over the real tokens only (the attention mask's 1s)":
        lambda: minilm_variant(texts, pooling="padded") if one_batch else None,
        "the padding is attended to: pass the attention mask (1 on tokens, 0 on padding) to the encoder":
        lambda: minilm_variant(texts, mask=False) if one_batch else None,
        "[CLS] and [SEP] are left out of the mean: average over every real token, [CLS] and [SEP] included":
        lambda: minilm_variant(texts, pooling="words"),
        "the rows are in order of length: put each embedding back in its text's place":
        lambda: want[length_order(texts)]}


@define("07.embed", embed_inputs, embed_collect)
def embed(inputs: dict, out: dict) -> str:
    forbidden_calls("embed (its default path, sentence_transformers=False)", out,
                       "with Lab 1b's encoder and tokenizer (encoder, tokenizer = labkit.nn.load_minilm())")
    for call, got in zip(inputs["calls"], out["outputs"], strict=True):
        texts, batch_size = call["texts"], call["kwargs"].get("batch_size", 64)
        lengths = [len(ref.wordpiece().encode(text).ids) for text in texts]
        what = (f"embed({len(texts)} texts of {', '.join(map(str, lengths))} tokens"
                + (f", batch_size={batch_size})" if "batch_size" in call["kwargs"] else ")"))
        vectors = as_tensor(what, got, (len(texts), 384))
        norms = vectors.norm(dim=-1)
        compare(f"{what}: the norms of the rows", norms, torch.ones(len(texts), dtype=torch.float64), 1e-5,
                "divide each mean by its L2 norm (F.normalize): sentence-transformers' Normalize")
        want = ref.minilm_embeddings(texts)
        compare(f"{what} (vs sentence-transformers' all-MiniLM-L6-v2)", vectors, want, 1e-5,
                "MiniLM's token vectors averaged over the real tokens, L2-normalised; a text cut at 256 tokens, [CLS] "
                "and [SEP] included", embed_suspects(texts, want, batch_size))
    return ("equals sentence-transformers' all-MiniLM-L6-v2 within 1e-5, unit norms, on texts of 3 to 600 tokens "
            "(cut at 256) padded together, in one batch and in batches of 2")


# ---------------------------------------------------------------- 4. DPR's in-batch negatives
ALIGNED = "unit rows, q[0] = p[0]"  # q[0] . p[0] / t = 1 / t: at t = 0.01, exp(100) overflows float32
IN_BATCH_CASES = [(3, 3, 3, 0.5, "p = I"), (4, 4, 8, 1.0, ""), (6, 6, 16, 0.05, "unit rows"),
                  (5, 12, 8, 0.1, "unit rows"), (1, 4, 8, 1.0, ""),
                  (4, 4, 16, 0.01, ALIGNED)]  # (B, P, d, temperature, how)


def in_batch_inputs(seed: int, cases=IN_BATCH_CASES) -> dict:
    """Queries and passages, P >= B (rows B .. P - 1 are hard negatives); with p = I (B = P = d) the gradient with
    respect to q is that with respect to the scores; with ``ALIGNED`` unit rows and q[0] = p[0], a score of 1 / t."""
    g, out = seeded_generator(seed), []
    for B, P, d, t, how in cases:
        q, p = torch.randn(B, d, generator=g), torch.randn(P, d, generator=g)
        if how.startswith("unit rows"):
            q, p = F.normalize(q, dim=-1), F.normalize(p, dim=-1)
        if how == ALIGNED:
            p[0] = q[0]
        if how == "p = I":
            p = torch.eye(d)
        extra = f" (rows {B} to {P - 1} of p are hard negatives)" if P > B else ""
        out.append({"what": f"in_batch_negatives_loss(q {tuple(q.shape)}, p {tuple(p.shape)}, temperature={t})"
                            + (f", {how}" if how else "") + extra, "q": q, "p": p, "temperature": t,
                    "diagonal": how == "p = I"})
    return {"cases": out}


def in_batch_collect(inputs: dict, in_batch_negatives_loss) -> dict:
    """Each case's loss, and its gradients with respect to q and p (zeros where it does not depend on them)."""
    out = []
    for case in inputs["cases"]:
        q, p = case["q"].clone().requires_grad_(), case["p"].clone().requires_grad_()
        loss = attempt(in_batch_negatives_loss, q, p, temperature=case["temperature"])
        grads = attempt(torch.autograd.grad, loss, (q, p), allow_unused=True)
        if isinstance(grads, tuple):
            grads = [torch.zeros_like(x) if g is None else g for g, x in zip(grads, (q, p))]
        out.append({"loss": loss.detach() if isinstance(loss, torch.Tensor) else loss, "grads": grads})
    return {"cases": out}


def in_batch_suspects(q: torch.Tensor, p: torch.Tensor, t: float) -> dict:
    B, P = len(q), len(p)
    S = q.double() @ p.double().T / t  # (B, P)
    suspects = {
        "the temperature is missing: divide the scores q @ p.T by it": lambda: ref.in_batch_negatives_reference(q, p),
        "the scores are multiplied by the temperature: divide them by it":
        lambda: ref.in_batch_negatives_reference(q, p, 1 / t),
        "the softmax runs over the queries (p @ q.T, or dim=0): each query's softmax runs over the passages, the "
        "(B, P) scores q @ p.T along dim 1": lambda: F.cross_entropy(S.T[:B], torch.arange(B)),
        "the positives are taken to be the last B rows of p: p[i] is query i's positive, the hard negatives come "
        "after the B positives": lambda: F.cross_entropy(S, torch.arange(B) + P - B) if P > B else None,
        "the hard negatives (rows B .. P - 1 of p) are left out: every row of p is a candidate":
        lambda: ref.in_batch_negatives_reference(q, p[:B], t) if P > B else None,
        "the loss is summed over the queries: take the mean": lambda: B * ref.in_batch_negatives_reference(q, p, t),
        "the sign is flipped: the loss is minus the mean log-probability of the positives":
        lambda: -ref.in_batch_negatives_reference(q, p, t),
        "the scores are cosine similarities: DPR's are plain dot products":
        lambda: ref.in_batch_negatives_reference(F.normalize(q.double(), dim=-1), F.normalize(p.double(), dim=-1), t),
        "the loss is not reduced: return the mean over the B queries, one number":
        lambda: F.cross_entropy(S, torch.arange(B), reduction="none")}
    if t == 1:
        del suspects["the temperature is missing: divide the scores q @ p.T by it"]
        del suspects["the scores are multiplied by the temperature: divide them by it"]
    return suspects


DIFFERENTIABLE = "the loss must be differentiable: torch operations only, no .item() nor torch.no_grad()"
IN_BATCH_HINT = "the mean over i of -log softmax(q_i p^T / temperature)[i]: F.cross_entropy(q @ p.T / t, arange(B))"


@define("07.in_batch_negatives", in_batch_inputs, in_batch_collect)
def in_batch_negatives(inputs: dict, out: dict) -> str:
    for case, got in zip(inputs["cases"], out["cases"], strict=True):
        q, p, t, what = case["q"], case["p"], case["temperature"], case["what"]
        suspects = in_batch_suspects(q, p, t)
        want = ref.in_batch_negatives_reference(q, p, t)
        loss_what = f"{what}: the loss (vs F.cross_entropy(q @ p.T / t, arange(B)) in float64)"
        if not isinstance(got["loss"], torch.Tensor) or got["loss"].dim() != 0:  # raised, or not one number
            compare(loss_what, got["loss"], want, 1e-5, IN_BATCH_HINT, suspects)
        if not torch.isfinite(got["loss"]).all():
            top = (q.double() @ p.double().T / t).max().item()
            raise AssertionError(
                f"{loss_what}: {got['loss'].item()}, where the answer is {want.item():.6g}" + (
                    f": the scores q . p / t reach {top:.4g} here, and exp of more than 88.7 overflows float32 (then "
                    "inf / inf is NaN): take the log-softmax (log_softmax or F.cross_entropy), which subtracts each "
                    "row's largest score before exp" if top > 88.7 else f". {IN_BATCH_HINT}"))
        if raised(got["grads"]):
            raise AssertionError(f"{what}: the gradient of the loss raised {raised(got['grads'])}. {DIFFERENTIABLE}")
        if case["diagonal"]:  # scores = q @ I = q: the gradient with respect to q is d loss / d scores
            slope = as_tensor(f"{what}: the gradient of the loss", got["grads"][0], q.shape).diagonal()
            if (slope >= 0).any():
                i = int(torch.nonzero(slope >= 0)[0])
                advice = first_match(got["loss"], suspects)
                raise AssertionError(
                    f"{what}: d loss / d (q_{i} . p_{i}) = {slope[i].item():.4g} >= 0: the loss must push each "
                    "query's score with its own positive up" + (f". {advice}" if advice else f". {IN_BATCH_HINT}"))
        atol = 1e-5 * max(1.0, abs(want.item()))  # float32 scores q . p / t of 100 are good to 1e-5 only
        compare(loss_what, got["loss"], want, atol, IN_BATCH_HINT, suspects)
        q64, p64 = q.double().requires_grad_(), p.double().requires_grad_()
        want_q, want_p = torch.autograd.grad(ref.in_batch_negatives_reference(q64, p64, t), (q64, p64))
        for name, found, grad in (("q", got["grads"][0], want_q), ("p", got["grads"][1], want_p)):
            compare(f"{what}: its gradient with respect to {name} (vs autograd of the reference)", found, grad,
                    1e-5 * max(1.0, grad.abs().max().item()), DIFFERENTIABLE)
    return ("equals F.cross_entropy(q @ p.T / t, arange(B)), value and gradient, for several B, d and temperatures "
            "and with hard negatives (P > B); its gradient pushes each positive's score up")


# ---------------------------------------------------------------- 5. RETRO's chunked cross-attention
CCA_CASES = [  # (d_model, n_heads, m, B, T, n_chunks, k, r)
    (16, 2, 4, 2, 14, 4, 2, 3),  # T not a multiple of m; the last, partial chunk's neighbours are seen by nobody
    (12, 3, 3, 1, 12, 4, 3, 2),  # T a multiple of m, n_chunks = T // m
    (8, 1, 5, 2, 3, 1, 2, 2),    # T < m: no chunk has ended
    (16, 4, 4, 1, 4, 1, 1, 5),   # T = m: only the last position attends, to one neighbour
]


def cca_inputs(seed: int, cases=CCA_CASES) -> dict:
    """Each case's weights, h and neighbours, and the neighbours with those of one chunk redrawn, for each chunk."""
    g, out = seeded_generator(seed), []
    for d, H, m, B, T, n, k, r in cases:
        E = torch.randn(B, n, k, r, d, generator=g)
        changed = []
        for c in range(n):
            E2 = E.clone()
            E2[:, c] = torch.randn(B, k, r, d, generator=g)
            changed.append(E2)
        out.append({"what": f"ChunkedCrossAttention({d}, n_heads={H}, chunk_size={m}) on h {(B, T, d)} and "
                            f"neighbours {(B, n, k, r, d)}", "init": [d, H, m],
                    "weights": attention_weights("", d, g, bias=False), "h": torch.randn(B, T, d, generator=g),
                    "E": E, "changed": changed})
    return {"cases": out}


def cca_collect(inputs: dict, ChunkedCrossAttention) -> dict:
    """Each case's output, the h it was given as it is after the call (a forward that modifies h in place shows
    there), and its outputs with the neighbours of one chunk redrawn, chunk by chunk."""
    out = []
    for case in inputs["cases"]:
        module = attempt(build, ChunkedCrossAttention, case["weights"], case["what"], *case["init"])
        if isinstance(module, dict):
            out.append({"base": module, "h_after": case["h"], "changed": [module] * len(case["changed"])})
            continue
        with torch.no_grad():
            h = case["h"].clone()
            base = attempt(module, h, case["E"].clone())
            out.append({"base": base, "h_after": h,
                        "changed": [attempt(module, case["h"].clone(), E) for E in case["changed"]]})
    return {"cases": out}


def cca_reference(case: dict, chunk_of=lambda i, m: (i + 1) // m - 1, residual: bool = True,
                  scale: str = "head", heads: bool = True) -> torch.Tensor:
    """RETRO's chunked cross-attention position by position, in float64: token i attends, with
    F.scaled_dot_product_attention, to the k r neighbour tokens of chunk ``chunk_of(i, m)`` (none if outside 0 ..
    n_chunks - 1). Wrong versions for diagnoses: another ``chunk_of``, no residual, ``scale`` "none" or "model"
    (1/sqrt(d_model)), ``heads=False`` (a single head of d_model)."""
    d, H, m = case["init"]
    H = H if heads else 1
    W = {name: w.double() for name, w in case["weights"].items()}
    h, E = case["h"].double(), case["E"].double()
    B, T, _ = h.shape
    n = E.shape[1]
    out = h.clone() if residual else torch.zeros_like(h)
    split = lambda x: x.view(B, -1, H, d // H).transpose(1, 2)  # (B, H, L, d_head)
    for i in range(T):
        c = chunk_of(i, m)
        if not 0 <= c < n:
            continue
        memory = E[:, c].reshape(B, -1, d)  # (B, k r, d)
        y = F.scaled_dot_product_attention(
            split(h[:, i:i + 1] @ W["q_proj.weight"].T), split(memory @ W["k_proj.weight"].T),
            split(memory @ W["v_proj.weight"].T), scale={"head": None, "none": 1.0, "model": d ** -0.5}[scale])
        out[:, i] += (y.transpose(1, 2).reshape(B, d) @ W["out_proj.weight"].T)
    return out


def cca_suspects(case: dict) -> dict:
    return {
        "token i attends to the neighbours of its own chunk, i // m, which were retrieved with tokens after it: that "
        "leaks the future. Token i >= m - 1 attends to chunk (i + 1) // m - 1":
        lambda: cca_reference(case, chunk_of=lambda i, m: i // m),
        "the shift is m, not m - 1: the last token of a chunk, i = c m + m - 1, already sees that chunk's neighbours "
        "(chunk (i + 1) // m - 1)": lambda: cca_reference(case, chunk_of=lambda i, m: i // m - 1),
        "the residual is missing: return h + the attention's output": lambda: cca_reference(case, residual=False),
        "the scores are not scaled: divide them by sqrt(d_head)": lambda: cca_reference(case, scale="none"),
        "the scores are divided by sqrt(d_model): divide them by sqrt(d_head), d_model // n_heads":
        lambda: cca_reference(case, scale="model"),
        "this is a single head of d_model: split q, k and v into n_heads heads of d_model // n_heads":
        lambda: cca_reference(case, heads=False)}


CCA_RULE = "token i >= m - 1 attends to the neighbours of chunk (i + 1) // m - 1, and positions 0 .. m - 2 to none"


@define("07.chunked_cross_attention", cca_inputs, cca_collect, forbid=ATTENTION_BUILTINS)
def chunked_cross_attention(inputs: dict, out: dict) -> str:
    for case, got in zip(inputs["cases"], out["cases"], strict=True):
        m, h, what = case["init"][2], case["h"], case["what"]
        T = h.shape[1]
        base = as_tensor(what, got["base"], h.shape)
        if not torch.equal(as_tensor(f"{what}: h after the call", got["h_after"], h.shape), h.double()):
            raise AssertionError(f"{what}: forward modified h in place: return h + ..., a new tensor, and leave the "
                                 "caller's h as it was (out = h aliases h, and out[:, i] += ... writes into it)")
        for c, changed in enumerate(got["changed"]):
            moved = (as_tensor(f"{what}, chunk {c}'s neighbours redrawn", changed, h.shape) - base).abs().amax(
                dim=(0, 2)) > 1e-6  # (T,): which positions changed
            first = c * m + m - 1  # the first position that sees chunk c
            if moved[:first].any():
                i = int(torch.nonzero(moved)[0])
                advice = first_match(base, cca_suspects(case))
                raise AssertionError(
                    f"{what}: redrawing the neighbours of chunk {c} changed the output at position {i}, before "
                    f"position c m + m - 1 = {first}, the first that may see them: {CCA_RULE}"
                    + (f". {advice}" if advice else ""))
            unmoved = [i for i in range(first, min(first + m, T)) if not moved[i]]
            if unmoved:
                advice = first_match(base, cca_suspects(case))
                raise AssertionError(
                    f"{what}: redrawing the neighbours of chunk {c} did not change the output at position "
                    f"{unmoved[0]}, which attends to them ((i + 1) // m - 1 = {c}): {CCA_RULE}"
                    + (f". {advice}" if advice else ""))
            if moved[first + m:].any():
                i = first + m + int(torch.nonzero(moved[first + m:])[0])
                raise AssertionError(
                    f"{what}: redrawing the neighbours of chunk {c} changed the output at position {i}, after the m "
                    f"positions {first} .. {first + m - 1} that see them (c m + m - 1 .. c m + 2 m - 2): attend only "
                    f"to the last finished chunk, not to all earlier ones: {CCA_RULE}")
        compare(f"{what}: positions 0 to {min(m - 1, T) - 1}, which see no chunk yet, equal h exactly", base[:, :m - 1],
                h[:, :m - 1].double(), 0, CCA_RULE + "; return h there unchanged",
                {"the residual is missing: return h + the attention's output": torch.zeros_like(h[:, :m - 1])})
        compare(f"{what} (vs F.scaled_dot_product_attention in float64, position by position)", base,
                cca_reference(case), 1e-5, f"{CCA_RULE}: multi-head attention from q_proj(h_i) to k_proj and v_proj of "
                "the k r neighbour tokens of that chunk, 1/sqrt(d_head) scaling, then out_proj, added to h",
                cca_suspects(case))
    return ("equals multi-head attention (F.scaled_dot_product_attention in float64) of each token i >= m - 1 to the "
            "neighbours of chunk (i + 1) // m - 1, plus h; positions 0 .. m - 2 are h; each chunk's neighbours change "
            "exactly the m positions from c m + m - 1 on; h is left unchanged; T a multiple of m or not, T < m, 1 to 4 "
            "heads")


# ---------------------------------------------------------------- 6. kNN-LM
FAR = "distances near 1000"  # exp(-d) underflows: the weights need softmax's subtraction of the largest score
KNN_CASES = [  # (lambda, temperature, how)
    (0.25, 1.0, ""), (0.25, 3.0, ""), (0.0, 1.0, "lambda = 0: the LM alone"),
    (1.0, 1.0, "lambda = 1: the kNN distribution alone, -inf where no neighbour continues with the token"),
    (0.5, 1.0, "LM log-probabilities down to -800"), (0.9, 0.5, ""), (0.3, 1.0, FAR)]


def knn_inputs(seed: int, cases=KNN_CASES, V: int = 40, k: int = 8) -> dict:
    """An LM's float32 log-probabilities over V tokens and k neighbours: squared distances in [0.5, 6] (or 1000 more,
    ``FAR``), next tokens among the first 12 with repeats (token 0 twice at least); some LM log-probabilities near
    -800 on demand."""
    g, out = seeded_generator(seed), []
    for lam, t, how in cases:
        logits = 2 * torch.randn(V, generator=g)
        if "-800" in how:
            logits[torch.randperm(V, generator=g)[:V // 3]] = -800.0  # among them, tokens no neighbour continues with
        lm = logits.log_softmax(-1)
        tokens = torch.randint(12, (k,), generator=g)
        tokens[:2] = 0
        tokens = tokens[torch.randperm(k, generator=g)]
        distances = 0.5 + 5.5 * torch.rand(k, generator=g) + (1000 if how == FAR else 0)
        out.append({"what": f"knn_lm(lm_logprobs ({V},), k = {k} neighbours, lam={lam}, temperature={t})"
                            + (f", {how}" if how else ""), "args": [lm, distances, tokens, lam],
                    "kwargs": {"temperature": t}})
    return {"cases": out}


def knn_variant(lm: torch.Tensor, distances: torch.Tensor, tokens: torch.Tensor, lam: float, temperature: float,
                sign: float = -1.0, accumulate: bool = True, normalise: bool = True,
                times: bool = False) -> torch.Tensor:
    """Wrong versions of kNN-LM, float64, mixed in log space: weights exp(sign d / T) (normalised or not), added per
    token or, ``accumulate=False``, the last neighbour's weight only (index assignment); ``times``: lambda log p_kNN
    in place of log(lambda) + log p_kNN."""
    w = (sign * distances.double() / temperature).exp()
    w = w / w.sum() if normalise else w
    p_knn = torch.zeros(len(lm), dtype=torch.float64)
    if accumulate:
        p_knn.index_add_(0, tokens.long(), w)
    else:
        for token, weight in zip(tokens.tolist(), w):
            p_knn[token] = weight
    lm_part = lm.double() + math.log1p(-lam) if lam < 1 else torch.full_like(p_knn, -math.inf)
    if times:
        return torch.logaddexp(lm_part, lam * p_knn.log())
    return torch.logaddexp(lm_part, p_knn.log() + (math.log(lam) if lam > 0 else -math.inf))


def knn_expected(lm: torch.Tensor, distances: torch.Tensor, tokens: torch.Tensor, lam: float,
                 temperature: float) -> torch.Tensor:
    """The reference, and where exp(log p_LM) underflows (p_LM below about 1e-323) the closed form log(1 - lambda) +
    log p_LM of a token that no neighbour continues with."""
    want = ref.knn_lm_reference(lm, distances, tokens, lam, temperature)
    absent = torch.ones(len(lm), dtype=torch.bool)
    absent[tokens.long()] = False
    exact = lm.double() + math.log1p(-lam) if lam < 1 else want
    return torch.where(torch.isinf(want) & absent & (lam < 1), exact, want)


def knn_suspects(case: dict) -> dict:
    lm, distances, tokens, lam = case["args"]
    t = case["kwargs"]["temperature"]
    v = functools.partial(knn_variant, lm, distances, tokens)
    suspects = {
        "the kNN weights are softmax(+d / T): nearer neighbours (smaller distances) must weigh more, softmax(-d / T)":
        lambda: v(lam, t, sign=1.0),
        "the temperature multiplies the distances: divide them by it": lambda: v(lam, 1 / t),
        "the temperature is ignored: the weights are softmax(-d / temperature)": lambda: v(lam, 1.0),
        "lambda weighs the LM: p = lambda p_kNN + (1 - lambda) p_LM": lambda: v(1 - lam, t),
        "a token that several neighbours continue with gets one weight only: add them all (scatter_add, index_add_)":
        lambda: v(lam, t, accumulate=False),
        "the kNN weights exp(-d / T) are not normalised: softmax divides them by their sum":
        lambda: v(lam, t, normalise=False),
        "lambda multiplies log p_kNN: the mixture adds log(lambda) to it (and log(1 - lambda) to log p_LM)":
        lambda: v(lam, t, times=True)}
    if t == 1:
        for name in list(suspects)[1:3]:
            del suspects[name]
    return suspects


KNN_HINT = ("p_kNN = softmax(-distances / temperature) added up per token; logaddexp(log(1 - lambda) + lm_logprobs, "
            "log(lambda) + log p_kNN), with the logs of lambda and p_kNN taken on tensors, so that log 0 = -inf")


@define("07.knn_lm", knn_inputs, run_cases)
def knn_lm(inputs: dict, out: dict) -> str:
    for case, got in zip(inputs["cases"], out["outputs"], strict=True):
        lm, distances, tokens, lam = case["args"]
        what, t = case["what"], case["kwargs"]["temperature"]
        want = knn_expected(lm, distances, tokens, lam, t)
        try:
            got = as_tensor(what, got, want.shape)
        except AssertionError as error:
            raise AssertionError(f"{error}. lambda may be 0 or 1: {KNN_HINT}") from None
        nan, infinite = torch.isnan(got), torch.isneginf(got) & torch.isfinite(want)
        if nan.any() or infinite.any() or torch.isposinf(got).any():
            i = int(torch.nonzero(nan | infinite | torch.isposinf(got))[0])
            underflow = not (-distances.double() / t).exp().sum() > 0  # every exp(-d / T) is 0, even in float64
            why = ("its LM log-probability is {:.1f}: exp of it underflows to 0, and so does the mixture of "
                   "probabilities; mix in log space".format(lm[i].item()) if lm[i] < -100 else
                   f"exp(-d / T) underflows to 0 for every neighbour here (the smallest d / T is "
                   f"{(distances.double() / t).min().item():.4g}), and their sum too, so the weights are 0 / 0 = NaN: "
                   "use torch.softmax, which subtracts the largest -d / T before exp" if nan[i] and underflow else
                   "0 * log 0 = 0 * -inf is NaN" if nan[i] else "the mixture is not 0 there")
            raise AssertionError(f"{what}: {got[i].item()} at token {i}, where the answer is {want[i].item():.6g}: "
                                 f"{why}. {KNN_HINT}")
        wrong = torch.isfinite(got) & torch.isneginf(want)
        if wrong.any():
            i = int(torch.nonzero(wrong)[0])
            raise AssertionError(f"{what}: {got[i].item():.6g} at token {i}, which no neighbour continues with: at "
                                 "lambda = 1 its probability is 0 and its log-probability -inf")
        finite = torch.isfinite(want)
        suspects = {name: (lambda bug=bug: bug()[finite]) for name, bug in knn_suspects(case).items()}
        total = torch.logsumexp(got, 0).exp().item()
        if abs(total - 1) > 1e-5:
            advice = first_match(got[finite], suspects)
            raise AssertionError(f"{what}: the probabilities sum to {total:.6g}, not 1. " + (advice or KNN_HINT))
        compare(f"{what} (vs kNN-LM's mixture in probability space, float64)", got[finite], want[finite],
                1e-3 if "-800" in what else 1e-5, KNN_HINT, suspects)
    return ("equals kNN-LM's mixture where finite and -inf where it is 0, sums to 1; the LM at lambda = 0, the kNN "
            "distribution at lambda = 1; finite with p_kNN = 0 and LM log-probabilities of -800, and with distances "
            "near 1000 (exp(-d) underflows); the temperature, and repeated neighbour tokens added up")
