"""Apache Airflow provider for the LLM lifecycle.

Nothing heavy is imported here: DAG files import this package at parse time, and the
job runtime (``llmops_provider.runtime``) imports it inside containers without Airflow.
"""

__version__ = "0.1.0"
