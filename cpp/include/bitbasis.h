/* bitbasis C API: the one plain C header the Python binding (cffi) reads. */
#ifndef BITBASIS_H
#define BITBASIS_H
#ifdef __cplusplus
extern "C" {
#endif

/* Version of the library and of the binary-basis format it reads. */
const char *bb_version(void);
int bb_format_version(void);

/* The reason of the last failed call on this thread ("" when none). */
const char *bb_last_error(void);

/* A loaded model with its KV cache. Not thread safe: one caller at a time per model. */
typedef struct bb_model bb_model;

/* Open a GGUF file (llama family; dense F32/F16/Q8_0 and binary-basis weights). n_threads worker
   threads split every matrix; n_ctx <= 0 means the context length of the file. NULL on error. */
bb_model *bb_model_open(const char *path, int n_threads, int n_ctx);
void bb_model_close(bb_model *m);

int bb_n_vocab(const bb_model *m);
int bb_n_ctx(const bb_model *m);
int bb_n_embd(const bb_model *m);
int bb_n_layer(const bb_model *m);
int bb_n_threads(const bb_model *m);
/* The binary-basis kernel in use (e.g. "scalar", "avx512-vpopcnt"). */
const char *bb_kernel_name(const bb_model *m);
/* 1 when the model was opened with BITBASIS_PRECISE_ACTS=1 (a second int8 pass over each
   activation's rounding residual: float-reference accuracy, about twice the matmul time). */
int bb_precise_acts(const bb_model *m);

/* Run n tokens at the current cache position and append them to the KV cache. logits (may be
   NULL) receives n * n_vocab floats when all_logits, else n_vocab floats for the last token.
   0 on success, -1 on error (bb_last_error says why; the cache is then unchanged). */
int bb_eval(bb_model *m, const int *tokens, int n, float *logits, int all_logits);

/* Tokens held in the KV cache; bb_set_n_past keeps the first n of them (n <= bb_n_past). */
int bb_n_past(const bb_model *m);
int bb_set_n_past(bb_model *m, int n);
void bb_reset(bb_model *m);

/* Metadata of the file: a string value (NULL when absent or not a string; valid until close),
   and an integer value (0 on success, -1 when absent or not an integer). */
const char *bb_meta_string(bb_model *m, const char *key);
int bb_meta_int(const bb_model *m, const char *key, long long *out);

#ifdef __cplusplus
}
#endif
#endif
