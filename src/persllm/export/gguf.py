"""GGUF export of a merged persllm model for llama.cpp and Ollama, written with the `gguf` package alone.

Supported: the Gemma 3 text architecture (`Gemma3ForCausalLM`, the embedded default and every Gemma 3 size) with
- the Gemma 3 SentencePiece vocabulary (the embedded default's): the tokenizer metadata is copied field by field from
  the embedded GGUF, so llama.cpp tokenizes exactly as the original file does; tokens added in training (the
  `<TIME-*>` stage tokens) are appended as control tokens;
- a GPT-2 style byte-level BPE vocabulary (e.g. the test suite's tiny model): tokens, merges and special ids are
  written from `tokenizer.json`.
Anything else raises ExportError naming the alternative (llama.cpp's `convert_hf_to_gguf.py`).

Every file carries persllm's chat template (the one training used, minus TRL's generation markers) and marks the
template's end-of-turn token as end-of-generation, so `llama_cpp.Llama.create_chat_completion`, `llama-server --jinja`
and Ollama render the persona's prompts exactly as in training and stop at the end of the answer.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from persllm import template
from persllm.errors import PersllmError
from persllm.workspace import apply_umask

log = logging.getLogger(__name__)

OUTTYPES = ("f16", "q8_0", "f32")
ARCH = "gemma3"
_PAD_TOKEN = "[PAD{}]"
_CARRIED_GENERAL = ("general.license", "general.license.name", "general.license.link", "general.basename",
                    "general.size_label")


class ExportError(PersllmError):
    """The model cannot be exported to GGUF as it is; the message says why and what to do instead."""


@dataclass(frozen=True)
class KV:
    """One GGUF metadata field."""

    key: str
    value: Any
    vtype: Any  # gguf.GGUFValueType
    sub_type: Any = None


# -- entry point ---------------------------------------------------------------------------------------------------
def export_gguf(merged_dir: Path, out_path: Path, outtype: str = "f16", *, name: str | None = None,
                vocab_gguf: Path | None = None) -> Path:
    """Write `merged_dir` (a merged transformers checkpoint) as one GGUF file: F16, Q8_0 or F32 (exact, for tests).

    `vocab_gguf` is a GGUF whose SentencePiece tokenizer the model uses (default: the embedded model's, used only
    when the vocabularies match). Returns `out_path`, written atomically.
    """
    return export_ggufs(merged_dir, {outtype: out_path}, name=name, vocab_gguf=vocab_gguf)[outtype]


def export_ggufs(merged_dir: Path, outputs: Mapping[str, Path], *, name: str | None = None,
                 vocab_gguf: Path | None = None) -> dict[str, Path]:
    """Several GGUF types of one merged model ({"f16": path, "q8_0": path}); Q8_0 is quantized from the F16 file."""
    merged_dir = Path(merged_dir)
    outputs = {t: Path(p) for t, p in outputs.items()}
    unknown = [t for t in outputs if t not in OUTTYPES]
    if unknown or not outputs:
        raise ExportError(f"unknown GGUF type {', '.join(map(repr, unknown)) or 'none'}; choose from "
                          f"{', '.join(OUTTYPES)}")
    config = read_config(merged_dir)
    hparams = gemma3_hparams(config)
    for path in outputs.values():
        path.parent.mkdir(parents=True, exist_ok=True)
    for dense, derived in (("f32", ()), ("f16", ("q8_0",))):
        wanted = [t for t in (dense, *derived) if t in outputs]
        if not wanted:
            continue
        anchor = outputs[wanted[0]]
        with _temp_beside(anchor, f".{dense}.partial") as tmp:
            write_dense(merged_dir, tmp, config, hparams, dense, name, vocab_gguf)
            for outtype in derived:
                if outtype in outputs:
                    with _temp_beside(outputs[outtype], ".partial") as quantized:
                        quantize(tmp, quantized, outtype)
                        apply_umask(quantized)  # mkstemp made it 0600
                        os.replace(quantized, outputs[outtype])
            if dense in outputs:
                apply_umask(tmp)
                os.replace(tmp, outputs[dense])
    return outputs


@contextlib.contextmanager
def _temp_beside(path: Path, suffix: str) -> Iterator[Path]:
    """A temporary file name next to `path`, removed afterwards unless it was moved away."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def read_config(merged_dir: Path) -> dict[str, Any]:
    """config.json of a merged checkpoint (the text config of a multimodal wrapper is not supported)."""
    path = merged_dir / "config.json"
    if not path.is_file():
        raise ExportError(f"{merged_dir} has no config.json; export a merged model (`persllm export --merged`, "
                          "or persllm.export.merge.merge_variant) first")
    return json.loads(path.read_text(encoding="utf-8"))


