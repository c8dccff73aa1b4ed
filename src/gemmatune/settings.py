"""Settings: YAML files and command-line options -> TrainConfig / DataConfig.

Precedence: the dataclasses' defaults < the YAML file (`--config`) < options. Every source becomes a list of
`_Item`s (a dotted field path and a raw value), read by one converter that derives the known keys and their types
from the dataclasses' annotations; the options and their --help text come from the same fields (the meaning of
each is config.py's `setting(default, help)`), so a new config field is settable and documented everywhere
without touching this module.

Why not a library (tyro, jsonargparse, draccus, pydantic-settings were tried on these dataclasses): none reports a
YAML error at its file:line, none takes both `--resume` and `--resume false`, or `--lora.targets q,v` and
`--data.columns instruction=q`, and their errors are boxes or tracebacks rather than one message; what they would
replace (argparse option building, ~80 lines here) is the small part. See README.md, Dependencies.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
import re
import types
import typing
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import yaml

from gemmatune.config import PLAIN_TEMPLATE, DataConfig, TrainConfig
from gemmatune.errors import GemmatuneError

# Named values accepted for a field wherever it is set (YAML, flags, dotted overrides).
_NAMED = {"data.template": {"plain": PLAIN_TEMPLATE}}
_NAMES = {bool: "boolean", int: "integer", float: "number", str: "string"}
_BOOLS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}


class _Item(NamedTuple):
    path: str  # dotted field path, e.g. "lora.rank"
    value: Any  # YAML: the loaded value; command line: the list of tokens given after the flag
    name: str  # as the user wrote it: "lora.rank" in a file, "--lora-rank" on the command line
    where: str  # "file.yaml:12", "file.yaml", or "" on the command line
    text: bool  # from the command line: the value is text, parsed by the field's type

    @property
    def label(self) -> str:
        return f"{self.where}: {self.name}" if self.where else self.name


# ---------------------------------------------------------------------------------------------- the schema

def _fields(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)  # resolves config.py's string annotations
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


@functools.cache
def _leaves(cls: type, prefix: str = "") -> dict[str, Any]:
    """Every settable field of `cls`, nested sections flattened: dotted path -> type annotation."""
    out: dict[str, Any] = {}
    for name, tp in _fields(cls).items():
        if dataclasses.is_dataclass(tp):
            out.update(_leaves(tp, f"{prefix}{name}."))
        else:
            out[prefix + name] = tp
    return out


@functools.cache
def _free_text(cls: type, prefix: str = "") -> frozenset[str]:
    """The list fields whose command-line values are one item each, commas and all (config.setting(commas=False))."""
    out: set[str] = set()
    for f in dataclasses.fields(cls):
        tp = _fields(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            out |= _free_text(tp, f"{prefix}{f.name}.")
        elif not f.metadata.get("commas", True):
            out.add(prefix + f.name)
    return frozenset(out)


def _describe(tp: Any, text: bool) -> str:
    """The expected form of a value, as the user would write it (YAML or command line)."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_describe(a, text) for a in args if a is not type(None)) + " (or null)"
    if typing.get_origin(tp) is tuple:
        if args[1:] != (Ellipsis,):  # a fixed-length tuple, e.g. a (field, column) pair
            return "=".join(_NAMES[a].upper() for a in args) if text else f"[{', '.join(_NAMES[a] for a in args)}]"
        pairs = typing.get_origin(args[0]) is tuple
        inner = f"{_describe(args[0], text)} items" if pairs else f"{_NAMES[args[0]]}s"
        return f"comma-separated {inner}" if text else f"{'a mapping or ' * pairs}a list of {inner}"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[tp]


