/* Pixel overlap of two COCO panoptic PNGs, straight from their inflated scanlines.
 *
 * The `pq` verb's hot loop (max_deeplab.evaluation.png_overlap has the Python side): the
 * PNG rows are unfiltered here (PNG spec §9: filter types None, Sub, Up, Average, Paeth on
 * 8-bit samples) and never stored as whole images; each pixel's id is R + 256 G + 256^2 B.
 * Both images are walked together, row by row, and every run of equal (GT id, prediction
 * id) pairs within a row adds its length to a hash table keyed by (GT id << 24) | pred id.
 * A row pair identical to the previous one (the common case in segmentation maps: Up-filter
 * rows of zeros) re-adds the previous row's runs instead of walking its pixels.
 *
 * Plain C over the buffer protocol: no numpy, so the verb's process need not import it.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* ---- PNG row unfiltering (8-bit samples, BPP = 3 or 4 bytes per pixel) ---- */

/* Sub, Average and Paeth depend on the left pixel just decoded; keeping it in registers
 * (a[], and the upper-left one in c[]) instead of re-reading cur[i - BPP] from memory keeps
 * that dependency chain to a few cycles per pixel, ~4x faster than the byte loop. */
#define DEFINE_UNFILTER(BPP)                                                                  \
    static int unfilter_row_##BPP(uint8_t *cur, const uint8_t *prev, const uint8_t *src,     \
                                  Py_ssize_t n, int type) {                                  \
        Py_ssize_t i;                                                                        \
        int k, a[BPP] = {0}, c[BPP] = {0};                                                   \
        switch (type) {                                                                      \
            case 0: /* None */                                                               \
                memcpy(cur, src, (size_t)n);                                                 \
                return 0;                                                                    \
            case 1: /* Sub: left neighbour */                                                \
                for (i = 0; i < n; i += BPP)                                                 \
                    for (k = 0; k < BPP; k++)                                                \
                        cur[i + k] = (uint8_t)(a[k] = (uint8_t)(a[k] + src[i + k]));         \
                return 0;                                                                    \
            case 2: /* Up: the pixel above */                                                \
                for (i = 0; i < n; i++) cur[i] = (uint8_t)(src[i] + prev[i]);                \
                return 0;                                                                    \
            case 3: /* Average of left and above, rounded down */                            \
                for (i = 0; i < n; i += BPP)                                                 \
                    for (k = 0; k < BPP; k++) {                                              \
                        a[k] = (uint8_t)(src[i + k] + ((a[k] + prev[i + k]) >> 1));          \
                        cur[i + k] = (uint8_t)a[k];                                          \
                    }                                                                        \
                return 0;                                                                    \
            case 4: /* Paeth: the one of left, above, upper-left nearest to                  \
                       left + above - upper-left (ties: left, then above). Where above        \
                       equals upper-left (flat rows above: most pixels of a panoptic map)     \
                       that is always left, so those pixels take Sub's one-add path. */       \
                for (i = 0; i < n; i += BPP) {                                               \
                    int flat = 1;                                                            \
                    for (k = 0; k < BPP; k++) flat &= prev[i + k] == c[k];                   \
                    if (flat) {                                                              \
                        for (k = 0; k < BPP; k++)                                            \
                            cur[i + k] = (uint8_t)(a[k] = (uint8_t)(a[k] + src[i + k]));     \
                        continue;                                                            \
                    }                                                                        \
                    for (k = 0; k < BPP; k++) {                                              \
                        int b = prev[i + k];                                                 \
                        int pa = abs(b - c[k]), pb = abs(a[k] - c[k]);                       \
                        int pc = abs(a[k] + b - 2 * c[k]);                                   \
                        int nearest = pb < pa ? b : a[k];                                    \
                        int best = pb < pa ? pb : pa;                                        \
                        nearest = pc < best ? c[k] : nearest;                                \
                        a[k] = (uint8_t)(src[i + k] + nearest);                              \
                        cur[i + k] = (uint8_t)a[k];                                          \
                        c[k] = b;                                                            \
                    }                                                                        \
                }                                                                            \
                return 0;                                                                    \
            default:                                                                         \
                return -1;                                                                   \
        }                                                                                    \
    }

DEFINE_UNFILTER(3)
DEFINE_UNFILTER(4)

static int unfilter_row(uint8_t *cur, const uint8_t *prev, const uint8_t *src, Py_ssize_t n,
                        int bpp, int type) {
    return bpp == 3 ? unfilter_row_3(cur, prev, src, n, type)
                    : unfilter_row_4(cur, prev, src, n, type);
}

/* ---- (GT id, prediction id) -> pixel count hash table (open addressing) ---- */

