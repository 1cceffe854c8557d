"""Turns a free-text edit instruction ("remove the man walking in the background", 在画面左侧添加一棵开花的树)
into a structured `EditInstruction` (op, target, replacement, place), and an "add" place into a pixel region.

The parser is a small, deterministic rule set for English and Chinese, so the edit path works without any
language model; an optional `Rewriter` (e.g. an LLM that normalises free phrasing into one of the accepted forms)
runs before it. How the text is split:

* **op** comes from the leading verb (remove/erase/delete/get rid of..., add/insert/put..., replace/swap/change/
  turn...; 移除/删掉/去掉..., 添加/加/放..., 把X换成Y/用Y替换X...).
* **target** is the object phrase with its modifiers kept ("man walking": the participle helps the detector tell
  which man) but without articles/quantifiers ("the", "a", 一棵, 这只), without relative-clause glue ("who is") and
  without the place phrase; English is lowercased. For "add" it is the object to add; for "replace" the object
  being replaced. Phrases naming the medium ("from the video", 视频里的) are dropped.
* **place** is a trailing (or leading) position phrase split off the object phrase: absolute ("on the left",
  "in the top-right corner", "in the background", 左侧, 右上角, 背景中) or relative to other objects, which become
  `anchors` ("next to the sofa", "between the car and the tree", 沙发旁边, 汽车和树之间). A place only counts as
  one when its position word is recognised, so "the man in the red shirt" keeps "in the red shirt" in the target.
"""

from __future__ import annotations

import numbers
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, get_args

Op = Literal["remove", "add", "replace"]
Language = Literal["en", "zh"]
AbsoluteKind = Literal[
    "left", "right", "top", "bottom", "center",
    "top-left", "top-right", "bottom-left", "bottom-right",
    "background", "foreground",
]  # fmt: skip
RelativeKind = Literal["between", "near", "behind", "in-front-of", "above", "below", "left-of", "right-of"]
PlaceKind = Literal[AbsoluteKind, RelativeKind]
Box = tuple[float, float, float, float]
"""(x0, y0, x1, y1) in pixels; x0/y0 inclusive, x1/y1 exclusive."""

ABSOLUTE_KINDS: frozenset[str] = frozenset(get_args(AbsoluteKind))
RELATIVE_KINDS: frozenset[str] = frozenset(get_args(RelativeKind))

ACCEPTED_FORMS = """accepted forms (English or Chinese), one edit per instruction:
  remove:  "remove the man walking in the background", "erase the logo", "get rid of the dog",
           "删掉右上角的水印", "移除背景中走过的行人", "把狗去掉"
  add:     "add a blooming tree on the left", "put a cat next to the sofa",
           "insert a bird between the car and the tree", "在画面左侧添加一棵开花的树", "在汽车和树之间加一只鸟"
  replace: "replace the car with a red bus", "swap the sky for a sunset", "turn the dog into a cat",
           "把汽车换成红色的公交车", "用猫替换狗"
  places:  on the left/right, at the top/bottom, in the top-left corner, in the center, in the background/
           foreground, next to X, behind X, in front of X, above/below X, between X and Y;
           左侧/右侧/上方/下方/左上角/中间/背景中/前景中, X旁边, X后面, X前面, X上方, X和Y之间"""


class InstructionError(ValueError):
    """An edit instruction is empty or matches none of the accepted forms (listed in the message)."""

    def __init__(self, text: object, reason: str) -> None:
        super().__init__(f"instruction {text!r}: {reason}.\n{ACCEPTED_FORMS}")
        self.text = text
        self.reason = reason


class Rewriter(Protocol):
    """Rewrites free phrasing into one of the accepted forms before the rule parser runs (e.g. an LLM preset)."""

    def __call__(self, text: str) -> str: ...


@dataclass(frozen=True)
class Place:
    """Where an edit happens: an absolute frame position, or a position relative to `anchors` (object phrases)."""

    phrase: str
    """The place phrase as written, e.g. "in the background", "next to the sofa", 在画面左侧."""
    kind: PlaceKind
    anchors: tuple[str, ...] = ()
    """Object phrases the place is relative to: two for "between", one for the other relative kinds."""

    def __post_init__(self) -> None:
        if self.kind in ABSOLUTE_KINDS:
            expected = 0
        elif self.kind in RELATIVE_KINDS:
            expected = 2 if self.kind == "between" else 1
        else:
            raise ValueError(f"place kind must be one of {sorted(ABSOLUTE_KINDS | RELATIVE_KINDS)}, got {self.kind!r}")
        if len(self.anchors) != expected or not all(a.strip() for a in self.anchors):
            raise ValueError(f"place kind {self.kind!r} needs {expected} non-empty anchors, got {self.anchors!r}")

    @property
    def is_relative(self) -> bool:
        return self.kind in RELATIVE_KINDS


