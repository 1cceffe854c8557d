"""Edit-instruction parsing (English + Chinese), place regions and detector phrases: pure Python, milliseconds."""

from __future__ import annotations

import pytest

from imagine.editing.instructions import (
    EditInstruction,
    InstructionError,
    Place,
    detector_phrase,
    parse_instruction,
    place_to_region,
)

# text, op, target, replacement, place kind, anchors
CASES: list[tuple[str, str, str, str | None, str | None, tuple[str, ...]]] = [
    # -- English: remove
    ("remove the man walking in the background", "remove", "man walking", None, "background", ()),
    ("erase the logo", "remove", "logo", None, None, ()),
    ("get rid of the dog", "remove", "dog", None, None, ()),
    ("Please remove the dog from the video.", "remove", "dog", None, None, ()),
    ("erase the watermark in the top right corner", "remove", "watermark", None, "top-right", ()),
    ("remove the top-right logo", "remove", "logo", None, "top-right", ()),
    ("delete the man who is walking on the right side of the frame", "remove", "man walking", None, "right", ()),
    ("make the car disappear", "remove", "car", None, None, ()),
    ("remove the man in the red shirt", "remove", "man in the red shirt", None, None, ()),
    ("remove the leftmost car", "remove", "car", None, "left", ()),
    ("take out the trash can near the door", "remove", "trash can", None, "near", ("door",)),
    ("in the background, remove the crowd", "remove", "crowd", None, "background", ()),
    ("wipe out the text at the bottom of the screen", "remove", "text", None, "bottom", ()),
    # -- English: add
    ("add a blooming tree on the left", "add", "blooming tree", None, "left", ()),
    ("put a cat next to the sofa", "add", "cat", None, "near", ("sofa",)),
    ("insert a bird between the car and the tree", "add", "bird", None, "between", ("car", "tree")),
    ("on the left, add a tree", "add", "tree", None, "left", ()),
    ("in the background add a mountain", "add", "mountain", None, "background", ()),
    ("add a bird in the sky", "add", "bird", None, "top", ()),
    ("put a lamp to the left of the sofa", "add", "lamp", None, "left-of", ("sofa",)),
    ("add a dog in front of the house", "add", "dog", None, "in-front-of", ("house",)),
    ("add a cloud above the building", "add", "cloud", None, "above", ("building",)),
    ("add a small boat in the center of the image", "add", "small boat", None, "center", ()),
    ("add a rainbow", "add", "rainbow", None, None, ()),
    ("place a red ball in the bottom-left corner", "add", "red ball", None, "bottom-left", ()),
    ("add a horse in the foreground", "add", "horse", None, "foreground", ()),
    # -- English: replace
    ("swap the sky for a sunset", "replace", "sky", "sunset", None, ()),
    ("replace the car with a red bus", "replace", "car", "red bus", None, ()),
    ("turn the dog into a cat", "replace", "dog", "cat", None, ()),
    ("change the sky to a sunset", "replace", "sky", "sunset", None, ()),
    ("substitute a cat for the dog", "replace", "dog", "cat", None, ()),
    ("replace the car on the left with a red bus", "replace", "car", "red bus", "left", ()),
    # -- Chinese
    ("在画面左侧添加一棵开花的树", "add", "开花的树", None, "left", ()),
    ("移除背景中走过的行人", "remove", "走过的行人", None, "background", ()),
    ("删掉右上角的水印", "remove", "水印", None, "top-right", ()),
    ("把狗换成猫", "replace", "狗", "猫", None, ()),
    ("在汽车和树之间加一只鸟", "add", "鸟", None, "between", ("汽车", "树")),
    ("把汽车换成红色的公交车", "replace", "汽车", "红色的公交车", None, ()),
    ("在沙发旁边放一只猫", "add", "猫", None, "near", ("沙发",)),
    ("把背景中的行人去掉", "remove", "行人", None, "background", ()),
    ("去掉视频里的字幕", "remove", "字幕", None, None, ()),
    ("用猫替换狗", "replace", "狗", "猫", None, ()),
    ("将天空替换为夕阳", "replace", "天空", "夕阳", None, ()),
    ("请帮我删除画面上方的文字。", "remove", "文字", None, "top", ()),
    ("给画面右下角加上水印", "add", "水印", None, "bottom-right", ()),
    ("加一只鸟在汽车和树之间", "add", "鸟", None, "between", ("汽车", "树")),
    ("让画面中的狗消失", "remove", "狗", None, None, ()),
    ("在房子后面添加一座山", "add", "山", None, "behind", ("房子",)),
    ("移除桌子上的杯子", "remove", "杯子", None, "above", ("桌子",)),
    ("在画面中间放一个红色的气球", "add", "红色的气球", None, "center", ()),
    ("在前景中添加一些花", "add", "花", None, "foreground", ()),
    ("狗换成猫", "replace", "狗", "猫", None, ()),
    ("清除左下角的标志", "remove", "标志", None, "bottom-left", ()),
]


