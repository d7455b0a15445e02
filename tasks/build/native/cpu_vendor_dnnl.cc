// tvmflow's oneDNN (v3 API) kernels for CPU builds, registered as TVM FFI global functions and
// called from Relax as call_dps_packed externs (tasks/build/cpu_vendor.py rewrites the graph).
//
// Why our own file and not the apache-tvm wheel's contrib/dnnl sources: those are written for
// oneDNN v2 (op descriptors) and create the primitive on every call (weights reordered each
// time). Here a primitive and its reordered ("prepacked") weights are built once per
// (shape, attributes, weight pointer) and cached; src/dst stay in the graph's layout (NHWC or
// NCHW), so no activation reorder runs per call.
// Built by scripts/build-cpu-contrib.sh against the installed onednn-devel headers.
#include <dlpack/dlpack.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/function.h>
#include <tvm/ffi/reflection/registry.h>

#include <cstdint>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <unordered_map>

#include "oneapi/dnnl/dnnl.hpp"

namespace tvmflow_dnnl {

using dnnl::memory;
namespace ffi = tvm::ffi;

dnnl::engine& Engine() {
  static dnnl::engine eng(dnnl::engine::kind::cpu, 0);
  return eng;
}

// Post-ops after the bias: 0 none, 1 relu, 2 clip(0, 6) (ReLU6).
dnnl::primitive_attr PostOps(int64_t post) {
  dnnl::primitive_attr attr;
  dnnl::post_ops ops;
  if (post == 1) ops.append_eltwise(dnnl::algorithm::eltwise_relu, 0.f, 0.f);
  if (post == 2) ops.append_eltwise(dnnl::algorithm::eltwise_clip, 0.f, 6.f);
  attr.set_post_ops(ops);
  return attr;
}

struct Cached {
  dnnl::primitive prim;
  memory weights;  // reordered once into the primitive's preferred layout
  memory bias;
  memory::desc src, dst;
};

std::mutex cache_mu;
std::unordered_map<std::string, std::shared_ptr<Cached>>& Cache() {
  static std::unordered_map<std::string, std::shared_ptr<Cached>> cache;
  return cache;
}

// A cheap fingerprint of a weight tensor's values: a freed module's weights may be reallocated at
// the same address with other values, so the pointer alone cannot key the prepacked copy.
uint64_t Fingerprint(const DLTensor* t) {
  int64_t n = 1;
  for (int i = 0; i < t->ndim; ++i) n *= t->shape[i];
  const uint32_t* v = static_cast<const uint32_t*>(t->data);
  uint64_t h = 1469598103934665603ull;
  int64_t step = n > 64 ? n / 64 : 1;
  for (int64_t i = 0; i < n; i += step) h = (h ^ v[i]) * 1099511628211ull;
  return h;
}

std::shared_ptr<Cached> Lookup(const std::string& key) {
  std::lock_guard<std::mutex> lock(cache_mu);
  auto it = Cache().find(key);
  return it == Cache().end() ? nullptr : it->second;
}

void Store(const std::string& key, std::shared_ptr<Cached> entry) {
  std::lock_guard<std::mutex> lock(cache_mu);
  Cache()[key] = std::move(entry);
}

memory Prepack(const memory::desc& user_md, void* data, const memory::desc& want) {
  dnnl::stream s(Engine());
  memory user(user_md, Engine(), data);
  if (want == user_md) return user;
  memory packed(want, Engine());
  dnnl::reorder(user, packed).execute(s, user, packed);
  s.wait();
  return packed;
}

// conv2d(data, weight, bias, stride_h, stride_w, pad_t, pad_l, pad_b, pad_r, dil_h, dil_w,
//        groups, channels_last, post, out). data NCHW or NHWC; weight OIHW or OHWI (grouped
// convs keep O and I/groups in those positions); bias (O,) fp32.
void Conv2d(ffi::PackedArgs args, ffi::Any* ret) {
  auto* x = args[0].cast<DLTensor*>();
  auto* w = args[1].cast<DLTensor*>();
  auto* b = args[2].cast<DLTensor*>();
  int64_t sh = args[3].cast<int64_t>(), sw = args[4].cast<int64_t>();
  int64_t pt = args[5].cast<int64_t>(), pl = args[6].cast<int64_t>();
  int64_t pb = args[7].cast<int64_t>(), pr = args[8].cast<int64_t>();
  int64_t dh = args[9].cast<int64_t>(), dw = args[10].cast<int64_t>();
  int64_t groups = args[11].cast<int64_t>();
  bool nhwc = args[12].cast<int64_t>() != 0;
  int64_t post = args[13].cast<int64_t>();
  auto* y = args[14].cast<DLTensor*>();

  std::ostringstream k;
  k << "conv|" << nhwc << '|' << sh << sw << '|' << pt << ',' << pl << ',' << pb << ',' << pr << '|'
    << dh << dw << '|' << groups << '|' << post << '|' << w->data << '|' << b->data << '|' << Fingerprint(w) << '|' << Fingerprint(b);
  for (int i = 0; i < 4; ++i) k << ',' << x->shape[i] << ',' << w->shape[i] << ',' << y->shape[i];
  std::string key = k.str();

  auto entry = Lookup(key);
  if (!entry) {
    int64_t n = x->shape[0];
    int64_t c = nhwc ? x->shape[3] : x->shape[1], h = nhwc ? x->shape[1] : x->shape[2],
            wd = nhwc ? x->shape[2] : x->shape[3];
    int64_t o = nhwc ? y->shape[3] : y->shape[1], oh = nhwc ? y->shape[1] : y->shape[2],
            ow = nhwc ? y->shape[2] : y->shape[3];
    int64_t kh = nhwc ? w->shape[1] : w->shape[2], kw = nhwc ? w->shape[2] : w->shape[3];
    int64_t ig = c / groups, og = o / groups;
    auto tag = nhwc ? memory::format_tag::nhwc : memory::format_tag::nchw;
    memory::desc src({n, c, h, wd}, memory::data_type::f32, tag);
    memory::desc dst({n, o, oh, ow}, memory::data_type::f32, tag);
    // The user's weights, described by strides: OIHW = (O, I, H, W) dense; OHWI = (O, H, W, I).
    memory::desc wuser;
    if (groups == 1) {
      memory::dims st = nhwc ? memory::dims{kh * kw * ig, 1, kw * ig, ig}
                             : memory::dims{ig * kh * kw, kh * kw, kw, 1};
      wuser = memory::desc({o, ig, kh, kw}, memory::data_type::f32, st);
    } else {
      memory::dims st = nhwc ? memory::dims{og * kh * kw * ig, kh * kw * ig, 1, kw * ig, ig}
                             : memory::dims{og * ig * kh * kw, ig * kh * kw, kh * kw, kw, 1};
      wuser = memory::desc({groups, og, ig, kh, kw}, memory::data_type::f32, st);
    }
    memory::desc wany(wuser.get_dims(), memory::data_type::f32, memory::format_tag::any);
    memory::desc bmd({o}, memory::data_type::f32, memory::format_tag::x);
    auto pd = dnnl::convolution_forward::primitive_desc(
        Engine(), dnnl::prop_kind::forward_inference, dnnl::algorithm::convolution_direct, src, wany,
        bmd, dst, {sh, sw}, {dh - 1, dw - 1}, {pt, pl}, {pb, pr}, PostOps(post));
    entry = std::make_shared<Cached>();
    entry->prim = dnnl::convolution_forward(pd);
    entry->weights = Prepack(wuser, w->data, pd.weights_desc());
    entry->bias = memory(bmd, Engine(), b->data);
    entry->src = src;
    entry->dst = dst;
    Store(key, entry);
  }
  dnnl::stream s(Engine());
  memory src(entry->src, Engine(), x->data), dst(entry->dst, Engine(), y->data);
  entry->prim.execute(s, {{DNNL_ARG_SRC, src},
                          {DNNL_ARG_WEIGHTS, entry->weights},
                          {DNNL_ARG_BIAS, entry->bias},
                          {DNNL_ARG_DST, dst}});
  s.wait();
}

// matmul(a (M, K), b (K, N), bias (N,), post, out (M, N)): dense layers (b constant, prepacked).
void Matmul(ffi::PackedArgs args, ffi::Any* ret) {
  auto* a = args[0].cast<DLTensor*>();
  auto* w = args[1].cast<DLTensor*>();
  auto* b = args[2].cast<DLTensor*>();
  int64_t post = args[3].cast<int64_t>();
  auto* y = args[4].cast<DLTensor*>();
  int64_t m = a->shape[0], kk = a->shape[1], n = w->shape[1];
  std::ostringstream k;
  k << "matmul|" << m << ',' << kk << ',' << n << '|' << post << '|' << w->data << '|' << b->data << '|' << Fingerprint(w) << '|'
    << Fingerprint(b);
  std::string key = k.str();
  auto entry = Lookup(key);
  if (!entry) {
    memory::desc amd({m, kk}, memory::data_type::f32, memory::format_tag::ab);
    memory::desc wuser({kk, n}, memory::data_type::f32, memory::format_tag::ab);
    memory::desc wany({kk, n}, memory::data_type::f32, memory::format_tag::any);
    memory::desc bmd({1, n}, memory::data_type::f32, memory::format_tag::ab);
    memory::desc ymd({m, n}, memory::data_type::f32, memory::format_tag::ab);
    auto pd = dnnl::matmul::primitive_desc(Engine(), amd, wany, bmd, ymd, PostOps(post));
    entry = std::make_shared<Cached>();
    entry->prim = dnnl::matmul(pd);
    entry->weights = Prepack(wuser, w->data, pd.weights_desc());
    entry->bias = memory(bmd, Engine(), b->data);
    entry->src = amd;
    entry->dst = ymd;
    Store(key, entry);
  }
  dnnl::stream s(Engine());
  memory src(entry->src, Engine(), a->data), dst(entry->dst, Engine(), y->data);
  entry->prim.execute(s, {{DNNL_ARG_SRC, src},
                          {DNNL_ARG_WEIGHTS, entry->weights},
                          {DNNL_ARG_BIAS, entry->bias},
                          {DNNL_ARG_DST, dst}});
  s.wait();
}

// Drop cached primitives (their prepacked weights point at a module's constants).
void ClearCache(ffi::PackedArgs, ffi::Any* ret) {
  std::lock_guard<std::mutex> lock(cache_mu);
  Cache().clear();
}

}  // namespace tvmflow_dnnl

TVM_FFI_STATIC_INIT_BLOCK() {
  namespace refl = tvm::ffi::reflection;
  refl::GlobalDef()
      .def_packed("tvmflow.dnnl.conv2d", tvmflow_dnnl::Conv2d)
      .def_packed("tvmflow.dnnl.matmul", tvmflow_dnnl::Matmul)
      .def_packed("tvmflow.dnnl.clear_cache", tvmflow_dnnl::ClearCache);
}
