"""Text <-> token ids for a HF model folder, matching transformers' fast tokenizers.

``Tokenizer`` wraps ``tokenizer.json`` (the ``tokenizers`` library) plus the bits of
``tokenizer_config.json`` that change ids or text: special tokens and the chat template.
``IncrementalDetokenizer`` turns generated ids into text one token at a time and finds stop
strings.
"""
from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
import tokenizers
from tokenizers import AddedToken

REPLACEMENT_CHAR = "\ufffd"
_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                 "mask_token")


class TokenizerError(ValueError):
    """A tokenizer folder pipemax cannot use, or a chat it cannot render; one line for the user."""


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]


def _token_content(v) -> str | None:
    """A special token as written in tokenizer_config.json: a string or {"content": ...}."""
    if isinstance(v, str):
        return v
    if isinstance(v, dict) and isinstance(v.get("content"), str):
        return v["content"]
    return None


def _added_token(v) -> AddedToken:
    if isinstance(v, dict):
        return AddedToken(v["content"], single_word=bool(v.get("single_word", False)),
                          lstrip=bool(v.get("lstrip", False)), rstrip=bool(v.get("rstrip", False)),
                          normalized=bool(v.get("normalized", False)), special=True)
    return AddedToken(v, special=True, normalized=False)


def _read_json(path: Path) -> dict:
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(f"{path} is not valid JSON: {_first_line(e)}") from None
    if not isinstance(d, dict):
        raise TokenizerError(f"{path} is not a JSON object")
    return d


def _pick_chat_template(folder: Path, cfg: dict) -> str | None:
    """chat_template.jinja wins over tokenizer_config's chat_template (as in transformers)."""
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        try:
            return jinja_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise TokenizerError(f"{jinja_file} cannot be read: {_first_line(e)}") from None
    t = cfg.get("chat_template")
    if t is None or isinstance(t, str):
        return t
    if isinstance(t, list):
        named = {x.get("name"): x.get("template") for x in t if isinstance(x, dict)}
        if isinstance(named.get("default"), str):
            return named["default"]
        if not named:
            return None
        raise TokenizerError(f"{folder}/tokenizer_config.json has several chat templates and none is "
                             f"named 'default' ({', '.join(map(str, sorted(named, key=str)))})")
    raise TokenizerError(f"{folder}/tokenizer_config.json: chat_template must be a string or a list")


