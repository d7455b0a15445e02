// tvmflow's BLAS kernels for CPU builds: conv2d as im2col + sgemm and dense as sgemm, on
// OpenBLAS (PyPI `scipy-openblas32`, symbols prefixed `scipy_`). Same calling convention as
// cpu_vendor_dnnl.cc (tasks/build/cpu_vendor.py emits both); groups == 1 only.
// Built by scripts/build-cpu-contrib.sh.
#include <dlpack/dlpack.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/function.h>
#include <tvm/ffi/reflection/registry.h>

#include <tvm/runtime/c_backend_api.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cblas.h"

namespace tvmflow_cblas {

namespace ffi = tvm::ffi;

// Run body(begin, end) over [0, n) split in chunks on TVM's own thread pool
// (TVMBackendParallelLaunch); OpenBLAS itself runs one thread per call. One pool for the whole
// model: two (TVM's and OpenBLAS's) spinning on the same cores were measured 35x slower.
template <typename F>
void ParallelChunks(int64_t n, int64_t min_chunk, F body) {
  struct Ctx {
    F* body;
    int64_t n, min_chunk;
  } ctx{&body, n, min_chunk};
  auto run = [](int task_id, TVMParallelGroupEnv* env, void* data) -> int {
    auto* c = static_cast<Ctx*>(data);
    int64_t chunk = std::max<int64_t>(c->min_chunk, (c->n + env->num_task - 1) / env->num_task);
    int64_t begin = task_id * chunk, end = std::min<int64_t>(c->n, begin + chunk);
    if (begin < end) (*c->body)(begin, end);
    return 0;
  };
  if (n <= min_chunk) {
    body(0, n);
    return;
  }
  TVMBackendParallelLaunch(run, &ctx, 0);
}

void OneBlasThread() {
  static bool done = [] {
    scipy_openblas_set_num_threads(1);
    return true;
  }();
  (void)done;
}

void Epilogue(float* y, const float* bias, int64_t r0, int64_t r1, int64_t cols, bool bias_per_col,
              int64_t post) {
  for (int64_t r = r0; r < r1; ++r) {
    float* row = y + r * cols;
    for (int64_t c = 0; c < cols; ++c) {
      float v = row[c] + (bias_per_col ? bias[c] : bias[r]);
      if (post >= 1) v = std::max(v, 0.f);
      if (post == 2) v = std::min(v, 6.f);
      row[c] = v;
    }
  }
}

// Same arguments as tvmflow.dnnl.conv2d.
void Conv2d(ffi::PackedArgs args, ffi::Any* ret) {
  OneBlasThread();
  auto* x = args[0].cast<DLTensor*>();
  auto* w = args[1].cast<DLTensor*>();
  auto* b = args[2].cast<DLTensor*>();
  int64_t sh = args[3].cast<int64_t>(), sw = args[4].cast<int64_t>();
  int64_t pt = args[5].cast<int64_t>(), pl = args[6].cast<int64_t>();
  int64_t dh = args[9].cast<int64_t>(), dw = args[10].cast<int64_t>();
  bool nhwc = args[12].cast<int64_t>() != 0;
  int64_t post = args[13].cast<int64_t>();
  auto* y = args[14].cast<DLTensor*>();
  const float* xd = static_cast<const float*>(x->data);
  const float* wd = static_cast<const float*>(w->data);
  const float* bd = static_cast<const float*>(b->data);
  float* yd = static_cast<float*>(y->data);
  int64_t n = x->shape[0];
  int64_t c = nhwc ? x->shape[3] : x->shape[1], h = nhwc ? x->shape[1] : x->shape[2],
          wi = nhwc ? x->shape[2] : x->shape[3];
  int64_t o = nhwc ? y->shape[3] : y->shape[1], oh = nhwc ? y->shape[1] : y->shape[2],
          ow = nhwc ? y->shape[2] : y->shape[3];
  int64_t kh = nhwc ? w->shape[1] : w->shape[2], kw = nhwc ? w->shape[2] : w->shape[3];
  int64_t k = c * kh * kw, p = oh * ow;
  bool direct = kh == 1 && kw == 1 && sh == 1 && sw == 1 && pt == 0 && pl == 0;
  std::vector<float> col(direct ? 0 : static_cast<size_t>(k * p));
  for (int64_t img = 0; img < n; ++img) {
    const float* xi = xd + img * c * h * wi;
    float* yi = yd + img * o * p;
    if (nhwc) {  // per chunk of output pixels: im2col rows (kh, kw, c order, like OHWI), sgemm, epilogue
      ParallelChunks(p, 8, [&](int64_t q0, int64_t q1) {
        const float* a = xi + q0 * c;
        if (!direct) {
          for (int64_t q = q0; q < q1; ++q) {
            int64_t r = q / ow, s = q % ow;
            float* dst = col.data() + q * k;
            for (int64_t i = 0; i < kh; ++i)
              for (int64_t j = 0; j < kw; ++j) {
                int64_t ih = r * sh - pt + i * dh, iw = s * sw - pl + j * dw;
                float* d = dst + (i * kw + j) * c;
                if (ih < 0 || ih >= h || iw < 0 || iw >= wi)
                  std::memset(d, 0, sizeof(float) * c);
                else
                  std::memcpy(d, xi + (ih * wi + iw) * c, sizeof(float) * c);
              }
          }
          a = col.data() + q0 * k;
        }
        // Y[q0:q1] (rows, O) = A (rows, K) x W^T, W (O, K)
        scipy_cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, q1 - q0, o, k, 1.f, a, k, wd, k, 0.f,
                          yi + q0 * o, o);
        Epilogue(yi, bd, q0, q1, o, true, post);
      });
    } else {  // col (C*KH*KW, P) like OIHW's column order, then Y (O, P) = W (O, K) x col per O chunk
      const float* a = xi;
      if (!direct) {
        ParallelChunks(k, 1, [&](int64_t r0, int64_t r1) {
          for (int64_t row = r0; row < r1; ++row) {
            int64_t ci = row / (kh * kw), i = (row / kw) % kh, j = row % kw;
            float* dst = col.data() + row * p;
            for (int64_t r = 0; r < oh; ++r) {
              int64_t ih = r * sh - pt + i * dh;
              for (int64_t s = 0; s < ow; ++s) {
                int64_t iw = s * sw - pl + j * dw;
                dst[r * ow + s] = (ih < 0 || ih >= h || iw < 0 || iw >= wi) ? 0.f : xi[(ci * h + ih) * wi + iw];
              }
            }
          }
        });
        a = col.data();
      }
      ParallelChunks(o, 4, [&](int64_t o0, int64_t o1) {
        scipy_cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, o1 - o0, p, k, 1.f, wd + o0 * k, k, a, p,
                          0.f, yi + o0 * p, p);
        Epilogue(yi, bd, o0, o1, p, false, post);
      });
    }
  }
}

