// The block floating point quantizer of the accelerator (numerics contract §0, §2, §4),
// on float32 bit patterns with fixed-width integers only (no float arithmetic, so the
// processor's FTZ/DAZ modes cannot change a result).
//
// Field names: for float32 bits u, sign = u >> 31, biased exponent e = (u >> 23) & 0xff,
// fraction f = u & 0x7fffff; a normal number is (-1)^sign * (2^23 + f) * 2^(e - 150).
#ifndef COLTRAIN_HW_BFP_QUANTIZER_H_
#define COLTRAIN_HW_BFP_QUANTIZER_H_

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace coltrain_hw {

enum class Rounding : int32_t { kNearestEven = 0, kStochastic = 1, kTowardZero = 2 };

constexpr uint32_t kSignMask = 0x80000000u;
constexpr uint32_t kExpMask = 0x7f800000u;
constexpr uint32_t kFracMask = 0x007fffffu;
constexpr uint32_t kInfBits = 0x7f800000u;
constexpr uint32_t kNanBits = 0x7fc00000u;
constexpr int32_t kHiddenBit = 0x00800000;
constexpr int8_t kNonfiniteExponentByte = -128;  // wire format: a NaN/inf block

// bfp(m, b): m mantissa bits including the sign, block size b.
struct BfpFormat {
  int32_t mantissa_bits;
  int32_t block;
  int32_t qmax() const { return (int32_t{1} << (mantissa_bits - 1)) - 1; }
  int32_t step_shift() const { return mantissa_bits - 2; }  // step = 2^(E - step_shift)
};

inline uint32_t f32_to_bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  return u;
}

inline float bits_to_f32(uint32_t u) {
  float x;
  std::memcpy(&x, &u, 4);
  return x;
}

inline int32_t biased_exponent(uint32_t u) { return static_cast<int32_t>((u >> 23) & 0xffu); }

// FTZ (§0): a value whose magnitude is below 2^-126 becomes a zero of the same sign.
inline uint32_t ftz_bits(uint32_t u) { return (u & kExpMask) == 0 ? (u & kSignMask) : u; }

// x * 2^k for float32 bits u holding zero or a normal number, any int32 k; exact apart
// from FTZ below 2^-126 and overflow to inf at or above 2^128 (no rounding can occur:
// u already has 24 significant bits).
inline uint32_t scale_pow2_bits(uint32_t u, int32_t k) {
  const uint32_t sign = u & kSignMask;
  const int32_t e = biased_exponent(u);
  if (e == 0) return sign;
  const int64_t ne = static_cast<int64_t>(e) + k;
  if (ne >= 255) return sign | kInfBits;
  if (ne <= 0) return sign;
  return (u & (kSignMask | kFracMask)) | (static_cast<uint32_t>(ne) << 23);
}

// Integer n times 2^k rounded once to float32 (§0): the int32 -> float32 conversion
// rounds to nearest even at 24 bits, the power-of-two scaling is exact (FTZ/overflow).
inline uint32_t int_to_f32_scaled_bits(int32_t n, int32_t k) {
  return scale_pow2_bits(f32_to_bits(static_cast<float>(n)), k);
}

// Rounds sig / 2^sh to an integer; sig in [0, 2^24), sh >= 1 (contract §4):
//   nearest_even: up iff rem > half, or rem == half and the floor is odd;
//   stochastic:   up iff floor(delta * 2^24) + (random_bits >> 8) >= 2^24;
//   toward_zero:  never up.
inline int32_t round_shift(int32_t sig, int32_t sh, Rounding rounding, uint32_t random_bits) {
  const int32_t shc = std::min(sh, 25);  // sig < 2^24: the floor is 0 and below half
  const int32_t n0 = sig >> shc;
  const int32_t rem = sig & ((int32_t{1} << shc) - 1);
  switch (rounding) {
    case Rounding::kTowardZero:
      return n0;
    case Rounding::kNearestEven: {
      const int32_t half = int32_t{1} << (shc - 1);
      return n0 + ((rem > half || (rem == half && (n0 & 1))) ? 1 : 0);
    }
    case Rounding::kStochastic: {
      const int32_t r = static_cast<int32_t>(random_bits >> 8);
      const int32_t frac24 = sh <= 24 ? (rem << (24 - sh)) : (sh - 24 > 30 ? 0 : sig >> (sh - 24));
      return n0 + (frac24 + r >= (int32_t{1} << 24) ? 1 : 0);
    }
  }
  return n0;
}

// One encoded block: shared exponent E and a non-finite flag (mantissas go to the caller).
struct BlockCode {
  int32_t exponent;  // floor(log2(amax)) in [-126, 127]; 0 for an all-zero/non-finite block
  bool nonfinite;    // the block held a NaN or inf: every element decodes to NaN
};

