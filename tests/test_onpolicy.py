"""On-policy sequences (steps/distill/onpolicy.py) on the tiny Llama: prompts, sampling, masks, loss."""

import functools

import pytest
import torch

from conftest import make_model_dir, reference_kd
from steps.prepared import load_split
from steps.distill.onpolicy import OnPolicySettings, check, generate, on_policy_loss, prompts, rows_on_policy
from steps.losses import forward_kl
from steps.models import load_model, load_tokenizer

PAD = 0  # the demo tokenizer's pad (= eos); a token id the prompts below also use, so only the mask tells padding apart


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Token-by-token sampling of a 32-wide model is all tiny matmuls: more threads only wait on each other,
    and on a busy 2-core machine they make the file several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, tokenizer_dir):
    return make_model_dir(tmp_path_factory.mktemp("onpolicy") / "teacher", tokenizer_dir, seed=1, num_hidden_layers=3)


@pytest.fixture(scope="module")
def blocks(data_dir):
    return load_split(data_dir, "train")[:4]


def load(path):
    """A tiny model whose pad token has a real embedding, as a trained model's end-of-text token does: the
    scratch init zeroes that row (padding_idx), which would hide a mask that lets padding in."""
    model = load_model(path)
    with torch.no_grad():
        row = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(0))
        model.model.embed_tokens.weight[PAD] = row
    return model


