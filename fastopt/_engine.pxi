# The step engine (included by _kernels.pyx): every API ends in a planned batch.
#
# An optimizer validates everything once in Python and then builds a Plan: its parameters
# grouped into Batches (one param group, one dtype, one step count), each holding C arrays of
# buffer pointers, and one Hyper (the C hyperparameter struct) per param group.  Later steps go
# through Plan.run, which checks at C speed that nothing changed (same groups, params, states,
# buffers, pointers) and that every grad is right (type, dtype, shape, layout, no overlap with
# a written buffer), and then makes one C call per batch.  A changed hyperparameter (a
# schedule writing lr) costs only the new field's conversion and the C rule's range check.
# Anything unexpected returns False and the caller takes the validating path, which raises the
# precise error or builds a new plan.  fastopt.functional's single-tensor calls go through
# run_single, the same checks for one tensor.
from libc.stdlib cimport calloc, free
from libc.string cimport memcmp
from libc.stdint cimport int32_t
from cpython.dict cimport PyDict_GetItem, PyDict_Next, PyDict_SetItem, PyDict_Size
from cpython.list cimport PyList_GET_ITEM
from cpython.object cimport PyObject
from cpython.tuple cimport PyTuple_GET_ITEM, PyTuple_GET_SIZE
from cpython.pycapsule cimport PyCapsule_GetPointer


cdef extern from "Python.h":
    object PyObject_GenericGetDict(object o, void *context)


cdef extern from "torch_access.h":
    const char *FO_TORCH_ACCESS_NAME
    int FO_TORCH_ACCESS_VERSION
    ctypedef struct fo_tensor_view:
        void *data
        size_t nbytes
        int dtype
        int contiguous
        int plain
    ctypedef struct fo_torch_access:
        int version
        int (*view)(PyObject *tensor, fo_tensor_view *out) noexcept
        int (*grad_view)(PyObject *param, fo_tensor_view *out, fo_tensor_view *param_out) noexcept
        int (*dtype_code)(PyObject *dtype) noexcept
        int (*bump_versions)(PyObject *tensor_list, int their_grads) noexcept


# fastopt.torch's C++ tensor reads (csrc/torch_tensors.cpp, built for the installed torch by
# fastopt/native_torch.py), or NULL: planned steps then read tensors through torch's Python API
cdef const fo_torch_access *_torch_access = NULL
cdef object _torch_access_capsule = None
cdef tuple _torch_plain_types = ()  # the parameter types whose .grad is torch's own getter
# what went through the C++ reads: tensors' gradients read (a planned step's members,
# gather_grads' parameters) and lists of tensors whose versions were bumped
cdef size_t _cpp_grad_reads = 0, _cpp_version_bumps = 0


def set_torch_access(capsule, tuple plain_types=()):
    """Planned fastopt.torch steps read tensors through this capsule's C++ functions (None: back
    to torch's Python getters).  plain_types: the exact parameter types read that way."""
    global _torch_access, _torch_access_capsule, _torch_plain_types
    cdef const fo_torch_access *access = NULL
    if capsule is not None:
        access = <const fo_torch_access *>PyCapsule_GetPointer(capsule, FO_TORCH_ACCESS_NAME)
        if access.version != FO_TORCH_ACCESS_VERSION:
            raise ValueError(f"set_torch_access: a reader of version {access.version}, "
                             f"expected {FO_TORCH_ACCESS_VERSION}")
    _torch_access, _torch_access_capsule = access, capsule
    _torch_plain_types = plain_types if capsule is not None else ()


def torch_access_in_use():
    return _torch_access != NULL


def torch_reads_counts():
    """(gradients read, version bumps made) through the C++ reads so far in this process: what
    shows that planned steps and the clip passes took them."""
    return _cpp_grad_reads, _cpp_version_bumps


def read_tensor(t, bint grad=False):
    """What the C++ reads see of torch tensor t (grad: of t's gradient): (data_ptr, nbytes,
    dtype code, contiguous), None for no gradient, False where only torch's Python API can
    read it, or "a lazy view" for a lazily conjugated or negated one (refused by the steps).
    For checking the reads against torch's own answers."""
    cdef fo_tensor_view v
    if _torch_access == NULL:
        raise RuntimeError("read_tensor: fastopt.torch's C++ reads are not loaded")
    if not isinstance(t, _torch_plain_types):
        raise TypeError(f"read_tensor takes a torch.Tensor, not {type(t).__name__}")
    found = _torch_access.grad_view(<PyObject *>t, &v, NULL) if grad else \
        _torch_access.view(<PyObject *>t, &v)
    if found <= 0:
        return None if found == 0 else False if found == -1 else "a lazy view"
    return <uintptr_t>v.data, v.nbytes, v.dtype, bool(v.contiguous)


def torch_dtype_code(dtype):
    """The C++ reads' code of a torch.dtype (-1: not a dtype)."""
    if _torch_access == NULL:
        raise RuntimeError("torch_dtype_code: fastopt.torch's C++ reads are not loaded")
    return _torch_access.dtype_code(<PyObject *>dtype)


from cpython.pythread cimport (PyThread_type_lock, PyThread_allocate_lock, PyThread_free_lock,
                               PyThread_acquire_lock, PyThread_release_lock, NOWAIT_LOCK,
                               WAIT_LOCK)


# ---- storage types (csrc/fastopt.h fo_dtype; fastopt/storage.py) ----
cdef int _bf16_typenum = -1  # numpy's type number of ml_dtypes.bfloat16, once one is seen


cdef int _fo_dtype(cnp.dtype d) except -2:
    """A numpy dtype's fo_dtype (FO_FLOAT32, FO_FLOAT64, FO_BFLOAT16), -1 for any other."""
    global _bf16_typenum
    if not d.isnative:
        return -1
    if d.type_num == cnp.NPY_FLOAT32:
        return FO_FLOAT32
    if d.type_num == cnp.NPY_FLOAT64:
        return FO_FLOAT64
    if d.type_num == _bf16_typenum:
        return FO_BFLOAT16
    if d.itemsize == 2 and d.name == "bfloat16":
        _bf16_typenum = d.type_num
        return FO_BFLOAT16
    return -1


cdef class Storage:
    """How one call's buffers are stored, and how bfloat16 writes round: the fo_batch fields
    after the buffer tables (dtype[k] per buffer, master weights, rounding, seed, step, the
    tensors' parameter indices)."""
    cdef int dtype[8]
    cdef void **master          # per tensor, or NULL
    cdef int rounding
    cdef uint64_t seed
    cdef uint64_t *index        # per tensor
    cdef Py_ssize_t count

    def __cinit__(self, list dtypes, list indices, int rounding=0, seed=0, list masters=None):
        cdef Py_ssize_t k, t
        for k in range(8):
            self.dtype[k] = dtypes[k] if k < len(dtypes) and dtypes[k] is not None else 0
        self.count = len(indices)
        self.rounding, self.seed = rounding, seed
        self.index = <uint64_t *>calloc(max(self.count, 1), sizeof(uint64_t))
        if self.index == NULL:
            raise MemoryError()
        for t in range(self.count):
            self.index[t] = indices[t]
        self.master = NULL
        if masters is not None:
            self.master = <void **>calloc(max(self.count, 1), sizeof(void *))
            if self.master == NULL:
                raise MemoryError()
            for t in range(self.count):
                self.master[t] = <void *><uintptr_t>masters[t]

    def __dealloc__(self):
        free(self.index)
        free(self.master)

    cdef inline int run(self, int rule, size_t count, void ***ptrs, int n_bufs, size_t *n,
                        void *hp, uint64_t at_step, const fo_step_options *opt=NULL,
                        const fo_rows *rows=NULL, bint planned=False) noexcept nogil:
        """fo_step_with (planned: fo_step_planned) over the pointer tables, stored as this says."""
        cdef fo_batch b
        cdef int k
        b.count = count
        b.n = n
        b.rows = rows
        for k in range(8):
            b.buffers[k] = ptrs[k] if k < n_bufs else NULL
            b.dtype[k] = self.dtype[k]
        b.master = <float **>self.master
        b.rounding = self.rounding
        b.seed = self.seed
        b.step = at_step
        b.index = self.index
        return _step_call(rule, &b, hp, opt, planned)


cdef class StepLock:
    """The lock that serializes an optimizer's steps and checkpoints (`with opt._lock:`): a
    plain mutex whose uncontended acquire and release cost a few tens of nanoseconds (a
    threading.Lock in a `with` costs ~0.3-0.5 us here, as much as a small step).  A thread that
    must wait does so with the GIL released.  Not re-entrant."""
    cdef PyThread_type_lock lock

    def __cinit__(self):
        self.lock = PyThread_allocate_lock()
        if self.lock == NULL:
            raise MemoryError()

    def __dealloc__(self):
        if self.lock != NULL:
            PyThread_free_lock(self.lock)

    cdef inline void acquire(self):
        if not PyThread_acquire_lock(self.lock, NOWAIT_LOCK):
            with nogil:
                PyThread_acquire_lock(self.lock, WAIT_LOCK)

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        PyThread_release_lock(self.lock)
        return False

    def __reduce__(self):
        return (StepLock, ())


