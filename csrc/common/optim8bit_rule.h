// The update rule of fastlm's block-wise 8-bit optimizers (AdamW, Adam, Lion), shared by the
// CPU kernel (g++) and the CUDA kernel (nvcc), so the two cannot drift. The pure-PyTorch
// reference in fastlm/optim/_rule.py computes the same operations in the same order and
// matches these functions bit for bit.
//
// Bit-exactness rests on three rules:
// * every fp32 operation rounds once, as a PyTorch elementwise op does: on the GPU through
//   the __f*_rn intrinsics (nvcc never fuses them into an FMA); on the CPU the translation
//   unit that includes this header turns FMA contraction off (see csrc/cpu/optim8bit.cpp);
// * quantization is a closed form of fp32 operations and table reads (see quantize), not a
//   search, so every backend computes the same index;
// * stochastic rounding draws its bits from a counter-based hash of (seed, step, index).
//
// The 8-bit codes (the dynamic/tree code of Dettmers et al., signed for the first moment,
// unsigned for the second) are generated once in Python (fastlm/optim/_code.py) and passed
// to the kernels as one fp32 table per code: the 256 sorted values in [-1, 1], then the
// quantizer's tables (kTable*).
#pragma once

#include <stdint.h>

#include <cmath>
#include <cstring>

#if defined(__CUDACC__)
#define FASTLM_HD __host__ __device__ __forceinline__
#else
#define FASTLM_HD inline
#endif

namespace fastlm {
namespace optim8bit {

// ---- fp32 arithmetic, one rounding per operation --------------------------------------
FASTLM_HD float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
    return __fadd_rn(a, b);
#else
    return a + b;
#endif
}
FASTLM_HD float sub_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
    return __fsub_rn(a, b);
#else
    return a - b;
#endif
}
FASTLM_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
    return __fmul_rn(a, b);
#else
    return a * b;
#endif
}
FASTLM_HD float div_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
    return __fdiv_rn(a, b);
#else
    return a / b;
#endif
}
FASTLM_HD float sqrt_rn(float a) {
#if defined(__CUDA_ARCH__)
    return __fsqrt_rn(a);
#elif defined(__GNUC__)
    // The builtin, not std::sqrt: <cmath>'s out-of-line wrapper is compiled with other options
    // than csrc/cpu/optim8bit.cpp's, so GCC would call it instead of inlining one instruction.
    return __builtin_sqrtf(a);
#else
    return std::sqrt(a);
#endif
}

FASTLM_HD uint32_t float_bits(float x) {
#if defined(__CUDA_ARCH__)
    return __float_as_uint(x);
#else
    uint32_t u;
    std::memcpy(&u, &x, sizeof(u));
    return u;
#endif
}
FASTLM_HD float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
    return __uint_as_float(u);
#else
    float x;
    std::memcpy(&x, &u, sizeof(x));
    return x;
#endif
}

// ---- the 8-bit code ---------------------------------------------------------------------
constexpr int kCodeSize = 256;
// One fp32 table per code (fastlm/optim/_code.py builds it and documents the layout): the 256
// code values, then the closed-form quantizer's octave and segment tables.
constexpr int kTableThreshold = 256;  // 32 per octave: the segment boundary inside it, or +inf
constexpr int kTableSegment = 288;    // 32 per octave: the segment at its bottom (an integer)
constexpr int kTableScale = 320;      // 16 per segment
constexpr int kTableOffset = 336;     // 16 per segment
constexpr int kTableTop = 352;        // 16 per segment: its last index
constexpr int kTableSize = 368;
// Magnitudes are clamped to [2^-24, 1] (as bits) before the octave lookup: their 25 binary
// exponents are distinct mod 32, and no code value but 0 lies below 2^-22.
constexpr int32_t kMagLoBits = 0x33800000;
constexpr int32_t kMagHiBits = 0x3f800000;
// The largest block the kernels take (the CUDA kernel runs one thread block per block).
constexpr int kMaxBlockSize = 4096;

// table[q] * absmax: the dequantized state.
FASTLM_HD float dequantize(const float* table, uint8_t q, float absmax) { return mul_rn(table[q], absmax); }

// The block scale: absmax, or 1 for an all-zero block (whose values all quantize to 0).
FASTLM_HD float safe_scale(float absmax) { return absmax > 0.f ? absmax : 1.f; }

// 1 / safe_scale(absmax), once per block: normalize() then multiplies (one division per block
// instead of one per element; every backend computes the same reciprocal and products).
FASTLM_HD float inverse_scale(float absmax) { return div_rn(1.f, safe_scale(absmax)); }
FASTLM_HD float normalize(float x, float inverse) { return mul_rn(x, inverse); }

FASTLM_HD int32_t clamp_i32(int32_t x, int32_t lo, int32_t hi) { return x < lo ? lo : (x > hi ? hi : x); }

