/*
 * fastadam_kernel_bf16.h - the update with float32 parameters and bfloat16
 * moments, included once by fastadam_kernel.c (so compiled once per ISA).
 *
 * The float32 arithmetic is that of fastadam_kernel_impl.h, operation for
 * operation (the same compiler rules apply: no FMA contraction, no fast-math);
 * the moments are widened on load and rounded to bfloat16 on store, and the
 * parameter update uses the rounded (stored) moments, so what a later step
 * reads back is exactly what this step used.
 *
 * Everything is written on uint32 lanes (bit casts through memcpy, shifts,
 * adds, xors, 32-bit multiplies), which GCC vectorizes for SSE2, AVX2 and
 * AVX-512 alike; there is no branch in the loop.
 */
#include <string.h>

static inline uint32_t fa_f32_bits(float x)
{
    uint32_t u;
    memcpy(&u, &x, sizeof u);
    return u;
}

static inline float fa_bits_f32(uint32_t u)
{
    float x;
    memcpy(&x, &u, sizeof x);
    return x;
}

/* bfloat16 bits -> float32: exact (the low 16 mantissa bits are zero). */
static inline float fa_widen_bf16(uint16_t h)
{
    return fa_bits_f32((uint32_t)h << 16);
}

/*
 * float32 bits u -> bfloat16 bits, adding `add` below the cut first:
 * add = 16 random bits rounds stochastically (up with probability equal to
 * the discarded fraction), add = 0x7FFF + lsb rounds to nearest-even. Finite
 * values that round past the largest bfloat16 become +-Inf, as they should;
 * +-Inf stays Inf (the add never carries into the exponent). A NaN would
 * carry into the sign or become Inf, so it is handled apart: its top half
 * with the quiet bit set (sign and high payload kept).
 */
static inline uint32_t fa_round_bf16(uint32_t u, uint32_t add)
{
    const uint32_t rounded = (u + add) >> 16;
    const uint32_t quiet_nan = (u >> 16) | 0x0040u;
    return (u & 0x7FFFFFFFu) > 0x7F800000u ? quiet_nan : rounded;
}

/* The 32-bit hash of fastadam._scalars.mix32 (a bijection with good avalanche). */
static inline uint32_t fa_mix32(uint32_t x)
{
    x ^= x >> 16;
    x *= 0x7FEB352Du;
    x ^= x >> 15;
    x *= 0x846CA68Bu;
    x ^= x >> 16;
    return x;
}

/*
 * The update of element i, whose random bits are mix32(lo ^ hkey) (see
 * fa_adam_bf16_body). divide == 0 skips dividing by bias_correction2_sqrt and
 * decoupled == 0 skips multiplying by decay; the caller only does so when
 * they are 1.0, where the operation is exact, so the bits are the same (a
 * signalling-NaN parameter is quieted by the final subtraction either way).
 * This loop sits at the edge of keeping up with memory: the divide alone cost
 * ~10%, the multiply ~12%.
 */
static inline __attribute__((always_inline)) void fa_adam_bf16_element(
    float *restrict param, float *restrict grad, uint16_t *restrict exp_avg,
    uint16_t *restrict exp_avg_sq, uint16_t *restrict max_exp_avg_sq, int64_t i, uint32_t lo,
    uint32_t hkey, const fa_scalars_f32 c, const int l2, const int ams, const int unscale,
    const int maximize, const int stochastic, const int divide, const int decoupled)
{
    float g = grad[i];
    if (unscale) {
        g = g / c.grad_scale;
        grad[i] = g;
    }
    if (maximize)
        g = -g;
    float p = param[i];
    if (l2)
        g = g + c.weight_decay * p;
    if (decoupled)
        p = p * c.decay;

    const float m_old = fa_widen_bf16(exp_avg[i]);
    const float v_old = fa_widen_bf16(exp_avg_sq[i]);
    const uint32_t um = fa_f32_bits(m_old + (g - m_old) * c.one_minus_beta1);
    const uint32_t uv = fa_f32_bits(v_old * c.beta2 + c.one_minus_beta2 * g * g);

    uint32_t add_m, add_v;
    if (stochastic) {
        const uint32_t r = fa_mix32(lo ^ hkey);
        add_m = r & 0xFFFFu;
        add_v = r >> 16;
    } else {
        add_m = 0x7FFFu + ((um >> 16) & 1u);
        add_v = 0x7FFFu + ((uv >> 16) & 1u);
    }
    const uint32_t mb = fa_round_bf16(um, add_m);
    const uint32_t vb = fa_round_bf16(uv, add_v);
    exp_avg[i] = (uint16_t)mb;
    exp_avg_sq[i] = (uint16_t)vb;
    const float m = fa_bits_f32(mb << 16);
    const float v = fa_bits_f32(vb << 16);

    float second = v;
    if (ams) {
        /* Both operands are bfloat16 values, so the max is one too and
         * storing its top half is exact. A NaN in either wins; a tie
         * (+0 vs -0) returns v, the second operand, as np.maximum does. */
        const float old = fa_widen_bf16(max_exp_avg_sq[i]);
        second = (old > v || old != old) ? old : v;
        max_exp_avg_sq[i] = (uint16_t)(fa_f32_bits(second) >> 16);
    }
    const float root = sqrtf(second);
    const float denom = (divide ? root / c.bias_correction2_sqrt : root) + c.eps;
    param[i] = p - c.step_size * m / denom;
}

