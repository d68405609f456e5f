"""Pipelines checked on whatever GPUs there are: 1..N stages placed on one device list, against
transformers on the same device, for several model families and head sizes.

    python -m tools.check_pipelines --stages 1,2,3,4 --stage-device 0 --json out.json

For every (family, stage count, KV mode) it runs ``tools.compare_hf`` (the pipemax CLI beside
transformers ``generate``, greedy) in float32, with stages on ``--stage-devices d,d,...``; KV
modes: ``resident`` (the default plan) and ``offload`` (``--kv-offload on`` with a KV budget so
small that most of the KV lives in the host pool). In float32 every continuation must be
identical; the exit code is 1 if any is not.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from pipemax.tiny import write_random_checkpoint
from tools import compare_hf

# family -> config.json fields (4 layers, so up to 4 stages); the head sizes the decode kernel
# must take or leave to the torch path: 8 (tl.dot's K below 16), 64, 80, 128, 256
FAMILIES = {
    "llama-hd8": {"architectures": ["LlamaForCausalLM"], "hidden_size": 64,
                  "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 8},
    "llama-hd64": {"architectures": ["LlamaForCausalLM"], "hidden_size": 256,
                   "num_attention_heads": 4, "num_key_value_heads": 2},
    "qwen2-hd80-tied": {"architectures": ["Qwen2ForCausalLM"], "hidden_size": 320,
                        "num_attention_heads": 4, "num_key_value_heads": 2,
                        "tie_word_embeddings": True},
    "mistral-hd128": {"architectures": ["MistralForCausalLM"], "hidden_size": 512,
                      "num_attention_heads": 4, "num_key_value_heads": 1},
    "llama-hd256": {"architectures": ["LlamaForCausalLM"], "hidden_size": 512,
                    "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 256},
}
COMMON = {"vocab_size": 2048, "intermediate_size": 512, "num_hidden_layers": 4,
          "max_position_embeddings": 1024, "rms_norm_eps": 1e-5}
MODES = ("resident", "offload")
RESIDENT_TOKENS = 160        # offload mode: a KV budget of about this many tokens per stage


def mode_args(mode: str, fields: dict, stages: int) -> str:
    """Extra pipemax flags of a KV mode; ``offload`` sizes the KV budget from the model so that
    only a few hundred tokens fit on the GPU and most sequences' KV is in the host pool."""
    if mode == "resident":
        return ""
    heads = fields["num_attention_heads"]
    hd = fields.get("head_dim", fields["hidden_size"] // heads)
    layers = -(-COMMON["num_hidden_layers"] // stages)
    per_token = layers * 2 * fields["num_key_value_heads"] * hd * 4          # float32
    return (f"--kv-offload on --kv-cache-gb {RESIDENT_TOKENS * per_token / 2**30:.8f} "
            "--block-size 8 --max-num-batched-tokens 128")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stages", default="1,2,3,4")
    p.add_argument("--stage-device", type=int, default=0, help="the CUDA device of every stage")
    p.add_argument("--device", default="cuda", help="cpu: the same cases without --stage-devices")
    p.add_argument("--families", default=",".join(FAMILIES))
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--num-prompts", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    rows, failed = [], 0
    with tempfile.TemporaryDirectory(prefix="pipemax-pipes-") as d:
        for fam in a.families.split(","):
            folder = Path(d) / fam
            write_random_checkpoint(folder, {**COMMON, **FAMILIES[fam]}, seed=1, std=0.1)
            for n in map(int, a.stages.split(",")):
                for mode in a.modes.split(","):
                    js, st = Path(d) / f"{fam}-{n}-{mode}.json", Path(d) / f"{fam}-{n}-{mode}.st"
                    devs = ",".join([str(a.stage_device)] * n)
                    extra = f"--stage-devices {devs} " if a.device == "cuda" else "--threads 1 "
                    code = compare_hf.main([
                        "--model", str(folder), "--device", a.device, "--dtype", "float32",
                        "--gpus", str(n), "--num-prompts", str(a.num_prompts),
                        "--max-tokens", str(a.max_tokens), "--json", str(js), "--pipemax-args",
                        f"{extra}--stats-json {st} {mode_args(mode, FAMILIES[fam], n)}"])
                    res = json.loads(js.read_text())["rows"] if js.exists() else []
                    stats = json.loads(st.read_text()) if st.exists() else {}
                    host = stats.get("offloaded_admitted", 0) + stats.get("streamed_admitted", 0)
                    same = sum(r["equal"] for r in res)
                    ok = bool(code == 0 and res and same == len(res)
                              and (mode == "resident" or host > 0))
                    failed += not ok
                    rows.append({"family": fam, "stages": n, "mode": mode, "identical": same,
                                 "prompts": len(res), "host_kv_sequences": host,
                                 "decode_attention": sorted({r.get("decode_attention", "?")
                                                             for r in stats.get("stages", [])}),
                                 "ok": ok})
                    print(f"check_pipelines: {fam} stages {n} ({devs}) {mode}: {same}/{len(res)} "
                          f"identical, {host} sequences with KV in the host pool, decode "
                          f"{rows[-1]['decode_attention']}{'' if ok else '  FAILED'}", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1) + "\n")
    print(f"check_pipelines: {len(rows) - failed}/{len(rows)} cases identical to transformers")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
