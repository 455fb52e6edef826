# Learning-rate schedules (included by _kernels.pyx; built by fastopt.schedules, which validates
# their arguments once): lr(t) in double for step t = 1, 2, ..., read by the engine from the
# batch's step count right before each C call (Batch.run), so a step with a schedule costs one
# evaluation here and nothing in Python.
from libc.math cimport cos, pow, floor, M_PI

cdef enum:
    SCHEDULE_CONSTANT, SCHEDULE_STEP, SCHEDULE_EXPONENTIAL, SCHEDULE_COSINE, SCHEDULE_LINEAR,
    SCHEDULE_ONE_CYCLE, SCHEDULE_SEQUENTIAL

_SCHEDULE_KINDS = {"constant": SCHEDULE_CONSTANT, "step_decay": SCHEDULE_STEP,
                   "exponential": SCHEDULE_EXPONENTIAL, "cosine": SCHEDULE_COSINE,
                   "linear": SCHEDULE_LINEAR, "one_cycle": SCHEDULE_ONE_CYCLE,
                   "sequential": SCHEDULE_SEQUENTIAL}


cdef class Schedule:
    """lr as a function of the step t (t = 1 for the first step); see fastopt.schedules for
    the definitions.  Made by fastopt.schedules' functions, which check the arguments; kind,
    args (the function's arguments, by name) and children (sequential's) describe it."""
    cdef int kind
    cdef double lr, gamma, start_factor, final_lr, pct_start, div_factor, final_div_factor
    cdef int64_t size, warmup  # step_size / total_steps; warmup_steps
    cdef list children_list
    cdef int64_t *milestones
    cdef Py_ssize_t n_children
    cdef readonly str name
    cdef readonly dict args

    def __cinit__(self, str name, dict args, list children=None, list milestones=None):
        self.name, self.args = name, dict(args)
        self.kind = _SCHEDULE_KINDS[name]
        self.lr = args.get("lr", args.get("max_lr", 0.0))
        self.gamma = args.get("gamma", 0.0)
        self.start_factor = args.get("warmup_start_factor", 0.0)
        self.final_lr = args.get("final_lr", 0.0)
        self.pct_start = args.get("pct_start", 0.0)
        self.div_factor = args.get("div_factor", 1.0)
        self.final_div_factor = args.get("final_div_factor", 1.0)
        self.size = args.get("step_size", args.get("total_steps", 1))
        self.warmup = args.get("warmup_steps", 0)
        self.children_list = list(children or [])
        self.n_children = len(self.children_list)
        self.milestones = <int64_t *>calloc(max(self.n_children, 1), sizeof(int64_t))
        if self.milestones == NULL:
            raise MemoryError()
        for k, m in enumerate(milestones or []):
            self.milestones[k] = m

    def __dealloc__(self):
        free(self.milestones)

    @property
    def children(self):
        return tuple(self.children_list)

    def __call__(self, t):
        """lr at step t (an int >= 1)."""
        if type(t) is bool or not isinstance(t, numbers.Integral) or not 1 <= t <= 2**63 - 1:
            raise ValueError(f"a schedule's step must be an int in [1, 2**63 - 1], got {t!r}")
        return self.at(t)

    def __repr__(self):
        if self.kind == SCHEDULE_SEQUENTIAL:
            return (f"sequential({list(self.children_list)!r}, "
                    f"{[self.milestones[k] for k in range(self.n_children - 1)]!r})")
        return f"{self.name}({', '.join(f'{k}={v!r}' for k, v in self.args.items())})"

    def __reduce__(self):
        return (Schedule, (self.name, self.args, self.children_list,
                           [self.milestones[k] for k in range(self.n_children)]))

    def __eq__(self, other):
        return (type(other) is Schedule and self.name == (<Schedule>other).name
                and self.args == (<Schedule>other).args
                and self.children_list == (<Schedule>other).children_list
                and all(self.milestones[k] == (<Schedule>other).milestones[k]
                        for k in range(self.n_children)))

    def __hash__(self):
        return hash((self.name, tuple(sorted(self.args.items())), tuple(self.children_list)))

    cdef double at(self, int64_t t) noexcept:
        cdef int64_t e = t - 1  # torch's last_epoch at that step
        cdef double x, pct, start, end, phase_end, initial
        cdef Py_ssize_t k
        if self.kind == SCHEDULE_CONSTANT:
            return self.lr
        if self.kind == SCHEDULE_STEP:
            return self.lr * pow(self.gamma, <double>(e // self.size))
        if self.kind == SCHEDULE_EXPONENTIAL:
            return self.lr * pow(self.gamma, <double>e)
        if self.kind == SCHEDULE_COSINE or self.kind == SCHEDULE_LINEAR:
            if e < self.warmup:  # LinearLR from start_factor to 1 over warmup steps
                return self.lr * (self.start_factor + (1.0 - self.start_factor) * e / self.warmup)
            e -= self.warmup
            if self.kind == SCHEDULE_COSINE:  # CosineAnnealingLR, T_max = total - warmup
                return self.final_lr + (self.lr - self.final_lr) * (
                    1.0 + cos(M_PI * e / (self.size - self.warmup))) / 2.0
            x = e if e < self.size - self.warmup else self.size - self.warmup
            # the fraction first: it is at most 1, so the value stays between lr and final_lr
            # ((final_lr - lr) * x / T could round below 0 at x = T when final_lr is 0)
            return self.lr + (self.final_lr - self.lr) * (x / (self.size - self.warmup))
        if self.kind == SCHEDULE_ONE_CYCLE:  # OneCycleLR, cosine annealing, two phases
            initial = self.lr / self.div_factor
            phase_end = self.pct_start * self.size - 1.0
            if e <= phase_end:
                start, end, pct = initial, self.lr, e / phase_end
            else:
                start, end = self.lr, initial / self.final_div_factor
                pct = (e - phase_end) / (self.size - 1 - phase_end)
                pct = pct if pct < 1.0 else 1.0
            return end + (start - end) / 2.0 * (cos(M_PI * pct) + 1.0)
        # sequential: child k from milestone k-1 on, counting its own steps from 1
        k = 0
        while k < self.n_children - 1 and e >= self.milestones[k]:
            k += 1
        return (<Schedule>self.children_list[k]).at(t - (self.milestones[k - 1] if k > 0 else 0))
