/* Selective scan (Mamba-1 recurrence) on CPU, fp32, compiled at first use by gesture/models/scan_kernel.py.
 *
 *   h_t = exp(dt_t * A) * h_{t-1} + dt_t * u_t * B_t      (per channel d, state k)
 *   y_t = sum_k C_t[k] h_t[k]
 *
 * Layouts (all contiguous): u, dt, y, gy, gu, gdt [b, L, d]; B, C [b, L, n]; At [n, d] (A transposed);
 * h0, hlast, gh_last, gh0 [b, n, d]. The work is split into items (batch row, block of DB channels); a call
 * runs items [item0, item1) so the caller can spread them over threads. Reductions over channels (gB, gC) go
 * to per-block partials [nblk, b, L, n], the reduction over the batch (gA) to [b, n, d]; the caller sums them.
 * exp is a branch-free Cephes-style polynomial (relative error ~1e-7) so the compiler can vectorise it.
 */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define DB 32 /* channels per work item: 4 AVX2 vectors */

static inline void vexp(float *restrict out, const float *restrict in, int m) {
#pragma omp simd
    for (int j = 0; j < m; ++j) {
        float x = in[j];
        x = x < -87.0f ? -87.0f : x;
        x = x > 88.0f ? 88.0f : x;
        float t = x * 1.44269504088896341f + 12582912.0f; /* round to nearest: 1.5 * 2^23 */
        float fn = t - 12582912.0f;
        int32_t ti, ni;
        memcpy(&ti, &t, 4);
        ni = ti - 0x4B400000; /* bits of 12582912.0f */
        float r = x - fn * 0.693359375f + fn * 2.12194440e-4f;
        float p = 1.9875691500e-4f;
        p = p * r + 1.3981999507e-3f;
        p = p * r + 8.3334519073e-3f;
        p = p * r + 4.1665795894e-2f;
        p = p * r + 1.6666665459e-1f;
        p = p * r + 5.0000001201e-1f;
        float e = p * r * r + r + 1.0f;
        int32_t si = (ni + 127) << 23;
        float scale;
        memcpy(&scale, &si, 4);
        out[j] = e * scale;
    }
}

int scan_block_size(void) { return DB; }

/* Loads channels [d0, d0 + w) of a row into a block, zero beyond w: every inner loop then runs exactly DB lanes
 * (a constant trip count the compiler unrolls into whole vectors); padded lanes have dt = u = A = 0 and stay 0. */
static inline void load_row(float *restrict dst, const float *restrict src, int w) {
    for (int j = 0; j < DB; ++j) dst[j] = j < w ? src[j] : 0.0f;
}

void scan_fwd(const float *u, const float *dt, const float *At, const float *B, const float *C, const float *h0,
              float *y, float *hlast, int b, int L, int d, int n, int item0, int item1) {
    (void)b;
    int nblk = (d + DB - 1) / DB;
    float *h = (float *)malloc(sizeof(float) * (size_t)n * DB);
    float *Al = (float *)malloc(sizeof(float) * (size_t)n * DB);
    float arg[DB], a[DB], acc[DB], du[DB], dtl[DB], ul[DB];
    for (int item = item0; item < item1; ++item) {
        int bi = item / nblk, d0 = (item % nblk) * DB, w = d - d0 < DB ? d - d0 : DB;
        for (int k = 0; k < n; ++k) {
            load_row(Al + k * DB, At + (size_t)k * d + d0, w);
            if (h0)
                load_row(h + k * DB, h0 + ((size_t)bi * n + k) * d + d0, w);
            else
                memset(h + k * DB, 0, sizeof(float) * DB);
        }
        for (int t = 0; t < L; ++t) {
            size_t row = (size_t)bi * L + t;
            const float *Bp = B + row * n, *Cp = C + row * n;
            load_row(dtl, dt + row * d + d0, w);
            load_row(ul, u + row * d + d0, w);
            for (int j = 0; j < DB; ++j) {
                acc[j] = 0.0f;
                du[j] = dtl[j] * ul[j];
            }
            for (int k = 0; k < n; ++k) {
                const float *Ak = Al + k * DB;
                for (int j = 0; j < DB; ++j) arg[j] = dtl[j] * Ak[j];
                vexp(a, arg, DB);
                float bk = Bp[k], ck = Cp[k];
                float *hk = h + k * DB;
                for (int j = 0; j < DB; ++j) {
                    float hv = a[j] * hk[j] + du[j] * bk;
                    hk[j] = hv;
                    acc[j] += hv * ck;
                }
            }
            memcpy(y + row * d + d0, acc, sizeof(float) * w);
        }
        for (int k = 0; k < n; ++k) memcpy(hlast + ((size_t)bi * n + k) * d + d0, h + k * DB, sizeof(float) * w);
    }
    free(h);
    free(Al);
}

