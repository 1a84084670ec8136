// The one Python module of fastlm's C++ CPU kernels.
#include <torch/extension.h>

#include "cpu/norm.h"
#include "cpu/optim8bit.h"

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
          py::arg("state2"), py::arg("absmax2"), py::arg("tables1"), py::arg("lut1"), py::arg("tables2"),
          py::arg("lut2"), py::arg("block_size"), py::arg("hyper"), py::arg("seed"), py::arg("step"),
          py::arg("stochastic_rounding"));
}
