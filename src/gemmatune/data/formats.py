"""Rows -> tokens + loss mask: detect the layout of the user's rows from their columns, encode each row as one
Example, and fit examples to the sequence length.

Layouts (detected from the columns; `data.format` and `data.columns` override):
  text               {"text"}                                    every token but <bos> trained
  instruction        Dolly {instruction, context, response}, Alpaca {instruction, input, output},
                     {prompt, completion}, or any columns mapped with data.columns
  chat               {"messages": [{"role", "content"}]} or ShareGPT {"conversations": [{"from", "value"}]}
  preference         {"chosen", "rejected"} and an optional "prompt", as TRL and UltraFeedback write them: strings
                     (a prompt is then required), a prompt (string or messages) with chosen/rejected model replies
                     (or whole conversations beginning with the prompt), or two whole conversations without a
                     prompt, whose shared prompt is their common leading messages up to the last user turn

Instruction rows use the Gemma chat template by default (one user turn, one model turn, contents trimmed as the
template does) or a plain template string ending with {response} (user text kept as written). Gemma has no system
role: a leading system message is folded into the first user turn as Gemma 3's template does,
`system + "\\n\\n" + user` with the system text as written (tokenizer.chat_turns), and is never trained.

With train_on "model" the trained tokens are, for every model turn, its content and its <end_of_turn>, plus the
final <eos>: without them the model never learns to stop (axolotl #3754). Every example has exactly one <bos>, added
here; nothing else adds one.

A preference row is a Pair of Examples: the same prompt tokens, then the chosen or the rejected reply. Only the reply
is trained, as a chat example with train_on "model" trains a model turn (its content, its <end_of_turn> and the
final <eos>); the prompt never is, and train_on does not apply (DPO compares the replies' log-probabilities given the
prompt). With a plain data.template, a string prompt is the instruction and the reply follows it untrimmed.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import numpy as np

from gemmatune.config import DataConfig
from gemmatune.data.records import Example, Pair, RowError
from gemmatune.errors import GemmatuneError
from gemmatune.tokenizer import Tokenizer, chat_turns

TEXT, INSTRUCTION, CHAT, PREFERENCE = "text", "instruction", "chat", "preference"
MESSAGES, SHAREGPT = "messages", "sharegpt"

# RowError reasons: short fixed categories, used to count skipped rows.
MISSING_FIELD = "missing field"
WRONG_TYPE = "wrong type"
EMPTY_TEXT = "empty text"
EMPTY_RESPONSE = "empty response"
EMPTY_MODEL_TURN = "empty model turn"
EMPTY_CONVERSATION = "empty conversation"
UNKNOWN_ROLE = "unknown role"
ROLES_OUT_OF_ORDER = "roles out of order"
ENDS_ON_USER_TURN = "ends on a user turn"
BOS_IN_TEXT = "<bos> in text"
INVALID_TEXT = "invalid Unicode"
# Preference rows.
SAME_RESPONSE = "chosen equals rejected"
NO_SHARED_PROMPT = "no shared prompt"
PROMPT_NOT_USER = "prompt not ending on a user turn"
REPLY_NOT_MODEL = "reply not one model turn"
# fit() reasons for dropping an example.
TOO_LONG = "too long"
NO_TRAINED_TOKENS = "no trained tokens"
PROMPT_TOO_LONG = "prompt too long"


@dataclasses.dataclass(frozen=True)
class Layout:
    """How rows are read. For instruction rows, the user's column holding each of our fields (input None: no input
    column); for chat rows, the flavour (MESSAGES or SHAREGPT). Only str/None fields, so it prints and serialises."""

    kind: str  # TEXT, INSTRUCTION, CHAT or PREFERENCE
    name: str  # the known layout it is ("Dolly", "ShareGPT", ...) or "mapped columns"; shown to users
    instruction: str | None = None
    input: str | None = None
    response: str | None = None
    flavour: str | None = None

    @property
    def required(self) -> tuple[str, ...]:
        """The columns a row must have. The input column is optional: a row without it has an empty input."""
        if self.kind == TEXT:
            return ("text",)
        if self.kind == CHAT:
            return (_FLAVOURS[self.flavour].column,)
        if self.kind == PREFERENCE:  # "prompt" is optional: full conversations share theirs
            return ("chosen", "rejected")
        return (self.instruction, self.response)


@dataclasses.dataclass(frozen=True)
class _Flavour:
    column: str
    role_key: str
    content_key: str
    roles: dict[str, str]  # the row's role -> user | model | system


_FLAVOURS = {
    MESSAGES: _Flavour("messages", "role", "content",
                       {"system": "system", "user": "user", "assistant": "model", "model": "model"}),
    SHAREGPT: _Flavour("conversations", "from", "value",
                       {"system": "system", "human": "user", "user": "user",
                        "gpt": "model", "assistant": "model", "model": "model"}),
}

KNOWN_LAYOUTS = (
    Layout(TEXT, "plain text"),
    Layout(INSTRUCTION, "Dolly", instruction="instruction", input="context", response="response"),
    Layout(INSTRUCTION, "Alpaca", instruction="instruction", input="input", response="output"),
    Layout(INSTRUCTION, "prompt/completion", instruction="prompt", response="completion"),
    Layout(CHAT, "chat messages", flavour=MESSAGES),
    Layout(CHAT, "ShareGPT", flavour=SHAREGPT),
    Layout(PREFERENCE, "preference pairs"),
)

_FIELDS = ("instruction", "input", "response")
_HOW_TO_SET = ("Set data.format to text, instruction, chat or preference; for instruction rows under other column "
               "names, map them with data.columns (e.g. instruction=question, input=context, response=answer; input "
               "is optional).")


def _describe(layout: Layout) -> str:
    if layout.kind == CHAT:
        f = _FLAVOURS[layout.flavour]
        columns = f"{f.column}: [{{{f.role_key}, {f.content_key}}}]"
    elif layout.kind == INSTRUCTION:
        optional = [f"{layout.input} (optional)"] if layout.input else []
        columns = ", ".join([layout.instruction, *optional, layout.response])
    elif layout.kind == PREFERENCE:
        columns = "prompt (optional), chosen, rejected"
    else:
        columns = "text"
    return f"{layout.name} (format {layout.kind}): {columns}"


def detect_layout(columns: Collection[str], cfg: DataConfig) -> Layout:
    """The layout of rows with these columns; extra columns are ignored. Raises GemmatuneError when no layout or
    more than one matches, or when the forced data.format's columns are missing."""
    found = set(columns)
    listed = ", ".join(map(repr, sorted(found))) or "none"
    if cfg.columns:
        if cfg.format not in ("auto", INSTRUCTION):
            raise GemmatuneError(f"data.columns maps instruction fields, but data.format is {cfg.format!r}; set "
                                 "data.format to instruction (or auto), or remove data.columns.")
        return _mapped_layout(found, cfg.columns, listed)
    candidates = [layout for layout in KNOWN_LAYOUTS if cfg.format in ("auto", layout.kind)]
    matches = [layout for layout in candidates if set(layout.required) <= found]
    if cfg.format == "auto" and any(layout.kind == PREFERENCE for layout in matches):
        # Rows with chosen and rejected are preference pairs even when they carry more: UltraFeedback binarized
        # rows also hold the chosen conversation as "messages" (data.format chat reads that instead).
        matches = [layout for layout in matches if layout.kind == PREFERENCE]
    if len(matches) == 1:
        return matches[0]
    if cfg.format != "auto" and not matches:
        missing = "; or ".join(
            f"{', '.join(map(repr, [c for c in layout.required if c not in found]))} for {layout.name}"
            for layout in candidates)
        raise GemmatuneError(f"data.format is {cfg.format!r} but the rows lack the column(s) {missing} "
                             f"(columns found: {listed}). {_HOW_TO_SET}")
    what = ("match more than one known layout (" + ", ".join(m.name for m in matches) + ")" if matches
            else "match no known layout")
    known = "; ".join(_describe(layout) for layout in KNOWN_LAYOUTS)
    raise GemmatuneError(f"cannot tell the data layout: the columns found ({listed}) {what}. "
                         f"Known layouts: {known}. {_HOW_TO_SET}")


