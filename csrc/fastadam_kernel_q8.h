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
 * temporaries are the new moments of a block in 1 KiB buffers on the stack, in
 * L1 (two blocks' worth on the SIMD path, fa_q8_body).
 */
#define FA_Q8_ONE 0x3F800000u
#define FA_Q8_F_DIV FA_F_AMSGRAD /* the amsgrad bit: refused with 8-bit states */

/*
 * The SIMD blocks prefetch FA_Q8_AHEAD blocks ahead in their piece while they
 * compute this one. Each block ends in a requantization pass that loads
 * nothing from memory, during which the hardware streamer alone left the
 * coming lines unrequested (2^24 elements, 2 threads, Zen 5: one block ahead
 * took 10-15% off the step, old and new library alternated in one process).
 * Three blocks (3 KiB of param, 768 bytes of each code array) against one, in
 * the same way (session 14, `bench/compare_c_builds.py --dtype q8`, two runs
 * per ISA): 1.04-1.10x at 2^24, 1.06-1.19x at 2^25, 0.99-1.03x at 2^26 with
 * AVX-512; 1.07x, 1.06x, 1.01-1.02x with AVX2. Two blocks were as good at
 * 2^24 and 0.92-1.12x at 2^26 (BENCHMARKS.md, session 14). No prefetch past
 * the piece's last block, where the next thread's share begins
 * (fastadam_internal.h).
 */
#define FA_Q8_AHEAD 3
static inline __attribute__((always_inline)) void fa_q8_prefetch_next(
    const float *param, const float *grad, const uint8_t *cm, const uint8_t *cv, const int i,
    const int64_t ahead)
{
    /* from element i of a block: a line (16 elements) of each float array and,
     * every 64 elements, of each code array, ahead elements on */
    FA_PREFETCH(param + i, ahead);
    FA_PREFETCH(grad + i, ahead);
    if (i % 64 == 0) {
        FA_PREFETCH(cm + i, ahead);
        FA_PREFETCH(cv + i, ahead);
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

/*
 * The encoders take bits(x * r) & 0x7FFFFFFF where the reference writes
 * bits(|x| * r) & 0x7FFFFFFF: the two products differ only in the sign bit (a
 * multiplication rounds the magnitude whatever the signs; r >= +0 or NaN, and a
 * NaN passes through with its payload), and the mask clears it. One operation
 * less per element.
 */
static inline uint8_t fa_q8_enc_m(float x, float r)
{
    const uint32_t u = fa_f32_bits(x * r) & 0x7FFFFFFFu;
    int32_t t = ((int32_t)u - (int32_t)(FA_Q8_ONE - (127u << 20)) + (1 << 19)) >> 20;
    t = t < 0 ? 0 : t;
    t = t > 127 ? 127 : t;
    return (uint8_t)((uint32_t)t | ((fa_f32_bits(x) >> 24) & 0x80u));
}

static inline uint8_t fa_q8_enc_v(float x, float r)
{
    const uint32_t u = fa_f32_bits(x * r) & 0x7FFFFFFFu;
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

/*
 * The SIMD path, for full blocks: the portable fa_q8_block's operations in its
 * order (each correctly rounded, so the bits are the same), in intrinsics.
 * GCC's auto-vectorization of the portable loop, driven by the uint8 codes,
 * made 64-element vectors with the float part unrolled 4x.
 *
 * Each ISA below names its vector types and intrinsics (FA_V_PS(add) is
 * _mm512_add_ps or _mm256_add_ps, ...) and defines what differs between them:
 *   fa_q8_decode         the float32 bit patterns y(code) of FA_Q8_DCODES
 *                        codes of each moment, in FA_Q8_DEC vectors,
 *   fa_q8_requant_step   the codes of FA_Q8_RQ elements, clamped, signed, packed
 *                        and stored,
 *   fa_q8_hmax           the largest lane of a magnitude accumulator.
 * The update and the codes' arithmetic are written once, after them.
 */
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#define FA_Q8_LANES 16
#define FA_Q8_RQ 32
#define FA_Q8_INTERLEAVE 1 /* see fa_q8_pass */
typedef __m512 fa_q8_vf;
typedef __m512i fa_q8_vi;
#define FA_V_PS(op) _mm512_##op##_ps
#define FA_V_EPI32(op) _mm512_##op##_epi32
#define FA_V_EPU32(op) _mm512_##op##_epu32
#define FA_V_AND _mm512_and_si512
#define FA_V_XOR _mm512_xor_si512
#define FA_V_AS_PS _mm512_castsi512_ps
#define FA_V_AS_SI _mm512_castps_si512
#define fa_q8_vzero _mm512_setzero_si512

/*
 * y(code) of 32 codes of each moment, two vectors each, computed as in the
 * AVX2 variant below: every y has 16 zero low bits, so its high half is made
 * in 16-bit lanes for all 32 codes at once and widened by interleaving it with
 * zeros (15 operations for 32 elements of both moments, against 22 for
 * 16-lane decodes in 32-bit lanes). The codes' dwords are put in the order
 * 0-3 16-19 | 4-7 20-23 | ... so that each 128-bit lane's low words hold 4 of
 * elements 0-15 and its high words 4 of 16-31: the in-lane interleaves then
 * give elements 0-15 and 16-31 in order.
 */
#define FA_Q8_DCODES 32
static inline __attribute__((always_inline)) void fa_q8_decode(const uint8_t *cm,
                                                              const uint8_t *cv, __m512i ym[2],
                                                              __m512i yv[2])
{
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    const __m512i zero = _mm512_setzero_si512();
    /* m, sign-extended: (x << 4) & 0x87F0 is k << 4 with the code's sign in
     * bit 15. k != 0: base + that (base + (k << 4) < 0x8000, so the add keeps
     * the sign); k == 0: the sign alone (y = +-0, as fa_q8_y_m) */
    const __m512i xm = _mm512_cvtepi8_epi16(
        _mm256_permutevar8x32_epi32(_mm256_loadu_si256((const __m256i *)cm), order));
    const __m512i sm = _mm512_and_si512(_mm512_slli_epi16(xm, 4), _mm512_set1_epi16((int16_t)0x87F0));
    const __m512i hm = _mm512_mask_add_epi16(
        sm, _mm512_test_epi16_mask(xm, _mm512_set1_epi16(0x7F)), sm,
        _mm512_set1_epi16((int16_t)((FA_Q8_ONE - (127u << 20)) >> 16)));
    /* v: k = the code; 0 for k == 0 */
    const __m512i xv = _mm512_cvtepu8_epi16(
        _mm256_permutevar8x32_epi32(_mm256_loadu_si256((const __m256i *)cv), order));
    const __m512i hv = _mm512_maskz_add_epi16(
        _mm512_test_epi16_mask(xv, xv), _mm512_slli_epi16(xv, 4),
        _mm512_set1_epi16((int16_t)((FA_Q8_ONE - (255u << 20)) >> 16)));
    ym[0] = _mm512_unpacklo_epi16(zero, hm);
    ym[1] = _mm512_unpackhi_epi16(zero, hm);
    yv[0] = _mm512_unpacklo_epi16(zero, hv);
    yv[1] = _mm512_unpackhi_epi16(zero, hv);
}

#endif

#if defined(__AVX2__) && !defined(FA_Q8_LANES)
#include <immintrin.h>
#define FA_Q8_LANES 8
#define FA_Q8_RQ 16
#define FA_Q8_DCODES 16
/* Not interleaved: with AVX2's 16 vector registers the interleaved loop spilled
 * 22 of them to the stack, and llvm-mca put it at 6.44 cycles/element on Zen 1
 * (znver1; 6.13 on znver2) against 5.85 for the two loops; on this variant's
 * one measured CPU (an Intel Xeon under FASTADAM_ISA=avx2) it gained nothing. */
#define FA_Q8_INTERLEAVE 0
typedef __m256 fa_q8_vf;
typedef __m256i fa_q8_vi;
#define FA_V_PS(op) _mm256_##op##_ps
#define FA_V_EPI32(op) _mm256_##op##_epi32
#define FA_V_EPU32(op) _mm256_##op##_epu32
#define FA_V_AND _mm256_and_si256
#define FA_V_XOR _mm256_xor_si256
#define FA_V_AS_PS _mm256_castsi256_ps
#define FA_V_AS_SI _mm256_castps_si256
#define fa_q8_vzero _mm256_setzero_si256

/*
 * y(code) of 16 codes of each moment, two vectors each. Every y has 16 zero
 * low bits (fa_q8_y_m: a base and k << 20), so its high half is computed for
 * all 16 codes at once in 16-bit lanes and widened by interleaving it with
 * zeros: 15 operations against 24 for two 8-lane decodes in 32-bit lanes (the
 * 8-bit step on AVX2 is bound by the count of vector operations; BENCHMARKS.md,
 * "Session 14"). The codes are loaded into both 128-bit lanes and shuffled so
 * that each lane's low words hold codes 0-3 / 4-7 and its high words 8-11 /
 * 12-15: the in-lane interleaves then give elements 0-7 and 8-15 in order.
 */
static inline __attribute__((always_inline)) void fa_q8_decode(const uint8_t *cm,
                                                              const uint8_t *cv, __m256i ym[2],
                                                              __m256i yv[2])
{
    /* byte 0x80 in a shuffle control writes a zero */
    const __m256i lo_byte = _mm256_setr_epi8(
        0, -128, 1, -128, 2, -128, 3, -128, 8, -128, 9, -128, 10, -128, 11, -128,
        4, -128, 5, -128, 6, -128, 7, -128, 12, -128, 13, -128, 14, -128, 15, -128);
    const __m256i hi_byte = _mm256_setr_epi8(
        -128, 0, -128, 1, -128, 2, -128, 3, -128, 8, -128, 9, -128, 10, -128, 11,
        -128, 4, -128, 5, -128, 6, -128, 7, -128, 12, -128, 13, -128, 14, -128, 15);
    const __m256i zero = _mm256_setzero_si256();
    /* m: code << 8 = sign bit 15, k in bits 8-14; high half = base + k << 4, | sign */
    const __m256i xm = _mm256_shuffle_epi8(
        _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)cm)), hi_byte);
    const __m256i km4 = _mm256_and_si256(_mm256_srli_epi16(xm, 4), _mm256_set1_epi16(0x7F0));
    /* sign_epi16(x, k) is x, or 0 where the magnitude k (>= 0) is 0 */
    __m256i hm = _mm256_sign_epi16(
        _mm256_add_epi16(km4, _mm256_set1_epi16((int16_t)((FA_Q8_ONE - (127u << 20)) >> 16))),
        km4);
    hm = _mm256_or_si256(hm, _mm256_and_si256(xm, _mm256_set1_epi16((int16_t)0x8000)));
    /* v: k = the code */
    const __m256i kv = _mm256_shuffle_epi8(
        _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)cv)), lo_byte);
    const __m256i hv = _mm256_sign_epi16(
        _mm256_add_epi16(_mm256_slli_epi16(kv, 4),
                         _mm256_set1_epi16((int16_t)((FA_Q8_ONE - (255u << 20)) >> 16))),
        kv);
    ym[0] = _mm256_unpacklo_epi16(zero, hm);
    ym[1] = _mm256_unpackhi_epi16(zero, hm);
    yv[0] = _mm256_unpacklo_epi16(zero, hv);
    yv[1] = _mm256_unpackhi_epi16(zero, hv);
}

