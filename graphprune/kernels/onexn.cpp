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
// input) is read in place with ld = C. Masked in-place mode: NCHW stride 1 with padding (the 3x3
// convs of a ResNet) is also read in place, rows of W, with per-tap lane masks that load the
// lanes whose tap falls in the padding as zeros: no copy and no junk columns; on tiles away from
// the first and last rows only the left and right taps of a 3x3 mask (six masks per tile, kept
// in registers). Stacked mode: for small images of a batch (where most vectors touch a first or
// last row) the batch is copied unpadded with its images side by side and the masked loop runs
// over them as one long row of pixels (vectors and tiles may span two images).
//
// Linear layers (and NHWC 1x1 convs) with many input channels use ov channel-blocked (ovb): per
// tile of 24 rows, one block of 256 input channels is copied into a 24 KB buffer that stays in
// L1 while every group adds its kept channels of the block into its outputs (partial sums in y),
// instead of each group reading its kept channels of the whole rows from L2 (measured 1.2-1.35x
// faster on ViT-B linears).
//
// Two micro-kernels:
//   pv ("pixel vectorised"): NC outputs x V vectors of W pixels; writes NCHW in place (one
//     masked store per output row a vector touches, junk columns masked off; one per vector
//     where the plane has no junk columns).
//   ov ("output vectorised"): P pixels x NV vectors of W outputs (the last one masked when
//     N % W != 0); natural NHWC store. Used for NHWC output with N % W == 0 or few pixels
//     (linear layers, GEMV) and for the last few pixels of each image under pv.
// The driver cuts the work into items: a unit (a run of pixel tiles of one image) x a block of
// output groups (all groups unless there are too few units to keep the threads busy; all items
// equal work: uniform 1xN). A unit's activations of all channels are sized to stay in L2
// (GP_1XN_L2_KB) while every group of the block sweeps them; within a group: tile, then an
// L1-sized block of kept channels, then the output chunks of the group. OpenMP threads claim
// chunks of items from atomic counters (one chunk ahead with GP_1XN_PF=1, so a thread knows
// the next unit to prefetch): the items are cut into one contiguous range per thread, which
// its thread drains first (under unit-outer order: the same pixels on every call, whose rows
// and outputs a 1x1 chain then finds in that core's L2), then it takes what is left of the
// other ranges (GP_1XN_AFFINE: 1 for pv jobs, 2 for every job, 0 one shared counter).
// Epilogue (optional, fused into the stores so the output is written once): y = relu(conv +
// bias + residual), the residual laid out like y; under pv with NCHW output it runs on the last
// block of kept channels, elsewhere where the finished sums are written.
// When a tile's rows of all channels do not fit in L1 (1x1 layers with many input channels),
// the pv micro-kernel prefetches the rows of the (channel, tap) pair a few iterations ahead into
// L1; the hardware prefetchers cannot follow hundreds of rows. For the same reason, a 1x1 layer
// whose activations do not fit in L2 also has each pair pull its row of the unit's next tile into
// L2 (the first group to reach a tile would otherwise wait on L3 or memory for every row).
// Padded / strided NCHW input whose planar copy would not fit in L2 runs in row-block mode: a
// unit is a block of output rows, and the thread that claims it first packs the plane rows it
// reads (all channels) into its own L2-sized buffer, so the copy never goes back to memory.
// (Only when the weights of all groups fit in L2 too; else the whole batch is packed up front
// and the item order may put groups outer, by estimated re-read traffic.)
//
// Tuning knobs (environment, read per call): GP_1XN_L2_KB (activation bytes per unit, 1024),
// GP_1XN_SMALL_KB (activations of the whole batch up to this size count as L2-resident: units
// are not cut to L2 size; 1536), GP_1XN_MT_PX (max pixels per unit, 4096), GP_1XN_L1_KB
// (activation bytes per channel block, 24), GP_1XN_PFD (L1 prefetch distance in pairs; 0
// disables; default 8 for 1x1, R*S else), GP_1XN_PF (1 enables a software L2 prefetch of the
// next unit; off by default: it loses when the activations are already in L3, as between
// layers), GP_1XN_FUSE_KB (planar copies above this size use row-block mode,
// 1024), GP_1XN_RB_WKB (max weight bytes of all groups for row-block mode, 384), GP_1XN_ORDER
// (1 forces group-outer item order, 0 unit-outer; default by traffic), GP_1XN_TAIL (an image's
// last pixel vector with at most this many pixels runs on the ov kernel; default W/2),
// GP_1XN_MASKED (masked in-place mode: 0 never, 2 whenever it applies, 1 unless the batch is
// stacked), GP_1XN_STACK (stacked mode: 0 never, 2 in preference to the masked in-place mode, 1
// for batches of more than one image where the 3x3 fast path covers under 85% of the pixel
// vectors), GP_1XN_OVB (channel-blocked
// ov: 0 never, 2 whenever it applies, 1 when a tile's rows of all channels exceed GP_1XN_L1_KB),
// GP_1XN_OVB_WKB (its weight bytes per group block, 4096 KB), GP_1XN_OVB_ROWS (its rows per
// unit, 192), GP_1XN_OVB_WPF (its weight prefetch distance, 512 bytes), GP_1XN_PF2 (the L2
// prefetch of 1x1 rows, in tiles ahead: 0 off; default 1 where it applies, see plan_tiles),
// GP_1XN_WPFD (the masked loop's L1 prefetch of its weights, in kept channels ahead: 0 off; 4),
// GP_1XN_AFFINE (one range of items per thread: 1 pv jobs, 2 every job, 0 none).
//
// Winograd (conv2d_1xn_wino): a 3x3 stride-1 conv as 16 block-sparse 1x1 convs over transformed
// tiles, one job whose "images" are the 16 taps, each with its own weights (Job::w_bs, y_bs);
// see the comment above it. onexn.py decides when it runs (GP_1XN_WINO).
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
#include <type_traits>
#include <utility>
#include <vector>

#define GP_UNROLL _Pragma("GCC unroll 32")
// ovb (see Job::ovb): input channels per block, the row stride of its copy of a tile (24 rows of
// 1 KB with AVX-512: half of L1)
constexpr int64_t kOvbCb = 256;

namespace gp {

// Columns j in [lo, hi) of a plane row whose source column j*stride + shift lies in [0, W).
struct Span {
  int64_t lo, hi;
};
static inline Span valid_span(int64_t Wq, int64_t stride, int64_t shift, int64_t W) {
  int64_t lo = shift >= 0 ? 0 : (-shift + stride - 1) / stride;
  int64_t hi = W - 1 - shift < 0 ? 0 : (W - 1 - shift) / stride + 1;
  lo = std::min(lo, Wq);
  hi = std::max(lo, std::min(hi, Wq));
  return {lo, hi};
}

struct Geom {
  int64_t B, C, H, W, K, R, S, sh, sw, ph, pw, dh, dw, Ho, Wo;
};

// The copy of x into zero-padded, phase-split channel planes: either of the whole batch up front
// (run by the kernel's own threads), or, in row-block mode (NCHW input), of one block of plane
// rows at a time into a thread's L2-sized buffer just before the block is used.
struct Pack {
  const float* src = nullptr;
  float* dst = nullptr;
  bool from_nhwc = false;
  bool stacked = false;  // unpadded planes, images side by side: (b, c) at dst + c*cs + b*plane
  Geom g{};
  std::vector<std::pair<int64_t, int64_t>> planes;  // (row phase, column phase)
  int64_t Hq = 0, Wq = 0, plane = 0, cs = 0, bs = 0;
  int64_t units = 0;  // NCHW: one (image, channel); NHWC: one (image, plane, row)
};

// Plane rows [i0, i1) of channels [c_lo, c_hi) of image b, every phase plane, from NCHW x into
// dst: row i of plane p of channel c goes to dst + c * dcs + p * dplane + (i - i0) * Wq.
static void pack_rows_nchw(const Pack& pk, int64_t b, int64_t c_lo, int64_t c_hi, int64_t i0,
                           int64_t i1, float* dst, int64_t dplane, int64_t dcs) {
  const Geom& g = pk.g;
  for (int64_t c = c_lo; c < c_hi; ++c)
    for (int64_t p = 0; p < (int64_t)pk.planes.size(); ++p) {
      const int64_t a = pk.planes[p].first, bb = pk.planes[p].second;
      const Span sp = valid_span(pk.Wq, g.sw, bb - g.pw, g.W);
      float* d0 = dst + c * dcs + p * dplane;
      const float* s0 = pk.src + (b * g.C + c) * g.H * g.W;
      for (int64_t i = i0; i < i1; ++i) {
        // plain loops, not memcpy/memset: rows are short and the calls would dominate
        float* __restrict d = d0 + (i - i0) * pk.Wq;
        const int64_t ih = i * g.sh + a - g.ph;
        const bool row_ok = ih >= 0 && ih < g.H;
        const int64_t lo_j = row_ok ? sp.lo : pk.Wq, hi_j = row_ok ? sp.hi : pk.Wq;
        const float* __restrict srow = s0 + ih * g.W + bb - g.pw;
        for (int64_t j = 0; j < lo_j; ++j) d[j] = 0.f;
        if (g.sw == 1)
          for (int64_t j = lo_j; j < hi_j; ++j) d[j] = srow[j];
        else
          for (int64_t j = lo_j; j < hi_j; ++j) d[j] = srow[j * g.sw];
        for (int64_t j = hi_j; j < pk.Wq; ++j) d[j] = 0.f;
      }
    }
}

static void pack_nchw(const Pack& pk, int64_t lo, int64_t hi) {
  for (int64_t bc = lo; bc < hi; ++bc) {
    const int64_t b = bc / pk.g.C, c = bc % pk.g.C;
    pack_rows_nchw(pk, b, c, c + 1, 0, pk.Hq, pk.dst + b * pk.bs, pk.plane, pk.cs);
  }
}

enum class Kind { PV, OV };

// One thread's range of item chunks [next, hi), claimed one chunk at a time by fetch_add.
struct alignas(64) Range {
  std::atomic<int64_t> next{0};
  int64_t hi = 0;
};

struct Job {
  // activations
  const float* x = nullptr;
  int64_t bs = 0, cs = 0, ld = 1;
  std::vector<int64_t> toff;        // flat offset of each tap
  std::vector<int64_t> tplane, trc; // planar input: toff[t] = tplane[t] * plane + trc[t]
  // masked in-place mode (NCHW stride-1 conv with padding, read unpadded): bit k of
  // mbits[v * taps + t] says whether lane k of pixel vector v (flat f = v*W + k) reads inside the
  // image at tap t; the other lanes are loaded as zeros (the padding)
  const uint16_t* mbits = nullptr;
  std::vector<uint16_t> mbits_store;
  // stacked mode (masked, on a copy): the n_img images of the batch lie side by side along the
  // flat pixel axis (image i at f = i * Ho*Wo, Ho = H, Wo = W), so a pixel vector or a tile may
  // span two images; the output is still NCHW (see pv_store_plan)
  int64_t n_img = 1;
  // 3x3, pad 1, dilation 1, same size: simple3[v] when pixel vector v is full and only its left
  // and right taps mask lanes, as on the middle row (no lane in the first or last row); else empty
  std::vector<uint8_t> simple3;
  int64_t taps = 1, Wq = 1, L = 1;
  // weights
  const float* w = nullptr;
  int64_t w_bs = 0;  // floats between the weights of consecutive images (Winograd: one per tap)
  const int32_t* idx = nullptr;
  bool idx_sorted = false;  // every group's idx strictly increasing (as onexn.py packs them)
  const float* bias = nullptr;
  int64_t N = 1, G = 1, kept = 0, K = 1;
  // output
  float* y = nullptr;
  int64_t y_bs = 0;  // NCHW output: floats per image (K * Ho * Wo, or more: Winograd pads it)
  bool y_cl = false;
  // epilogue, applied once a pixel's sum is complete: y = act(sum + bias + res)
  const float* res = nullptr;  // residual laid out like y (same sizes and memory format)
  bool relu = false;
  int64_t B = 1, Ho = 1, Wo = 1;
  // tiling: work items are (unit, group block); a unit is a run of tiles of one image
  Kind kind = Kind::PV;
  int64_t tile = 1;      // pv: pixels per tile; ov: max pixels per tile
  int64_t ntile_img = 1; // tiles per image
  int64_t mt_tiles = 1;  // tiles per unit (not in row-block mode)
  int64_t n_blk = 1;     // units per image
  int64_t n_units = 1;   // units in all (B * n_blk)
  int64_t n_gb = 1;      // group blocks per unit
  bool g_outer = false;  // item order: (group block, unit) instead of (unit, group block)
  int64_t jblock = 1;    // pv: kept channels per L1 block
  int64_t tail_max = 0;  // pv: an image's last vector with at most this many pixels goes to ov
  int64_t C = 1;         // input channels
  bool pf = false;       // pv: prefetch the next unit's rows (all channels) into L2
  int64_t pfd = 0;       // pv: L1 prefetch distance in (channel, tap) pairs; 0 = off
  int64_t pf2 = 0;       // pv, 1x1: L2 prefetch of each pair's row this many floats ahead
  int64_t wpf = 0;       // pv, masked tap-outer loop: L1 weight prefetch, floats ahead; 0 = off
  int64_t pf_start = 0, pf_extra = 0;  // prefetch window: floats before / after a unit's pixels
  // row-block mode: a unit is a block of rb_rows output rows; its plane rows (loc_rows of them,
  // all channels) are packed by the thread that claims it into its own buffer
  bool rb = false;
  const Pack* pk = nullptr;
  int64_t rb_rows = 1, loc_rows = 0, loc_plane = 0, loc_floats = 0;
  int64_t chunk = 1;     // items handed to a thread at a time
  // ov, channel-blocked (1x1 reading rows of all C channels in place: linear, NHWC 1x1 conv):
  // a tile's rows of one block of kOvbCb input channels stay in L1 while every group of the
  // item sweeps them, summing into y block by block; group g's kept channels in block k are
  // j in [cbound[g * (ncb + 1) + k], cbound[g * (ncb + 1) + k + 1])
  bool ovb = false;
  int64_t ncb = 0, ovb_wpf = 512;
  std::vector<int32_t> cbound;
  // chunk counters: thread t first drains the chunks of range t (contiguous items: its own
  // pixels under unit-outer order), then takes what is left of the others' ranges
  Range* ranges = nullptr;
  int n_ranges = 1;
};

// Unit u: image b and its flat pixel range [fa, fb) (pv), or tile range [fa, fb) (ov); row0 is
// the first plane row of a row-block unit.
struct UnitRange {
  int64_t b, fa, fb, row0;
};
static inline UnitRange unit_range(const Job& jb, int64_t u) {
  const int64_t b = u / jb.n_blk, k = u % jb.n_blk;
  if (jb.rb) {
    const int64_t oh0 = k * jb.rb_rows, oh1 = std::min(jb.Ho, oh0 + jb.rb_rows);
    return {b, oh0 * jb.Wq, (oh1 - 1) * jb.Wq + jb.Wo, oh0};
  }
  const int64_t t0 = k * jb.mt_tiles, t1 = std::min(jb.ntile_img, t0 + jb.mt_tiles);
  if (jb.kind == Kind::PV) return {b, t0 * jb.tile, std::min(jb.L, t1 * jb.tile), 0};
  return {b, t0, t1, 0};
}

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
static inline VT vloadm_into(VT old, const float* p, MT m) {
  return _mm512_mask_loadu_ps(old, m, p);
}
static inline MT vmask_range(int64_t lo, int64_t hi) { return (MT)(vmask(hi) & ~vmask(lo)); }
// lane k on where bit k of *p is set (kmovw from memory: a load, no port-5 uop)
static inline MT bits_mask(const uint16_t* p) {
  MT k;  // (gcc turns _load_mask16 into movzwl + kmovw from a GPR, a port-5 uop per load)
  __asm__("kmovw %1, %0" : "=k"(k) : "m"(*p));
  return k;
}
static inline void vstore(float* p, VT v) { _mm512_storeu_ps(p, v); }
static inline void vstorem(float* p, VT v, MT m) { _mm512_mask_storeu_ps(p, m, v); }
static inline VT vfma(VT a, VT b, VT c) { return _mm512_fmadd_ps(a, b, c); }
static inline VT vadd(VT a, VT b) { return _mm512_add_ps(a, b); }
static inline VT vmax(VT a, VT b) { return _mm512_max_ps(a, b); }
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
static inline VT vloadm_into(VT old, const float* p, MT m) {
  return _mm256_blendv_ps(old, _mm256_maskload_ps(p, m), _mm256_castsi256_ps(m));
}
static inline MT vmask_range(int64_t lo, int64_t hi) {
  return _mm256_andnot_si256(vmask(lo), vmask(hi));
}
static inline MT bits_mask(const uint16_t* p) {
  const __m256i bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  return _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32((int)*p), bit), bit);
}
static inline void vstore(float* p, VT v) { _mm256_storeu_ps(p, v); }
static inline void vstorem(float* p, VT v, MT m) { _mm256_maskstore_ps(p, m, v); }
static inline VT vfma(VT a, VT b, VT c) { return _mm256_fmadd_ps(a, b, c); }
static inline VT vadd(VT a, VT b) { return _mm256_add_ps(a, b); }
static inline VT vmax(VT a, VT b) { return _mm256_max_ps(a, b); }
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
static int pv_tile_px() {
  return g_isa == Isa::AVX512 ? avx512::pv_tile_px() : avx2::pv_tile_px();
}
static int ov_tile_px() {
  return g_isa == Isa::AVX512 ? avx512::ov_tile_px() : avx2::ov_tile_px();
}
static int ovb_tile_px() {
  return g_isa == Isa::AVX512 ? avx512::ovb_tile_px() : avx2::ovb_tile_px();
}