#define EMPTY_KEY UINT64_MAX /* ids are < 2^24, so keys are < 2^48 */

typedef struct {
    uint64_t *keys;
    uint64_t *counts;
    size_t mask; /* capacity - 1, capacity = 2^bits */
    int bits;
    size_t used;
} CountTable;

static int table_init(CountTable *t, int bits) {
    size_t capacity = (size_t)1 << bits;
    t->keys = PyMem_Malloc(capacity * sizeof(uint64_t));
    t->counts = PyMem_Calloc(capacity, sizeof(uint64_t));
    if (!t->keys || !t->counts) {
        PyMem_Free(t->keys);
        PyMem_Free(t->counts);
        t->keys = t->counts = NULL;
        return -1;
    }
    memset(t->keys, 0xFF, capacity * sizeof(uint64_t));
    t->mask = capacity - 1;
    t->bits = bits;
    t->used = 0;
    return 0;
}

static void table_free(CountTable *t) {
    PyMem_Free(t->keys);
    PyMem_Free(t->counts);
}

/* Fibonacci hashing: the top bits of key * 2^64 / golden ratio, which depend on every bit of
 * the key (ids differing only in high bits still spread). */
static inline size_t slot_of(uint64_t key, int bits) {
    return (size_t)((key * 0x9E3779B97F4A7C15ULL) >> (64 - bits));
}

static int table_add(CountTable *t, uint64_t key, uint64_t count);

static int table_grow(CountTable *t) {
    CountTable bigger;
    size_t i;
    if (table_init(&bigger, t->bits + 1) < 0) return -1;
    for (i = 0; i <= t->mask; i++)
        if (t->keys[i] != EMPTY_KEY) table_add(&bigger, t->keys[i], t->counts[i]);
    table_free(t);
    *t = bigger;
    return 0;
}

static int table_add(CountTable *t, uint64_t key, uint64_t count) {
    size_t s = slot_of(key, t->bits);
    while (t->keys[s] != key) {
        if (t->keys[s] == EMPTY_KEY) {
            if (2 * (t->used + 1) > t->mask + 1) { /* keep the load <= 1/2 */
                if (table_grow(t) < 0) return -1;
                return table_add(t, key, count);
            }
            t->keys[s] = key;
            t->used++;
            break;
        }
        s = (s + 1) & t->mask;
    }
    t->counts[s] += count;
    return 0;
}

/* ---- one image's scanlines ---- */

typedef struct {
    const uint8_t *data; /* inflated scanlines: per row, 1 filter byte + row bytes */
    int channels;        /* 3 (RGB) or 4 (RGBA; alpha ignored) */
    Py_ssize_t row_bytes;
    uint8_t *cur, *prev; /* unfiltered current / previous row */
    const char *name;
} Scanlines;

/* Unfilters row y into s->cur (after swapping it with s->prev); returns 1 if the row equals
 * the previous one, 0 if not, -1 (exception set) on a bad filter type. */
static int next_row(Scanlines *s, Py_ssize_t y) {
    const uint8_t *src = s->data + y * (s->row_bytes + 1);
    uint8_t *tmp = s->prev;
    s->prev = s->cur;
    s->cur = tmp;
    if (unfilter_row(s->cur, s->prev, src + 1, s->row_bytes, s->channels, src[0]) < 0) {
        PyErr_Format(PyExc_ValueError, "%s scanline %zd has unknown filter type %d", s->name,
                     y, (int)src[0]);
        return -1;
    }
    return y > 0 && memcmp(s->cur, s->prev, (size_t)s->row_bytes) == 0;
}

static inline uint64_t pixel_id(const uint8_t *p) {
    return (uint64_t)p[0] | ((uint64_t)p[1] << 8) | ((uint64_t)p[2] << 16);
}

static int get_scanlines(Py_buffer *view, const char *name, Py_ssize_t width, Py_ssize_t height,
                         int channels, Scanlines *s) {
    if (channels != 3 && channels != 4) {
        PyErr_Format(PyExc_ValueError, "%s: channels must be 3 or 4, got %d", name, channels);
        return -1;
    }
    if (width > (PY_SSIZE_T_MAX - 1) / channels ||
        height > PY_SSIZE_T_MAX / (width * channels + 1)) {
        PyErr_Format(PyExc_ValueError, "%s: %zdx%zd pixels is too large", name, width, height);
        return -1;
    }
    s->channels = channels;
    s->row_bytes = width * channels;
    s->name = name;
    if (view->len != height * (s->row_bytes + 1)) {
        PyErr_Format(PyExc_ValueError,
                     "%s: %zd bytes of scanlines, expected %zd for %zdx%zd pixels with %d "
                     "channels", name, view->len, height * (s->row_bytes + 1), width, height,
                     channels);
        return -1;
    }
    s->data = view->buf;
    s->cur = PyMem_Calloc((size_t)s->row_bytes + 1, 1);
    s->prev = PyMem_Calloc((size_t)s->row_bytes + 1, 1);
    if (!s->cur || !s->prev) {
        PyMem_Free(s->cur);
        PyMem_Free(s->prev);
        PyErr_NoMemory();
        return -1;
    }
    return 0;
}

