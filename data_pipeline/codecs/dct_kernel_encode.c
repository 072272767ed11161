/* Part of the sparse DCT codec's kernel: see _dct_kernel.c. */
#include <stdint.h>
#include <string.h>

#include "dct_kernel.h"
#ifdef __SSE2__
#include <emmintrin.h>
#endif

#define ROUND_MAGIC 12582912.0f /* 1.5 * 2^23: (x + M) - M is x rounded to nearest, ties to even (|x| < 2^22) */

static inline float round_even(float x) { return (x + ROUND_MAGIC) - ROUND_MAGIC; }

/* One block's DCT, quantised, in kernel (transposed) order. */
static void quantise_block(const float *samples, const Tables *t, const float *div, int16_t *out)
{
    float coef[64];
    dctk_forward_dct(samples, t, coef);
    for (int i = 0; i < 64; i++) out[i] = (int16_t)(int)round_even(coef[i] / div[i]);
}

/* 16 interleaved RGB pixels -> three float planes. GCC vectorises the plain loop by assembling vectors through
 * the stack (store-forwarding stalls), so SSE2 converts whole registers and deinterleaves with shuffles. */
static void load_rgb16(const uint8_t *p, float *r, float *g, float *b)
{
#ifdef __SSE2__
    const __m128i zero = _mm_setzero_si128();
    __m128 f[12];
    for (int i = 0; i < 3; i++) {
        __m128i bytes = _mm_loadu_si128((const __m128i *)(p + 16 * i));
        __m128i lo = _mm_unpacklo_epi8(bytes, zero), hi = _mm_unpackhi_epi8(bytes, zero);
        f[4 * i] = _mm_cvtepi32_ps(_mm_unpacklo_epi16(lo, zero));
        f[4 * i + 1] = _mm_cvtepi32_ps(_mm_unpackhi_epi16(lo, zero));
        f[4 * i + 2] = _mm_cvtepi32_ps(_mm_unpacklo_epi16(hi, zero));
        f[4 * i + 3] = _mm_cvtepi32_ps(_mm_unpackhi_epi16(hi, zero));
    }
    for (int k = 0; k < 4; k++) { /* f0 = r0 g0 b0 r1, f1 = g1 b1 r2 g2, f2 = b2 r3 g3 b3 */
        __m128 f0 = f[3 * k], f1 = f[3 * k + 1], f2 = f[3 * k + 2];
        __m128 a = _mm_shuffle_ps(f1, f2, _MM_SHUFFLE(1, 0, 3, 2));
        _mm_storeu_ps(r + 4 * k, _mm_shuffle_ps(f0, a, _MM_SHUFFLE(3, 0, 3, 0)));
        __m128 g0 = _mm_shuffle_ps(f0, f1, _MM_SHUFFLE(0, 0, 1, 1));
        __m128 g1 = _mm_shuffle_ps(f1, f2, _MM_SHUFFLE(2, 2, 3, 3));
        _mm_storeu_ps(g + 4 * k, _mm_shuffle_ps(g0, g1, _MM_SHUFFLE(2, 0, 2, 0)));
        __m128 b0 = _mm_shuffle_ps(f0, f1, _MM_SHUFFLE(1, 1, 2, 2));
        __m128 b1 = _mm_shuffle_ps(f2, f2, _MM_SHUFFLE(3, 3, 0, 0));
        _mm_storeu_ps(b + 4 * k, _mm_shuffle_ps(b0, b1, _MM_SHUFFLE(2, 0, 2, 0)));
    }
#else
    for (int x = 0; x < 16; x++) {
        r[x] = p[3 * x];
        g[x] = p[3 * x + 1];
        b[x] = p[3 * x + 2];
    }
#endif
}

