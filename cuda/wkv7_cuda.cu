// WKV7 (RWKV-7 "x070") recurrence, "backstepping" kernels: forward and backward.
//
// Per (batch b, head h), with the N x N fp32 state S (rows = value index i, columns = key index j):
//     sa_t = S_{t-1} a_t
//     S_t  = S_{t-1} diag(d_t) + sa_t b_t^T + v_t k_t^T,     d_t = exp(-exp(w_t))
//     y_t  = S_t r_t
// S_{-1} = s0 (zeros when absent); the final state S_{T-1} is returned as sT.
//
// Forward: one block of N threads per (head, batch); thread i keeps row i of S in registers.
// It stores S every CHUNK_LEN steps and sa_t every step, so that the backward can walk t downwards
// and undo one step exactly, S_{t-1} = (S_t - v_t k_t^T - sa_t b_t^T) / d_t (stable: d >= 0.545
// in the model), reloading the exact stored state at each chunk boundary to stop error build-up.
//
// This file needs no torch headers: plain pointers in, plain host launchers out (declared again
// in wkv7_op.cpp). It is the one source for CUDA and ROCm: torch.utils.cpp_extension hipifies it
// on ROCm (cuda_bf16.h -> hip/hip_bf16.h, __nv_bfloat16 -> __hip_bfloat16, triple-chevron launches ->
// hipLaunchKernelGGL, cuda* -> hip*), so only names that hipify maps are used here.
//
// Build macros: -D_N_=<head size> -D_CHUNK_LEN_=<steps between stored states> (16 in this repo).
// WKV7_KERNELS_ONLY (tests only) leaves out the host launchers, so that the CPU emulation harness
// in tests/ can compile and run exactly these kernels with a host C++ compiler.

#include <cuda_runtime.h>  // nvcc adds it implicitly, hipcc needs hip/hip_runtime.h spelled out
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#ifndef _N_
#error "compile with -D_N_=<head size>, e.g. -D_N_=64"
#endif
#ifndef _CHUNK_LEN_
#error "compile with -D_CHUNK_LEN_=<chunk length>, e.g. -D_CHUNK_LEN_=16"
#endif

