// HBFP GEMM datapath (contract §5): operand encoding, the block multiplier-adder kernels
// and the ordered float32 accumulator. See hbfp_gemm.h.
#include "hbfp_gemm.h"

#include <immintrin.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <vector>

namespace coltrain_hw {
namespace {

constexpr int64_t kRowTile = 4;   // output rows per kernel tile
constexpr int64_t kColTile = 64;  // output columns per kernel tile (= padding of N)

int64_t round_up(int64_t x, int64_t to) { return (x + to - 1) / to * to; }

// Both operands in the datapath's layout. Q = int16_t (m <= 16) or int32_t.
//   qa  [m_pad][nb][bpad]        row i's block k, pairs (2p, 2p+1) adjacent
//   qb  [nb][pairs][n_pad][2]    block k, pair p, column j: (q[2p, j], q[2p+1, j])
//   ea, nfa [m_pad][nb];  eb, nfb [nb][n_pad]    shared exponents, non-finite flags
// Padding rows/columns/positions hold zero mantissas, exponent 0, finite.
template <typename Q>
struct Encoded {
  int64_t m_pad, n_pad, nb, bpad, pairs;
  std::vector<Q> qa, qb;
  std::vector<int32_t> ea, eb;
  std::vector<uint8_t> nfa, nfb;
};

// Rows [i0, i1) of A: blocks run along each row (contiguous).
template <Rounding R, typename Q>
inline __attribute__((always_inline)) void encode_lhs_rows_t(const GemmArgs& g, Encoded<Q>& e,
                                                             int64_t i0, int64_t i1) {
  const int64_t b = g.lhs.block;
  for (int64_t i = i0; i < i1; ++i) {
    for (int64_t kb = 0; kb < e.nb; ++kb) {
      const int64_t t0 = kb * b;
      const int32_t len = static_cast<int32_t>(std::min(b, g.k - t0));
      const uint32_t* bits = g.bits_a ? g.bits_a + i * g.k + t0 : nullptr;
      const BlockCode code = encode_block_t<R>(g.a + i * g.k + t0, 1, len, g.lhs, bits,
                                               &e.qa[(i * e.nb + kb) * e.bpad]);
      e.ea[i * e.nb + kb] = code.exponent;
      e.nfa[i * e.nb + kb] = code.nonfinite;
    }
  }
}

// Block kb of B for columns [j0, j0 + kColTile): blocks run down the columns, read row by
// row, then scattered into the pair layout.
template <Rounding R, typename Q>
inline __attribute__((always_inline)) void encode_rhs_tile_t(const GemmArgs& g, Encoded<Q>& e,
                                                             int64_t kb, int64_t j0) {
  const int64_t b = g.rhs.block;
  const int64_t lanes = std::min(kColTile, g.n - j0);
  const int64_t t0 = kb * b;
  const int32_t len = static_cast<int32_t>(std::min(b, g.k - t0));
  int32_t emax[kColTile];
  thread_local std::vector<Q> tile;
  tile.resize(static_cast<size_t>(len) * kColTile);
  const uint32_t* bits = g.bits_b ? g.bits_b + t0 * g.n + j0 : nullptr;
  encode_block_lanes_t<R>(g.b + t0 * g.n + j0, g.n, len, lanes, g.rhs, bits, tile.data(),
                          kColTile, &e.eb[kb * e.n_pad + j0], &e.nfb[kb * e.n_pad + j0], emax);
  for (int32_t t = 0; t < len; ++t) {
    Q* dst = &e.qb[((kb * e.pairs + t / 2) * e.n_pad + j0) * 2 + (t % 2)];
    for (int64_t j = 0; j < lanes; ++j) dst[2 * j] = tile[t * kColTile + j];
  }
}

// The encoders compiled for AVX-512, AVX2 and baseline x86-64; the loader picks one.
#define COLTRAIN_CLONES __attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))
#define COLTRAIN_ROUNDING_SWITCH(call)                                   \
  switch (g.rounding) {                                                  \
    case Rounding::kStochastic: call(Rounding::kStochastic); break;     \
    case Rounding::kTowardZero: call(Rounding::kTowardZero); break;     \
    default: call(Rounding::kNearestEven);                               \
  }

#define LHS_CALL(R) encode_lhs_rows_t<R>(g, e, i0, i1)
#define RHS_CALL(R) encode_rhs_tile_t<R>(g, e, kb, j0)
COLTRAIN_CLONES void encode_lhs_rows(const GemmArgs& g, Encoded<int16_t>& e, int64_t i0,
                                     int64_t i1) {
  COLTRAIN_ROUNDING_SWITCH(LHS_CALL)
}
COLTRAIN_CLONES void encode_lhs_rows(const GemmArgs& g, Encoded<int32_t>& e, int64_t i0,
                                     int64_t i1) {
  COLTRAIN_ROUNDING_SWITCH(LHS_CALL)
}
COLTRAIN_CLONES void encode_rhs_tile(const GemmArgs& g, Encoded<int16_t>& e, int64_t kb,
                                     int64_t j0) {
  COLTRAIN_ROUNDING_SWITCH(RHS_CALL)
}
COLTRAIN_CLONES void encode_rhs_tile(const GemmArgs& g, Encoded<int32_t>& e, int64_t kb,
                                     int64_t j0) {
  COLTRAIN_ROUNDING_SWITCH(RHS_CALL)
}
#undef LHS_CALL
#undef RHS_CALL

// Encodes both operands into `e` (buffers reused between calls on the same thread).
template <typename Q>
void encode_operands(const GemmArgs& g, const ParallelFor& parallel, Encoded<Q>& e) {
  const int64_t b = g.lhs.block;
  e.m_pad = round_up(g.m, kRowTile);
  e.n_pad = round_up(g.n, kColTile);
  e.nb = (g.k + b - 1) / b;
  e.bpad = round_up(b, 2);
  e.pairs = e.bpad / 2;
  e.qa.assign(e.m_pad * e.nb * e.bpad, 0);
  e.ea.assign(e.m_pad * e.nb, 0);
  e.nfa.assign(e.m_pad * e.nb, 0);
  e.qb.assign(e.nb * e.pairs * e.n_pad * 2, 0);
  e.eb.assign(e.nb * e.n_pad, 0);
  e.nfb.assign(e.nb * e.n_pad, 0);
  const int64_t row_tasks = std::min<int64_t>(g.m, 32);
  parallel(row_tasks, [&](int64_t task) {
    encode_lhs_rows(g, e, g.m * task / row_tasks, g.m * (task + 1) / row_tasks);
  });
  const int64_t col_groups = (g.n + kColTile - 1) / kColTile;
  parallel(col_groups * e.nb, [&](int64_t task) {
    encode_rhs_tile(g, e, task / col_groups, (task % col_groups) * kColTile);
  });
}

// ---------------------------------------------------------------------------------------
// Reference kernel: the datapath exactly as §5 reads, one output at a time.

template <typename Q>
void kernel_reference(const Encoded<Q>& e, int32_t step_shift, int64_t r0, int64_t r1,
                      float* c) {
  for (int64_t i = r0; i < r1; ++i) {
    for (int64_t j = 0; j < e.n_pad; ++j) {
      uint32_t acc = 0;  // +0
      for (int64_t kb = 0; kb < e.nb; ++kb) {
        // 1. block multiplier-adder: exact integer block product
        const Q* qa = &e.qa[(i * e.nb + kb) * e.bpad];
        int64_t p = 0;
        for (int64_t t = 0; t < e.bpad; ++t) {
          const Q qb = e.qb[((kb * e.pairs + t / 2) * e.n_pad + j) * 2 + (t % 2)];
          p += static_cast<int64_t>(qa[t]) * static_cast<int64_t>(qb);
        }
        // 2. scale by the two shared exponents, one rounding to float32
        uint32_t v;
        if (e.nfa[i * e.nb + kb] || e.nfb[kb * e.n_pad + j]) {
          v = kNanBits;
        } else {
          const int32_t shift = e.ea[i * e.nb + kb] + e.eb[kb * e.n_pad + j] - step_shift;
          v = int_to_f32_scaled_bits(static_cast<int32_t>(p), shift);
        }
        // 3. ordered float32 accumulation with FTZ
        acc = ftz_bits(f32_to_bits(bits_to_f32(acc) + bits_to_f32(v)));
      }
      c[i * e.n_pad + j] = bits_to_f32(acc);
    }
  }
}

// ---------------------------------------------------------------------------------------
// AVX-512 VNNI kernel: a 4 x 64 output tile; per pair of K positions, one vpdpwssd per
// 16 outputs multiplies two int16 mantissa pairs and adds them to the int32 block sums.

#define COLTRAIN_AVX512 __attribute__((target("avx512f,avx512bw,avx512vnni")))

COLTRAIN_AVX512 inline __m512 scale_accumulate_avx512(__m512i p, __m512i shift,
                                                      __mmask16 nonfinite, __m512 acc) {
  const __m512i sign_mask = _mm512_set1_epi32(static_cast<int32_t>(kSignMask));
  const __m512i u = _mm512_castps_si512(_mm512_cvtepi32_ps(p));  // RNE at 24 bits
  const __m512i sign = _mm512_and_si512(u, sign_mask);
  const __m512i e = _mm512_and_si512(_mm512_srli_epi32(u, 23), _mm512_set1_epi32(0xff));
  const __m512i ne = _mm512_add_epi32(e, shift);
  const __m512i clamped = _mm512_min_epi32(_mm512_max_epi32(ne, _mm512_set1_epi32(1)),
                                           _mm512_set1_epi32(254));
  __m512i v = _mm512_or_si512(
      _mm512_and_si512(u, _mm512_set1_epi32(static_cast<int32_t>(kSignMask | kFracMask))),
      _mm512_slli_epi32(clamped, 23));
  v = _mm512_mask_mov_epi32(
      v, _mm512_cmpge_epi32_mask(ne, _mm512_set1_epi32(255)),
      _mm512_or_si512(sign, _mm512_set1_epi32(static_cast<int32_t>(kInfBits))));
  const __mmask16 to_zero = _mm512_cmple_epi32_mask(ne, _mm512_setzero_si512()) |
                            _mm512_cmpeq_epi32_mask(e, _mm512_setzero_si512());
  v = _mm512_mask_mov_epi32(v, to_zero, sign);
  v = _mm512_mask_mov_epi32(v, nonfinite, _mm512_set1_epi32(static_cast<int32_t>(kNanBits)));
  const __m512i s = _mm512_castps_si512(_mm512_add_ps(acc, _mm512_castsi512_ps(v)));
  const __mmask16 tiny = _mm512_testn_epi32_mask(
      s, _mm512_set1_epi32(static_cast<int32_t>(kExpMask)));
  return _mm512_castsi512_ps(_mm512_mask_mov_epi32(s, tiny, _mm512_and_si512(s, sign_mask)));
}

// The int32 block sums of a 4 x 64 tile live in 16 registers; the float32 accumulators
// live in the output tile (L1-resident), read and written once per block.
COLTRAIN_AVX512 void kernel_avx512(const Encoded<int16_t>& e, int32_t step_shift, int64_t r0,
                                   int64_t r1, float* c) {
  for (int64_t j0 = 0; j0 < e.n_pad; j0 += kColTile) {
    for (int64_t i = r0; i < r1; i += kRowTile) {
      for (int r = 0; r < kRowTile; ++r)
        for (int q = 0; q < 4; ++q)
          _mm512_storeu_ps(&c[(i + r) * e.n_pad + j0 + 16 * q], _mm512_setzero_ps());
      for (int64_t kb = 0; kb < e.nb; ++kb) {
        const int16_t* qb = &e.qb[(kb * e.pairs * e.n_pad + j0) * 2];
        const int16_t* a0 = &e.qa[((i + 0) * e.nb + kb) * e.bpad];
        const int16_t* a1 = &e.qa[((i + 1) * e.nb + kb) * e.bpad];
        const int16_t* a2 = &e.qa[((i + 2) * e.nb + kb) * e.bpad];
        const int16_t* a3 = &e.qa[((i + 3) * e.nb + kb) * e.bpad];
        __m512i p00 = _mm512_setzero_si512(), p01 = p00, p02 = p00, p03 = p00;
        __m512i p10 = p00, p11 = p00, p12 = p00, p13 = p00;
        __m512i p20 = p00, p21 = p00, p22 = p00, p23 = p00;
        __m512i p30 = p00, p31 = p00, p32 = p00, p33 = p00;
        for (int64_t t2 = 0; t2 < e.pairs; ++t2) {
          const int16_t* row = qb + t2 * e.n_pad * 2;
          const __m512i b0 = _mm512_loadu_si512(row);
          const __m512i b1 = _mm512_loadu_si512(row + 32);
          const __m512i b2 = _mm512_loadu_si512(row + 64);
          const __m512i b3 = _mm512_loadu_si512(row + 96);
          int32_t pair;
#define COLTRAIN_ROW(r, ar)                                    \
  std::memcpy(&pair, ar + 2 * t2, 4);                          \
  {                                                            \
    const __m512i av = _mm512_set1_epi32(pair);                \
    p##r##0 = _mm512_dpwssd_epi32(p##r##0, av, b0);            \
    p##r##1 = _mm512_dpwssd_epi32(p##r##1, av, b1);            \
    p##r##2 = _mm512_dpwssd_epi32(p##r##2, av, b2);            \
    p##r##3 = _mm512_dpwssd_epi32(p##r##3, av, b3);            \
  }
          COLTRAIN_ROW(0, a0)
          COLTRAIN_ROW(1, a1)
          COLTRAIN_ROW(2, a2)
          COLTRAIN_ROW(3, a3)
#undef COLTRAIN_ROW
        }
        const __m512i sums[kRowTile][4] = {{p00, p01, p02, p03}, {p10, p11, p12, p13},
                                           {p20, p21, p22, p23}, {p30, p31, p32, p33}};
        for (int q = 0; q < 4; ++q) {
          const int64_t j = j0 + 16 * q;
          const __m512i eb = _mm512_loadu_si512(&e.eb[kb * e.n_pad + j]);
          const __mmask16 nfb = _mm512_test_epi32_mask(
              _mm512_cvtepu8_epi32(_mm_loadu_si128(
                  reinterpret_cast<const __m128i*>(&e.nfb[kb * e.n_pad + j]))),
              _mm512_set1_epi32(1));
          for (int r = 0; r < kRowTile; ++r) {
            const int64_t ia = (i + r) * e.nb + kb;
            const __m512i shift =
                _mm512_add_epi32(eb, _mm512_set1_epi32(e.ea[ia] - step_shift));
            const __mmask16 nf = e.nfa[ia] ? static_cast<__mmask16>(0xffff) : nfb;
            float* out = &c[(i + r) * e.n_pad + j];
            _mm512_storeu_ps(out, scale_accumulate_avx512(sums[r][q], shift, nf,
                                                          _mm512_loadu_ps(out)));
          }
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------
// AVX2 kernel: a 4 x 16 output tile; vpmaddwd multiplies int16 pairs and adds each pair.

#define COLTRAIN_AVX2 __attribute__((target("avx2")))

COLTRAIN_AVX2 inline __m256 scale_accumulate_avx2(__m256i p, __m256i shift, __m256i nonfinite,
                                                  __m256 acc) {
  const __m256i sign_mask = _mm256_set1_epi32(static_cast<int32_t>(kSignMask));
  const __m256i u = _mm256_castps_si256(_mm256_cvtepi32_ps(p));
  const __m256i sign = _mm256_and_si256(u, sign_mask);
  const __m256i e = _mm256_and_si256(_mm256_srli_epi32(u, 23), _mm256_set1_epi32(0xff));
  const __m256i ne = _mm256_add_epi32(e, shift);
  const __m256i clamped = _mm256_min_epi32(_mm256_max_epi32(ne, _mm256_set1_epi32(1)),
                                           _mm256_set1_epi32(254));
  __m256i v = _mm256_or_si256(
      _mm256_and_si256(u, _mm256_set1_epi32(static_cast<int32_t>(kSignMask | kFracMask))),
      _mm256_slli_epi32(clamped, 23));
  const __m256i overflow = _mm256_cmpgt_epi32(ne, _mm256_set1_epi32(254));
  v = _mm256_blendv_epi8(
      v, _mm256_or_si256(sign, _mm256_set1_epi32(static_cast<int32_t>(kInfBits))), overflow);
  const __m256i to_zero = _mm256_or_si256(_mm256_cmpgt_epi32(_mm256_set1_epi32(1), ne),
                                          _mm256_cmpeq_epi32(e, _mm256_setzero_si256()));
  v = _mm256_blendv_epi8(v, sign, to_zero);
  v = _mm256_blendv_epi8(v, _mm256_set1_epi32(static_cast<int32_t>(kNanBits)), nonfinite);
  const __m256i s = _mm256_castps_si256(_mm256_add_ps(acc, _mm256_castsi256_ps(v)));
  const __m256i tiny = _mm256_cmpeq_epi32(
      _mm256_and_si256(s, _mm256_set1_epi32(static_cast<int32_t>(kExpMask))),
      _mm256_setzero_si256());
  return _mm256_castsi256_ps(_mm256_blendv_epi8(s, _mm256_and_si256(s, sign_mask), tiny));
}

COLTRAIN_AVX2 void kernel_avx2(const Encoded<int16_t>& e, int32_t step_shift, int64_t r0,
                               int64_t r1, float* c) {
  for (int64_t j0 = 0; j0 < e.n_pad; j0 += 16) {
    for (int64_t i = r0; i < r1; i += kRowTile) {
      __m256 acc[kRowTile][2];
      for (int r = 0; r < kRowTile; ++r)
        for (int q = 0; q < 2; ++q) acc[r][q] = _mm256_setzero_ps();
      for (int64_t kb = 0; kb < e.nb; ++kb) {
        __m256i p[kRowTile][2];
        for (int r = 0; r < kRowTile; ++r)
          for (int q = 0; q < 2; ++q) p[r][q] = _mm256_setzero_si256();
        const int16_t* qb = &e.qb[(kb * e.pairs * e.n_pad + j0) * 2];
        const int16_t* qa[kRowTile];
        for (int r = 0; r < kRowTile; ++r) qa[r] = &e.qa[((i + r) * e.nb + kb) * e.bpad];
        for (int64_t t2 = 0; t2 < e.pairs; ++t2) {
          const int16_t* row = qb + t2 * e.n_pad * 2;
          const __m256i b0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row));
          const __m256i b1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + 16));
          for (int r = 0; r < kRowTile; ++r) {
            int32_t pair;
            std::memcpy(&pair, qa[r] + 2 * t2, 4);
            const __m256i av = _mm256_set1_epi32(pair);
            p[r][0] = _mm256_add_epi32(p[r][0], _mm256_madd_epi16(av, b0));
            p[r][1] = _mm256_add_epi32(p[r][1], _mm256_madd_epi16(av, b1));
          }
        }
        for (int q = 0; q < 2; ++q) {
          const int64_t j = j0 + 8 * q;
          const __m256i eb = _mm256_loadu_si256(
              reinterpret_cast<const __m256i*>(&e.eb[kb * e.n_pad + j]));
          const __m256i nfb = _mm256_sub_epi32(
              _mm256_setzero_si256(),
              _mm256_cvtepu8_epi32(_mm_loadl_epi64(
                  reinterpret_cast<const __m128i*>(&e.nfb[kb * e.n_pad + j]))));
          for (int r = 0; r < kRowTile; ++r) {
            const int64_t ia = (i + r) * e.nb + kb;
            const __m256i shift =
                _mm256_add_epi32(eb, _mm256_set1_epi32(e.ea[ia] - step_shift));
            const __m256i nf = e.nfa[ia] ? _mm256_set1_epi32(-1) : nfb;
            acc[r][q] = scale_accumulate_avx2(p[r][q], shift, nf, acc[r][q]);
          }
        }
      }
      for (int r = 0; r < kRowTile; ++r)
        for (int q = 0; q < 2; ++q)
          _mm256_storeu_ps(&c[(i + r) * e.n_pad + j0 + 8 * q], acc[r][q]);
    }
  }
}

// ---------------------------------------------------------------------------------------

enum class Kernel { kReference, kAvx2, kAvx512 };

Kernel choose_kernel() {
  if (const char* forced = std::getenv("COLTRAIN_HW_KERNEL")) {
    const std::string f(forced);
    if (f == "reference") return Kernel::kReference;
    if (f == "avx2" && __builtin_cpu_supports("avx2")) return Kernel::kAvx2;
    if (f == "avx512" && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vnni"))
      return Kernel::kAvx512;
  }
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vnni"))
    return Kernel::kAvx512;
  if (__builtin_cpu_supports("avx2")) return Kernel::kAvx2;
  return Kernel::kReference;
}

Kernel current_kernel() {
  // Read on every call (cheap) so tests can switch kernels with COLTRAIN_HW_KERNEL.
  return choose_kernel();
}

template <typename Q>
void run(const GemmArgs& g, const ParallelFor& parallel, Kernel kernel) {
  // Buffers reused between calls on this thread. (Tasks on other threads must reach them
  // through these references: naming a thread_local inside a lambda names the running
  // thread's own instance.)
  thread_local Encoded<Q> encoded;
  thread_local std::vector<float> scratch_buffer;
  Encoded<Q>& e = encoded;
  std::vector<float>& scratch = scratch_buffer;
  encode_operands<Q>(g, parallel, e);
  const int32_t step_shift = g.lhs.step_shift() + g.rhs.step_shift();
  // Kernels write whole tiles: straight into c when it has whole tiles, else a scratch.
  const bool direct = e.m_pad == g.m && e.n_pad == g.n;
  if (!direct) scratch.resize(e.m_pad * e.n_pad);
  float* c_pad = direct ? g.c : scratch.data();
  const int64_t tiles = e.m_pad / kRowTile;
  const int64_t tasks = std::min<int64_t>(tiles, 64);
  parallel(tasks, [&](int64_t task) {
    const int64_t r0 = tiles * task / tasks * kRowTile;
    const int64_t r1 = tiles * (task + 1) / tasks * kRowTile;
    if (r0 == r1) return;
    if constexpr (std::is_same_v<Q, int16_t>) {
      if (kernel == Kernel::kAvx512) return kernel_avx512(e, step_shift, r0, r1, c_pad);
      if (kernel == Kernel::kAvx2) return kernel_avx2(e, step_shift, r0, r1, c_pad);
    }
    kernel_reference(e, step_shift, r0, r1, c_pad);
  });
  if (!direct) {
    for (int64_t i = 0; i < g.m; ++i) {
      std::memcpy(g.c + i * g.n, &scratch[i * e.n_pad], sizeof(float) * g.n);
    }
  }
}

}  // namespace

std::string check_gemm(const GemmArgs& g) {
  for (const BfpFormat* f : {&g.lhs, &g.rhs}) {
    if (f->mantissa_bits < 2 || f->mantissa_bits > 24)
      return "mantissa bits must be in [2, 24], got " + std::to_string(f->mantissa_bits);
  }
  if (g.lhs.block != g.rhs.block || g.lhs.block < 1)
    return "both operands need the same positive block size";
  const int64_t bound =
      static_cast<int64_t>(g.lhs.block) * g.lhs.qmax() * static_cast<int64_t>(g.rhs.qmax());
  if (bound >= (int64_t{1} << 31))
    return "block * qmax_lhs * qmax_rhs = " + std::to_string(bound) +
           " >= 2^31 overflows the int32 block accumulator";
  return "";
}

void hbfp_gemm(const GemmArgs& g, const ParallelFor& parallel) {
  if (g.m == 0 || g.n == 0) return;
  if (g.k == 0) {  // no blocks: acc stays +0
    std::fill(g.c, g.c + g.m * g.n, 0.0f);
    return;
  }
  const bool int16_ok = g.lhs.mantissa_bits <= 16 && g.rhs.mantissa_bits <= 16;
  if (int16_ok) {
    run<int16_t>(g, parallel, current_kernel());
  } else {
    run<int32_t>(g, parallel, Kernel::kReference);
  }
}

const char* selected_kernel() {
  switch (current_kernel()) {
    case Kernel::kAvx512: return "avx512";
    case Kernel::kAvx2: return "avx2";
    default: return "reference";
  }
}

}  // namespace coltrain_hw
