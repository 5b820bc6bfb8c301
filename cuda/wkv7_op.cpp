// Torch binding of the WKV7 kernels in wkv7_cuda.cu: operators registered with the dispatcher.
//
// torch.utils.cpp_extension.load(..., is_python_module=False) builds this file with wkv7_cuda.cu
// under TORCH_EXTENSION_NAME (e.g. wkv7_n64_c16) and loads the library; TORCH_LIBRARY below then
// registers torch.ops.<TORCH_EXTENSION_NAME>.forward / .backward / .build_config, which Python calls.
// Errors raised here (TORCH_CHECK) travel through torch's own operator call path and arrive in
// Python as RuntimeError; no pybind11 module of ours is involved.
// On ROCm, load() hipifies wkv7_cuda.cu and builds this same file against the HIP objects, so the
// operators Python calls ARE the HIP build under the same names: there is no separate "_hip" name
// to get wrong (the original project registered one and then called the CUDA name, which broke).
//
// This file includes no CUDA/HIP headers: the launchers take plain pointers and the stream as
// void* (Python passes torch.cuda.current_stream(device).cuda_stream, which is a cudaStream_t on
// CUDA and a hipStream_t on ROCm), and the device is selected with the device-generic guard.

#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

// Defined in wkv7_cuda.cu (keep the two declarations identical).
const char* wkv7_forward_launch(int dtype, int B, int T, int H, const void* r, const void* w,
                                const void* k, const void* v, const void* a, const void* b,
                                const float* s0, void* y, float* chunks, float* sa, float* sT,
                                void* stream);
const char* wkv7_backward_launch(int dtype, int B, int T, int H, const void* r, const void* w,
                                 const void* k, const void* v, const void* a, const void* b,
                                 const void* dy, const float* chunks, const float* sa,
                                 const float* dsT, void* dr, void* dw, void* dk, void* dv,
                                 void* da, void* db, float* ds0, void* stream);

