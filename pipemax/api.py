"""The Python API, shaped like vLLM's offline ``LLM``:

    from pipemax import LLM, SamplingParams

    if __name__ == "__main__":               # stages are spawned processes (see below)
        with LLM("/models/Llama-3-8B", gpus=2) as llm:
            outs = llm.generate(["The capital of France is"], SamplingParams(temperature=0))
            print(outs[0].outputs[0].text)

``LLM(model, gpus=N, **options)`` takes the command's flags as keywords (``max_num_seqs=64``,
``kv_offload="off"``, ...; pipemax/config.py validates them, as for the command) and starts the
stage processes once. The KV layout is planned at the first ``generate``/``chat``/``run_batch``
from that call's requests (the command plans from its input file the same way) and kept for
the life of the ``LLM``.

Every request is an OpenAI batch body, parsed by the command's own parser
(pipemax/requests.py), so a prompt and its ``SamplingParams`` are checked in one place;
``generate`` raises one ``ValueError`` naming each bad prompt and field before any work, and
``run_batch`` (what pipemax/ray_data.py uses) writes error lines instead, as the command does.

``close()`` (or leaving ``with``) stops the stages and removes every shared-memory object of the
run; so does an ``LLM`` that is garbage-collected or alive at interpreter exit (a
``weakref.finalize``, never ``__del__``), and any exception in the middle of a call (a stage
that died, Ctrl-C): the ``LLM`` is then closed and a new one must be built.

Stage processes are started with multiprocessing's spawn method, which imports the main
script again in each of them: a script must build its ``LLM`` under
``if __name__ == "__main__":`` (an ``LLM`` built while a stage imports the script raises
RuntimeError saying so, and the run fails). Notebooks and the interactive prompt need nothing.
"""
from __future__ import annotations

import contextlib
import io
import json
import multiprocessing as mp
import sys
import weakref
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from pipemax.config import ConfigError, RunConfig, build_parser, from_args
from pipemax.ops.progress import Progress
from pipemax.requests import Request, RequestError
from pipemax.results import error_line

URL = {"completion": "/v1/completions", "chat": "/v1/chat/completions"}
NOT_OPTIONS = {"input": "pass the prompts to generate() (or lines to run_batch())",
               "output": "generate() returns the outputs", "errors": "generate() raises",
               "serve": "call generate() again: the model stays loaded",
               "socket": "the API has no control socket", "no_socket": None,
               "socket_group": "the API has no control socket",
               "progress": "use generate(..., use_tqdm=False)",
               "progress_interval": "use generate(..., use_tqdm=False)"}


# ---- sampling --------------------------------------------------------------------------------
@dataclass(frozen=True)
class SamplingParams:
    """vLLM's names and defaults; checked (with the prompt) by the request parser.

    ``max_tokens=None``: the parser's default (16 for a prompt, the rest of the context for
    a chat). ``logprobs=k``: the chosen token's logprob and the top k alternatives per token.
    ``n`` must be 1 and the penalties 0 (pipemax has neither)."""
    n: int = 1
    max_tokens: int | None = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    def body(self, kind: str) -> dict:
        """The OpenAI request fields (kind: "completion" | "chat")."""
        b = {"n": self.n, "temperature": self.temperature, "top_p": self.top_p,
             "top_k": self.top_k, "seed": self.seed, "ignore_eos": self.ignore_eos,
             "presence_penalty": self.presence_penalty,
             "frequency_penalty": self.frequency_penalty, "return_token_ids": True}
        if self.max_tokens is not None:
            b["max_tokens"] = self.max_tokens
        if self.stop is not None:
            b["stop"] = self.stop if isinstance(self.stop, str) else list(self.stop)
        if self.stop_token_ids is not None:
            b["stop_token_ids"] = list(self.stop_token_ids)
        if self.logprobs is not None:
            if kind == "chat":
                b["logprobs"], b["top_logprobs"] = True, self.logprobs
            else:
                b["logprobs"] = self.logprobs
        return b


# ---- outputs ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Logprob:
    logprob: float
    rank: int | None = None            # 1 = the most likely; None: not among the top k
    decoded_token: str | None = None


