"""Tests for r1jax.data: tasks and verifiers, splits, corpus, tokenizer, templates, loaders,
batching. Host-only (no JAX); the toy tokenizer is trained once per module on a small corpus."""

import ast
import collections
import json
import operator
import re
from fractions import Fraction

import numpy as np
import pytest

import r1jax.data as data
from r1jax.data import arithmetic, countdown, tasks
from r1jax.data import tokenizer as toktool

# --------------------------------------------------------------------------------------------
# Independent references
# --------------------------------------------------------------------------------------------

_AST_OPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
}


def ref_eval(expr: str) -> tuple[Fraction, list[int]]:
    """Evaluate + - * / integer expressions with Python's own parser, exactly."""
    used = []

    def walk(node):
        if isinstance(node, ast.BinOp) and type(node.op) in _AST_OPS:
            return _AST_OPS[type(node.op)](walk(node.left), walk(node.right))
        if isinstance(node, ast.Constant) and type(node.value) is int:
            used.append(node.value)
            return Fraction(node.value)
        raise AssertionError(f"unexpected node {ast.dump(node)}")

    return walk(ast.parse(expr, mode="eval").body), used


def problem_key(row):
    meta = row["meta"]
    if row["task"] == "arithmetic":
        a, b = meta["operands"]
        return (meta["op"], *(sorted((a, b)) if meta["op"] in "+*" else (a, b)))
    return (tuple(sorted(meta["numbers"])), meta["target"])


# --------------------------------------------------------------------------------------------
# Tasks
# --------------------------------------------------------------------------------------------

ARITH_KNOBS = [
    dict(ops=("+",), max_digits=5),
    dict(ops=("-",), max_digits=5),
    dict(ops=("-",), max_digits=3, allow_negative=True),
    dict(ops=("*",), max_digits=4),
    dict(ops=("*",), max_digits=3, max_multiplier_digits=3),
]


@pytest.mark.parametrize(
    "name,knobs", [("arithmetic", dict(ops=("+", "-", "*"))), ("countdown", {})]
)
def test_make_dataset_is_deterministic_by_seed(name, knobs):
    task = data.make_task(name, **knobs)
    a = data.make_dataset(task, 40, seed=3)
    assert a == data.make_dataset(task, 40, seed=3)
    assert a != data.make_dataset(task, 40, seed=4)
    assert a != data.make_dataset(task, 40, seed=3, stream="other")
    assert set(a[0]) == {"prompt", "solution", "task", "steps", "terse", "meta"}


