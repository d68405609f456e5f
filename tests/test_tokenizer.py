"""pipemax.tokenizer against transformers' AutoTokenizer on the same folders."""
import json
import random
import shutil

import pytest

from checkpoints import checkpoint_root, make_checkpoint
from pipemax.tiny import ensure_tiny_model
from pipemax.tokenizer import IncrementalDetokenizer, Tokenizer, TokenizerError

TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "héllo 世界 🙂 — naïve café",
    "  leading spaces and\ttabs\nnew lines\n\n",
    "<s> special tokens </s> in text <pad>",
    "",
    "1234567890 3.14159 $100 99%",
]

CHATS = [
    [{"role": "user", "content": "Hi there!"}],
    [{"role": "system", "content": "You are terse."},
     {"role": "user", "content": "What is 2+2? 🙂"},
     {"role": "assistant", "content": "4"},
     {"role": "user", "content": "And 3+3?"}],
]


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return ensure_tiny_model(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session")
def ckpt_root(tmp_path_factory):
    return checkpoint_root(tmp_path_factory)


# qwen2: transformers' AutoTokenizer picks Qwen2Tokenizer there, which rebuilds the pipeline
@pytest.fixture(scope="session", params=["tiny", "llama3-rope", "qwen2-bias-tied"])
def folder(request, tiny_dir, ckpt_root):
    return tiny_dir if request.param == "tiny" else make_checkpoint(ckpt_root, request.param)


def _hf(path):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(path))


def _hf_chat_ids(hf, messages, add_generation_prompt):
    out = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


# ---- encode / decode / chat parity ---------------------------------------------------------
def test_encode_matches_transformers(folder):
    tok, hf = Tokenizer.from_dir(folder), _hf(folder)
    for text in TEXTS:
        for special in (True, False):
            assert tok.encode(text, add_special_tokens=special) == \
                hf.encode(text, add_special_tokens=special), (text, special)


def test_bos_comes_from_post_processor(tiny_dir):
    tok = Tokenizer.from_dir(tiny_dir)
    cfg = json.loads((tiny_dir / "tokenizer_config.json").read_text())
    assert "add_bos_token" not in cfg  # only tokenizer.json's TemplateProcessing adds it
    assert json.loads((tiny_dir / "tokenizer.json").read_text())["post_processor"]["type"] == \
        "TemplateProcessing"
    assert tok.bos_token_id == 0
    with_bos = tok.encode("Hello")
    assert with_bos[0] == 0 and with_bos[1:] == tok.encode("Hello", add_special_tokens=False)
    assert tok.encode("") == [0]


def test_add_bos_eos_token_settings_are_ignored(tiny_dir, tmp_path):
    """transformers ignores tokenizer_config's add_bos/eos_token when tokenizer.json exists."""
    folder = tmp_path / "tok"
    shutil.copytree(tiny_dir, folder)
    cfg_file = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg.update(add_bos_token=False, add_eos_token=True)
    cfg_file.write_text(json.dumps(cfg))
    tok, hf = Tokenizer.from_dir(folder), _hf(folder)
    ids = tok.encode("Hello there")
    assert ids == hf.encode("Hello there")
    assert ids[0] == 0 and ids[-1] != 1


def test_decode_matches_transformers(folder):
    tok, hf = Tokenizer.from_dir(folder), _hf(folder)
    rng = random.Random(0)
    seqs = [tok.encode(t) for t in TEXTS] + [
        [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 40))] for _ in range(50)]
    for ids in seqs:
        assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=True), ids
        assert tok.decode(ids, skip_special_tokens=False) == \
            hf.decode(ids, skip_special_tokens=False), ids
    assert tok.decode(tok.encode(TEXTS[2])) == TEXTS[2]


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_matches_transformers(folder, add_generation_prompt):
    tok, hf = Tokenizer.from_dir(folder), _hf(folder)
    assert tok.has_chat_template
    for messages in CHATS:
        text = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        assert text == hf.apply_chat_template(messages, tokenize=False,
                                              add_generation_prompt=add_generation_prompt)
        ids = tok.encode(text, add_special_tokens=False)
        assert ids == _hf_chat_ids(hf, messages, add_generation_prompt)
        assert tok.encode_chat(messages, add_generation_prompt) == ids
        assert ids[0] == 0 and ids.count(0) == 1  # the template's own <s>, no second BOS
    last = tok.apply_chat_template(CHATS[0], add_generation_prompt=True)
    assert last.endswith("<|assistant|>\n")


