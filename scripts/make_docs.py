"""Write docs/commands.md from the command line itself: every command, its arguments and flags, their defaults and
help, as the options dataclasses and typer declare them. A test regenerates it and compares, so it cannot go stale.

    python scripts/make_docs.py          # rewrite docs/commands.md
"""

from __future__ import annotations

from pathlib import Path

import typer

OUT = Path(__file__).resolve().parent.parent / "docs" / "commands.md"


def _default(param) -> str:
    default = param.default
    if default is None or default == () or default == [] or callable(default):
        return ""
    if getattr(param, "is_flag", False) and param.secondary_opts:
        return param.opts[0] if default else param.secondary_opts[0]
    if isinstance(default, list | tuple):
        return ",".join(str(v) for v in default)
    return str(default)


def _row(param) -> str:
    if param.param_type_name == "argument":
        name = param.name.upper()
    else:
        name = " / ".join([*param.opts, *param.secondary_opts])
    text = (getattr(param, "help", None) or "").replace("|", "\\|").replace("\n", " ")
    required = " (required)" if param.required else ""
    return f"| `{name}` | {_default(param)} | {text}{required} |"


def _command(path: str, command) -> list[str]:
    lines = [f"## `loramix {path}`", "", (command.help or "").strip().split("\n\n")[0].replace("\n", " "), ""]
    params = [p for p in command.params if p.name != "help" and not getattr(p, "hidden", False)]
    if params:
        lines += ["| argument / flag | default | what it does |", "|---|---|---|"]
        lines += [_row(p) for p in params]
        lines.append("")
    return lines


def render() -> str:
    from loramix.cli import app

    root = typer.main.get_command(app)
    lines = [
        "# Commands",
        "",
        "Every command and flag, written from the code by `python scripts/make_docs.py` (a test checks it is current).",
        "Flags that hold a setting of the library come from its options dataclass, where each default and help text "
        "is stated once.",
        "",
    ]
    context = typer.Context(root)
    for name in sorted(root.list_commands(context)):
        command = root.get_command(context, name)
        if hasattr(command, "list_commands"):  # a group of commands
            for sub in sorted(command.list_commands(context)):
                lines += _command(f"{name} {sub}", command.get_command(context, sub))
        else:
            lines += _command(name, command)
    return "\n".join(lines).rstrip("\n") + "\n"


if __name__ == "__main__":
    OUT.write_text(render(), encoding="utf-8")
    print(f"wrote {OUT}")