@pytest.mark.parametrize("knobs", ARITH_KNOBS)
def test_arithmetic_solutions_and_written_steps_are_exact(knobs):
    rows = data.make_dataset(data.make_task("arithmetic", **knobs), 60, seed=0)
    line_re = re.compile(
        r"^([a-z-]+|column \d+): (\d+) ([-+*]) (\d+) ([-+]) (\d+) = (-?\d+), "
        r"write (\d) (carry|borrow) (\d+)\.$"
    )
    for row in rows:
        a, op, b = re.fullmatch(r"What is (\d+) ([-+*]) (\d+)\?", row["prompt"]).groups()
        a, b = int(a), int(b)
        want = {"+": a + b, "-": a - b, "*": a * b}[op]
        if op == "-" and not knobs.get("allow_negative"):
            assert want >= 0
        assert row["solution"] == str(want)
        assert row["terse"] == f"{a} {op} {b} = {want}"
        assert row["steps"].splitlines()[-1].endswith(f"= {want}.")
        written = []
        for line in row["steps"].splitlines():
            m = line_re.match(line)
            if m is None:
                continue
            x, o1, y, o2, z, value, digit, kind, carry = m.groups()[1:]
            x, y, z, value = int(x), int(y), int(z), int(value)
            got = {"+": x + y, "-": x - y, "*": x * y}[o1]
            got = got + z if o2 == "+" else got - z
            assert got == value, line
            assert int(digit) == value % 10, line
            assert int(carry) == (value // 10 if kind == "carry" else int(value < 0)), line
            written.append(digit)
        if op == "+" or (op == "*" and b < 10):
            # The written digits read from the last column back (after a final carry) are
            # the answer.
            final = re.search(r"write the carry (\d+)\.", row["steps"])
            number = (final.group(1) if final else "") + "".join(reversed(written))
            assert int(number) == want
        if op == "-" and want >= 0:
            assert int("".join(reversed(written))) == want
        assert data.verify("arithmetic", row["solution"], row)
        assert not data.verify("arithmetic", str(want + 1), row)
        assert not data.verify("arithmetic", str(want - 1), row)


def test_arithmetic_verifier_exact_and_hostile():
    row = {"solution": "1234", "task": "arithmetic"}
    good = ["1234", " 1234 ", "1234.", "+1234", "1,234", "\n1234\n", "1234" + " " * 10_000]
    bad = [
        "",
        "12 34",
        "1,23,4",
        "12345",
        "1234.0",
        "1e3",
        "0x4D2",
        "1234abc",
        "١٢٣٤",
        "1234\n1234",
        "one thousand",
        "-1234",
        "9" * 100_000,
        "(" * 10_000,
        "\x00" * 50,
    ]
    for s in good:
        assert data.verify("arithmetic", s, row), s
    for s in bad:
        assert not data.verify("arithmetic", s, row), s[:40]
    for not_a_string in (None, 1234, ["1234"], b"1234"):
        assert not data.verify("arithmetic", not_a_string, row)
    assert data.verify("arithmetic", "-7", {"solution": "-7"})
    with pytest.raises(ValueError, match="unknown task"):
        data.verify("sudoku", "1", row)


def test_countdown_rows_solve_their_problem_by_an_independent_evaluator():
    for knobs in (
        {},
        dict(min_numbers=4, max_numbers=5, max_value=99, max_target=200),
        dict(use_all=False),
    ):
        task = data.make_task("countdown", **knobs)
        for row in data.make_dataset(task, 50, seed=1):
            meta = row["meta"]
            shown = [
                int(x) for x in re.search(r"\[([\d, ]+)\]", row["prompt"]).group(1).split(", ")
            ]
            assert shown == meta["numbers"]
            assert str(meta["target"]) in row["prompt"]
            value, used = ref_eval(row["solution"])
            assert value == meta["target"]
            have, want = collections.Counter(used), collections.Counter(shown)
            assert have == want if task.use_all else not have - want
            assert data.verify("countdown", row["solution"], row)
            assert data.verify("countdown", row["terse"], row)
            # Each written step is true arithmetic.
            for step in row["steps"].splitlines()[:-1]:
                lhs, rhs = step.rstrip(".").split(" = ")
                assert ref_eval(lhs)[0] == int(rhs), step


def _cd_row(numbers, target, use_all=True):
    return {
        "task": "countdown",
        "solution": "",
        "meta": {"numbers": numbers, "target": target, "use_all": use_all},
    }


def test_countdown_verifier_rules_and_hostile_strings():
    row = _cd_row([3, 25, 5, 75], 13)
    good = [
        "(75 - 25) / 5 + 3",
        "(75-25)/5+3 = 13",
        "(75 \u2212 25) \u00f7 5 + 3",
        "3 + (75 - 25) / 5",
        " ((75 - 25) / 5) + 3 ",
        "(75 - 25) / 5 + 3.",
        "(75 - 25) / 5 + 3" + " " * 10_000,
    ]
    bad = [
        "(75 - 25) / 5 + 3 = 14",  # wrong stated result
        "(75 - 25) / 5",  # 3 unused
        "(75 - 25) / 5 + 3 + 0",  # 0 not given
        "(75 - 25) / 5 + 3 + 3 - 3",  # 3 used three times
        "75 / (25 - 25) + 5 + 3",  # division by zero
        "13",
        "-3 + 16",
        "2**3",
        "(75 - 25) / 5 + 3 = 13 = 13",
        "(75 - 25 / 5 + 3",
        "(75 - 25) / 5 + 3)",
        "__import__('os').system('true')",
        "75 - 25; 5 + 3",
        "1.5 + 11.5",
        "(" * 5000 + "13" + ")" * 5000,
        "1" * 100_000,
        "",
        "   ",
        "0x0D",
        "\x00",
        "(75 - 25) / 5 + 3" + " + 0" * 100,
    ]
    for s in good:
        assert data.verify("countdown", s, row), s
    for s in bad:
        assert not data.verify("countdown", s, row), s[:40]
    # Deep but short nesting is refused by the depth limit, not by recursion errors.
    assert not data.verify("countdown", "(" * 100 + "1" + ")" * 100, _cd_row([1], 1))
    # Exact fractions in intermediates are fine.
    assert data.verify("countdown", "6 / (1 - 3 / 4)", _cd_row([1, 3, 4, 6], 24))
    # The number rule: exactly once vs at most once.
    assert not data.verify("countdown", "10 + 3", _cd_row([2, 3, 4, 10], 13, use_all=True))
    assert data.verify("countdown", "10 + 3", _cd_row([2, 3, 4, 10], 13, use_all=False))
    assert not data.verify("countdown", "10 + 3", _cd_row([2, 4, 10], 13, use_all=False))
    assert not data.verify("countdown", "5 + 5 + 3", _cd_row([5, 3, 10], 13, use_all=False))
    assert countdown.evaluate_expression("2 * (3 + 4) - 10 / 4") == (
        Fraction(23, 2),
        [2, 3, 4, 10, 4],
    )


def test_train_and_eval_splits_are_disjoint():
    small = data.make_task("arithmetic", ops=("+", "*"), max_digits=2)
    for task, n_train, n_eval in ((small, 400, 60), (data.make_task("countdown"), 300, 60)):
        train = data.make_dataset(task, n_train, seed=0, split="train")
        evals = data.make_dataset(task, n_eval, seed=0, split="eval")
        train_keys, eval_keys = set(map(problem_key, train)), set(map(problem_key, evals))
        assert len(eval_keys) == n_eval  # unique by default
        assert not train_keys & eval_keys
        # Another seed of the train split still never reaches an eval problem.
        more = data.make_dataset(task, n_train, seed=9, split="train", unique=False)
        assert not set(map(problem_key, more)) & eval_keys
    # Single-digit problems are never held out: every column addition in the training texts
    # states them ("8 + 9 + 0 = 17"), scores of times in the pretraining corpus. Nor does a text
    # stating one give a held-out answer away (rejection sampling dropped such traces, and
    # cold-start chains were drawn again, for problems no eval set holds).
    evals = data.make_dataset(small, 200, seed=0, split="eval")
    assert all(max(r["meta"]["operands"]) >= 10 for r in evals)
    facts = [arithmetic.problem_key(a, "+", b) for a in range(10) for b in range(10)]
    assert any(data.split_of(k, 0.1) == "eval" for k in facts)  # (by their hash, some would be)
    assert tasks.all_train(facts) and not any(map(arithmetic.key_can_hold_out, facts))
    assert arithmetic.key_can_hold_out("arithmetic|12+3") and arithmetic.key_can_hold_out("x|1")
    train = data.make_dataset(small, 400, seed=0, split="train")
    assert any(max(r["meta"]["operands"]) < 10 for r in train)  # (they are drawn, for training)
    with pytest.raises(ValueError, match=r"distinct eval problems .* never held out"):
        data.make_dataset(
            data.make_task("arithmetic", ops=("+",), max_digits=1), 1, seed=0, split="eval"
        )


def test_task_knob_validation():
    with pytest.raises(ValueError, match="unknown task"):
        data.make_task("chess")
    with pytest.raises(ValueError, match="ops"):
        data.make_task("arithmetic", ops=("/",))
    with pytest.raises(ValueError, match="min_digits"):
        data.make_task("arithmetic", min_digits=3, max_digits=2)
    with pytest.raises(ValueError, match="min_numbers"):
        data.make_task("countdown", min_numbers=1)
    with pytest.raises(ValueError, match="split"):
        data.make_dataset("countdown", 1, seed=0, split="test")


# --------------------------------------------------------------------------------------------
# Corpus and cold start
# --------------------------------------------------------------------------------------------


def test_pretrain_corpus_has_no_tags_mixes_styles_and_excludes_eval_problems():
    docs = data.pretrain_corpus(300, seed=0)
    assert docs == data.pretrain_corpus(300, seed=0)
    assert len(docs) == 300
    text = "\n".join(docs)
    for tag in ("<think>", "</think>", "<answer>", "</answer>"):
        assert tag not in text
    assert "The answer is" in text and "\nA: " in text  # step by step and terse
    assert "User: " in text and "\nAssistant: " in text and "? Assistant: " in text
    assert re.search(r"tens: \d \+ \d \+ \d = \d+, write", text)  # column steps
    evals = [
        r for t in data.default_tasks() for r in data.make_dataset(t, 100, seed=0, split="eval")
    ]
    assert not [r["prompt"] for r in evals if r["prompt"] in text]
    only_terse = data.pretrain_corpus(20, seed=0, mix={"terse": 1.0})
    assert not any("Solution:" in d or "User:" in d for d in only_terse)
    with pytest.raises(ValueError, match="mix"):
        data.pretrain_corpus(2, seed=0, mix={"poetry": 1.0})


def test_format_documents_copy_the_instructions_tags_and_copy_documents_repeat():
    for doc in data.pretrain_corpus(40, seed=1, mix={"format": 1.0}):
        tags = re.findall(r"<(/?)(\w+)>", doc)
        names = {n for _, n in tags}
        assert len(names) == 2 and not names & {"think", "answer"}, doc[:200]
        # Every reply opens and closes the instruction's first tag, then its second.
        replies = re.findall(r"<(\w+)> .*? </(\w+)> <(\w+)> .*? </(\w+)>$", doc, re.M | re.S)
        assert replies and all(a == b and c == d and a != c for a, b, c, d in replies)
    pieces = ["ab", " cd", "<", "think", ">", "x"]  # can spell a tag; such strings are redrawn
    for doc in data.pretrain_corpus(60, seed=2, mix={"copy": 1.0}, copy_pieces=pieces):
        assert doc.startswith("Repeat:\n") and "<think>" not in doc
        rest = doc[len("Repeat:\n") :]
        text = rest[: (len(rest) - 1) // 2]
        assert text and rest == f"{text}\n{text}"


def test_composed_tag_names_use_think_and_answer_only_as_parts():
    docs = data.pretrain_corpus(300, seed=4, mix={"format": 1.0}, tag_names="composed")
    names = set()
    for doc in docs:
        tags = re.findall(r"<(/?)([\w]+)>", doc)
        pair = {n for _, n in tags}
        assert len(pair) == 2 and not pair & {"think", "answer"}, doc[:200]
        replies = re.findall(r"<(\w+)> .*? </(\w+)> <(\w+)> .*? </(\w+)>$", doc, re.M | re.S)
        assert replies and all(a == b and c == d and a != c for a, b, c, d in replies)
        names |= pair
    parts = [n.split("_") for n in names]
    assert all(len(p) in (1, 2) and set(p) <= set(data.corpus.NAME_WORDS) for p in parts)
    # think and answer do follow a "<", as parts: no word is excluded from a tag name.
    assert any(p[0] == "think" for p in parts) and any(p[0] == "answer" for p in parts)
    assert any(len(p) == 1 for p in parts) and any(len(p) == 2 for p in parts)
    assert data.pretrain_corpus(50, seed=3, tag_names="words") == data.pretrain_corpus(50, seed=3)
    with pytest.raises(ValueError, match="tag_names"):
        data.pretrain_corpus(2, seed=0, tag_names="random")


def test_r1_tag_rate_puts_think_answer_in_that_share_of_format_documents_only():
    docs = data.pretrain_corpus(400, seed=3, r1_tag_rate=0.25)
    tagged = [d for d in docs if "<think>" in d]
    assert all("<answer>" in d and "Repeat:" not in d for d in tagged)
    formats = [d for d in docs if re.search(r"<(\w+)> .*? </\1>", d, re.S)]
    assert 0.15 < len(tagged) / len(formats) < 0.35, (len(tagged), len(formats))
    for doc in tagged:  # the replies use the pair the instruction names, as for any other pair
        replies = re.findall(r"<(\w+)> .*? </(\w+)> <(\w+)> .*? </(\w+)>$", doc, re.M | re.S)
        assert replies and all(r == ("think", "think", "answer", "answer") for r in replies)
    # Rate 0 leaves the corpus exactly as without the option.
    assert data.pretrain_corpus(50, seed=3, r1_tag_rate=0.0) == data.pretrain_corpus(50, seed=3)
    with pytest.raises(ValueError, match="r1_tag_rate"):
        data.pretrain_corpus(2, seed=0, r1_tag_rate=1.5)


def test_cold_start_examples_are_well_formed_and_correct():
    rows = data.cold_start_examples(40, seed=0, mistake_rate=0.5)
    assert rows == data.cold_start_examples(40, seed=0, mistake_rate=0.5)
    pattern = re.compile(r"<think>\n(.+)\n</think>\n<answer>(.+)</answer>", re.DOTALL)
    for row in rows:
        m = pattern.fullmatch(row["completion"])
        assert m, row["completion"]
        assert row["completion"].count("<think>") == 1 and row["completion"].count("<answer>") == 1
        assert data.verify(row["task"], m.group(2), row)
        assert [m["role"] for m in row["messages"]] == ["user", "assistant"]
        assert row["messages"][1]["content"] == row["completion"]
    assert {r["task"] for r in rows} == {"arithmetic", "countdown"}
    assert any("Wait" in r["completion"] for r in rows)
    assert not any(
        "Wait" in r["completion"] or "too " in r["completion"]
        for r in data.cold_start_examples(20, seed=0, mistake_rate=0.0)
    )


# --------------------------------------------------------------------------------------------
# Tokenizer and templates
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tok_texts():
    return toktool.toy_tokenizer_texts(seed=0, n_docs=300, n_cold_start=40)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory, tok_texts):
    path = tmp_path_factory.mktemp("tok")
    data.train_tokenizer(tok_texts, path, vocab_size=512)
    return path


@pytest.fixture(scope="module")
def tok(tok_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)


def test_tokenizer_folder_loads_with_auto_tokenizer(tok_dir, tok):
    names = {p.name for p in tok_dir.iterdir()}
    assert {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"} <= names
    assert len(tok) == 512
    assert tok.eos_token == tok.pad_token == "<|endoftext|>"
    assert tok.bos_token is None
    assert data.stop_token_ids(tok) == tuple(
        sorted({tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")})
    )
    # The eos ids the model folder declares stop sampling too, as transformers' generate and vLLM
    # stop there (Qwen2.5-Instruct: eos <|im_end|>, generation_config [<|im_end|>, <|endoftext|>];
    # r1jax ran past a sampled <|endoftext|> and the rewards scored what followed).
    import shutil

    from transformers import AutoTokenizer

    folder = tok_dir.parent / "instruct"
    shutil.copytree(tok_dir, folder)
    (folder / "config.json").write_text(json.dumps({"eos_token_id": 7}))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 9, None]}))
    declared = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    assert data.stop_token_ids(declared) == tuple(sorted({*data.stop_token_ids(tok), 7, 9}))
    (folder / "generation_config.json").write_text("{not json")  # (the loader's to name)
    assert data.stop_token_ids(declared) == tuple(sorted({*data.stop_token_ids(tok), 7}))
    with pytest.raises(FileNotFoundError, match="no tokenizer"):
        data.load_tokenizer(tok_dir / "missing")


