// Shared CPU tile helpers of the fused kernels (rll_cpu.cpp, osm_cpu.cpp, softtriple_cpu.cpp).
//
// Naming, in every C++ kernel (CPU and CUDA): a pair tile (I, J) holds query rows i = i0 + r
// (r < bq <= BQ) against gallery rows j = j0 + c (c < bk <= BK); q, k: query and gallery
// embeddings (z when both are the batch itself); nq, nk: their squared norms; d2, d: squared
// distance and distance; pos, neg: set masks; vp, vn: hinge values; sp, sn: logits; OnlineRow
// (m, l, a): running max, sum of exp, weighted sum; G: dL/dd / d per pair; gq, gk: gradients.
//
// What the kernels share: the tile size rule, sizes padded to whole SIMD vectors, labels as values
// of the kernel type, the excluded pairs (docs/semantics.md §1.5), per-tile gallery loads, label
// masks, row squared norms, the Gram tile of a query and a gallery tile, the per-row pair distances
// (docs/semantics.md §1.3 for duplicates), the per-call set-up of a pair problem and per-thread
// partial sums.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/impl/alloc_cpu.h>

#include <algorithm>
#include <initializer_list>
#include <limits>
#include <mutex>
#include <utility>
#include <vector>

#include "rll_cpu_vec.h"

namespace rll {
RLL_CPU_CAPABILITY_BEGIN

inline int64_t ceil_div(int64_t n, int64_t b) { return (n + b - 1) / b; }

// n rounded up to whole SIMD vectors of S.
template <class S>
inline int64_t vec_pad(int64_t n) {
  const int64_t W = Vectorized<S>::size();
  return ceil_div(n, W) * W;
}

// A tile size for n items: `start`, halved (rounding up) down to `smallest` until every thread
// gets at least `tiles_per_thread` tiles (small batches keep every thread busy).
inline int64_t tile_size_for_threads(int64_t start, int64_t smallest, int64_t n, int64_t tiles_per_thread) {
  const int64_t threads = at::get_num_threads();
  int64_t b = start;
  while (b > smallest && ceil_div(n, b) < tiles_per_thread * threads) b = (b + 1) / 2;
  return b;
}

// dst[0, n) = src[0, n) converted to S, dst[n, n_pad) = fill.
template <class S, class T>
inline void copy_padded(const T* src, int64_t n, S* dst, int64_t n_pad, S fill) {
  std::copy(src, src + n, dst);
  std::fill(dst + n, dst + n_pad, fill);
}

// ---------------------------------------------------------------- kept scratch
// Zeroed scratch tensors whose memory is kept between calls. A fresh allocation of a few MiB per
// call costs its page faults, which the threads of a process take one at a time: the zeroed
// per-thread gradient parts of the 512 x 512 "pml" backward (2 MiB) took 0.2 ms of its 2.9 ms
// that way (bench/RESULTS.md §15). A scratch tensor's buffer goes back to one process-wide pool
// when the tensor is freed; the pool keeps at most kKeptScratchBytes and frees the rest, and a
// request above kKeptScratchBytes gets a plain at::zeros.
constexpr size_t kKeptScratchBytes = size_t(32) << 20;

class ScratchPool {
 public:
  // A buffer of at least `bytes` (the smallest kept one that fits, else a new one) and its size.
  std::pair<void*, size_t> take(size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto best = kept_.end();
      for (auto it = kept_.begin(); it != kept_.end(); ++it)
        if (it->second >= bytes && (best == kept_.end() || it->second < best->second)) best = it;
      if (best != kept_.end()) {
        const auto found = *best;
        kept_.erase(best);
        kept_bytes_ -= found.second;
        return found;
      }
    }
    return {c10::alloc_cpu(bytes), bytes};
  }
  void give(void* p, size_t bytes) {
    std::lock_guard<std::mutex> lock(mu_);
    if (kept_bytes_ + bytes > kKeptScratchBytes) {
      c10::free_cpu(p);
      return;
    }
    kept_.emplace_back(p, bytes);
    kept_bytes_ += bytes;
  }
  static ScratchPool& get() {
    static ScratchPool* pool = new ScratchPool();  // never destroyed: a buffer may come back at exit
    return *pool;
  }

