"""Settings from YAML and the command line: nesting, precedence, type checks, error messages, round trips."""

from __future__ import annotations

import argparse
import dataclasses
import textwrap
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from gemmatune.config import (
    LORA_TARGETS,
    PLAIN_TEMPLATE,
    DataConfig,
    LoraConfig,
    TrainConfig,
)
from gemmatune.errors import GemmatuneError
from gemmatune.settings import (
    add_data_args,
    add_train_args,
    config_from_dict,
    data_config_from_args,
    dump_yaml,
    load_yaml,
    to_dict,
    train_config_from_args,
    unknown_argument,
)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def from_file(path: Path) -> TrainConfig:
    return config_from_dict(load_yaml(path), str(path))


def parse(add, argv) -> argparse.Namespace:
    """As cli.main parses: unknown options are one GemmatuneError."""
    parser = argparse.ArgumentParser()
    add(parser)
    args, extra = parser.parse_known_args(argv)
    if extra:
        raise unknown_argument(parser, extra)
    return args


def train(*argv: str) -> TrainConfig:
    return train_config_from_args(parse(add_train_args, argv))


def inspect(*argv: str) -> DataConfig:
    return data_config_from_args(parse(add_data_args, argv))


def error(fn, *args) -> str:
    with pytest.raises(GemmatuneError) as e:
        fn(*args)
    return str(e.value)


# ---------------------------------------------------------------------------------------------- YAML

def test_yaml_with_sections(tmp_path):
    path = write(tmp_path, """\
        lr: 1e-4            # YAML 1.1 would read this as a string
        epochs: 2           # an int for a float field
        eval_prompts: [hi, "what is 2+2?"]
        data:
          paths: [a.jsonl, b.jsonl]
          columns: {instruction: question, response: answer}
          template: plain
          skip_bad_rows: true
        lora:
          rank: 16
          targets: [q, v]
        """)
    cfg = from_file(path)
    assert cfg == TrainConfig(
        lr=1e-4, epochs=2.0, eval_prompts=("hi", "what is 2+2?"), lora=LoraConfig(rank=16, targets=("q", "v")),
        data=DataConfig(paths=("a.jsonl", "b.jsonl"), template=PLAIN_TEMPLATE, skip_bad_rows=True,
                        columns=(("instruction", "question"), ("response", "answer"))))
    assert type(cfg.epochs) is float
    # columns as a list of pairs is the same; an empty section is no change
    path = write(tmp_path, "data:\n  columns: [[instruction, question]]\nlora:\n")
    assert from_file(path).data.columns == (("instruction", "question"),)
    assert from_file(path).lora == LoraConfig()
    assert from_file(write(tmp_path, "")) == TrainConfig()


@pytest.mark.parametrize("text, want", [
    ("lr: 1e-4\nlora:\n  rnak: 3\n", ["run.yaml:3", "lora.rnak", "did you mean lora.rank?"]),
    ("batchsize: 4\n", ["run.yaml:1", "batchsize", "did you mean batch_size?"]),
    ("seed: 1\nrank: 4\n", ["run.yaml:2", "rank: unknown key", "did you mean lora.rank?"]),
    ("data:\n  paths: [a]\n  max_seq_length: 8\n", ["run.yaml:3", "data.max_seq_length", "data.max_seq_len"]),
    ("lorra:\n  rank: 4\n", ["run.yaml:1", "lorra", "did you mean lora?"]),
    ("zzzzzz: 1\n", ["run.yaml:1", "zzzzzz", "known: model, output"]),
])
def test_unknown_keys(tmp_path, text, want):
    msg = error(from_file, write(tmp_path, text))
    assert all(w in msg for w in want), msg


