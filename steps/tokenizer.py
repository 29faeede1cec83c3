"""Train a byte-level BPE tokenizer for a `scratch:` model (the demo teacher).

Input: a raw dataset directory (`datasets.save_to_disk`) and the dataset's format
fields (`text_field`, or `template` + `response_field`): it learns the text that
`steps.data.prepare` will tokenize.
Output: a tokenizer directory that `AutoTokenizer.from_pretrained` reloads,
with `<|endoftext|>` as bos, eos and pad. Byte-level BPE never produces an
unknown token, so any text round-trips. Trains in well under a second on
Python's own documentation.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from steps.artifacts import StageError, atomic_dir, write_manifest
from steps.cli import stage_cli

EOS = "<|endoftext|>"


@dataclass
class TokenizerSettings:
    vocab_size: int = 2048  # including the byte alphabet (256) and the special token
    dataset: str = ""  # the dataset it was trained on (recorded; the rule picks the files)
    text_field: str = "text"  # the dataset's format fields (its `datasets:` entry), as `prepare` reads them
    template: str = ""
    response_field: str = ""


def train_bpe(texts, vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 300:
        raise StageError(f"tokenizer vocab_size {vocab_size} is too small: byte-level BPE needs at least 300")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=EOS, eos_token=EOS, pad_token=EOS)


def run(raw_dir: str, out: str, settings: TokenizerSettings) -> None:
    from datasets import load_from_disk

    from steps.data.prepare import PrepareSettings, check_fields, record_to_pieces

    started = time.time()
    data = load_from_disk(raw_dir)
    fields = PrepareSettings(text_field=settings.text_field, template=settings.template,
                             response_field=settings.response_field)
    check_fields(data.column_names, fields, raw_dir)  # one line naming the missing field, before training
    texts = [text for record in data if (text := "".join(record_to_pieces(record, fields)))]  # prompt + target
    tokenizer = train_bpe(texts, settings.vocab_size)
    with atomic_dir(out) as tmp:
        tokenizer.save_pretrained(str(tmp))
        write_manifest(tmp, "tokenizer", settings, {"raw": raw_dir}, started, vocab_size=len(tokenizer))


def main(argv=None) -> None:
    with stage_cli(__doc__, argv, TokenizerSettings, raw="raw dataset directory", out="tokenizer directory to write") as args:
        run(args.raw, args.out, args.settings)


if __name__ == "__main__":
    main()
