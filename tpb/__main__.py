import sys

from tpb.cli import main

sys.exit(main())
