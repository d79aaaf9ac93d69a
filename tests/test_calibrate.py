"""c_ref calibration (issue 5, LASER_SPEC section 1).

- `measure_c_ref` against a hand loop of plain single-pair forwards on a tiny random model
  (float32, 1e-5), with and without a sharded mesh;
- the command end to end on a tiny Hugging Face checkpoint and a tokenizer trained in the test,
  its c_ref against transformers' PyTorch model on the same token sequences (float32, 1e-4);
- generated responses (rows without one): the sampler's own log p(z_c) read at its extra decode
  step equals the teacher-forced forward (float32, 1e-4);
- both warnings on constructed values, and the log Z warning firing on a random model (whose
  pi(z_c) ~ 1/vocab is far from e^-23).
"""

from __future__ import annotations

import contextlib
import io
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hf_utils import load_hf_torch, make_tiny_hf

from laserjax import calibrate, cli, sharding
from laserjax.config import MeshConfig
from laserjax.model.transformer import Transformer, TransformerConfig

VOCAB, EOS, ZC = 96, 2, 90


@pytest.fixture(scope="module")
def model() -> Transformer:
    cfg = TransformerConfig(
        model_type="qwen2",
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        tie_word_embeddings=False,
        qkv_bias=True,
    )
    m = Transformer(cfg, rngs=nnx.Rngs(0))
    # Scale the 0.02-std init up so log p(z_c) varies between pairs (std 0.9 nats: a 1e-5 check
    # can fail), as the train-step tests do.
    nnx.update(m, jax.tree.map(lambda x: 4.0 * x, nnx.state(m, nnx.Param)))
    return m


def _pairs():
    """Six pairs of two total lengths (9 and 20 tokens: two padded buckets, two hand-loop
    compiles) split differently between prompt and response; two responses already end with
    EOS, one is empty (its pair is prompt, <eos>)."""
    rng = np.random.default_rng(0)
    splits = [(3, 5), (1, 8), (5, 14), (3, 16), (8, 0), (4, 15)]  # (prompt, response) lengths
    prompts = [rng.integers(3, 80, p).tolist() for p, _ in splits]
    responses = [rng.integers(3, 80, r).tolist() for _, r in splits]
    responses[1][-1] = EOS
    responses[3][-1] = EOS
    return prompts, responses


def _hand_loop(model: Transformer, prompts, responses) -> np.ndarray:
    """One plain forward per pair, no padding, log_softmax at the last position."""
    graphdef, params = nnx.split(model)

    @jax.jit  # one compile per length; eager op-by-op dispatch is slower still
    def last_logits(params, tokens_1l):
        m = nnx.merge(graphdef, params)
        positions = jnp.arange(tokens_1l.shape[1])[None]
        return m(tokens_1l, positions, jnp.ones_like(tokens_1l, bool))[0, -1]

    out = []
    for p, r in zip(prompts, responses, strict=True):
        seq = p + (r if r and r[-1] == EOS else r + [EOS])
        logits = last_logits(params, jnp.asarray([seq], jnp.int32))
        out.append(float(jax.nn.log_softmax(logits.astype(jnp.float32))[ZC]))
    return np.asarray(out)


@pytest.fixture(scope="module")
def hand_values(model) -> np.ndarray:
    return _hand_loop(model, *_pairs())


def test_measure_c_ref_equals_per_pair_forwards(model, hand_values):
    # batch_size 4: a full batch and a short one with filler rows.
    mean, std, values = calibrate.measure_c_ref(
        model, *_pairs(), eos_id=EOS, z_token_id=ZC, batch_size=4
    )
    np.testing.assert_allclose(values, hand_values, atol=1e-5, rtol=0)
    assert mean == pytest.approx(hand_values.mean(), abs=1e-5)
    assert std == pytest.approx(hand_values.std(), abs=1e-5)
    assert hand_values.std() > 0.5  # the pairs differ: a wrong row order would be caught


