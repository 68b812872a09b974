"""Checks of Lab 11: today's open models (Llama, Mixtral, DeepSeek-V3, Mamba, Jamba) from the course's parts, with
transformers' weights in and out.

References (``references.py``, section "Lab 11"; notes in ``tests/lab11_reference_notes.md``):

* ``load_hf_state_dict``: transformers' ``LlamaForCausalLM``, ``MixtralForCausalLM``, ``DeepseekV3ForCausalLM``,
  ``MambaForCausalLM`` and ``JambaForCausalLM``, built offline from small configs (eager attention and experts,
  float32, no special tokens), every parameter drawn from the check's seed (norm gains, DeepSeek's correction bias
  and Mamba's A_log, D and dt bias included): their ``state_dict()`` loaded into the student's model, whose logits
  must agree to 1e-4. A mismatch names the first block whose output differs and, from transformers' models changed
  to behave as known wrong conversions (RoPE layouts, head orders, expert layouts, routers, norms), the bug.
* ``generate``: transformers' ``generate(do_sample=False, eos_token_id=None)``, 20 new tokens, on weights redrawn
  until every greedy step's top-1 / top-2 gap is at least 2e-3 (a tie cannot flip on rounding); the student's
  model must prefill once and then decode one token a step with its caches. Diagnoses: transformers' decoding with
  the positions of a cache whose length does not advance, and the student's own full forward.
* ``to_hf_state_dict``: the exact state dict back (keys, shapes, values), and the student's freshly built model
  (its own initialisation) converted and loaded into transformers' class (strict) gives the student's logits.
* ``kv_bytes_per_token`` and ``state_bytes``: the bytes of the cache tensors transformers itself allocates (a
  forward with ``use_cache=True`` at two lengths, in bfloat16 and float32), and closed forms for published models.
* ``count_params``: the numel of transformers' models on the meta device (active: less the unused routed
  experts), for random small configs and Llama 3 8B, Mixtral 8x7B, DeepSeek-V3, Mamba-2.8B and Jamba v0.1.
* ``export_pretrained``: the folder the student writes, read back by ``AutoModelForCausalLM.from_pretrained``
  offline: no missing or unexpected keys, the same logits and the same greedy tokens.
"""
from __future__ import annotations

import json
import numbers

import torch

from labkit.checks import compare, define, first_match, raised, references as ref, seeded_generator
from labkit.checks.kernel import attempt

FAMILIES = ref.OPEN_FAMILIES
N_NEW = 20  # greedy tokens generated
ATOL = 1e-4  # logits
NAMES = {"llama": "Llama", "mixtral": "Mixtral", "deepseek_v3": "DeepSeek-V3", "mamba": "Mamba", "jamba": "Jamba"}


# ---------------------------------------------------------------- the cases
def model_inputs(seed: int, cases=tuple((f, ()) for f in FAMILIES), mode: str = "load") -> dict:
    """One case per (family, sizes): the config dict, transformers' state dict, a batch of ids and a prompt
    (:func:`references.open_case`, drawn from the seed). In "load" mode the first case also hands the loader a state
    dict with a key too many and one with a key too few, which it must refuse."""
    out = []
    for i, (family, sizes) in enumerate(cases):
        case = ref.open_case(family, 1000 * seed + i, json.dumps(dict(sizes), sort_keys=True))
        state = {k: v.clone() for k, v in case["state"].items()}
        out.append({"family": family, "sizes": [list(item) for item in sizes], "seed": 1000 * seed + i,
                    "config": json.loads(json.dumps(case["config"])), "state": state,
                    "idx": case["idx"].clone(), "prompt": case["prompt"].clone(), "n_new": N_NEW,
                    "odd_keys": odd_keys(case) if mode == "load" and i == 0 else []})
    return {"mode": mode, "cases": out}


def odd_keys(case: dict) -> list[str]:
    """[a key transformers' state dict of a deeper model would have, a key of this one to leave out]."""
    layers = ref.open_config(case["config"]).num_hidden_layers
    prefix = "backbone" if case["family"] == "mamba" else "model"
    extra = f"{prefix}.layers.{layers}.{'norm' if case['family'] == 'mamba' else 'input_layernorm'}.weight"
    return [extra, f"{prefix}.layers.0.{'norm' if case['family'] == 'mamba' else 'input_layernorm'}.weight"]


def reference(case: dict) -> dict:
    """The reference of a case (cached: the same in every process for the same seed)."""
    return ref.open_case(case["family"], case["seed"], json.dumps(dict(case["sizes"]), sort_keys=True))


def what(case: dict) -> str:
    extra = ", ".join(f"{k}={v}" for k, v in case["sizes"] if k != "rope_parameters")
    return f"{NAMES[case['family']]}{' (' + extra + ')' if extra else ''}"


