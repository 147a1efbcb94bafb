// A GGUF (v2/v3) reader for untrusted files: the file is mmapped and every count, length, offset,
// alignment and tensor byte size is checked against the file size, with overflow-safe arithmetic,
// before anything is read. Errors are thrown as std::runtime_error with a one-line reason.
#pragma once
#include <cstddef>
#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace bb {

// GGUF metadata value types.
enum GType : uint32_t {
    GT_U8 = 0, GT_I8 = 1, GT_U16 = 2, GT_I16 = 3, GT_U32 = 4, GT_I32 = 5, GT_F32 = 6, GT_BOOL = 7,
    GT_STRING = 8, GT_ARRAY = 9, GT_U64 = 10, GT_I64 = 11, GT_F64 = 12, GT_COUNT = 13
};

// ggml tensor types this reader knows the size of (the rest are rejected by name/number).
enum TType : uint32_t { TT_F32 = 0, TT_F16 = 1, TT_Q8_0 = 8, TT_I8 = 24, TT_I16 = 25, TT_I32 = 26 };

const char *ttype_name(uint32_t t);

// One metadata value. Points into the mapping; `n` is the string length or the array count.
struct GValue {
    uint32_t type = 0;
    uint32_t elem = 0;              // array element type
    uint64_t n = 0;
    const uint8_t *data = nullptr;  // scalar bytes, string bytes, or the first array element
};

struct GTensor {
    std::string name;
    uint32_t type = 0;
    int n_dims = 0;
    int64_t ne[4] = {1, 1, 1, 1};   // ggml order: ne[0] is the contiguous (innermost) dimension
    uint64_t offset = 0;            // relative to the data section
    uint64_t nbytes = 0;
    const uint8_t *data = nullptr;
    int64_t nelements() const { return ne[0] * ne[1] * ne[2] * ne[3]; }
};

class GGUFFile {
public:
    explicit GGUFFile(const std::string &path);  // throws std::runtime_error
    ~GGUFFile();
    GGUFFile(const GGUFFile &) = delete;
    GGUFFile &operator=(const GGUFFile &) = delete;

    const std::string &path() const { return path_; }
    size_t size() const { return size_; }
    uint32_t version() const { return version_; }

    const GValue *find(const std::string &key) const;
    // Typed getters: false when absent; throw when present with a type that does not fit.
    bool get_int(const std::string &key, int64_t &out) const;
    bool get_float(const std::string &key, double &out) const;
    bool get_string(const std::string &key, std::string &out) const;
    bool get_int_array(const std::string &key, std::vector<int64_t> &out) const;
    const std::map<std::string, GValue> &kv() const { return kv_; }

    const GTensor *tensor(const std::string &name) const;
    const std::vector<GTensor> &tensors() const { return tensors_; }

private:
    void parse();
    std::string path_;
    int fd_ = -1;
    const uint8_t *base_ = nullptr;
    size_t size_ = 0;
    uint32_t version_ = 0;
    std::map<std::string, GValue> kv_;
    std::vector<GTensor> tensors_;
    std::map<std::string, size_t> tensor_index_;
};

}  // namespace bb
