#include "cpu/activation.h"

#include "cpu/fast_math.h"
#include "cpu/huge_pages.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace {

// Columns handled per inner block: the fp32 staging buffers stay in L1.
constexpr int64_t kChunk = 512;

using fastlm_cpu::exp_approx;

constexpr int kSilu = 0;
constexpr int kGeluTanh = 1;
constexpr int kGeluErf = 2;

// Phi(x), the standard normal CDF, as 0.5 * erfc(-x / sqrt(2)), vectorizable (std::erf is not,
// and ran ~40 ns per element). erfc(z) = t * exp(-z^2 + P(t)) with t = 1 / (1 + z / 2), z >= 0,
// P a degree-10 least-squares fit made for fastlm (relative error 5e-8 in fp64); evaluated in
// fp32, Phi is within 2.2e-7 absolute of the truth, and its negative tail keeps relative accuracy
// (no 1 + erf(x) cancellation).
FASTLM_ALWAYS_INLINE float normal_cdf(float x) {
    const float z = std::fabs(x) * 0.70710678118654752f;
    const float t = 1.f / (1.f + 0.5f * z);
    const float p =
        -1.265549286f +
        t * (1.001110792f +
             t * (0.3606774852f +
                  t * (0.1881862514f +
                       t * (-0.5679577524f +
                            t * (1.304611715f +
                                 t * (-2.942943303f +
                                      t * (3.563976550f +
                                           t * (-2.316093484f + t * (0.7827264554f + t * -0.1087453744f)))))))));
    const float half_erfc = 0.5f * t * exp_approx(p - z * z);
    return x < 0.f ? half_erfc : 1.f - half_erfc;
}

// GELU's tanh form, rewritten with 0.5 * (1 + tanh(z)) = sigmoid(2z) so it needs one exp.
constexpr float kTanhScale = 1.5957691216057308f;  // 2 * sqrt(2 / pi)
constexpr float kTanhCubic = 0.044715f;
constexpr float kInvSqrt2Pi = 0.3989422804014327f;

// silu and gelu_tanh are g * s with s = sigmoid(z) = 1 / (1 + e), e = exp(-z), and t = 1 - s = e * s
// (exact where s rounds to 1; 1 - s would cancel); exp_approx's clamp keeps e finite, so e * s is never
// inf * 0. Past |g| = kSaturation (|z| >= 87; SATURATION in fastlm/ops/activation.py) s and t are 0 or 1
// to fp32 precision and are set so, exactly: exp_approx's floor (~1e-38) times a huge g would not be
// negligible; and gelu's derivative squares g clamped there, as g * g overflows from |g| ~ 2e19.
// The ternaries keep a NaN g (std::min/max may not).
template <int ACT>
constexpr float kSaturation = ACT == kSilu ? 88.f : 10.f;

template <int ACT>
FASTLM_ALWAYS_INLINE float sigmoid_of(float g, float& e) {
    e = exp_approx(ACT == kSilu ? -g : -kTanhScale * (g + kTanhCubic * g * g * g));
    return g < -kSaturation<ACT> ? 0.f : 1.f / (1.f + e);
}

template <int ACT>
FASTLM_ALWAYS_INLINE float act_value(float g) {
    if constexpr (ACT == kGeluErf) {
        return g * normal_cdf(g);
    } else {
        float e;
        return g * sigmoid_of<ACT>(g, e);
    }
}

// act(g) and act'(g) together (they share the exp).
template <int ACT>
FASTLM_ALWAYS_INLINE void act_value_and_grad(float g, float& a, float& da) {
    if constexpr (ACT == kGeluErf) {
        const float cdf = normal_cdf(g);
        a = g * cdf;
        // exp_nonpositive: exactly 0 far out, where exp_approx's floor times a huge g would not be.
        da = cdf + g * kInvSqrt2Pi * fastlm_cpu::exp_nonpositive(-0.5f * g * g);
    } else {
        constexpr float lim = kSaturation<ACT>;
        float e;
        const float s = sigmoid_of<ACT>(g, e);
        const float t = g > lim ? 0.f : e * s;
        a = g * s;
        if constexpr (ACT == kSilu) {
            da = s * (1.f + g * t);
        } else {
            const float gc = g < -lim ? -lim : (g > lim ? lim : g);
            da = s + gc * t * s * kTanhScale * (1.f + 3.f * kTanhCubic * gc * gc);
        }
    }
}