// Group blocks per unit: n_gb doubled (up to every group in its own block) until the items,
// units x group blocks, number at least `items`.
static int64_t split_groups(int64_t n_gb, int64_t n_units, int64_t G, int64_t items) {
  while (n_units * n_gb < items && n_gb < G) n_gb *= 2;
  return std::min(n_gb, G);
}

// Channel-blocked ov (Job::ovb) for a 1x1 job reading rows of all C channels in place, when a
// tile's rows of all channels would not stay in L1 (GP_1XN_OVB: 0 never, 2 whenever it applies):
// the blocks, each group's kept range per block, and enough group blocks that one block's
// weights stay in L2 while the tiles of a unit go by (GP_1XN_OVB_WKB, KB).
static void plan_ovb(Job& job) {
  job.ovb = false;
  const int64_t mode = env_int("GP_1XN_OVB", 1);
  const int64_t tp = ovb_tile_px();
  if (mode == 0 || job.kind != Kind::OV || job.taps != 1 || job.cs != 1 || job.ld != job.C ||
      job.N % vec_width() != 0 || job.kept == 0 || job.toff.size() != 1 || job.toff[0] != 0 ||
      job.Wq != job.Wo)
    return;
  const int64_t l1 = env_int("GP_1XN_L1_KB", 24) * 1024;
  // (the blocks need each group's channels sorted)
  if (!job.idx_sorted || (mode != 2 && 4 * tp * job.C <= l1)) return;
  job.ovb_wpf = env_int("GP_1XN_OVB_WPF", 512);
  job.ncb = (job.C + kOvbCb - 1) / kOvbCb;
  const int64_t nb = job.ncb + 1;
  job.cbound.assign(job.G * nb, 0);
  for (int64_t g = 0; g < job.G; ++g) {
    const int32_t* ig = job.idx + g * job.kept;
    for (int64_t k = 0; k < nb; ++k) {
      const int32_t c = (int32_t)std::min(job.C, k * kOvbCb);
      job.cbound[g * nb + k] = (int32_t)(std::lower_bound(ig, ig + job.kept, c) - ig);
    }
    job.cbound[g * nb + job.ncb] = (int32_t)job.kept;
  }
  const double wbytes = 4.0 * job.G * job.kept * job.N;
  const double wl2 = std::max<int64_t>(64, env_int("GP_1XN_OVB_WKB", 4096)) * 1024.0;
  const int64_t nth = std::max(1, at::get_num_threads());
  // units: rows of x are read once per group block, while a block's weights are read once per
  // unit, so units are longer than L2-sized (GP_1XN_OVB_ROWS rows)
  const int64_t rows = std::max<int64_t>(1, env_int("GP_1XN_OVB_ROWS", 192));
  job.mt_tiles =
      std::max<int64_t>(1, std::min<int64_t>(job.ntile_img, (rows + job.tile / 2) / job.tile));
  job.n_blk = (job.ntile_img + job.mt_tiles - 1) / job.mt_tiles;
  job.n_units = job.B * job.n_blk;
  job.g_outer = false;
  // (every group block copies the rows again: split only as far as the threads need)
  job.n_gb = split_groups(std::max<int64_t>(1, (int64_t)((wbytes + wl2 - 1) / wl2)), job.n_units,
                          job.G, nth > 1 ? 2 * nth : 0);
  job.ovb = true;
}

// Fill in tiling and item order once geometry and pointers are set.
static void plan_tiles(Job& job) {
  const int64_t kept_eff = std::max<int64_t>(job.kept, 1);
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
  job.jblock =
      std::max<int64_t>(8, env_int("GP_1XN_L1_KB", 24) * 1024 / std::max<int64_t>(1, ch_bytes));
  // (the ov tail reads unmasked: none in masked mode)
  job.tail_max = job.mbits ? 0
                           : std::min<int64_t>(env_int("GP_1XN_TAIL", vec_width() / 2),
                                               ov_tile_px());
  const int64_t nth = std::max(1, at::get_num_threads());
  // A unit's activations (all channels) should stay in L2 while every group sweeps them: half of
  // a 2 MB L2, the rest for the weights and the output (512 KB cut 1x1 images of 14x14 into
  // units of 3 and 2 tiles, each a sweep over every group's weights: 1024->256 @14 b8 t2 took
  // 1.05-1.13x the time, the other layers up to 1.04x)
  const int64_t l2 = std::max<int64_t>(16, env_int("GP_1XN_L2_KB", 1024)) * 1024;
  const int64_t act_bytes = 4 * job.B * job.C * (job.L + span);  // what the units read
  const bool small_act = act_bytes <= env_int("GP_1XN_SMALL_KB", 1536) * 1024;
  if (job.rb) {
    const Pack& pk = *job.pk;
    const int64_t npl = (int64_t)pk.planes.size(), rq = pk.Hq - job.Ho;
    const int64_t row_bytes = 4 * job.C * npl * job.Wq;
    int64_t rows = std::max<int64_t>(1, std::min(job.Ho, l2 / row_bytes - rq));
    while (rows > 1 && job.B * ((job.Ho + rows - 1) / rows) < 4 * nth) rows = (rows + 1) / 2;
    job.rb_rows = rows;
    job.n_blk = (job.Ho + rows - 1) / rows;
    job.loc_rows = rows + rq;
    job.loc_plane = job.loc_rows * job.Wq;
    job.cs = npl * job.loc_plane;
    job.bs = 0;
    for (int64_t t = 0; t < job.taps; ++t) job.toff[t] = job.tplane[t] * job.loc_plane + job.trc[t];
    // + slack so unmasked loads past the last row stay inside the buffer
    job.loc_floats = job.C * job.cs + 2 * job.Wq + 64;
  } else {
    // (activations that fit in L2 as a whole stay there anyway: no need for short units, whose
    // groups would then re-read their weights more often)
    // (a cap of 1024 pixels cut the 56x56 1x1 layers with 64 input channels into units of a
    // third of an image: 64->256 and 64->64 @56 took up to 1.14x the time of whole-image
    // units, most at 2 threads; the 3x3 layers at 56x56 the same time either way)
    const int64_t mt_px = env_int("GP_1XN_MT_PX", 4096);
    const int64_t px_l2 = l2 / (4 * std::max<int64_t>(1, job.C)) - span;
    const int64_t target = small_act ? mt_px : std::min(mt_px, px_l2);
    // (round up: a unit ending just short of the image end would leave a sliver of a unit)
    job.mt_tiles = std::max<int64_t>(
        1, std::min<int64_t>(job.ntile_img, (target + job.tile / 2) / job.tile));
    job.n_blk = (job.ntile_img + job.mt_tiles - 1) / job.mt_tiles;
    // a last unit of a few pixels (a 7x7 image is one tile + 1 pixel) would cost a sweep over
    // every group's weights for almost no work: spread its tiles over the other units
    const int64_t last_px = job.L - (job.n_blk - 1) * job.mt_tiles * job.tile;
    if (job.n_blk > 1 && 4 * last_px < job.mt_tiles * job.tile) {
      job.n_blk -= 1;
      job.mt_tiles = (job.ntile_img + job.n_blk - 1) / job.n_blk;
      job.n_blk = (job.ntile_img + job.mt_tiles - 1) / job.mt_tiles;
    }
  }
  job.n_units = job.B * job.n_blk;
  // Re-read traffic of each order: weights once per unit vs activations once per group.
  const double wbytes = 4.0 * job.G * job.kept * job.taps * job.N;
  const double abytes = 4.0 * job.B * kept_eff * job.L;
  const int64_t order = env_int("GP_1XN_ORDER", -1);
  job.g_outer = !job.rb && (order >= 0 ? order == 1 : (job.n_units * wbytes > job.G * abytes));
  if (job.g_outer) {
    job.n_gb = job.G;
  } else {
    // split the groups of a unit over items only when there are too few units to balance
    job.n_gb = split_groups(1, job.n_units, job.G, 4 * nth);
  }
  job.pf = job.kind == Kind::PV && !job.g_outer && !job.rb && env_int("GP_1XN_PF", 0) != 0;
  // L1 prefetch of the rows a few pairs ahead: only pays when a tile's rows of all channels do not
  // stay in L1 from one group to the next
  const bool l1_fits = job.C * ch_bytes <= 32 * 1024;
  const int64_t pfd = l1_fits ? 0 : job.taps == 1 ? 8 : job.taps;
  job.pfd = std::min<int64_t>(48, std::max<int64_t>(0, env_int("GP_1XN_PFD", pfd)));
  // 1x1 layers whose activations come from beyond L2 (more than 2 MB of them): each pair also
  // pulls its row of the unit's next tile into L2 (the hardware prefetchers cannot follow a row
  // per kept channel). Not for units of a few tiles (14x14, 7x7), whose next tiles are mostly
  // already there.
  const bool pf2 = job.kind == Kind::PV && job.taps == 1 && !job.rb &&
                   act_bytes > 2048 * 1024 && job.mt_tiles >= 4;
  job.pf2 = std::max<int64_t>(0, env_int("GP_1XN_PF2", pf2 ? 1 : 0)) * job.tile;
  // the masked loop's weights, GP_1XN_WPFD channels ahead (see pv_tile)
  job.wpf = std::max<int64_t>(0, env_int("GP_1XN_WPFD", 4)) * job.taps * job.N;
  job.pf_start = job.toff.empty() ? 0 : job.toff.front();
  job.pf_extra = span;
  plan_ovb(job);
}

