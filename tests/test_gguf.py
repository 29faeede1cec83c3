"""GGUF in and out: tiny Llamas with real shapes written to GGUF by llama.cpp's quantizer, run and read back by
llama.cpp and by transformers, and used as sources."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from typing import get_args

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import REPO, make_model_dir, planned_jobs
from steps.artifacts import read_manifest, weights_bytes
from steps.quantize import QuantizeSettings, run as quantize
from steps.quantize.gguf import TensorType

gguf = pytest.importorskip("gguf")

# 9 query heads over 3 KV heads (SmolLM2's grouping), head_dim 32 so rows are whole GGUF blocks;
# an MLP 160 wide (not a power of two).
GQA_ARCH = {
    "hidden_size": 288,
    "intermediate_size": 160,
    "num_hidden_layers": 2,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "max_position_embeddings": 128,
}
# Relative logit error ||gguf - float|| / ||float|| a type may cost on these random-weight models
# (measured, tied and untied alike: f16 6e-4, q8_0 1.2e-2, q4_0 0.16-0.18). The exact check is the
# comparison with the fake-quantized model below; these bound what the type itself costs.
TOLERANCE = {"f16": 2e-3, "q8_0": 3e-2, "q4_0": 0.3}
TEXT = "def f(x):\n    return x ** 2  # The Python Language Reference, 3.14 <|endoftext|> and more."


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def gqa_model(request, tmp_path_factory, tokenizer_dir):
    out = tmp_path_factory.mktemp("gguf") / ("tied" if request.param else "untied")
    return make_model_dir(out, tokenizer_dir, seed=3, **GQA_ARCH, tie_word_embeddings=request.param)


def _write(model_dir, out, gguf_type):
    quantize(str(model_dir), str(out), QuantizeSettings(scheme="gguf", type=gguf_type))
    return out


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _sample_ids(model_dir):
    return torch.tensor([AutoTokenizer.from_pretrained(model_dir)(TEXT).input_ids])


def _fake_quantized(model, gguf_file):
    """The float model with every matrix replaced by gguf's own quantize -> dequantize, in the type llama-quantize
    chose for it (read from the file: the output matrix and rows that are not whole blocks get other types).

    Quantization acts on rows and the q/k reordering moves whole rows, so the GGUF read back must equal
    this model up to float rounding: any naming, reordering, tying or metadata mistake shows, and so would
    llama.cpp rounding differently from gguf's reference code.
    """
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(gguf_file).tensors}
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, model.config.num_hidden_layers)
    tied = model.config.tie_word_embeddings
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim != 2:
                continue
            t = types[names.get_name(name, try_suffixes=(".weight",)) if not (tied and name == "lm_head.weight") else "token_embd.weight"]
            array = param.detach().numpy()
            param.copy_(torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(array, t), t)))
    return model


@pytest.mark.parametrize("gguf_type", ["f16", "q8_0", "q4_0"])
def test_gguf_reads_back_as_the_model_it_was_written_from(gqa_model, tmp_path, gguf_type):
    out = _write(gqa_model, tmp_path / gguf_type, gguf_type)
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "model.gguf"]  # no float copy kept
    back = AutoModelForCausalLM.from_pretrained(out, gguf_file="model.gguf")
    reference = AutoModelForCausalLM.from_pretrained(gqa_model)
    assert back.config.tie_word_embeddings == reference.config.tie_word_embeddings
    assert (back.config.num_attention_heads, back.config.num_key_value_heads) == (9, 3)
    ids = _sample_ids(gqa_model)
    want, got = _logits(reference, ids), _logits(back, ids)
    assert ((got - want).norm() / want.norm()).item() < TOLERANCE[gguf_type]
    exact = _logits(_fake_quantized(reference, out / "model.gguf"), ids)
    torch.testing.assert_close(got, exact, atol=1e-4, rtol=1e-4)
    manifest = read_manifest(out)
    assert manifest["params"] == reference.num_parameters()
    assert weights_bytes(out) == (out / "model.gguf").stat().st_size


def test_evaluate_measures_the_gguf_in_llamacpp_and_reports_its_real_size(gqa_model, data_dir, tmp_path):
    from steps.evaluate import EvaluateSettings, run as evaluate

    out = _write(gqa_model, tmp_path / "q8", "q8_0")
    settings = EvaluateSettings(context=32, stride=16, speed={"prompt_tokens": 16, "new_tokens": 4, "repeats": 1})
    sets = EvaluateSettings(**{**settings.__dict__, "sets": ["again"]})  # a set: llama.cpp reads it too
    got = evaluate(str(out), str(data_dir), str(tmp_path / "q8.json"), sets, [str(data_dir)])["metrics"]
    want = evaluate(str(gqa_model), str(data_dir), str(tmp_path / "float.json"), settings)["metrics"]
    assert got["size_bytes"] == (out / "model.gguf").stat().st_size < 0.3 * want["size_bytes"]
    assert got["params"] == want["params"]
    assert got["perplexity"] != want["perplexity"] and abs(got["perplexity"] / want["perplexity"] - 1) < 0.01
    assert got["read_by"]["perplexity"] == "llama.cpp" and "read_by" not in want
    assert got["scored_tokens"] == want["scored_tokens"]  # the same windows, scored the same way
    assert abs(got["transformers_perplexity"] / got["perplexity"] - 1) < 0.002
    assert got["sets"]["again"] == {k: got[k] for k in ("perplexity", "scored_tokens", "transformers_perplexity")}
    assert got["decode_tokens_per_s"] > 0 and got["prefill_tokens_per_s"] > 0


@pytest.mark.parametrize("gguf_type", get_args(TensorType))
def test_llamacpp_runs_every_type_and_agrees_with_transformers(gqa_model, data_dir, tmp_path, gguf_type):
    """Each type the workflow writes loads in llama.cpp, whose perplexity on the chain's windows matches
    transformers reading the same file (llama.cpp rounds activations to 8 bits in quantized products)."""
    from steps.evaluate.perplexity import perplexity
    from steps.evaluate.runtime import gguf_perplexity
    from steps.models import load_model
    from steps.prepared import load_split

    out = _write(gqa_model, tmp_path / gguf_type, gguf_type)
    test = load_split(data_dir, "test")[:]
    ids, labels = test["input_ids"].reshape(-1)[:1024], test["labels"].reshape(-1)[:1024]
    ours = gguf_perplexity(out / "model.gguf", ids, labels, context=64, stride=32, threads=1)
    with torch.no_grad():
        theirs = perplexity(load_model(out).eval(), ids, labels, context=64, stride=32, batch_size=8)
    assert ours["scored_tokens"] == theirs["scored_tokens"] == 1023
    assert ours["perplexity"] == pytest.approx(theirs["perplexity"], rel=0.005)


def test_qwen2_with_attention_biases_round_trips(tmp_path, tokenizer_dir):
    """Qwen2: no q/k reordering (its RoPE matches llama.cpp's NeoX mode) and q/k/v biases, kept in F32."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from steps.models import load_tokenizer, save_model

    tokenizer = load_tokenizer(tokenizer_dir)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tokenizer), tie_word_embeddings=True, **GQA_ARCH))
    with torch.no_grad():
        for layer in model.model.layers:  # a bias large enough to matter if it were lost or misplaced
            layer.self_attn.q_proj.bias.normal_(std=0.5)
            layer.self_attn.k_proj.bias.normal_(std=0.5)
    save_model(model, tokenizer, tmp_path / "qwen2")
    out = _write(tmp_path / "qwen2", tmp_path / "f16", "f16")
    back = AutoModelForCausalLM.from_pretrained(out, gguf_file="model.gguf")
    assert type(back).__name__ == "Qwen2ForCausalLM"
    ids = _sample_ids(tmp_path / "qwen2")
    want = _logits(model, ids)
    assert ((_logits(back, ids) - want).norm() / want.norm()).item() < TOLERANCE["f16"]


