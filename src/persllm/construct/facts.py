"""Rules over the persona's own material: person conversion, entities, topics and false premises.

Grounded construction (the offline default) uses these instead of trusting a weak teacher with facts; every
function here is deterministic given its inputs and a seeded random generator.
"""

from __future__ import annotations

import functools
import random
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from persllm import text as T

Person = Literal["first", "second"]
Pronoun = Literal["she", "he", "they"]

_MONTHS = {"January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
           "November", "December", "Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"}
_NOT_ENTITY = {"I", "In", "On", "At", "The", "A", "An", "After", "Before", "When", "While", "Her", "His", "She", "He",
               "They", "Their", "It", "Its", "This", "That", "These", "Those", "By", "From", "As", "With", "For",
               "During", "Although", "Though", "Every", "Each", "Later", "Soon", "Then", "There", "My", "We", "Our",
               "You", "Your", "But", "And", "Yet", "Not", "No", "Yes", "What", "How", "Why", "Who", "Where", "To",
               "Both", "Once", "Only", "Even", "Since", "Until", "Over", "Under", "Many", "Most", "Some", "All",
               "Whatever", "Whenever", "However", "Nothing", "Everything", "Everyone", "Nobody", "Somebody",
               "Perhaps", "Indeed", "Still", "So", "If", "Now", "Here", "Today", "Tomorrow", "Yesterday", "Let",
               "Do", "Does", "Did", "Is", "Was", "Are", "Were", "Can", "Could", "Will", "Would", "Should", "Must"}
_ENTITY = re.compile(r"\b[A-Z][\w'’\-]*(?:(?:\s+(?:of|de|la|le|du|von|van|the|di|da))*\s+[A-Z][\w'’\-]*)*",
                     re.UNICODE)
_YEAR = re.compile(r"(?<!\d)(1[0-9]{3}|20[0-9]{2})(?![\d’'s])")  # "1800s" is a period, not a year
_NUMBER = re.compile(r"(?<![\d.])(\d{1,3}(?:,\d{3})*|\d+)(?![\d.])")
_WORD = re.compile(r"[A-Za-z][A-Za-z'’\-]*")
_NATIONALITY = re.compile(r"^[A-Z][a-z\-]*(?:ish|ian|ese|ch|an)$")
# What makes a named thing a person or a place, so a false premise swaps like for like ("the poet George Gordon"
# becomes another person, never "the poet Royal Hospital").
TITLES = ("Mr", "Mrs", "Miss", "Ms", "Lady", "Lord", "Sir", "Dr", "Doctor", "Professor", "King", "Queen",
          "Prince", "Princess", "Madame", "Monsieur", "Mademoiselle", "Count", "Countess", "Duke", "Father")
_RELATION_WORDS = (r"friend|teacher|tutor|husband|wife|mother|father|daughter|son|sister|brother|aunt|uncle|cousin|"
                   r"colleague|professor|mentor|grandmother|grandfather|governess")
RELATIONS = re.compile(rf"\b(?:{_RELATION_WORDS})\s+$")
_ROLES = (r"poet|mathematician|inventor|writer|author|novelist|scientist|astronomer|physicist|chemist|engineer|"
          r"painter|composer|philosopher|lawyer|doctor|physician|statesman|politician|minister|editor|publisher|"
          r"translator|scholar|critic|student|pupil|lecturer|banker|merchant|" + _RELATION_WORDS)
# "the poet X", "married to X", "the son of X" / "X, the Scottish mathematician", "X, professor of ...", "X proposed"
_PERSON_BEFORE = re.compile(rf"\b(?:(?:{_ROLES})(?:\s+and\s+(?:{_ROLES}))?(?:\s+of)?|married(?:\s+to)?)\s+$",
                            re.IGNORECASE)
_PERSON_AFTER = re.compile(rf"^(?:,\s+(?:(?:an?|the|his|her)\s+)?(?:[A-Za-z]+\s+){{0,2}}(?:{_ROLES})\b"
                           r"|\s+(?:said|wrote|replied|answered|married|died|was born|was married|told|asked|"
                           r"thought|believed|proposed|had published|published|taught|described|met)\b)")
# "in London", "at Ockham Park"; not "to"/"from" (letters to a person) nor "in the" (in the Philosophical Magazine)
_PLACE_BEFORE = re.compile(r"\b(?:(?:[Ii]n|[Aa]t|[Nn]ear)|(?:visited|reached|left)(?:\s+the)?)\s+$")
_PLACE_WORDS = {"Street", "Square", "Park", "Place", "Road", "Lane", "Terrace", "Row", "Gardens", "Hall", "House",
                "Court", "Palace", "Castle", "Abbey", "Manor", "Church", "Cathedral", "Chapel", "Bridge", "Hospital",
                "College", "University", "School", "Academy", "Institution", "Institute", "Museum", "Library",
                "Theatre", "Island", "Lake", "River", "Mount", "Bay", "Hill", "Valley", "Harbour", "Station"}