// A row segment as fp32: the pointer itself for float, else converted into `buf`.
template <typename T>
inline const float* as_float(const T* src, float* buf, int64_t len) {
    if constexpr (std::is_same_v<T, float>) {
        return src;
    } else {
#pragma omp simd
        for (int64_t i = 0; i < len; ++i) buf[i] = static_cast<float>(src[i]);
        return buf;
    }
}

// Where to compute an output segment: straight into dst for float, else into `buf`.
template <typename T>
inline float* out_float(T* dst, float* buf) {
    if constexpr (std::is_same_v<T, float>) {
        return dst;
    } else {
        return buf;
    }
}

template <typename T>
inline void store(const float* src, T* dst, int64_t len) {
    if constexpr (!std::is_same_v<T, float>) {
#pragma omp simd
        for (int64_t i = 0; i < len; ++i) dst[i] = static_cast<T>(src[i]);
    }
}

// Calls fn(row, first_col, len) for every kChunk-wide block of a (rows, n) tensor, in parallel.
template <typename Fn>
void for_each_block(int64_t rows, int64_t n, const Fn& fn) {
    const int64_t per_row = (n + kChunk - 1) / kChunk;
    const int64_t grain = std::max<int64_t>(1, 32768 / kChunk);
    at::parallel_for(0, rows * per_row, grain, [&](int64_t begin, int64_t end) {
        for (int64_t block = begin; block < end; ++block) {
            const int64_t row = block / per_row;
            const int64_t col = (block % per_row) * kChunk;
            fn(row, col, std::min(kChunk, n - col));
        }
    });
}

template <typename T, int ACT, bool GATED>
void fwd_kernel(const T* g, int64_t sg, const T* u, int64_t su, T* y, int64_t sy, int64_t rows, int64_t n) {
    for_each_block(rows, n, [&](int64_t row, int64_t col, int64_t len) {
        alignas(64) float gbuf[kChunk], ubuf[kChunk], ybuf[kChunk];
        const float* gf = as_float(g + row * sg + col, gbuf, len);
        const float* uf = GATED ? as_float(u + row * su + col, ubuf, len) : nullptr;
        T* yrow = y + row * sy + col;
        float* yf = out_float(yrow, ybuf);
#pragma omp simd
        for (int64_t i = 0; i < len; ++i) {
            const float a = act_value<ACT>(gf[i]);
            yf[i] = GATED ? a * uf[i] : a;
        }
        store(yf, yrow, len);
    });
}

template <typename T, int ACT, bool GATED, bool RECOMPUTE>
void bwd_kernel(const T* dy, int64_t sdy, const T* g, int64_t sg, const T* u, int64_t su, T* dg, int64_t sdg, T* du,
                int64_t sdu, T* y, int64_t sy, int64_t rows, int64_t n) {
    for_each_block(rows, n, [&](int64_t row, int64_t col, int64_t len) {
        alignas(64) float dybuf[kChunk], gbuf[kChunk], ubuf[kChunk], dgbuf[kChunk], dubuf[kChunk], ybuf[kChunk];
        const float* dyf = as_float(dy + row * sdy + col, dybuf, len);
        const float* gf = as_float(g + row * sg + col, gbuf, len);
        const float* uf = GATED ? as_float(u + row * su + col, ubuf, len) : nullptr;
        T* dgrow = dg + row * sdg + col;
        T* durow = GATED ? du + row * sdu + col : nullptr;
        T* yrow = RECOMPUTE ? y + row * sy + col : nullptr;
        float* dgf = out_float(dgrow, dgbuf);
        float* duf = out_float(durow, dubuf);
        float* yf = out_float(yrow, ybuf);
#pragma omp simd
        for (int64_t i = 0; i < len; ++i) {
            float a, da;
            act_value_and_grad<ACT>(gf[i], a, da);
            if constexpr (GATED) {
                dgf[i] = dyf[i] * uf[i] * da;
                duf[i] = dyf[i] * a;
                if constexpr (RECOMPUTE) yf[i] = a * uf[i];
            } else {
                dgf[i] = dyf[i] * da;
                if constexpr (RECOMPUTE) yf[i] = a;
            }
        }
        store(dgf, dgrow, len);
        if constexpr (GATED) store(duf, durow, len);
        if constexpr (RECOMPUTE) store(yf, yrow, len);
    });
}

