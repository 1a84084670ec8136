#include "cpu/norm.h"

#include "cpu/huge_pages.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <type_traits>
#include <vector>

namespace {

// Rows are split into this many chunks for the weight/bias gradient partials. Fixed (not
// the thread count) so that the reduction order, and hence the bits, never change.
constexpr int64_t kGradChunks = 32;

// Rows are read straight from their tensors in each pass (a row of a few thousand
// elements stays in L1/L2 between passes), converted to fp32 element by element.

template <typename T>
void norm_fwd_kernel(const T* x, const T* res, const float* w, const float* b, T* y, T* r_out, float* mean_out,
                     float* rstd_out, int64_t rows, int64_t n, float eps, bool is_rms) {
    at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
        for (int64_t row = begin; row < end; ++row) {
            const int64_t off = row * n;
            const T* src = x + off;
            float sum = 0.f;
            if (res != nullptr) {
                // Statistics use r as stored (rounded to T), as `x + residual` in T does.
                T* r = r_out + off;
                const T* rs = res + off;
#pragma omp simd reduction(+ : sum)
                for (int64_t i = 0; i < n; ++i) {
                    r[i] = static_cast<T>(static_cast<float>(src[i]) + static_cast<float>(rs[i]));
                    sum += static_cast<float>(r[i]);
                }
                src = r;
            } else if (!is_rms) {
#pragma omp simd reduction(+ : sum)
                for (int64_t i = 0; i < n; ++i) sum += static_cast<float>(src[i]);
            }
            const float mean = is_rms ? 0.f : sum / n;
            if (!is_rms) mean_out[row] = mean;
            float sq = 0.f;
#pragma omp simd reduction(+ : sq)
            for (int64_t i = 0; i < n; ++i) {
                const float d = static_cast<float>(src[i]) - mean;
                sq += d * d;
            }
            const float rstd = 1.f / std::sqrt(sq / n + eps);
            rstd_out[row] = rstd;
            T* dst = y + off;
            if (w != nullptr && b != nullptr) {
#pragma omp simd
                for (int64_t i = 0; i < n; ++i)
                    dst[i] = static_cast<T>((static_cast<float>(src[i]) - mean) * rstd * w[i] + b[i]);
            } else if (w != nullptr) {
#pragma omp simd
                for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>((static_cast<float>(src[i]) - mean) * rstd * w[i]);
            } else {
#pragma omp simd
                for (int64_t i = 0; i < n; ++i) {
                    const float out = (static_cast<float>(src[i]) - mean) * rstd;
                    dst[i] = static_cast<T>(b != nullptr ? out + b[i] : out);
                }
            }
        }
    });
}

// The optional inputs/outputs are template flags so the inner loop carries no branches.
template <typename T, bool HAS_DR, bool HAS_DW, bool HAS_DB>
void norm_bwd_kernel(const T* dy, const T* dr_out, const T* r, const float* w, const float* mean_in,
                     const float* rstd_in, T* dx, float* dw_partial, float* db_partial, int64_t rows, int64_t n,
                     int64_t chunks, bool is_rms) {
    const int64_t rows_per_chunk = (rows + chunks - 1) / chunks;
    // Without a weight, g = dy: point w at ones so one loop body serves both cases.
    std::vector<float> ones(w == nullptr ? n : 0, 1.f);
    const float* wv = w != nullptr ? w : ones.data();
    at::parallel_for(0, chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
        // A local copy of the captured pointer: read through the closure, GCC cannot tell it from
        // the memory the simd reductions write, and vectorizes `wv[i]` as a gather (2-3x slower rows).
        const float* const wl = wv;
        for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
            float* dw_acc = HAS_DW ? dw_partial + chunk * n : nullptr;
            float* db_acc = HAS_DB ? db_partial + chunk * n : nullptr;
            const int64_t row_end = std::min(rows, (chunk + 1) * rows_per_chunk);
            for (int64_t row = chunk * rows_per_chunk; row < row_end; ++row) {
                const int64_t off = row * n;
                const T* rr = r + off;
                const T* dyr = dy + off;
                const float mean = is_rms ? 0.f : mean_in[row];
                const float rstd = rstd_in[row];
                // Pass 1: the two row sums of g = dy * w.
                float sum_gx = 0.f, sum_g = 0.f;
#pragma omp simd reduction(+ : sum_gx, sum_g)
                for (int64_t i = 0; i < n; ++i) {
                    const float xhat = (static_cast<float>(rr[i]) - mean) * rstd;
                    const float g = static_cast<float>(dyr[i]) * wl[i];
                    sum_gx += g * xhat;
                    sum_g += g;
                }
                const float c1 = sum_gx / n;
                const float c2 = is_rms ? 0.f : sum_g / n;
                // Pass 2: dx, and this chunk's weight/bias partial sums.
                T* dxr = dx + off;
                const T* drr = HAS_DR ? dr_out + off : nullptr;
#pragma omp simd
                for (int64_t i = 0; i < n; ++i) {
                    const float xhat = (static_cast<float>(rr[i]) - mean) * rstd;
                    const float dyv = static_cast<float>(dyr[i]);
                    float d = (dyv * wl[i] - xhat * c1 - c2) * rstd;
                    if constexpr (HAS_DR) d += static_cast<float>(drr[i]);
                    dxr[i] = static_cast<T>(d);
                    if constexpr (HAS_DW) dw_acc[i] += dyv * xhat;
                    if constexpr (HAS_DB) db_acc[i] += dyv;
                }
            }
        }
    });
}

