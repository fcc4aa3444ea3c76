"""What the benchmark scripts share: printing a markdown table and writing it where asked."""

from __future__ import annotations


def emit(head: list[str], rows: list[str], path: str | None) -> str:
    """The table (`head` lines, then `rows`), printed, and written to `path` when one is given."""
    text = "\n".join(head + rows) + "\n"
    print(text)
    if path:
        with open(path, "w") as f:
            f.write(text)
    return text
