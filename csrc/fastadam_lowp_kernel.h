/*
 * fastadam_lowp_kernel.h - the low-precision loops (fastadam_lowp.h),
 * included once at the end of fastadam_kernel.c, after fastadam_kernel_bf16.h
 * (whose bit helpers it uses), so compiled once per ISA variant with the
 * same rules: no FMA contraction, no fast-math. Plain C on uint32 lanes that
 * GCC vectorizes; the float16 conversions are integer code too (the same
 * results on every ISA, no F16C needed).
 */
#include "fastadam_lowp_internal.h"

/* storage types of an array */
#define FA_LP_F32 0
#define FA_LP_BF16 1
#define FA_LP_F16 2

/* float16 bits -> float32, exactly (NaN: payload shifted up, as NumPy). */
static inline float fa_lp_widen_f16(uint32_t h)
{
    const uint32_t sign = (h & 0x8000u) << 16;
    const uint32_t e = (h >> 10) & 0x1Fu, mant = h & 0x3FFu;
    const uint32_t nrm = ((h & 0x7FFFu) << 13) + 0x38000000u;
    const uint32_t inf = 0x7F800000u | (mant << 13);
    const uint32_t sub = fa_f32_bits((float)(int32_t)mant * 0x1p-24f); /* exact */
    const uint32_t bits = e == 0x1Fu ? inf : e == 0 ? sub : nrm;
    return fa_bits_f32(sign | bits);
}

/*
 * float32 -> float16 bits: to nearest-even (sr = 0), or stochastically with
 * 32 random bits r (fastadam._lowp._round_f16 is the definition). Both
 * add an increment below the bits kept and truncate: nearest adds half an
 * ulp less one, plus the kept lowest bit (ties to even); stochastic adds the
 * low bits of r, so it rounds up with probability equal to the discarded
 * fraction of the gap and the expected result is x. a = |x| bits. NaN: quiet,
 * sign and high payload kept. a >= 0x47800000 (|x| >= 65536, Inf included):
 * Inf. Normal results (a >= 0x38800000, |x| >= 2^-14): h = (a - 0x38000000 +
 * inc) >> 13, inc = 0x0FFF + lsb or r & 0x1FFF (a carry past 65504 gives Inf,
 * 0x7C00). Subnormal results: e = a >> 23, s = 126 - e in [14, 31], m the
 * 24-bit significand, h = (m >> s) + (((m & (2^s-1)) + inc) >> s) with inc =
 * (2^(s-1) - 1) + lsb or r & (2^s-1) (a carry out of 0x3FF gives 0x400, the
 * smallest normal); e < 95 (|x| < 2^-32) gives a signed zero both ways
 * (stochastic: a bias below 2^-32 in magnitude).
 */
static inline uint32_t fa_lp_round_f16(float x, int sr, uint32_t r)
{
    const uint32_t u = fa_f32_bits(x);
    const uint32_t sign = (u >> 16) & 0x8000u;
    const uint32_t a = u & 0x7FFFFFFFu;
    const uint32_t nrm = (a - 0x38000000u + (sr ? r & 0x1FFFu : 0x0FFFu + ((a >> 13) & 1u))) >> 13;
    const uint32_t e = a >> 23;
    /* subnormal results: e <= 112, s in [14, 31]; clamped for the other lanes too
     * (their sub is discarded, but a shift by 32 or more is undefined) */
    const uint32_t s = e < 95u ? 31u : e > 112u ? 14u : 126u - e;
    const uint32_t m = (a & 0x7FFFFFu) | 0x800000u;
    const uint32_t mask = (1u << s) - 1u;
    const uint32_t q = m >> s;
    const uint32_t inc = sr ? (e < 95u ? 0u : r & mask) : (mask >> 1) + (q & 1u);
    const uint32_t sub = q + (((m & mask) + inc) >> s);
    const uint32_t nan = 0x7E00u | ((a >> 13) & 0x3FFu);
    const uint32_t h = a > 0x7F800000u  ? nan
                       : a >= 0x47800000u ? 0x7C00u
                       : a >= 0x38800000u ? nrm
                                          : sub;
    return sign | h;
}

static inline __attribute__((always_inline)) float fa_lp_load(const void *a, int64_t i, int t)
{
    if (t == FA_LP_F32)
        return ((const float *)a)[i];
    if (t == FA_LP_BF16)
        return fa_widen_bf16(((const uint16_t *)a)[i]);
    return fa_lp_widen_f16(((const uint16_t *)a)[i]);
}

