import sys

from ecospa.cli import main

sys.exit(main())