/* Runs of one row pair: keys and lengths, reused while the rows repeat. */
typedef struct {
    uint64_t *keys;
    uint64_t *lengths;
    Py_ssize_t n;
} RowRuns;

#if defined(__GNUC__) && defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
#define HAVE_WORD_SCAN 1
#else
#define HAVE_WORD_SCAN 0
#endif

/* Byte offset, from `i` on, of the first pixel that differs from its left neighbour in either
 * row (both with `c` bytes per pixel), or `n` if none does. Compares 8 bytes of each row with
 * the same bytes one pixel earlier per step, so the long flat stretches of a panoptic map
 * cost ~1/8 of a per-pixel loop; alpha bytes (c = 4, `i` then stays pixel-aligned) are
 * masked out. (A pixel reported that does not differ in its id only splits a run in two
 * with the same key: the counts stay right.) */
static Py_ssize_t next_change(const uint8_t *g, const uint8_t *p, Py_ssize_t i, Py_ssize_t n,
                              int c) {
#if HAVE_WORD_SCAN
    const uint64_t mask = c == 4 ? 0x00FFFFFF00FFFFFFULL : ~0ULL;
    for (; i + 8 <= n; i += 8) {
        uint64_t g0, g1, p0, p1, diff;
        memcpy(&g0, g + i, 8);
        memcpy(&g1, g + i - c, 8);
        memcpy(&p0, p + i, 8);
        memcpy(&p1, p + i - c, 8);
        diff = ((g0 ^ g1) | (p0 ^ p1)) & mask;
        if (diff) return i + __builtin_ctzll(diff) / 8;
    }
#endif
    for (; i < n; i++)
        if ((g[i] != g[i - c] || p[i] != p[i - c]) && (c != 4 || i % 4 != 3)) return i;
    return n;
}

/* Cuts the current row pair into runs of equal (GT id, prediction id). */
static void row_runs(const Scanlines *gt, const Scanlines *pred, Py_ssize_t width,
                     RowRuns *runs) {
    const uint8_t *g = gt->cur, *p = pred->cur;
    const int gc = gt->channels, pc = pred->channels;
    uint64_t key = (pixel_id(g) << 24) | pixel_id(p), start = 0;
    Py_ssize_t x;
    runs->n = 0;
    if (gc == pc) {
        const Py_ssize_t n = width * gc;
        Py_ssize_t i = next_change(g, p, gc, n, gc);
        while (i < n) {
            x = i / gc;
            /* Some byte of pixel x differs from pixel x - 1: a new run starts here. */
            runs->keys[runs->n] = key;
            runs->lengths[runs->n++] = (uint64_t)x - start;
            key = (pixel_id(g + x * gc) << 24) | pixel_id(p + x * pc);
            start = (uint64_t)x;
            i = next_change(g, p, (x + 1) * gc, n, gc);
        }
    } else {
        for (x = 1; x < width; x++) {
            uint64_t k = (pixel_id(g + x * gc) << 24) | pixel_id(p + x * pc);
            if (k != key) {
                runs->keys[runs->n] = key;
                runs->lengths[runs->n++] = (uint64_t)x - start;
                key = k;
                start = (uint64_t)x;
            }
        }
    }
    runs->keys[runs->n] = key;
    runs->lengths[runs->n++] = (uint64_t)width - start;
}

static int count_overlaps(Scanlines *gt, Scanlines *pred, Py_ssize_t width, Py_ssize_t height,
                          CountTable *table, RowRuns *runs) {
    Py_ssize_t y, r;
    for (y = 0; y < height; y++) {
        int same_gt = next_row(gt, y), same_pred;
        if (same_gt < 0) return -1;
        same_pred = next_row(pred, y);
        if (same_pred < 0) return -1;
        if (!(same_gt && same_pred)) row_runs(gt, pred, width, runs);
        for (r = 0; r < runs->n; r++)
            if (table_add(table, runs->keys[r], runs->lengths[r]) < 0) {
                PyErr_NoMemory();
                return -1;
            }
    }
    return 0;
}

