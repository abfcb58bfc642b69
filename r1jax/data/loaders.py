"""Local JSONL / JSON / Parquet datasets -> normalised rows, with shape detection and sharding.

Every loaded row has the same keys::

    {"prompt": str, "solution": str | None, "tests": [{"input": str, "output": str}] | None,
     "language": str | None, "messages": [{"role", "content"}] | None,
     "task": "math" | "code" | "chat" | a built-in task name, "source": shape name}

plus ``meta`` when the file has it (rows written from ``r1jax.data.make_dataset``) and any
columns named in ``keep``.

Recognised shapes (detected from the column names, or forced with ``shape=``):

| shape    | columns                                  | solution taken from            |
|----------|------------------------------------------|--------------------------------|
| code     | question/problem/prompt/description +    | (tests instead of a solution)  |
|          | input_output or tests (APPS, TACO), or   |                                |
|          | public_tests (code_contests: its private |                                |
|          | and generated tests joined to them)      |                                |
| gsm8k    | question, answer                         | the text after the last "####" |
| aime     | problem, answer (also MATH-500)          | answer, as a string            |
| math     | problem, solution                        | the last ``\\boxed{…}``          |
| generic  | prompt, solution (or answer)             | solution, as a string (answer: |
|          |                                          | one line, a "#### n", a boxed) |
| alpaca   | instruction, input, output               | none (SFT data: output)        |
| chat     | messages (or ShareGPT `conversations`)   | solution or answer, if present |

A question/answer file whose first rows' answers have no GSM8K "####" takes an answer as it is
when it is one line (a bare "4"), from its ``\\boxed{}`` otherwise. A `prompt` that is a list of
messages (TRL's conversational rows) is a conversation. Alpaca's `input`, when not empty, follows
the instruction in the prompt.

``field_map`` renames columns per canonical field (``{"prompt": "q", "solution": "a"}``); with
``shape="auto"`` a field map that names the prompt and a solution/tests/messages column replaces
detection and takes values as they are ("custom"; a GSM8K solution ending in "#### n" gives n).

Notable choices:
- A row with no usable prompt, or (when ``require_solution``) no solution and no tests, is
  skipped and counted by reason in ``LoadStats``; loading fails only when no row survives.
- A malformed JSON line raises an error naming file and line, or with ``on_bad_json="skip"`` is
  skipped and counted. A JSON line that is not an object counts as malformed.
- Multi-host: every process reads the same files in the same order and keeps every
  ``process_count``-th row from ``process_index``; with ``even`` the total is first cut to a
  multiple of ``process_count`` so all hosts step the same number of times.
"""

from __future__ import annotations

import codecs
import collections
import dataclasses
import glob
import json
import logging
import math
import os
import pathlib
import re
from collections.abc import Iterator, Mapping, Sequence

import numpy as np

log = logging.getLogger(__name__)

SAMPLES_DIR = pathlib.Path(__file__).parent / "samples"
FIELDS = ("prompt", "solution", "tests", "language", "messages")
SHAPES = ("auto", "code", "gsm8k", "aime", "math", "generic", "alpaca", "chat", "custom")
_PROMPT_COLUMNS = ("question", "problem", "prompt", "description")
_MAX_EXAMPLES = 5


@dataclasses.dataclass
class LoadStats:
    """What ``load_rows`` read and why rows were dropped (counts are over all processes' rows)."""

    rows_read: int = 0
    rows_kept: int = 0
    skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    shapes: dict[str, str] = dataclasses.field(default_factory=dict)
    examples: list[str] = dataclasses.field(default_factory=list)
    # Values of `language` columns that name no language the language reward tells apart (e.g.
    # "python" in a code dataset, or "fr"), with their row counts: those rows got the default.
    language_defaulted: collections.Counter = dataclasses.field(default_factory=collections.Counter)

    def skip(self, reason: str, where: str, detail: str = "") -> None:
        self.skipped[reason] += 1
        if len(self.examples) < _MAX_EXAMPLES:
            self.examples.append(f"{where}: {reason}" + (f" ({detail})" if detail else ""))

    def summary(self) -> str:
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(self.skipped.items())) or "none"
        out = f"read {self.rows_read} rows, kept {self.rows_kept}, skipped: {reasons}"
        if self.language_defaulted:
            values = ", ".join(f"{k!r} x{v}" for k, v in self.language_defaulted.most_common(5))
            out += (
                f"; {self.language_defaulted.total()} rows' language column names no language "
                f"the language reward tells apart ({values}): given the default language"
            )
        return out


