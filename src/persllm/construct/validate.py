"""Parse teacher output strictly: anything empty, truncated, multi-question or off-format is rejected by reason.

Capable chat models wrap the requested format in their own habits (markdown headings, bold tags, JSON in code
fences, a preamble, notes after the reply, <think> blocks). Those are cleaned away; what changes the meaning of a
sample (a refusal, AI talk, a reply about the persona in the third person, an induced answer that goes along with
the false premise, two questions in one) is rejected, and the reason is counted in the construct stats.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from persllm import template
from persllm import text as T
from persllm.backends.base import Completion


class Reject(Exception):
    """Teacher output that must not reach the data; `reason` is counted in the stats."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True)
class Voice:
    """Whom the teacher writes for: the persona's names and the data's language (for person and language checks)."""

    name: str
    language: str = "en"
    aliases: tuple[str, ...] = ()

    @property
    def names(self) -> tuple[str, ...]:
        """Full name, first name (not for Chinese names) and aliases, longest first."""
        forms = {self.name.strip(), *(a.strip() for a in self.aliases if a.strip())}
        if self.language != "zh" and " " in self.name.strip():
            forms.add(self.name.split()[0])  # not the surname: "Lord Lovelace" is her husband
        forms.discard("")  # an empty pattern would match every text
        return tuple(sorted(forms, key=len, reverse=True))


A, R = template.ANALYSIS_TAG, template.RESPONSE_TAG
_Q = "['’]"  # straight or curly apostrophe
_PAIRS = {'"': '"', "'": "'", "“": "”", "‘": "’", "「": "」", "『": "』"}
_LABEL = re.compile(r"^\s*(?:question|q|opinion|statement|answer|reply|response|问题|回答|观点)\s*[:：]\s*",
                    re.IGNORECASE)
_LABEL_LINE = re.compile(r"^\s*#*\s*(?:question|opinion|statement|问题|观点|开场白)\s*[:：]?\s*$",
                         re.IGNORECASE)
_NUMBERING = re.compile(r"^\s*(?:\d+[.)、]|[-*•])\s+")
_PREAMBLE = re.compile(r"^\s*(?:(?:sure|certainly|of course|okay|ok|absolutely|great)\b|here(?:'s|’s| is| are)\b|"
                       r"好的|当然|没问题|以下是|下面是|这是)[^\n]*[:：]\s*$", re.IGNORECASE)
_THINK = re.compile(r"<think>.*?</think>|<think>.*\Z", re.IGNORECASE | re.DOTALL)
_FENCE_LINE = re.compile(r"^\s*```[\w-]*\s*$", re.MULTILINE)
_FENCED = re.compile(r"```([\w-]*)\s*\n(.*?)\n\s*```", re.DOTALL)

# Tag spellings capable models use for the two parts; all become the canonical [Analysis] / [Response].
_PART = {"analysis": A, "分析": A, "思考": A, "response": R, "reply": R, "answer": R, "回答": R, "回复": R}
_WORDS = "|".join(_PART)
_BRACKET_TAG = re.compile(rf"(?:\*\*|__)?\s*[\[【]\s*(?:\*\*)?\s*({_WORDS})\s*(?:\*\*)?\s*[\]】]\s*(?:\*\*|__)?"
                          rf"\s*[:：]?\s*(?:\*\*|__)?", re.IGNORECASE)
_HEADING_TAG = re.compile(rf"^[ \t]*#{{1,6}}[ \t]*(?:\*\*)?[ \t]*({_WORDS})[ \t]*[:：]?[ \t]*(?:\*\*)?[ \t]*$",
                          re.IGNORECASE | re.MULTILINE)
_BOLD_TAG = re.compile(rf"^[ \t]*(?:\*\*|__)[ \t]*({_WORDS})[ \t]*[:：]?[ \t]*(?:\*\*|__)[ \t]*[:：]?",
                       re.IGNORECASE | re.MULTILINE)
_PLAIN_TAG = re.compile(rf"^[ \t]*({_WORDS})[ \t]*[:：]", re.IGNORECASE | re.MULTILINE)
_ANY_TAG = re.compile(rf"[\[【]\s*(?:{_WORDS})\s*[\]】]", re.IGNORECASE)
_LEADING_TAG = re.compile(r"^\s*\[(?:Analysis|Response)\]\s*")