/*
 * Prefetch fa_bf16_prefetch_elements of param ahead (the same element
 * distance in the moments) for the FA_BF16_BLOCK elements from j: two lines
 * of each float32 array, one of each bfloat16 one. The distance is the
 * CPU's (fastadam_internal.h); each body reads it once, into ahead.
 */
#define FA_BF16_BLOCK 32
static inline __attribute__((always_inline)) void fa_prefetch_bf16_block(
    const float *param, const float *grad, const uint16_t *exp_avg, const uint16_t *exp_avg_sq,
    const uint16_t *max_exp_avg_sq, int64_t j, int64_t n, const int ams, const int64_t ahead)
{
    if (j + ahead >= n)
        return;
    FA_PREFETCH(param + j, ahead);
    FA_PREFETCH(param + j + 16, ahead);
    FA_PREFETCH(grad + j, ahead);
    FA_PREFETCH(grad + j + 16, ahead);
    FA_PREFETCH(exp_avg + j, ahead);
    FA_PREFETCH(exp_avg_sq + j, ahead);
    if (ams)
        FA_PREFETCH(max_exp_avg_sq + j, ahead);
}

/*
 * n <= 2^32 elements whose global indices share their upper 32 bits; lo0 is
 * the low 32 bits of element 0's index, and hkey = mix32(key ^ hi32(index)),
 * hoisted out of the loop by the caller. Element j then draws
 * r = mix32((lo0 + j) ^ hkey), on uint32 arithmetic (wrapping only after the
 * last element of a segment that ends at a 2^32 boundary). Two cache lines of
 * param at a time (a constant trip count, vectorized whole), prefetching
 * ahead like fastadam_kernel_impl.h, then the last partial block.
 */
static inline __attribute__((always_inline)) void fa_adam_bf16_body(
    float *restrict param, float *restrict grad, uint16_t *restrict exp_avg,
    uint16_t *restrict exp_avg_sq, uint16_t *restrict max_exp_avg_sq, int64_t n, uint32_t lo0,
    uint32_t hkey, const fa_scalars_f32 *s, const int l2, const int ams, const int unscale,
    const int maximize, const int stochastic, const int divide, const int decoupled)
{
    const fa_scalars_f32 c = *s;
    const int64_t ahead = fa_bf16_prefetch_elements;
    int64_t j = 0;
    for (; j + FA_BF16_BLOCK <= n; j += FA_BF16_BLOCK) {
        fa_prefetch_bf16_block(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, j, n, ams, ahead);
#if !defined(__clang__) /* clang lacks it (a warning) and vectorizes these anyway */
#pragma GCC ivdep
#endif
        for (int64_t i = j; i < j + FA_BF16_BLOCK; i++)
            fa_adam_bf16_element(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, i,
                                 lo0 + (uint32_t)i, hkey, c, l2, ams, unscale, maximize,
                                 stochastic, divide, decoupled);
    }
    for (; j < n; j++)
        fa_adam_bf16_element(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, j,
                             lo0 + (uint32_t)j, hkey, c, l2, ams, unscale, maximize, stochastic,
                             divide, decoupled);
}

#if defined(__AVX512BW__)
#include "fastadam_kernel_bf16_avx512.h"
#define FA_BF16_BODY fa_adam_bf16_body_avx512
#elif defined(__AVX2__)
#include "fastadam_kernel_bf16_avx2.h"
#define FA_BF16_BODY fa_adam_bf16_body_avx2
#else
#define FA_BF16_BODY fa_adam_bf16_body
#endif

/*
 * The loop for one (flags, rounding mode, divide, decoupled), in a function of
 * its own: inlined three times into one function, GCC compiled the copies
 * worse (register pressure), and the fast copy lost 15%.
 */
