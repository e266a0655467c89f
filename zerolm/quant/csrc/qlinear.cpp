// torch.ops.zerolm.qlinear: y = Q(x) @ W.T + b for W stored as int8 / int4 codes with float16
// scales per group (zerolm/quant/formats.py: GGUF's Q8_0 / Q4_0 / Q4_1 blocks at group 32).
//
// As in llama.cpp's ggml_vec_dot_q8_0_q8_0 / q4_0_q8_0 / q4_1_q8_1, each row of x is quantized once
// per call to int8 in 32-blocks, Q(x) = dx * qx with dx = absmax / 127 (rounded half to even), so
// every 32-block of a weight row is one integer dot product (AVX-512 VNNI dpbusd) times dw * dx.
// The result is exactly sum_k dequant(W)[n,k] * Q(x)[k] up to float summation order; the pure-torch
// path in kernels.py computes the same Q(x), so both give the same tokens. Large batches (prefill)
// dequantize W tile by tile and use at::mm on the same Q(x).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define ZEROLM_VNNI 1
constexpr bool kPairs = true;  // the int4 kernel reads x's codes pair-ordered (quantize_x)
#else
constexpr bool kPairs = false;
#endif

namespace {

constexpr int64_t kBlock = 32;  // x's quantization block; every weight group is whole blocks
constexpr int64_t kRows = 4;    // weight rows per inner iteration: x loads shared, 4 FMA chains
constexpr int64_t kLargeM = 16;  // from this many x rows on, dequantize + at::mm is faster

#ifdef __F16C__
inline float h2f(uint16_t h) { return _cvtsh_ss(h); }
#else
inline float h2f(uint16_t h) { return c10::detail::fp16_ieee_to_fp32_value(h); }
#endif

// x's rows as int8 codes (M, K), per-block scale dx and dx * sum(codes) (M, K/32). For int4, qp
// holds the codes of each pair of blocks reordered to [b0 0..15, b1 0..15, b0 16..31, b1 16..31],
// the order of the low then high nibbles of the pair's 32 packed bytes (an odd last block as is).
struct QuantX {
  std::vector<int8_t> q, qp;
  std::vector<float> d, ds;
  std::vector<int32_t> s;  // sum of each block's codes
};

QuantX quantize_x(const float* x, int64_t M, int64_t K, bool pairs) {
  const int64_t nb = K / kBlock;
  QuantX out{std::vector<int8_t>(M * K), std::vector<int8_t>(pairs ? M * K : 0),
             std::vector<float>(M * nb), std::vector<float>(M * nb), std::vector<int32_t>(M * nb)};
  at::parallel_for(0, M * nb, 256, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      const float* xb = x + i * kBlock;
      float amax = 0.f;
      for (int64_t j = 0; j < kBlock; ++j) amax = std::max(amax, std::fabs(xb[j]));
      const float d = amax / 127.f, id = d != 0.f ? 1.f / d : 0.f;
      int32_t sum = 0;
      const int64_t b = i % nb, odd = b % 2, last = b == nb - 1 && !odd;
      int8_t* qp = pairs ? out.qp.data() + (i - odd) * kBlock : nullptr;
      for (int64_t j = 0; j < kBlock; ++j) {  // nearbyint: half to even, as torch.round
        const int8_t c = static_cast<int8_t>(std::nearbyint(xb[j] * id));
        out.q[i * kBlock + j] = c;
        if (qp) qp[last ? j : (j % 16) + 16 * odd + 32 * (j / 16)] = c;
        sum += c;
      }
      out.d[i] = d;
      out.s[i] = sum;
      out.ds[i] = d * static_cast<float>(sum);
    }
  });
  return out;
}

struct Weights {
  const uint8_t* q;
  const uint16_t* d;  // float16 bits (N, G)
  const uint16_t* m;  // float16 bits (N, G) or null
  int64_t K, G, bits, row_bytes;
};

// Row `row`'s block scales s_b = dw_g(b) * dx_b, each written `rep` times (the int4 pair kernel
// loads [s0 x4, s1 x4]), and the int4 offset: codes are 0..15, sym w = d * q - 8d and asym
// w = d * q + m, so the row adds sum_b coef_g(b) * dx_b * sum(qx_b), coef = -8d or m.
#ifdef ZEROLM_VNNI
inline __mmask16 first(int64_t n) { return n >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << n) - 1); }

