"""Plausible wrong implementations of Lab 7, each paired with the message its check must give.

Each factory takes the solution's namespace and returns the arguments of one check call.
"""
from __future__ import annotations

import math
from collections import Counter

import torch
import torch.nn.functional as F


# ---------------------------------------------------------------- BM25
def bm25_with(ns, b_used=True, lucene=False, floor="negative", average="raw", repeats=True, distinct_length=False,
              saturation=True, avgdl_nonempty=False):
    class BM25:
        def __init__(self, corpus_tokens, k1=1.5, b=0.75, epsilon=0.25):
            self.k1, self.b = k1, b if b_used else 0.0  # BUG (b_used=False): no length normalisation
            lengths = [len(set(doc)) if distinct_length else len(doc) for doc in corpus_tokens]  # BUG: distinct terms
            self.doc_len = torch.tensor(lengths, dtype=torch.float64)
            # BUG (avgdl_nonempty): the empty documents left out of the mean length
            self.avgdl = self.doc_len[self.doc_len > 0].mean() if avgdl_nonempty else self.doc_len.mean()
            self.tf = [Counter(doc) for doc in corpus_tokens]
            df = Counter(t for c in self.tf for t in c)
            N = len(corpus_tokens)
            ratio = {t: (N - n + 0.5) / (n + 0.5) for t, n in df.items()}
            raw = {t: math.log1p(r) if lucene else math.log(r) for t, r in ratio.items()}  # BUG (lucene): ln(1 + ...)
            pool = [max(v, 0.0) for v in raw.values()] if average == "clamped" else list(raw.values())
            self.average_idf = sum(pool) / len(pool)  # BUG (clamped): the mean of the idf clamped at 0
            low = epsilon * self.average_idf
            rule = {"negative": lambda v: low if v < 0 else v, "max": lambda v: max(v, low),  # BUG (max): a floor
                    "none": lambda v: v, "nonpositive": lambda v: low if v <= 0 else v}[floor]
            self.idf = {t: rule(v) for t, v in raw.items()}

        def scores(self, query_tokens):
            scores = torch.zeros(len(self.tf), dtype=torch.float64)
            norm = self.k1 * (1 - self.b + self.b * self.doc_len / self.avgdl)
            for term in query_tokens if repeats else set(query_tokens):  # BUG (repeats=False): each term once
                if term in self.idf:
                    f = torch.tensor([c[term] for c in self.tf], dtype=torch.float64)
                    scores += self.idf[term] * f * (self.k1 + 1 if saturation else 1) / (f + norm)
            return scores
    return BM25


def bm25_no_length_norm(ns):
    return bm25_with(ns, b_used=False)


def bm25_lucene_idf(ns):
    return bm25_with(ns, lucene=True, floor="none")


def bm25_floor_max(ns):
    return bm25_with(ns, floor="max")


def bm25_floor_nonpositive(ns):
    return bm25_with(ns, floor="nonpositive")


def bm25_no_floor(ns):
    return bm25_with(ns, floor="none")


def bm25_average_clamped(ns):
    return bm25_with(ns, average="clamped")


def bm25_query_set(ns):
    return bm25_with(ns, repeats=False)


def bm25_distinct_length(ns):
    return bm25_with(ns, distinct_length=True)


def bm25_no_k1_plus_one(ns):
    return bm25_with(ns, saturation=False)


def bm25_avgdl_nonempty(ns):
    return bm25_with(ns, avgdl_nonempty=True)


def bm25_calls_rank_bm25(ns):
    from rank_bm25 import BM25Okapi

    class BM25(BM25Okapi):  # BUG: the library itself
        def __init__(self, corpus_tokens, k1=1.5, b=0.75, epsilon=0.25):
            super().__init__(corpus_tokens, k1=k1, b=b, epsilon=epsilon)

        def scores(self, query_tokens):
            return torch.from_numpy(self.get_scores(query_tokens))
    return BM25


