#include "bitbasis.h"

extern "C" const char *bb_version(void) { return "0.1.0"; }
extern "C" int bb_format_version(void) { return 1; }
