"""The rule registry: every update rule fastopt offers, described once.

Each `Rule` says what the public APIs need to know that the C rule list (csrc/fastopt.h,
FO_RULES) does not: the name of the numpy class and of the functional function, the
hyperparameters with their defaults and argument order, how each is type-checked, how they map
onto the C struct's fields, and the formula for the docstrings.  The C side says which state
buffers a rule has, which of them given options use, and whether values are in range.

From this registry come the numpy optimizer classes (fastopt.optim), the functions of
fastopt.functional, the state classes (fastopt.state), the benchmark's and the tests' rule
lists; fastopt.torch maps torch's param groups through `torch_args`.  Adding a rule: see the
README, "Adding a rule".
"""
from fastopt import _checks, _kernels
from fastopt._kernels import TEXTBOOK

REAL, NONNEGATIVE, FLAG, BETAS, PAIR = "real", "nonnegative", "flag", "betas", "pair"
OPTIONAL_PAIR = "optional pair"
_KIND_CHECKS = {REAL: _checks.real, NONNEGATIVE: _checks.nonnegative, FLAG: _checks.flag,
                BETAS: lambda name, x: _checks.betas(x), PAIR: _checks.pair,
                OPTIONAL_PAIR: _checks.optional_pair}
REQUIRED = object()  # a hyperparameter without a default (Momentum's and NAG's lr)

# how a C field is named in error messages when it is not a hyperparameter of the same name
FIELD_NAMES = {"beta1": "beta1 (betas[0])", "beta2": "beta2 (betas[1])",
               "eta_minus": "eta_minus (etas[0])", "eta_plus": "eta_plus (etas[1])",
               "step_size_min": "step_size_min (step_sizes[0])",
               "step_size_max": "step_size_max (step_sizes[1])",
               "eps1": "eps1 (eps[0])", "eps2": "eps2 (eps[1])"}


