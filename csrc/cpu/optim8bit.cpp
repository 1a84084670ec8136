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

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

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
    const int32_t* lut;
};

#if defined(__AVX512F__)
// ---- 16 lanes at a time (AVX-512) --------------------------------------------------------
// The same rule, operation for operation (one IEEE-rounded vector op per scalar op, no FMA), so
// the results are the scalar path's bits. Written out by hand for the table lookups, which the
// auto-vectorized loop turns into gathers (emulated with scalar loads under GCC's AMD tunings):
// a lookup costs about a cycle per lane either way. The 256-entry code fits 16 registers, so
// dequantizing is 8 two-register permutes and 7 blends per 16 lanes; the 26 KB quantize table
// does not, and stays one hardware gather per 16 lanes, the costliest step that is left.
namespace simd {

// Everything one block's update reads and writes, and the task's fp32 scratch for the new
// moments (requantized once the block's absmax is known).
template <typename T>
struct Block {
    T* param;
    const T* grad;
    uint8_t* q1;
    uint8_t* q2;
    float* m;
    float* v;
    float scale1, scale2;
    int64_t index;  // flat index of the block's first element (keys stochastic rounding)
};

struct Code256 {
    __m512 r[16];
    explicit Code256(const float* code) {
        for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(code + 16 * i);
    }
    // code[idx] per lane, idx in [0, 256): bits 0-4 pick within a 32-entry pair of registers,
    // bits 5-7 pick the pair.
    __m512 operator()(__m512i idx) const {
        __m512 p[8];
        for (int i = 0; i < 8; ++i) p[i] = _mm512_permutex2var_ps(r[2 * i], idx, r[2 * i + 1]);
        const __mmask16 b5 = _mm512_test_epi32_mask(idx, _mm512_set1_epi32(32));
        const __mmask16 b6 = _mm512_test_epi32_mask(idx, _mm512_set1_epi32(64));
        const __mmask16 b7 = _mm512_test_epi32_mask(idx, _mm512_set1_epi32(128));
        for (int i = 0; i < 4; ++i) p[i] = _mm512_mask_blend_ps(b5, p[2 * i], p[2 * i + 1]);
        for (int i = 0; i < 2; ++i) p[i] = _mm512_mask_blend_ps(b6, p[2 * i], p[2 * i + 1]);
        return _mm512_mask_blend_ps(b7, p[0], p[1]);
    }
};

inline __m512 dequantize(const Code256& code, const uint8_t* q, __m512 absmax) {
    const __m512i idx = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q)));
    return _mm512_mul_ps(code(idx), absmax);
}

// rule::quantize_lut on 16 lanes.
inline __m128i quantize_lut(const int32_t* lut, __m512 x) {
    const __m512i bits = _mm512_castps_si512(x);
    const __m512i negative = _mm512_srai_epi32(bits, 31);  // all ones in negative lanes
    __m512i key = _mm512_srli_epi32(_mm512_and_si512(bits, _mm512_set1_epi32(0x7fffffff)), 16);
    key = _mm512_min_epu32(_mm512_max_epu32(key, _mm512_set1_epi32(rule::kLutKeyLo)),
                           _mm512_set1_epi32(rule::kLutKeyHi));
    const __m512i slot = _mm512_add_epi32(_mm512_sub_epi32(key, _mm512_set1_epi32(rule::kLutKeyLo)),
                                          _mm512_and_si512(negative, _mm512_set1_epi32(rule::kLutKeys)));
    const __m512i entry = _mm512_i32gather_epi32(slot, lut, 4);
    const __m512i low_mask = _mm512_set1_epi32(rule::kLutLowMask);
    const __m512i low = _mm512_and_si512(_mm512_xor_si512(bits, negative), low_mask);
    const __mmask16 above = _mm512_cmpgt_epu32_mask(low, _mm512_and_si512(entry, low_mask));
    const __m512i below = _mm512_srli_epi32(entry, 16);
    return _mm512_cvtepi32_epi8(_mm512_mask_add_epi32(below, above, below, _mm512_set1_epi32(1)));
}