 private:
  std::mutex mu_;
  std::vector<std::pair<void*, size_t>> kept_;
  size_t kept_bytes_ = 0;
};

// A tensor of `sizes` on kept scratch memory (contiguous, CPU), uninitialised.
inline at::Tensor kept_empty(at::IntArrayRef sizes, const at::TensorOptions& opts) {
  const size_t bytes = static_cast<size_t>(c10::multiply_integers(sizes)) * opts.dtype().itemsize();
  if (bytes == 0 || bytes > kKeptScratchBytes) return at::empty(sizes, opts);
  const auto [ptr, cap] = ScratchPool::get().take(bytes);
  return at::from_blob(ptr, sizes, [cap = cap](void* p) { ScratchPool::get().give(p, cap); }, opts);
}

// A zeroed tensor of `sizes` on kept scratch memory (contiguous, CPU).
inline at::Tensor kept_zeros(at::IntArrayRef sizes, const at::TensorOptions& opts) {
  return kept_empty(sizes, opts).zero_();
}

// One tensor per thread, zero-initialised: (threads, *sizes), on kept scratch memory.
inline at::Tensor zeros_per_thread(at::IntArrayRef sizes, const at::TensorOptions& opts) {
  std::vector<int64_t> s{static_cast<int64_t>(at::get_num_threads())};
  s.insert(s.end(), sizes.begin(), sizes.end());
  return kept_zeros(s, opts);
}

// The tile pairs (I, J) with I <= J of nb tiles: the pair matrix of a batch with itself is
// symmetric, so each unordered pair of tiles is visited once.
inline std::vector<std::pair<int64_t, int64_t>> upper_tile_pairs(int64_t nb) {
  std::vector<std::pair<int64_t, int64_t>> pairs;
  pairs.reserve(nb * (nb + 1) / 2);
  for (int64_t I = 0; I < nb; ++I)
    for (int64_t J = I; J < nb; ++J) pairs.emplace_back(I, J);
  return pairs;
}

// The Gram tiles of one in-batch call's tile pairs, kept from its first pass over them to its second
// (the "pml" statistics, then the gradient, bench/RESULTS.md §20): pair p's tile (bq x bk, row stride
// bk, as pair_gram_tile writes it) at offset[p], for the pairs in order while they fit in
// kGramCacheBytes; the pairs after them (offset -1) are recomputed. Per-call scratch of bounded size:
// every tile up to N ~ 1400 rows in fp32 (8 MiB), a shrinking share beyond (0.4% at N = 32768).
constexpr size_t kGramCacheBytes = size_t(8) << 20;
template <class S>
class GramTileCache {
 public:
  GramTileCache(const std::vector<std::pair<int64_t, int64_t>>& pairs, int64_t B, int64_t N,
                const at::TensorOptions& opts) {
    const int64_t cap = static_cast<int64_t>(kGramCacheBytes / sizeof(S));
    int64_t used = 0;
    bool full = false;
    for (const auto& [I, J] : pairs) {
      const int64_t n = std::min(B, N - I * B) * std::min(B, N - J * B);
      full = full || used + n > cap;
      offset_.push_back(full ? -1 : used);
      if (!full) used += n;
    }
    buf_ = kept_empty({std::max<int64_t>(used, 1)}, opts);
  }
  // Pair p's tile, or null when it is not kept.
  S* tile(int64_t p) const { return offset_[p] < 0 ? nullptr : buf_.data_ptr<S>() + offset_[p]; }

 private:
  std::vector<int64_t> offset_;
  at::Tensor buf_;
};

