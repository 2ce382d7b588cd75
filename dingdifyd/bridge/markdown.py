"""Dify answers made readable in DingTalk: reasoning (`<think>`) hidden or quoted, markdown reduced to what
DingTalk's AI card renders. Pure functions over text; safe to call on every partial answer while it streams.

What DingTalk's card does differently from CommonMark (docs/dingtalk.md#card-markdown): a single newline inside a
paragraph is not a line break (only `<br>` is), tables are garbled, most HTML shows as raw tags, and consecutive
quote lines only stay together when joined with `<br>`. Fenced code renders, and is never touched here.
"""

from __future__ import annotations

import html
import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import unquote

THINKING_PLACEHOLDER = "💭 Thinking…"
LINK_REMOVED = "(link removed)"  # what a link definition with an unsafe target shows instead
REASONING_TITLE = "💭 **Thinking**"
LINE_BREAK = "<br>"

# --- reasoning ---------------------------------------------------------------------------------------------

_THINK_OPEN = re.compile(r"<think(?:\s[^>]*)?>", re.IGNORECASE)
_THINK_CLOSE = re.compile(r"</think\s*>", re.IGNORECASE)
# Dify 0.15.0-0.15.2 wrapped a model's reasoning_content in this instead of <think>.
_DETAILS_THINKING = re.compile(
    r"^\s*<details\b[^>]*>\s*<summary>\s*Thinking\.*\s*</summary>", re.IGNORECASE
)
_DETAILS_CLOSE = re.compile(r"</details\s*>", re.IGNORECASE)


@dataclass(frozen=True)
class ReasoningSplit:
    reasoning: str  # the model's thinking, tags removed
    answer: str  # what it says to the person
    thinking: bool  # a reasoning block is still open: more thinking is on its way


def _partial_tag_at_end(text: str, tags: tuple[str, ...]) -> int:
    """Length of a suffix of `text` that could be the start of one of `tags` (a tag split across two deltas)."""
    lowered = text[-12:].lower()
    for size in range(min(len(lowered), 9), 0, -1):
        tail = lowered[-size:]
        if any(tag.startswith(tail) and tail != tag for tag in tags):
            return size
    return 0


def split_reasoning(text: str, *, final: bool = True) -> ReasoningSplit:
    """Separate `<think>…</think>` blocks (anywhere) from the answer.

    An unclosed `<think>` hides everything after it (while streaming the closing tag has not arrived yet); a
    `</think>` with no opening tag (some model templates put `<think>` in the prompt) makes everything before
    it reasoning. While streaming, a tag cut in two at the end of the text is held back.
    """
    reasoning: list[str] = []
    answer: list[str] = []
    details = _DETAILS_THINKING.match(text)
    if details:
        close = _DETAILS_CLOSE.search(text, details.end())
        if close is None:
            return ReasoningSplit(text[details.end():].strip(), "", not final)
        reasoning.append(text[details.end():close.start()])
        text = text[close.end():]
    position = 0
    first_close = _THINK_CLOSE.search(text)
    first_open = _THINK_OPEN.search(text)
    if first_close and (first_open is None or first_close.start() < first_open.start()):
        reasoning.append(text[: first_close.start()])
        position = first_close.end()
    thinking = False
    while True:
        opening = _THINK_OPEN.search(text, position)
        if opening is None:
            answer.append(text[position:])
            break
        answer.append(text[position : opening.start()])
        closing = _THINK_CLOSE.search(text, opening.end())
        if closing is None:
            reasoning.append(text[opening.end():])
            thinking = not final
            break
        reasoning.append(text[opening.end() : closing.start()])
        position = closing.end()
    answer_text = "".join(answer)
    if not final:
        held = _partial_tag_at_end(answer_text, ("<think>", "</think>"))
        if held:
            answer_text = answer_text[:-held]
        elif thinking:
            held = _partial_tag_at_end(reasoning[-1], ("</think>",))
            if held:
                reasoning[-1] = reasoning[-1][:-held]
    return ReasoningSplit("\n\n".join(part.strip() for part in reasoning if part.strip()), answer_text, thinking)


def quote_reasoning(reasoning: str) -> str:
    """The reasoning as a quoted section headed "Thinking" (blank lines dropped: a quote is one block)."""
    lines = [line.strip() for line in reasoning.splitlines() if line.strip() and not _FENCE.match(line)]
    return "\n".join([f"> {REASONING_TITLE}", *(f"> {line}" for line in lines)])


# --- markdown ----------------------------------------------------------------------------------------------

