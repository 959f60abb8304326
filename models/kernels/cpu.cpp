// soft-serve's CPU kernels: the matrix products of a decoder layer over fp32 activations,
// reading fp32, bf16, int8 (one scale per output row) or int4 (GGUF Q4_1 blocks of 32)
// weights, with the small ops around them fused in (RMSNorm before, SwiGLU on the input,
// the residual add after) and rotary embeddings in place.
//
// Built on first use by models/kernels/build.py (g++ -O3 -march=native -fopenmp; the image
// ships a build for any AVX2 + FMA CPU) and called through ctypes from
// models/kernels/__init__.py, whose structs mirror the ones here (soft_abi_layout checks).
// OpenMP is the libgomp torch itself loaded (same soname), so the calling thread's team is
// the one torch's own kernels run on.
//
// The product loop: for a chunk of activation rows (kept in L2), every thread takes a
// contiguous range of output rows, 4 at a time, and runs the K loop with 8 accumulators:
// over pairs of activation rows for fp32, unrolled twice at one activation row (decode).
// bf16 over several rows, and int8 over many, read a second, k-major copy of the matrix
// instead (`panel`): fp32 products over all the rows (bf16 ones, two columns a lane, on a
// CPU with AVX-512 BF16: `panel_pairs`).
//
// A decode step runs whole: soft_decode_layers takes every layer of a step in one parallel
// region (the team functions below share its threads and meet at barriers), so Python
// and OpenMP's fork / join are paid once per step, not once per product.

#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

extern "C" {

enum { W_F32 = 0, W_BF16 = 1, W_I8 = 2, W_Q4 = 3 };

struct Weight {
  int32_t type;
  int32_t n;            // output rows
  int32_t k;            // input columns (a multiple of 32 for Q4, of 16 otherwise)
  const void* data;     // (n, k) f32 / bf16 / int8, or (n, k / 2) Q4 nibbles
  const float* scale;   // int8: (n,); Q4: (n, k / 32) block scales d
  const float* minimum; // Q4: (n, k / 32) block minimums m (w = q * d + m)
  const void* panels;   // bf16 / int8, or null: the same matrix in bf16 (int8: its values,
                        // exact, without the scale) in panels of 16 output rows,
                        // (ceil(n / 16), k, 16) zero-padded; with PANEL_PAIRS
                        // (ceil(n / 16), k / 2, 16, 2), Q4's dequantized
};

}  // extern "C"

namespace {

constexpr int R = 4;          // output rows per tile
constexpr int M_CHUNK = 64;   // activation rows per pass over the weights
constexpr int P = 16;         // output rows per bf16 panel
constexpr int PM = 6;         // activation rows per pass over a panel
#ifdef __AVX512F__
constexpr int PANELS = 2;     // panels per call of panel(): the AVX-512 loop takes two
// where panel()'s loop holds a panel's output r: as it is (AVX-512), evens then odds (AVX2)
constexpr int lane_of(int r) { return r; }
#else
constexpr int PANELS = 1;
constexpr int lane_of(int r) { return 8 * (r % 2) + r / 2; }
#endif
#ifdef __AVX512BF16__
// Built on a CPU with AVX-512 BF16: the panels hold each output's weights for two adjacent
// k in one 32-bit lane, (ceil(n / 16), k / 2, 16, 2), and products over them multiply the
// activations rounded to bf16 with `vdpbf16ps` (two products and their sum a lane, twice
// the fp32 FMA's rate); Q4 panels hold the dequantized weights in bf16 (panel_pairs)
#define PANEL_PAIRS 1
#endif
constexpr int MAX_K = 8192;   // Q4 panels: the longest row (a stack array of its scales)
// how far ahead of its tile a thread prefetches the weights, and into which cache: a
// tile's rows are short streams (576 bytes of int8) that the hardware prefetchers pick up
// too late (without: a 1-row int8 step 1.8x slower). Into L2, not L1: L1's few miss
// buffers then stay free for the loads themselves (a 1-row step 8-15 % faster, int8, int4
// and bf16 alike, calls of both builds interleaved on one machine)
constexpr size_t PREFETCH_BYTES = 16384;
#define PREFETCH_HINT _MM_HINT_T1

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// one output value: + bias, then stored, or added to what y holds (the residual stream)
inline void put(float* y, int n, float v, const float* bias, bool acc) {
  if (bias) v += bias[n];
  y[n] = acc ? y[n] + v : v;
}

// e^x for 8 floats (Cephes' polynomial after range reduction, ~2 ulp; -inf gives 0)
inline __m256 exp8(__m256 x) {
  x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.3762626647949f)), _mm256_set1_ps(-88.3762626647949f));
  __m256 fx = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                              _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500E-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894E-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459E-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201E-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

// the sums of 8 vectors, one per lane
inline __m256 hsum8(const __m256* a) {
  const __m256 s01 = _mm256_hadd_ps(a[0], a[1]), s23 = _mm256_hadd_ps(a[2], a[3]);
  const __m256 s45 = _mm256_hadd_ps(a[4], a[5]), s67 = _mm256_hadd_ps(a[6], a[7]);
  const __m256 s0123 = _mm256_hadd_ps(s01, s23), s4567 = _mm256_hadd_ps(s45, s67);
  // lanes: [0 1 2 3 | 0 1 2 3] halves of s0123, same for s4567
  const __m256 lo = _mm256_permute2f128_ps(s0123, s4567, 0x20);
  const __m256 hi = _mm256_permute2f128_ps(s0123, s4567, 0x31);
  return _mm256_add_ps(lo, hi);
}

// bf16 rows: 16 values at a time, split into the even ones (bits shifted up) and the odd
// ones (the high half of each 32-bit lane, masked): no cross-lane widening. The
// activations were permuted to match (evens then odds of every 16, see permute16).
void tile_bf16(const float* x, int ldx, int mrows, const Weight& w, int n0, int nr, float* y,
               int ldy, bool acc, const float* bias) {
  const int K = w.k;
  const uint16_t* base = static_cast<const uint16_t*>(w.data);
  const uint16_t* rows[R];
  for (int r = 0; r < R; r++) rows[r] = base + (size_t)K * (n0 + (r < nr ? r : 0));
  const __m256i odd = _mm256_set1_epi32((int)0xFFFF0000u);
  for (int m = 0; m < mrows; m++) {
    const float* xr = x + (size_t)m * ldx;
    __m256 a[2][R];
    for (int u = 0; u < 2; u++)
      for (int r = 0; r < R; r++) a[u][r] = _mm256_setzero_ps();
    for (int k = 0; k < K; k += 16) {
      __m256 xe = _mm256_loadu_ps(xr + k), xo = _mm256_loadu_ps(xr + k + 8);
      for (int r = 0; r < R; r++) {
        __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rows[r] + k));
        a[0][r] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(v, 16)), xe, a[0][r]);
        a[1][r] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(v, odd)), xo, a[1][r]);
      }
    }
    float* yr = y + (size_t)m * ldy;
    for (int r = 0; r < nr; r++) {
      put(yr, n0 + r, hsum(_mm256_add_ps(a[0][r], a[1][r])), bias, acc);
    }
  }
}

// bytes of one row of w's row-major data
inline size_t row_bytes(const Weight& w) {
  const size_t k = (size_t)w.k;
  return w.type == W_F32 ? 4 * k : w.type == W_BF16 ? 2 * k : w.type == W_I8 ? k : k / 2;
}

// an int8 / Q4 tile's R rows of w from n0 (rn: their numbers; past nr rows: n0 again)
inline void tile_rows(const Weight& w, int n0, int nr, const uint8_t** rows, int* rn) {
  const size_t bytes = row_bytes(w);
  for (int r = 0; r < R; r++)
    rn[r] = n0 + (r < nr ? r : 0), rows[r] = static_cast<const uint8_t*>(w.data) + bytes * rn[r];
}

// int8 / Q4 rows against int8 activations (one scale per 32 values, like GGUF's Q8_0):
// 32 products per block in two integer instructions (maddubs, madd), one fp32 multiply-add
// per block. int8 weights are signed: |w| times x with w's sign (maddubs wants one
// unsigned operand). Q4 codes are unsigned already: w = q d + m per block gives
// d dx (q . qx) + m dx sum(qx).
template <int T>
void tile_int(const int8_t* qx, const float* dx, const float* xsum, int mrows, int K,
              const Weight& w, int n0, int nr, float* y, int ldy, bool acc, const float* bias) {
  const int nb = K / 32;
  const __m256i ones = _mm256_set1_epi16(1);
  const __m128i low4 = _mm_set1_epi8(0x0F);
  const uint8_t* rows[R];
  int rn[R];
  tile_rows(w, n0, nr, rows, rn);
  for (int m = 0; m < mrows; m++) {
    const int8_t* xq = qx + (size_t)m * K;
    const float* xd = dx + (size_t)m * nb;
    __m256 a[R];
    for (int r = 0; r < R; r++) a[r] = _mm256_setzero_ps();
    for (int b = 0; b < nb; b++) {
      const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + 32 * b));
      const __m256 xs = _mm256_broadcast_ss(xd + b);
      for (int r = 0; r < R; r++) {
        __m256i p;
        if (T == W_I8) {
          __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rows[r] + 32 * b));
          p = _mm256_maddubs_epi16(_mm256_sign_epi8(wv, wv), _mm256_sign_epi8(xv, wv));
        } else {
          __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(rows[r] + 16 * b));
          __m128i lo = _mm_and_si128(bytes, low4);
          __m128i hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), low4);
          p = _mm256_maddubs_epi16(_mm256_inserti128_si256(_mm256_castsi128_si256(lo), hi, 1), xv);
        }
        const __m256 s = _mm256_cvtepi32_ps(_mm256_madd_epi16(p, ones));
        const __m256 scale =
            T == W_Q4 ? _mm256_mul_ps(xs, _mm256_broadcast_ss(w.scale + (size_t)rn[r] * nb + b)) : xs;
        a[r] = _mm256_fmadd_ps(s, scale, a[r]);
      }
    }
    float mins[R] = {};
    if (T == W_Q4)  // the minimums' part: m . dx sum(qx) over the row's blocks
      for (int r = 0; r < nr; r++) {
        const float* mr = w.minimum + (size_t)rn[r] * nb;
        const float* xs = xsum + (size_t)m * nb;
        for (int b = 0; b < nb; b++) mins[r] += mr[b] * xs[b];
      }
    float* yr = y + (size_t)m * ldy;
    for (int r = 0; r < nr; r++) {
      float v = hsum(a[r]) + mins[r];
      if (T == W_I8) v *= w.scale[n0 + r];
      put(yr, n0 + r, v, bias, acc);
    }
  }
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define INT_VNNI 1
// The same products with AVX-512 VNNI (a -march=native build on a CPU that has it):
// `vpdpbusd` sums four u8 x s8 products into each 32-bit lane, 64 values an instruction.
// int8 weights, two blocks a pass (lanes 0-7 one block's partial sums, 8-15 the next's):
// |w| times x with w's sign (a mask from w's sign bits, a masked negation). Q4, four blocks
// a pass: their 64 bytes of nibbles masked (codes 0-15 of each block, one 128-bit lane
// each) and shifted (codes 16-31) meet x's two halves of each block gathered to match, two
// instructions into one sum whose lanes 4i..4i+3 are block i's; a last one to three blocks
// two at a time (both halves of one block spread over two lanes). One fp32 multiply-add per
// pass and output row against the block scales spread over their lanes; Q4's minimums as
// one dot product per row after.