@dataclass(frozen=True)
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str                 # "stop" | "length"
    cumulative_logprob: float | None = None
    logprobs: list[dict[int, Logprob]] | None = None   # per generated token: id -> Logprob


@dataclass(frozen=True)
class RequestOutput:
    request_id: str
    prompt: str | list | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    usage: dict                        # prompt_tokens, completion_tokens, total_tokens
    result: dict = field(repr=False)   # the command's result line for this request
    finished: bool = True


def _vllm_logprobs(entries, tokenizer) -> tuple[list[dict[int, Logprob]], float]:
    """The engine's (token, logprob, [(alt, alt_logprob), ...]) per token, as vLLM's."""
    tok = (lambda t: str(t)) if tokenizer is None else tokenizer.token_str
    out, total = [], 0.0
    for token_id, lp, alts in entries:
        d = {int(a): Logprob(float(alp), rank, tok(int(a)))
             for rank, (a, alp) in enumerate(alts, start=1)}
        if int(token_id) not in d:
            d[int(token_id)] = Logprob(float(lp), None, tok(int(token_id)))
        out.append(d)
        total += float(lp)
    return out, total


def _output(req: Request, prompt, line: dict, logprobs, tokenizer) -> RequestOutput:
    body = line["response"]["body"]
    choice = body["choices"][0]
    text = choice["text"] if "text" in choice else choice["message"]["content"]
    lps, cum = (None, None) if logprobs is None else _vllm_logprobs(logprobs, tokenizer)
    out = CompletionOutput(0, text, list(choice["token_ids"]), choice["finish_reason"],
                           cum, lps)
    return RequestOutput(req.custom_id, prompt, list(req.prompt_ids), [out],
                         dict(body["usage"]), line)


# ---- building requests -----------------------------------------------------------------------
def _is_token_ids(p) -> bool:
    return isinstance(p, (list, tuple)) and len(p) > 0 and all(
        isinstance(t, int) and not isinstance(t, bool) for t in p)


def _body(prompt, params: SamplingParams | None, kind: str) -> tuple[str, dict]:
    """(kind, OpenAI body) of one prompt: a string, token ids, a body (``{"prompt": ...}``,
    ``{"messages": ...}``), or vLLM's ``{"prompt_token_ids": [...]}``. Given sampling params
    take the place of the body's own sampling fields."""
    if isinstance(prompt, dict):
        body = dict(prompt)
        if "prompt_token_ids" in body and "prompt" not in body:
            body["prompt"] = list(body.pop("prompt_token_ids"))
        kind = "chat" if "messages" in body else "completion"
        body.setdefault("return_token_ids", True)
    elif kind == "chat":
        body = {"messages": prompt}
    else:
        body = {"prompt": list(prompt) if _is_token_ids(prompt) else prompt}
    if params is not None or not isinstance(prompt, dict):
        body.update((params or SamplingParams()).body(kind))
    return kind, body


def _line(i: int, kind: str, body: dict) -> bytes:
    try:
        return json.dumps({"custom_id": str(i), "url": URL[kind], "body": body}).encode()
    except (TypeError, ValueError) as e:
        raise ValueError(f"prompt {i}: cannot be sent as JSON: {e}") from None


def _per_prompt(params, n: int) -> list:
    if params is None or isinstance(params, SamplingParams):
        return [params] * n
    params = list(params)
    if len(params) != n:
        raise ValueError(f"{len(params)} SamplingParams for {n} prompts (give one, or one "
                         "per prompt)")
    for i, p in enumerate(params):
        if not isinstance(p, SamplingParams):
            raise ValueError(f"sampling_params[{i}] is a {type(p).__name__}, not SamplingParams")
    return params


def _raise_bad(bad: list[RequestError], n: int) -> None:
    shown = "; ".join(f"prompt {e.index}: {e.message}" for e in bad[:10])
    more = f"; and {len(bad) - 10} more" if len(bad) > 10 else ""
    raise ValueError(f"{len(bad)} of {n} requests are invalid (nothing was run): {shown}{more}")


