/*
 * fastadam_kernel_bf16_avx2.h - the bfloat16-moment loop of
 * fastadam_kernel_bf16.h written with AVX2 intrinsics, included by it in the
 * avx2 variant only (the translation unit is compiled with -mavx2, no -mfma).
 *
 * Why by hand: GCC's vectorization of the portable loop spent ~100
 * instructions per 16 elements (and spilled constants to the stack), enough
 * to keep the bf16 step at the float32 step's time although it moves 20 bytes
 * per element instead of 28. It follows fastadam_kernel_bf16_avx512.h, with
 * what AVX2 lacks (mask registers, word permutes, ternary logic) emulated
 * where it is cheapest:
 *   - the bfloat16 sits in the *high* half of each 32-bit lane, as there:
 *     widening 8 moments is one 16-byte broadcast load (a pure load on Intel)
 *     and one byte shuffle that puts word k in the high half of lane k and
 *     zeroes the low half (no zero-extend plus shift);
 *   - rounding is u + add, the rounded float (u + add) & 0xFFFF0000;
 *   - NaN lanes: AVX-512 fixes them with one masked OR; here that would take a
 *     compare, an OR and a blend (two uops on Intel) per array, ~8 uops per 8
 *     elements. One unordered compare of m against v finds a NaN in either,
 *     and only vectors that have one (a diverged run's) take the blend: a
 *     branch on the compare's mask, 2 vector uops per 8 elements;
 *   - storing: two vectors' high halves shifted down, packed to words with
 *     unsigned saturation (exact: they are below 2^16) and the pack's
 *     in-lane order fixed with one qword permute -- 4 uops per 16 elements;
 *   - mix32's first xor-shift is one XOR with a per-block constant and its
 *     last is folded (r >> 16 == x >> 16), exactly as in the AVX-512 loop.
 * The vectors are loaded and stored unaligned (NumPy's arrays start 16 bytes
 * past a page boundary; the moments are only 2-byte aligned anyway).
 * Every float operation is the portable loop's, in the same order and
 * rounding (no FMA), so the results are bit-identical to it and to NumPy.
 */
#include <immintrin.h>

/* The 8 bfloat16 at p -> 8 float32: the 16 bytes broadcast to both 128-bit
 * lanes, then each lane picks its 4 words into the high halves (mask: see
 * widen_mask below; its 0x80 bytes zero the low halves). */
static inline __m256 fa_load_widen8(const uint16_t *p, __m256i mask)
{
    const __m256i w = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)p));
    return _mm256_castsi256_ps(_mm256_shuffle_epi8(w, mask));
}

/* The high halves of the 16 lanes of a (elements 0-7) and b (8-15) stored as
 * 16 bfloat16 at p. packus interleaves the two in 64-bit pieces per 128-bit
 * lane (a0-3 b0-3 | a4-7 b4-7); the permute puts them in order. */
static inline void fa_store_hi16x2(uint16_t *p, __m256i a, __m256i b)
{
    const __m256i packed = _mm256_packus_epi32(_mm256_srli_epi32(a, 16), _mm256_srli_epi32(b, 16));
    _mm256_storeu_si256((__m256i *)p, _mm256_permute4x64_epi64(packed, 0xD8));
}

static inline __m256i fa_nearest_add8(__m256 x)
{
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(_mm256_castps_si256(x), 16),
                                         _mm256_set1_epi32(1));
    return _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF));
}

/*
 * The rounding of fa_round_bf16 for the m and v of 8 elements, kept in the
 * high half: the top 16 bits of *m_hi, *v_hi are the bfloat16 (low 16 bits
 * are garbage). The NaN lanes get u | quiet bit instead of u + add (which
 * could carry into the sign or turn the NaN into Inf), as in fa_round_bf16.
 */
