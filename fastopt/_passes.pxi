# A training step's options (included by _kernels.pyx, after _engine.pxi): the reduction pass
# (fo_norm) over the gradients before the update, and what it decides for the update: the
# gradient multiplier (1 / grad_scale, times the clip factor) that the C rules fold into their
# per-step scalars, or that the step is skipped.
from libc.math cimport sqrt, isinf, INFINITY
from libc.float cimport DBL_MAX
from cpython.object cimport PyObject


cdef extern from "Python.h":
    # a getset_descriptor's C getter (gather_grads calls torch.Tensor's directly: the same
    # function attribute access reaches, without the lookup)
    ctypedef object (*_getter)(object, void *)
    ctypedef struct PyGetSetDef:
        _getter get
        void *closure
    ctypedef struct PyGetSetDescrObject:
        PyGetSetDef *d_getset
    object PyObject_CallOneArg(object callable, object arg)


cdef class StepResult:
    """What a step did: total_norm (the gradients' L2 norm after unscaling, a float, or None
    when the step did not compute it) and skipped (True when non-finite gradients made the step
    change nothing)."""
    cdef readonly object total_norm
    cdef readonly bint skipped

    def __cinit__(self, total_norm=None, bint skipped=False):
        self.total_norm, self.skipped = total_norm, skipped

    def __repr__(self):
        return f"StepResult(total_norm={self.total_norm!r}, skipped={self.skipped})"

    def __reduce__(self):
        return (StepResult, (self.total_norm, self.skipped))


PLAIN_RESULT = StepResult()


