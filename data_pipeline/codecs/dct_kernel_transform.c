/* Part of the sparse DCT codec's kernel: see _dct_kernel.c. */
#include "dct_kernel.h"
#ifdef __SSE2__
#include <emmintrin.h>
#endif

/* JPEG zigzag -> natural (row-major) index, libjpeg's jpeg_natural_order. */
static const int NATURAL[64] = {
    0,  1,  8,  16, 9,  2,  3,  10, 17, 24, 32, 25, 18, 11, 4,  5,  12, 19, 26, 33, 40, 48,
    41, 34, 27, 20, 13, 6,  7,  14, 21, 28, 35, 42, 49, 56, 57, 50, 43, 36, 29, 22, 15, 23,
    30, 37, 44, 51, 58, 59, 52, 45, 38, 31, 39, 46, 53, 60, 61, 54, 47, 55, 62, 63};

/* A macroblock's coefficients in kernel order: block (slot) after block, each transposed (index 8v + u);
 * dctk_mb_index[channel] is where channel 6z + slot is. Reordering happens where a group is copied to or from the
 * channel-major image, which touches every value once anyway. */
int dctk_mb_index[NCH];

void dctk_init_mb_index(void)
{
    for (int c = 0; c < NCH; c++) dctk_mb_index[c] = (c % 6) * 64 + (NATURAL[c / 6] % 8) * 8 + NATURAL[c / 6] / 8;
}

/* out = basis @ in, rows of 8 as vectors, by the basis's symmetry: row k is even (k even) or odd (k odd) about
 * its middle, so output k is a 4-term sum of in[i] + in[7 - i] or in[i] - in[7 - i]; rows 0 and 4 are +-1, so
 * their sums of integers are exact. The SSE2 and the scalar code do the same operations in the same order. */
static void dct_rows(const float *basis, const float *in, float *out)
{
#ifdef __SSE2__
    for (int h = 0; h < 8; h += 4) {
        __m128 sum[4], diff[4];
        for (int i = 0; i < 4; i++) {
            __m128 a = _mm_loadu_ps(in + i * 8 + h), b = _mm_loadu_ps(in + (7 - i) * 8 + h);
            sum[i] = _mm_add_ps(a, b);
            diff[i] = _mm_sub_ps(a, b);
        }
        for (int k = 0; k < 8; k++) {
            const __m128 *src = k & 1 ? diff : sum;
            const float *b = basis + k * 8;
            __m128 acc = _mm_mul_ps(_mm_set1_ps(b[0]), src[0]);
            for (int i = 1; i < 4; i++) acc = _mm_add_ps(acc, _mm_mul_ps(_mm_set1_ps(b[i]), src[i]));
            _mm_storeu_ps(out + k * 8 + h, acc);
        }
    }
#else
    float sum[4][8], diff[4][8];
    for (int i = 0; i < 4; i++)
        for (int x = 0; x < 8; x++) {
            sum[i][x] = in[i * 8 + x] + in[(7 - i) * 8 + x];
            diff[i][x] = in[i * 8 + x] - in[(7 - i) * 8 + x];
        }
    for (int k = 0; k < 8; k++) {
        const float(*src)[8] = k & 1 ? diff : sum;
        const float *b = basis + k * 8;
        for (int x = 0; x < 8; x++)
            out[k * 8 + x] = ((b[0] * src[0][x] + b[1] * src[1][x]) + b[2] * src[2][x]) + b[3] * src[3][x];
    }
#endif
}

/* out = basis^T @ in: out[i] = even + odd and out[7 - i] = even - odd, the even and odd frequencies' parts. */
static void idct_rows(const float *basis, const float *in, float *out)
{
#ifdef __SSE2__
    for (int h = 0; h < 8; h += 4) {
        __m128 row[8];
        for (int k = 0; k < 8; k++) row[k] = _mm_loadu_ps(in + k * 8 + h);
        for (int i = 0; i < 4; i++) {
            __m128 even = _mm_mul_ps(_mm_set1_ps(basis[i]), row[0]);
            __m128 odd = _mm_mul_ps(_mm_set1_ps(basis[8 + i]), row[1]);
            for (int k = 2; k < 8; k += 2) {
                even = _mm_add_ps(even, _mm_mul_ps(_mm_set1_ps(basis[k * 8 + i]), row[k]));
                odd = _mm_add_ps(odd, _mm_mul_ps(_mm_set1_ps(basis[(k + 1) * 8 + i]), row[k + 1]));
            }
            _mm_storeu_ps(out + i * 8 + h, _mm_add_ps(even, odd));
            _mm_storeu_ps(out + (7 - i) * 8 + h, _mm_sub_ps(even, odd));
        }
    }
#else
    for (int i = 0; i < 4; i++)
        for (int x = 0; x < 8; x++) {
            float even = ((basis[i] * in[x] + basis[16 + i] * in[16 + x]) + basis[32 + i] * in[32 + x]) +
                         basis[48 + i] * in[48 + x];
            float odd = ((basis[8 + i] * in[8 + x] + basis[24 + i] * in[24 + x]) + basis[40 + i] * in[40 + x]) +
                        basis[56 + i] * in[56 + x];
            out[i * 8 + x] = even + odd;
            out[(7 - i) * 8 + x] = even - odd;
        }
#endif
}

static void transpose8(const float *in, float *out)
{
#ifdef __SSE2__
    for (int bi = 0; bi < 8; bi += 4)
        for (int bj = 0; bj < 8; bj += 4) {
            __m128 r0 = _mm_loadu_ps(in + bi * 8 + bj), r1 = _mm_loadu_ps(in + (bi + 1) * 8 + bj);
            __m128 r2 = _mm_loadu_ps(in + (bi + 2) * 8 + bj), r3 = _mm_loadu_ps(in + (bi + 3) * 8 + bj);
            _MM_TRANSPOSE4_PS(r0, r1, r2, r3);
            _mm_storeu_ps(out + bj * 8 + bi, r0);
            _mm_storeu_ps(out + (bj + 1) * 8 + bi, r1);
            _mm_storeu_ps(out + (bj + 2) * 8 + bi, r2);
            _mm_storeu_ps(out + (bj + 3) * 8 + bi, r3);
        }
#else
    for (int i = 0; i < 8; i++)
        for (int j = 0; j < 8; j++) out[j * 8 + i] = in[i * 8 + j];
#endif
}

/* Samples X -> (B X B^T)^T: the coefficients transposed (index 8v + u), which is the kernel's block order. */
void dctk_forward_dct(const float *in, const Tables *t, float *out)
{
    float tmp[64], tmp_t[64];
    dct_rows(t->basis, in, tmp);
    transpose8(tmp, tmp_t);
    dct_rows(t->basis, tmp_t, out);
}

/* Transposed coefficients C^T -> samples B^T C B = B^T (B^T C^T)^T. */
void dctk_inverse_dct(const float *in, const Tables *t, float *out)
{
    float tmp[64], tmp_t[64];
    idct_rows(t->basis, in, tmp);
    transpose8(tmp, tmp_t);
    idct_rows(t->basis, tmp_t, out);
}
