"""Plausible wrong implementations of Lab 11, each paired with the message its check must give.

Each factory takes the solution's namespace and returns the arguments of one check call. A bug in the conversion
is planted as the state dict a wrong conversion would produce (handed to the solution's loader), or as a wrong
config handed to its builder; a bug inside a module is planted on the built model's modules (labkit.nn's parts);
a bug of decoding rebinds the solution's functions to a wrong cache class (:func:`rebound`).
"""
from __future__ import annotations

import inspect
import json
import types

import torch
import torch.nn as nn
import torch.nn.functional as F

from labkit.nn import DeepSeekMoE, LatentAttention, MambaMixer, MoE


def rebound(ns: dict, **overrides) -> dict:
    """A copy of the namespace whose functions see ``overrides`` in place of its names (the solution untouched)."""
    copy = dict(ns) | overrides
    for name, value in ns.items():
        inner = inspect.unwrap(value) if callable(value) else value
        if isinstance(inner, types.FunctionType) and (inner.__globals__ is ns or inner.__globals__.get(
                "__name__", 0) == ns.get("__name__")):  # the solution's own functions (runpy copies its globals)
            fn = types.FunctionType(inner.__code__, copy, inner.__name__, inner.__defaults__, inner.__closure__)
            copy[name] = torch.no_grad()(fn) if inner is not value else fn  # the solution's only decorator
    return copy


def halves_order(d: int) -> torch.Tensor:
    return torch.cat([torch.arange(0, d, 2), torch.arange(1, d, 2)])


def head_rows(w: torch.Tensor, heads: int, order: torch.Tensor, start: int = 0) -> torch.Tensor:
    out = w.clone().view(heads, -1, *w.shape[1:])
    out[:, start:start + len(order)] = out[:, start:start + len(order)][:, order]
    return out.reshape(w.shape)


def config_of(model) -> dict:
    return model.hf_config


def modules(model, kind):
    return [m for m in model.modules() if isinstance(m, kind)]


