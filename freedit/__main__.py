import sys
from freedit.cli import main

sys.exit(main())
