"""fastopt.torch under torch.distributed: 2 processes over gloo on 127.0.0.1, meeting
through a rendezvous file (no TCP port to race for).

(a) DistributedDataParallel + ZeroRedundancyOptimizer(optimizer_class=fastopt.torch.AdamW):
    each rank steps its shard of the parameters; consolidate_state_dict(to=0) and
    state_dict() on rank 0.
(b) DistributedDataParallel + fastopt.torch.SGD(momentum).

Each rank gets half of every batch; the single-process run gets the whole batch. The
mean loss is the same (equal halves), so the gradients agree up to the order of the
sum (all-reduce vs one batch): float64, normwise ~1e-16 per step, hence the tight TOL.

The ranks are separate Python processes running this file (no pickling of test
functions), bounded by a timeout: a hang fails the test instead of stalling CI.
"""

import os
import subprocess
import sys
from datetime import timedelta

import pytest

torch = pytest.importorskip("torch", reason="the torch adapter needs torch")
dist = pytest.importorskip("torch.distributed")

if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import fastopt  # noqa: E402
import fastopt.torch as fot  # noqa: E402

WORLD = 2
STEPS = 8
BATCH = 32          # per step, split evenly over the ranks
TIMEOUT_S = 60      # both ranks, start to finish (they take ~8 s here)
TOL = 1e-12         # normwise, float64

ADAMW = dict(lr=1e-2, weight_decay=0.1, betas=(0.9, 0.99))
SGD = dict(lr=0.05, momentum=0.9, weight_decay=1e-3)


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.LayerNorm(16), nn.Linear(16, 3)).double()


def batches():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(STEPS, BATCH, 12, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (STEPS, BATCH), generator=g)
    return x, y


def shard(t, rank, world):
    per = t.shape[0] // world
    return t[rank * per:(rank + 1) * per]


def train(model, opt, rank=0, world=1):
    x, y = batches()
    for i in range(STEPS):
        opt.zero_grad()
        loss = F.cross_entropy(model(shard(x[i], rank, world)), shard(y[i], rank, world))
        loss.backward()
        opt.step()


def flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def single_process(mode):
    model = make_model()
    if mode.startswith("zero"):
        opt = fot.AdamW(model.parameters(), **ADAMW)
    else:
        opt = fot.SGD(model.parameters(), **SGD)
    train(model, opt)
    return model, opt


# ---------------------------------------------------------------------------
# One rank (this file run as a script)
# ---------------------------------------------------------------------------

def rank_main(rank, world, attempt, mode, out):
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    fastopt.set_num_threads(1)
    # a file rendezvous: a TCP port picked free by the test could be taken by another
    # connection before rank 0 binds it (a 60 s stall seen in full-suite runs)
    store = os.path.join(out, f"rendezvous-{attempt}")
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=TIMEOUT_S))
    try:
        model = make_model()
        ddp = DDP(model)
        result = {}
        if mode.startswith("zero"):
            # bucket views: ZeRO re-points every p.data into its own flat buckets after
            # fastopt packed them, and fastopt must pick the new storage up
            opt = ZeroRedundancyOptimizer(ddp.parameters(), optimizer_class=fot.AdamW,
                                          parameters_as_bucket_view=mode == "zero_bucket_view",
                                          **ADAMW)
            result["local_class"] = type(opt.optim).__module__ + "." + type(opt.optim).__name__
            result["local_params"] = sum(len(g["params"]) for g in opt.optim.param_groups)
            train(ddp, opt, rank, world)
            opt.consolidate_state_dict(to=0)
            if rank == 0:
                result["state_dict"] = opt.state_dict()
        else:
            opt = fot.SGD(ddp.parameters(), **SGD)
            train(ddp, opt, rank, world)
        result["params"] = flat(model)
        torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------
# The tests
# ---------------------------------------------------------------------------

