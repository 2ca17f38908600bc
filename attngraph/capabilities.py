"""What this installation can do, found once: flags say what is installed, never what to
do (backends decide that from them, with reasons).

``WITH_CUPY``: CuPy is importable (the fused CUDA kernels can run on a GPU).
``WITH_TORCH_SCATTER``: torch_scatter's CSR segment kernels are importable.
:func:`cpu_flash_ops`: ATen's fused CPU flash-attention kernel, probed on first use (it is
private to ATen, so its presence and signature are checked by running it once).
:func:`flex_attention_missing`: why FlexAttention cannot run here (torch below
``FLEX_MIN_TORCH``, or no ``torch.nn.attention.flex_attention``), or None.
"""
from __future__ import annotations

import importlib.util
from typing import Optional, Tuple

import torch

__all__ = ["WITH_CUPY", "WITH_TORCH_SCATTER", "cpu_flash_ops", "flex_attention_missing",
           "torch_at_least", "FLEX_MIN_TORCH", "FLEX_BIAS_GRAD_MIN_TORCH"]

# FlexAttention (flex_attention with return_lse, BlockMask.from_kv_blocks, enable_gqa) is
# in torch 2.5 and later; gradients of tensors a score_mod reads, in 2.6 and later.
FLEX_MIN_TORCH = (2, 5)
FLEX_BIAS_GRAD_MIN_TORCH = (2, 6)

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


def torch_at_least(version: Tuple[int, int]) -> bool:
    """The installed torch (``torch.__version__``, read at call time) is ``version`` or
    later."""
    parts = []
    for piece in str(torch.__version__).split("+")[0].split(".")[:2]:
        digits = "".join(c for c in piece if c.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts) >= tuple(version)


def flex_attention_missing() -> Optional[str]:
    """Why FlexAttention cannot run with this torch, or None when it can (checked at call
    time: the torch version, then the import of ``torch.nn.attention.flex_attention``)."""
    need = ".".join(map(str, FLEX_MIN_TORCH))
    if not torch_at_least(FLEX_MIN_TORCH):
        return (f"FlexAttention needs torch >= {need}, found {torch.__version__} "
                f"(pip install 'torch>={need}')")
    try:
        from torch.nn.attention.flex_attention import BlockMask, flex_attention  # noqa: F401
    except ImportError as e:
        return f"torch.nn.attention.flex_attention does not import ({e}); it needs torch >= {need}"
    return None
