"""``python -m bench``: see bench/README.md; ``python -m bench reliability``: the long
reliability run (bench/reliability.py)."""

import sys

if sys.argv[1:2] == ["reliability"]:
    from bench.reliability import main as reliability

    raise SystemExit(reliability(sys.argv[2:]))

from bench.run import main

raise SystemExit(main())
