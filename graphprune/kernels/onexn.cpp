// graphprune 1xN block-sparse convolution / linear kernels for CPU (fp32, OpenMP).
//
// Weights (packed by graphprune/kernels/onexn.py):
//   values  [G = K/N, kept, R*S*N]  float32, element (g, j, (r*S + s)*N + n)
//   indices [G, kept]               int32, sorted input channels kept by output group g
//
// Activations are read from a "planar" view: element (b, c, f) at x + b*bs + c*cs + f*ld,
// where f is a flat pixel position in a (possibly zero-padded, stride-phase-split) plane of
// row width Wq. Output pixel (oh, ow) reads tap t at flat f = oh*Wq + ow plus toff[t]; flat
// positions with ow >= Wo are junk (computed, never stored). A stride-s conv is split into
// s*s phase planes so every tap becomes a unit-stride read. A plain NCHW input with stride 1
// and no padding is used in place; NHWC input of a 1x1/stride-1/pad-0 conv (and every linear
// input) is read in place with ld = C.
//
// Two micro-kernels:
//   pv ("pixel vectorised"): NC outputs x V vectors of W pixels; natural NCHW store.
//   ov ("output vectorised"): P pixels x NV vectors of W outputs; natural NHWC store.
// The driver splits (pixel macro tiles x output groups) evenly over OpenMP threads.
//
// The file includes itself once per instruction set (AVX-512, AVX2) with `#pragma GCC target`
// so one build serves both; the ISA is chosen at run time.

#ifndef GP_ONEXN_BODY
#define GP_ONEXN_BODY 1

// Light headers (not torch/extension.h) keep the JIT build short.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <immintrin.h>
#include <omp.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#define GP_UNROLL _Pragma("GCC unroll 32")

namespace gp {

enum class Kind { PV, OV };

struct Job {
  // activations
  const float* x = nullptr;
  int64_t bs = 0, cs = 0, ld = 1;
  std::vector<int64_t> toff;
  int64_t taps = 1, Wq = 1, L = 1;
  // weights
  const float* w = nullptr;
  const int32_t* idx = nullptr;
  const float* bias = nullptr;
  int64_t N = 1, G = 1, kept = 0, K = 1;
  // output
  float* y = nullptr;
  bool y_cl = false;
  int64_t B = 1, Ho = 1, Wo = 1;
  // tiling
  Kind kind = Kind::PV;
  int64_t tile = 1;      // pv: pixels per tile; ov: max pixels per tile
  int64_t ntile_img = 1; // tiles per image
  int64_t mt_tiles = 1;  // tiles per macro tile
  int64_t n_mt = 1;      // macro tiles in all
  bool g_outer = false;  // item order: (group, macro tile) instead of (macro tile, group)
  int64_t jblock = 1;    // pv: kept channels per L1 block
  int64_t chunk = 1;     // items handed to a thread at a time
  std::atomic<int64_t>* next = nullptr;  // next unclaimed chunk (dynamic schedule)
};

}  // namespace gp

// ---------------------------------------------------------------- AVX-512 instantiation
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512dq,avx512bw,avx2,fma")
namespace gp {
namespace avx512 {
using VT = __m512;
using MT = __mmask16;
constexpr int W = 16;
constexpr int NREG = 32;
static inline VT vzero() { return _mm512_setzero_ps(); }
static inline VT vset1(float a) { return _mm512_set1_ps(a); }
static inline VT vload(const float* p) { return _mm512_loadu_ps(p); }
static inline MT vmask(int64_t n) {
  return n >= 16 ? (MT)0xFFFF : (MT)((1u << (unsigned)n) - 1u);
}
static inline VT vloadm(const float* p, MT m) { return _mm512_maskz_loadu_ps(m, p); }
static inline void vstore(float* p, VT v) { _mm512_storeu_ps(p, v); }
static inline void vstorem(float* p, VT v, MT m) { _mm512_mask_storeu_ps(p, m, v); }
static inline VT vfma(VT a, VT b, VT c) { return _mm512_fmadd_ps(a, b, c); }
static inline VT vadd(VT a, VT b) { return _mm512_add_ps(a, b); }
#include __FILE__
}  // namespace avx512
}  // namespace gp
#pragma GCC pop_options

