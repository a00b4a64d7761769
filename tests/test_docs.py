"""The README's rule table is the registry's, not a hand-kept copy."""

import pathlib

from fastopt.docs import rules_table

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def test_readme_rule_table_matches_the_registry():
    text = README.read_text(encoding="utf-8")
    start = text.index("<!-- rules-table:start -->\n") + len("<!-- rules-table:start -->\n")
    end = text.index("<!-- rules-table:end -->")
    assert text[start:end].strip() == rules_table().strip(), (
        "README rule table is stale: regenerate it with python -m fastopt.docs")
