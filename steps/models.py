"""Loading and saving models and tokenizers: the one place that calls `from_pretrained`.

Every model directory the workflow writes is a plain Hugging Face directory
(config.json, *.safetensors, tokenizer files) that reloads with
`AutoModelForCausalLM.from_pretrained`. Pickled weights are refused
(`use_safetensors=True`), and `trust_remote_code` is passed only when the
model's config entry opts in. A directory holding one `*.gguf` file and no
config.json (the GGUF quantization's output) is read through transformers'
GGUF loader, dequantized.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from steps.artifacts import StageError

log = logging.getLogger("steps")

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


GGUF_ARCHITECTURES = ("llama", "mistral", "qwen2")  # GGUF sources the later stages can work on
# llama.cpp's pre-tokenizers that split every digit off before GPT-2's regex (llama-vocab.cpp groups them);
# transformers' GGUF import knows none of them and would split like plain GPT-2.
DIGIT_SPLIT_PRE = ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva")
ADAPTER_DIR = "adapter"  # a peft adapter inside a model directory (steps.recover writes it)


LOAD_FIX = "point it at a directory with config.json and *.safetensors weights (pickled weights are refused)"


def load_tokenizer(source: str | Path, revision: str | None = None, trust_remote_code: bool = False, **kwargs):
    if (local := _local_path(source)) is not None and not local.is_dir():
        raise StageError(f"cannot load the tokenizer of {source}: no such directory; {LOAD_FIX}")
    if "gguf_file" not in kwargs and (gguf := _lone_gguf(source)):  # a GGUF file carries its vocabulary
        kwargs["gguf_file"] = gguf
    tokenizer = AutoTokenizer.from_pretrained(
        str(source), revision=revision, trust_remote_code=trust_remote_code, **kwargs
    )
    if tokenizer.pad_token is None:  # Llama tokenizers ship without one; padding positions are masked anyway
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    source: str | Path,
    dtype: str = "float32",
    revision: str | None = None,
    trust_remote_code: bool = False,
    device: torch.device | str | None = None,
    fix: str = LOAD_FIX,
    adapter: bool = True,
    **kwargs,
):
    """A causal LM from a local directory or a hub id; safetensors only. `fix` ends the error line.

    With `adapter`, an unmerged adapter in `source/adapter/` (a P-tuning v2 prefix from recover) is applied
    through peft. A LoRA adapter found there was merged into the weights when it was saved: left alone.
    """
    if "quantization_config" not in kwargs and _on_cpu(kwargs.get("device_map")):
        kwargs.update(_gptq_cpu_kernel(source))
    if "gguf_file" not in kwargs and (gguf := _lone_gguf(source)):
        kwargs["gguf_file"] = gguf
    if "gguf_file" not in kwargs:
        check_weights(source, fix)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(source),
            dtype=DTYPES[dtype],
            revision=revision,
            trust_remote_code=trust_remote_code,
            use_safetensors=True,
            **kwargs,
        )
    except OSError as err:
        reason = str(err).strip().splitlines()[0]
        if "safetensors" in reason:  # transformers' advice here is to allow pickles: never
            reason = "no *.safetensors weights found (pickled .bin weights are refused)"
        raise StageError(f"cannot load model {source!s}: {reason}; {fix}") from None
    except ValueError as err:
        if "trust_remote_code" not in str(err):
            raise
        raise remote_code_error(source) from None
    if device is not None:
        model.to(device)
    generic_4bit_kernel(model, only_unpackable=True)
    if adapter and unmerged_adapter(source):
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(Path(source) / ADAPTER_DIR), is_trainable=False)
    return model


def remote_code_error(source: str | Path) -> StageError:
    return StageError(
        f"model {source!s} ships its own modelling code, which runs only on opt-in; "
        "set `trust_remote_code: true` on its `models:` entry if you trust that code"
    )


def _local_path(source: str | Path) -> Path | None:
    """`source` as a local path when it is one: a Path, something that exists, or a string no hub id looks
    like (absolute, ./ or ../, more than one /); None for what from_pretrained may look up on the hub."""
    text = str(source)
    if isinstance(source, Path) or Path(text).exists() or Path(text).is_absolute() or text.startswith(("./", "../")) \
            or text.count("/") > 1:
        return Path(text)
    return None


def check_weights(source: str | Path, fix: str = LOAD_FIX) -> None:
    """A local model directory, before any weight is read: it exists, holds *.safetensors weights (pickled .bin
    weights are refused: unpickling can run code) and each of those opens, its header intact and the file as
    long as the header says (a truncated or damaged file otherwise fails mid-load as a safetensors traceback).
    Hub ids are left to `from_pretrained`."""
    path = _local_path(source)
    if path is None:
        return
    if not path.is_dir():
        raise StageError(f"cannot load model {source!s}: no such directory; {fix}")
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise StageError(f"cannot load model {source!s}: no *.safetensors weights found (pickled .bin weights are refused); {fix}")
    from safetensors import safe_open

    for file in files:
        try:
            with safe_open(str(file), framework="pt"):
                pass
        except Exception as err:  # SafetensorError for a bad header or a short file, OSError for an unreadable one
            reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:120]
            raise StageError(
                f"cannot load model {source!s}: {file.name} is not a readable safetensors file ({reason}), "
                "truncated or damaged; copy or download it again, or delete the directory so its stage rebuilds it"
            ) from None


def generic_4bit_kernel(model, only_unpackable: bool = False) -> None:
    """Route bitsandbytes 4-bit layers on CPU to the generic kernel: all of them, or those the packed one rejects.

    bitsandbytes' packed CPU kernel (AVX512-BF16 machines, inference only) needs output widths that
    are multiples of 32 and input widths that are multiples of 64 (its quantization block) and fails
    mid-forward otherwise (a 1072-wide pruned MLP did, in evaluate); the generic kernel takes any
    width, and training always uses it.
    """
    for module in model.modules():
        unpackable = getattr(module, "out_features", 0) % 32 or getattr(module, "in_features", 0) % 64
        if hasattr(module, "support_avx512bf16_for_cpu") and (unpackable or not only_unpackable):
            module.support_avx512bf16_for_cpu = False


def unmerged_adapter(source: str | Path) -> bool:
    """Whether `source/adapter/` holds a prompt-learning adapter (prefix, p-tuning), which no merge can fold in."""
    config = Path(source) / ADAPTER_DIR / "adapter_config.json"
    if not config.is_file():
        return False
    return json.loads(config.read_text()).get("peft_type") in ("PREFIX_TUNING", "P_TUNING", "PROMPT_TUNING")


def _lone_gguf(source: str | Path) -> str | None:
    """The name of the one GGUF file of a directory without config.json, else None."""
    source = Path(source)
    if not source.is_dir() or (source / "config.json").exists():
        return None
    files = sorted(source.glob("*.gguf"))
    return files[0].name if len(files) == 1 else None


def gguf_architecture(path: str | Path) -> str:
    """`general.architecture` of a GGUF file; a missing or unreadable file is a one-line error."""
    path = Path(path)
    if not path.is_file():
        raise StageError(f"GGUF file {path} does not exist; fix the alias's `gguf:` path")
    from gguf import GGUFReader  # lazily: only GGUF sources read one

    try:
        return str(GGUFReader(path).fields["general.architecture"].contents())
    except Exception as err:  # the reader raises ValueError, KeyError, IndexError... on a damaged file
        raise StageError(
            f"{path} is not a readable GGUF file ({type(err).__name__}: {str(err).strip()[:120]}); "
            "download it again or point `gguf:` at another file"
        ) from None


def load_gguf(path: str | Path, dtype: str = "float32"):
    """Model and tokenizer of a GGUF file as a plain float Hugging Face model (weights dequantized)."""
    path = Path(path)
    architecture = gguf_architecture(path)
    if architecture not in GGUF_ARCHITECTURES:
        raise StageError(
            f"{path} holds a {architecture!r} model; GGUF sources must be one of {list(GGUF_ARCHITECTURES)}"
        )
    tokenizer = load_tokenizer(path.parent, gguf_file=path.name)
    keep_pre_tokenizer(tokenizer, path)
    model = load_model(path.parent, dtype=dtype, gguf_file=path.name)
    # The weights are dequantized floats now: a GGUF quantization config left behind would make
    # `save_pretrained` refuse, and every later stage must read this like any other float model.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    return model, tokenizer


def keep_pre_tokenizer(tokenizer, path: Path) -> None:
    """Split text before BPE as the GGUF file says (`tokenizer.ggml.pre`), where transformers would not.

    transformers rebuilds a byte-level vocabulary's splitting from its own table of llama.cpp names and
    falls back to plain GPT-2 splitting for the rest; the model was trained on its own, so a name outside
    that table is either set here or refused.
    """
    from gguf import GGUFReader
    from tokenizers import pre_tokenizers
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    fields = GGUFReader(path).fields
    model_field, pre_field = fields.get("tokenizer.ggml.model"), fields.get("tokenizer.ggml.pre")
    if model_field is None or str(model_field.contents()) != "gpt2" or pre_field is None:
        return  # SentencePiece vocabularies have no pre-tokenizer to lose
    pre = str(pre_field.contents())
    if pre in DIGIT_SPLIT_PRE:
        tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
    elif pre not in GGUF_PRE_TOKENIZER_SPLITS and pre not in ("gpt-2", "default"):
        raise StageError(
            f"{path} splits text with llama.cpp's {pre!r} pre-tokenizer, which the import cannot reproduce; "
            f"load the model from its Hugging Face files instead (`hub:` or `path:`)"
        )


def _on_cpu(device_map) -> bool:
    if not torch.cuda.is_available():
        return True
    targets = device_map.values() if isinstance(device_map, dict) else [device_map]
    return all(t is None or str(t) == "cpu" for t in targets)


def _gptq_cpu_kernel(source: str | Path) -> dict:
    """Loading kwargs for a GPTQ checkpoint on the CPU: `{}` unless its group size needs the plain torch kernel.

    gptqmodel 7.6 picks its CPU int4 kernel (TorchAtenLinear) for 4-bit GPTQ with
    group_size 16 too, but torch's `_weight_int4pack_mm_for_cpu` accepts only groups
    of 32/64/128/256 and fails at the first no-grad forward. For those checkpoints
    we name gptqmodel's dequantize-and-matmul kernel (`gptq_torch`) instead; every
    other checkpoint keeps gptqmodel's automatic choice.
    """
    config = Path(source) / "config.json"
    if not config.is_file():
        return {}
    quant = json.loads(config.read_text()).get("quantization_config") or {}
    if quant.get("quant_method") != "gptq" or quant.get("bits") != 4 or quant.get("group_size") in (32, 64, 128, 256):
        return {}
    from transformers import GPTQConfig

    return {"quantization_config": GPTQConfig(bits=4, backend="gptq_torch")}


def save_model(model, tokenizer, out_dir: str | Path, state_dict: dict | None = None) -> None:
    """`state_dict` overrides the module's own weights (gathered from FSDP shards)."""
    if state_dict is not None:
        state_dict = {k: v.detach().cpu() for k, v in state_dict.items()}
    model.save_pretrained(str(out_dir), safe_serialization=True, state_dict=state_dict)
    tokenizer.save_pretrained(str(out_dir))


def build_scratch(arch: dict, tokenizer, seed: int) -> LlamaForCausalLM:
    """A randomly initialised Llama with the given architecture and the tokenizer's vocabulary."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **{"tie_word_embeddings": False, **arch},  # untied unless the architecture says so
    )
    model = LlamaForCausalLM(config)
    log.info("built scratch Llama: %s parameters", f"{model.num_parameters():,}")
    return model


def check_same_vocabulary(teacher_tok, student_tok, teacher_name: str, student_name: str) -> None:
    """Logit distillation compares distributions token by token: both must index the same vocabulary."""
    if teacher_tok.get_vocab() != student_tok.get_vocab():
        raise StageError(
            f"teacher {teacher_name} and student {student_name} have different vocabularies "
            f"({len(teacher_tok)} vs {len(student_tok)} tokens); logit distillation needs a shared tokenizer: "
            "pick a student of the same family or give the scratch student `tokenizer: {from: <teacher>}`"
        )