// ---------------------------------------------------------------- AVX2 instantiation
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace gp {
namespace avx2 {
using VT = __m256;
using MT = __m256i;
constexpr int W = 8;
constexpr int NREG = 16;
static inline VT vzero() { return _mm256_setzero_ps(); }
static inline VT vset1(float a) { return _mm256_set1_ps(a); }
static inline VT vload(const float* p) { return _mm256_loadu_ps(p); }
static inline MT vmask(int64_t n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32((int)std::min<int64_t>(n, 8)),
                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
static inline VT vloadm(const float* p, MT m) { return _mm256_maskload_ps(p, m); }
static inline void vstore(float* p, VT v) { _mm256_storeu_ps(p, v); }
static inline void vstorem(float* p, VT v, MT m) { _mm256_maskstore_ps(p, m, v); }
static inline VT vfma(VT a, VT b, VT c) { return _mm256_fmadd_ps(a, b, c); }
static inline VT vadd(VT a, VT b) { return _mm256_add_ps(a, b); }
#include __FILE__
}  // namespace avx2
}  // namespace gp
#pragma GCC pop_options

// ---------------------------------------------------------------- host side
namespace gp {

enum class Isa { NONE = 0, AVX2 = 1, AVX512 = 2 };

static Isa detect_isa() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bw"))
    return Isa::AVX512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::AVX2;
  return Isa::NONE;
}

static Isa g_best = detect_isa();
static Isa g_isa = g_best;

static const char* isa_name(Isa i) {
  return i == Isa::AVX512 ? "avx512" : i == Isa::AVX2 ? "avx2" : "none";
}

std::string get_isa() { return isa_name(g_isa); }

// Choose the instruction set ("avx512", "avx2", or "auto" for the best supported).
std::string set_isa(const std::string& name) {
  Isa want = name == "avx512" ? Isa::AVX512 : name == "avx2" ? Isa::AVX2 : g_best;
  TORCH_CHECK(name == "auto" || name == "avx512" || name == "avx2",
              "graphprune 1xN: unknown ISA '", name, "' (use auto, avx512 or avx2)");
  TORCH_CHECK((int)want <= (int)g_best, "graphprune 1xN: this CPU does not support ", name);
  g_isa = want;
  return isa_name(g_isa);
}

static int64_t env_int(const char* name, int64_t dflt) {
  const char* v = std::getenv(name);
  return v && *v ? std::atoll(v) : dflt;
}

static int vec_width() { return g_isa == Isa::AVX512 ? 16 : 8; }
static int pv_tile_px() { return g_isa == Isa::AVX512 ? avx512::pv_tile_px() : avx2::pv_tile_px(); }
static int ov_tile_px() { return g_isa == Isa::AVX512 ? avx512::ov_tile_px() : avx2::ov_tile_px(); }

static void run_job(Job& job) {
  int nth = std::max(1, at::get_num_threads());
  std::atomic<int64_t> next{0};
  job.next = &next;
  const int64_t total = job.n_mt * job.G;
  // a few chunks per thread: balance (and robustness to a descheduled thread) vs locality
  job.chunk = std::max<int64_t>(1, total / (4 * nth));
  const Isa isa = g_isa;
  auto body = [&](int tid, int nt) {
    if (isa == Isa::AVX512)
      avx512::run(job, tid, nt);
    else
      avx2::run(job, tid, nt);
  };
  if (nth == 1) {
    body(0, 1);
    return;
  }
#pragma omp parallel num_threads(nth)
  body(omp_get_thread_num(), omp_get_num_threads());
}

// Fill in tiling and item order once geometry and pointers are set.
static void plan_tiles(Job& job) {
  const int64_t C_eff = std::max<int64_t>(job.kept, 1);
  if (job.kind == Kind::PV) {
    job.tile = pv_tile_px();
    job.ntile_img = (job.L + job.tile - 1) / job.tile;
  } else {
    const int64_t pmax = ov_tile_px();
    job.ntile_img = (job.L + pmax - 1) / pmax;
    job.tile = pmax;
  }
  // pv: block the kept channels so one block's rows of a tile fit in about half of L1
  const int64_t span = job.toff.empty() ? 0 : job.toff.back() - job.toff.front();
  const int64_t ch_bytes = 4 * std::min(job.tile + span, job.tile * job.taps);
  job.jblock = std::max<int64_t>(8, env_int("GP_1XN_L1_KB", 24) * 1024 / std::max<int64_t>(1, ch_bytes));
  const int64_t ntiles = job.B * job.ntile_img;
  const int64_t px_per_tile = std::max<int64_t>(1, job.L / job.ntile_img);
  const int64_t target = env_int("GP_1XN_MT_PX", 192);
  job.mt_tiles = std::max<int64_t>(1, std::min<int64_t>(ntiles, target / px_per_tile));
  job.n_mt = (ntiles + job.mt_tiles - 1) / job.mt_tiles;
  // Re-read traffic of each order: weights once per macro tile vs activations once per group.
  const double wbytes = 4.0 * job.G * job.kept * job.taps * job.N;
  const double abytes = 4.0 * job.B * C_eff * job.L;
  const int64_t order = env_int("GP_1XN_ORDER", -1);
  job.g_outer = order >= 0 ? order == 1 : (job.n_mt * wbytes > job.G * abytes);
}

// Columns j in [lo, hi) of a plane row whose source column j*stride + shift lies in [0, W).
struct Span {
  int64_t lo, hi;
};
static Span valid_span(int64_t Wq, int64_t stride, int64_t shift, int64_t W) {
  int64_t lo = shift >= 0 ? 0 : (-shift + stride - 1) / stride;
  int64_t hi = W - 1 - shift < 0 ? 0 : (W - 1 - shift) / stride + 1;
  lo = std::min(lo, Wq);
  hi = std::max(lo, std::min(hi, Wq));
  return {lo, hi};
}

struct Geom {
  int64_t B, C, H, W, K, R, S, sh, sw, ph, pw, dh, dw, Ho, Wo;
};

// Build the planar (padded, phase-split) copy of x, or point at x when it can be read in place.
// Returns the tensor that owns the memory (may be x itself).
static at::Tensor prepare_planar(const at::Tensor& x, bool x_cl, const Geom& g, Job& job) {
  const int64_t rmax = (g.R - 1) * g.dh, smax = (g.S - 1) * g.dw;
  if (!x_cl && g.sh == 1 && g.sw == 1 && g.ph == 0 && g.pw == 0) {
    job.x = x.data_ptr<float>();
    job.Wq = g.W;
    job.cs = g.H * g.W;
    job.bs = g.C * g.H * g.W;
    job.ld = 1;
    job.toff.clear();
    for (int64_t r = 0; r < g.R; ++r)
      for (int64_t s = 0; s < g.S; ++s) job.toff.push_back(r * g.dh * g.W + s * g.dw);
    job.L = (g.Ho - 1) * job.Wq + g.Wo;
    return x;
  }
  // phase planes used by some tap
  std::vector<int> plane_of(g.sh * g.sw, -1);
  std::vector<std::pair<int64_t, int64_t>> planes;
  for (int64_t r = 0; r < g.R; ++r)
    for (int64_t s = 0; s < g.S; ++s) {
      int64_t a = (r * g.dh) % g.sh, b = (s * g.dw) % g.sw;
      if (plane_of[a * g.sw + b] < 0) {
        plane_of[a * g.sw + b] = (int)planes.size();
        planes.emplace_back(a, b);
      }
    }
  const int64_t Hq = g.Ho + rmax / g.sh, Wq = g.Wo + smax / g.sw;
  const int64_t npl = (int64_t)planes.size(), plane = Hq * Wq;
  job.Wq = Wq;
  job.cs = npl * plane;
  job.bs = g.C * job.cs;
  job.ld = 1;
  job.toff.clear();
  for (int64_t r = 0; r < g.R; ++r)
    for (int64_t s = 0; s < g.S; ++s) {
      int64_t a = (r * g.dh) % g.sh, b = (s * g.dw) % g.sw;
      job.toff.push_back(plane_of[a * g.sw + b] * plane + (r * g.dh / g.sh) * Wq +
                         (s * g.dw / g.sw));
    }
  job.L = (g.Ho - 1) * Wq + g.Wo;
  // + one vector of slack so unmasked loads past the last plane stay inside the buffer
  auto xq = at::empty({g.B * job.bs + 64}, x.options());
  float* dst = xq.data_ptr<float>();
  const float* src = x.data_ptr<float>();
  job.x = dst;
  std::memset(dst + g.B * job.bs, 0, 64 * sizeof(float));
  if (!x_cl) {
    at::parallel_for(0, g.B * g.C, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t bc = lo; bc < hi; ++bc)
        for (int64_t p = 0; p < npl; ++p) {
          const int64_t a = planes[p].first, bb = planes[p].second;
          const Span sp = valid_span(Wq, g.sw, bb - g.pw, g.W);
          float* d0 = dst + bc * job.cs + p * plane;
          const float* s0 = src + bc * g.H * g.W;
          for (int64_t i = 0; i < Hq; ++i) {
            float* d = d0 + i * Wq;
            const int64_t ih = i * g.sh + a - g.ph;
            if (ih < 0 || ih >= g.H) {
              std::memset(d, 0, Wq * sizeof(float));
              continue;
            }
            const float* srow = s0 + ih * g.W + bb - g.pw;
            std::memset(d, 0, sp.lo * sizeof(float));
            if (g.sw == 1)
              std::memcpy(d + sp.lo, srow + sp.lo, (sp.hi - sp.lo) * sizeof(float));
            else
              for (int64_t j = sp.lo; j < sp.hi; ++j) d[j] = srow[j * g.sw];
            std::memset(d + sp.hi, 0, (Wq - sp.hi) * sizeof(float));
          }
        }
    });
  } else {
    // x is NHWC in memory: transpose rows of pixels into channel planes, 16 channels at a time
    at::parallel_for(0, g.B * npl * Hq, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t row = lo; row < hi; ++row) {
        const int64_t b = row / (npl * Hq), p = (row / Hq) % npl, i = row % Hq;
        const int64_t a = planes[p].first, bb = planes[p].second;
        const int64_t ih = i * g.sh + a - g.ph;
        float* d0 = dst + b * job.bs + p * plane + i * Wq;
        const Span sp = (ih < 0 || ih >= g.H) ? Span{0, 0} : valid_span(Wq, g.sw, bb - g.pw, g.W);
        for (int64_t c = 0; c < g.C; ++c) {
          std::memset(d0 + c * job.cs, 0, sp.lo * sizeof(float));
          std::memset(d0 + c * job.cs + sp.hi, 0, (Wq - sp.hi) * sizeof(float));
        }
        const float* srow = src + ((b * g.H + ih) * g.W + bb - g.pw) * g.C;
        for (int64_t c0 = 0; c0 < g.C; c0 += 16) {
          const int64_t c1 = std::min(g.C, c0 + 16);
          for (int64_t j = sp.lo; j < sp.hi; ++j) {
            const float* s = srow + j * g.sw * g.C;
            for (int64_t c = c0; c < c1; ++c) d0[c * job.cs + j] = s[c];
          }
        }
      }
    });
  }
  return xq;
}

