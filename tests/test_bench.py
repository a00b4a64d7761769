"""The benchmark runs, writes the documented JSON, and copes with missing peers.

No timing is asserted anywhere: these run on tiny sizes to check the harness.
"""

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from fastopt.bench import peers as P
from fastopt.bench import report, runner
from fastopt.rules import RULES

TINY = ["--sizes", "1000,5000", "--rules", "Adam,SGD", "--repeats", "2", "--warmup", "1",
        "--sample-ms", "0.2", "--roof-mb", "4", "--model-scale", "0.05", "--no-progress"]

STATUSES = {"ok", "missing", "n/a", "error"}


def _check_result(res, with_bytes=True):
    assert res["status"] in STATUSES
    if res["status"] == "ok":
        assert res["median_s"] > 0 and res["min_s"] > 0
        assert res["inner"] >= 1
        assert all(s > 0 for s in res["samples_s"])
        if with_bytes:
            assert res["elements_per_s"] > 0 and res["gbps"] > 0
            assert res["roof_fraction"] > 0
    else:
        assert isinstance(res.get("detail", res.get("error")), str)


def _check_schema(doc, rules, sizes, dtypes=("float32",)):
    assert doc["schema"] == runner.SCHEMA
    for key in ("created", "command", "config", "machine", "peers", "roof", "cases",
                "scenarios", "goals", "elapsed_s"):
        assert key in doc, key
    m = doc["machine"]
    for key in ("cpu_model", "logical_cpus", "usable_cpus", "versions", "python",
                "fastopt_isa", "memory_total_bytes"):
        assert key in m, key
    assert set(m["versions"]) >= {"fastopt", "numpy", "torch", "numba"}
    for name, st in doc["peers"].items():
        assert st["status"] in {"ok", "missing"}
    assert doc["roof_gbps"] and doc["roof"] and all(r["gbps"] > 0 and r["triad"]["bytes_per_element"] ==
                               4 * np.dtype(r["dtype"]).itemsize for r in doc["roof"])
    combos = {(c["rule"], c["dtype"], c["n"]) for c in doc["cases"]}
    assert combos == {(r, d, n) for r in rules for d in dtypes for n in sizes}
    for c in doc["cases"]:
        assert c["bytes_per_element"] == RULES[c["rule"]].bytes_per_element(
            c["hyperparameters"], np.dtype(c["dtype"]).itemsize)
        assert set(c["results"]) == set(doc["config"]["peers"])
        for res in c["results"].values():
            _check_result(res)
        assert c["results"]["fastopt"]["status"] == "ok"
        assert c["results"]["numpy"]["status"] == "ok"
        for peer, ratio in c["speedup"].items():
            assert ratio == pytest.approx(c["results"][peer]["median_s"]
                                          / c["results"]["fastopt"]["median_s"])
    sgd = [c for c in doc["cases"] if c["rule"] == "SGD"]
    assert all(c["hyperparameters"]["momentum"] == 0.9 for c in sgd)
    for g in doc["goals"]:
        assert set(g) >= {"goal", "target", "measured", "met"}


def test_tiny_run_writes_documented_outputs(tmp_path, capsys):
    out = tmp_path / "res.json"
    rc = runner.main(TINY + ["--out", str(out), "--scenarios", "overhead,threads,denormal"])
    assert rc == 0
    doc = json.loads(out.read_text())
    _check_schema(doc, ["Adam", "SGD"], [1000, 5000])
    sc = doc["scenarios"]
    assert set(sc) == {"overhead", "threads", "denormal"}
    for name in sc:
        assert "error" not in sc[name], sc[name]
    assert [r["n"] for r in sc["overhead"]["cases"]] == [1, 100, 1000]
    assert sc["overhead"]["cases"][0]["results"]["fastopt_kernel"]["status"] == "ok"
    assert sc["overhead"]["breakdown_adam_float32_n1"]["opt_step_s"] > 0
    assert [r["threads"] for r in sc["threads"]["roof"]][0] == 1
    den = sc["denormal"]["cases"][0]
    assert den["subnormal_fraction_of_state"]["numpy:subnormal"]["exp_avg_sq"] > 0
    assert den["subnormal_fraction_of_state"]["numpy:normal"]["exp_avg_sq"] == 0
    md = capsys.readouterr().out
    assert "| rule | dtype | n |" in md and "Memory-bandwidth roof" in md
    assert (tmp_path / "res.md").read_text() == md
    assert "Performance goals" in md


