#include "cpu/decode.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <utility>

#include "cpu/activation.h"
#include "cpu/norm.h"
#include "cpu/rope.h"

namespace {

void check_weight(const at::Tensor& t, const char* name, at::IntArrayRef sizes, const at::Tensor& like) {
    TORCH_CHECK_VALUE(t.defined(), "DecodePlan: ", name, " is required");
    TORCH_CHECK_VALUE(t.device().is_cpu(), "DecodePlan: ", name, " must be a CPU tensor, got ", t.device());
    TORCH_CHECK_VALUE(t.sizes() == sizes, "DecodePlan: ", name, " must have shape ", sizes, ", got ", t.sizes());
    TORCH_CHECK_TYPE(t.scalar_type() == like.scalar_type(), "DecodePlan: ", name, " must have dtype ",
                     like.scalar_type(), ", got ", t.scalar_type());
}

void check_optional(const std::optional<at::Tensor>& t, const char* name, at::IntArrayRef sizes,
                    const at::Tensor& like) {
    if (t.has_value()) check_weight(*t, name, sizes, like);
}

// One query per (row, head) attends over its row's first `len` cached keys: scores, softmax and
// the weighted sum of values in fp32, the output rounded to the cache's dtype. q: (B, H, D)
// contiguous; caches (B, S, K, D) contiguous; query head h reads key/value head h / (H / K), as
// repeat_interleave does in the reference.
template <typename scalar_t>
void attend(const scalar_t* q, const scalar_t* k_cache, const scalar_t* v_cache, const int32_t* lens,
            scalar_t* out, int64_t batch, int64_t slots, int64_t heads, int64_t kv_heads, int64_t d, float scale) {
    const int64_t group = heads / kv_heads;
    int64_t longest = 0;
    for (int64_t b = 0; b < batch; ++b) longest = std::max<int64_t>(longest, lens[b]);
    // Small problems (the usual decode step) run on the calling thread: waking the pool costs more.
    const int64_t grain = batch * heads * longest * d < (1 << 16) ? batch * heads : 1;
    at::parallel_for(0, batch * heads, grain, [&](int64_t begin, int64_t end) {
        std::vector<float> p(longest), acc(d), qf(d);
        for (int64_t i = begin; i < end; ++i) {
            const int64_t b = i / heads, h = i % heads, kh = h / group, len = lens[b];
            const scalar_t* qi = q + i * d;
            for (int64_t j = 0; j < d; ++j) qf[j] = static_cast<float>(qi[j]);
            const int64_t base = b * slots * kv_heads * d + kh * d, step = kv_heads * d;
            float m = -std::numeric_limits<float>::infinity();
            for (int64_t s = 0; s < len; ++s) {
                const scalar_t* ks = k_cache + base + s * step;
                float dot = 0.f;
                for (int64_t j = 0; j < d; ++j) dot += qf[j] * static_cast<float>(ks[j]);
                p[s] = dot * scale;
                m = std::max(m, p[s]);
            }
            float sum = 0.f;
            for (int64_t s = 0; s < len; ++s) {
                p[s] = std::exp(p[s] - m);
                sum += p[s];
            }
            std::fill(acc.begin(), acc.end(), 0.f);
            for (int64_t s = 0; s < len; ++s) {
                const scalar_t* vs = v_cache + base + s * step;
                for (int64_t j = 0; j < d; ++j) acc[j] += p[s] * static_cast<float>(vs[j]);
            }
            const float inv = 1.f / sum;
            for (int64_t j = 0; j < d; ++j) out[i * d + j] = static_cast<scalar_t>(acc[j] * inv);
        }
    });
}

}  // namespace

