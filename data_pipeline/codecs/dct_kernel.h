/* Part of the sparse DCT codec's kernel: see _dct_kernel.c. */
#ifndef DCT_KERNEL_H
#define DCT_KERNEL_H

#include <stddef.h>
#include <stdint.h>

#define NCH 384

/* Everything numeric comes from Python (dct_transform.kernel_tables), so both paths use the same float32s. */
typedef struct {
    float basis[64];      /* basis[u * 8 + x]: sqrt(8) * orthonormal DCT-II */
    float luma_div[64];   /* 8 * luma table, transposed (index 8v + u): scaled DCT / this = quantised value */
    float chroma_div[64]; /* 32 * chroma table, transposed: the chroma input is a 2x2 sum, not the mean */
    float rgb_to_ycc[9];  /* libjpeg fixed point: [Y, Cb - 128, Cr - 128] = floor((M @ [R, G, B] + rounding) / 2^16) */
    float ycc_to_rgb[4];  /* JFIF inverse's non-trivial entries: R: Cr, G: Cb, Cr, B: Cb */
} Tables;

/* Macroblocks are encoded and decoded GROUP positions at a time through a position-major buffer, so that the
 * channel-major image is read and written in runs of GROUP values: one value per channel (384 lines 2 * P bytes
 * apart) would thrash L1's sets. */
#define GROUP 16

typedef struct {
    ptrdiff_t height, width; /* pixels */
    float *luma;              /* [height][width], clamped, + 128.5 (the +0.5 makes the final truncation round) */
    float *chroma;            /* [2][height/2][width/2], clamped to -128..127 */
    float *wide;              /* [2][3][width]: a ring of three horizontally upsampled rows per chroma plane */
    float *full;              /* [2][width]: one output row of Cb and Cr */
} DecodeWork;

/* dct_kernel_transform.c */
extern int dctk_mb_index[NCH];
void dctk_init_mb_index(void);
void dctk_forward_dct(const float *in, const Tables *t, float *out);
void dctk_inverse_dct(const float *in, const Tables *t, float *out);

/* dct_kernel_encode.c */
int64_t dctk_encode_image(const uint8_t *img, ptrdiff_t width, ptrdiff_t positions, const Tables *t, int16_t *dst);
ptrdiff_t dctk_sparsify_image_int16_t(const int16_t *src, ptrdiff_t positions, int range, int16_t *out,
                                      ptrdiff_t capacity, int64_t *clipped);
ptrdiff_t dctk_sparsify_image_int32_t(const int16_t *src, ptrdiff_t positions, int range, int32_t *out,
                                      ptrdiff_t capacity, int64_t *clipped);
int64_t dctk_count_image(const int16_t *src, ptrdiff_t count);

/* dct_kernel_decode.c */
int dctk_decode_work_init(DecodeWork *w, ptrdiff_t height, ptrdiff_t width);
void dctk_decode_image(const int16_t *src, int channel_major, const Tables *t, DecodeWork *w, int fancy,
                       uint8_t *out);
ptrdiff_t dctk_scatter_rows_int16_t(const int16_t *rows, ptrdiff_t n, ptrdiff_t positions, int range,
                                    int16_t *dst);
ptrdiff_t dctk_scatter_rows_int32_t(const int32_t *rows, ptrdiff_t n, ptrdiff_t positions, int range,
                                    int16_t *dst);

#endif
