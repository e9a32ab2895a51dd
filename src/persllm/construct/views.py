"""The persona's own views, found in their material: the starting point of every offline opinion item.

A view is a sentence in which the persona states an opinion (their own words from the style files, or a belief
the knowledge files report). Where the sentence has the shape "I think that P" (or "I do not think that P"), the
proposition P is kept separately, so a user can agree or disagree with P itself; otherwise the user refers to
what the persona said.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from persllm import text as T
from persllm.construct import facts as F
from persllm.types import Passage

# "I think that P" and its relatives: group 'neg' marks a negated view ("I do not think that P").
_PROPOSITION_EN = re.compile(
    r"^(?:(?:And|But|Yet|So|Still|Indeed|Now|Well),?\s+)?"
    r"I\s+(?:(?P<neg>do not|don't|cannot|can't|could never|will never|never)\s+)?"
    r"(?:am\s+(?:quite\s+|perfectly\s+|entirely\s+|firmly\s+)?(?:sure|convinced|certain|persuaded)|"
    r"(?:firmly\s+|truly\s+|really\s+|still\s+)?(?:think|believe|hold|maintain|suppose|agree with those who say))"
    r"\s+(?:that\s+)?(?P<p>.+?)[.!]?$")
_VIEW_EN = re.compile(
    r"\b(?:I (?:think|believe|hold|maintain|am (?:quite |perfectly |entirely )?(?:sure|convinced|certain)|"
    r"do not (?:think|believe|agree|care|see)|don't (?:think|believe|agree|care)|cannot (?:agree|bear|believe|"
    r"abide|see)|can't (?:agree|bear|stand)|would rather|prefer|love|hate|fear|admire|despise|detest|dislike|"
    r"confess|wish|have no patience|am not (?:sure|convinced))|in my (?:opinion|view|judgment|judgement)|"
    r"to me\b|it seems to me|nobody (?:else )?seems|is (?:the )?(?:most|best|worst|only)|ought to|"
    r"(?:should|must) (?:never|not|always|be)|nothing (?:is|could be) (?:more|so)|worth(?:y| more| less)|"
    r"(?:quite|entirely|very) wrong|is wrong|are wrong|more honest|nonsense)\b", re.IGNORECASE)
_BELIEF_EN = re.compile(r"\b(?:believed|argued|insisted|held|maintained|was convinced|thought|wrote|declared)"
                        r"\s+that\b")
_VIEW_ZH = re.compile(r"我(?:认为|以为|觉得|相信|主张|反对|赞成|不以为|宁可|宁愿|希望|愿|讨厌|憎恶|厌恶|佩服|怕|"
                      r"不相信|不赞成|不同意|从不|决不|绝不|想)|应该|应当|必须|不该|不必|倒不如|决不|绝不|"
                      r"最(?:好|坏|可怕|要紧)|是(?:一种|一件)")
_PROPOSITION_ZH = re.compile(r"^我(?P<neg>不)?(?:认为|以为|觉得|相信)[，,]?(?P<p>.+?)[。！]?$")
_REPORTED_EN = re.compile(r"\b(?:I am told|I have been told|I hear|people say|they say|it is said|some say|"
                          r"everyone says|they tell me)\b", re.IGNORECASE)
_REPORTED_ZH = re.compile(r"听说|人们说|有人说|据说|他们说")
_PRONOUN_EN = re.compile(r"\b(?:I|me|my|mine|myself|we|us|our|ours|you|your|yours)\b", re.IGNORECASE)


@dataclass(frozen=True)
class View:
    """One opinion of the persona: the sentence, where it is, and its proposition when it has a clean one."""

    sentence: str  # first person, as the persona would say it
    passage_id: str
    origin: str  # "style" (the persona's own words) or "knowledge" (a belief the material reports)
    proposition: str = ""  # P of "I (do not) think that P", without first or second person; "" when none
    negated: bool = False  # True for "I do not think that P"


def find_views(passages: Sequence[Passage], ref: F.PersonaRef) -> list[View]:
    """Every opinion sentence of the passages, style material first, in material order."""
    views = []
    for passage in sorted(passages, key=lambda p: p.kind != "style"):
        for sentence in T.sentences(passage.text):
            view = _view(sentence, passage, ref)
            if view is not None:
                views.append(view)
    return views


def _view(sentence: str, passage: Passage, ref: F.PersonaRef) -> View | None:
    zh = ref.language == "zh"
    n = T.count_tokens(sentence)
    if not (6 <= n <= (60 if zh else 45)) or sentence.rstrip().endswith(("?", "？")):
        return None
    if (_REPORTED_ZH if zh else _REPORTED_EN).search(sentence):
        return None  # what others say or think, not the persona's own view
    if not zh and re.match(r"(?:He|She|It|They|This|These|Those|That|His|Her|Their)\b", sentence):
        return None  # leans on a sentence the user never heard ("He is right, I confess it")
    if not T.quotes_balanced(sentence):
        return None  # a quotation cut in two by the sentence split
    if passage.kind == "style":
        if not F.first_person_markers(sentence, ref.language) or not (_VIEW_ZH if zh else _VIEW_EN).search(sentence):
            return None
        text = sentence
        origin = "style"
    else:
        if zh or not _BELIEF_EN.search(sentence) or not F.mentions_persona(sentence, ref):
            return None
        text = F.convert_person(sentence, ref, "first")
        if F.mentions_persona(text, ref):
            return None
        origin = "knowledge"
    proposition, negated = _proposition(text, zh)
    return View(text, passage.id, origin, proposition, negated)


def _proposition(sentence: str, zh: bool) -> tuple[str, bool]:
    """P and its polarity for "I (do not) think that P"; ("", False) when P is not clean."""
    match = (_PROPOSITION_ZH if zh else _PROPOSITION_EN).match(sentence.strip())
    if not match:
        return "", False
    p = match.group("p").strip().rstrip(".。!！;；,，")
    if zh:
        if "我" in p or "你" in p or not 4 <= len(p) <= 40:
            return "", False
        return p, bool(match.group("neg"))
    if _PRONOUN_EN.search(p) or not 4 <= T.count_tokens(p) <= 30:
        return "", False
    return p[:1].lower() + p[1:] if not re.match(r"[A-Z][a-z]+\s+[A-Z]|I\b", p) else p, bool(match.group("neg"))


def quotable(sentence: str, language: str) -> bool:
    """A view the user can repeat back: short, one clause chain, no quotation or list inside."""
    if language == "zh":  # a Chinese view keeps its quoted words: “左翼”作家 is not a quotation of someone else
        return T.count_tokens(sentence) <= 60
    return T.count_tokens(sentence) <= 30 and not re.search(r"[\"“”:;]", sentence)


def second_person(sentence: str, language: str, material: str = "") -> str:
    """The persona's first-person sentence as the user would repeat it to them ('I think' -> 'you think'), with
    its first word lowercased unless the material writes it capitalised mid-sentence (a name)."""
    if language == "zh":
        return strip_conjunction(sentence).replace("我们", "你们").replace("我", "你").rstrip("。！!")
    swaps = {"i": "you", "me": "you", "my": "your", "mine": "yours", "myself": "yourself", "am": "are",
             "i'm": "you're", "i've": "you've", "i'd": "you'd", "i'll": "you'll"}

    def repl(match: re.Match[str]) -> str:
        return swaps[match.group(0).lower()]

    out = re.sub(r"\b(?:I'm|I've|I'd|I'll|I|me|my|mine|myself)\b", repl, sentence)
    out = re.sub(r"\byou\s+am\b", "you are", out)
    out = re.sub(r"\byou\s+was\b", "you were", out)
    out = re.sub(r"\byou\s+wasn't\b", "you weren't", out)
    return F.lower_start(out, material).rstrip(".!")


def strip_conjunction(sentence: str) -> str:
    """A Chinese sentence without the leading conjunction that tied it to one the listener never heard."""
    return re.sub(r"^(?:然而|但是|可是|所以|于是|因为|不过|而且|但|而|就是)[，,]?", "", sentence)