// n <= 16 floats of v to out, each Rep (1 or 4) times
template <int Rep>
inline void store_rep(float* out, __m512 v, int64_t n) {
  if constexpr (Rep == 1) {
    _mm512_mask_storeu_ps(out, first(n), v);
  } else {
    const __m512i quarter = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
    for (int q = 0; 4 * q < n; ++q) {
      const __m512 e = _mm512_permutexvar_ps(_mm512_add_epi32(quarter, _mm512_set1_epi32(4 * q)), v);
      _mm512_mask_storeu_ps(out + 16 * q, first(4 * (n - 4 * q)), e);
    }
  }
}

template <int Rep>
float row_scales(const Weights& w, int64_t row, const float* dx, const float* ds, float* s) {
  const int64_t nb = w.K / kBlock, per_group = nb / w.G;
  const uint16_t *d = w.d + row * w.G, *m = w.m ? w.m + row * w.G : nullptr;
  if (per_group == 1) {  // group 32: 16 blocks at a time
    __m512 corr = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b += 16) {
      const __mmask16 k = first(nb - b);
      const __m512 dw = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, d + b));
      store_rep<Rep>(s + b * Rep, _mm512_mul_ps(dw, _mm512_maskz_loadu_ps(k, dx + b)), nb - b);
      const __m512 coef = m ? _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, m + b))
                            : _mm512_mul_ps(dw, _mm512_set1_ps(-8.f));
      corr = _mm512_fmadd_ps(coef, _mm512_maskz_loadu_ps(k, ds + b), corr);
    }
    return w.bits == 4 ? _mm512_reduce_add_ps(corr) : 0.f;
  }
  float corr = 0.f;
  for (int64_t g = 0, b = 0; g < w.G; ++g, b += per_group) {
    const float dw = h2f(d[g]);
    __m512 sum_ds = _mm512_setzero_ps();
    for (int64_t j = 0; j < per_group; j += 16) {
      const __mmask16 k = first(per_group - j);
      const __m512 dxv = _mm512_maskz_loadu_ps(k, dx + b + j);
      store_rep<Rep>(s + (b + j) * Rep, _mm512_mul_ps(_mm512_set1_ps(dw), dxv), per_group - j);
      sum_ds = _mm512_add_ps(sum_ds, _mm512_maskz_loadu_ps(k, ds + b + j));
    }
    corr += (m ? h2f(m[g]) : -8.f * dw) * _mm512_reduce_add_ps(sum_ds);
  }
  return w.bits == 4 ? corr : 0.f;
}
#else
template <int Rep>
float row_scales(const Weights& w, int64_t row, const float* dx, const float* ds, float* s) {
  const int64_t per_group = w.K / kBlock / w.G;
  float corr = 0.f;
  for (int64_t g = 0, b = 0; g < w.G; ++g) {
    const float dw = h2f(w.d[row * w.G + g]);
    const float coef = w.m ? h2f(w.m[row * w.G + g]) : -8.f * dw;
    for (int64_t end = b + per_group; b < end; ++b) {
      for (int j = 0; j < Rep; ++j) s[b * Rep + j] = dw * dx[b];
      corr += coef * ds[b];
    }
  }
  return w.bits == 4 ? corr : 0.f;
}
#endif

#ifdef ZEROLM_VNNI
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

inline __m256i load256(const void* p) { return _mm256_loadu_si256(static_cast<const __m256i*>(p)); }

// int8: dpbusd multiplies unsigned by signed bytes, so w's sign moves onto x (codes are never -128)
inline __m256i dot8(const uint8_t* w, __m256i xq) {
  const __m256i wq = load256(w);
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), _mm256_abs_epi8(wq), _mm256_sign_epi8(xq, wq));
}

// int4, one block: 16 bytes, low nibbles weights 0..15 and high nibbles 16..31 (GGUF's order)
inline __m256i dot4(const uint8_t* w, __m256i xq) {
  const __m128i p = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w));
  const __m256i both = _mm256_inserti128_si256(_mm256_castsi128_si256(p), _mm_srli_epi16(p, 4), 1);
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), _mm256_and_si256(both, _mm256_set1_epi8(15)), xq);
}