// Sums `chunks` partial rows of length n in chunk order (deterministic) into out (fp32).
void reduce_partials(const at::Tensor& partial, at::Tensor& out) {
    const int64_t chunks = partial.size(0), n = partial.size(1);
    const float* p = partial.data_ptr<float>();
    float* o = out.data_ptr<float>();
    at::parallel_for(0, n, 1024, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) o[i] = 0.f;
        for (int64_t c = 0; c < chunks; ++c) {
#pragma omp simd
            for (int64_t i = begin; i < end; ++i) o[i] += p[c * n + i];
        }
    });
}

void check_like(const at::Tensor& t, const char* name, at::IntArrayRef sizes, at::ScalarType dtype) {
    TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor, got ", t.device());
    TORCH_CHECK(t.sizes() == sizes, name, " must have shape ", sizes, ", got ", t.sizes());
    TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
    TORCH_CHECK(t.scalar_type() == dtype, name, " must have dtype ", dtype, ", got ", t.scalar_type());
}

at::Tensor weight_f32(const std::optional<at::Tensor>& t, const char* name, int64_t n) {
    if (!t.has_value()) return at::Tensor();
    TORCH_CHECK(t->device().is_cpu(), name, " must be a CPU tensor, got ", t->device());
    TORCH_CHECK(t->dim() == 1 && t->size(0) == n, name, " must have shape (", n, "), got ", t->sizes());
    return t->to(at::kFloat).contiguous();
}

template <typename T>
const T* ptr_or_null(const std::optional<at::Tensor>& t) {
    return t.has_value() ? t->data_ptr<T>() : nullptr;
}

template <typename T>
T* mut_ptr_or_null(std::optional<at::Tensor>& t) {
    return t.has_value() ? t->data_ptr<T>() : nullptr;
}

}  // namespace

void norm_fwd_cpu(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                  const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual,
                  at::Tensor& y, std::optional<at::Tensor> r_out, std::optional<at::Tensor> mean, at::Tensor& rstd,
                  double eps, bool is_rms) {
    TORCH_CHECK(x.dim() == 2, "x must be 2-D (rows, n), got ", x.sizes());
    check_like(x, "x", x.sizes(), x.scalar_type());
    const int64_t rows = x.size(0), n = x.size(1);
    const at::Tensor w = weight_f32(weight, "weight", n);
    const at::Tensor b = weight_f32(bias, "bias", n);
    check_like(y, "y", x.sizes(), x.scalar_type());
    TORCH_CHECK(residual.has_value() == r_out.has_value(), "r_out must be given exactly when residual is");
    if (residual.has_value()) {
        check_like(*residual, "residual", x.sizes(), x.scalar_type());
        check_like(*r_out, "r_out", x.sizes(), x.scalar_type());
    }
    TORCH_CHECK(is_rms != mean.has_value(), "mean must be given exactly for LayerNorm");
    if (mean.has_value()) check_like(*mean, "mean", {rows}, at::kFloat);
    check_like(rstd, "rstd", {rows}, at::kFloat);
    advise_huge_pages(y);
    if (r_out.has_value()) advise_huge_pages(*r_out);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "norm_fwd_cpu", [&] {
        norm_fwd_kernel<scalar_t>(x.data_ptr<scalar_t>(), ptr_or_null<scalar_t>(residual),
                                  w.defined() ? w.data_ptr<float>() : nullptr,
                                  b.defined() ? b.data_ptr<float>() : nullptr, y.data_ptr<scalar_t>(),
                                  mut_ptr_or_null<scalar_t>(r_out), mut_ptr_or_null<float>(mean),
                                  rstd.data_ptr<float>(), rows, n, static_cast<float>(eps), is_rms);
    });
}