static void check_weights(const at::Tensor& values, const at::Tensor& indices,
                          const c10::optional<at::Tensor>& bias, int64_t n, int64_t C,
                          int64_t taps) {
  TORCH_CHECK(values.dim() == 3 && values.scalar_type() == at::kFloat && values.is_contiguous(),
              "graphprune 1xN: values must be a contiguous float32 [G, kept, R*S*N] tensor");
  TORCH_CHECK(indices.dim() == 2 && indices.scalar_type() == at::kInt &&
                  indices.is_contiguous(),
              "graphprune 1xN: indices must be a contiguous int32 [G, kept] tensor");
  TORCH_CHECK(values.size(0) == indices.size(0) && values.size(1) == indices.size(1),
              "graphprune 1xN: values and indices disagree on [G, kept]");
  TORCH_CHECK(values.size(2) == taps * n, "graphprune 1xN: values last dim ", values.size(2),
              " != R*S*N = ", taps * n);
  const int32_t* ip = indices.data_ptr<int32_t>();
  for (int64_t i = 0; i < indices.numel(); ++i)
    TORCH_CHECK(ip[i] >= 0 && ip[i] < C, "graphprune 1xN: index ", ip[i], " out of range [0, ",
                C, ")");
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() &&
                    bias->numel() == values.size(0) * n,
                "graphprune 1xN: bias must be contiguous float32 with K elements");
  }
}

