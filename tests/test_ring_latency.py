"""tools/ring_latency.py: the hand-off timing runs, reports its figures and leaves nothing."""
import torch

from pipemax.ipc import names
from pipemax.pipeline import stage_threads
from tools.ring_latency import hand_off, parse_size


def test_sizes_parse():
    assert parse_size("8K") == 8192 and parse_size("2M") == 2 << 20 and parse_size("100") == 100


def test_hand_off_reports_and_cleans_up(run_id):
    r = hand_off(64 << 10, iters=20, warmup=2, run_id=run_id)
    assert r["bytes"] == 64 << 10 and r["iters"] == 20
    assert 0 < r["median_us"] < 1e6 and r["mean_us"] > 0 and r["gb_s"] > 0
    assert names.run_objects(run_id) == []      # the rings and their semaphores are gone


def test_hand_off_threads_are_its_own():
    before = torch.get_num_threads()
    r = hand_off(8 << 10, iters=5, warmup=1, threads=1)
    assert r["threads"] == 1 and torch.get_num_threads() == before


def test_stage_threads():
    assert stage_threads("cpu", None, 2, 16) == 8         # CPU stages share the cores
    assert stage_threads("cpu", None, 4, 2) == 1
    assert stage_threads("cuda", None, 1, 16) == 4         # GPU stages only copy: a few
    assert stage_threads("cuda", None, 8, 16) == 1
    assert stage_threads("cuda", None, 2, 7) == 2          # 7 cores for 2 stages and the driver
    assert stage_threads("cuda", 6, 8, 16) == 6            # --threads wins
