#include "cpu/optim8bit.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <vector>

// The rule must round every fp32 operation once, as its PyTorch reference does: no fused
// multiply-adds invented by the compiler in this file (GCC fuses by default in C++ mode).
// (The update loop also needs -fno-math-errno, in CPU_CFLAGS: an errno-setting sqrt is a
// branch that blocks vectorization, and GCC ignores that option in a pragma.)
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

#include "common/optim8bit_rule.h"

namespace {

namespace rule = fastlm::optim8bit;

// Quantization blocks per at::parallel_for task: enough work to amortize the scheduling.
constexpr int64_t kGrainBytes = 1 << 16;

inline float load(float x) { return x; }
inline float load(c10::BFloat16 x) { return rule::bf16_to_float(x.x); }
inline float load(c10::Half x) { return static_cast<float>(x); }

template <typename T, bool Stochastic>
inline T store(float x, uint32_t key, int64_t index) {
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
        const uint16_t bits = Stochastic ? rule::bf16_round_stochastic(x, rule::rng_bits(key, index))
                                         : rule::bf16_round_nearest(x);
        return c10::BFloat16(bits, c10::BFloat16::from_bits());
    } else {
        return static_cast<T>(x);
    }
}

struct Tables {
    const float* code;
    const float* mid;
    const int32_t* lut;
};

// Per block: dequantize, update each element in fp32 (parameter written at once, new moments
// kept in fp32 scratch), take the new moments' absmax, then requantize against it.
template <typename T, int Kind, bool Stochastic>
void step_kernel(T* param_ptr, const T* grad_ptr, uint8_t* q1_ptr, float* absmax1, uint8_t* q2_ptr, float* absmax2,
                 Tables t1, Tables t2, int64_t n, int64_t block_size, rule::Hyper h, uint32_t key) {
    constexpr bool kTwoMoments = Kind != rule::kLion;
    const int64_t blocks = (n + block_size - 1) / block_size;
    const int64_t grain = std::max<int64_t>(1, kGrainBytes / block_size);
    at::parallel_for(0, blocks, grain, [&](int64_t begin, int64_t end) {
        std::vector<float> m_new(block_size), v_new(kTwoMoments ? block_size : 0);
        // Local copies of everything the loops read: a uint8 store may alias any captured
        // variable, and a pointer reloaded on every iteration blocks vectorization.
        T* const param = param_ptr;
        const T* const grad = grad_ptr;
        uint8_t* const q1 = q1_ptr;
        uint8_t* const q2 = q2_ptr;
        const rule::Hyper hp = h;
        float* const sm = m_new.data();
        float* const sv = v_new.data();
        const float* const code1 = t1.code;
        const float* const mid1 = t1.mid;
        const int32_t* const lut1 = t1.lut;
        const float* const code2 = t2.code;
        const float* const mid2 = t2.mid;
        const int32_t* const lut2 = t2.lut;
        for (int64_t b = begin; b < end; ++b) {
            const int64_t off = b * block_size;
            const int64_t len = std::min(block_size, n - off);
            const float scale1 = absmax1[b];
            const float scale2 = kTwoMoments ? absmax2[b] : 0.f;
            float amax1 = 0.f, amax2 = 0.f;
#pragma omp simd reduction(max : amax1, amax2)
            for (int64_t i = 0; i < len; ++i) {
                const float g = load(grad[off + i]);
                float p = load(param[off + i]);
                float m = rule::dequantize(code1, q1[off + i], scale1);
                if constexpr (kTwoMoments) {
                    float v = rule::dequantize(code2, q2[off + i], scale2);
                    rule::adam_update(g, p, m, v, hp, Kind == rule::kAdam);
                    sv[i] = v;
                    amax2 = std::max(amax2, v);
                } else {
                    rule::lion_update(g, p, m, hp);
                }
                sm[i] = m;
                amax1 = std::max(amax1, __builtin_fabsf(m));
                param[off + i] = store<T, Stochastic>(p, key, off + i);
            }
            absmax1[b] = amax1;
            const float div1 = rule::safe_scale(amax1);
#pragma omp simd
            for (int64_t i = 0; i < len; ++i) {
                q1[off + i] = rule::quantize_lut(lut1, mid1, rule::normalize(sm[i], div1));
            }
            if constexpr (kTwoMoments) {
                absmax2[b] = amax2;
                const float div2 = rule::safe_scale(amax2);
#pragma omp simd
                for (int64_t i = 0; i < len; ++i) {
                    q2[off + i] = rule::quantize_lut(lut2, mid2, rule::normalize(sv[i], div2));
                }
            }
        }
    });
}

