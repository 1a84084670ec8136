#pragma once
#include <torch/extension.h>

#include <optional>
#include <utility>
#include <vector>

// One decode step of fastlm's Transformer (fastlm/models/transformer.py) on CPU, in C++ from the
// embedding to the logits: per generated token the Python path makes ~40 op calls whose dispatch
// costs far more than the tiny kernels behind them, so here the ops follow each other with no
// Python in between. It computes what
//     h = model.hidden_states(tokens[:, None], kv_cache=cache); logits = model.logits(h[:, 0])
// computes for a causal model in eval mode: the same ATen matmuls and fastlm's own norm, rope and
// activation kernels, and attention of the one new query per row over its cached keys.
//
// The weights are gathered once per generation (fastlm/models/decode.py) into a DecodePlan; they
// are held by reference (sharing storage), so in-place updates are seen, replaced tensors are not.
class DecodePlan {
public:
    // Each entry of `layers` holds one block's 12 tensors, in this order (None where the model has
    // no such tensor): norm1 weight, norm1 bias, qkv weight, qkv bias, proj weight, proj bias,
    // norm2 weight, norm2 bias, fc1 weight, fc1 bias, fc2 weight, fc2 bias. fc1 is (2F, C) with
    // [gate | up] rows when `gated` (SwiGLU), else (F, C). `act`: as act_fwd_cpu (0 = SiLU,
    // 1 = GELU tanh). `pos_emb` (learned positions) and `rope_cos`/`rope_sin` (fp32
    // (positions, rotary_dim / 2), GPT-NeoX halves) are exclusive; `head` is (V, C), the token
    // embedding itself when tied.
    DecodePlan(at::Tensor tok_emb, std::optional<at::Tensor> pos_emb, std::optional<at::Tensor> rope_cos,
               std::optional<at::Tensor> rope_sin, std::vector<std::vector<std::optional<at::Tensor>>> layers,
               std::optional<at::Tensor> norm_f_weight, std::optional<at::Tensor> norm_f_bias, at::Tensor head,
               int64_t n_heads, int64_t n_kv_heads, double eps, bool is_rms, bool gated, int64_t act);

    // tokens (B,) int64: one new token per row. k_cache[l], v_cache[l]: (B, S, K, D) contiguous, the
    // KVCache's tensors; seqlens (B,) int32: each row's cached length. Writes the new keys/values
    // of every layer at slot seqlens[b], attends over slots 0 .. seqlens[b], advances seqlens by
    // one, and returns the logits (B, V) in the weights' dtype.
    at::Tensor step(const at::Tensor& tokens, const std::vector<at::Tensor>& k_cache,
                    const std::vector<at::Tensor>& v_cache, at::Tensor& seqlens) const;

private:
    struct Layer {
        std::optional<at::Tensor> norm1_w, norm1_b;
        at::Tensor qkv_w;
        std::optional<at::Tensor> qkv_b;
        at::Tensor proj_w;
        std::optional<at::Tensor> proj_b, norm2_w, norm2_b;
        at::Tensor fc1_w;
        std::optional<at::Tensor> fc1_b;
        at::Tensor fc2_w;
        std::optional<at::Tensor> fc2_b;
    };
    // (norm(x [+ residual]), x [+ residual]); residual absent in block 0.
    std::pair<at::Tensor, at::Tensor> norm(const at::Tensor& x, const std::optional<at::Tensor>& residual,
                                           const std::optional<at::Tensor>& weight,
                                           const std::optional<at::Tensor>& bias) const;

    at::Tensor tok_emb_, head_;
    std::optional<at::Tensor> pos_emb_, rope_cos_, rope_sin_, norm_f_w_, norm_f_b_;
    std::vector<Layer> layers_;
    int64_t n_heads_, n_kv_heads_, head_dim_, d_model_, act_;
    double eps_;
    bool is_rms_, gated_;
};
