#pragma once
#include <torch/extension.h>

#include <optional>

// LayerNorm / RMSNorm over the last dim of a contiguous (rows, n) tensor, with an optional
// fused residual add (r = x + residual, rounded to x's dtype; y = norm(r)). Statistics in
// fp32. Writes y, r_out (when residual is given), mean (LayerNorm only) and rstd, all
// allocated by the caller.
void norm_fwd_cpu(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                  const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual,
                  at::Tensor& y, std::optional<at::Tensor> r_out, std::optional<at::Tensor> mean, at::Tensor& rstd,
                  double eps, bool is_rms);

// Gradients of norm_fwd_cpu. `r` is the normalized input (x, or x + residual); `dr_out` is
// the gradient flowing into r_out (or absent). Writes dx and, when given, the fp32 weight
// and bias gradients, reduced from fixed row-chunk partials in a fixed order, so the bits
// do not depend on the thread count.
void norm_bwd_cpu(const at::Tensor& dy, const std::optional<at::Tensor>& dr_out, const at::Tensor& r,
                  const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& mean,
                  const at::Tensor& rstd, at::Tensor& dx, std::optional<at::Tensor> dweight,
                  std::optional<at::Tensor> dbias, bool is_rms);
