"""Conversations between personas (the paper's multi-agent case studies): a debate or a collaboration on a topic.

Each agent speaks through its own persona prompt (template.prompt_messages) and sees the conversation from its side:
its own turns as assistant messages, everyone else's as user messages prefixed with the speaker's name, after an
opening that states the topic, the mode and who takes part. Generation stops at another agent's "Name:" and the
output is cut there too, so no agent speaks for another (SillyTavern #1211, #2816). The next speaker is chosen round
robin, by address (a turn that names another agent hands over to them), or by a model (SillyTavern #1670), with
validation and a round-robin fallback. A stance tracker reports whether each agent's opinion stayed the same.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

from persllm import template
from persllm.backends.base import Backend, GenParams
from persllm.config import Project
from persllm.errors import BackendError, ConfigError
from persllm.prompts import Prompts, load_prompts
from persllm.similarity import sentence_model, tfidf_vectors, unit_cosine
from persllm.types import Message
from persllm.workspace import write_jsonl, write_text

log = logging.getLogger(__name__)

Mode = Literal["debate", "collaboration"]
Policy = Literal["round_robin", "addressed", "model"]
Verdict = Literal["consistent", "inconsistent", "undetermined"]
MODES: tuple[str, ...] = ("debate", "collaboration")
POLICIES: tuple[str, ...] = ("round_robin", "addressed", "model")

# Prompts (opening, next-speaker chooser, stance annotator) live in prompts/<language>.yaml under `converse`.
_NEXT = re.compile(r"^[*_#\s]*next[*_\s]*[:：][*_\s]*(.+?)[*_.\s]*$", re.IGNORECASE)
_STANCE = re.compile(r"^[*_#\s]*stance[*_\s]*[:：][*_\s]*(for|against|neutral)[*_.\s]*$", re.IGNORECASE)
_CONTEXT_TURNS = 6  # turns shown to the chooser


@dataclass(frozen=True)
class Agent:
    """A persona at one stage through one model variant, under the name the others use for it."""

    name: str
    project: Project
    stage: str
    variant: str
    backend: Backend = field(compare=False, repr=False)
    tags: tuple[str, ...] = ()  # names that mark its lines ("Marie Curie:", "Marie:"); default: its name


@dataclass(frozen=True)
class Turn:
    """One utterance, attributed to exactly one agent."""

    index: int
    speaker: str
    stage: str
    variant: str
    text: str  # what the agent said: analysis removed, cut before any line of another agent
    analysis: str
    raw: str
    chosen_by: str  # opening, round_robin, addressed, model, or fallback (the model's choice was unusable)
    cut: bool  # the model began another agent's line and was cut there


@dataclass(frozen=True)
class AgentStance:
    """How one agent's opinion moved over its turns."""

    name: str
    turns: int
    labels: tuple[str | None, ...] = ()  # judge: for / against / neutral per turn, None when unparseable
    similarity: tuple[float, ...] = ()  # similarity method: each later turn vs the agent's first turn
    score: float | None = None  # 1.0 = never moved
    verdict: Verdict = "undetermined"
    detail: str = ""


@dataclass(frozen=True)
class StanceReport:
    """Per-agent stance consistency on the topic."""

    method: str  # judge:<model>, embedding:<model> or tfidf
    topic: str
    agents: tuple[AgentStance, ...]


@dataclass(frozen=True)
class Conversation:
    """Everything a transcript holds."""

    topic: str
    mode: str
    policy: str
    agents: tuple[Agent, ...]
    turns: tuple[Turn, ...]
    stance: StanceReport
    started: float = field(default_factory=time.time)


# -- agents ---------------------------------------------------------------------------------------------------------
def agent_names(members: Sequence[tuple[Project, str, str]]) -> list[str]:
    """Display names: the persona's name, plus the stage label (and variant) where that alone is ambiguous."""
    names = [p.name for p, _, _ in members]
    names = [f"{p.name} ({p.stage(s).label})" if names.count(p.name) > 1 else n
             for (p, s, _), n in zip(members, names, strict=True)]
    return [f"{n[:-1]}, {v})" if names.count(n) > 1 and n.endswith(")") else n
            for (_, _, v), n in zip(members, names, strict=True)]


def open_agents(members: Sequence[tuple[Project, str, str]], opener: Callable[[Project, str], Backend]) -> list[Agent]:
    """Agents for (project, stage, variant) triples; members on the same weights share one loaded backend."""
    names = agent_names(members)
    loaded: dict[tuple[str, str], Backend] = {}
    agents = []
    for (project, stage, variant), name in zip(members, names, strict=True):
        key = (project.base_model.spec if variant == "base" else str(project.root), variant)
        if key not in loaded:
            loaded[key] = opener(project, variant)
        unique = [p.name for p, _, _ in members].count(project.name) == 1
        tags = (name, *_short_names(project)) if unique else (name,)
        agents.append(Agent(name, project, project.stage(stage).id, variant, loaded[key], tags))
    return agents