// ---------------------------------------------------------------- labels and excluded pairs
// Labels as values of the kernel's type S, so a label comparison is one SIMD compare; the parts
// (query labels, gallery labels: int64) are concatenated. Exact: labels are cast when they fit the
// mantissa, else replaced by their dense rank (equality is all the kernels compare). A host loop,
// no ATen op: at N = 64 the five ops it replaced cost as much as the kernel's pair work.
template <class S>
std::vector<S> labels_as(std::initializer_list<const at::Tensor*> parts) {
  const int64_t lim = int64_t(1) << std::numeric_limits<S>::digits;
  std::vector<int64_t> all;
  for (const at::Tensor* part : parts) {
    const at::Tensor t = part->contiguous();
    const int64_t* p = t.const_data_ptr<int64_t>();
    all.insert(all.end(), p, p + t.numel());
  }
  std::vector<S> out(all.size());
  const bool fits = std::all_of(all.begin(), all.end(), [&](int64_t v) { return v > -lim && v < lim; });
  if (fits) {
    std::transform(all.begin(), all.end(), out.begin(), [](int64_t v) { return static_cast<S>(v); });
    return out;
  }
  std::vector<int64_t> sorted(all);
  std::sort(sorted.begin(), sorted.end());
  sorted.erase(std::unique(sorted.begin(), sorted.end()), sorted.end());
  std::transform(all.begin(), all.end(), out.begin(), [&](int64_t v) {
    return static_cast<S>(std::lower_bound(sorted.begin(), sorted.end(), v) - sorted.begin());
  });
  return out;
}

// Excluded pairs (q_ids[i] == k_ids[j], docs/semantics.md §1.5) as per-row sorted gallery lists (CSR).
struct Exclusions {
  std::vector<int64_t> offsets, cols;
  bool empty() const { return cols.empty(); }
};
inline Exclusions build_exclusions(const int64_t* q_ids, const int64_t* k_ids, int64_t N, int64_t M) {
  Exclusions ex;
  if (q_ids == nullptr) return ex;
  std::vector<std::pair<int64_t, int64_t>> id_j(M);
  for (int64_t j = 0; j < M; ++j) id_j[j] = {k_ids[j], j};
  std::sort(id_j.begin(), id_j.end());
  ex.offsets.resize(N + 1, 0);
  for (int64_t i = 0; i < N; ++i) {
    const auto first = std::make_pair(q_ids[i], std::numeric_limits<int64_t>::min());
    for (auto it = std::lower_bound(id_j.begin(), id_j.end(), first); it != id_j.end() && it->first == q_ids[i]; ++it)
      ex.cols.push_back(it->second);
    ex.offsets[i + 1] = static_cast<int64_t>(ex.cols.size());
  }
  return ex;
}

// Calls f(c) for every excluded column c of row i inside the gallery tile [j0, j0 + bk).
template <class F>
inline void for_excluded(const Exclusions& ex, int64_t i, int64_t j0, int64_t bk, F&& f) {
  if (ex.empty()) return;
  const int64_t* b = ex.cols.data() + ex.offsets[i];
  const int64_t* e = ex.cols.data() + ex.offsets[i + 1];
  for (const int64_t* it = std::lower_bound(b, e, j0); it != e && *it < j0 + bk; ++it) f(*it - j0);
}

// ---------------------------------------------------------------- per-tile data
// Per-tile gallery data, padded to whole vectors (bk_pad): squared norms and labels (NaN labels in
// the padding match nothing, so the tail lanes are in no set).
template <class S>
inline void load_tile(const S* NK, const S* KL, int64_t j0, int64_t bk, int64_t bk_pad, S* nk, S* kl) {
  copy_padded(NK + j0, bk, nk, bk_pad, S(0));
  copy_padded(KL + j0, bk, kl, bk_pad, std::numeric_limits<S>::quiet_NaN());
}

// Same-label and other-label masks of one vector of gallery labels against the query's label.
template <class S>
inline void label_masks(const Vectorized<S>& kl, const Vectorized<S>& li, Vectorized<S>& same, Vectorized<S>& diff) {
  same = kl == li;
  diff = (kl < li) | (kl > li);  // both false for the NaN padding
}

// Squared row norms without an N x D temporary (the gallery can be a 10^5-row bank).
template <class S>
at::Tensor row_sq_norms(const at::Tensor& x) {
  const int64_t R = x.size(0), D = x.size(1);
  at::Tensor out = at::empty({R}, x.options());
  const S* X = x.data_ptr<S>();
  S* O = out.data_ptr<S>();
  at::parallel_for(0, R, 1024, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      O[r] = at::vec::map_reduce_all<S>([](Vectorized<S> v) { return v * v; },
                                        [](Vectorized<S> a, Vectorized<S> b) { return a + b; }, X + r * D, D);
  });
  return out;
}

