/*
 * fastadam.h - plain C ABI of the fastadam fused Adam/AdamW update kernel.
 *
 * One call applies one optimizer step to n contiguous elements, in place:
 *
 *     g = grad / grad_scale            only if unscale; g is written back to grad
 *     g = -g                           only if maximize
 *     g = g + weight_decay * p         only if weight_decay != 0 (Adam, L2)
 *     p = p * decay                    decay == 1 - lr*wd for AdamW, else 1.0
 *     m = m + (g - m) * one_minus_beta1
 *     v = v * beta2 + one_minus_beta2 * g * g
 *     vmax = max(vmax, v)              only if amsgrad (NaN propagates)
 *     denom = sqrt(vmax or v) / bias_correction2_sqrt + eps
 *     p = p - step_size * m / denom
 *
 * All arithmetic is in the arrays' type (each double scalar is rounded to
 * float once per call for fa_adam_f32), in exactly this order, with no fused
 * multiply-add, so results are bit-identical to NumPy doing the same
 * operations, whatever the CPU variant or thread count.
 *
 * The scalars are derived by fastadam._scalars.compute_scalars (Python); the
 * fields of fa_adam_scalars mirror AdamScalars there, in the same order.
 *
 * Thread safety: fa_adam_* may be called concurrently from several threads on
 * disjoint buffers. After fork() the child process runs every step on the
 * calling thread (GNU OpenMP cannot be used in a forked child).
 */
#ifndef FASTADAM_H
#define FASTADAM_H

#include <stdint.h>

#if defined(_WIN32)
#  if defined(FASTADAM_BUILDING)
#    define FA_API __declspec(dllexport)
#  else
#    define FA_API __declspec(dllimport)
#  endif
#elif defined(__GNUC__)
#  define FA_API __attribute__((visibility("default")))
#else
#  define FA_API
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* Return codes. 0 is success; errors are negative and leave every array untouched. */
#define FA_OK 0
#define FA_ERR_NULL (-1)     /* a required pointer (array or scalars) is NULL */
#define FA_ERR_SIZE (-2)     /* n < 0 */
#define FA_ERR_AMSGRAD (-3)  /* amsgrad set but max_exp_avg_sq is NULL */
#define FA_ERR_OVERLAP (-4)  /* two of the arrays used by the step overlap in memory */
#define FA_ERR_THREADS (-5)  /* fa_set_num_threads: n < 0 */

/* Constants of one step, in double precision (see the update above). */
typedef struct fa_adam_scalars {
    double step_size;             /* lr / (1 - beta1^t) */
    double bias_correction2_sqrt; /* sqrt(1 - beta2^t) */
    double eps;
    double one_minus_beta1;
    double beta2;
    double one_minus_beta2;
    double weight_decay;          /* L2 coefficient added to the gradient; 0 for AdamW */
    double decay;                 /* AdamW's 1 - lr*wd; 1.0 for Adam */
    double grad_scale;            /* divisor of the gradient when unscale is set */
    int unscale;                  /* nonzero: grad /= grad_scale, written back to grad */
    int maximize;                 /* nonzero: ascend instead of descend */
    int amsgrad;                  /* nonzero: keep the running max of v in max_exp_avg_sq */
} fa_adam_scalars;

/*
 * One Adam/AdamW step over n elements of each array, updated in place.
 *
 * param, grad, exp_avg, exp_avg_sq and sc must not be NULL, even when n == 0
 * (then the call is a successful no-op); max_exp_avg_sq is only read and
 * written when sc->amsgrad is set, and must then be non-NULL too.
 * The arrays in use must not overlap one another. The library accesses
 * exactly elements [0, n) of each array and allocates nothing.
 * Returns FA_OK or a negative FA_ERR_* code (nothing is modified on error).
 */
FA_API int fa_adam_f32(float *param, float *grad, float *exp_avg, float *exp_avg_sq,
                       float *max_exp_avg_sq, int64_t n, const fa_adam_scalars *sc);
FA_API int fa_adam_f64(double *param, double *grad, double *exp_avg, double *exp_avg_sq,
                       double *max_exp_avg_sq, int64_t n, const fa_adam_scalars *sc);

/*
 * Threads used by later steps that are large enough to be worth splitting
 * (process-wide). n >= 1 sets the count (clamped to 4096); n == 0 restores
 * the default, the number of CPUs this process may run on (its affinity mask).
 * Steps under 32768 elements always run on the calling thread, and so does
 * every step in the child of a fork(). Returns FA_OK or FA_ERR_THREADS.
 */
FA_API int fa_set_num_threads(int n);
FA_API int fa_get_num_threads(void);

/* Which compiled variant runs: "avx512", "avx2" or "baseline". The best one
 * the CPU supports is chosen once; the environment variable FASTADAM_ISA
 * (read once, at the first call) may force a lower one, never a higher one. */
FA_API const char *fa_isa(void);

/* A static, human-readable description of a return code. */
FA_API const char *fa_strerror(int code);

#ifdef __cplusplus
}
#endif

#endif /* FASTADAM_H */
