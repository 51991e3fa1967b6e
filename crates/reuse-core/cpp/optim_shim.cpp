// A C interface to libtorch's fused AdamW kernel (`at::_fused_adamw_`, what
// `torch.optim.AdamW(fused=True)` calls), which tch does not expose. One pass over each
// parameter's memory instead of a dozen elementwise ops: the update is memory-bound, so
// this is several times faster on large tables (embeddings).
//
// Tensors cross the boundary as `at::Tensor*`, which is what tch's `Tensor::as_ptr`
// holds. Every C++ exception is caught and returned as its message.

#include <ATen/core/Tensor.h>
#include <ATen/ops/_fused_adamw.h>

#include <vector>

#include "shim.h"

namespace {

using reuse_core_shim::guarded;

std::vector<at::Tensor> list(void** ts, int n) {
  std::vector<at::Tensor> out;
  out.reserve(n);
  for (int i = 0; i < n; ++i) out.push_back(*static_cast<at::Tensor*>(ts[i]));
  return out;
}

}  // namespace

extern "C" {

// One AdamW update (decoupled weight decay) of `n` parameters, in place, on one device.
// `steps` are f32 scalars holding each parameter's bias-correction count after this
// update (the caller increments them, as torch.optim does before its fused call).
int reuse_core_fused_adamw(void** params, void** grads, void** exp_avgs, void** exp_avg_sqs,
                           void** steps, int n, double lr, double beta1, double beta2,
                           double weight_decay, double eps, char* err, size_t len) {
  return guarded(err, len, [&] {
    auto p = list(params, n);
    auto g = list(grads, n);
    auto m = list(exp_avgs, n);
    auto v = list(exp_avg_sqs, n);
    auto s = list(steps, n);
    std::vector<at::Tensor> none;
    at::_fused_adamw_(p, g, m, v, none, s, lr, beta1, beta2, weight_decay, eps,
                      /*amsgrad=*/false, /*maximize=*/false);
  });
}

// Drops the gradient of each of `n` tensors (leaves it undefined), as PyTorch's
// `zero_grad(set_to_none=True)`: the next backward then hands its gradient to the
// parameter instead of adding it into a zeroed buffer. Tensors without a gradient are
// left alone.
int reuse_core_clear_grads(void** ts, int n, char* err, size_t len) {
  return guarded(err, len, [&] {
    for (int i = 0; i < n; ++i) {
      auto* t = static_cast<at::Tensor*>(ts[i]);
      if (t->defined() && t->grad().defined()) t->mutable_grad().reset();
    }
  });
}

}  // extern "C"
