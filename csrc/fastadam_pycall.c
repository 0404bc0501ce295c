/*
 * fastadam_pycall.c - fastadam._pycall, an optional CPython extension: the
 * common case of one adam_step (four or five float32 or float64 ndarrays that
 * are plainly fine) from Python to the C kernel in one call.
 *
 * Why: with cffi's ABI mode a 1,024-element adam_step spent most of its time
 * getting there (four ffi.from_buffer calls, the array checks in Python, the
 * scalars' struct), ~10-16 times an np.add on the same array. Here the
 * buffers, the checks and the struct cost one C call.
 *
 * It decides nothing and explains nothing: step() either runs the kernel on
 * arrays that pass every rule of fastadam._validation.validate_arrays (the
 * rules live there), or returns DECLINED without touching anything, and the
 * Python path then validates as always (raising its errors, or running the
 * unusual-but-valid cases: subclasses, bfloat16 states, ...). It accepts a
 * subset: exact numpy.ndarray objects of one float format and shape, C-
 * contiguous, aligned, writeable, in native byte order, pairwise disjoint.
 *
 * No kernel is linked: bind() receives the addresses of two kernels with
 * fa_adam_f32's and fa_adam_f64's signatures and returns a step() that calls
 * them. fastadam.backends.c binds the C library's; fastadam.backends.numba_
 * binds its serial loops compiled as C callbacks (numba.cfunc), with a size
 * limit above which its Python path launches the parallel loop.
 * Built against the limited API of Python 3.11 (one .abi3 file for every
 * CPython from 3.11); where it is missing, fastadam runs the Python path.
 */
#include <Python.h>
#include <stdint.h>
#include <string.h>

#include "fastadam.h"

typedef int (*fa_f32_fn)(float *, float *, float *, float *, float *, int64_t,
                         const fa_adam_scalars *);
typedef int (*fa_f64_fn)(double *, double *, double *, double *, double *, int64_t,
                         const fa_adam_scalars *);

typedef int (*fa_q8_fn)(float *, float *, uint8_t *, uint8_t *, float *, float *, int64_t,
                        const fa_adam_scalars *);

static PyObject *g_ndarray; /* numpy.ndarray (a strong reference) */

/* What one bound step() calls (the capsule that is the function's self):
 * the kernels of one backend, and the largest array it takes. */
typedef struct pycall_kernels {
    fa_f32_fn f32;
    fa_f64_fn f64;
    int64_t max_n;
} pycall_kernels;

/* step()'s answer when it ran nothing: the caller takes the Python path. */
#define DECLINED 1

static PyObject *pycall_step(PyObject *self, PyObject *const *args, Py_ssize_t nargs);

static PyMethodDef step_def = {
    "step", (PyCFunction)(void (*)(void))pycall_step, METH_FASTCALL,
    "step(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, scalars) -> 0 (ran), "
    "1 (declined: nothing touched) or the kernel's negative error code"};

static void kernels_free(PyObject *capsule)
{
    PyMem_Free(PyCapsule_GetPointer(capsule, NULL));
}

/* The function of def with a capsule owning k (PyMem_Malloc'd; freed with the
 * capsule, or here on failure) as its self; records numpy.ndarray. */
static PyObject *bound_function(PyMethodDef *def, void *k, PyObject *ndarray_type)
{
    PyObject *capsule = PyCapsule_New(k, NULL, kernels_free);
    if (capsule == NULL) {
        PyMem_Free(k);
        return NULL;
    }
    PyObject *fn = PyCFunction_NewEx(def, capsule, NULL);
    Py_DECREF(capsule); /* the function holds it */
    if (fn == NULL)
        return NULL;
    if (g_ndarray == NULL) {
        Py_INCREF(ndarray_type);
        g_ndarray = ndarray_type;
    }
    return fn;
}

/* Writeable C-contiguous buffers, with their formats, of args[0..n), each an exact
 * numpy.ndarray; returns how many it got (n, or fewer where the first refusal
 * stopped it: the caller releases those). */
static int get_buffers(PyObject *const *args, Py_buffer *view, int n)
{
    int got = 0;
    for (; got < n; got++)
        if ((PyObject *)Py_TYPE(args[got]) != g_ndarray ||
            PyObject_GetBuffer(args[got], &view[got],
                               PyBUF_WRITABLE | PyBUF_FORMAT | PyBUF_C_CONTIGUOUS) != 0)
            break;
    return got;
}

