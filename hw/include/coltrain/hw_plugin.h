/* coltrain hardware plugin interface, ABI version 1.
 *
 * A hardware runtime (an FPGA driver, an ASIC SDK, or coltrain's own bit-exact CPU model
 * of the datapath) is a shared library that exports the three C functions below. coltrain
 * loads it (config key `numerics.hw_plugin`, or the COLTRAIN_HW_PLUGIN environment
 * variable; default: the CPU datapath model built when coltrain is installed), checks the
 * ABI version, reads the capabilities, and registers each handler the plugin provides as
 * an XLA custom-call target named "coltrain_hw.<name>.<op>" for the "cpu" platform.
 *
 * Every handler is an XLA FFI handler (typed FFI API, xla/ffi/api/ffi.h) compiled against
 * the FFI headers of the jaxlib it runs with. Its arithmetic must be bit-exact to the
 * numerics contract (coltrain/numerics, tests/data/numerics_vectors.json): block floating
 * point bfp(m, b) quantization (contract §2, §4) and the HBFP GEMM datapath (§5).
 *
 * Operations and their FFI signatures (R = rows, L = row length, nb = ceil(L / block);
 * every operand and result may carry the same extra leading batch dimensions, which the
 * handler treats as more rows/independent problems):
 *
 *   "gemm"      C = A · B on the §5 datapath; A and B are quantized with `rounding`
 *               along K (A along its last axis, B along its first) with the same block
 *               boundaries.
 *               args:    a f32[..., M, K], b f32[..., K, N],
 *                        bits_a u32[..., M, K] and bits_b u32[..., K, N] (stochastic
 *                        rounding only; otherwise u32[0] and ignored)
 *               attrs:   lhs_mantissa_bits i32, rhs_mantissa_bits i32, block i32,
 *                        rounding i32 (coltrain_hw_rounding)
 *               result:  c f32[..., M, N]
 *   "quantize"  bfp quantize-dequantize along the last axis (contract §2).
 *               args: x f32[R, L], bits u32[R, L] or u32[0]; attrs: mantissa_bits,
 *               block, rounding; result: y f32[R, L]
 *   "pack"      the bfp wire format: mantissas as int8 (m <= 8), int16 (m <= 16) or
 *               int32, one per element, and one int8 shared exponent per block (-128
 *               marks a NaN/inf block). args: x f32[R, L], bits u32[R, L] or u32[0];
 *               attrs: mantissa_bits, block, rounding;
 *               results: mantissas s8/s16/s32[R, L], exponents s8[R, nb]
 *   "unpack"    the inverse of "pack" (decodes to the quantized values, FTZ applied).
 *               args: mantissas s8/s16/s32[R, L], exponents s8[R, nb];
 *               attrs: mantissa_bits, block; result: y f32[R, L]
 *   "top_k"     the k entries of largest magnitude of each row (ties: lower index first;
 *               NaN counts as the largest magnitude), returned in ascending index order.
 *               args: x f32[R, L]; results: indices s32[R, k], values f32[R, k]
 *
 * Thread safety: handlers may be called concurrently from several XLA threads.
 */
#ifndef COLTRAIN_HW_PLUGIN_H_
#define COLTRAIN_HW_PLUGIN_H_

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define COLTRAIN_HW_ABI_VERSION 1u

/* Bits of coltrain_hw_capabilities.ops. */
enum coltrain_hw_op {
  COLTRAIN_HW_OP_GEMM = 1u << 0,
  COLTRAIN_HW_OP_QUANTIZE = 1u << 1,
  COLTRAIN_HW_OP_PACK = 1u << 2,
  COLTRAIN_HW_OP_UNPACK = 1u << 3,
  COLTRAIN_HW_OP_TOP_K = 1u << 4,
};

/* Values of the `rounding` attribute (contract §4). */
enum coltrain_hw_rounding {
  COLTRAIN_HW_ROUND_NEAREST_EVEN = 0,
  COLTRAIN_HW_ROUND_STOCHASTIC = 1,
  COLTRAIN_HW_ROUND_TOWARD_ZERO = 2,
};

typedef struct coltrain_hw_capabilities {
  uint32_t struct_size;        /* sizeof(coltrain_hw_capabilities) */
  uint32_t abi_version;        /* COLTRAIN_HW_ABI_VERSION the plugin was built for */
  const char* name;            /* short identifier, [a-z0-9_]+; names the targets */
  const char* description;     /* one line for logs and errors */
  uint32_t ops;                /* bit set of coltrain_hw_op */
  uint32_t mantissa_bits_mask; /* bit m set iff bfp(m, .) is supported (2 <= m <= 24) */
  uint32_t rounding_mask;      /* bit r set iff coltrain_hw_rounding r is supported */
  uint32_t num_block_sizes;    /* 0: every block size in [1, max_block_size] */
  const uint32_t* block_sizes; /* the supported block sizes if num_block_sizes > 0 */
  uint32_t max_block_size;
  int64_t max_gemm_m;          /* GEMM limits per problem; 0 means unlimited */
  int64_t max_gemm_k;
  int64_t max_gemm_n;
  int64_t max_elements;        /* quantize/pack/unpack/top_k operand limit; 0: none */
} coltrain_hw_capabilities;

/* The ABI version the plugin implements (must equal COLTRAIN_HW_ABI_VERSION). */
uint32_t coltrain_hw_abi_version(void);

/* The plugin's capabilities; a pointer to static storage, valid while it is loaded. */
const coltrain_hw_capabilities* coltrain_hw_get_capabilities(void);

/* The XLA_FFI_Handler* for an operation name ("gemm", "quantize", "pack", "unpack",
 * "top_k"), or NULL if the plugin does not provide it. */
void* coltrain_hw_get_handler(const char* op);

#ifdef __cplusplus
}  /* extern "C" */
#endif

#endif  /* COLTRAIN_HW_PLUGIN_H_ */
