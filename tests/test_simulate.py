"""The simulator: its discrete-event pipeline, and the real engine and scheduler inside it making
the same decisions as a real run."""
from __future__ import annotations

import json

import pytest

from cli import run_cli, write_jsonl
from pipemax.config import RunConfig
from pipemax.model_config import BUILTIN_MODELS, apply_overrides
from tools import simulate as sim
from tools.pipeline_sim import PipelineSim, StageWork
from tools.workload import requests

TINY = ["vocab_size=512", "hidden_size=64", "intermediate_size=128", "num_layers=4",
        "num_heads=4", "num_kv_heads=2", "head_dim=16"]


def closed_loop(works: list[StageWork], micro_batches: int, steps: int,
                p: PipelineSim | None = None, back: list[float] | None = None
                ) -> tuple[PipelineSim, list[float]]:
    """The engine's loop: every micro-batch goes again as soon as it is back (``p`` and
    ``back``, each micro-batch's return time, carry on an earlier loop)."""
    p = p or PipelineSim(len(works))
    back = back if back is not None else [0.0] * micro_batches
    done = []
    for _ in range(steps):
        mb = min(range(micro_batches), key=lambda m: back[m])
        back[mb] = p.submit(back[mb], works)
        done.append(back[mb])
    return p, sorted(done)


# ---- the pipeline alone ---------------------------------------------------------------------
def test_one_stage_takes_the_sum_of_its_steps():
    p = PipelineSim(1)
    times = [0.3, 1.1, 0.25, 2.0]
    for t in times:
        p.submit(0.0, [StageWork(t)])
    assert p.end == pytest.approx(sum(times))
    assert p.shares()[0]["busy"] == pytest.approx(1.0)
    assert p.shares()[0]["bubble"] == pytest.approx(0.0)


@pytest.mark.parametrize("stages,micro_batches", [(4, 4), (4, 5), (8, 9)])
def test_equal_stages_with_enough_micro_batches_have_no_steady_bubble(stages, micro_batches):
    back = [0.0] * micro_batches
    p, done = closed_loop([StageWork(1.0)] * stages, micro_batches, 10 * stages, back=back)
    gaps = [b - a for a, b in zip(done[stages:], done[stages + 1:])]
    assert gaps == pytest.approx([1.0] * len(gaps))        # one step per step time
    before = [st.bubble_s for st in p.stages]
    closed_loop([StageWork(1.0)] * stages, micro_batches, 5 * stages, p, back)
    assert [st.bubble_s for st in p.stages] == pytest.approx(before)   # the steady state: none


def test_too_few_micro_batches_leave_bubbles():
    p, done = closed_loop([StageWork(1.0)] * 4, 2, 40)
    assert done[-1] - done[-3] == pytest.approx(4.0)         # 2 steps per 4 step times
    assert all(s["bubble"] > 0.4 for s in p.shares())


def test_the_slowest_stage_sets_the_pace():
    p, done = closed_loop([StageWork(1.0), StageWork(3.0), StageWork(1.0)], 4, 40)
    gaps = [b - a for a, b in zip(done[10:], done[11:])]
    assert gaps == pytest.approx([3.0] * len(gaps))
    sh = p.shares()
    assert sh[1]["bubble"] < 0.1 and sh[0]["bubble"] > 0.5 and sh[2]["bubble"] > 0.5


def test_a_prefetch_longer_than_the_compute_stalls_the_step():
    _, hidden = closed_loop([StageWork(1.0, prefetch_s=0.6)], 2, 30)
    assert [b - a for a, b in zip(hidden[5:], hidden[6:])] == pytest.approx([1.0] * 24)
    p, slow = closed_loop([StageWork(1.0, prefetch_s=2.5)], 2, 30)
    assert [b - a for a, b in zip(slow[5:], slow[6:])] == pytest.approx([2.5] * 24)
    assert p.shares()[0]["stall"] == pytest.approx(1.5 / 2.5, abs=0.05)
    assert p.shares()[0]["h2d"] == pytest.approx(1.0, abs=0.05)


