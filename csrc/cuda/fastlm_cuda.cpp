// The one Python module of fastlm's CUDA C++ kernels (built on first use on a CUDA machine,
// see fastlm/extension.py:cuda_extension). Argument checks and the stream live here; the
// kernels (.cu) take plain pointers.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include <optional>
#include <vector>

#include "optim8bit.cuh"

namespace {

namespace rule = fastlm::optim8bit;

void check_cuda(const at::Tensor& t, const at::Tensor& param, at::ScalarType dtype, int64_t numel, const char* name) {
    TORCH_CHECK(t.device() == param.device() && t.scalar_type() == dtype && t.is_contiguous() && t.numel() == numel,
                name, ": expected a contiguous ", dtype, " tensor of ", numel, " elements on ", param.device(),
                ", got ", t.scalar_type(), " of ", t.numel(), " on ", t.device(),
                t.is_contiguous() ? "" : " (non-contiguous)");
}

// Same contract as optim8bit_step_cpu (csrc/cpu/optim8bit.h).
void optim8bit_step_cuda(int64_t kind, at::Tensor& param, const at::Tensor& grad, at::Tensor& state1,
                         at::Tensor& absmax1, std::optional<at::Tensor> state2, std::optional<at::Tensor> absmax2,
                         const at::Tensor& tables1, const std::optional<at::Tensor>& tables2, int64_t block_size,
                         const std::vector<double>& hyper, int64_t seed, int64_t step, bool stochastic_rounding) {
    TORCH_CHECK(kind == rule::kAdamW || kind == rule::kAdam || kind == rule::kLion,
                "kind: expected 0 (AdamW), 1 (Adam) or 2 (Lion), got ", kind);
    TORCH_CHECK(block_size >= 32 && block_size <= 4096 && (block_size & (block_size - 1)) == 0,
                "block_size: expected a power of two in [32, 4096], got ", block_size);
    TORCH_CHECK(param.is_cuda() && param.is_contiguous(), "param: expected a contiguous CUDA tensor, got ",
                param.device(), param.is_contiguous() ? "" : " (non-contiguous)");
    const auto dtype = param.scalar_type();
    TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
                "param: expected float32, bfloat16 or float16, got ", dtype);
    TORCH_CHECK(hyper.size() == 9, "hyper: expected the 9 scalars of Hyper, got ", hyper.size());
    const int64_t n = param.numel();
    const int64_t blocks = (n + block_size - 1) / block_size;
    check_cuda(grad, param, dtype, n, "grad");
    check_cuda(state1, param, at::kByte, n, "state1");
    check_cuda(absmax1, param, at::kFloat, blocks, "absmax1");
    check_cuda(tables1, param, at::kFloat, rule::kTableSize, "tables1");
    const bool two_moments = kind != rule::kLion;
    if (two_moments) {
        TORCH_CHECK(state2 && absmax2 && tables2, "Adam/AdamW need state2, absmax2 and tables2");
        check_cuda(*state2, param, at::kByte, n, "state2");
        check_cuda(*absmax2, param, at::kFloat, blocks, "absmax2");
        check_cuda(*tables2, param, at::kFloat, rule::kTableSize, "tables2");
    }
    const c10::cuda::CUDAGuard guard(param.device());
    rule::StepArgs args{};
    args.kind = static_cast<int>(kind);
    args.param_type = dtype == at::kFloat ? rule::kFloat32 : (dtype == at::kBFloat16 ? rule::kBFloat16 : rule::kFloat16);
    args.param = param.data_ptr();
    args.grad = grad.data_ptr();
    args.state1 = state1.data_ptr<uint8_t>();
    args.absmax1 = absmax1.data_ptr<float>();
    args.state2 = two_moments ? state2->data_ptr<uint8_t>() : nullptr;
    args.absmax2 = two_moments ? absmax2->data_ptr<float>() : nullptr;
    args.tables1 = tables1.data_ptr<float>();
    args.tables2 = two_moments ? tables2->data_ptr<float>() : nullptr;
    args.n = n;
    args.block_size = static_cast<int>(block_size);
    args.hyper = rule::Hyper{static_cast<float>(hyper[0]), static_cast<float>(hyper[1]), static_cast<float>(hyper[2]),
                             static_cast<float>(hyper[3]), static_cast<float>(hyper[4]), static_cast<float>(hyper[5]),
                             static_cast<float>(hyper[6]), static_cast<float>(hyper[7]), static_cast<float>(hyper[8])};
    args.rng_key = rule::rng_key(static_cast<uint32_t>(seed), static_cast<uint32_t>(step));
    args.stochastic_rounding = stochastic_rounding && dtype == at::kBFloat16;
    // Enough thread blocks to fill every SM twice over; each then loops over quantization blocks.
    const int threads = std::max<int>(32, static_cast<int>(block_size) / static_cast<int>(16 / param.element_size()));
    const int per_sm = std::max(1, 2048 / threads);
    args.max_grid = at::cuda::getCurrentDeviceProperties()->multiProcessorCount * per_sm * 2;
    const cudaError_t err = rule::optim8bit_step_launch(args, at::cuda::getCurrentCUDAStream());
    TORCH_CHECK(err == cudaSuccess, "optim8bit CUDA kernel launch failed: ", cudaGetErrorString(err));
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.doc() = "fastlm CUDA C++ kernels";
    m.def("optim8bit_step", &optim8bit_step_cuda, "One block-wise 8-bit AdamW/Adam/Lion step, in place",
          py::arg("kind"), py::arg("param"), py::arg("grad"), py::arg("state1"), py::arg("absmax1"),
          py::arg("state2"), py::arg("absmax2"), py::arg("tables1"), py::arg("tables2"), py::arg("block_size"),
          py::arg("hyper"), py::arg("seed"), py::arg("step"), py::arg("stochastic_rounding"));
}
