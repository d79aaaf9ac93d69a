"""Problems in, prompt token ids and training batches out: loading, prompts, the grain pipeline.

One job, the data stage of the flow (rows -> problems -> prompt token ids -> batches of them);
answers are read out of responses by `laserjax.answers`.

The data flow: `load_problems` (jsonl, parquet or a Hugging Face dataset) -> `encode_prompts`
(chat or plain template, length filter) -> `make_train_loader` (a grain pipeline of problem
indices: deterministic shuffling, per-host sharding, a checkpointable iterator). Held-out sets
come from `load_benchmark`, with the paper's samples per problem in `BENCHMARK_N`
(LASER_SPEC section 5).

Bad rows never stop a read: `read_jsonl`, the one jsonl reader of laserjax, yields each
non-blank line's value or a `BadRow` (line number, reason): invalid JSON or bytes that are not
UTF-8 are one bad row each. Reports name rows by their 1-based line number in the file (`line 7`;
`row 7` for parquet and Hugging Face sources), and `LoadReport.check` refuses a source whose
share of bad rows is over a limit (`data.max_bad_share` in the config).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Literal

import grain
import numpy as np
from etils import epath

from laserjax import paths
from laserjax.answers import answer_text

PLAIN_SUFFIX = "Please reason step by step, and put your final answer within \\boxed{}."
"""The instruction appended to every problem, in both templates (the paper's prompt)."""

PLAIN_TEMPLATE = "Question: {content}\nAnswer:"
"""The `plain` template, for base models without a chat template. `content` is the same user
message the chat template gets: problem + "\\n" + PLAIN_SUFFIX."""

BENCHMARKS = ("math500", "amc23", "aime24", "aime25", "olympiadbench")
"""The paper's five evaluation sets, in the order of its tables."""

BENCHMARK_FILES = {
    "math500": "math500.jsonl",
    "amc23": "amc23.jsonl",
    "aime24": "aime24.jsonl",
    "aime25": "aime25.jsonl",
    "olympiadbench": "OlympiadBench.jsonl",
}

BENCHMARK_N = {"math500": 2, "amc23": 32, "aime24": 32, "aime25": 32, "olympiadbench": 2}
"""Samples per problem for avg@n, as the paper (LASER_SPEC section 5)."""

_BENCHMARK_ID_FIELD = {"math500": "unique_id"}  # the others use "id"

EVAL_DIR_ENV = "LASERJAX_EVAL_DIR"


@dataclasses.dataclass(frozen=True)
class Problem:
    """One math problem with its reference answer, both as stripped strings."""

    id: str
    problem: str
    answer: str


FIRST_ROWS_SHOWN = 5
"""How many row numbers per reason reports list."""


@dataclasses.dataclass(frozen=True)
class BadRow:
    """A row that could not be read or used: its 1-based line (row) number and why."""

    line: int
    reason: str


def read_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, Any]]:
    """(line number from 1, parsed value or `BadRow`) for every non-blank line of a jsonl file.

    The one jsonl reader of laserjax: a line that is not UTF-8 or not JSON is a `BadRow`, never an
    exception, so one bad row costs one row. The file is read as bytes and decoded line by line.
    """
    with epath.Path(path).open("rb") as f:  # the path may be a gs:// URL
        for number, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield (
                    number,
                    BadRow(
                        number,
                        f"not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1})",
                    ),
                )
                continue
            if not text.strip():
                continue
            try:
                yield number, json.loads(text)
            except json.JSONDecodeError as e:
                yield number, BadRow(number, f"invalid JSON ({e.msg})")


class TooManyBadRows(ValueError):
    """More of a source's rows are bad than the allowed share."""