# -- architecture ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Gemma3Params:
    """What the GGUF needs from a Gemma 3 config, checked against what llama.cpp's gemma3 graph computes."""

    n_layers: int
    kvs: list[tuple[str, Any]]  # (GGUFWriter method, value)
    q_norm_scale: float  # folds HF's query_pre_attn_scalar into q_norm where llama.cpp's fixed scale differs
    tied: bool


def gemma3_hparams(config: dict[str, Any]) -> Gemma3Params:
    """GGUF hyperparameters of a Gemma 3 text model; ExportError for features llama.cpp's gemma3 lacks."""
    model_type = config.get("model_type")
    if model_type != "gemma3_text":
        raise ExportError(
            f"GGUF export supports the Gemma 3 text architecture (model_type gemma3_text, the embedded default); "
            f"this model is {model_type!r} ({', '.join(config.get('architectures') or [])}). Convert it with "
            "llama.cpp's convert_hf_to_gguf.py from the merged folder (`persllm export --merged`) instead")
    problems = [f"{key}={config[key]!r}" for key in ("attn_logit_softcapping", "final_logit_softcapping")
                if config.get(key)]
    if config.get("attention_bias"):
        problems.append("attention_bias=true")
    if config.get("use_bidirectional_attention"):
        problems.append("use_bidirectional_attention=true")
    layers = int(config["num_hidden_layers"])
    layer_types = config.get("layer_types") or []
    if len(layer_types) != layers or set(layer_types) - {"sliding_attention", "full_attention"}:
        problems.append(f"layer_types={layer_types!r}")
    full, sliding = _rope(config, "full_attention"), _rope(config, "sliding_attention")
    if sliding.get("rope_type", "default") != "default":
        problems.append(f"sliding-window RoPE scaling {sliding.get('rope_type')!r}")
    if full.get("rope_type", "default") not in ("default", "linear"):
        problems.append(f"RoPE scaling {full.get('rope_type')!r}")
    if problems:
        raise ExportError("llama.cpp's gemma3 architecture cannot run this model (" + ", ".join(problems) + "); "
                          "serve the merged transformers model instead (`persllm export --merged`)")
    hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
    head_dim = int(config.get("head_dim") or hidden // heads)
    kvs: list[tuple[str, Any]] = [
        ("add_context_length", int(config.get("max_position_embeddings", 131072))),
        ("add_embedding_length", hidden),
        ("add_block_count", layers),
        ("add_feed_forward_length", int(config["intermediate_size"])),
        ("add_head_count", heads),
        ("add_head_count_kv", int(config.get("num_key_value_heads", heads))),
        ("add_key_length", head_dim),
        ("add_value_length", head_dim),
        ("add_layer_norm_rms_eps", float(config.get("rms_norm_eps", 1e-6))),
        ("add_rope_freq_base", float(full.get("rope_theta", 1_000_000.0))),
    ]
    if "sliding_attention" in layer_types:
        kvs += [("add_sliding_window", int(config["sliding_window"])),
                # per-layer flags: llama.cpp otherwise assumes Gemma 3's 5-local-1-global pattern
                ("add_sliding_window_pattern", [t == "sliding_attention" for t in layer_types]),
                ("add_rope_freq_base_swa", float(sliding.get("rope_theta", 10_000.0)))]
    if full.get("rope_type") == "linear":
        import gguf

        kvs += [("add_rope_scaling_type", gguf.RopeScalingType.LINEAR),
                ("add_rope_scaling_factor", float(full["factor"]))]
    # llama.cpp scales queries by 1/sqrt(head_dim) (1/sqrt(hidden/heads) for the 62-layer 27B); transformers by
    # query_pre_attn_scalar**-0.5. RoPE is linear, so a different scale is folded exactly into the q_norm weight.
    llama_scale = 1 / math.sqrt(hidden / heads if layers == 62 else head_dim)
    hf_scale = float(config.get("query_pre_attn_scalar") or head_dim) ** -0.5
    return Gemma3Params(n_layers=layers, kvs=kvs, q_norm_scale=hf_scale / llama_scale,
                        tied=bool(config.get("tie_word_embeddings", True)))


def _rope(config: dict[str, Any], layer_type: str) -> dict[str, Any]:
    """RoPE settings of one layer type (transformers 5 rope_parameters, or the older flat keys)."""
    params = config.get("rope_parameters")
    if isinstance(params, dict) and layer_type in params:
        return dict(params[layer_type])
    if layer_type == "sliding_attention":
        return {"rope_theta": config.get("rope_local_base_freq", 10_000.0)}
    scaling = config.get("rope_scaling") or {}
    return {"rope_theta": config.get("rope_theta", 1_000_000.0), **scaling}


# -- tensors ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorPlan:
    """One tensor to write: where it comes from and how it is transformed."""

    gguf_name: str
    source: Path
    hf_name: str
    shape: tuple[int, ...]
    is_norm: bool
    scale: float = 1.0


def plan_tensors(merged_dir: Path, params: Gemma3Params) -> list[TensorPlan]:
    """HF tensors mapped to GGUF names; the tied LM head is dropped (llama.cpp reuses token_embd)."""
    import gguf
    from safetensors import safe_open

    files = sorted(merged_dir.glob("*.safetensors"))
    if not files:
        raise ExportError(f"{merged_dir} has no .safetensors weights; re-create it with `persllm export --merged`")
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA3, params.n_layers)
    plans = []
    for path in files:
        with safe_open(str(path), "pt") as fh:
            for hf_name in fh.keys():  # noqa: SIM118 - safetensors handles are not iterable
                if hf_name.startswith("lm_head.") and params.tied:
                    continue
                gguf_name = "output.weight" if hf_name == "lm_head.weight" else names.get_name(
                    hf_name, try_suffixes=(".weight", ".bias"))
                if gguf_name is None:
                    raise ExportError(f"{path.name}: tensor {hf_name} has no llama.cpp gemma3 counterpart; this "
                                      "checkpoint is not a plain Gemma 3 text model")
                is_norm = hf_name.endswith("norm.weight")
                scale = params.q_norm_scale if hf_name.endswith("q_norm.weight") else 1.0
                plans.append(TensorPlan(gguf_name, path, hf_name, tuple(fh.get_slice(hf_name).get_shape()),
                                        is_norm, scale=scale))
    return plans


