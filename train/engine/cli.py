"""Command-line parsing and errors shared by every command: a flag per field of a config dataclass,
YAML ``--config`` files and presets, range checks from the fields' metadata, and one error path
(``<command>: error: ...`` on one line, exit 2 for a bad option, 1 for a failure while running).

Precedence: defaults < ``--preset`` < ``--config`` YAML < flags given on the command line.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import logging
import math
import os
import re
import sys
import textwrap
import typing
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

from mae_fast.device import is_main_process
from mae_fast.errors import ConfigError, NonFiniteLossError
from mae_fast.files import strict_json

log = logging.getLogger("mae_fast.train")


AUTO = "auto"


def opt(help_: str, default: Any = None, *, choices: Optional[Sequence[Any]] = None, min: Optional[float] = None,
        max: Optional[float] = None, above: Optional[float] = None, below: Optional[float] = None,
        auto: bool = False) -> Any:
    """A config field with its help text, allowed choices and range (``min``/``max`` inclusive,
    ``above``/``below`` exclusive); :func:`check_fields` enforces them. ``auto``: a number field that also
    takes the word "auto" (the command resolves it, e.g. ``--batch-size auto``)."""
    meta = {"help": help_, "choices": list(choices) if choices else None, "min": min, "max": max,
            "above": above, "below": below, "auto": auto}
    return dataclasses.field(default=default, metadata=meta)


# ------------------------------------------------------------------ field types
def _base_type(tp: Any) -> tuple[type, bool]:
    """(int | float | str | bool, optional?) of a dataclass field annotation (string or typing object)."""
    if isinstance(tp, str):
        optional = tp.startswith("Optional[")
        name = tp.removeprefix("Optional[").removesuffix("]")
        return {"int": int, "float": float, "str": str, "bool": bool}[name], optional
    args = typing.get_args(tp)
    if args:
        inner = [a for a in args if a is not type(None)]
        return inner[0], len(inner) < len(args)
    return tp, False


def _field_types(cls: type) -> Dict[str, tuple[type, bool]]:
    hints = typing.get_type_hints(cls)
    return {f.name: _base_type(hints.get(f.name, f.type)) for f in dataclasses.fields(cls)}


def coerce(name: str, value: Any, kind: type, optional: bool, where: str, auto: bool = False) -> Any:
    """``value`` as the field's type; numbers in scientific notation written as strings ("1e-3", as PyYAML
    reads them) are accepted. ConfigError naming ``where``, the option and the value otherwise."""
    flag = "--" + name.replace("_", "-")
    if value is None and optional:
        return None
    if auto and value == AUTO:
        return AUTO
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}{flag}: expected true or false, got {value!r}")
    if kind in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{where}{flag}: expected a number, got {value!r}")
        if isinstance(value, str):
            try:
                value = float(value) if kind is float else int(value)
            except ValueError:
                raise ConfigError(f"{where}{flag}: expected {'an integer' if kind is int else 'a number'}, "
                                  f"got {value!r}") from None
        if kind is int and isinstance(value, float):
            if not value.is_integer():
                raise ConfigError(f"{where}{flag}: expected an integer, got {value!r}")
            value = int(value)
        if not isinstance(value, (int, float)):
            raise ConfigError(f"{where}{flag}: expected a number, got {value!r}")
        return kind(value)
    if not isinstance(value, str):
        raise ConfigError(f"{where}{flag}: expected a string, got {value!r}")
    return value


def check_fields(cfg: Any) -> None:
    """Every field's choices and range from its metadata; ConfigError naming the flag, value and what is allowed."""
    for f in dataclasses.fields(cfg):
        value, meta = getattr(cfg, f.name), f.metadata
        flag = "--" + f.name.replace("_", "-")
        if value is None:
            continue
        if meta.get("choices") and value not in meta["choices"]:
            raise ConfigError(f"{flag} {value!r} is not one of {', '.join(map(str, meta['choices']))}")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{flag} {value}: must be a finite number")
        lo, hi, above, below = meta.get("min"), meta.get("max"), meta.get("above"), meta.get("below")
        if lo is not None and value < lo:
            raise ConfigError(f"{flag} {value}: must be >= {lo}")
        if hi is not None and value > hi:
            raise ConfigError(f"{flag} {value}: must be <= {hi}")
        if above is not None and value <= above:
            raise ConfigError(f"{flag} {value}: must be > {above}")
        if below is not None and value >= below:
            raise ConfigError(f"{flag} {value}: must be < {below}")