def sample_path(name: str) -> pathlib.Path:
    """Path of a shipped sample file, e.g. ``sample_path("gsm8k_sample.jsonl")``."""
    return SAMPLES_DIR / name


# --------------------------------------------------------------------------------------------
# Answer extraction per shape
# --------------------------------------------------------------------------------------------


def gsm8k_answer(text: object) -> str | None:
    """The number after the last "####" of a GSM8K answer, thousands commas removed."""
    if not isinstance(text, str) or "####" not in text:
        return None
    answer = text.rsplit("####", 1)[1].strip().replace(",", "")
    return answer or None


_GSM8K_END = re.compile(r"(?:^|\n)####[ \t]*\S[^\n]*\s*$")


def plain_answer(value: object) -> str | None:
    """The answer of a question/answer file with no GSM8K "####" in its first rows: a bare answer
    ("4", 6) as it is, else its ``\\boxed{}``; a worked solution with neither has no answer to
    check (None), rather than a paragraph as the gold answer."""
    boxed = extract_boxed(value)
    if boxed is not None:
        return boxed
    answer = _scalar_answer(value)
    return answer if answer is not None and "\n" not in answer else None


def column_answer(value: object) -> str | None:
    """An `answer` column beside a prompt or a conversation (or a conversation's `solution`): a
    GSM8K worked solution's n, else as `plain_answer` reads it (a one-line answer, or a worked
    solution's ``\\boxed{}``)."""
    return _final_gsm8k_answer(value) or plain_answer(value)


def solution_answer(value: object) -> str | None:
    """A `solution` or `answer` column beside a prompt or a problem: a GSM8K worked solution's
    n, else its ``\\boxed{}``, else the cell as it is, lines and all (a matrix, "x = 1\\ny = 2")
    unless it reads as prose (a worked solution without a box: no answer to check)."""
    found = _final_gsm8k_answer(value) or extract_boxed(value)
    if found is not None:
        return found
    answer = _scalar_answer(value)
    if answer is not None and "\n" in answer and _PROSE.search(answer):
        return None
    return answer


# Sentences: a letter-ending word, a full stop, a space, a capital ("so 48 + 24 = 72. Natalia").
_PROSE = re.compile(r"[A-Za-z0-9)]\.\s+[A-Z]|[a-z]{3,} [a-z]{3,} [a-z]{3,}")


def mapped_answer(value: object) -> str | None:
    """A column the user mapped as the solution: its value as it is, except that a GSM8K worked
    solution (ending in a "#### n" line) gives n, as the shape detected by its column names
    would (the rewards check the gold against the answer only)."""
    return _final_gsm8k_answer(value) or _scalar_answer(value)


def _final_gsm8k_answer(value: object) -> str | None:
    """n of a GSM8K worked solution whose last line is "#### n", else None."""
    if isinstance(value, str) and _GSM8K_END.search(value):
        return gsm8k_answer(value)
    return None


def extract_boxed(text: object) -> str | None:
    """A worked solution's answer: the contents of its last ``\\boxed{…}`` (or ``\\fbox{…}``),
    braces balanced, with the boxes "and" or commas join to it ("\\boxed{2} and \\boxed{3}":
    "2, 3"; the accuracy reward reads a completion's alike); None if absent or empty."""
    from r1jax.rewards.common import final_boxed

    content = final_boxed(text) if isinstance(text, str) else None
    return content.strip() or None if content is not None else None


