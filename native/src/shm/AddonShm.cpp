// JS class `ShmSegment`: create/open a segment and expose it as an external ArrayBuffer.
// The mapping lives as long as the JS object or until close(); buffers handed out earlier are
// detached on close() so JS can never touch an unmapped page. A page checksum computed off the
// main thread (crc32cPagesAsync) shares the mapping: close() stops it (its promise rejects) and
// the unmap happens once it let go, so it never reads an unmapped page either.
#include <napi.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#if defined(__GLIBC__)
#include <malloc.h>
#endif
#include <cerrno>
#include <cstdint>
#include <memory>
#include <string>
#include <system_error>
#include <utility>
#include <vector>

#include "AddonClasses.h"
#include "AddonModules.h"
#include "shm/Crc32c.h"
#include "shm/ShmSegment.h"
#include "shm/TeardownGate.h"

namespace freekv::addon {

namespace {

// crc32cPagesAsync's work: the checksums on a libuv worker thread (split over more threads by
// Crc32cPages), the promise settled on the main thread. It holds the mapping (a shared owner) so
// close() cannot unmap it under the worker; close() sets `cancel`, the worker stops after its
// current page and the promise rejects.
class Crc32cPagesWorker : public Napi::AsyncWorker {
 public:
  Crc32cPagesWorker(Napi::Env env, std::shared_ptr<ShmSegment> seg, std::shared_ptr<std::atomic<bool>> cancel, size_t offset,
                    size_t pageBytes, size_t count)
      : Napi::AsyncWorker(env, "freekv:crc32cPages"),
        deferred_(Napi::Promise::Deferred::New(env)),
        seg_(std::move(seg)),
        cancel_(std::move(cancel)),
        name_(seg_->name()),
        offset_(offset),
        page_(pageBytes),
        count_(count) {}
  Napi::Promise Promise() const { return deferred_.Promise(); }

 protected:
  void Execute() override {
    sums_.resize(count_);
    const bool done = count_ == 0 || freekv::Crc32cPages(static_cast<const uint8_t*>(seg_->data()) + offset_, page_, count_,
                                                         sums_.data(), cancel_.get());
    // Let go of the mapping here: when close() came meanwhile this unmaps it, off the main thread.
    seg_.reset();
    if (!done) SetError("segment '" + name_ + "' was closed while its page checksums were computed");
  }
  void OnOK() override {
    auto env = Env();
    auto out = Napi::Uint32Array::New(env, count_);
    if (count_ > 0) std::memcpy(out.Data(), sums_.data(), count_ * sizeof(uint32_t));
    deferred_.Resolve(out);
  }
  void OnError(const Napi::Error& e) override { deferred_.Reject(e.Value()); }

 private:
  Napi::Promise::Deferred deferred_;
  std::shared_ptr<ShmSegment> seg_;
  std::shared_ptr<std::atomic<bool>> cancel_;
  std::string name_;
  size_t offset_, page_, count_;
  std::vector<uint32_t> sums_;
};

// allocateAsync's work: fallocate of each range on a libuv worker thread (a reservation of a long
// context is gigabytes: ~0.12 s per GB on tmpfs), or with populateThreads > 0 write faults through
// the mapping from that many threads (ShmSegment::Populate), all or none: a failure punches the ranges done
// and rejects with the same `code` ("ENOSPC" when /dev/shm is full, else "EIO") as allocate().
// Holds the mapping like Crc32cPagesWorker; close() meanwhile stops it between ranges (rejects).
class AllocateWorker : public Napi::AsyncWorker {
 public:
  AllocateWorker(Napi::Env env, std::shared_ptr<ShmSegment> seg, std::shared_ptr<std::atomic<bool>> cancel,
                 std::vector<std::pair<size_t, size_t>> ranges, unsigned populateThreads, bool rollback)
      : Napi::AsyncWorker(env, "freekv:allocate"),
        deferred_(Napi::Promise::Deferred::New(env)),
        seg_(std::move(seg)),
        cancel_(std::move(cancel)),
        name_(seg_->name()),
        ranges_(std::move(ranges)),
        populate_threads_(populateThreads),
        rollback_(rollback) {}
  Napi::Promise Promise() const { return deferred_.Promise(); }

