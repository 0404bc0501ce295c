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
 * The library is not linked: setup() receives the addresses of its
 * fa_adam_f32/fa_adam_f64 (fastadam.backends.c, from the library it loaded).
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

static PyObject *g_ndarray;  /* numpy.ndarray (a strong reference) */
static fa_f32_fn g_f32;
static fa_f64_fn g_f64;

/* step()'s answer when it ran nothing: the caller takes the Python path. */
#define DECLINED 1

/* setup(ndarray_type, f32_address, f64_address) */
static PyObject *pycall_setup(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    if (nargs != 3 || !PyType_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "setup(ndarray_type, f32_address, f64_address)");
        return NULL;
    }
    const unsigned long long f32 = PyLong_AsUnsignedLongLong(args[1]);
    const unsigned long long f64 = PyLong_AsUnsignedLongLong(args[2]);
    if (PyErr_Occurred())
        return NULL;
    PyObject *old = g_ndarray;
    Py_INCREF(args[0]);
    g_ndarray = args[0];
    Py_XDECREF(old);
    g_f32 = (fa_f32_fn)(uintptr_t)f32;
    g_f64 = (fa_f64_fn)(uintptr_t)f64;
    Py_RETURN_NONE;
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
 * 0 when the kernel ran, DECLINED when nothing was touched, or the library's
 * negative error code. */
static PyObject *pycall_step(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    if (nargs != 6) {
        PyErr_SetString(PyExc_TypeError, "step() takes 6 arguments");
        return NULL;
    }
    fa_adam_scalars sc;
    if (g_ndarray == NULL || scalars_from_tuple(args[5], &sc) != 0) {
        PyErr_Clear();
        return PyLong_FromLong(DECLINED);
    }
    const int n_arrays = args[4] == Py_None ? 4 : 5;
    if (sc.amsgrad && n_arrays == 4)
        return PyLong_FromLong(DECLINED); /* the Python path names the missing array */
    Py_buffer view[5];
    int got = 0, ok = 1;
    for (; got < n_arrays; got++) {
        if ((PyObject *)Py_TYPE(args[got]) != g_ndarray ||
            PyObject_GetBuffer(args[got], &view[got],
                               PyBUF_WRITABLE | PyBUF_FORMAT | PyBUF_C_CONTIGUOUS) != 0) {
            ok = 0;
            break;
        }
    }
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
        /* pairwise disjoint (an empty array overlaps nothing) */
        for (int i = 0; ok && i < n_arrays; i++)
            for (int j = i + 1; ok && j < n_arrays; j++) {
                const uintptr_t a = (uintptr_t)view[i].buf, b = (uintptr_t)view[j].buf;
                ok = view[i].len == 0 || view[j].len == 0 ||
                     a + (uintptr_t)view[i].len <= b || b + (uintptr_t)view[j].len <= a;
            }
    }
    int rc = DECLINED;
    if (ok && sc.state_rounding == FA_STATE_SAME_DTYPE) {
        const int64_t n = (int64_t)(view[0].len / view[0].itemsize);
        void *vmax = sc.amsgrad ? view[4].buf : NULL;
        if (n == 0) {
            rc = 0;
        } else if (view[0].itemsize == 4 && g_f32 != NULL) {
            Py_BEGIN_ALLOW_THREADS
            rc = g_f32(view[0].buf, view[1].buf, view[2].buf, view[3].buf, vmax, n, &sc);
            Py_END_ALLOW_THREADS
        } else if (view[0].itemsize == 8 && g_f64 != NULL) {
            Py_BEGIN_ALLOW_THREADS
            rc = g_f64(view[0].buf, view[1].buf, view[2].buf, view[3].buf, vmax, n, &sc);
            Py_END_ALLOW_THREADS
        }
    }
    for (int i = 0; i < got; i++)
        PyBuffer_Release(&view[i]);
    PyErr_Clear(); /* a refused buffer request is a decline, not an error */
    return PyLong_FromLong(rc);
}

static PyMethodDef pycall_methods[] = {
    {"setup", (PyCFunction)(void (*)(void))pycall_setup, METH_FASTCALL,
     "setup(ndarray_type, f32_address, f64_address): the kernels step() calls"},
    {"step", (PyCFunction)(void (*)(void))pycall_step, METH_FASTCALL,
     "step(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, scalars) -> 0 (ran), "
     "1 (declined: nothing touched) or the library's negative error code"},
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
