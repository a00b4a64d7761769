"""The benchmark runs, writes the documented JSON, and copes with missing peers.

No timing is asserted anywhere: these run on tiny sizes to check the harness.
"""

import json
import re
import math
import subprocess
import sys

import numpy as np
import pytest

from fastopt.bench import accuracy, cli, config, grid, report, scenarios, torch_model
from fastopt.bench import peers as P
from cases import kernel_paths
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
    assert doc["schema"] == config.SCHEMA
    for key in ("created", "command", "config", "machine", "peers", "roof", "cases",
                "scenarios", "elapsed_s"):
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
    assert "goals" not in doc


def test_tiny_run_writes_documented_outputs(tmp_path, capsys):
    out = tmp_path / "res.json"
    rc = cli.main(TINY + ["--out", str(out), "--scenarios", "overhead,threads,denormal"])
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
    assert "goal" not in md.lower() and not re.search(r"issue \d", md)


def test_model_scenario():
    cfg = config.Config(repeats=1, warmup=1, target_sample_s=2e-4, model_scale=0.05,
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
    # full-size shapes: 5-20 M parameters over 100-200 tensors
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
    rc = cli.main(["--sizes", "1000", "--rules", "Adam", "--repeats", "1", "--warmup",
                      "1", "--sample-ms", "0.2", "--roof-mb", "4", "--scenarios",
                      "overhead", "--no-progress",
                      "--out", str(out)])
    assert rc == 0
    doc = json.loads(out.read_text())
    for peer in ("torch_default", "torch_foreach_false", "torch_fused", "deepspeed"):
        assert doc["peers"][peer]["status"] == "missing"
        assert doc["cases"][0]["results"][peer]["status"] == "missing"
    assert doc["cases"][0]["results"]["fastopt"]["status"] == "ok"
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
    cfg = config.Config(rules=["Adagrad"], sizes=[1000, 2000], repeats=1, warmup=1,
                        target_sample_s=2e-4, scenarios=[], roof_bytes_per_array=1 << 22,
                        peers=["fastopt", "numpy"], progress=False)
    return grid.run(cfg)


def test_unavailable_rule_is_not_applicable():
    hp = config.hyperparameters("Lion")
    p = np.zeros(8, np.float32)
    with pytest.raises(P.NotApplicable):
        P.make_step("torch_default", "Lion", hp, p, p.copy())
    hp = config.hyperparameters("RMSprop")
    pytest.importorskip("torch")
    with pytest.raises(P.NotApplicable):
        P.make_step("torch_fused", "RMSprop", hp, p, p.copy())


# every branch of each rule's kernel, from the registry (tests/cases.py)
VARIANTS = {name: [{k: v for k, v in hp.items() if v != RULES[name].defaults[k]}
                   for hp in kernel_paths(name)] for name in RULES}


@pytest.mark.parametrize("rule", list(RULES))
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_every_peer_does_the_same_work(rule, dtype):
    """The peers are only comparable if they compute the same update: each one's
    first steps agree with fastopt's (torch computes some per-step scalars in
    float32, hence its looser tolerance)."""
    rng = np.random.default_rng(1)
    n = 1037
    for variant in VARIANTS[rule]:
        hp = config.hyperparameters(rule, variant)
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


TINY_TORCH_MODELS = {"tiny-a": dict(d=16, vocab=64, ctx=16), "tiny-b": dict(d=24, vocab=96, ctx=16)}
TINY_TRAINING = dict(d=16, heads=2, layers=1, ctx=8, batch=2)


def _tiny_torch_models(monkeypatch):
    for name, spec in TINY_TORCH_MODELS.items():
        monkeypatch.setitem(scenarios.TRANSFORMERS, name, spec)
    monkeypatch.setattr(torch_model, "TORCH_MODELS", tuple(TINY_TORCH_MODELS))
    monkeypatch.setattr(torch_model, "TRAINING_MODEL", TINY_TRAINING)


@pytest.mark.parametrize("mode", ["quick", "full"])
def test_torch_model_scenario(monkeypatch, mode):
    _torch_model_scenario(monkeypatch, mode)


def _torch_model_scenario(monkeypatch, mode):
    pytest.importorskip("torch")
    _tiny_torch_models(monkeypatch)
    cfg = config.Config(mode=mode, repeats=1, warmup=1, target_sample_s=2e-4)
    res = torch_model.scenario_torch_model(cfg, 1, {}, np.random.default_rng(0))
    # --quick times the first (1M) model only
    want = list(TINY_TORCH_MODELS)[:1] if mode == "quick" else list(TINY_TORCH_MODELS)
    assert [r["model"] for r in res["cases"]] == [f"transformer {m}" for m in want]
    for r, name in zip(res["cases"], want):
        shapes = scenarios.transformer_shapes(**TINY_TORCH_MODELS[name])
        assert r["tensors"] == len(shapes) == 132
        assert r["n"] == sum(math.prod(s) for s in shapes)
        assert r["rule"] == "AdamW" and r["dtype"] == "float32"
        assert r["bytes_per_element"] == 28
        assert set(r["results"]) == set(torch_model.TORCH_MODEL_PEERS)
        for peer, x in r["results"].items():
            assert x["status"] == "ok", (peer, x)
            assert x["median_s"] > 0 and x["gbps"] > 0
            # interleaved: one step per sample
            assert x["inner"] == 1 and len(x["samples_s"]) == 10 * cfg.repeats
        assert set(r["speedup"]) == set(torch_model.TORCH_MODEL_PEERS) - {"fastopt_torch"}
        for peer, ratio in r["speedup"].items():
            assert ratio == pytest.approx(r["results"][peer]["median_s"]
                                          / r["results"]["fastopt_torch"]["median_s"])
    host = res["host_per_tensor"]
    assert set(host) == set(torch_model.HOST_PEERS)
    for h in host.values():
        assert math.isfinite(h["per_tensor_s"]) and h["step_132_s"] > 0 and h["step_1_s"] > 0
    tr = res["training"]
    assert set(tr["results"]) == set(torch_model.TRAINING_PEERS)
    losses = [x["final_loss"] for x in tr["results"].values()]
    for x in tr["results"].values():
        assert 0 < x["step_median_s"] < x["median_s"] and len(x["samples_s"]) >= 3
    # the same model, data and update: the runs train alike
    assert max(losses) - min(losses) < 1e-3 * max(losses)
    md = "\n".join(report._torch_model_md(res))
    assert "fastopt.torch" in md and "transformer tiny-a" in md
    assert "Host cost per tensor" in md and "training iteration" in md
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
    """fastopt.torch's step, its step after fresh grads and torch's AdamW flavours
    compute the same update on the scenario's parameters."""
    torch = pytest.importorskip("torch")
    shapes = scenarios.transformer_shapes(d=16, vocab=64, ctx=16)
    params = torch_model.torch_model_params(shapes, np.random.default_rng(0))
    hp = {"lr": 1e-2, "weight_decay": 0.1}
    out = {}
    for peer in ("fastopt_torch", "fastopt_torch_fresh", "torch_fused", "torch_default",
                 "torch_foreach"):
        step, holder = torch_model.make_torch_model_step(peer, params, hp)
        for _ in range(4):
            step()
        out[peer] = torch.cat([p.detach().reshape(-1) for g in holder.param_groups
                               for p in g["params"]])
    before = torch.cat([p.detach().reshape(-1) for p in params])
    assert not torch.equal(out["fastopt_torch"], before)
    for peer, v in out.items():
        torch.testing.assert_close(v, out["torch_default"], rtol=1e-5, atol=1e-6, msg=peer)


def test_torch_model_scenario_without_torch(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)
    cfg = config.Config(mode="quick", repeats=1, warmup=1, target_sample_s=2e-4)
    res = torch_model.scenario_torch_model(cfg, 1, {}, np.random.default_rng(0))
    assert res["cases"] == [] and "torch is not installed" in res["skipped"]
    assert "torch is not installed" in "\n".join(report._torch_model_md(res))


def _list_api():
    import fastopt
    try:
        fastopt.Adam([np.zeros(3, np.float32), np.zeros((2, 2), np.float32)], lr=1e-3)
    except TypeError:
        return False
    return True


def test_lists_scenario():
    """The list-of-arrays scenario on tiny models: every peer reports; without the
    list API its peer is 'missing', with it the list step does the FlatParams step's
    work to the last bit."""
    cfg = config.Config(repeats=1, warmup=1, target_sample_s=2e-4, model_scale=0.05)
    res = scenarios.scenario_lists(cfg, 1, {}, np.random.default_rng(0))
    assert [r["case"] for r in res["cases"]] == ["transformer 1M", "transformer 16M",
                                                  "one array"]
    assert [r["arrays"] for r in res["cases"]] == [132, 132, 1]
    assert res["cases"][2]["n"] == 1000
    for r in res["cases"]:
        want = set(scenarios.LIST_PEERS) - ({"fastopt"} if r["arrays"] > 1 else set())
        assert set(r["results"]) == want
        for peer, x in r["results"].items():
            _check_result(x, with_bytes=False)
            assert x["status"] == "ok" or peer == "fastopt_list", (peer, x)
            assert x["status"] != "ok" or x["gbps"] > 0
    md = "\n".join(report._lists_md(res))
    assert "list of arrays" in md
    if not _list_api():
        assert all(r["results"]["fastopt_list"]["status"] == "missing" for r in res["cases"])
        assert "Not available" in md
        pytest.skip("fastopt.Adam takes no list of arrays in this version")
    hp = config.hyperparameters("Adam")
    shapes = scenarios.transformer_shapes(d=8, vocab=16, ctx=4)
    rng = np.random.default_rng(1)
    arrays = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    grads = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    got = {}
    for peer in ("fastopt_list", "fastopt_flat", "torch_fused"):
        step, params = scenarios._list_step(peer, hp, arrays, grads)
        for _ in range(3):
            step()
        got[peer] = np.concatenate([np.ravel(a) for a in params])
    assert not np.array_equal(got["fastopt_list"], np.concatenate([a.ravel() for a in arrays]))
    np.testing.assert_array_equal(got["fastopt_list"], got["fastopt_flat"])
    np.testing.assert_allclose(got["fastopt_list"], got["torch_fused"], rtol=1e-5, atol=1e-6)


def test_bench_modules_import_only_downwards():
    """fastopt/bench is layered: each module imports (anywhere in it, functions
    included) only modules of lower layers. An upward import fails here, and so
    does a new module that has no place in the list."""
    import ast
    import pathlib
    layers = ["config", "machine", "timing", "roof", "peers", "lbfgs", "scenarios",
              "torch_model", "lowp", "accuracy", "optimizers", "grid", "cuda", "report",
              "cli", "__init__"]
    folder = pathlib.Path(P.__file__).parent
    assert {f.stem for f in folder.glob("*.py")} == set(layers)
    graph = {}
    for name in layers:
        tree = ast.parse((folder / f"{name}.py").read_text())
        deps = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "fastopt.bench":
                # from fastopt.bench import roof: the submodule, or a name of __init__
                mods = [f"fastopt.bench.{a.name}" if a.name in layers else "fastopt.bench"
                        for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                mods = [node.module]
            elif isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            else:
                continue
            for m in mods:
                if m == "fastopt.bench":
                    deps.add("__init__")
                elif m.startswith("fastopt.bench."):
                    deps.add(m.split(".")[2])
        graph[name] = deps
        for dep in deps:
            assert layers.index(dep) < layers.index(name), f"{name} imports {dep} (upwards)"
    assert graph["config"] == set() and "cli" in graph["__init__"]


def test_lbfgs_scenario(tmp_path):
    """The L-BFGS scenario on a tiny case: every peer reports, fastopt and torch keep a
    full history through the timed steps, and the report has its table."""
    pytest.importorskip("scipy")
    out = tmp_path / "lb.json"
    rc = cli.main(["--rules", "none", "--scenarios", "lbfgs", "--lbfgs-cases", "3000:3",
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
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["--lbfgs-cases", "1e6"])


@pytest.mark.parametrize("rule", list(RULES))
def test_numpy_peer_is_the_reference(rule):
    """The NumPy peer runs fastopt.reference over blocks: over several blocks (and a
    ragged last one) it gives the unblocked reference's result to the last bit."""
    from fastopt import reference
    n = 2 * P.ReferenceStep.BLOCK + 37
    rng = np.random.default_rng(3)
    for variant in VARIANTS[rule]:
        hp = config.hyperparameters(rule, variant)
        p0 = rng.standard_normal(n).astype(np.float32)
        g = np.empty_like(p0)
        p = p0.copy()
        step, peer = P.make_step("numpy", rule, hp, p, g)
        ref_p, ref_state = p0.copy(), reference.initial_state(rule, hp, n, np.float32)
        ref_scalars = reference.initial_scalars(rule, hp)
        for t in range(1, 13):
            g[:] = rng.standard_normal(n)
            step()
            reference.step(rule, ref_p, g, ref_state, ref_scalars, hp, t)
        np.testing.assert_array_equal(p, ref_p)
        assert peer.scalars == ref_scalars and peer.state.keys() == ref_state.keys()
        for k in ref_state:
            np.testing.assert_array_equal(peer.state[k], ref_state[k])


def test_optimizer_scenarios_run_small(monkeypatch):
    """The schedule-free, Adafactor, sparse and Muon scenarios on tiny sizes: every
    peer runs, and fastopt's speedups are reported."""
    pytest.importorskip("torch")
    pytest.importorskip("schedulefree")
    from fastopt.bench import optimizers
    monkeypatch.setattr(optimizers, "SIZES", (4096,))
    monkeypatch.setattr(optimizers, "TABLE", (500, 8, 40, 10))
    monkeypatch.setattr(optimizers, "MUON_D", 16)
    cfg = config.Config(mode="quick", repeats=1, warmup=1, target_sample_s=1e-4)
    for name, run in optimizers.SCENARIO_RUNS.items():
        res = run(cfg, 1, {}, np.random.default_rng(0))
        assert res["cases"], name
        for case in res["cases"]:
            assert all(r["status"] == "ok" for r in case["results"].values()), (name, case)
            assert case["speedup"], name
        text = "\n".join(report.SECTIONS[name][1](res))
        assert "fastopt.torch" in text and "error" not in text, text


# ---------------------------------------------------------------------------
# The accuracy scenario (real training; tiny here)
# ---------------------------------------------------------------------------

def test_accuracy_scenario(tmp_path, capsys):
    """--scenarios accuracy alone: no grid, no roof; a row per model x variant, the
    features this install lacks reported as 'not available'; the Markdown says what
    ran; the loss curves' PNG is written."""
    pytest.importorskip("torch")
    pytest.importorskip("sklearn")
    rc = cli.main(["--scenarios", "accuracy", "--steps", "20", "--seeds", "1", "--no-bnb",
                   "--no-progress", "--out", str(tmp_path)])
    assert rc == 0
    doc = json.loads((tmp_path / "bench-accuracy.json").read_text())
    assert doc["cases"] == [] and doc["roof"] == [] and list(doc["scenarios"]) == ["accuracy"]
    sc = doc["scenarios"]["accuracy"]
    assert "error" not in sc, sc
    assert (sc["steps"], sc["seeds"], sc["final_window"]) == (20, [0], 10)
    rows = {(r["model"], r["variant"]): r for r in sc["summary"]}
    assert set(rows) == {(m, v) for m in accuracy.MODELS for v in accuracy.VARIANTS
                         if v != "bnb_adamw8bit"}
    for (m, v), r in rows.items():
        assert r["status"] in {"ok", "not available"}, r
        if r["status"] == "not available":
            assert r["detail"]
            continue
        assert 0 < r["train_mean"] < 6 and 0 < r["heldout_mean"] < 6
        run = next(x for x in sc["runs"] if (x["model"], x["variant"]) == (m, v))
        assert len(run["train_curve"]) == 20 and run["eval_steps"][-1] == 20
    for m in accuracy.MODELS:
        assert rows[(m, "adamw_fp32")]["status"] == "ok"
        # two float32 implementations of the same rule: the same losses after 20 steps
        assert abs(rows[(m, "torch_adamw_fp32")]["rel_diff_train"]) < 1e-3
    md = capsys.readouterr().out
    assert "## Accuracy" in md and "20 steps per run, 1 seed(s) (0)" in md
    assert md.splitlines()[2].count(" · ") == 2       # the machine line
    assert (tmp_path / "bench-accuracy.png").stat().st_size > 10_000
    assert "accuracy" not in config.Config().scenarios   # only when named


def _variant(make, dtype="float32", criterion=None):
    return accuracy.Variant("test", make, dtype, criterion)


def test_accuracy_missing_features_are_reported(monkeypatch):
    """A class or keyword this install lacks, or a dtype refused at the first step, is
    'not available'; any other exception is an 'error' of that run alone."""
    pytest.importorskip("torch")
    pytest.importorskip("sklearn")
    import torch

    def no_class(params, hp):
        import fastopt.torch as fot
        return fot.NoSuchOptimizer8bit(params, **hp)

    def no_keyword(params, hp):
        return torch.optim.AdamW(params, **hp, no_such_keyword=True)

    class RefusesAtStep(torch.optim.SGD):
        def step(self, closure=None):
            raise TypeError("bf16 parameters are not supported")

    class Breaks(torch.optim.SGD):
        def step(self, closure=None):
            raise RuntimeError("boom")
    monkeypatch.setitem(accuracy.VARIANTS, "no_class", _variant(no_class))
    monkeypatch.setitem(accuracy.VARIANTS, "no_keyword", _variant(no_keyword))
    monkeypatch.setitem(accuracy.VARIANTS, "refuses", _variant(
        lambda p, hp: RefusesAtStep(p, lr=hp["lr"]), dtype="bfloat16"))
    monkeypatch.setitem(accuracy.VARIANTS, "breaks", _variant(
        lambda p, hp: Breaks(p, lr=hp["lr"])))
    for v, status, words in (("no_class", "not available", "NoSuchOptimizer8bit"),
                             ("no_keyword", "not available", "no_such_keyword"),
                             ("refuses", "not available", "first step"),
                             ("breaks", "error", "boom")):
        r = accuracy.run_one("cnn", v, 0, 3)
        assert r["status"] == status and words in r["detail"], r
    import fastopt
    threads = torch.get_num_threads(), fastopt.get_num_threads()
    r = accuracy.run_one("cnn", "adamw_fp32", 0, 3)
    assert r["status"] == "ok"
    assert (torch.get_num_threads(), fastopt.get_num_threads()) == threads   # restored


def test_accuracy_runs_are_deterministic_in_any_process():
    """A run depends only on (model, variant, seed, steps): the same losses in this
    process and in a spawned worker (--jobs 2); another seed differs."""
    pytest.importorskip("torch")
    cfg = config.Config(accuracy_steps=3, accuracy_seeds=2, accuracy_models=["transformer"],
                        accuracy_variants=["torch_adamw_fp32"], accuracy_jobs=2)
    two = accuracy.scenario(cfg)
    key = [(r["seed"], r["final_train_loss"], r["train_curve"], r["heldout_loss"])
           for r in two["runs"]]
    one = [accuracy.run_one("transformer", "torch_adamw_fp32", seed, 3) for seed in (0, 1)]
    assert key == [(r["seed"], r["final_train_loss"], r["train_curve"], r["heldout_loss"])
                   for r in one]
    assert key[0][1] != key[1][1]        # seeds 0 and 1: other init and batches


def test_accuracy_summary_verdicts():
    """Mean ± std over seeds, relative difference of the means, paired per-seed
    differences and the pass/fail against each variant's criterion."""
    def run(v, seed, loss):
        return {"model": "m", "variant": v, "seed": seed, "status": "ok",
                "final_train_loss": loss, "heldout_loss": loss + 0.1,
                "heldout_accuracy": 0.5, "seconds": 1.0, "seconds_per_step": 0.01}
    runs = [run("adamw_fp32", 0, 2.0), run("adamw_fp32", 1, 2.2),
            run("adamw8bit", 0, 2.01), run("adamw8bit", 1, 2.21),
            run("bf16_sr", 0, 2.1), run("bf16_sr", 1, 2.3),
            {"model": "m", "variant": "bf16", "seed": 0, "status": "not available",
             "detail": "TypeError: no bf16"},
            {"model": "m", "variant": "bf16", "seed": 1, "status": "not available",
             "detail": "TypeError: no bf16"}]
    rows = {r["variant"]: r for r in accuracy.summarize(
        runs, ["m"], ["adamw_fp32", "adamw8bit", "bf16_sr", "bf16"], [0, 1])}
    ref = rows["adamw_fp32"]
    assert ref["train_mean"] == pytest.approx(2.1) and "pass" not in ref
    assert ref["train_std"] == pytest.approx(np.std([2.0, 2.2], ddof=1))
    assert rows["adamw8bit"]["rel_diff_train"] == pytest.approx(0.01 / 2.1)
    assert rows["adamw8bit"]["pass"] is True
    assert rows["bf16_sr"]["rel_diff_train"] == pytest.approx(0.1 / 2.1)
    assert rows["bf16_sr"]["pass"] is False
    assert rows["bf16_sr"]["paired_rel_diff_train_mean"] == pytest.approx(
        (0.1 / 2.0 + 0.1 / 2.2) / 2)
    assert rows["bf16"]["status"] == "not available" and "no bf16" in rows["bf16"]["detail"]
    md = "\n".join(report._accuracy_md({
        "steps": 5, "seeds": [0, 1], "jobs": 1, "elapsed_s": 1.0, "models": {},
        "summary": list(rows.values()), "reference": "adamw_fp32", "final_window": 2,
        "variants": {}}))
    assert "| m | `adamw8bit` | 2.1100 ± 0.1414 | +0.48% |" in md
    assert "**fail**" in md and "not available: TypeError: no bf16" in md


def test_accuracy_cli_options():
    args = cli.build_parser().parse_args(["--scenarios", "accuracy", "--steps", "50",
                                          "--seeds", "2", "--no-bnb", "--jobs", "2"])
    cfg = cli.config_from_args(args)
    assert (cfg.mode, cfg.rules, cfg.scenarios) == ("accuracy", [], ["accuracy"])
    assert (cfg.accuracy_steps, cfg.accuracy_seeds, cfg.accuracy_jobs) == (50, 2, 2)
    assert "bnb_adamw8bit" not in cfg.accuracy_variants and "adamw8bit" in cfg.accuracy_variants
    cfg = cli.config_from_args(cli.build_parser().parse_args(
        ["--scenarios", "accuracy,overhead", "--rules", "Adam"]))
    assert cfg.mode == "custom" and cfg.rules == ["Adam"]
    for bad in (["--accuracy-variants", "adamw4bit"], ["--scenarios", "accuracy", "--steps", "0"]):
        with pytest.raises(SystemExit):
            cli.config_from_args(cli.build_parser().parse_args(bad))


def test_lowp_scenario(monkeypatch):
    """The low-precision scenario on a 5,000-element tensor and a tiny 132-tensor
    model: every peer reports, bytes per element and state memory are those of the
    storage formats, the offload peer computes what torch fused + copy computes.
    bitsandbytes is stood in for by fastopt's AdamW8bit (its import alone takes
    seconds; tests/test_torch_8bit.py holds the two to each other)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("ml_dtypes")
    from fastopt.bench import lowp
    from fastopt.bench.machine import set_threads
    monkeypatch.setitem(scenarios.TRANSFORMERS, "tiny", dict(d=16, vocab=64, ctx=16))
    monkeypatch.setattr(lowp, "SIZE", 5000)
    monkeypatch.setattr(lowp, "MODEL", "tiny")
    real = lowp.make_peer

    def make_peer(peer, base, nthreads, min_8bit_size=lowp.MIN_8BIT_SIZE):
        if peer == "bnb_8bit":
            return real("fastopt_8bit", base, nthreads, min_8bit_size)
        return real(peer, base, nthreads, min_8bit_size)
    monkeypatch.setattr(lowp, "make_peer", make_peer)
    cfg = config.Config(mode="quick", repeats=1, warmup=1, target_sample_s=2e-4,
                        roof_bytes_per_array=1 << 20)
    saved = torch.get_num_threads()
    set_threads(1)
    try:
        res = lowp.scenario_lowp(cfg, 1, {}, np.random.default_rng(0))
    finally:
        set_threads(saved)
    assert [r["tensors"] for r in res["cases"]] == [1, 132]
    for r in res["cases"]:
        assert set(r["results"]) == set(lowp.PEERS)
        for peer, x in r["results"].items():
            assert x["status"] in STATUSES
            assert x["status"] == "ok" or peer == "deepspeed_offload", (peer, x)
            if x["status"] == "ok":
                assert x["min_s"] > 0 and x["gbps_min"] > 0 and x["roof_fraction"] > 0
        assert r["roof_gbps"] > 0
        mem = r["state_bytes_per_param"]
        assert mem["torch_fused"] >= 8 and mem["torch_fused_bf16"] >= 4
        assert mem["fastopt_offload"] == 8
        for c in r["comparisons"]:
            assert all(v["best"] > 0 and v["median"] > 0 for v in c["ratios"].values())
    one, model = res["cases"]
    res1 = one["results"]
    assert res1["fastopt_8bit"]["bytes_per_element"] == 16 + 16 * 20 / 5000
    assert res1["fastopt_8bit_bf16"]["bytes_per_element"] == 10 + 16 * 20 / 5000
    assert res1["fastopt_bf16"]["bytes_per_element"] == 14
    assert res1["fastopt_offload"]["bytes_per_element"] == 28
    assert res1["torch_fused_copy"]["bytes_per_element"] == 30
    # 8-bit state: codes, block scales and the two shared 256-entry maps
    assert one["state_bytes_per_param"]["fastopt_8bit"] == \
        pytest.approx(2 + 2 * 4 * 20 / 5000 + 2 * 1024 / 5000)
    # the tiny model's tensors are all under 4,096 elements: float32 state
    assert model["results"]["fastopt_8bit"]["bytes_per_element"] == 28
    assert "bnb_8bit" in one["bnb_call"]["ratios"]
    assert set(res["host_per_tensor"]) == set(lowp.HOST_PEERS)
    md = "\n".join(report.SECTIONS["lowp"][1](res))
    assert "bitsandbytes" in md and "Host cost per tensor" in md and "| configuration |" in md
    # the offload step computes torch fused AdamW's update, its copy is that rounded
    base = lowp._base([(3000,)], np.random.default_rng(1))
    off = lowp._Offload(base, 1)
    step, opt = real("torch_fused_upcast_copy", base, 1)
    for _ in range(3):
        off()
        step()
    p = opt.param_groups[0]["params"][0].detach()
    np.testing.assert_allclose(off.params[0], p.numpy(), rtol=0, atol=1e-6)
    np.testing.assert_array_equal(off.copies[0].astype(np.float32),
                                  torch.from_numpy(off.params[0]).bfloat16().float().numpy())