cdef class StepOptions:
    """One step's keywords, validated: g <- g / grad_scale; skipped if skip_nonfinite and any
    element is inf or NaN; g <- g min(1, clip_norm / (total_norm + 1e-6)) if clip_norm.

    The reduction writes each parameter's sum of squares at its global index (per_param), and
    finish() adds them in parameter order: the same total whatever the batches and threads."""
    cdef double grad_scale, clip_norm
    cdef bint clip, skip_nonfinite
    cdef readonly bint reduce  # a reduction pass is needed
    cdef Py_ssize_t n_params
    cdef double *per_param
    cdef bint nonfinite
    cdef fo_step_options c
    cdef readonly object total_norm
    cdef readonly bint skipped

    def __cinit__(self, Py_ssize_t n_params, grad_scale=1.0, clip_norm=None,
                  skip_nonfinite=False, compute_norm=False):
        self.grad_scale = _positive("grad_scale", grad_scale)
        if isinf(1.0 / self.grad_scale):  # the gradients' multiplier, 1 / grad_scale
            raise ValueError(f"grad_scale must be >= {1.0 / DBL_MAX!r} (1 / grad_scale must be "
                             f"finite), got {grad_scale!r}")
        self.clip = clip_norm is not None
        self.clip_norm = _nonnegative_real("clip_norm", clip_norm) if self.clip else 0.0
        if type(skip_nonfinite) is not bool or type(compute_norm) is not bool:
            raise TypeError("skip_nonfinite and compute_norm must be bools")
        self.skip_nonfinite = skip_nonfinite
        self.reduce = self.clip or skip_nonfinite or compute_norm
        self.n_params = n_params
        self.per_param = <double *>calloc(max(n_params, 1), sizeof(double))
        if self.per_param == NULL:
            raise MemoryError()
        self.c.grad_multiplier = 1.0 / self.grad_scale
        self.c.ema = NULL
        self.c.ema_decay = 0.0
        self.c.ema_bfloat16 = 0

    def __dealloc__(self):
        free(self.per_param)

    cdef void start(self) noexcept:
        memset(self.per_param, 0, max(self.n_params, 1) * sizeof(double))
        self.nonfinite = False

    cdef int add(self, int dtype, size_t count, void **grads, const size_t *n,
                 const Py_ssize_t *index, double *scratch) except -1:
        """The sums of squares of `count` gradients stored as `dtype` (an fo_dtype),
        parameter index[t] for gradient t."""
        cdef fo_batch b
        cdef int status, nonfinite = 0
        cdef double total
        cdef size_t t
        _gradient_batch(&b, count, n, grads, dtype)
        with nogil:
            status = fo_norm(&b, 1, 2.0, scratch, &total, &nonfinite, NULL)
        _check(status)
        for t in range(count):
            self.per_param[index[t]] = scratch[t]
        self.nonfinite = self.nonfinite or nonfinite
        return 0

    cdef int add_arrays(self, list grads) except -1:
        """add() over every gradient (validated arrays), one call per dtype."""
        cdef Py_ssize_t i, m
        dtypes = [_fo_dtype((<cnp.ndarray>g).dtype) for g in grads]
        for dtype in (FO_FLOAT32, FO_FLOAT64, FO_BFLOAT16):
            chosen = [i for i in range(len(grads)) if dtypes[i] == dtype]
            m = len(chosen)
            if m == 0:
                continue
            table = _IndexTable(m)
            for i in range(m):
                table.ptrs[i] = cnp.PyArray_DATA(<cnp.ndarray>grads[chosen[i]])
                table.n[i] = cnp.PyArray_SIZE(<cnp.ndarray>grads[chosen[i]])
                table.index[i] = chosen[i]
            self.add(dtype, m, table.ptrs, table.n, table.index, table.scratch)
        return 0

    cdef bint finish(self) except -1:
        """After add(): decide the multiplier; True if the step goes ahead."""
        cdef double total = 0.0, norm, factor
        cdef Py_ssize_t i
        self.skipped = self.skip_nonfinite and self.nonfinite
        if not self.reduce:
            return True
        for i in range(self.n_params):
            total += self.per_param[i]
        norm = sqrt(total) / self.grad_scale
        self.total_norm = norm
        if self.skipped:
            return False
        factor = 1.0
        if self.clip:
            factor = self.clip_norm / (norm + 1e-6)  # torch's clip_grad_norm_
            if not factor < 1.0:
                factor = 1.0
        self.c.grad_multiplier = factor / self.grad_scale
        return True

    def reduce_arrays(self, list grads):
        """The reduction pass over validated gradient arrays (every parameter's, in order),
        if the options need one; True if the update goes ahead."""
        self.start()
        if self.reduce:
            self.add_arrays(grads)
        return self.finish()

    def result(self):
        return StepResult(self.total_norm, self.skipped)

    @property
    def grad_multiplier(self):
        """After the reduction: what the update multiplies every gradient by (the clip factor
        over grad_scale)."""
        return self.c.grad_multiplier

    def reduce_tables(self, GradTables tables):
        """The reduction pass over gather_grads' gradients (fastopt.torch's step with
        clip_norm), one call per table, each gradient's sum at its parameter's position: the
        total added in parameter order, as the numpy API's; True if the update goes ahead."""
        cdef int k
        cdef size_t t
        self.start()
        if self.reduce:
            for k in range(3):
                for t in range(tables.count[k]):
                    if tables.position[k][t] >= self.n_params:
                        raise ValueError("reduce_tables: a parameter position past the options' "
                                         "n_params")
            for k in range(3):  # (per_tensor: one scratch value per gradient, as add() needs)
                if tables.count[k]:
                    self.add(GRAD_TABLE_DTYPES[k], tables.count[k], tables.ptrs[k], tables.n[k],
                             tables.position[k], tables.per_tensor)
        return self.finish()


cdef class _IndexTable:
    """Pointer, size, parameter index and scratch arrays for one add() call."""
    cdef void **ptrs
    cdef size_t *n
    cdef Py_ssize_t *index
    cdef double *scratch

    def __cinit__(self, Py_ssize_t count):
        count = max(count, 1)
        self.ptrs = <void **>calloc(count, sizeof(void *))
        self.n = <size_t *>calloc(count, sizeof(size_t))
        self.index = <Py_ssize_t *>calloc(count, sizeof(Py_ssize_t))
        self.scratch = <double *>calloc(count, sizeof(double))
        if self.ptrs == NULL or self.n == NULL or self.index == NULL or self.scratch == NULL:
            raise MemoryError()

    def __dealloc__(self):
        free(self.ptrs)
        free(self.n)
        free(self.index)
        free(self.scratch)


