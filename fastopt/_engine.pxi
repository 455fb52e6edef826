# The optimizers' step engine (included by _kernels.pyx).
#
# Optimizer.step validates everything once in Python (fastopt/optim.py) and then builds a Plan:
# the parameters grouped into Batches (one param group, one dtype, one step count), each holding
# C arrays of buffer pointers.  Later steps go through Plan.run, which checks at C speed that
# nothing changed (same groups, params, states, buffers, pointers) and that every grad is right
# (type, dtype, shape, layout, no overlap with a written buffer), and then makes one C call
# per batch.  Anything unexpected returns False and the caller takes the validating path, which
# raises the precise error or builds a new plan.
from libc.stdlib cimport calloc, free
from libc.string cimport memcmp

RULE_IDS = {"sgd": 0, "adagrad": 1, "adadelta": 2, "rmsprop": 3, "adam": 4, "adamax": 5, "nadam": 6}

cdef enum:
    R_SGD, R_ADAGRAD, R_ADADELTA, R_RMSPROP, R_ADAM, R_ADAMAX, R_NADAM
    MAX_KINDS = 5  # param, grad, and up to three state buffers


cdef union Hyper:
    fo_sgd_params sgd
    fo_adagrad_params adagrad
    fo_adadelta_params adadelta
    fo_rmsprop_params rmsprop
    fo_adam_params adam
    fo_adamax_params adamax
    fo_nadam_params nadam


cdef int set_hyper(Hyper *hp, int rule, dict kernel_args) except -1:
    """The rule's C struct from a dict of exactly its fields (Rule.kernel_args)."""
    if rule == R_SGD: hp.sgd = kernel_args
    elif rule == R_ADAGRAD: hp.adagrad = kernel_args
    elif rule == R_ADADELTA: hp.adadelta = kernel_args
    elif rule == R_RMSPROP: hp.rmsprop = kernel_args
    elif rule == R_ADAM: hp.adam = kernel_args
    elif rule == R_ADAMAX: hp.adamax = kernel_args
    else: hp.nadam = kernel_args
    return 0


cdef int call_batch(int rule, bint f64, size_t c, void ***p, size_t *n, Hyper *hp,
                    int64_t step) noexcept nogil:
    if rule == R_SGD:
        hp.sgd.step = step
        if f64:
            return fo_sgd_many_f64(c, <double **>p[0], <const double **>p[1], <double **>p[2], n, &hp.sgd)
        return fo_sgd_many_f32(c, <float **>p[0], <const float **>p[1], <float **>p[2], n, &hp.sgd)
    if rule == R_ADAGRAD:
        if f64:
            return fo_adagrad_many_f64(c, <double **>p[0], <const double **>p[1], <double **>p[2], n, &hp.adagrad)
        return fo_adagrad_many_f32(c, <float **>p[0], <const float **>p[1], <float **>p[2], n, &hp.adagrad)
    if rule == R_ADADELTA:
        if f64:
            return fo_adadelta_many_f64(c, <double **>p[0], <const double **>p[1], <double **>p[2],
                                        <double **>p[3], n, &hp.adadelta)
        return fo_adadelta_many_f32(c, <float **>p[0], <const float **>p[1], <float **>p[2],
                                    <float **>p[3], n, &hp.adadelta)
    if rule == R_RMSPROP:
        if f64:
            return fo_rmsprop_many_f64(c, <double **>p[0], <const double **>p[1], <double **>p[2],
                                       <double **>p[3], <double **>p[4], n, &hp.rmsprop)
        return fo_rmsprop_many_f32(c, <float **>p[0], <const float **>p[1], <float **>p[2],
                                   <float **>p[3], <float **>p[4], n, &hp.rmsprop)
    if rule == R_ADAM:
        hp.adam.step = step
        if f64:
            return fo_adam_many_f64(c, <double **>p[0], <const double **>p[1], <double **>p[2],
                                    <double **>p[3], <double **>p[4], n, &hp.adam)
        return fo_adam_many_f32(c, <float **>p[0], <const float **>p[1], <float **>p[2],
                                <float **>p[3], <float **>p[4], n, &hp.adam)
    if rule == R_ADAMAX:
        hp.adamax.step = step
        if f64:
            return fo_adamax_many_f64(c, <double **>p[0], <const double **>p[1], <double **>p[2],
                                      <double **>p[3], n, &hp.adamax)
        return fo_adamax_many_f32(c, <float **>p[0], <const float **>p[1], <float **>p[2],
                                  <float **>p[3], n, &hp.adamax)
    hp.nadam.step = step
    if f64:
        return fo_nadam_many_f64(c, <double **>p[0], <const double **>p[1], <double **>p[2],
                                 <double **>p[3], n, &hp.nadam)
    return fo_nadam_many_f32(c, <float **>p[0], <const float **>p[1], <float **>p[2],
                             <float **>p[3], n, &hp.nadam)


