"""GGUF for llama.cpp (and ollama, LM Studio): one `model.gguf`, quantized by llama.cpp's own `llama-quantize`.

The model is first written as a float GGUF (its own dtype, so nothing is rounded yet) with the `gguf`
package: tensor names from gguf's HF -> GGUF table (`gguf.get_tensor_name_map`), and what llama.cpp's
converter also does, done the same way:
- Llama's q_proj / k_proj rows are reordered from Hugging Face's rotate-half
  layout into the interleaved pairs llama.cpp's RoPE expects (Qwen2 needs none);
- tied embeddings write no `output.weight`: llama.cpp then reads the output
  matrix from `token_embd.weight` (and transformers sets `tie_word_embeddings`);
- 1-D tensors (norms, biases) are F32;
- the tokenizer goes in whole: tokens, token types (control / user-defined /
  byte / unused padding rows), merges, special token ids, the add-bos flag, the
  chat template, and for byte-level BPE the pre-tokenizer by llama.cpp's name
  (`gpt-2`, `smollm`, `llama-bpe`, ...: how text is split before merging). Byte-level
  BPE (GPT-2, Llama-3, Qwen, SmolLM) is written as llama.cpp's `gpt2` model;
  SentencePiece-style BPE with byte fallback (Llama-2, TinyLlama, Mistral) as its
  `llama` model, with each token scored by the rank of the merge that makes it
  (llama.cpp's SentencePiece tokenizer merges by score).
`llama-quantize` then writes the `type` (every type llama.cpp users pick, K-quants included, with its
choices per tensor: the output matrix kept at higher precision, a fallback type for rows that are not
whole blocks). Scheme `gguf-imatrix` first runs `llama-imatrix` over `calibration_blocks` blocks of the
chain's train split (as text, decoded by the chain's tokenizer), and the quantizer weighs each column's
rounding error by it. Before the output counts as written, llama.cpp loads it and runs a short prompt.
Transformers reads the file back dequantized (`from_pretrained(dir, gguf_file=...)`); evaluate measures it
in llama.cpp too.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Literal, get_args

import gguf
import torch

from steps import llamacpp
from steps.llamacpp import GGUF_FILE
from steps.artifacts import StageError
from steps.models import ADAPTER_DIR, load_model, unmerged_adapter

log = logging.getLogger("steps")

SCHEMES = ("gguf", "gguf-imatrix")
CALIBRATED = ("gguf-imatrix",)
RUN_FIX = "pick another GGUF type (q8_0 keeps the most)"
# llama-quantize's types (its names, lower case): the ones llama.cpp's docs tabulate for perplexity and size
TensorType = Literal[
    "f32", "f16", "bf16", "q8_0", "q6_k", "q5_k_m", "q5_k_s", "q5_1", "q5_0", "q4_k_m", "q4_k_s", "q4_1", "q4_0",
    "q3_k_l", "q3_k_m", "q3_k_s", "q2_k",
]
TYPES = get_args(TensorType)
WITHOUT_IMATRIX = ("f32", "f16", "bf16", "q8_0")  # llama-quantize writes these the same with or without one
FLOAT_TYPES = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}  # the first, lossless file
# config.model_type -> (GGUF architecture, whether q/k rows are reordered for llama.cpp's RoPE)
ARCHITECTURES = {"llama": ("llama", True), "qwen2": ("qwen2", False)}


def check_settings(settings: QuantizeSettings) -> None:
    if settings.type not in TYPES:
        raise StageError(f"unknown GGUF type {settings.type!r}; choose one of {list(TYPES)}")
    if settings.scheme == "gguf-imatrix" and settings.type in WITHOUT_IMATRIX:
        raise StageError(
            f"GGUF type {settings.type} does not use an importance matrix; use scheme gguf for it, "
            "or a 2- to 6-bit type (q4_k_m, q6_k, ...) with gguf-imatrix"
        )


def check_source(model_dir: str, settings: QuantizeSettings) -> None:
    llamacpp.require()
    check_writable(model_dir)  # before loading weights


def quantize(model_dir: str, out: Path, settings: QuantizeSettings, calibration, source) -> dict:
    """Write the model as a float GGUF, then `out/model.gguf` in the GGUF `type` by llama-quantize."""
    model = load_model(model_dir)
    params = model.num_parameters()
    float_file = out / f"float.{GGUF_FILE}"  # beside the output (same disk, removed with it on failure), not in /tmp
    write_gguf(model, model_dir, float_file, FLOAT_TYPES.get(model.dtype, "f32"))
    del model
    with tempfile.TemporaryDirectory() as scratch:
        imatrix = []
        if calibration is not None:
            imatrix = ["--imatrix", importance_matrix(float_file, model_dir, calibration, Path(scratch))]
        started = time.time()
        llamacpp.run_tool("llama-quantize", *imatrix, float_file, out / GGUF_FILE, settings.type.upper(),
                          torch.get_num_threads(), what=f"quantize {model_dir} to {settings.type}", fix=RUN_FIX)
    float_file.unlink()
    log.info("llama-quantize wrote %s in %.1f s", settings.type, time.time() - started)
    check_loads(out / GGUF_FILE, model_dir)
    return {"params": params, "gguf_tensor_types": tensor_types(out / GGUF_FILE), "llama_cpp": llamacpp.version()}


def importance_matrix(float_file: Path, model_dir: str, calibration: torch.Tensor, scratch: Path) -> Path:
    """llama-imatrix over the calibration blocks, each one decoded to text (llama.cpp reads text, not ids)."""
    from steps.models import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    text = scratch / "calibration.txt"
    text.write_text("\n".join(tokenizer.decode(block, skip_special_tokens=True) for block in calibration.tolist()),
                    encoding="utf-8")
    matrix = scratch / "imatrix.gguf"
    started = time.time()
    llamacpp.run_tool(
        "llama-imatrix", "-m", float_file, "-f", text, "-o", matrix, "-c", calibration.shape[1],
        "--chunks", calibration.shape[0], "--no-ppl", what=f"compute an importance matrix for {model_dir}",
        fix="lower `calibration_blocks` or raise `data.block_size`", threads=torch.get_num_threads(),
    )
    log.info("llama-imatrix: %d blocks of %d tokens in %.1f s", *calibration.shape, time.time() - started)
    return matrix


# Digits after whitespace, punctuation runs, tabs and blank lines, accents, CJK and an emoji: where
# pre-tokenizers differ (SmolLM2's splits digits, GPT-2's does not) and where byte fallback spells bytes.
PROBE = "Page\n  2.1 costs 1,234.50 dollars -- naive? naïve café, 東京 😀\t\ttabs   and  spaces\n\n\ndef f(x): return x**2"


def check_loads(path: Path, model_dir: str) -> None:
    """llama.cpp loads the file, runs an 8-token prompt (llama-bench) and tokenizes the PROBE exactly as the
    model's own tokenizer does; else the job fails in one line."""
    from steps.models import load_tokenizer

    llamacpp.run_tool("llama-bench", "-m", path, "-p", 8, "-n", 0, "-r", 1, "-o", "json",
                      what=f"load {path}", fix=RUN_FIX, threads=1)
    want, got = load_tokenizer(model_dir)(PROBE).input_ids, llamacpp.tokenize(path, PROBE)
    if got != want:
        at = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
        raise StageError(
            f"llama.cpp reads text with {path}'s vocabulary differently from {model_dir}'s tokenizer (first "
            f"difference at token {at}: {got[at:at + 3]} against {want[at:at + 3]}); the model would see text "
            "it was not trained on: give the chain a tokenizer whose splitting llama.cpp knows (gpt-2, smollm, llama-bpe, qwen2...)"
        )
    log.info("llama.cpp loads %s, runs it and tokenizes as %s does", path, model_dir)


