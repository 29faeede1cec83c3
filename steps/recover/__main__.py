"""python -m steps.recover --model DIR --data DIR --out DIR --settings JSON (see steps/recover/__init__.py)"""

from steps.artifacts import refused_writes
from steps.recover import main

with refused_writes():  # a full disk while writing checkpoints or metrics: one line too
    main()
