"""The task a run trains on: the policy, the tokenizer, the prompts and the reward.

`build_task` sets up either the CPU demo's synthetic task (`model.toy`, `laserjax.toy_task`) or a
real one: a Hugging Face checkpoint, its tokenizer, training problems and held-out benchmarks
(`laserjax.data`), and the math-verify reward (`laserjax.reward`, LASER_SPEC section 6).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from laserjax import toy_task
from laserjax.answers import answer_extractor, exact_reward, last_number_match
from laserjax.config import Config, ConfigError
from laserjax.data import EncodedPrompts, Problem, encode_prompts, load_benchmark, load_problems
from laserjax.model import Transformer, TransformerConfig
from laserjax.model.fetch import resolve_model
from laserjax.model.hf_params import load_pretrained, special_token_ids
from laserjax.reward import Grader


@dataclasses.dataclass
class Task:
    """What the loop needs from the data side."""

    tokenizer: Any
    eos_ids: tuple[int, ...]
    pad_id: int
    train_problems: list[Problem]
    train_prompts: list[list[int]]
    eval_sets: dict[str, tuple[list[Problem], list[list[int]]]]
    reward_fn: Callable[[list[str], list[str]], np.ndarray]
    extract_fn: Callable[[str], str | None]
    close: Callable[[], None] = lambda: None


def encode_as_run(
    cfg: Config, tok: Any, problems: list[Problem], prompt_overflow: str = "filter"
) -> EncodedPrompts:
    """`problems` as the run asks them: its template, instruction, system turn and few-shot
    turns, prompts over `rollout.max_prompt_len` dropped (or refused: `prompt_overflow`). The one
    encoding of a run's prompts, for training, its evaluations and `adaptive --benchmarks`."""
    return encode_prompts(
        problems,
        tok,
        template=cfg.data.template,
        instruction=cfg.data.instruction,
        system=cfg.data.system_prompt,
        fewshot=cfg.data.fewshot,
        max_prompt_len=cfg.rollout.max_prompt_len,
        prompt_overflow=prompt_overflow,
    )


def toy_setup(cfg: Config, abstract: bool) -> tuple[Transformer, Task, dict[str, Any]]:
    toy = cfg.model.toy
    tok, ids = toy_task.make_tokenizer(), toy_task.token_ids()
    cfg.validate_against_vocab(len(tok), (ids["eos"],), ids["pad"])  # before any compile
    if abstract:
        mcfg = toy_task.model_config(toy, **cfg.model.transformer_fields())
        model = nnx.eval_shape(lambda: Transformer(mcfg, rngs=nnx.Rngs(0)))
        info: dict[str, Any] = {}
    else:
        primary = jax.process_index() == 0
        if primary and toy.sft_steps:
            print(
                f"warm start: {toy.sft_steps} supervised steps of the toy policy (batch "
                f"{toy.sft_batch}) so that it starts with some answers right; about 20 s on 2 "
                "CPU cores, most of it compiling",
                flush=True,
            )
        tic = time.time()
        model, info = toy_task.build(toy, seed=cfg.train.seed, **cfg.model.transformer_fields())
        if primary and toy.sft_steps:
            print(
                f"warm start done in {time.time() - tic:.0f} s (final loss "
                f"{info['sft_final_loss']:.3f})",
                flush=True,
            )
    train, held_out = toy_task.problems(toy)
    task = Task(
        tokenizer=tok,
        eos_ids=(ids["eos"],),
        pad_id=ids["pad"],
        train_problems=train,
        train_prompts=[tok.encode(p.problem) for p in train],
        eval_sets={"toy_arithmetic": (held_out, [tok.encode(p.problem) for p in held_out])},
        reward_fn=exact_reward,
        extract_fn=answer_extractor("exact"),  # one reward, one extractor
    )
    return model, task, info


def real_setup(
    cfg: Config, mesh: Mesh | None, abstract: bool
) -> tuple[Transformer, Task, dict[str, Any]]:
    from transformers import AutoTokenizer

    ckpt = resolve_model(cfg.model.path)
    mcfg = TransformerConfig.from_pretrained_dir(ckpt, **cfg.model.transformer_fields())
    tok = AutoTokenizer.from_pretrained(str(ckpt))
    try:
        eos, pad = special_token_ids(
            ckpt, tok, eos_ids=cfg.tokens.eos_ids, pad_id=cfg.tokens.pad_id
        )
    except ValueError as e:
        raise ConfigError(f"config field `tokens.eos_ids`: {e}") from None
    cfg.validate_against_vocab(mcfg.vocab_size, eos, pad)  # before loading or compiling
    # The data before the weights: a bad file is refused before a large model loads.
    if not cfg.data.train:
        raise ConfigError("config field `data.train`: set a jsonl/parquet path or hf:org/name")
    try:
        problems, report = load_problems(
            cfg.data.train,
            problem_field=cfg.data.problem_field,
            answer_field=cfg.data.answer_field,
        )
        report.check(cfg.data.max_bad_share, "data.max_bad_share")
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(f"config field `data.train`: {e}") from None
    reports = [report]
    if abstract:
        model = nnx.eval_shape(lambda: Transformer(mcfg, rngs=nnx.Rngs(0)))
    else:
        model = load_pretrained(
            str(ckpt),
            **cfg.model.transformer_fields(),
            mesh=mesh,
        )
    enc = encode_as_run(cfg, tok, problems, cfg.data.prompt_overflow)
    info = {
        "train_rows_skipped": report.num_skipped,
        "train_prompts_over_length": enc.num_overflow,
        "train_problems": len(enc.problems),
    }
    eval_sets = {}
    for name in cfg.data.eval:
        try:
            bench = load_benchmark(name)
            bench.report.check(cfg.data.max_bad_share, "data.max_bad_share")
        except (ValueError, FileNotFoundError) as e:
            raise ConfigError(f"config field `data.eval`: {e}") from None
        reports.append(bench.report)
        e = encode_as_run(cfg, tok, bench.problems)
        eval_sets[bench.name] = (e.problems, e.token_ids)
    if cfg.data.reward == "exact":
        reward_fn, close = exact_reward, (lambda: None)
    elif cfg.data.reward == "last_number":
        reward_fn, close = last_number_match, (lambda: None)
    else:
        grader = Grader()
        reward_fn = lambda rs, ans: grader.grade_batch(  # noqa: E731
            rs, ans, require_single_boxed=cfg.data.require_single_boxed
        )
        close = grader.close
    task = Task(
        tokenizer=tok,
        eos_ids=eos,
        pad_id=pad,
        train_problems=enc.problems,
        train_prompts=enc.token_ids,
        eval_sets=eval_sets,
        reward_fn=reward_fn,
        extract_fn=answer_extractor(cfg.data.reward),  # voting groups what the reward grades
        close=close,
    )
    # Skipped rows, by file and reason with their first line numbers: on the console and in
    # summary.json (`data_rows_skipped`).
    info["data_rows_skipped"] = {r.source: r.to_json() for r in reports if r.num_skipped}
    if jax.process_index() == 0:
        for r in reports:
            if r.num_skipped:
                print(f"data: {r.skipped_line()}", file=sys.stderr)
    return model, task, info


def build_task(
    cfg: Config, mesh: Mesh | None, abstract: bool
) -> tuple[Transformer, Task, dict[str, Any]]:
    """The policy (abstract shapes only when `abstract`: a resumed run restores the weights),
    the task and the set-up facts worth recording in run_info.json."""
    if cfg.model.toy is not None:
        return toy_setup(cfg, abstract)
    return real_setup(cfg, mesh, abstract)
