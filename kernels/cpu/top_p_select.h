// Top-p threshold per row and the prefill sparsify op; included by input_sparse_gemv.cpp (one
// translation unit, built once per ISA: AVX-512BW where built with it, else AVX2).
//
// Threshold: keep[k] = code(x[k]) >= thr, code = |x|'s bits (sign cleared, orders like |x|), thr
// from the exact top-p rule of vllm_sparsity/rule.py: a radix select over the codes with float64
// histograms of |x| mass, 2 levels of 8 + 7 bits for bf16/fp16, 4 for fp32.
//
// The same float64 histograms in fewer, cheaper passes:
// - level 0 bins the top 8 code bits, so every entry of a bin has the same exponent (bf16, fp32:
//   the bin is the exponent; fp16: exponent and 3 mantissa bits) and its magnitude is an integer
//   significand times the bin's power of two. One scalar pass sums the significands per bin in
//   64-bit integers (bf16/fp16: codes and count packed in one integer, sum(codes) - count * base
//   being the significands' sum); 4 copies of the histogram break the dependency chains of rows
//   whose entries share a few exponents. Integer sums are exact, and so are the float64 per-bin
//   sums of rule.py (K entries of <= 24-bit significands at one exponent): same bins.
// - the next levels resolve only the boundary bin. bf16/fp16: its 128 digits are single codes, so
//   its histogram is count * magnitude per code (exact), counted over the entries a vector compare
//   finds in it. fp32: levels 1-3 run over its codes, gathered in one pass.
// - the sparsify op then zeroes with a vector compare and a masked store, counting the kept ones.
// From the histograms on, the float64 operations (row total, target, reach) are rule.py's, so the
// thresholds are bit-identical to it wherever rule.py's sums are exact (see rule.py).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

template <typename T> struct Code;
template <> struct Code<c10::BFloat16> {
  using U = uint16_t;
  static constexpr int kBits = 15, kLevels = 2, kMant = 7, kBias = 127;
  static constexpr int kDigits[4] = {8, 7, 0, 0};
  static constexpr U kInf = 0x7F80;
  static U of(const c10::BFloat16& v) { return v.x & 0x7FFF; }
  static double mag(U c) {  // |x| from its code, exactly
    uint32_t b = uint32_t(c) << 16;
    float f;
    std::memcpy(&f, &b, 4);
    return f;
  }
  static c10::BFloat16 from_code(U c) { return c10::BFloat16(c, c10::BFloat16::from_bits()); }
};
template <> struct Code<c10::Half> {
  using U = uint16_t;
  static constexpr int kBits = 15, kLevels = 2, kMant = 10, kBias = 15;
  static constexpr int kDigits[4] = {8, 7, 0, 0};
  static constexpr U kInf = 0x7C00;
  static U of(const c10::Half& v) { return v.x & 0x7FFF; }
  static double mag(U c) { return float(c10::Half(c, c10::Half::from_bits())); }
  static c10::Half from_code(U c) { return c10::Half(c, c10::Half::from_bits()); }
};
template <> struct Code<float> {
  using U = uint32_t;
  static constexpr int kBits = 31, kLevels = 4;
  static constexpr int kDigits[4] = {8, 8, 8, 7};
  static constexpr U kInf = 0x7F800000;
  static U of(const float& v) {
    uint32_t b;
    std::memcpy(&b, &v, 4);
    return b & 0x7FFFFFFF;
  }
  static double mag(U c) {
    float f;
    std::memcpy(&f, &c, 4);
    return f;
  }
  static float from_code(U c) { return float(mag(c)); }
};

// One level's digit from its float64 histogram, as rule.py: mass at or above each digit (summed
// from the top digit down, as flip-cumsum-flip does) plus the mass above the bin found so far; the
// digit is the largest whose mass reaches the target. Updates `above` to the mass above the digit.
// Empty digits at either end are not summed: adding +0 changes no sum, so their reach is the
// reach next to them.
inline int pick_digit(const double* hist, int n_bins, double target, double& above) {
  int hi = n_bins - 1, lo = 0;
  while (hi >= 0 && hist[hi] == 0) --hi;
  while (lo < hi && hist[lo] == 0) ++lo;
  double reach[256];
  double run = 0.0;
  int count = 0;
  for (int d = hi; d >= lo; --d) {
    run += hist[d];
    reach[d] = run + above;
    count += reach[d] >= target;
  }
  const double top = above, bottom = hi >= lo ? reach[lo] : above;  // beyond hi, below lo
  count += (n_bins - 1 - hi) * (top >= target) + lo * (bottom >= target);
  const int d = std::max(count - 1, 0);
  if (d < n_bins - 1) above = d + 1 > hi ? top : d + 1 < lo ? bottom : reach[d + 1];
  return d;
}

