"""``python -m blkdev.cli``: the ``vhost-user-blk`` command."""

import sys

from blkdev.cli.main import main

sys.exit(main())