cdef class Batch:
    """Tensors of one param group, one dtype and one step count: one C call per step.

    slots: the state buffer names in the kernel's order, None where the options leave one
    unused.  kernel_args: the hyperparameter struct's fields (see Rule.kernel_args).
    """
    cdef int rule
    cdef bint f64
    cdef Py_ssize_t count
    cdef void **ptrs[MAX_KINDS]
    cdef size_t *sizes
    cdef Hyper hp
    cdef int64_t step
    cdef list params, states, slots, indices, buffers
    cdef public Py_ssize_t group_index

    def __cinit__(self, str rule, list params, list states, list indices, tuple slots,
                  dict kernel_args, int64_t step):
        self.rule = RULE_IDS[rule]
        self.params, self.states, self.indices = params, states, indices
        self.count = len(params)
        self.f64 = (<cnp.ndarray>params[0]).dtype.itemsize == 8
        self.slots = [s for s in slots]
        self.step = step
        self.sizes = <size_t *>calloc(max(self.count, 1), sizeof(size_t))
        cdef Py_ssize_t k, t
        for k in range(MAX_KINDS):
            used = k < 2 or (k - 2 < len(slots) and slots[k - 2] is not None)
            self.ptrs[k] = <void **>calloc(max(self.count, 1), sizeof(void *)) if used else NULL
        if self.sizes == NULL or self.ptrs[0] == NULL or self.ptrs[1] == NULL:
            raise MemoryError()
        # per tensor: every buffer its state holds, in slot order (BUFFERS), used by this batch
        # or not, so a step can tell that none was replaced since the full validation
        self.buffers = []
        cdef cnp.ndarray a
        for t in range(self.count):
            a = params[t]
            self.ptrs[0][t] = cnp.PyArray_DATA(a)
            self.sizes[t] = cnp.PyArray_SIZE(a)
            bufs = [getattr(states[t], name) for name in states[t].BUFFERS]
            self.buffers.append(bufs)
            for k, b in enumerate(bufs):
                if slots[k] is not None:
                    if self.ptrs[k + 2] == NULL:
                        raise MemoryError()
                    self.ptrs[k + 2][t] = cnp.PyArray_DATA(<cnp.ndarray>b)
        self.set_hyperparameters(kernel_args)

    cpdef set_hyperparameters(self, dict kernel_args):
        set_hyper(&self.hp, self.rule, kernel_args)

    def __dealloc__(self):
        free(self.sizes)
        for k in range(MAX_KINDS):
            free(self.ptrs[k])

    cdef bint unchanged(self, list params, dict state):
        """Same params (and data pointers, still writeable), same states and buffers."""
        cdef Py_ssize_t t, k
        cdef cnp.ndarray a
        for t in range(self.count):
            i = self.indices[t]
            a = self.params[t]
            if params[i] is not a or cnp.PyArray_DATA(a) != self.ptrs[0][t] \
                    or not cnp.PyArray_ISWRITEABLE(a):
                return False
            s = self.states[t]
            if state.get(i) is not s or s.step != self.step:
                return False
            bufs = self.buffers[t]
            for k, name in enumerate(s.BUFFERS):
                b = getattr(s, name)
                if b is not bufs[k]:
                    return False
                if b is None:
                    continue
                if not cnp.PyArray_ISWRITEABLE(<cnp.ndarray>b) or (
                        self.slots[k] is not None
                        and cnp.PyArray_DATA(<cnp.ndarray>b) != self.ptrs[k + 2][t]):
                    return False
        return True

    cdef bint take_grads(self, grads, Plan plan):
        """Check this batch's grads like check_like() would, and record their pointers."""
        cdef Py_ssize_t t
        cdef cnp.ndarray a, g
        for t in range(self.count):
            obj = grads[self.indices[t]]
            if type(obj) is not cnp.ndarray:
                return False
            g = <cnp.ndarray>obj
            a = <cnp.ndarray>self.params[t]
            if cnp.PyArray_TYPE(g) != cnp.PyArray_TYPE(a) or not cnp.PyArray_ISNOTSWAPPED(g) \
                    or cnp.PyArray_NDIM(g) != cnp.PyArray_NDIM(a) \
                    or memcmp(cnp.PyArray_DIMS(g), cnp.PyArray_DIMS(a),
                              cnp.PyArray_NDIM(a) * sizeof(cnp.npy_intp)) != 0 \
                    or not cnp.PyArray_IS_C_CONTIGUOUS(g):
                return False
            if plan.hits_written(<size_t>cnp.PyArray_DATA(g), <size_t>cnp.PyArray_NBYTES(g)):
                return False
            self.ptrs[1][t] = cnp.PyArray_DATA(g)
        return True

    cdef int run(self) except -1:
        cdef int status
        cdef int64_t next_step = self.step + 1
        with nogil:
            status = call_batch(self.rule, self.f64, self.count, self.ptrs, self.sizes, &self.hp,
                                next_step)
        _check(status)
        self.step = next_step
        for s in self.states:
            s.step = next_step
        return 0


