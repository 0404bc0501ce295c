/*
 * fastadam_lowp.h - low-precision parameters (bfloat16, float16) and float32
 * master weights with a low-precision copy (issue 17). Part of libfastadam_c's
 * ABI, beside fastadam.h (whose fa_adam_scalars and FA_ERR_* it uses).
 *
 * The math is fastadam.h's, in float32 arithmetic, in torch's fused CPU order
 * (aten/src/ATen/native/cpu/FusedAdamKernel.cpp for reduced floating types):
 * the parameter, gradient and moments are widened to float32, updated, and
 * rounded to nearest-even when stored; the parameter update uses the float32
 * moments, not their rounded copies. With master weights, param is the
 * float32 master and copy receives its updated value rounded in the same
 * pass. The rounded parameter (the copy, or a bfloat16/float16 parameter's
 * own value) is rounded to nearest-even or stochastically (32 random bits r,
 * the same counter hash as fastadam.h's bfloat16 states: bfloat16 takes
 * r & 0xFFFF, float16 the rule of fastadam._lowp._round_f16).
 * Low-precision parameters may keep float32, bfloat16 or float16 moments
 * (the kinds below); bfloat16 moments may be rounded stochastically too,
 * with r2 = mix32(r): exp_avg r2 & 0xFFFF, exp_avg_sq and max_exp_avg_sq
 * r2 >> 16.
 */
#ifndef FASTADAM_LOWP_H
#define FASTADAM_LOWP_H

#include "fastadam.h"

#ifdef __cplusplus
extern "C" {
#endif

/* kinds: what the tables point to (param / grad / moments / copy) */
#define FA_LOWP_BF16 0          /* bf16 / bf16 / bf16 / none */
#define FA_LOWP_F16 1           /* f16 / f16 / f16 / none */
#define FA_LOWP_MASTER_BF16 2   /* f32 / f32 / f32 / bf16 */
#define FA_LOWP_MASTER_BF16_G 3 /* f32 / bf16 / f32 / bf16 */
#define FA_LOWP_MASTER_F16 4    /* f32 / f32 / f32 / f16 */
#define FA_LOWP_MASTER_F16_G 5  /* f32 / f16 / f32 / f16 */
#define FA_LOWP_BF16_S32 6      /* bf16 / bf16 / f32 / none */
#define FA_LOWP_F16_S32 7       /* f16 / f16 / f32 / none */
#define FA_LOWP_F16_SBF16 8     /* f16 / f16 / bf16 / none */

/* param_rounding: bits. 0 rounds everything to nearest-even. */
#define FA_LOWP_NEAREST 0
#define FA_LOWP_STOCHASTIC 1       /* the parameter (or the master kinds' copy) */
#define FA_LOWP_STOCHASTIC_STATE 2 /* the moments: kinds with bfloat16 moments only
                                      (FA_LOWP_BF16, FA_LOWP_F16_SBF16) */

/*
 * One step over `count` tensors of one kind, as fa_adam_multi_f32 (tables of
 * pointers, n[t] elements each, scalars[scalar_index[t]] or scalars[0]); copy
 * is NULL except for the master kinds; rounding_keys (NULL: each scalars'
 * rounding_key) only for stochastic rounding. param_rounding is an OR of
 * the FA_LOWP_STOCHASTIC* bits (a bit a kind lacks: FA_ERR_ROUNDING). The scalars' state_rounding
 * must be FA_STATE_SAME_DTYPE. Returns FA_OK or an FA_ERR_* code (nothing
 * written then).
 */
FA_API int fa_adam_lowp_multi(int kind, int param_rounding, int64_t count,
                              void *const *param, void *const *grad, void *const *exp_avg,
                              void *const *exp_avg_sq, void *const *max_exp_avg_sq,
                              void *const *copy, const int64_t *n,
                              const fa_adam_scalars *scalars, int64_t n_scalars,
                              const int32_t *scalar_index, const uint32_t *rounding_keys);

#ifdef __cplusplus
}
#endif

#endif /* FASTADAM_LOWP_H */
