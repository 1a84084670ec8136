#include "cpu/optim8bit.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <string>
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
// The largest block step_kernel pipelines (two scratch buffers of both moments: 16 KB).
constexpr int64_t kPipelinedBlockSize = 1024;

// What a vector path's update of one block reads and writes: the block's slices of the tensors
// and the task's fp32 scratch for its new moments (requantized once the block's absmax is known).
template <typename T>
struct Block {
    T* param;
    const T* grad;
    const uint8_t* q1;
    const uint8_t* q2;
    float* m;
    float* v;
    float scale1, scale2;
    int64_t index;  // flat index of the block's first element (keys stochastic rounding)
};

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

// A code path's interface (step_kernel runs one): State, built once per task from the code
// tables and the hyper-parameters; update(), which updates a block's first elements and returns
// how many (the rule does the rest); requantize<Signed>() (the first moment's signed code, the
// second's unsigned), which quantizes a block's first elements and returns how many. The generic
// path leaves every element to the rule, which the compiler vectorizes as it can.
struct GenericPath {
    struct State {
        State(const float*, const float*, const rule::Hyper&) {}
    };
    template <typename T, int Kind, bool Stochastic>
    static int64_t update(const State&, const Block<T>&, int64_t, uint32_t, float&, float&) {
        return 0;
    }
    template <bool Signed>
    static int64_t requantize(const State&, const float*, float, uint8_t*, int64_t) {
        return 0;
    }
};

// ---- the vector paths ----------------------------------------------------------------------
// With GCC on x86-64 both are always compiled, each for the instruction sets it needs (a target
// pragma where the build's -march lacks them), and the processor picks at run time (cpu_paths):
// so a machine tests every path it can run, not only the one its -march selects. A path whose
// instructions -march already enables compiles without the pragma, into the same code as
// before. Other compilers build only the paths their -march enables.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FASTLM_OPTIM8BIT_X86 1
#include <cpuid.h>
#include <immintrin.h>
#endif
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__AVX512VL__) && \
    defined(__AVX512VBMI__)
#define FASTLM_OPTIM8BIT_AVX512 1
#elif defined(FASTLM_OPTIM8BIT_X86) && !defined(__clang__)
#define FASTLM_OPTIM8BIT_AVX512 1
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx512vbmi")
#define FASTLM_OPTIM8BIT_AVX512_PRAGMA 1
#endif

#if defined(FASTLM_OPTIM8BIT_AVX512)
// ---- 16 lanes at a time (AVX-512 F/BW/DQ/VL/VBMI) ------------------------------------------
// The same rule, operation for operation (one IEEE-rounded vector op per scalar op, no FMA), so
// the results are the scalar path's bits. Written out by hand for the table lookups, which the
// auto-vectorized loop turns into gathers (slow on AMD Zen 4: ~30 cycles per 16 lanes). Both
// lookups stay in registers instead: dequantizing reads the 256 code values as four byte
// planes with byte permutes (64 codes per vpermt2b pair), quantizing evaluates the rule's
// closed form with 16- and 32-entry permutes.
namespace avx512 {

inline __mmask16 lanes16(int64_t count) {
    return count >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << count) - 1);
}

// The dword order that undoes (or, applied to codes, prepares for) the in-lane interleaving of
// 4 registers by unpack or pack instructions: a 4x4 transpose of 128-bit lanes' dwords.
inline __m512i lane_transpose() {
    return _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
}

// table[q] for 64 codes: byte k of every code value is looked up in plane k (256 bytes, four
// registers, two 128-entry vpermt2b and a blend on the index's top bit), and the four planes
// are interleaved back into fp32 lanes. The unpacks interleave within 128-bit lanes, so the
// codes are first permuted (a 4x4 transpose of dwords) for the results to come out in order.
struct CodePlanes {
    __m512i plane[4][4];
    explicit CodePlanes(const float* table) {
        alignas(64) uint8_t bytes[4][rule::kCodeSize];
        for (int i = 0; i < rule::kCodeSize; ++i) {
            const uint32_t u = rule::float_bits(table[i]);
            for (int k = 0; k < 4; ++k) bytes[k][i] = static_cast<uint8_t>(u >> (8 * k));
        }
        for (int k = 0; k < 4; ++k) {
            for (int j = 0; j < 4; ++j) plane[k][j] = _mm512_load_si512(bytes[k] + 64 * j);
        }
    }
    // out[j] = table[q[16 j + l]] for lane l; codes past `count` read as 0 (never past memory).
    void operator()(const uint8_t* q, int64_t count, __m512 out[4]) const {
        __m512i idx = count >= 64 ? _mm512_loadu_si512(q)
                                  : _mm512_maskz_loadu_epi8((~0ull) >> (64 - count), q);
        idx = _mm512_permutexvar_epi32(lane_transpose(), idx);
        const __mmask64 high = _mm512_movepi8_mask(idx);
        __m512i p[4];
        for (int k = 0; k < 4; ++k) {
            p[k] = _mm512_mask_blend_epi8(high, _mm512_permutex2var_epi8(plane[k][0], idx, plane[k][1]),
                                          _mm512_permutex2var_epi8(plane[k][2], idx, plane[k][3]));
        }
        const __m512i lo01 = _mm512_unpacklo_epi8(p[0], p[1]), hi01 = _mm512_unpackhi_epi8(p[0], p[1]);
        const __m512i lo23 = _mm512_unpacklo_epi8(p[2], p[3]), hi23 = _mm512_unpackhi_epi8(p[2], p[3]);
        out[0] = _mm512_castsi512_ps(_mm512_unpacklo_epi16(lo01, lo23));
        out[1] = _mm512_castsi512_ps(_mm512_unpackhi_epi16(lo01, lo23));
        out[2] = _mm512_castsi512_ps(_mm512_unpacklo_epi16(hi01, hi23));
        out[3] = _mm512_castsi512_ps(_mm512_unpackhi_epi16(hi01, hi23));
    }
};

