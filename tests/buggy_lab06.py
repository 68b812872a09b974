"""Plausible wrong implementations of Lab 6, each paired with the message its check must give.

Each factory takes the solution's namespace and returns the arguments of one check call.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def positions(T: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.arange(T)[:, None], torch.arange(T)[None, :]


# ---------------------------------------------------------------- masks
def sliding_mask_wider(ns):
    def sliding_window_mask(T, window):
        i, j = positions(T)
        return (j <= i) & (j >= i - window)  # BUG: window + 1 keys (flash-attention's window_size convention)
    return sliding_window_mask


def sliding_mask_narrower(ns):
    def sliding_window_mask(T, window):
        i, j = positions(T)
        return (j <= i) & (j > i - window + 1)  # BUG: window - 1 keys
    return sliding_window_mask


def sliding_mask_not_causal(ns):
    def sliding_window_mask(T, window):
        i, j = positions(T)
        return (i - j).abs() < window  # BUG: a band on both sides
    return sliding_window_mask


def sliding_mask_float(ns):
    return lambda T, window: ns["sliding_window_mask"](T, window).float()  # BUG: 0/1 floats, not bool


def longformer_rows_only(ns):
    def longformer_mask(T, window, global_idx):
        i, j = positions(T)
        mask = (i - j).abs() <= window // 2
        mask[list(global_idx), :] = True  # BUG: no global columns
        return mask
    return longformer_mask


def longformer_full_window(ns):
    def longformer_mask(T, window, global_idx):
        i, j = positions(T)
        mask = (i - j).abs() <= window  # BUG: window on each side, not window // 2
        mask[list(global_idx), :] = True
        mask[:, list(global_idx)] = True
        return mask
    return longformer_mask


def bigbird_with(ns, global_rng=False, window=True):
    def bigbird_mask(T, block, n_random, n_global, seed):
        n = T // block
        g = torch.Generator().manual_seed(seed)
        layout = torch.zeros(n, n, dtype=torch.bool)
        layout[:n_global, :] = True
        layout[:, :n_global] = True
        if window:  # BUG (window=False): no window
            for b in range(n):
                layout[b, max(0, b - 1):b + 2] = True
        for b in range(n_global, n):
            candidates = (~layout[b]).nonzero().flatten()
            order = torch.randperm(len(candidates)) if global_rng else torch.randperm(len(candidates), generator=g)
            layout[b, candidates[order[:n_random]]] = True  # BUG (global_rng): ignores the seed
        return layout.repeat_interleave(block, 0).repeat_interleave(block, 1)
    return bigbird_mask


def bigbird_global_rng(ns):
    return bigbird_with(ns, global_rng=True)


def bigbird_seeds_global_rng(ns):
    def bigbird_mask(T, block, n_random, n_global, seed):
        torch.manual_seed(seed)  # BUG: reseeds PyTorch's global generator (then draws from it)
        return bigbird_with(ns, global_rng=True)(T, block, n_random, n_global, seed)
    return bigbird_mask


def bigbird_one_permutation(ns):
    def bigbird_mask(T, block, n_random, n_global, seed):
        n = T // block
        layout = bigbird_with(ns)(T, block, 0, n_global, seed)[::block, ::block].clone()
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()  # BUG: one draw for all
        for b in range(n_global, n):
            layout[b, [c for c in order if not layout[b, c]][:n_random]] = True
        return layout.repeat_interleave(block, 0).repeat_interleave(block, 1)
    return bigbird_mask


def bigbird_no_window(ns):
    return bigbird_with(ns, window=False)


def bigbird_random_anywhere(ns):
    def bigbird_mask(T, block, n_random, n_global, seed):
        n = T // block
        mask = bigbird_with(ns)(T, block, 0, n_global, seed)[::block, ::block]
        g = torch.Generator().manual_seed(seed)
        for b in range(n_global, n):
            mask[b, torch.randperm(n, generator=g)[:n_random]] = True  # BUG: window and global blocks may be drawn
        return mask.repeat_interleave(block, 0).repeat_interleave(block, 1)
    return bigbird_mask


def bigbird_token_random(ns):
    def bigbird_mask(T, block, n_random, n_global, seed):
        mask = bigbird_with(ns)(T, block, 0, n_global, seed)
        g = torch.Generator().manual_seed(seed)
        mask[torch.rand(T, T, generator=g) < 0.1] = True  # BUG: random tokens, not whole blocks
        return mask
    return bigbird_mask


def strided_only(ns):
    def strided_mask(T, stride):
        i, j = positions(T)
        return (j <= i) & ((i - j) % stride == 0)  # BUG: the strided head alone
    return strided_mask


def strided_not_causal(ns):
    def strided_mask(T, stride):
        i, j = positions(T)
        return ((i - j).abs() < stride) | ((i - j) % stride == 0)  # BUG: no j <= i
    return strided_mask


# ---------------------------------------------------------------- sliding-window attention
def swa_with(ns, shift=0, drop_last=False, dense_mask=False):
    def sliding_window_attention(q, k, v, window):
        T, d = q.shape[-2], q.shape[-1]
        out = torch.zeros_like(q)
        full = ns["sliding_window_mask"](T, window) if dense_mask else None  # BUG (dense_mask): a T x T mask
        for start in range(0, T - window + 1 if drop_last else T, window):  # BUG (drop_last): no partial chunk
            end = min(start + window, T)
            first = max(0, start - window)
            scores = q[..., start:end, :] @ k[..., first:end, :].transpose(-2, -1) / math.sqrt(d)
            i = torch.arange(start, end)[:, None]
            j = torch.arange(first, end)[None, :]
            allowed = full[start:end, first:end] if dense_mask else (j <= i) & (j > i - window - shift)  # BUG (shift)
            out[..., start:end, :] = scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v[..., first:end, :]
        return out
    return sliding_window_attention


def swa_wider(ns):
    return swa_with(ns, shift=1)


def swa_narrower(ns):
    return swa_with(ns, shift=-1)


def swa_narrower_nan(ns):
    def sliding_window_attention(q, k, v, window):
        if window == 1:
            return swa_with(ns, shift=-1)(q, k, v, window)  # BUG: no key at all with window 1
        return ns["sliding_window_attention"](q, k, v, window)
    return sliding_window_attention


def swa_drops_partial_chunk(ns):
    return swa_with(ns, drop_last=True)


def swa_dense_mask(ns):
    return swa_with(ns, dense_mask=True)


def swa_dense_scores(ns):
    def sliding_window_attention(q, k, v, window):
        T = q.shape[-2]
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # BUG: the whole T x T score matrix
        i, j = positions(T)
        return scores.masked_fill(~((j <= i) & (j > i - window)), float("-inf")).softmax(-1) @ v
    return sliding_window_attention


def swa_all_earlier_keys(ns):
    def sliding_window_attention(q, k, v, window):
        T, d = q.shape[-2], q.shape[-1]
        outputs = []
        for start in range(0, T, window):
            end = min(start + window, T)
            scores = q[..., start:end, :] @ k[..., :end, :].transpose(-2, -1) / math.sqrt(d)  # BUG: keys [0, end)
            i, j = torch.arange(start, end)[:, None], torch.arange(end)[None, :]
            scores = scores.masked_fill(~((j <= i) & (j > i - window)), float("-inf"))
            outputs.append(scores.softmax(-1) @ v[..., :end, :])
        return torch.cat(outputs, dim=-2)
    return sliding_window_attention


def swa_per_query_all_keys(ns):
    def sliding_window_attention(q, k, v, window):
        T, d = q.shape[-2], q.shape[-1]
        out = torch.empty_like(q)
        for i in range(T):  # BUG: each query against every earlier key, masked to its window: O(T^2) work
            scores = q[..., i:i + 1, :] @ k[..., :i + 1, :].transpose(-2, -1) / math.sqrt(d)
            scores = scores.masked_fill(torch.arange(i + 1) <= i - window, float("-inf"))
            out[..., i:i + 1, :] = scores.softmax(-1) @ v[..., :i + 1, :]
        return out
    return sliding_window_attention


def swa_calls_sdpa(ns):
    def sliding_window_attention(q, k, v, window):
        i, j = positions(q.shape[-2])
        return F.scaled_dot_product_attention(q, k, v, attn_mask=(j <= i) & (j > i - window))  # BUG: built-in
    return sliding_window_attention


# ---------------------------------------------------------------- linear attention
def linear_with(ns, total=False, no_normaliser=False, total_normaliser=False, scaled=False, wrong_dim=False):
    def linear_attention(q, k, v, causal=True, feature_map=ns["elu_plus_one"]):
        if scaled:
            q = q / math.sqrt(q.shape[-1])  # BUG: a 1/sqrt(d) that softmax attention has, linear attention not
        phi_q, phi_k = feature_map(q), feature_map(k)
        outer = phi_k.unsqueeze(-1) * v.unsqueeze(-2)  # (B, H, T, d, d_v)
        if causal and not total:  # BUG (total): sums over every position even when causal
            S = torch.cumsum(outer, dim=-1 if wrong_dim else -3)  # BUG (wrong_dim): along d_v, not time
            z = torch.cumsum(phi_k, dim=-2)
        else:
            S = outer.sum(-3, keepdim=True).expand_as(outer)
            z = phi_k.sum(-2, keepdim=True).expand_as(phi_k)
        if total_normaliser:
            z = phi_k.sum(-2, keepdim=True)  # BUG: the normaliser over every position
        numerator = (phi_q.unsqueeze(-2) @ S).squeeze(-2)
        return numerator if no_normaliser else numerator / (phi_q * z).sum(-1, keepdim=True)  # BUG (no_normaliser)
    return linear_attention


def linear_total_sums(ns):
    return linear_with(ns, total=True)


def linear_cumsum_wrong_dim(ns):
    return linear_with(ns, wrong_dim=True)


def linear_no_normaliser(ns):
    return linear_with(ns, no_normaliser=True)


def linear_total_normaliser(ns):
    return linear_with(ns, total_normaliser=True)


def linear_scaled(ns):
    return linear_with(ns, scaled=True)


def linear_ignores_feature_map(ns):
    return lambda q, k, v, causal=True, feature_map=None: ns["linear_attention"](q, k, v, causal)  # BUG


def linear_quadratic(ns):
    def linear_attention(q, k, v, causal=True, feature_map=ns["elu_plus_one"]):
        A = feature_map(q) @ feature_map(k).transpose(-1, -2)  # BUG: the (T, T) matrix, no prefix sums
        if causal:
            A = A.tril()
        return A @ v / A.sum(-1, keepdim=True)
    return linear_attention


def linear_calls_sdpa(ns):
    def linear_attention(q, k, v, causal=True, feature_map=ns["elu_plus_one"]):
        F.scaled_dot_product_attention(q, k, v)  # BUG: a forbidden built-in, even if unused
        return ns["linear_attention"](q, k, v, causal, feature_map)
    return linear_attention


def recurrent_with(ns, read_first=False, no_normaliser=False):
    def linear_attention_recurrent(q, k, v, feature_map=ns["elu_plus_one"]):
        phi_q, phi_k = feature_map(q), feature_map(k)
        S = q.new_zeros(*q.shape[:-2], q.shape[-1], v.shape[-1])
        z = q.new_zeros(*q.shape[:-2], q.shape[-1])
        outs = []
        for t in range(q.shape[-2]):
            if not read_first:
                S = S + phi_k[..., t, :, None] * v[..., t, None, :]
                z = z + phi_k[..., t, :]
            num = (phi_q[..., t, None, :] @ S).squeeze(-2)
            outs.append(num if no_normaliser else num / (phi_q[..., t, :] * z).sum(-1, keepdim=True))
            if read_first:  # BUG: the state is updated after it is read
                S = S + phi_k[..., t, :, None] * v[..., t, None, :]
                z = z + phi_k[..., t, :]
        return torch.stack(outs, dim=-2)
    return linear_attention_recurrent


def recurrent_calls_parallel(ns):
    return lambda q, k, v, feature_map=ns["elu_plus_one"]: ns["linear_attention"](q, k, v, True, feature_map)  # BUG


def recurrent_quadratic(ns):
    return lambda q, k, v, feature_map=ns["elu_plus_one"]: linear_quadratic(ns)(q, k, v, True, feature_map)  # BUG


def recurrent_every_state(ns):
    def linear_attention_recurrent(q, k, v, feature_map=ns["elu_plus_one"]):
        phi_q, phi_k = feature_map(q), feature_map(k)
        T = q.shape[-2]
        S = q.new_zeros(*q.shape[:-2], T, q.shape[-1], v.shape[-1])  # BUG: a state per position, (T, d, d_v)
        z = q.new_zeros(*q.shape[:-2], T, q.shape[-1])
        outs = []
        for t in range(T):
            S[..., t, :, :] = (S[..., t - 1, :, :] if t else 0) + phi_k[..., t, :, None] * v[..., t, None, :]
            z[..., t, :] = (z[..., t - 1, :] if t else 0) + phi_k[..., t, :]
            num = (phi_q[..., t, None, :] @ S[..., t, :, :]).squeeze(-2)
            outs.append(num / (phi_q[..., t, :] * z[..., t, :]).sum(-1, keepdim=True))
        return torch.stack(outs, dim=-2)
    return linear_attention_recurrent


def recurrent_reads_before_update(ns):
    return recurrent_with(ns, read_first=True)


def recurrent_no_normaliser(ns):
    return recurrent_with(ns, no_normaliser=True)


# ---------------------------------------------------------------- Performer
def projection_with(ns, sign=True, scaling="chi", orthogonal=True, reseed_blocks=False, reseed_norms=False,
                    global_rng=False):
    def orthogonal_projection(n_features, d, seed):
        g = torch.Generator().manual_seed(seed)
        if global_rng:
            torch.manual_seed(seed)  # BUG: reseeds PyTorch's global generator
        blocks = []
        for _ in range(-(-n_features // d)):
            if reseed_blocks:
                g = torch.Generator().manual_seed(seed)  # BUG: every block the same Gaussian matrix
            G = torch.randn(d, d, generator=g)
            if not orthogonal:
                blocks.append(G)  # BUG: plain Gaussian rows, not orthogonal
                continue
            Q, R = torch.linalg.qr(G)
            if sign:  # BUG (sign=False): Q as torch.linalg.qr returns it
                Q = Q * torch.sign(torch.diagonal(R))
            blocks.append(Q.T)
        W = torch.cat(blocks)[:n_features]
        if not orthogonal:
            return W
        if scaling == "chi":
            if reseed_norms:
                g = torch.Generator().manual_seed(seed)  # BUG: the lengths are those of the first Gaussian's rows
            return W * torch.randn(n_features, d, generator=g).norm(dim=-1, keepdim=True)
        return W * (math.sqrt(d) if scaling == "sqrt_d" else 1.0)  # BUG: a fixed length
    return orthogonal_projection


def projection_no_sign_correction(ns):
    return projection_with(ns, sign=False)


def projection_unit_rows(ns):
    return projection_with(ns, scaling="none")


def projection_sqrt_d_rows(ns):
    return projection_with(ns, scaling="sqrt_d")


def projection_plain_gaussian(ns):
    return projection_with(ns, orthogonal=False)


def projection_same_blocks(ns):
    return projection_with(ns, reseed_blocks=True)


def projection_reseeded_norms(ns):
    return projection_with(ns, reseed_norms=True)


def projection_seeds_global_rng(ns):
    return projection_with(ns, global_rng=True)


def projection_cut_at_the_front(ns):
    def orthogonal_projection(n_features, d, seed):
        W = ns["orthogonal_projection"](-(-n_features // d) * d, d, seed)[-n_features:]  # valid: the short block first
        return W * 2.0  # BUG: every row twice too long (chi lengths times 2)
    return orthogonal_projection


def projection_global_rng(ns):
    def orthogonal_projection(n_features, d, seed):
        torch.randn(1)  # BUG: draws from the global generator, not from seed
        return ns["orthogonal_projection"](n_features, d, int(torch.randint(0, 2**31, (1,))))
    return orthogonal_projection


def performer_no_norm_term(ns):
    def performer_features(x, projection):
        return torch.exp(x @ projection.T) / math.sqrt(projection.shape[0])  # BUG: no -|x|^2 / 2
    return performer_features, ns["orthogonal_projection"]


def performer_no_sqrt_m(ns):
    def performer_features(x, projection):
        return torch.exp(x @ projection.T - (x * x).sum(-1, keepdim=True) / 2)  # BUG: no 1/sqrt(m)
    return performer_features, ns["orthogonal_projection"]


def performer_unit_projection(ns):
    return ns["performer_features"], projection_with(ns, scaling="none")


def performer_float64_projection(ns):
    return ns["performer_features"], lambda m, d, seed: ns["orthogonal_projection"](m, d, seed).double()  # BUG


def performer_float64_features(ns):
    def performer_features(x, projection):
        return ns["performer_features"](x.double(), projection.double())  # float64 features: fine
    return performer_features, projection_with(ns, scaling="none")  # BUG: unit rows


# ---------------------------------------------------------------- StreamingLLM's cache
def cache_with(ns, sinks=True, recent=0):
    class StreamingKVCache(ns["StreamingKVCache"]):
        def append(self, k, v):
            self.k = k if self.k is None else torch.cat([self.k, k], dim=-2)
            self.v = v if self.v is None else torch.cat([self.v, v], dim=-2)
            keep_recent = self.window + recent  # BUG (recent): one token too few
            if self.k.shape[-2] > self.n_sink + self.window:
                if sinks:
                    keep = lambda x: torch.cat([x[..., :self.n_sink, :], x[..., -keep_recent:, :]], dim=-2)
                else:
                    keep = lambda x: x[..., -(self.n_sink + self.window):, :]  # BUG: the sinks are dropped
                self.k, self.v = keep(self.k), keep(self.v)
    return StreamingKVCache


def cache_drops_sinks(ns):
    return cache_with(ns, sinks=False)


def cache_window_minus_one(ns):
    return cache_with(ns, recent=-1)


def cache_growing_list(ns):
    class StreamingKVCache:
        def __init__(self, n_sink, window):
            self.n_sink, self.window = n_sink, window
            self.keys, self.values = [], []  # BUG: every token ever appended

        def append(self, k, v):
            self.keys += list(k.unbind(-2))
            self.values += list(v.unbind(-2))

        def keys_values(self):
            n, s, w = len(self.keys), self.n_sink, self.window
            kept = list(range(n)) if n <= s + w else [*range(s), *range(n - w, n)]
            return (torch.stack([self.keys[i] for i in kept], dim=-2),
                    torch.stack([self.values[i] for i in kept], dim=-2))
    return StreamingKVCache


def cache_compacts_at_twice(ns):
    class StreamingKVCache(ns["StreamingKVCache"]):
        def append(self, k, v):
            self.k = k if self.k is None else torch.cat([self.k, k], dim=-2)
            self.v = v if self.v is None else torch.cat([self.v, v], dim=-2)
            if self.k.shape[-2] > 2 * (self.n_sink + self.window):  # BUG: evicted tokens pile up until then
                keep = lambda x: torch.cat([x[..., :self.n_sink, :], x[..., -self.window:, :]], dim=-2)
                self.k, self.v = keep(self.k), keep(self.v)

        def keys_values(self):
            n, s, w = self.k.shape[-2], self.n_sink, self.window
            keep = lambda x: x if n <= s + w else torch.cat([x[..., :s, :], x[..., n - w:, :]], dim=-2)
            return keep(self.k), keep(self.v)
    return StreamingKVCache


def cache_rotates_keys(ns):
    class StreamingKVCache(ns["StreamingKVCache"]):
        def keys_values(self):
            k, v = super().keys_values()
            return torch.stack([-k[..., 1::2], k[..., ::2]], dim=-1).flatten(-2), v  # BUG: pairs rotated, RoPE-like
    return StreamingKVCache


def cache_views_of_history(ns):
    class StreamingKVCache(ns["StreamingKVCache"]):
        def append(self, k, v):
            self.all_k = k if self.k is None else torch.cat([self.all_k, k], dim=-2)  # BUG: the whole history...
            self.all_v = v if self.v is None else torch.cat([self.all_v, v], dim=-2)
            n, s, w = self.all_k.shape[-2], self.n_sink, self.window
            self.k, self.v = self.all_k, self.all_v
            if n > s + w:
                self.k = torch.cat([self.all_k[..., :s, :], self.all_k[..., n - w:, :]], dim=-2)
                self.v = torch.cat([self.all_v[..., :s, :], self.all_v[..., n - w:, :]], dim=-2)
    return StreamingKVCache


# check id -> [(factory, a regular expression the failure message must match)]
BUGS = {
    "06.sliding_window_mask": [
        (sliding_mask_wider, r"sliding_window_mask\(9, 3\): query 3 sees key 0, which is 3 back: with window 3 it "
                             r"sees i - 3 < j <= i\. the window is one too wide"),
        (sliding_mask_narrower, r"sliding_window_mask\(9, 3\): query 2 does not see key 0, which is 2 back: .*one too "
                                r"narrow"),
        (sliding_mask_not_causal, r"sliding_window_mask\(9, 3\): query 0 sees key 1, 1 ahead \(in the future\): .*not "
                                  r"causal"),
        (sliding_mask_float, r"sliding_window_mask\(9, 3\): dtype torch.float32, expected torch.bool"),
    ],
    "06.longformer_mask": [
        (longformer_rows_only, r"longformer_mask\(8, 4, \[0\]\): query 3 does not see key 0 \(3 apart; key 0 is "
                               r"global\): .*need full columns"),
        (longformer_full_window, r"longformer_mask\(8, 4, \[0\]\): query 1 sees key 4 \(3 apart\): .*window // 2 = 2 "
                                 r".*window is the band's whole width"),
    ],
    "06.bigbird_mask": [
        (bigbird_global_rng, r"bigbird_mask\(64, block=4, n_random=2, n_global=1, seed=\d+\), called twice .* the two "
                             r"masks differ\. .*torch.Generator\(\)\.manual_seed\(seed\)"),
        (bigbird_seeds_global_rng, r"bigbird_mask: your function changed PyTorch's global random state "
                                   r"\(torch.manual_seed or a draw without generator=\): draw from "
                                   r"torch.Generator\(\)\.manual_seed\(seed\)"),
        (bigbird_one_permutation, r"bigbird_mask\(48, block=2, n_random=3, n_global=2, seed=\d+\): the random key "
                                  r"blocks of the 22 non-global query blocks fall in only \d of the 22 non-global key "
                                  r"blocks.*not one permutation shared by every query block"),
        (bigbird_no_window, r"bigbird_mask\(32, block=4, n_random=0, n_global=0, seed=\d+\): query 0 does not see key "
                            r"0 \(query block 0, key block 0\): .*there is no window"),
        (bigbird_random_anywhere, r"bigbird_mask\(64, block=4, n_random=2, n_global=1, seed=\d+\): query block \d+ "
                                  r"sees [01] key blocks? beyond its window and the global blocks \(\[\d*\]\), "
                                  r"expected min\(n_random, \d+ candidates\) = 2"),
        (bigbird_token_random, r"bigbird_mask\(32, block=4, n_random=0, n_global=0, seed=\d+\): query \d+ sees key \d+ "
                               r"\(query block \d+, key block \d+\): with blocks of 4 tokens, query block b sees key "
                               r"blocks b - 1, b and b \+ 1"),
    ],
    "06.strided_mask": [
        (strided_only, r"strided_mask\(7, 3\): query 1 does not see key 0, which is 1 back: .*strided head alone"),
        (strided_not_causal, r"strided_mask\(7, 3\): query 0 sees key 1, 1 ahead \(in the future\): .*not causal"),
    ],
    "06.sliding_window_attention": [
        (swa_wider, r"on \(2, 2, 37, 16\), window 5 \(T not a multiple of the window\) \(vs "
                    r"F.scaled_dot_product_attention in float64 under transformers' sliding-window mask\): "
                    r"max \|difference\|.*one too wide"),
        (swa_narrower, r"window 5 \(T not a multiple of the window\) .*: max \|difference\|.*one too narrow"),
        (swa_narrower_nan, r"window 1 \(window 1: each query sees only itself\) .*: non-finite value nan at index "
                           r"\(0, 0, 0, 0\)\. a query that sees no key \(every score -inf\) gives NaN"),
        (swa_drops_partial_chunk, r"window 5 .*: max \|difference\|.*only queries 35 to 36 are wrong: T = 37 is not a "
                                  r"multiple of the window 5"),
        (swa_dense_mask, r"\(1, 1, 8192, 32\), window 256: the tensors it creates take \d+\.\d MiB at their peak, "
                         r"at least 1/8 of the 512 MiB that dense attention's T x T float32 scores and softmax weights"),
        (swa_dense_scores, r"window 256: the tensors it creates take \d+\.\d MiB"),
        (swa_all_earlier_keys, r"\(1, 1, 8192, 32\), window 256: the tensors it creates add up to \d+ MiB in all "
                               r"\(freed or not\), at least the 256 MiB of one T x T float32 matrix.*scored only "
                               r"against the 2 window - 1 keys it can see, \[start - window \+ 1, end\)"),
        (swa_per_query_all_keys, r"window 256: the tensors it creates add up to \d+ MiB in all"),
        (swa_calls_sdpa, r"your code calls F.scaled_dot_product_attention; this exercise asks you to write it"),
    ],
    "06.linear_attention": [
        (linear_total_sums, r"linear_attention with the keys and values after position \d+ changed: the output at "
                            r"position 0 changed, though only keys and values after position \d+ did: causal linear "
                            r"attention sums over j <= i only .*\. this is non-causal linear attention"),
        (linear_cumsum_wrong_dim, r"linear_attention \(q, k .*: max \|difference\|.*phi\(q_i\)\^T S_i / phi\(q_i\)\^T "
                                  r"z_i, with S_i"),
        (linear_no_normaliser, r"max \|difference\|.*the normaliser is missing"),
        (linear_total_normaliser, r"the output at position 0 changed, .*\. the normaliser sums phi\(k_j\) over every "
                                  r"position"),
        (linear_scaled, r"max \|difference\|.*q is scaled by 1/sqrt\(d\) before the feature map"),
        (linear_ignores_feature_map, r"with feature_map=F.softplus .*: max \|difference\|.*the feature_map argument is "
                                     r"ignored"),
        (linear_calls_sdpa, r"your code calls F.scaled_dot_product_attention"),
        (linear_quadratic, r"linear_attention on \(1, 1, 2048, 8\): the tensors it creates take \d+\.\d MiB at their "
                           r"peak, at least a quarter of the 16 MiB of one T x T float32 matrix: it builds a T x T "
                           r"matrix .*torch.cumsum"),
    ],
    "06.linear_attention_recurrent": [
        (recurrent_reads_before_update, r"linear_attention_recurrent .*: output t sums over the keys j < t, without "
                                        r"the current one"),
        (recurrent_no_normaliser, r"linear_attention_recurrent .*: max \|difference\|.*the normaliser is missing"),
        (recurrent_calls_parallel, r"linear_attention_recurrent on \(1, 1, 2048, 32\): keeps \d+\.\d MiB at its peak, "
                                   r"at least half the 8 MiB .*: an RNN keeps one \(d, d_v\) state and updates it in "
                                   r"place of the prefix sums"),
        (recurrent_quadratic, r"on \(1, 1, 2048, 32\): keeps \d+\.\d MiB at its peak.*an RNN keeps one"),
        (recurrent_every_state, r"on \(1, 1, 2048, 32\): keeps \d+\.\d MiB at its peak.*an RNN keeps one"),
    ],
    "06.orthogonal_projection": [
        (projection_no_sign_correction, r"seed = 0 to 7999: the mean of the 8000 FAVOR\+ estimates .* standard errors "
                                        r"away \(4 pass\).*The first row's first coordinate is negative in 100% of the "
                                        r"draws.*sign of R\[i, i\]"),
        (projection_unit_rows, r"seed = 0 to 7999: the squared lengths of the 32000 rows have mean 1 and variance "
                               r"[0-9.e-]+, where rows marginally N\(0, I_4\) give 4 and 8"),
        (projection_sqrt_d_rows, r"the squared lengths of the 32000 rows have mean 4 and variance [0-9.e-]+, where"),
        (projection_reseeded_norms, r"seed = 0 to 7999: the mean of the 8000 FAVOR\+ estimates .* is [0-9.]+, while "
                                    r"exp\(q \. k\) = 1\.2840: [4-9]\.\d standard errors away"),
        (projection_same_blocks, r"orthogonal_projection\(24, 8, seed=\d+\): rows \d and \d+ have cosine 1\.0000: "
                                 r"blocks 0 and 1 are the same directions: draw a new Gaussian matrix for each block "
                                 r"from the one generator"),
        (projection_seeds_global_rng, r"orthogonal_projection: your function changed PyTorch's global random state"),
        (projection_cut_at_the_front, r"seed = 0 to 7999: the squared lengths of the 32000 rows have mean 16"),
        (projection_plain_gaussian, r"orthogonal_projection\(10, 4, seed=\d+\): rows \d and \d, in the block of rows 0 "
                                    r"to 3, have cosine -?0\.\d+: the rows of each block of d = 4 must be orthogonal"),
        (projection_global_rng, r"orthogonal_projection\(10, 4, seed=\d+\), called twice, returned two different "
                                r"matrices"),
    ],
    "06.performer": [
        (performer_no_norm_term, r"performer_features\(x of shape \(2, 3, 5, 8\), projection \(16, 8\)\) .*: max "
                                 r"\|difference\|.*the -\|x\|\^2 / 2 term is missing"),
        (performer_no_sqrt_m, r"max \|difference\|.*the 1/sqrt\(m\) factor is missing"),
        (performer_unit_projection, r"Performer attention .*against softmax attention: mean \|error\| .*must fall as"),
        (performer_float64_projection, r"Performer attention with performer_features and orthogonal_projection\(16, "
                                       r"16, seed=\d+\), .* raised RuntimeError: .*\. orthogonal_projection returns "
                                       r"torch.float64, and q and k are torch.float32"),
        (performer_float64_features, r"Performer attention .*against softmax attention: mean \|error\| .*must fall as"),
    ],
    "06.streaming_cache": [
        (cache_drops_sinks, r"StreamingKVCache\(n_sink=2, window=3\), after append 6 \(1 token; 6 tokens so far\): "
                            r"keys_values\(\) holds the tokens: \[1, 2, 3, 4, 5\], expected \[0, 1, 3, 4, 5\]\. the "
                            r"sinks are dropped"),
        (cache_window_minus_one, r"after append 6 .*: \[0, 1, 4, 5\], expected \[0, 1, 3, 4, 5\]\. the window holds 2 "
                                 r"tokens, one too few"),
        (cache_growing_list, r"StreamingKVCache\(n_sink=4, window=16\), appending 10000 tokens one at a time .*: the "
                             r"cache grows: after \d+ appends the tensors reachable from it take [\d,]+ bytes, more "
                             r"than 3 times the 672 bytes .*evict on every append; do not keep the whole history"),
        (cache_views_of_history, r"the cache grows: after \d+ appends the tensors reachable from it take [\d,]+ bytes"),
        (cache_compacts_at_twice, r"appending 10000 tokens one at a time .*: after \d+ appends the tensors reachable "
                                  r"from the cache still hold token \d+ \(its key or value\), which append \d+ "
                                  r"evicted"),
        (cache_rotates_keys, r"after append 1 .*: keys_values\(\) holds the tokens: \[-1\], expected \[0\]\. -1 stands "
                             r"for a key that is none of the appended ones: return the keys and values as they were "
                             r"appended, unrotated and unchanged"),
    ],
}
