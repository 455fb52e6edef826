# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False
"""Thin bindings of the C kernels (csrc/) for 1-D contiguous float32/float64 buffers.

Each function takes flat, C-contiguous views (`arr.reshape(-1)`), hyperparameters as plain
numbers, and updates param and state in place with the GIL released.  The C layer checks
NULL/overlapping buffers and hyperparameter ranges and this module turns its status into an
exception; shape, dtype and every other check belong to fastopt.functional, which callers
should prefer.  `convention` is FO_TEXTBOOK (0) or FO_TORCH (1), see csrc/fastopt.h.
"""
cimport cython
cimport numpy as cnp
from cython cimport floating
from libc.stdint cimport int64_t

cnp.import_array()

TEXTBOOK = FO_TEXTBOOK
TORCH = FO_TORCH
API_VERSION = FO_API_VERSION


cdef int _check(int status) except -1:
    if status == FO_OK:
        return 0
    message = fo_strerror(status).decode()
    if status == FO_ERR_NULL:
        raise TypeError(message)
    raise ValueError(message)


cdef inline floating *_data(floating[::1] buf) noexcept nogil:
    return &buf[0] if buf.shape[0] > 0 else NULL


cdef inline const floating *_cdata(const floating[::1] buf) noexcept nogil:
    return &buf[0] if buf.shape[0] > 0 else NULL


cdef inline floating *_opt(floating[::1] buf):
    """An optional buffer: NULL when not given."""
    return NULL if buf is None else _data(buf)


cdef Py_ssize_t _length(param, tuple others) except -1:
    """The element count of param, which every other buffer given must share."""
    cdef Py_ssize_t n = len(param)
    for other in others:
        if other is not None and len(other) != n:
            raise ValueError(f"buffer of {len(other)} elements where {n} were expected")
    return n


# Each binding takes the rule's hyperparameter struct (csrc/fastopt.h) as a dict with exactly
# its fields; optional state buffers are None when the options leave them unused.

def sgd(floating[::1] param, const floating[::1] grad, floating[::1] momentum_buffer,
        fo_sgd_params hp):
    cdef Py_ssize_t n = _length(param, (grad, momentum_buffer,))
    cdef floating *buf = _opt(momentum_buffer)
    cdef int status
    with nogil:
        if floating is float:
            status = fo_sgd_f32(_data(param), _cdata(grad), buf, n, &hp)
        else:
            status = fo_sgd_f64(_data(param), _cdata(grad), buf, n, &hp)
    _check(status)


def adagrad(floating[::1] param, const floating[::1] grad, floating[::1] sum, fo_adagrad_params hp):
    cdef Py_ssize_t n = _length(param, (grad, sum,))
    cdef int status
    with nogil:
        if floating is float:
            status = fo_adagrad_f32(_data(param), _cdata(grad), _data(sum), n, &hp)
        else:
            status = fo_adagrad_f64(_data(param), _cdata(grad), _data(sum), n, &hp)
    _check(status)


def adadelta(floating[::1] param, const floating[::1] grad, floating[::1] square_avg,
             floating[::1] acc_delta, fo_adadelta_params hp):
    cdef Py_ssize_t n = _length(param, (grad, square_avg, acc_delta,))
    cdef int status
    with nogil:
        if floating is float:
            status = fo_adadelta_f32(_data(param), _cdata(grad), _data(square_avg),
                                     _data(acc_delta), n, &hp)
        else:
            status = fo_adadelta_f64(_data(param), _cdata(grad), _data(square_avg),
                                     _data(acc_delta), n, &hp)
    _check(status)


def rmsprop(floating[::1] param, const floating[::1] grad, floating[::1] square_avg,
            floating[::1] grad_avg, floating[::1] momentum_buffer, fo_rmsprop_params hp):
    cdef Py_ssize_t n = _length(param, (grad, square_avg, grad_avg, momentum_buffer,))
    cdef floating *avg = _opt(grad_avg)
    cdef floating *buf = _opt(momentum_buffer)
    cdef int status
    with nogil:
        if floating is float:
            status = fo_rmsprop_f32(_data(param), _cdata(grad), _data(square_avg), avg, buf, n, &hp)
        else:
            status = fo_rmsprop_f64(_data(param), _cdata(grad), _data(square_avg), avg, buf, n, &hp)
    _check(status)


def adam(floating[::1] param, const floating[::1] grad, floating[::1] m, floating[::1] v,
         floating[::1] max_v, fo_adam_params hp):
    cdef Py_ssize_t n = _length(param, (grad, m, v, max_v,))
    cdef floating *vmax = _opt(max_v)
    cdef int status
    with nogil:
        if floating is float:
            status = fo_adam_f32(_data(param), _cdata(grad), _data(m), _data(v), vmax, n, &hp)
        else:
            status = fo_adam_f64(_data(param), _cdata(grad), _data(m), _data(v), vmax, n, &hp)
    _check(status)