// The row's target p * total from level 0's histogram (summed along the digits, as torch sums a
// row; empty digits skipped, as adding +0 changes nothing); at least the smallest positive float64
// where the row has mass (rule.py: a p * total that underflows is reached at the largest entry).
// NaN for a row holding a NaN.
inline double row_target(const double* hist, double p) {
  double total = 0.0;
  for (int d = 0; d < 256; ++d)
    if (hist[d] != 0) total += hist[d];
  const double target = total * p;
  return total > 0 ? std::max(target, std::numeric_limits<double>::denorm_min()) : target;
}

// Code 1 is the smallest positive magnitude: p >= 1 keeps every nonzero. An all-zero row ends at
// the top code (a NaN pattern): clamped to +Inf, which keeps nothing.
template <typename T>
uint32_t finish_code(uint32_t prefix, double p) {
  prefix = std::min<uint32_t>(std::max<uint32_t>(prefix, 1), Code<T>::kInf);
  return p >= 1.0 ? 1 : prefix;
}

constexpr int kCopies = 4;  // histogram copies (independent add chains); 4 codes per load
constexpr uint64_t kCountOne = 1ull << 40;  // packed bin: count << 40 | sum of 15-bit codes

inline double pow2(int e) {  // 2^e for a normal float64 exponent, exactly
  const uint64_t b = uint64_t(e + 1023) << 52;
  double d;
  std::memcpy(&d, &b, 8);
  return d;
}

// Lane indices that move the set lanes of an 8-bit mask to the front, one byte each (AVX2's
// left-pack; AVX-512 has a compress instruction).
inline const uint64_t* left_pack_table() {
  static const auto table = [] {
    std::array<uint64_t, 256> t{};
    for (int m = 0; m < 256; ++m)
      for (int i = 0, j = 0; i < 8; ++i)
        if (m >> i & 1) t[m] |= uint64_t(i) << (8 * j++);
    return t;
  }();
  return table.data();
}

// Adds to counts [128] the codes of x[0..K) whose top 8 bits are `bin`, indexed by their low 7
// bits. Branch-free (the hits are irregular): each vector's hits are packed into a buffer
// (compress or left-pack), which is then tallied in 4 copies.
inline void count_bin(const uint16_t* x, int64_t K, uint32_t bin, uint32_t* counts) {
  uint32_t tally[kCopies][128] = {};
  constexpr int64_t kBuf = 1024;
  alignas(64) uint32_t buf[kBuf + 16];
  int64_t n = 0, k = 0;
  auto flush = [&] {
    int64_t i = 0;
    for (; i + kCopies <= n; i += kCopies)
      for (int j = 0; j < kCopies; ++j) ++tally[j][buf[i + j]];
    for (; i < n; ++i) ++tally[0][buf[i]];
    n = 0;
  };
#if defined(__AVX512F__)
  const __m512i want = _mm512_set1_epi32(int32_t(bin)), low = _mm512_set1_epi32(127);
  const __m512i mag = _mm512_set1_epi32(0x7FFF);
  for (; k + 16 <= K; k += 16) {
    const __m512i c = _mm512_and_si512(
        _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + k))), mag);
    const __mmask16 hit = _mm512_cmpeq_epi32_mask(_mm512_srli_epi32(c, 7), want);
    // A register compress then a full store (a masked compress-store is slow on some CPUs).
    _mm512_storeu_si512(buf + n, _mm512_maskz_compress_epi32(hit, _mm512_and_si512(c, low)));
    n += __builtin_popcount(hit);
    if (n >= kBuf) flush();
  }
#else
  const uint64_t* pack = left_pack_table();
  const __m256i want = _mm256_set1_epi32(int32_t(bin)), low = _mm256_set1_epi32(127);
  const __m256i mag = _mm256_set1_epi32(0x7FFF);
  for (; k + 8 <= K; k += 8) {
    const __m256i c = _mm256_and_si256(
        _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x + k))), mag);
    const int hit = _mm256_movemask_ps(
        _mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_srli_epi32(c, 7), want)));
    const __m256i perm = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(int64_t(pack[hit])));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(buf + n),
                        _mm256_permutevar8x32_epi32(_mm256_and_si256(c, low), perm));
    n += __builtin_popcount(hit);
    if (n >= kBuf) flush();
  }