// int4, two blocks: 32 bytes; x's pair-ordered codes make lanes 0..3 block 0 and 4..7 block 1
inline __m256i dot4x2(const uint8_t* w, __m256i xlo, __m256i xhi) {
  const __m256i p = load256(w), mask = _mm256_set1_epi8(15);
  const __m256i lo = _mm256_dpbusd_epi32(_mm256_setzero_si256(), _mm256_and_si256(p, mask), xlo);
  return _mm256_dpbusd_epi32(lo, _mm256_and_si256(_mm256_srli_epi16(p, 4), mask), xhi);
}

// R weight rows from n against x row i, into res[r]. Rows are read interleaved, which the
// hardware prefetcher follows badly, so the next tile is prefetched linearly as this one is read.
template <int Bits, int R>
void rows_dot(const Weights& w, const int8_t* xq, const float* s, int64_t n, float* res) {
  const int64_t nb = w.K / kBlock, bb = kBlock * Bits / 8, rep = Bits == 8 ? 1 : 4;
  const uint8_t* next = w.q + (n + R) * w.row_bytes;
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  int64_t b = 0;
  if constexpr (Bits == 4) {
    for (; b + 2 <= nb; b += 2) {
      const __m256i xlo = load256(xq + b * kBlock), xhi = load256(xq + b * kBlock + 32);
      for (int64_t p = 0; p < R * 2 * bb; p += 64) _mm_prefetch(reinterpret_cast<const char*>(next + b * R * bb + p), _MM_HINT_T0);
      for (int r = 0; r < R; ++r) {
        const __m256i dot = dot4x2(w.q + (n + r) * w.row_bytes + b * bb, xlo, xhi);
        const __m256 sv = _mm256_loadu_ps(s + (r * nb + b) * rep);
        acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), sv, acc[r]);
      }
    }
  }
  for (; b < nb; ++b) {  // int8, or int4's odd last block
    const __m256i xb = load256(xq + b * kBlock);
    for (int64_t p = 0; p < R * bb; p += 64) _mm_prefetch(reinterpret_cast<const char*>(next + b * R * bb + p), _MM_HINT_T0);
    for (int r = 0; r < R; ++r) {
      const uint8_t* wb = w.q + (n + r) * w.row_bytes + b * bb;
      const __m256i dot = Bits == 8 ? dot8(wb, xb) : dot4(wb, xb);
      const __m256 sv = _mm256_set1_ps(s[(r * nb + b) * rep]);
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), sv, acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) res[r] = hsum(acc[r]);
}
#else
template <int Bits, int R>
void rows_dot(const Weights& w, const int8_t* xq, const float* s, int64_t n, float* res) {
  const int64_t nb = w.K / kBlock, bb = kBlock * Bits / 8, rep = Bits == 8 ? 1 : 4;
  for (int r = 0; r < R; ++r) {
    res[r] = 0.f;
    for (int64_t b = 0; b < nb; ++b) {
      const uint8_t* wb = w.q + (n + r) * w.row_bytes + b * bb;
      int32_t dot = 0;
      for (int64_t j = 0; j < kBlock; ++j) {
        const int32_t c = Bits == 8 ? static_cast<int8_t>(wb[j]) : (j < 16 ? wb[j] & 15 : wb[j - 16] >> 4);
        dot += c * xq[b * kBlock + j];
      }
      res[r] += s[(r * nb + b) * rep] * static_cast<float>(dot);
    }
  }
}
#endif

// Tiles of kRows weight rows, each against every row of x (its codes stay in L1 across them).
template <int Bits>
void small_m(const Weights& w, const QuantX& qx, int64_t M, int64_t N, float* out) {
  const int64_t nb = w.K / kBlock, tiles = (N + kRows - 1) / kRows;
  constexpr int kRep = Bits == 8 ? 1 : 4;
  const bool pairs = !qx.qp.empty();
  // grain ~64 rows: a thread's share of even a 192-row matrix outweighs waking it
  at::parallel_for(0, tiles, 64 / kRows, [&](int64_t lo, int64_t hi) {
    std::vector<float> s(kRows * nb * kRep);
    for (int64_t t = lo; t < hi; ++t) {
      const int64_t n = t * kRows, rows = std::min(kRows, N - n);
      for (int64_t i = 0; i < M; ++i) {
        const float *dx = qx.d.data() + i * nb, *ds = qx.ds.data() + i * nb;
        float corr[kRows], res[kRows];
        for (int64_t r = 0; r < rows; ++r)
          corr[r] = row_scales<kRep>(w, n + r, dx, ds, s.data() + r * nb * kRep);
        const int8_t* xq = (pairs ? qx.qp.data() : qx.q.data()) + i * w.K;
        if (rows == kRows) {
          rows_dot<Bits, kRows>(w, xq, s.data(), n, res);
        } else {
          for (int64_t r = 0; r < rows; ++r)
            rows_dot<Bits, 1>(w, xq, s.data() + r * nb * kRep, n + r, res + r);
        }
        for (int64_t r = 0; r < rows; ++r) out[i * N + n + r] = res[r] + corr[r];
      }
    }
  });
}

