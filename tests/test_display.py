import math
from html.parser import HTMLParser

from rich.console import Console
from rich.text import Text

from did_cli import display
from did_cli.records import Record

VOID = {"meta", "br", "hr", "img", "input", "link", "wbr"}


class _TagChecker(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.attributes: list[tuple[str, str | None]] = []

    def handle_starttag(self, tag, attrs):
        self.attributes.extend(attrs)
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1] if self.stack else 'nothing'}")
        else:
            self.stack.pop()


def assert_well_formed_and_self_contained(page: str) -> None:
    """Every tag closes in order, and nothing would be fetched from the network or run as a script."""
    checker = _TagChecker()
    checker.feed(page)
    checker.close()
    assert checker.errors == [] and checker.stack == []
    assert page.startswith("<!DOCTYPE html>")
    lowered = page.lower()
    assert "http://" not in lowered and "https://" not in lowered
    assert "src=" not in lowered and "<script" not in lowered and "<link" not in lowered and "@import" not in lowered
    assert all(name not in ("src", "href") for name, _ in checker.attributes)


TEXTS = {0: "<bos>", 1: "a", 2: "b", 3: "c", 4: "d", 5: "\n", 6: "<b>&", 7: '"q"'}


def _draft() -> Record:
    return Record(
        id=3,
        tokens=[0, 1, 2, 3, 4],
        confidence=[1.0, 0.1, 0.5, 0.9, 0.3],
        prompt_len=1,
        draft_tokens=[0, 1, 2, 3, 4],
        stages=[{"kind": "draft", "block_size": 2, "nfes": 4}],
        model={"name": "tiny"},
    )


def _refined() -> Record:
    # Positions 2 and 4 were remasked; 2 changed (b -> c), 4 was re-drawn as the same token.
    return Record(
        id=3,
        tokens=[0, 1, 3, 3, 4],
        confidence=[1.0, 0.1, 0.7, 0.9, 0.5],
        prompt_len=1,
        draft_tokens=[0, 1, 2, 3, 4],
        stages=[
            {"kind": "draft", "block_size": 2, "nfes": 4},
            {"kind": "refine", "remasked": [2, 4], "gamma": 0.5, "block_size": 5, "remask": "snapshot", "nfes": 2},
        ],
        model={"name": "tiny"},
    )


def _lines(renderable, **console_options) -> list[str]:
    console = Console(width=200, color_system=None, **console_options)
    with console.capture() as capture:
        console.print(renderable)
    return capture.get().splitlines()


def test_confidence_bins_cover_the_unit_interval_in_order():
    assert [display.confidence_bin(c) for c in (0.0, 0.19, 0.2, 0.5, 0.79, 0.8, 1.0)] == [0, 0, 1, 2, 3, 4, 4]
    assert display.confidence_bin(-0.1) == 0 and display.confidence_bin(1.5) == 4
    assert display.confidence_bin(math.nan) == 0


def test_visible_shows_control_characters_on_one_line():
    assert display.visible("a\nb") == "a⏎b"
    assert display.visible("\t\x00") == "⇥␀"
    assert display.visible("a\x9b2Jb\x1b") == "a\ufffd2Jb␛"
    assert display.visible("") == "∅"
    assert display.visible("plain text") == "plain text"


def test_token_views_mark_remasked_positions_and_changed_tokens():
    views = display.token_views(_refined(), TEXTS)
    assert [v.remasked for v in views] == [False, False, True, False, True]
    assert [v.draft_text for v in views] == [None, None, "b", None, None]
    assert views[0].is_prompt and not views[1].is_prompt


def test_summary_of_a_draft_averages_generated_positions_only():
    summary = display.summarize(_draft())
    assert summary.generated == 4 and summary.refinements == 0 and summary.changed == 0
    assert summary.remasked is None and summary.mean_remasked is None
    assert math.isclose(summary.mean_confidence, (0.1 + 0.5 + 0.9 + 0.3) / 4)
    assert display.summary_line(summary) == "draft: 4 generated tokens; mean confidence 0.450"