// the sums of four vectors' lanes, in order
static_assert(R == 4, "hsum4 reduces one tile's rows");
inline __m128 hsum4(const __m512* a) {
  const __m512 s01 = _mm512_add_ps(_mm512_unpacklo_ps(a[0], a[1]), _mm512_unpackhi_ps(a[0], a[1]));
  const __m512 s23 = _mm512_add_ps(_mm512_unpacklo_ps(a[2], a[3]), _mm512_unpackhi_ps(a[2], a[3]));
  // each 128-bit lane: a0's, a1's, a2's, a3's partial sums
  const __m512 s = _mm512_add_ps(_mm512_shuffle_ps(s01, s23, _MM_SHUFFLE(1, 0, 1, 0)),
                                 _mm512_shuffle_ps(s01, s23, _MM_SHUFFLE(3, 2, 3, 2)));
  const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(s), _mm512_extractf32x8_ps(s, 1));
  return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

// `count` (1, 2 or 4) floats at v spread over 16 lanes, each over 16 / count of them in
// order; with count 1, the upper 8 lanes 0 (an odd last block of a pair)
inline __m512 spread_lanes(const float* v, int count) {
  const __m128 f = count == 4 ? _mm_loadu_ps(v)
                   : count == 2 ? _mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(v)))
                                : _mm_load_ss(v);
  const __m512i idx = count == 4 ? _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3)
                                 : _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
  return _mm512_permutexvar_ps(idx, _mm512_castps128_ps512(f));
}

// int8: per activation row of a product, what w + 128 adds to each of its outputs (128
// times the sum of its rounded values), taken off each output after: once per product
inline void int8_shifts(const float* xsum, int mrows, int nb, float* shift) {
  for (int m = 0; m < mrows; m++) {
    const float* sums = xsum + (size_t)m * nb;
    __m512 total = _mm512_setzero_ps();
    for (int b = 0; b < nb; b += 16) {
      const __mmask16 in = nb - b >= 16 ? 0xFFFF : (__mmask16)((1u << (nb - b)) - 1);
      total = _mm512_add_ps(total, _mm512_maskz_loadu_ps(in, sums + b));
    }
    shift[m] = 128.f * _mm512_reduce_add_ps(total);
  }
}

// MM activation rows (1, 2 or 4: int8; 1 or 2: Q4, whose pass holds more registers) from
// row m through one tile: each weight vector loaded (and unpacked) once for all of them.
// `shift`: int8's int8_shifts (unused for Q4).
template <int T, int MM>
void vnni_rows(const int8_t* qx, const float* dx, const float* xsum, const float* shift, int m,
               int K, const Weight& w, const uint8_t* const* rows, const int* rn, int n0, int nr,
               float* y, int ldy, bool acc, const float* bias) {
  const int nb = K / 32;
  const __m512i zero = _mm512_setzero_si512(), low4 = _mm512_set1_epi8(0x0F);
  const __m512i nibble_shift = _mm512_setr_epi64(0, 0, 4, 4, 0, 0, 4, 4);  // high halves
  const __m512i bias128 = _mm512_set1_epi8((char)0x80);  // int8 w -> w + 128, unsigned
  __m512 a[MM][R];
  for (int u = 0; u < MM; u++)
    for (int r = 0; r < R; r++) a[u][r] = _mm512_setzero_ps();
  int b = 0;
  for (; T == W_Q4 && b + 4 <= nb; b += 4) {
    __m512i xlo[MM], xhi[MM];
    __m512 xs[MM];
    for (int u = 0; u < MM; u++) {
      const int8_t* xq = qx + (size_t)(m + u) * K + 32 * b;
      const __m512i x0 = _mm512_loadu_si512(xq), x1 = _mm512_loadu_si512(xq + 64);
      xlo[u] = _mm512_shuffle_i64x2(x0, x1, _MM_SHUFFLE(2, 0, 2, 0));  // values 0-15
      xhi[u] = _mm512_shuffle_i64x2(x0, x1, _MM_SHUFFLE(3, 1, 3, 1));  // 16-31
      xs[u] = spread_lanes(dx + (size_t)(m + u) * nb + b, 4);
    }
    for (int r = 0; r < R; r++) {
      const __m512i packed = _mm512_loadu_si512(rows[r] + 16 * b);
      const __m512i lo = _mm512_and_si512(packed, low4);
      const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(packed, 4), low4);
      const __m512 ws = spread_lanes(w.scale + (size_t)rn[r] * nb + b, 4);
      for (int u = 0; u < MM; u++) {
        const __m512i dot = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(zero, lo, xlo[u]), hi, xhi[u]);
        a[u][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(xs[u], ws), a[u][r]);
      }
    }
  }
  for (; b < nb; b += 2) {
    const bool alone = b + 1 == nb;  // an odd last block: the upper lanes stay 0
    const __mmask64 bytes = alone ? 0xFFFFFFFFull : ~0ull;
    __m512i xv[MM];
    __m512 xs[MM];
    for (int u = 0; u < MM; u++) {
      xv[u] = _mm512_maskz_loadu_epi8(bytes, qx + (size_t)(m + u) * K + 32 * b);
      xs[u] = spread_lanes(dx + (size_t)(m + u) * nb + b, alone ? 1 : 2);
    }
    for (int r = 0; r < R; r++) {
      __m512i wv;
      __m512 ws = _mm512_set1_ps(1.f);
      if (T == W_I8) {  // w + 128 (unsigned), the 128 x taken off once per row after
        wv = _mm512_xor_si512(_mm512_maskz_loadu_epi8(bytes, rows[r] + 32 * b), bias128);
      } else {
        const __m512i packed = _mm512_maskz_loadu_epi8(alone ? 0xFFFFull : 0xFFFFFFFFull, rows[r] + 16 * b);
        const __m512i spread = _mm512_shuffle_i64x2(packed, packed, _MM_SHUFFLE(1, 1, 0, 0));
        wv = _mm512_and_si512(_mm512_srlv_epi64(spread, nibble_shift), low4);
        ws = spread_lanes(w.scale + (size_t)rn[r] * nb + b, alone ? 1 : 2);
      }
      for (int u = 0; u < MM; u++) {
        const __m512i dot = _mm512_dpbusd_epi32(zero, wv, xv[u]);
        const __m512 scale = T == W_Q4 ? _mm512_mul_ps(xs[u], ws) : xs[u];
        a[u][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), scale, a[u][r]);
      }
    }
  }
  for (int u = 0; u < MM; u++) {
    const float* sums = xsum + (size_t)(m + u) * nb;
    if (T == W_Q4)  // the minimums' part: m . dx sum(qx) over the row's blocks
      for (int r = 0; r < nr; r++) {
        const float* mr = w.minimum + (size_t)rn[r] * nb;
        for (int b2 = 0; b2 < nb; b2 += 16) {
          const __mmask16 in = nb - b2 >= 16 ? 0xFFFF : (__mmask16)((1u << (nb - b2)) - 1);
          a[u][r] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(in, mr + b2), _mm512_maskz_loadu_ps(in, sums + b2), a[u][r]);
        }
      }
    float v[R];
    _mm_storeu_ps(v, hsum4(a[u]));
    float* yr = y + (size_t)(m + u) * ldy;
    for (int r = 0; r < nr; r++)
      put(yr, n0 + r, T == W_I8 ? (v[r] - shift[m + u]) * w.scale[n0 + r] : v[r], bias, acc);
  }
}

template <int T>
void tile_int_vnni(const int8_t* qx, const float* dx, const float* xsum, const float* shift,
                   int mrows, int K, const Weight& w, int n0, int nr, float* y, int ldy, bool acc,
                   const float* bias) {
  const uint8_t* rows[R];
  int rn[R];
  tile_rows(w, n0, nr, rows, rn);
  int m = 0;
  for (; T == W_I8 && m + 4 <= mrows; m += 4)
    vnni_rows<T, 4>(qx, dx, xsum, shift, m, K, w, rows, rn, n0, nr, y, ldy, acc, bias);
  for (; m + 2 <= mrows; m += 2)
    vnni_rows<T, 2>(qx, dx, xsum, shift, m, K, w, rows, rn, n0, nr, y, ldy, acc, bias);
  if (m < mrows) vnni_rows<T, 1>(qx, dx, xsum, shift, m, K, w, rows, rn, n0, nr, y, ldy, acc, bias);
}
#endif

