/*
 * fastadam_internal.h - what the dispatcher (fastadam.c) and the per-ISA
 * kernel objects (fastadam_kernel.c, compiled once per ISA) share.
 * Not installed; not part of the ABI.
 */
#ifndef FASTADAM_INTERNAL_H
#define FASTADAM_INTERNAL_H

#include <stdint.h>

/* The scalars already rounded to the arrays' type by the dispatcher (once
 * per kernel call: per piece of a multi-tensor step, each piece from its own
 * tensor's scalars): every variant and every thread then starts from the
 * same constants. */
typedef struct fa_scalars_f32 {
    float step_size, bias_correction2_sqrt, eps, one_minus_beta1, beta2, one_minus_beta2,
        weight_decay, decay, grad_scale,
        bias_correction2_rcp; /* RN(1 / bias_correction2_sqrt), or 0: divide (see div_bc2) */
} fa_scalars_f32;

typedef struct fa_scalars_f64 {
    double step_size, bias_correction2_sqrt, eps, one_minus_beta1, beta2, one_minus_beta2,
        weight_decay, decay, grad_scale,
        bias_correction2_rcp; /* RN(1 / bias_correction2_sqrt), or 0: divide (see div_bc2) */
} fa_scalars_f64;

/* The double scalars rounded to float once, by C's conversion (round to
 * nearest even, like NumPy's float64 -> float32 cast). The kernels divide by
 * bias_correction2_sqrt b through its reciprocal RN(1/b), in T, where that is
 * exact: b in [2^-40, 2] (fastadam_kernel_impl.h, div_bc2); else 0 says divide. */
#define FA_BC2_RCP(T, b) ((b) >= (T)0x1p-40 && (b) <= (T)2 ? (T)1 / (b) : (T)0)
#define FA_ROUND_SCALARS(T, sc)                                                            \
    {                                                                                      \
        (T)(sc)->step_size,       (T)(sc)->bias_correction2_sqrt, (T)(sc)->eps,            \
        (T)(sc)->one_minus_beta1, (T)(sc)->beta2,                 (T)(sc)->one_minus_beta2, \
        (T)(sc)->weight_decay,    (T)(sc)->decay,                 (T)(sc)->grad_scale,     \
        FA_BC2_RCP(T, (T)(sc)->bias_correction2_sqrt),                                     \
    }

/* A kernel updates elements [0, n) of its (non-overlapping) arrays. vmax is
 * only touched by the amsgrad specialisations. */
typedef void (*fa_kernel_f32)(float *param, float *grad, float *exp_avg, float *exp_avg_sq,
                              float *max_exp_avg_sq, int64_t n, const fa_scalars_f32 *s);
typedef void (*fa_kernel_f64)(double *param, double *grad, double *exp_avg, double *exp_avg_sq,
                              double *max_exp_avg_sq, int64_t n, const fa_scalars_f64 *s);
/* float32 param/grad, bfloat16 moments. first_index is the index of element 0
 * in the whole array (the random bits are a function of it), key the step's
 * rounding_key (unused by the nearest-even kernels). */
typedef void (*fa_kernel_bf16)(float *param, float *grad, uint16_t *exp_avg,
                               uint16_t *exp_avg_sq, uint16_t *max_exp_avg_sq, int64_t n,
                               int64_t first_index, const fa_scalars_f32 *s, uint32_t key);
/* grad[i] /= scale over [0, n); returns nonzero if any result is NaN or +-Inf.
 * recip is 0, or the exact reciprocal of a power-of-two scale (then the kernel
 * multiplies, which gives the same bits). */
typedef int (*fa_unscale_f32)(float *grad, int64_t n, float scale, float recip);
typedef int (*fa_unscale_f64)(double *grad, int64_t n, double scale, double recip);