cdef class Plan:
    """The batches of one optimizer, and what they were built from."""
    cdef list groups, group_lists, batches, params
    cdef dict state
    cdef object versions
    cdef size_t *starts
    cdef size_t *ends
    cdef Py_ssize_t n_written

    def __cinit__(self, list groups, dict state, list batches):
        self.groups = groups
        self.group_lists = [g["params"] for g in groups]
        self.versions = [getattr(g, "version", -1) for g in groups]
        self.params = [p for g in groups for p in g["params"]]
        self.state = state
        self.batches = batches
        spans = []
        for p in self.params:
            spans.append(_span(p))
        for s in state.values():
            for b in s.buffers().values():
                spans.append(_span(b))
        spans = sorted(x for x in spans if x[1] > x[0])
        self.n_written = len(spans)
        self.starts = <size_t *>calloc(max(self.n_written, 1), sizeof(size_t))
        self.ends = <size_t *>calloc(max(self.n_written, 1), sizeof(size_t))
        if self.starts == NULL or self.ends == NULL:
            raise MemoryError()
        for k, (s0, e0) in enumerate(spans):
            self.starts[k], self.ends[k] = s0, e0

    def __dealloc__(self):
        free(self.starts)
        free(self.ends)

    cdef bint hits_written(self, size_t start, size_t nbytes):
        """Does [start, start + nbytes) overlap a written buffer?  (They are sorted, disjoint.)"""
        if nbytes == 0 or self.n_written == 0:
            return False
        cdef size_t end = start + nbytes
        cdef Py_ssize_t lo = 0, hi = self.n_written, mid
        while lo < hi:  # the first buffer starting at or after `end`
            mid = (lo + hi) // 2
            if self.starts[mid] < end:
                lo = mid + 1
            else:
                hi = mid
        return lo > 0 and self.ends[lo - 1] > start

    def refresh(self, list groups, checked):
        """After hyperparameters changed (a schedule): checked(k) validates group k and returns
        (slots, kernel_args); the batches take the new values.  Returns False if the plan no
        longer fits (other groups or params, or the options need other buffers)."""
        if groups is not self.groups or len(groups) != len(self.group_lists):
            return False
        cdef Batch b
        for k in range(len(groups)):
            g = groups[k]
            if type(g) is not ParamGroup or g.get("params") is not self.group_lists[k]:
                return False
            if (<ParamGroup>g).version == self.versions[k]:
                continue
            version = (<ParamGroup>g).version
            slots, kernel_args = checked(k)
            for b in self.batches:
                if b.group_index == k and b.slots != list(slots):
                    return False
            for b in self.batches:
                if b.group_index == k:
                    b.set_hyperparameters(kernel_args)
            self.versions[k] = version
        return True

    def run(self, list groups, dict state, grads):
        """One step, if nothing it was built from has changed and every grad is valid.
        Returns False, having changed nothing, otherwise."""
        if groups is not self.groups or state is not self.state:
            return False
        cdef Py_ssize_t k, n_groups = len(groups)
        if n_groups != len(self.group_lists) or len(state) != len(self.params):
            return False
        if type(grads) is not list and type(grads) is not tuple:
            return False
        if len(grads) != len(self.params):
            return False
        for k in range(n_groups):
            g = groups[k]
            lst = self.group_lists[k]
            if type(g) is not ParamGroup or (<ParamGroup>g).version != self.versions[k] \
                    or g.get("params") is not lst:
                return False
        cdef list params = []
        for lst in self.group_lists:
            params.extend(lst)
        if len(params) != len(self.params):
            return False
        cdef Batch b
        for b in self.batches:
            if not b.unchanged(params, state) or not b.take_grads(grads, self):
                return False
        for b in self.batches:
            b.run()
        return True


