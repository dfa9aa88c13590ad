/* Matrix-vector products for decode steps on CPU, built by idefics2.modeling.ckernels with this machine's C
 * compiler (-O3 -march=native -fopenmp) and raced against torch's kernels by idefics2.modeling.kernels.
 *
 * A decode step multiplies a few activation rows by every weight matrix once, so its speed is the rate at
 * which the weights stream from memory. Each thread takes blocks of weight rows and reads every row once
 * for all activation rows, widening the weights to float32 in registers (bfloat16: a 16-bit shift, int8: a
 * sign extension and a conversion) or, with AVX512-BF16 and bfloat16 activations, multiplying bfloat16
 * pairs directly. Sums are float32; int8 rows are scaled by their float32 scale after the sum.
 *
 * Layouts: activations x (M, K) and outputs y (M, N) row-major in float32 or bfloat16 (io_type); weights
 * (N, K) row-major in float32, bfloat16 or int8 (w_type); scales (N) float32 or NULL; bias (N) in io_type
 * or NULL. The gated product is y = act(x @ gate^T) * (x @ up^T), the gated MLP's first half.
 */
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h> /* the vector paths below; other CPUs build the plain C ones */
#endif
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

enum { TYPE_F32 = 0, TYPE_BF16 = 1, TYPE_I8 = 2 };
enum { ACT_NONE = 0, ACT_SILU = 1 };
#define MAX_WROWS 8 /* weight rows summed together (4 of a plain product, 4 gate + 4 up of a gated one) */
#define MAX_XROWS 4 /* activation rows summed together */
#define MAX_PARTS 3 /* products sharing their activations in one pass (a layer's q, k and v) */
#define MAX_HEAD_VECTORS 16 /* an attention head of up to this many vectors is held in registers */
#define PREFETCH_ROWS 8 /* weight rows fetched this far ahead into L2 (into L1 runs slower: its misses stall) */
#define CACHE_AHEAD_BYTES 8192 /* attention fetches the cache rows this far ahead of the row it reads into L2 */
#define FETCH_L2(p) __builtin_prefetch((p), 0, 2) /* a line into L2 (x86: prefetcht1), on any CPU */

static inline float bf16_to_f32(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even, NaN kept quiet */
    uint32_t bits;
    memcpy(&bits, &f, 4);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x40);
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return (uint16_t)(bits >> 16);
}

static inline float weight_at(const void *row, int64_t k, int type) {
    if (type == TYPE_F32) return ((const float *)row)[k];
    if (type == TYPE_BF16) return bf16_to_f32(((const uint16_t *)row)[k]);
    return (float)((const int8_t *)row)[k];
}

static inline int64_t type_size(int type) { return type == TYPE_F32 ? 4 : type == TYPE_BF16 ? 2 : 1; }
static inline const void *element(const void *p, int64_t i, int type) {
    return (const char *)p + i * type_size(type);
}

static inline const void *weight_row(const void *w, int64_t n, int64_t K, int type) { return element(w, n * K, type); }

#if defined(__AVX512F__)
#define LANES 16
typedef __m512 vec;
static inline vec vzero(void) { return _mm512_setzero_ps(); }
static inline vec vload(const float *p) { return _mm512_loadu_ps(p); }
static inline vec vfma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
static inline float vsum(vec v) { return _mm512_reduce_add_ps(v); }
static inline void vstore(float *p, vec v) { _mm512_storeu_ps(p, v); }
static inline vec vset(float f) { return _mm512_set1_ps(f); }
static inline vec wload(const void *row, int64_t k, int type) {
    if (type == TYPE_F32) return _mm512_loadu_ps((const float *)row + k);
    if (type == TYPE_BF16) {
        __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)row + k));
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    __m128i b = _mm_loadu_si128((const __m128i *)((const int8_t *)row + k));
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b));
}
#elif defined(__AVX2__) && defined(__FMA__)
#define LANES 8
typedef __m256 vec;
static inline vec vzero(void) { return _mm256_setzero_ps(); }
static inline vec vload(const float *p) { return _mm256_loadu_ps(p); }
static inline vec vfma(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
static inline void vstore(float *p, vec v) { _mm256_storeu_ps(p, v); }
static inline vec vset(float f) { return _mm256_set1_ps(f); }
static inline float vsum(vec v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
static inline vec wload(const void *row, int64_t k, int type) {
    if (type == TYPE_F32) return _mm256_loadu_ps((const float *)row + k);
    if (type == TYPE_BF16) {
        __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)row + k));
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    }
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)((const int8_t *)row + k))));
}
#else
#define LANES 1
typedef float vec;
static inline vec vzero(void) { return 0.0f; }
static inline vec vload(const float *p) { return *p; }
static inline vec vfma(vec a, vec b, vec c) { return a * b + c; }
static inline float vsum(vec v) { return v; }
static inline void vstore(float *p, vec v) { *p = v; }
static inline vec vset(float f) { return f; }
static inline vec wload(const void *row, int64_t k, int type) { return weight_at(row, k, type); }
#endif

/* The columns of x . row that `dots` sums lane by lane: whole vectors of the path taken (32 bfloat16 pairs
   with bfloat16 activations on AVX512-BF16, LANES floats otherwise); the rest are added one by one. */
static inline int64_t whole_columns(const uint16_t *xh, int64_t K) {
    return xh != NULL ? K / 32 * 32 : K / LANES * LANES;
}

/* x[m] . rows[r] over columns [k0, k1) (whole_columns' steps) added lane by lane to acc_io[r][m] (NULL: to
   zeros); then, with sums, the lanes summed and the columns past whole_columns added into sums[r][m], else
   the lanes kept in acc_io. x as float32 rows (xf), or bfloat16 rows (xh, AVX512-BF16 only), K columns */
static inline __attribute__((always_inline)) void dots(const float *xf, const uint16_t *xh,
                                                       const void *const *rows, int nr, int mr, int64_t K,
                                                       int64_t k0, int64_t k1, int type,
                                                       vec acc_io[MAX_WROWS][MAX_XROWS],
                                                       float sums[MAX_WROWS][MAX_XROWS]) {
    /* later rows (each row's PREFETCH_ROWS on, two blocks of 4) are fetched while these are summed:
       short rows end before the hardware prefetcher, which stops at page ends, has caught up with a new one */
    const int64_t size = type_size(type), ahead = PREFETCH_ROWS * K * size;
    vec acc[MAX_WROWS][MAX_XROWS];
    for (int r = 0; r < nr; r++)
        for (int m = 0; m < mr; m++) acc[r][m] = acc_io != NULL ? acc_io[r][m] : vzero();
#if defined(__AVX512BF16__)
    if (xh != NULL) { /* type == TYPE_BF16: bfloat16 pairs multiplied and summed in float32 */
        for (int64_t k = k0; k < k1; k += 32) {
            __m512bh xv[MAX_XROWS];
            for (int m = 0; m < mr; m++) xv[m] = (__m512bh)_mm512_loadu_si512(xh + m * K + k);
            for (int r = 0; r < nr; r++) FETCH_L2((const char *)rows[r] + ahead + 2 * k);
            for (int r = 0; r < nr; r++) {
                __m512bh wv = (__m512bh)_mm512_loadu_si512((const uint16_t *)rows[r] + k);
                for (int m = 0; m < mr; m++) acc[r][m] = _mm512_dpbf16_ps(acc[r][m], wv, xv[m]);
            }
        }
    } else
#endif
        for (int64_t k = k0; k < k1; k += LANES) {
            vec xv[MAX_XROWS];
            for (int m = 0; m < mr; m++) xv[m] = vload(xf + m * K + k);
            if ((k * size) % 64 < LANES * size)
                for (int r = 0; r < nr; r++) FETCH_L2((const char *)rows[r] + ahead + k * size);
            for (int r = 0; r < nr; r++) {
                vec wv = wload(rows[r], k, type);
                for (int m = 0; m < mr; m++) acc[r][m] = vfma(xv[m], wv, acc[r][m]);
            }
        }
    if (sums == NULL) {
        for (int r = 0; r < nr; r++)
            for (int m = 0; m < mr; m++) acc_io[r][m] = acc[r][m];
        return;
    }
    const int64_t whole = whole_columns(xh, K);
    for (int r = 0; r < nr; r++)
        for (int m = 0; m < mr; m++) {
            float s = vsum(acc[r][m]);
            if (xh != NULL)
                for (int64_t j = whole; j < K; j++) s += bf16_to_f32(xh[m * K + j]) * weight_at(rows[r], j, type);
            else
                for (int64_t j = whole; j < K; j++) s += xf[m * K + j] * weight_at(rows[r], j, type);
            sums[r][m] = s;
        }
}

/* the shapes of `dots` used, each compiled with its loops unrolled */
#define DOTS(NR, MR) dots(xf, xh, rows, NR, MR, K, k0, k1, type, acc, sums)
static void dots_any(const float *xf, const uint16_t *xh, const void *const *rows, int nr, int mr, int64_t K,
                     int64_t k0, int64_t k1, int type, vec acc[MAX_WROWS][MAX_XROWS],
                     float sums[MAX_WROWS][MAX_XROWS]) {
    if (nr == 8 && mr == 1) DOTS(8, 1);
    else if (nr == 8) DOTS(8, 2);
    else if (nr == 4 && mr == 1) DOTS(4, 1);
    else if (nr == 4 && mr == 2) DOTS(4, 2);
    else if (nr == 4 && mr == 3) DOTS(4, 3);
    else if (nr == 4) DOTS(4, 4);
    else if (nr == 2 && mr == 1) DOTS(2, 1);
    else if (nr == 2) DOTS(2, 2);
    else if (mr == 1) DOTS(1, 1);
    else if (mr == 2) DOTS(1, 2);
    else if (mr == 3) DOTS(1, 3);
    else DOTS(1, 4);
}

static inline float activate(float v, int act) { return act == ACT_SILU ? v / (1.0f + expf(-v)) : v; }

static inline float read_io(const void *p, int64_t i, int io_type) {
    return io_type == TYPE_F32 ? ((const float *)p)[i] : bf16_to_f32(((const uint16_t *)p)[i]);
}

static inline void write_io(void *p, int64_t i, float v, int io_type) {
    if (io_type == TYPE_F32) ((float *)p)[i] = v;
    else ((uint16_t *)p)[i] = f32_to_bf16(v);
}

/* rows [n0, n0 + count) of the output for activation rows [m0, m0 + mr), mr <= CHUNKED_XROWS, in passes of
   MAX_XROWS activation rows (2 for a gated block, which sums 8 weight rows). With several passes the columns
   go in chunks of CHUNK_BYTES of each weight row, every pass over a chunk before the next chunk, so that the
   passes after the first read the chunk from L1 instead of whole rows from L2 (four float32 rows of 4,096
   columns and four activation rows overflow L1); each sum adds the same terms in the same order. */
#define CHUNKED_XROWS 8
#define CHUNK_BYTES 2048
#define MAX_PASSES (CHUNKED_XROWS / 2)
/* sums[p] for each pass p of activation rows over several passes: the columns in chunks, the last ending each
   pass's sums (kept apart from product_rows: a single pass needs none of these lanes on its stack) */
