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
 * float once per call for fa_adam_f32), in exactly this order, with every
 * operation rounded as NumPy rounds it (no contracted multiply-add), so results
 * are bit-identical to NumPy doing the same operations, whatever the CPU variant
 * or thread count. (The avx2 variant divides by bias_correction2_sqrt through
 * its reciprocal and an FMA correction, which gives the division's bits.)
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
#define FA_ERR_SIZE (-2)     /* n < 0, n past the address space, a bad first_index; multi:
                                count < 0 or the sum of n past int64_t */
#define FA_ERR_AMSGRAD (-3)  /* amsgrad set but max_exp_avg_sq is NULL */
#define FA_ERR_OVERLAP (-4)  /* two of the arrays used by the step overlap in memory */
#define FA_ERR_THREADS (-5)  /* fa_set_num_threads: n < 0 */
#define FA_ERR_ROUNDING (-6) /* state_rounding does not suit the function (see below) */
#define FA_ERR_INDEX (-7)    /* fa_adam_multi_*: a scalar_index entry outside [0, n_scalars) */
#define FA_ERR_UNSUPPORTED (-8) /* an option the function does not support (amsgrad with 8-bit states) */

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
    int state_rounding;           /* FA_STATE_* below: how the moments are stored */
    uint32_t rounding_key;        /* seeds the stochastic-rounding bits of this step */
} fa_adam_scalars;

/* fa_adam_scalars.state_rounding. fa_adam_f32/f64 need FA_STATE_SAME_DTYPE;
 * fa_adam_f32_bf16 needs one of the two bfloat16 modes. */
#define FA_STATE_SAME_DTYPE 0       /* moments have the parameters' type */
#define FA_STATE_BF16_NEAREST 1     /* bfloat16 moments, rounded to nearest-even */
#define FA_STATE_BF16_STOCHASTIC 2  /* bfloat16 moments, rounded stochastically */

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
 * The same step with float32 param/grad and bfloat16 moments (each uint16_t
 * holds the upper 16 bits of a float32). sc->state_rounding must be
 * FA_STATE_BF16_NEAREST or FA_STATE_BF16_STOCHASTIC (else FA_ERR_ROUNDING).
 * The update runs in float32 on the widened moments (bits << 16, exact); the
 * new m and v are rounded to bfloat16 and stored, and the parameter update
 * uses the stored values:
 *
 *     u = float32 bits of m (or v), r16 = 16 random bits (below)
 *     stochastic:    (u + r16) >> 16
 *     nearest-even:  (u + 0x7FFF + ((u >> 16) & 1)) >> 16
 *     NaN:           (u >> 16) | 0x0040          (quiet, sign kept)
 *     m, v = widened stored values; vmax = max(widened vmax, v) (amsgrad; NaN wins)
 *     denom, p as for float32, from these m and v (or vmax)
 *
 * Element i (its index in the whole array, 64-bit) uses the 32 bits
 *     r = mix32(lo32(i) ^ mix32(rounding_key ^ hi32(i)))
 * (m takes r & 0xFFFF, v takes r >> 16), with the hash
 *     x ^= x >> 16; x *= 0x7FEB352D; x ^= x >> 15; x *= 0x846CA68B; x ^= x >> 16
 * in uint32 arithmetic: the bits depend on (rounding_key, i) only, never on
 * the thread count or the CPU variant. Nearest-even ignores rounding_key.
 * compute_scalars gives bfloat16 steps bias_correction2_sqrt == 1.0 (the
 * bias correction folded into step_size and eps); the kernel then skips that
 * (exact) division, one divider operation fewer per element.
 */
FA_API int fa_adam_f32_bf16(float *param, float *grad, uint16_t *exp_avg, uint16_t *exp_avg_sq,
                            uint16_t *max_exp_avg_sq, int64_t n, const fa_adam_scalars *sc);

/*
 * fa_adam_f32_bf16 over elements [first_index, first_index + n) of a larger
 * logical array whose element first_index is at param[0] (and exp_avg[0], ...):
 * the random bits are those of the global indices, so stepping an array in
 * pieces gives the same bits as one call. first_index must be >= 0 and
 * first_index + n must not overflow int64_t (else FA_ERR_SIZE).
 */
FA_API int fa_adam_f32_bf16_at(float *param, float *grad, uint16_t *exp_avg,
                               uint16_t *exp_avg_sq, uint16_t *max_exp_avg_sq, int64_t n,
                               int64_t first_index, const fa_adam_scalars *sc);