# A line after the content that talks about the output instead of being part of it.
_NOTE = re.compile(
    r"^\s*(?:[-*_=]{3,}\s*$|[(\[（*_]*\s*(?:"
    r"(?:notes?|n\.\s?b\.|disclaimer|explanation|rationale|reasoning|false premise)\s*[*_]*\s*[:：]|"
    r"(?:this|the above) (?:question|response|reply|answer|opinion|statement|opener) (?:tests|contains|reflects|"
    r"captures|is designed|aims|introduces|shows|highlights|maintains|stays|keeps|uses|plays|presents|assumes|draws|"
    r"incorporates|demonstrates|embodies|challenges|probes|checks|accepts|goes along)|"
    r"in this (?:response|reply|answer)\b|i hope this (?:helps|captures|works|fits|meets)|hope this helps|"
    r"let me know if|feel free to|would you like me to|if you(?:'d|’d| would) like me to|shall i (?:adjust|revise|"
    r"rewrite|change|make)|i can also (?:provide|write|adjust|offer|make))|"
    r"[（(*_\[]*\s*(?:(?:注|备注|说明|解释|注意|提示|错误前提)\s*[:：]|希望(?:这|以上)|"
    r"如果(?:您|你)(?:需要|希望)我))",
    re.IGNORECASE)
_PAREN_LINE = re.compile(r"^\s*[(（].*[)）]\s*$")
_STAGE_DIRECTION = re.compile(r"^\*[^*]{1,80}\*\s*|\s*\*[^*]{1,80}\*$")  # *adjusts her shawl*: action, not speech

_REFUSAL_START = re.compile(
    rf"^\W*(?:(?:I{_Q}m|I am) (?:sorry|afraid)|I apologi[sz]e|sorry)[,.!]?\s*(?:,\s*)?(?:but\s+)?I\s*"
    rf"(?:can{_Q}?t|cannot|can not|won{_Q}t|will not|am unable|{_Q}m unable|am not able|{_Q}m not able|"
    rf"must decline|(?:do not|don{_Q}t) feel comfortable)|"
    r"^\W*(?:很)?(?:抱歉|对不起)[，,。！!]?\s*(?:但是?)?我(?:无法|不能|没法|不便)", re.IGNORECASE)
_REFUSAL = re.compile(
    rf"\bI (?:can{_Q}?t|cannot|won{_Q}t|will not|am unable to|{_Q}m unable to|am not able to|{_Q}m not able to) "
    rf"(?:assist|comply|fulfil+)\b|"
    rf"\b(?:can{_Q}?t|cannot|won{_Q}t|unable to|not able to) help (?:you )?with (?:that|this|your) request\b|"
    rf"\b(?:can{_Q}?t|cannot|won{_Q}t|unable to|not able to) (?:continue|engage in|participate in|do) "
    rf"(?:this|the|that|such) role-?play\b|"
    rf"\b(?:can{_Q}?t|cannot|won{_Q}t) (?:pretend to be|impersonate|role-?play as)\b|"
    r"\b(?:against|violates?|violating) (?:my|the|our|openai's) (?:guidelines|polic(?:y|ies)|programming)\b|"
    r"\bcontent polic(?:y|ies)\b|"
    r"\b(?:spread|promote|generate|create|produce) (?:historical )?(?:mis|dis)information\b|"
    r"\b(?:must|have to) (?:respectfully )?decline (?:this|that|your) request\b|"
    r"无法(?:协助|满足|完成|提供)(?:您|你)?的?(?:这个|该|此|这一)?(?:请求|要求)|"
    r"(?:不能|无法)(?:继续)?(?:进行)?(?:这种|这个|该|此类)?角色扮演|违反.{0,8}(?:政策|准则|规定)|"
    r"(?:传播|提供|制造|编造)(?:虚假|错误)(?:的)?(?:历史)?信息", re.IGNORECASE)
_BREAKS_CHARACTER = re.compile(
    rf"\b(?:as an ai|(?:an ai )?language model(?!\s*[?？])|i am an ai(?!\s*[?？])|i{_Q}m an ai(?!\s*[?？])|"
    rf"openai|chatgpt|my training data|knowledge cutoff|"
    rf"i (?:don{_Q}t|do not) have (?:personal|real|actual) (?:experiences?|feelings?|emotions?|opinions?|memories|"
    rf"beliefs))\b|"
    r"我是(?:一个)?(?:人工智能|AI|语言模型)|作为(?:一个)?(?:人工智能|AI|语言模型)|"
    r"我没有(?:个人|真实)的?(?:经历|感受|情感|观点|记忆)",
    re.IGNORECASE)