// The index of (about) the nearest code value to a normalized x, in closed form: the code is
// linear inside each decade, so there the index of |x| is trunc(|x| * scale + offset); the
// segment (zero, a decade, one) comes from |x|'s octave and one compare with the boundary
// inside it. Exactly the nearest value except within an fp32 rounding of a midpoint, and
// except that the unsigned code's tables map segment 0 to its smallest positive value (a second
// moment is never stored as 0: fastlm/optim/_code.py). The unsigned code's input is never
// negative, so its sign bit is not masked (a negative input clamps to segment 0); a signed
// negative x takes the mirror index of |x|. NaN and infinities
// clamp like the largest magnitudes. fastlm/optim/_rule.py's quantize is the same fp32
// arithmetic; csrc/cpu/optim8bit.cpp has a 16-lane version.
FASTLM_HD uint8_t quantize(const float* table, float x, bool is_signed) {
    const uint32_t bits = float_bits(x);
    const int32_t raw = static_cast<int32_t>(is_signed ? (bits & 0x7fffffffu) : bits);
    const int32_t magnitude = clamp_i32(raw, kMagLoBits, kMagHiBits);
    const int octave = (magnitude >> 23) & 31;
    const float xa = bits_float(static_cast<uint32_t>(magnitude));
    const int segment =
        static_cast<int>(table[kTableSegment + octave]) + (xa > table[kTableThreshold + octave] ? 1 : 0);
    const float y = add_rn(mul_rn(xa, table[kTableScale + segment]), table[kTableOffset + segment]);
    const float top = table[kTableTop + segment];
    int32_t k = static_cast<int32_t>(y < top ? y : top);  // y >= 0: truncation is floor
    if (is_signed && (bits >> 31)) k = 254 - k < 0 ? 0 : 254 - k;
    return static_cast<uint8_t>(k);
}

// ---- hyper-parameters ------------------------------------------------------------------
// Every scalar the rule needs, rounded to fp32 once on the host (fastlm/optim/_rule.py), so
// all backends use the same values.
struct Hyper {
    float beta1, one_minus_beta1;  // first moment (Lion: the interpolation for the sign)
    float beta2, one_minus_beta2;  // second moment (Lion: the momentum update)
    float eps;
    float step_size;  // Adam/AdamW: lr / (1 - beta1^t); Lion: lr
    float inv_bias_correction2_sqrt;  // 1 / sqrt(1 - beta2^t); Lion: unused
    float decay;  // 1 - lr * weight_decay (decoupled: AdamW, Lion); 1 for Adam
    float l2;  // coupled L2 weight decay added to the gradient (Adam only)
};

enum Kind : int { kAdamW = 0, kAdam = 1, kLion = 2 };

// ---- per-element updates (fp32), in place on m, v and p ------------------------------
// Adam / AdamW: the moments, then p = p * decay - step_size * m / (sqrt(v) * inv_bc2_sqrt + eps)
// (a multiplication by a host-computed reciprocal: no backend divides by a scalar).
// coupled_l2 (Adam) adds l2 * p to the gradient first; callers pass a compile-time constant,
// so the inlined loop has no branch left and vectorizes.
FASTLM_HD void adam_update(float g, float& p, float& m, float& v, const Hyper& h, bool coupled_l2) {
    if (coupled_l2) g = add_rn(g, mul_rn(h.l2, p));
    m = add_rn(mul_rn(h.beta1, m), mul_rn(h.one_minus_beta1, g));
    v = add_rn(mul_rn(h.beta2, v), mul_rn(mul_rn(h.one_minus_beta2, g), g));
    const float denom = add_rn(mul_rn(sqrt_rn(v), h.inv_bias_correction2_sqrt), h.eps);
    p = sub_rn(mul_rn(p, h.decay), div_rn(mul_rn(h.step_size, m), denom));
}

// Lion (Chen et al. 2023): p = p * decay - lr * sign(beta1 * m + (1 - beta1) * g), then
// m = beta2 * m + (1 - beta2) * g.
FASTLM_HD void lion_update(float g, float& p, float& m, const Hyper& h) {
    const float c = add_rn(mul_rn(h.beta1, m), mul_rn(h.one_minus_beta1, g));
    const float sign = c > 0.f ? 1.f : (c < 0.f ? -1.f : 0.f);
    p = sub_rn(mul_rn(p, h.decay), mul_rn(h.step_size, sign));
    m = add_rn(mul_rn(h.beta2, m), mul_rn(h.one_minus_beta2, g));
}

// ---- bf16 rounding -----------------------------------------------------------------------
// murmur3's 32-bit finalizer: a cheap bijective mixer.
FASTLM_HD uint32_t fmix32(uint32_t h) {
    h ^= h >> 16;
    h *= 0x85ebca6bu;
    h ^= h >> 13;
    h *= 0xc2b2ae35u;
    h ^= h >> 16;
    return h;
}

// The per-(seed, step) key, computed once per launch on the host.
FASTLM_HD uint32_t rng_key(uint32_t seed, uint32_t step) { return fmix32(seed ^ fmix32(step + 0x9e3779b9u)); }

// 32 random bits for element `index` under `key`: a counter-based generator, so every
// backend draws the same bits for the same element whatever the thread layout. The index's
// high half is folded in through fmix32 (fmix32(0) = 0, so it costs nothing below 2^32).
FASTLM_HD uint32_t rng_bits(uint32_t key, uint64_t index) {
    const uint32_t folded = static_cast<uint32_t>(index) ^ fmix32(static_cast<uint32_t>(index >> 32));
    return fmix32(folded * 0x9e3779b1u + key);
}

// fp32 -> bf16 bits, round to nearest even (as PyTorch's conversion; NaN -> 0x7fc0).
FASTLM_HD uint16_t bf16_round_nearest(float x) {
    const uint32_t u = float_bits(x);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
    return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// fp32 -> bf16 bits, stochastically: add 16 random bits below the bf16 mantissa and
// truncate, so E[result] = x (unbiased); small updates then move bf16 weights on average
// instead of rounding away. Non-finite values round to nearest.
FASTLM_HD uint16_t bf16_round_stochastic(float x, uint32_t random_bits) {
    const uint32_t u = float_bits(x);
    if ((u & 0x7f800000u) == 0x7f800000u) return bf16_round_nearest(x);
    return static_cast<uint16_t>((u + (random_bits & 0xffffu)) >> 16);
}

FASTLM_HD float bf16_to_float(uint16_t b) { return bits_float(static_cast<uint32_t>(b) << 16); }

}  // namespace optim8bit
}  // namespace fastlm