// x is NHWC in memory: transpose rows of pixels into channel planes, 16 channels at a time.
static void pack_nhwc(const Pack& pk, int64_t lo, int64_t hi) {
  const Geom& g = pk.g;
  const int64_t npl = (int64_t)pk.planes.size();
  for (int64_t row = lo; row < hi; ++row) {
    const int64_t b = row / (npl * pk.Hq), p = (row / pk.Hq) % npl, i = row % pk.Hq;
    const int64_t a = pk.planes[p].first, bb = pk.planes[p].second;
    const int64_t ih = i * g.sh + a - g.ph;
    float* d0 = pk.dst + b * pk.bs + p * pk.plane + i * pk.Wq;
    const Span sp =
        (ih < 0 || ih >= g.H) ? Span{0, 0} : valid_span(pk.Wq, g.sw, bb - g.pw, g.W);
    for (int64_t c = 0; c < g.C; ++c) {
      std::memset(d0 + c * pk.cs, 0, sp.lo * sizeof(float));
      std::memset(d0 + c * pk.cs + sp.hi, 0, (pk.Wq - sp.hi) * sizeof(float));
    }
    const float* srow = pk.src + ((b * g.H + ih) * g.W + bb - g.pw) * g.C;
    for (int64_t c0 = 0; c0 < g.C; c0 += 16) {
      const int64_t c1 = std::min(g.C, c0 + 16);
      for (int64_t j = sp.lo; j < sp.hi; ++j) {
        const float* src = srow + j * g.sw * g.C;
        for (int64_t c = c0; c < c1; ++c) d0[c * pk.cs + j] = src[c];
      }
    }
  }
}

static void pack_stacked(const Pack& pk, int64_t lo, int64_t hi) {
  for (int64_t bc = lo; bc < hi; ++bc) {
    const int64_t b = bc / pk.g.C, c = bc % pk.g.C;
    std::memcpy(pk.dst + c * pk.cs + b * pk.plane, pk.src + bc * pk.plane,
                pk.plane * sizeof(float));
  }
}

static void pack_units(const Pack& pk, int64_t lo, int64_t hi) {
  if (pk.stacked)
    pack_stacked(pk, lo, hi);
  else if (pk.from_nhwc)
    pack_nhwc(pk, lo, hi);
  else
    pack_nchw(pk, lo, hi);
}

// Lane masks of the masked in-place mode (see Job::mbits): lane (oh, ow) reads input pixel
// (oh + r*dh - ph, ow + s*dw - pw) at tap (r, s), inside the image or not; junk columns and the
// vectors past the last pixel (+ slack for a tile's unused vectors) read nothing.
// Returns the fraction of pixel vectors the 3x3 fast path takes (simple3).
static double build_mbits(Job& job, const Geom& g) {
  const int64_t W = vec_width(), T = job.taps;
  job.mbits_store.assign(((job.L + W - 1) / W + 8) * T, 0);
  uint16_t* mb = job.mbits_store.data();
  for (int64_t r = 0; r < g.R; ++r)
    for (int64_t s = 0; s < g.S; ++s) {
      const int64_t t = r * g.S + s, dr = r * g.dh - g.ph, dc = s * g.dw - g.pw;
      const int64_t c_lo = std::max<int64_t>(0, -dc), c_hi = std::min(g.Wo, g.W - dc);
      for (int64_t i = 0; i < job.n_img; ++i)
        for (int64_t oh = 0; oh < g.Ho && c_lo < c_hi; ++oh) {
          if (oh + dr < 0 || oh + dr >= g.H) continue;
          const int64_t row = i * g.H * g.W + oh * g.W;
          for (int64_t f = row + c_lo, end = row + c_hi; f < end;) {
            const int64_t k = f % W, n = std::min(W - k, end - f);
            mb[f / W * T + t] |= (uint16_t)(((1u << n) - 1u) << k);
            f += n;
          }
        }
    }
  job.mbits = mb;
  job.simple3.clear();
  int64_t n_simple = 0;
  if (g.R == 3 && g.S == 3 && g.dh == 1 && g.dw == 1 && g.ph == 1 && g.pw == 1 && g.Ho == g.H &&
      g.Wo == g.W) {
    const int64_t nv = (int64_t)job.mbits_store.size() / T;
    const uint16_t full = (uint16_t)((1u << W) - 1u);
    job.simple3.assign(nv, 0);
    for (int64_t v = 0; v < nv; ++v) {
      const uint16_t* m = mb + v * T;
      bool ok = m[4] == full;
      for (int64_t t = 0; ok && t < 9; ++t) ok = m[t] == m[3 + t % 3];
      job.simple3[v] = ok;
      n_simple += ok;
    }
  }
  return (double)n_simple / (double)((job.L + W - 1) / W);
}

// Point the job at the planar (padded, phase-split) view of x: x itself when it can be read in
// place, else a new buffer that `pk` describes how to fill. Returns the tensor owning the memory.
static at::Tensor prepare_planar(const at::Tensor& x, bool x_cl, const Geom& g, Job& job,
                                 Pack& pk, bool pv = false) {
  const int64_t rmax = (g.R - 1) * g.dh, smax = (g.S - 1) * g.dw;
  job.ld = 1;
  job.toff.clear();
  job.mbits = nullptr;
  job.n_img = 1;
  const bool padded = g.ph > 0 || g.pw > 0;
  // Stride 1 on NCHW is read in place, rows of W: without padding as is; with padding (pv only,
  // output no wider than the input) through masked loads that read the padding as zeros -- no
  // copy, and no junk columns when Wo == W. GP_1XN_MASKED: 0 never, 2 always, 1 (default)
  // unless the batch is stacked instead (below).
  const int64_t masked = env_int("GP_1XN_MASKED", 1), stack = env_int("GP_1XN_STACK", 1);
  const bool stackable = g.B > 1 && g.Ho == g.H && g.Wo == g.W && stack != 0;
  if (!x_cl && g.sh == 1 && g.sw == 1 && (!padded || (pv && g.Wo <= g.W && masked != 0))) {
    job.x = x.data_ptr<float>();
    job.Wq = g.W;
    job.cs = g.H * g.W;
    job.bs = g.C * g.H * g.W;
    for (int64_t r = 0; r < g.R; ++r)
      for (int64_t s = 0; s < g.S; ++s)
        job.toff.push_back((r * g.dh - g.ph) * g.W + s * g.dw - g.pw);
    job.L = (g.Ho - 1) * job.Wq + g.Wo;
    pk.units = 0;
    if (!padded) return x;
    // In place beats the zero-padded copy however few vectors take the 3x3 fast path (3x3 at
    // b1 on 7x7 0.89-0.96 of the time, 10x10 0.69-0.79, 3x3 / 5x5 0.82-0.89; 5x5 and 7x7
    // kernels on 28x28 / 56x56, no fast path at all, 0.99-1.03), so the copy is left to the
    // inputs this block does not take. A batch of images may be stacked instead (measured at
    // batch 8: in place wins at 56x56 and 28x28, 92-96% of vectors on the fast path; stacked
    // wins at 14x14, 77%, and 7x7).
    const double simple = build_mbits(job, g);  // fraction of vectors on the 3x3 fast path
    if (masked == 2 || !stackable || (stack != 2 && simple >= 0.85)) return x;
    // Small images of a batch (7x7, 14x14): a pixel vector would waste lanes at the end of each
    // image (49 pixels = 3 vectors + 1), and most vectors touch a first or last row. Copy the
    // batch unpadded with the images side by side instead, and run the masked loop over all of
    // them as one long row of pixels. The taps keep their offsets (rows of W); only the masks
    // change.
    const int64_t hw = g.H * g.W;
    auto xq = at::empty({g.B * g.C * hw + 64}, x.options());
    pk.src = x.data_ptr<float>();
    pk.dst = xq.data_ptr<float>();
    pk.g = g;
    pk.stacked = true;
    pk.plane = hw;
    pk.cs = g.B * hw;
    pk.units = g.B * g.C;
    job.x = pk.dst;
    job.cs = g.B * hw;
    job.bs = 0;
    job.n_img = g.B;
    job.B = 1;
    job.L = g.B * hw;
    build_mbits(job, g);
    return xq;
  }
  // phase planes used by some tap
  std::vector<int> plane_of(g.sh * g.sw, -1);
  pk.planes.clear();
  for (int64_t r = 0; r < g.R; ++r)
    for (int64_t s = 0; s < g.S; ++s) {
      int64_t a = (r * g.dh) % g.sh, b = (s * g.dw) % g.sw;
      if (plane_of[a * g.sw + b] < 0) {
        plane_of[a * g.sw + b] = (int)pk.planes.size();
        pk.planes.emplace_back(a, b);
      }
    }
  pk.g = g;
  pk.Hq = g.Ho + rmax / g.sh;
  pk.Wq = g.Wo + smax / g.sw;
  pk.plane = pk.Hq * pk.Wq;
  pk.cs = (int64_t)pk.planes.size() * pk.plane;
  pk.bs = g.C * pk.cs;
  job.Wq = pk.Wq;
  job.cs = pk.cs;
  job.bs = pk.bs;
  job.tplane.clear();
  job.trc.clear();
  for (int64_t r = 0; r < g.R; ++r)
    for (int64_t s = 0; s < g.S; ++s) {
      int64_t a = (r * g.dh) % g.sh, b = (s * g.dw) % g.sw;
      job.tplane.push_back(plane_of[a * g.sw + b]);
      job.trc.push_back((r * g.dh / g.sh) * pk.Wq + (s * g.dw / g.sw));
      job.toff.push_back(job.tplane.back() * pk.plane + job.trc.back());
    }
  job.L = (g.Ho - 1) * pk.Wq + g.Wo;
  pk.src = x.data_ptr<float>();
  pk.from_nhwc = x_cl;
  // A batch too big for L2 is packed a block of rows at a time by the thread that uses it, so the
  // copy is read back from L2 instead of making one more trip through memory. Every block is
  // swept by all groups, so only when the weights of all groups stay in L2 too (else the whole
  // batch is packed up front and the groups may go outer, see plan_tiles).
  const int64_t wbytes = 4 * job.G * job.kept * g.R * g.S * job.N;
  if (pv && !x_cl && 4 * g.B * pk.bs > env_int("GP_1XN_FUSE_KB", 1024) * 1024 &&
      wbytes <= env_int("GP_1XN_RB_WKB", 384) * 1024) {
    job.rb = true;
    job.pk = &pk;
    job.x = nullptr;
    pk.units = 0;
    return x;
  }
  // + one vector of slack so unmasked loads past the last plane stay inside the buffer
  auto xq = at::empty({g.B * pk.bs + 64}, x.options());
  pk.dst = xq.data_ptr<float>();
  pk.units = x_cl ? g.B * (int64_t)pk.planes.size() * pk.Hq : g.B * g.C;
  std::memset(pk.dst + g.B * pk.bs, 0, 64 * sizeof(float));
  job.x = pk.dst;
  return xq;
}