@dataclass(frozen=True)
class EditInstruction:
    """A parsed edit: what to do (`op`) to which object (`target`), optionally where (`place`)."""

    op: Op
    target: str
    """remove/replace: the object to find in the video; add: the object to paint in."""
    language: Language
    text: str
    """The instruction the rules parsed (after the rewriter, if any)."""
    replacement: str | None = None
    """replace only: what the target becomes."""
    place: Place | None = None

    def __post_init__(self) -> None:
        if self.op not in get_args(Op):
            raise ValueError(f"op must be one of {get_args(Op)}, got {self.op!r}")
        if not self.target:
            raise ValueError("target must be a non-empty object phrase")
        if (self.op == "replace") != bool(self.replacement):
            raise ValueError(f"replacement is required for op 'replace' and only for it, got {self.replacement!r}")


def parse_instruction(text: str, rewriter: Rewriter | None = None) -> EditInstruction:
    """Parse one English or Chinese edit instruction; raise `InstructionError` (listing the accepted forms)
    when it is empty or matches no form. `rewriter`, if given, maps the text to an accepted form first."""
    if not isinstance(text, str):
        raise InstructionError(text, f"expected a string, got {type(text).__name__}")
    if rewriter is not None:
        rewritten = rewriter(text)
        if not isinstance(rewritten, str):
            raise InstructionError(text, f"the rewriter returned {type(rewritten).__name__}, not a string")
        text = rewritten
    text = " ".join(text.split())
    if not text:
        raise InstructionError(text, "it is empty")
    if _CJK.search(text):
        return _parse_zh(text)
    return _parse_en(text)


# -- English ----------------------------------------------------------------------------------------------------

_EN_REMOVE_VERBS = (
    "get rid of", "take out", "take away", "cut out", "wipe out", "wipe away", "clean up", "paint out",
    "remove", "erase", "delete", "eliminate", "clear", "wipe", "scrub", "strip", "hide",
)  # fmt: skip
_EN_ADD_VERBS = ("put in", "add", "insert", "put", "place", "include", "draw", "paint", "create", "introduce")
_EN_REPLACE_VERBS = (
    "swap out", "switch out", "replace", "swap", "change", "turn", "switch", "exchange", "transform", "convert",
    "substitute",
)  # fmt: skip
_EN_VERBS: dict[str, Op] = {
    **{v: "remove" for v in _EN_REMOVE_VERBS},
    **{v: "add" for v in _EN_ADD_VERBS},
    **{v: "replace" for v in _EN_REPLACE_VERBS},
}
_EN_VERB_RE = re.compile(
    r"\b(?P<verb>" + "|".join(re.escape(v) for v in sorted(_EN_VERBS, key=len, reverse=True)) + r")\b"
)
_EN_POLITE_RE = re.compile(
    r"^(?:(?:please|kindly|can you|could you|would you|will you|i want to|i'd like to|i would like to|let's|"
    r"help me|go ahead and|now|then|just|also|completely|entirely|simply)\s+)+"
)
_EN_TRAILING_RE = re.compile(r"(?:\s*,?\s*please)?\s*[.!?。！？]*$")
_EN_MEDIUM = r"(?:video|clip|scene|frame|frames|footage|shot|picture|image|movie|film|screen|view)"
_EN_MEDIUM_NOISE_RE = re.compile(
    rf"\s+(?:from|in|out of|of|on|to|into)\s+(?:the|this|my|our)\s+(?:whole\s+|entire\s+)?{_EN_MEDIUM}$"
    r"|\s+(?:completely|entirely|everywhere|altogether)$"
)
_EN_DETERMINER_RE = re.compile(
    r"^(?:(?:a|an|the|this|that|these|those|some|any|every|each|all|his|her|their|its|my|our|your)(?:\s+|$))+"
)
_EN_RELATIVE_GLUE_RE = re.compile(r"\b(?:who|that|which)\s+(?:is|are|was|were)\s+")
_EN_CHAIN_RE = re.compile(r"(?:,|\band\b|\bthen\b)\s+(?:then\s+)?" + _EN_VERB_RE.pattern.replace("?P<verb>", "?:"))

