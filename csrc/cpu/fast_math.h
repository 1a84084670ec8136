#pragma once

// Math helpers for the `omp simd` loops of the CPU kernels. They must inline into those loops:
// a call left in a loop keeps it scalar (GCC did not inline normal_cdf into the activation's
// forward loop on its own: 20 ns/element).

#include <algorithm>
#include <cstdint>
#include <cstring>

#define FASTLM_ALWAYS_INLINE inline __attribute__((always_inline))

namespace fastlm_cpu {

// exp(x) for fp32, written so that GCC vectorizes the loops calling it: glibc's vector expf
// is only used under -ffast-math, which the extension does not build with, and std::floor
// kept the loop scalar (it does not vectorize without -fno-trapping-math), so the rounding
// is the add-and-subtract of 1.5 * 2^23. Cody-Waite range reduction x = k ln2 + r
// (|r| <= ln2 / 2), a degree-7 Taylor polynomial for exp(r) (truncation error < 1e-8
// relative), and 2^k built in the exponent bits. The input is clamped so 2^k stays a normal
// float; below -87.3 the result is ~1e-38 instead of smaller (exp_nonpositive returns 0 there).
FASTLM_ALWAYS_INLINE float exp_approx(float x) {
    x = std::min(std::max(x, -87.3f), 88.3f);
    constexpr float kMagic = 12582912.f;  // 1.5 * 2^23: adding it rounds to an integer
    const float k = (x * 1.44269504088896341f + kMagic) - kMagic;
    const float r = (x - k * 0.693145751953125f) - k * 1.428606765330187e-06f;
    const float p = 1.f + r * (1.f + r * (0.5f + r * (1.f / 6 + r * (1.f / 24 + r * (1.f / 120 +
                                                                                   r * (1.f / 720 + r * (1.f / 5040)))))));
    const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
    float scale;
    std::memcpy(&scale, &bits, sizeof(scale));
    return p * scale;
}

// exp(x) for x <= 0 (softmax terms x - max), exactly 0 below -87.3 as for -inf (masked) logits.
FASTLM_ALWAYS_INLINE float exp_nonpositive(float x) { return x < -87.3f ? 0.f : exp_approx(x); }

}  // namespace fastlm_cpu
