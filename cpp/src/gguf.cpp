#include "gguf.h"
#include "llamacpp_types.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <stdexcept>

namespace bb {

namespace {

// Caps far above any real model, low enough that a hostile count cannot make us allocate wildly.
constexpr uint64_t MAX_TENSORS = 1u << 20;
constexpr uint64_t MAX_KV = 1u << 20;
constexpr uint64_t MAX_KEY_LEN = 1u << 16;
constexpr uint64_t MAX_NAME_LEN = 1024;
constexpr uint32_t MAX_DIMS = 4;
constexpr uint64_t MAX_ALIGNMENT = 1u << 16;

[[noreturn]] void fail(const std::string &msg) { throw std::runtime_error(msg); }

const char *gtype_name(uint32_t t) {
    static const char *n[] = {"u8", "i8", "u16", "i16", "u32", "i32", "f32", "bool",
                              "string", "array", "u64", "i64", "f64"};
    return t < GT_COUNT ? n[t] : "unknown";
}

// Byte size of a scalar metadata type (0 for string/array/unknown).
size_t gtype_size(uint32_t t) {
    switch (t) {
        case GT_U8: case GT_I8: case GT_BOOL: return 1;
        case GT_U16: case GT_I16: return 2;
        case GT_U32: case GT_I32: case GT_F32: return 4;
        case GT_U64: case GT_I64: case GT_F64: return 8;
        default: return 0;
    }
}

// Block size (elements) and block bytes of the tensor types we read.
bool ttype_layout(uint32_t t, int64_t &blck, int64_t &bytes) {
    switch (t) {
        case TT_F32: blck = 1; bytes = 4; return true;
        case TT_F16: blck = 1; bytes = 2; return true;
        case TT_Q8_0: blck = 32; bytes = 34; return true;
        case TT_I8: blck = 1; bytes = 1; return true;
        case TT_I16: blck = 1; bytes = 2; return true;
        case TT_I32: blck = 1; bytes = 4; return true;
        default: return lowbit_layout(t, blck, bytes);   // llama.cpp's Q1_0, Q2_0, TQ1_0, TQ2_0
    }
}

// A bounds-checked reader over the mapping.
struct Cursor {
    const uint8_t *base;
    size_t size;
    size_t pos = 0;
    const char *what = "header";

    size_t left() const { return size - pos; }
    void need(uint64_t n) const {
        if (n > left())
            fail("truncated file: " + std::string(what) + " needs " + std::to_string(n) + " bytes at offset " +
                 std::to_string(pos) + ", file has " + std::to_string(size));
    }
    template <class T> T get() {
        need(sizeof(T));
        T v;
        std::memcpy(&v, base + pos, sizeof(T));
        pos += sizeof(T);
        return v;
    }
    // A GGUF string: u64 length + bytes. Returns a pointer into the mapping.
    const uint8_t *str(uint64_t &len, uint64_t cap) {
        len = get<uint64_t>();
        if (len > cap)
            fail(std::string(what) + ": string length " + std::to_string(len) + " at offset " +
                 std::to_string(pos - 8) + " exceeds the limit " + std::to_string(cap));
        need(len);
        const uint8_t *p = base + pos;
        pos += len;
        return p;
    }
};

}  // namespace

const char *ttype_name(uint32_t t) {
    switch (t) {
        case TT_F32: return "F32";
        case TT_F16: return "F16";
        case TT_Q8_0: return "Q8_0";
        case TT_I8: return "I8";
        case TT_I16: return "I16";
        case TT_I32: return "I32";
        default: return ggml_type_name(t) ? ggml_type_name(t) : "unsupported";
    }
}

GGUFFile::GGUFFile(const std::string &path) : path_(path) {
    fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd_ < 0) fail(std::string("cannot open (") + std::strerror(errno) + ")");
    struct stat st;
    if (fstat(fd_, &st) != 0 || !S_ISREG(st.st_mode)) {
        ::close(fd_);
        fail("not a regular file");
    }
    size_ = (size_t)st.st_size;
    if (size_ < 24) {
        ::close(fd_);
        fail("truncated file: " + std::to_string(size_) + " bytes is smaller than a GGUF header (24)");
    }
    void *p = mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd_, 0);
    if (p == MAP_FAILED) {
        ::close(fd_);
        fail(std::string("mmap failed (") + std::strerror(errno) + ")");
    }
    base_ = (const uint8_t *)p;
    try {
        parse();
    } catch (...) {
        munmap((void *)base_, size_);
        ::close(fd_);
        throw;
    }
}

GGUFFile::~GGUFFile() {
    if (base_) munmap((void *)base_, size_);
    if (fd_ >= 0) ::close(fd_);
}

