"""A stage's copy plans: the steps the driver has sent that this stage has not yet handled.

With KV offload over several stages, the driver writes each step's copies (``PLAN``: the
tensors ``staging_for`` needs, ipc/protocol.py) to every stage after the first as it sends
the step to stage 0 (pipemax/pipeline.py ``send_step``). A stage learns step k+1 that way
long before the step's activations arrive from the stage before it, so it can prefetch its
offloaded KV while step k computes, which is what the timetable's look-ahead is for
(stages/timetable.py); learnt only from the ring of activations, the copy would start when
the activations come, and a later stage would wait for it every step (tools/pipeline_sim.py).

    driver --PLAN k, k+1, ...--> [ring plan<i>] --take(k+1), at step k--> prefetch(k+1)

``take`` reads every plan already in the ring without waiting (the stage drains it each step,
so the ring holds at most the steps in flight), drops those of steps already handled, and
gives the one asked for if it has come. The plans a step's own message carries are the same
tensors, so whichever comes first stages it (stages/worker.py ``Stage.staging``).
"""
from __future__ import annotations

from pipemax.ipc import protocol as P
from pipemax.ipc.ring import Ring
from pipemax.stages.transfer import take


class PlanInbox:
    def __init__(self, ring: Ring, alive):
        self.ring = ring
        self.alive = alive
        self.plans: dict[int, tuple[dict, dict]] = {}    # step -> (meta, tensors)

    def take(self, k: int) -> tuple[dict, dict] | None:
        """Step ``k``'s plan if it has come (and it is handed out once); plans of the steps
        before ``k`` are dropped."""
        while (msg := take(self.ring, self.alive, 0, False)) is not None:
            meta = msg[0]
            if meta.get("op") != P.OP_PLAN:
                raise RuntimeError(f"plan ring {self.ring.name!r}: unexpected op {meta.get('op')!r}")
            self.plans[int(meta["step"])] = msg
        for j in [j for j in self.plans if j < k]:
            del self.plans[j]
        return self.plans.pop(k, None)

    def close(self) -> None:
        self.ring.close()
