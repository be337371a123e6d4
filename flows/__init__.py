"""Entry points: the imf CLI, the pipeline, sweep and report flows, the demo.

Prefect's ephemeral server sends usage telemetry by default, which fails (and prints a long
traceback) on machines without internet; the project's commands turn it off unless the user
has set it. Its 20 s start-up limit fails whole commands on a busy small machine (seen on 2
cores with a training running beside): 90 s, unless the user has set it.
"""

import os

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