void GGUFFile::parse() {
    Cursor c{base_, size_};
    if (std::memcmp(base_, "GGUF", 4) != 0) fail("bad magic: not a GGUF file");
    c.pos = 4;
    version_ = c.get<uint32_t>();
    if (version_ != 2 && version_ != 3)
        fail("unsupported GGUF version " + std::to_string(version_) + " (2 and 3 are supported)");
    uint64_t n_tensors = c.get<uint64_t>();
    uint64_t n_kv = c.get<uint64_t>();
    // Every kv takes at least 8 (key length) + 4 (type) + 1 bytes, every tensor info at least 8+4+8+4+8.
    if (n_tensors > MAX_TENSORS || n_tensors > c.left() / 32)
        fail("tensor count " + std::to_string(n_tensors) + " is impossible for a file of " + std::to_string(size_) +
             " bytes (limit " + std::to_string(MAX_TENSORS) + ")");
    if (n_kv > MAX_KV || n_kv > c.left() / 13)
        fail("metadata count " + std::to_string(n_kv) + " is impossible for a file of " + std::to_string(size_) +
             " bytes (limit " + std::to_string(MAX_KV) + ")");

    c.what = "metadata";
    for (uint64_t i = 0; i < n_kv; i++) {
        uint64_t klen;
        const uint8_t *kp = c.str(klen, MAX_KEY_LEN);
        std::string key((const char *)kp, klen);
        GValue v;
        v.type = c.get<uint32_t>();
        if (v.type >= GT_COUNT)
            fail("metadata key '" + key + "': unknown value type " + std::to_string(v.type));
        if (v.type == GT_STRING) {
            v.data = c.str(v.n, c.left());
        } else if (v.type == GT_ARRAY) {
            v.elem = c.get<uint32_t>();
            v.n = c.get<uint64_t>();
            if (v.elem >= GT_COUNT || v.elem == GT_ARRAY)
                fail("metadata key '" + key + "': array of " +
                     (v.elem == GT_ARRAY ? std::string("arrays") : "unknown type " + std::to_string(v.elem)) +
                     " is not supported");
            v.data = base_ + c.pos;
            if (v.elem == GT_STRING) {
                if (v.n > c.left() / 8)
                    fail("truncated file: metadata key '" + key + "': array of " + std::to_string(v.n) +
                         " strings exceeds the file");
                for (uint64_t j = 0; j < v.n; j++) {
                    uint64_t l;
                    c.str(l, c.left());
                }
            } else {
                size_t es = gtype_size(v.elem);
                if (v.n > c.left() / es)
                    fail("truncated file: metadata key '" + key + "': array of " + std::to_string(v.n) + " " +
                         gtype_name(v.elem) + " exceeds the file");
                c.pos += v.n * es;
            }
        } else {
            size_t es = gtype_size(v.type);
            c.need(es);
            v.data = base_ + c.pos;
            c.pos += es;
        }
        if (!kv_.emplace(key, v).second) fail("duplicate metadata key '" + key + "'");
    }

    uint64_t alignment = 32;
    if (const GValue *a = find("general.alignment")) {
        if (a->type != GT_U32) fail("general.alignment must be u32");
        uint32_t al;
        std::memcpy(&al, a->data, 4);
        if (al == 0 || (al & (al - 1)) != 0 || al > MAX_ALIGNMENT)
            fail("general.alignment " + std::to_string(al) + " is not a power of two in [1, 65536]");
        alignment = al;
    }

    c.what = "tensor info";
    tensors_.reserve(n_tensors);
    for (uint64_t i = 0; i < n_tensors; i++) {
        GTensor t;
        uint64_t nlen;
        const uint8_t *np = c.str(nlen, MAX_NAME_LEN);
        t.name.assign((const char *)np, nlen);
        uint32_t nd = c.get<uint32_t>();
        if (nd < 1 || nd > MAX_DIMS)
            fail("tensor '" + t.name + "': " + std::to_string(nd) + " dimensions (1..4 supported)");
        t.n_dims = (int)nd;
        int64_t total = 1;
        for (uint32_t d = 0; d < nd; d++) {
            uint64_t e = c.get<uint64_t>();
            if (e < 1 || e > (uint64_t)INT64_MAX)
                fail("tensor '" + t.name + "': dimension " + std::to_string(d) + " is " + std::to_string(e));
            t.ne[d] = (int64_t)e;
            if (__builtin_mul_overflow(total, t.ne[d], &total))
                fail("tensor '" + t.name + "': element count overflows");
        }
        t.type = c.get<uint32_t>();
        t.offset = c.get<uint64_t>();
        int64_t blck, bbytes;
        if (!ttype_layout(t.type, blck, bbytes))
            fail("tensor '" + t.name + "': unsupported tensor type " +
                 (ggml_type_name(t.type) ? std::string("llama.cpp ") + ggml_type_name(t.type)
                                         : std::to_string(t.type)) +
                 " (the engine runs F32, F16, Q8_0, Q1_0, Q2_0, TQ1_0, TQ2_0 and binary-basis tensors; "
                 "`bitbasis convert` makes a file it runs)");
        if (t.ne[0] % blck != 0)
            fail("tensor '" + t.name + "': row of " + std::to_string(t.ne[0]) + " elements is not a multiple of the " +
                 ttype_name(t.type) + " block size " + std::to_string(blck));
        int64_t nb;
        if (__builtin_mul_overflow(total / blck, bbytes, &nb)) fail("tensor '" + t.name + "': byte size overflows");
        t.nbytes = (uint64_t)nb;
        if (t.offset % alignment != 0)
            fail("tensor '" + t.name + "': data offset " + std::to_string(t.offset) + " is not aligned to " +
                 std::to_string(alignment));
        if (!tensor_index_.emplace(t.name, tensors_.size()).second) fail("duplicate tensor name '" + t.name + "'");
        tensors_.push_back(std::move(t));
    }

    // The data section starts at the next multiple of the alignment.
    uint64_t data_start = (c.pos + alignment - 1) / alignment * alignment;
    if (data_start > size_ && !tensors_.empty())
        fail("truncated file: tensor data would start at " + std::to_string(data_start) + ", file has " +
             std::to_string(size_) + " bytes");
    uint64_t data_size = data_start <= size_ ? size_ - data_start : 0;
    for (GTensor &t : tensors_) {
        if (t.offset > data_size || t.nbytes > data_size - t.offset)
            fail("tensor '" + t.name + "': data [" + std::to_string(t.offset) + ", +" + std::to_string(t.nbytes) +
                 ") extends past the end of the file (data section holds " + std::to_string(data_size) +
                 " bytes; truncated file?)");
        t.data = base_ + data_start + t.offset;
        // Natural alignment of the element type, so the engine may read F32/F16/I32 through typed
        // pointers (Q8_0 blocks are 34 bytes: their f16 scales sit on even addresses).
        size_t need = t.type == TT_F32 || t.type == TT_I32 ? 4 : (t.type == TT_I8 ? 1 : 2);
        if ((uintptr_t)t.data % need != 0)
            fail("tensor '" + t.name + "': data at file offset " + std::to_string(data_start + t.offset) +
                 " is misaligned for " + ttype_name(t.type));
    }
}

