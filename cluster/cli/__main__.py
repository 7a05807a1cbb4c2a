"""``python -m tetherlab.cluster.cli ARGS`` is ``tetherlab ARGS``."""

import sys

from tetherlab.cluster.cli.main import main

sys.exit(main())