def adamax(floating[::1] param, const floating[::1] grad, floating[::1] m, floating[::1] u,
           fo_adamax_params hp):
    cdef Py_ssize_t n = _length(param, (grad, m, u,))
    cdef int status
    with nogil:
        if floating is float:
            status = fo_adamax_f32(_data(param), _cdata(grad), _data(m), _data(u), n, &hp)
        else:
            status = fo_adamax_f64(_data(param), _cdata(grad), _data(m), _data(u), n, &hp)
    _check(status)


def nadam(floating[::1] param, const floating[::1] grad, floating[::1] m, floating[::1] v,
          fo_nadam_params hp):
    cdef Py_ssize_t n = _length(param, (grad, m, v,))
    cdef int status
    with nogil:
        if floating is float:
            status = fo_nadam_f32(_data(param), _cdata(grad), _data(m), _data(v), n, &hp)
        else:
            status = fo_nadam_f64(_data(param), _cdata(grad), _data(m), _data(v), n, &hp)
    _check(status)


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


cdef extern from *:
    """
    #ifndef FO_BUILD_FLAGS
    #define FO_BUILD_FLAGS "unknown"
    #endif
    """
    const char *FO_BUILD_FLAGS

BUILD_FLAGS = FO_BUILD_FLAGS.decode()


def isa():
    """The instruction set of the kernels in use: 'baseline', 'avx2' or 'avx512'."""
    return fo_isa().decode()



def stream(float[::1] p, const float[::1] g, float[::1] m, float[::1] v):
    """p += g; m += g; v += g: Adam's memory traffic with trivial arithmetic (the benchmark's
    bandwidth ceiling), split across threads like the kernels."""
    cdef Py_ssize_t n = _length(p, (g, m, v))
    with nogil:
        fo_stream_f32(_data(p), _cdata(g), _data(m), _data(v), n)


# ---- the cimport API (declared in _kernels.pxd): thin forwards to the C entry points ----

cdef int sgd_f32(float *param, const float *grad, float *momentum_buffer, size_t n, const fo_sgd_params *hp) noexcept nogil:
    return fo_sgd_f32(param, grad, momentum_buffer, n, hp)


cdef int sgd_f64(double *param, const double *grad, double *momentum_buffer, size_t n, const fo_sgd_params *hp) noexcept nogil:
    return fo_sgd_f64(param, grad, momentum_buffer, n, hp)


cdef int adagrad_f32(float *param, const float *grad, float *sum, size_t n, const fo_adagrad_params *hp) noexcept nogil:
    return fo_adagrad_f32(param, grad, sum, n, hp)


cdef int adagrad_f64(double *param, const double *grad, double *sum, size_t n, const fo_adagrad_params *hp) noexcept nogil:
    return fo_adagrad_f64(param, grad, sum, n, hp)


cdef int adadelta_f32(float *param, const float *grad, float *square_avg, float *acc_delta, size_t n, const fo_adadelta_params *hp) noexcept nogil:
    return fo_adadelta_f32(param, grad, square_avg, acc_delta, n, hp)


cdef int adadelta_f64(double *param, const double *grad, double *square_avg, double *acc_delta, size_t n, const fo_adadelta_params *hp) noexcept nogil:
    return fo_adadelta_f64(param, grad, square_avg, acc_delta, n, hp)


cdef int rmsprop_f32(float *param, const float *grad, float *square_avg, float *grad_avg, float *momentum_buffer, size_t n, const fo_rmsprop_params *hp) noexcept nogil:
    return fo_rmsprop_f32(param, grad, square_avg, grad_avg, momentum_buffer, n, hp)


cdef int rmsprop_f64(double *param, const double *grad, double *square_avg, double *grad_avg, double *momentum_buffer, size_t n, const fo_rmsprop_params *hp) noexcept nogil:
    return fo_rmsprop_f64(param, grad, square_avg, grad_avg, momentum_buffer, n, hp)


cdef int adam_f32(float *param, const float *grad, float *m, float *v, float *max_v, size_t n, const fo_adam_params *hp) noexcept nogil:
    return fo_adam_f32(param, grad, m, v, max_v, n, hp)


cdef int adam_f64(double *param, const double *grad, double *m, double *v, double *max_v, size_t n, const fo_adam_params *hp) noexcept nogil:
    return fo_adam_f64(param, grad, m, v, max_v, n, hp)


cdef int adamax_f32(float *param, const float *grad, float *m, float *u, size_t n, const fo_adamax_params *hp) noexcept nogil:
    return fo_adamax_f32(param, grad, m, u, n, hp)