namespace wkv7 {

constexpr int N = _N_;
constexpr int CHUNK_LEN = _CHUNK_LEN_;
static_assert(N % 4 == 0, "head size must be a multiple of 4 (float4 state loads/stores)");
static_assert(CHUNK_LEN > 0, "chunk length must be positive");

// Element conversions: the kernels are templated on the element type F and only touch F
// through these overloads, so bf16/fp16/fp32 share one body.
__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ void store_as(float* p, float x) { *p = x; }
__device__ __forceinline__ void store_as(__nv_bfloat16* p, float x) { *p = __float2bfloat16(x); }
__device__ __forceinline__ void store_as(__half* p, float x) { *p = __float2half(x); }

// Inputs/outputs (B,T,H,N) contiguous: element (b, t, h, i) sits at ((b*T + t)*H + h)*N + i.
// Stored chunk states (B,H,T/CHUNK_LEN,N,N) fp32 hold S[i][j] at [..][j][i]: in the forward,
// thread i writes S[i][j] for j = 0..N-1 and a warp's stores land on consecutive addresses.

template <typename F>
__global__ void __launch_bounds__(N) forward_kernel(
    const int T, const int H,
    const F* __restrict__ r_, const F* __restrict__ w_, const F* __restrict__ k_,
    const F* __restrict__ v_, const F* __restrict__ a_, const F* __restrict__ b_,
    const float* __restrict__ s0_,  // (B,H,N,N) or nullptr (= zeros)
    F* __restrict__ y_,             // (B,T,H,N)
    float* __restrict__ chunks_,    // (B,H,T/CHUNK_LEN,N,N), transposed per chunk
    float* __restrict__ sa_,        // (B,T,H,N)
    float* __restrict__ sT_)        // (B,H,N,N) or nullptr
{
    const int h = blockIdx.x, bt = blockIdx.y, i = threadIdx.x;
    const long long bh = (long long)bt * H + h;
    const long long stride = (long long)H * N;                  // one time step
    const long long base = (long long)bt * T * stride + (long long)h * N + i;

    float state[N];  // state[j] = S[i][j]
    if (s0_ != nullptr) {
        const float4* row = reinterpret_cast<const float4*>(s0_ + bh * N * N + (long long)i * N);
#pragma unroll
        for (int q = 0; q < N / 4; ++q) {
            const float4 x = row[q];
            state[4 * q] = x.x; state[4 * q + 1] = x.y; state[4 * q + 2] = x.z; state[4 * q + 3] = x.w;
        }
    } else {
#pragma unroll
        for (int j = 0; j < N; ++j) state[j] = 0.f;
    }

    // Double-buffered step inputs: one __syncthreads per step suffices, because a thread can
    // only overwrite buffer t&1 after every thread has passed the barrier of step t-1, i.e.
    // after everyone finished reading that buffer in step t-2.
    __shared__ __align__(16) float r_sh[2][N], d_sh[2][N], k_sh[2][N], a_sh[2][N], b_sh[2][N];

    // Next step's inputs are fetched into registers one step ahead to hide global latency.
    float rn = to_float(r_[base]), wn = to_float(w_[base]), kn = to_float(k_[base]);
    float vn = to_float(v_[base]), an = to_float(a_[base]), bn = to_float(b_[base]);

    for (int t = 0; t < T; ++t) {
        const int p = t & 1;
        const long long ind = base + t * stride;
        r_sh[p][i] = rn;
        d_sh[p][i] = __expf(-__expf(wn));
        k_sh[p][i] = kn;
        a_sh[p][i] = an;
        b_sh[p][i] = bn;
        const float vi = vn;
        if (t + 1 < T) {
            const long long nx = ind + stride;
            rn = to_float(r_[nx]); wn = to_float(w_[nx]); kn = to_float(k_[nx]);
            vn = to_float(v_[nx]); an = to_float(a_[nx]); bn = to_float(b_[nx]);
        }
        __syncthreads();

        const float* rs = r_sh[p];
        const float* ds = d_sh[p];
        const float* ks = k_sh[p];
        const float* as = a_sh[p];
        const float* bs = b_sh[p];
        // Four partial sums per reduction: dependent chains of N/4 instead of N FMAs.
        float part[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
        for (int j = 0; j < N; ++j) part[j % 4] += state[j] * as[j];
        const float sa = (part[0] + part[1]) + (part[2] + part[3]);
#pragma unroll
        for (int q = 0; q < 4; ++q) part[q] = 0.f;
#pragma unroll
        for (int j = 0; j < N; ++j) {
            state[j] = state[j] * ds[j] + sa * bs[j] + vi * ks[j];
            part[j % 4] += state[j] * rs[j];
        }
        const float y = (part[0] + part[1]) + (part[2] + part[3]);
        sa_[ind] = sa;
        store_as(y_ + ind, y);

        if ((t + 1) % CHUNK_LEN == 0) {
            float* dst = chunks_ + (bh * (T / CHUNK_LEN) + t / CHUNK_LEN) * N * N + i;
#pragma unroll
            for (int j = 0; j < N; ++j) dst[j * N] = state[j];
        }
    }

    if (sT_ != nullptr) {
        float4* row = reinterpret_cast<float4*>(sT_ + bh * N * N + (long long)i * N);
#pragma unroll
        for (int q = 0; q < N / 4; ++q)
            row[q] = make_float4(state[4 * q], state[4 * q + 1], state[4 * q + 2], state[4 * q + 3]);
    }
}

// Backward. Thread i plays two parts: column i of S and of dS (s_col[m] = S[m][i],
// dsc[m] = dS[m][i]) for the sums over rows (dr, dk, db, dd, da), and row i of dS
// (dsr[m] = dS[i][m]) for the sums over columns (dv, dsa). Both dS copies get the same updates.
// Per step t (downwards), with dS = dL/dS_t:
//   dr_i  = sum_m S_t[m][i] dy_m;             dS += dy r^T
//   S_{t-1}[m][i] = (S_t[m][i] - v_m k_i - sa_m b_i) / d_i
//   dv_i  = sum_m dS[i][m] k_m;               dsa_i = sum_m dS[i][m] b_m
//   dk_i  = sum_m dS[m][i] v_m;               db_i  = sum_m dS[m][i] sa_m
//   dd_i  = sum_m dS[m][i] S_{t-1}[m][i];     da_i  = sum_m dsa_m S_{t-1}[m][i]
//   dw_i  = dd_i * d_i * (-exp(w_i))          (d = exp(-exp(w)))
//   dS_{t-1}[m][n] = dS[m][n] d_n + dsa_m a_n
// dS starts at dsT (the final state's gradient) and ends as ds0.
template <typename F>
__global__ void __launch_bounds__(N) backward_kernel(
    const int T, const int H,
    const F* __restrict__ r_, const F* __restrict__ w_, const F* __restrict__ k_,
    const F* __restrict__ v_, const F* __restrict__ a_, const F* __restrict__ b_,
    const F* __restrict__ dy_,         // (B,T,H,N)
    const float* __restrict__ chunks_, // from the forward
    const float* __restrict__ sa_,     // from the forward
    const float* __restrict__ dsT_,    // (B,H,N,N) or nullptr (= zeros)
    F* __restrict__ dr_, F* __restrict__ dw_, F* __restrict__ dk_,
    F* __restrict__ dv_, F* __restrict__ da_, F* __restrict__ db_,
    float* __restrict__ ds0_)          // (B,H,N,N) or nullptr (not wanted)
{
    const int h = blockIdx.x, bt = blockIdx.y, i = threadIdx.x;
    const long long bh = (long long)bt * H + h;
    const long long stride = (long long)H * N;
    const long long base = (long long)bt * T * stride + (long long)h * N + i;

    float s_col[N], dsc[N], dsr[N];
    if (dsT_ != nullptr) {
        const float* g = dsT_ + bh * N * N;
#pragma unroll
        for (int m = 0; m < N; ++m) dsc[m] = g[m * N + i];  // coalesced across threads
        const float4* row = reinterpret_cast<const float4*>(g + (long long)i * N);
#pragma unroll
        for (int q = 0; q < N / 4; ++q) {
            const float4 x = row[q];
            dsr[4 * q] = x.x; dsr[4 * q + 1] = x.y; dsr[4 * q + 2] = x.z; dsr[4 * q + 3] = x.w;
        }
    } else {
#pragma unroll
        for (int m = 0; m < N; ++m) { dsc[m] = 0.f; dsr[m] = 0.f; }
    }
#pragma unroll
    for (int m = 0; m < N; ++m) s_col[m] = 0.f;  // replaced by the reload at t = T-1

    // Step inputs double-buffered (a thread may write step t's buffer while others still read
    // step t+1's in their second phase); dsa needs one buffer, as both barriers separate its uses.
    __shared__ __align__(16) float r_sh[2][N], d_sh[2][N], k_sh[2][N], v_sh[2][N];
    __shared__ __align__(16) float a_sh[2][N], b_sh[2][N], dy_sh[2][N], sa_sh[2][N];
    __shared__ __align__(16) float dsa_sh[N];

    long long ind = base + (long long)(T - 1) * stride;
    float rn = to_float(r_[ind]), wn = to_float(w_[ind]), kn = to_float(k_[ind]);
    float vn = to_float(v_[ind]), an = to_float(a_[ind]), bn = to_float(b_[ind]);
    float dyn = to_float(dy_[ind]), san = sa_[ind];

    for (int t = T - 1; t >= 0; --t) {
        const int p = t & 1;
        ind = base + t * stride;
        const float ri = rn, ki = kn, ai = an, bi = bn, dyi = dyn;
        const float wfac = -__expf(wn);
        const float di = __expf(wfac);
        r_sh[p][i] = ri;
        d_sh[p][i] = di;
        k_sh[p][i] = ki;
        v_sh[p][i] = vn;
        a_sh[p][i] = ai;
        b_sh[p][i] = bi;
        dy_sh[p][i] = dyi;
        sa_sh[p][i] = san;
        if (t > 0) {
            const long long nx = ind - stride;
            rn = to_float(r_[nx]); wn = to_float(w_[nx]); kn = to_float(k_[nx]);
            vn = to_float(v_[nx]); an = to_float(a_[nx]); bn = to_float(b_[nx]);
            dyn = to_float(dy_[nx]); san = sa_[nx];
        }
        if ((t + 1) % CHUNK_LEN == 0) {
            // Exact S_t from the forward: thread i reads its column, S[m][i] for all m, which
            // the transposed layout keeps contiguous (N/4 float4 loads).
            const float4* col = reinterpret_cast<const float4*>(
                chunks_ + (bh * (T / CHUNK_LEN) + t / CHUNK_LEN) * N * N + (long long)i * N);
#pragma unroll
            for (int q = 0; q < N / 4; ++q) {
                const float4 x = col[q];
                s_col[4 * q] = x.x; s_col[4 * q + 1] = x.y; s_col[4 * q + 2] = x.z; s_col[4 * q + 3] = x.w;
            }
        }
        __syncthreads();

        const float* rs = r_sh[p];
        const float* ds = d_sh[p];
        const float* ks = k_sh[p];
        const float* vs = v_sh[p];
        const float* as = a_sh[p];
        const float* bs = b_sh[p];
        const float* dys = dy_sh[p];
        const float* sas = sa_sh[p];

        const float inv_di = 1.f / di;
        float dr = 0.f, dv = 0.f, dsa = 0.f;
#pragma unroll
        for (int m = 0; m < N; ++m) {
            dr += s_col[m] * dys[m];
            s_col[m] = (s_col[m] - vs[m] * ki - sas[m] * bi) * inv_di;
            dsc[m] += dys[m] * ri;
            dsr[m] += dyi * rs[m];
            dv += dsr[m] * ks[m];
            dsa += dsr[m] * bs[m];
        }
        dsa_sh[i] = dsa;
        __syncthreads();

        float dk = 0.f, db = 0.f, dd = 0.f, da = 0.f;
#pragma unroll
        for (int m = 0; m < N; ++m) {
            dk += dsc[m] * vs[m];
            db += dsc[m] * sas[m];
            dd += dsc[m] * s_col[m];
            da += dsa_sh[m] * s_col[m];
            dsc[m] = dsc[m] * di + dsa_sh[m] * ai;
            dsr[m] = dsr[m] * ds[m] + dsa * as[m];
        }
        store_as(dr_ + ind, dr);
        store_as(dw_ + ind, dd * di * wfac);
        store_as(dk_ + ind, dk);
        store_as(dv_ + ind, dv);
        store_as(da_ + ind, da);
        store_as(db_ + ind, db);
    }

    if (ds0_ != nullptr) {
        float* g = ds0_ + bh * N * N;
#pragma unroll
        for (int m = 0; m < N; ++m) g[m * N + i] = dsc[m];  // coalesced across threads
    }
}

}  // namespace wkv7

#ifndef WKV7_KERNELS_ONLY
namespace {

template <typename F>
const char* launch_forward(int B, int T, int H, const void* r, const void* w, const void* k,
                           const void* v, const void* a, const void* b, const float* s0, void* y,
                           float* chunks, float* sa, float* sT, void* stream) {
    if (B <= 0 || H <= 0 || T <= 0 || T % wkv7::CHUNK_LEN != 0)
        return "wkv7 forward: need B, H, T > 0 and T a multiple of the chunk length";
    const dim3 grid(H, B), block(wkv7::N);
    wkv7::forward_kernel<F><<<grid, block, 0, static_cast<cudaStream_t>(stream)>>>(
        T, H, static_cast<const F*>(r), static_cast<const F*>(w), static_cast<const F*>(k),
        static_cast<const F*>(v), static_cast<const F*>(a), static_cast<const F*>(b), s0,
        static_cast<F*>(y), chunks, sa, sT);
    const cudaError_t err = cudaGetLastError();
    return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

template <typename F>
const char* launch_backward(int B, int T, int H, const void* r, const void* w, const void* k,
                            const void* v, const void* a, const void* b, const void* dy,
                            const float* chunks, const float* sa, const float* dsT, void* dr,
                            void* dw, void* dk, void* dv, void* da, void* db, float* ds0,
                            void* stream) {
    if (B <= 0 || H <= 0 || T <= 0 || T % wkv7::CHUNK_LEN != 0)
        return "wkv7 backward: need B, H, T > 0 and T a multiple of the chunk length";
    const dim3 grid(H, B), block(wkv7::N);
    wkv7::backward_kernel<F><<<grid, block, 0, static_cast<cudaStream_t>(stream)>>>(
        T, H, static_cast<const F*>(r), static_cast<const F*>(w), static_cast<const F*>(k),
        static_cast<const F*>(v), static_cast<const F*>(a), static_cast<const F*>(b),
        static_cast<const F*>(dy), chunks, sa, dsT, static_cast<F*>(dr), static_cast<F*>(dw),
        static_cast<F*>(dk), static_cast<F*>(dv), static_cast<F*>(da), static_cast<F*>(db), ds0);
    const cudaError_t err = cudaGetLastError();
    return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace

// Host launchers, declared again in wkv7_op.cpp (which must not see CUDA/HIP headers).
// dtype: 0 = bf16, 1 = fp16, 2 = fp32. Return nullptr on success, else the launch error text.
const char* wkv7_forward_launch(int dtype, int B, int T, int H, const void* r, const void* w,
                                const void* k, const void* v, const void* a, const void* b,
                                const float* s0, void* y, float* chunks, float* sa, float* sT,
                                void* stream) {
    switch (dtype) {
        case 0: return launch_forward<__nv_bfloat16>(B, T, H, r, w, k, v, a, b, s0, y, chunks, sa, sT, stream);
        case 1: return launch_forward<__half>(B, T, H, r, w, k, v, a, b, s0, y, chunks, sa, sT, stream);
        case 2: return launch_forward<float>(B, T, H, r, w, k, v, a, b, s0, y, chunks, sa, sT, stream);
        default: return "wkv7_forward_launch: unknown dtype code (expected 0 bf16, 1 fp16, 2 fp32)";
    }
}

const char* wkv7_backward_launch(int dtype, int B, int T, int H, const void* r, const void* w,
                                 const void* k, const void* v, const void* a, const void* b,
                                 const void* dy, const float* chunks, const float* sa,
                                 const float* dsT, void* dr, void* dw, void* dk, void* dv,
                                 void* da, void* db, float* ds0, void* stream) {
    switch (dtype) {
        case 0: return launch_backward<__nv_bfloat16>(B, T, H, r, w, k, v, a, b, dy, chunks, sa, dsT, dr, dw, dk, dv, da, db, ds0, stream);
        case 1: return launch_backward<__half>(B, T, H, r, w, k, v, a, b, dy, chunks, sa, dsT, dr, dw, dk, dv, da, db, ds0, stream);
        case 2: return launch_backward<float>(B, T, H, r, w, k, v, a, b, dy, chunks, sa, dsT, dr, dw, dk, dv, da, db, ds0, stream);
        default: return "wkv7_backward_launch: unknown dtype code (expected 0 bf16, 1 fp16, 2 fp32)";
    }
}
#endif  // WKV7_KERNELS_ONLY