# ---------------------------------------------------------------- the student's model, built and loaded (collect)
def open_collect(inputs: dict, build_model, load_hf_state_dict, third=None) -> dict:
    """The collect of the four model checks (``inputs["mode"]``), self-contained (the grader sends its source to
    the kernel). Per case: build_model on a copy of the config (whether it changed it, the parameters of each of
    its blocks), load_hf_state_dict with a copy of the state dict (whether it returned the model, which of the
    tensors it was given it changed, and, for a case with odd keys, whether it refused a key too many and a key too
    few); then
    "load": the logits on idx and each block's output (forward hooks on model.blocks);
    "generate": generate(model, prompt, n_new) (``third``) with the model's forward calls recorded (tokens fed,
    caches given, the same caches as the first, one per layer or not, what each cache's update was given and
    returned), whether it changed the prompt, the model's own full-forward logits on the tokens it generated, and
    generate(model, prompt, 0);
    "to_hf": to_hf_state_dict (``third``) of the loaded model (whether it changed the model's weights) and its
    logits, and of a freshly built one with its logits on idx;
    "export": export_pretrained (``third``) into a fresh folder, a pathlib.Path for every other case: its file
    names, config.json's text and model.safetensors' bytes."""
    import json
    import os
    import pathlib
    import tempfile

    def raised_of(value):
        return value["raised"] if isinstance(value, dict) and set(value) == {"raised"} else ""

    def changed_keys(given, original):
        keys = [k for k in original if k not in given or not isinstance(given[k], torch.Tensor)
                or given[k].shape != original[k].shape or not torch.equal(given[k], original[k])]
        return [str(k) for k in keys + [k for k in given if k not in original]][:5]

    def refused(case, state):
        model = attempt(build_model, json.loads(json.dumps(case["config"])))
        return isinstance(model, torch.nn.Module) and bool(raised_of(attempt(load_hf_state_dict, model, state,
                                                                               case["family"])))

    def built(case):
        config = json.loads(json.dumps(case["config"]))
        model = attempt(build_model, config)
        record = {"changed": config != case["config"], "build": "", "load": "", "returned": True, "blocks": None,
                  "family": "", "given_changed": [], "refused": [True, True]}
        if not isinstance(model, torch.nn.Module):
            record["build"] = raised_of(model) or f"returned a {type(model).__name__}, expected a torch.nn.Module"
            return None, record
        blocks = getattr(model, "blocks", None)
        if isinstance(blocks, torch.nn.ModuleList):
            record["blocks"] = [sum(p.numel() for p in block.parameters()) for block in blocks]
        record["family"] = str(getattr(model, "family", ""))
        given = {k: v.clone() for k, v in case["state"].items()}
        loaded = attempt(load_hf_state_dict, model, given, case["family"])
        record["given_changed"] = changed_keys(given, case["state"])
        if raised_of(loaded):
            record["load"] = raised_of(loaded)
            return None, record
        record["returned"] = loaded is model
        if case["odd_keys"]:
            extra, gone = case["odd_keys"]
            more = {k: v.clone() for k, v in case["state"].items()} | {extra: case["state"][gone].clone()}
            fewer = {k: v.clone() for k, v in case["state"].items() if k != gone}
            record["refused"] = [refused(case, more), refused(case, fewer)]
        return model.eval(), record

    def forward(model, idx):
        found = []
        blocks = getattr(model, "blocks", None)
        hook = lambda module, args, output: found.append(
            (output[0] if isinstance(output, tuple) else output).detach().clone())
        handles = [b.register_forward_hook(hook) for b in blocks] if isinstance(blocks, torch.nn.ModuleList) else []
        try:
            with torch.no_grad():
                logits = attempt(model, idx.clone())
        finally:
            for handle in handles:
                handle.remove()
        logits = logits.detach().float().clone() if isinstance(logits, torch.Tensor) else logits
        return logits, (found if len(found) == len(handles) else [])

    def as_state(got):
        """A state dict as lists (keys, shapes, flattened values), which fit the grader's schema whatever the keys."""
        if raised_of(got):
            return got
        if not isinstance(got, dict):
            return {"raised": f"returned a {type(got).__name__}, expected a dict"}
        odd = [k for k, v in got.items() if not isinstance(v, torch.Tensor)]
        if odd:
            return {"raised": f"returned a dict whose value for {str(odd[0])!r} is a {type(got[odd[0]]).__name__}, "
                              "not a tensor"}
        return {"keys": [str(k) for k in got], "shapes": [list(v.shape) for v in got.values()],
                "values": [v.detach().reshape(-1).clone() for v in got.values()]}

    def watch_updates(caches, updates):
        """Record (layer, tokens given, tokens returned) of each cache's update (an instance attribute over the
        class's method; a cache that refuses one is not watched)."""
        done = set()
        for i, cache in enumerate(caches if isinstance(caches, (list, tuple)) else []):
            plain = getattr(cache, "update", None)
            if id(cache) in done or not callable(plain):
                continue
            done.add(id(cache))

            def update(*args, plain=plain, i=i, **kwargs):
                result = plain(*args, **kwargs)
                first = args[0] if args else None
                back = result[0] if isinstance(result, (tuple, list)) and result else None
                if isinstance(first, torch.Tensor) and isinstance(back, torch.Tensor) and first.dim() >= 2 and \
                        back.dim() == first.dim():
                    updates.append([i, int(first.shape[-2]), int(back.shape[-2])])
                return result

            try:
                cache.update = update
            except (AttributeError, TypeError):
                pass

    mode, out = inputs["mode"], []
    empty = {"load": {"logits": None, "layers": []},
             "generate": {"tokens": None, "calls": [], "prompt_changed": False, "own": None, "distinct": True,
                          "fed": [], "updates": [], "zero": None},
             "to_hf": {"back": None, "own_back": None, "own_logits": None, "logits": None, "model_changed": []},
             "export": {"export": "", "config": "", "weights": None, "files": [], "path": "str"}}[mode]
    for index, case in enumerate(inputs["cases"]):
        model, record = built(case)
        record |= empty  # the same keys whatever happens
        if model is None:
            out.append(record)
            continue
        if mode == "load":
            record["logits"], record["layers"] = forward(model, case["idx"])
        elif mode == "generate":
            calls, seen, fed, updates = [], [], [], []
            plain = model.forward

            def watched(idx, *args, **kwargs):
                caches = args[0] if args else kwargs.get("caches")
                if caches is not None and not seen:
                    blocks = getattr(model, "blocks", [])
                    record["distinct"] = not isinstance(caches, (list, tuple)) or len(
                        {id(c) for c in caches}) == len(caches) >= len(blocks)
                    watch_updates(caches, updates)
                if caches is not None:
                    seen.append(caches)  # kept alive, so that identity tells the same caches from new ones
                calls.append([int(idx.shape[-1]), caches is not None, caches is None or caches is seen[0]])
                if len(calls) > 1 and idx.dim() == 2 and idx.shape[-1] == 1:
                    fed.append([int(t) for t in idx[:, 0].tolist()])
                return plain(idx, *args, **kwargs)

            model.forward = watched
            prompt = case["prompt"].clone()
            try:
                with torch.no_grad():
                    tokens = attempt(third, model, prompt, case["n_new"])
            finally:
                model.forward = plain
            own = None
            if isinstance(tokens, torch.Tensor) and tokens.dim() == 2 and tokens.shape[1] > 1:
                own, _ = forward(model, tokens[:, :-1].long())
            with torch.no_grad():
                zero = attempt(third, model, case["prompt"].clone(), 0)
            record |= {"tokens": tokens.detach().clone() if isinstance(tokens, torch.Tensor) else tokens,
                       "calls": calls, "prompt_changed": not torch.equal(prompt, case["prompt"]), "own": own,
                       "fed": fed[:64], "updates": updates[:256],
                       "zero": zero.detach().clone() if isinstance(zero, torch.Tensor) else (
                           zero if raised_of(zero) else {"raised": f"returned a {type(zero).__name__}"})}
        elif mode == "to_hf":
            before = {k: v.detach().clone() for k, v in model.state_dict().items()}
            record["back"] = as_state(attempt(third, model, case["family"]))
            record["model_changed"] = changed_keys(model.state_dict(), before)
            record["logits"], _ = forward(model, case["idx"])
            torch.manual_seed(case["seed"])
            fresh = attempt(build_model, json.loads(json.dumps(case["config"])))
            record["own_back"], record["own_logits"] = None, None
            if isinstance(fresh, torch.nn.Module):
                fresh.eval()
                record["own_back"] = as_state(attempt(third, fresh, case["family"]))
                record["own_logits"], _ = forward(fresh, case["idx"])
        else:
            with tempfile.TemporaryDirectory() as folder:
                path = os.path.join(folder, "exported")
                record["path"] = "Path" if index % 2 else "str"  # the notebook passes a Path
                done = attempt(third, model, case["family"], pathlib.Path(path) if index % 2 else path)
                record |= {"export": raised_of(done), "config": "", "weights": None,
                           "files": sorted(os.listdir(path)) if os.path.isdir(path) else []}
                if os.path.isfile(os.path.join(path, "config.json")):
                    with open(os.path.join(path, "config.json"), encoding="utf-8", errors="replace") as f:
                        record["config"] = f.read(100_000)
                if os.path.isfile(os.path.join(path, "model.safetensors")):
                    with open(os.path.join(path, "model.safetensors"), "rb") as f:
                        record["weights"] = torch.frombuffer(bytearray(f.read()), dtype=torch.uint8).clone()
        out.append(record)
    return {"cases": out}


