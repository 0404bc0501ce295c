/*
 * fastadam_lowp_internal.h - what the low-precision dispatcher
 * (fastadam_lowp.c) and the per-ISA low-precision kernels
 * (fastadam_lowp_kernel.h, included by fastadam_kernel.c) share.
 * Not installed; not part of the ABI.
 */
#ifndef FASTADAM_LOWP_INTERNAL_H
#define FASTADAM_LOWP_INTERNAL_H

#include <stdint.h>

#include "fastadam_internal.h"

/* One kernel call: elements [0, n) of a tensor's arrays; first_index is the
 * index of element 0 in the whole tensor (the stochastic rounding bits are a
 * function of it), key the tensor's rounding key. */
typedef struct fa_lowp_piece {
    void *param, *grad, *exp_avg, *exp_avg_sq, *max_exp_avg_sq, *copy;
    int64_t n, first_index;
    uint32_t key;
} fa_lowp_piece;

/* flags: the OR of fastadam_internal.h's FA_F_* bits. */
typedef void (*fa_lowp_kernel)(const fa_lowp_piece *pc, const fa_scalars_f32 *s, int flags);

/* Kinds; the values are those of fastadam_lowp.h's FA_LOWP_*. */
#define FA_LOWP_N_KINDS 9

typedef struct fa_lowp_table {
    fa_lowp_kernel k[FA_LOWP_N_KINDS][4]; /* [kind][rounding bits, fastadam_lowp.h]; NULL: none */
} fa_lowp_table;

#define FA_LOWP_TABLE_NAME_(v) fa_lowp_kernels_##v
#define FA_LOWP_TABLE_NAME(v) FA_LOWP_TABLE_NAME_(v)

extern const fa_lowp_table fa_lowp_kernels_baseline;
extern const fa_lowp_table fa_lowp_kernels_avx2;
extern const fa_lowp_table fa_lowp_kernels_avx512;

#endif /* FASTADAM_LOWP_INTERNAL_H */
