"""Project configuration: one dataclass per stage, loaded from persona.yaml with every problem reported at once."""

from __future__ import annotations

import copy
import dataclasses
import difflib
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from persllm.backends.registry import BACKENDS, backend_kind, spoken
from persllm.errors import ConfigError
from persllm.types import CONSTRUCTED_NEGATIVES, NEGATIVE_TYPES

PROJECT_FILE = "persona.yaml"
_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")
STAGE_ID = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")
TARGET_LABELS = ("high", "low")  # eval.target labels: which side of the scale's midpoint (3) a domain lies on


@dataclass
class ModelSpec:
    """Where an LLM comes from. Written in YAML as a mapping or a short string such as 'openai:gpt-4o-mini'."""

    backend: str = "default"
    """A name in BACKENDS (persllm/backends/registry.py), whose rows say what each is: default = the embedded
    Gemma 3 270M, openai = any OpenAI-compatible endpoint, hf = a transformers model, and so on."""
    model: str = ""
    """Model name at the endpoint, GGUF path, or transformers id/path."""
    base_url: str = ""
    """Endpoint base URL for backend openai (default https://api.openai.com/v1 or $OPENAI_BASE_URL)."""
    api_key_env: str = "OPENAI_API_KEY"
    """Environment variable holding the API key; keys are never written in project files."""
    adapter: str = ""
    """PEFT adapter directory applied on top of an hf model."""
    concurrency: int = 8
    """Requests in flight at once (HTTP backends)."""
    timeout: float = 120.0
    """Seconds before one request is abandoned and retried."""
    max_retries: int = 5
    """Retries on 429, 5xx, timeouts and connection errors, with exponential backoff."""
    n_ctx: int = 4096
    """Context window for llama.cpp."""

    def __post_init__(self) -> None:
        backend_kind(self.backend)  # an unknown name: ValueError with the valid forms and the closest name
        if self.concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {self.concurrency}")

    @property
    def spec(self) -> str:
        """Short human-readable form used in logs and reports."""
        if self.backend == "default":
            return "default (embedded gemma-3-270m)"
        where = f"@{self.base_url}" if self.base_url else ""
        adapter = f"+{self.adapter}" if self.adapter else ""
        return f"{self.backend}:{self.model}{adapter}{where}"


def parse_model_spec(value: str) -> ModelSpec:
    """Parse 'default', 'openai:gpt-4o-mini[@http://host:8000/v1]', 'llamacpp:/m.gguf', 'hf:Qwen/Qwen2.5-0.5B[+ADAPTER]',
    'fake'."""
    backend, _, target = value.partition(":")
    backend_kind(backend)
    # split at the last "@http": served persllm model ids contain "@" themselves (ada-lovelace@mature:dpo)
    cut = max(target.rfind("@http://"), target.rfind("@https://"))
    if backend == "openai" and cut >= 0:
        return ModelSpec(backend="openai", model=target[:cut], base_url=target[cut + 1:])
    if backend == "hf" and "+" in target:  # hf:BASE+ADAPTER_DIR, the form ModelSpec.spec prints
        model, _, adapter = target.rpartition("+")
        return ModelSpec(backend="hf", model=model, adapter=adapter)
    return ModelSpec(backend=backend, model=target)


@dataclass
class StageConfig:
    """One life stage of the persona."""

    id: str
    """Short id used in file names, CLI flags and temporal labels (lowercase letters, digits, - and _)."""
    label: str
    """The time the persona lives in at this stage, e.g. "1835"."""
    knowledge: str
    """Objective material (experiences, knowledge): one paragraph per line, path relative to persona.yaml."""
    style: str
    """Subjective material (the persona's own words): one paragraph per line."""
    description: str = ""
    """One line on who the persona is at this stage."""


@dataclass
class IngestConfig:
    """How material files become passages."""

    max_tokens: int = 220
    """Paragraphs longer than this many tokens are split into overlapping pieces."""
    overlap_tokens: int = 40
    """Tokens shared by consecutive pieces of a split paragraph."""
    min_tokens: int = 3
    """Lines shorter than this are skipped as headings or noise."""


