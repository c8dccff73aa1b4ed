"""Gemma tokenizer loading (tokenizer.json, tokenizer.model, or a GGUF file's own vocabulary), the Gemma chat
templates, and streaming decode.

Both backends give the same ids for the same text. Gemma's tokenizer adds no dummy prefix space, splits digits, falls
back to bytes for characters outside the vocabulary, and maps special-token strings written in the text (such as
`<start_of_turn>`) to their ids. Nothing here ever adds `<bos>`/`<eos>` on its own: callers say so explicitly, so a
sequence gets exactly one `<bos>`.
"""

from __future__ import annotations

import codecs
import re
import struct
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from gemmatune.errors import GemmatuneError

# The released Gemma 2 instruct template, verbatim. chat_template(family) picks the one written into the
# tokenizer_config.json of exports and into GGUF files; at runtime render_chat() reproduces both in plain Python.
GEMMA2_CHAT_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)

# The released Gemma 3 instruct template, verbatim (google/gemma-3-*-it tokenizer_config.json). Unlike Gemma 2's it
# folds a leading system message into the first user turn, and takes contents as lists of {"type": "text"} items.
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' -%}\n"
    "    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}\n"
    "    {%- else -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}\n"
    "    {%- endif -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n"
    "{%- else -%}\n"
    "    {%- set first_user_prefix = \"\" -%}\n"
    "    {%- set loop_messages = messages -%}\n"
    "{%- endif -%}\n"
    "{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    "        {{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}\n"
    "    {%- endif -%}\n"
    "    {%- if (message['role'] == 'assistant') -%}\n"
    "        {%- set role = \"model\" -%}\n"
    "    {%- else -%}\n"
    "        {%- set role = message['role'] -%}\n"
    "    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n"
    "        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n"
    "        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'image' -%}\n"
    "                {{ '<start_of_image>' }}\n"
    "            {%- elif item['type'] == 'text' -%}\n"
    "                {{ item['text'] | trim }}\n"
    "            {%- endif -%}\n"
    "        {%- endfor -%}\n"
    "    {%- else -%}\n"
    "        {{ raise_exception(\"Invalid content type\") }}\n"
    "    {%- endif -%}\n"
    "    {{ '<end_of_turn>\n' }}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "    {{'<start_of_turn>model\n'}}\n"
    "{%- endif -%}\n"
)
CHAT_TEMPLATES = {"gemma2": GEMMA2_CHAT_TEMPLATE, "gemma3": GEMMA3_CHAT_TEMPLATE}

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_MODEL = "tokenizer.model"
KERAS_SPM = "assets/tokenizer/vocabulary.spm"  # a KerasHub preset's SentencePiece model

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_ROLES = {"user": "user", "assistant": "model", "model": "model"}


