import sys

from idefics2.cli import main

sys.exit(main())