@dataclass
class ConstructConfig:
    """Teacher-driven data construction (questions, chain-of-thought answers, DPO raw material)."""

    mode: Literal["auto", "full", "grounded"] = "auto"
    """full = the teacher writes questions and answers (PersLLM); grounded = answers built from the persona's own
    words with the teacher used only for short rewrites; auto = grounded for the embedded default, full otherwise."""
    questions_per_passage: int = 3
    """Questions generated from each seed passage."""
    max_per_stage: int = 0
    """Cap on seed passages per stage (0 = all)."""
    kinds: dict[str, float] = field(default_factory=lambda: {"ordinary": 0.4, "opinion": 0.3, "induced": 0.3})
    """Mix of question kinds: ordinary questions, opinion statements, induced false-premise questions."""
    knowledge_budget: int = 1500
    """Tokens of retrieved knowledge context (paper appendix: 1,500 words)."""
    style_budget: int = 500
    """Tokens of retrieved style context (paper appendix: 500 words)."""
    embedding_model: str = ""
    """Optional sentence-transformers model for retrieval; empty = lexical BM25 only."""
    general_data: str = ""
    """Deprecated alias of the top-level `general:` (a `messages` JSONL); used only when `general` is not set."""
    general_per_stage: int = 8
    """Stylised general samples per stage."""
    negatives: list[str] = field(default_factory=lambda: list(CONSTRUCTED_NEGATIVES))
    """Rejected-answer material to produce for automated DPO."""
    test_fraction: float = 0.2
    """Share of seed passages whose samples are held out."""
    dedup_threshold: float = 0.7
    """Questions whose character-shingle Jaccard similarity (MinHash estimate) reaches this are near-duplicates."""
    temperature: float = 0.7
    """Teacher sampling temperature."""
    max_tokens: int = 1024
    """Teacher output budget per request."""
    attempts: int = 3
    """Tries per item when the teacher output is rejected by validation."""


GENERAL_DATASET_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")  # written by save_to_disk
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_PATH_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".arrow", ".txt")


@dataclass
class GeneralConfig:
    """General instruction data: re-answered in the persona's voice by construct, mixed raw into SFT. Written in YAML
    as a mapping or a short string (the source)."""

    source: str = ""
    """A `messages` JSONL file or a `datasets` save_to_disk directory (relative to persona.yaml), or a Hugging Face
    dataset id such as HuggingFaceH4/ultrachat_200k; empty = the built-in set for the project language."""
    split: str = "train"
    """Split of a dataset id or of a saved DatasetDict (UltraChat: train_sft)."""
    size: int = 0
    """Most conversations taken, sampled with the project seed (0 = all)."""
    field: str = "messages"
    """Column of a dataset holding the list of {role, content} turns."""

    def __post_init__(self) -> None:
        self.source = self.source.strip()
        if self.size < 0:
            raise ValueError(f"general.size must be 0 (all) or a number of conversations, got {self.size}")
        if not self.split.strip():
            raise ValueError("general.split must name a split, e.g. train (or train_sft for UltraChat)")
        if not self.field.strip():
            raise ValueError("general.field must name the column holding the turns, e.g. messages")

    def locate(self, root: Path) -> tuple[str, Path | None]:
        """(kind, path): builtin; jsonl (a file); disk (a save_to_disk directory); hub (what datasets.load_dataset
        reads: a dataset id, path None, or a local data directory); missing (a path that does not exist)."""
        if not self.source:
            return "builtin", None
        path = (root / Path(self.source).expanduser()).resolve()
        if path.is_file():
            return "jsonl", path
        if path.is_dir():
            return ("disk" if any((path / m).is_file() for m in GENERAL_DATASET_MARKERS) else "hub"), path
        if _path_like(self.source) or not HUB_ID.match(self.source):
            return "missing", path
        return "hub", None


def _path_like(source: str) -> bool:
    """Whether a general source is written as a path rather than a dataset id."""
    return source.startswith((".", "/", "~", "\\")) or source.lower().endswith(_PATH_SUFFIXES)