def tensor_types(path: Path) -> dict[str, int]:
    """The count of tensors per GGML type in a GGUF file (the manifest's record of llama-quantize's choices)."""
    counts: dict[str, int] = {}
    for tensor in gguf.GGUFReader(path).tensors:
        counts[tensor.tensor_type.name] = counts.get(tensor.tensor_type.name, 0) + 1
    return counts


def check_writable(model_dir: str | Path) -> None:
    """Refuse, from config.json and tokenizer.json alone, what the writer cannot express (before loading weights)."""
    model_dir = Path(model_dir)
    if unmerged_adapter(model_dir):  # llama.cpp has no prefix key/values: the GGUF would silently drop it
        raise StageError(
            f"{model_dir} is a base plus an unmerged prefix adapter ({ADAPTER_DIR}/), which a GGUF file cannot hold; "
            "recover with method lora/qlora/freeze, or quantize this chain with a bnb, gptq or dtype method"
        )
    config = json.loads((model_dir / "config.json").read_text())
    model_type = config.get("model_type")
    if model_type not in ARCHITECTURES:
        raise StageError(
            f"cannot write {model_type!r} models to GGUF; supported: {sorted(ARCHITECTURES)} "
            "(pick another quantization method for this chain)"
        )
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise StageError(f"GGUF export does not write RoPE scaling ({rope.get('rope_type') or rope.get('type')}) yet")
    if model_type == "llama" and (config.get("attention_bias") or config.get("mlp_bias")):
        raise StageError("GGUF export of Llama models with attention or MLP biases is not supported")
    tokenizer_model(read_tokenizer_json(model_dir), model_dir)


