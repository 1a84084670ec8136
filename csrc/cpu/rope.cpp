#include "cpu/rope.h"

#include "cpu/huge_pages.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <type_traits>
#include <vector>

namespace {

// Rotates every head of one token: x (heads, headdim) with head stride `sh`, into out
// (heads, headdim) contiguous. c and s hold the token's cos and (signed) sin, r2 entries.
template <typename T>
void rotate_heads(const T* x, int64_t sh, T* out, int64_t heads, int64_t d, const float* c, const float* s, int64_t r2,
                  bool interleaved, float* xf, float* of) {
    for (int64_t h = 0; h < heads; ++h) {
        const T* xh = x + h * sh;
        T* oh = out + h * d;
#pragma omp simd
        for (int64_t i = 0; i < d; ++i) xf[i] = static_cast<float>(xh[i]);
        if (interleaved) {
#pragma omp simd
            for (int64_t i = 0; i < r2; ++i) {
                const float x1 = xf[2 * i], x2 = xf[2 * i + 1];
                of[2 * i] = x1 * c[i] - x2 * s[i];
                of[2 * i + 1] = x2 * c[i] + x1 * s[i];
            }
        } else {
#pragma omp simd
            for (int64_t i = 0; i < r2; ++i) {
                const float x1 = xf[i], x2 = xf[i + r2];
                of[i] = x1 * c[i] - x2 * s[i];
                of[i + r2] = x2 * c[i] + x1 * s[i];
            }
        }
        // Features past rotary_dim pass through unchanged.
#pragma omp simd
        for (int64_t i = 2 * r2; i < d; ++i) of[i] = xf[i];
#pragma omp simd
        for (int64_t i = 0; i < d; ++i) oh[i] = static_cast<T>(of[i]);
    }
}

template <typename T>
void rope_kernel(const at::Tensor& q, const at::Tensor& k, const float* cos, const float* sin,
                 const int64_t* pos, int64_t spb, int64_t sps, T* q_out, T* k_out, int64_t r2, bool interleaved,
                 bool conj) {
    const int64_t batch = q.size(0), seqlen = q.size(1), hq = q.size(2), hk = k.size(2), d = q.size(3);
    const T* qp = q.data_ptr<T>();
    const T* kp = k.data_ptr<T>();
    const float sign = conj ? -1.f : 1.f;
    at::parallel_for(0, batch * seqlen, 16, [&](int64_t begin, int64_t end) {
        std::vector<float> xf(d), of(d), s(r2);
        for (int64_t token = begin; token < end; ++token) {
            const int64_t b = token / seqlen, t = token % seqlen;
            const int64_t p = pos != nullptr ? pos[b * spb + t * sps] : t;
            const float* c = cos + p * r2;
#pragma omp simd
            for (int64_t i = 0; i < r2; ++i) s[i] = sign * sin[p * r2 + i];
            rotate_heads(qp + b * q.stride(0) + t * q.stride(1), q.stride(2), q_out + token * hq * d, hq, d, c,
                         s.data(), r2, interleaved, xf.data(), of.data());
            rotate_heads(kp + b * k.stride(0) + t * k.stride(1), k.stride(2), k_out + token * hk * d, hk, d, c,
                         s.data(), r2, interleaved, xf.data(), of.data());
        }
    });
}

void check_input(const at::Tensor& t, const char* name, const at::Tensor& q) {
    TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor, got ", t.device());
    TORCH_CHECK(t.dim() == 4, name, " must be 4-D (batch, seqlen, heads, headdim), got ", t.sizes());
    TORCH_CHECK(t.size(0) == q.size(0) && t.size(1) == q.size(1) && t.size(3) == q.size(3), name,
                " must match q's batch, seqlen and headdim, got ", t.sizes(), " and ", q.sizes());
    TORCH_CHECK(t.scalar_type() == q.scalar_type(), name, " must have dtype ", q.scalar_type(), ", got ",
                t.scalar_type());
    TORCH_CHECK(t.size(3) <= 1 || t.stride(3) == 1, name, " must have a contiguous last dim, got strides ",
                t.strides());
}

}  // namespace

void rope_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos, const at::Tensor& sin,
              const std::optional<at::Tensor>& position_ids, at::Tensor& q_out, at::Tensor& k_out, bool interleaved,
              bool conj) {
    check_input(q, "q", q);
    check_input(k, "k", q);
    TORCH_CHECK(q_out.sizes() == q.sizes() && q_out.is_contiguous() && q_out.scalar_type() == q.scalar_type(),
                "q_out must be a contiguous tensor like q");
    TORCH_CHECK(k_out.sizes() == k.sizes() && k_out.is_contiguous() && k_out.scalar_type() == k.scalar_type(),
                "k_out must be a contiguous tensor like k");
    for (const at::Tensor* t : {&cos, &sin}) {
        TORCH_CHECK(t->dim() == 2 && t->is_contiguous() && t->scalar_type() == at::kFloat && t->device().is_cpu(),
                    "cos and sin must be contiguous fp32 CPU tensors (positions, rotary_dim / 2), got ", t->sizes(),
                    " ", t->scalar_type());
    }
    TORCH_CHECK(cos.sizes() == sin.sizes(), "cos and sin must have the same shape, got ", cos.sizes(), " and ",
                sin.sizes());
    const int64_t r2 = cos.size(1);
    TORCH_CHECK(2 * r2 <= q.size(3), "rotary_dim ", 2 * r2, " exceeds headdim ", q.size(3));
    const int64_t* pos = nullptr;
    int64_t spb = 0, sps = 0;
    if (position_ids.has_value()) {
        const at::Tensor& p = *position_ids;
        TORCH_CHECK(p.dim() == 2 && p.size(0) == q.size(0) && p.size(1) == q.size(1) &&
                        p.scalar_type() == at::kLong && p.device().is_cpu(),
                    "position_ids must be an int64 CPU tensor of shape (batch, seqlen), got ", p.sizes(), " ",
                    p.scalar_type());
        pos = p.data_ptr<int64_t>();
        spb = p.stride(0);
        sps = p.stride(1);
    } else {
        TORCH_CHECK(q.size(1) <= cos.size(0), "seqlen ", q.size(1), " exceeds the ", cos.size(0),
                    " positions of the cos/sin table");
    }
    advise_huge_pages(q_out);
    advise_huge_pages(k_out);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "rope_cpu", [&] {
        rope_kernel<scalar_t>(q, k, cos.data_ptr<float>(), sin.data_ptr<float>(), pos, spb, sps,
                              q_out.data_ptr<scalar_t>(), k_out.data_ptr<scalar_t>(), r2, interleaved, conj);
    });
}