// rule::quantize on 16 lanes, the tables in seven registers. index() leaves the signed code's
// mirror index unclamped (-1 for the largest negative magnitudes): the caller clamps it to 0.
struct Quantizer {
    __m512 threshold_lo, threshold_hi, scale, offset, top;
    __m512i segment_lo, segment_hi;
    explicit Quantizer(const float* table)
        : threshold_lo(_mm512_loadu_ps(table + rule::kTableThreshold)),
          threshold_hi(_mm512_loadu_ps(table + rule::kTableThreshold + 16)),
          scale(_mm512_loadu_ps(table + rule::kTableScale)),
          offset(_mm512_loadu_ps(table + rule::kTableOffset)),
          top(_mm512_loadu_ps(table + rule::kTableTop)),
          segment_lo(_mm512_cvttps_epi32(_mm512_loadu_ps(table + rule::kTableSegment))),
          segment_hi(_mm512_cvttps_epi32(_mm512_loadu_ps(table + rule::kTableSegment + 16))) {}
    template <bool Signed>
    __m512i index(__m512 x) const {
        const __m512i bits = _mm512_castps_si512(x);
        __m512i magnitude = Signed ? _mm512_and_si512(bits, _mm512_set1_epi32(0x7fffffff)) : bits;
        magnitude = _mm512_min_epi32(_mm512_max_epi32(magnitude, _mm512_set1_epi32(rule::kMagLoBits)),
                                     _mm512_set1_epi32(rule::kMagHiBits));
        const __m512i octave = _mm512_srli_epi32(magnitude, 23);  // the permutes read its low 5 bits
        const __m512 xa = _mm512_castsi512_ps(magnitude);
        __m512i segment = _mm512_permutex2var_epi32(segment_lo, octave, segment_hi);
        const __mmask16 above =
            _mm512_cmp_ps_mask(xa, _mm512_permutex2var_ps(threshold_lo, octave, threshold_hi), _CMP_GT_OQ);
        segment = _mm512_mask_add_epi32(segment, above, segment, _mm512_set1_epi32(1));
        const __m512 y = _mm512_add_ps(_mm512_mul_ps(xa, _mm512_permutexvar_ps(segment, scale)),
                                       _mm512_permutexvar_ps(segment, offset));
        __m512i k = _mm512_cvttps_epi32(_mm512_min_ps(y, _mm512_permutexvar_ps(segment, top)));
        if constexpr (Signed) k = _mm512_mask_sub_epi32(k, _mm512_movepi32_mask(bits), _mm512_set1_epi32(254), k);
        return k;
    }
};

inline __m512 load(const float* p, __mmask16 k) { return _mm512_maskz_loadu_ps(k, p); }
inline __m512 load(const c10::BFloat16* p, __mmask16 k) {
    const __m256i h = _mm256_maskz_loadu_epi16(k, p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline __m512 load(const c10::Half* p, __mmask16 k) { return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, p)); }

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
inline void store(float* p, __mmask16 k, __m512 x, uint32_t, int64_t) { _mm512_mask_storeu_ps(p, k, x); }
template <bool Stochastic>
inline void store(c10::BFloat16* p, __mmask16 k, __m512 x, uint32_t key, int64_t index) {
    _mm256_mask_storeu_epi16(p, k, round_bf16<Stochastic>(x, key, index));
}
// Round to nearest even, as c10::Half's conversion (NaN payloads aside).
template <bool Stochastic>
inline void store(c10::Half* p, __mmask16 k, __m512 x, uint32_t, int64_t) {
    _mm256_mask_storeu_epi16(p, k, _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
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

// The update of a block's `len` elements, 64 codes at a time (the last group masked): the
// rule's adam_update or lion_update, operation for operation; the new moments go to the
// block's scratch, their running absmax to am1/am2 (masked lanes excluded).
template <typename T, int Kind, bool Stochastic>
inline void update(const Block<T>& blk, int64_t len, const CodePlanes& code1, const CodePlanes& code2,
                   const Hyper& h, uint32_t key, __m512& am1, __m512& am2) {
    const __m512 s1 = _mm512_set1_ps(blk.scale1);
    const __m512 s2 = _mm512_set1_ps(blk.scale2);
    const __m512 abs_mask = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));
    for (int64_t i0 = 0; i0 < len; i0 += 64) {
        const int64_t count = std::min<int64_t>(64, len - i0);
        __m512 m_codes[4], v_codes[4];
        code1(blk.q1 + i0, count, m_codes);
        if constexpr (Kind != rule::kLion) code2(blk.q2 + i0, count, v_codes);
        for (int j = 0; j < 4 && 16 * j < count; ++j) {
            const int64_t i = i0 + 16 * j;
            const __mmask16 k = lanes16(count - 16 * j);
            __m512 g = load(blk.grad + i, k);
            __m512 p = load(blk.param + i, k);
            __m512 m = _mm512_mul_ps(m_codes[j], s1);
            if constexpr (Kind == rule::kLion) {
                const __m512 c = _mm512_add_ps(_mm512_mul_ps(h.beta1, m), _mm512_mul_ps(h.one_minus_beta1, g));
                const __m512 zero = _mm512_setzero_ps();
                __m512 sign = _mm512_mask_mov_ps(zero, _mm512_cmp_ps_mask(c, zero, _CMP_GT_OQ), _mm512_set1_ps(1.f));
                sign = _mm512_mask_mov_ps(sign, _mm512_cmp_ps_mask(c, zero, _CMP_LT_OQ), _mm512_set1_ps(-1.f));
                p = _mm512_sub_ps(_mm512_mul_ps(p, h.decay), _mm512_mul_ps(h.step_size, sign));
                m = _mm512_add_ps(_mm512_mul_ps(h.beta2, m), _mm512_mul_ps(h.one_minus_beta2, g));
            } else {
                __m512 v = _mm512_mul_ps(v_codes[j], s2);
                if constexpr (Kind == rule::kAdam) g = _mm512_add_ps(g, _mm512_mul_ps(h.l2, p));
                m = _mm512_add_ps(_mm512_mul_ps(h.beta1, m), _mm512_mul_ps(h.one_minus_beta1, g));
                v = _mm512_add_ps(_mm512_mul_ps(h.beta2, v), _mm512_mul_ps(_mm512_mul_ps(h.one_minus_beta2, g), g));
                const __m512 denom =
                    _mm512_add_ps(_mm512_mul_ps(_mm512_sqrt_ps(v), h.inv_bias_correction2_sqrt), h.eps);
                p = _mm512_sub_ps(_mm512_mul_ps(p, h.decay), _mm512_div_ps(_mm512_mul_ps(h.step_size, m), denom));
                _mm512_store_ps(blk.v + i, v);
                am2 = _mm512_mask_max_ps(am2, k, am2, v);
            }
            _mm512_store_ps(blk.m + i, m);
            am1 = _mm512_mask_max_ps(am1, k, am1, _mm512_and_ps(m, abs_mask));
            store<Stochastic>(blk.param + i, k, p, key, blk.index + i);
        }
    }
}