#endif

#ifdef FA_Q8_LANES
/* vectors of y(code) that fa_q8_decode makes of FA_Q8_DCODES codes of each moment */
#define FA_Q8_DEC (FA_Q8_DCODES / FA_Q8_LANES)

/* The update of FA_Q8_LANES elements from their y(code) (ym, yv): param (and
 * grad when unscaling) written, the new m and v into mb, vb, their magnitudes
 * folded into *mm, *mv. */
static inline __attribute__((always_inline)) void fa_q8_update_lanes(
    const fa_scalars_f32 c, float *param, float *grad, const fa_q8_vi ym, const fa_q8_vi yv,
    float *mb, float *vb, const fa_q8_vf am0, const fa_q8_vf av0, fa_q8_vi *mm, fa_q8_vi *mv,
    const int l2, const int unscale, const int maximize, const int div)
{
    const fa_q8_vi mag = FA_V_EPI32(set1)(0x7FFFFFFF);
    fa_q8_vf g = FA_V_PS(loadu)(grad);
    if (unscale) {
        g = FA_V_PS(div)(g, FA_V_PS(set1)(c.grad_scale));
        FA_V_PS(storeu)(grad, g);
    }
    if (maximize)
        g = FA_V_AS_PS(FA_V_XOR(FA_V_AS_SI(g), FA_V_EPI32(set1)((int32_t)0x80000000u)));
    fa_q8_vf p = FA_V_PS(loadu)(param);
    if (l2)
        g = FA_V_PS(add)(g, FA_V_PS(mul)(FA_V_PS(set1)(c.weight_decay), p));
    p = FA_V_PS(mul)(p, FA_V_PS(set1)(c.decay));
    const fa_q8_vf m0 = FA_V_PS(mul)(FA_V_AS_PS(ym), am0);
    const fa_q8_vf v0 = FA_V_PS(mul)(FA_V_AS_PS(yv), av0);
    const fa_q8_vf m =
        FA_V_PS(add)(m0, FA_V_PS(mul)(FA_V_PS(sub)(g, m0), FA_V_PS(set1)(c.one_minus_beta1)));
    const fa_q8_vf g2 = FA_V_PS(mul)(FA_V_PS(mul)(FA_V_PS(set1)(c.one_minus_beta2), g), g);
    const fa_q8_vf v = FA_V_PS(add)(FA_V_PS(mul)(v0, FA_V_PS(set1)(c.beta2)), g2);
    fa_q8_vf sq = FA_V_PS(sqrt)(v);
    if (div)
        sq = FA_V_PS(div)(sq, FA_V_PS(set1)(c.bias_correction2_sqrt));
    const fa_q8_vf denom = FA_V_PS(add)(sq, FA_V_PS(set1)(c.eps));
    const fa_q8_vf step = FA_V_PS(div)(FA_V_PS(mul)(FA_V_PS(set1)(c.step_size), m), denom);
    FA_V_PS(storeu)(param, FA_V_PS(sub)(p, step));
    FA_V_PS(store)(mb, m);
    FA_V_PS(store)(vb, v);
    *mm = FA_V_EPU32(max)(*mm, FA_V_AND(FA_V_AS_SI(m), mag));
    *mv = FA_V_EPU32(max)(*mv, FA_V_AND(FA_V_AS_SI(v), mag));
}

