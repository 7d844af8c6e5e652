import sys

from handpose.data.convert import main

sys.exit(main())