def _mapped_layout(found: set[str], mapping: tuple[tuple[str, str], ...], listed: str) -> Layout:
    """Instruction rows under the user's column names; unmapped fields default to their own names."""
    fields = dict(mapping)
    if len(fields) != len(mapping):
        raise GemmatuneError(f"data.columns maps a field more than once: {mapping}.")
    resolved = {f: fields.get(f, f) for f in _FIELDS}
    if "input" not in fields and "input" not in found:
        resolved["input"] = None  # no input column, and none asked for
    missing = [f"{resolved[f]!r} (for {f})" for f in _FIELDS if resolved[f] is not None and resolved[f] not in found]
    if missing:
        raise GemmatuneError(f"data.columns: the rows lack the column(s) {', '.join(missing)} (columns found: "
                             f"{listed}). Map instruction and response (and optionally input) to existing "
                             "columns; unmapped fields default to their own names.")
    return Layout(INSTRUCTION, "mapped columns", **resolved)


class Formatter:
    """Encodes rows of one layout as Examples (untruncated; see fit())."""

    def __init__(self, cfg: DataConfig, tokenizer: Tokenizer, layout: Layout) -> None:
        self._tok = tokenizer
        self._layout = layout
        self._train_all = cfg.train_on == "all"
        self._prompt_template: str | None = None  # None: instruction rows use the chat template
        if cfg.template != "chat":  # DataConfig checked that it ends with {response}
            self._prompt_template = cfg.template.partition("{response}")[0]

    def encode(self, data: Mapping[str, Any]) -> Example:
        """The row as one Example; raises RowError for a row that cannot be used."""
        kind = self._layout.kind
        if kind == PREFERENCE:
            raise ValueError("a preference row is a pair of examples: encode it with encode_pair")
        if kind == TEXT:
            # Pre-rendered text often starts with <bos>; it would tokenise to a second <bos> after ours.
            text = _get(data, "text", str).removeprefix("<bos>")
            if not text.strip():
                raise RowError(EMPTY_TEXT, "'text' is empty")
            return self._example([(text, True)])
        if kind == CHAT:
            return self._chat(self._messages(data))
        instruction, input_, response = self._instruction_fields(data)
        if self._prompt_template is None:
            user = instruction + "\n\n" + input_ if input_.strip() else instruction
            return self._chat([{"role": "user", "content": user}, {"role": "model", "content": response}])
        if input_.strip() and "{input}" not in self._prompt_template:
            instruction += "\n\n" + input_
        # One pass of plain replacement: user text may hold braces, even "{input}", and is never substituted into.
        prompt = re.sub(r"\{(instruction|input)\}",
                        lambda m: instruction if m[1] == "instruction" else input_, self._prompt_template)
        return self._example([(prompt, False), (response, True)])

    def _instruction_fields(self, data: Mapping[str, Any]) -> tuple[str, str, str]:
        layout = self._layout
        instruction = _get(data, layout.instruction, str)
        input_ = _get(data, layout.input, str, optional=True) if layout.input else ""
        response = _get(data, layout.response, str)
        if not response.strip():
            raise RowError(EMPTY_RESPONSE, f"{layout.response!r} is empty; there is nothing to learn")
        return instruction, input_, response

    def _messages(self, data: Mapping[str, Any]) -> list[dict[str, str]]:
        """The row's conversation as chat_turns messages, each role as written (one of the flavour's roles)."""
        flavour = _FLAVOURS[self._layout.flavour]
        return _read_messages(_get(data, flavour.column, (list, tuple)), flavour.column, flavour)

    def _chat(self, messages: list[dict[str, str]]) -> Example:
        """Roles as the row spells them (the flavour's names; instruction rows use user/model), so that errors
        quote the file."""
        flavour = _FLAVOURS[self._layout.flavour or MESSAGES]
        turns = _turns(messages, flavour, flavour.column)
        if turns[-1][0] == "user":
            raise RowError(ENDS_ON_USER_TURN, "the conversation ends on a user turn, so its last turn has no model "
                           "reply to learn from; end it with a model/assistant message or remove the last user turn")
        return self._example(_turn_parts(turns))

    def encode_pair(self, data: Mapping[str, Any]) -> Pair:
        """A preference row as a Pair (untruncated; see fit_pair()); raises RowError for a row that cannot be
        used. The prompt is tokenised once, so chosen and rejected share its tokens exactly."""
        prompt = data.get("prompt")  # absent or null: the two conversations hold it
        chosen, rejected = _text_or_messages(data, "chosen"), _text_or_messages(data, "rejected")
        if prompt is not None:
            prompt = _text_or_messages(data, "prompt")
        elif isinstance(chosen, str) or isinstance(rejected, str):
            raise RowError(MISSING_FIELD, "the row has no 'prompt' field, which string 'chosen' and 'rejected' "
                           "replies need (or give them as full conversations: lists of messages sharing the prompt)")
        for key, value in (("chosen", chosen), ("rejected", rejected)):
            if isinstance(value, str) and not value.strip():
                raise RowError(EMPTY_RESPONSE, f"{key!r} is empty; there is nothing to compare")
        if self._prompt_template is not None and all(isinstance(v, str) for v in (prompt, chosen, rejected)):
            # The plain template, as instruction rows use it: the prompt is the instruction, replies as written.
            text = re.sub(r"\{(instruction|input)\}", lambda m: prompt if m[1] == "instruction" else "",
                          self._prompt_template)
            return self._pair([(text, False)], [(chosen, True)], [(rejected, True)])

        flavour = _FLAVOURS[_row_flavour(prompt, chosen, rejected)]
        if prompt is None:  # two whole conversations: the prompt is the messages they share
            c_turns, r_turns = (_turns(_read_messages(v, k, flavour), flavour, k)
                                for k, v in (("chosen", chosen), ("rejected", rejected)))
            if c_turns == r_turns:
                raise RowError(SAME_RESPONSE, "'chosen' and 'rejected' are the same conversation; a preference "
                               "needs two different replies")
            for key, turns in (("chosen", c_turns), ("rejected", r_turns)):
                if turns[-1][0] == "user":
                    raise RowError(ENDS_ON_USER_TURN, f"{key!r} ends on a user turn; it must end with the model "
                                   "reply being compared")
            shorter = min(len(c_turns), len(r_turns))
            shared = next((i for i in range(shorter) if c_turns[i] != r_turns[i]), shorter)
            if shared == 0 or c_turns[shared - 1][0] != "user":
                where = ("their first messages differ" if shared == 0 else
                         "one is the beginning of the other" if shared == shorter else
                         f"they first differ at turn {shared + 1}, a user turn")
                raise RowError(NO_SHARED_PROMPT, f"'chosen' and 'rejected' share no prompt: {where}. Without a "
                               "'prompt' field the two conversations must be the same up to the last user turn, "
                               "then differ in the model reply")
            prompt_turns = c_turns[:shared]
            replies = c_turns[shared:], r_turns[shared:]
            for key, reply in zip(("chosen", "rejected"), replies, strict=True):
                if len(reply) != 1:
                    raise RowError(REPLY_NOT_MODEL, f"{key!r} goes on after the model reply to the shared prompt "
                                   f"({len(reply)} turns after it); each conversation must end with its one reply")
        else:  # a prompt, and replies continuing it
            p_msgs = ([{"role": "user", "content": prompt}] if isinstance(prompt, str)
                      else _read_messages(prompt, "prompt", flavour, replies=False))
            prompt_turns = _turns(p_msgs, flavour, "prompt")
            if prompt_turns[-1][0] != "user":
                raise RowError(PROMPT_NOT_USER, "the prompt ends on a model turn; it must end on the user turn "
                               "that 'chosen' and 'rejected' reply to")
            reply_list = []
            for key, value in (("chosen", chosen), ("rejected", rejected)):
                msgs = ([{"role": "assistant", "content": value}] if isinstance(value, str)
                        else _read_messages(value, key, flavour))
                if flavour.roles[msgs[0]["role"]] != "model":
                    # A whole conversation that repeats the prompt first (HuggingFaceH4/ultrafeedback_binarized).
                    turns = _turns(msgs, flavour, key)
                    if turns[:len(prompt_turns)] != prompt_turns:
                        raise RowError(NO_SHARED_PROMPT, f"{key!r} is a whole conversation (it begins with a "
                                       f"{msgs[0]['role']!r} message) but does not begin with the prompt; give "
                                       "only the reply, or the prompt's messages followed by it")
                    reply = turns[len(prompt_turns):]
                    if len(reply) != 1:
                        raise RowError(REPLY_NOT_MODEL, f"{key!r} must continue the prompt with one model reply, "
                                       f"got {len(reply)} turns after it")
                elif len(msgs) != 1:
                    raise RowError(REPLY_NOT_MODEL, f"{key!r} must be one model/assistant message replying to the "
                                   f"prompt, got {len(msgs)} messages")
                else:
                    reply = _turns(p_msgs + msgs, flavour, f"prompt + {key}")[len(prompt_turns):]
                reply_list.append(reply)
            replies = tuple(reply_list)
        if replies[0] == replies[1]:
            raise RowError(SAME_RESPONSE, "'chosen' and 'rejected' are the same reply; a preference needs two "
                           "different replies")
        head = [(text, False) for text, _ in _turn_parts(prompt_turns)] + [("<start_of_turn>model\n", False)]
        # Each reply's parts without its "<start_of_turn>model\n", which ends the prompt.
        return self._pair(head, _turn_parts(replies[0])[1:], _turn_parts(replies[1])[1:])

    def _pair(self, prompt: list[tuple[str, bool]], chosen: list[tuple[str, bool]],
              rejected: list[tuple[str, bool]]) -> Pair:
        """<bos> + prompt + each reply + <eos>: the prompt never trained, a reply's parts as they say (train_on
        does not apply to preference data)."""
        head, _ = self._tokens(prompt, False)
        examples = []
        for parts in (chosen, rejected):
            tokens, mask = self._tokens(parts, False)
            examples.append(Example(np.array([self._tok.bos_id, *head, *tokens, self._tok.eos_id], np.int32),
                                    np.array([False] * (1 + len(head)) + mask + [True], bool)))
        if np.array_equal(examples[0].tokens, examples[1].tokens):
            raise RowError(SAME_RESPONSE, "'chosen' and 'rejected' are the same reply; a preference needs two "
                           "different replies")
        return Pair(examples[0], examples[1], 1 + len(head))

    def _example(self, parts: Sequence[tuple[str, bool]]) -> Example:
        """<bos> + the parts' tokens + <eos>; a part's tokens are trained if it is (or train_on is all)."""
        tokens, mask = self._tokens(parts, self._train_all)
        return Example(np.array([self._tok.bos_id, *tokens, self._tok.eos_id], np.int32),
                       np.array([False, *mask, True], bool))

    def _tokens(self, parts: Sequence[tuple[str, bool]], train_all: bool) -> tuple[list[int], list[bool]]:
        """The parts' tokens, and whether each is trained (its part is, or train_all)."""
        tokens: list[int] = []
        mask: list[bool] = []
        for text, trained in parts:
            try:  # JSON can escape a lone UTF-16 surrogate ("\\ud800"), which no tokenizer accepts
                text.encode("utf-8")
            except UnicodeEncodeError as e:
                raise RowError(INVALID_TEXT, f"the row's text holds {text[e.start:e.end]!r}, a lone UTF-16 surrogate "
                               "(from a JSON escape such as \\ud800) that is not a character; fix the escape") from None
            ids = self._tok.encode(text)
            if self._tok.bos_id in ids:  # the text spells "<bos>", which the tokenizer maps to the <bos> id
                raise RowError(BOS_IN_TEXT, "the row's text contains '<bos>', which would put a second <bos> inside "
                               "the example; remove it (gemmatune adds the one <bos> itself)")
            tokens += ids
            mask += [trained or train_all] * len(ids)
        return tokens, mask