def read_tokenizer_json(model_dir: Path) -> dict:
    path = model_dir / "tokenizer.json"
    return json.loads(path.read_text()) if path.exists() else {}


def tokenizer_model(tokenizer: dict, model_dir: Path) -> str:
    """llama.cpp's tokenizer model for `model_dir`'s parsed tokenizer.json: `gpt2` or `llama`."""
    bpe, decoder = tokenizer.get("model", {}), (tokenizer.get("decoder") or {}).get("type")
    if bpe.get("type") == "BPE" and not bpe.get("byte_fallback") and decoder == "ByteLevel":
        return "gpt2"
    if bpe.get("type") == "BPE" and bpe.get("byte_fallback"):
        return "llama"
    raise StageError(
        f"{model_dir}: GGUF export writes BPE tokenizers from a tokenizer.json, byte-level (GPT-2 / Llama-3 / Qwen) "
        f"or with byte fallback (Llama-2 / Mistral); this one is {bpe.get('type') or 'missing'}"
    )


def rotary_to_interleaved(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of a q/k projection from HF's half-split RoPE layout to llama.cpp's interleaved pairs.

    HF rotates dimension i with i + head_dim/2; llama.cpp rotates 2i with 2i+1. Per head, the row
    order [x0 .. x(h/2-1), y0 .. y(h/2-1)] becomes [x0, y0, x1, y1, ...].
    """
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def tensor_data(weight: torch.Tensor, float_type: str):
    """(array, GGML type) for one tensor: norms and biases F32, matrices in `float_type` (f32, f16 or bf16)."""
    array = weight.detach().float().cpu().numpy()
    qtype = gguf.GGMLQuantizationType.F32 if array.ndim == 1 else gguf.GGMLQuantizationType[float_type.upper()]
    return gguf.quants.quantize(array, qtype), qtype


def pre_tokenizer_name(tokenizer_json: dict) -> str:
    """llama.cpp's name for how text is split before BPE (tokenizer.ggml.pre)."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    pre = tokenizer_json.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    if [s["type"] for s in steps] == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return "smollm"
    patterns = [s.get("pattern", {}).get("Regex") for s in steps if s.get("type") == "Split"]
    for name, regex in GGUF_PRE_TOKENIZER_SPLITS.items():
        if regex in patterns:
            return name
    log.warning("unrecognised pre-tokenizer %s: written as 'default'; llama.cpp may split text differently", pre)
    return "default"


def merge_scores(bpe: dict) -> dict[str, float]:
    """Score per token for llama.cpp's SentencePiece tokenizer: minus the rank of the merge that makes it."""
    scores = {}
    for rank, merge in enumerate(bpe.get("merges", [])):
        left, right = merge if isinstance(merge, list) else merge.split(" ", 1)
        scores.setdefault(left + right, -float(rank + 1))
    return scores


def add_tokenizer(writer, model_dir: Path, rows: int) -> None:
    """The tokenizer of `model_dir` for an embedding of `rows` rows (extra rows become unused [PAD] tokens)."""
    from steps.models import load_tokenizer

    tokenizer_json = read_tokenizer_json(model_dir)
    kind = tokenizer_model(tokenizer_json, model_dir)
    tokenizer = load_tokenizer(model_dir)
    bpe = tokenizer_json["model"]
    tokens = {index: text for text, index in bpe["vocab"].items()}
    types = dict.fromkeys(tokens, gguf.TokenType.NORMAL)
    if kind == "llama":
        types.update({i: gguf.TokenType.BYTE for i, t in tokens.items() if len(t) == 6 and t.startswith("<0x")})
        if tokenizer.unk_token_id is not None:
            types[tokenizer.unk_token_id] = gguf.TokenType.UNKNOWN
    for added in tokenizer_json.get("added_tokens", []):
        tokens[added["id"]] = added["content"]
        if types.get(added["id"]) not in (gguf.TokenType.UNKNOWN, gguf.TokenType.BYTE):
            types[added["id"]] = gguf.TokenType.CONTROL if added["special"] else gguf.TokenType.USER_DEFINED
    if max(tokens) >= rows:
        raise StageError(f"tokenizer has ids up to {max(tokens)} but the embedding has only {rows} rows")
    writer.add_tokenizer_model(kind)
    if kind == "gpt2":
        writer.add_tokenizer_pre(pre_tokenizer_name(tokenizer_json))
    else:
        writer.add_tokenizer_pre("default")
        scores = merge_scores(bpe)
        writer.add_token_scores([scores.get(tokens.get(i), 0.0) for i in range(rows)])
    writer.add_token_list([tokens.get(i, f"[PAD{i}]") for i in range(rows)])
    writer.add_token_types([types.get(i, gguf.TokenType.UNUSED) for i in range(rows)])
    # merges, bos/eos/unk/pad ids and the chat template, read by gguf from the HF files
    special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=rows)
    # Readers assume a SentencePiece vocabulary adds BOS unless told: say what this tokenizer does.
    ids = tokenizer("a").input_ids
    special.add_special_token["bos"] = tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id
    special.add_special_token["eos"] = tokenizer.eos_token_id is not None and ids[-1] == tokenizer.eos_token_id
    special.add_to_gguf(writer, quiet=True)