#endif
  for (; k < K; ++k) {
    const uint32_t c = x[k] & 0x7FFF;
    buf[n] = c & 127;
    n += (c >> 7) == bin;
  }
  flush();
  for (int d = 0; d < 128; ++d)
    for (int j = 0; j < kCopies; ++j) counts[d] += tally[j][d];
}

// Threshold code of one bf16/fp16 row (see the file's head): 0 keeps the whole row (a NaN row).
template <typename T>
uint32_t threshold_code_16(const T* xt, int64_t K, double p) {
  using C = Code<T>;
  const uint16_t* x = reinterpret_cast<const uint16_t*>(xt);
  alignas(64) uint64_t packed[kCopies][256] = {};
  int64_t k = 0;
  static_assert(kCopies == 4, "one 64-bit load per round of the copies");
  for (; k + kCopies <= K; k += kCopies) {
    uint64_t four;
    std::memcpy(&four, x + k, 8);
    four &= 0x7FFF7FFF7FFF7FFFull;
    for (int i = 0; i < kCopies; ++i) {
      const uint32_t c = uint32_t(four >> (16 * i)) & 0xFFFF;
      packed[i][c >> 7] += kCountOne | c;
    }
  }
  for (; k < K; ++k) packed[0][(x[k] & 0x7FFF) >> 7] += kCountOne | (x[k] & 0x7FFF);
  // The bins from +Inf's up hold only Inf (code kInf) and NaNs (larger codes).
  constexpr uint32_t kInfBin = C::kInf >> 7;
  double hist[256];
  for (uint32_t b = 0; b < 256; ++b) {
    uint64_t s = 0;
    for (int i = 0; i < kCopies; ++i) s += packed[i][b];
    const uint64_t n = s >> 40, sum = s & (kCountOne - 1);
    if (b >= kInfBin) {
      if (sum != n * C::kInf) return 0;  // a NaN in the row: keep it whole
      hist[b] = n ? std::numeric_limits<double>::infinity() : 0.0;
      continue;
    }
    // Significand = code - (max(e, 1) - 1) << kMant at exponent field e; the bin's scale is
    // 2^(max(e, 1) - bias - kMant).
    const int e = std::max<int>(b >> (C::kMant - 7), 1);
    hist[b] = n ? double(sum - n * (uint64_t(e - 1) << C::kMant)) * pow2(e - C::kBias - C::kMant)
                : 0.0;
  }
  const double target = row_target(hist, p);
  double above = 0.0;
  const uint32_t bin = pick_digit(hist, 256, target, above);
  // The +Inf bin or above (the row holds an Inf, or has no mass): only infinities can be kept.
  if (bin >= kInfBin) return finish_code<T>(C::kInf, p);
  uint32_t counts[128] = {};
  count_bin(x, K, bin, counts);
  double hist1[128];
  for (uint32_t d = 0; d < 128; ++d)
    hist1[d] = counts[d] ? counts[d] * C::mag(typename C::U((bin << 7) | d)) : 0.0;
  return finish_code<T>((bin << 7) | uint32_t(pick_digit(hist1, 128, target, above)), p);
}

