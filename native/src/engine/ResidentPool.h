// The eviction rule of a KV group's pool of selected-page slots, one definition for both engines
// (cpu/Residency.cpp and the CUDA residency kernel, cuda/residency.cu).
//
// A new selection keeps the slots that hold one of its pages (hits); each miss takes a slot that
// does not. Which one: with as many slots as the selection (FREEKV_RESIDENT_FACTOR 1, the paper's method),
// the lowest slot not kept; every page not chosen leaves, so the order only decides where the new
// pages land. With extra slots: an empty slot first (the lowest), then the page chosen longest ago
// (its age: selections of the group since it was last chosen), then the lowest page. Which pages
// stay depends on pages and ages only, not on the slots the pages landed in, so both engines keep
// the same pages whatever order their selections list the misses in.
#pragma once

#if defined(__CUDACC__)
#define FREEKV_HOST_DEVICE __host__ __device__
#else
#define FREEKV_HOST_DEVICE
#endif

namespace freekv {

// The largest age a slot reaches (ResidentAgeAfter stops counting there).
constexpr int kResidentAgeMax = 1 << 30;

// A slot's place in the order misses take slots, as one unsigned key (smaller first): with extra
// slots an empty slot first (the lowest), then the page chosen longest ago, then the lowest page;
// without, the lowest slot. Keys of different slots differ (pages in a pool are distinct), so the
// CUDA residency kernel ranks slots by counting smaller keys.
FREEKV_HOST_DEVICE inline unsigned long long ResidentVictimKey(int page, int age, int slot, bool extra_slots) {
  if (!extra_slots || page < 0) return (unsigned long long)(unsigned)slot;
  const int a = age < 0 ? 0 : (age > kResidentAgeMax ? kResidentAgeMax : age);
  return (1ull << 63) | ((unsigned long long)(unsigned)(kResidentAgeMax - a) << 32) | (unsigned)page;
}

// Whether slot a (page_a, -1 = empty; age_a) is taken by a miss before slot b; neither is kept.
FREEKV_HOST_DEVICE inline bool ResidentVictimBefore(int page_a, int age_a, int slot_a, int page_b, int age_b, int slot_b,
                                                    bool extra_slots) {
  return ResidentVictimKey(page_a, age_a, slot_a, extra_slots) < ResidentVictimKey(page_b, age_b, slot_b, extra_slots);
}

// A slot's age after a selection: 0 when the selection chose its page (a hit or a miss placed
// there), one more when it holds a page not chosen, unchanged when empty.
FREEKV_HOST_DEVICE inline int ResidentAgeAfter(int page, int age, bool chosen) {
  if (chosen) return 0;
  if (page < 0) return age;
  return age < kResidentAgeMax ? age + 1 : age;
}

}  // namespace freekv
