"""docs/config.md, generated from jaxlmc.settings (through jaxlmc.config): every section and key with its type, its default and the comment it is
declared with. `python -m jaxlmc.config_doc > docs/config.md` writes it; a test fails when the file is stale."""
from __future__ import annotations

import dataclasses
import inspect
import json
import re
import typing

from jaxlmc import config

_FIELD = re.compile(r"^\s{4}(\w+):")


def _comments(cls) -> dict[str, str]:
    """{field: its comment}: the comment lines right above the field and the one at the end of its line (and of the
    lines continuing its declaration)."""
    lines, _ = inspect.getsourcelines(cls)
    out, above, current = {}, [], None
    for line in lines[1:]:
        stripped = line.strip()
        if stripped.startswith("#"):
            above.append(stripped.lstrip("# "))
            current = None
            continue
        match = _FIELD.match(line)
        if match:
            current = match.group(1)
            out[current] = above
            above = []
        elif not line.startswith(" " * 8):
            above, current = [], None
        if current and "  # " in line:
            out[current] = out[current] + [line.split("  # ", 1)[1].strip()]
    return {k: " ".join(v) for k, v in out.items()}


def _type_name(hint) -> str:
    if typing.get_origin(hint) is typing.Literal:
        return " \\| ".join(f"`{json.dumps(a)}`" for a in typing.get_args(hint))
    if typing.get_origin(hint) is list:
        return f"list of {_type_name(typing.get_args(hint)[0])}"
    if typing.get_origin(hint) in (typing.Union, __import__("types").UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(hint))
    return getattr(hint, "__name__", str(hint))


def render() -> str:
    """The whole of docs/config.md."""
    parts = ["# Config keys", "",
             "Generated from `jaxlmc/settings.py` by `python -m jaxlmc.config_doc > docs/config.md` (a test fails when "
             "this file is stale). " + config.__doc__.split("\n\n")[1].replace("\n", " ").replace("``", "`").strip(), ""]
    for section in dataclasses.fields(config.Config):
        cls = typing.get_type_hints(config.Config)[section.name]
        hints = typing.get_type_hints(cls)
        comments = _comments(cls)
        training = " (training section: a run directory refuses a change)" if (
            section.name in config.TRAINING_SECTIONS) else ""
        parts += [f"## `[{section.name}]`{training}", "", "| key | type | default | meaning |", "|---|---|---|---|"]
        defaults = cls()
        for f in dataclasses.fields(cls):
            default = json.dumps(getattr(defaults, f.name))
            grid = " Grid axis: one member per value." if "grid" in f.metadata and f.name != "seeds" else ""
            text = (comments.get(f.name, "") + grid).replace("|", "\\|")
            parts.append(f"| `{f.name}` | {_type_name(hints[f.name])} | `{default}` | {text} |")
        parts.append("")
    return "\n".join(parts)


if __name__ == "__main__":
    print(render(), end="")