# ---- options ---------------------------------------------------------------------------------
def _flag_value(v) -> list[str] | None:
    if v is True:
        return []
    if v is False or v is None:
        return None
    if isinstance(v, dict):
        return [",".join(f"{k}={x}" for k, x in v.items())]
    return [str(v)]


def config(model: str | None = None, **options) -> RunConfig:
    """The run config of ``LLM(model, **options)``: the command's flags by their keyword names
    (``gpus=2``, ``kv_offload="off"``, ``override=["num_layers=2"]``), resolved and checked
    as the command does. Raises ConfigError (a ValueError) with one line."""
    dests = {a.dest: a for a in build_parser()._actions if a.dest != "help"}
    argv = []
    if model is not None:
        argv += ["--model", str(model)]
    for k, v in options.items():
        if k in NOT_OPTIONS:
            raise ConfigError(f"LLM(): {k} is not an option of the API"
                              + (f" ({NOT_OPTIONS[k]})" if NOT_OPTIONS[k] else ""))
        if k not in dests:
            raise ConfigError(f"LLM(): unknown option {k!r} (the options are the flags of "
                              "python -m pipemax.launch --help, with _ for -)")
        action = dests[k]
        flag = action.option_strings[0]
        if isinstance(v, bool) and action.choices and "on" in action.choices:
            v = "on" if v else "off"                  # offload_overlap=False, cuda_graphs=True
        if isinstance(v, (list, tuple)) and action.default == []:   # override=[...]
            for item in v:
                argv += [flag, str(item)]
            continue
        vals = _flag_value(v)
        if vals is not None:
            argv += [flag, *vals]
    return config_from_flags(argv)


