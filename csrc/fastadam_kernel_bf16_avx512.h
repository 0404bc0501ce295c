/*
 * fastadam_kernel_bf16_avx512.h - the bfloat16-moment loop of
 * fastadam_kernel_bf16.h written with AVX-512 intrinsics, included by it in
 * the avx512 variant only (the translation unit is compiled with -mavx512bw).
 *
 * Why by hand: with 512-bit vectors only two ports execute vector ALU
 * operations, and this loop is bound by them, not by the divider: GCC's
 * vectorization of the portable loop spent ~50 operations per 16 elements
 * and took ~0.49 ns per element per core with the data in L2, enough to keep
 * the step well above its 20-byte memory floor. The same arithmetic here takes
 * fewer operations, mostly by working on the bfloat16 in the *high* half of
 * each 32-bit lane, where it already sits:
 *   - widening a moment is one word permute (no zero-extend plus shift);
 *   - rounding is u + add, and NaN lanes are fixed with one masked OR of the
 *     quiet bit (a float unordered compare finds them) -- no shifts;
 *   - the rounded float is (u + add) & 0xFFFF0000, and storing picks the odd
 *     words with one permute;
 *   - mix32's first xor-shift becomes one XOR with a per-block constant (see
 *     offsets below; 6% faster with the data in L2, 3% at 2^24), and its
 *     last folds into three-input logic (r >> 16 == x >> 16 where
 *     r = x ^ (x >> 16), so one shift serves both halves).
 * The moments are loaded and stored as 32-byte vectors (16 words). One
 * 64-byte vector per 32 lanes takes fewer instructions but was slower, side
 * by side in one process: 0.37-0.39 vs 0.34-0.37 ns per element at 2^26 on
 * two threads, 1-5% at 2^24 and with the data in L2. Not because of accesses
 * straddling cache lines: page-aligned arrays gained as much as NumPy's
 * (which start 16 bytes past a page boundary).
 * Every float operation is the portable loop's, in the same order and
 * rounding (no FMA), so the results are bit-identical to it and to NumPy.
 */
#include <immintrin.h>

/* vpternlogd truth-table immediate over (a, b, c) = (0xF0, 0xCC, 0xAA). */
#define FA_TERN_XOR_AND 0x28    /* (a ^ b) & c */

/* The 16 bfloat16 at p -> 16 float32: each word lands in the high half of a
 * lane whose low half is zero (index: see widen_index below). */
static inline __m512 fa_load_widen16(const uint16_t *p, __m512i index)
{
    const __m512i w = _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)p));
    return _mm512_castsi512_ps(_mm512_permutex2var_epi16(_mm512_setzero_si512(), index, w));
}

/* The high halves of the 16 lanes of x (see fa_round_hi16) stored as 16
 * bfloat16 at p (index: see odd_words below). */
static inline void fa_store_hi16(uint16_t *p, __m512i x, __m512i index)
{
    _mm256_storeu_si256((__m256i *)p, _mm512_castsi512_si256(_mm512_permutexvar_epi16(index, x)));
}

/* The rounding of fa_round_bf16, kept in the high half: the top 16 bits of
 * the result are the bfloat16 (low 16 bits are garbage). */
static inline __m512i fa_round_hi16(__m512 x, __m512i add)
{
    const __m512i u = _mm512_castps_si512(x);
    const __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
    return _mm512_mask_or_epi32(_mm512_add_epi32(u, add), nan, u,
                                _mm512_set1_epi32(0x00400000));
}

static inline __m512i fa_nearest_add(__m512 x)
{
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(_mm512_castps_si512(x), 16),
                                         _mm512_set1_epi32(1));
    return _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF));
}

