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
//   cpu_input_sparse_gemv(x, p, wt, bias) -> (y [M, N], kept int64 [M], rows_read int64 [1]),
//     M <= kMaxM (16) rows; the crossover (kernels/crossover.py) picks the M it serves.
//   cpu_input_sparse_gemv_max_rows() -> kMaxM.
//   cpu_kmajor_weight(w [N, K]) -> Wt [K, N] of w's dtype: the GEMV's weight layout (below),
//     contiguous (w: any dense 2-D CPU tensor, else an error naming it), in its
//     own 2 MiB-aligned allocation advised MADV_HUGEPAGE (a no-op where transparent huge pages are
//     off: the copy is then in 4 KB pages).
//
// GEMV layout: Wt [K, N] contiguous (K-major: row k holds the N weights that x[k] multiplies), so
// a dropped input skips one whole contiguous row. The kept rows of all M rows (their union) are
// read once; each output row uses only its own kept entries (the others are multiplied as zeros).
// Threads split N into equal column chunks (at::parallel_for); within a chunk the fp32
// accumulators [M, chunk] stay in L1 and the kept weight rows stream through in groups of 8:
// every group's slice is contiguous (up to 16 KB per row in bf16/fp16, 32 KB in fp32), each
// weight vector is loaded and converted once for all M rows; the current rows are prefetched a
// few lines ahead into L1 and the next group's slice into L2 while the current one is summed.
// Memory bandwidth bounds decode, so the time tracks the kept share of the rows. The K-major copy
// lives in 2 MiB-aligned memory advised for transparent huge pages (cpu_kmajor_weight): kept rows
// are scattered over the whole weight, and with 4 KB pages every few KB of a row starts on a page
// whose translation misses the TLB and where the hardware prefetcher stops.
//
// Instruction sets: one source, built once per ISA by kernels/cpu_backend.py (as vLLM builds
// _C_AVX2 / _C_AVX512): -mavx512f ... gives 16-lane fp32 vectors, -mavx2 -mfma -mf16c 8-lane ones.
// bf16 -> fp32 puts the 16 bits above 16 zero bits (one load and two vpunpck[lh]wd with zero per
// two vectors, which permutes the columns within 128-bit lanes: acc_index), fp16 -> fp32 is F16C /
// AVX-512F vcvtph2ps; products are then fp32 FMAs (exact for bf16 x bf16). AVX-512-BF16's vdpbf16ps
// is not used: two kept rows can be interleaved in registers (vpunpck[lh]wd) for it, but it halves
// only the FMAs, which bound the loop only at about 8 rows and more, where the dense GEMM is faster
// anyway (results:
// kernels/bench/results/cpu-amd-epyc-zen5-avx512bf16-2026-12-07/sparse_gemv_rows_once.md).
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
#include <cstdlib>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

#include <sys/mman.h>

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
// 2 * kLanes bf16 in one load, widened by interleaving with zeros: lo holds elements 0-3, 8-11,
// 16-19, 24-27, hi the others (see acc_index).
inline void vload2(const c10::BFloat16* p, Vec& lo, Vec& hi) {
  const __m512i raw = _mm512_loadu_si512(p);
  lo = _mm512_castsi512_ps(_mm512_unpacklo_epi16(_mm512_setzero_si512(), raw));
  hi = _mm512_castsi512_ps(_mm512_unpackhi_epi16(_mm512_setzero_si512(), raw));
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
inline void vload2(const c10::BFloat16* p, Vec& lo, Vec& hi) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  lo = _mm256_castsi256_ps(_mm256_unpacklo_epi16(_mm256_setzero_si256(), raw));
  hi = _mm256_castsi256_ps(_mm256_unpackhi_epi16(_mm256_setzero_si256(), raw));
}
inline Vec vset1(float v) { return _mm256_set1_ps(v); }
inline Vec vfma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
inline void vstore(float* p, Vec v) { _mm256_storeu_ps(p, v); }
#else
#error "build with -mavx512f -mavx512bw -mavx512vl -mavx2 -mfma -mf16c, or -mavx2 -mfma -mf16c"
#endif

// fp32 and fp16: two vectors in natural order.
template <typename T>
inline void vload2(const T* p, Vec& lo, Vec& hi) {
  lo = vload(p);
  hi = vload(p + kLanes);
}

// ---------------------------------------------------------------------------------------------
// Input-sparse GEMV over a K-major weight.

constexpr int kGroup = 8;           // weight rows summed per pass over the accumulators
constexpr int kAccFloats = 8192;    // accumulator budget per thread: 32 KB, L1-resident
constexpr int kMaxM = 16;           // rows of x per call (chunks keep >= 512 columns)
constexpr int kAhead = 8;           // lines of each current row prefetched ahead (512 B)
constexpr int kBlock = 2 * kLanes;  // columns per step of the vector loop (two accumulators)