EntityKind = Literal["person", "place", "other"]
_SUBJECT_CUES = {"was", "is", "had", "has", "did", "could", "would", "will", "should", "might", "must", "also",
                 "never", "then", "soon", "later", "often", "always", "once", "still", "only", "herself",
                 "himself", "and", "first"}
_NO_POSSESSIVE_AFTER = {"to", "and", "or", "but", "with", "by", "for", "in", "on", "at", "that", "when", "as", "from",
                        "about", "into", "of", "than", "if", "because", "so", "the", "a", "an", "while", "until",
                        "after", "before", "through", "over", "under", "again", "too", "very", "up", "down", "out"}
_AGREE = {
    "first": {"is": "am", "has": "have", "does": "do", "doesn't": "don't", "isn't": "am not"},
    "second": {"is": "are", "was": "were", "has": "have", "does": "do", "doesn't": "don't", "isn't": "aren't",
               "wasn't": "weren't"},
}
_PRONOUNS = {
    "she": {"subject": "she", "object": "her", "possessive": "her", "reflexive": "herself", "independent": "hers"},
    "he": {"subject": "he", "object": "him", "possessive": "his", "reflexive": "himself", "independent": "his"},
}
_TARGET = {
    "first": {"subject": "I", "object": "me", "possessive": "my", "reflexive": "myself", "independent": "mine"},
    "second": {"subject": "you", "object": "you", "possessive": "your", "reflexive": "yourself",
               "independent": "yours"},
}


@dataclass(frozen=True)
class PersonaRef:
    """How the persona is referred to in third-person material."""

    name: str
    aliases: tuple[str, ...]  # longest first: full names, then single names
    pronoun: Pronoun
    language: str

    @property
    def first_name(self) -> str:
        """The name used in templates ('Ada' for 'Ada Lovelace'); the whole name for CJK names."""
        return self.name if self.language == "zh" else self.name.split()[0]


def persona_ref(name: str, language: str, knowledge: Iterable[str], aliases: Sequence[str] = ()) -> PersonaRef:
    """Build the persona's reference: name variants and the pronoun most used in the knowledge material."""
    forms = {name.strip(), *(a.strip() for a in aliases if a.strip())}
    parts = name.split()
    if language != "zh" and len(parts) >= 2:
        forms.update({parts[0], parts[-1]})  # only the main name's parts: "Countess of X" must not yield "Countess"
    joined = " ".join(knowledge)
    if language == "zh":
        counts = Counter(ch for ch in joined if ch in "她他")
        pronoun: Pronoun = "she" if counts["她"] >= counts["他"] and counts["她"] else "he" if counts["他"] else "they"
    else:
        words = Counter(w.lower() for w in _WORD.findall(joined))
        she, he = words["she"] + words["her"], words["he"] + words["his"] + words["him"]
        pronoun = "she" if she > he else "he" if he > she else "they"
    return PersonaRef(name=name, aliases=tuple(sorted(forms, key=len, reverse=True)), pronoun=pronoun,
                      language=language)


# -- person conversion -------------------------------------------------------------------------------------------
def convert_person(sentence: str, ref: PersonaRef, person: Person = "first") -> str:
    """Rewrite third-person references to the persona as first ('I') or second ('you') person."""
    if ref.language == "zh":
        return _convert_zh(sentence, ref, person)
    target = _TARGET[person]
    out = _replace_names(sentence, ref, target)
    if ref.pronoun in _PRONOUNS:
        out = _replace_pronouns(out, _PRONOUNS[ref.pronoun], target)
    out = re.sub(r"\b(I|you)\s+(is|was|has|does|doesn't|isn't|wasn't)\b",
                 lambda m: f"{m.group(1)} {_AGREE[person].get(m.group(2), m.group(2))}", out)
    if person == "first":  # "I and Pierre worked" -> "Pierre and I worked"
        out = re.sub(r"\bI and ((?:my \w+ )?[A-Z][\w'’\-]*(?: [A-Z][\w'’\-]*)*)",
                     lambda m: f"{m.group(1)} and I", out)
    return _fix_case(out, person)


