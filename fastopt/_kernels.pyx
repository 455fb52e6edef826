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


cdef inline int _same_length(Py_ssize_t n, Py_ssize_t other) except -1:
    if other != n:
        raise ValueError(f"buffer of {other} elements where {n} were expected")
    return 0


def sgd(floating[::1] param, const floating[::1] grad, floating[::1] momentum_buffer, *,
        double lr, double momentum, double dampening, double weight_decay, bint nesterov,
        bint maximize, int convention, int64_t step):
    cdef fo_sgd_params hp
    hp.lr, hp.momentum, hp.dampening, hp.weight_decay = lr, momentum, dampening, weight_decay
    hp.nesterov, hp.maximize, hp.convention, hp.step = nesterov, maximize, convention, step
    cdef Py_ssize_t n = param.shape[0]
    cdef floating *buf = NULL
    _same_length(n, grad.shape[0])
    if momentum_buffer is not None:
        _same_length(n, momentum_buffer.shape[0])
        buf = _data(momentum_buffer)
    cdef int status
    with nogil:
        if floating is float:
            status = fo_sgd_f32(_data(param), _cdata(grad), buf, n, &hp)
        else:
            status = fo_sgd_f64(_data(param), _cdata(grad), buf, n, &hp)
    _check(status)


def adagrad(floating[::1] param, const floating[::1] grad, floating[::1] sum, *,
            double lr, double eps, double weight_decay, bint maximize, int convention):
    cdef fo_adagrad_params hp
    hp.lr, hp.eps, hp.weight_decay, hp.maximize, hp.convention = (
        lr, eps, weight_decay, maximize, convention)
    cdef Py_ssize_t n = param.shape[0]
    _same_length(n, grad.shape[0])
    _same_length(n, sum.shape[0])
    cdef int status
    with nogil:
        if floating is float:
            status = fo_adagrad_f32(_data(param), _cdata(grad), _data(sum), n, &hp)
        else:
            status = fo_adagrad_f64(_data(param), _cdata(grad), _data(sum), n, &hp)
    _check(status)


def adadelta(floating[::1] param, const floating[::1] grad, floating[::1] square_avg,
             floating[::1] acc_delta, *, double lr, double rho, double eps, double weight_decay,
             bint maximize):
    cdef fo_adadelta_params hp
    hp.lr, hp.rho, hp.eps, hp.weight_decay, hp.maximize = lr, rho, eps, weight_decay, maximize
    cdef Py_ssize_t n = param.shape[0]
    _same_length(n, grad.shape[0])
    _same_length(n, square_avg.shape[0])
    _same_length(n, acc_delta.shape[0])
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
            floating[::1] grad_avg, floating[::1] momentum_buffer, *, double lr, double rho,
            double eps, double weight_decay, double momentum, bint centered, bint maximize,
            int convention):
    cdef fo_rmsprop_params hp
    hp.lr, hp.rho, hp.eps, hp.weight_decay, hp.momentum = lr, rho, eps, weight_decay, momentum
    hp.centered, hp.maximize, hp.convention = centered, maximize, convention
    cdef Py_ssize_t n = param.shape[0]
    cdef floating *avg = NULL
    cdef floating *buf = NULL
    _same_length(n, grad.shape[0])
    _same_length(n, square_avg.shape[0])
    if grad_avg is not None:
        _same_length(n, grad_avg.shape[0])
        avg = _data(grad_avg)
    if momentum_buffer is not None:
        _same_length(n, momentum_buffer.shape[0])
        buf = _data(momentum_buffer)
    cdef int status
    with nogil:
        if floating is float:
            status = fo_rmsprop_f32(_data(param), _cdata(grad), _data(square_avg), avg, buf, n, &hp)
        else:
            status = fo_rmsprop_f64(_data(param), _cdata(grad), _data(square_avg), avg, buf, n, &hp)
    _check(status)


def adam(floating[::1] param, const floating[::1] grad, floating[::1] m, floating[::1] v,
         floating[::1] max_v, *, double lr, double beta1, double beta2, double eps,
         double weight_decay, bint amsgrad, bint decoupled_weight_decay, bint maximize,
         int convention, int64_t step):
    cdef fo_adam_params hp
    hp.lr, hp.beta1, hp.beta2, hp.eps, hp.weight_decay = lr, beta1, beta2, eps, weight_decay
    hp.amsgrad, hp.decoupled_weight_decay, hp.maximize = amsgrad, decoupled_weight_decay, maximize
    hp.convention, hp.step = convention, step
    cdef Py_ssize_t n = param.shape[0]
    cdef floating *vmax = NULL
    _same_length(n, grad.shape[0])
    _same_length(n, m.shape[0])
    _same_length(n, v.shape[0])
    if max_v is not None:
        _same_length(n, max_v.shape[0])
        vmax = _data(max_v)
    cdef int status
    with nogil:
        if floating is float:
            status = fo_adam_f32(_data(param), _cdata(grad), _data(m), _data(v), vmax, n, &hp)
        else:
            status = fo_adam_f64(_data(param), _cdata(grad), _data(m), _data(v), vmax, n, &hp)
    _check(status)


def adamax(floating[::1] param, const floating[::1] grad, floating[::1] m, floating[::1] u, *,
           double lr, double beta1, double beta2, double eps, double weight_decay,
           bint maximize, int convention, int64_t step):
    cdef fo_adamax_params hp
    hp.lr, hp.beta1, hp.beta2, hp.eps, hp.weight_decay = lr, beta1, beta2, eps, weight_decay
    hp.maximize, hp.convention, hp.step = maximize, convention, step
    cdef Py_ssize_t n = param.shape[0]
    _same_length(n, grad.shape[0])
    _same_length(n, m.shape[0])
    _same_length(n, u.shape[0])
    cdef int status
    with nogil:
        if floating is float:
            status = fo_adamax_f32(_data(param), _cdata(grad), _data(m), _data(u), n, &hp)
        else:
            status = fo_adamax_f64(_data(param), _cdata(grad), _data(m), _data(u), n, &hp)
    _check(status)


def nadam(floating[::1] param, const floating[::1] grad, floating[::1] m, floating[::1] v, *,
          double lr, double beta1, double beta2, double eps, double weight_decay,
          double momentum_decay, double mu_product, bint decoupled_weight_decay, bint maximize,
          int convention, int64_t step):
    cdef fo_nadam_params hp
    hp.lr, hp.beta1, hp.beta2, hp.eps, hp.weight_decay = lr, beta1, beta2, eps, weight_decay
    hp.momentum_decay, hp.mu_product = momentum_decay, mu_product
    hp.decoupled_weight_decay, hp.maximize = decoupled_weight_decay, maximize
    hp.convention, hp.step = convention, step
    cdef Py_ssize_t n = param.shape[0]
    _same_length(n, grad.shape[0])
    _same_length(n, m.shape[0])
    _same_length(n, v.shape[0])
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