cdef class SparseGrad:
    """A gradient given by rows, for a parameter with ndim >= 1 viewed as rows along axis 0:
    `indices` a 1-D int32/int64 array of row numbers (any order, duplicates allowed: they are
    summed, in the order given), `values` an array shaped (len(indices),) + param.shape[1:] in
    the parameter's dtype, C-contiguous: values[j] is the gradient of row indices[j].  A step
    with it updates the touched rows only (see the optimizers' `sparse` argument).  Both arrays
    are used where they lie (no copy) and are checked against the parameter at each step."""
    cdef readonly object indices, values

    def __init__(self, indices, values):
        if not isinstance(indices, cnp.ndarray) or not isinstance(values, cnp.ndarray):
            raise TypeError("SparseGrad(indices, values) takes two numpy arrays, got "
                            f"{type(indices).__name__} and {type(values).__name__}")
        self.indices, self.values = indices, values

    def __repr__(self):
        return (f"SparseGrad(indices: {self.indices.shape[0] if self.indices.ndim else '?'} rows "
                f"{self.indices.dtype}, values: {self.values.shape} {self.values.dtype})")

    def __reduce__(self):
        return (SparseGrad, (self.indices, self.values))


cdef bint _rows_fit(SparseGrad g, cnp.ndarray a, int grad_typenum, fo_rows *rows):
    """Whether g is a valid row gradient of `a` with values of numpy type grad_typenum (what
    _checks.check_sparse_grad checks, indices in range included); fills `rows` if so."""
    if type(g.indices) is not cnp.ndarray or type(g.values) is not cnp.ndarray:
        return False
    cdef cnp.ndarray idx = <cnp.ndarray>g.indices, v = <cnp.ndarray>g.values
    cdef int nd = cnp.PyArray_NDIM(a), ityp = cnp.PyArray_TYPE(idx)
    if nd < 1 or cnp.PyArray_NDIM(idx) != 1 or not cnp.PyArray_ISNOTSWAPPED(idx) \
            or not cnp.PyArray_IS_C_CONTIGUOUS(idx):
        return False
    if ityp == cnp.NPY_INT32:
        rows.index_type = FO_INT32
    elif ityp == cnp.NPY_INT64:
        rows.index_type = FO_INT64
    else:
        return False
    cdef size_t nnz = <size_t>cnp.PyArray_DIMS(idx)[0]
    if cnp.PyArray_TYPE(v) != grad_typenum or not cnp.PyArray_ISNOTSWAPPED(v) \
            or cnp.PyArray_NDIM(v) != nd or <size_t>cnp.PyArray_DIMS(v)[0] != nnz \
            or not cnp.PyArray_IS_C_CONTIGUOUS(v) \
            or memcmp(cnp.PyArray_DIMS(v) + 1, cnp.PyArray_DIMS(a) + 1,
                      (nd - 1) * sizeof(cnp.npy_intp)) != 0:
        return False
    cdef int64_t n_rows = cnp.PyArray_DIMS(a)[0]
    cdef size_t j
    cdef const int32_t *i32 = <const int32_t *>cnp.PyArray_DATA(idx)
    cdef const int64_t *i64 = <const int64_t *>cnp.PyArray_DATA(idx)
    cdef bint bad = False
    with nogil:
        if ityp == cnp.NPY_INT32:
            for j in range(nnz):
                if i32[j] < 0 or i32[j] >= n_rows:
                    bad = True
                    break
        else:
            for j in range(nnz):
                if i64[j] < 0 or i64[j] >= n_rows:
                    bad = True
                    break
    if bad:
        return False
    rows.indices = cnp.PyArray_DATA(idx)
    rows.row_len = <size_t>(cnp.PyArray_SIZE(a) // n_rows) if n_rows > 0 else 0
    rows.nnz = nnz if rows.row_len > 0 else 0  # rows of no elements: nothing to update
    return True


cdef class Batch:
    """Tensors of one param group, one dtype and one step count: one C call per step.

    slots: the state buffer names in the kernel's order, None where the options leave one
    unused.  hyper: the group's Hyper (shared by the group's batches).
    """
    cdef CRule rule
    cdef Storage storage
    cdef bint f64
    cdef int grad_dtype  # the gradients' fo_dtype (the reduction pass reads them as stored)
    cdef int grad_typenum
    cdef Py_ssize_t count
    cdef int n_bufs
    cdef void **ptrs[8]
    cdef size_t *sizes
    cdef fo_rows *rows  # per tensor: its gradient's rows (indices NULL: dense)
    cdef bint any_rows
    cdef Py_ssize_t *index  # each tensor's parameter index (indices), for the reduction pass
    cdef double *scratch    # the reduction's per-tensor results
    cdef Hyper hyper
    cdef Py_ssize_t step_offset  # of the struct's `step` field, or -1
    cdef void **ema              # per tensor its state's EMA buffer (set_ema), or NULL
    cdef double ema_decay
    cdef bint ema_bfloat16       # the EMA buffers are bfloat16 (else the compute type)
    cdef list emas
    cdef Schedule schedule       # the group's lr schedule, or None
    cdef Py_ssize_t lr_offset    # of the struct's `lr` field, where the schedule's value goes
    cdef int64_t step
    cdef object step_object  # the int the last step wrote into each state (compared by identity first)
    cdef list params, states, indices, buffers
    # per tensor its state's instance dict, where the fields a step reads are plain instance
    # attributes (no descriptor on the class): read without getattr's type lookups
    cdef list fields
    cdef list shapes             # a row rule's: each parameter's shape when planned
    cdef bint exact              # sparse="exact": rows caught up through their last steps
    # per tensor its state's row_step, or None (exact, or a lazy batch whose states have
    # one: set_row_steps), and its data; last_steps NULL: the batch keeps no row_step
    cdef list row_steps
    cdef int64_t **last_steps
    cdef readonly tuple slots
    cdef public Py_ssize_t group_index
    # per tensor, per array it holds (the parameter, its state buffers, master, ema: `width`
    # of them), the byte size and dtype it had when planned (_as_planned)
    cdef Py_ssize_t width
    cdef Py_ssize_t *nbytes
    cdef list descrs

    def __cinit__(self, CRule rule, list params, list states, list indices, Hyper hyper,
                  int64_t step, grad_dtype=None, dict options=None):
        self.rule, self.hyper = rule, hyper
        self.params, self.states, self.indices = params, states, indices
        self.count = len(params)
        self.slots = hyper.used_state()
        # storage: every tensor of a batch stores each buffer alike (the caller groups them so)
        grad_dtype = (<cnp.ndarray>params[0]).dtype if grad_dtype is None else grad_dtype
        self.grad_typenum = (<cnp.dtype>grad_dtype).type_num
        dtypes = [_fo_dtype((<cnp.ndarray>params[0]).dtype), _fo_dtype(grad_dtype)]
        self.f64 = dtypes[0] == FO_FLOAT64
        self.grad_dtype = dtypes[1]
        compute = FO_FLOAT64 if self.f64 else FO_FLOAT32
        for slot, name in zip(self.slots, rule.state):
            # (a factored rule's tensors have either kind of buffer: the first that has one says)
            b = next((getattr(st, name) for st in states if getattr(st, name) is not None), None) \
                if slot is not None else None
            dtypes.append(_fo_dtype(b.dtype) if b is not None else compute)
        options = options or {}
        masters = None
        if options.get("master_weights"):
            masters = [<uintptr_t>cnp.PyArray_DATA(<cnp.ndarray>s.master) for s in states]
        self.storage = Storage(dtypes, indices, options.get("rounding", "stochastic") == "nearest",
                               options.get("seed", 0), masters)
        self.n_bufs = 2 + len(rule.state)
        self.step = step
        self.step_offset = rule.step_offset
        self.sizes = <size_t *>calloc(max(self.count, 1), sizeof(size_t))
        self.width = len(rule.state) + 3
        self.nbytes = <Py_ssize_t *>calloc(max(self.count * self.width, 1), sizeof(Py_ssize_t))
        self.descrs = [None] * (self.count * self.width)
        if self.nbytes == NULL:
            raise MemoryError()
        self.rows = <fo_rows *>calloc(max(self.count, 1), sizeof(fo_rows))
        self.index = <Py_ssize_t *>calloc(max(self.count, 1), sizeof(Py_ssize_t))
        self.scratch = <double *>calloc(max(self.count, 1), sizeof(double))
        if self.rows == NULL or self.index == NULL or self.scratch == NULL:
            raise MemoryError()
        cdef Py_ssize_t k, t
        for k in range(self.n_bufs):
            used = k < 2 or self.slots[k - 2] is not None
            self.ptrs[k] = <void **>calloc(max(self.count, 1), sizeof(void *)) if used else NULL
            if used and self.ptrs[k] == NULL:
                raise MemoryError()
        if self.sizes == NULL:
            raise MemoryError()
        # per tensor: every buffer its state holds, in slot order, used by this batch or not,
        # so a step can tell that none was replaced since the full validation
        self.buffers = []
        self.fields = [_instance_fields(s, rule.state) for s in states]
        self.shapes = [p.shape for p in params] if rule.shaped_state else None
        cdef cnp.ndarray a
        for t in range(self.count):
            a = params[t]
            self.ptrs[0][t] = cnp.PyArray_DATA(a)
            self.sizes[t] = cnp.PyArray_SIZE(a)
            _set_layout(a, &self.rows[t], rule)  # a row or factored rule's view of it
            self.index[t] = indices[t]
            bufs = [getattr(states[t], name) for name in rule.state + ("master",)]
            self.buffers.append(bufs)
            for k, b in enumerate([a] + bufs):
                self._plan_layout(t, k, b)
            for k, b in enumerate(bufs[:len(rule.state)]):
                if self.slots[k] is not None and b is not None:  # (None: not this tensor's)
                    self.ptrs[k + 2][t] = cnp.PyArray_DATA(<cnp.ndarray>b)

    cdef void _plan_layout(self, Py_ssize_t t, Py_ssize_t k, b):
        """Remember array b (or None) as array k of tensor t."""
        if b is not None:
            self.nbytes[t * self.width + k] = cnp.PyArray_NBYTES(<cnp.ndarray>b)
            self.descrs[t * self.width + k] = (<cnp.ndarray>b).dtype

    cdef inline bint _as_planned(self, Py_ssize_t t, Py_ssize_t k, cnp.ndarray b):
        """Array k of tensor t is still what the plan's pointers were made for: an array can be
        resized, re-strided or re-typed in place, keeping its identity and address
        (b.resize(n, refcheck=False), b.strides = ..., b.dtype = ...)."""
        return cnp.PyArray_NBYTES(b) == self.nbytes[t * self.width + k] \
            and <PyObject *>cnp.PyArray_DESCR(b) == PyList_GET_ITEM(self.descrs, t * self.width + k) \
            and cnp.PyArray_IS_C_CONTIGUOUS(b) and cnp.PyArray_ISWRITEABLE(b)

    def __dealloc__(self):
        free(self.nbytes)
        free(self.sizes)
        free(self.rows)
        free(self.index)
        free(self.scratch)
        free(self.ema)
        free(self.last_steps)
        for k in range(8):
            free(self.ptrs[k])

    cdef bint unchanged(self, list params, dict state):
        """Same params (and data pointers, still writeable), same states and buffers."""
        cdef Py_ssize_t t, k
        cdef cnp.ndarray a
        cdef tuple names = self.rule.state
        cdef Py_ssize_t n_state = len(names)
        for t in range(self.count):
            i = self.indices[t]
            a = self.params[t]
            if params[i] is not a or cnp.PyArray_DATA(a) != self.ptrs[0][t] \
                    or not self._as_planned(t, 0, a):
                return False
            if self.shapes is not None and (<object>a).shape != self.shapes[t]:
                return False  # reshaped in place: its rows (and state's length) are others now
            s = self.states[t]
            d = self.fields[t]
            if state.get(i) is not s:
                return False
            if d is not None and PyObject_GenericGetDict(s, NULL) is not d:
                return False  # s.__dict__ replaced: the plan's view of its fields is stale
            v = _field(s, d, "step")
            if v is not self.step_object and (type(v) is not int or v != self.step):
                return False  # (1.0 or True: the validating path says what is wrong)
            if self.last_steps != NULL:
                r = _field(s, d, "row_step")
                if r is not self.row_steps[t] or (
                        r is not None and not cnp.PyArray_ISWRITEABLE(<cnp.ndarray>r)):
                    return False
            if self.ema != NULL:
                e = _field(s, d, "ema")
                if e is not self.emas[t] or not self._as_planned(t, self.width - 1, e) \
                        or cnp.PyArray_DATA(<cnp.ndarray>e) != self.ema[t] \
                        or not _same_dims(<cnp.ndarray>e, a):
                    return False
            bufs = self.buffers[t]
            for k in range(n_state):
                b = _field(s, d, <str>PyTuple_GET_ITEM(names, k))
                if <PyObject *>b != PyList_GET_ITEM(bufs, k):
                    return False
                if b is None:
                    continue
                if not self._as_planned(t, k + 1, b) or (
                        self.ptrs[k + 2] != NULL
                        and cnp.PyArray_DATA(<cnp.ndarray>b) != self.ptrs[k + 2][t]) \
                        or (self.shapes is None and not _same_dims(<cnp.ndarray>b, a)):
                    return False  # (a reshaped parameter: the full checks refuse its state)
            b = _field(s, d, "master")
            if <PyObject *>b != PyList_GET_ITEM(bufs, n_state):
                return False
            if b is not None and (not self._as_planned(t, n_state + 1, b) or (
                    self.storage.master != NULL
                    and cnp.PyArray_DATA(<cnp.ndarray>b) != self.storage.master[t])
                    or not _same_dims(<cnp.ndarray>b, a)):
                return False
        return True

    cdef bint take_grads(self, grads, Plan plan):
        """Check this batch's grads like check_like() would, and record their pointers."""
        cdef Py_ssize_t t
        cdef cnp.ndarray a
        cdef SparseGrad sg
        self.any_rows = False
        for t in range(self.count):
            g = grads[self.indices[t]]
            a = <cnp.ndarray>self.params[t]
            if type(g) is SparseGrad:
                sg = <SparseGrad>g
                if not _rows_fit(sg, a, self.grad_typenum, &self.rows[t]) \
                        or plan.hits_written(<size_t>cnp.PyArray_DATA(<cnp.ndarray>sg.values),
                                             <size_t>cnp.PyArray_NBYTES(<cnp.ndarray>sg.values)) \
                        or plan.hits_written(<size_t>cnp.PyArray_DATA(<cnp.ndarray>sg.indices),
                                             <size_t>cnp.PyArray_NBYTES(<cnp.ndarray>sg.indices)):
                    return False
                if self.exact:
                    if self.last_steps[t] == NULL:
                        return False  # the full path gives the state its row_step first
                    self.rows[t].last_step = self.last_steps[t]
                    self.rows[t].step = self.step + 1
                self.ptrs[1][t] = cnp.PyArray_DATA(<cnp.ndarray>sg.values)
                self.any_rows = True
                continue
            self.rows[t].indices = NULL
            self.rows[t].last_step = NULL
            if not _grad_fits(g, a, self.grad_typenum) or plan.hits_written(
                    <size_t>cnp.PyArray_DATA(<cnp.ndarray>g), <size_t>cnp.PyArray_NBYTES(<cnp.ndarray>g)):
                return False
            if self.exact and self.last_steps[t] != NULL:
                # rows behind: a dense gradient catches them up row by row
                self.rows[t].last_step = self.last_steps[t]
                self.rows[t].step = self.step + 1
                self.rows[t].row_len = <size_t>(cnp.PyArray_SIZE(a) // cnp.PyArray_DIMS(a)[0]) \
                    if cnp.PyArray_SIZE(a) else 1
                self.any_rows = True
            self.ptrs[1][t] = cnp.PyArray_DATA(<cnp.ndarray>g)
        return True

    def set_exact(self):
        """sparse="exact": rows of a state with a row_step are caught up before their update."""
        self.exact = True
        self.set_row_steps()

    def set_row_steps(self):
        """Keep each state's row_step (None: none) "the step that last updated the row": a
        lazy batch (run() marks the rows it updated), or exact (the C call writes it)."""
        cdef Py_ssize_t t
        self.row_steps = [s.row_step for s in self.states]
        self.last_steps = <int64_t **>calloc(max(self.count, 1), sizeof(int64_t *))
        if self.last_steps == NULL:
            raise MemoryError()
        for t in range(self.count):
            if self.row_steps[t] is not None:
                self.last_steps[t] = <int64_t *>cnp.PyArray_DATA(<cnp.ndarray>self.row_steps[t])

    def set_ema(self, double decay):
        """Update each state's `ema` buffer in the same pass as the rule (every tensor's
        stored alike: the caller groups them so)."""
        cdef Py_ssize_t t
        self.emas = [s.ema for s in self.states]
        self.ema_bfloat16 = _fo_dtype((<cnp.ndarray>self.emas[0]).dtype) == FO_BFLOAT16
        self.ema = <void **>calloc(max(self.count, 1), sizeof(void *))
        if self.ema == NULL:
            raise MemoryError()
        for t in range(self.count):
            self.ema[t] = cnp.PyArray_DATA(<cnp.ndarray>self.emas[t])
            self._plan_layout(t, self.width - 1, self.emas[t])
        self.ema_decay = decay

    def set_schedule(self, Schedule schedule):
        """lr = schedule(step) written into the struct before every C call."""
        self.schedule = schedule
        self.lr_offset = self.rule.double_offsets["lr"]

    cdef int reduce_into(self, StepOptions options) except -1:
        """The reduction pass over this batch's gradients (taken by take_grads)."""
        return options.add(self.grad_dtype, self.count, self.ptrs[1], self.sizes, self.index,
                           self.scratch)

    cdef void *_next_hyper(self) noexcept:
        """The group's struct with this batch's next step and its scheduled lr written in."""
        cdef int64_t next_step = self.step + 1
        cdef void *hp = self.hyper.data()
        if self.step_offset >= 0:
            (<int64_t *>(<char *>hp + self.step_offset))[0] = next_step
        if self.schedule is not None:
            (<double *>(<char *>hp + self.lr_offset))[0] = self.schedule.at(next_step)
        return hp

    cdef int precheck(self) except -1:
        """Raise what run() would raise for its values at the next step (the step count, the
        schedule's lr), changing nothing: a step of several batches checks them all before
        any batch runs."""
        _check_step_from(self.step)
        if fo_check(self.rule.id, self._next_hyper(), NULL, NULL) != FO_OK:
            _raise_for(FO_ERR_HYPERPARAM, self.hyper)
        return 0

    cdef void _mark_updated_rows(self, int64_t step) noexcept:
        """A lazy step's row_step: `step` for the rows it touched, for every row of a dense
        gradient, so that a later exact step catches a row up only through the steps it
        missed (the steps taken here are not applied again)."""
        cdef Py_ssize_t t
        cdef size_t j, n_rows
        cdef int64_t *last
        cdef const fo_rows *r
        for t in range(self.count):
            last = self.last_steps[t]
            if last == NULL:
                continue
            r = &self.rows[t]
            if r.indices == NULL:
                n_rows = <size_t>cnp.PyArray_SIZE(<cnp.ndarray>self.row_steps[t])
                with nogil:
                    for j in range(n_rows):
                        last[j] = step
            elif r.index_type == FO_INT32:
                with nogil:
                    for j in range(r.nnz):
                        last[(<const int32_t *>r.indices)[j]] = step
            else:
                with nogil:
                    for j in range(r.nnz):
                        last[(<const int64_t *>r.indices)[j]] = step

    cdef int run(self, StepOptions options=None) except -1:
        _check_step_from(self.step)
        cdef int status
        cdef int64_t next_step = self.step + 1
        cdef void *hp = self._next_hyper()
        cdef fo_step_options with_ema
        cdef const fo_step_options *opt = &options.c if options is not None else NULL
        if self.ema != NULL:
            with_ema.grad_multiplier = options.c.grad_multiplier if options is not None else 1.0
            with_ema.ema = self.ema
            with_ema.ema_decay = self.ema_decay
            with_ema.ema_bfloat16 = self.ema_bfloat16
            opt = &with_ema
        cdef const fo_rows *rows = self.rows if self.any_rows or self.shapes is not None else NULL
        with nogil:
            status = self.storage.run(self.rule.id, self.count, self.ptrs, self.n_bufs,
                                      self.sizes, hp, <uint64_t>next_step, opt, rows)
        _raise_for(status, self.hyper)
        if self.last_steps != NULL and not self.exact:
            self._mark_updated_rows(next_step)
        self.step = next_step
        self.step_object = step = next_step
        cdef Py_ssize_t t
        for t in range(self.count):
            d = self.fields[t]
            if d is None:
                (<object>PyList_GET_ITEM(self.states, t)).step = step
            else:
                PyDict_SetItem(d, "step", step)
        return 0


cdef object _instance_fields(object state, tuple buffers):
    """state's instance dict if every field a planned step reads or writes (step, the rule's
    buffers, master, ema, row_step) is a plain instance attribute, else None (getattr then)."""
    cls = type(state)
    if cls.__setattr__ is not object.__setattr__ or cls.__getattribute__ is not object.__getattribute__:
        return None  # the class sees its own attribute reads and writes
    d = getattr(state, "__dict__", None)
    if type(d) is not dict:
        return None
    for name in buffers + ("step", "master", "ema", "row_step"):
        if hasattr(_lookup(cls, name), "__set__"):
            return None  # a data descriptor (property, slot) comes before the instance dict
    return d


cdef inline object _field(object state, object fields, str name):
    """getattr(state, name), from its instance dict where _instance_fields gave one."""
    cdef PyObject *value
    if fields is not None:
        value = PyDict_GetItem(fields, name)
        if value != NULL:
            return <object>value
    return getattr(state, name)


cdef inline bint _same_dims(cnp.ndarray a, cnp.ndarray b):
    return cnp.PyArray_NDIM(a) == cnp.PyArray_NDIM(b) and memcmp(
        cnp.PyArray_DIMS(a), cnp.PyArray_DIMS(b), cnp.PyArray_NDIM(a) * sizeof(cnp.npy_intp)) == 0


cdef inline bint _grad_fits(object obj, cnp.ndarray a, int typenum=-1):
    """A plain ndarray of a's dtype (or of type number typenum), native order, of a's shape,
    C-contiguous."""
    if type(obj) is not cnp.ndarray:
        return False
    cdef cnp.ndarray g = <cnp.ndarray>obj
    if typenum < 0:
        typenum = cnp.PyArray_TYPE(a)
    return (cnp.PyArray_TYPE(g) == typenum and cnp.PyArray_ISNOTSWAPPED(g) and _same_dims(g, a)
            and cnp.PyArray_IS_C_CONTIGUOUS(g))


cdef inline size_t _row_len(cnp.ndarray a):
    """Elements per row of `a` viewed as rows along axis 0 (a 0-d array: one row of one)."""
    if cnp.PyArray_NDIM(a) == 0 or cnp.PyArray_DIMS(a)[0] == 0 or cnp.PyArray_SIZE(a) == 0:
        return 1
    return <size_t>(cnp.PyArray_SIZE(a) // cnp.PyArray_DIMS(a)[0])


cdef inline bint _state_fits(object obj, cnp.ndarray a, tuple shape):
    """A state buffer of `a`: _grad_fits, or (a row or factored rule's) of a's dtype and the
    given shape."""
    if shape is None:
        return _grad_fits(obj, a)
    if type(obj) is not cnp.ndarray:
        return False
    cdef cnp.ndarray b = <cnp.ndarray>obj
    return (cnp.PyArray_TYPE(b) == cnp.PyArray_TYPE(a) and cnp.PyArray_ISNOTSWAPPED(b)
            and (<object>b).shape == shape and cnp.PyArray_IS_C_CONTIGUOUS(b))


cdef inline void _set_layout(cnp.ndarray a, fo_rows *rows, CRule rule) noexcept:
    """How the C rule views `a`: a row rule's rows along axis 0; a factored rule's matrices,
    its last two dimensions (none: a vector)."""
    cdef int nd = cnp.PyArray_NDIM(a)
    if rule.factored:
        rows.matrix_rows = <size_t>cnp.PyArray_DIMS(a)[nd - 2] if nd >= 2 else 0
        rows.row_len = <size_t>cnp.PyArray_DIMS(a)[nd - 1] if nd >= 2 else 1
    else:
        rows.row_len = _row_len(a)  # (a row rule's; the others ignore a dense tensor's rows)


cdef inline bint _disjoint(cnp.ndarray a, cnp.ndarray b):
    cdef size_t sa = <size_t>cnp.PyArray_DATA(a), sb = <size_t>cnp.PyArray_DATA(b)
    cdef size_t na = <size_t>cnp.PyArray_NBYTES(a), nb = <size_t>cnp.PyArray_NBYTES(b)
    return na == 0 or nb == 0 or sa + na <= sb or sb + nb <= sa


cdef class _Spans:
    """The written buffers' byte ranges, sorted and disjoint: does a read buffer overlap one?"""
    cdef size_t *starts
    cdef size_t *ends
    cdef Py_ssize_t count

    def __cinit__(self, spans):
        spans = sorted(x for x in spans if x[1] > x[0])
        self.count = len(spans)
        self.starts = <size_t *>calloc(max(self.count, 1), sizeof(size_t))
        self.ends = <size_t *>calloc(max(self.count, 1), sizeof(size_t))
        if self.starts == NULL or self.ends == NULL:
            raise MemoryError()
        for k, (s0, e0) in enumerate(spans):
            self.starts[k], self.ends[k] = s0, e0

    def __dealloc__(self):
        free(self.starts)
        free(self.ends)

    cdef bint hits(self, size_t start, size_t nbytes):
        if nbytes == 0 or self.count == 0:
            return False
        cdef size_t end = start + nbytes
        cdef Py_ssize_t lo = 0, hi = self.count, mid
        while lo < hi:  # the first buffer starting at or after `end`
            mid = (lo + hi) // 2
            if self.starts[mid] < end:
                lo = mid + 1
            else:
                hi = mid
        return lo > 0 and self.ends[lo - 1] > start


cdef class Plan:
    """The batches of one optimizer, and what they were built from.

    direct: the hyperparameters that are one C field each, of the same name, holding a real
    number (lr, eps, ...): a change to them is written straight into the group's Hyper.
    """
    cdef list groups, group_lists, group_sizes, batches, params, hypers, versions, scheduled
    cdef dict state
    cdef frozenset direct
    cdef _Spans written
    # the rule takes no SparseGrad rows (its norms are over whole tensors): plain_step leaves
    # a step given rows to the caller's full path, which names the error
    cdef public bint dense_only

    def __cinit__(self, list groups, dict state, list batches, list hypers, direct):
        self.groups = groups
        self.group_lists = [g["params"] for g in groups]
        self.group_sizes = [len(lst) for lst in self.group_lists]
        self.versions = [getattr(g, "version", -1) for g in groups]
        self.scheduled = [type(g.get("lr")) is Schedule for g in groups]
        self.params = [p for g in groups for p in g["params"]]
        self.state = state
        self.batches = batches
        self.hypers = hypers
        self.direct = frozenset(direct)
        spans = [_span(p) for p in self.params]
        for s in state.values():
            for b in s.buffers().values():
                spans.append(_span(b))
            if getattr(s, "row_step", None) is not None:  # sparse="exact" writes it
                spans.append(_span(s.row_step))
        self.written = _Spans(spans)

    cdef bint hits_written(self, size_t start, size_t nbytes):
        return self.written.hits(start, nbytes)

    def refresh(self, list groups, checked):
        """After hyperparameters changed: writes the new values into the groups' Hypers.
        A change of `direct` keys only is converted and range-checked here; any other change
        goes through checked(k), the full validation of group k, which returns its Hyper (and
        raises on a bad value).  Returns False if the plan no longer fits (other groups or
        params, a value that needs the full path's error, options that need other buffers)."""
        if groups is not self.groups or len(groups) != len(self.group_lists):
            return False
        cdef Py_ssize_t k
        for k in range(len(groups)):
            g = groups[k]
            if type(g) is not ParamGroup or g.get("params") is not self.group_lists[k]:
                return False
            if (<ParamGroup>g).version != self.versions[k] \
                    and not self._refresh_group(k, <ParamGroup>g, checked):
                return False
        return True

    cdef int _refresh_group(self, Py_ssize_t k, ParamGroup g, object checked) except -1:
        """Group k's changed values into its Hyper: 1, or 0 (the plan unchanged for this
        group) if that needs the full path (checked None, or a value it must name)."""
        cdef Hyper old = self.hypers[k], new
        cdef unsigned uses = old.uses, new_uses
        cdef double saved[64]
        cdef PyObject *item
        if "lr" in g.changed and (self.scheduled[k] or _item_is_schedule(g, "lr")):
            return 0  # a schedule set or replaced: the batches are built again
        if "sparse" in g.changed:
            return 0  # the batches are built again
        if g.changed <= self.direct:
            memcpy(saved, old.storage, sizeof(saved))
            offsets = old.rule.double_offsets
            for key in g.changed:
                item = PyDict_GetItem(g, key)
                if item == NULL:  # removed: the full path names it
                    memcpy(old.storage, saved, sizeof(saved))
                    return 0
                value = <object>item
                if type(value) is not float and (type(value) is bool or not isinstance(value, numbers.Real)
                                                 or not -1e308 < value < 1e308):
                    memcpy(old.storage, saved, sizeof(saved))  # (10**400: no double)
                    return 0
                (<double *>(<char *>old.storage + <Py_ssize_t>offsets[key]))[0] = value
            if fo_check(old.rule.id, old.data(), &new_uses, NULL) != FO_OK or new_uses != uses \
                    or (old.exact and fo_check_exact(old.rule.id, old.data(), NULL) != FO_OK):
                memcpy(old.storage, saved, sizeof(saved))  # the full path names the error
                return 0
        else:
            if checked is None:
                return 0
            new = checked(k)
            if new.uses != uses:
                return 0
            memcpy(old.storage, new.storage, sizeof(old.storage))
        g.changed.clear()
        self.versions[k] = g.version
        return 1

    def run(self, list groups, dict state, grads, StepOptions options=None):
        """One step, if nothing it was built from has changed (changed `direct` values, a
        schedule's lr, are written into the plan on the way) and every grad is valid.
        Returns False, having changed no parameter or state, otherwise.  options: the
        reduction pass first, then the update with its multiplier, or nothing (skipped)."""
        return self._run(groups, state, grads, options)

    cdef bint _run(self, list groups, dict state, grads, StepOptions options) except -1:
        if groups is not self.groups or state is not self.state:
            return False
        cdef Py_ssize_t k, j, at = 0, n_groups = len(groups)
        if n_groups != len(self.group_lists) or len(state) != len(self.params):
            return False
        if type(grads) is not list and type(grads) is not tuple:
            return False
        if len(grads) != len(self.params):
            return False
        cdef list lst
        for k in range(n_groups):
            g = groups[k]
            lst = self.group_lists[k]
            if type(g) is not ParamGroup or PyDict_GetItem(g, "params") != <PyObject *>lst:
                return False
            if (<ParamGroup>g).version != self.versions[k] \
                    and not self._refresh_group(k, <ParamGroup>g, None):
                return False
            # the same parameters in the same places (no list built for the comparison), as
            # many in each group as planned (a parameter moved to the next group takes its lr)
            if len(lst) != self.group_sizes[k]:
                return False
            for j in range(len(lst)):
                if PyList_GET_ITEM(lst, j) != PyList_GET_ITEM(self.params, at + j):
                    return False
            at += len(lst)
        cdef Batch b
        for b in self.batches:
            if not b.unchanged(self.params, state) or not b.take_grads(grads, self):
                return False
        if options is not None and options.reduce:
            for b in self.batches:
                if b.any_rows:  # the reduction pass reads dense gradients only
                    return False
        if options is not None and not self._reduce(options):
            return True  # skipped: nothing changed
        self._run_batches(options)
        return True

    cdef int _run_batches(self, StepOptions options) except -1:
        """Every batch's C call; with several, each one's values are checked first, so that
        a refused value (a step-dependent one: a schedule's lr, a step count) changes nothing."""
        cdef Batch b
        if len(self.batches) > 1:
            for b in self.batches:
                b.precheck()
        for b in self.batches:
            b.run(options)
        return 0

    cdef bint _reduce(self, StepOptions options) except -1:
        """The reduction pass over the taken grads, if the options need one; True if the
        update goes ahead."""
        cdef Batch b
        options.start()
        if options.reduce:
            for b in self.batches:
                b.reduce_into(options)
        return options.finish()


    def run_locked(self, StepLock lock, list groups, dict state, grads, StepOptions options=None):
        """run() holding `lock` (the optimizer's), taken and released here at C cost."""
        return self._run_locked(lock, groups, state, grads, options)

    cdef bint _run_locked(self, StepLock lock, list groups, dict state, grads,
                          StepOptions options) except -1:
        lock.acquire()
        try:
            return self._run(groups, state, grads, options)
        finally:
            PyThread_release_lock(lock.lock)

    cdef object plain_step(self, front, grads, grad_scale, clip_norm, skip_nonfinite,
                           compute_norm):
        """The optimizer's step with its keywords at their defaults (no reduction pass), at C
        cost: holding front._lock, run() over front.param_groups and front.state.  Returns
        PLAIN_RESULT, or None, having changed nothing, for anything else (other keywords,
        rows where the rule takes none, a plan that no longer fits): the caller's full path
        then handles the step or names the error."""
        if clip_norm is not None or skip_nonfinite is not False or compute_norm is not False \
                or not ((type(grad_scale) is float or type(grad_scale) is int) and grad_scale == 1):
            return None
        if self.dense_only and (type(grads) is list or type(grads) is tuple):
            for g in grads:
                if type(g) is SparseGrad:
                    return None
        groups, state = front.param_groups, front.state
        if type(groups) is not list or type(state) is not dict:
            return None
        return PLAIN_RESULT if self._run_locked(front._lock, <list>groups, <dict>state, grads,
                                                None) else None

    def run_validated(self, grads, StepOptions options=None):
        """One step with grads that the caller has validated completely (plain arrays: views
        of any ndarray subclass), whatever the groups are (plain dicts included).  options:
        as run(), their reduction pass already made (StepOptions.add_arrays, finish)."""
        cdef Batch b
        for b in self.batches:
            if not b.take_grads(grads, self):
                raise RuntimeError("fastopt: a validated step was refused by the engine")
        self._run_batches(options)


def optimizer_step(self, grads, *, grad_scale=1.0, clip_norm=None, skip_nonfinite=False,
                   compute_norm=False):
    """Update every parameter in place from `grads` (one array per parameter, same shape and
    dtype, C-contiguous, or a fastopt.SparseGrad of its rows: see fastopt.Optimizer's `sparse`).
    Nothing is changed if any input is invalid.  Calls from several threads are serialized
    (one lock per optimizer).

    The training step's options (at most two passes over the gradients: a reduction when
    a norm or the finiteness check is needed, then the update, the factor folded into the
    rule's per-step scalars):
      g <- g / grad_scale                                     (unscaling mixed precision)
      skip_nonfinite: if any gradient element is inf or NaN, nothing changes (parameters,
          states, step counts) and the result says skipped
      clip_norm: g <- g min(1, clip_norm / (total_norm + 1e-6))   (torch's clip_grad_norm_)
    Returns a StepResult: total_norm (the L2 norm over all gradients after unscaling, in
    double with a fixed summation order; None unless clip_norm, skip_nonfinite or
    compute_norm) and skipped."""
    plan = self._plan
    if type(plan) is Plan:
        result = (<Plan>plan).plain_step(self, grads, grad_scale, clip_norm, skip_nonfinite,
                                         compute_norm)
        if result is not None:
            return result
    return self._full_step(grads, grad_scale, clip_norm, skip_nonfinite, compute_norm)


def reduces(StepOptions options):
    """Whether the options need the reduction pass over the gradients (a norm, a check)."""
    return options is not None and options.reduce


cdef tuple _span(cnp.ndarray a):
    cdef size_t start = <size_t>cnp.PyArray_DATA(a)
    return (start, start + <size_t>cnp.PyArray_NBYTES(a))


# The largest step count a state may hold (loaded, given to fastopt.functional, or checked
# before a step): the rules compute with t in double, exact up to 2**53, and from there the
# engine's int64 t + 1 is 2**63 - 2**53 steps away from overflowing.
cdef int64_t _MAX_STEP = 2 ** 53
MAX_STEP = _MAX_STEP


cdef inline int _check_step_from(int64_t step) except -1:
    """A state may hold MAX_STEP, but no step may take it past."""
    if step >= _MAX_STEP:
        raise ValueError(f"step: the state's step count is {step}, and 2**53 is the largest a "
                         "state may hold (the rules use t in double): no further step")
    return 0


def run_single(CRule rule, Hyper hyper, type state_type, object param, object grad,
               object state):
    """One tensor's step (fastopt.functional), if param, grad and state are all plain and
    fit (the checks check_param, check_like, state.check and check_no_overlap make), and the
    state holds every buffer the hyperparameters use.  Returns False, having changed nothing,
    otherwise: the caller then validates in Python and raises the precise error."""
    if type(param) is not cnp.ndarray:
        return False
    cdef cnp.ndarray p = <cnp.ndarray>param
    cdef int typ = cnp.PyArray_TYPE(p)
    if (typ != cnp.NPY_FLOAT32 and typ != cnp.NPY_FLOAT64) or not cnp.PyArray_ISNOTSWAPPED(p) \
            or not cnp.PyArray_IS_C_CONTIGUOUS(p) or not cnp.PyArray_ISWRITEABLE(p):
        return False
    if not _grad_fits(grad, p):
        return False
    if type(state) is not state_type:
        return False
    step = state.step
    if type(step) is not int or step < 0 or step > MAX_STEP:
        return False
    cdef void *addr[8]
    cdef void **ptrs[8]
    cdef list written = [p]
    cdef int k, n_bufs = 2 + len(rule.state)
    addr[0], addr[1] = cnp.PyArray_DATA(p), cnp.PyArray_DATA(<cnp.ndarray>grad)
    cdef bint shaped = rule.shaped_state
    for k, name in enumerate(rule.state):
        b = getattr(state, name)
        shape = state_type.buffer_shape(param, name) if shaped else None
        if b is None:
            if (hyper.uses >> k) & 1 and (shape is not None or not shaped):
                return False
            addr[k + 2] = NULL
            continue
        if (shaped and shape is None) or not _state_fits(b, p, shape) \
                or not cnp.PyArray_ISWRITEABLE(<cnp.ndarray>b):
            return False
        written.append(b)
        addr[k + 2] = cnp.PyArray_DATA(<cnp.ndarray>b) if (hyper.uses >> k) & 1 else NULL
    cdef Py_ssize_t i, j
    for i in range(len(written)):
        if not _disjoint(<cnp.ndarray>written[i], <cnp.ndarray>grad):
            return False
        for j in range(i + 1, len(written)):
            if not _disjoint(<cnp.ndarray>written[i], <cnp.ndarray>written[j]):
                return False
    for k in range(n_bufs):
        ptrs[k] = &addr[k]
    _check_step_from(step)
    cdef size_t n = cnp.PyArray_SIZE(p)
    cdef int64_t next_step = step + 1
    cdef void *hp = hyper.data()
    if rule.step_offset >= 0:
        (<int64_t *>(<char *>hp + rule.step_offset))[0] = next_step
    cdef int status
    cdef bint f64 = typ == cnp.NPY_FLOAT64
    cdef fo_rows rows
    memset(&rows, 0, sizeof(rows))
    _set_layout(p, &rows, rule)
    with nogil:
        status = _run_with(rule.id, f64, 1, ptrs, n_bufs, &n, hp, NULL, &rows)
    _raise_for(status, hyper)
    state.step = next_step
    return True


cdef class ParamGroup(dict):
    """A param group: a dict whose `version` counts its changes and `changed` names the keys
    changed since the plan last read them, so a step can tell cheaply what needs checking."""
    cdef public Py_ssize_t version
    cdef public set changed

    def __cinit__(self, *args, **kwargs):
        self.changed = set()

    cdef inline void _touch(self, keys):
        self.version += 1
        self.changed.update(keys)

    def __setitem__(self, key, value):
        self.version += 1
        self.changed.add(key)
        PyDict_SetItem(self, key, value)  # (dict's own store: no method lookup)

    def __delitem__(self, key):
        self._touch((key,))
        dict.__delitem__(self, key)

    def update(self, *args, **kwargs):
        other = dict(*args, **kwargs)
        self._touch(other)
        dict.update(self, other)

    def setdefault(self, key, default=None):
        self._touch((key,))
        return dict.setdefault(self, key, default)

    def pop(self, key, *args):
        self._touch((key,))
        return dict.pop(self, key, *args)

    def popitem(self):
        item = dict.popitem(self)
        self._touch((item[0],))
        return item

    def clear(self):
        self._touch(list(self))
        dict.clear(self)

    def __ior__(self, other):
        other = dict(other)
        self._touch(other)
        dict.update(self, other)
        return self

    def __reduce__(self):
        return (dict, (dict(self),))


cdef class _Table:
    """One batch's C pointer tables, built once: buffer k of tensor t at ptrs[k][t]
    (addresses[k], None for an unused state buffer; the grads' may be filled later)."""
    cdef void **ptrs[8]
    cdef size_t *n
    cdef fo_rows *rows  # NULL, or per tensor its gradient's rows (indices NULL: dense)
    cdef Py_ssize_t count
    cdef int n_bufs
    cdef bint f64
    cdef Storage storage               # None: every buffer float32 (float64 if f64)
    cdef uint64_t storage_step         # keys stochastic rounding
    cdef list indices
    cdef public list states, counters  # the front end's, for advancing its step counters
    cdef public object step            # the step number the next run is
    cdef list counters_left            # a copy of each counter array as the last step left it
    # its buffers are a checked step's (an ObjectPlan's, which re-checks them and every
    # gradient before each run): the C call skips its per-tensor overlap checks
    cdef bint planned

    def __cinit__(self, bint f64, list indices, list sizes, list addresses, list states=None,
                  list counters=None, step=None, list rows=None, Storage storage=None,
                  storage_step=0):
        self.f64, self.indices, self.count = f64, indices, len(indices)
        self.storage, self.storage_step = storage, storage_step
        self.states, self.counters, self.step = states, counters, step
        self.counters_left = [c.copy() for c in counters] if counters is not None else []
        cdef Py_ssize_t k, t
        self.n = <size_t *>calloc(max(self.count, 1), sizeof(size_t))
        if self.n == NULL:
            raise MemoryError()
        self.rows = NULL
        if rows is not None and any(r is not None for r in rows):
            # (indices address, int64?, nnz, row_len[, matrix_rows]) per tensor with a row
            # gradient or a layout (a row or factored rule's dense tensor)
            self.rows = <fo_rows *>calloc(max(self.count, 1), sizeof(fo_rows))
            if self.rows == NULL:
                raise MemoryError()
            for t in range(self.count):
                if rows[t] is not None:
                    address, wide, nnz, row_len = rows[t][:4]
                    self.rows[t].matrix_rows = rows[t][4] if len(rows[t]) > 4 else 0
                    self.rows[t].indices = <const void *><uintptr_t>address
                    self.rows[t].index_type = FO_INT64 if wide else FO_INT32
                    self.rows[t].nnz = nnz
                    self.rows[t].row_len = row_len
        for k in range(8):
            self.ptrs[k] = NULL
        self.n_bufs = len(addresses)
        for k in range(self.n_bufs):
            if k != 1 and addresses[k] is None:  # the grads' table always exists
                continue
            self.ptrs[k] = <void **>calloc(max(self.count, 1), sizeof(void *))
            if self.ptrs[k] == NULL:
                raise MemoryError()
            if addresses[k] is not None:
                for t in range(self.count):
                    self.ptrs[k][t] = <void *><uintptr_t>addresses[k][t]
        for t in range(self.count):
            self.n[t] = sizes[t]

    cdef bint counters_unchanged(self):
        """The step counters hold what the last planned step left (not reset in place:
        state["step"].zero_())."""
        cdef Py_ssize_t i
        for i in range(len(self.counters_left)):
            if not _same_bytes(self.counters[i], self.counters_left[i]):
                return False
        return True

    cdef void restore_counters(self):
        """The counters back to what the last planned step left."""
        cdef Py_ssize_t i
        for i in range(len(self.counters_left)):
            _copy_bytes(self.counters[i], self.counters_left[i])

    cdef void keep_counters(self):
        """What this step left in the counters, for the next step's comparison."""
        cdef Py_ssize_t i
        for i in range(len(self.counters_left)):
            _copy_bytes(self.counters_left[i], self.counters[i])

    cdef int run(self, CRule rule, Hyper hyper, double grad_multiplier=1.0) except -1:
        cdef int status
        cdef fo_step_options opt
        opt.grad_multiplier, opt.ema, opt.ema_decay = grad_multiplier, NULL, 0.0
        opt.ema_bfloat16 = 0
        if self.storage is not None:
            with nogil:
                status = self.storage.run(rule.id, self.count, self.ptrs, self.n_bufs, self.n,
                                          hyper.data(), self.storage_step,
                                          &opt if grad_multiplier != 1.0 else NULL, self.rows,
                                          self.planned)
            return _raise_for(status, hyper)
        with nogil:
            status = _run_with(rule.id, self.f64, self.count, self.ptrs, self.n_bufs, self.n,
                               hyper.data(), &opt if grad_multiplier != 1.0 else NULL, self.rows,
                               self.planned)
        return _raise_for(status, hyper)

    def __dealloc__(self):
        free(self.n)
        free(self.rows)
        for k in range(8):
            free(self.ptrs[k])


cdef inline void _copy_bytes(cnp.ndarray dst, cnp.ndarray src) noexcept:
    """dst's bytes <- src's (two arrays of one size: a counter and its copy)."""
    memcpy(cnp.PyArray_DATA(dst), cnp.PyArray_DATA(src), cnp.PyArray_NBYTES(src))


cdef inline bint _same_bytes(cnp.ndarray a, cnp.ndarray b):
    return cnp.PyArray_NBYTES(a) == cnp.PyArray_NBYTES(b) and \
        memcmp(cnp.PyArray_DATA(a), cnp.PyArray_DATA(b), cnp.PyArray_NBYTES(a)) == 0


cdef bint _same_values(dict group, tuple key):
    """Does a param group still hold key's (name, value, items) entries, and nothing else but
    its params?  (Identity first: a value nobody reassigned is the same object; a list, which
    can change in place (betas[0] = ...), is also compared with its items when planned.)"""
    if len(group) != len(key) + 1:
        return False
    for name, value, items in key:
        now = group.get(name, _MISSING)
        if now is not value and (type(now) is not type(value) or now != value):
            return False
        if items is not None and tuple(now) != items:
            return False
    return True


cdef object _MISSING = object()


cdef inline bint _item_is_schedule(dict d, key):
    cdef PyObject *value = PyDict_GetItem(d, key)
    return value != NULL and type(<object>value) is Schedule


cdef class _Member:
    """One parameter of a planned group: what the plan expects of it, and where its gradient's
    address goes (slot `slot` of `table`'s gradient pointers; no table without a gradient)."""
    cdef object param
    cdef bint has_grad
    cdef uintptr_t address
    cdef size_t nbytes
    cdef object dtype
    # its gradient's dtype and size, and its state buffers (and their addresses) in the tables
    cdef object grad_dtype
    cdef size_t grad_nbytes
    # (and each buffer's dtype and byte size: b.data = ... can land at the same address)
    cdef tuple state_buffers, state_addresses, state_dtypes, state_nbytes
    cdef _Table table
    cdef Py_ssize_t slot
    cdef object shape  # a row rule's: the parameter's shape (its rows) when planned
    cdef bint complex_valued  # (a complex gradient may be a lazily conjugated view)
    # the last gradient address found clear of every written buffer (a gradient is usually
    # where it was: the same tensor, or the allocator's same block)
    cdef uintptr_t clear_grad
    # what the C++ reads must find: the dtypes' codes (from the reader that made them), and
    # each state buffer's address, size and code
    cdef const fo_torch_access *codes_of
    cdef int dtype_code, grad_dtype_code
    cdef fo_tensor_view *state_views

    def __dealloc__(self):
        free(self.state_views)

    cdef bint set_codes(self, const fo_torch_access *reader) noexcept:
        """The planned dtypes' codes, as reader reports a tensor's (False: a dtype it cannot name)."""
        cdef Py_ssize_t i
        self.codes_of = NULL
        self.dtype_code = reader.dtype_code(<PyObject *>self.dtype)
        self.grad_dtype_code = reader.dtype_code(<PyObject *>self.grad_dtype) if self.has_grad else -1
        if self.dtype_code < 0 or (self.has_grad and self.grad_dtype_code < 0):
            return False
        for i in range(PyTuple_GET_SIZE(self.state_buffers)):
            self.state_views[i].dtype = reader.dtype_code(PyTuple_GET_ITEM(self.state_dtypes, i))
            if self.state_views[i].dtype < 0:
                return False
        self.codes_of = reader
        return True


cdef tuple _dict_values(object d):
    """A dict's (or a dict subclass's) values in PyDict_Next's order (an OrderedDict's own
    order may differ)."""
    cdef Py_ssize_t pos = 0
    cdef PyObject *value
    out = []
    while PyDict_Next(d, &pos, NULL, &value):
        out.append(<object>value)
    return tuple(out)


cdef extern from *:
    """
    /* A dict's version tag (PEP 509), which CPython changes on every change of the dict's
     * contents, through 3.11; later versions deprecate it (0 here: no shortcut). */
    #if PY_VERSION_HEX < 0x030C0000
    #define FO_DICT_VERSION(d) (((PyDictObject *)(d))->ma_version_tag)
    #else
    #define FO_DICT_VERSION(d) ((uint64_t)0)
    #endif
    """
    uint64_t FO_DICT_VERSION(object d)


cdef class _StateSnapshot:
    """An optimizer's state (a dict of per-parameter dicts) as it was when planned: the same
    entries in the same order, each holding the same values.  A state dict or buffer replaced
    since (opt.state[p] = {...}, opt.state[p]["exp_avg"] = ...) must not be written through a
    stale pointer.  Walked in the dict's own order, so no key is hashed; a dict whose version
    tag (FO_DICT_VERSION) is the one it had when it was last found unchanged is not walked
    again (no change since: a shortcut, the walk decides)."""
    cdef object state
    cdef list keys, dicts, values
    cdef uint64_t version            # the state dict's, when last found unchanged (0: none)
    cdef uint64_t *versions          # each entry's dict's (0: none)

    def __cinit__(self, state):
        self.state = state
        self.keys, self.dicts, self.values = [], [], []
        self.version, self.versions = 0, NULL
        if not isinstance(state, dict):
            self.keys = None  # never unchanged: each step validates
            return
        for k, v in state.items():
            self.keys.append(k)
            self.dicts.append(v)
            # a dict (or a subclass: OrderedDict, defaultdict) by its values in the order the
            # walk below sees them; anything else by identity alone
            self.values.append(_dict_values(v) if isinstance(v, dict) else None)
        self.versions = <uint64_t *>calloc(max(len(self.keys), 1), sizeof(uint64_t))
        if self.versions == NULL:
            raise MemoryError()

    def __dealloc__(self):
        free(self.versions)

    cdef bint unchanged(self):
        cdef Py_ssize_t pos = 0, i = 0, n
        cdef PyObject *key
        cdef PyObject *value
        if self.keys is None or PyDict_Size(self.state) != len(self.keys):
            return False
        n = len(self.keys)
        if self.version == 0 or FO_DICT_VERSION(self.state) != self.version:
            while PyDict_Next(self.state, &pos, &key, &value):
                if key != PyList_GET_ITEM(self.keys, i) or value != PyList_GET_ITEM(self.dicts, i):
                    return False
                i += 1
        for i in range(n):
            if PyList_GET_ITEM(self.values, i) != <PyObject *>None and not self._entry_unchanged(i):
                return False
        self.version = FO_DICT_VERSION(self.state)
        return True

    cdef bint _entry_unchanged(self, Py_ssize_t i):
        """Entry i's dict holds the values it held (its version tag then remembered)."""
        cdef Py_ssize_t inner = 0, j = 0
        cdef PyObject *item
        d = <object>PyList_GET_ITEM(self.dicts, i)
        cdef uint64_t version = FO_DICT_VERSION(d)
        if version != 0 and version == self.versions[i]:
            return True
        held = <object>PyList_GET_ITEM(self.values, i)
        if PyDict_Size(d) != PyTuple_GET_SIZE(held):
            return False
        while PyDict_Next(d, &inner, NULL, &item):
            if item != PyTuple_GET_ITEM(held, j):
                return False
            j += 1
        self.versions[i] = version
        return True

    cdef void refresh(self, Py_ssize_t i):
        """Entry i's values as they are now (the plan's own writes to it)."""
        self.values[i] = _dict_values(self.dicts[i])
        self.versions[i] = FO_DICT_VERSION(self.dicts[i])


cdef class ObjectPlan:
    """The engine's planned step for parameters that are not numpy arrays (fastopt.torch's
    tensors): built by the front end after a fully validated step, it checks at C speed, on
    later steps, what can change (the same groups, hyperparameter values, state, parameters
    and their addresses; which parameters have a gradient; each gradient dense, contiguous, and
    where it is; a sparse gradient is never contiguous), then asks the front end to advance its
    counters and give each batch's C fields, and makes one C call per batch.  run() returns
    False, having changed nothing, when anything differs: the front end then validates and
    plans again.

    front: the optimizer (param_groups, state, advance_planned, kernel_args, planned_step_after);
    groups: per param group (group dict, hp, key values, params list, members [(param, has
    grad, address, state, bytes)], batches [_Table] whose indices count the members with a
    gradient, keeps_state); mark_written(written): tells autograd which tensors the kernels
    wrote.
    """
    cdef CRule rule
    cdef object groups_list, mark_written, written
    cdef _StateSnapshot state
    cdef list groups, members, hps, keys, tables
    cdef _Spans spans
    # the tensor type's own getter of .grad and its methods, called without attribute lookups
    # (about a third of the per-tensor cost), for parameters of a type known to use them
    cdef PyGetSetDef *grad_of
    cdef PyGetSetDef *dtype_of
    cdef PyGetSetDef *nbytes_of
    cdef object grad_descr, known_type, known_param, is_contiguous, data_ptr
    # the front end's storage entry (a dict in its state whose "step" keys stochastic
    # rounding: one more each step), its position in the state, or None
    cdef dict storage_entry
    cdef Py_ssize_t storage_at

    def __cinit__(self, CRule rule, front, list groups, mark_written, list written,
                  list written_spans, tensor_type=None, storage_key=None):
        self.rule = rule
        self.grad_of = self.dtype_of = self.nbytes_of = NULL
        if tensor_type is not None:
            self.grad_of = _getset(tensor_type, "grad")
            self.dtype_of = _getset(tensor_type, "dtype")
            self.nbytes_of = _getset(tensor_type, "nbytes")
            if self.dtype_of == NULL or self.nbytes_of == NULL:
                self.grad_of = NULL  # (all three or none: attribute reads then)
            self.grad_descr = _lookup(tensor_type, "grad")
            self.known_type = tensor_type
            self.is_contiguous, self.data_ptr = tensor_type.is_contiguous, tensor_type.data_ptr
        self.spans = _Spans(written_spans)
        self.groups_list = front.param_groups
        self.state = _StateSnapshot(front.state)
        self.storage_entry = None
        if storage_key is not None and storage_key in front.state:
            self.storage_entry = front.state[storage_key]
            self.storage_at = list(front.state).index(storage_key)
            if type(self.storage_entry) is not dict or type(self.storage_entry["step"]) is not int:
                raise TypeError("ObjectPlan: the storage entry must be a dict with an int step")
        self.groups = groups
        self.mark_written = mark_written
        self.written = written
        self.members = [self._members(g[4], g[5]) for g in groups]
        self.tables = [table for g in groups for table in g[5]]  # in the order they run
        for table in self.tables:
            (<_Table>table).planned = True
        self.hps = [g[1] for g in groups]
        self.keys = [g[2] for g in groups]

    cdef inline bint _known(self, p):
        """Whether p's .grad is the tensor type's own getter (p of that type, or of a subclass
        such as nn.Parameter that does not override it, remembered once found)."""
        t = type(p)
        if t is self.known_type or t is self.known_param:
            return True
        if isinstance(p, self.known_type) and _lookup(t, "grad") is self.grad_descr:
            self.known_param = t
            return True
        return False

    cdef bint _fits(self, t, dtype, size_t nbytes, bint direct) except -1:
        """Tensor t still has this dtype and byte size: t.data = ... swaps both (and the
        memory, which the address checks see)."""
        try:
            if direct:
                return self.dtype_of.get(t, self.dtype_of.closure) is dtype and \
                    <size_t>self.nbytes_of.get(t, self.nbytes_of.closure) == nbytes
            return t.dtype is dtype and t.nbytes == nbytes
        except RuntimeError:  # a sparse tensor has no nbytes (and never runs planned)
            return False

    cdef bint _buffers_in_place(self, _Member m) except -1:
        """m's state buffers are where the tables point, with the dtype, byte size and layout
        they were planned with (b.data = ... or b.set_(...) keep the tensor object, and the
        allocator may hand the new data the old address)."""
        cdef Py_ssize_t i
        cdef bint direct
        for i in range(PyTuple_GET_SIZE(m.state_buffers)):
            b = <object>PyTuple_GET_ITEM(m.state_buffers, i)
            direct = type(b) is self.known_type and self.grad_of != NULL
            if not self._fits(b, <object>PyTuple_GET_ITEM(m.state_dtypes, i),
                              <size_t><object>PyTuple_GET_ITEM(m.state_nbytes, i), direct):
                return False
            if direct:
                at = PyObject_CallOneArg(self.data_ptr, b)
                contiguous = PyObject_CallOneArg(self.is_contiguous, b)
            else:
                at, contiguous = b.data_ptr(), b.is_contiguous()
            if at != <object>PyTuple_GET_ITEM(m.state_addresses, i) or not contiguous:
                return False
        return True

    cdef int _read_natively(self, _Member m, object p, uintptr_t *grad_at) noexcept:
        """m's checks through the C++ reads (p: of a plain type): 1 it fits, its gradient at
        *grad_at; 2 it fits, without a gradient; 0 it does not fit; -1 the Python route must
        read it (a sparse gradient, a state buffer of another type)."""
        cdef int found
        cdef const fo_torch_access *reader = _torch_access
        cdef fo_tensor_view v
        cdef const fo_tensor_view *want
        cdef Py_ssize_t i
        cdef PyObject *b
        cdef fo_tensor_view pv
        if m.codes_of != reader and not m.set_codes(reader):
            return -1
        found = reader.grad_view(<PyObject *>p, &v, &pv)
        if found <= 0:  # (-2: a lazily conjugated or negated view, -3: a gradient of another
            # shape than its parameter's, both of which a first step refuses)
            return 0 if found <= -2 else -1 if found < 0 else (0 if m.has_grad else 2)
        if not m.has_grad or v.dtype != m.grad_dtype_code or v.nbytes != m.grad_nbytes or \
                not v.contiguous or pv.dtype != m.dtype_code or pv.nbytes != m.nbytes or \
                not pv.contiguous or <uintptr_t>pv.data != m.address:
            return 0
        grad_at[0] = <uintptr_t>v.data
        for i in range(PyTuple_GET_SIZE(m.state_buffers)):
            b = PyTuple_GET_ITEM(m.state_buffers, i)
            if type(<object>b) is not self.known_type:
                return -1
            want = &m.state_views[i]
            found = reader.view(b, &v)
            if found == -1:
                return -1
            if found != 1 or v.dtype != want.dtype or v.nbytes != want.nbytes or \
                    not v.contiguous or v.data != want.data:
                return 0
        return 1

    @staticmethod
    def _members(list described, list tables):
        cdef _Table table
        cdef _Member m
        cdef Py_ssize_t t, i
        where = {}  # a gradient's position among the group's gradients -> (table, slot)
        for table in tables:
            for t in range(table.count):
                where[table.indices[t]] = (table, t)
        members, with_grad = [], 0
        for p, has_grad, address, _, nbytes, grad_layout, buffers in described:
            m = _Member()
            m.param, m.has_grad, m.address, m.nbytes = p, has_grad, address, nbytes
            m.dtype = p.dtype
            m.grad_dtype, m.grad_nbytes = grad_layout if has_grad else (None, 0)
            m.state_buffers = tuple(buffers)
            m.state_addresses = tuple(b.data_ptr() for b in buffers)
            m.state_dtypes = tuple(b.dtype for b in buffers)
            m.state_nbytes = tuple(b.nbytes for b in buffers)
            m.state_views = <fo_tensor_view *>calloc(max(len(buffers), 1), sizeof(fo_tensor_view))
            if m.state_views == NULL:
                raise MemoryError()
            for i in range(len(buffers)):
                m.state_views[i].data = <void *><uintptr_t>m.state_addresses[i]
                m.state_views[i].nbytes = m.state_nbytes[i]
            m.shape = p.shape
            m.complex_valued = p.is_complex()
            if has_grad:
                m.table, m.slot = where[with_grad]
                with_grad += 1
            members.append(m)
        return members

    def run(self, front, key_of, double grad_multiplier=1.0):
        """One step, or False (nothing changed) if the plan no longer fits.  A group whose
        values changed (an lr schedule) is re-checked by front.refreshed_hyperparameters(index,
        group, hp), which raises for an invalid value or returns None when the change reaches
        the plan's tables (another state buffer); the tables stay otherwise.  grad_multiplier:
        every gradient is multiplied by it first (GradScaler's unscaling), in the C call."""
        global _cpp_grad_reads, _cpp_version_bumps
        if front.param_groups is not self.groups_list or front.state is not self.state.state \
                or len(self.groups_list) != len(self.groups) or not self.state.unchanged():
            return False
        cdef Py_ssize_t gi, t
        cdef _Table table
        cdef _Member m
        cdef list members, params_list
        cdef uintptr_t at
        cdef bint shaped = self.rule.shaped_state, getter = self.grad_of != NULL
        cdef bint native = _torch_access != NULL and getter
        cdef int read
        for table in self.tables:
            if not table.counters_unchanged():
                return False
        # every check first; a gradient's address goes straight into its table, which only a
        # complete pass of checks lets run
        for gi in range(len(self.groups)):
            group, _, _, params_list, _, _, _ = self.groups[gi]
            g = self.groups_list[gi]
            if g is not group or g["params"] is not params_list:
                return False
            if not _same_values(g, self.keys[gi]):
                key = key_of(g)
                hp = front.refreshed_hyperparameters(gi, g, self.hps[gi]) if key else None
                if hp is None:
                    return False
                self.hps[gi], self.keys[gi] = hp, key
            members = self.members[gi]
            if len(params_list) != len(members):
                return False
            for t in range(len(members)):
                m = members[t]
                p = m.param
                if params_list[t] is not p:
                    return False
                if shaped and p.shape != m.shape:
                    return False  # p.data reshaped: its rows (or matrices) are others now
                read = self._read_natively(m, p, &at) if native and \
                    type(p) in _torch_plain_types else -1
                if read == 0:
                    return False
                if read > 0:
                    _cpp_grad_reads += 1
                if read == 2:
                    continue
                if read < 0:  # torch's getters and methods
                    direct = getter and self._known(p)
                    grad = self.grad_of.get(p, self.grad_of.closure) if direct else p.grad
                    if grad is None:
                        if m.has_grad:
                            return False
                        continue
                    if not m.has_grad or not self._fits(p, m.dtype, m.nbytes, direct):
                        return False
                    direct = direct and type(grad) is self.known_type
                    if not self._fits(grad, m.grad_dtype, m.grad_nbytes, direct) \
                            or grad.shape != p.shape or not self._buffers_in_place(m) \
                            or (m.complex_valued and grad.is_conj()):
                        return False
                    try:  # a sparse COO gradient says False; a CSR one raises
                        if direct:  # (p.data = p.data.t() keeps its address, dtype and size)
                            if not PyObject_CallOneArg(self.is_contiguous, grad) or \
                                    <uintptr_t>PyObject_CallOneArg(self.data_ptr, p) != m.address or \
                                    not PyObject_CallOneArg(self.is_contiguous, p):
                                return False
                            at = PyObject_CallOneArg(self.data_ptr, grad)
                        else:
                            if not grad.is_contiguous() or p.data_ptr() != m.address or \
                                    not p.is_contiguous():
                                return False
                            at = grad.data_ptr()
                    except RuntimeError:
                        return False
                if at != m.clear_grad:
                    if self.spans.hits(<size_t>at, m.grad_nbytes):
                        return False
                    m.clear_grad = at
                m.table.ptrs[1][m.slot] = <void *>at
        # every gradient fits: this is the step.  The counters advance and every table's
        # values are made first; with several tables each is checked before any runs, and a
        # refused one (a step-dependent value) puts the counters back as the last step left them
        runs = []
        cdef list tables = self.tables
        cdef Py_ssize_t i, done = 0
        storage_step = None
        if self.storage_entry is not None:  # this step's number keys stochastic rounding
            storage_step = self.storage_entry["step"] + 1
            for table in tables:
                table.storage_step = storage_step
        try:
            if storage_step is not None:
                self.storage_entry["step"] = storage_step
                self.state.refresh(self.storage_at)
            for gi in range(len(self.groups)):
                hp = self.hps[gi]
                for table in self.groups[gi][5]:
                    step = front.advance_planned(hp, table.states, table.counters, table.step)
                    runs.append((table, hp, step,
                                 Hyper(self.rule, front.kernel_args(hp, step, table.states[0]))))
            if len(runs) > 1:
                for table, _, _, hyper in runs:
                    (<Hyper>hyper).check()
            for table, hp, step, hyper in runs:
                table.run(self.rule, hyper, grad_multiplier)
                table.step = front.planned_step_after(hp, step)
                table.keep_counters()
                done += 1
        except BaseException:
            for i in range(done, len(tables)):  # (a table's C call refuses before it writes)
                (<_Table>tables[i]).restore_counters()
            if storage_step is not None and done == 0:
                self.storage_entry["step"] = storage_step - 1
                self.state.refresh(self.storage_at)
            raise
        if _torch_access == NULL or _torch_access.bump_versions(<PyObject *>self.written, 0) != 0:
            self.mark_written(self.written)
        else:
            _cpp_version_bumps += 1
        return True


def run_addresses(CRule rule, bint f64, list addresses, list sizes, dict fields,
                  list rows=None, double grad_multiplier=1.0, Storage storage=None,
                  storage_step=0):
    """One C call over raw buffer addresses (fastopt.torch's validating path: its tensors are
    not numpy arrays): addresses[k] lists buffer k's address for every tensor (param, grad,
    then the rule's state buffers; None for an unused one), fields the hyperparameter struct's;
    every gradient multiplied by grad_multiplier first.  rows: None, or per tensor None (a
    dense gradient) or (indices address, int64 (else int32), nnz, row_len) for a gradient given
    as rows (fastopt.h, "Sparse rows"), its values at the grad's address.  storage (bfloat16
    buffers, master weights) and storage_step (the step that keys stochastic rounding): how
    the buffers are stored (None: all float32/float64)."""
    _Table(f64, list(range(len(sizes))), sizes, addresses, rows=rows, storage=storage,
           storage_step=storage_step).run(rule, Hyper(rule, fields), grad_multiplier)
