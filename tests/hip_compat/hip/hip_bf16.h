// Test-only stand-in for <hip/hip_bf16.h>, which ROCm gained in 5.7. Older HIP installs (Debian 12
// ships hipcc 5.2) lack it, yet compile everything else of the hipified kernel, so
// tests/test_wkv7_kernel.py puts this folder on the include path only when the real header is
// missing. It declares just what cuda/wkv7_cuda.cu uses after hipify, with ROCm 6's names and
// meaning: a 16-bit bf16 storage type, widening to float, and round-to-nearest-even narrowing.
#pragma once
#include <hip/hip_runtime.h>

struct __hip_bfloat16 {
    unsigned short data;
};

__device__ __forceinline__ float __bfloat162float(__hip_bfloat16 x) {
    return __uint_as_float(static_cast<unsigned int>(x.data) << 16);
}

__device__ __forceinline__ __hip_bfloat16 __float2bfloat16(float f) {
    unsigned int u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return __hip_bfloat16{static_cast<unsigned short>((u >> 16) | 0x40u)};  // NaN stays NaN
    u += 0x7fffu + ((u >> 16) & 1u);  // round half to even
    return __hip_bfloat16{static_cast<unsigned short>(u >> 16)};
}
