/* bitbasis C API: the one plain C header the Python binding (cffi) reads. */
#ifndef BITBASIS_H
#define BITBASIS_H
#ifdef __cplusplus
extern "C" {
#endif

/* Version of the library and of the binary-basis format it reads. */
const char *bb_version(void);
int bb_format_version(void);

#ifdef __cplusplus
}
#endif
#endif