DecodePlan::DecodePlan(at::Tensor tok_emb, std::optional<at::Tensor> pos_emb, std::optional<at::Tensor> rope_cos,
                       std::optional<at::Tensor> rope_sin, std::vector<std::vector<std::optional<at::Tensor>>> layers,
                       std::optional<at::Tensor> norm_f_weight, std::optional<at::Tensor> norm_f_bias, at::Tensor head,
                       int64_t n_heads, int64_t n_kv_heads, double eps, bool is_rms, bool gated, int64_t act)
    : tok_emb_(std::move(tok_emb)), head_(std::move(head)), pos_emb_(std::move(pos_emb)),
      rope_cos_(std::move(rope_cos)), rope_sin_(std::move(rope_sin)), norm_f_w_(std::move(norm_f_weight)),
      norm_f_b_(std::move(norm_f_bias)), n_heads_(n_heads), n_kv_heads_(n_kv_heads), act_(act), eps_(eps),
      is_rms_(is_rms), gated_(gated) {
    TORCH_CHECK_VALUE(tok_emb_.defined() && tok_emb_.dim() == 2, "DecodePlan: tok_emb must be 2-D (vocab, d_model)");
    TORCH_CHECK_VALUE(tok_emb_.device().is_cpu(), "DecodePlan: tok_emb must be a CPU tensor, got ", tok_emb_.device());
    const auto dtype = tok_emb_.scalar_type();
    TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf || dtype == at::kDouble,
                     "DecodePlan: weights must be floating point, got ", dtype);
    TORCH_CHECK_VALUE(n_heads > 0 && n_kv_heads > 0 && n_heads % n_kv_heads == 0,
                      "DecodePlan: n_heads must be a positive multiple of n_kv_heads, got ", n_heads, " and ",
                      n_kv_heads);
    d_model_ = tok_emb_.size(1);
    TORCH_CHECK_VALUE(d_model_ % n_heads == 0, "DecodePlan: d_model ", d_model_, " must be divisible by n_heads ",
                      n_heads);
    head_dim_ = d_model_ / n_heads;
    TORCH_CHECK_VALUE(act == 0 || act == 1, "DecodePlan: act must be 0 (silu) or 1 (gelu tanh), got ", act);
    TORCH_CHECK_VALUE(!(pos_emb_.has_value() && rope_cos_.has_value()), "DecodePlan: pos_emb and rope are exclusive");
    TORCH_CHECK_VALUE(rope_cos_.has_value() == rope_sin_.has_value(), "DecodePlan: rope_cos and rope_sin go together");
    if (pos_emb_.has_value()) {
        TORCH_CHECK_VALUE(pos_emb_->dim() == 2, "DecodePlan: pos_emb must be 2-D (positions, d_model)");
        check_weight(*pos_emb_, "pos_emb", {pos_emb_->size(0), d_model_}, tok_emb_);
    }
    if (rope_cos_.has_value()) {
        // rope_cpu checks the tables' dtype, layout and rotary width on every call.
        TORCH_CHECK_VALUE(rope_cos_->dim() == 2 && rope_cos_->sizes() == rope_sin_->sizes(),
                          "DecodePlan: rope_cos and rope_sin must be (positions, rotary_dim / 2) tables of one ",
                          "shape");
    }
    const int64_t c = d_model_, hd = n_heads * head_dim_, kvd = n_kv_heads * head_dim_;
    for (size_t i = 0; i < layers.size(); ++i) {
        const auto& w = layers[i];
        TORCH_CHECK_VALUE(w.size() == 12, "DecodePlan: layer ", i, " must have 12 tensors, got ", w.size());
        const at::Tensor none;
        Layer l{w[0], w[1], w[2].value_or(none), w[3], w[4].value_or(none), w[5], w[6], w[7],
                w[8].value_or(none), w[9], w[10].value_or(none), w[11]};
        check_optional(l.norm1_w, "norm1 weight", {c}, tok_emb_);
        check_optional(l.norm1_b, "norm1 bias", {c}, tok_emb_);
        check_weight(l.qkv_w, "qkv weight", {hd + 2 * kvd, c}, tok_emb_);
        check_optional(l.qkv_b, "qkv bias", {hd + 2 * kvd}, tok_emb_);
        check_weight(l.proj_w, "proj weight", {c, hd}, tok_emb_);
        check_optional(l.proj_b, "proj bias", {c}, tok_emb_);
        check_optional(l.norm2_w, "norm2 weight", {c}, tok_emb_);
        check_optional(l.norm2_b, "norm2 bias", {c}, tok_emb_);
        TORCH_CHECK_VALUE(l.fc1_w.defined() && l.fc1_w.dim() == 2, "DecodePlan: fc1 weight must be 2-D");
        const int64_t f = l.fc1_w.size(0) / (gated ? 2 : 1);
        check_weight(l.fc1_w, "fc1 weight", {(gated ? 2 : 1) * f, c}, tok_emb_);
        check_optional(l.fc1_b, "fc1 bias", {l.fc1_w.size(0)}, tok_emb_);
        check_weight(l.fc2_w, "fc2 weight", {c, f}, tok_emb_);
        check_optional(l.fc2_b, "fc2 bias", {c}, tok_emb_);
        layers_.push_back(std::move(l));
    }
    check_optional(norm_f_w_, "norm_f weight", {c}, tok_emb_);
    check_optional(norm_f_b_, "norm_f bias", {c}, tok_emb_);
    TORCH_CHECK_VALUE(head_.defined() && head_.dim() == 2, "DecodePlan: head must be 2-D (vocab, d_model)");
    check_weight(head_, "head", {head_.size(0), c}, tok_emb_);
}