static void chunked_sums(const float *xf, const uint16_t *xh, const void *const *rows, int nr, int mr,
                         int per_pass, int64_t K, int w_type, float sums[MAX_PASSES][MAX_WROWS][MAX_XROWS]) {
    const int passes = (mr + per_pass - 1) / per_pass;
    const int64_t whole = whole_columns(xh, K);
    const int64_t chunk = CHUNK_BYTES / type_size(w_type);
    const int64_t last = whole > chunk ? (whole - 1) / chunk * chunk : 0; /* the last chunk's start */
    vec acc[MAX_PASSES][MAX_WROWS][MAX_XROWS]; /* [pass][r][m]: the lanes kept between chunks */
    for (int p = 0; p < passes; p++)
        for (int r = 0; r < nr; r++)
            for (int m = 0; m < MAX_XROWS; m++) acc[p][r][m] = vzero();
    for (int64_t k0 = 0; k0 <= last; k0 += chunk)
        for (int p = 0; p < passes; p++) {
            const int64_t m = (int64_t)p * per_pass;
            const int step = mr - m < per_pass ? (int)(mr - m) : per_pass;
            dots_any(xf ? xf + m * K : NULL, xh ? xh + m * K : NULL, rows, nr, step, K, k0,
                     k0 < last ? k0 + chunk : whole, w_type, acc[p], k0 < last ? NULL : sums[p]);
        }
}

static void product_rows(const float *xf, const uint16_t *xh, const void *w, const float *scales,
                         const void *w2, const float *scales2, const void *bias, void *y, int64_t m0, int mr,
                         int64_t n0, int count, int64_t N, int64_t K, int io_type, int w_type, int act) {
    const void *rows[MAX_WROWS];
    for (int r = 0; r < count; r++) {
        rows[r] = weight_row(w, n0 + r, K, w_type);
        if (w2 != NULL) rows[count + r] = weight_row(w2, n0 + r, K, w_type);
    }
    const int per_pass = w2 != NULL ? 2 : MAX_XROWS, passes = (mr + per_pass - 1) / per_pass;
    const int nr = w2 != NULL ? 2 * count : count;
    float sums[MAX_PASSES][MAX_WROWS][MAX_XROWS];
    if (passes == 1) dots_any(xf, xh, rows, nr, mr, K, 0, whole_columns(xh, K), w_type, NULL, sums[0]);
    else chunked_sums(xf, xh, rows, nr, mr, per_pass, K, w_type, sums);
    for (int p = 0; p < passes; p++) {
        const int64_t m = (int64_t)p * per_pass;
        const int step = mr - m < per_pass ? (int)(mr - m) : per_pass;
        for (int r = 0; r < count; r++)
            for (int j = 0; j < step; j++) {
                int64_t n = n0 + r;
                float v = sums[p][r][j];
                if (scales != NULL) v *= scales[n];
                if (bias != NULL) v += read_io(bias, n, io_type);
                v = activate(v, act);
                if (w2 != NULL) v *= scales2 != NULL ? sums[p][count + r][j] * scales2[n] : sums[p][count + r][j];
                write_io(y, (m0 + m + j) * N + n, v, io_type);
            }
    }
}

/* One of several products that share their activations x (M, K): y (M, N) = act(x w^T * scales + bias), or
   for a gated pair act(x w^T * scales) * (x w2^T * scales2); scales NULL for float weights, bias NULL for
   none. Several such parts (a layer's q, k and v) run in one pass of the threads, x prepared once. */
typedef struct {
    const void *w, *w2;
    const float *scales, *scales2;
    const void *bias;
    void *y;
    int64_t N;
} product_part;

/* ---- int8 weights against 16-bit activations: integer multiply-adds -------------------------------------
   Widening every int8 weight to float costs three instructions per vector; multiplying 16-bit integers costs
   one (VNNI's vpdpwssd, or vpmaddwd + vpaddd) per two vectors' worth. Each activation row is quantized to
   16 bits per block of QBLOCK columns (its own scale: max |x| / 32767, so an outlier costs precision in its
   block only, at most 2^-16 of the block's largest value); a block's integer sums (at most QBLOCK / 2 pairs
   of 32767 x 127 each: no overflow) are scaled to float32 and summed. Columns past the last whole vector
   are summed in float32. */
#define QBLOCK 256
#if defined(__AVX512BW__)
#define INT16_DOTS 1
#define QLANES 32 /* int16 activations per step */
static inline __m512i xload(const int16_t *x) { return _mm512_loadu_si512(x); }
static inline __m512i widen(const int8_t *w) { return _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)w)); }
static inline __m512i madd_step(__m512i acc, __m512i wide, __m512i xv) {
#if defined(__AVX512VNNI__)
    return _mm512_dpwssd_epi32(acc, wide, xv);
#else
    return _mm512_add_epi32(acc, _mm512_madd_epi16(wide, xv));
#endif
}
static inline vec int_to_vec(__m512i v) { return _mm512_cvtepi32_ps(v); }
typedef __m512i ivec;
static inline ivec izero(void) { return _mm512_setzero_si512(); }
#elif defined(__AVX2__) && defined(__FMA__)
#define INT16_DOTS 1
#define QLANES 16
static inline __m256i xload(const int16_t *x) { return _mm256_loadu_si256((const __m256i *)x); }
static inline __m256i widen(const int8_t *w) { return _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)w)); }
static inline __m256i madd_step(__m256i acc, __m256i wide, __m256i xv) {
#if defined(__AVXVNNI__)
    return _mm256_dpwssd_avx_epi32(acc, wide, xv);
#else
    return _mm256_add_epi32(acc, _mm256_madd_epi16(wide, xv));
#endif
}
static inline vec int_to_vec(__m256i v) { return _mm256_cvtepi32_ps(v); }
typedef __m256i ivec;
static inline ivec izero(void) { return _mm256_setzero_si256(); }
#endif

#if defined(INT16_DOTS)
/* x16 (K) and block scales xs (K / QBLOCK rounded up) of one float32 row */
static void quantize_row(const float *x, int64_t K, int16_t *x16, float *xs) {
    for (int64_t b0 = 0; b0 < K; b0 += QBLOCK) {
        const int64_t b1 = b0 + QBLOCK < K ? b0 + QBLOCK : K;
        float largest = 0.0f;
#pragma omp simd reduction(max : largest)
        for (int64_t k = b0; k < b1; k++) largest = fabsf(x[k]) > largest ? fabsf(x[k]) : largest;
        const float step = largest > 0.0f ? largest / 32767.0f : 1.0f;
        xs[b0 / QBLOCK] = step;
#pragma omp simd
        for (int64_t k = b0; k < b1; k++) x16[k] = (int16_t)lrintf(x[k] / step);
    }
}

#define INT8_ROWS 4 /* int8 rows summed together, the activations loaded once for all */
#define INT8_XROWS 2 /* activation rows summed together, each weight vector widened once for all */
/* out[mm * INT8_ROWS + r] = activation row mm . rows[r] for MR activation rows (float xf, quantized x16 with
   block scales xs, rows `blocks` scales apart) and R int8 rows: the whole vectors from the quantized rows, the
   rest from the float ones; fetch: the rows 8 on are fetched into L2 meanwhile */
static inline __attribute__((always_inline)) void int8_dots(const float *xf, const int16_t *x16, const float *xs,
                                                            int64_t blocks, int MR, const int8_t *const *rows,
                                                            int R, int64_t K, int fetch, float *out) {
    const int64_t whole = K / QLANES * QLANES;
    vec total[INT8_XROWS][INT8_ROWS];
    for (int mm = 0; mm < MR; mm++)
        for (int r = 0; r < R; r++) total[mm][r] = vzero();
    for (int64_t b0 = 0; b0 < whole; b0 += QBLOCK) {
        const int64_t b1 = b0 + QBLOCK < whole ? b0 + QBLOCK : whole;
        ivec acc[INT8_XROWS][INT8_ROWS];
        for (int mm = 0; mm < MR; mm++)
            for (int r = 0; r < R; r++) acc[mm][r] = izero();
        for (int64_t k = b0; k < b1; k += QLANES) {
            ivec xv[INT8_XROWS];
            for (int mm = 0; mm < MR; mm++) xv[mm] = xload(x16 + mm * K + k);
            if (fetch && k % 64 < QLANES) /* as `dots` does */
                for (int r = 0; r < R; r++) FETCH_L2((const char *)(rows[r] + PREFETCH_ROWS * K + k));
            for (int r = 0; r < R; r++) {
                const ivec wide = widen(rows[r] + k);
                for (int mm = 0; mm < MR; mm++) acc[mm][r] = madd_step(acc[mm][r], wide, xv[mm]);
            }
        }
        for (int mm = 0; mm < MR; mm++)
            for (int r = 0; r < R; r++)
                total[mm][r] = vfma(int_to_vec(acc[mm][r]), vset(xs[mm * blocks + b0 / QBLOCK]), total[mm][r]);
    }
    for (int mm = 0; mm < MR; mm++)
        for (int r = 0; r < R; r++) {
            float sum = vsum(total[mm][r]);
            for (int64_t k = whole; k < K; k++) /* fmaf: one rounding, however compiled */
                sum = fmaf(xf[mm * K + k], (float)rows[r][k], sum);
            out[mm * INT8_ROWS + r] = sum;
        }
}

static void int8_dots_any(const float *xf, const int16_t *x16, const float *xs, int64_t blocks, int MR,
                          const int8_t *const *rows, int R, int64_t K, int fetch, float *out) {
    if (R == 4 && MR == 2) int8_dots(xf, x16, xs, blocks, 2, rows, 4, K, fetch, out);
    else if (R == 4) int8_dots(xf, x16, xs, blocks, 1, rows, 4, K, fetch, out);
    else if (R == 2 && MR == 2) int8_dots(xf, x16, xs, blocks, 2, rows, 2, K, fetch, out);
    else if (R == 2) int8_dots(xf, x16, xs, blocks, 1, rows, 2, K, fetch, out);
    else
        for (int mm = 0; mm < MR; mm++)
            for (int r = 0; r < R; r++)
                int8_dots(xf + mm * K, x16 + mm * K, xs + mm * blocks, blocks, 1, rows + r, 1, K, fetch && mm == 0,
                          out + mm * INT8_ROWS + r);
}

