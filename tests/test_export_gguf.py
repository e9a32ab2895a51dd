"""Merged and GGUF exports: the merged folder equals the adapter stack, llama.cpp's greedy output equals transformers'
on the same prompts, generation stops at the end-of-turn token, Q8_0 loads, unsupported models are refused."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import MINIMAL_YAML, write_project
from persllm import template
from persllm.config import load_project
from persllm.export.gguf import ExportError, export_gguf, export_ggufs
from persllm.export.merge import best_variant, merge_variant, merged_meta
from persllm.types import Message, Negative
from test_train import GENERAL, make_samples

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # module-wide, see conftest
NEW_TOKENS = 24
F16_NEAR_TIE = 0.02  # F16 weights may only flip a greedy choice where transformers' top two logits nearly tie


@pytest.fixture(scope="module")
def tuned(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Any:
    """A tiny persona tuned by SFT (with stage tokens, so the vocabulary grew) and DPO on top."""
    from persllm.train import build_pairs, pairs_by_split, train_dpo, train_sft

    root = tmp_path_factory.mktemp("gguf")
    settings = (f"base_model: hf:{tiny_model}\nsft:\n  batch_size: 2\n  max_steps: 3\n  learning_rate: 0.003\n"
                "  temporal_labels: tokens\ndpo:\n  batch_size: 2\n  max_steps: 2\n")
    project = load_project(write_project(root / "person", MINIMAL_YAML + settings))
    samples = make_samples()
    train_sft(project, samples, GENERAL, project.output / "sft")
    negatives = [Negative(f"n{s.id}", s.id, "other_stage", f"Ich bin ein Erfinder in Berlin, {s.id}.")
                 for s in samples]
    pairs, _ = build_pairs(project, samples, negatives)
    train_dpo(project, pairs_by_split(pairs, samples)["train"], project.output / "sft", project.output / "dpo")
    return project, samples


@pytest.fixture(scope="module")
def merged(tuned: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    project, _ = tuned
    return merge_variant(project, best_variant(project), tmp_path_factory.mktemp("merged") / "dpo")


@pytest.fixture(scope="module")
def llama_cpp() -> Any:
    return pytest.importorskip("llama_cpp")


def prompts(tuned: Any) -> list[list[dict[str, str]]]:
    """Training prompts of both stages (the late one starts its user turn with the <TIME-II> token)."""
    from persllm.train.data import sample_prompt

    project, samples = tuned
    return [[{"role": m.role, "content": m.content} for m in sample_prompt(project, s)] for s in samples[:3]]


def hf_greedy(model: Any, tokenizer: Any, ids: list[int], new_tokens: int) -> tuple[list[int], list[float]]:
    """Greedy continuation from transformers and, per step, the gap between its two best logits."""
    from persllm.models import stop_token_ids

    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=new_tokens, do_sample=False, output_scores=True,
                             return_dict_in_generate=True, eos_token_id=stop_token_ids(tokenizer),
                             pad_token_id=tokenizer.pad_token_id)
    generated = out.sequences[0, len(ids):].tolist()
    margins = [float(s[0].topk(2).values[0] - s[0].topk(2).values[1]) for s in out.scores]
    return generated, margins


def llama_greedy(llm: Any, llama_cpp: Any, ids: list[int], new_tokens: int) -> list[int]:
    """Greedy continuation from llama.cpp, stopping at an end-of-generation token (kept, like transformers)."""
    out = []
    for token in llm.generate(ids, temp=0.0, repeat_penalty=1.0, reset=True):
        out.append(int(token))
        if llama_cpp.llama_vocab_is_eog(llm._model.vocab, token) or len(out) == new_tokens:
            break
    return out


def assert_same_greedy(hf: list[int], ours: list[int], margins: list[float], near_tie: float) -> None:
    """Identical token ids, except that from a step where transformers' top two logits tie within near_tie."""
    for step, (a, b) in enumerate(zip(hf, ours, strict=False)):
        if a != b:
            assert margins[step] <= near_tie, f"step {step}: llama.cpp chose {b}, transformers {a} " \
                                              f"(margin {margins[step]:.4f})\n{hf}\n{ours}"
            return
    assert len(hf) == len(ours), (hf, ours)


