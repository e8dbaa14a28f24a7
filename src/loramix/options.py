"""Command-line options derived from the options dataclasses (litgpt's pattern), so each setting, its default and
its help are stated once, on the dataclass. A field made with `option(default, help)` becomes a command-line option;
`flag=` renames it (else --field-name), `comma=True` lets a tuple field take comma-separated values, `required=True`
makes the option one the command cannot run without (the dataclass default is then a placeholder).

    @app.command()
    @takes_options(GenerationOptions)
    def generate(prompts: list[str], options: GenerationOptions) -> None: ...
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from collections.abc import Callable
from typing import Annotated


def option(default, help: str, **more) -> dataclasses.Field:
    """A dataclass field that is also a command-line option: its default and its help, stated once."""
    return dataclasses.field(default=default, metadata={"help": help, **more})


def _option_parameter(field: dataclasses.Field, kind: type) -> inspect.Parameter:
    default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
    if typing.get_origin(kind) is tuple:  # a repeatable option (comma-separated values come as text, split later)
        element = str if field.metadata.get("comma") else typing.get_args(kind)[0]
        kind, default = list[element], [str(value) for value in default] if element is str else list(default)
    import typer  # only the command line needs it

    flag = field.metadata.get("flag", "--" + field.name.replace("_", "-"))
    if kind is bool or kind == bool | None:
        flag = f"{flag}/--no-{flag[2:]}"
    if field.metadata.get("required"):
        default = ...  # typer's mark of a required option
    annotation = Annotated[kind, typer.Option(flag, help=field.metadata["help"])]
    return inspect.Parameter(field.name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)


def option_fields(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if "help" in f.metadata]


def options_from_values(cls: type, values: dict, base: object | None = None) -> object:
    """An instance of `cls` from command-line values (lists back to tuples, comma-separated ones split)."""
    from loramix.errors import OptionError

    hints = typing.get_type_hints(cls)
    converted = {}
    for field in option_fields(cls):
        value = values[field.name]
        if isinstance(value, list):
            if field.metadata.get("comma"):
                element = typing.get_args(hints[field.name])[0]
                parts = [part.strip() for item in value for part in item.split(",") if part.strip()]
                try:
                    value = [element(part) for part in parts]
                except ValueError:
                    raise OptionError(field.name, f"takes comma-separated {element.__name__} values, got "
                                      f"{','.join(parts)!r}.") from None  # fmt: skip
            value = tuple(value)
        converted[field.name] = value
    return dataclasses.replace(base, **converted) if base is not None else cls(**converted)


def takes_options(cls: type, make: Callable[[dict], object] | None = None, name: str = "options") -> Callable:
    """Decorator: the command also takes every option field of `cls`, and receives them as one object in its
    parameter `name` (built by `make(values)` when the dataclass needs more than its option fields, e.g.
    TrainConfig's task). Stack it to take several dataclasses, each under its own name."""
    hints = typing.get_type_hints(cls)
    fields = option_fields(cls)
    names = [f.name for f in fields]

    def wrap(func: Callable) -> Callable:
        signature = inspect.signature(func, eval_str=True)
        own = [p for p in signature.parameters.values() if p.name != name]
        extra = [_option_parameter(f, hints[f.name]) for f in fields]

        @functools.wraps(func)
        def command(**kwargs):
            values = {field: kwargs.pop(field) for field in names}
            options = make(values | kwargs) if make else options_from_values(cls, values)
            return func(**kwargs, **{name: options})

        parameters = [*own, *extra]
        command.__signature__ = signature.replace(parameters=parameters)
        command.__annotations__ = {p.name: p.annotation for p in parameters}
        del command.__wrapped__  # typer must read the signature above, not the function's own
        return command

    return wrap