// Fill the planar copy (if any), then run the items: one OpenMP region for both.
static void run_job(Job& job, const Pack& pk) {
  int nth = std::max(1, at::get_num_threads());
  const int64_t total = job.n_units * job.n_gb;
  // small chunks: balance (and robustness to a descheduled thread) beat locality here
  job.chunk = std::max<int64_t>(1, total / (64 * nth));
  const int64_t n_chunks = (total + job.chunk - 1) / job.chunk;
  // (pv jobs only by default: on the linear layers, ov, it measured 0.95-1.05 of the time
  // layer by layer and ViT-B end to end at batch 1 ~4% slower)
  const int64_t affine = env_int("GP_1XN_AFFINE", 1);
  const int n_ranges = affine == 2 || (affine == 1 && job.kind == Kind::PV) ? nth : 1;
  std::vector<Range> ranges(n_ranges);
  for (int r = 0; r < n_ranges; ++r) {
    ranges[r].next.store(n_chunks * r / n_ranges, std::memory_order_relaxed);
    ranges[r].hi = n_chunks * (r + 1) / n_ranges;
  }
  job.ranges = ranges.data();
  job.n_ranges = n_ranges;
  const Isa isa = g_isa;
  auto body = [&]() {
    if (isa == Isa::AVX512)
      avx512::run(job);
    else
      avx2::run(job);
  };
  if (nth == 1) {
    if (pk.units) pack_units(pk, 0, pk.units);
    body();
    return;
  }
#pragma omp parallel num_threads(nth)
  {
    if (pk.units) {
      const int64_t t = omp_get_thread_num(), nt = omp_get_num_threads();
      pack_units(pk, pk.units * t / nt, pk.units * (t + 1) / nt);
#pragma omp barrier
    }
    body();
  }
}

// Checks the packed weights; returns whether every group's indices are strictly increasing.
static bool check_weights(const at::Tensor& values, const at::Tensor& indices,
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
  const int64_t kept = indices.size(1);
  bool sorted = true;
  for (int64_t i = 0; i < indices.numel(); ++i) {
    TORCH_CHECK(ip[i] >= 0 && ip[i] < C, "graphprune 1xN: index ", ip[i], " out of range [0, ",
                C, ")");
    sorted = sorted && (i % kept == 0 || ip[i] > ip[i - 1]);
  }
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() &&
                    bias->numel() == values.size(0) * n,
                "graphprune 1xN: bias must be contiguous float32 with K elements");
  }
  return sorted;
}

// The residual (checked), laid out like y (a copy only when its layout differs); undefined if
// none.
static at::Tensor residual_like(const at::Tensor& y, bool y_cl,
                                const c10::optional<at::Tensor>& residual) {
  if (!residual.has_value()) return at::Tensor();
  TORCH_CHECK(residual->scalar_type() == at::kFloat && residual->device().is_cpu() &&
                  residual->sizes() == y.sizes(),
              "graphprune 1xN: residual must be a float32 CPU tensor of the output's shape ",
              y.sizes(), ", got ", residual->sizes());
  return residual->contiguous(y_cl && y.dim() == 4 ? at::MemoryFormat::ChannelsLast
                                                   : at::MemoryFormat::Contiguous);
}

// The job's epilogue: relu and the residual laid out like y (returned: it owns the memory).
static at::Tensor fill_epilogue(Job& job, const at::Tensor& y, bool y_cl,
                                const c10::optional<at::Tensor>& residual, bool relu) {
  job.relu = relu;
  const at::Tensor r = residual_like(y, y_cl, residual);
  job.res = r.defined() ? r.data_ptr<float>() : nullptr;
  return r;
}

// Point the job at the packed weights (checked by check_weights, which says whether sorted).
static void fill_weights(Job& job, const at::Tensor& values, const at::Tensor& indices,
                         const c10::optional<at::Tensor>& bias, int64_t n, bool idx_sorted) {
  job.w = values.data_ptr<float>();
  job.idx = indices.data_ptr<int32_t>();
  job.idx_sorted = idx_sorted;
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
                         int64_t n, int64_t R, int64_t S,
                         const c10::optional<at::Tensor>& residual, bool relu) {
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
  const bool sorted = check_weights(values, indices, bias, n, g.C, R * S);
  g.K = values.size(0) * n;
  auto opts = x.options();
  at::Tensor y = x_cl ? at::empty({g.B, g.K, g.Ho, g.Wo},
                                        opts.memory_format(at::MemoryFormat::ChannelsLast))
                         : at::empty({g.B, g.K, g.Ho, g.Wo}, opts);
  if (g.B == 0) return y;

  Job job;
  Pack pk;
  fill_weights(job, values, indices, bias, n, sorted);
  job.taps = R * S;
  job.C = g.C;
  job.B = g.B; job.Ho = g.Ho; job.Wo = g.Wo;
  job.y = y.data_ptr<float>();
  job.y_bs = g.K * g.Ho * g.Wo;
  job.y_cl = x_cl;
  const at::Tensor res_keep = fill_epilogue(job, y, x_cl, residual, relu);
  // NHWC output: ov stores it directly; pv (full vectors over pixels) pays a transposed store
  // but wins for N < W unless there are too few pixels to fill its vectors
  job.kind = x_cl && (n % vec_width() == 0 || g.B * g.Ho * g.Wo < pv_tile_px()) ? Kind::OV
                                                                                : Kind::PV;
  at::Tensor keep;
  const bool direct_nhwc = job.kind == Kind::OV && x_cl && R == 1 && S == 1 && sh == 1 &&
                           sw == 1 && ph == 0 && pw == 0;
  if (direct_nhwc) {
    job.x = x.data_ptr<float>();
    job.cs = 1; job.ld = g.C; job.bs = g.H * g.W * g.C;
    job.Wq = g.W; job.L = g.H * g.W; job.toff = {0};
  } else {
    keep = prepare_planar(x, x_cl, g, job, pk, job.kind == Kind::PV);
  }
  plan_tiles(job);
  run_job(job, pk);
  return y;
}

// linear with a uniform 1xN block-sparse weight: x [M, C] float32 -> [M, K].
at::Tensor linear_1xn(const at::Tensor& x_in, const at::Tensor& values,
                         const at::Tensor& indices, const c10::optional<at::Tensor>& bias,
                         int64_t n, const c10::optional<at::Tensor>& residual, bool relu) {
  TORCH_CHECK(g_isa != Isa::NONE, "graphprune 1xN: CPU lacks AVX2/FMA");
  TORCH_CHECK(x_in.dim() == 2 && x_in.scalar_type() == at::kFloat && x_in.device().is_cpu(),
              "graphprune 1xN: x must be a 2-D float32 CPU tensor");
  const at::Tensor x = x_in.contiguous();
  const int64_t M = x.size(0), C = x.size(1);
  const bool sorted = check_weights(values, indices, bias, n, C, 1);
  Job job;
  Pack pk;
  fill_weights(job, values, indices, bias, n, sorted);
  auto y = at::empty({M, job.K}, x.options());
  if (M == 0) return y;
  job.taps = 1;
  job.C = C;
  job.B = 1; job.Ho = 1; job.Wo = M;
  job.y = y.data_ptr<float>();
  job.y_bs = M * job.K;
  job.y_cl = true;  // [M, K] is NHWC with H = 1, W = M
  const at::Tensor res_keep = fill_epilogue(job, y, true, residual, relu);
  job.kind = (n % vec_width() == 0 || M < pv_tile_px()) ? Kind::OV : Kind::PV;
  at::Tensor keep;
  if (job.kind == Kind::OV) {
    job.x = x.data_ptr<float>();
    job.cs = 1; job.ld = C; job.bs = M * C;
    job.Wq = M; job.L = M; job.toff = {0};
  } else {
    Geom g{1, C, 1, M, job.K, 1, 1, 1, 1, 0, 0, 1, 1, 1, M};
    keep = prepare_planar(x.view({1, 1, M, C}).permute({0, 3, 1, 2}), true, g, job, pk);
  }
  plan_tiles(job);
  run_job(job, pk);
  return y;
}

// Winograd F(2x2, 3x3) for a 3x3, stride-1, dilation-1 conv on NCHW input (Lavin & Gray): each
// 4x4 input tile d (output tiles of 2x2 pixels, tiles over the padded input at stride 2) becomes
// V = B^T d B, each 3x3 kernel U = G g G^T (done by onexn.py; a zero 1xN block stays zero, so U
// keeps the layer's block pattern), and the 16 taps xi of the tile are 16 independent 1x1 convs
// M_xi = U_xi V_xi over the tiles -- one 1xN job whose "images" are the 16 taps, each with its
// own weights (Job::w_bs). The output tile is A^T M A, with the bias / residual / ReLU epilogue.
// 16 multiplies per 4 outputs instead of 36 (2.25x fewer; odd sizes round up to whole tiles).
//   V: [16, C, T], T = B * TH * TW tiles (b, ty, tx); M: [16, K, T].

// Input transform of channel c of image b: V[xi, c, (b, ty, tx)] for all tiles (tile (ty, tx)
// reads input rows 2ty - ph + [0, 4), columns 2tx - pw + [0, 4); zeros outside the image).
#ifdef __AVX512F__
static void wino_input_avx512(const float* xc, int64_t H, int64_t W, int64_t ph, int64_t pw,
                              int64_t TH, int64_t TW, float* v, int64_t xi_stride, float*) {
  // 16 tiles at a time: the rows combined (B^T d) at columns 2tx + {0, 16} and 2tx + {2, 18},
  // then even / odd columns by one two-source permute each
  const __m512i ev = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
  const __m512i od = _mm512_add_epi32(ev, _mm512_set1_epi32(1));
  for (int64_t ty = 0; ty < TH; ++ty) {
    for (int64_t k = 0; k < TW; k += 16) {
      __m512 e[4][4];  // [row combination i][column offset 0, 16, 2, 18]
      __m512 d[4][4];
      for (int64_t i = 0; i < 4; ++i) {
        const int64_t r = 2 * ty - ph + i;
        for (int q = 0; q < 4; ++q) {
          if (r < 0 || r >= H) {
            d[i][q] = _mm512_setzero_ps();
            continue;
          }
          const int64_t c0 = 2 * k + (q & 1) * 16 + (q >> 1) * 2 - pw;  // column of lane 0
          const int64_t lo = std::max<int64_t>(0, -c0), hi = std::min<int64_t>(16, W - c0);
          const __mmask16 m = hi > lo ? (__mmask16)(((1u << hi) - 1) & ~((1u << lo) - 1)) : 0;
          d[i][q] = _mm512_maskz_loadu_ps(m, xc + r * W + c0);
        }
      }
      for (int q = 0; q < 4; ++q) {
        e[0][q] = _mm512_sub_ps(d[0][q], d[2][q]);
        e[1][q] = _mm512_add_ps(d[1][q], d[2][q]);
        e[2][q] = _mm512_sub_ps(d[2][q], d[1][q]);
        e[3][q] = _mm512_sub_ps(d[1][q], d[3][q]);
      }
      const __mmask16 m = (__mmask16)((1u << std::min<int64_t>(16, TW - k)) - 1);
      for (int64_t i = 0; i < 4; ++i) {
        const __m512 a0 = _mm512_permutex2var_ps(e[i][0], ev, e[i][1]);
        const __m512 a1 = _mm512_permutex2var_ps(e[i][0], od, e[i][1]);
        const __m512 a2 = _mm512_permutex2var_ps(e[i][2], ev, e[i][3]);
        const __m512 a3 = _mm512_permutex2var_ps(e[i][2], od, e[i][3]);
        float* vi = v + i * 4 * xi_stride + ty * TW + k;
        _mm512_mask_storeu_ps(vi, m, _mm512_sub_ps(a0, a2));
        _mm512_mask_storeu_ps(vi + xi_stride, m, _mm512_add_ps(a1, a2));
        _mm512_mask_storeu_ps(vi + 2 * xi_stride, m, _mm512_sub_ps(a2, a1));
        _mm512_mask_storeu_ps(vi + 3 * xi_stride, m, _mm512_sub_ps(a1, a3));
      }
    }
  }
}
#endif
static void wino_input_generic(const float* xc, int64_t H, int64_t W, int64_t ph, int64_t pw,
                               int64_t TH, int64_t TW, float* v, int64_t xi_stride, float* buf) {
  const int64_t Wp = 2 * TW + 2;  // padded row: column j is input column j - pw
  const int64_t lo = std::min(pw, Wp), hi = std::min(Wp, pw + W);  // valid columns [lo, hi)
  float* d = buf;                 // [4][Wp] the tile row's 4 input rows, padded
  float* e = buf + 4 * Wp;        // [4][Wp] rows combined: B^T d
  for (int64_t ty = 0; ty < TH; ++ty) {
    for (int64_t i = 0; i < 4; ++i) {
      const int64_t r = 2 * ty - ph + i;
      float* di = d + i * Wp;
      if (r < 0 || r >= H || hi <= lo) {
        std::fill(di, di + Wp, 0.f);
        continue;
      }
      std::fill(di, di + lo, 0.f);
      std::memcpy(di + lo, xc + r * W + (lo - pw), 4 * (hi - lo));
      std::fill(di + hi, di + Wp, 0.f);
    }
    for (int64_t j = 0; j < Wp; ++j) {
      const float d0 = d[j], d1 = d[Wp + j], d2 = d[2 * Wp + j], d3 = d[3 * Wp + j];
      e[j] = d0 - d2;
      e[Wp + j] = d1 + d2;
      e[2 * Wp + j] = d2 - d1;
      e[3 * Wp + j] = d1 - d3;
    }
    for (int64_t i = 0; i < 4; ++i) {
      const float* ei = e + i * Wp;
      float* vi = v + i * 4 * xi_stride + ty * TW;
      for (int64_t k = 0; k < TW; ++k) {
        const float a0 = ei[2 * k], a1 = ei[2 * k + 1], a2 = ei[2 * k + 2], a3 = ei[2 * k + 3];
        vi[k] = a0 - a2;
        vi[xi_stride + k] = a1 + a2;
        vi[2 * xi_stride + k] = a2 - a1;
        vi[3 * xi_stride + k] = a1 - a3;
      }
    }
  }
}