// Rows [n0, n0 + len) of W as float32 (len, K).
at::Tensor dequantize_rows(const at::Tensor& qweight, const at::Tensor& d, const at::Tensor& m,
                           int64_t bits, int64_t n0, int64_t len, int64_t K) {
  const int64_t G = d.size(1);
  at::Tensor q = qweight.narrow(0, n0, len);
  if (bits == 4) {  // (len, K/32, 16) bytes -> low nibbles then high nibbles per 32-run
    at::Tensor p = q.reshape({len, K / kBlock, 1, kBlock / 2});
    q = at::cat({at::bitwise_and(p, 15), at::bitwise_right_shift(p, 4)}, 2).reshape({len, K});
  }
  at::Tensor w = q.to(at::kFloat).reshape({len, G, K / G});
  at::Tensor dd = d.narrow(0, n0, len).to(at::kFloat).unsqueeze(-1);
  if (bits == 8) return (w * dd).reshape({len, K});
  if (m.defined()) return (w * dd + m.narrow(0, n0, len).to(at::kFloat).unsqueeze(-1)).reshape({len, K});
  return ((w - 8) * dd).reshape({len, K});
}

void large_m(const at::Tensor& qweight, const at::Tensor& d, const at::Tensor& m, int64_t bits,
             const QuantX& qx, int64_t M, int64_t K, at::Tensor& out) {
  const int64_t N = qweight.size(0), nb = K / kBlock;
  at::Tensor xf = at::empty({M, K}, at::kFloat);  // Q(x) as floats
  float* xp = xf.data_ptr<float>();
  for (int64_t i = 0; i < M * nb; ++i)
    for (int64_t j = 0; j < kBlock; ++j) xp[i * kBlock + j] = qx.d[i] * qx.q[i * kBlock + j];
  // tiles of rows keep the float copy of W small (~1 MB per 256 rows of K = 1024)
  for (int64_t n0 = 0; n0 < N; n0 += 256) {
    const int64_t len = std::min<int64_t>(256, N - n0);
    at::Tensor wt = dequantize_rows(qweight, d, m, bits, n0, len, K);
    out.narrow(1, n0, len).copy_(at::mm(xf, wt.t()));
  }
}

at::Tensor as_half(const at::Tensor& t) {
  return t.scalar_type() == at::kShort ? t.view(at::kHalf) : t;  // QuantLinear keeps fp16 bits
}

std::vector<int64_t> out_shape(const at::Tensor& x, int64_t N) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  return shape;
}

// The decode layout (kernels.py pack): tiles of kTile = 16 rows, each 32-block of a tile stored
// as one run of codes with row r in 32-bit lane r of every 64-byte vector, so one VNNI dpbusd
// multiplies 4 weights of all 16 rows by 4 broadcast x codes and the tile's 16 sums never need a
// horizontal add. int8: 8 vectors, lane r of vector k holds w[r, 4k..4k+3] + 128 (unsigned for
// dpbusd; the +128 comes off as -128 * sum(x)). int4: 4 vectors, lane r of vector L holds
// GGUF bytes 4L..4L+3 of row r, whose low nibbles are weights 4L.. and high nibbles 16 + 4L..
// (codes 0..15; sym's -8 comes off as -8 * sum(x)). Scales (and mins) are (tiles, G, 16) float16.
// A tile streams its bytes front to back, and the scales need no per-row pass.
constexpr int64_t kTile = 16;
#ifndef ZEROLM_AHEAD
#define ZEROLM_AHEAD 4
#endif
constexpr int64_t kAhead = ZEROLM_AHEAD;  // blocks prefetched ahead

struct Packed {
  const uint8_t* q;
  const uint16_t* d;
  const uint16_t* m;  // or null
  int64_t K, G;
};

