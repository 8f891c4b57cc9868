// Gradient hooks for Rust (trainer/src/hooks.rs): tch exposes no autograd
// hooks, so this shim installs a post-accumulate-grad hook on a leaf tensor
// (what PyTorch's `Tensor.register_post_accumulate_grad_hook` installs) that
// calls back into Rust with the tensor's index after autograd has
// accumulated its `.grad` in a backward pass.
//
// Every function here catches C++ exceptions: none crosses into Rust. An
// error is written, NUL-terminated, into the caller's buffer and the
// function returns nonzero.
//
// Ownership: each hook holds one reference to the Rust context `ctx`, handed
// over by the caller of cohort_grad_hook_set and given back through
// `release` when the hook is destroyed (cleared, replaced, or its tensor
// freed), so the context outlives every hook that can call it.

#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/variable.h>

#include <cstdint>
#include <cstring>
#include <exception>
#include <memory>
#include <string>

extern "C" {
typedef void (*cohort_grad_fired_fn)(void* ctx, int64_t index);
typedef void (*cohort_grad_release_fn)(void* ctx);
}

namespace {

struct RustHook final : torch::autograd::PostAccumulateGradHook {
  RustHook(void* ctx, int64_t index, cohort_grad_fired_fn fired,
           cohort_grad_release_fn release)
      : ctx_(ctx), index_(index), fired_(fired), release_(release) {}
  ~RustHook() override { release_(ctx_); }
  RustHook(const RustHook&) = delete;
  RustHook& operator=(const RustHook&) = delete;

  // The Rust side catches its own panics: this never throws.
  void operator()(const torch::autograd::Variable& /*tensor*/) override {
    fired_(ctx_, index_);
  }

  void* ctx() const { return ctx_; }

 private:
  void* ctx_;
  int64_t index_;
  cohort_grad_fired_fn fired_;
  cohort_grad_release_fn release_;
};

void write_error(char* err, size_t err_len, const std::string& msg) {
  if (err == nullptr || err_len == 0) {
    return;
  }
  size_t n = msg.size() < err_len - 1 ? msg.size() : err_len - 1;
  std::memcpy(err, msg.data(), n);
  err[n] = '\0';
}

}  // namespace

extern "C" {

// Installs a hook on the leaf tensor `tensor` (an `at::Tensor*`, as tch's
// `Tensor::as_ptr`) that calls `fired(ctx, index)` after each accumulation
// of its gradient. Takes over one reference to `ctx` whatever the outcome
// (released through `release` on failure). Refuses a tensor that is not a
// leaf requiring grad, or that already has a post-accumulate-grad hook.
int cohort_grad_hook_set(const void* tensor, void* ctx, int64_t index,
                         cohort_grad_fired_fn fired,
                         cohort_grad_release_fn release, char* err,
                         size_t err_len) {
  std::unique_ptr<RustHook> hook;
  try {
    hook = std::make_unique<RustHook>(ctx, index, fired, release);
  } catch (const std::exception& e) {
    release(ctx);
    write_error(err, err_len, std::string("allocating the hook: ") + e.what());
    return 1;
  }
  try {
    const at::Tensor& t = *static_cast<const at::Tensor*>(tensor);
    if (!t.defined()) {
      write_error(err, err_len, "the tensor is undefined");
      return 1;
    }
    if (!t.requires_grad() || !t.is_leaf()) {
      write_error(err, err_len,
                  "the tensor is not a leaf that requires grad (a trainable "
                  "parameter)");
      return 1;
    }
    if (torch::autograd::impl::post_acc_grad_hooks(t) != nullptr) {
      write_error(err, err_len,
                  "the tensor already has a post-accumulate-grad hook");
      return 1;
    }
    torch::autograd::impl::set_post_acc_grad_hooks(t, std::move(hook));
    return 0;
  } catch (const std::exception& e) {
    write_error(err, err_len, e.what());
    return 1;
  }
}

// Removes the hook of `tensor` if it is one installed with context `ctx`
// (another owner's hook is left alone). Returns 1 if one was removed, 0 if
// none was, -1 on an error.
int cohort_grad_hook_clear(const void* tensor, const void* ctx, char* err,
                           size_t err_len) {
  try {
    const at::Tensor& t = *static_cast<const at::Tensor*>(tensor);
    if (!t.defined()) {
      return 0;
    }
    auto& current = torch::autograd::impl::post_acc_grad_hooks(t);
    auto* ours = dynamic_cast<RustHook*>(current.get());
    if (ours == nullptr || ours->ctx() != ctx) {
      return 0;
    }
    torch::autograd::impl::set_post_acc_grad_hooks(t, nullptr);
    return 1;
  } catch (const std::exception& e) {
    write_error(err, err_len, e.what());
    return -1;
  }
}

}  // extern "C"