def _with_config(tiny_dir, tmp_path, **changes):
    folder = tmp_path / "tok"
    folder.mkdir()
    shutil.copy(tiny_dir / "tokenizer.json", folder)
    cfg = json.loads((tiny_dir / "tokenizer_config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    return folder


def test_chat_template_forms(tiny_dir, tmp_path):
    folder = _with_config(tiny_dir, tmp_path, chat_template=[
        {"name": "tool_use", "template": "TOOLS"},
        {"name": "default", "template": "{% for m in messages %}[{{ m['content'] }}]{% endfor %}"}],
        eos_token={"__type": "AddedToken", "content": "</s>", "lstrip": False,
                   "normalized": False, "rstrip": False, "single_word": False, "special": True})
    tok = Tokenizer.from_dir(folder)
    assert tok.apply_chat_template([{"role": "user", "content": "a"}]) == "[a]"
    assert tok.eos_token_ids == (1,)
    # chat_template.jinja wins over tokenizer_config (as in transformers)
    (folder / "chat_template.jinja").write_text("J{{ messages[0]['content'] }}{{ eos_token }}")
    tok = Tokenizer.from_dir(folder)
    assert tok.apply_chat_template([{"role": "user", "content": "a"}]) == "Ja</s>"
    assert _hf(folder).apply_chat_template([{"role": "user", "content": "a"}], tokenize=False) \
        == "Ja</s>"


def test_special_tokens_from_config_are_added(tiny_dir, tmp_path):
    """Special tokens named in tokenizer_config but absent from tokenizer.json get new ids."""
    folder = _with_config(tiny_dir, tmp_path, additional_special_tokens=["<|user|>", "<|assistant|>"])
    tok, hf = Tokenizer.from_dir(folder), _hf(folder)
    assert tok.vocab_size == 514
    for messages in CHATS:
        ids = tok.encode_chat(messages)
        assert ids == _hf_chat_ids(hf, messages, True)
        assert 512 in ids and 513 in ids
        assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=True)
        assert "<|user|>" not in tok.decode(ids)


def test_chat_template_errors(tiny_dir, tmp_path):
    folder = _with_config(tiny_dir, tmp_path, chat_template=None)
    tok = Tokenizer.from_dir(folder)
    assert not tok.has_chat_template
    with pytest.raises(TokenizerError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "x"}])
    cfg_file = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["chat_template"] = ("{% if messages[0]['role'] != 'user' %}"
                            "{{ raise_exception('first message must be from the user') }}"
                            "{% endif %}ok")
    cfg_file.write_text(json.dumps(cfg))
    tok = Tokenizer.from_dir(folder)
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == "ok"
    with pytest.raises(TokenizerError, match="first message must be from the user"):
        tok.apply_chat_template([{"role": "system", "content": "x"}])


def test_special_ids_and_token_str(tiny_dir):
    tok = Tokenizer.from_dir(tiny_dir)
    assert tok.eos_token_ids == (1,)
    assert tok.vocab_size == 512
    assert tok.token_str(1) == "</s>"
    hello = tok.encode(" world", add_special_tokens=False)
    assert "".join(tok.token_str(i) for i in hello) == " world"
    assert isinstance(tok.token_str(3 + 0xE4), str)  # a lone UTF-8 lead byte still gives a string


def test_eos_list_from_generation_config(ckpt_root):
    from pipemax.model_config import ModelConfig
    path = make_checkpoint(ckpt_root, "llama3-rope")
    assert ModelConfig.from_dir(path).eos_token_ids == (1, 2)
    assert Tokenizer.from_dir(path).eos_token_ids == (1,)


