// Run a tvmflow build from C++ with the TVM runtime alone (no Python).
//
//   run_model <build folder or model.so> <input.bin> <d0>x<d1>x... [output.bin]
//
// <input.bin> holds the float32 input in C order with the given shape (e.g. 1x1x28x28). The model's
// first output is printed (one value per line) or written as float32 to output.bin. Build it with
// examples/cpp/build.sh: headers and libtvm_runtime / libtvm_ffi come from the installed
// apache-tvm and apache-tvm-ffi wheels.
#include <dlpack/dlpack.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

namespace {

constexpr int kPooledAllocator = 2;  // tvm.runtime.vm.VirtualMachine.POOLED_ALLOCATOR

std::vector<int64_t> ParseShape(const std::string& text) {
  std::vector<int64_t> shape;
  std::stringstream parts(text);
  std::string dim;
  while (std::getline(parts, dim, 'x')) shape.push_back(std::stoll(dim));
  return shape;
}

// Host memory for input tensors (the tvm-ffi wheel's headers; tvm/runtime/tensor.h needs headers the
// apache-tvm wheel does not ship).
struct HostAlloc {
  void AllocData(DLTensor* tensor) { tensor->data = std::aligned_alloc(64, (tvm::ffi::GetDataSize(*tensor) + 63) / 64 * 64); }
  void FreeData(DLTensor* tensor) { std::free(tensor->data); }
};

std::string LibraryPath(std::string path) {
  std::ifstream probe(path + "/model.so");  // a folder fetched with `tvmflow fetch`
  return probe.good() ? path + "/model.so" : path;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 4) {
    std::cerr << "usage: " << argv[0] << " <build folder or model.so> <input.bin> <shape, e.g. 1x3x224x224> [output.bin]\n";
    return 2;
  }
  std::vector<int64_t> shape = ParseShape(argv[3]);
  int64_t count = 1;
  for (int64_t d : shape) count *= d;
  std::vector<float> input(count);
  std::ifstream in(argv[2], std::ios::binary);
  if (!in.read(reinterpret_cast<char*>(input.data()), count * sizeof(float))) {
    std::cerr << "cannot read " << count << " float32 values from " << argv[2] << "\n";
    return 2;
  }

  // The exported library holds the Relax VM executable: load it, then start a VM on the CPU.
  tvm::ffi::Module lib = tvm::ffi::Module::LoadFromFile(LibraryPath(argv[1]));
  tvm::ffi::Module vm = lib->GetFunction("vm_load_executable").value()().cast<tvm::ffi::Module>();
  vm->GetFunction("vm_initialization").value()(static_cast<int>(kDLCPU), 0, kPooledAllocator);

  DLDevice cpu{kDLCPU, 0};
  tvm::ffi::Tensor x = tvm::ffi::Tensor::FromNDAlloc(HostAlloc(), tvm::ffi::ShapeView(shape.data(), shape.size()),
                                                      DLDataType{kDLFloat, 32, 1}, cpu);
  std::memcpy(x.data_ptr(), input.data(), input.size() * sizeof(float));

  tvm::ffi::Function main_fn = vm->GetFunction("main").value();
  tvm::ffi::Any result = main_fn(x);
  std::optional<tvm::ffi::Tensor> first = result.try_cast<tvm::ffi::Tensor>();
  if (!first) {  // several outputs: an Array, take the first
    first = result.cast<tvm::ffi::Array<tvm::ffi::Any>>()[0].cast<tvm::ffi::Tensor>();
  }
  const tvm::ffi::Tensor& y = *first;  // on the CPU: its data is host memory
  int64_t n = 1;
  for (int64_t d : y.shape()) n *= d;
  std::vector<float> output(n);
  std::memcpy(output.data(), y.data_ptr(), n * sizeof(float));

  if (argc > 4) {
    std::ofstream out(argv[4], std::ios::binary);
    out.write(reinterpret_cast<const char*>(output.data()), n * sizeof(float));
  } else {
    for (float v : output) std::printf("%.9g\n", v);
  }
  return 0;
}
