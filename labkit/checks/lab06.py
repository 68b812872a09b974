"""Checks of Lab 6: sparse and long-context attention.

References: transformers' own sliding-window causal mask (``masking_utils.sdpa_mask`` with
``sliding_window_causal_mask_function``: i - W < j <= i) and F.scaled_dot_product_attention in float64 under it;
the strided heads of the Sparse Transformer's released code (openai/sparse_attention's ``get_attn_mask``);
Longformer's pattern by its definition (Beltagy et al. 2020: a band of window // 2 on each side, symmetric global
tokens) with a hand-drawn case; BigBird's blocks by properties (whole blocks, the 3-block window, global rows and
columns, exactly n_random more blocks per query block drawn anew for each, seeded by its own generator and leaving
the global one alone) and, without random blocks, exactly; linear attention the quadratic way in float64
(Katharopoulos et al.'s elu + 1, no 1/sqrt(d)); FAVOR+'s positive random features, with the mean of the estimates
exp(q.k) judged by its standard error, and softmax attention (F.scaled_dot_product_attention in float64) for the
Performer's error; StreamingLLM's eviction rule (a list-based StartRecentKVCache), and the bytes of tensor storage
the student's cache keeps alive and the tokens they hold. Complexity is judged by the bytes of the tensors the
student's code creates (``PeakTensorMemory``): at their peak against a T x T matrix or the T states of the
prefix sums, and in all (for sliding-window attention's work).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from labkit.checks import (ATTENTION_BUILTINS, as_tensor, close, compare, define, first_match, raised,
                           references as ref, seeded_generator)
from labkit.checks.kernel import PeakTensorMemory, attempt, run_cases

NO_BUILTINS = (*ATTENTION_BUILTINS, "labkit.nn")  # the attention exercises are written from tensor operations


# ---------------------------------------------------------------- masks: one helper names the first wrong pair
def as_mask(what: str, got, T: int) -> torch.Tensor:
    """``got`` as a (T, T) bool tensor on the CPU (a mask built on the notebook's device is judged by its values),
    or an ``AssertionError`` saying what came back instead."""
    if raised(got):
        raise AssertionError(f"{what} raised {raised(got)}")
    if not isinstance(got, torch.Tensor):
        raise AssertionError(f"{what}: expected a tensor, got {type(got).__name__}")
    if got.dtype != torch.bool:
        raise AssertionError(f"{what}: dtype {got.dtype}, expected torch.bool (True where query i may attend to key j)")
    if tuple(got.shape) != (T, T):
        raise AssertionError(f"{what}: shape {tuple(got.shape)}, expected ({T}, {T})")
    try:
        return got.detach().cpu()
    except (RuntimeError, NotImplementedError) as error:  # a meta tensor has no values to read
        raise AssertionError(f"{what}: a tensor on {got.device} whose values cannot be read ({error})") from None


def check_mask(what: str, got, want: torch.Tensor, rule: str, where=lambda i, j: "", suspects=None) -> None:
    """``got`` must equal the (T, T) bool mask ``want``. On a difference, name the first (query, key) pair they
    disagree on, what ``where(i, j)`` says of it and the ``rule``, then the first suspect that ``got`` equals."""
    got = as_mask(what, got, want.shape[0])
    wrong = torch.nonzero(got != want)
    if len(wrong):
        i, j = wrong[0].tolist()
        advice = first_match(got, suspects or {}, 0)
        raise AssertionError(f"{what}: query {i} {'sees' if got[i, j] else 'does not see'} key {j}{where(i, j)}: "
                             f"{rule}" + (f". {advice}" if advice else ""))


def back(i: int, j: int) -> str:
    """Where key j is from query i's point of view, in a causal mask."""
    return " (itself)" if i == j else f", which is {i - j} back" if j < i else f", {j - i} ahead (in the future)"


def grid(i: torch.Tensor | int, j: torch.Tensor | int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(T, 1) query and (1, T) key positions."""
    return torch.arange(i)[:, None], torch.arange(i if j is None else j)[None, :]


def mask_inputs(seed: int, cases: list[tuple], draw=None) -> dict:
    """A mask function's cases: fixed ``args``, and one more drawn by ``draw(g)`` from the seed."""
    g = seeded_generator(seed)
    return {"cases": [{"args": list(args)} for args in cases + ([draw(g)] if draw else [])]}


def randint(g: torch.Generator, low: int, high: int) -> int:
    """A Python int in [low, high]."""
    return int(torch.randint(low, high + 1, (1,), generator=g))


# ---------------------------------------------------------------- 1. the sliding-window mask
SLIDING_CASES = [(9, 3), (9, 1), (12, 5), (16, 4), (7, 7), (6, 9)]


def sliding_mask_inputs(seed: int, cases=SLIDING_CASES) -> dict:
    return mask_inputs(seed, cases, lambda g: (T := randint(g, 10, 30), randint(g, 2, T - 1)))


def sliding_mask_suspects(T: int, W: int) -> dict:
    i, j = grid(T)
    return {"the window is one too wide (j >= i - window gives window + 1 keys, flash-attention's window_size="
            "(window, 0)): query i sees window keys, itself included, as transformers' sliding_window counts them":
            lambda: ref.hf_sliding_window_mask(T, W + 1),
            "the window is one too narrow (window - 1 keys): query i sees window keys, itself included":
            lambda: ref.hf_sliding_window_mask(T, max(W - 1, 1)) if W > 1 else ~ref.hf_sliding_window_mask(T, 1),
            "the mask is not causal: a query sees no key after itself (j <= i)": lambda: (i - j).abs() < W,
            "the window is ignored: this is the plain causal mask": lambda: j <= i}


@define("06.sliding_window_mask", sliding_mask_inputs, run_cases)
def sliding_window_mask(inputs: dict, out: dict) -> str:
    for case, got in zip(inputs["cases"], out["outputs"], strict=True):
        T, W = case["args"]
        check_mask(f"sliding_window_mask({T}, {W})", got, ref.hf_sliding_window_mask(T, W),
                   f"with window {W} it sees i - {W} < j <= i", back,
                   sliding_mask_suspects(T, W) if W < T else {})
    return "equals transformers' sliding-window causal mask (i - W < j <= i), for W = 1, W < T and W >= T"


# ---------------------------------------------------------------- 2. Longformer, BigBird and strided masks
LONGFORMER_DRAWN = ["x x x x x x x x", "x x x x . . . .", "x x x x x . . .", "x x x x x x . .",
                    "x . x x x x x .", "x . . x x x x x", "x . . . x x x x", "x . . . . x x x"]  # (8, 4, [0])
LONGFORMER_CASES = [(8, 4, [0]), (12, 6, [0, 7]), (11, 3, [5]), (10, 4, []), (9, 8, [8])]


def longformer_reference(T: int, window: int, global_idx: list[int], rows: bool = True, cols: bool = True,
                         half: int | None = None) -> torch.Tensor:
    """Longformer's pattern by its definition (Beltagy et al. 2020, sections 3.1 and 3.2): a band of
    ``window // 2`` keys on each side, and symmetric global attention at ``global_idx`` (full rows and columns)."""
    i, j = grid(T)
    mask = (i - j).abs() <= (window // 2 if half is None else half)
    is_global = torch.zeros(T, dtype=torch.bool)
    is_global[list(global_idx)] = True
    return mask | (is_global[:, None] if rows else False) | (is_global[None, :] if cols else False)


def longformer_inputs(seed: int, cases=LONGFORMER_CASES) -> dict:
    def draw(g):
        T = randint(g, 12, 24)
        return T, randint(g, 2, 8), sorted(set(torch.randint(0, T, (2,), generator=g).tolist()))
    return mask_inputs(seed, cases, draw)


@define("06.longformer_mask", longformer_inputs, run_cases)
def longformer_mask(inputs: dict, out: dict) -> str:
    drawn = torch.tensor([[c == "x" for c in row.split()] for row in LONGFORMER_DRAWN])
    assert torch.equal(drawn, longformer_reference(8, 4, [0]))  # the picture and the definition agree
    for case, got in zip(inputs["cases"], out["outputs"], strict=True):
        T, W, idx = case["args"]
        is_global = set(idx)

        def where(i, j):
            said = [f"{abs(i - j)} apart"] + [f"{who} {p} is global" for who, p in (("query", i), ("key", j))
                                              if p in is_global]
            return f" ({'; '.join(said)})"

        rule = (f"with window {W} each token sees the keys |i - j| <= window // 2 = {W // 2} on both sides, "
                + (f"and the global tokens {sorted(is_global)} see every key and are seen by every query"
                   if is_global else "and there is no global token"))
        check_mask(f"longformer_mask({T}, {W}, {idx})", got, longformer_reference(T, W, idx), rule, where, {
            "the global tokens also need full columns: every query attends to them (mask[:, g] = True), not only "
            "they to every key": lambda: longformer_reference(T, W, idx, cols=False),
            "the global tokens also need full rows: they attend to every key (mask[g, :] = True), not only every "
            "query to them": lambda: longformer_reference(T, W, idx, rows=False),
            "the band is |i - j| <= window // 2: window is the band's whole width, window // 2 on each side":
            lambda: longformer_reference(T, W, idx, half=W),
            "the band is |i - j| <= window // 2, bounds included": lambda: longformer_reference(T, W, idx,
                                                                                              half=W // 2 - 1),
            "Longformer's mask is bidirectional (an encoder's): keys after the query are in its band too":
            lambda: longformer_reference(T, W, idx) & (grid(T)[1] <= grid(T)[0])})
    return ("a band of window // 2 on each side plus global rows and columns, as Longformer defines it (and as "
            "drawn by hand for T = 8)")


def bigbird_layout(n: int, n_global: int, window: bool = True, rows: bool = True, cols: bool = True) -> torch.Tensor:
    """(n, n) bool: BigBird's blocks without the random ones: the first ``n_global`` blocks global (full rows and
    columns) and each query block's window, key blocks b - 1, b and b + 1."""
    layout = torch.zeros(n, n, dtype=torch.bool)
    if rows:
        layout[:n_global, :] = True
    if cols:
        layout[:, :n_global] = True
    if window:
        qb, kb = grid(n)
        layout |= (qb - kb).abs() <= 1
    return layout


def tokens(layout: torch.Tensor, block: int) -> torch.Tensor:
    """A block layout expanded to a token mask."""
    return layout.repeat_interleave(block, 0).repeat_interleave(block, 1)


def bigbird_inputs(seed: int, exact=((32, 4, 0, 0), (24, 4, 0, 2)),
                   random=((64, 4, 2, 1), (48, 2, 3, 2), (40, 4, 2, 0), (64, 2, 2, 1))) -> dict:
    g = seeded_generator(seed)  # (T, block, n_random, n_global) of each case, and a seed each
    draw = lambda config: {"args": [*config, randint(g, 0, 10**6)], "rng": [randint(g, 0, 10**6) for _ in range(2)]}
    return {"exact": [draw(c) for c in exact], "random": [draw(c) for c in random]}


def bigbird_collect(inputs: dict, bigbird_mask) -> dict:
    """Each case's mask; each random case's mask twice with the same seed (the global RNG reseeded differently in
    between: the mask must not depend on it) and once with the next seed; and whether any call changed the global
    RNG's state (compared before and after each call). The global RNG is restored after."""
    state, changed = torch.random.get_rng_state(), []

    def call(*args):
        before = torch.random.get_rng_state()
        mask = attempt(bigbird_mask, *args)
        changed.append(not torch.equal(before, torch.random.get_rng_state()))
        return mask

    out = {"exact": [call(*case["args"]) for case in inputs["exact"]], "random": []}
    for case in inputs["random"]:
        T, block, n_random, n_global, seed = case["args"]
        torch.manual_seed(case["rng"][0])
        first = call(T, block, n_random, n_global, seed)
        torch.manual_seed(case["rng"][1])
        again = call(T, block, n_random, n_global, seed)
        out["random"].append({"mask": first, "again": again, "other": call(T, block, n_random, n_global, seed + 1)})
    torch.random.set_rng_state(state)
    out["changed_rng"] = any(changed)
    return out


GLOBAL_RNG = ("your function changed PyTorch's global random state (torch.manual_seed or a draw without "
              "generator=): draw from torch.Generator().manual_seed(seed)")


def bigbird_call(args: list) -> str:
    T, block, n_random, n_global, seed = args
    return f"bigbird_mask({T}, block={block}, n_random={n_random}, n_global={n_global}, seed={seed})"


def bigbird_rule(block: int, n_global: int) -> str:
    return (f"with blocks of {block} tokens, query block b sees key blocks b - 1, b and b + 1"
            + (f", the global blocks 0 to {n_global - 1} see every key and every query sees them" if n_global else "")
            + ", and each non-global query block n_random more key blocks")


def check_bigbird_random(what: str, got, args: list) -> torch.Tensor:
    """The properties of a mask with random blocks; returns its block layout."""
    T, block, n_random, n_global, _ = args
    n, mask = T // block, as_mask(what, got, T)
    blocks = mask.view(n, block, n, block)
    uneven = torch.nonzero((blocks != blocks[:, :1, :, :1]).any(dim=(1, 3)))
    if len(uneven):
        qb, kb = uneven[0].tolist()
        raise AssertionError(f"{what}: query block {qb} and key block {kb} (queries {qb * block} to "
                             f"{qb * block + block - 1}, keys {kb * block} to {kb * block + block - 1}) are partly "
                             f"masked: BigBird's mask is made of whole {block} x {block} blocks (build an (n, n) "
                             "layout of blocks, then repeat_interleave it by block along both axes)")
    layout = mask[::block, ::block]
    must = bigbird_layout(n, n_global)
    for qb, kb in torch.nonzero(must & ~layout).tolist()[:1]:
        part = ("of its window (b - 1, b, b + 1)" if abs(qb - kb) <= 1 else
                "a global block: every query sees them" if kb < n_global else
                f"though query block {qb} is global: it sees every key")
        raise AssertionError(f"{what}: query block {qb} does not see key block {kb}, {part}; "
                             + bigbird_rule(block, n_global))
    for qb in range(n_global, n):
        extra = torch.nonzero(layout[qb] & ~must[qb]).flatten().tolist()
        want = min(n_random, n - int(must[qb].sum()))
        if len(extra) != want:
            raise AssertionError(
                f"{what}: query block {qb} sees {len(extra)} key block{'s' * (len(extra) != 1)} beyond its window and "
                f"the global blocks ({extra}), expected min(n_random, {n - int(must[qb].sum())} candidates) = "
                f"{want}: draw n_random distinct key blocks among those neither in its window nor global")
    reach = layout | layout.T  # the attention graph of blocks, either way, is connected
    for _ in range(n):
        reach = reach | ((reach.double() @ reach.double()) > 0)
    if not reach.all():
        raise AssertionError(f"{what}: the blocks do not form a connected graph: some tokens can never exchange "
                             "information, through any number of layers")
    return layout


def check_bigbird_spread(what: str, layout: torch.Tensor, args: list) -> None:
    """With many blocks, the random blocks of the query blocks must spread over the key blocks: a fresh draw per
    query block covers most of them (on average 85% or more in the cases where this is checked, at least 20
    non-global blocks and n_random >= 2; half is over 5 standard deviations below), while one permutation shared by
    every query block gives them all the same handful."""
    T, block, n_random, n_global, _ = args
    n = T // block
    if n - n_global < 20 or n_random < 2:
        return
    used = int((layout & ~bigbird_layout(n, n_global))[n_global:].any(dim=0).sum())
    if used < (n - n_global) / 2:
        raise AssertionError(
            f"{what}: the random key blocks of the {n - n_global} non-global query blocks fall in only {used} of the "
            f"{n - n_global} non-global key blocks, where drawing anew for each query block spreads them over most "
            "of them (at least half): draw each query block's n_random blocks from the generator inside the loop "
            "over query blocks (torch.randperm(len(candidates), generator=g) for each), not one permutation shared "
            "by every query block")


@define("06.bigbird_mask", bigbird_inputs, bigbird_collect)
def bigbird_mask(inputs: dict, out: dict) -> str:
    for case, got in zip(inputs["exact"], out["exact"], strict=True):
        T, block, n_random, n_global, _ = case["args"]
        n = T // block
        want = bigbird_layout(n, n_global)
        every = n_random >= n - want.sum(-1, keepdim=True)  # rows whose every candidate is drawn
        assert n_random == 0 or every[n_global:].all(), "an exact case draws no block, or every candidate"
        where = lambda i, j: f" (query block {i // block}, key block {j // block})"
        drawn = " (here none)" if n_random == 0 else " (here all the candidates: n_random exceeds their number)"
        check_mask(bigbird_call(case["args"]), got, tokens(want | every, block), bigbird_rule(block, n_global) + drawn,
                   where, {
                       "there is no window: each query block sees key blocks b - 1, b and b + 1":
                       lambda: tokens(bigbird_layout(n, n_global, window=False), block),
                       "the window is 3 blocks, b - 1, b and b + 1: this one is a single block":
                       lambda: tokens(bigbird_layout(n, n_global, window=False) | torch.eye(n, dtype=torch.bool),
                                      block),
                       "the global blocks also need full columns: every query sees them":
                       lambda: tokens(bigbird_layout(n, n_global, cols=False), block),
                       "the global blocks also need full rows: they see every key":
                       lambda: tokens(bigbird_layout(n, n_global, rows=False), block),
                       "the window is counted in tokens: it is 3 blocks, b - 1, b and b + 1":
                       lambda: tokens(bigbird_layout(n, n_global, window=False), block) | (
                           (grid(T)[0] - grid(T)[1]).abs() <= 1)})
    for case, got in zip(inputs["random"], out["random"], strict=True):
        what, args = bigbird_call(case["args"]), case["args"]
        layout = check_bigbird_random(what, got["mask"], args)
        if not torch.equal(as_mask(f"{what}, called again", got["again"], args[0]),
                           as_mask(what, got["mask"], args[0])):
            raise AssertionError(
                f"{what}, called twice (torch.manual_seed({case['rng'][0]}), then torch.manual_seed({case['rng'][1]}) "
                "before each call): the two masks differ. The random blocks must depend on seed alone: draw them "
                "from g = torch.Generator().manual_seed(seed) (torch.randperm(n, generator=g)), not from the global "
                "random generator")
        other = check_bigbird_random(bigbird_call([*args[:4], args[4] + 1]), got["other"], args)
        n = args[0] // args[1]
        choices = math.prod(math.comb(n - int(row.sum()), args[2]) for row in bigbird_layout(n, args[3])[args[3]:])
        if choices >= 10**6 and torch.equal(other, layout):  # two seeds may well give the same mask otherwise
            raise AssertionError(f"{what} and seed={args[4] + 1} give the same mask: the random blocks must be drawn "
                                 "from a generator seeded with seed")
        check_bigbird_spread(what, layout, args)
    if out["changed_rng"]:
        raise AssertionError(f"bigbird_mask: {GLOBAL_RNG}")
    return ("whole blocks: a 3-block window, global rows and columns, exactly n_random more blocks per query block "
            "drawn anew for each, reproducible from its seed alone and leaving the global random state alone; exact "
            "without random blocks")


STRIDED_CASES = [(7, 3), (16, 4), (10, 1), (12, 5), (5, 8)]


def strided_inputs(seed: int, cases=STRIDED_CASES) -> dict:
    return mask_inputs(seed, cases, lambda g: (randint(g, 10, 30), randint(g, 2, 6)))


@define("06.strided_mask", strided_inputs, run_cases)
def strided_mask(inputs: dict, out: dict) -> str:
    for case, got in zip(inputs["cases"], out["outputs"], strict=True):
        T, s = case["args"]
        local, strided = ref.strided_masks(T, s)
        i, j = grid(T)
        check_mask(f"strided_mask({T}, {s})", got, local | strided,
                   f"query i sees the local keys i - {s} < j <= i and the strided keys j <= i with (i - j) % {s} == 0",
                   back, {
                       "this is the strided head alone: add the local head, i - stride < j <= i": strided,
                       "this is the local head alone: add the strided head, j <= i with (i - j) % stride == 0": local,
                       "the mask is not causal: neither head sees a key after the query (j <= i)":
                       lambda: ((i - j).abs() < s) | ((i - j) % s == 0)})
    return "the union of the Sparse Transformer's local and strided heads, as its released code builds them"


# ---------------------------------------------------------------- 3. sliding-window attention in O(T W) memory
def swa_inputs(seed: int, shape=(2, 2, 37, 16), windows=(5, 1, 8, 37, 50), memory=True) -> dict:
    g = seeded_generator(seed)
    q, k, v = torch.randn(3, *shape, generator=g)
    T = shape[2]
    cases = [{"what": f"sliding_window_attention on {tuple(q.shape)}, window {W}"
                      + (" (window >= T: plain causal attention)" if W >= T else
                         " (window 1: each query sees only itself)" if W == 1 else
                         " (T not a multiple of the window)" if T % W else ""), "args": [q, k, v, W]}
             for W in windows]
    if memory:
        q64, k64, v64 = torch.randn(3, 4, 4, 64, 16, generator=g)
        cases.append({"what": "sliding_window_attention on (4, 4, 64, 16), window 16 (T a multiple of the window)",
                      "args": [q64, k64, v64, 16]})
        return {"cases": cases, "memory": {"args": [*torch.randn(3, 1, 1, 8192, 32, generator=g), 256], "tail": 48}}
    return {"cases": cases}


def swa_collect(inputs: dict, sliding_window_attention) -> dict:
    """The cases' outputs; at T = 8192, its last outputs and the bytes of the tensors it creates, at their peak and in
    all (every new tensor's storage, freed or not)."""
    out = run_cases(inputs, sliding_window_attention)
    if "memory" in inputs:
        case = inputs["memory"]
        with torch.no_grad(), PeakTensorMemory() as memory:
            y = attempt(sliding_window_attention, *case["args"])
        tail = y[..., -case["tail"]:, :] if isinstance(y, torch.Tensor) and y.dim() == 4 else y
        out["memory"] = {"tail": tail, "peak": memory.peak, "total": memory.total}
    return out


def swa_hint(case: dict, got) -> str:
    """What to do; and, if only the last, partial chunk of queries is wrong, say so."""
    q, k, v, W = case["args"]
    T, hint = q.shape[-2], "softmax(q k^T / sqrt(d)) over the keys i - window < j <= i, for each query i"
    got = got.detach().cpu() if isinstance(got, torch.Tensor) else got
    if isinstance(got, torch.Tensor) and got.isnan().any():
        hint = ("a query that sees no key (every score -inf) gives NaN: query i sees i - window < j <= i, itself "
                "included, so it always sees at least one key")
    elif isinstance(got, torch.Tensor) and got.shape == q.shape and T % W and W < T:
        want = ref.sliding_window_attention(q, k, v, W)
        wrong = ~torch.isclose(got.double(), want, atol=1e-5, rtol=0).all(-1).all(0).all(0)  # (T,) wrong queries
        first = T - T % W
        if T // W >= 2 and wrong.any() and not wrong[:first].any():  # two whole chunks, right, before it
            hint = (f"only queries {first} to {T - 1} are wrong: T = {T} is not a multiple of the window {W}, so the "
                    f"last chunk of queries is a partial one ({T % W} quer{'ies' if T % W > 1 else 'y'}; end = "
                    "min(start + window, T))")
    return hint


@define("06.sliding_window_attention", swa_inputs, swa_collect, forbid=NO_BUILTINS)
def sliding_window_attention(inputs: dict, out: dict) -> str:
    by = "vs F.scaled_dot_product_attention in float64 under transformers' sliding-window mask"
    for case, got in zip(inputs["cases"], out["outputs"], strict=True):
        q, k, v, W = case["args"]
        suspects = {"the window is one too wide: window + 1 keys (j >= i - window); query i sees window keys, "
                    "itself included (i - window < j <= i)": lambda: ref.sliding_window_attention(q, k, v, W + 1)}
        if W > 1:
            suspects["the window is one too narrow: window - 1 keys (j > i - window + 1); query i sees window keys, "
                     "itself included (i - window < j <= i)"] = lambda: ref.sliding_window_attention(q, k, v, W - 1)
        if W < q.shape[-2]:
            suspects["this is plain causal attention: the window is ignored"] = lambda: F.scaled_dot_product_attention(
                q.double(), k.double(), v.double(), is_causal=True)
        compare(f"{case['what']} ({by})", got, ref.sliding_window_attention(q, k, v, W), 1e-5, swa_hint(case, got),
                suspects)
    if "memory" in inputs:
        case, got = inputs["memory"], out["memory"]
        (q, k, v, W), n = case["args"], case["tail"]
        B, H, T, d = q.shape
        compare(f"sliding_window_attention on {tuple(q.shape)}, window {W}: its last {n} outputs ({by})", got["tail"],
                ref.sliding_window_attention(q[..., -n:, :], k[..., -(n + W):, :], v[..., -(n + W):, :], W), 1e-5)
        what = f"sliding_window_attention on {tuple(q.shape)}, window {W}"
        dense = 2 * B * H * T * T * 4  # dense attention holds the (B, H, T, T) float32 scores and their softmax
        if got["peak"] >= dense / 8:
            raise AssertionError(
                f"{what}: the tensors it creates take {got['peak'] / 2**20:.1f} MiB at their peak, at least 1/8 of the "
                f"{dense / 2**20:.0f} MiB that dense attention's T x T float32 scores and softmax weights take: "
                "compute one chunk of window queries at a time, against the 2 window - 1 keys they can see, and never "
                "build a T x T tensor (not even the mask)")
        square = B * H * T * T * 4  # one T x T float32 matrix; the band's chunks create about a third of it in all
        if got["total"] >= square:
            raise AssertionError(
                f"{what}: the tensors it creates add up to {got['total'] / 2**20:.0f} MiB in all (freed or not), at "
                f"least the {square / 2**20:.0f} MiB of one T x T float32 matrix: it scores queries against keys "
                "outside their window, O(T^2) work. Each chunk of window queries [start, end) must be scored only "
                "against the 2 window - 1 keys it can see, [start - window + 1, end), not against all the keys before "
                "it")
        return ("equals F.scaled_dot_product_attention under transformers' sliding-window mask (W = 1, W >= T, T not a "
                "multiple of W); at T = 8192, W = 256 it computes only the band: its tensors peak under 1/8 of dense "
                "attention's T x T scores and weights, and add up to less than one T x T matrix")
    return ("equals F.scaled_dot_product_attention under transformers' sliding-window mask (W = 1, W >= T, T not a "
            "multiple of W)")


# ---------------------------------------------------------------- 4. linear attention, parallel and recurrent
FEATURE_MAPS = {"softplus": F.softplus, "exp": torch.exp}  # the feature maps a case may pass, by name


def linear_inputs(seed: int, recurrent: bool = False, B: int = 2, H: int = 2, T: int = 16, d: int = 8,
                  edge: bool = False) -> dict:
    """The cases; and, but for the edge cases, a long sequence whose peak memory is measured (T = 2048, B = H = 1:
    d = d_v = 32 for the recurrent form, whose (d, d_v) state is what it keeps; d = d_v = 8 for the parallel one,
    causal and not, whose prefix sums are then smaller than a T x T matrix)."""
    g = seeded_generator(seed)
    q, k = torch.randn(2, B, H, T, d, generator=g)
    v, v5 = torch.randn(B, H, T, d, generator=g), torch.randn(B, H, T, 5, generator=g)
    name = "linear_attention_recurrent" if recurrent else "linear_attention"
    shape = lambda vv: f"q, k {tuple(q.shape)}, v {tuple(vv.shape)}"
    if edge:  # a single position, and values of width 1
        v1 = torch.randn(B, H, T, 1, generator=g)
        cases = [{"what": f"{name}, T = 1", "args": [q[..., :1, :], k[..., :1, :], v5[..., :1, :]], "causal": True},
                 {"what": f"{name} with d_v = 1 ({shape(v1)})", "args": [q, k, v1], "causal": True}]
        if not recurrent:
            cases += [{"what": f"{name}, causal=False, T = 1", "args": [q[..., :1, :], k[..., :1, :], v[..., :1, :]],
                       "kwargs": {"causal": False}, "causal": False},
                      {"what": f"{name}, causal=False, d_v = 1", "args": [q, k, v1], "kwargs": {"causal": False},
                       "causal": False}]
        return {"cases": cases}
    cases = [{"what": f"{name} ({shape(v)})", "args": [q, k, v], "causal": True},
             {"what": f"{name} with d_v = 5 ({shape(v5)})", "args": [q, k, v5], "causal": True},
             {"what": f"{name} with feature_map=F.softplus ({shape(v)})", "args": [q, k, v], "causal": True,
              "feature_map": "softplus"}]
    if recurrent:
        q3, k3, v3 = torch.randn(3, 1, 3, 20, 6, generator=g)
        cases.append({"what": f"{name} on (1, 3, 20, 6)", "args": [q3, k3, v3], "causal": True})
        long = torch.randn(3, 1, 1, 2048, 32, generator=g)
        return {"cases": cases, "memory": [{"what": f"{name} on (1, 1, 2048, 32)", "args": list(long),
                                            "causal": True, "tail": 16}]}
    t = randint(g, 4, T - 4)  # the keys and values after position t change; outputs up to t must not
    k2, v2 = k.clone(), v.clone()
    k2[..., t + 1:, :], v2[..., t + 1:, :] = torch.randn(2, B, H, T - t - 1, d, generator=g)
    long = list(torch.randn(3, 1, 1, 2048, 8, generator=g))
    memory = [{"what": f"{name} on (1, 1, 2048, 8)" + (", causal=False" if not causal else ""), "args": long,
               "kwargs": {"causal": causal}, "causal": causal, "tail": 16} for causal in (True, False)]
    return {"memory": memory, "cases": cases + [
        {"what": f"{name}, causal=False ({shape(v5)})", "args": [q, k, v5], "kwargs": {"causal": False},
         "causal": False},
        {"what": f"{name}, causal=False, feature_map=torch.exp ({shape(v)})", "args": [q / 2, k / 2, v],
         "kwargs": {"causal": False}, "causal": False, "feature_map": "exp"},
        {"what": f"{name} with the keys and values after position {t} changed", "args": [q, k2, v2], "causal": True,
         "changed_after": t}]}


def linear_collect(inputs: dict, attention) -> dict:
    """Each case's output; a case's ``feature_map`` names a torch function passed as the feature_map argument. On
    each long sequence, the last outputs and the peak bytes of the tensors it creates."""
    maps = {"softplus": F.softplus, "exp": torch.exp}
    outputs = []
    with torch.no_grad():
        for case in inputs["cases"]:
            kwargs = dict(case.get("kwargs", {}))
            if "feature_map" in case:
                kwargs["feature_map"] = maps[case["feature_map"]]
            outputs.append(attempt(attention, *case["args"], **kwargs))
    if "memory" not in inputs:
        return {"outputs": outputs}
    memory = []
    for case in inputs["memory"]:
        with torch.no_grad(), PeakTensorMemory() as peak:
            y = attempt(attention, *case["args"], **case.get("kwargs", {}))
        memory.append({"tail": y[..., -case["tail"]:, :] if isinstance(y, torch.Tensor) and y.dim() == 4 else y,
                       "peak": peak.peak})
    return {"outputs": outputs, "memory": memory}


def linear_variant(q, k, v, causal: bool, feature_map=ref.elu_plus_one, denominator: str = "same",
                   scale_q: float = 1.0, scale_k: float = 1.0, strict: bool = False) -> torch.Tensor:
    """Wrong versions of linear attention, in float64: ``denominator`` "none" (no normaliser) or "total" (summed over
    every key, even when causal); q and k scaled before the feature map; ``strict``: keys j < i only."""
    fq, fk = feature_map(q.double() * scale_q), feature_map(k.double() * scale_k)
    A = fq @ fk.transpose(-1, -2)
    T = A.shape[-1]
    kept = A * torch.ones(T, T, dtype=torch.bool).tril(-1 if strict else 0) if causal else A
    numerator = kept @ v.double()
    if denominator == "none":
        return numerator
    return numerator / (A if denominator == "total" else kept).sum(-1, keepdim=True)


def relative(got, bug: torch.Tensor, rtol: float = 1e-5) -> torch.Tensor:
    """``bug``, or ``got`` itself if it is within a relative ``rtol`` of it: a suspect whose values are too large for
    compare's absolute tolerance (an unnormalised sum)."""
    near = (isinstance(got, torch.Tensor) and got.shape == bug.shape
            and torch.allclose(got.detach().cpu().double(), bug, rtol, 1e-5))
    return got if near else bug


def linear_suspects(case: dict, got=None) -> dict:
    q, k, v = case["args"]
    causal, d = case["causal"], q.shape[-1]
    fm = FEATURE_MAPS[case["feature_map"]] if "feature_map" in case else ref.elu_plus_one
    suspects = {
        ("this is non-causal linear attention: with causal=True, S_i and z_i sum over j <= i only (prefix sums, "
         "torch.cumsum along the time axis)" if causal else
         "this is causal linear attention: with causal=False every query sees every key (sums over all positions)"):
        lambda: ref.quadratic_linear_attention(q, k, v, not causal, fm),
        "the normaliser is missing: divide phi(q_i)^T S_i by phi(q_i)^T z_i, with z_i the sum of the phi(k_j)":
        lambda: relative(got, linear_variant(q, k, v, causal, fm, "none")),
        "the normaliser sums phi(k_j) over every position: in causal mode z_i sums over j <= i, as S_i does":
        lambda: linear_variant(q, k, v, causal, fm, "total"),
        "q and k are scaled by 1/sqrt(d) before the feature map: linear attention applies phi to q and k as they are":
        lambda: linear_variant(q, k, v, causal, fm, scale_q=d ** -0.5, scale_k=d ** -0.5),
        "q is scaled by 1/sqrt(d) before the feature map: linear attention applies phi to q and k as they are":
        lambda: linear_variant(q, k, v, causal, fm, scale_q=d ** -0.5),
        "q and k are scaled by d^(-1/4) before the feature map: linear attention applies phi to q and k as they are":
        lambda: linear_variant(q, k, v, causal, fm, scale_q=d ** -0.25, scale_k=d ** -0.25),
        "the default feature map is elu(x) + 1 (positive), not elu(x)":
        lambda: ref.quadratic_linear_attention(q, k, v, causal, F.elu)}
    if "feature_map" in case:
        suspects["the feature_map argument is ignored: apply feature_map (elu_plus_one by default) to q and k"] = (
            lambda: ref.quadratic_linear_attention(q, k, v, causal))
    return suspects


LINEAR_HINT = ("phi(q_i)^T S_i / phi(q_i)^T z_i, with S_i = sum of phi(k_j) v_j^T and z_i = sum of phi(k_j) over "
               "j <= i (over every j when causal=False), phi = feature_map applied to q and k as they are")


def check_causal(inputs: dict, outputs: list) -> None:
    """Behaviour, before any reference: with the keys and values after t changed, the outputs up to t must not move
    (the case that says ``changed_after`` against the first case)."""
    for case, got in zip(inputs["cases"], outputs, strict=True):
        if "changed_after" not in case:
            continue
        first, t = inputs["cases"][0], case["changed_after"]
        before = as_tensor(first["what"], outputs[0], first["args"][2].shape)
        now = as_tensor(case["what"], got, case["args"][2].shape)
        moved = (now - before)[..., :t + 1, :].abs().amax(dim=(0, 1, 3)) > 1e-5
        if moved.any():
            diagnosis = first_match(outputs[0], linear_suspects(first, outputs[0]))
            raise AssertionError(
                f"{case['what']}: the output at position {int(torch.nonzero(moved)[0])} changed, though only keys and "
                f"values after position {t} did: causal linear attention sums over j <= i only (prefix sums along "
                "the time axis)" + (f". {diagnosis}" if diagnosis else ""))


def check_linear(inputs: dict, out: dict, by: str) -> None:
    outputs = out["outputs"]
    check_causal(inputs, outputs)
    for case, got in zip(inputs["cases"], outputs, strict=True):
        q, k, v = case["args"]
        fm = FEATURE_MAPS[case["feature_map"]] if "feature_map" in case else ref.elu_plus_one
        want = ref.quadratic_linear_attention(q, k, v, case["causal"], fm)
        if "recurrent" in by and isinstance(got, torch.Tensor) and got.shape == want.shape and q.shape[-2] > 1:
            strict = linear_variant(q, k, v, True, fm, strict=True)
            if close(got[..., 1:, :], strict[..., 1:, :]):
                raise AssertionError(
                    f"{case['what']} ({by}): output t sums over the keys j < t, without the current one (and "
                    "output 0 divides 0 by 0): add phi(k_t) v_t^T to S and phi(k_t) to z first, then read "
                    "phi(q_t)^T S / phi(q_t)^T z")
        compare(f"{case['what']} ({by})", got, want, 1e-5, LINEAR_HINT, linear_suspects(case, got))
    for case, got in zip(inputs.get("memory", []), out.get("memory", []), strict=True):
        (q, k, v), n = case["args"], case["tail"]
        compare(f"{case['what']}: its last {n} outputs ({by})", got["tail"],
                ref.quadratic_linear_attention(q[..., -n:, :], k, v, case["causal"]), 1e-5, LINEAR_HINT)
        B, H, T, d = q.shape
        if "recurrent" in by:
            states = B * H * T * d * v.shape[-1] * 4  # the (B, H, T, d, d_v) float32 prefix sums of the parallel form
            if got["peak"] >= states / 2:
                raise AssertionError(
                    f"{case['what']}: keeps {got['peak'] / 2**20:.1f} MiB at its peak, at least half the "
                    f"{states / 2**20:.0f} MiB of the T states (T, d, d_v) that the parallel form's prefix sums hold: "
                    "an RNN keeps one (d, d_v) state and updates it in place of the prefix sums: for t in range(T), "
                    "S = S + phi(k_t) v_t^T and z = z + phi(k_t), then read phi(q_t)^T S / phi(q_t)^T z. Do not call "
                    "linear_attention, build phi(Q) phi(K)^T, or keep every step's state")
        else:
            square = B * H * T * T * 4  # one (B, H, T, T) float32 matrix
            if got["peak"] >= square / 4:
                raise AssertionError(
                    f"{case['what']}: the tensors it creates take {got['peak'] / 2**20:.1f} MiB at their peak, at "
                    f"least a quarter of the {square / 2**20:.0f} MiB of one T x T float32 matrix: it builds a T x T "
                    "matrix (phi(Q) phi(K)^T). Use prefix sums instead: torch.cumsum along the time axis of the "
                    "phi(k_j) v_j^T (B, H, T, d, d_v) and of the phi(k_j) (with causal=False, their sums over every j)")


@define("06.linear_attention", linear_inputs, linear_collect, forbid=NO_BUILTINS)
def linear_attention(inputs: dict, out: dict) -> str:
    check_linear(inputs, out, "vs (phi(Q) phi(K)^T, masked) V / row sums, in float64")
    return ("equals (phi(Q) phi(K)^T) V / row sums in float64, causal or not, with elu + 1 or a given feature map, "
            "d_v != d; outputs do not depend on later keys" + (
                "; at T = 2048 it builds no T x T matrix (prefix sums)" if "memory" in inputs else ""))


@define("06.linear_attention_recurrent", lambda seed: linear_inputs(seed, recurrent=True), linear_collect,
        forbid=NO_BUILTINS)
def linear_attention_recurrent(inputs: dict, out: dict) -> str:
    check_linear(inputs, out, "vs causal (phi(Q) phi(K)^T, masked) V / row sums, in float64, for a recurrent form")
    return ("equals causal linear attention computed the quadratic way in float64, with elu + 1 or a given feature "
            "map" + ("; at T = 2048 it keeps one (d, d_v) state, not T of them" if "memory" in inputs else ""))


# ---------------------------------------------------------------- 5. Performer: orthogonal random features
N_DRAWS = 8000  # draws of a (4, 4) projection for the statistics, seeds 0 .. N_DRAWS - 1 (fixed: no flaky failure)
UNBIASED = [(0.5, 0), (0.5, 3)]  # q = k = a e_i (d = 4): without the sign correction the estimates are biased here


def projection_inputs(seed: int, shapes=((10, 4), (16, 4), (3, 8), (24, 8)), draws: int | None = N_DRAWS) -> dict:
    g = seeded_generator(seed)
    inputs = {"shapes": [[n, d, randint(g, 0, 10**6)] for n, d in shapes]}
    return inputs | ({"draws": {"size": [4, 4], "seeds": [0, draws]}} if draws else {})


def projection_collect(inputs: dict, orthogonal_projection) -> dict:
    """Each shape's projection, the first again and with the next seed, and a stack of draws at seeds a .. b - 1
    (none if the first calls changed the global RNG's state: verify says so first); and whether the calls changed
    the global RNG's state (restored after)."""
    state = torch.random.get_rng_state()
    out = {"shapes": [attempt(orthogonal_projection, *args) for args in inputs["shapes"]]}
    n, d, seed = inputs["shapes"][0]
    out["again"], out["other"] = (attempt(orthogonal_projection, n, d, s) for s in (seed, seed + 1))
    if "draws" in inputs and not torch.equal(state, torch.random.get_rng_state()):
        out["draws"] = None
    elif "draws" in inputs:
        (n, d), (a, b) = inputs["draws"]["size"], inputs["draws"]["seeds"]
        draws = []
        for s in range(a, b):
            W = attempt(orthogonal_projection, n, d, s)
            if not isinstance(W, torch.Tensor) or tuple(W.shape) != (n, d):
                draws = W
                break
            draws.append(W)
        out["draws"] = torch.stack(draws) if isinstance(draws, list) else draws
    out["changed_rng"] = not torch.equal(state, torch.random.get_rng_state())
    torch.random.set_rng_state(state)
    return out


def check_orthogonal_blocks(what: str, W: torch.Tensor, d: int) -> None:
    """The rows of each block of d must be orthogonal: (..., m, d). When d does not divide m, the shorter block may
    be the last (blocks from row 0, ``torch.cat(blocks)[:m]``) or the first (``torch.cat(blocks)[-m:]``)."""
    norms = W.norm(dim=-1, keepdim=True)
    if (norms == 0).any():
        raise AssertionError(f"{what}: a row is zero")
    U, m = W / norms, W.shape[-2]
    problems = [_unorthogonal_block(what, U, d, starts) for starts in
                ([*range(0, m, d)], [0, *range(m % d, m, d)] if m % d else None) if starts is not None]
    if all(problems):
        raise AssertionError(problems[0])


def _unorthogonal_block(what: str, U: torch.Tensor, d: int, starts: list[int]) -> str:
    """What is wrong with the first block of unit rows U (..., m, d), the blocks starting at ``starts``, whose rows
    are not orthogonal ("" if none)."""
    for start, end in zip(starts, [*starts[1:], U.shape[-2]]):
        block = U[..., start:end, :]
        cos = block @ block.transpose(-1, -2) - torch.eye(end - start, dtype=U.dtype)
        if cos.abs().max() > 1e-4:
            worst = torch.nonzero(cos.abs() == cos.abs().max())[0].tolist()
            *draw, r, c = worst
            at = f" (draw {draw[0]})" if draw else ""
            return (f"{what}{at}: rows {start + r} and {start + c}, in the block of rows {start} to {end - 1}, have "
                    f"cosine {cos[tuple(worst)].item():.3f}: the rows of each block of d = {d} must be orthogonal (the "
                    "columns of Q, Q from torch.linalg.qr of a d x d Gaussian matrix), each then scaled to a random "
                    "length")
    return ""


def check_distinct_blocks(what: str, W: torch.Tensor, d: int) -> None:
    """With d >= 8 dividing m, no row of one block may be (nearly) parallel to a row of another: independent blocks
    have |cosine| > 0.999 with a probability of about 1e-10 a pair, a block drawn again from the same seed has 1."""
    m = W.shape[-2]
    if d < 8 or m % d or m < 2 * d:
        return
    U = W / W.norm(dim=-1, keepdim=True)
    cos = (U @ U.T).abs()
    block = torch.arange(m) // d
    cos[block[:, None] == block[None, :]] = 0
    if cos.max() >= 0.999:
        r, c = torch.nonzero(cos == cos.max())[0].tolist()
        raise AssertionError(
            f"{what}: rows {r} and {c} have cosine {(U[r] @ U[c]).item():.4f}: blocks {r // d} and {c // d} are the "
            "same directions: draw a new Gaussian matrix for each block from the one generator (seed it once, "
            "before the loop over blocks)")


@define("06.orthogonal_projection", projection_inputs, projection_collect)
def orthogonal_projection(inputs: dict, out: dict) -> str:
    mats = []
    for (n, d, seed), got in zip(inputs["shapes"], out["shapes"], strict=True):
        what = f"orthogonal_projection({n}, {d}, seed={seed})"
        W = as_tensor(what, got, (n, d))
        check_orthogonal_blocks(what, W, d)
        check_distinct_blocks(what, W, d)
        mats.append(W)
    n, d, seed = inputs["shapes"][0]
    what = f"orthogonal_projection({n}, {d}, seed={seed})"
    if not torch.equal(as_tensor(f"{what}, called again", out["again"], (n, d)), mats[0]):
        raise AssertionError(f"{what}, called twice, returned two different matrices: draw everything from "
                             "g = torch.Generator().manual_seed(seed) (generator=g), not from the global generator")
    if torch.equal(as_tensor(f"orthogonal_projection({n}, {d}, seed={seed + 1})", out["other"], (n, d)), mats[0]):
        raise AssertionError(f"{what} and seed={seed + 1} return the same matrix: the draws must depend on seed")
    if out["changed_rng"]:
        raise AssertionError(f"orthogonal_projection: {GLOBAL_RNG}")
    if "draws" not in inputs:
        return "blocks of orthogonal rows, distinct from block to block, reproducible from the seed"
    (m, d), (a, b) = inputs["draws"]["size"], inputs["draws"]["seeds"]
    what = f"orthogonal_projection({m}, {d}, seed) for seed = {a} to {b - 1}"
    Ws = as_tensor(what, out["draws"], (b - a, m, d))
    check_orthogonal_blocks(what, Ws, d)
    sq = Ws.pow(2).sum(-1).flatten()  # chi-squared(d): mean d, variance 2d
    mean, var, se = sq.mean().item(), sq.var().item(), math.sqrt(2 * d / sq.numel())
    if abs(mean - d) > 4 * se or not 0.85 * 2 * d < var < 1.15 * 2 * d:
        raise AssertionError(
            f"{what}: the squared lengths of the {sq.numel()} rows have mean {mean:.3g} and variance {var:.3g}, where "
            f"rows marginally N(0, I_{d}) give {d} and {2 * d} (chi-squared with {d} degrees of freedom): scale each "
            "row by the norm of a fresh Gaussian d-vector (not to length 1, nor to sqrt(d))")
    negative = (Ws[:, 0, 0] < 0).double().mean().item()
    for a_, axis in UNBIASED:
        x = torch.zeros(d, dtype=torch.float64)
        x[axis] = a_
        phi = ref.positive_random_features(x, Ws)  # (draws, m): q = k = x
        estimates = (phi * phi).sum(-1)
        exact, mean, se = math.exp(x @ x), estimates.mean().item(), estimates.std().item() / math.sqrt(len(estimates))
        if abs(mean - exact) > 4 * se:
            tilted = abs(negative - 0.5) > 0.1
            raise AssertionError(
                f"{what}: the mean of the {b - a} FAVOR+ estimates phi(q) . phi(k) (FAVOR+'s positive features on "
                f"your projections; q = k = {a_} e_{axis}) is {mean:.4f}, while exp(q . k) = {exact:.4f}: "
                f"{abs(mean - exact) / se:.1f} standard errors away (4 pass). Each row must be marginally N(0, I_d) "
                "for the estimate to be unbiased" + (
                    f". The first row's first coordinate is negative in {negative:.0%} of the draws (about half, "
                    "for rows uniform in direction): torch.linalg.qr's Q is not uniformly distributed; multiply "
                    "column i of Q by the sign of R[i, i] (Q * torch.sign(torch.diagonal(R)))" if tilted else ""))
    return (f"blocks of orthogonal rows with chi(d) lengths, distinct from block to block, reproducible from the seed "
            f"without touching the global random state; over {b - a} draws the FAVOR+ estimate of exp(q . k) is "
            "unbiased (within 4 standard errors)")


def performer_inputs(seed: int) -> dict:
    g = seeded_generator(seed)
    exact = []
    for shape, m in (((2, 3, 5, 8), 16), ((7, 8), 24), ((8,), 8)):
        W = ref.orthogonal_gaussian(m, shape[-1], g).float()
        exact.append([0.5 * torch.randn(shape, generator=g), W])
    q, k = 0.5 * torch.randn(2, 1, 1, 32, 16, generator=g)
    v = torch.randn(1, 1, 32, 16, generator=g)
    return {"exact": exact, "attention": [q, k, v], "n_features": [16, 64, 256, 1024],
            "seeds": [randint(g, 0, 10**6) + s for s in range(8)]}


def performer_collect(inputs: dict, performer_features, orthogonal_projection) -> dict:
    """The features for given projections; and non-causal Performer attention, with the student's features on q and
    k scaled by d^(-1/4) and projections of each size, for each seed: normalised phi(q) phi(k)^T V, in float64 (the
    features' values are judged, whatever their dtype); and the first projection, for its dtype."""
    q, k, v = inputs["attention"]
    scale = q.shape[-1] ** -0.25

    def performer_attention(m, seed):
        W = orthogonal_projection(m, q.shape[-1], seed)
        A = performer_features(q * scale, W) @ performer_features(k * scale, W).transpose(-1, -2)  # (B, H, T, T)
        A = A.double()
        return A @ v.to(A.device, torch.float64) / A.sum(-1, keepdim=True)

    with torch.no_grad():
        return {"features": [attempt(performer_features, x, W) for x, W in inputs["exact"]],
                "approx": [[attempt(performer_attention, m, seed) for seed in inputs["seeds"]]
                           for m in inputs["n_features"]],
                "projection": attempt(orthogonal_projection, inputs["n_features"][0], q.shape[-1], inputs["seeds"][0])}


@define("06.performer", performer_inputs, performer_collect)
def performer(inputs: dict, out: dict) -> str:
    for (x, W), got in zip(inputs["exact"], out["features"], strict=True):
        m = W.shape[0]
        want = ref.positive_random_features(x, W)
        norm = x.double().pow(2).sum(-1, keepdim=True)
        xw = x.double() @ W.double().T
        compare(f"performer_features(x of shape {tuple(x.shape)}, projection ({m}, {x.shape[-1]})) (vs FAVOR+'s "
                "positive features, float64)", got, want, 1e-5 * max(1.0, want.abs().max().item()),  # float32's
                "exp(x W^T - |x|^2 / 2) / sqrt(m), x as it is", {
                    "the -|x|^2 / 2 term is missing: exp(x W^T - |x|^2 / 2) / sqrt(m)":
                    lambda: torch.exp(xw) / math.sqrt(m),
                    "the 1/sqrt(m) factor is missing: exp(x W^T - |x|^2 / 2) / sqrt(m)": lambda: want * math.sqrt(m),
                    "divide by sqrt(m), not by m": lambda: want / math.sqrt(m),
                    "subtract |x|^2 / 2, half the squared norm": lambda: torch.exp(xw - norm) / math.sqrt(m),
                    "performer_features takes x as it is: the d^(-1/4) scaling is the caller's":
                    lambda: ref.positive_random_features(x * x.shape[-1] ** -0.25, W)})
    q, k, v = inputs["attention"]
    exact = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    errors = []
    for m, row in zip(inputs["n_features"], out["approx"], strict=True):
        errs = []
        for seed, got in zip(inputs["seeds"], row, strict=True):
            what = (f"Performer attention with performer_features and orthogonal_projection({m}, {q.shape[-1]}, "
                    f"seed={seed}), on q and k of shape {tuple(q.shape)} scaled by d^(-1/4)")
            try:
                errs.append((as_tensor(what, got, v.shape) - exact).abs().mean().item())
            except AssertionError as error:
                W = out["projection"]
                if isinstance(W, torch.Tensor) and W.dtype != q.dtype:
                    raise AssertionError(
                        f"{error}. orthogonal_projection returns {W.dtype}, and q and k are {q.dtype}: x @ W.T needs "
                        f"one dtype; draw the projection in the default dtype ({q.dtype}), as x is") from None
                raise
        errors.append(sum(errs) / len(errs))
    said = ", ".join(f"{e:.3g} at m = {m}" for m, e in zip(inputs["n_features"], errors))
    if not errors[-1] < errors[0] / 2.5 or any(b > 1.25 * a for a, b in zip(errors, errors[1:])):
        raise AssertionError(
            f"Performer attention (your features and projections; q and k scaled by d^(-1/4)) against softmax "
            f"attention: mean |error| {said} (averaged over {len(inputs['seeds'])} seeds); it must fall as the number "
            "of features m grows (about as 1/sqrt(m)): check that the projection's rows are N(0, I_d) and that "
            "performer_features uses the projection it is given")
    return ("features equal FAVOR+'s exp(W x - |x|^2/2)/sqrt(m); with your projections, Performer attention's error "
            "against softmax attention falls as m grows from 16 to 1024")


# ---------------------------------------------------------------- 6. StreamingLLM's cache
STREAMING_RUNS = [(2, 3, [1, 1, 1, 1, 1, 1, 3, 1, 1, 2, 1, 1, 1]), (0, 4, [1, 1, 1, 1, 1, 2, 1, 1, 1]),
                  (4, 5, [2, 1, 1, 3, 1, 1, 1, 1, 4, 1, 1, 1]), (1, 1, [1, 1, 1, 1, 1, 1])]


def streaming_inputs(seed: int, runs=STREAMING_RUNS, memory=(4, 16, 10_000)) -> dict:
    g = seeded_generator(seed)
    inputs = {"runs": [{"n_sink": s, "window": w, "chunks": chunks,
                        "k": torch.randn(1, 2, sum(chunks), 4, generator=g),
                        "v": torch.randn(1, 2, sum(chunks), 4, generator=g)} for s, w, chunks in runs]}
    if not memory:
        return inputs
    s, w, n = memory  # the run stops once the cache holds more than 4 times n_sink + window + 1 tokens (3 may pass)
    return inputs | {"memory": {"n_sink": s, "window": w, "appends": n, "d": 4, "stop_above": 4 * (s + w + 1) * 32}}


def streaming_collect(inputs: dict, StreamingKVCache) -> dict:
    """After every append, a copy of keys_values(); and, over many single-token appends (token i's key all i + 0.5,
    its value all -(i + 0.5)), measured every 10 appends once the cache is full until the run ends or exceeds
    ``stop_above``: the most bytes of tensor storage that the cache object keeps alive (every tensor reachable from
    its attributes, each storage once), and (every 50 appends) the first evicted token (but the last) whose key or
    value is still in one of those floating-point storages (-1 for none), with the number of appends then."""
    def step(cache, k, v):
        cache.append(k, v)
        keys, values = cache.keys_values()
        return [keys.clone(), values.clone()]  # a copy: the cache may change its tensors in place

    def reachable(root) -> dict:
        """A tensor on each storage reachable from ``root``, by the storage's address."""
        seen, storages, todo = set(), {}, [root]
        while todo:
            x = todo.pop()
            if id(x) in seen or isinstance(x, (type, type(torch), str, bytes, int, float, bool)) or x is None:
                continue
            seen.add(id(x))
            if isinstance(x, torch.Tensor):
                storage = x.untyped_storage()
                if storage.nbytes():
                    storages[storage.data_ptr()] = x
            elif isinstance(x, dict):
                todo += list(x.keys()) + list(x.values())
            elif isinstance(x, (list, tuple, set, frozenset)) or type(x).__name__ == "deque":
                todo += list(x)
            else:
                todo += list(getattr(x, "__dict__", {}).values())
                todo += [getattr(x, name) for name in getattr(type(x), "__slots__", ()) if hasattr(x, name)]
        return storages

    def evicted_held(storages: dict, n: int) -> int:
        """The first token evicted after n appends still in a floating-point storage, but for the one the last append
        evicted (a buffer of n_sink + window + 1 may hold it until the next): n_sink <= i < n - window - 1."""
        first = -1
        for x in storages.values():
            if not x.is_floating_point() or x.is_meta:
                continue
            whole = torch.empty(0, dtype=x.dtype, device=x.device).set_(x.untyped_storage()).double().abs() - 0.5
            found = whole[(whole == whole.round()) & (whole >= mem["n_sink"]) & (whole < n - mem["window"] - 1)]
            if found.numel() and (first < 0 or found.min() < first):
                first = int(found.min())
        return first

    out = {"runs": []}
    with torch.no_grad():
        for run in inputs["runs"]:
            cache, held, start = attempt(StreamingKVCache, run["n_sink"], run["window"]), [], 0
            for t in run["chunks"]:
                if isinstance(cache, dict):
                    held.append(cache)
                    break
                held.append(attempt(step, cache, run["k"][..., start:start + t, :].clone(),
                                    run["v"][..., start:start + t, :].clone()))
                start += t
                if isinstance(held[-1], dict):
                    break
            out["runs"].append(held)
        if "memory" in inputs:
            mem = inputs["memory"]
            cache, most, at, last = attempt(StreamingKVCache, mem["n_sink"], mem["window"]), 0, -1, None
            full, stale, stale_at = mem["n_sink"] + mem["window"], -1, -1
            for i in range(mem["appends"] if not isinstance(cache, dict) else 0):
                x = torch.full((1, 1, 1, mem["d"]), i + 0.5)
                last = attempt(cache.append, x, -x)
                if isinstance(last, dict):
                    break
                if i >= full and (i % 10 == 0 or i == mem["appends"] - 1):
                    storages = reachable(cache)
                    size = sum(x.untyped_storage().nbytes() for x in storages.values())
                    most, at = (size, i + 1) if size > most else (most, at)
                    if stale < 0 and i % 50 == 0:
                        stale, stale_at = evicted_held(storages, i + 1), i + 1
                    if most > mem["stop_above"]:
                        break
            final = cache if isinstance(cache, dict) else last if isinstance(last, dict) else attempt(
                lambda: [t.clone() for t in cache.keys_values()])
            out["memory"] = {"most": most, "at": at, "final": final, "stale": stale,
                             "stale_at": stale_at if stale >= 0 else -1}
    return out


def held_tokens(keys: torch.Tensor, k_all: torch.Tensor) -> list[int]:
    """Which of the tokens (B, H, T, d) each of the held keys (B, H, n, d) is (-1 for none)."""
    same = (keys.double()[..., :, None, :] == k_all.double()[..., None, :, :]).all(-1).all(0).all(0)  # (n, T)
    return [int(row.nonzero()[0]) if row.any() else -1 for row in same]


@define("06.streaming_cache", streaming_inputs, streaming_collect)
def streaming_cache(inputs: dict, out: dict) -> str:
    for run, steps in zip(inputs["runs"], out["runs"], strict=True):
        s, w, k_all, v_all = run["n_sink"], run["window"], run["k"], run["v"]
        reference, start = ref.streaming_cache_reference(s, w), 0
        for a, (t, got) in enumerate(zip(run["chunks"], steps)):
            reference.append(k_all[..., start:start + t, :], v_all[..., start:start + t, :])
            start += t
            what = (f"StreamingKVCache(n_sink={s}, window={w}), after append {a + 1} ({t} token{'s' * (t > 1)}; "
                    f"{start} token{'s' * (start > 1)} so far)")
            if raised(got):
                raise AssertionError(f"{what}: append, then keys_values(), raised {raised(got)}")
            if not isinstance(got, (list, tuple)) or len(got) != 2:
                raise AssertionError(f"{what}: keys_values() must return (keys, values)")
            want_k, want_v = reference.keys_values()
            keys = as_tensor(f"{what}: the keys of keys_values()", got[0])
            if keys.dim() != 4 or keys.shape[:2] != want_k.shape[:2] or keys.shape[-1] != want_k.shape[-1]:
                raise AssertionError(f"{what}: keys_values() gives keys of shape {tuple(keys.shape)}, expected "
                                     f"(B, H, n, d) = {tuple(want_k.shape)}")
            n, full, tokens = start, s + w, held_tokens(keys, k_all)
            unknown = ("-1 stands for a key that is none of the appended ones: return the keys and values as they were "
                       "appended, unrotated and unchanged; " if -1 in tokens else "")
            compare(f"{what}: keys_values() holds the tokens", tokens, reference.token_positions(),
                    hint=f"{unknown}keep the first n_sink = {s} tokens (the attention sinks) and the last window = "
                    f"{w}, the current ones included", suspects={
                        "the sinks are dropped: the first n_sink tokens stay forever":
                        list(range(max(0, n - full), n)),
                        f"the window holds {w - 1} tokens, one too few: keep the last window = {w}":
                        list(range(min(s, n))) + list(range(max(s, n - w + 1), n)) if n > full else None,
                        f"the window holds {w + 1} tokens, one too many: evict once the cache holds more than "
                        f"n_sink + window = {full}": list(range(min(s, n))) + list(range(max(s, n - w - 1), n)),
                        "nothing is evicted": list(range(n))})
            compare(f"{what}: the keys of keys_values(), in order", keys, want_k, 0)
            compare(f"{what}: the values of keys_values(), each with its key", got[1], want_v, 0)
        if len(steps) < len(run["chunks"]):
            raise AssertionError(f"StreamingKVCache(n_sink={s}, window={w}) stopped after {len(steps)} appends")
    if "memory" in inputs:
        mem, got = inputs["memory"], out["memory"]
        s, w, n, d = mem["n_sink"], mem["window"], mem["appends"], mem["d"]
        what = f"StreamingKVCache(n_sink={s}, window={w}), appending {n} tokens one at a time (1, 1, 1, {d})"
        final = got["final"]
        if raised(final):
            raise AssertionError(f"{what} raised {raised(final)}")
        need = (s + w + 1) * 2 * d * 4  # k and v of n_sink + window + 1 float32 tokens
        if got["most"] > 3 * need:  # room for positions, k and v stacked, a copy: not for a history
            raise AssertionError(
                f"{what}: the cache grows: after {got['at']} appends the tensors reachable from it take "
                f"{got['most']:,} bytes, more than 3 times the {need:,} bytes that the keys and values of n_sink + "
                f"window + 1 = {s + w + 1} tokens need: evict on every append; do not keep the whole history (or "
                "views into it: a slice keeps its whole storage alive, torch.cat makes a copy)")
        if got["stale"] >= 0:
            token = got["stale"]
            raise AssertionError(
                f"{what}: after {got['stale_at']} appends the tensors reachable from the cache still hold token "
                f"{token} (its key or value), which append {token + w + 1} evicted: keep exactly the first n_sink and "
                "the last window tokens after every append; do not let evicted tokens pile up to compact them now "
                "and then, nor keep them in a larger buffer")
        kept = [*range(s), *range(n - w, n)]
        if not isinstance(final, (list, tuple)) or len(final) != 2:
            raise AssertionError(f"{what}: keys_values() must return (keys, values)")
        compare(f"{what}: keys_values() at the end (the keys of token i are all i + 0.5)", final[0],
                torch.tensor(kept, dtype=torch.float64).view(1, 1, -1, 1).expand(1, 1, len(kept), d) + 0.5, 0)
        return ("after every append, the first n_sink tokens and the last window ones, as StreamingLLM's "
                "StartRecentKVCache keeps them; over 10,000 appends its memory stays bounded and it holds no evicted "
                "token")
    return ("after every append, the first n_sink tokens and the last window ones, as StreamingLLM's "
            "StartRecentKVCache keeps them")