# ------------------------------------------------------------------ YAML
#: PyYAML contexts it reports only on reaching the next token: the offending text is where the context starts
_LOOKAHEAD_CONTEXTS = ("while scanning a simple key",)


def load_yaml(path: str, cls: type) -> Dict[str, Any]:
    """Options of ``cls`` from a YAML mapping (keys as flag names, '-' or '_'), typed and checked."""
    import yaml

    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"--config {path}: no such file")
    text = ""
    try:
        text = file.read_text()
        data = yaml.safe_load(text)
    except (yaml.YAMLError, ValueError) as e:  # ValueError: a tag such as "!!int x" PyYAML cannot construct
        raise yaml_error(e, text, path) from None
    data = data or {}
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a mapping of options, got {type(data).__name__}")
    types = _field_types(cls)
    autos = {f.name for f in dataclasses.fields(cls) if f.metadata.get("auto")}
    out = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in types:
            raise unknown_option(key, list(types), path)
        out[name] = coerce(name, value, *types[name], where=f"--config {path}: ", auto=name in autos)
    return out


def unknown_option(key: Any, names: Sequence[str], path: str) -> ConfigError:
    """The error for a YAML key that is no option, with the closest option name when one is close
    (spelled with '-' when the key is)."""
    close = difflib.get_close_matches(str(key).replace("-", "_"), names, n=1)
    hint = ""
    if close:
        dashed = "-" in str(key).lstrip("-")
        hint = f"; did you mean {(close[0].replace('_', '-') if dashed else close[0])!r}?"
    return ConfigError(f"--config {path}: unknown option {key!r}{hint}")


def yaml_error(e: Exception, text: str, path: str) -> ConfigError:
    """One line for a YAML file the parser refused: the file, the line of the offending text and what the
    parser says (``--config FILE line N: not valid YAML: ...``)."""
    line = yaml_error_line(e, text)
    where = f" line {line}" if line else ""
    return ConfigError(f"--config {path}{where}: not valid YAML: {yaml_problem(e, text, line)}")


def yaml_error_line(e: Exception, text: str) -> Optional[int]:
    """1-based line of the text a YAML error is about: the problem mark, or the construct being read (context
    mark) where PyYAML only noticed the problem at the file's end or at the next token."""
    import yaml

    if isinstance(e, yaml.reader.ReaderError):
        return min(text.count("\n", 0, e.position) + 1, _last_line(text))
    problem, context = getattr(e, "problem_mark", None), getattr(e, "context_mark", None)
    if problem is None:
        return _mark_line(context, text) if context is not None else None
    at_end = not text[problem.index:].strip()
    if context is not None and (at_end or getattr(e, "context", None) in _LOOKAHEAD_CONTEXTS):
        return _mark_line(context, text)
    return _mark_line(problem, text)


def _last_line(text: str) -> int:
    """1-based number of the last line of ``text`` that is not blank (1 for an empty text)."""
    return max(1, len(text.rstrip().splitlines()))


def _mark_line(mark: Any, text: str) -> int:
    """1-based line of a PyYAML mark (0-based; at the end of a file it points past the last line), never past
    the last line that is not blank."""
    return min(mark.line + 1, _last_line(text))


