"""What this installation can do, found once: flags say what is installed, never what to
do (backends decide that from them, with reasons).

``WITH_CUPY``: CuPy is importable (the fused CUDA kernels can run on a GPU).
``WITH_TORCH_SCATTER``: torch_scatter's CSR segment kernels are importable.
:func:`cpu_flash_ops`: ATen's fused CPU flash-attention kernel, probed on first use (it is
private to ATen, so its presence and signature are checked by running it once).
"""
from __future__ import annotations

import importlib.util
from typing import Optional, Tuple

import torch

__all__ = ["WITH_CUPY", "WITH_TORCH_SCATTER", "cpu_flash_ops"]

WITH_CUPY = importlib.util.find_spec("cupy") is not None

try:  # optional: import must never fail without it
    import torch_scatter  # noqa: F401

    WITH_TORCH_SCATTER = True
except Exception:  # pragma: no cover - depends on the environment
    WITH_TORCH_SCATTER = False

_CPU_FLASH: Optional[tuple] = None


def cpu_flash_ops() -> Optional[Tuple[object, object]]:
    """``(forward, backward)`` of ATen's CPU flash attention (taking an additive
    ``attn_mask`` and returning the log-sum-exp), or None where this torch lacks them."""
    global _CPU_FLASH
    if _CPU_FLASH is None:
        try:
            fwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
            bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
            x = torch.zeros(1, 1, 2, 4)
            bias = torch.zeros(1, 1, 2, 2)
            o, lse = fwd(x, x, x, attn_mask=bias, scale=1.0)
            bwd(o, x, x, x, o, lse, 0.0, False, attn_mask=bias, scale=1.0)
            _CPU_FLASH = (fwd, bwd)
        except (AttributeError, RuntimeError, TypeError):
            _CPU_FLASH = ()
    return _CPU_FLASH or None
