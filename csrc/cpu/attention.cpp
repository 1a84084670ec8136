#include "cpu/attention.h"

#include "cpu/fast_math.h"
#include "cpu/huge_pages.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

// Flash attention, one (sequence, head) pair at a time, tiled along both axes so no
// seqlen_q x seqlen_k matrix is ever formed. Every product is the one small GEMM below,
// C[r][:] (+)= sum_t A(r, t) * B[t][:], register-blocked: S = Q K^T and dP = dO V^T read keys and
// values transposed, P V / dS K / P^T dO / dS^T Q read contiguous copies of the rows (both packed
// once per work item), P^T and dS^T through their strides. Tiles are computed in strips of 8 rows
// (8 keys for dK/dV), each over only the keys (queries) its band can see, so a causal diagonal
// costs little more than its visible half. The backward starts from the forward's log-sum-exp, so
// training runs the forward once (the torch backend's SDPA path reruns it inside its backward).

namespace {

using fastlm_cpu::exp_nonpositive;
using fastlm_cpu::i32x8;
using fastlm_cpu::lane_max;
using fastlm_cpu::lane_sum;
using vec8 = fastlm_cpu::f32x8;

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kInf = std::numeric_limits<float>::infinity();
// Queries and keys per tile. With diagonal tiles cut into strips (kStrip), 64 x 64 tiles measured
// no faster than 32 x 32 at seqlen 128 and 512 (fwd + bwd, one thread; indicative).
constexpr int64_t kBlockM = 32;
constexpr int64_t kBlockN = 32;

// Score tiles are computed in strips of kStrip rows, each over only the key columns (whole vectors
// of 8) that some row of the strip sees, and the dK/dV products in strips of kStrip keys over only
// the queries that see them: on the diagonal of a causal mask that skips 37.5% of a 32 x 32 tile's
// products and exps (at seqlen 128, 15% of all of them).
constexpr int64_t kStrip = 8;

// fp32 vectors: 16 lanes (one zmm) where AVX-512 is compiled in, and 8 (vec8, one ymm) for the last
// 8 columns of a count that is not a multiple of 16 (head dims are multiples of 8, so no lane is
// ever masked). Zen 4 runs a 512-bit FMA as two 256-bit halves, but one zmm load, broadcast use
// and FMA still replace two of each: fewer instructions for the same work.
#if defined(__AVX512F__)
typedef float vec16 __attribute__((vector_size(64)));
#endif

// Vector loads and stores through memcpy, which compiles to one unaligned move: rows of the
// (seq, heads, dim) tensors and of the scratch tiles are only float-aligned.
template <class Vec>
FASTLM_ALWAYS_INLINE Vec load_vec(const float* p) {
    Vec v;
    std::memcpy(&v, p, sizeof(Vec));
    return v;
}
template <class Vec>
FASTLM_ALWAYS_INLINE void store_vec(float* p, const Vec& v) {
    std::memcpy(p, &v, sizeof(Vec));
}

constexpr vec8 kMinusInf = {-kInf, -kInf, -kInf, -kInf, -kInf, -kInf, -kInf, -kInf};

// Lanes j..j+7 of a row whose band is [lo, hi): all ones where lo <= lane < hi, zeros elsewhere.
FASTLM_ALWAYS_INLINE i32x8 in_band(int64_t j, int64_t lo, int64_t hi) {
    const i32x8 idx = i32x8{0, 1, 2, 3, 4, 5, 6, 7} + static_cast<int32_t>(j);
    return (idx >= static_cast<int32_t>(lo)) & (idx < static_cast<int32_t>(hi));
}

// C[r][c] (+)= sum_{t < T} a[r * sar + t * sat] * b[t * ldb + c] for r < R, c < lanes * V: a
// register tile of R x V accumulators, V loads of B and a broadcast of A per step. Accumulate
// false stores the product without reading C: score tiles start from nothing, so they need
// neither a zero fill nor the loads of it.
template <class Vec, int R, int V, bool Accumulate>
void gemm_tile(float* c, int64_t ldc, const float* a, int64_t sar, int64_t sat, const float* b, int64_t ldb,
               int64_t T) {
    constexpr int kLanes = sizeof(Vec) / sizeof(float);
    Vec acc[R][V];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
        for (int v = 0; v < V; ++v)
            acc[r][v] = Accumulate ? load_vec<Vec>(c + r * ldc + kLanes * v) : Vec{};
    for (int64_t t = 0; t < T; ++t) {
        Vec bv[V];
#pragma GCC unroll 4
        for (int v = 0; v < V; ++v) bv[v] = load_vec<Vec>(b + t * ldb + kLanes * v);
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) {
            const float s = a[r * sar + t * sat];
#pragma GCC unroll 4
            for (int v = 0; v < V; ++v) acc[r][v] += s * bv[v];
        }
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
        for (int v = 0; v < V; ++v) store_vec(c + r * ldc + kLanes * v, acc[r][v]);
}

// Every row of one column block, R at a time, then the last rows - 1 < R ones.
template <class Vec, int R, int V, bool Accumulate>
void gemm_rows(float* c, int64_t ldc, const float* a, int64_t sar, int64_t sat, const float* b, int64_t ldb,
               int64_t rows, int64_t T) {
    int64_t r0 = 0;
    for (; r0 + R <= rows; r0 += R)
        gemm_tile<Vec, R, V, Accumulate>(c + r0 * ldc, ldc, a + r0 * sar, sar, sat, b, ldb, T);
    if constexpr (R > 1) {
        if (r0 < rows)
            gemm_rows<Vec, R - 1, V, Accumulate>(c + r0 * ldc, ldc, a + r0 * sar, sar, sat, b, ldb, rows - r0, T);
    }
}

// Rows of the register tile. AVX-512 (32 registers): 8 rows x 2 zmm (32 columns), 16
// accumulators, 2 loads of B and a broadcast per step. 4 rows x 4 zmm read B twice as often, and B
// is the operand that streams from L2 at large head dims (the 32 x 128 V or dO tile of P V and
// P^T dO): 8 x 2 measured ~1.3x faster fwd + bwd at head dim 128 and ~1.25x at 64 (one thread,
// indicative). 8 rows are also a strip. AVX2 (16 registers): 4 rows x 2 ymm.
#if defined(__AVX512F__)
constexpr int kRows = 8;
#else
constexpr int kRows = 4;
#endif

// C (rows x cols, row stride ldc) (+)= A (rows x T, element (r, t) at a[r * sar + t * sat]) times
// B (T x cols, row stride ldb). cols is a multiple of 8: blocks of 2 vectors, then one for the rest.
template <bool Accumulate>
void gemm(float* c, int64_t ldc, const float* a, int64_t sar, int64_t sat, const float* b, int64_t ldb,
          int64_t rows, int64_t cols, int64_t T) {
    int64_t c0 = 0;
#if defined(__AVX512F__)
    for (; cols - c0 >= 32; c0 += 32)
        gemm_rows<vec16, kRows, 2, Accumulate>(c + c0, ldc, a, sar, sat, b + c0, ldb, rows, T);
    if (cols - c0 >= 16) {
        gemm_rows<vec16, kRows, 1, Accumulate>(c + c0, ldc, a, sar, sat, b + c0, ldb, rows, T);
        c0 += 16;
    }
#else
    for (; cols - c0 >= 16; c0 += 16)
        gemm_rows<vec8, kRows, 2, Accumulate>(c + c0, ldc, a, sar, sat, b + c0, ldb, rows, T);
#endif
    if (c0 < cols) gemm_rows<vec8, kRows, 1, Accumulate>(c + c0, ldc, a, sar, sat, b + c0, ldb, rows, T);
}

int64_t round_up8(int64_t n) { return (n + 7) / 8 * 8; }

// Per-thread scratch kept from call to call (a thread_local buffer of the worker thread): fresh
// megabyte-sized buffers come from mmap and faulted in every 4 KiB page on every call (~10% of a
// training-shape call). It holds the largest call's scratch until the thread exits.
class Workspace {
  public:
    explicit Workspace(int64_t floats) : buffer_(storage()) {
        if (static_cast<int64_t>(buffer_.size()) < floats) buffer_.resize(floats);
    }
    float* take(int64_t floats) {
        float* p = buffer_.data() + used_;
        used_ += floats;
        TORCH_INTERNAL_ASSERT(used_ <= static_cast<int64_t>(buffer_.size()));
        return p;
    }

