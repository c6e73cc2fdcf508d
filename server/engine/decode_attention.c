/* Decode attention on the CPU: one query token per row, AVX2 + FMA, fp32.
 *
 * Built with skinny_gemm.c into one library by server/engine/cpu_kernels.py. Why: at a
 * decode step each row attends over its own cached keys with a few query heads per KV
 * head; torch's CPU SDPA (flash kernel) spends 0.2 ms per layer at 16 rows and 0.7-1.3 ms
 * at 64 on this machine for what is a few MB of K and V to read (docs/benchmarks.md).
 * Here each (row, KV head) is one task: its `group` query heads read each cached key
 * and value once, in three passes over the row's own length (scores and max; exp and
 * sum; the weighted sum of values), no mask needed: key l is visible iff l < length.
 *
 * q:      q[b * q_row + (h * group + g) * hd + d]   (query head h * group + g)
 * keys:   keys[kv_rows[b] * row_stride + h * head_stride + l * hd + d], same for values
 * out:    out[(b * kv_heads + h) * group * hd + g * hd + d]   ([B, heads, hd] contiguous)
 */
#include <immintrin.h>
#include <math.h>
#include <stdlib.h>

/* e^x for x <= 0 (scores minus their max), 8 at a time: x = n ln2 + r, |r| <= ln2 / 2,
 * e^r by a degree-6 polynomial (Cephes expf), 2^n through the exponent bits. Relative
 * error ~1e-7, as libm's; inputs below -87 give ~0 (e^-87 ~ 1.6e-38). NaN gives NaN, as
 * expf does in the scalar tail: maxps returns its second operand when either is NaN, so x
 * goes second (the other order turned a NaN score into a weight of ~0 in the vector part
 * only). */
static inline __m256 exp_neg(__m256 x) {
    x = _mm256_max_ps(_mm256_set1_ps(-87.0f), x);
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    const __m256i e = _mm256_slli_epi32(
        _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

static inline float hsum(__m256 v) {
    const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps(t, t, 0x55)));
}

/* Returns 0; -1 if a scratch buffer could not be allocated; -2 if a length is outside
 * 0..max_length (the scratch rows' size), -3 if a row is outside 0..cache_rows - 1 (checked
 * first: B compares, where the Python caller would have to read both tensors). Nothing is
 * written unless it returns 0. The caller checks the rest: group <= 16, hd a multiple of
 * 8, max_length within the cache. */
int sb_decode_attention(const float* q, long q_row, const float* keys, const float* values,
                        const long* kv_rows, const long* lengths, float* out, long batch,
                        long kv_heads, long group, long hd, long row_stride,
                        long head_stride, long cache_rows, long max_length, float scale,
                        int threads) {
    for (long b = 0; b < batch; b++) {
        if (lengths[b] < 0 || lengths[b] > max_length) return -2;
        if (kv_rows[b] < 0 || kv_rows[b] >= cache_rows) return -3;
    }
    int failed = 0;
    #pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        float* scores = malloc(sizeof(float) * (size_t)(group * max_length + group * hd));
        if (!scores) failed = 1;
        #pragma omp for schedule(static) collapse(2)
        for (long b = 0; b < batch; b++) {
            for (long h = 0; h < kv_heads; h++) {
                if (!scores) continue;
                float* acc = scores + group * max_length;
                const long length = lengths[b];
                const float* kb = keys + kv_rows[b] * row_stride + h * head_stride;
                const float* vb = values + kv_rows[b] * row_stride + h * head_stride;
                const float* qb = q + b * q_row + h * group * hd;
                float* ob = out + (b * kv_heads + h) * group * hd;
                float best[16], total[16];
                for (long g = 0; g < group; g++) best[g] = -INFINITY;
                for (long l = 0; l < length; l++) {
                    const float* kr = kb + l * hd;
                    for (long g = 0; g < group; g++) {
                        __m256 s = _mm256_setzero_ps();
                        for (long d = 0; d < hd; d += 8)
                            s = _mm256_fmadd_ps(_mm256_loadu_ps(qb + g * hd + d),
                                                _mm256_loadu_ps(kr + d), s);
                        const float v = hsum(s) * scale;
                        scores[g * max_length + l] = v;
                        if (v > best[g]) best[g] = v;
                    }
                }
                for (long g = 0; g < group; g++) {
                    float* row = scores + g * max_length;
                    const __m256 top = _mm256_set1_ps(best[g]);
                    __m256 sums = _mm256_setzero_ps();
                    long l = 0;
                    for (; l + 8 <= length; l += 8) {
                        const __m256 e = exp_neg(_mm256_sub_ps(_mm256_loadu_ps(row + l), top));
                        _mm256_storeu_ps(row + l, e);
                        sums = _mm256_add_ps(sums, e);
                    }
                    float sum = hsum(sums);
                    for (; l < length; l++) {
                        row[l] = expf(row[l] - best[g]);
                        sum += row[l];
                    }
                    total[g] = sum;
                }
                for (long i = 0; i < group * hd; i++) acc[i] = 0.0f;
                for (long l = 0; l < length; l++) {
                    const float* vr = vb + l * hd;
                    for (long g = 0; g < group; g++) {
                        const __m256 p = _mm256_set1_ps(scores[g * max_length + l]);
                        float* a = acc + g * hd;
                        for (long d = 0; d < hd; d += 8)
                            _mm256_storeu_ps(a + d, _mm256_fmadd_ps(p, _mm256_loadu_ps(vr + d),
                                                                    _mm256_loadu_ps(a + d)));
                    }
                }
                for (long g = 0; g < group; g++) {
                    const float inv = 1.0f / total[g];
                    for (long d = 0; d < hd; d++) ob[g * hd + d] = acc[g * hd + d] * inv;
                }
            }
        }
        free(scores);
    }
    return failed ? -1 : 0;
}
