"""Code that runs INSIDE a job (local process or pod). Never imported at DAG-parse time; never imports Airflow."""