#define FA_DEFINE_BF16_SEGMENT(bits, mode, divide, decoupled)                                 \
    static __attribute__((noinline)) void fa_bf16_seg_##mode##_##bits##_##divide##decoupled(  \
        float *restrict param, float *restrict grad, uint16_t *restrict exp_avg,              \
        uint16_t *restrict exp_avg_sq, uint16_t *restrict max_exp_avg_sq, int64_t n,          \
        uint32_t lo0, uint32_t hkey, const fa_scalars_f32 *s)                                 \
    {                                                                                         \
        FA_BF16_BODY(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, n, lo0, hkey, s,       \
                          ((bits) & FA_F_L2) != 0, ((bits) & FA_F_AMSGRAD) != 0,              \
                          ((bits) & FA_F_UNSCALE) != 0, ((bits) & FA_F_MAXIMIZE) != 0,        \
                          (mode) == FA_BF16_STOCHASTIC, divide, decoupled);                   \
    }

/*
 * One function per (flags, rounding mode). It walks [first_index,
 * first_index + n) in segments that never cross a multiple of 2^32, so that
 * inside a segment hi32(i) -- and with it mix32(key ^ hi32(i)) -- is constant.
 * The segments depend on the global indices only, so any split of the work
 * between threads yields the same bits.
 */
#define FA_DEFINE_BF16(bits, mode)                                                          \
    FA_DEFINE_BF16_SEGMENT(bits, mode, 1, 1)                                                \
    FA_DEFINE_BF16_SEGMENT(bits, mode, 0, 1)                                                \
    FA_DEFINE_BF16_SEGMENT(bits, mode, 0, 0)                                                \
    static void fa_adam_bf16_##mode##_##bits(float *param, float *grad, uint16_t *exp_avg,  \
                                             uint16_t *exp_avg_sq, uint16_t *max_exp_avg_sq, \
                                             int64_t n, int64_t first_index,                 \
                                             const fa_scalars_f32 *s, uint32_t key)          \
    {                                                                                        \
        const int stochastic = (mode) == FA_BF16_STOCHASTIC;                                 \
        uint64_t index = (uint64_t)first_index;                                              \
        while (n > 0) {                                                                      \
            const uint32_t lo0 = (uint32_t)index;                                            \
            const uint64_t room = ((uint64_t)1 << 32) - lo0;                                 \
            const int64_t len = (uint64_t)n < room ? n : (int64_t)room;                      \
            const uint32_t hkey = stochastic ? fa_mix32(key ^ (uint32_t)(index >> 32)) : 0;  \
            uint16_t *const vmax = ((bits) & FA_F_AMSGRAD) ? max_exp_avg_sq : NULL;          \
            /* divide: scalars not made by compute_scalars, the general loop */              \
            if (s->bias_correction2_sqrt != 1.0f)                                            \
                fa_bf16_seg_##mode##_##bits##_11(param, grad, exp_avg, exp_avg_sq, vmax, len, \
                                                 lo0, hkey, s);                              \
            else if (s->decay != 1.0f)                                                       \
                fa_bf16_seg_##mode##_##bits##_01(param, grad, exp_avg, exp_avg_sq, vmax, len, \
                                                 lo0, hkey, s);                              \
            else                                                                             \
                fa_bf16_seg_##mode##_##bits##_00(param, grad, exp_avg, exp_avg_sq, vmax, len, \
                                                 lo0, hkey, s);                              \
            param += len;                                                                    \
            grad += len;                                                                     \
            exp_avg += len;                                                                  \
            exp_avg_sq += len;                                                               \
            if ((bits) & FA_F_AMSGRAD)                                                       \
                max_exp_avg_sq += len;                                                       \
            index += (uint64_t)len;                                                          \
            n -= len;                                                                        \
        }                                                                                    \
    }

#define FA_DEFINE_BF16_MODES(bits) \
    FA_DEFINE_BF16(bits, 0)        \
    FA_DEFINE_BF16(bits, 1)

FA_DEFINE_BF16_MODES(0)
FA_DEFINE_BF16_MODES(1)
FA_DEFINE_BF16_MODES(2)
FA_DEFINE_BF16_MODES(3)
FA_DEFINE_BF16_MODES(4)
FA_DEFINE_BF16_MODES(5)
FA_DEFINE_BF16_MODES(6)
FA_DEFINE_BF16_MODES(7)
FA_DEFINE_BF16_MODES(8)
FA_DEFINE_BF16_MODES(9)
FA_DEFINE_BF16_MODES(10)
FA_DEFINE_BF16_MODES(11)
FA_DEFINE_BF16_MODES(12)
FA_DEFINE_BF16_MODES(13)
FA_DEFINE_BF16_MODES(14)
FA_DEFINE_BF16_MODES(15)

#undef FA_DEFINE_BF16_MODES
#undef FA_DEFINE_BF16
#undef FA_DEFINE_BF16_SEGMENT
#undef FA_BF16_BODY
#undef FA_BF16_BLOCK
