"""Kernels the compile-gate test builds: one that passes and one per way to fail the gate.

Every one runs under the Triton interpreter, which is why the gate must compile for real.
Imported only by the gate subprocess (``--module tests.tools.gate_fixture_kernels``), so
these never enter the registry of the test process itself.
"""

from fastlm._triton import tl, triton
from fastlm.kernel_registry import Variant, register_kernel


@triton.jit
def _matmul_tile(A, B, C, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """C[BLOCK_M, BLOCK_N] = A[BLOCK_M, K] @ B[K, BLOCK_N], row-major, K a multiple of BLOCK_K.

    A device function: compiled inside the kernels that call it, so it needs no declaration.
    """
    rm = tl.arange(0, BLOCK_M)
    rn = tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        a = tl.load(A + rm[:, None] * K + (k + rk)[None, :])
        b = tl.load(B + (k + rk)[:, None] * BLOCK_N + rn[None, :])
        acc = tl.dot(a, b, acc)
    tl.store(C + rm[:, None] * BLOCK_N + rn[None, :], acc)


def _matmul_variant(block_m, block_n, block_k, num_stages, label):
    return Variant(
        {"A": "*fp16", "B": "*fp16", "C": "*fp32", "K": "i32"},
        dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k),
        num_warps=4, num_stages=num_stages, label=label, divisible_by_16=("K",),
    )


@triton.jit
def _matmul_kernel(A, B, C, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    _matmul_tile(A, B, C, K, BLOCK_M, BLOCK_N, BLOCK_K)


# Passes: a 64x64 fp16 tile issues wgmma on Hopper.
register_kernel(_matmul_kernel, variants=lambda: [_matmul_variant(64, 64, 64, 3, "fits")], tensor_cores=True)


@triton.jit
def _smem_hog_kernel(A, B, C, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    _matmul_tile(A, B, C, K, BLOCK_M, BLOCK_N, BLOCK_K)


# Fails: 10 pipeline stages of 64x128 + 128x64 fp16 operand tiles need about 320 KiB of shared memory.
register_kernel(
    _smem_hog_kernel, variants=lambda: [_matmul_variant(64, 64, 128, 10, "10 stages")], tensor_cores=True
)


@triton.jit
def _runtime_shape_kernel(X, N):
    # Fails: tl.arange needs constexpr bounds; the interpreter takes a runtime N anyway.
    offs = tl.arange(0, N)
    tl.store(X + offs, tl.load(X + offs) + 1)


register_kernel(_runtime_shape_kernel, variants=lambda: [Variant({"X": "*fp32", "N": "i32"}, label="runtime N")])


@triton.jit
def _spilling_kernel(X, Y, BLOCK: tl.constexpr):
    # Fails: one warp keeps a 16384-element fp32 row live across its sum, 512 values a thread.
    offs = tl.arange(0, BLOCK)
    x = tl.load(X + offs)
    tl.store(Y + offs, x / tl.sum(x, axis=0))


register_kernel(
    _spilling_kernel,
    variants=lambda: [Variant({"X": "*fp32", "Y": "*fp32"}, dict(BLOCK=16384), num_warps=1, label="16k row")],
)


@triton.jit
def _no_dot_kernel(X, Y, BLOCK: tl.constexpr):
    # Fails: declared tensor_cores=True but only copies.
    offs = tl.arange(0, BLOCK)
    tl.store(Y + offs, tl.load(X + offs))


register_kernel(
    _no_dot_kernel, variants=lambda: [Variant({"X": "*fp16", "Y": "*fp16"}, dict(BLOCK=1024))], tensor_cores=True
)


@triton.jit
def _misdeclared_kernel(X, Y, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(Y + offs, tl.load(X + offs))


# Fails: the variant leaves out the argument Y.
register_kernel(_misdeclared_kernel, variants=lambda: [Variant({"X": "*fp32"}, dict(BLOCK=64), label="no Y")])
