/*
 * fastadam_q8.h - the multi-tensor driver of the 8-bit block-wise state step
 * (issue 18). Included at the end of fastadam.c (it uses the dispatcher's
 * kernel table, thread count and scalar rounding); the ABI is declared in
 * fastadam.h.
 *
 * The work is split by whole blocks (FA_Q8_BLOCK elements) over the
 * concatenation of every tensor's blocks: a block is never shared by two
 * threads, and every block is computed the same way whoever computes it, so
 * the result is bit-identical for any thread count.
 */

static inline int64_t fa_q8_nblocks(int64_t n)
{
    return n / FA_Q8_BLOCK + (n % FA_Q8_BLOCK != 0);
}

/* Blocks [b0, b1) of tensor t on the calling thread. */
static void fa_q8_piece(int64_t t, int64_t b0, int64_t b1, float *const *param,
                        float *const *grad, uint8_t *const *exp_avg,
                        uint8_t *const *exp_avg_sq, float *const *am, float *const *av,
                        const int64_t *n, const fa_adam_scalars *scalars,
                        const int32_t *scalar_index)
{
    const fa_adam_scalars *const sc = &scalars[scalar_index != NULL ? scalar_index[t] : 0];
    const fa_scalars_f32 s = FA_ROUND_SCALARS(float, sc);
    /* the amsgrad bit (refused) selects the division by bias_correction2_sqrt */
    const int flags = (fa_flags(sc) & ~FA_F_AMSGRAD) |
                      (s.bias_correction2_sqrt != 1.0f ? FA_F_AMSGRAD : 0);
    const int64_t lo = b0 * FA_Q8_BLOCK;
    const int64_t hi = b1 * FA_Q8_BLOCK < n[t] ? b1 * FA_Q8_BLOCK : n[t];
    if (hi > lo)
        g_table->q8[flags](param[t] + lo, grad[t] + lo, exp_avg[t] + lo, exp_avg_sq[t] + lo,
                           am[t] + b0, av[t] + b0, hi - lo, &s);
}

int fa_adam_multi_f32_q8(int64_t count, float *const *param, float *const *grad,
                         uint8_t *const *exp_avg, uint8_t *const *exp_avg_sq,
                         float *const *exp_avg_absmax, float *const *exp_avg_sq_absmax,
                         const int64_t *n, const fa_adam_scalars *scalars, int64_t n_scalars,
                         const int32_t *scalar_index)
{
    if (count < 0)
        return FA_ERR_SIZE;
    if (count == 0)
        return FA_OK;
    if (param == NULL || grad == NULL || exp_avg == NULL || exp_avg_sq == NULL ||
        exp_avg_absmax == NULL || exp_avg_sq_absmax == NULL || n == NULL || scalars == NULL)
        return FA_ERR_NULL;
    if (scalar_index == NULL && n_scalars < 1)
        return FA_ERR_INDEX;
    int64_t total = 0; /* blocks */
    for (int64_t t = 0; t < count; t++) {
        if (scalar_index != NULL && (scalar_index[t] < 0 || scalar_index[t] >= n_scalars))
            return FA_ERR_INDEX;
        const fa_adam_scalars *const sc = &scalars[scalar_index != NULL ? scalar_index[t] : 0];
        if (sc->amsgrad)
            return FA_ERR_UNSUPPORTED;
        if (sc->state_rounding != FA_STATE_SAME_DTYPE)
            return FA_ERR_ROUNDING;
        if (n[t] < 0 || n[t] > INT64_MAX / 8)
            return FA_ERR_SIZE;
        if (n[t] > 0 &&
            (param[t] == NULL || grad[t] == NULL || exp_avg[t] == NULL ||
             exp_avg_sq[t] == NULL || exp_avg_absmax[t] == NULL || exp_avg_sq_absmax[t] == NULL))
            return FA_ERR_NULL;
        total += fa_q8_nblocks(n[t]);
    }
    if (total == 0)
        return FA_OK;
    fa_ensure_init();
    const int nt = fa_team_size(total * FA_Q8_BLOCK, FA_PARALLEL_MIN_ELEMENTS,
                                FA_MIN_ELEMENTS_PER_THREAD);
    if (nt <= 1) {
        for (int64_t t = 0; t < count; t++)
            fa_q8_piece(t, 0, fa_q8_nblocks(n[t]), param, grad, exp_avg, exp_avg_sq,
                        exp_avg_absmax, exp_avg_sq_absmax, n, scalars, scalar_index);
        return FA_OK;
    }
#if defined(_OPENMP)
#  pragma omp parallel num_threads(nt)
    {
        const int parts = omp_get_num_threads(), k = omp_get_thread_num();
        const int64_t lo = k == 0 ? 0 : fa_even_point(total, k, parts);
        const int64_t hi = k + 1 >= parts ? total : fa_even_point(total, k + 1, parts);
        int64_t start = 0; /* first block of tensor t in the concatenation */
        for (int64_t t = 0; t < count && start < hi; t++) {
            const int64_t nb = fa_q8_nblocks(n[t]);
            const int64_t a = lo > start ? lo - start : 0;
            const int64_t b = hi - start < nb ? hi - start : nb;
            if (a < b)
                fa_q8_piece(t, a, b, param, grad, exp_avg, exp_avg_sq, exp_avg_absmax,
                            exp_avg_sq_absmax, n, scalars, scalar_index);
            start += nb;
        }
    }
#endif
    return FA_OK;
}

int fa_adam_f32_q8(float *param, float *grad, uint8_t *exp_avg, uint8_t *exp_avg_sq,
                   float *exp_avg_absmax, float *exp_avg_sq_absmax, int64_t n,
                   const fa_adam_scalars *sc)
{
    if (sc == NULL)
        return FA_ERR_NULL;
    const fa_adam_scalars sc_copy = *sc;
    return fa_adam_multi_f32_q8(1, &param, &grad, &exp_avg, &exp_avg_sq, &exp_avg_absmax,
                                &exp_avg_sq_absmax, &n, &sc_copy, 1, NULL);
}