# position word -> kind; longest alternatives first so "top left" wins over "top"
_EN_POSITIONS: dict[str, AbsoluteKind] = {
    r"(?:top|upper)[- ]left": "top-left",
    r"(?:top|upper)[- ]right": "top-right",
    r"(?:bottom|lower)[- ]left": "bottom-left",
    r"(?:bottom|lower)[- ]right": "bottom-right",
    r"left(?:[- ]hand)?": "left",
    r"right(?:[- ]hand)?": "right",
    r"top|upper": "top",
    r"bottom|lower": "bottom",
    r"cent(?:er|re)|middle": "center",
    r"background|distance|back": "background",
    r"foreground|front": "foreground",
    r"sky": "top",
}
_EN_POS_ALT = "|".join(f"(?P<p{i}>{pattern})" for i, pattern in enumerate(_EN_POSITIONS))
_EN_ABSOLUTE_RE = re.compile(
    r"(?:^|\s)(?P<phrase>(?:on|in|at|to|into|towards?|along|across|near|from|over)\s+(?:the\s+)?"
    rf"(?:(?:far|very|extreme)\s+)?(?:{_EN_POS_ALT})"
    r"(?:\s+(?:side|corner|edge|part|half|third|area|portion|region|section))?"
    rf"(?:\s+of\s+(?:the\s+)?{_EN_MEDIUM})?)$"
)
_EN_LEADING_POSITION_RE = re.compile(
    r"^(?P<pos>(?:top|upper|bottom|lower)[- ](?:left|right)|left(?:most)?|right(?:most)?|background|foreground)"
    r"\s+(?P<rest>\S.*)$"
)
_EN_RELATIONS: dict[str, RelativeKind] = {
    r"(?:to|on) the left(?: side| hand side)? of|left of": "left-of",
    r"(?:to|on) the right(?: side| hand side)? of|right of": "right-of",
    r"in front of": "in-front-of",
    r"in back of|behind": "behind",
    r"on top of|above|over": "above",
    r"underneath|beneath|below|under": "below",
    r"next to|beside|besides|alongside|close to|near|nearby": "near",
}
_EN_REL_ALT = "|".join(f"(?P<r{i}>{pattern})" for i, pattern in enumerate(_EN_RELATIONS))
_EN_RELATIVE_RE = re.compile(rf"(?:^|\s)(?P<phrase>(?:{_EN_REL_ALT})\s+(?P<a>\S.*?))$")
_EN_BETWEEN_RE = re.compile(
    r"(?:^|\s)(?P<phrase>(?:(?:right|somewhere|just)\s+)?(?:in\s+)?between\s+(?P<a>\S.*?)\s+and\s+(?P<b>\S.*?))$"
)
_EN_REPLACE_SPLIT_RE = re.compile(r"^(?P<t>\S.*?)\s+(?P<conn>with|for|into|to|by)\s+(?P<r>\S.*)$")
_EN_DISAPPEAR_RE = re.compile(r"^make\s+(?P<t>\S.*?)\s+(?:disappear|vanish|go away)$")


def _parse_en(original: str) -> EditInstruction:
    text = _EN_TRAILING_RE.sub("", original.lower()).strip()
    text = _EN_POLITE_RE.sub("", text)
    disappear = _EN_DISAPPEAR_RE.match(text)
    if disappear:
        target, place = _split_place_en(disappear.group("t"))
        return _build(original, "remove", target, None, place, "en")

    leading_place: Place | None = None
    match = _EN_VERB_RE.match(text)
    if match is None:  # "on the left, add a tree": a place may come before the verb
        for candidate in _EN_VERB_RE.finditer(text):
            leading_place = _parse_place_en(text[: candidate.start()].strip(" ,"))
            if leading_place is not None:
                match = candidate
                break
    if match is None:
        raise InstructionError(original, "no edit verb found (remove / add / replace and their synonyms)")
    verb, rest = match.group("verb"), text[match.end() :].strip(" ,:")
    op = _EN_VERBS[verb]
    if not rest:
        raise InstructionError(original, f"'{verb}' names no object")
    if _EN_CHAIN_RE.search(rest):
        raise InstructionError(original, "it chains several edits; send one edit per instruction")

    replacement: str | None = None
    if op == "replace":
        split = _EN_REPLACE_SPLIT_RE.match(rest)
        if split is None:
            raise InstructionError(original, f"'{verb}' needs what to replace it with ('{verb} X with Y')")
        object_part, replacement_part = split.group("t"), split.group("r")
        if verb == "substitute" and split.group("conn") == "for":  # "substitute Y for X" puts Y where X was
            object_part, replacement_part = replacement_part, object_part
        target, place = _split_place_en(object_part)
        replacement, replacement_place = _split_place_en(replacement_part)
        place = place or replacement_place
    else:
        target, place = _split_place_en(rest)
    if place is not None and leading_place is not None:
        raise InstructionError(original, "it names two places; give one")
    return _build(original, op, target, replacement, place or leading_place, "en")