def test_measure_c_ref_sharded_equals_per_pair_forwards(model, hand_values):
    mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=2), jax.devices()[:4])
    # batch_size 3 rounds up to the 4 batch shards; the filler rows are never read.
    _, _, values = calibrate.measure_c_ref(
        model, *_pairs(), eos_id=EOS, z_token_id=ZC, batch_size=3, mesh=mesh
    )
    np.testing.assert_allclose(values, hand_values, atol=1e-5, rtol=0)


def test_eos_is_appended_unless_the_response_ends_with_any_eos_id():
    assert calibrate._eos_terminated([7, 8], (2, 5)) == [7, 8, 2]
    assert calibrate._eos_terminated([7, 5], (2, 5)) == [7, 5]
    assert calibrate._eos_terminated([], (2, 5)) == [2]


def test_measure_c_ref_rejects_bad_input(model):
    with pytest.raises(ValueError, match="pair 1 has token 500 outside the vocabulary"):
        calibrate.measure_c_ref(model, [[3], [4]], [[5], [500]], eos_id=EOS, z_token_id=ZC)
    with pytest.raises(ValueError, match="z_token_id: z_c = 2 is also an EOS id"):
        calibrate.measure_c_ref(model, [[3]], [[5]], eos_id=EOS, z_token_id=EOS)
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        calibrate.measure_c_ref(model, [[]], [[5]], eos_id=EOS, z_token_id=ZC)
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        calibrate.measure_c_ref(model, [[3], [4]], [[5]], eos_id=EOS, z_token_id=ZC)


def test_warnings_fire_on_constructed_values():
    quiet = np.array([-23.1, -23.15, -23.05, -23.12])  # the paper's Qwen2.5 regime
    assert calibrate.calibration_warnings(quiet, beta_v=0.1) == []
    spread = np.array([-26.0, -23.0, -24.5, -21.0])  # std 1.8 (OctoThinker's was 1.18)
    (msg,) = calibrate.calibration_warnings(spread, beta_v=0.1)
    assert "std of log pi_ref(z_c) is 1.8" in msg
    # -14: e^(-14 + 10) = 0.018 > 0.01 on one pair (the others: e^-5 = 0.0067 and below); the
    # std stays small.
    near = np.array([-15.0, -14.0, -15.5, -15.2])
    (msg,) = calibrate.calibration_warnings(near, beta_v=0.1)
    assert "log Z ~ 0 does not hold" in msg and "on 1 of 4 pairs" in msg
    # The same values are fine with a smaller 1/beta_v: e^(-14 + 5) = 1.2e-4.
    assert calibrate.calibration_warnings(near, beta_v=0.2) == []


# ---------------------------------------------------------------------------------------------
# The command, on a tiny checkpoint with a tokenizer trained here.

CORPUS = [
    "Question: what is 2 + 3 ?",
    "Please reason step by step, and put your final answer within \\boxed{}.",
    "Answer: the sum of 2 and 3 is 5 so the answer is \\boxed{5}",
    "Let x be 7 . then 2 x = 14 and x + 1 = 8",
    "compute the product of 4 and 6 : 4 * 6 = 24",
    "<user> <assistant> Assistant:",
]
CHAT_TEMPLATE = (
    "{% for m in messages %}<user> {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant> Assistant:{% endif %}"
)


def _tiny_checkpoint(tmp_path: pathlib.Path) -> pathlib.Path:
    """make_tiny_hf's Qwen2 (vocab 96) plus a BPE tokenizer trained on CORPUS (< 1 s)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    ckpt = make_tiny_hf(tmp_path, "qwen2_untied", initializer_range=0.5)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=88, special_tokens=["<pad>", "<eos>", "<unk>"])
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )
    fast.chat_template = CHAT_TEMPLATE
    assert len(fast) <= VOCAB and fast.eos_token_id == 1
    fast.save_pretrained(ckpt)
    return ckpt


def _run(argv: list[str]) -> tuple[dict, str]:
    """The command's one-line JSON summary (its last line) and all it printed."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        cli.main(["calibrate", *argv])
    text = out.getvalue()
    return json.loads(text.strip().splitlines()[-1]), text


