// Probe: MKL (at::mm_out / addmm_) against hand-written AVX-512 kernels on the tile GEMMs of the fused
// in-batch RLL (bench/RESULTS.md §18). Built and run by tile_gemm.py; not part of the extension.
//   gram: C = A B^T, A and B b x D row-major (the Gram tile of two row tiles)
//   coef: C += H Z, H b x b, Z b x D (the coefficient product H z of the backward)
// Hand kernels: a 6 x 64 register tile (24 zmm accumulators, one broadcast of H per row, four loads of
// a packed Z row per step) for coef, the same kernel on B^T for gram ("packed"), and a 4 x 4 tile of
// dot products over D ("dot") for gram. Each is checked against MKL.
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <immintrin.h>
#include <torch/extension.h>

#include <chrono>
#include <vector>

namespace {

template <int R>
void coef_micro(const float* H, int64_t ldh, const float* Z, int64_t ldz, float* C, int64_t ldc, int64_t n) {
  __m512 c[R][4];
#pragma GCC unroll 8
  for (int a = 0; a < R; a++)
    for (int v = 0; v < 4; v++) c[a][v] = _mm512_loadu_ps(C + a * ldc + 16 * v);
  for (int64_t k = 0; k < n; k++) {
    const float* zp = Z + k * ldz;
    const __m512 z0 = _mm512_loadu_ps(zp), z1 = _mm512_loadu_ps(zp + 16), z2 = _mm512_loadu_ps(zp + 32),
                 z3 = _mm512_loadu_ps(zp + 48);
#pragma GCC unroll 8
    for (int a = 0; a < R; a++) {
      const __m512 h = _mm512_set1_ps(H[a * ldh + k]);
      c[a][0] = _mm512_fmadd_ps(h, z0, c[a][0]);
      c[a][1] = _mm512_fmadd_ps(h, z1, c[a][1]);
      c[a][2] = _mm512_fmadd_ps(h, z2, c[a][2]);
      c[a][3] = _mm512_fmadd_ps(h, z3, c[a][3]);
    }
  }
#pragma GCC unroll 8
  for (int a = 0; a < R; a++)
    for (int v = 0; v < 4; v++) _mm512_storeu_ps(C + a * ldc + 16 * v, c[a][v]);
}

// C (m x N) += H (m x n) Z (n x N), N a multiple of 64; each 64-column strip of Z is packed first.
void coef_product(const float* H, const float* Z, float* C, int64_t m, int64_t n, int64_t N) {
  std::vector<float> strip(n * 64);
  for (int64_t j = 0; j < N; j += 64) {
    for (int64_t k = 0; k < n; k++) std::copy(Z + k * N + j, Z + k * N + j + 64, strip.data() + k * 64);
    int64_t i = 0;
    for (; i + 6 <= m; i += 6) coef_micro<6>(H + i * n, n, strip.data(), 64, C + i * N + j, N, n);
    for (; i < m; i++) coef_micro<1>(H + i * n, n, strip.data(), 64, C + i * N + j, N, n);
  }
}

void gram_packed(const float* A, const float* B, float* C, int64_t b, int64_t D, std::vector<float>& Bt) {
  at::vec::transpose_mxn<float>(B, D, Bt.data(), b, static_cast<int>(b), static_cast<int>(D));
  std::fill(C, C + b * b, 0.f);
  coef_product(A, Bt.data(), C, b, D, b);
}

// 4 x 4 dot products over D per block (b a multiple of 4, D of 16).
void gram_dot(const float* A, const float* B, float* C, int64_t b, int64_t D) {
  for (int64_t i = 0; i < b; i += 4)
    for (int64_t j = 0; j < b; j += 4) {
      __m512 acc[4][4];
      for (int x = 0; x < 4; x++)
        for (int y = 0; y < 4; y++) acc[x][y] = _mm512_setzero_ps();
      for (int64_t k = 0; k < D; k += 16) {
        const __m512 b0 = _mm512_loadu_ps(B + j * D + k), b1 = _mm512_loadu_ps(B + (j + 1) * D + k),
                     b2 = _mm512_loadu_ps(B + (j + 2) * D + k), b3 = _mm512_loadu_ps(B + (j + 3) * D + k);
        for (int x = 0; x < 4; x++) {
          const __m512 a = _mm512_loadu_ps(A + (i + x) * D + k);
          acc[x][0] = _mm512_fmadd_ps(a, b0, acc[x][0]);
          acc[x][1] = _mm512_fmadd_ps(a, b1, acc[x][1]);
          acc[x][2] = _mm512_fmadd_ps(a, b2, acc[x][2]);
          acc[x][3] = _mm512_fmadd_ps(a, b3, acc[x][3]);
        }
      }
      for (int x = 0; x < 4; x++)
        for (int y = 0; y < 4; y++) C[(i + x) * b + j + y] = _mm512_reduce_add_ps(acc[x][y]);
    }
}

template <class F>
double seconds(F f, int reps) {
  f();
  const auto t = std::chrono::steady_clock::now();
  for (int r = 0; r < reps; r++) f();
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count() / reps;
}

// GFLOP/s of {MKL gram, dot gram, packed gram, MKL coef, hand coef} and the largest |difference| of
// each hand kernel from MKL, for tiles of b rows and depth D (one thread: call with 1 ATen thread).
std::vector<double> probe(int64_t b, int64_t D, int reps) {
  TORCH_CHECK(b % 4 == 0 && D % 64 == 0, "probe: b % 4 == 0 and D % 64 == 0");
  const auto A = torch::randn({b, D}), B = torch::randn({b, D}), H = torch::randn({b, b});
  auto C = torch::empty({b, b}), C_dot = torch::empty({b, b}), C_pk = torch::empty({b, b});
  auto G = torch::zeros({b, D}), G_hand = torch::zeros({b, D});
  std::vector<float> Bt(D * b);
  const float *a = A.data_ptr<float>(), *bb = B.data_ptr<float>(), *h = H.data_ptr<float>();
  const double gram_mkl = seconds([&] { at::mm_out(C, A, B.t()); }, reps);
  const double gram_dot_s = seconds([&] { gram_dot(a, bb, C_dot.data_ptr<float>(), b, D); }, reps);
  const double gram_pk = seconds([&] { gram_packed(a, bb, C_pk.data_ptr<float>(), b, D, Bt); }, reps);
  const double coef_mkl = seconds([&] { G.addmm_(H, B); }, reps);
  const double coef_hand = seconds([&] { coef_product(h, bb, G_hand.data_ptr<float>(), b, b, D); }, reps);
  G.zero_(), G_hand.zero_();
  G.addmm_(H, B);
  coef_product(h, bb, G_hand.data_ptr<float>(), b, b, D);
  const double flop = 2.0 * b * b * D / 1e9;
  return {flop / gram_mkl,
          flop / gram_dot_s,
          flop / gram_pk,
          flop / coef_mkl,
          flop / coef_hand,
          (C - C_dot).abs().max().item<double>(),
          (C - C_pk).abs().max().item<double>(),
          (G - G_hand).abs().max().item<double>()};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("probe", &probe); }