# ---------------------------------------------------------------- diagnoses (verify)
# A known wrong conversion or implementation -> what to do about it; the logits of each come from transformers'
# model changed to behave that way (references.open_variant).
VARIANTS = {
    "rope_interleaved": "your model rotates interleaved pairs (x0, x1), (x2, x3), ... of q and k: transformers' "
                        "Llama and Mixtral weights are already in the rotate-half layout (pairs (x_i, x_i+d/2)); load "
                        "q_proj and k_proj as they are and rotate with rotate_half (labkit.nn.apply_rope)",
    "rope_unpermuted": "q_proj and k_proj have their rows permuted within each head (Meta's interleaved order, as "
                       "convert_llama_weights_to_hf undoes it): transformers' rows are already in rotate-half order; "
                       "load them as they are",
    "deepseek_halves": "DeepSeek rope rows look interleaved: DeepSeek-V3 rotates interleaved pairs "
                       "(rope_interleave=True), and rotate-half on the rows as stored gives other numbers. "
                       "De-interleave the rope part of q_b_proj (or q_proj) per head (the last qk_rope_head_dim rows "
                       "of each head: rows 0, 2, 4, ..., then 1, 3, 5, ...) and the last qk_rope_head_dim rows of "
                       "kv_a_proj_with_mqa",
    "deepseek_q_only": "the queries' rope rows are de-interleaved but not the key's: also reorder the last "
                       "qk_rope_head_dim rows of kv_a_proj_with_mqa (0, 2, 4, ..., then 1, 3, 5, ...)",
    "deepseek_k_only": "the key's rope rows are de-interleaved but not the queries': also reorder the last "
                       "qk_rope_head_dim rows of each head of q_b_proj (or q_proj)",
    "deepseek_deinterleave_whole": "the rope rows of q_b_proj were de-interleaved across all heads at once: "
                                   "de-interleave the qk_rope_head_dim rope rows of each head on their own",
    "kv_heads_reversed": "GQA head order mixed up: the key-value heads of k_proj and v_proj come out in another "
                         "order; KV head h is rows h*head_dim to (h+1)*head_dim, and keep them in that order",
    "kv_heads_tiled": "GQA head order mixed up: query head h reads key-value head h % num_key_value_heads; in "
                      "transformers (repeat_kv) it reads head h // (num_attention_heads / num_key_value_heads), each "
                      "KV head serving consecutive query heads",
    "up_first": "the experts' gate_up_proj is read up rows first: its rows [0:I] are the gate (through SiLU) and "
                "[I:2I] the up projection: act(gate) * up",
    "experts_reversed": "the experts are stacked in the wrong order: gate_up_proj[e] and down_proj[e] belong to "
                        "expert e, the router's row e",
    "dense_up_first": "gate_proj and up_proj are swapped in a dense FFN: down_proj(silu(gate_proj x) * up_proj x)",
    "no_renormalisation": "Mixtral renormalises the top-k router weights to sum to 1 (MoE(renormalize=True)); "
                          "Jamba's router does not",
    "renormalised": "Mixtral's renormalisation applied to Jamba: Jamba's router keeps the top-k softmax weights as "
                    "they are (MoE(renormalize=False))",
    "softmax_router": "DeepSeek-V3's router scores are sigmoid(router logits), not a softmax",
    "no_groups": "DeepSeek-V3 routes within groups: keep the topk_group groups whose two best biased scores sum "
                 "highest, then take the top k experts inside them",
    "biased_weights": "the correction bias chooses the experts, it does not weight them: weight the chosen experts "
                      "by their unbiased sigmoid scores",
    "no_correction_bias": "mlp.gate.e_score_correction_bias is missing from the routing: add it to the sigmoid scores "
                          "to choose the experts (only to choose them)",
    "no_scaling_factor": "routed_scaling_factor dropped: multiply the routed experts' weights by it (2.5 in V3), "
                         "after normalising them",
    "no_topk_norm": "norm_topk_prob is True: divide the k routed weights by their sum (before routed_scaling_factor)",
    "no_shared_experts": "shared experts missing: DeepSeek-V3's MoE adds mlp.shared_experts(x) to the routed output",
    "norms_swapped": "the two norms of each layer are swapped: input_layernorm before the mixer, "
                     "post_attention_layernorm (Jamba: pre_ff_layernorm) before the FFN",
    "mla_norms_swapped": "q_a_layernorm and kv_a_layernorm are swapped",
    "theta_1e4": "RoPE runs with theta = 10,000: read rope_parameters['rope_theta'] (a legacy top-level rope_theta "
                 "too), and when absent the family's default (Mixtral 1e6, Llama and DeepSeek-V3 1e4)",
    "theta_1e6": "RoPE runs with theta = 1e6: read rope_parameters['rope_theta'], and when absent the family's default "
                 "(Llama and DeepSeek-V3 1e4, Mixtral 1e6)",
    "theta_5e5": "RoPE runs with theta = 500,000: read rope_parameters['rope_theta'] of this config",
    "untied_head_is_table": "the output head is tied to the embedding table, but this config is untied "
                            "(tie_word_embeddings is False; when absent it is False for every family but Mamba): "
                            "lm_head.weight is a matrix of its own",
    "table_is_head": "the embedding table is tied to the output head, but this config is untied "
                     "(tie_word_embeddings is False; when absent it is False for every family but Mamba)",
    "xz_swapped": "in_proj's output is [x | z]: the first d_inner channels go through the conv and the scan, the "
                  "second half is the gate z",
    "no_skip_D": "the skip term D * x of the scan's output is missing",
    "x_proj_order": "x_proj's output splits as [dt (time_step_rank) | B (d_state) | C (d_state)], in that order",
    "no_dt_norms": "Jamba's dt/b/c norms missing: its mixer normalises the step's input with dt_layernorm before "
                   "dt_proj",
    "no_bc_norms": "Jamba's dt/b/c norms missing: its mixer normalises B and C with b_layernorm and c_layernorm",
    "mla_scale_nope": "the attention scale is (qk_nope_head_dim + qk_rope_head_dim)^-0.5, not qk_nope_head_dim^-0.5",
}


def variant_suspects(case: dict) -> dict:
    """Diagnosis -> (a function giving) the logits of transformers' model changed to behave as the bug."""
    return {advice: (lambda v=name: ref.open_variant_logits(case["config"], case["state"], case["idx"], v))
            for name, advice in VARIANTS.items()}


def kind_rule(family: str, config: dict) -> str:
    c = ref.open_config(config)
    if family == "deepseek_v3":
        return (f"layers i < first_k_dense_replace = {c.first_k_dense_replace} have a dense FFN, the others routed "
                "experts (mlp.experts)")
    if family == "jamba":
        return (f"layer i is attention iff i % attn_layer_period == attn_layer_offset (period {c.attn_layer_period}, "
                f"offset {c.attn_layer_offset}), else Mamba; its FFN is MoE iff i % expert_layer_period == "
                f"expert_layer_offset (period {c.expert_layer_period}, offset {c.expert_layer_offset})")
    return ""


def structure(case: dict, got: dict) -> str:
    """The first block whose parameter count differs from transformers' layer, and the family's layer rule."""
    if got.get("blocks") is None:
        return ""
    want = ref.open_layer_numels(case["config"])
    kinds = ref.open_layer_kinds(case["config"])
    if len(got["blocks"]) != len(want):
        return f"your model has {len(got['blocks'])} blocks, transformers' {len(want)} layers"
    for i, (n, m) in enumerate(zip(got["blocks"], want)):
        if n != m:
            rule = kind_rule(case["family"], case["config"])
            return (f"your block {i} has {n:,} parameters where transformers' layer {i} ({kinds[i]}) has {m:,}"
                    + (f": {rule}" if rule else ""))
    return ""


def first_layer(case: dict, got: dict) -> str:
    """Which block's output is the first to differ from transformers' layer's (on the same ids)."""
    want = reference(case)["layers"]
    layers = got.get("layers") or []
    if len(layers) != len(want):
        return ""
    kinds = ref.open_layer_kinds(case["config"])
    for i, (a, b) in enumerate(zip(layers, want)):
        if not isinstance(a, torch.Tensor) or a.shape != b.shape:
            return f"block {i}'s output has shape {tuple(a.shape) if isinstance(a, torch.Tensor) else a}, expected " \
                   f"{tuple(b.shape)}"
        scale = max(1.0, float(b.abs().max()))
        if float((a.double() - b.double()).abs().max()) > ATOL * scale:
            return f"layer {i} ({kinds[i]}) is the first whose output differs"
    return ""


def model_failure(call: str, case: dict, got: dict) -> None:
    """Raise for a build or load that failed, or a config changed, with the structure's diagnosis."""
    if got["changed"]:
        raise AssertionError(f"{call}: build_model modified the config dict it was given: read it (copy it), leave "
                             "it as it is")
    if got["build"]:
        raise AssertionError(f"build_model({what(case)} config) raised {got['build']}")
    if got["load"]:
        hint = structure(case, got)
        raise AssertionError(f"load_hf_state_dict(model, {what(case)} state dict, {case['family']!r}) raised "
                             f"{got['load']}" + (f". {hint}" if hint else ". It must take exactly the keys of "
                                                 "transformers' state_dict(): " + ", ".join(
                                                     list(case['state'])[:6]) + ", ..."))
    if got["given_changed"]:
        raise AssertionError(f"load_hf_state_dict changed the state dict you gave it ({', '.join(got['given_changed'])}"
                             f"): permute copies, not in place (the caller's transformers model shares those "
                             "tensors)")
    if not got["returned"]:
        raise AssertionError(f"{call}: load_hf_state_dict must return the model it loaded")


def check_logits(call: str, case: dict, got: dict, want: torch.Tensor) -> None:
    if not isinstance(got["logits"], torch.Tensor) or close_enough(got["logits"], want):
        compare(call, got["logits"], want, ATOL)  # raises for a non-tensor or a shape
        return
    where = first_layer(case, got)
    shape = structure(case, got)
    hint = first_match(got["logits"], variant_suspects(case), ATOL) or shape or (
        "compare your conversion table with transformers' state_dict() keys: a norm, an FFN or an attention "
        "weight lands in the wrong place or layout")
    compare(call + (f": {where}" if where else ""), got["logits"], want, ATOL, hint)


def close_enough(got: torch.Tensor, want: torch.Tensor) -> bool:
    return got.shape == want.shape and bool(torch.isfinite(got).all()) and float(
        (got.double() - want.double()).abs().max()) <= ATOL


