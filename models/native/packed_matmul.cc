// Matmul against a weight packed once at start-up, for XLA:CPU (an XLA FFI custom call).
//
// y[M, N] = x[M, K] @ W (float32, or rounded to bfloat16 when y is bfloat16), where W [K, N] was packed into panels of 32 columns:
//   float32:  [N/32][K][32]            (stored as uint32 words)
//   bfloat16: [N/32][K/2][32][2]       (stored as uint16: the two k of a pair side by side,
//                                       the layout of AVX512-BF16's vdpbf16ps)
// A panel is read once per block of rows, from start to end; the rows of x are broadcast
// one element (float32) or one pair (bfloat16) at a time. XLA's own dot packs its weight
// operand on every call, which at the few rows of a decode step costs more than the
// arithmetic. Panels are shared among a small pool of the kernel's own threads.
//
// Every output element is one row of x times one column of W, summed in order of k (pairs
// of k for bfloat16) with float32 accumulation: a row's result does not depend on M.
#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#if defined(__AMX_BF16__) && defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#define MLX_AMX 1
#endif

#include "bf16.h"
#include "pool.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kNR = 32;  // columns per panel
constexpr int kMR = 12;      // rows per register block (2 x 12 accumulators)

using mlx_native::Bf16ToF32;
using mlx_native::F32ToBf16;
using mlx_native::Pool;

// Rows [0, M) of a [M, 32] float32 block -> columns [n0, n0 + 32) of a bfloat16 y [M, N].
void StoreBf16(const float* block, uint16_t* y, int64_t M, int64_t N, int64_t n0) {
  for (int64_t r = 0; r < M; ++r) {
#if defined(__AVX512BF16__)
    for (int h = 0; h < 2; ++h) {
      const __m256bh v = _mm512_cvtneps_pbh(_mm512_loadu_ps(block + r * kNR + 16 * h));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + r * N + n0 + 16 * h),
                          reinterpret_cast<const __m256i&>(v));
    }
#else
    for (int64_t j = 0; j < kNR; ++j) y[r * N + n0 + j] = F32ToBf16(block[r * kNR + j]);
#endif
  }
}


// Rows [r0, r0 + MR) of x times one packed panel -> y[:, n0 : n0 + 32].
template <int MR>
void BlockF32(const float* x, const float* panel, float* y, int64_t r0, int64_t K, int64_t N,
              int64_t n0) {
#if defined(__AVX512F__)
  __m512 c0[MR], c1[MR];
  for (int r = 0; r < MR; ++r) c0[r] = c1[r] = _mm512_setzero_ps();
  const float* xr = x + r0 * K;
  for (int64_t k = 0; k < K; ++k) {
    const __m512 b0 = _mm512_loadu_ps(panel + k * kNR);
    const __m512 b1 = _mm512_loadu_ps(panel + k * kNR + 16);
    for (int r = 0; r < MR; ++r) {
      const __m512 a = _mm512_set1_ps(xr[r * K + k]);
      c0[r] = _mm512_fmadd_ps(a, b0, c0[r]);
      c1[r] = _mm512_fmadd_ps(a, b1, c1[r]);
    }
  }
  for (int r = 0; r < MR; ++r) {
    _mm512_storeu_ps(y + (r0 + r) * N + n0, c0[r]);
    _mm512_storeu_ps(y + (r0 + r) * N + n0 + 16, c1[r]);
  }
#else
  float c[MR][kNR] = {};
  for (int64_t k = 0; k < K; ++k)
    for (int r = 0; r < MR; ++r) {
      const float a = x[(r0 + r) * K + k];
      for (int64_t j = 0; j < kNR; ++j) c[r][j] += a * panel[k * kNR + j];
    }
  for (int r = 0; r < MR; ++r) std::copy(c[r], c[r] + kNR, y + (r0 + r) * N + n0);
#endif
}

