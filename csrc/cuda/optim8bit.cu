// CUDA kernel of the block-wise 8-bit optimizers: the rule of csrc/common/optim8bit_rule.h,
// the same state layout as the CPU kernel (so states move between devices) and the same bits.
//
// One thread block works on one quantization block at a time (and loops over blocks, so the
// code tables are staged in shared memory once per thread block, not once per 256 elements):
// each thread loads 16 bytes of parameters and gradients (4 fp32 or 8 bf16/fp16 elements) with
// vector loads where aligned, dequantizes its codes, updates in fp32 registers, writes the
// parameters, and the block's new absmax comes from warp-shuffle reductions; then each thread
// requantizes its elements (the rule's closed form, its tables in shared memory).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

#include "optim8bit.cuh"

namespace fastlm {
namespace optim8bit {
namespace {

constexpr int kWarp = 32;

// Parameter storage types: float, bf16 as its raw bits (rounded by the shared rule's helpers,
// stochastically when asked), and __half.
struct Bf16Bits {
    uint16_t bits;
};

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(Bf16Bits x) { return bf16_to_float(x.bits); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

template <typename S, bool Stochastic>
__device__ __forceinline__ S from_float(float x, uint32_t key, uint64_t index) {
    if constexpr (std::is_same_v<S, float>) {
        return x;
    } else if constexpr (std::is_same_v<S, Bf16Bits>) {
        return Bf16Bits{Stochastic ? bf16_round_stochastic(x, rng_bits(key, index)) : bf16_round_nearest(x)};
    } else {
        return __float2half_rn(x);
    }
}

template <int Vec>
struct CodeWord;
template <>
struct CodeWord<4> {
    using type = uint32_t;
};
template <>
struct CodeWord<8> {
    using type = uint2;
};

__device__ __forceinline__ bool aligned(const void* p, uintptr_t bytes) {
    return (reinterpret_cast<uintptr_t>(p) & (bytes - 1)) == 0;
}

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
    for (int offset = kWarp / 2; offset > 0; offset >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, offset));
    return x;
}

// Max over the thread block of a and b (non-negative values); every thread gets the results.
__device__ __forceinline__ void block_max2(float& a, float& b, float (*scratch)[kWarp]) {
    const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
    const int warps = (blockDim.x + kWarp - 1) / kWarp;
    a = warp_max(a);
    b = warp_max(b);
    if (lane == 0) {
        scratch[0][warp] = a;
        scratch[1][warp] = b;
    }
    __syncthreads();
    if (warp == 0) {
        a = lane < warps ? scratch[0][lane] : 0.f;
        b = lane < warps ? scratch[1][lane] : 0.f;
        a = warp_max(a);
        b = warp_max(b);
        if (lane == 0) {
            scratch[0][0] = a;
            scratch[1][0] = b;
        }
    }
    __syncthreads();
    a = scratch[0][0];
    b = scratch[1][0];
}

template <typename S, int Kind, bool Stochastic>
__global__ void __launch_bounds__(1024) optim8bit_kernel(StepArgs args) {
    constexpr int kVec = 16 / sizeof(S);
    constexpr bool kTwoMoments = Kind != kLion;
    using Word = typename CodeWord<kVec>::type;

    __shared__ float table1[kTableSize], table2[kTableSize];
    __shared__ float scratch[2][kWarp];
    for (int i = threadIdx.x; i < kTableSize; i += blockDim.x) {
        table1[i] = args.tables1[i];
        if constexpr (kTwoMoments) table2[i] = args.tables2[i];
    }
    __syncthreads();

    S* const param = static_cast<S*>(args.param);
    const S* const grad = static_cast<const S*>(args.grad);
    const int64_t n = args.n;
    const int block_size = args.block_size;
    const int64_t blocks = (n + block_size - 1) / block_size;
    const Hyper h = args.hyper;

    for (int64_t b = blockIdx.x; b < blocks; b += gridDim.x) {
        // Threads past the block's end (block_size / kVec < 32) only join the reductions.
        const int64_t i0 = b * block_size + static_cast<int64_t>(threadIdx.x) * kVec;
        const bool in_block = static_cast<int>(threadIdx.x) * kVec < block_size;
        const int64_t remaining = n - i0;
        const int count = !in_block || remaining <= 0 ? 0 : (remaining < kVec ? static_cast<int>(remaining) : kVec);
        const bool vector = count == kVec && aligned(param + i0, 16) && aligned(grad + i0, 16) &&
                            aligned(args.state1 + i0, kVec) && (!kTwoMoments || aligned(args.state2 + i0, kVec));

        alignas(16) S p_in[kVec];
        alignas(16) S g_in[kVec];
        alignas(kVec) uint8_t c1[kVec];
        alignas(kVec) uint8_t c2[kVec];
        if (vector) {
            *reinterpret_cast<uint4*>(p_in) = *reinterpret_cast<const uint4*>(param + i0);
            *reinterpret_cast<uint4*>(g_in) = __ldg(reinterpret_cast<const uint4*>(grad + i0));
            *reinterpret_cast<Word*>(c1) = *reinterpret_cast<const Word*>(args.state1 + i0);
            if constexpr (kTwoMoments) *reinterpret_cast<Word*>(c2) = *reinterpret_cast<const Word*>(args.state2 + i0);
        } else {
#pragma unroll
            for (int j = 0; j < kVec; ++j) {
                if (j < count) {
                    p_in[j] = param[i0 + j];
                    g_in[j] = grad[i0 + j];
                    c1[j] = args.state1[i0 + j];
                    if constexpr (kTwoMoments) c2[j] = args.state2[i0 + j];
                }
            }
        }

        const float scale1 = args.absmax1[b];
        const float scale2 = kTwoMoments ? args.absmax2[b] : 0.f;
        float m[kVec], v[kVec];
        alignas(16) S p_out[kVec];
        float amax1 = 0.f, amax2 = 0.f;
#pragma unroll
        for (int j = 0; j < kVec; ++j) {
            if (j < count) {
                float p = to_float(p_in[j]);
                m[j] = dequantize(table1, c1[j], scale1);
                if constexpr (kTwoMoments) {
                    v[j] = dequantize(table2, c2[j], scale2);
                    adam_update(to_float(g_in[j]), p, m[j], v[j], h, Kind == kAdam);
                    amax2 = fmaxf(amax2, v[j]);
                } else {
                    lion_update(to_float(g_in[j]), p, m[j], h);
                }
                amax1 = fmaxf(amax1, fabsf(m[j]));
                p_out[j] = from_float<S, Stochastic>(p, args.rng_key, static_cast<uint64_t>(i0 + j));
            }
        }
        if (vector) {
            *reinterpret_cast<uint4*>(param + i0) = *reinterpret_cast<const uint4*>(p_out);
        } else {
#pragma unroll
            for (int j = 0; j < kVec; ++j) {
                if (j < count) param[i0 + j] = p_out[j];
            }
        }

        block_max2(amax1, amax2, scratch);
        const float inverse1 = inverse_scale(amax1), inverse2 = inverse_scale(amax2);
#pragma unroll
        for (int j = 0; j < kVec; ++j) {
            if (j < count) {
                c1[j] = quantize(table1, normalize(m[j], inverse1), true);
                if constexpr (kTwoMoments) c2[j] = quantize(table2, normalize(v[j], inverse2), false);
            }
        }
        if (vector) {
            *reinterpret_cast<Word*>(args.state1 + i0) = *reinterpret_cast<const Word*>(c1);
            if constexpr (kTwoMoments) *reinterpret_cast<Word*>(args.state2 + i0) = *reinterpret_cast<const Word*>(c2);
        } else {
#pragma unroll
            for (int j = 0; j < kVec; ++j) {
                if (j < count) {
                    args.state1[i0 + j] = c1[j];
                    if constexpr (kTwoMoments) args.state2[i0 + j] = c2[j];
                }
            }
        }
        if (threadIdx.x == 0) {
            args.absmax1[b] = amax1;
            if constexpr (kTwoMoments) args.absmax2[b] = amax2;
        }
        __syncthreads();  // the reduction scratch is reused by the next block
    }
}

template <typename S, int Kind>
cudaError_t launch(const StepArgs& args, cudaStream_t stream) {
    constexpr int kVec = 16 / sizeof(S);
    const int threads = max(kWarp, args.block_size / kVec);
    const int64_t blocks = (args.n + args.block_size - 1) / args.block_size;
    const int grid = static_cast<int>(blocks < args.max_grid ? blocks : args.max_grid);
    if constexpr (std::is_same_v<S, Bf16Bits>) {
        if (args.stochastic_rounding) {
            optim8bit_kernel<S, Kind, true><<<grid, threads, 0, stream>>>(args);
            return cudaGetLastError();
        }
    }
    optim8bit_kernel<S, Kind, false><<<grid, threads, 0, stream>>>(args);
    return cudaGetLastError();
}

template <typename S>
cudaError_t launch_kind(const StepArgs& args, cudaStream_t stream) {
    switch (args.kind) {
        case kAdamW:
            return launch<S, kAdamW>(args, stream);
        case kAdam:
            return launch<S, kAdam>(args, stream);
        default:
            return launch<S, kLion>(args, stream);
    }
}

}  // namespace

cudaError_t optim8bit_step_launch(const StepArgs& args, cudaStream_t stream) {
    if (args.n == 0) return cudaSuccess;
    switch (args.param_type) {
        case kFloat32:
            return launch_kind<float>(args, stream);
        case kBFloat16:
            return launch_kind<Bf16Bits>(args, stream);
        default:
            return launch_kind<__half>(args, stream);
    }
}

}  // namespace optim8bit
}  // namespace fastlm
