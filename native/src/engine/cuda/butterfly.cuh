// Warp-level transposing butterfly reduction shared by the decode attention and the page
// scoring kernels.
#pragma once

namespace freekv::cuda {

// Transposing butterfly over the lanes of a token group: on entry each lane holds C partial sums
// v[0..C-1]; every step over lane offset OFF either halves the values (a lane keeps the half
// selected by its OFF bit and adds its partner's copy of that half) or, once one value is left,
// adds the partner's. On return the lane holds the full sums of values base .. base + C/TPT - 1
// (or of value `base` when C <= TPT).
template <int C, int OFF>
__device__ __forceinline__ void Butterfly(float* v, int sub, int& base) {
  if constexpr (OFF > 0) {
    if constexpr (C > 1) {
      constexpr int H = C / 2;
      const bool upper = (sub & OFF) != 0;
#pragma unroll
      for (int i = 0; i < H; ++i) {
        const float send = upper ? v[i] : v[H + i];
        const float keep = upper ? v[H + i] : v[i];
        v[i] = keep + __shfl_xor_sync(0xffffffffu, send, OFF);
      }
      if (upper) base += H;
      Butterfly<H, OFF / 2>(v, sub, base);
    } else {
      v[0] += __shfl_xor_sync(0xffffffffu, v[0], OFF);
      Butterfly<1, OFF / 2>(v, sub, base);
    }
  }
}

}  // namespace freekv::cuda