cdef double _positive(str name, value) except? -1.0:
    try:
        x = _nonnegative_real(name, value)
    except ValueError:
        x = 0.0  # (its message says ">= 0")
    if x == 0.0:
        raise ValueError(f"{name} must be finite and > 0, got {value!r}")
    return x


cdef double _nonnegative_real(str name, value) except? -1.0:
    if type(value) is bool or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    cdef double x
    try:
        x = value
    except OverflowError:  # an int too large for a double: a value error, named
        x = INFINITY
    if not (x >= 0.0) or isinf(x):
        raise ValueError(f"{name} must be finite and >= 0, got {short_repr(value)}")
    return x


def short_repr(value):
    """repr(value) cut to 40 characters (10**400 has 401 digits), for error messages."""
    shown = repr(value)
    return shown if len(shown) <= 40 else shown[:37] + "..."


cdef void _gradient_batch(fo_batch *b, size_t count, const size_t *n, void **grads,
                          int dtype) noexcept:
    """A batch of gradients alone (buffer 1) stored as `dtype`, as the reduction pass reads
    them."""
    cdef void **bufs[2]
    bufs[0], bufs[1] = NULL, grads
    plain_batch(b, count, n, bufs, 2, dtype, NULL)


def norms(list addresses, list sizes, double p, bint f64):
    """(per-buffer sums, total, nonfinite) of fo_norm over buffers of one dtype (float64 if
    f64, else float32) given by their raw addresses and element counts."""
    cdef Py_ssize_t m = len(addresses), i
    if len(sizes) != m:
        raise ValueError("norms: as many sizes as addresses")
    table = _IndexTable(m)
    for i in range(m):
        table.ptrs[i] = <void *><uintptr_t>addresses[i]
        table.n[i] = sizes[i]
    cdef fo_batch b
    cdef int status, nonfinite = 0
    cdef double total
    _gradient_batch(&b, m, table.n, table.ptrs, FO_FLOAT64 if f64 else FO_FLOAT32)
    with nogil:
        status = fo_norm(&b, 1, p, table.scratch, &total, &nonfinite, NULL)
    if status == FO_ERR_HYPERPARAM:
        raise ValueError(f"norm type must be >= 0, got {p}")
    _check(status)
    return [table.scratch[i] for i in range(m)], total, bool(nonfinite)


cdef inline int _run_with(int rule, bint f64, size_t count, void ***ptrs, int n_bufs, size_t *n,
                          void *hp, const fo_step_options *opt,
                          const fo_rows *rows=NULL, bint planned=False) noexcept nogil:
    """fo_step_with over pointer tables of one dtype (opt NULL: fo_step; rows: see fo_batch;
    planned: fo_step_planned)."""
    cdef fo_batch b
    plain_batch(&b, count, n, ptrs, n_bufs, FO_FLOAT64 if f64 else FO_FLOAT32, rows)
    return _step_call(rule, &b, hp, opt, planned)


# GradTables' tables, in order
cdef int[3] GRAD_TABLE_DTYPES = [FO_FLOAT32, FO_FLOAT64, FO_BFLOAT16]