def test_summary_of_a_refined_record_splits_remasked_from_kept():
    summary = display.summarize(_refined())
    assert summary.changed == 1 and summary.remasked == 2 and summary.refinements == 1
    assert math.isclose(summary.mean_remasked, (0.7 + 0.5) / 2)
    assert math.isclose(summary.mean_kept, (0.1 + 0.9) / 2)
    line = display.summary_line(summary)
    assert line.startswith("refined (1 refinement): 1 of 4 generated tokens differ from the draft; 2 remasked")
    assert "snapshot, γ=0.5, B2=5" in line and "remasked (before not recorded) → 0.600" in line
    assert "kept 0.500" in line


def test_summary_compares_remasked_confidence_before_and_after_when_recorded():
    record = _refined()
    record.stages[-1]["previous_confidence"] = [0.2, 0.4]
    summary = display.summarize(record)
    assert math.isclose(summary.mean_remasked_before, 0.3)
    assert "remasked 0.300 → 0.600" in display.summary_line(summary)


def test_plain_rendering_uses_brackets_and_arrows():
    lines = _lines(display.render_sample(_refined(), TEXTS, styled=False))
    assert lines[0].startswith("sample id 3")
    assert lines[1] == "«<bos>»a[b→c]c[d]"
    assert lines[2].startswith("legend:") and "[token] remasked" in lines[2]
    assert lines[3].startswith("refined (1 refinement)")


def test_styled_rendering_strikes_the_draft_token_and_underlines_remasked_ones():
    group = display.render_sample(_refined(), TEXTS, styled=True)
    body = group.renderables[1]
    assert body.plain == "<bos>ab→ccd"
    styles = {body.plain[span.start : span.end] + f"@{span.start}": str(span.style) for span in body.spans}
    assert "strike" in styles["b@6"]
    assert "underline" in styles["c@8"] and "underline" in styles["d@10"]
    assert "underline" not in styles["a@5"]
    assert "italic" in styles["<bos>@0"] and display.PROMPT_COLORS[0] in styles["<bos>@0"]
    rendered = "\n".join(_lines(group, force_terminal=True))
    assert "legend: confidence" in rendered and "remasked by the last refinement" in rendered


def test_draft_rendering_has_no_refinement_legend():
    lines = _lines(display.render_sample(_draft(), TEXTS, styled=False))
    assert lines[1] == "«<bos>»abcd"
    assert "remasked" not in lines[2]
    assert lines[3].startswith("draft:")


def test_token_text_is_never_read_as_rich_markup():
    record = Record(id=0, tokens=[0, 8], confidence=[1.0, 0.5], prompt_len=1)
    lines = _lines(display.render_sample(record, {0: "<bos>", 8: "[bold]x[/bold]"}, styled=True))
    assert lines[1] == "<bos>[bold]x[/bold]"


def test_newline_tokens_break_the_line_after_a_visible_mark():
    record = Record(id=0, tokens=[0, 1, 5, 2], confidence=[1.0, 0.5, 0.5, 0.5], prompt_len=1)
    lines = _lines(display.render_sample(record, TEXTS, styled=False))
    assert lines[1:3] == ["«<bos>»a⏎", "b"]


def test_token_texts_decode_each_id_once(char_tokenizer):
    ids = char_tokenizer("ab a", add_special_tokens=False)["input_ids"]
    texts = display.token_texts(char_tokenizer, ids)
    assert sorted(texts.values()) == [" ", "a", "b"]


def test_html_page_is_well_formed_and_self_contained():
    for record in (_draft(), _refined()):
        assert_well_formed_and_self_contained(display.render_html(record, TEXTS))


def test_html_escapes_token_text_and_tooltips():
    record = Record(
        id=0,
        tokens=[0, 6, 7],
        confidence=[1.0, 0.25, 0.5],
        prompt_len=1,
        draft_tokens=[0, 7, 7],
        model={"name": "<model & co>"},
    )
    page = display.render_html(record, TEXTS)
    assert_well_formed_and_self_contained(page)
    assert "<b>&" not in page and "&lt;b&gt;&amp;" in page
    assert "<model & co>" not in page and "&lt;model &amp; co&gt;" in page
    assert "&quot;q&quot;" in page