def test_model_scenario():
    from fastopt.bench import scenarios
    cfg = runner.Config(repeats=1, warmup=1, target_sample_s=2e-4, model_scale=0.05,
                        peers=["fastopt", "numpy", "torch_fused"])
    res = scenarios.scenario_model(cfg, 1, {}, np.random.default_rng(0))
    models = {r["model"]: r for r in res["cases"]}
    assert set(models) == {"transformer", "resnet"}
    assert models["transformer"]["tensors"] == 132 and models["resnet"]["tensors"] == 110
    for r in res["cases"]:
        assert set(r["results"]) == {"fastopt", "numpy", "torch_fused", "torch_fused_flat"}
        for peer, x in r["results"].items():
            assert x["status"] in STATUSES
            if x["status"] == "ok":
                assert x["median_s"] > 0 and x["gbps"] > 0
    # full-size shapes: 5-20 M parameters over 100-200 tensors, as the issue asks
    import math
    for fn in scenarios.MODELS.values():
        shapes = fn()
        assert 100 <= len(shapes) <= 200
        assert 5e6 <= sum(math.prod(s) for s in shapes) <= 2e7


def test_missing_peers_are_reported_not_failed(tmp_path, monkeypatch, capsys):
    # torch and matplotlib "not installed": every torch peer is 'missing', the run
    # completes, and the plot is skipped with a message
    monkeypatch.setitem(sys.modules, "torch", None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    out = tmp_path / "nt.json"
    rc = runner.main(["--sizes", "1000", "--rules", "Adam", "--repeats", "1", "--warmup",
                      "1", "--sample-ms", "0.2", "--roof-mb", "4", "--scenarios",
                      "overhead", "--no-progress",
                      "--out", str(out)])
    assert rc == 0
    doc = json.loads(out.read_text())
    for peer in ("torch_default", "torch_foreach_false", "torch_fused", "deepspeed"):
        assert doc["peers"][peer]["status"] == "missing"
        assert doc["cases"][0]["results"][peer]["status"] == "missing"
    assert doc["cases"][0]["results"]["fastopt"]["status"] == "ok"
    goal = [g for g in doc["goals"] if "torch fused" in g["goal"]]
    assert goal and all(g["met"] is None for g in goal)
    captured = capsys.readouterr()
    assert "Missing peers" in captured.out
    assert "matplotlib is not installed" in captured.err
    assert not (tmp_path / "nt.png").exists()


def test_plot_written(tmp_path):
    pytest.importorskip("matplotlib")
    doc = json.loads(json.dumps(_tiny_doc()))
    path = tmp_path / "p.png"
    assert report.plot(doc, str(path)) is None
    assert path.stat().st_size > 1000


def _tiny_doc():
    cfg = runner.Config(rules=["Adagrad"], sizes=[1000, 2000], repeats=1, warmup=1,
                        target_sample_s=2e-4, scenarios=[], roof_bytes_per_array=1 << 22,
                        peers=["fastopt", "numpy"], progress=False)
    return runner.run(cfg)


def test_unavailable_rule_is_not_applicable():
    hp = P.hyperparameters("Lion")
    p = np.zeros(8, np.float32)
    with pytest.raises(P.NotApplicable):
        P.make_step("torch_default", "Lion", hp, p, p.copy())
    hp = P.hyperparameters("RMSprop")
    pytest.importorskip("torch")
    with pytest.raises(P.NotApplicable):
        P.make_step("torch_fused", "RMSprop", hp, p, p.copy())


VARIANTS = {
    "SGD": [{"momentum": 0.9}, {"momentum": 0.9, "nesterov": True, "weight_decay": 0.1},
            {"momentum": 0.5, "dampening": 0.3, "maximize": True}, {}],
    "SGDW": [{"momentum": 0.9, "weight_decay": 0.1}],
    "Adam": [{}, {"amsgrad": True, "weight_decay": 0.1}, {"maximize": True}],
    "AdamW": [{}],
    "Adagrad": [{}, {"lr_decay": 0.1, "weight_decay": 0.1, "initial_accumulator_value": 0.1}],
    "RMSprop": [{}, {"centered": True, "momentum": 0.9, "weight_decay": 0.1}],
    "Adadelta": [{}, {"weight_decay": 0.1, "maximize": True}],
    "Adamax": [{}, {"weight_decay": 0.1}],
    "NAdam": [{}, {"decoupled_weight_decay": True, "weight_decay": 0.1}],
    "RAdam": [{}, {"decoupled_weight_decay": True, "weight_decay": 0.1}],
    "ASGD": [{}, {"t0": 2, "weight_decay": 0.1}],
    "Rprop": [{}, {"maximize": True}],
    "Lion": [{}, {"weight_decay": 0.1, "maximize": True}],
}


@pytest.mark.parametrize("rule", list(RULES))
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_every_peer_does_the_same_work(rule, dtype):
    """The peers are only comparable if they compute the same update: each one's
    first steps agree with fastopt's (torch computes some per-step scalars in
    float32, hence its looser tolerance)."""
    rng = np.random.default_rng(1)
    n = 1037
    for variant in VARIANTS[rule]:
        hp = P.hyperparameters(rule, variant)
        p0 = rng.standard_normal(n).astype(dtype)
        grads = [rng.standard_normal(n).astype(dtype) for _ in range(4)]
        got = {}
        for peer in ("fastopt", "fastopt_kernel", "numpy", "torch_default",
                     "torch_foreach_false", "torch_fused"):
            p, g = p0.copy(), np.empty_like(p0)
            try:
                step, _ = P.make_step(peer, rule, hp, p, g, 1)
            except (P.Missing, P.NotApplicable):
                continue
            for gg in grads:
                g[:] = gg
                step()
            got[peer] = p
        ref = got["fastopt"]
        assert "numpy" in got
        for peer, p in got.items():
            tol = {"float32": 1e-5, "float64": 1e-12 if not peer.startswith("torch") else 1e-6}[dtype]
            np.testing.assert_allclose(p, ref, rtol=tol, atol=tol,
                                       err_msg=f"{peer} {rule} {variant} {dtype}")


def test_roof_kernels():
    from fastopt.backends import compiled
    mod = compiled.module
    for dt in (np.float32, np.float64):
        for n in (0, 5, 40_000, 100_003):
            b = np.arange(n, dtype=dt)
            c = np.ones(n, dt)
            a = np.zeros(n, dt)
            mod.triad(a, b, c, 0.5, 2)
            np.testing.assert_array_equal(a, b + dt(0.5) * c)
            mod.axpy(a, c, 2.0, 2)
            np.testing.assert_array_equal(a, b + dt(0.5) * c + dt(2.0) * c)
    with pytest.raises(ValueError):
        mod.triad(np.zeros(3), np.zeros(4), np.zeros(3), 1.0, 1)
    r = __import__("fastopt.bench.roof", fromlist=["measure"]).measure(
        1, "float64", repeats=2, bytes_per_array=1 << 20)
    assert r["triad"]["bytes_per_element"] == 32 and r["axpy"]["bytes_per_element"] == 24
    assert r["gbps"] == max(r["triad"]["gbps"], r["axpy"]["gbps"])


def test_goals_evaluation_on_synthetic_figures():
    def case(n, fast, fused, numpy=None):
        res = {"fastopt": {"status": "ok", "median_s": fast, "roof_fraction": 0.93},
               "torch_fused": {"status": "ok", "median_s": fused}}
        if numpy:
            res["numpy"] = {"status": "ok", "median_s": numpy}
        return {"rule": "Adam", "dtype": "float32", "n": n, "threads": 2, "results": res,
                "speedup": runner.speedups(res)}
    doc = {"cases": [case(16_000_000, 10.0, 10.2, 150.0), case(1_000_000, 0.2, 0.35, 3.0),
                     case(100_000, 0.04, 0.1), case(1000, 3e-6, 7e-5)],
           "scenarios": {"denormal": {"cases": [{"dtype": "float32", "n": 10**6,
                                                 "slowdown": {"fastopt": 1.3}}]}}}
    goals = {g["goal"]: g for g in report.evaluate_goals(doc)}
    assert goals["Adam float32 n=1.6e7: fastopt vs torch fused"]["met"] is True
    assert goals["Adam float32 n=1e6: fastopt vs torch fused"]["met"] is True
    assert goals["Adam float32 n=1e5: fastopt vs torch fused"]["met"] is False
    assert goals["Adam float32 n=1e3: fastopt vs torch fused"]["met"] is True
    assert goals["Adam float32 n=1.6e7: fraction of the roof"]["met"] is True
    numpy_goal = [g for g in goals.values() if "NumPy" in g["goal"]][0]
    assert numpy_goal["measured"] == pytest.approx(15.0) and numpy_goal["met"] is True
    den = [g for g in goals.values() if "subnormal" in g["goal"]][0]
    assert den["met"] is False


def test_console_entry_point():
    r = subprocess.run([sys.executable, "-m", "fastopt", "bench", "--help"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "--quick" in r.stdout and "--sizes" in r.stdout
    r = subprocess.run([sys.executable, "-m", "fastopt", "nope"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and "unknown command" in r.stderr
    r = subprocess.run([sys.executable, "-m", "fastopt", "bench", "--rules", "Nope"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "unknown rule" in r.stderr


TINY_TORCH_MODELS = (("tiny-a", 16, 64, 16), ("tiny-b", 24, 96, 16))


@pytest.mark.parametrize("mode", ["quick", "full"])
def test_torch_model_scenario(monkeypatch, mode):
    _torch_model_scenario(monkeypatch, mode)


def _torch_model_scenario(monkeypatch, mode):
    pytest.importorskip("torch")
    from fastopt.bench import scenarios
    monkeypatch.setattr(scenarios, "TORCH_MODELS", TINY_TORCH_MODELS)
    cfg = runner.Config(mode=mode, repeats=1, warmup=1, target_sample_s=2e-4)
    res = scenarios.scenario_torch_model(cfg, 1, {}, np.random.default_rng(0))
    # --quick times the first (1M) model only
    want = TINY_TORCH_MODELS[:1] if mode == "quick" else TINY_TORCH_MODELS
    assert [r["model"] for r in res["cases"]] == [f"transformer {m[0]}" for m in want]
    import math
    for r, (_, d, vocab, ctx) in zip(res["cases"], want):
        shapes = scenarios.transformer_shapes(d=d, vocab=vocab, ctx=ctx)
        assert r["tensors"] == len(shapes) == 132
        assert r["n"] == sum(math.prod(s) for s in shapes)
        assert r["rule"] == "AdamW" and r["dtype"] == "float32"
        assert r["bytes_per_element"] == 28
        assert set(r["results"]) == set(scenarios.TORCH_MODEL_PEERS)
        for peer, x in r["results"].items():
            assert x["status"] == "ok", (peer, x)
            assert x["median_s"] > 0 and x["gbps"] > 0
        assert set(r["speedup"]) == set(scenarios.TORCH_MODEL_PEERS) - {"fastopt_torch"}
        for peer, ratio in r["speedup"].items():
            assert ratio == pytest.approx(r["results"][peer]["median_s"]
                                          / r["results"]["fastopt_torch"]["median_s"])
    doc = {"cases": [], "scenarios": {"torch_model": res}}
    md = report._torch_model_md(res)
    assert "fastopt.torch" in md[0] and any("transformer tiny-a" in line for line in md)
    assert not [g for g in report.evaluate_goals(doc) if "torch model" in g["goal"]]
    return res


def test_torch_model_plot(monkeypatch, tmp_path):
    pytest.importorskip("matplotlib")
    res = _torch_model_scenario(monkeypatch, "full")
    doc = {"cases": [], "scenarios": {"torch_model": res},
           "machine": {"cpu_model": "test"}, "created": "2026-01-01T00:00:00"}
    path = tmp_path / "tm.png"
    assert report.plot(json.loads(json.dumps(doc)), str(path)) is None
    assert path.stat().st_size > 1000


def test_torch_model_peers_do_the_same_work():
    """fastopt.torch's steady-state step, its gather step and torch's AdamW flavours
    compute the same update on the scenario's parameters."""
    torch = pytest.importorskip("torch")
    from fastopt.bench import scenarios
    shapes = scenarios.transformer_shapes(d=16, vocab=64, ctx=16)
    params = scenarios.torch_model_params(shapes, np.random.default_rng(0))
    hp = {"lr": 1e-2, "weight_decay": 0.1}
    out = {}
    for peer in ("fastopt_torch", "fastopt_torch_gather", "torch_fused", "torch_default",
                 "torch_foreach"):
        step, holder = scenarios.make_torch_model_step(peer, params, hp)
        for _ in range(3 if peer.startswith("fastopt") else 4):  # fastopt's made one
            step()
        out[peer] = torch.cat([p.detach().reshape(-1) for g in holder.param_groups
                               for p in g["params"]])
    before = torch.cat([p.detach().reshape(-1) for p in params])
    assert not torch.equal(out["fastopt_torch"], before)
    for peer, v in out.items():
        torch.testing.assert_close(v, out["torch_default"], rtol=1e-5, atol=1e-6, msg=peer)


def test_torch_model_scenario_without_torch(monkeypatch):
    from fastopt.bench import scenarios
    monkeypatch.setitem(sys.modules, "torch", None)
    cfg = runner.Config(mode="quick", repeats=1, warmup=1, target_sample_s=2e-4)
    res = scenarios.scenario_torch_model(cfg, 1, {}, np.random.default_rng(0))
    assert res["cases"] == [] and "torch is not installed" in res["skipped"]
    assert "torch is not installed" in "\n".join(report._torch_model_md(res))


def test_lbfgs_scenario(tmp_path):
    """The L-BFGS scenario on a tiny case: every peer reports, fastopt and torch keep a
    full history through the timed steps, and the report has its table."""
    pytest.importorskip("scipy")
    out = tmp_path / "lb.json"
    rc = runner.main(["--rules", "none", "--scenarios", "lbfgs", "--lbfgs-cases", "3000:3",
                      "--repeats", "1", "--roof-mb", "4", "--no-progress", "--no-plot",
                      "--out", str(out)])
    assert rc == 0
    doc = json.loads(out.read_text())
    assert doc["cases"] == []
    sc = doc["scenarios"]["lbfgs"]
    assert "error" not in sc, sc
    (case,) = sc["cases"]
    assert (case["n"], case["history"], case["dtype"]) == (3000, 3, "float32")
    assert case["closure_s"] > 0
    for peer in ("fastopt", "torch", "scipy"):
        res = case["results"][peer]
        assert res["status"] in STATUSES
        if res["status"] == "ok":
            assert math.isfinite(res["per_iteration_s"])
    assert case["results"]["fastopt"]["history_len"] == 3
    if case["results"]["torch"]["status"] == "ok":
        assert case["results"]["torch"]["history_len"] == 3
    if case["results"]["scipy"]["status"] == "ok":
        assert case["results"]["scipy"]["iterations"] == 3 + case["iters_per_step"]
    assert "closure excluded" in (tmp_path / "lb.md").read_text()
    assert any(g["goal"].startswith("L-BFGS float32 n=3e3") for g in doc["goals"])
    with pytest.raises(SystemExit):
        runner.build_parser().parse_args(["--lbfgs-cases", "1e6"])