@dataclass
class SFTConfig:
    """Supervised fine-tuning."""

    method: Literal["lora", "qlora", "full"] = "lora"
    """lora (default), qlora (needs a GPU and bitsandbytes) or full fine-tuning."""
    lora_r: int = 16
    """LoRA rank."""
    lora_alpha: int = 32
    """LoRA scaling."""
    lora_dropout: float = 0.05
    """LoRA dropout."""
    target_modules: str = "all-linear"
    """Modules that get LoRA adapters."""
    epochs: float = 1.0
    """Passes over the mixed data."""
    max_steps: int = -1
    """Stop after this many optimizer steps (-1 = use epochs)."""
    learning_rate: float = 2e-4
    """Peak learning rate."""
    token_lr_ratio: float = 10.0
    """Learning rate of the trained token rows (turn markers, time tokens) relative to learning_rate: an untrained
    end-of-turn row must move far from the unused tokens it sits among before the model can stop (lora/qlora)."""
    batch_size: int = 4
    """Sequences per device per step."""
    grad_accum: int = 1
    """Gradient accumulation steps."""
    max_length: int = 512
    """Longest training sequence in tokens."""
    repeat: int = 5
    """Times the personified data is repeated in the mix (paper: 5)."""
    general_ratio: float = 0.25
    """General-data samples per personified sample (after repetition)."""
    keep_cot: bool = True
    """Train the model to emit the analysis before the response (paper); false = responses only."""
    temporal_labels: Literal["text", "tokens"] = "text"
    """Stage label as plain text or as the paper's special tokens <TIME-I>, <TIME-II>, ..."""
    warmup_ratio: float = 0.05
    """Share of steps spent warming up the learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    save_steps: int = 50
    """Checkpoint interval in optimizer steps (for resuming)."""


@dataclass
class DPOConfig:
    """Automated DPO on top of the SFT model."""

    beta: float = 0.1
    """DPO temperature."""
    sft_weight: float = 0.0
    """Weight of a language-modelling loss on the chosen answers added to the DPO loss (RPO, Pang et al. 2024);
    on a few hundred pairs it keeps DPO from trading the chosen answers' likelihood for a wider margin."""
    learning_rate: float = 5e-5
    """Peak learning rate (LoRA)."""
    epochs: float = 1.0
    """Passes over the pairs."""
    max_steps: int = -1
    """Stop after this many optimizer steps (-1 = use epochs)."""
    batch_size: int = 2
    """Pairs per device per step."""
    grad_accum: int = 1
    """Gradient accumulation steps."""
    max_length: int = 512
    """Longest prompt + answer in tokens."""
    negative_types: list[str] = field(default_factory=lambda: list(NEGATIVE_TYPES))
    """Kinds of rejected answers used."""
    pairs_per_sample: int = 2
    """Most pairs built from one sample."""
    max_similarity: float = 0.9
    """Pairs whose chosen and rejected are at least this similar are dropped."""
    save_steps: int = 50
    """Checkpoint interval in optimizer steps."""


@dataclass
class EvalConfig:
    """Evaluation of the prompted base model and the tuned models."""

    models: list[str] = field(default_factory=lambda: ["base", "sft", "dpo"])
    """Models under test: base, rag, sft, dpo, or an endpoint spec such as openai:gpt-4o-mini."""
    max_probes: int = 80
    """Most probes generated from the held-out data (at least 60 are needed to detect a 0.3 difference)."""
    max_new_tokens: int = 160
    """Generation budget per answer."""
    probes: str = ""
    """Extra probe file (JSONL) scored in addition to the generated probes."""
    interview: str = ""
    """Interview file (JSON list or JSONL of questions, relative to the project directory) answered by every model and
    rated 1-7 by the judge on the Character-LLM rubric; see docs/interviews.md."""
    heldout_questions: int = 20
    """Most held-out (test split) questions per stage for distinction, precision and ranking."""
    temperature: float = 0.7
    """Sampling temperature of the answers compared by the intra/stage/inter BLEU scores."""
    think: bool = True
    """Let local models write their [Analysis] before the [Response]; false starts their answers at [Response], so a
    short max_new_tokens still reaches the answer (endpoints are never forced)."""
    batch_size: int = 32
    """Prompts generated together by local models (one decoding pass serves the whole batch)."""
    rag_tokens: int = 400
    """Tokens of retrieved material put in the system prompt of the 'rag' baseline."""
    ipip: bool = True
    """Administer the IPIP-NEO-120 Big Five inventory in character."""
    ipip_stages: list[str] = field(default_factory=list)
    """Stage ids at which the inventory is administered; empty = every stage; "first"/"last" name those stages."""
    ipip_interview_items: int = 30
    """Items also asked as open interview questions and rated by the judge (0 = none; spread over the 30 facets)."""
    target: dict[str, dict[str, float | str]] = field(default_factory=dict)
    """Target Big Five profile per stage id: domain letter (O, C, E, A, N) -> mean on the 1-5 scale, or the label
    "high" or "low" (InCharacter dimension accuracy)."""
    target_from_teacher: bool = True
    """Without a target, let the teacher estimate one per stage from the material."""
    judge_items: int = 40
    """Most items per model and judged criterion (0 = no judge)."""
    judge_repeats: int = 3
    """Independent judge samples per item (mean and confidence interval over them)."""
    judge_retries: int = 2
    """Extra attempts when a judge reply cannot be parsed; still unparseable = missing, never a score."""
    judge_max_tokens: int = 96
    """Judge output budget per verdict."""
    embedding_model: str = ""
    """sentence-transformers model for embedding-based distinction (empty = construct.embedding_model, else skipped)."""
    base_prompting: str = "auto"
    """How the base and rag baselines are prompted: chat (the persona template), few_shot (a plain-text transcript
    with training-split examples) or auto (few_shot for a base model without a chat template of its own)."""

    def __post_init__(self) -> None:
        for name in ("max_probes", "heldout_questions", "ipip_interview_items", "judge_items", "judge_retries"):
            if getattr(self, name) < 0:
                raise ValueError(f"eval.{name} must not be negative, got {getattr(self, name)}")
        if self.base_prompting not in ("auto", "chat", "few_shot"):
            raise ValueError(f"eval.base_prompting must be auto, chat or few_shot, got {self.base_prompting!r}")
        if self.judge_repeats < 1 or self.batch_size < 1 or self.max_new_tokens < 1:
            raise ValueError("eval.judge_repeats, eval.batch_size and eval.max_new_tokens must be at least 1")
        for stage, profile in self.target.items():
            for domain, value in profile.items():
                if domain not in ("O", "C", "E", "A", "N"):
                    raise ValueError(f"eval.target.{stage}: unknown domain {domain!r}; use O, C, E, A, N")
                if isinstance(value, str):
                    if value.strip().lower() not in TARGET_LABELS:
                        raise ValueError(f"eval.target.{stage}.{domain}: {value!r} is neither a number 1-5 nor a "
                                         f"label; use {' or '.join(TARGET_LABELS)} (any case), or a mean such as 3.5")
                    profile[domain] = value.strip().lower()
                elif not 1.0 <= float(value) <= 5.0:
                    raise ValueError(f"eval.target.{stage}.{domain}: {value} is outside the 1-5 scale")


