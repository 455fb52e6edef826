"""FlatParams: many parameters packed into one contiguous buffer, for one-call steps."""
import math

import numpy as np

from fastopt import _checks

_ALIGN_BYTES = 64  # each view starts on a cache line, so no two views share one


class FlatParams:
    """One buffer (`data`) holding many parameters, and one (`grad`) for their gradients.

        flat = FlatParams.from_arrays(model_arrays)     # or FlatParams(shapes, np.float32)
        weights = flat.params                           # views into flat.data: use these
        opt = fastopt.<Rule>([flat.data])                 # any optimizer class
        ...                                             # write gradients into flat.grads[i]
        opt.step([flat.grad])                           # one kernel call for the whole model

    The padding between views stays zero in both buffers, so no rule moves it.  Parameters
    that need different hyperparameters go in separate FlatParams (one per param group).
    """

    def __init__(self, shapes, dtype=np.float32):
        dtype = np.dtype(dtype)
        if dtype not in _checks.FLOAT_DTYPES:
            raise TypeError(f"dtype must be float32 or float64, got {dtype}")
        self.shapes = [tuple(int(d) for d in s) for s in shapes]
        if not self.shapes:
            raise ValueError("FlatParams needs at least one shape")
        for s in self.shapes:
            if any(d < 0 for d in s):
                raise ValueError(f"negative dimension in shape {s}")
        step = _ALIGN_BYTES // dtype.itemsize
        self.offsets, total = [], 0
        for s in self.shapes:
            self.offsets.append(total)
            total += -(-math.prod(s) // step) * step
        self.data = _aligned_zeros(total, dtype)
        self.grad = _aligned_zeros(total, dtype)
        self.params = self._views(self.data)
        self.grads = self._views(self.grad)

    @classmethod
    def from_arrays(cls, arrays, dtype=None):
        """Pack copies of `arrays` (dtype: theirs, which must agree, unless given)."""
        arrays = [np.asarray(a) for a in arrays]
        if dtype is None:
            dtypes = {a.dtype for a in arrays}
            if len(dtypes) != 1:
                raise TypeError(f"arrays of several dtypes {sorted(map(str, dtypes))}; pass dtype=")
            dtype = dtypes.pop()
        flat = cls([a.shape for a in arrays], dtype)
        for view, a in zip(flat.params, arrays):
            view[...] = a
        return flat

    def _views(self, buf):
        return [buf[o:o + math.prod(s)].reshape(s) for o, s in zip(self.offsets, self.shapes)]

    def __len__(self):
        return len(self.shapes)

    def __repr__(self):
        return (f"FlatParams({len(self)} params, {self.data.size} elements of "
                f"{self.data.dtype})")


def _aligned_zeros(n, dtype):
    raw = np.zeros(n * dtype.itemsize + _ALIGN_BYTES, np.uint8)
    start = -raw.ctypes.data % _ALIGN_BYTES
    return raw[start:start + n * dtype.itemsize].view(dtype)