def _replace_names(sentence: str, ref: PersonaRef, target: dict[str, str]) -> str:
    names = [a for a in ref.aliases if a]
    if not names:
        return sentence
    pattern = re.compile(r"(?<![\w'’])(" + "|".join(re.escape(n) for n in names) + r")(['’]s)?(?![\w])")

    def repl(match: re.Match[str]) -> str:
        before = sentence[: match.start()].rstrip()
        prev = before.split()[-1] if before.split() else ""
        if prev.lower() in ("born", "named", "called", "christened", "baptised", "baptized"):
            return match.group(0)  # a name being given, not a reference to the person
        if prev.lower() in ("the", "a", "an") or prev == "of" and re.search(r"[A-Z][a-z]+ of$", before):
            return match.group(0)  # "the Countess of Lovelace", "Earl of Lovelace": a title, not the person
        # "Pierre Curie" is someone else: a capitalised word right before a bare surname means another person.
        # A number is not a name: "In 1897 Marie chose" has the persona as its subject.
        if re.fullmatch(r"\d[\d,]*", prev):
            return target["subject"]
        if prev[:1].isupper() and not prev.endswith((".", ",", ";", ":")) and len(before) > 0 \
                and prev not in _NOT_ENTITY and " " not in match.group(1):
            return match.group(0)
        after = sentence[match.end():].lstrip()
        # A bare first name followed by another capitalised word is a longer name we were not told about.
        if " " not in match.group(1) and not match.group(2) and re.match(r"[A-Z][a-z]", after) \
                and sentence[match.end():match.end() + 1] == " ":
            return match.group(0)
        if match.group(2):
            return target["possessive"]
        nxt = (word.group(0).lower() if (word := _WORD.match(after)) else "")
        at_start = not before or before.endswith((".", "!", "?", ";", ":", "\u201c", '"'))
        subject = at_start or nxt in _SUBJECT_CUES or nxt.endswith("ed") or prev.lower() in (
            "and", "but", "that", "when", "while", "because", "as", "where", "which", "so", "until", "after",
            "before", "since", "although", "though", ",")
        return target["subject"] if subject else target["object"]

    return pattern.sub(repl, sentence)


def _replace_pronouns(sentence: str, source: dict[str, str], target: dict[str, str]) -> str:
    def repl(match: re.Match[str]) -> str:
        word = match.group(0).lower()
        if word == source["reflexive"]:
            return target["reflexive"]
        if word == source["subject"]:
            return target["subject"]
        if word == source["independent"] and word != source["possessive"]:
            return target["independent"]
        # "her" and "his" are ambiguous: possessive before a word, object (or independent) otherwise.
        rest = sentence[match.end():]
        nxt = _WORD.match(rest.lstrip())
        followed_by_word = nxt is not None and rest[:1] == " " and nxt.group(0).lower() not in _NO_POSSESSIVE_AFTER
        if word == source["possessive"] and followed_by_word:
            return target["possessive"]
        if word == source["object"]:
            return target["object"]
        return target["independent"]

    forms = sorted({v for v in source.values()}, key=len, reverse=True)
    return re.sub(r"\b(" + "|".join(forms) + r")\b", repl, sentence, flags=re.IGNORECASE)


def _fix_case(sentence: str, person: Person) -> str:
    out = re.sub(r"\bi\b", "I", sentence)
    if person == "second":
        out = re.sub(r"(?<=[a-z,;] )(You|Your|Yours|Yourself)\b", lambda m: m.group(1).lower(), out)
    return out[:1].upper() + out[1:] if out else out


def _convert_zh(sentence: str, ref: PersonaRef, person: Person) -> str:
    me = "我" if person == "first" else "你"
    out = sentence
    for name in ref.aliases:
        # A name in quotation marks, or one being given, is the name itself ("使用了“鲁迅”这个笔名").
        out = re.sub(r"(?<!“)(?<!名为)(?<!叫做)(?<!名叫)" + re.escape(name) + r"(?!”)", me, out)
    pronoun = {"she": "她", "he": "他"}.get(ref.pronoun)
    if pronoun:
        out = re.sub(pronoun + "(?![们人])", me, out)
    return out


def mentions_persona(sentence: str, ref: PersonaRef) -> bool:
    """True if the sentence still refers to the persona in the third person (by name or pronoun)."""
    if ref.language == "zh":
        pronoun = {"she": "她", "he": "他"}.get(ref.pronoun, "")
        names = any(re.search(r"(?<!“)" + re.escape(a) + r"(?!”)", sentence) for a in ref.aliases)
        return names or bool(pronoun and re.search(pronoun + "(?![们人])", sentence))
    surname = ref.name.split()[-1] if len(ref.name.split()) > 1 else ""
    # A bare surname right after another capitalised name is someone else ("Pierre Curie"); after "the" it is a
    # title ("the Countess of Lovelace"); every other alias, given names included, is the persona.
    names = any(re.search((r"(?<![A-Z][\w'’\-] )(?<!the )" if a == surname else "") + r"(?<![\w])" + re.escape(a)
                          + r"(?![\w])", sentence) for a in ref.aliases)
    pronouns = _PRONOUNS.get(ref.pronoun, {})
    return names or bool(pronouns and re.search(r"\b(" + "|".join(set(pronouns.values())) + r")\b", sentence,
                                                 re.IGNORECASE))