def _load(plan: TensorPlan, outtype: str) -> Any:
    """A tensor as numpy, transformed for llama.cpp: Gemma norms stored as 1 + w (F32), matrices F16 or F32."""
    import numpy as np
    import torch
    from safetensors import safe_open

    with safe_open(str(plan.source), "pt") as fh:
        data = fh.get_tensor(plan.hf_name).to(torch.float32)
    if plan.is_norm:
        data = (data + 1.0) * plan.scale  # Gemma3RMSNorm computes x * (1 + w)
        return data.numpy().astype(np.float32)
    return data.numpy().astype(np.float16 if outtype == "f16" else np.float32)


# -- writing ---------------------------------------------------------------------------------------------------------
def write_dense(merged_dir: Path, out: Path, config: dict[str, Any], params: Gemma3Params, outtype: str,
                name: str | None, vocab_gguf: Path | None) -> None:
    """Stream an F16/F32 GGUF: metadata and tensor infos first, then one tensor at a time (low memory)."""
    import gguf
    import numpy as np

    plans = plan_tensors(merged_dir, params)
    embed = next((p for p in plans if p.gguf_name == "token_embd.weight"), None)
    if embed is None:
        raise ExportError(f"{merged_dir}: no token embedding (model.embed_tokens.weight) found")
    n_vocab = embed.shape[0]
    vocab = tokenizer_kvs(merged_dir, n_vocab, vocab_gguf)
    log.info("%s: %s vocabulary of %d tokens, %d tensors as %s", out.name, vocab.route, vocab.n_tokens, len(plans),
             outtype)
    writer = gguf.GGUFWriter(None, arch=ARCH)
    writer.add_name(name or str(config.get("_name_or_path") or "persllm model"))
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32 if outtype == "f32" else gguf.LlamaFileType.MOSTLY_F16)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for method, value in params.kvs:
        getattr(writer, method)(value)
    for kv in vocab.kvs:
        writer.add_key_value(kv.key, kv.value, kv.vtype, sub_type=kv.sub_type)
    for plan in plans:
        dtype = np.float32 if plan.is_norm or outtype == "f32" else np.float16
        nbytes = int(np.prod(plan.shape)) * np.dtype(dtype).itemsize
        writer.add_tensor_info(plan.gguf_name, plan.shape, np.dtype(dtype), nbytes)
    writer.write_header_to_file(out)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for plan in plans:
        writer.write_tensor_data(_load(plan, outtype))
    writer.close()