def _convert(value: Any, tp: Any, label: str, text: bool) -> Any:
    """One value to its field's type, or an error naming the key, the expected type and the value. YAML gives typed
    values; command-line text is parsed by the field's type first, so both pass the same checks."""

    given = value  # reported as the user wrote it, before any parsing below

    def bad() -> GemmatuneError:
        return GemmatuneError(f"{label}: expected {_describe(tp, text)}, got {given!r}.")

    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):  # only `X | None` is supported
        if value is None or (text and isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(value, inner, label, text)
    if origin is tuple:
        variadic = args[1:] == (Ellipsis,)
        if text and isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()] if variadic else value.split("=", len(args) - 1)
        if variadic and isinstance(value, Mapping) and typing.get_origin(args[0]) is tuple:
            value = list(value.items())  # `columns: {instruction: question}` for a tuple of pairs
        if not isinstance(value, (list, tuple)) or not variadic and len(value) != len(args):
            raise bad()
        kinds = [args[0]] * len(value) if variadic else args
        try:
            return tuple(_convert(v, t, label, text) for v, t in zip(value, kinds))
        except GemmatuneError:  # report the whole value against the field's type, not one element
            raise bad() from None
    if text and isinstance(value, str) and tp is not str:
        try:
            value = _BOOLS[value.lower()] if tp is bool else tp(value)
        except (KeyError, ValueError):
            pass  # left as text: the check below reports it
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)  # `epochs: 2`
    if tp in (bool, int, float, str):
        if type(value) is not tp:  # exact: a bool is not an int, 2.5 is not an int
            raise bad()
        return value
    raise TypeError(f"settings cannot read fields of type {tp!r} ({label}); teach _convert about it")


# ---------------------------------------------------------------------------------------------- resolution

def _unknown(item: _Item, schema: Mapping[str, Any]) -> GemmatuneError:
    """A YAML key that is no field (options are checked by argparse: see unknown_argument)."""
    sections = {p.rpartition(".")[0] for p in schema} - {""}
    match = difflib.get_close_matches(item.path, [*schema, *sections], n=1)
    if match:
        hint = f"did you mean {match[0]}?"
    else:
        parent = item.path.rpartition(".")[0]
        known = [p for p in schema if p.rpartition(".")[0] == parent] or list(schema)
        hint = f"known: {', '.join(known)}."
    return GemmatuneError(f"{item.label}: unknown key; {hint}")


def _tokens(item: _Item, tp: Any, commas: bool) -> Any:
    """Command-line tokens -> one value: a tuple field takes any number (each may hold several items separated by
    commas, unless the items are free text), a boolean may stand alone (`--lora.rslora` means true), any other
    field exactly one."""
    tokens = item.value
    if typing.get_origin(tp) is tuple:  # no tokens: the empty tuple (`--data.val_paths` clears the file's list)
        return ",".join(tokens) if commas else tokens
    if len(tokens) == 1:
        return tokens[0]
    if not tokens and tp is bool:
        return True
    raise GemmatuneError(f"{item.label}: expected one value ({_describe(tp, True)}), got {len(tokens)}.")


def _apply(obj: Any, changes: Mapping[str, Any]) -> Any:
    """`obj` with nested changes; sections not mentioned keep their value from `obj`."""
    return dataclasses.replace(obj, **{k: _apply(getattr(obj, k), v) if isinstance(v, dict) else v
                                       for k, v in changes.items()})


def _resolve(base: Any, items: Iterable[_Item], source: str = "", prefix: str = "") -> Any:
    """Apply the items, in order (later ones win), to `base`, a config whose fields are at `prefix` in the
    item paths. The dataclasses validate the result once, after every source is in."""
    schema = {prefix + p: tp for p, tp in _leaves(type(base)).items()}
    free_text = {prefix + p for p in _free_text(type(base))}
    changes: dict[str, Any] = {}
    setters: dict[str, _Item] = {}
    for item in items:
        if item.path not in schema:
            raise _unknown(item, schema)
        tp = schema[item.path]
        value = _tokens(item, tp, item.path not in free_text) if item.text else item.value
        if isinstance(value, str):
            value = _NAMED.get(item.path, {}).get(value, value)
        *parents, leaf = item.path.removeprefix(prefix).split(".")
        functools.reduce(lambda node, key: node.setdefault(key, {}), parents, changes)[leaf] = \
            _convert(value, tp, item.label, item.text)
        setters[item.path] = item
    try:
        return _apply(base, changes)
    except GemmatuneError as e:
        # The dataclasses' messages start with the field's path: point at the line or flag that set it.
        setter = setters.get(str(e).partition(":")[0])
        where = (setter.where or setter.name) if setter else source
        raise GemmatuneError(f"{where}: {e}" if where else str(e)) from None


