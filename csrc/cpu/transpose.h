#pragma once
#include <torch/extension.h>

// dst (cols, rows) = src (rows, cols) transposed, fp32 CPU tensors: src with contiguous rows (any row
// stride), dst contiguous. Makes a column-major operand row-major for oneDNN's matmul
// (fastlm/ops/gemm.py), 5-7x faster than torch's strided copy at the model's sizes.
void transpose_cpu(const at::Tensor& src, at::Tensor& dst);