# ---- loading errors --------------------------------------------------------------------------
def test_missing_tokenizer_gives_none(tmp_path):
    assert Tokenizer.from_dir(tmp_path) is None


@pytest.mark.parametrize("content", ["{not json", '{"model": {"type": "NoSuchModel"}}', "[]"])
def test_malformed_tokenizer_json(tmp_path, content):
    (tmp_path / "tokenizer.json").write_text(content)
    with pytest.raises(TokenizerError) as e:
        Tokenizer.from_dir(tmp_path)
    assert "tokenizer.json" in str(e.value) and "\n" not in str(e.value)


def test_malformed_tokenizer_config(tiny_dir, tmp_path):
    folder = _with_config(tiny_dir, tmp_path)
    (folder / "tokenizer_config.json").write_text("{oops")
    with pytest.raises(TokenizerError, match="tokenizer_config.json"):
        Tokenizer.from_dir(folder)
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": [{"name": "a", "template": "x"}, {"name": "b", "template": "y"}]}))
    with pytest.raises(TokenizerError, match="default"):
        Tokenizer.from_dir(folder)


# ---- incremental detokenization --------------------------------------------------------------
def _feed(tok, ids, stop=()):
    det = IncrementalDetokenizer(tok, list(stop))
    hits = [det.add(i) for i in ids]
    return det, hits


def test_incremental_equals_full_decode(tiny_dir):
    tok = Tokenizer.from_dir(tiny_dir)
    rng = random.Random(1)
    seqs = [tok.encode(t, add_special_tokens=False) for t in TEXTS if t]
    # random ids over the whole vocabulary: special ids, invalid and split UTF-8 bytes
    seqs += [[rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 60))]
             for _ in range(200)]
    # byte tokens only (ids 3..258): lots of multi-byte characters and invalid sequences
    seqs += [[3 + rng.choice([0x41, 0x80, 0xBF, 0xC3, 0xA9, 0xE4, 0xB8, 0x96, 0xF0, 0x9F, 0x99,
                              0x82]) for _ in range(rng.randrange(1, 60))] for _ in range(200)]
    for ids in seqs:
        det = IncrementalDetokenizer(tok, [])
        for n, i in enumerate(ids, 1):
            assert det.add(i) is False
            assert det.text == tok.decode(ids[:n]), ids[:n]
        assert det.text == tok.decode(ids)


def test_multibyte_characters_are_not_split(tiny_dir):
    tok = Tokenizer.from_dir(tiny_dir)
    text = "héllo 世界 🙂 ok"
    ids = tok.encode(text, add_special_tokens=False)
    assert any("\ufffd" in tok.decode(ids[:n]) for n in range(len(ids)))  # some ids split a char
    det = IncrementalDetokenizer(tok, [])
    streamed = []
    for i in ids:
        det.add(i)
        assert "\ufffd" not in det.stable_text
        assert text.startswith(det.stable_text)
        streamed.append(det.stable_text)
    assert det.text == det.stable_text == text
    assert streamed == sorted(streamed, key=len)  # grows monotonically


def test_incremental_decodes_short_windows(tiny_dir):
    tok = Tokenizer.from_dir(tiny_dir)
    calls = []
    orig = tok.raw_decode

    def spy(ids, skip_special_tokens=True):
        calls.append(len(ids))
        return orig(ids, skip_special_tokens)

    tok.raw_decode = spy
    ids = tok.encode("The quick brown fox jumps over the lazy dog. " * 60, add_special_tokens=False)
    ids += [3 + 0x80] * 300  # a long run of invalid bytes must not grow the window either
    det = IncrementalDetokenizer(tok, [])
    for i in ids:
        det.add(i)
    assert len(ids) > 800 and max(calls) <= 12
    assert det.text == orig(ids)