// R rows of x (codes xq, scales dx, code sums sx, each row `stride` apart) against tile t, into
// out (row stride N): the tile's codes are loaded and unpacked once for all R rows.
#ifdef ZEROLM_VNNI
template <int Bits, bool Asym, int R>
void packed_tile(const Packed& w, int64_t t, const int8_t* xq, const float* dx, const int32_t* sx,
                 float* out, int64_t N, int64_t rows) {
  const int64_t nb = w.K / kBlock, per = nb / w.G, tb = kTile * kBlock * Bits / 8;
  const uint8_t* q = w.q + t * nb * tb;
  const uint16_t *d = w.d + t * w.G * kTile, *m = Asym ? w.m + t * w.G * kTile : nullptr;
  const __m512i low = _mm512_set1_epi8(15);
  __m512 acc[R];
  for (int i = 0; i < R; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t g = 0, b = 0; g < w.G; ++g) {
    __m512 accg[R];
    float dsg[R];
    for (int i = 0; i < R; ++i) accg[i] = _mm512_setzero_ps(), dsg[i] = 0.f;
    for (int64_t end = b + per; b < end; ++b, q += tb) {
      for (int64_t c = 0; c < tb; c += 64)  // the block kAhead ahead, line by line
        _mm_prefetch(reinterpret_cast<const char*>(q + kAhead * tb + c), _MM_HINT_T0);
      __m512i dot[R];
      for (int i = 0; i < R; ++i) {
        const int32_t s = sx[i * nb + b];
        dot[i] = _mm512_set1_epi32(Bits == 8 ? -128 * s : Asym ? 0 : -8 * s);
      }
      const int32_t* x4 = reinterpret_cast<const int32_t*>(xq) + 8 * b;  // 4 codes at a time
      const int64_t xs = w.K / 4;  // int32 stride between x rows
      if constexpr (Bits == 8) {
        for (int k = 0; k < 8; ++k) {
          const __m512i v = _mm512_loadu_si512(q + 64 * k);
          for (int i = 0; i < R; ++i)
            dot[i] = _mm512_dpbusd_epi32(dot[i], v, _mm512_set1_epi32(x4[i * xs + k]));
        }
      } else {
        for (int L = 0; L < 4; ++L) {
          const __m512i p = _mm512_loadu_si512(q + 64 * L);
          const __m512i lo = _mm512_and_si512(p, low);
          const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(p, 4), low);
          for (int i = 0; i < R; ++i) {
            dot[i] = _mm512_dpbusd_epi32(dot[i], lo, _mm512_set1_epi32(x4[i * xs + L]));
            dot[i] = _mm512_dpbusd_epi32(dot[i], hi, _mm512_set1_epi32(x4[i * xs + L + 4]));
          }
        }
      }
      for (int i = 0; i < R; ++i) {
        const float dxb = dx[i * nb + b];
        accg[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[i]), _mm512_set1_ps(dxb), accg[i]);
        if constexpr (Asym) dsg[i] += dxb * static_cast<float>(sx[i * nb + b]);
      }
    }
    const __m512 dg = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(d + g * kTile)));
    __m512 mg = _mm512_setzero_ps();
    if constexpr (Asym) mg = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(m + g * kTile)));
    for (int i = 0; i < R; ++i) {
      acc[i] = _mm512_fmadd_ps(accg[i], dg, acc[i]);
      if constexpr (Asym) acc[i] = _mm512_fmadd_ps(mg, _mm512_set1_ps(dsg[i]), acc[i]);
    }
  }
  for (int i = 0; i < R; ++i) _mm512_mask_storeu_ps(out + i * N, first(rows), acc[i]);
}
#else
template <int Bits, bool Asym, int R>
void packed_tile(const Packed& w, int64_t t, const int8_t* xq, const float* dx, const int32_t* sx,
                 float* out, int64_t N, int64_t rows) {
  const int64_t nb = w.K / kBlock, per = nb / w.G, tb = kTile * kBlock * Bits / 8;
  for (int i = 0; i < R; ++i)
    for (int64_t r = 0; r < rows; ++r) {
      float acc = 0.f;
      for (int64_t g = 0, b = 0; g < w.G; ++g) {
        float accg = 0.f, dsg = 0.f;
        for (int64_t end = b + per; b < end; ++b) {
          const uint8_t* q = w.q + (t * nb + b) * tb;
          const int32_t s = sx[i * nb + b];
          int32_t dot = Bits == 8 ? -128 * s : Asym ? 0 : -8 * s;
          for (int64_t j = 0; j < kBlock; ++j) {
            const int64_t c = j % 16, half = j / 16;  // int4: byte c of the row's GGUF block
            const int32_t code = Bits == 8 ? q[(j / 4) * 64 + r * 4 + j % 4]
                                           : (q[(c / 4) * 64 + r * 4 + c % 4] >> (4 * half)) & 15;
            dot += code * xq[i * w.K + b * kBlock + j];
          }
          accg += static_cast<float>(dot) * dx[i * nb + b];
          dsg += dx[i * nb + b] * static_cast<float>(s);
        }
        acc += accg * h2f(w.d[(t * w.G + g) * kTile + r]);
        if (Asym) acc += h2f(w.m[(t * w.G + g) * kTile + r]) * dsg;
      }
      out[i * N + r] = acc;
    }
}
#endif