// q[i] = quantize(x[i] * inverse) for i in [0, len): 64 at a time, packed to bytes by two
// saturating packs (which also clamp the signed code's mirror index -1 to 0), then 16 at a time.
template <bool Signed>
inline void requantize(const Quantizer& quantize, const float* x, float inverse, uint8_t* q, int64_t len) {
    const __m512 s = _mm512_set1_ps(inverse);
    int64_t i = 0;
    for (; i + 64 <= len; i += 64) {
        __m512i k[4];
        for (int j = 0; j < 4; ++j) {
            k[j] = quantize.template index<Signed>(_mm512_mul_ps(_mm512_load_ps(x + i + 16 * j), s));
        }
        const __m512i bytes = _mm512_packus_epi16(_mm512_packus_epi32(k[0], k[1]), _mm512_packus_epi32(k[2], k[3]));
        _mm512_storeu_si512(q + i, _mm512_permutexvar_epi32(lane_transpose(), bytes));
    }
    for (; i < len; i += 16) {
        __m512i k = quantize.template index<Signed>(_mm512_mul_ps(_mm512_load_ps(x + i), s));
        if constexpr (Signed) k = _mm512_max_epi32(k, _mm512_setzero_si512());
        const __m128i codes = _mm512_cvtepi32_epi8(k);
        if (len - i >= 16) {
            _mm_storeu_si128(reinterpret_cast<__m128i*>(q + i), codes);
        } else {
            _mm_mask_storeu_epi8(q + i, lanes16(len - i), codes);
        }
    }
}

struct Path {
    struct State {
        CodePlanes code1, code2;
        Quantizer quantize1, quantize2;
        Hyper h;
        State(const float* table1, const float* table2, const rule::Hyper& hyper)
            : code1(table1), code2(table2), quantize1(table1), quantize2(table2), h(hyper) {}
    };
    template <typename T, int Kind, bool Stochastic>
    static int64_t update(const State& s, const Block<T>& blk, int64_t len, uint32_t key, float& amax1,
                          float& amax2) {
        __m512 am1 = _mm512_setzero_ps(), am2 = _mm512_setzero_ps();
        avx512::update<T, Kind, Stochastic>(blk, len, s.code1, s.code2, s.h, key, am1, am2);
        amax1 = _mm512_reduce_max_ps(am1);
        if constexpr (Kind != rule::kLion) amax2 = _mm512_reduce_max_ps(am2);
        return len;
    }
    template <bool Signed>
    static int64_t requantize(const State& s, const float* x, float inverse, uint8_t* q, int64_t len) {
        avx512::requantize<Signed>(Signed ? s.quantize1 : s.quantize2, x, inverse, q, len);
        return len;
    }
};

}  // namespace avx512
#endif
#if defined(FASTLM_OPTIM8BIT_AVX512_PRAGMA)
#pragma GCC pop_options
#endif

#if defined(__AVX2__) && defined(__F16C__)
#define FASTLM_OPTIM8BIT_AVX2 1
#elif defined(FASTLM_OPTIM8BIT_X86) && !defined(__clang__)
#define FASTLM_OPTIM8BIT_AVX2 1
#pragma GCC push_options
#pragma GCC target("avx2,f16c")
#define FASTLM_OPTIM8BIT_AVX2_PRAGMA 1
#endif