def tiny_gpt2():
    """A tiny GPT-2: absolute position embeddings, so a padded row reads right only with the right position_ids
    (Llama's rotary attention sees relative positions alone and forgives a shift)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=400, n_positions=64, n_embd=32, n_layer=2, n_head=2)
    config.bos_token_id = config.eos_token_id = config.pad_token_id = PAD
    return GPT2LMHeadModel(config).eval()  # eval: no dropout


def padded_prompts():
    """Three prompts of 2, 5 and 3 tokens, left-padded to 5. Row 0's prompt is [17, PAD]: its last token has
    the pad's value (an end-of-text token, as packed blocks hold), which only the mask tells apart from padding."""
    prompt_ids = torch.tensor([[PAD, PAD, PAD, 17, PAD], [5, 6, 7, 8, 9], [PAD, PAD, 40, 41, 42]])
    mask = torch.tensor([[0, 0, 0, 1, 1], [1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    return prompt_ids, mask


# ---------------------------------------------------------------- settings


@pytest.mark.parametrize(
    "batch_size, share, rows",
    [(8, 0.0, 0), (8, 0.01, 1), (1, 0.3, 1), (8, 0.25, 2), (8, 0.3, 2), (8, 0.33, 3), (4, 0.625, 3), (8, 1.0, 8),
     (3, 0.9, 3), (16, 0.5, 8), (0, 0.5, 0)],
)
def test_rows_on_policy_is_the_nearest_count_at_least_one_when_on(batch_size, share, rows):
    assert rows_on_policy(batch_size, share) == rows


@pytest.mark.parametrize(
    "change, message",
    [
        ({"share": 1.5}, r"distill\.on_policy\.share is 1\.5; .* between 0 and 1"),
        ({"share": -0.1}, r"distill\.on_policy\.share is -0\.1"),
        ({"prompt_tokens": 0}, r"distill\.on_policy\.prompt_tokens is 0 .* set it between 1 and 31"),
        ({"prompt_tokens": 32}, r"prompt_tokens is 32 but the data's blocks hold 32 tokens; set it between 1 and 31"),
        ({"max_new_tokens": 0}, r"distill\.on_policy\.max_new_tokens is 0; .* 1 or more"),
        ({"temperature": 0.0}, r"distill\.on_policy\.temperature is 0\.0; .* above 0"),
        ({"top_k": -1}, r"distill\.on_policy\.top_k is -1; set it to 0 \(full vocabulary\)"),
    ],
)
def test_check_refuses_each_bad_setting_in_one_line(change, message):
    with pytest.raises(SystemExit, match=message) as err:
        check(OnPolicySettings(**change), block_size=32)
    assert "\n" not in str(err.value)


def test_check_accepts_the_edges():
    check(OnPolicySettings(), block_size=32)
    check(OnPolicySettings(share=1.0, prompt_tokens=31, max_new_tokens=1, temperature=0.1, top_k=1), block_size=32)
    check(OnPolicySettings(share=0.0, prompt_tokens=1, top_k=0), block_size=32)


# ---------------------------------------------------------------- prompts


def test_plain_blocks_prompt_with_their_first_tokens(blocks):
    ids, labels = blocks["input_ids"], blocks["labels"]
    assert (labels == ids).all()  # the demo data is plain text: every token learned
    prompt_ids, mask = prompts(ids, labels, OnPolicySettings(prompt_tokens=5), pad_id=PAD)
    assert prompt_ids.tolist() == [row[:5] for row in ids.tolist()]
    assert mask.tolist() == [[1] * 5] * len(ids)


def test_instruction_rows_prompt_with_their_masked_prompt_right_aligned(blocks):
    """Rows 0 and 1 open with 3 and 7 masked labels (instruction prompts); row 2 learns from its first
    token and row 3 learns nothing: both fall back to the first prompt_tokens = 5 tokens."""
    ids = blocks["input_ids"].clone()
    ids[0, 1] = PAD  # a real token equal to the pad id: the mask, not the value, marks padding
    labels = ids.clone()
    labels[0, :3] = -100
    labels[1, :7] = -100
    labels[1, 20:] = -100  # a later masked run (the next record's prompt) changes nothing
    labels[2, 10:15] = -100
    labels[3, :] = -100
    prompt_ids, mask = prompts(ids, labels, OnPolicySettings(prompt_tokens=5), pad_id=PAD)
    rows = ids.tolist()
    assert prompt_ids.tolist() == [
        [PAD] * 4 + rows[0][:3],
        rows[1][:7],
        [PAD] * 2 + rows[2][:5],
        [PAD] * 2 + rows[3][:5],
    ]
    assert mask.tolist() == [[0] * 4 + [1] * 3, [1] * 7, [0] * 2 + [1] * 5, [0] * 2 + [1] * 5]


def test_a_masked_prompt_is_kept_whole_up_to_block_size_minus_one(blocks):
    ids = blocks["input_ids"][:2]
    labels = ids.clone()
    labels[0, :31] = -100  # only the last token is learned
    prompt_ids, mask = prompts(ids, labels, OnPolicySettings(prompt_tokens=4), pad_id=PAD)
    assert prompt_ids.shape == (2, 31)
    assert prompt_ids[0].tolist() == ids[0, :31].tolist()
    assert prompt_ids[1, -4:].tolist() == ids[1, :4].tolist() and mask[1].sum() == 4


# ---------------------------------------------------------------- generate


def test_generated_sequences_keep_the_prompt_and_mask_it(model_dir):
    student = load(model_dir).train()
    prompt_ids, mask = padded_prompts()
    torch.manual_seed(0)
    seq = generate(student, prompt_ids, mask, OnPolicySettings(max_new_tokens=6), pad_id=PAD)
    assert all(seq[key].shape == (3, 11) for key in ("input_ids", "labels", "attention_mask", "position_ids"))
    assert (seq["input_ids"][:, :5] == prompt_ids).all()
    assert (seq["labels"][:, :5] == -100).all()
    assert (seq["labels"][:, 5:] == seq["input_ids"][:, 5:]).all() and (seq["labels"][:, 5:] >= 0).all()
    assert seq["attention_mask"].tolist() == [m + [1] * 6 for m in mask.tolist()]
    # the first real token sits at position 0 whatever the padding
    assert seq["position_ids"].tolist() == [[0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7], list(range(11)), [0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8]]
    assert student.training  # put back in the mode it came in


def test_generation_is_seeded_runs_in_eval_mode_and_restores_the_mode(model_dir):
    student = load(model_dir)
    prompt_ids, mask = padded_prompts()
    settings = OnPolicySettings(max_new_tokens=8, temperature=1.5, top_k=50)
    modes = set()
    student.register_forward_pre_hook(lambda module, args: modes.add(module.training))
    runs = []
    for seed, mode in ((3, True), (3, False), (4, True)):
        student.train(mode)
        torch.manual_seed(seed)
        runs.append(generate(student, prompt_ids, mask, settings, pad_id=PAD)["input_ids"])
        assert student.training == mode  # put back in the mode it came in
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
    assert modes == {False}  # sampled in eval mode (no dropout), even when training


def test_eos_does_not_stop_a_row(model_dir):
    """Every token declared an end token: a generate that honoured EOS would stop after one token."""
    student = load(model_dir)
    student.generation_config.eos_token_id = list(range(student.config.vocab_size))
    prompt_ids, mask = padded_prompts()
    seq = generate(student, prompt_ids, mask, OnPolicySettings(max_new_tokens=7), pad_id=PAD)
    assert seq["input_ids"].shape == (3, 12)
    assert (seq["attention_mask"][:, 5:] == 1).all()


def test_sampling_follows_the_settings_not_the_models_generation_defaults(model_dir):
    """A released model may ship top_p / repetition_penalty defaults; the settings alone decide sampling."""
    student = load(model_dir)
    prompt_ids, mask = padded_prompts()
    settings = OnPolicySettings(max_new_tokens=12)
    torch.manual_seed(0)
    plain = generate(student, prompt_ids, mask, settings, pad_id=PAD)["input_ids"]
    student.generation_config.top_p = 0.05
    student.generation_config.repetition_penalty = 5.0
    torch.manual_seed(0)
    assert torch.equal(generate(student, prompt_ids, mask, settings, pad_id=PAD)["input_ids"], plain)


@pytest.mark.parametrize("settings", [OnPolicySettings(max_new_tokens=4, top_k=1), OnPolicySettings(max_new_tokens=4, temperature=1e-5)],
                         ids=["top_k=1", "temperature=1e-5"])
def test_top_k_one_or_a_near_zero_temperature_samples_the_greedy_continuation(model_dir, settings):
    student = load(model_dir)
    prompt_ids, mask = padded_prompts()
    torch.manual_seed(0)
    seq = generate(student, prompt_ids, mask, settings, pad_id=PAD)
    with torch.no_grad():
        logits = student(input_ids=seq["input_ids"], attention_mask=seq["attention_mask"], position_ids=seq["position_ids"]).logits
    assert torch.equal(logits[:, 4:-1].argmax(-1), seq["input_ids"][:, 5:])


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_a_left_padded_row_reads_like_the_same_row_unpadded(model_dir, kind):
    student = load(model_dir) if kind == "llama" else tiny_gpt2()
    prompt_ids, mask = padded_prompts()
    torch.manual_seed(0)
    seq = generate(student, prompt_ids, mask, OnPolicySettings(max_new_tokens=6), pad_id=PAD)
    inputs = {key: seq[key] for key in ("input_ids", "attention_mask", "position_ids")}
    with torch.no_grad():
        batched = student(**inputs).logits
        for row in (0, 2):
            real = seq["attention_mask"][row].bool()
            ids = seq["input_ids"][row, real][None]
            alone = student(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0]
            torch.testing.assert_close(batched[row, real], alone, atol=1e-4, rtol=0)
    assert torch.isfinite(batched).all()  # padding positions too: a NaN there would poison a masked mean


def test_a_padded_rows_loss_equals_the_loss_of_the_row_alone():
    """On an absolute-position model the loss must feed position_ids, not only the attention mask."""
    student, teacher = tiny_gpt2(), tiny_gpt2()
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
    prompt_ids, mask = padded_prompts()
    torch.manual_seed(0)
    seq = generate(student, prompt_ids, mask, OnPolicySettings(max_new_tokens=6), pad_id=PAD)
    kd = functools.partial(forward_kl, temperature=1.0)
    with torch.no_grad():
        for row in (0, 2):
            real = seq["attention_mask"][row].bool()
            alone = {key: value[row, real][None] for key, value in seq.items()}
            alone["position_ids"] = torch.arange(int(real.sum()))[None]
            padded = {key: value[row : row + 1] for key, value in seq.items()}
            expected = on_policy_loss(student, teacher, alone, kd, vocab=400)
            torch.testing.assert_close(on_policy_loss(student, teacher, padded, kd, vocab=400), expected, atol=1e-5, rtol=1e-5)


def test_generate_unwraps_a_ddp_student(model_dir, tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    student = load(model_dir)
    prompt_ids, mask = padded_prompts()
    settings = OnPolicySettings(max_new_tokens=5)
    torch.manual_seed(0)
    expected = generate(student, prompt_ids, mask, settings, pad_id=PAD)["input_ids"]
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        wrapped = DistributedDataParallel(student).train()
        torch.manual_seed(0)
        assert torch.equal(generate(wrapped, prompt_ids, mask, settings, pad_id=PAD)["input_ids"], expected)
        assert wrapped.training and student.training
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------- loss


def padded_vocab_model(path, extra: int = 16):
    """The model with its embedding rows padded past the tokenizer, the padding rows loud enough to
    dominate a softmax they were let into."""
    model = load(path)
    vocab = model.config.vocab_size
    model.resize_token_embeddings(vocab + extra)
    with torch.no_grad():
        model.lm_head.weight[vocab:] = 50 * model.lm_head.weight[:extra]
    return model


def test_loss_is_the_kd_over_generated_tokens_only(model_dir, teacher_dir, tokenizer_dir):
    vocab = len(load_tokenizer(tokenizer_dir))
    student, teacher = padded_vocab_model(model_dir), padded_vocab_model(teacher_dir).eval()
    prompt_ids, mask = padded_prompts()
    torch.manual_seed(0)
    seq = generate(student, prompt_ids, mask, OnPolicySettings(max_new_tokens=6), pad_id=PAD, vocab=vocab)
    assert seq["input_ids"].max() < vocab  # the loud padding rows are never sampled
    loss = on_policy_loss(student, teacher, seq, functools.partial(forward_kl, temperature=2.0), vocab=vocab)

    inputs = {key: seq[key] for key in ("input_ids", "attention_mask", "position_ids")}
    with torch.no_grad():
        s_logits, t_logits = student(**inputs).logits[..., :vocab], teacher(**inputs).logits[..., :vocab]
    scored = torch.zeros(3, 10, dtype=torch.bool)
    scored[:, 4:] = True  # logits at 4..9 predict the generated tokens at 5..10; the prompt's are not scored
    expected = reference_kd(s_logits[:, :-1], t_logits[:, :-1], scored, temperature=2.0, beta=0.5)["forward_kl"]
    torch.testing.assert_close(loss.detach(), expected, atol=1e-5, rtol=1e-5)


def test_the_mask_scores_every_generated_token_and_nothing_else(model_dir, teacher_dir):
    student, teacher = load(model_dir), load(teacher_dir)
    prompt_ids, mask = padded_prompts()
    seq = generate(student, prompt_ids, mask, OnPolicySettings(max_new_tokens=6), pad_id=PAD)
    seen = {}

    def recording_kd(s_logits, t_logits, scored):
        seen.update(shape=s_logits.shape, teacher_shape=t_logits.shape, scored=scored)
        return forward_kl(s_logits, t_logits, scored)

    on_policy_loss(student, teacher, seq, recording_kd, vocab=student.config.vocab_size)
    assert seen["shape"] == seen["teacher_shape"] == (3, 10, student.config.vocab_size)
    assert seen["scored"].tolist() == [[False] * 4 + [True] * 6] * 3


def test_generated_tokens_reach_the_loss_and_its_gradient_reaches_the_student(model_dir, teacher_dir):
    student, teacher = load(model_dir), load(teacher_dir)  # the teacher left trainable on purpose
    prompt_ids, mask = padded_prompts()
    torch.manual_seed(0)
    seq = generate(student, prompt_ids, mask, OnPolicySettings(max_new_tokens=6), pad_id=PAD)
    kd = functools.partial(forward_kl, temperature=1.0)
    vocab = student.config.vocab_size
    loss = on_policy_loss(student, teacher, seq, kd, vocab=vocab)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert all(p.grad is None for p in teacher.parameters())  # the teacher ran without a graph

    changed = {key: value.clone() for key, value in seq.items()}
    changed["input_ids"][1, 7] = (changed["input_ids"][1, 7] + 1) % vocab  # a generated token the student wrote
    changed["labels"][1, 7] = changed["input_ids"][1, 7]
    with torch.no_grad():
        assert on_policy_loss(student, teacher, changed, kd, vocab=vocab) != loss.detach()