@pytest.mark.parametrize("stages", [2, 4, 8])
def test_copy_plans_hide_a_prefetch_that_only_the_message_would_expose(stages):
    """A prefetch almost as long as the compute: learnt from the step's message, a later stage
    can issue it only once the activations arrive, and every step pays compute + copy; learnt
    from the driver's plan, it is issued while the previous step computes, and hides."""
    works = [StageWork(1.0, prefetch_s=0.9)] * stages
    late, done_late = closed_loop(works, stages + 1, 40 * stages, PipelineSim(stages, plans=False))
    early, done = closed_loop(works, stages + 1, 40 * stages, PipelineSim(stages, plans=True))
    period = lambda d: (d[-1] - d[-21]) / 20
    assert period(done_late) == pytest.approx(1.9, rel=0.02)
    assert period(done) == pytest.approx(1.0, rel=0.02)
    assert all(s["stall"] > 0.4 for s in late.shares())
    assert all(s["stall"] < 0.05 for s in early.shares())


@pytest.mark.parametrize("stages", [1, 2, 8])
def test_taking_the_next_step_early_hides_the_first_stages_prefetch(stages):
    """The first stage learns a step from its message alone. With one micro-batch more than
    stages, the next one arrives while the step before it computes: a stage that takes it only
    once that step's outputs are ready pays compute + copy; one that takes it early (the
    worker with overlapped offload, stages/transfer.py take_while) hides the copy."""
    works = [StageWork(1.0, prefetch_s=0.9, handoff_s=0.01)] * stages
    late, done_late = closed_loop(works, stages + 1, 60 * stages, PipelineSim(stages))
    early, done = closed_loop(works, stages + 1, 60 * stages, PipelineSim(stages, early=True))
    period = lambda d: (d[-1] - d[-21]) / 20
    assert period(done_late) > 1.15
    assert period(done) == pytest.approx(1.0, rel=0.02)
    assert late.shares()[0]["stall"] > 0.1
    assert all(s["stall"] < 0.02 for s in early.shares())


def test_a_prefetch_waits_for_its_step_to_be_known():
    """One stage, one micro-batch: the next step is submitted only when the last is back, so
    its copy cannot start earlier, with plans or without."""
    for plans, early in ((False, False), (True, False), (True, True)):
        p, done = closed_loop([StageWork(1.0, prefetch_s=0.5)], 1, 10,
                              PipelineSim(1, plans, early))
        assert done[-1] - done[-2] == pytest.approx(1.5)


def test_a_staging_buffer_is_reused_only_after_its_offload():
    # prefetch k waits for offload k-2: with slow offloads the copies cannot run ahead
    p, done = closed_loop([StageWork(1.0, prefetch_s=0.1, offload_s=3.0)], 3, 30)
    gaps = [b - a for a, b in zip(done[6:], done[7:])]
    assert sum(gaps) / len(gaps) == pytest.approx(3.0, rel=0.05)   # offload-bound


# ---- against a real engine run --------------------------------------------------------------
@pytest.mark.parametrize("offload", ["off", "on"])
def test_same_steps_as_a_real_run(tmp_path, offload):
    """A tiny model through the real CLI on the CPU and through the simulator with the stages'
    own reports: the same plan, steps, preemptions and offload admissions."""
    model = apply_overrides(BUILTIN_MODELS["llama2-7b"], TINY)
    rows = requests("chat", 24, model.vocab_size, max_len=256)
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    stats = tmp_path / "stats.json"
    flags = ["--kv-cache-gb", "0.0006", "--block-size", "4", "--kv-offload", offload,
             "--host-kv-gb", "0.01", "--max-num-seqs", "12"]
    p = run_cli(["--load-format", "dummy", "--model", "llama2-7b", "--gpus", "2",
                 *sum((["--override", o] for o in TINY), []), "--input", str(inp),
                 "--output", str(tmp_path / "out.jsonl"), "--stats-json", str(stats), *flags])
    assert p.returncode == 0, p.stderr
    real = json.loads(stats.read_text())
    cfg = RunConfig(gpus=2, device="cpu", model="llama2-7b", load_format="dummy",
                    dtype="float32", kv_cache_gb=0.0006, block_size=4, kv_offload=offload,
                    host_kv_gb=0.01, max_num_seqs=12)
    lines = inp.read_bytes().splitlines()
    r = sim.simulate(cfg, model, real["stages"], lines, sim.PRESETS["h200"],
                     int(0.01 * sim.GiB), model.max_position_embeddings)
    assert r["plan"] == real["plan"]
    assert real["preemptions"] > 0          # the case exercises preemption
    if offload == "on":
        assert real["offloaded_admitted"] > 0
    for k in ("steps", "preemptions", "offloaded_admitted", "streamed_admitted",
              "requests_ok", "output_tokens", "num_blocks", "micro_batches"):
        assert r[k] == real[k], k
    assert r["seconds"] > 0 and len(r["bubble_share"]) == 2