/* x rounded to t (bfloat16/float16): nearest-even, or stochastically with the
 * 32 random bits r (bfloat16 takes r & 0xFFFF) */
static inline __attribute__((always_inline)) uint32_t fa_lp_bits(float x, int t, int sr,
                                                                 uint32_t r)
{
    if (t == FA_LP_BF16) {
        const uint32_t u = fa_f32_bits(x);
        return fa_round_bf16(u, sr ? r & 0xFFFFu : 0x7FFFu + ((u >> 16) & 1u));
    }
    return fa_lp_round_f16(x, sr, r);
}

static inline __attribute__((always_inline)) void fa_lp_store(void *a, int64_t i, int t, float x,
                                                              int sr, uint32_t r)
{
    if (t == FA_LP_F32)
        ((float *)a)[i] = x;
    else
        ((uint16_t *)a)[i] = (uint16_t)fa_lp_bits(x, t, sr, r);
}

/*
 * Element i: pt/gt/st/ct the storage types of param, grad, moments and copy
 * (ct < 0: no copy), compile-time constants at every call. Master weights
 * (ct >= 0) do the float32 step of fastadam_kernel_impl.h, operation for
 * operation, so the master is what a float32 step gives; low-precision params
 * follow torch's fused loop (three FMAs, see below). In both, the moments
 * are rounded when stored but the update uses their float32 values, and the
 * unscaled gradient is written back rounded and used unrounded, as torch does.
 *
 * psr: the rounded parameter (the copy's, or a low-precision parameter's own)
 * is rounded stochastically with r, the element's 32 random bits (bfloat16:
 * r & 0xFFFF; float16: fa_lp_round_f16). ssr (bfloat16 moments only): the
 * moments are rounded stochastically with r2 = mix32(r): exp_avg with
 * r2 & 0xFFFF, exp_avg_sq and max_exp_avg_sq with r2 >> 16 (so a max that is
 * v stores what exp_avg_sq stores, as the float32-parameter bfloat16 kernel's
 * does; a max that is the old value is a bfloat16 value, stored exactly).
 */
static inline __attribute__((always_inline)) void fa_lp_element(
    const fa_lowp_piece *restrict pc, int64_t i, const fa_scalars_f32 c, const int pt,
    const int gt, const int st, const int ct, const int psr, const int ssr, const int l2,
    const int ams, const int unscale, const int maximize, const int rcp)
{
    float g = fa_lp_load(pc->grad, i, gt);
    if (unscale) {
        g = g / c.grad_scale;
        fa_lp_store(pc->grad, i, gt, g, 0, 0);
    }
    if (maximize)
        g = -g;
    float p = fa_lp_load(pc->param, i, pt);
    const float m_old = fa_lp_load(pc->exp_avg, i, st);
    const float v_old = fa_lp_load(pc->exp_avg_sq, i, st);
    float m, v;
    if (ct < 0) {
        /* low-precision params: torch's fused CPU loop as it runs (its
         * Vectorized<float> mul/add contracted into FMAs by its compiler;
         * lerp by its own fmadd). Measured against torch 2.x: every element
         * of p, m and v identical (tests/test_torch_lowp.py). */
        if (l2)
            g = fmaf(p, c.weight_decay, g);
        p = p * c.decay;
        const int small = c.one_minus_beta1 < 0.5f;
        /* computed whichever way small goes: GCC does not if-convert (so does
         * not vectorize, on AVX2) a loop with a float operation under a
         * condition, as it could trap */
        const float w = c.one_minus_beta1 - 1.0f;
        m = fmaf(small ? c.one_minus_beta1 : w, g - m_old,
                 small ? m_old : g);
        v = fmaf(c.one_minus_beta2 * g, g, v_old * c.beta2);
    } else {
        /* master weights: the float32 step of fastadam_kernel_impl.h, exactly */
        if (l2)
            g = g + c.weight_decay * p;
        p = p * c.decay;
        m = m_old + (g - m_old) * c.one_minus_beta1;
        v = v_old * c.beta2 + c.one_minus_beta2 * g * g;
    }
    uint32_t r = 0, r2 = 0;
    if (psr || ssr) {
        const uint64_t idx = (uint64_t)(pc->first_index + i);
        r = fa_mix32((uint32_t)idx ^ fa_mix32(pc->key ^ (uint32_t)(idx >> 32)));
        if (ssr)
            r2 = fa_mix32(r);
    }
    fa_lp_store(pc->exp_avg, i, st, m, ssr, r2);
    fa_lp_store(pc->exp_avg_sq, i, st, v, ssr, r2 >> 16);
    float second = v;
    if (ams) {
        const float old = fa_lp_load(pc->max_exp_avg_sq, i, st);
        second = (old > v || old != old) ? old : v;
        fa_lp_store(pc->max_exp_avg_sq, i, st, second, ssr, r2 >> 16);
    }
    /* the division by bias_correction2_sqrt through its reciprocal, bit for
     * bit the division (fastadam_kernel_impl.h's div_bc2): on CPUs with a slow
     * divider (AVX2) two divides per element bound the loop */
    const float denom = div_bc2_by_f32(sqrtf(second), c, rcp) + c.eps;
    p = p - c.step_size * m / denom;
    /* the rounded parameter: the copy's (master weights), or the parameter's own */
    if (ct >= 0) {
        fa_lp_store(pc->param, i, pt, p, 0, 0);
        ((uint16_t *)pc->copy)[i] = (uint16_t)fa_lp_bits(p, ct, psr, r);
    } else {
        fa_lp_store(pc->param, i, pt, p, psr, r);
    }
}

