// XLA FFI handlers (typed FFI API) of the CPU datapath model. Operand conventions are
// documented in hw/include/coltrain/hw_plugin.h; these handlers validate shapes and
// attributes and report problems as InvalidArgument errors (never abort the process).
#include "ffi_handlers.h"

#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <string>

#include "hbfp_gemm.h"
#include "wire_ops.h"

namespace ffi = xla::ffi;

namespace coltrain_hw {
namespace {

// A ParallelFor on XLA's intra-op thread pool. COLTRAIN_HW_THREADS caps the number of
// threads (1: run everything on the calling thread). The caller works too and never
// waits for a helper task that has not started, so a busy pool cannot deadlock it.
ParallelFor pool_parallel_for(ffi::ThreadPool* pool) {
  int64_t threads = pool ? pool->num_threads() + 1 : 1;
  if (const char* env = std::getenv("COLTRAIN_HW_THREADS")) {
    const int64_t want = std::atoll(env);
    if (want > 0) threads = std::min(threads, want);
  }
  return [pool, threads](int64_t n, const std::function<void(int64_t)>& fn) {
    const int64_t helpers = std::min(threads, n) - 1;
    if (helpers <= 0) {
      for (int64_t i = 0; i < n; ++i) fn(i);
      return;
    }
    struct Shared {
      std::atomic<int64_t> next{0};
      std::mutex mu;
      std::condition_variable cv;
      int64_t active = 0;
      bool closed = false;
      const std::function<void(int64_t)>* fn = nullptr;
      int64_t n = 0;
      void drain() {
        for (int64_t i = next.fetch_add(1); i < n; i = next.fetch_add(1)) (*fn)(i);
      }
    };
    auto s = std::make_shared<Shared>();
    s->fn = &fn;
    s->n = n;
    for (int64_t h = 0; h < helpers; ++h) {
      pool->Schedule([s] {
        {
          std::lock_guard<std::mutex> lock(s->mu);
          if (s->closed) return;
          ++s->active;
        }
        s->drain();
        std::lock_guard<std::mutex> lock(s->mu);
        if (--s->active == 0) s->cv.notify_all();
      });
    }
    s->drain();
    std::unique_lock<std::mutex> lock(s->mu);
    s->closed = true;
    s->cv.wait(lock, [&] { return s->active == 0; });
  };
}

int64_t product(ffi::AnyBuffer::Dimensions dims, size_t from, size_t to) {
  int64_t p = 1;
  for (size_t i = from; i < to; ++i) p *= dims[i];
  return p;
}

std::string shape_str(ffi::AnyBuffer::Dimensions dims) {
  std::string s = "[";
  for (size_t i = 0; i < dims.size(); ++i) s += (i ? "," : "") + std::to_string(dims[i]);
  return s + "]";
}

ffi::Error check_format(int32_t mantissa_bits, int32_t block, const char* what) {
  if (mantissa_bits < 2 || mantissa_bits > 24 || block < 1)
    return ffi::Error::InvalidArgument(std::string(what) + ": bfp needs 2 <= mantissa_bits <= 24 "
                                       "and block >= 1, got m=" + std::to_string(mantissa_bits) +
                                       " block=" + std::to_string(block));
  return ffi::Error::Success();
}

ffi::Error check_rounding(int32_t rounding, bool have_bits, int64_t need, int64_t got,
                          const char* what) {
  if (rounding < 0 || rounding > 2)
    return ffi::Error::InvalidArgument(std::string(what) + ": unknown rounding " +
                                       std::to_string(rounding));
  if (rounding == static_cast<int32_t>(Rounding::kStochastic) && (!have_bits || need != got))
    return ffi::Error::InvalidArgument(std::string(what) +
                                       ": stochastic rounding needs uint32 random bits shaped "
                                       "like the operand");
  return ffi::Error::Success();
}

ffi::Error GemmImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b,
                    ffi::Buffer<ffi::U32> bits_a, ffi::Buffer<ffi::U32> bits_b,
                    ffi::ResultBuffer<ffi::F32> c, int32_t lhs_mantissa_bits,
                    int32_t rhs_mantissa_bits, int32_t block, int32_t rounding) {
  const auto ad = a.dimensions(), bd = b.dimensions();
  if (ad.size() < 2 || bd.size() != ad.size())
    return ffi::Error::InvalidArgument("gemm: a must be [..., M, K] and b [..., K, N] with the "
                                       "same batch dims; got " + shape_str(ad) + " and " +
                                       shape_str(bd));
  const size_t r = ad.size();
  for (size_t i = 0; i + 2 < r; ++i)
    if (ad[i] != bd[i]) return ffi::Error::InvalidArgument("gemm: batch dims differ");
  const int64_t batch = product(ad, 0, r - 2);
  const int64_t m = ad[r - 2], k = ad[r - 1], n = bd[r - 1];
  if (bd[r - 2] != k)
    return ffi::Error::InvalidArgument("gemm: contraction sizes differ: " + shape_str(ad) +
                                       " vs " + shape_str(bd));
  GemmArgs g{};
  g.m = m;
  g.k = k;
  g.n = n;
  g.lhs = BfpFormat{lhs_mantissa_bits, block};
  g.rhs = BfpFormat{rhs_mantissa_bits, block};
  g.rounding = static_cast<Rounding>(rounding);
  if (auto err = check_format(lhs_mantissa_bits, block, "gemm lhs"); err.failure()) return err;
  if (auto err = check_format(rhs_mantissa_bits, block, "gemm rhs"); err.failure()) return err;
  const bool stochastic = rounding == static_cast<int32_t>(Rounding::kStochastic);
  if (auto err = check_rounding(rounding, stochastic, a.element_count(),
                                stochastic ? bits_a.element_count() : 0, "gemm");
      err.failure())
    return err;
  if (stochastic && bits_b.element_count() != b.element_count())
    return ffi::Error::InvalidArgument("gemm: random bits for b must be shaped like b");
  if (std::string why = check_gemm(g); !why.empty())
    return ffi::Error::InvalidArgument("gemm: " + why);
  const ParallelFor parallel = pool_parallel_for(&pool);
  for (int64_t p = 0; p < batch; ++p) {
    g.a = a.typed_data() + p * m * k;
    g.b = b.typed_data() + p * k * n;
    g.bits_a = stochastic ? bits_a.typed_data() + p * m * k : nullptr;
    g.bits_b = stochastic ? bits_b.typed_data() + p * k * n : nullptr;
    g.c = c->typed_data() + p * m * n;
    hbfp_gemm(g, parallel);
  }
  return ffi::Error::Success();
}

// Rows x length view of a buffer whose last axis is the block axis.
struct Rows {
  int64_t rows, len;
};

Rows rows_of(ffi::AnyBuffer::Dimensions d) {
  if (d.size() == 0) return Rows{1, 1};
  return Rows{product(d, 0, d.size() - 1), d[d.size() - 1]};
}

ffi::Error QuantizeImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U32> bits,
                        ffi::ResultBuffer<ffi::F32> y, int32_t mantissa_bits, int32_t block,
                        int32_t rounding) {
  if (auto err = check_format(mantissa_bits, block, "quantize"); err.failure()) return err;
  const bool stochastic = rounding == static_cast<int32_t>(Rounding::kStochastic);
  if (auto err = check_rounding(rounding, stochastic, x.element_count(), bits.element_count(),
                                "quantize");
      err.failure())
    return err;
  const Rows r = rows_of(x.dimensions());
  bfp_quantize_rows(x.typed_data(), stochastic ? bits.typed_data() : nullptr, r.rows, r.len,
                    BfpFormat{mantissa_bits, block}, static_cast<Rounding>(rounding),
                    y->typed_data());
  return ffi::Error::Success();
}