@dataclasses.dataclass
class LoadReport:
    """What `load_problems` read, kept, normalised and skipped."""

    source: str
    rows: int = 0
    loaded: int = 0
    normalised: int = 0
    """Rows kept after converting a numeric answer to a string (aime25 stores integers)."""
    skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    """(row id, reason) per skipped row; the row id is the id field's value, else `line n`
    (`row n` for parquet / Hugging Face sources), counting from 1."""
    skipped_lines: list[int] = dataclasses.field(default_factory=list)
    """The line (row) number of each skipped row, from 1, aligned with `skipped`."""

    @property
    def num_skipped(self) -> int:
        return len(self.skipped)

    @property
    def skipped_ids(self) -> list[str]:
        return [row_id for row_id, _ in self.skipped]

    @property
    def bad_share(self) -> float:
        return self.num_skipped / self.rows if self.rows else 0.0

    def skip(self, line: int, row_id: str, reason: str) -> None:
        self.skipped.append((row_id, reason))
        self.skipped_lines.append(line)

    def by_reason(self) -> dict[str, dict[str, Any]]:
        """reason -> {count, first (line numbers, at most FIRST_ROWS_SHOWN)}, most common first."""
        groups: dict[str, list[int]] = {}
        for (_, why), line in zip(self.skipped, self.skipped_lines, strict=True):
            groups.setdefault(why, []).append(line)
        ordered = sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[1][0]))
        return {why: {"count": len(ls), "first": ls[:FIRST_ROWS_SHOWN]} for why, ls in ordered}

    def to_json(self) -> dict[str, Any]:
        """For summaries: rows read, kept and skipped, with the reasons and first line numbers."""
        return {
            "rows": self.rows,
            "loaded": self.loaded,
            "skipped": self.num_skipped,
            "reasons": self.by_reason(),
        }

    def skipped_line(self) -> str:
        """One line for the console: how many rows were skipped and why, with row numbers."""
        unit = "line" if self.source.endswith(".jsonl") else "row"
        parts = [
            f"{why} x{g['count']} ({unit}{'s' if g['count'] > 1 else ''} "
            f"{', '.join(map(str, g['first']))}{' ...' if g['count'] > len(g['first']) else ''})"
            for why, g in self.by_reason().items()
        ]
        return f"{self.source}: skipped {self.num_skipped} of {self.rows} rows: " + "; ".join(parts)

    def check(self, max_share: float, field: str) -> None:
        """Raise `TooManyBadRows` (naming `field`, the setting) if over `max_share` are bad."""
        if self.num_skipped and self.bad_share > max_share:
            raise TooManyBadRows(
                f"{self.skipped_line()}; that is {self.bad_share:.0%} of the rows, over "
                f"{field} = {max_share:g}: fix the file or raise {field}"
            )

    def summary(self) -> str:
        text = (
            f"{self.source}: loaded {self.loaded} of {self.rows} rows "
            f"({self.normalised} numeric answers normalised, {self.num_skipped} skipped)"
        )
        if self.skipped:
            shown = "; ".join(f"{i}: {why}" for i, why in self.skipped[:5])
            text += f"; skipped {shown}" + (" ..." if self.num_skipped > 5 else "")
        return text


# ---------------------------------------------------------------------------------------------
# Loading problems.


