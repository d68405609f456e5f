"""Typed messages of the pipeline: small integer op codes in the msgpack ``meta`` of a ring message.

Every message goes driver -> stage 0 -> ... -> stage S-1 -> driver, so each stage learns what to
do from the message it is handed and the driver knows that a message came back only once all
stages handled it. One exception, PLAN: with KV offload over several stages, the driver also
writes each step's copies straight to every stage after the first (ring ``plan<i>``, driver ->
stage i, created at ALLOC), so that a stage can prefetch a step's KV while its previous step
computes, before the step's activations reach it (stages/plan_inbox.py).

    op      meta                              tensors
    HELLO   reports: [stage report, ...]      -            each stage appends its report
    ALLOC   resident_blocks, staging_blocks,  -            each stage allocates its KV cache
            host_blocks, host_segments,                    (and maps its host KV segment)
            overlap, swap_blocks,
            plan_rings: [name|None per stage], acks: [stage, ...]
    STEP    mb, step, num_top                 q_lens, ctx_lens, block_tables, offloaded,
                                              streamed, swap_out, swap_in, tokens|hidden,
                                              sample_rows, temperature, top_p, top_k, u
            (back to the driver)              token_ids, logprobs, top_ids, top_logprobs
    PLAN    mb, step                          q_lens, ctx_lens, block_tables, offloaded,
            (driver -> stage i >= 1 only)     swap_out, swap_in, gpu_prefix: a STEP's copies
    STOP    finals: [stage report, ...]       -            each stage appends its counters, exits
    ERROR   stage, message                    -            a stage failed; later stages forward it
"""
OP_HELLO = 1
OP_ALLOC = 2
OP_STEP = 3
OP_STOP = 4
OP_ERROR = 5
OP_PLAN = 6

# a stage's exit code when it left because a neighbour (a ring's other end) went away: it
# follows another process's death, so the driver names that one instead (pipeline.check)
EXIT_PEER_GONE = 3

# tensors every stage forwards unchanged with a STEP
STEP_META_TENSORS = ("q_lens", "ctx_lens", "block_tables", "offloaded", "streamed", "swap_out",
                     "swap_in", "gpu_prefix", "sample_rows", "temperature", "top_p", "top_k",
                     "u")
# what a stage needs to stage a step's KV before the step itself arrives (PLAN)
PLAN_TENSORS = ("q_lens", "ctx_lens", "block_tables", "offloaded", "swap_out", "swap_in",
                "gpu_prefix")
