// Top-p threshold and fused input-sparse GEMV on the CPU (torch ops under vllm_sparsity::).
//
// Maths: keep[m, k] = code(x[m, k]) >= thr[m] (code: |x|'s bits with the sign cleared, which orders
// like |x|), thr from the exact top-p rule of vllm_sparsity/rule.py (top_p_select.h: the threshold
// per row and the sparsify op); y[m, n] = sum_k keep[m, k] * x[m, k] * Wt[k, n] (+ bias[n]), fp32
// accumulation, output in x's dtype. Edge cases as rule.py: zeros never kept, p >= 1 keeps every
// nonzero, a NaN row is kept whole (thr = 0), +-Inf rows keep only their infinities, ties are kept
// together.
//
// p: float64 on the CPU, one element for every row or one per row ([M] / [M, 1], contiguous: the
// per-token p of requests that carry their own).
//
// Ops (schemas in TORCH_LIBRARY_FRAGMENT below; fake impls in kernels/cpu_backend.py):
//   cpu_top_p_threshold(x, p) -> t [M, 1]: rule.top_p_threshold's contract (NaN: keep the row).
//   cpu_top_p_sparsify(x, p) -> (x with dropped entries zeroed, kept int64 [M]): for prefill,
//     followed by vLLM's own dense GEMM.
//   cpu_input_sparse_gemv(x, p, wt, bias) -> (y [M, N], kept int64 [M], rows_read int64 [1]).
//
// GEMV layout: Wt [K, N] contiguous (K-major: row k holds the N weights that x[k] multiplies), so
// a dropped input skips one whole contiguous row. The kept rows of all M rows (their union) are
// read once; each output row uses only its own kept entries (the others are multiplied as zeros).
// Threads split N into column chunks (at::parallel_for); within a chunk the fp32 accumulators
// [M, chunk] stay in L1 and the kept weight rows stream through in groups of 4: every group's
// slice is contiguous (1-8 KB per row), and the next group's slice is prefetched while the current
// one is summed. Memory bandwidth bounds decode, so the time tracks the kept share of the rows.
//
// Instruction sets: one source, built once per ISA by kernels/cpu_backend.py (as vLLM builds
// _C_AVX2 / _C_AVX512): -mavx512f ... gives 16-lane fp32 vectors, -mavx2 -mfma -mf16c 8-lane ones.
// bf16 -> fp32 is a 16-bit shift, fp16 -> fp32 is F16C / AVX-512F vcvtph2ps; products are then
// fp32 FMAs (exact for bf16 x bf16). AVX-512-BF16's vdpbf16ps is not used: it sums adjacent pairs
// along K, which needs a pair-interleaved weight layout that breaks skipping single rows, and the
// conversion it saves is not the bottleneck of a bandwidth-bound GEMV.
//
// Source: the rule is the paper's (Szatkowski et al., "Universal Properties of Activation Sparsity
// in Modern LLMs", Sec. 3.1) as restated in vllm_sparsity/rule.py; the K-major input-sparse GEMV
// follows TEAL (https://github.com/FasterDecoding/TEAL), after Deja Vu; written afresh for CPUs.

#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>
#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "top_p_select.h"  // threshold_code, the sparsify op, shared argument checks

