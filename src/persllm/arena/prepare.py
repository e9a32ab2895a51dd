"""Arena preparation: held-out questions and every model's answers, generated once and stored before voting starts."""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence

from persllm import template, variants
from persllm.arena.store import ArenaStore, Question
from persllm.backends.base import Backend, GenParams
from persllm.config import Project
from persllm.errors import BackendError, DataError
from persllm.progress import NULL, Progress
from persllm.workspace import Workspace

log = logging.getLogger(__name__)


def heldout_questions(project: Project, limit: int = 40) -> list[Question]:
    """Up to `limit` distinct questions of the held-out (test) split, a seeded sample spread over the stages."""
    ws = Workspace.of(project)
    if ws.manifest("construct") is None:
        raise DataError(f"the arena asks held-out questions made by construct, which has not run for {project.name}; "
                        f"run `persllm construct {project.root}` first")
    seen: set[str] = set()
    questions = []
    for sample in sorted(ws.samples(), key=lambda s: s.id):
        if sample.split == "test" and sample.question not in seen:
            seen.add(sample.question)
            questions.append(Question(sample.id, sample.stage, sample.question))
    if not questions:
        raise DataError(f"{project.name} has no held-out questions (split 'test'); raise construct.test_fraction "
                        "and run `persllm construct` again")
    random.Random(project.seed).shuffle(questions)
    return sorted(questions[:limit], key=lambda q: q.id)


def prepare(project: Project, store: ArenaStore, models: Sequence[str], questions: Sequence[Question],
            opener: Callable[[Project, str], Backend] = variants.open_variant,
            params: GenParams = GenParams(temperature=0.7, max_tokens=256),
            progress: Progress = NULL) -> dict[str, int]:
    """Store each model's answer to each question; models with nothing left to answer are not even loaded.

    Returns the number of answers generated per model (failed ones are logged and left for the next run).
    """
    store.add_questions(questions)
    made: dict[str, int] = {}
    for model in models:
        todo = store.unanswered(model, questions)
        made[model] = 0
        if not todo:
            continue
        backend = opener(project, model)
        try:
            requests = [template.prompt_messages(template.context_for(project, q.stage), q.question) for q in todo]
            with progress.task(f"arena answers from {model}", total=len(todo)) as task:
                for index, result in backend.complete_many(requests, params):
                    task.advance()
                    if isinstance(result, BackendError):
                        log.warning("%s could not answer %s: %s", model, todo[index].id, result)
                        continue
                    store.add_answer(todo[index].id, model, result.text, template.visible_answer(result.text))
                    made[model] += 1
        finally:
            backend.close()
    return made
