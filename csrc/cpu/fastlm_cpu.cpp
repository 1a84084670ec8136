// The one Python module of fastlm's C++ CPU kernels.
#include <torch/extension.h>

#include "cpu/activation.h"
#include "cpu/attention.h"
#include "cpu/cross_entropy.h"
#include "cpu/decode.h"
#include "cpu/norm.h"
#include "cpu/optim8bit.h"
#include "cpu/rope.h"
#include "cpu/transpose.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.doc() = "fastlm C++ CPU kernels";
    m.def("norm_fwd", &norm_fwd_cpu, "LayerNorm/RMSNorm forward with optional fused residual add",
          py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("residual"), py::arg("y"),
          py::arg("r_out"), py::arg("mean"), py::arg("rstd"), py::arg("eps"), py::arg("is_rms"));
    m.def("norm_bwd", &norm_bwd_cpu, "LayerNorm/RMSNorm backward", py::arg("dy"), py::arg("dr_out"),
          py::arg("r"), py::arg("weight"), py::arg("mean"), py::arg("rstd"), py::arg("dx"), py::arg("dweight"),
          py::arg("dbias"), py::arg("is_rms"));
    m.def("optim8bit_step", &optim8bit_step_cpu, "One block-wise 8-bit AdamW/Adam/Lion step, in place",
          py::arg("kind"), py::arg("param"), py::arg("grad"), py::arg("state1"), py::arg("absmax1"),
          py::arg("state2"), py::arg("absmax2"), py::arg("tables1"), py::arg("tables2"),
          py::arg("block_size"), py::arg("hyper"), py::arg("seed"), py::arg("step"),
          py::arg("stochastic_rounding"), py::arg("path") = "", py::call_guard<py::gil_scoped_release>());
    m.def("optim8bit_paths", &optim8bit_paths_cpu,
          "The 8-bit optimizer kernel's code paths this build and CPU run, fastest (the default) first");
    m.def("act_fwd", &act_fwd_cpu, "Fused SiLU/GELU activation, optionally gated (act(gate) * up)", py::arg("gate"),
          py::arg("up"), py::arg("y"), py::arg("act"));
    m.def("act_bwd", &act_bwd_cpu, "Gradients of act_fwd, recomputing the activation (optionally returning it)",
          py::arg("dy"), py::arg("gate"), py::arg("up"), py::arg("dgate"), py::arg("dup"), py::arg("y"),
          py::arg("act"));
    m.def("rope", &rope_cpu, "Rotary embedding of q and k (GPT-NeoX or GPT-J pairs; conj = backward)", py::arg("q"),
          py::arg("k"), py::arg("cos"), py::arg("sin"), py::arg("position_ids"), py::arg("q_out"), py::arg("k_out"),
          py::arg("interleaved"), py::arg("conj"));
    m.def("cross_entropy_fwd", &cross_entropy_fwd_cpu, "Cross-entropy per-row loss and scaled gradient",
          py::arg("logits"), py::arg("target"), py::arg("scale"), py::arg("loss"), py::arg("grad"),
          py::arg("ignore_index"), py::arg("label_smoothing"), py::arg("z_loss"), py::arg("row_scale"));
    m.def("attention_fwd", &attention_fwd_cpu, "Flash attention forward, fp32 (out and the base-2 LSE)", py::arg("q"),
          py::arg("k"), py::arg("v"), py::arg("out"), py::arg("lse"), py::arg("cu_seqlens_q"), py::arg("cu_seqlens_k"),
          py::arg("max_seqlen_q"), py::arg("scale"), py::arg("left"), py::arg("right"),
          py::call_guard<py::gil_scoped_release>());
    m.def("attention_bwd", &attention_bwd_cpu, "Flash attention backward from out and the LSE, fp32", py::arg("dout"),
          py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("lse"), py::arg("dq"), py::arg("dk"),
          py::arg("dv"), py::arg("cu_seqlens_q"), py::arg("cu_seqlens_k"), py::arg("max_seqlen_q"), py::arg("scale"),
          py::arg("left"), py::arg("right"), py::call_guard<py::gil_scoped_release>());
    m.def("transpose", &transpose_cpu, "dst (cols, rows) = src (rows, cols) transposed, fp32", py::arg("src"),
          py::arg("dst"));
    py::class_<DecodePlan>(m, "DecodePlan", "One Transformer decode step in C++ (csrc/cpu/decode.h)")
        .def(py::init<at::Tensor, std::optional<at::Tensor>, std::optional<at::Tensor>, std::optional<at::Tensor>,
                      std::vector<std::vector<std::optional<at::Tensor>>>, std::optional<at::Tensor>,
                      std::optional<at::Tensor>, at::Tensor, int64_t, int64_t, double, bool, bool, int64_t>(),
             py::arg("tok_emb"), py::arg("pos_emb"), py::arg("rope_cos"), py::arg("rope_sin"), py::arg("layers"),
             py::arg("norm_f_weight"), py::arg("norm_f_bias"), py::arg("head"), py::arg("n_heads"),
             py::arg("n_kv_heads"), py::arg("eps"), py::arg("is_rms"), py::arg("gated"), py::arg("act"))
        .def("step", &DecodePlan::step, "Logits (B, V) of one new token per row; appends to the caches",
             py::arg("tokens"), py::arg("k_cache"), py::arg("v_cache"), py::arg("seqlens"),
             py::call_guard<py::gil_scoped_release>());
}
