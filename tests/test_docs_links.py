"""The README and docs/*.md: every relative link and image resolves to a file in the
repository (and an anchor to a heading of the file it names), the README stays a README
(at most 250 lines, the headline command on its first screen), and no text or code names a
file outside the repository."""
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
DOCS = os.path.join(ROOT, "docs")
HEADLINE = "python train_net.py --config-file configs/voc_r50_hg52.yaml --num-gpus 8"
README_MAX_LINES = 250
HEADLINE_WITHIN = 60

FENCE = re.compile(r"^\s*(```|~~~)")
INLINE_CODE = re.compile(r"`[^`]*`")
# [text](target) and ![alt](target); the target may carry a "title".
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


def markdown_files():
    files = [README]
    files += sorted(os.path.join(DOCS, f) for f in os.listdir(DOCS) if f.endswith(".md"))
    return files


def prose_lines_keep_code(text):
    """(line number, line) outside fenced code blocks; headings keep their inline code (it
    is part of the anchor)."""
    in_fence = False
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            in_fence = not in_fence
            continue
        if not in_fence:
            yield number, line


def prose_lines(text):
    """(line number, line) outside fenced code blocks, inline code removed."""
    for number, line in prose_lines_keep_code(text):
        yield number, INLINE_CODE.sub("", line)


def slug(heading):
    """GitHub's anchor for a heading: lower case, punctuation but '-' and '_' dropped,
    spaces to '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text only
    text = text.replace("`", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path):
    seen, result = {}, set()
    with open(path, encoding="utf-8") as f:
        for _, line in prose_lines_keep_code(f.read()):
            m = HEADING.match(line)
            if not m:
                continue
            base = slug(m.group(2))
            n = seen.get(base, 0)
            seen[base] = n + 1
            result.add(base if n == 0 else f"{base}-{n}")
    return result


def broken_links(path, root=ROOT):
    """'file:line: target (why)' for each relative link or image of a markdown file that
    does not resolve to a file inside root."""
    problems = []
    with open(path, encoding="utf-8") as f:
        text = f.read()
    rel = os.path.relpath(path, root)
    for number, line in prose_lines(text):
        for target in LINK.findall(line):
            if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            file_part, _, anchor = target.partition("#")
            dest = os.path.normpath(os.path.join(os.path.dirname(path), file_part)) if file_part else path
            where = f"{rel}:{number}: {target}"
            if os.path.commonpath([os.path.realpath(dest), os.path.realpath(root)]) != os.path.realpath(root):
                problems.append(f"{where} (outside the repository)")
            elif not os.path.exists(dest):
                problems.append(f"{where} (no such file)")
            elif anchor and dest.endswith(".md") and os.path.isfile(dest) and anchor not in anchors(dest):
                problems.append(f"{where} (no heading with anchor #{anchor} in {os.path.relpath(dest, root)})")
    return problems


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: os.path.relpath(p, ROOT))
def test_links_and_images_resolve(path):
    problems = broken_links(path)
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_the_checker_catches_broken_links(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "there.md").write_text("# A heading\n")
    page = tmp_path / "docs" / "page.md"
    page.write_text(
        "# Page\n"
        "[ok](there.md) [ok anchor](there.md#a-heading) [self](#page) ![ok image](there.md)\n"
        "[web](https://example.com) `[in code](missing.md)`\n"
        "```\n[in a fence](missing.md)\n```\n"
        "[gone](missing.md) ![gone image](figures/missing.png) [bad anchor](there.md#nope)\n"
        "[escapes](../../outside.md)\n"
    )
    problems = broken_links(str(page), root=str(tmp_path))
    assert [p.split(": ", 1)[1] for p in problems] == [
        "missing.md (no such file)",
        "figures/missing.png (no such file)",
        "there.md#nope (no heading with anchor #nope in docs/there.md)",
        "../../outside.md (outside the repository)",
    ], problems


def test_readme_is_short_with_the_headline_command_first():
    with open(README, encoding="utf-8") as f:
        lines = f.read().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines (at most {README_MAX_LINES})"
    first = [i for i, line in enumerate(lines, 1) if HEADLINE in line]
    assert first and first[0] <= HEADLINE_WITHIN, (
        f"'{HEADLINE}' must appear within the README's first {HEADLINE_WITHIN} lines"
        + (f"; first at line {first[0]}" if first else "; it is missing"))


SKIP_DIRS = {".git", ".deps", "output", "__pycache__", "build", "node_modules"}
SIBLING = "shar" + "ed"  # spelt apart, so that this file does not match itself


def test_nothing_names_a_file_outside_the_repository():
    """The reference figures live in the repository (docs/reference/); a path into the
    project's sibling folder of shared material works on one machine only."""
    pattern = re.compile(r"(?<![\w.-])(\.\./)*" + SIBLING + "/")
    hits = []
    for dirpath, dirnames, filenames in os.walk(ROOT):
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS and not d.startswith(".venv")
                       and not d.endswith(".egg-info")]
        for name in filenames:
            if not name.endswith((".py", ".md")):
                continue
            path = os.path.join(dirpath, name)
            with open(path, encoding="utf-8", errors="replace") as f:
                for number, line in enumerate(f, 1):
                    if pattern.search(line):
                        hits.append(f"{os.path.relpath(path, ROOT)}:{number}: {line.strip()}")
    assert not hits, "references to files outside the repository:\n" + "\n".join(hits)