def _run_ranks(mode, tmp_path, attempt):
    """(finished, outputs, return codes) of one launch of both ranks."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [os.path.dirname(os.path.dirname(os.path.abspath(fastopt.__file__))),
         os.environ.get("PYTHONPATH", "")]))
    logs = [open(tmp_path / f"rank{r}.log", "wb") for r in range(WORLD)]  # no pipe to fill
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), str(r), str(WORLD),
                               str(attempt), mode, str(tmp_path)],
                              stdout=log, stderr=subprocess.STDOUT, env=env)
             for r, log in enumerate(logs)]
    finished = True
    try:
        for p in procs:
            p.wait(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        finished = False
        for p in procs:
            p.kill()
            p.wait()
    for log in logs:
        log.close()
    outputs = [(tmp_path / f"rank{r}.log").read_text(errors="replace") for r in range(WORLD)]
    return finished, outputs, [p.returncode for p in procs]


def launch(mode, tmp_path):
    finished, outputs, codes = _run_ranks(mode, tmp_path, 0)
    if not finished:
        # one more try with a fresh rendezvous; a real hang stalls it too and fails
        # with both ranks' output
        first = outputs
        finished, outputs, codes = _run_ranks(mode, tmp_path, 1)
        if not finished:
            pytest.fail(f"{mode}: the ranks did not finish within {TIMEOUT_S} s, twice:\n"
                        + "\n".join(f"rank {r}: {out[-2000:]}"
                                    for r, out in enumerate(first + outputs)))
    for r, (code, out) in enumerate(zip(codes, outputs)):
        assert code == 0, f"rank {r} failed:\n{out[-4000:]}"
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def normwise(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("mode", ["zero", "zero_bucket_view"])
def test_zero_redundancy_optimizer_with_fastopt_adamw(tmp_path, mode):
    ranks = launch(mode, tmp_path)
    ref_model, ref_opt = single_process(mode)
    ref = flat(ref_model)
    n_params = len(list(ref_model.parameters()))
    # each rank stepped a real shard with fastopt's class, and the shards cover the model
    assert all(r["local_class"] == "fastopt.torch.AdamW" for r in ranks)
    assert all(0 < r["local_params"] < n_params for r in ranks)
    assert sum(r["local_params"] for r in ranks) == n_params
    assert torch.equal(ranks[0]["params"], ranks[1]["params"]), "replicas drifted apart"
    assert normwise(ranks[0]["params"], ref) <= TOL
    assert normwise(ranks[0]["params"], make_model_flat()) > 1e-3, "nothing trained"

    sd, ref_sd = ranks[0]["state_dict"], ref_opt.state_dict()
    assert sorted(sd["state"]) == sorted(ref_sd["state"]) == list(range(n_params))
    for i, st in ref_sd["state"].items():
        assert set(sd["state"][i]) == set(st), i
        assert float(sd["state"][i]["step"]) == float(st["step"]) == STEPS
        for key in ("exp_avg", "exp_avg_sq"):
            assert normwise(sd["state"][i][key], st[key]) <= TOL, (i, key)
    # the consolidated state dict loads into a single-process fastopt.torch.AdamW,
    # which then continues as the reference does
    model = make_model()
    with torch.no_grad():
        for p, v in zip(model.parameters(), unflatten(ranks[0]["params"], model)):
            p.copy_(v)
    opt = fot.AdamW(model.parameters(), **ADAMW)
    opt.load_state_dict(sd)
    train(model, opt)
    train(ref_model, ref_opt)
    assert normwise(flat(model), flat(ref_model)) <= TOL


def unflatten(vec, model):
    out, k = [], 0
    for p in model.parameters():
        out.append(vec[k:k + p.numel()].view_as(p))
        k += p.numel()
    return out


def make_model_flat():
    return flat(make_model())


def test_ddp_with_fastopt_sgd_momentum(tmp_path):
    ranks = launch("ddp", tmp_path)
    ref_model, ref_opt = single_process("ddp")
    ref = flat(ref_model)
    assert torch.equal(ranks[0]["params"], ranks[1]["params"]), "replicas drifted apart"
    assert normwise(ranks[0]["params"], make_model_flat()) > 1e-3, "nothing trained"
    assert normwise(ranks[0]["params"], ref) <= TOL


if __name__ == "__main__":
    rank_main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])