# ---------------------------------------------------------------------------------------------- YAML

class _MarkedDict(dict):
    """A YAML mapping that remembers the line of each key, for error messages."""

    lines: dict[Any, int]


class _Loader(yaml.SafeLoader):
    pass


def _construct_mapping(loader: _Loader, node: yaml.MappingNode) -> Iterator[_MarkedDict]:
    data = _MarkedDict()
    yield data  # yielded first, as SafeLoader does, so recursive structures work
    own = [k for k, _ in node.value if k.tag != "tag:yaml.org,2002:merge"]  # before `<<:` merges flatten in
    data.update(loader.construct_mapping(node))
    data.lines = {}
    for key_node in own:
        key = loader.construct_object(key_node)
        if key in data.lines:  # plain YAML keeps the last silently; a twice-set setting is a mistake
            raise yaml.constructor.ConstructorError(None, None, f"{key!r} appears twice", key_node.start_mark)
        data.lines[key] = key_node.start_mark.line + 1


class _Dumper(yaml.SafeDumper):
    pass


_Loader.add_constructor("tag:yaml.org,2002:map", _construct_mapping)
# YAML 1.1 reads `1e-4` (no dot, or no exponent sign) as a string; every learning rate is written like that. The
# dumper knows it too, so it quotes a string such as "1e5" that load_yaml would otherwise read back as a number.
for _cls in (_Loader, _Dumper):
    _cls.add_implicit_resolver("tag:yaml.org,2002:float",
                               re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))


def load_yaml(path: str | Path) -> dict[str, Any]:
    """A settings file as a mapping (empty for an empty file); its mappings remember their keys' lines."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise GemmatuneError(f"{p}: no such file. Pass --config a YAML settings file, or leave it out to use "
                             "the defaults.") from None
    except UnicodeDecodeError:
        raise GemmatuneError(f"{p}: not UTF-8 text; save the settings file as UTF-8.") from None
    try:
        d = yaml.load(text, Loader=_Loader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        context = f"{e.context} on line {e.context_mark.line + 1}, " if e.context and e.context_mark else ""
        raise GemmatuneError(f"{p}:{mark.line + 1}: not valid YAML: {context}{e.problem}. Fix the file there.") \
            from None
    if d is None:
        return {}
    if not isinstance(d, dict):
        raise GemmatuneError(f"{p}: expected `key: value` lines (a mapping), got a {type(d).__name__}.")
    return d


def _yaml_items(d: Mapping[str, Any], cls: type, source: str, prefix: str = "") -> Iterator[_Item]:
    fields = _fields(cls)
    lines = getattr(d, "lines", {})
    for key, value in d.items():
        path, line = f"{prefix}{key}", lines.get(key)
        where = f"{source}:{line}" if source and line else source
        section = fields.get(key)
        if not dataclasses.is_dataclass(section):
            yield _Item(path, value, path, where, False)
        elif isinstance(value, Mapping):
            yield from _yaml_items(value, section, source, path + ".")
        elif value is not None:  # `lora:` with every key commented out is an empty section
            raise GemmatuneError(f"{where}: {path}: expected a section (indented `key: value` lines), "
                                 f"got {value!r}.")


def config_from_dict(d: Mapping[str, Any], source: str = "") -> TrainConfig:
    """A nested mapping (sections `data:` and `lora:`, every other key a TrainConfig field) -> TrainConfig.
    `source` (the file) prefixes every error."""
    return _resolve(TrainConfig(), _yaml_items(d, TrainConfig, source), source)


def to_dict(cfg: Any) -> dict[str, Any]:
    """A config as plain YAML-ready values: nested sections, tuples as lists."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        return [plain(x) for x in v] if isinstance(v, tuple) else v

    return plain(cfg)


