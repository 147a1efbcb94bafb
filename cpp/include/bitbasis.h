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

/* A loaded model (the mmap'd weights, loaded once) with a default context for the single-sequence
   calls below (bb_eval, bb_n_past, ...). More sequences over the same weights: bb_context_new.
   Calls that run the model serialise on a lock inside it; one context is used by one caller at a time. */
typedef struct bb_model bb_model;
/* One sequence: its own KV cache and position (as llama.cpp's llama_context to llama_model). */
typedef struct bb_context bb_context;

/* Open a GGUF file (llama family; dense F32/F16/Q8_0 and binary-basis weights). n_threads worker
   threads split every matrix; n_ctx <= 0 means the context length of the file. NULL on error. */
bb_model *bb_model_open(const char *path, int n_threads, int n_ctx);
void bb_model_close(bb_model *m);

int bb_n_vocab(const bb_model *m);
int bb_n_ctx(const bb_model *m);        /* of the default context */
int bb_n_ctx_train(const bb_model *m);  /* the file's context length */
int bb_n_embd(const bb_model *m);
int bb_n_layer(const bb_model *m);
int bb_n_threads(const bb_model *m);
/* The binary-basis kernel in use (e.g. "scalar", "avx512-vpopcnt"). */
const char *bb_kernel_name(const bb_model *m);
/* 1 when the model was opened with BITBASIS_PRECISE_ACTS=1 (a second int8 pass over each
   activation's rounding residual: float-reference accuracy, about twice the matmul time). */
int bb_precise_acts(const bb_model *m);
/* 1 when the KV cache holds f16: files with binary-basis (or llama.cpp low-bit) linears on a kernel set
   that converts f16 in hardware, precise acts off; 0 for an f32 cache. BITBASIS_KV=f16|f32 overrides. */
int bb_kv_f16(const bb_model *m);

/* Run n tokens at the current cache position and append them to the KV cache. logits (may be
   NULL) receives n * n_vocab floats when all_logits, else n_vocab floats for the last token.
   0 on success, -1 on error, -2 when the tokens do not fit the context (bb_last_error says why;
   the cache is then unchanged). */
int bb_eval(bb_model *m, const int *tokens, int n, float *logits, int all_logits);

/* Tokens held in the KV cache; bb_set_n_past keeps the first n of them (n <= bb_n_past). */
int bb_n_past(const bb_model *m);
int bb_set_n_past(bb_model *m, int n);
void bb_reset(bb_model *m);

/* Contexts: any number over one model (which must outlive them). n_ctx <= 0: the file's context
   length. The KV cache grows as tokens arrive, up to n_ctx. NULL on error. */
bb_context *bb_context_new(bb_model *m, int n_ctx);
void bb_context_free(bb_context *c);
int bb_context_n_ctx(const bb_context *c);
int bb_context_n_past(const bb_context *c);
int bb_context_set_n_past(bb_context *c, int n);   /* keep the first n tokens (n <= n_past) */
/* As bb_eval, on context c of model m. */
int bb_context_eval(bb_model *m, bb_context *c, const int *tokens, int n, float *logits, int all_logits);
/* One forward pass over several sequences (continuous batching): sequence i appends n_tokens[i]
   tokens, taken in order from `tokens`, to ctxs[i] (distinct contexts of m); the weights are read
   once for the whole batch. logits (may be NULL) receives n_seq * n_vocab floats, the last token
   of each sequence. 0 on success, -1 on error, -2 when a sequence does not fit its context
   (bb_last_error names it); on any error no context changes. */
int bb_decode(bb_model *m, int n_seq, bb_context *const *ctxs, const int *n_tokens, const int *tokens,
              float *logits);

/* Metadata of the file: a string value (NULL when absent or not a string; valid until close),
   and an integer value (0 on success, -1 when absent or not an integer). */
const char *bb_meta_string(bb_model *m, const char *key);
int bb_meta_int(const bb_model *m, const char *key, long long *out);

#ifdef __cplusplus
}
#endif
#endif
