// attngraph_emu_fp16.h -- host definitions of the cuda_fp16.h / cuda_bf16.h intrinsics that
// the CUDA headers provide only for device code. Included at the end of attngraph_emu.h.
#pragma once