void tile_f32(const float* x, int ldx, int mrows, const Weight& w, int n0, int nr, float* y,
              int ldy, bool acc, const float* bias) {
  const int K = w.k;
  const float* base = static_cast<const float*>(w.data);
  const float* rows[R];
  for (int r = 0; r < R; r++) rows[r] = base + (size_t)K * (n0 + (r < nr ? r : 0));
  float out[2][R];
  int m = 0;
  if (mrows == 1) {
    __m256 a[2][R];
    for (int u = 0; u < 2; u++)
      for (int r = 0; r < R; r++) a[u][r] = _mm256_setzero_ps();
    int k = 0;
    for (; k + 16 <= K; k += 16) {
      __m256 x0 = _mm256_loadu_ps(x + k), x1 = _mm256_loadu_ps(x + k + 8);
      for (int r = 0; r < R; r++) {
        a[0][r] = _mm256_fmadd_ps(_mm256_loadu_ps(rows[r] + k), x0, a[0][r]);
        a[1][r] = _mm256_fmadd_ps(_mm256_loadu_ps(rows[r] + k + 8), x1, a[1][r]);
      }
    }
    for (; k < K; k += 8) {
      __m256 x0 = _mm256_loadu_ps(x + k);
      for (int r = 0; r < R; r++) a[0][r] = _mm256_fmadd_ps(_mm256_loadu_ps(rows[r] + k), x0, a[0][r]);
    }
    for (int r = 0; r < R; r++) out[0][r] = hsum(_mm256_add_ps(a[0][r], a[1][r]));
    for (int r = 0; r < nr; r++) put(y, n0 + r, out[0][r], bias, acc);
    return;
  }
  for (; m < mrows; m += 2) {
    const int mm = mrows - m >= 2 ? 2 : 1;
    const float* x0p = x + (size_t)m * ldx;
    const float* x1p = x + (size_t)(m + mm - 1) * ldx;
    __m256 a[2][R];
    for (int u = 0; u < 2; u++)
      for (int r = 0; r < R; r++) a[u][r] = _mm256_setzero_ps();
    for (int k = 0; k < K; k += 8) {
      __m256 x0 = _mm256_loadu_ps(x0p + k), x1 = _mm256_loadu_ps(x1p + k);
      for (int r = 0; r < R; r++) {
        __m256 wv = _mm256_loadu_ps(rows[r] + k);
        a[0][r] = _mm256_fmadd_ps(wv, x0, a[0][r]);
        a[1][r] = _mm256_fmadd_ps(wv, x1, a[1][r]);
      }
    }
    for (int u = 0; u < mm; u++)
      for (int r = 0; r < R; r++) out[u][r] = hsum(a[u][r]);
    for (int u = 0; u < mm; u++) {
      float* yr = y + (size_t)(m + u) * ldy;
      for (int r = 0; r < nr; r++) put(yr, n0 + r, out[u][r], bias, acc);
    }
  }
}

#ifdef __AVX512F__
// The two panels p, p + 1 an AVX-512 panel loop takes: their weights (a last panel alone
// is its own second, computed twice and dropped), first output row and real rows each.
struct TwoPanels {
  const uint16_t *pan, *pan1;
  int n0, nr, nr1;
};

inline TwoPanels two_panels(const Weight& w, int p) {
  const int n0 = p * P, n1 = n0 + P;
  const uint16_t* pan = static_cast<const uint16_t*>(w.panels) + (size_t)p * w.k * P;
  const bool two = p + 1 < (w.n + P - 1) / P;
  return {pan, two ? pan + (size_t)w.k * P : pan, n0, w.n - n0 < P ? w.n - n0 : P,
          two ? (w.n - n1 < P ? w.n - n1 : P) : 0};
}

// The AVX-512 panel loops' sums for `mm` rows from y: a[u] holds row u's outputs of panel
// p, c[u] those of p + 1; int8's row scale applied, then the bias, stored or added.
inline void put_two_panels(const __m512* a, const __m512* c, int mm, float* y, int ldy,
                           const TwoPanels& t, const float* scale, const float* bias, bool acc) {
  const int n0 = t.n0, n1 = n0 + P;
  for (int u = 0; u < mm; u++) {
    float av[2 * P];
    _mm512_storeu_ps(av, a[u]);
    _mm512_storeu_ps(av + P, c[u]);
    float* yr = y + (size_t)u * ldy;
    for (int r = 0; r < t.nr; r++) put(yr, n0 + r, scale ? av[r] * scale[n0 + r] : av[r], bias, acc);
    for (int r = 0; r < t.nr1; r++) put(yr, n1 + r, scale ? av[P + r] * scale[n1 + r] : av[P + r], bias, acc);
  }
}
#endif

// Panel p (16 output rows, k-major: the 16 weights of each input column together, in bf16;
// the AVX-512 loop takes p + 1 too) against several fp32 activation rows, 6 at a time:
// per column one load, widened by a shift (even outputs) and a mask (odd ones), times each
// row's value broadcast: 12 accumulators, two weight vectors and one broadcast in
// registers, no horizontal sums.
// int8 matrices and Q4 codes keep their panels in bf16 too (every int8 value and code 0..15
// is exact in bf16, and its widening is the cheap one): int8's row scale multiplies the
// sums, Q4's block scale and minimum turn each column's codes into q d + m first.
template <bool Q4>
void panel(const float* x, int ldx, int mrows, const Weight& w, int p, float* y, int ldy,
           bool acc, const float* bias) {
  const int K = w.k, n0 = p * P, nr = w.n - n0 < P ? w.n - n0 : P;
  const uint16_t* pan = static_cast<const uint16_t*>(w.panels) + (size_t)p * K * P;
  const float* scale = w.type == W_I8 ? w.scale : nullptr;
  // Q4: per block of 32 columns and per panel of the call, [d x 16, m x 16] in the order
  // the loop holds the panel's outputs: each column's codes become q d + m in registers
  alignas(64) float dm[Q4 ? 32 * PANELS * (MAX_K / 32) : 1];
  if (Q4) {
    const int nb = K / 32;
    for (int b = 0; b < nb; b++)
      for (int r = 0; r < PANELS * P; r++) {  // the call's panels hold consecutive rows
        const bool real = n0 + r < w.n;
        const size_t at = (size_t)(real ? n0 + r : n0) * nb + b;
        float* block = dm + 32 * (PANELS * b + r / P);
        block[lane_of(r % P)] = real ? w.scale[at] : 0.f;
        block[16 + lane_of(r % P)] = real ? w.minimum[at] : 0.f;
      }
  }
#ifdef __AVX512F__
  // 512-bit registers (a -march=native build on a CPU with AVX-512): a column's 16 weights
  // widen into one vector in their order, two panels (p, p + 1) at a time and 8 rows a
  // pass: 16 accumulators, and each row's broadcast value feeds two multiply-adds (one
  // load per two FMAs instead of one). Every output is the same chain of multiply-adds
  // over k as in the AVX2 loop below: the same numbers to the bit.
  constexpr int PW = 8;
  const TwoPanels t = two_panels(w, p);
  const uint16_t* pan1 = t.pan1;
  for (int m = 0; m < mrows; m += PW) {
    const float* xr[PW];  // past the last row: the last row again, computed and dropped
    for (int u = 0; u < PW; u++) xr[u] = x + (size_t)(m + u < mrows ? m + u : mrows - 1) * ldx;
    // named accumulators, so that GCC keeps them in registers (see the AVX2 loop)
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
    __m512 c0 = a0, c1 = a0, c2 = a0, c3 = a0, c4 = a0, c5 = a0, c6 = a0, c7 = a0;
    const float *x0 = xr[0], *x1 = xr[1], *x2 = xr[2], *x3 = xr[3];
    const float *x4 = xr[4], *x5 = xr[5], *x6 = xr[6], *x7 = xr[7];
    for (int k = 0; k < K; k++) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(pan + (size_t)k * P));
      const __m256i v1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(pan1 + (size_t)k * P));
      __m512 wa = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
      __m512 wc = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v1), 16));
      if (Q4) {
        const float* d = dm + 64 * (k / 32);
        wa = _mm512_fmadd_ps(wa, _mm512_load_ps(d), _mm512_load_ps(d + 16));
        wc = _mm512_fmadd_ps(wc, _mm512_load_ps(d + 32), _mm512_load_ps(d + 48));
      }
      __m512 b = _mm512_set1_ps(x0[k]);
      a0 = _mm512_fmadd_ps(wa, b, a0), c0 = _mm512_fmadd_ps(wc, b, c0);
      b = _mm512_set1_ps(x1[k]);
      a1 = _mm512_fmadd_ps(wa, b, a1), c1 = _mm512_fmadd_ps(wc, b, c1);
      b = _mm512_set1_ps(x2[k]);
      a2 = _mm512_fmadd_ps(wa, b, a2), c2 = _mm512_fmadd_ps(wc, b, c2);
      b = _mm512_set1_ps(x3[k]);
      a3 = _mm512_fmadd_ps(wa, b, a3), c3 = _mm512_fmadd_ps(wc, b, c3);
      b = _mm512_set1_ps(x4[k]);
      a4 = _mm512_fmadd_ps(wa, b, a4), c4 = _mm512_fmadd_ps(wc, b, c4);
      b = _mm512_set1_ps(x5[k]);
      a5 = _mm512_fmadd_ps(wa, b, a5), c5 = _mm512_fmadd_ps(wc, b, c5);
      b = _mm512_set1_ps(x6[k]);
      a6 = _mm512_fmadd_ps(wa, b, a6), c6 = _mm512_fmadd_ps(wc, b, c6);
      b = _mm512_set1_ps(x7[k]);
      a7 = _mm512_fmadd_ps(wa, b, a7), c7 = _mm512_fmadd_ps(wc, b, c7);
    }
    const __m512 a[PW] = {a0, a1, a2, a3, a4, a5, a6, a7}, c[PW] = {c0, c1, c2, c3, c4, c5, c6, c7};
    put_two_panels(a, c, mrows - m < PW ? mrows - m : PW, y + (size_t)m * ldy, ldy, t, scale,
                   bias, acc);
  }