@pytest.mark.parametrize("text, want", [
    ('lr: "fast"', "lr: expected a number, got 'fast'"),
    ("batch_size: 2.5", "batch_size: expected an integer, got 2.5"),
    ("batch_size: true", "batch_size: expected an integer, got True"),
    ("resume: 'yes'", "resume: expected true or false, got 'yes'"),
    ("model: 3", "model: expected a string, got 3"),
    ("lora:\n  targets: q", "lora.targets: expected a list of strings, got 'q'"),
    ("lora:\n  targets: [q, 1]", "lora.targets: expected a list of strings, got ['q', 1]"),
    ("data:\n  columns: instruction", "data.columns: expected a mapping or a list of [string, string] items"),
    ("data:\n  columns: [[instruction]]", "data.columns: expected a mapping or a list of [string, string] items"),
    ("lora: 8", "lora: expected a section"),
])
def test_wrong_types(tmp_path, text, want):
    msg = error(from_file, write(tmp_path, text))
    assert want in msg and str(tmp_path / "run.yaml") in msg, msg


def test_dataclass_errors_name_the_file_and_line(tmp_path):
    msg = error(from_file, write(tmp_path, "lr: 0.1\nlora:\n  rank: 0\n"))
    assert msg.startswith(f"{tmp_path / 'run.yaml'}:3: lora.rank: 0 is not valid"), msg
    msg = error(config_from_dict, {"data": {"format": "xml"}}, "base.yaml")
    assert msg.startswith("base.yaml: data.format: 'xml' is not valid"), msg


@pytest.mark.parametrize("text, want", [
    ("lr: 0.1\nlora:\n  rank: [8\n", ["run.yaml:4", "not valid YAML", "flow sequence on line 3"]),
    ("lr: 0.1\n  batch_size: 2\n", ["run.yaml:2", "not valid YAML"]),
    ("lr: 0.1\nseed: 1\nlr: 0.2\n", ["run.yaml:3", "'lr' appears twice"]),
    ("- lr\n", ["run.yaml", "expected `key: value` lines"]),
])
def test_invalid_yaml(tmp_path, text, want):
    msg = error(load_yaml, write(tmp_path, text))
    assert all(w in msg for w in want), msg
    assert "no such file" in error(load_yaml, tmp_path / "missing.yaml")


def test_yaml_merge_keys_are_not_duplicates(tmp_path):
    text = "base: &b {rank: 4, alpha: 8}\n"
    d = load_yaml(write(tmp_path, text + "lora:\n  <<: *b\n  rank: 16\n"))
    assert d["lora"] == {"rank": 16, "alpha": 8}


# ---------------------------------------------------------------------------------------------- dump and reload

def test_dump_is_nested_yaml_with_lists(tmp_path):
    cfg = TrainConfig(lora=LoraConfig(targets=("q", "v")), data=DataConfig(columns=(("instruction", "q"),)))
    d = yaml.safe_load(dump_yaml(cfg))
    assert d["lora"]["targets"] == ["q", "v"] and d["data"]["columns"] == [["instruction", "q"]]
    assert d == to_dict(cfg) and list(d)[:3] == ["model", "output", "data"]
    path = tmp_path / "resolved.yaml"
    for tricky in ["1e5", "0e0", "yes", "null", "\x85", "\u2028", "你好"]:  # number-like, or line breaks to PyYAML
        cfg = dataclasses.replace(cfg, output=tricky, eval_prompts=(tricky,))
        path.write_text(dump_yaml(cfg), encoding="utf-8")
        assert from_file(path) == cfg and config_from_dict(yaml.safe_load(dump_yaml(cfg))) == cfg


@settings(max_examples=60, deadline=None)
@given(lr=st.floats(1e-9, 10.0), epochs=st.floats(0.01, 100.0), batch_size=st.integers(1, 4096),
       rslora=st.booleans(), alpha=st.floats(-1e6, 1e6),
       targets=st.lists(st.sampled_from(LORA_TARGETS), min_size=1, unique=True),
       prompts=st.lists(st.text(), max_size=3), paths=st.lists(st.text(min_size=1), max_size=3),
       columns=st.lists(st.tuples(st.sampled_from(["instruction", "input", "response"]), st.text()), max_size=3),
       template=st.sampled_from(["chat", PLAIN_TEMPLATE, "Q: {instruction}\nA: {response}"]),
       output=st.text())
