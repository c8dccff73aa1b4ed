"""`gemmatune eval`: the loss against transformers' on the same tokens and masks, an adapter against its merged weights
(gemmatune's and PEFT's format alike), batched answers against `generate` one prompt at a time, metrics against
references whose answers are known, the JSON, the files of --output, and the errors. One evaluation (through the
command line) serves most tests: a small Gemma 2 with strong weights, 4 instruction rows, three runs."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import SMALL, SMALL3, hf_model
from gemmatune import lora
from gemmatune.checkpoint import save_adapter
from gemmatune.cli import main
from gemmatune.config import DEFAULT_MODEL, PRESETS, DataConfig, LoraConfig
from gemmatune.convert.hf import save_hf
from gemmatune.convert.peft import save_peft
from gemmatune.data.pipeline import prepare
from gemmatune.evaluation import format_table, loss_of, split_prompt
from gemmatune.generate import generate
from gemmatune.scoring import f1
from gemmatune.tokenizer import load_tokenizer

CFG = dataclasses.replace(SMALL, vocab_size=4096)  # the embedded tokenizer's vocabulary
QUESTIONS = ["What is two plus two?", "Name a colour of the sky on a long and sunny summer afternoon, please.",
             "Why?", "Where is the capital of France and what is it called?"]
OTHER = {2: "Because the rules say so.", 3: "Paris is the capital of France."}
NEW = 6  # --max-new-tokens


def rows_file(path: Path, responses: list[str]) -> Path:
    path.write_text("".join(json.dumps({"instruction": q, "response": r}) + "\n"
                            for q, r in zip(QUESTIONS, responses)), encoding="utf-8")
    return path


def chat_prompt(tok, question: str) -> list[int]:
    return tok.encode_chat([{"role": "user", "content": question}], add_generation_prompt=True)


def alone(params, tok, prompt: list[int]) -> str:
    """The greedy answer to one prompt, generated on its own."""
    [ids] = generate(params, CFG, [prompt], max_new_tokens=NEW, stop_ids=(tok.eos_id, tok.end_of_turn_id))
    return tok.decode(ids)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, small_params):
    """The checkpoint, an adapter (gemmatune's and its PEFT export), the data: rows 0 and 1 answered by what the base
    model itself answers greedily (so their exact match is known to be 1), rows 2 and 3 by other text."""
    d = tmp_path_factory.mktemp("eval")
    # The session's small Gemma 2 with its embedding grown to the tokenizer's 4096 rows (like the first 256).
    embed = np.asarray(small_params["embed"])
    rows = np.random.default_rng(0).normal(0, embed.std(), (CFG.vocab_size - len(embed), embed.shape[1]))
    params = {**small_params, "embed": jnp.asarray(np.concatenate([embed, rows]), jnp.float32)}
    save_hf(d / "base", CFG, params, tokenizer_dir=DEFAULT_MODEL)
    tok = load_tokenizer(d / "base")
    lora_cfg = LoraConfig(rank=4, alpha=8.0, targets=("q", "v", "down"))
    adapters = lora.init_adapters(CFG, lora_cfg, jax.random.key(1))
    rng = np.random.default_rng(2)  # B nonzero: the adapter changes the model
    adapters = {n: {"a": np.asarray(ab["a"]), "b": rng.normal(0, 0.3, ab["b"].shape).astype(np.float32)}
                for n, ab in adapters.items()}
    save_adapter(d / "adapter", adapters, lora_cfg, CFG, str(d / "base"))
    save_peft(d / "peft", adapters, lora_cfg, CFG, str(d / "base"))
    own = [alone(params, tok, chat_prompt(tok, q)).strip() for q in QUESTIONS[:2]]
    assert all(own), own  # something to compare with
    data = rows_file(d / "rows.jsonl", own + [OTHER[2], OTHER[3]])
    return d, params, adapters, lora_cfg, tok, data


@pytest.fixture(scope="module")
def evaluated(setup):
    """`gemmatune eval --generate --json --output` with the base, the adapter and its PEFT export: (stdout, output)."""
    d, *_, data = setup
    out, stdout = d / "report", io.StringIO()
    with contextlib.redirect_stdout(stdout):
        rc = main(["eval", "--model", str(d / "base"), "--adapter", "none", "--adapter", str(d / "adapter"),
                   "--adapter", str(d / "peft"), "--data", str(data), "--max-seq-len", "64", "--dtype", "float32",
                   "--generate", "--max-new-tokens", str(NEW), "--batch-size", "3", "--json", "--output", str(out)])
    assert rc == 0
    return json.loads(stdout.getvalue()), out


def predictions(out: Path, run: int) -> list[dict]:
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    return [r for r in rows if r["run"] == run]


def hf_loss(model, examples) -> float:
    """transformers' mean cross-entropy over the trained targets of every example: sum / count."""
    import torch

    total = count = 0.0
    for e in examples:
        with torch.no_grad():
            logits = model(torch.from_numpy(e.tokens[None].astype(np.int64))).logits[0].double()  # [n, V]
        logp = torch.log_softmax(logits, dim=-1).numpy()
        nll = -logp[np.arange(len(e.tokens) - 1), e.tokens[1:]]  # [n - 1]: position t predicts token t + 1
        total += float(nll[e.mask[1:]].sum())
        count += int(e.mask[1:].sum())
    return total / count


def examples(data: Path, tok, tmp: Path, max_seq_len: int = 64):
    prepared = prepare(DataConfig(paths=(str(data),), max_seq_len=max_seq_len), tok, tmp)
    return prepared.train.store.get_many(prepared.train.indices)


def test_json_has_one_object_per_run(evaluated, setup):
    result, _ = evaluated
    d = setup[0]
    assert [r["adapter"] for r in result["runs"]] == ["none", str(d / "adapter"), str(d / "peft")]
    keys = {"adapter", "loss", "perplexity", "examples", "trained_tokens", "exact_match", "contains", "f1",
            "rouge_l", "generate_s", "examples_per_s"}
    for run in result["runs"]:
        assert set(run) == keys and run["examples"] == 4
        assert run["perplexity"] == pytest.approx(math.exp(run["loss"]), rel=1e-12)


def test_loss_equals_transformers_and_the_adapter_equals_its_merge(evaluated, setup, tmp_path):
    result, _ = evaluated
    _, params, adapters, lora_cfg, tok, data = setup
    ex = examples(data, tok, tmp_path)
    base, adapter, peft = result["runs"]
    assert base["trained_tokens"] == sum(int(e.mask.sum()) for e in ex)
    assert base["loss"] == pytest.approx(hf_loss(hf_model(CFG, params), ex), abs=1e-4)
    merged = lora.merge(params, jax.tree.map(jnp.asarray, adapters), lora_cfg)
    assert adapter["loss"] == pytest.approx(hf_loss(hf_model(CFG, merged), ex), abs=1e-4)
    assert abs(adapter["loss"] - base["loss"]) > 1e-2  # the adapter matters
    assert peft["loss"] == pytest.approx(adapter["loss"], abs=1e-6)  # the PEFT export is the same adapter


def test_answers_are_generate_alone_and_metrics_are_known(evaluated, setup):
    result, out = evaluated
    _, params, adapters, lora_cfg, tok, data = setup
    responses = [json.loads(line)["response"] for line in data.read_text().splitlines()]
    merged = lora.merge(params, jax.tree.map(jnp.asarray, adapters), lora_cfg)
    for run, weights in ((0, params), (1, merged)):
        rows = predictions(out, run)
        assert [r["index"] for r in rows] == [0, 1, 2, 3]
        for q, response, row in zip(QUESTIONS, responses, rows):
            prompt = chat_prompt(tok, q)
            assert row["prompt"] == tok.decode(prompt[1:], skip_special_tokens=False)  # what the model was asked
            assert row["reference"] == response
            # batched (3 then 1, left-padded by length) equals one prompt at a time
            assert row["prediction"] == alone(weights, tok, prompt)
    base = predictions(out, 0)
    # rows 0 and 1 are the base's own answers: exact (so contained, F1 1); rows 2 and 3 are not its answers
    assert [r["exact_match"] for r in base] == [1.0, 1.0, 0.0, 0.0]
    assert [r["contains"] for r in base] == [1.0, 1.0, 0.0, 0.0]
    assert [r["f1"] for r in base[:2]] == [1.0, 1.0]
    assert result["runs"][0]["exact_match"] == 0.5 and result["runs"][0]["contains"] == 0.5
    assert result["runs"][0]["f1"] == pytest.approx((2 + f1(base[2]["prediction"], OTHER[2])
                                                     + f1(base[3]["prediction"], OTHER[3])) / 4)
    assert [r["prediction"] for r in predictions(out, 2)] == [r["prediction"] for r in predictions(out, 1)]


def test_output_directory(evaluated):
    import html

    result, out = evaluated
    assert sorted(p.name for p in out.iterdir()) == ["predictions.jsonl", "report.html", "results.json"]
    assert not list(out.parent.glob(".report.*"))  # no staging leftovers
    assert json.loads((out / "results.json").read_text()) == result
    page = (out / "report.html").read_text()
    assert "<table>" in page and "data:image/png;base64," in page
    assert all(html.escape(run["adapter"]) in page for run in result["runs"])
    base, adapted = predictions(out, 0), predictions(out, 1)
    changed = [b for a, b in zip(base, adapted) if a["prediction"] != b["prediction"]]
    assert changed, "the adapter changes no answer: the diff would be empty"
    assert f"{len(changed)} of 4 answers changed" in page and html.escape(changed[0]["prediction"]) in page


def test_a_non_empty_output_needs_force(evaluated, setup, capsys):
    _, out = evaluated
    d, *_, data = setup
    assert main(["eval", "--model", str(d / "base"), "--data", str(data), "--output", str(out)]) == 2
    assert "not empty; pass --force" in capsys.readouterr().err


def test_table_has_a_row_per_run():
    runs = [{"adapter": "none", "loss": 2.0, "perplexity": math.exp(2.0), "examples": 3, "trained_tokens": 9},
            {"adapter": "runs/a/adapter", "loss": 1.5, "perplexity": math.exp(1.5), "examples": 3, "trained_tokens": 9}]
    lines = format_table(runs).splitlines()
    assert lines[0].split() == ["adapter", "examples", "loss", "ppl"]
    assert lines[2].split() == ["runs/a/adapter", "3", "1.5000", f"{math.exp(1.5):.2f}"]


def test_split_prompt_takes_the_last_trained_span():
    tokens = np.array([2, 10, 11, 12, 13, 107, 5, 1])  # <bos> prompt prompt | answer answer <eot> | \n | <eos>
    mask = np.array([0, 0, 0, 1, 1, 1, 0, 1], bool)
    assert split_prompt(tokens, mask, (1, 107)) == (3, 5)
    assert split_prompt(tokens, np.array([0, 1, 1, 1, 1, 1, 1, 1], bool), (1, 107)) == (1, 7)  # no untrained prompt
    assert split_prompt(tokens, np.array([0, 0, 0, 0, 0, 0, 0, 1], bool), (1, 107)) is None  # only <eos> trained


def test_gemma3_packed_loss_equals_transformers(small3_params, small3_hf, tmp_path):
    """The loss function of `gemmatune eval` on a Gemma 3, with examples packed several to a row: the same per-token
    mean as transformers' on each example alone."""
    from gemmatune.data.loader import ExampleStore, StoreWriter
    from gemmatune.data.records import Example

    rng = np.random.default_rng(0)
    with StoreWriter(tmp_path / "store") as w:
        for n in (9, 23, 14, 30, 5):  # prompt tokens untrained, the rest trained
            tokens = np.concatenate([[2], rng.integers(3, SMALL3.vocab_size, n - 1)]).astype(np.int32)
            w.append(Example(tokens, np.arange(n) >= n // 2))
    store = ExampleStore(tmp_path / "store")
    ex = store.get_many(range(len(store)))
    dcfg = DataConfig(paths=("unused",), max_seq_len=48)  # 81 slots in rows of 48: packed, some rows shared
    loss, tokens = loss_of(small3_params, SMALL3, None, store, np.arange(len(store)), dcfg, pad_id=0, batch_size=2)
    assert tokens == sum(int(e.mask.sum()) for e in ex)
    assert loss == pytest.approx(hf_loss(small3_hf, ex), abs=1e-4)


@pytest.fixture(scope="module")
def foreign_adapter(tmp_path_factory):
    """An adapter of the embedded tiny model (hidden size 128): it does not fit the small test model (64)."""
    lora_cfg = LoraConfig(rank=2)
    adapters = jax.tree.map(np.asarray, lora.init_adapters(PRESETS["tiny"], lora_cfg, jax.random.key(0)))
    return save_adapter(tmp_path_factory.mktemp("foreign") / "adapter", adapters, lora_cfg, PRESETS["tiny"], "tiny")


@pytest.mark.parametrize("case, want", [
    ("missing", "nowhere.jsonl"),
    ("empty", "empty file"),
    ("metric", "--metric bleu: unknown metric; choose among exact_match, contains, f1, rouge_l"),
    ("adapter", "hidden"),
    ("text", "--generate needs instruction or chat rows"),
    ("no validation", "eval_generate: answers validation examples, but there are none"),
])
def test_errors_are_one_message(setup, foreign_adapter, tmp_path, capsys, case, want):
    d = setup[0]
    base = ["eval", "--model", str(d / "base"), "--data"]
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "text.jsonl").write_text('{"text": "plain text is trained everywhere"}\n')
    argv = {"missing": [*base, str(tmp_path / "nowhere.jsonl")],
            "empty": [*base, str(tmp_path / "empty.jsonl")],
            "metric": [*base, str(setup[-1]), "--generate", "--metric", "f1,bleu"],
            "adapter": [*base, str(setup[-1]), "--adapter", "none", "--adapter", str(foreign_adapter)],
            "text": [*base, str(tmp_path / "text.jsonl"), "--generate"],
            "no validation": ["train", "--data", str(setup[-1]), "--eval-generate"]}[case]
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("error: ") and want in err and err.count("\n") == 1, err


def test_eval_takes_the_data_options_of_train(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    shown = "".join(capsys.readouterr().out.split())
    for option in ("--seq-len,--max-seq-len,--data.max-seq-len", "--template,--data.template", "--val-fraction",
                   "--adapterDIR", "--metricNAME", "--dtype{auto,float32,bfloat16}"):
        assert option in shown, option