 protected:
  void Execute() override {
    size_t done = 0;
    try {
      for (; done < ranges_.size(); ++done) {
        if (cancel_->load()) throw std::runtime_error("segment '" + name_ + "' was closed while its memory was allocated");
        if (populate_threads_ > 0)
          seg_->Populate(ranges_[done].first, ranges_[done].second, populate_threads_);
        else
          seg_->Allocate(ranges_[done].first, ranges_[done].second);
      }
    } catch (const std::exception& e) {
      const auto* se = dynamic_cast<const std::system_error*>(&e);
      errno_ = se ? se->code().value() : 0;
      message_ = e.what();
      // Without rollback the ranges done stay: they may hold pages written meanwhile. With it, the
      // range that failed part-way goes too: populating threads may have filled some of its pieces
      // (fallocate undoes its own failure, populate does not).
      for (size_t i = 0; rollback_ && i <= done && i < ranges_.size(); ++i) {
        try {
          seg_->Punch(ranges_[i].first, ranges_[i].second);
        } catch (...) {
          // the segment is removed with its session at the latest
        }
      }
    }
    seg_.reset();
  }
  void OnOK() override {
    auto env = Env();
    if (message_.empty()) {
      deferred_.Resolve(env.Undefined());
      return;
    }
    auto err = Napi::Error::New(env, message_);
    err.Set("code", Napi::String::New(env, errno_ == ENOSPC ? "ENOSPC" : "EIO"));
    if (errno_) err.Set("errno", Napi::Number::New(env, errno_));
    deferred_.Reject(err.Value());
  }

 private:
  Napi::Promise::Deferred deferred_;
  std::shared_ptr<ShmSegment> seg_;
  std::shared_ptr<std::atomic<bool>> cancel_;
  std::string name_;
  std::vector<std::pair<size_t, size_t>> ranges_;
  unsigned populate_threads_;
  bool rollback_;
  std::string message_;
  int errno_ = 0;
};

// closeAsync's work: the last unmap of a segment on a libuv worker thread. Unmapping a mapping
// whose pages were touched tears down its page tables and, once the name is gone, frees the pages:
// ~70 ms per GiB on the 2-core development machine, which on the main thread held every other call
// of the kvstore back while a long session was released (from the worker the main thread still
// stalled 31-147 ms for 2 GiB, against 138-158 ms: the unmap contends for the memory map).
class UnmapWorker : public Napi::AsyncWorker {
 public:
  UnmapWorker(Napi::Env env, std::shared_ptr<ShmSegment> seg)
      : Napi::AsyncWorker(env, "freekv:unmap"), deferred_(Napi::Promise::Deferred::New(env)), seg_(std::move(seg)) {}
  Napi::Promise Promise() const { return deferred_.Promise(); }

 protected:
  void Execute() override {
    // The last holder unmaps, stepping aside for this process's foreground work (TeardownGate.h);
    // where checksums still run on the segment, the last of them unmaps it, unpaced.
    if (seg_.use_count() == 1) {
      teardown::Pacer pacer;
      seg_->Unmap(&pacer);
    }
    seg_.reset();
  }
  void OnOK() override { deferred_.Resolve(Env().Undefined()); }
  void OnError(const Napi::Error& e) override { deferred_.Reject(e.Value()); }