def _titles(page: str) -> list[str]:
    checker = _TagChecker()
    checker.feed(page)
    return [value for name, value in checker.attributes if name == "title"]


def test_html_tooltip_gives_token_confidence_and_draft():
    page = display.render_html(_refined(), TEXTS)
    titles = _titles(page)
    assert "#2 token 'c' · confidence 0.7000 · draft 'b' · remasked by the last refinement" in titles
    assert "#3 token 'c' · confidence 0.9000 · draft: same token" in titles
    assert '<del class="draft">b</del><span class="arrow">→</span><span class="c3">c</span></span>' in page


def test_html_newline_token_keeps_its_line_break():
    record = Record(id=0, tokens=[0, 5], confidence=[1.0, 0.5], prompt_len=1)
    page = display.render_html(record, TEXTS)
    assert "⏎</span></span>\n" in page
    assert "#1 token '\\n' · confidence 0.5000 · draft: same token" in _titles(page)


# --- Hostile input, line layout, prompt marking, colours (what a person sees) ----------------------------------------

HOSTILE = "</title><script>alert(1)</script>[bold red]x[/]"


def _hostile() -> Record:
    record = _refined()
    record.id = HOSTILE  # records.py refuses a non-integer id; the renderers must not rely on it
    record.model = {"name": HOSTILE}
    record.stages[-1].update(remask=HOSTILE, gamma=HOSTILE, block_size=HOSTILE)
    return record


def _page_text(page: str) -> tuple[str, list[str]]:
    """The page's text content (what a browser shows) and every tag name it opens."""

    class Collector(HTMLParser):
        def __init__(self) -> None:
            super().__init__(convert_charrefs=True)
            self.text, self.tags = [], []

        def handle_starttag(self, tag, attrs):
            self.tags.append(tag)

        def handle_data(self, data):
            self.text.append(data)

    collector = Collector()
    collector.feed(page)
    return "".join(collector.text), collector.tags


def test_html_escapes_hostile_ids_model_names_settings_and_token_text():
    texts = {**TEXTS, 3: HOSTILE}
    page = display.render_html(_hostile(), texts)
    assert_well_formed_and_self_contained(page)
    text, tags = _page_text(page)
    assert tags.count("title") == 1 and "script" not in tags
    assert f"<title>did sample {HOSTILE}" not in page
    assert f"did sample {HOSTILE}" in text  # shown literally, as text
    assert f"from {HOSTILE}:" in text and f"({HOSTILE}, γ={HOSTILE}, B2={HOSTILE})" in text
    assert display.visible(HOSTILE) in text


def test_terminal_prints_hostile_fields_literally():
    texts = {**TEXTS, 3: HOSTILE}
    record = _hostile()
    for styled in (True, False):
        console = Console(width=80, force_terminal=styled, color_system="truecolor" if styled else None)
        with console.capture() as capture:
            console.print(display.render_sample(record, texts, styled=styled), soft_wrap=True)
        lines = Text.from_ansi(capture.get()).plain.splitlines()
        assert lines[0] == f"sample id {HOSTILE} (seed 0) from {HOSTILE}: 5 tokens, 1 prompt + 4 generated"
        assert HOSTILE in lines[1]
        assert f"({HOSTILE}, γ={HOSTILE}, B2={HOSTILE})" in lines[-1]


def test_control_characters_in_record_fields_never_reach_the_terminal():
    record = _refined()
    record.model = {"name": "evil\x1b[2J\nmodel"}
    record.stages[-1]["remask"] = "\x1b]0;title\x07"
    for styled in (True, False):
        console = Console(width=300, force_terminal=styled, color_system="truecolor" if styled else None)
        with console.capture() as capture:
            console.print(display.render_sample(record, TEXTS, styled=styled))
        plain = Text.from_ansi(capture.get()).plain
        assert "from evil␛[2J⏎model:" in plain and "(␛]0;title␇, γ=0.5" in plain
        assert "\x1b[2J" not in capture.get() and "\x07" not in capture.get()
    page = display.render_html(record, TEXTS)
    assert "\x1b" not in page and "evil␛[2J⏎model" in page


