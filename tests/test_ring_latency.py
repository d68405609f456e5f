"""tools/ring_latency.py: the hand-off timing runs, reports its figures and leaves nothing."""
from ipc import names
from tools.ring_latency import hand_off, parse_size


def test_sizes_parse():
    assert parse_size("8K") == 8192 and parse_size("2M") == 2 << 20 and parse_size("100") == 100


def test_hand_off_reports_and_cleans_up(run_id):
    r = hand_off(64 << 10, iters=20, warmup=2, run_id=run_id)
    assert r["bytes"] == 64 << 10 and r["iters"] == 20
    assert 0 < r["median_us"] < 1e6 and r["mean_us"] > 0 and r["gb_s"] > 0
    assert names.run_objects(run_id) == []      # the rings and their semaphores are gone