inline __m512 load(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load(const c10::BFloat16* p) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline __m512 load(const c10::Half* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

inline __m512i fmix32(__m512i h) {
    h = _mm512_xor_si512(h, _mm512_srli_epi32(h, 16));
    h = _mm512_mullo_epi32(h, _mm512_set1_epi32(static_cast<int>(0x85ebca6bu)));
    h = _mm512_xor_si512(h, _mm512_srli_epi32(h, 13));
    h = _mm512_mullo_epi32(h, _mm512_set1_epi32(static_cast<int>(0xc2b2ae35u)));
    return _mm512_xor_si512(h, _mm512_srli_epi32(h, 16));
}

// rule::bf16_round_nearest and rule::bf16_round_stochastic (with rule::rng_bits of elements
// index .. index + 15) on 16 lanes.
template <bool Stochastic>
inline __m256i round_bf16(__m512 x, uint32_t key, int64_t index) {
    const __m512i u = _mm512_castps_si512(x);
    const __m512i one = _mm512_set1_epi32(1);
    const __m512i nearest_bits = _mm512_add_epi32(
        _mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), _mm512_and_si512(_mm512_srli_epi32(u, 16), one));
    const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)),
                                                  _mm512_set1_epi32(0x7f800000));
    __m512i r = _mm512_mask_mov_epi32(_mm512_srli_epi32(nearest_bits, 16), nan, _mm512_set1_epi32(0x7fc0));
    if constexpr (Stochastic) {
        // 16 consecutive indices from a multiple of 16 share their high 32 bits.
        const uint32_t high = rule::fmix32(static_cast<uint32_t>(static_cast<uint64_t>(index) >> 32));
        const __m512i lanes = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(index))),
                                               _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
        const __m512i folded = _mm512_xor_si512(lanes, _mm512_set1_epi32(static_cast<int>(high)));
        const __m512i random = fmix32(_mm512_add_epi32(
            _mm512_mullo_epi32(folded, _mm512_set1_epi32(static_cast<int>(0x9e3779b1u))),
            _mm512_set1_epi32(static_cast<int>(key))));
        const __m512i exp_mask = _mm512_set1_epi32(0x7f800000);
        const __mmask16 finite = _mm512_cmpneq_epi32_mask(_mm512_and_si512(u, exp_mask), exp_mask);
        const __m512i stochastic = _mm512_srli_epi32(
            _mm512_add_epi32(u, _mm512_and_si512(random, _mm512_set1_epi32(0xffff))), 16);
        r = _mm512_mask_mov_epi32(r, finite, stochastic);
    }
    return _mm512_cvtepi32_epi16(r);
}

template <bool Stochastic>
inline void store(float* p, __m512 x, uint32_t, int64_t) { _mm512_storeu_ps(p, x); }
template <bool Stochastic>
inline void store(c10::BFloat16* p, __m512 x, uint32_t key, int64_t index) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), round_bf16<Stochastic>(x, key, index));
}
// Round to nearest even, as c10::Half's conversion (NaN payloads aside).
template <bool Stochastic>
inline void store(c10::Half* p, __m512 x, uint32_t, int64_t) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                        _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

// The broadcast scalars of rule::Hyper.
struct Hyper {
    __m512 beta1, one_minus_beta1, beta2, one_minus_beta2, eps, step_size, inv_bias_correction2_sqrt, decay, l2;
    explicit Hyper(const rule::Hyper& h)
        : beta1(_mm512_set1_ps(h.beta1)),
          one_minus_beta1(_mm512_set1_ps(h.one_minus_beta1)),
          beta2(_mm512_set1_ps(h.beta2)),
          one_minus_beta2(_mm512_set1_ps(h.one_minus_beta2)),
          eps(_mm512_set1_ps(h.eps)),
          step_size(_mm512_set1_ps(h.step_size)),
          inv_bias_correction2_sqrt(_mm512_set1_ps(h.inv_bias_correction2_sqrt)),
          decay(_mm512_set1_ps(h.decay)),
          l2(_mm512_set1_ps(h.l2)) {}
};