def yaml_problem(e: Exception, text: str, line: Optional[int]) -> str:
    """What the parser says, on one line: the problem, then the construct it was reading (with that
    construct's line where it is not ``line``)."""
    problem, context = getattr(e, "problem", None), getattr(e, "context", None)
    if not problem:
        return " ".join((str(e).strip().splitlines() or [type(e).__name__])[0].split())
    mark = getattr(e, "context_mark", None)
    if context and mark is not None and _mark_line(mark, text) != line:
        context = f"{context}, line {_mark_line(mark, text)}"
    return " ".join(problem.split()) + (f" ({' '.join(context.split())})" if context else "")


# ------------------------------------------------------------------ argparse
_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


class Parser(argparse.ArgumentParser):
    """argparse that takes negative numbers in scientific notation (``--blr -1.5e-4``) as values."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = _NUMBER

    def error(self, message: str) -> typing.NoReturn:
        raise ConfigError(message)


def _number(kind: type, auto: bool = False) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        if auto and text == AUTO:
            return AUTO
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}"
                                             f"{' or auto' if auto else ''}, got {text!r}") from None
        if kind is int:
            if not value.is_integer():
                raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}")
            return int(value)
        return value
    parse.__name__ = kind.__name__
    return parse


def dataclass_parser(cls: type, prog: str, description: str) -> Parser:
    """A flag per field of the config dataclass ``cls`` (``--img-size``; booleans also as ``--no-...``)."""
    p = Parser(prog=prog, description=description)
    types = _field_types(cls)
    for f in dataclasses.fields(cls):
        kind, _ = types[f.name]
        help_ = f.metadata.get("help") or f.name.replace("_", " ")
        choices = f.metadata.get("choices")
        default = "none" if f.default is None else f.default
        if "default" not in help_:
            help_ = f"{help_} (default: {default})"
        flag = "--" + f.name.replace("_", "-")
        if kind is bool:
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_)
        else:
            p.add_argument(flag, dest=f.name, type=_number(kind, bool(f.metadata.get("auto"))) if kind in (int, float) else str, default=None,
                           choices=choices, metavar=None if choices else {int: "N", float: "X"}.get(kind, "TEXT"), help=help_)
    return p


NO_BREAK = "\u00a0"


class LineHelpFormatter(argparse.HelpFormatter):
    """argparse's layout, but each line of the description and epilog is wrapped on its own; an indented
    line (``  name  text``) wraps under its text; a no-break space (U+00A0) keeps two words together."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return "\n".join(self._fill_line(line, width, indent) for line in text.splitlines())

    @staticmethod
    def _fill_line(line: str, width: int, indent: str) -> str:
        hang = re.match(r"^\s+\S+\s+", line)  # "  name   ": kept as written, the text wraps under its end
        head = hang.group(0) if hang else ""
        text = re.sub(r"[ \t]+", " ", line[len(head):]).strip()
        if not text:
            return indent + line.strip() if line.strip() else ""
        return textwrap.fill(text, width, initial_indent=indent + head, subsequent_indent=indent + " " * len(head),
                             break_on_hyphens=False, break_long_words=False).replace(NO_BREAK, " ")


def flag_words(name: str, value: Any) -> str:
    """The command-line flags that set field ``name`` to ``value`` (``--img-size 64``, ``--no-norm-pix-loss``),
    joined by a no-break space so that help text never wraps between a flag and its value."""
    flag = "--" + name.replace("_", "-")
    if isinstance(value, bool):
        return flag if value else "--no-" + flag[2:]
    return f"{flag}{NO_BREAK}{value}"


def presets_help(presets: Mapping[str, Mapping[str, Any]]) -> str:
    """One line per preset, its name and the flags it sets, for the end of ``--help``."""
    width = max(map(len, presets))
    lines = ["presets (--preset NAME sets these; --config and the flags given override them; --print-config "
             "shows every option):"]
    for name in presets:
        lines.append(f"  {name.ljust(width)}  " + " ".join(flag_words(k, v) for k, v in presets[name].items()))
    return "\n".join(lines)


