"""Where the project's shared material (spec, reference files) lives.

CI and developers' checkouts have `shared/` beside the repository; the
absolute `/work/shared` is the fallback for a checkout placed elsewhere.
"""

import os

_BESIDE_REPO = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared")
SHARED_DIR = os.path.abspath(_BESIDE_REPO) if os.path.isdir(_BESIDE_REPO) else "/work/shared"
REFERENCE_DIR = os.path.join(SHARED_DIR, "reference")
