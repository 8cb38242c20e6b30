// CPU SIMD instantiation of rll_pair.h: the vector overloads of the primitives the per-pair math is
// written against (ATen's Vectorized, Sleef exp), then the header itself, plus small horizontal
// reductions. Include this instead of rll_pair.h in CPU translation units.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include "cpu_capability.h"

namespace rll {
RLL_CPU_CAPABILITY_BEGIN
using at::vec::Vectorized;
template <class S>
inline Vectorized<S> rll_select(const Vectorized<S>& m, const Vectorized<S>& a, const Vectorized<S>& b) {
  return Vectorized<S>::blendv(b, a, m);
}
template <class S>
inline Vectorized<S> rll_max(const Vectorized<S>& a, const Vectorized<S>& b) { return at::vec::maximum(a, b); }
template <class S>
inline Vectorized<S> rll_sqrt(const Vectorized<S>& x) { return x.sqrt(); }
template <class S>
inline Vectorized<S> rll_exp(const Vectorized<S>& x) { return x.exp(); }
RLL_CPU_CAPABILITY_END
}  // namespace rll

#include "rll_pair.h"

namespace rll {
RLL_CPU_CAPABILITY_BEGIN
template <class S>
inline S hsum(const Vectorized<S>& v) {
  return at::vec::vec_reduce_all<S>([](Vectorized<S>& a, Vectorized<S>& b) { return a + b; }, v);
}
template <class S>
inline S hmax(const Vectorized<S>& v) {
  return at::vec::vec_reduce_all<S>([](Vectorized<S>& a, Vectorized<S>& b) { return at::vec::maximum(a, b); },
                                    v);
}
// True when no lane of a comparison mask is set (all lanes zero bits).
template <class S>
inline bool none_set(const Vectorized<S>& mask) {
  return mask.zero_mask() == (1 << Vectorized<S>::size()) - 1;
}
RLL_CPU_CAPABILITY_END
}  // namespace rll
