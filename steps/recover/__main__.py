"""python -m steps.recover --model DIR --data DIR --out DIR --settings JSON (see steps/recover/__init__.py)"""

from steps.recover import main

main()