class Tokenizer:
    """A loaded Gemma tokenizer; build it with load_tokenizer().

    Decoding is done here from the pieces rather than by the backend, so both backends decode identically and the
    StreamDecoder can share the exact byte-level logic of decode().
    """

    def __init__(
        self,
        source: Path,
        encode_plain: Callable[[str], list[int]],
        pieces: list[str],
        byte_ids: set[int],
        special_ids: set[int],
    ) -> None:
        self.source = source  # the file it was loaded from, for error messages
        self._encode_plain = encode_plain
        self._pieces = pieces
        self.vocab_size = len(pieces)
        ids = {piece: i for i, piece in reversed(list(enumerate(pieces)))}  # first id wins for duplicate pieces

        def lookup(token: str) -> int:
            if token not in ids:
                raise GemmatuneError(f"{source}: the vocabulary has no {token!r} token; this is not a Gemma tokenizer")
            return ids[token]

        self.pad_id = lookup("<pad>")
        self.eos_id = lookup("<eos>")
        self.bos_id = lookup("<bos>")
        self.start_of_turn_id = lookup("<start_of_turn>")
        self.end_of_turn_id = lookup("<end_of_turn>")
        # Skipped by decode(skip_special_tokens=True): the file's own special tokens plus the fixed Gemma ones, so the
        # turn markers are skipped whichever file they came from.
        self.special_ids = frozenset(
            special_ids | {self.pad_id, self.eos_id, self.bos_id, self.start_of_turn_id, self.end_of_turn_id}
        )
        self._piece_bytes = [
            bytes([int(piece[3:5], 16)]) if i in byte_ids else piece.replace("\u2581", " ").encode("utf-8")
            for i, piece in enumerate(pieces)
        ]

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """Token ids of `text`, with `<bos>` first only if add_bos; special-token strings map to their ids."""
        ids = self._encode_plain(text)
        return [self.bos_id, *ids] if add_bos else ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`; invalid UTF-8 from stray byte tokens becomes U+FFFD."""
        return b"".join(self._bytes(i, skip_special_tokens) for i in ids).decode("utf-8", errors="replace")

    def id_to_piece(self, token_id: int) -> str:
        """The vocabulary entry of `token_id` as stored (`▁` for spaces, `<0x0A>` for byte tokens)."""
        self._check_id(token_id)
        return self._pieces[token_id]

    def encode_chat(self, messages: Sequence[Mapping[str, object]], add_generation_prompt: bool = False) -> list[int]:
        """`<bos>` + the ids of render_chat(messages): exactly one `<bos>`, as apply_chat_template(tokenize=True)."""
        return [self.bos_id, *self.encode(render_chat(messages, add_generation_prompt))]

    def _bytes(self, token_id: int, skip_special_tokens: bool) -> bytes:
        self._check_id(token_id)
        if skip_special_tokens and token_id in self.special_ids:
            return b""
        return self._piece_bytes[token_id]

    def _check_id(self, token_id: int) -> None:
        # Negative ids would silently index from the end of the vocabulary.
        if not 0 <= token_id < self.vocab_size:
            raise ValueError(f"token id {token_id} is outside the vocabulary [0, {self.vocab_size})")


class StreamDecoder:
    """Decodes ids one at a time for streaming generation.

    feed() returns only text that is complete: a character split over several byte-fallback tokens is held back
    until its last byte arrives, so U+FFFD never appears mid-character. The concatenation of all feed() results and
    flush() equals tokenizer.decode(ids) of the whole sequence.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token_id: int) -> str:
        """The text completed by `token_id` (often empty while a multi-byte character is incomplete)."""
        return self._utf8.decode(self._tokenizer._bytes(token_id, self._skip_special_tokens))

    def flush(self) -> str:
        """Call at the end: an unfinished character becomes U+FFFD, as in decode()."""
        return self._utf8.decode(b"", final=True)


def load_tokenizer(model_dir: str | Path) -> Tokenizer:
    """Load `model_dir`/tokenizer.json (preferred) or `model_dir`/tokenizer.model, or a KerasHub preset's
    assets/tokenizer/vocabulary.spm (a SentencePiece model); or, given a `.gguf` file, the SentencePiece model built
    from that file's own vocabulary (gguf_sentencepiece)."""
    model_dir = Path(model_dir)
    if model_dir.suffix.lower() == GGUF_SUFFIX and not model_dir.is_dir():
        return _from_processor(_sentencepiece_processor(model_dir, gguf_sentencepiece(model_dir)), model_dir)
    keras_spm = model_dir / KERAS_SPM
    if keras_spm.is_file():  # a KerasHub preset: its tokenizer.json is a Keras layer config, not a tokenizer
        return _load_sentencepiece(keras_spm)
    if (model_dir / TOKENIZER_JSON).is_file():
        return _load_tokenizer_json(model_dir / TOKENIZER_JSON)
    if (model_dir / TOKENIZER_MODEL).is_file():
        return _load_sentencepiece(model_dir / TOKENIZER_MODEL)
    raise GemmatuneError(
        f"{model_dir}: no tokenizer found; expected {TOKENIZER_JSON} or {TOKENIZER_MODEL} in that directory "
        "(copy them from the Hugging Face model repository)"
    )


def _corrupt(path: Path, err: Exception) -> GemmatuneError:
    return GemmatuneError(f"{path}: cannot be read as a tokenizer ({err}); the file is corrupt, re-download it")


def _load_tokenizer_json(path: Path) -> Tokenizer:
    from tokenizers import Tokenizer as HFTokenizer

    try:
        hf = HFTokenizer.from_file(str(path))
    except Exception as err:  # tokenizers raises a bare Exception for malformed JSON
        raise _corrupt(path, err) from err
    pieces: list[str] = []
    for i in range(hf.get_vocab_size(with_added_tokens=True)):
        piece = hf.id_to_token(i)
        if piece is None:
            raise GemmatuneError(f"{path}: the vocabulary has no token for id {i}; the file is corrupt, re-download it")
        pieces.append(piece)
    byte_fallback = bool(getattr(hf.model, "byte_fallback", False))
    byte_ids = {i for i, p in enumerate(pieces) if byte_fallback and _BYTE_PIECE.fullmatch(p)}
    special = {i for i, token in hf.get_added_tokens_decoder().items() if token.special}

    def encode_plain(text: str) -> list[int]:
        # Gemma's tokenizer.json has a post-processor that prepends <bos>; add_special_tokens=False turns it off.
        return hf.encode(text, add_special_tokens=False).ids

    return Tokenizer(path, encode_plain, pieces, byte_ids, special)


def _load_sentencepiece(path: Path) -> Tokenizer:
    return _from_processor(_sentencepiece_processor(path), path)


def _sentencepiece_processor(path: Path, proto: bytes | None = None) -> Any:
    """A SentencePieceProcessor of the model file `path`, or of the serialized `proto` built from it."""
    import sentencepiece as spm

    try:
        if proto is None:
            return spm.SentencePieceProcessor(model_file=str(path))
        return spm.SentencePieceProcessor(model_proto=proto)
    except (OSError, RuntimeError) as err:
        raise _corrupt(path, err) from err


def _from_processor(sp: Any, path: Path) -> Tokenizer:
    n = sp.get_piece_size()
    pieces = [sp.id_to_piece(i) for i in range(n)]
    byte_ids = {i for i in range(n) if sp.is_byte(i)}
    special = {i for i in range(n) if sp.is_control(i) or sp.is_unknown(i)}
    # SentencePiece matches user-defined symbols (<start_of_turn>) in text but never control tokens (<bos>);
    # tokenizer.json matches both. Split the text on control-token strings to give the same ids.
    control = sorted((pieces[i] for i in special), key=len, reverse=True)
    splitter = re.compile("(" + "|".join(map(re.escape, control)) + ")")
    control_ids = {pieces[i]: i for i in sorted(special, reverse=True)}

    def encode_plain(text: str) -> list[int]:
        ids: list[int] = []
        for k, part in enumerate(splitter.split(text)):
            if k % 2:  # odd parts are the captured control-token strings
                ids.append(control_ids[part])
            elif part:
                ids += sp.encode(part)
        return ids

    return Tokenizer(path, encode_plain, pieces, byte_ids, special)


GGUF_SUFFIX = ".gguf"
GGUF_MAGIC = b"GGUF"
# GGUF metadata value types (the gguf spec's numbering) -> struct format; 8 is a string, 9 an array.
_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9
# llama.cpp's token types use SentencePiece's numbering (1 normal .. 6 byte), except 0, "undefined", read as normal.
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6


def gguf_metadata(path: str | Path) -> dict[str, Any]:
    """The key/value metadata of the GGUF file `path` (versions 2 and 3, either byte order), without the tensors.

    Numeric arrays come back as numpy arrays, string arrays as lists of str. Reading only the header this way takes
    a fraction of a second where gguf.GGUFReader spends many seconds indexing a 262,144-token vocabulary."""
    import mmap

    path = Path(path)
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return _GGUFHeader(buf, path).metadata()
    except (OSError, ValueError) as err:  # ValueError: mmap of an empty file
        raise GemmatuneError(f"{path}: cannot be read as a GGUF file ({err})") from err


class _GGUFHeader:
    """A cursor over the start of a GGUF file: magic, version, counts, then kv_count (key, type, value) entries."""

    def __init__(self, buf: Any, path: Path) -> None:
        self._buf, self._path, self._pos = buf, path, len(GGUF_MAGIC)
        if buf[:4] != GGUF_MAGIC:
            raise GemmatuneError(f"{path}: not a GGUF file (it does not start with {GGUF_MAGIC!r}); pass a .gguf "
                                 "model file as llama.cpp and Ollama use")
        self._order = "<"
        version = self._read("I", 4)
        if version & 0xFFFF == 0:  # a big-endian file (the spec allows one); its version reads byte-swapped
            self._order, self._pos = ">", 4
            version = self._read("I", 4)
        if version not in (2, 3):
            raise GemmatuneError(f"{path}: GGUF version {version} is not supported (only 2 and 3); convert the model "
                                 "again with a current llama.cpp")

    def metadata(self) -> dict[str, Any]:
        self._read("Q", 8)  # the tensor count, read by the weight loader
        count = self._read("Q", 8)
        meta: dict[str, Any] = {}
        for _ in range(count):
            key = self._string()
            meta[key] = self._value(self._read("I", 4), key)
        return meta

    def _read(self, fmt: str, size: int) -> Any:
        if self._pos + size > len(self._buf):
            raise GemmatuneError(f"{self._path}: the GGUF header ends early (at byte {len(self._buf)}); the file is "
                                 "truncated, download it again")
        (value,) = struct.unpack_from(self._order + fmt, self._buf, self._pos)
        self._pos += size
        return value

    def _string(self) -> str:
        n = self._read("Q", 8)
        raw = self._buf[self._pos:self._pos + n]
        if len(raw) < n:
            self._read("B", n)  # raises: truncated
        self._pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise GemmatuneError(f"{self._path}: a GGUF string at byte {self._pos - n} is not UTF-8 ({err}); the file "
                                 "is corrupt") from None

    def _value(self, kind: int, key: str) -> Any:
        import numpy as np

        if kind in _GGUF_SCALARS:
            fmt = _GGUF_SCALARS[kind]
            return self._read(fmt, struct.calcsize(fmt))
        if kind == _GGUF_STRING:
            return self._string()
        if kind == _GGUF_ARRAY:
            item, n = self._read("I", 4), self._read("Q", 8)
            if item in _GGUF_SCALARS:
                dtype = np.dtype(_GGUF_SCALARS[item]).newbyteorder(self._order)
                size = n * dtype.itemsize
                self._read("B", size) if size else None  # bounds check, and moves past the array
                return np.frombuffer(self._buf, dtype, n, self._pos - size).astype(dtype.newbyteorder("="))
            return [self._value(item, key) for _ in range(n)]
        raise GemmatuneError(f"{self._path}: metadata {key!r} has unknown GGUF value type {kind}; the file is "
                             "corrupt or from a newer GGUF version")


def gguf_sentencepiece(path: str | Path) -> bytes:
    """A serialized SentencePiece ModelProto rebuilt from the GGUF file's tokenizer metadata (tokenizer.ggml.*).

    llama.cpp's "llama" vocabulary is a SentencePiece model taken apart: pieces, scores and token types (numbered as
    SentencePiece numbers them), the special ids, and add_space_prefix. It encodes the way llama.cpp does with
    SentencePiece's BPE (merges by score, whitespace as "▁", no normalization), so it goes back as a BPE model with
    an identity normalizer; byte fallback is on when the vocabulary has the 256 byte pieces."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    path = Path(path)
    meta = gguf_metadata(path)
    kind = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if kind != "llama" or not isinstance(tokens, list):
        what = f"tokenizer model {kind!r}" if kind is not None else "no tokenizer.ggml.model"
        raise GemmatuneError(f"{path}: the GGUF vocabulary is {what}, not a SentencePiece one (\"llama\"); gemmatune "
                             "reads Gemma's SentencePiece vocabulary only, so this is not a Gemma GGUF file")
    n = len(tokens)
    scores = meta.get("tokenizer.ggml.scores")
    types = meta.get("tokenizer.ggml.token_type")
    for key, values in (("scores", scores), ("token_type", types)):
        if values is not None and len(values) != n:
            raise GemmatuneError(f"{path}: tokenizer.ggml.{key} has {len(values)} entries for {n} tokens; the file "
                                 "is corrupt")
    proto = pb.ModelProto()
    for i, piece in enumerate(tokens):
        kind_i = int(types[i]) if types is not None else _NORMAL
        if kind_i == _USER_DEFINED:
            # Gemma 3's whitespace runs ("  ", "   ", ...) are user-defined pieces that llama.cpp stores with plain
            # spaces and matches in the raw text; SentencePiece matches them after writing spaces as "▁".
            piece = piece.replace(" ", "\u2581")
        proto.pieces.add(piece=piece, score=float(scores[i]) if scores is not None else 0.0,
                         type=kind_i if _NORMAL <= kind_i <= _BYTE else _NORMAL)
    spec = proto.trainer_spec
    spec.model_type = pb.TrainerSpec.BPE
    spec.vocab_size = n
    spec.byte_fallback = types is not None and int((types == _BYTE).sum()) == 256
    for name in ("unk", "bos", "eos", "pad"):
        key = "unknown" if name == "unk" else "padding" if name == "pad" else name
        token_id = meta.get(f"tokenizer.ggml.{key}_token_id")
        if token_id is None:
            setattr(spec, f"{name}_id", -1)
            continue
        if not 0 <= token_id < n:
            raise GemmatuneError(f"{path}: tokenizer.ggml.{key}_token_id is {token_id}, outside the {n} tokens; the "
                                 "file is corrupt")
        setattr(spec, f"{name}_id", int(token_id))
        setattr(spec, f"{name}_piece", tokens[token_id])
    if spec.unk_id >= 0:
        # llama.cpp's converter may type <unk> CONTROL (Gemma 3's does); SentencePiece needs its one UNKNOWN piece.
        proto.pieces[spec.unk_id].type = _UNKNOWN
    norm = proto.normalizer_spec
    norm.name = "identity"
    norm.add_dummy_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))  # llama.cpp's default
    norm.remove_extra_whitespaces = False
    norm.escape_whitespaces = True
    return proto.SerializeToString()


def chat_template(family: str) -> str:
    """The released instruct template of the model family ("gemma2" or "gemma3"), verbatim: what exports write into
    tokenizer_config.json and GGUF files write as tokenizer.chat_template. render_chat() renders both."""
    if family not in CHAT_TEMPLATES:
        raise GemmatuneError(f"no chat template for model family {family!r}; the families are "
                             + ", ".join(map(repr, CHAT_TEMPLATES)))
    return CHAT_TEMPLATES[family]


def render_chat(messages: Sequence[Mapping[str, object]], add_generation_prompt: bool = False) -> str:
    """Render `messages` as the released Gemma 3 instruct template does (GEMMA3_CHAT_TEMPLATE), without the leading
    `<bos>`; on the conversations Gemma 2's template accepts (no system message) both templates give the same text.

    Each message is {"role": ..., "content": ...}; roles are "user" and "assistant" (or its synonym "model"),
    alternating and starting with "user", after an optional first "system" message. Content is a string or the
    template's list of {"type": "text", "text": ...} items; it is stripped of surrounding whitespace (the template's
    `trim`, item by item). A system message is folded into the first user turn as the Gemma 3 template does,
    `system_text + "\\n\\n" + user_text` with the system text as written; Gemma 2's template refuses one, and
    gemmatune folds it the same way for both families.
    """
    text = "".join(f"<start_of_turn>{role}\n{content}<end_of_turn>\n" for role, content in chat_turns(messages))
    return text + "<start_of_turn>model\n" if add_generation_prompt else text


def chat_turns(messages: Sequence[Mapping[str, object]], roles: Mapping[str, str] | None = None,
               column: str = "messages") -> list[tuple[str, str]]:
    """Validated (template role "user" | "model", content as the template writes it) pairs: contents trimmed, a
    leading system message folded into the first user turn. render_chat writes them out, and the data pipeline
    tokenises them part by part.

    `roles` maps each role as the caller's rows spell it (ShareGPT's "human"/"gpt", ...) to system / user / model
    (default: system, user, assistant and model); `column` names the conversation. Errors quote the role as
    written, so a user finds it in the file."""
    roles = {"system": "system", **_ROLES} if roles is None else roles
    if len(messages) == 0:
        raise GemmatuneError(f"{column}: the conversation is empty; it needs at least one user message")
    checked: list[tuple[str, str]] = []  # (role as written, content as the template writes it)
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
            raise GemmatuneError(f"{column}[{i}]: expected a mapping with 'role' and 'content', got {message!r}")
        role = message["role"]
        if role not in tuple(roles):  # a tuple, so an unhashable role is reported rather than a TypeError
            raise GemmatuneError(f"{column}[{i}]: unknown role {role!r}; use "
                                 + ", ".join(map(repr, roles)) + " (a system one only first)")
        if roles[role] == "system" and i > 0:
            raise GemmatuneError(
                f"{column}[{i}]: a 'system' message is only allowed as the first message (role {role!r})"
            )
        checked.append((role, _content_text(message["content"], roles[role] == "system", f"{column}[{i}]", role)))

    first = 1 if roles[checked[0][0]] == "system" else 0
    if first and len(checked) == 1:
        raise GemmatuneError(
            f"{column}[0] (role {checked[0][0]!r}): a system message must be followed by a 'user' message to fold "
            "it into"
        )
    turns: list[tuple[str, str]] = []
    for i in range(first, len(checked)):
        role, content = checked[i]
        expected = "user" if (i - first) % 2 == 0 else "model"
        if roles[role] != expected:
            raise GemmatuneError(
                f"{column}[{i}]: expected a {expected!r} message, got role {role!r}; roles must alternate "
                "user/assistant starting with user (after an optional first system message)"
            )
        turns.append((expected, content))
    if first:  # the system text goes in as written; only the user text is trimmed
        turns[0] = ("user", checked[0][1] + "\n\n" + turns[0][1])
    return turns


def _content_text(content: object, system: bool, where: str, role: object) -> str:
    """A message's content as the Gemma 3 template writes it: a string trimmed, a list's text items each trimmed and
    joined; a system message's text untrimmed (its first item, the only one the template reads)."""
    if isinstance(content, str):
        return content if system else content.strip()
    if not isinstance(content, list | tuple):
        raise GemmatuneError(f"{where} (role {role!r}): content must be a string or a list of "
                             f"{{'type': 'text', 'text': ...}} items, got {type(content).__name__}")
    texts = []
    for k, item in enumerate(content):
        if not (isinstance(item, Mapping) and item.get("type") == "text" and isinstance(item.get("text"), str)):
            kind = item.get("type") if isinstance(item, Mapping) else type(item).__name__
            raise GemmatuneError(f"{where}.content[{k}] (role {role!r}): expected a {{'type': 'text', 'text': str}} "
                                 f"item, got {kind!r}; gemmatune trains on text only")
        texts.append(item["text"])
    if system:
        if len(texts) != 1:
            # The template reads only the first item of a system list: refuse rather than drop text silently.
            raise GemmatuneError(f"{where} (role {role!r}): a system message's content list must hold exactly one "
                                 f"text item (the Gemma 3 template reads only the first), got {len(texts)}")
        return texts[0]
    return "".join(t.strip() for t in texts)
