import sys

from dsd.cli import main

sys.exit(main())
