"""tools/compare_hf.py's pure parts: units in the last place, the top-2 gap, the first
difference per prompt and the summary."""
from __future__ import annotations

import pytest
import torch

from tools.compare_hf import compare_rows, summarize, top2, ulp


def test_ulp_at_the_magnitude():
    assert ulp(1.0) == 2 ** -7 and ulp(1.99) == 2 ** -7 and ulp(2.0) == 2 ** -6
    assert ulp(-17.3) == 2 ** (4 - 7)
    assert ulp(20.0, "float32") == 2 ** (4 - 23) and ulp(0.75, "float16") == 2 ** (-1 - 10)
    # next bfloat16 number after x is x + ulp(x)
    x = torch.tensor(13.0, dtype=torch.bfloat16)
    assert float(torch.nextafter(x, torch.tensor(99.0, dtype=torch.bfloat16))) - 13.0 == ulp(13.0)


def test_top2_per_step():
    logits = torch.tensor([[1.0, 5.0, 4.5, -2.0], [3.0, 3.0, 0.0, 1.0]])
    top1, gaps = top2(logits)
    assert top1 == [5.0, 3.0] and gaps == [0.5, 0.0]


def test_rows_and_summary():
    ref = [([1, 2, 3], [10.0, 10.0, 10.0], [1.0, 1.0, 1.0]),
           ([4, 5, 6], [10.0, 12.0, 10.0], [1.0, 0.0625, 1.0]),       # tie at token 1
           ([7, 8, 9], [10.0, 10.0, 40.0], [1.0, 1.0, 2.0])]
    got = [[1, 2, 3], [4, 9, 9], [7, 8, 0]]
    rows = compare_rows([5, 6, 7], got, ref, "bfloat16", tie_ulps=4)
    assert rows[0] == {"prompt": 0, "len": 5, "equal": True}
    assert rows[1]["first_diff"] == 1 and rows[1]["gap_ulps"] == pytest.approx(1.0)
    assert rows[1]["near_tie"] and rows[1]["ulp"] == 2 ** -4
    assert rows[2]["first_diff"] == 2 and rows[2]["gap_ulps"] == pytest.approx(8.0)   # ulp 0.25
    assert not rows[2]["near_tie"]
    s = summarize(rows)
    assert s == {"prompts": 3, "identical": 1, "identical_share": pytest.approx(1 / 3),
                 "differ_at_near_tie": 1, "differ_elsewhere": 1, "max_gap_ulps": 8.0}


def test_a_shorter_continuation_differs():
    rows = compare_rows([3], [[1, 2]], [([1, 2, 3], [1.0] * 3, [0.5] * 3)])
    assert rows[0]["first_diff"] == 2 and not rows[0]["equal"]


def test_compare_kv_counts_the_same_context_only():
    from tools.compare_kv import compare
    base = [([1, 2, 3, 4], [-0.1, -0.2, -0.3, -0.4]), ([5, 6, 7, 8], [-1.0, -1.0, -1.0, -1.0])]
    other = [([1, 2, 3, 9], [-0.1, -0.25, -0.3, -5.0]), ([5, 7, 7, 8], [-1.5, -9.0, -9.0, -9.0])]
    s = compare(base, other, first=3)
    assert (s["identical_first"], s["identical_share"]) == (1, 0.5)
    # prompt 0: positions 0-2 (diffs 0, 0.05, 0); prompt 1: position 0 (0.5); then they differ
    assert s["positions_compared"] == 4
    assert abs(s["logprob_mean_abs_diff"] - 0.55 / 4) < 1e-9
    assert abs(s["logprob_max_abs_diff"] - 0.5) < 1e-9