def _split_place_en(phrase: str) -> tuple[str, Place | None]:
    """Split "the man walking in the background" into ("man walking", Place(background))."""
    phrase = _EN_MEDIUM_NOISE_RE.sub("", phrase.strip(" ,"))
    place: Place | None = None
    for finder in (_find_between_en, _find_absolute_en, _find_relative_en):
        found = finder(phrase)
        if found is not None:
            place, start = found
            phrase = phrase[:start].strip(" ,")
            break
    phrase = _EN_DETERMINER_RE.sub("", phrase)
    if place is None:  # "the top-right logo", "the left car": a position adjective before the noun
        leading = _EN_LEADING_POSITION_RE.match(phrase)
        if leading is not None:
            place = Place(leading.group("pos"), _en_position_kind(leading.group("pos").removesuffix("most")))
            phrase = leading.group("rest")
    return _clean_object_en(phrase), place


def _find_between_en(phrase: str) -> tuple[Place, int] | None:
    match = _EN_BETWEEN_RE.search(phrase)
    if match is None or not phrase[: match.start("phrase")].strip():
        return None
    anchors = (_clean_object_en(match.group("a")), _clean_object_en(match.group("b")))
    return Place(match.group("phrase"), "between", anchors), match.start("phrase")


def _find_absolute_en(phrase: str) -> tuple[Place, int] | None:
    match = _EN_ABSOLUTE_RE.search(phrase)
    if match is None:
        return None
    kind = next(_EN_POSITIONS[p] for i, p in enumerate(_EN_POSITIONS) if match.group(f"p{i}"))
    return Place(match.group("phrase"), kind), match.start("phrase")


def _find_relative_en(phrase: str) -> tuple[Place, int] | None:
    match = _EN_RELATIVE_RE.search(phrase)
    if match is None or not phrase[: match.start("phrase")].strip():
        return None
    kind = next(_EN_RELATIONS[r] for i, r in enumerate(_EN_RELATIONS) if match.group(f"r{i}"))
    anchor = _clean_object_en(match.group("a"))
    if not anchor:
        return None
    return Place(match.group("phrase"), kind, (anchor,)), match.start("phrase")


def _parse_place_en(phrase: str) -> Place | None:
    """A whole phrase that is only a place ("on the left", "next to the car"), else None."""
    if not phrase:
        return None
    padded = "x " + phrase  # the finders need an object before the place
    for finder in (_find_between_en, _find_absolute_en, _find_relative_en):
        found = finder(padded)
        if found is not None and found[1] == 2:
            return found[0]
    return None


def _en_position_kind(word: str) -> AbsoluteKind:
    return next(kind for pattern, kind in _EN_POSITIONS.items() if re.fullmatch(pattern, word))


def _clean_object_en(phrase: str) -> str:
    phrase = _EN_DETERMINER_RE.sub("", phrase.strip(" ,"))
    return _EN_RELATIVE_GLUE_RE.sub("", phrase).strip(" ,")


# -- Chinese ----------------------------------------------------------------------------------------------------