def _torch_logp_zc(ckpt: pathlib.Path, sequences: list[list[int]], z: int) -> np.ndarray:
    import torch

    hf = load_hf_torch(ckpt)
    out = []
    with torch.no_grad():
        for seq in sequences:
            logits = hf(torch.tensor([seq])).logits[0, -1].double()
            out.append(float(torch.log_softmax(logits, -1)[z]))
    return np.asarray(out)


@pytest.mark.parametrize("template", ["chat", "plain"])
def test_cli_matches_transformers_on_given_responses(tmp_path, template):
    from transformers import AutoTokenizer

    from laserjax.data import build_prompt

    ckpt = _tiny_checkpoint(tmp_path)
    rows = [
        {"problem": "what is 2 + 3 ?", "response": "2 + 3 = 5 so \\boxed{5}"},
        {"problem": "Let x be 7 . compute 2 x", "response": "2 x = 14 <eos>"},
        {"problem": "compute 4 * 6", "response": "the product is 24"},
        {"id": 9, "response": "a row without a problem is skipped"},
    ]
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    z = 60
    summary, text = _run(
        [
            "--model",
            str(ckpt),
            "--data",
            str(data),
            "--template",
            template,
            "--z-token-id",
            str(z),
            "--dtype",
            "float32",
            "--devices",
            "1",
        ]
    )
    assert summary["n"] == 3 and summary["rows_skipped"] == 1
    assert summary["eos_ids"] == [1] and summary["generated_responses"] == 0
    assert f"c_ref = {summary['c_ref']:.4f}" in text and "laser.c_ref" in text

    tok = AutoTokenizer.from_pretrained(ckpt)
    seqs = []
    for r in rows[:3]:
        resp = tok(r["response"], add_special_tokens=False)["input_ids"]
        seqs.append(
            build_prompt(r["problem"], tok, template) + resp + ([] if resp[-1] == 1 else [1])
        )
    assert seqs[1][-1] == 1 and seqs[1][-2] != 1  # "<eos>" in the text: not appended twice
    want = _torch_logp_zc(ckpt, seqs, z)
    assert summary["c_ref"] == pytest.approx(want.mean(), abs=1e-4)
    assert summary["std"] == pytest.approx(want.std(), abs=1e-4)
    assert summary["min"] == pytest.approx(want.min(), abs=1e-4)
    # A random model spreads its mass: pi(z_c) ~ e^-5, nowhere near e^-23.
    assert any("log Z ~ 0 does not hold" in w for w in summary["warnings"])
    assert "warning: pi_ref(z_c) * e^(1/beta_v)" in text


def test_cli_generates_missing_responses_with_the_sampler(tmp_path):
    ckpt = _tiny_checkpoint(tmp_path)
    data = tmp_path / "problems.jsonl"
    data.write_text(
        "\n".join(json.dumps({"question": f"what is {i} + {i} ?"}) for i in range(6)) + "\n"
    )
    # Sixteen EOS ids make most random samples finish within 12 tokens.
    eos = ",".join(str(i) for i in [1, *range(20, 35)])
    summary, _ = _run(
        [
            "--model",
            str(ckpt),
            "--data",
            str(data),
            "--prompt-field",
            "question",
            "--template",
            "plain",
            "--eos-id",
            eos,
            "--z-token-id",
            "60",
            "--max-new-tokens",
            "12",
            "--dtype",
            "float32",
            "--devices",
            "1",
        ]
    )
    assert summary["given_responses"] == 0
    assert summary["generated_responses"] + summary["truncated_dropped"] == 6
    assert summary["generated_responses"] == summary["n"] >= 3
    assert summary["sampler_vs_forward_max_abs_diff"] <= 1e-4


def test_cli_errors_name_the_fix(tmp_path):
    ckpt = _tiny_checkpoint(tmp_path)
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"question": "q", "response": "r"}) + "\n")
    with pytest.raises(SystemExit, match="--prompt-field"):
        _run(["--model", str(ckpt), "--data", str(data), "--devices", "1"])
    with pytest.raises(SystemExit, match="--z-token-id: z_c = 500 is outside the vocabulary"):
        _run(
            [
                "--model",
                str(ckpt),
                "--data",
                str(data),
                "--prompt-field",
                "question",
                "--z-token-id",
                "500",
                "--devices",
                "1",
            ]
        )
