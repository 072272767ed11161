/* Part of the sparse DCT codec's kernel: see _dct_kernel.c. */
#include <stdlib.h>
#include <string.h>

#include "dct_kernel.h"

/* A macroblock's 384 coefficients (kernel order) -> its clamped samples in the planes at (my, mx). */
static void decode_macroblock(const int16_t *mb, const Tables *t, DecodeWork *w, ptrdiff_t my, ptrdiff_t mx)
{
    for (int slot = 0; slot < 6; slot++) {
        float coef[64], px[64];
        const float *div = slot < 4 ? t->luma_div : t->chroma_div;
        /* dequantise: value * table, with the IDCT's 1/8 (and for chroma the 1/4 of the encoder's sum) undone */
        const float scale = slot < 4 ? 1.0f / 64.0f : 1.0f / 256.0f;
        for (int n = 0; n < 64; n++) coef[n] = (float)mb[64 * slot + n] * (div[n] * scale);
        dctk_inverse_dct(coef, t, px);
        if (slot < 4) {
            float *dst = w->luma + (my * 16 + (slot >> 1) * 8) * w->width + mx * 16 + (slot & 1) * 8;
            for (int y = 0; y < 8; y++)
                for (int x = 0; x < 8; x++) {
                    float v = px[y * 8 + x] + 128.5f;
                    v = v < 0.5f ? 0.5f : v;
                    dst[y * w->width + x] = v > 255.5f ? 255.5f : v;
                }
        } else {
            ptrdiff_t cw = w->width / 2;
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
static void upsample_row(const float *a, ptrdiff_t cw, int fancy, float *out)
{
    if (!fancy) {
        for (ptrdiff_t j = 0; j < cw; j++) out[2 * j] = out[2 * j + 1] = a[j];
        return;
    }
    out[0] = a[0];
    out[2 * cw - 1] = a[cw - 1];
    for (ptrdiff_t j = 0; j + 1 < cw; j++) {
        float d = (a[j + 1] - a[j]) * 0.25f;
        out[2 * j + 1] = a[j] + d;
        out[2 * j + 2] = a[j + 1] - d;
    }
}

/* Output row y of one chroma plane from the wide rows prev/cur/next (vertical pass of the same filter). */
static void vertical_row(const float *prev, const float *cur, const float *next, ptrdiff_t width, int odd,
                         int edge, int fancy, float *out)
{
    if (!fancy || edge) {
        memcpy(out, cur, (size_t)width * sizeof(float));
    } else if (odd) {
        for (ptrdiff_t x = 0; x < width; x++) out[x] = cur[x] + (next[x] - cur[x]) * 0.25f;
    } else {
        for (ptrdiff_t x = 0; x < width; x++) out[x] = cur[x] - (cur[x] - prev[x]) * 0.25f;
    }
}

/* Wide (horizontally upsampled) row r of chroma plane c, in the ring of three. */
static float *wide_row(DecodeWork *w, int c, ptrdiff_t r) { return w->wide + (c * 3 + r % 3) * w->width; }

/* The sample planes -> interleaved uint8 RGB, one output row at a time; each chroma row is widened once. */
static void planes_to_rgb(DecodeWork *w, const float *m, int fancy, uint8_t *out)
{
    ptrdiff_t width = w->width, cw = width / 2, ch = w->height / 2;
    for (int c = 0; c < 2; c++) upsample_row(w->chroma + c * ch * cw, cw, fancy, wide_row(w, c, 0));
    for (ptrdiff_t y = 0; y < w->height; y++) {
        ptrdiff_t i = y / 2;
        int odd = (int)(y & 1);
        int edge = odd ? i == ch - 1 : i == 0;
        for (int c = 0; c < 2; c++) {
            if (!odd && i + 1 < ch)
                upsample_row(w->chroma + (c * ch + i + 1) * cw, cw, fancy, wide_row(w, c, i + 1));
            const float *prev = wide_row(w, c, i > 0 ? i - 1 : i), *next = wide_row(w, c, i + 1 < ch ? i + 1 : i);
            vertical_row(prev, wide_row(w, c, i), next, width, odd, edge, fancy, w->full + c * width);
        }
        const float *yy = w->luma + y * width, *cb = w->full, *cr = w->full + width;
        uint8_t *dst = out + y * width * 3;
        for (ptrdiff_t x0 = 0; x0 < width; x0 += 16) {
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
void dctk_decode_image(const int16_t *src, int channel_major, const Tables *t, DecodeWork *w, int fancy,
                         uint8_t *out)
{
    ptrdiff_t mw = w->width / 16, positions = mw * (w->height / 16);
    int16_t group[GROUP][NCH];
    for (ptrdiff_t p0 = 0; p0 < positions; p0 += GROUP) {
        int n = positions - p0 < GROUP ? (int)(positions - p0) : GROUP;
        if (channel_major)
            for (int c = 0; c < NCH; c++)
                for (int j = 0; j < n; j++) group[j][dctk_mb_index[c]] = src[c * positions + p0 + j];
        for (int j = 0; j < n; j++) {
            ptrdiff_t p = p0 + j;
            decode_macroblock(channel_major ? group[j] : src + p * NCH, t, w, p / mw, p % mw);
        }
    }
    planes_to_rgb(w, t->ycc_to_rgb, fancy, out);
}

int dctk_decode_work_init(DecodeWork *w, ptrdiff_t height, ptrdiff_t width)
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

/* Rows of one sequence up to its first EOS or PAD row (channel 384 or 385) -> a zeroed position-major image in kernel
 * order; returns the index of the first row with a token out of range, or -1. Duplicate (channel, position): the
 * last wins. */
#define SCATTER_ROWS(T)                                                                                         \
    ptrdiff_t dctk_scatter_rows_##T(const T *rows, ptrdiff_t n, ptrdiff_t positions, int range,                \
                                       int16_t *dst)                                                           \
    {                                                                                                          \
        memset(dst, 0, (size_t)(NCH * positions) * sizeof(int16_t));                                           \
        for (ptrdiff_t i = 0; i < n; i++) {                                                                    \
            long c = rows[3 * i], p = rows[3 * i + 1], t = rows[3 * i + 2];                                    \
            if (c == NCH || c == NCH + 1) break; /* EOS or PAD; any other id >= NCH is out of range */         \
            if (c < 0 || c >= NCH || p < 0 || p >= positions || t < 0 || t >= 2 * range) return i;             \
            dst[p * NCH + dctk_mb_index[c]] = (int16_t)(t - range + (t >= range));                             \
        }                                                                                                      \
        return -1;                                                                                             \
    }
SCATTER_ROWS(int16_t)
SCATTER_ROWS(int32_t)