// The update of elements [0, len16) of a block (len16 a multiple of 16): rule::adam_update or
// rule::lion_update, operation for operation; the running absmax of the new moments in am1/am2.
template <typename T, int Kind, bool Stochastic>
inline void update(const Block<T>& blk, int64_t len16, const Code256& code1, const Code256* code2, const Hyper& h,
                   uint32_t key, __m512& am1, __m512& am2) {
    const __m512 s1 = _mm512_set1_ps(blk.scale1);
    const __m512 s2 = _mm512_set1_ps(blk.scale2);
    const __m512 abs_mask = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));
    for (int64_t i = 0; i < len16; i += 16) {
        __m512 g = load(blk.grad + i);
        __m512 p = load(blk.param + i);
        __m512 m = dequantize(code1, blk.q1 + i, s1);
        if constexpr (Kind == rule::kLion) {
            const __m512 c = _mm512_add_ps(_mm512_mul_ps(h.beta1, m), _mm512_mul_ps(h.one_minus_beta1, g));
            const __m512 zero = _mm512_setzero_ps();
            __m512 sign = _mm512_mask_mov_ps(zero, _mm512_cmp_ps_mask(c, zero, _CMP_GT_OQ), _mm512_set1_ps(1.f));
            sign = _mm512_mask_mov_ps(sign, _mm512_cmp_ps_mask(c, zero, _CMP_LT_OQ), _mm512_set1_ps(-1.f));
            p = _mm512_sub_ps(_mm512_mul_ps(p, h.decay), _mm512_mul_ps(h.step_size, sign));
            m = _mm512_add_ps(_mm512_mul_ps(h.beta2, m), _mm512_mul_ps(h.one_minus_beta2, g));
        } else {
            __m512 v = dequantize(*code2, blk.q2 + i, s2);
            if constexpr (Kind == rule::kAdam) g = _mm512_add_ps(g, _mm512_mul_ps(h.l2, p));
            m = _mm512_add_ps(_mm512_mul_ps(h.beta1, m), _mm512_mul_ps(h.one_minus_beta1, g));
            v = _mm512_add_ps(_mm512_mul_ps(h.beta2, v), _mm512_mul_ps(_mm512_mul_ps(h.one_minus_beta2, g), g));
            const __m512 denom =
                _mm512_add_ps(_mm512_mul_ps(_mm512_sqrt_ps(v), h.inv_bias_correction2_sqrt), h.eps);
            p = _mm512_sub_ps(_mm512_mul_ps(p, h.decay), _mm512_div_ps(_mm512_mul_ps(h.step_size, m), denom));
            _mm512_storeu_ps(blk.v + i, v);
            am2 = _mm512_max_ps(am2, v);
        }
        _mm512_storeu_ps(blk.m + i, m);
        am1 = _mm512_max_ps(am1, _mm512_and_ps(m, abs_mask));
        store<Stochastic>(blk.param + i, p, key, blk.index + i);
    }
}

// q[i] = quantize_lut(x[i] / scale) for i in [0, len16).
inline void requantize(const int32_t* lut, const float* x, float scale, uint8_t* q, int64_t len16) {
    const __m512 s = _mm512_set1_ps(scale);
    for (int64_t i = 0; i < len16; i += 16) {
        _mm_storeu_si128(reinterpret_cast<__m128i*>(q + i), quantize_lut(lut, _mm512_div_ps(_mm512_loadu_ps(x + i), s)));
    }
}

}  // namespace simd
#endif

// Per block: dequantize, update each element in fp32 (parameter written at once, new moments
// kept in fp32 scratch), take the new moments' absmax, then requantize against it. With
// AVX-512 the first len16 elements of a block go 16 at a time (simd::), the rest here.
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
        const int32_t* const lut1 = t1.lut;
        const float* const code2 = t2.code;
        const int32_t* const lut2 = t2.lut;
#if defined(__AVX512F__)
        const simd::Code256 vcode1(code1);
        const simd::Code256 vcode2(kTwoMoments ? code2 : code1);
        const simd::Hyper vh(hp);
        constexpr int64_t kLanes = 16;
#else
        constexpr int64_t kLanes = 1;
#endif
        for (int64_t b = begin; b < end; ++b) {
            const int64_t off = b * block_size;
            const int64_t len = std::min(block_size, n - off);
            const int64_t len16 = kLanes > 1 ? len / kLanes * kLanes : 0;
            const float scale1 = absmax1[b];
            const float scale2 = kTwoMoments ? absmax2[b] : 0.f;
            float amax1 = 0.f, amax2 = 0.f;
#if defined(__AVX512F__)
            const simd::Block<T> blk{param + off, grad + off, q1 + off, q2 + off, sm, sv, scale1, scale2, off};
            __m512 am1 = _mm512_setzero_ps(), am2 = _mm512_setzero_ps();
            simd::update<T, Kind, Stochastic>(blk, len16, vcode1, &vcode2, vh, key, am1, am2);
            amax1 = _mm512_reduce_max_ps(am1);
            if constexpr (kTwoMoments) amax2 = _mm512_reduce_max_ps(am2);
#endif
#pragma omp simd reduction(max : amax1, amax2)
            for (int64_t i = len16; i < len; ++i) {
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
#if defined(__AVX512F__)
            simd::requantize(lut1, sm, div1, q1 + off, len16);
#endif
#pragma omp simd
            for (int64_t i = len16; i < len; ++i) {
                q1[off + i] = rule::quantize_lut(lut1, rule::normalize(sm[i], div1));
            }
            if constexpr (kTwoMoments) {
                absmax2[b] = amax2;
                const float div2 = rule::safe_scale(amax2);
#if defined(__AVX512F__)
                simd::requantize(lut2, sv, div2, q2 + off, len16);
#endif
#pragma omp simd
                for (int64_t i = len16; i < len; ++i) {
                    q2[off + i] = rule::quantize_lut(lut2, rule::normalize(sv[i], div2));
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
    return Tables{values.data_ptr<float>(), lut.data_ptr<int32_t>()};
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
    Tables t2{nullptr, nullptr};
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
