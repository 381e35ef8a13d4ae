"""
C{python3 -m vaporproxy.demo} (what C{make run} runs).
"""

import sys

from vaporproxy.demo.run import main

sys.exit(main())