_CJK = re.compile(r"[\u3400-\u9fff]")
_ZH_REMOVE_VERBS = (
    "移除", "去掉", "去除", "删除", "删掉", "删去", "抹掉", "抹去", "抹除", "擦掉", "擦除", "清除", "消除", "拿掉",
    "除去", "移走", "拿走", "抠掉", "去",
)  # fmt: skip
_ZH_ADD_VERBS = (
    "添加", "加上", "加入", "增加", "插入", "放置", "放上", "放入", "放进", "添上", "画上", "画出", "生成", "放",
    "加", "添", "画",
)  # fmt: skip
_ZH_REPLACE_INFIX = ("替换成", "替换为", "换成", "换为", "变成", "变为", "改成", "改为", "替换", "换")
_ZH_POLITE_RE = re.compile(r"^(?:请你|请|麻烦你|麻烦|帮我|帮忙|给我|能不能|能否|可以|我想|我要|想要|需要)+")
_ZH_TRAILING_RE = re.compile(r"(?:吧|吗|一下|，谢谢|谢谢)?[。！？!?.，,\s]*$")
_ZH_REMOVE_RE = re.compile("^(?:" + "|".join(v for v in _ZH_REMOVE_VERBS if len(v) > 1) + ")掉?(?P<t>.+)$")
_ZH_BA_REMOVE_RE = re.compile("^(?:把|将)(?P<t>.+?)(?:给)?(?:" + "|".join(_ZH_REMOVE_VERBS) + ")掉?$")
_ZH_DISAPPEAR_RE = re.compile(r"^(?:让|使)(?P<t>.+?)消失$")
_ZH_BA_REPLACE_RE = re.compile("^(?:把|将)(?P<t>.+?)(?:" + "|".join(_ZH_REPLACE_INFIX) + ")(?P<r>.+)$")
_ZH_USE_REPLACE_RE = re.compile(r"^(?:用|拿)(?P<r>.+?)(?:替换|替换掉|代替|取代|换掉)(?:掉)?(?P<t>.+)$")
_ZH_VERB_REPLACE_RE = re.compile(r"^(?:替换|更换|换掉)(?P<t>.+?)(?:为|成)(?P<r>.+)$")
_ZH_BARE_REPLACE_RE = re.compile("^(?P<t>.+?)(?:" + "|".join(_ZH_REPLACE_INFIX[:-2]) + ")(?P<r>.+)$")
_ZH_ADD_VERB_RE = re.compile("(?:" + "|".join(_ZH_ADD_VERBS) + ")上?")
_ZH_MEDIUM = r"(?:整个画面|画面|屏幕|视频|图像|图片|镜头|影片|场景)"
_ZH_POSITIONS: dict[str, AbsoluteKind] = {
    "左上角|左上方|左上部|左上": "top-left",
    "右上角|右上方|右上部|右上": "top-right",
    "左下角|左下方|左下部|左下": "bottom-left",
    "右下角|右下方|右下部|右下": "bottom-right",
    "左侧|左边|左方|左面|左半边|左半部分|左部": "left",
    "右侧|右边|右方|右面|右半边|右半部分|右部": "right",
    "上方|上面|上边|上部|顶部|顶端|上半部分|天空中|天上": "top",
    "下方|下面|下边|下部|底部|底端|下半部分": "bottom",
    "正中间|正中央|中间|中央|中心|正中": "center",
    "背景|远处|远景|后景": "background",
    "前景|近处|近景": "foreground",
}
_ZH_POS_ALT = "|".join(f"(?P<p{i}>{pattern})" for i, pattern in enumerate(_ZH_POSITIONS))
_ZH_ABSOLUTE = rf"{_ZH_MEDIUM}?的?最?(?:{_ZH_POS_ALT})(?:部分|区域|位置|处)?"
_ZH_RELATIONS: dict[str, RelativeKind] = {
    "旁边|边上|附近|周围|身边|隔壁|旁": "near",
    "后面|后方|背后|身后": "behind",
    "前面|前方": "in-front-of",
    "上方|上面|上": "above",
    "下方|下面|底下|下": "below",
    "左边|左侧|左方": "left-of",
    "右边|右侧|右方": "right-of",
}
_ZH_REL_ALT = "|".join(f"(?P<r{i}>{pattern})" for i, pattern in enumerate(_ZH_RELATIONS))
_ZH_PLACE_PREFIX = r"(?:在|往|给|于|向|到|从)?"
_ZH_PLACE_SUFFIX = r"(?:中|里|内|处)?"
_ZH_ABSOLUTE_PLACE_RE = re.compile(rf"^{_ZH_PLACE_PREFIX}{_ZH_ABSOLUTE}{_ZH_PLACE_SUFFIX}$")
_ZH_BETWEEN_PLACE_RE = re.compile(rf"^{_ZH_PLACE_PREFIX}(?P<a>.+?)(?:和|与|跟|及|同)(?P<b>.+?)(?:之间|中间|当中)$")
_ZH_RELATIVE_PLACE_RE = re.compile(rf"^{_ZH_PLACE_PREFIX}(?P<a>.+?)的?(?:{_ZH_REL_ALT})$")
_ZH_LEADING_ABSOLUTE_RE = re.compile(rf"^在?{_ZH_ABSOLUTE}(?:中|里|内|上)?的?(?P<rest>.+)$")
_ZH_LEADING_BETWEEN_RE = re.compile(r"^在?(?P<a>.+?)(?:和|与|跟|及|同)(?P<b>.+?)(?:之间|中间|当中)的(?P<rest>.+)$")
_ZH_LEADING_RELATIVE_RE = re.compile(rf"^在?(?P<a>.+?)的?(?:{_ZH_REL_ALT})的(?P<rest>.+)$")
_ZH_TRAILING_PLACE_RE = re.compile(r"^(?P<t>.+?)(?:在|到|于)(?P<p>.+)$")
_ZH_MEDIUM_NOISE_RE = re.compile(rf"^{_ZH_MEDIUM}(?:中|里|上|内)?(?:出现)?的?(?=.)")
_ZH_CLASSIFIERS = "个只棵株辆条张位名头匹朵座块片群架艘台本支件幅面堵扇把盏根双对束串堆道颗粒口间所家层团"
_ZH_QUANTIFIER_RE = re.compile(
    rf"^(?:(?:[一二两三四五六七八九十几]+)[{_ZH_CLASSIFIERS}]|(?:这些|那些|一些|这|那|该|某)[{_ZH_CLASSIFIERS}]?)(?=.)"
)


