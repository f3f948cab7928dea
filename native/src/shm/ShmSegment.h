// POSIX shared-memory segments (/dev/shm) mapped into this process.
#pragma once
#include <cstddef>
#include <string>

namespace freekv {

namespace teardown {
class Pacer;
}

// One mapped segment. Owns the mapping (not the name: unlink() removes the name).
class ShmSegment {
 public:
  // Creates a new segment (O_EXCL, mode 0600) of `bytes` and maps it. Throws on failure.
  static ShmSegment* Create(const std::string& name, size_t bytes);
  // Maps an existing segment with its current size. Throws on failure.
  static ShmSegment* Open(const std::string& name);
  // Removes the name; existing mappings stay valid. Returns false if it did not exist.
  static bool Unlink(const std::string& name);
  // Allocates memory for bytes [offset, offset + length) of the segment now (fallocate on its
  // file, keeping its size): on tmpfs the pages are really taken, so a full /dev/shm fails here
  // with ENOSPC (a std::system_error carrying errno) instead of a SIGBUS at a later write.
  // Already allocated pages are kept as they are.
  void Allocate(size_t offset, size_t length) const;
  // Commits memory for bytes [offset, offset + length) by write faults through this mapping
  // (MADV_POPULATE_WRITE; offset a multiple of the OS page), split in pieces over up to `threads`
  // threads: allocated and zeroed in parallel, where fallocate holds the file's lock and leaves
  // the zeroing to the first touch. A full /dev/shm fails here (std::system_error with ENOSPC)
  // instead of a SIGBUS later. Kernels without MADV_POPULATE_WRITE (before Linux 5.14): fallocate.
  void Populate(size_t offset, size_t length, unsigned threads) const;
  // Frees the memory of bytes [offset, offset + length) (their contents read as zeros after).
  void Punch(size_t offset, size_t length) const;
  // Bytes of memory the segment's file really holds (st_blocks * 512).
  size_t AllocatedBytes() const;
  // Unmaps the segment now, in pieces; with a pacer, waiting between pieces while the process
  // has foreground work (TeardownGate.h). data() is null after.
  void Unmap(teardown::Pacer* pacer);
  ~ShmSegment();
  void* data() const { return data_; }
  size_t size() const { return size_; }
  const std::string& name() const { return name_; }

 private:
  ShmSegment(std::string name, void* data, size_t size) : name_(std::move(name)), data_(data), size_(size) {}
  std::string name_;
  void* data_;
  size_t size_;
};

}  // namespace freekv