def config_from_flags(flags: list[str]) -> RunConfig:
    """The run config of command-line flags (those of python -m pipemax.launch), without the
    control socket. Raises ConfigError (a ValueError) with one line."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return from_args(["--no-socket", *flags] if "--no-socket" not in flags else flags)
    except SystemExit:
        raise ConfigError(err.getvalue().strip().removeprefix("pipemax: error: ")
                          .removesuffix(" (see --help)")) from None


# ---- the LLM ---------------------------------------------------------------------------------
def _close_runtime(rt) -> None:
    rt.close()


class LLM:
    def __init__(self, model: str | None = None, *, gpus: int = 1, **options):
        self._start(config(model, gpus=gpus, **options))

    @classmethod
    def from_flags(cls, flags: list[str]) -> "LLM":
        """An LLM from the command's flags, e.g. ``["--model", DIR, "--gpus", "2"]``."""
        llm = cls.__new__(cls)
        llm._start(config_from_flags(list(flags)))
        return llm

    def _start(self, cfg: RunConfig) -> None:
        if getattr(mp.current_process(), "_inheriting", False):
            raise RuntimeError(
                "pipemax.LLM was built while a stage process imported the main script: "
                "stages are spawned processes, which import it again; build the LLM under "
                "`if __name__ == \"__main__\":`")
        for flag, name in (("input", "--input"), ("serve", "--serve")):
            if getattr(cfg, flag):
                raise ConfigError(f"{name} is not an option of the API ({NOT_OPTIONS[flag]})")
        from pipemax.launch import prepare            # the command's own checks
        from pipemax.runtime import Runtime
        self.cfg, self.model_config, self.tokenizer, self.max_model_len = prepare(cfg)
        log = None if self.cfg.quiet else (
            lambda m: print(f"pipemax: {m}", file=sys.stderr, flush=True))
        self._rt = Runtime(self.cfg, self.model_config, self.tokenizer, self.max_model_len,
                           log=log)
        self._finalizer = weakref.finalize(self, _close_runtime, self._rt)
        try:
            self._rt.start()
        except BaseException:
            self.close()
            raise

    # ---- lifecycle ------------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def close(self) -> None:
        """Stop the stages; remove every shared-memory object of the run (idempotent)."""
        self._finalizer()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def get_tokenizer(self):
        return self.tokenizer

    # ---- requests -------------------------------------------------------------------------
    def generate(self, prompts, sampling_params: SamplingParams | Sequence[SamplingParams]
                 | None = None, *, use_tqdm: bool = True) -> list[RequestOutput]:
        """One output per prompt, in input order. ``prompts``: a string, token ids, a body,
        or a list of them."""
        if isinstance(prompts, (str, dict)) or _is_token_ids(prompts):
            prompts = [prompts]
        return self._generate(list(prompts), sampling_params, "completion", use_tqdm)

    def chat(self, messages, sampling_params: SamplingParams | Sequence[SamplingParams]
             | None = None, *, use_tqdm: bool = True) -> list[RequestOutput]:
        """One conversation (a list of ``{"role", "content"}``) or a list of them, through the
        model's chat template; one output per conversation."""
        if messages and isinstance(messages[0], dict):
            messages = [messages]
        return self._generate(list(messages), sampling_params, "chat", use_tqdm)

    def _generate(self, prompts: list, params, kind: str, use_tqdm: bool
                  ) -> list[RequestOutput]:
        per = _per_prompt(params, len(prompts))
        lines = [(i, _line(i, *_body(p, sp, kind))) for i, (p, sp) in enumerate(zip(prompts, per))]
        reqs = self._check(lines)
        bad = [r for r in reqs if isinstance(r, RequestError)]
        if bad:
            _raise_bad(bad, len(lines))
        lps: dict[str, list] = {}
        results = self._run(lines, reqs, use_tqdm, lps)
        return [_output(r, p, line, lps.get(r.custom_id), self.tokenizer)
                for r, p, (_, line) in zip(reqs, prompts, results)]

    def run_batch(self, lines: Iterable[tuple[int, bytes] | bytes | str | dict], *,
                  use_tqdm: bool = False) -> list[tuple[int, dict]]:
        """Input lines of the command's format (raw JSON, or dicts; with their line number, or
        numbered from 0) to ``(line number, result line)`` in input order, exactly the lines
        the command writes: a bad line gets its error line, nothing raises for it."""
        numbered = []
        for i, x in enumerate(lines):
            index, raw = x if isinstance(x, tuple) else (i, x)
            if isinstance(raw, dict):
                raw = json.dumps(raw)
            numbered.append((int(index), raw.encode() if isinstance(raw, str) else bytes(raw)))
        reqs = self._check(numbered)
        return self._run(numbered, reqs, use_tqdm, None)

    # ---- the engine -----------------------------------------------------------------------
    def _check(self, lines: list[tuple[int, bytes]]) -> list[Request | RequestError]:
        """Parse every line before any work (a fresh parser, as each job of the command has);
        then, once the KV layout is planned, whether each fits the KV cache (as the engine's
        intake does). The engine is given the parsed requests."""
        if self.closed:
            raise RuntimeError("this LLM is closed")
        reqs = list(self._rt.parser().parse_all(lines))
        try:
            engine = self._rt.engine or self._rt.plan(lines)
        except BaseException:
            self.close()
            raise
        return [engine.check_fits(r) if isinstance(r, Request) else r for r in reqs]

    def _run(self, lines: list[tuple[int, bytes]], reqs: list, use_tqdm: bool,
             logprobs: dict | None) -> list[tuple[int, dict]]:
        """Serve the good requests through the engine; the bad ones get their error lines."""
        engine = self._rt.engine
        results: dict[int, dict] = {}
        by_id: dict[str, int] = {}
        good = []
        for (index, _), r in zip(lines, reqs):
            if isinstance(r, RequestError):
                results[index] = error_line(r)
            else:
                by_id[r.custom_id] = index
                good.append(r)
        progress = Progress("bar" if use_tqdm and sys.stderr.isatty() else "off")
        progress.start(len(lines))

        def write(line: dict) -> None:
            results[by_id[line["custom_id"]]] = line
            progress.update(done=len(results), resumed=0, tokens=engine.stats.output_tokens)

        def finished(seq) -> None:
            if seq.logprobs is not None:
                logprobs[seq.req.custom_id] = seq.logprobs

        engine.start_job(iter(good), write)
        engine.on_finish = finished if logprobs is not None else None
        try:
            engine.run()
        except BaseException:
            progress.clear()
            self.close()              # a stage died, or Ctrl-C: nothing is left running
            raise
        finally:
            engine.on_finish = None
        progress.finish()
        return [(index, results[index]) for index, _ in lines]
