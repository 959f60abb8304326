// soft-serve's CPU kernels: the matrix products of a decoder layer over fp32 activations,
// reading fp32, bf16, int8 (one scale per output row) or int4 (GGUF Q4_1 blocks of 32)
// weights, with the small ops around them fused in (RMSNorm before, SwiGLU on the input,
// the residual add after) and rotary embeddings in place.
//
// Built on first use by models/kernels/__init__.py (g++ -O3 -march=native -fopenmp) and
// called through ctypes. OpenMP is the libgomp torch itself loaded (same soname), so the
// calling thread's team is the one torch's own kernels run on.
//
// The product loop: for a chunk of activation rows (kept in L2), every thread takes a
// contiguous range of output rows, 4 at a time, and for each pair of activation rows
// runs the K loop with 8 accumulators; weights are loaded and widened to fp32 once per
// pair. At one activation row (decode) the K loop is unrolled twice instead.

#include <immintrin.h>
#include <math.h>
#include <omp.h>
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
};

int soft_abi_version(void) { return 1; }

}  // extern "C"

namespace {

constexpr int R = 4;          // output rows per tile
constexpr int M_CHUNK = 64;   // activation rows per pass over the weights
// how far ahead of its tile a thread prefetches the weights into L1: a tile's rows are
// short streams (576 bytes of int8) that the hardware prefetchers pick up too late
constexpr size_t PREFETCH_BYTES = 16384;

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
  const size_t rb = T == W_I8 ? (size_t)K : (size_t)K / 2;
  const uint8_t* base = static_cast<const uint8_t*>(w.data);
  const uint8_t* rows[R];
  int rn[R];
  for (int r = 0; r < R; r++) rn[r] = n0 + (r < nr ? r : 0), rows[r] = base + rb * rn[r];
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

// this thread's share [lo, hi) of `count` items split evenly over the team
inline void share(int count, int& lo, int& hi) {
  const int t = omp_get_thread_num(), nt = omp_get_num_threads();
  lo = (int)((long)count * t / nt);
  hi = (int)((long)count * (t + 1) / nt);
}

inline float silu(float g) { return g / (1.f + expf(-g)); }

// one activation row as the product reads it: f(src) into dst (fp32, K values)
void input_row(const float* src, int K, int mode, const float* norm, float eps, float* dst) {
  if (mode == 1) {
    float ss = 0.f;
    for (int k = 0; k < K; k++) ss += src[k] * src[k];
    const float inv = 1.f / sqrtf(ss / K + eps);
    for (int k = 0; k < K; k++) dst[k] = norm[k] * (src[k] * inv);
  } else if (mode == 2) {
    for (int k = 0; k < K; k++) dst[k] = silu(src[k]) * src[K + k];
  } else {
    memcpy(dst, src, sizeof(float) * K);
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
  const int K = w.k, T = w.type;
  const bool integer = T == W_I8 || T == W_Q4;
  if (M <= 0 || K <= 0 || w.n <= 0 || K % (integer ? 32 : 16)) return -1;
  const bool scratch_in = mode != 0 || T != W_F32;
  const int nb = K / 32;
  const int chunk = M < M_CHUNK ? M : M_CHUNK;
  float* buf = nullptr;
  int8_t* qx = nullptr;
  float *dx = nullptr, *xsum = nullptr;
  if (scratch_in) {
    buf = static_cast<float*>(aligned_alloc(64, sizeof(float) * ((size_t)chunk * K + 16)));
    qx = static_cast<int8_t*>(aligned_alloc(64, (size_t)chunk * K + 64));
    dx = static_cast<float*>(aligned_alloc(64, sizeof(float) * ((size_t)chunk * nb + 16)));
    xsum = static_cast<float*>(aligned_alloc(64, sizeof(float) * ((size_t)chunk * nb + 16)));
    if (!buf || !qx || !dx || !xsum) {
      free(buf), free(qx), free(dx), free(xsum);
      return -2;
    }
  }
  const int tiles = (w.n + R - 1) / R;
  const size_t row_bytes = T == W_F32 ? 4 * (size_t)K : T == W_BF16 ? 2 * (size_t)K
                           : T == W_I8 ? (size_t)K : (size_t)K / 2;
  const size_t tile_bytes = R * row_bytes;
#pragma omp parallel num_threads(threads)
  for (int m0 = 0; m0 < M; m0 += chunk) {
    const int mrows = M - m0 < chunk ? M - m0 : chunk;
    const float* xin = x + (size_t)m0 * ldx;
    int ld = ldx;
    if (scratch_in) {
      int lo = 0, hi = mrows;
      if (mrows >= 8) share(mrows, lo, hi);
      else if (omp_get_thread_num() != 0) hi = 0;
      for (int m = lo; m < hi; m++) {
        float* row = buf + (size_t)m * K;
        input_row(xin + (size_t)m * ldx, K, mode, norm, eps, row);
        if (T == W_BF16) permute16(row, K);
        if (integer) quantize_row(row, K, qx + (size_t)m * K, dx + (size_t)m * nb, xsum + (size_t)m * nb);
      }
#pragma omp barrier
      xin = buf;
      ld = K;
    }
    int lo, hi;
    share(tiles, lo, hi);
    float* yout = y + (size_t)m0 * ldy;
    const bool add = accumulate != 0;
    for (int t = lo; t < hi; t++) {
      const int n0 = t * R, nr = w.n - n0 < R ? w.n - n0 : R;
      {
        const char* p = static_cast<const char*>(w.data) + tile_bytes * t + PREFETCH_BYTES;
        const char* end = static_cast<const char*>(w.data) + tile_bytes * hi;
        for (size_t o = 0; o < tile_bytes && p + o < end; o += 64) _mm_prefetch(p + o, _MM_HINT_T0);
      }
      if (T == W_F32) tile_f32(xin, ld, mrows, w, n0, nr, yout, ldy, add, bias);
      else if (T == W_BF16) tile_bf16(xin, ld, mrows, w, n0, nr, yout, ldy, add, bias);
      else if (T == W_I8) tile_int<W_I8>(qx, dx, xsum, mrows, K, w, n0, nr, yout, ldy, add, bias);
      else tile_int<W_Q4>(qx, dx, xsum, mrows, K, w, n0, nr, yout, ldy, add, bias);
    }
#pragma omp barrier
  }
  free(buf), free(qx), free(dx), free(xsum);
  return 0;
}

// Rotary embedding in place on the first `heads` heads of each row of x (M, ld):
// x1, x2 = halves of a head; x <- (x1 cos - x2 sin, x2 cos + x1 sin), cos/sin (M, D).
void soft_rope(float* x, int M, int ld, int heads, int D, const float* cos, const float* sin,
               int threads) {
  const int h = D / 2;
#pragma omp parallel for num_threads(threads) schedule(static) if (M * heads > 64)
  for (int m = 0; m < M; m++) {
    const float* c = cos + (size_t)m * D;
    const float* s = sin + (size_t)m * D;
    for (int hd = 0; hd < heads; hd++) {
      float* v = x + (size_t)m * ld + (size_t)hd * D;
      for (int i = 0; i < h; i++) {
        const float a = v[i], b = v[i + h];
        v[i] = a * c[i] - b * s[i];
        v[i + h] = b * c[i + h] + a * s[i + h];
      }
    }
  }
}

// Decode attention over a paged KV cache, one new token per row: row r writes its key
// and value (k, v: (n, hkv, d) at row strides ldk / ldv) into cache block write_block[r]
// at offset write_offset[r], then attends over its tokens 0 .. length[r] - 1, which sit in
// blocks table[r * max_blocks + s / block_size] of the cache ((blocks, block_size, hkv, d)
// fp32). Grouped queries: q head h reads kv head h / (hq / hkv). out: (n, hq, d).
void soft_attend_decode(const float* q, int ldq, const float* k, int ldk, const float* v, int ldv, int n,
                        int hq, int hkv, int d, float* cache_k, float* cache_v, int block_size,
                        const int64_t* table, int max_blocks, const int64_t* write_block,
                        const int64_t* write_offset, const int64_t* length, float scale,
                        float* out, int threads) {
  const int rep = hq / hkv;
#pragma omp parallel num_threads(threads)
  {
    float* scores = nullptr;
    size_t cap = 0;
#pragma omp for schedule(dynamic)
    for (int task = 0; task < n * hkv; task++) {
      const int r = task / hkv, g = task % hkv;
      const size_t slot = ((size_t)write_block[r] * block_size + write_offset[r]) * hkv + g;
      memcpy(cache_k + slot * d, k + (size_t)r * ldk + (size_t)g * d, sizeof(float) * d);
      memcpy(cache_v + slot * d, v + (size_t)r * ldv + (size_t)g * d, sizeof(float) * d);
      const int L = (int)length[r];
      if ((size_t)L * rep > cap) {
        free(scores);
        cap = (size_t)L * rep;
        scores = static_cast<float*>(malloc(sizeof(float) * cap));
      }
      const float* qr = q + (size_t)r * ldq + (size_t)g * rep * d;
      const int64_t* tab = table + (size_t)r * max_blocks;
      float best[64];
      for (int j = 0; j < rep; j++) best[j] = -INFINITY;
      for (int t = 0; t < L; t++) {
        const float* kp = cache_k + (((size_t)tab[t / block_size] * block_size + t % block_size) * hkv + g) * d;
        for (int j = 0; j < rep; j++) {
          __m256 acc = _mm256_setzero_ps();
          for (int e = 0; e < d; e += 8)
            acc = _mm256_fmadd_ps(_mm256_loadu_ps(qr + j * d + e), _mm256_loadu_ps(kp + e), acc);
          const float sc = hsum(acc) * scale;
          scores[(size_t)j * L + t] = sc;
          best[j] = fmaxf(best[j], sc);
        }
      }
      for (int j = 0; j < rep; j++) {
        float total = 0.f;
        float* sj = scores + (size_t)j * L;
        for (int t = 0; t < L; t++) total += (sj[t] = expf(sj[t] - best[j]));
        const float inv = 1.f / total;
        for (int t = 0; t < L; t++) sj[t] *= inv;
      }
      float* o = out + ((size_t)r * hq + (size_t)g * rep) * d;
      for (int j = 0; j < rep; j++)
        for (int e = 0; e < d; e++) o[j * d + e] = 0.f;
      for (int t = 0; t < L; t++) {
        const float* vp = cache_v + (((size_t)tab[t / block_size] * block_size + t % block_size) * hkv + g) * d;
        for (int j = 0; j < rep; j++) {
          const __m256 p = _mm256_set1_ps(scores[(size_t)j * L + t]);
          for (int e = 0; e < d; e += 8)
            _mm256_storeu_ps(o + j * d + e, _mm256_fmadd_ps(p, _mm256_loadu_ps(vp + e),
                                                            _mm256_loadu_ps(o + j * d + e)));
        }
      }
    }
    free(scores);
  }
}

// One decoder layer for n rows of one new token each, in place on the residual stream
// h (n, hidden): RMSNorm -> q|k|v (+ bias) -> rotary on q, k -> decode attention over the
// paged cache -> o-projection added to h -> RMSNorm -> gate|up -> SwiGLU -> down added
// to h. The same arithmetic as the calls above one by one (the model's fallback path),
// without a return to Python between them. Returns 0 or soft_linear's error.
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
  float* k;  // (blocks, block_size, kv_heads, head_dim)
  float* v;
  int32_t block_size, max_blocks;
  const int64_t* table;  // (n, max_blocks) block ids of each row at this layer
  const int64_t* write_block;
  const int64_t* write_offset;
  const int64_t* length;
  float scale;
};

int soft_decode_layer(float* h, int n, const Layer* L, const float* cos, const float* sin,
                      const Paged* P, int threads) {
  const int hidden = L->o->n, d = L->head_dim;
  const int nq = L->heads * d, nkv = L->kv_heads * d, nqkv = L->qkv->n;
  const int inter = L->down->k;
  float* qkv = static_cast<float*>(malloc(sizeof(float) * (size_t)n * nqkv));
  float* att = static_cast<float*>(malloc(sizeof(float) * (size_t)n * nq));
  float* gu = static_cast<float*>(malloc(sizeof(float) * (size_t)n * 2 * inter));
  int rc = -2;
  if (qkv && att && gu) {
    rc = soft_linear(h, n, hidden, L->qkv, L->qkv_bias, qkv, nqkv, 1, L->input_norm, L->eps, 0, threads);
    if (rc == 0) {
      soft_rope(qkv, n, nqkv, L->heads + L->kv_heads, d, cos, sin, threads);
      soft_attend_decode(qkv, nqkv, qkv + nq, nqkv, qkv + nq + nkv, nqkv, n, L->heads,
                         L->kv_heads, d, P->k, P->v, P->block_size, P->table, P->max_blocks,
                         P->write_block, P->write_offset, P->length, P->scale, att, threads);
      rc = soft_linear(att, n, nq, L->o, nullptr, h, hidden, 0, nullptr, 0.f, 1, threads);
    }
    if (rc == 0)
      rc = soft_linear(h, n, hidden, L->gate_up, nullptr, gu, 2 * inter, 1, L->post_norm, L->eps, 0, threads);
    if (rc == 0)
      rc = soft_linear(gu, n, 2 * inter, L->down, nullptr, h, hidden, 2, nullptr, 0.f, 1, threads);
  }
  free(qkv), free(att), free(gu);
  return rc;
}

}  // extern "C"
