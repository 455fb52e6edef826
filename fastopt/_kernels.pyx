# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False
"""Bindings of the C kernels (csrc/), generic over the rule list of csrc/fastopt.h.

RULES maps each C rule's name to a CRule (its id, state buffers and hyperparameter fields);
Hyper holds one rule's hyperparameter struct; the engine (_engine.pxi) runs planned batches.
For each C rule there is also a plain binding, `<rule>(param, grad, *state_buffers, fields)`
over 1-D contiguous float32/float64 arrays (None for an unused state buffer), which checks
only what the C layer checks; fastopt.functional is what callers should prefer.
`convention` is TEXTBOOK (0) or TORCH (1), see csrc/fastopt.h.
"""
import numbers

cimport cython
cimport numpy as cnp
from libc.stdint cimport int64_t, uint16_t, uint64_t, uintptr_t
from libc.string cimport memcpy, memset

cnp.import_array()

TEXTBOOK = FO_TEXTBOOK
TORCH = FO_TORCH
API_VERSION = FO_API_VERSION

cdef enum:
    MAX_PARAMS_SIZE = 512  # bytes: room for any rule's fo_<rule>_params


class HyperparameterError(ValueError):
    """A hyperparameter the C rule refuses: .field (the C struct's field), .requirement."""

    def __init__(self, field, requirement, value):
        self.field, self.requirement, self.value = field, requirement, value
        super().__init__(f"invalid hyperparameter {field}: {value} ({requirement})")


cdef int _check(int status) except -1:
    if status == FO_OK:
        return 0
    message = fo_strerror(status).decode()
    if status == FO_ERR_NULL or status == FO_ERR_DTYPE:
        raise TypeError(message)
    if status == FO_ERR_MEMORY:
        raise MemoryError(message)
    raise ValueError(message)


cdef class CRule:
    """One rule of the C rule list: id, name, state buffer names and hyperparameter fields."""
    cdef readonly int id
    cdef readonly str name
    cdef readonly tuple state
    cdef readonly dict fields       # name -> (fo_field_type, offset)
    cdef readonly size_t params_size
    cdef readonly Py_ssize_t step_offset  # of the `step` field, -1 if the rule has none
    cdef readonly dict double_offsets     # name -> offset of each double field
    cdef readonly bint per_row            # a row rule: its state holds one value per row
    cdef readonly bint factored           # a factored rule: its state is sized by matrices
    cdef readonly bint shaped_state       # either: state not shaped like its parameter

    def __repr__(self):
        return f"<C rule {self.name}: state {self.state}, fields {tuple(self.fields)}>"


cdef dict _read_rules():
    cdef dict rules = {}
    cdef const fo_rule_info *info
    cdef CRule r
    cdef int i, k
    for i in range(FO_N_RULES):
        info = fo_describe(i)
        r = CRule.__new__(CRule)
        r.id = i
        r.name = info.name.decode()
        r.state = tuple(info.state[k].decode() for k in range(info.n_state))
        r.fields = {info.fields[k].name.decode(): (info.fields[k].type, info.fields[k].offset)
                    for k in range(info.n_fields)}
        r.params_size = info.params_size
        r.step_offset = r.fields["step"][1] if "step" in r.fields else -1
        r.double_offsets = {name: f[1] for name, f in r.fields.items() if f[0] == FO_FIELD_DOUBLE}
        r.per_row = info.per_row != 0
        r.factored = info.factored != 0
        r.shaped_state = r.per_row or r.factored
        if r.params_size > MAX_PARAMS_SIZE or 2 + info.n_state > FO_MAX_BUFFERS:
            raise ImportError(f"fastopt: C rule {r.name} does not fit the bindings")
        rules[r.name] = r
    return rules


RULES = _read_rules()


