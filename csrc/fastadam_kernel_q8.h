/*
 * fastadam_kernel_q8.h - the 8-bit block-wise state kernels (issue 18),
 * included by fastadam_kernel.c after the float32 instantiation of
 * fastadam_kernel_impl.h (it uses div_bc2_f32) and fastadam_kernel_bf16.h (its
 * bit casts fa_f32_bits, fa_bits_f32), so it is compiled once per ISA.
 *
 * The format and its rounding are defined by the NumPy reference,
 * fastadam/_q8.py; this reproduces it bit for bit: the code map is integer
 * arithmetic on float32 bit patterns, and the float operations are the
 * reference's, in its order (-ffp-contract=off, no fast-math).
 *
 * One fused pass per block of FA_Q8_BLOCK elements (fa_q8_block): the only
 * temporaries are two 1 KiB buffers on the stack, in L1.
 */
#define FA_Q8_ONE 0x3F800000u
#define FA_Q8_F_DIV FA_F_AMSGRAD /* the amsgrad bit: refused with 8-bit states */

/*
 * The SIMD blocks prefetch the next block of their piece while they compute
 * this one (one block ahead: 1 KiB of param, the float32 kernels' distance).
 * Each block ends in a requantization pass that loads nothing from memory,
 * during which the hardware streamer alone left the next block's lines
 * unrequested (2^24 elements, 2 threads, Zen 5: 10-15% less time per step, old
 * and new library alternated in one process). Not past the piece's last block,
 * where the next thread's share begins (fastadam_internal.h).
 */
static inline __attribute__((always_inline)) void fa_q8_prefetch_next(
    const float *param, const float *grad, const uint8_t *cm, const uint8_t *cv, const int i)
{
    /* from element i of a block: a line (16 elements) of each float array and,
     * every 64 elements, of each code array, one block ahead */
    FA_PREFETCH(param + i, FA_Q8_BLOCK);
    FA_PREFETCH(grad + i, FA_Q8_BLOCK);
    if (i % 64 == 0) {
        FA_PREFETCH(cm + i, FA_Q8_BLOCK);
        FA_PREFETCH(cv + i, FA_Q8_BLOCK);
    }
}

/* y(code) of exp_avg: sign in bit 7, magnitude k in bits 0..6 (K = 127) */
static inline float fa_q8_y_m(uint8_t code)
{
    const uint32_t k = code & 0x7Fu;
    const uint32_t mag = k != 0 ? FA_Q8_ONE - ((127u - k) << 20) : 0u;
    return fa_bits_f32(mag | ((uint32_t)(code & 0x80u) << 24));
}

/* y(code) of exp_avg_sq: magnitude k in all 8 bits (K = 255) */
static inline float fa_q8_y_v(uint8_t code)
{
    const uint32_t k = code;
    return fa_bits_f32(k != 0 ? FA_Q8_ONE - ((255u - k) << 20) : 0u);
}

static inline uint8_t fa_q8_enc_m(float x, float r)
{
    const uint32_t u = fa_f32_bits(fabsf(x) * r) & 0x7FFFFFFFu;
    int32_t t = ((int32_t)u - (int32_t)(FA_Q8_ONE - (127u << 20)) + (1 << 19)) >> 20;
    t = t < 0 ? 0 : t;
    t = t > 127 ? 127 : t;
    return (uint8_t)((uint32_t)t | ((fa_f32_bits(x) >> 24) & 0x80u));
}

static inline uint8_t fa_q8_enc_v(float x, float r)
{
    const uint32_t u = fa_f32_bits(fabsf(x) * r) & 0x7FFFFFFFu;
    const int32_t lo = fa_f32_bits(x) != 0; /* a positive v is never coded as 0 */
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
        const uint32_t bm = fa_f32_bits(m) & 0x7FFFFFFFu, bv = fa_f32_bits(v) & 0x7FFFFFFFu;
        mm = bm > mm ? bm : mm;
        mv = bv > mv ? bv : mv;
    }
    const float am1 = fa_bits_f32(mm), av1 = fa_bits_f32(mv);
    const float rm = mm != 0 ? 1.0f / am1 : 0.0f, rv = mv != 0 ? 1.0f / av1 : 0.0f;
    for (int64_t i = 0; i < len; i++) {
        cm[i] = fa_q8_enc_m(mb[i], rm);
        cv[i] = fa_q8_enc_v(vb[i], rv);
    }
    *am = am1;
    *av = av1;
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
/*
 * fa_q8_block for a full block on AVX-512 (F, VL, BW), in intrinsics: the same
 * operations in the same order as the portable fa_q8_block (each one correctly
 * rounded, so the bits are the same), but 16 lanes of float32 per vector where
 * GCC's auto-vectorization of the portable loop, driven by the uint8 codes,
 * made 64-element vectors with the float part unrolled 4x.
 */
static inline __attribute__((always_inline)) void fa_q8_block_avx512(
    float *restrict param, float *restrict grad, uint8_t *restrict cm, uint8_t *restrict cv,
    float *restrict am, float *restrict av, const fa_scalars_f32 c, const int l2,
    const int unscale, const int maximize, const int div, const int ahead)
{
    float mb[FA_Q8_BLOCK] __attribute__((aligned(64)));
    float vb[FA_Q8_BLOCK] __attribute__((aligned(64)));
    const __m512 am0 = _mm512_set1_ps(*am), av0 = _mm512_set1_ps(*av);
    const __m512i base_m = _mm512_set1_epi32((int32_t)(FA_Q8_ONE - (127u << 20)));
    const __m512i base_v = _mm512_set1_epi32((int32_t)(FA_Q8_ONE - (255u << 20)));
    const __m512i mag = _mm512_set1_epi32(0x7FFFFFFF), sign8 = _mm512_set1_epi32(0x80);
    const __m512i low7 = _mm512_set1_epi32(0x7F), half = _mm512_set1_epi32(1 << 19);
    const __m512i signbit = _mm512_set1_epi32((int32_t)0x80000000u);
    const __m512 omb1 = _mm512_set1_ps(c.one_minus_beta1), b2 = _mm512_set1_ps(c.beta2);
    const __m512 omb2 = _mm512_set1_ps(c.one_minus_beta2), eps = _mm512_set1_ps(c.eps);
    const __m512 ss = _mm512_set1_ps(c.step_size), decay = _mm512_set1_ps(c.decay);
    const __m512 wd = _mm512_set1_ps(c.weight_decay), gs = _mm512_set1_ps(c.grad_scale);
    const __m512 bc2 = _mm512_set1_ps(c.bias_correction2_sqrt);
    __m512i mm = _mm512_setzero_si512(), mv = _mm512_setzero_si512();
    for (int i = 0; i < FA_Q8_BLOCK; i += 16) {
        if (ahead)
            fa_q8_prefetch_next(param, grad, cm, cv, i);
        __m512 g = _mm512_loadu_ps(grad + i);
        if (unscale) {
            g = _mm512_div_ps(g, gs);
            _mm512_storeu_ps(grad + i, g);
        }
        if (maximize)
            g = _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(g), signbit));
        __m512 p = _mm512_loadu_ps(param + i);
        if (l2)
            g = _mm512_add_ps(g, _mm512_mul_ps(wd, p));
        p = _mm512_mul_ps(p, decay);
        const __m512i cmi = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(cm + i)));
        const __m512i cvi = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(cv + i)));
        const __m512i km = _mm512_and_si512(cmi, low7);
        __m512i ym = _mm512_maskz_add_epi32(_mm512_test_epi32_mask(km, km), base_m,
                                            _mm512_slli_epi32(km, 20));
        ym = _mm512_or_si512(ym, _mm512_slli_epi32(_mm512_and_si512(cmi, sign8), 24));
        const __m512i yv = _mm512_maskz_add_epi32(_mm512_test_epi32_mask(cvi, cvi), base_v,
                                                  _mm512_slli_epi32(cvi, 20));
        const __m512 m0 = _mm512_mul_ps(_mm512_castsi512_ps(ym), am0);
        const __m512 v0 = _mm512_mul_ps(_mm512_castsi512_ps(yv), av0);
        const __m512 m = _mm512_add_ps(m0, _mm512_mul_ps(_mm512_sub_ps(g, m0), omb1));
        const __m512 v = _mm512_add_ps(_mm512_mul_ps(v0, b2), _mm512_mul_ps(_mm512_mul_ps(omb2, g), g));
        __m512 sq = _mm512_sqrt_ps(v);
        if (div)
            sq = _mm512_div_ps(sq, bc2);
        const __m512 denom = _mm512_add_ps(sq, eps);
        _mm512_storeu_ps(param + i, _mm512_sub_ps(p, _mm512_div_ps(_mm512_mul_ps(ss, m), denom)));
        _mm512_store_ps(mb + i, m);
        _mm512_store_ps(vb + i, v);
        mm = _mm512_max_epu32(mm, _mm512_and_si512(_mm512_castps_si512(m), mag));
        mv = _mm512_max_epu32(mv, _mm512_and_si512(_mm512_castps_si512(v), mag));
    }
    const uint32_t mmax = _mm512_reduce_max_epu32(mm), vmax = _mm512_reduce_max_epu32(mv);
    const float am1 = fa_bits_f32(mmax), av1 = fa_bits_f32(vmax);
    const __m512 rm = _mm512_set1_ps(mmax != 0 ? 1.0f / am1 : 0.0f);
    const __m512 rv = _mm512_set1_ps(vmax != 0 ? 1.0f / av1 : 0.0f);
    const __m512i zero = _mm512_setzero_si512(), one = _mm512_set1_epi32(1);
    const __m512i round_m = _mm512_sub_epi32(half, base_m), round_v = _mm512_sub_epi32(half, base_v);
    const __m512i k127 = _mm512_set1_epi32(127);
    for (int i = 0; i < FA_Q8_BLOCK; i += 16) {
        const __m512i mbits = _mm512_castps_si512(_mm512_load_ps(mb + i));
        const __m512i vbits = _mm512_castps_si512(_mm512_load_ps(vb + i));
        const __m512i um = _mm512_and_si512(
            _mm512_castps_si512(_mm512_mul_ps(_mm512_castsi512_ps(_mm512_and_si512(mbits, mag)), rm)), mag);
        const __m512i uv = _mm512_and_si512(
            _mm512_castps_si512(_mm512_mul_ps(_mm512_castsi512_ps(_mm512_and_si512(vbits, mag)), rv)), mag);
        /* (u - base + half) >> 20 in one add: neither form overflows int32 */
        __m512i tm = _mm512_srai_epi32(_mm512_add_epi32(um, round_m), 20);
        __m512i tv = _mm512_srai_epi32(_mm512_add_epi32(uv, round_v), 20);
        tm = _mm512_min_epi32(_mm512_max_epi32(tm, zero), k127);
        tm = _mm512_or_si512(tm, _mm512_and_si512(_mm512_srli_epi32(mbits, 24), sign8));
        tv = _mm512_max_epi32(tv, _mm512_min_epu32(vbits, one)); /* >= 0: */
        _mm_storeu_si128((__m128i *)(cm + i), _mm512_cvtepi32_epi8(tm));
        _mm_storeu_si128((__m128i *)(cv + i), _mm512_cvtusepi32_epi8(tv)); /* min(tv, 255) */
    }
    *am = am1;
    *av = av1;
}
#define FA_Q8_HAVE_BLOCK_SIMD 1
#define fa_q8_block_simd fa_q8_block_avx512
#endif

#if defined(__AVX2__) && !defined(FA_Q8_HAVE_BLOCK_SIMD)
#include <immintrin.h>
/*
 * The codes of 16 elements of each moment (m's in [0, 255] in tm0, tm1; v's
 * >= 0 in tv0, tv1, where the packs saturate those above 255 to 255): m's 16
 * bytes in the low half, v's in the high half, in four operations for all.
 */
static inline __m256i fa_q8_bytes_avx2(__m256i tm0, __m256i tm1, __m256i tv0, __m256i tv1)
{
    /* dwords of 4 bytes, per 128-bit lane: m0-3 m8-11 v0-3 v8-11 | m4-7 m12-15 v4-7 v12-15 */
    const __m256i w = _mm256_packus_epi16(_mm256_packus_epi32(tm0, tm1),
                                          _mm256_packus_epi32(tv0, tv1));
    return _mm256_permutevar8x32_epi32(w, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

/* fa_q8_block for a full block on AVX2: the AVX-512 version's operations on 8 lanes. */
static inline __attribute__((always_inline)) void fa_q8_block_avx2(
    float *restrict param, float *restrict grad, uint8_t *restrict cm, uint8_t *restrict cv,
    float *restrict am, float *restrict av, const fa_scalars_f32 c, const int l2,
    const int unscale, const int maximize, const int div, const int ahead)
{
    float mb[FA_Q8_BLOCK] __attribute__((aligned(32)));
    float vb[FA_Q8_BLOCK] __attribute__((aligned(32)));
    const __m256 am0 = _mm256_set1_ps(*am), av0 = _mm256_set1_ps(*av);
    const __m256i base_m = _mm256_set1_epi32((int32_t)(FA_Q8_ONE - (127u << 20)));
    const __m256i base_v = _mm256_set1_epi32((int32_t)(FA_Q8_ONE - (255u << 20)));
    const __m256i mag = _mm256_set1_epi32(0x7FFFFFFF), sign8 = _mm256_set1_epi32(0x80);
    const __m256i low7 = _mm256_set1_epi32(0x7F), half = _mm256_set1_epi32(1 << 19);
    const __m256i signbit = _mm256_set1_epi32((int32_t)0x80000000u);
    const __m256i zero = _mm256_setzero_si256();
    const __m256 omb1 = _mm256_set1_ps(c.one_minus_beta1), b2 = _mm256_set1_ps(c.beta2);
    const __m256 omb2 = _mm256_set1_ps(c.one_minus_beta2), eps = _mm256_set1_ps(c.eps);
    const __m256 ss = _mm256_set1_ps(c.step_size), decay = _mm256_set1_ps(c.decay);
    const __m256 wd = _mm256_set1_ps(c.weight_decay), gs = _mm256_set1_ps(c.grad_scale);
    const __m256 bc2 = _mm256_set1_ps(c.bias_correction2_sqrt);
    __m256i mm = zero, mv = zero;
    for (int i = 0; i < FA_Q8_BLOCK; i += 8) {
        if (ahead && i % 16 == 0)
            fa_q8_prefetch_next(param, grad, cm, cv, i);
        __m256 g = _mm256_loadu_ps(grad + i);
        if (unscale) {
            g = _mm256_div_ps(g, gs);
            _mm256_storeu_ps(grad + i, g);
        }
        if (maximize)
            g = _mm256_castsi256_ps(_mm256_xor_si256(_mm256_castps_si256(g), signbit));
        __m256 p = _mm256_loadu_ps(param + i);
        if (l2)
            g = _mm256_add_ps(g, _mm256_mul_ps(wd, p));
        p = _mm256_mul_ps(p, decay);
        const __m256i cmi = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(cm + i)));
        const __m256i cvi = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(cv + i)));
        const __m256i km = _mm256_and_si256(cmi, low7);
        /* sign_epi32(x, k) is x, or 0 where the magnitude code k (>= 0) is 0 */
        __m256i ym = _mm256_sign_epi32(_mm256_add_epi32(base_m, _mm256_slli_epi32(km, 20)), km);
        ym = _mm256_or_si256(ym, _mm256_slli_epi32(_mm256_and_si256(cmi, sign8), 24));
        const __m256i yv =
            _mm256_sign_epi32(_mm256_add_epi32(base_v, _mm256_slli_epi32(cvi, 20)), cvi);
        const __m256 m0 = _mm256_mul_ps(_mm256_castsi256_ps(ym), am0);
        const __m256 v0 = _mm256_mul_ps(_mm256_castsi256_ps(yv), av0);
        const __m256 m = _mm256_add_ps(m0, _mm256_mul_ps(_mm256_sub_ps(g, m0), omb1));
        const __m256 v =
            _mm256_add_ps(_mm256_mul_ps(v0, b2), _mm256_mul_ps(_mm256_mul_ps(omb2, g), g));
        __m256 sq = _mm256_sqrt_ps(v);
        if (div)
            sq = _mm256_div_ps(sq, bc2);
        const __m256 denom = _mm256_add_ps(sq, eps);
        _mm256_storeu_ps(param + i,
                         _mm256_sub_ps(p, _mm256_div_ps(_mm256_mul_ps(ss, m), denom)));
        _mm256_store_ps(mb + i, m);
        _mm256_store_ps(vb + i, v);
        mm = _mm256_max_epu32(mm, _mm256_and_si256(_mm256_castps_si256(m), mag));
        mv = _mm256_max_epu32(mv, _mm256_and_si256(_mm256_castps_si256(v), mag));
    }
    uint32_t lanes_m[8], lanes_v[8], mmax = 0, vmax = 0;
    _mm256_storeu_si256((__m256i *)lanes_m, mm);
    _mm256_storeu_si256((__m256i *)lanes_v, mv);
    for (int k = 0; k < 8; k++) {
        mmax = lanes_m[k] > mmax ? lanes_m[k] : mmax;
        vmax = lanes_v[k] > vmax ? lanes_v[k] : vmax;
    }
    const float am1 = fa_bits_f32(mmax), av1 = fa_bits_f32(vmax);
    const __m256 rm = _mm256_set1_ps(mmax != 0 ? 1.0f / am1 : 0.0f);
    const __m256 rv = _mm256_set1_ps(vmax != 0 ? 1.0f / av1 : 0.0f);
    const __m256i one = _mm256_set1_epi32(1), k127 = _mm256_set1_epi32(127);
    const __m256i round_m = _mm256_sub_epi32(half, base_m), round_v = _mm256_sub_epi32(half, base_v);
    for (int i = 0; i < FA_Q8_BLOCK; i += 16) {
        __m256i tm[2], tv[2];
        for (int h = 0; h < 2; h++) {
            const __m256i mbits = _mm256_castps_si256(_mm256_load_ps(mb + i + 8 * h));
            const __m256i vbits = _mm256_castps_si256(_mm256_load_ps(vb + i + 8 * h));
            const __m256i um = _mm256_and_si256(
                _mm256_castps_si256(
                    _mm256_mul_ps(_mm256_castsi256_ps(_mm256_and_si256(mbits, mag)), rm)),
                mag);
            const __m256i uv = _mm256_and_si256(
                _mm256_castps_si256(
                    _mm256_mul_ps(_mm256_castsi256_ps(_mm256_and_si256(vbits, mag)), rv)),
                mag);
            /* (u - base + half) >> 20 in one add: neither form overflows int32 */
            tm[h] = _mm256_srai_epi32(_mm256_add_epi32(um, round_m), 20);
            tv[h] = _mm256_srai_epi32(_mm256_add_epi32(uv, round_v), 20);
            tm[h] = _mm256_min_epi32(_mm256_max_epi32(tm[h], zero), k127);
            tm[h] = _mm256_or_si256(tm[h],
                                    _mm256_and_si256(_mm256_srli_epi32(mbits, 24), sign8));
            /* >= 0; the packs saturate at 255 */
            tv[h] = _mm256_max_epi32(tv[h], _mm256_min_epu32(vbits, one));
        }
        const __m256i codes = fa_q8_bytes_avx2(tm[0], tm[1], tv[0], tv[1]);
        _mm_storeu_si128((__m128i *)(cm + i), _mm256_castsi256_si128(codes));
        _mm_storeu_si128((__m128i *)(cv + i), _mm256_extracti128_si256(codes, 1));
    }
    *am = am1;
    *av = av1;
}
#define FA_Q8_HAVE_BLOCK_SIMD 1
#define fa_q8_block_simd fa_q8_block_avx2
#endif

/* Elements [0, n) (n from a block boundary; the last block may be partial). */
static inline __attribute__((always_inline)) void fa_q8_body(
    float *restrict param, float *restrict grad, uint8_t *restrict cm, uint8_t *restrict cv,
    float *restrict am, float *restrict av, int64_t n, const fa_scalars_f32 *s, const int l2,
    const int unscale, const int maximize, const int div)
{
    const fa_scalars_f32 c = *s;
    int64_t j = 0, b = 0;
    for (; j + FA_Q8_BLOCK <= n; j += FA_Q8_BLOCK, b++)
#ifdef FA_Q8_HAVE_BLOCK_SIMD
        fa_q8_block_simd(param + j, grad + j, cm + j, cv + j, am + b, av + b, c, l2, unscale,
                         maximize, div, j + 2 * FA_Q8_BLOCK <= n);
#else
        fa_q8_block(param + j, grad + j, cm + j, cv + j, am + b, av + b, FA_Q8_BLOCK, c, l2,
                    unscale, maximize, div);
#endif
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