#else
  const __m256i odd = _mm256_set1_epi32((int)0xFFFF0000u);
  for (int m = 0; m < mrows; m += PM) {
    const float* xr[PM];  // past the last row: the last row again, computed and dropped
    for (int u = 0; u < PM; u++) xr[u] = x + (size_t)(m + u < mrows ? m + u : mrows - 1) * ldx;
    // twelve named accumulators: GCC keeps an array of them in memory, storing each one
    // back on every column
    __m256 e0 = _mm256_setzero_ps(), e1 = e0, e2 = e0, e3 = e0, e4 = e0, e5 = e0;
    __m256 o0 = e0, o1 = e0, o2 = e0, o3 = e0, o4 = e0, o5 = e0;
    const float *x0 = xr[0], *x1 = xr[1], *x2 = xr[2], *x3 = xr[3], *x4 = xr[4], *x5 = xr[5];
    for (int k = 0; k < K; k++) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(pan + (size_t)k * P));
      __m256 we = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
      __m256 wo = _mm256_castsi256_ps(_mm256_and_si256(v, odd));
      if (Q4) {
        const float* d = dm + 32 * (k / 32);
        we = _mm256_fmadd_ps(we, _mm256_load_ps(d), _mm256_load_ps(d + 16));
        wo = _mm256_fmadd_ps(wo, _mm256_load_ps(d + 8), _mm256_load_ps(d + 24));
      }
      __m256 b = _mm256_broadcast_ss(x0 + k);
      e0 = _mm256_fmadd_ps(we, b, e0), o0 = _mm256_fmadd_ps(wo, b, o0);
      b = _mm256_broadcast_ss(x1 + k);
      e1 = _mm256_fmadd_ps(we, b, e1), o1 = _mm256_fmadd_ps(wo, b, o1);
      b = _mm256_broadcast_ss(x2 + k);
      e2 = _mm256_fmadd_ps(we, b, e2), o2 = _mm256_fmadd_ps(wo, b, o2);
      b = _mm256_broadcast_ss(x3 + k);
      e3 = _mm256_fmadd_ps(we, b, e3), o3 = _mm256_fmadd_ps(wo, b, o3);
      b = _mm256_broadcast_ss(x4 + k);
      e4 = _mm256_fmadd_ps(we, b, e4), o4 = _mm256_fmadd_ps(wo, b, o4);
      b = _mm256_broadcast_ss(x5 + k);
      e5 = _mm256_fmadd_ps(we, b, e5), o5 = _mm256_fmadd_ps(wo, b, o5);
    }
    const __m256 e[PM] = {e0, e1, e2, e3, e4, e5}, o[PM] = {o0, o1, o2, o3, o4, o5};
    const int mm = mrows - m < PM ? mrows - m : PM;
    for (int u = 0; u < mm; u++) {
      float ev[8], ov[8];
      _mm256_storeu_ps(ev, e[u]);
      _mm256_storeu_ps(ov, o[u]);
      float* yr = y + (size_t)(m + u) * ldy;
      for (int r = 0; r < nr; r++) {
        const float v = r % 2 ? ov[r / 2] : ev[r / 2];
        put(yr, n0 + r, scale ? v * scale[n0 + r] : v, bias, acc);
      }
    }
  }
#endif
}

#ifdef PANEL_PAIRS
// The panels' products with AVX-512 BF16: x's rows as bf16 pairs (xb, K values a row, the
// pair k, k + 1 one 32-bit value), each broadcast against a panel's 16 lanes of weight
// pairs: `vdpbf16ps` adds both products to each lane's fp32 sum. Two panels and 8 rows a
// pass, as the AVX-512 loop in panel (16 accumulators, named); int8's row scale after.
void panel_pairs(const uint16_t* xb, int mrows, const Weight& w, int p, float* y, int ldy,
                 bool acc, const float* bias) {
  const int K = w.k;
  const float* scale = w.type == W_I8 ? w.scale : nullptr;
  constexpr int PW = 8;
  const TwoPanels t = two_panels(w, p);
  const uint16_t *pan = t.pan, *pan1 = t.pan1;
  for (int m = 0; m < mrows; m += PW) {
    const uint32_t* xr[PW];  // past the last row: the last row again, computed and dropped
    for (int u = 0; u < PW; u++)
      xr[u] = reinterpret_cast<const uint32_t*>(xb + (size_t)(m + u < mrows ? m + u : mrows - 1) * K);
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
    __m512 c0 = a0, c1 = a0, c2 = a0, c3 = a0, c4 = a0, c5 = a0, c6 = a0, c7 = a0;
    const uint32_t *x0 = xr[0], *x1 = xr[1], *x2 = xr[2], *x3 = xr[3];
    const uint32_t *x4 = xr[4], *x5 = xr[5], *x6 = xr[6], *x7 = xr[7];
    for (int j = 0; j < K / 2; j++) {
      const __m512bh wa = (__m512bh)_mm512_loadu_si512(pan + (size_t)j * 2 * P);
      const __m512bh wc = (__m512bh)_mm512_loadu_si512(pan1 + (size_t)j * 2 * P);
      __m512bh b = (__m512bh)_mm512_set1_epi32((int)x0[j]);
      a0 = _mm512_dpbf16_ps(a0, wa, b), c0 = _mm512_dpbf16_ps(c0, wc, b);
      b = (__m512bh)_mm512_set1_epi32((int)x1[j]);
      a1 = _mm512_dpbf16_ps(a1, wa, b), c1 = _mm512_dpbf16_ps(c1, wc, b);
      b = (__m512bh)_mm512_set1_epi32((int)x2[j]);
      a2 = _mm512_dpbf16_ps(a2, wa, b), c2 = _mm512_dpbf16_ps(c2, wc, b);
      b = (__m512bh)_mm512_set1_epi32((int)x3[j]);
      a3 = _mm512_dpbf16_ps(a3, wa, b), c3 = _mm512_dpbf16_ps(c3, wc, b);
      b = (__m512bh)_mm512_set1_epi32((int)x4[j]);
      a4 = _mm512_dpbf16_ps(a4, wa, b), c4 = _mm512_dpbf16_ps(c4, wc, b);
      b = (__m512bh)_mm512_set1_epi32((int)x5[j]);
      a5 = _mm512_dpbf16_ps(a5, wa, b), c5 = _mm512_dpbf16_ps(c5, wc, b);
      b = (__m512bh)_mm512_set1_epi32((int)x6[j]);
      a6 = _mm512_dpbf16_ps(a6, wa, b), c6 = _mm512_dpbf16_ps(c6, wc, b);
      b = (__m512bh)_mm512_set1_epi32((int)x7[j]);
      a7 = _mm512_dpbf16_ps(a7, wa, b), c7 = _mm512_dpbf16_ps(c7, wc, b);
    }
    const __m512 a[PW] = {a0, a1, a2, a3, a4, a5, a6, a7}, c[PW] = {c0, c1, c2, c3, c4, c5, c6, c7};
    put_two_panels(a, c, mrows - m < PW ? mrows - m : PW, y + (size_t)m * ldy, ldy, t, scale,
                   bias, acc);
  }
}

// values [0, count) of v rounded to bf16 (to nearest even) into out; count a multiple of 16
void to_bf16(const float* v, int count, uint16_t* out) {
  for (int k = 0; k < count; k += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + k), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(v + k)));
}
#endif

// int8 products over this many rows or more run on the panels (exact fp32 activations;
// 16 rows on 2 AVX2 cores: ~158 GFLOP/s against tile_int's ~130, 8 rows: 114 against 122):
// below it, tile_int's int8 activations are faster (benchmarks/kernels.py), and the k + 1
// rows self-speculation verifies for one sequence (k <= 8) take plain decoding's path
constexpr int I8_PANEL_ROWS = 10;

// the same for Q4 (its codes in bf16, the scales applied per column): 16 rows ~113 GFLOP/s
// against ~74, 8 rows 81 against 72; from 8 rows on, so that the k + 1 rows self-speculation
// verifies for one sequence (k <= 6) take plain decoding's path (greedy identity)
constexpr int Q4_PANEL_ROWS = 8;

// whether a product over mrows rows of w runs on its panels
inline bool on_panels(const Weight& w, int mrows) {
  return w.panels && ((w.type == W_BF16 && mrows > 1) || (w.type == W_I8 && mrows >= I8_PANEL_ROWS) ||
                      (w.type == W_Q4 && mrows >= Q4_PANEL_ROWS && w.k <= MAX_K));
}

// this thread's share [lo, hi) of `count` items split evenly over the team
inline void share(int count, int& lo, int& hi) {
  const int t = omp_get_thread_num(), nt = omp_get_num_threads();
  lo = (int)((long)count * t / nt);
  hi = (int)((long)count * (t + 1) / nt);
}

// the first PREFETCH_BYTES of this thread's share of w's row tiles (a product over
// `mrows` rows that runs on them; nothing for one on the panels or no w): issued by the
// step before a barrier or attention, so that the next product's first loads (which its
// own prefetches, a tile ahead, do not cover) find their lines on the way
inline void prefetch_share(const Weight* w, int mrows) {
  if (!w || mrows <= 0 || on_panels(*w, mrows)) return;
  const size_t tile_bytes = R * row_bytes(*w);
  int lo, hi;
  share((w->n + R - 1) / R, lo, hi);
  const char* p = static_cast<const char*>(w->data) + tile_bytes * lo;
  const size_t share_bytes = tile_bytes * (hi - lo);
  const size_t bytes = share_bytes < PREFETCH_BYTES ? share_bytes : PREFETCH_BYTES;
  for (size_t o = 0; o < bytes; o += 64) _mm_prefetch(p + o, PREFETCH_HINT);
}

// values [lo, hi) of one activation row as the product reads it: f(src) into dst (fp32,
// a row of K values; lo, hi multiples of 8). RMSNorm sums the whole row's squares.
void input_part(const float* src, int K, int lo, int hi, int mode, const float* norm, float eps,
                float* dst) {
  if (mode == 1) {
    float ss = 0.f;
    for (int k = 0; k < K; k++) ss += src[k] * src[k];
    const float inv = 1.f / sqrtf(ss / K + eps);
    for (int k = lo; k < hi; k++) dst[k] = norm[k] * (src[k] * inv);
  } else if (mode == 2) {  // silu(g) u = g u / (1 + e^-g)
    const __m256 one = _mm256_set1_ps(1.f), neg = _mm256_set1_ps(-0.f);
    for (int k = lo; k < hi; k += 8) {
      const __m256 g = _mm256_loadu_ps(src + k), u = _mm256_loadu_ps(src + K + k);
      const __m256 e = exp8(_mm256_xor_ps(g, neg));
      _mm256_storeu_ps(dst + k, _mm256_div_ps(_mm256_mul_ps(g, u), _mm256_add_ps(one, e)));
    }
  } else {
    memcpy(dst + lo, src + lo, sizeof(float) * (hi - lo));
  }
}

