#include "wire_ops.h"

#include <algorithm>
#include <numeric>
#include <vector>

namespace coltrain_hw {
namespace {

int64_t num_blocks(int64_t len, int32_t block) { return (len + block - 1) / block; }

}  // namespace

void bfp_quantize_rows(const float* x, const uint32_t* bits, int64_t rows, int64_t len,
                       BfpFormat fmt, Rounding rounding, float* y) {
  std::vector<int32_t> q(fmt.block);
  const int64_t nb = num_blocks(len, fmt.block);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t kb = 0; kb < nb; ++kb) {
      const int64_t t0 = r * len + kb * fmt.block;
      const int32_t n = static_cast<int32_t>(std::min<int64_t>(fmt.block, len - kb * fmt.block));
      const BlockCode code = encode_block(x + t0, 1, n, fmt, rounding,
                                          bits ? bits + t0 : nullptr, q.data());
      for (int32_t i = 0; i < n; ++i) {
        y[t0 + i] = code.nonfinite ? bits_to_f32(kNanBits)
                                   : decode_element(q[i], code.exponent, fmt);
      }
    }
  }
}

template <typename Q>
void bfp_pack_rows(const float* x, const uint32_t* bits, int64_t rows, int64_t len,
                   BfpFormat fmt, Rounding rounding, Q* mantissas, int8_t* exponents) {
  const int64_t nb = num_blocks(len, fmt.block);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t kb = 0; kb < nb; ++kb) {
      const int64_t t0 = r * len + kb * fmt.block;
      const int32_t n = static_cast<int32_t>(std::min<int64_t>(fmt.block, len - kb * fmt.block));
      const BlockCode code = encode_block(x + t0, 1, n, fmt, rounding,
                                          bits ? bits + t0 : nullptr, mantissas + t0);
      exponents[r * nb + kb] =
          code.nonfinite ? kNonfiniteExponentByte : static_cast<int8_t>(code.exponent);
    }
  }
}

template <typename Q>
void bfp_unpack_rows(const Q* mantissas, const int8_t* exponents, int64_t rows, int64_t len,
                     BfpFormat fmt, float* y) {
  const int64_t nb = num_blocks(len, fmt.block);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t t = 0; t < len; ++t) {
      const int8_t e = exponents[r * nb + t / fmt.block];
      y[r * len + t] = e == kNonfiniteExponentByte
                           ? bits_to_f32(kNanBits)
                           : decode_element(mantissas[r * len + t], e, fmt);
    }
  }
}

template void bfp_pack_rows<int8_t>(const float*, const uint32_t*, int64_t, int64_t, BfpFormat,
                                    Rounding, int8_t*, int8_t*);
template void bfp_pack_rows<int16_t>(const float*, const uint32_t*, int64_t, int64_t, BfpFormat,
                                     Rounding, int16_t*, int8_t*);
template void bfp_pack_rows<int32_t>(const float*, const uint32_t*, int64_t, int64_t, BfpFormat,
                                     Rounding, int32_t*, int8_t*);
template void bfp_unpack_rows<int8_t>(const int8_t*, const int8_t*, int64_t, int64_t, BfpFormat,
                                      float*);
template void bfp_unpack_rows<int16_t>(const int16_t*, const int8_t*, int64_t, int64_t,
                                       BfpFormat, float*);
template void bfp_unpack_rows<int32_t>(const int32_t*, const int8_t*, int64_t, int64_t,
                                       BfpFormat, float*);

void top_k_rows(const float* x, int64_t rows, int64_t len, int64_t k, int32_t* indices,
                float* values) {
  std::vector<int32_t> order(len);
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = x + r * len;
    std::iota(order.begin(), order.end(), 0);
    // Larger magnitude first; equal magnitudes: lower index first.
    auto before = [row](int32_t a, int32_t b) {
      const uint32_t ma = f32_to_bits(row[a]) & ~kSignMask;
      const uint32_t mb = f32_to_bits(row[b]) & ~kSignMask;
      return ma != mb ? ma > mb : a < b;
    };
    if (k < len) std::nth_element(order.begin(), order.begin() + k, order.end(), before);
    std::sort(order.begin(), order.begin() + k);
    for (int64_t i = 0; i < k; ++i) {
      indices[r * k + i] = order[i];
      values[r * k + i] = row[order[i]];
    }
  }
}

}  // namespace coltrain_hw