static void wino_input(const float* xc, int64_t H, int64_t W, int64_t ph, int64_t pw, int64_t TH,
                       int64_t TW, float* v, int64_t xi_stride, float* buf) {
#ifdef __AVX512F__
  if (g_isa == Isa::AVX512) return wino_input_avx512(xc, H, W, ph, pw, TH, TW, v, xi_stride, buf);
#endif
  wino_input_generic(xc, H, W, ph, pw, TH, TW, v, xi_stride, buf);
}

// Output transform of output channel k of image b: y = act(A^T M A + bias + res).
#ifdef __AVX512F__
static void wino_output_avx512(const float* m, int64_t xi_stride, int64_t TH, int64_t TW,
                               int64_t Ho, int64_t Wo, float bias, const float* res, bool relu,
                               float* y, float*) {
  // 16 tiles at a time; a row's even / odd output columns interleaved by two permutes
  const __m512i lo_ix = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  const __m512i hi_ix = _mm512_add_epi32(lo_ix, _mm512_set1_epi32(8));
  const __m512 vb = _mm512_set1_ps(bias), z = _mm512_setzero_ps();
  for (int64_t ty = 0; ty < TH; ++ty) {
    for (int64_t k = 0; k < TW; k += 16) {
      const __mmask16 mk = (__mmask16)((1u << std::min<int64_t>(16, TW - k)) - 1);
      const float* mt = m + ty * TW + k;
      __m512 s0[4], s1[4];
      for (int j = 0; j < 4; ++j) {
        const __m512 m0 = _mm512_maskz_loadu_ps(mk, mt + j * xi_stride);
        const __m512 m1 = _mm512_maskz_loadu_ps(mk, mt + (4 + j) * xi_stride);
        const __m512 m2 = _mm512_maskz_loadu_ps(mk, mt + (8 + j) * xi_stride);
        const __m512 m3 = _mm512_maskz_loadu_ps(mk, mt + (12 + j) * xi_stride);
        s0[j] = _mm512_add_ps(_mm512_add_ps(m0, m1), m2);
        s1[j] = _mm512_sub_ps(_mm512_sub_ps(m1, m2), m3);
      }
      for (int64_t rr = 0; rr < 2; ++rr) {
        const int64_t oh = 2 * ty + rr;
        if (oh >= Ho) break;
        const __m512* sr = rr ? s1 : s0;
        const __m512 ye = _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(sr[0], sr[1]), sr[2]), vb);
        const __m512 yo = _mm512_add_ps(_mm512_sub_ps(_mm512_sub_ps(sr[1], sr[2]), sr[3]), vb);
        const __m512 out[2] = {_mm512_permutex2var_ps(ye, lo_ix, yo),
                               _mm512_permutex2var_ps(ye, hi_ix, yo)};
        for (int h = 0; h < 2; ++h) {
          const int64_t c0 = 2 * k + 16 * h, n = std::min<int64_t>(16, Wo - c0);
          if (n <= 0) break;
          const __mmask16 mo = (__mmask16)((1u << n) - 1);
          __m512 t = out[h];
          if (res) t = _mm512_add_ps(t, _mm512_maskz_loadu_ps(mo, res + oh * Wo + c0));
          if (relu) t = _mm512_max_ps(t, z);
          _mm512_mask_storeu_ps(y + oh * Wo + c0, mo, t);
        }
      }
    }
  }
}
#endif
static void wino_output_generic(const float* m, int64_t xi_stride, int64_t TH, int64_t TW,
                                int64_t Ho, int64_t Wo, float bias, const float* res, bool relu,
                                float* y, float* buf) {
  float* o = buf;  // [2 rows][2 * TW] the tile row's outputs, columns in order
  for (int64_t ty = 0; ty < TH; ++ty) {
    const float* mt[16];
    for (int xi = 0; xi < 16; ++xi) mt[xi] = m + xi * xi_stride + ty * TW;
#pragma omp simd
    for (int64_t k = 0; k < TW; ++k) {
      float s0[4], s1[4];
      for (int j = 0; j < 4; ++j) {
        s0[j] = mt[j][k] + mt[4 + j][k] + mt[8 + j][k];
        s1[j] = mt[4 + j][k] - mt[8 + j][k] - mt[12 + j][k];
      }
      o[2 * k] = s0[0] + s0[1] + s0[2] + bias;
      o[2 * k + 1] = s0[1] - s0[2] - s0[3] + bias;
      o[2 * TW + 2 * k] = s1[0] + s1[1] + s1[2] + bias;
      o[2 * TW + 2 * k + 1] = s1[1] - s1[2] - s1[3] + bias;
    }
    for (int64_t rr = 0; rr < 2; ++rr) {
      const int64_t oh = 2 * ty + rr;
      if (oh >= Ho) break;
      const float* src = o + rr * 2 * TW;
      float* yr = y + oh * Wo;
      if (res) {
        const float* rs = res + oh * Wo;
        if (relu) {
#pragma omp simd
          for (int64_t ow = 0; ow < Wo; ++ow) yr[ow] = std::max(src[ow] + rs[ow], 0.f);
        } else {
#pragma omp simd
          for (int64_t ow = 0; ow < Wo; ++ow) yr[ow] = src[ow] + rs[ow];
        }
      } else if (relu) {
#pragma omp simd
        for (int64_t ow = 0; ow < Wo; ++ow) yr[ow] = std::max(src[ow], 0.f);
      } else {
        std::memcpy(yr, src, 4 * Wo);
      }
    }
  }
}

static void wino_output(const float* m, int64_t xi_stride, int64_t TH, int64_t TW, int64_t Ho,
                        int64_t Wo, float bias, const float* res, bool relu, float* y,
                        float* buf) {
#ifdef __AVX512F__
  if (g_isa == Isa::AVX512)
    return wino_output_avx512(m, xi_stride, TH, TW, Ho, Wo, bias, res, relu, y, buf);
#endif
  wino_output_generic(m, xi_stride, TH, TW, Ho, Wo, bias, res, relu, y, buf);
}