# ---------------------------------------------------------------- exact search
def dense_with(ns, sqrt=False, topk=False, higher_ids=False, last_only=False, local_ids=False, new_first=False,
               whole=False, whole_ip=False, no_q_norm=False, l2_descending=False, returns=lambda s, i: (s, i)):
    class DenseIndex:
        def __init__(self, embeddings, metric="ip", chunk=4096):
            self.x, self.metric = embeddings.float(), metric
            self.chunk = len(embeddings) if whole or (whole_ip and metric == "ip") else chunk  # BUG: no chunks

        def search(self, queries, k):
            q, largest = queries.float(), self.metric == "ip" or l2_descending  # BUG: the largest distances
            best_s, best_i = torch.empty(len(q), 0), torch.empty(len(q), 0, dtype=torch.long)
            for start in range(0, len(self.x), self.chunk):  # BUG (whole): one chunk, a (Q, N) matrix
                x = self.x[start:start + self.chunk]
                s = q @ x.T
                if self.metric == "l2":
                    s = (0 if no_q_norm else q.square().sum(1, keepdim=True)) - 2 * s + x.square().sum(1)
                    s = s.clamp_min(0).sqrt() if sqrt else s  # BUG (sqrt): distances, not squared
                i = torch.arange(len(x)) + (0 if local_ids else start)  # BUG (local_ids): no offset
                i = i.expand(len(q), -1)
                if last_only:  # BUG: the best so far thrown away
                    best_s, best_i = torch.empty(len(q), 0), torch.empty(len(q), 0, dtype=torch.long)
                if new_first:  # BUG: the new candidates before the best so far
                    s, i = torch.cat([s, best_s], 1), torch.cat([i, best_i], 1)
                else:
                    s, i = torch.cat([best_s, s], 1), torch.cat([best_i, i], 1)
                if topk:  # BUG: topk's order among ties is unspecified
                    order = s.topk(min(k, s.shape[1]), dim=1, largest=largest).indices
                elif higher_ids:  # BUG: ties to the higher id
                    by_id = i.argsort(dim=1, descending=True, stable=True)
                    s, i = s.gather(1, by_id), i.gather(1, by_id)
                    order = s.sort(dim=1, descending=largest, stable=True).indices[:, :k]
                else:
                    order = s.sort(dim=1, descending=largest, stable=True).indices[:, :k]
                best_s, best_i = s.gather(1, order), i.gather(1, order)
            return returns(best_s, best_i)  # BUG (returns): the wrong types, or order
    return DenseIndex


def dense_sqrt_l2(ns):
    return dense_with(ns, sqrt=True)


def dense_topk(ns):
    return dense_with(ns, topk=True)


def dense_ties_to_higher_id(ns):
    return dense_with(ns, higher_ids=True)


def dense_last_chunk_only(ns):
    return dense_with(ns, last_only=True)


def dense_local_ids(ns):
    return dense_with(ns, local_ids=True)


def dense_new_chunk_first(ns):
    return dense_with(ns, new_first=True)


def dense_no_q_norm(ns):
    return dense_with(ns, no_q_norm=True)


def dense_whole_matrix(ns):
    return dense_with(ns, whole=True)


def dense_ip_whole_matrix(ns):
    return dense_with(ns, whole_ip=True)  # BUG: only 'l2' is chunked


def dense_float_ids(ns):
    return dense_with(ns, returns=lambda s, i: (s, i.float()))  # BUG: float ids


def dense_int32_ids(ns):
    return dense_with(ns, returns=lambda s, i: (s, i.int()))  # BUG: int32 ids


def dense_numpy(ns):
    return dense_with(ns, returns=lambda s, i: (s.numpy(), i.numpy()))  # BUG: NumPy arrays


def dense_swapped(ns):
    return dense_with(ns, returns=lambda s, i: (i, s))  # BUG: (ids, scores)


def dense_descending_l2(ns):
    return dense_with(ns, l2_descending=True)