@dataclass
class DecodingConfig:
    """How the persona's answers are decoded, the same in eval, chat, serve, the arena and the smoke tests."""

    repetition_penalty: float | None = None
    """Penalty (>= 1.0) on tokens the answer already contains; empty = by model size (1.1 up to 1.5B parameters,
    else 1.0 = off)."""
    no_repeat_ngram: int | None = None
    """Ban tokens that would repeat an n-gram of the answer; empty = by model size (4 up to 1.5B parameters, else
    0 = off)."""

    def __post_init__(self) -> None:
        if self.repetition_penalty is not None and not 1.0 <= self.repetition_penalty <= 2.0:
            raise ValueError(f"decoding.repetition_penalty must be from 1.0 to 2.0, got {self.repetition_penalty}")
        if self.no_repeat_ngram is not None and self.no_repeat_ngram < 0:
            raise ValueError(f"decoding.no_repeat_ngram must be 0 (off) or more, got {self.no_repeat_ngram}")


@dataclass
class Project:
    """A persona project: persona.yaml plus its material files."""

    name: str
    """The persona's name."""
    stages: list[StageConfig]
    """Life stages in chronological order."""
    language: Literal["en", "zh"] = "en"
    """Language of the material and of generated data."""
    aliases: list[str] = field(default_factory=list)
    """Other names the material uses for the persona (a maiden name, a title), so rules can tell them apart."""
    teacher: ModelSpec = field(default_factory=ModelSpec)
    """LLM that constructs data."""
    base_model: ModelSpec = field(default_factory=lambda: ModelSpec(backend="default"))
    """Model that is tuned (default or hf)."""
    judge: ModelSpec | None = None
    """LLM that scores answers in evaluation (defaults to the teacher)."""
    output_dir: str = "out"
    """Where stage outputs go, relative to persona.yaml (inside the project unless allow_outside_paths; --output
    on the command line may point anywhere)."""
    allow_outside_paths: bool = False
    """Let material files and output_dir lie outside the project directory, through ../ or absolute paths or
    symlinks; off by default, so a project copied from someone else reads and writes only inside its own folder."""
    on_changed_output: Literal["stop", "rerun"] = "stop"
    """What to do when a finished stage's data file no longer has the sha256 its manifest recorded (an edit, a
    truncated copy, a bad disk): stop with a message naming the file (nothing is overwritten), or rerun the stage."""
    seed: int = 42
    """Seed for sampling, splitting and training."""
    preset: str = "default"
    """Named set of sizes: default, demo (about 15 minutes on 2 CPU cores) or cpu (sized for about an hour)."""
    peers: list[str] = field(default_factory=list)
    """Other persona project directories, for cross-persona negatives and distinction metrics."""
    ingest: IngestConfig = field(default_factory=IngestConfig)
    general: GeneralConfig = field(default_factory=GeneralConfig)
    """General instruction data (a JSONL, a saved dataset or a Hugging Face id); empty = the built-in set."""
    construct: ConstructConfig = field(default_factory=ConstructConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    decoding: DecodingConfig = field(default_factory=DecodingConfig)
    root: Path = field(default=Path("."), metadata={"internal": True})
    """Directory holding persona.yaml (set by the loader)."""

    @property
    def slug(self) -> str:
        """Filesystem- and URL-safe persona id, e.g. 'ada-lovelace'."""
        return slugify(self.name)

    @property
    def output(self) -> Path:
        """Absolute output directory."""
        return (self.root / self.output_dir).resolve()

    def stage(self, stage_id: str) -> StageConfig:
        """Return the stage with this id or raise a ConfigError listing the valid ones."""
        for stage in self.stages:
            if stage.id == stage_id:
                return stage
        raise ConfigError(f"unknown stage {stage_id!r}; stages of {self.name}: {', '.join(s.id for s in self.stages)}")

    def material_path(self, relative: str) -> Path:
        """Absolute path of a file or directory named in persona.yaml (symlinks resolved; not checked)."""
        return (self.root / relative).resolve()

    def material_file(self, relative: str) -> Path:
        """Absolute path of a stage's material file; a ConfigError when it leaves the project (see `contained`)."""
        problem = contained(self.root, relative, self.allow_outside_paths)
        if problem:
            raise ConfigError(f"material {problem}", source=str(self.root / PROJECT_FILE))
        return self.material_path(relative)


def contained(root: Path, relative: str, allow_outside: bool) -> str | None:
    """Why `relative` (a path in persona.yaml) may not be used, or None: it must stay inside the project directory
    `root`, written with ../ or an absolute path or reached through a symlink, unless the user allowed it."""
    if allow_outside:
        return None
    root = root.resolve()
    written = Path(os.path.normpath(root / relative))  # ../ collapsed as written; symlinks below
    fix = (f"move it into {root} (or point to a copy there), or set `allow_outside_paths: true` in {PROJECT_FILE} "
           "if you mean it")
    if not written.is_relative_to(root):
        return f"{relative!r} is outside the project directory ({written}); {fix}"
    target = written.resolve()
    if not target.is_relative_to(root):
        return f"{relative!r} is a symlink to {target}, outside the project directory; {fix}"
    return None


PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    # Sized so `persllm run examples/ada-lovelace --preset demo` finishes in about 15 minutes on 2 CPU cores
    # (measured on the examples beside other jobs: construct 1-3 min, SFT 60 steps 4-6 min, DPO 10 steps with the
    # held-out preference check 2 min, eval 2 min), plus the one-time model preparation.
    "demo": {
        # Every passage seeds questions: the grounded construct takes about a minute for the examples, and 60 steps
        # over ~90 varied samples generalise where 60 steps over ~30 were memorised (benchmarks/README.md, recipe).
        # Induced items are weighted up from the default 0.3: they need no particular passage, and opinion slots run
        # out of the persona's own views (most are dropped as no_view on the examples).
        "construct": {"questions_per_passage": 2, "max_per_stage": 0, "general_per_stage": 6, "max_tokens": 256,
                      "kinds": {"ordinary": 0.4, "opinion": 0.2, "induced": 0.4}},
        # Responses only: a 270M model trained for minutes on [Analysis] ... [Response] ... leaks the analysis into
        # its answers and loops (85-97% of eval answers off format); trained on responses it keeps the format
        # (benchmarks/README.md, recipe).
        "sft": {"max_steps": 60, "batch_size": 4, "max_length": 320, "repeat": 1, "save_steps": 30,
                "keep_cot": False},
        # DPO plus the chosen answers' LM loss: plain DPO lowered Ada's SFT model (9 -> 3 of 30 probes), with the LM
        # term it kept more of it on both examples (benchmarks/README.md, recipe, candidate rpo).
        "dpo": {"max_steps": 10, "batch_size": 2, "max_length": 320, "pairs_per_sample": 1, "save_steps": 5,
                "sft_weight": 1.0},
        # eval: 60 probes: at 30 a 17-point paired gain (6 vs 1 of 30) was still inside noise (docs/probes.md);
        # per model one decoding pass (~76 rows x 80 tokens), one IPIP pass per stage and one scoring pass.
        "eval": {"max_probes": 60, "max_new_tokens": 80, "heldout_questions": 2, "think": False,
                 "ipip_interview_items": 0, "judge_items": 1, "judge_repeats": 1, "judge_retries": 0,
                 "judge_max_tokens": 24},
    },
}