def _turns(messages: list[dict[str, str]], flavour: _Flavour, column: str) -> list[tuple[str, str]]:
    """chat_turns, its error a RowError: checks the order of the roles and folds a system message."""
    try:
        return chat_turns(messages, flavour.roles, column)
    except GemmatuneError as e:
        raise RowError(ROLES_OUT_OF_ORDER, str(e)) from None


def _turn_parts(turns: Sequence[tuple[str, str]]) -> list[tuple[str, bool]]:
    """The turns as (text, trained) parts in the Gemma chat template: each model turn's content and <end_of_turn>
    trained. Contents are as the template writes them (trimmed, a system message folded in)."""
    parts: list[tuple[str, bool]] = []
    for role, content in turns:
        if role == "user":
            parts.append((f"<start_of_turn>user\n{content}<end_of_turn>\n", False))
        else:
            parts += [("<start_of_turn>model\n", False), (content + "<end_of_turn>", True), ("\n", False)]
    # Each part is tokenised on its own to know which tokens are trained. That equals tokenising the rendered
    # conversation whole because every boundary falls at a special token or right after "\n", and contents are
    # trimmed, so no token spans a boundary as long as "\n" never merges with the following non-space text (true of
    # Gemma's vocabularies, where "\n" runs are separate pieces; tested for the embedded tokenizer).
    return parts


