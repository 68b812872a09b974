"""Plausible wrong implementations of Lab 5, each paired with the message its check must give.

Each factory takes the solution's namespace and returns the arguments of one check call.
"""
from __future__ import annotations

import copy
import math

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F


# ---------------------------------------------------------------- the router
def router_with(ns, bug):
    class TopKRouter(ns["TopKRouter"]):
        def forward(self, x):
            logits = x @ self.weight.T
            return (logits, *bug(logits, self.k))
    return TopKRouter


def router_softmax_bf16(ns):
    def bug(logits, k):
        weights, indices = logits.softmax(dim=-1).topk(k, dim=-1)  # BUG: the softmax in the logits' dtype
        return weights / weights.sum(dim=-1, keepdim=True), indices
    return router_with(ns, bug)


def router_softmax_bf16_cast(ns):
    def bug(logits, k):
        weights, indices = logits.softmax(dim=-1).topk(k, dim=-1)  # BUG: the softmax in bfloat16, then cast
        return (weights / weights.sum(dim=-1, keepdim=True)).float(), indices
    return router_with(ns, bug)


def router_weights_in_x_dtype(ns):
    def bug(logits, k):
        weights, indices = logits.float().softmax(dim=-1).topk(k, dim=-1)
        return (weights / weights.sum(dim=-1, keepdim=True)).to(logits.dtype), indices  # BUG: cast back to bf16
    return router_with(ns, bug)


def router_not_renormalised(ns):
    def bug(logits, k):
        return logits.float().softmax(dim=-1).topk(k, dim=-1)  # BUG: no renormalisation
    return router_with(ns, bug)


def router_softmax_over_tokens(ns):
    def bug(logits, k):
        weights, indices = logits.float().softmax(dim=0).topk(k, dim=-1)  # BUG: softmax over the tokens
        return weights / weights.sum(dim=-1, keepdim=True), indices
    return router_with(ns, bug)