namespace {

constexpr int64_t kN = _N_;
constexpr int64_t kChunk = _CHUNK_LEN_;

int dtype_code(const at::Tensor& x) {
    switch (x.scalar_type()) {
        case at::kBFloat16: return 0;
        case at::kHalf: return 1;
        case at::kFloat: return 2;
        default:
            TORCH_CHECK(false, "wkv7 kernel: dtype ", x.scalar_type(),
                        " is not supported; cast r, w, k, v, a, b to bfloat16, float16 or float32");
    }
    return -1;
}

// Checks of the inputs; every message says what to change. The devices are checked last, so
// that the other messages can be exercised on CPU tensors (tests/test_wkv7_kernel.py does).
void check_input(const at::Tensor& x, const char* name, const at::Tensor& ref) {
    TORCH_CHECK(x.scalar_type() == ref.scalar_type(), "wkv7 kernel: ", name, " has dtype ",
                x.scalar_type(), " but r has ", ref.scalar_type(), "; give all six inputs one dtype");
    TORCH_CHECK(x.dim() == 4, "wkv7 kernel: ", name, " must be (B,T,H,N), got ", x.sizes());
    TORCH_CHECK(x.sizes() == ref.sizes(), "wkv7 kernel: ", name, " has shape ", x.sizes(),
                " but r has ", ref.sizes(), "; all inputs must have one shape (B,T,H,N)");
    TORCH_CHECK(x.is_contiguous(), "wkv7 kernel: ", name,
                " is not contiguous; call .contiguous() on it first");
}

void check_device(const at::Tensor& x, const char* name, const at::Tensor& ref) {
    TORCH_CHECK(x.is_cuda(), "wkv7 kernel: ", name, " is on ", x.device(),
                "; move r, w, k, v, a, b and the state to the GPU, or use impl=\"torch\" (train.py/chat: --wkv_impl torch)");
    TORCH_CHECK(x.device() == ref.device(), "wkv7 kernel: ", name, " is on ", x.device(),
                " but r is on ", ref.device(), "; put all tensors on one device");
}

void check_state(const at::Tensor& s, const char* name, const at::Tensor& ref) {
    const int64_t B = ref.size(0), H = ref.size(2);
    TORCH_CHECK(s.scalar_type() == at::kFloat, "wkv7 kernel: ", name, " must be float32, got ",
                s.scalar_type(), "; pass state.float()");
    TORCH_CHECK(s.dim() == 4 && s.size(0) == B && s.size(1) == H && s.size(2) == kN && s.size(3) == kN,
                "wkv7 kernel: ", name, " must have shape (B,H,N,N) = (", B, ",", H, ",", kN, ",", kN,
                "), got ", s.sizes());
    TORCH_CHECK(s.is_contiguous(), "wkv7 kernel: ", name, " is not contiguous; call .contiguous() on it first");
    TORCH_CHECK(reinterpret_cast<std::uintptr_t>(s.data_ptr()) % 16 == 0, "wkv7 kernel: ", name,
                " is not 16-byte aligned (the kernel moves it with float4); pass ", name, ".clone()");
}

// xs[0] is r; `state` (the initial state or the final state's gradient) may be absent. Devices are
// checked separately (check_devices), after everything else.
void check_inputs(const std::vector<at::Tensor>& xs, const std::vector<const char*>& names,
                  const std::optional<at::Tensor>& state, const char* state_name) {
    const at::Tensor& r = xs[0];
    dtype_code(r);
    for (size_t n = 0; n < xs.size(); ++n) check_input(xs[n], names[n], r);
    TORCH_CHECK(r.size(3) == kN, "wkv7 kernel: this build is for head size N = ", kN, ", got N = ",
                r.size(3), "; the kernel is built per head size (src/wkv7/kernel.py loads one for each)");
    TORCH_CHECK(r.size(0) > 0 && r.size(1) > 0 && r.size(2) > 0, "wkv7 kernel: empty input ", r.sizes());
    TORCH_CHECK(r.size(1) % kChunk == 0, "wkv7 kernel: T = ", r.size(1), " is not a multiple of ",
                kChunk, "; pad the sequence or choose ctx_len a multiple of ", kChunk,
                ", or use impl=\"torch\" (--wkv_impl torch)");
    if (state.has_value()) check_state(*state, state_name, r);
}

void check_devices(const std::vector<at::Tensor>& xs, const std::vector<const char*>& names,
                   const std::optional<at::Tensor>& state, const char* state_name) {
    for (size_t n = 0; n < xs.size(); ++n) check_device(xs[n], names[n], xs[0]);
    if (state.has_value()) check_device(*state, state_name, xs[0]);
}

void check_launch(const char* err, const char* what) {
    TORCH_CHECK(err == nullptr, "wkv7 kernel: ", what, " launch failed: ", err ? err : "");
}

}  // namespace

// Returns [y (B,T,H,N) input dtype, sT (B,H,N,N) fp32, chunks (B,H,T/CHUNK,N,N) fp32,
// sa (B,T,H,N) fp32]; chunks and sa are what backward needs.
std::vector<at::Tensor> forward(const at::Tensor& r, const at::Tensor& w, const at::Tensor& k,
                                const at::Tensor& v, const at::Tensor& a, const at::Tensor& b,
                                const std::optional<at::Tensor>& s0, int64_t stream) {
    check_inputs({r, w, k, v, a, b}, {"r", "w", "k", "v", "a", "b"}, s0, "state");
    check_devices({r, w, k, v, a, b}, {"r", "w", "k", "v", "a", "b"}, s0, "state");
    const c10::DeviceGuard guard(r.device());
    const int64_t B = r.size(0), T = r.size(1), H = r.size(2);
    const auto f32 = r.options().dtype(at::kFloat);
    at::Tensor y = at::empty_like(r);
    at::Tensor sT = at::empty({B, H, kN, kN}, f32);
    at::Tensor chunks = at::empty({B, H, T / kChunk, kN, kN}, f32);
    at::Tensor sa = at::empty({B, T, H, kN}, f32);
    check_launch(wkv7_forward_launch(dtype_code(r), int(B), int(T), int(H), r.data_ptr(), w.data_ptr(),
                                     k.data_ptr(), v.data_ptr(), a.data_ptr(), b.data_ptr(),
                                     s0.has_value() ? s0->data_ptr<float>() : nullptr, y.data_ptr(),
                                     chunks.data_ptr<float>(), sa.data_ptr<float>(), sT.data_ptr<float>(),
                                     reinterpret_cast<void*>(stream)),
                 "forward");
    return {y, sT, chunks, sa};
}

