import sys

from spinlm.cli import main

sys.exit(main())