def _scalar_answer(value: object) -> str | None:
    """An answer cell -> its text, None when missing. A float column stands for numbers (pandas
    writes an integer column with a gap as floats): NaN is a missing answer, not "nan", and a
    number is written in its shortest positional digits ("27", not "27.0"; "0.0000001")."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, float | np.floating):
        if not math.isfinite(value):
            return None
        # (positionally: repr's "1e-07" is 1 - 7 + e to math-verify, e being Euler's number)
        return np.format_float_positional(value, trim="-")
    if isinstance(value, int | np.integer | str):
        s = str(value).strip()
        return s or None
    return None


def _io_text(value: object) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):  # {"output": 42}
        return str(value)
    if isinstance(value, list) and all(isinstance(v, str | int | float) for v in value):
        return "\n".join(map(str, value))
    return None


_CODE_CONTESTS_HIDDEN = ("private_tests", "generated_tests")


def _tests_column(columns) -> str:
    """The tests column of a code dataset's `columns` (APPS/TACO's, a "tests" one, or
    code_contests' public tests, which the rest of its tests join)."""
    return next((c for c in ("input_output", "tests", "public_tests") if c in columns), "tests")


def parse_tests(value: object) -> list[dict] | None:
    """stdin/stdout tests from the common code-dataset encodings, or None if none are usable.

    Accepts a JSON string or object ``{"inputs": [...], "outputs": [...]}`` (APPS/TACO; also
    ``"input"/"output"`` lists, as code_contests), or a list of ``{"input", "output"}`` dicts.
    Call-based tests (APPS rows with ``fn_name``) are not stdin tests and give None.
    """
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return None
    pairs: list[tuple[object, object]] = []
    if isinstance(value, dict):
        if value.get("fn_name"):
            return None
        ins = value.get("inputs", value.get("input"))
        outs = value.get("outputs", value.get("output"))
        if not isinstance(ins, list) or not isinstance(outs, list) or len(ins) != len(outs):
            return None
        pairs = list(zip(ins, outs, strict=True))
    elif isinstance(value, list):
        for t in value:
            if not isinstance(t, dict) or "input" not in t or "output" not in t:
                return None
            pairs.append((t["input"], t["output"]))
    else:
        return None
    tests = []
    for i, o in pairs:
        i, o = _io_text(i), _io_text(o)
        if i is None or o is None:
            return None
        tests.append({"input": i, "output": o})
    return tests or None


_SOLUTION_PARSERS = {
    "gsm8k": gsm8k_answer,
    "plain": plain_answer,
    "answer": column_answer,
    # (a worked solution in these columns gave its whole paragraph as the gold: never matched)
    "generic": solution_answer,
    "aime": solution_answer,
    "math": extract_boxed,
    "custom": mapped_answer,
}


# --------------------------------------------------------------------------------------------
# Reading files
# --------------------------------------------------------------------------------------------