// The Gram tile Q_I K_J^T (bq x bk, row stride bk) into buf; returns it as a tensor.
template <class S>
inline at::Tensor gram_tile(S* buf, const at::Tensor& qI, const at::Tensor& kJ) {
  at::Tensor dots = at::from_blob(buf, {qI.size(0), kJ.size(0)}, qI.options());
  at::mm_out(dots, qI, kJ.t());
  return dots;
}

// The Gram tile Z_I Z_I^T of a diagonal tile (b x b, row stride b) into buf, upper triangle only
// (the entries c >= r, and some below it): panels of kGramPanel rows, each against the columns from
// its own first row on. At b = 128 the four panels took 0.75 of the full GEMM's time, at b = 256 0.67,
// at b = 64 0.87 (1 thread, D = 512, bench/RESULTS.md §16); a tile of one panel is one GEMM.
constexpr int64_t kGramPanel = 32;
constexpr int64_t kGramPanelMinDepth = 256;  // at D = 128 the panels made a step 1-2% slower
inline bool gram_in_panels(int64_t b, int64_t D) { return b > kGramPanel && D >= kGramPanelMinDepth; }
template <class S>
inline void gram_tile_upper(S* buf, const at::Tensor& zI) {
  const int64_t b = zI.size(0);
  if (!gram_in_panels(b, zI.size(1))) {
    gram_tile(buf, zI, zI);
    return;
  }
  for (int64_t p0 = 0; p0 < b; p0 += kGramPanel) {
    const int64_t rows = std::min(kGramPanel, b - p0);
    at::Tensor out = at::from_blob(buf + p0 * b + p0, {rows, b - p0}, {b, 1}, zI.options());
    at::mm_out(out, zI.narrow(0, p0, rows), zI.narrow(0, p0, b - p0).t());
  }
}

// The whole Gram tile of a diagonal tile: its upper triangle (gram_tile_upper) mirrored into the
// lower one, so that the pairs (i, j) and (j, i) read the same dot product.
template <class S>
inline void gram_tile_diagonal(S* buf, const at::Tensor& zI) {
  const int64_t b = zI.size(0);
  gram_tile_upper(buf, zI);
  if (!gram_in_panels(b, zI.size(1))) return;  // one GEMM: the whole tile is there
  constexpr int64_t kBlock = 16;
  for (int64_t r0 = 0; r0 < b; r0 += kBlock) {
    const int rb = static_cast<int>(std::min(kBlock, b - r0));
    for (int64_t c0 = 0; c0 < r0; c0 += kBlock)  // block (r0, c0) below the diagonal from block (c0, r0)
      at::vec::transpose_mxn<S>(buf + c0 * b + r0, b, buf + r0 * b + c0, b, static_cast<int>(kBlock), rb);
    for (int64_t r = r0 + 1; r < r0 + rb; ++r)
      for (int64_t c = r0; c < r; ++c) buf[r * b + c] = buf[c * b + r];
  }
}

// The Gram tile of the tile pair (I, J) of an in-batch kernel (zI is zJ on the diagonal).
template <class S>
inline void pair_gram_tile(S* buf, const at::Tensor& zI, const at::Tensor& zJ, bool diagonal) {
  if (diagonal)
    gram_tile_diagonal(buf, zI);
  else
    gram_tile(buf, zI, zJ);
}

// out (cols x rows, row stride rows) = the transpose of the tile x (rows x cols, row stride cols):
// ATen's blocked transpose (16 x 16 blocks in registers on AVX-512; the scalar loop it replaced
// spilled its indices every element, 2% of the 256 x 512 "pml" forward).
template <class S>
inline void transpose_tile(const S* x, int64_t rows, int64_t cols, S* out) {
  at::vec::transpose_mxn<S>(x, cols, out, rows, static_cast<int>(rows), static_cast<int>(cols));
}

// Number of nonzero entries of x[0, n).
template <class S>
inline int64_t count_nonzero(const S* x, int64_t n) {
  int64_t nnz = 0;
  for (int64_t e = 0; e < n; ++e) nnz += x[e] != S(0);
  return nnz;
}

