/* Compiled kernels of the sparse DCT codec: a macroblock's whole path (colour, 4:2:0, 8x8 DCT, quantise) in
 * registers and L1, instead of numpy's ~15 passes over megabyte buffers. dct_transform.py is the reference: these
 * loops compute the same steps (see its docstring) and tests/test_dct_kernel.py compares the two.
 *
 * Portable C11 for baseline x86-64 (SSE2): every hot loop has a fixed 8- or 16-wide float32 inner loop that GCC
 * vectorises at -O3; no intrinsics, no -march. Built with -ffp-contract=off so that no multiply-add is fused on
 * targets that have FMA: the colour conversion and the fancy upsampling then give the same float32 bits as
 * numpy's elementwise operations do.
 *
 * Numerics: the 1-D DCT basis is scaled by sqrt(8), so its rows 0 and 4 are exactly +-1 and the DC, (0,4), (4,0)
 * and (4,4) coefficients of integer samples are exact sums; the scale 1/8 and the quantiser are one float32
 * division, which keeps their exact .5 ties exact (rounded to even, like np.rint). Other coefficients round in
 * float32 like the numpy GEMMs, in another order, so a near-tie can round the other way (rare; tests bound it).
 *
 * Python API (buffers are checked for size; dtypes and shapes are the caller's contract, see dct_transform.py):
 *   encode_dense(images u8 [B,H,W,3], tables f32 [205], out i16 [B,384,P], counts i64 [B])
 *   count_nonzero(dense i16 [B,384,P], counts i64 [B])
 *   sparsify(dense i16 [B,384,P], out i16|i32 [n+B,3], clipped i64 [B], value_range, positions)
 *   decode_dense(dense i16 [B,384,P], tables f32 [205], out u8 [B,H,W,3], fancy)
 *   decode_tokens(list of i16|i32 [n_i,3], tables f32 [205], out u8 [B,H,W,3], fancy, value_range)
 *       -> None, or (image, row) of the first row with an out-of-range token
 * tables: float32 [205], the Tables struct below, built by dct_transform.kernel_tables. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __SSE2__
#include <emmintrin.h>
#endif

#define NCH 384
#define ROUND_MAGIC 12582912.0f /* 1.5 * 2^23: (x + M) - M is x rounded to nearest, ties to even (|x| < 2^22) */

/* JPEG zigzag -> natural (row-major) index, libjpeg's jpeg_natural_order. */
static const int NATURAL[64] = {
    0,  1,  8,  16, 9,  2,  3,  10, 17, 24, 32, 25, 18, 11, 4,  5,  12, 19, 26, 33, 40, 48,
    41, 34, 27, 20, 13, 6,  7,  14, 21, 28, 35, 42, 49, 56, 57, 50, 43, 36, 29, 22, 15, 23,
    30, 37, 44, 51, 58, 59, 52, 45, 38, 31, 39, 46, 53, 60, 61, 54, 47, 55, 62, 63};

/* Everything numeric comes from Python (dct_transform.kernel_tables), so both paths use the same float32s. */
typedef struct {
    float basis[64];      /* basis[u * 8 + x]: sqrt(8) * orthonormal DCT-II */
    float luma_div[64];   /* 8 * luma table, transposed (index 8v + u): scaled DCT / this = quantised value */
    float chroma_div[64]; /* 32 * chroma table, transposed: the chroma input is a 2x2 sum, not the mean */
    float rgb_to_ycc[9];  /* JFIF: [Y, Cb - 128, Cr - 128] = M @ [R, G, B] */
    float ycc_to_rgb[4];  /* JFIF inverse's non-trivial entries: R: Cr, G: Cb, Cr, B: Cb */
} Tables;

static inline float round_even(float x) { return (x + ROUND_MAGIC) - ROUND_MAGIC; }

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
static void forward_dct(const float *in, const Tables *t, float *out)
{
    float tmp[64], tmp_t[64];
    dct_rows(t->basis, in, tmp);
    transpose8(tmp, tmp_t);
    dct_rows(t->basis, tmp_t, out);
}

