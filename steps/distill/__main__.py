"""python -m steps.distill --teacher DIR --student DIR --data DIR --out DIR --settings JSON (see steps/distill/__init__.py)"""

from steps.distill import main

main()
