"""HuggingFace transformers ``generate`` on a workload file, at a model shape with random
weights, for the side-by-side benchmark. Prints one JSON line per batch size tried.

Batches are formed in file order, left-padded; EOS is ignored (``min_new_tokens`` =
``max_new_tokens``) so every system does the same work. Out of memory at a batch size is
reported, not fatal.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from pipemax.model_config import BUILTIN_MODELS, ModelConfig
from tools.workload import requests


def hf_model(cfg: ModelConfig, dtype: torch.dtype, device: str):
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config
    cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[cfg.architecture]
    hc = cls(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
             intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
             num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
             head_dim=cfg.head_dim, max_position_embeddings=cfg.max_position_embeddings,
             rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta,
             tie_word_embeddings=cfg.tie_word_embeddings)
    with torch.device(device):   # transformers' own random init, on the device
        model = AutoModelForCausalLM.from_config(hc, dtype=dtype)
    return model.eval()


def run_batch(model, rows, device) -> tuple[int, float]:
    from transformers import GenerationConfig
    max_new = max(r["body"]["max_tokens"] for r in rows)
    L = max(len(r["body"]["prompt"]) for r in rows)
    ids = torch.zeros(len(rows), L, dtype=torch.long)
    mask = torch.zeros(len(rows), L, dtype=torch.long)
    for i, r in enumerate(rows):
        p = r["body"]["prompt"]
        ids[i, L - len(p):] = torch.tensor(p)
        mask[i, L - len(p):] = 1
    gc = GenerationConfig(do_sample=False, max_new_tokens=max_new, min_new_tokens=max_new,
                          pad_token_id=0, eos_token_id=None)
    torch.cuda.synchronize() if device.startswith("cuda") else None
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids.to(device), attention_mask=mask.to(device), generation_config=gc)
    torch.cuda.synchronize() if device.startswith("cuda") else None
    return (out.shape[1] - L) * len(rows), time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", required=True, choices=sorted(BUILTIN_MODELS))
    p.add_argument("--workload", default="fixed:512/256")
    p.add_argument("--num-requests", type=int, default=256)
    p.add_argument("--batch-sizes", default="64,256")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--override", action="append", default=[])
    a = p.parse_args()
    from pipemax.model_config import apply_overrides
    cfg = apply_overrides(BUILTIN_MODELS[a.model], a.override)
    rows = requests(a.workload, a.num_requests, cfg.vocab_size)
    model = hf_model(cfg, getattr(torch, a.dtype), a.device)
    for bs in (int(x) for x in a.batch_sizes.split(",")):
        tokens = secs = 0.0
        try:
            for k in range(0, len(rows), bs):
                t, s = run_batch(model, rows[k:k + bs], a.device)
                tokens += t
                secs += s
            res = {"system": "transformers", "batch": bs, "output_tokens": int(tokens),
                   "seconds": secs, "output_tok_s": tokens / secs}
        except torch.OutOfMemoryError:
            res = {"system": "transformers", "batch": bs, "error": "out of memory"}
        if a.device.startswith("cuda"):
            res["peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 2**30
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