def dense_calls_faiss(ns):
    import faiss

    class DenseIndex:
        def __init__(self, embeddings, metric="ip", chunk=4096):
            self.index = faiss.IndexFlatIP(embeddings.shape[1]) if metric == "ip" else faiss.IndexFlatL2(
                embeddings.shape[1])  # BUG: the library itself
            self.index.add(embeddings.float().numpy())

        def search(self, queries, k):
            scores, ids = self.index.search(queries.float().numpy(), k)
            return torch.from_numpy(scores), torch.from_numpy(ids)
    return DenseIndex


# ---------------------------------------------------------------- sentence embeddings
def embed_with(ns, cut=256, keep_sep=True, pooling="mean", mask=True, normalise=True, restore=True):
    encoder, tokenizer = ns["encoder"], ns["tokenizer"]

    @torch.no_grad()
    def embed(texts, sentence_transformers=False, batch_size=64):
        ids = [e.ids for e in tokenizer.encode_batch(texts)]
        if cut:  # BUG (cut=None): no truncation; (keep_sep=False): [SEP] cut off
            ids = [i if len(i) <= cut else (i[:cut - 1] + i[-1:] if keep_sep else i[:cut]) for i in ids]
        order = sorted(range(len(ids)), key=lambda n: len(ids[n]))
        out = torch.empty(len(texts), 384)
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            T = max(len(ids[n]) for n in batch)
            input_ids, real = torch.zeros(len(batch), T, dtype=torch.long), torch.zeros(len(batch), T)
            for row, n in enumerate(batch):
                input_ids[row, :len(ids[n])], real[row, :len(ids[n])] = torch.tensor(ids[n]), 1
            hidden = encoder(input_ids, real if mask else torch.ones_like(real))  # BUG (mask=False): padding seen
            if pooling == "cls":  # BUG: the [CLS] vector
                v = hidden[:, 0]
            elif pooling == "padded":  # BUG: the mean over every position, padding included
                v = hidden.mean(1)
            elif pooling == "words":  # BUG: [CLS] and [SEP] left out
                w = real.clone()
                w[:, 0] = 0
                w[torch.arange(len(batch)), real.sum(1).long() - 1] = 0
                v = (hidden * w[..., None]).sum(1) / w.sum(1, keepdim=True)
            else:
                v = (hidden * real[..., None]).sum(1) / real.sum(1, keepdim=True)
            v = F.normalize(v, dim=-1) if normalise else v  # BUG (normalise=False)
            if restore:
                out[batch] = v
            else:  # BUG: the rows stay in order of length
                out[start:start + len(batch)] = v
        return out
    return embed


def embed_no_truncation(ns):
    return embed_with(ns, cut=None)


def embed_truncate_512(ns):
    return embed_with(ns, cut=512)


def embed_truncate_128(ns):
    return embed_with(ns, cut=128)


def embed_truncation_drops_sep(ns):
    return embed_with(ns, keep_sep=False)


def embed_cls_pooling(ns):
    return embed_with(ns, pooling="cls")


def embed_mean_over_padding(ns):
    return embed_with(ns, pooling="padded")


def embed_no_attention_mask(ns):
    return embed_with(ns, mask=False)


def embed_without_special_tokens(ns):
    return embed_with(ns, pooling="words")


def embed_not_normalised(ns):
    return embed_with(ns, normalise=False)


def embed_order_not_restored(ns):
    return embed_with(ns, restore=False)


def embed_calls_sentence_transformers(ns):
    def embed(texts, sentence_transformers=False, batch_size=64):
        from labkit.checks.references import minilm_embeddings
        return minilm_embeddings(texts)  # BUG: sentence-transformers itself, whatever the flag
    return embed


# ---------------------------------------------------------------- in-batch negatives
def in_batch_transposed(ns):
    def in_batch_negatives_loss(q, p, temperature=1.0):
        logits = p @ q.T / temperature  # BUG: (P, B), a softmax over the queries
        return -logits.log_softmax(dim=-1).diagonal().mean()
    return in_batch_negatives_loss


def in_batch_no_temperature(ns):
    return lambda q, p, temperature=1.0: F.cross_entropy(q @ p.T, torch.arange(len(q)))  # BUG: no temperature


