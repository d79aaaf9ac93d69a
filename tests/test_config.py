"""Config loading: every shipped YAML validates; overrides parse; bad values name the field."""

import pathlib

import pytest
import yaml

from laserjax.config import ConfigError
from laserjax.config_load import load_config, to_dict
from laserjax.task import build_task

CONFIGS = sorted((pathlib.Path(__file__).parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_validate(path):
    cfg = load_config(path)
    assert cfg.rows_per_step % (cfg.train.micro_batch_size or cfg.rows_per_step) == 0


def test_overrides_parse_as_yaml_values():
    # A real-model config: the demo's toy task refuses data.eval (it makes its own problems).
    real = next(p for p in CONFIGS if p.name == "qwen2.5_1.5b.yaml")
    cfg = load_config(
        real,
        [
            "algorithm=grpo",
            "laser.alpha=0.05",
            "rollout.top_k=50",
            "data.eval=[math500, aime24]",
            "train.tensorboard=true",
        ],
    )
    assert cfg.laser.algorithm == "grpo" and not cfg.laser.enabled
    assert cfg.laser.alpha == 0.05 and cfg.rollout.top_k == 50
    assert cfg.data.eval == ("math500", "aime24") and cfg.train.tensorboard is True


@pytest.mark.parametrize(
    "override, field",
    [
        ("laser.reasoning_warmup_steps=-1", "laser.reasoning_warmup_steps"),
        ("train.micro_batch_size=7", "train.micro_batch_size"),
        ("laser.c_ref=abc", "laser.c_ref"),
        ("rollout.top_p=0", "rollout.top_p"),
        ("optim.learning_rate=fast", "optim.learning_rate"),
        ("laser.nonsense=1", "laser.nonsense"),
        ("algorithm=ppo", "laser.algorithm"),
        ("model.dtype=float8", "model.dtype"),
        ("model.attention=flash", "model.attention"),
    ],
)
def test_bad_values_name_the_field(override, field):
    with pytest.raises(ConfigError, match=f"`{field}`"):
        load_config(CONFIGS[0], [override])


def test_cudnn_attention_needs_a_half_precision_dtype():
    with pytest.raises(ConfigError, match="`model.attention`: cudnn needs model.dtype"):
        load_config(CONFIGS[0], ["model.attention=cudnn", "model.dtype=float32"])


def test_override_without_equals_explains_the_form():
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(None, ["laser.alpha"])


def test_vocab_checks_name_the_token_field():
    cfg = load_config(CONFIGS[0], ["tokens.self_reward_token_id=5"])
    with pytest.raises(ConfigError, match="outside the vocabulary"):
        cfg.validate_against_vocab(4, (1,), 0)
    with pytest.raises(ConfigError, match="EOS"):
        cfg.validate_against_vocab(10, (5,), 0)
    with pytest.raises(ConfigError, match="pad"):
        cfg.validate_against_vocab(10, (1,), 5)


@pytest.mark.parametrize(
    "overrides, field",
    [
        (["train.old_logprob_source=sampler"], "train.old_logprob_source"),
        (["train.ppo_epochs=0"], "train.ppo_epochs"),
        (["train.ppo_mini_batch_size=7"], "train.ppo_mini_batch_size"),
        (["train.ppo_mini_batch_size=64", "train.micro_batch_size=128"], "train.micro_batch_size"),
        (["policy_loss.kl_type=k3"], "policy_loss.kl_type"),
        (["policy_loss.kl_coef=-1"], "policy_loss.kl_coef"),
        (["policy_loss.ref_param_dtype=int8"], "policy_loss.ref_param_dtype"),
        (["policy_loss.loss_agg=sum"], "policy_loss.loss_agg"),
        (["algorithm=ppo"], "laser.algorithm"),
    ],
)
def test_grpo_term_fields_fail_naming_the_field(overrides, field):
    with pytest.raises(ConfigError, match=f"`{field}`"):
        load_config(CONFIGS[0], overrides)


def test_algorithm_defaults_fill_the_policy_loss_fields_left_unset(tmp_path):
    dapo = load_config(CONFIGS[0], ["algorithm=dapo"]).policy_loss
    assert (dapo.clip_low, dapo.clip_high, dapo.loss_agg) == (0.2, 0.28, "token-mean")
    given = load_config(CONFIGS[0], ["algorithm=dapo", "policy_loss.clip_high=0.3"])
    assert given.policy_loss.clip_high == 0.3
    dr = load_config(CONFIGS[0], ["algorithm=dr_grpo"])
    assert dr.policy_loss.loss_agg == "seq-mean-token-sum-norm"
    assert dr.policy_loss.norm_adv_by_std is False and not dr.laser.enabled
    # config.yaml (as the trainer writes it) holds the resolved values and loads back equal
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(to_dict(dr), sort_keys=False))
    assert load_config(path) == dr


@pytest.mark.parametrize("attention, expected", [("auto", "blocked"), ("xla", "xla")])
def test_model_attention_reaches_the_policy(attention, expected):
    """`model.attention` is the built policy's `attention_impl` (auto: blocked off a GPU)."""
    demo = next(p for p in CONFIGS if p.name == "demo_cpu.yaml")
    cfg = load_config(demo, [f"model.attention={attention}"])
    model, _, _ = build_task(cfg, None, abstract=True)
    assert model.cfg.attention_impl == expected