# -- merged folder ---------------------------------------------------------------------------------------------------
def test_merged_model_equals_the_adapter_stack(tuned: Any, merged: Path, tiny_model: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from persllm.backends.hf import HFBackend

    project, _ = tuned
    meta = merged_meta(merged)
    assert meta["variant"] == "dpo" and len(meta["stack"]) == 2 and meta["turn_markers"] == list(
        template.TURN_MARKERS[0])
    tokenizer = AutoTokenizer.from_pretrained(str(merged))
    assert tokenizer.chat_template == template.chat_template(*template.TURN_MARKERS[0], training=False)
    assert tokenizer.convert_tokens_to_ids(template.time_token(1)) == 513 and len(tokenizer) == 514
    model = AutoModelForCausalLM.from_pretrained(str(merged), dtype=torch.float32).eval()
    assert 5 in model.generation_config.eos_token_id  # <end_of_turn> stops generation
    stacked = HFBackend(str(tiny_model), adapter=project.output / "dpo" / "adapter")
    for chat in prompts(tuned):
        text = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
        assert text == stacked.render([Message(m["role"], m["content"]) for m in chat])  # same prompt text
        with torch.no_grad():
            torch.testing.assert_close(model(ids).logits, stacked.model(ids).logits, atol=1e-5, rtol=1e-4)


# -- GGUF on the tiny model (byte-level BPE tokenizer) ---------------------------------------------------------------
@pytest.mark.parametrize(("outtype", "near_tie"), [("f32", 0.0), ("f16", F16_NEAR_TIE)])
def test_gguf_greedy_output_matches_transformers(tuned: Any, merged: Path, tmp_path: Path, llama_cpp: Any,
                                                 outtype: str, near_tie: float) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = export_gguf(merged, tmp_path / f"persona-{outtype}.gguf", outtype)
    tokenizer = AutoTokenizer.from_pretrained(str(merged))
    model = AutoModelForCausalLM.from_pretrained(str(merged), dtype=torch.float32).eval()
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=1024, n_threads=1, seed=0, verbose=False)
    try:
        assert llm.metadata["tokenizer.chat_template"] == template.chat_template(training=False)
        for chat in prompts(tuned):
            rendered = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
            ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
            # llama.cpp tokenizes the template's text exactly like transformers, turn markers and <TIME-*> included
            assert llm.tokenize(rendered.encode(), add_bos=False, special=True) == ids
            hf, margins = hf_greedy(model, tokenizer, ids, NEW_TOKENS)
            ours = llama_greedy(llm, llama_cpp, ids, NEW_TOKENS)
            assert_same_greedy(hf, ours, margins, near_tie)
            if hf == ours:  # the chat API renders persllm's template from the GGUF and answers the same text
                answer = llm.create_chat_completion(messages=chat, max_tokens=NEW_TOKENS, temperature=0.0,
                                                    repeat_penalty=1.0)["choices"][0]["message"]["content"]
                # llama-cpp-python drops bytes of incomplete UTF-8 characters; transformers shows U+FFFD
                assert answer == tokenizer.decode(hf, skip_special_tokens=True).replace("\ufffd", "")
    finally:
        llm.close()


def test_gguf_stops_at_end_of_turn(tuned: Any, merged: Path, tmp_path: Path, llama_cpp: Any) -> None:
    path = export_gguf(merged, tmp_path / "persona.gguf", "f16")
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=1024, n_threads=1, verbose=False)
    try:
        end = llm.tokenize(template.TURN_MARKERS[0][1].encode(), add_bos=False, special=True)
        assert end == [5]
        assert llama_cpp.llama_vocab_is_eog(llm._model.vocab, 5) and llama_cpp.llama_vocab_is_eog(llm._model.vocab, 1)
        assert int(llm.metadata["tokenizer.ggml.eot_token_id"]) == 5
        # Force the end-of-turn token first: the answer must end there, empty, without printing the marker.
        out = llm.create_chat_completion(messages=prompts(tuned)[0], max_tokens=8, temperature=0.0,
                                         logit_bias={5: 100.0})
        choice = out["choices"][0]
        assert choice["finish_reason"] == "stop" and choice["message"]["content"] == ""
    finally:
        llm.close()


