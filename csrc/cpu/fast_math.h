#pragma once

// Math helpers for the `omp simd` loops of the CPU kernels. They must inline into those loops:
// a call left in a loop keeps it scalar (GCC did not inline normal_cdf into the activation's
// forward loop on its own: 20 ns/element).

#include <algorithm>
#include <cstdint>
#include <cstring>

#define FASTLM_ALWAYS_INLINE inline __attribute__((always_inline))

namespace fastlm_cpu {

// Eight fp32 lanes of GCC's vector extension, for loops written with explicit vectors: an
// `omp simd` reduction ends in a chain of scalar lane adds (no -ffast-math), which costs as much
// as the exps of a 32-key softmax row.
typedef float f32x8 __attribute__((vector_size(32)));
typedef int32_t i32x8 __attribute__((vector_size(32)));

namespace detail {

FASTLM_ALWAYS_INLINE int32_t to_int(float k) { return static_cast<int32_t>(k); }
FASTLM_ALWAYS_INLINE i32x8 to_int(f32x8 k) { return __builtin_convertvector(k, i32x8); }
FASTLM_ALWAYS_INLINE float from_bits(int32_t bits) {
    float f;
    std::memcpy(&f, &bits, sizeof(f));
    return f;
}
FASTLM_ALWAYS_INLINE f32x8 from_bits(i32x8 bits) { return (f32x8)bits; }  // the same 32 bytes

// exp_approx for a float or an f32x8: the same steps on both.
template <class F>
FASTLM_ALWAYS_INLINE F exp_approx(F x) {
    const F lo = F{} - 87.3f, hi = F{} + 88.3f;
    x = x < lo ? lo : x;
    x = hi < x ? hi : x;
    constexpr float kMagic = 12582912.f;  // 1.5 * 2^23: adding it rounds to an integer
    const F k = (x * 1.44269504088896341f + kMagic) - kMagic;
    const F r = (x - k * 0.693145751953125f) - k * 1.428606765330187e-06f;
    const F p = 1.f + r * (1.f + r * (0.5f + r * (1.f / 6 + r * (1.f / 24 + r * (1.f / 120 +
                                                                               r * (1.f / 720 + r * (1.f / 5040)))))));
    return p * from_bits((to_int(k) + 127) << 23);
}

}  // namespace detail

// exp(x) for fp32, written so that GCC vectorizes the loops calling it: glibc's vector expf
// is only used under -ffast-math, which the extension does not build with, and std::floor
// kept the loop scalar (it does not vectorize without -fno-trapping-math), so the rounding
// is the add-and-subtract of 1.5 * 2^23. Cody-Waite range reduction x = k ln2 + r
// (|r| <= ln2 / 2), a degree-7 Taylor polynomial for exp(r) (truncation error < 1e-8
// relative), and 2^k built in the exponent bits. The input is clamped so 2^k stays a normal
// float; below -87.3 the result is ~1e-38 instead of smaller (exp_nonpositive returns 0 there).
FASTLM_ALWAYS_INLINE float exp_approx(float x) { return detail::exp_approx(x); }

// exp(x) for x <= 0 (softmax terms x - max), exactly 0 below -87.3 as for -inf (masked) logits.
FASTLM_ALWAYS_INLINE float exp_nonpositive(float x) { return x < -87.3f ? 0.f : exp_approx(x); }

// The same on eight lanes.
FASTLM_ALWAYS_INLINE f32x8 exp_nonpositive(f32x8 x) {
    return x < -87.3f ? f32x8{} : detail::exp_approx(x);
}

// Sums and maxima of the eight lanes, as a tree (three dependent steps, not seven).
FASTLM_ALWAYS_INLINE float lane_sum(f32x8 v) {
    return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}
FASTLM_ALWAYS_INLINE float lane_max(f32x8 v) {
    const float a = std::max(v[0], v[4]), b = std::max(v[1], v[5]), c = std::max(v[2], v[6]),
                d = std::max(v[3], v[7]);
    return std::max(std::max(a, b), std::max(c, d));
}

}  // namespace fastlm_cpu
