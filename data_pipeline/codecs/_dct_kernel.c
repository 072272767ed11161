/* Compiled kernels of the sparse DCT codec: a macroblock's whole path (colour, 4:2:0, 8x8 DCT, quantise) in
 * registers and L1, instead of numpy's ~15 passes over megabyte buffers. dct_transform.py is the reference: these
 * loops compute the same steps (see its docstring) and tests/test_dct_kernel.py compares the two.
 *
 * Files: this one is the CPython glue (buffer protocol, no numpy headers; stable ABI from 3.11, so one build serves
 * every later CPython); dct_kernel_transform.c the 8-point
 * DCTs and the coefficient order, dct_kernel_encode.c RGB -> quantised DCT image -> tokens, dct_kernel_decode.c
 * tokens / DCT image -> RGB, dct_kernel.h what they share. setup.py builds them as one extension module.
 *
 * Portable C11, baseline x86-64 (no -march): the DCT rows, the 8x8 transpose and the RGB deinterleave use SSE2
 * intrinsics under #ifdef __SSE2__, each with a scalar fallback that does the same float operations in the same
 * order (same bits: checked by building with -U__SSE2__); the other hot loops are fixed 8- or 16-wide float32
 * loops that GCC vectorises at -O3. Built with -ffp-contract=off so that no multiply-add is fused on targets with
 * FMA: the colour conversion and the fancy upsampling then give the same float32 bits as numpy's elementwise
 * operations do.
 *
 * Numerics: the 1-D DCT basis is scaled by sqrt(8), so its rows 0 and 4 are exactly +-1 and the DC, (0,4), (4,0)
 * and (4,4) coefficients of integer samples are exact sums; the scale 1/8 and the quantiser are one float32
 * division, which keeps their exact .5 ties exact (rounded to even, like np.rint). Other coefficients round in
 * float32 like the numpy GEMMs, in another order, so a near-tie can round the other way (rare; tests bound it).
 *
 * Python API (buffers are checked for size; dtypes, shapes and C order are the caller's contract, see
 * dct_transform.py and dct_sequence.py; P = positions = (H / 16) * (W / 16)):
 *   encode_dense(images u8 [B,H,W,3], tables, out i16 [B,384,P], counts i64 [B], B, H, W)
 *   count_nonzero(dense i16 [B,384,P], counts i64 [B], B, P)
 *   sparsify(dense i16 [B,384,P], out i16|i32 [bounds[B],3], bounds i64 [B+1], clipped i64 [B], B, P, range)
 *       image b's rows go to out[bounds[b] : bounds[b+1] - 1]; the caller writes the EOS rows
 *   decode_dense(dense i16 [B,384,P], tables, out u8 [B,H,W,3], B, H, W, fancy)
 *   decode_tokens(list of i16|i32 [n_i,3], tables, out u8 [B,H,W,3], H, W, fancy, range)
 *       -> None, or (image, row) of the first row with an out-of-range token
 * tables: float32 [205], the Tables struct below, built by dct_transform.kernel_tables. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdlib.h>

#include "dct_kernel.h"

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
        ((int64_t *)counts.buf)[b] = dctk_encode_image(img, width, positions, t, dst);
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
        ((int64_t *)counts.buf)[b] =
            dctk_count_image((const int16_t *)dense.buf + b * NCH * positions, NCH * positions);
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
        Py_ssize_t row0 = 3 * start[b];
        Py_ssize_t n = wide
            ? dctk_sparsify_image_int32_t(src, positions, range, (int32_t *)out.buf + row0, cap, clip)
            : dctk_sparsify_image_int16_t(src, positions, range, (int16_t *)out.buf + row0, cap, clip);
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
    if (dctk_decode_work_init(&work, height, width) < 0) {
        PyErr_NoMemory();
        goto fail_out;
    }
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t b = 0; b < batch; b++)
        dctk_decode_image((const int16_t *)dense.buf + b * NCH * positions, 1, tables.buf, &work, fancy,
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

static PyObject *py_decode_tokens(PyObject *self, PyObject *args)
{
    PyObject *seqs_obj, *tables_obj, *out_obj, *result = NULL;
    Py_ssize_t height, width;
    int fancy, range;
    if (!PyArg_ParseTuple(args, "O!OOnnpi", &PyList_Type, &seqs_obj, &tables_obj, &out_obj, &height, &width,
                          &fancy, &range))
        return NULL;
    Py_ssize_t batch = PyList_Size(seqs_obj), got = 0;
    if (check_geometry(batch, height, width) < 0) return NULL;
    Py_ssize_t positions = (height / 16) * (width / 16);
    Py_buffer tables, out, *seqs = PyMem_Calloc((size_t)batch + 1, sizeof(Py_buffer));
    DecodeWork work = {0};
    int16_t *scratch = NULL;
    if (!seqs) return PyErr_NoMemory();
    if (get_buffer(tables_obj, &tables, 0, 4, sizeof(Tables), "tables") < 0) goto fail_seqs;
    if (get_buffer(out_obj, &out, 1, 1, batch * height * width * 3, "out") < 0) goto fail_tables;
    for (; got < batch; got++) {
        if (get_buffer(PyList_GetItem(seqs_obj, got), &seqs[got], 0, -1, -1, "sequence") < 0) goto fail_out;
        if ((seqs[got].itemsize != 2 && seqs[got].itemsize != 4) || seqs[got].len % (3 * seqs[got].itemsize)) {
            PyErr_Format(PyExc_ValueError, "_dct_kernel: sequence %zd is not int16/int32 [n, 3]", got);
            PyBuffer_Release(&seqs[got]);
            goto fail_out;
        }
    }
    scratch = malloc((size_t)(NCH * positions) * sizeof(int16_t));
    if (!scratch || dctk_decode_work_init(&work, height, width) < 0) {
        PyErr_NoMemory();
        goto fail_out;
    }
    Py_ssize_t bad_image = -1, bad_row = -1;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t b = 0; b < batch; b++) {
        Py_ssize_t item = seqs[b].itemsize, n = seqs[b].len / (3 * item);
        bad_row = item == 2 ? dctk_scatter_rows_int16_t(seqs[b].buf, n, positions, range, scratch)
                            : dctk_scatter_rows_int32_t(seqs[b].buf, n, positions, range, scratch);
        if (bad_row >= 0) {
            bad_image = b;
            break;
        }
        dctk_decode_image(scratch, 0, tables.buf, &work, fancy, (uint8_t *)out.buf + b * height * width * 3);
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

/* What the Python side's tables and arguments mean to this build: bumped whenever they change (2: fixed-point
 * colour matrix, EOS/PAD-only sequence ends), so kernel_loader refuses a build older than the sources. */
#define DCTK_INTERFACE 2

PyMODINIT_FUNC PyInit__dct_kernel(void)
{
    dctk_init_mb_index();
    PyObject *m = PyModule_Create(&module);
    if (m && PyModule_AddIntConstant(m, "INTERFACE", DCTK_INTERFACE) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
