"""tools/bench.py on the CPU with a tiny dummy model: every system runs, every column is there."""
from __future__ import annotations

import json

import pytest

from tools import bench

TINY = ["--override", "num_layers=2", "--override", "hidden_size=64", "--override",
        "intermediate_size=128", "--override", "num_heads=4", "--override", "num_kv_heads=2",
        "--override", "head_dim=16", "--override", "vocab_size=300"]


def test_bench_cpu_table_has_every_column(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = bench.main(["--model", "llama3-8b", *TINY, "--device", "cpu", "--dtype", "float32",
                       "--gpus", "2", "--workload", "fixed:16/8", "--num-requests", "8",
                       "--systems", "pipemax,pipemax-offload,pipemax-resident,pipemax-1gpu,"
                       "transformers,roofline", "--hf-batch-sizes", "4,8",
                       "--pipemax-args", "--threads 1 --kv-cache-gb 0.0002 --block-size 4",
                       "--json", str(out)])
    assert code == 0
    cap = capsys.readouterr()
    table = cap.out
    assert cap.err.count("pipemax: loaded in") == 4      # each run's own lines pass through
    header = table.splitlines()[0].split(" | ")
    for col in ("system", "output_tok_s", "total_tok_s", "requests_s", "peak_gpu_gb",
                "host_kv_gb", "pcie_gb", "idle_share", "measured_over_predicted"):
        assert col in header
    rows = {r["system"]: r for r in json.loads(out.read_text())}
    assert set(rows) == {"pipemax", "pipemax-offload", "pipemax-resident", "pipemax-1gpu",
                         "transformers", "roofline"}
    for name in ("pipemax", "pipemax-offload", "pipemax-resident", "pipemax-1gpu"):
        r = rows[name]
        assert "error" not in r, r
        assert r["output_tokens"] == 8 * 8 and r["output_tok_s"] > 0
        assert 0 <= r["idle_share"] <= 1
    assert rows["pipemax-offload"]["plan"]["offload"] and rows["pipemax-offload"]["pcie_gb"] > 0
    assert not rows["pipemax-resident"]["plan"]["offload"]
    assert rows["pipemax-resident"]["pcie_gb"] == 0
    assert rows["pipemax-1gpu"]["gpus"] == 1
    assert rows["transformers"]["output_tok_s"] > 0
    assert rows["roofline"]["output_tok_s"] == rows["pipemax"]["plan"]["predicted_tok_s"]


def test_bench_fp8_kv_beside_16_bit_kv(tmp_path, capsys):
    """pipemax-fp8kv and pipemax-kv16 side by side: the same KV budget holds 4x the blocks in
    fp8 as in float32, and the table names each run's KV dtype."""
    out = tmp_path / "bench.json"
    assert bench.main(["--model", "llama3-8b", *TINY, "--device", "cpu", "--dtype", "float32",
                       "--workload", "fixed:16/8", "--num-requests", "8",
                       "--systems", "pipemax-kv16,pipemax-fp8kv",
                       "--pipemax-args", "--threads 1 --kv-cache-gb 0.0002 --block-size 4",
                       "--json", str(out)]) == 0
    rows = {r["system"]: r for r in json.loads(out.read_text())}
    kv16, fp8 = rows["pipemax-kv16"], rows["pipemax-fp8kv"]
    assert (kv16["kv_cache_dtype"], fp8["kv_cache_dtype"]) == ("float32", "fp8 (e4m3)")
    assert fp8["output_tokens"] == kv16["output_tokens"] == 64
    assert fp8["stages"][0]["block_bytes"] * 4 == kv16["stages"][0]["block_bytes"]
    assert fp8["stages"][0]["max_blocks"] >= 4 * kv16["stages"][0]["max_blocks"] - 1
    assert "fp8 (e4m3)" in capsys.readouterr().out


def test_workload_with_long_outliers():
    from tools.workload import lengths
    base = lengths("fixed:16/8", 10, 0, 4096)
    mixed = lengths("fixed:16/8+3x900/5", 10, 0, 4096)
    assert len(mixed) == 13 and mixed.count((900, 5)) == 3
    assert [x for x in mixed if x != (900, 5)] == base
    where = [i for i, x in enumerate(mixed) if x == (900, 5)]
    assert where[0] > 0 and where[-1] < 12 and min(b - a for a, b in zip(where, where[1:])) > 1
    with pytest.raises(ValueError, match="COUNTxIN/OUT"):
        lengths("fixed:16/8+3y900", 10, 0, 4096)
