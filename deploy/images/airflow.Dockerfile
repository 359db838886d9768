# Control-plane image: the official Airflow image plus this provider and the data-stage clients.
# Build from the repo root:  docker build -f deploy/images/airflow.Dockerfile -t llmops-airflow:0.1.0 .
FROM apache/airflow:3.3.2-python3.11
USER root
RUN apt-get update && apt-get install -y --no-install-recommends openjdk-17-jre-headless && rm -rf /var/lib/apt/lists/*
USER airflow
COPY requirements/control-plane.lock /tmp/control-plane.lock
RUN pip install --no-cache-dir -r /tmp/control-plane.lock
COPY --chown=airflow:root pyproject.toml README.md /opt/llmops/
COPY --chown=airflow:root llmops_provider /opt/llmops/llmops_provider
RUN pip install --no-cache-dir --no-deps /opt/llmops