cdef class GradTables:
    """The gradients of a list of torch parameters, for fastopt.torch.clip_grad_norm_ and
    step(clip_norm=...): C tables of the float32, the float64 and the bfloat16 ones (data
    pointer, element count; in order), filled in one pass and used by both the norm and the
    scaling pass, and the parameters whose gradients they are (`owners`)."""
    cdef void **ptrs[3]
    cdef size_t *n[3]
    cdef Py_ssize_t *position[3]  # each gradient's parameter's position in gather_grads' list
    cdef size_t count[3]
    cdef double *per_tensor
    cdef readonly list owners
    cdef bint all_read_natively  # every gradient found through the C++ reads

    @property
    def grads(self):
        return [p.grad for p in self.owners]

    def mark_written(self):
        """Tell autograd every gradient was written in place (as increment_version would); the
        C++ reads bump the gradients torch's own getter returns, so only where they found
        every one (a parameter type may route .grad elsewhere)."""
        global _cpp_version_bumps
        if not self.all_read_natively or _torch_access == NULL or \
                _torch_access.bump_versions(<PyObject *>self.owners, 1) != 0:
            import torch
            torch.autograd.graph.increment_version(self.grads)
        else:
            _cpp_version_bumps += 1

    def __dealloc__(self):
        cdef int k
        for k in range(3):
            free(self.ptrs[k])
            free(self.n[k])
            free(self.position[k])
        free(self.per_tensor)

    @property
    def has_float64(self):
        return self.count[1] > 0

    cdef int _fo_batch(self, int k, fo_batch *b) noexcept:
        """Table k's gradients (GRAD_TABLE_DTYPES[k]) as buffer 0 of a batch."""
        cdef void **bufs[1]
        bufs[0] = self.ptrs[k]
        plain_batch(b, self.count[k], self.n[k], bufs, 1, GRAD_TABLE_DTYPES[k], NULL)
        return 0

    def norm(self, double p):
        """(value, nonzero_tensors): fo_norm over every gradient -- the sum of |g|^p (p = 2:
        squares, 1: |g|; inf: the max of |g|, NaN if any is NaN) over float32, float64 then
        bfloat16, and, for p = 0 only, the count of gradients with a nonzero element (else 0)."""
        cdef fo_batch b
        cdef int k, status, nonfinite
        cdef double value = -INFINITY if isinf(p) else 0.0, part
        cdef size_t t, nonzero = 0
        cdef bint is_max = isinf(p)
        for k in range(3):
            if self.count[k] == 0:
                continue
            self._fo_batch(k, &b)
            with nogil:
                status = fo_norm(&b, 0, p, self.per_tensor if p == 0.0 else NULL, &part,
                                 &nonfinite, NULL)
            if status == FO_ERR_HYPERPARAM:
                raise ValueError(f"norm type must be >= 0, got {p}")
            _check(status)
            if is_max:
                value = part if part != part or part > value else value
            else:
                value += part
            if p == 0.0:
                for t in range(self.count[k]):
                    nonzero += self.per_tensor[t] != 0.0
        return value, nonzero

    def scale(self, double factor):
        """Every gradient *= factor (rounded to its dtype), through the threads: fo_scale
        (float32 and float64 gradients: gather_grads without bf16 returns None for others)."""
        cdef fo_batch b
        cdef int k, status
        if self.count[2]:
            raise TypeError("GradTables.scale: bfloat16 gradients are not scaled here")
        for k in range(2):
            if self.count[k] == 0:
                continue
            self._fo_batch(k, &b)
            with nogil:
                status = fo_scale(&b, 0, factor)
            _check(status)


