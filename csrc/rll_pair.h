// Per-pair math of the Ranked List Loss (docs/semantics.md §2), shared by every C++ backend.
//
// Torch-free and header-only: the CPU kernel (csrc/rll_cpu.cpp) and the CUDA kernels
// (csrc/cuda/) include this file, so the CPU tests exercise the exact formulas the GPU runs.
// Every function is a template over the value type T so the CPU kernel can instantiate it on
// SIMD vectors (at::vec::Vectorized) as well as on scalars; the primitives it needs
// (rll_select, rll_max, rll_sqrt, rll_exp, rll_log) are overloaded for scalars here and for
// vectors by the CPU translation unit before it includes this header.
#pragma once

#include <cmath>
#include <limits>
#include <sstream>
#include <string>

#include "cpu_capability.h"

#if defined(__CUDACC__) || defined(__HIPCC__)
#define RLL_HD __host__ __device__ __forceinline__
#else
#define RLL_HD inline
#endif

namespace rll {
RLL_CPU_CAPABILITY_BEGIN

// ---------------------------------------------------------------- scalar primitives
RLL_HD float rll_select(bool m, float a, float b) { return m ? a : b; }
RLL_HD double rll_select(bool m, double a, double b) { return m ? a : b; }
RLL_HD float rll_max(float a, float b) { return a > b ? a : b; }
RLL_HD double rll_max(double a, double b) { return a > b ? a : b; }
RLL_HD float rll_sqrt(float x) { return sqrtf(x); }
RLL_HD double rll_sqrt(double x) { return sqrt(x); }
RLL_HD float rll_exp(float x) { return expf(x); }
RLL_HD double rll_exp(double x) { return exp(x); }
RLL_HD float rll_log(float x) { return logf(x); }
RLL_HD double rll_log(double x) { return log(x); }
RLL_HD float rll_log1p(float x) { return log1pf(x); }
RLL_HD double rll_log1p(double x) { return log1p(x); }

template <class S>
RLL_HD S neg_inf() { return -std::numeric_limits<S>::infinity(); }

// Relative duplicate threshold (docs/semantics.md §1.3): 64 eps of the accumulation type.
template <class S>
RLL_HD S dup_rel() { return S(64) * std::numeric_limits<S>::epsilon(); }

// Hyper-parameters, in the accumulation type S.
template <class S>
struct Params {
  S alpha;     // negative boundary
  S beta;      // positive boundary alpha - margin
  S Tn, Tp;    // temperatures (Tp may be negative)
  S lam;       // imbalance: L = (1 - lam) L_P + lam L_N
  S den_bias;  // added to each softmax denominator: M * 1e-5 for PML parity, else 0
};

// Why the hyper-parameters lie outside their domain (docs/semantics.md §2.2), "" when they do not.
// Host only: the CPU op raises it with TORCH_CHECK, the stable-ABI CUDA glue with STD_TORCH_CHECK.
inline std::string params_error(double alpha, double beta, double Tn, double Tp, double lam, double den_bias) {
  std::ostringstream msg;
  // any finite boundaries: beta >= alpha (margin <= 0) or beta <= 0 are valid, the labels split the sets
  if (!(std::isfinite(alpha) && std::isfinite(beta) && std::isfinite(Tn) && std::isfinite(Tp)))
    msg << "rll: alpha, beta, Tn and Tp must be finite, got alpha=" << alpha << " beta=" << beta << " Tn=" << Tn
        << " Tp=" << Tp;
  else if (!(lam >= 0.0 && lam <= 1.0))
    msg << "rll: imbalance must lie in [0, 1], got " << lam;
  else if (!(den_bias >= 0.0))
    msg << "rll: den_bias must be >= 0, got " << den_bias;
  return msg.str();
}

template <class S>
Params<S> params_in(double alpha, double beta, double Tn, double Tp, double lam, double den_bias) {
  return Params<S>{S(alpha), S(beta), S(Tn), S(Tp), S(lam), S(den_bias)};
}

// ---------------------------------------------------------------- distances
// Squared distance from the Gram form, clamped at 0.
template <class T>
RLL_HD T gram_d2(T dot, T nq, T nk) { return rll_max(nq + nk - T(2) * dot, T(0)); }

// Gram-form rounding makes an exact duplicate look like d^2 ~ eps (|q|^2 + |k|^2): such a pair is
// a duplicate, with d = 0 and a zero gradient direction. Returns a mask.
template <class T, class S>
RLL_HD auto is_dup(T d2, T nq, T nk, S rel) { return d2 <= T(rel) * (nq + nk); }

// d (0 for duplicates; sqrt is never taken at 0, so no NaN gradient).
template <class T, class M>
RLL_HD T pair_dist(T d2, M dup) { return rll_select(dup, T(0), rll_sqrt(d2)); }

// 1/d, the factor mapping dL/dd to the pair direction (z_i - z_j)/d; 0 for duplicates.
template <class T, class M>
RLL_HD T pair_inv_dist(T d, M dup) { return rll_select(dup, T(0), T(1) / rll_max(d, T(1e-30))); }

// ---------------------------------------------------------------- sets, values, logits
// Non-trivial positive: same label (and a real pair), d > beta. `same` already holds the
// validity (not the pair itself, inside the gallery).
template <class T, class M, class S>
RLL_HD auto in_pos(M same, T d, const Params<S>& p) { return same & (d > T(p.beta)); }
// Non-trivial negative: other label, d < alpha (d = 0 duplicates included, docs/semantics.md §2.5).
template <class T, class M, class S>
RLL_HD auto in_neg(M diff, T d, const Params<S>& p) { return diff & (d < T(p.alpha)); }

// Hinge values v and softmax logits s = T v of each set.
template <class T, class S>
RLL_HD T pos_value(T d, const Params<S>& p) { return d - T(p.beta); }
template <class T, class S>
RLL_HD T neg_value(T d, const Params<S>& p) { return T(p.alpha) - d; }

// Logit of a member, -inf for a non-member (so exp(s - m) = 0 without a branch).
template <class T, class M, class S>
RLL_HD T masked_logit(M member, T value, S temp) {
  return rll_select(member, T(temp) * value, T(neg_inf<S>()));
}

// ---------------------------------------------------------------- online softmax
// Running state of one row and one set, FlashAttention style: m = running max of the logits,
// l = sum exp(s - m), a = sum exp(s - m) v. Scalars only (a row's tile max is reduced first).
template <class S>
struct OnlineRow {
  S m = neg_inf<S>();
  S l = S(0);
  S a = S(0);
};

// Factor that moves quantities accumulated under max m_old to max m_new >= m_old.
template <class S>
RLL_HD S rescale(S m_old, S m_new) {
  return m_old == neg_inf<S>() ? S(0) : rll_exp(m_old - m_new);
}

// Start a tile whose largest logit is tile_max: returns the factor for the old accumulators and
// updates the running max (and l, a).
template <class S>
RLL_HD S online_begin_tile(OnlineRow<S>& r, S tile_max) {
  const S m_new = rll_max(r.m, tile_max);
  if (m_new == neg_inf<S>()) return S(1);  // nothing seen yet
  const S f = rescale(r.m, m_new);
  r.l *= f;
  r.a *= f;
  r.m = m_new;
  return f;
}

// Weight of a member under the current running max (0 for non-members: logit -inf).
template <class T, class S>
RLL_HD T online_weight(T logit, const OnlineRow<S>& r) { return rll_exp(logit - T(r.m)); }

// Merges o, another partial state of the same row and set (FlashAttention's split-K combine), into r.
template <class S>
RLL_HD void online_merge(OnlineRow<S>& r, const OnlineRow<S>& o) {
  const S m_new = rll_max(r.m, o.m);
  if (m_new == neg_inf<S>()) return;  // neither has seen a member
  const S fr = rescale(r.m, m_new), fo = rescale(o.m, m_new);
  r.l = r.l * fr + o.l * fo;
  r.a = r.a * fr + o.a * fo;
  r.m = m_new;
}

// Final statistics of a set: the weighted mean L and log of the true denominator
// log(sum exp(s) + bias). An empty set gives L = 0 and logden = -inf (no weight anywhere).
template <class S>
struct SetStats {
  S L;
  S logden;
};

template <class S>
RLL_HD SetStats<S> online_finish(const OnlineRow<S>& r, S bias) {
  SetStats<S> st{S(0), neg_inf<S>()};
  if (!(r.l > S(0))) return st;
  const S log_sum = r.m + rll_log(r.l);
  // logaddexp(log_sum, log(bias)) without overflow for any logit scale
  if (bias > S(0)) {
    const S lb = rll_log(bias);
    st.logden = log_sum > lb ? log_sum + rll_log1p(rll_exp(lb - log_sum))
                             : lb + rll_log1p(rll_exp(log_sum - lb));
  } else {
    st.logden = log_sum;
  }
  // L = (e^m a) / den = (a / l) * exp(log_sum - logden)
  st.L = (r.a / r.l) * rll_exp(log_sum - st.logden);
  return st;
}

// Normalised weight p = exp(s - logden) of a member (0 for non-members).
template <class T, class S>
RLL_HD T final_weight(T logit, S logden) { return rll_exp(logit - T(logden)); }

// ---------------------------------------------------------------- gradient coefficients
// dL_set/dd for one member, with p its normalised weight (docs/semantics.md §2.3).
//   detached weights ("paper"):  positive +p, negative -p
//   attached weights ("pml"):    positive +p [1 + Tp (v - L_P)], negative -p [1 + Tn (v - L_N)]
template <class T, class S>
RLL_HD T pos_coef(T p, T v, S L, S Tp, bool attached) {
  return attached ? p * (T(1) + T(Tp) * (v - T(L))) : p;
}
template <class T, class S>
RLL_HD T neg_coef(T p, T v, S L, S Tn, bool attached) {
  return attached ? T(0) - p * (T(1) + T(Tn) * (v - T(L))) : T(0) - p;
}

// A pair's dL/dd for one row's set: w times the pair's set coefficient, from its logit s, hinge
// value v and the row's statistics of the set (logden, L); w = (1 - lam) g_i for the positive set,
// lam g_i for the negative one (g_i the upstream gradient of the row's loss).
template <class T, class S>
RLL_HD T pos_pair_grad(T w, T s, T v, S logden, S L, S Tp, bool attached) {
  return w * pos_coef(final_weight(s, logden), v, L, Tp, attached);
}
template <class T, class S>
RLL_HD T neg_pair_grad(T w, T s, T v, S logden, S L, S Tn, bool attached) {
  return w * neg_coef(final_weight(s, logden), v, L, Tn, attached);
}

// Row loss from the two set means.
template <class S>
RLL_HD S row_loss(S Lp, S Ln, const Params<S>& p) { return (S(1) - p.lam) * Lp + p.lam * Ln; }

RLL_CPU_CAPABILITY_END
}  // namespace rll