def slugify(name: str) -> str:
    """Lowercase ASCII slug of a name ('Ada Lovelace' -> 'ada-lovelace'); CJK names keep their characters."""
    slug = re.sub(r"[^\w]+", "-", name.strip().lower(), flags=re.UNICODE).strip("-_")
    return slug or "persona"


def load_project(path: str | Path, overrides: list[str] | None = None, preset: str | None = None) -> Project:
    """Load a project directory (or its persona.yaml), apply preset and `a.b=value` overrides, validate everything."""
    file = Path(path)
    if file.is_dir():
        file = file / PROJECT_FILE
    if not file.exists():
        hint = f" (run `persllm init {Path(path)}` to create one)" if not file.parent.exists() or file.parent.is_dir() else ""
        raise ConfigError(f"no {PROJECT_FILE} found at {file}{hint}")
    data = _read_yaml(file)
    errors: list[str] = []
    merged = _merge_layers(data, preset, overrides or [], errors)
    project = _build(Project, merged, "", errors)
    if project is not None:
        project.root = file.parent.resolve()
        errors.extend(_check_project(project))
        from_command_line = any(item.partition("=")[0].strip() == "output_dir" for item in overrides or [])
        errors.extend(_check_output(project, from_command_line))
    if errors or project is None:
        raise ConfigError(errors or ["invalid project"], source=str(file))
    return project


