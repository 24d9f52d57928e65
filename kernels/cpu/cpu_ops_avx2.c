/*
 * avx2 matmul micro-kernel of the dense ops (cpu_ops.h). Placeholder: the portable kernel
 * runs until this one exists.
 */
#include "cpu_ops.h"

const cpu_mm_fn cpu_ops_mm_avx2 = 0;