/* The macroblock whose top left pixel is img -> its 384 quantised coefficients in kernel order. */
static void encode_macroblock(const uint8_t *img, ptrdiff_t width, const Tables *t, int16_t *mb)
{
    float luma[4][64], chroma[2][64];
    float sums[2][64];
    const float *m = t->rgb_to_ycc;
    static const int32_t rounding[3] = {32768, 32767, 32767}; /* libjpeg: luma ties up, chroma ties down */
    for (int y = 0; y < 16; y++) {
        const uint8_t *row = img + (ptrdiff_t)y * width * 3;
        float r[16], g[16], b[16], ycc[3][16];
        load_rgb16(row, r, g, b);
        for (int c = 0; c < 3; c++)
            for (int x = 0; x < 16; x++)
                ycc[c][x] = (float)(((int32_t)(r[x] * m[3 * c] + g[x] * m[3 * c + 1] + b[x] * m[3 * c + 2]) +
                                     rounding[c]) >> 16); /* exact integer sums; >> is libjpeg's floor */
        float *l0 = luma[(y >> 3) * 2] + (y & 7) * 8, *l1 = luma[(y >> 3) * 2 + 1] + (y & 7) * 8;
        for (int x = 0; x < 8; x++) {
            l0[x] = ycc[0][x] - 128.0f;
            l1[x] = ycc[0][x + 8] - 128.0f;
        }
        for (int c = 0; c < 2; c++) {
            float pairs[8];
            for (int x = 0; x < 8; x++) pairs[x] = ycc[c + 1][2 * x] + ycc[c + 1][2 * x + 1];
            float *s = sums[c] + (y >> 1) * 8;
            if (y & 1)
                for (int x = 0; x < 8; x++) s[x] += pairs[x];
            else
                for (int x = 0; x < 8; x++) s[x] = pairs[x];
        }
    }
    memcpy(chroma, sums, sizeof(chroma));
    for (int s = 0; s < 4; s++) quantise_block(luma[s], t, t->luma_div, mb + 64 * s);
    for (int c = 0; c < 2; c++) quantise_block(chroma[c], t, t->chroma_div, mb + 64 * (4 + c));
}

/* One image -> its channel-major quantised DCT image [384][P]; returns the number of non-zero values. */
int64_t dctk_encode_image(const uint8_t *img, ptrdiff_t width, ptrdiff_t positions, const Tables *t,
                            int16_t *dst)
{
    int16_t group[GROUP][NCH];
    ptrdiff_t mw = width / 16;
    int64_t nonzero = 0;
    for (ptrdiff_t p0 = 0; p0 < positions; p0 += GROUP) {
        int n = positions - p0 < GROUP ? (int)(positions - p0) : GROUP;
        for (int j = 0; j < n; j++) {
            ptrdiff_t p = p0 + j;
            encode_macroblock(img + ((p / mw) * 16 * width + (p % mw) * 16) * 3, width, t, group[j]);
        }
        for (int c = 0; c < NCH; c++) {
            int16_t *out = dst + c * positions + p0;
            int k = dctk_mb_index[c];
            for (int j = 0; j < n; j++) {
                out[j] = group[j][k];
                nonzero += group[j][k] != 0;
            }
        }
    }
    return nonzero;
}

/* Channel-major coefficients of one image -> token rows (channel, position, value token); returns the count,
 * or capacity + 1 where there are more non-zeros than that. Runs of eight zeros are skipped with two 64-bit
 * tests; other values are handled without branches: each writes a row at out[n] and only a non-zero one advances
 * n (so a row may be written at out[capacity], the caller's EOS row, which it fills afterwards). */
#define SPARSIFY_IMAGE(T)                                                                                       \
    ptrdiff_t dctk_sparsify_image_##T(const int16_t *src, ptrdiff_t positions, int range, T *out,         \
                                         ptrdiff_t capacity, int64_t *clipped)                                 \
    {                                                                                                           \
        ptrdiff_t n = 0;                                                                                       \
        int64_t clips = 0;                                                                                      \
        for (int c = 0; c < NCH; c++) {                                                                         \
            const int16_t *row = src + (ptrdiff_t)c * positions;                                               \
            for (ptrdiff_t p0 = 0; p0 < positions; p0 += 8) {                                                  \
                int end = positions - p0 < 8 ? (int)(positions - p0) : 8;                                       \
                if (end == 8) {                                                                                 \
                    uint64_t w[2];                                                                              \
                    memcpy(w, row + p0, sizeof(w));                                                             \
                    if ((w[0] | w[1]) == 0) continue;                                                           \
                }                                                                                               \
                for (int j = 0; j < end; j++) {                                                                 \
                    int v = row[p0 + j];                                                                        \
                    int clip = v < -range ? -range : v > range ? range : v;                                     \
                    T *dst = out + 3 * n;                                                                       \
                    dst[0] = (T)c;                                                                              \
                    dst[1] = (T)(p0 + j);                                                                       \
                    dst[2] = (T)(clip + range - (clip > 0));                                                    \
                    clips += clip != v;                                                                         \
                    n += v != 0;                                                                                \
                    if (n > capacity) return capacity + 1;                                                      \
                }                                                                                               \
            }                                                                                                   \
        }                                                                                                       \
        *clipped = clips;                                                                                       \
        return n;                                                                                               \
    }
SPARSIFY_IMAGE(int16_t)
SPARSIFY_IMAGE(int32_t)

int64_t dctk_count_image(const int16_t *src, ptrdiff_t count)
{
    int64_t n = 0;
    for (ptrdiff_t i = 0; i < count; i++) n += src[i] != 0;
    return n;
}