cdef class Hyper:
    """One rule's hyperparameter struct (fo_<rule>_params), set from a dict of its C fields.

    check() validates it in C and returns the mask of state buffers the values use; a refused
    value raises HyperparameterError naming the field.
    """
    cdef CRule rule
    cdef double storage[64]  # MAX_PARAMS_SIZE bytes, aligned for every field type
    cdef readonly unsigned uses
    cdef public bint exact  # its group runs sparse="exact": changed values are checked for it

    def __cinit__(self, CRule rule, dict fields=None):
        self.rule = rule
        memset(self.storage, 0, sizeof(self.storage))
        if fields is not None:
            self.set(fields)

    cdef inline void *data(self) noexcept nogil:
        return <void *>self.storage

    cpdef set(self, dict fields):
        """Set the named fields (unknown names are a bug in the caller: KeyError)."""
        for name, value in fields.items():
            self.set_field(name, value)

    cpdef set_field(self, str name, value):
        kind, offset = self.rule.fields[name]
        cdef char *at = <char *>self.storage + <size_t>offset
        if kind == FO_FIELD_DOUBLE:
            (<double *>at)[0] = value
        elif kind == FO_FIELD_INT:
            (<int *>at)[0] = value
        else:
            (<int64_t *>at)[0] = value

    def get(self, str name):
        kind, offset = self.rule.fields[name]
        cdef char *at = <char *>self.storage + <size_t>offset
        if kind == FO_FIELD_DOUBLE:
            return (<double *>at)[0]
        if kind == FO_FIELD_INT:
            return (<int *>at)[0]
        return (<int64_t *>at)[0]

    cpdef unsigned check(self) except? 0xFFFFFFFF:
        cdef fo_error err
        cdef unsigned uses = 0
        if fo_check(self.rule.id, self.data(), &uses, &err) != FO_OK:
            field = err.field.decode()
            raise HyperparameterError(field, err.requirement.decode(), self.get(field))
        self.uses = uses
        return uses

    def check_exact(self, str name):
        """Raise ValueError unless sparse="exact" has a closed form for the rule with these
        values (fo_check_exact); name: the optimizer's, for the message."""
        cdef fo_error err
        self.exact = True
        if fo_check_exact(self.rule.id, self.data(), &err) == FO_OK:
            return
        if err.field == NULL:
            self.check()
            return
        field = err.field.decode()
        if field == "rule":
            raise ValueError(f'sparse="exact": {name} has no closed form for the steps a row '
                             'missed; use sparse="lazy"')
        raise ValueError(f'sparse="exact": {name} with {field}={self.get(field)!r} has no closed '
                         'form for the steps a row missed; use sparse="lazy" (or '
                         f'{field}=0)')

    def copy(self):
        cdef Hyper h = Hyper(self.rule)
        memcpy(h.storage, self.storage, sizeof(self.storage))
        h.uses = self.uses
        h.exact = self.exact
        return h

    def used_state(self):
        """The state buffer names in the kernel's order, None where the values leave one unused."""
        return tuple(name if (self.uses >> k) & 1 else None
                     for k, name in enumerate(self.rule.state))


cdef inline int _run(int rule, bint f64, size_t count, void ***ptrs, int n_bufs, size_t *n,
                     void *hp) noexcept nogil:
    """fo_step over pointer tables of one dtype (_typed, of _kernels.pxd)."""
    return _typed(rule, FO_FLOAT64 if f64 else FO_FLOAT32, count, ptrs, n_bufs, n, hp)


cdef int _raise_for(int status, Hyper hyper) except -1:
    """A call's status as an exception; a refused hyperparameter is named by hyper.check()."""
    if status == FO_ERR_HYPERPARAM:
        hyper.check()
        hyper.check_exact(hyper.rule.name)
    return _check(status)


cdef inline void *_data_or_null(object a):
    return NULL if a is None else cnp.PyArray_DATA(<cnp.ndarray>a)


