/*
 * fastadam_kernel_impl.h - the element-wise update loop, written once and
 * instantiated per element type by fastadam_kernel.c (which defines FA_T,
 * FA_UINT (the unsigned integer of FA_T's width), FA_SQRT and FA_SUFFIX before
 * including this file; no include guard on purpose).
 *
 * The loop is plain C that GCC -O3 auto-vectorizes for whatever ISA the
 * translation unit is compiled for. Correctness rules it relies on:
 *   - -ffp-contract=off: no a*b+c fused into an FMA (it would round once
 *     instead of twice and differ from NumPy);
 *   - no -ffast-math: no reassociation, no reciprocal approximations, and
 *     x / y stays a correctly rounded division (NumPy divides, so must we);
 *   - -fno-math-errno: lets sqrt become a single (correctly rounded) vector
 *     instruction, with no errno side path for negative inputs;
 *   - restrict pointers: the caller guarantees the arrays do not overlap,
 *     so no runtime alias checks are needed.
 */

#define FA_CAT_(a, b) a##_##b
#define FA_CAT(a, b) FA_CAT_(a, b)
#define FA_FN(name) FA_CAT(name, FA_SUFFIX)

/*
 * a / c.bias_correction2_sqrt, correctly rounded (the bits of the division),
 * for the a = sqrt(v) this is called with: +0, a normal number >= 2^-75
 * (float; 2^-537 double), +Inf or NaN.
 *
 * Where the ISA has a fused multiply-add (FA_FMA, see fastadam_kernel.c), the
 * division by this per-call constant b is done from its reciprocal
 * y = RN(1/b) (c.bias_correction2_rcp): q0 = RN(a*y) is within one ulp of
 * a/b, the remainder r = a - b*q0 is exact in one FMA, and RN(q0 + r*y) is
 * the correctly rounded quotient (Markstein's theorem; J.-M. Muller,
 * "Accelerating floating-point division when the divisor is known in
 * advance", 2002). Its conditions hold for every such a when b is in
 * [2^-40, 2]: y is normal, a*y neither overflows (< 2^104) nor leaves the
 * normal range, and r is a multiple of 2^(e_a - 47) >= 2^-122 (float), so
 * it is representable, subnormal or not. compute_scalars' b lies in
 * [~1e-8, 1] (beta2 in [0, 1)); for any other b (a C caller's) the
 * dispatcher sets bias_correction2_rcp to 0 and the kernel divides.
 * +Inf and NaN keep q0 (+Inf; NaN with a's payload and sign, as the
 * division gives), since r would be NaN for them; +0 gives +0 either way.
 * tests/test_c_fma_division.py compares it with the division exhaustively
 * over a's significands for many b.
 *
 * Why: a divide and a square root per element are what bound the loop on
 * CPUs whose divider is slow (Haswell: one 256-bit divide per 14 cycles;
 * Zen 1/2 at half width), and this divide costs three FMA-port operations
 * and a blend instead (BENCHMARKS.md, "AVX2 and ARM").
 */
#ifdef FA_FMA
/* The reciprocal path alone, for loops that choose it outside the loop (a
 * large loop body is not unswitched on div_bc2's test: GCC then leaves it
 * unvectorized, "control flow in loop"). Needs bias_correction2_rcp != 0. */
static inline __attribute__((always_inline)) FA_T FA_FN(div_rcp)(
    FA_T a, const FA_CAT(fa_scalars, FA_SUFFIX) c)
{
    const FA_T q0 = a * c.bias_correction2_rcp;
    const FA_T r = FA_FMA(-q0, c.bias_correction2_sqrt, a);
    const FA_T q = FA_FMA(r, c.bias_correction2_rcp, q0);
    return q0 < (FA_T)INFINITY ? q : q0;
}
#endif

static inline __attribute__((always_inline)) FA_T FA_FN(div_bc2)(
    FA_T a, const FA_CAT(fa_scalars, FA_SUFFIX) c)
{
#ifdef FA_FMA
    /* loop-invariant: GCC unswitches a small loop on it (two vector loops) */
    if (c.bias_correction2_rcp != 0)
        return FA_FN(div_rcp)(a, c);
#endif
    return a / c.bias_correction2_sqrt;
}

/* div_bc2 with the choice made by the caller, outside its loop: rcp, a
 * compile-time constant, says bias_correction2_rcp != 0 (ignored without FMA). */