const GValue *GGUFFile::find(const std::string &key) const {
    auto it = kv_.find(key);
    return it == kv_.end() ? nullptr : &it->second;
}

static bool scalar_int(uint32_t type, const uint8_t *p, int64_t &out) {
    switch (type) {
        case GT_U8: out = *p; return true;
        case GT_I8: out = (int8_t)*p; return true;
        case GT_BOOL: out = *p != 0; return true;
        case GT_U16: { uint16_t v; std::memcpy(&v, p, 2); out = v; return true; }
        case GT_I16: { int16_t v; std::memcpy(&v, p, 2); out = v; return true; }
        case GT_U32: { uint32_t v; std::memcpy(&v, p, 4); out = v; return true; }
        case GT_I32: { int32_t v; std::memcpy(&v, p, 4); out = v; return true; }
        case GT_I64: { int64_t v; std::memcpy(&v, p, 8); out = v; return true; }
        case GT_U64: {
            uint64_t v;
            std::memcpy(&v, p, 8);
            if (v > (uint64_t)INT64_MAX) return false;
            out = (int64_t)v;
            return true;
        }
        default: return false;
    }
}

bool GGUFFile::get_int(const std::string &key, int64_t &out) const {
    const GValue *v = find(key);
    if (!v) return false;
    if (!scalar_int(v->type, v->data, out))
        fail("metadata key '" + key + "' has type " + gtype_name(v->type) + ", expected an integer");
    return true;
}

bool GGUFFile::get_float(const std::string &key, double &out) const {
    const GValue *v = find(key);
    if (!v) return false;
    if (v->type == GT_F32) {
        float f;
        std::memcpy(&f, v->data, 4);
        out = f;
    } else if (v->type == GT_F64) {
        std::memcpy(&out, v->data, 8);
    } else {
        int64_t i;
        if (!scalar_int(v->type, v->data, i))
            fail("metadata key '" + key + "' has type " + gtype_name(v->type) + ", expected a number");
        out = (double)i;
    }
    return true;
}

bool GGUFFile::get_string(const std::string &key, std::string &out) const {
    const GValue *v = find(key);
    if (!v) return false;
    if (v->type != GT_STRING) fail("metadata key '" + key + "' has type " + gtype_name(v->type) + ", expected string");
    out.assign((const char *)v->data, v->n);
    return true;
}

bool GGUFFile::get_int_array(const std::string &key, std::vector<int64_t> &out) const {
    const GValue *v = find(key);
    if (!v) return false;
    size_t es = v->type == GT_ARRAY ? gtype_size(v->elem) : 0;
    if (v->type != GT_ARRAY || v->elem == GT_F32 || v->elem == GT_F64 || es == 0)
        fail("metadata key '" + key + "' is not an integer array");
    if (v->n > (1u << 20)) fail("metadata key '" + key + "': integer array too long");
    out.resize(v->n);
    for (uint64_t i = 0; i < v->n; i++)
        if (!scalar_int(v->elem, v->data + i * es, out[i])) fail("metadata key '" + key + "': value out of range");
    return true;
}

const GTensor *GGUFFile::tensor(const std::string &name) const {
    auto it = tensor_index_.find(name);
    return it == tensor_index_.end() ? nullptr : &tensors_[it->second];
}

}  // namespace bb