def _read_parquet(path: epath.Path) -> Iterable[tuple[int, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(
            f"reading {path} needs pyarrow, which is not installed: "
            "`pip install pyarrow` (or convert the file to jsonl)"
        ) from None
    with path.open("rb") as f:  # a file object: the path may be a gs:// URL
        yield from enumerate(pq.read_table(f).to_pylist(), start=1)


def _read_hf(spec: str) -> Iterable[Any]:
    name, _, split = spec.partition(":")
    try:
        import datasets
    except ImportError:
        raise ImportError(
            f"loading `hf:{spec}` needs the `datasets` package, which is not "
            "installed: `pip install datasets` (or export the data to jsonl)"
        ) from None
    yield from enumerate(datasets.load_dataset(name, split=split or "train"), start=1)


ARITHMETIC_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def _arithmetic_rows(spec: str) -> list[dict[str, Any]]:
    """`arithmetic:<op>:<a_lo>-<a_hi>:<b_lo>-<b_hi>:<train|eval>`: every problem
    "What is a <op> b?" over the two operand ranges, in a fixed shuffled order; one in eight (the
    same ones on every machine) is held out as `eval`, the rest is `train`; `count` keeps the first
    ones of the split."""
    parts = spec.split(":")
    usage = (
        "write arithmetic:<op>:<a_lo>-<a_hi>:<b_lo>-<b_hi>:<train|eval>[:<count>], "
        "e.g. arithmetic:+:1-9:10-99:train"
    )
    if (
        len(parts) not in (4, 5)
        or parts[0] not in ARITHMETIC_OPS
        or parts[3] not in ("train", "eval")
        or (len(parts) == 5 and not parts[4].isdigit())
    ):
        raise ValueError(f"data source `arithmetic:{spec}`: {usage}")
    count = int(parts[4]) if len(parts) == 5 else None
    try:
        (a_lo, a_hi), (b_lo, b_hi) = (tuple(int(x) for x in r.split("-")) for r in parts[1:3])
    except ValueError:
        raise ValueError(
            f"data source `arithmetic:{spec}`: ranges must be lo-hi; {usage}"
        ) from None
    if a_lo > a_hi or b_lo > b_hi or min(a_lo, b_lo) < 0:
        raise ValueError(f"data source `arithmetic:{spec}`: ranges must be 0 <= lo <= hi")
    op, fn = parts[0], ARITHMETIC_OPS[parts[0]]
    pairs = [(a, b) for a in range(a_lo, a_hi + 1) for b in range(b_lo, b_hi + 1)]
    order = np.random.default_rng(0).permutation(len(pairs))
    keep = (order % 8 == 0) if parts[3] == "eval" else (order % 8 != 0)
    rows = [
        {"id": f"{a}{op}{b}", "problem": f"What is {a} {op} {b}?", "answer": str(fn(a, b))}
        for i in np.argsort(order)
        if keep[i]
        for a, b in [pairs[i]]
    ]
    return rows[:count]


def _rows(source: str | os.PathLike) -> Iterable[tuple[int, Any]]:
    """(line or row number from 1, value or BadRow) of each row of a source."""
    text = str(source)
    if text.startswith("arithmetic:"):
        return enumerate(_arithmetic_rows(text.removeprefix("arithmetic:")), start=1)
    if text.startswith("hf:"):
        if not text[3:]:
            raise ValueError("data source `hf:` names no dataset; write hf:org/name[:split]")
        return _read_hf(text[3:])
    path = paths.run_path(source, field="data source")
    if not path.is_file():
        raise FileNotFoundError(
            f"data source {text!r} not found (a .jsonl or .parquet file, or "
            "hf:org/name[:split] for a Hugging Face dataset)"
        )
    if path.suffix == ".jsonl":
        return read_jsonl(path)
    if path.suffix == ".parquet":
        return _read_parquet(path)
    raise ValueError(
        f"data source {text!r}: unknown format {path.suffix!r}; use .jsonl, "
        ".parquet or hf:org/name[:split]"
    )


def load_problems(
    source: str | os.PathLike,
    *,
    problem_field: str = "problem",
    answer_field: str = "answer",
    id_field: str | None = None,
) -> tuple[list[Problem], LoadReport]:
    """Read (id, problem, answer) rows from a .jsonl, a .parquet or `hf:org/name[:split]`.

    Normalises what is unambiguous (strips whitespace; integer and float answers become strings,
    `70.0` -> "70") and skips the rest with a reason in the report: a row that is not an object,
    a missing or empty problem or answer, a non-scalar or boolean answer, a missing or duplicate
    id (when `id_field` is given). Without `id_field` a problem's id is its row index.
    Raises ValueError when no row is usable, naming the fields it looked for.
    """
    report = LoadReport(source=str(source))
    problems: list[Problem] = []
    seen: set[str] = set()
    first_keys: list[str] | None = None
    unit = "line" if str(source).endswith(".jsonl") else "row"
    for index, (number, row) in enumerate(_rows(source)):
        report.rows += 1
        row_id = f"{unit} {number}"
        if isinstance(row, BadRow):
            report.skip(number, row_id, row.reason)
            continue
        if not isinstance(row, dict):
            report.skip(number, row_id, f"a {type(row).__name__}, not an object")
            continue
        if first_keys is None:
            first_keys = sorted(row)
        if id_field is not None:
            raw_id = row.get(id_field)
            if raw_id is None or str(raw_id).strip() == "":
                report.skip(number, row_id, f"missing id field {id_field!r}")
                continue
            row_id = str(raw_id).strip()
            if row_id in seen:
                report.skip(number, row_id, f"duplicate id ({unit} {number})")
                continue
        text = row.get(problem_field)
        if not isinstance(text, str) or not text.strip():
            why = (
                "missing"
                if text is None
                else "empty"
                if isinstance(text, str)
                else f"a {type(text).__name__}, not a string"
            )
            report.skip(number, row_id, f"problem field {problem_field!r} is {why}")
            continue
        value = row.get(answer_field)
        answer, why = answer_text(value)
        converted = answer is not None and not isinstance(value, str)
        if answer is None:
            report.skip(number, row_id, f"answer field {answer_field!r}: {why}")
            continue
        seen.add(row_id)
        report.normalised += converted
        problems.append(
            Problem(
                id=str(index) if id_field is None else row_id, problem=text.strip(), answer=answer
            )
        )
    report.loaded = len(problems)
    if not problems:
        raise ValueError(
            f"{source}: none of its {report.rows} rows is usable; looked for problem field "
            f"{problem_field!r} and answer field {answer_field!r}"
            + (f" and id field {id_field!r}" if id_field else "")
            + (f"; the first row has fields {first_keys}" if first_keys else "")
            + ". Set data.problem_field / data.answer_field to the names this source uses. "
            + report.summary()
        )
    return problems, report


# ---------------------------------------------------------------------------------------------
# Benchmarks.


@dataclasses.dataclass
class Benchmark:
    """A held-out set: its problems and the paper's samples per problem (None if not one of
    the five; the caller picks n then)."""

    name: str
    problems: list[Problem]
    n: int | None
    report: LoadReport


def load_benchmark(
    name_or_path: str | os.PathLike, eval_dir: str | os.PathLike | None = None
) -> Benchmark:
    """One of `BENCHMARKS` by name (case-insensitive) from `eval_dir`, a jsonl path, or a
    generated `arithmetic:...:eval` set.

    `eval_dir` defaults to the environment variable LASERJAX_EVAL_DIR. A path whose file name is
    one of the five benchmark files is loaded as that benchmark (its n and id field).
    """
    key = str(name_or_path).lower()
    if key in BENCHMARK_FILES:
        folder = eval_dir if eval_dir is not None else os.environ.get(EVAL_DIR_ENV)
        if folder is None:
            raise ValueError(
                f"benchmark {name_or_path!r}: pass eval_dir or set {EVAL_DIR_ENV} "
                "to the folder holding the benchmark files"
            )
        path = paths.run_path(folder, field=EVAL_DIR_ENV) / BENCHMARK_FILES[key]
    elif key.startswith("arithmetic:"):
        problems, report = load_problems(str(name_or_path), id_field="id")
        return Benchmark(name=str(name_or_path), problems=problems, n=None, report=report)
    elif (path := paths.run_path(name_or_path, field="benchmark")).is_file():
        key = next((k for k, f in BENCHMARK_FILES.items() if f == path.name), path.stem)
    else:
        raise ValueError(
            f"benchmark {str(name_or_path)!r} is neither one of "
            f"{', '.join(BENCHMARKS)} nor an existing jsonl file"
        )
    id_field = _BENCHMARK_ID_FIELD.get(key, "id") if key in BENCHMARK_FILES else None
    problems, report = load_problems(path, id_field=id_field)
    return Benchmark(name=key, problems=problems, n=BENCHMARK_N.get(key), report=report)


# ---------------------------------------------------------------------------------------------
# Prompts.

Template = Literal["chat", "plain", "raw"]
"""chat: the tokenizer's chat template; plain: `PLAIN_TEMPLATE`; raw: the problem text alone, no
suffix and no special tokens (how the CPU demo's toy policy is prompted)."""


def user_message(problem_text: str, instruction: str | None = PLAIN_SUFFIX) -> str:
    """The user turn of the prompt: the problem, a newline, the instruction (None: `PLAIN_SUFFIX`,
    the paper's); no newline when the instruction is empty."""
    instruction = PLAIN_SUFFIX if instruction is None else instruction
    return problem_text + ("\n" + instruction if instruction else "")


def prompt_text(
    problem_text: str,
    tokenizer: Any,
    template: Template,
    *,
    instruction: str | None = PLAIN_SUFFIX,
    system: str = "",
    fewshot: Sequence[Sequence[str]] = (),
) -> str:
    """The prompt as text: the tokenizer's chat template (with the generation prompt; `system`,
    when given, as the system turn; each `fewshot` (question, answer) pair as an earlier user /
    assistant exchange, asked the same way), or `PLAIN_TEMPLATE` (system and examples above)."""
    content = user_message(problem_text, instruction)
    shots = [(user_message(q, instruction), a) for q, a in fewshot]
    if template == "plain":
        head = "".join(PLAIN_TEMPLATE.format(content=q) + f" {a}\n" for q, a in shots)
        return (system + "\n" if system else "") + head + PLAIN_TEMPLATE.format(content=content)
    if template == "raw":
        return problem_text
    if template != "chat":
        raise ValueError(f"prompt template {template!r}: use chat, plain or raw (data.template)")
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "this tokenizer has no chat_template; use data.template=plain for a "
            "base model without one"
        )
    messages = [{"role": "system", "content": system}] if system else []
    for q, a in shots:
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return tokenizer.apply_chat_template(
        messages + [{"role": "user", "content": content}],
        add_generation_prompt=True,
        tokenize=False,
    )


def build_prompt(
    problem_text: str,
    tokenizer: Any,
    template: Template,
    *,
    instruction: str | None = PLAIN_SUFFIX,
    system: str = "",
    fewshot: Sequence[Sequence[str]] = (),
) -> list[int]:
    """Prompt token ids. A chat template writes its own BOS, so only `plain` adds special
    tokens (the tokenizer's BOS, where it has one)."""
    text = prompt_text(
        problem_text, tokenizer, template, instruction=instruction, system=system, fewshot=fewshot
    )
    return list(tokenizer(text, add_special_tokens=template == "plain")["input_ids"])


@dataclasses.dataclass
class EncodedPrompts:
    """The problems that fit, with their prompt ids (aligned), and the ids of those that did
    not fit."""

    problems: list[Problem]
    token_ids: list[list[int]]
    overflow_ids: list[str]

    @property
    def num_overflow(self) -> int:
        return len(self.overflow_ids)


def encode_prompts(
    problems: Sequence[Problem],
    tokenizer: Any,
    *,
    template: Template,
    max_prompt_len: int,
    prompt_overflow: Literal["filter", "error"] = "filter",
    instruction: str | None = PLAIN_SUFFIX,
    system: str = "",
    fewshot: Sequence[Sequence[str]] = (),
) -> EncodedPrompts:
    """Tokenise every prompt; one longer than `max_prompt_len` is dropped and counted
    (`filter`) or raises ValueError naming the problem (`error`)."""
    if prompt_overflow not in ("filter", "error"):
        raise ValueError(
            f"prompt_overflow {prompt_overflow!r}: use filter or error (data.prompt_overflow)"
        )
    kept, ids, overflow = [], [], []
    for p in problems:
        tokens = build_prompt(
            p.problem, tokenizer, template, instruction=instruction, system=system
        )
        if len(tokens) > max_prompt_len:
            if prompt_overflow == "error":
                raise ValueError(
                    f"problem {p.id!r}: its prompt is {len(tokens)} tokens, over "
                    f"rollout.max_prompt_len = {max_prompt_len}; raise the limit or set "
                    "data.prompt_overflow=filter to drop such problems"
                )
            overflow.append(p.id)
            continue
        kept.append(p)
        ids.append(tokens)
    return EncodedPrompts(problems=kept, token_ids=ids, overflow_ids=overflow)


# ---------------------------------------------------------------------------------------------
# The training pipeline.


def make_train_loader(
    problems: Sequence[Any],
    *,
    batch_size: int,
    seed: int,
    shard_index: int = 0,
    shard_count: int = 1,
    num_epochs: int | None = None,
) -> grain.DatasetIterator:
    """A checkpointable iterator of training batches: int64 arrays of `batch_size` indices
    into `problems` (tokenisation stays outside grain, in `encode_prompts`).

    One global stream: every epoch is a fresh permutation of all problems (grain's `shuffle`,
    a function of `seed` and the epoch), epochs follow each other (`num_epochs=None`: forever),
    and host `shard_index` of `shard_count` (jax.process_index(), jax.process_count()) takes
    every `shard_count`-th element. So step s's batches over all hosts are together elements
    [s * B * H, (s + 1) * B * H) of the stream (B = batch_size per host, H = hosts), the same
    problems whatever H is, and every host makes the same number of steps (a finite stream is
    cut to whole global batches). A batch may straddle two epochs.

    Resume: `state = it.get_state()` (a small JSON-able dict) and, on a loader built with the
    same arguments, `it.set_state(state)`; it then yields exactly the batches that followed.
    """
    n = len(problems)
    if batch_size < 1:
        raise ValueError(f"train loader: batch_size must be >= 1, got {batch_size}")
    if not 0 <= shard_index < shard_count:
        raise ValueError(
            f"train loader: shard_index {shard_index} is not in [0, {shard_count}) "
            "(use jax.process_index(), jax.process_count())"
        )
    if num_epochs is not None and num_epochs < 1:
        raise ValueError(f"train loader: num_epochs must be >= 1 or None, got {num_epochs}")
    global_batch = batch_size * shard_count
    if n * (num_epochs or 1) < global_batch:
        raise ValueError(
            f"train loader: {n} problems x {num_epochs or 1} epochs cannot fill one "
            f"global batch of {batch_size} x {shard_count} hosts = {global_batch}"
        )
    stream = grain.MapDataset.range(n).shuffle(seed=seed).repeat(num_epochs)
    if num_epochs is not None:
        stream = stream[: len(stream) // global_batch * global_batch]
    per_host = stream[shard_index::shard_count]
    return iter(per_host.batch(batch_size, drop_remainder=True))
