"""Entry points: the imf CLI, the pipeline, sweep and report flows, the demo.

Prefect's ephemeral server sends usage telemetry by default, which fails (and prints a long
traceback) on machines without internet; the project's commands turn it off unless the user
has set it.
"""

import os

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