// Every x row against every tile, 4 rows of x at a time (the tile stays in L1 across them).
template <int Bits, bool Asym>
void packed_mm(const Packed& w, const QuantX& qx, int64_t M, int64_t N, float* out) {
  const int64_t nb = w.K / kBlock, tiles = (N + kTile - 1) / kTile;
  // grain: ~64 rows of W per task for a vector, fewer as x's rows make each tile more work
  const int64_t grain = std::max<int64_t>(1, 4 / std::max<int64_t>(1, M / 4));
  at::parallel_for(0, tiles, grain, [&](int64_t lo, int64_t hi) {
    for (int64_t t = lo; t < hi; ++t) {
      const int64_t rows = std::min(kTile, N - t * kTile);
      for (int64_t i = 0; i < M;) {
        const int8_t* xq = qx.q.data() + i * w.K;
        const float* dx = qx.d.data() + i * nb;
        const int32_t* sx = qx.s.data() + i * nb;
        float* o = out + i * N + t * kTile;
        switch (std::min<int64_t>(4, M - i)) {
          case 4: packed_tile<Bits, Asym, 4>(w, t, xq, dx, sx, o, N, rows); i += 4; break;
          case 3: packed_tile<Bits, Asym, 3>(w, t, xq, dx, sx, o, N, rows); i += 3; break;
          case 2: packed_tile<Bits, Asym, 2>(w, t, xq, dx, sx, o, N, rows); i += 2; break;
          default: packed_tile<Bits, Asym, 1>(w, t, xq, dx, sx, o, N, rows); i += 1;
        }
      }
    }
  });
}

at::Tensor qlinear_packed_cpu(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales,
                              const std::optional<at::Tensor>& mins, int64_t bits, int64_t N,
                              const std::optional<at::Tensor>& bias) {
  const int64_t K = x.size(-1), tiles = (N + kTile - 1) / kTile;
  TORCH_CHECK(bits == 8 || bits == 4, "qlinear_packed: bits must be 8 or 4, got ", bits);
  TORCH_CHECK(K % kBlock == 0, "qlinear_packed: ", K, " inputs are not whole 32-blocks");
  TORCH_CHECK(packed.is_contiguous() && packed.scalar_type() == at::kByte &&
                  packed.numel() == tiles * kTile * K * bits / 8,
              "qlinear_packed: packed codes do not match ", N, " rows of ", K, " inputs");
  const at::Tensor d = as_half(scales).contiguous();
  const int64_t G = d.numel() / (tiles * kTile);
  TORCH_CHECK(d.scalar_type() == at::kHalf && G > 0 && d.numel() == tiles * kTile * G &&
                  K % G == 0 && (K / G) % kBlock == 0,
              "qlinear_packed: scales do not match ", N, " rows of ", K, " inputs");
  const at::Tensor m = mins.has_value() ? as_half(*mins).contiguous() : at::Tensor();
  TORCH_CHECK(!m.defined() || (bits == 4 && m.sizes() == d.sizes()), "qlinear_packed: mins need int4 and scales' shape");
  const at::Tensor xc = x.to(at::kFloat).contiguous();
  const int64_t M = xc.numel() / K;
  at::Tensor out = at::empty({M, N}, x.options().dtype(at::kFloat));
  const QuantX qx = quantize_x(xc.data_ptr<float>(), M, K, false);
  const Packed w{packed.data_ptr<uint8_t>(), reinterpret_cast<const uint16_t*>(d.data_ptr()),
                 m.defined() ? reinterpret_cast<const uint16_t*>(m.data_ptr()) : nullptr, K, G};
  float* o = out.data_ptr<float>();
  if (bits == 8) packed_mm<8, false>(w, qx, M, N, o);
  else if (m.defined()) packed_mm<4, true>(w, qx, M, N, o);
  else packed_mm<4, false>(w, qx, M, N, o);
  if (bias.has_value()) out.add_(bias->to(at::kFloat));
  return out.view(out_shape(x, N));
}