// 3x3 stride-1 dilation-1 conv with a uniform 1xN block-sparse weight, by Winograd F(2x2, 3x3).
// x: [B, C, H, W] float32 NCHW; wvalues [16, G, kept, N]: the transformed kernels, element
// (xi, g, j, n) = (G w G^T)[xi] of weight[g*N + n, indices[g, j]]. Output NCHW.
at::Tensor conv2d_1xn_wino(const at::Tensor& x_in, const at::Tensor& wvalues,
                           const at::Tensor& indices, const c10::optional<at::Tensor>& bias,
                           int64_t ph, int64_t pw, int64_t n,
                           const c10::optional<at::Tensor>& residual, bool relu) {
  TORCH_CHECK(g_isa != Isa::NONE, "graphprune 1xN: CPU lacks AVX2/FMA");
  TORCH_CHECK(x_in.dim() == 4 && x_in.scalar_type() == at::kFloat && x_in.device().is_cpu(),
              "graphprune 1xN: x must be a 4-D float32 CPU tensor");
  TORCH_CHECK(wvalues.dim() == 4 && wvalues.size(0) == 16 && wvalues.size(3) == n &&
                  wvalues.scalar_type() == at::kFloat && wvalues.is_contiguous(),
              "graphprune 1xN Winograd: wvalues must be a contiguous float32 [16, G, kept, N]");
  TORCH_CHECK(ph >= 0 && pw >= 0 && n > 0, "graphprune 1xN: bad padding/N");
  const at::Tensor x = x_in.contiguous();
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t Ho = H + 2 * ph - 2, Wo = W + 2 * pw - 2;
  TORCH_CHECK(Ho > 0 && Wo > 0, "graphprune 1xN: output would be empty");
  const at::Tensor w0 = wvalues[0];
  const bool sorted = check_weights(w0, indices, bias, n, C, 1);
  const int64_t G = wvalues.size(1), kept = wvalues.size(2), K = G * n;
  at::Tensor y = at::empty({B, K, Ho, Wo}, x.options());
  if (B == 0) return y;
  const at::Tensor res = residual_like(y, false, residual);
  const int64_t TH = (Ho + 1) / 2, TW = (Wo + 1) / 2, TI = TH * TW, T = B * TI;
  // (tap planes padded off multiples of 4 KB: 16 streams 4 KB apart would share their L1 sets)
  const int64_t vs = C * T + (C * T % 1024 == 0 ? 32 : 0);
  at::Tensor V = at::empty({16 * vs}, x.options());
  const int64_t ms = K * T + (K * T % 1024 == 0 ? 32 : 0);
  at::Tensor M = at::empty({16 * ms}, x.options());
  const int nth = std::max(1, at::get_num_threads());
  const float* xp = x.data_ptr<float>();
  float* vp = V.data_ptr<float>();
#pragma omp parallel num_threads(nth)
  {
    std::vector<float> buf(8 * (2 * TW + 2));
#pragma omp for schedule(static)
    for (int64_t cb = 0; cb < B * C; ++cb) {  // channel-major: V's rows are written in order
      const int64_t c = cb / B, b = cb % B;
      wino_input(xp + (b * C + c) * H * W, H, W, ph, pw, TH, TW, vp + c * T + b * TI, vs,
                 buf.data());
    }
  }
  Job job;
  Pack pk;
  fill_weights(job, w0, indices, c10::nullopt, n, sorted);
  job.w = wvalues.data_ptr<float>();
  job.w_bs = G * kept * n;
  job.taps = 1;
  job.C = C;
  job.B = 16; job.Ho = 1; job.Wo = T;
  job.y = M.data_ptr<float>();
  job.y_bs = ms;
  job.y_cl = false;  // (no epilogue: it runs in the output transform)
  job.kind = Kind::PV;
  job.x = vp;
  job.ld = 1;
  job.cs = T;
  job.bs = vs;
  job.Wq = T;
  job.L = T;
  job.toff = {0};
  plan_tiles(job);
  run_job(job, pk);
  const float* mp = M.data_ptr<float>();
  const float* bp = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  const float* rp = res.defined() ? res.data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
#pragma omp parallel num_threads(nth)
  {
    std::vector<float> buf(4 * TW);
#pragma omp for schedule(static)
    for (int64_t kb = 0; kb < B * K; ++kb) {  // channel-major: M's rows are read in order
      const int64_t k = kb / B, b = kb % B, bk = b * K + k;
      wino_output(mp + k * T + b * TI, ms, TH, TW, Ho, Wo, bp ? bp[k] : 0.f,
                  rp ? rp + bk * Ho * Wo : nullptr, relu, yp + bk * Ho * Wo, buf.data());
    }
  }
  return y;
}

}  // namespace gp

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  m.def("conv2d_1xn", &gp::conv2d_1xn, "1xN block-sparse conv2d",
        py::call_guard<py::gil_scoped_release>());
  m.def("linear_1xn", &gp::linear_1xn, "1xN block-sparse linear",
        py::call_guard<py::gil_scoped_release>());
  m.def("conv2d_1xn_wino", &gp::conv2d_1xn_wino, "1xN block-sparse 3x3 conv2d by Winograd",
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
// ovb: rows per tile with one output vector (two take two passes of half as many rows)
static constexpr int ovb_pmax(int nv) { return std::min(24, (NREG - 4) / nv); }
int ovb_tile_px() { return ovb_pmax(1); }

// Where the lanes of each pixel vector of a pv tile go: vector v stores lanes `mask[v][k]` at
// out + n * ldo + off[v][k] for k < count[v] (one segment per output row it touches, junk
// columns masked off; a single segment on planes without junk columns), so NCHW output is
// written in place even with padded planes. `flat`: one segment per vector, vector v at
// off[0][0] + v * W, every lane but those of the last vector past the tile's `rem` (the common
// case: in-place NCHW without junk columns, or the NHWC buffer); the micro-kernel then stores
// with fixed offsets instead of walking the segments (gcc: ~7 scalar instructions per store;
// 1x1 layers at high sparsity, whose pv calls sum few kept channels per store: up to 12% faster).
struct PvStore {
  bool flat;
  int count[8];
  int64_t off[8][W + 1];
  MT mask[8][W + 1];
};

// The epilogue on a finished vector: + the residual at r (lanes in m), then ReLU.
static inline VT epi(VT v, const float* r, MT m, bool relu) {
  if (r) v = vadd(v, vloadm(r, m));
  return relu ? vmax(v, vzero()) : v;
}
static inline float epi1(float v, const float* r, bool relu) {
  if (r) v += *r;
  return relu && !(v > 0.f) ? 0.f : v;
}

// pv micro-kernel: out[n][p] = init[n][p] + sum_q w[q][n] * x[off[q] + p] over q = (j, t) pairs,
// NC outputs x V vectors of W pixels, where init is out itself (acc_in) or the bias; lanes of
// the last vector past `rem` are not loaded. off[q] = idx[j] * cs + toff[t]. With `fin` (the
// last block of kept channels) the epilogue runs before the store: + rout[...] (the residual at
// the same offsets as out, if not null), then ReLU when `relu`. With `mb` (masked in-place mode,
// see Job::mbits; the pairs start at tap 0) vector v of pair q loads only the lanes in
// mb[v * taps + q % taps], the others read as zeros, and the pairs are summed tap by tap. MODE 3
// is the 3x3 / pad-1 case on a tile away from the top and bottom rows (Job::simple3): only the
// left and right taps mask, with the tile's six masks held in registers (mb[v * 9 + 3] and
// mb[v * 9 + 5]).
template <int NC, int V, int MODE = 0>
static void pv_tile(const float* __restrict x, const int64_t* __restrict off, int64_t nq,
                    const float* __restrict w, int64_t N, int64_t rem,
                    const float* __restrict bias, float* __restrict out, int64_t ldo,
                    bool acc_in, const PvStore& st, int64_t pfd, int64_t pf2, int64_t wpf,
                    const float* __restrict rout, bool relu, bool fin,
                    const uint16_t* __restrict mb, int64_t taps) {
  VT acc[NC][V];
  const MT m = vmask(rem);
  const MT full = vmask(W);
  const int64_t o0 = st.off[0][0];  // (flat)
  if (acc_in && st.flat) {
    GP_UNROLL for (int n = 0; n < NC; ++n) {
      GP_UNROLL for (int v = 0; v < V; ++v) {
        const float* p = out + n * ldo + o0 + v * W;
        acc[n][v] = v < V - 1 ? vload(p) : vloadm(p, m);
      }
    }
  } else if (acc_in) {
    GP_UNROLL for (int n = 0; n < NC; ++n) {
      GP_UNROLL for (int v = 0; v < V; ++v) {
        acc[n][v] = vzero();
        for (int k = 0; k < st.count[v]; ++k)
          acc[n][v] = vloadm_into(acc[n][v], out + n * ldo + st.off[v][k], st.mask[v][k]);
      }
    }
  } else {
    GP_UNROLL for (int n = 0; n < NC; ++n) {
      const VT b0 = bias ? vset1(bias[n]) : vzero();
      GP_UNROLL for (int v = 0; v < V; ++v) acc[n][v] = b0;
    }
  }
  // One (channel, tap) pair q: prefetch, V pixel vectors loaded by load(v, address), NC x V FMAs.
  // The loops below differ only in where the masks come from, the order of the pairs and (PF2, a
  // compile-time flag: a run-time test in the loop cost 1-3% on every layer) the L2 prefetch.
  auto pair = [&](int64_t q, auto load, auto PF2) __attribute__((always_inline)) {
    const float* xa = x + off[q];
    const float* wq = w + q * N;
    if (pfd) {
      // pull the pixels of pair q + pfd into L1 (the L1 prefetchers cannot follow many rows)
      const char* pa = (const char*)(x + off[q + pfd]);
      GP_UNROLL for (int v = 0; v < V; ++v) _mm_prefetch(pa + 64 * v, _MM_HINT_T0);
      _mm_prefetch(pa + 4 * V * W - 4, _MM_HINT_T0);
    }
    if constexpr (decltype(PF2)::value) {
      const char* p2 = (const char*)(xa + pf2);
      GP_UNROLL for (int v = 0; v < V; ++v) _mm_prefetch(p2 + 64 * v, _MM_HINT_T1);
    }
    VT a[V];
    GP_UNROLL for (int v = 0; v < V; ++v) a[v] = load(v, xa + v * W);
    GP_UNROLL for (int n = 0; n < NC; ++n) {
      const VT b = vset1(wq[n]);
      GP_UNROLL for (int v = 0; v < V; ++v) acc[n][v] = vfma(a[v], b, acc[n][v]);
    }
  };
  if constexpr (MODE == 3) {
    MT ml[V], mr[V];
    GP_UNROLL for (int v = 0; v < V; ++v) {
      ml[v] = bits_mask(mb + v * 9 + 3);
      mr[v] = bits_mask(mb + v * 9 + 5);
    }
    for (int64_t q0 = 0; q0 < nq; q0 += 3) {  // one kernel row (3 taps) at a time
      GP_UNROLL for (int t = 0; t < 3; ++t) {
        pair(q0 + t, [&](int v, const float* p) __attribute__((always_inline)) {
          return t == 1 ? vload(p) : vloadm(p, t ? mr[v] : ml[v]);
        }, std::false_type{});
      }
    }
  } else if (mb) {
    // tap outer, channel inner: a tap's V masks are loaded once per tile and block of channels
    // (pair q = j * taps + t; the prefetch distance taps then points at the next channel)
    // This order walks the weights with a stride of `taps` pairs, which the hardware does not
    // prefetch well: with `wpf`, each pair also pulls the weights `wpf` floats ahead into L1
    // (3x3 @7 / @14 at batch 8: 1-8% faster).
    const int64_t nj = nq / taps;
    for (int64_t t = 0; t < taps; ++t) {
      MT mk[V];
      GP_UNROLL for (int v = 0; v < V; ++v) mk[v] = bits_mask(mb + v * taps + t);
      auto load = [&](int v, const float* p) __attribute__((always_inline)) {
        return vloadm(p, mk[v]);
      };
      if (wpf) {
        for (int64_t j = 0; j < nj; ++j) {
          _mm_prefetch((const char*)(w + (j * taps + t) * N + wpf), _MM_HINT_T0);
          pair(j * taps + t, load, std::false_type{});
        }
      } else {
        for (int64_t j = 0; j < nj; ++j) pair(j * taps + t, load, std::false_type{});
      }
    }
  } else {
    auto load = [&](int v, const float* p) __attribute__((always_inline)) {
      return v < V - 1 ? vload(p) : vloadm(p, m);
    };
    if (pf2)
      for (int64_t q = 0; q < nq; ++q) pair(q, load, std::true_type{});
    else
      for (int64_t q = 0; q < nq; ++q) pair(q, load, std::false_type{});
  }
  if (st.flat) {
    const bool e = fin && (rout || relu);
    GP_UNROLL for (int n = 0; n < NC; ++n) {
      GP_UNROLL for (int v = 0; v < V; ++v) {
        const int64_t o = n * ldo + o0 + v * W;
        const MT mv = v < V - 1 ? full : m;
        const VT r = e ? epi(acc[n][v], rout ? rout + o : nullptr, mv, relu) : acc[n][v];
        if (v < V - 1)
          vstore(out + o, r);
        else
          vstorem(out + o, r, m);
      }
    }
    return;
  }
  if (fin && (rout || relu)) {
    GP_UNROLL for (int n = 0; n < NC; ++n) {
      GP_UNROLL for (int v = 0; v < V; ++v) {
        for (int k = 0; k < st.count[v]; ++k) {
          const int64_t o = n * ldo + st.off[v][k];
          vstorem(out + o, epi(acc[n][v], rout ? rout + o : nullptr, st.mask[v][k], relu),
                  st.mask[v][k]);
        }
      }
    }
    return;
  }
  GP_UNROLL for (int n = 0; n < NC; ++n) {
    GP_UNROLL for (int v = 0; v < V; ++v) {
      for (int k = 0; k < st.count[v]; ++k)
        vstorem(out + n * ldo + st.off[v][k], acc[n][v], st.mask[v][k]);
    }
  }
}

static constexpr int kWeightPrefetch = 4096;  // bytes ahead in the weight stream

// ov micro-kernel: P pixels x NV vectors of W outputs; out[p] (null: not stored) gets
// act(bias + sum + rin[p]) (rin null, or rin[p] null: no residual).
template <int NV, int P, int U, bool UNIT, bool MASKED>
static void ov_tile(const float* __restrict x, int64_t ld, const int64_t* __restrict off,
                    int64_t nq, const float* __restrict w, int64_t N,
                    const float* __restrict bias, float* const* out, int64_t nlast,
                    const float* const* rin, bool relu) {
  static_assert(!MASKED || NV == 1, "masked ov tiles have one output vector");
  const MT mo = vmask(MASKED ? nlast : W);
  VT acc[U][P][NV];
  GP_UNROLL for (int u = 0; u < U; ++u)
    GP_UNROLL for (int p = 0; p < P; ++p)
      GP_UNROLL for (int v = 0; v < NV; ++v) {
        if (u > 0 || !bias)
          acc[u][p][v] = vzero();
        else
          acc[u][p][v] = MASKED ? vloadm(bias, mo) : vload(bias + v * W);
      }
  const int64_t step = UNIT ? 1 : ld;
  int64_t q = 0;
  for (; q + U <= nq; q += U) {
    GP_UNROLL for (int u = 0; u < U; ++u) {
      const float* xa = x + off[q + u];
      const float* wq = w + (q + u) * N;
      if (u == 0) _mm_prefetch((const char*)wq + kWeightPrefetch, _MM_HINT_T0);
      VT b[NV];
      GP_UNROLL for (int v = 0; v < NV; ++v) b[v] = MASKED ? vloadm(wq, mo) : vload(wq + v * W);
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
    GP_UNROLL for (int v = 0; v < NV; ++v) b[v] = MASKED ? vloadm(wq, mo) : vload(wq + v * W);
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
      const float* r = rin && rin[p] ? rin[p] + v * W : nullptr;
      if (r || relu) s = epi(s, r, mo, relu);
      if (MASKED)
        vstorem(out[p], s, mo);
      else
        vstore(out[p] + v * W, s);
    }
  }
}

using PvFn = void (*)(const float*, const int64_t*, int64_t, const float*, int64_t, int64_t,
                      const float*, float*, int64_t, bool, const PvStore&, int64_t, int64_t,
                      int64_t, const float*, bool, bool, const uint16_t*, int64_t);
using OvFn = void (*)(const float*, int64_t, const int64_t*, int64_t, const float*, int64_t,
                      const float*, float* const*, int64_t, const float* const*, bool);

// off[j * taps + t] = idx[j] * cs + toff[t] for output group g, then kOffPad copies of the last
// entry (targets for the L1 prefetch past the end).
static constexpr int64_t kOffPad = 64;
static void fill_offsets(const Job& jb, int64_t g, int64_t* off) {
  const int32_t* ig = jb.idx + g * jb.kept;
  for (int64_t j = 0; j < jb.kept; ++j)
    for (int64_t t = 0; t < jb.taps; ++t) off[j * jb.taps + t] = ig[j] * jb.cs + jb.toff[t];
  const int64_t nq = jb.kept * jb.taps;
  for (int64_t i = 0; i < kOffPad; ++i) off[nq + i] = nq ? off[nq - 1] : 0;
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
static constexpr PvFn kPv3 = &pv_tile<pv_nc(), pv_vmax(pv_nc()), 3>;  // full tiles only

static constexpr int ov_u(int nv, int p) { return nv * p >= 8 ? 1 : nv * p >= 4 ? 2 : 4; }
template <int NV, bool UNIT, bool MASKED, int... Ps>
static constexpr std::array<OvFn, 13> ov_row(std::integer_sequence<int, Ps...>) {
  return {{&ov_tile<NV, std::max(1, std::min(Ps, ov_pmax(NV))),
                    ov_u(NV, std::max(1, std::min(Ps, ov_pmax(NV)))), UNIT, MASKED>...}};
}
template <int NV, bool UNIT, bool MASKED>
static constexpr std::array<OvFn, 13> ov_row() {
  return ov_row<NV, UNIT, MASKED>(std::make_integer_sequence<int, 13>{});
}
// [kind][P]: kind = 0 one vector, 1 two vectors, 2 one masked vector; + 3 when ld == 1
static const std::array<std::array<OvFn, 13>, 6> kOv = {{
    ov_row<1, false, false>(), ov_row<2, false, false>(), ov_row<1, false, true>(),
    ov_row<1, true, false>(), ov_row<2, true, false>(), ov_row<1, true, true>(),
}};

// ovb micro-kernel: P rows x NV vectors of W outputs over the nq kept channels idx[0..nq) of one
// channel block; row p of x at x + p * kOvbCb (a constant: one base register per channel), of
// out (and res) at out + p * ldo. The sums start from out itself (acc_in: an earlier channel
// block wrote them) or from the bias; res (the residual) and relu are passed for the last block
// only.
template <int NV, int P>
static void ovb_tile(const float* __restrict x, const int32_t* __restrict idx,
                     int64_t nq, const float* __restrict w, int64_t N,
                     const float* __restrict bias, float* __restrict out, int64_t ldo,
                     bool acc_in, const float* __restrict res, bool relu, int64_t wpf) {
  VT acc[P][NV];
  GP_UNROLL for (int p = 0; p < P; ++p)
    GP_UNROLL for (int v = 0; v < NV; ++v)
      acc[p][v] = acc_in ? vload(out + p * ldo + v * W) : bias ? vload(bias + v * W) : vzero();
  for (int64_t q = 0; q < nq; ++q) {
    const float* xa = x + idx[q];
    // (a plain base register: the FMAs' loads then need no index register, which would split
    // each into two uops)
    __asm__("" : "+r"(xa));
    const float* wq = w + q * N;
    _mm_prefetch((const char*)wq + wpf, _MM_HINT_T0);
    VT b[NV];
    GP_UNROLL for (int v = 0; v < NV; ++v) b[v] = vload(wq + v * W);
    GP_UNROLL for (int p = 0; p < P; ++p) {
      const VT a = vset1(xa[p * kOvbCb]);
      GP_UNROLL for (int v = 0; v < NV; ++v) acc[p][v] = vfma(a, b[v], acc[p][v]);
    }
  }
  const MT all = vmask(W);
  GP_UNROLL for (int p = 0; p < P; ++p)
    GP_UNROLL for (int v = 0; v < NV; ++v) {
      VT s = acc[p][v];
      if (res || relu) s = epi(s, res ? res + p * ldo + v * W : nullptr, all, relu);
      vstore(out + p * ldo + v * W, s);
    }
}

using OvbFn = void (*)(const float*, const int32_t*, int64_t, const float*, int64_t,
                       const float*, float*, int64_t, bool, const float*, bool, int64_t);
template <int NV, int... Ps>
static constexpr std::array<OvbFn, 25> ovb_row(std::integer_sequence<int, Ps...>) {
  return {{&ovb_tile<NV, std::max(1, std::min(Ps, ovb_pmax(NV)))>...}};
}
// [NV - 1][P]
static const std::array<std::array<OvbFn, 25>, 2> kOvb = {{
    ovb_row<1>(std::make_integer_sequence<int, 25>{}),
    ovb_row<2>(std::make_integer_sequence<int, 25>{}),
}};

// Copy a pv tile buffer buf[n][f - f0] (flat positions f0..f0+cnt) into the NHWC output,
// dropping junk columns.
static void pv_writeback(const Job& jb, const float* buf, int64_t ldb, int64_t nc, int64_t k0,
                         int64_t b, int64_t f0, int64_t cnt) {
  const int64_t HoWo = jb.Ho * jb.Wo;
  for (int64_t f = f0; f < f0 + cnt; ++f) {
    const int64_t oh = f / jb.Wq, ow = f - oh * jb.Wq;
    if (ow >= jb.Wo) continue;
    const int64_t at = (b * HoWo + oh * jb.Wo + ow) * jb.K + k0;
    float* d = jb.y + at;
    const float* r = jb.res ? jb.res + at : nullptr;
    for (int64_t n = 0; n < nc; ++n) d[n] = epi1(buf[n * ldb + (f - f0)], r ? r + n : nullptr, jb.relu);
  }
}

// Software prefetch of the next unit a thread will work on: every channel's rows of its pixel
// range go to L2, spread evenly over the steps (group x tile) of the current unit (the hardware
// prefetcher cannot follow hundreds of channel rows).
struct Prefetch {
  const char* base = nullptr;  // channel 0, first line
  int64_t cs_bytes = 0, lines = 0, C = 0, steps = 1, step = 0;
  void init(const Job& jb, int64_t u, int64_t nsteps) {
    const UnitRange r = unit_range(jb, u);
    base = (const char*)(jb.x + r.b * jb.bs + r.fa + jb.pf_start);
    cs_bytes = 4 * jb.cs;
    lines = (4 * (r.fb - r.fa + jb.pf_extra) + 63) / 64 + 1;
    C = jb.C;
    steps = std::max<int64_t>(1, nsteps);
    step = 0;
  }
  void tick() {
    if (!base || step >= steps) return;
    const int64_t c0 = C * step / steps, c1 = C * (step + 1) / steps;
    ++step;
    for (int64_t c = c0; c < c1; ++c) {
      const char* p = base + c * cs_bytes;
      for (int64_t l = 0; l < lines; ++l) _mm_prefetch(p + l * 64, _MM_HINT_T1);
    }
  }
};

// The ov output chunk starting `left` outputs before the end of a group: two full vectors (kind
// 1), one full vector (0) or one masked remainder vector (2), and how many outputs it covers.
struct OvChunk {
  int64_t kind, width;
};
static inline OvChunk ov_chunk(int64_t left) {
  const int64_t kind = left >= 2 * W ? 1 : left >= W ? 0 : 2;
  return {kind, kind == 1 ? 2 * W : std::min<int64_t>(left, W)};
}

// The last few pixels of a unit (a pv vector would be mostly empty lanes) go through the ov
// kernel instead (vectorised over outputs, a broadcast per pixel), then are scattered into y.
// xt: activations of flat position f0 (read at xt + off[q] + p).
static void ov_tail(const Job& jb, int64_t g, int64_t b, const float* xt, int64_t f0, int64_t cnt,
                    const int64_t* off, float* tbuf) {
  const int64_t HoWo = jb.Ho * jb.Wo;
  float* outp[16];
  for (int64_t p = 0; p < cnt; ++p) outp[p] = tbuf + p * 2 * W;
  for (int64_t c0 = 0; c0 < jb.N;) {
    const auto [kind, width] = ov_chunk(jb.N - c0);
    const int64_t k0 = g * jb.N + c0;
    kOv[kind + 3][cnt](xt, 1, off, jb.kept * jb.taps,
                       jb.w + b * jb.w_bs + g * jb.kept * jb.taps * jb.N + c0,
                       jb.N, jb.bias ? jb.bias + k0 : nullptr, outp, width, nullptr, false);
    for (int64_t p = 0; p < cnt; ++p) {
      const int64_t f = f0 + p, oh = f / jb.Wq, ow = f - oh * jb.Wq;
      if (ow >= jb.Wo) continue;
      const int64_t pix = oh * jb.Wo + ow;
      for (int64_t n = 0; n < width; ++n) {
        const int64_t at = jb.y_cl ? (b * HoWo + pix) * jb.K + k0 + n
                                   : b * jb.y_bs + (k0 + n) * HoWo + pix;
        jb.y[at] = epi1(outp[p][n], jb.res ? jb.res + at : nullptr, jb.relu);
      }
    }
    c0 += width;
  }
}

// Segments of each pixel vector of the tile [f0, f0 + cnt) (flat positions of image b):
// NCHW in place when `in_place` (offsets relative to the output channel base), else a plain
// [n][TP] buffer.
static void pv_store_plan(const Job& jb, int64_t f0, int64_t cnt, bool in_place, PvStore& st) {
  const int64_t junk = jb.Wq - jb.Wo, hw = jb.Ho * jb.Wo;
  st.flat = jb.n_img == 1 && (!in_place || junk == 0);
  for (int64_t v = 0; v * W < cnt; ++v) {
    const int64_t f = f0 + v * W, lanes = std::min<int64_t>(W, cnt - v * W);
    int k = 0;
    if (jb.n_img > 1) {
      // stacked: one segment per image the vector touches; image i's pixels sit (K - 1) * hw
      // further on in y than their flat position (no junk columns: Wo == W)
      for (int64_t i = 0; i < lanes;) {
        const int64_t img = (f + i) / hw, end = std::min(lanes, (img + 1) * hw - f);
        st.off[v][k] = f + img * (jb.K - 1) * hw;
        st.mask[v][k] = vmask_range(i, end);
        ++k;
        i = end;
      }
    } else if (!in_place || junk == 0) {
      // (a plane without junk columns is the NCHW output itself: one segment per vector)
      st.off[v][0] = in_place ? f : v * W;
      st.mask[v][0] = vmask(lanes);
      k = 1;
    } else {
      for (int64_t i = 0; i < lanes;) {
        const int64_t r = (f + i) / jb.Wq;
        const int64_t row_end = std::min(f + lanes, r * jb.Wq + jb.Wq) - f;
        const int64_t valid_end = std::min(row_end, r * jb.Wq + jb.Wo - f);
        if (valid_end > i) {
          st.off[v][k] = f - r * junk;
          st.mask[v][k] = vmask_range(i, valid_end);
          ++k;
        }
        i = row_end;
      }
    }
    st.count[v] = k;
  }
}

// Group g over the flat pixel range [fa, fb) of image b, whose activation at flat position f is
// at xb + (f - fshift) (+ off[q]).
static void pv_unit(const Job& jb, const float* xb, int64_t fshift, int64_t b, int64_t fa,
                    int64_t fb, int64_t g, float* buf, float* tbuf, const int64_t* off,
                    Prefetch& pf) {
  const int64_t NC = pv_nc(), V = pv_vmax(NC), TP = jb.tile;
  const int64_t HoWo = jb.Ho * jb.Wo;
  const bool in_place = !jb.y_cl;  // NCHW output written directly, NHWC through buf
  const float* wg = jb.w + b * jb.w_bs + g * jb.kept * jb.taps * jb.N;
  PvStore st;
  // tile, then blocks of kept channels (whose rows of the tile stay in L1), then output chunks
  for (int64_t f0 = fa; f0 < fb; f0 += TP) {
    int64_t cnt = std::min(TP, fb - f0);
    const int64_t last = (cnt - 1) % W + 1;  // pixels in the last pixel vector
    const int64_t tail = last <= jb.tail_max ? last : 0;
    cnt -= tail;
    pf.tick();
    const float* xt = xb + (f0 - fshift);
    if (tail) ov_tail(jb, g, b, xt + cnt, f0 + cnt, tail, off, tbuf);
    if (cnt == 0) continue;
    const int64_t vused = (cnt + W - 1) / W, rem = cnt - (vused - 1) * W;
    pv_store_plan(jb, f0, cnt, in_place, st);
    const uint16_t* mb = jb.mbits ? jb.mbits + f0 / W * jb.taps : nullptr;
    // (the unit's own rows only: the next unit may be another thread's)
    const int64_t pf2 = f0 + jb.pf2 + TP <= fb ? jb.pf2 : 0;
    bool simple = !jb.simple3.empty() && vused == V;
    for (int64_t v = 0; simple && v < V; ++v) simple = jb.simple3[f0 / W + v];
    for (int64_t j0 = 0; j0 < std::max<int64_t>(jb.kept, 1); j0 += jb.jblock) {
      const int64_t q0 = j0 * jb.taps;
      const int64_t nq = (std::min(jb.kept, j0 + jb.jblock) - j0) * jb.taps;
      for (int64_t c0 = 0; c0 < jb.N; c0 += NC) {
        const int64_t nc = std::min(NC, jb.N - c0), k0 = g * jb.N + c0;
        float* out = in_place ? jb.y + b * jb.y_bs + k0 * HoWo : buf + c0 * TP;
        const int64_t ldo = in_place ? HoWo : TP;
        // NCHW: the epilogue runs in the tile's store; NHWC: in pv_writeback
        const bool fin = in_place && j0 + jb.jblock >= jb.kept;
        const float* rout = fin && jb.res ? jb.res + (out - jb.y) : nullptr;
        const PvFn fn = simple && nc == NC ? kPv3 : kPv[nc][std::min<int64_t>(vused, V)];
        fn(xt, off + q0, nq, wg + q0 * jb.N + c0, jb.N, rem, jb.bias ? jb.bias + k0 : nullptr,
           out, ldo, j0 > 0, st, c0 == 0 ? jb.pfd : 0,
           c0 == 0 ? pf2 : 0, jb.wpf, rout, jb.relu, fin, mb, jb.taps);
      }
    }
    if (!in_place)
      for (int64_t c0 = 0; c0 < jb.N; c0 += NC)
        pv_writeback(jb, buf + c0 * TP, TP, std::min(NC, jb.N - c0), g * jb.N + c0, b, f0, cnt);
  }
}

static void ov_unit(const Job& jb, int64_t u, int64_t g, const int64_t* off) {
  const UnitRange r = unit_range(jb, u);
  const int64_t b = r.b;
  const int64_t HoWo = jb.Ho * jb.Wo;
  const int64_t unit = jb.ld == 1 ? 3 : 0;
  float* outp[16];
  const float* resp[16];
  for (int64_t i = r.fa; i < r.fb; ++i) {
    const int64_t f0 = i * jb.L / jb.ntile_img, f1 = (i + 1) * jb.L / jb.ntile_img;
    const int64_t P = f1 - f0;
    const float* xb = jb.x + b * jb.bs + f0 * jb.ld;
    for (int64_t c0 = 0; c0 < jb.N;) {
      const auto [kind, width] = ov_chunk(jb.N - c0);
      const int64_t k0 = g * jb.N + c0;
      for (int64_t p = 0; p < P; ++p) {
        const int64_t f = f0 + p, oh = f / jb.Wq, ow = f - oh * jb.Wq;
        const int64_t at = (b * HoWo + oh * jb.Wo + ow) * jb.K + k0;
        outp[p] = ow < jb.Wo ? jb.y + at : nullptr;
        resp[p] = ow < jb.Wo && jb.res ? jb.res + at : nullptr;
      }
      const float* wg = jb.w + b * jb.w_bs + g * jb.kept * jb.taps * jb.N + c0;
      const float* bg = jb.bias ? jb.bias + k0 : nullptr;
      kOv[kind + unit][P](xb, jb.ld, off, jb.kept * jb.taps, wg, jb.N, bg, outp, width,
                          jb.res ? resp : nullptr, jb.relu);
      c0 += width;
    }
  }
}

// Groups [g_lo, g_hi) over unit u, channel-blocked (see Job::ovb): per tile of rows, per block of
// input channels, every group adds that block's kept channels into its outputs. The block is
// first copied into xbuf (rows of kOvbCb floats): rows of x lie C floats apart, and with C a
// multiple of 1024 (4 KB) every row's block would fall in the same L1 sets.
static void ovb_unit(const Job& jb, int64_t u, int64_t g_lo, int64_t g_hi, float* xbuf) {
  const UnitRange r = unit_range(jb, u);
  const int64_t HoWo = jb.Ho * jb.Wo, TP = ovb_tile_px();
  const int64_t fa = r.fa * jb.L / jb.ntile_img, fb = r.fb * jb.L / jb.ntile_img;
  const int64_t nb = jb.ncb + 1;
  // tiles of equal height (49 rows: 17 + 16 + 16, not 24 + 24 + 1: every tile sweeps all weights)
  const int64_t ntl = (fb - fa + TP - 1) / TP;
  for (int64_t t = 0; t < ntl; ++t) {
    const int64_t f0 = fa + (fb - fa) * t / ntl, f1 = fa + (fb - fa) * (t + 1) / ntl;
    const int64_t rows = f1 - f0;
    const float* xt = jb.x + r.b * jb.bs + f0 * jb.ld;
    float* yt = jb.y + (r.b * HoWo + f0) * jb.K;
    const float* rt = jb.res ? jb.res + (r.b * HoWo + f0) * jb.K : nullptr;
    for (int64_t k = 0; k < jb.ncb; ++k) {
      const bool fin = k + 1 == jb.ncb;  // the last block: the epilogue runs in its stores
      const int64_t c0 = k * kOvbCb, cn = std::min(kOvbCb, jb.C - c0);
      for (int64_t p = 0; p < rows; ++p)
        std::memcpy(xbuf + p * kOvbCb, xt + p * jb.ld + c0, 4 * cn);
      const float* xk = xbuf - c0;  // kept channel c of row p at xk + p * kOvbCb + c
      // the next block's rows (or the next tile's first block) go to L2 while the groups run,
      // a share of the lines per group
      const int64_t next_rows = t + 1 < ntl ? fa + (fb - fa) * (t + 2) / ntl - f1 : 0;
      const int64_t pf_rows = fin ? next_rows : rows;
      const char* pf_base = (const char*)(fin ? xt + rows * jb.ld : xt + c0 + kOvbCb);
      const int64_t pf_cn = std::min(kOvbCb, fin ? jb.C : jb.C - c0 - kOvbCb);
      const int64_t row_lines = (4 * pf_cn + 63) / 64, pf_lines = pf_rows * row_lines;
      for (int64_t g = g_lo; g < g_hi; ++g) {
        for (int64_t i = pf_lines * (g - g_lo) / (g_hi - g_lo),
                     e = pf_lines * (g + 1 - g_lo) / (g_hi - g_lo);
             i < e; ++i)
          _mm_prefetch(pf_base + (i / row_lines) * 4 * jb.ld + (i % row_lines) * 64, _MM_HINT_T1);
        const int64_t j0 = jb.cbound[g * nb + k], j1 = jb.cbound[g * nb + k + 1];
        if (k > 0 && j0 == j1 && !fin) continue;
        const int32_t* ig = jb.idx + g * jb.kept + j0;
        const float* wg = jb.w + r.b * jb.w_bs + (g * jb.kept + j0) * jb.N;
        for (int64_t n0 = 0; n0 < jb.N;) {
          const int64_t nv = jb.N - n0 >= 2 * W ? 2 : 1, pm = ovb_pmax((int)nv);
          const int64_t k0 = g * jb.N + n0;
          for (int64_t p0 = 0; p0 < rows; p0 += pm) {
            const int64_t P = std::min(pm, rows - p0);
            kOvb[nv - 1][P](xk + p0 * kOvbCb, ig, j1 - j0, wg + n0, jb.N,
                            jb.bias ? jb.bias + k0 : nullptr, yt + p0 * jb.K + k0, jb.K, k > 0,
                            fin && rt ? rt + p0 * jb.K + k0 : nullptr, fin && jb.relu, jb.ovb_wpf);
          }
          n0 += nv * W;
        }
      }
    }
  }
}

// Claim chunks of (unit x group block) items until none are left. The next chunk is claimed
// before the current one runs, so the next unit's rows can be prefetched while this one computes.
void run(const Job& jb) {
  const int64_t total = jb.n_units * jb.n_gb;
  // per-thread scratch, kept across calls (OpenMP threads persist): no page faults per call
  static thread_local std::vector<float> buf, tbuf, loc;
  static thread_local std::vector<int64_t> off;
  if (jb.kind == Kind::PV && (int64_t)buf.size() < jb.N * jb.tile + W)
    buf.resize(jb.N * jb.tile + W);
  if ((int64_t)tbuf.size() < 16 * 2 * W) tbuf.resize(16 * 2 * W);
  if (jb.rb && (int64_t)loc.size() < jb.loc_floats) loc.resize(jb.loc_floats);
  if ((int64_t)off.size() < jb.kept * jb.taps + kOffPad) off.resize(jb.kept * jb.taps + kOffPad);
  if (jb.ovb && (int64_t)tbuf.size() < ovb_tile_px() * kOvbCb) tbuf.resize(ovb_tile_px() * kOvbCb);
  int64_t g_filled = -1, packed = -1;
  const int self = jb.n_ranges > 1 ? omp_get_thread_num() % jb.n_ranges : 0;
  int victim = 0;  // ranges tried so far, own first
  auto claim = [&]() -> int64_t {
    for (; victim < jb.n_ranges; ++victim) {
      Range& rg = jb.ranges[(self + victim) % jb.n_ranges];
      if (rg.next.load(std::memory_order_relaxed) >= rg.hi) continue;
      const int64_t c = rg.next.fetch_add(1, std::memory_order_relaxed);
      if (c < rg.hi) return c * jb.chunk;
    }
    return -1;
  };
  auto unit_of = [&](int64_t it) { return jb.g_outer ? it % jb.n_units : it / jb.n_gb; };
  auto gb_of = [&](int64_t it) { return jb.g_outer ? it / jb.n_units : it % jb.n_gb; };
  for (int64_t lo = claim(); lo >= 0;) {
    const int64_t hi = std::min(total, lo + jb.chunk);
    // claim the next chunk up front only when its unit is to be prefetched: a claimed chunk is
    // work the other threads cannot take over if this thread is descheduled
    const int64_t nlo = jb.pf ? claim() : -1;
    for (int64_t it = lo; it < hi; ++it) {
      const int64_t u = unit_of(it), gb = gb_of(it);
      const int64_t g_lo = jb.G * gb / jb.n_gb, g_hi = jb.G * (gb + 1) / jb.n_gb;
      if (jb.ovb) {
        ovb_unit(jb, u, g_lo, g_hi, tbuf.data());
        continue;
      }
      if (jb.kind == Kind::OV) {
        for (int64_t g = g_lo; g < g_hi; ++g) {
          if (g != g_filled) fill_offsets(jb, g, off.data());
          g_filled = g;
          ov_unit(jb, u, g, off.data());
        }
        continue;
      }
      const UnitRange r = unit_range(jb, u);
      Prefetch pf;
      const int64_t nit = it + 1 < hi ? it + 1 : nlo;
      if (jb.pf && nit >= 0 && unit_of(nit) != u)
        pf.init(jb, unit_of(nit), (g_hi - g_lo) * ((r.fb - r.fa + jb.tile - 1) / jb.tile));
      const float* xb = jb.x + r.b * jb.bs;
      int64_t fshift = 0;
      if (jb.rb) {
        const Pack& pk = *jb.pk;
        if (packed != u)
          pack_rows_nchw(pk, r.b, 0, jb.C, r.row0, std::min(pk.Hq, r.row0 + jb.loc_rows),
                         loc.data(), jb.loc_plane, jb.cs);
        packed = u;
        xb = loc.data();
        fshift = r.row0 * jb.Wq;
      }
      for (int64_t g = g_lo; g < g_hi; ++g) {
        if (g != g_filled) fill_offsets(jb, g, off.data());
        g_filled = g;
        pv_unit(jb, xb, fshift, r.b, r.fa, r.fb, g, buf.data(), tbuf.data(), off.data(), pf);
      }
    }
    lo = jb.pf ? nlo : claim();
  }
}

#endif  // GP_ONEXN_BODY
