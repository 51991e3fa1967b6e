// A C interface to libtorch's own distributed engine (c10d): a TCPStore rendezvous and a
// Gloo process group, with all-reduce, broadcast, all-gather and barrier. reuse-dist's
// Rust API calls these; every C++ exception is caught and returned as a message, so a
// dead peer or a timeout is an error in Rust, never an abort.
//
// Tensors cross the boundary as `at::Tensor*`, which is what tch's `Tensor::as_ptr`
// holds.

#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>
#include <vector>

namespace {

struct Group {
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::ProcessGroupGloo> pg;
  std::chrono::milliseconds timeout;
};

void set_err(char* err, size_t len, const char* msg) {
  if (err == nullptr || len == 0) return;
  std::strncpy(err, msg, len - 1);
  err[len - 1] = '\0';
}

// Runs `f`; on a C++ exception writes its message to `err` and returns -1.
template <typename F>
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

void wait(const c10::intrusive_ptr<c10d::Work>& work, std::chrono::milliseconds timeout) {
  if (!work->wait(timeout)) {
    throw std::runtime_error("timed out after " + std::to_string(timeout.count()) + " ms");
  }
}

}  // namespace

extern "C" {

// Joins (or, on rank 0, hosts) the TCPStore at host:port and builds a Gloo process group
// of `world` ranks. Gloo binds the network interface `iface` (GLOO_SOCKET_IFNAME) when
// given, else the address `bind_host` resolves to when given, else this machine's
// hostname (falling back to loopback), as torch.distributed does.
void* reuse_dist_new(const char* host, int port, int rank, int world, int64_t timeout_ms,
                     const char* iface, const char* bind_host, char* err, size_t len) {
  Group* g = nullptr;
  int rc = guarded(err, len, [&] {
    auto timeout = std::chrono::milliseconds(timeout_ms);
    c10d::TCPStoreOptions opts;
    opts.port = static_cast<std::uint16_t>(port);
    opts.isServer = rank == 0;
    opts.numWorkers = static_cast<std::size_t>(world);
    opts.waitWorkers = true;
    opts.timeout = timeout;
    auto store = c10::make_intrusive<c10d::TCPStore>(std::string(host), opts);
    auto options = c10d::ProcessGroupGloo::Options::create(timeout);
    if (iface != nullptr && iface[0] != '\0') {
      options->devices.push_back(
          c10d::ProcessGroupGloo::createDeviceForInterface(std::string(iface)));
    } else if (bind_host != nullptr && bind_host[0] != '\0') {
      options->devices.push_back(
          c10d::ProcessGroupGloo::createDeviceForHostname(std::string(bind_host)));
    } else {
      options->devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice());
    }
    options->threads = 2;
    auto pg = c10::make_intrusive<c10d::ProcessGroupGloo>(store, rank, world, options);
    g = new Group{store, pg, timeout};
  });
  return rc == 0 ? g : nullptr;
}

void reuse_dist_free(void* group) {
  try {
    delete static_cast<Group*>(group);
  } catch (...) {
  }
}

// op: 0 sum, 1 max, 2 min.
int reuse_dist_all_reduce(void* group, void* tensor, int op, char* err, size_t len) {
  return guarded(err, len, [&] {
    auto* g = static_cast<Group*>(group);
    std::vector<at::Tensor> ts{*static_cast<at::Tensor*>(tensor)};
    c10d::AllreduceOptions o;
    o.reduceOp = op == 1 ? c10d::ReduceOp::MAX
                         : (op == 2 ? c10d::ReduceOp::MIN : c10d::ReduceOp::SUM);
    o.timeout = g->timeout;
    wait(g->pg->allreduce(ts, o), g->timeout);
  });
}

int reuse_dist_broadcast(void* group, void* tensor, int root, char* err, size_t len) {
  return guarded(err, len, [&] {
    auto* g = static_cast<Group*>(group);
    std::vector<at::Tensor> ts{*static_cast<at::Tensor*>(tensor)};
    c10d::BroadcastOptions o;
    o.rootRank = root;
    o.rootTensor = 0;
    o.timeout = g->timeout;
    wait(g->pg->broadcast(ts, o), g->timeout);
  });
}

// `outs` holds `world` tensors shaped like `input`; rank r's input lands in outs[r].
int reuse_dist_all_gather(void* group, void** outs, int n, void* input, char* err,
                          size_t len) {
  return guarded(err, len, [&] {
    auto* g = static_cast<Group*>(group);
    std::vector<std::vector<at::Tensor>> out(1);
    for (int i = 0; i < n; ++i) out[0].push_back(*static_cast<at::Tensor*>(outs[i]));
    std::vector<at::Tensor> in{*static_cast<at::Tensor*>(input)};
    c10d::AllgatherOptions o;
    o.timeout = g->timeout;
    wait(g->pg->allgather(out, in, o), g->timeout);
  });
}

int reuse_dist_barrier(void* group, char* err, size_t len) {
  return guarded(err, len, [&] {
    auto* g = static_cast<Group*>(group);
    c10d::BarrierOptions o;
    o.timeout = g->timeout;
    wait(g->pg->barrier(o), g->timeout);
  });
}

// Gives `param` the gradient `grad` (a parameter no backward reached has none, and tch
// has no setter for it).
int reuse_dist_set_grad(void* param, void* grad, char* err, size_t len) {
  return guarded(err, len, [&] {
    static_cast<at::Tensor*>(param)->mutable_grad() = *static_cast<at::Tensor*>(grad);
  });
}

}  // extern "C"
