"""Build the tiny model's assets in src/gemmatune/assets/tiny (dev-time only).

transformers is allowed here and only here: it converts the SentencePiece model to tokenizer.json exactly the way
Hugging Face ships Gemma's, so tests can compare gemmatune against the reference on the same files.
"""

from __future__ import annotations

import importlib
import inspect
import io
import json
import random
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "src/gemmatune/assets/tiny"
sys.path.insert(0, str(ROOT / "src"))  # run from a checkout without installing

from gemmatune.tokenizer import GEMMA2_CHAT_TEMPLATE, load_tokenizer  # noqa: E402

VOCAB_SIZE = 4096  # the tiny preset has 4096 embedding rows
# <pad> <eos> <bos> <unk> get real Gemma's ids 0-3. The turn markers are user-defined (SentencePiece matches them
# in text, as in real Gemma); "\n" and "\t" are too, because training reads one line at a time and would never see
# them. <mask> is a control token like <bos>: never produced from text by SentencePiece itself.
USER_DEFINED = ["<start_of_turn>", "<end_of_turn>", "\n", "\t"]
CONTROL = ["<mask>"]
TURN_MARKERS = ["<start_of_turn>", "<end_of_turn>"]

# Docstrings of these modules are the bulk of the corpus: plenty of English prose, offline, and stable for a given
# Python version. Modules with import side effects (this, antigravity, tkinter) are deliberately absent.
CORPUS_MODULES = [
    "abc", "argparse", "ast", "asyncio", "base64", "bisect", "builtins", "calendar", "cmath", "codecs",
    "collections", "concurrent.futures", "configparser", "contextlib", "copy", "csv", "dataclasses", "datetime",
    "decimal", "difflib", "email", "email.message", "enum", "fnmatch", "fractions", "ftplib", "functools",
    "getopt", "gettext", "glob", "gzip", "hashlib", "heapq", "hmac", "html", "html.parser", "http.client",
    "http.server", "imaplib", "inspect", "io", "ipaddress", "itertools", "json", "locale", "logging",
    "logging.handlers", "lzma", "mailbox", "math", "mimetypes", "multiprocessing", "netrc", "numbers", "operator",
    "optparse", "os", "pathlib", "pdb", "pickle", "pkgutil", "platform", "plistlib", "poplib", "pprint", "queue",
    "random", "re", "sched", "secrets", "selectors", "shelve", "shlex", "shutil", "signal", "smtplib", "socket",
    "socketserver", "sqlite3", "ssl", "statistics", "string", "struct", "subprocess", "symtable", "sys",
    "sysconfig", "tarfile", "tempfile", "textwrap", "threading", "time", "timeit", "tokenize", "trace",
    "traceback", "types", "typing", "unittest", "unittest.mock", "urllib.parse", "urllib.request", "uuid",
    "warnings", "wave", "weakref", "xml.dom.minidom", "xml.etree.ElementTree", "zipfile", "zoneinfo",
]

# A little non-English text so common accented letters get real pieces; the rest goes through byte fallback.
MULTILINGUAL = [
    "Le café est très bon, merci beaucoup.",
    "Der Bär läuft über die Straße.",
    "¿Dónde está la biblioteca? Está allí.",
    "Привет, как дела?",
    "日本語のテキストも少し含めます。",
    "中文文本也包括在内。",
    "Ελληνικά γράμματα: α, β, γ, δ.",
    "Emoji: 😀 🎉 👍 — and symbols like €, £, ° and ±.",
]


def docstring_lines() -> list[str]:
    """Docstrings of CORPUS_MODULES and their public members, in a fixed (sorted) order."""
    docs: list[str] = []
    for name in CORPUS_MODULES:
        module = importlib.import_module(name)
        objects: list[object] = [module]
        for attr, obj in sorted(vars(module).items()):
            if attr.startswith("_"):
                continue
            objects.append(obj)
            if inspect.isclass(obj):
                objects += [v for a, v in sorted(vars(obj).items()) if not a.startswith("_")]
        for obj in objects:
            if inspect.ismodule(obj) or inspect.isclass(obj) or inspect.isroutine(obj):
                doc = inspect.getdoc(obj)
                if doc:
                    docs.append(doc)
    text = "\n".join(dict.fromkeys(docs))  # inherited docstrings repeat; keep the first
    return [line for line in text.splitlines() if line.strip()]


def chat_lines(n: int = 4000) -> list[str]:
    """Instruction/answer sentences and chat-formatted turns, so the tiny tokenizer has pieces for them."""
    rng = random.Random(0)
    topics = ["the ocean", "a small robot", "autumn leaves", "prime numbers", "a lighthouse", "coffee",
              "the moon", "mountains", "a library", "trains", "gardens", "rain", "bicycles", "music"]
    asks = ["Write a short poem about {t}.", "Explain {t} to a child.", "Give me three facts about {t}.",
            "Summarize what you know about {t}.", "Tell me a story about {t}.", "Why do people like {t}?"]
    answers = ["Sure! Here is a short answer about {t}.", "Of course. {T} is a wonderful subject.",
               "Here are three facts about {t}: it is old, it is common, and it is interesting.",
               "I would be happy to help with {t}.", "Certainly, let me explain {t} step by step."]
    lines: list[str] = []
    for _ in range(n):
        t = rng.choice(topics)
        a, b = rng.randrange(1000), rng.randrange(1000)
        ask = rng.choice(asks).format(t=t)
        answer = rng.choice(answers).format(t=t, T=t[0].upper() + t[1:])
        lines += [
            "<start_of_turn>user", f"{ask}<end_of_turn>", "<start_of_turn>model", f"{answer}<end_of_turn>",
            f"What is {a} + {b}? The answer is {a + b}.",
            f"Step {a % 10 + 1}: multiply {a} by {b % 10} to get {a * (b % 10)}.",
        ]
    return lines