static inline __attribute__((always_inline)) FA_T FA_FN(div_bc2_by)(
    FA_T a, const FA_CAT(fa_scalars, FA_SUFFIX) c, const int rcp)
{
#ifdef FA_FMA
    if (rcp)
        return FA_FN(div_rcp)(a, c);
#endif
    (void)rcp;
    return a / c.bias_correction2_sqrt;
}

/*
 * The update of element i. l2/ams/unscale/maximize are compile-time constants
 * at every call site below, so each instantiation keeps only its own
 * operations and the loop has no branches on them. The constants come in a
 * local copy (c), so the compiler knows the stores to the arrays cannot
 * change them and keeps them in (broadcast) registers.
 */
static inline __attribute__((always_inline)) void FA_FN(adam_element)(
    FA_T *restrict param, FA_T *restrict grad, FA_T *restrict exp_avg,
    FA_T *restrict exp_avg_sq, FA_T *restrict max_exp_avg_sq, int64_t i,
    const FA_CAT(fa_scalars, FA_SUFFIX) c, const int l2, const int ams, const int unscale,
    const int maximize, const int rcp)
{
    FA_T g = grad[i];
    if (unscale) {
        g = g / c.grad_scale; /* a true division, as NumPy does: not g * (1/scale) */
        grad[i] = g;
    }
    if (maximize)
        g = -g;
    FA_T p = param[i];
    if (l2)
        g = g + c.weight_decay * p; /* uses p before the decoupled decay */
    p = p * c.decay;                /* exact when decay == 1.0, so always applied */

    const FA_T m = exp_avg[i] + (g - exp_avg[i]) * c.one_minus_beta1;
    /* (v * beta2) + ((one_minus_beta2 * g) * g): C's left-to-right
     * association matches NumPy's evaluation of the same expression. */
    const FA_T v = exp_avg_sq[i] * c.beta2 + c.one_minus_beta2 * g * g;
    exp_avg[i] = m;
    exp_avg_sq[i] = v;

    FA_T second = v;
    if (ams) {
        /* np.maximum(vmax, v): a NaN in either operand wins, and on a tie
         * (+0 vs -0) the second operand is returned, like NumPy. */
        const FA_T old = max_exp_avg_sq[i];
        second = (old > v || old != old) ? old : v;
        max_exp_avg_sq[i] = second;
    }
    const FA_T denom = FA_FN(div_bc2_by)(FA_SQRT(second), c, rcp) + c.eps;
    param[i] = p - c.step_size * m / denom;
}

/*
 * The loop: blocks of 32 elements (a constant trip count, which GCC
 * vectorizes whole; with one cache line of doubles, 8, it unrolled the block
 * into scalar code), prefetching FA_PREFETCH_BYTES ahead in every array (see
 * fastadam_internal.h), then the last partial block.
 */
static inline __attribute__((always_inline)) void FA_FN(adam_body)(
    FA_T *restrict param, FA_T *restrict grad, FA_T *restrict exp_avg,
    FA_T *restrict exp_avg_sq, FA_T *restrict max_exp_avg_sq, int64_t n,
    const FA_CAT(fa_scalars, FA_SUFFIX) *s,
    const int l2, const int ams, const int unscale, const int maximize, const int rcp)
{
    enum { BLOCK = 32, LINE = 64 / sizeof(FA_T), AHEAD = FA_PREFETCH_BYTES / sizeof(FA_T) };
    const FA_CAT(fa_scalars, FA_SUFFIX) c = *s;
    int64_t j = 0;
    for (; j + BLOCK <= n; j += BLOCK) {
        if (j + AHEAD < n) /* not into the next thread's share (fastadam_internal.h) */
            for (int k = 0; k < BLOCK; k += LINE) {
                FA_PREFETCH(param + j + k, AHEAD);
                FA_PREFETCH(grad + j + k, AHEAD);
                FA_PREFETCH(exp_avg + j + k, AHEAD);
                FA_PREFETCH(exp_avg_sq + j + k, AHEAD);
                if (ams)
                    FA_PREFETCH(max_exp_avg_sq + j + k, AHEAD);
            }
        /* the arrays do not overlap (checked by the caller); GCC forgets
         * their restrict through the inlined call and would test it per block */
#if !defined(__clang__) /* clang lacks it (a warning) and vectorizes these anyway */
#pragma GCC ivdep
#endif
        for (int64_t i = j; i < j + BLOCK; i++)
            FA_FN(adam_element)(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, i, c, l2, ams,
                                unscale, maximize, rcp);
    }
    for (; j < n; j++)
        FA_FN(adam_element)(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, j, c, l2, ams,
                            unscale, maximize, rcp);
}