at::Tensor qlinear_packed_meta(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales,
                               const std::optional<at::Tensor>& mins, int64_t bits, int64_t N,
                               const std::optional<at::Tensor>& bias) {
  return at::empty(out_shape(x, N), x.options().dtype(at::kFloat));
}

at::Tensor qlinear_cpu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                       const std::optional<at::Tensor>& mins, int64_t bits, int64_t group,
                       const std::optional<at::Tensor>& bias) {
  const int64_t K = x.size(-1), N = qweight.size(0), G = scales.size(1);
  TORCH_CHECK(bits == 8 || bits == 4, "qlinear: bits must be 8 or 4, got ", bits);
  TORCH_CHECK(K % kBlock == 0 && G > 0 && K % G == 0 && (K / G) % kBlock == 0,
              "qlinear: ", K, " inputs do not split into ", G, " groups of whole 32-runs");
  TORCH_CHECK((group == 0 ? K : group) == K / G, "qlinear: group ", group, " but scales give ", K / G);
  TORCH_CHECK(qweight.size(1) == K * bits / 8 && scales.size(0) == N,
              "qlinear: qweight/scales shapes do not match x's ", K, " inputs");
  TORCH_CHECK(qweight.scalar_type() == (bits == 8 ? at::kChar : at::kByte), "qlinear: qweight dtype");
  const at::Tensor qw = qweight.contiguous(), d = as_half(scales).contiguous();
  const at::Tensor m = mins.has_value() ? as_half(*mins).contiguous() : at::Tensor();
  TORCH_CHECK(d.scalar_type() == at::kHalf, "qlinear: scales must be float16 (or its int16 bits)");
  TORCH_CHECK(!m.defined() || (bits == 4 && m.sizes() == d.sizes()), "qlinear: mins need int4 and scales' shape");
  const at::Tensor xc = x.to(at::kFloat).contiguous();
  const int64_t M = xc.numel() / K;
  at::Tensor out = at::empty({M, N}, x.options().dtype(at::kFloat));
  const bool pairs = kPairs && bits == 4 && M < kLargeM;
  const QuantX qx = quantize_x(xc.data_ptr<float>(), M, K, pairs);
  if (M >= kLargeM) {
    large_m(qw, d, m, bits, qx, M, K, out);
  } else {
    const Weights w{reinterpret_cast<const uint8_t*>(qw.data_ptr()),
                    reinterpret_cast<const uint16_t*>(d.data_ptr()),
                    m.defined() ? reinterpret_cast<const uint16_t*>(m.data_ptr()) : nullptr,
                    K, G, bits, qw.size(1)};
    if (bits == 8) small_m<8>(w, qx, M, N, out.data_ptr<float>());
    else small_m<4>(w, qx, M, N, out.data_ptr<float>());
  }
  if (bias.has_value()) out.add_(bias->to(at::kFloat));
  return out.view(out_shape(x, N));
}

at::Tensor qlinear_meta(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                        const std::optional<at::Tensor>& mins, int64_t bits, int64_t group,
                        const std::optional<at::Tensor>& bias) {
  return at::empty(out_shape(x, qweight.size(0)), x.options().dtype(at::kFloat));
}

}  // namespace

TORCH_LIBRARY(zerolm, m) {
  m.def("qlinear(Tensor x, Tensor qweight, Tensor scales, Tensor? mins, int bits, int group, "
        "Tensor? bias) -> Tensor");
  m.def("qlinear_packed(Tensor x, Tensor packed, Tensor scales, Tensor? mins, int bits, int N, "
        "Tensor? bias) -> Tensor");
}
TORCH_LIBRARY_IMPL(zerolm, CPU, m) {
  m.impl("qlinear", &qlinear_cpu);
  m.impl("qlinear_packed", &qlinear_packed_cpu);
}
TORCH_LIBRARY_IMPL(zerolm, Meta, m) {
  m.impl("qlinear", &qlinear_meta);
  m.impl("qlinear_packed", &qlinear_packed_meta);
}
