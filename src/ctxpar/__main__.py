import sys

from ctxpar.apps.cli import main

sys.exit(main())