def test_q4_0_file_is_a_third_of_float_and_keeps_norms_f32(gqa_model, tmp_path):
    out = _write(gqa_model, tmp_path / "q4", "q4_0")
    reader = gguf.GGUFReader(out / "model.gguf")
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_norm.weight"] == "F32" and types["blk.0.ffn_down.weight"] == "Q4_0"
    # llama-quantize keeps the output matrix (every logit goes through it) above 4 bits
    assert types.get("output.weight", types["token_embd.weight"]) in ("Q6_K", "Q8_0")
    assert read_manifest(out)["gguf_tensor_types"] == {name: list(types.values()).count(name) for name in set(types.values())}
    assert weights_bytes(out) < 0.35 * weights_bytes(gqa_model)


def test_tokenizer_round_trips_the_same_ids(gqa_model, tmp_path):
    out = _write(gqa_model, tmp_path / "q8", "q8_0")
    hf = AutoTokenizer.from_pretrained(gqa_model)
    back = AutoTokenizer.from_pretrained(out, gguf_file="model.gguf")
    assert back(TEXT).input_ids == hf(TEXT).input_ids
    assert back.decode(back(TEXT).input_ids) == TEXT
    assert back.eos_token == hf.eos_token == "<|endoftext|>"
    reader = gguf.GGUFReader(out / "model.gguf")
    assert reader.fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert reader.fields["tokenizer.ggml.pre"].contents() == "gpt-2"


