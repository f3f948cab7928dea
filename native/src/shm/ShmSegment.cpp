#include "shm/ShmSegment.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <stdexcept>
#include <system_error>

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

ShmSegment::~ShmSegment() {
  if (data_) munmap(data_, size_);
}

}  // namespace freekv
