// Reassembling one binary-basis weight from its component tensors in a GGUF file
// (formats/binary_basis_v1.md): the model loader's code, shared with the test programs
// (cpp/tests/test_vectors.cpp reads the golden vectors of formats/vectors/ through it).
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "gguf.h"
#include "kernels.h"

namespace bb {

// The component tensors of binary-basis weight `name` (its metadata bitbasis.tensor.<name> = hdr,
// [rows, cols, N, G, flags]) checked against every rule format.py's validate() checks, as a BBTensor
// pointing into `f`'s mapping (not prepared yet: call bb_prepare). Throws std::runtime_error naming the
// tensor and the violated rule.
std::unique_ptr<BBTensor> build_bb(const GGUFFile &f, const std::string &name, const std::vector<int64_t> &hdr);

// The same with the header read from `f`; nullptr when `f` has no key bitbasis.tensor.<name>.
std::unique_ptr<BBTensor> load_bb(const GGUFFile &f, const std::string &name);

// Row r of a prepared tensor (bb_prepare) dequantized by the spec formula (format.py's dequantize, same
// summation order): planes ascending, then μ, then the column scale, then the sparse values. The token
// embedding's lookup: one row per token, so a plain loop is enough.
void bb_dequant_row(const BBTensor &t, int64_t r, float *out);

}  // namespace bb