def test_padded_embedding_rows_become_unused_tokens(tmp_path, tokenizer_dir):
    model_dir = make_model_dir(tmp_path / "padded", tokenizer_dir, **GQA_ARCH)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    rows = len(AutoTokenizer.from_pretrained(model_dir))
    model.resize_token_embeddings(rows + 16)  # vocabularies padded to a multiple, as many checkpoints are
    model.save_pretrained(model_dir)
    out = _write(model_dir, tmp_path / "q8", "q8_0")
    reader = gguf.GGUFReader(out / "model.gguf")
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    assert len(tokens) == rows + 16 and tokens[-1] == f"[PAD{rows + 15}]"
    assert AutoModelForCausalLM.from_pretrained(out, gguf_file="model.gguf").config.vocab_size == rows + 16


def test_rotary_reordering_pairs_each_half_with_its_partner():
    from steps.quantize.gguf import rotary_to_interleaved

    head_dim, heads = 8, 2
    rows = torch.arange(heads * head_dim, dtype=torch.float32).unsqueeze(1)
    got = rotary_to_interleaved(rows, heads).squeeze(1).tolist()
    # per head: [x0 x1 x2 x3 y0 y1 y2 y3] -> [x0 y0 x1 y1 x2 y2 x3 y3]
    assert got == [0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15]


@pytest.fixture(scope="module")
def sentencepiece_model(tmp_path_factory, raw_dir):
    """A tiny Llama over a Llama-2-style tokenizer: BPE on `▁`-prefixed words with byte fallback."""
    from datasets import load_from_disk
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaTokenizer

    bpe = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    specials = ["<unk>", "<s>", "</s>", *(f"<0x{i:02X}>" for i in range(256))]
    bpe.train_from_iterator(load_from_disk(str(raw_dir))["text"], trainers.BpeTrainer(vocab_size=600, special_tokens=specials))
    trained = json.loads(bpe.to_str())["model"]
    root = tmp_path_factory.mktemp("sentencepiece")
    LlamaTokenizer(vocab=trained["vocab"], merges=[tuple(m) for m in trained["merges"]]).save_pretrained(root / "tok")
    return make_model_dir(root / "model", root / "tok", seed=4, **GQA_ARCH)


def test_sentencepiece_tokenizer_round_trips_with_byte_fallback(sentencepiece_model, tmp_path):
    out = _write(sentencepiece_model, tmp_path / "q8", "q8_0")
    text = TEXT.replace("<|endoftext|>", "\u00e9 \U0001f600")  # characters only the byte fallback spells
    hf = AutoTokenizer.from_pretrained(sentencepiece_model)
    back = AutoTokenizer.from_pretrained(out, gguf_file="model.gguf")
    assert back(text).input_ids == hf(text).input_ids
    assert back.decode(back(text).input_ids, skip_special_tokens=True) == text
    reader = gguf.GGUFReader(out / "model.gguf")
    assert reader.fields["tokenizer.ggml.model"].contents() == "llama"
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    vocab = hf.get_vocab()
    assert types[vocab["<unk>"]] == gguf.TokenType.UNKNOWN and types[vocab["<s>"]] == gguf.TokenType.CONTROL
    assert types[vocab["<0x41>"]] == gguf.TokenType.BYTE
    # llama.cpp merges by score: a token made by an earlier merge must score higher
    merges = json.loads((sentencepiece_model / "tokenizer.json").read_text())["model"]["merges"]
    scores = reader.fields["tokenizer.ggml.scores"].contents()
    first, last = ("".join(m if isinstance(m, list) else m.split(" ")) for m in (merges[0], merges[-1]))
    assert scores[vocab[first]] > scores[vocab[last]] and scores[vocab["<0x41>"]] == 0.0
    ids = torch.tensor([hf(text).input_ids])
    want = _logits(AutoModelForCausalLM.from_pretrained(sentencepiece_model), ids)
    got = _logits(AutoModelForCausalLM.from_pretrained(out, gguf_file="model.gguf"), ids)
    assert ((got - want).norm() / want.norm()).item() < TOLERANCE["q8_0"]