namespace {

#if defined(__AVX512F__)
using Vec = __m512;
constexpr int kLanes = 16;
inline Vec vload(const float* p) { return _mm512_loadu_ps(p); }
inline Vec vload(const c10::BFloat16* p) {
  __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline Vec vload(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
inline Vec vset1(float v) { return _mm512_set1_ps(v); }
inline Vec vfma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
inline void vstore(float* p, Vec v) { _mm512_storeu_ps(p, v); }
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
using Vec = __m256;
constexpr int kLanes = 8;
inline Vec vload(const float* p) { return _mm256_loadu_ps(p); }
inline Vec vload(const c10::BFloat16* p) {
  __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline Vec vload(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline Vec vset1(float v) { return _mm256_set1_ps(v); }
inline Vec vfma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
inline void vstore(float* p, Vec v) { _mm256_storeu_ps(p, v); }
#else
#error "build with -mavx512f -mavx512bw -mavx512vl -mavx2 -mfma -mf16c, or -mavx2 -mfma -mf16c"
#endif

// ---------------------------------------------------------------------------------------------
// Input-sparse GEMV over a K-major weight.

constexpr int kGroup = 4;          // weight rows summed per pass over the accumulators
constexpr int kAccFloats = 4096;   // accumulator budget per thread: 16 KB, L1-resident
constexpr int kMaxM = kAccFloats / 256;  // rows of x per call (chunks keep >= 256 columns)

template <typename T, bool kPrefetch>
inline void group_pass(float* acc, const T* const* rows, const T* const* next, const float* xm,
                       int64_t cols) {
  const Vec x0 = vset1(xm[0]), x1 = vset1(xm[1]), x2 = vset1(xm[2]), x3 = vset1(xm[3]);
  constexpr int kLine = 64 / sizeof(T);  // elements per cache line
  int64_t v = 0;
  for (; v + kLanes <= cols; v += kLanes) {
    if (kPrefetch && v % kLine == 0) {
      for (int i = 0; i < kGroup; ++i) _mm_prefetch(reinterpret_cast<const char*>(next[i] + v),
                                                    _MM_HINT_T0);
    }
    Vec s = vload(acc + v);
    s = vfma(x0, vload(rows[0] + v), s);
    s = vfma(x1, vload(rows[1] + v), s);
    s = vfma(x2, vload(rows[2] + v), s);
    s = vfma(x3, vload(rows[3] + v), s);
    vstore(acc + v, s);
  }
  for (; v < cols; ++v) {
    float s = acc[v];
    for (int i = 0; i < kGroup; ++i) s = std::fma(xm[i], float(rows[i][v]), s);
    acc[v] = s;
  }
}

template <typename T>
inline void row_pass(float* acc, const T* row, float xm, int64_t cols) {
  const Vec x0 = vset1(xm);
  int64_t v = 0;
  for (; v + kLanes <= cols; v += kLanes) vstore(acc + v, vfma(x0, vload(row + v), vload(acc + v)));
  for (; v < cols; ++v) acc[v] = std::fma(xm, float(row[v]), acc[v]);
}

// Columns [n0, n0 + cols) of y for all M rows: idx [nk] the kept weight rows (ascending), xv
// [nk, M] the inputs they multiply (0 where a row does not keep that input).
template <typename T>
void gemv_chunk(const T* wt, int64_t N, const int64_t* idx, const float* xv, int64_t nk, int64_t M,
                int64_t n0, int64_t cols, const T* bias, T* y) {
  alignas(64) float acc[kAccFloats];
  std::fill(acc, acc + M * cols, 0.0f);
  const T* rows[kGroup];
  const T* next[kGroup];
  float xg[kGroup];
  int64_t g = 0;
  for (; g + kGroup <= nk; g += kGroup) {
    const bool has_next = g + 2 * kGroup <= nk;
    for (int i = 0; i < kGroup; ++i) {
      rows[i] = wt + idx[g + i] * N + n0;
      next[i] = wt + idx[has_next ? g + kGroup + i : g + i] * N + n0;
    }
    for (int64_t m = 0; m < M; ++m) {
      for (int i = 0; i < kGroup; ++i) xg[i] = xv[(g + i) * M + m];
      // Rows of this group stay in L1 for the later rows of x: prefetch the next group once.
      if (m == 0 && has_next)
        group_pass<T, true>(acc + m * cols, rows, next, xg, cols);
      else
        group_pass<T, false>(acc + m * cols, rows, next, xg, cols);
    }
  }
  for (; g < nk; ++g) {
    const T* row = wt + idx[g] * N + n0;
    for (int64_t m = 0; m < M; ++m) row_pass<T>(acc + m * cols, row, xv[g * M + m], cols);
  }
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t j = 0; j < cols; ++j) {
      float s = acc[m * cols + j];
      if (bias != nullptr) s += float(bias[n0 + j]);
      y[m * N + n0 + j] = T(s);  // round to nearest even
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> input_sparse_gemv(
    const at::Tensor& x, const at::Tensor& p, const at::Tensor& wt,
    const c10::optional<at::Tensor>& bias) {
  check_x(x);
  const RowP pv = read_p(p, x.size(0));
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(M <= kMaxM, "x has ", M, " rows; cpu_input_sparse_gemv takes at most ", kMaxM);
  TORCH_CHECK(wt.device().is_cpu() && wt.dim() == 2 && wt.size(0) == K && wt.is_contiguous(),
              "wt must be a contiguous K-major weight [K, N] on the CPU with K = ", K,
              ", got shape ", wt.sizes(), " strides ", wt.strides());
  TORCH_CHECK(wt.scalar_type() == x.scalar_type(), "wt must have x's dtype ", x.scalar_type(),
              ", got ", wt.scalar_type());
  const int64_t N = wt.size(1);
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N && bias->is_contiguous() &&
                    bias->scalar_type() == x.scalar_type(),
                "bias must be contiguous [", N, "] of x's dtype, got ", bias->sizes(), " ",
                bias->scalar_type());
  }
  at::Tensor y = at::empty({M, N}, x.options());
  at::Tensor kept = at::zeros({M}, x.options().dtype(at::kLong));
  at::Tensor rows_read = at::empty({1}, x.options().dtype(at::kLong));
  dispatch_dtype(x.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    using C = Code<scalar_t>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const int64_t ld = x.stride(0);
    // Decode rows: thresholds on the calling thread (tens of microseconds against a GEMV of
    // milliseconds), so that the call forks threads once, for the GEMV.
    std::vector<uint32_t> thr(M);
    for (int64_t m = 0; m < M; ++m) thr[m] = threshold_code<scalar_t>(xp + m * ld, K, pv(m));
    int64_t* kp = kept.data_ptr<int64_t>();
    // Union of the rows' kept sets, and per kept row the M inputs it multiplies.
    std::vector<int64_t> idx;
    std::vector<float> xv;
    idx.reserve(K);
    xv.reserve(K * M);
    for (int64_t k = 0; k < K; ++k) {
      bool any = false;
      float vals[kMaxM];
      for (int64_t m = 0; m < M; ++m) {
        const scalar_t v = xp[m * ld + k];
        const bool keep = C::of(v) >= thr[m];
        kp[m] += keep;
        any |= keep;
        vals[m] = keep ? float(v) : 0.0f;
      }
      if (any) {
        idx.push_back(k);
        xv.insert(xv.end(), vals, vals + M);
      }
    }
    const int64_t nk = int64_t(idx.size());
    rows_read.data_ptr<int64_t>()[0] = nk;
    if (M == 0 || N == 0) return;
    // Column chunks: as wide as the accumulator budget allows (a power of two, so rows stream in
    // long contiguous runs), narrower when N is too small to give every thread one.
    int64_t chunk = 1;
    while (chunk * 2 * M <= kAccFloats) chunk *= 2;
    const int64_t threads = at::get_num_threads();
    const int64_t even = (N + threads - 1) / threads;
    chunk = std::min(chunk, (even + kLanes - 1) / kLanes * kLanes);
    const int64_t n_chunks = (N + chunk - 1) / chunk;
    const scalar_t* w = wt.data_ptr<scalar_t>();
    const scalar_t* b = bias.has_value() ? bias->data_ptr<scalar_t>() : nullptr;
    scalar_t* yp = y.data_ptr<scalar_t>();
    at::parallel_for(0, n_chunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t n0 = c * chunk;
        gemv_chunk<scalar_t>(w, N, idx.data(), xv.data(), nk, M, n0, std::min(chunk, N - n0), b,
                             yp);
      }
    });
  });
  return {y, kept, rows_read};
}

int64_t max_rows() { return kMaxM; }

}  // namespace

TORCH_LIBRARY_FRAGMENT(vllm_sparsity, m) {
  m.def("cpu_top_p_threshold(Tensor x, Tensor p) -> Tensor");
  m.def("cpu_top_p_sparsify(Tensor x, Tensor p) -> (Tensor, Tensor)");
  m.def("cpu_input_sparse_gemv(Tensor x, Tensor p, Tensor wt, Tensor? bias) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("cpu_input_sparse_gemv_max_rows() -> int", &max_rows);
}

TORCH_LIBRARY_IMPL(vllm_sparsity, CPU, m) {
  m.impl("cpu_top_p_threshold", &top_p_threshold);
  m.impl("cpu_top_p_sparsify", &top_p_sparsify);
  m.impl("cpu_input_sparse_gemv", &input_sparse_gemv);
}