def quantize(source: Path, target: Path, outtype: str) -> None:
    """Re-quantize an F16 GGUF with llama.cpp (Q8_0: about 2 s for the 270M model); stderr chatter suppressed."""
    from persllm.errors import require

    require("llama_cpp", "llamacpp", "Quantized GGUF export")
    import llama_cpp

    ftypes = {"q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0}
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftypes[outtype]
    params.nthread = os.cpu_count() or 1
    with _quiet_stderr():
        rc = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), params)
    if rc != 0:
        raise ExportError(f"llama.cpp failed to quantize {source.name} to {outtype} (code {rc}); the F16 export "
                          "(--gguf f16) still works")


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence C-level stderr (llama.cpp logs every tensor while quantizing); library code never prints."""
    import sys

    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


# -- tokenizer -------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class VocabMeta:
    """Tokenizer metadata for the GGUF and the number of tokens it lists."""

    kvs: list[KV]
    n_tokens: int
    route: str  # "embedded-spm" or "bpe"


def hf_vocab(merged_dir: Path) -> tuple[dict[str, Any], list[str | None], dict[int, dict[str, Any]]]:
    """tokenizer.json, the token of every id, and the added tokens by id."""
    path = merged_dir / "tokenizer.json"
    if not path.is_file():
        raise ExportError(f"{merged_dir} has no tokenizer.json (a fast tokenizer); GGUF export needs it")
    data = json.loads(path.read_text(encoding="utf-8"))
    added = {int(t["id"]): t for t in data.get("added_tokens", [])}
    vocab = data.get("model", {}).get("vocab") or {}
    if not isinstance(vocab, dict):
        raise ExportError(f"{path}: a {data.get('model', {}).get('type')} tokenizer is not supported for GGUF "
                          "export (supported: Gemma 3's SentencePiece vocabulary, byte-level BPE)")
    size = max([*vocab.values(), *added.keys()], default=-1) + 1
    tokens: list[str | None] = [None] * size
    for text, index in vocab.items():
        tokens[index] = text
    for index, entry in added.items():
        tokens[index] = entry["content"]
    return data, tokens, added


def tokenizer_kvs(merged_dir: Path, n_vocab: int, vocab_gguf: Path | None = None) -> VocabMeta:
    """Tokenizer metadata: copied from a matching SentencePiece GGUF, else built from a byte-level BPE tokenizer."""
    data, tokens, added = hf_vocab(merged_dir)
    if len(tokens) > n_vocab:
        raise ExportError(f"the tokenizer has {len(tokens)} tokens but the model only {n_vocab} embedding rows; "
                          "the merged checkpoint is inconsistent, re-create it with `persllm export --merged`")
    start, end = template.markers_for({t for t in tokens if t is not None})
    if end not in tokens:
        raise ExportError(f"the tokenizer has no {end} token, so llama.cpp could not stop at the end of a turn; "
                          "only models trained by persllm (which adds the turn markers) can be exported")
    chat = template.chat_template(start, end, training=False)
    source = vocab_gguf
    if source is None and _looks_like_gemma3_spm(data, tokens):
        from persllm.models import embedded_gguf

        source = embedded_gguf()
    if source is not None:
        meta = _spm_from_gguf(Path(source), tokens, added, n_vocab, chat, tokens.index(end))
        if meta is not None:
            return meta
        if vocab_gguf is not None:
            raise ExportError(f"the model's vocabulary does not match the tokenizer of {vocab_gguf}")
    return _bpe_from_json(merged_dir, data, tokens, added, n_vocab, chat, tokens.index(end))


def _looks_like_gemma3_spm(data: dict[str, Any], tokens: Sequence[str | None]) -> bool:
    """Cheap test before reading the embedded GGUF: Gemma's byte-fallback BPE with its 262,144 pieces."""
    model = data.get("model", {})
    return bool(model.get("byte_fallback")) and len(model.get("vocab") or {}) == 262_144 and \
        len(tokens) > 106 and tokens[105] == "<start_of_turn>" and tokens[106] == "<end_of_turn>"


