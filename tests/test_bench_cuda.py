"""``fastopt bench --device cuda``: the harness, without a GPU.

* with no GPU (or under the simulator) the command exits non-zero with one line;
* the whole run (cases, model scenario, roof, report, JSON, PNG) is exercised on
  CPU tensors through ``Device(torch, "cpu")``, the same code a GPU run takes
  with CUDA events in place of wall-clock ones (its figures are not GPU figures,
  and nothing here asserts a time);
"""

import json
import re
import os
import subprocess
import sys

import pytest

from fastopt.bench import config, report
from fastopt.bench import cuda as B

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
    cfg = config.quick_config()
    cfg.repeats, cfg.warmup, cfg.target_sample_s = 2, 1, 0.0005
    cfg.sizes, cfg.rules, cfg.dtypes = [1000, 4096], ["Adam", "SGD"], ["float32"]
    cfg.scenarios, cfg.model_scale, cfg.progress = ["model"], 0.05, False
    cfg.hypers = dict(config.BENCH_HYPERS)
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
    assert "Device copy bandwidth" in md and "host/step" in md
    assert "goal" not in md.lower() and not re.search(r"issue \d", md)
    assert "torch foreach" in md
    report.write_json(doc, tmp_path / "x.json")
    assert json.loads((tmp_path / "x.json").read_text())["cases"]
    assert report.plot(doc, str(tmp_path / "x.png")) in (None, "matplotlib is not installed: "
                                                         "plot skipped (pip install "
                                                         "matplotlib, or pip install "
                                                         "'fastopt[bench]')")
