-- The Prefect server's database and MLflow's basic-auth database (the first, mlflow, is
-- POSTGRES_DB). Also what to run once against a managed PostgreSQL (infra/k8s/README.md).
CREATE DATABASE prefect;
CREATE DATABASE mlflow_auth;