_FENCE = re.compile(r"^( {0,3})(`{3,}|~{3,})(.*)$")
_INLINE_CODE = re.compile(r"(`+)(?!`)(.+?)(?<!`)\1(?!`)")
_PLACEHOLDER = re.compile("\x00(\\d+)\x00")
_BLOCK_START = re.compile(r"^\s*(?:[-*+]\s|\d{1,9}[.)]\s|#{1,6}(?:\s|$)|>|\|)")
_LIST_ITEM = re.compile(r"^\s*(?:[-*+]|\d{1,9}[.)])\s")
_HEADING = re.compile(r"^ {0,3}#{1,6}(?:\s|$)")
_RULE = re.compile(r"^ {0,3}([-*_])(?:[ \t]*\1){2,}[ \t]*$")
_QUOTE = re.compile(r"^ {0,3}> ?(.*)$")
_TABLE_SEPARATOR = re.compile(r"^\s*\|?\s*:?-+:?\s*(?:\|\s*:?-+:?\s*)*\|?\s*$")
_TRAILING_IMAGE = re.compile(r"!\[[^\]\n]*(?:\](?:\([^)\n]*)?)?$")
_TRAILING_TAG = re.compile(r"<[A-Za-z/!][^<>\n]*$")

# HTML a model may write, and what each becomes. Only these names are treated as tags: `<T>` in prose stays.
_DROP_WITH_CONTENT = re.compile(r"<(script|style)\b[^>]*>.*?</\1\s*>", re.IGNORECASE | re.DOTALL)
_COMMENT = re.compile(r"<!--.*?(?:-->|$)", re.DOTALL)
_BR = re.compile(r"<br\s*/?>", re.IGNORECASE)
_BR_AT_END_OF_LINE = re.compile(r"<br\s*/?>[ \t]*\n", re.IGNORECASE)
_SUMMARY = re.compile(r"<summary\b[^>]*>(.*?)</summary\s*>", re.IGNORECASE | re.DOTALL)
_ANCHOR = re.compile(r"<a\b[^>]*?href\s*=\s*[\"']([^\"']*)[\"'][^>]*>(.*?)</a\s*>", re.IGNORECASE | re.DOTALL)
_IMG = re.compile(r"<img\b[^>]*>", re.IGNORECASE)
_ATTRIBUTE = re.compile(r"""([a-zA-Z-]+)\s*=\s*(?:"([^"]*)"|'([^']*)')""")
_HEADING_TAG = re.compile(r"<h([1-6])\b[^>]*>(.*?)</h\1\s*>", re.IGNORECASE | re.DOTALL)
_INLINE_TAGS = {
    "b": "**", "strong": "**", "i": "*", "em": "*", "del": "~~", "s": "~~", "strike": "~~", "code": "`",
}
_BLOCK_TAGS = {"p", "div", "details", "section", "article", "ul", "ol", "table", "thead", "tbody", "pre",
               "blockquote", "figure", "center", "header", "footer"}
_STRIPPED_TAGS = {"span", "font", "sup", "sub", "u", "mark", "small", "big", "abbr", "cite", "q", "kbd", "samp",
                  "var", "ins", "label", "caption", "figcaption", "colgroup", "col", "nav", "tfoot"}
_ANY_TAG = re.compile(r"<(/?)([a-zA-Z][a-zA-Z0-9]*)\b[^<>]*?(/?)>")
_ENTITIES = ("&nbsp;", "&lt;", "&gt;", "&amp;", "&quot;", "&#39;", "&#x27;", "&apos;")


@dataclass(frozen=True)
class AnswerStyle:
    show_reasoning: str = "hide"  # hide | quote
    tables: str = "list"  # list | code | keep


def render_answer(raw: str, style: AnswerStyle = AnswerStyle(), *, final: bool = True) -> str:
    """The card text for a (partial or final) Dify answer."""
    split = split_reasoning(raw, final=final)
    parts: list[str] = []
    if style.show_reasoning == "quote" and split.reasoning:
        parts.append(adapt_markdown(quote_reasoning(split.reasoning + (" …" if split.thinking else ""))))
    answer = adapt_markdown(split.answer, tables=style.tables, final=final)
    if answer:
        parts.append(answer)
    elif split.thinking and not parts:
        parts.append(THINKING_PLACEHOLDER)
    return "\n\n".join(parts)