def _read_yaml(file: Path) -> dict[str, Any]:
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"not valid UTF-8 (byte {exc.start}); save the file as UTF-8", source=str(file)) from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"not valid YAML: {str(exc).splitlines()[0]} {_yaml_where(exc)}", source=str(file)) from exc
    if not isinstance(data, dict):
        raise ConfigError("expected a mapping with at least `name` and `stages`", source=str(file))
    return data


def _yaml_where(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    return f"(line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""


def _merge_layers(data: dict[str, Any], preset: str | None, overrides: list[str], errors: list[str]) -> dict[str, Any]:
    """Defaults < preset < persona.yaml < --set overrides."""
    name = preset or data.get("preset") or "default"
    if name not in PRESETS:
        close = difflib.get_close_matches(str(name), PRESETS, n=1)
        errors.append(f"unknown preset {name!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
                      + f"; presets: {', '.join(PRESETS)}")
        name = "default"
    merged = _deep_merge(copy.deepcopy(PRESETS[name]), data)
    merged["preset"] = name
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            errors.append(f"override {item!r} must look like key.sub=value")
            continue
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        _set_dotted(merged, key.strip(), value)
    return merged


_WHOLE_MAPPINGS = {"kinds"}  # a mix given in persona.yaml replaces the preset's, key by key merging would distort it


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict) and key not in _WHOLE_MAPPINGS:
            base[key] = _deep_merge(base[key], value)
        else:
            base[key] = value
    return base


# Sized for about an hour on 2 CPU cores (30-40 minutes idle): the demo's recipe with what differs. The demo's 60
# steps (about two epochs) teach the 270M model the persona's voice but not its facts (Ada's demo SFT model recalls 2
# of 21 trained facts asked in training's words); about eight epochs recall 30 of 40. So the hour goes to fitting the
# facts: four questions per passage (more wordings of each fact), more general requests, 400 SFT steps, more probes.
# DPO keeps the demo's 10 steps: 20 took the memorised SFT model's identity answers (鲁迅 7 -> 2 of 8). Pooled over
# project seeds 42 and 7 (n=160), Ada's cpu DPO model beats the demo's DPO model by +10 points [+4, +17], 鲁迅's by
# +4 [-0, +10] (benchmarks/README.md, recipe, cpu and cpu-seed-7).
PRESETS["cpu"] = _deep_merge(copy.deepcopy(PRESETS["demo"]), {
    "construct": {"questions_per_passage": 4, "general_per_stage": 10},
    "sft": {"max_steps": 400, "save_steps": 100},
    "eval": {"max_probes": 80, "max_new_tokens": 96, "heldout_questions": 4},
})


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    *parents, last = key.split(".")
    node = data
    for part in parents:
        current = node.get(part)
        if isinstance(current, str) and node is data and part == "general":  # `general: SOURCE` gains sub-keys
            current = {"source": current}
        elif isinstance(current, str):  # a model shorthand such as "openai:m@url" gains sub-keys: expand it first
            try:
                current = _spec_mapping(parse_model_spec(current))
            except ValueError:
                current = None
        if not isinstance(current, dict):
            current = {}
        node[part] = current
        node = current
    node[last] = value


def _spec_mapping(spec: ModelSpec) -> dict[str, Any]:
    """The non-default fields of a ModelSpec, as they would be written in YAML."""
    default = ModelSpec()
    return {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec)
            if getattr(spec, f.name) != getattr(default, f.name) or f.name == "backend"}


