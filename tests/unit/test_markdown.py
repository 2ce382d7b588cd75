"""Dify answers made DingTalk-renderable: realistic model output in, card markdown out; `<think>` handling,
final and while streaming."""

from __future__ import annotations

import pytest

from dingdifyd.bridge.markdown import (
    THINKING_PLACEHOLDER,
    AnswerStyle,
    adapt_markdown,
    for_plain_reply,
    neutralise_links,
    render_answer,
    replace_images,
    split_reasoning,
)

# What a chat model typically answers to "compare the plans" (tables, nested lists, a <br>, a heading).
PLANS_ANSWER = """## 套餐对比
以下是三个套餐的主要区别：
| 套餐 | 价格 | 存储空间 |
|------|:----:|---------|
| 基础版 | ¥0 | 5 GB |
| 专业版 | ¥99/月 | 100 GB<br>可扩容 |
| 企业版 | 面议 |  |

建议：
- 个人使用选**基础版**
  - 超过 5 GB 时升级
- 团队使用选专业版
1. 先试用
2. 再购买"""


def test_plain_text_answers_are_unchanged():
    text = "Echo: hello there | This is a fake streamed answer from the local fake OpenAI server."
    assert adapt_markdown(text) == text
    assert render_answer(text) == text


def test_a_table_becomes_a_list_of_its_rows():
    out = adapt_markdown(PLANS_ANSWER)
    assert "|" not in out
    assert "- **基础版** — 价格: ¥0 · 存储空间: 5 GB" in out
    assert "- **专业版** — 价格: ¥99/月 · 存储空间: 100 GB<br>可扩容" in out
    assert "- **企业版** — 价格: 面议" in out  # empty cells are left out
    # the sentence before the table and the table are separate blocks
    assert "以下是三个套餐的主要区别：\n\n- **基础版**" in out


def test_two_column_tables_read_as_key_value_pairs():
    answer = "| Setting | Value |\n| --- | --- |\n| Timeout | 30 s |\n| Retries | 3 |"
    assert adapt_markdown(answer) == "- **Timeout**: 30 s\n- **Retries**: 3"


def test_a_table_as_code_is_aligned_also_for_wide_characters():
    out = adapt_markdown(PLANS_ANSWER, tables="code")
    block = out[out.index("```") : out.rindex("```") + 3].split("\n")
    assert block[0] == block[-1] == "```"
    assert block[1].split() == ["套餐", "价格", "存储空间"]
    # every row starts its second column at the same display width
    assert block[3].startswith("基础版  ¥0")
    assert block[4].startswith("专业版  ¥99/月")


def test_tables_can_be_kept_with_a_blank_line_before_them():
    out = adapt_markdown("Prices:\n| a | b |\n|---|---|\n| 1 | 2 |", tables="keep")
    assert out == "Prices:\n\n| a | b |\n|---|---|\n| 1 | 2 |"


def test_nested_lists_keep_their_lines_and_indentation():
    out = adapt_markdown(PLANS_ANSWER)
    assert "建议：\n\n- 个人使用选**基础版**\n  - 超过 5 GB 时升级\n- 团队使用选专业版\n\n1. 先试用\n2. 再购买" in out


def test_single_newlines_in_a_paragraph_become_line_breaks():
    answer = "地址：北京市朝阳区\n电话：010-12345678\n邮编：100020\n\n新段落"
    assert adapt_markdown(answer) == "地址：北京市朝阳区<br>电话：010-12345678<br>邮编：100020\n\n新段落"


def test_a_list_item_continued_on_the_next_line_stays_one_item():
    assert adapt_markdown("- first item\n  continues here\n- second") == "- first item<br>continues here\n- second"


def test_headings_and_rules_get_blank_lines_so_they_render():
    answer = "Intro line\n### Details\nBody\n---\nFooter"
    assert adapt_markdown(answer) == "Intro line\n\n### Details\n\nBody\n\n---\n\nFooter"


def test_fenced_code_is_untouched():
    code = '```python\ndef f(x):\n\n    return x  # <br> | a | b |\n|---|---|\n```'
    answer = f"Run this:\n{code}\nThen check."
    out = adapt_markdown(answer)
    assert code in out
    assert out.startswith("Run this:\n\n```python")
    assert out.endswith("```\n\nThen check.")


def test_an_unclosed_fence_is_closed():
    assert adapt_markdown("```bash\nls -l\n") == "```bash\nls -l\n```"


def test_html_is_converted_or_dropped():
    answer = (
        'Use <b>bold</b>, <strong>strong</strong> and <em>soft</em> words; see <a href="https://example.com/x">'
        'the docs</a>.<br>Next line <span style="color:red">in red</span>.\n'
        '<img src="https://example.com/a.png" alt="diagram"><!-- a comment -->\n'
        "<script>alert(1)</script>A generic List<T> stays, and so does `<div>` in code. 1 &lt; 2 &amp;&nbsp;ok"
    )
    out = adapt_markdown(answer)
    assert "**bold**" in out and "**strong**" in out and "*soft*" in out
    assert "[the docs](https://example.com/x)" in out
    assert ".<br>Next line in red." in out
    assert "![diagram](https://example.com/a.png)" in out
    assert "comment" not in out and "alert" not in out and "<span" not in out
    assert "List<T>" in out and "`<div>`" in out
    assert "1 < 2 & ok" in out


def test_details_become_a_bold_title_and_their_content():
    answer = "Summary first.\n<details>\n<summary>Sources (2)</summary>\n\n1. Manual p. 3\n2. FAQ\n</details>"
    assert adapt_markdown(answer) == "Summary first.\n\n**Sources (2)**\n\n1. Manual p. 3\n2. FAQ"


