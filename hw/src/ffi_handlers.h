// The CPU datapath model's XLA FFI handler symbols (see hw_plugin.h for the operations).
#ifndef COLTRAIN_HW_FFI_HANDLERS_H_
#define COLTRAIN_HW_FFI_HANDLERS_H_

#include "xla/ffi/api/ffi.h"

XLA_FFI_DECLARE_HANDLER_SYMBOL(coltrain_hw_cpu_gemm);
XLA_FFI_DECLARE_HANDLER_SYMBOL(coltrain_hw_cpu_quantize);
XLA_FFI_DECLARE_HANDLER_SYMBOL(coltrain_hw_cpu_pack);
XLA_FFI_DECLARE_HANDLER_SYMBOL(coltrain_hw_cpu_unpack);
XLA_FFI_DECLARE_HANDLER_SYMBOL(coltrain_hw_cpu_top_k);

#endif  // COLTRAIN_HW_FFI_HANDLERS_H_