def expand_paths(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """The data files a path or glob names (folders a glob matches are left out); raises
    FileNotFoundError naming a path or glob that names no file."""
    if isinstance(paths, str | os.PathLike):
        paths = [paths]
    out = []
    for p in map(os.path.expanduser, map(os.fspath, paths)):  # ("--x=~/data": no shell expands it)
        if any(c in p for c in "*?[") and not os.path.exists(p):  # ("run[1].jsonl": a file)
            matches = sorted(m for m in glob.glob(p, recursive=True) if os.path.isfile(m))
            if not matches:
                raise FileNotFoundError(f"no dataset files match {p!r}")
            out.extend(matches)
        elif os.path.isfile(os.path.join(p, "state.json")):  # `datasets`' save_to_disk folder
            out.extend(_saved_dataset_files(p))
        elif os.path.isfile(os.path.join(p, "dataset_dict.json")):
            with open(os.path.join(p, "dataset_dict.json")) as f:
                splits = json.load(f).get("splits", [])
            raise FileNotFoundError(
                f"{p} holds a saved DatasetDict; give one of its splits, e.g. "
                + ", ".join(repr(os.path.join(p, s)) for s in splits)
            )
        elif os.path.isdir(p):
            raise FileNotFoundError(
                f"{p} is a folder; give a file or a glob of files, e.g. "
                f"{os.path.join(p.rstrip('/'), '*.parquet')!r}"
            )
        elif not os.path.isfile(p):
            raise FileNotFoundError(f"dataset file not found: {p}")
        else:
            out.append(p)
    if not out:
        raise ValueError("no dataset paths given")
    return out


def _saved_dataset_files(folder: str) -> list[str]:
    """The Arrow files of a `datasets.Dataset.save_to_disk` folder, in order."""
    try:
        with open(os.path.join(folder, "state.json")) as f:
            names = [d["filename"] for d in json.load(f)["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{folder}/state.json does not list the saved data files ({e})") from None
    files = [os.path.join(folder, n) for n in names]
    missing = [f for f in files if not os.path.isfile(f)]
    if missing or not files:
        raise FileNotFoundError(
            f"{folder}: the saved dataset's files {missing or names} are missing"
        )
    return files


def _arrow_batches(path: str) -> Iterator:
    """Record batches of a Parquet file or an Arrow IPC file (stream format, as `datasets`
    writes them, or file format). A damaged file is a ValueError naming it, whether its opening
    or (past a sound footer) a later batch fails."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        if path.lower().endswith(".parquet"):
            yield from pq.ParquetFile(path).iter_batches(batch_size=4096)
            return
        try:
            batches = iter(pa.ipc.open_stream(path))
        except pa.ArrowInvalid:
            f = pa.ipc.open_file(path)
            batches = (f.get_batch(i) for i in range(f.num_record_batches))
        yield from batches
    except Exception as e:  # pyarrow raises several types for a corrupt file
        kind = "Parquet" if path.lower().endswith(".parquet") else "Arrow"
        raise ValueError(f"cannot read {kind} file {path}: {e}") from None


def _one_object(path: str) -> bool:
    """Whether a .json file is a single pretty-printed object rather than JSON lines."""
    with open(path, "rb") as f:
        first = f.readline().decode("utf-8-sig", errors="replace")
    try:
        json.loads(first)
        return False  # its first line is a whole object: JSON lines
    except json.JSONDecodeError:
        pass
    try:
        with open(path, encoding="utf-8-sig") as f:
            return isinstance(json.load(f), dict)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False  # broken JSON lines: the line-by-line reader names the line


_SURROGATE = "a string holds an unpaired UTF-16 surrogate escape (\\udXXX), which is no text"


def _encodable(obj: object) -> bool:
    """Whether every string in a parsed JSON value is text (JSON's "\\ud83d" alone is not)."""
    try:
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _read_records(path: str, on_bad_json: str, stats: LoadStats) -> Iterator[tuple[str, dict]]:
    """Yield (location, object) per data row; location is "file:line" or "file:row N"."""
    suffix = path.lower()
    if suffix.endswith((".parquet", ".arrow")):
        n = 0
        for batch in _arrow_batches(path):
            for obj in batch.to_pylist():
                stats.rows_read += 1
                yield f"{path}:row {n}", obj
                n += 1
        return
    if suffix.endswith(".json"):
        with open(path, "rb") as f:  # bytes: a head cut inside a character still decodes
            head = f.read(1 << 12).decode("utf-8-sig", errors="replace").lstrip()
        if head.startswith("["):
            try:
                with open(path, encoding="utf-8-sig") as f:  # -sig: a byte-order mark is skipped
                    text = f.read()
                items = json.loads(text)
                escapes = "\\ud" in text.lower()  # (only then can a string be no text)
            except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
                raise ValueError(f"{path}: malformed JSON array ({e}); fix the file") from None
            for n, obj in enumerate(items):
                stats.rows_read += 1
                problem = None if isinstance(obj, dict) else "element is not a JSON object"
                if problem is None and escapes and not _encodable(obj):
                    problem = _SURROGATE
                if problem is not None:
                    if on_bad_json == "error":
                        raise ValueError(f"{path}[{n}]: {problem}")
                    stats.skip("bad_json", f"{path}[{n}]")
                    continue
                yield f"{path}[{n}]", obj
            return
        if head.startswith("{") and _one_object(path):
            raise ValueError(
                f"{path} holds one JSON object spread over lines, not rows; give a JSON array of "
                f"row objects ([{{...}}, {{...}}]) or one object per line (JSON lines)"
            )
    elif not suffix.endswith((".jsonl", ".jsonl.txt", ".ndjson")):
        raise ValueError(
            f"unsupported dataset file type: {path} (expected .jsonl, .json, .parquet, or .arrow "
            "or a folder from datasets' save_to_disk)"
        )
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if lineno == 1:  # a byte-order mark (some Windows editors write one) is not a row
                raw = raw.removeprefix(codecs.BOM_UTF8)
            if not raw.strip():
                continue
            stats.rows_read += 1
            try:
                obj = json.loads(raw.decode("utf-8"))
                problem = None if isinstance(obj, dict) else "line is not a JSON object"
                if problem is None and b"\\ud" in raw.lower() and not _encodable(obj):
                    problem = _SURROGATE
            except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
                problem = f"malformed JSON ({e})"  # (RecursionError: nested past Python's depth)
            if problem is not None:
                if on_bad_json == "error":
                    raise ValueError(
                        f"{path}:{lineno}: {problem}; fix or remove that line, or "
                        "load with on_bad_json='skip'"
                    )
                stats.skip("bad_json", f"{path}:{lineno}")
                continue
            yield f"{path}:{lineno}", obj


def detect_shape(columns: Sequence[str]) -> tuple[str, dict[str, str]]:
    """Recognise a dataset shape from its column names.

    Returns:
      ``(shape, mapping)`` where mapping sends canonical fields to column names.
    Raises:
      ValueError naming the columns when no shape matches.
    """
    cols = set(columns)
    prompt_col = next((c for c in _PROMPT_COLUMNS if c in cols), None)
    extra = _optional_columns(cols)
    if prompt_col and ({"input_output", "tests", "public_tests"} & cols):
        return "code", {"prompt": prompt_col, "tests": _tests_column(cols), **extra}
    if {"question", "answer"} <= cols:
        return "gsm8k", {"prompt": "question", "solution": "answer", **extra}
    if {"problem", "answer"} <= cols:
        return "aime", {"prompt": "problem", "solution": "answer", **extra}
    if {"problem", "solution"} <= cols:
        return "math", {"prompt": "problem", "solution": "solution", **extra}
    if {"prompt", "answer"} <= cols:  # (before a solution column, as beside a problem)
        return "generic", {"prompt": "prompt", "solution": "answer", **extra}
    if {"prompt", "solution"} <= cols:
        return "generic", {"prompt": "prompt", "solution": "solution", **extra}
    if {"instruction", "output"} <= cols:
        return "alpaca", {"prompt": "instruction", **extra}
    if "messages" in extra:
        answer = next((c for c in ("answer", "solution") if c in cols), None)  # (as above)
        return "chat", {
            **({"prompt": "prompt"} if "prompt" in cols else {}),
            **({"solution": answer} if answer else {}),
            **extra,
        }
    if "prompt" in cols:  # prompts alone (general prompts, for a reward model), in the first
        return "generic", {"prompt": "prompt", "solution": "solution", **extra}  # rows at least
    raise ValueError(
        f"cannot recognise the dataset shape from columns {sorted(cols)}; pass "
        "field_map={'prompt': <column>, 'solution': <column>} (or 'tests')"
    )


def _majority_columns(objs: Sequence[dict]) -> set[str]:
    """The columns of the rows with the commonest shape among `objs` (all their columns when no
    row alone has a recognisable shape): a few rows of another dataset among the first ones must
    not decide how the whole file is read."""
    votes: dict[str, set[str]] = {}
    counts: collections.Counter = collections.Counter()
    for obj in objs:
        try:
            shape, mapping = detect_shape(sorted(obj))
        except ValueError:
            continue
        key = f"{shape}|{mapping.get('prompt')}|{mapping.get('solution')}|{mapping.get('tests')}"
        counts[key] += 1
        votes.setdefault(key, set()).update(obj)
    if not counts:
        return {c for obj in objs for c in obj}
    return votes[counts.most_common(1)[0][0]]  # (ties: the first row's shape)


def _read_as(
    columns: set[str],
    head: Sequence[dict],
    optional: dict[str, str],
    field_map: Mapping[str, str],
    fallback_shape: str | None,
) -> tuple[str, dict[str, str], str | None]:
    """(shape, mapping, answer parsing) of a file whose rows have `columns` (`head`: its first
    rows); raises ValueError when no shape fits and there is no `fallback_shape`."""
    try:
        shape, mapping = detect_shape(sorted(columns))
    except ValueError:
        if fallback_shape is None:
            raise
        shape, mapping = fallback_shape, _forced_mapping(fallback_shape, columns)
    mapping = {**optional, **mapping, **field_map}
    if "solution" in field_map:
        return shape, mapping, "custom"  # (the user mapped the column: as it is, or GSM8K's n)
    if shape == "gsm8k" and not any("####" in str(obj.get("answer")) for obj in head):
        return shape, mapping, "plain"  # question/answer rows that are not GSM8K's
    if (
        shape == "chat"
        and "solution" in mapping
        or shape == "generic"
        and (mapping.get("solution") == "answer")
    ):
        return shape, mapping, "answer"  # (an answer column beside a prompt or a conversation)
    return shape, mapping, None


def _forced_mapping(shape: str, columns: set[str]) -> dict[str, str]:
    """The mapping of an explicitly named shape (columns only pick among its alternatives)."""
    prompt_col = next((c for c in _PROMPT_COLUMNS if c in columns), "question")
    fixed = {
        "gsm8k": {"prompt": "question", "solution": "answer"},
        "aime": {"prompt": "problem", "solution": "answer"},
        "math": {"prompt": "problem", "solution": "solution"},
        # (prompts without answers, e.g. SFT's prompt/completion rows: asked however they are)
        "generic": {
            "prompt": next(
                (c for c in ("prompt", "question", "problem") if c in columns), "prompt"
            ),
            "solution": "solution",
        },
        "alpaca": {"prompt": "instruction"},
        "chat": {"messages": _chat_column(columns) or "messages"},
        "code": {"prompt": prompt_col, "tests": _tests_column(columns)},
        "custom": {},
    }[shape]
    return {**fixed, **_optional_columns(columns)}


def _chat_column(columns) -> str | None:
    """The column holding a conversation: `messages` (role/content), else ShareGPT's
    `conversations` (from/value)."""
    return next((c for c in ("messages", "conversations") if c in columns), None)


def _optional_columns(columns) -> dict[str, str]:
    chat = _chat_column(columns)
    return {**({"language": "language"} if "language" in columns else {}),
            **({"messages": chat} if chat else {})}  # fmt: skip


# ShareGPT's speakers, as chat roles.
_SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                   "assistant": "assistant", "chatgpt": "assistant"}  # fmt: skip


def parse_messages(value: object) -> list[dict] | None:
    """A conversation as role/content dicts (ShareGPT's from/value turns mapped), or None."""
    if not isinstance(value, list) or not value:
        return None
    out = []
    for m in value:
        if not isinstance(m, dict):
            return None
        if "from" in m and "role" not in m:
            m = {"role": _SHAREGPT_ROLES.get(str(m["from"]).lower()), "content": m.get("value")}
        if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            return None
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _normalise(
    obj: dict,
    shape: str,
    mapping: Mapping[str, str],
    *,
    require_solution: bool,
    language: str | None,
    keep: Sequence[str],
    parse_as: str | None = None,
) -> tuple[dict | None, str | None]:
    """One raw record -> (normalised row, None) or (None, skip reason); `parse_as`: the shape
    whose answer parsing applies, when not `shape`'s."""
    raw = obj.get(mapping["messages"]) if "messages" in mapping else None
    messages = parse_messages(raw)
    prompt = obj.get(mapping["prompt"]) if "prompt" in mapping else None
    if isinstance(prompt, list) and messages is None:  # TRL's conversational rows: the turns
        raw, prompt = prompt, None  # before the answer, as a message list
        messages = parse_messages(raw)
    if raw is not None and messages is None and not (isinstance(prompt, str) and prompt.strip()):
        # (a JSON-encoded string, OpenAI's content parts, a turn without text: counted as
        # "no_prompt", which every such row has)
        return None, "bad_messages"
    if not (isinstance(prompt, str) and prompt.strip()) and messages:
        # the question the answer answers: the last user turn (the stages render every turn)
        prompt = next((m["content"] for m in reversed(messages) if m["role"] == "user"), None)
    if not (isinstance(prompt, str) and prompt.strip()):
        return None, "no_prompt"
    if shape == "alpaca" and isinstance(obj.get("input"), str) and obj["input"].strip():
        prompt = f"{prompt.rstrip()}\n\n{obj['input'].strip()}"  # (the text it is about)
    solution = None
    if "solution" in mapping:
        parser = _SOLUTION_PARSERS.get(parse_as or shape, _scalar_answer)
        solution = parser(obj.get(mapping["solution"]))
    tests = parse_tests(obj.get(mapping["tests"])) if "tests" in mapping else None
    if mapping.get("tests") == "public_tests":  # code_contests: correct means passing them all
        more = [parse_tests(obj.get(c)) or [] for c in _CODE_CONTESTS_HIDDEN]
        tests = (tests or []) + [t for group in more for t in group] or None
    if require_solution and solution is None and tests is None:
        return None, "no_tests" if "tests" in mapping else "no_solution"
    row_language = obj.get(mapping["language"]) if "language" in mapping else None
    task = obj.get("task")
    if not isinstance(task, str) or not task.strip():  # (a file's empty task cells)
        task = "code" if tests else ("math" if solution is not None else "chat")
    row = {
        "prompt": prompt,
        "solution": solution,
        "tests": tests,
        "language": row_language if isinstance(row_language, str) else language,
        "messages": messages,
        "task": task,
        "source": shape,
    }
    if "meta" in obj:
        row["meta"] = obj["meta"]
    for col in keep:
        row[col] = obj.get(col)
    if shape == "alpaca" and row.get("completion") is None and "completion" in keep:
        row["completion"] = obj.get("output")
    return row, None


def shard_rows(
    rows: Sequence, process_index: int, process_count: int, *, even: bool = True
) -> list:
    """This process's share of ``rows``: every ``process_count``-th from ``process_index``.

    With ``even``, rows past the last multiple of ``process_count`` are dropped first, so every
    process gets the same number (multi-host jit steps must match across hosts).
    """
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(
            f"need 0 <= process_index < process_count, got {process_index}, {process_count}"
        )
    if even:
        rows = rows[: len(rows) - len(rows) % process_count]
    if not rows:
        raise ValueError(f"no rows left to shard over {process_count} processes")
    return list(rows[process_index::process_count])


def load_rows(
    paths: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    shape: str = "auto",
    field_map: Mapping[str, str] | None = None,
    require_solution: bool = True,
    on_bad_json: str = "error",
    language: str | None = "en",
    keep: Sequence[str] = (),
    limit: int | None = None,
    fallback_shape: str | None = None,
    process_index: int = 0,
    process_count: int = 1,
    even: bool = True,
) -> tuple[list[dict], LoadStats]:
    """Load, normalise, filter and shard rows from local dataset files.

    Args:
      paths: a file, a glob pattern, or a list of them (.jsonl, .json, .parquet, .arrow), or a
        folder `datasets`' save_to_disk wrote.
      shape: one of ``SHAPES``; "auto" detects per file from its columns.
      field_map: canonical field -> column name overrides (fields: ``FIELDS``).
      require_solution: skip rows with neither a solution nor tests (False for SFT chat data).
      on_bad_json: "error" (raise, naming file and line) or "skip" (count and go on).
      language: the natural language assumed where a row has no language column, or one whose
        value names none (a code dataset's "python"); rows' languages come out normalised ("en").
      keep: extra columns to carry through unchanged.
      limit: keep at most this many rows (before sharding).
      fallback_shape: with shape "auto", the shape of a file whose shape is not recognised (per
        file: the other files of a glob keep theirs); None = such a file is an error.
      process_index, process_count, even: multi-host sharding (see ``shard_rows``).
    Returns:
      ``(rows, stats)``: this process's normalised rows (each with "where", its "file:line"),
      and counts over all rows read.
    Raises:
      FileNotFoundError for missing files; ValueError for malformed JSON (unless skipped), an
      unrecognisable shape, or when no usable row is left.
    """
    from r1jax.rewards.language import normalize_language  # (rewards import the data package)

    if shape not in SHAPES:
        raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")
    if on_bad_json not in ("error", "skip"):
        raise ValueError(f"on_bad_json must be 'error' or 'skip', got {on_bad_json!r}")
    field_map = dict(field_map or {})
    if set(field_map) - set(FIELDS):
        raise ValueError(f"field_map keys must be among {FIELDS}, got {sorted(field_map)}")
    files = expand_paths(paths)
    stats = LoadStats()
    rows: list[dict] = []
    for path in files:
        records = list(_read_records(path, on_bad_json, stats))
        head = [obj for _, obj in records[:100]]
        # The optional columns from every row (rejection_sampled.jsonl's chat rows come after all
        # the others).
        columns = {c for obj in head for c in obj}
        every = {c for _, obj in records for c in obj}
        optional = _optional_columns(every)
        absent = {field: col for field, col in field_map.items() if records and col not in every}
        if absent:
            raise ValueError(
                f"{path}: field_map {absent} names columns no row of the file has; its columns "
                f"are {sorted(every)}"
            )
        # Answers parsed as the shape's own (GSM8K's "#### n") unless the user mapped the column.
        parse_as = None
        if shape != "auto":
            file_shape = shape
            # (its alternatives picked by the commonest shape's columns: a stray row must not)
            majority = _majority_columns(head) or columns
            mapping = {**optional, **_forced_mapping(shape, majority), **field_map}
        elif "prompt" in field_map and {"solution", "tests", "messages"} & set(field_map):
            # (the file's language column read too; its chat column only when mapped)
            language_column = {k: v for k, v in optional.items() if k == "language"}
            file_shape, mapping = "custom", {**language_column, **field_map}
        elif records:
            # The shape all the first rows' columns make, or the one most of those rows have
            # alone, whichever reads more of them: a few rows of another dataset among the first
            # ones must not decide how the whole file is read, and rows of two shapes that read
            # together (rejection_sampled.jsonl's prompt/completion rows and chat rows) must not
            # be split.
            reads = []
            for cols in (columns, _majority_columns(head)):
                try:
                    read = _read_as(cols, head, optional, field_map, fallback_shape)
                except ValueError:
                    continue
                normalised = [
                    _normalise(
                        obj,
                        read[0],
                        read[1],
                        require_solution=require_solution,
                        language=language,
                        keep=(),
                        parse_as=read[2],
                    )[0]
                    for obj in head
                ]
                usable = [r for r in normalised if r is not None]
                # (rows read, then of those the rows with an answer: without require_solution
                # every row with a prompt reads, and a mapping to a column few rows have loses
                # the answers)
                answered = sum(r["solution"] is not None or r["tests"] is not None for r in usable)
                reads.append((len(usable), answered, -len(reads), read))
            if not reads:
                _read_as(columns, head, optional, field_map, fallback_shape)  # (raises: names them)
            file_shape, mapping, parse_as = max(reads)[3]  # (ties: the first, all columns)
        else:
            continue
        stats.shapes[path] = file_shape
        skipped_before = stats.skipped.total()
        for where, obj in records:
            row, reason = _normalise(
                obj,
                file_shape,
                mapping,
                require_solution=require_solution,
                language=language,
                keep=keep,
                parse_as=parse_as,
            )
            if row is None:
                detail = ""
                if reason == "no_prompt":  # (which column was read, and what the row has)
                    column = mapping.get("prompt") or mapping.get("messages")
                    detail = f"no text in its {column!r} column; it has {sorted(obj)[:12]}"
                stats.skip(reason, where, detail)
                continue
            row["where"] = where  # "file:line", for the errors of whatever reads the row later
            if row["language"] is not None:
                try:
                    row["language"] = normalize_language(row["language"])
                except ValueError as e:
                    if "language" in field_map:  # the user named this column: say so
                        raise ValueError(f"{where}: field_map language column: {e}") from None
                    stats.language_defaulted[str(row["language"])[:20]] += 1
                    row["language"] = language  # ("python": a column of another meaning)
            rows.append(row)
        skipped = stats.skipped.total() - skipped_before
        if records and rows and skipped > len(records) // 10:
            log.warning(
                "%s: %d of its %d rows skipped, read as the %r shape (%s); check the file's "
                "columns against the shape (e.g. two datasets concatenated), or give field_map",
                path,
                skipped,
                len(records),
                file_shape,
                ", ".join(f"{k}={v}" for k, v in sorted(stats.skipped.items())),
            )
    if limit is not None:
        rows = rows[:limit]
    stats.rows_kept = len(rows)
    if not rows:
        raise ValueError(
            f"no usable rows in {', '.join(files)}: {stats.summary()}; e.g. "
            f"{'; '.join(stats.examples) or 'the files are empty'}. Check the "
            "field_map / shape"
            + (" (each row needs a prompt and a solution or tests)" if require_solution else "")
            + (
                "; `messages` must be a list of {role, content} objects whose content is text"
                if stats.skipped["bad_messages"]
                else ""
            )
        )
    return shard_rows(rows, process_index, process_count, even=even), stats