def dump_yaml(cfg: Any) -> str:
    """The resolved settings as YAML, in field order; `config_from_dict` of it (read by load_yaml or
    yaml.safe_load) gives `cfg` back."""
    # Not allow_unicode: PyYAML would write characters such as U+0085 raw, and read them back as line breaks.
    return yaml.dump(to_dict(cfg), Dumper=_Dumper, sort_keys=False)


# ---------------------------------------------------------------------------------------------- command line
# Every setting is an option, built from the dataclasses: `--lora.rank` (the YAML path, words joined by `-`) and
# `--lora-rank` are shown by --help with the field's meaning (config.py's `setting(default, help)`) and default;
# `_` for `-` is accepted too (`--weight_decay`, `--data.max_seq_len`, the spelling of the YAML keys). Each option
# records its tokens in command-line order and `_resolve` reads them with the field's type, as it reads YAML.

# Short names of the common data settings, shared by `train` and `data inspect`.
_SHORT = {"data.paths": ("--data",), "data.val_paths": ("--val-data",), "data.val_fraction": ("--val-fraction",),
          "data.format": ("--format",), "data.columns": ("--columns",), "data.template": ("--template",),
          "data.train_on": ("--train-on",), "data.max_seq_len": ("--seq-len", "--max-seq-len"),
          "data.overflow": ("--overflow",), "data.packing": ("--packing",), "data.skip_bad_rows": ("--skip-bad-rows",)}
_GIVEN = "settings_given"  # the namespace attribute holding the `_Item`s of the options given, in order


def _spellings(path: str) -> tuple[str, ...]:
    """The option names of a field: the ones --help shows (hyphens), then the same with underscores."""
    dotted = "--" + path.replace("_", "-")
    shown = [*_SHORT.get(path, ()), dotted, dotted.replace(".", "-")]
    hidden = ["--" + name[2:].replace("-", "_") for name in shown]
    return tuple(dict.fromkeys(shown + hidden))  # unique, in order


def _metavar(tp: Any, commas: bool = True) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        (tp,) = [a for a in args if a is not type(None)]
        return _metavar(tp)
    if origin is tuple:
        item = "KEY=VALUE" if typing.get_origin(args[0]) is tuple else _metavar(args[0])
        return f"{item},..." if commas else f"{item} ..."
    return {bool: "[BOOL]", int: "INT", float: "FLOAT", str: "TEXT"}[tp]


def _shown(value: Any) -> str:
    """A default as it would be typed on the command line."""
    if isinstance(value, tuple):
        return ",".join("=".join(v) if isinstance(v, tuple) else v for v in value) or "none"
    if isinstance(value, bool) or value is None:
        return str(value).lower()
    return str(value) if value != "" else '""'