def test_round_trip(tmp_path_factory, lr, epochs, batch_size, rslora, alpha, targets, prompts, paths, columns,
                    template, output):
    cfg = TrainConfig(lr=lr, epochs=epochs, batch_size=batch_size, eval_prompts=tuple(prompts), output=output,
                      lora=LoraConfig(alpha=alpha, targets=tuple(targets), rslora=rslora),
                      data=DataConfig(paths=tuple(paths), columns=tuple(columns), template=template))
    assert config_from_dict(yaml.safe_load(dump_yaml(cfg))) == cfg
    path = tmp_path_factory.getbasetemp() / "round_trip.yaml"
    path.write_text(dump_yaml(cfg), encoding="utf-8")
    assert from_file(path) == cfg


# ---------------------------------------------------------------------------------------------- command line

def test_no_config_means_defaults():
    assert train() == TrainConfig()


def test_precedence(tmp_path):
    path = write(tmp_path, """\
        lr: 0.001
        batch_size: 4
        resume: true
        data:
          paths: [file.jsonl]
          max_seq_len: 256
        lora:
          rank: 4
          targets: [q, v]
        """)
    cfg = train("--config", str(path), "--lr", "0.01", "--lora.rank", "32")
    assert (cfg.lr, cfg.lora.rank) == (0.01, 32)  # the command line beats the file
    # flags not given leave the file's values, which beat the defaults
    assert (cfg.batch_size, cfg.resume, cfg.data.paths, cfg.data.max_seq_len, cfg.lora.targets) == \
        (4, True, ("file.jsonl",), 256, ("q", "v"))
    assert (cfg.grad_accum, cfg.lora.alpha, cfg.data.format) == (1, 16.0, "auto")  # neither: the defaults
    cfg = train("--config", str(path), "--resume", "false", "--data.paths", "x.jsonl", "y.jsonl", "--seq-len", "64")
    assert (cfg.resume, cfg.data.paths, cfg.data.max_seq_len) == (False, ("x.jsonl", "y.jsonl"), 64)
    assert "lora.targets" in error(train, "--config", str(path), "--lora.targets")  # emptied, so invalid


def test_flat_flags():
    cfg = train("--model", "ckpt", "--data", "a.jsonl", "b.jsonl", "--val-data", "v.jsonl", "--output", "out",
                "--max-steps", "100", "--epochs", "3", "--seq-len", "512", "--batch-size", "2", "--grad-accum", "4",
                "--lr", "1e-5", "--lora-rank", "4", "--lora-alpha", "8", "--dtype", "float32",
                "--save-every", "50", "--log-every", "5", "--eval-every", "25", "--resume", "--overwrite",
                "--seed", "7", "--format", "instruction", "--columns", "instruction=q,response=a",
                "--template", "plain", "--train-on", "all", "--overflow", "drop", "--packing", "pad",
                "--skip-bad-rows", "--val-fraction", "0.1")
    data = DataConfig(paths=("a.jsonl", "b.jsonl"), val_paths=("v.jsonl",), max_seq_len=512, format="instruction",
                      columns=(("instruction", "q"), ("response", "a")), template=PLAIN_TEMPLATE, train_on="all",
                      overflow="drop", packing="pad", skip_bad_rows=True, val_fraction=0.1)
    assert cfg == TrainConfig(model="ckpt", output="out", max_steps=100, epochs=3.0, batch_size=2, grad_accum=4,
                              lr=1e-5, lora=LoraConfig(rank=4, alpha=8.0), dtype="float32", save_every=50,
                              log_every=5, eval_every=25, resume=True, overwrite=True, seed=7, data=data)