/* The codes of FA_Q8_LANES elements of each moment as int32 lanes, before
 * m's clamp to [0, 127] and sign: tm may lie outside it, tv is >= 0 (the
 * packs of fa_q8_requant_step saturate those above 255 to 255, as the
 * reference's clamp). */
static inline __attribute__((always_inline)) void fa_q8_codes_raw(const fa_q8_vf m,
                                                                 const fa_q8_vf v,
                                                                 const fa_q8_vf rm,
                                                                 const fa_q8_vf rv, fa_q8_vi *tm,
                                                                 fa_q8_vi *tv)
{
    const fa_q8_vi mag = FA_V_EPI32(set1)(0x7FFFFFFF), half = FA_V_EPI32(set1)(1 << 19);
    const fa_q8_vi base_m = FA_V_EPI32(set1)((int32_t)(FA_Q8_ONE - (127u << 20)));
    const fa_q8_vi base_v = FA_V_EPI32(set1)((int32_t)(FA_Q8_ONE - (255u << 20)));
    /* bits(x * r) & mag: see fa_q8_enc_m */
    const fa_q8_vi um = FA_V_AND(FA_V_AS_SI(FA_V_PS(mul)(m, rm)), mag);
    const fa_q8_vi uv = FA_V_AND(FA_V_AS_SI(FA_V_PS(mul)(v, rv)), mag);
    /* (u - base + half) >> 20 in one add: neither form overflows int32 */
    *tm = FA_V_EPI32(srai)(FA_V_EPI32(add)(um, FA_V_EPI32(sub)(half, base_m)), 20);
    const fa_q8_vi t = FA_V_EPI32(srai)(FA_V_EPI32(add)(uv, FA_V_EPI32(sub)(half, base_v)), 20);
    /* >= 1 for a positive v: max with min(bits, 1) */
    *tv = FA_V_EPI32(max)(t, FA_V_EPU32(min)(FA_V_AS_SI(v), FA_V_EPI32(set1)(1)));
}
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
/*
 * 32 elements' codes of each moment: packed together (3 shuffles and one
 * permutation for all 64 bytes, against two operations per 16 bytes for
 * vpmovdb/vpmovusdb, on the port the shuffles share). m's clamp to [0, 127]
 * and its sign are applied to the packed bytes, as in the AVX2 variant below:
 * 4 operations for m's 32 codes against 8 in 32-bit lanes, on the two ports
 * that run every 512-bit operation.
 */
