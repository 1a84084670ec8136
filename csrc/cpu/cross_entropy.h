#pragma once
#include <torch/extension.h>

#include <optional>

// Cross-entropy of each row of contiguous logits (rows, V) against int64 targets (rows),
// fp32 math. Writes the per-row loss (0 for rows whose target is ignore_index) into `loss`
// (fp32, rows) and, when `grad` is given, the gradient of each row's loss times its scale
// (scale[0], or scale[row] when row_scale) in logits' dtype. `grad` may be `logits` itself.
// Targets must already be range-checked (the Python op does it before any launch).
void cross_entropy_fwd_cpu(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& scale,
                           at::Tensor& loss, std::optional<at::Tensor> grad, int64_t ignore_index,
                           double label_smoothing, double z_loss, bool row_scale);
