#include "llamacpp_types.h"

#include <cstring>
#include <stdexcept>

namespace bb {

namespace {

// ggml_type numbers and names (ggml/include/ggml.h; 4, 5 and 36-38 were removed upstream).
const char *const NAMES[] = {
    "F32", "F16", "Q4_0", "Q4_1", nullptr, nullptr, "Q5_0", "Q5_1", "Q8_0", "Q8_1",             // 0-9
    "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_K", "IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ1_S",    // 10-19
    "IQ4_NL", "IQ3_S", "IQ2_S", "IQ4_XS", "I8", "I16", "I32", "I64", "F64", "IQ1_M",            // 20-29
    "BF16", nullptr, nullptr, nullptr, "TQ1_0", "TQ2_0", nullptr, nullptr, nullptr, "MXFP4",    // 30-39
    "NVFP4", "Q1_0", "Q2_0",                                                                    // 40-42
};

// The block layouts, as ggml-common.h declares them: fixed, so their sizes are asserted.
struct block_q1_0 {
    uint16_t d;              // fp16 scale
    uint8_t qs[128 / 8];     // element j = bit j%8 of byte j/8: 1 → +d, 0 → -d
};
struct block_q2_0 {
    uint16_t d;
    uint8_t qs[64 / 4];      // element j = bits 2(j%4) of byte j/4
};
struct block_tq1_0 {
    uint8_t qs[(256 - 4 * 256 / 64) / 5];  // 48 bytes of 5 trits each (elements 0..239)
    uint8_t qh[256 / 64];                  // 4 bytes of 4 trits each (elements 240..255)
    uint16_t d;
};
struct block_tq2_0 {
    uint8_t qs[256 / 4];     // byte 32h + m holds elements 128h + 32l + m in bits 2l
    uint16_t d;
};
static_assert(sizeof(block_q1_0) == 2 + 16, "wrong q1_0 block size/padding");
static_assert(sizeof(block_q2_0) == 2 + 16, "wrong q2_0 block size/padding");
static_assert(sizeof(block_tq1_0) == 48 + 4 + 2, "wrong tq1_0 block size/padding");
static_assert(sizeof(block_tq2_0) == 64 + 2, "wrong tq2_0 block size/padding");

// A block copied out of the file (a row of 18-byte blocks is not 2-byte aligned in general).
template <class Block>
Block load_block(const uint8_t *p) {
    Block b;
    std::memcpy(&b, p, sizeof b);
    return b;
}

// The codes of one block (c in 0..3; for Q1_0 the sign bit) and its fp16 scale d.
uint16_t decode_block(uint32_t type, const uint8_t *p, uint8_t *codes) {
    switch (type) {
        case LT_Q1_0: {
            const auto b = load_block<block_q1_0>(p);
            for (int j = 0; j < 128; j++) codes[j] = (b.qs[j / 8] >> (j % 8)) & 1;
            return b.d;
        }
        case LT_Q2_0: {
            const auto b = load_block<block_q2_0>(p);
            for (int j = 0; j < 64; j++) codes[j] = (b.qs[j / 4] >> (2 * (j % 4))) & 3;
            return b.d;
        }
        case LT_TQ2_0: {
            const auto b = load_block<block_tq2_0>(p);
            for (int h = 0; h < 2; h++)
                for (int l = 0; l < 4; l++)
                    for (int m = 0; m < 32; m++) codes[128 * h + 32 * l + m] = (b.qs[32 * h + m] >> (2 * l)) & 3;
            return b.d;
        }
        case LT_TQ1_0: {  // a byte is a fixed-point fraction of 3^5 (3^4): trit n is the integer part
                          // of 3 * (byte * 3^n mod 256) / 256
            const auto b = load_block<block_tq1_0>(p);
            static const uint8_t pow3[5] = {1, 3, 9, 27, 81};
            auto trit = [](uint8_t q, int n) { return (uint8_t)(((uint16_t)(uint8_t)(q * pow3[n]) * 3) >> 8); };
            for (int n = 0; n < 5; n++)
                for (int m = 0; m < 32; m++) codes[32 * n + m] = trit(b.qs[m], n);
            for (int n = 0; n < 5; n++)
                for (int m = 0; m < 16; m++) codes[160 + 16 * n + m] = trit(b.qs[32 + m], n);
            for (int n = 0; n < 4; n++)
                for (int m = 0; m < 4; m++) codes[240 + 4 * n + m] = trit(b.qh[m], n);
            return b.d;
        }
    }
    throw std::runtime_error("not a low-bit llama.cpp type");
}

// h / 2 in fp16. Exact but for a subnormal half with its last bit set (|d| < 2^-14 and odd): that rounds
// to nearest even, an error under 2^-25 (as numpy's float16(d / 2) does).
uint16_t half_of(uint16_t h) {
    const uint16_t sign = h & 0x8000, e = (h >> 10) & 0x1f, m = h & 0x3ff;
    if (e == 31) return h;                                       // inf / NaN stay what they are
    if (e > 1) return sign | (uint16_t)((e - 1) << 10) | m;
    const uint16_t sig = e == 1 ? (uint16_t)(0x400 | m) : m;     // the value in units of 2^-24
    const uint16_t q = sig >> 1;
    return sign | (uint16_t)(q + ((sig & 1) & (q & 1)));         // a tie goes to the even neighbour
}

}  // namespace

const char *ggml_type_name(uint32_t t) { return t < sizeof(NAMES) / sizeof(NAMES[0]) ? NAMES[t] : nullptr; }

bool lowbit_layout(uint32_t t, int64_t &blck, int64_t &bytes) {
    switch (t) {
        case LT_Q1_0: blck = 128; bytes = sizeof(block_q1_0); return true;
        case LT_Q2_0: blck = 64; bytes = sizeof(block_q2_0); return true;
        case LT_TQ1_0: blck = 256; bytes = sizeof(block_tq1_0); return true;
        case LT_TQ2_0: blck = 256; bytes = sizeof(block_tq2_0); return true;
        default: return false;
    }
}

std::unique_ptr<BBTensor> bb_from_lowbit(const GTensor &t) {
    int64_t blck, bytes;
    if (!lowbit_layout(t.type, blck, bytes) || t.n_dims != 2) throw std::runtime_error("tensor " + t.name + ": not a low-bit matrix");
    std::unique_ptr<BBTensor> w(new BBTensor);
    const int np = t.type == LT_Q1_0 ? 1 : 2, G = (int)blck;
    w->rows = t.ne[1];
    w->cols = t.ne[0];
    w->n_planes = np;
    w->group = G;
    w->ngroups = w->cols / G;                 // the reader checked cols % blck == 0
    w->flags = np == 2 ? (F_POW2 | F_OFFSET) : 0;
    const int64_t nblk = w->rows * w->ngroups;
    // one buffer: planes [rows][ngroups][N][G/8], then scales [rows][ngroups][1][S = 1], offsets [rows][ngroups][1]
    const size_t planes_bytes = (size_t)nblk * np * (G / 8);
    w->owned.assign(planes_bytes + (size_t)nblk * 2 * (np == 2 ? 2 : 1), 0);
    uint8_t *planes = w->owned.data();
    uint16_t *scales = (uint16_t *)(planes + planes_bytes);   // planes_bytes is a multiple of 8
    uint16_t *offsets = np == 2 ? scales + nblk : nullptr;
    uint8_t codes[256];
    for (int64_t k = 0; k < nblk; k++) {
        const uint16_t d = decode_block(t.type, t.data + k * bytes, codes);
        uint8_t *p = planes + k * np * (G / 8);
        for (int j = 0; j < G; j++)
            for (int i = 0; i < np; i++) p[i * (G / 8) + j / 8] |= (uint8_t)(((codes[j] >> i) & 1) << (j % 8));
        if (np == 1) {
            scales[k] = d;                      // w = d·s
        } else {                                // w = (c - 1)·d = d/2·s0 + d·s1 + d/2
            scales[k] = offsets[k] = half_of(d);
        }
    }
    w->planes = planes;
    w->scales_f16 = scales;
    w->offsets_f16 = offsets;
    return w;
}

void lowbit_dequant_row(uint32_t type, const uint8_t *data, int64_t r, int64_t cols, float *out) {
    int64_t blck, bytes;
    lowbit_layout(type, blck, bytes);
    const uint8_t *row = data + r * (cols / blck) * bytes;
    uint8_t codes[256];
    for (int64_t b = 0; b < cols / blck; b++) {
        const float d = f16_to_f32(decode_block(type, row + b * bytes, codes));
        for (int64_t j = 0; j < blck; j++)
            out[b * blck + j] = type == LT_Q1_0 ? (codes[j] ? d : -d) : d * (float)((int)codes[j] - 1);
    }
}

}  // namespace bb