static inline __attribute__((always_inline)) void fa_adam_bf16_body_avx512(
    float *restrict param, float *restrict grad, uint16_t *restrict exp_avg,
    uint16_t *restrict exp_avg_sq, uint16_t *restrict max_exp_avg_sq, int64_t n, uint32_t lo0,
    uint32_t hkey, const fa_scalars_f32 *s, const int l2, const int ams, const int unscale,
    const int maximize, const int stochastic, const int divide, const int decoupled)
{
    const int64_t ahead = fa_bf16_prefetch_elements; /* read once */
    const __m512 step_size = _mm512_set1_ps(s->step_size);
    const __m512 bc2_sqrt = _mm512_set1_ps(s->bias_correction2_sqrt);
    const __m512 eps = _mm512_set1_ps(s->eps);
    const __m512 one_minus_beta1 = _mm512_set1_ps(s->one_minus_beta1);
    const __m512 beta2 = _mm512_set1_ps(s->beta2);
    const __m512 one_minus_beta2 = _mm512_set1_ps(s->one_minus_beta2);
    const __m512 weight_decay = _mm512_set1_ps(s->weight_decay);
    const __m512 decay = _mm512_set1_ps(s->decay);
    const __m512 grad_scale = _mm512_set1_ps(s->grad_scale);
    const __m512i sign = _mm512_set1_epi32((int)0x80000000u);
    const __m512i high_half = _mm512_set1_epi32((int)0xFFFF0000u);
    const __m512i low_half = _mm512_set1_epi32(0xFFFF);
    const __m512i mul1 = _mm512_set1_epi32(0x7FEB352D);
    const __m512i mul2 = _mm512_set1_epi32((int)0x846CA68Bu);

    /* word permutes: widen_index puts words 0-15 of its second operand in the
     * odd (high) words of the lanes, zeros in the even ones; odd_words
     * gathers the odd words of the 16 lanes into the low 32 bytes */
    __m512i widen_index, odd_words;
    {
        uint16_t w[32], odd[32];
        for (int k = 0; k < 32; k++) {
            w[k] = (k & 1) ? (uint16_t)(32 + k / 2) : 0;
            odd[k] = (uint16_t)((2 * k + 1) & 31);
        }
        widen_index = _mm512_loadu_si512(w);
        odd_words = _mm512_loadu_si512(odd);
    }

    /* The lanes' offsets in a block. mix32 starts with x ^= x >> 16 on
     * x = lo ^ hkey; with the block's first lo a multiple of 32, lo is that
     * first lo XOR the offset, and lo >> 16 is the same for the whole block,
     * so x ^ (x >> 16) is offset ^ (one value per block). */
    const __m512i offsets[2] = {
        _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
        _mm512_setr_epi32(16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31)};
    const uint32_t hkey_mixed = hkey ^ (hkey >> 16);

    /* each block is two vectors of 16 lanes; the portable loop first runs up
     * to the first lo that is a multiple of 32 */
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
        const __m512i block_mixed = _mm512_set1_epi32((int)(first ^ (first >> 16) ^ hkey_mixed));
        __m512i m_hi[2], v_hi[2], vmax_hi[2];
        for (int h = 0; h < 2; h++) {
            const int64_t j = i + 16 * h;
            __m512 g = _mm512_loadu_ps(grad + j);
            if (unscale) {
                g = _mm512_div_ps(g, grad_scale);
                _mm512_storeu_ps(grad + j, g);
            }
            if (maximize)
                g = _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(g), sign));
            __m512 p = _mm512_loadu_ps(param + j);
            if (l2)
                g = _mm512_add_ps(g, _mm512_mul_ps(weight_decay, p));
            if (decoupled)
                p = _mm512_mul_ps(p, decay);

            const __m512 m_old = fa_load_widen16(exp_avg + j, widen_index);
            const __m512 v_old = fa_load_widen16(exp_avg_sq + j, widen_index);
            const __m512 mf = _mm512_add_ps(
                m_old, _mm512_mul_ps(_mm512_sub_ps(g, m_old), one_minus_beta1));
            const __m512 vf = _mm512_add_ps(_mm512_mul_ps(v_old, beta2),
                                            _mm512_mul_ps(_mm512_mul_ps(one_minus_beta2, g), g));

            __m512i add_m, add_v;
            if (stochastic) {
                __m512i x = _mm512_xor_si512(offsets[h], block_mixed);
                x = _mm512_mullo_epi32(x, mul1);
                x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 15));
                x = _mm512_mullo_epi32(x, mul2);
                add_v = _mm512_srli_epi32(x, 16);
                add_m = _mm512_ternarylogic_epi32(x, add_v, low_half, FA_TERN_XOR_AND);
            } else {
                add_m = fa_nearest_add(mf);
                add_v = fa_nearest_add(vf);
            }
            m_hi[h] = fa_round_hi16(mf, add_m);
            v_hi[h] = fa_round_hi16(vf, add_v);
            const __m512 m = _mm512_castsi512_ps(_mm512_and_si512(m_hi[h], high_half));
            __m512 second = _mm512_castsi512_ps(_mm512_and_si512(v_hi[h], high_half));

            if (ams) {
                /* np.maximum: old where old > v or old is NaN, else v */
                const __m512 old = fa_load_widen16(max_exp_avg_sq + j, widen_index);
                const __mmask16 take_old = _mm512_cmp_ps_mask(old, second, _CMP_GT_OQ) |
                                           _mm512_cmp_ps_mask(old, old, _CMP_UNORD_Q);
                second = _mm512_mask_blend_ps(take_old, second, old);
                vmax_hi[h] = _mm512_castps_si512(second);
            }
            const __m512 root = _mm512_sqrt_ps(second);
            const __m512 denom = _mm512_add_ps(divide ? _mm512_div_ps(root, bc2_sqrt) : root, eps);
            _mm512_storeu_ps(param + j,
                             _mm512_sub_ps(p, _mm512_div_ps(_mm512_mul_ps(step_size, m), denom)));
        }
        for (int h = 0; h < 2; h++) {
            fa_store_hi16(exp_avg + i + 16 * h, m_hi[h], odd_words);
            fa_store_hi16(exp_avg_sq + i + 16 * h, v_hi[h], odd_words);
            if (ams)
                fa_store_hi16(max_exp_avg_sq + i + 16 * h, vmax_hi[h], odd_words);
        }
    }
    /* the last n % 32 elements: the portable loop, at the same indices */
    if (i < n)
        fa_adam_bf16_body(param + i, grad + i, exp_avg + i, exp_avg_sq + i,
                          ams ? max_exp_avg_sq + i : NULL, n - i, lo0 + (uint32_t)i, hkey, s,
                          l2, ams, unscale, maximize, stochastic, divide, decoupled);
}

#undef FA_TERN_XOR_AND