/* `products` for int8 weights (and a gated pair of them) on the integer multiply-adds */
static int int8_products(const float *xf, const product_part *parts, int n_parts, int64_t M, int64_t K,
                         int io_type, int act, int threads) {
    const int64_t blocks = (K + QBLOCK - 1) / QBLOCK;
    int16_t *x16 = (int16_t *)malloc(sizeof(int16_t) * M * K);
    float *xs = (float *)malloc(sizeof(float) * M * blocks);
    if (x16 == NULL || xs == NULL) {
        free(x16);
        free(xs);
        return 1;
    }
    for (int64_t m = 0; m < M; m++) quantize_row(xf + m * K, K, x16 + m * K, xs + m * blocks);
#pragma omp parallel num_threads(threads)
    for (int p = 0; p < n_parts; p++) { /* every thread takes its share of each part, none waits between */
        const int8_t *w = (const int8_t *)parts[p].w, *w2 = (const int8_t *)parts[p].w2;
        const float *scales = parts[p].scales, *scales2 = parts[p].scales2;
        const int64_t N = parts[p].N, block = w2 != NULL ? INT8_ROWS / 2 : INT8_ROWS;
        const int64_t n_blocks = (N + block - 1) / block;
#pragma omp for schedule(static) nowait
        for (int64_t b = 0; b < n_blocks; b++) { /* INT8_ROWS rows at a time (gate and up: half as many of each) */
            const int64_t n0 = b * block;
            const int count = N - n0 < block ? (int)(N - n0) : (int)block, R = w2 != NULL ? 2 * count : count;
            const int8_t *rows[INT8_ROWS];
            for (int r = 0; r < count; r++) {
                rows[r] = w + (n0 + r) * K;
                if (w2 != NULL) rows[count + r] = w2 + (n0 + r) * K;
            }
            for (int64_t m = 0; m < M; m += INT8_XROWS) {
                const int mr = M - m < INT8_XROWS ? (int)(M - m) : INT8_XROWS;
                float out[INT8_XROWS * INT8_ROWS];
                int8_dots_any(xf + m * K, x16 + m * K, xs + m * blocks, blocks, mr, rows, R, K, m == 0, out);
                for (int mm = 0; mm < mr; mm++)
                    for (int r = 0; r < count; r++) {
                        const int64_t n = n0 + r;
                        float v = out[mm * INT8_ROWS + r] * scales[n];
                        if (parts[p].bias != NULL) v += read_io(parts[p].bias, n, io_type);
                        v = activate(v, act);
                        if (w2 != NULL) v *= out[mm * INT8_ROWS + count + r] * scales2[n];
                        write_io(parts[p].y, (m + mm) * N + n, v, io_type);
                    }
            }
        }
    }
    free(x16);
    free(xs);
    return 0;
}
#endif

static int products(const void *x, const product_part *parts, int n_parts, int64_t M, int64_t K, int io_type,
                    int w_type, int act, int threads) {
    const uint16_t *xh = NULL;
    float *xf = NULL;
#if defined(__AVX512BF16__)
    if (io_type == TYPE_BF16 && w_type == TYPE_BF16) xh = (const uint16_t *)x;
#endif
    if (xh == NULL) {
        if (io_type == TYPE_F32) {
            xf = (float *)x;
        } else {
            xf = (float *)malloc(sizeof(float) * M * K);
            if (xf == NULL) return 1;
            for (int64_t i = 0; i < M * K; i++) xf[i] = bf16_to_f32(((const uint16_t *)x)[i]);
        }
    }
#if defined(INT16_DOTS)
    if (w_type == TYPE_I8) {
        const int failed = int8_products(xf, parts, n_parts, M, K, io_type, act, threads);
        if (xf != (const float *)x) free(xf);
        return failed;
    }
#endif
    const int64_t block = 4;
#pragma omp parallel num_threads(threads)
    for (int p = 0; p < n_parts; p++) { /* every thread takes its share of each part, none waits between */
        const product_part *part = parts + p;
        const int64_t N = part->N, blocks = (N + block - 1) / block;
#pragma omp for schedule(static) nowait
        for (int64_t b = 0; b < blocks; b++) {
            int64_t n0 = b * block;
            int count = N - n0 < block ? (int)(N - n0) : (int)block;
            for (int64_t m0 = 0; m0 < M; m0 += CHUNKED_XROWS) {
                int mr = M - m0 < CHUNKED_XROWS ? (int)(M - m0) : CHUNKED_XROWS;
                const float *xf_rows = xf != NULL ? xf + m0 * K : NULL;
                const uint16_t *xh_rows = xh != NULL ? xh + m0 * K : NULL;
                if (count == block) {
                    product_rows(xf_rows, xh_rows, part->w, part->scales, part->w2, part->scales2, part->bias,
                                 part->y, m0, mr, n0, count, N, K, io_type, w_type, act);
                } else {
                    for (int r = 0; r < count; r++)
                        product_rows(xf_rows, xh_rows, part->w, part->scales, part->w2, part->scales2,
                                     part->bias, part->y, m0, mr, n0 + r, 1, N, K, io_type, w_type, act);
                }
            }
        }
    }
    if (xf != NULL && xf != (float *)x) free(xf);
    return 0;
}

/* one product (a gated pair where w2 is given) */
static int product(const void *x, const void *w, const float *scales, const void *w2, const float *scales2,
                   const void *bias, void *y, int64_t M, int64_t N, int64_t K, int io_type, int w_type, int act,
                   int threads) {
    const product_part part = {w, w2, scales, scales2, bias, y, N};
    return products(x, &part, 1, M, K, io_type, w_type, act, threads);
}

/* y = act(x @ w^T * scales + bias) */
int idefics2_linear(const void *x, const void *w, const float *scales, const void *bias, void *y, int64_t M,
                    int64_t N, int64_t K, int io_type, int w_type, int act, int threads) {
    return product(x, w, scales, NULL, NULL, bias, y, M, N, K, io_type, w_type, act, threads);
}

/* y = act(x @ gate^T * gate_scales) * (x @ up^T * up_scales) */
int idefics2_gated(const void *x, const void *gate, const float *gate_scales, const void *up,
                   const float *up_scales, void *y, int64_t M, int64_t N, int64_t K, int io_type, int w_type,
                   int act, int threads) {
    return product(x, gate, gate_scales, up, up_scales, NULL, y, M, N, K, io_type, w_type, act, threads);
}

/* ---- the rest of a decode step: normalization and attention over the cache ---------------------------- */

/* sum over d of x[d]^2 in float64 (exact products), in 8 partial sums: lane j adds d = j, j + 8, ... */
static double squares_of(const void *x, int64_t D, int io_type) {
    double part[8] = {0.0};
    int64_t d = 0;
    if (io_type == TYPE_F32)
        for (const float *xs = (const float *)x; d + 8 <= D; d += 8)
            for (int j = 0; j < 8; j++) part[j] += (double)xs[d + j] * (double)xs[d + j];
    else
        for (const uint16_t *xs = (const uint16_t *)x; d + 8 <= D; d += 8)
            for (int j = 0; j < 8; j++) {
                const double v = (double)bf16_to_f32(xs[d + j]);
                part[j] += v * v;
            }
    double squares = 0.0;
    for (int j = 0; j < 8; j++) squares += part[j];
    for (; d < D; d++) {
        const double v = (double)read_io(x, d, io_type);
        squares += v * v;
    }
    return squares;
}

/* y = weight * round(x / rms(x)) per row of D: the normalized row is rounded to io_type before the weight
   multiplies it, as the float path does (RMSNorm computes in float32, then casts back) */
int idefics2_rms_norm(const void *x, const void *weight, void *y, int64_t rows, int64_t D, float eps,
                      int io_type) {
    const int64_t size = io_type == TYPE_F32 ? 4 : 2;
    for (int64_t r = 0; r < rows; r++) {
        const double squares = squares_of((const char *)x + size * r * D, D, io_type);
        const float inverse = 1.0f / sqrtf((float)(squares / (double)D) + eps);
        if (io_type == TYPE_F32) {
            const float *xs = (const float *)x + r * D, *ws = (const float *)weight;
            float *ys = (float *)y + r * D;
            for (int64_t d = 0; d < D; d++) ys[d] = ws[d] * (xs[d] * inverse);
            continue;
        }
        for (int64_t d = 0; d < D; d++) {
            const float normed = bf16_to_f32(f32_to_bf16(read_io(x, r * D + d, io_type) * inverse));
            write_io(y, r * D + d, read_io(weight, d, io_type) * normed, io_type);
        }
    }
    return 0;
}

/* x . row over D (x float32, row in io_type) */
static inline float dot_row(const float *x, const void *row, int64_t D, int io_type) {
    vec acc = vzero();
    int64_t d = 0;
    for (; d + LANES <= D; d += LANES) acc = vfma(vload(x + d), wload(row, d, io_type), acc);
    float total = vsum(acc);
    for (; d < D; d++) total += x[d] * weight_at(row, d, io_type);
    return total;
}

/* sums += p * row over D */
static inline void add_row(float *sums, float p, const void *row, int64_t D, int io_type) {
    const vec scale = vset(p);
    int64_t d = 0;
    for (; d + LANES <= D; d += LANES) vstore(sums + d, vfma(scale, wload(row, d, io_type), vload(sums + d)));
    for (; d < D; d++) sums[d] += p * weight_at(row, d, io_type);
}

/* e^x for a softmax's x <= 0: 2^n * e^r with n = round(x / ln 2), |r| <= ln(2) / 2, e^r by its Taylor series to
   r^7 (relative error below 2e-7); 0 below -87 (e^-87 is the smallest normal float). Branch-free, so loops of it
   vectorize. */
static inline float softmax_exp(float x) {
    const float shifter = 12582912.0f; /* 1.5 * 2^23: adding it rounds to an integer held in the low bits */
    x = x < -87.0f ? -87.0f : x;
    float t = x * 1.44269504f + shifter;
    float n = t - shifter;
    float r = x - n * 0.693145752f - n * 1.42860677e-6f; /* ln 2 in two parts: r exact to float rounding */
    float p = 1.0f + r * (1.0f + r * (0.5f + r * (1.0f / 6 + r * (1.0f / 24 + r * (1.0f / 120 + r * (1.0f / 720 + r * (1.0f / 5040)))))));
    int32_t bits;
    memcpy(&bits, &t, 4);
    bits = (bits - 0x4B400000 + 127) << 23; /* n + 127 in the exponent field */
    float power;
    memcpy(&power, &bits, 4);
    return x <= -87.0f ? 0.0f : p * power;
}

#if defined(__AVX512F__)
/* the sums of a, b, c and d's lanes, in that order */
static inline __m128 sum4(__m512 a, __m512 b, __m512 c, __m512 d) {
    /* per 128-bit lane: [a0 + a2, b0 + b2, a1 + a3, b1 + b3] and the same of c, d */
    const __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
    const __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
    /* per 128-bit lane: [a, b, c, d] over its four columns; then the four lanes added */
    const __m512d abd = _mm512_castps_pd(ab), cdd = _mm512_castps_pd(cd);
    const __m512 abcd = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(abd, cdd)),
                                      _mm512_castpd_ps(_mm512_unpackhi_pd(abd, cdd)));
    const __m256 half = _mm256_add_ps(_mm512_castps512_ps256(abcd),
                                      _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(abcd), 1)));
    return _mm_add_ps(_mm256_castps256_ps128(half), _mm256_extractf128_ps(half, 1));
}
#endif

/* cache row `ahead` rows past row s of one head into L2, where rows below S are read: a head's rows cross
   a page every few rows, and the hardware prefetcher stops at each page's end (measured on an Intel Xeon,
   "mid" shapes: a decode step's attention over 392 slots 1.5x faster; inlined, or the call costs what it
   saves) */
static inline __attribute__((always_inline)) void prefetch_cache_row(const void *base, int64_t first, int64_t s,
                                                                    int64_t ahead, int64_t S, int64_t stride,
                                                                    int64_t row_bytes, int io_type) {
    if (s + ahead >= S) return;
    const char *row = (const char *)element(base, first + (s + ahead) * stride, io_type);
    for (int64_t c = 0; c < row_bytes; c += 64) FETCH_L2(row + c);
}

/* one work item of idefics2_attention: the H / Hkv query heads of kv head `kv` of batch row b; D is a constant
   where the caller knows it (the head sizes models use), and so is io_type, so the row loops unroll */