// The mantissa of one element u (float32 bits) of a block whose largest biased exponent
// is emax (1 <= emax <= 254): |x| / step = sig / 2^(emax - e + 25 - m) rounded, saturated
// to qmax, signed. Branch-free, so loops over elements vectorize.
template <Rounding R>
inline int32_t element_mantissa(uint32_t u, int32_t emax, int32_t m, int32_t qmax,
                                uint32_t random_bits) {
  const int32_t e = biased_exponent(u);
  const int32_t sig = e == 0 ? 0 : static_cast<int32_t>(u & kFracMask) | kHiddenBit;
  const int32_t mag = std::min(round_shift(sig, emax - e + (25 - m), R, random_bits), qmax);
  return (u & kSignMask) ? -mag : mag;
}

// Encodes one block of n <= b elements (contract §2; a short block behaves as if zero
// padded): q[i] in [-qmax, qmax]. `stride` is the distance between consecutive elements
// of x (and of random_bits, which may be null unless R is stochastic).
template <Rounding R, typename Q>
inline __attribute__((always_inline)) BlockCode encode_block_t(
    const float* x, int64_t stride, int32_t n, BfpFormat fmt, const uint32_t* random_bits,
    Q* q) {
  int32_t emax = 0;  // max biased exponent: 0 all zero (DAZ), 255 non-finite
  for (int32_t i = 0; i < n; ++i) {
    emax = std::max(emax, biased_exponent(f32_to_bits(x[i * stride])));
  }
  if (emax == 0 || emax == 255) {
    for (int32_t i = 0; i < n; ++i) q[i] = 0;
    return BlockCode{0, emax == 255};
  }
  const int32_t m = fmt.mantissa_bits, qmax = fmt.qmax();
  for (int32_t i = 0; i < n; ++i) {
    const uint32_t rb = R == Rounding::kStochastic ? random_bits[i * stride] : 0u;
    q[i] = static_cast<Q>(element_mantissa<R>(f32_to_bits(x[i * stride]), emax, m, qmax, rb));
  }
  return BlockCode{emax - 127, false};
}

// encode_block_t with the rounding mode chosen at run time.
template <typename Q>
inline BlockCode encode_block(const float* x, int64_t stride, int32_t n, BfpFormat fmt,
                              Rounding rounding, const uint32_t* random_bits, Q* q) {
  switch (rounding) {
    case Rounding::kStochastic:
      return encode_block_t<Rounding::kStochastic>(x, stride, n, fmt, random_bits, q);
    case Rounding::kTowardZero:
      return encode_block_t<Rounding::kTowardZero>(x, stride, n, fmt, random_bits, q);
    default:
      return encode_block_t<Rounding::kNearestEven>(x, stride, n, fmt, random_bits, q);
  }
}

// Encodes `lanes` independent blocks at once whose elements run down the rows of a
// row-major matrix: lane j's block is x[t * row_stride + j], t = 0 .. n - 1 (n <= b).
// This is how the rhs of a GEMM (blocked along K = its rows) is read cache-friendly.
// Writes q[t * q_stride + j], exponent[j] and nonfinite[j]; `emax` is scratch of `lanes`
// entries.
template <Rounding R, typename Q>
inline __attribute__((always_inline)) void encode_block_lanes_t(
    const float* x, int64_t row_stride, int32_t n, int64_t lanes, BfpFormat fmt,
    const uint32_t* random_bits, Q* q, int64_t q_stride, int32_t* exponent,
    uint8_t* nonfinite, int32_t* emax) {
  for (int64_t j = 0; j < lanes; ++j) emax[j] = 0;
  for (int32_t t = 0; t < n; ++t) {
    const float* row = x + t * row_stride;
    for (int64_t j = 0; j < lanes; ++j) {
      emax[j] = std::max(emax[j], biased_exponent(f32_to_bits(row[j])));
    }
  }
  const int32_t m = fmt.mantissa_bits, qmax = fmt.qmax();
  for (int32_t t = 0; t < n; ++t) {
    const float* row = x + t * row_stride;
    Q* qrow = q + t * q_stride;
    for (int64_t j = 0; j < lanes; ++j) {
      const int32_t em = emax[j];
      const uint32_t rb = R == Rounding::kStochastic ? random_bits[t * row_stride + j] : 0u;
      const int32_t v = element_mantissa<R>(f32_to_bits(row[j]), em, m, qmax, rb);
      qrow[j] = static_cast<Q>((em == 0 || em == 255) ? 0 : v);
    }
  }
  for (int64_t j = 0; j < lanes; ++j) {
    const bool special = emax[j] == 0 || emax[j] == 255;
    exponent[j] = special ? 0 : emax[j] - 127;
    nonfinite[j] = emax[j] == 255;
  }
}

// Decoded value of mantissa q of a finite block with shared exponent E: q * 2^(E - (m-2))
// rounded to float32 (only FTZ can apply).
inline float decode_element(int32_t q, int32_t exponent, BfpFormat fmt) {
  return bits_to_f32(int_to_f32_scaled_bits(q, exponent - fmt.step_shift()));
}

}  // namespace coltrain_hw

#endif  // COLTRAIN_HW_BFP_QUANTIZER_H_