Tables tables_of(const at::Tensor& values, const at::Tensor& lut, const char* name) {
    TORCH_CHECK(values.dtype() == at::kFloat && values.is_contiguous() &&
                    values.numel() == rule::kCodeSize + rule::kMidPadded,
                name, ": expected the contiguous fp32 code table of ", rule::kCodeSize + rule::kMidPadded,
                " values, got ", values.dtype(), " of ", values.numel());
    TORCH_CHECK(lut.dtype() == at::kInt && lut.is_contiguous() && lut.numel() == rule::kLutSize, name,
                ": expected the contiguous int32 lookup table of ", rule::kLutSize, " entries, got ", lut.dtype(),
                " of ", lut.numel());
    TORCH_CHECK(values.device().is_cpu() && lut.device().is_cpu(), name, ": code tables must be on the CPU");
    const float* code = values.data_ptr<float>();
    return Tables{code, code + rule::kCodeSize, lut.data_ptr<int32_t>()};
}

void check_state(const at::Tensor& state, const at::Tensor& absmax, int64_t n, int64_t blocks, const char* name) {
    TORCH_CHECK(state.device().is_cpu() && state.dtype() == at::kByte && state.is_contiguous() && state.numel() == n,
                name, ": expected a contiguous uint8 CPU tensor of ", n, " elements, got ", state.dtype(), " of ",
                state.numel(), " on ", state.device());
    TORCH_CHECK(absmax.device().is_cpu() && absmax.dtype() == at::kFloat && absmax.is_contiguous() &&
                    absmax.numel() == blocks,
                name, " absmax: expected a contiguous fp32 CPU tensor of ", blocks, " elements, got ",
                absmax.dtype(), " of ", absmax.numel(), " on ", absmax.device());
}

template <typename T, int Kind>
void dispatch_rounding(at::Tensor& param, const at::Tensor& grad, uint8_t* q1, float* a1, uint8_t* q2, float* a2,
                       Tables t1, Tables t2, int64_t block_size, const rule::Hyper& h, uint32_t key,
                       bool stochastic) {
    T* p = reinterpret_cast<T*>(param.data_ptr());
    const T* g = reinterpret_cast<const T*>(grad.data_ptr());
    const int64_t n = param.numel();
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
        if (stochastic) {
            step_kernel<T, Kind, true>(p, g, q1, a1, q2, a2, t1, t2, n, block_size, h, key);
            return;
        }
    }
    step_kernel<T, Kind, false>(p, g, q1, a1, q2, a2, t1, t2, n, block_size, h, key);
}

template <typename T>
void dispatch_kind(int64_t kind, at::Tensor& param, const at::Tensor& grad, uint8_t* q1, float* a1, uint8_t* q2,
                   float* a2, Tables t1, Tables t2, int64_t block_size, const rule::Hyper& h, uint32_t key,
                   bool stochastic) {
    switch (kind) {
        case rule::kAdamW:
            return dispatch_rounding<T, rule::kAdamW>(param, grad, q1, a1, q2, a2, t1, t2, block_size, h, key,
                                                      stochastic);
        case rule::kAdam:
            return dispatch_rounding<T, rule::kAdam>(param, grad, q1, a1, q2, a2, t1, t2, block_size, h, key,
                                                     stochastic);
        default:
            return dispatch_rounding<T, rule::kLion>(param, grad, q1, a1, q2, a2, t1, t2, block_size, h, key,
                                                     stochastic);
    }
}

}  // namespace

