// The HBFP GEMM datapath of the accelerator (numerics contract §5), CPU model.
//
// C = A · B with A (M, K) in bfp(ma, b) and B (K, N) in bfp(mb, b), both quantized along
// K with the same block boundaries (nb = ceil(K / b) blocks). For each output (i, j):
//   1. block multiplier-adder: P_k = sum_t qa[i, t] * qb[t, j] over block k, an exact
//      integer (b * qmax_a * qmax_b < 2^31 is required, so int32 never overflows);
//   2. v_k = P_k * 2^(Ea[i,k] + Eb[k,j] - (ma - 2) - (mb - 2)) rounded to float32 (§0);
//      NaN if either block is non-finite;
//   3. float32 accumulator: acc = +0; acc = FTZ(acc + v_k) for k = 0 .. nb-1 in order.
//
// The mantissas travel as int16 (m <= 16; pairs multiplied and added with one
// multiply-add instruction) or int32. Kernels: a readable scalar reference, AVX2 and
// AVX-512 VNNI versions, chosen at run time from the CPU (or COLTRAIN_HW_KERNEL=
// reference|avx2|avx512); all compute exactly the same bits.
#ifndef COLTRAIN_HW_HBFP_GEMM_H_
#define COLTRAIN_HW_HBFP_GEMM_H_

#include <cstdint>
#include <functional>
#include <string>

#include "bfp_quantizer.h"

namespace coltrain_hw {

// Runs fn(0) .. fn(n - 1), possibly concurrently, and returns when all are done.
using ParallelFor = std::function<void(int64_t n, const std::function<void(int64_t)>& fn)>;

struct GemmArgs {
  int64_t m, k, n;
  BfpFormat lhs, rhs;      // same block size
  Rounding rounding;
  const float* a;          // (m, k) row-major
  const float* b;          // (k, n) row-major
  const uint32_t* bits_a;  // (m, k) or null; stochastic rounding only
  const uint32_t* bits_b;  // (k, n) or null
  float* c;                // (m, n) row-major
};

// Returns an empty string on success, otherwise the reason the configuration is invalid
// (e.g. block products that could overflow int32).
std::string check_gemm(const GemmArgs& args);

// Computes args.c on the §5 datapath. `parallel` may run tasks on several threads.
void hbfp_gemm(const GemmArgs& args, const ParallelFor& parallel);

// The kernel hbfp_gemm uses for int16 mantissas on this CPU: "avx512", "avx2" or
// "reference" (COLTRAIN_HW_KERNEL overrides the choice).
const char* selected_kernel();

}  // namespace coltrain_hw

#endif  // COLTRAIN_HW_HBFP_GEMM_H_