@define("11.load_hf_state_dict", model_inputs, open_collect)
def load_hf_state_dict(inputs: dict, out: dict) -> str:
    for case, got in zip(inputs["cases"], out["cases"], strict=True):
        call = f"the logits of your {what(case)} with transformers' weights"
        model_failure(call, case, got)
        check_logits(call, case, got, reference(case)["logits"])
        if got["family"] != case["family"]:
            raise AssertionError(f"build_model({what(case)} config).family is {got['family']!r}, expected "
                                 f"{case['family']!r} (config['model_type'])")
        for took, (kind, key) in zip(got["refused"], (("with a key too many", case["odd_keys"][:1]),
                                                      ("without a key", case["odd_keys"][1:]))):
            if not took:
                raise AssertionError(f"load_hf_state_dict(model, {what(case)} state dict {kind}, {key}) did not "
                                     "raise: every key of transformers' state dict must be used, and every weight "
                                     "of the model loaded (a key your table does not rename would be silently "
                                     "dropped); raise a KeyError naming the keys (or load_state_dict(strict=True))")
    return ("transformers' Llama, Mixtral, DeepSeek-V3, Mamba and Jamba weights (state_dict() of random models, norms, "
            "correction bias and SSM parameters included) give your models the same logits (1e-4)")


# ---------------------------------------------------------------- 2. generate
CACHE_HINT = {
    "llama": "each KVCache.update must advance .length by the tokens it adds, so that RoPE places the new token at "
             "position length",
    "mixtral": "each KVCache.update must advance .length by the tokens it adds, so that RoPE places the new token at "
               "position length",
    "deepseek_v3": "the cache keeps the latent and the rotated key (update(latent, k_rope)) and must advance .length "
                   "by the tokens it adds, so that RoPE places the new token at position length",
    "mamba": "the state must carry the conv's last d_conv - 1 inputs (before the conv; the newest last) and the SSM "
             "state h after the last token",
    "jamba": "its Mamba layers carry the conv's last d_conv - 1 inputs and the SSM state h; its attention layers the "
             "keys and values",
}


def zero_tokens(call: str, case: dict, zero) -> None:
    """generate(model, prompt, 0) must give the prompt back: no new token."""
    zero_call = call.replace(f", {case['n_new']})", ", 0)")
    if raised(zero):
        raise AssertionError(f"{zero_call} " + (f"raised {raised(zero)}" if not raised(zero).startswith("returned")
                                                else raised(zero)) + ": with max_new_tokens = 0 return the prompt")
    if not isinstance(zero, torch.Tensor) or zero.shape != case["prompt"].shape or not torch.equal(
            zero.long(), case["prompt"]):
        found = tuple(zero.shape) if isinstance(zero, torch.Tensor) else type(zero).__name__
        raise AssertionError(f"{zero_call} returned {found}, expected the prompt {tuple(case['prompt'].shape)} "
                             "unchanged: max_new_tokens = 0 appends no token (loop max_new_tokens times, not at "
                             "least once)")


def decoding_slip(got: dict, tokens: torch.Tensor, T: int) -> str:
    """What the recorded calls show wrong in a decoding loop: caches shared by layers, an update that returns less
    (or more) than everything cached, a step fed another token than the one just chosen, or a first token taken
    from another position than the last."""
    if not got["distinct"]:
        return ("one cache shared by all layers: new_caches must give each layer a cache of its own ([KVCache()] * "
                "n repeats one object; build a new one per layer)")
    held = {}
    for layer, given, back in got["updates"]:
        held[layer] = held.get(layer, 0) + given
        if back == given < held[layer]:
            return ("KVCache.update must return all cached keys and values (B, H, length, d), not only the new ones: "
                    "the decoded token must attend to the whole context")
        if back != held[layer]:
            return (f"layer {layer}'s KVCache.update returned {back} positions where it holds {held[layer]}: each "
                    "cache keeps its own keys and values (instance attributes, not a list shared by the class) and "
                    "returns all of them")
    for j, fed in enumerate(got["fed"]):
        if T + j < tokens.shape[1] and fed != tokens[:, T + j].tolist():
            return (f"decoding step {j + 1} fed the model {fed}, not the token it had just chosen "
                    f"{tokens[:, T + j].tolist()}: feed the token you just chose, model(next_id, caches)")
    own = got["own"]
    if isinstance(own, torch.Tensor) and own.shape[:2] == tokens[:, :-1].shape:
        prefill = own[:, :T].argmax(-1)  # (B, T): the argmax at each position of the prompt
        first = tokens[:, T]
        if not torch.equal(prefill[:, -1], first):
            at = [p for p in range(T - 1) if torch.equal(prefill[:, p], first)]
            if at:
                return (f"the first new token is the argmax of the prefill's logits at position {at[0]}, not the "
                        "last: take the argmax of logits[:, -1] (logits are (B, T, V); the next token follows the "
                        "last position)")
    return ""


@define("11.generate", lambda seed: model_inputs(seed, mode="generate"), open_collect)
def generate(inputs: dict, out: dict) -> str:
    margins = []
    for case, got in zip(inputs["cases"], out["cases"], strict=True):
        call = f"generate({what(case)}, prompt {tuple(case['prompt'].shape)}, {case['n_new']})"
        model_failure(call, case, got)
        r = reference(case)
        want, T, n = r["tokens"], case["prompt"].shape[1], case["n_new"]
        tokens = got["tokens"]
        if raised(tokens):
            raise AssertionError(f"{call} raised {raised(tokens)}")
        if not isinstance(tokens, torch.Tensor) or tokens.shape != want.shape:
            found = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
            raise AssertionError(f"{call}: returned {found}, expected a (B, T + max_new_tokens) = {tuple(want.shape)} "
                                 "tensor of token ids: the prompt followed by the new tokens")
        if got["prompt_changed"]:
            raise AssertionError(f"{call} changed the prompt tensor in place: build a new one (torch.cat)")
        if tokens.is_floating_point() or not torch.equal(tokens[:, :T].long(), case["prompt"]):
            raise AssertionError(f"{call}: the result must start with the prompt, as integer token ids")
        calls = got["calls"]
        if not calls or not calls[0][1] or calls[0][0] != T:
            raise AssertionError(
                f"{call}: the first call of the model was model(idx of {calls[0][0] if calls else '?'} tokens"
                f"{', caches' if calls and calls[0][1] else ''}): prefill the whole prompt once with fresh caches "
                "(model(prompt, caches), caches = one per layer), then decode one token a step with the same caches")
        rest = calls[1:]
        if any(t != 1 or not c for t, c, _ in rest) or not all(same for _, _, same in calls) or not n - 1 <= len(
                rest) <= n:
            shapes = ", ".join(f"{t}{'+caches' if c else ''}" for t, c, _ in calls[:6])
            raise AssertionError(
                f"{call}: the model was called on {shapes}{' ...' if len(calls) > 6 else ''} tokens ({len(calls)} "
                f"calls): after the prefill, each step feeds only the newest token, model(next_id, caches), with the "
                f"same caches, {n - 1} times for {n} new tokens")
        margins.append(r["margin"])
        if torch.equal(tokens.long(), want):
            zero_tokens(call, case, got["zero"])
            continue
        steps = (tokens.long() != want).nonzero()
        step = int(steps[:, 1].min()) - T
        own = got["own"]
        said = f"{call}: new token {step} differs from transformers' greedy generate: " \
               f"{tokens[:, T:T + step + 1].tolist()} vs {want[:, T:T + step + 1].tolist()}"
        family = case["family"]
        slip = decoding_slip(got, tokens.long(), T)
        if slip:
            raise AssertionError(f"{said}. {slip}")
        if family != "mamba":
            model = ref.open_model(case["config"], case["state"])
            for positions, advice in (("zero", "the decoded tokens get position 0 every step: cache positions "
                                       "restart at 0 (KVCache.length not advancing)"),
                                      ("prompt", "every decoded token gets position T (the prompt's length): "
                                       "KVCache.length must grow with every token, not only at the prefill")):
                if family in ("jamba",):
                    break
                if torch.equal(tokens.long(), ref.open_decode(model, case["prompt"], n, positions)):
                    raise AssertionError(f"{said}. {advice}: {CACHE_HINT[family]}")
        if isinstance(own, torch.Tensor) and own.shape[:2] == tokens[:, :-1].shape:
            implied = own[:, T - 1:].argmax(-1)
            if not torch.equal(implied, tokens[:, T:].long()):
                raise AssertionError(f"{said}. Your cached decoding disagrees with your model's own full forward on "
                                     f"the same tokens: {CACHE_HINT[family]}")
            raise AssertionError(f"{said}. Your model's full forward gives these tokens too: its logits differ from "
                                 "transformers' (see 11.load_hf_state_dict)")
        raise AssertionError(said)
    return (f"{N_NEW} greedy tokens with the caches (a prefill, then one token a step) equal transformers' "
            f"generate(do_sample=False) for all five families (the smallest top-1 / top-2 logit gap on the way: "
            f"{min(margins):.2g})")


