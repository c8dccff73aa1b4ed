"""Settings: YAML files and command-line flags -> TrainConfig / DataConfig.

Precedence: the dataclasses' defaults < the YAML file (`--config`) < flags and dotted overrides. Every source
becomes a list of `_Item`s (a dotted field path and a raw value), read by one converter that derives the known
keys and their types from the dataclasses' annotations, so a new config field is settable everywhere without
touching this module.
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

from gemmatune.config import FORMATS, PLAIN_TEMPLATE, DataConfig, TrainConfig
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
    sections = {p.rpartition(".")[0] for p in schema} - {""}
    match = difflib.get_close_matches(item.path, [*schema, *sections], n=1)
    show = (lambda p: f"--{p}") if item.text else (lambda p: p)
    if match:
        hint = f"did you mean {show(match[0])}?"
    else:
        parent = item.path.rpartition(".")[0]
        known = [p for p in schema if p.rpartition(".")[0] == parent] or list(schema)
        hint = f"known: {', '.join(map(show, known))}."
    return GemmatuneError(f"{item.label}: unknown {'option' if item.text else 'key'}; {hint}")


def _tokens(item: _Item, tp: Any) -> Any:
    """Command-line tokens -> one value: a tuple field takes any number (each may hold commas), a boolean may
    stand alone (`--lora.rslora` means true), any other field exactly one."""
    tokens = item.value
    if len(tokens) == 1:
        return tokens[0]
    if not tokens and tp is bool:
        return True
    if typing.get_origin(tp) is tuple:  # no tokens: the empty tuple (`--data.val_paths` clears the file's list)
        return ",".join(tokens)
    raise GemmatuneError(f"{item.label}: expected one value ({_describe(tp, True)}), got {len(tokens)}.")


def _apply(obj: Any, changes: Mapping[str, Any]) -> Any:
    """`obj` with nested changes; sections not mentioned keep their value from `obj`."""
    return dataclasses.replace(obj, **{k: _apply(getattr(obj, k), v) if isinstance(v, dict) else v
                                       for k, v in changes.items()})


def _resolve(base: Any, items: Iterable[_Item], source: str = "", prefix: str = "") -> Any:
    """Apply the items, in order (later ones win), to `base`, a config whose fields are at `prefix` in the
    item paths. The dataclasses validate the result once, after every source is in."""
    schema = {prefix + p: tp for p, tp in _leaves(type(base)).items()}
    changes: dict[str, Any] = {}
    setters: dict[str, _Item] = {}
    for item in items:
        if item.path not in schema:
            raise _unknown(item, schema)
        tp = schema[item.path]
        value = _tokens(item, tp) if item.text else item.value
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

class _Flag(NamedTuple):
    names: tuple[str, ...]
    path: str  # the field it sets; also the argparse dest
    help: str
    metavar: str | None = None


# The data options, shared by `train` and `data inspect`.
_DATA_FLAGS = (
    _Flag(("--data",), "data.paths", "JSONL/JSON/CSV/TSV/Parquet files, globs, a datasets save_to_disk directory "
                                     "or a Hub name", "PATH"),
    _Flag(("--val-data",), "data.val_paths", "validation files (else --val-fraction)", "PATH"),
    _Flag(("--val-fraction",), "data.val_fraction", "hold out this fraction of --data for validation"),
    _Flag(("--format",), "data.format", f"{', '.join(FORMATS)}; auto detects it from the columns"),
    _Flag(("--columns",), "data.columns", "instruction columns, e.g. instruction=question,input=context,"
                                          "response=answer", "FIELD=COLUMN"),
    _Flag(("--template",), "data.template", "instruction rows: 'chat' (Gemma chat template), 'plain' "
                                            "(Instruction:/Response:) or a template with {instruction} and {response}"),
    _Flag(("--train-on",), "data.train_on", "model: only model turns (with <end_of_turn>) and the final <eos>; "
                                            "all: every token"),
    _Flag(("--seq-len", "--max-seq-len"), "data.max_seq_len", "positions per packed row"),
    _Flag(("--overflow",), "data.overflow", "too-long examples: truncate (keep their start) or drop"),
    _Flag(("--packing",), "data.packing", "pack (several examples per row) or pad (one per row)"),
    _Flag(("--skip-bad-rows",), "data.skip_bad_rows", "skip and count bad rows instead of stopping at the first"),
)

_TRAIN_FLAGS = (
    _Flag(("--model",), "model", "Gemma 2 checkpoint directory in Hugging Face layout"),
    _Flag(("--output",), "output", "run directory (checkpoints, logs, adapters)"),
    _Flag(("--max-steps",), "max_steps", "optimizer steps; 0 runs --epochs epochs"),
    _Flag(("--epochs",), "epochs", "passes over the data when --max-steps is 0"),
    _Flag(("--batch-size",), "batch_size", "packed rows per micro-batch"),
    _Flag(("--grad-accum",), "grad_accum", "micro-batches per optimizer step"),
    _Flag(("--lr",), "lr", "peak learning rate"),
    _Flag(("--lora-rank",), "lora.rank", "adapter rank"),
    _Flag(("--lora-alpha",), "lora.alpha", "adapter scale is alpha / rank"),
    _Flag(("--dtype",), "dtype", "base weights and compute: bfloat16 or float32"),
    _Flag(("--save-every",), "save_every", "steps between checkpoints; 0: only at the end"),
    _Flag(("--log-every",), "log_every", "steps between log lines"),
    _Flag(("--eval-every",), "eval_every", "steps between evaluations; 0: only at the end"),
    _Flag(("--resume",), "resume", "continue from the latest checkpoint in --output"),
    _Flag(("--overwrite",), "overwrite", "replace an output directory that holds another run"),
    _Flag(("--seed",), "seed", "random seed (the data order has its own: --data.seed)"),
    _Flag(("--mesh",), "mesh", "device mesh, e.g. data=2,model=4 (axes data, fsdp, model); default: model "
                               "parallel within a host, data parallel across hosts", "AXIS=N,..."),
    _Flag(("--distributed",), "distributed", "several processes: find the cluster (TPU pod slice, SLURM, Open MPI, "
                                             "Kubernetes) in the environment"),
    _Flag(("--coordinator-address",), "coordinator_address", "several processes: process 0's HOST:PORT", "HOST:PORT"),
    _Flag(("--num-processes",), "num_processes", "several processes: how many"),
    _Flag(("--process-id",), "process_id", "several processes: this one's index, 0 to --num-processes - 1"),
) + _DATA_FLAGS


def _add_flags(parser: argparse.ArgumentParser, flags: Sequence[_Flag], title: str, required: str = "") -> None:
    group = parser.add_argument_group(title, "Any setting can also be given as a dotted override, e.g. --lora.rank "
                                             "16 --weight-decay 0.01 --lora.targets q,v --data.shuffle_buffer 512.")
    defaults = TrainConfig()
    for f in flags:
        tp = _leaves(TrainConfig)[f.path]
        default = to_dict(functools.reduce(getattr, f.path.split("."), defaults))
        shown = f" (default: {','.join(map(str, default)) if isinstance(default, list) else default})"
        # Flags default to SUPPRESS: a flag the user did not give is absent and leaves the YAML's value alone.
        kwargs: dict[str, Any] = dict(dest=f.path, default=argparse.SUPPRESS, required=f.path == required,
                                      help=(f.help + shown * (tp is not bool and default != [])).replace("%", "%%"))
        if tp is bool:
            # Alone it means true, like store_true; it also takes a value, so `--resume false` can undo a file's
            # `resume: true` (argparse would otherwise reject the `--resume=false` dotted form).
            kwargs.update(nargs="?", const="true", metavar="BOOL")
        else:
            kwargs.update(nargs="+" if typing.get_origin(tp) is tuple else None,
                          metavar=f.metavar or f.names[0][2:].upper().replace("-", "_"))
        group.add_argument(*f.names, **kwargs)


def _cli_items(args: argparse.Namespace, flags: Sequence[_Flag], extra: Sequence[str]) -> list[_Item]:
    """The flags the user gave, then the dotted overrides (the arguments argparse did not know) in order."""
    items = [_Item(f.path, v if isinstance(v, list) else [v], f.names[0], "", True)
             for f in flags if (v := getattr(args, f.path, None)) is not None]
    i = 0
    while i < len(extra):
        arg = extra[i]
        if not arg.startswith("--") or arg == "--":
            raise GemmatuneError(f"{arg!r}: unexpected argument; settings are given as --name VALUE "
                                 "(e.g. --lora.rank 16).")
        name, eq, value = arg.partition("=")
        i += 1
        start = i
        while not eq and i < len(extra) and not extra[i].startswith("--"):
            i += 1
        # `--weight-decay` and `--weight_decay` both name weight_decay
        items.append(_Item(name[2:].replace("-", "_"), [value] if eq else list(extra[start:i]), name, "", True))
    return items


def add_train_args(parser: argparse.ArgumentParser) -> None:
    """`gemmatune train`: --config FILE, flags for the common settings; parse with parse_known_args and pass the
    unknown arguments (dotted overrides) to train_config_from_args."""
    parser.add_argument("--config", metavar="FILE", default=None, help="YAML settings; flags override them")
    _add_flags(parser, _TRAIN_FLAGS, "settings")


def train_config_from_args(args: argparse.Namespace, extra: Sequence[str] = ()) -> TrainConfig:
    path = args.config
    items = list(_yaml_items(load_yaml(path), TrainConfig, str(path))) if path else []
    return _resolve(TrainConfig(), [*items, *_cli_items(args, _TRAIN_FLAGS, extra)], str(path or ""))


def add_data_args(parser: argparse.ArgumentParser) -> None:
    """The data options (for `data inspect`), the same flags as `train` has; --data is required."""
    _add_flags(parser, _DATA_FLAGS, "data", required="data.paths")


def data_config_from_args(args: argparse.Namespace, extra: Sequence[str] = ()) -> DataConfig:
    return _resolve(DataConfig(), _cli_items(args, _DATA_FLAGS, extra), prefix="data.")
