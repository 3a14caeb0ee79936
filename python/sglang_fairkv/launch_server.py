"""``python -m sglang_fairkv.launch_server``: SGLang's server with sglang-fairkv inside.

Takes every ``python -m sglang.launch_server`` flag and the project's own (``--help``); what it does:
:mod:`sglang_fairkv.serving.launcher`.
"""

from __future__ import annotations

import sys

from .serving.launcher import main

if __name__ == "__main__":
    sys.exit(main())