// evens then odds of every 16 values, the order tile_bf16 multiplies in (in place)
void permute16(float* v, int K) {
  float t[16];
  for (int k = 0; k < K; k += 16) {
    for (int j = 0; j < 8; j++) t[j] = v[k + 2 * j], t[8 + j] = v[k + 2 * j + 1];
    memcpy(v + k, t, sizeof t);
  }
}

// int8 per 32 values: d = max|v| / 127, q = round(v / d) (to nearest even, like lrintf);
// and the sum of the rounded values, d * sum(q), per block: Q4's minimum meets the same
// activations as its codes (GGUF's Q8_1 keeps it for this), so a block's product is
// exactly its dequantized weights times the rounded x (with the exact sum of x instead,
// the rounding error would be weighted by w - m >= 0, not by w: ~5x the logits error)
void quantize_row(const float* v, int K, int8_t* q, float* d, float* sum) {
  const __m256 sign = _mm256_set1_ps(-0.f);
  for (int b = 0; b < K / 32; b++) {
    const float* vb = v + 32 * b;
    __m256 x[4], amax = _mm256_setzero_ps();
    for (int j = 0; j < 4; j++) {
      x[j] = _mm256_loadu_ps(vb + 8 * j);
      amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, x[j]));
    }
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    const float db = _mm_cvtss_f32(m4) / 127.f;
    const __m256 inv = _mm256_set1_ps(db > 0.f ? 1.f / db : 0.f);
    __m256i i[4];
    __m256i total = _mm256_setzero_si256();
    for (int j = 0; j < 4; j++) {
      i[j] = _mm256_cvtps_epi32(_mm256_mul_ps(x[j], inv));
      total = _mm256_add_epi32(total, i[j]);
    }
    // pack to int8 (packs interleave 128-bit lanes: one permute puts them back in order)
    __m256i p16 = _mm256_packs_epi32(i[0], i[1]), p16b = _mm256_packs_epi32(i[2], i[3]);
    __m256i p8 = _mm256_packs_epi16(p16, p16b);
    p8 = _mm256_permutevar8x32_epi32(p8, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + 32 * b), p8);
    d[b] = db;
    sum[b] = db * hsum(_mm256_cvtepi32_ps(total));
  }
}


// The activation rows' scratch of a product (one chunk of rows): f(x) in fp32, and for
// int8 / Q4 weights its int8 rounding with a scale and a sum per 32 values.
struct Scratch {
  float* buf = nullptr;
  int8_t* qx = nullptr;
  float* dx = nullptr;
  float* xsum = nullptr;
  uint16_t* xb = nullptr;  // f(x) in bf16 (panel_pairs)

  // room for `rows` rows of up to K values; false when out of memory
  bool reserve(int rows, int K) {
    const size_t n = (size_t)rows * K, nb = n / 32 + 16;
    buf = static_cast<float*>(aligned_alloc(64, sizeof(float) * (n + 16)));
    qx = static_cast<int8_t*>(aligned_alloc(64, n + 64));
    dx = static_cast<float*>(aligned_alloc(64, sizeof(float) * nb));
    xsum = static_cast<float*>(aligned_alloc(64, sizeof(float) * nb));
    xb = static_cast<uint16_t*>(aligned_alloc(64, sizeof(uint16_t) * (n + 32)));
    return buf && qx && dx && xsum && xb;
  }
  ~Scratch() { free(buf), free(qx), free(dx), free(xsum), free(xb); }
};

bool bad_shape(const Weight& w, int M) {
  const bool integer = w.type == W_I8 || w.type == W_Q4;
  return M <= 0 || w.k <= 0 || w.n <= 0 || w.k % (integer ? 32 : 16) ||
         (w.type == W_BF16 && !w.panels);
}

// soft_linear's work for the calling thread of a parallel region: every thread of the
// team calls it (it has barriers); the scratch holds min(M, M_CHUNK) rows of w.k values.
// `next`, the product that follows over `next_rows` rows: its first lines are prefetched
// before the last barrier (prefetch_share).
void linear_team(const float* x, int M, int ldx, const Weight& w, const float* bias, float* y,
                 int ldy, int mode, const float* norm, float eps, bool add, const Scratch& s,
                 const Weight* next = nullptr, int next_rows = 0) {
  const int K = w.k, T = w.type;
  const bool integer = T == W_I8 || T == W_Q4;
  const bool scratch_in = mode != 0 || T != W_F32;
  const int nb = K / 32;
  const int chunk = M < M_CHUNK ? M : M_CHUNK;
  const int tiles = (w.n + R - 1) / R;
  const size_t tile_bytes = R * row_bytes(w);
  for (int m0 = 0; m0 < M; m0 += chunk) {
    const int mrows = M - m0 < chunk ? M - m0 : chunk;
    const bool panels = on_panels(w, mrows);  // else the row-major tiles
    const float* xin = x + (size_t)m0 * ldx;
    int ld = ldx;
    if (scratch_in) {  // many rows: a share of the rows each; few: a share of each row
      const int unit = integer ? 32 : 16;  // quantized blocks, permuted groups
      int lo = 0, hi = mrows, klo = 0, khi = K / unit;
      if (mrows >= 8) share(mrows, lo, hi);
      else share(K / unit, klo, khi);
      klo *= unit, khi *= unit;
      for (int m = lo; m < hi && klo < khi; m++) {
        float* row = s.buf + (size_t)m * K;
        input_part(xin + (size_t)m * ldx, K, klo, khi, mode, norm, eps, row);
        if (T == W_BF16 && mrows == 1) permute16(row + klo, khi - klo);  // tile_bf16's order
        if (integer && !panels)
          quantize_row(row + klo, khi - klo, s.qx + (size_t)m * K + klo, s.dx + (size_t)m * nb + klo / 32,
                       s.xsum + (size_t)m * nb + klo / 32);
#ifdef PANEL_PAIRS
        if (panels) to_bf16(row + klo, khi - klo, s.xb + (size_t)m * K + klo);
#endif
      }
#pragma omp barrier
      xin = s.buf;
      ld = K;
    }
#ifdef INT_VNNI
    float shifts[M_CHUNK];  // each thread its own: the rows are all quantized now
    if (T == W_I8 && !panels) int8_shifts(s.xsum, mrows, nb, shifts);
#endif
    int lo, hi;
    float* yout = y + (size_t)m0 * ldy;
    if (panels) {  // PANELS panels a call (the AVX-512 loop takes two)
      share(((w.n + P - 1) / P + PANELS - 1) / PANELS, lo, hi);
      for (int p = lo * PANELS; p < hi * PANELS; p += PANELS) {
#ifdef PANEL_PAIRS
        panel_pairs(s.xb, mrows, w, p, yout, ldy, add, bias);
#else
        if (T == W_Q4) panel<true>(xin, ld, mrows, w, p, yout, ldy, add, bias);
        else panel<false>(xin, ld, mrows, w, p, yout, ldy, add, bias);
#endif
      }
    } else {  // the row-major tiles, R output rows each
      share(tiles, lo, hi);
      for (int t = lo; t < hi; t++) {
        const int n0 = t * R, nr = w.n - n0 < R ? w.n - n0 : R;
        {
          const char* p = static_cast<const char*>(w.data) + tile_bytes * t + PREFETCH_BYTES;
          const char* end = static_cast<const char*>(w.data) + tile_bytes * hi;
          for (size_t o = 0; o < tile_bytes && p + o < end; o += 64) _mm_prefetch(p + o, PREFETCH_HINT);
          if (T == W_Q4) {  // and its block scales and minimums, as far ahead in rows
            const size_t ahead = (size_t)(t + PREFETCH_BYTES / tile_bytes) * R * nb, each = (size_t)R * nb;
            if (ahead + each <= (size_t)hi * R * nb)
              for (size_t o = 0; o < each; o += 16)
                _mm_prefetch(reinterpret_cast<const char*>(w.scale + ahead + o), PREFETCH_HINT),
                _mm_prefetch(reinterpret_cast<const char*>(w.minimum + ahead + o), PREFETCH_HINT);
          }
        }
        if (T == W_F32) tile_f32(xin, ld, mrows, w, n0, nr, yout, ldy, add, bias);
        else if (T == W_BF16) tile_bf16(xin, ld, mrows, w, n0, nr, yout, ldy, add, bias);
#ifdef INT_VNNI
        else if (T == W_I8) tile_int_vnni<W_I8>(s.qx, s.dx, s.xsum, shifts, mrows, K, w, n0, nr, yout, ldy, add, bias);
        else tile_int_vnni<W_Q4>(s.qx, s.dx, s.xsum, nullptr, mrows, K, w, n0, nr, yout, ldy, add, bias);
#else
        else if (T == W_I8) tile_int<W_I8>(s.qx, s.dx, s.xsum, mrows, K, w, n0, nr, yout, ldy, add, bias);
        else tile_int<W_Q4>(s.qx, s.dx, s.xsum, mrows, K, w, n0, nr, yout, ldy, add, bias);
#endif
      }
    }
    if (m0 + chunk >= M) prefetch_share(next, next_rows);
#pragma omp barrier
  }
}

// soft_rope's work for the calling thread of a parallel region (ends with a barrier)
void rope_team(float* x, int M, int ld, int heads, int D, const float* cos, const float* sin) {
  const int h = D / 2;
#pragma omp for schedule(static)
  for (int task = 0; task < M * heads; task++) {
    const int m = task / heads, hd = task % heads;
    const float* c = cos + (size_t)m * D;
    const float* s = sin + (size_t)m * D;
    float* v = x + (size_t)m * ld + (size_t)hd * D;
    for (int i = 0; i < h; i++) {
      const float a = v[i], b = v[i + h];
      v[i] = a * c[i] - b * s[i];
      v[i + h] = b * c[i + h] + a * s[i + h];
    }
  }
}

// Decode attention's tasks: a row's tokens in chunks of ATT_CHUNK (a kv head's keys of a
// chunk, 32 KB at head dim 64, stay in L1 while its query heads read them), each chunk
// for a range of query heads. How a row is chunked depends on its length alone, so its
// numbers do not depend on the other rows of the step (self-speculation's greedy identity).
constexpr int ATT_CHUNK = 128;
constexpr int ATT_AHEAD = 32;  // tokens ahead of its scores that a task prefetches

