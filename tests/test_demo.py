"""``fastopt demo``: the picture is written, every path is sound, and the facts the
CS231n figure shows hold for fastopt's rules."""

import struct

import numpy as np
import pytest

import fastopt
from fastopt import demo
from fastopt.__main__ import main as cli

pytest.importorskip("matplotlib")

ELEMENTWISE = [label for label, cls, _ in demo.PATHS if cls != "LBFGS"]


def _png_size(path):
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


def test_command_writes_the_png(tmp_path, capsys):
    assert cli(["demo", "--out", str(tmp_path / "out"), "--steps", "40"]) == 0
    png = tmp_path / "out" / "demo.png"
    assert png.stat().st_size > 50_000
    assert _png_size(png) == (1900, 660)
    assert str(png) in capsys.readouterr().out


def test_gif_is_written_on_request(tmp_path):
    files = demo.render(tmp_path, steps=6, gif=True)
    gif = tmp_path / "demo.gif"
    assert files == [tmp_path / "demo.png", gif]
    assert gif.read_bytes()[:6] == b"GIF89a" and gif.stat().st_size > 10_000


def test_bad_steps_is_refused(tmp_path):
    with pytest.raises(SystemExit):
        demo.main(["--out", str(tmp_path), "--steps", "0"])


@pytest.mark.parametrize("name", list(demo.SURFACES))
def test_every_path_starts_at_the_start_and_is_finite(name):
    surface = demo.SURFACES[name]
    paths = demo.trajectories(surface, 100)
    assert set(ELEMENTWISE) <= set(paths)
    for label, pts in paths.items():
        assert pts.shape[1] == 2 and 2 <= len(pts) <= 101, label
        assert tuple(pts[0]) == surface.start, label
        assert np.isfinite(pts).all(), label
        if len(pts) < 101:  # stopped early only because it left the box
            assert not demo._inside(pts[-1], surface.box), label
        assert np.any(pts[-1] != pts[0]), label  # it moved


def test_saddle_sgd_escapes_slowly_the_adaptive_rules_fast():
    paths = demo.trajectories(demo.SURFACES["saddle"], 40)
    y = {label: abs(pts[min(20, len(pts) - 1), 1]) for label, pts in paths.items()}
    assert y["SGD"] < 2e-3                         # 1e-3·(1 + 2·0.01)^20 ≈ 1.5e-3
    for label in ("Adam", "RMSprop", "Adagrad", "NAdam", "AMSGrad"):
        assert y[label] > 50 * y["SGD"], (label, y[label])


def test_rosenbrock_momentum_beats_plain_sgd():
    paths = demo.trajectories(demo.SURFACES["rosenbrock"], 300)
    dist = {k: np.hypot(*(v[-1] - (1.0, 1.0))) for k, v in paths.items()}
    assert dist["Momentum"] < 0.5 * dist["SGD"]


class _FakeLBFGS:
    """The agreed API of fastopt.LBFGS (param in place, step(closure) with closure()
    → (loss, grad)), as a plain gradient step: checks the demo's wiring only."""

    instances = []

    def __init__(self, param, lr=1, max_iter=20, max_eval=None, line_search_fn=None):
        self.param, self.kw = param, dict(lr=lr, max_iter=max_iter, max_eval=max_eval,
                                          line_search_fn=line_search_fn)
        self.calls = 0
        _FakeLBFGS.instances.append(self)

    def step(self, closure):
        loss, grad = closure()
        self.calls += 1
        assert isinstance(loss, float) and grad.shape == (2,)
        self.param -= 1e-3 * grad
        return loss


def test_lbfgs_path_uses_the_agreed_api(monkeypatch, tmp_path):
    monkeypatch.setattr(fastopt, "LBFGS", _FakeLBFGS, raising=False)
    _FakeLBFGS.instances.clear()
    paths = demo.trajectories(demo.SURFACES["beale"], 25)
    (opt,) = _FakeLBFGS.instances
    assert opt.kw == {"lr": 1.0, "max_iter": 1, "max_eval": 25,
                      "line_search_fn": "strong_wolfe"}
    assert opt.calls == 25 and len(paths["L-BFGS"]) == 26
    assert tuple(paths["L-BFGS"][0]) == demo.SURFACES["beale"].start
    np.testing.assert_array_equal(paths["L-BFGS"][-1], opt.param)


def test_rosenbrock_lbfgs_gets_closer_than_sgd():
    # torch.optim.LBFGS with these settings is within 1e-3 of (1, 1) after 33 steps
    paths = demo.trajectories(demo.SURFACES["rosenbrock"], 100)
    dist = {k: np.hypot(*(v[-1] - (1.0, 1.0))) for k, v in paths.items()}
    assert dist["L-BFGS"] < 1e-3 < dist["SGD"]