static void fill_weights(Job& job, const at::Tensor& values, const at::Tensor& indices,
                         const c10::optional<at::Tensor>& bias, int64_t n) {
  job.w = values.data_ptr<float>();
  job.idx = indices.data_ptr<int32_t>();
  job.bias = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  job.N = n;
  job.G = values.size(0);
  job.kept = values.size(1);
  job.K = job.G * n;
}

// conv2d with a uniform 1xN block-sparse weight. x: [B, C, H, W] float32, NCHW-contiguous or
// channels_last; the output has the same memory format as x.
at::Tensor conv2d_1xn(const at::Tensor& x_in, const at::Tensor& values,
                         const at::Tensor& indices, const c10::optional<at::Tensor>& bias,
                         int64_t sh, int64_t sw, int64_t ph, int64_t pw, int64_t dh, int64_t dw,
                         int64_t n, int64_t R, int64_t S) {
  TORCH_CHECK(g_isa != Isa::NONE, "graphprune 1xN: CPU lacks AVX2/FMA");
  TORCH_CHECK(x_in.dim() == 4 && x_in.scalar_type() == at::kFloat && x_in.device().is_cpu(),
              "graphprune 1xN: x must be a 4-D float32 CPU tensor");
  TORCH_CHECK(sh > 0 && sw > 0 && dh > 0 && dw > 0 && ph >= 0 && pw >= 0 && n > 0,
              "graphprune 1xN: bad stride/padding/dilation/N");
  const bool x_cl = !x_in.is_contiguous() &&
                    x_in.is_contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor x = x_cl ? x_in : x_in.contiguous();
  Geom g{};
  g.B = x.size(0); g.C = x.size(1); g.H = x.size(2); g.W = x.size(3);
  g.R = R; g.S = S; g.sh = sh; g.sw = sw; g.ph = ph; g.pw = pw; g.dh = dh; g.dw = dw;
  g.Ho = (g.H + 2 * ph - dh * (R - 1) - 1) / sh + 1;
  g.Wo = (g.W + 2 * pw - dw * (S - 1) - 1) / sw + 1;
  TORCH_CHECK(g.Ho > 0 && g.Wo > 0, "graphprune 1xN: output would be empty");
  check_weights(values, indices, bias, n, g.C, R * S);
  g.K = values.size(0) * n;
  auto opts = x.options();
  at::Tensor y = x_cl ? at::empty({g.B, g.K, g.Ho, g.Wo},
                                        opts.memory_format(at::MemoryFormat::ChannelsLast))
                         : at::empty({g.B, g.K, g.Ho, g.Wo}, opts);
  if (g.B == 0) return y;

  Job job;
  fill_weights(job, values, indices, bias, n);
  job.taps = R * S;
  job.B = g.B; job.Ho = g.Ho; job.Wo = g.Wo;
  job.y = y.data_ptr<float>();
  job.y_cl = x_cl;
  job.kind = (x_cl && n % vec_width() == 0) ? Kind::OV : Kind::PV;
  at::Tensor keep;
  const bool direct_nhwc = job.kind == Kind::OV && x_cl && R == 1 && S == 1 && sh == 1 &&
                           sw == 1 && ph == 0 && pw == 0;
  if (direct_nhwc) {
    job.x = x.data_ptr<float>();
    job.cs = 1; job.ld = g.C; job.bs = g.H * g.W * g.C;
    job.Wq = g.W; job.L = g.H * g.W; job.toff = {0};
  } else {
    keep = prepare_planar(x, x_cl, g, job);
  }
  plan_tiles(job);
  run_job(job);
  return y;
}