/* The division's two ways (div_bc2) as two loops, chosen here: GCC does not
 * unswitch the larger bodies (amsgrad's) on the test, and leaves a loop with
 * that control flow in it unvectorized. */
static inline __attribute__((always_inline)) void FA_FN(adam_loops)(
    FA_T *restrict param, FA_T *restrict grad, FA_T *restrict exp_avg,
    FA_T *restrict exp_avg_sq, FA_T *restrict max_exp_avg_sq, int64_t n,
    const FA_CAT(fa_scalars, FA_SUFFIX) *s,
    const int l2, const int ams, const int unscale, const int maximize)
{
#ifdef FA_FMA
    if (s->bias_correction2_rcp != 0) {
        FA_FN(adam_body)(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, n, s, l2, ams,
                         unscale, maximize, 1);
        return;
    }
#endif
    FA_FN(adam_body)(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, n, s, l2, ams, unscale,
                     maximize, 0);
}

/* One out-of-line function per flag combination (the bit values are the
 * FA_F_* flags), each with the flags folded in as constants. */
#define FA_DEFINE_VARIANT(bits)                                                            \
    static void FA_FN(adam_##bits)(FA_T *param, FA_T *grad, FA_T *exp_avg,                 \
                                   FA_T *exp_avg_sq, FA_T *max_exp_avg_sq, int64_t n,      \
                                   const FA_CAT(fa_scalars, FA_SUFFIX) *s)                 \
    {                                                                                      \
        FA_FN(adam_loops)(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, n, s,          \
                         ((bits) & FA_F_L2) != 0, ((bits) & FA_F_AMSGRAD) != 0,            \
                         ((bits) & FA_F_UNSCALE) != 0, ((bits) & FA_F_MAXIMIZE) != 0);     \
    }

FA_DEFINE_VARIANT(0)
FA_DEFINE_VARIANT(1)
FA_DEFINE_VARIANT(2)
FA_DEFINE_VARIANT(3)
FA_DEFINE_VARIANT(4)
FA_DEFINE_VARIANT(5)
FA_DEFINE_VARIANT(6)
FA_DEFINE_VARIANT(7)
FA_DEFINE_VARIANT(8)
FA_DEFINE_VARIANT(9)
FA_DEFINE_VARIANT(10)
FA_DEFINE_VARIANT(11)
FA_DEFINE_VARIANT(12)
FA_DEFINE_VARIANT(13)
FA_DEFINE_VARIANT(14)
FA_DEFINE_VARIANT(15)

#undef FA_DEFINE_VARIANT

/*
 * grad[i] /= scale in place, and whether any quotient is NaN or +-Inf: one
 * pass instead of NumPy's divide-then-isfinite. z = q - q is +0 for every
 * finite q and NaN for NaN and both infinities, so OR-ing the bits of z
 * (without the sign, which makes it immune to the rounding mode's -0) tells
 * whether any q was non-finite. An integer OR reduction as wide as FA_T
 * vectorizes on every ISA, SSE2 included (a float reduction would not
 * without -ffast-math, and SSE2 cannot narrow a double compare's mask).
 *
 * recip != 0 means the caller found scale to be a power of two whose
 * reciprocal is exact (both normal numbers): then grad[i] * recip is the same
 * real number as grad[i] / scale, so the correctly rounded product has the
 * quotient's bits (NaN payloads included), and a multiply is several times
 * cheaper than a divide. Loss scales are powers of two in practice.
 */
static inline FA_UINT FA_FN(nonfinite_bits)(FA_T q)
{
    const FA_T z = q - q;
    FA_UINT u;
    memcpy(&u, &z, sizeof u);
    return u & ~((FA_UINT)1 << (8 * sizeof(FA_UINT) - 1));
}

static int FA_FN(unscale)(FA_T *restrict grad, int64_t n, FA_T scale, FA_T recip)
{
    FA_UINT bad = 0;
    if (recip != 0) {
        for (int64_t i = 0; i < n; i++) {
            const FA_T q = grad[i] * recip;
            grad[i] = q;
            bad |= FA_FN(nonfinite_bits)(q);
        }
    } else {
        for (int64_t i = 0; i < n; i++) {
            const FA_T q = grad[i] / scale; /* a true division, as np.divide does */
            grad[i] = q;
            bad |= FA_FN(nonfinite_bits)(q);
        }
    }
    return bad != 0;
}

#undef FA_FN
#undef FA_CAT
#undef FA_CAT_