std::pair<at::Tensor, at::Tensor> DecodePlan::norm(const at::Tensor& x, const std::optional<at::Tensor>& residual,
                                                   const std::optional<at::Tensor>& weight,
                                                   const std::optional<at::Tensor>& bias) const {
    const int64_t rows = x.size(0);
    at::Tensor y = at::empty_like(x);
    std::optional<at::Tensor> r_out;
    if (residual.has_value()) r_out = at::empty_like(x);
    std::optional<at::Tensor> mean;
    if (!is_rms_) mean = at::empty({rows}, x.options().dtype(at::kFloat));
    at::Tensor rstd = at::empty({rows}, x.options().dtype(at::kFloat));
    norm_fwd_cpu(x, weight, bias, residual, y, r_out, mean, rstd, eps_, is_rms_);
    return {y, r_out.has_value() ? *r_out : x};
}

at::Tensor DecodePlan::step(const at::Tensor& tokens, const std::vector<at::Tensor>& k_cache,
                            const std::vector<at::Tensor>& v_cache, at::Tensor& seqlens) const {
    at::NoGradGuard no_grad;
    TORCH_CHECK_TYPE(tokens.scalar_type() == at::kLong, "decode step: tokens must be int64, got ",
                     tokens.scalar_type());
    TORCH_CHECK_VALUE(tokens.dim() == 1 && tokens.device().is_cpu(),
                      "decode step: tokens must be a 1-D CPU tensor (one token per row), got shape ",
                      tokens.sizes(), " on ", tokens.device());
    const int64_t batch = tokens.size(0), n_layers = static_cast<int64_t>(layers_.size());
    TORCH_CHECK_TYPE(seqlens.scalar_type() == at::kInt, "decode step: seqlens must be int32, got ",
                     seqlens.scalar_type());
    TORCH_CHECK_VALUE(seqlens.dim() == 1 && seqlens.size(0) == batch && seqlens.is_contiguous() &&
                          seqlens.device().is_cpu(),
                      "decode step: seqlens must be a contiguous CPU tensor of shape (", batch, "), got ",
                      seqlens.sizes(), " on ", seqlens.device());
    TORCH_CHECK_VALUE(
        static_cast<int64_t>(k_cache.size()) == n_layers && static_cast<int64_t>(v_cache.size()) == n_layers,
        "decode step: expected ", n_layers, " key and value caches, got ", k_cache.size(), " and ", v_cache.size());
    TORCH_CHECK_VALUE(n_layers > 0, "decode step: the model has no layers");
    const int64_t slots = k_cache[0].dim() == 4 ? k_cache[0].size(1) : -1;
    for (int64_t l = 0; l < n_layers; ++l) {
        for (const at::Tensor* t : {&k_cache[l], &v_cache[l]}) {
            TORCH_CHECK_VALUE(t->dim() == 4 && t->size(0) == batch && t->size(1) == slots &&
                                  t->size(2) == n_kv_heads_ && t->size(3) == head_dim_,
                              "decode step: layer ", l, "'s caches must have shape (", batch, ", ", slots, ", ",
                              n_kv_heads_, ", ", head_dim_, "), got ", t->sizes());
            TORCH_CHECK_TYPE(t->scalar_type() == tok_emb_.scalar_type(), "decode step: layer ", l,
                             "'s caches must have the weights' dtype ", tok_emb_.scalar_type(), ", got ",
                             t->scalar_type());
            TORCH_CHECK_VALUE(t->is_contiguous() && t->device().is_cpu(), "decode step: layer ", l,
                              "'s caches must be contiguous CPU tensors, got strides ", t->strides(), " on ",
                              t->device());
        }
    }
    const int32_t* lens = seqlens.data_ptr<int32_t>();
    int64_t positions = std::numeric_limits<int64_t>::max();
    if (pos_emb_.has_value()) positions = pos_emb_->size(0);
    if (rope_cos_.has_value()) positions = rope_cos_->size(0);
    for (int64_t b = 0; b < batch; ++b) {
        TORCH_CHECK_VALUE(lens[b] >= 0 && lens[b] < slots, "decode step: row ", b, "'s cache length ", lens[b],
                          " leaves no free slot in a cache of ", slots);
        TORCH_CHECK_VALUE(lens[b] < positions, "decode step: row ", b, "'s position ", lens[b],
                          " is past the model's ", positions, " positions");
    }

    const int64_t h = n_heads_, k = n_kv_heads_, d = head_dim_;
    const at::Tensor position = seqlens.to(at::kLong);  // (B,): the new token's position in each row
    at::Tensor x = at::embedding(tok_emb_, tokens);       // (B, C)
    if (pos_emb_.has_value()) x = x + at::embedding(*pos_emb_, position);
    std::optional<at::Tensor> residual;
    const size_t elem = x.element_size();
    for (int64_t l = 0; l < n_layers; ++l) {
        const Layer& w = layers_[l];
        auto [hn, r] = norm(x, residual, w.norm1_w, w.norm1_b);
        residual = r;
        const at::Tensor qkv = at::linear(hn, w.qkv_w, w.qkv_b);  // (B, (H + 2K) D)
        at::Tensor q = qkv.narrow(1, 0, h * d).view({batch, 1, h, d});
        at::Tensor kn = qkv.narrow(1, h * d, k * d).view({batch, 1, k, d});
        const at::Tensor vn = qkv.narrow(1, (h + k) * d, k * d);  // (B, K D), rows strided
        if (rope_cos_.has_value()) {
            at::Tensor q_rot = at::empty({batch, 1, h, d}, x.options());
            at::Tensor k_rot = at::empty({batch, 1, k, d}, x.options());
            rope_cpu(q, kn, *rope_cos_, *rope_sin_, position.view({batch, 1}), q_rot, k_rot, false, false);
            q = q_rot;
            kn = k_rot;
        } else {
            q = q.contiguous();
            kn = kn.contiguous();
        }
        // The new key/value go to slot lens[b] of each row, in place.
        char* kc = static_cast<char*>(k_cache[l].data_ptr());
        char* vc = static_cast<char*>(v_cache[l].data_ptr());
        const char* kp = static_cast<const char*>(kn.data_ptr());
        const char* vp = static_cast<const char*>(vn.data_ptr());
        const int64_t row_bytes = k * d * elem;
        for (int64_t b = 0; b < batch; ++b) {
            const int64_t slot = (b * slots + lens[b]) * row_bytes;
            std::memcpy(kc + slot, kp + b * row_bytes, row_bytes);
            std::memcpy(vc + slot, vp + b * vn.stride(0) * elem, row_bytes);
        }
        at::Tensor y = at::empty({batch, h * d}, x.options());
        AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "decode_attend", [&] {
            std::vector<int32_t> seen(lens, lens + batch);
            for (auto& n : seen) ++n;  // the cached keys and the new one
            attend<scalar_t>(q.data_ptr<scalar_t>(), k_cache[l].data_ptr<scalar_t>(), v_cache[l].data_ptr<scalar_t>(),
                             seen.data(), y.data_ptr<scalar_t>(), batch, slots, h, k, d,
                             static_cast<float>(1.0 / std::sqrt(static_cast<double>(d))));
        });
        const at::Tensor attn = at::linear(y, w.proj_w, w.proj_b);  // (B, C)
        auto [hm, r2] = norm(attn, residual, w.norm2_w, w.norm2_b);
        residual = r2;
        const at::Tensor pre = at::linear(hm, w.fc1_w, w.fc1_b);  // (B, 2F) [gate | up], or (B, F)
        const int64_t f = w.fc2_w.size(1);
        at::Tensor act_out = at::empty({batch, f}, x.options());
        std::optional<at::Tensor> up;
        if (gated_) up = pre.narrow(1, f, f);
        act_fwd_cpu(pre.narrow(1, 0, f), up, act_out, act_);
        x = at::linear(act_out, w.fc2_w, w.fc2_b);  // (B, C)
    }
    seqlens.add_(1);  // every layer has appended its key/value
    return at::linear(norm(x, residual, norm_f_w_, norm_f_b_).first, head_);  // (B, V)
}
