// A C interface to one autograd node for a whole ReLU MLP (linear, ReLU, ..., linear),
// which tch cannot express (it has no custom autograd functions).
//
// Autograd records such an MLP as several nodes per layer (addmm, transpose, ReLU, and
// an accumulation that copies each weight gradient out of its transposed layout). For
// small layers the bookkeeping costs as much as the arithmetic. This node saves each
// layer's input and weight in forward, and its backward makes, per layer, the weight
// gradient directly in the weight's [out, in] layout (grad^T x), the bias gradient (a
// column sum), and the input gradient masked by the ReLU (threshold_backward on the
// saved ReLU output, as PyTorch's ReluBackward does). The arithmetic is the same as
// autograd's; the tests compare the two.
//
// Tensors cross the boundary as `at::Tensor*`, which is what tch's `Tensor::as_ptr`
// holds. Every C++ exception is caught and returned as its message.

#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <torch/csrc/autograd/custom_function.h>

#include <vector>

#include "shim.h"

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Layer i: h_{i+1} = relu(h_i W_i^T + b_i), the last layer without the ReLU; h_0 = x.
at::Tensor run_layers(const at::Tensor& x, at::TensorList ws, at::TensorList bs,
                      std::vector<at::Tensor>* hidden) {
  const size_t n = ws.size();
  at::Tensor h = x;
  for (size_t i = 0; i < n; ++i) {
    at::Tensor z = at::addmm(bs[i], h, ws[i].t());
    if (i + 1 < n) {
      z.relu_();
      if (hidden != nullptr) hidden->push_back(z);
    }
    h = z;
  }
  return h;
}

struct ReluMlp : public torch::autograd::Function<ReluMlp> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, at::TensorList ws,
                            at::TensorList bs) {
    const int64_t n = static_cast<int64_t>(ws.size());
    // Saved: x, the n - 1 hidden ReLU outputs (each the next layer's input), the n
    // weights.
    std::vector<at::Tensor> saved;
    saved.reserve(2 * n);
    saved.push_back(x);
    at::Tensor out = run_layers(x, ws, bs, &saved);
    for (const auto& w : ws) saved.push_back(w);
    ctx->save_for_backward(saved);
    ctx->saved_data["n"] = n;
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const int64_t n = ctx->saved_data["n"].toInt();
    at::Tensor g = grads[0];
    // Inputs, flattened as autograd sees them: x, the n weights, the n biases.
    variable_list out(1 + 2 * n);
    for (int64_t i = n - 1; i >= 0; --i) {
      const at::Tensor& input = saved[i];
      const at::Tensor& w = saved[n + i];
      if (ctx->needs_input_grad(1 + i)) out[1 + i] = g.t().mm(input);
      if (ctx->needs_input_grad(1 + n + i)) out[1 + n + i] = g.sum(0);
      if (i > 0) {
        g = at::threshold_backward(g.mm(w), input, 0);
      } else if (ctx->needs_input_grad(0)) {
        out[0] = g.mm(w);
      }
    }
    return out;
  }
};

}  // namespace

extern "C" {

// The MLP's output for `x` [batch, in] through `n` layers (weights [out, in], biases
// [out]), as one autograd node when gradients are recorded. Returns a new `at::Tensor*`
// (owned by the caller), or null with `err` empty when the fast path does not apply
// (autocast is on: the caller runs its plain path), or null with `err` set on failure.
void* reuse_core_relu_mlp(void* x, void** ws, void** bs, int n, char* err, size_t len) {
  if (err != nullptr && len > 0) err[0] = '\0';
  at::Tensor* result = nullptr;
  reuse_core_shim::guarded(err, len, [&] {
    const auto& xt = *static_cast<at::Tensor*>(x);
    if (at::autocast::is_autocast_enabled(xt.device().type())) return;
    std::vector<at::Tensor> w, b;
    w.reserve(n);
    b.reserve(n);
    for (int i = 0; i < n; ++i) {
      w.push_back(*static_cast<at::Tensor*>(ws[i]));
      b.push_back(*static_cast<at::Tensor*>(bs[i]));
    }
    bool record = at::GradMode::is_enabled() && xt.requires_grad();
    for (int i = 0; i < n && !record; ++i)
      record = at::GradMode::is_enabled() && (w[i].requires_grad() || b[i].requires_grad());
    at::Tensor out = record ? ReluMlp::apply(xt, at::TensorList(w), at::TensorList(b))
                            : run_layers(xt, w, b, nullptr);
    result = new at::Tensor(std::move(out));
  });
  return result;
}

}  // extern "C"
