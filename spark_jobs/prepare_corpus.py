"""``spark-submit spark_jobs/prepare_corpus.py ...`` from a checkout: the data pipeline's Spark application.

The application lives in the provider (``llmops_provider/data/prepare_corpus.py``, shipped in
its wheel, which is what the data operator submits); this entrypoint runs the same ``main``
for a checkout where the provider is not installed. Arguments: see that module.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # the checkout root, not spark_jobs/
    from llmops_provider.data.prepare_corpus import main

    sys.exit(main())