// Runs fn.template operator()<ACT>() for the runtime activation code.
template <typename Fn>
void dispatch_act(int64_t act, const Fn& fn) {
    switch (act) {
        case kSilu: fn(std::integral_constant<int, kSilu>{}); break;
        case kGeluTanh: fn(std::integral_constant<int, kGeluTanh>{}); break;
        case kGeluErf: fn(std::integral_constant<int, kGeluErf>{}); break;
        default: TORCH_CHECK(false, "act must be 0 (silu), 1 (gelu tanh) or 2 (gelu erf), got ", act);
    }
}

void check_rows(const at::Tensor& t, const char* name, const at::Tensor& like) {
    TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor, got ", t.device());
    TORCH_CHECK(t.dim() == 2, name, " must be 2-D (rows, n), got ", t.sizes());
    TORCH_CHECK(t.sizes() == like.sizes(), name, " must have shape ", like.sizes(), ", got ", t.sizes());
    TORCH_CHECK(t.scalar_type() == like.scalar_type(), name, " must have dtype ", like.scalar_type(), ", got ",
                t.scalar_type());
    TORCH_CHECK(t.size(1) <= 1 || t.stride(1) == 1, name, " must have contiguous columns, got strides ",
                t.strides());
}

template <typename T>
T* ptr_or_null(const std::optional<at::Tensor>& t) {
    return t.has_value() ? t->data_ptr<T>() : nullptr;
}

int64_t row_stride(const std::optional<at::Tensor>& t) { return t.has_value() ? t->stride(0) : 0; }

}  // namespace

void act_fwd_cpu(const at::Tensor& gate, const std::optional<at::Tensor>& up, at::Tensor& y, int64_t act) {
    check_rows(gate, "gate", gate);
    if (up.has_value()) check_rows(*up, "up", gate);
    check_rows(y, "y", gate);
    const int64_t rows = gate.size(0), n = gate.size(1);
    advise_huge_pages(y);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, gate.scalar_type(), "act_fwd_cpu", [&] {
        dispatch_act(act, [&](auto act_c) {
            constexpr int A = decltype(act_c)::value;
            const scalar_t* g = gate.data_ptr<scalar_t>();
            scalar_t* out = y.data_ptr<scalar_t>();
            if (up.has_value()) {
                fwd_kernel<scalar_t, A, true>(g, gate.stride(0), up->data_ptr<scalar_t>(), up->stride(0), out,
                                              y.stride(0), rows, n);
            } else {
                fwd_kernel<scalar_t, A, false>(g, gate.stride(0), nullptr, 0, out, y.stride(0), rows, n);
            }
        });
    });
}

void act_bwd_cpu(const at::Tensor& dy, const at::Tensor& gate, const std::optional<at::Tensor>& up,
                 at::Tensor& dgate, std::optional<at::Tensor> dup, std::optional<at::Tensor> y, int64_t act) {
    check_rows(gate, "gate", gate);
    check_rows(dy, "dy", gate);
    check_rows(dgate, "dgate", gate);
    TORCH_CHECK(up.has_value() == dup.has_value(), "dup must be given exactly when up is");
    if (up.has_value()) {
        check_rows(*up, "up", gate);
        check_rows(*dup, "dup", gate);
    }
    if (y.has_value()) check_rows(*y, "y", gate);
    const int64_t rows = gate.size(0), n = gate.size(1);
    advise_huge_pages(dgate);
    if (dup.has_value()) advise_huge_pages(*dup);
    if (y.has_value()) advise_huge_pages(*y);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, gate.scalar_type(), "act_bwd_cpu", [&] {
        dispatch_act(act, [&](auto act_c) {
            constexpr int A = decltype(act_c)::value;
            auto run = [&](auto gated_c, auto recompute_c) {
                bwd_kernel<scalar_t, A, decltype(gated_c)::value, decltype(recompute_c)::value>(
                    dy.data_ptr<scalar_t>(), dy.stride(0), gate.data_ptr<scalar_t>(), gate.stride(0),
                    ptr_or_null<scalar_t>(up), row_stride(up), dgate.data_ptr<scalar_t>(), dgate.stride(0),
                    ptr_or_null<scalar_t>(dup), row_stride(dup), ptr_or_null<scalar_t>(y), row_stride(y), rows, n);
            };
            using True = std::true_type;
            using False = std::false_type;
            if (up.has_value()) {
                y.has_value() ? run(True{}, True{}) : run(True{}, False{});
            } else {
                y.has_value() ? run(False{}, True{}) : run(False{}, False{});
            }
        });
    });
}