/* Blocks of FA_LP_BLOCK elements, prefetching FA_PREFETCH_BYTES of the
 * float32 arrays ahead (the same element distance in the 16-bit ones), as
 * fastadam_kernel_impl.h's loop does and for its reasons (fastadam_internal.h):
 * without it the master-weights step ran at 75% of its roofline where the
 * float32 step ran at 95%. */
enum { FA_LP_BLOCK = 32, FA_LP_AHEAD = FA_PREFETCH_BYTES / 4 };

static inline __attribute__((always_inline)) void fa_lp_prefetch(const void *a, int64_t i,
                                                                 const int t)
{
    const uintptr_t size = t == FA_LP_F32 ? 4u : 2u;
    __builtin_prefetch((const void *)((uintptr_t)a + (uintptr_t)i * size), 0, 3);
}

static inline __attribute__((always_inline)) void fa_lp_loop(
    const fa_lowp_piece *restrict q, const fa_scalars_f32 c, const int pt, const int gt,
    const int st, const int ct, const int psr, const int ssr, const int l2, const int ams,
    const int unscale, const int maximize, const int rcp)
{
    const int64_t n = q->n;
    int64_t j = 0;
    for (; j + FA_LP_BLOCK <= n; j += FA_LP_BLOCK) {
        if (j + FA_LP_AHEAD < n) /* not into the next thread's share */
            for (int k = 0; k < FA_LP_BLOCK; k += 16) {
                const int64_t at = j + k + FA_LP_AHEAD;
                fa_lp_prefetch(q->param, at, pt);
                fa_lp_prefetch(q->grad, at, gt);
                fa_lp_prefetch(q->exp_avg, at, st);
                fa_lp_prefetch(q->exp_avg_sq, at, st);
                if (ams)
                    fa_lp_prefetch(q->max_exp_avg_sq, at, st);
            }
        /* the element loop (tests/test_c_vectorized.py finds it by this comment) */
#if !defined(__clang__)
#pragma GCC ivdep
#endif
        for (int64_t i = j; i < j + FA_LP_BLOCK; i++)
            fa_lp_element(q, i, c, pt, gt, st, ct, psr, ssr, l2, ams, unscale, maximize, rcp);
    }
    for (; j < n; j++)
        fa_lp_element(q, j, c, pt, gt, st, ct, psr, ssr, l2, ams, unscale, maximize, rcp);
}

static inline __attribute__((always_inline)) void fa_lp_body(
    const fa_lowp_piece *restrict pc, const fa_scalars_f32 *s, const int pt, const int gt,
    const int st, const int ct, const int psr, const int ssr, const int l2, const int ams,
    const int unscale, const int maximize)
{
    const fa_scalars_f32 c = *s;
    const fa_lowp_piece q = *pc;
#ifdef FA_HAS_FMA
    /* two loops, chosen here: GCC does not unswitch a body this large */
    if (c.bias_correction2_rcp != 0) {
        fa_lp_loop(&q, c, pt, gt, st, ct, psr, ssr, l2, ams, unscale, maximize, 1);
        return;
    }
#endif
    fa_lp_loop(&q, c, pt, gt, st, ct, psr, ssr, l2, ams, unscale, maximize, 0);
}