 private:
  Napi::Promise::Deferred deferred_;
  std::shared_ptr<ShmSegment> seg_;
};

}  // namespace

class AddonShmSegment : public Napi::ObjectWrap<AddonShmSegment> {
 public:
  static Napi::FunctionReference& Ctor(Napi::Env env) { return Classes(env).shm_segment; }
  static Napi::Function Define(Napi::Env env) {
    return DefineClass(env, "ShmSegment",
                       {StaticMethod("create", &AddonShmSegment::Create), StaticMethod("open", &AddonShmSegment::Open),
                        StaticMethod("unlink", &AddonShmSegment::Unlink),
                        InstanceAccessor("name", &AddonShmSegment::Name, nullptr),
                        InstanceAccessor("size", &AddonShmSegment::Size, nullptr),
                        InstanceMethod("buffer", &AddonShmSegment::Buffer), InstanceMethod("close", &AddonShmSegment::Close),
                        InstanceMethod("closeAsync", &AddonShmSegment::CloseAsync),
                        InstanceMethod("allocate", &AddonShmSegment::Allocate),
                        InstanceMethod("allocateAsync", &AddonShmSegment::AllocateAsync),
                        InstanceMethod("punch", &AddonShmSegment::Punch),
                        InstanceMethod("crc32cPages", &AddonShmSegment::Crc32cPages),
                        InstanceMethod("crc32cPagesAsync", &AddonShmSegment::Crc32cPagesAsync),
                        InstanceMethod("allocatedBytes", &AddonShmSegment::AllocatedBytes)});
  }
  explicit AddonShmSegment(const Napi::CallbackInfo& info) : Napi::ObjectWrap<AddonShmSegment>(info) {
    if (info.Length() != 1 || !info[0].IsExternal())
      throw Napi::TypeError::New(info.Env(), "use ShmSegment.create() or ShmSegment.open()");
    seg_.reset(info[0].As<Napi::External<ShmSegment>>().Data());
  }
  ShmSegment* segment() const { return seg_.get(); }

