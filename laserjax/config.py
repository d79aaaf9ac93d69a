"""Run configuration: the schema, one validated dataclass per section, and nothing else.

Reading values into it (YAML files, `key=value` overrides, a command's flags, the type coercion)
is `laserjax.config_load`.

Every check that can fail does so at construction, before any compile, with a message that names
the field and the fix. Checks that need the model (token ids inside the vocabulary) run in
`Config.validate_against_vocab`, called by the trainer as soon as the model config is known.

Defaults are the paper's (LASER_SPEC section 2); the demo and real-model YAMLs under configs/
override what they must.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

from laserjax import laser


class ConfigError(ValueError):
    """A config field is invalid; the message names the field and the fix.

    `field` is the dotted field (`tokens.eos_ids`, `mesh`) and `reason` the message after it, so
    a command that set the field from a flag can name the flag instead (`flag_for`) without
    reading the message.
    """

    def __init__(self, message: str, field: str | None = None, reason: str | None = None) -> None:
        super().__init__(message)
        self.field = field
        self.reason = message if reason is None else reason

    @classmethod
    def for_field(cls, field: str, msg: str) -> ConfigError:
        """The error of `field`: "config field `<field>`: <msg>"."""
        return cls(f"config field `{field}`: {msg}", field, msg)


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def _check(cond: bool, field: str, msg: str) -> None:
    if not cond:
        raise ConfigError.for_field(field, msg)


def parse_ids(text: str) -> tuple[int, ...]:
    """Token ids written `1,2,3` or `1 2 3` (a flag's value); ValueError says what is wrong."""
    try:
        values = tuple(int(t) for t in text.replace(",", " ").split())
    except ValueError:
        raise ValueError(f"expected integers separated by commas or spaces, got {text!r}") from None
    if not values:
        raise ValueError("is empty; give at least one id")
    return values


def token_id_problem(
    self_reward_token_id: int,
    eos_ids: tuple[int, ...],
    pad_id: int | None = None,
    vocab_size: int | None = None,
) -> tuple[str, str] | None:
    """The first thing wrong with a set of special token ids, as (`TokenConfig` field, message),
    or None. The one check of z_c, EOS and pad ids: the config, the sampler, `calibrate` and the
    commands all call it and name the field their own way.

    z_c must be a token the model never emits (LASER_SPEC section 1): not an EOS id nor the pad
    id. Without `vocab_size` only the checks that need no model run; a `pad_id` of None or -1
    (resolved later from the tokenizer) is not checked against the vocabulary.
    """
    z = self_reward_token_id
    hint = "(Qwen2.5: 151652, Llama-3: 128002)"
    if z < 0:
        return "self_reward_token_id", f"must be a token id >= 0 {hint}"
    if vocab_size is not None and z >= vocab_size:
        return (
            "self_reward_token_id",
            f"z_c = {z} is outside the vocabulary [0, {vocab_size}); pick a reserved/special "
            f"token id of this model that it never emits {hint}",
        )
    if z in eos_ids:
        return (
            "self_reward_token_id",
            f"z_c = {z} is also an EOS id {list(eos_ids)}; choose a token the model never emits",
        )
    if pad_id is not None and z == pad_id:
        return "self_reward_token_id", f"z_c = {z} equals the pad id; choose another token"
    if vocab_size is not None:
        for e in eos_ids:
            if not 0 <= e < vocab_size:
                return "eos_ids", f"EOS id {e} is outside [0, {vocab_size}), the vocabulary"
        if pad_id is not None and pad_id != -1 and not 0 <= pad_id < vocab_size:
            return "pad_id", f"pad id {pad_id} is outside [0, {vocab_size}), the vocabulary"
    return None


@dataclasses.dataclass(frozen=True)
class ToyConfig:
    """`model.toy`: the CPU demo's task, its tiny transformer and the supervised warm start
    (`laserjax.toy_task`)."""

    max_operand: int = 49
    """Addition problems `a+b=` with a, b in [0, max_operand]."""
    mul_max_operand: int = 99
    """Multiplication problems `a*b=` with a in [0, mul_max_operand], b in [0, 9]; 0: none."""
    eval_problems: int = 1024
    hidden_size: int = 64
    intermediate_size: int = 192
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    sft_steps: int = 1000
    sft_batch: int = 64
    sft_learning_rate: float = 1e-3
    sft_seed: int = 0

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            _check(value >= 0, f"model.toy.{f.name}", f"must be >= 0, got {value}")
        _check(self.max_operand >= 2, "model.toy.max_operand", "must be >= 2")
        _check(
            self.hidden_size % self.num_heads == 0
            and self.num_heads % max(self.num_kv_heads, 1) == 0,
            "model.toy.hidden_size/num_heads/num_kv_heads",
            "hidden_size must divide by num_heads, num_heads by num_kv_heads",
        )


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Where the policy comes from and how it is computed."""

    path: str = ""
    """A Hugging Face hub id or a local checkpoint directory; empty for the demo's toy model."""
    toy: ToyConfig | None = None
    """The CPU demo's toy task and model instead of a checkpoint (`model.toy: {}` for the
    defaults)."""
    dtype: str = "bfloat16"
    """Activation dtype; loss math is always float32."""
    param_dtype: str = "float32"
    remat: bool = False
    """Rematerialise each transformer block in the backward pass (trades FLOPs for memory)."""
    attention: str = "auto"
    """The training and prefill forward's attention (`TransformerConfig.attention_impl`):
    `auto` takes cuDNN's fused flash attention on a GPU in bfloat16 / float16 (the train step
    1.30-1.50x PyTorch's on an H200, bench/README) and the blocked XLA attention elsewhere;
    or `blocked`, `xla` (dense scores), `cudnn`."""

    def transformer_fields(self) -> dict[str, Any]:
        """The `TransformerConfig` fields this section sets."""
        return dict(
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            remat=self.remat,
            attention_impl=self.attention,
        )

    def __post_init__(self) -> None:
        _check(
            self.attention in ("auto", "blocked", "xla", "cudnn"),
            "model.attention",
            f"unknown attention {self.attention!r}; use auto, blocked, xla or cudnn",
        )
        _check(
            self.attention != "cudnn" or self.dtype in ("bfloat16", "float16"),
            "model.attention",
            f"cudnn needs model.dtype bfloat16 or float16, not {self.dtype}; use auto",
        )
        _check(
            bool(self.path) != (self.toy is not None),
            "model.path",
            "set exactly one of `model.path` (hub id or directory) and `model.toy`",
        )
        for f in ("dtype", "param_dtype"):
            _check(
                getattr(self, f) in ("float32", "bfloat16", "float16"),
                f"model.{f}",
                f"unknown dtype {getattr(self, f)!r}; use float32, bfloat16 or float16",
            )


@dataclasses.dataclass(frozen=True)
class TokenConfig:
    """Special token ids. `self_reward_token_id` is z_c (LASER_SPEC section 1)."""

    eos_ids: tuple[int, ...] = ()
    """Ids that end a response; empty means: take them from the tokenizer/generation config."""
    pad_id: int = -1
    """-1 means: the tokenizer's pad id (or the first EOS id when it has none)."""
    self_reward_token_id: int = 151652
    """z_c: Qwen2.5 `<|vision_start|>` = 151652; Llama-3 / OctoThinker reserved id 128002."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "eos_ids", tuple(int(i) for i in self.eos_ids))
        self.check()

    def check(
        self,
        vocab_size: int | None = None,
        eos_ids: tuple[int, ...] | None = None,
        pad_id: int | None = None,
    ) -> None:
        """`token_id_problem` as a ConfigError; `eos_ids` / `pad_id` replace the configured
        ones once they are resolved from the tokenizer."""
        problem = token_id_problem(
            self.self_reward_token_id,
            self.eos_ids if eos_ids is None else tuple(eos_ids),
            self.pad_id if pad_id is None else pad_id,
            vocab_size,
        )
        if problem is not None:
            raise ConfigError.for_field(f"tokens.{problem[0]}", problem[1])


@dataclasses.dataclass(frozen=True)
class LaserConfig:
    """The LaSeR terms (LASER_SPEC sections 1-4) and the algorithm's name.

    `algorithm` is one of `laserjax.laser.ALGORITHMS`: laser, or a GRPO-family baseline without
    the self-reward terms (grpo, dr_grpo, dapo), each with its own policy-loss defaults."""

    algorithm: str = "laser"
    beta_v: float = 0.1
    c_ref: float | str = -23.0
    """Measure it for your model: `python -m laserjax calibrate` (spec section 1). `auto` measures
    it from the starting policy's first rollout batch (mean log pi_ref(z_c | x, y, eos))."""
    alpha: float = 0.1
    """Weight of the self-reward MSE."""
    tau: float = 0.1
    """Weight of the self-reward advantage A_s in the mixed advantage."""
    std_threshold: float = 0.1
    """T: a group whose score std is <= T falls back to A_v."""
    reasoning_warmup_steps: int = 200
    self_reward_warmup_steps: int = 200

    def __post_init__(self) -> None:
        _check(
            self.algorithm in laser.ALGORITHMS,
            "laser.algorithm",
            f"unknown algorithm {self.algorithm!r}; use laser or grpo (the paper's), or one "
            f"of {', '.join(a for a in laser.ALGORITHMS if a not in ('laser', 'grpo'))}",
        )
        _check(
            isinstance(self.c_ref, float | int) or self.c_ref == "auto",
            "laser.c_ref",
            f"must be a number (e.g. -23.0) or `auto`, got {self.c_ref!r}",
        )
        _check(self.beta_v > 0, "laser.beta_v", "must be > 0 (the paper uses 0.1)")
        _check(self.alpha >= 0, "laser.alpha", "must be >= 0 (the paper uses 0.1)")
        _check(0 <= self.tau <= 1, "laser.tau", "must be in [0, 1] (the paper uses 0.1)")
        _check(self.std_threshold >= 0, "laser.std_threshold", "must be >= 0 (the paper uses 0.1)")
        for f in ("reasoning_warmup_steps", "self_reward_warmup_steps"):
            _check(
                getattr(self, f) >= 0,
                f"laser.{f}",
                f"must be >= 0, got {getattr(self, f)}; use 0 to switch the warm-up off",
            )

    @property
    def enabled(self) -> bool:
        """The self-reward terms are on (the algorithm is LaSeR)."""
        return laser.ALGORITHMS[self.algorithm].self_reward


_ALGORITHM_FIELDS = ("clip_low", "clip_high", "loss_agg", "norm_adv_by_std")
"""Policy-loss fields whose default depends on `laser.algorithm`."""


@dataclasses.dataclass(frozen=True)
class PolicyLossConfig:
    """The GRPO/PPO clipped surrogate and its optional KL to the reference policy (LASER_SPEC
    section 2).

    `clip_low`, `clip_high`, `loss_agg` and `norm_adv_by_std` left unset (None) take the value of
    the run's `laser.algorithm` (`laser.ALGORITHMS`: grpo / laser 0.2 / 0.2, token-mean, std
    normalisation; dapo clip_high 0.28; dr_grpo seq-mean-token-sum-norm without std
    normalisation). Until `for_algorithm` resolves them (`Config` does) they read as GRPO's.
    """

    clip_low: float | None = None
    clip_high: float | None = None
    dual_clip: float = 3.0
    """c of dual-clip PPO for negative advantages; 0 switches it off (must be > 1 otherwise)."""
    loss_agg: str | None = None
    """token-mean, seq-mean-token-mean, seq-mean-token-sum or seq-mean-token-sum-norm."""
    loss_scale_factor: float = 0.0
    """The constant N of seq-mean-token-sum-norm (Dr. GRPO); 0 = the padded response length."""
    norm_adv_by_std: bool | None = None
    """Divide group-centred rewards by the group std (GRPO); Dr. GRPO does not."""
    kl_coef: float = 0.0
    """Weight of the KL to the reference policy (the initial weights); 0 = no reference."""
    kl_type: str = "low_var_kl"
    """k1, k2 or low_var_kl (k3), as verl's `kl_penalty`."""
    ref_param_dtype: str = ""
    """dtype of the frozen reference weights (kl_coef > 0): "" = model.param_dtype, or
    bfloat16 to halve their memory."""

    def __post_init__(self) -> None:
        unset = tuple(f for f in _ALGORITHM_FIELDS if getattr(self, f) is None)
        grpo = laser.ALGORITHMS["grpo"]
        for f in unset:
            object.__setattr__(self, f, getattr(grpo, f))
        object.__setattr__(self, "_unset", unset)
        for f in ("clip_low", "clip_high"):
            _check(
                getattr(self, f) > 0,
                f"policy_loss.{f}",
                "must be > 0 (the paper uses 0.2)",
            )
        _check(
            self.dual_clip == 0 or self.dual_clip > 1,
            "policy_loss.dual_clip",
            "must be 0 (off) or > 1 (the paper uses 3.0)",
        )
        _check(
            self.loss_agg in laser.LOSS_AGG_MODES,
            "policy_loss.loss_agg",
            f"use one of {', '.join(laser.LOSS_AGG_MODES)}",
        )
        _check(self.loss_scale_factor >= 0, "policy_loss.loss_scale_factor", "must be >= 0")
        _check(self.kl_coef >= 0, "policy_loss.kl_coef", "must be >= 0")
        _check(
            self.kl_type in laser.KL_KINDS,
            "policy_loss.kl_type",
            f"use one of {', '.join(laser.KL_KINDS)}",
        )
        _check(
            self.ref_param_dtype in ("", "float32", "bfloat16", "float16"),
            "policy_loss.ref_param_dtype",
            f"unknown dtype {self.ref_param_dtype!r}; use float32, bfloat16, float16 or leave "
            "it empty (model.param_dtype)",
        )

    def for_algorithm(self, algorithm: str) -> PolicyLossConfig:
        """These settings with every field left unset at construction set to `algorithm`'s
        registered default (the result has every field set)."""
        defaults = laser.ALGORITHMS[algorithm]
        return dataclasses.replace(self, **{f: getattr(defaults, f) for f in self._unset})


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW with grad-norm clipping (LASER_SPEC section 2: lr 1e-6 constant, wd 0.01, clip 1)."""

    learning_rate: float = 1e-6
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    warmup_steps: int = 0

    def __post_init__(self) -> None:
        _check(self.learning_rate > 0, "optim.learning_rate", "must be > 0")
        _check(self.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
        _check(self.grad_clip > 0, "optim.grad_clip", "must be > 0 (the paper uses 1.0)")
        _check(self.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
    """The sampler's settings for training rollouts (LASER_SPEC section 5)."""

    samples_per_prompt: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    """0 = full vocabulary."""
    max_prompt_len: int = 2048
    max_new_tokens: int = 8192
    prompt_buckets: tuple[int, ...] = ()
    """Padded prompt lengths the sampler compiles for; empty = powers of two up to
    max_prompt_len."""
    slots: int = 0
    """0: each step's rows decode as one static batch until its longest row ends. N > 0:
    continuous batching (`laserjax/continuous.py`) through N decode slots, a finished row's slot
    taking the next queued sample; the same tokens, log-probs and log p(z_c) as the static batch
    for the same seed, so training is unchanged. On a mesh the slots split over its batch axes
    (data x fsdp must divide N)."""
    gather_weights: bool = False
    """The sampler's compute-dtype weight copy. false: sharded as in training; under FSDP, XLA's
    TPU program then all-gathers the layers' weights inside every decode step (BUILD.md
    "Memory"). true: whole over fsdp (still split over tensor), gathered once per rollout: no
    weight traffic between chips per step, for the full weights / tensor on every device
    (`python -m laserjax plan` says whether it fits). No effect without an fsdp axis."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "prompt_buckets", tuple(int(b) for b in self.prompt_buckets))
        _check(self.slots >= 0, "rollout.slots", "must be >= 0 (0 = one static batch)")
        _check(self.samples_per_prompt >= 1, "rollout.samples_per_prompt", "must be >= 1 (K)")
        _check(self.temperature >= 0, "rollout.temperature", "must be >= 0 (0 = greedy)")
        _check(0 < self.top_p <= 1, "rollout.top_p", "must be in (0, 1]")
        _check(self.top_k >= 0, "rollout.top_k", "must be >= 0 (0 = full vocabulary)")
        _check(self.max_prompt_len > 0, "rollout.max_prompt_len", "must be > 0")
        _check(self.max_new_tokens > 0, "rollout.max_new_tokens", "must be > 0")
        _check(
            all(b > 0 for b in self.prompt_buckets),
            "rollout.prompt_buckets",
            "every bucket must be > 0",
        )


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Training data and held-out evaluation data."""

    train: str = ""
    """jsonl / parquet path or a Hugging Face dataset id (`hf:org/name[:split]`); empty for the
    demo, whose task is generated in code."""
    eval: tuple[str, ...] = ()
    problem_field: str = "problem"
    answer_field: str = "answer"
    reward: Literal["math_verify", "exact", "last_number"] = "math_verify"
    """math_verify: the paper's grader (LASER_SPEC section 6); exact: string equality of the
    stripped response and answer (the CPU demo's synthetic task); last_number: the last number
    of a free-text response equals the answer (`answers.extract_last_number`, which voting reads
    too)."""
    instruction: str | None = None
    """The line after each problem in the user turn; None: the paper's `\\boxed{}` request
    (`data.PLAIN_SUFFIX`), "" for none."""
    system_prompt: str = ""
    """A system turn for the chat template (empty: the template's own default)."""
    fewshot: tuple[tuple[str, str], ...] = ()
    """Worked examples, [question, answer] pairs, put before each problem as earlier chat turns."""
    require_single_boxed: bool = True
    """Training reward gate of the reference code: exactly one `\\boxed{` (spec section 6)."""
    template: Literal["chat", "plain", "raw"] = "chat"
    """chat: the tokenizer's chat template; plain: 'Question: ...\\nAnswer:'; raw: the problem
    text alone (how the CPU demo's toy policy is prompted; its exports record it)."""
    prompt_overflow: Literal["filter", "error"] = "filter"
    seed: int = 0
    max_bad_share: float = 0.1
    """Refuse a training or evaluation file when more than this share of its rows is bad
    (unreadable, not UTF-8, missing or empty problem or answer); fewer are skipped and reported
    by file, reason and line number on the console and in summary.json."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "eval", tuple(self.eval))
        shots = tuple(tuple(s) if isinstance(s, list | tuple) else (s,) for s in self.fewshot)
        _check(
            all(len(s) == 2 and all(isinstance(x, str) for x in s) for s in shots),
            "data.fewshot",
            "give a list of [question, answer] string pairs",
        )
        object.__setattr__(self, "fewshot", shots)
        _check(
            0 <= self.max_bad_share <= 1,
            "data.max_bad_share",
            f"must be in [0, 1] (a share of the rows), got {self.max_bad_share}",
        )
        _check(self.template in ("chat", "plain", "raw"), "data.template", "use chat, plain or raw")
        _check(
            self.reward in ("math_verify", "exact", "last_number"),
            "data.reward",
            "use math_verify, exact or last_number",
        )
        _check(
            self.prompt_overflow in ("filter", "error"),
            "data.prompt_overflow",
            "use filter (drop and count) or error",
        )


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh: batch over (data, fsdp), params over fsdp, heads/MLP over tensor.

    -1 on one axis means: all the devices the other axes leave.
    """

    data: int = -1
    fsdp: int = 1
    tensor: int = 1

    def __post_init__(self) -> None:
        sizes = (self.data, self.fsdp, self.tensor)
        _check(sum(s == -1 for s in sizes) <= 1, "mesh", "at most one axis may be -1")
        _check(all(s == -1 or s >= 1 for s in sizes), "mesh", "axis sizes must be >= 1 or -1")

    @classmethod
    def parse(cls, text: str) -> MeshConfig | None:
        """`data=-1,fsdp=1,tensor=1` (missing axes keep their defaults); `none` -> None (one
        device, no mesh)."""
        if text.strip().lower() == "none":
            return None
        sizes: dict[str, int] = {}
        for part in text.split(","):
            axis, sep, size = part.partition("=")
            axis = axis.strip()
            _check(
                bool(sep) and axis in ("data", "fsdp", "tensor"),
                "mesh",
                f"{part!r} is not AXIS=SIZE with AXIS one of data, fsdp, tensor "
                "(e.g. data=-1,fsdp=1,tensor=1), nor 'none'",
            )
            try:
                sizes[axis] = int(size)
            except ValueError:
                raise ConfigError.for_field(
                    "mesh", f"size {size!r} of axis {axis} is not an integer"
                ) from None
        return cls(**sizes)

    def resolve(self, devices: int | None) -> dict[str, int]:
        """Axis sizes with the -1 axis filled from `devices`, checked against it. Without a
        device count (planning ahead) the mesh must not hold a -1."""
        sizes = {"data": self.data, "fsdp": self.fsdp, "tensor": self.tensor}
        known = math.prod(s for s in sizes.values() if s != -1)
        free = [a for a, s in sizes.items() if s == -1]
        if devices is None:
            _check(
                not free,
                f"mesh.{free[0]}" if free else "mesh",
                "is -1 (all remaining devices): give the device count (plan: --devices N or "
                "--slice NAME)",
            )
            return sizes
        if free:
            _check(
                devices % known == 0,
                "mesh",
                f"{devices} devices are not divisible by the fixed axes' product {known}",
            )
            sizes[free[0]] = devices // known
        used = math.prod(sizes.values())
        _check(
            used == devices,
            "mesh",
            f"data x fsdp x tensor = {list(sizes.values())} uses {used} devices, not {devices} "
            "(the devices present); set one axis to -1 to fill the rest",
        )
        return sizes


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The loop: how many prompts per step, how long, how often to evaluate and save."""

    total_steps: int = 1000
    prompts_per_step: int = 128
    micro_batch_size: int = 0
    """Rows (samples) per micro-batch for gradient accumulation; 0 = the whole step batch (or
    mini-batch)."""
    old_logprob_source: str = "recompute"
    """The PPO ratio's old log-probs: recompute (the training forward with the pre-update
    parameters, as the official code; free with one update per batch) or rollout (the
    sampler's). metrics.jsonl logs their mismatch either way."""
    ppo_mini_batch_size: int = 0
    """Rows per optimizer update, whole prompt groups (verl's ppo_mini_batch_size x n); 0 = the
    whole step batch: one update per epoch."""
    ppo_epochs: int = 1
    """Passes over each rollout batch (verl ppo_epochs, Tunix num_iterations); the paper uses 1."""
    seed: int = 0
    eval_every: int = 0
    """0 = evaluate only at the start and the end."""
    eval_samples: int = 4
    """k for held-out maj@k / weighted maj@k."""
    save_every: int = 50
    keep_checkpoints: int = 3
    export_hf: bool = True
    tensorboard: bool = False
    wandb: bool = False
    wandb_project: str = "laserjax"
    progress_bar: bool = True
    """Show progress: a tqdm bar when stderr is a terminal; elsewhere (a pipe, a log file, a
    notebook) a plain line every `log_every` steps instead of carriage-return updates."""
    log_every: int = 10
    """Steps between progress lines when stderr is not a terminal; 0: none."""

    def __post_init__(self) -> None:
        _check(self.total_steps >= 1, "train.total_steps", "must be >= 1")
        _check(self.log_every >= 0, "train.log_every", "must be >= 0 (0: no progress lines)")
        _check(self.prompts_per_step >= 1, "train.prompts_per_step", "must be >= 1")
        _check(self.micro_batch_size >= 0, "train.micro_batch_size", "must be >= 0")
        _check(
            self.old_logprob_source in ("recompute", "rollout"),
            "train.old_logprob_source",
            f"unknown source {self.old_logprob_source!r}; use recompute or rollout",
        )
        _check(self.ppo_mini_batch_size >= 0, "train.ppo_mini_batch_size", "must be >= 0")
        _check(self.ppo_epochs >= 1, "train.ppo_epochs", "must be >= 1 (the paper uses 1)")
        _check(self.eval_every >= 0, "train.eval_every", "must be >= 0")
        _check(self.eval_samples >= 1, "train.eval_samples", "must be >= 1")
        _check(self.save_every >= 1, "train.save_every", "must be >= 1")
        _check(self.keep_checkpoints >= 1, "train.keep_checkpoints", "must be >= 1")


@dataclasses.dataclass(frozen=True)
class Config:
    model: ModelConfig = dataclasses.field(
        default_factory=lambda: ModelConfig(path="Qwen/Qwen2.5-7B")
    )
    tokens: TokenConfig = dataclasses.field(default_factory=TokenConfig)
    laser: LaserConfig = dataclasses.field(default_factory=LaserConfig)
    policy_loss: PolicyLossConfig = dataclasses.field(default_factory=PolicyLossConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    rollout: RolloutConfig = dataclasses.field(default_factory=RolloutConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    output_dir: str = "runs/laserjax"
    algorithm: str = ""
    """Shorthand for `laser.algorithm` (`algorithm=grpo` on the command line)."""

    def __post_init__(self) -> None:
        if self.algorithm:
            object.__setattr__(
                self, "laser", dataclasses.replace(self.laser, algorithm=self.algorithm)
            )
            object.__setattr__(self, "algorithm", "")
        # Written out in full, so config.yaml shows the values the run used.
        object.__setattr__(
            self, "policy_loss", self.policy_loss.for_algorithm(self.laser.algorithm)
        )
        rows = self.train.prompts_per_step * self.rollout.samples_per_prompt
        k = self.rollout.samples_per_prompt
        mini = self.train.ppo_mini_batch_size
        _check(
            mini == 0 or (rows % mini == 0 and mini % k == 0),
            "train.ppo_mini_batch_size",
            f"{mini} rows must divide the step batch's {rows} rows and be whole prompt groups "
            f"(a multiple of samples_per_prompt = {k}); or 0 for the whole batch",
        )
        mb = self.train.micro_batch_size
        _check(
            mb == 0 or rows % mb == 0,
            "train.micro_batch_size",
            f"the step batch has prompts_per_step * samples_per_prompt = {rows} rows, which "
            f"{mb} does not divide; pick a divisor of {rows} (or 0 for no accumulation)",
        )
        _check(
            mb == 0 or (mini or rows) % mb == 0,
            "train.micro_batch_size",
            f"{mb} does not divide train.ppo_mini_batch_size = {mini}; pick a divisor of it",
        )
        _check(bool(self.output_dir), "output_dir", "must be a directory path")
        if self.model.toy is not None:
            # The toy task makes its own problems: data settings that
            # would be ignored are errors, not silence.
            for name in ("train", "eval"):
                _check(
                    not getattr(self.data, name),
                    f"data.{name}",
                    "the toy task (model.toy) generates its own problems, so this would be "
                    "ignored; remove it, or set model.path (and not model.toy) to train a "
                    "real model on this data",
                )

    @property
    def rows_per_step(self) -> int:
        return self.train.prompts_per_step * self.rollout.samples_per_prompt

    def validate_against_mesh(self, mesh_shape: dict[str, int], process_count: int = 1) -> None:
        """Every divisibility the mesh implies; run as soon as the mesh is known, before any
        compile or data loading. The batch axis of the train step is split over the mesh's
        (data, fsdp) shards, so each micro-batch (the whole step batch without accumulation)
        must divide by their product; each process reads an equal share of the step's prompts.
        (The sampler pads its prompt batch to the shards, so rollouts need no check.)"""
        shards = mesh_shape.get("data", 1) * mesh_shape.get("fsdp", 1)
        prompts, k = self.train.prompts_per_step, self.rollout.samples_per_prompt
        _check(
            prompts % process_count == 0,
            "train.prompts_per_step",
            f"{prompts} prompts do not divide over the {process_count} processes; use a "
            f"multiple of {process_count}",
        )
        rows, mb = self.rows_per_step, self.train.micro_batch_size
        where = (
            f"the {shards} batch shards of the mesh (data {mesh_shape.get('data', 1)} x fsdp "
            f"{mesh_shape.get('fsdp', 1)})"
        )
        if mb:
            _check(
                mb % shards == 0,
                "train.micro_batch_size",
                f"micro-batches of {mb} rows do not split over {where}; use a multiple of "
                f"{shards} that divides the {rows} rows of the step",
            )
        else:
            _check(
                rows % shards == 0,
                "train.prompts_per_step",
                f"the step batch of prompts_per_step x samples_per_prompt = {prompts} x {k} = "
                f"{rows} rows does not split over {where}; make it a multiple of {shards} "
                f"(e.g. prompts_per_step = {_round_up(prompts, shards // math.gcd(shards, k))}),"
                " or set mesh.data to fewer devices",
            )
        slots = self.rollout.slots
        if slots:
            _check(
                slots % shards == 0,
                "rollout.slots",
                f"{slots} decode slots do not split over {where}; use a multiple of {shards}",
            )

    def validate_against_vocab(
        self, vocab_size: int, eos_ids: tuple[int, ...], pad_id: int
    ) -> None:
        """Token-id checks that need the model's vocabulary; run before any compile."""
        self.tokens.check(vocab_size, eos_ids, pad_id)
