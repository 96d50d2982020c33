import sys

from artaug.cli import main

sys.exit(main())