def test_q8_0_export_loads_and_generates(tuned: Any, merged: Path, tmp_path: Path, llama_cpp: Any) -> None:
    import gguf

    f16 = export_gguf(merged, tmp_path / "persona-f16.gguf", "f16")
    q8 = export_gguf(merged, tmp_path / "persona-q8_0.gguf", "q8_0")
    assert q8.stat().st_size < f16.stat().st_size
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(q8)).tensors}
    assert types["blk.0.attn_q.weight"] == "Q8_0" and types["blk.0.attn_q_norm.weight"] == "F32"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["persona-f16.gguf", "persona-q8_0.gguf"]  # no temp files
    llm = llama_cpp.Llama(model_path=str(q8), n_ctx=1024, n_threads=1, verbose=False)
    try:
        out = llm.create_chat_completion(messages=prompts(tuned)[1], max_tokens=8, temperature=0.0)
        assert out["usage"]["completion_tokens"] > 0
    finally:
        llm.close()


# -- refusals --------------------------------------------------------------------------------------------------------
def _copy(source: Path, target: Path, config: dict[str, Any] | None = None,
          tokenizer: dict[str, Any] | None = None) -> Path:
    shutil.copytree(source, target)
    for name, changes in (("config.json", config), ("tokenizer.json", tokenizer)):
        if changes:
            data = json.loads((target / name).read_text())
            data.update(changes)
            (target / name).write_text(json.dumps(data))
    return target


def test_unsupported_models_are_refused_with_the_alternative(merged: Path, tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="Gemma 3 text architecture.*convert_hf_to_gguf"):
        export_gguf(_copy(merged, tmp_path / "llama", {"model_type": "llama"}), tmp_path / "x.gguf")
    with pytest.raises(ExportError, match="final_logit_softcapping=30"):
        export_gguf(_copy(merged, tmp_path / "cap", {"final_logit_softcapping": 30.0}), tmp_path / "x.gguf")
    metaspace = {"pre_tokenizer": {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "always"}}
    with pytest.raises(ExportError, match="byte-level BPE.*convert_hf_to_gguf"):
        export_gguf(_copy(merged, tmp_path / "spm", tokenizer=metaspace), tmp_path / "x.gguf")
    with pytest.raises(ExportError, match="unknown GGUF type 'q4_k'"):
        export_gguf(merged, tmp_path / "x.gguf", "q4_k")
    assert not list(tmp_path.glob("*.gguf*")) and not list(tmp_path.glob(".x.gguf*"))


def test_query_scale_is_folded_into_q_norm() -> None:
    from persllm.export.gguf import gemma3_hparams

    config = {"model_type": "gemma3_text", "num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 2,
              "head_dim": 32, "intermediate_size": 128, "layer_types": ["sliding_attention", "full_attention"],
              "sliding_window": 64, "query_pre_attn_scalar": 256}
    assert gemma3_hparams(config).q_norm_scale == pytest.approx((32 / 256) ** 0.5)  # llama.cpp uses 1/sqrt(32)
    assert gemma3_hparams(config | {"query_pre_attn_scalar": 32}).q_norm_scale == pytest.approx(1.0)


