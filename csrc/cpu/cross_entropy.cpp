#include "cpu/cross_entropy.h"

#include "cpu/fast_math.h"
#include "cpu/huge_pages.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

using fastlm_cpu::exp_nonpositive;

// Terms summed in fp32 before joining the double accumulator (see the row loop).
constexpr int64_t kSumChunk = 256;

template <typename T>
void cross_entropy_fwd_kernel(const T* logits, const int64_t* target, const float* scale, float* loss, T* grad,
                              int64_t rows, int64_t V, int64_t ignore_index, float ls, float z, bool row_scale) {
    at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
        // The row is converted to fp32 once: the gradient pass reads the copy, which is also
        // what lets grad alias logits.
        std::vector<float> buffer(V);
        // Every loop reads the row through this local pointer: through the vector's operator[] GCC
        // keeps a scalar fallback of the max loop, and that is the one that ran (3 cycles a logit).
        float* const x = buffer.data();
        for (int64_t row = begin; row < end; ++row) {
            const int64_t t = target[row];
            T* g_row = grad != nullptr ? grad + row * V : nullptr;
            if (t == ignore_index) {
                loss[row] = 0.f;
                if (g_row != nullptr) {
                    for (int64_t i = 0; i < V; ++i) g_row[i] = static_cast<T>(0.f);
                }
                continue;
            }
            const T* x_row = logits + row * V;
            float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
            for (int64_t i = 0; i < V; ++i) {
                const float v = static_cast<float>(x_row[i]);
                x[i] = v;
                m = v > m ? v : m;
            }
            // All -inf (fully masked row): keep exp() finite; the loss is then inf, as in torch.
            const float m_safe = std::isinf(m) && m < 0 ? 0.f : m;
            const float x_t = x[t];
            // e_i = exp(x_i - m) overwrites x (the gradient pass needs only e), summed in float over
            // chunks of kSumChunk terms (full SIMD width) added into double accumulators: one float
            // sum of V terms, even split over SIMD lanes, loses ~sqrt(V / lanes) ulps, visible in the
            // gradient at large V. The smoothing term's sum of x is taken before x is overwritten.
            double d = 0.0, sum_x = 0.0;
            for (int64_t c = 0; c < V; c += kSumChunk) {
                const int64_t n = std::min(kSumChunk, V - c);
                float* xc = x + c;
                if (ls != 0.f) {  // only when smoothing: 0 * sum_x is NaN for -inf (masked) logits
                    float sc = 0.f;
#pragma omp simd reduction(+ : sc)
                    for (int64_t i = 0; i < n; ++i) sc += xc[i];
                    sum_x += sc;
                }
                float dc = 0.f;
#pragma omp simd reduction(+ : dc)
                for (int64_t i = 0; i < n; ++i) {
                    xc[i] = exp_nonpositive(xc[i] - m_safe);
                    dc += xc[i];
                }
                d += dc;
            }
            const float lse = static_cast<float>(m_safe + std::log(d));
            const double smooth_term = ls != 0.f ? ls * sum_x / V : 0.0;
            loss[row] = static_cast<float>(lse - (1.0 - ls) * x_t - smooth_term + static_cast<double>(z) * lse * lse);
            if (g_row == nullptr) continue;
            const float s = row_scale ? scale[row] : scale[0];
            // softmax_i = e_i / d, one exp per logit: within ~2 ulps relative everywhere, where
            // exp((x_i - m) - log d) carries the rounding of that difference (up to ~1e-6 relative
            // in the tail) and costs a second exp.
            const float p_coef = static_cast<float>((1.0 + 2.0 * z * lse) * s / d);
            const float smooth = ls / V * s;
#pragma omp simd
            for (int64_t i = 0; i < V; ++i) x[i] = x[i] * p_coef - smooth;
            x[t] -= (1.f - ls) * s;
#pragma omp simd
            for (int64_t i = 0; i < V; ++i) g_row[i] = static_cast<T>(x[i]);
        }
    });
}

}  // namespace

void cross_entropy_fwd_cpu(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& scale,
                           at::Tensor& loss, std::optional<at::Tensor> grad, int64_t ignore_index,
                           double label_smoothing, double z_loss, bool row_scale) {
    TORCH_CHECK(logits.device().is_cpu() && logits.dim() == 2 && logits.is_contiguous(),
                "logits must be a contiguous 2-D CPU tensor (rows, V), got ", logits.sizes());
    const int64_t rows = logits.size(0), V = logits.size(1);
    TORCH_CHECK(target.device().is_cpu() && target.scalar_type() == at::kLong && target.is_contiguous() &&
                    target.dim() == 1 && target.size(0) == rows,
                "target must be a contiguous int64 CPU tensor of shape (", rows, "), got ", target.sizes(), " ",
                target.scalar_type());
    TORCH_CHECK(scale.device().is_cpu() && scale.scalar_type() == at::kFloat && scale.is_contiguous() &&
                    scale.numel() == (row_scale ? rows : 1),
                "scale must be a contiguous fp32 CPU tensor of ", row_scale ? rows : 1, " elements, got ",
                scale.sizes(), " ", scale.scalar_type());
    TORCH_CHECK(loss.device().is_cpu() && loss.scalar_type() == at::kFloat && loss.is_contiguous() &&
                    loss.numel() == rows,
                "loss must be a contiguous fp32 CPU tensor of ", rows, " elements, got ", loss.sizes());
    if (grad.has_value()) {
        TORCH_CHECK(grad->device().is_cpu() && grad->sizes() == logits.sizes() && grad->is_contiguous() &&
                        grad->scalar_type() == logits.scalar_type(),
                    "grad must be a contiguous CPU tensor like logits ", logits.sizes(), " ",
                    logits.scalar_type(), ", got ", grad->sizes(), " ", grad->scalar_type());
    }
    if (grad.has_value()) advise_huge_pages(*grad);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "cross_entropy_fwd_cpu", [&] {
        cross_entropy_fwd_kernel<scalar_t>(
            logits.data_ptr<scalar_t>(), target.data_ptr<int64_t>(), scale.data_ptr<float>(),
            loss.data_ptr<float>(), grad.has_value() ? grad->data_ptr<scalar_t>() : nullptr, rows, V, ignore_index,
            static_cast<float>(label_smoothing), static_cast<float>(z_loss), row_scale);
    });
}