def add_hyperparameters(writer, config, name: str, float_type: str) -> None:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rope = getattr(config, "rope_parameters", None) or {}
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32 if float_type == "f32" else gguf.LlamaFileType[f"MOSTLY_{float_type.upper()}"])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def write_gguf(model, model_dir: str | Path, out_file: str | Path, float_type: str) -> dict:
    """Write `model` (loaded from `model_dir`, whose tokenizer files are read) as one float GGUF file.

    Returns the count of tensors per GGML type, for the manifest.
    """
    model_dir = Path(model_dir)
    config = model.config
    arch, reorder_rotary = ARCHITECTURES[config.model_type]
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], config.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    writer = gguf.GGUFWriter(str(out_file), arch)
    add_hyperparameters(writer, config, f"{model_dir.parent.name}-{model_dir.name}", float_type)
    add_tokenizer(writer, model_dir, model.get_input_embeddings().weight.shape[0])

    counts: dict[str, int] = {}
    started, last_log = time.time(), time.time()
    state = model.state_dict()
    for index, (hf_name, weight) in enumerate(state.items()):
        if tied and hf_name == "lm_head.weight":
            continue  # llama.cpp reads the output matrix from token_embd
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise StageError(f"no GGUF name for tensor {hf_name!r} of a {config.model_type} model")
        if reorder_rotary and hf_name.endswith(("self_attn.q_proj.weight", "self_attn.k_proj.weight")):
            heads = config.num_attention_heads if "q_proj" in hf_name else config.num_key_value_heads
            weight = rotary_to_interleaved(weight, heads)
        data, qtype = tensor_data(weight, float_type)
        writer.add_tensor(name, data, raw_dtype=qtype)
        counts[qtype.name] = counts.get(qtype.name, 0) + 1
        if time.time() - last_log > 30:
            last_log = time.time()
            log.info("wrote %d/%d tensors in %.0f s", index + 1, len(state), last_log - started)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    log.info("wrote %s (%s) in %.1f s", out_file, counts, time.time() - started)
    return counts
