#pragma once
#include <torch/extension.h>

#include <optional>
#include <string>
#include <vector>

// One step of a block-wise 8-bit optimizer (kind: 0 AdamW, 1 Adam, 2 Lion) over a contiguous
// parameter (fp32, bf16 or fp16) and its gradient (same dtype and shape), in place.
// state1/absmax1: the first moment's uint8 codes (numel(param)) and fp32 block absmax
// (ceil(numel / block_size)); state2/absmax2 the second moment's (absent for Lion).
// tables1, tables2: the signed and unsigned code tables of fastlm/optim/_code.py (kTableSize fp32).
// hyper: the 9 fp32-rounded scalars of csrc/common/optim8bit_rule.h's Hyper, in order.
// seed, step: key the stochastic rounding of bf16 parameters (when stochastic_rounding).
// path: the code path, one of optim8bit_paths_cpu() ("" for the first); every path computes the
// same bits.
void optim8bit_step_cpu(int64_t kind, at::Tensor& param, const at::Tensor& grad, at::Tensor& state1,
                        at::Tensor& absmax1, std::optional<at::Tensor> state2, std::optional<at::Tensor> absmax2,
                        const at::Tensor& tables1, const std::optional<at::Tensor>& tables2, int64_t block_size,
                        const std::vector<double>& hyper,
                        int64_t seed, int64_t step, bool stochastic_rounding, const std::string& path);
// The kernel's code paths this build holds and this processor runs, fastest first: "avx512"
// (AVX-512 F/BW/DQ/VL/VBMI, 16 lanes), "avx2" (AVX2 + F16C, 8 lanes), "generic" (the rule element
// by element, vectorized by the compiler as it can; always there).
std::vector<std::string> optim8bit_paths_cpu();