// acc += alpha C X for a bq x bk coefficient tile C (row stride bk) and the bk rows of X, or, with
// transpose_c, acc += alpha C^T X for the bq rows of X; acc and X are rows of D contiguous values,
// nnz is C's number of nonzeros. Set members are often few (the positives of a P x K batch, the
// negatives inside the margin once the classes have separated): below one nonzero in kDenseShare
// entries they are added row by row, else in one GEMM. Both give the same sum of the same products.
constexpr int64_t kDenseShare = 8;
template <class S>
void add_coef_product(const at::Tensor& acc, const S* C, int64_t bq, int64_t bk, int64_t nnz, const at::Tensor& X,
                      S alpha, bool transpose_c) {
  if (nnz == 0) return;
  if (nnz * kDenseShare > bq * bk) {
    const at::Tensor c_t = at::from_blob(const_cast<S*>(C), {bq, bk}, X.options());
    acc.addmm_(transpose_c ? c_t.t() : c_t, X, S(1), alpha);
    return;
  }
  const int64_t D = X.size(1);
  S* A = acc.data_ptr<S>();
  const S* XP = X.const_data_ptr<S>();
  for (int64_t r = 0; r < bq; ++r) {
    const S* c_row = C + r * bk;
    for (int64_t c = 0; c < bk; ++c) {
      if (c_row[c] == S(0)) continue;
      const S w = alpha * c_row[c];
      S* a = A + (transpose_c ? c : r) * D;
      const S* x = XP + (transpose_c ? r : c) * D;
      for (int64_t e = 0; e < D; ++e) a[e] += w * x[e];
    }
  }
}

// Distances of query row i (squared norm nq) to the gallery columns [c, c + W) of a Gram tile row
// (cnt of them real, cnt may be <= 0 past the tile), with the duplicate mask (docs/semantics.md §1.3).
template <class S>
struct PairDistances {
  Vectorized<S> d, dup;
};
template <class S>
inline PairDistances<S> pair_distances(const S* dot_row, const S* nk, int64_t c, int64_t cnt, const Vectorized<S>& nq,
                                       S rel) {
  using V = Vectorized<S>;
  const V dot = V::loadu(dot_row + c, std::max<int64_t>(cnt, 0));
  const V nkc = V::loadu(nk + c);
  const V d2 = gram_d2(dot, nq, nkc);
  const V dup = is_dup(d2, nq, nkc, rel);
  return {pair_dist(d2, dup), dup};
}

// The excluded pairs of a batch ranked against itself without ids: the pair i = i.
inline Exclusions diagonal_exclusions(int64_t N) {
  Exclusions ex;
  ex.offsets.resize(N + 1);
  ex.cols.resize(N);
  for (int64_t i = 0; i < N; ++i) {
    ex.offsets[i] = i;
    ex.cols[i] = i;
  }
  ex.offsets[N] = N;
  return ex;
}

// Per-call set-up of a pair problem (queries against the gallery) from the rows' squared norms nq
// and nk (the same tensor in-batch): labels as S, excluded pairs. In-batch (k_labels null: the
// gallery is the queries) the pairs with equal q_ids are excluded, or the pair i = i without ids.
template <class S>
struct PairProblem {
  at::Tensor nq_t, nk_t;
  std::vector<S> labels;
  const S *NQ, *NK, *QL, *KL;
  Exclusions ex;
  int64_t N, M, D;
  PairProblem(const at::Tensor& nq, const at::Tensor& nk, const at::Tensor& q_labels,
              const c10::optional<at::Tensor>& q_ids, const at::Tensor* k_labels,
              const c10::optional<at::Tensor>& k_ids, int64_t D_)
      : nq_t(nq), nk_t(nk), N(nq.size(0)), M(nk.size(0)), D(D_) {
    labels = k_labels != nullptr ? labels_as<S>({&q_labels, k_labels}) : labels_as<S>({&q_labels});
    NQ = nq_t.data_ptr<S>();
    NK = nk_t.data_ptr<S>();
    QL = labels.data();
    KL = k_labels != nullptr ? QL + N : QL;
    const int64_t* qid = q_ids.has_value() ? q_ids->data_ptr<int64_t>() : nullptr;
    if (k_labels == nullptr)
      ex = qid != nullptr ? build_exclusions(qid, qid, N, N) : diagonal_exclusions(N);
    else
      ex = build_exclusions(qid, k_ids.has_value() ? k_ids->data_ptr<int64_t>() : nullptr, N, M);
  }
};

RLL_CPU_CAPABILITY_END
}  // namespace rll
