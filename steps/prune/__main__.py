"""python -m steps.prune --model DIR --data DIR --out DIR --settings JSON (see steps/prune/__init__.py)"""

from steps.prune import main

main()