def _short_names(project: Project) -> tuple[str, ...]:
    """First and last name and aliases: what others may write before a colon."""
    words = project.name.split()
    parts = [w for w in (words[0], words[-1]) if len(words) > 1 and len(w) >= 3]
    return tuple(dict.fromkeys([project.name, *parts, *project.aliases]))


# -- the conversation -----------------------------------------------------------------------------------------------
def converse(agents: Sequence[Agent], topic: str, turns: int, mode: Mode = "debate", policy: Policy = "round_robin",
             chooser: Backend | None = None, params: GenParams = GenParams(temperature=0.7, max_tokens=200),
             seed: int = 0) -> Iterator[Turn]:
    """Yield `turns` turns; the first agent opens.

    Args:
        chooser: model that picks the next speaker under policy "model" (default: the last speaker's own model).
    """
    _check(agents, topic, turns, mode, policy)
    history: list[Turn] = []
    speaker, how = 0, "opening"
    for index in range(turns):
        if index:
            speaker, how = next_speaker(agents, history, policy, topic, chooser)
        turn = _speak(agents, speaker, history, topic, mode, replace(params, seed=seed + index), index, how)
        history.append(turn)
        yield turn


def _check(agents: Sequence[Agent], topic: str, turns: int, mode: str, policy: str) -> None:
    names = [a.name for a in agents]
    if len(agents) < 2 or len(set(names)) != len(names):
        raise ConfigError(f"a conversation needs at least two distinct agents, got {names}")
    if not topic.strip():
        raise ConfigError("the topic is empty; say what the agents should talk about with --topic")
    if turns < 1:
        raise ConfigError(f"turns must be at least 1, got {turns}")
    if mode not in MODES or policy not in POLICIES:
        raise ConfigError(f"mode must be one of {', '.join(MODES)} and policy one of {', '.join(POLICIES)}")


def agent_messages(agent: Agent, agents: Sequence[Agent], history: Sequence[Turn], topic: str,
                   mode: str) -> list[Message]:
    """The prompt of `agent`: its persona prompt, the opening, then the conversation seen from its side."""
    prompts = load_prompts(agent.project.language)
    opening = prompts.fill("converse.opening", title=prompts.get(f"converse.modes.{mode}.title"), topic=topic.strip(),
                           names=", ".join(a.name for a in agents), name=agent.name,
                           task=prompts.get(f"converse.modes.{mode}.task"))
    turns = [Message("user", opening + ("" if history else "\n" + prompts.get("converse.first")))]
    for turn in history:
        if turn.speaker == agent.name:
            turns.append(Message("assistant", turn.text))
        elif turns[-1].role == "user":
            turns[-1] = Message("user", f"{turns[-1].content}\n\n{turn.speaker}: {turn.text}")
        else:
            turns.append(Message("user", f"{turn.speaker}: {turn.text}"))
    if turns[-1].role == "assistant":
        turns.append(Message("user", prompts.get("converse.again")))
    ctx = template.context_for(agent.project, agent.stage)
    return template.prompt_messages(ctx, turns[-1].content, turns[:-1])


def _speak(agents: Sequence[Agent], index: int, history: Sequence[Turn], topic: str, mode: str, params: GenParams,
           number: int, how: str) -> Turn:
    agent = agents[index]
    others = [tag for other in agents if other is not agent for tag in other.tags if tag not in agent.tags]
    # Stop strings end generation early; endpoints accept at most four, the post-filter catches the rest.
    stops = tuple(dict.fromkeys(f"\n{a.name}:" for a in agents if a is not agent))[:4]
    messages = agent_messages(agent, agents, history, topic, mode)
    raw, text, cut = "", "", False
    for attempt in range(2):  # an empty turn (all of it someone else's) is asked again once, with another seed
        raw = agent.backend.complete(messages, replace(params, stop=stops + params.stop,
                                                       seed=(params.seed or 0) + 1000 * attempt)).text
        text, cut = speak_only_for(agent.tags, template.visible_answer(raw), others)
        if text:
            break
    return Turn(number, agent.name, agent.stage, agent.variant, text, template.split_answer(raw)[0], raw, how, cut)


def speak_only_for(own: Sequence[str], text: str, others: Sequence[str]) -> tuple[str, bool]:
    """The text up to the first "Other:" speaker tag, without a leading "Own:" tag; and whether it was cut."""
    if own:
        own_tag = re.compile(rf"^\s*[*_]*(?:{'|'.join(map(re.escape, own))})[*_]*\s*[:：]\s*")
        text = own_tag.sub("", text, count=1)
    if not others:
        return text.strip(), False
    names = "|".join(_name(o) for o in sorted(others, key=len, reverse=True))
    match = re.search(rf"[*_]*(?:{names})[*_]*[ \t]*[:：]", text)
    if match is None:
        return text.strip(), False
    return text[: match.start()].rstrip(" \t\n*_>-").strip(), True