def _read_messages(conversation: Sequence[Any], column: str, flavour: _Flavour,
                   replies: bool = True) -> list[dict[str, str]]:
    """A conversation as chat_turns messages, each role as written (one of the flavour's roles). With `replies`, an
    empty model turn is an error (there is nothing to learn from it); in a preference prompt it is only context."""
    if not conversation:
        raise RowError(EMPTY_CONVERSATION, f"{column!r} is an empty list")
    messages = []
    for i, message in enumerate(conversation):
        where = f"{column}[{i}]"
        if not isinstance(message, Mapping):
            raise RowError(WRONG_TYPE, f"{where} must be an object, got {_type_name(message)}")
        role = _get(message, flavour.role_key, str, where)
        if role not in flavour.roles:
            raise RowError(UNKNOWN_ROLE, f"{where}: unknown {flavour.role_key} {role!r}; accepted: "
                           + ", ".join(map(repr, flavour.roles)))
        content = _get(message, flavour.content_key, str, where)
        if replies and flavour.roles[role] == "model" and not content.strip():
            raise RowError(EMPTY_MODEL_TURN, f"{where}: the model turn is empty; there is nothing to learn")
        messages.append({"role": role, "content": content})
    return messages


def _text_or_messages(data: Mapping[str, Any], key: str) -> str | Sequence[Any]:
    """A preference row's field: a string or a list of messages."""
    if key not in data:
        keys = ", ".join(map(repr, data)) or "none"
        raise RowError(MISSING_FIELD, f"the row has no {key!r} field (its fields: {keys})")
    value = data[key]
    if not isinstance(value, str | list | tuple):
        raise RowError(WRONG_TYPE, f"{key} must be a string or a list of messages, got {_type_name(value)}")
    return value