# -- command line ----------------------------------------------------------------------------------------------------
def test_cli_exports_gguf_merged_model_and_modelfile(tuned: Any) -> None:
    project, _ = tuned
    env = dict(os.environ, COLUMNS="200")
    result = subprocess.run([sys.executable, "-m", "persllm", "export", str(project.root), "--gguf", "f16",
                             "--merged", "--model", "sft"], capture_output=True, text=True, env=env, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    export = project.output / "export"
    gguf_file = export / "gguf" / "test-person-sft-f16.gguf"
    assert gguf_file.is_file() and (export / "merged" / "sft" / "config.json").is_file()
    assert merged_meta(export / "merged" / "sft")["variant"] == "sft"
    modelfile = gguf_file.with_suffix(".Modelfile").read_text()
    assert modelfile.startswith("FROM ./test-person-sft-f16.gguf") and 'PARAMETER stop "<end_of_turn>"' in modelfile
    assert "{{ .Role }}" in modelfile and 'SYSTEM """You are Test Person.' in modelfile
    assert sorted(p.name for p in export.iterdir()) == ["gguf", "merged"]  # no data formats, no scratch folders
    assert "stage tokens" in result.stderr  # the persona was trained with <TIME-*> tokens: users are told


# -- the embedded default (Gemma 3 270M, SentencePiece vocabulary copied from its GGUF) -------------------------------
def random_adapter(project: Any, target: Path) -> None:
    """A LoRA SFT adapter with small random weights and trained <TIME-*> rows, saved the way train_sft saves it
    (training the 262k-vocabulary model would add minutes without exercising anything more of the export)."""
    from peft import get_peft_model

    from persllm.backends import base_model_path
    from persllm.train import _model
    from persllm.train._trainer import save_final, stack_meta

    base = base_model_path(project.base_model)
    tokenizer, added = _model.load_tokenizer(base, project)
    model = _model.load_model(base, tokenizer)
    peft = get_peft_model(model, _model.lora_config(project.sft, added, model))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in peft.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.01)
    save_final(peft, tokenizer, target, stack_meta(target, [], base))


@pytest.mark.integration
def test_embedded_model_gguf_matches_transformers(tmp_path: Path, llama_cpp: Any) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from persllm.models import embedded_gguf
    from persllm.train.data import sample_prompt

    project = load_project(write_project(tmp_path / "person", MINIMAL_YAML + "sft:\n  temporal_labels: tokens\n"))
    random_adapter(project, project.output / "sft" / "adapter")
    merged_dir = merge_variant(project, "sft", tmp_path / "merged")
    written = export_ggufs(merged_dir, {"f16": tmp_path / "persona-f16.gguf", "q8_0": tmp_path / "persona-q8_0.gguf"})
    f16, q8 = written["f16"], written["q8_0"]

    original = llama_cpp.Llama(model_path=str(embedded_gguf()), vocab_only=True, verbose=False)
    llm = llama_cpp.Llama(model_path=str(f16), n_ctx=1024, n_threads=1, seed=0, verbose=False)
    try:
        for key, value in original.metadata.items():  # architecture and tokenizer settings carried over
            if key.startswith(("gemma3.", "tokenizer.ggml.", "general.license")):
                assert llm.metadata[key] == value, key
        assert llm.n_vocab() == original.n_vocab() + 2  # <TIME-I>, <TIME-II> appended as control tokens
        assert llm.tokenize(b"<TIME-II> Hi", add_bos=False, special=True)[0] == 262145
        assert llm.detokenize([262145]) == b""  # control tokens are parsed in prompts, never printed
        assert llama_cpp.llama_vocab_is_eog(llm._model.vocab, 106)  # <end_of_turn>
        tokenizer = AutoTokenizer.from_pretrained(str(merged_dir))
        model = AutoModelForCausalLM.from_pretrained(str(merged_dir), dtype=torch.float32).eval()
        for sample in make_samples()[:2]:  # early stage, then late stage with <TIME-II>
            chat = [{"role": m.role, "content": m.content} for m in sample_prompt(project, sample)]
            rendered = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
            ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
            assert llm.tokenize(rendered.encode(), add_bos=False, special=True) == ids
            hf, margins = hf_greedy(model, tokenizer, ids, NEW_TOKENS)
            ours = llama_greedy(llm, llama_cpp, ids, NEW_TOKENS)
            assert_same_greedy(hf, ours, margins, F16_NEAR_TIE)
    finally:
        llm.close()
        original.close()
    quantized = llama_cpp.Llama(model_path=str(q8), n_ctx=1024, n_threads=1, verbose=False)
    try:
        out = quantized.create_chat_completion(messages=chat, max_tokens=8, temperature=0.0)
        assert out["usage"]["completion_tokens"] > 0 and q8.stat().st_size < f16.stat().st_size * 0.6
    finally:
        quantized.close()