/*
 * Software prefetch: every loop asks for the cache line FA_PREFETCH_BYTES of
 * param ahead of the one it works on (the same element distance in the other
 * arrays). The hardware streamer stops at each 4 KiB page boundary, so
 * without this each stream stalls on the first lines of every new page.
 * The distance is a compromise between two machines, each measured side by
 * side in one process (BENCHMARKS.md, "Software prefetch distance"): on the
 * first (session 2) 4 KiB ran 5-25% faster than no prefetch at memory-bound
 * sizes and 2-6 KiB were as good; on an AMD Zen 4 (session 7) 4 KiB was
 * 13-20% *slower* than none at 2^24 float32, while 1 KiB matched none and
 * torch's fused step. 1 KiB still reaches into the next page a quarter of a
 * page early.
 * Each loop stops prefetching FA_PREFETCH_BYTES before the end of its own
 * share of the arrays. Past it lie another thread's share (or no array):
 * prefetching those lines pulled lines that another core was writing into
 * this one's cache, and a 2-thread step at 2^15-2^17 elements paid ~5 us for
 * it (float32 at 2^16: 24.8 vs 19.2 us, measured side by side).
 * The address is formed as an integer: no out-of-bounds pointer arithmetic.
 */
#define FA_PREFETCH_BYTES 1024

/*
 * The bfloat16-state loops' distance, in elements of param
 * (fastadam_kernel_bf16.h), set once by fa_init from the CPU's vendor: 4 KiB
 * on Intel, FA_PREFETCH_BYTES elsewhere. On an Intel Xeon (AVX-512, session
 * 18) 4 KiB took that step 1.10-1.12x faster than 1 KiB at 2^24-2^26 elements
 * on two threads and was level at 2^16 and 2^22, while 8 KiB was slower at
 * 2^26 and the float32 loop gained nothing from 2 or 4 KiB; on the AMD Zen 4
 * of session 7, 4 KiB was 5% slower than 1 KiB for these states (and 13-48%
 * for float32). BENCHMARKS.md, "Software prefetch distance".
 */
#define FA_BF16_PREFETCH_BYTES_INTEL 4096
extern int64_t fa_bf16_prefetch_elements;
#define FA_PREFETCH(ptr, ahead) \
    __builtin_prefetch((const void *)((uintptr_t)(ptr) + (uintptr_t)(ahead) * sizeof *(ptr)), 0, 3)

/* Each per-call flag selects a specialised loop instead of branching inside
 * it; a kernel table is indexed by the OR of these bits. */
#define FA_F_L2 1       /* weight_decay != 0 */
#define FA_F_AMSGRAD 2
#define FA_F_UNSCALE 4
#define FA_F_MAXIMIZE 8
#define FA_N_VARIANTS 16

/* bf16 kernels come in two rounding modes, indexed by state_rounding - 1. */
#define FA_BF16_NEAREST 0
#define FA_BF16_STOCHASTIC 1

/* Elements per block of the 8-bit states, each block with its own scale
 * (fastadam/_q8.py's BLOCK): the kernels and the driver's work split. */
#define FA_Q8_BLOCK 256

/* float32 param/grad, 8-bit block-wise moments (fastadam_kernel_q8.h): n
 * elements from a block boundary, am/av the scales of their blocks. */
typedef void (*fa_kernel_q8)(float *param, float *grad, uint8_t *exp_avg, uint8_t *exp_avg_sq,
                             float *exp_avg_absmax, float *exp_avg_sq_absmax, int64_t n,
                             const fa_scalars_f32 *s);

typedef struct fa_kernel_table {
    const char *isa;
    fa_kernel_f32 f32[FA_N_VARIANTS];
    fa_kernel_f64 f64[FA_N_VARIANTS];
    fa_kernel_bf16 bf16[2][FA_N_VARIANTS];
    fa_unscale_f32 unscale_f32;
    fa_unscale_f64 unscale_f64;
    fa_kernel_q8 q8[FA_N_VARIANTS]; /* indexed by the flags; FA_F_AMSGRAD ignored */
} fa_kernel_table;

/* One table per compiled ISA variant (fastadam_kernel.c with FA_VARIANT set).
 * Which ones exist is decided by the build (FA_HAVE_AVX2 / FA_HAVE_AVX512). */
#define FA_TABLE_NAME_(v) fa_kernels_##v
#define FA_TABLE_NAME(v) FA_TABLE_NAME_(v)

extern const fa_kernel_table fa_kernels_baseline;
extern const fa_kernel_table fa_kernels_avx2;
extern const fa_kernel_table fa_kernels_avx512;

#endif /* FASTADAM_INTERNAL_H */