static inline __attribute__((always_inline)) void fa_round_hi8x2(__m256 mf, __m256 vf,
                                                                 __m256i add_m, __m256i add_v,
                                                                 __m256i *m_hi, __m256i *v_hi)
{
    const __m256i um = _mm256_castps_si256(mf), uv = _mm256_castps_si256(vf);
    __m256i rm = _mm256_add_epi32(um, add_m), rv = _mm256_add_epi32(uv, add_v);
    if (__builtin_expect(_mm256_movemask_ps(_mm256_cmp_ps(mf, vf, _CMP_UNORD_Q)) != 0, 0)) {
        const __m256i quiet = _mm256_set1_epi32(0x00400000);
        rm = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(rm),
                                                  _mm256_castsi256_ps(_mm256_or_si256(um, quiet)),
                                                  _mm256_cmp_ps(mf, mf, _CMP_UNORD_Q)));
        rv = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(rv),
                                                  _mm256_castsi256_ps(_mm256_or_si256(uv, quiet)),
                                                  _mm256_cmp_ps(vf, vf, _CMP_UNORD_Q)));
    }
    *m_hi = rm;
    *v_hi = rv;
}

static inline __attribute__((always_inline)) void fa_adam_bf16_body_avx2(
    float *restrict param, float *restrict grad, uint16_t *restrict exp_avg,
    uint16_t *restrict exp_avg_sq, uint16_t *restrict max_exp_avg_sq, int64_t n, uint32_t lo0,
    uint32_t hkey, const fa_scalars_f32 *s, const int l2, const int ams, const int unscale,
    const int maximize, const int stochastic, const int divide, const int decoupled)
{
    const int64_t ahead = fa_bf16_prefetch_elements; /* read once */
    const __m256 step_size = _mm256_set1_ps(s->step_size);
    const __m256 bc2_sqrt = _mm256_set1_ps(s->bias_correction2_sqrt);
    const __m256 eps = _mm256_set1_ps(s->eps);
    const __m256 one_minus_beta1 = _mm256_set1_ps(s->one_minus_beta1);
    const __m256 beta2 = _mm256_set1_ps(s->beta2);
    const __m256 one_minus_beta2 = _mm256_set1_ps(s->one_minus_beta2);
    const __m256 weight_decay = _mm256_set1_ps(s->weight_decay);
    const __m256 decay = _mm256_set1_ps(s->decay);
    const __m256 grad_scale = _mm256_set1_ps(s->grad_scale);
    const __m256i sign = _mm256_set1_epi32((int)0x80000000u);
    const __m256i high_half = _mm256_set1_epi32((int)0xFFFF0000u);
    const __m256i low_half = _mm256_set1_epi32(0xFFFF);
    const __m256i mul1 = _mm256_set1_epi32(0x7FEB352D);
    const __m256i mul2 = _mm256_set1_epi32((int)0x846CA68Bu);

    /* byte shuffle of fa_load_widen8: lane 0 takes words 0-3 of the 16 bytes
     * (bytes 0-7), lane 1 words 4-7 (bytes 8-15), each word into bytes 2-3 of
     * its 32-bit lane; -128 (0x80) zeroes bytes 0-1 */
    const __m256i widen_mask = _mm256_setr_epi8(
        -128, -128, 0, 1, -128, -128, 2, 3, -128, -128, 4, 5, -128, -128, 6, 7,
        -128, -128, 8, 9, -128, -128, 10, 11, -128, -128, 12, 13, -128, -128, 14, 15);

    /* The lanes' offsets in a block (see fa_adam_bf16_body_avx512): with the
     * block's first lo a multiple of 32, x ^ (x >> 16) for x = lo ^ hkey is
     * offset ^ (one value per block). */
    const __m256i offsets[4] = {
        _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
        _mm256_setr_epi32(8, 9, 10, 11, 12, 13, 14, 15),
        _mm256_setr_epi32(16, 17, 18, 19, 20, 21, 22, 23),
        _mm256_setr_epi32(24, 25, 26, 27, 28, 29, 30, 31)};
    const uint32_t hkey_mixed = hkey ^ (hkey >> 16);

    /* each block is four vectors of 8 lanes, stored in pairs; the portable
     * loop first runs up to the first lo that is a multiple of 32 */
    _Static_assert(FA_BF16_BLOCK == 32, "the loop below handles 32 elements at a time");
    int64_t i = (int64_t)((0u - lo0) & 31u);
    if (i > n)
        i = n;
    if (i > 0)
        fa_adam_bf16_body(param, grad, exp_avg, exp_avg_sq, ams ? max_exp_avg_sq : NULL, i, lo0,
                          hkey, s, l2, ams, unscale, maximize, stochastic, divide, decoupled);
    for (; i + FA_BF16_BLOCK <= n; i += FA_BF16_BLOCK) {
        fa_prefetch_bf16_block(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, i, n, ams,
                               ahead);
        const uint32_t first = lo0 + (uint32_t)i;
        const __m256i block_mixed = _mm256_set1_epi32((int)(first ^ (first >> 16) ^ hkey_mixed));
        for (int pair = 0; pair < 2; pair++) {
            __m256i m_hi[2], v_hi[2], vmax_hi[2];
            for (int h = 0; h < 2; h++) {
                const int k = 2 * pair + h;
                const int64_t j = i + 8 * k;
                __m256 g = _mm256_loadu_ps(grad + j);
                if (unscale) {
                    g = _mm256_div_ps(g, grad_scale);
                    _mm256_storeu_ps(grad + j, g);
                }
                if (maximize)
                    g = _mm256_castsi256_ps(_mm256_xor_si256(_mm256_castps_si256(g), sign));
                __m256 p = _mm256_loadu_ps(param + j);
                if (l2)
                    g = _mm256_add_ps(g, _mm256_mul_ps(weight_decay, p));
                if (decoupled)
                    p = _mm256_mul_ps(p, decay);

                const __m256 m_old = fa_load_widen8(exp_avg + j, widen_mask);
                const __m256 v_old = fa_load_widen8(exp_avg_sq + j, widen_mask);
                const __m256 mf = _mm256_add_ps(
                    m_old, _mm256_mul_ps(_mm256_sub_ps(g, m_old), one_minus_beta1));
                const __m256 vf = _mm256_add_ps(
                    _mm256_mul_ps(v_old, beta2),
                    _mm256_mul_ps(_mm256_mul_ps(one_minus_beta2, g), g));

                __m256i add_m, add_v;
                if (stochastic) {
                    __m256i x = _mm256_xor_si256(offsets[k], block_mixed);
                    x = _mm256_mullo_epi32(x, mul1);
                    x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 15));
                    x = _mm256_mullo_epi32(x, mul2);
                    add_v = _mm256_srli_epi32(x, 16);
                    add_m = _mm256_and_si256(_mm256_xor_si256(x, add_v), low_half);
                } else {
                    add_m = fa_nearest_add8(mf);
                    add_v = fa_nearest_add8(vf);
                }
                fa_round_hi8x2(mf, vf, add_m, add_v, &m_hi[h], &v_hi[h]);
                const __m256 m = _mm256_castsi256_ps(_mm256_and_si256(m_hi[h], high_half));
                __m256 second = _mm256_castsi256_ps(_mm256_and_si256(v_hi[h], high_half));

                if (ams) {
                    /* np.maximum: old where old > v or old is NaN, else v.
                     * max_ps(a, b) is a > b ? a : b, which leaves only a NaN
                     * old to blend in. */
                    const __m256 old = fa_load_widen8(max_exp_avg_sq + j, widen_mask);
                    second = _mm256_blendv_ps(_mm256_max_ps(old, second), old,
                                              _mm256_cmp_ps(old, old, _CMP_UNORD_Q));
                    vmax_hi[h] = _mm256_castps_si256(second);
                }
                const __m256 root = _mm256_sqrt_ps(second);
                const __m256 denom =
                    _mm256_add_ps(divide ? _mm256_div_ps(root, bc2_sqrt) : root, eps);
                _mm256_storeu_ps(param + j, _mm256_sub_ps(p, _mm256_div_ps(
                                                                 _mm256_mul_ps(step_size, m), denom)));
            }
            const int64_t j = i + 16 * pair;
            fa_store_hi16x2(exp_avg + j, m_hi[0], m_hi[1]);
            fa_store_hi16x2(exp_avg_sq + j, v_hi[0], v_hi[1]);
            if (ams)
                fa_store_hi16x2(max_exp_avg_sq + j, vmax_hi[0], vmax_hi[1]);
        }
    }
    /* the last n % 32 elements: the portable loop, at the same indices */
    if (i < n)
        fa_adam_bf16_body(param + i, grad + i, exp_avg + i, exp_avg_sq + i,
                          ams ? max_exp_avg_sq + i : NULL, n - i, lo0 + (uint32_t)i, hkey, s,
                          l2, ams, unscale, maximize, stochastic, divide, decoupled);
}
