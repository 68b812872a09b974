"""Plausible wrong implementations of Lab 4, each paired with the message its check must give.

Each factory takes the solution's namespace and returns the arguments of one check call.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


# ---------------------------------------------------------------- FeedForward
def ffn_gelu_tanh(ns):
    class FFN(ns["FeedForward"]):
        def forward(self, x):
            if self.activation == "gelu":  # BUG: the tanh approximation for the exact GELU
                return self.fc2(ns["activation"](self.fc1(x), "gelu_tanh"))
            return super().forward(x)
    return FFN


def ffn_silu_is_sigmoid(ns):
    class FFN(ns["FeedForward"]):
        def forward(self, x):
            if self.activation == "silu":  # BUG: a sigmoid, not x * sigmoid(x)
                return self.fc2(torch.sigmoid(self.fc1(x)))
            return super().forward(x)
    return FFN


def ffn_default_relu(ns):
    class FFN(ns["FeedForward"]):
        def __init__(self, d_model, d_ff, activation="relu"):  # BUG: the default activation is ReLU
            super().__init__(d_model, d_ff, activation)
    return FFN



def ffn_calls_f_gelu(ns):
    class FFN(ns["FeedForward"]):
        def forward(self, x):
            if self.activation == "gelu":  # BUG: PyTorch's GELU instead of the formula
                return self.fc2(F.gelu(self.fc1(x)))
            return super().forward(x)
    return FFN


def ffn_hides_f_relu(ns):
    class FFN(ns["FeedForward"]):
        def forward(self, x):
            try:  # BUG: calls F.relu and hides the guard's error
                F.relu(x)
            except Exception:
                pass
            return super().forward(x)
    return FFN

# ---------------------------------------------------------------- SwiGLU
def swiglu_gate_up_swapped(ns):
    class SwiGLU(ns["SwiGLU"]):
        def forward(self, x):
            return self.down_proj(ns["activation"](self.up_proj(x), "silu") * self.gate_proj(x))  # BUG: SiLU on the wrong branch
    return SwiGLU


def swiglu_sigmoid_gate(ns):
    class SwiGLU(ns["SwiGLU"]):
        def forward(self, x):
            return self.down_proj(torch.sigmoid(self.gate_proj(x)) * self.up_proj(x))  # BUG: GLU, not SwiGLU
    return SwiGLU


def swiglu_with_bias(ns):
    class SwiGLU(nn.Module):
        def __init__(self, d_model, d_ff):
            super().__init__()
            self.gate_proj = nn.Linear(d_model, d_ff)  # BUG: biases (Llama has none)
            self.up_proj = nn.Linear(d_model, d_ff)
            self.down_proj = nn.Linear(d_ff, d_model)

        def forward(self, x):
            return self.down_proj(ns["activation"](self.gate_proj(x), "silu") * self.up_proj(x))
    return SwiGLU


def swiglu_gelu_gate(ns):
    class SwiGLU(ns["SwiGLU"]):
        def forward(self, x):
            return self.down_proj(ns["activation"](self.gate_proj(x), "gelu") * self.up_proj(x))  # BUG: GeGLU
    return SwiGLU


def swiglu_calls_f_silu(ns):
    class SwiGLU(ns["SwiGLU"]):
        def forward(self, x):
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # BUG: PyTorch's SiLU
    return SwiGLU


def hidden_dim_round_down(ns):
    def swiglu_hidden_dim(d_model, multiple_of=256, ffn_dim_multiplier=None):
        h = int(8 * d_model / 3)
        if ffn_dim_multiplier is not None:
            h = int(ffn_dim_multiplier * h)
        return multiple_of * (h // multiple_of)  # BUG: rounds down
    return swiglu_hidden_dim


def hidden_dim_no_two_thirds(ns):
    def swiglu_hidden_dim(d_model, multiple_of=256, ffn_dim_multiplier=None):
        h = 4 * d_model  # BUG: forgets the 2/3
        if ffn_dim_multiplier is not None:
            h = int(ffn_dim_multiplier * h)
        return multiple_of * ((h + multiple_of - 1) // multiple_of)
    return swiglu_hidden_dim


def hidden_dim_ignores_multiplier(ns):
    def swiglu_hidden_dim(d_model, multiple_of=256, ffn_dim_multiplier=None):
        h = int(8 * d_model / 3)  # BUG: ffn_dim_multiplier ignored
        return multiple_of * ((h + multiple_of - 1) // multiple_of)
    return swiglu_hidden_dim


def hidden_dim_float(ns):
    def swiglu_hidden_dim(d_model, multiple_of=256, ffn_dim_multiplier=None):
        h = 8 * d_model / 3 * (ffn_dim_multiplier or 1)
        return multiple_of * -(-h // multiple_of)  # BUG: a float
    return swiglu_hidden_dim


# ---------------------------------------------------------------- LayerNorm
def layernorm_unbiased_var(ns):
    class LayerNorm(ns["LayerNorm"]):
        def forward(self, x):
            xf = x.float()
            mu, var = xf.mean(-1, keepdim=True), xf.var(-1, keepdim=True)  # BUG: unbiased variance
            return ((xf - mu) * torch.rsqrt(var + self.eps) * self.weight + self.bias).to(x.dtype)
    return LayerNorm


def layernorm_eps_outside(ns):
    class LayerNorm(ns["LayerNorm"]):
        def forward(self, x):
            xf = x.float()
            mu = xf.mean(-1, keepdim=True)
            std = (xf - mu).pow(2).mean(-1, keepdim=True).sqrt()
            return ((xf - mu) / (std + self.eps) * self.weight + self.bias).to(x.dtype)  # BUG: eps outside the root
    return LayerNorm


def layernorm_no_upcast(ns):
    class LayerNorm(ns["LayerNorm"]):
        def forward(self, x):
            mu = x.mean(-1, keepdim=True)  # BUG: computes in the input's dtype (bf16)
            var = (x - mu).pow(2).mean(-1, keepdim=True)
            return (x - mu) * torch.rsqrt(var + self.eps) * self.weight.to(x.dtype) + self.bias.to(x.dtype)
    return LayerNorm


def layernorm_calls_f_layer_norm(ns):
    class LayerNorm(ns["LayerNorm"]):
        def forward(self, x):  # BUG: PyTorch's layer norm instead of tensor operations
            return F.layer_norm(x.float(), x.shape[-1:], self.weight, self.bias, self.eps).to(x.dtype)
    return LayerNorm


# ---------------------------------------------------------------- RMSNorm
def rmsnorm_subtracts_mean(ns):
    class RMSNorm(ns["RMSNorm"]):
        def forward(self, x):
            xf = x.float()
            xf = xf - xf.mean(-1, keepdim=True)  # BUG: centres, like LayerNorm
            return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)
    return RMSNorm


def rmsnorm_eps_outside(ns):
    class RMSNorm(ns["RMSNorm"]):
        def forward(self, x):
            xf = x.float()
            rms = xf.pow(2).mean(-1, keepdim=True).sqrt()
            return self.weight * (xf / (rms + self.eps)).to(x.dtype)  # BUG: eps outside the root
    return RMSNorm


def rmsnorm_weight_before_cast(ns):
    class RMSNorm(ns["RMSNorm"]):
        def forward(self, x):
            xf = x.float()  # BUG: multiplies by the weight in float32, then casts (not Llama's order)
            return (self.weight.float() * xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)
    return RMSNorm


def rmsnorm_no_upcast(ns):
    class RMSNorm(ns["RMSNorm"]):
        def forward(self, x):
            return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))  # BUG: no float32
    return RMSNorm


def rmsnorm_default_eps(ns):
    class RMSNorm(ns["RMSNorm"]):
        def __init__(self, d, eps=1e-5):  # BUG: LayerNorm's default eps
            super().__init__(d, eps)
    return RMSNorm


def rmsnorm_sum_not_mean(ns):
    class RMSNorm(ns["RMSNorm"]):
        def forward(self, x):
            xf = x.float()  # BUG: the sum of squares, not their mean
            return self.weight * (xf * torch.rsqrt(xf.pow(2).sum(-1, keepdim=True) + self.eps)).to(x.dtype)
    return RMSNorm


def rmsnorm_wraps_nn_rmsnorm(ns):
    class RMSNorm(ns["RMSNorm"]):
        def forward(self, x):  # BUG: PyTorch's module with the weight copied in
            norm = nn.RMSNorm(x.shape[-1], eps=self.eps).to(self.weight.dtype)
            with torch.no_grad():
                norm.weight.copy_(self.weight)
            return norm(x)
    return RMSNorm


def rmsnorm_hides_f_rms_norm(ns):
    class RMSNorm(ns["RMSNorm"]):
        def forward(self, x):
            try:  # BUG: calls F.rms_norm and hides the guard's error
                return F.rms_norm(x, x.shape[-1:], self.weight, self.eps)
            except Exception:
                return super().forward(x)
    return RMSNorm


def invariance_rms_centres(ns):
    return ns["LayerNorm"], rmsnorm_subtracts_mean(ns)


def invariance_ln_no_centring(ns):
    class LayerNorm(ns["LayerNorm"]):
        def forward(self, x):
            xf = x.float()  # BUG: divides by the standard deviation but does not subtract the mean
            var = (xf - xf.mean(-1, keepdim=True)).pow(2).mean(-1, keepdim=True)
            return (xf * torch.rsqrt(var + self.eps) * self.weight + self.bias).to(x.dtype)
    return LayerNorm, ns["RMSNorm"]


def invariance_ln_calls_builtin(ns):
    return layernorm_calls_f_layer_norm(ns), ns["RMSNorm"]


# ---------------------------------------------------------------- Block
def block_post_norm_before_add(ns):
    class Block(ns["Block"]):
        def forward(self, x):
            if self.norm == "pre":
                return super().forward(x)
            mask = ns["causal_mask"](x.shape[1]).to(x.device)
            x = x + self.norm1(self.attn(x, mask=mask))  # BUG: normalises the sublayer output, then adds
            return x + self.norm2(self.ffn(x))
    return Block


def block_pre_is_post(ns):
    class Block(ns["Block"]):
        def forward(self, x):
            mask = ns["causal_mask"](x.shape[1]).to(x.device)
            x = self.norm1(x + self.attn(x, mask=mask))  # BUG: post-norm whatever `norm` says
            return self.norm2(x + self.ffn(x))
    return Block


def block_not_causal(ns):
    class Block(ns["Block"]):
        def forward(self, x):
            if self.norm == "pre":
                x = x + self.attn(self.norm1(x))  # BUG: no causal mask
                return x + self.ffn(self.norm2(x))
            x = self.norm1(x + self.attn(x))
            return self.norm2(x + self.ffn(x))
    return Block


def block_swiglu_width_4d(ns):
    class Block(ns["Block"]):
        def __init__(self, d_model, n_heads, norm="pre", norm_type="layer", ffn="gelu", d_ff=None):
            # BUG: SwiGLU's default width is 4 d_model instead of Llama's rule
            super().__init__(d_model, n_heads, norm, norm_type, ffn, d_ff or 4 * d_model)
    return Block


def block_missing_final_sublayer_norm(ns):
    class Block(ns["Block"]):
        def forward(self, x):
            if self.norm == "pre":
                return super().forward(x)
            mask = ns["causal_mask"](x.shape[1]).to(x.device)
            x = self.norm1(x + self.attn(x, mask=mask))
            return x + self.ffn(x)  # BUG: post-norm without the second norm
    return Block


def block_with_nn_layernorm(ns):
    class Block(ns["Block"]):
        def __init__(self, d_model, n_heads, norm="pre", norm_type="layer", ffn="gelu", d_ff=None):
            super().__init__(d_model, n_heads, norm, norm_type, ffn, d_ff)
            if norm_type == "layer":  # BUG: PyTorch's LayerNorm instead of the lab's
                self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
    return Block


# ---------------------------------------------------------------- layer counts
def counts_ignore_gqa(ns):
    def layer_params(d_model, n_heads, n_kv_heads, d_ff):
        return {"attention": 4 * d_model * d_model, "ffn": 3 * d_model * d_ff, "norms": 2 * d_model}  # BUG: no GQA
    return layer_params, ns["layer_flops"]


def counts_ffn_two_matrices(ns):
    def layer_params(d_model, n_heads, n_kv_heads, d_ff):
        params = ns["layer_params"](d_model, n_heads, n_kv_heads, d_ff)
        return params | {"ffn": 2 * d_model * d_ff}  # BUG: forgets the gate
    return layer_params, ns["layer_flops"]


def flops_no_scores(ns):
    def layer_flops(d_model, n_heads, n_kv_heads, d_ff, seq_len):
        params = ns["layer_params"](d_model, n_heads, n_kv_heads, d_ff)
        return {"attention": 2 * params["attention"], "ffn": 2 * params["ffn"]}  # BUG: no q k^T, no weights @ v
    return ns["layer_params"], layer_flops


def flops_one_per_weight(ns):
    def layer_flops(d_model, n_heads, n_kv_heads, d_ff, seq_len):
        params = ns["layer_params"](d_model, n_heads, n_kv_heads, d_ff)
        # BUG: one FLOP per multiply-add
        return {"attention": params["attention"] + 2 * seq_len * d_model, "ffn": params["ffn"]}
    return ns["layer_params"], layer_flops


# check id -> [(factory, a regular expression the failure message must match)]
BUGS = {
    "04.feedforward": [(ffn_gelu_tanh, r"activation='gelu'.*your FeedForward computes 'gelu_tanh'"),
                       (ffn_silu_is_sigmoid, r"activation='silu'.*max \|difference\|.*computes 'sigmoid'"),
                       (ffn_default_relu, r"default activation, which must be 'gelu'.*computes 'relu'"),
                       (ffn_calls_f_gelu, r"your code calls F.gelu"),
                       (ffn_hides_f_relu, r"your code calls F.relu")],
    "04.swiglu": [(swiglu_gate_up_swapped, r"gate and up are swapped"),
                  (swiglu_sigmoid_gate, r"the gate uses a sigmoid"),
                  (swiglu_gelu_gate, r"the gate uses a GELU \(that is GeGLU\)"),
                  (swiglu_with_bias, r"parameters must be exactly: gate_proj.weight"),
                  (swiglu_calls_f_silu, r"your code calls F.silu")],
    "04.swiglu_hidden_dim": [(hidden_dim_round_down, r"LLaMA 7B.*: 10752, expected 11008. round up"),
                             (hidden_dim_no_two_thirds, r"LLaMA 7B.*: 16384, expected 11008.*two thirds"),
                             (hidden_dim_ignores_multiplier, r"Llama 2 70B.*multiply by ffn_dim_multiplier"),
                             (hidden_dim_float, r"must return a Python int")],
    "04.layernorm": [(layernorm_unbiased_var, r"LayerNorm\(48\) on \(3, 5, 48\).*biased"),
                     (layernorm_eps_outside, r"LayerNorm\(48.*eps goes under the square root"),
                     (layernorm_no_upcast, r"bfloat16.*compute in float32"),
                     (layernorm_calls_f_layer_norm, r"your code calls F.layer_norm")],
    "04.rmsnorm": [(rmsnorm_subtracts_mean, r"RMSNorm\(48\) on \(3, 5, 48\).*does not subtract the mean"),
                   (rmsnorm_eps_outside, r"eps goes under the square root"),
                   (rmsnorm_sum_not_mean, r"RMSNorm\(48\) on \(3, 5, 48\).*mean\(x\^2\) over the last axis, not the sum"),
                   (rmsnorm_weight_before_cast, r"bfloat16.*Llama's order"),
                   (rmsnorm_no_upcast, r"bfloat16.*Llama's order"),
                   (rmsnorm_default_eps, r"rms 1e-3.*default eps is 1e-6"),
                   (rmsnorm_wraps_nn_rmsnorm, r"your code calls F.rms_norm"),
                   (rmsnorm_hides_f_rms_norm, r"your code calls F.rms_norm")],
    "04.norm_invariance": [(invariance_rms_centres, r"RMSNorm.* is shift-invariant, so it subtracts the mean"),
                           (invariance_ln_no_centring, r"LayerNorm is shift-invariant.*subtract the mean"),
                           (invariance_ln_calls_builtin, r"your code calls F.layer_norm")],
    "04.block": [(block_post_norm_before_add, r"norm='post'.*normalised the sublayer's output before adding"),
                 (block_pre_is_post, r"norm='pre'.*this is post-norm"),
                 (block_not_causal, r"must be causal"),
                 (block_swiglu_width_4d, r"ffn='swiglu'\).*parameters must be exactly"),
                 (block_missing_final_sublayer_norm, r"norm='post'.*max \|difference\|"),
                 (block_with_nn_layernorm, r"your code calls F.layer_norm")],
    "04.layer_counts": [(counts_ignore_gqa, r"Llama 3 8B: 'attention'.*67108864, expected 41943040.*key-value heads"),
                        (counts_ffn_two_matrices, r"'ffn' .*three matrices"),
                        (flops_no_scores, r"layer_flops.*'attention'.*2 \* seq_len \* d_model"),
                        (flops_one_per_weight, r"layer_flops.*'attention'")],
}