def test_table_is_big_enough() -> None:
    assert len(CASES) >= 40
    assert sum(parse_instruction(c[0]).language == "zh" for c in CASES) >= 15


@pytest.mark.parametrize(("text", "op", "target", "replacement", "kind", "anchors"), CASES, ids=[c[0] for c in CASES])
def test_parse_instruction(
    text: str, op: str, target: str, replacement: str | None, kind: str | None, anchors: tuple[str, ...]
) -> None:
    parsed = parse_instruction(text)
    assert (parsed.op, parsed.target, parsed.replacement) == (op, target, replacement)
    assert (parsed.place.kind if parsed.place else None) == kind
    assert (parsed.place.anchors if parsed.place else ()) == anchors
    assert parsed.language == ("zh" if any("\u4e00" <= ch <= "\u9fff" for ch in text) else "en")
    assert parsed.text == text


def test_place_keeps_the_phrase_as_written() -> None:
    assert parse_instruction("remove the man walking in the background").place == Place(
        "in the background", "background"
    )
    assert parse_instruction("在画面左侧添加一棵开花的树").place == Place("在画面左侧", "left")
    assert parse_instruction("删掉右上角的水印").place == Place("右上角", "top-right")


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("the dog should go", "no edit verb"),
        ("make it nicer", "no edit verb"),
        ("remove", "names no object"),
        ("remove the", "names no object"),
        ("replace the car", "needs what to replace it with"),
        ("remove the dog and add a cat", "one edit per instruction"),
        ("你好", "no edit verb"),
        ("把狗去掉然后加一只猫", "one edit per instruction"),
        ("on the left, add a tree on the right", "two places"),
    ],
)
def test_unparseable_instructions_list_accepted_forms(text: str, reason: str) -> None:
    with pytest.raises(InstructionError) as info:
        parse_instruction(text)
    message = str(info.value)
    assert reason in message
    # the message teaches both languages
    assert "add a blooming tree on the left" in message and "在画面左侧添加一棵开花的树" in message
    assert isinstance(info.value, ValueError)


def test_non_string_is_rejected() -> None:
    with pytest.raises(InstructionError, match="expected a string"):
        parse_instruction(None)  # type: ignore[arg-type]


def test_rewriter_runs_before_the_rules() -> None:
    seen: list[str] = []

    def rewriter(text: str) -> str:
        seen.append(text)
        return "remove the dog"

    parsed = parse_instruction("the dog should go", rewriter=rewriter)
    assert seen == ["the dog should go"]
    assert (parsed.op, parsed.target, parsed.text) == ("remove", "dog", "remove the dog")
    with pytest.raises(InstructionError, match="empty"):
        parse_instruction("anything", rewriter=lambda text: "")


