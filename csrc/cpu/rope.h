#pragma once
#include <torch/extension.h>

#include <optional>

// Rotary position embedding of q (batch, seqlen, hq, headdim) and k (batch, seqlen, hk, headdim)
// into the contiguous outputs q_out and k_out, one pass over the tokens. q and k may be strided
// (e.g. views into a packed qkv projection) but their last dim must be contiguous. cos and sin
// are fp32 (positions, rotary_dim / 2) tables; the first rotary_dim features of each head are
// rotated (GPT-NeoX half-split pairs (i, i + rotary_dim / 2), or GPT-J interleaved pairs
// (2i, 2i + 1)), the rest copied. The position of token (b, s) is position_ids[b, s] (int64,
// any strides, e.g. a broadcast (seqlen,) row) or s when absent. `conj` rotates by -angle: the
// transpose of the rotation, which is its backward.
void rope_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos, const at::Tensor& sin,
              const std::optional<at::Tensor>& position_ids, at::Tensor& q_out, at::Tensor& k_out, bool interleaved,
              bool conj);