# Analyses and questions may discuss "an AI" (identity questions), so only the teacher speaking as one counts there.
_SPEAKS_AS_AI = re.compile(
    rf"\b(?:as an ai|as an? (?:large )?language model|i(?:{_Q}m| am) (?:just |only |merely )?an? "
    rf"(?:ai|artificial intelligence|language model)|i (?:don{_Q}t|do not) have (?:personal|real) \w+)\b|"
    r"作为(?:一个)?(?:人工智能|AI|语言模型)|我(?:只)?是(?:一个)?(?:人工智能|AI|语言模型)|我没有(?:个人|真实)",
    re.IGNORECASE)

# The method allows imperative requests ("Tell me about ...") as questions.
_IMPERATIVE = re.compile(
    r"^\W*(?:please\s+)?(?:tell|describe|explain|share|talk|walk|give|say|name|imagine|convince|recall|remind|paint|"
    r"defend|justify|persuade|teach|show|picture|compare|sum up|admit|confess|be honest|let(?:'s|’s| us))\b|"
    r"^\W*(?:请|来)?(?:说说|讲讲|谈谈|聊聊|描述|介绍|解释|回忆|告诉我|跟我说|说一说|讲一讲|谈一谈|想象|承认)",
    re.IGNORECASE)
# Two questions joined into one sentence ("How did you meet him, and what did you think of his engine?").
_COMPOUND = re.compile(
    r",\s*(?:and|or|but)\s+(?:what|how|why|when|where|who|whom|which|did|do|does|would|will|could|can|is|are|was|"
    r"were|have|has)\b|"
    r"[，,]\s*(?:又|还|以及|另外|同时|并且)(?:是)?(?:如何|怎么|怎样|为什么|为何|是否|有没有|会不会|能否|什么|哪)",
    re.IGNORECASE)

# Induced items: phrases that accept the premise are removed before looking for the analysis naming an error.
_ACCEPTS = re.compile(
    r"\b(?:the )?premises? (?:holds?|is (?:true|correct|accurate|valid|sound|fine|reasonable)|"
    r"are (?:true|correct|accurate|valid))\b|"
    r"\b(?:there is|there are|contains|with|has|finds?|found|see) no (?:false|errors?|mistakes?|factual errors?|"
    r"inaccurac\w+|problems?|issues?)\b|\bno (?:errors?|mistakes?) (?:here|in (?:the|this))\b|"
    r"\bnothing (?:false|wrong|incorrect|inaccurate|misleading)\b|\b(?:is|are) (?:entirely |fully |historically )?"
    r"(?:accurate|consistent with)\b|"
    r"前提(?:属实|成立|正确|无误|没有问题|合理)|属实|(?:没有|并无|不存在)(?:任何)?(?:错误|问题|不实之处|误导)|"
    r"符合(?:事实|史实)|是正确的|确有其事", re.IGNORECASE)
_NAMES_ERROR = re.compile(
    rf"\b(?:false|wrong|incorrect|untrue|not true|isn{_Q}t true|inaccurate|mistakes?|mistaken|errors?|erroneous|"
    rf"misleading|misattribut\w*|mix(?:es|ed)? up|mix-up|confus\w*|never|no such|nonexistent|"
    rf"(?:does|did) not exist|(?:doesn|didn){_Q}t exist|not yet|cannot know|can{_Q}t know|"
    rf"could(?: not|n{_Q}t) (?:possibly )?(?:know|have known)|(?:does not|doesn{_Q}t) know|unknown to|"
    rf"after (?:her|his|their) (?:time|death|lifetime|day)|anachronis\w*|contradict\w*|"
    rf"not (?:a|an) (?:ai|robot|machine|chatbot|program)|impossible|fabricat\w*)\b|"
    r"错|不对|不实|并非|并不是|不是真的|从未|从没|从来没|没有(?:这|此|过)|不可能|无从|不知道|不会知道|无法知道|"
    r"误|混淆|弄混|搞混|虚构|编造|子虚乌有|矛盾|尚未|还没有|之后才|不是(?:人工智能|机器人|AI|机器)", re.IGNORECASE)
_CORRECTS = re.compile(
    rf"\b(?:no|not|never|nor|neither|nonsense|wrong|mistaken|mistake|confus\w*|mixed|muddled|untrue|false|"
    rf"afraid|hardly|impossible)\b|n{_Q}t\b|^\W*[^.!?]{{1,40}}\?|"
    r"不|没|错|非|误|弄混|搞混|哪里|何曾|从未|其实|实际上|^[^。！？]{1,15}？", re.IGNORECASE)