def test_quote_lines_are_joined_and_end_before_the_next_paragraph():
    answer = "> Note: the API\n> changed in v2.\nSo update."
    assert adapt_markdown(answer) == "> Note: the API<br>changed in v2.\n\nSo update."


def test_while_streaming_an_image_or_tag_being_written_is_held_back():
    assert adapt_markdown("See the chart: ![chart](/files/tools/ab", final=False) == "See the chart:"
    assert adapt_markdown("Done <deta", final=False) == "Done"
    assert adapt_markdown("Done <deta", final=True) == "Done <deta"


def test_plain_replies_get_newlines_instead_of_br():
    assert for_plain_reply("a<br>b\n\nc") == "a\nb\n\nc"


def test_images_are_replaced_outside_code_only():
    text = "![a](/files/tools/1.png?sign=x)\n```\n![b](/files/tools/2.png)\n```\n`![c](x.png)` ![d](https://e/x.png)"
    replaced = replace_images(text, lambda alt, url: f"[{alt}]")
    assert replaced.startswith("[a]\n```\n![b](/files/tools/2.png)\n```")
    assert replaced.endswith("`![c](x.png)` [d]")


# --- reasoning -------------------------------------------------------------------------------------------

R1_ANSWER = "<think>\nThe user asks for 6*7.\nThat is 42.\n</think>\n\nThe answer is **42**."


def test_reasoning_is_hidden_by_default():
    assert render_answer(R1_ANSWER) == "The answer is **42**."


def test_reasoning_can_be_shown_as_a_quote():
    out = render_answer(R1_ANSWER, AnswerStyle(show_reasoning="quote"))
    assert out == "> 💭 **Thinking**<br>The user asks for 6*7.<br>That is 42.\n\nThe answer is **42**."


def test_dify_015_details_reasoning_is_reasoning_too():
    answer = (
        '<details style="color:gray;background-color: #f8f8f8;padding: 8px;border-radius: 4px;" open> '
        "<summary> Thinking... </summary>Let me see.\n</details>Hello!"
    )
    assert render_answer(answer) == "Hello!"
    assert split_reasoning(answer).reasoning == "Let me see."


def test_a_closing_tag_without_opening_makes_what_precedes_it_reasoning():
    split = split_reasoning("Some thinking without the tag\n</think>\nThe real answer")
    assert split.reasoning == "Some thinking without the tag"
    assert split.answer.strip() == "The real answer"


def test_an_unclosed_think_hides_the_rest_while_streaming():
    partial = "<think>\nLet me consider the options carefully"
    assert render_answer(partial, final=False) == THINKING_PLACEHOLDER
    quoted = render_answer(partial, AnswerStyle(show_reasoning="quote"), final=False)
    assert quoted == "> 💭 **Thinking**<br>Let me consider the options carefully …"


@pytest.mark.parametrize("show", ["hide", "quote"])
def test_streamed_token_by_token_the_reasoning_never_leaks_into_the_answer(show: str):
    answer = "<think>secret plan: say 42</think>\n\nThe answer is 42."
    style = AnswerStyle(show_reasoning=show)
    frames = [render_answer(answer[:end], style, final=False) for end in range(1, len(answer) + 1)]
    for frame in frames:
        assert "<th" not in frame and "</" not in frame
        if show == "hide":
            assert "secret" not in frame
    assert render_answer(answer, style).endswith("The answer is 42.")
    if show == "hide":
        assert set(frames[:20]) <= {"", THINKING_PLACEHOLDER}


@pytest.mark.parametrize(
    ("written", "shown"),
    [
        ("[click](javascript:alert(1))", "click)"),  # the regex stops at the first ")": what is left is text
        ("[click](JaVaScRiPt:alert%281%29)", "click"),
        ("[click]( <javascript:alert(1)> )", "click> )"),
        ("[click](java\tscript:x)", "[click] (java\tscript:x)"),  # a tab: no link to the patterns, still broken
        ("[click](java%09script:x)", "click"),
        ("[click](&#106;avascript:x)", "click"),
        ("[page](data:text/html;base64,PHNjcmlwdD4=)", "page"),
        ("![pic](data:image/svg+xml;base64,PHN2Zz4=)", "pic"),
        ("![pic](vbscript:msgbox)", "pic"),
        ("[send](dtmd://dingtalkclient/sendMessage?content=pay)", "send"),
        ("[x](file:///etc/passwd)", "x"),
        ("[x](javascript:a 'title')", "[x] (javascript:a 'title')"),
        ("<javascript:alert(1)>", "javascript:alert(1)"),
        ("[a][r]\n\n[r]: javascript:alert(1)", "[a][r]\n\n[r]: (link removed)"),
    ],
)
def test_links_with_unsafe_schemes_are_neutralised(written, shown):
    assert neutralise_links(written) == shown


@pytest.mark.parametrize(
    "kept",
    [
        "[site](https://example.com/a?b=c)",
        "[site](http://example.com)",
        "![chart](@lADPDfmVgxyz)",  # a DingTalk media id
        "[report](/files/tools/r.pdf?sign=abc)",  # relative: made absolute against Dify later
        "<https://example.com>",
        "`[code](javascript:ok)` is code",
        "```\n[code](javascript:ok)\n```",
        "a <T> in prose: and 2:30 pm",
    ],
)
def test_safe_links_code_and_prose_are_kept(kept):
    assert neutralise_links(kept) == kept
