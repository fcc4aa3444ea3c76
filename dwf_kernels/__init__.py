"""dwf_kernels: fused kernels for Deep Weight Factorization (DWF) sparse training in PyTorch.

    import dwf_kernels
    w, sumsq = dwf_kernels.dwf_product(factors, return_sumsq=True)   # factors: (D, *weight_shape)

See DESIGN.md for the math and the kernel contract.
"""

from . import _extension  # noqa: F401  (loads dwf_kernels._C, or warns once)
from .backends import BACKENDS, available_backends, current_backend, use_backend
from .ops import dwf_product, dwf_product_backward

__all__ = [
    "BACKENDS",
    "available_backends",
    "current_backend",
    "dwf_product",
    "dwf_product_backward",
    "use_backend",
]
__version__ = "0.1.0"