def _byte_fallback_tokenizer() -> Tokenizer:
    """A Llama-2 style tokenizer: Metaspace words and SentencePiece <0xHH> byte fallback."""
    import tokenizers
    from tokenizers import AddedToken, decoders, models, normalizers
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{b:02X}>": 3 + b for b in range(256)})
    for w in ["▁", "▁the", "▁cat", "s", "a", "▁hello", "world", "é", "世", "▁x", "."]:
        vocab[w] = len(vocab)
    tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>",
                                          byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens([AddedToken(t, special=True) for t in ("<unk>", "<s>", "</s>")])
    return Tokenizer(tok, {"bos_token": "<s>", "eos_token": "</s>"})


def test_incremental_byte_fallback():
    tok = _byte_fallback_tokenizer()
    assert len(tok.byte_tokens) == 256
    rng = random.Random(2)
    for _ in range(1500):
        ids = []
        for _ in range(rng.randrange(1, 30)):
            r = rng.random()
            if r < 0.6:
                ids.append(rng.randrange(259, tok.vocab_size))  # words
            elif r < 0.9:  # a character spelled in byte tokens
                ids += [3 + b for b in rng.choice(["é", "世", "🙂", "a"]).encode()]
            elif r < 0.95:
                ids.append(rng.randrange(0, 3))  # special ids
            else:
                ids.append(3 + rng.randrange(256))  # any byte, often invalid
        det = IncrementalDetokenizer(tok, [])
        for n, i in enumerate(ids, 1):
            det.add(i)
            assert det.text == tok.decode(ids[:n]), ids[:n]
    # valid characters spelled in bytes are never streamed as U+FFFD, and windows stay short
    calls = []
    orig = tok.raw_decode
    tok.raw_decode = lambda ids, skip_special_tokens=True: calls.append(len(ids)) or orig(ids)
    text = " the cat 世界 🙂 é" * 40
    ids = [3 + b for b in text.encode()] + tok.encode(" the cat", add_special_tokens=False)
    det = IncrementalDetokenizer(tok, [])
    for i in ids:
        det.add(i)
        assert "\ufffd" not in det.stable_text
    assert det.text == orig(ids) and max(calls) <= 80
    assert "\ufffd" not in det.text and det.text.startswith("the cat 世界 🙂 é the cat 世界")


def test_stop_strings(tiny_dir):
    tok = Tokenizer.from_dir(tiny_dir)
    text = "Hello world. Stop here END and more text END"
    ids = tok.encode(text, add_special_tokens=False)
    det, hits = _feed(tok, ids, ["END"])
    first = hits.index(True)
    assert not any(hits[:first]) and all(hits[first:])
    assert det.text == "Hello world. Stop here "
    assert det.stop_string == "END"
    assert tok.decode(ids[:first + 1]).endswith("END")  # stopped on the id completing "END"
    # no stop string: the whole text
    det, hits = _feed(tok, ids, ["not there"])
    assert not any(hits) and det.text == text
    # the earliest of several stop strings wins; empty stop strings are ignored
    det, _ = _feed(tok, ids, ["", "more", "here"])
    assert det.text == "Hello world. Stop " and det.stop_string == "here"


def test_stop_string_spanning_tokens(tiny_dir):
    tok = Tokenizer.from_dir(tiny_dir)
    text = "the quick brown fox jumps"
    enc = tok._tok.encode(text, add_special_tokens=False)
    stop = "own fox j"
    start = text.index(stop)
    spanned = [k for k, (a, b) in enumerate(enc.offsets) if a < start + len(stop) and b > start]
    assert len(spanned) >= 2  # the stop string really spans several tokens
    det, hits = _feed(tok, enc.ids, [stop])
    assert hits.index(True) == spanned[-1]
    assert det.text == text[:start]
    # a multi-byte stop string split across byte tokens
    text = "abc 世界 def"
    ids = tok.encode(text, add_special_tokens=False)
    det, hits = _feed(tok, ids, ["界"])
    assert any(hits) and det.text == "abc 世"