# ---- the command ----------------------------------------------------------------------------
def tiny_args(*extra):
    return ["--model", "llama2-7b", *sum((["--override", o] for o in TINY), []),
            "--workload", "fixed:40/8", "--num-requests", "16", "--json", *extra]


def test_cli_json_and_calibration(capsys):
    fast_rings = ["--figures", "handoff_ms=1e-9,ring_gbs=1e9"]    # step times alone
    assert sim.main(tiny_args("--preset", "rtx4090", "--gpus", "2", *fast_rings)) == 0
    base = json.loads(capsys.readouterr().out)
    assert base["requests_ok"] == 16 and base["output_tokens"] == 16 * 8
    assert base["steps"] == sum(v["steps"] for v in base["step_kinds"].values())
    assert sim.main(tiny_args("--preset", "rtx4090", "--gpus", "2", *fast_rings,
                              "--calibrate", "prompt=0.5,mixed=0.5,decode=0.5")) == 0
    half = json.loads(capsys.readouterr().out)
    assert half["steps"] == base["steps"]
    assert half["seconds"] == pytest.approx(2 * base["seconds"], rel=1e-4)
    assert sim.main(tiny_args("--preset", "rtx4090", "--gpus", "2", *fast_rings,
                              "--calibrate", "decode=1,layer_us=100")) == 0
    fixed = json.loads(capsys.readouterr().out)     # 2 layers per stage, 100 us each per step
    assert fixed["seconds"] > base["seconds"] + base["steps"] * 200e-6 / 2


def test_calibration_from_a_run_json(tmp_path, capsys):
    assert sim.main(tiny_args()) == 0
    r = json.loads(capsys.readouterr().out)
    fake = {"finals": [{"step_kinds": {k: {"steps": v["steps"], "gpu_s": 4 * sum(v["model_s"])}
                                       for k, v in r["step_kinds"].items()}}]}
    path = tmp_path / "run.json"
    path.write_text(json.dumps([{"system": "other"}, {"system": "pipemax", **fake}]))
    assert sim.main(tiny_args("--calibrate", f"{path}:pipemax")) == 0
    cal = json.loads(capsys.readouterr().out)["calibration"]
    assert cal and all(v == pytest.approx(0.25) for v in cal.values())
    # a fixed term per layer and step, a quarter of the run's decode seconds
    dec = r["step_kinds"]["decode"]
    us = 1e6 * sum(dec["model_s"]) / (dec["steps"] * 4)       # 4 layers in all
    assert sim.main(tiny_args("--calibrate", f"{path}:pipemax,layer_us={us!r}")) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["calibration"]["layer_us"] == pytest.approx(us)
    assert out["calibration"]["decode"] == pytest.approx(1 / 3)
    for k, v in out["step_kinds"].items():      # the fit gives back the run's seconds
        if k in out["calibration"]:
            assert sum(v["sim_s"]) == pytest.approx(4 * sum(v["model_s"]), rel=1e-6)


@pytest.mark.parametrize("flags,needle", [
    (["--calibrate", "decode=x"], "kind=number"),
    (["--calibrate", "fast=0.5"], "is not one of"),
    (["--figures", "hbm_gbs=-1"], "positive"),
    (["--gpus", "9"], "more stages"),
    (["--gpu-memory-gb", "100", "--preset", "a10"], "more than"),
])
def test_bad_flags_are_one_line_and_exit_2(flags, needle, capsys):
    assert sim.main(tiny_args(*flags)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
