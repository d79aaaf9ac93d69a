"""`python -m laserjax calibrate`: measure c_ref, the self-reward's reference constant
(LASER_SPEC section 1), with `laserjax.calibrate`.

    python -m laserjax calibrate --model Qwen/Qwen2.5-7B --data pairs.jsonl --n 300
"""

from __future__ import annotations

import argparse
import json
import pathlib
import random
from typing import Any

import jax

from laserjax import sharding
from laserjax.calibrate import calibration_warnings, measure_c_ref, read_pairs, sample_responses
from laserjax.config import MeshConfig, parse_ids, token_id_problem
from laserjax.config_load import add_config_flag, field_default
from laserjax.data import PLAIN_SUFFIX, build_prompt, load_problems
from laserjax.model import TransformerConfig, hf_params
from laserjax.model.fetch import resolve_model


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        required=True,
        help="the starting policy: a Hugging Face checkpoint directory or hub id",
    )
    parser.add_argument(
        "--data",
        required=True,
        help="jsonl with a prompt field per row and, "
        "optionally, a response field (rows without one are sampled); or a generated "
        "arithmetic:... source (responses sampled)",
    )
    parser.add_argument(
        "--prompt-field",
        default="problem",
        help="field holding the problem text (default: problem)",
    )
    parser.add_argument(
        "--response-field",
        default="response",
        help="field holding a response text (default: response)",
    )
    parser.add_argument("--n", type=int, default=300, help="pairs to measure (the paper: 300)")
    add_config_flag(
        parser,
        "--z-token-id",
        "tokens.self_reward_token_id",
        default=None,
        help="z_c (Qwen2.5's <|vision_start|>; Llama-3 / OctoThinker: 128002)",
    )
    parser.add_argument(
        "--eos-id",
        help="EOS ids, comma separated; the first is appended to "
        "responses without one (default: the checkpoint's generation_config)",
    )
    add_config_flag(
        parser, "--template", "data.template", help="the prompt template of training", default=None
    )
    parser.add_argument(
        "--instruction",
        default=PLAIN_SUFFIX,
        help="the line after each problem (data.instruction; default the paper's)",
    )
    parser.add_argument(
        "--system-prompt",
        default="",
        help="a system turn for the chat template (data.system_prompt)",
    )
    parser.add_argument(
        "--fewshot",
        nargs="*",
        default=[],
        metavar="Q=>A",
        help="worked examples before each problem, as 'question=>answer' (data.fewshot)",
    )
    parser.add_argument(
        "--compare-z-token-ids",
        type=lambda t: [int(x) for x in t.replace(",", " ").split()],
        default=[],
        metavar="IDS",
        help="other z_c candidates (comma-separated) measured on the same pairs",
    )
    add_config_flag(parser, "--beta-v", "laser.beta_v", help="beta_v, for the log Z check")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=8,
        help="sequences per forward; the dense attention of one layer holds "
        "batch x heads x length^2 float32 scores",
    )
    add_config_flag(
        parser,
        "--max-new-tokens",
        "rollout.max_new_tokens",
        help="length limit of responses",
        default=None,
    )
    add_config_flag(
        parser,
        "--temperature",
        "rollout.temperature",
        help="sampling temperature of generated responses (the rollouts')",
    )
    parser.add_argument(
        "--dtype",
        choices=("bfloat16", "float32"),
        default=None,
        help="compute dtype; match the training run's model.dtype (default: the model's "
        "laserjax.json, else bfloat16)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the row sample and of generation"
    )
    parser.add_argument(
        "--devices",
        type=int,
        default=None,
        help="devices to shard the model over (fsdp; default: all local ones)",
    )