// Threshold code of one fp32 row: level 0 as for bf16/fp16 (the bin is the exponent: per-bin
// integer sums of 24-bit significands), then levels 1-3 (8, 8, 7 bits) over the boundary bin's
// codes only, gathered in one pass; at one exponent the float64 sums of rule.py are exact too.
inline uint32_t threshold_code_32(const float* xf, int64_t K, double p) {
  using C = Code<float>;
  const uint32_t* x = reinterpret_cast<const uint32_t*>(xf);
  alignas(64) uint64_t sums[kCopies][256] = {};
  uint32_t top = 0;  // the largest code: above +Inf's, a NaN
  auto add = [&](int i, uint32_t c) {
    const uint32_t e = c >> 23;
    sums[i][e] += (c & 0x7FFFFF) | (uint32_t(e != 0) << 23);
    top = std::max(top, c);
  };
  int64_t k = 0;
  for (; k + kCopies <= K; k += kCopies)
    for (int i = 0; i < kCopies; ++i) add(i, x[k + i] & 0x7FFFFFFF);
  for (; k < K; ++k) add(0, x[k] & 0x7FFFFFFF);
  if (top > C::kInf) return 0;  // a NaN in the row: keep it whole
  double hist[256];
  for (int b = 0; b < 256; ++b) {
    uint64_t s = 0;
    for (int i = 0; i < kCopies; ++i) s += sums[i][b];
    hist[b] = s == 0 ? 0.0 : b == 255 ? std::numeric_limits<double>::infinity()
                                      : double(s) * pow2(std::max(b, 1) - 150);
  }
  const double target = row_target(hist, p);
  double above = 0.0;
  uint32_t prefix = pick_digit(hist, 256, target, above);
  if (prefix == 255) return finish_code<float>(C::kInf, p);  // as for bf16/fp16
  std::vector<uint32_t> codes(K);
  int64_t n = 0;
  for (k = 0; k < K; ++k) {  // branch-free gather of the boundary bin's codes, in row order
    codes[n] = x[k] & 0x7FFFFFFF;
    n += (codes[n] >> 23) == prefix;
  }
  int bits_left = 23;
  for (int level = 1; level < C::kLevels; ++level) {
    const int bits = C::kDigits[level];
    bits_left -= bits;
    std::fill(hist, hist + (1 << bits), 0.0);
    for (int64_t i = 0; i < n; ++i)
      if ((codes[i] >> (bits_left + bits)) == prefix)
        hist[(codes[i] >> bits_left) & ((1 << bits) - 1)] += C::mag(codes[i]);
    prefix = (prefix << bits) | uint32_t(pick_digit(hist, 1 << bits, target, above));
  }
  return finish_code<float>(prefix, p);
}

// Threshold code of one row x[0..K) (rule.top_p_threshold's): entry k is kept iff
// code(x[k]) >= result; 0 keeps the whole row (a NaN row). K < 2^24 (the packed counts).
template <typename T>
uint32_t threshold_code(const T* x, int64_t K, double p) {
  if constexpr (sizeof(T) == 2) {
    return threshold_code_16(x, K, p);
  } else {
    return threshold_code_32(x, K, p);
  }
}

// y[k] = x[k] where code(x[k]) >= thr, else +0; returns how many were kept.
template <typename T>
int64_t zero_below(const T* xt, T* yt, int64_t K, uint32_t thr) {
  int64_t k = 0, n = 0;
  if constexpr (sizeof(T) == 2) {
    const uint16_t* x = reinterpret_cast<const uint16_t*>(xt);
    uint16_t* y = reinterpret_cast<uint16_t*>(yt);
#if defined(__AVX512BW__)
    const __m512i mask = _mm512_set1_epi16(0x7FFF), t = _mm512_set1_epi16(int16_t(thr));
    for (; k + 32 <= K; k += 32) {
      const __m512i v = _mm512_loadu_si512(x + k);
      const __mmask32 keep = _mm512_cmpge_epu16_mask(_mm512_and_si512(v, mask), t);
      _mm512_storeu_si512(y + k, _mm512_maskz_mov_epi16(keep, v));
      n += __builtin_popcount(keep);
    }
#else
    // Codes are below 2^15 (fp32: 2^31), so a signed compare with thr - 1 (from -1) is code >= thr.
    const __m256i mask = _mm256_set1_epi16(0x7FFF), t = _mm256_set1_epi16(int16_t(thr - 1));
    for (; k + 16 <= K; k += 16) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + k));
      const __m256i keep = _mm256_cmpgt_epi16(_mm256_and_si256(v, mask), t);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + k), _mm256_and_si256(v, keep));
      n += __builtin_popcount(_mm256_movemask_epi8(keep)) / 2;
    }
#endif
  } else {
    const uint32_t* x = reinterpret_cast<const uint32_t*>(xt);
    uint32_t* y = reinterpret_cast<uint32_t*>(yt);
#if defined(__AVX512F__)
    const __m512i mask = _mm512_set1_epi32(0x7FFFFFFF), t = _mm512_set1_epi32(int32_t(thr));
    for (; k + 16 <= K; k += 16) {
      const __m512i v = _mm512_loadu_si512(x + k);
      const __mmask16 keep = _mm512_cmpge_epu32_mask(_mm512_and_si512(v, mask), t);
      _mm512_storeu_si512(y + k, _mm512_maskz_mov_epi32(keep, v));
      n += __builtin_popcount(keep);
    }
#else
    const __m256i mask = _mm256_set1_epi32(0x7FFFFFFF), t = _mm256_set1_epi32(int32_t(thr - 1));
    for (; k + 8 <= K; k += 8) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + k));
      const __m256i keep = _mm256_cmpgt_epi32(_mm256_and_si256(v, mask), t);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + k), _mm256_and_si256(v, keep));
      n += __builtin_popcount(_mm256_movemask_ps(_mm256_castsi256_ps(keep)));
    }
