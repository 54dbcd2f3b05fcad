"""The dropout mask every kernel draws, forward and backward alike: never stored, drawn again from its seed.

Element (row, col) of an [M, N] tensor is kept where its uniform draw is >= p. One Philox call gives four 32-bit
numbers, so counter ``row * ceil(N / 4) + q`` gives columns 4q..4q+3 of its row (one number
each, in a fixed order). A tile starting on a multiple of 4 columns draws exactly its own elements' numbers, so
the mask depends on the seed and the element, not on the tile shapes or the number of rows. Counters
are int64 (M * N / 4 may pass 2**31). A quarter of a Philox call per element: the LayerNorm kernels' one call per
element (``tl.rand``) was their costliest arithmetic.

The seed is read from memory (``seed_ptr``, a [1] int64 tensor), not passed as a launch argument: a CUDA graph
replays its launches' arguments as captured, but a seed drawn on the device inside the graph is new each replay.
Its low 32 bits are the Philox key (a 64-bit key cost the fp32 GEMM's dropout epilogue a spill on sm_90).
"""

import triton
import triton.language as tl


@triton.jit
def load_seed(seed_ptr):
    """The dropout seed at ``seed_ptr``: its low 32 bits."""
    return tl.load(seed_ptr).to(tl.uint32)


@triton.jit
def keep_mask(seed, rows, col_start, N, p, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The keep mask [BLOCK_M, BLOCK_N] of rows ``rows`` [BLOCK_M] (int64) and columns col_start.. (a multiple of
    4) of an N-column tensor."""
    quads = col_start // 4 + tl.arange(0, BLOCK_N // 4)
    counters = rows[:, None] * ((N + 3) // 4) + quads[None, :]
    r0, r1, r2, r3 = tl.randint4x(seed, counters)
    r = tl.reshape(tl.join(tl.join(r0, r1), tl.join(r2, r3)), (BLOCK_M, BLOCK_N))  # columns 4q..4q+3: r0, r2, r1, r3
    return tl.uint_to_uniform_float(r) >= p
