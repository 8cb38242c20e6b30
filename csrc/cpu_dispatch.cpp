// Which build of the CPU kernels serves this process. The kernel sources are compiled once per SIMD
// capability (setup.py; csrc/cpu_capability.h): on x86-64 an AVX2 build and an AVX-512 build, each in
// its own namespace rll::AVX2 / rll::AVX512; elsewhere one portable build, rll::DEFAULT. When the
// extension loads, this file picks one build and registers its kernels on the op schemas:
//   - RLL_KERNELS_CPU_CAPABILITY=avx2 or avx512 (any case) forces that build; a value naming no build,
//     or avx512 on a CPU without AVX-512, registers nothing and makes the import of rll_kernels._C
//     raise a ValueError that names the variable (ops.cpp);
//   - unset or empty: AVX-512 when the CPU has AVX-512 F/BW/VL/DQ (with OS support) and ATen uses
//     AVX-512 too (at::get_cpu_capability(), which follows ATEN_CPU_CAPABILITY), else AVX2.
// This file is compiled once, without the kernels' capability flags.
#include <ATen/Version.h>
#include <torch/library.h>

#include <algorithm>
#include <cctype>
#include <cstdlib>
#include <string>

#define RLL_DECLARE_CPU_BUILD(CAP)                          \
  namespace rll::CAP {                                      \
  void register_rll_cpu_kernels(torch::Library& m);         \
  void register_softtriple_cpu_kernels(torch::Library& m);  \
  void register_osm_cpu_kernels(torch::Library& m);         \
  inline void register_cpu_kernels(torch::Library& m) {     \
    register_rll_cpu_kernels(m);                            \
    register_softtriple_cpu_kernels(m);                     \
    register_osm_cpu_kernels(m);                            \
  }                                                         \
  }

#if defined(__x86_64__) || defined(_M_X64)
#define RLL_CPU_X86 1
RLL_DECLARE_CPU_BUILD(AVX2)
RLL_DECLARE_CPU_BUILD(AVX512)
#else
RLL_DECLARE_CPU_BUILD(DEFAULT)
#endif

namespace rll {
namespace {

constexpr const char* kCapabilityVar = "RLL_KERNELS_CPU_CAPABILITY";

struct CpuBuild {
  const char* name;
  bool (*runs_here)();
  void (*register_kernels)(torch::Library&);
};

#ifdef RLL_CPU_X86
// What the builds are compiled with (setup.py): AVX2 = -mavx2 -mfma -mf16c; AVX-512 adds F, BW, VL, DQ.
bool cpu_has_avx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}
bool cpu_has_avx512() {
  return cpu_has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
}
const CpuBuild kBuilds[] = {{"avx2", &cpu_has_avx2, &AVX2::register_cpu_kernels},
                            {"avx512", &cpu_has_avx512, &AVX512::register_cpu_kernels}};
#else
bool cpu_runs_default() { return true; }
const CpuBuild kBuilds[] = {{"default", &cpu_runs_default, &DEFAULT::register_cpu_kernels}};
#endif

std::string lower(std::string s) {
  std::transform(s.begin(), s.end(), s.begin(), [](unsigned char c) { return std::tolower(c); });
  return s;
}

// The build chosen for this process, why, and an error (then no build) for a bad RLL_KERNELS_CPU_CAPABILITY.
struct CpuChoice {
  const CpuBuild* build = nullptr;
  std::string why, error;
};

CpuChoice forced_build(const std::string& value) {
  std::string names;
  for (const CpuBuild& b : kBuilds) {
    names += std::string(names.empty() ? "" : ", ") + b.name;
    if (lower(value) != b.name) continue;
    if (!b.runs_here())
      return {nullptr, "", std::string(kCapabilityVar) + "=" + value + ": this CPU cannot run the " + b.name +
                               " build of the rll_kernels CPU kernels; unset it to choose from the CPU"};
    return {&b, std::string("forced by ") + kCapabilityVar, ""};
  }
  return {nullptr, "", std::string(kCapabilityVar) + " must be one of " + names + " (or unset: chosen from the CPU), got '" +
                           value + "'"};
}

CpuChoice choose_build() {
  const char* env = std::getenv(kCapabilityVar);
  if (env != nullptr && *env != '\0') return forced_build(env);
  const std::string aten = lower(at::get_cpu_capability());
  const CpuBuild* widest = &kBuilds[0];
  for (const CpuBuild& b : kBuilds)
    if (b.runs_here() && (&b == &kBuilds[0] || b.name == aten)) widest = &b;
  return {widest, "chosen from the CPU (ATen's CPU capability: " + aten + ")", ""};
}

const CpuChoice& cpu_choice() {
  static const CpuChoice choice = choose_build();
  return choice;
}

}  // namespace

// For ops.cpp: the chosen build's name ("" when none), why, and the error of a bad RLL_KERNELS_CPU_CAPABILITY.
const char* cpu_capability_name() { return cpu_choice().build ? cpu_choice().build->name : ""; }
const char* cpu_capability_why() { return cpu_choice().why.c_str(); }
const char* cpu_capability_error() { return cpu_choice().error.c_str(); }

}  // namespace rll

TORCH_LIBRARY_IMPL(rll_kernels, CPU, m) {
  if (const rll::CpuBuild* build = rll::cpu_choice().build) build->register_kernels(m);
}