// linear with a uniform 1xN block-sparse weight: x [M, C] float32 -> [M, K].
at::Tensor linear_1xn(const at::Tensor& x_in, const at::Tensor& values,
                         const at::Tensor& indices, const c10::optional<at::Tensor>& bias,
                         int64_t n) {
  TORCH_CHECK(g_isa != Isa::NONE, "graphprune 1xN: CPU lacks AVX2/FMA");
  TORCH_CHECK(x_in.dim() == 2 && x_in.scalar_type() == at::kFloat && x_in.device().is_cpu(),
              "graphprune 1xN: x must be a 2-D float32 CPU tensor");
  const at::Tensor x = x_in.contiguous();
  const int64_t M = x.size(0), C = x.size(1);
  check_weights(values, indices, bias, n, C, 1);
  Job job;
  fill_weights(job, values, indices, bias, n);
  auto y = at::empty({M, job.K}, x.options());
  if (M == 0) return y;
  job.taps = 1;
  job.B = 1; job.Ho = 1; job.Wo = M;
  job.y = y.data_ptr<float>();
  job.y_cl = true;  // [M, K] is NHWC with H = 1, W = M
  job.kind = n % vec_width() == 0 ? Kind::OV : Kind::PV;
  at::Tensor keep;
  if (job.kind == Kind::OV) {
    job.x = x.data_ptr<float>();
    job.cs = 1; job.ld = C; job.bs = M * C;
    job.Wq = M; job.L = M; job.toff = {0};
  } else {
    Geom g{1, C, 1, M, job.K, 1, 1, 1, 1, 0, 0, 1, 1, 1, M};
    keep = prepare_planar(x.view({1, 1, M, C}).permute({0, 3, 1, 2}), true, g, job);
  }
  plan_tiles(job);
  run_job(job);
  return y;
}

}  // namespace gp

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  m.def("conv2d_1xn", &gp::conv2d_1xn, "1xN block-sparse conv2d",
        py::call_guard<py::gil_scoped_release>());
  m.def("linear_1xn", &gp::linear_1xn, "1xN block-sparse linear",
        py::call_guard<py::gil_scoped_release>());
  m.def("get_isa", &gp::get_isa, "instruction set in use");
  m.def("set_isa", &gp::set_isa, "choose instruction set: auto, avx512, avx2");
}

#else  // ======================================================= ISA-generic kernel body

