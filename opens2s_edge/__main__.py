import sys

from opens2s_edge.cli import main

sys.exit(main())