def gather_grads(list params, tensor_type, f32, f64, bf16=None):
    """The gradients of `params` as GradTables; or None if one is not a plain dense contiguous
    float32/float64 (or, where bf16 is torch.bfloat16, bfloat16) CPU tensor (torch's own
    function is then the one that handles them).  One Cython loop: a few attribute reads per
    tensor, straight into the C tables."""
    global _cpp_grad_reads
    cdef Py_ssize_t cap = max(len(params), 1)
    cdef GradTables tables = GradTables.__new__(GradTables)
    cdef int k
    cdef size_t at
    cdef list owners = []
    tables.all_read_natively = True
    for k in range(3):
        tables.ptrs[k] = <void **>calloc(cap, sizeof(void *))
        tables.n[k] = <size_t *>calloc(cap, sizeof(size_t))
        tables.position[k] = <Py_ssize_t *>calloc(cap, sizeof(Py_ssize_t))
        tables.count[k] = 0
    tables.per_tensor = <double *>calloc(cap, sizeof(double))
    if tables.per_tensor == NULL or any_null(tables.ptrs, tables.n, tables.position):
        raise MemoryError()
    # torch.Tensor's own getters and methods, called without the attribute lookups (about a
    # sixth of this loop's time); a parameter whose type reaches other ones reads them as usual
    cdef PyGetSetDef *grad_of = _getset(tensor_type, "grad")
    cdef PyGetSetDef *dtype_of = _getset(tensor_type, "dtype")
    cdef PyGetSetDef *is_cpu = _getset(tensor_type, "is_cpu")
    is_contiguous, data_ptr, numel = (tensor_type.is_contiguous, tensor_type.data_ptr,
                                      tensor_type.numel)
    grad_descr = _lookup(tensor_type, "grad")
    known = tensor_type  # a type whose grad is Tensor's (nn.Parameter, found on the way)
    cdef Py_ssize_t position = -1
    # the C++ reads where loaded (fastopt/native_torch.py): no Python call per gradient
    cdef const fo_torch_access *reader = _torch_access
    cdef fo_tensor_view v
    cdef int f32_code = -1, f64_code = -1, bf16_code = -1, found
    cdef size_t element_size[3]
    element_size[:] = [4, 8, 2]
    if reader != NULL:
        f32_code, f64_code = reader.dtype_code(<PyObject *>f32), reader.dtype_code(<PyObject *>f64)
        if bf16 is not None:
            bf16_code = reader.dtype_code(<PyObject *>bf16)
    for p in params:
        position += 1
        found = reader.grad_view(<PyObject *>p, &v, NULL) if reader != NULL and \
            type(p) in _torch_plain_types else -1
        if found == 0:
            continue
        if found == -2:  # (a lazily negated view: torch's own function reads it right)
            return None
        if found == 1:
            k = 0 if v.dtype == f32_code else 1 if v.dtype == f64_code else \
                2 if v.dtype == bf16_code and bf16_code >= 0 else -1
            if k < 0 or not v.contiguous or not v.plain:  # (as the Python route below)
                return None
            at = tables.count[k]
            tables.ptrs[k][at] = v.data
            tables.n[k][at] = v.nbytes // element_size[k]
            tables.position[k][at] = position
            tables.count[k] = at + 1
            owners.append(p)
            _cpp_grad_reads += 1
            continue
        if grad_of != NULL and (type(p) is tensor_type or type(p) is known):
            g = grad_of.get(p, grad_of.closure)
        elif grad_of != NULL and isinstance(p, tensor_type) and \
                _lookup(type(p), "grad") is grad_descr:
            known = type(p)
            g = grad_of.get(p, grad_of.closure)
        else:
            g = p.grad
        if g is None:
            continue
        if type(g) is not tensor_type:
            return None
        dtype = dtype_of.get(g, dtype_of.closure) if dtype_of != NULL else g.dtype
        if dtype is f32:
            k = 0
        elif dtype is f64:
            k = 1
        elif dtype is bf16 and bf16 is not None:
            k = 2
        else:
            return None
        if not (is_cpu.get(g, is_cpu.closure) if is_cpu != NULL else g.is_cpu):
            return None
        try:  # a sparse COO tensor says False, a compressed one raises
            if not PyObject_CallOneArg(is_contiguous, g):
                return None
        except RuntimeError:
            return None
        at = tables.count[k]
        tables.ptrs[k][at] = <void *><uintptr_t>PyObject_CallOneArg(data_ptr, g)
        tables.n[k][at] = PyObject_CallOneArg(numel, g)
        tables.position[k][at] = position
        tables.count[k] = at + 1
        owners.append(p)
        tables.all_read_natively = False
    tables.owners = owners
    return tables


cdef inline bint any_null(void ***ptrs, size_t **n, Py_ssize_t **position) noexcept:
    cdef int k
    for k in range(3):
        if ptrs[k] == NULL or n[k] == NULL or position[k] == NULL:
            return True
    return False


cdef PyGetSetDef *_getset(object owner, str name):
    """The C getter of owner's attribute `name` if it is a getset_descriptor, else NULL."""
    descr = _lookup(owner, name)
    if type(descr) is not _GetSetDescriptor:
        return NULL
    return (<PyGetSetDescrObject *><PyObject *>descr).d_getset


_GetSetDescriptor = type(type.__dict__["__name__"])


cdef object _lookup(object owner, str name):
    """What `name` finds on `owner` (its MRO's first dict holding it), or None."""
    for klass in owner.__mro__:
        if name in klass.__dict__:
            return klass.__dict__[name]
    return None