static constexpr int pv_nc() { return W == 16 ? 8 : 4; }  // outputs per pv chunk
static constexpr int pv_vmax(int nc) {
  return std::max(1, std::min(6, (NREG - 4) / nc));
}
static constexpr int ov_nv() { return 2; }  // output vectors per ov chunk (max)
static constexpr int ov_pmax(int nv) { return std::min(12, (NREG - 4) / nv); }
int pv_tile_px() { return W * pv_vmax(pv_nc()); }
int ov_tile_px() { return ov_pmax(ov_nv()); }

// pv micro-kernel: out[n][p] = init[n][p] + sum_q w[q][n] * x[off[q] + p] over q = (j, t) pairs,
// NC outputs x V vectors of W pixels, where init is out itself (acc_in) or the bias; lanes of
// the last vector past `rem` are not loaded or stored. off[q] = idx[j] * cs + toff[t].
template <int NC, int V>
static void pv_tile(const float* __restrict x, const int64_t* __restrict off, int64_t nq,
                    const float* __restrict w, int64_t N, int64_t rem,
                    const float* __restrict bias, float* __restrict out, int64_t ldo,
                    bool acc_in) {
  VT acc[NC][V];
  const MT m = vmask(rem);
  if (acc_in) {
    GP_UNROLL for (int n = 0; n < NC; ++n) {
      GP_UNROLL for (int v = 0; v < V - 1; ++v) acc[n][v] = vload(out + n * ldo + v * W);
      acc[n][V - 1] = vloadm(out + n * ldo + (V - 1) * W, m);
    }
  } else {
    GP_UNROLL for (int n = 0; n < NC; ++n) {
      const VT b0 = bias ? vset1(bias[n]) : vzero();
      GP_UNROLL for (int v = 0; v < V; ++v) acc[n][v] = b0;
    }
  }
  for (int64_t q = 0; q < nq; ++q) {
    const float* xa = x + off[q];
    const float* wq = w + q * N;
    VT a[V];
    GP_UNROLL for (int v = 0; v < V - 1; ++v) a[v] = vload(xa + v * W);
    a[V - 1] = vloadm(xa + (V - 1) * W, m);
    GP_UNROLL for (int n = 0; n < NC; ++n) {
      const VT b = vset1(wq[n]);
      GP_UNROLL for (int v = 0; v < V; ++v) acc[n][v] = vfma(a[v], b, acc[n][v]);
    }
  }
  GP_UNROLL for (int n = 0; n < NC; ++n) {
    GP_UNROLL for (int v = 0; v < V - 1; ++v) vstore(out + n * ldo + v * W, acc[n][v]);
    vstorem(out + n * ldo + (V - 1) * W, acc[n][V - 1], m);
  }
}

// ov micro-kernel: P pixels x NV*W outputs; out[p] is a row pointer, or null for a junk pixel.
// Pixel p of pair q is read at x[off[q] + p * ld]. U independent accumulator sets over q hide
// the FMA latency when P*NV is small.
template <int NV, int P, int U, bool UNIT>
static void ov_tile(const float* __restrict x, int64_t ld, const int64_t* __restrict off,
                    int64_t nq, const float* __restrict w, int64_t N,
                    const float* __restrict bias, float* const* out) {
  VT acc[U][P][NV];
  GP_UNROLL for (int u = 0; u < U; ++u)
    GP_UNROLL for (int p = 0; p < P; ++p)
      GP_UNROLL for (int v = 0; v < NV; ++v)
        acc[u][p][v] = (u == 0 && bias) ? vload(bias + v * W) : vzero();
  const int64_t step = UNIT ? 1 : ld;
  int64_t q = 0;
  for (; q + U <= nq; q += U) {
    GP_UNROLL for (int u = 0; u < U; ++u) {
      const float* xa = x + off[q + u];
      const float* wq = w + (q + u) * N;
      VT b[NV];
      GP_UNROLL for (int v = 0; v < NV; ++v) b[v] = vload(wq + v * W);
      GP_UNROLL for (int p = 0; p < P; ++p) {
        const VT a = vset1(xa[p * step]);
        GP_UNROLL for (int v = 0; v < NV; ++v) acc[u][p][v] = vfma(a, b[v], acc[u][p][v]);
      }
    }
  }
  for (; q < nq; ++q) {
    const float* xa = x + off[q];
    const float* wq = w + q * N;
    VT b[NV];
    GP_UNROLL for (int v = 0; v < NV; ++v) b[v] = vload(wq + v * W);
    GP_UNROLL for (int p = 0; p < P; ++p) {
      const VT a = vset1(xa[p * step]);
      GP_UNROLL for (int v = 0; v < NV; ++v) acc[0][p][v] = vfma(a, b[v], acc[0][p][v]);
    }
  }
  GP_UNROLL for (int p = 0; p < P; ++p) {
    if (!out[p]) continue;
    GP_UNROLL for (int v = 0; v < NV; ++v) {
      VT s = acc[0][p][v];
      GP_UNROLL for (int u = 1; u < U; ++u) s = vadd(s, acc[u][p][v]);
      vstore(out[p] + v * W, s);
    }
  }
}