cdef int adamax_f64(double *param, const double *grad, double *m, double *u, size_t n, const fo_adamax_params *hp) noexcept nogil:
    return fo_adamax_f64(param, grad, m, u, n, hp)


cdef int nadam_f32(float *param, const float *grad, float *m, float *v, size_t n, const fo_nadam_params *hp) noexcept nogil:
    return fo_nadam_f32(param, grad, m, v, n, hp)


cdef int nadam_f64(double *param, const double *grad, double *m, double *v, size_t n, const fo_nadam_params *hp) noexcept nogil:
    return fo_nadam_f64(param, grad, m, v, n, hp)


cdef int sgd_many_f32(size_t count, float *const *param, const float *const *grad, float *const *momentum_buffer, const size_t *n, const fo_sgd_params *hp) noexcept nogil:
    return fo_sgd_many_f32(count, param, grad, momentum_buffer, n, hp)


cdef int sgd_many_f64(size_t count, double *const *param, const double *const *grad, double *const *momentum_buffer, const size_t *n, const fo_sgd_params *hp) noexcept nogil:
    return fo_sgd_many_f64(count, param, grad, momentum_buffer, n, hp)


cdef int adagrad_many_f32(size_t count, float *const *param, const float *const *grad, float *const *sum, const size_t *n, const fo_adagrad_params *hp) noexcept nogil:
    return fo_adagrad_many_f32(count, param, grad, sum, n, hp)


cdef int adagrad_many_f64(size_t count, double *const *param, const double *const *grad, double *const *sum, const size_t *n, const fo_adagrad_params *hp) noexcept nogil:
    return fo_adagrad_many_f64(count, param, grad, sum, n, hp)


cdef int adadelta_many_f32(size_t count, float *const *param, const float *const *grad, float *const *square_avg, float *const *acc_delta, const size_t *n, const fo_adadelta_params *hp) noexcept nogil:
    return fo_adadelta_many_f32(count, param, grad, square_avg, acc_delta, n, hp)


cdef int adadelta_many_f64(size_t count, double *const *param, const double *const *grad, double *const *square_avg, double *const *acc_delta, const size_t *n, const fo_adadelta_params *hp) noexcept nogil:
    return fo_adadelta_many_f64(count, param, grad, square_avg, acc_delta, n, hp)


cdef int rmsprop_many_f32(size_t count, float *const *param, const float *const *grad, float *const *square_avg, float *const *grad_avg, float *const *momentum_buffer, const size_t *n, const fo_rmsprop_params *hp) noexcept nogil:
    return fo_rmsprop_many_f32(count, param, grad, square_avg, grad_avg, momentum_buffer, n, hp)


cdef int rmsprop_many_f64(size_t count, double *const *param, const double *const *grad, double *const *square_avg, double *const *grad_avg, double *const *momentum_buffer, const size_t *n, const fo_rmsprop_params *hp) noexcept nogil:
    return fo_rmsprop_many_f64(count, param, grad, square_avg, grad_avg, momentum_buffer, n, hp)


cdef int adam_many_f32(size_t count, float *const *param, const float *const *grad, float *const *m, float *const *v, float *const *max_v, const size_t *n, const fo_adam_params *hp) noexcept nogil:
    return fo_adam_many_f32(count, param, grad, m, v, max_v, n, hp)


cdef int adam_many_f64(size_t count, double *const *param, const double *const *grad, double *const *m, double *const *v, double *const *max_v, const size_t *n, const fo_adam_params *hp) noexcept nogil:
    return fo_adam_many_f64(count, param, grad, m, v, max_v, n, hp)


cdef int adamax_many_f32(size_t count, float *const *param, const float *const *grad, float *const *m, float *const *u, const size_t *n, const fo_adamax_params *hp) noexcept nogil:
    return fo_adamax_many_f32(count, param, grad, m, u, n, hp)


cdef int adamax_many_f64(size_t count, double *const *param, const double *const *grad, double *const *m, double *const *u, const size_t *n, const fo_adamax_params *hp) noexcept nogil:
    return fo_adamax_many_f64(count, param, grad, m, u, n, hp)


cdef int nadam_many_f32(size_t count, float *const *param, const float *const *grad, float *const *m, float *const *v, const size_t *n, const fo_nadam_params *hp) noexcept nogil:
    return fo_nadam_many_f32(count, param, grad, m, v, n, hp)


cdef int nadam_many_f64(size_t count, double *const *param, const double *const *grad, double *const *m, double *const *v, const size_t *n, const fo_nadam_params *hp) noexcept nogil:
    return fo_nadam_many_f64(count, param, grad, m, v, n, hp)


include "_engine.pxi"
