"""The rule registry (fastopt.rules) is the one description of each rule: every API reaches
every rule through it, and a rule's name stays in the few files that must name it."""
import inspect
import os
import re

import numpy as np
import pytest

import fastopt
from fastopt import _kernels, rules

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("rule", rules.RULES, ids=lambda r: r.name)
def test_every_rule_is_reachable_from_every_api(rule, tmp_path):
    rng = np.random.default_rng(0)
    hp = {k: (0.01 if v is rules.REQUIRED else v) for k, v in rule.defaults.items()
          if k not in rule.fixed}
    # numpy class
    p = rng.standard_normal(33)
    g = rng.standard_normal(33)
    opt = getattr(fastopt, rule.name)([p.copy()], **hp)
    opt.step([g])
    assert opt.rule is rule and opt.state[0].step == 1
    # functional, the same bits
    q = p.copy()
    state = getattr(fastopt, rule.state).new(q)
    getattr(fastopt.functional, rule.function)(q, g, state, **hp)
    np.testing.assert_array_equal(q, opt.params[0])
    # the C rule, through its plain binding, with the registry's C fields
    r = p.copy()
    crule = _kernels.RULES[rule.kernel]
    fields = dict(rule.c_fields(rule.check(hp)[0]), **({"step": 1} if crule.step_offset >= 0 else {}))
    buffers = [np.zeros_like(p) if name in rule.required_state() or name in opt.state[0].buffers()
               else None for name in crule.state]
    for name, value in rule.fill.items():
        buffers[crule.state.index(name)][:] = hp[value]
    getattr(_kernels, rule.kernel)(r, g, *buffers, fields)
    np.testing.assert_array_equal(r, opt.params[0])
    # the benchmark's rule list
    from fastopt import benchmark
    if rule.benchmark is not None:
        assert benchmark.RULES[rule.name][0] is type(opt)
    # fastopt.torch, where torch has the rule
    if rule.torch is not None:
        ft = pytest.importorskip("fastopt.torch")
        assert issubclass(getattr(ft, rule.torch), getattr(ft.torch.optim, rule.torch))


def test_classes_and_functions_carry_signature_and_formula():
    for rule in rules.RULES:
        cls = getattr(fastopt, rule.name)
        sig = inspect.signature(cls)
        assert list(sig.parameters)[0] == "params"
        # the rule's hyperparameters, and the options every optimizer has: `sparse` (how a
        # SparseGrad step treats untouched rows), the training step's `ema_decay` and the
        # storage options (fastopt.storage)
        assert set(sig.parameters) - {"params"} == \
            set(rule.defaults) - set(rule.fixed) | {"sparse", "ema_decay"} | \
            set(fastopt.storage.DEFAULTS)
        assert rule.doc.strip().splitlines()[0] in cls.__doc__
        fn = getattr(fastopt.functional, rule.function)
        assert rule.doc.strip().splitlines()[0] in fn.__doc__


def test_c_rule_list_matches_the_registry():
    assert {r.kernel for r in rules.RULES} == set(_kernels.RULES)
    for crule in _kernels.RULES.values():
        assert crule.state and len(crule.fields) >= 3


def test_c_names_the_refused_hyperparameter():
    crule = _kernels.RULES["adam"]
    hyper = _kernels.Hyper(crule, dict(lr=0.1, beta1=0.9, beta2=1.5, eps=1e-8, step=1))
    with pytest.raises(_kernels.HyperparameterError) as info:
        hyper.check()
    assert info.value.field == "beta2" and "[0, 1)" in info.value.requirement
    with pytest.raises(ValueError, match=r"Invalid beta2 \(betas\[1\]\): 1.5"):
        fastopt.Adam([np.ones(2)], betas=(0.9, 1.5))


@pytest.mark.skipif(not os.path.isdir(os.path.join(ROOT, "csrc", "rules")), reason="no source tree")
def test_a_rules_name_lives_in_at_most_eight_files():
    sources = []
    for folder in ("fastopt", "csrc"):
        for dirpath, _, files in os.walk(os.path.join(ROOT, folder)):
            sources += [os.path.join(dirpath, f) for f in files
                        if f.endswith((".py", ".pyx", ".pxd", ".pxi", ".h", ".c", ".inc"))
                        and f != "_kernels.c"]
    texts = {path: open(path, encoding="utf-8").read().lower() for path in sources}
    for crule in _kernels.RULES:
        word = re.compile(r"(?<![a-z])" + crule + r"(?![a-z])")  # adam, not nadam or adamax
        # nor adagrad inside rowwise_adagrad: longer rule names containing it are left out
        longer = re.compile("|".join(re.escape(r) for r in _kernels.RULES if r != crule and crule in r)
                            or "(?!)")
        where = [os.path.relpath(p, ROOT) for p, t in texts.items() if word.search(longer.sub("", t))]
        assert len(where) <= 8, (crule, where)


@pytest.mark.parametrize("rule", [r for r in rules.RULES if r.plain_state and r.benchmark],
                         ids=lambda r: r.name)
def test_the_storage_table_runs_a_rule_without_bfloat16_state(rule, capsys):
    """`python -m fastopt bench`'s bfloat16 table says a rule refuses bfloat16 state and runs
    its other storage cases (it ran the rule's constructor with state_dtype="bfloat16", and the
    whole bench stopped there)."""
    pytest.importorskip("ml_dtypes")
    from fastopt import benchmark
    results = []
    benchmark.run_storage_table([rule.name], 1000, 1, 0.01, results)
    assert f"{rule.name:<10}(bfloat16 parameters and gradients only: its {rule.plain_state} need " \
        "float32/float64 state)" in capsys.readouterr().out
    assert results and all(r["rule"] == rule.name for r in results)
