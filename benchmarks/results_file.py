"""benchmarks/RESULTS.md: each benchmark script owns one '## ' section of it and rewrites only that one."""
import os
import re

INTRO = "# Benchmark results\n\nRecorded runs of the side-by-side benchmarks in this folder (`make bench`).\n"


def _table_end(lines):
    """The index of the first line after the first Markdown table in `lines` (len(lines) when it runs to the
    end, 0 when there is no table)."""
    start = next((i for i, line in enumerate(lines) if line.startswith("|")), None)
    if start is None:
        return 0
    end = start
    while end < len(lines) and lines[end].startswith("|"):
        end += 1
    return end


def write_section(path, heading, section):
    """Replaces the `heading` line and everything up to the next '## ' heading with `section`, or appends
    `section` when the file has no such heading; every other section of the file is kept as it is.

    Notes written by hand under a section's table (and '### ' subsections there) survive a rerun: when the
    script's own `section` ends with its table, whatever followed the old table is put back after the new one.
    A script that writes text of its own after its table owns all of it."""
    if os.path.exists(path):
        with open(path) as f:
            text = f.read()
    else:
        text = INTRO
    found = re.search("^" + re.escape(heading) + "[ \t]*$", text, re.M)
    if found is None:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        start = found.start()
        nxt = text.find("\n## ", found.end())
        old = text[start:nxt + 1] if nxt >= 0 else text[start:]
        rest = text[nxt + 1:] if nxt >= 0 else ""
        new_lines = section.rstrip("\n").split("\n")
        if _table_end(new_lines) == len(new_lines):
            old_lines = old.rstrip("\n").split("\n")
            notes = old_lines[_table_end(old_lines):] if _table_end(old_lines) else []
            if any(line.strip() for line in notes):
                section = "\n".join(new_lines + notes) + "\n"
        text = text[:start] + section + ("\n" + rest if rest else "")
    with open(path, "w") as f:
        f.write(text)