/* 1 if the n buffers' byte ranges are pairwise disjoint (an empty one overlaps nothing) */
static int pairwise_disjoint(const Py_buffer *view, int n)
{
    for (int i = 0; i < n; i++)
        for (int j = i + 1; j < n; j++) {
            const uintptr_t a = (uintptr_t)view[i].buf, b = (uintptr_t)view[j].buf;
            if (!(view[i].len == 0 || view[j].len == 0 || a + (uintptr_t)view[i].len <= b ||
                  b + (uintptr_t)view[j].len <= a))
                return 0;
        }
    return 1;
}

/* bind(ndarray_type, f32_address, f64_address, max_elements) -> step: a step()
 * that runs these kernels (C functions with fa_adam_f32's and fa_adam_f64's
 * signatures: the C library's, or another backend's compiled to the same ABI)
 * on arrays of at most max_elements elements, and declines larger ones. */
static PyObject *pycall_bind(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    if (nargs != 4 || !PyType_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError,
                        "bind(ndarray_type, f32_address, f64_address, max_elements)");
        return NULL;
    }
    const unsigned long long f32 = PyLong_AsUnsignedLongLong(args[1]);
    const unsigned long long f64 = PyLong_AsUnsignedLongLong(args[2]);
    const long long max_n = PyLong_AsLongLong(args[3]);
    if (PyErr_Occurred())
        return NULL;
    pycall_kernels *k = PyMem_Malloc(sizeof *k);
    if (k == NULL)
        return PyErr_NoMemory();
    k->f32 = (fa_f32_fn)(uintptr_t)f32;
    k->f64 = (fa_f64_fn)(uintptr_t)f64;
    k->max_n = (int64_t)max_n;
    return bound_function(&step_def, k, args[0]);
}

/* AdamScalars (a 14-field tuple, fastadam._scalars) as the ABI's struct; 0 on success. */
static int scalars_from_tuple(PyObject *t, fa_adam_scalars *s)
{
    if (!PyTuple_Check(t) || PyTuple_Size(t) != 14)
        return -1;
    double *d[9] = {&s->step_size, &s->bias_correction2_sqrt, &s->eps, &s->one_minus_beta1,
                    &s->beta2, &s->one_minus_beta2, &s->weight_decay, &s->decay,
                    &s->grad_scale};
    for (int i = 0; i < 9; i++) {
        *d[i] = PyFloat_AsDouble(PyTuple_GetItem(t, i));
        if (*d[i] == -1.0 && PyErr_Occurred())
            return -1;
    }
    int *flag[3] = {&s->unscale, &s->maximize, &s->amsgrad};
    for (int i = 0; i < 3; i++) {
        const int v = PyObject_IsTrue(PyTuple_GetItem(t, 9 + i));
        if (v < 0)
            return -1;
        *flag[i] = v;
    }
    s->state_rounding = (int)PyLong_AsLong(PyTuple_GetItem(t, 12));
    s->rounding_key = (uint32_t)PyLong_AsUnsignedLong(PyTuple_GetItem(t, 13));
    return PyErr_Occurred() ? -1 : 0;
}

/* step(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq or None, scalars) -> int:
 * 0 when the kernel ran, DECLINED when nothing was touched, or the kernel's
 * negative error code. self: the capsule of its pycall_kernels (see bind). */