def in_batch_hard_negatives_first(ns):
    def in_batch_negatives_loss(q, p, temperature=1.0):
        B, P = len(q), len(p)
        return F.cross_entropy(q @ p.T / temperature, torch.arange(B) + P - B)  # BUG: positives taken last
    return in_batch_negatives_loss


def in_batch_drops_hard_negatives(ns):
    return lambda q, p, temperature=1.0: ns["in_batch_negatives_loss"](q, p[:len(q)], temperature)  # BUG: P = B


def in_batch_sum(ns):
    def in_batch_negatives_loss(q, p, temperature=1.0):
        return F.cross_entropy(q @ p.T / temperature, torch.arange(len(q)), reduction="sum")  # BUG: sum
    return in_batch_negatives_loss


def in_batch_negated(ns):
    return lambda q, p, temperature=1.0: -ns["in_batch_negatives_loss"](q, p, temperature)  # BUG: the sign


def in_batch_cosine(ns):
    def in_batch_negatives_loss(q, p, temperature=1.0):
        q, p = F.normalize(q, dim=-1), F.normalize(p, dim=-1)  # BUG: cosine similarities
        return ns["in_batch_negatives_loss"](q, p, temperature)
    return in_batch_negatives_loss


def in_batch_naive_softmax(ns):
    def in_batch_negatives_loss(q, p, temperature=1.0):
        S = (q @ p.T / temperature).exp()  # BUG: no subtraction of the largest score: exp(100) = inf in float32
        return -(S.diagonal() / S.sum(1)).log().mean()
    return in_batch_negatives_loss


def in_batch_detached(ns):
    def in_batch_negatives_loss(q, p, temperature=1.0):
        return torch.tensor(ns["in_batch_negatives_loss"](q, p, temperature).item())  # BUG: no gradient
    return in_batch_negatives_loss