# ---------------------------------------------------------------- 3. to_hf_state_dict
def state_of(back):
    """The state dict that open_collect recorded as lists, or its record of what went wrong."""
    if back is None or raised(back):
        return back
    return {k: v.view(shape) for k, shape, v in zip(back["keys"], back["shapes"], back["values"], strict=True)}


def layout_slip(key: str, got: torch.Tensor, want: torch.Tensor, case: dict) -> str:
    """What a tensor that came back different is, when it is a known rearrangement of the right one."""
    c = ref.open_config(case["config"])
    if got.shape != want.shape:
        return ""
    if key.endswith(("q_b_proj.weight", "q_proj.weight", "kv_a_proj_with_mqa.weight")) and case["family"] == \
            "deepseek_v3":
        r, n = c.qk_rope_head_dim, c.qk_nope_head_dim
        heads, width = (1, c.kv_lora_rank + r) if "kv_a" in key else (c.num_attention_heads, n + r)
        start = width - r
        if torch.equal(got, ref.permute_head_rows(want, heads, width, ref.rope_halves_order(r), start, r)):
            return ("its rope rows are in halves order: to_hf_state_dict must interleave them back per head (the "
                    "inverse of the de-interleave of load_hf_state_dict), so that transformers' rope_interleave=True "
                    "reads them")
    if key.endswith("gate_up_proj"):
        half = want.shape[1] // 2
        if torch.equal(got, torch.cat([want[:, half:], want[:, :half]], 1)):
            return "its up rows come first: transformers' gate_up_proj is [gate; up] along dim 1"
    if key.endswith(("gate_up_proj", "down_proj")) and want.dim() == 3 and torch.equal(got, want.flip(0)):
        return "its experts are in reverse order"
    if got.dim() == 2 and got.shape == want.T.shape and torch.equal(got, want.T):
        return "it is transposed: transformers' linear weights are (out, in)"
    return ""


@define("11.to_hf_state_dict", lambda seed: model_inputs(seed, mode="to_hf"), open_collect)
def to_hf_state_dict(inputs: dict, out: dict) -> str:
    for case, got in zip(inputs["cases"], out["cases"], strict=True):
        call = f"to_hf_state_dict(your {what(case)} loaded with transformers' weights, {case['family']!r})"
        model_failure(call, case, got)
        want = case["state"]
        if got["model_changed"]:
            raise AssertionError(f"{call} changed the model's weights ({', '.join(got['model_changed'])}): permute "
                                 "copies, not in place (state_dict() shares the model's tensors)")
        got = got | {"back": state_of(got["back"]), "own_back": state_of(got["own_back"])}
        for label, back in ((call, got["back"]), (f"to_hf_state_dict(your freshly built {what(case)})",
                                                   got["own_back"])):
            if raised(back):
                raise AssertionError(f"{label} raised {raised(back)}" if not raised(back).startswith("returned")
                                     else f"{label}: {raised(back)}")
            if back is None:
                raise AssertionError(f"build_model({what(case)} config) failed the second time")
            missing, extra = sorted(set(want) - set(back)), sorted(set(back) - set(want))
            if missing or extra:
                tied = " (transformers' state_dict() lists the tied lm_head.weight too)" if "lm_head.weight" in \
                    missing else ""
                raise AssertionError(f"{label}: keys differ from transformers' state_dict(): missing {missing[:5]}"
                                     f"{tied}, unexpected {extra[:5]}")
            for key, w in want.items():
                g = back[key]
                if not isinstance(g, torch.Tensor) or g.shape != w.shape:
                    shape = tuple(g.shape) if isinstance(g, torch.Tensor) else g
                    raise AssertionError(f"{label}[{key!r}]: shape {shape}, expected {tuple(w.shape)}")
                if g.dtype != w.dtype:
                    raise AssertionError(f"{label}[{key!r}]: dtype {g.dtype}, expected {w.dtype}")
        for key, w in want.items():
            g = got["back"][key]
            if not torch.equal(g, w):
                slip = layout_slip(key, g, w, case)
                raise AssertionError(f"{call}[{key!r}] differs from the tensor load_hf_state_dict was given "
                                     f"(max |difference| {float((g.double() - w.double()).abs().max()):.3g})"
                                     + (f": {slip}" if slip else ": the conversion must be exact both ways"))
        model = ref.open_model(case["config"])
        try:
            model.load_state_dict(got["own_back"], strict=True)
        except RuntimeError as error:
            raise AssertionError(f"transformers' model could not load to_hf_state_dict(your freshly built "
                                 f"{what(case)}): {str(error)[:300]}") from None
        with torch.no_grad():
            theirs = model(case["idx"], use_cache=False).logits
        forward_differs = isinstance(got["logits"], torch.Tensor) and not close_enough(
            got["logits"], reference(case)["logits"])
        compare(f"transformers' {what(case)} with to_hf_state_dict(your freshly built model) vs your model's own "
                "logits", got["own_logits"], theirs, ATOL,
                "the conversion round trip is exact, so the difference is in your model's forward, not the "
                "conversion: with transformers' weights it gives other logits too (see 11.load_hf_state_dict)"
                if forward_differs else "to_hf_state_dict must undo every rearrangement of load_hf_state_dict (RoPE "
                "rows, stacked experts, names)")
    return ("gives back transformers' state dict exactly (keys, shapes, values), and a freshly built model converted "
            "and loaded into transformers' classes gives your model's own logits, for all five families")


# ---------------------------------------------------------------- 4. the cache's bytes
def kv_config(family: str, g: torch.Generator, **overrides) -> dict:
    """A random small config of ``family`` (config.json form), for measuring transformers' cache, with
    ``overrides`` (a None value leaves the field out)."""
    pick = lambda options: options[int(torch.randint(len(options), (1,), generator=g))]
    H = pick([2, 4])
    if family == "deepseek_v3":  # sizes for which the MLA suspects give distinct byte counts
        c = {"model_type": family, "vocab_size": 64, "hidden_size": 32, "intermediate_size": 32,
             "moe_intermediate_size": 8, "num_hidden_layers": pick([2, 3]), "num_attention_heads": H,
             "num_key_value_heads": H, "n_routed_experts": 4, "n_group": 1, "topk_group": 1,
             "num_experts_per_tok": 2, "first_k_dense_replace": 1, "q_lora_rank": pick([None, 16]),
             "kv_lora_rank": pick([12, 20]), "qk_nope_head_dim": 8, "qk_rope_head_dim": pick([4, 8]),
             "v_head_dim": pick([6, 10])}
    elif family == "mamba":
        c = {"model_type": family, "vocab_size": 64, "hidden_size": pick([16, 32]), "state_size": pick([4, 8]),
             "num_hidden_layers": pick([2, 3]), "expand": pick([1, 2]), "conv_kernel": pick([3, 4])}
    elif family == "jamba":
        period = pick([2, 3])
        c = {"model_type": family, "vocab_size": 64, "hidden_size": 32, "intermediate_size": 32,
             "num_hidden_layers": pick([3, 4, 5]), "num_attention_heads": 4, "num_key_value_heads": pick([1, 2]),
             "num_experts": 2, "num_experts_per_tok": 1, "attn_layer_period": period,
             "attn_layer_offset": pick(list(range(period))), "expert_layer_period": 2, "expert_layer_offset": 1,
             "mamba_d_state": pick([4, 8]), "mamba_d_conv": pick([3, 4]), "mamba_expand": 2}
    elif family == "gpt2":
        c = {"model_type": family, "vocab_size": 64, "n_embd": 32, "n_layer": pick([2, 3]), "n_head": 4}
    else:
        c = {"model_type": family, "vocab_size": 64, "hidden_size": 32, "intermediate_size": 32,
             "num_hidden_layers": pick([2, 3]), "num_attention_heads": 4, "num_key_value_heads": pick([1, 2])}
        if family in ("qwen3", "llama"):
            c["head_dim"] = pick([12, 16])
        if family == "mixtral":
            c |= {"num_local_experts": 2, "num_experts_per_tok": 1}
    return {k: v for k, v in (c | overrides).items() if k not in overrides or v is not None}