class Rule:
    """One public rule.

    name: the numpy class (fastopt.<name>); function: fastopt.functional.<function>;
    kernel: the C rule (FO_RULES); state: the state class's name (shared by rules on one kernel);
    params: (hyperparameter, default, kind) in the constructor's order, kinds REAL, FLAG or
    BETAS; keyword_only: those after `*`; fixed: {hyperparameter: value} that the class sets
    and does not take (NAG's nesterov=True); fill: {state buffer: hyperparameter giving its initial value};
    c_fields(hp): the C struct's fields (without `step`) from checked hyperparameters;
    doc: the formula; benchmark: (hyperparameters, memory streams per element, or a function
    of a tensor's shape giving them) for `python -m fastopt bench`, None to leave the rule out; torch: the torch.optim class that
    the benchmark compares it with; state_shapes: {state buffer: its shape from the
    parameter's shape, None where it does not apply} for state not shaped like the parameter
    (a factored rule's), state_doc: what the state class's docstring adds about them.
    """

    def __init__(self, name, function, kernel, state, params, c_fields, doc, *,
                 keyword_only=("maximize",), fixed=None, fill=None, benchmark=None, torch=None,
                 rows=True, state_shapes=None, state_doc=""):
        self.name, self.function, self.kernel, self.state = name, function, kernel, state
        self.params = tuple(params)
        self.fixed = dict(fixed or {})
        self.defaults = {k: self.fixed.get(k, default) for k, default, _ in self.params}
        self.kinds = {k: kind for k, _, kind in self.params}
        self.keyword_only = tuple(keyword_only)
        self.fill = dict(fill or {})
        self.fill_hyperparameters = frozenset(self.fill.values())
        self.c_fields = c_fields
        self.doc = doc
        self.benchmark = benchmark  # (hyperparameters, memory streams per element) or None
        self.torch = torch  # the torch.optim class with the same update for these hyperparameters
        self.rows = rows  # takes fastopt.SparseGrad rows (not where norms are per whole tensor)
        self.state_shapes = dict(state_shapes or {})
        self.state_doc = state_doc

        self.crule = _kernels.RULES[kernel]
        # why its state stays in the compute type (state_dtype="bfloat16" refused), or None:
        # a row rule's one value per row (its parameters and gradients may be bfloat16, staged
        # a group of whole rows at a time: rows of at most _kernels.ROW_STAGING elements); a
        # factored rule's factors and second moments, which its passes read as stored
        self.plain_state = ("per-row accumulators" if self.crule.per_row else
                            "factored second moments" if self.crule.factored else None)
        # hyperparameters that are one C field each, of the same name, holding a real number:
        # the engine writes a change to them straight into the C struct
        self.direct = frozenset(k for k, kind in self.kinds.items()
                                if kind == REAL and k in self.crule.fields)
        self._cache = {}

    def __repr__(self):
        return f"<rule {self.name} (C rule {self.kernel!r})>"

    def check(self, given, copy=True):
        """(hyperparameters, Hyper): `given` completed by the defaults, type-checked here and
        range-checked by the C rule; the Hyper holds the C struct (with step = 1).  Raises
        TypeError/ValueError naming the hyperparameter.  Cached by value and type (1 and True
        differ), since loops pass the same values every step; copy=False returns the cached
        objects themselves, for callers that change nothing but the struct's step."""
        try:
            key = tuple((k, type(v), v) for k, v in given.items())
            cached = self._cache.get(key)
        except TypeError:  # an unhashable value (a list of betas): no cache
            key, cached = None, None
        if cached is None:
            cached = self._check(given)
            if key is not None:
                if len(self._cache) >= 256:
                    self._cache.clear()
                self._cache[key] = cached
        return (dict(cached[0]), cached[1].copy()) if copy else cached

    def _check(self, given):
        unknown = set(given) - set(self.defaults)
        if unknown:
            raise ValueError(f"{self.name}: unknown hyperparameter(s) {sorted(unknown)}; "
                             f"known: {sorted(self.defaults)}")
        hp = {**self.defaults, **given}
        missing = [k for k, v in hp.items() if v is REQUIRED]
        if missing:
            raise TypeError(f"{self.name}: missing hyperparameter(s) {missing}")
        # lr may be a schedule (fastopt.schedules): checked here through its first value, then
        # evaluated by the engine at every step
        schedule = hp.get("lr") if type(hp.get("lr")) is _kernels.Schedule else None
        if schedule is not None:
            hp["lr"] = schedule(1)
        checked = {k: _KIND_CHECKS[kind](k, hp[k]) for k, kind in self.kinds.items()}
        hyper = _kernels.Hyper(self.crule, self.c_fields(checked))
        if schedule is not None:
            checked["lr"] = schedule
        if "step" in self.crule.fields:
            hyper.set_field("step", 1)
        try:
            hyper.check()
        except _kernels.HyperparameterError as e:
            name = FIELD_NAMES.get(e.field, e.field)
            raise ValueError(f"Invalid {name}: {e.value} ({e.requirement})") from None
        return checked, hyper

    def required_state(self):
        """The state buffers that the default hyperparameters use."""
        hp = {k: (0.0 if v is REQUIRED else v) for k, v in self.defaults.items()}
        return tuple(name for name in self.check(hp)[1].used_state() if name is not None)


def _common(hp):
    return dict(lr=hp["lr"], weight_decay=hp["weight_decay"], maximize=hp["maximize"])


def _sgd_fields(hp):
    return dict(_common(hp), momentum=hp["momentum"], dampening=0.0, nesterov=hp["nesterov"],
                convention=TEXTBOOK)


def _adam_fields(hp):
    return dict(_common(hp), beta1=hp["betas"][0], beta2=hp["betas"][1], eps=hp["eps"],
                amsgrad=hp["amsgrad"], decoupled_weight_decay=hp["decoupled_weight_decay"],
                convention=TEXTBOOK)


_SGD_PARAMS = [("lr", 0.01, REAL), ("momentum", 0.0, REAL), ("nesterov", False, FLAG),
               ("weight_decay", 0.0, REAL), ("maximize", False, FLAG)]