def train_sentencepiece() -> bytes:
    """Train the BPE model with Gemma's SentencePiece settings; returns the serialized model."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(docstring_lines() + chat_lines() + MULTILINGUAL * 20),
        model_writer=model,
        model_type="bpe",
        vocab_size=VOCAB_SIZE,
        byte_fallback=True,
        split_digits=True,
        add_dummy_prefix=False,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        pad_id=0, eos_id=1, bos_id=2, unk_id=3,
        pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>",
        user_defined_symbols=USER_DEFINED,
        control_symbols=CONTROL,
        shuffle_input_sentence=False,
        num_threads=1,  # deterministic piece order
        minloglevel=2,
    )
    return model.getvalue()


# Strings the two tokenizer files must agree on; they cover what broke other converters.
CHECK_STRINGS = [
    "Hello, world!",
    "The year 2024 has 366 days; 3.14159 is pi.",
    "line one\nline two\n\n\nafter three newlines",
    "double  spaces,   triple, and trailing space ",
    " leading space and\ttab",
    "Café naïve über straße",
    "日本語のテキスト and 中文",
    "emoji 😀🎉 mixed with text",
    "<start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\n",
    "<bos><eos><pad> control tokens written as text",
    "code: def f(x):\n    return x ** 2  # comment",
    "",
]


def _require(ok: bool, message: str) -> None:
    if not ok:  # not `assert`: the check must also run under python -O
        raise SystemExit(f"build_tiny: tokenizer verification failed: {message}")


def verify(out_dir: Path, sp_model: bytes) -> None:
    """Fail loudly unless tokenizer.json and tokenizer.model give identical ids (raw and through gemmatune)."""
    import sentencepiece as spm
    from tokenizers import Tokenizer as HFTokenizer

    sp = spm.SentencePieceProcessor(model_proto=sp_model)
    hf = HFTokenizer.from_file(str(out_dir / "tokenizer.json"))
    _require(hf.get_vocab_size(with_added_tokens=True) == sp.vocab_size() == VOCAB_SIZE, "vocabulary size differs")
    for s in CHECK_STRINGS:
        if "<bos>" in s:
            continue  # SentencePiece itself never maps control-token text; gemmatune does, checked below
        sp_ids, hf_ids = sp.encode(s), hf.encode(s, add_special_tokens=False).ids
        _require(sp_ids == hf_ids, f"ids differ for {s!r}:\n  sentencepiece {sp_ids}\n  tokenizer.json {hf_ids}")
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "tokenizer.model").write_bytes(sp_model)
        via_sp = load_tokenizer(Path(tmp))
    via_json = load_tokenizer(out_dir)
    for s in CHECK_STRINGS:
        a, b = via_sp.encode(s), via_json.encode(s)
        _require(a == b, f"gemmatune backends differ for {s!r}:\n  tokenizer.model {a}\n  tokenizer.json {b}")
        _require(via_json.decode(b, skip_special_tokens=False) == s, f"round trip failed for {s!r}")


def build_tokenizer(out_dir: Path) -> None:
    """Write tokenizer.model, tokenizer.json, tokenizer_config.json and special_tokens_map.json to out_dir."""
    from transformers import GemmaTokenizer

    sp_model = train_sentencepiece()
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "tokenizer.model").write_bytes(sp_model)
        # Not GemmaTokenizerFast(vocab_file=...): in transformers 5 that silently yields a 5-token vocabulary.
        # As in the released Gemma 2 files: a post-processor that prepends <bos>, and only the turn markers as extra
        # special tokens (by default every user-defined symbol, "\n" included, would become one).
        hf = GemmaTokenizer.from_pretrained(tmp, add_bos_token=True, extra_special_tokens=TURN_MARKERS)
    hf.chat_template = GEMMA2_CHAT_TEMPLATE
    hf.save_pretrained(out_dir, save_jinja_files=False)  # template inside tokenizer_config.json, as Gemma ships it
    (out_dir / "tokenizer.model").write_bytes(sp_model)

    config_path = out_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    for key in ("vocab_file", "is_local", "local_files_only"):  # temp-dir path and load-time flags, not settings
        config.pop(key, None)
    config.update(add_bos_token=True, add_eos_token=False)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
    # transformers 5 no longer writes special_tokens_map.json; older readers (and GGUF converters) still look for it.
    special_map = {key: config[key] for key in ("bos_token", "eos_token", "pad_token", "unk_token", "mask_token")}
    special_map["additional_special_tokens"] = TURN_MARKERS
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n", encoding="utf-8")
    verify(out_dir, sp_model)


def build_model(out_dir: Path, tokenizer_dir: Path) -> None:
    """The tiny preset with random bfloat16 weights, saved with the tokenizer as a Hugging Face checkpoint
    (the same path a user's checkpoint takes). Replaces out_dir atomically."""
    import jax

    from gemmatune.config import PRESETS
    from gemmatune.convert.hf import save_hf
    from gemmatune.model import init_params

    cfg = PRESETS["tiny"]
    _require(load_tokenizer(tokenizer_dir).vocab_size == cfg.vocab_size,
             f"the tokenizer's vocabulary is not the tiny preset's {cfg.vocab_size} rows")
    params = init_params(cfg, jax.random.key(0), post_norm_mean=1.0)  # post-norms > 0: less repetitive text
    save_hf(out_dir, cfg, params, dtype="bfloat16", tokenizer_dir=tokenizer_dir, force=True)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        build_tokenizer(Path(tmp))
        build_model(ASSETS, Path(tmp))
    print(f"wrote and verified the tiny model and tokenizer in {ASSETS}")


if __name__ == "__main__":
    main()
