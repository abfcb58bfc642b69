"""Text for the toy model: a pretraining corpus and readable long-CoT cold-start examples.

The pretraining corpus is plain text documents that solve *train-split* problems, some tersely and
some step by step. By default it contains no
``<think>``/``<answer>`` tags (``r1_tag_rate``, below), so the R1-Zero stage has to find that format
from its prompt and its format reward. The cold-start examples use exactly that
format.

Document kinds (mixed by ``mix`` weights):
- "terse": question and bare answer ("Q: What is 3 + 4?\\nA: 7").
- "steps": a worked solution followed by "The answer is N.".
- "dialogue": "User: ...\\nAssistant: ..." exchanges, the register the R1-Zero prompt ends in.
- "format": an instruction to put the work and the result between two named tags, followed by
  replies that do. The tag names are drawn afresh for every document (``tag_names``, below; never
  think/answer), so the only way to predict a reply's tags is to copy them from the instruction;
  the instruction is worded several ways, one of them shaped like the R1-Zero template. A real
  base model has seen such instruction-following text on the web; without it a tiny model has no
  way to follow the R1-Zero template at all. Set its weight to 0 to study the harder setting.
- Tag names (``tag_names``): "words" draws each from ``TAG_WORDS``; "composed" makes each of one
  or two words of ``NAME_WORDS`` joined by "_", where think and answer occur only as parts
  ("<think_total>", "<ones_answer>"), never as the whole name. With "words" a model learns that
  whatever follows " <" is one of ``TAG_WORDS``, so think is the one word it will not copy there;
  a web-trained base has seen every word after a "<". With "composed" and the copy-task warm-up
  the toy base copies "<think>" and "<answer>" from the R1-Zero prompt (README, deviations).
- R1 tags (``r1_tag_rate``, off by default): that fraction of "format" documents use the pair
  think/answer. At 0 the corpus holds no think/answer tag at all, and the base has to follow the
  R1-Zero template by copying its tags from the prompt, which the default pretraining (composed tag
  names after the copy-task warm-up) makes it do. A base without the warm-up does not copy from
  context (measured: no content-based copying after 500 steps on pure copy data with random
  offsets, nor with "copy" documents mixed in; see the README); for it a small rate is a prior for
  the R1 tags, like a web-trained base model that has seen them (the recipe's default before the
  warm-up: 0.1).
- "copy": a string of random vocabulary pieces, then the same string again: the repetition web
  text is full of, which teaches a model to copy from its context (induction heads). Off by
  default: at the earlier budget (0.9M parameters, 600 steps, no warm-up) shares up to 60% of
  the documents (12% of the tokens, strings of 8-24 or 24-64 pieces) did not make the model copy at
  all (log-prob
  of the second copy no higher than the first's), so they only cost task text. What does teach it
  is the pretrain stage's copy-task warm-up (``pretrain.copy_warmup_steps``, at a lower learning
  rate): after it the model copies a format document's tag names from its instruction, and with
  ``tag_names="composed"`` think/answer too (README, deviations).
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence

from r1jax.data.arithmetic import ArithmeticTask, equation_keys
from r1jax.data.countdown import CountdownTask
from r1jax.data.tasks import Task, all_train, make_dataset
from r1jax.data.templates import think_answer

DOC_KINDS = ("terse", "steps", "dialogue", "format", "copy")
DEFAULT_MIX = {"terse": 0.25, "steps": 0.25, "dialogue": 0.2, "format": 0.3, "copy": 0.0}
FORBIDDEN_TAGS = ("<think>", "</think>", "<answer>", "</answer>")
TAG_WORDS = (
    "work", "result", "scratch", "final", "steps", "value", "calc", "out", "notes", "reply",
    "reasoning", "output", "plan", "solution", "draft", "response", "logic", "sum", "method",
    "conclusion", "analysis", "verdict", "idea", "number", "working", "total", "trace", "check",
    "proof", "claim", "hint", "key", "body", "end", "note", "reflect", "compute", "explain",
    "derive", "summary", "brief", "detail", "scratchpad", "thought", "reason", "res", "sol", "ans",
    "question", "problem", "step", "line", "part", "goal", "task", "math", "digit", "carry",
    "write", "first", "second", "main", "side", "box", "text", "code", "data", "info", "memo",
)  # fmt: skip
# Words a composed tag name is made of (``tag_names="composed"``): the tag words, the words of the
# task texts and instructions, and think and answer, which are never a whole tag name on their own.
NAME_WORDS = tuple(
    sorted(
        {*TAG_WORDS, "think", "answer"}
        | {"Assistant", "Format", "Problem", "Put", "Question", "Reply", "Solution", "The", "User"}
        | {"Using", "What", "Write", "You", "and", "are", "asks", "assistant", "between", "borrow"}
        | {"calculation", "conversation", "each", "enclosed", "equals", "exactly", "expression"}
        | {"here", "hundreds", "inside", "may", "numbers", "once", "ones", "parentheses", "process"}
        | {"provides", "respectively", "solves", "tags", "tens", "that", "the", "then", "thousands"}
        | {"use", "user", "with", "within", "works", "your"}
    )
)  # fmt: skip
TAG_NAMES = ("words", "composed")
_WORK_NAMES = ("reasoning process", "working", "steps", "calculation", "notes")
_RESULT_NAMES = ("answer", "result", "final value", "reply")
_INSTRUCTIONS = (
    # Shaped like the R1-Zero template (Table 1 of the paper), with other tags.
    "A conversation between User and Assistant. The user asks a question, and the Assistant "
    "solves it. The assistant first works out the {w} and then provides the user with the {r}. "
    "The {w} and {r} are enclosed within <{a}> </{a}> and <{b}> </{b}> tags, respectively, "
    "i.e., <{a}> {w} here </{a}> <{b}> {r} here </{b}>.",
    "Write the {w} inside <{a}> </{a}> and the {r} inside <{b}> </{b}>, i.e., "
    "<{a}> {w} here </{a}> <{b}> {r} here </{b}>.",
    "Answer each question. Put your {w} between <{a}> and </{a}>, then your {r} between "
    "<{b}> and </{b}>.",
    "Format: <{a}> {w} </{a}> <{b}> {r} </{b}>.",
)
_TURNS = (("User: ", " Assistant: "), ("Question: ", "\nReply: "), ("User: ", "\nAssistant: "))
_TERSE_FORMS = ("Question: {p}\nAnswer: {s}", "Q: {p}\nA: {s}", "{t}")


def _composed_name(rng: random.Random) -> str:
    """One word of ``NAME_WORDS`` or two joined by "_", never exactly think or answer."""
    while True:
        name = rng.choice(NAME_WORDS) if rng.random() < 0.5 else "_".join(rng.sample(NAME_WORDS, 2))
        if name not in ("think", "answer"):
            return name


def _tag_pair(
    rng: random.Random, r1_tag_rate: float = 0.0, tag_names: str = "words"
) -> tuple[str, str]:
    """think/answer with probability ``r1_tag_rate``, else two distinct names: from ``TAG_WORDS``
    ("words") or composed of ``NAME_WORDS`` ("composed")."""
    if r1_tag_rate and rng.random() < r1_tag_rate:
        return "think", "answer"
    if tag_names == "words":
        a, b = rng.sample(TAG_WORDS, 2)
        return a, b
    a = _composed_name(rng)
    while (b := _composed_name(rng)) == a:
        pass
    return a, b


def default_tasks() -> tuple[Task, ...]:
    """The built-in tasks at their default difficulty: arithmetic (+, -) and Countdown."""
    return (ArithmeticTask(), CountdownTask())


def _render(
    kind: str,
    rows: list[dict],
    rng: random.Random,
    pieces: Sequence[str] = TAG_WORDS,
    r1_tag_rate: float = 0.0,
    tag_names: str = "words",
) -> str:
    if kind == "terse":
        form = rng.choice(_TERSE_FORMS)
        return "\n\n".join(form.format(p=r["prompt"], s=r["solution"], t=r["terse"]) for r in rows)
    if kind == "steps":
        return "\n\n".join(
            f"Problem: {r['prompt']}\nSolution:\n{r['steps']}\nThe answer is {r['solution']}."
            for r in rows
        )
    if kind == "dialogue":
        turns = []
        for r in rows:
            body = r["steps"] if rng.random() < 2 / 3 else r["terse"]
            # Half on one line, as the R1-Zero prompt writes "User: ... Assistant:".
            sep = "\n" if rng.random() < 0.5 else " "
            turns.append(
                f"User: {r['prompt']}{sep}Assistant: {body}\nThe answer is {r['solution']}."
            )
        return "\n".join(turns)
    if kind == "format":
        a, b = _tag_pair(rng, r1_tag_rate, tag_names)
        head = rng.choice(_INSTRUCTIONS).format(
            a=a, b=b, w=rng.choice(_WORK_NAMES), r=rng.choice(_RESULT_NAMES)
        )
        user, assistant = rng.choice(_TURNS)
        body = []
        for r in rows:
            work = r["steps"] if rng.random() < 2 / 3 else r["terse"]
            body.append(
                f"{user}{r['prompt']}{assistant}<{a}> {work} </{a}> <{b}> {r['solution']} </{b}>"
            )
        return head + rng.choice((" ", "\n")) + "\n".join(body)
    if kind == "copy":
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(8, 24))).strip()
        return f"Repeat:\n{text}\n{text}"
    raise ValueError(f"unknown document kind {kind!r}; expected one of {DOC_KINDS}")


def pretrain_corpus(
    n_docs: int,
    *,
    seed: int,
    tasks: Sequence[Task] | None = None,
    eval_fraction: float = 0.1,
    mix: Mapping[str, float] | None = None,
    max_problems_per_doc: int = 4,
    copy_pieces: Sequence[str] | None = None,
    r1_tag_rate: float = 0.0,
    tag_names: str = "words",
    hold_out_stated: bool = True,
) -> list[str]:
    """Plain-text pretraining documents built from train-split problems only.

    Args:
      n_docs: number of documents.
      seed: random seed (same arguments, same corpus).
      tasks: task objects (default: ``default_tasks()``), chosen uniformly per document.
      eval_fraction: must equal the one used for the eval set, so no eval problem leaks in.
      mix: weight per document kind (keys from ``DOC_KINDS``; missing kinds get 0).
      max_problems_per_doc: each document holds 1..this many problems.
      copy_pieces: what "copy" documents are strung from (e.g. the tokenizer's vocabulary,
        decoded); default ``TAG_WORDS``.
      r1_tag_rate: fraction of "format" documents tagged think/answer (see the module docstring).
      tag_names: "words" (one of ``TAG_WORDS``) or "composed" (one or two of ``NAME_WORDS``,
        think and answer among them but never alone; see the module docstring).
      hold_out_stated: redraw a problem whose written solution states a held-out arithmetic
        problem with its answer (a negative difference's b - a, partial products, a Countdown
        step); False only for text no model learns answers from.
    Returns:
      ``n_docs`` strings, with think/answer tags only in that fraction of "format" documents;
      join them with the EOS token to train.
    """
    tasks = tuple(tasks or default_tasks())
    mix = dict(DEFAULT_MIX if mix is None else mix)
    unknown = set(mix) - set(DOC_KINDS)
    if unknown or sum(mix.values()) <= 0 or min(mix.values()) < 0:
        raise ValueError(
            f"mix must give non-negative weights to {DOC_KINDS} with a positive sum, got {mix}"
        )
    if not 0.0 <= r1_tag_rate <= 1.0:
        raise ValueError(f"r1_tag_rate must be in [0, 1], got {r1_tag_rate}")
    if tag_names not in TAG_NAMES:
        raise ValueError(f"tag_names must be one of {TAG_NAMES}, got {tag_names!r}")
    rng = random.Random(f"corpus|{seed}")
    kinds = [k for k in DOC_KINDS if mix.get(k, 0) > 0]
    plan = [
        (
            rng.randrange(len(tasks)),
            rng.choices(kinds, [mix[k] for k in kinds])[0],
            rng.randint(1, max_problems_per_doc),
        )
        for _ in range(n_docs)
    ]
    pools = []
    for t, task in enumerate(tasks):
        need = sum(k for i, _, k in plan if i == t)
        pools.append(
            iter(
                make_dataset(
                    task,
                    need,
                    seed=seed,
                    split="train",
                    eval_fraction=eval_fraction,
                    unique=False,
                    stream="corpus",
                    also_train=_written_keys if hold_out_stated else None,
                )
            )
        )
    docs = []
    for t, kind, k in plan:
        rows = [next(pools[t]) for _ in range(k)]
        doc = _render(kind, rows, rng, copy_pieces or TAG_WORDS, r1_tag_rate, tag_names)
        while kind == "copy" and any(tag in doc for tag in FORBIDDEN_TAGS):
            doc = _render(kind, [], rng, copy_pieces or TAG_WORDS)  # a random string made a tag
        deliberate = kind == "format" and "<think>" in doc and "<answer>" in doc
        if not deliberate and any(tag in doc for tag in FORBIDDEN_TAGS):
            raise ValueError(f"a corpus document contains a think/answer tag:\n{doc[:300]}")
        docs.append(doc)
    return docs


def _written_keys(row: dict) -> list[str]:
    """The arithmetic problems a row's written solutions state with their answers (its own too)."""
    return equation_keys(f"{row['steps']}\n{row['terse']}")