def _row_flavour(*values: Any) -> str:
    """A preference row's messages are ShareGPT's {from, value} if its first message says so, else {role, content}."""
    for value in values:
        if isinstance(value, list | tuple) and value and isinstance(value[0], Mapping):
            return SHAREGPT if "from" in value[0] and "role" not in value[0] else MESSAGES
    return MESSAGES


def _get(row: Mapping[str, Any], key: str, want: type | tuple[type, ...], where: str = "",
         optional: bool = False) -> Any:
    """row[key] checked to be a `want`; `where` names a nested object (e.g. "messages[2]"). An optional field
    that is absent or null reads as ""."""
    value = row.get(key)
    if value is None and optional:
        return ""
    if key not in row:
        keys = ", ".join(map(repr, row)) or "none"
        raise RowError(MISSING_FIELD, f"{where or 'the row'} has no {key!r} field (its fields: {keys})")
    if not isinstance(value, want):
        name = _JSON_TYPES[want if isinstance(want, type) else want[0]]
        raise RowError(WRONG_TYPE, f"{where + '.' if where else ''}{key} must be a {name}, "
                       f"got {_type_name(value)}")
    return value


# JSON's names for the types, as users see their data.
_JSON_TYPES = {str: "string", bool: "boolean", int: "number", float: "number", list: "list", tuple: "list",
               dict: "object", type(None): "null"}