  private:
    static std::vector<float>& storage() {
        thread_local std::vector<float> buffer;
        return buffer;
    }
    std::vector<float>& buffer_;
    int64_t used_ = 0;
};

// Row stride of a transposed (dim, tokens) matrix: at least 8 floats past the last token (a tile's
// columns are read in whole vectors of 8) and an odd multiple of 16 floats, so consecutive rows
// fall in different L1 sets.
int64_t transposed_stride(int64_t tokens) {
    const int64_t ld = (tokens + 8 + 15) / 16 * 16;
    return (ld / 16) % 2 == 0 ? ld + 16 : ld;
}

// The work item's operands, copied once per item into its thread's scratch (inside the one parallel
// region of a call: on a busy machine every extra OpenMP region, e.g. an ATen copy, cost a scheduler
// time slice, several ms). rows: n rows of src (row stride ld) made contiguous, dim floats apart. In
// place they lie heads * dim floats apart, 4 KiB at 8 heads of 128: every row of a tile then maps to
// the same L1 set, and the tile thrashed the cache.
void pack_rows(float* dst, const float* src, int64_t ld, int64_t n, int64_t dim) {
    for (int64_t j = 0; j < n; ++j) std::copy(src + j * ld, src + j * ld + dim, dst + j * dim);
}

// dst[d * ldt + j] = src[j * ld + d], zeros for n <= j < ldt: keys along the GEMM's vector lanes
// for S = Q K^T (and dP = dO V^T).
void pack_transposed(float* dst, int64_t ldt, const float* src, int64_t ld, int64_t n, int64_t dim) {
    for (int64_t j = 0; j < n; ++j)
        for (int64_t d = 0; d < dim; ++d) dst[d * ldt + j] = src[j * ld + d];
    for (int64_t d = 0; d < dim; ++d) std::fill(dst + d * ldt + n, dst + (d + 1) * ldt, 0.f);
}

// Where each sequence's rows start and how many there are.
struct Seq {
    int64_t q0, sq, k0, sk;
};

struct Layout {
    std::vector<Seq> seqs;
    bool packed;
    int64_t heads, kv_heads, dim, total_q;
    float scale;
    int64_t left, right;