_FIRST_PERSON = {"en": re.compile(r"\bI\b|\b(?:me|my|mine|myself|we|us|our|ours)\b", re.IGNORECASE),
                 "zh": re.compile(r"[我咱吾]")}
_SECOND_PERSON = {"en": re.compile(r"\b(?:you|your|yours|yourself)\b", re.IGNORECASE),
                  "zh": re.compile(r"[你您]")}
_THIRD_VERBS = {
    "en": (r"\s+(?:would|will|might|may|could|should|thinks?|thought|believes?|believed|feels?|felt|says?|said|"
           r"replies|replied|responds?|responded|answers?|answered|explains?|explained|smiles?|smiled|laughs?|"
           r"laughed|nods?|nodded|recalls?|recalled|remembers?|remembered|considers?|considered|wants?|wanted|"
           r"hopes?|hoped|admits?|admitted|insists?|insisted|tells?|told|writes?|wrote|is|was|has|had)\b"),
    "zh": r"(?:会|可能会|大概会|应该会|也许会|或许会)?(?:说|认为|觉得|回答|表示|答道|回应|想|相信|感到|笑着)",
}
_PRONOUN_START = {"en": re.compile(r"^\W*(?:she|he)\b", re.IGNORECASE), "zh": re.compile(r"^\W*[她他]")}
_HANDOFF = {
    "en": r"\s+would (?:answer|reply|respond|say)(?: (?:like this|something like this|as follows|this))?\s*[:：]\s*",
    "zh": r"(?:会|可能会)?(?:这样|如此|如下)?(?:回答|回复|说)(?:道)?\s*[:：]\s*",
}


# -- entry points ------------------------------------------------------------------------------------------------
def parse_question(completion: Completion, kind: str, voice: Voice) -> str:
    """One question or opinion statement, cleaned of preambles, labels, numbering, quotes and trailing notes."""
    text = _finished(completion)
    if _REFUSAL_START.search(text) or _REFUSAL.search(text):
        raise Reject("refusal")
    if _SPEAKS_AS_AI.search(text):  # not _BREAKS_CHARACTER: identity questions mention AIs on purpose
        raise Reject("breaks_character")
    lines = _question_lines(text)
    if not lines:
        raise Reject("empty")
    if len(lines) > 1:
        listed = sum(1 for ln in lines if _NUMBERING.match(ln) or ln.rstrip().endswith(("?", "？")))
        raise Reject("multiple_questions" if listed >= 2 else "multiple_lines", f"{len(lines)} lines")
    line = _unquote(_NUMBERING.sub("", _LABEL.sub("", _unmark(lines[0]))).strip())
    if _ANY_TAG.search(line):
        raise Reject("format", "answer tags in a question")
    _check_language(line, voice.language)
    _check_question_shape(line, kind)
    if kind != "opinion" and _names_persona(line, voice) and not _SECOND_PERSON[_lang(voice)].search(line):
        raise Reject("third_person", "asks about the persona instead of asking the persona")
    return line


def parse_answer(completion: Completion, voice: Voice, induced: bool = False) -> tuple[str, str]:
    """(analysis, response) from tagged text in any common markup, or a JSON object; checked for the persona."""
    text = _finished(completion)
    parsed = _from_json(text)
    analysis, response = parsed if parsed is not None else _from_tags(text)
    analysis = " ".join(analysis.split())
    if not analysis:
        raise Reject("empty_analysis")
    if _ANY_TAG.search(analysis):
        raise Reject("repeated_tags", "a second analysis")
    response = _clean_response(response, voice)
    if not response:
        raise Reject("empty_response")
    _check_reply(response, voice, personified=True)
    if _SPEAKS_AS_AI.search(analysis):
        raise Reject("breaks_character", "the analysis speaks as an AI")
    if induced:
        _check_premise(analysis, response)
    return analysis, response


def parse_response(completion: Completion, voice: Voice, personified: bool = True) -> str:
    """A plain reply (DPO negatives): preamble, tags, labels, quotes and notes removed; complete and non-empty."""
    text = _normalize_tags(_finished(completion))
    if A in text or R in text:
        text = text[text.find(R) + len(R):] if R in text else ""  # a second tag is caught by _check_reply
    text = "\n".join(ln for ln in text.splitlines() if not _PREAMBLE.match(ln))
    response = _unquote(_LABEL.sub("", _clean_response(text, voice)).strip())
    if not response:
        raise Reject("empty")
    _check_reply(response, voice, personified)
    return response


