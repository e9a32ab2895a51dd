"""A conversation with a persona at one life stage, through any backend, in the exact training prompt format."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from persllm import template
from persllm.backends.base import Backend, GenParams
from persllm.config import Project
from persllm.types import Message
from persllm.workspace import write_jsonl, write_text


@dataclass
class Turn:
    """One exchange as it happened."""

    stage: str
    question: str
    raw: str  # everything the model produced, analysis included
    model: str
    at: float = field(default_factory=time.time)

    @property
    def analysis(self) -> str:
        """The model's chain of thought ("" if it produced none)."""
        return template.split_answer(self.raw)[0]

    @property
    def answer(self) -> str:
        """What the persona says to the user."""
        return template.visible_answer(self.raw)


class Session:
    """Holds the stage and the recent history; `ask` streams the model's raw output."""

    def __init__(self, project: Project, backend: Backend, stage_id: str | None = None,
                 params: GenParams = GenParams(temperature=0.7, max_tokens=256), history_turns: int = 4) -> None:
        self.project = project
        self.backend = backend
        self.params = params
        self.history_turns = history_turns
        self.stage = project.stage(stage_id or project.stages[-1].id).id
        self.turns: list[Turn] = []
        self._history_start = 0  # turns before this index are forgotten (after /reset or a stage change)

    def set_stage(self, stage_id: str) -> None:
        """Move to another life stage; the history restarts, since the persona at another time never heard it."""
        self.stage = self.project.stage(stage_id).id
        self.reset()

    def reset(self) -> None:
        """Forget the conversation so far (the transcript keeps it)."""
        self._history_start = len(self.turns)

    def messages(self, question: str) -> list[Message]:
        """The prompt for the next question: system prompt of the stage, recent turns, the question."""
        recent = [t for t in self.turns[self._history_start:] if t.stage == self.stage][-self.history_turns:]
        history: list[Message] = []
        for turn in recent:  # earlier answers without their analysis: the model sees what the user saw
            history += [Message("user", turn.question), Message("assistant", turn.answer)]
        return template.prompt_messages(template.context_for(self.project, self.stage), question, history)

    def ask(self, question: str) -> Iterator[str]:
        """Stream the raw reply; the turn is recorded when the stream ends."""
        pieces: list[str] = []
        for piece in self.backend.stream(self.messages(question), self.params):
            pieces.append(piece)
            yield piece
        self.turns.append(Turn(self.stage, question, "".join(pieces), self.backend.name))

    def save(self, path: Path) -> Path:
        """Write the transcript as Markdown (.md) or JSON lines (anything else)."""
        if path.suffix.lower() == ".md":
            lines = [f"# Conversation with {self.project.name}\n"]
            for turn in self.turns:
                label = self.project.stage(turn.stage).label
                lines.append(f"**User** ({turn.stage}, {label}): {turn.question}\n")
                if turn.analysis:
                    lines.append(f"> *analysis:* {turn.analysis}\n")
                lines.append(f"**{self.project.name}**: {turn.answer}\n")
            write_text(path, "\n".join(lines))
        else:
            records = [{"stage": t.stage, "question": t.question, "analysis": t.analysis, "answer": t.answer,
                        "raw": t.raw, "model": t.model, "at": t.at} for t in self.turns]
            write_jsonl(path, records)
        return path


class AnswerFilter:
    """Streams only the response part: text before '[Response]' is held back (and dropped) unless shown, and a
    second tag after the response (a model starting another '[Analysis]') ends what is shown."""

    def __init__(self, show_analysis: bool) -> None:
        self.show = show_analysis
        self.buffer = ""
        self.passing = show_analysis
        self.started = show_analysis  # once True, text passes unchanged (no more stripping after the tag)
        self.pending = ""  # shown text held back because it may be the start of a tag
        self.closed = False

    def feed(self, piece: str) -> str:
        """Text to display now."""
        if self.show:
            return piece
        if self.closed:
            return ""
        if not self.passing:
            self.buffer += piece
            marker = self.buffer.lower().find(template.RESPONSE_TAG.lower())
            if marker < 0:
                return ""
            self.passing = True
            piece = self.buffer[marker + len(template.RESPONSE_TAG):]
            self.buffer = ""
        if not self.started:
            piece = piece.lstrip(" :\n")
            self.started = bool(piece)
        return self._cut(piece)

    def _cut(self, piece: str) -> str:
        """Text up to a tag (which closes the answer), holding back a tail that could still become one."""
        text = self.pending + piece
        self.pending = ""
        lowered = text.lower()
        found = [i for i in (lowered.find(t.lower()) for t in _TAGS) if i >= 0]
        if found:
            self.closed = True
            return text[: min(found)].rstrip()
        bracket = text.rfind("[")
        if bracket >= 0 and any(t.lower().startswith(lowered[bracket:]) for t in _TAGS):
            self.pending = text[bracket:]
            return text[:bracket]
        return text

    def finish(self) -> str:
        """Whatever is left: a reply without tags is shown whole rather than lost."""
        if self.show:
            return ""
        if self.passing:
            held, self.pending = ("" if self.closed else self.pending), ""
            return held
        if not self.buffer:
            return ""
        return template.visible_answer(self.buffer)


_TAGS = (template.ANALYSIS_TAG, template.RESPONSE_TAG)
