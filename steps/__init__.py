"""Stage code of the compression workflow: one module per stage, each with a small CLI (steps/cli.py).

`python -m steps.<stage>` imports this package first, before any library, so the switches below are set before
the libraries that need them load. They silence what the libraries print about themselves on import, which no
setting of ours can change, and nothing else: a filter on a logger drops only the records that logger itself
makes (its children's warnings still show), and each of these loggers makes only the notice named beside it.
"""

import logging
import os
import warnings

NOISY_LOGGERS = {
    "torchao": "its CUDA extensions (_C_mxfp8, _C_cutlass_90a) failing to load on a machine without CUDA",
    "torchao.kernel.intmm": "no triton, which CPU-only machines never have",
    "torch.utils._pytree": "torchao registering its enums the way torch now deprecates",
    "bitsandbytes.backends.cpu.ops": "the optional `kernels` package's CPU 4-bit kernel is not installed",
}
for _name in NOISY_LOGGERS:
    logging.getLogger(_name).addFilter(lambda record: False)

os.environ.setdefault("GPTQMODEL_DISABLE_GIL_WARNING", "1")  # GPTQModel's advice to run a free-threaded Python
# peft asks every model it wraps for `is_gradient_checkpointing`, a transformers 5 deprecation peft has to fix
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
