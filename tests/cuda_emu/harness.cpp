// Runs the CUDA kernels of csrc/cuda/rll_kernels.cu on the CPU through the emulation headers of
// this folder, the way csrc/cuda/rll_cuda_glue.cu calls them (tests/test_cuda_emulated.py).
//
// usage: harness DIR DTYPE N M D HAS_IDS ATTACHED NEED_GRAD alpha beta Tn Tp lam bias
// DIR holds q.bin, k.bin (float64, values already representable in DTYPE), ql.bin, kl.bin
// (int64), qid.bin, kid.bin (int64, when HAS_IDS), g.bin (float64 upstream row gradients).
// Writes loss.bin, stats.bin, gq_fwd.bin (paper grad in forward), gq.bin, gk.bin as float64.
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
static int run(const std::string& dir, int64_t N, int64_t M, int64_t D, bool has_ids, bool attached,
               bool need_grad, const rll::Params<acc_t<T>>& prm) {
  using S = acc_t<T>;
  const auto qd = read<double>(dir + "/q.bin", N * D), kd = read<double>(dir + "/k.bin", M * D);
  std::vector<T> q(N * D), k(M * D);
  for (size_t i = 0; i < q.size(); ++i) q[i] = from_double<T>(qd[i]);
  for (size_t i = 0; i < k.size(); ++i) k[i] = from_double<T>(kd[i]);
  const auto ql = read<int64_t>(dir + "/ql.bin", N), kl = read<int64_t>(dir + "/kl.bin", M);
  std::vector<int64_t> qid, kid;
  if (has_ids) {
    qid = read<int64_t>(dir + "/qid.bin", N);
    kid = read<int64_t>(dir + "/kid.bin", M);
  }
  const auto gd = read<double>(dir + "/g.bin", N);
  std::vector<S> g(gd.begin(), gd.end());
  Problem<T> pb{q.data(), k.data(), ql.data(), kl.data(), has_ids ? qid.data() : nullptr,
                has_ids ? kid.data() : nullptr, N, M, D, D, D};
  std::vector<S> loss(N), stats(N * 4), norms(N + M), gq_fwd, gq(N * D, S(0)), gk;
  const bool paper_grad = need_grad && !attached;
  if (paper_grad) gq_fwd.assign(N * D, S(0));
  if (attached) gk.assign(M * D, S(0));
  if (launch_rll_fwd<T>(pb, prm, loss.data(), stats.data(), paper_grad ? gq_fwd.data() : nullptr, norms.data(),
                        nullptr) != cudaSuccess)
    return 3;
  if (launch_rll_bwd<T>(pb, prm, g.data(), stats.data(), attached, gq.data(), attached ? gk.data() : nullptr,
                        norms.data(), nullptr) != cudaSuccess)
    return 4;
  write(dir + "/loss.bin", loss);
  write(dir + "/stats.bin", stats);
  write(dir + "/gq_fwd.bin", gq_fwd);
  write(dir + "/gq.bin", gq);
  write(dir + "/gk.bin", gk);
  return 0;
}

int main(int argc, char** argv) {
  if (argc != 15) {
    std::fprintf(stderr, "usage: harness DIR DTYPE N M D HAS_IDS ATTACHED NEED_GRAD alpha beta Tn Tp lam bias\n");
    return 1;
  }
  const std::string dir = argv[1], dt = argv[2];
  const int64_t N = std::atoll(argv[3]), M = std::atoll(argv[4]), D = std::atoll(argv[5]);
  const bool ids = std::atoi(argv[6]), att = std::atoi(argv[7]), ng = std::atoi(argv[8]);
  double p[6];
  for (int i = 0; i < 6; ++i) p[i] = std::atof(argv[9 + i]);
  const rll::Params<double> pd{p[0], p[1], p[2], p[3], p[4], p[5]};
  const rll::Params<float> pf{float(p[0]), float(p[1]), float(p[2]), float(p[3]), float(p[4]), float(p[5])};
  if (dt == "float64") return run<double>(dir, N, M, D, ids, att, ng, pd);
  if (dt == "float32") return run<float>(dir, N, M, D, ids, att, ng, pf);
  if (dt == "float16") return run<__half>(dir, N, M, D, ids, att, ng, pf);
  if (dt == "bfloat16") return run<__nv_bfloat16>(dir, N, M, D, ids, att, ng, pf);
  std::fprintf(stderr, "unknown dtype %s\n", dt.c_str());
  return 1;
}
