"""benchmarks/RESULTS.md: each benchmark script owns one '## ' section of it and rewrites only that one."""
import os
import re

INTRO = "# Benchmark results\n\nRecorded runs of the side-by-side benchmarks in this folder (`make bench`).\n"


def write_section(path, heading, section):
    """Replaces the `heading` line and everything up to the next '## ' heading with `section`, or appends
    `section` when the file has no such heading; every other section of the file is kept as it is."""
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
        rest = text[nxt + 1:] if nxt >= 0 else ""
        text = text[:start] + section + ("\n" + rest if rest else "")
    with open(path, "w") as f:
        f.write(text)