def first_person_markers(sentence: str, language: str) -> bool:
    """True if the sentence speaks in the first person."""
    if language == "zh":
        return "我" in sentence
    return bool(re.search(r"\b(I|my|me|myself|mine)\b", sentence))


# -- entities, years, topics -------------------------------------------------------------------------------------
def entities(text: str, ref: PersonaRef) -> list[str]:
    """Named things in the text (capitalised phrases), excluding the persona and sentence-initial function words."""
    if ref.language == "zh":
        found = re.findall(r"《([^》]{1,20})》|“([^”]{2,12})”", text)
        return _unique(a or b for a, b in found)
    surname = ref.name.split()[-1] if ref.name.split() else ""
    given = {a for a in ref.aliases if " " not in a and a != surname}
    out = []
    for match in _ENTITY.finditer(text):
        phrase = match.group(0).strip()
        words = phrase.split()
        if "I" in words:  # "Whatever I" / "Babbage I": the pronoun ends any name before it
            words = words[: words.index("I")]
        # The persona's own given name ends a name before it too ("At Szczuki Maria fell", "In Note G Ada
        # warned"); a surname does not, since family members share it ("Pierre Curie").
        cut = next((i for i, w in enumerate(words) if i and re.sub(r"['’]s$", "", w) in given), None)
        words = words[:cut] if cut else words
        while words and words[0] in _NOT_ENTITY:
            words = words[1:]
        phrase = re.sub(r"['’]s$", "", " ".join(words))
        if not phrase or phrase in _MONTHS or any(phrase == a for a in ref.aliases):
            continue
        if phrase.lower() in T.STOPWORDS_EN or len(phrase) < 3:
            continue
        if any(phrase == a or phrase in a.split() for a in ref.aliases):
            continue
        if " " not in phrase and re.search(r"(?:ish|ian|ese|ch)$", phrase) and \
                re.match(r"\s+[a-z]", text[match.end():]):
            continue  # a nationality used as an adjective ("his Polish sympathies"), not a named thing
        out.append(phrase)
    return _unique(out)


@functools.lru_cache(maxsize=8192)  # asked again for every candidate of every perturbed sentence
def entity_kind(entity: str, material: str = "") -> EntityKind:
    """Whether a named thing is a person, a place or something else: by its own words (a title, "Street"), else by
    how the material introduces it ("the poet X", "X, a popular writer" / "in X", "at X"), by majority."""
    words = entity.split()
    if not words or not re.match(r"[A-Za-z]", entity):
        return "other"  # Chinese entities are titles and quotations, all of one kind
    if words[0] in TITLES:
        return "person"
    if any(w in _PLACE_WORDS for w in words):
        return "place"
    votes: Counter[str] = Counter()
    for match in re.finditer(r"(?<![A-Za-z])" + re.escape(entity) + r"(?![A-Za-z])", material):
        before, after = material[max(0, match.start() - 40): match.start()], material[match.end(): match.end() + 60]
        if _PERSON_BEFORE.search(before) or _PERSON_AFTER.match(after):  # the roles include RELATIONS' words
            votes["person"] += 1
        elif _PLACE_BEFORE.search(before):
            votes["place"] += 1
    if not votes or votes["person"] == votes["place"]:
        return "other"
    return "person" if votes["person"] > votes["place"] else "place"


def years(text: str) -> list[str]:
    """Four-digit years in the text."""
    return _unique(_YEAR.findall(text))


def topic_words(text: str, idf: dict[str, float], language: str, limit: int = 3) -> list[str]:
    """The most specific content words of a text (by inverse document frequency in the stage's material)."""
    if language == "zh":
        clauses = [c.strip() for c in re.split(r"[，。！？；、,.!?;：:]", text) if c.strip()]
        clauses = [re.sub(r"^[我她他你]+", "", c) for c in clauses]
        return _unique(c for c in sorted(clauses, key=len) if 4 <= len(c) <= 12)[:limit]
    words = [w for w in T.content_words(text) if len(w) >= 5 and not w.endswith("ly") and w.isalpha()]
    return _unique(sorted(words, key=lambda w: -idf.get(w, 0.0)))[:limit]