void optim8bit_step_cpu(int64_t kind, at::Tensor& param, const at::Tensor& grad, at::Tensor& state1,
                        at::Tensor& absmax1, std::optional<at::Tensor> state2, std::optional<at::Tensor> absmax2,
                        const at::Tensor& tables1, const at::Tensor& lut1, const std::optional<at::Tensor>& tables2,
                        const std::optional<at::Tensor>& lut2, int64_t block_size, const std::vector<double>& hyper,
                        int64_t seed, int64_t step, bool stochastic_rounding) {
    TORCH_CHECK(kind == rule::kAdamW || kind == rule::kAdam || kind == rule::kLion,
                "kind: expected 0 (AdamW), 1 (Adam) or 2 (Lion), got ", kind);
    TORCH_CHECK(block_size > 0 && (block_size & (block_size - 1)) == 0,
                "block_size: expected a power of two, got ", block_size);
    TORCH_CHECK(param.device().is_cpu() && param.is_contiguous(), "param: expected a contiguous CPU tensor, got ",
                param.device(), param.is_contiguous() ? "" : " (non-contiguous)");
    const auto dtype = param.scalar_type();
    TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
                "param: expected float32, bfloat16 or float16, got ", dtype);
    TORCH_CHECK(grad.device().is_cpu() && grad.is_contiguous() && grad.scalar_type() == dtype &&
                    grad.numel() == param.numel(),
                "grad: expected a contiguous CPU ", dtype, " tensor of ", param.numel(), " elements, got ",
                grad.scalar_type(), " of ", grad.numel(), " on ", grad.device());
    TORCH_CHECK(hyper.size() == 9, "hyper: expected the 9 scalars of Hyper, got ", hyper.size());
    const int64_t n = param.numel();
    const int64_t blocks = (n + block_size - 1) / block_size;
    check_state(state1, absmax1, n, blocks, "state1");
    const Tables t1 = tables_of(tables1, lut1, "tables1");
    Tables t2{nullptr, nullptr, nullptr};
    uint8_t* q2 = nullptr;
    float* a2 = nullptr;
    if (kind != rule::kLion) {
        TORCH_CHECK(state2 && absmax2 && tables2 && lut2, "Adam/AdamW need state2, absmax2, tables2 and lut2");
        check_state(*state2, *absmax2, n, blocks, "state2");
        t2 = tables_of(*tables2, *lut2, "tables2");
        q2 = state2->data_ptr<uint8_t>();
        a2 = absmax2->data_ptr<float>();
    }
    const rule::Hyper h{static_cast<float>(hyper[0]), static_cast<float>(hyper[1]), static_cast<float>(hyper[2]),
                        static_cast<float>(hyper[3]), static_cast<float>(hyper[4]), static_cast<float>(hyper[5]),
                        static_cast<float>(hyper[6]), static_cast<float>(hyper[7]), static_cast<float>(hyper[8])};
    const uint32_t key = rule::rng_key(static_cast<uint32_t>(seed), static_cast<uint32_t>(step));
    uint8_t* q1 = state1.data_ptr<uint8_t>();
    float* a1 = absmax1.data_ptr<float>();
    if (n == 0) return;
    switch (dtype) {
        case at::kFloat:
            return dispatch_kind<float>(kind, param, grad, q1, a1, q2, a2, t1, t2, block_size, h, key,
                                        stochastic_rounding);
        case at::kBFloat16:
            return dispatch_kind<c10::BFloat16>(kind, param, grad, q1, a1, q2, a2, t1, t2, block_size, h, key,
                                                stochastic_rounding);
        default:
            return dispatch_kind<c10::Half>(kind, param, grad, q1, a1, q2, a2, t1, t2, block_size, h, key,
                                            stochastic_rounding);
    }
}