class Tokenizer:
    """ids <-> text as transformers' fast tokenizer (AutoTokenizer) does for the same folder."""

    def __init__(self, tok: tokenizers.Tokenizer, config: dict | None = None,
                 chat_template: str | None = None):
        config = config or {}
        self._tok = tok
        self._tok.no_truncation()
        self._tok.no_padding()
        self._chat_template = chat_template
        self._compiled = None
        self.special_tokens: dict[str, str] = {}
        for key in _SPECIAL_KEYS:
            content = _token_content(config.get(key))
            if content is not None:
                self.special_tokens[key] = content
        extra = config.get("additional_special_tokens") or config.get("extra_special_tokens") or []
        if isinstance(extra, dict):
            extra = list(extra.values())
        # transformers registers every configured special token with the backend as a special
        # added token (when it is not one already): it then matches in text and is skipped on decode.
        known = {t.content for t in tok.get_added_tokens_decoder().values()}
        to_add = []
        for v in [config.get(k) for k in _SPECIAL_KEYS] + list(extra):
            content = _token_content(v)
            if content is not None and content not in known:
                to_add.append(_added_token(v))
                known.add(content)
        if to_add:
            self._tok.add_special_tokens(to_add)
        # Like transformers (v5, and v4's generic fast class), the post-processor in tokenizer.json
        # alone decides BOS/EOS: add_bos_token / add_eos_token in tokenizer_config are ignored.

        # transformers v5 ignores clean_up_tokenization_spaces for BPE models (it would corrupt them)
        self._cleanup = bool(config.get("clean_up_tokenization_spaces", False)) and (
            type(tok.model).__name__ != "BPE" or bool(config.get(
                "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output", False)))
        self.bos_token_id = self._id_of(self.special_tokens.get("bos_token"))
        eos = self._id_of(self.special_tokens.get("eos_token"))
        self.eos_token_ids: tuple[int, ...] = () if eos is None else (eos,)
        self.vocab_size: int = tok.get_vocab_size(with_added_tokens=True)
        self.special_ids: frozenset[int] = frozenset(
            i for i, t in self._tok.get_added_tokens_decoder().items() if t.special)
        # SentencePiece-style byte fallback decodes a run of <0xHH> tokens as one UTF-8 string
        self.byte_tokens: dict[int, int] = {}  # id -> byte value, for <0xHH> tokens
        if "ByteFallback" in repr(tok.decoder):
            for b in range(256):
                i = tok.token_to_id(f"<0x{b:02X}>")
                if i is not None:
                    self.byte_tokens[i] = b

    # ---- construction ----------------------------------------------------------------------
    @staticmethod
    def from_dir(path) -> "Tokenizer | None":
        folder = Path(path)
        tok_file = folder / "tokenizer.json"
        if not tok_file.is_file():
            return None
        try:
            tok = tokenizers.Tokenizer.from_file(str(tok_file))
        except Exception as e:  # the tokenizers library raises a bare Exception
            raise TokenizerError(f"{tok_file} is not a valid tokenizer: {_first_line(e)}") from None
        cfg_file = folder / "tokenizer_config.json"
        cfg = _read_json(cfg_file) if cfg_file.is_file() else {}
        try:
            return Tokenizer(tok, cfg, _pick_chat_template(folder, cfg))
        except TokenizerError:
            raise
        except Exception as e:
            raise TokenizerError(f"{cfg_file} is not valid: {_first_line(e)}") from None

    def _id_of(self, token: str | None) -> int | None:
        return None if token is None else self._tok.token_to_id(token)

    # ---- ids <-> text ----------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._finish(self.raw_decode(ids, skip_special_tokens))

    def raw_decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """Decode without transformers' clean-up pass (differs only for non-BPE models asking for it)."""
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def _finish(self, text: str) -> str:
        if not self._cleanup:
            return text
        # transformers' PreTrainedTokenizerBase.clean_up_tokenization
        return (text.replace(" .", ".").replace(" ?", "?").replace(" !", "!").replace(" ,", ",")
                .replace(" ' ", "'").replace(" n't", "n't").replace(" 'm", "'m")
                .replace(" 's", "'s").replace(" 've", "'ve").replace(" 're", "'re"))

    def token_str(self, token_id: int) -> str:
        text = self._tok.decode([int(token_id)], skip_special_tokens=False)
        if text:
            return text
        return self._tok.id_to_token(int(token_id)) or ""

    # ---- chat ------------------------------------------------------------------------------
    @property
    def has_chat_template(self) -> bool:
        return bool(self._chat_template)

    @property
    def chat_template(self) -> str | None:
        return self._chat_template

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if not self._chat_template:
            raise TokenizerError("this tokenizer has no chat template (tokenizer_config.json "
                                 "chat_template or chat_template.jinja); pass plain prompts instead")
        if self._compiled is None:
            try:
                self._compiled = _compile_template(self._chat_template)
            except jinja2.TemplateError as e:
                raise TokenizerError(f"chat template does not compile: {_first_line(e)}") from None
        msgs = []
        for m in messages:
            if not isinstance(m, dict):
                raise TokenizerError(f"chat messages must be objects, got {type(m).__name__}")
            msgs.append({k: v for k, v in m.items() if v is not None})
        try:
            return self._compiled.render(messages=msgs, tools=None, documents=None,
                                         add_generation_prompt=add_generation_prompt,
                                         **self.special_tokens)
        except Exception as e:  # TemplateError, or e.g. TypeError on unexpected message content
            raise TokenizerError(f"chat template failed: {_first_line(e)}") from None

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Ids of a rendered chat; like transformers, the template supplies any BOS itself."""
        return self.encode(self.apply_chat_template(messages, add_generation_prompt),
                           add_special_tokens=False)


def _compile_template(source: str) -> jinja2.Template:
    """The environment transformers renders chat templates in (minus assistant-mask tracking)."""

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env.from_string(source)


class IncrementalDetokenizer:
    """Per sequence: feed generated ids one at a time, get the text so far; finds stop strings.

    Each step decodes only a short trailing window (ids from ``prefix_offset``): the text new
    to this step is what the window decodes to beyond what its first part (up to
    ``read_offset``) decoded to. Text ending in U+FFFD (a character split across tokens) is
    held back until the character completes. With SentencePiece byte fallback a run of <0xHH>
    ids decodes as one string, so the window never starts inside such a run (up to 64 ids).
    If later ids ever change earlier text (invalid bytes), everything is decoded once again,
    so ``text`` always equals ``tokenizer.decode(token_ids)``.
    """

    _MAX_PENDING = 4  # a UTF-8 character is at most 4 bytes

    def __init__(self, tokenizer: Tokenizer, stop: list[str] | None = None):
        self._tok = tokenizer
        self._stop = [s for s in (stop or []) if s]
        self.token_ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0
        self._out = ""  # raw text emitted so far (before any clean-up pass)
        self._stop_at: int | None = None  # index in _out where the first stop string starts
        self.stop_string: str | None = None

    @property
    def stopped(self) -> bool:
        return self._stop_at is not None

    def add(self, token_id: int) -> bool:
        """Add one generated id; True once the text contains a stop string (later ids are ignored)."""
        if self._stop_at is not None:
            return True
        self.token_ids.append(int(token_id))
        before = len(self._out)
        new = self._step()  # may rewrite self._out (rare, see _resync)
        self._out += new
        return self._find_stop(min(before, len(self._out) - len(new)))

    def _decode(self, start: int, end: int | None = None) -> str:
        return self._tok.raw_decode(self.token_ids[start:end], skip_special_tokens=True)

    def _step(self) -> str:
        ids = self.token_ids
        p, r = self._prefix_offset, self._read_offset
        prefix = self._decode(p, r)
        window = self._decode(p)
        if not window.startswith(prefix):
            if window.endswith(REPLACEMENT_CHAR):
                return ""  # e.g. an unfinished character makes a whole byte-fallback run U+FFFD
            return self._resync()
        if len(window) > len(prefix) and not window.endswith(REPLACEMENT_CHAR):
            self._prefix_offset, self._read_offset = self._window_start(r), len(ids)
            return window[len(prefix):]
        if len(ids) - r > self._MAX_PENDING:
            # A long run of bytes that never forms a character: emit all but the last few ids
            # when they decode the same on their own (no character spans the cut).
            s = len(ids) - (self._MAX_PENDING - 1)
            head = self._decode(p, s)
            if head.startswith(prefix) and window == head + self._decode(s):
                self._prefix_offset, self._read_offset = self._window_start(r), s
                return head[len(prefix):]
        return ""

    _MAX_BYTE_RUN = 64

    def _window_start(self, p: int) -> int:
        """Move a window start off the middle of a byte-fallback run (decoded as a whole)."""
        byte_of, special, ids = self._tok.byte_tokens, self._tok.special_ids, self.token_ids
        if not byte_of:
            return p
        j = p
        while j < len(ids) and ids[j] in special:  # skipped on decode: runs join across them
            j += 1
        if j >= len(ids) or ids[j] not in byte_of:
            return p

        def in_run(i):
            return ids[i] in byte_of or ids[i] in special

        q = p
        while q > 0 and in_run(q - 1) and p - q < self._MAX_BYTE_RUN:
            q -= 1
        if q > 0 and in_run(q - 1):  # a very long run: start at a character boundary
            while q < p and (ids[q] in special or 0x80 <= byte_of[ids[q]] < 0xC0):
                q += 1
            return q
        # and one ordinary id before the run, so that a decoder stripping the window's leading
        # space (Metaspace) cannot hide a change in how the run decodes
        return max(q - 1, 0)

    def _resync(self) -> str:
        """Rare: the window does not extend its prefix. Re-decode everything once."""
        full = self._decode(0)
        self._prefix_offset = self._window_start(self._read_offset)
        self._read_offset = len(self.token_ids)
        if full.startswith(self._out):
            return full[len(self._out):]
        self._out = full  # earlier text changed under later ids: take the full decode
        return ""

    def _raw_text(self) -> str:
        """Emitted text plus the text of ids held back (e.g. a trailing partial character)."""
        if self._read_offset == len(self.token_ids):
            return self._out
        prefix = self._decode(self._prefix_offset, self._read_offset)
        window = self._decode(self._prefix_offset)
        if window.startswith(prefix):
            return self._out + window[len(prefix):]
        return self._decode(0)

    def _find_stop(self, before: int) -> bool:
        if not self._stop or len(self._out) == before:
            return False
        best = None
        for s in self._stop:
            i = self._out.find(s, max(0, before - len(s) + 1))
            if i >= 0 and (best is None or i < best[0]):
                best = (i, s)
        if best is None:
            return False
        self._stop_at, self.stop_string = best
        return True

    @property
    def stable_text(self) -> str:
        """``text`` minus a trailing partial character: safe to stream.

        It never carries a U+FFFD for a character still split across tokens; only invalid
        byte-fallback sequences can make later ids change it."""
        end = len(self._out) if self._stop_at is None else self._stop_at
        return self._tok._finish(self._out[:end])

    @property
    def text(self) -> str:
        """Text so far; cut before the first stop string once one was hit (OpenAI semantics)."""
        if self._stop_at is not None:
            return self._tok._finish(self._out[:self._stop_at])
        raw = self._raw_text()
        if raw != self._out and self._stop:
            start = len(self._out) if raw.startswith(self._out) else 0
            hits = [i for i in (raw.find(s, max(0, start - len(s) + 1)) for s in self._stop)
                    if i >= 0]
            if hits:
                raw = raw[:min(hits)]
        return self._tok._finish(raw)