_ADAM_PARAMS = [("lr", 1e-3, REAL), ("betas", (0.9, 0.999), BETAS), ("eps", 1e-8, REAL),
                ("weight_decay", 0.0, REAL), ("amsgrad", False, FLAG),
                ("maximize", False, FLAG), ("decoupled_weight_decay", False, FLAG)]
_G = "g is the gradient after `maximize` (g <- -g) and L2 weight_decay (g <- g + weight_decay theta)."

def _adafactor_streams(shape):
    """The memory streams per element Adafactor's step must move for a tensor of this shape
    (csrc/rules/adafactor.inc): a vector's pass reads param, grad and variance, its update reads
    them and writes param and variance (8); a 1 x 1 matrix's pass also reads and writes its two
    factors, which its update reads (11); a matrix's pass reads param and grad, its update
    reads them and writes param (5), and a matrix over FO_IN_CACHE (16384) elements is read
    again for its update norm (6)."""
    if len(shape) < 2:
        return 8
    size = shape[-1] * shape[-2]
    return 11 if size == 1 else 5 if size <= 16384 else 6


RULES = [
    Rule("SGD", "sgd", "sgd", "SGDState", _SGD_PARAMS, _sgd_fields, f"""
    SGD:       theta <- theta - lr g
    Momentum:  v <- momentum v + lr g;  theta <- theta - v
    NAG:       v <- momentum v + lr g;  theta <- theta - (momentum v + lr g)
    {_G}""", benchmark=(dict(lr=0.01, momentum=0.9), 5), torch="SGD"),
    Rule("Momentum", "momentum", "sgd", "SGDState",
         [("lr", REQUIRED, REAL), ("momentum", 0.9, REAL)] + _SGD_PARAMS[2:], _sgd_fields, """
    SGD with classical momentum: v <- momentum v + lr g;  theta <- theta - v.""",
         fixed={"nesterov": False}),
    Rule("NAG", "nag", "sgd", "SGDState",
         [("lr", REQUIRED, REAL), ("momentum", 0.9, REAL)] + _SGD_PARAMS[2:], _sgd_fields, """
    Nesterov accelerated gradient (lookahead form: the stored theta is the lookahead point):
    v <- momentum v + lr g;  theta <- theta - (momentum v + lr g).""",
         fixed={"nesterov": True}),
    Rule("Adagrad", "adagrad", "adagrad", "AdagradState",
         [("lr", 0.01, REAL), ("eps", 1e-8, REAL), ("weight_decay", 0.0, REAL),
          ("initial_accumulator_value", 0.0, NONNEGATIVE), ("maximize", False, FLAG)],
         lambda hp: dict(_common(hp), eps=hp["eps"], convention=TEXTBOOK), f"""
    G <- G + g^2;  theta <- theta - lr g / sqrt(G + eps)
    G starts at initial_accumulator_value (>= 0) where the state is created.  {_G}""",
         fill={"sum": "initial_accumulator_value"}, benchmark=(dict(lr=0.01), 5), torch="Adagrad"),
    Rule("Adadelta", "adadelta", "adadelta", "AdadeltaState",
         [("lr", 1.0, REAL), ("rho", 0.9, REAL), ("eps", 1e-6, REAL),
          ("weight_decay", 0.0, REAL), ("maximize", False, FLAG)],
         lambda hp: dict(_common(hp), rho=hp["rho"], eps=hp["eps"]), f"""
    E[g^2] <- rho E[g^2] + (1 - rho) g^2
    delta <- sqrt(E[delta^2] + eps) / sqrt(E[g^2] + eps) g
    E[delta^2] <- rho E[delta^2] + (1 - rho) delta^2;  theta <- theta - lr delta
    {_G}""", benchmark=(dict(), 7), torch="Adadelta"),
    Rule("RMSprop", "rmsprop", "rmsprop", "RMSpropState",
         [("lr", 1e-3, REAL), ("rho", 0.9, REAL), ("eps", 1e-8, REAL),
          ("weight_decay", 0.0, REAL), ("momentum", 0.0, REAL), ("centered", False, FLAG),
          ("maximize", False, FLAG)],
         lambda hp: dict(_common(hp), rho=hp["rho"], eps=hp["eps"], momentum=hp["momentum"],
                         centered=hp["centered"], convention=TEXTBOOK), f"""
    E[g^2] <- rho E[g^2] + (1 - rho) g^2;  theta <- theta - lr g / sqrt(E[g^2] + eps)
    centered: E[g] <- rho E[g] + (1 - rho) g, and E[g^2] - E[g]^2 replaces E[g^2] under the root.
    momentum > 0: b <- momentum b + g / sqrt(...);  theta <- theta - lr b.  {_G}""",
         keyword_only=("momentum", "centered", "maximize"), benchmark=(dict(lr=1e-3), 5), torch="RMSprop"),
    Rule("Adam", "adam", "adam", "AdamState", _ADAM_PARAMS, _adam_fields, f"""
    m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g^2
    m_hat = m / (1 - b1^t);  v_hat = v / (1 - b2^t)
    theta <- theta - lr m_hat / (sqrt(v_hat) + eps)
    amsgrad: v_hat_max <- max(v_hat_max, v_hat) replaces v_hat.
    decoupled_weight_decay (AdamW): theta <- theta (1 - lr weight_decay) first, no L2 term.
    {_G}""", keyword_only=("maximize", "decoupled_weight_decay"),
         benchmark=(dict(lr=1e-3), 7), torch="Adam"),
    Rule("AdamW", "adamw", "adam", "AdamState",
         [("lr", 1e-3, REAL), ("betas", (0.9, 0.999), BETAS), ("eps", 1e-8, REAL),
          ("weight_decay", 0.01, REAL), ("amsgrad", False, FLAG), ("maximize", False, FLAG)],
         lambda hp: _adam_fields(dict(hp, decoupled_weight_decay=True)), """
    Adam with decoupled weight decay: theta <- theta (1 - lr weight_decay) first, then Adam
    without the L2 term (amsgrad as in Adam).""", benchmark=(dict(lr=1e-3), 7), torch="AdamW"),
    Rule("AdaMax", "adamax", "adamax", "AdaMaxState",
         [("lr", 2e-3, REAL), ("betas", (0.9, 0.999), BETAS), ("eps", 1e-8, REAL),
          ("weight_decay", 0.0, REAL), ("maximize", False, FLAG)],
         lambda hp: dict(_common(hp), beta1=hp["betas"][0], beta2=hp["betas"][1],
                         eps=hp["eps"], convention=TEXTBOOK), f"""
    m <- b1 m + (1 - b1) g;  u <- max(b2 u, |g|)
    theta <- theta - (lr / (1 - b1^t)) m / (u + eps).  {_G}""",
         benchmark=(dict(lr=2e-3), 7), torch="Adamax"),
    Rule("Nadam", "nadam", "nadam", "NadamState",
         [("lr", 2e-3, REAL), ("betas", (0.9, 0.999), BETAS), ("eps", 1e-8, REAL),
          ("weight_decay", 0.0, REAL), ("maximize", False, FLAG)],
         lambda hp: dict(_common(hp), beta1=hp["betas"][0], beta2=hp["betas"][1],
                         eps=hp["eps"], momentum_decay=0.0, mu_product=0.0,
                         decoupled_weight_decay=False, convention=TEXTBOOK), f"""
    m, v, m_hat, v_hat as in Adam;
    theta <- theta - lr / (sqrt(v_hat) + eps) (b1 m_hat + (1 - b1) g / (1 - b1^t)).  {_G}""",
         benchmark=(dict(lr=2e-3), 7), torch="NAdam"),
    Rule("Lion", "lion", "lion", "LionState",
         [("lr", 1e-4, REAL), ("betas", (0.9, 0.99), BETAS), ("weight_decay", 0.0, REAL),
          ("maximize", False, FLAG)],
         lambda hp: dict(_common(hp), beta1=hp["betas"][0], beta2=hp["betas"][1]), """
    c = b1 m + (1 - b1) g;  theta <- theta - lr (sign(c) + weight_decay theta)
    m <- b2 m + (1 - b2) g   (sign(0) = 0; the decay is decoupled: g is the gradient after
    `maximize` only).""", benchmark=(dict(lr=1e-4), 5)),
    Rule("RAdam", "radam", "radam", "RAdamState",
         [("lr", 1e-3, REAL), ("betas", (0.9, 0.999), BETAS), ("eps", 1e-8, REAL),
          ("weight_decay", 0.0, REAL), ("decoupled_weight_decay", False, FLAG),
          ("maximize", False, FLAG)],
         lambda hp: dict(_common(hp), beta1=hp["betas"][0], beta2=hp["betas"][1], eps=hp["eps"],
                         decoupled_weight_decay=hp["decoupled_weight_decay"]), f"""
    m, v, m_hat as in Adam;  rho_inf = 2 / (1 - b2) - 1;  rho_t = rho_inf - 2 t b2^t / (1 - b2^t)
    rho_t > 5:  r = sqrt((rho_t - 4)(rho_t - 2) rho_inf / ((rho_inf - 4)(rho_inf - 2) rho_t))
                theta <- theta - lr r m_hat sqrt(1 - b2^t) / (sqrt(v) + eps)
    otherwise:  theta <- theta - lr m_hat
    decoupled_weight_decay: theta <- theta (1 - lr weight_decay) first, no L2 term.  {_G}""",
         benchmark=(dict(lr=1e-3), 7), torch="RAdam"),
    Rule("Rprop", "rprop", "rprop", "RpropState",
         [("lr", 1e-2, REAL), ("etas", (0.5, 1.2), PAIR), ("step_sizes", (1e-6, 50.0), PAIR),
          ("maximize", False, FLAG)],
         lambda hp: dict(lr=hp["lr"], eta_minus=hp["etas"][0], eta_plus=hp["etas"][1],
                         step_size_min=hp["step_sizes"][0], step_size_max=hp["step_sizes"][1],
                         maximize=hp["maximize"]), """
    s = sign(g prev);  step_size <- clamp(f step_size, step_sizes[0], step_sizes[1]) with
    f = etas[1] if s > 0, etas[0] if s < 0, 1 if s = 0;  g <- 0 where s < 0
    theta <- theta - sign(g) step_size;  prev <- g
    step_size starts at lr where the state is created (lr is not used after that); g is the
    gradient after `maximize` (no weight decay, as torch's Rprop).""",
         fill={"step_size": "lr"}, benchmark=(dict(lr=1e-2), 7), torch="Rprop"),
    Rule("ASGD", "asgd", "asgd", "ASGDState",
         [("lr", 1e-2, REAL), ("lambd", 1e-4, REAL), ("alpha", 0.75, REAL), ("t0", 1e6, REAL),
          ("weight_decay", 0.0, REAL), ("maximize", False, FLAG)],
         lambda hp: dict(_common(hp), lambd=hp["lambd"], alpha=hp["alpha"], t0=hp["t0"],
                         eta=0.0, mu=1.0, convention=TEXTBOOK), f"""
    eta_t = lr / (1 + lambd lr (t - 1))^alpha;  mu_t = 1 / max(1, t - 1 - t0)  (mu_1 = 1)
    theta <- theta (1 - lambd eta_t) - eta_t g
    ax <- theta if mu_t = 1, else ax + mu_t (theta - ax)   (the averaged parameters: state.ax)
    {_G}""", benchmark=(dict(lr=1e-2), 4), torch="ASGD"),  # t0 = 1e6: ax copied, not read
    Rule("LAMB", "lamb", "lamb", "LAMBState",
         [("lr", 1e-3, REAL), ("betas", (0.9, 0.999), BETAS), ("eps", 1e-6, REAL),
          ("weight_decay", 0.0, REAL), ("maximize", False, FLAG)],
         lambda hp: dict(_common(hp), beta1=hp["betas"][0], beta2=hp["betas"][1], eps=hp["eps"]),
         """
    Per tensor: m, v, m_hat, v_hat as in Adam;  r = m_hat / (sqrt(v_hat) + eps) + weight_decay theta
    theta <- theta - lr (||theta|| / ||r||) r   (the ratio is 1 when either norm is 0)
    g is the gradient after `maximize`; the norms are computed in double in a fixed order.""",
         benchmark=(dict(lr=1e-3), 10), rows=False),
    Rule("LARS", "lars", "lars", "LARSState",
         [("lr", REQUIRED, REAL), ("momentum", 0.9, REAL), ("weight_decay", 0.0, REAL),
          ("trust_coefficient", 0.001, REAL), ("maximize", False, FLAG)],
         lambda hp: dict(_common(hp), momentum=hp["momentum"],
                         trust_coefficient=hp["trust_coefficient"]), """
    Per tensor: local = trust_coefficient ||theta|| / (||g|| + weight_decay ||theta||)
    (1 when ||theta|| or the denominator is 0);  v <- momentum v + lr local (g + weight_decay theta)
    theta <- theta - v.  g is the gradient after `maximize`; the norms are computed in double
    in a fixed order.""", benchmark=(dict(lr=0.1), 7), rows=False),
    Rule("RowwiseAdagrad", "rowwise_adagrad", "rowwise_adagrad", "RowwiseAdagradState",
         [("lr", 0.01, REAL), ("eps", 1e-8, REAL), ("weight_decay", 0.0, REAL),
          ("maximize", False, FLAG)],
         lambda hp: dict(_common(hp), eps=hp["eps"]), f"""
    One accumulator per row along axis 0 (a 1-D parameter's rows are its elements):
    G_r <- G_r + mean over row r of g^2 (summed in double);  theta_r <- theta_r - lr g_r / (sqrt(G_r) + eps)
    State `sum`: shape param.shape[:1], 4 bytes per row for float32.  {_G}"""),
    Rule("Adafactor", "adafactor", "adafactor", "AdafactorState",
         [("lr", 1e-2, REAL), ("beta2_decay", -0.8, REAL), ("eps", (None, 1e-3), OPTIONAL_PAIR),
          ("d", 1.0, REAL), ("weight_decay", 0.0, REAL), ("maximize", False, FLAG)],
         lambda hp: dict(_common(hp), beta2_decay=hp["beta2_decay"],
                         eps1=-1.0 if hp["eps"][0] is None else hp["eps"][0], eps2=hp["eps"][1],
                         d=hp["d"]), """
    torch.optim.Adafactor's rule, per tensor, with t the step, w = t^beta2_decay,
    rho = min(lr, 1 / sqrt(t)), (eps1, eps2) = eps (eps1 None: the dtype's machine epsilon):
    alpha = max(eps2, ||theta|| / sqrt(n)) rho     (theta before this step's decay)
    ndim >= 2, factored over the last two dimensions (the leading ones a batch of matrices):
      R <- lerp(R, mean over the last axis of g^2, w);  C <- lerp(C, mean over axis -2 of g^2, w)
      v = R C / max(mean of R over its matrix, eps1)     (state row_var R, col_var C)
    ndim <= 1:  v <- lerp(v, g^2, w)                     (state variance)
    u = g / sqrt(max(v, eps1^2));  theta <- theta (1 - lr weight_decay) - alpha u / max(1, RMS(u) / d)
    lerp(a, b, w) = a + w (b - a);  RMS(u) = ||u|| / sqrt(n);  g is the gradient after `maximize`;
    the norms and sums are computed in double in a fixed order.""",
         benchmark=(dict(lr=1e-2), _adafactor_streams), torch="Adafactor", rows=False,
         state_shapes={"row_var": lambda s: s[:-1] + (1,) if len(s) >= 2 else None,
                       "col_var": lambda s: s[:-2] + (1,) + s[-1:] if len(s) >= 2 else None,
                       "variance": lambda s: s if len(s) < 2 else None},
         state_doc="row_var (shape[:-1] + (1,)) and col_var (shape[:-2] + (1, shape[-1])) for "
                   "a parameter with ndim >= 2, variance (the parameter's shape) otherwise."),
]
BY_NAME = {r.name: r for r in RULES}
BY_FUNCTION = {r.function: r for r in RULES}
