// The one Python module of fastlm's C++ CPU kernels.
#include <torch/extension.h>

#include "cpu/cross_entropy.h"
#include "cpu/norm.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.doc() = "fastlm C++ CPU kernels";
    m.def("norm_fwd", &norm_fwd_cpu, "LayerNorm/RMSNorm forward with optional fused residual add",
          py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("residual"), py::arg("y"),
          py::arg("r_out"), py::arg("mean"), py::arg("rstd"), py::arg("eps"), py::arg("is_rms"));
    m.def("norm_bwd", &norm_bwd_cpu, "LayerNorm/RMSNorm backward", py::arg("dy"), py::arg("dr_out"),
          py::arg("r"), py::arg("weight"), py::arg("mean"), py::arg("rstd"), py::arg("dx"), py::arg("dweight"),
          py::arg("dbias"), py::arg("is_rms"));
    m.def("cross_entropy_fwd", &cross_entropy_fwd_cpu, "Cross-entropy per-row loss and scaled gradient",
          py::arg("logits"), py::arg("target"), py::arg("scale"), py::arg("loss"), py::arg("grad"),
          py::arg("ignore_index"), py::arg("label_smoothing"), py::arg("z_loss"), py::arg("row_scale"));
}