def _parse_zh(original: str) -> EditInstruction:
    text = _ZH_TRAILING_RE.sub("", original).strip()
    text = _ZH_POLITE_RE.sub("", text)
    if re.search(r"然后|并且|接着", text):
        raise InstructionError(original, "it chains several edits; send one edit per instruction")

    for pattern in (_ZH_BA_REPLACE_RE, _ZH_USE_REPLACE_RE, _ZH_VERB_REPLACE_RE):
        match = pattern.match(text)
        if match is not None:
            return _zh_replace(original, match)
    for pattern in (_ZH_BA_REMOVE_RE, _ZH_DISAPPEAR_RE, _ZH_REMOVE_RE):
        match = pattern.match(text)
        if match is not None:
            target, place = _split_place_zh(match.group("t"))
            return _build(original, "remove", target, None, place, "zh")
    for verb in _ZH_ADD_VERB_RE.finditer(text):  # the first verb whose prefix is empty or a place
        prefix, rest = text[: verb.start()], text[verb.end() :]
        leading_place = _parse_place_zh(prefix) if prefix else None
        if prefix and leading_place is None:
            continue
        target, place = _split_place_zh(rest, allow_trailing=True)
        if place is not None and leading_place is not None:
            raise InstructionError(original, "it names two places; give one")
        return _build(original, "add", target, None, place or leading_place, "zh")
    match = _ZH_BARE_REPLACE_RE.match(text)  # "狗换成猫" without 把
    if match is not None:
        return _zh_replace(original, match)
    raise InstructionError(original, "no edit verb found (移除/删掉/去掉, 添加/加/放, 把X换成Y/用Y替换X)")


def _zh_replace(original: str, match: re.Match[str]) -> EditInstruction:
    target, place = _split_place_zh(match.group("t"))
    replacement, replacement_place = _split_place_zh(match.group("r"))
    return _build(original, "replace", target, replacement, place or replacement_place, "zh")


def _split_place_zh(phrase: str, allow_trailing: bool = False) -> tuple[str, Place | None]:
    """Split 背景中走过的行人 into (走过的行人, Place(background)); with `allow_trailing`, also 一只鸟在左边."""
    phrase = phrase.strip("，, 的")
    if allow_trailing:
        trailing = _ZH_TRAILING_PLACE_RE.match(phrase)
        if trailing is not None:
            place = _parse_place_zh(trailing.group("p"))
            if place is not None:
                return _clean_object_zh(trailing.group("t")), place
    place: Place | None = None
    absolute = _ZH_LEADING_ABSOLUTE_RE.match(phrase)
    between = _ZH_LEADING_BETWEEN_RE.match(phrase)
    relative = _ZH_LEADING_RELATIVE_RE.match(phrase)
    if absolute is not None:
        place = Place(phrase[: absolute.start("rest")].rstrip("的"), _zh_kind(absolute, _ZH_POSITIONS, "p"))
        phrase = absolute.group("rest")
    elif between is not None:
        anchors = (_clean_object_zh(between.group("a")), _clean_object_zh(between.group("b")))
        place = Place(phrase[: between.start("rest")].rstrip("的"), "between", anchors)
        phrase = between.group("rest")
    elif relative is not None:
        place = Place(
            phrase[: relative.start("rest")].rstrip("的"),
            _zh_kind(relative, _ZH_RELATIONS, "r"),
            (_clean_object_zh(relative.group("a")),),
        )
        phrase = relative.group("rest")
    return _clean_object_zh(phrase), place


def _parse_place_zh(phrase: str) -> Place | None:
    """A whole phrase that is only a place (在画面左侧, 在汽车和树之间, 沙发旁边), else None."""
    phrase = phrase.strip("，, ")
    absolute = _ZH_ABSOLUTE_PLACE_RE.match(phrase)
    if absolute is not None:
        return Place(phrase, _zh_kind(absolute, _ZH_POSITIONS, "p"))
    between = _ZH_BETWEEN_PLACE_RE.match(phrase)
    if between is not None:
        anchors = (_clean_object_zh(between.group("a")), _clean_object_zh(between.group("b")))
        if all(anchors):
            return Place(phrase, "between", anchors)
    relative = _ZH_RELATIVE_PLACE_RE.match(phrase)
    if relative is not None:
        anchor = _clean_object_zh(relative.group("a"))
        if anchor and not re.fullmatch(_ZH_MEDIUM, anchor):
            return Place(phrase, _zh_kind(relative, _ZH_RELATIONS, "r"), (anchor,))
    return None


def _zh_kind(match: re.Match[str], table: Mapping[str, PlaceKind], prefix: str) -> PlaceKind:
    """The kind of the numbered alternative (`p3`, `r0`, ...) that matched."""
    return next(kind for i, kind in enumerate(table.values()) if match.group(f"{prefix}{i}"))