using PvFn = void (*)(const float*, const int64_t*, int64_t, const float*, int64_t, int64_t,
                      const float*, float*, int64_t, bool);
using OvFn = void (*)(const float*, int64_t, const int64_t*, int64_t, const float*, int64_t,
                      const float*, float* const*);

// off[j * taps + t] = idx[j] * cs + toff[t] for output group g.
static void fill_offsets(const Job& jb, int64_t g, int64_t* off) {
  const int32_t* ig = jb.idx + g * jb.kept;
  for (int64_t j = 0; j < jb.kept; ++j)
    for (int64_t t = 0; t < jb.taps; ++t) off[j * jb.taps + t] = ig[j] * jb.cs + jb.toff[t];
}

template <int NC, int... Vs>
static constexpr std::array<PvFn, 7> pv_row(std::integer_sequence<int, Vs...>) {
  return {{&pv_tile<NC, std::max(1, std::min(Vs, pv_vmax(NC)))>...}};
}
template <int... NCs>
static constexpr std::array<std::array<PvFn, 7>, 9> pv_table(std::integer_sequence<int, NCs...>) {
  return {{pv_row<std::max(1, NCs)>(std::make_integer_sequence<int, 7>{})...}};
}
static const std::array<std::array<PvFn, 7>, 9> kPv =
    pv_table(std::make_integer_sequence<int, 9>{});

static constexpr int ov_u(int nv, int p) { return nv * p >= 8 ? 1 : nv * p >= 4 ? 2 : 4; }
template <int NV, bool UNIT, int... Ps>
static constexpr std::array<OvFn, 13> ov_row(std::integer_sequence<int, Ps...>) {
  return {{&ov_tile<NV, std::max(1, std::min(Ps, ov_pmax(NV))),
                    ov_u(NV, std::max(1, std::min(Ps, ov_pmax(NV)))), UNIT>...}};
}
static const std::array<OvFn, 13> kOv1u = ov_row<1, true>(std::make_integer_sequence<int, 13>{});
static const std::array<OvFn, 13> kOv2u = ov_row<2, true>(std::make_integer_sequence<int, 13>{});
static const std::array<OvFn, 13> kOv1s = ov_row<1, false>(std::make_integer_sequence<int, 13>{});
static const std::array<OvFn, 13> kOv2s = ov_row<2, false>(std::make_integer_sequence<int, 13>{});

// Copy a pv tile buffer buf[n][f - f0] (flat positions f0..f0+cnt) into y, dropping junk
// columns; NCHW or NHWC.
static void pv_writeback(const Job& jb, const float* buf, int64_t ldb, int64_t nc, int64_t k0,
                         int64_t b, int64_t f0, int64_t cnt) {
  const int64_t HoWo = jb.Ho * jb.Wo;
  int64_t f = f0;
  const int64_t end = f0 + cnt;
  while (f < end) {
    const int64_t oh = f / jb.Wq, ow = f - oh * jb.Wq;
    const int64_t row_end = std::min(end, oh * jb.Wq + jb.Wq);
    const int64_t valid_end = std::min(row_end, oh * jb.Wq + jb.Wo);
    if (ow < jb.Wo) {
      const int64_t len = valid_end - f, pix = oh * jb.Wo + ow;
      if (!jb.y_cl) {
        for (int64_t n = 0; n < nc; ++n)
          std::memcpy(jb.y + (b * jb.K + k0 + n) * HoWo + pix, buf + n * ldb + (f - f0),
                      len * sizeof(float));
      } else {
        for (int64_t q = 0; q < len; ++q) {
          float* d = jb.y + (b * HoWo + pix + q) * jb.K + k0;
          for (int64_t n = 0; n < nc; ++n) d[n] = buf[n * ldb + (f - f0) + q];
        }
      }
    }
    f = row_end;
  }
}

