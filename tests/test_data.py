"""Data: problem loading and normalisation, benchmarks, prompts, the grain training pipeline."""

import json

import numpy as np
import pytest

from laserjax.data import (
    BENCHMARK_N,
    BENCHMARKS,
    PLAIN_SUFFIX,
    Problem,
    build_prompt,
    encode_prompts,
    load_benchmark,
    load_problems,
    make_train_loader,
    prompt_text,
)

# ---------------------------------------------------------------------------------------------
# Loading.


def _write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_malformed_rows_are_skipped_with_their_ids_and_numbers_normalised(tmp_path):
    src = _write_jsonl(
        tmp_path / "train.jsonl",
        [
            {"uid": "a", "problem": "  What is 1+1?  ", "answer": " 2 "},
            {"uid": "b", "problem": "What is 7*10?", "answer": 70},  # int -> "70"
            {"uid": "c", "problem": "Half of 1?", "answer": 0.5},  # float -> "0.5"
            {"uid": "d", "problem": "Ten?", "answer": 10.0},  # integral float -> "10"
            {"uid": "e", "problem": "No answer here"},  # missing answer
            {"uid": "f", "problem": "Empty answer", "answer": "   "},
            {"uid": "g", "problem": "List answer", "answer": [1, 2]},
            {"uid": "h", "answer": "3"},  # missing problem
            {"uid": "i", "problem": "", "answer": "3"},
            {"uid": "j", "problem": "Bool", "answer": True},
            "{broken json",
            {"problem": "No id", "answer": "4"},
            {"uid": "a", "problem": "Duplicate id", "answer": "5"},
        ],
    )
    problems, report = load_problems(src, id_field="uid")
    assert problems == [
        Problem("a", "What is 1+1?", "2"),
        Problem("b", "What is 7*10?", "70"),
        Problem("c", "Half of 1?", "0.5"),
        Problem("d", "Ten?", "10"),
    ]
    assert report.rows == 13 and report.loaded == 4 and report.normalised == 3
    assert report.skipped_ids == ["e", "f", "g", "h", "i", "j", "line 11", "line 12", "a"]
    reasons = dict(report.skipped[:6])
    assert reasons["e"] == "answer field 'answer': missing answer"
    assert reasons["f"] == "answer field 'answer': empty answer"
    assert reasons["g"] == "answer field 'answer': answer is a list, not a scalar"
    assert reasons["h"] == "problem field 'problem' is missing"
    assert "invalid JSON" in report.skipped[6][1]
    assert "missing id field 'uid'" in report.skipped[7][1]
    assert "duplicate id" in report.skipped[8][1]
    assert "loaded 4 of 13 rows" in report.summary()


def test_ids_default_to_row_index_and_fields_are_configurable(tmp_path):
    src = _write_jsonl(
        tmp_path / "t.jsonl",
        [{"question": "Q0", "final": "1"}, {"question": "Q1"}, {"question": "Q2", "final": "3"}],
    )
    problems, report = load_problems(src, problem_field="question", answer_field="final")
    assert [p.id for p in problems] == ["0", "2"] and report.skipped_ids == ["line 2"]


def test_zero_usable_rows_names_the_fields(tmp_path):
    src = _write_jsonl(tmp_path / "t.jsonl", [{"question": "Q", "final": "1"}])
    with pytest.raises(
        ValueError,
        match=r"problem field 'problem' and answer field 'answer'.*"
        r"first row has fields \['final', 'question'\]",
    ):
        load_problems(src)


def test_bad_sources_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_problems(tmp_path / "missing.jsonl")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="use .jsonl, .parquet or hf:"):
        load_problems(tmp_path / "x.csv")


def test_parquet_and_hf_need_their_packages(tmp_path):
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        (tmp_path / "x.parquet").write_bytes(b"PAR1")
        with pytest.raises(ImportError, match="needs pyarrow"):
            load_problems(tmp_path / "x.parquet")
    else:
        import pyarrow as pa
        import pyarrow.parquet

        pyarrow.parquet.write_table(
            pa.table({"problem": ["Q0", "Q1"], "answer": ["1", None]}), tmp_path / "x.parquet"
        )
        problems, report = load_problems(tmp_path / "x.parquet")
        assert problems == [Problem("0", "Q0", "1")] and report.skipped_ids == ["row 2"]
    try:
        import datasets  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="needs the `datasets` package"):
            load_problems("hf:some-org/some-set:train")