PyDoc_STRVAR(overlap_counts_doc,
"overlap_counts(gt, pred, width, height, gt_channels, pred_channels) -> dict\n\n"
"Pixel counts of each (GT id, prediction id) pair of two equally sized 8-bit RGB(A)\n"
"panoptic PNGs, given their inflated (still filtered) scanlines as bytes-like objects.\n"
"Keys are (gt_id << 24) | pred_id with id = R + 256 G + 256^2 B; alpha is ignored.\n"
"Raises ValueError on a buffer of the wrong length or an unknown filter type.");

static PyObject *overlap_counts(PyObject *self, PyObject *args) {
    Py_buffer gt_view, pred_view;
    Py_ssize_t width, height;
    int gt_channels, pred_channels;
    Scanlines gt = {0}, pred = {0};
    RowRuns runs = {0};
    CountTable table = {0};
    PyObject *result = NULL;
    size_t i;
    int ok = -1;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*y*nnii", &gt_view, &pred_view, &width, &height, &gt_channels,
                          &pred_channels))
        return NULL;
    if (width < 1 || height < 1) {
        PyErr_Format(PyExc_ValueError, "width and height must be >= 1, got %zd x %zd", width,
                     height);
        goto done;
    }
    if (get_scanlines(&gt_view, "ground-truth", width, height, gt_channels, &gt) < 0) goto done;
    if (get_scanlines(&pred_view, "prediction", width, height, pred_channels, &pred) < 0)
        goto done;
    runs.keys = PyMem_Malloc((size_t)width * sizeof(uint64_t));
    runs.lengths = PyMem_Malloc((size_t)width * sizeof(uint64_t));
    if (!runs.keys || !runs.lengths || table_init(&table, 10) < 0) {
        PyErr_NoMemory();
        goto done;
    }
    ok = count_overlaps(&gt, &pred, width, height, &table, &runs);
    if (ok < 0) goto done;
    result = PyDict_New();
    if (!result) goto done;
    for (i = 0; i <= table.mask; i++) {
        PyObject *key, *count;
        int failed;
        if (table.keys[i] == EMPTY_KEY) continue;
        key = PyLong_FromUnsignedLongLong(table.keys[i]);
        count = PyLong_FromUnsignedLongLong(table.counts[i]);
        failed = !key || !count || PyDict_SetItem(result, key, count) < 0;
        Py_XDECREF(key);
        Py_XDECREF(count);
        if (failed) {
            Py_CLEAR(result);
            break;
        }
    }
done:
    PyMem_Free(gt.cur);
    PyMem_Free(gt.prev);
    PyMem_Free(pred.cur);
    PyMem_Free(pred.prev);
    PyMem_Free(runs.keys);
    PyMem_Free(runs.lengths);
    if (table.keys) table_free(&table);
    PyBuffer_Release(&gt_view);
    PyBuffer_Release(&pred_view);
    return result;
}

PyDoc_STRVAR(unfilter_doc,
"unfilter(scanlines, width, height, channels) -> bytes\n\n"
"The pixel bytes ([height, width, channels], row-major) of inflated 8-bit PNG scanlines.\n"
"Raises ValueError on a buffer of the wrong length or an unknown filter type.");

static PyObject *unfilter(PyObject *self, PyObject *args) {
    Py_buffer view;
    Py_ssize_t width, height, y;
    int channels;
    Scanlines s = {0};
    PyObject *out = NULL;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*nni", &view, &width, &height, &channels)) return NULL;
    if (width < 1 || height < 1) {
        PyErr_Format(PyExc_ValueError, "width and height must be >= 1, got %zd x %zd", width,
                     height);
        goto done;
    }
    if (get_scanlines(&view, "scanlines", width, height, channels, &s) < 0) goto done;
    out = PyBytes_FromStringAndSize(NULL, height * s.row_bytes);
    if (!out) goto done;
    for (y = 0; y < height; y++) {
        if (next_row(&s, y) < 0) {
            Py_CLEAR(out);
            break;
        }
        memcpy(PyBytes_AS_STRING(out) + y * s.row_bytes, s.cur, (size_t)s.row_bytes);
    }
done:
    PyMem_Free(s.cur);
    PyMem_Free(s.prev);
    PyBuffer_Release(&view);
    return out;
}

static PyMethodDef methods[] = {
    {"overlap_counts", overlap_counts, METH_VARARGS, overlap_counts_doc},
    {"unfilter", unfilter, METH_VARARGS, unfilter_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_png_overlap",
    "Pixel overlap counts of two panoptic PNGs from their scanlines (see the C source).", -1,
    methods,
};

PyMODINIT_FUNC PyInit__png_overlap(void) { return PyModule_Create(&module); }