def _chain_keys(task: Task):
    """row -> the arithmetic problems the row's long chain of thought states whatever its random
    slips and failed attempts (which `cold_start_examples` checks as written)."""
    return lambda row: equation_keys(task.long_cot(row, random.Random(0), 0.0))


def cold_start_examples(
    n: int,
    *,
    seed: int,
    tasks: Sequence[Task] | None = None,
    eval_fraction: float = 0.1,
    mistake_rate: float = 0.3,
    hold_out_stated: bool = True,
) -> list[dict]:
    """Readable long chain-of-thought examples in the ``<think>…</think><answer>…</answer>`` format.

    Args:
      n: number of examples, spread over ``tasks`` in turn.
      seed: random seed.
      tasks: task objects (default: ``default_tasks()``).
      eval_fraction: as for the eval set; examples come from the train split only.
      mistake_rate: how often a chain of thought contains a slip that it notices and corrects
        (arithmetic) or failed attempts before the solution (Countdown).
      hold_out_stated: no example's chain of thought states a held-out arithmetic problem with
        its answer (its check by the inverse operation, partial products, a Countdown step or
        failed attempt): the problem is drawn again, a failed attempt written again. False only
        for text no model learns answers from (the toy tokenizer's training text, which must not
        change).
    Returns:
      Rows ``{"prompt", "completion", "messages", "solution", "task", "meta"}``: ``completion``
      is ``think_answer(reasoning, solution)``; ``messages`` is the same pair as a user/assistant
      chat, for chat-templated SFT.
    """
    tasks = tuple(tasks or default_tasks())
    rng = random.Random(f"cold_start|{seed}")
    counts = [n // len(tasks) + (i < n % len(tasks)) for i in range(len(tasks))]
    per_task = [
        iter(
            make_dataset(
                task,
                c,
                seed=seed,
                split="train",
                eval_fraction=eval_fraction,
                stream="cold_start",
                also_train=_chain_keys(task) if hold_out_stated else None,
            )
        )
        for task, c in zip(tasks, counts, strict=True)
    ]
    out = []
    for i in range(n):
        t = i % len(tasks)
        row = next(per_task[t])
        chain = tasks[t].long_cot(row, rng, mistake_rate)
        for _ in range(100):  # (a failed attempt stating a held-out problem: another attempt)
            if not hold_out_stated or all_train(equation_keys(chain), eval_fraction):
                break
            chain = tasks[t].long_cot(row, rng, mistake_rate)
        else:
            chain = tasks[t].long_cot(row, rng, 0.0)  # no attempts: its keys were checked
        completion = think_answer(chain, row["solution"])
        out.append(
            {
                "prompt": row["prompt"],
                "completion": completion,
                "messages": [
                    {"role": "user", "content": row["prompt"]},
                    {"role": "assistant", "content": completion},
                ],
                "solution": row["solution"],
                "task": row["task"],
                "meta": row["meta"],
            }
        )
    return out