static inline __attribute__((always_inline)) void attend(const void *q, const void *k, const void *v,
                                                        const uint8_t *mask, void *out, int64_t b, int64_t kv,
                                                        int64_t H, int64_t group, int64_t T, int64_t S,
                                                        const int64_t D, int64_t k_batch, int64_t k_head,
                                                        int64_t k_key, int64_t v_batch, int64_t v_head,
                                                        int64_t v_key, float scale, const int io_type, float *scores,
                                                        float *rows, float *sums) {
    const int64_t queries = group * T;
    const int64_t k0 = b * k_batch + kv * k_head, v0 = b * v_batch + kv * v_head;
    const int64_t row_bytes = D * (io_type == TYPE_F32 ? 4 : 2);
    const int64_t ahead = (CACHE_AHEAD_BYTES + row_bytes - 1) / row_bytes; /* rows */
    for (int64_t i = 0; i < queries * D; i++) /* heads kv * group + g, all T queries */
        rows[i] = read_io(q, (b * H + kv * group) * T * D + i, io_type);
    const int in_registers = D % LANES == 0 && D / LANES <= MAX_HEAD_VECTORS;
    /* keys are read only over [lo, hi), the slots that some query of the item may attend to: a row shorter
       than the batch's longest, or past its sliding window, reads only its own slots; the other scores are
       the masked ones' anyway (where nothing at all is allowed, every slot is read, as before) */
    int64_t lo = S, hi = 0;
    for (int64_t t = 0; t < T; t++) {
        const uint8_t *allowed = mask + (b * T + t) * S;
        int64_t start = 0, end = S;
        while (start < S && !allowed[start]) start++;
        while (end > start && !allowed[end - 1]) end--;
        if (start < end && start < lo) lo = start;
        if (start < end && end > hi) hi = end;
    }
    if (lo >= hi) lo = 0, hi = S;
    for (int64_t i = 0; i < queries; i++) {
        for (int64_t s = 0; s < lo; s++) scores[i * S + s] = -FLT_MAX;
        for (int64_t s = hi; s < S; s++) scores[i * S + s] = -FLT_MAX;
    }
    int64_t first = 0; /* queries before it are scored */
#if defined(__AVX512F__)
    for (; first + 4 <= queries && in_registers; first += 4) { /* four queries per key read, summed together */
        const uint8_t *allowed[4];
        for (int j = 0; j < 4; j++) allowed[j] = mask + (b * T + (first + j) % T) * S;
        const float *query = rows + first * D;
        for (int64_t s = lo; s < hi; s++) {
            const void *key = element(k, k0 + s * k_key, io_type);
            prefetch_cache_row(k, k0, s, ahead, hi, k_key, row_bytes, io_type);
            vec acc[4] = {vzero(), vzero(), vzero(), vzero()};
            for (int64_t c = 0; c < D / LANES; c++) {
                const vec kv = wload(key, c * LANES, io_type);
                for (int j = 0; j < 4; j++) acc[j] = vfma(vload(query + j * D + c * LANES), kv, acc[j]);
            }
            float sums[4];
            _mm_storeu_ps(sums, sum4(acc[0], acc[1], acc[2], acc[3]));
            for (int j = 0; j < 4; j++) scores[(first + j) * S + s] = allowed[j][s] ? sums[j] * scale : -FLT_MAX;
        }
    }
#endif
    for (int64_t i = first; i < queries && in_registers; i++) { /* the query row held in registers */
        vec query[MAX_HEAD_VECTORS];
        for (int64_t c = 0; c < D / LANES; c++) query[c] = vload(rows + i * D + c * LANES);
        const uint8_t *allowed = mask + (b * T + i % T) * S;
        for (int64_t s = lo; s < hi; s++) {
            const void *key = element(k, k0 + s * k_key, io_type);
            prefetch_cache_row(k, k0, s, ahead, hi, k_key, row_bytes, io_type);
            vec acc = vzero();
            for (int64_t c = 0; c < D / LANES; c++) acc = vfma(query[c], wload(key, c * LANES, io_type), acc);
            scores[i * S + s] = allowed[s] ? vsum(acc) * scale : -FLT_MAX;
        }
    }
    for (int64_t s = lo; s < hi && !in_registers; s++) {
        const void *key = element(k, k0 + s * k_key, io_type);
        for (int64_t i = 0; i < queries; i++)
            scores[i * S + s] = mask[(b * T + i % T) * S + s]
                                    ? dot_row(rows + i * D, key, D, io_type) * scale
                                    : -FLT_MAX;
    }
    for (int64_t i = 0; i < queries; i++) { /* the loops vectorize: simd reductions, a branch-free exp */
        float *row = scores + i * S, highest = -FLT_MAX, total = 0.0f;
#pragma omp simd reduction(max : highest)
        for (int64_t s = 0; s < S; s++) highest = row[s] > highest ? row[s] : highest;
        if (highest == -FLT_MAX) { /* nothing allowed: every score equal */
            for (int64_t s = 0; s < S; s++) row[s] = 1.0f;
        } else {
#pragma omp simd
            for (int64_t s = 0; s < S; s++) row[s] = softmax_exp(row[s] - highest);
        }
#pragma omp simd reduction(+ : total)
        for (int64_t s = 0; s < S; s++) total += row[s];
#pragma omp simd
        for (int64_t s = 0; s < S; s++) row[s] /= total;
    }
    first = 0; /* queries before it are summed */
#if defined(__AVX512F__)
    /* QB queries per value row read (as many as 16 accumulators hold): each accumulator takes one multiply-add
       per key, so the queries' chains run side by side instead of one after the other */
    const int64_t QB = D / LANES <= 4 ? 4 : 2;
    for (; first + QB <= queries && in_registers && D / LANES <= 8; first += QB) {
        vec acc[4][8];
        for (int64_t j = 0; j < QB; j++)
            for (int64_t c = 0; c < D / LANES; c++) acc[j][c] = vzero();
        for (int64_t s = 0; s < S; s++) {
            int attended = 0; /* a slot no query attends to is not read (it may hold anything) */
            for (int64_t j = 0; j < QB; j++) attended |= scores[(first + j) * S + s] != 0.0f;
            if (!attended) continue;
            const void *value = element(v, v0 + s * v_key, io_type);
            prefetch_cache_row(v, v0, s, ahead, hi, v_key, row_bytes, io_type);
            vec row[8];
            for (int64_t c = 0; c < D / LANES; c++) row[c] = wload(value, c * LANES, io_type);
            for (int64_t j = 0; j < QB; j++) {
                const vec weight = vset(scores[(first + j) * S + s]);
                for (int64_t c = 0; c < D / LANES; c++) acc[j][c] = vfma(weight, row[c], acc[j][c]);
            }
        }
        for (int64_t j = 0; j < QB; j++)
            for (int64_t c = 0; c < D / LANES; c++) vstore(sums + (first + j) * D + c * LANES, acc[j][c]);
    }
#endif
    for (int64_t i = first; i < queries && in_registers; i++) { /* the output row held in registers */
        vec acc[MAX_HEAD_VECTORS];
        for (int64_t c = 0; c < D / LANES; c++) acc[c] = vzero();
        for (int64_t s = 0; s < S; s++) {
            const float p = scores[i * S + s];
            if (p == 0.0f) continue;
            const void *value = element(v, v0 + s * v_key, io_type);
            prefetch_cache_row(v, v0, s, ahead, hi, v_key, row_bytes, io_type);
            const vec weight = vset(p);
            for (int64_t c = 0; c < D / LANES; c++) acc[c] = vfma(weight, wload(value, c * LANES, io_type), acc[c]);
        }
        for (int64_t c = 0; c < D / LANES; c++) vstore(sums + i * D + c * LANES, acc[c]);
    }
    for (int64_t i = 0; i < queries * D && !in_registers; i++) sums[i] = 0.0f;
    for (int64_t s = 0; s < S && !in_registers; s++) {
        const void *value = element(v, v0 + s * v_key, io_type);
        for (int64_t i = 0; i < queries; i++)
            if (scores[i * S + s] != 0.0f) add_row(sums + i * D, scores[i * S + s], value, D, io_type);
    }
    for (int64_t i = 0; i < queries; i++) {
        const int64_t h = kv * group + i / T, t = i % T;
        for (int64_t d = 0; d < D; d++)
            write_io(out, ((b * T + t) * H + h) * D + d, sums[i * D + d], io_type);
    }
}

/* out (B, T, H, D) = softmax(q k^T * scale, masked) v for q (B, H, T, D) contiguous and k, v (B, Hkv, S, D)
   with strides (in elements) for their batch, head and key axes (D contiguous); mask (B, T, S) bytes, 0 where
   a query may not attend (those scores are the lowest float, as the float path's masked_fill: a query that may
   attend to nothing averages every value). Query head h reads kv head h / (H / Hkv); the H / Hkv query heads
   of a kv head are one work item, so each key and value row is read once for all of them. Scores, softmax and
   sums in float32. */
int idefics2_attention(const void *q, const void *k, const void *v, const uint8_t *mask, void *out, int64_t B,
                       int64_t H, int64_t Hkv, int64_t T, int64_t S, int64_t D, int64_t k_batch,
                       int64_t k_head, int64_t k_key, int64_t v_batch, int64_t v_head, int64_t v_key, float scale,
                       int io_type, int threads) {
    int failed = 0;
    const int64_t group = H / Hkv, queries = group * T; /* query (g, t) of a work item: row g * T + t */
#pragma omp parallel num_threads(threads)
    {
        float *scores = (float *)malloc(sizeof(float) * queries * S);
        float *rows = (float *)malloc(sizeof(float) * queries * D);
        float *sums = (float *)malloc(sizeof(float) * queries * D);
        if (scores == NULL || rows == NULL || sums == NULL) {
#pragma omp atomic write
            failed = 1;
        } else {
            /* handed out one at a time: the rows of a batch differ in length, and so do their items (split into
               equal blocks, the longer rows' items all fell to one thread: 8 rows of 100-1,950 slots, "mid" int8
               on an Intel Xeon, attention 8.5 -> 6.3 ms a step) */
#pragma omp for schedule(dynamic, 1) collapse(2)
            for (int64_t b = 0; b < B; b++)
                for (int64_t kv = 0; kv < Hkv; kv++) {
#define ATTEND(DIM, TYPE)                                                                                       \
    attend(q, k, v, mask, out, b, kv, H, group, T, S, DIM, k_batch, k_head, k_key, v_batch, v_head, v_key, scale, \
           TYPE, scores, rows, sums)
                    if (D == 64 && io_type == TYPE_F32) ATTEND(64, TYPE_F32);
                    else if (D == 64) ATTEND(64, TYPE_BF16);
                    else if (D == 128 && io_type == TYPE_F32) ATTEND(128, TYPE_F32);
                    else if (D == 128) ATTEND(128, TYPE_BF16);
                    else ATTEND(D, io_type);
#undef ATTEND
                }
        }
        free(scores);
        free(rows);
        free(sums);
    }
    return failed;
}

/* A decode step's rotary embedding and cache write, for one token per batch row: q_out (B, H, D) = rotate(q),
   keys[b, h, slots[b]] = rotate(k[b, h]) and values[b, h, slots[b]] = v[b, h], with q (B, H, D), k and v
   (B, Hkv, D) contiguous (the projections' outputs), cos and sin (B, D) with sin's first half negated (the
   rotary table's), keys and values strided (batch, head, slot; D contiguous). rotate(x) = x * cos +
   roll(x, D / 2) * sin, rounded as the float path rounds it: the first product to io_type, then the sum. */
