"""Which running sequences keep their KV in the host pool: the CPU-resident selection.

Pure: no I/O, no state. The policy beside ``placement.place`` (which admits one sequence, first
come): given the running sequences of every micro-batch, ``select`` says for each one that may
move (its micro-batch's last step has come back) where it runs next, in which micro-batch and
whether on the host (``Placement.HOST``, staged for each step) or on the GPU (resident). The
scheduler (pipemax/scheduler.py) carries the moves out as copies in the step's timetable: a
sequence going to the host has its computed blocks copied to a host extent (``swap_out``,
before the step's prefetch reads them), one coming back to the GPU has them copied into new
GPU blocks (``swap_in``); a move between micro-batches copies nothing.

The choice, as the paper describes it:

- *The prefetch budget*: the tokens of KV PCIe moves while one step computes
  (``Budget.prefetch_tokens``, from the step model: the mean micro-batch's compute time over
  the time per token prefetched), over a window of the next ``window`` steps in which every
  context grows by a token a step. A host sequence costs its context (whole blocks, as a
  prefetch moves them) plus a per-request overhead (``overhead_tokens``) in each step.
- *Greedy first choice*: per micro-batch, the host sequences beyond its budget come back to
  the GPU, most expensive first, while the GPU has room; and when the GPU is short of blocks
  (``Budget.short``: the running sequences' growth or the waiting queue wants more than are
  free), resident sequences go to the host, cheapest first, as many as the budget (and the
  staging buffer) takes.
- *Local refinement*: moves of one sequence to another micro-batch, and exchanges of a host
  and a resident sequence of one micro-batch, while they lower the slowest micro-batch's step
  time (``step_seconds``; the pipeline runs at its slowest stage-step), ties broken by the
  sum of squares (evener is better).

Against churn (every move delays the sequence or copies its KV, so it must pay for more
than a step or two):

- a sequence moved in the last few steps (``Candidate.recent``, the scheduler keeps the
  count) stays where it is;
- a refinement move must lower the objective by ``MOVE_GAIN`` (not crumbs);
- a host sequence comes back to the GPU only when its micro-batch's host cost is over the
  budget by ``HYSTERESIS``: the budget a move to the host (and an admission,
  ``admission_tokens``) keeps is below that, so a sequence that grows a little past the
  budget stays, and none goes back and forth between host and GPU;
- at most ``MAX_MOVES`` sequences change place or micro-batch per call.

Admission: an offloaded sequence adds a sequence to its micro-batch's step, so a step may
take a prefetch longer than its compute while the step time per sequence still falls:
``admission_tokens`` is the budget scaled by (n + 1) / n for a micro-batch of n sequences,
and no bound for a micro-batch's first host sequence (as first come: only the staging buffer
decides). Without it, a sequence longer than one step's prefetch (a preempted 1024/1024 one)
waits while the GPU is full, and fewer sequences run than with first come.

Guarantees (tests/test_selection.py): the prefetch budget of a micro-batch is never exceeded
by a move to the host; the GPU blocks of the resident sequences fit the room given; every
sequence comes back exactly once; the slowest step time of the choice is never above the
one of the sequences left where they are (first come); a second call with nothing changed
moves nothing; at most ``MAX_MOVES`` sequences move per call.
"""
from __future__ import annotations

from dataclasses import dataclass

WINDOW = 4          # steps of a micro-batch the budget looks ahead
MAX_ROUNDS = 64     # refinement moves tried at most (each lowers the objective)
GAIN = 0.01         # the least share a refinement move lowers the objective by
MOVE_GAIN = 0.03    # ... when it moves a sequence (to another micro-batch or place)
HYSTERESIS = 0.05   # over the budget by this share before host sequences come back
MAX_MOVES = 4       # sequences that change place or micro-batch in one call at most


@dataclass(frozen=True)
class Candidate:
    key: int            # the caller's id for it
    mb: int             # its micro-batch now
    ctx: int            # context tokens at its next step
    on_host: bool       # its KV is in the host pool now
    movable: bool = True    # may change micro-batch or place (False: a step of it is in flight)
    recent: bool = False    # moved in the last few steps: stays put (no churn)


