// The buffers of a TorchScript module file (trainer/src/model/torchscript.rs):
// tch lists a module's parameters but not its buffers, which cohort refuses
// (they would not be reduced, checkpointed or exported).
//
// No C++ exception crosses into Rust: an error is written, NUL-terminated,
// into the caller's buffer and the function returns nonzero.

#include <torch/csrc/jit/api/module.h>
#include <torch/csrc/jit/serialization/import.h>

#include <cstring>
#include <exception>
#include <string>

extern "C" {

typedef void (*cohort_buffer_name_fn)(void* ctx, const char* name);

// Loads the module at `path` onto the CPU and calls `name(ctx, NAME)` for
// each of its buffers, submodules' included (`bn.running_mean`).
int cohort_module_buffers(const char* path, void* ctx,
                          cohort_buffer_name_fn name, char* err,
                          size_t err_len) {
  try {
    torch::jit::Module module =
        torch::jit::load(std::string(path), c10::Device(c10::kCPU));
    for (const auto& buffer : module.named_buffers(/*recurse=*/true)) {
      name(ctx, buffer.name.c_str());
    }
    return 0;
  } catch (const std::exception& e) {
    if (err != nullptr && err_len > 0) {
      std::string msg = e.what();
      size_t n = msg.size() < err_len - 1 ? msg.size() : err_len - 1;
      std::memcpy(err, msg.data(), n);
      err[n] = '\0';
    }
    return 1;
  }
}

}  // extern "C"