def test_other_tokenizer_models_are_refused_before_writing(gqa_model, tmp_path):
    broken = tmp_path / "unigram"
    shutil.copytree(gqa_model, broken)
    tokenizer = json.loads((broken / "tokenizer.json").read_text())
    tokenizer["model"]["type"] = "Unigram"
    (broken / "tokenizer.json").write_text(json.dumps(tokenizer))
    with pytest.raises(SystemExit, match="GGUF export writes BPE tokenizers .* this one is Unigram"):
        _write(broken, tmp_path / "out", "q8_0")
    assert not (tmp_path / "out").exists()


def test_unknown_gguf_type_is_refused(gqa_model, tmp_path):
    with pytest.raises(SystemExit, match="unknown GGUF type 'q3_k'"):
        _write(gqa_model, tmp_path / "out", "q3_k")
    assert not (tmp_path / "out").exists()


def test_an_importance_matrix_changes_a_k_quant_and_is_refused_where_unused(gqa_model, data_dir, tmp_path):
    plain = _write(gqa_model, tmp_path / "plain", "q4_k_m")
    settings = QuantizeSettings(scheme="gguf-imatrix", type="q4_k_m", calibration_blocks=4)
    quantize(str(gqa_model), str(tmp_path / "imatrix"), settings, str(data_dir))
    weighted = gguf.GGUFReader(tmp_path / "imatrix" / "model.gguf")
    assert weighted.fields["quantize.imatrix.chunks_count"].contents() == 4  # llama-quantize records what it used
    unweighted = {t.name: t for t in gguf.GGUFReader(plain / "model.gguf").tensors}
    assert all(t.tensor_type == unweighted[t.name].tensor_type for t in weighted.tensors)  # the same types...
    changed = [t.name for t in weighted.tensors if not np.array_equal(t.data, unweighted[t.name].data)]
    assert "blk.0.ffn_down.weight" in changed  # ...rounded otherwise where the K-quant applies
    with pytest.raises(SystemExit, match="GGUF type q8_0 does not use an importance matrix; use scheme gguf"):
        quantize(str(gqa_model), str(tmp_path / "q8"), QuantizeSettings(scheme="gguf-imatrix", type="q8_0"), str(data_dir))
    assert not (tmp_path / "q8").exists()


def test_missing_or_other_llamacpp_is_one_line_before_any_work(gqa_model, tmp_path, monkeypatch):
    from steps.llamacpp import STAMP, TOOLS

    monkeypatch.setenv("LLAMA_CPP_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(SystemExit, match=r"llama.cpp is not built at .*nowhere \(no llama-quantize, .*\); run `make env`") as err:
        _write(gqa_model, tmp_path / "out", "q8_0")
    assert "\n" not in str(err.value) and not (tmp_path / "out").exists()
    other = tmp_path / "other"
    other.mkdir()
    for tool in TOOLS:
        (other / tool).write_text("")
    (other / STAMP).write_text("0.2.0\n")
    monkeypatch.setenv("LLAMA_CPP_DIR", str(other))
    with pytest.raises(SystemExit, match=r"is llama-cpp-python 0.2.0, this workflow pins 0.3.36"):
        _write(gqa_model, tmp_path / "out", "q8_0")
    assert not (tmp_path / "out").exists()


# Digits after spaces and newlines, punctuation runs, whitespace runs, accents, CJK, an emoji, code.
FIDELITY_TEXTS = [
    "Page\n  2.1 costs 1,234.50 dollars (about 3%) -- naive? naïve café!!",
    "def f(x):\n\treturn x**2  # 東京 😀\n\n\n    spaces   and\ttabs\t\t2024-12-06",
    " leading space, 'quotes', \"double\", ... ellipsis; x=10e-3",
]


def _digit_splitting(tokenizer_dir, dest):
    """The tiny tokenizer with SmolLM2's pre-tokenizer: every digit split off before GPT-2's regex."""
    shutil.copytree(tokenizer_dir, dest)
    spec = json.loads((dest / "tokenizer.json").read_text())
    spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
    ]}
    (dest / "tokenizer.json").write_text(json.dumps(spec))
    return dest


