"""The one chat format persllm owns: turn markup, persona system prompts, temporal labels and the CoT answer format.

Training, evaluation, serving and GGUF export all render conversations through this module, so a tuned model sees
exactly the text at inference that it saw in training.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from persllm.text import time_phrase
from persllm.types import Message

if TYPE_CHECKING:
    from persllm.config import Project

# Turn markers in order of preference; the first pair the tokenizer already knows is used, else the first is added.
TURN_MARKERS: tuple[tuple[str, str], ...] = (("<start_of_turn>", "<end_of_turn>"), ("<|im_start|>", "<|im_end|>"))
VERSION = "4"  # bump when the rendered prompt or answer format changes: training stages depend on it
ANALYSIS_TAG = "[Analysis]"
RESPONSE_TAG = "[Response]"
_ROMAN = ("I", "II", "III", "IV", "V", "VI", "VII", "VIII", "IX", "X", "XI", "XII")


def chat_template(start: str = TURN_MARKERS[0][0], end: str = TURN_MARKERS[0][1], training: bool = True) -> str:
    """Jinja chat template; `training` adds TRL's {% generation %} markers (llama.cpp cannot parse those).

    An assistant turn ends at its end marker, with no newline after it (other turns end with "marker\\n"): the
    assistant's text is then exactly what is trained, so LLaMA-Factory, which labels everything its parsed assistant
    slot holds, and axolotl, which labels content plus `eot_tokens`, both train the labels persllm trains.
    """
    open_gen, close_gen = ("{% generation %}", "{% endgeneration %}") if training else ("", "")
    return (
        "{{ bos_token if bos_token else '' }}"
        "{%- for message in messages -%}"
        "{%- if message['role'] == 'assistant' -%}"
        f"{{{{ '{start}assistant\\n' }}}}{open_gen}{{{{ message['content'] | trim }}}}{{{{ '{end}' }}}}{close_gen}"
        "{%- else -%}"
        f"{{{{ '{start}' + message['role'] + '\\n' }}}}{{{{ message['content'] | trim }}}}{{{{ '{end}\\n' }}}}"
        "{%- endif -%}"
        "{%- endfor -%}"
        f"{{%- if add_generation_prompt -%}}{{{{ '{start}assistant\\n' }}}}{{%- endif -%}}"
    )


def markers_for(vocab: dict[str, int] | set[str]) -> tuple[str, str]:
    """Turn markers to use with a tokenizer vocabulary: the first pair it already has, else the default pair."""
    for start, end in TURN_MARKERS:
        if start in vocab and end in vocab:
            return start, end
    return TURN_MARKERS[0]


def time_token(index: int) -> str:
    """The paper's special token for the stage at `index` (0-based): <TIME-I>, <TIME-II>, ..."""
    if not 0 <= index < len(_ROMAN):
        raise ValueError(f"at most {len(_ROMAN)} stages can have time tokens, got index {index}")
    return f"<TIME-{_ROMAN[index]}>"


@dataclass(frozen=True)
class PersonaContext:
    """What the system prompt needs to know about one persona at one stage."""

    name: str
    stage_id: str
    stage_index: int
    label: str
    description: str = ""
    language: str = "en"
    temporal_labels: str = "text"  # "text" or "tokens"
    keep_cot: bool = True  # answers in the [Analysis] ... [Response] format (else the response alone)


def context_for(project: Project, stage_id: str) -> PersonaContext:
    """The persona context of one stage of a project, with the project's temporal-label mode."""
    stage = project.stage(stage_id)
    index = [s.id for s in project.stages].index(stage_id)
    return PersonaContext(name=project.name, stage_id=stage.id, stage_index=index, label=stage.label,
                          description=stage.description, language=project.language,
                          temporal_labels=project.sft.temporal_labels, keep_cot=project.sft.keep_cot)


# Short on purpose: it precedes every training sample, and a small CPU-trained model pays for each token.
_SYSTEM = {
    "en": ("You are {name}. {time}{description}\n"
           "Stay in character, in your own voice, knowing only what you know by then; correct false premises."),
    "zh": ("你是{name}。{time}{description}\n"
           "保持角色，用自己的口吻，只知道此时知道的事；指出错误前提。"),
}
# Only for the CoT format: a model trained on responses alone would otherwise be told of tags it never writes.
_COT = {"en": " Think in [Analysis], then answer in [Response].", "zh": "先在[Analysis]中思考，再在[Response]中回答。"}
_TIME = {"en": "It is {label}. ", "zh": "现在是{label}。"}