def _clean_object_zh(phrase: str) -> str:
    phrase = _ZH_MEDIUM_NOISE_RE.sub("", phrase.strip("，, 的"))
    return _ZH_QUANTIFIER_RE.sub("", phrase).strip("，, 的")


# -- shared -----------------------------------------------------------------------------------------------------


def _build(
    original: str, op: Op, target: str, replacement: str | None, place: Place | None, language: Language
) -> EditInstruction:
    if not target:
        raise InstructionError(original, f"'{op}' names no object")
    if op == "replace" and not replacement:
        raise InstructionError(original, "'replace' names nothing to replace the object with")
    return EditInstruction(op=op, target=target, replacement=replacement, place=place, language=language, text=original)


# -- geometry ---------------------------------------------------------------------------------------------------


def place_to_region(place: Place | None, width: int, height: int, anchor_boxes: Sequence[Box] | None = None) -> Box:
    """The pixel box (x0, y0, x1, y1) where an "add" edit paints its object, for a `width` x `height` frame.

    Absolute places use a grid of thirds: left/right = that third at full height; top/bottom = that third at full
    width; corners = the corner ninth; center (and no place at all) = the middle half in both directions;
    background = a band from 1/6 to 1/2 of the height, inset by 1/6 of the width (far objects sit above the middle,
    below the sky); foreground = the lower half, inset the same way.

    Relative places need `anchor_boxes` (one per `place.anchors`, e.g. from the detector); without them they fall
    back to the center region. With boxes: "between" = a square centred between the anchors' centres, its side half
    their distance (at least 1/8 of the shorter frame side); left-of/right-of/above/below = the anchor's box moved
    by its own width/height; behind = moved up by half its height; in-front-of = moved down by half its height;
    near = left-of or right-of, whichever side has more room. A moved box is shifted back inside the frame.
    """
    _check_frame_size(width, height)
    w, h = float(width), float(height)
    if place is None:
        return _clip((w / 4, h / 4, 3 * w / 4, 3 * h / 4), w, h)
    if place.kind in ABSOLUTE_KINDS:
        return _clip(_absolute_region(place.kind, w, h), w, h)
    if anchor_boxes is None:
        return _clip((w / 4, h / 4, 3 * w / 4, 3 * h / 4), w, h)
    boxes = [tuple(float(v) for v in box) for box in anchor_boxes]
    if len(boxes) != len(place.anchors):
        raise ValueError(
            f"anchor_boxes: place {place.phrase!r} has anchors {place.anchors}, got {len(boxes)} boxes for them"
        )
    for anchor, box in zip(place.anchors, boxes):
        validate_box(box, w, h, f"anchor box for {anchor!r}")
    if place.kind == "between":
        (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = boxes
        acx, acy, bcx, bcy = (ax0 + ax1) / 2, (ay0 + ay1) / 2, (bx0 + bx1) / 2, (by0 + by1) / 2
        side = max(((acx - bcx) ** 2 + (acy - bcy) ** 2) ** 0.5 / 2, min(w, h) / 8)
        cx, cy = (acx + bcx) / 2, (acy + bcy) / 2
        return _shift_inside((cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2), w, h)
    x0, y0, x1, y1 = boxes[0]
    bw, bh = x1 - x0, y1 - y0
    kind = place.kind
    if kind == "near":
        kind = "left-of" if x0 > w - x1 else "right-of"
    dx, dy = {
        "left-of": (-bw, 0.0),
        "right-of": (bw, 0.0),
        "above": (0.0, -bh),
        "below": (0.0, bh),
        "behind": (0.0, -bh / 2),
        "in-front-of": (0.0, bh / 2),
    }[kind]
    return _shift_inside((x0 + dx, y0 + dy, x1 + dx, y1 + dy), w, h)


def _absolute_region(kind: str, w: float, h: float) -> Box:
    thirds_x = {"left": (0.0, w / 3), "right": (2 * w / 3, w)}
    thirds_y = {"top": (0.0, h / 3), "bottom": (2 * h / 3, h)}
    if kind in thirds_x:
        return (thirds_x[kind][0], 0.0, thirds_x[kind][1], h)
    if kind in thirds_y:
        return (0.0, thirds_y[kind][0], w, thirds_y[kind][1])
    if kind == "center":
        return (w / 4, h / 4, 3 * w / 4, 3 * h / 4)
    if kind == "background":
        return (w / 6, h / 6, 5 * w / 6, h / 2)
    if kind == "foreground":
        return (w / 6, h / 2, 5 * w / 6, h)
    vertical, horizontal = kind.split("-")  # corners: "top-left" ...
    return (thirds_x[horizontal][0], thirds_y[vertical][0], thirds_x[horizontal][1], thirds_y[vertical][1])


def _check_frame_size(width: int, height: int) -> None:
    for name, value in (("width", width), ("height", height)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def validate_box(box: Sequence[float], width: float, height: float, name: str) -> None:
    """Raise ValueError naming `name` unless `box` is (x0, y0, x1, y1) with 0 <= x0 < x1 <= width, same for y."""
    if len(box) != 4 or not all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in box):
        raise ValueError(f"{name} must be four numbers (x0, y0, x1, y1), got {box!r}")
    x0, y0, x1, y1 = box
    if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
        raise ValueError(f"{name} {tuple(box)!r} must satisfy 0 <= x0 < x1 <= {width:g} and 0 <= y0 < y1 <= {height:g}")


def _clip(box: Box, w: float, h: float) -> Box:
    x0, y0, x1, y1 = box
    return (max(0.0, x0), max(0.0, y0), min(w, x1), min(h, y1))


def _shift_inside(box: Box, w: float, h: float) -> Box:
    """Move `box` (no resizing unless it is larger than the frame) so that it lies inside the frame."""
    x0, y0, x1, y1 = box
    bw, bh = min(x1 - x0, w), min(y1 - y0, h)
    x0 = min(max(x0, 0.0), w - bw)
    y0 = min(max(y0, 0.0), h - bh)
    return (x0, y0, x0 + bw, y0 + bh)


# -- detector phrases -------------------------------------------------------------------------------------------

# GroundingDINO's text encoder is English BERT: Chinese targets are glossed noun by noun (longest match first).
_ZH_EN_NOUNS: dict[str, str] = {
    "行人": "pedestrian", "路人": "pedestrian", "男人": "man", "男子": "man", "女人": "woman", "女子": "woman",
    "孩子": "child", "小孩": "child", "儿童": "child", "人群": "crowd", "人": "person", "狗": "dog", "猫": "cat",
    "鸟": "bird", "马": "horse", "牛": "cow", "羊": "sheep", "鱼": "fish", "蝴蝶": "butterfly",
    "公交车": "bus", "巴士": "bus", "卡车": "truck", "自行车": "bicycle", "摩托车": "motorcycle", "汽车": "car",
    "轿车": "car", "车": "car", "船": "boat", "飞机": "airplane", "火车": "train",
    "树": "tree", "花": "flower", "草": "grass", "天空": "sky", "云": "cloud", "太阳": "sun", "月亮": "moon",
    "山": "mountain", "河": "river", "海": "sea", "湖": "lake", "石头": "rock",
    "水印": "watermark", "标志": "logo", "商标": "logo", "字幕": "subtitles", "文字": "text", "招牌": "sign",
    "广告牌": "billboard", "路牌": "street sign", "红绿灯": "traffic light", "路灯": "street lamp",
    "电线杆": "utility pole", "电线": "power line", "垃圾桶": "trash can",
    "房子": "house", "建筑": "building", "窗户": "window", "门": "door", "桌子": "table", "椅子": "chair",
    "沙发": "sofa", "床": "bed", "杯子": "cup", "瓶子": "bottle", "手机": "phone", "电脑": "computer",
    "电视": "television", "灯": "lamp", "帽子": "hat", "眼镜": "glasses", "包": "bag", "伞": "umbrella",
    "球": "ball", "气球": "balloon", "书": "book", "钟": "clock", "雕像": "statue", "烟": "smoke", "火": "fire",
}  # fmt: skip
_ZH_EN_COLOURS: dict[str, str] = {
    "红": "red", "橙": "orange", "黄": "yellow", "绿": "green", "蓝": "blue", "紫": "purple", "黑": "black",
    "白": "white", "灰": "gray", "棕": "brown", "粉": "pink",
}  # fmt: skip
_ZH_NOUN_RE = re.compile("|".join(sorted(_ZH_EN_NOUNS, key=len, reverse=True)))
_ZH_COLOUR_RE = re.compile("(" + "|".join(_ZH_EN_COLOURS) + ")色")


def detector_phrase(phrase: str) -> str | None:
    """An English phrase a GroundingDINO-style detector can read: English passes through (lowercased); a Chinese
    phrase is glossed to its known colour + nouns (红色的公交车 -> "red bus"); None when no noun is known."""
    phrase = " ".join(phrase.split())
    if not _CJK.search(phrase):
        return phrase.lower() or None
    nouns = [_ZH_EN_NOUNS[m.group(0)] for m in _ZH_NOUN_RE.finditer(phrase)]
    if not nouns:
        return None
    colours = [_ZH_EN_COLOURS[m.group(1)] for m in _ZH_COLOUR_RE.finditer(phrase)]
    return " ".join(colours[:1] + nouns[-1:])
