#include "cpu/norm.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <vector>

namespace {

// Rows are split into this many chunks for the weight/bias gradient partials. Fixed (not
// the thread count) so that the reduction order, and hence the bits, never change.
constexpr int64_t kGradChunks = 32;

template <typename T>
inline void load_row(const T* src, float* dst, int64_t n) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

template <typename T>
inline void store_row(const float* src, T* dst, int64_t n) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(src[i]);
}

template <typename T>
void norm_fwd_kernel(const T* x, const T* res, const float* w, const float* b, T* y, T* r_out, float* mean_out,
                     float* rstd_out, int64_t rows, int64_t n, float eps, bool is_rms) {
    at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
        std::vector<float> v(n), rv(res != nullptr ? n : 0);
        for (int64_t row = begin; row < end; ++row) {
            const int64_t off = row * n;
            load_row(x + off, v.data(), n);
            if (res != nullptr) {
                load_row(res + off, rv.data(), n);
#pragma omp simd
                for (int64_t i = 0; i < n; ++i) rv[i] += v[i];
                // The statistics use r as stored (rounded to T), as `x + residual` in T does.
                store_row(rv.data(), r_out + off, n);
                load_row(r_out + off, v.data(), n);
            }
            float mean = 0.f;
            if (!is_rms) {
                float sum = 0.f;
#pragma omp simd reduction(+ : sum)
                for (int64_t i = 0; i < n; ++i) sum += v[i];
                mean = sum / n;
                mean_out[row] = mean;
            }
            float sq = 0.f;
#pragma omp simd reduction(+ : sq)
            for (int64_t i = 0; i < n; ++i) sq += (v[i] - mean) * (v[i] - mean);
            const float rstd = 1.f / std::sqrt(sq / n + eps);
            rstd_out[row] = rstd;
#pragma omp simd
            for (int64_t i = 0; i < n; ++i) {
                float out = (v[i] - mean) * rstd;
                if (w != nullptr) out *= w[i];
                if (b != nullptr) out += b[i];
                v[i] = out;
            }
            store_row(v.data(), y + off, n);
        }
    });
}

template <typename T>
void norm_bwd_kernel(const T* dy, const T* dr_out, const T* r, const float* w, const float* mean_in,
                     const float* rstd_in, T* dx, float* dw_partial, float* db_partial, int64_t rows, int64_t n,
                     int64_t chunks, bool is_rms) {
    const int64_t rows_per_chunk = (rows + chunks - 1) / chunks;
    at::parallel_for(0, chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
        std::vector<float> xhat(n), g(n), dyf(n);
        for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
            float* dw_acc = dw_partial ? dw_partial + chunk * n : nullptr;
            float* db_acc = db_partial ? db_partial + chunk * n : nullptr;
            const int64_t row_end = std::min(rows, (chunk + 1) * rows_per_chunk);
            for (int64_t row = chunk * rows_per_chunk; row < row_end; ++row) {
                const int64_t off = row * n;
                const float mean = is_rms ? 0.f : mean_in[row];
                const float rstd = rstd_in[row];
                load_row(r + off, xhat.data(), n);
                load_row(dy + off, dyf.data(), n);
                float sum_gx = 0.f, sum_g = 0.f;
#pragma omp simd reduction(+ : sum_gx, sum_g)
                for (int64_t i = 0; i < n; ++i) {
                    xhat[i] = (xhat[i] - mean) * rstd;
                    g[i] = w ? dyf[i] * w[i] : dyf[i];
                    sum_gx += g[i] * xhat[i];
                    sum_g += g[i];
                }
                const float c1 = sum_gx / n;
                const float c2 = is_rms ? 0.f : sum_g / n;
#pragma omp simd
                for (int64_t i = 0; i < n; ++i) g[i] = (g[i] - xhat[i] * c1 - c2) * rstd;
                if (dw_acc) {
#pragma omp simd
                    for (int64_t i = 0; i < n; ++i) dw_acc[i] += dyf[i] * xhat[i];
                }
                if (db_acc) {
#pragma omp simd
                    for (int64_t i = 0; i < n; ++i) db_acc[i] += dyf[i];
                }
                if (dr_out != nullptr) {
                    load_row(dr_out + off, dyf.data(), n);
#pragma omp simd
                    for (int64_t i = 0; i < n; ++i) g[i] += dyf[i];
                }
                store_row(g.data(), dx + off, n);
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
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, r.scalar_type(), "norm_bwd_cpu", [&] {
        norm_bwd_kernel<scalar_t>(dy.data_ptr<scalar_t>(), ptr_or_null<scalar_t>(dr_out), r.data_ptr<scalar_t>(),
                                  w.defined() ? w.data_ptr<float>() : nullptr, ptr_or_null<float>(mean),
                                  rstd.data_ptr<float>(), dx.data_ptr<scalar_t>(),
                                  dw_partial.defined() ? dw_partial.data_ptr<float>() : nullptr,
                                  db_partial.defined() ? db_partial.data_ptr<float>() : nullptr, rows, n, chunks,
                                  is_rms);
    });
    if (dweight.has_value()) reduce_partials(dw_partial, *dweight);
    if (dbias.has_value()) reduce_partials(db_partial, *dbias);
}
