"""General instruction data in `messages` JSONL: the built-in set, or a user file named in persona.yaml."""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources

from persllm.config import Project
from persllm.errors import DataError
from persllm.types import Message


@dataclass(frozen=True)
class GeneralRecord:
    """One general conversation (user/assistant turns) and, if known, the year its answer became knowable."""

    id: str
    messages: tuple[Message, ...]
    known_since: int | None = None

    @property
    def instruction(self) -> str:
        """The first user turn."""
        return self.messages[0].content

    @property
    def reference(self) -> str:
        """The first assistant turn."""
        return self.messages[1].content


def load_general(project: Project) -> list[GeneralRecord]:
    """The project's general data file, or the built-in set for its language."""
    if project.construct.general_data:
        path = project.material_path(project.construct.general_data)
        if not path.is_file():
            raise DataError(f"construct.general_data: {path} not found")
        return parse_general(path.read_text(encoding="utf-8"), str(path))
    name = f"general_{project.language}.jsonl"
    return parse_general(resources.files("persllm.data").joinpath(name).read_text(encoding="utf-8"), name)


def parse_general(text: str, source: str) -> list[GeneralRecord]:
    """Parse `messages` JSONL; every problem names the file and line."""
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{source}:{number}: not valid JSON ({exc.msg})") from exc
        messages = data.get("messages") if isinstance(data, dict) else None
        if not isinstance(messages, list) or len(messages) < 2:
            raise DataError(f"{source}:{number}: expected {{\"messages\": [{{\"role\": \"user\", ...}}, "
                            "{\"role\": \"assistant\", ...}]}")
        turns = [m for m in messages if isinstance(m, dict) and m.get("role") != "system"]
        roles = [m.get("role") for m in turns]
        if not turns or roles != ["user", "assistant"] * (len(turns) // 2) or len(turns) % 2:
            raise DataError(f"{source}:{number}: turns must alternate user/assistant and end with the assistant")
        if any(not isinstance(m.get("content"), str) or not m["content"].strip() for m in turns):
            raise DataError(f"{source}:{number}: every message needs non-empty string content")
        known = data.get("known_since")
        records.append(GeneralRecord(id=str(data.get("id") or f"general-{number}"),
                                     messages=tuple(Message(m["role"], m["content"]) for m in turns),
                                     known_since=int(known) if isinstance(known, (int, float)) else None))
    if not records:
        raise DataError(f"{source}: no general conversations found")
    return records