def _type_name(value: Any) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)


def fit(example: Example, max_seq_len: int, overflow: str) -> tuple[Example | None, str | None]:
    """The example fitted to max_seq_len input positions, or (None, reason) when it is dropped.

    Truncation keeps the first max_seq_len + 1 tokens: the prompt's start is kept and the <eos> is lost, so a cut
    example never learns to stop where it was cut. An example left with no trained token is dropped (it would add
    nothing but a zero to the loss's denominator)."""
    assert overflow in ("truncate", "drop"), overflow
    if example.slots > max_seq_len:
        if overflow == "drop":
            return None, TOO_LONG
        n = max_seq_len + 1
        example = Example(example.tokens[:n], example.mask[:n], truncated=True)
    if example.trained == 0:
        return None, NO_TRAINED_TOKENS
    return example, None


def fit_pair(pair: Pair, max_seq_len: int, overflow: str) -> tuple[Pair | None, str | None]:
    """The pair fitted to one packed row (chosen.slots + rejected.slots <= max_seq_len), or (None, reason) when it
    is dropped: the two are always trained together.

    Truncation cuts the replies from their ends and keeps the whole prompt: a reply that takes at most half the row
    is kept whole and the other gets the rest, otherwise each gets half. A cut reply loses its <eos> as in fit(). A
    pair whose prompt leaves a cut reply no token is dropped (PROMPT_TOO_LONG), as is one where either side has no
    trained token."""
    assert overflow in ("truncate", "drop"), overflow
    chosen, rejected = pair.chosen, pair.rejected
    if chosen.slots + rejected.slots > max_seq_len:
        if overflow == "drop":
            return None, TOO_LONG
        half = max_seq_len // 2
        if chosen.slots <= half:
            limits = (chosen.slots, max_seq_len - chosen.slots)
        elif rejected.slots <= max_seq_len - half:
            limits = (max_seq_len - rejected.slots, rejected.slots)
        else:
            limits = (half, max_seq_len - half)
        cut = []
        for example, limit in zip((chosen, rejected), limits, strict=True):
            if example.slots > limit:
                if pair.prompt > limit:  # not one reply token would be left as a target
                    return None, PROMPT_TOO_LONG
                example = Example(example.tokens[:limit + 1], example.mask[:limit + 1], truncated=True)
            cut.append(example)
        chosen, rejected = cut
    if chosen.trained == 0 or rejected.trained == 0:
        return None, NO_TRAINED_TOKENS
    return Pair(chosen, rejected, pair.prompt), None