@dataclass(frozen=True)
class StepModel:
    """Seconds of one step on the slowest stage (the planner's cost model, pipemax/planner.py):
    ``fixed`` (weights) + ``per_seq`` * B (GEMMs) + ``per_token`` * context tokens (attention),
    and ``per_host_token`` for each token of KV prefetched over PCIe."""
    fixed: float
    per_seq: float
    per_token: float
    per_host_token: float

    def compute(self, n: int, ctx: float) -> float:
        return self.fixed + self.per_seq * n + self.per_token * ctx if n else 0.0


@dataclass(frozen=True)
class Budget:
    model: StepModel
    block_size: int
    gpu_room: int           # GPU blocks the movable resident sequences may hold in all
    staging_blocks: int     # one staging buffer (a micro-batch's host sequences' context)
    max_seqs: int           # sequences per micro-batch
    num_micro_batches: int
    short: int = 0          # GPU blocks wanted beyond the free ones (> 0: move some to the host)
    overhead_tokens: float = 0.0
    window: int = WINDOW

    def blocks(self, ctx: int) -> int:
        """Blocks a sequence of ``ctx`` tokens holds at the window's last step."""
        return -(-(ctx + self.window - 1) // self.block_size)

    def cost(self, ctx: int) -> float:
        """Prefetch tokens of a host sequence per step, averaged over the window."""
        return self.blocks(ctx) * self.block_size + self.overhead_tokens

    def prefetch_tokens(self, loads: list["Load"]) -> float:
        """Tokens PCIe moves while one step computes: the mean busy micro-batch's step."""
        busy = [ld.compute(self.model) for ld in loads if ld.n]
        if not busy or self.model.per_host_token <= 0:
            return float("inf")
        return sum(busy) / len(busy) / self.model.per_host_token

    def admission_tokens(self, loads: list["Load"], mb: int) -> float:
        """Host tokens micro-batch ``mb`` may hold when it admits one more sequence to the
        host: the prefetch budget times (n + 1) / n (its step may grow by as much as the
        sequence adds to it, per sequence no slower); unbounded for its first."""
        n = loads[mb].n
        if loads[mb].host_cost <= 0:        # its first: as first come, the staging decides
            return float("inf")
        return self.prefetch_tokens(loads) * ((n + 1) / n if n else 1.0)


@dataclass
class Load:
    """A micro-batch's sums: sequences, context tokens, host sequences' cost and blocks."""
    n: int = 0
    ctx: float = 0.0
    host_cost: float = 0.0
    host_blocks: int = 0

    def compute(self, m: StepModel) -> float:
        return m.compute(self.n, self.ctx)

    def step(self, m: StepModel) -> float:
        """Its step time: the compute, or the prefetch when that takes longer."""
        return max(self.compute(m), self.host_cost * m.per_host_token) if self.n else 0.0


def step_seconds(cands: list[Candidate], where: dict[int, tuple[int, bool]],
                 b: Budget) -> list[float]:
    """Each micro-batch's step time with the sequences ``where`` says."""
    return [ld.step(b.model) for ld in micro_batch_loads(cands, where, b)]


def micro_batch_loads(cands, where, b: Budget) -> list[Load]:
    loads = [Load() for _ in range(b.num_micro_batches)]
    for c in cands:
        mb, host = where[c.key]
        ld = loads[mb]
        ld.n += 1
        ld.ctx += c.ctx
        if host:
            ld.host_cost += b.cost(c.ctx)
            ld.host_blocks += b.blocks(c.ctx)
    return loads


def _objective(loads: list[Load], m: StepModel) -> tuple[float, float]:
    steps = [ld.step(m) for ld in loads]
    return max(steps, default=0.0), sum(t * t for t in steps)


def _better(a: tuple[float, float], b: tuple[float, float], gain: float = MOVE_GAIN) -> bool:
    """Is objective ``a`` clearly lower than ``b`` (by ``gain``: no moves for crumbs)?"""
    return a[0] < b[0] * (1 - gain) or (a[0] <= b[0] and a[1] < b[1] * (1 - 2 * gain))


def select(cands: list[Candidate], b: Budget) -> dict[int, tuple[int, bool]]:
    """Where each candidate runs next: key -> (micro-batch, on the host). Candidates that are
    not movable stay where they are; they count in their micro-batches' loads."""
    first = {c.key: (c.mb, c.on_host) for c in cands}
    movable = [c for c in cands if c.movable and not c.recent]
    if not movable or b.staging_blocks <= 0:
        return first
    where = dict(first)
    loads = micro_batch_loads(cands, where, b)
    budget = b.prefetch_tokens(loads)
    gpu_used = sum(b.blocks(c.ctx) for c in movable if not c.on_host)
    gpu_limit = max(b.gpu_room, gpu_used)      # never more than now when already over

    def moved() -> int:
        return sum(where[c.key] != first[c.key] for c in movable)

    def room_to_move(xs) -> bool:
        """May these candidates move without more than MAX_MOVES moved in all?"""
        return moved() + sum(where[x.key] == first[x.key] for x in xs) <= MAX_MOVES

    def move(c: Candidate, mb: int, host: bool) -> None:
        nonlocal gpu_used
        old_mb, old_host = where[c.key]
        for ld, sign, h in ((loads[old_mb], -1, old_host), (loads[mb], 1, host)):
            ld.n += sign
            ld.ctx += sign * c.ctx
            if h:
                ld.host_cost += sign * b.cost(c.ctx)
                ld.host_blocks += sign * b.blocks(c.ctx)
        gpu_used += b.blocks(c.ctx) * ((old_host and not host) - (host and not old_host))
        where[c.key] = (mb, host)

    def fits(c: Candidate, mb: int, host: bool) -> bool:
        """Would moving ``c`` there keep every limit (or not worsen one already broken)?"""
        old_mb, old_host = where[c.key]
        if mb != old_mb and loads[mb].n + 1 > b.max_seqs:
            return False
        if not host and old_host and gpu_used + b.blocks(c.ctx) > gpu_limit:
            return False
        if host and (mb != old_mb or not old_host):      # the host load of ``mb`` grows
            ld = loads[mb]
            if (ld.host_cost + b.cost(c.ctx) > budget
                    or ld.host_blocks + b.blocks(c.ctx) > b.staging_blocks):
                return False
        return True

    # greedy first choice: well over budget (by HYSTERESIS), the most expensive come back to
    # the GPU until within the budget
    for mb, ld in enumerate(loads):
        if ld.host_cost <= budget * (1 + HYSTERESIS) and ld.host_blocks <= b.staging_blocks:
            continue
        for c in sorted((c for c in movable if where[c.key] == (mb, True)),
                        key=lambda c: -c.ctx):
            if ld.host_cost <= budget and ld.host_blocks <= b.staging_blocks:
                break
            if fits(c, mb, False) and room_to_move([c]):
                move(c, mb, False)
    # short of GPU blocks: the cheapest residents to the host, as many as the budget takes
    if b.short > 0:
        for c in sorted((c for c in movable if not where[c.key][1]), key=lambda c: c.ctx):
            mb = where[c.key][0]
            if fits(c, mb, True) and room_to_move([c]):
                move(c, mb, True)
    # local refinement: single moves that lower the slowest step (then evenness)
    best = _objective(loads, b.model)
    for _ in range(MAX_ROUNDS):
        steps = [ld.step(b.model) for ld in loads]
        order = sorted(range(len(loads)), key=lambda m: steps[m])
        found = None
        for c in sorted(movable, key=lambda c: -steps[where[c.key][0]]):
            mb, host = where[c.key]
            tries = [[(c, m, host)] for m in order if m != mb]
            if host and (loads[mb].host_cost > budget * (1 + HYSTERESIS)
                         or loads[mb].host_blocks > b.staging_blocks):
                # well over budget: back to the GPU, alone or exchanged with a cheaper one
                tries.append([(c, mb, False)])
                tries += [[(c, mb, False), (r, mb, True)] for r in movable
                          if where[r.key] == (mb, False) and r.ctx < c.ctx]
            for moves in tries:
                if not room_to_move([x for x, _, _ in moves]):
                    continue
                undo = []
                for x, m, h in moves:
                    if not fits(x, m, h):
                        break
                    undo.append((x, *where[x.key]))
                    move(x, m, h)
                else:
                    obj = _objective(loads, b.model)
                    if _better(obj, best):
                        found, best = moves, obj
                for x, m, h in reversed(undo):
                    move(x, m, h)
                if found:
                    break
            if found:
                break
        if not found:
            break
        for x, m, h in found:
            move(x, m, h)
    if _objective(loads, b.model)[0] > _objective(micro_batch_loads(cands, first, b), b.model)[0] + 1e-12:
        return first
    return where
