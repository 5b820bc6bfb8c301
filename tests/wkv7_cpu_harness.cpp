// CPU emulation harness for cuda/wkv7_cuda.cu (tests only, see tests/test_wkv7_kernel.py).
//
// Compiles the real WKV7 kernels with a host C++ compiler and runs them like the GPU would: each
// block is N std::threads (one per CUDA thread, threadIdx/blockIdx thread-local), __syncthreads is
// a std::barrier, and __shared__ arrays become function statics shared by the block's threads
// (blocks run one after another, so one set of statics is enough). The element conversions come
// from the CUDA toolkit's own cuda_bf16.h / cuda_fp16.h host code. This checks the kernels'
// indexing, layouts, synchronisation points and math on real inputs without a GPU; it does not
// model warps, timing or the GPU's fast-math rounding.
//
// Build: g++ -std=c++20 -O2 -pthread -shared -fPIC -fno-gnu-unique -I<cuda>/include -D_N_=64 -D_CHUNK_LEN_=16
// (-fno-gnu-unique: otherwise the statics standing in for __shared__ are unified across the
// harness libraries built for different N that one process loads, and the blocks corrupt them.)

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <barrier>
#include <cmath>
#include <thread>
#include <vector>

// Replace the CUDA qualifiers (cuda headers define them for host compilers) with host meanings.
#undef __global__
#undef __device__
#undef __forceinline__
#undef __shared__
#undef __align__
#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))
#define __launch_bounds__(n)
#define __expf(x) std::exp(float(x))  // glibc declares its own __expf; do not overload it

namespace {
struct Index3 {
    unsigned x = 0, y = 0, z = 0;
};
thread_local Index3 threadIdx;
thread_local Index3 blockIdx;
std::barrier<>* block_barrier = nullptr;

inline void __syncthreads() { block_barrier->arrive_and_wait(); }
}  // namespace

#define WKV7_KERNELS_ONLY
#include "../cuda/wkv7_cuda.cu"

namespace {

// Runs body() for every (blockIdx.x < H, blockIdx.y < B) with N threads per block.
template <typename Body>
void run_grid(int B, int H, Body body) {
    for (int bt = 0; bt < B; ++bt) {
        for (int h = 0; h < H; ++h) {
            std::barrier<> bar(wkv7::N);
            block_barrier = &bar;
            std::vector<std::thread> threads;
            threads.reserve(wkv7::N);
            for (int i = 0; i < wkv7::N; ++i) {
                threads.emplace_back([=] {
                    threadIdx.x = unsigned(i);
                    blockIdx.x = unsigned(h);
                    blockIdx.y = unsigned(bt);
                    body();
                });
            }
            for (auto& th : threads) th.join();
            block_barrier = nullptr;
        }
    }
}

template <typename F>
void forward(int B, int T, int H, const void* r, const void* w, const void* k, const void* v,
             const void* a, const void* b, const float* s0, void* y, float* chunks, float* sa, float* sT) {
    run_grid(B, H, [=] {
        wkv7::forward_kernel<F>(T, H, static_cast<const F*>(r), static_cast<const F*>(w),
                                static_cast<const F*>(k), static_cast<const F*>(v),
                                static_cast<const F*>(a), static_cast<const F*>(b), s0,
                                static_cast<F*>(y), chunks, sa, sT);
    });
}

template <typename F>
void backward(int B, int T, int H, const void* r, const void* w, const void* k, const void* v,
              const void* a, const void* b, const void* dy, const float* chunks, const float* sa,
              const float* dsT, void* dr, void* dw, void* dk, void* dv, void* da, void* db, float* ds0) {
    run_grid(B, H, [=] {
        wkv7::backward_kernel<F>(T, H, static_cast<const F*>(r), static_cast<const F*>(w),
                                 static_cast<const F*>(k), static_cast<const F*>(v),
                                 static_cast<const F*>(a), static_cast<const F*>(b),
                                 static_cast<const F*>(dy), chunks, sa, dsT, static_cast<F*>(dr),
                                 static_cast<F*>(dw), static_cast<F*>(dk), static_cast<F*>(dv),
                                 static_cast<F*>(da), static_cast<F*>(db), ds0);
    });
}

}  // namespace

// dtype codes as in the launchers: 0 bf16, 1 fp16, 2 fp32. Return 0, or 1 for a bad dtype code.
extern "C" int wkv7_cpu_head_size() { return wkv7::N; }

extern "C" int wkv7_cpu_forward(int dtype, int B, int T, int H, const void* r, const void* w,
                                const void* k, const void* v, const void* a, const void* b,
                                const float* s0, void* y, float* chunks, float* sa, float* sT) {
    switch (dtype) {
        case 0: forward<__nv_bfloat16>(B, T, H, r, w, k, v, a, b, s0, y, chunks, sa, sT); return 0;
        case 1: forward<__half>(B, T, H, r, w, k, v, a, b, s0, y, chunks, sa, sT); return 0;
        case 2: forward<float>(B, T, H, r, w, k, v, a, b, s0, y, chunks, sa, sT); return 0;
        default: return 1;
    }
}

extern "C" int wkv7_cpu_backward(int dtype, int B, int T, int H, const void* r, const void* w,
                                 const void* k, const void* v, const void* a, const void* b,
                                 const void* dy, const float* chunks, const float* sa,
                                 const float* dsT, void* dr, void* dw, void* dk, void* dv,
                                 void* da, void* db, float* ds0) {
    switch (dtype) {
        case 0: backward<__nv_bfloat16>(B, T, H, r, w, k, v, a, b, dy, chunks, sa, dsT, dr, dw, dk, dv, da, db, ds0); return 0;
        case 1: backward<__half>(B, T, H, r, w, k, v, a, b, dy, chunks, sa, dsT, dr, dw, dk, dv, da, db, ds0); return 0;
        case 2: backward<float>(B, T, H, r, w, k, v, a, b, dy, chunks, sa, dsT, dr, dw, dk, dv, da, db, ds0); return 0;
        default: return 1;
    }
}