def add_config_flags(p: argparse.ArgumentParser, presets: Optional[Mapping[str, Any]] = None) -> None:
    """``--config FILE.yaml`` and, when there are presets, ``--preset NAME`` (the presets' flags listed at
    the end of ``--help``)."""
    p.add_argument("--config", help="YAML file with options (keys as the flag names, '-' or '_')")
    if presets:
        p.add_argument("--preset", choices=sorted(presets),
                       help="a named set of options (each one's flags are listed below): " + ", ".join(sorted(presets)))
        p.epilog = presets_help(presets)
        p.formatter_class = LineHelpFormatter


def add_print_config_flag(p: argparse.ArgumentParser) -> None:
    """``--print-config``: the command prints its resolved options (see :func:`print_config`) and exits."""
    p.add_argument("--print-config", action="store_true",
                   help="print every option as resolved from the preset, --config and the flags (YAML, one per "
                        "line, loadable with --config) and exit without running")


def config_yaml(cfg: Any, title: str) -> str:
    """Every field of the config dataclass ``cfg`` as YAML, one ``key: value`` a line, under a ``# title``."""
    import yaml

    body = yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False, default_flow_style=False, width=10**9)
    return f"# {title}\n{body}"


def print_config(cfg: Any, title: str) -> typing.NoReturn:
    """Print ``cfg`` as YAML (rank 0) and exit 0, as ``--help`` does: nothing is run or written."""
    if is_main_process():
        print(config_yaml(cfg, title), end="", flush=True)
    raise SystemExit(0)


def parse_config(cls: type, parser: argparse.ArgumentParser, argv: Optional[List[str]] = None,
                 presets: Optional[Mapping[str, Dict[str, Any]]] = None, preset: Optional[str] = None) -> Any:
    """``cls`` from defaults < preset < ``--config`` YAML < the flags given, range-checked.
    Returns (config, parsed argparse namespace)."""
    args = parser.parse_args(argv)
    values: Dict[str, Any] = {}
    preset = preset or getattr(args, "preset", None)
    if preset:
        values.update((presets or {})[preset])
    if getattr(args, "config", None):
        values.update(load_yaml(args.config, cls))
    values.update({f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if getattr(args, f.name) is not None})
    cfg = cls(**values)
    check_fields(cfg)
    return cfg, args


# ------------------------------------------------------------------ running
def user_errors() -> tuple:
    """Exceptions that are the user's to fix: printed as one line, no traceback."""
    from mae_fast.errors import CheckpointError, UnreadableImageError

    errors = [ValueError, FileNotFoundError, NotADirectoryError, PermissionError, ImportError, MemoryError,
              NonFiniteLossError,
              CheckpointError, UnreadableImageError]
    import torch

    if hasattr(torch, "OutOfMemoryError"):  # torch >= 2.5; older releases raise a RuntimeError
        errors.append(torch.OutOfMemoryError)
    return tuple(errors)


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")


def run_main(prog: str, parse: Callable[[], Any], run: Callable[[Any], Any]) -> int:
    """Shared ``main()``: parse (ConfigError → exit 2), run (a user error → exit 1), print the result as
    strict JSON on rank 0; every error is one line ``<prog>: error: ...``."""
    from .distributed import shutdown_distributed

    setup_logging()
    try:
        cfg = parse()
    except ConfigError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    try:
        result = run(cfg)
        shutdown_distributed(finished=True)
    except ConfigError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except user_errors() as e:
        print(f"{prog}: error: {_one_line(e)}", file=sys.stderr)
        return 1
    finally:
        shutdown_distributed()
    if result is not None and int(os.environ.get("RANK", "0")) == 0:
        print(strict_json(result, indent=None))
    return 0


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    if type(e).__name__ == "OutOfMemoryError":
        text = "out of memory on the device: " + text.splitlines()[0][:300] + \
               " (try a smaller --batch-size, --grad-checkpointing 1 or --accum-iter)"
    return " ".join(text.split()) or type(e).__name__