def test_value_objects_validate_themselves() -> None:
    with pytest.raises(ValueError, match="needs 2 non-empty anchors"):
        Place("between the car", "between", ("car",))
    with pytest.raises(ValueError, match="place kind"):
        Place("somewhere", "somewhere")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="replacement"):
        EditInstruction(op="remove", target="dog", language="en", text="x", replacement="cat")


# -- place_to_region ------------------------------------------------------------------------------------------

W, H = 864, 480


@pytest.mark.parametrize(
    ("kind", "box"),
    [
        ("left", (0, 0, 288, 480)),
        ("right", (576, 0, 864, 480)),
        ("top", (0, 0, 864, 160)),
        ("bottom", (0, 320, 864, 480)),
        ("center", (216, 120, 648, 360)),
        ("top-left", (0, 0, 288, 160)),
        ("top-right", (576, 0, 864, 160)),
        ("bottom-left", (0, 320, 288, 480)),
        ("bottom-right", (576, 320, 864, 480)),
        ("background", (144, 80, 720, 240)),
        ("foreground", (144, 240, 720, 480)),
    ],
)
def test_absolute_place_regions(kind: str, box: tuple[int, int, int, int]) -> None:
    assert place_to_region(Place(kind, kind), W, H) == pytest.approx(box)  # type: ignore[arg-type]


def test_no_place_is_the_center() -> None:
    assert place_to_region(None, W, H) == pytest.approx((216, 120, 648, 360))


def test_between_uses_anchor_boxes_or_falls_back_to_center() -> None:
    place = parse_instruction("insert a bird between the car and the tree").place
    assert place is not None
    assert place_to_region(place, W, H) == pytest.approx((216, 120, 648, 360))
    car, tree = (100, 300, 200, 400), (600, 300, 700, 400)  # centres (150, 350) and (650, 350): 500 apart
    x0, y0, x1, y1 = place_to_region(place, W, H, [car, tree])
    assert ((x0 + x1) / 2, (y0 + y1) / 2) == pytest.approx((400, 350))
    assert (x1 - x0, y1 - y0) == pytest.approx((250, 250))
    with pytest.raises(ValueError, match="anchor_boxes"):
        place_to_region(place, W, H, [car])


def test_relative_regions_move_the_anchor_box_and_stay_inside() -> None:
    sofa = (100.0, 300.0, 300.0, 400.0)
    assert place_to_region(Place("to the left of the sofa", "left-of", ("sofa",)), W, H, [sofa]) == pytest.approx(
        (0, 300, 200, 400)  # would start at -100: shifted back inside, same size
    )
    assert place_to_region(Place("right of sofa", "right-of", ("sofa",)), W, H, [sofa]) == (300, 300, 500, 400)
    assert place_to_region(Place("above sofa", "above", ("sofa",)), W, H, [sofa]) == (100, 200, 300, 300)
    assert place_to_region(Place("below sofa", "below", ("sofa",)), W, H, [sofa]) == (100, 380, 300, 480)
    assert place_to_region(Place("behind sofa", "behind", ("sofa",)), W, H, [sofa]) == (100, 250, 300, 350)
    # "near": the side with more room (here the right)
    assert place_to_region(Place("next to the sofa", "near", ("sofa",)), W, H, [sofa]) == (300, 300, 500, 400)
    with pytest.raises(ValueError, match="anchor box for 'sofa'"):
        place_to_region(Place("near sofa", "near", ("sofa",)), W, H, [(10, 10, 5, 20)])


def test_region_rejects_bad_frame_size() -> None:
    with pytest.raises(ValueError, match="width"):
        place_to_region(None, 0, 480)


# -- detector phrases -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("phrase", "english"),
    [
        ("Man Walking", "man walking"),
        ("走过的行人", "pedestrian"),
        ("红色的公交车", "red bus"),
        ("水印", "watermark"),
        ("开花的树", "tree"),
        ("东西", None),
    ],
)
def test_detector_phrase(phrase: str, english: str | None) -> None:
    assert detector_phrase(phrase) == english