// Where column q of a whole block of kBlock columns sits in the accumulators. bf16 weights are
// widened by interleaving with zeros (vload2: one load and two unpacks per 2 * kLanes columns,
// against two loads, two widenings and two shifts), which permutes the columns within each
// 128-bit lane of 8: the first 4 go to the block's first vector, the last 4 to its second. The
// other dtypes keep their order. The tail past the last whole block is in order.
template <typename T>
constexpr int64_t acc_index(int64_t q) {
  if constexpr (!std::is_same_v<T, c10::BFloat16>) {
    return q;
  } else {
    const int64_t lane = q / 8, w = q % 8;
    return (w < 4 ? 0 : kLanes) + lane * 4 + (w % 4);
  }
}

// One group of kGroup kept weight rows into the accumulators acc [M, cols] of a column chunk:
// each vector of weights is loaded and converted once, then FMA'd into all M rows (xg [kGroup, M]:
// the inputs each row multiplies). Two prefetches per line read: the current rows kAhead lines
// ahead into L1 (T0), and next, the following group's rows (nullptr when there is none), at the
// same offset into L2 (T1: a group is kGroup rows of up to 16-32 KB ahead, more than L1 holds
// beside the accumulators). With cold caches, as in serving, these prefetches and the huge pages of
// the K-major copy (cpu_kmajor_weight) together took the kernel at M = 1 from 0.58 / 0.39 / 0.61 /
// 0.58 of oneDNN's time to 0.40 / 0.27 / 0.50 / 0.53 on one Zen 5 core (Llama-3.2-1B gate_up_proj
// and down_proj, Llama-3.1-8B's; the next group alone into L1 (NTA) was the first; each step's
// share: kernels/bench/results/cpu-amd-epyc-zen5-avx512bf16-2026-12-08/README.md).
template <typename T>
inline void group_pass(float* acc, int64_t cols, const T* const* rows, const T* const* next,
                       const float* xg, int64_t M) {
  constexpr int kLine = 64 / sizeof(T);  // elements per cache line
  int64_t v = 0;
  for (; v + kBlock <= cols; v += kBlock) {
    for (int64_t l = (v + kLine - 1) / kLine * kLine; l < v + kBlock; l += kLine) {
      if (l + kAhead * kLine < cols) {
        for (int i = 0; i < kGroup; ++i)
          _mm_prefetch(reinterpret_cast<const char*>(rows[i] + l + kAhead * kLine), _MM_HINT_T0);
      }
      if (next != nullptr) {
        for (int i = 0; i < kGroup; ++i)
          _mm_prefetch(reinterpret_cast<const char*>(next[i] + l), _MM_HINT_T1);
      }
    }
    Vec lo[kGroup], hi[kGroup];
    for (int i = 0; i < kGroup; ++i) vload2(rows[i] + v, lo[i], hi[i]);
    for (int64_t m = 0; m < M; ++m) {
      float* a = acc + m * cols + v;
      Vec s0 = vload(a), s1 = vload(a + kLanes);
      for (int i = 0; i < kGroup; ++i) {
        const Vec xi = vset1(xg[i * M + m]);
        s0 = vfma(xi, lo[i], s0);
        s1 = vfma(xi, hi[i], s1);
      }
      vstore(a, s0);
      vstore(a + kLanes, s1);
    }
  }
  for (; v < cols; ++v) {
    for (int64_t m = 0; m < M; ++m) {
      float s = acc[m * cols + v];
      for (int i = 0; i < kGroup; ++i) s = std::fma(xg[i * M + m], float(rows[i][v]), s);
      acc[m * cols + v] = s;
    }
  }
}

