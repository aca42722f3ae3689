import sys

from jregfix.cli import main

sys.exit(main())