/*
 * Multi-tensor steps: one call updates `count` tensors, tensor i being the
 * n[i] elements at param[i], grad[i], exp_avg[i], exp_avg_sq[i] (and
 * max_exp_avg_sq[i]), each as the single-array function would update it:
 *
 *     tensor i uses scalars[scalar_index[i]], or scalars[0] if scalar_index
 *     is NULL (tensors with different step counts share one call);
 *     fa_adam_multi_f32_bf16: rounding_keys[i] replaces the rounding_key of
 *     tensor i's scalars (NULL: the struct's own), and the random bits of its
 *     element j are those of index j under that key.
 *
 * The results are bit-identical to one fa_adam_f32 / fa_adam_f64 /
 * fa_adam_f32_bf16 call per tensor, whatever the thread count: the work is
 * split by elements over the concatenation of the tensors (one parallel
 * region per call, the team sized by the total element count as for one
 * array), so a call over many small tensors uses the threads that one large
 * array of the same total would, and pays one fork/join instead of one per
 * tensor.
 *
 * Every pointer table (param ... exp_avg_sq, n) must be non-NULL, even when
 * count == 0; max_exp_avg_sq (the table) may be NULL when no tensor's scalars
 * have amsgrad, and its entries are read only for tensors whose scalars do.
 * scalars must be non-NULL when count > 0. Checked before anything is
 * written (every array is untouched on error): count >= 0 (FA_ERR_SIZE);
 * each scalar_index entry in [0, n_scalars) (FA_ERR_INDEX; with scalar_index
 * NULL, n_scalars >= 1 when count > 0); then per tensor, as the single-array
 * functions check one array set: its array pointers non-NULL (FA_ERR_NULL),
 * n[i] >= 0 and within the address space (FA_ERR_SIZE), max_exp_avg_sq
 * present with amsgrad (FA_ERR_AMSGRAD), its own arrays disjoint from one
 * another (FA_ERR_OVERLAP), state_rounding suited to the function
 * (FA_ERR_ROUNDING); and the sum of n fits in int64_t (FA_ERR_SIZE).
 *
 * Not checked, the caller's contract: arrays of different tensors must not
 * overlap (checking it would take an allocation or O(count^2) work;
 * fastadam.multi checks it once per plan), and neither the tables, n,
 * scalars, scalar_index nor rounding_keys may change during the call (they
 * are read once for the checks and again for the step). The library reads
 * each table entry, allocates nothing, and accesses exactly elements
 * [0, n[i]) of tensor i's arrays.
 */
FA_API int fa_adam_multi_f32(int64_t count, float *const *param, float *const *grad,
                             float *const *exp_avg, float *const *exp_avg_sq,
                             float *const *max_exp_avg_sq, const int64_t *n,
                             const fa_adam_scalars *scalars, int64_t n_scalars,
                             const int32_t *scalar_index);
FA_API int fa_adam_multi_f64(int64_t count, double *const *param, double *const *grad,
                             double *const *exp_avg, double *const *exp_avg_sq,
                             double *const *max_exp_avg_sq, const int64_t *n,
                             const fa_adam_scalars *scalars, int64_t n_scalars,
                             const int32_t *scalar_index);
FA_API int fa_adam_multi_f32_bf16(int64_t count, float *const *param, float *const *grad,
                                  uint16_t *const *exp_avg, uint16_t *const *exp_avg_sq,
                                  uint16_t *const *max_exp_avg_sq, const int64_t *n,
                                  const fa_adam_scalars *scalars, int64_t n_scalars,
                                  const int32_t *scalar_index, const uint32_t *rounding_keys);

/*
 * Mixed-precision loss-scaling helper, one pass: grad[i] = grad[i] / (T)grad_scale
 * for i in [0, n) (a correctly rounded division, like the unscale of the step),
 * and *found_inf = 1 if any result is NaN or +-Inf, else 0. grad and found_inf
 * must not be NULL (even when n == 0, which sets *found_inf = 0).
 * Returns FA_OK, FA_ERR_NULL or FA_ERR_SIZE (n < 0); nothing is written on error.
 */
/*
 * 8-bit block-wise states (issue 18; the format is fastadam/_q8.py's): float32
 * param and grad of n elements, exp_avg / exp_avg_sq uint8 codes (n each),
 * exp_avg_absmax / exp_avg_sq_absmax float32 scales, one per block of 256
 * elements (ceil(n / 256)). All updated in place; amsgrad is refused
 * (FA_ERR_UNSUPPORTED), state_rounding must be FA_STATE_SAME_DTYPE. The
 * multi-tensor form takes pointer tables as fa_adam_multi_f32 does; overlaps
 * are not checked. Results do not depend on the thread count.
 */
FA_API int fa_adam_f32_q8(float *param, float *grad, uint8_t *exp_avg, uint8_t *exp_avg_sq,
                          float *exp_avg_absmax, float *exp_avg_sq_absmax, int64_t n,
                          const fa_adam_scalars *sc);
FA_API int fa_adam_multi_f32_q8(int64_t count, float *const *param, float *const *grad,
                                uint8_t *const *exp_avg, uint8_t *const *exp_avg_sq,
                                float *const *exp_avg_absmax, float *const *exp_avg_sq_absmax,
                                const int64_t *n, const fa_adam_scalars *scalars,
                                int64_t n_scalars, const int32_t *scalar_index);

FA_API int fa_unscale_check_f32(float *grad, int64_t n, double grad_scale, int *found_inf);
FA_API int fa_unscale_check_f64(double *grad, int64_t n, double grad_scale, int *found_inf);

/*
 * Threads used by later steps that are large enough to be worth splitting
 * (process-wide). n >= 1 sets the count (clamped to 4096); n == 0 restores
 * the default, the number of CPUs this process may run on (its affinity mask).
 * Steps under 32768 elements (multi-tensor steps: in total) always run on the
 * calling thread, and so does every step in the child of a fork().
 * Returns FA_OK or FA_ERR_THREADS.
 *
 * A library built without OpenMP (Apple clang has none; CMake option
 * FASTADAM_OPENMP=OFF) runs every step on the calling thread:
 * fa_set_num_threads still rejects n < 0 and accepts any other n, which then
 * has no effect, and fa_get_num_threads always returns 1.
 */
FA_API int fa_set_num_threads(int n);
FA_API int fa_get_num_threads(void);

/* Which compiled variant runs: "avx512" (AVX-512 F, VL and BW), "avx2" or
 * "baseline". The best one the CPU supports is chosen once; the environment
 * variable FASTADAM_ISA (read once, at the first call) may force a lower one,
 * never a higher one. */
FA_API const char *fa_isa(void);

/* A static, human-readable description of a return code. */
FA_API const char *fa_strerror(int code);

#ifdef __cplusplus
}
#endif

#endif /* FASTADAM_H */
