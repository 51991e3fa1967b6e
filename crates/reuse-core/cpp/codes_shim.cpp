// x W^T for a GGUF Q8_0 / Q4_0 / Q4_1 weight held in its file's codes, as one autograd
// node whose backward rebuilds W instead of keeping it (tch has no custom autograd
// functions).
//
// With plain autograd, `x.matmul(dequantize(codes).t())` saves the dense W for the
// gradient of x, so a frozen base kept in its 4-bit codes would hold a dense copy of
// every weight from forward to backward while LoRA adapters train on it: as much memory
// as a dense base. This node saves only the codes, scales and minimums, and rebuilds W
// in backward (as QLoRA's 4-bit matmul does). W gets no gradient (the codes are frozen).
//
// The rebuild is `CodesStorage::dequantize_ops` (gguf/codes.rs), the same f32
// operations in the same order, then a cast to x's dtype. Per 32-weight group g of row
// r with f16 scale d (and, for Q4_1, f16 minimum m):
//   Q8_0: w = q * d            (q: int8 code)
//   Q4_0: w = d * (q - 8)      (q: 4-bit code; byte j of a group holds weight j in its
//   Q4_1: w = d * q + m         low nibble and weight j + 16 in its high nibble)

#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>

#include "shim.h"

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// ggml type: 0 Q8_0, 1 Q4_0, 2 Q4_1.
at::Tensor rebuild(const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& mins,
                   int64_t type, int64_t out, int64_t in, at::ScalarType kind) {
  const int64_t groups = in / 32;
  at::Tensor d = scales.to(at::kFloat).view({out, groups, 1});
  at::Tensor w;
  if (type == 0) {
    w = codes.to(at::kFloat).view({out, groups, 32}) * d;
  } else {
    at::Tensor c = codes.view({out, groups, 16});
    at::Tensor q = at::cat({c.bitwise_and(15), c.bitwise_right_shift(4)}, 2).to(at::kFloat);
    if (type == 2) {
      w = d * q + mins.to(at::kFloat).view({out, groups, 1});
    } else {
      w = d * (q - 8.0);
    }
  }
  w = w.view({out, in});
  return kind == at::kFloat ? w : w.to(kind);
}

struct CodesMatmul : public torch::autograd::Function<CodesMatmul> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& codes,
                            const at::Tensor& scales, const at::Tensor& mins, int64_t type,
                            int64_t out, int64_t in) {
    const auto kind = x.scalar_type();
    at::Tensor y = x.matmul(rebuild(codes, scales, mins, type, out, in, kind).t());
    ctx->save_for_backward({codes, scales, mins});
    ctx->saved_data["type"] = type;
    ctx->saved_data["out"] = out;
    ctx->saved_data["in"] = in;
    ctx->saved_data["kind"] = static_cast<int64_t>(kind);
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const auto kind = static_cast<at::ScalarType>(ctx->saved_data["kind"].toInt());
    at::Tensor w = rebuild(saved[0], saved[1], saved[2], ctx->saved_data["type"].toInt(),
                           ctx->saved_data["out"].toInt(), ctx->saved_data["in"].toInt(), kind);
    at::Tensor gx = grads[0].matmul(w);
    return {gx, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor()};
  }
};

}  // namespace

// A new at::Tensor* (owned by the caller) in `*y`; 0, or -1 with `err` set. `mins` may be
// null (Q8_0, Q4_0).
extern "C" int reuse_core_codes_matmul(const at::Tensor* x, const at::Tensor* codes,
                                       const at::Tensor* scales, const at::Tensor* mins,
                                       int64_t type, int64_t out, int64_t in, at::Tensor** y,
                                       char* err, size_t len) {
  return reuse_core_shim::guarded(err, len, [&] {
    // Autograd wants defined tensors: without minimums the scales stand in (unread).
    at::Tensor r = CodesMatmul::apply(*x, *codes, *scales, mins ? *mins : *scales, type, out, in);
    *y = new at::Tensor(std::move(r));
  });
}