@pytest.mark.parametrize("vocabulary", ["byte-level", "digit-splitting", "sentencepiece"])
def test_llamacpp_tokenizes_as_the_hf_tokenizer(vocabulary, tokenizer_dir, sentencepiece_model, tmp_path):
    from steps.llamacpp import tokenize

    if vocabulary == "sentencepiece":
        model_dir = sentencepiece_model
    else:
        tokenizer = tokenizer_dir if vocabulary == "byte-level" else _digit_splitting(tokenizer_dir, tmp_path / "tok")
        model_dir = make_model_dir(tmp_path / "model", tokenizer, **GQA_ARCH)
    out = _write(model_dir, tmp_path / "q8", "q8_0")
    pre = gguf.GGUFReader(out / "model.gguf").fields["tokenizer.ggml.pre"].contents()
    assert pre == {"byte-level": "gpt-2", "digit-splitting": "smollm", "sentencepiece": "default"}[vocabulary]
    hf = AutoTokenizer.from_pretrained(model_dir)
    for text in FIDELITY_TEXTS:
        if vocabulary == "sentencepiece" and text.startswith(" "):
            # Known difference: transformers' Metaspace (prepend_scheme "first") adds no "▁" before a text that
            # starts with a space, SentencePiece and llama.cpp always add one: only the first token differs.
            got, want = tokenize(out / "model.gguf", text), hf(text).input_ids
            assert got[1:] == want[1:] and got[0] != want[0]
            continue
        assert tokenize(out / "model.gguf", text) == hf(text).input_ids, text


def test_a_gguf_import_keeps_its_pre_tokenizer(tokenizer_dir, tmp_path):
    """A file that says `smollm` is read with digits split, as the model was trained (transformers alone would not)."""
    from steps.base import run
    from steps.llamacpp import tokenize

    model_dir = make_model_dir(tmp_path / "model", _digit_splitting(tokenizer_dir, tmp_path / "tok"), **GQA_ARCH)
    path = _write(model_dir, tmp_path / "q8", "q8_0") / "model.gguf"
    run({"gguf": str(path)}, str(tmp_path / "base"))
    imported = AutoTokenizer.from_pretrained(tmp_path / "base")
    plain = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    for text in FIDELITY_TEXTS:
        assert imported(text).input_ids == tokenize(path, text) == AutoTokenizer.from_pretrained(model_dir)(text).input_ids
    assert any(plain(text).input_ids != imported(text).input_ids for text in FIDELITY_TEXTS)


def test_a_pre_tokenizer_the_import_cannot_reproduce_is_refused(gguf_file, tmp_path):
    from steps.base import run

    path = tmp_path / "other.gguf"
    reader = gguf.GGUFReader(gguf_file[0])
    writer = gguf.GGUFWriter(str(path), "llama")
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        value = "chatglm-bpe" if field.name == "tokenizer.ggml.pre" else field.contents()
        writer.add_key_value(field.name, value, field.types[0], sub_type=field.types[-1] if len(field.types) > 1 else None)
    for tensor in reader.tensors:
        writer.add_tensor(tensor.name, tensor.data, raw_shape=tensor.shape[::-1], raw_dtype=tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(SystemExit, match="splits text with llama.cpp's 'chatglm-bpe' pre-tokenizer, which the import cannot reproduce"):
        run({"gguf": str(path)}, str(tmp_path / "base"))
    assert not (tmp_path / "base").exists()


# ---------------------------------------------------------------- GGUF as a model source


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory, tokenizer_dir):
    """A tied GQA Llama as an f16 GGUF file, with the float model it came from."""
    root = tmp_path_factory.mktemp("source")
    model_dir = make_model_dir(root / "float", tokenizer_dir, seed=5, **GQA_ARCH, tie_word_embeddings=True)
    _write(model_dir, root / "q", "f16")
    return root / "q" / "model.gguf", model_dir


