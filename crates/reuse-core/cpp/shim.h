// What reuse-core's C shims share: every C++ exception is caught at the boundary and its
// message written into the caller's buffer.
#pragma once

#include <c10/util/Exception.h>

#include <cstring>
#include <exception>

namespace reuse_core_shim {

inline void set_err(char* err, size_t len, const char* msg) {
  if (err == nullptr || len == 0) return;
  std::strncpy(err, msg, len - 1);
  err[len - 1] = '\0';
}

// Runs `f`; 0, or -1 with the exception's message in `err`.
template <class F>
int guarded(char* err, size_t len, F&& f) {
  try {
    f();
    return 0;
  } catch (const c10::Error& e) {
    set_err(err, len, e.what_without_backtrace());
  } catch (const std::exception& e) {
    set_err(err, len, e.what());
  } catch (...) {
    set_err(err, len, "unknown C++ exception");
  }
  return -1;
}

}  // namespace reuse_core_shim
