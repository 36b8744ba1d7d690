"""Markdown rendering of a report's blocks (report.md, table.md)."""

from __future__ import annotations

from coin.evaluation.report.blocks import DASH, Block, Bullets, Heading, Plot, Table, Text


def _md_escape(text: str) -> str:
    """A table cell as Markdown: ``|`` escaped, a line break as a space (a set name of one's own with a newline
    in it ended the table there, and every table after it in report.md and table.md)."""
    return " ".join(text.replace("|", "\\|").splitlines())


def to_markdown(blocks: list[Block]) -> str:
    lines: list[str] = []
    for b in blocks:
        if isinstance(b, Heading):
            lines += ["#" * b.level + " " + b.text, ""]
        elif isinstance(b, Text):
            lines += [b.text, ""]
        elif isinstance(b, Bullets):
            lines += [f"- {item}" for item in b.items] + [""]
        elif isinstance(b, Table):
            lines.append("| " + " | ".join(map(_md_escape, b.header)) + " |")
            lines.append("|" + "|".join(["---"] * b.text_cols + ["---:"] * (len(b.header) - b.text_cols)) + "|")
            for i, row in enumerate(b.rows):
                cells = [f"**{c}**" if i in b.bold_rows and c != DASH else c for c in map(_md_escape, row)]
                lines.append("| " + " | ".join(cells) + " |")
            lines += [""] + ([b.caption, ""] if b.caption else [])
        elif isinstance(b, Plot):
            lines += [f"![{b.alt}]({b.name}.png)", ""]
    return "\n".join(lines)