// Columns [n0, n0 + cols) of y for all M rows: idx [nk] the kept weight rows (ascending; nk a
// multiple of kGroup, padded with -1: a row of zeros), xv [nk, M] the inputs they multiply (0 where
// a row does not keep that input, and for the padding).
template <typename T>
void gemv_chunk(const T* wt, int64_t N, const int64_t* idx, const float* xv, int64_t nk, int64_t M,
                int64_t n0, int64_t cols, const T* bias, T* y) {
  alignas(64) static const float kZeros[kAccFloats] = {};  // all-zero bits in every dtype
  alignas(64) float acc[kAccFloats];
  std::fill(acc, acc + M * cols, 0.0f);
  const auto row = [&](int64_t k) {
    return k < 0 ? reinterpret_cast<const T*>(kZeros) : wt + k * N + n0;
  };
  const T* rows[kGroup];
  const T* next[kGroup];
  for (int64_t g = 0; g < nk; g += kGroup) {
    const bool has_next = g + kGroup < nk;
    for (int i = 0; i < kGroup; ++i) {
      rows[i] = row(idx[g + i]);
      if (has_next) next[i] = row(idx[g + kGroup + i]);
    }
    group_pass<T>(acc, cols, rows, has_next ? next : nullptr, xv + g * M, M);
  }
  const int64_t whole = cols / kBlock * kBlock;  // columns in whole blocks (acc_index)
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t j = 0; j < cols; ++j) {
      float s = acc[m * cols + (j < whole ? j / kBlock * kBlock + acc_index<T>(j % kBlock) : j)];
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
    // Union of the rows' kept sets, and per kept row the M inputs it multiplies (branch-free:
    // every k writes its slot, which only a kept k keeps), padded to whole groups with zero rows.
    std::vector<int64_t> idx(K + kGroup, -1);
    std::vector<float> xv((K + kGroup) * M, 0.0f);
    int64_t counts[kMaxM] = {};
    int64_t nk = 0;
    for (int64_t k = 0; k < K; ++k) {
      bool any = false;
      float* vals = xv.data() + nk * M;
      for (int64_t m = 0; m < M; ++m) {
        const scalar_t v = xp[m * ld + k];
        const bool keep = C::of(v) >= thr[m];
        counts[m] += keep;
        any |= keep;
        vals[m] = keep ? float(v) : 0.0f;
      }
      idx[nk] = k;
      nk += any;
    }
    std::copy(counts, counts + M, kept.data_ptr<int64_t>());
    rows_read.data_ptr<int64_t>()[0] = nk;
    const int64_t padded = (nk + kGroup - 1) / kGroup * kGroup;
    std::fill(idx.begin() + nk, idx.end(), -1);  // slot nk may hold a dropped k
    if (M == 0 || N == 0) return;
    // Column chunks: every thread gets the same number of equal chunks (a multiple of kBlock
    // columns), each as wide as the accumulator budget allows, so that every kept weight row
    // streams in runs of up to kAccFloats / M columns.
    const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(),
                                                                   (N + kLanes - 1) / kLanes));
    const int64_t per_thread = (N + threads - 1) / threads;
    const int64_t max_chunk = std::max<int64_t>(kBlock, kAccFloats / M / kBlock * kBlock);
    const int64_t pieces = (per_thread + max_chunk - 1) / max_chunk;
    const int64_t chunk = ((per_thread + pieces - 1) / pieces + kBlock - 1) / kBlock * kBlock;
    const int64_t n_chunks = (N + chunk - 1) / chunk;
    const scalar_t* w = wt.data_ptr<scalar_t>();
    const scalar_t* b = bias.has_value() ? bias->data_ptr<scalar_t>() : nullptr;
    scalar_t* yp = y.data_ptr<scalar_t>();
    at::parallel_for(0, n_chunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t n0 = c * chunk;
        gemv_chunk<scalar_t>(w, N, idx.data(), xv.data(), padded, M, n0,
                             std::min(chunk, N - n0), b, yp);
      }
    });
  });
  return {y, kept, rows_read};
}

int64_t max_rows() { return kMaxM; }

at::Tensor kmajor_weight(const at::Tensor& w) {
  TORCH_CHECK(w.device().is_cpu() && w.layout() == at::kStrided && w.dim() == 2,
              "w must be a dense 2-D weight [N, K] on the CPU, got ", w.sizes(), " ", w.layout(),
              " on ", w.device());
  constexpr size_t kHuge = size_t(2) << 20;  // x86-64's transparent huge page
  const size_t bytes = static_cast<size_t>(w.numel()) * w.element_size();
  const size_t padded = std::max<size_t>(1, (bytes + kHuge - 1) / kHuge) * kHuge;
  std::unique_ptr<void, decltype(&std::free)> mem(std::aligned_alloc(kHuge, padded), &std::free);
  TORCH_CHECK(mem != nullptr, "cpu_kmajor_weight: out of memory allocating ", padded, " bytes");
  madvise(mem.get(), padded, MADV_HUGEPAGE);  // advice: refused (THP off) leaves 4 KB pages
  at::Tensor wt = at::from_blob(mem.get(), {w.size(1), w.size(0)}, [](void* q) { std::free(q); },
                                w.options());
  mem.release();  // owned by wt's deleter from here
  wt.copy_(w.t());
  return wt;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(vllm_sparsity, m) {
  m.def("cpu_top_p_threshold(Tensor x, Tensor p) -> Tensor");
  m.def("cpu_top_p_sparsify(Tensor x, Tensor p) -> (Tensor, Tensor)");
  m.def("cpu_input_sparse_gemv(Tensor x, Tensor p, Tensor wt, Tensor? bias) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("cpu_input_sparse_gemv_max_rows() -> int", &max_rows);
  m.def("cpu_kmajor_weight(Tensor w) -> Tensor");
}

TORCH_LIBRARY_IMPL(vllm_sparsity, CPU, m) {
  m.impl("cpu_top_p_threshold", &top_p_threshold);
  m.impl("cpu_top_p_sparsify", &top_p_sparsify);
  m.impl("cpu_input_sparse_gemv", &input_sparse_gemv);
  m.impl("cpu_kmajor_weight", &kmajor_weight);
}