cdef class PlainBinding:
    """fastopt._kernels.<rule>(param, grad, *state_buffers, fields): one C call on 1-D
    contiguous arrays of one dtype (None for an unused state buffer), checked only as far as
    the C layer checks."""
    cdef CRule rule
    cdef readonly str __name__

    def __cinit__(self, CRule rule):
        self.rule = rule
        self.__name__ = rule.name

    def __call__(self, param, grad, *rest):
        rule = self.rule
        if len(rest) != len(rule.state) + 1:
            raise TypeError(f"{rule.name}() takes param, grad, {', '.join(rule.state)} and the "
                            "hyperparameter dict")
        state = rest[:len(rest) - 1]
        cdef Hyper hp = Hyper(rule, rest[len(rest) - 1])
        arrays = [param, grad, *state]
        dtype = None
        for a in arrays:
            if a is None:
                continue
            if not isinstance(a, cnp.ndarray) or a.ndim != 1 or not a.flags.c_contiguous \
                    or a.dtype not in (cnp.dtype("float32"), cnp.dtype("float64")):
                raise TypeError("buffers must be 1-D C-contiguous float32/float64 arrays")
            if dtype is None:
                dtype = a.dtype
            elif a.dtype != dtype:
                raise TypeError(f"buffers of {a.dtype} and {dtype}")
            if len(a) != len(param):
                raise ValueError(f"buffer of {len(a)} elements where {len(param)} were expected")
        for a in [param, *state]:
            if a is not None and not a.flags.writeable:
                raise ValueError("a written buffer is read-only")
        cdef void *addr[8]
        cdef void **ptrs[8]
        cdef int k, n_bufs = len(arrays)
        for k in range(n_bufs):
            addr[k] = _data_or_null(arrays[k])
            ptrs[k] = &addr[k]
        cdef size_t n = len(param)
        cdef bint f64 = dtype.itemsize == 8
        cdef int status
        with nogil:
            status = _run(rule.id, f64, 1, ptrs, n_bufs, &n, hp.data())
        _raise_for(status, hp)


for _rule in RULES.values():
    globals()[_rule.name] = PlainBinding(_rule)
del _rule


@cython.boundscheck(False)
def first_overlap(list written, list read):
    """Return (i, j) for the first pair of overlapping buffers, or None.

    i indexes `written` and j indexes `written + read` (j == i never); buffers in `read` may
    overlap one another.  Every entry must be a numpy array.  O(k log k) in the buffer count.
    """
    cdef list spans = []
    cdef Py_ssize_t k
    cdef cnp.ndarray a
    cdef size_t start
    for k, a in enumerate(written + read):
        if cnp.PyArray_NBYTES(a) > 0:
            start = <size_t>cnp.PyArray_DATA(a)
            spans.append((start, start + <size_t>cnp.PyArray_NBYTES(a), k))
    spans.sort()
    cdef Py_ssize_t n_written = len(written)
    cdef size_t end_written = 0, end_any = 0
    cdef Py_ssize_t last_written = -1, last_any = -1
    cdef size_t s, e
    for s, e, k in spans:
        # spans sorted by start: one overlaps an earlier one iff it starts before that one's end
        if s < end_written:
            return (last_written, k)
        if k < n_written and s < end_any:
            return (k, last_any)
        if e > end_any:
            end_any, last_any = e, k
        if k < n_written and e > end_written:
            end_written, last_written = e, k
    return None


# ---- threads and instruction set ---------------------------------------------------------

def set_num_threads(int n):
    """Threads that a large step may use (1..256).  Results do not depend on it."""
    if fo_set_num_threads(n) != FO_OK:
        raise ValueError(f"num_threads must be in 1..256, got {n}")


def get_num_threads():
    return fo_get_num_threads()


def blas_threads_address():
    """The address of fo_blas_threads, OpenBLAS's threads callback (config.share_blas_threads)."""
    return <uintptr_t>&fo_blas_threads


cdef extern from *:
    """
    #ifndef FO_BUILD_FLAGS
    #define FO_BUILD_FLAGS "unknown"
    #endif
    """
    const char *FO_BUILD_FLAGS

