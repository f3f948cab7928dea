// The Hopper (sm_90a) path of LaunchFlashPrefillAttention: warpgroup MMA (wgmma) with a producer
// warpgroup and two consumer warpgroups. Internal to attention_prefill_flash.cu, which checks the
// parameters and dispatches; see attention_prefill_flash_sm90.cu for the design.
#pragma once
#include "attention_prefill_flash.cuh"

namespace freekv::cuda {

// True when the current device runs the sm_90a kernel (compute capability 9.0 exactly: the
// library carries sm_90a machine code; other devices would JIT the plain compute_90 PTX, in which
// the kernel is empty).
bool FlashPrefillWgmmaAvailable();

// Head dim 128 only; p already checked (and p.scale resolved) by the caller.
void LaunchFlashPrefillWgmma(const FlashPrefillParams& p, int m_tiles, cudaStream_t stream);
// CTAs of that kernel resident on one SM at once (its shared memory allows one).
int FlashPrefillWgmmaCtasPerSm();

// (query, head) rows per CTA and tokens per K/V tile of the sm_90a kernel.
constexpr int kFlashWgmmaBlockM = 128;
constexpr int kFlashWgmmaBlockN = 128;

}  // namespace freekv::cuda