template <int MR>
void BlockBf16(const uint16_t* x, const uint16_t* panel, float* y, int64_t r0, int64_t K,
               int64_t N, int64_t n0) {
#if defined(__AVX512BF16__)
  __m512 c0[MR], c1[MR];
  for (int r = 0; r < MR; ++r) c0[r] = c1[r] = _mm512_setzero_ps();
  const uint32_t* xr = reinterpret_cast<const uint32_t*>(x + r0 * K);  // k pairs
  const int64_t KP = K / 2;
  for (int64_t p = 0; p < KP; ++p) {
    const __m512bh b0 = (__m512bh)_mm512_loadu_si512(panel + p * 2 * kNR);
    const __m512bh b1 = (__m512bh)_mm512_loadu_si512(panel + p * 2 * kNR + 32);
    for (int r = 0; r < MR; ++r) {
      const __m512bh a = (__m512bh)_mm512_set1_epi32(static_cast<int>(xr[r * KP + p]));
      c0[r] = _mm512_dpbf16_ps(c0[r], a, b0);
      c1[r] = _mm512_dpbf16_ps(c1[r], a, b1);
    }
  }
  for (int r = 0; r < MR; ++r) {
    _mm512_storeu_ps(y + (r0 + r) * N + n0, c0[r]);
    _mm512_storeu_ps(y + (r0 + r) * N + n0 + 16, c1[r]);
  }
#else
  float c[MR][kNR] = {};
  for (int64_t p = 0; p < K / 2; ++p)
    for (int r = 0; r < MR; ++r) {
      const float a0 = Bf16ToF32(x[(r0 + r) * K + 2 * p]);
      const float a1 = Bf16ToF32(x[(r0 + r) * K + 2 * p + 1]);
      for (int64_t j = 0; j < kNR; ++j) {
        const uint16_t* w = panel + (p * kNR + j) * 2;
        c[r][j] += a0 * Bf16ToF32(w[0]) + a1 * Bf16ToF32(w[1]);
      }
    }
  for (int r = 0; r < MR; ++r) std::copy(c[r], c[r] + kNR, y + (r0 + r) * N + n0);
#endif
}

template <int MR>
struct F32Block {
  static void Run(const float* x, const float* p, float* y, int64_t r0, int64_t K, int64_t N,
                  int64_t n0) {
    BlockF32<MR>(x, p, y, r0, K, N, n0);
  }
};
template <int MR>
struct Bf16Block {
  static void Run(const uint16_t* x, const uint16_t* p, float* y, int64_t r0, int64_t K,
                  int64_t N, int64_t n0) {
    BlockBf16<MR>(x, p, y, r0, K, N, n0);
  }
};

#if defined(MLX_AMX)
// AMX: a bfloat16 panel in tiles. C tiles 0-3 hold a 32-row x 32-column block of y (two
// 16-row halves x two 16-column halves), A tiles 4-5 two 16-row x 32-k blocks of x, B
// tiles 6-7 the panel's two 16-column halves of a 32-k block ([16 k pairs][16][2], rows
// 128 bytes apart in the panel). Rows past M come from a zero-padded copy of x.
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

bool AmxPermitted() {
  static const bool ok = [] {
    constexpr int kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return ok;
}

// Loaded at every call and released after: other AMX users on XLA's threads (its own dots)
// load their own configurations and release them.
void ConfigureTiles() {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.rows[t] = 16;
    cfg.colsb[t] = 64;
  }
  _tile_loadconfig(&cfg);
}

// Rows [r0, r0 + 32) of x (row stride K; x_rows 32 valid rows from r0) against one panel.
void AmxBlock(const uint16_t* x, const uint16_t* panel, float* y, int64_t K, int64_t N,
              int64_t n0, int64_t rows, float* spill) {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  const int64_t xs = K * 2;  // bytes between rows of x
  for (int64_t kb = 0; kb < K; kb += 32) {
    _tile_loadd(4, x + kb, xs);
    _tile_loadd(5, x + 16 * K + kb, xs);
    const uint16_t* b = panel + kb * kNR;  // 16 k pairs x 32 columns x 2
    _tile_loadd(6, b, 2 * kNR * 2);
    _tile_loadd(7, b + 32, 2 * kNR * 2);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
  }
  if (rows == 32) {
    _tile_stored(0, y + n0, N * 4);
    _tile_stored(1, y + n0 + 16, N * 4);
    _tile_stored(2, y + 16 * N + n0, N * 4);
    _tile_stored(3, y + 16 * N + n0 + 16, N * 4);
    return;
  }
  _tile_stored(0, spill, kNR * 4);
  _tile_stored(1, spill + 16, kNR * 4);
  _tile_stored(2, spill + 16 * kNR, kNR * 4);
  _tile_stored(3, spill + 16 * kNR + 16, kNR * 4);
  for (int64_t r = 0; r < rows; ++r) std::copy(spill + r * kNR, spill + (r + 1) * kNR, y + r * N + n0);
}
#endif

// All rows of x against one panel, in blocks of kMR rows (the last block smaller).
template <template <int> class Block, typename T>
void Panel(const T* x, const T* panel, float* y, int64_t M, int64_t K, int64_t N, int64_t n0) {
  int64_t r = 0;
  for (; r + kMR <= M; r += kMR) Block<kMR>::Run(x, panel, y, r, K, N, n0);
  switch (M - r) {
#define MLX_TAIL(n) \
  case n:           \
    Block<n>::Run(x, panel, y, r, K, N, n0); \
    break;
    MLX_TAIL(1) MLX_TAIL(2) MLX_TAIL(3) MLX_TAIL(4) MLX_TAIL(5) MLX_TAIL(6)
    MLX_TAIL(7) MLX_TAIL(8) MLX_TAIL(9) MLX_TAIL(10) MLX_TAIL(11)
#undef MLX_TAIL
    default:
      break;
  }
}