def test_all_five_benchmarks_load(eval_dir):
    sizes = {"math500": 500, "amc23": 40, "aime24": 30, "aime25": 30, "olympiadbench": 675}
    for name in BENCHMARKS:
        bench = load_benchmark(name, eval_dir)
        assert len(bench.problems) == sizes[name] and bench.report.num_skipped == 0
        assert bench.n == BENCHMARK_N[name]
        assert all(isinstance(p.answer, str) and p.answer for p in bench.problems)
        assert len({p.id for p in bench.problems}) == sizes[name]
    aime25 = load_benchmark("aime25", eval_dir)
    assert aime25.report.normalised == 30  # integer answers in the file
    assert aime25.problems[0].answer == "70"
    assert load_benchmark("math500", eval_dir).problems[0].id == "test/precalculus/807.json"
    assert load_benchmark("OlympiadBench", eval_dir).n == 2
    by_path = load_benchmark(eval_dir / "amc23.jsonl")
    assert by_path.name == "amc23" and by_path.n == 32
    assert BENCHMARK_N == {
        "math500": 2,
        "amc23": 32,
        "aime24": 32,
        "aime25": 32,
        "olympiadbench": 2,
    }


def test_load_benchmark_errors(tmp_path, monkeypatch):
    monkeypatch.delenv("LASERJAX_EVAL_DIR", raising=False)
    with pytest.raises(ValueError, match="pass eval_dir or set LASERJAX_EVAL_DIR"):
        load_benchmark("math500")
    with pytest.raises(ValueError, match="neither one of math500"):
        load_benchmark("gsm8k", tmp_path)


# ---------------------------------------------------------------------------------------------
# Prompts, with a word-level tokenizer built in the test.

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(
        [
            "Question: what is one plus one ? Answer:",
            PLAIN_SUFFIX,
            "a b c d e f g h i j k l m n o p q r s t u v w x y z",
        ],
        trainers.WordLevelTrainer(
            special_tokens=["<unk>", "<pad>", "<eos>", "<|user|>", "<|assistant|>"]
        ),
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        pad_token="<pad>",
        eos_token="<eos>",
        chat_template=CHAT_TEMPLATE,
    )


def test_chat_prompt(tokenizer):
    text = prompt_text("what is one plus one ?", tokenizer, "chat")
    assert text == f"<|user|> what is one plus one ?\n{PLAIN_SUFFIX} <|assistant|>"
    ids = build_prompt("what is one plus one ?", tokenizer, "chat")
    assert ids == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|user|>")
    assert ids[-1] == tokenizer.convert_tokens_to_ids("<|assistant|>")
    assert tokenizer.unk_token_id not in ids


def test_plain_prompt_carries_the_suffix(tokenizer):
    text = prompt_text("what is one plus one ?", tokenizer, "plain")
    assert text == f"Question: what is one plus one ?\n{PLAIN_SUFFIX}\nAnswer:"
    assert tokenizer.decode(build_prompt("what is one plus one ?", tokenizer, "plain")).endswith(
        "Answer :"
    )


def test_chat_template_missing_is_a_clear_error(tokenizer):
    tokenizer_without = type(tokenizer)(tokenizer_object=tokenizer.backend_tokenizer)
    with pytest.raises(ValueError, match="no chat_template; use data.template=plain"):
        prompt_text("q", tokenizer_without, "chat")


def test_overlong_prompts_are_filtered_or_rejected(tokenizer):
    problems = [
        Problem("short", "a b", "1"),
        Problem("long", " ".join("abcdefghijklmnop"), "2"),
        Problem("short2", "c", "3"),
    ]
    limit = len(build_prompt("a b", tokenizer, "chat")) + 1
    enc = encode_prompts(problems, tokenizer, template="chat", max_prompt_len=limit)
    assert [p.id for p in enc.problems] == ["short", "short2"]
    assert enc.overflow_ids == ["long"] and enc.num_overflow == 1
    assert enc.token_ids[1] == build_prompt("c", tokenizer, "chat")
    with pytest.raises(
        ValueError,
        match=r"problem 'long': its prompt is \d+ tokens, over "
        rf"rollout.max_prompt_len = {limit}",
    ):
        encode_prompts(
            problems, tokenizer, template="chat", max_prompt_len=limit, prompt_overflow="error"
        )


# ---------------------------------------------------------------------------------------------
# The grain pipeline.


def _take(it, k):
    return [next(it) for _ in range(k)]


