"""Documentation generated from the registry: ``python -m fastopt.docs`` prints the
README's rule table (a test checks that the README carries exactly this text)."""

from fastopt.rules import RULES


def _fmt(value):
    if isinstance(value, tuple):
        return "(" + ", ".join(_fmt(v) for v in value) + ")"
    if isinstance(value, float):
        return f"{value:g}"
    return repr(value)


def rules_table() -> str:
    lines = ["| class | hyperparameters (defaults) | state | bytes/elem f32 | update | paper |",
             "|---|---|---|---|---|---|"]
    for rule in RULES.values():
        hp = ", ".join(f"{h.name}={_fmt(h.default)}" for h in rule.hypers)
        state = ", ".join(b.name for b in rule.buffers)
        if rule.scalars:
            state += "; " + ", ".join(n for n, _ in rule.scalars)
        nbytes = rule.bytes_per_element(rule.defaults, 4)
        lines.append(f"| `{rule.name}` | {hp} | {state} | {nbytes} | {rule.update} | "
                     f"{rule.paper} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(rules_table())