static inline __attribute__((always_inline)) void fa_q8_requant_step(
    const float *mb, const float *vb, uint8_t *cm, uint8_t *cv, const __m512 rm, const __m512 rv)
{
    const __m512 m0 = _mm512_load_ps(mb), m1 = _mm512_load_ps(mb + 16);
    __m512i tm0, tm1, tv0, tv1;
    fa_q8_codes_raw(m0, _mm512_load_ps(vb), rm, rv, &tm0, &tv0);
    fa_q8_codes_raw(m1, _mm512_load_ps(vb + 16), rm, rv, &tm1, &tv1);
    /* per 128-bit lane l, dwords of 4 codes: m[4l..] m[16+4l..] v[4l..] v[16+4l..] */
    const __m512i w = _mm512_packus_epi16(_mm512_packs_epi32(tm0, tm1),
                                          _mm512_packus_epi32(tv0, tv1));
    /* the same places: m's sign bytes (negative iff m's sign bit is set), zeros */
    const __m512i sign = _mm512_packs_epi16(
        _mm512_packs_epi32(_mm512_castps_si512(m0), _mm512_castps_si512(m1)),
        _mm512_setzero_si512());
    const __m512i top = _mm512_broadcast_i32x4(
        _mm_setr_epi8(127, 127, 127, 127, 127, 127, 127, 127, -1, -1, -1, -1, -1, -1, -1, -1));
    /* min(w, top) | (sign & 0x80) */
    const __m512i codes_w = _mm512_ternarylogic_epi32(
        _mm512_min_epu8(w, top), sign, _mm512_set1_epi8((char)0x80), 0xF8);
    const __m512i codes = _mm512_permutexvar_epi32(
        _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15), codes_w);
    _mm256_storeu_si256((__m256i *)cm, _mm512_castsi512_si256(codes));
    _mm256_storeu_si256((__m256i *)cv, _mm512_extracti64x4_epi64(codes, 1));
}