cdef tuple _span(cnp.ndarray a):
    cdef size_t start = <size_t>cnp.PyArray_DATA(a)
    return (start, start + <size_t>cnp.PyArray_NBYTES(a))


cdef class ParamGroup(dict):
    """A param group: a dict whose `version` counts its changes, so a step can tell cheaply
    whether its hyperparameters need checking again."""
    cdef public Py_ssize_t version

    def __setitem__(self, key, value):
        self.version += 1
        dict.__setitem__(self, key, value)

    def __delitem__(self, key):
        self.version += 1
        dict.__delitem__(self, key)

    def update(self, *args, **kwargs):
        self.version += 1
        dict.update(self, *args, **kwargs)

    def setdefault(self, key, default=None):
        self.version += 1
        return dict.setdefault(self, key, default)

    def pop(self, *args):
        self.version += 1
        return dict.pop(self, *args)

    def popitem(self):
        self.version += 1
        return dict.popitem(self)

    def clear(self):
        self.version += 1
        dict.clear(self)

    def __ior__(self, other):
        self.version += 1
        dict.update(self, other)
        return self

    def __reduce__(self):
        return (dict, (dict(self),))


def run_addresses(str rule, bint f64, list addresses, list sizes, dict kernel_args, int64_t step):
    """One many-tensor call over raw buffer addresses (for fastopt.torch, whose tensors are not
    numpy arrays): addresses[k] lists buffer k's address for every tensor (param, grad, then the
    state slots; None for a slot the options leave unused); sizes are element counts.  The
    caller guarantees the buffers exist, are contiguous and hold sizes[t] elements of the dtype;
    the C layer still checks NULLs, overlaps within a tensor and the hyperparameters."""
    cdef Py_ssize_t count = len(sizes), k, t
    cdef int r = RULE_IDS[rule]
    cdef Hyper hp
    cdef void **ptrs[MAX_KINDS]
    cdef size_t *n = <size_t *>calloc(max(count, 1), sizeof(size_t))
    cdef int status
    for k in range(MAX_KINDS):
        ptrs[k] = NULL
    try:
        if n == NULL:
            raise MemoryError()
        for t in range(count):
            n[t] = sizes[t]
        for k in range(min(len(addresses), MAX_KINDS)):
            if addresses[k] is None:
                continue
            ptrs[k] = <void **>calloc(max(count, 1), sizeof(void *))
            if ptrs[k] == NULL:
                raise MemoryError()
            for t in range(count):
                ptrs[k][t] = <void *><size_t>addresses[k][t]
        set_hyper(&hp, r, kernel_args)
        with nogil:
            status = call_batch(r, f64, count, ptrs, n, &hp, step)
        _check(status)
    finally:
        free(n)
        for k in range(MAX_KINDS):
            free(ptrs[k])
