"""Peak memory of a training or quantization job, estimated from model configs before anything runs.

The workflow's memory plan (steps/workflow/plan.py) prints one line per job in `snakemake -n` and refuses a
job whose estimate exceeds what its resources give (gpu_mem_mb per GPU, or mem_mb on CPU). The terms,
per rank, in bytes:

  weights      float32 copies of the trained model (steps load in float32)
  gradients    float32, for the trainable parameters
  optimizer    AdamW's two float32 moments per trainable parameter
  autocast     bf16 copies of the trainable weights autocast keeps for the step (bf16: true)
  activations  what backward needs per token and layer (or, with gradient checkpointing, each layer's
               input plus one layer recomputed)
  logits       float32 logits with their log-softmax and gradient
  teacher      a frozen float32 teacher run live (none when a logit cache stands in for it), its logits

FSDP divides weights, gradients, optimizer and autocast copies over the ranks (plus one layer gathered);
DDP keeps a replica per rank. Activations are per rank: `batch_size` blocks of `block_size` tokens.
The per-layer activation count follows the tensors a Llama decoder layer saves (norms, q/k/v, rotary
copies, attention output, SwiGLU's gate/up/act/product) with SDPA's memory-efficient attention (no
T x T scores). A quantization job holds the float32 model, its calibration inputs and outputs at one
layer, and one layer's Hessians (GPTQ).

    python -m steps.memory --config model/config.json --batch-size 4 --block-size 1024 [--bf16] [--checkpointing]
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

GiB = 2**30
FLOAT32 = 4


@dataclass(frozen=True)
class Architecture:
    """The numbers of a decoder-only model's config.json the estimate needs."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    tie_word_embeddings: bool
    head_dim: int  # hidden_size // num_attention_heads unless the config says otherwise

    @classmethod
    def from_config(cls, config: dict) -> "Architecture":
        keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
        missing = [key for key in keys if key not in config]
        if missing:
            raise ValueError(f"a model config without {', '.join(missing)}: not a decoder the memory plan knows")
        return cls(
            **{key: int(config[key]) for key in keys},
            num_key_value_heads=int(config.get("num_key_value_heads") or config["num_attention_heads"]),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            head_dim=int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]),
        )

    @property
    def kv_width(self) -> int:
        return self.head_dim * self.num_key_value_heads

    @property
    def q_width(self) -> int:
        return self.head_dim * self.num_attention_heads

    def layer_params(self) -> int:
        h = self.hidden_size
        attention = h * self.q_width * 2 + h * self.kv_width * 2  # q, o; k, v
        return attention + 3 * h * self.intermediate_size + 2 * h  # gate, up, down; two norms

    def params(self) -> int:
        embeddings = self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)
        return embeddings + self.num_hidden_layers * self.layer_params() + self.hidden_size

    def layer_activations(self) -> int:
        """Values one layer saves for backward, per token."""
        h, kv, i = self.hidden_size, self.kv_width, self.intermediate_size
        return 5 * h + 2 * self.q_width + 3 * kv + 4 * i  # norms in/out x2, q (+rotary), k (+rotary), v, attn out; MLP


GGUF_KEYS = {"embedding_length": "hidden_size", "feed_forward_length": "intermediate_size", "block_count": "num_hidden_layers",
             "attention.head_count": "num_attention_heads", "attention.head_count_kv": "num_key_value_heads"}


