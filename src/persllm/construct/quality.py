"""What a careful annotator checks in a constructed sample, as code: grammar of person rewrites, relevance of an
answer to its question, sentences repeated across responses, and held-out material leaking into training.

Grounded construction uses these checks while it builds (a sample that fails is not built) and `audit` reports
the same figures over the finished data on every run, so a regression shows in `construct/stats.json`.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence

from persllm import text as T
from persllm.similarity import normalize
from persllm.types import Passage, Sample

RELEVANCE_THRESHOLD = 0.33
"""Share of a question's topic words an answer must take up (one in three)."""
REUSE_LIMIT = 3
"""A sentence may appear in at most this many responses (so in at most two others)."""

# Words that frame a question rather than name its topic ("Tell me about X", "What do you remember of X?").
_FRAME_EN = frozenset(
    ["tell", "remember", "think", "thought", "feel", "felt", "like", "look", "looking", "back", "mean", "meant", "matter", "matters", "know", "knew", "say", "said", "things", "thing", "something", "anything", "time", "times", "life", "days", "day", "really", "truly", "honestly", "please", "think", "believe", "people", "everyone", "everybody", "someone", "somebody", "used", "ever", "happened", "happen", "make", "made", "come", "came", "give", "gave", "describe", "explain", "talk", "speak", "part", "good", "bad", "great", "much", "many", "often", "well", "still", "quite", "just", "yes", "agree", "disagree", "sure", "convinced", "view", "views", "opinion", "frankly", "bring", "brought", "change", "changed", "changes", "happened", "happens", "mean", "means", "meant"])
_FRAME_ZH = frozenset("你我他她的了吗呢吧啊是在有和也就都还这那什么怎么为何为什么觉得认为说讲记得看法想")

# English person-rewrite errors: each pattern is a construction a first-person rewrite must never produce.
_VERBISH = (r"(?:was|were|is|am|are|had|has|have|did|do|does|could|would|should|will|shall|might|must|can|"
            r"never|also|then|soon|later|often|always|once|still|first|became|began|went|wrote|met|took|gave|"
            r"made|saw|knew|found|left|came|taught|told|sent|spent|read|said|thought|felt|lived|died|chose|"
            r"stood|won|lost|built|bought|brought|fought|held|kept|led|meant|paid|ran|rose|sat|spoke|threw|"
            r"understood|wore|drew|drove|fell|flew|forgot|got|grew|hid|hung|lay|lent|rode|sold|sought|"
            r"struck|swore|woke|wept|began|begun|became|gave|took|went|wrote|moved|shared|received|"
            r"[a-z]+ed)")
_PERSON_ERRORS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("object_as_subject", re.compile(r"(?<!\blet )(?<!\bmake )(?<!\bmade )(?<!\bhelp )(?<!\bhelped )"
                                     r"(?<!\bwatch )(?<!\bsaw )(?<!\bhear )(?<!\bheard )(?<!\bhad )"
                                     r"\b[Mm]e\s+" + _VERBISH + r"\b")),
    ("subject_as_object", re.compile(r"\b(?:to|with|by|for|of|from|about|upon|against|between|among|toward|"
                                     r"towards|into|onto|at|behind|beside|without|under|over|on|in)\s+I\b"
                                     r"(?!['’])")),
    ("verb_agreement", re.compile(r"\bI\s+(?:is|are|were|has|does|doesn't|isn't|wasn't)\b|"
                                  r"\byou\s+(?:is|was|am|has|does|doesn't|isn't|wasn't)\b")),
    ("dangling_possessive", re.compile(r"\b(?:my|your)\s*(?:[.,;:!?)]|$)|\b(?:my|your)\s+(?:and|or|but|to|of|"
                                       r"the|a|an|with|by|for|in|on|at|was|were|is)\b")),
    ("sentence_initial_object", re.compile(r"(?:^|[.!?]\s+)Me\s+(?!too\b)")),
    ("doubled_pronoun", re.compile(r"\b(I|me|my|you|your)\s+\1\b", re.IGNORECASE)),
    ("pronoun_as_noun", re.compile(r"\b(?:the|a|an)\s+(?:\w+\s+)?(?:me|my)\b|"
                                   r"\b[A-Z][a-z]+ of (?:me|my|you)\b")),
    ("first_person_order", re.compile(r"\bI and\b|\band I(?=\s*[,;:)]|\s+(?:for|in|at|on|to|with|by|from|of|"
                                      r"as)\b)")),
    ("we_as_they", re.compile(r"\band I\b[^.!?]*\b(?:they|their|them)\b")),
    ("mixed_person", re.compile(r"\bI\b[^.!?]*\b(?:herself|himself)\b|\b(?:herself|himself)\b[^.!?]*\bI\b")),
)


def person_errors(text: str, language: str) -> list[str]:
    """Grammar errors a third-to-first (or second) person rewrite can introduce; empty when none is found."""
    if language == "zh":
        # Chinese has no case or agreement; what breaks is a double conversion ("我劝我") or a stray pronoun run.
        return ["doubled_pronoun"] if re.search(r"([我你])[劝请叫让帮给对替教打骂害救]\1(?![们的])", text) else []
    return [name for name, pattern in _PERSON_ERRORS if pattern.search(text)]