def _unique(items: Iterable[str]) -> list[str]:
    seen: set[str] = set()
    out = []
    for item in items:
        if item and item not in seen:
            seen.add(item)
            out.append(item)
    return out


# -- false premises ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FalsePremise:
    """A sentence with one fact changed, and what was changed."""

    false_sentence: str
    true_sentence: str
    truth: str
    false_value: str


def perturb(sentence: str, ref: PersonaRef, other_entities: Sequence[str], rng: random.Random,
            material: str = "") -> FalsePremise | None:
    """Change one fact (a year, another named entity of the same kind, or a number) so the sentence becomes clearly
    false; `material` (the persona's text) tells persons from places (see entity_kind)."""
    premise = _perturb(sentence, ref, other_entities, rng, material)
    if premise is None:
        return None
    # The premise must really be false: the new value is in the changed sentence, the old sentence lacks it.
    if (premise.false_sentence == sentence or premise.false_value == premise.truth
            or premise.false_value not in premise.false_sentence or premise.false_value in sentence):
        return None
    return premise


def _perturb(sentence: str, ref: PersonaRef, other_entities: Sequence[str], rng: random.Random,
             material: str) -> FalsePremise | None:
    found_years = years(sentence)
    if found_years:
        truth = rng.choice(found_years)
        shift = rng.choice([-1, 1]) * rng.randint(4, 15)
        wrong = str(int(truth) + shift)
        return FalsePremise(_replace_once(sentence, truth, wrong), sentence, truth, wrong)
    mine = entities(sentence, ref)
    candidates = [e for e in other_entities if e not in mine and e not in sentence]
    if mine and candidates:
        truth = rng.choice(mine)
        # A name stands in for a name and a nationality for a nationality ("Polish", "German"), a person for a
        # person and a place for a place, never across.
        kind = entity_kind(truth, material)
        same_shape = [c for c in candidates if len(c.split()) == len(truth.split())
                      and bool(_NATIONALITY.search(c)) == bool(_NATIONALITY.search(truth))
                      and entity_kind(c, material) == kind]
        if not same_shape:
            return None
        wrong = rng.choice(same_shape)
        return FalsePremise(_replace_once(sentence, truth, wrong), sentence, truth, wrong)
    numbers = [n for n in _NUMBER.findall(sentence) if n not in found_years]
    if numbers:
        truth = rng.choice(numbers)
        value = int(truth.replace(",", ""))
        wrong = str(value * rng.choice([2, 3]) + rng.randint(1, 9)) if value < 1000 else str(value // 2)
        return FalsePremise(_replace_once(sentence, truth, wrong), sentence, truth, wrong)
    return None


def _replace_once(sentence: str, old: str, new: str) -> str:
    """Replace the first whole occurrence of `old`: digits must not touch digits, Latin words not letters.

    A CJK character is a word character to the regex engine, so a plain \\w boundary never matches between
    Chinese characters ("1833年"); the boundary is drawn against characters of the value's own class instead.
    """
    if old[:1].isdigit():
        edge = r"0-9"
    elif re.match(r"[A-Za-z]", old):
        edge = r"A-Za-z0-9"
    else:
        return sentence.replace(old, new, 1)
    return re.sub(rf"(?<![{edge}])" + re.escape(old) + rf"(?![{edge}])", new, sentence, count=1)


LONG_BEFORE_YEARS = 100  # an event this long before the first stage was surely before the persona was born


def label_year(label: str) -> int | None:
    """The year a stage label names ('1835', 'summer 1843', '1890s'), if any."""
    match = re.search(r"(?<!\d)(\d{3,4})(?!\d)", label)
    return int(match.group(1)) if match else None


def lower_start(text: str, material: str = "") -> str:
    """The text with its first letter lowercased to follow a lead-in, unless its first word is 'I' or a name
    (a word the material also writes capitalised inside a sentence, or the first of two capitalised words:
    "Woronzow Greig" though the material only ever starts a sentence with him)."""
    words = text.split()
    first = words[0] if words else ""
    if not first or first in ("I", "I'm", "I've", "I'd", "I'll") or first.isupper() or not first[:1].isupper():
        return text
    second = words[1] if len(words) > 1 else ""
    if first.lower() not in T.STOPWORDS_EN and (named_inside(first, material)
                                                or (second[:1].isupper() and second not in ("I", "I'm"))):
        return text
    return text[:1].lower() + text[1:]


def named_inside(word: str, material: str) -> bool:
    """True when the material writes `word` capitalised inside a sentence, as a name ("in The Times", "to Babbage")."""
    return re.search(r"[a-z,;] " + re.escape(word) + r"\b", material) is not None
