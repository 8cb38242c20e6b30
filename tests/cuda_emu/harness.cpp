// Runs the CUDA kernels of csrc/cuda/rll_kernels.cu on the CPU through the emulation headers of
// this folder, the way csrc/cuda/rll_cuda_glue.cu calls them (tests/test_cuda_emulated.py).
//
// usage: harness DIR DTYPE N M D HAS_IDS ATTACHED NEED_GRAD NORMALIZE IN_BATCH alpha beta Tn Tp lam bias
// DIR holds q.bin, k.bin (float64, values already representable in DTYPE; no k.bin IN_BATCH), ql.bin,
// kl.bin (int64), qid.bin, kid.bin (int64, when HAS_IDS), g.bin (float64 upstream row gradients).
// NORMALIZE: the rows are normalised first and the gradients go through the normalisation, as the
// glue does; IN_BATCH: the gallery is the queries (the pair i = i excluded without ids), the whole
// gradient in gq. Writes loss.bin, stats.bin, gq_fwd.bin (paper grad in forward), gq.bin, gk.bin as
// float64.
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "cuda/rll_kernels.cuh"

using namespace rll::cuda;

template <class V>
static std::vector<V> read(const std::string& path, size_t n) {
  std::vector<V> v(n);
  FILE* f = std::fopen(path.c_str(), "rb");
  if (!f || std::fread(v.data(), sizeof(V), n, f) != n) {
    std::fprintf(stderr, "cannot read %zu values from %s\n", n, path.c_str());
    std::exit(2);
  }
  std::fclose(f);
  return v;
}
template <class V>
static void write(const std::string& path, const std::vector<V>& v) {
  std::vector<double> d(v.begin(), v.end());
  FILE* f = std::fopen(path.c_str(), "wb");
  std::fwrite(d.data(), sizeof(double), d.size(), f);
  std::fclose(f);
}

template <class T>
static T from_double(double x) {
  return T(x);
}
template <>
__half from_double<__half>(double x) {
  return __float2half(float(x));
}
template <>
__nv_bfloat16 from_double<__nv_bfloat16>(double x) {
  return __float2bfloat16(float(x));
}

template <class T>
static std::vector<T> read_rows(const std::string& path, int64_t n) {
  const auto d = read<double>(path, n);
  std::vector<T> x(n);
  for (int64_t i = 0; i < n; ++i) x[i] = from_double<T>(d[i]);
  return x;
}

struct Flags {
  bool has_ids, attached, need_grad, normalize, in_batch;
};

template <class T>
static int run(const std::string& dir, int64_t N, int64_t M, int64_t D, Flags f, const rll::Params<acc_t<T>>& prm) {
  using S = acc_t<T>;
  // the rows as the glue lays them out: queries, then the gallery unless in-batch
  std::vector<T> x = read_rows<T>(dir + "/q.bin", N * D);
  if (!f.in_batch) {
    const std::vector<T> k = read_rows<T>(dir + "/k.bin", M * D);
    x.insert(x.end(), k.begin(), k.end());
  }
  const int64_t R = f.in_batch ? N : N + M;
  std::vector<T> z(R * D);
  std::vector<S> row_norms(R);
  if (f.normalize && launch_rll_normalize<T>(x.data(), R, D, D, 1, z.data(), row_norms.data(), nullptr) != cudaSuccess)
    return 5;
  const T* rows = f.normalize ? z.data() : x.data();
  const auto ql = read<int64_t>(dir + "/ql.bin", N);
  const auto kl = f.in_batch ? ql : read<int64_t>(dir + "/kl.bin", M);
  std::vector<int64_t> qid, kid;
  if (f.has_ids) {
    qid = read<int64_t>(dir + "/qid.bin", N);
    kid = f.in_batch ? qid : read<int64_t>(dir + "/kid.bin", M);
  }
  const auto gd = read<double>(dir + "/g.bin", N);
  std::vector<S> g(gd.begin(), gd.end());
  Problem<T> pb{rows,  f.in_batch ? rows : rows + N * D, ql.data(), kl.data(), f.has_ids ? qid.data() : nullptr,
                f.has_ids ? kid.data() : nullptr, N, M, D, D, D, f.in_batch && !f.has_ids};
  std::vector<S> loss(N), stats(N * 4), norms(N + M), gq_fwd, gq(N * D, S(0)), gk;
  const bool paper_grad = f.need_grad && !f.attached;
  if (paper_grad) gq_fwd.assign(N * D, S(0));
  if (f.attached && !f.in_batch) gk.assign(M * D, S(0));
  if (launch_rll_fwd<T>(pb, prm, loss.data(), stats.data(), paper_grad ? gq_fwd.data() : nullptr, norms.data(),
                        nullptr) != cudaSuccess)
    return 3;
  S* gk_out = f.attached ? (f.in_batch ? gq.data() : gk.data()) : nullptr;
  if (launch_rll_bwd<T>(pb, prm, g.data(), stats.data(), f.attached, gq.data(), gk_out, norms.data(), nullptr) !=
      cudaSuccess)
    return 4;
  if (f.normalize) {
    if (paper_grad) launch_rll_normalize_backward<T>(gq_fwd.data(), z.data(), row_norms.data(), N, D, nullptr);
    launch_rll_normalize_backward<T>(gq.data(), z.data(), row_norms.data(), N, D, nullptr);
    if (!gk.empty()) launch_rll_normalize_backward<T>(gk.data(), z.data() + N * D, row_norms.data() + N, M, D, nullptr);
  }
  write(dir + "/loss.bin", loss);
  write(dir + "/stats.bin", stats);
  write(dir + "/gq_fwd.bin", gq_fwd);
  write(dir + "/gq.bin", gq);
  write(dir + "/gk.bin", gk);
  return 0;
}

int main(int argc, char** argv) {
  if (argc != 17) {
    std::fprintf(stderr,
                 "usage: harness DIR DTYPE N M D HAS_IDS ATTACHED NEED_GRAD NORMALIZE IN_BATCH alpha beta Tn Tp lam "
                 "bias\n");
    return 1;
  }
  const std::string dir = argv[1], dt = argv[2];
  const int64_t N = std::atoll(argv[3]), M = std::atoll(argv[4]), D = std::atoll(argv[5]);
  const Flags f{std::atoi(argv[6]) != 0, std::atoi(argv[7]) != 0, std::atoi(argv[8]) != 0, std::atoi(argv[9]) != 0,
                std::atoi(argv[10]) != 0};
  double p[6];
  for (int i = 0; i < 6; ++i) p[i] = std::atof(argv[11 + i]);
  const rll::Params<double> pd{p[0], p[1], p[2], p[3], p[4], p[5]};
  const rll::Params<float> pf{float(p[0]), float(p[1]), float(p[2]), float(p[3]), float(p[4]), float(p[5])};
  if (dt == "float64") return run<double>(dir, N, M, D, f, pd);
  if (dt == "float32") return run<float>(dir, N, M, D, f, pf);
  if (dt == "float16") return run<__half>(dir, N, M, D, f, pf);
  if (dt == "bfloat16") return run<__nv_bfloat16>(dir, N, M, D, f, pf);
  std::fprintf(stderr, "unknown dtype %s\n", dt.c_str());
  return 1;
}
