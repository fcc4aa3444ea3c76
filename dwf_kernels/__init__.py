"""dwf_kernels: fused kernels for Deep Weight Factorization (DWF) sparse training in PyTorch.

    import dwf_kernels
    w, sumsq = dwf_kernels.dwf_product(factors, return_sumsq=True)   # factors: (D, *weight_shape)

    model = dwf_kernels.factorize(model, depth=4)  # Linear/Conv -> DWF layers, other weights parametrized
    loss = criterion(model(x), y) + dwf_kernels.penalty(model, lam)
    optimizer = dwf_kernels.optim.FusedSGD(model.parameters(), lr, momentum=0.9)  # backward fused into step
    model = dwf_kernels.parallel.DistributedDataParallel(model)      # data parallel: all-reduces dL/dw only
    sparse = dwf_kernels.collapse(model)                             # plain torch.nn, exact zeros
    print(dwf_kernels.sparsity_report(sparse))
    dwf_kernels.save_compressed(sparse, "model.dwfz")                 # nonzeros only; load_compressed
    fast = dwf_kernels.sparsify(sparse, example_batch)               # sparse Linear where measured faster

See docs/design.md for the math and the kernel contract.
"""

from . import (
    _extension,  # noqa: F401  (loads dwf_kernels._C, or warns once)
    coverage,
    init,
    nn,
    optim,
    parallel,
    sparse,
)
from .backends import BACKENDS, available_backends, current_backend, use_backend
from .compressed import CompressedFileError, load_compressed, load_compressed_into, save_compressed
from .model import DEFAULT_THRESHOLD, collapse, factorize, penalty
from .ops import dwf_grad_sumsq, dwf_product, dwf_product_backward, dwf_sgd_step, dwf_sgd_step_multi
from .report import sparsity_report
from .sparse import SparseConv1d, SparseConv2d, SparseLinear, sparsify

__all__ = [
    "BACKENDS",
    "CompressedFileError",
    "SparseConv1d",
    "SparseConv2d",
    "SparseLinear",
    "DEFAULT_THRESHOLD",
    "available_backends",
    "collapse",
    "coverage",
    "current_backend",
    "dwf_grad_sumsq",
    "dwf_product",
    "dwf_product_backward",
    "dwf_sgd_step",
    "dwf_sgd_step_multi",
    "factorize",
    "init",
    "load_compressed",
    "load_compressed_into",
    "nn",
    "optim",
    "parallel",
    "penalty",
    "save_compressed",
    "sparse",
    "sparsify",
    "sparsity_report",
    "use_backend",
]
__version__ = "0.1.0"