#if defined(FASTLM_OPTIM8BIT_AVX2)
// ---- 8 lanes at a time (AVX2 + F16C: Zen 2/3, Intel before AVX-512) ----------------------
// The same rule, operation for operation, so the results are the scalar path's bits (the
// scalar rule also finishes a block whose length is not a multiple of 8). Without AVX-512's
// byte permutes, dequantizing reads the 256-entry code table (L1-resident) with scalar loads;
// quantizing reads the closed form's small tables with byte shuffles and 8-entry permutes.
// Before this path the loops ran through the scalar rule here: ~10 ns per parameter.
namespace avx2 {

// table[q[0..7]], one scalar load per code. A gather (vgatherdps) takes many more micro-ops for
// the same 8 loads on AMD processors: with two per 8 elements the kernel took 1.6x as long, built
// for Zen 3 and run on a Zen 4 (benchmarks/results/cpu-2026-12-03-zen4/optim_avx2_lookup.txt).
inline __m256 lookup(const float* table, const uint8_t* q) {
    const __m128 lo = _mm_setr_ps(table[q[0]], table[q[1]], table[q[2]], table[q[3]]);
    const __m128 hi = _mm_setr_ps(table[q[4]], table[q[5]], table[q[6]], table[q[7]]);
    return _mm256_insertf128_ps(_mm256_castps128_ps256(lo), hi, 1);
}

// rule::quantize on 8 lanes, in fewer table reads than the rule makes (table_of checks the
// tables allow it):
// * the octave's bottom segment (0-8) is a byte: two in-lane byte shuffles of 16-entry tables
//   read it for octave slots 0-15 and 16-31 (each zeroes the lanes the other serves);
// * |x| lies above its octave's boundary exactly when it lies above its bottom segment's upper
//   boundary (the next segment's start), which is in the octave if the octave has a boundary
//   and above it otherwise: one 8-entry permute per segment instead of a 32-entry lookup;
// * segments 1-7 take one permute each for scale and offset; segments 0 ("zero") and 8 ("one")
//   have scale 0 and share slot 0, which holds segment 8's offset: min(trunc(that offset), top)
//   is then the rule's index for both, the segment's top read by a byte shuffle of a 16-entry
//   table. Segment 9, from segment 8 (|x| = 1) above slot 0's boundary, reads segment 1's slot,
//   whose y at 1 lies above segment 8's top;
// * trunc(min(y, top)) is min(trunc(y), top) for an integer top.
// The byte tables give the segment's upper three bytes bit 7, so the segment is the top
// shuffle's control as it is (the permutes read its low 3 bits). index() leaves the signed
// code's mirror index unclamped (-1 for the largest negative magnitudes): the caller clamps it.
struct Quantizer {
    __m256i bottom_lo, bottom_hi;  // the bottom segment of octave slots 0-15 and 16-31, in both lanes
    __m256 upper_boundary, scale, offset;  // by segment mod 8
    __m256i top;  // by segment 0-9, in both lanes
    explicit Quantizer(const float* table) {
        alignas(32) uint8_t bottom[2][32] = {};
        alignas(32) uint8_t tops[32] = {};
        alignas(32) float upper[8] = {}, scales[8], offsets[8];
        // Slot 0 (biased exponent 96 or 128) never occurs after the clamp: the shuffle reads it for
        // the index's upper three bytes only, and sets their bit 7.
        bottom[0][0] = bottom[0][16] = 0x80;
        for (int o = 1; o < 32; ++o) {
            const int segment = static_cast<int>(table[rule::kTableSegment + o]);
            bottom[o >> 4][o & 15] = bottom[o >> 4][16 + (o & 15)] = static_cast<uint8_t>(segment);
            const float boundary = table[rule::kTableThreshold + o];
            if (std::isfinite(boundary)) upper[segment] = boundary;
        }
        for (int s = 0; s < 10; ++s) {
            tops[s] = tops[16 + s] = static_cast<uint8_t>(table[rule::kTableTop + (s < 9 ? s : 8)]);
        }
        for (int s = 0; s < 8; ++s) {
            scales[s] = table[rule::kTableScale + (s ? s : 8)];
            offsets[s] = table[rule::kTableOffset + (s ? s : 8)];
        }
        bottom_lo = _mm256_load_si256(reinterpret_cast<const __m256i*>(bottom[0]));
        bottom_hi = _mm256_load_si256(reinterpret_cast<const __m256i*>(bottom[1]));
        upper_boundary = _mm256_load_ps(upper);
        scale = _mm256_load_ps(scales);
        offset = _mm256_load_ps(offsets);
        top = _mm256_load_si256(reinterpret_cast<const __m256i*>(tops));
    }
    template <bool Signed>
    __m256i index(__m256 x) const {
        const __m256i bits = _mm256_castps_si256(x);
        __m256i magnitude = Signed ? _mm256_and_si256(bits, _mm256_set1_epi32(0x7fffffff)) : bits;
        magnitude = _mm256_min_epi32(_mm256_max_epi32(magnitude, _mm256_set1_epi32(rule::kMagLoBits)),
                                     _mm256_set1_epi32(rule::kMagHiBits));
        // The biased exponent (103-127, slot + 96) in each lane's low byte, the upper three 0. A shuffle
        // reads an index's low 4 bits and zeroes the byte where its bit 7 is set: exponent + 16
        // (saturating) reads slots 0-15 and zeroes the exponents from 112, exponent - 112 reads slots
        // 16-31 and zeroes those below (an upper byte reads slot 0 of the first and nothing of the second).
        const __m256i exponent = _mm256_srli_epi32(magnitude, 23);
        const __m256i bottom =
            _mm256_or_si256(_mm256_shuffle_epi8(bottom_lo, _mm256_adds_epu8(exponent, _mm256_set1_epi8(16))),
                            _mm256_shuffle_epi8(bottom_hi, _mm256_sub_epi8(exponent, _mm256_set1_epi8(112))));
        const __m256 xa = _mm256_castsi256_ps(magnitude);
        const __m256 above = _mm256_cmp_ps(xa, _mm256_permutevar8x32_ps(upper_boundary, bottom), _CMP_GT_OQ);
        const __m256i segment = _mm256_sub_epi32(bottom, _mm256_castps_si256(above));  // above: all ones, -1
        const __m256 y = _mm256_add_ps(_mm256_mul_ps(xa, _mm256_permutevar8x32_ps(scale, segment)),
                                       _mm256_permutevar8x32_ps(offset, segment));
        __m256i k = _mm256_min_epi32(_mm256_cvttps_epi32(y), _mm256_shuffle_epi8(top, segment));
        if constexpr (Signed) {
            const __m256i negative = _mm256_srai_epi32(bits, 31);
            k = _mm256_blendv_epi8(k, _mm256_sub_epi32(_mm256_set1_epi32(254), k), negative);
        }
        return k;
    }
};

inline __m256 load(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load(const c10::BFloat16* p) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline __m256 load(const c10::Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }

inline __m256i fmix32(__m256i h) {
    h = _mm256_xor_si256(h, _mm256_srli_epi32(h, 16));
    h = _mm256_mullo_epi32(h, _mm256_set1_epi32(static_cast<int>(0x85ebca6bu)));
    h = _mm256_xor_si256(h, _mm256_srli_epi32(h, 13));
    h = _mm256_mullo_epi32(h, _mm256_set1_epi32(static_cast<int>(0xc2b2ae35u)));
    return _mm256_xor_si256(h, _mm256_srli_epi32(h, 16));
}

// rule::bf16_round_nearest and rule::bf16_round_stochastic (with rule::rng_bits of elements
// index .. index + 7, index a multiple of 8) on 8 lanes, as 8 uint16 bit patterns.
template <bool Stochastic>
inline __m128i round_bf16(__m256 x, uint32_t key, int64_t index) {
    const __m256i u = _mm256_castps_si256(x);
    const __m256i nearest_bits = _mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)),
                                                  _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1)));
    // |u| as bits is non-negative, so the signed compare is the rule's unsigned one.
    const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff)),
                                           _mm256_set1_epi32(0x7f800000));
    __m256i r = _mm256_blendv_epi8(_mm256_srli_epi32(nearest_bits, 16), _mm256_set1_epi32(0x7fc0), nan);
    if constexpr (Stochastic) {
        // 8 consecutive indices from a multiple of 8 share their high 32 bits.
        const uint32_t high = rule::fmix32(static_cast<uint32_t>(static_cast<uint64_t>(index) >> 32));
        const __m256i lanes = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(index))),
                                               _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
        const __m256i folded = _mm256_xor_si256(lanes, _mm256_set1_epi32(static_cast<int>(high)));
        const __m256i random = fmix32(_mm256_add_epi32(
            _mm256_mullo_epi32(folded, _mm256_set1_epi32(static_cast<int>(0x9e3779b1u))),
            _mm256_set1_epi32(static_cast<int>(key))));
        const __m256i exp_mask = _mm256_set1_epi32(0x7f800000);
        const __m256i non_finite = _mm256_cmpeq_epi32(_mm256_and_si256(u, exp_mask), exp_mask);
        const __m256i stochastic = _mm256_srli_epi32(
            _mm256_add_epi32(u, _mm256_and_si256(random, _mm256_set1_epi32(0xffff))), 16);
        r = _mm256_blendv_epi8(stochastic, r, non_finite);
    }
    // Every lane is below 2^16: the saturating pack is exact.
    return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
}

