"""Ray job entrypoint: ``ray job submit --working-dir . -- python jobs/curate.py run --config C.yaml``.

Takes exactly the arguments of ``curation`` (``run --config ... [--set ...]``); connects to
``RAY_ADDRESS`` when set (as it is inside a Ray job), else starts a local Ray.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from curation.cli import main  # noqa: E402

if __name__ == "__main__":
    argv = sys.argv[1:]
    if argv and argv[0].startswith("--"):
        argv = ["run", *argv]  # `python jobs/curate.py --config C.yaml` means `run`
    sys.exit(main(argv))