ffi::Error PackImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U32> bits,
                    ffi::Result<ffi::AnyBuffer> mantissas, ffi::ResultBuffer<ffi::S8> exponents,
                    int32_t mantissa_bits, int32_t block, int32_t rounding) {
  if (auto err = check_format(mantissa_bits, block, "pack"); err.failure()) return err;
  const bool stochastic = rounding == static_cast<int32_t>(Rounding::kStochastic);
  if (auto err = check_rounding(rounding, stochastic, x.element_count(), bits.element_count(),
                                "pack");
      err.failure())
    return err;
  const Rows r = rows_of(x.dimensions());
  const int64_t nb = (r.len + block - 1) / block;
  if (static_cast<int64_t>(exponents->element_count()) != r.rows * nb ||
      static_cast<int64_t>(mantissas->element_count()) != r.rows * r.len)
    return ffi::Error::InvalidArgument("pack: result shapes do not match the input");
  const BfpFormat fmt{mantissa_bits, block};
  const Rounding rnd = static_cast<Rounding>(rounding);
  const uint32_t* rb = stochastic ? bits.typed_data() : nullptr;
  const ffi::DataType want = mantissa_bits <= 8    ? ffi::DataType::S8
                             : mantissa_bits <= 16 ? ffi::DataType::S16
                                                   : ffi::DataType::S32;
  if (mantissas->element_type() != want)
    return ffi::Error::InvalidArgument("pack: mantissas must be int8 (m <= 8), int16 "
                                       "(m <= 16) or int32");
  switch (want) {
    case ffi::DataType::S8:
      bfp_pack_rows(x.typed_data(), rb, r.rows, r.len, fmt, rnd,
                    mantissas->typed_data<int8_t>(), exponents->typed_data());
      break;
    case ffi::DataType::S16:
      bfp_pack_rows(x.typed_data(), rb, r.rows, r.len, fmt, rnd,
                    mantissas->typed_data<int16_t>(), exponents->typed_data());
      break;
    default:
      bfp_pack_rows(x.typed_data(), rb, r.rows, r.len, fmt, rnd,
                    mantissas->typed_data<int32_t>(), exponents->typed_data());
  }
  return ffi::Error::Success();
}