def _name(tag: str) -> str:
    """Regex for a name as a whole word; CJK text has no spaces, so there a name may follow any character."""
    before = r"(?<!\w)" if tag[:1].isascii() else ""
    after = r"(?!\w)" if tag[-1:].isascii() else ""
    return f"{before}{re.escape(tag)}{after}"


# -- who speaks next ------------------------------------------------------------------------------------------------
def next_speaker(agents: Sequence[Agent], history: Sequence[Turn], policy: str, topic: str,
                 chooser: Backend | None = None) -> tuple[int, str]:
    """Index of the next speaker and how it was chosen; never the agent who just spoke."""
    names = [a.name for a in agents]
    last = names.index(history[-1].speaker)
    fallback = (last + 1) % len(agents)
    if policy == "addressed":
        named = addressed(agents, last, history[-1].text)
        return (named, "addressed") if named is not None else (fallback, "round_robin")
    if policy == "model":
        named = choose_by_model(chooser or agents[last].backend, agents, last, history, topic)
        return (named, "model") if named is not None else (fallback, "fallback")
    return fallback, "round_robin"


def addressed(agents: Sequence[Agent], speaker: int, text: str) -> int | None:
    """The other agent named last in `text` (a question at the end hands over), or None."""
    best: tuple[int, int] | None = None
    for index, agent in enumerate(agents):
        if index == speaker:
            continue
        for tag in agent.tags:
            if tag in agents[speaker].tags:
                continue
            for match in re.finditer(_name(tag), text):
                if best is None or match.start() > best[0]:
                    best = (match.start(), index)
    return None if best is None else best[1]


def choose_by_model(backend: Backend, agents: Sequence[Agent], speaker: int, history: Sequence[Turn],
                    topic: str) -> int | None:
    """Ask a model who speaks next; None when the reply is not exactly one valid candidate."""
    candidates = [a.name for i, a in enumerate(agents) if i != speaker]
    shown = "\n".join(f"{t.speaker}: {t.text}" for t in history[-_CONTEXT_TURNS:])
    prompts = load_prompts(agents[speaker].project.language)
    prompt = prompts.fill("converse.chooser", topic=topic, transcript=shown, candidates=", ".join(candidates))
    try:
        reply = backend.complete([Message("system", prompts.get("converse.chooser_system")), Message("user", prompt)],
                                 GenParams(temperature=0.0, max_tokens=24)).text
    except BackendError as exc:
        log.warning("next-speaker choice failed (%s); falling back to round robin", exc)
        return None
    found = [m.group(1).strip() for line in reply.splitlines() if (m := _NEXT.match(line.strip()))]
    lookup = {c.lower(): c for c in candidates}
    if len(found) != 1 or found[0].lower() not in lookup:
        return None
    return [a.name for a in agents].index(lookup[found[0].lower()])


# -- stance tracking ------------------------------------------------------------------------------------------------
def track_stance(topic: str, agents: Sequence[Agent], turns: Sequence[Turn], judge: Backend | None = None,
                 embedding_model: str = "") -> StanceReport:
    """Judge each turn's stance (with a judge), else compare each agent's turns with its first one by similarity."""
    if judge is not None:
        return StanceReport(f"judge:{judge.name}", topic,
                            tuple(_judged(topic, a.name, turns, judge, load_prompts(a.project.language))
                                  for a in agents))
    method, vectors = _vectors([t.text for t in turns], embedding_model)
    return StanceReport(method, topic, tuple(_similar(a.name, turns, vectors) for a in agents))


def parse_stance(reply: str) -> str | None:
    """Exactly one 'Stance: for|against|neutral' line, else None."""
    found = [m.group(1).lower() for line in reply.splitlines() if (m := _STANCE.match(line.strip()))]
    return found[0] if len(found) == 1 else None