@pytest.mark.parametrize("argv, field, want", [
    (["--lora.rank", "16"], "lora.rank", 16),
    (["--data.max_seq_len", "512"], "data.max_seq_len", 512),
    (["--data.max-seq-len=128"], "data.max_seq_len", 128),
    (["--weight_decay", "0.01"], "weight_decay", 0.01),
    (["--weight-decay=0.01"], "weight_decay", 0.01),
    (["--warmup_steps", "10"], "warmup_steps", 10),
    (["--adam-eps", "1e-6"], "adam_eps", 1e-6),
    (["--lora.rslora", "true"], "lora.rslora", True),
    (["--lora.rslora"], "lora.rslora", True),
    (["--lora.rslora=yes"], "lora.rslora", True),
    (["--lora.rslora", "1"], "lora.rslora", True),
    (["--overwrite=no"], "overwrite", False),
    (["--resume", "0"], "resume", False),
    (["--schedule", "linear"], "schedule", "linear"),
    (["--data.template", "plain"], "data.template", PLAIN_TEMPLATE),
    (["--lora.targets", "q,v"], "lora.targets", ("q", "v")),
    (["--lora.targets", "q", "k,v"], "lora.targets", ("q", "k", "v")),
    (["--lora.targets=gate, up"], "lora.targets", ("gate", "up")),
    (["--lora-targets", "q,v"], "lora.targets", ("q", "v")),  # --section-key as well as --section.key
    (["--lora_rank", "3"], "lora.rank", 3),
    (["--data-max-seq-len", "7"], "data.max_seq_len", 7),
    (["--data.skip-bad-rows"], "data.skip_bad_rows", True),
    (["--eval-prompts", "hi", "there"], "eval_prompts", ("hi", "there")),
    (["--eval-prompts", "Hi, who are you?"], "eval_prompts", ("Hi, who are you?",)),  # prompts keep their commas
    (["--eval_prompts=a,b"], "eval_prompts", ("a,b",)),
    (["--lora.alpha", "-4"], "lora.alpha", -4.0),
    (["--data.columns", "instruction=q,input=c=d"], "data.columns", (("instruction", "q"), ("input", "c=d"))),
    (["--data.val_paths="], "data.val_paths", ()),
    (["--lr", "0.5", "--lr", "0.25"], "lr", 0.25),  # the last one wins
    (["--lora-rank", "4", "--lora.rank", "6"], "lora.rank", 6),
    (["--lora.rank", "6", "--lora_rank", "4"], "lora.rank", 4),  # in command-line order, whatever the spelling
])
def test_dotted_overrides(argv, field, want):
    got = train(*argv)
    for part in field.split("."):
        got = getattr(got, part)
    assert got == want and type(got) is type(want)


def leaves(obj, prefix=""):
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        yield from leaves(v, f"{prefix}{f.name}.") if dataclasses.is_dataclass(v) else [(prefix + f.name, v)]


@pytest.mark.parametrize("spell", [
    lambda path: path,  # the YAML spelling: --lora.rank, --data.max_seq_len
    lambda path: path.replace("_", "-"),  # as --help shows it: --data.max-seq-len
    lambda path: path.replace("_", "-").replace(".", "-"),  # --data-max-seq-len
])
def test_every_field_is_an_option(spell):
    """Each leaf field of TrainConfig, written as text under each spelling, comes back as itself: the options are
    the dataclasses' fields."""
    def text(v) -> list[str]:
        if isinstance(v, tuple) and v and isinstance(v[0], tuple):
            return [",".join("=".join(p) for p in v)]
        if isinstance(v, tuple):
            return list(v)  # one value per item (commas stay within a prompt)
        return [str(v).lower() if isinstance(v, bool) else str(v)]

    custom = TrainConfig(eval_prompts=("a, b", "c"), num_processes=4, process_id=1,
                         data=DataConfig(columns=(("instruction", "q"), ("response", "a"))))
    argv = [token for path, v in leaves(custom) for token in [f"--{spell(path)}", *text(v)]]
    assert train(*argv) == custom