ffi::Error UnpackImpl(ffi::AnyBuffer mantissas, ffi::Buffer<ffi::S8> exponents,
                      ffi::ResultBuffer<ffi::F32> y, int32_t mantissa_bits, int32_t block) {
  if (auto err = check_format(mantissa_bits, block, "unpack"); err.failure()) return err;
  const Rows r = rows_of(mantissas.dimensions());
  const int64_t nb = (r.len + block - 1) / block;
  if (static_cast<int64_t>(exponents.element_count()) != r.rows * nb)
    return ffi::Error::InvalidArgument("unpack: exponents must have one byte per block");
  const BfpFormat fmt{mantissa_bits, block};
  switch (mantissas.element_type()) {
    case ffi::DataType::S8:
      bfp_unpack_rows(mantissas.typed_data<int8_t>(), exponents.typed_data(), r.rows, r.len,
                      fmt, y->typed_data());
      break;
    case ffi::DataType::S16:
      bfp_unpack_rows(mantissas.typed_data<int16_t>(), exponents.typed_data(), r.rows, r.len,
                      fmt, y->typed_data());
      break;
    case ffi::DataType::S32:
      bfp_unpack_rows(mantissas.typed_data<int32_t>(), exponents.typed_data(), r.rows, r.len,
                      fmt, y->typed_data());
      break;
    default:
      return ffi::Error::InvalidArgument("unpack: mantissas must be int8, int16 or int32");
  }
  return ffi::Error::Success();
}

ffi::Error TopKImpl(ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::S32> indices,
                    ffi::ResultBuffer<ffi::F32> values) {
  const Rows r = rows_of(x.dimensions());
  const auto id = indices->dimensions();
  const int64_t k = id.size() ? id[id.size() - 1] : 1;
  if (k < 1 || k > r.len || static_cast<int64_t>(indices->element_count()) != r.rows * k)
    return ffi::Error::InvalidArgument("top_k: need 1 <= k <= row length, got k=" +
                                       std::to_string(k) + " for rows of " +
                                       std::to_string(r.len));
  top_k_rows(x.typed_data(), r.rows, r.len, k, indices->typed_data(), values->typed_data());
  return ffi::Error::Success();
}

}  // namespace
}  // namespace coltrain_hw

XLA_FFI_DEFINE_HANDLER_SYMBOL(coltrain_hw_cpu_gemm, coltrain_hw::GemmImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U32>>()
                                  .Arg<ffi::Buffer<ffi::U32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("lhs_mantissa_bits")
                                  .Attr<int32_t>("rhs_mantissa_bits")
                                  .Attr<int32_t>("block")
                                  .Attr<int32_t>("rounding"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(coltrain_hw_cpu_quantize, coltrain_hw::QuantizeImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("mantissa_bits")
                                  .Attr<int32_t>("block")
                                  .Attr<int32_t>("rounding"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(coltrain_hw_cpu_pack, coltrain_hw::PackImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::S8>>()
                                  .Attr<int32_t>("mantissa_bits")
                                  .Attr<int32_t>("block")
                                  .Attr<int32_t>("rounding"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(coltrain_hw_cpu_unpack, coltrain_hw::UnpackImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("mantissa_bits")
                                  .Attr<int32_t>("block"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(coltrain_hw_cpu_top_k, coltrain_hw::TopKImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