static void rotate_row(const void *x, int64_t at, const void *cos, const void *sin, int64_t row, int64_t D,
                       void *out, int64_t out_at, int io_type) {
    const int64_t half = D / 2;
    if (io_type == TYPE_F32) {
        const float *xs = (const float *)x + at, *c = (const float *)cos + row * D, *s = (const float *)sin + row * D;
        float *o = (float *)out + out_at;
        for (int64_t d = 0; d < half; d++) {
            const float first = xs[d] * c[d];
            o[d] = first + xs[d + half] * s[d];
        }
        for (int64_t d = half; d < D; d++) {
            const float first = xs[d] * c[d];
            o[d] = first + xs[d - half] * s[d];
        }
        return;
    }
    for (int64_t d = 0; d < D; d++) {
        const float value = read_io(x, at + d, io_type);
        const float rolled = read_io(x, at + (d < half ? d + half : d - half), io_type);
        const float first = bf16_to_f32(f32_to_bf16(value * read_io(cos, row * D + d, io_type)));
        write_io(out, out_at + d, first + rolled * read_io(sin, row * D + d, io_type), io_type);
    }
}

int idefics2_rope_store(const void *q, const void *k, const void *v, const void *cos, const void *sin,
                        void *q_out, void *keys, void *values, const int64_t *slots, int64_t B, int64_t H,
                        int64_t Hkv, int64_t D, int64_t key_batch, int64_t key_head, int64_t key_slot,
                        int64_t value_batch, int64_t value_head, int64_t value_slot, int io_type) {
    const int64_t size = io_type == TYPE_F32 ? 4 : 2;
    for (int64_t b = 0; b < B; b++) {
        for (int64_t h = 0; h < H; h++) rotate_row(q, (b * H + h) * D, cos, sin, b, D, q_out, (b * H + h) * D, io_type);
        for (int64_t h = 0; h < Hkv; h++) {
            rotate_row(k, (b * Hkv + h) * D, cos, sin, b, D, keys, b * key_batch + h * key_head + slots[b] * key_slot,
                       io_type);
            memcpy((char *)values + (b * value_batch + h * value_head + slots[b] * value_slot) * size,
                   (const char *)v + (b * Hkv + h) * D * size, D * size);
        }
    }
    return 0;
}

/* ---- int4 weights: the portable layout, two values per byte (even column in the high nibble), value q - 8
   times its group's float32 scale ----------------------------------------------------------------------- */

/* the nibbles q of LANES bytes as floats: even columns, odd columns (the 8 subtracted per group, below) */
#if defined(__AVX512F__)
static inline void nibble_pairs(const uint8_t *p, vec *even, vec *odd) {
    const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p));
    *even = _mm512_cvtepi32_ps(_mm512_srli_epi32(bytes, 4));
    *odd = _mm512_cvtepi32_ps(_mm512_and_si512(bytes, _mm512_set1_epi32(15)));
}
#elif defined(__AVX2__) && defined(__FMA__)
static inline void nibble_pairs(const uint8_t *p, vec *even, vec *odd) {
    const __m256i bytes = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p));
    *even = _mm256_cvtepi32_ps(_mm256_srli_epi32(bytes, 4));
    *odd = _mm256_cvtepi32_ps(_mm256_and_si256(bytes, _mm256_set1_epi32(15)));
}
#else
static inline void nibble_pairs(const uint8_t *p, vec *even, vec *odd) {
    *even = (float)(*p >> 4);
    *odd = (float)(*p & 15);
}
#endif

/* y = act(x @ W^T + bias) for W (N, K) in int4 groups of G columns (G a multiple of 2 * LANES): w (N, K / 2)
   bytes, scales (N, K / G) float32; x, y and bias in io_type */
#if defined(INT16_DOTS)
/* the nibbles of QLANES bytes as two int16 vectors: even columns (high nibbles) and odd (low), then those
   multiplied with the matching 16-bit activations xe and xo and added pairwise into acc */
#if defined(__AVX512BW__)
static inline void nibbles(const uint8_t *p, ivec *high, ivec *low) {
    const __m512i bytes = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)p));
    *high = _mm512_srli_epi16(bytes, 4), *low = _mm512_and_si512(bytes, _mm512_set1_epi16(15));
}
static inline ivec nibble_madd(ivec acc, ivec high, ivec low, ivec xe, ivec xo) {
#if defined(__AVX512VNNI__)
    return _mm512_dpwssd_epi32(_mm512_dpwssd_epi32(acc, high, xe), low, xo);
#else
    return _mm512_add_epi32(acc, _mm512_add_epi32(_mm512_madd_epi16(high, xe), _mm512_madd_epi16(low, xo)));
#endif
}
#else
static inline void nibbles(const uint8_t *p, ivec *high, ivec *low) {
    const __m256i bytes = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)p));
    *high = _mm256_srli_epi16(bytes, 4), *low = _mm256_and_si256(bytes, _mm256_set1_epi16(15));
}
static inline ivec nibble_madd(ivec acc, ivec high, ivec low, ivec xe, ivec xo) {
    return _mm256_add_epi32(acc, _mm256_add_epi32(_mm256_madd_epi16(high, xe), _mm256_madd_epi16(low, xo)));
}
#endif
#endif

/* An activation row prepared for int4 rows: its even and odd columns in float32, 8 times each group's column
   sums lane by lane (sum (q - 8) x = sum q x - 8 sum x), and, where the integer path runs, those columns
   rounded to 16 bits with one scale per group (its G / 2 even and G / 2 odd columns, each a multiple of
   QLANES: both halves add into one integer sum) and 8 times each group's column sum as one number. */
typedef struct {
    float *split, *eights, *steps, *group_eights;
    int16_t *x16;
    int64_t K, G;
} int4_rows;

static void int4_free(int4_rows *p) {
    free(p->split);
    free(p->steps);
    free(p->group_eights);
    free(p->x16);
}

static int int4_prepare(const void *x, int64_t M, int64_t K, int64_t G, int io_type, int4_rows *p) {
    const int64_t half = K / 2, groups = K / G;
    p->K = K;
    p->G = G;
    p->steps = NULL;
    p->group_eights = NULL;
    p->x16 = NULL;
    p->split = (float *)malloc(sizeof(float) * M * (K + groups * LANES));
    if (p->split == NULL) return 1;
    p->eights = p->split + M * K;
    for (int64_t m = 0; m < M; m++) {
        float *split = p->split + m * K;
        for (int64_t j = 0; j < half; j++) {
            split[j] = read_io(x, m * K + 2 * j, io_type);
            split[half + j] = read_io(x, m * K + 2 * j + 1, io_type);
        }
        for (int64_t g = 0; g < groups; g++)
            for (int64_t l = 0; l < LANES; l++) {
                float sum = 0.0f;
                for (int64_t j = g * G / 2 + l; j < (g + 1) * G / 2; j += LANES) sum += split[j] + split[half + j];
                p->eights[(m * groups + g) * LANES + l] = 8.0f * sum;
            }
    }
#if defined(INT16_DOTS)
    if ((G / 2) % QLANES != 0) return 0;
    p->x16 = (int16_t *)malloc(sizeof(int16_t) * M * K);
    p->steps = (float *)malloc(sizeof(float) * M * groups);
    p->group_eights = (float *)malloc(sizeof(float) * M * groups);
    if (p->x16 == NULL || p->steps == NULL || p->group_eights == NULL) return 1;
    for (int64_t m = 0; m < M; m++)
        for (int64_t g = 0; g < groups; g++) {
            float largest = 0.0f, eights = 0.0f;
            for (int64_t part = 0; part < 2; part++) {
                const float *from = p->split + m * K + part * half + g * G / 2;
#pragma omp simd reduction(max : largest)
                for (int64_t j = 0; j < G / 2; j++) largest = fabsf(from[j]) > largest ? fabsf(from[j]) : largest;
            }
            for (int64_t l = 0; l < LANES; l++) eights += p->eights[(m * groups + g) * LANES + l];
            const float step = largest > 0.0f ? largest / 32767.0f : 1.0f;
            p->steps[m * groups + g] = step;
            p->group_eights[m * groups + g] = eights;
            for (int64_t part = 0; part < 2; part++) {
                const float *from = p->split + m * K + part * half + g * G / 2;
                int16_t *to = p->x16 + m * K + part * half + g * G / 2;
#pragma omp simd
                for (int64_t j = 0; j < G / 2; j++) to[j] = (int16_t)lrintf(from[j] / step);
            }
        }
#endif
    return 0;
}

#define INT4_ROWS 4 /* int4 rows summed together, the activations loaded once for all */
#define INT4_XROWS 2 /* activation rows summed together, each weight vector's nibbles unpacked once for all */
#if defined(INT16_DOTS)
/* out[mm * INT4_ROWS + r] = activation row m + mm . int4 row r (its bytes rows[r], its group scales
   scales[r]), mm < MR, r < R, on the integer path: per group, both halves into one integer sum, scaled once;
   fetch: the rows 8 on are fetched into L2 meanwhile */
static inline __attribute__((always_inline)) void int4_dots(const int4_rows *p, int64_t m, int MR,
                                                            const uint8_t *const *rows,
                                                            const float *const *scales, int R, int fetch,
                                                            float *out) {
    const int64_t K = p->K, G = p->G, half = K / 2, groups = K / G;
    vec total[INT4_XROWS][INT4_ROWS];
    float offset[INT4_XROWS][INT4_ROWS]; /* sum over the groups of scale * 8 * the group's column sum */
    for (int mm = 0; mm < MR; mm++)
        for (int r = 0; r < R; r++) total[mm][r] = vzero(), offset[mm][r] = 0.0f;
    for (int64_t g = 0; g < groups; g++) {
        ivec acc[INT4_XROWS][INT4_ROWS];
        for (int mm = 0; mm < MR; mm++)
            for (int r = 0; r < R; r++) acc[mm][r] = izero();
        for (int64_t j = g * G / 2; j < (g + 1) * G / 2; j += QLANES) {
            ivec xe[INT4_XROWS], xo[INT4_XROWS];
            for (int mm = 0; mm < MR; mm++) {
                const int16_t *even = p->x16 + (m + mm) * K;
                xe[mm] = xload(even + j), xo[mm] = xload(even + half + j);
            }
            if (fetch && j % 64 < QLANES) /* as `dots` does */
                for (int r = 0; r < R; r++) FETCH_L2((const char *)(rows[r] + PREFETCH_ROWS * half + j));
            for (int r = 0; r < R; r++) {
                ivec high, low;
                nibbles(rows[r] + j, &high, &low);
                for (int mm = 0; mm < MR; mm++) acc[mm][r] = nibble_madd(acc[mm][r], high, low, xe[mm], xo[mm]);
            }
        }
        for (int mm = 0; mm < MR; mm++) {
            const float step = p->steps[(m + mm) * groups + g], eights = p->group_eights[(m + mm) * groups + g];
            for (int r = 0; r < R; r++) {
                total[mm][r] = vfma(int_to_vec(acc[mm][r]), vset(scales[r][g] * step), total[mm][r]);
                offset[mm][r] = fmaf(scales[r][g], eights, offset[mm][r]); /* one rounding, however compiled */
            }
        }
    }
    for (int mm = 0; mm < MR; mm++)
        for (int r = 0; r < R; r++) out[mm * INT4_ROWS + r] = vsum(total[mm][r]) - offset[mm][r];
}

