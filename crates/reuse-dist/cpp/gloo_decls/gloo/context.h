// Declarations only (see gloo/algorithm.h). `setTimeout` is the one member
// ProcessGroupGloo.hpp names; the shim never constructs a Context.
#pragma once
#include <chrono>
namespace gloo {
class Context {
 public:
  void setTimeout(std::chrono::milliseconds timeout);
};
}  // namespace gloo
