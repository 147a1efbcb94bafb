// Scratch prototype measured in docs/results.md §44h (not part of the engine): the cache-hot compute of
// avx512-lut's 64-row lookup tile (integer sums + per-block float step, one plane) against a 16-row tile
// with VBMI vpermb over 64-byte tables and vpdpbusd; checks that both give the same floats bit for bit.
// g++ -O3 -std=c++17 -ffp-contract=off vpermb_tile_proto.cpp -o vp && ./vp REPS ROWS
// Standalone: cache-hot compute of the 64-row ymm lookup tile vs a 16-row vpermb + vpdpbusd tile.
// Same integer sums P per (row, block) checked; floats: F = fma(P, d, F) per block, then stored.
#include <immintrin.h>
#include <chrono>
#include <cstdio>
#include <cstdint>
#include <cstring>
#include <random>
#include <vector>
#include <cstdlib>
constexpr int COLS = 4096, NB = COLS / 32, NG4 = COLS / 4;
alignas(64) static uint8_t T[COLS * 8];          // avx2 layout: per pair 64 B
alignas(64) static uint8_t T2[COLS * 8];         // vpermb layout: per block 256 B
static int16_t P16[NG4][16];
__attribute__((target("avx512f,avx512bw,avx512vl,avx2")))
void tile64(const uint8_t *w, const float *d, float *out) {   // 64 rows, all blocks
    const __m256i low4 = _mm256_set1_epi8(0x0f);
    __m512 F[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    for (int b = 0; b < NB; b++) {
        __m256i acc[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256()};
#pragma GCC unroll 8
        for (int c4 = b * 8; c4 < b * 8 + 8; c4++) {
            const uint8_t *tp = T + (c4 / 2) * 64 + (c4 & 1) * 16;
            const __m256i tl = _mm256_broadcastsi128_si256(_mm_load_si128((const __m128i *)tp));
            const __m256i th = _mm256_broadcastsi128_si256(_mm_load_si128((const __m128i *)(tp + 32)));
            const __m256i wv = _mm256_load_si256((const __m256i *)(w + c4 * 32));
            const __m256i il = _mm256_and_si256(wv, low4), ih = _mm256_and_si256(_mm256_srli_epi16(wv, 4), low4);
            const __m256i l0 = _mm256_shuffle_epi8(tl, il), h0 = _mm256_shuffle_epi8(th, il);
            const __m256i l1 = _mm256_shuffle_epi8(tl, ih), h1 = _mm256_shuffle_epi8(th, ih);
            acc[0] = _mm256_add_epi16(acc[0], _mm256_unpacklo_epi8(l0, h0));
            acc[1] = _mm256_add_epi16(acc[1], _mm256_unpackhi_epi8(l0, h0));
            acc[2] = _mm256_add_epi16(acc[2], _mm256_unpacklo_epi8(l1, h1));
            acc[3] = _mm256_add_epi16(acc[3], _mm256_unpackhi_epi8(l1, h1));
        }
        const __m512 dv = _mm512_set1_ps(d[b]);
        for (int z = 0; z < 4; z++) F[z] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi16_epi32(acc[z])), dv, F[z]);
    }
    for (int z = 0; z < 4; z++) _mm512_storeu_ps(out + 16 * z, F[z]);
}
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi,avx512vnni,avx2")))
void tile16(const uint8_t *w, const float *d, float *out) {   // 16 rows, all blocks
    const __m512i m0f = _mm512_set1_epi8(0x0f), ones = _mm512_set1_epi8(1);
    alignas(64) uint8_t kp[64];
    for (int i = 0; i < 64; i++) kp[i] = (uint8_t)((i % 4) * 16);
    const __m512i kpat = _mm512_load_si512(kp);
    __m512 F = _mm512_setzero_ps();
    for (int b = 0; b < NB; b++) {
        const uint8_t *tb = T2 + b * 256;
        const __m512i wv = _mm512_load_si512(w + b * 64);
        const __m512i il = _mm512_ternarylogic_epi32(wv, m0f, kpat, 0xEA);
        const __m512i ih = _mm512_ternarylogic_epi32(_mm512_srli_epi16(wv, 4), m0f, kpat, 0xEA);
        const __m512i lA = _mm512_permutexvar_epi8(il, _mm512_load_si512(tb));
        const __m512i hA = _mm512_permutexvar_epi8(il, _mm512_load_si512(tb + 64));
        const __m512i lB = _mm512_permutexvar_epi8(ih, _mm512_load_si512(tb + 128));
        const __m512i hB = _mm512_permutexvar_epi8(ih, _mm512_load_si512(tb + 192));
        __m512i L = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lA, ones);
        L = _mm512_dpbusd_epi32(L, lB, ones);
        __m512i H = _mm512_dpbusd_epi32(_mm512_setzero_si512(), ones, hA);
        H = _mm512_dpbusd_epi32(H, ones, hB);
        const __m512i P = _mm512_add_epi32(L, _mm512_slli_epi32(H, 8));
        F = _mm512_fmadd_ps(_mm512_cvtepi32_ps(P), _mm512_set1_ps(d[b]), F);
    }
    _mm512_storeu_ps(out, F);
}
int main(int argc, char **argv) {
    const int ROWS = argc > 2 ? atoi(argv[2]) : 4096, reps = argc > 1 ? atoi(argv[1]) : 200;
    std::mt19937 rng(1);
    std::vector<int8_t> q(COLS);
    for (auto &v : q) v = (int8_t)((int)(rng() % 255) - 127);
    for (int g = 0; g < NG4; g++) {
        int16_t P[16]; P[0] = 0;
        for (int k = 0; k < 4; k++) for (int m = 0; m < (1 << k); m++) P[(1 << k) + m] = P[m] + q[g * 4 + k];
        memcpy(P16[g], P, 32);
        uint8_t *lo = T + (g / 2) * 64 + (g & 1) * 16;
        for (int m = 0; m < 16; m++) { lo[m] = P[m] & 0xff; lo[32 + m] = (uint16_t)P[m] >> 8; }
        // vpermb layout: block b = g/8, k = g%8: A (k<4): lo at b*256 + k*16, hi at +64; B: +128, +192
        const int b = g / 8, k = g % 8;
        uint8_t *l2 = T2 + b * 256 + (k < 4 ? 0 : 128) + (k % 4) * 16;
        for (int m = 0; m < 16; m++) { l2[m] = P[m] & 0xff; l2[64 + m] = (uint16_t)P[m] >> 8; }
    }
    std::vector<float> d(NB);
    for (auto &v : d) v = 0.001f * (1 + rng() % 100);
    // random nibbles per (row, group): nib[r][g]
    std::vector<uint8_t> nib((size_t)ROWS * NG4);
    for (auto &v : nib) v = rng() & 15;
    // 64-row layout
    std::vector<uint8_t, std::allocator<uint8_t>> w64v((size_t)ROWS / 64 * NG4 * 32 + 64);
    uint8_t *w64 = (uint8_t *)(((uintptr_t)w64v.data() + 63) & ~63ull);
    memset(w64, 0, (size_t)ROWS / 64 * NG4 * 32);
    for (int r = 0; r < ROWS; r++) {
        const int rt = r / 64, j = r % 64, z = j / 16, L = (j % 16) / 8, m = j % 8;
        const int byte = L * 16 + (z & 1) * 8 + m, sh = (z / 2) * 4;
        for (int g = 0; g < NG4; g++) w64[((size_t)rt * NG4 + g) * 32 + byte] |= nib[(size_t)r * NG4 + g] << sh;
    }
    std::vector<uint8_t> w16v((size_t)ROWS / 16 * NB * 64 + 64);
    uint8_t *w16 = (uint8_t *)(((uintptr_t)w16v.data() + 63) & ~63ull);
    memset(w16, 0, (size_t)ROWS / 16 * NB * 64);
    for (int r = 0; r < ROWS; r++) {
        const int rt = r / 16, j = r % 16;
        for (int g = 0; g < NG4; g++) {
            const int b = g / 8, k = g % 8;
            w16[((size_t)rt * NB + b) * 64 + 4 * j + (k % 4)] |= nib[(size_t)r * NG4 + g] << (k < 4 ? 0 : 4);
        }
    }
    std::vector<float> y1(ROWS), y2(ROWS);
    for (int rt = 0; rt < ROWS / 64; rt++) tile64(w64 + (size_t)rt * NG4 * 32, d.data(), y1.data() + rt * 64);
    for (int rt = 0; rt < ROWS / 16; rt++) tile16(w16 + (size_t)rt * NB * 64, d.data(), y2.data() + rt * 16);
    int bad = 0;
    for (int r = 0; r < ROWS; r++) bad += memcmp(&y1[r], &y2[r], 4) != 0;
    printf("rows differing bitwise: %d of %d (y[5] %g %g)\n", bad, ROWS, y1[5], y2[5]);
    using clk = std::chrono::steady_clock;
    for (int pass = 0; pass < 3; pass++) {
        auto t0 = clk::now();
        for (int k = 0; k < reps; k++) for (int rt = 0; rt < ROWS / 64; rt++) tile64(w64 + (size_t)rt * NG4 * 32, d.data(), y1.data() + rt * 64);
        auto t1 = clk::now();
        for (int k = 0; k < reps; k++) for (int rt = 0; rt < ROWS / 16; rt++) tile16(w16 + (size_t)rt * NB * 64, d.data(), y2.data() + rt * 16);
        auto t2 = clk::now();
        printf("one plane %dx4096, cache-hot: 64-row ymm %.1f us, 16-row vpermb %.1f us\n",
               ROWS, std::chrono::duration<double, std::micro>(t1 - t0).count() / reps, std::chrono::duration<double, std::micro>(t2 - t1).count() / reps);
    }
}