def _spm_from_gguf(source: Path, tokens: Sequence[str | None], added: dict[int, dict[str, Any]], n_vocab: int,
                   chat: str, eot: int) -> VocabMeta | None:
    """Every tokenizer field of `source`, extended by tokens added in training; None if the vocabularies differ."""
    import gguf

    stat = source.stat()
    original, fields = _gguf_tokenizer(str(source), stat.st_mtime_ns, stat.st_size)
    if not original or len(original) > len(tokens):
        return None
    # GGUF stores the whitespace pieces with real spaces where tokenizer.json has U+2581
    if any(_norm(original[i]) != _norm(tokens[i]) for i in range(len(original))):
        return None
    extra = list(range(len(original), max(len(tokens), n_vocab)))
    kvs: list[KV] = []
    for kv in fields:
        if kv.key == gguf.Keys.Tokenizer.LIST:
            kv = KV(kv.key, original + [_added_text(tokens, i) for i in extra], kv.vtype, kv.sub_type)
        elif kv.key == gguf.Keys.Tokenizer.SCORES:
            kv = KV(kv.key, list(kv.value) + [0.0] * len(extra), kv.vtype, kv.sub_type)
        elif kv.key == gguf.Keys.Tokenizer.TOKEN_TYPE:
            kv = KV(kv.key, list(kv.value) + [_added_type(added, i, len(tokens)) for i in extra], kv.vtype,
                    kv.sub_type)
        kvs.append(kv)
    kvs += [KV(gguf.Keys.Tokenizer.CHAT_TEMPLATE, chat, gguf.GGUFValueType.STRING),
            KV(gguf.Keys.Tokenizer.EOT_ID, eot, gguf.GGUFValueType.UINT32)]
    return VocabMeta(kvs=kvs, n_tokens=len(original) + len(extra), route="embedded-spm")


@functools.lru_cache(maxsize=2)
def _gguf_tokenizer(path: str, mtime_ns: int, size: int) -> tuple[list[str], list[KV]]:
    """Token list and tokenizer (plus licence) fields of a GGUF; cached, parsing 262k tokens takes ~15 s."""
    import gguf

    reader = gguf.GGUFReader(path, "r")
    field = reader.fields.get(gguf.Keys.Tokenizer.LIST)
    if field is None:
        return [], []
    original = [bytes(field.parts[i]).decode("utf-8") for i in field.data]
    fields = []
    for key, item in reader.fields.items():
        # the base model's licence applies to its fine-tunes; the chat template is persllm's own
        if (key.startswith("tokenizer.") or key in _CARRIED_GENERAL) and key != gguf.Keys.Tokenizer.CHAT_TEMPLATE:
            vtype = item.types[0]
            sub_type = item.types[1] if vtype == gguf.GGUFValueType.ARRAY else None
            value = original if key == gguf.Keys.Tokenizer.LIST else item.contents()
            fields.append(KV(key, value, vtype, sub_type))
    return original, fields


def _norm(text: str | None) -> str | None:
    return text.replace("\u2581", " ") if text is not None else None


def _added_text(tokens: Sequence[str | None], index: int) -> str:
    """Text of a token id beyond the original vocabulary (a padding placeholder where the tokenizer has none)."""
    text = tokens[index] if index < len(tokens) else None
    return text if text is not None else _PAD_TOKEN.format(index)


def _added_type(added: dict[int, dict[str, Any]], index: int, n_tokens: int) -> int:
    """GGUF token type of an added token: special ones are control tokens (parsed in prompts, never printed)."""
    import gguf

    if index >= n_tokens or index not in added:
        return int(gguf.TokenType.UNUSED)
    return int(gguf.TokenType.CONTROL if added[index].get("special") else gguf.TokenType.USER_DEFINED)


