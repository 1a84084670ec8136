#pragma once
#include <torch/extension.h>

#include <optional>

// Fused FFN activations over 2-D (rows, n) tensors whose rows may be strided (e.g. the two
// halves of a packed gate/up projection) but whose columns are contiguous. `act` is
// 0 = SiLU, 1 = GELU (tanh approximation), 2 = GELU (exact, erf). With `up`, the op is
// gated: y = act(gate) * up; without, y = act(gate). Math in fp32, outputs in the input
// dtype, all outputs allocated by the caller.
void act_fwd_cpu(const at::Tensor& gate, const std::optional<at::Tensor>& up, at::Tensor& y, int64_t act);

// Gradients of act_fwd_cpu, recomputing the activation from gate (nothing else is saved):
// dgate = dy * up * act'(gate), dup = dy * act(gate). When `y` is given it also receives the
// recomputed forward output, so a caller that needs it again (the MLP's down projection
// weight gradient) does not have to store it.
void act_bwd_cpu(const at::Tensor& dy, const at::Tensor& gate, const std::optional<at::Tensor>& up,
                 at::Tensor& dgate, std::optional<at::Tensor> dup, std::optional<at::Tensor> y, int64_t act);
