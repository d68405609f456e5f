"""The look-ahead's order (pipemax/lookahead.py): pure, no engine."""
import random

import pytest

from pipemax.lookahead import Lookahead, output_left
from pipemax.requests import Request, SamplingParams
from pipemax.sequence import Sequence


def seq(i: int, prompt: int, max_tokens: int) -> Sequence:
    r = Request(i, f"r{i}", "completion", tuple(range(3, 3 + prompt)),
                SamplingParams(max_tokens=max_tokens, temperature=0), False, None)
    return Sequence(r, i)


@pytest.mark.parametrize("seed", range(5))
def test_longest_first_with_ties_in_input_order(seed):
    rng = random.Random(seed)
    seqs = [seq(i, rng.randint(1, 20), rng.randint(1, 40)) for i in range(60)]
    la = Lookahead("longest", 48)
    for s in seqs:
        la.push(s)
    got = [la.pop() for _ in range(len(seqs))]
    want = sorted(seqs, key=lambda s: (-min(s.params.max_tokens, 48 - s.num_prompt),
                                       s.req.index))
    assert [s.req.index for s in got] == [s.req.index for s in want]
    assert not len(la) and la.tokens == 0


def test_fcfs_keeps_the_input_order_and_remove_and_clear():
    la = Lookahead("fcfs", 100)
    for i, m in enumerate([5, 50, 1, 9]):
        la.push(seq(i, 4 + i, m))
    assert la.tokens == 4 + 5 + 6 + 7
    assert la.remove("r1").req.index == 1 and la.remove("r1") is None and la.tokens == 17
    assert [la.pop().req.index for _ in range(2)] == [0, 2]
    assert la.clear() == 1 and not len(la) and la.tokens == 0
    with pytest.raises(ValueError, match="scheduling policy"):
        Lookahead("shortest", 10)


def test_output_left_is_bounded_by_the_model_length():
    assert output_left(seq(0, 10, 100), 64) == 54
    assert output_left(seq(0, 10, 5), 64) == 5