inline int att_chunks(int64_t length) { return (int)((length + ATT_CHUNK - 1) / ATT_CHUNK); }

// the chunks of a row that leave partial results: all of a row of several, none of one
inline int att_partial_chunks(int64_t length) {
  const int chunks = att_chunks(length);
  return chunks > 1 ? chunks : 0;
}

// floats of partial results the first n rows of a step need (a maximum, a sum and d
// weighted values per chunk and query head)
size_t att_partials(int n, const int64_t* length, int hq, int d) {
  size_t chunks = 0;
  for (int r = 0; r < n; r++) chunks += att_partial_chunks(length[r]);
  return chunks * hq * (d + 2);
}

// soft_attend_decode's work for the calling thread of a parallel region (ends with a
// barrier). A task is one chunk of a row's tokens for all its query heads, or, when there
// are too few chunks to keep the team busy, for one kv head's or one query head's: scores
// 8 tokens at a time (one horizontal sum for all 8), softmax with a vectorized exp, then
// the values. A row of one chunk writes its output; longer rows leave each chunk's
// maximum, sum and unnormalized values in `partial` (att_partials floats), combined after.
// The cache holds fp32 (T = float) or IEEE fp16 (T = uint16_t: half the bytes a step
// reads, widened by F16C as they are loaded and rounded to nearest even as they are
// written, as torch's .to(float16) rounds).
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const uint16_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline void store_row(float* dst, const float* src, int d) { memcpy(dst, src, sizeof(float) * d); }
inline void store_row(uint16_t* dst, const float* src, int d) {  // d: a multiple of 8
  for (int e = 0; e < d; e += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + e),
                     _mm256_cvtps_ph(_mm256_loadu_ps(src + e), _MM_FROUND_TO_NEAREST_INT));
}

template <typename T>
void attend_team(const float* q, int ldq, const float* k, int ldk, const float* v, int ldv, int n,
                 int hq, int hkv, int d, T* cache_k, T* cache_v, int block_size,
                 const int64_t* table, int max_blocks, const int64_t* write_block,
                 const int64_t* write_offset, const int64_t* length, float scale, float* out,
                 float* partial) {
  const int rep = hq / hkv;
  // every row's new key and value first: a row's tasks may be split across threads
#pragma omp for schedule(static)
  for (int task = 0; task < n * hkv; task++) {
    const int r = task / hkv, g = task % hkv;
    const size_t slot = ((size_t)write_block[r] * block_size + write_offset[r]) * hkv + g;
    store_row(cache_k + slot * d, k + (size_t)r * ldk + (size_t)g * d, d);
    store_row(cache_v + slot * d, v + (size_t)r * ldv + (size_t)g * d, d);
  }
  int chunks = 0;
  for (int r = 0; r < n; r++) chunks += att_chunks(length[r]);
  const int team = 4 * omp_get_num_threads();
  const int unit = chunks >= team ? hq : chunks * hkv >= team ? rep : 1;  // query heads a task
  const int parts = hq / unit;
  const size_t stride = (size_t)hkv * d;      // floats from a token to the next in a block
  const bool runs8 = block_size % 8 == 0;     // 8 tokens from a multiple of 8 share a block
  alignas(32) float scores[ATT_CHUNK];  // one chunk's scores, then its weights
#pragma omp for schedule(dynamic)
  for (int task = 0; task < chunks * parts; task++) {
    int c = task / parts, r = 0, slot = 0;  // row r's chunk c; slot: its first partial
    for (;; r++) {
      const int here = att_chunks(length[r]);
      if (c < here) break;
      c -= here;
      slot += att_partial_chunks(length[r]);
    }
    const int L = (int)length[r], many = att_chunks(L);
    const int t0 = c * ATT_CHUNK, t1 = L - t0 < ATT_CHUNK ? L : t0 + ATT_CHUNK;
    const int64_t* tab = table + (size_t)r * max_blocks;
    for (int h = task % parts * unit; h < (task % parts + 1) * unit; h++) {
      const int g = h / rep;
      auto key = [&](const T* cache, int t) {
        return cache + (((size_t)tab[t / block_size] * block_size + t % block_size) * hkv + g) * d;
      };
      const float* qh = q + (size_t)r * ldq + (size_t)h * d;
      __m256 best = _mm256_set1_ps(-INFINITY);
      for (int s0 = t0; s0 < t1; s0 += 8) {
        // 8 keys at a time with the columns outside: 8 independent chains of FMAs, each
        // the same sum in the same order as one key at a time (one chain was bound by the
        // FMA's latency); past the chunk's last token its last key again, masked below.
        // Named accumulators, so that GCC keeps them in registers (see panel)
        const T* k0 = key(cache_k, s0);
        auto at = [&](int i) {
          const int t = s0 + i < t1 ? s0 + i : t1 - 1;
          return runs8 ? k0 + (size_t)(t - s0) * stride : key(cache_k, t);
        };
        const T *k1 = at(1), *k2 = at(2), *k3 = at(3), *k4 = at(4), *k5 = at(5), *k6 = at(6), *k7 = at(7);
        // the keys and values ATT_AHEAD tokens on: the first query head of a kv head
        // fetches them (its others find them in cache), the values into L2 for the pass
        // after the scores (paired runs: 1-3 % off a step at 150 tokens, 3-7 % at 1024)
        if (h % rep == 0 || unit == 1)
          for (int t = s0 + ATT_AHEAD; t < s0 + ATT_AHEAD + 8 && t < t1; t++) {
            const char* pk = reinterpret_cast<const char*>(key(cache_k, t));
            const char* pv = reinterpret_cast<const char*>(key(cache_v, t));
            for (size_t o = 0; o < sizeof(T) * d; o += 64) {
              _mm_prefetch(pk + o, _MM_HINT_T0);
              _mm_prefetch(pv + o, _MM_HINT_T1);
            }
          }
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
        for (int e = 0; e < d; e += 8) {
          const __m256 qv = _mm256_loadu_ps(qh + e);
          a0 = _mm256_fmadd_ps(qv, load8(k0 + e), a0);
          a1 = _mm256_fmadd_ps(qv, load8(k1 + e), a1);
          a2 = _mm256_fmadd_ps(qv, load8(k2 + e), a2);
          a3 = _mm256_fmadd_ps(qv, load8(k3 + e), a3);
          a4 = _mm256_fmadd_ps(qv, load8(k4 + e), a4);
          a5 = _mm256_fmadd_ps(qv, load8(k5 + e), a5);
          a6 = _mm256_fmadd_ps(qv, load8(k6 + e), a6);
          a7 = _mm256_fmadd_ps(qv, load8(k7 + e), a7);
        }
        const __m256 a[8] = {a0, a1, a2, a3, a4, a5, a6, a7};
        __m256 sc = _mm256_mul_ps(hsum8(a), _mm256_set1_ps(scale));
        if (s0 + 8 > t1) {  // past the last token: -inf, which exp makes 0
          const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
          const __m256i live = _mm256_cmpgt_epi32(_mm256_set1_epi32(t1 - s0), idx);
          sc = _mm256_blendv_ps(_mm256_set1_ps(-INFINITY), sc, _mm256_castsi256_ps(live));
        }
        _mm256_store_ps(scores + (s0 - t0), sc);
        best = _mm256_max_ps(best, sc);
      }
      __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(best), _mm256_extractf128_ps(best, 1));
      m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
      m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
      const float top = _mm_cvtss_f32(m4);
      const __m256 mx = _mm256_set1_ps(top);
      __m256 total = _mm256_setzero_ps();
      for (int s0 = 0; s0 < t1 - t0; s0 += 8) {
        const __m256 p = exp8(_mm256_sub_ps(_mm256_load_ps(scores + s0), mx));
        _mm256_store_ps(scores + s0, p);
        total = _mm256_add_ps(total, p);
      }
      const float sum = hsum(total);
      // a row of one chunk: its output (the weighted values / the sum); else the chunk's
      // maximum, sum and weighted values
      float* part = many == 1 ? nullptr : partial + ((size_t)(slot + c) * hq + h) * (d + 2);
      float* o = many == 1 ? out + ((size_t)r * hq + h) * d : part + 2;
      const __m256 norm = _mm256_set1_ps(many == 1 ? 1.f / sum : 1.f);
      if (many > 1) part[0] = top, part[1] = sum;
      for (int e0 = 0; e0 < d; e0 += 64) {  // 8 registers of the output at a time
        const int w = d - e0 < 64 ? (d - e0) / 8 : 8;
        __m256 acc[8];
        if (w == 8) {  // named accumulators, kept in registers (an array goes to the stack)
          __m256 c0 = _mm256_setzero_ps(), c1 = c0, c2 = c0, c3 = c0, c4 = c0, c5 = c0, c6 = c0, c7 = c0;
          for (int b0 = t0; b0 < t1;) {  // a block's tokens at a time: one key lookup each
            const int end = (b0 / block_size + 1) * block_size < t1 ? (b0 / block_size + 1) * block_size : t1;
            const T* vb = key(cache_v, b0) + e0;
            for (int t = b0; t < end; t++) {
              const __m256 p = _mm256_set1_ps(scores[t - t0]);
              const T* vp = vb + (size_t)(t - b0) * stride;
              c0 = _mm256_fmadd_ps(p, load8(vp), c0);
              c1 = _mm256_fmadd_ps(p, load8(vp + 8), c1);
              c2 = _mm256_fmadd_ps(p, load8(vp + 16), c2);
              c3 = _mm256_fmadd_ps(p, load8(vp + 24), c3);
              c4 = _mm256_fmadd_ps(p, load8(vp + 32), c4);
              c5 = _mm256_fmadd_ps(p, load8(vp + 40), c5);
              c6 = _mm256_fmadd_ps(p, load8(vp + 48), c6);
              c7 = _mm256_fmadd_ps(p, load8(vp + 56), c7);
            }
            b0 = end;
          }
          acc[0] = c0, acc[1] = c1, acc[2] = c2, acc[3] = c3;
          acc[4] = c4, acc[5] = c5, acc[6] = c6, acc[7] = c7;
        } else {
          for (int u = 0; u < 8; u++) acc[u] = _mm256_setzero_ps();
          for (int t = t0; t < t1; t++) {
            const __m256 p = _mm256_set1_ps(scores[t - t0]);
            const T* vp = key(cache_v, t) + e0;
            for (int u = 0; u < w; u++) acc[u] = _mm256_fmadd_ps(p, load8(vp + 8 * u), acc[u]);
          }
        }
        for (int u = 0; u < w; u++) _mm256_storeu_ps(o + e0 + 8 * u, _mm256_mul_ps(acc[u], norm));
      }
    }
  }
  // rows of several chunks: e^(m_c - M) weighs chunk c's sum and values (M: the maximum);
  // none (every row one chunk, as at short contexts): no pass, and no barrier after it
  if (chunks == n) return;
