"""FlatParams: many parameters packed into one contiguous buffer, for one-call steps."""
import math
import numbers

import numpy as np

from fastopt import _checks

_ALIGN_BYTES = 64  # each view starts on a cache line, so no two views share one


class FlatParams:
    """One buffer (`data`) holding many parameters, and one (`grad`) for their gradients.

        flat = FlatParams.from_arrays(model_arrays)     # or FlatParams(shapes, np.float32)
        weights = flat.params                           # views into flat.data: use these
        opt = fastopt.<Rule>([flat.data])                 # an element-wise rule (below)
        ...                                             # write gradients into flat.grads[i]
        opt.step([flat.grad])                           # one kernel call for the whole model

    The padding between views stays zero in both buffers, so no rule moves it.  Parameters
    that need different hyperparameters go in separate FlatParams (one per param group).
    A rule that works per tensor (trust ratios, factored moments, rows; the README names
    them) would see the whole buffer as one tensor: give it the parameters themselves.
    """

    def __init__(self, shapes, dtype=np.float32):
        dtype = np.dtype(dtype)
        if dtype not in _checks.FLOAT_DTYPES:
            raise TypeError(f"dtype must be float32 or float64, got {dtype}")
        self.shapes = _checked_shapes(shapes)
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
        """Pack copies of `arrays` (dtype: theirs, which must agree, unless given).  Converting
        to `dtype` must keep every value: no complex numbers, none past the dtype's range."""
        arrays = [np.asarray(a) for a in arrays]
        if dtype is None:
            dtypes = {a.dtype for a in arrays}
            if len(dtypes) > 1:
                raise TypeError(f"arrays of several dtypes {sorted(map(str, dtypes))}; pass dtype=")
            # none: the constructor refuses the empty list
            dtype = dtypes.pop() if dtypes else np.float32
        flat = cls([a.shape for a in arrays], dtype)
        dtype = flat.data.dtype
        for i, (view, a) in enumerate(zip(flat.params, arrays)):
            # same_kind: integers and wider floats are numbers the dtype holds (within its
            # range); complex, strings and objects are not
            if not np.can_cast(a.dtype, dtype, casting="same_kind"):
                raise TypeError(f"arrays[{i}] has dtype {a.dtype}, whose values {dtype} cannot "
                                "hold (pass real numbers)")
            with np.errstate(over="ignore"):  # a value past the range: the ValueError below
                view[...] = a
            if np.count_nonzero(np.isinf(view)) != np.count_nonzero(np.isinf(a)):
                raise ValueError(f"arrays[{i}] has values beyond {dtype}'s range "
                                 f"(largest {np.finfo(dtype).max:.8g})")
        return flat

    def _views(self, buf):
        return [buf[o:o + math.prod(s)].reshape(s) for o, s in zip(self.offsets, self.shapes)]

    def __len__(self):
        return len(self.shapes)

    def __repr__(self):
        return (f"FlatParams({len(self)} params, {self.data.size} elements of "
                f"{self.data.dtype})")


def _checked_shapes(shapes):
    """`shapes` as a list of tuples of ints, refusing anything that is not one (a float
    dimension is not truncated, a bare int is not a shape)."""
    try:
        shapes = list(shapes)
    except TypeError:
        raise TypeError(f"shapes must be a list of shapes, got {type(shapes).__name__}") from None
    if not shapes:
        raise ValueError("FlatParams needs at least one parameter (a shape, or an array)")
    checked = []
    for i, shape in enumerate(shapes):
        try:
            dims = tuple(shape)
        except TypeError:
            raise TypeError(f"shapes[{i}] must be a tuple of ints, got {shape!r}") from None
        if not all(isinstance(d, numbers.Integral) and not isinstance(d, (bool, np.bool_))
                   for d in dims):
            raise TypeError(f"shapes[{i}] must be a tuple of ints, got {shape!r}")
        if any(d < 0 for d in dims):
            raise ValueError(f"negative dimension in shapes[{i}]: {dims}")
        checked.append(tuple(int(d) for d in dims))
    return checked


def _aligned_zeros(n, dtype):
    raw = np.zeros(n * dtype.itemsize + _ALIGN_BYTES, np.uint8)
    start = -raw.ctypes.data % _ALIGN_BYTES
    return raw[start:start + n * dtype.itemsize].view(dtype)
