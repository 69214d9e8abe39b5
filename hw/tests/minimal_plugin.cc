// A minimal second hw plugin, used by tests/test_hw_plugin.py to exercise plugin loading,
// capability checks and error paths. It stands for a third-party accelerator runtime: only
// the "gemm" operation, only bfp8 with block 32, nearest_even, K <= 256, written as the
// plainest possible loop over the numerics contract §5 (re-encoding each block on the fly).
//
// Build: g++ -std=c++20 -O2 -shared -fPIC -I hw/include -I hw/src -isystem <jaxlib include>
//        [-DMINIMAL_PLUGIN_ABI=N] [-DMINIMAL_PLUGIN_NAME='"name"'] minimal_plugin.cc
#include <cstring>
#include <vector>

#include "bfp_quantizer.h"
#include "coltrain/hw_plugin.h"
#include "xla/ffi/api/ffi.h"

#ifndef MINIMAL_PLUGIN_ABI
#define MINIMAL_PLUGIN_ABI COLTRAIN_HW_ABI_VERSION
#endif
#ifndef MINIMAL_PLUGIN_NAME
#define MINIMAL_PLUGIN_NAME "minimal_test"
#endif

namespace ffi = xla::ffi;
using namespace coltrain_hw;

namespace {

ffi::Error Gemm(ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b, ffi::Buffer<ffi::U32>,
                ffi::Buffer<ffi::U32>, ffi::ResultBuffer<ffi::F32> c, int32_t ma, int32_t mb,
                int32_t block, int32_t rounding) {
  if (ma != 8 || mb != 8 || block != 32 || rounding != 0)
    return ffi::Error::InvalidArgument("minimal plugin: only bfp8_b32, nearest_even");
  const auto ad = a.dimensions(), bd = b.dimensions();
  if (ad.size() != 2 || bd.size() != 2)
    return ffi::Error::InvalidArgument("minimal plugin: no batch dimensions");
  const int64_t m = ad[0], k = ad[1], n = bd[1];
  const BfpFormat fmt{8, 32};
  std::vector<int32_t> qa(32), qb(32);
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = 0; j < n; ++j) {
      uint32_t acc = 0;
      for (int64_t t0 = 0; t0 < k; t0 += 32) {
        const int32_t len = static_cast<int32_t>(k - t0 < 32 ? k - t0 : 32);
        const BlockCode ca = encode_block(a.typed_data() + i * k + t0, 1, len, fmt,
                                          Rounding::kNearestEven, nullptr, qa.data());
        const BlockCode cb = encode_block(b.typed_data() + t0 * n + j, n, len, fmt,
                                          Rounding::kNearestEven, nullptr, qb.data());
        int32_t p = 0;
        for (int32_t t = 0; t < len; ++t) p += qa[t] * qb[t];
        const uint32_t v = (ca.nonfinite || cb.nonfinite)
                               ? kNanBits
                               : int_to_f32_scaled_bits(p, ca.exponent + cb.exponent - 12);
        acc = ftz_bits(f32_to_bits(bits_to_f32(acc) + bits_to_f32(v)));
      }
      c->typed_data()[i * n + j] = bits_to_f32(acc);
    }
  }
  return ffi::Error::Success();
}

const uint32_t kBlocks[] = {32};

const coltrain_hw_capabilities kCaps = {
    sizeof(coltrain_hw_capabilities), MINIMAL_PLUGIN_ABI, MINIMAL_PLUGIN_NAME,
    "minimal test plugin: bfp8_b32 GEMM only",
    COLTRAIN_HW_OP_GEMM,
    1u << 8,  // bfp8 only
    1u << COLTRAIN_HW_ROUND_NEAREST_EVEN,
    1, kBlocks, 32,
    /*max_gemm_m=*/0, /*max_gemm_k=*/256, /*max_gemm_n=*/0, /*max_elements=*/0,
};

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(minimal_gemm, Gemm,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U32>>()
                                  .Arg<ffi::Buffer<ffi::U32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("lhs_mantissa_bits")
                                  .Attr<int32_t>("rhs_mantissa_bits")
                                  .Attr<int32_t>("block")
                                  .Attr<int32_t>("rounding"));

extern "C" {
uint32_t coltrain_hw_abi_version(void) { return MINIMAL_PLUGIN_ABI; }
const coltrain_hw_capabilities* coltrain_hw_get_capabilities(void) { return &kCaps; }
void* coltrain_hw_get_handler(const char* op) {
  return std::strcmp(op, "gemm") == 0 ? reinterpret_cast<void*>(minimal_gemm) : nullptr;
}
}