def _build(cls: type, data: Any, where: str, errors: list[str]) -> Any:
    """Build dataclass `cls` from `data`, appending every problem (with its dotted key) to `errors`."""
    if cls is ModelSpec and isinstance(data, str):
        try:
            return parse_model_spec(data)
        except ValueError as exc:
            errors.append(f"{where}: {exc}")
            return None
    if cls is GeneralConfig and (data is None or isinstance(data, str)):  # `general:` empty, or `general: SOURCE`
        data = {"source": data or ""}
    elif cls is GeneralConfig and not isinstance(data, dict):
        errors.append(f"{where}: expected a path or a dataset id, or a mapping with source, split, size and field; "
                      f"got {type(data).__name__}")
        return None
    if not isinstance(data, dict):
        errors.append(f"{where or 'top level'}: expected a mapping, got {type(data).__name__}")
        return None
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.6)
            errors.append(f"unknown key {path!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
                          + f"; valid keys here: {', '.join(fields)}")
            continue
        converted = _convert(hints[key], value, path, errors)
        if converted is not _INVALID:
            kwargs[key] = converted
    # Invalid optional keys fall back to their defaults (the error is already recorded) so that later checks still
    # run and the user sees every problem in one go; a missing or invalid required key makes the object unbuildable.
    missing = [n for n, f in fields.items() if n not in data and _required(f)]
    for name in missing:
        errors.append(f"missing required key {(where + '.' if where else '') + name!r}")
    if any(_required(fields[n]) and n not in kwargs for n in fields if n in data) or missing:
        return None
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        errors.append(f"{where or 'top level'}: {exc}")
        return None


_INVALID = object()


def _required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _convert(hint: Any, value: Any, path: str, errors: list[str]) -> Any:
    """Check `value` against a type hint, with the few friendly coercions users expect (1835 -> "1835")."""
    origin = typing.get_origin(hint)
    if origin in (types.UnionType, typing.Union):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        for option in options[:-1]:  # e.g. float | str: the first type the value fits, else the last one's error
            scratch: list[str] = []
            converted = _convert(option, value, path, scratch)
            if not scratch:
                return converted
        return _convert(options[-1], value, path, errors)
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):  # a dataclass hint is a class, never an instance
        built = _build(hint, value, path, errors)
        return _INVALID if built is None else built
    if origin is Literal:
        choices = typing.get_args(hint)
        if value in choices:
            return value
        close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        errors.append(f"{path}: {value!r} is not one of {', '.join(map(str, choices))}"
                      + (f" (did you mean {close[0]!r}?)" if close else ""))
        return _INVALID
    if origin is list:
        if not isinstance(value, list):
            errors.append(f"{path}: expected a list, got {type(value).__name__}")
            return _INVALID
        (item,) = typing.get_args(hint)
        items = [_convert(item, v, f"{path}[{i}]", errors) for i, v in enumerate(value)]
        return _INVALID if any(i is _INVALID for i in items) else items
    if origin is dict:
        if not isinstance(value, dict):
            errors.append(f"{path}: expected a mapping, got {type(value).__name__}")
            return _INVALID
        _, vtype = typing.get_args(hint)
        out = {str(k): _convert(vtype, v, f"{path}.{k}", errors) for k, v in value.items()}
        return _INVALID if any(v is _INVALID for v in out.values()) else out
    return _scalar(hint, value, path, errors)


def _scalar(hint: Any, value: Any, path: str, errors: list[str]) -> Any:
    if hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    elif hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _FLOAT.match(value.strip()):  # YAML 1.1 reads 4e-4 (no dot) as a string
            return float(value)
    elif hint is Path:
        return Path(str(value))
    else:
        return value
    errors.append(f"{path}: expected {hint.__name__}, got {value!r}")
    return _INVALID