static void int4_dots_any(const int4_rows *p, int64_t m, int MR, const uint8_t *const *rows,
                          const float *const *scales, int R, int fetch, float *out) {
    if (R == 4 && MR == 2) int4_dots(p, m, 2, rows, scales, 4, fetch, out);
    else if (R == 4) int4_dots(p, m, 1, rows, scales, 4, fetch, out);
    else if (R == 2 && MR == 2) int4_dots(p, m, 2, rows, scales, 2, fetch, out);
    else if (R == 2) int4_dots(p, m, 1, rows, scales, 2, fetch, out);
    else
        for (int mm = 0; mm < MR; mm++)
            for (int r = 0; r < R; r++)
                int4_dots(p, m + mm, 1, rows + r, scales + r, 1, fetch && mm == 0, out + mm * INT4_ROWS + r);
}
#endif

/* activation row m . one int4 row (its bytes and its group scales), in float32 (no integer path here) */
static inline float int4_dot(const int4_rows *p, int64_t m, const uint8_t *row, const float *scales, int fetch) {
    const int64_t K = p->K, G = p->G, half = K / 2, groups = K / G;
    const float *eights = p->eights + m * groups * LANES;
    vec total = vzero();
    const float *even = p->split + m * K, *odd = even + half;
    for (int64_t g = 0; g < groups; g++) {
        vec acc = vzero();
        for (int64_t j = g * G / 2; j < (g + 1) * G / 2; j += LANES) {
            if (fetch && j % 64 < LANES) FETCH_L2((const char *)(row + PREFETCH_ROWS * half + j));
            vec high, low;
            nibble_pairs(row + j, &high, &low);
            acc = vfma(high, vload(even + j), acc);
            acc = vfma(low, vload(odd + j), acc);
        }
        total = vfma(vset(scales[g]), acc - vload(eights + g * LANES), total);
    }
    return vsum(total);
}

/* `products` for int4 weights W (N, K) in groups of G columns (G a multiple of 2 * LANES): each part's w and
   w2 (N, K / 2) bytes, scales and scales2 (N, K / G) float32; x, y and bias in io_type */
static int int4_products(const void *x, const product_part *parts, int n_parts, int64_t M, int64_t K, int64_t G,
                         int io_type, int act, int threads) {
    int4_rows prepared;
    if (int4_prepare(x, M, K, G, io_type, &prepared) != 0) {
        int4_free(&prepared);
        return 1;
    }
    const int64_t half = K / 2, groups = K / G;
#pragma omp parallel num_threads(threads)
    for (int p = 0; p < n_parts; p++) { /* every thread takes its share of each part, none waits between */
        const uint8_t *w = (const uint8_t *)parts[p].w, *w2 = (const uint8_t *)parts[p].w2;
        const float *scales = parts[p].scales, *scales2 = parts[p].scales2;
        const int64_t N = parts[p].N, block = w2 != NULL ? INT4_ROWS / 2 : INT4_ROWS;
        const int64_t blocks = (N + block - 1) / block;
#pragma omp for schedule(static) nowait
        for (int64_t b = 0; b < blocks; b++) { /* INT4_ROWS rows at a time (gate and up: half as many of each) */
            const int64_t n0 = b * block;
            const int count = N - n0 < block ? (int)(N - n0) : (int)block, R = w2 != NULL ? 2 * count : count;
            const uint8_t *rows[INT4_ROWS];
            const float *row_scales[INT4_ROWS];
            for (int r = 0; r < count; r++) {
                rows[r] = w + (n0 + r) * half, row_scales[r] = scales + (n0 + r) * groups;
                if (w2 != NULL)
                    rows[count + r] = w2 + (n0 + r) * half, row_scales[count + r] = scales2 + (n0 + r) * groups;
            }
            for (int64_t m = 0; m < M; m += INT4_XROWS) {
                const int mr = M - m < INT4_XROWS ? (int)(M - m) : INT4_XROWS;
                float out[INT4_XROWS * INT4_ROWS];
#if defined(INT16_DOTS)
                if (prepared.x16 != NULL) int4_dots_any(&prepared, m, mr, rows, row_scales, R, m == 0, out);
                else
#endif
                    for (int mm = 0; mm < mr; mm++)
                        for (int r = 0; r < R; r++)
                            out[mm * INT4_ROWS + r] =
                                int4_dot(&prepared, m + mm, rows[r], row_scales[r], m + mm == 0);
                for (int mm = 0; mm < mr; mm++)
                    for (int r = 0; r < count; r++) {
                        float v = out[mm * INT4_ROWS + r];
                        if (parts[p].bias != NULL) v += read_io(parts[p].bias, n0 + r, io_type);
                        v = activate(v, act);
                        if (w2 != NULL) v *= out[mm * INT4_ROWS + count + r];
                        write_io(parts[p].y, (m + mm) * N + n0 + r, v, io_type);
                    }
            }
        }
    }
    int4_free(&prepared);
    return 0;
}

/* one int4 product (a gated pair where w2 is given) */
static int int4_product(const void *x, const uint8_t *w, const float *scales, const uint8_t *w2,
                        const float *scales2, const void *bias, void *y, int64_t M, int64_t N, int64_t K, int64_t G,
                        int io_type, int act, int threads) {
    const product_part part = {w, w2, scales, scales2, bias, y, N};
    return int4_products(x, &part, 1, M, K, G, io_type, act, threads);
}

int idefics2_linear_int4(const void *x, const uint8_t *w, const float *scales, const void *bias, void *y,
                         int64_t M, int64_t N, int64_t K, int64_t G, int io_type, int act, int threads) {
    return int4_product(x, w, scales, NULL, NULL, bias, y, M, N, K, G, io_type, act, threads);
}

int idefics2_gated_int4(const void *x, const uint8_t *gate, const float *gate_scales, const uint8_t *up,
                        const float *up_scales, void *y, int64_t M, int64_t N, int64_t K, int64_t G, int io_type,
                        int act, int threads) {
    return int4_product(x, gate, gate_scales, up, up_scales, NULL, y, M, N, K, G, io_type, act, threads);
}

/* The float weight of int4 rows for a product of many rows (prefill), where a float matrix product beats any
   int4 one: out (N, K) in out_type from w (N, K / 2) in the portable layout, scales and zeros (N, K / G)
   float32 (zeros NULL: none), out[n][k] = (q - 8) * scale, then + zero, each step rounded to float32 and the
   last to out_type: the numbers of idefics2.quantization.formats.dequantize_int4, so no multiply-add may fuse
   the two steps (GCC fuses across statements unless told not to). One pass over the bytes, no float32 copy. */
__attribute__((optimize("fp-contract=off"))) void idefics2_dequantize_int4(const uint8_t *w, const float *scales,
                                                                           const float *zeros, void *out, int64_t N,
                                                                           int64_t K, int64_t G, int out_type,
                                                                           int threads) {
    const int64_t groups = K / G;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = 0; n < N; n++)
        for (int64_t g = 0; g < groups; g++) {
            const uint8_t *bytes = w + n * (K / 2) + g * (G / 2);
            const float scale = scales[n * groups + g], zero = zeros != NULL ? zeros[n * groups + g] : 0.0f;
            float values[64]; /* a group's columns, 64 at a time */
            for (int64_t j0 = 0; j0 < G / 2; j0 += 32) {
                const int64_t count = G / 2 - j0 < 32 ? G / 2 - j0 : 32;
                for (int64_t j = 0; j < count; j++) {
                    values[2 * j] = (float)((bytes[j0 + j] >> 4) - 8) * scale;
                    values[2 * j + 1] = (float)((bytes[j0 + j] & 15) - 8) * scale;
                }
                if (zeros != NULL)
                    for (int64_t j = 0; j < 2 * count; j++) values[j] = values[j] + zero;
                const int64_t first = n * K + g * G + 2 * j0;
                if (out_type == TYPE_F32) memcpy((float *)out + first, values, sizeof(float) * 2 * count);
                else
                    for (int64_t j = 0; j < 2 * count; j++) ((uint16_t *)out)[first + j] = f32_to_bf16(values[j]);
            }
        }
}

/* x += y over n values in io_type (bfloat16: each sum rounded) */
static void add_into(void *x, const void *y, int64_t n, int io_type) {
    if (io_type == TYPE_F32) {
        float *xs = (float *)x;
        const float *ys = (const float *)y;
        for (int64_t i = 0; i < n; i++) xs[i] += ys[i];
        return;
    }
    for (int64_t i = 0; i < n; i++) write_io(x, i, read_io(x, i, io_type) + read_io(y, i, io_type), io_type);
}

/* ---- every decoder layer of a decode step in one call ---------------------------------------------------
   Per layer, in the order and with the roundings of the decoder's own ops (modeling/text.py), each
   intermediate written in io_type as those ops write it:
     h = rms_norm(x); q, k, v = h Wq^T, h Wk^T, h Wv^T; rotate q and k, store k and v at each row's slot;
     x = x + attention(q, keys, values) Wo^T; h = rms_norm(x); x = x + (act(h Wg^T) * (h Wu^T)) Wd^T.
   Each weight is float32 or bfloat16 (io_type's), int8 with float32 row scales, or int4 in the portable layout
   with float32 group scales; none has a bias. The gate and up weights share one type (and group). */
enum { TYPE_I4 = 3 };

typedef struct {
    const void *data;
    const float *scales; /* int8: (N); int4: (N, K / group); floats: NULL */
    int64_t type, group; /* TYPE_*; int4's group size */
} weight_ref;

typedef struct {
    const void *input_norm, *post_norm; /* (D) in io_type */
    weight_ref q, k, v, o, gate, up, down;
} layer_ref;

/* parts[i].y = act(x parts[i].w^T ...) for n parts whose weights are all of `kind`'s kind (type, int4's group) */
static int parts_of_kind(const void *x, const weight_ref *kind, const product_part *parts, int n, int64_t M,
                         int64_t K, int io_type, int act, int threads) {
    if (kind->type == TYPE_I4) return int4_products(x, parts, n, M, K, kind->group, io_type, act, threads);
    return products(x, parts, n, M, K, io_type, (int)kind->type, act, threads);
}

/* y = act(x a^T), or act(x a^T) * (x b^T) with a second weight b */
static int weight_product(const void *x, const weight_ref *a, const weight_ref *b, void *y, int64_t M, int64_t N,
                          int64_t K, int io_type, int act, int threads) {
    const product_part part = {a->data, b != NULL ? b->data : NULL, a->scales, b != NULL ? b->scales : NULL,
                               NULL, y, N};
    return parts_of_kind(x, a, &part, 1, M, K, io_type, act, threads);
}

/* ys[i] (M, Ns[i]) = x weights[i]^T for n weights sharing x (M, K): each run of weights of one kind (type, and
   int4's group) in one pass of the threads (a layer's q, k and v: one activation preparation and one fork
   instead of three, and no wait between them) */