class _Set(argparse.Action):
    """One settings option: appends its tokens (any number, checked by `_tokens`) to the namespace's list."""

    def __init__(self, *args: Any, path: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.path = path  # the field it sets

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        given = [*getattr(namespace, _GIVEN, []), _Item(self.path, list(values), option_string or "", "", True)]
        setattr(namespace, _GIVEN, given)


class _HelpFormatter(argparse.HelpFormatter):
    """Lists the hyphenated spellings only, and one metavar for any number of tokens."""

    def _format_action_invocation(self, action: argparse.Action) -> str:
        if not isinstance(action, _Set):
            return super()._format_action_invocation(action)
        return f"{', '.join(s for s in action.option_strings if '_' not in s)} {action.metavar}"

    def _format_args(self, action: argparse.Action, default_metavar: str) -> str:
        return action.metavar if isinstance(action, _Set) else super()._format_args(action, default_metavar)


def _add_options(parser: argparse.ArgumentParser, cls: type, prefix: str, title: str, about: str = "") -> None:
    """One option per field of `cls` (at `prefix` in the field paths) in a help group; a help group per section."""
    group = parser.add_argument_group(title, about or None)
    defaults, hints = cls(), _fields(cls)
    sections = []
    for f in dataclasses.fields(cls):
        path, tp = prefix + f.name, hints[f.name]
        if dataclasses.is_dataclass(tp):
            sections.append((tp, path, f.metadata["help"]))
            continue
        if "help" not in f.metadata:
            raise TypeError(f"{path}: declare the field with config.setting(default, help) so --help explains it")
        group.add_argument(*_spellings(path), action=_Set, path=path, nargs="*", dest=_GIVEN,
                           default=argparse.SUPPRESS, metavar=_metavar(tp, f.metadata.get("commas", True)),
                           help=f"{f.metadata['help']} (default: {_shown(getattr(defaults, f.name))})"
                                .replace("%", "%%"))
    for tp, path, about in sections:
        _add_options(parser, tp, path + ".", f"{path} settings (YAML section {path.rpartition('.')[2]}:)", about)


def _prepare(parser: argparse.ArgumentParser, usage: str) -> None:
    # An abbreviation must not silently set another setting (`--lora.r` for --lora.rank); the usage line would
    # otherwise list every option.
    parser.allow_abbrev = False
    parser.formatter_class = _HelpFormatter
    parser.usage = usage


def given(args: argparse.Namespace, path: str) -> bool:
    """Whether the command line set the field at `path` (e.g. "data.paths")."""
    return any(item.path == path for item in getattr(args, _GIVEN, []))


def unknown_argument(parser: argparse.ArgumentParser, extra: Sequence[str]) -> GemmatuneError:
    """The error for the first of `extra` (what parse_known_args did not know), suggesting the closest option in
    the spelling --help shows."""
    arg = extra[0]
    name = arg.partition("=")[0]
    if not name.startswith("-") or name in ("-", "--"):
        return GemmatuneError(f"{arg!r}: unexpected argument; options are given as --name VALUE (see "
                              f"{parser.prog} --help).")
    shown = {s.lstrip("-"): s for a in parser._actions  # argparse keeps no public list of a parser's options
             for s in a.option_strings if "_" not in s and a.help != argparse.SUPPRESS}
    match = difflib.get_close_matches(name.lstrip("-").replace("_", "-"), list(shown), n=1)
    hint = f"did you mean {shown[match[0]]}?" if match else f"see {parser.prog} --help for the options."
    return GemmatuneError(f"{name}: unknown option; {hint}")


def add_train_args(parser: argparse.ArgumentParser) -> None:
    """`gemmatune train`: --config FILE and an option for every TrainConfig field."""
    _prepare(parser, "%(prog)s [--config FILE] [--SETTING VALUE ...]")
    parser.add_argument("--config", metavar="FILE", default=None,
                        help="YAML settings (sections data: and lora:, every other key a training setting); options "
                             "override them")
    _add_options(parser, TrainConfig, "", "training settings")


def train_config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Defaults < the YAML file (--config) < the options, in the order given."""
    path = args.config
    items = list(_yaml_items(load_yaml(path), TrainConfig, str(path))) if path else []
    return _resolve(TrainConfig(), [*items, *getattr(args, _GIVEN, [])], str(path or ""))


def add_data_args(parser: argparse.ArgumentParser) -> None:
    """The data options (for `data inspect`), the same as `train` has; --data is required."""
    _prepare(parser, "%(prog)s --data PATH [--SETTING VALUE ...]")
    _add_options(parser, DataConfig, "data.", "data settings")


def data_config_from_args(args: argparse.Namespace) -> DataConfig:
    if not given(args, "data.paths"):
        raise GemmatuneError("--data is required: the files (or Hub dataset) to read.")
    return _resolve(DataConfig(), getattr(args, _GIVEN, []), prefix="data.")