# Each family once, and Mamba and Jamba again with a conv window and a width other than the usual 4 and 2
KV_FAMILIES = ("llama", "mixtral", "mistral", "qwen3", "gpt2", "deepseek_v3", "mamba", "jamba",
               ("mamba", {"conv_kernel": 3, "expand": 3}), ("jamba", {"mamba_d_conv": 3, "mamba_expand": 1}))


def kv_inputs(seed: int, families=KV_FAMILIES, published=tuple(ref.OPEN_PUBLISHED),
              table=ref.OPEN_PUBLISHED_MINIMAL) -> dict:
    """A random small config per family, at 2 bytes (bfloat16) and, for some, 4 (float32); and published configs
    (by default as short as the notebook's: the fields at transformers' defaults left out)."""
    g = seeded_generator(seed)
    cases = []
    for i, spec in enumerate(families):
        family, overrides = (spec, {}) if isinstance(spec, str) else spec
        cases.append({"what": f"a small {family}", "config": kv_config(family, g, **overrides),
                      "dtype_bytes": 4 if i % 3 == 1 else 2})
    cases += [{"what": name, "config": json.loads(json.dumps(table[name])), "dtype_bytes": 2} for name in published]
    return {"cases": cases}


def kv_collect(inputs: dict, kv_bytes_per_token, state_bytes) -> dict:
    import json

    out = []
    for case in inputs["cases"]:
        config = json.loads(json.dumps(case["config"]))
        kv = attempt(kv_bytes_per_token, config, dtype_bytes=case["dtype_bytes"])
        state = attempt(state_bytes, config, dtype_bytes=case["dtype_bytes"])
        out.append({"kv": kv, "state": state, "changed": config != case["config"]})
    return {"cases": out}


def measured(case: dict) -> dict:
    """transformers' own cache for a small config, or the closed form for a published one."""
    c, b = case["config"], case["dtype_bytes"]
    if case["what"] in ref.OPEN_PUBLISHED:
        return {"per_token": ref.open_kv_bytes_closed_form(c, b), "fixed": ref.open_state_bytes_closed_form(c, b)}
    found = ref.open_cache_bytes(c, {2: torch.bfloat16, 4: torch.float32}[b])
    columns = found["conv_columns"]  # transformers keeps d_conv columns; the oldest is never read: d_conv - 1 count
    conv = found["conv"] // columns * (columns - 1) if columns else 0
    return {"per_token": found["per_token"], "fixed": (conv + found["recurrent"]) * b}


def whole_int(call: str, value) -> int:
    if raised(value):
        raise AssertionError(f"{call} raised {raised(value)}")
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
        value = value.item()
    if isinstance(value, float) and value.is_integer():
        raise AssertionError(f"{call}: returned the float {value!r}; it must return an int")
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise AssertionError(f"{call}: returned {type(value).__name__} {str(value)[:60]}, expected an int")
    return int(value)


def fitting(got: int, suspects: dict) -> str:
    """Every suspect (diagnosis -> number, or a function computing it) that ``got`` equals: one, or "either ... or
    ..." when several fit."""
    found = []
    for name, value in suspects.items():
        value = value() if callable(value) else value
        if value is not None and value == got and name not in found:
            found.append(name)
    if len(found) > 1:
        return "two slips fit, either " + "; or ".join(found[:3])
    return found[0] if found else ""


# Values a config's left-out field is plausibly mistaken for (the other families' defaults, a smaller model's)
WRONG_DEFAULTS = {
    "deepseek_v3": {"q_lora_rank": [None, 512], "first_k_dense_replace": [0, 1, 2, 4], "n_shared_experts": [0, 2]},
    "jamba": {"num_experts": [1, 8], "num_experts_per_tok": [1], "attn_layer_period": [2, 4, 6],
              "attn_layer_offset": [0, 1, 2, 3], "expert_layer_period": [1], "expert_layer_offset": [0],
              "mamba_d_state": [8], "mamba_d_conv": [3], "mamba_expand": [1]},
    "mamba": {"state_size": [4, 8], "conv_kernel": [3], "expand": [1, 4], "use_conv_bias": [False],
              "use_bias": [True]},
    "llama": {"attention_bias": [True], "mlp_bias": [True]},
}


def default_suspects(c: dict, value_of) -> dict:
    """For each field ``c`` leaves out, each plausible wrong default -> value_of(c with it) (None where
    transformers refuses the config): the diagnosis names the field and transformers' default."""
    family, s = c["model_type"], {}
    for field, wrongs in WRONG_DEFAULTS.get(family, {}).items():
        if field in c:
            continue
        default = getattr(ref.open_config(c), field)
        for wrong in wrongs:
            if wrong != default:
                s[f"{NAMES[family]}'s {field} defaults to {default!r} in transformers: a config that leaves it out "
                  f"means {default!r} (this matches {wrong!r})"] = lambda f=field, w=wrong: quiet(value_of, c | {f: w})
    return s


def quiet(fn, config: dict):
    try:
        return fn(config)
    except Exception:  # a combination transformers refuses
        return None