static int weight_products(const void *x, const weight_ref *const *weights, void *const *ys, const int64_t *Ns,
                           int n, int64_t M, int64_t K, int io_type, int threads) {
    int failed = 0;
    for (int first = 0, last; first < n; first = last) {
        const weight_ref *kind = weights[first];
        product_part parts[MAX_PARTS];
        for (last = first; last < n && last - first < MAX_PARTS && weights[last]->type == kind->type &&
                           (kind->type != TYPE_I4 || weights[last]->group == kind->group);
             last++)
            parts[last - first] = (product_part){weights[last]->data, NULL, weights[last]->scales, NULL, NULL,
                                                 ys[last], Ns[last]};
        failed |= parts_of_kind(x, kind, parts, last - first, M, K, io_type, ACT_NONE, threads);
    }
    return failed;
}

/* seconds spent by decoder steps in weight products and in attention, summed since the library loaded (for
   benchmarks/bench_decode_overhead.py: a profiler does not see inside this call) */
static double product_seconds, attention_seconds;

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

void idefics2_step_clock(double *seconds) {
    seconds[0] = product_seconds;
    seconds[1] = attention_seconds;
}

/* x (M, D) in io_type, updated in place; cos and sin (M, hd) as rope_store takes them; slots (M); mask (M, S)
   bytes over the cache slots [0, S) that attention reads; keys[l] and values[l] layer l's cache buffers, all
   with the strides given; I the MLP's inner width; final_norm (D) or NULL: the decoder's last norm, applied to x
   after the layers. Returns 1 where memory ran out (x is then partly updated). */
int idefics2_decoder_step(const layer_ref *layers, int64_t n_layers, void *x, int64_t M, int64_t D, int64_t H,
                          int64_t Hkv, int64_t hd, int64_t I, const void *cos, const void *sin, const int64_t *slots,
                          const uint8_t *mask, void *const *keys, void *const *values, int64_t S, int64_t key_batch,
                          int64_t key_head, int64_t key_slot, int64_t value_batch, int64_t value_head,
                          int64_t value_slot, const void *final_norm, float eps, float scale, int io_type, int act,
                          int threads) {
    const int64_t size = io_type == TYPE_F32 ? 4 : 2, wide = H * hd, narrow = Hkv * hd;
    /* h (M, D), q (M, wide), k and v (M, narrow), rotated q (M, wide), attended (M, wide), out (M, D), inner (M, I) */
    char *scratch = (char *)malloc(size * M * (2 * D + 3 * wide + 2 * narrow + I));
    if (scratch == NULL) return 1;
    char *h = scratch, *q = h + size * M * D, *k = q + size * M * wide, *v = k + size * M * narrow;
    char *rotated = v + size * M * narrow, *attended = rotated + size * M * wide, *out = attended + size * M * wide;
    char *inner = out + size * M * D;
    int failed = 0;
    double multiplying = 0.0, attending = 0.0; /* this call's seconds, added to the clock once at the end */
    for (int64_t l = 0; l < n_layers && !failed; l++) {
        const layer_ref *layer = layers + l;
        idefics2_rms_norm(x, layer->input_norm, h, M, D, eps, io_type);
        const weight_ref *projections[3] = {&layer->q, &layer->k, &layer->v};
        void *const projected[3] = {q, k, v};
        const int64_t widths[3] = {wide, narrow, narrow};
        double start = now();
        failed |= weight_products(h, projections, projected, widths, 3, M, D, io_type, threads);
        multiplying += now() - start;
        if (failed) break;
        idefics2_rope_store(q, k, v, cos, sin, rotated, keys[l], values[l], slots, M, H, Hkv, hd, key_batch,
                            key_head, key_slot, value_batch, value_head, value_slot, io_type);
        start = now();
        failed |= idefics2_attention(rotated, keys[l], values[l], mask, attended, M, H, Hkv, 1, S, hd,
                                     key_batch, key_head, key_slot, value_batch, value_head, value_slot, scale,
                                     io_type, threads);
        attending += now() - start;
        start = now();
        failed |= weight_product(attended, &layer->o, NULL, out, M, D, wide, io_type, ACT_NONE, threads);
        multiplying += now() - start;
        if (failed) break;
        add_into(x, out, M * D, io_type);
        idefics2_rms_norm(x, layer->post_norm, h, M, D, eps, io_type);
        start = now();
        failed |= weight_product(h, &layer->gate, &layer->up, inner, M, I, D, io_type, act, threads);
        failed |= weight_product(inner, &layer->down, NULL, out, M, D, I, io_type, ACT_NONE, threads);
        multiplying += now() - start;
        if (failed) break;
        add_into(x, out, M * D, io_type);
    }
    if (!failed && final_norm != NULL) idefics2_rms_norm(x, final_norm, x, M, D, eps, io_type); /* in place, by row */
    free(scratch);
#pragma omp atomic
    product_seconds += multiplying;
#pragma omp atomic
    attention_seconds += attending;
    return failed;
}

/* ---- a greedy step's token without the whole head ---------------------------------------------------------
   A greedy step wants only the index of each row's largest logit, and the head's float weights are the
   largest read of a step. An int8 copy of them (row n ~ scales[n] * q[n], rounded to nearest) is a quarter
   of a float32 head, half of a bfloat16 one. Its product S_n (`product` of the activations in float32, as an
   int8 layer's) differs from the sum l_n = x . w_n that the float product computes by at most
       r_n = |x| |w_n - s_n q_n| + |d| s_n |q_n| + g (|x| + |d|) s_n |q_n| + g |x| |w_n|
   (|.| the 2-norm; d = x - the activations as the int8 product rounds them to 16 bits, 0 where it sums in
   float32; g = (D + 8) 2^-24 / (1 - (D + 8) 2^-24) bounds the float32 rounding of a sum of D products in any
   order, and of the few roundings around it; bfloat16 products, which flush denormals, add at most D 2^-126
   more). With T = max_n (S_n - r_n) <= the largest sum, a row n with S_n + r_n < T has a sum below the
   largest: only the others (candidates) are computed, by the float product's own sum (the same bits as the
   whole product's), and the first largest of them is the token that the whole product's logits give. A
   bfloat16 product's logits are its sums rounded to bfloat16, where a smaller sum can round to the same
   logit as the largest and come first: there the candidates reach 2^-6 |T| lower (more than two bfloat16
   steps). Where the activations or a bound are not finite, or a row has more than `most` candidates, the
   whole product decides (the first NaN, else the first largest, as numpy's argmax). */
typedef struct {
    const int8_t *q;     /* (vocab, D) */
    const float *scales; /* (vocab) */
    const float *bounds; /* (vocab, 3): |w_n - s_n q_n|, s_n |q_n|, |w_n|, each rounded up */
    int64_t most;
} head_screen;

static int64_t screen_counts[3]; /* rows screened, candidates computed for them, rows the whole product decided */

void idefics2_screen_counts(int64_t *counts) {
    for (int i = 0; i < 3; i++) counts[i] = screen_counts[i];
}

/* a 64-bit hash of n bytes (to tell whether a tensor changed, not against an adversary): eight lanes of
   8-byte words, each word xored with a number of its position and lane, its halves multiplied into its lane
   and the word itself added to the next lane's (so that each bit counts), folded at the end with the tail
   and the length; a sum over the words, so the threads' shares add up to the same hash */
uint64_t idefics2_fingerprint(const uint8_t *p, int64_t n, int threads) {
    const uint64_t prime = 0x100000001b3ULL;
    uint64_t lanes[8] = {0}, h = 0xcbf29ce484222325ULL;
    const int64_t whole = n / 64 * 64;
#pragma omp parallel for num_threads(threads) schedule(static) reduction(+ : lanes[:8])
    for (int64_t i = 0; i < whole; i += 64) {
        uint64_t words[8];
        memcpy(words, p + i, 64);
        for (int l = 0; l < 8; l++) {
            const uint64_t k = words[l] ^ (0x9e3779b97f4a7c15ULL * (uint64_t)(l + 1) + (uint64_t)i);
            lanes[l] += words[l ^ 1] + (k & 0xffffffffULL) * (k >> 32);
        }
    }
    int64_t i = whole;
    for (int l = 0; l < 8; l++) h = ((h ^ lanes[l]) * prime) ^ (h >> 31);
    for (; i < n; i++) h = (h ^ p[i]) * prime;
    return (h ^ (uint64_t)n) * prime;
}

/* the index of row's first NaN, else of the first of its largest values: the largest found a vector at a
   time (max(v, best) is v > best ? v : best, lane by lane; NaN lanes flagged apart), then its first index */
static int64_t first_largest(const float *row, int64_t V) {
    float largest = -INFINITY;
    int any_nan = 0;
    int64_t n = 0;
#if defined(__AVX512F__)
    __m512 best = _mm512_set1_ps(-INFINITY);
    __mmask16 nan = 0;
    for (; n + 16 <= V; n += 16) {
        const __m512 v = _mm512_loadu_ps(row + n);
        nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
        best = _mm512_max_ps(v, best);
    }
    largest = _mm512_reduce_max_ps(best);
    any_nan = nan != 0;
#elif defined(__AVX2__)
    __m256 best = _mm256_set1_ps(-INFINITY), nan = _mm256_setzero_ps();
    for (; n + 8 <= V; n += 8) {
        const __m256 v = _mm256_loadu_ps(row + n);
        nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
        best = _mm256_max_ps(v, best);
    }
    float lanes[8];
    _mm256_storeu_ps(lanes, best);
    for (int j = 0; j < 8; j++) largest = lanes[j] > largest ? lanes[j] : largest;
    any_nan = _mm256_movemask_ps(nan) != 0;
#endif
    for (; n < V; n++) {
        any_nan |= isnan(row[n]);
        largest = row[n] > largest ? row[n] : largest;
    }
    n = 0;
#if defined(__AVX512F__)
    const __m512 target = _mm512_set1_ps(largest);
    for (; n + 16 <= V; n += 16) {
        const __m512 v = _mm512_loadu_ps(row + n);
        const __mmask16 hit = any_nan ? _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q)
                                      : _mm512_cmp_ps_mask(v, target, _CMP_EQ_OQ);
        if (hit) return n + __builtin_ctz(hit);
    }
#elif defined(__AVX2__)
    const __m256 target = _mm256_set1_ps(largest);
    for (; n + 8 <= V; n += 8) {
        const __m256 v = _mm256_loadu_ps(row + n);
        const __m256 equal = any_nan ? _mm256_cmp_ps(v, v, _CMP_UNORD_Q) : _mm256_cmp_ps(v, target, _CMP_EQ_OQ);
        const int hit = _mm256_movemask_ps(equal);
        if (hit) return n + __builtin_ctz(hit);
    }
#endif
    for (; n < V; n++)
        if (any_nan ? isnan(row[n]) : row[n] == largest) return n;
    return 0; /* V == 0 */
}

/* first_largest of row (V) with its E ids excluded (-1: none) set to -inf first */
static int64_t greedy_token(float *row, int64_t V, const int64_t *excluded, int64_t E) {
    for (int64_t i = 0; i < E; i++)
        if (excluded[i] >= 0 && excluded[i] < V) row[excluded[i]] = -INFINITY;
    return first_largest(row, V);
}

/* |x - x as the int8 product rounds it|: its whole vectors go to 16 bits per block, the rest stays float32 */
static double rounding_norm(const float *x, int64_t K) {
#if defined(INT16_DOTS)
    int16_t *x16 = (int16_t *)malloc(sizeof(int16_t) * K);
    float *xs = (float *)malloc(sizeof(float) * (K / QBLOCK + 1));
    if (x16 == NULL || xs == NULL) {
        free(x16);
        free(xs);
        return NAN; /* the caller lets the whole product decide */
    }
    quantize_row(x, K, x16, xs);
    double sum = 0.0;
    for (int64_t k = 0; k < K / QLANES * QLANES; k++) {
        const double d = (double)x[k] - (double)xs[k / QBLOCK] * (double)x16[k];
        sum += d * d;
    }
    free(x16);
    free(xs);
    return sqrt(sum);
#else
    (void)x;
    (void)K;
    return 0.0;
#endif
}