def gguf_config(path: str | Path) -> dict:
    """config.json's numbers from a GGUF file's header (llama.cpp's names), without reading its weights."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    arch = reader.fields["general.architecture"].contents()
    config = {name: int(reader.fields[f"{arch}.{key}"].contents()) for key, name in GGUF_KEYS.items()
              if f"{arch}.{key}" in reader.fields}
    config["vocab_size"] = len(reader.fields["tokenizer.ggml.tokens"].data)
    config["tie_word_embeddings"] = not any(tensor.name == "output.weight" for tensor in reader.tensors)
    return config


def lora_params(arch: Architecture, rank: int, targets) -> int:
    """Trainable parameters of LoRA of rank `rank` on the named projections of every layer."""
    h, i, q, kv = arch.hidden_size, arch.intermediate_size, arch.q_width, arch.kv_width
    shapes = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
              "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}
    names = shapes if targets == "all-linear" else [t for t in targets if t in shapes]
    return arch.num_hidden_layers * sum(rank * sum(shapes[name]) for name in names)


@dataclass
class Estimate:
    """Bytes per rank, by term."""

    terms: dict[str, float]

    @property
    def total(self) -> float:
        return sum(self.terms.values())

    def describe(self) -> str:
        parts = ", ".join(f"{name} {value / GiB:.2f}" for name, value in self.terms.items() if value >= 0.005 * GiB)
        return f"{self.total / GiB:.2f} GiB ({parts or 'all terms below 0.01'} GiB)"


def training(student: Architecture, *, batch_size: int, block_size: int, bf16: bool = False,
             checkpointing: bool = False, ranks: int = 1, fsdp: bool = False, trainable: int | None = None,
             teacher: Architecture | None = None, live_teacher_logits: bool = False) -> Estimate:
    """Peak per rank of a training step: `trainable` parameters (default all of the student) with AdamW;
    `teacher` frozen beside it (float32); `live_teacher_logits` when the teacher's logits are computed
    each step rather than read from a cache."""
    params = student.params()
    trainable = params if trainable is None else trainable
    shards = ranks if fsdp and ranks > 1 else 1
    gathered = student.layer_params() * FLOAT32 if shards > 1 else 0  # the layer FSDP has unsharded
    tokens, act_bytes = batch_size * block_size, 2 if bf16 else FLOAT32
    layer = student.layer_activations() * act_bytes
    if checkpointing:
        activations = tokens * (student.num_hidden_layers * student.hidden_size * act_bytes + layer)
    else:
        activations = tokens * student.num_hidden_layers * layer
    logits = 3 * tokens * student.vocab_size * FLOAT32  # logits, log-softmax, their gradient
    terms = {
        "weights": params * FLOAT32 / shards + gathered,
        "gradients": trainable * FLOAT32 / shards,
        "optimizer": 2 * trainable * FLOAT32 / shards,
        "autocast": trainable * 2 / shards if bf16 else 0.0,  # casts of trainable leaves only are cached
        "activations": activations,
        "logits": logits,
    }
    if teacher is not None:
        teacher_logits = 2 * tokens * teacher.vocab_size * FLOAT32 if live_teacher_logits else 0
        terms["teacher"] = teacher.params() * FLOAT32 + teacher_logits + tokens * teacher.layer_activations() * act_bytes
    return Estimate(terms)


def inference(model: Architecture, *, batch_size: int, block_size: int) -> Estimate:
    """A forward pass without gradients (the teacher's logit cache): weights, one layer's values, the logits."""
    tokens = batch_size * block_size
    return Estimate({
        "weights": model.params() * FLOAT32,
        "activations": tokens * model.layer_activations() * FLOAT32,
        "logits": 2 * tokens * model.vocab_size * FLOAT32,
    })


def quantization(model: Architecture, *, calibration_blocks: int, block_size: int) -> Estimate:
    """Layer-by-layer calibration (GPTQ, SmoothQuant): the float32 model, every calibration block's input
    and output at the current layer, and the Hessian of each of its linear inputs."""
    h, i = model.hidden_size, model.intermediate_size
    return Estimate({
        "weights": model.params() * FLOAT32,
        "calibration": 2 * calibration_blocks * block_size * h * FLOAT32,
        "hessians": (5 * h * h + model.q_width ** 2 + i * i) * FLOAT32,  # q, k, v, gate, up; o; down
    })


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="a model's config.json")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--block-size", type=int, default=1024)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--ranks", type=int, default=1)
    parser.add_argument("--fsdp", action="store_true")
    args = parser.parse_args(argv)
    arch = Architecture.from_config(json.loads(Path(args.config).read_text()))
    estimate = training(arch, batch_size=args.batch_size, block_size=args.block_size, bf16=args.bf16,
                        checkpointing=args.checkpointing, ranks=args.ranks, fsdp=args.fsdp)
    print(f"{arch.params() / 1e9:.2f}B parameters: {estimate.describe()} per rank")


if __name__ == "__main__":
    main()