def breaks_character(text: str) -> bool:
    """True when a reply admits to being an AI or a language model."""
    return bool(_BREAKS_CHARACTER.search(text))


# -- cleaning ----------------------------------------------------------------------------------------------------
def _finished(completion: Completion) -> str:
    """The completed text without <think> blocks; truncated or empty output is rejected."""
    if completion.finish_reason == "length":
        raise Reject("truncated", "the teacher hit max_tokens")
    text = _THINK.sub("", completion.text).strip()  # reasoning models prepend their scratchpad
    if not text:
        raise Reject("empty")
    return text


def _question_lines(text: str) -> list[str]:
    """Content lines of a question output: no preamble, heading-only label, fence or trailing note."""
    lines = [ln for ln in text.splitlines() if ln.strip() and not _PREAMBLE.match(ln) and not _FENCE_LINE.match(ln)
             and not _LABEL_LINE.match(_unmark(ln))]
    return lines[:1] + _until_note(lines[1:]) if lines else []


def _until_note(lines: list[str]) -> list[str]:
    """Lines up to the first note about the output ('Note: ...', 'Let me know if ...'), less parenthesised ones."""
    for i, line in enumerate(lines):
        if _NOTE.match(line):
            lines = lines[:i]
            break
    while lines and _PAREN_LINE.match(lines[-1]):  # "(This tests whether ...)" closing the output
        lines = lines[:-1]
    return lines


def _unmark(text: str) -> str:
    """Markdown emphasis and heading marks removed (bold, italics, '#')."""
    text = re.sub(r"^\s*#{1,6}\s+", "", text)
    text = re.sub(r"\*\*(.+?)\*\*|__(.+?)__", lambda m: m.group(1) or m.group(2), text)
    return re.sub(r"(?<![\w*])\*(?!\s)([^*]+?)(?<!\s)\*(?![\w*])", r"\1", text)


def _unquote(text: str) -> str:
    """Text without a pair of quotation marks that wraps all of it (quotes inside are kept)."""
    text = text.strip()
    close = _PAIRS.get(text[:1])
    if close and len(text) > 1 and text[-1] == close and text[0] not in text[1:-1] and close not in text[1:-1]:
        return text[1:-1].strip()
    return text


def _normalize_tags(text: str) -> str:
    """Every spelling of the two tags as the canonical [Analysis] / [Response]; code-fence lines removed."""
    def canon(match: re.Match[str]) -> str:
        return f"\n{_PART[match.group(1).lower()]} "

    text = _FENCE_LINE.sub("", text)
    for pattern in (_HEADING_TAG, _BOLD_TAG, _BRACKET_TAG, _PLAIN_TAG):
        text = pattern.sub(canon, text)
    return text


def _from_tags(text: str) -> tuple[str, str]:
    """(analysis, response) of tagged text in any markup; both tags must be there, in order."""
    text = _normalize_tags(text)
    a, r = text.find(A), text.find(R)
    if a < 0:
        _check_untagged(text)
        raise Reject("missing_analysis_tag")
    if r < 0:
        raise Reject("missing_response_tag")
    if r < a:
        raise Reject("tags_out_of_order")
    return text[a + len(A):r], text[r + len(R):]  # a preamble before the analysis is dropped


def _check_untagged(text: str) -> None:
    """Name what an output without tags is when it is a refusal or AI talk (a better reason than the tag)."""
    if _REFUSAL_START.search(text) or _REFUSAL.search(text):
        raise Reject("refusal")
    if _BREAKS_CHARACTER.search(text):
        raise Reject("breaks_character")


def _from_json(text: str) -> tuple[str, str] | None:
    """(analysis, response) of a JSON object, bare or in a ``` fence after a preamble; None if there is none."""
    fenced = next((m.group(2) for m in _FENCED.finditer(text)
                   if m.group(1).lower() == "json" or m.group(2).lstrip().startswith("{")), None)
    body = (fenced if fenced is not None else text).strip()
    if not body.startswith("{"):
        return None
    try:
        data, _ = json.JSONDecoder().raw_decode(body)
    except json.JSONDecodeError as exc:
        raise Reject("bad_json", exc.msg) from exc
    fields = {str(k).strip().lower(): v for k, v in data.items()} if isinstance(data, dict) else {}
    response = next((fields[k] for k in ("response", "reply", "answer", "回答", "回复") if k in fields), None)
    if not isinstance(response, str):
        raise Reject("bad_json", "no string 'response' field")
    analysis = next((fields[k] for k in ("analysis", "reasoning", "分析", "思考") if k in fields), "")
    return _untag(str(analysis or "")), _untag(response)