#pragma omp for schedule(static)
  for (int task = 0; task < n * hq; task++) {
    const int r = task / hq, h = task % hq, many = att_chunks(length[r]);
    if (many == 1) continue;
    const float* part = partial + att_partials(r, length, hq, d) + (size_t)h * (d + 2);
    const size_t next = (size_t)hq * (d + 2);  // from a chunk's results to the next one's
    float top = -INFINITY, sum = 0.f;
    for (int c = 0; c < many; c++) top = part[c * next] > top ? part[c * next] : top;
    float* o = out + ((size_t)r * hq + h) * d;
    for (int e = 0; e < d; e++) o[e] = 0.f;
    for (int c = 0; c < many; c++) {
      const float* pc = part + c * next;
      const float f = expf(pc[0] - top);
      sum += f * pc[1];
      for (int e = 0; e < d; e++) o[e] += f * pc[2 + e];
    }
    for (int e = 0; e < d; e++) o[e] /= sum;
  }
}

// attend_team over a cache of either element type (half: fp16, else fp32)
void attend_cache(const float* q, int ldq, const float* k, int ldk, const float* v, int ldv, int n,
                  int hq, int hkv, int d, void* cache_k, void* cache_v, bool half, int block_size,
                  const int64_t* table, int max_blocks, const int64_t* write_block,
                  const int64_t* write_offset, const int64_t* length, float scale, float* out,
                  float* partial) {
  if (half)
    attend_team(q, ldq, k, ldk, v, ldv, n, hq, hkv, d, static_cast<uint16_t*>(cache_k),
                static_cast<uint16_t*>(cache_v), block_size, table, max_blocks, write_block,
                write_offset, length, scale, out, partial);
  else
    attend_team(q, ldq, k, ldk, v, ldv, n, hq, hkv, d, static_cast<float*>(cache_k),
                static_cast<float*>(cache_v), block_size, table, max_blocks, write_block,
                write_offset, length, scale, out, partial);
}

}  // namespace

extern "C" {

// y (M, w.n) (+)= f(x) @ w^T, where f is
//   mode 0: x itself (M, w.k), row stride ldx;
//   mode 1: RMSNorm: x / sqrt(mean(x^2) + eps) * norm (M, w.k);
//   mode 2: SwiGLU: silu(x[:, :k]) * x[:, k:2k] over x (M, 2 w.k).
// int8 and Q4 weights multiply int8 activations (see tile_int). accumulate != 0 adds
// into y (the residual stream); bias (w.n) or null. Returns 0, -1 for a bad shape, -2 out of memory.
int soft_linear(const float* x, int M, int ldx, const Weight* wp, const float* bias, float* y,
                int ldy, int mode, const float* norm, float eps, int accumulate, int threads) {
  const Weight& w = *wp;
  if (bad_shape(w, M)) return -1;
  Scratch s;
  if ((mode != 0 || w.type != W_F32) && !s.reserve(M < M_CHUNK ? M : M_CHUNK, w.k)) return -2;
#pragma omp parallel num_threads(threads)
  linear_team(x, M, ldx, w, bias, y, ldy, mode, norm, eps, accumulate != 0, s);
  return 0;
}

// Rotary embedding in place on the first `heads` heads of each row of x (M, ld):
// x1, x2 = halves of a head; x <- (x1 cos - x2 sin, x2 cos + x1 sin), cos/sin (M, D).
void soft_rope(float* x, int M, int ld, int heads, int D, const float* cos, const float* sin,
               int threads) {
#pragma omp parallel num_threads(threads) if (M * heads > 64)
  rope_team(x, M, ld, heads, D, cos, sin);
}

// Decode attention over a paged KV cache, one new token per row: row r writes its key
// and value (k, v: (n, hkv, d) at row strides ldk / ldv) into cache block write_block[r]
// at offset write_offset[r], then attends over its tokens 0 .. length[r] - 1, which sit in
// blocks table[r * max_blocks + s / block_size] of the cache ((blocks, block_size, hkv, d)
// fp32, or fp16 where half != 0). Grouped queries: q head h reads kv head h / (hq / hkv).
// out: (n, hq, d). Returns 0, or -2 out of memory.
int soft_attend_decode(const float* q, int ldq, const float* k, int ldk, const float* v, int ldv, int n,
                        int hq, int hkv, int d, void* cache_k, void* cache_v, int half,
                        int block_size, const int64_t* table, int max_blocks,
                        const int64_t* write_block, const int64_t* write_offset,
                        const int64_t* length, float scale, float* out, int threads) {
  const size_t parts = att_partials(n, length, hq, d);
  float* partial = parts ? static_cast<float*>(malloc(sizeof(float) * parts)) : nullptr;
  if (parts && !partial) return -2;
#pragma omp parallel num_threads(threads)
  attend_cache(q, ldq, k, ldk, v, ldv, n, hq, hkv, d, cache_k, cache_v, half != 0, block_size,
               table, max_blocks, write_block, write_offset, length, scale, out, partial);
  free(partial);
  return 0;
}

// A decoder layer as soft_decode_layers reads it. For n rows of one new token each, in
// place on the residual stream h (n, hidden): RMSNorm -> q|k|v (+ bias) -> rotary on q, k
// -> decode attention over the paged cache -> o-projection added to h -> RMSNorm ->
// gate|up -> SwiGLU -> down added to h: the same arithmetic as the calls above one by one
// (the model's fallback path), without a return to Python between them.
struct Layer {
  const Weight* qkv;
  const Weight* o;
  const Weight* gate_up;
  const Weight* down;
  const float* qkv_bias;  // or null
  const float* input_norm;
  const float* post_norm;
  float eps;
  int32_t heads, kv_heads, head_dim;
};

struct Paged {
  void* k;  // (blocks, block_size, kv_heads, head_dim): fp32, or fp16 where half != 0
  void* v;
  int32_t half;
  int32_t block_size, max_blocks;
  const int64_t* table;  // (n, max_blocks) block ids of each row at this layer
  const int64_t* write_block;
  const int64_t* write_offset;
  const int64_t* length;
  float scale;
};

}  // extern "C"

namespace {

// A decode step's activations: q|k|v, attention output, gate|up for n rows, and the
// products' scratch.
struct StepBuffers {
  float* qkv = nullptr;
  float* att = nullptr;
  float* gu = nullptr;
  float* partial = nullptr;  // attention's partial results (att_partials)
  Scratch s;

  bool reserve(int n, const Layer& L, const int64_t* length) {
    const int nq = L.heads * L.head_dim, inter = L.down->k;
    const Weight* ws[] = {L.qkv, L.o, L.gate_up, L.down};
    int K = 0;
    for (const Weight* w : ws) K = w->k > K ? w->k : K;
    qkv = static_cast<float*>(malloc(sizeof(float) * (size_t)n * L.qkv->n));
    att = static_cast<float*>(malloc(sizeof(float) * (size_t)n * nq));
    gu = static_cast<float*>(malloc(sizeof(float) * (size_t)n * 2 * inter));
    const size_t parts = att_partials(n, length, L.heads, L.head_dim);
    partial = static_cast<float*>(malloc(sizeof(float) * (parts ? parts : 1)));
    return qkv && att && gu && partial && s.reserve(n < M_CHUNK ? n : M_CHUNK, K);
  }
  ~StepBuffers() { free(qkv), free(att), free(gu), free(partial); }
};

bool bad_layer(const Layer& L, int n) {
  return bad_shape(*L.qkv, n) || bad_shape(*L.o, n) || bad_shape(*L.gate_up, n) ||
         bad_shape(*L.down, n) || L.kv_heads <= 0 || L.heads % L.kv_heads || L.head_dim % 8;
}

// one layer of soft_decode_layers for the calling thread of its parallel region; `next`
// (or null), the product that follows over `next_rows` rows (the next layer's q|k|v, or
// the head), for prefetch_share: every product's first lines are on their way while the
// one before it ends or attention runs
void decode_layer_team(float* h, int n, const Layer& L, const float* cos, const float* sin,
                       const Paged& P, const StepBuffers& b, const Weight* next, int next_rows) {
  const int hidden = L.o->n, d = L.head_dim;
  const int nq = L.heads * d, nkv = L.kv_heads * d, nqkv = L.qkv->n;
  const int inter = L.down->k;
  linear_team(h, n, hidden, *L.qkv, L.qkv_bias, b.qkv, nqkv, 1, L.input_norm, L.eps, false, b.s);
  prefetch_share(L.o, n);
  rope_team(b.qkv, n, nqkv, L.heads + L.kv_heads, d, cos, sin);
  attend_cache(b.qkv, nqkv, b.qkv + nq, nqkv, b.qkv + nq + nkv, nqkv, n, L.heads, L.kv_heads, d,
               P.k, P.v, P.half != 0, P.block_size, P.table, P.max_blocks, P.write_block,
               P.write_offset, P.length, P.scale, b.att, b.partial);
  linear_team(b.att, n, nq, *L.o, nullptr, h, hidden, 0, nullptr, 0.f, true, b.s, L.gate_up, n);
  linear_team(h, n, hidden, *L.gate_up, nullptr, b.gu, 2 * inter, 1, L.post_norm, L.eps, false, b.s,
              L.down, n);
  linear_team(b.gu, n, 2 * inter, *L.down, nullptr, h, hidden, 2, nullptr, 0.f, true, b.s, next,
              next_rows);
}

}  // namespace