def _judged(topic: str, name: str, turns: Sequence[Turn], judge: Backend, prompts: Prompts) -> AgentStance:
    labels: list[str | None] = []
    for turn in (t for t in turns if t.speaker == name):
        label = None
        for attempt in range(2):  # one retry with another seed; still unparseable = missing, never a guess
            prompt = prompts.fill("converse.stance", topic=topic, name=name, text=turn.text)
            try:
                reply = judge.complete([Message("system", prompts.get("converse.stance_system")),
                                        Message("user", prompt)],
                                       GenParams(temperature=0.0 if attempt == 0 else 0.7, max_tokens=16,
                                                 seed=attempt)).text
            except BackendError as exc:
                log.warning("stance judge failed on turn %d: %s", turn.index, exc)
                break
            label = parse_stance(reply)
            if label is not None:
                break
        labels.append(label)
    parsed = [x for x in labels if x is not None]
    if len(parsed) < 2:
        return AgentStance(name, len(labels), tuple(labels), detail=f"{len(parsed)} of {len(labels)} turns judged; "
                                                                    "at least two are needed")
    polar = [x for x in parsed if x != "neutral"]
    first = polar[0] if polar else "neutral"
    flips = sum(x != first for x in polar)
    return AgentStance(name, len(labels), tuple(labels), score=round(1 - flips / len(parsed), 3),
                       verdict="consistent" if flips == 0 else "inconsistent",
                       detail=f"{len(parsed)} of {len(labels)} turns judged; first stance {first}; "
                              f"{flips} turn(s) took the opposite side")


def _similar(name: str, turns: Sequence[Turn], vectors: list[list[float]]) -> AgentStance:
    """A later turn holds the agent's line if it is closer to the agent's first turn than to any other agent's."""
    own = [i for i, t in enumerate(turns) if t.speaker == name]
    if len(own) < 2:
        return AgentStance(name, len(own), detail="fewer than two turns")
    firsts = {t.speaker: i for i, t in reversed(list(enumerate(turns)))}
    rivals = [i for speaker, i in firsts.items() if speaker != name]
    sims, holds = [], 0
    for i in own[1:]:
        mine = unit_cosine(vectors[i], vectors[own[0]])
        sims.append(round(mine, 3))
        holds += all(mine >= unit_cosine(vectors[i], vectors[r]) for r in rivals)
    share = holds / len(sims)
    return AgentStance(name, len(own), similarity=tuple(sims), score=round(share, 3),
                       verdict="consistent" if share >= 0.5 else "inconsistent",
                       detail=f"{holds} of {len(sims)} later turns closer to its first statement than to any other "
                              f"agent's; mean similarity {sum(sims) / len(sims):.2f}")


def _vectors(texts: list[str], embedding_model: str) -> tuple[str, list[list[float]]]:
    """Sentence embeddings when a model is named and sentence-transformers is installed, else TF-IDF."""
    if embedding_model:
        try:
            model = sentence_model(embedding_model)
        except ImportError:
            log.warning("sentence-transformers is not installed; stance tracking falls back to TF-IDF")
        else:
            return f"embedding:{embedding_model}", model.encode(texts, normalize_embeddings=True).tolist()
    return "tfidf", tfidf_vectors(texts)


# -- transcripts ----------------------------------------------------------------------------------------------------
def write_transcript(conversation: Conversation, out_dir: Path) -> tuple[Path, Path]:
    """Write transcript.jsonl (meta, turns, stance) and transcript.md atomically; return both paths."""
    out_dir = Path(out_dir)
    meta = {"type": "meta", "topic": conversation.topic, "mode": conversation.mode, "policy": conversation.policy,
            "started": conversation.started,
            "agents": [{"name": a.name, "persona": a.project.name, "project": str(a.project.root), "stage": a.stage,
                        "label": a.project.stage(a.stage).label, "variant": a.variant, "model": a.backend.name}
                       for a in conversation.agents]}
    rows = [meta, *({"type": "turn"} | asdict(t) for t in conversation.turns),
            {"type": "stance"} | asdict(conversation.stance)]
    jsonl = out_dir / "transcript.jsonl"
    write_jsonl(jsonl, rows)
    md = out_dir / "transcript.md"
    write_text(md, markdown(conversation))
    return jsonl, md


def markdown(conversation: Conversation) -> str:
    """The conversation and its stance report as Markdown."""
    lines = [f"# {conversation.mode.capitalize()}: {conversation.topic}", ""]
    for agent in conversation.agents:
        lines.append(f"- **{agent.name}**: {agent.project.name} in {agent.project.stage(agent.stage).label} "
                     f"(stage `{agent.stage}`, model `{agent.variant}`)")
    lines += ["", f"Next speaker: {conversation.policy.replace('_', ' ')}.", ""]
    for turn in conversation.turns:
        flag = " *(cut before another speaker's line)*" if turn.cut else ""
        lines += [f"**{turn.speaker}**: {turn.text or '*(no reply)*'}{flag}", ""]
    report = conversation.stance
    lines += ["## Stance report", "", f"Method: {report.method}.", "", "| agent | turns | verdict | score | detail |",
              "|---|---|---|---|---|"]
    for a in report.agents:
        score = "n/a" if a.score is None else f"{a.score:.2f}"
        lines.append(f"| {a.name} | {a.turns} | {a.verdict} | {score} | {a.detail} |")
    return "\n".join(lines) + "\n"
