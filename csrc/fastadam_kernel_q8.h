/*
 * fastadam_kernel_q8.h - the 8-bit block-wise state kernels (issue 18),
 * included by fastadam_kernel.c after the float32 instantiation of
 * fastadam_kernel_impl.h (it uses div_bc2_f32), so it is compiled once per ISA.
 *
 * The format and its rounding are defined by the NumPy reference,
 * fastadam/_q8.py; this reproduces it bit for bit: the code map is integer
 * arithmetic on float32 bit patterns, and the float operations are the
 * reference's, in its order (-ffp-contract=off, no fast-math).
 *
 * One fused pass per block of FA_Q8_BLOCK elements (fa_q8_block): the only
 * temporaries are two 1 KiB buffers on the stack, in L1.
 */
#define FA_Q8_BLOCK 256
#define FA_Q8_ONE 0x3F800000u
#define FA_Q8_F_DIV FA_F_AMSGRAD /* the amsgrad bit: refused with 8-bit states */

static inline uint32_t fa_q8_bits(float x)
{
    uint32_t u;
    memcpy(&u, &x, sizeof u);
    return u;
}

static inline float fa_q8_float(uint32_t u)
{
    float x;
    memcpy(&x, &u, sizeof x);
    return x;
}

/* y(code) of exp_avg: sign in bit 7, magnitude k in bits 0..6 (K = 127) */
static inline float fa_q8_y_m(uint8_t code)
{
    const uint32_t k = code & 0x7Fu;
    const uint32_t mag = k != 0 ? FA_Q8_ONE - ((127u - k) << 20) : 0u;
    return fa_q8_float(mag | ((uint32_t)(code & 0x80u) << 24));
}

/* y(code) of exp_avg_sq: magnitude k in all 8 bits (K = 255) */
static inline float fa_q8_y_v(uint8_t code)
{
    const uint32_t k = code;
    return fa_q8_float(k != 0 ? FA_Q8_ONE - ((255u - k) << 20) : 0u);
}

static inline uint8_t fa_q8_enc_m(float x, float r)
{
    const uint32_t u = fa_q8_bits(fabsf(x) * r) & 0x7FFFFFFFu;
    int32_t t = ((int32_t)u - (int32_t)(FA_Q8_ONE - (127u << 20)) + (1 << 19)) >> 20;
    t = t < 0 ? 0 : t;
    t = t > 127 ? 127 : t;
    return (uint8_t)((uint32_t)t | ((fa_q8_bits(x) >> 24) & 0x80u));
}

static inline uint8_t fa_q8_enc_v(float x, float r)
{
    const uint32_t u = fa_q8_bits(fabsf(x) * r) & 0x7FFFFFFFu;
    const int32_t lo = fa_q8_bits(x) != 0; /* a positive v is never coded as 0 */
    int32_t t = ((int32_t)u - (int32_t)(FA_Q8_ONE - (255u << 20)) + (1 << 19)) >> 20;
    t = t < lo ? lo : t;
    t = t > 255 ? 255 : t;
    return (uint8_t)t;
}

/*
 * One block of len (<= FA_Q8_BLOCK) elements. Pass 1 is the float32 update of
 * fastadam_kernel_impl.h on the dequantized moments: it writes the unscaled
 * gradient and the parameter, keeps the new m and v in two L1 buffers and
 * takes their absmax (an unsigned max of the magnitude bits); pass 2
 * requantizes the buffers with the new absmax. div: divide sqrt(v) by
 * bias_correction2_sqrt (fastadam's own scalars are folded, so that it is
 * 1.0 and the division, exact then, is skipped).
 */
