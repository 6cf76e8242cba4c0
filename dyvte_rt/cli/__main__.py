import sys

from dyvte_rt.cli import main

sys.exit(main())