# ---------------------------------------------------------------- chunked cross-attention
def cca_with(ns, chunk_of=lambda i, m: (i + 1) // m - 1, residual=True, scale=True, calls_sdpa=False, in_place=False,
             all_earlier=False):
    """Chunked cross-attention as a loop over positions: token i attends to chunk chunk_of(i, m)."""
    Solution = ns["ChunkedCrossAttention"]

    class ChunkedCrossAttention(Solution):
        def forward(self, h, neighbours):
            B, T, d = h.shape
            m, H = self.m, self.n_heads
            out = (h if in_place else h.clone()) if residual else torch.zeros_like(h)  # BUG: no residual, or h itself
            for i in range(T):
                c = chunk_of(i, m)  # BUG: the wrong chunk
                if not 0 <= c < neighbours.shape[1]:
                    continue
                # BUG (all_earlier): every finished chunk, not the last one only
                memory = (neighbours[:, :c + 1] if all_earlier else neighbours[:, c]).reshape(B, -1, d)
                q = self.q_proj(h[:, i:i + 1]).view(B, 1, H, d // H).transpose(1, 2)
                k = self.k_proj(memory).view(B, -1, H, d // H).transpose(1, 2)
                v = self.v_proj(memory).view(B, -1, H, d // H).transpose(1, 2)
                if calls_sdpa:  # BUG: the forbidden built-in
                    y = F.scaled_dot_product_attention(q, k, v)
                else:
                    scores = q @ k.transpose(-2, -1) / (math.sqrt(d // H) if scale else 1)  # BUG (scale=False)
                    y = scores.softmax(-1) @ v
                out[:, i] = out[:, i] + self.out_proj(y.transpose(1, 2).reshape(B, d))
            return out
    return ChunkedCrossAttention


def cca_no_shift(ns):
    return cca_with(ns, chunk_of=lambda i, m: i // m)  # BUG: its own chunk, retrieved with later tokens


def cca_shift_m(ns):
    return cca_with(ns, chunk_of=lambda i, m: i // m - 1)  # BUG: one position late


def cca_no_residual(ns):
    return cca_with(ns, residual=False)


def cca_no_scaling(ns):
    return cca_with(ns, scale=False)


def cca_in_place(ns):
    return cca_with(ns, in_place=True)  # out = h: out[:, i] = ... writes into the caller's h


def cca_all_earlier_chunks(ns):
    return cca_with(ns, all_earlier=True)


def cca_calls_sdpa(ns):
    return cca_with(ns, calls_sdpa=True)


def cca_single_head(ns):
    Solution = ns["ChunkedCrossAttention"]

    class ChunkedCrossAttention(Solution):
        def forward(self, h, neighbours):
            heads, self.n_heads = self.n_heads, 1  # BUG: one head of d_model
            try:
                return Solution.forward(self, h, neighbours)
            finally:
                self.n_heads = heads
    return ChunkedCrossAttention


# ---------------------------------------------------------------- kNN-LM
def knn_with(ns, sign=-1.0, temperature_multiplies=False, accumulate=True, swapped=False, normalise=True):
    def knn_lm(lm_logprobs, neighbour_distances, neighbour_tokens, lam, temperature=1.0):
        d = neighbour_distances * temperature if temperature_multiplies else neighbour_distances / temperature
        w = (sign * d).softmax(0) if normalise else (sign * d).exp()  # BUG: softmax(+d), or no normalisation
        p_knn = torch.zeros_like(lm_logprobs)
        if accumulate:
            p_knn = p_knn.scatter_add(0, neighbour_tokens.long(), w)
        else:
            p_knn[neighbour_tokens.long()] = w  # BUG: a repeated token keeps one weight
        lam = 1 - lam if swapped else lam  # BUG (swapped): lambda on the LM
        lam = torch.tensor(lam, dtype=lm_logprobs.dtype)
        return torch.logaddexp(lm_logprobs + torch.log1p(-lam), p_knn.log() + lam.log())
    return knn_lm


def knn_probability_space(ns):
    def knn_lm(lm_logprobs, neighbour_distances, neighbour_tokens, lam, temperature=1.0):
        w = torch.softmax(-neighbour_distances / temperature, dim=0)
        p_knn = torch.zeros_like(lm_logprobs).scatter_add(0, neighbour_tokens.long(), w)
        return torch.log(lam * p_knn + (1 - lam) * lm_logprobs.exp())  # BUG: exp(-800) = 0 in float32
    return knn_lm


def knn_math_log(ns):
    def knn_lm(lm_logprobs, neighbour_distances, neighbour_tokens, lam, temperature=1.0):
        w = torch.softmax(-neighbour_distances / temperature, dim=0)
        p_knn = torch.zeros_like(lm_logprobs).scatter_add(0, neighbour_tokens.long(), w)
        return torch.logaddexp(lm_logprobs + math.log(1 - lam), p_knn.log() + math.log(lam))  # BUG: log(0) raises
    return knn_lm


def knn_times_log(ns):
    def knn_lm(lm_logprobs, neighbour_distances, neighbour_tokens, lam, temperature=1.0):
        w = torch.softmax(-neighbour_distances / temperature, dim=0)
        p_knn = torch.zeros_like(lm_logprobs).scatter_add(0, neighbour_tokens.long(), w)
        lam = torch.tensor(lam)
        return torch.logaddexp(lm_logprobs + torch.log1p(-lam), lam * p_knn.log())  # BUG: 0 * -inf = NaN
    return knn_lm


def knn_naive_exp(ns):
    def knn_lm(lm_logprobs, neighbour_distances, neighbour_tokens, lam, temperature=1.0):
        w = (-neighbour_distances / temperature).exp()
        w = w / w.sum()  # BUG: exp(-1000) underflows to 0 for every neighbour: 0 / 0
        p_knn = torch.zeros_like(lm_logprobs).scatter_add(0, neighbour_tokens.long(), w)
        lam = torch.tensor(lam, dtype=lm_logprobs.dtype)
        return torch.logaddexp(lm_logprobs + torch.log1p(-lam), p_knn.log() + lam.log())
    return knn_lm


def knn_plus_distance(ns):
    return knn_with(ns, sign=1.0)


def knn_temperature_multiplies(ns):
    return knn_with(ns, temperature_multiplies=True)


def knn_repeats_overwritten(ns):
    return knn_with(ns, accumulate=False)


def knn_lambda_swapped(ns):
    return knn_with(ns, swapped=True)


def knn_unnormalised(ns):
    return knn_with(ns, normalise=False)


BM25_CALL = r"BM25\(a corpus of 12 documents, k1=1.5, b=0.75, epsilon=0.25\)\.scores\(\['the', 'cat', 'cat', " \
            r"'unicorn'\]\) \(vs rank_bm25's BM25Okapi.get_scores\): max \|difference\|"
DENSE_CALL = r"DenseIndex\(embeddings \(203, 8\), metric='ip', chunk=32\)\.search\(queries \(9, 8\), k=1\)"
TIES = r"on vectors with exact duplicates \(ties\): the ids \(vs the tie rule: an exact search and a stable sort\)"
EMBED = r"embed\(4 texts of \d+, 303, 3, 15 tokens\)"
CCA = r"ChunkedCrossAttention\(16, n_heads=2, chunk_size=4\) on h \(2, 14, 16\) and neighbours \(2, 4, 2, 3, 16\)"
KNN = r"knn_lm\(lm_logprobs \(40,\), k = 8 neighbours, "

# check id -> [(factory, a regular expression the failure message must match)]
BUGS = {
    "07.bm25": [
        (bm25_no_length_norm, BM25_CALL + r".*the length normalisation is missing \(as if b = 0\)"),
        (bm25_lucene_idf, BM25_CALL + r".*this is Lucene's idf, ln\(1 \+ \(N - n \+ 0\.5\) / \(n \+ 0\.5\)\)"),
        (bm25_floor_max, BM25_CALL + r".*the floor is applied as max\(idf, epsilon \* average_idf\): rank_bm25 "
                                     r"replaces only the negative idf"),
        (bm25_floor_nonpositive, r"scores\(\['and', 'cat', '\w+'\]\) .*an idf of exactly 0 \(a term in exactly half "
                                 r"the documents\) is replaced too"),
        (bm25_no_floor, BM25_CALL + r".*the negative idf are kept"),
        (bm25_average_clamped, BM25_CALL + r".*average_idf is taken over the idf clamped at 0"),
        (bm25_query_set, BM25_CALL + r".*a repeated query token counts once"),
        (bm25_distinct_length, BM25_CALL + r".*\|D\| counts distinct terms"),
        (bm25_no_k1_plus_one, BM25_CALL + r".*the numerator lacks its factor \(k1 \+ 1\)"),
        (bm25_avgdl_nonempty, r"BM25\(a corpus of 13 documents, k1=1\.2, b=0\.3, epsilon=0\.6\)\.scores\(.*max "
                              r"\|difference\|.*avgdl is the mean length of the non-empty documents only"),
        (bm25_calls_rank_bm25, r"your BM25 calls rank_bm25; this exercise asks you to write it yourself"),
    ],
    "07.dense_index": [
        (dense_sqrt_l2, r"metric='l2', chunk=32\)\.search\(queries \(9, 8\), k=1\): the scores \(vs faiss' "
                        r"IndexFlatL2\): max \|difference\|.*the scores are square roots"),
        (dense_topk, TIES + r": max \|difference\|.*equal scores go to the lower id, and a tie group cut by k keeps "
                            r"its lowest ids.*torch.topk promises no order among equal values"),
        (dense_ties_to_higher_id, TIES + r".*equal scores go to the higher id"),
        (dense_new_chunk_first, TIES + r".*each chunk's candidates come before the best so far"),
        (dense_last_chunk_only, DENSE_CALL + r": the scores \(vs faiss' IndexFlatIP\): .*only the last chunk's best "
                                             r"are kept"),
        (dense_local_ids, DENSE_CALL + r": the ids \(vs faiss' IndexFlatIP\): .*the ids are counted within each "
                                       r"chunk"),
        (dense_no_q_norm, r"metric='l2', chunk=32\)\.search\(queries \(9, 8\), k=1\): the scores .*\|q\|\^2 is "
                          r"missing"),
        (dense_descending_l2, r"metric='l2', chunk=32\)\.search\(queries \(9, 8\), k=1\): the scores .*the ranking "
                              r"is reversed"),
        (dense_whole_matrix, r"DenseIndex\(embeddings \(16384, 4\), metric='l2', chunk=512\)\.search\(queries \(64, "
                             r"4\), k=10\): the tensors it creates take .* one \(Q, N\) = \(64, 16384\) float32 "
                             r"matrix of scores takes 4\.0 MiB"),
        (dense_ip_whole_matrix, r"DenseIndex\(embeddings \(16384, 4\), metric='ip', chunk=512\)\.search\(queries "
                                r"\(64, 4\), k=10\): the tensors it creates take .* one \(Q, N\) = \(64, 16384\) "
                                r"float32 matrix of scores takes 4\.0 MiB"),
        (dense_float_ids, DENSE_CALL + r": the ids are torch\.float32: ids must be int64 \(torch\.long\)"),
        (dense_int32_ids, DENSE_CALL + r": the ids are torch\.int32: ids must be int64 \(torch\.long\)"),
        (dense_numpy, DENSE_CALL + r": returned \(ndarray, ndarray\); the scores and ids must be torch tensors"),
        (dense_swapped, DENSE_CALL + r": the scores \(vs faiss' IndexFlatIP\): max \|difference\|.*these are the ids: "
                                     r"search returns \(scores, ids\), the scores first"),
        (dense_calls_faiss, r"your DenseIndex calls faiss; this exercise asks you to write it yourself"),
    ],
    "07.embed": [
        (embed_no_truncation, EMBED + r" \(vs sentence-transformers' all-MiniLM-L6-v2\): max \|difference\|.*the "
                                      r"texts are not cut"),
        (embed_truncate_512, EMBED + r" .*the texts are not cut"),
        (embed_truncate_128, EMBED + r" .*the texts are cut at 128 tokens"),
        (embed_truncation_drops_sep, EMBED + r" .*the cut drops \[SEP\]"),
        (embed_cls_pooling, EMBED + r" .*this is the \[CLS\] vector"),
        (embed_mean_over_padding, EMBED + r" .*the mean includes the padding"),
        (embed_no_attention_mask, EMBED + r" .*the padding is attended to"),
        (embed_without_special_tokens, EMBED + r" .*\[CLS\] and \[SEP\] are left out of the mean"),
        (embed_not_normalised, EMBED + r": the norms of the rows: max \|difference\|.*divide each mean by its L2 "
                                       r"norm"),
        (embed_order_not_restored, EMBED + r" .*the rows are in order of length"),
        (embed_calls_sentence_transformers, r"your embed \(its default path, sentence_transformers=False\) calls "
                                            r"sentence_transformers; this exercise asks you to write it yourself"),
    ],
    "07.in_batch_negatives": [
        (in_batch_transposed, r"in_batch_negatives_loss\(q \(3, 3\), p \(3, 3\), temperature=0\.5\), p = I: the "
                              r"loss .*the softmax runs over the queries"),
        (in_batch_no_temperature, r"temperature=0\.5\), p = I: the loss .*the temperature is missing"),
        (in_batch_hard_negatives_first, r"in_batch_negatives_loss\(q \(5, 8\), p \(12, 8\), temperature=0\.1\), "
                                        r"unit rows \(rows 5 to 11 of p are hard negatives\): d loss|the loss .*the "
                                        r"positives are taken to be the last B rows of p"),
        (in_batch_drops_hard_negatives, r"p \(12, 8\), temperature=0\.1\), unit rows \(rows 5 to 11 of p are hard "
                                        r"negatives\): the loss .*the hard negatives \(rows B \.\. P - 1 of p\) are "
                                        r"left out"),
        (in_batch_sum, r"in_batch_negatives_loss\(q \(3, 3\), p \(3, 3\), temperature=0\.5\), p = I: the loss .*the "
                       r"loss is summed over the queries"),
        (in_batch_negated, r"p = I: d loss / d \(q_0 \. p_0\) = \d\.\d+ >= 0: the loss must push each query's score "
                           r"with its own positive up\. the sign is flipped"),
        (in_batch_cosine, r"temperature=0\.5\), p = I: the loss .*the scores are cosine similarities"),
        (in_batch_naive_softmax, r"in_batch_negatives_loss\(q \(4, 16\), p \(4, 16\), temperature=0\.01\), unit rows, "
                                 r"q\[0\] = p\[0\]: the loss \(vs F\.cross_entropy.*\): (nan|inf), where the answer "
                                 r"is .*: the scores q \. p / t reach 100 here, and exp of more than 88\.7 overflows "
                                 r"float32.*subtracts each row's largest score"),
        (in_batch_detached, r"p = I: the gradient of the loss raised RuntimeError.*the loss must be differentiable"),
    ],
    "07.chunked_cross_attention": [
        (cca_no_shift, CCA + r": redrawing the neighbours of chunk 0 changed the output at position 0, before "
                             r"position c m \+ m - 1 = 3, the first that may see them.*token i attends to the "
                             r"neighbours of its own chunk, i // m.*leaks the future"),
        (cca_shift_m, CCA + r": redrawing the neighbours of chunk 0 did not change the output at position 3, which "
                            r"attends to them.*the shift is m, not m - 1"),
        (cca_no_residual, CCA + r": positions 0 to 2, which see no chunk yet, equal h exactly: .*the residual is "
                                r"missing"),
        (cca_no_scaling, CCA + r" \(vs F.scaled_dot_product_attention in float64, position by position\): max "
                               r"\|difference\|.*the scores are not scaled"),
        (cca_single_head, CCA + r" \(vs F.scaled_dot_product_attention .*this is a single head of d_model"),
        (cca_in_place, CCA + r": forward modified h in place: return h \+ \.\.\., a new tensor"),
        (cca_all_earlier_chunks, CCA + r": redrawing the neighbours of chunk 0 changed the output at position 7, after "
                                       r"the m positions 3 \.\. 6 that see them .*: attend only to the last finished "
                                       r"chunk, not to all earlier ones"),
        (cca_calls_sdpa, r"your code calls F.scaled_dot_product_attention; this exercise asks you to write it"),
    ],
    "07.knn_lm": [
        (knn_probability_space, KNN + r"lam=0\.5, temperature=1\.0\), LM log-probabilities down to -800: -inf at "
                                      r"token \d+, where the answer is -80\d\.\d+: its LM log-probability is "
                                      r"-80\d\.\d: exp of it underflows to 0.*mix in log space"),
        (knn_math_log, KNN + r"lam=0\.0, temperature=1\.0\), lambda = 0: the LM alone raised ValueError: math domain "
                             r"error\. lambda may be 0 or 1"),
        (knn_times_log, KNN + r"lam=0\.25, temperature=1\.0\): the probabilities sum to \d+\.\d+, not 1\. lambda "
                              r"multiplies log p_kNN"),
        (knn_naive_exp, KNN + r"lam=0\.3, temperature=1\.0\), distances near 1000: nan at token \d+, where the "
                              r"answer is .*: exp\(-d / T\) underflows to 0 for every neighbour here .*0 / 0 = NaN: "
                              r"use torch\.softmax, which subtracts the largest"),
        (knn_plus_distance, KNN + r"lam=0\.25, temperature=1\.0\).*the kNN weights are softmax\(\+d / T\)"),
        (knn_temperature_multiplies, KNN + r"lam=0\.25, temperature=3\.0\) .*the temperature multiplies the "
                                           r"distances"),
        (knn_repeats_overwritten, KNN + r"lam=0\.25, temperature=1\.0\).*a token that several neighbours continue "
                                        r"with gets one weight only"),
        (knn_lambda_swapped, KNN + r"lam=0\.25, temperature=1\.0\).*lambda weighs the LM"),
        (knn_unnormalised, KNN + r"lam=0\.25, temperature=1\.0\): the probabilities sum to \d\.\d+, not 1\. the kNN "
                                 r"weights exp\(-d / T\) are not normalised"),
    ],
}