def adapt_markdown(text: str, *, tables: str = "list", final: bool = True) -> str:
    """Markdown DingTalk renders: soft line breaks kept as `<br>`, tables made readable, HTML converted or
    dropped, code blocks untouched (an unclosed fence is closed). With `final=False` (a partial answer) an image
    or HTML tag still being written at the very end is left out until it is complete."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if not final:
        text = _hold_back_incomplete(text)
    blocks: list[str] = []
    for is_code, chunk in _split_fences(text):
        blocks.append(chunk if is_code else _adapt_prose(chunk, tables))
    result = "\n\n".join(block for block in blocks if block.strip())
    return result.strip("\n").rstrip()


def for_plain_reply(card_text: str) -> str:
    """Card markdown for a sessionWebhook reply, whose renderer breaks lines at `\\n` and may show `<br>`."""
    return card_text.replace(LINE_BREAK, "\n")


def _hold_back_incomplete(text: str) -> str:
    last_line = text.rsplit("\n", 1)[-1]
    for pattern in (_TRAILING_IMAGE, _TRAILING_TAG):
        match = pattern.search(last_line)
        if match:
            return text[: len(text) - len(last_line) + match.start()]
    return text


def _split_fences(text: str) -> list[tuple[bool, str]]:
    """(is_code, text) runs; a code run includes its fences. An unclosed fence is closed at the end."""
    runs: list[tuple[bool, str]] = []
    prose: list[str] = []
    code: list[str] | None = None
    fence = ""
    for line in text.split("\n"):
        if code is None:
            match = _FENCE.match(line)
            if match and not (match.group(2)[0] == "`" and "`" in match.group(3)):
                if prose:
                    runs.append((False, "\n".join(prose)))
                    prose = []
                code, fence = [line], match.group(2)
            else:
                prose.append(line)
        else:
            code.append(line)
            stripped = line.strip()
            if stripped.startswith(fence[0] * len(fence)) and not stripped.strip(fence[0]):
                runs.append((True, "\n".join(code)))
                code = None
    if code is not None:
        while code and not code[-1].strip() and len(code) > 1:
            code.pop()
        runs.append((True, "\n".join([*code, fence])))
    if prose:
        runs.append((False, "\n".join(prose)))
    return runs


def _protect_inline_code(text: str) -> tuple[str, list[str]]:
    saved: list[str] = []

    def keep(match: re.Match[str]) -> str:
        saved.append(match.group(0))
        return f"\x00{len(saved) - 1}\x00"

    return _INLINE_CODE.sub(keep, text), saved


def _restore(text: str, saved: list[str]) -> str:
    return _PLACEHOLDER.sub(lambda m: saved[int(m.group(1))], text)


def _adapt_prose(text: str, tables: str) -> str:
    text, saved = _protect_inline_code(text)
    text = _convert_html(text)
    lines = _convert_tables(text.split("\n"), tables)
    text = _join_lines(lines)
    return _restore(text, saved)


def _attributes(tag: str) -> dict[str, str]:
    return {m.group(1).lower(): m.group(2) if m.group(2) is not None else m.group(3) for m in _ATTRIBUTE.finditer(tag)}


def _convert_html(text: str) -> str:
    if "<" not in text and "&" not in text:
        return text
    text = _DROP_WITH_CONTENT.sub("", text)
    text = _COMMENT.sub("", text)
    text = _BR_AT_END_OF_LINE.sub("\n", text)  # the newline breaks the line already
    text = _BR.sub("\x01", text)  # kept as a line break, restored after the line pass
    text = _SUMMARY.sub(lambda m: f"\n\n**{m.group(1).strip()}**\n\n", text)
    text = _HEADING_TAG.sub(lambda m: f"\n\n{'#' * int(m.group(1))} {m.group(2).strip()}\n\n", text)
    text = _ANCHOR.sub(lambda m: f"[{m.group(2).strip()}]({m.group(1)})", text)

    def image(match: re.Match[str]) -> str:
        attrs = _attributes(match.group(0))
        return f"![{attrs.get('alt', '')}]({attrs['src']})" if attrs.get("src") else ""

    text = _IMG.sub(image, text)

    def tag(match: re.Match[str]) -> str:
        closing, name = match.group(1), match.group(2).lower()
        if name in _INLINE_TAGS:
            return _INLINE_TAGS[name]
        if name == "hr":
            return "\n\n---\n\n"
        if name == "li":
            return "" if closing else "\n- "
        if name in ("tr",):
            return "\n" if closing else ""
        if name in ("td", "th"):
            return " " if closing else ""
        if name in _BLOCK_TAGS:
            return "\n\n"
        if name in _STRIPPED_TAGS or name in ("summary", "img", "br", "a"):
            return ""
        return match.group(0)  # not HTML we know: `<T>` in prose, `<user_id>` placeholders

    text = _ANY_TAG.sub(tag, text)
    for entity in _ENTITIES:
        if entity in text:
            text = text.replace(entity, " " if entity == "&nbsp;" else html.unescape(entity))
    return re.sub(r"\n{3,}", "\n\n", text)


# tables ---------------------------------------------------------------------------------------------------


def _cells(row: str) -> list[str]:
    row = row.strip()
    if row.startswith("|"):
        row = row[1:]
    if row.endswith("|") and not row.endswith("\\|"):
        row = row[:-1]
    return [cell.strip().replace("\\|", "|") for cell in re.split(r"(?<!\\)\|", row)]


def _is_table_start(lines: list[str], index: int) -> bool:
    if index + 1 >= len(lines) or "|" not in lines[index] or "|" not in lines[index + 1]:
        return False
    if not _TABLE_SEPARATOR.match(lines[index + 1]):
        return False
    return len(_cells(lines[index])) == len(_cells(lines[index + 1]))


def _convert_tables(lines: list[str], style: str) -> list[str]:
    out: list[str] = []
    index = 0
    while index < len(lines):
        if not _is_table_start(lines, index):
            out.append(lines[index])
            index += 1
            continue
        header = _cells(lines[index])
        end = index + 2
        while end < len(lines) and lines[end].strip() and "|" in lines[end]:
            end += 1
        rows = [_fit(_cells(line), len(header)) for line in lines[index + 2 : end]]
        out.extend(["", *_render_table(header, rows, style, lines[index:end]), ""])
        index = end
    return out


def _fit(cells: list[str], width: int) -> list[str]:
    return (cells + [""] * width)[:width]


def _render_table(header: list[str], rows: list[list[str]], style: str, original: list[str]) -> list[str]:
    if style == "keep":
        return [line.strip() for line in original]
    if style == "code":
        return _table_as_code(header, rows)
    lines: list[str] = []
    for row in rows:
        if len(header) == 1:
            lines.append(f"- {row[0]}")
        elif len(header) == 2:
            lines.append(f"- **{row[0]}**: {row[1]}" if row[0] else f"- {row[1]}")
        else:
            details = " · ".join(f"{name}: {value}" if name else value
                                 for name, value in zip(header[1:], row[1:], strict=True) if value)
            title = f"**{row[0]}**" if row[0] else ""
            lines.append("- " + " — ".join(part for part in (title, details) if part))
    return lines or [f"- {' · '.join(header)}"]


def _width(text: str) -> int:
    return sum(2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1 for ch in text)


def _table_as_code(header: list[str], rows: list[list[str]]) -> list[str]:
    plain = [[_PLACEHOLDER.sub("", cell).replace("\x01", " ") for cell in row] for row in [header, *rows]]
    widths = [max(_width(row[i]) for row in plain) for i in range(len(header))]

    def line(row: list[str]) -> str:
        return "  ".join(cell + " " * (widths[i] - _width(cell)) for i, cell in enumerate(row)).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return ["```", line(plain[0]), rule, *(line(row) for row in plain[1:]), "```"]


# line breaks ----------------------------------------------------------------------------------------------


def _is_table_row(line: str) -> bool:
    return line.lstrip().startswith("|") and line.rstrip().endswith("|")


def _new_list(previous: str, line: str) -> bool:
    """A top-level item of the other kind (bullet after numbered, or back) starts another list."""
    if line[:1].isspace() or previous[:1].isspace():
        return False
    return previous.lstrip()[:1].isdigit() != line.lstrip()[:1].isdigit()


def _join_lines(lines: list[str]) -> str:
    """Single newlines inside a paragraph become `<br>`; block syntax keeps its newlines; quote lines merge."""
    out: list[str] = []
    in_code_table = False
    for raw in lines:
        line = raw.rstrip()
        if line == "```":  # a table rendered as code by _convert_tables
            in_code_table = not in_code_table
            out.append(line)
            continue
        if in_code_table:
            out.append(raw)
            continue
        if not line.strip():
            if out and out[-1] != "":
                out.append("")
            continue
        previous = out[-1] if out else ""
        quote = _QUOTE.match(line)
        if quote and previous.lstrip().startswith(">"):
            out[-1] = previous + LINE_BREAK + quote.group(1).strip() if quote.group(1).strip() else previous
            continue
        if quote:
            if previous:
                out.append("")
            out.append("> " + quote.group(1).strip())
            continue
        if previous.lstrip().startswith(">"):
            out.append("")  # DingTalk would run the next paragraph into the quote
            previous = ""
        starts_block = bool(_BLOCK_START.match(line) or _RULE.match(line))
        if _HEADING.match(line) or _RULE.match(line):
            if previous:
                out.append("")
            out.append(line.strip() if _HEADING.match(line) else "---")
            out.append("")
            continue
        if previous and not starts_block and not _is_table_row(previous) and not _HEADING.match(previous):
            out[-1] = previous + LINE_BREAK + line.strip()
            continue
        if previous and _LIST_ITEM.match(line) and (not _LIST_ITEM.match(previous) or _new_list(previous, line)):
            out.append("")  # a list starts a block of its own
        out.append(line if _LIST_ITEM.match(line) or _is_table_row(line) else line.strip())
    text = "\n".join(out).strip("\n")
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.replace("\x01", LINE_BREAK)


# images and links -----------------------------------------------------------------------------------------

_IMAGE = re.compile(r"!\[([^\]\n]*)\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_LINK = re.compile(r"(?<!!)\[([^\]\n]*)\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def outside_code(text: str, transform: Callable[[str], str]) -> str:
    """Apply `transform` to the text outside fenced and inline code."""
    pieces: list[str] = []
    for is_code, chunk in _split_fences(text):
        if is_code:
            pieces.append(chunk)
        else:
            protected, saved = _protect_inline_code(chunk)
            pieces.append(_restore(transform(protected), saved))
    return "\n".join(pieces)


def replace_images(text: str, replacement: Callable[[str, str], str]) -> str:
    """Replace each markdown image outside code by `replacement(alt, url)`."""
    return outside_code(text, lambda chunk: _IMAGE.sub(lambda m: replacement(m.group(1), m.group(2)), chunk))


def replace_links(text: str, replacement: Callable[[str, str], str]) -> str:
    """Replace each markdown link (not image) outside code by `replacement(label, url)`."""
    return outside_code(text, lambda chunk: _LINK.sub(lambda m: replacement(m.group(1), m.group(2)), chunk))


# --- links that must not reach the card ------------------------------------------------------------------

# A model can be made to write any link: only web links (and scheme-less ones: DingTalk media ids, Dify's
# relative /files/ URLs) may reach a card. `javascript:`, `data:`, `vbscript:`, `file:`, and DingTalk's own
# `dtmd://` (which makes the reader's client send a message when tapped) are shown as plain text.
SAFE_LINK_SCHEMES = frozenset({"http", "https"})
_URL_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.\-]*):")
_INVISIBLE = re.compile(r"[\x00-\x20\x7f-\x9f\u200b-\u200f\u2028\u2029\ufeff]+")
_AUTOLINK = re.compile(r"<([a-zA-Z][a-zA-Z0-9+.\-]{1,31}:[^<>\s]*)>")
_LINK_DEFINITION = re.compile(r"^( {0,3}\[[^\]\n]+\]:)[ \t]*<?([^\s>]+)>?.*$", re.MULTILINE)
_LINK_OPENING = re.compile(r"\]\((?=\s*<?([^)>\n]*))")


def link_allowed(url: str) -> bool:
    """Whether a link target may reach the card: http(s), or no scheme at all. Entities, %-escapes and
    invisible characters are undone first, as a browser would before it reads the scheme."""
    cleaned = _INVISIBLE.sub("", html.unescape(unquote(html.unescape(url))))
    scheme = _URL_SCHEME.match(cleaned)
    return scheme is None or scheme.group(1).lower() in SAFE_LINK_SCHEMES


def neutralise_links(text: str) -> str:
    """Links and images whose target is not a web link become their text (outside code, which shows them as
    written anyway). What the link patterns do not recognise but a renderer might (odd titles, nested
    parentheses) has the `](` of its link broken, so that it is no link at all."""

    def transform(chunk: str) -> str:
        chunk = _IMAGE.sub(lambda m: m.group(0) if link_allowed(m.group(2)) else m.group(1), chunk)
        chunk = _LINK.sub(lambda m: m.group(0) if link_allowed(m.group(2)) else m.group(1), chunk)
        chunk = _AUTOLINK.sub(lambda m: m.group(0) if link_allowed(m.group(1)) else m.group(1), chunk)
        chunk = _LINK_DEFINITION.sub(
            lambda m: m.group(0) if link_allowed(m.group(2)) else f"{m.group(1)} {LINK_REMOVED}", chunk
        )
        return _LINK_OPENING.sub(lambda m: "](" if link_allowed(m.group(1)) else "] (", chunk)

    return outside_code(text, transform)