def topic_terms(text: str, language: str, drop: Iterable[str] = ()) -> set[str]:
    """The words (English, lightly stemmed) or character bigrams (Chinese) that say what a text is about."""
    dropped = {w.lower() for d in drop for w in T.content_words(d)} if language != "zh" else set()
    if language == "zh":
        # Runs of meaningful characters between frame characters and punctuation; bigrams within each run.
        runs = re.split(r"[^\u3400-\u4dbf\u4e00-\u9fff]|[" + "".join(_FRAME_ZH) + "]", text)
        grams = {r[i:i + 2] for r in runs if len(r) >= 2 for i in range(len(r) - 1)} | {r for r in runs if len(r) == 1}
        for d in drop:
            grams -= {d[i:i + 2] for i in range(len(d) - 1)} | {d}
        return grams
    return {_stem(w) for w in T.content_words(text) if w not in _FRAME_EN and w not in dropped}


def _stem(word: str) -> str:
    """A crude stem so 'engines' meets 'engine' and 'married' meets 'marry' (no dictionary needed)."""
    for suffix in ("ies", "ied", "ing", "ed", "es", "s", "'s", "’s"):
        if word.endswith(suffix) and len(word) - len(suffix) >= 4:
            return word[: -len(suffix)]
    return word


def relevance(question: str, answer: str, language: str, drop: Iterable[str] = ()) -> float:
    """Share of the question's topic terms that the answer takes up (1.0 for a question with no topic terms)."""
    asked = topic_terms(question, language, drop)
    if not asked:
        return 1.0
    return len(asked & topic_terms(answer, language, drop)) / len(asked)


def sentence_key(sentence: str) -> str:
    """A sentence normalised for counting repeats (case, spacing and punctuation ignored)."""
    return normalize(sentence, case="lower", punctuation="space")


class SentenceBudget:
    """Counts how often each sentence has been used in responses, so none is reused beyond REUSE_LIMIT."""

    def __init__(self, limit: int = REUSE_LIMIT) -> None:
        self.limit = limit
        self.counts: Counter[str] = Counter()

    def allows(self, sentences: Iterable[str]) -> bool:
        """True when every sentence is still under the limit."""
        return all(self.counts[sentence_key(s)] < self.limit for s in sentences if sentence_key(s))

    def fresh(self, sentences: Iterable[str]) -> list[str]:
        """The sentences that may still be used."""
        return [s for s in sentences if self.counts[sentence_key(s)] < self.limit]

    def use(self, response: str) -> None:
        """Record every sentence of a response that was kept."""
        for key in {sentence_key(s) for s in T.sentences(response)}:
            if key:
                self.counts[key] += 1


def shared_sentence_share(responses: Sequence[str], others: int = 3) -> float:
    """Share of responses containing a sentence that also appears in `others` or more other responses."""
    if not responses:
        return 0.0
    keys = [{sentence_key(s) for s in T.sentences(r)} - {""} for r in responses]
    counts = Counter(k for ks in keys for k in ks)
    return sum(1 for ks in keys if any(counts[k] > others for k in ks)) / len(responses)


def held_out_leaks(samples: Sequence[Sample], passages: Sequence[Passage], held_out: Iterable[str]) -> list[str]:
    """Ids of training samples whose context, analysis or response carries a held-out passage or sentence."""
    held = set(held_out)
    by_id = {p.id: p for p in passages}
    sentences = {sentence_key(s) for pid in held if pid in by_id for s in T.sentences(by_id[pid].text)
                 if T.count_tokens(s) >= 6}
    leaks = []
    for sample in samples:
        if sample.split == "test":
            continue
        if set(sample.context_ids) & held:
            leaks.append(sample.id)
            continue
        said = {sentence_key(s) for s in T.sentences(sample.analysis + " " + sample.response)}
        if said & sentences:
            leaks.append(sample.id)
    return leaks


def audit(samples: Sequence[Sample], passages: Sequence[Passage], held_out: Iterable[str],
          language: str, drop: Iterable[str] = ()) -> dict[str, float | int]:
    """The audit figures of `construct/stats.json`, computed over the finished samples."""
    responses = [s.response for s in samples]
    personified = [s for s in samples if s.kind != "general"]
    rewritten = [s for s in samples if s.meta.get("origin", {}).get("fact") in ("rule_rewrite", "teacher_rewrite")]
    # An attack on the persona's identity has no topic to take up: its answer is judged by the probes instead.
    judged = [s for s in personified if s.meta.get("premise") != "identity"]
    low = [s for s in judged if relevance(_asked(s), s.response, language, drop) < RELEVANCE_THRESHOLD]
    return {
        "responses": len(responses),
        "shared_sentence_share": round(shared_sentence_share(responses), 4),
        "low_relevance_share": round(len(low) / len(judged), 4) if judged else 0.0,
        "relevance_threshold": RELEVANCE_THRESHOLD,
        "rewritten_responses": len(rewritten),
        "rewrite_grammar_errors": sum(1 for s in samples if person_errors(s.response, language)),
        "held_out_leaks": len(held_out_leaks(samples, passages, held_out)),
    }


def _asked(sample: Sample) -> str:
    """What a question is about: a later thing or a never-lived event is the topic of its induced question."""
    return str(sample.meta.get("thing") or sample.meta.get("event") or sample.question)