 private:
  static Napi::Value Wrap(Napi::Env env, ShmSegment* s) { return Ctor(env).New({Napi::External<ShmSegment>::New(env, s)}); }
  static std::string NameArg(const Napi::CallbackInfo& info) {
    if (info.Length() < 1 || !info[0].IsString()) throw Napi::TypeError::New(info.Env(), "name must be a string");
    std::string n = info[0].As<Napi::String>();
    if (n.size() < 2 || n[0] != '/' || n.find('/', 1) != std::string::npos || n.size() > 250)
      throw Napi::TypeError::New(info.Env(), "segment name must look like '/name' (no other slashes, <= 250 chars)");
    return n;
  }
  static Napi::Value Create(const Napi::CallbackInfo& info) {
    auto name = NameArg(info);
    if (info.Length() < 2 || !info[1].IsNumber()) throw Napi::TypeError::New(info.Env(), "size must be a number");
    double bytes = info[1].As<Napi::Number>().DoubleValue();
    if (!(bytes > 0) || bytes > 1e15) throw Napi::RangeError::New(info.Env(), "size must be > 0");
    try {
      return Wrap(info.Env(), ShmSegment::Create(name, static_cast<size_t>(bytes)));
    } catch (const std::exception& e) {
      throw Napi::Error::New(info.Env(), e.what());
    }
  }
  static Napi::Value Open(const Napi::CallbackInfo& info) {
    auto name = NameArg(info);
    try {
      return Wrap(info.Env(), ShmSegment::Open(name));
    } catch (const std::exception& e) {
      throw Napi::Error::New(info.Env(), e.what());
    }
  }
  static Napi::Value Unlink(const Napi::CallbackInfo& info) {
    auto name = NameArg(info);
    try {
      return Napi::Boolean::New(info.Env(), ShmSegment::Unlink(name));
    } catch (const std::exception& e) {
      throw Napi::Error::New(info.Env(), e.what());
    }
  }
  void Check(Napi::Env env) const {
    if (!seg_) throw Napi::Error::New(env, "segment is closed");
  }
  Napi::Value Name(const Napi::CallbackInfo& info) {
    Check(info.Env());
    return Napi::String::New(info.Env(), seg_->name());
  }
  Napi::Value Size(const Napi::CallbackInfo& info) {
    Check(info.Env());
    return Napi::Number::New(info.Env(), static_cast<double>(seg_->size()));
  }
  // buffer(offset?, length?): an ArrayBuffer over the mapping, or over [offset, offset + length)
  // of it (no copy): a range is how JS reaches segments larger than the 4 GiB one ArrayBuffer
  // can cover.
  Napi::Value Buffer(const Napi::CallbackInfo& info) {
    Check(info.Env());
    size_t off = 0, len = seg_->size();
    if (info.Length() > 0 && !info[0].IsUndefined()) {
      off = ByteArg(info, 0, "offset");
      len = ByteArg(info, 1, "length");
      if (off > seg_->size() || len > seg_->size() - off)
        throw Napi::RangeError::New(info.Env(), "[offset, offset + length) runs past the end of the segment");
    }
    // Node refuses larger external buffers, and on the way out runs the finalizer itself, which
    // would free the owner below twice (an abort, not an exception): refuse them here first.
    if (len > kMaxExternalBufferBytes)
      throw Napi::RangeError::New(info.Env(), "a buffer covers at most 4 GiB of the segment (asked for " + std::to_string(len) +
                                                  " bytes): pass an offset and a length");
    // The buffer holds this segment object (a strong reference, let go when the buffer is
    // collected): a segment collected without close() would unmap the bytes under a buffer still
    // in use. close() detaches the buffers, so it unmaps at once whatever they hold.
    auto* owner = new Napi::ObjectReference(Napi::Persistent(Value()));
    // (No delete of `owner` when New throws: where Node has already run the finalizer, that would
    // be a second delete; a failure this rare may keep one reference instead.)
    Napi::ArrayBuffer ab = Napi::ArrayBuffer::New(
        info.Env(), static_cast<uint8_t*>(seg_->data()) + off, len,
        [](Napi::Env, void*, Napi::ObjectReference* ref) { delete ref; }, owner);
    // Weak: a buffer nobody holds any more is collected (a strong reference kept every buffer
    // ever handed out until close: a session exported 20,000 times grew the process by 385 MiB).
    // The dead entries are dropped when the list has doubled since the last sweep.
    if (buffers_.size() >= sweep_at_) {
      std::vector<Napi::Reference<Napi::ArrayBuffer>> live;
      live.reserve(buffers_.size());
      for (auto& r : buffers_)
        if (!r.IsEmpty() && !r.Value().IsEmpty()) live.emplace_back(std::move(r));
      buffers_ = std::move(live);
      sweep_at_ = std::max<size_t>(64, 2 * buffers_.size());
    }
    buffers_.emplace_back(Napi::Weak(ab));
    return ab;
  }
  static size_t ByteArg(const Napi::CallbackInfo& info, size_t i, const char* what) {
    if (info.Length() <= i || !info[i].IsNumber()) throw Napi::TypeError::New(info.Env(), std::string(what) + " must be a number");
    const double d = info[i].As<Napi::Number>().DoubleValue();
    if (!(d >= 0) || d > 9007199254740991.0 || d != static_cast<double>(static_cast<uint64_t>(d)))
      throw Napi::RangeError::New(info.Env(), std::string(what) + " must be an integer >= 0");
    return static_cast<size_t>(d);
  }
  // allocate(offset, length): memory for those bytes now. An Error with `code` "ENOSPC" when the
  // file system is full.
  Napi::Value Allocate(const Napi::CallbackInfo& info) {
    Check(info.Env());
    const size_t off = ByteArg(info, 0, "offset"), len = ByteArg(info, 1, "length");
    try {
      seg_->Allocate(off, len);
    } catch (const std::system_error& e) {
      auto err = Napi::Error::New(info.Env(), e.what());
      err.Set("code", Napi::String::New(info.Env(), e.code().value() == ENOSPC ? "ENOSPC" : "EIO"));
      err.Set("errno", Napi::Number::New(info.Env(), e.code().value()));
      throw err;
    } catch (const std::out_of_range& e) {
      throw Napi::RangeError::New(info.Env(), e.what());
    } catch (const std::exception& e) {
      throw Napi::Error::New(info.Env(), e.what());
    }
    return info.Env().Undefined();
  }
  // allocateAsync([[offset, length], ...], populateThreads = 0, rollback = true): allocate() of
  // each range off the main thread, all or none (AllocateWorker; with rollback false a failure
  // keeps the ranges done); with populateThreads > 0, committed by write faults from that many
  // threads instead (offsets a multiple of 4096). Checked here, synchronously.
  Napi::Value AllocateAsync(const Napi::CallbackInfo& info) {
    Check(info.Env());
    if (info.Length() < 1 || !info[0].IsArray()) throw Napi::TypeError::New(info.Env(), "ranges must be an array of [offset, length] pairs");
    auto a = info[0].As<Napi::Array>();
    if (a.Length() > 65536) throw Napi::RangeError::New(info.Env(), "at most 65536 ranges");
    // The numbers are read first (a getter or a proxy runs JavaScript, which may close this
    // segment), then checked against the segment as it is after them.
    std::vector<std::pair<size_t, size_t>> ranges;
    for (uint32_t i = 0; i < a.Length(); ++i) {
      Napi::Value r = a.Get(i);
      if (!r.IsArray() || r.As<Napi::Array>().Length() != 2)
        throw Napi::TypeError::New(info.Env(), "ranges must be an array of [offset, length] pairs");
      Napi::Value o = r.As<Napi::Array>().Get(0u), n = r.As<Napi::Array>().Get(1u);
      const double od = o.IsNumber() ? o.As<Napi::Number>().DoubleValue() : -1, nd = n.IsNumber() ? n.As<Napi::Number>().DoubleValue() : -1;
      if (!(od >= 0) || !(nd >= 0) || od > 9007199254740991.0 || nd > 9007199254740991.0 ||
          od != static_cast<double>(static_cast<uint64_t>(od)) || nd != static_cast<double>(static_cast<uint64_t>(nd)))
        throw Napi::RangeError::New(info.Env(), "offsets and lengths must be integers >= 0");
      ranges.emplace_back(static_cast<size_t>(od), static_cast<size_t>(nd));
    }
    unsigned threads = 0;
    if (info.Length() > 1 && !info[1].IsUndefined()) {
      const size_t t = ByteArg(info, 1, "populateThreads");
      if (t > 64) throw Napi::RangeError::New(info.Env(), "populateThreads must be <= 64");
      threads = static_cast<unsigned>(t);
      for (const auto& r : ranges)
        if (r.first % 4096 != 0) throw Napi::RangeError::New(info.Env(), "with populateThreads, offsets must be multiples of 4096");
    }
    bool rollback = true;
    if (info.Length() > 2 && !info[2].IsUndefined()) {
      if (!info[2].IsBoolean()) throw Napi::TypeError::New(info.Env(), "rollback must be a boolean");
      rollback = info[2].As<Napi::Boolean>().Value();
    }
    Check(info.Env());
    const std::shared_ptr<ShmSegment> seg = seg_;
    for (const auto& r : ranges)
      if (r.first > seg->size() || r.second > seg->size() - r.first)
        throw Napi::RangeError::New(info.Env(), "[offset, offset + length) runs past the end of the segment");
    auto* w = new AllocateWorker(info.Env(), seg, cancel_, std::move(ranges), threads, rollback);
    auto promise = w->Promise();
    w->Queue();
    return promise;
  }
  struct PageRange {
    size_t offset, pageBytes, count;
  };
  // The arguments of crc32cPages / crc32cPagesAsync, checked: TypeError / RangeError otherwise.
  PageRange PageArgs(const Napi::CallbackInfo& info) const {
    Check(info.Env());
    const size_t off = ByteArg(info, 0, "offset"), page = ByteArg(info, 1, "pageBytes"), count = ByteArg(info, 2, "count");
    if (count > (size_t{1} << 30)) throw Napi::RangeError::New(info.Env(), "count must be <= 2^30");
    if (count > 0 && (page == 0 || off > seg_->size() || (seg_->size() - off) / page < count))
      throw Napi::RangeError::New(info.Env(), "pages [offset, offset + pageBytes * count) run past the end of the segment");
    return {off, page, count};
  }
  // crc32cPages(offset, pageBytes, count): the CRC32C of each of `count` pages of the mapping from
  // `offset` (shm/Crc32c.h), read through the mapping itself: no ArrayBuffer, so it works for
  // segments larger than the 4 GiB a JS buffer can cover. Many pages are split over several
  // threads (Crc32cPages); the main thread waits for them.
  Napi::Value Crc32cPages(const Napi::CallbackInfo& info) {
    const auto r = PageArgs(info);
    auto out = Napi::Uint32Array::New(info.Env(), r.count);
    if (r.count > 0) freekv::Crc32cPages(static_cast<const uint8_t*>(seg_->data()) + r.offset, r.pageBytes, r.count, out.Data());
    return out;
  }
  // crc32cPagesAsync(offset, pageBytes, count): the same checksums as a Promise<Uint32Array>,
  // computed off the main thread. The arguments are checked here, synchronously, with the same
  // errors as crc32cPages. close() meanwhile rejects the promise.
  Napi::Value Crc32cPagesAsync(const Napi::CallbackInfo& info) {
    const auto r = PageArgs(info);
    auto* w = new Crc32cPagesWorker(info.Env(), seg_, cancel_, r.offset, r.pageBytes, r.count);
    auto promise = w->Promise();
    w->Queue();
    return promise;
  }
  // punch(offset, length): frees the memory of those bytes.
  Napi::Value Punch(const Napi::CallbackInfo& info) {
    Check(info.Env());
    const size_t off = ByteArg(info, 0, "offset"), len = ByteArg(info, 1, "length");
    try {
      seg_->Punch(off, len);
    } catch (const std::out_of_range& e) {
      throw Napi::RangeError::New(info.Env(), e.what());
    } catch (const std::exception& e) {
      throw Napi::Error::New(info.Env(), e.what());
    }
    return info.Env().Undefined();
  }
  // allocatedBytes(): memory the segment really holds (st_blocks * 512).
  Napi::Value AllocatedBytes(const Napi::CallbackInfo& info) {
    Check(info.Env());
    try {
      return Napi::Number::New(info.Env(), static_cast<double>(seg_->AllocatedBytes()));
    } catch (const std::exception& e) {
      throw Napi::Error::New(info.Env(), e.what());
    }
  }
  Napi::Value Close(const Napi::CallbackInfo& info) {
    Detach(info.Env());
    seg_.reset();
    return info.Env().Undefined();
  }
  // closeAsync(): close(), with the unmap itself on a worker thread (UnmapWorker); the promise
  // resolves once the mapping is gone (or, with checksums still running on it, let go).
  Napi::Value CloseAsync(const Napi::CallbackInfo& info) {
    Detach(info.Env());
    auto* w = new UnmapWorker(info.Env(), std::move(seg_));
    seg_.reset();
    auto promise = w->Promise();
    w->Queue();
    return promise;
  }
  // What close() does before the unmap: refuses while an engine session maps the bytes, detaches
  // the buffers handed out, stops running checksums.
  void Detach(Napi::Env env) {
    // An engine session maps these bytes; unmapping them under it would crash the process.
    if (pins_ > 0)
      throw Napi::Error::New(env, "segment '" + (seg_ ? seg_->name() : std::string("?")) + "' is in use by " +
                                             std::to_string(pins_) + " engine session(s): close the session first");
    for (auto& r : buffers_) {
      if (!r.IsEmpty()) {
        auto ab = r.Value();  // empty once collected
        if (!ab.IsEmpty() && !ab.IsDetached()) ab.Detach();
      }
    }
    buffers_.clear();
    // Checksums still running on this mapping stop; it is unmapped when the last of them let go.
    cancel_->store(true);
  }
  friend void PinShm(Napi::Value v, int delta);
  int pins_ = 0;
  // Shared with the crc32cPagesAsync workers running on it (they keep it mapped until they end).
  std::shared_ptr<ShmSegment> seg_;
  // Set by close(): tells those workers to stop.
  std::shared_ptr<std::atomic<bool>> cancel_ = std::make_shared<std::atomic<bool>>(false);
  // The buffers handed out (weak references), detached at close.
  std::vector<Napi::Reference<Napi::ArrayBuffer>> buffers_;
  size_t sweep_at_ = 64;
};


// Lets other modules (engine) get the mapping behind a JS ShmSegment.
ShmSegment* UnwrapShm(Napi::Value v) {
  if (!v.IsObject()) throw Napi::TypeError::New(v.Env(), "expected a ShmSegment");
  auto obj = v.As<Napi::Object>();
  if (AddonShmSegment::Ctor(v.Env()).IsEmpty() || !obj.InstanceOf(AddonShmSegment::Ctor(v.Env()).Value()))
    throw Napi::TypeError::New(v.Env(), "expected a ShmSegment");
  auto* s = AddonShmSegment::Unwrap(obj)->segment();
  if (!s) throw Napi::Error::New(v.Env(), "segment is closed");
  return s;
}

// Counts the engine sessions that map a segment, so close() can refuse while one does.
void PinShm(Napi::Value v, int delta) {
  if (!v.IsObject()) return;
  auto obj = v.As<Napi::Object>();
  if (AddonShmSegment::Ctor(v.Env()).IsEmpty() || !obj.InstanceOf(AddonShmSegment::Ctor(v.Env()).Value())) return;
  auto* s = AddonShmSegment::Unwrap(obj);
  s->pins_ = std::max(0, s->pins_ + delta);
}

void InitShm(Napi::Env env, Napi::Object exports) {
#if defined(__GLIBC__)
  // Sessions allocate and free buffers of hundreds of KiB to MiBs. glibc raises its mmap
  // threshold each time such a block is freed, after which blocks of that size come from the heap
  // and their memory is kept when freed: a fuzz of 5,000 calls left compute at 645 MiB of
  // anonymous memory for 148 MiB with the threshold fixed (test/fault/fuzz.test.ts). A fixed
  // threshold (which turns the adjustment off) returns them to the system at free.
  // FREEKV_MALLOC_MMAP_THRESHOLD sets it in bytes (default 262144); 0 leaves glibc's own policy.
  {
    static bool set = false;
    if (!set) {
      set = true;
      long bytes = 256 * 1024;
      if (const char* e = std::getenv("FREEKV_MALLOC_MMAP_THRESHOLD")) bytes = std::strtol(e, nullptr, 10);
      if (bytes > 0) mallopt(M_MMAP_THRESHOLD, static_cast<int>(std::min<long>(bytes, 32L << 20)));
    }
  }
#endif
  auto fn = AddonShmSegment::Define(env);
  AddonShmSegment::Ctor(env) = Napi::Persistent(fn);
  exports.Set("ShmSegment", fn);
  InitCrc32c(env, exports);
  // teardownStats(): what closed sessions' teardowns waited for this process's foreground work
  // (TeardownGate.h), since it started.
  exports.Set("teardownStats", Napi::Function::New(env, [](const Napi::CallbackInfo& info) {
    auto o = Napi::Object::New(info.Env());
    o.Set("waitedMs", Napi::Number::New(info.Env(), static_cast<double>(teardown::TotalWaitedUs()) / 1000.0));
    o.Set("piecesWaited", Napi::Number::New(info.Env(), static_cast<double>(teardown::PiecesWaited())));
    o.Set("foreground", Napi::Number::New(info.Env(), teardown::ForegroundCount()));
    return o;
  }, "teardownStats"));
}

}  // namespace freekv::addon