    // The keys of the tile [j0, j0 + n) that query i sees: [lo, hi) relative to j0 (empty when lo >= hi).
    void visible(const Seq& s, int64_t i, int64_t j0, int64_t n, int64_t& lo, int64_t& hi) const {
        const int64_t aligned = i + s.sk - s.sq - j0;
        lo = left >= 0 ? std::clamp<int64_t>(aligned - left, 0, n) : 0;
        hi = right >= 0 ? std::clamp<int64_t>(aligned + right + 1, 0, n) : n;
    }
    // Offset of the LSE of (sequence b, head h, query 0); queries follow with stride 1.
    int64_t lse_offset(int64_t b, const Seq& s, int64_t h) const {
        return packed ? h * total_q + s.q0 : (b * heads + h) * s.sq;
    }
};

// The keys [lo[r], hi[r]) (relative to j0) that each row r of one tile sees (empty when lo >= hi).
// Both bounds are nondecreasing in r (the band moves right with the query), so the rows [a, b) of a
// strip see no key outside [lo[a], hi[b - 1]).
struct TileBands {
    int64_t lo[kBlockM], hi[kBlockM];
    TileBands(const Layout& L, const Seq& s, int64_t i0, int64_t m, int64_t j0, int64_t n) {
        for (int64_t r = 0; r < m; ++r) L.visible(s, i0 + r, j0, n, lo[r], hi[r]);
    }
};

void check_tensor(const at::Tensor& t, const char* name, int64_t dim) {
    TORCH_CHECK(t.device().is_cpu(), "attention (C++): ", name, " must be a CPU tensor, got ", t.device());
    TORCH_CHECK(t.scalar_type() == at::kFloat, "attention (C++): ", name, " must be float32, got ", t.scalar_type());
    TORCH_CHECK(t.dim() == dim, "attention (C++): ", name, " must have ", dim, " dims, got shape ", t.sizes());
    TORCH_CHECK(t.is_contiguous(), "attention (C++): ", name, " must be contiguous");
}

std::vector<int32_t> read_cu(const at::Tensor& cu, const char* name, int64_t batch, int64_t total) {
    TORCH_CHECK(cu.device().is_cpu() && cu.scalar_type() == at::kInt && cu.dim() == 1 && cu.size(0) == batch + 1 &&
                    cu.is_contiguous(),
                "attention (C++): ", name, " must be a contiguous CPU int32 tensor of shape (", batch + 1, "), got ",
                cu.scalar_type(), " ", cu.sizes());
    std::vector<int32_t> values(cu.data_ptr<int32_t>(), cu.data_ptr<int32_t>() + batch + 1);
    TORCH_CHECK(values[0] == 0 && values[batch] == total, "attention (C++): ", name, " must run from 0 to ", total);
    for (int64_t b = 0; b < batch; ++b)
        TORCH_CHECK(values[b + 1] >= values[b], "attention (C++): ", name, " must never decrease");
    return values;
}

// Checks q/k/v (and the tensors shaped like them) and reads the sequences' extents.
Layout make_layout(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   const std::optional<at::Tensor>& cu_q, const std::optional<at::Tensor>& cu_k,
                   int64_t max_seqlen_q, double scale, int64_t left, int64_t right) {
    Layout L;
    L.packed = cu_q.has_value();
    TORCH_CHECK(cu_q.has_value() == cu_k.has_value(), "attention (C++): cu_seqlens_q and cu_seqlens_k go together");
    const int64_t rank = L.packed ? 3 : 4;
    check_tensor(q, "q", rank);
    check_tensor(k, "k", rank);
    check_tensor(v, "v", rank);
    TORCH_CHECK(k.sizes() == v.sizes(), "attention (C++): k and v must have the same shape, got ", k.sizes(), " and ",
                v.sizes());
    L.heads = q.size(-2);
    L.kv_heads = k.size(-2);
    L.dim = q.size(-1);
    TORCH_CHECK(k.size(-1) == L.dim && L.dim % 8 == 0 && L.dim > 0,
                "attention (C++): the head dim must be a positive multiple of 8 shared by q and k, got ", L.dim, " and ",
                k.size(-1));
    TORCH_CHECK(L.kv_heads > 0 && L.heads % L.kv_heads == 0, "attention (C++): q's ", L.heads,
                " heads must be a multiple of k's ", L.kv_heads);
    TORCH_CHECK(left >= -1 && right >= -1, "attention (C++): window sizes must be >= -1, got ", left, ", ", right);
    L.scale = static_cast<float>(scale);
    L.left = left;
    L.right = right;
    L.total_q = L.packed ? q.size(0) : q.size(0) * q.size(1);
    if (L.packed) {
        const int64_t batch = cu_q->size(0) - 1;
        const auto cq = read_cu(*cu_q, "cu_seqlens_q", batch, q.size(0));
        const auto ck = read_cu(*cu_k, "cu_seqlens_k", batch, k.size(0));
        for (int64_t b = 0; b < batch; ++b) {
            L.seqs.push_back({cq[b], cq[b + 1] - cq[b], ck[b], ck[b + 1] - ck[b]});
            TORCH_CHECK(L.seqs.back().sq <= max_seqlen_q, "attention (C++): sequence ", b, " has ",
                        L.seqs.back().sq, " queries, more than max_seqlen_q = ", max_seqlen_q);
        }
    } else {
        TORCH_CHECK(k.size(0) == q.size(0), "attention (C++): q and k must have the same batch size, got ", q.size(0),
                    " and ", k.size(0));
        TORCH_CHECK(q.size(1) <= max_seqlen_q, "attention (C++): seqlen_q ", q.size(1), " exceeds max_seqlen_q ",
                    max_seqlen_q);
        for (int64_t b = 0; b < q.size(0); ++b)
            L.seqs.push_back({b * q.size(1), q.size(1), b * k.size(1), k.size(1)});
    }
    return L;
}

void check_like(const at::Tensor& t, const at::Tensor& like, const char* name) {
    check_tensor(t, name, like.dim());
    TORCH_CHECK(t.sizes() == like.sizes(), "attention (C++): ", name, " must have shape ", like.sizes(), ", got ",
                t.sizes());
}

void check_lse(const at::Tensor& lse, const Layout& L, const at::Tensor& q) {
    check_tensor(lse, "lse", L.packed ? 2 : 3);
    const auto expected = L.packed ? std::vector<int64_t>{L.heads, q.size(0)}
                                   : std::vector<int64_t>{q.size(0), L.heads, q.size(1)};
    TORCH_CHECK(lse.sizes() == at::IntArrayRef(expected), "attention (C++): lse must have shape ", expected,
                ", got ", lse.sizes());
}

// One query tile [i0, i0 + m) of one (sequence, head): online softmax over the key tiles it can see.
// q/out: the tile's first row (row stride heads * dim); kt (row stride ldt) and v (rows of dim): the
// head's packed keys and values from the sequence's key key0 on, covering every key the tile sees.
struct FwdScratch {
    std::vector<float> s, o, row_max, row_sum;
    explicit FwdScratch(int64_t dim)
        : s(kBlockM * kBlockN), o(kBlockM * dim), row_max(kBlockM), row_sum(kBlockM) {}
};

void fwd_tile(const Layout& L, const Seq& s, const float* q, const float* kt, int64_t ldt, const float* v,
              int64_t key0, float* out, float* lse, int64_t i0, int64_t m, FwdScratch& w) {
    const int64_t dim = L.dim, ldq = L.heads * dim, diag = s.sk - s.sq;
    const float scale = L.scale;
    float* o = w.o.data();
    std::fill(o, o + m * dim, 0.f);
    std::fill(w.row_max.begin(), w.row_max.begin() + m, -kInf);
    std::fill(w.row_sum.begin(), w.row_sum.begin() + m, 0.f);
    // The keys some query of the tile sees.
    const int64_t k_begin = L.left >= 0 ? std::max<int64_t>(0, i0 + diag - L.left) : 0;
    const int64_t k_end = L.right >= 0 ? std::min<int64_t>(s.sk, i0 + m - 1 + diag + L.right + 1) : s.sk;
    for (int64_t j0 = k_begin; j0 < k_end; j0 += kBlockN) {
        const int64_t n = std::min(kBlockN, k_end - j0), nc = round_up8(n);
        const TileBands band(L, s, i0, m, j0, n);
        float* st = w.s.data();
        for (int64_t a = 0; a < m; a += kStrip) {
            const int64_t a_end = std::min(m, a + kStrip), lo = band.lo[a], hi = band.hi[a_end - 1];
            if (lo >= hi) continue;  // no row of the strip sees a key of this tile: O, max and sum stay
            const int64_t c_lo = lo / 8 * 8, c_hi = std::min(nc, round_up8(hi));
            gemm<false>(st + a * nc + c_lo, nc, q + a * ldq, ldq, 1, kt + (j0 - key0) + c_lo, ldt, a_end - a,
                        c_hi - c_lo, dim);  // S = Q K^T
            for (int64_t r = a; r < a_end; ++r) {
                float* p = st + r * nc;
                const int64_t rlo = band.lo[r], rhi = band.hi[r];
                if (rlo >= rhi) {
                    std::fill(p + c_lo, p + c_hi, 0.f);
                    continue;
                }
                // The strip's whole vectors with the row's band as a select (c_lo and c_hi are
                // multiples of 8): loops over [rlo, rhi) left a scalar remainder that cost more than
                // the vector part.
                vec8 vmax = kMinusInf;
                for (int64_t j = c_lo; j < c_hi; j += 8) {
                    const vec8 x = in_band(j, rlo, rhi) ? load_vec<vec8>(p + j) : kMinusInf;
                    vmax = x > vmax ? x : vmax;
                }
                const float new_max = std::max(w.row_max[r], lane_max(vmax) * scale);
                const float alpha = exp_nonpositive(w.row_max[r] - new_max);
                vec8 vsum = {};
                for (int64_t j = c_lo; j < c_hi; j += 8) {
                    const vec8 x = load_vec<vec8>(p + j) * scale - new_max;
                    const vec8 e = in_band(j, rlo, rhi) ? exp_nonpositive(x) : vec8{};
                    store_vec(p + j, e);
                    vsum += e;
                }
                const float sum = lane_sum(vsum);
                w.row_sum[r] = w.row_sum[r] * alpha + sum;
                w.row_max[r] = new_max;
                if (alpha != 1.f) {
                    float* orow = o + r * dim;
#pragma omp simd
                    for (int64_t d = 0; d < dim; ++d) orow[d] *= alpha;
                }
            }
            gemm<true>(o + a * dim, dim, st + a * nc + lo, nc, 1, v + (j0 - key0 + lo) * dim, dim, a_end - a, dim,
                       hi - lo);  // O += P V over the strip's keys
        }
    }
    for (int64_t r = 0; r < m; ++r) {
        float* dst = out + r * ldq;
        const float sum = w.row_sum[r];
        const float inv = sum > 0.f ? 1.f / sum : 0.f;  // no visible key: zeros, never NaN
        const float* orow = o + r * dim;
#pragma omp simd
        for (int64_t d = 0; d < dim; ++d) dst[d] = orow[d] * inv;
        if (lse != nullptr) lse[r] = sum > 0.f ? (w.row_max[r] + std::log(sum)) * kLog2e : kInf;
    }
}

struct BwdOperands {
    const float *dout, *q, *k, *v, *out, *lse;
    float *dq, *dk, *dv;
};

struct BwdScratch {
    std::vector<float> p, ds, dk, dv, delta, lse;
    BwdScratch(int64_t dim, int64_t rows)
        : p(kBlockM * kBlockN), ds(kBlockM * kBlockN), dk(kBlockN * dim), dv(kBlockN * dim), delta(rows),
          lse(rows) {}
};

// Floats of packed operands one backward item needs (see bwd_item).
int64_t bwd_packed_floats(int64_t dim, int64_t group, int64_t sq, int64_t sk) {
    return dim * (2 * transposed_stride(sk) + sk + 3 * group * sq);
}

// Every gradient of one (sequence, kv head). Its operands are packed first into `packed` (see
// pack_rows): K and V transposed, K rows, and the Q, dO and dQ rows of the group's query heads.
// Then key tiles outer (their dK/dV accumulate in scratch), each query head of the group and each
// query tile that sees the key tile inner; dQ accumulates in the packed rows and is written last.
void bwd_item(const Layout& L, int64_t b, const Seq& s, int64_t g, const BwdOperands& x, float* packed,
              BwdScratch& w) {
    const int64_t dim = L.dim, ldq = L.heads * dim, ldk = L.kv_heads * dim, diag = s.sk - s.sq;
    const int64_t group = L.heads / L.kv_heads, ldt = transposed_stride(s.sk);
    float* kt = packed;
    float* vt = kt + dim * ldt;
    float* kr = vt + dim * ldt;
    float* qr = kr + s.sk * dim;
    float* dor = qr + group * s.sq * dim;
    float* dqr = dor + group * s.sq * dim;
    const int64_t k_off = s.k0 * ldk + g * dim;
    pack_transposed(kt, ldt, x.k + k_off, ldk, s.sk, dim);
    pack_transposed(vt, ldt, x.v + k_off, ldk, s.sk, dim);
    pack_rows(kr, x.k + k_off, ldk, s.sk, dim);
    std::fill(dqr, dqr + group * s.sq * dim, 0.f);
    for (int64_t hh = 0; hh < group; ++hh) {
        const int64_t h = g * group + hh, base = s.q0 * ldq + h * dim;
        pack_rows(qr + hh * s.sq * dim, x.q + base, ldq, s.sq, dim);
        pack_rows(dor + hh * s.sq * dim, x.dout + base, ldq, s.sq, dim);
        const float* lse_h = x.lse + L.lse_offset(b, s, h);
        for (int64_t i = 0; i < s.sq; ++i) {
            const float* o_row = x.out + base + i * ldq;
            const float* do_row = x.dout + base + i * ldq;
            vec8 dot = {};
            for (int64_t d = 0; d < dim; d += 8) dot += load_vec<vec8>(o_row + d) * load_vec<vec8>(do_row + d);
            w.delta[hh * s.sq + i] = lane_sum(dot);
            w.lse[hh * s.sq + i] = lse_h[i] * kLn2;  // +inf stays +inf: that row's P is 0
        }
    }
    const float scale = L.scale;
    for (int64_t j0 = 0; j0 < s.sk; j0 += kBlockN) {
        const int64_t n = std::min(kBlockN, s.sk - j0), nc = round_up8(n);
        std::fill(w.dk.begin(), w.dk.begin() + n * dim, 0.f);
        std::fill(w.dv.begin(), w.dv.begin() + n * dim, 0.f);
        // The queries that see some key of the tile.
        const int64_t q_begin = L.right >= 0 ? std::max<int64_t>(0, j0 - diag - L.right) : 0;
        const int64_t q_end = L.left >= 0 ? std::min<int64_t>(s.sq, j0 + n - 1 - diag + L.left + 1) : s.sq;
        for (int64_t hh = 0; hh < group; ++hh) {
            const int64_t row0 = hh * s.sq * dim;
            for (int64_t i0 = q_begin; i0 < q_end; i0 += kBlockM) {
                const int64_t m = std::min(kBlockM, q_end - i0);
                const float* q_tile = qr + row0 + i0 * dim;
                const float* do_tile = dor + row0 + i0 * dim;
                float *p = w.p.data(), *ds = w.ds.data();
                const TileBands band(L, s, i0, m, j0, n);
                const float* lse_t = w.lse.data() + hh * s.sq + i0;
                const float* delta_t = w.delta.data() + hh * s.sq + i0;
                for (int64_t a = 0; a < m; a += kStrip) {
                    const int64_t a_end = std::min(m, a + kStrip), lo = band.lo[a], hi = band.hi[a_end - 1];
                    if (lo >= hi) continue;  // P and dS stay unread: no row of the strip sees these keys
                    const int64_t c_lo = lo / 8 * 8, c_hi = std::min(nc, round_up8(hi)), rows = a_end - a;
                    gemm<false>(p + a * nc + c_lo, nc, q_tile + a * dim, dim, 1, kt + j0 + c_lo, ldt, rows,
                                c_hi - c_lo, dim);  // S = Q K^T
                    gemm<false>(ds + a * nc + c_lo, nc, do_tile + a * dim, dim, 1, vt + j0 + c_lo, ldt, rows,
                                c_hi - c_lo, dim);  // dP = dO V^T
                    for (int64_t r = a; r < a_end; ++r) {
                        float *pr = p + r * nc, *dsr = ds + r * nc;
                        const int64_t rlo = band.lo[r], rhi = band.hi[r];
                        const float row_lse = lse_t[r], delta = delta_t[r];
                        // The strip's whole vectors with the band as a select, as in the forward
                        // (a select for dS too: outside the band dP may be anything, even NaN).
                        for (int64_t j = c_lo; j < c_hi; j += 8) {
                            const i32x8 in = in_band(j, rlo, rhi);
                            const vec8 e = in ? exp_nonpositive(load_vec<vec8>(pr + j) * scale - row_lse) : vec8{};
                            store_vec(pr + j, e);
                            // dS, with the softmax scale of dQ and dK
                            store_vec(dsr + j, in ? e * (load_vec<vec8>(dsr + j) - delta) * scale : vec8{});
                        }
                    }
                    gemm<true>(dqr + row0 + (i0 + a) * dim, dim, ds + a * nc + lo, nc, 1, kr + (j0 + lo) * dim, dim,
                               rows, dim, hi - lo);  // dQ += dS K over the strip's keys
                }
                // dV += P^T dO and dK += dS^T Q, kStrip keys at a time over the queries that see them:
                // rows [first whose hi passes the strip's first key, first whose lo reaches its end).
                int64_t r_begin = 0, r_end = 0;
                for (int64_t ka = 0; ka < n; ka += kStrip) {
                    const int64_t kb = std::min(n, ka + kStrip);
                    while (r_begin < m && band.hi[r_begin] <= ka) ++r_begin;
                    r_end = std::max(r_end, r_begin);
                    while (r_end < m && band.lo[r_end] < kb) ++r_end;
                    if (r_begin >= r_end) continue;
                    const int64_t t = r_end - r_begin;
                    gemm<true>(w.dv.data() + ka * dim, dim, p + r_begin * nc + ka, 1, nc, do_tile + r_begin * dim, dim,
                               kb - ka, dim, t);  // dV += P^T dO
                    gemm<true>(w.dk.data() + ka * dim, dim, ds + r_begin * nc + ka, 1, nc, q_tile + r_begin * dim, dim,
                               kb - ka, dim, t);  // dK += dS^T Q
                }
            }
        }
        for (int64_t j = 0; j < n; ++j) {
            std::copy(w.dk.begin() + j * dim, w.dk.begin() + (j + 1) * dim, x.dk + k_off + (j0 + j) * ldk);
            std::copy(w.dv.begin() + j * dim, w.dv.begin() + (j + 1) * dim, x.dv + k_off + (j0 + j) * ldk);
        }
    }
    for (int64_t hh = 0; hh < group; ++hh) {
        const int64_t base = s.q0 * ldq + (g * group + hh) * dim;
        for (int64_t i = 0; i < s.sq; ++i)
            std::copy(dqr + (hh * s.sq + i) * dim, dqr + (hh * s.sq + i + 1) * dim, x.dq + base + i * ldq);
    }
}

}  // namespace