// Same arguments as tvmflow.dnnl.matmul: a (M, K) x w (K, N) + bias, post-op; split over N.
void Matmul(ffi::PackedArgs args, ffi::Any* ret) {
  OneBlasThread();
  auto* a = args[0].cast<DLTensor*>();
  auto* w = args[1].cast<DLTensor*>();
  auto* b = args[2].cast<DLTensor*>();
  int64_t post = args[3].cast<int64_t>();
  auto* y = args[4].cast<DLTensor*>();
  int64_t m = a->shape[0], k = a->shape[1], n = w->shape[1];
  const float* ad = static_cast<const float*>(a->data);
  const float* wd = static_cast<const float*>(w->data);
  const float* bd = static_cast<const float*>(b->data);
  float* yd = static_cast<float*>(y->data);
  ParallelChunks(n, 64, [&](int64_t n0, int64_t n1) {
    scipy_cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, m, n1 - n0, k, 1.f, ad, k, wd + n0, n, 0.f,
                      yd + n0, n);
    for (int64_t r = 0; r < m; ++r)
      for (int64_t c = n0; c < n1; ++c) {
        float v = yd[r * n + c] + bd[c];
        if (post >= 1) v = std::max(v, 0.f);
        if (post == 2) v = std::min(v, 6.f);
        yd[r * n + c] = v;
      }
  });
}

}  // namespace tvmflow_cblas

TVM_FFI_STATIC_INIT_BLOCK() {
  namespace refl = tvm::ffi::reflection;
  refl::GlobalDef()
      .def_packed("tvmflow.cblas.conv2d", tvmflow_cblas::Conv2d)
      .def_packed("tvmflow.cblas.matmul", tvmflow_cblas::Matmul);
}
