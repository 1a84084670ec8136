#pragma once
#include <torch/extension.h>

#include <optional>

// Flash attention on CPU, fp32, no dropout, for training shapes (fastlm/ops/attention.py's `cpp`
// backend). q: (batch, seqlen_q, heads, dim), k/v: (batch, seqlen_k, kv_heads, dim), contiguous;
// packed sequences: (tokens, heads, dim) with int32 cu_seqlens_q/k of shape (batch + 1,).
// heads % kv_heads == 0 (GQA/MQA), dim a multiple of 8. Query i of a sequence sees key j when
// i + diag - left <= j <= i + diag + right, diag = seqlen_k - seqlen_q (bottom-right aligned;
// -1 = unbounded). Rows that see no key output zeros and an LSE of +inf.
//
// The forward writes `out` and, when given, the fp32 base-2 log-sum-exp (log2(e) times the
// natural one): (batch, heads, seqlen_q), packed (heads, tokens).
void attention_fwd_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out,
                       std::optional<at::Tensor> lse, const std::optional<at::Tensor>& cu_seqlens_q,
                       const std::optional<at::Tensor>& cu_seqlens_k, int64_t max_seqlen_q, double scale,
                       int64_t left, int64_t right);

// Gradients from the forward's out and base-2 LSE (no forward recompute): writes dq, dk and dv
// (dk/dv summed over the query heads that share each kv head).
void attention_bwd_cpu(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                       const at::Tensor& out, const at::Tensor& lse, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv,
                       const std::optional<at::Tensor>& cu_seqlens_q, const std::optional<at::Tensor>& cu_seqlens_k,
                       int64_t max_seqlen_q, double scale, int64_t left, int64_t right);
