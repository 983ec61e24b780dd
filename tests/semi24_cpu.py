"""The 2:4 path on the CPU, for tests: torch's own compressed tensor, its product done densely.

`CpuSemi` is torch's CUTLASS-format ``SparseSemiStructuredTensor`` (the same compression and
metadata, built by torch's pure-PyTorch ``sparse_semi_structured_from_dense_cutlass``; deep copy,
detach, transpose, ``to_dense`` and ``state_dict`` are torch's) whose matrix product runs on the
decompressed weight instead of the CUDA kernel, which has no CPU implementation. `install` lets
graphprune's 2:4 pass take CPU weights and convert them with it, so every step around the kernel
(where the conversion sits in the pipeline, casts, copies, BN folding, verification, the report,
the compile backend) runs where no GPU is. What it cannot check is the CUDA kernel itself: that
is the `gpu`-marked tests' job.
"""

from __future__ import annotations

import torch
from torch.sparse import SparseSemiStructuredTensorCUTLASS

from graphprune.kernels import semi24


class CpuSemi(SparseSemiStructuredTensorCUTLASS):
    @classmethod
    def _validate_device_dim_dtype_shape(cls, t: torch.Tensor) -> None:
        # torch's checks, CUDA aside
        c = cls._DTYPE_SHAPE_CONSTRAINTS[t.dtype]
        m, n = t.shape
        if t.dim() != 2 or not t.is_contiguous() or m % c.sparse_min_rows or n % c.sparse_min_cols:
            raise RuntimeError(f"CpuSemi: shape {tuple(t.shape)} not supported")

    def _mm(self, B, *, bias=None, should_transpose_dense=False, **kwargs):
        w = self.to_dense()
        if should_transpose_dense:  # (B @ W^T, as torch's linear / addmm dispatch asks)
            out = B @ w.t()
            return out if bias is None else out + bias
        assert bias is None
        return w @ B


def install(monkeypatch) -> None:
    """graphprune's 2:4 pass takes CPU weights and converts them to `CpuSemi`."""
    monkeypatch.setattr(semi24, "_DEVICE_TYPES", ("cuda", "cpu"))
    monkeypatch.setattr(semi24, "_default_convert", CpuSemi.from_dense)
