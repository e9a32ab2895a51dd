"""Language-aware text helpers: token counts that work for Chinese and English, sentences, content words."""

from __future__ import annotations

import re
import unicodedata

# A "token" is a CJK character, a run of letters/digits, or one punctuation mark. For English this is close to a
# word count (the paper's budgets are in words); for Chinese it counts characters, so budgets still bind.
_TOKEN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\u3040-\u30ff]|[^\W_]+(?:['’][^\W_]+)*|[^\w\s]",
                    re.UNICODE)
_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_SENTENCE_END = re.compile(r"(?<=[.!?。！？])[\"'”’)）]*\s+|(?<=[。！？])")
_LEADING_TAG = re.compile(r"^\s*(?:【[^】]*】)+\s*")  # the reference data's optional 【tag】 prefix

STOPWORDS_EN = frozenset(
    ["a", "an", "the", "and", "or", "but", "if", "of", "to", "in", "on", "at", "by", "for", "with", "from", "as", "is", "was", "were", "be", "been", "being", "are", "am", "it", "its", "this", "that", "these", "those", "he", "she", "they", "we", "i", "you", "his", "her", "their", "our", "my", "your", "me", "him", "them", "us", "who", "whom", "which", "what", "when", "where", "why", "how", "not", "no", "so", "than", "then", "there", "here", "very", "can", "could", "would", "should", "will", "shall", "may", "might", "must", "do", "did", "does", "done", "have", "has", "had", "having", "into", "onto", "about", "over", "under", "after", "before", "during", "while", "because", "also", "just", "only", "more", "most", "such", "some", "any", "all", "each", "other", "both", "own", "same", "too", "again", "further", "once", "up", "down", "out", "off"])


def tokens(text: str) -> list[str]:
    """Split text into tokens (CJK characters, words, punctuation marks)."""
    return _TOKEN.findall(text)


def count_tokens(text: str) -> int:
    """Number of tokens in `text`."""
    return len(_TOKEN.findall(text))


def is_cjk(text: str) -> bool:
    """True when most letters in `text` are CJK characters."""
    cjk = len(_CJK.findall(text))
    letters = sum(1 for ch in text if ch.isalpha())
    return letters > 0 and cjk / letters > 0.3


def time_phrase(label: str, language: str) -> str:
    """A stage label as it reads inside a sentence: a bare year takes 年 in Chinese ("现在是1922年", not "现在是1922")."""
    label = label.strip()
    return label + "年" if language == "zh" and re.fullmatch(r"\d{3,4}", label) else label


def strip_tag(line: str) -> str:
    """Drop a leading 【tag】 as the reference material format allows."""
    return _LEADING_TAG.sub("", line)


def normalize(text: str) -> str:
    """NFKC, collapsed whitespace."""
    return re.sub(r"\s+", " ", unicodedata.normalize("NFKC", text)).strip()


_ABBREVIATION = re.compile(r"(?:^|\s)(?:[A-Z]|Mr|Mrs|Ms|Dr|St|Prof|Mme|Mlle|Messrs)\.$")


def sentences(text: str) -> list[str]:
    """Split a paragraph into sentences (English and Chinese punctuation); "M. Debierne" is not a sentence end,
    nor is a full stop inside a quotation (“……。”)."""
    out: list[str] = []
    for part in (p.strip() for p in _SENTENCE_END.split(text)):
        if not part:
            continue
        if out and (_ABBREVIATION.search(out[-1]) or out[-1].count("“") > out[-1].count("”")):  # inside a quote
            out[-1] = f"{out[-1]}{'' if is_cjk(part) else ' '}{part}"
        else:
            out.append(part)
    return out


def quotes_balanced(text: str) -> bool:
    """True when every quotation opened in the text is closed in it."""
    return text.count('"') % 2 == 0 and text.count("“") == text.count("”")


def content_words(text: str) -> list[str]:
    """Lowercased tokens that carry meaning: CJK characters and non-stopword words of 3+ letters."""
    out = []
    for tok in tokens(text):
        if _CJK.match(tok):
            out.append(tok)
        elif tok[0].isalnum() and len(tok) >= 3 and tok.lower() not in STOPWORDS_EN:
            out.append(tok.lower())
    return out


def truncate_tokens(text: str, budget: int) -> str:
    """The longest prefix of `text` with at most `budget` tokens, cut at a sentence end when possible."""
    if count_tokens(text) <= budget:
        return text
    kept: list[str] = []
    used = 0
    for sentence in sentences(text):
        n = count_tokens(sentence)
        if used + n > budget:
            break
        kept.append(sentence)
        used += n
    if kept:
        return " ".join(kept) if not is_cjk(text) else "".join(kept)
    matches = list(_TOKEN.finditer(text))
    return text[: matches[budget - 1].end()] if budget > 0 else ""


def split_long(text: str, max_tokens: int, overlap: int) -> list[str]:
    """Split a long paragraph into pieces of at most `max_tokens`, sharing about `overlap` tokens, at sentences."""
    if count_tokens(text) <= max_tokens:
        return [text]
    joiner = "" if is_cjk(text) else " "
    units = _units(text, max_tokens)
    pieces: list[str] = []
    start = 0
    while start < len(units):
        end, used = start, 0
        while end < len(units) and (end == start or used + units[end][1] <= max_tokens):
            used += units[end][1]
            end += 1
        pieces.append(joiner.join(u for u, _ in units[start:end]))
        if end >= len(units):
            break
        back, shared = end, 0  # step back over whole sentences until about `overlap` tokens are shared
        while back - 1 > start and shared + units[back - 1][1] <= overlap:
            back -= 1
            shared += units[back][1]
        start = back
    return pieces


def _units(text: str, max_tokens: int) -> list[tuple[str, int]]:
    """Sentences with their token counts; a sentence longer than the budget is cut into token windows."""
    units: list[tuple[str, int]] = []
    for sentence in sentences(text):
        n = count_tokens(sentence)
        if n <= max_tokens:
            units.append((sentence, n))
            continue
        spans = list(_TOKEN.finditer(sentence))
        for i in range(0, len(spans), max_tokens):
            window = spans[i:i + max_tokens]
            units.append((sentence[window[0].start():window[-1].end()], len(window)))
    return units