def _newline_refined() -> Record:
    # Position 2 was remasked and changed from "b" to a newline; position 3 is a kept newline.
    return Record(
        id=1,
        tokens=[0, 1, 5, 5, 2],
        confidence=[1.0, 0.5, 0.5, 0.5, 0.5],
        prompt_len=1,
        draft_tokens=[0, 1, 2, 5, 2],
        stages=[{"kind": "draft"}, {"kind": "refine", "remasked": [2], "gamma": 0.25, "block_size": 5}],
    )


def test_a_changed_newline_token_keeps_its_brackets_and_arrow_on_one_line():
    lines = _lines(display.render_sample(_newline_refined(), TEXTS, styled=False))
    assert lines[1:4] == ["«<bos>»a[b→⏎]", "⏎", "b"]
    styled = display.render_sample(_newline_refined(), TEXTS, styled=True).renderables[1]
    assert styled.plain.splitlines() == ["<bos>ab→⏎", "⏎", "b"]


def test_html_newline_token_breaks_the_line_after_its_span():
    page = display.render_html(_newline_refined(), TEXTS)
    assert '<del class="draft">b</del><span class="arrow">→</span><span class="c2">⏎</span></span>\n' in page
    sample = page[page.index('<div class="sample">') :]
    assert all(line.count("<span") == line.count("</span>") for line in sample.splitlines())


def test_the_prompt_is_marked_in_every_rendering():
    record = Record(id=0, tokens=[0, 1, 2, 3], confidence=[1.0, 1.0, 0.5, 0.5], prompt_len=2)
    assert _lines(display.render_sample(record, TEXTS, styled=False))[1] == "«<bos>a»bc"
    body = display.render_sample(record, TEXTS, styled=True).renderables[1]
    prompt_styles = {str(span.style) for span in body.spans if span.end <= len("<bos>a")}
    assert prompt_styles and all(display.PROMPT_COLORS[0] in style for style in prompt_styles)
    page = display.render_html(record, TEXTS)
    sample = page[page.index('<div class="sample">') :]
    assert sample.count('class="prompt"') == 2 and f"background: {display.PROMPT_COLORS[0]}" in page
    assert "«prompt»" in _lines(display.render_sample(record, TEXTS, styled=False))[2]


def _luminance(hex_colour: str) -> float:
    """WCAG 2 relative luminance of #rrggbb."""
    channels = [int(hex_colour[i : i + 2], 16) / 255 for i in (1, 3, 5)]
    linear = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in channels]
    return 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2]


def _contrast(first: str, second: str) -> float:
    high, low = sorted((_luminance(first), _luminance(second)), reverse=True)
    return (high + 0.05) / (low + 0.05)


def test_colour_scale_is_ordered_and_readable_on_light_and_dark_terminals():
    backgrounds = [bg for _, _, bg, _ in display.BINS]
    luminances = [_luminance(bg) for bg in backgrounds]
    # Lightness ordered with confidence: the order survives colour-blindness and greyscale.
    assert luminances == sorted(luminances) and len(set(luminances)) == len(luminances)
    for _, label, background, foreground in display.BINS:
        assert _contrast(background, foreground) >= 4.5, label  # WCAG AA for the token text
        # Every band stands out from a white and from a black terminal (the old pale-yellow middle had 1.04).
        assert _contrast(background, "#ffffff") >= 1.5 and _contrast(background, "#000000") >= 1.5, label
    prompt_background, prompt_text = display.PROMPT_COLORS
    assert _contrast(prompt_background, prompt_text) >= 4.5


def test_colour_bands_stay_distinct_on_a_256_colour_terminal():
    from rich.color import Color, ColorSystem

    numbers = [Color.parse(bg).downgrade(ColorSystem.EIGHT_BIT).number for _, _, bg, _ in display.BINS]
    numbers.append(Color.parse(display.PROMPT_COLORS[0]).downgrade(ColorSystem.EIGHT_BIT).number)
    assert len(set(numbers)) == len(numbers)