void norm_bwd_cpu(const at::Tensor& dy, const std::optional<at::Tensor>& dr_out, const at::Tensor& r,
                  const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& mean,
                  const at::Tensor& rstd, at::Tensor& dx, std::optional<at::Tensor> dweight,
                  std::optional<at::Tensor> dbias, bool is_rms) {
    TORCH_CHECK(r.dim() == 2, "r must be 2-D (rows, n), got ", r.sizes());
    check_like(r, "r", r.sizes(), r.scalar_type());
    check_like(dy, "dy", r.sizes(), r.scalar_type());
    if (dr_out.has_value()) check_like(*dr_out, "dr_out", r.sizes(), r.scalar_type());
    check_like(dx, "dx", r.sizes(), r.scalar_type());
    const int64_t rows = r.size(0), n = r.size(1);
    const at::Tensor w = weight_f32(weight, "weight", n);
    TORCH_CHECK(is_rms != mean.has_value(), "mean must be given exactly for LayerNorm");
    if (mean.has_value()) check_like(*mean, "mean", {rows}, at::kFloat);
    check_like(rstd, "rstd", {rows}, at::kFloat);
    TORCH_CHECK(!dweight.has_value() || weight.has_value(), "dweight needs weight");
    if (dweight.has_value()) check_like(*dweight, "dweight", {n}, at::kFloat);
    if (dbias.has_value()) check_like(*dbias, "dbias", {n}, at::kFloat);
    const int64_t chunks = std::max<int64_t>(1, std::min(rows, kGradChunks));
    auto f32 = r.options().dtype(at::kFloat);
    at::Tensor dw_partial = dweight.has_value() ? at::zeros({chunks, n}, f32) : at::Tensor();
    at::Tensor db_partial = dbias.has_value() ? at::zeros({chunks, n}, f32) : at::Tensor();
    advise_huge_pages(dx);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, r.scalar_type(), "norm_bwd_cpu", [&] {
        auto launch = [&](auto has_dr, auto has_dw, auto has_db) {
            norm_bwd_kernel<scalar_t, decltype(has_dr)::value, decltype(has_dw)::value, decltype(has_db)::value>(
                dy.data_ptr<scalar_t>(), ptr_or_null<scalar_t>(dr_out), r.data_ptr<scalar_t>(),
                w.defined() ? w.data_ptr<float>() : nullptr, ptr_or_null<float>(mean), rstd.data_ptr<float>(),
                dx.data_ptr<scalar_t>(), dw_partial.defined() ? dw_partial.data_ptr<float>() : nullptr,
                db_partial.defined() ? db_partial.data_ptr<float>() : nullptr, rows, n, chunks, is_rms);
        };
        auto with_db = [&](auto has_dr, auto has_dw) {
            if (db_partial.defined()) launch(has_dr, has_dw, std::true_type{});
            else launch(has_dr, has_dw, std::false_type{});
        };
        auto with_dw = [&](auto has_dr) {
            if (dw_partial.defined()) with_db(has_dr, std::true_type{});
            else with_db(has_dr, std::false_type{});
        };
        if (dr_out.has_value()) with_dw(std::true_type{});
        else with_dw(std::false_type{});
    });
    if (dweight.has_value()) reduce_partials(dw_partial, *dweight);
    if (dbias.has_value()) reduce_partials(db_partial, *dbias);
}