@pytest.mark.parametrize("argv, want", [
    (["--lora.rnak", "3"], "--lora.rnak: unknown option; did you mean --lora.rank?"),
    (["--weight-decy", "3"], "--weight-decy: unknown option; did you mean --weight-decay?"),
    (["--weight_decy", "3"], "--weight_decy: unknown option; did you mean --weight-decay?"),  # as --help spells it
    (["--lora-targts", "q"], "did you mean --lora-targets?"),
    (["--lorra.rank", "4"], "did you mean --lora.rank?"),
    (["--data.max_seq-len", "4"], "did you mean --data.max-seq-len?"),
    (["--zzzzzzzzzz", "4"], "--zzzzzzzzzz: unknown option; see"),
    (["--bogus"], "--bogus: unknown option; see"),  # the shared `--` is no likeness
    (["--lora.r", "4"], "--lora.r: unknown option"),  # no abbreviations
    (["--lora.rank", "x"], "--lora.rank: expected an integer, got 'x'"),
    (["--lora.rank", "2.5"], "--lora.rank: expected an integer, got '2.5'"),
    (["--batch-size", "fast"], "--batch-size: expected an integer, got 'fast'"),
    (["--lr", "fast"], "--lr: expected a number, got 'fast'"),
    (["--lora.rslora", "maybe"], "--lora.rslora: expected true or false, got 'maybe'"),
    (["--weight_decay"], "--weight_decay: expected one value (a number), got 0"),
    (["--seed", "1", "2"], "--seed: expected one value (an integer), got 2"),
    (["stray"], "'stray': unexpected argument"),
    (["--columns", "instruction"], "--columns: expected comma-separated STRING=STRING items, got 'instruction'"),
    (["--lora-rank", "0"], "--lora-rank: lora.rank: 0 is not valid"),
    (["--format", "xml"], "--format: data.format: 'xml' is not valid"),
])
def test_command_line_errors(argv, want):
    msg = error(train, *argv)
    assert want in msg, msg


def test_command_line_errors_with_a_file(tmp_path):
    path = write(tmp_path, "lora:\n  rank: 0\n")
    assert error(train, "--config", str(path)).startswith(f"{path}:2: lora.rank: 0 is not valid")
    assert train("--config", str(path), "--lora.rank", "2").lora.rank == 2  # fixed on the command line
    assert "no such file" in error(train, "--config", str(tmp_path / "nope.yaml"))


def test_data_inspect_flags():
    cfg = inspect("--data", "a.jsonl", "--max-seq-len", "64", "--template", "plain", "--columns",
                  "instruction=q", "response=a", "--skip-bad-rows", "--data.seed", "5", "--data.shuffle-buffer=9")
    assert cfg == DataConfig(paths=("a.jsonl",), max_seq_len=64, template=PLAIN_TEMPLATE, skip_bad_rows=True,
                             columns=(("instruction", "q"), ("response", "a")), seed=5, shuffle_buffer=9)
    assert inspect("--data", "a", "--seq-len", "32").max_seq_len == 32
    assert inspect("--data", "a") == DataConfig(paths=("a",))
    assert "did you mean --data.format?" in error(inspect, "--data", "a", "--data.fromat", "text")
    assert "unknown option" in error(inspect, "--data", "a", "--lora.rank", "4")
    assert "--val-fraction: data.val_fraction: 1.5 is not valid" in error(inspect, "--data", "a",
                                                                          "--val-fraction", "1.5")
    assert "--data is required" in error(inspect, "--format", "text")
    assert inspect("--data-paths", "a", "--data.paths", "b").paths == ("b",)  # any spelling meets the requirement


def test_both_commands_share_the_data_flags():
    argv = ["--data", "a", "--format", "chat", "--train-on", "all", "--packing", "pad", "--val-data", "v",
            "--overflow", "drop", "--seq-len", "99", "--val-fraction", "0.5", "--data.split", "test"]
    assert train(*argv).data == inspect(*argv)
