"""The trainer's flags as a sweep spec writes them: every spelling, typed values, argv words.

`FlagTable(parser)` answers for the trainer's own argparse parser: `action("base_lr")` (any of
`base-lr`, `base_lr`, `--base-lr`), `typed(action, value)` (argparse's conversion and choices,
`${VAR}` / `${VAR:-default}` expanded in strings) and `argv(flags)` (the command-line words).
"""

from __future__ import annotations

import argparse
import os
import re
from typing import Any

_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand_env(value: Any) -> Any:
    if not isinstance(value, str):
        return value
    return _ENV.sub(lambda m: os.environ.get(m.group(1)) or (m.group(2) or ""), value)


class FlagTable:
    """The trainer's options by every spelling, and how to type and write each one."""

    def __init__(self, parser: argparse.ArgumentParser) -> None:
        self.by_name: dict[str, argparse.Action] = {}
        for action in parser._actions:
            longs = [s for s in action.option_strings if s.startswith("--")]
            if not longs:
                continue
            for spelling in (*longs, action.dest):
                key = spelling.lstrip("-").replace("_", "-")
                self.by_name.setdefault(key, action)

    def action(self, name: str) -> argparse.Action | None:
        return self.by_name.get(str(name).lstrip("-").replace("_", "-"))

    @staticmethod
    def option(action: argparse.Action) -> str:
        return next(s for s in action.option_strings if s.startswith("--"))

    @staticmethod
    def is_switch(action: argparse.Action) -> bool:
        return action.nargs == 0

    def typed(self, action: argparse.Action, value: Any) -> Any:
        """The value as argparse would hold it; ValueError with the reason if it would not."""
        value = expand_env(value)
        if self.is_switch(action):
            if not isinstance(value, bool):
                raise ValueError(f"takes true or false, got {value!r}")
            if not value and not isinstance(action, argparse.BooleanOptionalAction):
                if action.default is not False:
                    raise ValueError("cannot be switched off")
            return value
        if isinstance(value, (list, dict)) or value is None:
            raise ValueError(f"takes one value, got {value!r}")
        if action.type is not None and not isinstance(value, bool):
            try:
                value = action.type(value)
            except (TypeError, ValueError, argparse.ArgumentTypeError):
                name = getattr(action.type, "__name__", "value")
                raise ValueError(f"{value!r} is not a valid {name}") from None
        elif isinstance(value, bool):
            raise ValueError(f"takes a value, got {value!r}")
        if action.choices is not None and value not in action.choices:
            shown = ", ".join(map(str, action.choices))
            raise ValueError(f"{value!r} is not one of {shown}")
        return value

    def argv(self, flags: dict[str, Any]) -> list[str]:
        """Command-line words for canonical flags; False switches are left out (or --no-X)."""
        words: list[str] = []
        for option, value in flags.items():
            action = self.action(option)
            if action is not None and self.is_switch(action):
                if value:
                    words.append(option)
                elif isinstance(action, argparse.BooleanOptionalAction):
                    words.append("--no-" + option[2:])
            else:
                words += [option, _number_word(value)]
        return words


def _number_word(value: Any) -> str:
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return repr(value)  # '2.0': a float flag stays a float on the command line
    return str(value)
