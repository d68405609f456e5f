"""pipemax: offline batch LLM inference (pipeline stages on shared-memory rings, host KV offload).

``from pipemax import LLM, SamplingParams``: the Python API (pipemax/api.py); the command is
``python -m pipemax.launch`` (or ``pipemax run-batch``, pipemax/cli.py).
"""
from pipemax.api import LLM, CompletionOutput, Logprob, RequestOutput, SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "Logprob"]