BUILD_FLAGS = FO_BUILD_FLAGS.decode()


cdef extern from *:
    """
    /* csrc/internal.h's (not in the public header) */
    int fo_step_planned(int rule, const fo_batch *batch, const void *hp,
                        const fo_step_options *opt, fo_error *err);
    void fo_round_to_bfloat16(uint16_t *dst, const float *src, size_t n);
    """
    int fo_step_planned(int rule, const fo_batch *batch, const void *hp,
                        const fo_step_options *opt, fo_error *err) noexcept nogil
    void fo_round_to_bfloat16(uint16_t *dst, const float *src, size_t n) noexcept nogil


def round_to_bfloat16(cnp.ndarray src, cnp.ndarray dst):
    """dst[...] = src rounded as a step's bfloat16 stores round to nearest (subnormals flushed):
    src a C-contiguous float32 array, dst a C-contiguous bfloat16 (2-byte) array of its size."""
    if cnp.PyArray_TYPE(src) != cnp.NPY_FLOAT32 or not cnp.PyArray_IS_C_CONTIGUOUS(src) \
            or not cnp.PyArray_IS_C_CONTIGUOUS(dst) or cnp.PyArray_ITEMSIZE(dst) != 2 \
            or not cnp.PyArray_ISWRITEABLE(dst) or cnp.PyArray_SIZE(dst) != cnp.PyArray_SIZE(src):
        raise TypeError("round_to_bfloat16 takes a C-contiguous float32 array and a writeable "
                        "C-contiguous 2-byte array of its size")
    cdef size_t n = <size_t>cnp.PyArray_SIZE(src)
    cdef const float *s = <const float *>cnp.PyArray_DATA(src)
    cdef uint16_t *d = <uint16_t *>cnp.PyArray_DATA(dst)
    with nogil:
        fo_round_to_bfloat16(d, s, n)


cdef inline int _step_call(int rule, const fo_batch *batch, const void *hp,
                           const fo_step_options *opt, bint planned) noexcept nogil:
    """fo_step_with, or for a planned batch (its buffers checked by the plan) fo_step_planned."""
    return fo_step_planned(rule, batch, hp, opt, NULL) if planned else \
        fo_step_with(rule, batch, hp, opt, NULL)

# a row rule's rows hold at most this many elements when staged (bfloat16 or master weights)
ROW_STAGING = FO_ROW_STAGING


def isa():
    """The instruction set of the kernels in use: 'baseline', 'avx2' or 'avx512'."""
    return fo_isa().decode()


def bf16_path():
    """How bfloat16 values are rounded to nearest: 'avx512bf16' (VCVTNEPS2BF16) or 'integer'."""
    return fo_bf16_path().decode()


def random_path():
    """How stochastic rounding's ARS-7 bits are computed: 'vaes512', 'vaes256', 'aesni'
    or 'portable'."""
    return fo_random_path().decode()


cdef inline float *_fdata(float[::1] buf) noexcept nogil:
    return &buf[0] if buf.shape[0] > 0 else NULL


def stream(float[::1] p, float[::1] g, float[::1] m, float[::1] v):
    """p += g; m += g; v += g: the memory traffic of a rule with two state buffers, with trivial
    arithmetic (the benchmark's bandwidth ceiling), split across threads like the kernels."""
    cdef Py_ssize_t n = p.shape[0]
    if g.shape[0] != n or m.shape[0] != n or v.shape[0] != n:
        raise ValueError("stream: buffers of different lengths")
    with nogil:
        fo_stream_f32(_fdata(p), _fdata(g), _fdata(m), _fdata(v), n)


# ---- the cimport API (declared in _kernels.pxd) ----

cdef int step(int rule, const fo_batch *batch, const void *hp, fo_error *err) noexcept nogil:
    return fo_step(rule, batch, hp, err)


include "_passes.pxi"
include "_schedules.pxi"
include "_engine.pxi"
