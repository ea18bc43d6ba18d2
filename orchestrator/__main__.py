"""`python -m orchestrator ...` is the same program as the `speechlm` console script."""

import sys

from orchestrator.cli.main import main

sys.exit(main())