# ---------------------------------------------------------------- the sparse MoE layer
def moe_sorted_rows(ns):
    class SparseMoE(ns["SparseMoE"]):
        def experts(self, x, weights, indices):
            N, D = x.shape
            expert = indices.flatten()
            order = expert.argsort(stable=True)
            counts = torch.bincount(expert, minlength=self.n_experts).tolist()
            results = []
            for e, assignments in enumerate(order.split(counts)):
                out = ns["expert_ffn"](x[assignments // self.k], self.gate_up_proj[e], self.down_proj[e])
                results.append(out * weights.flatten()[assignments, None])
            return torch.cat(results).view(N, self.k, D).sum(dim=1)  # BUG: rows in sorted order, not put back
    return SparseMoE


def moe_token_loop(ns):
    class SparseMoE(ns["SparseMoE"]):
        def experts(self, x, weights, indices):
            y = torch.zeros_like(x)
            for n in range(x.shape[0]):  # BUG (of speed): one token, and one expert, at a time
                for s in range(self.k):
                    e = indices[n, s]
                    y[n] += weights[n, s] * ns["expert_ffn"](x[n:n + 1], self.gate_up_proj[e], self.down_proj[e])[0]
            return y
    return SparseMoE


def moe_gate_up_swapped(ns):
    class SparseMoE(ns["SparseMoE"]):
        def experts(self, x, weights, indices):
            y = torch.zeros_like(x)
            for e in range(self.n_experts):
                tokens, slots = torch.nonzero(indices == e, as_tuple=True)
                up, gate = (x[tokens] @ self.gate_up_proj[e].T).chunk(2, dim=-1)  # BUG: halves swapped
                out = (F.silu(gate) * up) @ self.down_proj[e].T
                y.index_add_(0, tokens, out * weights[tokens, slots, None])
            return y
    return SparseMoE


def moe_logits_3d(ns):
    class SparseMoE(ns["SparseMoE"]):
        def forward(self, x):
            y, logits = super().forward(x)
            return y, logits.view(*x.shape[:2], -1)  # BUG: the logits are (B T, E)
    return SparseMoE


# ---------------------------------------------------------------- capacity
def capacity_with(ns, keep):
    """A SparseMoE whose experts keep the assignments that ``keep(expert (N k,), capacity, moe)`` says."""
    class SparseMoE(ns["SparseMoE"]):
        def experts(self, x, weights, indices):
            N = x.shape[0]
            expert, w = indices.flatten(), weights.flatten().clone()
            kept, rate = keep(expert, self.capacity(N), self, w)
            self.last_drop_rate = rate
            y = torch.zeros_like(x)
            for a in torch.nonzero(kept).flatten().tolist():
                e = int(expert[a])
                y[a // self.k] += w[a] * ns["expert_ffn"](x[a // self.k][None], self.gate_up_proj[e],
                                                          self.down_proj[e])[0]
            return y
    return SparseMoE


def first(expert, capacity, order):
    kept, taken = torch.zeros(len(expert), dtype=torch.bool), {}
    for a in order:
        e = int(expert[a])
        if capacity is None or taken.get(e, 0) < capacity:
            kept[a], taken[e] = True, taken.get(e, 0) + 1
    return kept


def capacity_keeps_last(ns):
    def keep(expert, capacity, moe, w):
        kept = first(expert, capacity, reversed(range(len(expert))))  # BUG: the latest tokens win
        return kept, 1 - kept.sum().item() / len(expert)
    return capacity_with(ns, keep)


def capacity_without_k(ns):
    def keep(expert, capacity, moe, w):
        N = len(expert) // moe.k
        C = None if capacity is None else math.ceil(moe.capacity_factor * N / moe.n_experts)  # BUG: no k
        kept = first(expert, C, range(len(expert)))
        return kept, 1 - kept.sum().item() / len(expert)
    return capacity_with(ns, keep)


def capacity_floor(ns):
    def keep(expert, capacity, moe, w):
        N = len(expert) // moe.k
        C = None if capacity is None else math.floor(moe.capacity_factor * N * moe.k / moe.n_experts)  # BUG: floor
        kept = first(expert, C, range(len(expert)))
        return kept, 1 - kept.sum().item() / len(expert)
    return capacity_with(ns, keep)


def capacity_renormalised(ns):
    def keep(expert, capacity, moe, w):
        kept = first(expert, capacity, range(len(expert)))
        g = (w * kept).view(-1, moe.k)
        total = g.sum(dim=-1, keepdim=True)
        w.copy_(torch.where(total > 0, g / total.clamp_min(1e-30), g).flatten())  # BUG: renormalised after drops
        return kept, 1 - kept.sum().item() / len(expert)
    return capacity_with(ns, keep)


def capacity_shuffled_groups(ns):
    def keep(expert, capacity, moe, w):
        perm = torch.randperm(len(expert), generator=torch.Generator().manual_seed(0))
        order = perm[expert[perm].argsort(stable=True)]  # BUG: as an unstable argsort may: tokens mixed in a group
        kept = first(expert, capacity, order.tolist())
        return kept, 1 - kept.sum().item() / len(expert)
    return capacity_with(ns, keep)


def capacity_rate_only_if_dropped(ns):
    def keep(expert, capacity, moe, w):
        kept = first(expert, capacity, range(len(expert)))
        rate = 1 - kept.sum().item() / len(expert)
        return kept, rate if rate else moe.last_drop_rate  # BUG: set only when something is dropped (stale at 0)
    return capacity_with(ns, keep)


def capacity_rate_of_tokens(ns):
    def keep(expert, capacity, moe, w):
        kept = first(expert, capacity, range(len(expert)))
        return kept, (~kept).sum().item() / (len(expert) // moe.k)  # BUG: divided by N, not N k
    return capacity_with(ns, keep)


# ---------------------------------------------------------------- the load-balancing loss
def balancing_parts(router_logits, n_experts, k):
    logits = torch.cat([layer.float() for layer in router_logits])
    probs = logits.softmax(dim=-1)
    f = F.one_hot(probs.topk(k, dim=-1).indices, n_experts).float().mean(dim=0)  # (k, E)
    return f, probs


def balancing_without_e(ns):
    def load_balancing_loss(router_logits, n_experts, k):
        f, probs = balancing_parts(router_logits, n_experts, k)
        return (f * probs.mean(dim=0)).sum()  # BUG: no factor E
    return load_balancing_loss


def balancing_per_layer(ns):
    def load_balancing_loss(router_logits, n_experts, k):
        losses = [ns["load_balancing_loss"]((layer,), n_experts, k) for layer in router_logits]
        return torch.stack(losses).mean()  # BUG: the mean of the layers' losses
    return load_balancing_loss


def balancing_f_sums_to_one(ns):
    def load_balancing_loss(router_logits, n_experts, k):
        f, probs = balancing_parts(router_logits, n_experts, k)
        return n_experts * (f.sum(dim=0) / k * probs.mean(dim=0)).sum()  # BUG: f over the N k assignments
    return load_balancing_loss


def balancing_softmax_after_top_k(ns):
    def load_balancing_loss(router_logits, n_experts, k):
        logits = torch.cat([layer.float() for layer in router_logits])
        top, indices = logits.topk(k, dim=-1)
        probs = torch.zeros_like(logits).scatter(1, indices, top.softmax(dim=-1))  # BUG: softmax of the top k only
        f = F.one_hot(indices, n_experts).float().mean(dim=0)
        return n_experts * (f * probs.mean(dim=0)).sum()
    return load_balancing_loss


def balancing_p_detached(ns):
    def load_balancing_loss(router_logits, n_experts, k):
        f, probs = balancing_parts(router_logits, n_experts, k)
        return n_experts * (f.sum(dim=0) * probs.mean(dim=0).detach()).sum()  # BUG: no gradient reaches the logits
    return load_balancing_loss


def balancing_no_grad(ns):
    return torch.no_grad()(ns["load_balancing_loss"])  # BUG: computed without autograd


def balancing_softmax_bf16(ns):
    def load_balancing_loss(router_logits, n_experts, k):
        probs = torch.cat(router_logits).softmax(dim=-1)  # BUG: in the logits' dtype (bfloat16), not float32
        f = F.one_hot(probs.topk(k, dim=-1).indices, n_experts).float().sum(dim=1).mean(dim=0)
        return n_experts * (f * probs.mean(dim=0)).sum()
    return load_balancing_loss


# ---------------------------------------------------------------- shared experts
def shared_with(ns, combine):
    class SharedExpertMoE(ns["SharedExpertMoE"]):
        def forward(self, x):
            routed, logits = ns["SparseMoE"].forward(self, x)
            return combine(routed, self.shared_expert_gate(x), self.shared_expert(x)), logits
    return SharedExpertMoE


def shared_gate_without_sigmoid(ns):
    return shared_with(ns, lambda routed, gate, shared: routed + gate * shared)  # BUG: no sigmoid


def shared_ungated(ns):
    return shared_with(ns, lambda routed, gate, shared: routed + shared)  # BUG: no gate


def shared_gate_on_routed(ns):
    return shared_with(ns, lambda routed, gate, shared: torch.sigmoid(gate) * routed + shared)  # BUG: wrong part


# ---------------------------------------------------------------- DeepSeek-V3's router
def deepseek_with(ns, bias_in_weights=False, group="top2", limit=True, scaled=True, fill=float("-inf")):
    class DeepSeekRouter(ns["DeepSeekRouter"]):
        def forward(self, x):
            N, E = x.shape[0], self.weight.shape[0]
            scores = torch.sigmoid(x.float() @ self.weight.float().T)
            biased = (scores + self.bias).view(N, self.n_group, E // self.n_group)
            if limit:
                group_scores = (biased.max(dim=-1).values if group == "max"  # BUG (group="max")
                                else biased.topk(2, dim=-1).values.sum(dim=-1))
                groups = group_scores.topk(self.topk_group, dim=-1).indices
                allowed = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, groups, True)
                biased = biased.masked_fill(~allowed[..., None], fill)  # BUG (limit=False): no mask; (fill=0)
            indices = biased.view(N, E).topk(self.k, dim=-1).indices
            weights = (scores + self.bias if bias_in_weights else scores).gather(1, indices)  # BUG: bias in weights
            weights = weights / weights.sum(dim=-1, keepdim=True)
            return weights * (self.routed_scaling_factor if scaled else 1.0), indices, scores  # BUG: not scaled
    return DeepSeekRouter


def deepseek_bias_in_weights(ns):
    return deepseek_with(ns, bias_in_weights=True)


def deepseek_no_group_limit(ns):
    return deepseek_with(ns, limit=False)


def deepseek_group_max(ns):
    return deepseek_with(ns, group="max")


def deepseek_not_scaled(ns):
    return deepseek_with(ns, scaled=False)


def deepseek_mask_with_zero(ns):
    return deepseek_with(ns, fill=0.0)


def deepseek_update_reversed(ns):
    class DeepSeekRouter(ns["DeepSeekRouter"]):
        @torch.no_grad()
        def update_bias(self, counts, gamma):
            self.bias += gamma * torch.sign(counts.float() - counts.float().mean())  # BUG: sign reversed
    return DeepSeekRouter


def deepseek_update_moves_mean(ns):
    class DeepSeekRouter(ns["DeepSeekRouter"]):
        @torch.no_grad()
        def update_bias(self, counts, gamma):
            c = counts.float()
            self.bias += gamma * torch.where(c > c.mean(), -1.0, 1.0)  # BUG: experts at the mean move up
    return DeepSeekRouter


def deepseek_update_floor_mean(ns):
    class DeepSeekRouter(ns["DeepSeekRouter"]):
        @torch.no_grad()
        def update_bias(self, counts, gamma):
            self.bias += gamma * torch.sign(counts.sum() // counts.numel() - counts)  # BUG: the mean rounded down
    return DeepSeekRouter


# ---------------------------------------------------------------- Mixture of Recursions
def mor_every_token(ns):
    class MixtureOfRecursions(ns["MixtureOfRecursions"]):
        def forward(self, x):
            for router in self.routers:
                x = x + torch.sigmoid(router(x)) * self.block(x)  # BUG: every token at every step
            return x
    return MixtureOfRecursions


def mor_forward(self, x, causal=True, whole=False, weighted=True, detached=False, compounded=False):
    B, T, D = x.shape
    active = torch.arange(T).expand(B, T)
    for r, router in enumerate(self.routers, 1):
        h = x.gather(1, active[..., None].expand(-1, -1, D))
        w = torch.sigmoid(router(h)).squeeze(-1)
        w = w.detach() if detached else w  # BUG (detached): the routers get no gradient
        m = math.ceil(self.capacity ** r * T) if compounded else math.ceil(self.capacity * active.shape[1])  # BUG
        chosen = w.topk(m, dim=-1).indices
        if causal:
            chosen = chosen.sort(dim=-1).values  # BUG (causal=False): by router weight, not position
        active, w = active.gather(1, chosen), w.gather(1, chosen)
        index = active[..., None].expand(-1, -1, D)
        h = x.gather(1, index)
        out = self.block(x).gather(1, index) if whole else self.block(h)  # BUG (whole): the block on every token
        x = x.scatter(1, index, h + (w[..., None] if weighted else 1.0) * out)  # BUG (weighted=False): no w
    return x


def mor_variant(ns, **bug):
    class MixtureOfRecursions(ns["MixtureOfRecursions"]):
        def forward(self, x):
            return mor_forward(self, x, **bug)
    return MixtureOfRecursions


def mor_not_causal(ns):
    return mor_variant(ns, causal=False)


def mor_block_on_all_tokens(ns):
    return mor_variant(ns, whole=True)


def mor_unweighted(ns):
    return mor_variant(ns, weighted=False)


def mor_router_detached(ns):
    return mor_variant(ns, detached=True)


def mor_capacity_compounded(ns):
    return mor_variant(ns, compounded=True)


# ---------------------------------------------------------------- expert parallelism
def run_with(ns, worker):
    def run_expert_parallel(moe, x, world_size=2):
        cpu_moe, cpu_x = copy.deepcopy(moe).cpu(), x.detach().cpu()
        y = torch.zeros_like(cpu_x).share_memory_()
        mp.start_processes(worker, args=(world_size, ns["free_port"](), cpu_moe, cpu_x, y), nprocs=world_size,
                           start_method="fork")
        return y
    return run_expert_parallel


def ep_drops_last_rank(ns):
    def worker(rank, world_size, port, moe, x, y):
        last = rank == world_size - 1
        ns["expert_parallel_worker"](rank, world_size, port, moe, x, y.clone() if last else y)  # BUG: result lost
    return run_with(ns, worker), ns["SparseMoE"]


def ep_worker_with(ns, local=False, every_token=False, ignored=False, swapped=False, modulo=False):
    """The solution's worker, or one with a bug: ``local`` (no exchange: every expert run where the token is),
    ``every_token`` (every rank routes all the tokens), ``ignored`` (the exchange made, its results thrown away for a
    local computation), ``swapped`` (the split sizes of the way back swapped), ``modulo`` (expert e sent to rank
    e % world_size, while the ranks hold contiguous blocks of experts)."""
    def worker(rank, world_size, port, moe, x, y):
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
        E, k, D = moe.n_experts, moe.k, x.shape[-1]
        per_rank = E // world_size
        everyone = torch.arange(x.shape[0] * x.shape[1])
        mine = everyone if every_token else torch.tensor_split(everyone, world_size)[rank]  # BUG (every_token)
        tokens = x.reshape(-1, D)[mine]
        with torch.no_grad():
            _, weights, indices = moe.router(tokens)
            if local:
                y.view(-1, D)[mine] = moe.experts(tokens, weights, indices)  # BUG (local): nothing exchanged
            else:
                expert = indices.flatten()
                rank_of = expert % world_size if modulo else expert // per_rank  # BUG (modulo)
                order = rank_of.argsort(stable=True)
                send_counts = torch.bincount(rank_of, minlength=world_size)
                recv_counts = torch.empty_like(send_counts)
                dist.all_to_all_single(recv_counts, send_counts)
                send, recv = send_counts.tolist(), recv_counts.tolist()
                got_x = tokens.new_empty(sum(recv), D)
                dist.all_to_all_single(got_x, tokens[order // k], recv, send)
                got_e = expert.new_empty(sum(recv))
                dist.all_to_all_single(got_e, expert[order], recv, send)
                out = torch.zeros_like(got_x)
                for e in range(rank * per_rank, (rank + 1) * per_rank):
                    rows = (got_e == e).nonzero().squeeze(1)
                    out[rows] = ns["expert_ffn"](got_x[rows], moe.gate_up_proj[e], moe.down_proj[e])
                back = tokens.new_empty(sum(send), D)
                dist.all_to_all_single(back, out, *((recv, send) if swapped else (send, recv)))  # BUG (swapped)
                mixed = torch.zeros_like(tokens).index_add_(0, order // k, back * weights.flatten()[order, None])
                y.view(-1, D)[mine] = moe.experts(tokens, weights, indices) if ignored else mixed  # BUG (ignored)
        dist.destroy_process_group()
    return run_with(ns, worker), ns["SparseMoE"]


def ep_modulo_ranks(ns):
    return ep_worker_with(ns, modulo=True)


def ep_no_exchange(ns):
    return ep_worker_with(ns, local=True)


def ep_every_rank_every_token(ns):
    return ep_worker_with(ns, every_token=True)


def ep_exchange_ignored(ns):
    return ep_worker_with(ns, ignored=True)


def ep_return_splits_swapped(ns):
    return ep_worker_with(ns, swapped=True)


# check id -> [(factory, a regular expression the failure message must match)]
BUGS = {
    "05.router": [
        (router_softmax_bf16, r"TopKRouter\(32, 8, 2\) in bfloat16 on a bfloat16 \(64, 32\): weights are "
                              r"torch.bfloat16, expected torch.float32\. the softmax is computed in bfloat16"),
        (router_softmax_bf16_cast, r"in bfloat16 .*: weights of the chosen experts .*max \|difference\|.*the softmax "
                                   r"is computed in bfloat16: compute it in float32"),
        (router_weights_in_x_dtype, r"weights are torch.bfloat16, expected torch.float32\. Return them in float32"),
        (router_not_renormalised, r"TopKRouter\(16, 8, 2\) on \(40, 16\): weights of the chosen experts .*"
                                  r"not renormalised"),
        (router_softmax_over_tokens, r"TopKRouter\(16, 8, 2\) on \(40, 16\): the k experts chosen .*over the tokens"),
    ],
    "05.sparse_moe": [
        (moe_sorted_rows, r"SparseMoE\(16, 24, 8, 2\) on \(2, 5, 16\): y \(vs transformers' MixtralSparseMoeBlock\): "
                          r"max \|difference\|.*added in the sorted order"),
        (moe_token_loop, r"one forward on 96 tokens made 385 matrix products .*This is a loop over tokens"),
        (moe_gate_up_swapped, r"gate and up are swapped"),
        (moe_logits_3d, r"router_logits .*: shape \(2, 5, 8\), expected \(10, 8\)"),
    ],
    "05.capacity": [
        (capacity_keeps_last, r"capacity_factor=0.5\) on \(2, 11, 8\) \(capacity ceil\(0.5 · 22 · 2 / 4\) = 6 "
                              r"assignments per expert\): y .*LAST 6 assignments"),
        (capacity_without_k, r"capacity is computed without k"),
        (capacity_floor, r"capacity is rounded down"),
        (capacity_renormalised, r"weights of a token's kept experts are renormalised"),
        (capacity_rate_of_tokens, r"last_drop_rate \(of 44 assignments, \d+ dropped\): "),
        (capacity_shuffled_groups, r"capacity_factor=0.5\) .*: y .*last_drop_rate is right, .*not the right ones.*"
                                   r"argsort\(stable=True\)"),
        (capacity_rate_only_if_dropped, r"capacity_factor=0.5\) .*, then called again with capacity_factor set to "
                                        r"None \(nothing dropped\): last_drop_rate: 0.54\d*, expected 0.0\. "
                                        r"last_drop_rate is stale"),
    ],
    "05.load_balancing": [
        (balancing_without_e, r"1 layer of 32 tokens.*: max \|difference\|.*the factor E is missing"),
        (balancing_per_layer, r"3 layers of 20 tokens.*mean of the per-layer losses"),
        (balancing_f_sums_to_one, r"f is divided by N k"),
        (balancing_softmax_after_top_k, r"mean of the full softmax"),
        (balancing_p_detached, r"1 layer of 32 tokens.*: loss.grad_fn is None: the loss has no gradient with respect "
                               r"to the router logits"),
        (balancing_no_grad, r"loss.grad_fn is None: the loss has no gradient"),
        (balancing_softmax_bf16, r"2 layers of 32 tokens in bfloat16.*: max \|difference\|.*the softmax ran in "
                                 r"bfloat16: cast the logits to float32 first"),
    ],
    "05.shared_expert": [
        (shared_gate_without_sigmoid, r"SharedExpertMoE\(16, 24, 8, 2, 32\) on \(2, 5, 16\): y .*gate has no sigmoid"),
        (shared_ungated, r"added without its gate"),
        (shared_gate_on_routed, r"the gate scales the routed experts"),
    ],
    "05.deepseek_router": [
        (deepseek_bias_in_weights, r"routed_scaling_factor=2.5\) on \(24, 16\) with a nonzero bias: weights of the "
                                   r"chosen experts .*use the biased scores"),
        (deepseek_no_group_limit, r"the k experts chosen .*there is no group limit"),
        (deepseek_group_max, r"groups are scored by their best score \(max\)"),
        (deepseek_not_scaled, r"the weights are not scaled: multiply them by routed_scaling_factor"),
        (deepseek_update_reversed, r"update_bias\(counts=\[5, 1, 3, 3\], gamma=0.01\).*the sign is reversed"),
        (deepseek_update_moves_mean, r"experts at exactly the mean count moved"),
        (deepseek_mask_with_zero, r"DeepSeekRouter\(16, 8, 3, n_group=4, topk_group=2, .*negative biased score\): the "
                                  r"k experts chosen .*masked with 0, which beats a negative biased score.*-inf"),
        (deepseek_update_floor_mean, r"update_bias\(counts=\[5, 1, 3, 2\], gamma=0.01\) \(call 4.*the mean is "
                                     r"rounded down"),
    ],
    "05.mor": [
        (mor_every_token, r"got 3 block applications, expected \d.*Every token went through the block at every step"),
        (mor_not_causal, r"step 1, the block's input: positions .*causal order\. Sort the selected positions"),
        (mor_block_on_all_tokens, r"The block ran on all 10 tokens at every step"),
        (mor_unweighted, r"output \(vs a float64 loop.*multiply the block's output by the router weight"),
        (mor_router_detached, r"capacity=0.5\) on \(2, 10, 8\): the router gets no gradient \(none for any router"
                              r".*multiply the block's output by w = sigmoid\(router\(h\)\) as it is \(not detached"),
        (mor_capacity_compounded, r"capacity=0.7\) on \(1, 32, 8\): the block was given \[23, 16, 11\] tokens .*"
                                  r"expected \[23, 17, 12\].*not ceil\(capacity\^r · T\)"),
    ],
    "05.expert_parallel": [
        (ep_drops_last_rank, r"world_size=2\) .*rank 1's tokens \(rows 4 to 6 of the B T flattened tokens\) came "
                             r"back as zeros"),
        (ep_modulo_ranks, r"world_size=2\) .*the assignments reach the wrong rank"),
        (ep_no_exchange, r"world_size=2\) .*: ranks 0, 1 exchanged no token rows \(2-D float tensors of width 16\) "
                         r"with dist.all_to_all_single: the tokens must travel with dist.all_to_all_single to the "
                         r"ranks holding their experts"),
        (ep_every_rank_every_token, r"world_size=2\) .*: the ranks received 56 token rows .* make 28\. Each rank must "
                                    r"route only its own share"),
        (ep_exchange_ignored, r"world_size=2\) .*, with every token row that dist.all_to_all_single delivers zeroed on "
                              r"arrival .*y does not come from the exchanged rows"),
        (ep_return_splits_swapped, r"world_size=2\) .*raised ProcessRaisedException: -- Process \d terminated with "
                                   r"the following error: \(at .*, in worker\) … RuntimeError: Split sizes doesn't "
                                   r"match total dim 0 size"),
    ],
}