def test_legends_keep_the_draft_and_new_token_apart():
    plain = _lines(display.render_sample(_refined(), TEXTS, styled=False))[2]
    styled = display.render_sample(_refined(), TEXTS, styled=True).renderables[2].plain
    html_text, _ = _page_text(display.render_html(_refined(), TEXTS))
    for legend in (plain, styled, html_text):
        assert "old→new" in legend and "draftnew" not in legend


def _small_model_sample() -> Record:
    """A sample as did-tiny makes them: most confidences far below 0.2 (mean about 0.2), a few high ones."""
    confidence = [1.0] + [0.002 * (1.07**i) for i in range(100)]  # 0.002 … 1.6, mostly low
    confidence = [min(c, 0.99) for c in confidence]
    return Record(id=0, tokens=[0] + [1] * 100, confidence=confidence, prompt_len=1, model={"name": "tiny"})


def test_bins_adapt_to_the_quintiles_of_the_shown_sample():
    record = _small_model_sample()
    generated = record.confidence[1:]
    assert sum(display.confidence_bin(c) == 0 for c in generated) > 60  # fixed steps: most in the darkest bin
    scale = display.confidence_scale(generated)
    assert scale.quantiles
    counts = [sum(scale.bin(c) == i for c in generated) for i in range(len(display.BINS))]
    assert counts == [20, 20, 20, 20, 20]  # a fifth of the generated tokens in every colour
    labels = scale.labels()
    assert labels[0].startswith("0–") and labels[-1].endswith("–1") and len(set(labels)) == 5
    assert [label.split("–")[1] for label in labels[:-1]] == [label.split("–")[0] for label in labels[1:]]


def test_the_legend_says_which_scale_in_the_terminal_and_the_page():
    record = _small_model_sample()
    labels = display.confidence_scale(record.confidence[1:]).labels()
    legend = display.render_sample(record, {0: "<bos>", 1: "a"}, styled=True).renderables[2].plain
    page_text, _ = _page_text(display.render_html(record, {0: "<bos>", 1: "a"}))
    for text in (legend, page_text):
        assert "confidence quintiles of this sample" in text and all(label in text for label in labels)
    styled = display.render_sample(record, {0: "<bos>", 1: "a"}, styled=True).renderables[1]
    backgrounds = {str(span.style).split(" on ")[-1] for span in styled.spans}
    assert len(backgrounds) == 5 + 1  # every colour is used (and the prompt's grey)


def test_tied_confidences_still_fill_every_bin_and_fewer_than_five_values_keep_fixed_steps():
    tied = display.confidence_scale([0.1] * 10 + [0.2, 0.3, 0.4, 0.5])
    assert tied.quantiles and [tied.bin(c) for c in (0.1, 0.2, 0.3, 0.4, 0.5)] == [0, 1, 2, 3, 4]
    few = display.confidence_scale([0.1, 0.2, 0.3, 0.4])
    assert few == display.FIXED_SCALE and few.labels() == [label for _, label, _, _ in display.BINS]
    assert display.confidence_scale([]) == display.FIXED_SCALE


def test_an_edit_stage_marks_the_positions_it_replaced():
    from did_cli.display import summarize, summary_line

    stage = {"kind": "edit", "threshold": 0.5, "passes": 1, "edited": [2], "previous_tokens": [9],
             "previous_confidence": [0.1]}  # fmt: skip
    record = Record(0, [0, 5, 6, 7], [1.0, 0.5, 0.9, 0.4], 1, draft_tokens=[0, 5, 9, 7], stages=[{}, stage])
    summary = summarize(record)
    assert summary.remasked == 1 and summary.mean_remasked == 0.9 and summary.mean_remasked_before == 0.1
    line = summary_line(summary)
    assert "1 replaced by the last refinement (edit, threshold 0.5, 1 pass(es))" in line
