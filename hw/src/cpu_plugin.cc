// The default plugin: coltrain's bit-exact CPU model of the accelerator datapath.
#include <cstring>

#include "coltrain/hw_plugin.h"
#include "ffi_handlers.h"
#include "hbfp_gemm.h"

namespace {

const coltrain_hw_capabilities kCapabilities = {
    /*struct_size=*/sizeof(coltrain_hw_capabilities),
    /*abi_version=*/COLTRAIN_HW_ABI_VERSION,
    /*name=*/"cpu_model",
    /*description=*/"coltrain CPU model of the HBFP datapath (bit-exact, XLA FFI)",
    /*ops=*/COLTRAIN_HW_OP_GEMM | COLTRAIN_HW_OP_QUANTIZE | COLTRAIN_HW_OP_PACK |
        COLTRAIN_HW_OP_UNPACK | COLTRAIN_HW_OP_TOP_K,
    /*mantissa_bits_mask=*/0x01fffffcu,  // m = 2 .. 24
    /*rounding_mask=*/0x7u,              // nearest_even, stochastic, toward_zero
    /*num_block_sizes=*/0,
    /*block_sizes=*/nullptr,
    /*max_block_size=*/1u << 16,
    /*max_gemm_m=*/0,
    /*max_gemm_k=*/0,
    /*max_gemm_n=*/0,
    /*max_elements=*/0,
};

}  // namespace

extern "C" {

__attribute__((visibility("default"))) uint32_t coltrain_hw_abi_version(void) {
  return COLTRAIN_HW_ABI_VERSION;
}

__attribute__((visibility("default"))) const coltrain_hw_capabilities*
coltrain_hw_get_capabilities(void) {
  return &kCapabilities;
}

__attribute__((visibility("default"))) void* coltrain_hw_get_handler(const char* op) {
  if (op == nullptr) return nullptr;
  if (std::strcmp(op, "gemm") == 0) return reinterpret_cast<void*>(coltrain_hw_cpu_gemm);
  if (std::strcmp(op, "quantize") == 0) return reinterpret_cast<void*>(coltrain_hw_cpu_quantize);
  if (std::strcmp(op, "pack") == 0) return reinterpret_cast<void*>(coltrain_hw_cpu_pack);
  if (std::strcmp(op, "unpack") == 0) return reinterpret_cast<void*>(coltrain_hw_cpu_unpack);
  if (std::strcmp(op, "top_k") == 0) return reinterpret_cast<void*>(coltrain_hw_cpu_top_k);
  return nullptr;
}

// Not part of the plugin ABI: which GEMM kernel this CPU runs (for benchmarks and logs).
__attribute__((visibility("default"))) const char* coltrain_hw_cpu_kernel(void) {
  return coltrain_hw::selected_kernel();
}

}  // extern "C"
