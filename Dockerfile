# The Airflow image docker-compose.yaml builds: the official slim Airflow 3.3.2 image plus our pinned
# requirements (DuckDB, Great Expectations, database drivers, ...). Slim is Airflow core without the full
# image's many providers, so requirements.txt (resolved against apache-airflow==3.3.2, the same lock `make venv`
# installs and CI tests) goes in without fighting the image's own pins.
#
# The reconcile library itself is not installed: compose mounts ./include and sets PYTHONPATH, so an edit is
# live without a rebuild. Rebuild (`docker compose build`) when requirements.txt changes.
ARG AIRFLOW_IMAGE=apache/airflow:slim-3.3.2-python3.11
FROM ${AIRFLOW_IMAGE}

COPY --chown=airflow:0 requirements.txt /opt/reconcile/requirements.txt
# Airflow pinned on the command line as well (the image docs' advice): no requirement may swap its version.
RUN pip install --no-cache-dir "apache-airflow==${AIRFLOW_VERSION}" -r /opt/reconcile/requirements.txt \
    && python -c "import duckdb, great_expectations, airflow.sdk; print('airflow', airflow.__version__)"