static PyObject *pycall_step(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    const pycall_kernels *k = PyCapsule_GetPointer(self, NULL);
    if (k == NULL)
        return NULL;
    if (nargs != 6) {
        PyErr_SetString(PyExc_TypeError, "step() takes 6 arguments");
        return NULL;
    }
    fa_adam_scalars sc;
    if (scalars_from_tuple(args[5], &sc) != 0) {
        PyErr_Clear();
        return PyLong_FromLong(DECLINED);
    }
    const int n_arrays = args[4] == Py_None ? 4 : 5;
    if (sc.amsgrad && n_arrays == 4)
        return PyLong_FromLong(DECLINED); /* the Python path names the missing array */
    Py_buffer view[5];
    const int got = get_buffers(args, view, n_arrays);
    int ok = got == n_arrays;
    if (ok) {
        /* one native float format ("f" or "d", nothing else: NumPy spells another
         * byte order "<f"/">f"), one shape, aligned */
        const char *fmt = view[0].format;
        ok = fmt != NULL && (strcmp(fmt, "f") == 0 || strcmp(fmt, "d") == 0);
        for (int i = 0; ok && i < n_arrays; i++) {
            ok = view[i].format != NULL && strcmp(view[i].format, fmt) == 0 &&
                 view[i].ndim == view[0].ndim && view[i].itemsize == view[0].itemsize &&
                 (uintptr_t)view[i].buf % (uintptr_t)view[0].itemsize == 0;
            for (int d = 0; ok && d < view[0].ndim; d++)
                ok = view[i].shape[d] == view[0].shape[d];
        }
        ok = ok && pairwise_disjoint(view, n_arrays);
    }
    int rc = DECLINED;
    if (ok && sc.state_rounding == FA_STATE_SAME_DTYPE) {
        const int64_t n = (int64_t)(view[0].len / view[0].itemsize);
        void *vmax = sc.amsgrad ? view[4].buf : NULL;
        if (n == 0) {
            rc = 0;
        } else if (n > k->max_n) {
            rc = DECLINED;
        } else if (view[0].itemsize == 4 && k->f32 != NULL) {
            Py_BEGIN_ALLOW_THREADS
            rc = k->f32(view[0].buf, view[1].buf, view[2].buf, view[3].buf, vmax, n, &sc);
            Py_END_ALLOW_THREADS
        } else if (view[0].itemsize == 8 && k->f64 != NULL) {
            Py_BEGIN_ALLOW_THREADS
            rc = k->f64(view[0].buf, view[1].buf, view[2].buf, view[3].buf, vmax, n, &sc);
            Py_END_ALLOW_THREADS
        }
    }
    for (int i = 0; i < got; i++)
        PyBuffer_Release(&view[i]);
    PyErr_Clear(); /* a refused buffer request is a decline, not an error */
    return PyLong_FromLong(rc);
}

/* The 8-bit step (issue 18): step_q8, bound by bind_q8 to a kernel with
 * fa_adam_f32_q8's signature; the capsule holds the kernel's address. */
static PyObject *pycall_step_q8(PyObject *self, PyObject *const *args, Py_ssize_t nargs);

static PyMethodDef step_q8_def = {
    "step_q8", (PyCFunction)(void (*)(void))pycall_step_q8, METH_FASTCALL,
    "step_q8(param, grad, exp_avg, exp_avg_sq, exp_avg_absmax, exp_avg_sq_absmax, scalars) "
    "-> 0 (ran), 1 (declined: nothing touched) or the kernel's negative error code"};

/* bind_q8(ndarray_type, q8_address) -> step_q8 */
static PyObject *pycall_bind_q8(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    if (nargs != 2 || !PyType_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "bind_q8(ndarray_type, q8_address)");
        return NULL;
    }
    const unsigned long long q8 = PyLong_AsUnsignedLongLong(args[1]);
    if (PyErr_Occurred())
        return NULL;
    fa_q8_fn *k = PyMem_Malloc(sizeof *k);
    if (k == NULL)
        return PyErr_NoMemory();
    *k = (fa_q8_fn)(uintptr_t)q8;
    return bound_function(&step_q8_def, k, args[0]);
}

/* step_q8(param, grad, exp_avg, exp_avg_sq, exp_avg_absmax, exp_avg_sq_absmax,
 * scalars) -> int, as step() for 8-bit states: it runs the kernel on arrays
 * that pass every rule of fastadam._q8.validate_q8 (float32 param and grad,
 * uint8 codes of their shape, float32 scales of shape (ceil(n / 256),); exact
 * ndarrays, C-contiguous, aligned, writeable, native, pairwise disjoint) with
 * scalars already folded (fastadam._q8.fold) and without amsgrad, else
 * declines. */
