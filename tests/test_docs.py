"""The docs follow the code: the README's rule table is the registry's, docs/rules.md
has a section for every rule that names its hyperparameters (with the registry's
defaults) and its state, and no tracked file points at material a cloner lacks."""

import ast
import pathlib
import re
import subprocess

import pytest

from fastopt.docs import rules_table
from fastopt.rules import RULES

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
RULES_MD = ROOT / "docs" / "rules.md"

# Built from pieces so that this file does not match itself.
OUTSIDE_POINTERS = ("../" + "shared", "shared/" + "RULES.md")
TRACKER_WORDS = re.compile(r"\bissue \d+|\bseed \d{3}\b|\bper the " + "seeds", re.I)



def test_readme_rule_table_matches_the_registry():
    text = README.read_text(encoding="utf-8")
    start = text.index("<!-- rules-table:start -->\n") + len("<!-- rules-table:start -->\n")
    end = text.index("<!-- rules-table:end -->")
    assert text[start:end].strip() == rules_table().strip(), (
        "README rule table is stale: regenerate it with python -m fastopt.docs")


def _tracked_text_files():
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True,
                             check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: no list of tracked files")
    files = []
    for name in out.decode().split("\0"):
        if not name or name.startswith("benchmarks/results/"):
            continue
        path = ROOT / name
        if not path.is_file():  # deleted in the work tree, not yet committed
            continue
        data = path.read_bytes()
        if b"\0" in data:  # binary (docs/demo.png)
            continue
        files.append((name, data.decode("utf-8", errors="replace")))
    assert len(files) > 10, f"the file list is suspiciously short: {[n for n, _ in files]}"
    return files


def test_no_tracked_file_points_outside_the_repository():
    bad = [f"{name}:{i}: {line.strip()}"
           for name, text in _tracked_text_files()
           for i, line in enumerate(text.splitlines(), 1)
           if any(p in line for p in OUTSIDE_POINTERS)]
    assert not bad, ("these lines point at files a cloner does not have; point at "
                     "docs/rules.md instead:\n" + "\n".join(bad))


def test_no_tracked_file_uses_tracker_words():
    bad = [f"{name}:{i}: {line.strip()}"
           for name, text in _tracked_text_files()
           for i, line in enumerate(text.splitlines(), 1)
           if TRACKER_WORDS.search(line)]
    assert not bad, "say what the thing is, not its tracker number:\n" + "\n".join(bad)


def _sections(text):
    """{heading: body} for the '## ' sections of a Markdown text."""
    parts = re.split(r"^## +(.+?) *$", text, flags=re.M)
    return {parts[i]: parts[i + 1] for i in range(1, len(parts), 2)}


def _defaults_table(body):
    """{name: default} from a section's hyperparameter table (rows '| `name` | default |')."""
    out = {}
    for name, cell in re.findall(r"^\| `(\w+)` \| ([^|]+) \|", body, flags=re.M):
        try:
            out[name] = ast.literal_eval(cell.strip().strip("`"))
        except (ValueError, SyntaxError):
            out[name] = cell.strip()
    return out


def test_rules_md_has_a_section_for_every_rule_and_lbfgs():
    sections = _sections(RULES_MD.read_text(encoding="utf-8"))
    missing = [name for name in (*RULES, "L-BFGS") if name not in sections]
    assert not missing, f"docs/rules.md has no '## <name>' section for {missing}"


def test_rules_md_names_every_hyperparameter_state_and_default():
    sections = _sections(RULES_MD.read_text(encoding="utf-8"))
    problems = []
    for name, rule in RULES.items():
        if name not in sections:
            continue  # reported by the test above
        # AdamW and SGDW refer to Adam's and SGD's sections: read every section of
        # the rules that share the kernel
        text = "".join(sections[n] for n, r in RULES.items()
                       if r.kernel == rule.kernel and n in sections)
        names = ([h.name for h in rule.hypers] + [b.name for b in rule.buffers]
                 + [s for s, _ in rule.scalars])
        problems += [f"{name}: `{n}` not mentioned" for n in names if f"`{n}`" not in text]
        table = _defaults_table(sections[name])
        for h in rule.hypers:
            if h.name in table and table[h.name] != h.default:
                problems.append(f"{name}: {h.name} default is {h.default!r} in the "
                                f"registry, {table[h.name]!r} in docs/rules.md")
        if table and set(table) != {h.name for h in rule.hypers}:
            problems.append(f"{name}: the table lists {sorted(table)}, the registry has "
                            f"{sorted(h.name for h in rule.hypers)}")
    assert not problems, "docs/rules.md is stale:\n" + "\n".join(problems)
