import sys

from lars.sweep.cli import main

sys.exit(main())
