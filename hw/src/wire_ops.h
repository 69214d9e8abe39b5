// Row-wise BFP quantize / pack / unpack and top-k selection of the CPU model: the
// communication kernels (the packed wire format of the `bfp` compressor, the index/value
// selection of `top_k`). Rows are independent; blocks run along each row.
#ifndef COLTRAIN_HW_WIRE_OPS_H_
#define COLTRAIN_HW_WIRE_OPS_H_

#include <cstdint>

#include "bfp_quantizer.h"

namespace coltrain_hw {

// y[r, :] = decode(encode(x[r, :])) (contract §2): quantize-dequantize along the row.
// bits: uint32 (rows, len) for stochastic rounding, else null.
void bfp_quantize_rows(const float* x, const uint32_t* bits, int64_t rows, int64_t len,
                       BfpFormat fmt, Rounding rounding, float* y);

// The wire format: mantissas (rows, len) of type Q (int8 for m <= 8, int16 for m <= 16,
// int32), exponents int8 (rows, nb) with -128 for a NaN/inf block.
template <typename Q>
void bfp_pack_rows(const float* x, const uint32_t* bits, int64_t rows, int64_t len,
                   BfpFormat fmt, Rounding rounding, Q* mantissas, int8_t* exponents);

// Inverse of bfp_pack_rows: decoded float32 values (FTZ), NaN for a -128 block.
template <typename Q>
void bfp_unpack_rows(const Q* mantissas, const int8_t* exponents, int64_t rows, int64_t len,
                     BfpFormat fmt, float* y);

// Per row, the k entries of largest magnitude (ordered by the magnitude's bit pattern,
// so NaN > inf > finite and -0 == +0; ties go to the lower index), written in ascending
// index order: indices int32 (rows, k), values float32 (rows, k). Requires k <= len.
void top_k_rows(const float* x, int64_t rows, int64_t len, int64_t k, int32_t* indices,
                float* values);

}  // namespace coltrain_hw

#endif  // COLTRAIN_HW_WIRE_OPS_H_
