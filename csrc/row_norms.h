// Row normalisation inside the CPU ops (docs/semantics.md §1.4), shared by every loss that
// normalises its rows: the scale-safe norm, the normalisation of a block of rows in one pass, the
// Jacobian epilogue that takes a gradient w.r.t. z = x/|x| back to x, and the non-finite check
// (docs/semantics.md §6) that comes for free from the norms.
//
// Scale safety: the squared norm is summed directly when that neither overflows nor underflows
// (the usual case: one vectorised pass); otherwise the row is scaled by its largest |x| first,
// so every finite row gets its norm to a few ulps, from 1e-38 to 1e38 in float32. A row whose
// largest |x| is Inf or NaN is non-finite. A zero row stays zero, with a zero gradient.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <atomic>
#include <cmath>
#include <limits>
#include <vector>

#include "cpu_capability.h"
#include "rll_cpu_vec.h"

namespace rll {
RLL_CPU_CAPABILITY_BEGIN

// Norm of one row: |x| and |x|^2 as summed directly (may be Inf or 0 for extreme rows), and
// whether every entry is finite.
template <class S>
struct RowNorm {
  S norm;
  S sq;
  bool finite;
};

// Below this, the squared norm may hold rounded subnormal squares: the row is rescaled instead.
template <class S>
inline S safe_sq_min() {
  return std::numeric_limits<S>::min() / std::numeric_limits<S>::epsilon();
}

// Scale-safe norm of a contiguous row x[0, D).
template <class S>
inline RowNorm<S> row_norm(const S* x, int64_t D) {
  using V = Vectorized<S>;
  const S sq = at::vec::map_reduce_all<S>([](V v) { return v * v; }, [](V a, V b) { return a + b; }, x, D);
  if (std::isfinite(sq) && sq >= safe_sq_min<S>()) return {std::sqrt(sq), sq, true};
  // rare: overflow, underflow, a zero row or a non-finite entry (maximum propagates NaN)
  const S m = at::vec::map_reduce_all<S>([](V v) { return v.abs(); },
                                         [](V a, V b) { return at::vec::maximum(a, b); }, x, D);
  if (!(m <= std::numeric_limits<S>::max())) return {std::numeric_limits<S>::quiet_NaN(), sq, false};
  if (m == S(0)) return {S(0), S(0), true};
  const V vm(m);  // a division, not 1/m: 1/m overflows for a subnormal m
  const S s = at::vec::map_reduce_all<S>([&](V v) { return (v / vm) * (v / vm); }, [](V a, V b) { return a + b; },
                                         x, D);
  return {m * std::sqrt(s), sq, true};
}

// z = x / |x| (0 for a zero row) of one contiguous row; returns the row's norm. |z|^2 into z_sq.
template <class S>
inline RowNorm<S> normalize_row(const S* x, S* z, int64_t D, S& z_sq) {
  using V = Vectorized<S>;
  const RowNorm<S> rn = row_norm(x, D);
  if (!rn.finite || rn.norm == S(0)) {
    const S fill = rn.finite ? S(0) : std::numeric_limits<S>::quiet_NaN();
    std::fill(z, z + D, fill);
    z_sq = fill;
    return rn;
  }
  // a division, as F.normalize: x * (1/|x|) rounds twice (4x the error of the loss gradient in fp32)
  const V n(rn.norm);
  at::vec::map([&](V v) { return v / n; }, z, x, D);
  z_sq = at::vec::map_reduce_all<S>([](V v) { return v * v; }, [](V a, V b) { return a + b; }, z, D);
  return rn;
}

// Rows per parallel chunk: about 16K values, so small batches still use every thread.
inline int64_t rows_grain(int64_t D) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(D, 1)); }

// row(r, scratch) for the R rows in parallel (scratch: a per-thread buffer of scratch_size values),
// row returning whether row r is finite; returns the first non-finite row, or -1.
template <class S, class F>
inline int64_t first_nonfinite_row(int64_t R, int64_t D, int64_t scratch_size, F&& row) {
  std::atomic<int64_t> first_bad{R};
  at::parallel_for(0, R, rows_grain(D), [&](int64_t r0, int64_t r1) {
    std::vector<S> scratch(scratch_size);
    for (int64_t r = r0; r < r1; ++r) {
      if (row(r, scratch.data())) continue;
      int64_t cur = first_bad.load();
      while (r < cur && !first_bad.compare_exchange_weak(cur, r)) {
      }
    }
  });
  const int64_t bad = first_bad.load();
  return bad < R ? bad : -1;
}

// The rows of x (R x D, any strides) normalised into z (R x D, contiguous) in one parallel pass:
// norms[r] = |x_r|, z_sq[r] = |z_r|^2. Returns the first non-finite row, or -1.
template <class S>
inline int64_t normalize_rows(const at::Tensor& x, S* z, S* norms, S* z_sq) {
  const int64_t R = x.size(0), D = x.size(1), ld = x.stride(0), step = x.stride(1);
  const S* X = x.const_data_ptr<S>();
  return first_nonfinite_row<S>(R, D, step == 1 ? 0 : D, [&](int64_t r, S* row) {
    const S* xr = X + r * ld;
    if (step != 1) {  // a strided row is gathered first
      for (int64_t e = 0; e < D; ++e) row[e] = xr[e * step];
      xr = row;
    }
    const RowNorm<S> rn = normalize_row(xr, z + r * D, D, z_sq[r]);
    norms[r] = rn.norm;
    return rn.finite;
  });
}

// Squared norms of the rows of a contiguous x (R x D) for raw (not normalised) rows, with the same
// non-finite detection. Returns the first non-finite row, or -1.
template <class S>
inline int64_t sq_norms_checked(const at::Tensor& x, S* sq) {
  const int64_t R = x.size(0), D = x.size(1);
  const S* X = x.const_data_ptr<S>();
  return first_nonfinite_row<S>(R, D, 0, [&](int64_t r, S*) {
    const RowNorm<S> rn = row_norm(X + r * D, D);
    sq[r] = rn.sq;
    return rn.finite;
  });
}

// The error of a non-finite row (docs/semantics.md §6): a ValueError that names the tensor.
inline void check_finite_rows(int64_t bad_row, const char* name) {
  TORCH_CHECK_VALUE(bad_row < 0, name, " contains NaN or Inf (row ", bad_row, ")");
}

// The gradient through z = x/|x| of one row, in place: g <- (g - z (z . g)) / |x|; a zero row
// gets 0 (docs/semantics.md §1.4).
template <class S>
inline void normalize_backward_row(S* g, const S* z, S norm, int64_t D) {
  using V = Vectorized<S>;
  if (!(norm > S(0))) {
    std::fill(g, g + D, norm == S(0) ? S(0) : std::numeric_limits<S>::quiet_NaN());
    return;
  }
  const S zg = at::vec::map2_reduce_all<S>([](V a, V b) { return a * b; }, [](V a, V b) { return a + b; }, z, g, D);
  const V vzg(zg), n(norm);
  at::vec::map2([&](V gv, V zv) { return (gv - zv * vzg) / n; }, g, g, z, D);
}

// The same for every row of a contiguous (R x D) gradient, in parallel.
template <class S>
inline void normalize_backward_rows(S* g, const S* z, const S* norms, int64_t R, int64_t D) {
  at::parallel_for(0, R, rows_grain(D), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) normalize_backward_row(g + r * D, z + r * D, norms[r], D);
  });
}

RLL_CPU_CAPABILITY_END
}  // namespace rll