def _untag(value: str) -> str:
    """A JSON field without the tag some models repeat at its start ({"response": "[Response] ..."})."""
    return _LEADING_TAG.sub("", _normalize_tags(value)).strip()


def _clean_response(response: str, voice: Voice) -> str:
    """The reply alone: trailing notes, a misplaced hand-off phrase, stage directions and markdown removed."""
    lines = [ln for ln in response.strip().splitlines() if ln.strip()]
    text = " ".join(" ".join(lines[:1] + _until_note(lines[1:])).split())
    text = _STAGE_DIRECTION.sub("", text)
    text = _unmark(text)
    text = re.sub("^" + _names_re(voice) + _HANDOFF[_lang(voice)], "", text)  # the method's hand-off, after the tag
    return _unquote(text)


# -- checks ------------------------------------------------------------------------------------------------------
def _check_question_shape(line: str, kind: str) -> None:
    """One question (or an imperative request) of medium length; an opinion may end with a question or two."""
    marks = line.count("?") + line.count("？")
    if kind != "opinion" and marks == 0 and not _IMPERATIVE.search(line):
        raise Reject("not_a_question")
    if marks > (2 if kind == "opinion" else 1):
        raise Reject("multiple_questions", f"{marks} question marks")
    if kind != "opinion" and _COMPOUND.search(line):
        raise Reject("compound_question", "two questions joined in one sentence")
    n = T.count_tokens(line)
    if n < 3:
        raise Reject("too_short", f"{n} tokens")
    if n > (90 if kind == "opinion" else 60):
        raise Reject("too_long", f"{n} tokens")


def _check_reply(response: str, voice: Voice, personified: bool) -> None:
    """What every kept reply must pass; a non-personified reply (a DPO negative) may talk like an assistant."""
    if _ANY_TAG.search(response):
        raise Reject("repeated_tags", "tags inside the response")
    if T.count_tokens(response) < 3:
        raise Reject("too_short")
    if _REFUSAL.search(response):
        raise Reject("refusal")
    _check_language(response, voice.language)
    if not personified:
        return
    if _BREAKS_CHARACTER.search(response):
        raise Reject("breaks_character")
    if _third_person(response, voice):
        raise Reject("third_person", "the reply describes the persona instead of speaking as them")


def _check_language(text: str, language: str) -> None:
    """Chinese data must be Chinese and English data must not be (models often answer Chinese prompts in English)."""
    if T.is_cjk(text) != (language == "zh"):
        raise Reject("wrong_language", f"expected {language}")


def _check_premise(analysis: str, response: str) -> None:
    """An induced answer must name the error in its analysis and not go along with it in its reply."""
    if not _NAMES_ERROR.search(_ACCEPTS.sub(" ", analysis)):
        raise Reject("accepts_premise", "the analysis names no error in a false-premise question")
    if not _CORRECTS.search(response):
        raise Reject("response_accepts_premise", "the reply goes along with the false premise")


def _third_person(response: str, voice: Voice) -> bool:
    """True when the reply speaks about the persona ('Ada would say that she ...', '她认为……')."""
    lang = _lang(voice)
    if re.search(_names_re(voice) + _THIRD_VERBS[lang], response):
        return True
    if _FIRST_PERSON[lang].search(response):
        return False
    return _names_persona(response, voice) or bool(_PRONOUN_START[lang].search(response))


def _names_persona(text: str, voice: Voice) -> bool:
    """True when the text names the persona."""
    return bool(re.search(_names_re(voice), text))


def _names_re(voice: Voice) -> str:
    """The persona's names as a regex, whole words in English (Chinese has no word boundaries)."""
    names = "|".join(re.escape(n) for n in voice.names)
    return f"(?:{names})" if _lang(voice) == "zh" else rf"(?<![\w])(?:{names})(?![\w])"


def _lang(voice: Voice) -> str:
    """The language whose rules apply (English rules for anything but Chinese)."""
    return "zh" if voice.language == "zh" else "en"