static inline __attribute__((always_inline)) void fa_q8_block(
    float *restrict param, float *restrict grad, uint8_t *restrict cm, uint8_t *restrict cv,
    float *restrict am, float *restrict av, const int64_t len, const fa_scalars_f32 c,
    const int l2, const int unscale, const int maximize, const int div)
{
    float mb[FA_Q8_BLOCK], vb[FA_Q8_BLOCK];
    const float am0 = *am, av0 = *av;
    uint32_t mm = 0, mv = 0;
#if !defined(__clang__)
#pragma GCC ivdep
#endif
    for (int64_t i = 0; i < len; i++) {
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
        p = p * c.decay;
        const float m0 = fa_q8_y_m(cm[i]) * am0;
        const float v0 = fa_q8_y_v(cv[i]) * av0;
        const float m = m0 + (g - m0) * c.one_minus_beta1;
        const float v = v0 * c.beta2 + c.one_minus_beta2 * g * g;
        const float sq = sqrtf(v);
        const float denom = (div ? div_bc2_f32(sq, c) : sq) + c.eps;
        param[i] = p - c.step_size * m / denom;
        mb[i] = m;
        vb[i] = v;
        const uint32_t bm = fa_q8_bits(m) & 0x7FFFFFFFu, bv = fa_q8_bits(v) & 0x7FFFFFFFu;
        mm = bm > mm ? bm : mm;
        mv = bv > mv ? bv : mv;
    }
    const float am1 = fa_q8_float(mm), av1 = fa_q8_float(mv);
    const float rm = mm != 0 ? 1.0f / am1 : 0.0f, rv = mv != 0 ? 1.0f / av1 : 0.0f;
    for (int64_t i = 0; i < len; i++) {
        cm[i] = fa_q8_enc_m(mb[i], rm);
        cv[i] = fa_q8_enc_v(vb[i], rv);
    }
    *am = am1;
    *av = av1;
}

/* Elements [0, n) (n from a block boundary; the last block may be partial). */
static inline __attribute__((always_inline)) void fa_q8_body(
    float *restrict param, float *restrict grad, uint8_t *restrict cm, uint8_t *restrict cv,
    float *restrict am, float *restrict av, int64_t n, const fa_scalars_f32 *s, const int l2,
    const int unscale, const int maximize, const int div)
{
    const fa_scalars_f32 c = *s;
    int64_t j = 0, b = 0;
    for (; j + FA_Q8_BLOCK <= n; j += FA_Q8_BLOCK, b++)
        fa_q8_block(param + j, grad + j, cm + j, cv + j, am + b, av + b, FA_Q8_BLOCK, c, l2,
                    unscale, maximize, div);
    if (j < n)
        fa_q8_block(param + j, grad + j, cm + j, cv + j, am + b, av + b, n - j, c, l2, unscale,
                    maximize, div);
}

#define FA_Q8_DEFINE_VARIANT(bits)                                                          \
    static void fa_adam_q8_##bits(float *param, float *grad, uint8_t *cm, uint8_t *cv,      \
                                  float *am, float *av, int64_t n, const fa_scalars_f32 *s) \
    {                                                                                       \
        fa_q8_body(param, grad, cm, cv, am, av, n, s, ((bits) & FA_F_L2) != 0,              \
                   ((bits) & FA_F_UNSCALE) != 0, ((bits) & FA_F_MAXIMIZE) != 0,             \
                   ((bits) & FA_Q8_F_DIV) != 0);                                            \
    }

/* amsgrad is refused for 8-bit states: its flag bit selects the division by
 * bias_correction2_sqrt instead (FA_Q8_F_DIV, set by the driver when it is not 1). */
FA_Q8_DEFINE_VARIANT(0)
FA_Q8_DEFINE_VARIANT(1)
FA_Q8_DEFINE_VARIANT(2)
FA_Q8_DEFINE_VARIANT(3)
FA_Q8_DEFINE_VARIANT(4)
FA_Q8_DEFINE_VARIANT(5)
FA_Q8_DEFINE_VARIANT(6)
FA_Q8_DEFINE_VARIANT(7)
FA_Q8_DEFINE_VARIANT(8)
FA_Q8_DEFINE_VARIANT(9)
FA_Q8_DEFINE_VARIANT(10)
FA_Q8_DEFINE_VARIANT(11)
FA_Q8_DEFINE_VARIANT(12)
FA_Q8_DEFINE_VARIANT(13)
FA_Q8_DEFINE_VARIANT(14)
FA_Q8_DEFINE_VARIANT(15)

#undef FA_Q8_DEFINE_VARIANT

#define FA_Q8_LIST16                                                                     \
    {                                                                                    \
        fa_adam_q8_0, fa_adam_q8_1, fa_adam_q8_2, fa_adam_q8_3, fa_adam_q8_4,            \
            fa_adam_q8_5, fa_adam_q8_6, fa_adam_q8_7, fa_adam_q8_8, fa_adam_q8_9,        \
            fa_adam_q8_10, fa_adam_q8_11, fa_adam_q8_12, fa_adam_q8_13, fa_adam_q8_14,   \
            fa_adam_q8_15                                                                \
    }