void scan_bwd(const float *u, const float *dt, const float *At, const float *B, const float *C, const float *h0,
              const float *gy, const float *gh_last, float *gu, float *gdt, float *gB_part, float *gC_part,
              float *gA_part, float *gh0, int b, int L, int d, int n, int item0, int item1) {
    int nblk = (d + DB - 1) / DB;
    size_t per_t = (size_t)n * DB;
    float *H = (float *)malloc(sizeof(float) * (size_t)(L + 1) * per_t); /* H[0] = h0, H[t + 1] = h_t */
    float *Dec = (float *)malloc(sizeof(float) * (size_t)L * per_t);    /* exp(dt_t A) */
    float *carry = (float *)malloc(sizeof(float) * per_t);               /* a_{t+1} dL/dh_{t+1}: into h_t */
    float *gAacc = (float *)malloc(sizeof(float) * per_t);
    float *Al = (float *)malloc(sizeof(float) * per_t);
    float arg[DB], du[DB], gsum[DB], gd[DB], g[DB], dtl[DB], ul[DB], gyl[DB], out[DB];
    for (int item = item0; item < item1; ++item) {
        int bi = item / nblk, blk = item % nblk, d0 = blk * DB, w = d - d0 < DB ? d - d0 : DB;
        for (int k = 0; k < n; ++k) {
            size_t s = ((size_t)bi * n + k) * d + d0;
            load_row(Al + k * DB, At + (size_t)k * d + d0, w);
            if (h0)
                load_row(H + k * DB, h0 + s, w);
            else
                memset(H + k * DB, 0, sizeof(float) * DB);
            if (gh_last)
                load_row(carry + k * DB, gh_last + s, w);
            else
                memset(carry + k * DB, 0, sizeof(float) * DB);
            memset(gAacc + k * DB, 0, sizeof(float) * DB);
        }
        for (int t = 0; t < L; ++t) { /* recompute the states */
            size_t row = (size_t)bi * L + t;
            const float *Bp = B + row * n;
            load_row(dtl, dt + row * d + d0, w);
            load_row(ul, u + row * d + d0, w);
            for (int j = 0; j < DB; ++j) du[j] = dtl[j] * ul[j];
            for (int k = 0; k < n; ++k) {
                const float *Ak = Al + k * DB;
                float *dec = Dec + (size_t)t * per_t + k * DB;
                const float *hp = H + (size_t)t * per_t + k * DB;
                float *hn = H + (size_t)(t + 1) * per_t + k * DB;
                for (int j = 0; j < DB; ++j) arg[j] = dtl[j] * Ak[j];
                vexp(dec, arg, DB);
                float bk = Bp[k];
                for (int j = 0; j < DB; ++j) hn[j] = dec[j] * hp[j] + du[j] * bk;
            }
        }
        for (int t = L - 1; t >= 0; --t) {
            size_t row = (size_t)bi * L + t;
            const float *Bp = B + row * n, *Cp = C + row * n;
            float *gBp = gB_part + ((size_t)blk * b * L + row) * n, *gCp = gC_part + ((size_t)blk * b * L + row) * n;
            load_row(dtl, dt + row * d + d0, w);
            load_row(ul, u + row * d + d0, w);
            load_row(gyl, gy + row * d + d0, w);
            for (int j = 0; j < DB; ++j) {
                du[j] = dtl[j] * ul[j];
                gsum[j] = 0.0f; /* sum_k G B */
                gd[j] = 0.0f;   /* sum_k G a h_{t-1} A */
            }
            for (int k = 0; k < n; ++k) {
                const float *Ak = Al + k * DB;
                const float *dec = Dec + (size_t)t * per_t + k * DB;
                const float *hp = H + (size_t)t * per_t + k * DB, *hc = H + (size_t)(t + 1) * per_t + k * DB;
                float *ck = carry + k * DB, *gak = gAacc + k * DB;
                float bk = Bp[k], cv = Cp[k], sc = 0.0f, sb = 0.0f;
#pragma omp simd reduction(+ : sc, sb)
                for (int j = 0; j < DB; ++j) {
                    g[j] = ck[j] + cv * gyl[j]; /* G_t = dL/dh_t */
                    sc += gyl[j] * hc[j];
                    sb += g[j] * du[j];
                    gsum[j] += g[j] * bk;
                    float p = g[j] * dec[j] * hp[j];
                    gd[j] += p * Ak[j];
                    gak[j] += p * dtl[j];
                    ck[j] = dec[j] * g[j];
                }
                gCp[k] = sc;
                gBp[k] = sb;
            }
            for (int j = 0; j < DB; ++j) out[j] = gsum[j] * dtl[j];
            memcpy(gu + row * d + d0, out, sizeof(float) * w);
            for (int j = 0; j < DB; ++j) out[j] = gsum[j] * ul[j] + gd[j];
            memcpy(gdt + row * d + d0, out, sizeof(float) * w);
        }
        for (int k = 0; k < n; ++k) {
            size_t s = ((size_t)bi * n + k) * d + d0;
            memcpy(gA_part + s, gAacc + k * DB, sizeof(float) * w);
            if (gh0) memcpy(gh0 + s, carry + k * DB, sizeof(float) * w);
        }
    }
    free(H);
    free(Dec);
    free(carry);
    free(gAacc);
    free(Al);
}