void attention_fwd_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out,
                       std::optional<at::Tensor> lse, const std::optional<at::Tensor>& cu_seqlens_q,
                       const std::optional<at::Tensor>& cu_seqlens_k, int64_t max_seqlen_q, double scale,
                       int64_t left, int64_t right) {
    const Layout L = make_layout(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, scale, left, right);
    check_like(out, q, "out");
    if (lse.has_value()) check_lse(*lse, L, q);
    const float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>();
    advise_huge_pages(out);
    float* op = out.data_ptr<float>();
    float* lp = lse.has_value() ? lse->data_ptr<float>() : nullptr;
    const int64_t n_seqs = static_cast<int64_t>(L.seqs.size()), group = L.heads / L.kv_heads;
    const int64_t dim = L.dim, ldq = L.heads * dim, ldk = L.kv_heads * dim;
    const int64_t max_tiles = std::max<int64_t>(1, (max_seqlen_q + kBlockM - 1) / kBlockM);
    int64_t max_k = 0;
    for (const Seq& s : L.seqs) max_k = std::max(max_k, s.sk);
    // Work items: (sequence, kv head, query chunk): each packs the keys and values its queries see once
    // for every query head of the group. Sequences are split into chunks only when there are too few
    // (sequence, kv head) pairs to keep every thread busy (each chunk packs its keys again).
    const int64_t pairs = n_seqs * L.kv_heads;
    const int64_t chunks = std::min(max_tiles, (4 * at::get_num_threads() + pairs - 1) / pairs);
    at::parallel_for(0, pairs * chunks, 1, [&](int64_t begin, int64_t end) {
        Workspace ws(dim * (transposed_stride(max_k) + max_k));
        float* kt = ws.take(dim * transposed_stride(max_k));
        float* vr = ws.take(dim * max_k);
        FwdScratch w(dim);
        for (int64_t item = begin; item < end; ++item) {
            const int64_t chunk = item % chunks, g = item / chunks % L.kv_heads, b = item / chunks / L.kv_heads;
            const Seq& s = L.seqs[b];
            const int64_t tiles = (s.sq + kBlockM - 1) / kBlockM;
            const int64_t q_begin = std::min(s.sq, tiles * chunk / chunks * kBlockM);
            const int64_t q_end = std::min(s.sq, tiles * (chunk + 1) / chunks * kBlockM);
            if (q_begin >= q_end) continue;
            const int64_t diag = s.sk - s.sq;
            const int64_t k_begin = L.left >= 0 ? std::clamp<int64_t>(q_begin + diag - L.left, 0, s.sk) : 0;
            const int64_t k_end = L.right >= 0 ? std::clamp<int64_t>(q_end + diag + L.right, 0, s.sk) : s.sk;
            const int64_t n_keys = std::max<int64_t>(0, k_end - k_begin), ldt = transposed_stride(n_keys);
            const int64_t k_off = (s.k0 + k_begin) * ldk + g * dim;
            pack_transposed(kt, ldt, kp + k_off, ldk, n_keys, dim);
            pack_rows(vr, vp + k_off, ldk, n_keys, dim);
            for (int64_t h = g * group; h < (g + 1) * group; ++h) {
                for (int64_t i0 = q_begin; i0 < q_end; i0 += kBlockM) {
                    const int64_t off = (s.q0 + i0) * ldq + h * dim;
                    fwd_tile(L, s, qp + off, kt, ldt, vr, k_begin, op + off,
                             lp != nullptr ? lp + L.lse_offset(b, s, h) + i0 : nullptr, i0,
                             std::min(kBlockM, q_end - i0), w);
                }
            }
        }
    });
}