template <bool Stochastic>
inline void store(float* p, __m256 x, uint32_t, int64_t) { _mm256_storeu_ps(p, x); }
template <bool Stochastic>
inline void store(c10::BFloat16* p, __m256 x, uint32_t key, int64_t index) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), round_bf16<Stochastic>(x, key, index));
}
// Round to nearest even, as c10::Half's conversion (NaN payloads aside).
template <bool Stochastic>
inline void store(c10::Half* p, __m256 x, uint32_t, int64_t) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

// The broadcast scalars of rule::Hyper.
struct Hyper {
    __m256 beta1, one_minus_beta1, beta2, one_minus_beta2, eps, step_size, inv_bias_correction2_sqrt, decay, l2;
    explicit Hyper(const rule::Hyper& h)
        : beta1(_mm256_set1_ps(h.beta1)),
          one_minus_beta1(_mm256_set1_ps(h.one_minus_beta1)),
          beta2(_mm256_set1_ps(h.beta2)),
          one_minus_beta2(_mm256_set1_ps(h.one_minus_beta2)),
          eps(_mm256_set1_ps(h.eps)),
          step_size(_mm256_set1_ps(h.step_size)),
          inv_bias_correction2_sqrt(_mm256_set1_ps(h.inv_bias_correction2_sqrt)),
          decay(_mm256_set1_ps(h.decay)),
          l2(_mm256_set1_ps(h.l2)) {}
};

// The largest value of 8 lanes (none NaN).
inline float lane_max(__m256 x) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}

// The update of a block's first (len & ~7) elements, 8 at a time: the rule's adam_update or
// lion_update, operation for operation; the new moments go to the block's scratch, the
// absmax of those elements to amax1/amax2. Returns how many elements it updated.
template <typename T, int Kind, bool Stochastic>
inline int64_t update(const Block<T>& blk, int64_t len, const float* table1, const float* table2, const Hyper& h,
                      uint32_t key, float& amax1, float& amax2) {
    const __m256 s1 = _mm256_set1_ps(blk.scale1);
    const __m256 s2 = _mm256_set1_ps(blk.scale2);
    const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    const __m256 zero = _mm256_setzero_ps();
    // max(x, am) keeps am when x is NaN, as the rule's std::max(am, x) does.
    __m256 am1 = zero, am2 = zero;
    const int64_t vectorized = len & ~int64_t{7};
    for (int64_t i = 0; i < vectorized; i += 8) {
        __m256 g = load(blk.grad + i);
        __m256 p = load(blk.param + i);
        __m256 m = _mm256_mul_ps(lookup(table1, blk.q1 + i), s1);
        if constexpr (Kind == rule::kLion) {
            const __m256 c = _mm256_add_ps(_mm256_mul_ps(h.beta1, m), _mm256_mul_ps(h.one_minus_beta1, g));
            const __m256 sign = _mm256_or_ps(_mm256_and_ps(_mm256_cmp_ps(c, zero, _CMP_GT_OQ), _mm256_set1_ps(1.f)),
                                             _mm256_and_ps(_mm256_cmp_ps(c, zero, _CMP_LT_OQ), _mm256_set1_ps(-1.f)));
            p = _mm256_sub_ps(_mm256_mul_ps(p, h.decay), _mm256_mul_ps(h.step_size, sign));
            m = _mm256_add_ps(_mm256_mul_ps(h.beta2, m), _mm256_mul_ps(h.one_minus_beta2, g));
        } else {
            __m256 v = _mm256_mul_ps(lookup(table2, blk.q2 + i), s2);
            if constexpr (Kind == rule::kAdam) g = _mm256_add_ps(g, _mm256_mul_ps(h.l2, p));
            m = _mm256_add_ps(_mm256_mul_ps(h.beta1, m), _mm256_mul_ps(h.one_minus_beta1, g));
            v = _mm256_add_ps(_mm256_mul_ps(h.beta2, v), _mm256_mul_ps(_mm256_mul_ps(h.one_minus_beta2, g), g));
            const __m256 denom = _mm256_add_ps(_mm256_mul_ps(_mm256_sqrt_ps(v), h.inv_bias_correction2_sqrt), h.eps);
            p = _mm256_sub_ps(_mm256_mul_ps(p, h.decay), _mm256_div_ps(_mm256_mul_ps(h.step_size, m), denom));
            _mm256_store_ps(blk.v + i, v);
            am2 = _mm256_max_ps(v, am2);
        }
        _mm256_store_ps(blk.m + i, m);
        am1 = _mm256_max_ps(_mm256_and_ps(m, abs_mask), am1);
        store<Stochastic>(blk.param + i, p, key, blk.index + i);
    }
    amax1 = lane_max(am1);
    if constexpr (Kind != rule::kLion) amax2 = lane_max(am2);
    return vectorized;
}

// q[i] = quantize(x[i] * inverse) for the first (len & ~7) elements: 32 at a time, packed to
// bytes by two saturating packs (which also clamp the signed code's mirror index -1 to 0),
// then 8 at a time. Returns how many elements it quantized.
template <bool Signed>
inline int64_t requantize(const Quantizer& quantize, const float* x, float inverse, uint8_t* q, int64_t len) {
    const __m256 s = _mm256_set1_ps(inverse);
    // The packs interleave 128-bit lanes: this dword order puts the 32 codes back in order.
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    int64_t i = 0;
    for (; i + 32 <= len; i += 32) {
        __m256i k[4];
        for (int j = 0; j < 4; ++j) {
            k[j] = quantize.template index<Signed>(_mm256_mul_ps(_mm256_loadu_ps(x + i + 8 * j), s));
        }
        const __m256i bytes =
            _mm256_packus_epi16(_mm256_packus_epi32(k[0], k[1]), _mm256_packus_epi32(k[2], k[3]));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + i), _mm256_permutevar8x32_epi32(bytes, order));
    }
    for (; i + 8 <= len; i += 8) {
        const __m256i k = quantize.template index<Signed>(_mm256_mul_ps(_mm256_loadu_ps(x + i), s));
        const __m256i w = _mm256_packus_epi32(k, k);  // lane 0: codes 0-3 twice; lane 1: codes 4-7 twice
        const __m256i bytes = _mm256_permutevar8x32_epi32(_mm256_packus_epi16(w, w), order);
        _mm_storel_epi64(reinterpret_cast<__m128i*>(q + i), _mm256_castsi256_si128(bytes));
    }
    return i;
}