def test_gguf_source_becomes_a_plain_float_directory(gguf_file, tmp_path):
    from steps.base import run

    path, float_dir = gguf_file
    out = tmp_path / "base"
    run({"gguf": str(path)}, str(out))
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["tie_word_embeddings"] is True
    assert list(out.glob("*.safetensors")) and not list(out.glob("*.gguf"))
    model = AutoModelForCausalLM.from_pretrained(out)  # no gguf_file: an ordinary HF directory now
    assert model.dtype == torch.float32
    ids = _sample_ids(float_dir)
    want = _logits(AutoModelForCausalLM.from_pretrained(float_dir), ids)
    assert ((_logits(model, ids) - want).norm() / want.norm()).item() < TOLERANCE["f16"]
    assert AutoTokenizer.from_pretrained(out)(TEXT).input_ids == ids[0].tolist()
    assert read_manifest(out)["inputs"]["gguf"]["path"] == str(path)


def test_missing_gguf_file_is_one_line_and_no_output(tmp_path):
    from steps.base import run

    with pytest.raises(SystemExit, match=r"GGUF file .*nope.gguf does not exist; fix the alias's `gguf:` path") as err:
        run({"gguf": str(tmp_path / "nope.gguf")}, str(tmp_path / "base"))
    assert "\n" not in str(err.value)
    assert not (tmp_path / "base").exists()


def test_corrupt_gguf_file_is_one_line_and_no_output(gguf_file, tmp_path):
    from steps.base import run

    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(gguf_file[0].read_bytes()[:5000])
    with pytest.raises(SystemExit, match="is not a readable GGUF file") as err:
        run({"gguf": str(truncated)}, str(tmp_path / "base"))
    assert "\n" not in str(err.value)
    assert not (tmp_path / "base").exists()


def test_unsupported_architecture_names_the_supported_ones(tmp_path):
    from steps.base import run

    path = tmp_path / "gpt2.gguf"
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(SystemExit, match=r"holds a 'gpt2' model; GGUF sources must be one of \['llama', 'mistral', 'qwen2'\]"):
        run({"gguf": str(path)}, str(tmp_path / "base"))
    assert not (tmp_path / "base").exists()


@pytest.mark.workflow
def test_editing_the_gguf_file_rebuilds_the_base_model(gguf_file, tmp_path):
    """Through Snakemake: the file is an input of base_model, so replacing it reruns that job."""
    path = tmp_path / "model.gguf"
    path.write_bytes(gguf_file[0].read_bytes())
    config = tmp_path / "gguf.yaml"
    config.write_text(f"models: {{real: {{gguf: {path}}}}}\ntargets: []\n")
    snakemake = [
        sys.executable, "-m", "snakemake", "--cores", "1", "--snakefile", str(REPO / "Snakefile"),
        "--directory", str(tmp_path), "models/base/real", f"--configfile={config}",
    ]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}  # rules call `python`
    built = subprocess.run(snakemake, capture_output=True, text=True, timeout=300, env=env)
    assert built.returncode == 0, built.stderr[-2000:]
    assert (tmp_path / "models/base/real/config.json").exists()
    assert planned_jobs(subprocess.run([*snakemake, "-n"], capture_output=True, text=True, timeout=120, env=env)) == {}
    path.write_bytes(path.read_bytes())  # a new file in its place (newer mtime)
    replanned = subprocess.run([*snakemake, "-n"], capture_output=True, text=True, timeout=120, env=env)
    assert planned_jobs(replanned) == {"base_model": 1}


def test_the_memory_plan_reads_a_gguf_files_shape_from_its_header(gqa_model, tmp_path):
    import json

    from steps.memory import Architecture, gguf_config

    out = _write(gqa_model, tmp_path / "q8", "q8_0")
    config = json.loads((gqa_model / "config.json").read_text())
    read = Architecture.from_config(gguf_config(out / "model.gguf"))
    assert read == Architecture.from_config(config)
    assert read.params() == AutoModelForCausalLM.from_pretrained(gqa_model).num_parameters()