def _bpe_from_json(merged_dir: Path, data: dict[str, Any], tokens: Sequence[str | None],
                   added: dict[int, dict[str, Any]], n_vocab: int, chat: str, eot: int) -> VocabMeta:
    """GPT-2 style byte-level BPE metadata (tokenizer.ggml.model gpt2, pre-tokenizer gpt-2)."""
    import gguf

    model, pre, decoder = data.get("model", {}), data.get("pre_tokenizer") or {}, data.get("decoder") or {}
    gpt2 = (model.get("type") == "BPE" and not model.get("byte_fallback") and data.get("normalizer") is None
            and pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space")
            and decoder.get("type") == "ByteLevel")
    if not gpt2:
        raise ExportError(
            "GGUF export supports Gemma 3's SentencePiece vocabulary (the embedded default) and GPT-2 style "
            f"byte-level BPE tokenizers; this one is {model.get('type')} with pre-tokenizer {pre.get('type')!r}. "
            "Convert the merged folder (`persllm export --merged`) with llama.cpp's convert_hf_to_gguf.py instead")
    if any(t is None for t in tokens):
        raise ExportError(f"{merged_dir / 'tokenizer.json'}: token ids are not contiguous; cannot write a GGUF "
                          "vocabulary")
    n_tokens = max(len(tokens), n_vocab)
    texts = [_added_text(tokens, i) for i in range(n_tokens)]
    types = [int(gguf.TokenType.NORMAL) if i in range(len(tokens)) and i not in added
             else _added_type(added, i, len(tokens)) for i in range(n_tokens)]
    special = gguf.SpecialVocab(merged_dir, load_merges=True, n_vocab=n_tokens)
    if not special.merges:
        raise ExportError(f"{merged_dir / 'tokenizer.json'} has no BPE merges; cannot write a GGUF vocabulary")
    t = gguf.GGUFValueType
    kvs = [KV(gguf.Keys.Tokenizer.MODEL, "gpt2", t.STRING), KV(gguf.Keys.Tokenizer.PRE, "gpt-2", t.STRING),
           KV(gguf.Keys.Tokenizer.LIST, texts, t.ARRAY, t.STRING),
           KV(gguf.Keys.Tokenizer.TOKEN_TYPE, types, t.ARRAY, t.INT32),
           KV(gguf.Keys.Tokenizer.MERGES, special.merges, t.ARRAY, t.STRING)]
    ids = dict(special.special_token_ids)
    keys = {"bos": gguf.Keys.Tokenizer.BOS_ID, "eos": gguf.Keys.Tokenizer.EOS_ID, "unk": gguf.Keys.Tokenizer.UNK_ID,
            "pad": gguf.Keys.Tokenizer.PAD_ID}
    kvs += [KV(keys[kind], int(ids[kind]), t.UINT32) for kind in keys if kind in ids]
    # The template starts with bos_token; llama.cpp and Ollama strip a rendered BOS when they add their own.
    kvs += [KV(gguf.Keys.Tokenizer.ADD_BOS, "bos" in ids, t.BOOL), KV(gguf.Keys.Tokenizer.ADD_EOS, False, t.BOOL),
            KV(gguf.Keys.Tokenizer.CHAT_TEMPLATE, chat, t.STRING), KV(gguf.Keys.Tokenizer.EOT_ID, eot, t.UINT32)]
    return VocabMeta(kvs=kvs, n_tokens=n_tokens, route="bpe")


# -- Ollama ----------------------------------------------------------------------------------------------------------
def ollama_modelfile(gguf_name: str, start: str, end: str, system: str | None = None) -> str:
    """An Ollama Modelfile for an exported persona: persllm's turn format as a Go template, stop at end-of-turn.

    Ollama puts the system prompt (SYSTEM below, or one sent by the client) into .Messages with role "system",
    which persllm's template renders as its own turn, exactly as in training.
    """
    lines = [f"FROM ./{gguf_name}", "",
             'TEMPLATE """{{- range .Messages }}' + start + "{{ .Role }}\n{{ .Content }}" + end + "\n{{ end }}"
             + start + 'assistant\n"""', "",
             f'PARAMETER stop "{end}"']
    if system:
        lines += ["", 'SYSTEM """' + system.replace('"""', "'''") + '"""']
    return "\n".join(lines) + "\n"
