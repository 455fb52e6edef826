"""The demo: its functions' gradients, each rule on Beale's function, the MLP, the command."""

import numpy as np
import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("sklearn")

from fastopt import demo  # noqa: E402


@pytest.mark.parametrize("name", list(demo.PROBLEMS))
def test_gradients_match_finite_differences(name):
    problem = demo.PROBLEMS[name]
    rng = np.random.default_rng(0)
    x0, x1, y0, y1 = problem.box
    for _ in range(20):
        p = np.array([rng.uniform(x0, x1), rng.uniform(y0, y1)])
        h = 1e-6
        numeric = np.array([(problem.f(p + h * e) - problem.f(p - h * e)) / (2 * h)
                            for e in np.eye(2)])
        np.testing.assert_allclose(problem.grad(p), numeric, rtol=1e-5, atol=1e-5)


def test_minima_are_minima():
    for problem in demo.PROBLEMS.values():
        if problem.minimum is not None:
            m = np.array(problem.minimum)
            assert problem.f(m) == pytest.approx(0.0, abs=1e-12)
            np.testing.assert_allclose(problem.grad(m), 0.0, atol=1e-12)


# Adadelta does not get there in the budget, by design: its step is built from its own past
# steps, which start at sqrt(eps) ~ 1e-3, so it creeps for hundreds of steps (README).
SLOW_ON_BEALE = {"Adadelta"}


@pytest.mark.parametrize("rule", demo.RULE_NAMES)
def test_each_rule_reaches_beales_minimum(rule):
    name, cls, hp, _ = demo.RULES[demo.RULE_NAMES.index(rule)]
    problem = demo.PROBLEMS["beale"]
    path, losses = demo.descend(problem, cls, hp, 1500)
    reached = demo.steps_to(problem, losses)
    if rule in SLOW_ON_BEALE:
        assert reached is None and losses[-1] < 0.1 * losses[0]
    else:
        assert reached is not None, (rule, losses[-1], path[-1])
        assert np.linalg.norm(path[-1] - problem.minimum) < 0.1


def test_the_rules_behave_as_the_textbook_says():
    q = demo.PROBLEMS["quadratic"]
    paths = {name: demo.descend(q, cls, hp, 300)[0] for name, cls, hp, _ in demo.RULES}
    # plain SGD zig-zags across the steep direction: y changes sign step after step
    y = paths["SGD"][1:6, 1]
    assert (np.sign(y[1:]) != np.sign(y[:-1])).all()
    # momentum overshoots the valley floor further than NAG, which damps it
    assert np.abs(paths["Momentum"][:40, 1]).max() > 0.8
    nag_steps = demo.steps_to(q, np.array([q.f(p) for p in paths["NAG"]]))
    mom_steps = demo.steps_to(q, np.array([q.f(p) for p in paths["Momentum"]]))
    assert nag_steps < mom_steps
    # Adagrad slows down: its steps shrink as squared gradients accumulate
    sad = demo.PROBLEMS["saddle"]
    a = demo.descend(sad, *demo.RULES[demo.RULE_NAMES.index("Adagrad")][1:3], 200)[0]
    step_sizes = np.linalg.norm(np.diff(a, axis=0), axis=1)
    assert step_sizes[150:].mean() < step_sizes[5:20].mean()


def test_every_rule_has_its_own_color():
    assert len(set(demo.COLORS)) >= len(demo.RULES)


def test_mlp_loss_falls_for_every_rule():
    data = demo.digits_data()
    for name, cls, _, hp in demo.RULES:
        losses, accuracy = demo.train_mlp(cls, hp, data, steps=200)
        assert losses[-20:].mean() < 0.6 * losses[:20].mean(), name
        assert accuracy[-1][1] > 0.5, name


def test_command_writes_valid_pictures(tmp_path, capsys):
    assert demo.main(["--out", str(tmp_path), "--steps", "80", "--mlp-steps", "60",
                      "--frames", "3"]) == 0
    out = capsys.readouterr().out
    assert str(tmp_path) in out and "Adadelta" in out
    files = sorted(p.name for p in tmp_path.iterdir())
    for problem in demo.PROBLEMS:
        for suffix in ("_paths.png", "_paths.gif", "_loss.png"):
            assert problem + suffix in files
    assert "digits_loss.png" in files and "digits_accuracy.png" in files
    for p in tmp_path.iterdir():
        head = p.read_bytes()[:8]
        assert head == b"\x89PNG\r\n\x1a\n" if p.suffix == ".png" else head[:6] == b"GIF89a", p


def test_missing_packages_are_named(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(demo, "missing_packages", lambda: ["matplotlib"])
    assert demo.main(["--out", str(tmp_path / "x")]) == 2
    assert 'pip install "fastopt[demo]"' in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["bench", "--threads", "0"], "--threads must be >= 1"),
    (["bench", "--rules", "Nope,Adam"], "unknown rule(s) Nope"),
    (["bench", "--json", "/nonexistent/folder/x.json"], "--json: cannot write"),
    (["demo", "--steps", "0"], "--steps must be >= 1"),
    (["demo", "--frames", "-1"], "--frames must be >= 1"),
])
def test_bad_command_arguments_stop_before_any_work(argv, message, capsys):
    """Refused up front with a usage error (exit 2): a bad rule name stopped `bench` after
    minutes of timing, --steps 0 failed in matplotlib after a minute, --threads 0 raised."""
    from fastopt.__main__ import main
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    assert stopped.value.code == 2 and message in capsys.readouterr().err


def test_config_takes_no_arguments(capsys):
    from fastopt.__main__ import main
    assert main(["config", "--bogus"]) == 2