def test_loader_is_deterministic_and_reshuffles_each_epoch():
    a = _take(make_train_loader(range(20), batch_size=4, seed=7), 10)
    b = _take(make_train_loader(range(20), batch_size=4, seed=7), 10)
    c = _take(make_train_loader(range(20), batch_size=4, seed=8), 10)
    assert all(x.dtype == np.int64 and x.shape == (4,) for x in a)
    np.testing.assert_array_equal(np.stack(a), np.stack(b))
    assert not np.array_equal(np.stack(a), np.stack(c))
    epoch1, epoch2 = np.concatenate(a[:5]), np.concatenate(a[5:])
    assert sorted(epoch1) == list(range(20)) and sorted(epoch2) == list(range(20))
    assert not np.array_equal(epoch1, epoch2)


def test_two_shards_are_a_disjoint_cover_of_the_global_batches():
    n, b = 24, 3
    single = _take(make_train_loader(range(n), batch_size=2 * b, seed=1), 8)  # two epochs
    shard0 = _take(make_train_loader(range(n), batch_size=b, seed=1, shard_count=2), 8)
    shard1 = _take(
        make_train_loader(range(n), batch_size=b, seed=1, shard_index=1, shard_count=2), 8
    )
    for s in range(8):
        assert not set(shard0[s]) & set(shard1[s])
        assert sorted(np.concatenate([shard0[s], shard1[s]])) == sorted(single[s])
    first_epoch = np.concatenate(shard0[:4] + shard1[:4])
    assert sorted(first_epoch) == list(range(n))


def test_finite_epochs_give_every_host_the_same_number_of_batches():
    counts = [
        len(
            list(
                make_train_loader(
                    range(11), batch_size=2, seed=0, shard_index=i, shard_count=2, num_epochs=2
                )
            )
        )
        for i in range(2)
    ]
    assert counts == [5, 5]  # 22 draws cut to 20 = 5 global batches of 2 x 2


def test_iterator_state_restores_the_same_batches():
    it = make_train_loader(range(13), batch_size=4, seed=3)
    _take(it, 5)
    state = it.get_state()
    json.dumps(state)  # small and serialisable: goes into the checkpoint
    expected = _take(it, 6)
    resumed = make_train_loader(range(13), batch_size=4, seed=3)  # a fresh process
    resumed.set_state(state)
    np.testing.assert_array_equal(np.stack(_take(resumed, 6)), np.stack(expected))


def test_loader_argument_errors():
    with pytest.raises(ValueError, match="shard_index 2 is not in"):
        make_train_loader(range(10), batch_size=2, seed=0, shard_index=2, shard_count=2)
    with pytest.raises(ValueError, match="cannot fill one global batch"):
        make_train_loader(range(3), batch_size=2, seed=0, shard_count=2, num_epochs=1)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        make_train_loader(range(3), batch_size=0, seed=0)


def test_arithmetic_source_splits_disjointly_and_counts():
    train, _ = load_problems("arithmetic:+:1-9:10-99:train")
    held_out = load_benchmark("arithmetic:+:1-9:10-99:eval").problems
    assert len(train) + len(held_out) == 9 * 90
    assert not {p.problem for p in train} & {p.problem for p in held_out}
    first = held_out[0]
    a, b = (int(x) for x in first.problem.removeprefix("What is ").rstrip("?").split(" + "))
    assert first.answer == str(a + b) and 1 <= a <= 9 and 10 <= b <= 99
    assert load_benchmark("arithmetic:+:1-9:10-99:eval:5").problems == held_out[:5]
    (only,) = (
        load_problems("arithmetic:*:2-2:3-3:eval")[0]
        or load_problems("arithmetic:*:2-2:3-3:train")[0]
    )
    assert (only.problem, only.answer) == ("What is 2 * 3?", "6")
    for spec in ("arithmetic:/:1-9:1-9:train", "arithmetic:+:9-1:1-9:train", "arithmetic:+:1-9"):
        with pytest.raises(ValueError, match="arithmetic:"):
            load_problems(spec)


def test_instruction_and_system_turn(tokenizer):
    text = prompt_text("what is one plus one ?", tokenizer, "chat", instruction="")
    assert text == "<|user|> what is one plus one ? <|assistant|>"
    text = prompt_text("q", tokenizer, "chat", instruction="", system="s")
    assert text == "<|system|> s <|user|> q <|assistant|>"
    text = prompt_text("q", tokenizer, "plain", instruction="a b", system="c")
    assert text == "c\nQuestion: q\na b\nAnswer:"