def test_tokenizer_round_trip_digits_and_tags(tok, tok_texts):
    samples = tok_texts[:50] + [
        "héllo wörld 世界 🙂 \t tabs\n\nnewlines",
        "  leading spaces",
        "<think> 12 + 3 </think> <answer>15</answer>",
    ]
    for s in samples:
        ids = tok(s, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == s
    # Every token that holds a digit is exactly one digit.
    vocab = tok.convert_ids_to_tokens(list(range(len(tok))))
    assert [t for t in vocab if re.search(r"\d", t) and not re.fullmatch(r"\d", t)] == []
    ids = tok("x 9876543210 y", add_special_tokens=False)["input_ids"]
    pieces = [tok.decode([i]) for i in ids]
    assert [p for p in pieces if p.strip().isdigit()] == list("9876543210")
    # Chat specials are single tokens; the think/answer tags are ordinary text, as in base models.
    for special in ("<|im_start|>", "<|im_end|>", "<|endoftext|>"):
        assert len(tok(special, add_special_tokens=False)["input_ids"]) == 1, special
    for tag in ("<think>", "</think>", "<answer>", "</answer>"):
        assert len(tok(tag, add_special_tokens=False)["input_ids"]) > 1, tag
    text = "<|im_start|>assistant\n<think>a</think><answer>7</answer><|im_end|><|endoftext|>"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    kept = tok.decode(ids, skip_special_tokens=True)
    assert kept == "assistant\n<think>a</think><answer>7</answer>"


def _first_stop(found, ids):  # the automaton, as the sampler runs it
    q, accept = 0, found.table.shape[0] - 1
    for n, t in enumerate(ids):
        q = found.table[q, t]
        if q == accept:
            return n
    return None


def _decoded_stop(tok, stops, ids):  # the decoded text searched with `in`
    for n in range(len(ids)):
        if any(s in tok.decode(ids[: n + 1], skip_special_tokens=True) for s in stops):
            return n
    return None


def test_stop_strings_are_found_in_the_text_whatever_tokens_spell_it(tok):
    """Byte-level BPE merges "</" with what precedes it (")</", "$</"): token-id stop sequences
    of the bare and space-led spellings missed those, and generation ran to its budget."""
    import random

    stops = ("</answer>", "\nUser:")
    found = data.StopStrings.for_tokenizer(tok, stops)
    texts = data.tokenizer.token_texts(tok)

    def first_stop(ids):
        return _first_stop(found, ids)

    def reference(ids):
        return _decoded_stop(tok, stops, ids)

    for text in ("(7)</answer>", "f(x)</answer> more", "$x$</answer>", "7 )</answer>\n\nUser:",
                 "<answer>15</answer>", "a\n\nUser: b", "<answer>1</ans"):  # fmt: skip
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert first_stop(ids) == reference(ids), (text, tok.convert_ids_to_tokens(ids))
    merged = [i for i, t in enumerate(texts) if t.endswith("</") and t != "</"]
    assert merged, "the toy vocabulary merges '</' with what precedes it"
    # Random spellings: pieces of the stop strings and random tokens, against the decoded text.
    rng = random.Random(0)
    pieces = [i for i, t in enumerate(texts) if t and any(t in s or s in t for s in stops)]
    for _ in range(300):
        ids = [rng.choice(pieces if rng.random() < 0.7 else range(len(texts))) for _ in range(8)]
        assert first_stop(ids) == reference(ids), tok.convert_ids_to_tokens(ids)
    assert not data.StopStrings.for_tokenizer(tok, ())


def _check_multibyte_stops(tok, stops, texts):
    """Stop strings of characters that the tokenizer splits over several tokens, on the given
    texts and on random spellings, against the decoded text."""
    import random

    found = data.StopStrings.for_tokenizer(tok, stops)
    for text in texts:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert _first_stop(found, ids) == _decoded_stop(tok, stops, ids), (text, ids)
        assert _first_stop(found, ids) is not None, text
    pieces = sorted({i for t in texts for i in tok(t, add_special_tokens=False)["input_ids"]})
    rng = random.Random(0)
    for _ in range(300):
        ids = [rng.choice(pieces if rng.random() < 0.8 else range(len(tok))) for _ in range(8)]
        assert _first_stop(found, ids) == _decoded_stop(tok, stops, ids), ids


def test_format_tags_a_tokenizer_declares_special_stay_text(tok):
    """A tokenizer given the tags with `add_special_tokens` (as some R1 recipes do): decoding
    with skip_special_tokens dropped them (format reward 0, no answer extracted in RL, eval and
    rejection sampling), the stop string "</answer>" never fired, and SFT spelt them in
    characters the model never samples."""
    import copy

    from r1jax import rewards
    from r1jax.stages import rl

    special = copy.deepcopy(tok)
    tags = ["<think>", "</think>", "<answer>", "</answer>"]
    special.add_special_tokens({"additional_special_tokens": tags})
    assert toktool.format_tag_ids(tok) == {}  # (the toy tokenizer's tags are ordinary text)
    ids = toktool.format_tag_ids(special)
    assert sorted(ids) == sorted(tags)
    text = "<think>\n2+3=5\n</think>\n<answer>5</answer>"
    sampled = special(text, add_special_tokens=False)["input_ids"] + [special.eos_token_id]
    assert sum(i in ids.values() for i in sampled) == 4  # each tag one token
    # A turn end flagged special only among the added tokens (as chat models' are) is dropped
    # as skip_special_tokens drops it, whichever the sample stops on.
    from tokenizers import AddedToken

    special.add_tokens([AddedToken("<|eot|>", special=True)])
    assert "<|eot|>" not in special.all_special_tokens
    turn_end = special.convert_tokens_to_ids("<|eot|>")
    decoded = rl._decode(special, "", [sampled, sampled[:-1] + [turn_end]])
    assert decoded == [text, text]  # the EOS and the turn end (special, not tags) dropped
    assert rewards.format_reward(decoded) == [1.0, 1.0]
    # SFT writes each tag as its one token, the rest spelt as text ("<|endoftext|>" too).
    completion = text + " <|endoftext|>"
    [encoded] = toktool.encode_completions(special, [completion])
    assert [i for i in encoded if i in ids.values()] == [ids[t] for t in tags]
    assert special.eos_token_id not in encoded
    assert special.decode(encoded) == completion
    batch = data.tokenize_sft(special, ["Q"], [text], seq_len=64)
    assert sum(i in ids.values() for i in batch.input_ids[0].tolist()) == 4
    # The stop string ends the sample at the tag's token.
    stops = toktool.StopStrings.for_tokenizer(special, ["</answer>"])
    state = 0
    for i in sampled[:-1]:
        state = stops.table[state, i]
    assert state == stops.table.shape[0] - 1
    # Without special tags nothing changes.
    plain = tok(completion, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    assert toktool.encode_completions(tok, [completion]) == [plain]


def test_stop_strings_of_characters_split_over_tokens_are_found(tok):
    """Byte-level BPE spells a Chinese or accented character it has no merge for as one token per
    UTF-8 byte, each decoding to U+FFFD alone: a stop string read per token's text never matched
    ("答案：" ran to the budget)."""
    split = [t for t in "答案：é" if len(tok(t, add_special_tokens=False)["input_ids"]) > 1]
    assert split == list("答案：é"), "the toy vocabulary splits these characters into bytes"
    stops = ("答案：", "né", "</answer>")
    _check_multibyte_stops(tok, stops, ["所以答案：7", "结论</answer>", "café né", "x答案："])


def test_stop_strings_with_sentencepiece_byte_fallback(tmp_path):
    """SentencePiece tokenizers (Llama 2, Mistral) spell an unknown character as byte pieces
    ``<0xE7>``, and a leading space as "▁"."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab |= {f"<0x{b:02X}>": 3 + b for b in range(256)}
    for piece in ("▁", "a", "n", "é", "c", "f", "x", "7", "▁n", "▁c", "af", "▁caf"):
        vocab.setdefault(piece, len(vocab))
    merges = [("▁", "n"), ("▁", "c"), ("a", "f"), ("▁c", "af")]
    backend = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True))
    backend.normalizer = normalizers.Sequence(
        [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]
    )
    backend.pre_tokenizer = pre_tokenizers.Split("▁", "merged_with_next")
    backend.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    assert "<0xE7>" in tok.convert_ids_to_tokens(tok("结", add_special_tokens=False)["input_ids"])
    stops = ("答案：", "né", "结论")
    _check_multibyte_stops(tok, stops, ["x 答案：7", "café né", "7结论x"])


def test_a_portable_tokenizer_config_keeps_named_chat_templates(tmp_path, tok):
    """transformers 5 writes named templates a file each (`additional_chat_templates/`); with the
    default moved inline beside that folder, both 4.x and 5.x ignored it and the default was lost
    (`apply_chat_template` then refused: several templates, no default)."""
    import copy

    from transformers import AutoTokenizer

    named = copy.deepcopy(tok)
    named.chat_template = {"default": "D{{ messages[0]['content'] }}", "tool_use": "T"}
    named.save_pretrained(tmp_path)
    assert (tmp_path / "additional_chat_templates").is_dir()
    data.tokenizer.portable_tokenizer_config(tmp_path)
    assert not (tmp_path / "additional_chat_templates").exists()
    with open(tmp_path / "tokenizer_config.json") as f:
        written = json.load(f)
    assert written["model_input_names"] == ["input_ids", "attention_mask"]  # (4.x: no type ids)
    again = AutoTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
    assert again.chat_template == named.chat_template
    chat = again.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert chat == "Dhi"


def test_tokenizer_training_is_deterministic(tmp_path, tok_texts):
    texts = tok_texts[:150]
    data.train_tokenizer(texts, tmp_path / "a", vocab_size=400)
    data.train_tokenizer(texts, tmp_path / "b", vocab_size=400)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    with pytest.raises(ValueError, match="vocab_size"):
        data.train_tokenizer(texts, tmp_path / "c", vocab_size=100)


def test_r1_zero_template_is_the_papers():
    paper = (
        "A conversation between User and Assistant. The user asks a question, and the "
        "Assistant solves it. The assistant first thinks about the reasoning process in the "
        "mind and then provides the user with the answer. The reasoning process and answer "
        "are enclosed within <think> </think> and <answer> </answer> tags, respectively, "
        "i.e., <think> reasoning process here </think> <answer> answer here </answer>. "
        "User: {}. Assistant:"
    )
    assert data.r1_zero_prompt("Compute 3 + 4") == paper.format("Compute 3 + 4")
    assert data.r1_zero_prompt("What is 3 + 4?") == paper.format("What is 3 + 4?")[:-13] + (
        "? Assistant:"
    )
    assert data.r1_zero_prompt("x", prefill_think=True).endswith("User: x. Assistant: <think>")
    assert data.completion_prefix("r1_zero", True) == "<think>"
    assert data.completion_prefix("r1_zero", False) == ""
    assert data.format_prompts(["a", "b"], "plain") == ["a", "b"]
    with pytest.raises(ValueError, match="unknown template"):
        data.format_prompts(["a"], "alpaca")
    with pytest.raises(ValueError, match="needs a tokenizer"):
        data.format_prompts(["a"], "chat")


def test_chat_template(tok):
    got = data.chat_prompt(tok, "What is 2 + 2?", system="Be brief.")
    assert got == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2 + 2?"
        "<|im_end|>\n<|im_start|>assistant\n"
    )
    assert data.format_prompts(["q"], "chat", tokenizer=tok, prefill_think=True) == [
        "<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n<think>\n"
    ]
    full = tok.apply_chat_template(
        [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], tokenize=False
    )
    assert full == "<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\na<|im_end|>\n"


def test_a_chat_template_that_opens_the_think_block_itself(tok):
    """DeepSeek-R1-Distill's and QwQ's templates end the generation prompt with "<think>\n":
    prefill_think must not add a second one, and format scoring must see the one there is."""
    import copy

    from r1jax import rewards

    distill = copy.copy(tok)
    distill.chat_template = tok.chat_template.replace(
        "assistant\n{% endif %}", "assistant\n<think>\n{% endif %}"
    )
    assert distill.chat_template != tok.chat_template
    for prefill in (False, True):
        (prompt,) = data.format_prompts(["q"], "chat", tokenizer=distill, prefill_think=prefill)
        assert prompt.endswith("assistant\n<think>\n") and prompt.count("<think>") == 1
        prefix = data.completion_prefix("chat", prefill, prompt)
        assert prefix == "<think>\n"
        completion = "r\n</think>\n<answer>4</answer>"
        assert rewards.format_reward([prefix + completion]) == [1.0]
    (plain,) = data.format_prompts(["q"], "chat", tokenizer=tok)
    assert data.completion_prefix("chat", False, plain) == ""


# --------------------------------------------------------------------------------------------
# Loaders
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,shape,solutions,n_tests",
    [
        ("gsm8k_sample.jsonl", "gsm8k", ["7", "80", "54", "15000", "15"], None),
        (
            "math_sample.jsonl",
            "math",
            ["\\frac{11}{12}", "6", "-\\sqrt{2}, \\sqrt{2}", "9", "15"],
            None,
        ),
        ("aime_sample.jsonl", "aime", ["9", "24", "180", "027"], None),
        ("code_contests_sample.jsonl", "code", None, [3, 2, 2, 3]),
        ("code_tests_sample.parquet", "code", None, [2, 2, 2]),
    ],
)
def test_loaders_on_shipped_samples(name, shape, solutions, n_tests):
    path = data.sample_path(name)
    rows, stats = data.load_rows(path)
    assert stats.shapes == {str(path): shape}
    assert stats.rows_read == stats.rows_kept == len(rows) and not stats.skipped
    assert all(r["prompt"].strip() and r["language"] == "en" and r["source"] == shape for r in rows)
    if solutions is not None:
        assert [r["solution"] for r in rows] == solutions
        assert {r["task"] for r in rows} == {"math"}
    else:
        assert [len(r["tests"]) for r in rows] == n_tests
        assert {r["task"] for r in rows} == {"code"}
        for r in rows:
            assert all(
                set(t) == {"input", "output"} and isinstance(t["input"], str) for t in r["tests"]
            )
    # Every row carries the same keys, so rows batch into reward columns.
    assert all(set(r) == set(rows[0]) for r in rows)


def test_code_sample_tests_are_parsed_exactly():
    rows, _ = data.load_rows(data.sample_path("code_contests_sample.jsonl"))
    assert rows[0]["tests"][1] == {"input": "10 -3\n", "output": "7\n"}
    rows, _ = data.load_rows(data.sample_path("code_tests_sample.parquet"))
    assert rows[2]["tests"][1] == {"input": "-1 -5\n", "output": "-1\n"}


def _write_lines(path, lines):
    with open(path, "wb") as f:
        for line in lines:
            f.write(line if isinstance(line, bytes) else line.encode() + b"\n")
    return path


def test_bad_rows_are_counted_or_named(tmp_path):
    path = _write_lines(
        tmp_path / "bad.jsonl",
        [
            json.dumps({"question": "q1", "answer": "so\n#### 1,024"}),
            json.dumps({"question": "q2", "answer": "no final answer"}),
            json.dumps({"question": "  ", "answer": "#### 3"}),
            '{"question": "q4", "answer": ',  # line 4: truncated JSON
            "[1, 2, 3]",  # not an object
            b"\xff\xfe{}\n",  # invalid UTF-8
            "",
            json.dumps({"question": "q8", "answer": "#### 8"}),
        ],
    )
    with pytest.raises(ValueError, match=r"bad\.jsonl:4: malformed JSON"):
        data.load_rows(path)
    rows, stats = data.load_rows(path, on_bad_json="skip")
    assert [r["solution"] for r in rows] == ["1024", "8"]
    assert stats.skipped == {"bad_json": 3, "no_solution": 1, "no_prompt": 1}
    assert stats.rows_read == 7 and stats.rows_kept == 2
    assert any(e.endswith("bad.jsonl:2: no_solution") for e in stats.examples)
    all_bad = _write_lines(
        tmp_path / "allbad.jsonl", [json.dumps({"problem": "p", "solution": "no box"})] * 3
    )
    with pytest.raises(ValueError, match="no usable rows.*no_solution=3"):
        data.load_rows(all_bad)
    rows, _ = data.load_rows(all_bad, require_solution=False)
    assert len(rows) == 3 and rows[0]["solution"] is None


def test_unreadable_conversations_are_named_not_counted_as_missing_prompts(tmp_path):
    """`messages` as a JSON-encoded string, OpenAI's content parts, or a turn without text: the
    rows were dropped as "no_prompt" (each has one), with no word of what was wrong."""
    from r1jax.stages import common

    turns = [{"role": "user", "content": "hi?"}, {"role": "assistant", "content": "yo"}]
    parts = [
        {"role": m["role"], "content": [{"type": "text", "text": m["content"]}]} for m in turns
    ]
    lines = [json.dumps({"messages": json.dumps(turns)}), json.dumps({"messages": parts})]
    path = _write_lines(tmp_path / "chat.jsonl", lines)
    with pytest.raises(ValueError, match=r"bad_messages=2.*must be a list of \{role, content\}"):
        common.load_completion_rows(str(path))
    rows, stats = common.load_completion_rows(
        str(_write_lines(tmp_path / "ok.jsonl", [json.dumps({"messages": turns}), *lines]))
    )
    assert len(rows) == 1 and stats.skipped == {"bad_messages": 2}
    # A misspelt completion column is named (every row was refused for want of a completion).
    pairs = _write_lines(tmp_path / "pairs.jsonl", [json.dumps({"prompt": "p", "response": "r"})])
    with pytest.raises(ValueError, match=r"field_map \{'completion': 'respons'\} names a column"):
        common.load_completion_rows(str(pairs), field_map={"completion": "respons"})
    rows, _ = common.load_completion_rows(str(pairs), field_map={"completion": "response"})
    assert rows[0]["completion"] == "r"
    # SFT pairs asked as a question or a problem read as they are (they were refused as rows
    # without a prompt), and a column not read as one is named with what the row has.
    for column in ("question", "problem"):
        asked = _write_lines(
            tmp_path / "q.jsonl", [json.dumps({column: "2+2?", "completion": "4"})]
        )
        [row], _ = common.load_completion_rows(str(asked))
        assert (row["prompt"], row["completion"]) == ("2+2?", "4")
    told = _write_lines(tmp_path / "i.jsonl", [json.dumps({"instruction": "x", "completion": "4"})])
    with pytest.raises(ValueError, match=r"no text in its 'prompt' column; it has \['completion'"):
        common.load_completion_rows(str(told))


def test_loader_field_map_shapes_and_errors(tmp_path):
    custom = _write_lines(tmp_path / "c.jsonl", [json.dumps({"q": "Q?", "a": 42, "lang": "zh"})])
    rows, stats = data.load_rows(
        custom, field_map={"prompt": "q", "solution": "a", "language": "lang"}
    )
    assert rows[0]["prompt"] == "Q?" and rows[0]["solution"] == "42"
    assert rows[0]["language"] == "zh" and stats.shapes[str(custom)] == "custom"
    # A custom map replaced the `language` argument with a dict, every row's default (the
    # language reward then refused it: "unsupported language {'language': 'language'}").
    gaps = [{"q": "Q?", "a": 1, "language": x} for x in ("zh", None, "python")]
    gappy = _write_lines(tmp_path / "g.jsonl", map(json.dumps, gaps))
    rows, stats = data.load_rows(gappy, field_map={"prompt": "q", "solution": "a"}, language="en")
    assert [r["language"] for r in rows] == ["zh", "en", "en"]
    assert dict(stats.language_defaulted) == {"python": 1}
    # Damaged files are named: a line nested past Python's depth (a RecursionError traceback,
    # even with on_bad_json='skip'), a Parquet file damaged past its footer (pyarrow's own error,
    # naming no file).
    deep = _write_lines(tmp_path / "deep.jsonl", ['{"prompt": "q", "answer": "1"}', "[" * 100_000])
    with pytest.raises(ValueError, match=r"deep.jsonl:2: malformed JSON"):
        data.load_rows(deep)
    assert len(data.load_rows(deep, on_bad_json="skip")[0]) == 1
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "shards").mkdir()
    shard = tmp_path / "shards" / "train-00001.parquet"
    n = 4000
    table = pa.table({"question": [f"q{i}" for i in range(n)], "answer": ["#### 1"] * n})
    pq.write_table(table, shard, row_group_size=1000, compression="NONE")
    damaged = bytearray(shard.read_bytes())
    damaged[len(damaged) // 2 : len(damaged) // 2 + 4000] = bytes(range(256)) * 15 + bytes(160)
    shard.write_bytes(damaged)
    with pytest.raises(ValueError, match=r"cannot read Parquet file .*train-00001.parquet"):
        data.load_rows(shard)
    with pytest.raises(ValueError, match=r"cannot recognise.*\['q', 'x'\]"):
        data.load_rows(_write_lines(tmp_path / "u.jsonl", [json.dumps({"q": 1, "x": 2})]))
    with pytest.raises(FileNotFoundError):
        data.load_rows(tmp_path / "nope.jsonl")
    with pytest.raises(FileNotFoundError):
        data.load_rows(str(tmp_path / "*.parquet"))
    with pytest.raises(ValueError, match="field_map keys"):
        data.load_rows(custom, field_map={"answer": "a"})
    chat = _write_lines(
        tmp_path / "chat.jsonl",
        [
            json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": "hi"},
                        {"role": "assistant", "content": "hello"},
                    ]
                }
            )
        ],
    )
    rows, _ = data.load_rows(chat, require_solution=False)
    assert rows[0]["prompt"] == "hi" and rows[0]["task"] == "chat"
    # A file's empty task cell is no task: inferred (eval's per-task table printed it as a
    # second "all" line beside the overall one).
    blank = [{"problem": "1+1?", "answer": "2", "task": t} for t in ("", " ", "math")]
    tasks, _ = data.load_rows(_write_lines(tmp_path / "t.jsonl", map(json.dumps, blank)))
    assert [r["task"] for r in tasks] == ["math"] * 3
    assert len(rows[0]["messages"]) == 2
    # Forcing a shape applies its answer parsing to other column sets too (the generic shape's
    # as an answer column's: a worked solution's "#### n" or box; its whole paragraph was the
    # gold, never matched).
    sample = data.sample_path("gsm8k_sample.jsonl")
    rows, _ = data.load_rows(
        sample, shape="generic", field_map={"prompt": "question", "solution": "answer"}
    )
    assert rows[0]["solution"] == "7"
    # ... and TRL's column names over a worked solution, and a problem/answer file, alike;
    # a prompt's answer column wins over its solution column, as a problem's does.
    gsm8k = [json.loads(line) for line in open(sample)][:1]
    for columns in (("prompt", "solution"), ("problem", "answer"), ("prompt", "answer")):
        rows_in = [{columns[0]: r["question"], columns[1]: r["answer"]} for r in gsm8k]
        path = _write_lines(tmp_path / "renamed.jsonl", [json.dumps(r) for r in rows_in])
        assert data.load_rows(path)[0][0]["solution"] == "7", columns
    # ... but an answer of several lines that is no prose is kept (a matrix, a system's values).
    for answer in ("x = 1\ny = 2", "\\begin{pmatrix} 1 \\\\\n 2 \\end{pmatrix}"):
        path = _write_lines(
            tmp_path / "lines.jsonl", [json.dumps({"prompt": "q", "solution": answer})]
        )
        assert data.load_rows(path)[0][0]["solution"] == answer
    # A conversation's answer column wins over its worked solution too.
    chat_row = {
        "messages": [{"role": "user", "content": "q"}],
        "solution": "long\nwork",
        "answer": "7",
    }
    path = _write_lines(tmp_path / "chat_both.jsonl", [json.dumps(chat_row)])
    assert data.load_rows(path)[0][0]["solution"] == "7"
    both = {"prompt": "q", "solution": "long worked text\nso 7", "answer": "7"}
    path = _write_lines(tmp_path / "both.jsonl", [json.dumps(both)])
    assert data.load_rows(path)[0][0]["solution"] == "7"
    # A float answer cell in positional digits (its repr "1e-07" read as 1 - 7 + e).
    path = _write_lines(tmp_path / "tiny.jsonl", [json.dumps({"problem": "p", "answer": 1e-07})])
    assert data.load_rows(path)[0][0]["solution"] == "0.0000001"
    # A file whose name holds a glob character is that file, not a pattern.
    (tmp_path / "run1.jsonl").write_text(json.dumps({"prompt": "other", "answer": "1"}) + "\n")
    literal = _write_lines(tmp_path / "run[1].jsonl", [json.dumps(both)])
    assert data.load_rows(literal)[0][0]["prompt"] == "q"


def test_sharegpt_conversations_load_as_chat_rows(tmp_path):
    """ShareGPT-style files (`conversations` of from/value turns, as many SFT datasets on the
    Hub) were refused as having no prompt."""
    turns = [
        {"from": "system", "value": "Be brief."},
        {"from": "human", "value": "What is 2 + 2?"},
        {"from": "gpt", "value": "<think> 2 + 2 = 4 </think> <answer>4</answer>"},
    ]
    path = _write_lines(
        tmp_path / "sharegpt.jsonl",
        [json.dumps({"conversations": turns}), json.dumps({"conversations": [{"from": "x"}]})],
    )
    rows, stats = data.load_rows(path, require_solution=False)
    assert stats.shapes[str(path)] == "chat" and stats.skipped == {"bad_messages": 1}
    assert rows[0]["prompt"] == "What is 2 + 2?"
    assert [m["role"] for m in rows[0]["messages"]] == ["system", "user", "assistant"]
    assert rows[0]["messages"][2]["content"] == turns[2]["value"]


def test_a_file_whose_later_rows_have_other_columns_loads_them_too(tmp_path):
    """rejection_sampled.jsonl puts its chat-format non-reasoning rows after thousands of
    reasoning rows; the columns used to be read from the first 100 rows only, so SFT on it
    dropped every chat row as having no prompt."""
    reasoning = [
        json.dumps({"prompt": f"q{i}", "completion": f"c{i}", "solution": "1"}) for i in range(120)
    ]
    chat = [
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": "yo"},
                ]
            }
        )
    ] * 5
    rows, stats = data.load_rows(
        _write_lines(tmp_path / "rs.jsonl", reasoning + chat),
        require_solution=False,
        keep=("completion",),
    )
    assert stats.rows_kept == 125 and sum(bool(r.get("messages")) for r in rows) == 5
    # ... but one stray row does not change the shape the first rows show (GSM8K rows, then one
    # with a `tests` column: the code shape would drop the other 200).
    gsm = [json.dumps({"question": f"q{i}", "answer": f"so #### {i}"}) for i in range(200)]
    stray = json.dumps(
        {"question": "q", "answer": "#### 1", "tests": [{"input": "", "output": "1"}]}
    )
    rows, stats = data.load_rows(_write_lines(tmp_path / "gsm.jsonl", gsm + [stray]))
    assert stats.rows_kept == 201 and stats.shapes[str(tmp_path / "gsm.jsonl")] == "gsm8k"


def test_field_map_columns_are_taken_as_they_are_and_must_exist(tmp_path):
    """Mapping the solution of a GSM8K-shaped file to another column kept GSM8K's "#### n" parser
    (every row skipped as no_solution); a misspelt column was reported only as skipped rows."""
    gsm = [{"question": f"q{i}", "answer": f"so #### {i}", "final": str(i)} for i in range(3)]
    path = _write_lines(tmp_path / "g.jsonl", [json.dumps(r) for r in gsm])
    rows, stats = data.load_rows(path, field_map={"solution": "final"})
    assert [r["solution"] for r in rows] == ["0", "1", "2"] and stats.rows_kept == 3
    with pytest.raises(ValueError, match=r"field_map \{'prompt': 'questoin'\} names columns"):
        data.load_rows(path, field_map={"prompt": "questoin"})
    # A map of the prompt and the solution still reads the file's language column (every row
    # was "en": the language reward scored a Chinese row's reasoning against English); a chat
    # column beside them is left alone unless mapped.
    zh = [{"q": "2 + 2 等于多少？", "a": "4", "language": "zh", "messages": [{"role": "user",
           "content": "other"}]}]  # fmt: skip
    path = _write_lines(tmp_path / "zh.jsonl", [json.dumps(r) for r in zh])
    [row], _ = data.load_rows(path, field_map={"prompt": "q", "solution": "a"})
    assert (row["prompt"], row["language"], row["messages"]) == (zh[0]["q"], "zh", None)


def test_sft_files_of_a_glob_fall_back_to_generic_one_by_one(tmp_path):
    """One unrecognised file (plain prompt/completion) made the whole glob load as "generic",
    dropping every row of a GSM8K-shaped file beside it as having no prompt."""
    from r1jax.stages import common

    gsm = [{"question": f"q{i}", "answer": f"#### {i}", "completion": "c"} for i in range(30)]
    _write_lines(tmp_path / "a.jsonl", [json.dumps(r) for r in gsm])
    _write_lines(tmp_path / "b.jsonl", [json.dumps({"prompt": "p", "completion": "c"})] * 5)
    rows, stats = common.load_completion_rows(str(tmp_path / "*.jsonl"))
    assert stats.rows_kept == 35
    assert sorted(stats.shapes.values()) == ["generic", "gsm8k"]


def test_a_byte_order_mark_is_not_a_bad_first_row(tmp_path):
    row = {"prompt": "Q?", "solution": "1"}
    (tmp_path / "a.jsonl").write_bytes(b"\xef\xbb\xbf" + (json.dumps(row) + "\n").encode() * 2)
    (tmp_path / "b.json").write_bytes(b"\xef\xbb\xbf" + json.dumps([row, row]).encode())
    (tmp_path / "c.jsonl").write_bytes(b"\xef\xbb\xbf\n" + (json.dumps(row) + "\n").encode() * 2)
    for name in ("a.jsonl", "b.json", "c.jsonl"):
        rows, stats = data.load_rows(tmp_path / name)
        assert stats.rows_kept == 2 and rows[0]["prompt"] == "Q?", name
    (tmp_path / "e.json").write_text(json.dumps({"data": [row]}, indent=2))
    with pytest.raises(ValueError, match=r"e.json holds one JSON object spread over lines"):
        data.load_rows(tmp_path / "e.json")
    (tmp_path / "f.json").write_text("{broken\n" + json.dumps(row) + "\n")
    with pytest.raises(ValueError, match=r"f.json:1: malformed JSON"):  # JSON lines: the line
        data.load_rows(tmp_path / "f.json")
    (tmp_path / "d.json").write_bytes(b"[" + "é".encode() * 2100 + b"\xff]")  # bad bytes late
    with pytest.raises(ValueError, match=r"d.json: malformed JSON array"):
        data.load_rows(tmp_path / "d.json")


def test_synthetic_rows_round_trip_through_jsonl_and_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = data.make_dataset("countdown", 5, seed=0)
    path = _write_lines(tmp_path / "cd.jsonl", [json.dumps(r) for r in rows])
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "cd.parquet")
    for p in (path, tmp_path / "cd.parquet"):
        loaded, stats = data.load_rows(p)
        assert stats.shapes[str(p)] == "generic"
        assert [r["task"] for r in loaded] == ["countdown"] * 5
        for orig, got in zip(rows, loaded, strict=True):
            assert got["meta"] == orig["meta"]
            assert data.verify(got["task"], orig["solution"], got)


def test_answer_extraction_helpers():
    assert data.extract_boxed(r"so \boxed{\frac{a}{b}} or \boxed{2^{10}}") == "2^{10}"
    assert data.extract_boxed(r"\boxed{unbalanced") is None
    # A MATH solution's answer of several values, boxed one by one: all of them (was the last).
    assert data.extract_boxed(r"The roots are $\boxed{-2}$ and $\boxed{3}$.") == "-2, 3"
    assert data.extract_boxed(r"\boxed{ }") is None
    assert data.extract_boxed("no box") is None
    assert data.gsm8k_answer("x #### 1,000") == "1000"
    assert data.gsm8k_answer("#### ") is None
    assert data.parse_tests({"inputs": ["1"], "outputs": ["2"], "fn_name": "f"}) is None
    assert data.parse_tests('{"inputs": ["1", "2"], "outputs": ["2"]}') is None
    assert data.parse_tests({"input": [["1", "2"]], "output": ["3"]}) == [
        {"input": "1\n2", "output": "3"}
    ]
    assert data.parse_tests([{"input": "a", "output": "b"}]) == [{"input": "a", "output": "b"}]
    assert data.parse_tests("not json") is None


def test_shard_rows_across_processes():
    rows = list(range(11))
    shards = [data.shard_rows(rows, i, 3) for i in range(3)]
    assert [len(s) for s in shards] == [3, 3, 3]
    assert sorted(x for s in shards for x in s) == list(range(9))
    uneven = [data.shard_rows(rows, i, 3, even=False) for i in range(3)]
    assert sorted(x for s in uneven for x in s) == rows
    loaded = [
        data.load_rows(data.sample_path("gsm8k_sample.jsonl"), process_index=i, process_count=2)[0]
        for i in range(2)
    ]
    assert [r["solution"] for r in loaded[0]] == ["7", "54"]
    assert [r["solution"] for r in loaded[1]] == ["80", "15000"]
    with pytest.raises(ValueError, match="process_index"):
        data.shard_rows(rows, 3, 3)
    with pytest.raises(ValueError, match="no rows left"):
        data.shard_rows(rows[:2], 0, 3)


# --------------------------------------------------------------------------------------------
# Batching
# --------------------------------------------------------------------------------------------


def test_prompt_bucketing_left_pads(tok):
    prompts = data.format_prompts(["What is 1 + 2?", "What is 123456 * 7?"], "r1_zero")
    batch = data.tokenize_prompts(tok, prompts, buckets=(32, 128, 256))
    enc = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    want_t = data.bucket_length(max(map(len, enc)), (32, 128, 256))
    assert batch.input_ids.shape == batch.attention_mask.shape == (2, want_t)
    assert batch.input_ids.dtype == batch.attention_mask.dtype == np.int32
    for i, e in enumerate(enc):
        n = len(e)
        assert batch.lengths[i] == n
        np.testing.assert_array_equal(batch.input_ids[i, want_t - n :], e)
        np.testing.assert_array_equal(batch.attention_mask[i], [0] * (want_t - n) + [1] * n)
        assert (batch.input_ids[i, : want_t - n] == tok.pad_token_id).all()
    short = data.tokenize_prompts(tok, ["1 + 2"], buckets=(8, 16))
    assert short.input_ids.shape == (1, 8)


def test_prompt_overflow_modes():
    seqs = [[5] * 3, list(range(1, 21)), [7] * 9]
    with pytest.raises(
        ValueError,
        match=r"1 of 3 prompts are longer than the largest bucket "
        r"\(16 tokens; longest is prompt 1 with 20\)",
    ):
        data.batch_prompt_ids(seqs, pad_id=0, buckets=(8, 16))
    cut = data.batch_prompt_ids(seqs, pad_id=0, buckets=(8, 16), overflow="truncate")
    assert cut.num_truncated == 1 and cut.input_ids.shape == (3, 16)
    np.testing.assert_array_equal(cut.input_ids[1], list(range(5, 21)))  # keeps the end
    skip = data.batch_prompt_ids(seqs, pad_id=0, buckets=(8, 16), overflow="skip")
    assert skip.num_skipped == 1 and skip.kept.tolist() == [0, 2]
    assert skip.input_ids.shape == (2, 16)
    np.testing.assert_array_equal(skip.attention_mask.sum(1), [3, 9])
    with pytest.raises(ValueError, match="overflow"):
        data.batch_prompt_ids(seqs, pad_id=0, overflow="wrap")
    with pytest.raises(ValueError, match="empty"):
        data.batch_prompt_ids([[1], []], pad_id=0)
    with pytest.raises(ValueError, match="largest bucket 16"):
        data.bucket_length(17, (8, 16))


def _check_sft_layout(batch, prompts, completions, seq_len):
    """Every example reappears intact in its segment with the right loss mask and positions."""
    found = []
    for r in range(batch.input_ids.shape[0]):
        seg = batch.segment_ids[r]
        assert (batch.attention_mask[r] == (seg > 0)).all()
        assert (batch.loss_mask[r][seg == 0] == 0).all()
        assert (batch.positions[r][seg == 0] == 0).all()
        for s in range(1, seg.max() + 1):
            idx = np.flatnonzero(seg == s)
            assert (np.diff(idx) == 1).all()
            found.append(
                (
                    batch.input_ids[r, idx].tolist(),
                    batch.loss_mask[r, idx].tolist(),
                    batch.positions[r, idx].tolist(),
                )
            )
    want = [
        (p + c, [0] * len(p) + [1] * len(c), list(range(len(p) + len(c))))
        for p, c in zip(prompts, completions, strict=True)
    ]
    assert found == want
    assert batch.input_ids.shape[1] == seq_len


def test_sft_layout_unpacked_and_packed():
    rng = np.random.default_rng(0)
    prompts = [rng.integers(1, 50, rng.integers(1, 6)).tolist() for _ in range(7)]
    completions = [rng.integers(1, 50, rng.integers(1, 6)).tolist() for _ in range(7)]
    flat = data.pack_sft_ids(prompts, completions, seq_len=12, pad_id=0)
    assert flat.input_ids.shape == (7, 12) and flat.input_ids.dtype == np.int32
    _check_sft_layout(flat, prompts, completions, 12)
    packed = data.pack_sft_ids(prompts, completions, seq_len=12, pad_id=0, pack=True)
    assert packed.input_ids.shape[0] < 7
    _check_sft_layout(packed, prompts, completions, 12)
    assert packed.loss_mask.sum() == flat.loss_mask.sum() == sum(map(len, completions))


def test_sft_overflow_and_tokenizer_path(tok):
    p, c = [[1, 2, 3], [4] * 10], [[5, 6, 7], [8]]
    cut = data.pack_sft_ids(p, c, seq_len=5, pad_id=0)
    assert cut.num_truncated == 1 and cut.num_skipped == 1
    np.testing.assert_array_equal(cut.input_ids, [[1, 2, 3, 5, 6]])
    np.testing.assert_array_equal(cut.loss_mask, [[0, 0, 0, 1, 1]])
    with pytest.raises(ValueError, match="seq_len 5"):
        data.pack_sft_ids(p, c, seq_len=5, pad_id=0, overflow="error")
    rows = data.cold_start_examples(4, seed=0)
    prompts = data.format_prompts([r["prompt"] for r in rows], "r1_zero")
    batch = data.tokenize_sft(
        tok, prompts, [r["completion"] for r in rows], seq_len=1024, pack=True
    )
    ids, mask = batch.input_ids, batch.loss_mask.astype(bool)
    for r in range(ids.shape[0]):
        # Each segment's target tokens decode to its completion followed by EOS.
        for s in range(1, batch.segment_ids[r].max() + 1):
            sel = (batch.segment_ids[r] == s) & mask[r]
            text = tok.decode(ids[r][sel])
            assert text.endswith("</answer><|endoftext|>") and text.startswith("<think>")
    # Special-token text inside a completion is text; only the appended EOS is the real token.
    batch = data.tokenize_sft(tok, ["q"], ["a <|endoftext|> b <|im_end|>"], seq_len=32)
    target = batch.input_ids[0][batch.loss_mask[0] > 0]
    assert list(target).count(tok.eos_token_id) == 1 and target[-1] == tok.eos_token_id
    assert not set(target[:-1].tolist()) & set(tok.all_special_ids)
    assert tok.decode(target) == "a <|endoftext|> b <|im_end|><|endoftext|>"
    # A chat template's end of turn replaces the EOS where a row asks for it (one real token).
    batch = data.tokenize_sft(tok, ["q", "q"], ["a", "b"], ends=["<|im_end|>", ""], seq_len=8)
    targets = [batch.input_ids[r][batch.loss_mask[r] > 0].tolist() for r in range(2)]
    assert [tok.decode(t) for t in targets] == ["a<|im_end|>", "b<|endoftext|>"]
    assert len(targets[0]) == len(targets[1])
    with pytest.raises(ValueError, match="1 ends for 2 completions"):
        data.tokenize_sft(tok, ["q", "q"], ["a", "b"], ends=[""], seq_len=8)


def test_turn_end_is_what_the_chat_template_closes_an_answer_with(tok):
    import copy

    from r1jax.data import templates

    tok = copy.deepcopy(tok)
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    )
    assert templates.turn_end(tok) == "<|im_end|>"  # (its newline is not learned)
    tok.chat_template = "{% for m in messages %}{{ m.content }}{{ eos_token }}{% endfor %}"
    assert templates.turn_end(tok) == tok.eos_token
    tok.chat_template = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
    assert templates.turn_end(tok) == ""  # no special token: the EOS then
    tok.chat_template = "{{ raise_exception('no assistant turns') }}"
    assert templates.turn_end(tok) == ""
    # Llama 3 base: EOS <|end_of_text|>, turns end with <|eot_id|>. A model taught to end its
    # turns so must have its sampling stop there too (it ran on to max_new_tokens).
    from tokenizers import AddedToken

    tok.add_tokens([AddedToken("<|eot_id|>", special=True)])  # as Meta's configs declare it
    tok.chat_template = "{% for m in messages %}{{ m.role }}: {{ m.content }}<|eot_id|>{% endfor %}"
    assert templates.turn_end(tok) == "<|eot_id|>"
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    assert eot in data.stop_token_ids(tok) and tok.eos_token_id in data.stop_token_ids(tok)


def test_a_float_answer_column_reads_as_numbers_and_gaps_as_missing(tmp_path):
    """pandas writes an integer answer column with a gap as floats: 27.0 is the answer "27" and
    NaN a missing answer (skipped as no_solution), not the answer "nan"."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "answers.parquet"
    answers = pa.array([27.0, float("nan"), 2.5])
    pq.write_table(pa.table({"problem": ["a", "b", "c"], "answer": answers}), path)
    rows, stats = data.load_rows(str(path))
    assert [r["solution"] for r in rows] == ["27", "2.5"]
    assert stats.skipped == {"no_solution": 1}
    line = '{"problem": "d", "answer": NaN}\n{"problem": "e", "answer": 3.0}\n'
    (tmp_path / "answers.jsonl").write_text(line)
    rows, stats = data.load_rows(str(tmp_path / "answers.jsonl"))
    assert [r["solution"] for r in rows] == ["3"] and stats.skipped == {"no_solution": 1}


def test_prompts_start_with_the_tokenizers_bos_once(tok):
    """A tokenizer that adds BOS by default (Llama 3, R1-Distill) gets it on r1_zero / plain
    prompts, which are tokenised without special tokens, and not twice on a chat prompt whose
    template wrote it; a tokenizer without one (Qwen, the toy) is left alone."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from r1jax.data import tokenizer as toks

    vocab = {"<s>": 0, "</s>": 1, "a": 2, "b": 3, "[UNK]": 4}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 1)]
    )  # BOS and EOS by default: only the BOS belongs before a prompt
    llama_like = PreTrainedTokenizerFast(
        tokenizer_object=raw, bos_token="<s>", eos_token="</s>", pad_token="</s>"
    )
    assert toks.leading_special_ids(llama_like) == [0]
    assert toks.with_leading_specials(llama_like, [[2, 3], [0, 2]]) == [[0, 2, 3], [0, 2]]
    batch = data.tokenize_sft(llama_like, ["a b", "<s> a"], ["b", "a"], seq_len=8)
    firsts = [row[row != 1][0] for row in batch.input_ids]  # the first non-pad token of each row
    assert firsts == [0, 0] and (batch.input_ids == 0).sum() == 2
    # The public prompt batcher as well (it left the BOS off), and a prompt cut to the largest
    # bucket keeps its BOS before its last tokens (the reward model's truncation cut it off).
    prompts = data.tokenize_prompts(llama_like, ["a b", "<s> a"], buckets=(4,))
    assert [row[row != 1].tolist() for row in prompts.input_ids[:2]] == [[0, 2, 3], [0, 2]]
    with pytest.raises(ValueError, match="longer than the largest bucket"):
        data.tokenize_prompts(llama_like, ["a a b b a b"], buckets=(4,))
    cut = data.tokenize_prompts(llama_like, ["a a b b a b"], buckets=(4,), overflow="truncate")
    assert cut.input_ids.tolist() == [[0, 3, 2, 3]] and cut.num_truncated == 1
    plain = data.batch_prompt_ids([[0, 2, 2, 3, 3]], pad_id=1, buckets=(4,), overflow="truncate")
    assert plain.input_ids.tolist() == [[2, 2, 3, 3]]  # (no `leading`: the last tokens only)
    assert toks.leading_special_ids(tok) == []


def test_cold_start_checks_state_no_held_out_problem():
    """A cold-start example checks a + b = c by c - b = a, itself a problem of the task, held out
    about 10% of the time: 72 of the 256 default held-out problems were stated, answer included,
    in the default cold-start data."""
    import re

    task = data.make_task("arithmetic", ops=("+", "-"), min_digits=1, max_digits=2)
    rows = data.cold_start_examples(800, seed=0, tasks=(task,), mistake_rate=0.0)
    stated = set()
    for r in rows:
        for a, op, b in re.findall(r"Let me check by \w+: (\d+) ([+-]) (\d+) =", r["completion"]):
            a, b = int(a), int(b)
            stated.add((min(a, b), op, max(a, b)) if op == "+" else (a, op, b))
    assert len(stated) > 700  # (every example checks)
    held_out = data.make_dataset(task, 500, seed=0, split="eval")
    for row in held_out:
        a, b = row["meta"]["operands"]
        op = row["meta"]["op"]
        assert ((min(a, b), op, max(a, b)) if op == "+" else (a, op, b)) not in stated, row
    # Every equation a chain states (a negative difference's b - a, partial products and sums)
    # is a train problem (or a single-digit one, never held out), with the knobs that write them.
    for knobs in ({"allow_negative": True}, {"ops": ("+", "*"), "max_multiplier_digits": 2}):
        task = data.make_task("arithmetic", min_digits=1, max_digits=2, **knobs)
        for row in data.cold_start_examples(300, seed=0, tasks=(task,), mistake_rate=0.0):
            text = row["completion"]  # (whole equations, not a column's digit sums)
            for a, op, b in re.findall(r"(?:So|check by \w+:) (\d+) ([+*-]) (\d+) = ", text):
                a, b = sorted((int(a), int(b))) if op in "+*" else (int(a), int(b))
                assert tasks.all_train([f"arithmetic|{a}{op}{b}"]), (row, a, op, b)


def _held_out_stated(texts, held_out) -> list[str]:
    """The held-out arithmetic problems whose whole equation ("a op b = c", either operand order
    for + and *, not the tail of a longer chain or a column's sum) some text writes."""
    import re

    written = set(re.findall(r"(?<![\d+*/-] )(?<![\d-])(\d+ [+*-] \d+ = -?\d+)", "\n".join(texts)))
    found = []
    for row in held_out:
        (a, b), op = row["meta"]["operands"], row["meta"]["op"]
        for x, y in {(a, b), (b, a)} if op in "+*" else {(a, b)}:
            if f"{x} {op} {y} = {row['solution']}" in written:
                found.append(f"{x} {op} {y}")
    return found


def test_an_equation_states_its_problem_however_it_is_spaced():
    """Only "a op b = c" with single spaces was seen: a rejection-sampled trace checking
    "10+24=34" kept a held-out problem's answer in the SFT data."""
    key = arithmetic.problem_key(10, "+", 24)
    for text in ("10 + 24 = 34", "10+24=34", "so 10+24 = 34.", "10 + 24= 34", "(10+24=34)"):
        assert arithmetic.equation_keys(text) == [key], text
    # Not a two-operand problem: a chain, a column's digit sum, a wrong equation.
    for text in ("5+10+24=39", "4 + 8 + 1 = 13", "4+8+1=13", "10+24=35", "-10+24=14"):
        assert key not in arithmetic.equation_keys(text), text
    # A degenerate completion's runaway digits (past Python's 4300-digit int limit) state
    # nothing: rejection sampling raised on it, and a rerun drew the same sample again.
    assert arithmetic.equation_keys(f"2 + 3 = {'5' * 5000}. 10 + 24 = 34") == [key]


def test_training_text_states_no_held_out_problem():
    """A Countdown step ("20 + 35 = 55") is an arithmetic problem, held out about 10% of the time:
    before, a corpus of arithmetic and Countdown documents (as `pretrain.tasks` allows) stated 81
    of these 300 held-out problems with their answers, and cold-start examples of both 55
    (Countdown's failed attempts too); with `allow_negative` or 2-digit multipliers the corpus's
    written solutions (b - a, partial products and sums) stated 15 and 34."""
    arith = data.make_task("arithmetic", ops=("+", "-"), min_digits=1, max_digits=2)
    held_out = data.make_dataset(arith, 300, seed=0, split="eval")
    countdown = data.make_task("countdown")
    docs = data.pretrain_corpus(1500, seed=0, tasks=(arith, countdown))
    assert _held_out_stated(docs, held_out) == []
    examples = data.cold_start_examples(400, seed=0, tasks=(arith, countdown), mistake_rate=1.0)
    assert _held_out_stated([r["completion"] for r in examples], held_out) == []
    for knobs in ({"allow_negative": True}, {"ops": ("+", "*"), "max_multiplier_digits": 2}):
        task = data.make_task("arithmetic", min_digits=1, max_digits=2, **knobs)
        held_out = data.make_dataset(task, 300, seed=0, split="eval")
        docs = data.pretrain_corpus(800, seed=0, tasks=(task,), mix={"steps": 1.0})
        assert _held_out_stated(docs, held_out) == []
    # The default corpus never stated one: it is drawn as before, as is the toy tokenizer's text.
    plain = data.pretrain_corpus(300, seed=0, tasks=(data.make_task("arithmetic"),))
    assert plain == data.pretrain_corpus(
        300, seed=0, tasks=(data.make_task("arithmetic"),), hold_out_stated=False
    )


def test_countdown_knobs_reach_the_prompt_and_the_verifier():
    """With use_all=False 6% of the problems were a target among the numbers (copy it: full
    reward); ops="+-" still offered * and / in the prompt, and the verifier accepted them."""
    free = data.make_task("countdown", use_all=False)
    rows = data.make_dataset(free, 400, seed=0)
    assert not [r for r in rows if r["meta"]["target"] in r["meta"]["numbers"]]
    plus_minus = data.make_task("countdown", ops="+-")
    [row] = data.make_dataset(plus_minus, 1, seed=0)
    assert "You may use +, - and parentheses" in row["prompt"] and row["meta"]["ops"] == "+-"
    assert data.verify(plus_minus, row["solution"], row)
    a, b, *_ = row["meta"]["numbers"]
    product = {**row, "meta": {**row["meta"], "target": a * b, "use_all": False}}
    assert not data.verify(plus_minus, f"{a} * {b}", product)
    product["meta"]["ops"] = "+-*/"
    assert data.verify(plus_minus, f"{a} * {b}", product)
    # The default rows are unchanged: all four operators, no "ops" in meta.
    [default] = data.make_dataset("countdown", 1, seed=0)
    assert "+, -, *, /" in default["prompt"] and "ops" not in default["meta"]


def test_common_dataset_layouts_load_as_what_they_are(tmp_path, caplog):
    """Layouts real files come in, each of which loaded wrong or not at all."""

    def load(name, rows, **kw):
        path = _write_lines(tmp_path / name, [json.dumps(r) for r in rows])
        return data.load_rows(path, **kw)[0]

    gsm = {"question": "How many?", "answer": "48 / 2 = 24\n24 + 48 = 72\n#### 72"}
    # GSM8K's answer column named by a field map (other column names): the gold was the whole
    # worked solution, so every reward was 0.
    renamed = {"query": gsm["question"], "response": gsm["answer"]}
    fmap = {"prompt": "query", "solution": "response"}
    assert [r["solution"] for r in load("renamed.jsonl", [renamed], field_map=fmap)] == ["72"]
    # Plain question/answer rows (no "####"): every row was dropped as no_solution.
    plain = [{"question": "2 + 2?", "answer": "4"}, {"question": "3 * 2?", "answer": 6}]
    assert [r["solution"] for r in load("qa.jsonl", plain)] == ["4", "6"]
    assert [r["solution"] for r in load("pa.jsonl", [{"prompt": "2 + 2?", "answer": "4"}])] == ["4"]
    # ... and a GSM8K worked solution in such an answer column gives its n, not the paragraph.
    [row] = load("pgsm.jsonl", [{"prompt": gsm["question"], "answer": gsm["answer"]}])
    assert row["solution"] == "72"
    # A conversation with its answer column: the answer was ignored.
    chat = {"messages": [{"role": "user", "content": "2 + 2?"}], "solution": "4"}
    [row] = load("chat.jsonl", [chat])
    assert (row["prompt"], row["solution"]) == ("2 + 2?", "4")
    worked = {**chat, "solution": "Add them.\nSo the sum is $\\boxed{4}$."}  # (NuminaMath-CoT)
    assert load("chat2.jsonl", [worked])[0]["solution"] == "4"
    # TRL's conversational rows: a prompt that is a list of messages was "no prompt".
    trl = {"prompt": [{"role": "user", "content": "Hi?"}], "solution": "x"}
    [row] = load("trl.jsonl", [trl])
    assert row["prompt"] == "Hi?" and row["messages"] == trl["prompt"]
    from r1jax.stages import common

    sft = {"prompt": trl["prompt"], "completion": [{"role": "assistant", "content": "Hello."}]}
    sharegpt = {**sft, "completion": [{"from": "gpt", "value": "Hello."}]}
    _write_lines(tmp_path / "trl_sft.jsonl", [json.dumps(sft), json.dumps(sharegpt)])
    rows, _ = common.load_completion_rows(str(tmp_path / "trl_sft.jsonl"))
    assert [(r["prompt"], r["completion"]) for r in rows] == [("Hi?", "Hello.")] * 2
    # code_contests: its tests in public_tests, private_tests and generated_tests (refused as an
    # unknown shape; its description is the problem).
    contest = {
        "name": "1_A",
        "description": "Add two numbers.",
        "public_tests": {"input": ["1 2\n"], "output": ["3\n"]},
        "private_tests": {"input": ["5 5\n", "0 0\n"], "output": ["10\n", "0\n"]},
        "generated_tests": {"input": [], "output": []},
        "cf_rating": 800,
    }
    [row] = load("code_contests.jsonl", [contest])
    assert row["prompt"] == "Add two numbers." and row["task"] == "code"
    assert [t["output"] for t in row["tests"]] == ["3\n", "10\n", "0\n"]
    # Alpaca: the input (the text the instruction is about) was dropped.
    alpaca = {"instruction": "Summarize the text.", "input": "The cat sat.", "output": "A cat."}
    [row] = load("alpaca.jsonl", [alpaca], require_solution=False, keep=("completion",))
    assert row["prompt"] == "Summarize the text.\n\nThe cat sat." and row["completion"] == "A cat."
    # A few rows of another dataset among the first ones decided the shape of the whole file:
    # 300 MATH rows with 3 GSM8K rows kept the 3. Now the commonest shape reads the file, and so
    # many rows skipped is a warning.
    math_rows = [{"problem": f"p{i}", "solution": f"so \\boxed{{{i}}}"} for i in range(30)]
    with caplog.at_level("WARNING", logger="r1jax.data.loaders"):
        rows = load("mixed.jsonl", math_rows[:5] + [gsm] * 3 + math_rows[5:])
    assert [r["solution"] for r in rows] == [str(i) for i in range(30)]
    assert not caplog.records
    rows = load("halves.jsonl", math_rows[:10] + [gsm] * 12)
    assert len(rows) == 12 and "10 of its 22 rows skipped" in caplog.text
    # Rows of two shapes that read together are all kept: rejection_sampled.jsonl's reasoning
    # rows, then more chat rows from a non-reasoning file (the majority alone read only these).
    reasoning = [{"prompt": f"p{i}", "solution": "1", "completion": "c"} for i in range(30)]
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    mixed = reasoning + [{"messages": turns, "source": "non_reasoning"}] * 45
    assert len(load("rs.jsonl", mixed, require_solution=False)) == 75
    # Without require_solution every row with a prompt reads: of two readings, the one that keeps
    # the answers (one row's stray "solution": null took every gold answer with the union).
    stray = [{"prompt": f"p{i}", "answer": str(i)} for i in range(20)]
    stray[3]["solution"] = None
    rows = load("stray.jsonl", stray, require_solution=False)
    assert [r["solution"] for r in rows] == [str(i) for i in range(20)]
    # A forced shape's column choice is the commonest rows', not a stray row's.
    code = [{"question": "q", "input_output": '{"inputs": ["1"], "outputs": ["1"]}'}]
    code += [{"problem": f"p{i}", "input_output": code[0]["input_output"]} for i in range(9)]
    assert len(load("code.jsonl", code, shape="code")) == 9


def test_hostile_and_unusual_files(tmp_path):
    import os

    import pyarrow as pa

    # A lone UTF-16 surrogate escape parsed, then crashed tokenization naming no file or row.
    lone = '{"question": "q \\ud83d", "answer": "#### 1"}'
    path = _write_lines(
        tmp_path / "lone.jsonl", [json.dumps({"question": "q", "answer": "#### 2"}), lone]
    )
    with pytest.raises(ValueError, match=r"lone\.jsonl:2: a string holds an unpaired UTF-16"):
        data.load_rows(path)
    assert len(data.load_rows(path, on_bad_json="skip")[0]) == 1
    (tmp_path / "lone.json").write_text(f'[{{"question": "q", "answer": "#### 2"}}, {lone}]')
    with pytest.raises(ValueError, match=r"lone\.json\[1\]: a string holds an unpaired"):
        data.load_rows(tmp_path / "lone.json")
    # One JSON line longer than the 4 KB head was refused as "one object spread over lines".
    long = {"question": "x" * 5000, "answer": "#### 3"}
    (tmp_path / "long.json").write_text(json.dumps(long) + "\n")
    assert data.load_rows(tmp_path / "long.json")[0][0]["solution"] == "3"
    # A `datasets` save_to_disk folder (Arrow stream files listed in state.json), "~", "**".
    saved = tmp_path / "saved"
    (saved / "deep").mkdir(parents=True)
    table = pa.table({"problem": ["p1", "p2"], "answer": ["1", "2"]})
    with pa.ipc.new_stream(saved / "data-00000-of-00001.arrow", table.schema) as w:
        w.write_table(table)
    (saved / "state.json").write_text(
        json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]})
    )
    assert [r["solution"] for r in data.load_rows(saved)[0]] == ["1", "2"]
    (tmp_path / "dd").mkdir()
    (tmp_path / "dd" / "dataset_dict.json").write_text('{"splits": ["train", "test"]}')
    with pytest.raises(FileNotFoundError, match=r"DatasetDict; give one of its splits.*train"):
        data.load_rows(tmp_path / "dd")
    _write_lines(saved / "deep" / "x.jsonl", [json.dumps({"problem": "p", "answer": "5"})])
    assert len(data.load_rows(str(tmp_path / "saved" / "**" / "*.jsonl"))[0]) == 1
    home = os.environ.get("HOME")
    os.environ["HOME"] = str(tmp_path)
    try:
        assert len(data.load_rows("~/saved/deep/x.jsonl")[0]) == 1
    finally:
        os.environ["HOME"] = home
    # A question ending in a full-width question mark got a "." after it.
    assert "几点了？ Assistant:" in data.r1_zero_prompt("几点了？")


def test_questions_already_templated_are_warned_about(caplog):
    """A TinyZero/verl-style prompt (R1's instruction and "Assistant: <think>" already written)
    got the template again: the instruction twice in every prompt, without a word."""
    framed = data.r1_zero_prompt("What is 2 + 3?", prefill_think=True)
    with caplog.at_level("WARNING", logger="r1jax.data.templates"):
        data.format_prompts(["What is 2 + 3?"], "r1_zero")
        assert not caplog.records
        data.format_prompts(["What is 2 + 3?", framed], "r1_zero")
    assert "1 of 2 questions already look templated" in caplog.text
