// llama.cpp's own tensor types (ggml_type, ggml/include/ggml.h): their names, so that messages say
// "Q4_K" and not "type 12", and the low-bit ones that are binary-basis tensors in another layout,
// mapped losslessly onto a BBTensor at load so that such files run on our kernels:
//   Q1_0  (41): 128 signs + one fp16 d per block, w = ±d          = N 1, G 128, no offset
//   Q2_0  (42): 64 2-bit codes c + one d,          w = (c - 1)·d   = N 2, G 64,  α0 = d/2, α1 = d, μ = d/2
//   TQ2_0 (35): 256 2-bit codes + one d,           w = (c - 1)·d   = the same with G 256
//   TQ1_0 (34): 256 base-3 trits t + one d,        w = (t - 1)·d   = the same with G 256
// (c - 1)·d = d/2·s0 + d·s1 + d/2 with s_i = 2·bit_i(c) - 1: GPTQ's k-bit codes with zero point 1
// (formats/binary_basis_v1.md, POW2 + OFFSET). Block layouts: ggml/src/ggml-common.h, decoders as
// ggml-quants.c's dequantize_row_*.
#pragma once
#include <cstdint>
#include <memory>
#include <string>

#include "gguf.h"
#include "kernels.h"

namespace bb {

enum LlamaCppType : uint32_t { LT_TQ1_0 = 34, LT_TQ2_0 = 35, LT_Q1_0 = 41, LT_Q2_0 = 42 };

// ggml's name of type `t` ("Q4_K"), or nullptr for a number ggml does not define.
const char *ggml_type_name(uint32_t t);

// True for the four low-bit types above; `blck` elements take `bytes` bytes.
bool lowbit_layout(uint32_t t, int64_t &blck, int64_t &bytes);

// The low-bit tensor `t` ([rows, cols] = [ne[1], ne[0]]) as a binary-basis tensor owning its planes,
// scales and offsets (not prepared: call bb_prepare). Exact, but for 2-bit scales below 2^-14 whose
// fp16 half is rounded (an error under 2^-25).
std::unique_ptr<BBTensor> bb_from_lowbit(const GTensor &t);

// Row r of a low-bit tensor of `cols` columns, dequantized as llama.cpp does (the token embedding).
void lowbit_dequant_row(uint32_t type, const uint8_t *data, int64_t r, int64_t cols, float *out);

}  // namespace bb
