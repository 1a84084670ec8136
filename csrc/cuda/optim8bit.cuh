// Host interface of the CUDA 8-bit optimizer kernel (csrc/cuda/optim8bit.cu). Plain pointers
// and a stream, no torch types: the .cu then needs only the CUDA toolkit and the shared rule
// header, so it compiles (and is compile-checked for sm_90a) even against a CPU build of torch.
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

#include "../common/optim8bit_rule.h"

namespace fastlm {
namespace optim8bit {

enum ParamType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

struct StepArgs {
    int kind;  // Kind: kAdamW, kAdam or kLion
    int param_type;  // ParamType
    void* param;
    const void* grad;
    uint8_t* state1;
    float* absmax1;
    uint8_t* state2;  // null for Lion
    float* absmax2;
    const float* tables1;  // the signed code's table (kTableSize: the code, then the quantizer's)
    const float* tables2;  // the same for the unsigned code; null for Lion
    int64_t n;
    int block_size;  // power of two in [32, 4096]
    Hyper hyper;
    uint32_t rng_key;
    bool stochastic_rounding;
    int max_grid;  // thread blocks launched at most (each loops over quantization blocks)
};

// Launches one step on `stream`; returns the launch error (cudaSuccess when fine).
cudaError_t optim8bit_step_launch(const StepArgs& args, cudaStream_t stream);

}  // namespace optim8bit
}  // namespace fastlm
