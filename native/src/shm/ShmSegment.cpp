#include "shm/ShmSegment.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <stdexcept>
#include <system_error>
#include <thread>
#include <vector>

#include "Parallel.h"
#include "shm/TeardownGate.h"

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif

namespace freekv {

static std::runtime_error SysError(const std::string& what, const std::string& name) {
  return std::runtime_error(what + " '" + name + "': " + std::strerror(errno));
}

ShmSegment* ShmSegment::Create(const std::string& name, size_t bytes) {
  if (bytes == 0) throw std::invalid_argument("shared-memory segment size must be > 0");
  int fd = shm_open(name.c_str(), O_CREAT | O_EXCL | O_RDWR, 0600);
  if (fd < 0) throw SysError("shm_open(create)", name);
  if (ftruncate(fd, static_cast<off_t>(bytes)) != 0) {
    auto err = SysError("ftruncate", name);
    close(fd);
    shm_unlink(name.c_str());
    throw err;
  }
  void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  close(fd);
  if (p == MAP_FAILED) {
    auto err = SysError("mmap", name);
    shm_unlink(name.c_str());
    throw err;
  }
  return new ShmSegment(name, p, bytes);
}

ShmSegment* ShmSegment::Open(const std::string& name) {
  int fd = shm_open(name.c_str(), O_RDWR, 0600);
  if (fd < 0) throw SysError("shm_open(open)", name);
  struct stat st;
  if (fstat(fd, &st) != 0) {
    auto err = SysError("fstat", name);
    close(fd);
    throw err;
  }
  size_t bytes = static_cast<size_t>(st.st_size);
  if (bytes == 0) {
    close(fd);
    throw std::runtime_error("shared-memory segment '" + name + "' is empty");
  }
  void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  close(fd);
  if (p == MAP_FAILED) throw SysError("mmap", name);
  return new ShmSegment(name, p, bytes);
}

bool ShmSegment::Unlink(const std::string& name) {
  if (shm_unlink(name.c_str()) == 0) return true;
  if (errno == ENOENT) return false;
  throw SysError("shm_unlink", name);
}

// The segment's file, opened again by name (the mapping keeps no descriptor: thousands of
// sessions would hold four each). Closed when it goes out of scope.
namespace {
struct Fd {
  int fd;
  explicit Fd(const std::string& name) : fd(shm_open(name.c_str(), O_RDWR, 0600)) {
    if (fd < 0) throw SysError("shm_open(open)", name);
  }
  ~Fd() { close(fd); }
};
void CheckRange(const ShmSegment& s, size_t offset, size_t length) {
  if (offset > s.size() || length > s.size() - offset)
    throw std::out_of_range("range [" + std::to_string(offset) + ", +" + std::to_string(length) + ") is outside segment '" +
                            s.name() + "' of " + std::to_string(s.size()) + " bytes");
}
}  // namespace

void ShmSegment::Allocate(size_t offset, size_t length) const {
  CheckRange(*this, offset, length);
  if (length == 0) return;
  Fd f(name_);
  int rc;
  do {
    rc = fallocate(f.fd, 0, static_cast<off_t>(offset), static_cast<off_t>(length));
  } while (rc != 0 && errno == EINTR);
  if (rc != 0 && errno == EOPNOTSUPP) {
    // A file system without fallocate: posix_fallocate writes the blocks instead.
    rc = posix_fallocate(f.fd, static_cast<off_t>(offset), static_cast<off_t>(length));
    if (rc != 0) errno = rc;
  }
  if (rc != 0) throw std::system_error(errno, std::generic_category(), "fallocate '" + name_ + "'");
}

void ShmSegment::Populate(size_t offset, size_t length, unsigned threads) const {
  CheckRange(*this, offset, length);
  if (length == 0) return;
  teardown::Foreground foreground;  // other sessions' teardowns wait (TeardownGate.h)
  static const size_t os_page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  if (offset % os_page != 0) throw std::invalid_argument("populate: offset must be a multiple of the OS page");
  constexpr size_t kPiece = size_t(64) << 20;
  const size_t pieces = (length + kPiece - 1) / kPiece;
  std::atomic<size_t> next{0};
  std::atomic<int> error{0};
  auto run = [&] {
    for (size_t i; !error.load() && (i = next.fetch_add(1)) < pieces;) {
      const size_t off = offset + i * kPiece, n = std::min(kPiece, offset + length - off);
      int rc;
      do {
        rc = madvise(static_cast<uint8_t*>(data_) + off, n, MADV_POPULATE_WRITE);
      } while (rc != 0 && (errno == EINTR || errno == EAGAIN));
      if (rc != 0) {
        int e = errno;
        // EFAULT: a fault would have raised SIGBUS, which on tmpfs means it is full.
        if (e == EFAULT) e = ENOSPC;
        int zero = 0;
        error.compare_exchange_strong(zero, e);
      }
    }
  };
  const unsigned n = static_cast<unsigned>(std::min<size_t>(std::max(1u, threads), pieces));
  RunOnThreads(n, run);
  const int e = error.load();
  if (e == EINVAL) {
    Allocate(offset, length);  // a kernel without MADV_POPULATE_WRITE
    return;
  }
  if (e != 0) throw std::system_error(e, std::generic_category(), "madvise(MADV_POPULATE_WRITE) '" + name_ + "'");
}

void ShmSegment::Punch(size_t offset, size_t length) const {
  CheckRange(*this, offset, length);
  if (length == 0) return;
  Fd f(name_);
  if (fallocate(f.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, static_cast<off_t>(offset), static_cast<off_t>(length)) != 0)
    throw std::system_error(errno, std::generic_category(), "fallocate(punch hole) '" + name_ + "'");
}

size_t ShmSegment::AllocatedBytes() const {
  Fd f(name_);
  struct stat st;
  if (fstat(f.fd, &st) != 0) throw SysError("fstat", name_);
  return static_cast<size_t>(st.st_blocks) * 512;
}

// Unmapped in pieces of 64 MiB: munmap holds the process's memory-map lock while it tears down
// the page tables of its whole range, and every thread that maps, unmaps or faults in memory
// meanwhile waits, the event loop included (V8's heap): closing a 2 GiB session from a worker
// thread in one call still held compute's event loop ~100 ms (bench:session-close). Piece by
// piece the lock is let go between pieces, and with a pacer the unmap waits there while the
// process opens a session or commits and pins a store (TeardownGate.h).
void ShmSegment::Unmap(teardown::Pacer* pacer) {
  if (!data_) return;
  constexpr size_t kPiece = size_t{64} << 20;
  char* p = static_cast<char*>(data_);
  for (size_t off = 0; off < size_; off += kPiece) {
    if (pacer && off > 0) pacer->BetweenPieces();
    munmap(p + off, std::min(kPiece, size_ - off));
  }
  data_ = nullptr;
}

ShmSegment::~ShmSegment() { Unmap(nullptr); }

}  // namespace freekv
