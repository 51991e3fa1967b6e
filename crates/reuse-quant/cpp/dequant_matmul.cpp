// x W^T for a quantized W whose backward rebuilds W instead of keeping it.
//
// With plain autograd, `x.matmul(dequantize(codes).t())` saves the dense W for the
// gradient of x, so a frozen int4 base holds a dense f32 copy of every weight from the
// forward pass to the backward pass: as much memory as the f32 model. This autograd
// function saves only the codes, scales and zero points, and dequantizes again in
// backward (as QLoRA's 4-bit matmul does). W itself gets no gradient (quantized weights
// are frozen buffers). The dequantization is the one of reuse-quant's
// `QuantizedWeight` (weight.rs): codes (int8, or two int4 per byte, low nibble first),
// per-group zero points and scales, value = (code - zero) * scale.
#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>

#include <cstring>
#include <string>
#include <vector>

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// One f32 buffer per thread and device, reused by every call: weights are rebuilt one at
// a time, and each is dead once its matmul has been issued (the function never saves
// it; on CUDA the next rebuild is ordered after that matmul on the same stream), so a
// training step allocates no weight-sized buffer per call and the heap does not
// fragment. The buffers are never freed (no destructor runs after libtorch's own
// teardown at exit).
at::Tensor scratch(int64_t n, const at::Device& device) {
  thread_local auto* bufs = new std::vector<at::Tensor>();
  for (auto& b : *bufs) {
    if (b.device() == device) {
      if (b.numel() < n) {
        b = at::empty({n}, b.options());
      }
      return b.narrow(0, 0, n);
    }
  }
  bufs->push_back(at::empty({n}, at::TensorOptions().dtype(at::kFloat).device(device)));
  return bufs->back().narrow(0, 0, n);
}

at::Tensor build(const at::Tensor& q, const at::Tensor& scale, const at::Tensor& zero,
                 int64_t bits, int64_t out, int64_t in, at::ScalarType kind) {
  at::Tensor codes = scratch(out * in, q.device());
  if (bits == 8) {
    codes = codes.view({out, in});
    codes.copy_(q);
  } else {
    codes = codes.view({out, in / 2, 2});
    codes.select(2, 0).copy_(q.bitwise_and(15));
    codes.select(2, 1).copy_(q.bitwise_right_shift(4));
    codes = codes.view({out, in});
  }
  const int64_t groups = scale.size(1);
  codes = codes.view({out, groups, in / groups});
  // In place, in the scratch buffer.
  codes.sub_(zero.unsqueeze(2)).mul_(scale.unsqueeze(2));
  return codes.view({out, in}).to(kind);
}

struct DequantMatmul : public torch::autograd::Function<DequantMatmul> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& q,
                            const at::Tensor& scale, const at::Tensor& zero, int64_t bits,
                            int64_t out, int64_t in) {
    const auto kind = x.scalar_type();
    at::Tensor w = build(q, scale, zero, bits, out, in, kind);
    ctx->save_for_backward({q, scale, zero});
    ctx->saved_data["bits"] = bits;
    ctx->saved_data["out"] = out;
    ctx->saved_data["in"] = in;
    ctx->saved_data["kind"] = static_cast<int64_t>(kind);
    return x.matmul(w.t());
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const auto kind = static_cast<at::ScalarType>(ctx->saved_data["kind"].toInt());
    at::Tensor w = build(saved[0], saved[1], saved[2], ctx->saved_data["bits"].toInt(),
                         ctx->saved_data["out"].toInt(), ctx->saved_data["in"].toInt(), kind);
    at::Tensor gx = grads[0].matmul(w);
    return {gx, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor()};
  }
};

void set_error(char* err, size_t len, const char* msg) {
  if (err && len > 0) {
    std::strncpy(err, msg, len - 1);
    err[len - 1] = '\0';
  }
}

}  // namespace

// Returns a new at::Tensor* (owned by the caller), or nullptr with `err` set.
extern "C" at::Tensor* reuse_quant_dequant_matmul(const at::Tensor* x, const at::Tensor* q,
                                                  const at::Tensor* scale,
                                                  const at::Tensor* zero, int64_t bits,
                                                  int64_t out, int64_t in, char* err,
                                                  size_t err_len) {
  try {
    at::Tensor y = DequantMatmul::apply(*x, *q, *scale, *zero, bits, out, in);
    return new at::Tensor(std::move(y));
  } catch (const std::exception& e) {
    set_error(err, err_len, e.what());
  } catch (...) {
    set_error(err, err_len, "unknown C++ exception");
  }
  return nullptr;
}
