#include "device/shm.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <unordered_map>

#include "hma/error.hpp"

namespace hma::detail {

namespace {

struct Mapping {
  std::size_t bytes = 0;
  int fd = -1;  // this process's own memory: kept open so peers can open it through /proc
};

struct Wire {  // what an IpcHandle carries
  std::int64_t pid = 0;
  std::int32_t fd = -1;
};

std::mutex mu;
std::unordered_map<void*, Mapping>& maps() {
  static auto* m = new std::unordered_map<void*, Mapping>;  // outlives static destructors
  return *m;
}

[[noreturn]] void fail(const std::string& what) {
  throw Error("hma: host emulation: " + what + ": " + std::strerror(errno));
}

}  // namespace

std::string emulated_device_id(int device) {
  char host[256] = {};
  (void)gethostname(host, sizeof host - 1);
  return std::string("emulated:") + host + ":" + std::to_string(device);
}

void* shm_alloc(std::size_t bytes) {
  if (bytes == 0) bytes = 1;
  const int fd = memfd_create("hma-device", MFD_CLOEXEC);
  if (fd < 0) fail("memfd_create");
  if (ftruncate(fd, static_cast<off_t>(bytes)) != 0) {
    const int err = errno;
    close(fd);
    errno = err;
    fail("ftruncate of shared memory");
  }
  void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (p == MAP_FAILED) {
    const int err = errno;
    close(fd);
    errno = err;
    fail("mmap of shared memory");
  }
  std::lock_guard<std::mutex> l(mu);
  maps()[p] = Mapping{bytes, fd};
  return p;
}

void shm_export(void* p, IpcHandle& h) {
  std::lock_guard<std::mutex> l(mu);
  const auto it = maps().find(p);
  if (it == maps().end() || it->second.fd < 0)
    throw Error("hma: host emulation: internal: export of memory that is not this process's shared memory");
  const Wire w{static_cast<std::int64_t>(getpid()), it->second.fd};
  std::memset(h.bytes, 0, sizeof h.bytes);
  std::memcpy(h.bytes, &w, sizeof w);
}

void* shm_open_peer(const IpcHandle& h, std::size_t bytes) {
  Wire w;
  std::memcpy(&w, h.bytes, sizeof w);
  if (bytes == 0) bytes = 1;
  char path[64];
  std::snprintf(path, sizeof path, "/proc/%lld/fd/%d", static_cast<long long>(w.pid), static_cast<int>(w.fd));
  const int fd = open(path, O_RDWR | O_CLOEXEC);
  if (fd < 0) fail(std::string("open(") + path + ") of a peer's buffer");
  void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  const int err = errno;
  close(fd);
  errno = err;
  if (p == MAP_FAILED) fail(std::string("mmap of a peer's buffer ") + path);
  std::lock_guard<std::mutex> l(mu);
  maps()[p] = Mapping{bytes, -1};
  return p;
}

bool shm_release(void* p) noexcept {
  if (p == nullptr) return false;
  std::lock_guard<std::mutex> l(mu);
  const auto it = maps().find(p);
  if (it == maps().end()) return false;
  munmap(p, it->second.bytes);
  if (it->second.fd >= 0) close(it->second.fd);
  maps().erase(it);
  return true;
}

}  // namespace hma::detail