def _check_project(project: Project) -> list[str]:
    """Semantic checks that need the whole project: stage ids, material files, mixes."""
    errors: list[str] = []
    if not project.name.strip():
        errors.append("name: must not be empty")
    if not project.stages:
        errors.append("stages: at least one stage is needed")
    seen: set[str] = set()
    for i, stage in enumerate(project.stages):
        where = f"stages[{i}] ({stage.id})"
        if not STAGE_ID.match(stage.id):
            errors.append(f"{where}.id: {stage.id!r} must be lowercase letters, digits, '-' or '_' (max 32 chars)")
        if stage.id in seen:
            errors.append(f"{where}.id: stage id {stage.id!r} is used twice; each stage needs its own id")
        seen.add(stage.id)
        if not stage.label.strip():
            errors.append(f"{where}.label: must not be empty")
        for key in ("label", "description"):
            if getattr(stage, key).strip().upper().startswith("TODO"):
                errors.append(f"{where}.{key}: still the TODO placeholder from `persllm init`; replace it")
        for key in ("knowledge", "style"):
            errors.extend(_check_material(project, getattr(stage, key), f"{where}.{key}"))
    mix = project.construct.kinds
    for kind in mix:
        if kind not in ("ordinary", "opinion", "induced"):
            close = difflib.get_close_matches(kind, ["ordinary", "opinion", "induced"], n=1)
            errors.append(f"construct.kinds: unknown kind {kind!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    if mix and (any(v < 0 for v in mix.values()) or sum(mix.values()) <= 0):
        errors.append("construct.kinds: weights must be non-negative and not all zero")
    if not 0 < project.construct.test_fraction < 1:
        errors.append(f"construct.test_fraction: must be between 0 and 1, got {project.construct.test_fraction}")
    if not BACKENDS[project.base_model.backend].tunable:
        tunable = spoken([repr(k.form) for k in BACKENDS.values() if k.tunable])
        errors.append(f"base_model: a tuned model must be {tunable}, got {project.base_model.spec!r}")
    for key in ("construct.negatives", "dpo.negative_types"):
        section, attr = key.split(".")
        for value in getattr(getattr(project, section), attr):
            if value not in NEGATIVE_TYPES:
                close = difflib.get_close_matches(value, NEGATIVE_TYPES, n=1)
                errors.append(f"{key}: unknown negative type {value!r}"
                              + (f" (did you mean {close[0]!r}?)" if close else ""))
    if project.dpo.sft_weight < 0:
        errors.append(f"dpo.sft_weight: must be 0 (plain DPO) or more, got {project.dpo.sft_weight}")
    errors.extend(_check_general(project))
    return errors


def _check_output(project: Project, from_command_line: bool) -> list[str]:
    """output_dir must be a folder (or creatable as one), and inside the project unless allowed; one given on the
    command line (--output, --set output_dir=) is the user's explicit choice and may lie anywhere."""
    output = project.output
    if output.exists() and not output.is_dir():
        return [(f"output_dir: {output} is a file, not a folder; remove or rename the file, or choose another "
                 "output_dir (or --output)")]
    parent = next((p for p in output.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        return [(f"output_dir: {output} cannot be created because {parent} is a file; choose another output_dir "
                 "(or --output)")]
    problem = None if from_command_line else contained(project.root, project.output_dir, project.allow_outside_paths)
    return [f"output_dir: {problem} (or pass --output)"] if problem else []


def _check_general(project: Project) -> list[str]:
    general = project.general
    if general.source and project.construct.general_data:
        return [(f"general: {general.source!r} is set and so is the deprecated construct.general_data "
                 f"({project.construct.general_data!r}); remove construct.general_data")]
    kind, path = general.locate(project.root)
    if kind != "missing":
        return []
    if not _path_like(general.source) and not HUB_ID.match(general.source):
        return [(f"general: {general.source!r} is neither a file or directory under {project.root} nor a Hugging "
                 "Face dataset id (owner/name, e.g. HuggingFaceH4/ultrachat_200k)")]
    close = _close_file(path) if path is not None else None
    hint = f" (did you mean {close!r}?)" if close else ""
    return [(f"general: {general.source!r} not found in {project.root}{hint}; give a messages JSONL, a datasets "
             "save_to_disk directory, or a Hugging Face dataset id")]


def _check_material(project: Project, relative: str, where: str) -> list[str]:
    if not relative:
        return [f"{where}: no file given"]
    problem = contained(project.root, relative, project.allow_outside_paths)
    if problem:
        return [f"{where}: {problem}"]
    path = project.material_path(relative)
    if not path.exists():
        close = _close_file(path)
        return [f"{where}: file {relative!r} not found in {project.root}" + (f" (did you mean {close!r}?)" if close else "")]
    if not path.is_file():
        return [f"{where}: {relative!r} is not a file"]
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        return [f"{where}: {relative!r} is not valid UTF-8 (line {line}); re-save it as UTF-8"]
    if "\x00" in text:
        return [f"{where}: {relative!r} looks like a binary file; material must be UTF-8 text, one paragraph per line"]
    if not text.strip():
        return [f"{where}: {relative!r} is empty; add one paragraph per line"]
    return []


def _close_file(path: Path) -> str | None:
    if not path.parent.is_dir():
        return None
    names = [p.name for p in path.parent.iterdir() if p.is_file()]
    close = difflib.get_close_matches(path.name, names, n=1, cutoff=0.6)
    return close[0] if close else None


def resolved_dict(obj: Any) -> Any:
    """Plain-data view of a config object, for the resolved config files written beside outputs."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: resolved_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj) if not f.metadata.get("internal")}
    if isinstance(obj, (list, tuple)):
        return [resolved_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: resolved_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj
