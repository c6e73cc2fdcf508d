/* y[m, n] = x[m, k] @ W[n, k]^T (+ bias): fp32 GEMM for decode shapes, AVX2 + FMA.
 *
 * Built by server/engine/cpu_kernels.py with the system C compiler and loaded with ctypes.
 * Why it exists: on this project's CPUs (AMD Zen 3) MKL and oneDNN stream the weights of
 * a decode step (1-64 rows times a wide weight) at 8-13 GB/s, about half the memory's
 * read rate; this kernel reads them at 17-21 GB/s for one row and is 1.1-1.6x faster at
 * 4-64 rows (docs/benchmarks.md, "Decode").
 *
 * Layout: W is packed once into panels of PANEL output columns, each panel k-major
 * (panel j holds W[16j .. 16j+15, 0 .. k-1] as k rows of 16 floats), zero-padded to a
 * whole panel. One pass over a panel reads it from memory once; the rows of x run over
 * it in tiles of up to MAXR rows, 2 * MAXR accumulators in registers (the classic 6x16
 * AVX2 micro-kernel); later tiles find the panel in L2. Threads split the panels.
 */
#include <immintrin.h>

#define PANEL 16
#define MAXR 6
#define ROW_BLOCK 192 /* rows per sweep over the weights: x's block stays in cache */

long sb_panel(void) { return PANEL; }

/* p must hold ceil(n / PANEL) * PANEL * k floats. */
void sb_pack(const float* w, float* p, long n, long k, int threads) {
    const long panels = (n + PANEL - 1) / PANEL;
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (long j = 0; j < panels; j++) {
        float* dst = p + j * k * PANEL;
        for (int c = 0; c < PANEL; c++) {
            const long col = j * PANEL + c;
            if (col < n) {
                const float* src = w + col * k;
                for (long kk = 0; kk < k; kk++) dst[kk * PANEL + c] = src[kk];
            } else {
                for (long kk = 0; kk < k; kk++) dst[kk * PANEL + c] = 0.0f;
            }
        }
    }
}

/* y's last panel may be partial: a masked store writes only its cols columns (no
 * temporary: one would keep the accumulators in memory instead of registers). */
static inline __attribute__((always_inline)) void store16(
        __m256 lo, __m256 hi, const float* bias, float* y, long cols) {
    if (bias) {
        lo = _mm256_add_ps(lo, _mm256_loadu_ps(bias));
        hi = _mm256_add_ps(hi, _mm256_loadu_ps(bias + 8));
    }
    if (cols == PANEL) {
        _mm256_storeu_ps(y, lo);
        _mm256_storeu_ps(y + 8, hi);
        return;
    }
    const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i n = _mm256_set1_epi32((int)cols);
    _mm256_maskstore_ps(y, _mm256_cmpgt_epi32(n, lanes), lo);
    _mm256_maskstore_ps(y + 8, _mm256_cmpgt_epi32(n, _mm256_add_epi32(lanes, _mm256_set1_epi32(8))), hi);
}

/* r rows (1..MAXR) of x against one panel; every `every` k steps, one cache line of
 * the next panel is prefetched from pf (NULL: none). */
static inline __attribute__((always_inline)) void tile(
        const int r, const float* x, long ldx, const float* p, long k,
        const float* bias, float* y, long ldy, long cols, const float* pf, long every) {
    __m256 a0[MAXR], a1[MAXR];
    for (int i = 0; i < r; i++) { a0[i] = _mm256_setzero_ps(); a1[i] = _mm256_setzero_ps(); }
    long count = 0;
    for (long kk = 0; kk < k; kk++) {
        if (pf && ++count == every) { _mm_prefetch((const char*)pf, _MM_HINT_T0); pf += PANEL; count = 0; }
        const __m256 w0 = _mm256_load_ps(p + kk * PANEL);
        const __m256 w1 = _mm256_load_ps(p + kk * PANEL + 8);
        for (int i = 0; i < r; i++) {
            const __m256 xb = _mm256_broadcast_ss(x + i * ldx + kk);
            a0[i] = _mm256_fmadd_ps(xb, w0, a0[i]);
            a1[i] = _mm256_fmadd_ps(xb, w1, a1[i]);
        }
    }
    for (int i = 0; i < r; i++) store16(a0[i], a1[i], bias, y + i * ldy, cols);
}

/* One row: four k-phases, so the FMA chains do not wait on each other. */
static inline void tile_one_row(const float* x, const float* p, long k, const float* bias,
                                float* y, long cols) {
    __m256 a[8];
    for (int i = 0; i < 8; i++) a[i] = _mm256_setzero_ps();
    long kk = 0;
    for (; kk + 4 <= k; kk += 4) {
        for (int u = 0; u < 4; u++) {
            const __m256 xb = _mm256_broadcast_ss(x + kk + u);
            a[2 * u] = _mm256_fmadd_ps(xb, _mm256_load_ps(p + (kk + u) * PANEL), a[2 * u]);
            a[2 * u + 1] =
                _mm256_fmadd_ps(xb, _mm256_load_ps(p + (kk + u) * PANEL + 8), a[2 * u + 1]);
        }
    }
    for (; kk < k; kk++) {
        const __m256 xb = _mm256_broadcast_ss(x + kk);
        a[0] = _mm256_fmadd_ps(xb, _mm256_load_ps(p + kk * PANEL), a[0]);
        a[1] = _mm256_fmadd_ps(xb, _mm256_load_ps(p + kk * PANEL + 8), a[1]);
    }
    __m256 s0 = _mm256_add_ps(_mm256_add_ps(a[0], a[2]), _mm256_add_ps(a[4], a[6]));
    __m256 s1 = _mm256_add_ps(_mm256_add_ps(a[1], a[3]), _mm256_add_ps(a[5], a[7]));
    store16(s0, s1, bias, y, cols);
}

#define TILE(R)                                                     \
    tile(R, xi, ldx, pj, k, bj, yi, ldy, cols, pf, every);          \
    if (pf) pf += (k / every) * PANEL

/* rows rows of x against panel pj, in tiles of MAXR rows. */
static inline __attribute__((always_inline)) void panel_rows(
        const float* x, long ldx, const float* pj, const float* bj, float* y, long ldy,
        long rows, long k, long cols, const float* pf, long every) {
    long i = 0;
    for (; i + MAXR <= rows; i += MAXR) {
        const float* xi = x + i * ldx;
        float* yi = y + i * ldy;
        TILE(MAXR);
    }
    const float* xi = x + i * ldx;
    float* yi = y + i * ldy;
    switch (rows - i) {
        case 5: TILE(5); break;
        case 4: TILE(4); break;
        case 3: TILE(3); break;
        case 2: TILE(2); break;
        case 1: TILE(1); break;
        default: break;
    }
}

/* x: rows of k floats, ldx apart; y: rows of n floats, ldy apart; p: sb_pack's output for
 * this n and k, 32-byte aligned (its loads are aligned); bias: NULL or ceil(n / PANEL) *
 * PANEL floats (zero-padded). Nothing here checks them: the Python wrapper does. */
void sb_gemm(const float* x, long ldx, const float* p, const float* bias, float* y,
             long ldy, long m, long n, long k, int threads) {
    const long panels = (n + PANEL - 1) / PANEL;
    for (long i0 = 0; i0 < m; i0 += ROW_BLOCK) {
        const long rows = m - i0 < ROW_BLOCK ? m - i0 : ROW_BLOCK;
        #pragma omp parallel for schedule(static) num_threads(threads)
        for (long j = 0; j < panels; j++) {
            const float* pj = p + j * k * PANEL;
            const float* bj = bias ? bias + j * PANEL : 0;
            const long cols = n - j * PANEL < PANEL ? n - j * PANEL : PANEL;
            if (rows == 1) {
                tile_one_row(x + i0 * ldx, pj, k, bj, y + i0 * ldy + j * PANEL, cols);
                continue;
            }
            /* A panel's first tile would wait on memory while the others run from cache;
             * with 2-4 tiles, all of them prefetch the next panel (one cache line per
             * k row), spread evenly, so memory and compute overlap: 1.3x at 16 rows.
             * One tile streams (hardware prefetch suffices); with more, compute rules,
             * and the code without the prefetch (NULL folded in) runs faster. */
            const long tiles = (rows + MAXR - 1) / MAXR;
            const float* xi = x + i0 * ldx;
            float* yi = y + i0 * ldy + j * PANEL;
            if (tiles > 1 && tiles <= 4 && j + 1 < panels)
                panel_rows(xi, ldx, pj, bj, yi, ldy, rows, k, cols, pj + k * PANEL, tiles);
            else
                panel_rows(xi, ldx, pj, bj, yi, ldy, rows, k, cols, 0, 1);
        }
    }
}
