/* cuda_ops.cu built as C++ for the CPU emulation (cuda_emu.h; CKV_CUDA_EMU is defined). */
#include "cuda_ops.cu"