/* Transposed coefficients C^T -> samples B^T C B = B^T (B^T C^T)^T. */
static void inverse_dct(const float *in, const Tables *t, float *out)
{
    float tmp[64], tmp_t[64];
    idct_rows(t->basis, in, tmp);
    transpose8(tmp, tmp_t);
    idct_rows(t->basis, tmp_t, out);
}

/* A macroblock's coefficients in kernel order: block (slot) after block, each transposed (index 8v + u);
 * MB_INDEX[channel] is where channel 6z + slot is. Reordering happens where a group is copied to or from the
 * channel-major image, which touches every value once anyway. */
static int MB_INDEX[NCH];

static void init_mb_index(void)
{
    for (int c = 0; c < NCH; c++) MB_INDEX[c] = (c % 6) * 64 + (NATURAL[c / 6] % 8) * 8 + NATURAL[c / 6] / 8;
}

/* One block's DCT, quantised, in kernel (transposed) order. */
static void quantise_block(const float *samples, const Tables *t, const float *div, int16_t *out)
{
    float coef[64];
    forward_dct(samples, t, coef);
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
        __m128 g0 = _mm_shuffle_ps(f0, f1, _MM_SHUFFLE(0, 0, 1, 1)), g1 = _mm_shuffle_ps(f1, f2, _MM_SHUFFLE(2, 2, 3, 3));
        _mm_storeu_ps(g + 4 * k, _mm_shuffle_ps(g0, g1, _MM_SHUFFLE(2, 0, 2, 0)));
        __m128 b0 = _mm_shuffle_ps(f0, f1, _MM_SHUFFLE(1, 1, 2, 2)), b1 = _mm_shuffle_ps(f2, f2, _MM_SHUFFLE(3, 3, 0, 0));
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
static void encode_macroblock(const uint8_t *img, Py_ssize_t width, const Tables *t, int16_t *mb)
{
    float luma[4][64], chroma[2][64];
    float sums[2][64];
    const float *m = t->rgb_to_ycc;
    for (int y = 0; y < 16; y++) {
        const uint8_t *row = img + (Py_ssize_t)y * width * 3;
        float r[16], g[16], b[16], ycc[3][16];
        load_rgb16(row, r, g, b);
        for (int c = 0; c < 3; c++)
            for (int x = 0; x < 16; x++)
                ycc[c][x] = round_even(r[x] * m[3 * c] + g[x] * m[3 * c + 1] + b[x] * m[3 * c + 2]);
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

/* Macroblocks are encoded and decoded GROUP positions at a time through a position-major buffer, so that the
 * channel-major image is read and written in runs of GROUP values: one value per channel (384 lines 2 * P bytes
 * apart) would thrash L1's sets. */
#define GROUP 16

/* One image -> its channel-major quantised DCT image [384][P]; returns the number of non-zero values. */
static int64_t encode_image(const uint8_t *img, Py_ssize_t width, Py_ssize_t positions, const Tables *t,
                            int16_t *dst)
{
    int16_t group[GROUP][NCH];
    Py_ssize_t mw = width / 16;
    int64_t nonzero = 0;
    for (Py_ssize_t p0 = 0; p0 < positions; p0 += GROUP) {
        int n = positions - p0 < GROUP ? (int)(positions - p0) : GROUP;
        for (int j = 0; j < n; j++) {
            Py_ssize_t p = p0 + j;
            encode_macroblock(img + ((p / mw) * 16 * width + (p % mw) * 16) * 3, width, t, group[j]);
        }
        for (int c = 0; c < NCH; c++) {
            int16_t *out = dst + c * positions + p0;
            int k = MB_INDEX[c];
            for (int j = 0; j < n; j++) {
                out[j] = group[j][k];
                nonzero += group[j][k] != 0;
            }
        }
    }
    return nonzero;
}

/* ------------------------------------------------------------------------------------------------ decode */

typedef struct {
    Py_ssize_t height, width; /* pixels */
    float *luma;              /* [height][width], clamped, + 128.5 (the +0.5 makes the final truncation round) */
    float *chroma;            /* [2][height/2][width/2], clamped to -128..127 */
    float *wide;              /* [2][3][width]: a ring of three horizontally upsampled rows per chroma plane */
    float *full;              /* [2][width]: one output row of Cb and Cr */
} DecodeWork;

/* A macroblock's 384 coefficients (kernel order) -> its clamped samples in the planes at (my, mx). */
static void decode_macroblock(const int16_t *mb, const Tables *t, DecodeWork *w, Py_ssize_t my, Py_ssize_t mx)
{
    for (int slot = 0; slot < 6; slot++) {
        float coef[64], px[64];
        const float *div = slot < 4 ? t->luma_div : t->chroma_div;
        /* dequantise: value * table, with the IDCT's 1/8 (and for chroma the 1/4 of the encoder's sum) undone */
        const float scale = slot < 4 ? 1.0f / 64.0f : 1.0f / 256.0f;
        for (int n = 0; n < 64; n++) coef[n] = (float)mb[64 * slot + n] * (div[n] * scale);
        inverse_dct(coef, t, px);
        if (slot < 4) {
            float *dst = w->luma + (my * 16 + (slot >> 1) * 8) * w->width + mx * 16 + (slot & 1) * 8;
            for (int y = 0; y < 8; y++)
                for (int x = 0; x < 8; x++) {
                    float v = px[y * 8 + x] + 128.5f;
                    v = v < 0.5f ? 0.5f : v;
                    dst[y * w->width + x] = v > 255.5f ? 255.5f : v;
                }
        } else {
            Py_ssize_t cw = w->width / 2;
            float *dst = w->chroma + (slot - 4) * (w->height / 2) * cw + my * 8 * cw + mx * 8;
            for (int y = 0; y < 8; y++)
                for (int x = 0; x < 8; x++) {
                    float v = px[y * 8 + x];
                    v = v < -128.0f ? -128.0f : v;
                    dst[y * cw + x] = v > 127.0f ? 127.0f : v;
                }
        }
    }
}

/* Chroma row i -> 2 * cw samples: libjpeg's triangle filter (fancy) or replication, as numpy's _fancy_axis. */
static void upsample_row(const float *a, Py_ssize_t cw, int fancy, float *out)
{
    if (!fancy) {
        for (Py_ssize_t j = 0; j < cw; j++) out[2 * j] = out[2 * j + 1] = a[j];
        return;
    }
    out[0] = a[0];
    out[2 * cw - 1] = a[cw - 1];
    for (Py_ssize_t j = 0; j + 1 < cw; j++) {
        float d = (a[j + 1] - a[j]) * 0.25f;
        out[2 * j + 1] = a[j] + d;
        out[2 * j + 2] = a[j + 1] - d;
    }
}

/* Output row y of one chroma plane from the wide rows prev/cur/next (vertical pass of the same filter). */
static void vertical_row(const float *prev, const float *cur, const float *next, Py_ssize_t width, int odd,
                         int edge, int fancy, float *out)
{
    if (!fancy || edge) {
        memcpy(out, cur, (size_t)width * sizeof(float));
    } else if (odd) {
        for (Py_ssize_t x = 0; x < width; x++) out[x] = cur[x] + (next[x] - cur[x]) * 0.25f;
    } else {
        for (Py_ssize_t x = 0; x < width; x++) out[x] = cur[x] - (cur[x] - prev[x]) * 0.25f;
    }
}

/* Wide (horizontally upsampled) row r of chroma plane c, in the ring of three. */
static float *wide_row(DecodeWork *w, int c, Py_ssize_t r) { return w->wide + (c * 3 + r % 3) * w->width; }

/* The sample planes -> interleaved uint8 RGB, one output row at a time; each chroma row is widened once. */
static void planes_to_rgb(DecodeWork *w, const float *m, int fancy, uint8_t *out)
{
    Py_ssize_t width = w->width, cw = width / 2, ch = w->height / 2;
    for (int c = 0; c < 2; c++) upsample_row(w->chroma + c * ch * cw, cw, fancy, wide_row(w, c, 0));
    for (Py_ssize_t y = 0; y < w->height; y++) {
        Py_ssize_t i = y / 2;
        int odd = (int)(y & 1);
        int edge = odd ? i == ch - 1 : i == 0;
        for (int c = 0; c < 2; c++) {
            if (!odd && i + 1 < ch) upsample_row(w->chroma + (c * ch + i + 1) * cw, cw, fancy, wide_row(w, c, i + 1));
            const float *prev = wide_row(w, c, i > 0 ? i - 1 : i), *next = wide_row(w, c, i + 1 < ch ? i + 1 : i);
            vertical_row(prev, wide_row(w, c, i), next, width, odd, edge, fancy, w->full + c * width);
        }
        const float *yy = w->luma + y * width, *cb = w->full, *cr = w->full + width;
        uint8_t *dst = out + y * width * 3;
        for (Py_ssize_t x0 = 0; x0 < width; x0 += 16) {
            float rgb[3][16];
            uint32_t word[16];
            for (int x = 0; x < 16; x++) {
                rgb[0][x] = yy[x0 + x] + m[0] * cr[x0 + x];
                rgb[1][x] = yy[x0 + x] + m[1] * cb[x0 + x] + m[2] * cr[x0 + x];
                rgb[2][x] = yy[x0 + x] + m[3] * cb[x0 + x];
            }
            int32_t level[3][16];
            for (int k = 0; k < 3; k++)
                for (int x = 0; x < 16; x++) {
                    float v = rgb[k][x] < 0.0f ? 0.0f : rgb[k][x];
                    level[k][x] = (int32_t)(v > 255.5f ? 255.5f : v); /* truncates: the +0.5 is in Y */
                }
            for (int x = 0; x < 16; x++) word[x] = (uint32_t)(level[0][x] | level[1][x] << 8 | level[2][x] << 16);
            /* 4-byte stores 3 bytes apart, each overwriting the spare byte of the one before; the last pixel of
             * a row stores 3 bytes so that nothing is written past the image */
            uint8_t *d = dst + x0 * 3;
            for (int x = 0; x < 15; x++) memcpy(d + 3 * x, &word[x], 4);
            if (x0 + 16 < width) {
                memcpy(d + 45, &word[15], 4);
            } else {
                d[45] = (uint8_t)word[15];
                d[46] = (uint8_t)(word[15] >> 8);
                d[47] = (uint8_t)(word[15] >> 16);
            }
        }
    }
}

/* A DCT image, channel-major [384][P] or position-major in kernel order [P][384] -> uint8 RGB. */
static void decode_image(const int16_t *src, int channel_major, const Tables *t, DecodeWork *w, int fancy,
                         uint8_t *out)
{
    Py_ssize_t mw = w->width / 16, positions = mw * (w->height / 16);
    int16_t group[GROUP][NCH];
    for (Py_ssize_t p0 = 0; p0 < positions; p0 += GROUP) {
        int n = positions - p0 < GROUP ? (int)(positions - p0) : GROUP;
        if (channel_major)
            for (int c = 0; c < NCH; c++)
                for (int j = 0; j < n; j++) group[j][MB_INDEX[c]] = src[c * positions + p0 + j];
        for (int j = 0; j < n; j++) {
            Py_ssize_t p = p0 + j;
            decode_macroblock(channel_major ? group[j] : src + p * NCH, t, w, p / mw, p % mw);
        }
    }
    planes_to_rgb(w, t->ycc_to_rgb, fancy, out);
}

static int decode_work_init(DecodeWork *w, Py_ssize_t height, Py_ssize_t width)
{
    w->height = height;
    w->width = width;
    size_t floats = (size_t)(height * width) + (size_t)(height * width) / 2 + 8 * (size_t)width;
    w->luma = malloc(floats * sizeof(float));
    if (!w->luma) return -1;
    w->chroma = w->luma + height * width;
    w->wide = w->chroma + (height * width) / 2;
    w->full = w->wide + 6 * width;
    return 0;
}

/* ---------------------------------------------------------------------------------------------- sparsify */

/* Channel-major coefficients of one image -> token rows (channel, position, value token); returns the count,
 * or capacity + 1 where there are more non-zeros than that. Runs of eight zeros are skipped with two 64-bit
 * tests; other values are handled without branches: each writes a row at out[n] and only a non-zero one advances
 * n (so a row may be written at out[capacity], the caller's EOS row, which it fills afterwards). */
#define SPARSIFY_IMAGE(T)                                                                                       \
    static Py_ssize_t sparsify_image_##T(const int16_t *src, Py_ssize_t positions, int range, T *out,         \
                                         Py_ssize_t capacity, int64_t *clipped)                                 \
    {                                                                                                           \
        Py_ssize_t n = 0;                                                                                       \
        int64_t clips = 0;                                                                                      \
        for (int c = 0; c < NCH; c++) {                                                                         \
            const int16_t *row = src + (Py_ssize_t)c * positions;                                               \
            for (Py_ssize_t p0 = 0; p0 < positions; p0 += 8) {                                                  \
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

static int64_t count_image(const int16_t *src, Py_ssize_t count)
{
    int64_t n = 0;
    for (Py_ssize_t i = 0; i < count; i++) n += src[i] != 0;
    return n;
}

/* ------------------------------------------------------------------------------------------- Python glue */

/* A C-contiguous buffer of exactly `nbytes` bytes (and itemsize `itemsize` when > 0), or a ValueError. */
static int get_buffer(PyObject *obj, Py_buffer *view, int writable, Py_ssize_t itemsize, Py_ssize_t nbytes,
                      const char *name)
{
    int flags = PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0);
    if (PyObject_GetBuffer(obj, view, flags) < 0) return -1;
    if ((itemsize > 0 && view->itemsize != itemsize) || (nbytes >= 0 && view->len != nbytes)) {
        PyErr_Format(PyExc_ValueError, "_dct_kernel: %s has %zd bytes of item size %zd, expected %zd of %zd",
                     name, view->len, view->itemsize, nbytes, itemsize);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

static int check_geometry(Py_ssize_t batch, Py_ssize_t height, Py_ssize_t width)
{
    if (batch < 0 || height <= 0 || width <= 0 || height % 16 || width % 16) {
        PyErr_Format(PyExc_ValueError, "_dct_kernel: bad geometry batch=%zd height=%zd width=%zd", batch, height,
                     width);
        return -1;
    }
    return 0;
}

static PyObject *py_encode_dense(PyObject *self, PyObject *args)
{
    PyObject *images_obj, *tables_obj, *out_obj, *counts_obj;
    Py_ssize_t batch, height, width;
    if (!PyArg_ParseTuple(args, "OOOOnnn", &images_obj, &tables_obj, &out_obj, &counts_obj, &batch, &height,
                          &width) ||
        check_geometry(batch, height, width) < 0)
        return NULL;
    Py_ssize_t positions = (height / 16) * (width / 16);
    Py_buffer images, tables, out, counts;
    if (get_buffer(images_obj, &images, 0, 1, batch * height * width * 3, "images") < 0) return NULL;
    if (get_buffer(tables_obj, &tables, 0, 4, sizeof(Tables), "tables") < 0) goto fail_images;
    if (get_buffer(out_obj, &out, 1, 2, batch * NCH * positions * 2, "out") < 0) goto fail_tables;
    if (get_buffer(counts_obj, &counts, 1, 8, batch * 8, "counts") < 0) goto fail_out;
    Py_BEGIN_ALLOW_THREADS
    const Tables *t = tables.buf;
    for (Py_ssize_t b = 0; b < batch; b++) {
        const uint8_t *img = (const uint8_t *)images.buf + b * height * width * 3;
        int16_t *dst = (int16_t *)out.buf + b * NCH * positions;
        ((int64_t *)counts.buf)[b] = encode_image(img, width, positions, t, dst);
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&counts);
    PyBuffer_Release(&out);
    PyBuffer_Release(&tables);
    PyBuffer_Release(&images);
    Py_RETURN_NONE;
fail_out:
    PyBuffer_Release(&out);
fail_tables:
    PyBuffer_Release(&tables);
fail_images:
    PyBuffer_Release(&images);
    return NULL;
}

static PyObject *py_count_nonzero(PyObject *self, PyObject *args)
{
    PyObject *dense_obj, *counts_obj;
    Py_ssize_t batch, positions;
    if (!PyArg_ParseTuple(args, "OOnn", &dense_obj, &counts_obj, &batch, &positions)) return NULL;
    Py_buffer dense, counts;
    if (get_buffer(dense_obj, &dense, 0, 2, batch * NCH * positions * 2, "dense") < 0) return NULL;
    if (get_buffer(counts_obj, &counts, 1, 8, batch * 8, "counts") < 0) {
        PyBuffer_Release(&dense);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t b = 0; b < batch; b++)
        ((int64_t *)counts.buf)[b] = count_image((const int16_t *)dense.buf + b * NCH * positions, NCH * positions);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&counts);
    PyBuffer_Release(&dense);
    Py_RETURN_NONE;
}

static PyObject *py_sparsify(PyObject *self, PyObject *args)
{
    PyObject *dense_obj, *out_obj, *clipped_obj, *bounds_obj;
    Py_ssize_t batch, positions;
    int range;
    if (!PyArg_ParseTuple(args, "OOOOnni", &dense_obj, &out_obj, &bounds_obj, &clipped_obj, &batch, &positions,
                          &range))
        return NULL;
    Py_buffer dense, out, bounds, clipped;
    if (get_buffer(dense_obj, &dense, 0, 2, batch * NCH * positions * 2, "dense") < 0) return NULL;
    if (get_buffer(out_obj, &out, 1, -1, -1, "out") < 0) goto fail_dense;
    if (get_buffer(bounds_obj, &bounds, 0, 8, (batch + 1) * 8, "bounds") < 0) goto fail_out;
    if (get_buffer(clipped_obj, &clipped, 1, 8, batch * 8, "clipped") < 0) goto fail_bounds;
    const int64_t *start = bounds.buf;
    Py_ssize_t rows = out.itemsize ? out.len / (3 * out.itemsize) : 0;
    if ((out.itemsize != 2 && out.itemsize != 4) || out.len != rows * 3 * out.itemsize || start[batch] != rows) {
        PyErr_SetString(PyExc_ValueError, "_dct_kernel.sparsify: out must be int16/int32 [bounds[-1], 3]");
        goto fail_clipped;
    }
    int wide = out.itemsize == 4, bad = 0;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t b = 0; b < batch && !bad; b++) {
        const int16_t *src = (const int16_t *)dense.buf + b * NCH * positions;
        int64_t *clip = (int64_t *)clipped.buf + b;
        *clip = 0;
        /* each image's rows start at bounds[b]; its EOS row (written by the caller) follows them */
        Py_ssize_t cap = start[b + 1] - start[b] - 1;
        bad = cap < 0;
        if (bad) break;
        Py_ssize_t n = wide ? sparsify_image_int32_t(src, positions, range, (int32_t *)out.buf + 3 * start[b], cap, clip)
                            : sparsify_image_int16_t(src, positions, range, (int16_t *)out.buf + 3 * start[b], cap, clip);
        bad = n != cap;
    }
    Py_END_ALLOW_THREADS
    if (bad) {
        PyErr_SetString(PyExc_ValueError, "_dct_kernel.sparsify: bounds do not match the non-zero counts");
        goto fail_clipped;
    }
    PyBuffer_Release(&clipped);
    PyBuffer_Release(&bounds);
    PyBuffer_Release(&out);
    PyBuffer_Release(&dense);
    Py_RETURN_NONE;
fail_clipped:
    PyBuffer_Release(&clipped);
fail_bounds:
    PyBuffer_Release(&bounds);
fail_out:
    PyBuffer_Release(&out);
fail_dense:
    PyBuffer_Release(&dense);
    return NULL;
}

static PyObject *py_decode_dense(PyObject *self, PyObject *args)
{
    PyObject *dense_obj, *tables_obj, *out_obj;
    Py_ssize_t batch, height, width;
    int fancy;
    if (!PyArg_ParseTuple(args, "OOOnnnp", &dense_obj, &tables_obj, &out_obj, &batch, &height, &width, &fancy) ||
        check_geometry(batch, height, width) < 0)
        return NULL;
    Py_ssize_t positions = (height / 16) * (width / 16);
    Py_buffer dense, tables, out;
    DecodeWork work;
    if (get_buffer(dense_obj, &dense, 0, 2, batch * NCH * positions * 2, "dense") < 0) return NULL;
    if (get_buffer(tables_obj, &tables, 0, 4, sizeof(Tables), "tables") < 0) goto fail_dense;
    if (get_buffer(out_obj, &out, 1, 1, batch * height * width * 3, "out") < 0) goto fail_tables;
    if (decode_work_init(&work, height, width) < 0) {
        PyErr_NoMemory();
        goto fail_out;
    }
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t b = 0; b < batch; b++)
        decode_image((const int16_t *)dense.buf + b * NCH * positions, 1, tables.buf, &work, fancy,
                     (uint8_t *)out.buf + b * height * width * 3);
    Py_END_ALLOW_THREADS
    free(work.luma);
    PyBuffer_Release(&out);
    PyBuffer_Release(&tables);
    PyBuffer_Release(&dense);
    Py_RETURN_NONE;
fail_out:
    PyBuffer_Release(&out);
fail_tables:
    PyBuffer_Release(&tables);
fail_dense:
    PyBuffer_Release(&dense);
    return NULL;
}

/* Rows of one sequence up to its first special row (channel >= 384) -> a zeroed position-major image in kernel
 * order; returns
 * the index of the first row with a token out of range, or -1. Duplicate (channel, position): the last wins. */
#define SCATTER_ROWS(T)                                                                                         \
    static Py_ssize_t scatter_rows_##T(const T *rows, Py_ssize_t n, Py_ssize_t positions, int range,          \
                                       int16_t *dst)                                                            \
    {                                                                                                           \
        memset(dst, 0, (size_t)(NCH * positions) * sizeof(int16_t));                                           \
        for (Py_ssize_t i = 0; i < n; i++) {                                                                    \
            long c = rows[3 * i], p = rows[3 * i + 1], t = rows[3 * i + 2];                                     \
            if (c >= NCH) break;                                                                                \
            if (c < 0 || p < 0 || p >= positions || t < 0 || t >= 2 * range) return i;                         \
            dst[p * NCH + MB_INDEX[c]] = (int16_t)(t - range + (t >= range));                                       \
        }                                                                                                       \
        return -1;                                                                                              \
    }
SCATTER_ROWS(int16_t)
SCATTER_ROWS(int32_t)

static PyObject *py_decode_tokens(PyObject *self, PyObject *args)
{
    PyObject *seqs_obj, *tables_obj, *out_obj, *result = NULL;
    Py_ssize_t height, width;
    int fancy, range;
    if (!PyArg_ParseTuple(args, "O!OOnnpi", &PyList_Type, &seqs_obj, &tables_obj, &out_obj, &height, &width,
                          &fancy, &range))
        return NULL;
    Py_ssize_t batch = PyList_GET_SIZE(seqs_obj), got = 0;
    if (check_geometry(batch, height, width) < 0) return NULL;
    Py_ssize_t positions = (height / 16) * (width / 16);
    Py_buffer tables, out, *seqs = PyMem_Calloc((size_t)batch + 1, sizeof(Py_buffer));
    DecodeWork work = {0};
    int16_t *scratch = NULL;
    if (!seqs) return PyErr_NoMemory();
    if (get_buffer(tables_obj, &tables, 0, 4, sizeof(Tables), "tables") < 0) goto fail_seqs;
    if (get_buffer(out_obj, &out, 1, 1, batch * height * width * 3, "out") < 0) goto fail_tables;
    for (; got < batch; got++) {
        if (get_buffer(PyList_GET_ITEM(seqs_obj, got), &seqs[got], 0, -1, -1, "sequence") < 0) goto fail_out;
        if ((seqs[got].itemsize != 2 && seqs[got].itemsize != 4) || seqs[got].len % (3 * seqs[got].itemsize)) {
            PyErr_Format(PyExc_ValueError, "_dct_kernel: sequence %zd is not int16/int32 [n, 3]", got);
            PyBuffer_Release(&seqs[got]);
            goto fail_out;
        }
    }
    scratch = malloc((size_t)(NCH * positions) * sizeof(int16_t));
    if (!scratch || decode_work_init(&work, height, width) < 0) {
        PyErr_NoMemory();
        goto fail_out;
    }
    Py_ssize_t bad_image = -1, bad_row = -1;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t b = 0; b < batch; b++) {
        Py_ssize_t item = seqs[b].itemsize, n = seqs[b].len / (3 * item);
        bad_row = item == 2 ? scatter_rows_int16_t(seqs[b].buf, n, positions, range, scratch)
                            : scatter_rows_int32_t(seqs[b].buf, n, positions, range, scratch);
        if (bad_row >= 0) {
            bad_image = b;
            break;
        }
        decode_image(scratch, 0, tables.buf, &work, fancy, (uint8_t *)out.buf + b * height * width * 3);
    }
    Py_END_ALLOW_THREADS
    result = bad_image >= 0 ? Py_BuildValue("(nn)", bad_image, bad_row) : Py_NewRef(Py_None);
fail_out:
    free(scratch);
    free(work.luma);
    for (Py_ssize_t i = 0; i < got; i++) PyBuffer_Release(&seqs[i]);
    PyBuffer_Release(&out);
fail_tables:
    PyBuffer_Release(&tables);
fail_seqs:
    PyMem_Free(seqs);
    return result;
}

static PyMethodDef methods[] = {
    {"encode_dense", py_encode_dense, METH_VARARGS,
     "encode_dense(images, tables, out, counts, batch, height, width): RGB -> channel-major quantised DCT."},
    {"count_nonzero", py_count_nonzero, METH_VARARGS, "count_nonzero(dense, counts, batch, positions)."},
    {"sparsify", py_sparsify, METH_VARARGS,
     "sparsify(dense, out, bounds, clipped, batch, positions, value_range): token rows between bounds."},
    {"decode_dense", py_decode_dense, METH_VARARGS,
     "decode_dense(dense, tables, out, batch, height, width, fancy): channel-major DCT -> RGB."},
    {"decode_tokens", py_decode_tokens, METH_VARARGS,
     "decode_tokens(sequences, tables, out, height, width, fancy, value_range) -> None or (image, bad row)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_dct_kernel",
    .m_doc = "Compiled kernels of the sparse DCT codec (see dct_transform.py).",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__dct_kernel(void)
{
    init_mb_index();
    return PyModule_Create(&module);
}