void attention_bwd_cpu(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                       const at::Tensor& out, const at::Tensor& lse, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv,
                       const std::optional<at::Tensor>& cu_seqlens_q, const std::optional<at::Tensor>& cu_seqlens_k,
                       int64_t max_seqlen_q, double scale, int64_t left, int64_t right) {
    const Layout L = make_layout(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, scale, left, right);
    check_like(dout, q, "dout");
    check_like(out, q, "out");
    check_like(dq, q, "dq");
    check_like(dk, k, "dk");
    check_like(dv, k, "dv");
    check_lse(lse, L, q);
    for (const at::Tensor* grad : {&dq, &dk, &dv}) advise_huge_pages(*grad);
    const BwdOperands x{dout.data_ptr<float>(), q.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>(),
                        out.data_ptr<float>(), lse.data_ptr<float>(), dq.data_ptr<float>(), dk.data_ptr<float>(),
                        dv.data_ptr<float>()};
    const int64_t group = L.heads / L.kv_heads, n_seqs = static_cast<int64_t>(L.seqs.size());
    int64_t max_k = 0;
    for (const Seq& s : L.seqs) max_k = std::max(max_k, s.sk);
    // Work items: (sequence, kv head). Each owns its dK/dV rows and the dQ rows of its query heads,
    // so nothing is shared between threads and the sums run in a fixed order (deterministic).
    at::parallel_for(0, n_seqs * L.kv_heads, 1, [&](int64_t begin, int64_t end) {
        Workspace ws(bwd_packed_floats(L.dim, group, max_seqlen_q, max_k));
        float* packed = ws.take(bwd_packed_floats(L.dim, group, max_seqlen_q, max_k));
        BwdScratch w(L.dim, group * max_seqlen_q);
        for (int64_t item = begin; item < end; ++item)
            bwd_item(L, item / L.kv_heads, L.seqs[item / L.kv_heads], item % L.kv_heads, x, packed, w);
    });
}