/* One function per (kind, roundings): the common flag-free case as its own
 * loop, every other combination through one loop with the flags as values.
 * psr/ssr: stochastic rounding of the parameter (or copy) / of the moments. */
#define FA_LP_DEFINE(name, pt, gt, st, ct, psr, ssr)                                         \
    static void name(const fa_lowp_piece *pc, const fa_scalars_f32 *s, int flags)          \
    {                                                                                      \
        if (flags == 0)                                                                    \
            fa_lp_body(pc, s, pt, gt, st, ct, psr, ssr, 0, 0, 0, 0);                       \
        else if (flags == FA_F_L2)                                                         \
            fa_lp_body(pc, s, pt, gt, st, ct, psr, ssr, 1, 0, 0, 0);                       \
        else                                                                               \
            fa_lp_body(pc, s, pt, gt, st, ct, psr, ssr, (flags & FA_F_L2) != 0,            \
                       (flags & FA_F_AMSGRAD) != 0, (flags & FA_F_UNSCALE) != 0,           \
                       (flags & FA_F_MAXIMIZE) != 0);                                      \
    }

/* both roundings nearest / the parameter's stochastic, and for bfloat16
 * moments the same two with stochastic moments */
#define FA_LP_DEFINE2(name, pt, gt, st, ct)                                                  \
    FA_LP_DEFINE(name, pt, gt, st, ct, 0, 0)                                               \
    FA_LP_DEFINE(name##_sr, pt, gt, st, ct, 1, 0)
#define FA_LP_DEFINE4(name, pt, gt, st, ct)                                                  \
    FA_LP_DEFINE2(name, pt, gt, st, ct)                                                    \
    FA_LP_DEFINE(name##_ss, pt, gt, st, ct, 0, 1)                                          \
    FA_LP_DEFINE(name##_sr_ss, pt, gt, st, ct, 1, 1)

FA_LP_DEFINE4(fa_lp_bf16, FA_LP_BF16, FA_LP_BF16, FA_LP_BF16, -1)
FA_LP_DEFINE2(fa_lp_f16, FA_LP_F16, FA_LP_F16, FA_LP_F16, -1)
FA_LP_DEFINE2(fa_lp_master_bf16, FA_LP_F32, FA_LP_F32, FA_LP_F32, FA_LP_BF16)
FA_LP_DEFINE2(fa_lp_master_bf16_g, FA_LP_F32, FA_LP_BF16, FA_LP_F32, FA_LP_BF16)
FA_LP_DEFINE2(fa_lp_master_f16, FA_LP_F32, FA_LP_F32, FA_LP_F32, FA_LP_F16)
FA_LP_DEFINE2(fa_lp_master_f16_g, FA_LP_F32, FA_LP_F16, FA_LP_F32, FA_LP_F16)
FA_LP_DEFINE2(fa_lp_bf16_s32, FA_LP_BF16, FA_LP_BF16, FA_LP_F32, -1)
FA_LP_DEFINE2(fa_lp_f16_s32, FA_LP_F16, FA_LP_F16, FA_LP_F32, -1)
FA_LP_DEFINE4(fa_lp_f16_sbf16, FA_LP_F16, FA_LP_F16, FA_LP_BF16, -1)

/* [kind][rounding]: rounding is fastadam_lowp.h's FA_LOWP_STOCHASTIC (1) |
 * FA_LOWP_STOCHASTIC_STATE (2); NULL where the moments are not bfloat16 */
const fa_lowp_table FA_LOWP_TABLE_NAME(FA_VARIANT) = {{
    {fa_lp_bf16, fa_lp_bf16_sr, fa_lp_bf16_ss, fa_lp_bf16_sr_ss},
    {fa_lp_f16, fa_lp_f16_sr, NULL, NULL},
    {fa_lp_master_bf16, fa_lp_master_bf16_sr, NULL, NULL},
    {fa_lp_master_bf16_g, fa_lp_master_bf16_g_sr, NULL, NULL},
    {fa_lp_master_f16, fa_lp_master_f16_sr, NULL, NULL},
    {fa_lp_master_f16_g, fa_lp_master_f16_g_sr, NULL, NULL},
    {fa_lp_bf16_s32, fa_lp_bf16_s32_sr, NULL, NULL},
    {fa_lp_f16_s32, fa_lp_f16_s32_sr, NULL, NULL},
    {fa_lp_f16_sbf16, fa_lp_f16_sbf16_sr, fa_lp_f16_sbf16_ss, fa_lp_f16_sbf16_sr_ss},
}};