struct Path {
    struct State {
        const float* table1;
        const float* table2;
        Quantizer quantize1, quantize2;
        Hyper h;
        State(const float* t1, const float* t2, const rule::Hyper& hyper)
            : table1(t1), table2(t2), quantize1(t1), quantize2(t2), h(hyper) {}
    };
    template <typename T, int Kind, bool Stochastic>
    static int64_t update(const State& s, const Block<T>& blk, int64_t len, uint32_t key, float& amax1,
                          float& amax2) {
        return avx2::update<T, Kind, Stochastic>(blk, len, s.table1, s.table2, s.h, key, amax1, amax2);
    }
    template <bool Signed>
    static int64_t requantize(const State& s, const float* x, float inverse, uint8_t* q, int64_t len) {
        return avx2::requantize<Signed>(Signed ? s.quantize1 : s.quantize2, x, inverse, q, len);
    }
};

}  // namespace avx2
#endif
#if defined(FASTLM_OPTIM8BIT_AVX2_PRAGMA)
#pragma GCC pop_options
#endif

// The code paths: what cpu_paths() names and dispatch_path() runs.
enum class CpuPath { kAvx512, kAvx2, kGeneric };

#if defined(FASTLM_OPTIM8BIT_AVX2)
bool cpu_has_f16c() {
    unsigned int eax, ebx, ecx, edx;
    return __get_cpuid(1, &eax, &ebx, &ecx, &edx) && (ecx & bit_F16C);
}
#endif

// The paths this build holds and this processor runs, fastest first (the first is the default).
const std::vector<std::pair<std::string, CpuPath>>& cpu_paths() {
    static const std::vector<std::pair<std::string, CpuPath>> paths = [] {
        std::vector<std::pair<std::string, CpuPath>> found;
#if defined(FASTLM_OPTIM8BIT_X86)
        __builtin_cpu_init();
#endif
#if defined(FASTLM_OPTIM8BIT_AVX512)
        if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
            __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
            __builtin_cpu_supports("avx512vbmi")) {
            found.emplace_back("avx512", CpuPath::kAvx512);
        }
#endif
#if defined(FASTLM_OPTIM8BIT_AVX2)
        if (__builtin_cpu_supports("avx2") && cpu_has_f16c()) found.emplace_back("avx2", CpuPath::kAvx2);
#endif
        found.emplace_back("generic", CpuPath::kGeneric);
        return found;
    }();
    return paths;
}

