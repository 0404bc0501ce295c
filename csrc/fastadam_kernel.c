/*
 * fastadam_kernel.c - the kernels of one ISA variant.
 *
 * This one source is compiled several times (see CMakeLists.txt), each time
 * with different target flags and -DFA_VARIANT=<name>: baseline (the
 * compiler's default target, SSE2 on x86-64), avx2 and avx512. Each object
 * exports one table, fa_kernels_<name>; fastadam.c picks one at run time.
 * Nothing here may run before that choice is made: no constructors, no
 * global initialisers with code, only functions and a constant table.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "fastadam_internal.h"

#ifndef FA_VARIANT
#error "compile with -DFA_VARIANT=baseline, avx2 or avx512 (see CMakeLists.txt)"
#endif

/* x86 FMA, where the variant is compiled for it (avx2 and avx512, both built
 * with -mfma): the kernels then divide by the step's constant
 * bias_correction2_sqrt through its reciprocal, exactly (fastadam_kernel_impl.h,
 * div_bc2), and use FMA nowhere else: -ffp-contract=off keeps every other
 * a*b+c rounded twice. aarch64 divides: with the FMA path GCC left ten of the
 * sixteen loop specialisations unvectorized. */
#if defined(__FMA__) && defined(__x86_64__)
#define FA_HAS_FMA 1
#endif

#define FA_T float
#define FA_UINT uint32_t
#define FA_SQRT sqrtf
#define FA_SUFFIX f32
#ifdef FA_HAS_FMA
#define FA_FMA fmaf
#endif
#include "fastadam_kernel_impl.h"
#undef FA_T
#undef FA_UINT
#undef FA_SQRT
#undef FA_SUFFIX
#undef FA_FMA

#define FA_T double
#define FA_UINT uint64_t
#define FA_SQRT sqrt
#define FA_SUFFIX f64
#ifdef FA_HAS_FMA
#define FA_FMA fma
#endif
#include "fastadam_kernel_impl.h"
#undef FA_T
#undef FA_UINT
#undef FA_SQRT
#undef FA_SUFFIX
#undef FA_FMA

#include "fastadam_kernel_bf16.h"
#include "fastadam_kernel_q8.h"

#define FA_STR_(x) #x
#define FA_STR(x) FA_STR_(x)

#define FA_LIST16(sfx)                                                                  \
    {                                                                                   \
        adam_0_##sfx, adam_1_##sfx, adam_2_##sfx, adam_3_##sfx, adam_4_##sfx,           \
            adam_5_##sfx, adam_6_##sfx, adam_7_##sfx, adam_8_##sfx, adam_9_##sfx,       \
            adam_10_##sfx, adam_11_##sfx, adam_12_##sfx, adam_13_##sfx, adam_14_##sfx,  \
            adam_15_##sfx                                                               \
    }

#define FA_BF16_LIST16(mode)                                                             \
    {                                                                                     \
        fa_adam_bf16_##mode##_0, fa_adam_bf16_##mode##_1, fa_adam_bf16_##mode##_2,        \
            fa_adam_bf16_##mode##_3, fa_adam_bf16_##mode##_4, fa_adam_bf16_##mode##_5,    \
            fa_adam_bf16_##mode##_6, fa_adam_bf16_##mode##_7, fa_adam_bf16_##mode##_8,    \
            fa_adam_bf16_##mode##_9, fa_adam_bf16_##mode##_10, fa_adam_bf16_##mode##_11,  \
            fa_adam_bf16_##mode##_12, fa_adam_bf16_##mode##_13, fa_adam_bf16_##mode##_14, \
            fa_adam_bf16_##mode##_15                                                      \
    }

const fa_kernel_table FA_TABLE_NAME(FA_VARIANT) = {
    FA_STR(FA_VARIANT),
    FA_LIST16(f32),
    FA_LIST16(f64),
    {FA_BF16_LIST16(0), FA_BF16_LIST16(1)}, /* [FA_BF16_NEAREST], [FA_BF16_STOCHASTIC] */
    unscale_f32,
    unscale_f64,
    FA_Q8_LIST16,
};

/* low-precision parameters and master weights (issue 17): fastadam_lowp_kernel.h */
#include "fastadam_lowp_kernel.h"