extern "C" {

// A decode step through `count` layers in one parallel region: layer i runs on the first
// rows[i] rows of h (n, hidden; rows deepest first, so a row that left at its exit keeps
// its residual stream from there), at cache layer first + i: its block table and write
// blocks are P's advanced by i * table_stride and i * write_stride values. Every layer has
// the same shapes. With a `head` (else null), the step ends in its product over every
// row's final RMSNorm (head_norm, head_eps): logits (n, head->n), in the same parallel
// region, its first lines fetched while the last layer ends. Returns 0, -1 for a bad
// shape or -2 out of memory.
int soft_decode_layers(float* h, int n, int count, const Layer* layers, const int* rows,
                       const float* cos, const float* sin, const Paged* P, int64_t table_stride,
                       int64_t write_stride, const Weight* head, const float* head_norm,
                       float head_eps, float* logits, int threads) {
  if (count <= 0) return 0;
  if (head && (bad_shape(*head, n) || head->k != layers[0].o->n)) return -1;
  const Layer& first = layers[0];
  for (int i = 0; i < count; i++) {
    const Layer& L = layers[i];
    if (rows[i] < 0 || rows[i] > n || bad_layer(L, n)) return -1;
    if (L.qkv->n != first.qkv->n || L.o->k != first.o->k || L.down->k != first.down->k ||
        L.qkv->k != first.qkv->k || L.heads != first.heads || L.head_dim != first.head_dim)
      return -1;  // the step's buffers are sized by the first layer
  }
  StepBuffers b;
  if (!b.reserve(n, layers[0], P->length)) return -2;
  const int hidden = first.o->n;
#pragma omp parallel num_threads(threads)
  {
    for (int i = 0; i < count; i++) {
      if (rows[i] <= 0) continue;
      Paged p = *P;
      p.table += i * table_stride;
      p.write_block += i * write_stride;
      const bool more = i + 1 < count && rows[i + 1] > 0;
      const Weight* next = more ? layers[i + 1].qkv : head;
      decode_layer_team(h, rows[i], layers[i], cos, sin, p, b, next, more ? rows[i + 1] : n);
    }
    if (head)
      linear_team(h, n, hidden, *head, nullptr, logits, head->n, 1, head_norm, head_eps, false,
                  b.s);
  }
  return 0;
}

}  // extern "C"

namespace {

// GFLOP/s of `iters` rounds of 12 independent chains a thread over `threads` threads,
// `flops` per step of a chain: a = step(a), started from `start(thread number)`, the
// chains' sums (`add`, `total`) used so that they are not optimized away. Named
// accumulators, so that GCC keeps them in registers (see panel).
template <typename Start, typename Step, typename Add, typename Total>
double chains_peak(long iters, int threads, double flops, Start start, Step step, Add add,
                   Total total) {
  double t0 = omp_get_wtime();
  float sink = 0.f;
#pragma omp parallel num_threads(threads) reduction(+ : sink)
  {
    auto a0 = start((float)omp_get_thread_num()), a1 = a0, a2 = a0, a3 = a0;
    auto a4 = a0, a5 = a0, a6 = a0, a7 = a0, a8 = a0, a9 = a0, a10 = a0, a11 = a0;
    for (long n = 0; n < iters; n++) {
      a0 = step(a0), a1 = step(a1), a2 = step(a2), a3 = step(a3);
      a4 = step(a4), a5 = step(a5), a6 = step(a6), a7 = step(a7);
      a8 = step(a8), a9 = step(a9), a10 = step(a10), a11 = step(a11);
    }
    a0 = add(add(add(a0, a1), add(a2, a3)), add(add(a4, a5), add(a6, a7)));
    sink += total(add(a0, add(add(a8, a9), add(a10, a11))));
  }
  const double s = omp_get_wtime() - t0;
  return sink == 12345.f ? 0.0 : flops * 12 * (double)iters * threads / s / 1e9;
}

}  // namespace

extern "C" {

// The machine's fp32 multiply-add peak, GFLOP/s over `threads` threads: each runs 12
// independent chains of FMAs as wide as this build's panels use (16 lanes with AVX-512,
// else 8; no loads) for `iters` rounds. What the products over many rows are measured
// against (benchmarks/kernels.py).
#ifdef __AVX512F__
#define FMA_V __m512
#define FMA_SET1 _mm512_set1_ps
#define FMA_FMADD _mm512_fmadd_ps
#define FMA_ADD _mm512_add_ps
#define FMA_SUM _mm512_reduce_add_ps
constexpr int FMA_LANES = 16;
#else
#define FMA_V __m256
#define FMA_SET1 _mm256_set1_ps
#define FMA_FMADD _mm256_fmadd_ps
#define FMA_ADD _mm256_add_ps
#define FMA_SUM hsum
constexpr int FMA_LANES = 8;
#endif
double soft_fma_peak(long iters, int threads) {
  const FMA_V m = FMA_SET1(0.999999f), c = FMA_SET1(1e-7f);
  return chains_peak(
      iters, threads, 2.0 * FMA_LANES, [](float v) { return FMA_SET1(v); },
      [=](FMA_V a) { return FMA_FMADD(a, m, c); }, [](FMA_V a, FMA_V b) { return FMA_ADD(a, b); },
      [](FMA_V a) { return FMA_SUM(a); });
}

// The machine's bf16 dot-product peak, GFLOP/s over `threads` threads: 12 independent
// chains of `vdpbf16ps` (each adds two products a lane to 16 fp32 sums: 64 flops) for
// `iters` rounds; the ceiling of the panels' products on a build with PANEL_PAIRS (it may
// sit below the fp32 FMA peak where the instruction issues at half the FMA's rate). 0
// without AVX-512 BF16.
double soft_bf16_peak(long iters, int threads) {
#ifdef PANEL_PAIRS
  const __m512bh w = (__m512bh)_mm512_set1_epi32(0x3F803F80), x = (__m512bh)_mm512_set1_epi32(0x33D633D6);
  return chains_peak(
      iters, threads, 64.0, [](float v) { return _mm512_set1_ps(v); },
      [=](__m512 a) { return _mm512_dpbf16_ps(a, w, x); },
      [](__m512 a, __m512 b) { return _mm512_add_ps(a, b); },
      [](__m512 a) { return _mm512_reduce_add_ps(a); });
#else
  (void)iters, (void)threads;
  return 0.0;
#endif
}

// The stream a decode step's weights can at best get: buffers data[0..count), bytes[i]
// each (a multiple of 8), read in order with 256-bit loads and nothing else, each split
// in halves (a share a thread) over `threads` threads with a barrier after it, as a step
// reads its products. Returns the sum of every 64-bit word, mod 2^64 (what keeps the
// loads; the benchmark times the call).
uint64_t soft_stream_read(const void* const* data, const int64_t* bytes, int count, int threads) {
  uint64_t total = 0;
#pragma omp parallel num_threads(threads) reduction(+ : total)
  {
    __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
    uint64_t tail = 0;
    for (int i = 0; i < count; i++) {
      const int64_t words = bytes[i] / 8;
      int lo, hi;
      share((int)((words + 15) / 16), lo, hi);  // 128-byte units
      const uint64_t* w = static_cast<const uint64_t*>(data[i]);
      const int64_t end = 16 * (int64_t)hi < words ? 16 * (int64_t)hi : words;
      int64_t k = 16 * (int64_t)lo;
      for (; k + 16 <= end; k += 16) {
        a0 = _mm256_add_epi64(a0, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k)));
        a1 = _mm256_add_epi64(a1, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k + 4)));
        a2 = _mm256_add_epi64(a2, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k + 8)));
        a3 = _mm256_add_epi64(a3, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k + 12)));
      }
      for (; k < end; k++) tail += w[k];
#pragma omp barrier
    }
    alignas(32) uint64_t v[4];
    _mm256_store_si256(reinterpret_cast<__m256i*>(v),
                       _mm256_add_epi64(_mm256_add_epi64(a0, a1), _mm256_add_epi64(a2, a3)));
    total += v[0] + v[1] + v[2] + v[3] + tail;
  }
  return total;
}

// The vector width the products over many rows use: 16 fp32 lanes with AVX-512, else 8.
int soft_vector_lanes() { return FMA_LANES; }

// 1 where the panels hold pairs of k a lane and products over them round the activations
// to bf16 (a build for a CPU with AVX-512 BF16: panel_pairs), else 0.
int soft_panel_pairs() {
#ifdef PANEL_PAIRS
  return 1;
#else
  return 0;
#endif
}

// From how many rows an int8 product multiplies its panels by x itself (exact fp32
// activations) instead of rounding x to int8 per 32 values.
int soft_i8_panel_rows() { return I8_PANEL_ROWS; }

// The same for Q4 weights (x itself from this many rows on; rounded to int8 below).
int soft_q4_panel_rows() { return Q4_PANEL_ROWS; }

// The structs' layout as this compiler laid them out, for the ctypes mirror in
// models/kernels/__init__.py to be checked against at load: for Weight, Layer and Paged in
// turn, sizeof, then each field's offsetof in declaration order. Writes at most `cap`
// values to out; returns how many there are.
int soft_abi_layout(int64_t* out, int cap) {
  const int64_t v[] = {
      sizeof(Weight), offsetof(Weight, type), offsetof(Weight, n), offsetof(Weight, k),
      offsetof(Weight, data), offsetof(Weight, scale), offsetof(Weight, minimum),
      offsetof(Weight, panels),
      sizeof(Layer), offsetof(Layer, qkv), offsetof(Layer, o), offsetof(Layer, gate_up),
      offsetof(Layer, down), offsetof(Layer, qkv_bias), offsetof(Layer, input_norm),
      offsetof(Layer, post_norm), offsetof(Layer, eps), offsetof(Layer, heads),
      offsetof(Layer, kv_heads), offsetof(Layer, head_dim),
      sizeof(Paged), offsetof(Paged, k), offsetof(Paged, v), offsetof(Paged, half),
      offsetof(Paged, block_size),
      offsetof(Paged, max_blocks), offsetof(Paged, table), offsetof(Paged, write_block),
      offsetof(Paged, write_offset), offsetof(Paged, length), offsetof(Paged, scale),
  };
  const int n = (int)(sizeof(v) / sizeof(v[0]));
  for (int i = 0; i < n && i < cap; i++) out[i] = v[i];
  return n;
}

}  // extern "C"
