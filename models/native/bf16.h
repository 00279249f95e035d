// bfloat16 <-> float32 conversions shared by the native kernels in this folder.
#ifndef MLX_SCHED_NATIVE_BF16_H_
#define MLX_SCHED_NATIVE_BF16_H_

#include <cstdint>
#include <cstring>

namespace mlx_native {

inline float Bf16ToF32(uint16_t h) {
  const uint32_t b = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}

// float32 -> bfloat16, rounding to nearest even (NaN stays a quiet NaN), as XLA converts.
inline uint16_t F32ToBf16(float f) {
  uint32_t b;
  std::memcpy(&b, &f, 4);
  if ((b & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((b >> 16) | 0x40);
  b += 0x7FFFu + ((b >> 16) & 1u);
  return static_cast<uint16_t>(b >> 16);
}

}  // namespace mlx_native

#endif  // MLX_SCHED_NATIVE_BF16_H_
