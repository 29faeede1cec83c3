"""python -m steps.distill --teacher DIR --student DIR --data DIR --out DIR --settings JSON (see steps/distill/__init__.py)"""

from steps.artifacts import refused_writes
from steps.distill import main

with refused_writes():  # a full disk while writing checkpoints or metrics: one line too
    main()
