"""bfloat16 rounding and the keyed generator, written from the README ("bfloat16 storage") in
plain numpy, sharing nothing with fastopt.

round_bf16(x, "nearest") and round_bf16(x, "stochastic", bits) return bfloat16 bit patterns
(uint16) of float32 values; random_bits(seed, index, step, stream, n) are the 16-bit numbers
stochastic rounding adds to elements 0..n-1 of buffer `buffer` of parameter `index` at `step`.
"""
import numpy as np

M64 = (1 << 64) - 1


def _mix64(x):
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & M64
    return x ^ (x >> 31)


def _absorb(key, x):
    return _mix64(((key ^ x) + 0x9E3779B97F4A7C15) & M64)


def _h32(x):
    x = x.astype(np.uint32)
    x = (x ^ (x >> np.uint32(16))) * np.uint32(0x21F0AAAD)
    x = (x ^ (x >> np.uint32(15))) * np.uint32(0x735A2D97)
    return x ^ (x >> np.uint32(15))


def random_bits(seed, index, step, stream, n):
    """uint32 array of n values in [0, 2^16) (n < 2^32: one key).  Streams: the rule's state
    buffers 0, 1, ..., n_state - 1 in order, the parameter n_state, the EMA n_state + 1; streams
    2q and 2q + 1 take the low and the high half of the hash keyed by pair q."""
    key = _absorb(_absorb(_absorb(_absorb(seed, step), index), stream // 2), 0)
    e = np.arange(n, dtype=np.uint32)
    k0, k1 = np.uint32(key & 0xFFFFFFFF), np.uint32(key >> 32)
    h = _h32(_h32(e ^ k0) ^ k1)
    return h >> np.uint32(16) if stream % 2 else h & np.uint32(0xFFFF)


def round_bf16(x, mode, bits=None):
    """float32 array -> uint16 bfloat16 bits."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).copy()
    nan = (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    subnormal = (u & np.uint32(0x7F800000)) == 0
    u[subnormal] &= np.uint32(0x80000000)
    if mode == "nearest":
        rounded = u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))
    else:
        rounded = u + bits.astype(np.uint32)
    out = (rounded >> np.uint32(16)).astype(np.uint16)
    out[nan] = ((u[nan] >> np.uint32(16)) | np.uint32(0x40)).astype(np.uint16)
    return out


def widen(bits16):
    """uint16 bfloat16 bits -> float32 values."""
    return (bits16.astype(np.uint32) << np.uint32(16)).view(np.float32)