static void pv_item(const Job& jb, int64_t mt, int64_t g, float* buf, const int64_t* off) {
  const int64_t NC = pv_nc(), V = pv_vmax(NC), TP = jb.tile;
  const int64_t t_lo = mt * jb.mt_tiles;
  const int64_t t_hi = std::min(jb.B * jb.ntile_img, t_lo + jb.mt_tiles);
  const int64_t HoWo = jb.Ho * jb.Wo;
  const bool direct = !jb.y_cl && jb.Wq == jb.Wo;
  const float* wg = jb.w + g * jb.kept * jb.taps * jb.N;
  // tile, then blocks of kept channels (whose rows of the tile stay in L1), then output chunks
  for (int64_t tl = t_lo; tl < t_hi; ++tl) {
    const int64_t b = tl / jb.ntile_img, f0 = (tl % jb.ntile_img) * TP;
    const int64_t cnt = std::min(TP, jb.L - f0);
    const int64_t vused = (cnt + W - 1) / W, rem = cnt - (vused - 1) * W;
    const float* xb = jb.x + b * jb.bs + f0;
    for (int64_t j0 = 0; j0 < std::max<int64_t>(jb.kept, 1); j0 += jb.jblock) {
      const int64_t q0 = j0 * jb.taps;
      const int64_t nq = (std::min(jb.kept, j0 + jb.jblock) - j0) * jb.taps;
      for (int64_t c0 = 0; c0 < jb.N; c0 += NC) {
        const int64_t nc = std::min(NC, jb.N - c0), k0 = g * jb.N + c0;
        float* out = direct ? jb.y + (b * jb.K + k0) * HoWo + f0 : buf + c0 * TP;
        const int64_t ldo = direct ? HoWo : TP;
        kPv[nc][std::min<int64_t>(vused, V)](xb, off + q0, nq, wg + q0 * jb.N + c0, jb.N, rem,
                                             jb.bias ? jb.bias + k0 : nullptr, out, ldo, j0 > 0);
      }
    }
    if (!direct)
      for (int64_t c0 = 0; c0 < jb.N; c0 += NC)
        pv_writeback(jb, buf + c0 * TP, TP, std::min(NC, jb.N - c0), g * jb.N + c0, b, f0, cnt);
  }
}

static void ov_item(const Job& jb, int64_t mt, int64_t g, const int64_t* off) {
  const int64_t t_lo = mt * jb.mt_tiles;
  const int64_t t_hi = std::min(jb.B * jb.ntile_img, t_lo + jb.mt_tiles);
  const int64_t HoWo = jb.Ho * jb.Wo;
  const bool unit = jb.ld == 1;
  float* outp[16];
  for (int64_t tl = t_lo; tl < t_hi; ++tl) {
    const int64_t b = tl / jb.ntile_img, i = tl % jb.ntile_img;
    const int64_t f0 = i * jb.L / jb.ntile_img, f1 = (i + 1) * jb.L / jb.ntile_img;
    const int64_t P = f1 - f0;
    const float* xb = jb.x + b * jb.bs + f0 * jb.ld;
    for (int64_t c0 = 0; c0 < jb.N; c0 += ov_nv() * W) {
      const int64_t nv = std::min<int64_t>(ov_nv(), (jb.N - c0) / W), k0 = g * jb.N + c0;
      for (int64_t p = 0; p < P; ++p) {
        const int64_t f = f0 + p, oh = f / jb.Wq, ow = f - oh * jb.Wq;
        outp[p] = ow < jb.Wo ? jb.y + (b * HoWo + oh * jb.Wo + ow) * jb.K + k0 : nullptr;
      }
      const float* wg = jb.w + g * jb.kept * jb.taps * jb.N + c0;
      const float* bg = jb.bias ? jb.bias + k0 : nullptr;
      const auto& tab = nv == 2 ? (unit ? kOv2u : kOv2s) : (unit ? kOv1u : kOv1s);
      tab[P](xb, jb.ld, off, jb.kept * jb.taps, wg, jb.N, bg, outp);
    }
  }
}

// Claim chunks of (macro tile x group) items until none are left.
void run(const Job& jb, int tid, int nth) {
  (void)tid;
  (void)nth;
  const int64_t total = jb.n_mt * jb.G;
  std::vector<float> buf(jb.kind == Kind::PV ? jb.N * jb.tile + W : 0);
  std::vector<int64_t> off(jb.kept * jb.taps + 1);
  int64_t g_filled = -1;
  for (;;) {
    const int64_t lo = jb.next->fetch_add(1, std::memory_order_relaxed) * jb.chunk;
    if (lo >= total) break;
    const int64_t hi = std::min(total, lo + jb.chunk);
    for (int64_t it = lo; it < hi; ++it) {
      const int64_t mt = jb.g_outer ? it % jb.n_mt : it / jb.G;
      const int64_t g = jb.g_outer ? it / jb.n_mt : it % jb.G;
      if (g != g_filled) {
        fill_offsets(jb, g, off.data());
        g_filled = g;
      }
      if (jb.kind == Kind::PV)
        pv_item(jb, mt, g, buf.data(), off.data());
      else
        ov_item(jb, mt, g, off.data());
    }
  }
}

#endif  // GP_ONEXN_BODY
