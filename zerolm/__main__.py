import sys

from zerolm.cli import main

sys.exit(main())