ffi::Error PackedMatmulImpl(ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::Result<ffi::AnyBuffer> y) {
  auto xd = x.dimensions();
  if (xd.size() != 2) return ffi::Error::InvalidArgument("packed_matmul: x must be [M, K]");
  const int64_t M = xd[0], K = xd[1];
  const int64_t N = K > 0 ? static_cast<int64_t>(w.element_count()) / K : 0;
  const bool bf16 = x.element_type() == ffi::DataType::BF16;
  if (bf16 ? w.element_type() != ffi::DataType::U16
           : (x.element_type() != ffi::DataType::F32 || w.element_type() != ffi::DataType::U32))
    return ffi::Error::InvalidArgument(
        "packed_matmul: x float32 with a uint32 weight, or bfloat16 with uint16");
  if (N * K != static_cast<int64_t>(w.element_count()) || N % kNR || (bf16 && K % 2))
    return ffi::Error::InvalidArgument("packed_matmul: weight is not a [N/32] panel pack of K");
  if (y->element_count() != static_cast<size_t>(M * N))
    return ffi::Error::InvalidArgument("packed_matmul: output must be [M, N]");
  const bool y_bf16 = y->element_type() == ffi::DataType::BF16;
  if (!y_bf16 && y->element_type() != ffi::DataType::F32)
    return ffi::Error::InvalidArgument("packed_matmul: output must be float32 or bfloat16");
  if (M == 0 || N == 0) return ffi::Error::Success();
  // A float32 y is written in place; a bfloat16 one through a [M, 32] block per panel.
  float* const y32 = y_bf16 ? nullptr : static_cast<float*>(y->untyped_data());
  uint16_t* const y16 = y_bf16 ? static_cast<uint16_t*>(y->untyped_data()) : nullptr;
  const int64_t panels = N / kNR;
#if defined(MLX_AMX)
  const bool amx = bf16 && K % 32 == 0 && AmxPermitted();
  // The rows past the last whole block of 32, zero-padded to one: built once per call and
  // read by every panel.
  const int64_t tail0 = M / 32 * 32;
  std::vector<uint16_t> tail;
  if (amx && tail0 < M) {
    const uint16_t* xp = static_cast<const uint16_t*>(x.untyped_data());
    tail.assign(32 * K, 0);
    std::copy(xp + tail0 * K, xp + M * K, tail.data());
  }
#endif
  std::atomic<int64_t> next{0};
  std::function<void()> work = [&] {
#if defined(MLX_AMX)
    if (amx) ConfigureTiles();
#endif
    thread_local std::vector<float> block;
    if (y_bf16 && static_cast<int64_t>(block.size()) < M * kNR) block.resize(M * kNR);
    for (int64_t i = next.fetch_add(1); i < panels; i = next.fetch_add(1)) {
      // where the panel's columns go: y itself, or the block (stride 32, column 0)
      float* const yp = y_bf16 ? block.data() : y32;
      const int64_t ys = y_bf16 ? kNR : N, n0 = y_bf16 ? 0 : i * kNR;
      if (bf16) {
        const uint16_t* xp = static_cast<const uint16_t*>(x.untyped_data());
        const uint16_t* wp = static_cast<const uint16_t*>(w.untyped_data()) + i * K * kNR;
#if defined(MLX_AMX)
        if (amx) {
          thread_local std::vector<float> spill(32 * kNR);
          for (int64_t r0 = 0; r0 < M; r0 += 32) {
            const int64_t rows = std::min<int64_t>(32, M - r0);
            const uint16_t* xr = r0 < tail0 ? xp + r0 * K : tail.data();
            AmxBlock(xr, wp, yp + r0 * ys, K, ys, n0, rows, spill.data());
          }
        } else
#endif
        Panel<Bf16Block>(xp, wp, yp, M, K, ys, n0);
      } else {
        const float* xp = static_cast<const float*>(x.untyped_data());
        const float* wp = static_cast<const float*>(w.untyped_data()) + i * K * kNR;
        Panel<F32Block>(xp, wp, yp, M, K, ys, n0);
      }
      if (y_bf16) StoreBf16(block.data(), y16, M, N, i * kNR);
    }
#if defined(MLX_AMX)
    if (amx) _tile_release();
#endif
  };
  static std::mutex one_call_at_a_time;
  std::lock_guard<std::mutex> lock(one_call_at_a_time);
  if (panels == 1) {
    work();
  } else {
    Pool::Get().Run(work);
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MlxPackedMatmul, PackedMatmulImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());