def _parse_ids(text: str) -> tuple[int, ...]:
    try:
        return parse_ids(text)
    except ValueError as e:
        raise SystemExit(f"calibrate: --eos-id: {e}") from None


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Measure c_ref; print a sentence, any warnings and a one-line JSON summary."""
    from transformers import AutoTokenizer

    # A laserjax export says how its policy was prompted and which token is z_c (laserjax.json).
    args = hf_params.with_export_defaults(
        args,
        {
            "z_token_id": ("self_reward_token_id", field_default("tokens.self_reward_token_id")),
            "template": ("template", field_default("data.template")),
            "dtype": ("dtype", field_default("model.dtype")),
            "max_new_tokens": ("max_new_tokens", 8192),
        },
    )

    if args.n < 1:
        raise SystemExit(f"calibrate: --n must be >= 1, got {args.n}")
    if args.data.startswith("arithmetic:"):
        try:
            problems, _ = load_problems(args.data)
        except ValueError as e:
            raise SystemExit(f"calibrate: {e}") from None
        rows = [(p.problem, None) for p in problems]
        rows = random.Random(args.seed).sample(rows, min(args.n, len(rows)))
        info: dict[str, Any] = {"rows_skipped": 0}
    else:
        path = pathlib.Path(args.data)
        if not path.is_file():
            raise SystemExit(f"calibrate: --data {str(path)!r} not found")
        try:
            rows, info = read_pairs(path, args.prompt_field, args.response_field, args.n, args.seed)
        except ValueError as e:
            raise SystemExit(f"calibrate: {e}") from None
    ckpt = resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(str(ckpt))
    try:
        eos_ids, pad_id = hf_params.special_token_ids(
            ckpt, tokenizer, eos_ids=_parse_ids(args.eos_id) if args.eos_id else ()
        )
    except ValueError as e:
        raise SystemExit(f"calibrate: {e}") from None
    vocab = TransformerConfig.from_pretrained_dir(ckpt).vocab_size
    problem = token_id_problem(args.z_token_id, eos_ids, pad_id, vocab)
    if problem is not None:  # before loading any weights
        flag = {"self_reward_token_id": "--z-token-id", "eos_ids": "--eos-id"}.get(problem[0])
        raise SystemExit(f"calibrate: {flag or problem[0]}: {problem[1]}")
    devices = jax.devices()[: args.devices] if args.devices else jax.devices()
    mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=-1), devices)
    model = hf_params.load_pretrained(
        str(ckpt), dtype=args.dtype, param_dtype=args.dtype, mesh=mesh
    )

    fewshot = []
    for pair in args.fewshot:
        question, sep, answer = pair.partition("=>")
        if not sep:
            raise SystemExit(f"calibrate: --fewshot {pair!r}: write 'question=>answer'")
        fewshot.append((question.strip(), answer.strip()))
    try:
        prompts = [
            build_prompt(
                problem,
                tokenizer,
                args.template,
                instruction=args.instruction,
                system=args.system_prompt,
                fewshot=fewshot,
            )
            for problem, _ in rows
        ]
    except ValueError as e:
        raise SystemExit(f"calibrate: {e}") from None
    responses: list[list[int] | None] = [
        None if text is None else tokenizer(text, add_special_tokens=False)["input_ids"]
        for _, text in rows
    ]
    missing = [i for i, r in enumerate(responses) if r is None]
    sampler_logp: dict[int, float] = {}
    if missing:
        generated, logps = sample_responses(
            model,
            [prompts[i] for i in missing],
            eos_ids=eos_ids,
            pad_id=pad_id,
            z_token_id=args.z_token_id,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            seed=args.seed,
            mesh=mesh,
        )
        for i, g, lp in zip(missing, generated, logps, strict=True):
            responses[i] = g
            if lp is not None:
                sampler_logp[i] = lp
    keep = [i for i, r in enumerate(responses) if r is not None]
    if not keep:
        raise SystemExit(
            "calibrate: every generated response was truncated (no EOS within "
            f"--max-new-tokens {args.max_new_tokens}); raise it or give responses"
        )
    mean, std, values = measure_c_ref(
        model,
        [prompts[i] for i in keep],
        [responses[i] for i in keep],
        eos_id=eos_ids,
        z_token_id=args.z_token_id,
        batch_size=args.batch_size,
        mesh=mesh,
    )
    candidates = {}
    for z in args.compare_z_token_ids:
        # The same pairs, another z_c: which special token is the most constant (spec claim 1).
        z_mean, z_std, z_values = measure_c_ref(
            model,
            [prompts[i] for i in keep],
            [responses[i] for i in keep],
            eos_id=eos_ids,
            z_token_id=z,
            batch_size=args.batch_size,
            mesh=mesh,
        )
        candidates[str(z)] = {
            "token": tokenizer.convert_ids_to_tokens(z),
            "c_ref": round(z_mean, 4),
            "std": round(z_std, 4),
            "min": round(float(z_values.min()), 4),
            "max": round(float(z_values.max()), 4),
        }
    warnings = calibration_warnings(values, args.beta_v)
    summary: dict[str, Any] = {
        "c_ref": round(mean, 4),
        "std": round(std, 4),
        "n": len(keep),
        "min": round(float(values.min()), 4),
        "max": round(float(values.max()), 4),
        "given_responses": len(rows) - len(missing),
        "generated_responses": len(sampler_logp),
        "truncated_dropped": len(missing) - len(sampler_logp),
        "model": args.model,
        "z_token_id": args.z_token_id,
        "eos_ids": list(eos_ids),
        "template": args.template,
        "dtype": args.dtype,
        "beta_v": args.beta_v,
        **info,
        "warnings": warnings,
    }
    if candidates:
        summary["candidates"] = candidates
    if sampler_logp:
        # The sampler's decode-step read and the teacher-forced forward are two computations of
        # the same number (spec sections 1 and 5); their gap is worth seeing.
        pos = {i: j for j, i in enumerate(keep)}
        summary["sampler_vs_forward_max_abs_diff"] = round(
            max(abs(sampler_logp[i] - values[pos[i]]) for i in sampler_logp), 6
        )
    print(
        f"c_ref = {mean:.4f} (std {std:.4f} over {len(keep)} pairs): set `laser.c_ref: "
        f"{mean:.2f}` in the config (LASER_SPEC section 1)."
    )
    for w in warnings:
        print(f"warning: {w}")
    print(json.dumps(summary))
    return summary