# ---------------------------------------------------------------- conversions that rearrange transformers' tensors
def converted(state: dict, family: str, c: dict, bug: str) -> dict:
    """The state dict that a wrong conversion hands the model (the right loader then builds the wrong model)."""
    state = dict(state)
    H, H_kv = c.get("num_attention_heads", 1), c.get("num_key_value_heads", 1)
    hd = c.get("head_dim") or c["hidden_size"] // H
    for key in list(state):
        w = state[key]
        if bug in ("rope_interleaved", "rope_meta") and family in ("llama", "mixtral") and key.endswith(
                ("q_proj.weight", "k_proj.weight")):
            order = halves_order(hd) if bug == "rope_interleaved" else halves_order(hd).argsort()
            state[key] = head_rows(w, H if "q_proj" in key else H_kv, order)
        if bug == "kv_reversed" and key.endswith(("self_attn.k_proj.weight", "self_attn.v_proj.weight")):
            state[key] = w.view(H_kv, hd, -1).flip(0).reshape(w.shape)  # BUG: key-value heads in reverse order
        if bug == "kv_tiled" and key.endswith("self_attn.q_proj.weight") and family in ("llama", "mixtral"):
            rep = H // H_kv  # BUG: query head h paired with key-value head h % H_kv
            s = torch.tensor([(j // rep) + H_kv * (j % rep) for j in range(H)])
            o = key.replace("q_proj", "o_proj")
            state[key] = w.view(H, hd, -1)[s].reshape(w.shape)
            state[o] = state[o].view(-1, H, hd)[:, s].reshape(state[o].shape)
        if bug == "up_first" and key.endswith("experts.gate_up_proj"):
            half = w.shape[1] // 2
            state[key] = torch.cat([w[:, half:], w[:, :half]], 1)  # BUG: up rows read first
        if bug == "experts_reversed" and key.endswith(("experts.gate_up_proj", "experts.down_proj")):
            state[key] = w.flip(0)  # BUG: experts stacked last to first
        if bug == "dense_gate_up" and key.endswith("mlp.gate_proj.weight"):
            up = key.replace("gate_proj", "up_proj")
            state[key], state[up] = state[up], w
        if bug == "norms_swapped" and key.endswith("input_layernorm.weight"):
            other = key.replace("input_layernorm", "post_attention_layernorm" if family != "jamba" else
                                "pre_ff_layernorm")
            state[key], state[other] = state[other], w
        if bug == "mla_norms_swapped" and key.endswith("q_a_layernorm.weight"):
            other = key.replace("q_a_layernorm", "kv_a_layernorm")
            state[key], state[other] = state[other], w
        if bug == "xz_swapped" and key.endswith("in_proj.weight"):
            half = w.shape[0] // 2
            state[key] = torch.cat([w[half:], w[:half]])
        if bug == "x_proj_order" and key.endswith("x_proj.weight"):
            N = c.get("state_size") or c.get("mamba_d_state", 16)
            R = w.shape[0] - 2 * N
            state[key] = torch.cat([w[-R:], w[:-R]])  # BUG: the output read as (B, C, dt)
        if bug == "deepseek_whole" and key.endswith(("q_b_proj.weight", "q_proj.weight")) and family == "deepseek_v3":
            n, r = c["qk_nope_head_dim"], c["qk_rope_head_dim"]
            v = w.view(H, n + r, -1)
            rope = v[:, n:].reshape(H * r, -1)[halves_order(H * r)].reshape(H, r, -1)[:, halves_order(r).argsort()]
            state[key] = torch.cat([v[:, :n], rope], 1).reshape(w.shape)
    return state


def load_with(ns, bug: str):
    """load_hf_state_dict that rearranges transformers' tensors wrongly first."""
    load = ns["load_hf_state_dict"]

    def load_hf_state_dict(model, hf_state_dict, family):
        return load(model, converted(hf_state_dict, family, config_of(model), bug), family)

    return ns["build_model"], load_hf_state_dict


def build_with(ns, bug: str):
    """build_model that reads the config wrongly, or a model whose modules are changed after loading."""
    build, load = ns["build_model"], ns["load_hf_state_dict"]

    def build_model(config):
        family = config["model_type"]
        c = dict(config)
        if bug == "first_dense_plus_one" and family == "deepseek_v3":
            c["first_k_dense_replace"] += 1  # BUG: one dense layer too many
        if bug == "jamba_attn_offset" and family == "jamba":
            c["attn_layer_offset"] = 0  # BUG: attention at the period's start
        if bug == "jamba_expert_offset" and family == "jamba":
            c["expert_layer_offset"] = 1 - c.get("expert_layer_offset", 1)
        if bug == "theta_ignored" and family in ("llama", "mixtral", "deepseek_v3"):
            c["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0}  # BUG: the default always
        if bug == "mixtral_theta_1e4" and family == "mixtral" and "rope_parameters" not in config:
            c["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0}  # BUG: Llama's default
        if bug == "always_tied" and family != "mamba":
            c["tie_word_embeddings"] = True  # BUG: ties regardless of the config
        if bug == "mutates":
            config.setdefault("rope_parameters", {"rope_type": "default", "rope_theta": 10000.0})  # BUG
            config["initializer_range"] = 0.5
        model = build(c)
        if bug == "deepseek_halves" and family == "deepseek_v3":
            model.hf_config["rope_interleave"] = False  # BUG: rotate-half on the rows as stored
        if bug == "wrong_family":
            model.family = "llama"
        if bug in ("mixtral_no_renorm",) and family == "mixtral":
            for m in modules(model, MoE):
                m.renormalize = False
        if bug == "jamba_renorm" and family == "jamba":
            for m in modules(model, MoE):
                m.renormalize = True  # BUG: Mixtral's renormalisation in Jamba
        if bug == "no_topk_norm" and family == "deepseek_v3":
            for m in modules(model, DeepSeekMoE):
                m.renormalize = False
        if bug == "no_scale" and family == "deepseek_v3":
            for m in modules(model, DeepSeekMoE):
                m.scale = 1.0  # BUG: routed_scaling_factor dropped
        if bug == "no_groups" and family == "deepseek_v3":
            for m in modules(model, DeepSeekMoE):
                m.n_group = m.topk_group = 1  # BUG: every expert open to every token
        if bug in ("softmax_router", "biased_weights") and family == "deepseek_v3":
            for m in modules(model, DeepSeekMoE):
                m.route = types.MethodType(route_with(bug), m)
        return model

    def load_hf_state_dict(model, hf_state_dict, family):
        loaded = load(model, hf_state_dict, family)
        with torch.no_grad():
            if bug == "no_bias" and family == "deepseek_v3":
                for m in modules(model, DeepSeekMoE):
                    m.score_bias.zero_()  # BUG: the correction bias not loaded
            if bug == "no_shared" and family == "deepseek_v3":
                for m in modules(model, DeepSeekMoE):
                    m.shared.down_proj.weight.zero_()  # BUG: the shared experts left out
            if bug == "no_D":
                for m in modules(model, MambaMixer):
                    m.D.zero_()
        if bug == "no_dt_norm" and family == "jamba":
            for m in modules(model, MambaMixer):
                m.dt_norm = nn.Identity()  # BUG: time_step's norm missing
        if bug == "no_bc_norms" and family == "jamba":
            for m in modules(model, MambaMixer):
                m.b_norm = m.c_norm = nn.Identity()  # BUG: B's and C's norms missing
        if bug == "returns_none":
            return None
        return loaded

    return build_model, load_hf_state_dict


def route_with(bug: str):
    def route(self, x):
        logits = self.router(x).float()
        scores = logits.softmax(-1) if bug == "softmax_router" else logits.sigmoid()
        choice = scores + self.score_bias
        groups = choice.view(len(x), self.n_group, -1).topk(2, dim=-1).values.sum(dim=-1)
        best = groups.topk(self.topk_group, dim=-1).indices
        open_group = torch.zeros_like(groups, dtype=torch.bool).scatter(1, best, True)
        open_expert = open_group.repeat_interleave(self.n_experts // self.n_group, dim=1)
        indices = choice.masked_fill(~open_expert, float("-inf")).topk(self.k, dim=-1).indices
        weights = (choice if bug == "biased_weights" else scores).gather(1, indices)
        if self.renormalize:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.scale, indices

    return route


# ---------------------------------------------------------------- decoding
def generate_with(ns, bug: str):
    KVCache, SSMState = ns["KVCache"], ns["SSMState"]

    class FrozenCache(KVCache):
        def update(self, k, v):
            length = self.length
            out = super().update(k, v)
            if bug == "length_frozen":
                self.length = 0  # BUG: the length never advances: positions restart at 0
            if bug == "length_prefill_only":
                self.length = length or k.shape[2]  # BUG: counted at the prefill only
            return out

    class LateWindow(SSMState):
        @property
        def conv(self):
            return self._conv

        @conv.setter
        def conv(self, value):
            if value is not None and bug == "conv_off_by_one":
                value = torch.cat([torch.zeros_like(value[..., :1]), value[..., :-1]], -1)  # BUG: one step late
            self._conv = value

        @property
        def ssm(self):
            return self._ssm

        @ssm.setter
        def ssm(self, value):
            self._ssm = None if bug == "ssm_dropped" else value  # BUG: the state not carried

    class NewOnly(KVCache):
        def update(self, k, v):
            super().update(k, v)
            return k, v  # BUG: only the new keys and values

    solution = rebound(ns, KVCache=NewOnly if bug == "returns_new_only" else FrozenCache, SSMState=LateWindow)
    if bug == "shared_caches":
        solution = rebound(ns)
        solution["new_caches"] = lambda model: [KVCache()] * len(model.blocks)  # BUG: one object for all layers
    generate = solution["generate"]
    new_caches = solution["new_caches"] if "new_caches" in solution else None

    def loop(model, idx, max_new_tokens):
        caches = new_caches(model)
        with torch.no_grad():
            logits = model(idx, caches)
            while True:  # BUG (at_least_one): max_new_tokens = 0 still appends a token
                position = 0 if bug == "argmax_first" else -1  # BUG (argmax_first): the prefill's first position
                token = logits[:, position].argmax(-1, keepdim=True)
                fed = idx[:, -1:] if bug == "feeds_previous" else token  # BUG (feeds_previous): the one before
                idx = torch.cat([idx, token], 1)
                max_new_tokens -= 1
                if max_new_tokens <= 0:
                    return idx
                logits = model(fed, caches)

    def no_cache(model, idx, max_new_tokens):
        with torch.no_grad():
            for _ in range(max_new_tokens):  # BUG: the whole sequence again at every step
                idx = torch.cat([idx, model(idx)[:, -1].argmax(-1, keepdim=True)], 1)
        return idx

    def fresh_caches(model, idx, max_new_tokens):
        with torch.no_grad():
            logits = model(idx, new_caches(model))
            for step in range(max_new_tokens):
                token = logits[:, -1].argmax(-1, keepdim=True)
                idx = torch.cat([idx, token], 1)
                if step < max_new_tokens - 1:
                    logits = model(token, new_caches(model))  # BUG: new caches every step
        return idx

    def new_only(model, idx, max_new_tokens):
        return generate(model, idx, max_new_tokens)[:, idx.shape[1]:]  # BUG: the new tokens only

    chosen = {"no_cache": no_cache, "fresh_caches": fresh_caches, "new_only": new_only, "at_least_one": loop,
              "argmax_first": loop, "feeds_previous": loop}.get(bug, generate)
    return ns["build_model"], ns["load_hf_state_dict"], chosen


# ---------------------------------------------------------------- to_hf_state_dict
def to_hf_with(ns, bug: str):
    to_hf = ns["to_hf_state_dict"]

    def to_hf_state_dict(model, family):
        if bug == "no_reinterleave" and family == "deepseek_v3":
            flag = model.hf_config.get("rope_interleave")
            model.hf_config["rope_interleave"] = False  # BUG: the rope rows stay in halves order
            try:
                return to_hf(model, family)
            finally:
                model.hf_config["rope_interleave"] = flag
        state = dict(to_hf(model, family))
        if bug == "tied_head_dropped" and family == "mamba":
            del state["lm_head.weight"]  # BUG: the tied head left out of the state dict
        for key, w in list(state.items()):
            if bug == "up_first" and key.endswith("gate_up_proj"):
                half = w.shape[1] // 2
                state[key] = torch.cat([w[:, half:], w[:, :half]], 1)
            if bug == "experts_reversed" and key.endswith(("gate_up_proj", "experts.down_proj")):
                state[key] = w.flip(0)
            if bug == "float64":
                state[key] = w.double()
        return state

    return ns["build_model"], ns["load_hf_state_dict"], to_hf_state_dict


# ---------------------------------------------------------------- bytes of the cache
def kv_with(ns, bug: str):
    def kv_bytes_per_token(config, dtype_bytes=2):
        family = config["model_type"]
        b = 2 if bug == "dtype_ignored" else dtype_bytes
        if family == "gpt2":
            return 2 * config["n_layer"] * config["n_embd"] * b
        if family == "mamba":
            return 0
        c = ns["resolve"](config) if family in ns["DEFAULTS"] else dict(config)
        L = c["num_hidden_layers"]
        if family == "deepseek_v3":
            if bug == "mla_expanded":  # BUG: K and V of every head
                return L * c["num_attention_heads"] * (c["qk_nope_head_dim"] + c["qk_rope_head_dim"] +
                                                       c["v_head_dim"]) * b
            if bug == "mla_latent_only":
                return L * c["kv_lora_rank"] * b
            return L * (c["kv_lora_rank"] + c["qk_rope_head_dim"]) * b
        H = c["num_attention_heads"]
        hd = c.get("head_dim") or c["hidden_size"] // H
        if bug == "head_dim_ignored":
            hd = c["hidden_size"] // H
        kv = H if bug == "mha_heads" else c["num_key_value_heads"]  # BUG (mha_heads): the query heads
        if family == "jamba" and bug != "jamba_all_layers":
            L = sum(1 for i in range(L) if i % c["attn_layer_period"] == c["attn_layer_offset"])
        return (1 if bug == "k_only" else 2) * L * kv * hd * b

    def state_bytes(config, dtype_bytes=2):
        family = config["model_type"]
        if family not in ("mamba", "jamba"):
            return 0
        c = ns["resolve"](config)
        if family == "mamba":
            d_in, N, K, L = c["expand"] * c["hidden_size"], c["state_size"], c["conv_kernel"], c["num_hidden_layers"]
        else:
            d_in, N, K = c["mamba_expand"] * c["hidden_size"], c["mamba_d_state"], c["mamba_d_conv"]
            L = c["num_hidden_layers"] if bug == "state_all_layers" else sum(
                1 for i in range(c["num_hidden_layers"]) if i % c["attn_layer_period"] != c["attn_layer_offset"])
        if bug == "dconv_4":
            K = 4  # BUG: d_conv assumed
        if bug == "expand_2":
            d_in = 2 * c["hidden_size"]  # BUG: expand assumed
        window = {"conv_full": K, "no_conv": 0}.get(bug, K - 1)  # BUG (conv_full): d_conv columns
        return L * d_in * (window + N) * dtype_bytes

    return kv_bytes_per_token, state_bytes


# ---------------------------------------------------------------- count_params
def count_with(ns, bug: str):
    count = ns["count_params"]

    def count_params(config, active=False):
        c = dict(config)
        family = c["model_type"]
        if bug == "mamba_untied" and family == "mamba":
            c.setdefault("tie_word_embeddings", False)  # BUG: the others' default
        if bug == "first_dense_plus_one" and family == "deepseek_v3":
            c["first_k_dense_replace"] = c.get("first_k_dense_replace", 3) + 1
        n = count(c, active=active and bug != "all_active")  # BUG (all_active): active ignored
        V, d = c["vocab_size"], c["hidden_size"]
        if bug == "bias_counted" and family == "deepseek_v3":
            n += (c["num_hidden_layers"] - c.get("first_k_dense_replace", 3)) * c["n_routed_experts"]
        if bug == "no_shared" and family == "deepseek_v3":
            moe = c["num_hidden_layers"] - c.get("first_k_dense_replace", 3)
            n -= moe * 3 * d * c["moe_intermediate_size"] * c.get("n_shared_experts", 1)
        if bug == "jamba_no_norms" and family == "jamba":
            rank = c.get("mamba_dt_rank", "auto")
            rank = -(-d // 16) if rank == "auto" else rank
            mamba = sum(1 for i in range(c["num_hidden_layers"]) if i % c["attn_layer_period"] != c["attn_layer_offset"])
            n -= mamba * (rank + 2 * c["mamba_d_state"])
        if bug == "float":
            return float(n)
        return n

    return count_params


# ---------------------------------------------------------------- export_pretrained
def export_with(ns, bug: str):
    export = ns["export_pretrained"]
    to_hf = ns["to_hf_state_dict"]

    def export_pretrained(model, family, path):
        from pathlib import Path

        from safetensors.torch import save_file

        if bug == "str_path":
            path + "/config.json"  # BUG: a str operation (the notebook passes a pathlib.Path)
        export(model, family, path)
        path = Path(path)
        config = json.loads((path / "config.json").read_text())
        if bug == "head_written_twice" and family == "mamba":
            state = {k: v.contiguous().clone() for k, v in to_hf(model, family).items()}
            state["lm_head.weight"] = state["lm_head.weight"].clone()  # BUG: the tied head written too
            save_file(state, path / "model.safetensors")
        if bug == "no_experts_field" and family == "mixtral":
            del config["num_local_experts"]  # BUG: transformers' default (8) is used
        if bug == "eos_kept":
            config["eos_token_id"] = 2
        if bug == "no_model_type":
            del config["model_type"]
        if bug == "no_weights":
            (path / "model.safetensors").unlink()
        if bug == "no_rope_field" and family == "llama":
            config.pop("rope_parameters", None)  # BUG: theta falls back to 10,000
            config.pop("rope_theta", None)
        if bug == "dropped_norm" and family == "llama":
            from safetensors.torch import load_file

            state = load_file(path / "model.safetensors")
            del state["model.norm.weight"]  # BUG: a key missing (from_pretrained would initialise it)
            save_file(state, path / "model.safetensors")
        (path / "config.json").write_text(json.dumps(config))

    return ns["build_model"], ns["load_hf_state_dict"], export_pretrained


# ---------------------------------------------------------------- wrong defaults, resolve and layers
WRONG_DEFAULTS = {"deepseek_q_lora_none": ("deepseek_v3", "q_lora_rank", None),
                  "jamba_d_state_8": ("jamba", "mamba_d_state", 8),
                  "mamba_expand_1": ("mamba", "expand", 1),
                  "mamba_conv_3": ("mamba", "conv_kernel", 3),
                  "deepseek_groups_1": ("deepseek_v3", "n_group", 1)}


def solution_with(ns, bug: str) -> dict:
    """A copy of the solution's namespace with a wrong default, a wrong resolve or a wrong layer builder."""
    defaults = json.loads(json.dumps(ns["DEFAULTS"]))
    if bug in WRONG_DEFAULTS:
        family, field, value = WRONG_DEFAULTS[bug]
        defaults[family][field] = value  # BUG: another default than transformers'
    copy = rebound(ns, DEFAULTS=defaults)
    resolve, mixtral_layer, jamba_layer = copy["resolve"], copy["mixtral_layer"], copy["jamba_layer"]

    def floor_rank(config):
        c = resolve({k: v for k, v in config.items() if v != "auto"})
        for rank in ("time_step_rank", "mamba_dt_rank"):
            if config.get(rank, "auto") == "auto" and rank in c:
                c[rank] = c["hidden_size"] // 16  # BUG: floor, transformers takes ceil
        return c

    def mixtral_no_head_dim(c, i):
        return mixtral_layer(c | {"head_dim": None}, i)  # BUG: head_dim dropped

    def jamba_always_moe(c, i):
        layer = jamba_layer(c, i)
        if i % c["expert_layer_period"] == c["expert_layer_offset"] and c["num_experts"] == 1:
            layer.ffn = MoE(c["hidden_size"], c["intermediate_size"], 1, 1, renormalize=False)  # BUG: a router
        return layer

    overrides = {"dt_rank_floor": {"resolve": floor_rank}, "mixtral_head_dim": {"mixtral_layer": mixtral_no_head_dim},
                 "jamba_one_expert": {"jamba_layer": jamba_always_moe}}.get(bug, {})
    copy |= overrides  # after rebound, which would put the solution's functions back
    copy["LAYERS"] = {"llama": copy["llama_layer"], "mixtral": copy["mixtral_layer"],
                      "deepseek_v3": copy["deepseek_layer"], "mamba": copy["mamba_layer"],
                      "jamba": copy["jamba_layer"]}
    return copy


def solution_load_with(ns, bug: str):
    copy = solution_with(ns, bug)
    return copy["build_model"], copy["load_hf_state_dict"]


def count_defaults_with(ns, bug: str):
    copy = solution_with(ns, bug)
    count = copy["count_params"]
    if bug != "jamba_active_every_layer":
        return count

    def count_params(config, active=False):  # BUG: (E - k) experts off L // period layers, not the MoE ones
        c = copy["resolve"](config)
        if not (active and c["model_type"] == "jamba"):
            return count(config, active)
        unused = (c["num_experts"] - c["num_experts_per_tok"]) * 3 * c["hidden_size"] * c["intermediate_size"]
        return count(config) - c["num_hidden_layers"] // c["expert_layer_period"] * unused

    return count_params


def kv_defaults_with(ns, bug: str):
    copy = solution_with(ns, bug)
    return copy["kv_bytes_per_token"], copy["state_bytes"]


def load_copies_with(ns, bug: str):
    """load_hf_state_dict that rewrites the caller's tensors, or keeps only the keys it knows."""
    load, hf_names = ns["load_hf_state_dict"], ns["hf_names"]

    def load_hf_state_dict(model, hf_state_dict, family):
        if bug == "lenient":
            known = set(hf_names(model, family).values())
            hf_state_dict = {k: v for k, v in hf_state_dict.items() if k in known}  # BUG: unknown keys dropped
        loaded = load(model, hf_state_dict, family)
        if bug == "in_place" and model.hf_config.get("rope_interleave"):
            names = hf_names(model, family)
            for name, (heads, rope_dim) in ns["rope_rows"](model).items():
                t = hf_state_dict[names[name]]
                t.copy_(ns["halves_from_pairs"](t, heads, rope_dim))  # BUG: the caller's tensor rewritten
        return loaded

    return ns["build_model"], load_hf_state_dict


def to_hf_in_place_with(ns, bug: str):
    to_hf = ns["to_hf_state_dict"]

    def to_hf_state_dict(model, family):
        state = to_hf(model, family)
        with torch.no_grad():
            for key in state:
                if key.endswith("norm.weight"):
                    state[key].mul_(1.5)  # BUG: state_dict()'s tensors are the model's
                    break
        return state

    return ns["build_model"], ns["load_hf_state_dict"], to_hf_state_dict


def to_hf_model_with(ns, bug: str):
    """The right to_hf_state_dict of a model whose forward is wrong."""
    return build_with(ns, bug) + (ns["to_hf_state_dict"],)


def generate_model_with(ns, bug: str):
    """The right generate on a wrongly built or loaded model."""
    return build_with(ns, bug) + (ns["generate"],)


def partial_rope_with(ns, bug: str):
    """load_hf_state_dict that de-interleaves the rope rows of the queries only, or of the shared key only."""
    copy = rebound(ns)

    def rope_rows(model):
        keep = "kv_a_proj" if bug == "k_only" else "q"
        return {k: v for k, v in ns["rope_rows"](model).items()
                if k.split(".")[3].startswith(keep)}  # BUG: one side's rope rows left interleaved

    copy["rope_rows"] = rope_rows
    return ns["build_model"], copy["load_hf_state_dict"]


def bug(factory, name: str):
    """A factory of one planted bug, named after it (the test ids show the name)."""
    made = lambda ns: factory(ns, name)
    made.__name__ = f"{factory.__name__.removesuffix('_with')}_{name}"
    return made


LO, BU, G, GM, TH = load_with, build_with, generate_with, generate_model_with, to_hf_with
KV, C, EX = kv_with, count_with, export_with
CD, KD, LC, TI, TM = count_defaults_with, kv_defaults_with, load_copies_with, to_hf_in_place_with, to_hf_model_with
LLAMA, MIXTRAL, DEEPSEEK, MAMBA, JAMBA = "Llama", "Mixtral", "DeepSeek-V3", "Mamba", "Jamba"
LOGITS = r"the logits of your {}"

# check id -> [(factory, a regular expression the failure message must match)]
BUGS = {
    "11.load_hf_state_dict": [
        (bug(LO, "rope_interleaved"), LOGITS.format(LLAMA) + r".*rotates interleaved pairs"),
        (bug(LO, "rope_meta"), LOGITS.format(LLAMA) + r".*permuted within each head"),
        (bug(BU, "deepseek_halves"), LOGITS.format(DEEPSEEK) + r".*: layer 0 \(MLA \+ dense FFN\) is the first whose "
                                                               r"output differs.*DeepSeek rope rows look interleaved.*"
                                                               r"De-interleave the rope part of q_b_proj"),
        (bug(LO, "deepseek_whole"), LOGITS.format(DEEPSEEK) + r".*de-interleaved across all heads"),
        (bug(partial_rope_with, "q_only"), LOGITS.format(DEEPSEEK) + r".*de-interleaved but not the key's"),
        (bug(partial_rope_with, "k_only"), LOGITS.format(DEEPSEEK) + r".*de-interleaved but not the queries'"),
        (bug(LO, "kv_reversed"), LOGITS.format(LLAMA) + r".*GQA head order mixed up: the key-value heads"),
        (bug(LO, "kv_tiled"), LOGITS.format(LLAMA) + r".*reads key-value head h % num_key_value_heads"),
        (bug(LO, "up_first"), LOGITS.format(MIXTRAL) + r".*read up rows first"),
        (bug(LO, "experts_reversed"), LOGITS.format(MIXTRAL) + r".*stacked in the wrong order"),
        (bug(LO, "dense_gate_up"), LOGITS.format(LLAMA) + r".*gate_proj and up_proj are swapped"),
        (bug(LO, "norms_swapped"), LOGITS.format(LLAMA) + r".*two norms of each layer are swapped"),
        (bug(LO, "mla_norms_swapped"), LOGITS.format(DEEPSEEK) + r".*q_a_layernorm and kv_a_layernorm are swapped"),
        (bug(LO, "xz_swapped"), LOGITS.format(MAMBA) + r".*in_proj's output is \[x \| z\]"),
        (bug(LO, "x_proj_order"), LOGITS.format(MAMBA) + r".*x_proj's output splits as \[dt"),
        (bug(BU, "first_dense_plus_one"), r"load_hf_state_dict\(model, DeepSeek-V3 state dict.*raised.*your block 1 "
                                          r"has .* parameters where transformers' layer 1 \(MLA \+ MoE\).*"
                                          r"first_k_dense_replace = 1"),
        (bug(BU, "jamba_attn_offset"), r"load_hf_state_dict\(model, Jamba state dict.*raised.*your block 0 has .* "
                                       r"where transformers' layer 0 \(mamba \+ MoE\).*attn_layer_offset"),
        (bug(BU, "jamba_expert_offset"), r"Jamba state dict.*raised.*transformers' layer 0 \(mamba \+ MoE\).*"
                                         r"expert_layer_offset"),
        (bug(BU, "theta_ignored"), LOGITS.format(LLAMA) + r".*RoPE runs with theta = 10,000"),
        (bug(BU, "mixtral_theta_1e4"), LOGITS.format(MIXTRAL) + r".*RoPE runs with theta = 10,000.*Mixtral 1e6"),
        (bug(BU, "always_tied"), LOGITS.format(LLAMA) + r".*but this config is untied"),
        (bug(BU, "mixtral_no_renorm"), LOGITS.format(MIXTRAL) + r".*Mixtral renormalises the top-k router weights"),
        (bug(BU, "jamba_renorm"), LOGITS.format(JAMBA) + r".*Mixtral's renormalisation applied to Jamba"),
        (bug(BU, "softmax_router"), LOGITS.format(DEEPSEEK) + r".*router scores are sigmoid"),
        (bug(BU, "biased_weights"), LOGITS.format(DEEPSEEK) + r".*weight the chosen experts by their unbiased"),
        (bug(BU, "no_groups"), LOGITS.format(DEEPSEEK) + r".*routes within groups"),
        (bug(BU, "no_bias"), LOGITS.format(DEEPSEEK) + r".*e_score_correction_bias is missing"),
        (bug(BU, "no_scale"), LOGITS.format(DEEPSEEK) + r".*routed_scaling_factor dropped"),
        (bug(BU, "no_topk_norm"), LOGITS.format(DEEPSEEK) + r".*norm_topk_prob is True"),
        (bug(BU, "no_shared"), LOGITS.format(DEEPSEEK) + r".*shared experts missing"),
        (bug(BU, "no_D"), LOGITS.format(MAMBA) + r".*skip term D \* x"),
        (bug(BU, "no_dt_norm"), LOGITS.format(JAMBA) + r".*Jamba's dt/b/c norms missing.*dt_layernorm"),
        (bug(BU, "no_bc_norms"), LOGITS.format(JAMBA) + r".*Jamba's dt/b/c norms missing.*b_layernorm"),
        (bug(BU, "mutates"), r"build_model modified the config dict"),
        (bug(BU, "returns_none"), r"load_hf_state_dict must return the model"),
        (bug(BU, "wrong_family"), r"\.family is 'llama', expected 'mixtral'"),
        (bug(LC, "in_place"), r"load_hf_state_dict changed the state dict you gave it \(model\.layers\.0\.self_attn\."
                              r"q_b_proj\.weight.*permute copies, not in place"),
        (bug(LC, "lenient"), r"load_hf_state_dict\(model, Llama state dict with a key too many.*did not raise: every "
                             r"key of transformers' state dict must be used"),
    ],
    "11.generate": [
        (bug(G, "length_frozen"), r"generate\(Llama.*new token \d+ differs.*cache positions restart at 0 "
                                  r"\(KVCache\.length not advancing\)"),
        (bug(G, "length_prefill_only"), r"generate\(Llama.*every decoded token gets position T"),
        (bug(G, "conv_off_by_one"), r"generate\(Mamba.*cached decoding disagrees with your model's own full forward.*"
                                    r"conv's last d_conv - 1 inputs"),
        (bug(G, "ssm_dropped"), r"generate\(Mamba.*cached decoding disagrees.*SSM state h"),
        (bug(G, "no_cache"), r"generate\(Llama.*the first call of the model was model\(idx of 5 tokens\): prefill"),
        (bug(G, "fresh_caches"), r"generate\(Llama.*after the prefill, each step feeds only the newest token.*same "
                                 r"caches"),
        (bug(G, "new_only"), r"generate\(Llama.*returned \(2, 20\), expected a \(B, T \+ max_new_tokens\)"),
        (bug(G, "at_least_one"), r"generate\(Llama, prompt \(2, 5\), 0\) returned \(2, 6\), expected the prompt"),
        (bug(G, "shared_caches"), r"generate\(Llama.*one cache shared by all layers"),
        (bug(G, "returns_new_only"), r"generate\(Llama.*update must return all cached keys and values .*not only "
                                     r"the new ones"),
        (bug(G, "feeds_previous"), r"generate\(Llama.*decoding step 1 fed the model .*feed the token you just chose"),
        (bug(G, "argmax_first"), r"generate\(Llama.*position 0, not the last: take the argmax of logits\[:, -1\]"),
        (bug(GM, "deepseek_halves"),
         r"generate\(DeepSeek-V3.*full forward gives these tokens too.*see 11\.load_hf_state_dict"),
    ],
    "11.to_hf_state_dict": [
        (bug(TH, "no_reinterleave"), r"to_hf_state_dict\(your DeepSeek-V3.*\['model\.layers\.0\.self_attn\.q_b_proj"
                                     r"\.weight'\].*rope rows are in halves order: to_hf_state_dict must interleave "
                                     r"them back"),
        (bug(TH, "tied_head_dropped"), r"to_hf_state_dict\(your Mamba.*missing \['lm_head\.weight'\] \(transformers' "
                                       r"state_dict\(\) lists the tied"),
        (bug(TH, "up_first"), r"to_hf_state_dict\(your Mixtral.*gate_up_proj'\].*up rows come first"),
        (bug(TH, "experts_reversed"), r"to_hf_state_dict\(your Mixtral.*experts are in reverse order"),
        (bug(TH, "float64"), r"to_hf_state_dict\(your Llama.*dtype torch\.float64, expected torch\.float32"),
        (bug(TI, "in_place"), r"to_hf_state_dict\(your Llama.*changed the model's weights \(blocks\.0\.norm1\.weight\): permute "
                              r"copies, not in place"),
        (bug(TM, "mixtral_no_renorm"), r"transformers' Mixtral with to_hf_state_dict\(your freshly built model\).*"
                                       r"round trip is exact, so the difference is in your model's forward"),
    ],
    "11.kv_bytes_per_token": [
        (bug(KV, "mha_heads"), r"kv_bytes_per_token\(a small llama.*kv bytes with the query heads"),
        (bug(KV, "head_dim_ignored"), r"kv_bytes_per_token\(a small llama.*head_dim is ignored"),
        (bug(KV, "k_only"), r"kv_bytes_per_token\(a small llama.*counts K or V, not both"),
        (bug(KV, "dtype_ignored"), r"kv_bytes_per_token\(a small mixtral, dtype_bytes=4\).*ignores dtype_bytes"),
        (bug(KV, "mla_expanded"), r"kv_bytes_per_token\(a small deepseek_v3.*counts the expanded keys and values"),
        (bug(KV, "mla_latent_only"), r"kv_bytes_per_token\(a small deepseek_v3.*counts the latent only"),
        (bug(KV, "jamba_all_layers"), r"kv_bytes_per_token\(a small jamba.*only Jamba's attention layers"),
        (bug(KV, "conv_full"), r"state_bytes\(a small mamba.*conv window counts d_conv columns"),
        (bug(KV, "no_conv"), r"state_bytes\(a small mamba.*conv window is missing"),
        (bug(KV, "state_all_layers"), r"state_bytes\(a small jamba.*only the Mamba layers carry a state"),
        (bug(KV, "dconv_4"), r"state_bytes\(a small mamba.*this assumes d_conv = 4"),
        (bug(KV, "expand_2"), r"state_bytes\(a small mamba.*this assumes expand = 2"),
        (bug(KD, "mamba_expand_1"), r"state_bytes\(Mamba-2\.8B.*Mamba's expand defaults to 2 in transformers"),
        (bug(KD, "mamba_conv_3"), r"state_bytes\(Mamba-2\.8B.*Mamba's conv_kernel defaults to 4 in transformers"),
        (bug(KD, "jamba_d_state_8"), r"state_bytes\(Jamba v0\.1.*Jamba's mamba_d_state defaults to 16 in transformers"),
    ],
    "11.count_params": [
        (bug(C, "mamba_untied"), r"count_params\(a small mamba\) = .*Mamba ties its output head"),
        (bug(C, "first_dense_plus_one"), r"count_params\(a small deepseek_v3\).*first_k_dense_replace off by one.*"
                                         r"one dense layer too many"),
        (bug(C, "all_active"), r"count_params\(a small mixtral, active=True\).*active counts all \d experts"),
        (bug(C, "bias_counted"), r"count_params\(a small deepseek_v3\).*e_score_correction_bias is counted"),
        (bug(C, "no_shared"), r"count_params\(a small deepseek_v3\).*shared experts are missing"),
        (bug(C, "jamba_no_norms"), r"count_params\(a small jamba\).*dt/b/c norms"),
        (bug(C, "float"), r"count_params\(a small llama\): returned the float"),
        (bug(CD, "deepseek_q_lora_none"), r"count_params\(DeepSeek-V3\).*DeepSeek-V3's q_lora_rank defaults to 1536 "
                                          r"in transformers"),
        (bug(CD, "dt_rank_floor"), r"count_params\(a small mamba\).*time_step_rank \"auto\" is ceil\(hidden_size / "
                                   r"16\) = 3 here"),
        (bug(CD, "mixtral_head_dim"), r"count_params\(a small mixtral\).*head_dim is ignored: it is 12 here"),
        (bug(CD, "jamba_one_expert"), r"count_params\(a small jamba\).*num_experts = 1 transformers' Jamba uses a "
                                      r"plain MLP"),
        (bug(CD, "jamba_active_every_layer"), r"count_params\(a small jamba, active=True\).*active subtracts the "
                                              r"unused experts of 2 layers, but 3 of the 5 layers are MoE"),
    ],
    "11.export_pretrained": [
        (bug(EX, "head_written_twice"), r"export_pretrained\(your Mamba.*holds lm_head\.weight, but the config ties "
                                        r"it"),
        (bug(EX, "no_experts_field"), r"export_pretrained\(your Mixtral.*from_pretrained\(path\) raised.*config\.json "
                                      r"lacks \['num_local_experts'\]"),
        (bug(EX, "eos_kept"), r"export_pretrained\(your Llama.*must set eos_token_id to null"),
        (bug(EX, "no_model_type"), r"export_pretrained\(your Llama.*must have \"model_type\""),
        (bug(EX, "no_weights"), r"export_pretrained\(your Llama.*must write model\.safetensors"),
        (bug(EX, "no_rope_field"), r"export_pretrained\(your Llama.*logits.*config\.json's fields differ from the "
                                   r"model's: \['rope_parameters'"),
        (bug(EX, "str_path"), r"export_pretrained\(your Mixtral, 'mixtral', path as a Path\) raised TypeError.*path "
                              r"was a pathlib\.Path here"),
        (bug(EX, "dropped_norm"), r"export_pretrained\(your Llama.*reports \{'missing_keys': \['model\.norm\.weight'\]"),
    ],
}


# ---------------------------------------------------------------- bugs only the hidden checks' configs reach
def hidden_load_with(ns, bug: str):
    """load_hf_state_dict that de-interleaves whatever rope_interleave says, or whose row permutation handles 2-D
    weights only (DeepSeek's kv_a_proj_with_mqa bias has rope rows too)."""
    copy = rebound(ns)
    halves = ns["halves_from_pairs"]

    def rope_rows(model):
        rows = ns["rope_rows"](model)
        return {k: v for k, v in rows.items() if not k.endswith(".bias")} if bug == "bias_rows_kept" else rows

    def load_hf_state_dict(model, hf_state_dict, family):
        if bug == "always_deinterleave" and family == "deepseek_v3":
            model.hf_config = dict(model.hf_config, rope_interleave=True)  # BUG: rope_interleave False ignored
        return copy["load_hf_state_dict"](model, hf_state_dict, family)

    copy["rope_rows"] = rope_rows  # BUG (bias_rows_kept): the bias's rope rows left interleaved
    copy["halves_from_pairs"] = halves
    return ns["build_model"], load_hf_state_dict


# hidden check id -> [(factory, a regular expression the failure message must match)]
HIDDEN_BUGS = {
    "11.hidden.load_hf_state_dict_edge": [
        (bug(hidden_load_with, "always_deinterleave"), r"the logits of your DeepSeek-V3 \(rope_interleave=False"),
        (bug(hidden_load_with, "bias_rows_kept"), r"the logits of your DeepSeek-V3 \(attention_bias=True\)"),
        (bug(solution_load_with, "deepseek_groups_1"), r"the logits of your DeepSeek-V3 \(rope_interleave=False"),
    ],
}
