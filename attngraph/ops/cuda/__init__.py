"""The CUDA kernels: sources (``*.cu``), the loader that compiles them with CuPy on a GPU or
with the CPU emulator, the launchers with their autograd, and the NVRTC compile gate
(``python -m attngraph.ops.cuda --arch sm_80 sm_90``)."""
from attngraph.ops.cuda.loader import MODULES, cuda_include_dirs, emulation_enabled

__all__ = ["MODULES", "cuda_include_dirs", "emulation_enabled"]
