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


def _aes_sbox():
    """AES's S-box from its definition (FIPS-197): the inverse in GF(2^8), then the affine map."""
    def times(a, b):
        p = 0
        while b:
            if b & 1:
                p ^= a
            a = ((a << 1) ^ (0x11B if a & 0x80 else 0)) & 0xFF
            b >>= 1
        return p
    inverse = [0] + [next(y for y in range(1, 256) if times(x, y) == 1) for x in range(1, 256)]
    rot = lambda b, r: ((b << r) | (b >> (8 - r))) & 0xFF
    return np.array([b ^ rot(b, 1) ^ rot(b, 2) ^ rot(b, 3) ^ rot(b, 4) ^ 0x63 for b in inverse],
                    dtype=np.uint8)


SBOX = _aes_sbox()
# byte 4c + r of the state is row r of column c; ShiftRows rotates row r left by r columns
SHIFT_ROWS = np.array([4 * ((c + r) % 4) + r for c in range(4) for r in range(4)])


def _xtime(a):
    return ((a << np.uint8(1)) ^ np.where(a & np.uint8(0x80), np.uint8(0x1B), np.uint8(0))).astype(np.uint8)


def _aes_round(state, round_key, last):
    """x86's AESENC (AESENCLAST if last) on rows of 16 state bytes."""
    s = SBOX[state[:, SHIFT_ROWS]]
    if not last:
        col = s.reshape(-1, 4, 4)
        a0, a1, a2, a3 = (col[:, :, r] for r in range(4))
        # the MixColumns matrix rows (2 3 1 1), (1 2 3 1), (1 1 2 3), (3 1 1 2); 3a = 2a ^ a
        mixed = np.stack([_xtime(a0) ^ _xtime(a1) ^ a1 ^ a2 ^ a3,
                          a0 ^ _xtime(a1) ^ _xtime(a2) ^ a2 ^ a3,
                          a0 ^ a1 ^ _xtime(a2) ^ _xtime(a3) ^ a3,
                          _xtime(a0) ^ a0 ^ a1 ^ a2 ^ _xtime(a3)], axis=2)
        s = mixed.reshape(-1, 16)
    return s ^ round_key


def ars7_words(key, n):
    """Words 0 .. n-1 of ARS-7 (Salmon et al. 2011) under the 64-bit key: word w is 32-bit word
    w % 4 (little-endian) of the encryption of counter block w // 4."""
    blocks = (n + 3) // 4
    state = np.zeros((blocks, 16), dtype=np.uint8)
    state[:, :4] = np.arange(blocks, dtype="<u4").view(np.uint8).reshape(-1, 4)
    lo, hi = key, 0
    for r in range(8):  # the key's XOR, six AESENC rounds, AESENCLAST
        round_key = np.frombuffer(lo.to_bytes(8, "little") + hi.to_bytes(8, "little"), np.uint8)
        state = state ^ round_key if r == 0 else _aes_round(state, round_key, last=(r == 7))
        lo, hi = (lo + 0x9E3779B97F4A7C15) & M64, (hi + 0xBB67AE8584CAA73B) & M64
    return np.ascontiguousarray(state).view("<u4").reshape(-1)[:n].astype(np.uint32)


def random_bits(seed, index, step, stream, n):
    """uint32 array of n values in [0, 2^16) (n < 2^32: one key).  Streams: the rule's state
    buffers 0, 1, ..., n_state - 1 in order, the parameter n_state, the EMA n_state + 1; streams
    2q and 2q + 1 take the low and the high half of ARS-7's words keyed by pair q."""
    key = _absorb(_absorb(_absorb(_absorb(seed, step), index), stream // 2), 0)
    h = ars7_words(key, n)
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
