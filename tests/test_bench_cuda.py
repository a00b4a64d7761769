"""``fastopt bench --device cuda``: the harness, without a GPU.

* with no GPU (or under the simulator) the command exits non-zero with one line;
* the whole run (cases, model scenario, roof, report, JSON, PNG) is exercised on
  CPU tensors through ``Device(torch, "cpu")``, the same code a GPU run takes
  with CUDA events in place of wall-clock ones (its figures are not GPU figures,
  and nothing here asserts a time);
* the GPU goals are evaluated from synthetic figures.
"""

import json
import os
import subprocess
import sys

import pytest

from fastopt.bench import cuda as B
from fastopt.bench import report, runner

HAVE_GPU_NODE = os.path.exists("/dev/nvidiactl")


@pytest.mark.skipif(HAVE_GPU_NODE, reason="this machine has a GPU driver")
@pytest.mark.parametrize("sim", [False, True], ids=["no-driver", "simulator"])
def test_no_cuda_device_is_one_line_and_nonzero(sim, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    if sim:
        env["NUMBA_ENABLE_CUDASIM"] = "1"
    r = subprocess.run([sys.executable, "-m", "fastopt", "bench", "--device", "cuda",
                        "--out", str(tmp_path)], capture_output=True, text=True, env=env,
                       timeout=120)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "no CUDA device found" in lines[0], r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""
    assert not list(tmp_path.iterdir())


def test_gpu_harness_end_to_end_on_cpu_tensors(tmp_path):
    torch = pytest.importorskip("torch")
    cfg = runner.quick_config()
    cfg.repeats, cfg.warmup, cfg.target_sample_s = 2, 1, 0.0005
    cfg.sizes, cfg.rules, cfg.dtypes = [1000, 4096], ["Adam", "SGD"], ["float32"]
    cfg.scenarios, cfg.model_scale, cfg.progress = ["model"], 0.05, False
    cfg.hypers = dict(runner.BENCH_HYPERS)
    cfg.roof_bytes_per_array = 4 << 20
    doc = B.run_gpu(B.Device(torch, "cpu"), cfg, ["--device", "cuda"])
    assert doc["device"] == "cpu" and doc["roof"][0]["kind"] == "copy"
    assert {(c["rule"], c["n"]) for c in doc["cases"]} == {
        (r, n) for r in cfg.rules for n in cfg.sizes}
    for c in doc["cases"]:
        assert set(c["results"]) == set(B.GPU_PEERS)
        f = c["results"]["fastopt"]
        assert f["status"] == "ok" and f["median_s"] > 0 and f["host_s"] > 0
        assert f["roof_fraction"] > 0
        # torch has a CPU fused Adam and SGD, and foreach everywhere
        assert c["results"]["torch_foreach"]["status"] == "ok"
    rows = doc["scenarios"]["model"]["cases"]
    assert {r["model"] for r in rows} == {"transformer", "resnet"}
    assert all(r["results"]["fastopt"]["status"] == "ok" for r in rows)
    doc["device"] = "cuda"  # render it as a GPU run would be
    md = report.markdown(doc)
    assert "Device copy bandwidth" in md and "host/step" in md and "issue 8" in md
    assert "torch foreach" in md
    report.write_json(doc, tmp_path / "x.json")
    assert json.loads((tmp_path / "x.json").read_text())["cases"]
    assert report.plot(doc, str(tmp_path / "x.png")) in (None, "matplotlib is not installed: "
                                                         "plot skipped (pip install "
                                                         "matplotlib, or pip install "
                                                         "'fastopt[bench]')")


def test_gpu_goals_on_synthetic_figures():
    def case(n, fast, fused, frac=0.95, host=10e-6):
        res = {"fastopt": {"status": "ok", "median_s": fast, "roof_fraction": frac,
                           "host_s": host},
               "torch_fused": {"status": "ok", "median_s": fused}}
        return {"rule": "Adam", "dtype": "float32", "n": n, "threads": 1, "results": res,
                "speedup": runner.speedups(res)}
    doc = {"device": "cuda",
           "cases": [case(1000, 1e-5, 5e-5), case(10 ** 6, 2e-5, 5e-5),
                     case(2 ** 24, 1e-3, 1.1e-3, 0.9), case(2 ** 28, 3e-3, 3e-3)],
           "scenarios": {"model": {"cases": [
               {"model": "transformer", "tensors": 132, "n": 1, "speedup": {"torch_fused": 1.2}}]}}}
    goals = {g["goal"]: g for g in report.evaluate_goals(doc)}
    every = goals["Adam float32, every size: fastopt vs torch fused (worst size)"]
    assert every["met"] is True and every["measured"] == pytest.approx(1.0)
    small = goals["Adam float32 n ≤ 1e6: fastopt vs torch fused (worst size)"]
    assert small["met"] is False and small["measured"] == pytest.approx(2.5)
    roof = goals["n ≥ 2^24: fraction of the copy bandwidth (worst case)"]
    assert roof["met"] is False and roof["measured"] == pytest.approx(0.9)
    assert goals["transformer model (132 tensors): FlatParams vs torch fused over the list"][
        "met"] is True
    assert goals["Adam float32 n=1e3: host cost of opt.step(g)"]["met"] is True