def kv_suspects(c: dict, b: int, want: int) -> dict:
    family = c["model_type"]
    if family in ("mamba", "gpt2"):
        return {}
    hc = ref.open_config(c)
    L = hc.num_hidden_layers
    H = hc.num_attention_heads
    hd = getattr(hc, "head_dim", None) or hc.hidden_size // H
    s = {}
    if family == "jamba":
        attn = sum(1 for i in range(L) if i % hc.attn_layer_period == hc.attn_layer_offset)
        s[f"this counts every layer: only Jamba's attention layers (i % attn_layer_period == attn_layer_offset: "
          f"{attn} of {L}) cache keys and values"] = 2 * L * hc.num_key_value_heads * hd * b
    if b != 2:
        s[f"this ignores dtype_bytes ({b})"] = want // b * 2
    s |= default_suspects(c, lambda config: ref.open_kv_bytes_closed_form(config, b))
    if family == "deepseek_v3":
        s["this counts the expanded keys and values of every head (K of qk_nope + qk_rope, V of v_head_dim per "
          "head): transformers 5 caches MLA's compressed latent and the shared rotated key, (kv_lora_rank + "
          "qk_rope_head_dim) per layer"] = L * H * (hc.qk_nope_head_dim + hc.qk_rope_head_dim + hc.v_head_dim) * b
        s["this counts the latent only: the shared rotated key (qk_rope_head_dim) is cached too"] = L * hc.kv_lora_rank * b
        s["this counts K and V of the latent: MLA caches one latent (kv_lora_rank) and one rotated key "
          "(qk_rope_head_dim) per layer, not two of each"] = 2 * L * (hc.kv_lora_rank + hc.qk_rope_head_dim) * b
        return s
    kv = hc.num_key_value_heads
    attn = L if family != "jamba" else sum(1 for i in range(L) if i % hc.attn_layer_period == hc.attn_layer_offset)
    if kv != H:
        s[f"kv bytes with the query heads: the cache holds num_key_value_heads = {kv} heads, not "
          f"num_attention_heads = {H}"] = 2 * attn * H * hd * b
    if hd != hc.hidden_size // H:
        s[f"head_dim is ignored: it is {hd} here, not hidden_size / heads"] = 2 * attn * kv * (hc.hidden_size // H) * b
    s["this counts K or V, not both: the cache holds keys and values"] = attn * kv * hd * b
    return s


def state_suspects(c: dict, b: int, want: int) -> dict:
    if c["model_type"] not in ("mamba", "jamba"):
        return {}
    hc = ref.open_config(c)
    if c["model_type"] == "mamba":
        d_in, N, K, L = hc.expand * hc.hidden_size, hc.state_size, hc.conv_kernel, hc.num_hidden_layers
        expand, all_layers = hc.expand, L
    else:
        d_in, N, K = hc.mamba_expand * hc.hidden_size, hc.mamba_d_state, hc.mamba_d_conv
        L = sum(1 for i in range(hc.num_hidden_layers) if i % hc.attn_layer_period != hc.attn_layer_offset)
        expand, all_layers = hc.mamba_expand, hc.num_hidden_layers
    s = {"the conv window counts d_conv columns: a step needs the last d_conv - 1 inputs (the new one is the "
         "d_conv-th)": L * d_in * (K + N) * b,
         "the conv window is missing: d_inner x (d_conv - 1) per Mamba layer": L * d_in * N * b,
         "the SSM state is missing: d_inner x d_state per Mamba layer": L * d_in * (K - 1) * b,
         "this uses hidden_size where the mixer's width is d_inner = expand x hidden_size":
             L * hc.hidden_size * (K - 1 + N) * b}
    if K != 4:
        s[f"this assumes d_conv = 4: read it from the config (conv_kernel; Jamba: mamba_d_conv), {K} here"] = (
            L * d_in * (3 + N) * b)
    if expand != 2:
        s[f"this assumes expand = 2: d_inner = expand x hidden_size, with expand from the config (Jamba: "
          f"mamba_expand), {expand} here"] = L * 2 * hc.hidden_size * (K - 1 + N) * b
    if all_layers != L:
        s["this counts every layer: only the Mamba layers carry a state"] = all_layers * d_in * (K - 1 + N) * b
    if b != 2:
        s[f"this ignores dtype_bytes ({b})"] = want // b * 2
    return s | default_suspects(c, lambda config: ref.open_state_bytes_closed_form(config, b))


@define("11.kv_bytes_per_token", kv_inputs, kv_collect)
def kv_bytes_per_token(inputs: dict, out: dict) -> str:
    for case, got in zip(inputs["cases"], out["cases"], strict=True):
        c, b = case["config"], case["dtype_bytes"]
        if got["changed"]:
            raise AssertionError(f"kv_bytes_per_token or state_bytes modified the config dict of {case['what']}: "
                                 "leave it as it is")
        want = measured(case)
        source = ("the closed form" if case["what"] in ref.OPEN_PUBLISHED else
                  "the growth of transformers' own cache (a forward with use_cache=True at two lengths), and its "
                  "state's numbers (d_conv - 1 of its d_conv conv columns) at dtype_bytes each")
        for name, key, suspects in (("kv_bytes_per_token", "per_token", kv_suspects),
                                    ("state_bytes", "fixed", state_suspects)):
            call = f"{name}({case['what']}, dtype_bytes={b})"
            value = whole_int(call, got["kv" if key == "per_token" else "state"])
            if value != want[key]:
                diagnosis = fitting(value, suspects(c, b, want[key]))
                raise AssertionError(f"{call} = {value:,}, expected {want[key]:,} ({source}). " + (diagnosis or (
                    "per attention layer 2 x num_key_value_heads x head_dim numbers (DeepSeek-V3: kv_lora_rank + "
                    "qk_rope_head_dim), times dtype_bytes" if key == "per_token" else
                    "per Mamba layer d_inner x (d_conv - 1) + d_inner x d_state numbers, times dtype_bytes")) +
                    f". Config: {c}")
    return ("the per-token cache equals what transformers allocates (K and V of the KV heads; DeepSeek-V3's latent "
            "and rotated key; Jamba's attention layers; nothing for Mamba) and the fixed state its Mamba layers' conv "
            "window (d_conv - 1) and SSM state; Llama 3 8B 131,072 bytes per token, DeepSeek-V3 70,272")


# ---------------------------------------------------------------- 5. count_params
def count_config(family: str, g: torch.Generator, **overrides) -> dict:
    """A random small config of ``family`` for counting (no key left to a default that would hide a slip), with
    ``overrides`` (a None value leaves the field out)."""
    pick = lambda options: options[int(torch.randint(len(options), (1,), generator=g))]
    c = kv_config(family, g)
    c["vocab_size"] = pick([50, 77, 101])
    if family == "mamba":
        c["time_step_rank"] = pick(["auto", 5])  # no tie_word_embeddings: Mamba's default (tied) counts
    elif family == "llama":
        c["tie_word_embeddings"] = pick([True, None])
    elif family == "deepseek_v3":
        c |= {"n_routed_experts": 8, "n_group": 2, "topk_group": 1, "n_shared_experts": pick([1, 2])}
    elif family == "jamba":
        c |= {"num_experts": 4, "num_experts_per_tok": 2}
    if c.get("tie_word_embeddings", "") is None:
        del c["tie_word_embeddings"]
    return {k: v for k, v in (c | overrides).items() if k not in overrides or v is not None}


# (family, active, overrides) of small configs, then published models by name. The overrides: a width that is not a
# multiple of 16 ("auto" rank = ceil(hidden / 16)), Mixtral's head_dim apart from hidden / heads, Jamba with one
# expert (a plain MLP, no router) and with MoE layers at offset 0 of an odd number of layers.
COUNT_CASES = (("llama", False, {}), ("mixtral", False, {}), ("mixtral", True, {}), ("deepseek_v3", False, {}),
               ("deepseek_v3", True, {}), ("mamba", False, {}), ("jamba", False, {}), ("jamba", True, {}),
               ("mamba", False, {"hidden_size": 40, "time_step_rank": "auto"}), ("mixtral", False, {"head_dim": 12}),
               ("jamba", False, {"num_experts": 1, "num_experts_per_tok": 1}),
               ("jamba", True, {"num_hidden_layers": 5, "expert_layer_period": 2, "expert_layer_offset": 0}),
               "Llama 3 8B", "Mixtral 8x7B, active", "DeepSeek-V3", "DeepSeek-V3, active", "Mamba-2.8B",
               "Jamba v0.1")


def count_inputs(seed: int, cases=COUNT_CASES, table=ref.OPEN_PUBLISHED_MINIMAL) -> dict:
    """The cases of COUNT_CASES; published models as short as the notebook's PUBLISHED (the fields at transformers'
    defaults left out), unless ``table`` says otherwise."""
    g = seeded_generator(seed)
    out = []
    for spec in cases:
        if isinstance(spec, str):
            name = spec.removesuffix(", active")
            out.append({"what": name, "config": json.loads(json.dumps(table[name])),
                        "active": spec.endswith("active")})
        else:
            family, active, overrides = spec
            out.append({"what": f"a small {family}", "config": count_config(family, g, **overrides),
                        "active": active})
    return {"cases": out}


def count_collect(inputs: dict, count_params) -> dict:
    import json

    out = []
    for case in inputs["cases"]:
        config = json.loads(json.dumps(case["config"]))
        got = attempt(count_params, config, active=True) if case["active"] else attempt(count_params, config)
        out.append({"count": got, "changed": config != case["config"]})
    return {"cases": out}


def count_suspects(c: dict, active: bool, want: int) -> dict:
    hc = ref.open_config(c)
    family = c["model_type"]
    V, d = hc.vocab_size, hc.hidden_size
    s = {}
    if family == "mamba" and "tie_word_embeddings" not in c:
        s["Mamba ties its output head to the embedding table when the config does not say (tie_word_embeddings "
          "defaults to True for Mamba, False for the others): one vocab_size x hidden_size table"] = want + V * d
    elif not hc.tie_word_embeddings and "tie_word_embeddings" not in c:
        s[f"tie_word_embeddings defaults to False for {family}: two vocab_size x hidden_size tables"] = want - V * d
    if hc.tie_word_embeddings:
        s["the tied head is counted twice: it is the embedding table"] = want + V * d
    rank = {"mamba": "time_step_rank", "jamba": "mamba_dt_rank"}.get(family)
    if rank and c.get(rank, "auto") == "auto" and d % 16:
        s[f"{rank} \"auto\" is ceil(hidden_size / 16) = {-(-d // 16)} here, not hidden_size // 16 = {d // 16}"] = (
            lambda: quiet(lambda config: ref.open_meta_numel(config, active), c | {rank: d // 16}))
    if family in ("llama", "mixtral") and c.get("head_dim") not in (None, d // hc.num_attention_heads):
        s[f"head_dim is ignored: it is {c['head_dim']} here, not hidden_size / num_attention_heads = "
          f"{d // hc.num_attention_heads}"] = lambda: ref.open_meta_numel(
            {k: v for k, v in c.items() if k != "head_dim"}, active)
    model = ref.open_model(c, meta=True)
    experts = ref.open_experts(model)
    if family == "deepseek_v3":
        moe_layers, fk = len(experts), hc.first_k_dense_replace
        E, k = hc.n_routed_experts, hc.num_experts_per_tok
        per_expert = 3 * d * hc.moe_intermediate_size
        shared = per_expert * hc.n_shared_experts
        dense, moe = 3 * d * hc.intermediate_size, (k if active else E) * per_expert + shared + d * E
        s[f"first_k_dense_replace off by one: layers i < first_k_dense_replace = {fk} have a dense FFN, the others "
          "MoE (this counts one dense layer too many)"] = want + dense - moe
        s[f"first_k_dense_replace off by one: layers i < first_k_dense_replace = {fk} have a dense FFN, the others "
          "MoE (this counts one dense layer too few)"] = want - dense + moe
        s["the shared experts are missing: n_shared_experts x a SwiGLU of moe_intermediate_size per MoE layer"] = (
            want - moe_layers * shared)
        s["the router's e_score_correction_bias is counted: it is a buffer, not a parameter"] = want + moe_layers * E
        if active:
            s[f"active counts all {E} routed experts: a token uses num_experts_per_tok = {k} (and the shared "
              "experts)"] = want + moe_layers * (E - k) * per_expert
    elif experts:
        _, E, k = experts[0]
        per_expert = sum(p.numel() for p in experts[0][0].parameters()) // E
        if active:
            s[f"active counts all {E} experts: a token uses num_experts_per_tok = {k}"] = want + len(experts) * (
                E - k) * per_expert
            L, period = hc.num_hidden_layers, getattr(hc, "expert_layer_period", 1)
            for x in {L // period, -(-L // period)} - {len(experts)}:
                s[f"active subtracts the unused experts of {x} layers, but {len(experts)} of the {L} layers are MoE "
                  "(i % expert_layer_period == expert_layer_offset): count the experts modules the model has"] = (
                    want - (x - len(experts)) * (E - k) * per_expert)
        else:
            s[f"this counts num_experts_per_tok = {k} experts: without active every expert counts"] = want - len(
                experts) * (E - k) * per_expert
    if family == "jamba":
        L = hc.num_hidden_layers
        attn = sum(1 for i in range(L) if i % hc.attn_layer_period == hc.attn_layer_offset)
        s["Jamba's mixers lack the dt/b/c norms (time_step_rank + 2 d_state gains per Mamba layer)"] = want - (
            L - attn) * (hc.mamba_dt_rank + 2 * hc.mamba_d_state)
        if hc.num_experts == 1:
            moe = sum(1 for i in range(L) if i % hc.expert_layer_period == hc.expert_layer_offset)
            s["with num_experts = 1 transformers' Jamba uses a plain MLP (JambaMLP) where MoE layers would be: no "
              "router, no expert stack"] = want + moe * d
    s |= default_suspects(c, lambda config: ref.open_meta_numel(config, active))
    return {k: v for k, v in s.items() if v is not None}


@define("11.count_params", count_inputs, count_collect)
def count_params(inputs: dict, out: dict) -> str:
    for case, got in zip(inputs["cases"], out["cases"], strict=True):
        c, active = case["config"], case["active"]
        call = f"count_params({case['what']}{', active=True' if active else ''})"
        if got["changed"]:
            raise AssertionError(f"{call} modified the config dict it was given: leave it as it is")
        count = whole_int(call, got["count"])
        want = ref.OPEN_PUBLISHED_COUNTS.get((case["what"], active)) or ref.open_meta_numel(c, active)
        if count != want:
            diagnosis = fitting(count, count_suspects(c, active, want))
            raise AssertionError(
                f"{call} = {count:,}, expected {want:,} (the numel of transformers' model on the meta device"
                f"{', less its unused routed experts' if active else ''}): off by {count - want:+,}. "
                + (diagnosis or "build the model on the meta device (with torch.device('meta'): build_model(config)) "
                   "and sum p.numel() over its parameters") + f". Config: {c}")
    return ("equals the numel of transformers' models on the meta device: small configs of the five families and "
            "Llama 3 8B (8,030,261,248), Mixtral 8x7B (46,702,792,704; active 12,879,925,248), DeepSeek-V3 "
            "(671,026,404,352; active 37,552,282,624), Mamba-2.8B and Jamba v0.1")


# ---------------------------------------------------------------- 6. export_pretrained
def safetensors_keys(data: bytes) -> list[str]:
    """The tensor names in a safetensors file's header."""
    size = int.from_bytes(data[:8], "little")
    return sorted(k for k in json.loads(data[8:8 + size]) if k != "__metadata__")


@define("11.export_pretrained", lambda seed: model_inputs(seed, mode="export"), open_collect)
def export_pretrained(inputs: dict, out: dict) -> str:
    for case, got in zip(inputs["cases"], out["cases"], strict=True):
        call = f"export_pretrained(your {what(case)}, {case['family']!r}, path as a {got['path']})"
        model_failure(call, case, got)
        if got["export"]:
            raise AssertionError(f"{call} raised {got['export']}" + (
                ". path was a pathlib.Path here (the notebook passes one; a str elsewhere): accept both, e.g. "
                "Path(path) / 'config.json'" if got["path"] == "Path" else
                ". path was a str here (a pathlib.Path elsewhere): accept both, e.g. Path(path) / 'config.json'"))
        for name in ("config.json", "model.safetensors"):
            if name not in got["files"]:
                raise AssertionError(f"{call} wrote {got['files']} in path: it must write {name} (path is a folder, "
                                     "which may not exist yet)")
        try:
            config = json.loads(got["config"])
        except ValueError as error:
            raise AssertionError(f"{call}: config.json is not JSON ({error})") from None
        if not isinstance(config, dict) or config.get("model_type") != case["family"]:
            raise AssertionError(f"{call}: config.json must have \"model_type\": {case['family']!r}, which "
                                 "AutoModelForCausalLM dispatches on")
        for token in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if config.get(token, "absent") is not None:
                raise AssertionError(f"{call}: config.json must set {token} to null: these models have no special "
                                     f"tokens (absent, transformers' default for {case['family']} would stop "
                                     "generation early)")
        data = bytes(got["weights"].tolist())
        try:
            keys = safetensors_keys(data)
        except (ValueError, UnicodeDecodeError):
            raise AssertionError(f"{call}: model.safetensors is not a safetensors file") from None
        tied = ref.open_config(case["config"]).tie_word_embeddings
        if tied and "lm_head.weight" in keys:
            raise AssertionError(f"{call}: model.safetensors holds lm_head.weight, but the config ties it to the "
                                 "embedding table: drop it (as save_pretrained does); transformers ties it on load")
        try:
            model, info = ref.open_exported(config, data)
        except Exception as error:  # shapes that do not fit the config, fields of the wrong kind
            absent = sorted(k for k in case["config"] if k not in config and k not in ("model_type",))
            raise AssertionError(f"{call}: AutoModelForCausalLM.from_pretrained(path) raised {type(error).__name__}: "
                                 f"{str(error)[:300]}" + (f". config.json lacks {absent[:8]}: transformers fills "
                                                          "them with its full-size defaults" if absent else ""))
        problems = {k: sorted(map(str, v))[:5] for k, v in info.items() if v}
        if problems:
            raise AssertionError(f"{call}: from_pretrained(path, output_loading_info=True) reports {problems}: the "
                                 "file must hold exactly transformers' keys and shapes (to_hf_state_dict), less a "
                                 "tied lm_head.weight")
        reference_config = ref.open_config(case["config"]).to_dict()
        loaded = model.config.to_dict()
        differ = sorted(k for k, v in reference_config.items() if k not in (
            "architectures", "dtype", "transformers_version", "_name_or_path", "torch_dtype") and loaded.get(k) != v)
        r = reference(case)
        with torch.no_grad():
            logits = model(case["idx"], use_cache=False).logits
        compare(f"{call}, loaded by from_pretrained: logits", logits, r["logits"], ATOL,
                f"config.json's fields differ from the model's: {differ[:8]}" if differ else
                "the weights in the file differ from the model's")
        tokens = ref.open_greedy(model, case["prompt"], case["n_new"])
        if not torch.equal(tokens, r["tokens"]):
            raise AssertionError(f"{call}, loaded by from_pretrained: its greedy tokens differ from the original's"
                                 + (f"; config.json's fields differ: {differ[:8]}" if differ else ""))
    return ("the folder loads with AutoModelForCausalLM.from_pretrained offline, no missing or unexpected keys, the "
            "same logits (1e-4) and the same greedy tokens, for all five families")