#endif
  }
  for (; k < K; ++k) {
    const bool keep = Code<T>::of(xt[k]) >= thr;
    yt[k] = keep ? xt[k] : T(0);
    n += keep;
  }
  return n;
}

// Calls f(T()) for x's dtype T in {bf16, fp16, fp32} (check_x has refused the others).
template <typename F>
void dispatch_dtype(at::ScalarType dtype, F&& f) {
  switch (dtype) {
    case at::kBFloat16: f(c10::BFloat16()); break;
    case at::kHalf: f(c10::Half()); break;
    case at::kFloat: f(float()); break;
    default: TORCH_CHECK(false, "unsupported dtype ", dtype);
  }
}

// p of each row: one float64 for every row (stride 0) or one per row (stride 1: the per-token p
// of requests that carry their own).
struct RowP {
  const double* ptr;
  int64_t stride;
  double operator()(int64_t m) const { return ptr[m * stride]; }
};

RowP read_p(const at::Tensor& p, int64_t M) {
  TORCH_CHECK(p.device().is_cpu() && p.scalar_type() == at::kDouble,
              "p must be a float64 tensor on the CPU, got ", p.scalar_type(), " on ", p.device());
  const bool per_row = (p.dim() == 1 || (p.dim() == 2 && p.size(1) == 1)) && p.size(0) == M &&
                       p.is_contiguous();
  TORCH_CHECK(per_row || p.numel() == 1, "p must have one element or be contiguous [M] / [M, 1] "
              "with M = ", M, " rows of x, got shape ", p.sizes());
  return RowP{p.data_ptr<double>(), per_row ? 1 : 0};
}

void check_x(const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu(), "x must be on the CPU, got ", x.device());
  TORCH_CHECK(x.dim() == 2, "x must be 2-D [M, K], got shape ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf ||
                  x.scalar_type() == at::kFloat,
              "x must be bfloat16, float16 or float32, got ", x.scalar_type());
  TORCH_CHECK(x.stride(1) == 1 || x.size(1) <= 1, "x must have unit stride along K, got strides ",
              x.strides());
  TORCH_CHECK(x.size(1) < (int64_t(1) << 24), "x must have K < 2^24 entries per row, got ",
              x.size(1));
}

// Rows of x per thread task of the row-parallel ops: each task reads at least this many entries,
// as every fork-join costs the caller (a whole scheduler slice when the cores are oversubscribed).
int64_t row_grain(int64_t K) {
  return std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(K, 1));
}

at::Tensor top_p_threshold(const at::Tensor& x, const at::Tensor& p) {
  check_x(x);
  const RowP pv = read_p(p, x.size(0));
  const int64_t M = x.size(0), K = x.size(1), ld = x.stride(0);
  at::Tensor t = at::empty({M, 1}, x.options());
  dispatch_dtype(x.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    using C = Code<scalar_t>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* out = t.data_ptr<scalar_t>();
    at::parallel_for(0, M, row_grain(K), [&](int64_t m0, int64_t m1) {
      for (int64_t m = m0; m < m1; ++m) {
        const uint32_t thr = threshold_code<scalar_t>(xp + m * ld, K, pv(m));
        out[m] = thr == 0 ? scalar_t(NAN) : C::from_code(typename C::U(thr));
      }
    });
  });
  return t;
}

std::tuple<at::Tensor, at::Tensor> top_p_sparsify(const at::Tensor& x, const at::Tensor& p) {
  check_x(x);
  const RowP pv = read_p(p, x.size(0));
  const int64_t M = x.size(0), K = x.size(1), ld = x.stride(0);
  at::Tensor y = at::empty({M, K}, x.options());
  at::Tensor kept = at::empty({M}, x.options().dtype(at::kLong));
  dispatch_dtype(x.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    int64_t* kp = kept.data_ptr<int64_t>();
    at::parallel_for(0, M, row_grain(K), [&](int64_t m0, int64_t m1) {
      for (int64_t m = m0; m < m1; ++m) {
        const scalar_t* xr = xp + m * ld;
        kp[m] = zero_below(xr, yp + m * K, K, threshold_code<scalar_t>(xr, K, pv(m)));
      }
    });
  });
  return {y, kept};
}

}  // namespace