// Per block: dequantize, update each element in fp32 (parameter written at once, new moments
// kept in fp32 scratch on the stack, L1-resident), take the new moments' absmax, then
// requantize against it: two passes over the scratch. Block b is requantized after block
// b + 1's update (two scratch buffers), so the absmax reduction and reciprocal that separate
// b's passes overlap independent work instead of draining the pipeline once per block (at
// block_size 256 that stall cost about a sixth of the step); blocks above kPipelinedBlockSize
// amortize it and use one buffer, whose scratch then still fits L1. Path (above) takes a block 16
// lanes at a time (avx512::), 8 at a time (avx2::, the rule finishing a length that is not a
// multiple of 8), or leaves it to the rule (GenericPath).
template <typename Path, typename T, int Kind, bool Stochastic>
void step_kernel(T* param_ptr, const T* grad_ptr, uint8_t* q1_ptr, float* absmax1, uint8_t* q2_ptr, float* absmax2,
                 const float* table1_ptr, const float* table2_ptr, int64_t n, int64_t block_size, rule::Hyper h,
                 uint32_t key) {
    constexpr bool kTwoMoments = Kind != rule::kLion;
    const int64_t blocks = (n + block_size - 1) / block_size;
    const int64_t grain = std::max<int64_t>(1, kGrainBytes / block_size);
    at::parallel_for(0, blocks, grain, [&](int64_t begin, int64_t end) {
        // [buffer][moment][element]
        alignas(64) float scratch[2][kTwoMoments ? 2 : 1][rule::kMaxBlockSize];
        // Local copies of everything the loops read: a uint8 store may alias any captured
        // variable, and a pointer reloaded on every iteration blocks vectorization.
        T* const param = param_ptr;
        const T* const grad = grad_ptr;
        uint8_t* const q1 = q1_ptr;
        uint8_t* const q2 = q2_ptr;
        const rule::Hyper hp = h;
        const float* const table1 = table1_ptr;
        const float* const table2 = kTwoMoments ? table2_ptr : table1_ptr;
        const typename Path::State state(table1, table2, hp);
        const auto length = [&](int64_t b) { return std::min(block_size, n - b * block_size); };
        const auto update = [&](int64_t b, float* sm, float* sv) {
            const int64_t off = b * block_size;
            const int64_t len = length(b);
            const float scale1 = absmax1[b];
            const float scale2 = kTwoMoments ? absmax2[b] : 0.f;
            float amax1 = 0.f, amax2 = 0.f;
            const Block<T> blk{param + off, grad + off, q1 + off, q2 + off, sm, sv, scale1, scale2, off};
            // The elements the path updated; the rule does the rest.
            const int64_t vectorized =
                Path::template update<T, Kind, Stochastic>(state, blk, len, key, amax1, amax2);
#pragma omp simd reduction(max : amax1, amax2)
            for (int64_t i = vectorized; i < len; ++i) {
                const float g = load(grad[off + i]);
                float p = load(param[off + i]);
                float m = rule::dequantize(table1, q1[off + i], scale1);
                if constexpr (kTwoMoments) {
                    float v = rule::dequantize(table2, q2[off + i], scale2);
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
            if constexpr (kTwoMoments) absmax2[b] = amax2;
        };
        // Reads the block's new absmax, written by update().
        const auto requantize = [&](int64_t b, const float* sm, const float* sv) {
            const int64_t off = b * block_size;
            const int64_t len = length(b);
            const float inverse1 = rule::inverse_scale(absmax1[b]);
            const float inverse2 = kTwoMoments ? rule::inverse_scale(absmax2[b]) : 0.f;
            // The elements the path quantized; the rule does the rest.
            const int64_t vectorized1 = Path::template requantize<true>(state, sm, inverse1, q1 + off, len);
            int64_t vectorized2 = 0;
            if constexpr (kTwoMoments) {
                vectorized2 = Path::template requantize<false>(state, sv, inverse2, q2 + off, len);
            }
            for (int64_t i = vectorized1; i < len; ++i) {
                q1[off + i] = rule::quantize(table1, rule::normalize(sm[i], inverse1), true);
            }
            if constexpr (kTwoMoments) {
                for (int64_t i = vectorized2; i < len; ++i) {
                    q2[off + i] = rule::quantize(table2, rule::normalize(sv[i], inverse2), false);
                }
            }
        };
        if (block_size > kPipelinedBlockSize) {
            for (int64_t b = begin; b < end; ++b) {
                update(b, scratch[0][0], scratch[0][kTwoMoments ? 1 : 0]);
                requantize(b, scratch[0][0], scratch[0][kTwoMoments ? 1 : 0]);
            }
            return;
        }
        for (int64_t b = begin; b <= end; ++b) {
            if (b < end) update(b, scratch[b & 1][0], scratch[b & 1][kTwoMoments ? 1 : 0]);
            if (b > begin) requantize(b - 1, scratch[(b - 1) & 1][0], scratch[(b - 1) & 1][kTwoMoments ? 1 : 0]);
        }
    });
}

const float* table_of(const at::Tensor& table, const char* name) {
    TORCH_CHECK(table.device().is_cpu() && table.dtype() == at::kFloat && table.is_contiguous() &&
                    table.numel() == rule::kTableSize,
                name, ": expected the contiguous fp32 CPU code table of ", rule::kTableSize, " values, got ",
                table.dtype(), " of ", table.numel(), " on ", table.device());
    const float* t = table.data_ptr<float>();
    // What avx2::Quantizer relies on (fastlm/optim/_code.py builds tables that way): a segment
    // 0-8 per octave, below 8 where the octave holds a boundary; one boundary per bottom segment
    // (the segment's upper one); an octave without a boundary lying wholly below its bottom
    // segment's upper boundary (checked for slots 7-31, the biased exponents 103-127 of the clamp);
    // tops that are indices; segments 0 ("zero") and 8 ("one") of scale 0, whose indices the
    // quantizer reads from segment 8's offset; segment 1's y at 1 reaching segment 8's index.
    float upper[8] = {};
    bool seen[8] = {};
    for (int o = 0; o < 32; ++o) {
        const float segment = t[rule::kTableSegment + o];
        const float boundary = t[rule::kTableThreshold + o];
        const bool finite = std::isfinite(boundary);
        TORCH_CHECK(segment >= 0.f && segment <= (finite ? 7.f : 8.f) && segment == std::floor(segment) &&
                        (!finite || boundary > 0.f),
                    name, ": octave ", o, " has segment ", segment, " and boundary ", boundary,
                    ", which the quantizer's tables never hold");
        if (!finite) continue;
        const int s = static_cast<int>(segment);
        TORCH_CHECK(!seen[s] || upper[s] == boundary, name, ": segment ", s, " has two upper boundaries, ", upper[s],
                    " and ", boundary);
        upper[s] = boundary;
        seen[s] = true;
    }
    for (int o = 7; o < 32; ++o) {
        const int s = static_cast<int>(t[rule::kTableSegment + o]);
        const float octave_top = rule::bits_float(static_cast<uint32_t>(o + 97) << 23);
        TORCH_CHECK(s == 8 || std::isfinite(t[rule::kTableThreshold + o]) || (seen[s] && upper[s] >= octave_top),
                    name, ": octave ", o, " has no boundary but its segment ", s, "'s upper boundary (",
                    seen[s] ? std::to_string(upper[s]) : std::string("none"), ") lies below the octave's top ",
                    octave_top);
    }
    // Per segment: a top that is an index, and y = |x| * scale + offset in [0, 2^31) for |x| <= 1 (the
    // AVX2 quantizer truncates y before taking the min with the top).
    for (int s = 0; s < 9; ++s) {
        const float top = t[rule::kTableTop + s], scale = t[rule::kTableScale + s], offset = t[rule::kTableOffset + s];
        TORCH_CHECK(top >= 0.f && top <= 255.f && top == std::floor(top), name, ": segment ", s, "'s top ", top,
                    " is not an index 0-255");
        TORCH_CHECK(scale >= 0.f && offset >= 0.f && scale + offset < 2147483648.f, name, ": segment ", s,
                    " has scale ", scale, " and offset ", offset, ", which the quantizers never hold");
    }
    for (int s : {0, 8}) {
        TORCH_CHECK(t[rule::kTableScale + s] == 0.f, name, ": segment ", s, " must have scale 0, got ",
                    t[rule::kTableScale + s]);
    }
    // The index of y in segment s as rule::quantize takes it, and as the AVX2 quantizer does.
    const auto index = [&](float y, int s) { return std::trunc(std::min(y, t[rule::kTableTop + s])); };
    const auto avx2_index = [&](float y, int s) { return std::min(std::trunc(y), t[rule::kTableTop + s]); };
    const float offset8 = t[rule::kTableOffset + 8];
    TORCH_CHECK(avx2_index(offset8, 0) == index(t[rule::kTableOffset], 0), name,
                ": segment 0's index must be the one of its top from segment 8's offset ", offset8);
    const float y1 = t[rule::kTableScale + 1] + t[rule::kTableOffset + 1];  // segment 1's y at 1 (1 * scale: exact)
    TORCH_CHECK(avx2_index(y1, 8) == index(offset8, 8), name, ": segment 1's y at 1 (", y1,
                ") must reach segment 8's index ", index(offset8, 8));
    return t;
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

template <typename T, int Kind, bool Stochastic>
void dispatch_path(CpuPath path, T* p, const T* g, uint8_t* q1, float* a1, uint8_t* q2, float* a2, const float* t1,
                   const float* t2, int64_t n, int64_t block_size, const rule::Hyper& h, uint32_t key) {
    switch (path) {
#if defined(FASTLM_OPTIM8BIT_AVX512)
        case CpuPath::kAvx512:
            return step_kernel<avx512::Path, T, Kind, Stochastic>(p, g, q1, a1, q2, a2, t1, t2, n, block_size, h, key);
#endif
#if defined(FASTLM_OPTIM8BIT_AVX2)
        case CpuPath::kAvx2:
            return step_kernel<avx2::Path, T, Kind, Stochastic>(p, g, q1, a1, q2, a2, t1, t2, n, block_size, h, key);
#endif
        default:
            return step_kernel<GenericPath, T, Kind, Stochastic>(p, g, q1, a1, q2, a2, t1, t2, n, block_size, h, key);
    }
}

template <typename T, int Kind>
void dispatch_rounding(CpuPath path, at::Tensor& param, const at::Tensor& grad, uint8_t* q1, float* a1, uint8_t* q2,
                       float* a2, const float* t1, const float* t2, int64_t block_size, const rule::Hyper& h,
                       uint32_t key, bool stochastic) {
    T* p = reinterpret_cast<T*>(param.data_ptr());
    const T* g = reinterpret_cast<const T*>(grad.data_ptr());
    const int64_t n = param.numel();
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
        if (stochastic) {
            dispatch_path<T, Kind, true>(path, p, g, q1, a1, q2, a2, t1, t2, n, block_size, h, key);
            return;
        }
    }
    dispatch_path<T, Kind, false>(path, p, g, q1, a1, q2, a2, t1, t2, n, block_size, h, key);
}

template <typename T>
void dispatch_kind(int64_t kind, CpuPath path, at::Tensor& param, const at::Tensor& grad, uint8_t* q1, float* a1,
                   uint8_t* q2, float* a2, const float* t1, const float* t2, int64_t block_size, const rule::Hyper& h,
                   uint32_t key, bool stochastic) {
    switch (kind) {
        case rule::kAdamW:
            return dispatch_rounding<T, rule::kAdamW>(path, param, grad, q1, a1, q2, a2, t1, t2, block_size, h, key,
                                                      stochastic);
        case rule::kAdam:
            return dispatch_rounding<T, rule::kAdam>(path, param, grad, q1, a1, q2, a2, t1, t2, block_size, h, key,
                                                     stochastic);
        default:
            return dispatch_rounding<T, rule::kLion>(path, param, grad, q1, a1, q2, a2, t1, t2, block_size, h, key,
                                                     stochastic);
    }
}

// The path named `name` ("" for the default), checked against cpu_paths().
CpuPath path_named(const std::string& name) {
    const auto& paths = cpu_paths();
    if (name.empty()) return paths.front().second;
    const auto found = std::find_if(paths.begin(), paths.end(), [&](const auto& entry) { return entry.first == name; });
    if (found == paths.end()) {
        std::string names;
        for (const auto& entry : paths) names += (names.empty() ? "" : ", ") + entry.first;
        TORCH_CHECK(false, "path: expected one of the paths this CPU runs (", names, "), got '", name, "'");
    }
    return found->second;
}

}  // namespace

void optim8bit_step_cpu(int64_t kind, at::Tensor& param, const at::Tensor& grad, at::Tensor& state1,
                        at::Tensor& absmax1, std::optional<at::Tensor> state2, std::optional<at::Tensor> absmax2,
                        const at::Tensor& tables1, const std::optional<at::Tensor>& tables2, int64_t block_size,
                        const std::vector<double>& hyper,
                        int64_t seed, int64_t step, bool stochastic_rounding, const std::string& path) {
    TORCH_CHECK(kind == rule::kAdamW || kind == rule::kAdam || kind == rule::kLion,
                "kind: expected 0 (AdamW), 1 (Adam) or 2 (Lion), got ", kind);
    TORCH_CHECK(block_size >= 16 && block_size <= rule::kMaxBlockSize && (block_size & (block_size - 1)) == 0,
                "block_size: expected a power of two in [16, ", rule::kMaxBlockSize, "], got ", block_size);
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
    const float* t1 = table_of(tables1, "tables1");
    const float* t2 = nullptr;
    uint8_t* q2 = nullptr;
    float* a2 = nullptr;
    if (kind != rule::kLion) {
        TORCH_CHECK(state2 && absmax2 && tables2, "Adam/AdamW need state2, absmax2 and tables2");
        check_state(*state2, *absmax2, n, blocks, "state2");
        t2 = table_of(*tables2, "tables2");
        q2 = state2->data_ptr<uint8_t>();
        a2 = absmax2->data_ptr<float>();
    }
    const rule::Hyper h{static_cast<float>(hyper[0]), static_cast<float>(hyper[1]), static_cast<float>(hyper[2]),
                        static_cast<float>(hyper[3]), static_cast<float>(hyper[4]), static_cast<float>(hyper[5]),
                        static_cast<float>(hyper[6]), static_cast<float>(hyper[7]), static_cast<float>(hyper[8])};
    const uint32_t key = rule::rng_key(static_cast<uint32_t>(seed), static_cast<uint32_t>(step));
    const CpuPath cpu_path = path_named(path);
    uint8_t* q1 = state1.data_ptr<uint8_t>();
    float* a1 = absmax1.data_ptr<float>();
    if (n == 0) return;
    switch (dtype) {
        case at::kFloat:
            return dispatch_kind<float>(kind, cpu_path, param, grad, q1, a1, q2, a2, t1, t2, block_size, h, key,
                                        stochastic_rounding);
        case at::kBFloat16:
            return dispatch_kind<c10::BFloat16>(kind, cpu_path, param, grad, q1, a1, q2, a2, t1, t2, block_size, h, key,
                                                stochastic_rounding);
        default:
            return dispatch_kind<c10::Half>(kind, cpu_path, param, grad, q1, a1, q2, a2, t1, t2, block_size, h, key,
                                            stochastic_rounding);
    }
}

std::vector<std::string> optim8bit_paths_cpu() {
    std::vector<std::string> names;
    for (const auto& entry : cpu_paths()) names.push_back(entry.first);
    return names;
}
