// Reassembling one binary-basis weight from its component tensors (bb_load.h).
#include "bb_load.h"

#include <algorithm>
#include <cstdio>
#include <stdexcept>

namespace bb {

namespace {

[[noreturn]] void fail(const std::string &msg) { throw std::runtime_error(msg); }

const char *const BB_SUFFIXES[] = {"bbp", "bbs", "bbo", "bbc", "bbe", "bbm", "bbv", "bbz", "bbk"};
constexpr uint32_t KNOWN_FLAGS = F_OFFSET | F_COLMASK | F_ELEMCLASS | F_SPARSE | F_POW2 | F_COLSCALE;

}  // namespace

// Everything format.py's validate() checks, on the component tensors in the file.
std::unique_ptr<BBTensor> build_bb(const GGUFFile &f, const std::string &name, const std::vector<int64_t> &hdr) {
    if (hdr.size() != 5)
        fail("bitbasis.tensor." + name + " must be 5 integers [rows, cols, N, G, flags], got " +
             std::to_string(hdr.size()));
    for (int64_t v : hdr)
        if (v < 0 || v > 0xffffffffLL) fail("bitbasis.tensor." + name + ": value " + std::to_string(v) + " out of range");
    const int64_t rows = hdr[0], cols = hdr[1], n = hdr[2], g = hdr[3];
    const uint32_t flags = (uint32_t)hdr[4];
    if (rows < 1 || cols < 1)
        fail(name + ": shape [" + std::to_string(rows) + ", " + std::to_string(cols) + "] must be positive");
    if (n < 1 || n > 8) fail(name + ": " + std::to_string(n) + " planes, must be 1..8");
    if (g < 64 || g % 64 || g > 65536)
        fail(name + ": group size " + std::to_string(g) + " must be a multiple of 64 in [64, 65536]");
    if (flags & ~KNOWN_FLAGS) {
        char buf[32];
        std::snprintf(buf, sizeof buf, "%#x", flags & ~KNOWN_FLAGS);
        fail(name + ": unknown flag bits " + buf + " (newer writer?)");
    }
    const int64_t ng = (cols + g - 1) / g;
    const int64_t c = 1 + !!(flags & F_COLMASK) + !!(flags & F_ELEMCLASS);
    const int64_t s = (flags & F_POW2) ? 1 : n;
    struct Want {
        const char *suf;
        std::vector<int64_t> shape;  // numpy order
        uint32_t type;
    };
    std::vector<Want> want = {{"bbp", {rows, ng, n, g / 8}, TT_I8}, {"bbs", {rows, ng, c, s}, TT_F16}};
    if (flags & F_OFFSET) want.push_back({"bbo", {rows, ng, c}, TT_F16});
    if (flags & F_COLMASK) want.push_back({"bbc", {ng, g / 8}, TT_I8});
    if (flags & F_ELEMCLASS) want.push_back({"bbe", {rows, ng, g / 8}, TT_I8});
    if (flags & F_SPARSE) {
        want.push_back({"bbm", {rows, ng, g / 8}, TT_I8});
        want.push_back({"bbz", {rows, 2}, TT_F16});
    }
    if (flags & F_COLSCALE) want.push_back({"bbk", {cols}, TT_F16});
    for (const char *suf : BB_SUFFIXES) {
        bool wanted = std::string(suf) == "bbv" ? (flags & F_SPARSE) != 0
                                                : std::any_of(want.begin(), want.end(),
                                                              [&](const Want &w) { return std::string(w.suf) == suf; });
        bool present = f.tensor(name + "." + suf) != nullptr;
        if (wanted != present)
            fail(name + ": component " + suf + (present ? " is present but flags " : " is missing but flags ") +
                 std::to_string(flags) + (present ? " do not use it" : " require it"));
    }
    auto tensor_of = [&](const Want &w) -> const GTensor * {
        const GTensor *t = f.tensor(name + "." + w.suf);
        bool ok = t->n_dims == (int)w.shape.size() && t->type == w.type;
        for (size_t d = 0; ok && d < w.shape.size(); d++) ok = t->ne[d] == w.shape[w.shape.size() - 1 - d];
        if (!ok) {
            std::string got, exp;
            for (int d = t->n_dims - 1; d >= 0; d--) got += std::to_string(t->ne[d]) + (d ? ", " : "");
            for (size_t d = 0; d < w.shape.size(); d++) exp += std::to_string(w.shape[d]) + (d + 1 < w.shape.size() ? ", " : "");
            fail(name + "." + w.suf + ": shape (" + got + ") " + ttype_name(t->type) + ", expected (" + exp + ") " +
                 ttype_name(w.type));
        }
        return t;
    };
    auto bt = std::make_unique<BBTensor>();
    bt->rows = rows, bt->cols = cols, bt->n_planes = (int)n, bt->group = (int)g, bt->n_classes = (int)c;
    bt->ngroups = ng, bt->flags = flags;
    for (const Want &w : want) {
        const GTensor *t = tensor_of(w);
        std::string suf = w.suf;
        if (suf == "bbp") bt->planes = t->data;
        else if (suf == "bbs") bt->scales_f16 = (const uint16_t *)t->data;
        else if (suf == "bbo") bt->offsets_f16 = (const uint16_t *)t->data;
        else if (suf == "bbc") bt->colmask = t->data;
        else if (suf == "bbe") bt->elemclass = t->data;
        else if (suf == "bbm") bt->sparse_mask = t->data;
        else if (suf == "bbz") bt->sparse_zs = (const uint16_t *)t->data;
        else if (suf == "bbk") bt->colscale_f16 = (const uint16_t *)t->data;
    }
    // Padding bits (columns past `cols` in the last group) must be zero in every bit run.
    const int64_t pad_from = cols - (ng - 1) * g;  // first padding column inside the last group
    const int64_t gb = g / 8;
    auto check_pad = [&](const uint8_t *runs, int64_t n_runs, int64_t run_stride, const char *suf) {
        if (pad_from == g) return;
        for (int64_t k = 0; k < n_runs; k++) {
            const uint8_t *p = runs + k * run_stride;
            for (int64_t j = pad_from; j < g; j++)
                if (p[j >> 3] >> (j & 7) & 1)
                    fail(name + "." + suf + ": padding bits past column " + std::to_string(cols) + " are not zero");
        }
    };
    // bbp [rows][ng][N][G/8]: the last group's N runs of each row
    for (int64_t r = 0; r < rows; r++) check_pad(bt->planes + ((r * ng + ng - 1) * n) * gb, n, gb, "bbp");
    if (bt->colmask) check_pad(bt->colmask + (ng - 1) * gb, 1, gb, "bbc");
    if (bt->elemclass) check_pad(bt->elemclass + (ng - 1) * gb, rows, ng * gb, "bbe");
    if (bt->sparse_mask) {
        check_pad(bt->sparse_mask + (ng - 1) * gb, rows, ng * gb, "bbm");
        int64_t nnz = 0;
        for (int64_t i = 0; i < rows * ng * gb; i++) nnz += __builtin_popcount(bt->sparse_mask[i]);
        const GTensor *v = f.tensor(name + ".bbv");
        if (v->n_dims != 1 || v->type != TT_I8 || v->ne[0] != std::max<int64_t>(nnz, 1))
            fail(name + ".bbv: " + std::to_string(v->nelements()) + " codes for " + std::to_string(nnz) +
                 " sparse-mask bits");
        bt->sparse_codes = v->data;
    }
    return bt;
}

std::unique_ptr<BBTensor> load_bb(const GGUFFile &f, const std::string &name) {
    std::vector<int64_t> hdr;
    if (!f.get_int_array("bitbasis.tensor." + name, hdr)) return nullptr;
    return build_bb(f, name, hdr);
}

void bb_dequant_row(const BBTensor &t, int64_t r, float *out) {
    const int N = t.n_planes, C = t.n_classes, G = t.group;
    const int64_t gb = G / 8;
    auto bit = [](const uint8_t *p, int64_t j) { return (p[j >> 3] >> (j & 7)) & 1; };
    for (int64_t col = 0; col < t.cols; col++) {
        const int64_t g = col / G, j = col % G, rg = r * t.ngroups + g;
        int c = 0;   // spec "class c": column mask, then element class
        if (t.colmask && bit(t.colmask + g * gb, j)) c = 1;
        if (t.elemclass && bit(t.elemclass + rg * gb, j)) c = C - 1;
        const uint8_t *pl = t.planes + rg * N * gb;
        const float *al = t.scales.data() + (rg * C + c) * N;
        float w = 0.0f;
        for (int i = 0; i < N; i++) w += bit(pl + i * gb, j) ? al[i] : -al[i];
        if (!t.offsets.empty()) w += t.offsets[rg * C + c];
        if (!t.colscale.empty()) w *= t.colscale[col];
        out[col] = w;
    }
    if (!t.sparse_mask) return;
    const uint8_t *m = t.sparse_mask + r * t.ngroups * gb;
    int64_t idx = t.sparse_row_start[r];
    const float z = f16_to_f32(t.sparse_zs[2 * r]), mn = f16_to_f32(t.sparse_zs[2 * r + 1]);
    for (int64_t col = 0; col < t.cols; col++)
        if (bit(m, col)) out[col] = z * (float)t.sparse_codes[idx++] + mn;
}

}  // namespace bb