// Returns [dr, dw, dk, dv, da, db] in the input dtype, plus ds0 (B,H,N,N) fp32 when want_ds0.
std::vector<at::Tensor> backward(const at::Tensor& r, const at::Tensor& w, const at::Tensor& k,
                                 const at::Tensor& v, const at::Tensor& a, const at::Tensor& b,
                                 const at::Tensor& dy, const at::Tensor& chunks, const at::Tensor& sa,
                                 const std::optional<at::Tensor>& dsT, bool want_ds0, int64_t stream) {
    check_inputs({r, w, k, v, a, b, dy}, {"r", "w", "k", "v", "a", "b", "dy"}, dsT, "state gradient");
    const int64_t B = r.size(0), T = r.size(1), H = r.size(2);
    TORCH_CHECK(chunks.scalar_type() == at::kFloat && chunks.is_contiguous() &&
                    chunks.sizes() == at::IntArrayRef({B, H, T / kChunk, kN, kN}),
                "wkv7 kernel: backward got chunk states of shape ", chunks.sizes(),
                "; pass the tensors returned by forward unchanged");
    TORCH_CHECK(sa.scalar_type() == at::kFloat && sa.is_contiguous() && sa.sizes() == r.sizes(),
                "wkv7 kernel: backward got sa of shape ", sa.sizes(),
                "; pass the tensors returned by forward unchanged");
    check_devices({r, w, k, v, a, b, dy}, {"r", "w", "k", "v", "a", "b", "dy"}, dsT, "state gradient");
    TORCH_CHECK(chunks.device() == r.device() && sa.device() == r.device(),
                "wkv7 kernel: backward buffers must be on the inputs' device");
    const c10::DeviceGuard guard(r.device());
    at::Tensor dr = at::empty_like(r), dw = at::empty_like(r), dk = at::empty_like(r);
    at::Tensor dv = at::empty_like(r), da = at::empty_like(r), db = at::empty_like(r);
    std::vector<at::Tensor> out = {dr, dw, dk, dv, da, db};
    float* ds0_ptr = nullptr;
    if (want_ds0) {
        at::Tensor ds0 = at::empty({B, H, kN, kN}, r.options().dtype(at::kFloat));
        ds0_ptr = ds0.data_ptr<float>();
        out.push_back(ds0);
    }
    check_launch(wkv7_backward_launch(dtype_code(r), int(B), int(T), int(H), r.data_ptr(), w.data_ptr(),
                                      k.data_ptr(), v.data_ptr(), a.data_ptr(), b.data_ptr(), dy.data_ptr(),
                                      chunks.data_ptr<float>(), sa.data_ptr<float>(),
                                      dsT.has_value() ? dsT->data_ptr<float>() : nullptr, dr.data_ptr(),
                                      dw.data_ptr(), dk.data_ptr(), dv.data_ptr(), da.data_ptr(),
                                      db.data_ptr(), ds0_ptr, reinterpret_cast<void*>(stream)),
                 "backward");
    return out;
}

// The build configuration, so that Python can check it loaded the library it asked for.
std::vector<int64_t> build_config() { return {kN, kChunk}; }

// TORCH_LIBRARY pastes its first argument into names; the extra macro level expands
// TORCH_EXTENSION_NAME (set by cpp_extension per build) before that happens.
#define WKV7_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)
WKV7_LIBRARY(TORCH_EXTENSION_NAME, m) {
    m.def("forward(Tensor r, Tensor w, Tensor k, Tensor v, Tensor a, Tensor b, Tensor? s0, int stream) -> Tensor[]",
          &forward);
    m.def("backward(Tensor r, Tensor w, Tensor k, Tensor v, Tensor a, Tensor b, Tensor dy, Tensor chunks, "
          "Tensor sa, Tensor? dsT, bool want_ds0, int stream) -> Tensor[]",
          &backward);
    m.def("build_config() -> int[]", &build_config);  // [head size, chunk length]
}