static PyObject *pycall_step_q8(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    const fa_q8_fn *k = PyCapsule_GetPointer(self, NULL);
    if (k == NULL)
        return NULL;
    if (nargs != 7) {
        PyErr_SetString(PyExc_TypeError, "step_q8() takes 7 arguments");
        return NULL;
    }
    fa_adam_scalars sc;
    if (scalars_from_tuple(args[6], &sc) != 0) {
        PyErr_Clear();
        return PyLong_FromLong(DECLINED);
    }
    /* each array's buffer format: float32 param, grad; uint8 codes; float32 scales */
    static const char *const formats[6] = {"f", "f", "B", "B", "f", "f"};
    Py_buffer view[6];
    int got = 0, ok = !sc.amsgrad && sc.state_rounding == FA_STATE_SAME_DTYPE;
    if (ok) {
        got = get_buffers(args, view, 6);
        ok = got == 6;
    }
    int64_t n = 0;
    if (ok) {
        for (int i = 0; ok && i < 6; i++)
            ok = view[i].format != NULL && strcmp(view[i].format, formats[i]) == 0 &&
                 (uintptr_t)view[i].buf % (uintptr_t)view[i].itemsize == 0;
        /* param, grad and the codes: one shape; the scales: one per block */
        for (int i = 1; ok && i < 4; i++) {
            ok = view[i].ndim == view[0].ndim;
            for (int d = 0; ok && d < view[0].ndim; d++)
                ok = view[i].shape[d] == view[0].shape[d];
        }
        n = ok ? (int64_t)(view[0].len / view[0].itemsize) : 0;
        const int64_t blocks = n / 256 + (n % 256 != 0);
        for (int i = 4; ok && i < 6; i++)
            ok = view[i].ndim == 1 && view[i].shape[0] == blocks;
        ok = ok && pairwise_disjoint(view, 6);
    }
    int rc = DECLINED;
    if (ok && n == 0) {
        rc = 0;
    } else if (ok) {
        Py_BEGIN_ALLOW_THREADS
        rc = (*k)(view[0].buf, view[1].buf, view[2].buf, view[3].buf, view[4].buf, view[5].buf,
                  n, &sc);
        Py_END_ALLOW_THREADS
    }
    for (int i = 0; i < got; i++)
        PyBuffer_Release(&view[i]);
    PyErr_Clear(); /* a refused buffer request is a decline, not an error */
    return PyLong_FromLong(rc);
}

/* first_readonly(arrays) -> int: the index of the first object of the list
 * ``arrays`` that does not export a writeable C-contiguous buffer, or -1 when
 * every one does. MultiTensorPlan runs it once per step over all its arrays:
 * a buffer request costs a fraction of Python's ``a.flags.writeable``. */
static PyObject *pycall_first_readonly(PyObject *self, PyObject *arg)
{
    (void)self;
    if (!PyList_Check(arg)) {
        PyErr_SetString(PyExc_TypeError, "first_readonly() takes a list");
        return NULL;
    }
    const Py_ssize_t n = PyList_Size(arg);
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_buffer view;
        if (PyObject_GetBuffer(PyList_GetItem(arg, i), &view, PyBUF_WRITABLE) != 0) {
            PyErr_Clear();
            return PyLong_FromSsize_t(i);
        }
        PyBuffer_Release(&view);
    }
    return PyLong_FromLong(-1);
}

static PyMethodDef pycall_methods[] = {
    {"bind", (PyCFunction)(void (*)(void))pycall_bind, METH_FASTCALL,
     "bind(ndarray_type, f32_address, f64_address, max_elements) -> step, a function "
     "step(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, scalars) -> 0 (ran), "
     "1 (declined: nothing touched) or the kernel's negative error code"},
    {"bind_q8", (PyCFunction)(void (*)(void))pycall_bind_q8, METH_FASTCALL,
     "bind_q8(ndarray_type, q8_address) -> step_q8, a function step_q8(param, grad, "
     "exp_avg, exp_avg_sq, exp_avg_absmax, exp_avg_sq_absmax, scalars) -> 0 (ran), "
     "1 (declined: nothing touched) or the kernel's negative error code"},
    {"first_readonly", pycall_first_readonly, METH_O,
     "first_readonly(arrays) -> index of the first array without a writeable buffer, or -1"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef pycall_module = {
    PyModuleDef_HEAD_INIT, "_pycall",
    "fastadam's optional fast path from adam_step to the C kernel (see csrc/fastadam_pycall.c)",
    -1, pycall_methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__pycall(void)
{
    return PyModule_Create(&pycall_module);
}