def system_prompt(ctx: PersonaContext) -> str:
    """The persona's system prompt at one stage (time in text unless the stage is marked by a special token)."""
    lang = ctx.language if ctx.language in _SYSTEM else "en"
    time = "" if ctx.temporal_labels == "tokens" else _TIME[lang].format(label=time_phrase(ctx.label, lang))
    description = ctx.description.strip()
    if description and lang == "en" and not description.endswith((".", "!", "?")):
        description += "."
    return _SYSTEM[lang].format(name=ctx.name, time=time, description=description) + (_COT[lang] if ctx.keep_cot else "")


def user_turn(ctx: PersonaContext, text: str) -> str:
    """The user's message as the model sees it: prefixed by the stage's time token in token mode."""
    if ctx.temporal_labels == "tokens":
        return f"{time_token(ctx.stage_index)} {text.strip()}"
    return text.strip()


def prompt_messages(ctx: PersonaContext, question: str, history: Sequence[Message] = ()) -> list[Message]:
    """System prompt, optional earlier turns, and the question: the exact prompt used in training and inference."""
    messages = [Message("system", system_prompt(ctx))]
    for turn in history:
        content = user_turn(ctx, turn.content) if turn.role == "user" else turn.content
        messages.append(Message(turn.role, content))
    messages.append(Message("user", user_turn(ctx, question)))
    return messages


def format_answer(analysis: str, response: str, keep_cot: bool = True) -> str:
    """Assistant text in persllm's CoT format: '[Analysis] ...' then '[Response] ...'."""
    if not keep_cot or not analysis.strip():
        return f"{RESPONSE_TAG} {response.strip()}" if keep_cot else response.strip()
    return f"{ANALYSIS_TAG} {analysis.strip()}\n{RESPONSE_TAG} {response.strip()}"


_RESPONSE_RE = re.compile(r"\[\s*response\s*\]\s*:?", re.IGNORECASE)
_ANALYSIS_RE = re.compile(r"^\s*\[\s*analysis\s*\]\s*:?", re.IGNORECASE)
_ANY_TAG_RE = re.compile(r"\[\s*(?:analysis|response)\s*\]", re.IGNORECASE)


def split_answer(text: str) -> tuple[str, str]:
    """Split model output into (analysis, response); text without tags is all response.

    The response ends at the next tag: a model that starts a second "[Analysis]" after answering has left the
    format, and what follows is not part of the answer.
    """
    match = _RESPONSE_RE.search(text)
    if match is None:
        if _ANALYSIS_RE.match(text):
            return _ANALYSIS_RE.sub("", text, count=1).strip(), ""
        return "", text.strip()
    analysis = _ANALYSIS_RE.sub("", text[: match.start()], count=1).strip()
    rest = text[match.end():]
    after = _ANY_TAG_RE.search(rest)
    return analysis, (rest[: after.start()] if after else rest).strip()


def has_response(text: str) -> bool:
    """True if the output has a [Response] tag (in any spacing or case the parser accepts)."""
    return _RESPONSE_RE.search(text) is not None


def has_tag(text: str) -> bool:
    """True if the output contains an [Analysis] or [Response] tag anywhere."""
    return _ANY_TAG_RE.search(text) is not None


def tag_after_response(text: str) -> bool:
    """True if another [Analysis] or [Response] follows the response: the model went on past its answer."""
    match = _RESPONSE_RE.search(text)
    return match is not None and _ANY_TAG_RE.search(text, match.end()) is not None


def visible_answer(text: str) -> str:
    """What a user sees: the response without the analysis; an analysis that never reached [Response] shows nothing.

    Text without any tag (a model not trained on the format) is shown whole.
    """
    return split_answer(text)[1]


def render(messages: Sequence[Message], start: str = TURN_MARKERS[0][0], end: str = TURN_MARKERS[0][1],
           bos: str = "", add_generation_prompt: bool = False) -> str:
    """Render messages exactly as chat_template() does, without Jinja (for llama.cpp raw prompts and tests)."""
    parts = [bos]
    for message in messages:
        newline = "" if message.role == "assistant" else "\n"
        parts.append(f"{start}{message.role}\n{message.content.strip()}{end}{newline}")
    if add_generation_prompt:
        parts.append(f"{start}assistant\n")
    return "".join(parts)