static inline uint32_t fa_q8_hmax(const __m512i x)
{
    return _mm512_reduce_max_epu32(x);
}
#elif defined(__AVX2__)
/*
 * 16 elements' codes of each moment, packed together. m's clamp to [0, 127]
 * and its sign bit are applied to the packed bytes, all 16 at once: the packs
 * saturate the codes to [0, 255], a byte min takes m's to 127, and m's sign
 * bits come from packing its float bits with signed saturation, which keeps
 * each one's sign (10 operations for m's 16 codes in 32-bit lanes, 5 here).
 */
static inline __attribute__((always_inline)) void fa_q8_requant_step(
    const float *mb, const float *vb, uint8_t *cm, uint8_t *cv, const __m256 rm, const __m256 rv)
{
    const __m256 m0 = _mm256_load_ps(mb), m1 = _mm256_load_ps(mb + 8);
    __m256i tm0, tm1, tv0, tv1;
    fa_q8_codes_raw(m0, _mm256_load_ps(vb), rm, rv, &tm0, &tv0);
    fa_q8_codes_raw(m1, _mm256_load_ps(vb + 8), rm, rv, &tm1, &tv1);
    /* bytes, per 128-bit lane: m0-3 m8-11 v0-3 v8-11 | m4-7 m12-15 v4-7 v12-15 */
    const __m256i w = _mm256_packus_epi16(_mm256_packs_epi32(tm0, tm1),
                                          _mm256_packus_epi32(tv0, tv1));
    /* the same places: m's sign bytes (negative iff m's sign bit is set), zeros */
    const __m256i sign = _mm256_packs_epi16(
        _mm256_packs_epi32(_mm256_castps_si256(m0), _mm256_castps_si256(m1)),
        _mm256_setzero_si256());
    const __m256i top = _mm256_setr_epi8(127, 127, 127, 127, 127, 127, 127, 127, -1, -1, -1, -1,
                                         -1, -1, -1, -1, 127, 127, 127, 127, 127, 127, 127, 127,
                                         -1, -1, -1, -1, -1, -1, -1, -1);
    const __m256i codes_w =
        _mm256_or_si256(_mm256_min_epu8(w, top),
                        _mm256_and_si256(sign, _mm256_set1_epi8((char)0x80)));
    const __m256i codes =
        _mm256_permutevar8x32_epi32(codes_w, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm_storeu_si128((__m128i *)cm, _mm256_castsi256_si128(codes));
    _mm_storeu_si128((__m128i *)cv, _mm256_extracti128_si256(codes, 1));
}

static inline uint32_t fa_q8_hmax(const __m256i x)
{
    uint32_t lanes[8], r = 0;
    _mm256_storeu_si256((__m256i *)lanes, x);
    for (int k = 0; k < 8; k++)
        r = lanes[k] > r ? lanes[k] : r;
    return r;
}
#endif

#ifdef FA_Q8_LANES
/*
 * One full block's update (pass 1) and, when prev, the previous block's
 * requantization (its pass 2) interleaved with it, one FA_Q8_RQ step of each
 * at a time. The update waits on the divider (a square root and a division
 * per element); the requantization needs none, and laid end to end after its
 * own update, as one loop after the other, it ran while the divider sat idle
 * (Intel Xeon, AVX-512, llvm-mca: 22.6 and 8.6 cycles per 16 elements; the
 * two interleaved, 25.6). Interleaved, the out-of-order core runs much of it
 * in the update's shadow (measured on that Xeon, one thread in cache: 0.73 ->
 * 0.69 ns per element; 2^24 on two threads, 0.93 of the old time). The
 * block's new scales are stored here; its codes, with the next block (their
 * reciprocals go out through rm_out, rv_out). ahead: how many elements on
 * to prefetch (0 in a piece's last blocks, see fa_q8_prefetch_next).
 */
static inline __attribute__((always_inline)) void fa_q8_pass(
    const fa_scalars_f32 c, float *param, float *grad, const uint8_t *cm, const uint8_t *cv,
    float *am, float *av, float *mb, float *vb, const float *pmb, const float *pvb,
    uint8_t *pcm, uint8_t *pcv, const float prm, const float prv, float *rm_out, float *rv_out,
    const int l2, const int unscale, const int maximize, const int div, const int prev,
    const int64_t ahead)
{
    const fa_q8_vf am0 = FA_V_PS(set1)(*am), av0 = FA_V_PS(set1)(*av);
    const fa_q8_vf rm = FA_V_PS(set1)(prm), rv = FA_V_PS(set1)(prv);
    fa_q8_vi mm = fa_q8_vzero(), mv = fa_q8_vzero();
    for (int i = 0; i < FA_Q8_BLOCK; i += FA_Q8_RQ) {
        for (int h = i; h < i + FA_Q8_RQ; h += FA_Q8_DCODES) {
            fa_q8_vi ym[FA_Q8_DEC], yv[FA_Q8_DEC];
            fa_q8_decode(cm + h, cv + h, ym, yv);
            for (int k = 0; k < FA_Q8_DEC; k++) {
                const int e = h + k * FA_Q8_LANES;
                if (e % 16 == 0) /* a line of each float array */
                    fa_q8_prefetch_next(param, grad, cm, cv, e, ahead);
                fa_q8_update_lanes(c, param + e, grad + e, ym[k], yv[k], mb + e, vb + e, am0, av0,
                                   &mm, &mv, l2, unscale, maximize, div);
            }
        }
        if (prev)
            fa_q8_requant_step(pmb + i, pvb + i, pcm + i, pcv + i, rm, rv);
    }
    const uint32_t mmax = fa_q8_hmax(mm), vmax = fa_q8_hmax(mv);
    *am = fa_bits_f32(mmax);
    *av = fa_bits_f32(vmax);
    *rm_out = mmax != 0 ? 1.0f / *am : 0.0f;
    *rv_out = vmax != 0 ? 1.0f / *av : 0.0f;
}
#endif

/* The codes of a full block from its new moments (its pass 2 on its own). */
#ifdef FA_Q8_LANES
static inline __attribute__((always_inline)) void fa_q8_requant_block(
    const float *mb, const float *vb, uint8_t *cm, uint8_t *cv, const float rm, const float rv)
{
    const fa_q8_vf vrm = FA_V_PS(set1)(rm), vrv = FA_V_PS(set1)(rv);
    for (int i = 0; i < FA_Q8_BLOCK; i += FA_Q8_RQ)
        fa_q8_requant_step(mb + i, vb + i, cm + i, cv + i, vrm, vrv);
}
#endif

/* Elements [0, n) (n from a block boundary; the last block may be partial). */
static inline __attribute__((always_inline)) void fa_q8_body(
    float *restrict param, float *restrict grad, uint8_t *restrict cm, uint8_t *restrict cv,
    float *restrict am, float *restrict av, int64_t n, const fa_scalars_f32 *s, const int l2,
    const int unscale, const int maximize, const int div)
{
    const fa_scalars_f32 c = *s;
    int64_t j = 0, b = 0;
#ifdef FA_Q8_LANES
    /* the new moments of this block and of the one before it (whose codes are
     * written during this block's pass where FA_Q8_INTERLEAVE) */
    float buf[2][2][FA_Q8_BLOCK] __attribute__((aligned(64)));
    float rm = 0.0f, rv = 0.0f;
    for (; j + FA_Q8_BLOCK <= n; j += FA_Q8_BLOCK, b++) {
        float *mb = buf[b & 1][0], *vb = buf[b & 1][1];
        const float *pmb = buf[(b & 1) ^ 1][0], *pvb = buf[(b & 1) ^ 1][1];
        /* the last blocks prefetch their own lines, in flight already: no
         * branch in the loop */
        const int64_t ahead =
            j + (FA_Q8_AHEAD + 1) * FA_Q8_BLOCK <= n ? FA_Q8_AHEAD * FA_Q8_BLOCK : 0;
        if (FA_Q8_INTERLEAVE && b > 0)
            fa_q8_pass(c, param + j, grad + j, cm + j, cv + j, am + b, av + b, mb, vb, pmb, pvb,
                       cm + j - FA_Q8_BLOCK, cv + j - FA_Q8_BLOCK, rm, rv, &rm, &rv, l2, unscale,
                       maximize, div, 1, ahead);
        else
            fa_q8_pass(c, param + j, grad + j, cm + j, cv + j, am + b, av + b, mb, vb, pmb, pvb,
                       cm, cv, rm, rv, &rm, &rv, l2, unscale, maximize, div, 0, ahead);
        if (!FA_Q8_INTERLEAVE)
            fa_q8_requant_block(mb, vb, cm + j, cv + j, rm, rv);
    }
    if (FA_Q8_INTERLEAVE && b > 0) /* the last full block's codes */
        fa_q8_requant_block(buf[(b - 1) & 1][0], buf[(b - 1) & 1][1], cm + j - FA_Q8_BLOCK,
                            cv + j - FA_Q8_BLOCK, rm, rv);
#else
    for (; j + FA_Q8_BLOCK <= n; j += FA_Q8_BLOCK, b++)
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

#undef FA_V_PS
#undef FA_V_EPI32
#undef FA_V_EPU32
#undef FA_V_AND
#undef FA_V_XOR
#undef FA_V_AS_PS
#undef FA_V_AS_SI
