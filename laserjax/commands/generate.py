"""`python -m laserjax generate`: sample from a model and print each continuation with its r_s.

A smoke test of the rollout sampler (LASER_SPEC section 5): K samples of one prompt from one
prefill, each printed with how it ended and, for finished samples, log p(z_c | x, y, <eos>) and
the self-reward r_s = beta_v * (log p(z_c) - c_ref) of LASER_SPEC section 1.

    python -m laserjax generate --model Qwen/Qwen2.5-0.5B-Instruct --prompt "1 + 1 =" --chat
    python -m laserjax generate --tiny --ids 5,6,7 --k 4      # random tiny model, no download
"""

from __future__ import annotations

import argparse
import json
import pathlib
from typing import Any

from flax import nnx

from laserjax import laser
from laserjax.config import parse_ids
from laserjax.config_load import add_config_flag, field_default
from laserjax.model import Transformer, TransformerConfig, hf_params
from laserjax.model.fetch import resolve_model
from laserjax.sampler import Sampler

TINY_VOCAB = 256
TINY_EOS = tuple(range(16))
"""A random tiny model spreads its mass over 256 ids: 16 of them as EOS end most samples early."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="a Hugging Face checkpoint directory or hub id")
    src.add_argument(
        "--tiny",
        action="store_true",
        help=f"a tiny random Qwen2 model (vocab {TINY_VOCAB}; token ids only)",
    )
    text = parser.add_mutually_exclusive_group()
    text.add_argument("--prompt", help="prompt text (needs the checkpoint's tokenizer)")
    text.add_argument("--ids", help="prompt token ids, comma or space separated")
    parser.add_argument(
        "--chat",
        action="store_true",
        help="wrap --prompt as a user message in the tokenizer's chat template",
    )
    parser.add_argument("--k", type=int, default=2, help="samples of the prompt (one prefill)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    add_config_flag(parser, "--temperature", "rollout.temperature", help="0 = greedy")
    add_config_flag(parser, "--top-p", "rollout.top_p")
    add_config_flag(parser, "--top-k", "rollout.top_k", help="0 = full vocabulary")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--eos-ids",
        help="EOS ids, comma separated (default: the checkpoint's generation_config / tokenizer)",
    )
    parser.add_argument(
        "--pad-id",
        type=int,
        default=None,
        help="default: the tokenizer's pad id, else the first EOS id",
    )
    parser.add_argument(
        "--self-reward-token-id",
        type=int,
        default=None,
        help=f"z_c (default {field_default('tokens.self_reward_token_id')}, Qwen2.5's "
        f"<|vision_start|>, or {TINY_VOCAB - 1} for --tiny; Llama-3: 128002)",
    )
    add_config_flag(parser, "--beta-v", "laser.beta_v", default=None)
    add_config_flag(
        parser,
        "--c-ref",
        "laser.c_ref",
        type=float,
        default=None,
        help="from the run that exported the model; measure it for another model: "
        "`python -m laserjax calibrate`",
    )
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--json", action="store_true", help="one JSON object per sample")


def _ids(text: str, what: str) -> list[int]:
    try:
        return list(parse_ids(text))
    except ValueError as e:
        raise SystemExit(f"{what}: {e}") from None


def load_tokenizer(ckpt: pathlib.Path) -> Any:
    if not any((ckpt / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(ckpt)


def run(args: argparse.Namespace) -> None:
    # A laserjax export carries the z_c and c_ref of the run that trained it (laserjax.json).
    args = hf_params.with_export_defaults(
        args,
        {
            "self_reward_token_id": ("self_reward_token_id", None),
            "c_ref": ("c_ref", -23.0),
            "beta_v": ("beta_v", 0.1),
        },
    )
    tokenizer = None
    if args.tiny:
        cfg = TransformerConfig(
            model_type="qwen2",
            vocab_size=TINY_VOCAB,
            hidden_size=64,
            intermediate_size=128,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            head_dim=16,
            tie_word_embeddings=True,
            qkv_bias=True,
            dtype=args.dtype,
            param_dtype=args.dtype,
        )
        model = Transformer(cfg, rngs=nnx.Rngs(args.seed))
        eos_default, pad_default, zc_default = TINY_EOS, 0, TINY_VOCAB - 1
        if args.prompt is not None:
            raise SystemExit("--prompt needs a tokenizer; the --tiny model takes --ids")
    else:
        ckpt = resolve_model(args.model)
        model = hf_params.load_pretrained(str(ckpt), dtype=args.dtype, param_dtype=args.dtype)
        tokenizer = load_tokenizer(ckpt)
        explicit = tuple(_ids(args.eos_ids, "--eos-ids")) if args.eos_ids else ()
        try:
            eos_default, pad_default = hf_params.special_token_ids(
                ckpt, tokenizer, eos_ids=explicit, pad_id=-1 if args.pad_id is None else args.pad_id
            )
        except ValueError as e:
            raise SystemExit(f"--eos-ids: {e}") from None
        zc_default = field_default("tokens.self_reward_token_id")

    eos_ids = _ids(args.eos_ids, "--eos-ids") if args.eos_ids else list(eos_default)
    pad_id = pad_default if args.pad_id is None else args.pad_id
    zc = zc_default if args.self_reward_token_id is None else args.self_reward_token_id
    if args.ids is not None:
        prompt = _ids(args.ids, "--ids")
    elif args.prompt is not None:
        if tokenizer is None:
            raise SystemExit(f"no tokenizer files in {args.model!r}; pass --ids instead")
        if args.chat:
            prompt = list(
                tokenizer.apply_chat_template(
                    [{"role": "user", "content": args.prompt}],
                    add_generation_prompt=True,
                    tokenize=True,
                    return_dict=False,
                )
            )
        else:
            prompt = tokenizer.encode(args.prompt, add_special_tokens=False)
    else:
        prompt = [1, 2, 3, 4] if args.tiny else None
        if prompt is None:
            raise SystemExit("give the prompt: --prompt TEXT or --ids 1,2,3")

    sampler = Sampler(
        model,
        eos_ids=eos_ids,
        pad_id=pad_id,
        self_reward_token_id=zc,
        max_new_tokens=args.max_new_tokens,
        max_prompt_len=max(len(prompt), 16),
    )
    out = sampler.sample(
        [prompt],
        k=args.k,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
    )
    if not args.json:
        print(f"prompt: {len(prompt)} tokens; {args.k} samples; EOS ids {eos_ids}; z_c {zc}")
    for j in range(args.k):
        tokens = out.response_tokens[j, : out.lengths[j]].tolist()
        finished = bool(out.finished[j])
        logp = float(out.logp_zc[j]) if finished else None
        r_s = float(laser.self_reward_score(out.logp_zc[j], args.beta_v, args.c_ref))
        r_s = r_s if finished else None
        text = tokenizer.decode(tokens) if tokenizer is not None else None
        if args.json:
            print(
                json.dumps(
                    dict(
                        sample=j,
                        tokens=tokens,
                        text=text,
                        finished=finished,
                        truncated=bool(out.truncated[j]),
                        length=len(tokens),
                        logp_zc=logp,
                        r_s=r_s,
                    )
                )
            )
            continue
        end = (
            f"finished, log p(z_c) = {logp:.3f}, r_s = {r_s:.3f}"
            if finished
            else "truncated (no EOS within --max-new-tokens: no z_c, no r_s)"
        )
        print(f"\n--- sample {j}: {len(tokens)} tokens, {end}")
        print(text if text is not None else " ".join(map(str, tokens)))