/* chosen[m] = the index of the largest logit of x[m] over the head's rows (x (M, D) and w (V, D) both float32
   or both bfloat16, io_type) but the rows excluded[m * E + i] (ids outside [0, V) stand for none: a minimum
   length's end tokens) */
static int screened_argmax(const void *x, const void *w, const head_screen *screen, int64_t M, int64_t V,
                           int64_t D, const int64_t *excluded, int64_t E, int64_t *chosen, int io_type,
                           int threads) {
    const int64_t size = io_type == TYPE_F32 ? 4 : 2;
    const int narrow = io_type == TYPE_BF16;
    float *approx = (float *)malloc(sizeof(float) * M * V), *xf = (float *)x;
    double *radius = (double *)malloc(sizeof(double) * V);
    int64_t *candidates = (int64_t *)malloc(sizeof(int64_t) * V);
    uint16_t *whole = narrow ? (uint16_t *)malloc(sizeof(uint16_t) * V) : NULL; /* a row's bfloat16 logits */
    if (narrow) {
        xf = (float *)malloc(sizeof(float) * M * D);
        for (int64_t i = 0; xf != NULL && i < M * D; i++) xf[i] = bf16_to_f32(((const uint16_t *)x)[i]);
    }
    int failed = approx == NULL || radius == NULL || candidates == NULL || xf == NULL || (narrow && whole == NULL);
    if (!failed)
        failed = product(xf, screen->q, screen->scales, NULL, NULL, NULL, approx, M, V, D, TYPE_F32, TYPE_I8,
                         ACT_NONE, threads);
    const double g = (double)(D + 8) * 0x1p-24 / (1.0 - (double)(D + 8) * 0x1p-24), slack = 1.0 + 1e-6;
    const double flushed = narrow ? (double)D * 0x1p-126 : 0.0;
    for (int64_t m = 0; m < M && !failed; m++) {
        const float *xm = xf + m * D, *s = approx + m * V;
        const uint16_t *xh = NULL; /* bfloat16 activations where `product` multiplies them as they are */
#if defined(__AVX512BF16__)
        if (narrow) xh = (const uint16_t *)x + m * D;
#endif
        double squares = 0.0;
        for (int64_t k = 0; k < D; k++) squares += (double)xm[k] * (double)xm[k];
        const double xn = sqrt(squares), dn = rounding_norm(xm, D);
        int screened = isfinite(xn) && isfinite(dn);
        for (int64_t n = 0; n < V && screened; n++) {
            const float *b = screen->bounds + 3 * n;
            radius[n] = slack * (xn * b[0] + dn * b[1] + g * (xn + dn) * b[1] + g * xn * b[2]) + flushed;
            if (!isfinite((double)s[n] - radius[n]) || !isfinite((double)s[n] + radius[n])) screened = 0;
        }
        for (int64_t i = 0; i < E && screened; i++) {
            const int64_t n = excluded[m * E + i];
            if (n >= 0 && n < V) radius[n] = -1.0; /* out of the running */
        }
        double threshold = -INFINITY;
        for (int64_t n = 0; n < V && screened; n++)
            if (radius[n] >= 0.0 && (double)s[n] - radius[n] > threshold) threshold = (double)s[n] - radius[n];
        if (narrow) threshold -= ldexp(fabs(threshold), -6) + 1e-30;
        int64_t count = 0;
        for (int64_t n = 0; n < V && screened; n++) {
            if (radius[n] < 0.0 || (double)s[n] + radius[n] < threshold) continue;
            if (count == screen->most) screened = 0;
            else candidates[count++] = n;
        }
        screened = screened && count > 0;
        if (screened) {
            int64_t best = -1;
            float largest = 0.0f, sums[MAX_WROWS][MAX_XROWS];
            for (int64_t i = 0; i < count; i++) { /* in index order: the first of equal logits stays */
                const void *row = (const char *)w + size * candidates[i] * D;
                dots_any(xh != NULL ? NULL : xm, xh, &row, 1, 1, D, 0, whole_columns(xh, D),
                         narrow ? TYPE_BF16 : TYPE_F32, NULL, sums);
                const float logit = narrow ? bf16_to_f32(f32_to_bf16(sums[0][0])) : sums[0][0];
                if (best < 0 || logit > largest) best = candidates[i], largest = logit;
            }
            chosen[m] = best;
#pragma omp atomic
            screen_counts[0] += 1;
#pragma omp atomic
            screen_counts[1] += count;
        } else {
            float *logits = approx + m * V;
            failed = product((const char *)x + size * m * D, w, NULL, NULL, NULL, NULL, narrow ? (void *)whole : logits,
                             1, V, D, io_type, io_type, ACT_NONE, threads);
            for (int64_t n = 0; narrow && n < V; n++) logits[n] = bf16_to_f32(whole[n]);
            chosen[m] = greedy_token(logits, V, E ? excluded + m * E : NULL, E);
#pragma omp atomic
            screen_counts[2] += 1;
        }
    }
    if (xf != (float *)x) free(xf);
    free(approx);
    free(radius);
    free(candidates);
    free(whole);
    return failed;
}

/* ---- a whole decode step from token ids to logits, one call ----------------------------------------------
   What the model's decode step computes around idefics2_decoder_step, done here so that a step crosses from
   Python into C once, with what stays the same between steps prepared once in a decode_model (so that a call
   converts few arguments): x = embedding[tokens] (M, D); cos and sin rows at each row's position, read from the
   rotary tables (rows >= 1 + the largest position, as modeling.text.RotaryTable holds them); attention over
   slots [0, max position] with row m allowed the slots j <= positions[m] (and j > positions[m] - window when
   window > 0), each token stored at the slot of its position; the layers, the final norm, then the head
   (vocab, D) product into logits (M, vocab) float32 (widened from io_type, as the model's float() widens its
   head's output), or, given a screen (a float head of the activations' dtype), each row's greedy token into
   chosen (M) instead, row m's E ids excluded[m * E ...] left out (screened_argmax; logits unused). Given
   chosen without a screen, the logits are made whole and the same tokens picked from them (any head; the
   excluded ids' logits are left at -inf). Returns 1 where memory ran out, 2 for a token outside
   [0, vocab_in), 3 for a screen of another head. */
typedef struct { /* what stays the same from one step to the next: prepared once (DecodeCall) */
    const layer_ref *layers;
    int64_t n_layers;
    const void *embedding; /* (vocab_in, D) */
    int64_t vocab_in, D, H, Hkv, hd, I;
    const void *cos_table, *sin_table;
    int64_t window;
    void *const *keys, *const *values;
    int64_t key_batch, key_head, key_slot, value_batch, value_head, value_slot;
    const void *final_norm;
    const weight_ref *head;
    int64_t vocab, io_type, act;
    float eps, scale;
} decode_model;

int idefics2_decode_tokens(const decode_model *model, const int64_t *tokens, const int64_t *positions, int64_t M,
                           float *logits, const head_screen *screen, const int64_t *excluded, int64_t E,
                           int64_t *chosen, int threads) {
    const layer_ref *layers = model->layers;
    const void *embedding = model->embedding, *cos_table = model->cos_table, *sin_table = model->sin_table;
    const weight_ref *head = model->head;
    const int64_t n_layers = model->n_layers, vocab_in = model->vocab_in, D = model->D, hd = model->hd;
    const int64_t window = model->window, vocab = model->vocab;
    const int io_type = (int)model->io_type;
    const int64_t size = io_type == TYPE_F32 ? 4 : 2;
    if (screen != NULL && head->type != io_type) return 3;
    int64_t S = 0;
    for (int64_t m = 0; m < M; m++) {
        if (tokens[m] < 0 || tokens[m] >= vocab_in) return 2;
        if (positions[m] + 1 > S) S = positions[m] + 1;
    }
    /* x (M, D), cos and sin (M, hd), head output (M, vocab) when it is not float32, mask (M, S) */
    const int64_t narrow_logits = io_type == TYPE_F32 || screen != NULL ? 0 : M * vocab;
    char *scratch = (char *)malloc(size * (M * D + 2 * M * hd + narrow_logits) + M * S);
    if (scratch == NULL) return 1;
    char *x = scratch, *cos = x + size * M * D, *sin = cos + size * M * hd, *narrow = sin + size * M * hd;
    uint8_t *mask = (uint8_t *)(narrow + size * narrow_logits);
    for (int64_t m = 0; m < M; m++) {
        const int64_t p = positions[m];
        memcpy(x + size * m * D, (const char *)embedding + size * tokens[m] * D, size * D);
        memcpy(cos + size * m * hd, (const char *)cos_table + size * p * hd, size * hd);
        memcpy(sin + size * m * hd, (const char *)sin_table + size * p * hd, size * hd);
        for (int64_t j = 0; j < S; j++) mask[m * S + j] = j <= p && (window <= 0 || j > p - window);
    }
    int failed = idefics2_decoder_step(layers, n_layers, x, M, D, model->H, model->Hkv, hd, model->I, cos, sin,
                                       positions, mask, model->keys, model->values, S, model->key_batch,
                                       model->key_head, model->key_slot, model->value_batch, model->value_head,
                                       model->value_slot, model->final_norm, model->eps, model->scale, io_type,
                                       (int)model->act, threads);
    if (!failed) {
        double start = now();
        if (screen != NULL)
            failed = screened_argmax(x, head->data, screen, M, vocab, D, excluded, E, chosen, io_type, threads);
        else
            failed = weight_product(x, head, NULL, io_type == TYPE_F32 ? (void *)logits : (void *)narrow, M,
                                    vocab, D, io_type, ACT_NONE, threads);
        const double head_seconds = now() - start;
#pragma omp atomic
        product_seconds += head_seconds;
        for (int64_t i = 0; i < narrow_logits && !failed && screen == NULL; i++)
            logits[i] = read_io(narrow, i, io_type);
        for (int64_t m = 0; m < M && !failed && screen == NULL && chosen != NULL; m++)
            chosen[m] = greedy_token(logits + m * vocab, vocab, E ? excluded + m * E : NULL, E);
    }
    free(scratch);
    return failed;
}

/* x = hi + lo + (a remainder below 2^-16 of |x|): hi is x rounded to bfloat16, lo the rest rounded to
 * bfloat16. Three bfloat16 products, hi.hi + hi.lo + lo.hi, then give a float32 product to about 2^-16 (the
 * dropped lo.lo term and the remainders) at the bfloat16 units' speed. NaN and infinity stay in hi (lo 0). */
void idefics2_split_bf16(const float *x, uint16_t *hi, uint16_t *lo, int64_t n, int threads) {
#pragma omp parallel for simd num_threads(threads) schedule(static)
    for (int64_t i = 0; i < n; i++) {
        const uint16_t h = f32_to_bf16(x[i]);
        const float rest = x[i] - bf16_to_f32(h);
        hi[i] = h;
        lo[i] = (h & 0x7f80u) == 0x7f80u ? 0 : f32_to_bf16(rest);
    }
}
